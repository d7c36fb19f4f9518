"""Rotary position embeddings (RoPE): frequencies with the Hugging Face scaling variants, cos/sin
tables, and the rotation of queries and keys.

The three steps are separate so tables can be computed once and reused for every layer::

    inv_freq, factor = rope_frequencies(head_dim)       # or rope_cos_sin(...) directly
    cos, sin = rope_cos_sin(positions, head_dim)         # (seq, head_dim // 2) each
    q = apply_rope(q, cos, sin)                          # (batch, heads, seq, head_dim)

Unlike Hugging Face's ``cos``/``sin`` (``head_dim`` wide, each half repeated), attnkit's tables
hold the ``rotary_dim // 2`` distinct values; ``np.concatenate([cos, cos], -1)`` gives theirs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import choice, float_array, float_dtype, integer, is_half, positions_array, real
from attnkit.positional import check_dim, frequency_powers, inverse_frequencies

__all__ = ["apply_rope", "rope_cos_sin", "rope_frequencies"]

_ROPE_TYPES: dict[str, tuple[set[str], set[str]]] = {
    # rope_type: (required keys, optional keys)
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, {"max_position_embeddings", "original_max_position_embeddings"}),
    "yarn": (
        {"original_max_position_embeddings"},
        {"factor", "max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim", "truncate"},
    ),
    "longrope": (
        {"short_factor", "long_factor", "original_max_position_embeddings"},
        {"factor", "max_position_embeddings", "attention_factor"},
    ),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
}
# Keys of a transformers `rope_parameters` dict that describe the model rather than the scaling.
_MODEL_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _scaling_params(scaling: Mapping[str, Any], base: float) -> tuple[str, dict[str, Any]]:
    if not isinstance(scaling, Mapping):
        raise TypeError(f"scaling: expected None or a dict like transformers' rope_scaling, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"scaling: rope_type must be one of {', '.join(map(repr, _ROPE_TYPES))}, got {rope_type!r}")
    required, optional = _ROPE_TYPES[rope_type]
    params = {k: v for k, v in scaling.items() if k not in _MODEL_KEYS}
    missing = required - params.keys()
    if missing:
        raise ValueError(f"scaling: rope_type {rope_type!r} needs {', '.join(sorted(missing))}")
    unknown = params.keys() - required - optional
    if unknown:
        raise ValueError(
            f"scaling: unknown keys for rope_type {rope_type!r}: {', '.join(sorted(unknown))} "
            f"(accepted: {', '.join(sorted(required | optional)) or 'none'})"
        )
    if "rope_theta" in scaling and float(scaling["rope_theta"]) != base:
        raise ValueError(f"scaling: rope_theta = {scaling['rope_theta']} disagrees with base = {base}; pass base=")
    return rope_type, params


def rope_frequencies(
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    seq_len: int | None = None,
) -> tuple[npt.NDArray[np.float64], float]:
    """RoPE inverse frequencies and attention factor, with Hugging Face's scaling variants.

    Without scaling, ``inv_freq[i] = 1 / base ** (2i / rotary_dim)``. ``scaling`` takes the form of a
    transformers ``rope_scaling`` / ``rope_parameters`` entry and means what it means there:

    * ``{"rope_type": "linear", "factor"}``: frequencies divided by ``factor``.
    * ``{"rope_type": "dynamic", "factor", "max_position_embeddings"}``: NTK-aware base
      ``base * (factor * L / max - (factor - 1)) ** (d / (d - 2))`` with
      ``L = max(seq_len, max_position_embeddings)``.
    * ``{"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast"=32,
      "beta_slow"=1, "mscale", "mscale_all_dim", "attention_factor", "truncate"=True}``.
    * ``{"rope_type": "longrope", "short_factor", "long_factor", "original_max_position_embeddings",
      "factor", "attention_factor"}``: ``long_factor`` when ``seq_len`` exceeds the original length.
    * ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}``.

    All arithmetic is float64 (transformers computes in float32, so its frequencies differ from
    these by about 1e-7 relative).

    Args:
        rotary_dim: number of rotated channels (even; ``head_dim`` unless the rotary is partial).
        base: ``rope_theta``.
        scaling: None or a scaling dict as above (``"type"`` is accepted for ``"rope_type"``).
        seq_len: current sequence length, used by ``dynamic`` and ``longrope``.

    Returns:
        ``(inv_freq, attention_factor)``: ``(rotary_dim // 2,)`` float64 inverse frequencies and the
        factor that multiplies cos and sin (1.0 except for ``yarn`` and ``longrope``).

    Raises:
        TypeError: non-int sizes, a non-dict ``scaling``.
        ValueError: odd, negative or over 2**24 ``rotary_dim``, non-positive ``base``, an unknown ``rope_type``, missing,
            unknown or out-of-range scaling parameters.

    Example:
        >>> import attnkit
        >>> inv_freq, factor = attnkit.rope_frequencies(4, scaling={"rope_type": "linear", "factor": 2.0})
        >>> inv_freq, factor
        (array([0.5  , 0.005]), 1.0)
    """
    dim = check_dim(integer(rotary_dim, "rotary_dim", minimum=0), "rotary_dim")
    base = real(base, "base", positive=True)
    if seq_len is not None:
        seq_len = integer(seq_len, "seq_len", minimum=0)
    if scaling is None:
        return inverse_frequencies(dim, base), 1.0
    rope_type, p = _scaling_params(scaling, base)
    compute = _SCALINGS.get(rope_type)
    if compute is None:
        return inverse_frequencies(dim, base), 1.0
    try:
        with np.errstate(all="ignore"):  # what overflows is refused just below, not warned about
            inv_freq, factor = compute(dim, base, p, seq_len)
    except (OverflowError, ZeroDivisionError):
        inv_freq, factor = np.array([np.inf]), np.inf
    if not (np.isfinite(inv_freq).all() and math.isfinite(factor)):
        raise ValueError(
            f"scaling: rope_type {rope_type!r} with {dict(p)} and base = {base} gives frequencies or an "
            "attention factor that are not finite in float64"
        )
    return inv_freq, factor


def _positive(p: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = p.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"scaling: {key!r} is required")
        return default
    try:
        return real(value, f"scaling[{key!r}]", positive=True)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _nonnegative(p: Mapping[str, Any], key: str) -> float:
    """An optional finite number >= 0 (0 when absent)."""
    value = p.get(key)
    if value is None:
        return 0.0
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not 0 <= float(value) < math.inf:
        raise ValueError(f"scaling[{key!r}]: expected a finite number >= 0, got {value!r}")
    return float(value)


def _factor_or_ratio(p: Mapping[str, Any]) -> float:
    """``factor``, or ``max_position_embeddings / original_max_position_embeddings`` without it."""
    if p.get("factor") is not None:
        return _positive(p, "factor")
    if p.get("max_position_embeddings") is None:
        raise ValueError("scaling: needs 'factor' or 'max_position_embeddings'")
    return _positive(p, "max_position_embeddings") / _positive(p, "original_max_position_embeddings")


def _linear(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None) -> tuple[npt.NDArray[np.float64], float]:
    return inverse_frequencies(dim, base) / _positive(p, "factor"), 1.0


def _dynamic(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None) -> tuple[npt.NDArray[np.float64], float]:
    factor = _positive(p, "factor")
    key = "max_position_embeddings" if p.get("max_position_embeddings") is not None else "original_max_position_embeddings"
    max_pos = _positive(p, key)
    length = max(seq_len or 0, max_pos)
    if dim > 2:
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return inverse_frequencies(dim, base), 1.0


def _yarn(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None) -> tuple[npt.NDArray[np.float64], float]:
    factor = _factor_or_ratio(p)
    original = _positive(p, "original_max_position_embeddings")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if base <= 1:
        raise ValueError(f"base: yarn needs a base above 1 (it divides by log(base)), got {base}")
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        # As in transformers, 0 or None means "not given" for these four.
        m, m_all = (_nonnegative(p, key) for key in ("mscale", "mscale_all_dim"))
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    else:
        attention_factor = _positive(p, "attention_factor")
    beta_fast = _positive(p, "beta_fast", 32.0) if p.get("beta_fast") else 32.0
    beta_slow = _positive(p, "beta_slow", 1.0) if p.get("beta_slow") else 1.0
    truncate = p.get("truncate", True)
    if not isinstance(truncate, (bool, np.bool_)):
        raise ValueError(f"scaling: 'truncate' must be a bool, got {truncate!r}")

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as in transformers: avoids dividing by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # weight of the unscaled frequencies
    pos_freqs = frequency_powers(dim, base)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _longrope(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None) -> tuple[npt.NDArray[np.float64], float]:
    original = _positive(p, "original_max_position_embeddings")
    factor = _factor_or_ratio(p)
    if p.get("attention_factor") is not None:
        attention_factor = _positive(p, "attention_factor")
    elif factor <= 1.0:
        attention_factor = 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    key = "long_factor" if seq_len and seq_len > original else "short_factor"
    ext = np.asarray(p[key], dtype=np.float64)
    if ext.shape != (dim // 2,) or not np.all(np.isfinite(ext)) or np.any(ext <= 0):
        raise ValueError(f"scaling: {key!r} must hold rotary_dim // 2 = {dim // 2} positive numbers, got shape {ext.shape}")
    return 1.0 / (ext * frequency_powers(dim, base)), attention_factor


def _llama3(dim: int, base: float, p: Mapping[str, Any], seq_len: int | None) -> tuple[npt.NDArray[np.float64], float]:
    factor = _positive(p, "factor")
    low_factor = _positive(p, "low_freq_factor")
    high_factor = _positive(p, "high_freq_factor")
    if high_factor <= low_factor:
        raise ValueError(f"scaling: high_freq_factor ({high_factor}) must exceed low_freq_factor ({low_factor})")
    old_len = _positive(p, "original_max_position_embeddings")
    inv_freq = inverse_frequencies(dim, base)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low_factor, old_len / high_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled), 1.0


_SCALINGS = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope, "llama3": _llama3}


def rope_cos_sin(
    positions: int | npt.ArrayLike,
    rotary_dim: int,
    *,
    base: float = 10000.0,
    scaling: Mapping[str, Any] | None = None,
    dtype: npt.DTypeLike = np.float32,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The cos and sin tables of RoPE for integer positions.

    ``cos[..., i] = f * cos(p * inv_freq[i])`` and ``sin[..., i] = f * sin(p * inv_freq[i])``, with
    ``(inv_freq, f) = rope_frequencies(rotary_dim, base=base, scaling=scaling,
    seq_len=max(positions) + 1)`` (the sequence length Hugging Face uses for ``dynamic`` and
    ``longrope``). Phases are computed in float64 from the exact positions and rounded once.

    Args:
        positions: integer array of any shape (e.g. ``(seq,)`` or ``(batch, seq)`` from
            :func:`attnkit.position_ids`), or an int ``n`` meaning ``arange(n)``.
        rotary_dim: number of rotated channels (even).
        base, scaling: as in :func:`rope_frequencies`.
        dtype: float32, float64, float16 or ``ml_dtypes.bfloat16`` (each value rounded once from
            float64).

    Returns:
        ``(cos, sin)``, each ``positions.shape + (rotary_dim // 2,)`` of ``dtype``.

    Raises:
        TypeError, ValueError: as :func:`rope_frequencies`; positions beyond ±2**53.

    Example:
        >>> import attnkit
        >>> cos, sin = attnkit.rope_cos_sin(3, 4)
        >>> cos.shape, round(float(sin[1, 0]), 4)
        ((3, 2), 0.8415)
    """
    pos = positions_array(positions)
    seq_len = int(pos.max()) + 1 if pos.size else None
    inv_freq, factor = rope_frequencies(rotary_dim, base=base, scaling=scaling, seq_len=seq_len)
    dt = float_dtype(dtype)
    cos, sin = _core.rope_cos_sin(pos, inv_freq, factor, dt.name)
    return cos, sin


def apply_rope(
    x: npt.ArrayLike,
    cos: npt.ArrayLike,
    sin: npt.ArrayLike,
    *,
    style: Literal["half", "interleaved"] = "half",
    layout: Literal["bhsd", "bshd"] = "bhsd",
) -> npt.NDArray[Any]:
    """Rotates queries or keys by their positions (RoPE).

    With ``h = cos.shape[-1]`` and ``r = 2h`` rotated channels:

    * ``style="half"`` (GPT-NeoX, LLaMA, ``rotate_half``): channel ``i`` pairs with ``i + h``:
      ``out[i] = x[i] cos - x[i+h] sin``, ``out[i+h] = x[i+h] cos + x[i] sin``.
    * ``style="interleaved"`` (GPT-J): channel ``2i`` pairs with ``2i + 1``.

    Channels from ``r`` on pass through unchanged (partial rotary). Each output of a float32 or
    float64 ``x`` is computed in that dtype as ``x * cos + rotate(x) * sin`` is in PyTorch, so it
    matches the Hugging Face expression bit for bit. A float16 or bfloat16 ``x`` is computed in
    float32 and each output rounded once (PyTorch rounds each product and the sum to 16 bits, so
    it can differ in the last bit).

    Args:
        x: float32, float64, float16 or ``ml_dtypes.bfloat16``, ``(batch, heads, seq, head_dim)``
            (``layout="bhsd"``) or ``(batch, seq, heads, head_dim)`` (``layout="bshd"``).
        cos, sin: tables from :func:`rope_cos_sin` in ``x``'s dtype (for a 16-bit ``x``: its dtype,
            float32 or float64), ``(seq, r/2)`` shared by the batch or ``(batch, seq, r/2)``
            (per-sequence positions), with ``r <= head_dim``.
        style: ``"half"`` or ``"interleaved"``.
        layout: ``"bhsd"`` or ``"bshd"``.

    Returns:
        A new array of ``x``'s shape and dtype.

    Raises:
        TypeError: non-float arrays, tables of another dtype than ``x``.
        ValueError: ``x`` not 4-d, tables whose shape does not fit ``x``, bad ``style``/``layout``.

    Example:
        >>> import numpy as np, attnkit
        >>> cos, sin = attnkit.rope_cos_sin(2, 2)
        >>> attnkit.apply_rope(np.ones((1, 1, 2, 2), np.float32), cos, sin)[0, 0].round(4)
        array([[ 1.    ,  1.    ],
               [-0.3012,  1.3818]], dtype=float32)
    """
    style = choice(style, "style", ("half", "interleaved"))  # type: ignore[assignment]
    layout = choice(layout, "layout", ("bhsd", "bshd"))  # type: ignore[assignment]
    xa = float_array(x, "x")
    c = float_array(cos, "cos")
    s = float_array(sin, "sin")
    if is_half(xa.dtype):
        # Computed in float32: tables of x's dtype widen exactly, float64 ones round once.
        allowed = (xa.dtype, np.dtype(np.float32), np.dtype(np.float64))
        if c.dtype != s.dtype or c.dtype not in allowed:
            raise TypeError(
                f"cos, sin: expected one dtype, {xa.dtype} (that of x), float32 or float64, got {c.dtype} and {s.dtype}"
            )
        c, s = (t.astype(np.float32, copy=False) for t in (c, s))
    elif c.dtype != xa.dtype or s.dtype != xa.dtype:
        raise TypeError(f"cos, sin: expected dtype {xa.dtype} (that of x), got {c.dtype} and {s.dtype}")
    return _core.apply_rope(xa, c, s, style, layout)
