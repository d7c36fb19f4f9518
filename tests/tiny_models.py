"""Tiny random checkpoints in the formats real ones use, written by the tests themselves: a BERT
folder as sentence-transformers saves one (config.json, model.safetensors, tokenizer.json,
modules.json, the pooling config), and its float64 reference forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

WORDS = ("the bank of a river was steep and money in grew slowly while man ate food riding horse "
         "it is on by to we they he she").split()
BERT_CONFIG = dict(
    architectures=["BertModel"], model_type="bert", hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
    intermediate_size=64, vocab_size=5 + len(WORDS), max_position_embeddings=40, type_vocab_size=2,
    layer_norm_eps=1e-12, hidden_act="gelu", position_embedding_type="absolute", pad_token_id=0,
)


def bert_tokenizer():
    """A WordPiece tokenizer like BERT's (lower-casing, [CLS] ... [SEP]) over ``WORDS``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def bert_weights(config=BERT_CONFIG, seed=0):
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": rand(config["vocab_size"], h, scale=1.0),
        "embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": 1 + rand(h, scale=0.1),
        "embeddings.LayerNorm.bias": rand(h, scale=0.1),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{n}"
        for name in ("query", "key", "value"):
            w[f"{p}.attention.self.{name}.weight"] = rand(h, h)
            w[f"{p}.attention.self.{name}.bias"] = rand(h, scale=0.05)
        w[f"{p}.attention.output.dense.weight"] = rand(h, h)
        w[f"{p}.attention.output.dense.bias"] = rand(h, scale=0.05)
        w[f"{p}.attention.output.LayerNorm.weight"] = 1 + rand(h, scale=0.1)
        w[f"{p}.attention.output.LayerNorm.bias"] = rand(h, scale=0.1)
        w[f"{p}.intermediate.dense.weight"] = rand(i, h)
        w[f"{p}.intermediate.dense.bias"] = rand(i, scale=0.05)
        w[f"{p}.output.dense.weight"] = rand(h, i)
        w[f"{p}.output.dense.bias"] = rand(h, scale=0.05)
        w[f"{p}.output.LayerNorm.weight"] = 1 + rand(h, scale=0.1)
        w[f"{p}.output.LayerNorm.bias"] = rand(h, scale=0.1)
    return w


def write_bert(folder, *, config=BERT_CONFIG, weights=None, pooling="mean", normalize=True,
               max_seq_length=32, sentence_transformers=True):
    """Writes a tiny BERT checkpoint into ``folder`` and returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(bert_weights(config) if weights is None else weights, str(folder / "model.safetensors"))
    bert_tokenizer().save(str(folder / "tokenizer.json"))
    if sentence_transformers:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": config["hidden_size"],
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
        # What sentence-transformers reads to build its Hugging Face tokenizer.
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "unk_token": "[UNK]",
            "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
        }))
    return folder


def bert_forward_f64(weights, config, ids, mask):
    """The BERT encoder in float64, one sequence and one head at a time, masked keys excluded."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    h, heads = config["hidden_size"], config["num_attention_heads"]
    d, eps = h // heads, config["layer_norm_eps"]

    def norm(x, prefix):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    erf = np.vectorize(math.erf)
    out = []
    for seq, m in zip(np.asarray(ids), np.asarray(mask)):
        s = len(seq)
        x = w["embeddings.word_embeddings.weight"][seq] + w["embeddings.token_type_embeddings.weight"][0]
        x = norm(x + w["embeddings.position_embeddings.weight"][:s], "embeddings.LayerNorm")
        keys = np.flatnonzero(m)
        for n in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{n}"
            q, k, v = (linear(x, f"{p}.attention.self.{name}") for name in ("query", "key", "value"))
            att = np.empty_like(x)
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                scores = q[:, sl] @ k[keys, sl].T / math.sqrt(d)
                p_ = np.exp(scores - scores.max(-1, keepdims=True))
                att[:, sl] = (p_ / p_.sum(-1, keepdims=True)) @ v[keys, sl]
            x = norm(linear(att, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            inter = linear(x, f"{p}.intermediate.dense")
            inter = inter * 0.5 * (1 + erf(inter / math.sqrt(2)))
            x = norm(linear(inter, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        out.append(x)
    return np.stack(out)
