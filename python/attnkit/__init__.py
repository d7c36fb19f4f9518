"""attnkit: the core of a transformer on the CPU, for NumPy.

Token ids become static embeddings (:func:`embedding`), gain position information (sinusoidal,
learned, rotary, ALiBi or relative encodings), and attention turns them into contextual
embeddings. Every function takes and returns NumPy arrays; the kernels are Rust and run on
attnkit's own thread pool (:func:`set_num_threads`).
"""

import os
import threading

from attnkit import _core
from attnkit._core import InternalError, __version__
from attnkit.attention import merge_attention, scaled_dot_product_attention
from attnkit.block import gelu, layer_norm, rms_norm, silu_mul
from attnkit.cache import KVCache
from attnkit.embedding import embedding, embedding_bag
from attnkit.layers import MultiheadAttention
from attnkit.linear import Bf16Linear, F32Linear
from attnkit.positional import (
    alibi_slopes,
    position_ids,
    relative_position_bias,
    relative_position_bucket,
    sinusoidal_positions,
)
from attnkit.rope import apply_rope, rope_cos_sin, rope_frequencies
from attnkit.threads import MAX_THREADS, _configure_from_env, _register_with_threadpoolctl, get_num_threads, set_num_threads

__all__ = [
    "MAX_THREADS",
    "Bf16Linear",
    "F32Linear",
    "InternalError",
    "KVCache",
    "MultiheadAttention",
    "__version__",
    "alibi_slopes",
    "apply_rope",
    "embedding",
    "embedding_bag",
    "gelu",
    "get_num_threads",
    "layer_norm",
    "merge_attention",
    "position_ids",
    "relative_position_bias",
    "relative_position_bucket",
    "rms_norm",
    "rope_cos_sin",
    "rope_frequencies",
    "scaled_dot_product_attention",
    "set_num_threads",
    "silu_mul",
    "sinusoidal_positions",
]

_configure_from_env()
# Kernels called from Python's main thread poll for signals (Ctrl-C stops a long call); after a
# fork, the forking thread is the child's main thread.
if threading.current_thread() is threading.main_thread():
    _core._set_main_thread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_core._set_main_thread)
_register_with_threadpoolctl()
del _configure_from_env, _register_with_threadpoolctl, _core, os, threading
