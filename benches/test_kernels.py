"""pytest-benchmark suite: every kernel of `python -m attnkit bench` against its peers.

Run with ``python -m pytest benches`` (add ``--benchmark-json FILE`` to save figures). Each case
is grouped with its peers so pytest-benchmark prints them side by side; nothing here asserts a
timing. The cases are the ones ``python -m attnkit bench`` measures (see ``attnkit._bench``).
"""

from __future__ import annotations

import pytest

import attnkit
from attnkit import _bench

torch = _bench._torch()
CASES = [c for c in _bench.cases(quick=False, torch=torch) if not c.kernel.startswith("A/A")]
PARAMS = [
    pytest.param(case, impl, threads, id=f"{case.kernel}-{impl}-{threads}thr")
    for case in CASES
    for impl in ["attnkit", *case.peers]
    for threads in (1, 2)
]


@pytest.mark.parametrize("case,impl,threads", PARAMS)
def test_kernel(benchmark, case, impl, threads):
    attnkit.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    benchmark.group = f"{case.kernel} {case.shape} {threads} thread(s)"
    benchmark.extra_info["GB"] = case.nbytes / 1e9
    if case.flops:
        benchmark.extra_info["GFLOP"] = case.flops / 1e9
    fn = case.ours if impl == "attnkit" else case.peers[impl]
    if case.repeats:  # the longest rows (seconds a call): a few rounds, not pytest-benchmark's default
        benchmark.pedantic(fn, rounds=case.repeats, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
