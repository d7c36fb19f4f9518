"""The rest of a transformer block around attention: layer norm, RMS norm, GELU and the SiLU-gated
product of SwiGLU, with PyTorch's names and meanings.

Each kernel computes in float64 whatever the array's dtype and rounds every output once, so a
float32 or 16-bit result is the correctly rounded value of the formula (but for float64's own few
ulp of error next to a rounding boundary), and the same bits for any thread count. A BERT layer's
tail and a LLaMA layer's MLP read::

    h = attnkit.layer_norm(attn_out @ wo + bo, 384, g1, b1, eps=1e-12, residual=x)[0]   # post-norm
    h = attnkit.layer_norm(attnkit.gelu(h @ wi + bi) @ wf + bf, 384, g2, b2, residual=h)[0]

    y, x = attnkit.rms_norm(attn_out @ wo, 576, g, eps=1e-5, residual=x)                 # pre-norm
    x = x + attnkit.silu_mul(y @ w_gate, y @ w_up) @ w_down
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import choice, float_array, out_array, real

__all__ = ["gelu", "layer_norm", "rms_norm", "silu_mul"]


def _normalized_size(x: npt.NDArray[Any], normalized_shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    """``normalized_shape`` as a tuple that must end ``x``'s shape, and its number of elements."""
    if type(normalized_shape) is int:  # the common case, checked first: a layer calls this per token
        shape: tuple[int, ...] = (normalized_shape,)
    elif isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape = (int(normalized_shape),)
    elif isinstance(normalized_shape, Sequence) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(f"normalized_shape: expected an int or a sequence of ints, got {normalized_shape!r}")
    if not shape or x.shape[x.ndim - len(shape):] != shape or len(shape) > x.ndim:
        raise ValueError(
            f"normalized_shape: expected the last axes of x's shape {x.shape} (at least one), got {shape}"
        )
    n = math.prod(shape)
    if n == 0:
        raise ValueError(f"normalized_shape: {shape} has no elements to normalize")
    return shape, n


def _param(p: npt.ArrayLike | None, name: str, shape: tuple[int, ...]) -> npt.NDArray[np.float64] | None:
    """A weight or bias of ``shape``, any float dtype, widened (exactly) to float64."""
    if p is None:
        return None
    arr = float_array(p, name)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (normalized_shape), got {arr.shape}")
    return np.ascontiguousarray(arr.astype(np.float64))


def _norm_out(out: Any, residual: npt.NDArray[Any] | None) -> Any:
    """``out`` for the core: None, an array, or (with a residual) a pair of arrays or Nones (the
    core checks that a tuple holds two)."""
    if residual is not None and isinstance(out, tuple):
        return tuple(out_array(o, f"out[{i}]") for i, o in enumerate(out))
    return out_array(out)


def _residual(x: npt.NDArray[Any], residual: npt.ArrayLike | None) -> npt.NDArray[Any] | None:
    if residual is None:
        return None
    r = float_array(residual, "residual")
    if r.dtype != x.dtype:
        raise TypeError(f"residual: expected dtype {x.dtype} (that of x), got {r.dtype}")
    if r.shape != x.shape:
        raise ValueError(f"residual: expected shape {x.shape} (that of x), got {r.shape}")
    return r


@overload
def layer_norm(
    x: npt.ArrayLike, normalized_shape: int | Sequence[int], weight: npt.ArrayLike | None = ...,
    bias: npt.ArrayLike | None = ..., eps: float = ..., *, residual: None = ...,
    out: npt.NDArray[Any] | None = ...,
) -> npt.NDArray[Any]: ...
@overload
def layer_norm(
    x: npt.ArrayLike, normalized_shape: int | Sequence[int], weight: npt.ArrayLike | None = ...,
    bias: npt.ArrayLike | None = ..., eps: float = ..., *, residual: npt.ArrayLike,
    out: npt.NDArray[Any] | tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None = ...,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
def layer_norm(
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: npt.ArrayLike | None = None,
    bias: npt.ArrayLike | None = None,
    eps: float = 1e-5,
    *,
    residual: npt.ArrayLike | None = None,
    out: npt.NDArray[Any] | tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None = None,
) -> npt.NDArray[Any] | tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Layer normalization over the last axes, as ``torch.nn.functional.layer_norm``.

    ``y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias`` over the trailing
    ``normalized_shape`` axes, with the biased variance (two passes, in float64), ``h = x``.

    With ``residual``, ``h = x + residual`` (rounded to ``x``'s dtype, the bits NumPy's ``x +
    residual`` gives) and the call returns ``(y, h)``: the add of a residual block fused with the
    norm that follows it (BERT's post-norm; the pre-norm of the next block).

    Args:
        x: float32, float64, float16 or ``ml_dtypes.bfloat16``, any shape ending in
            ``normalized_shape``.
        normalized_shape: an int or a tuple of ints, the trailing axes normalized together.
        weight, bias: arrays of ``normalized_shape``, any float dtype (used exactly), or None (1
            and 0).
        eps: added to the variance, ``>= 0``.
        residual: an array of ``x``'s shape and dtype, or None.
        out: a C-contiguous array of ``x``'s shape and dtype sharing no memory with the inputs,
            or None: ``y`` is written into it and it is returned in ``y``'s place. With
            ``residual``, also a pair ``(y_out, h_out)`` of such arrays (or Nones, for new ones)
            for both results. A buffer reused across calls saves the page faults of fresh memory.

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, h)`` with ``residual``.

    Raises:
        TypeError: non-float arrays; a residual or ``out`` of another dtype.
        ValueError: ``normalized_shape`` not the end of ``x.shape``; parameters of another shape;
            a negative or NaN ``eps``; ``out`` of another shape, not C-contiguous, read-only or
            sharing memory with an input or the other output.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.layer_norm(np.array([[1.0, 2.0, 3.0]], np.float32), 3)
        array([[-1.2247357,  0.       ,  1.2247357]], dtype=float32)
    """
    xa = float_array(x, "x")
    shape, n = _normalized_size(xa, normalized_shape)
    r = _residual(xa, residual)
    w, b = _param(weight, "weight", shape), _param(bias, "bias", shape)
    return _core.norm(xa, r, w, b, n, _eps(eps), "layer", _norm_out(out, r))  # type: ignore[no-any-return]


@overload
def rms_norm(
    x: npt.ArrayLike, normalized_shape: int | Sequence[int], weight: npt.ArrayLike | None = ...,
    eps: float | None = ..., *, residual: None = ..., out: npt.NDArray[Any] | None = ...,
) -> npt.NDArray[Any]: ...
@overload
def rms_norm(
    x: npt.ArrayLike, normalized_shape: int | Sequence[int], weight: npt.ArrayLike | None = ...,
    eps: float | None = ..., *, residual: npt.ArrayLike,
    out: npt.NDArray[Any] | tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None = ...,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
def rms_norm(
    x: npt.ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: npt.ArrayLike | None = None,
    eps: float | None = None,
    *,
    residual: npt.ArrayLike | None = None,
    out: npt.NDArray[Any] | tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None = None,
) -> npt.NDArray[Any] | tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Root-mean-square normalization over the last axes, as ``torch.nn.functional.rms_norm``.

    ``y = h / sqrt(mean(h**2) + eps) * weight`` (LLaMA's ``RMSNorm``), ``h = x``; with
    ``residual``, ``h = x + residual`` rounded to ``x``'s dtype and the call returns ``(y, h)``
    (the residual add of a pre-norm block fused with the next block's norm).

    Args:
        x: float32, float64, float16 or ``ml_dtypes.bfloat16``, any shape ending in
            ``normalized_shape``.
        normalized_shape: an int or a tuple of ints.
        weight: an array of ``normalized_shape``, any float dtype, or None (1).
        eps: added to the mean square, ``>= 0``; None (as in PyTorch) is ``numpy.finfo(x.dtype).eps``.
            LLaMA checkpoints give theirs (``rms_norm_eps``, 1e-5 or 1e-6): pass it.
        residual: an array of ``x``'s shape and dtype, or None.
        out: as :func:`layer_norm`'s.

    Returns:
        ``y`` of ``x``'s shape and dtype, or ``(y, h)`` with ``residual``.

    Raises:
        TypeError, ValueError: as :func:`layer_norm`.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.rms_norm(np.array([[3.0, 4.0]], np.float32), 2, eps=0.0)
        array([[0.84852815, 1.1313709 ]], dtype=float32)
    """
    xa = float_array(x, "x")
    shape, n = _normalized_size(xa, normalized_shape)
    r = _residual(xa, residual)
    w = _param(weight, "weight", shape)
    e = float(np.finfo(xa.dtype).eps) if eps is None else _eps(eps)
    return _core.norm(xa, r, w, None, n, e, "rms", _norm_out(out, r))  # type: ignore[no-any-return]


def _eps(eps: Any) -> float:
    e = real(eps, "eps")
    if not e >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    return e


def gelu(x: npt.ArrayLike, approximate: Literal["none", "tanh"] = "none") -> npt.NDArray[Any]:
    """The Gaussian error linear unit, as ``torch.nn.functional.gelu``.

    ``approximate="none"``: ``x * Φ(x)`` with ``Φ(x) = (1 + erf(x / sqrt(2))) / 2`` (BERT,
    ``hidden_act="gelu"``); ``"tanh"``: ``x/2 * (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`` (GPT-2,
    ``"gelu_new"``, ``"gelu_pytorch_tanh"``). Computed in float64 (``erf`` within 1e-15 relative,
    ``tanh`` through ``exp``) and rounded once; NaN at ``x = -inf``, as the formula (and PyTorch)
    gives.

    Args:
        x: float32, float64, float16 or ``ml_dtypes.bfloat16``, any shape.
        approximate: ``"none"`` or ``"tanh"``.

    Returns:
        A new array of ``x``'s shape and dtype.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.gelu(np.array([-1.0, 0.0, 1.0]))
        array([-0.15865525,  0.        ,  0.84134475])
    """
    approximate = choice(approximate, "approximate", ("none", "tanh"))  # type: ignore[assignment]
    return _core.gelu(float_array(x, "x"), approximate)


def silu_mul(gate: npt.ArrayLike, up: npt.ArrayLike) -> npt.NDArray[Any]:
    """``silu(gate) * up`` elementwise, the gated unit of SwiGLU (LLaMA's MLP:
    ``down(silu(gate(x)) * up(x))``), with ``silu(g) = g / (1 + exp(-g))``.

    Computed in float64 and rounded once (PyTorch rounds ``silu(gate)`` first, so it can differ in
    the last bit).

    Args:
        gate, up: arrays of one shape and one float dtype (float32, float64, float16 or
            ``ml_dtypes.bfloat16``).

    Returns:
        A new array of their shape and dtype.

    Raises:
        TypeError: non-float arrays, or two dtypes.
        ValueError: two shapes.

    Example:
        >>> import numpy as np, attnkit
        >>> attnkit.silu_mul(np.array([1.0, -1.0]), np.array([2.0, 2.0]))
        array([ 1.46211716, -0.53788284])
    """
    g, u = float_array(gate, "gate"), float_array(up, "up")
    if g.dtype != u.dtype:
        raise TypeError(f"up: expected dtype {g.dtype} (that of gate), got {u.dtype}")
    if g.shape != u.shape:
        raise ValueError(f"up: expected shape {g.shape} (that of gate), got {u.shape}")
    return _core.silu_mul(g, u)
