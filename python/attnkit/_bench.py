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


@dataclass
class Row:
    kernel: str
    shape: str
    threads: int
    ms: dict[str, float]  # median milliseconds per implementation
    gbps: float  # attnkit's GB/s

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


def measure(case: Case, repeats: int, min_time: float) -> dict[str, float]:
    impls = {"attnkit": case.ours, **case.peers}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():  # interleaved: A B C A B C ...
            time.sleep(SETTLE_SECONDS)
            samples[name].append(_time(fn, min_time))
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def calibration_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = min(_time(lambda: a @ b, 0.05) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


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

    # The harness against itself: the ratio shows the measurement noise.
    out.append(Case("A/A check (embedding)", emb.shape, emb.nbytes, emb.ours, {"attnkit again": emb.ours}))
    return out


def run(quick: bool = False, threads: tuple[int, ...] = (1, 2), json_path: str | None = None) -> list[Row]:
    torch = _torch()
    repeats, min_time = (5, 0.02) if quick else (11, 0.05)
    print(f"attnkit {attnkit.__version__} | numpy {np.__version__} | torch {torch.__version__ if torch else 'not installed'}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs | "
          f"{repeats} interleaved repeats, medians")
    gflops = calibration_gflops(1024 if quick else 2048)
    print(f"calibration: NumPy float32 matmul {gflops:.0f} GFLOP/s (NumPy's default BLAS threads)\n")
    time.sleep(1.0)  # OpenBLAS's threads spin for a while after the matmul; let them go idle first
    rows: list[Row] = []
    before = attnkit.get_num_threads()
    torch_before = torch.get_num_threads() if torch else None
    header = f"{'kernel':<24}{'shape':<26}{'thr':>4}{'attnkit ms':>12}{'GB/s':>7}{'numpy ms':>10}{'torch ms':>10}{'vs numpy':>10}{'vs torch':>10}"
    print(header)
    print("-" * len(header))
    try:
        all_cases = cases(quick, torch)
        for n in threads:
            attnkit.set_num_threads(n)
            if torch:
                torch.set_num_threads(n)
            for case in all_cases:
                ms = measure(case, repeats, min_time)
                row = Row(case.kernel, case.shape, n, ms, case.nbytes / (ms["attnkit"] / 1e3) / 1e9)
                rows.append(row)
                print(_format(row))
    finally:
        attnkit.set_num_threads(before)
        if torch:
            torch.set_num_threads(torch_before)
    print("\nratios are peer time / attnkit time: above 1 means attnkit is faster;")
    print("in the A/A rows the torch columns hold attnkit timed a second time (the harness's noise)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"calibration_gflops": gflops, "rows": [asdict(r) for r in rows]}, f, indent=1)
        print(f"saved {json_path}")
    return rows


def _format(row: Row) -> str:
    def cell(value: float | None, width: int, suffix: str = "") -> str:
        text = "-" if value is None else f"{value:.{2 if suffix else 3}f}{suffix}"
        return f"{text:>{width}}"

    peer_ms = row.ms.get("numpy"), row.ms.get("torch", row.ms.get("attnkit again"))
    torch_ratio = row.ratio("torch") or row.ratio("attnkit again")
    return (f"{row.kernel:<24}{row.shape:<26}{row.threads:>4}{row.ms['attnkit']:>12.3f}{row.gbps:>7.1f}"
            f"{cell(peer_ms[0], 10)}{cell(peer_ms[1], 10)}"
            f"{cell(row.ratio('numpy'), 10, 'x')}{cell(torch_ratio, 10, 'x')}")
