"""Linear layers on attnkit's own matrix product: the weight packed once for its tiles, the bias
and an optional GELU fused into the output.

:class:`F32Linear` holds ``weight`` (PyTorch's ``(out_features, in_features)``) as float32 and
computes ``x @ weight.T + bias`` for float32 ``x``: the input dimensions in blocks of 64, each
block summed in a float32 accumulator of its own by fused multiply-adds (one rounding each) and
added in order to the output's total, then the bias added. Blocks keep long sums accurate (with
k = 4096 terms of one sign: 4e-7 relative against one running sum's 2.3e-6). Its vector tiles
(AVX-512, or AVX2 with FMA) run near the CPU's FMA rate, about as fast as NumPy's BLAS and
PyTorch on the shapes measured, and a call with a few rows (decoding) reads the weight as one
stream per strip of sixteen columns, at the memory's streaming rate. A row's outputs are the same
bits whatever the other rows of the call, the thread count and the code path; CPUs without AVX2
and FMA compute them in portable code, far slower (see :meth:`F32Linear.native`).

:class:`Bf16Linear` holds ``weight`` rounded once to bfloat16 and computes ``x @ weight.T + bias``
for float32 or bfloat16 ``x`` in the arithmetic of the ``vdpbf16ps`` instruction: ``x`` rounded to
bfloat16 (to nearest even), the products of pairs of bfloat16 values summed in one float32
accumulator per output, the input dimensions in order, then the float32 bias added and the result
rounded once to ``x``'s dtype. It runs at twice the float32 rate on CPUs with AVX512_BF16. CPUs
without the instruction compute the same steps in portable code, so every machine and thread count
gives the same bits; but that emulation is about ten times slower than NumPy's float32 product
(with AVX2; far slower without), so use float32 there. Use it where the weights' bytes or the
matrix products bound the time and 16-bit inputs are accurate enough: bfloat16 keeps 8
significant bits, so each product carries a relative error of up to 2^-8 per operand (a dot
product of random signs: about 2e-3 of its scale).

Both fuse ``activation="gelu"``: the erf form of GELU, ``v · Φ(v)``, applied to each float32
``v = acc + bias`` before the rounding to the output's dtype, computed in float32 (within 1e-6
relative of the exact value wherever that is a normal float32, within 2^-126 absolute below; NaN
for NaN and −inf, as PyTorch), so the product's output makes one trip through memory.
:func:`attnkit.gelu` is the correctly rounded one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import _contiguous, bfloat16, choice, float_array, out_array

__all__ = ["Bf16Linear", "F32Linear"]

#: The layout of the packed weights (see ``src/kernels/linear.rs``); pickles carry it.
_LAYOUT = 1


class _PackedLinear:
    """What both layers share: the checked weight's shape, the bias, the packed weight."""

    _packed: npt.NDArray[Any]

    def __init__(self, weight: npt.ArrayLike, bias: npt.ArrayLike | None = None) -> None:
        w = float_array(weight, "weight")
        if w.ndim != 2:
            raise ValueError(f"weight: expected 2 dimensions (out_features, in_features), got shape {w.shape}")
        self.out_features, self.in_features = (int(d) for d in w.shape)
        self._packed = self._pack(w)
        self._layout = _LAYOUT
        self.bias: npt.NDArray[np.float32] | None = None
        if bias is not None:
            b = float_array(bias, "bias")
            if b.shape != (self.out_features,):
                raise ValueError(f"bias: expected shape ({self.out_features},) (out_features), got {b.shape}")
            self.bias = np.ascontiguousarray(b.astype(np.float32))

    @staticmethod
    def _pack(w: npt.NDArray[Any]) -> npt.NDArray[Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("_layout", 1) != _LAYOUT:  # layers pickled before the field: layout 1
            raise ValueError(f"{type(self).__name__}: this pickle's packed weight has layout "
                             f"{state.get('_layout')!r}, this attnkit reads layout {_LAYOUT}; "
                             "build the layer again from its weight")
        self.__dict__.update(state)

    def _words(self, depth: int) -> npt.NDArray[Any]:
        """The packed words as ``(out_features, depth)``: row ``j`` the words of output ``j``."""
        n = self.out_features
        return self._packed.reshape(-1, depth, 16).transpose(0, 2, 1).reshape(-1, depth)[:n]

    @staticmethod
    def _activation(activation: str | None) -> str:
        return "none" if activation is None else choice(activation, "activation", ("gelu",))

    def _check_x(self, arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if arr.ndim == 0 or arr.shape[-1] != self.in_features:
            raise ValueError(f"x: expected a last axis of {self.in_features} (in_features), got shape {arr.shape}")
        return _contiguous(arr, arr.dtype, "x")


class F32Linear(_PackedLinear):
    """``x @ weight.T + bias`` with ``weight`` held as float32 (see the module notes).

    ``weight``: ``(out_features, in_features)``, any float dtype, rounded once to float32.
    ``bias``: ``(out_features,)`` or None, any float dtype, held as float32.

    Calling it on float32 ``x`` of shape ``(..., in_features)`` returns float32
    ``(..., out_features)``. The layer pickles (its packed weight is a NumPy array).

    Example:
        >>> import numpy as np, attnkit
        >>> layer = attnkit.F32Linear(np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]]), np.array([0.0, 1.0, -1.0]))
        >>> layer(np.array([[1.0, 0.5]], np.float32))
        array([[2.  , 1.  , 2.05]], dtype=float32)
        >>> layer(np.array([[1.0, 0.5]], np.float32), activation="gelu")
        array([[1.9544997, 0.8413447, 2.0086265]], dtype=float32)
    """

    @staticmethod
    def _pack(w: npt.NDArray[Any]) -> npt.NDArray[Any]:
        packed: npt.NDArray[np.float32] = _core.pack_f32(w)
        return packed

    @staticmethod
    def native() -> bool:
        """Whether this CPU runs the vector tiles (AVX-512, or AVX2 with FMA), at about the speed
        of NumPy's BLAS or above; else portable code computes the same bits, far slower (measured
        without SIMD at (736, 384) -> 1536: 1.37 s against NumPy's 8.7 ms), so use NumPy there.

        Example:
            >>> import attnkit
            >>> isinstance(attnkit.F32Linear.native(), bool)
            True
        """
        return bool(_core._simd_accelerated())

    @property
    def weight(self) -> npt.NDArray[np.float32]:
        """The held weight, ``(out_features, in_features)``, float32."""
        n, k = self.out_features, self.in_features
        if n == 0 or k == 0:
            return np.zeros((n, k), np.float32)
        return np.ascontiguousarray(self._words(k))

    def __call__(self, x: npt.ArrayLike, *, activation: str | None = None,
                 out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
        """``activation(x @ weight.T + bias)``, float32; ``activation``: None or ``"gelu"`` (see
        the module notes). ``out``: a C-contiguous float32 array of shape ``x.shape[:-1] +
        (out_features,)`` sharing no memory with ``x``, written and returned instead of a new
        array (a buffer reused across calls saves the page faults of fresh memory)."""
        act = self._activation(activation)
        arr = float_array(x, "x")
        if arr.dtype != np.float32:
            raise TypeError(f"x: expected a float32 array, got dtype {arr.dtype} (convert it with .astype(np.float32))")
        y: npt.NDArray[np.float32] = _core.linear_f32(self._check_x(arr), self._packed, self.bias,
                                                      self.out_features, self.in_features, act, out_array(out))
        return y


class Bf16Linear(_PackedLinear):
    """``x @ weight.T + bias`` with ``weight`` held as bfloat16 (see the module notes).

    ``weight``: ``(out_features, in_features)``, any float dtype, rounded once to bfloat16.
    ``bias``: ``(out_features,)`` or None, any float dtype, held as float32.

    Calling it on ``x`` of shape ``(..., in_features)``, float32 or bfloat16, returns
    ``(..., out_features)`` in ``x``'s dtype. The layer pickles (its packed weight is a NumPy
    array).

    Example:
        >>> import numpy as np, attnkit
        >>> layer = attnkit.Bf16Linear(np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.1]]), np.array([0.0, 1.0, -1.0]))
        >>> layer.weight[2]  # 0.1 held as bfloat16
        array([3.        , 0.10009766], dtype=float32)
        >>> layer(np.array([[1.0, 0.5]], np.float32))
        array([[2.       , 1.       , 2.0500488]], dtype=float32)
        >>> layer(np.array([[1.0, 0.5]], np.float32), activation="gelu")
        array([[1.9544997, 0.8413447, 2.0086792]], dtype=float32)
    """

    @staticmethod
    def _pack(w: npt.NDArray[Any]) -> npt.NDArray[Any]:
        packed: npt.NDArray[np.uint32] = _core.pack_bf16(w)
        return packed

    @staticmethod
    def native() -> bool:
        """Whether this CPU runs the ``vdpbf16ps`` tiles (AVX512_BF16); else the products run in
        the portable emulation: the same bits, about ten times slower than NumPy's float32
        product.

        Example:
            >>> import attnkit
            >>> isinstance(attnkit.Bf16Linear.native(), bool)
            True
        """
        return bool(_core._simd_bf16())

    @property
    def weight(self) -> npt.NDArray[np.float32]:
        """The held weight, ``(out_features, in_features)``, as float32 (exactly its bfloat16 values)."""
        n, k = self.out_features, self.in_features
        pairs = (k + 1) // 2
        if n == 0 or pairs == 0:
            return np.zeros((n, k), np.float32)
        words = self._words(pairs)
        halves = np.stack([words << 16, words & 0xFFFF0000], axis=-1).reshape(n, 2 * pairs)[:, :k]
        return np.ascontiguousarray(halves).view(np.float32)

    def __call__(self, x: npt.ArrayLike, *, activation: str | None = None,
                 out_dtype: npt.DTypeLike | None = None, out: npt.NDArray[Any] | None = None) -> npt.NDArray[Any]:
        """``activation(x @ weight.T + bias)`` in ``out_dtype`` (float32 or bfloat16; None:
        ``out``'s dtype when given, else ``x``'s); ``activation``: None or ``"gelu"`` (see the
        module notes). ``out``: a C-contiguous array of that dtype and of shape ``x.shape[:-1] +
        (out_features,)`` sharing no memory with ``x``, written and returned instead of a new
        array."""
        act = self._activation(activation)
        out = out_array(out)
        bf16 = bfloat16()
        dtype = None
        # out_dtype, else out's dtype: the core checks that out has the dtype chosen.
        name, given = ("out_dtype", out_dtype) if out_dtype is not None or out is None else ("out", out.dtype)
        if given is not None:
            try:
                d = np.dtype(given)
            except TypeError:
                d = None
            if d == np.float32:
                dtype = "float32"
            elif bf16 is not None and d == bf16:
                dtype = "bfloat16"
            else:
                raise TypeError(f"{name}: expected float32 or bfloat16 (ml_dtypes), got {given!r}")
        arr = float_array(x, "x")
        if arr.dtype != np.float32 and (bf16 is None or arr.dtype != bf16):
            raise TypeError(f"x: expected a float32 or bfloat16 array, got dtype {arr.dtype}")
        y: npt.NDArray[Any] = _core.linear_bf16(self._check_x(arr), self._packed, self.bias, self.out_features,
                                                self.in_features, act, dtype, out)
        return y
