"""Input normalisation shared by the public functions.

Every public function turns its array arguments into C-contiguous, aligned, native-byte-order
arrays of an accepted dtype (one copy at most) before calling the compiled core, and raises the
error contract's exceptions, naming the argument, for anything else.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLOAT16 = np.dtype(np.float16)
EXPECTED_FLOATS = "float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16)"


def bfloat16() -> np.dtype[Any] | None:
    """``ml_dtypes.bfloat16`` as a dtype if ml_dtypes has been imported, else None.

    NumPy numbers the type when ml_dtypes registers it, so it is looked up, never hard-coded; and
    never imported here: an array of it cannot exist before ml_dtypes is imported.
    """
    module = sys.modules.get("ml_dtypes")
    return None if module is None else np.dtype(module.bfloat16)


def is_half(dtype: np.dtype[Any]) -> bool:
    """Whether ``dtype`` is one of the 16-bit floats attnkit reads (computing in float32), in
    either byte order."""
    native = dtype.newbyteorder("=")
    return native == FLOAT16 or (dtype.itemsize == 2 and native == bfloat16())


def compute_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype attnkit computes ``dtype`` in: float32 for the 16-bit floats, else itself."""
    return np.dtype(np.float32) if is_half(dtype) else dtype


def _float_dtype_of(dt: np.dtype[Any]) -> np.dtype[Any] | None:
    """The native-order accepted float dtype that ``dt`` holds, or None."""
    native = dt.newbyteorder("=")
    return native if native in FLOAT_DTYPES or is_half(native) else None


def _as_array(x: Any, name: str) -> np.ndarray[Any, Any]:
    if type(x) is np.ndarray:  # the common case, checked first: calls cost microseconds
        return x
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name}: numpy.ma.MaskedArray is not supported (its mask would be silently ignored); "
            "pass x.filled(value) or x.data explicitly"
        )
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a tensor (torch's API), without importing torch
        x = x.detach().cpu()
    try:
        with allocating(name):
            return np.asarray(x)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the object's conversion raises
        raise TypeError(f"{name}: cannot be converted to a numpy array: {type(exc).__name__}: {exc}") from None


@contextmanager
def allocating(what: str) -> Iterator[None]:
    """Names ``what`` (an output, or a copy of an argument) in NumPy's errors for arrays that
    cannot be allocated, which name nothing of the call: a ``MemoryError`` either way."""
    try:
        yield
    except MemoryError as exc:
        raise MemoryError(f"{what}: {exc}") from None
    except ValueError as exc:
        if "Maximum allowed" in str(exc) or "array is too big" in str(exc):
            raise MemoryError(f"{what}: cannot be allocated ({exc})") from None
        raise


def _contiguous(arr: np.ndarray[Any, Any], dtype: np.dtype[Any], name: str = "input") -> np.ndarray[Any, Any]:
    """``arr`` as ``dtype`` (native byte order), C-contiguous and aligned: a copy only if needed."""
    flags = arr.flags
    if arr.dtype == dtype and dtype.isnative and flags.c_contiguous and flags.aligned:
        return arr
    with allocating(f"{name} (a contiguous copy of shape {arr.shape})"):
        return np.require(arr, dtype.newbyteorder("="), ["C", "A"])


def _rows_in_place(arr: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> bool:
    """Whether the core can read ``arr`` as it lies: ``dtype`` in native byte order, aligned, its
    last axis contiguous and its other strides non-negative (a view into a bigger buffer)."""
    if arr.dtype != dtype or not dtype.isnative or not arr.flags.aligned:
        return False
    if arr.size == 0:
        return True  # nothing is read
    size = dtype.itemsize
    last = arr.ndim - 1
    return all(n <= 1 or (st >= 0 and st % size == 0 and (a < last or st == size))
               for a, (n, st) in enumerate(zip(arr.shape, arr.strides)))


def float_array(x: Any, name: str, *, half: bool = True, in_place: bool = False) -> npt.NDArray[Any]:
    """A float32, float64 or (with ``half``) float16 or bfloat16 array, any byte order or layout
    accepted: C-contiguous, or (``in_place``) as it lies where the core can read it so (see
    ``_rows_in_place``). Other small float types (float8 and the like) are refused by name."""
    arr = _as_array(x, name)
    dt = _float_dtype_of(arr.dtype)
    if dt is None or (not half and is_half(dt)):
        expected = EXPECTED_FLOATS if half else "float32 or float64"
        hint = ""
        if arr.dtype.itemsize <= 2 and arr.dtype.kind in "fV":
            hint = " (attnkit does not compute in this type: convert with .astype(numpy.float32))"
        raise TypeError(f"{name}: expected a {expected} array, got dtype {arr.dtype}{hint}")
    if in_place and _rows_in_place(arr, dt):
        return arr
    return _contiguous(arr, dt, name)


def out_array(out: Any, name: str = "out") -> np.ndarray[Any, Any] | None:
    """``out`` as given when it is None or a NumPy array (the core checks its dtype, shape, order,
    that it is writeable and that it overlaps no input), else a ``TypeError``."""
    if out is not None and not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array or None, got an object of type {type(out).__name__}")
    return out


def int_array(x: Any, name: str) -> npt.NDArray[np.integer[Any]]:
    """An array of any integer dtype (bool is refused)."""
    arr = _as_array(x, name)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: expected an integer array (int8 to int64 or uint8 to uint64), got dtype {arr.dtype}"
        )
    return _contiguous(arr, arr.dtype, name)


def positions_array(positions: Any, name: str = "positions") -> npt.NDArray[np.int64]:
    """Integer positions as int64; an int ``n`` means ``arange(n)``."""
    if isinstance(positions, numbers.Integral) and not isinstance(positions, (bool, np.bool_)):
        n = int(positions)
        if not 0 <= n <= 2**53:
            raise ValueError(f"{name}: a count of positions must be from 0 to 2**53 (where positions stay exact), got {n}")
        with allocating(f"{name} (arange({n}))"):
            return np.arange(n, dtype=np.int64)
    arr = int_array(positions, name)
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: {int(arr.max())} is beyond ±2**53, where positions stop being exact")
    return _contiguous(arr, np.dtype(np.int64), name)


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype[Any]:
    """numpy.float32, numpy.float64, numpy.float16 or ml_dtypes.bfloat16, as a dtype."""
    expected = "numpy.float32, numpy.float64, numpy.float16 or ml_dtypes.bfloat16"
    if isinstance(dtype, str) and dtype == "bfloat16" and bfloat16() is None:
        raise TypeError(f"{name}: bfloat16 is ml_dtypes.bfloat16: install ml_dtypes (pip install 'attnkit[bf16]') and pass it")
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected {expected}, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES and not is_half(dt):
        raise TypeError(f"{name}: expected {expected}, got {dt}")
    return dt


def flag(x: Any, name: str) -> bool:
    """A bool (or NumPy bool, or the int 0 or 1)."""
    if isinstance(x, (bool, np.bool_)) or (isinstance(x, numbers.Integral) and int(x) in (0, 1)):
        return bool(x)
    raise TypeError(f"{name}: expected a bool, got {type(x).__name__} {x!r}"[:200])


def integer(x: Any, name: str, *, minimum: int | None = None) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    value = int(x)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def real(x: Any, name: str, *, positive: bool = False) -> float:
    if type(x) is not float and (not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_))):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {value}")
    return value


def choice(x: Any, name: str, options: tuple[str, ...]) -> str:
    if x not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {x!r}")
    return str(x)


def counts(x: Any, name: str, shape: tuple[int, ...], most: int, what: str) -> npt.NDArray[np.int64]:
    """Per-item counts (lengths, starts) of ``shape``, each in ``0..most`` (``what``), as a flat
    int64 array."""
    n = int_array(_as_array(x, name), name)
    if n.shape != shape:
        raise ValueError(f"{name}: expected shape {shape} (one per batch item), got {n.shape}")
    if n.size and (n.min() < 0 or n.max() > most):
        bad = n.min() if n.min() < 0 else n.max()
        raise ValueError(f"{name}: each must lie in 0..{most} ({what}), got {bad}")
    return np.ascontiguousarray(n.reshape(-1), dtype=np.int64)
