"""The command line: `python -m attnkit demo` and the benchmark harness (not its timings)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from attnkit import _bench, _demo
from attnkit.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "attnkit", *args], capture_output=True, text=True, timeout=120)


def test_demo_shows_the_two_banks_parting_ways():
    done = run("demo")
    assert done.returncode == 0, done.stderr
    assert "attends most to" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("bank")]
    first, second = lines[-2], lines[-1]  # the static -> contextual lines
    assert "->  finance" in first and "->  nature" in second


def test_demo_with_a_sentence_and_without_words():
    assert run("demo", "the fish swam in the lake").returncode == 0
    assert run("demo", "...").returncode == 2


def test_demo_plot(tmp_path):
    target = tmp_path / "map.png"
    code = _demo.run("the river bank", str(target))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and not target.exists()
    else:
        assert code == 0 and target.stat().st_size > 0


def test_bench_harness_measures_every_implementation():
    case = _bench.Case("sum", "(4,)", 16, lambda: np.ones(4).sum(), {"numpy": lambda: np.ones(4).sum()})
    ms = _bench.measure(case, repeats=2, min_time=0.001)
    assert set(ms) == {"attnkit", "numpy"} and all(v > 0 for v in ms.values())
    row = _bench.Row(case.kernel, case.shape, 1, ms, 1.0)
    assert "sum" in _bench._format(row)


def test_bench_cases_are_well_formed():
    for case in _bench.cases(quick=True, torch=None):
        assert case.kernel and callable(case.ours)
    with pytest.raises(SystemExit):
        main(["bench", "--threads", "0"])


def test_bench_rows_show_the_fraction_of_calibration_and_fit_100_columns():
    row = _bench.Row("attn x", "B1", 2, {"attnkit": 2.0, "torch": 3.0}, 50.0, "GF/s", calibration=0.25)
    text = _bench._format(row)
    assert "25%" in text and "50.0 GF/s" in text and "1.50x" in text
    decode = _bench._format(_bench.Row("attn y", "B1", 1, {"attnkit": 1.0}, 12.5, "GB/s K/V", kv_gbps=12.5))
    assert "12.5 GB/s" in decode and "%" not in decode
    plain = _bench._format(_bench.Row("embedding", "(4,)", 1, {"attnkit": 1.0}, 3.0))
    assert "25%" not in plain and "1.50x" not in plain
    full_shapes = [f"B{b} H{hq}/{hkv} {length}x{s} E{e}" for _, b, hq, hkv, length, s, e, _ in _bench.ATTENTION_GRID]
    quick = [(c.kernel, c.shape) for c in _bench.cases(quick=True, torch=None)]
    for kernel, shape in quick + [(f"attn {g[0]}", shape) for g, shape in zip(_bench.ATTENTION_GRID, full_shapes)]:
        wide = _bench.Row(kernel, shape, 16, {"attnkit": 12345.678, "numpy": 1e5, "torch": 1e5}, 1234.5, "GF/s", 1.23)
        text = _bench._format(wide)
        assert len(text) <= 100 and shape in text and kernel in text, text


def test_bench_grid_has_the_layer_and_decode_bandwidth():
    cases = {c.kernel: c for c in _bench.cases(quick=True, torch=None)}
    layer = cases["MultiheadAttention layer"]
    assert layer.flops > 0 and layer.ours().shape == (2, 128, 768)
    assert cases["attn GPT-2 decode"].kv_bytes == 2 * 12 * 1024 * 64 * 4
    assert cases["attn BERT-base, pad"].kv_bytes == 0  # prefill rows have no K/V column
    # The full-size long prefill (not built here: its inputs take 200 MB) runs 3 repeats; the quick
    # grid leaves it out, as it would shrink to the Llama-3 row's shape.
    name, b, hq, hkv, length, s, e, mask = next(g for g in _bench.ATTENTION_GRID if g[0] == "long prefill")
    assert 4.0 * b * hq * length * s * e / 2 > _bench.LONG_GFLOP * 1e9
    assert "attn long prefill" not in cases and len({c.shape for c in cases.values() if c.kernel.startswith("attn")}) == len(
        [c for c in cases.values() if c.kernel.startswith("attn")])


def test_bench_plot_draws_the_ratios(tmp_path):
    rows = [_bench.Row("attention: a", "s", n, {"attnkit": 1.0, "torch": 1.5 * n}, 1.0) for n in (1, 2)]
    rows.append(_bench.Row("embedding", "s", 1, {"attnkit": 1.0, "numpy": 2.0}, 1.0))
    target = tmp_path / "bench.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # matplotlib is optional: the command line refuses --plot before measuring
        with pytest.raises(SystemExit):
            main(["bench", "--plot", str(target)])
        with pytest.raises(ImportError):
            _bench.plot(rows, str(target))
        assert not target.exists()
    else:
        _bench.plot(rows, str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_latency_times_every_step(tmp_path, capsys):
    ms = _bench.decode_latency(64)
    assert len(ms) == 64 and all(x > 0 for x in ms)
    assert "median ms per 512 tokens" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    target = tmp_path / "latency.png"
    _bench.decode_latency(16, str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
