"""Reading checkpoint files, with errors that name the file and the key at fault."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import attnkit

F32 = npt.NDArray[np.float32]

# The dtypes a model's matrix products can run in (``load``'s ``dtype``).
DTYPES = ("float32", "bfloat16")


class LoadError(ValueError):
    """A checkpoint that cannot be loaded: a missing file, an unknown architecture, or a tensor or
    setting that does not match the config. The message names the file and the key."""


def extra(module: str) -> Any:
    """Imports one of the ``models`` extra's packages, or says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"attnkit.models needs {module.split('.')[0]}: pip install 'attnkit[models]'"
        ) from e


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LoadError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, (dict, list)):
        raise LoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data  # type: ignore[return-value]


def setting(config: dict[str, Any], key: str, path: Path, kind: type, default: Any = None) -> Any:
    """``config[key]`` checked to be a ``kind`` (a positive number for ints), or ``default``."""
    if key not in config or config[key] is None:
        if default is None:
            raise LoadError(f"{path}: {key} is missing")
        return default
    value = config[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (kind is int and value <= 0):
        raise LoadError(f"{path}: {key} must be a {'positive int' if kind is int else kind.__name__}, got {value!r}")
    return value


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    if not path.is_file():
        raise LoadError(f"{path}: missing")
    numpy_io = extra("safetensors.numpy")
    try:
        return dict(numpy_io.load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from e


def tensor(weights: dict[str, npt.NDArray[Any]], key: str, shape: tuple[int, ...], path: Path) -> npt.NDArray[np.float32]:
    """``weights[key]`` as float32, checked to have ``shape``."""
    if key not in weights:
        raise LoadError(f"{path}: tensor {key} is missing")
    arr = weights[key]
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise LoadError(f"{path}: tensor {key} has dtype {arr.dtype}, expected a float dtype")
    if arr.shape != shape:
        raise LoadError(f"{path}: tensor {key} has shape {arr.shape}, expected {shape} from the config")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``."""
    tokenizers = extra("tokenizers")
    if not path.is_file():
        raise LoadError(f"{path}: missing")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise LoadError(f"{path}: not a readable tokenizer ({e})") from e


class PicklesTokenizer:
    """Pickling for a model that holds a ``tokenizers.Tokenizer`` as ``self.tokenizer``: the
    tokenizer travels as its JSON; the weights as arrays."""

    tokenizer: Any

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tokenizer": self.tokenizer.to_str()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokenizers = extra("tokenizers")
        self.__dict__.update({**state, "tokenizer": tokenizers.Tokenizer.from_str(state["tokenizer"])})


class _NumpyLinear:
    """``x @ weight.T + bias`` by NumPy's BLAS, called as :class:`attnkit.F32Linear` is: where its
    vector tiles do not run. ``activation="gelu"`` is :func:`attnkit.gelu` of the product."""

    def __init__(self, weight: F32, bias: F32 | None) -> None:
        self._wt, self._bias = np.ascontiguousarray(weight.T), bias

    def __call__(self, x: F32, *, activation: str | None = None, out: F32 | None = None) -> F32:
        y: F32 = np.matmul(x, self._wt, out=out)
        if self._bias is not None:
            y += self._bias
        return y if activation is None else attnkit.gelu(y)


class Projection:
    """``x @ weight.T + bias`` of a checkpoint's ``(out, in)`` matrix, in the model's dtype:
    ``"float32"`` (:class:`attnkit.F32Linear`, attnkit's own product, on CPUs where its vector
    tiles run; NumPy's BLAS elsewhere) or ``"bfloat16"`` (:class:`attnkit.Bf16Linear`: the weight
    held in bfloat16, the inputs rounded to it, float32 sums). Float32 in and out either way; the
    weight is held apart from the checkpoint's array (a tied output matrix is held twice)."""

    def __init__(self, weight: F32, bias: F32 | None = None, *, dtype: str = "float32") -> None:
        self.dtype = dtype
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self._layer: attnkit.F32Linear | attnkit.Bf16Linear | _NumpyLinear
        if dtype == "bfloat16":
            self._layer = attnkit.Bf16Linear(weight, bias)
        elif attnkit.F32Linear.native():
            self._layer = attnkit.F32Linear(weight, bias)
        else:
            self._layer = _NumpyLinear(weight, bias)

    def __call__(self, x: F32, *, gelu: Literal["none", "tanh"] | None = None, out: F32 | None = None) -> F32:
        """The product, then (``gelu``) :func:`attnkit.gelu` of that form; attnkit's products fuse
        the erf form (``"none"``) into their epilogue (float32 arithmetic, within 1e-6 relative:
        see :mod:`attnkit.linear`), as PyTorch's CPU kernels compute it in float32. The product is
        written into ``out`` when given (a float32 buffer of its shape, as the layers take); the
        tanh form's GELU is a new array."""
        fused = gelu == "none"
        y: F32 = self._layer(x, activation="gelu" if fused else None, out=out)
        return attnkit.gelu(y, gelu) if gelu is not None and not fused else y
