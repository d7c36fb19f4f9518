"""Threads: results independent of the thread count, the GIL released, concurrent callers, the
ATTNKIT_NUM_THREADS variable and the pool after fork."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import attnkit
from conftest import run_forked

RNG = np.random.default_rng(0)
TABLE = RNG.standard_normal((5000, 96)).astype(np.float32)
IDS = RNG.integers(0, 5000, size=(16, 300))
X = RNG.standard_normal((4, 8, 300, 64)).astype(np.float32)
POSITIONS = RNG.integers(0, 1 << 20, size=(7, 1000))
Q, K, V = (RNG.standard_normal((2, h, n, 32)).astype(np.float32) for h, n in ((8, 70), (2, 2000), (2, 2000)))


def workload():
    """One call of every kernel, each large enough to run on the pool."""
    cos, sin = attnkit.rope_cos_sin(POSITIONS[0, :300], 48)
    offsets = np.arange(0, IDS.size, 37)
    return [
        attnkit.embedding(IDS, TABLE),
        attnkit.embedding(IDS, TABLE, scale=3.1),
        attnkit.embedding_bag(IDS.reshape(-1), TABLE, offsets, mode="mean", padding_idx=3),
        attnkit.embedding_bag(IDS.reshape(-1), TABLE, offsets, mode="max"),
        attnkit.sinusoidal_positions(POSITIONS, 128, dtype=np.float64),
        *attnkit.rope_cos_sin(POSITIONS, 128),
        attnkit.apply_rope(X, cos, sin),
        attnkit.apply_rope(X.transpose(0, 2, 1, 3), cos, sin, style="interleaved", layout="bshd"),
        attnkit.scaled_dot_product_attention(Q, K, V, is_causal=True, causal_alignment="bottom_right", enable_gqa=True),
        attnkit.scaled_dot_product_attention(Q[:, :, :3], K, V, enable_gqa=True),  # the decode path
        # Layout bshd (the kernel's rows copied into the output's order), tiled and short queries.
        *(attnkit.scaled_dot_product_attention(*(x.swapaxes(1, 2) for x in (Q[:, :, :n], K[:, :, :300], V[:, :, :300])),
                                               enable_gqa=True, layout="bshd") for n in (70, 3)),
    ]


def test_results_are_bitwise_identical_for_any_thread_count(threads):
    threads(1)
    want = workload()
    for n in (2, 3, 8):
        threads(n)
        for a, b in zip(workload(), want):
            assert a.tobytes() == b.tobytes(), f"{n} threads"


def test_portable_and_accelerated_paths_give_identical_bits():
    from attnkit import _core

    if not _core._simd_accelerated():
        pytest.skip("this CPU has no AVX2: only the portable path exists")
    want = workload()
    _core._set_simd_enabled(False)
    try:
        assert not _core._simd_accelerated()
        got = workload()
    finally:
        _core._set_simd_enabled(True)
    for a, b in zip(got, want):
        assert a.tobytes() == b.tobytes()


def test_batch_rows_equal_the_same_items_run_alone():
    cos, sin = attnkit.rope_cos_sin(300, 64)
    batched = attnkit.apply_rope(X, cos, sin)
    for b in range(X.shape[0]):
        np.testing.assert_array_equal(batched[b : b + 1], attnkit.apply_rope(X[b : b + 1], cos, sin))
    np.testing.assert_array_equal(attnkit.embedding(IDS, TABLE)[3], attnkit.embedding(IDS[3], TABLE))


def test_set_and_get_num_threads(threads):
    threads(3)
    assert attnkit.get_num_threads() == 3
    threads(1)
    assert attnkit.get_num_threads() == 1


def ticks_in_middle_of(call):
    """How often another Python thread ran during the middle half of ``call()``.

    A call that holds the GIL leaves no room for it there (the other thread can only run after the
    call returns), so the count is 0; a call that releases the GIL lets it run throughout."""
    stamps = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.01)
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        stop.set()
        counter.join()
    lo, hi = start + 0.25 * (end - start), start + 0.75 * (end - start)
    return end - start, sum(lo < t < hi for t in stamps)


def test_heavy_calls_release_the_gil(threads):
    threads(1)
    # Control: a NumPy reduction over Python ints runs in C and never releases the GIL.
    # (Up to three tries: on a loaded machine one control run has been seen to let the other
    # thread in, once in many CI runs; a single clean run shows that the measurement works.)
    held = np.arange(2_000_000, dtype=object)
    controls = []
    for _ in range(3):
        controls.append(ticks_in_middle_of(held.sum))
        if controls[-1][1] == 0:
            break
    assert controls[-1][1] == 0, f"the measurement cannot see a GIL-holding call ((s, ticks): {controls})"

    # 6.4 million float64 sin/cos evaluations: about 0.1 s on one core.
    elapsed, ticks = ticks_in_middle_of(lambda: attnkit.sinusoidal_positions(100_000, 128))
    assert elapsed > 0.02, "the workload is too small to tell"
    assert ticks > 100, f"another thread ran only {ticks} times during {elapsed:.3f} s of sinusoidal_positions"


def test_concurrent_callers_get_correct_results(threads):
    threads(2)
    want = workload()

    def call(_):
        return workload()

    with ThreadPoolExecutor(max_workers=4) as pool:
        for got in pool.map(call, range(8)):
            for a, b in zip(got, want):
                assert a.tobytes() == b.tobytes()


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


def test_environment_variable_sets_the_thread_count():
    done = run_python("import attnkit; print(attnkit.get_num_threads())", ATTNKIT_NUM_THREADS="3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_environment_variable_raises_a_clear_error(value):
    done = run_python("import attnkit", ATTNKIT_NUM_THREADS=value)
    assert done.returncode != 0
    assert "ValueError: ATTNKIT_NUM_THREADS: expected a" in done.stderr


def test_pool_works_in_a_forked_child(threads):
    threads(2)
    want = workload()  # the pool exists in the parent before the fork

    def child():
        got = workload()
        if any(a.tobytes() != b.tobytes() for a, b in zip(got, want)):
            raise AssertionError("results differ after fork")

    assert run_forked(child) == ("ok", None)
