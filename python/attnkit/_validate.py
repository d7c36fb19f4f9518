"""Input normalisation shared by the public functions.

Every public function turns its array arguments into C-contiguous, aligned, native-byte-order
arrays of an accepted dtype (one copy at most) before calling the compiled core, and raises the
error contract's exceptions, naming the argument, for anything else.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


def float_array(x: Any, name: str) -> npt.NDArray[np.floating[Any]]:
    """A float32 or float64 array (any byte order or layout accepted)."""
    arr = _as_array(x, name)
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
        raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {arr.dtype}")
    return _contiguous(arr, arr.dtype, name)


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
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected numpy.float32 or numpy.float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected numpy.float32 or numpy.float64, got {dt}")
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
    if not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    value = float(x)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {value}")
    return value


def choice(x: Any, name: str, options: tuple[str, ...]) -> str:
    if x not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {x!r}")
    return str(x)
