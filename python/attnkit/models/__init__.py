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
from pathlib import Path
from typing import Any

from attnkit.models._bert import BertEncoder
from attnkit.models._files import LoadError, read_json
from attnkit.models._llama import LlamaConfig, LlamaDecoder
from attnkit.models._ray import Embedder

__all__ = ["BertEncoder", "Embedder", "LlamaConfig", "LlamaDecoder", "LoadError", "load"]


def load(path: str | os.PathLike[str]) -> BertEncoder | LlamaDecoder:
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

    Returns:
        A :class:`BertEncoder` or a :class:`LlamaDecoder`.

    Raises:
        ValueError (:class:`LoadError`): a missing file, an unknown architecture, or a tensor or
            setting that does not match the config, named with the file and key.
    """
    folder = Path(path)
    if folder.is_file() and folder.suffix == ".gguf":
        from attnkit.models._gguf import load_gguf

        return load_gguf(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: expected a checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    config: dict[str, Any] = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type == "bert":
        return BertEncoder.from_folder(folder, config)
    if model_type == "llama":
        return LlamaDecoder.from_folder(folder, config)
    raise LoadError(
        f"{folder / 'config.json'}: model_type {json.dumps(model_type)} is not one attnkit.models loads "
        '("bert", "llama")'
    )
