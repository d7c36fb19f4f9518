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
            if config.get("hidden_act", "gelu") == "gelu":
                inter = inter * 0.5 * (1 + erf(inter / math.sqrt(2)))
            else:  # the tanh approximation ("gelu_new" and its aliases)
                inter = inter * 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (inter + 0.044715 * inter**3)))
            x = norm(linear(inter, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        out.append(x)
    return np.stack(out)


CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that generated text one token at a time.",
    "def add(a, b): return a + b  # 12345",
] * 3
LLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_hidden_layers=2, intermediate_size=48, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=128, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, vocab_size=None,  # set from the tokenizer
)


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained on ``CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama_config(**overrides):
    config = {**LLAMA_CONFIG, "vocab_size": bpe_tokenizer().get_vocab_size(), **overrides}
    return config


def llama_weights(config, seed=1):
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

    def rand(*shape, scale=0.25):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(v, h, scale=1.0), "model.norm.weight": 1 + rand(h, scale=0.1)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        w[f"{p}.input_layernorm.weight"] = 1 + rand(h, scale=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + rand(h, scale=0.1)
        w[f"{p}.self_attn.q_proj.weight"] = rand(q, h)
        w[f"{p}.self_attn.k_proj.weight"] = rand(kv, h)
        w[f"{p}.self_attn.v_proj.weight"] = rand(kv, h)
        w[f"{p}.self_attn.o_proj.weight"] = rand(h, q)
        w[f"{p}.mlp.gate_proj.weight"] = rand(i, h)
        w[f"{p}.mlp.up_proj.weight"] = rand(i, h)
        w[f"{p}.mlp.down_proj.weight"] = rand(h, i)
    return w


def write_llama(folder, *, config=None, weights=None):
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config() if config is None else config
    (folder / "config.json").write_text(json.dumps(config))
    save_file(llama_weights(config) if weights is None else weights, str(folder / "model.safetensors"))
    bpe_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def llama_forward_f64(weights, config, ids):
    """Logits of one unpadded sequence in float64: RMS norms, rotate-half RoPE, causal GQA."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, eps, s = config["head_dim"], config["rms_norm_eps"], len(ids)

    def norm(x, key):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w[key]

    inv = 1.0 / config["rope_theta"] ** (np.arange(0, d, 2) / d)
    ang = np.arange(s)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # (s, heads, d), rotate_half
        a, b = x[..., : d // 2], x[..., d // 2:]
        c, n = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * n, b * c + a * n], -1)

    x = w["model.embed_tokens.weight"][np.asarray(ids)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        y = norm(x, f"{p}.input_layernorm.weight")
        q = rope((y @ w[f"{p}.self_attn.q_proj.weight"].T).reshape(s, heads, d))
        k = rope((y @ w[f"{p}.self_attn.k_proj.weight"].T).reshape(s, kv, d))
        v = (y @ w[f"{p}.self_attn.v_proj.weight"].T).reshape(s, kv, d)
        att = np.empty((s, heads, d))
        for hd in range(heads):
            g = hd // (heads // kv)
            scores = q[:, hd] @ k[:, g].T / math.sqrt(d) + np.triu(np.full((s, s), -np.inf), 1)
            p_ = np.exp(scores - scores.max(-1, keepdims=True))
            att[:, hd] = (p_ / p_.sum(-1, keepdims=True)) @ v[:, g]
        x = x + att.reshape(s, heads * d) @ w[f"{p}.self_attn.o_proj.weight"].T
        y = norm(x, f"{p}.post_attention_layernorm.weight")
        gate, up = y @ w[f"{p}.mlp.gate_proj.weight"].T, y @ w[f"{p}.mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}.mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return norm(x, "model.norm.weight") @ head.T


def _permute(w, n_head):
    """llama.cpp's reordering of a query or key projection's rows (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, config, weights, *, qtype="F32"):
    """The tiny LLaMA of ``config``/``weights`` as a GGUF file, as llama.cpp's converter writes it
    (tensor names, permuted query and key rows, the tokenizer in the metadata); the projections in
    ``qtype`` ("F32", "Q8_0" or "Q4_1")."""
    import gguf

    tok = json.loads(bpe_tokenizer().to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    quant = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name, arr, project=False):
        arr = np.ascontiguousarray(arr, np.float32)
        if project and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)

    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    add("token_embd.weight", weights["model.embed_tokens.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    if not config["tie_word_embeddings"]:
        add("output.weight", weights["lm_head.weight"], True)
    for n in range(config["num_hidden_layers"]):
        p, b = f"model.layers.{n}", f"blk.{n}"
        add(f"{b}.attn_norm.weight", weights[f"{p}.input_layernorm.weight"])
        add(f"{b}.ffn_norm.weight", weights[f"{p}.post_attention_layernorm.weight"])
        add(f"{b}.attn_q.weight", _permute(weights[f"{p}.self_attn.q_proj.weight"], heads), True)
        add(f"{b}.attn_k.weight", _permute(weights[f"{p}.self_attn.k_proj.weight"], kv), True)
        add(f"{b}.attn_v.weight", weights[f"{p}.self_attn.v_proj.weight"], True)
        add(f"{b}.attn_output.weight", weights[f"{p}.self_attn.o_proj.weight"], True)
        add(f"{b}.ffn_gate.weight", weights[f"{p}.mlp.gate_proj.weight"], True)
        add(f"{b}.ffn_up.weight", weights[f"{p}.mlp.up_proj.weight"], True)
        add(f"{b}.ffn_down.weight", weights[f"{p}.mlp.down_proj.weight"], True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
