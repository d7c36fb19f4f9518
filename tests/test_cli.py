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
