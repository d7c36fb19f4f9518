"""LLaMA-family GGUF files (llama.cpp's format): the architecture and the tokenizer from the
metadata, the tensors dequantized to float32 at load by the ``gguf`` package.

llama.cpp stores the query and key projections with each head's rows in its own RoPE order
(channel pairs interleaved: ``convert_hf_to_gguf.py``'s ``permute``). The decoder computes with
them as they are and rotates interleaved pairs (``apply_rope(style="interleaved")``); queries and
keys carry the same permutation of channels, which their dot products do not see.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from attnkit.models._files import F32, LoadError, extra
from attnkit.models._llama import GGUF_NAMES, LlamaConfig, LlamaDecoder, read_weights

# GGUF token types (llama.cpp's llama_token_type): control tokens are the special ones.
_CONTROL = 3
# The gguf package dequantizes a tensor 16 rows at a time, and on short rows its overhead per group
# costs more than the arithmetic. Blocks never straddle rows, so the loader hands it runs of this many
# whole rows as one row each: SmolLM2's file (576-wide rows) took 1.15 s in groups of 16 rows, 0.47 s
# in groups of 256.
_ROWS_JOINED = 16


def _reader(gguf: Any, path: Path) -> Any:
    """A ``gguf.GGUFReader`` that parses through a plain ndarray view of its memmap.

    The reader slices its buffer once per metadata value, and a memmap's slicing goes through
    Python-level ``__getitem__``/``__array_finalize__``: SmolLM2's 49,152 tokens and 48,900 merges
    took 2.4-2.8 s to parse, 0.8-0.9 s through the plain view. The view keeps the mapping alive.
    """

    class PlainReader(gguf.GGUFReader):  # type: ignore[misc]
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = np.asarray(value)  # the reader assigns a memmap: a plain view of it

    return PlainReader(str(path))


def load_gguf(path: Path, dtype: str = "float32") -> LlamaDecoder:
    gguf = extra("gguf")
    try:
        reader = _reader(gguf, path)
    except Exception as e:  # the reader raises ValueError or struct errors on a damaged file
        raise LoadError(f"{path}: not a readable GGUF file ({e})") from e

    def field(key: str, default: Any = None) -> Any:
        f = reader.get_field(key)
        if f is None:
            if default is None:
                raise LoadError(f"{path}: metadata {key} is missing")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise LoadError(f"{path}: general.architecture {arch!r} is not one attnkit.models loads ('llama')")

    def number(key: str, default: Any = None) -> Any:
        value = field(f"llama.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise LoadError(f"{path}: metadata llama.{key} must be a positive number, got {value!r}")
        return value

    hidden, heads = int(number("embedding_length")), int(number("attention.head_count"))
    kv_heads = int(number("attention.head_count_kv", heads))
    if heads % kv_heads or hidden % heads:
        raise LoadError(f"{path}: llama.attention.head_count {heads} does not fit embedding_length {hidden} "
                        f"and head_count_kv {kv_heads}")
    head_dim = hidden // heads
    rot = int(number("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise LoadError(f"{path}: llama.rope.dimension_count {rot}: partial rotary is not supported")
    tensors = {t.name: t for t in reader.tensors}
    tokens = field("tokenizer.ggml.tokens")
    eos = field("tokenizer.ggml.eos_token_id", -1)
    config = LlamaConfig(
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        layers=int(number("block_count")),
        intermediate=int(number("feed_forward_length")),
        vocab=len(tokens),
        eps=float(number("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(number("rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_positions=int(number("context_length", 2048)),
        rope_style="interleaved",
        eos_ids=() if eos < 0 else (int(eos),),
    )
    def get(name: str, *shape: int) -> F32:
        t = tensors.get(name)
        if t is None:
            raise LoadError(f"{path}: tensor {name} is missing")
        # GGUF lists dimensions fastest first: a (rows, columns) matrix is [columns, rows].
        if tuple(int(d) for d in t.shape[::-1]) != shape:
            raise LoadError(f"{path}: tensor {name} has shape {tuple(int(d) for d in t.shape[::-1])}, "
                            f"expected {shape} from the metadata")
        try:
            rows = math.prod(t.data.shape[:-1])
            joined = t.data.reshape(rows // math.gcd(rows, _ROWS_JOINED), -1)
            values = gguf.quants.dequantize(joined, t.tensor_type)
        except NotImplementedError as e:
            raise LoadError(f"{path}: tensor {name}: type {t.tensor_type.name} cannot be dequantized ({e})") from e
        return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)

    weights = read_weights(config, get, GGUF_NAMES, tied="output.weight" not in tensors, dtype=dtype)
    return LlamaDecoder(config, weights, _tokenizer(path, field, tokens))


def _tokenizer(path: Path, field: Any, tokens: list[str]) -> Any:
    """The byte-level BPE tokenizer of the metadata (``tokenizer.ggml.model`` ``"gpt2"``)."""
    tk = extra("tokenizers")
    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise LoadError(f"{path}: tokenizer.ggml.model {model!r}: only byte-level BPE ('gpt2') is supported")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = field("tokenizer.ggml.pre", "default")
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp splits digits one by one, then applies the GPT-2 pattern (llama-vocab.cpp);
        # SmolLM2's own tokenizer.json says the same (Digits, then ByteLevel).
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([tk.pre_tokenizers.Digits(individual_digits=True),
                                                              byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise LoadError(f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer attnkit.models knows")
    tokenizer.decoder = tk.decoders.ByteLevel()
    types = field("tokenizer.ggml.token_type", [])
    special = [tk.AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    tokenizer.add_special_tokens(special)
    return tokenizer
