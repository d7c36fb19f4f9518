"""Absolute and relative position information: sinusoidal encodings, position ids for padded
batches, ALiBi slopes and T5's relative position buckets and biases.

Rotary embeddings (RoPE) are in :mod:`attnkit.rope`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import _as_array, allocating, choice, float_array, float_dtype, int_array, integer, positions_array, real

__all__ = [
    "alibi_slopes",
    "position_ids",
    "relative_position_bias",
    "relative_position_bucket",
    "sinusoidal_positions",
]


MAX_DIM = 1 << 24


def check_dim(dim: int, name: str) -> int:
    """An even channel count in ``[0, 2**24]``: ``dim // 2`` frequencies are computed one by one."""
    if dim % 2:
        raise ValueError(f"{name}: expected an even number of channels (sin/cos pairs), got {dim}")
    if dim > MAX_DIM:
        raise ValueError(f"{name}: at most 2**24 channels are supported, got {dim}")
    return dim


def frequency_powers(dim: int, base: float) -> npt.NDArray[np.float64]:
    """``base ** (2i / dim)`` for ``i < dim // 2`` in float64, one C-library ``pow`` per element.

    NumPy's vectorised ``**`` may differ from ``pow`` in the last bit, and at position 2**20 one bit
    of a frequency moves the phase by about 1e-10; computing each element with ``pow`` makes the
    frequencies reproducible (they are few, so this costs nothing)."""
    return np.array([base ** (2 * i / dim) for i in range(dim // 2)], dtype=np.float64)


def inverse_frequencies(dim: int, base: float) -> npt.NDArray[np.float64]:
    """``1 / base ** (2i / dim)``: the frequencies shared by the sinusoidal encoding and RoPE."""
    return 1.0 / frequency_powers(dim, base)


def sinusoidal_positions(
    positions: int | npt.ArrayLike,
    dim: int,
    *,
    base: float = 10000.0,
    layout: Literal["interleaved", "halves"] = "interleaved",
    dtype: npt.DTypeLike = np.float32,
) -> npt.NDArray[Any]:
    """The sinusoidal position encoding of "Attention Is All You Need".

    ``phase[p, i] = positions[p] * inv_freq[i]`` with ``inv_freq[i] = 1 / base ** (2i / dim)``, both
    in float64 from the exact integer position; ``sin``/``cos`` of it are rounded once to ``dtype``
    (within 1 ULP of float64 sin/cos of the phase).

    Args:
        positions: an integer array of any shape, or an int ``n`` meaning ``arange(n)``.
        dim: the (even) encoding size.
        base: the wavelength base, 10000 in the paper.
        layout: ``"interleaved"``: sin on even channels, cos on odd ones (the paper);
            ``"halves"``: all sines, then all cosines (as in tensor2tensor and many libraries).
        dtype: float32, float64, float16 or ``ml_dtypes.bfloat16`` (each value rounded once from
            float64).

    Returns:
        ``positions.shape + (dim,)`` array of ``dtype``.

    Raises:
        TypeError: non-integer positions, a dtype other than float32, float64, float16 or
            bfloat16.
        ValueError: odd, negative or over 2**24 ``dim``, non-positive ``base``, a bad ``layout``, positions
            beyond ±2**53.

    Example:
        >>> import attnkit
        >>> attnkit.sinusoidal_positions(3, 4).round(4)
        array([[ 0.    ,  1.    ,  0.    ,  1.    ],
               [ 0.8415,  0.5403,  0.01  ,  1.    ],
               [ 0.9093, -0.4161,  0.02  ,  0.9998]], dtype=float32)
    """
    layout = choice(layout, "layout", ("interleaved", "halves"))  # type: ignore[assignment]
    dim = check_dim(integer(dim, "dim", minimum=0), "dim")
    inv_freq = inverse_frequencies(dim, real(base, "base", positive=True))
    dt = float_dtype(dtype)
    return _core.sinusoidal(positions_array(positions), inv_freq, layout, dt.name)


def position_ids(attention_mask: npt.ArrayLike, *, offset: int = 0) -> npt.NDArray[np.int64]:
    """Positions that count only real tokens, for left- or right-padded batches.

    Token ``t`` of row ``b`` gets ``offset`` plus the number of real tokens before it in the row;
    padded slots get ``offset``. Learned absolute positions are then
    ``attnkit.embedding(position_ids(mask), position_table)``.

    Args:
        attention_mask: ``(batch, seq)`` bool or integer mask, nonzero = real token (the
            tokenizers convention: 1 = token, 0 = padding).
        offset: the first position (e.g. 2 for OPT/RoBERTa-style tables).

    Returns:
        ``(batch, seq)`` int64 positions.

    Raises:
        TypeError: a float or other non-integer, non-bool mask.
        ValueError: a mask that is not 2-d.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.position_ids(np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
        array([[0, 0, 0, 1, 2],
               [0, 1, 2, 0, 0]])
    """
    mask = _as_array(attention_mask, "attention_mask")
    if mask.dtype.kind not in "biu":
        raise TypeError(f"attention_mask: expected a bool or integer array, got dtype {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"attention_mask: expected a 2-d (batch, seq) array, got shape {mask.shape}")
    offset = integer(offset, "offset")
    int64 = np.iinfo(np.int64)
    if not int64.min <= offset <= int64.max - max(mask.shape[1] - 1, 0):
        raise ValueError(
            f"offset: positions offset..offset + {max(mask.shape[1] - 1, 0)} must fit in int64, got offset = {offset}"
        )
    real_token = mask != 0
    counts = np.cumsum(real_token, axis=-1, dtype=np.int64) - 1
    return np.where(real_token, counts + offset, np.int64(offset))


def alibi_slopes(num_heads: int) -> npt.NDArray[np.float64]:
    """The per-head slopes of ALiBi (Press et al., "Train Short, Test Long").

    For ``n`` a power of two, head ``h`` gets ``2 ** (-8 (h + 1) / n)``. Otherwise the ``m`` slopes
    of the largest power of two ``m < n`` come first, followed by the first ``n - m`` slopes at odd
    positions of the ``2m``-head sequence (the paper's rule, as in BLOOM and MPT).

    Args:
        num_heads: the number of attention heads (>= 0).

    Returns:
        ``(num_heads,)`` float64 slopes, each computed as one correctly rounded ``exp2``.

    Raises:
        TypeError: ``num_heads`` not an int.
        ValueError: ``num_heads`` negative.

    Example:
        >>> import attnkit
        >>> attnkit.alibi_slopes(4)
        array([0.25      , 0.0625    , 0.015625  , 0.00390625])
    """
    n = integer(num_heads, "num_heads", minimum=0)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    m = 1 << (n.bit_length() - 1)  # largest power of two <= n
    with allocating(f"out ({n} slopes: set by num_heads)"):
        exponents = np.empty(n, dtype=np.float64)  # fails at once if it cannot be had
        exponents[:m] = (np.arange(m, dtype=np.float64) + 1) / m
        exponents[m:] = (2 * np.arange(n - m, dtype=np.float64) + 1) / (2 * m)
        return np.exp2(-8.0 * exponents)


def _check_bucket_options(bidirectional: bool, num_buckets: int, max_distance: int) -> tuple[int, int]:
    """Validates T5's options; returns (buckets per direction, exact buckets)."""
    if not isinstance(bidirectional, (bool, np.bool_)):
        raise TypeError(f"bidirectional: expected a bool, got {type(bidirectional).__name__}")
    num_buckets = integer(num_buckets, "num_buckets", minimum=1)
    max_distance = integer(max_distance, "max_distance", minimum=1)
    per_side = num_buckets // 2 if bidirectional else num_buckets
    max_exact = per_side // 2
    if max_exact < 1:
        raise ValueError(
            f"num_buckets: {num_buckets} leaves no exact buckets; use >= {4 if bidirectional else 2}"
        )
    if max_distance <= max_exact:
        raise ValueError(f"max_distance: must exceed the {max_exact} exact buckets, got {max_distance}")
    if not np.float32(math.log(max_distance / max_exact)) > 0:
        raise ValueError(
            f"max_distance: {max_distance} is too close to the {max_exact} exact buckets for T5's float32 "
            "logarithm (their ratio rounds to 1)"
        )
    return per_side, max_exact


def relative_position_bucket(
    relative_position: npt.ArrayLike,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> npt.NDArray[np.int64]:
    """T5's bucketing of relative positions (``key_position - query_position``).

    Half of the buckets (per direction when ``bidirectional``) hold single distances; the others
    cover logarithmically growing ranges up to ``max_distance``, and everything farther shares the
    last bucket. The logarithm is evaluated in float32 exactly as in T5, so the buckets are the
    ones pretrained T5 models were trained with.

    Args:
        relative_position: integer array of any shape.
        bidirectional: whether positive and negative offsets get separate buckets (encoder) or
            only keys before the query count (decoder).
        num_buckets: total number of buckets.
        max_distance: distance from which all offsets share the last bucket.

    Returns:
        int64 bucket indices in ``[0, num_buckets)``, of the input's shape.

    Raises:
        TypeError: non-integer positions or options.
        ValueError: options that leave no exact buckets or a ``max_distance`` within them.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.relative_position_bucket(np.array([-200, -3, 0, 3, 200]))
        array([15,  3,  0, 19, 31])
    """
    rel = _relative_int64(int_array(relative_position, "relative_position"))
    per_side, max_exact = _check_bucket_options(bidirectional, num_buckets, max_distance)
    buckets = np.zeros(rel.shape, dtype=np.int64)
    if bidirectional:
        buckets += (rel > 0).astype(np.int64) * per_side
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    # T5 computes this in float32: log(rel / max_exact) / log(max_distance / max_exact) * ...
    large = np.maximum(rel, max_exact).astype(np.float32)
    scaled = (
        np.log(large / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(per_side - max_exact)
    )
    # Clipped before the cast: a float beyond int64 (or NaN) has no defined integer value.
    steps = np.minimum(scaled, np.float32(per_side - max_exact)).astype(np.int64)
    if_large = np.minimum(max_exact + steps, per_side - 1)
    return buckets + np.where(rel < max_exact, rel, if_large)


def _relative_int64(rel: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Relative positions as int64 in [-(2**63 - 1), 2**63 - 1]: every bucket is the same for
    the values moved there (distances that large share the last bucket), and ``abs`` of each is
    defined."""
    top = np.iinfo(np.int64).max
    clipped: npt.NDArray[np.int64]
    if rel.dtype == np.uint64:
        clipped = np.minimum(rel, np.uint64(top)).astype(np.int64)
    else:
        clipped = np.maximum(rel.astype(np.int64), np.int64(-top))
    return clipped


def relative_position_bias(
    q_len: int,
    k_len: int,
    table: npt.ArrayLike,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> npt.NDArray[Any]:
    """T5's relative position bias: ``bias[h, i, j] = table[bucket(j - i), h]``.

    Args:
        q_len: number of queries.
        k_len: number of keys.
        table: ``(num_buckets, heads)`` float32, float64, float16 or bfloat16 learned biases.
        bidirectional, num_buckets, max_distance: as in :func:`relative_position_bucket`.

    Returns:
        ``(heads, q_len, k_len)`` array of the table's dtype, to be added to attention scores.

    Raises:
        TypeError: non-float table, non-integer lengths.
        ValueError: negative lengths, a table whose first axis is not ``num_buckets``.

    Example:
        >>> import numpy as np, attnkit
        >>> table = np.arange(64, dtype=np.float32).reshape(32, 2)
        >>> attnkit.relative_position_bias(2, 3, table)[0]
        array([[ 0., 34., 36.],
               [ 2.,  0., 34.]], dtype=float32)
    """
    q_len = integer(q_len, "q_len", minimum=0)
    k_len = integer(k_len, "k_len", minimum=0)
    _check_bucket_options(bidirectional, num_buckets, max_distance)
    weights = float_array(table, "table")
    if weights.ndim != 2 or weights.shape[0] != num_buckets:
        raise ValueError(f"table: expected shape (num_buckets={num_buckets}, heads), got {weights.shape}")
    with allocating(f"out ({weights.shape[1]}, {q_len}, {k_len}): set by table, q_len and k_len"):
        out = np.empty((weights.shape[1], q_len, k_len), weights.dtype)  # fails at once if too big
        # Only q_len + k_len - 1 distinct offsets exist: bucket those, then gather.
        offsets = np.arange(-(q_len - 1), k_len, dtype=np.int64) if q_len and k_len else np.zeros(0, np.int64)
        buckets = relative_position_bucket(
            offsets, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        diagonal = np.arange(k_len)[None, :] - np.arange(q_len)[:, None] + (q_len - 1)
        return np.take(weights.T, buckets[diagonal], axis=1, out=out)
