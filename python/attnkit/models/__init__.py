"""Real checkpoints through attnkit: sentence embeddings from BERT-family encoders, with NumPy and
attnkit's public API only.

    from attnkit import models
    encoder = models.load("path/to/all-MiniLM-L6-v2")     # a folder: safetensors + configs
    vectors = encoder.encode(["A man is eating food.", "A man is riding a horse."])

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

__all__ = ["BertEncoder", "LoadError", "load"]


def load(path: str | os.PathLike[str]) -> BertEncoder:
    """Loads a checkpoint from a local folder.

    A BERT-family folder holds ``config.json`` (``model_type`` ``"bert"``), ``model.safetensors``
    and ``tokenizer.json``, and, from sentence-transformers, ``modules.json`` with its pooling
    (``1_Pooling/config.json``) and normalization modules and ``sentence_bert_config.json``
    (``max_seq_length``). Without ``modules.json`` the encoder mean-pools and does not normalize.

    Args:
        path: the checkpoint's folder.

    Returns:
        A :class:`BertEncoder`.

    Raises:
        ValueError (:class:`LoadError`): a missing file, an unknown architecture, or a tensor or
            setting that does not match the config, named with the file and key.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: expected a checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    config: dict[str, Any] = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type == "bert":
        return BertEncoder.from_folder(folder, config)
    raise LoadError(
        f"{folder / 'config.json'}: model_type {json.dumps(model_type)} is not one attnkit.models loads (\"bert\")"
    )
