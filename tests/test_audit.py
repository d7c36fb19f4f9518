"""Regression tests for the faults an outside audit found (issue 13), one section per finding.

Each test failed on the code the audit examined; the section headers give the finding's number.
The fuzzing of the whole API against the error contract is in ``test_fuzz.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnkit
from reference import attention as reference_attention

RNG = np.random.default_rng(13)


# 1. A 2-d (L, E) input is one batch item and one head in either layout.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_2d_input_is_one_head_in_either_layout(dtype):
    q, k, v = (RNG.standard_normal((n, 8)).astype(dtype) for n in (4, 6, 6))
    want = reference_attention(q[None, None], k[None, None], v[None, None])[0][0, 0]
    for layout in ("bhsd", "bshd"):
        out, lse, weights = attnkit.scaled_dot_product_attention(
            q, k, v, layout=layout, return_lse=True, return_weights=True
        )
        assert out.shape == (4, 8) and lse.shape == (4,) and weights.shape == (4, 6)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    same = [attnkit.scaled_dot_product_attention(q, k, v, layout=lay, is_causal=True) for lay in ("bhsd", "bshd")]
    assert same[0].tobytes() == same[1].tobytes()


# 2. NaN in an attended key reaches its row on the decode path, whatever the later chunks hold.
@pytest.mark.parametrize("kept,nan_at", [(100, 5), (511, 5), (513, 5), (1024, 5), (1024, 600), (700, 600)])
def test_nan_in_an_attended_key_survives_the_chunk_merge(kept, nan_at):
    q = np.ones((1, 1, 1, 8), np.float32)
    k = RNG.standard_normal((1, 1, 1024, 8)).astype(np.float32)
    v = RNG.standard_normal((1, 1, 1024, 8)).astype(np.float32)
    k[0, 0, nan_at, 0] = np.nan
    key_mask = np.zeros((1, 1024), bool)
    key_mask[0, :kept] = True
    out, lse = attnkit.scaled_dot_product_attention(q, k, v, key_mask=key_mask, return_lse=True)
    assert np.isnan(out).all() and np.isnan(lse).all()
    # The same NaN masked away leaves a finite row.
    key_mask[0, nan_at] = False
    assert np.isfinite(attnkit.scaled_dot_product_attention(q, k, v, key_mask=key_mask)).all()


# 3. Grouped heads with window bounds equal the call with repeated key/value heads, bit for bit.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [1, 5, 16, 17, 40, 100])
@pytest.mark.parametrize("window", [(5, 2), (5, None), (None, 2), (0, 0), (130, 1)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_gqa_with_a_window_equals_repeated_heads(dtype, length, window, alignment):
    q = RNG.standard_normal((1, 4, length, 32)).astype(dtype)
    k = RNG.standard_normal((1, 2, 300, 32)).astype(dtype)
    v = RNG.standard_normal((1, 2, 300, 32)).astype(dtype)
    kw = dict(window=window, causal_alignment=alignment, return_lse=True)
    grouped = attnkit.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    repeated = attnkit.scaled_dot_product_attention(q, np.repeat(k, 2, 1), np.repeat(v, 2, 1), **kw)
    for a, b in zip(grouped, repeated):
        assert a.tobytes() == b.tobytes()
    # And the batch split: each row of a batch equals that item alone.
    alone = attnkit.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1], **kw)
    assert alone[0].tobytes() == grouped[0][:, :1].tobytes()


# 6. A fork at any moment, from any thread, leaves the child able to use attnkit.
def test_forks_while_other_threads_call_attention_never_hang(threads):
    import os
    import threading
    import time

    threads(2)
    q = RNG.standard_normal((1, 4, 64, 32)).astype(np.float32)
    k = RNG.standard_normal((1, 4, 256, 32)).astype(np.float32)
    want = attnkit.scaled_dot_product_attention(q, k, k)
    stop = threading.Event()

    def call_in_a_loop():
        while not stop.is_set():
            attnkit.scaled_dot_product_attention(q, k, k)
            attnkit.embedding(np.array([1, 2]), k[0, 0])

    callers = [threading.Thread(target=call_in_a_loop) for _ in range(2)]
    for t in callers:
        t.start()
    hung = wrong = 0
    try:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:  # child: the pool and the locks must work
                ok = attnkit.scaled_dot_product_attention(q, k, k).tobytes() == want.tobytes()
                os._exit(0 if ok else 1)
            deadline = time.monotonic() + 10
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.0005)
            if done[0] == 0:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            elif done[1] != 0:
                wrong += 1
    finally:
        stop.set()
        for t in callers:
            t.join()
    assert (hung, wrong) == (0, 0)


# 8. The thread count has a documented maximum; anything else is a ValueError naming its source.
@pytest.mark.parametrize("n", [0, -1, attnkit.MAX_THREADS + 1, 10**6, 2**64, 2**200])
def test_thread_counts_out_of_range_raise_value_error(n):
    before = attnkit.get_num_threads()
    with pytest.raises(ValueError, match=rf"n: expected a number of threads from 1 to {attnkit.MAX_THREADS}, got {n}"):
        attnkit.set_num_threads(n)
    from attnkit import _core

    with pytest.raises(ValueError, match=r"^n: expected a number of threads from 1 to"):
        _core.set_num_threads(n)
    assert attnkit.get_num_threads() == before


def test_the_maximum_thread_count_is_accepted(threads):
    threads(attnkit.MAX_THREADS)
    assert attnkit.get_num_threads() == attnkit.MAX_THREADS == 1024
    threads(1)


def _python(code, **env):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("ATTNKIT_NUM_THREADS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["99999999999999999999", "1025", "0"])
def test_environment_thread_counts_out_of_range_raise_value_error(value):
    done = _python("import attnkit", ATTNKIT_NUM_THREADS=value)
    assert done.returncode != 0
    assert "ValueError: ATTNKIT_NUM_THREADS: expected a" in done.stderr
    assert "OverflowError" not in done.stderr


# 9. Without ATTNKIT_NUM_THREADS the pool follows OMP_NUM_THREADS, then the CPUs the process may use.
@pytest.mark.parametrize(
    "env,want",
    [
        ({"OMP_NUM_THREADS": "3"}, "3"),
        ({"OMP_NUM_THREADS": "5,2"}, "5"),  # nested OpenMP levels: the outer one
        ({"OMP_NUM_THREADS": "3", "ATTNKIT_NUM_THREADS": "2"}, "2"),
        ({"OMP_NUM_THREADS": "100000"}, "1024"),
        ({"OMP_NUM_THREADS": "many"}, "cpus"),
        ({}, "cpus"),
    ],
)
def test_thread_count_follows_the_conventional_variables(env, want):
    import os

    done = _python("import attnkit; print(attnkit.get_num_threads())", **env)
    assert done.returncode == 0, done.stderr
    cpus = len(os.sched_getaffinity(0))
    assert done.stdout.strip() == (str(cpus) if want == "cpus" else want)


def test_thread_count_follows_the_cpu_affinity():
    import os
    import shutil

    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two CPUs")
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("ATTNKIT_NUM_THREADS", "OMP_NUM_THREADS")}
    cpu = str(min(os.sched_getaffinity(0)))
    done = subprocess.run(["taskset", "-c", cpu, sys.executable, "-c", "import attnkit; print(attnkit.get_num_threads())"],
                          env=clean, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "1", done.stderr


def test_threadpoolctl_lists_and_limits_the_pool(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    threads(2)
    pools = [p for p in threadpoolctl.threadpool_info() if p["internal_api"] == "attnkit"]
    assert len(pools) == 1 and pools[0]["num_threads"] == 2 and pools[0]["version"] == attnkit.__version__
    with threadpoolctl.threadpool_limits(1):
        assert attnkit.get_num_threads() == 1
    assert attnkit.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(limits=1, user_api="attnkit"):
        assert attnkit.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert attnkit.get_num_threads() == 2


# 7. Ctrl-C stops a long call within about 100 ms; no result is returned, and the pool works after.
INTERRUPT_SCRIPT = """
import os, signal, sys, threading, time
import numpy as np, attnkit
attnkit.set_num_threads(int(sys.argv[1]))
q = np.random.default_rng(0).standard_normal((1, 4, 4096, 64), dtype=np.float32)
start = time.perf_counter(); want = attnkit.scaled_dot_product_attention(q, q, q)
full = time.perf_counter() - start
fired = []
def interrupt():
    time.sleep(full / 4); fired.append(time.perf_counter()); os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt).start()
try:
    got = attnkit.scaled_dot_product_attention(q, q, q)
    print("returned", full)
except KeyboardInterrupt:
    late = time.perf_counter() - fired[0]
    again = attnkit.scaled_dot_product_attention(q, q, q)
    print("interrupted", full, late, again.tobytes() == want.tobytes())
"""


@pytest.mark.parametrize("n_threads", [1, 2])
def test_ctrl_c_stops_a_long_call(n_threads):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", INTERRUPT_SCRIPT, str(n_threads)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    what, full, *rest = done.stdout.split()
    assert what == "interrupted", f"the call ran to its end ({float(full):.2f} s) despite the signal"
    late, pool_works = float(rest[0]), rest[1]
    assert late < 0.25, f"KeyboardInterrupt came {late:.3f} s after the signal (call {float(full):.2f} s)"
    assert pool_works == "True"


def test_bench_stopped_with_ctrl_c_exits_with_one_line():
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "attnkit", "bench", "--quick", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 2
    assert proc.returncode == 130
    assert err.strip() == "interrupted"


# 4. Every integer input gets the right bucket or a ValueError naming the argument.
def test_buckets_at_the_ends_of_int64_and_uint64():
    i64 = np.iinfo(np.int64)
    got = attnkit.relative_position_bucket(np.array([i64.min, i64.min + 1, -1, 0, 1, i64.max], np.int64))
    np.testing.assert_array_equal(got, [15, 15, 1, 0, 17, 31])
    got = attnkit.relative_position_bucket(np.array([2**64 - 1, 2**63, 2**63 - 1, 3], np.uint64))
    np.testing.assert_array_equal(got, [31, 31, 31, 19])
    got = attnkit.relative_position_bucket(np.array([i64.min, i64.max, 2], np.int64), bidirectional=False)
    np.testing.assert_array_equal(got, [31, 0, 0])


def test_buckets_stay_in_range_for_extreme_options():
    rel = np.array([np.iinfo(np.int64).min, -(2**40), -5, 0, 5, 2**40, np.iinfo(np.int64).max])
    for bidirectional, buckets, distance in [(True, 2**62, 2**62 + 7), (False, 4, 3), (True, 2**40, 2**39 + 1)]:
        got = attnkit.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
        assert got.min() >= 0 and got.max() < buckets
    with pytest.raises(ValueError, match=r"max_distance: .* too close to the .* exact buckets"):
        attnkit.relative_position_bucket(rel, num_buckets=2**62, max_distance=2**60 + 1)


def test_position_ids_refuse_an_offset_that_would_wrap():
    mask = np.ones((2, 3), int)
    top = np.iinfo(np.int64).max
    np.testing.assert_array_equal(attnkit.position_ids(mask, offset=top - 2)[0], [top - 2, top - 1, top])
    for offset in (top - 1, 2**63, 2**70, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"^offset: positions offset\.\.offset \+ 2 must fit in int64"):
            attnkit.position_ids(mask, offset=offset)


# 5. Parameters that would turn every output into NaN are refused, naming the argument.
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}


@pytest.mark.parametrize(
    "extra,name",
    [({"mscale": float("nan")}, "mscale"), ({"mscale_all_dim": float("inf")}, "mscale_all_dim"),
     ({"beta_fast": float("nan")}, "beta_fast"), ({"beta_slow": -1.0}, "beta_slow"), ({"beta_fast": -1}, "beta_fast"),
     ({"mscale": -1.0, "mscale_all_dim": 1.0}, "mscale"), ({"truncate": "no"}, "truncate")],
)
def test_yarn_parameters_that_give_nan_are_refused(extra, name):
    pattern = r"^scaling: 'truncate' must be a bool" if name == "truncate" else rf"^scaling\['{name}'\]: expected a finite"
    with pytest.raises(ValueError, match=pattern):
        attnkit.rope_frequencies(64, scaling={**YARN, **extra})


def test_scalings_that_overflow_are_refused():
    with pytest.raises(ValueError, match=r"^base: yarn needs a base above 1"):
        attnkit.rope_frequencies(64, base=1.0, scaling=YARN)
    with pytest.raises(ValueError, match=r"^scaling: rope_type 'dynamic' .* not finite"):
        attnkit.rope_frequencies(4, scaling={"rope_type": "dynamic", "factor": 1e300, "max_position_embeddings": 10}, seq_len=10**6)


@pytest.mark.parametrize("kw,name", [({"scale": 1e39}, "scale"), ({"softcap": 1e39}, "softcap"), ({"scale": -1e39}, "scale")])
def test_options_infinite_in_float32_are_refused(kw, name):
    q = np.ones((1, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match=rf"^{name}: must .*finite in float32"):
        attnkit.scaled_dot_product_attention(q, q, q, **kw)
    # float64 computes them.
    out = attnkit.scaled_dot_product_attention(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64), **kw)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_alibi_slopes_are_refused(bad):
    q = np.ones((1, 2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"^alibi_slopes: must be finite in float32"):
        attnkit.scaled_dot_product_attention(q, q, q, alibi_slopes=np.array([0.5, bad]))
