# Stub of the compiled module. The public, documented API is in the Python modules; these are the
# private kernels they call, which re-validate everything themselves.
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
MAX_THREADS: int

class InternalError(RuntimeError): ...

def set_num_threads(n: object) -> None: ...
def get_num_threads() -> int: ...
def _set_simd_enabled(enabled: bool, avx512: bool = True) -> None: ...
def _simd_accelerated() -> bool: ...
def _simd_avx512() -> bool: ...
def _simd_bf16() -> bool: ...
def _peak_gflops(bf16: bool = False) -> float | None: ...
def _set_main_thread() -> None: ...
def embedding(ids: npt.NDArray[Any], weight: npt.NDArray[Any], scale: float | None = None) -> npt.NDArray[Any]: ...
def embedding_bag(
    ids: npt.NDArray[Any],
    weight: npt.NDArray[Any],
    bounds: npt.NDArray[np.int64],
    mode: str,
    per_sample_weights: npt.NDArray[np.float64] | None = None,
    padding_idx: int | None = None,
) -> npt.NDArray[Any]: ...
def sinusoidal(
    positions: npt.NDArray[np.int64], inv_freq: npt.NDArray[np.float64], layout: str, dtype: str
) -> npt.NDArray[Any]: ...
def rope_cos_sin(
    positions: npt.NDArray[np.int64], inv_freq: npt.NDArray[np.float64], attention_factor: float, dtype: str
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
def apply_rope(
    x: npt.NDArray[Any], cos: npt.NDArray[Any], sin: npt.NDArray[Any], style: str, layout: str
) -> npt.NDArray[Any]: ...
def norm(
    x: npt.NDArray[Any],
    residual: npt.NDArray[Any] | None,
    weight: npt.NDArray[np.float64] | None,
    bias: npt.NDArray[np.float64] | None,
    n: int,
    eps: float,
    kind: str,
    out: npt.NDArray[Any] | tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None] | None = None,
) -> Any: ...
def gelu(x: npt.NDArray[Any], approximate: str) -> npt.NDArray[Any]: ...
def silu_mul(gate: npt.NDArray[Any], up: npt.NDArray[Any]) -> npt.NDArray[Any]: ...
def pack_bf16(weight: npt.NDArray[Any]) -> npt.NDArray[np.uint32]: ...
def linear_bf16(
    x: npt.NDArray[Any],
    packed: npt.NDArray[np.uint32],
    bias: npt.NDArray[np.float32] | None,
    n: int,
    k: int,
    activation: str = "none",
    out_dtype: str | None = None,
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]: ...
def pack_f32(weight: npt.NDArray[Any]) -> npt.NDArray[np.float32]: ...
def linear_f32(
    x: npt.NDArray[np.float32],
    packed: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    n: int,
    k: int,
    activation: str = "none",
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def attention(
    query: npt.NDArray[Any],
    key: npt.NDArray[Any],
    value: npt.NDArray[Any],
    layout: str,
    scale: float,
    softcap: float | None,
    causal: bool,
    window: tuple[int | None, int | None],
    alignment: str,
    bool_mask: npt.NDArray[np.uint8] | None = None,
    float_mask: npt.NDArray[Any] | None = None,
    key_mask: npt.NDArray[np.uint8] | None = None,
    alibi: npt.NDArray[np.float64] | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    key_lengths: npt.NDArray[np.int64] | None = None,
    query_lengths: npt.NDArray[np.int64] | None = None,
    sinks: npt.NDArray[np.float64] | None = None,
    return_scores: bool = False,
    key_starts: npt.NDArray[np.int64] | None = None,
    key_strips: bool = False,
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None, npt.NDArray[Any] | None, npt.NDArray[Any] | None]: ...
def merge_attention(outs: npt.NDArray[Any], lses: npt.NDArray[Any]) -> npt.NDArray[Any]: ...
