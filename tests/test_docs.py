"""Every public function's docstring example runs and prints what it shows; the stub of the
compiled module matches it; the public API is typed and documented."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest

import attnkit

MODULES = ["attnkit.attention", "attnkit.block", "attnkit.cache", "attnkit.embedding", "attnkit.layers", "attnkit.linear", "attnkit.positional",
           "attnkit.rope", "attnkit.threads"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, threads):
    module = importlib.import_module(name)
    with np.printoptions(legacy=False):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


@pytest.mark.parametrize("name", [n for n in attnkit.__all__ if n not in ("__version__", "InternalError", "MAX_THREADS")])
def test_public_functions_are_documented_and_typed(name):
    obj = getattr(attnkit, name)
    doc = inspect.getdoc(obj) or ""
    assert "Example:" in doc and ">>>" in doc, f"{name} has no example"
    functions = [obj]
    if inspect.isclass(obj):  # its constructor and its public methods
        functions = [obj.__init__] + [f for n, f in vars(obj).items() if inspect.isfunction(f) and not n.startswith("_")]
        functions += [obj.__call__] if "__call__" in vars(obj) else []
    for fn in functions:
        assert "return" in inspect.get_annotations(fn), f"{name}.{fn.__name__} has no return annotation"


def test_version_is_the_crate_version():
    assert attnkit.__version__.count(".") == 2


def test_stub_matches_the_compiled_module():
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "attnkit._core", "--ignore-missing-stub"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_passes_mypy_strict():
    pytest.importorskip("mypy")
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "python" / "attnkit").is_dir():
        pytest.skip("needs the source tree")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(root / "pyproject.toml"), str(root / "python" / "attnkit")],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert done.returncode == 0, done.stdout + done.stderr
