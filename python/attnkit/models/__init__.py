"""Real checkpoints through attnkit, with NumPy and attnkit's public API only: sentence embeddings
from BERT-family encoders, logits and text from LLaMA-family decoders.

    from attnkit import models
    encoder = models.load("path/to/all-MiniLM-L6-v2")     # a folder: safetensors + configs
    vectors = encoder.encode(["A man is eating food.", "A man is riding a horse."])
    decoder = models.load("path/to/a-llama-folder")
    text = decoder.generate("The capital of France is", max_new_tokens=10)

Needs the ``models`` extra (``pip install 'attnkit[models]'``: tokenizers, safetensors, gguf);
the rest of attnkit never imports this package.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import attnkit
from attnkit.models._bert import BertEncoder
from attnkit.models._files import DTYPES, LoadError, read_json
from attnkit.models._llama import LlamaConfig, LlamaDecoder
from attnkit.models._ray import Embedder

__all__ = ["BertEncoder", "Embedder", "LlamaConfig", "LlamaDecoder", "LoadError", "load"]


def load(path: str | os.PathLike[str], *, dtype: str = "float32") -> BertEncoder | LlamaDecoder:
    """Loads a checkpoint from a local folder.

    A BERT-family folder holds ``config.json`` (``model_type`` ``"bert"``), ``model.safetensors``
    and ``tokenizer.json``, and, from sentence-transformers, ``modules.json`` with its pooling
    (``1_Pooling/config.json``) and normalization modules and ``sentence_bert_config.json``
    (``max_seq_length``). Without ``modules.json`` the encoder mean-pools and does not normalize.

    A LLaMA-family folder (``model_type`` ``"llama"``) holds ``config.json``, ``model.safetensors``
    and ``tokenizer.json`` (and optionally ``generation_config.json`` for the end-of-sequence ids).
    A ``.gguf`` file (llama.cpp's format, ``general.architecture`` ``"llama"``) holds all of it:
    its tensors are dequantized to float32 at load (by the ``gguf`` package: Q4_0, Q4_1, Q8_0,
    K-quants, ...) and its byte-level BPE tokenizer is built from the metadata.

    Args:
        path: the checkpoint's folder, or a ``.gguf`` file.
        dtype: the layers' matrix products: ``"float32"`` (:class:`attnkit.F32Linear`) or ``"bfloat16"``
            (:class:`attnkit.Bf16Linear`: weights rounded once to bfloat16, each product's input
            rounded to it, float32 sums; on CPUs with AVX512_BF16, twice float32's multiply-add
            rate and half its weight bytes; elsewhere the same results come from portable code,
            about ten times slower than float32, and a ``RuntimeWarning`` says so). Everything
            else (embeddings, norms, activations, attention, the residual stream) stays float32.

    Returns:
        A :class:`BertEncoder` or a :class:`LlamaDecoder`.

    Raises:
        ValueError (:class:`LoadError`): a missing file, an unknown architecture, or a tensor or
            setting that does not match the config, named with the file and key.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    if dtype == "bfloat16" and not attnkit.Bf16Linear.native():
        warnings.warn("dtype='bfloat16': this CPU lacks AVX512_BF16, so the bfloat16 products run in portable "
                      "code (the same results, about ten times slower than float32); keep dtype='float32' here",
                      RuntimeWarning, stacklevel=2)
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".gguf":
        from attnkit.models._gguf import load_gguf

        return load_gguf(folder, dtype)
    if not folder.is_dir():
        raise LoadError(f"{folder}: expected a checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    config: dict[str, Any] = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type == "bert":
        return BertEncoder.from_folder(folder, config, dtype)
    if model_type == "llama":
        return LlamaDecoder.from_folder(folder, config, dtype)
    raise LoadError(
        f"{folder / 'config.json'}: model_type {json.dumps(model_type)} is not one attnkit.models loads "
        '("bert", "llama")'
    )
