"""Hypothesis fuzzing of the whole public API against the error contract.

Each test draws calls of one public function: valid ones (small shapes, empty dimensions, odd
dtypes and layouts, extreme but legal values) and ones with one argument replaced by something
the contract refuses. Every call runs in a forked child with a timeout, and its outcome is
classified:

- a valid call must return a result that matches the float64 reference (``reference.py``);
- an invalid call must raise TypeError, ValueError, IndexError or MemoryError;
- any exception must be one of those four and its message must begin with the name of an
  argument (or of the output that could not be allocated);
- a crash, a hang, a wrong result, an invalid call accepted, or any other exception fails.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
import reference as ref
from conftest import layouts

try:  # the 16-bit dtypes join the attention fuzz where ml_dtypes (a test dependency) is installed
    import ml_dtypes

    HALF_DTYPES: list[Any] = [np.float16, ml_dtypes.bfloat16]
except ImportError:  # pragma: no cover
    ml_dtypes = None
    HALF_DTYPES = [np.float16]


def eps(dtype: Any) -> float:
    return float(np.finfo(dtype).eps) if ml_dtypes is None else float(ml_dtypes.finfo(dtype).eps)

if not hasattr(os, "fork"):  # pragma: no cover
    pytest.skip("needs os.fork", allow_module_level=True)

ALLOWED = {"TypeError", "ValueError", "IndexError", "MemoryError"}
TIMEOUT = 30.0
# Examples per function: 40 by default (the suite stays fast), more with ATTNKIT_FUZZ_EXAMPLES.
# Under CI the draws are derandomized, so a run is repeatable; elsewhere each run explores anew.
FUZZ = settings(max_examples=int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=os.environ.get("CI") == "true", suppress_health_check=list(HealthCheck))


@dataclass
class Call:
    """One drawn call: ``run()`` makes it and returns the result; ``check(result)`` asserts it
    matches the reference; ``bad`` names the argument replaced by an invalid value (None: valid)."""

    run: Callable[[], Any]
    names: tuple[str, ...]
    check: Callable[[Any], None] = lambda result: None
    bad: str | None = None
    text: str = ""
    extra_names: tuple[str, ...] = field(default=())


def outcome(call: Call) -> tuple[str, Any]:
    """``call`` in a forked child: ("ok", None), ("wrong", message), ("raised", (type, message)),
    ("crash", wait status) or ("hang", None)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            try:
                result = call.run()
            except BaseException as exc:  # noqa: BLE001 - classified by the parent
                report: tuple[str, Any] = ("raised", (type(exc).__name__, str(exc)[:2000]))
            else:
                try:
                    call.check(result)
                    report = ("ok", None)
                except BaseException as exc:  # noqa: BLE001
                    report = ("wrong", f"{type(exc).__name__}: {exc}"[:2000])
            with os.fdopen(write_fd, "wb") as f:
                pickle.dump(report, f)
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + TIMEOUT
    data = b""
    with os.fdopen(read_fd, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([f], [], [], max(left, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("hang", None)
            chunk = os.read(f.fileno(), 1 << 16)
            if not chunk:
                break
            data += chunk
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or not data:
        return ("crash", status)
    return pickle.loads(data)


def classify(call: Call) -> None:
    kind, detail = outcome(call)
    where = f"{call.text} (invalid: {call.bad})" if call.bad else call.text
    assert kind not in ("crash", "hang"), f"{kind}: {where}"
    assert kind != "wrong", f"wrong result: {detail}: {where}"
    if kind == "ok":
        assert call.bad is None, f"accepted an invalid {call.bad}: {where}"
        return
    name, message = detail
    assert name in ALLOWED, f"{name} is not in the contract: {message!r}: {where}"
    assert call.bad is not None or name == "MemoryError", f"a valid call raised {name}: {message!r}: {where}"
    names = call.names + call.extra_names + ("out", "lse", "weights", "cos", "sin")
    pattern = r"^(" + "|".join(re.escape(n) for n in names) + r")\b"
    assert re.match(pattern, message), f"{name} names no argument: {message!r}: {where}"


def floats(data: st.DataObject, shape: tuple[int, ...], dtype: Any, special: bool = False) -> np.ndarray:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = rng.standard_normal(shape).astype(dtype)
    if special and x.size and data.draw(st.booleans(), label="special values"):
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e15]))
        with np.errstate(over="ignore"):  # 1e15 is inf in float16
            x.flat[rng.integers(0, x.size)] = np.array(value).astype(x.dtype)
    return x


def memory_layout(data: st.DataObject, x: np.ndarray) -> np.ndarray:
    """``x`` in one of the memory layouts of ``conftest.layouts`` (Fortran order, byte-swapped,
    misaligned, strided, read-only, ...)."""
    return data.draw(st.sampled_from(layouts(x)), label="layout")[1]


# Values the contract refuses wherever an array, an int or a number is expected (and None, where
# the argument is required: REQUIRED).
NOT_ARRAYS = ["text", object(), np.ma.masked_array([1.0, 2.0], mask=[0, 1]), np.array([1 + 2j]),
              np.array(["a", "b"]), np.array([None, 1.0], dtype=object)]
REQUIRED = NOT_ARRAYS + [None]
NOT_INTS = ["3", 2.5, np.array([1, 2]), -(2**70), 2**70]  # None too, where an int is required
NOT_REALS = ["1", float("nan"), float("inf"), np.array([1.0, 2.0]), object()]


def corrupt(data: st.DataObject, kwargs: dict[str, Any], choices: dict[str, list[Any]]) -> str | None:
    """Replaces one argument (drawn from ``choices``) by one of its invalid values, or none."""
    if not data.draw(st.booleans(), label="corrupt"):
        return None
    name = data.draw(st.sampled_from(sorted(choices)), label="argument")
    kwargs[name] = data.draw(st.sampled_from(choices[name]), label=f"invalid {name}")
    return name


def describe(kwargs: dict[str, Any]) -> str:
    def short(v: Any) -> str:
        if isinstance(v, np.ndarray):
            return f"array{v.shape} {v.dtype}"
        return repr(v)[:60]

    return ", ".join(f"{k}={short(v)}" for k, v in kwargs.items())


# --- embedding -------------------------------------------------------------------------------

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@given(st.data())
@FUZZ
def test_fuzz_embedding(data):
    rows, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 5))
    dtype = data.draw(st.sampled_from([np.float32, np.float64, *HALF_DTYPES]))
    shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
    ids = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, rows, shape).astype(data.draw(st.sampled_from(INT_DTYPES)))
    kw: dict[str, Any] = {"ids": memory_layout(data, ids), "weight": memory_layout(data, floats(data, (rows, dim), dtype, True)),
                          "scale": data.draw(st.one_of(st.none(), st.floats(-1e3, 1e3)))}
    bad = corrupt(data, kw, {"ids": REQUIRED + [np.array([0.5]), np.array([True]), np.array([rows]), np.array([-1])],
                             "weight": REQUIRED + [np.zeros((3, 2), int), np.zeros(3, np.float32), np.zeros((3, 2), np.complex64)],
                             "scale": NOT_REALS})

    def check(out: np.ndarray) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in the reference
            if dtype in HALF_DTYPES and kw["scale"] is not None:  # in float32, rounded once
                rows = np.asarray(kw["weight"]).astype(dtype)[np.asarray(kw["ids"])].astype(np.float32)
                want = (rows * np.float32(kw["scale"])).astype(dtype)
            else:
                want = ref.embedding(np.asarray(kw["ids"]), np.asarray(kw["weight"]).astype(dtype), kw["scale"])
        assert out.dtype == dtype and out.shape == want.shape
        assert out.tobytes() == np.ascontiguousarray(want).tobytes(), "not a bit-exact copy"

    classify(Call(lambda: attnkit.embedding(**kw), ("ids", "weight", "scale"), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_embedding_bag(data):
    rows, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 4))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    mode = data.draw(st.sampled_from(["sum", "mean", "max"]))
    weight = floats(data, (rows, dim), dtype)
    padding = data.draw(st.one_of(st.none(), st.integers(-rows, rows - 1)))
    if data.draw(st.booleans(), label="2-d"):
        ids = rng.integers(0, rows, (data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))))
        offsets, bags = None, [list(r) for r in ids]
    else:
        ids = rng.integers(0, rows, data.draw(st.integers(0, 8)))
        offsets = np.sort(rng.integers(0, len(ids) + 1, data.draw(st.integers(1, 4))))
        offsets[0] = 0
        bounds = list(offsets) + [len(ids)]
        bags = [list(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    psw = floats(data, ids.shape, dtype) if mode == "sum" and data.draw(st.booleans(), label="weights") else None
    kw: dict[str, Any] = {"ids": ids, "weight": weight, "offsets": offsets, "mode": mode, "per_sample_weights": psw,
                          "padding_idx": padding}
    bad = corrupt(data, kw, {"mode": ["median", None, 1], "ids": REQUIRED + [np.zeros((1, 1, 1), int)],
                             "padding_idx": [rows, -rows - 1, "0", 1.5], "include_last_offset": ["yes", np.array([1, 0]), None],
                             "weight": [np.zeros((3, 2), int), np.zeros(4, np.float32)]})
    pad = None if padding is None else padding % rows

    def check(out: np.ndarray) -> None:
        flat_psw = None if psw is None else [list(w) for w in (psw if psw.ndim == 2 else [psw[a:b] for a, b in
                                                                                        zip(list(offsets), list(offsets[1:]) + [len(ids)])])]
        want = ref.embedding_bag(bags, weight, mode, flat_psw, pad)
        tol = 4 * np.finfo(dtype).eps * (1 + np.abs(want))
        assert out.shape == want.shape and np.all(np.abs(out - want) <= tol), "differs from the reference"

    classify(Call(lambda: attnkit.embedding_bag(**kw), tuple(kw) + ("include_last_offset", "offsets"), check, bad, describe(kw)))


# --- positions -------------------------------------------------------------------------------

@given(st.data())
@FUZZ
def test_fuzz_sinusoidal_positions(data):
    positions: Any = data.draw(st.one_of(st.integers(0, 40), st.lists(st.integers(-(2**40), 2**40), max_size=6).map(np.array)))
    if isinstance(positions, np.ndarray) and positions.size == 0:
        positions = positions.astype(np.int64)
    kw: dict[str, Any] = {"positions": positions, "dim": 2 * data.draw(st.integers(0, 8)),
                          "base": data.draw(st.floats(1.5, 1e6)), "layout": data.draw(st.sampled_from(["interleaved", "halves"])),
                          "dtype": data.draw(st.sampled_from([np.float32, np.float64]))}
    bad = corrupt(data, kw, {"positions": REQUIRED + [np.array([1.5]), -1, 2**70, np.array([2**60])],
                             "dim": NOT_INTS + [None, 3, -2, 2**30], "base": NOT_REALS + [None, 0.0, -2.0],
                             "layout": ["split", None], "dtype": [np.int16, "nonsense", int]})

    def check(out: np.ndarray) -> None:
        pos = np.arange(kw["positions"]) if isinstance(kw["positions"], int) else kw["positions"]
        want = ref.sinusoidal(pos, kw["dim"], kw["base"], kw["layout"], kw["dtype"])
        np.testing.assert_array_max_ulp(out, want, maxulp=1)

    classify(Call(lambda: attnkit.sinusoidal_positions(**kw), tuple(kw), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_position_ids(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    mask = rng.integers(0, 2, (data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5))))
    mask = mask.astype(data.draw(st.sampled_from([bool, np.int8, np.uint64, np.int64])))
    kw: dict[str, Any] = {"attention_mask": mask, "offset": data.draw(st.integers(-(2**62), 2**62))}
    bad = corrupt(data, kw, {"attention_mask": REQUIRED[:3] + [np.ones(3), np.ones((2, 2)), np.ones((1, 2, 2), int)],
                             "offset": NOT_INTS + [None, 2**63]})

    def check(out: np.ndarray) -> None:
        real = mask != 0
        want = np.where(real, np.cumsum(real, axis=-1) - 1 + kw["offset"], kw["offset"])
        assert out.dtype == np.int64 and np.array_equal(out, want)

    classify(Call(lambda: attnkit.position_ids(**kw), tuple(kw), check, bad, describe(kw)))


SCALINGS = st.one_of(
    st.none(),
    st.fixed_dictionaries({"rope_type": st.just("linear"), "factor": st.floats(0.1, 64)}),
    st.fixed_dictionaries({"rope_type": st.just("dynamic"), "factor": st.floats(0.5, 16),
                           "max_position_embeddings": st.integers(1, 8192)}),
    st.fixed_dictionaries({"rope_type": st.just("yarn"), "factor": st.floats(1, 64),
                           "original_max_position_embeddings": st.integers(16, 8192)},
                          optional={"beta_fast": st.floats(1, 64), "beta_slow": st.floats(0.5, 2), "mscale": st.floats(0, 2),
                                    "mscale_all_dim": st.floats(0, 2), "truncate": st.booleans()}),
    st.fixed_dictionaries({"rope_type": st.just("llama3"), "factor": st.floats(1, 32), "low_freq_factor": st.just(1.0),
                           "high_freq_factor": st.floats(1.5, 8), "original_max_position_embeddings": st.integers(16, 8192)}),
)


def bad_scalings(dim: int) -> list[Any]:
    return [["linear"], {"rope_type": "ntk"}, {"rope_type": "linear"}, {"rope_type": "linear", "factor": -1.0},
            {"rope_type": "linear", "factor": float("nan")}, {"rope_type": "yarn", "original_max_position_embeddings": 64,
                                                              "beta_fast": float("nan")},
            {"rope_type": "yarn", "original_max_position_embeddings": 64, "mscale": float("inf")},
            {"rope_type": "yarn", "original_max_position_embeddings": 64, "beta_slow": -1},
            *([{"rope_type": "dynamic", "factor": 1e300, "max_position_embeddings": 4}] if dim > 2 else []),
            {"rope_type": "longrope", "short_factor": [1.0] * (dim // 2 + 1), "long_factor": [1.0] * (dim // 2 + 1), "original_max_position_embeddings": 8}]


@given(st.data())
@FUZZ
def test_fuzz_rope_frequencies(data):
    dim = 2 * data.draw(st.integers(0, 16))
    kw: dict[str, Any] = {"rotary_dim": dim, "base": data.draw(st.floats(2.0, 1e6)), "scaling": data.draw(SCALINGS),
                          "seq_len": data.draw(st.one_of(st.none(), st.integers(0, 10**5)))}
    bad = corrupt(data, kw, {"rotary_dim": NOT_INTS + [None, 5, -2], "base": NOT_REALS + [None, 0.0], "scaling": bad_scalings(dim),
                             "seq_len": ["3", 2.5, np.array([1, 2]), -(2**70), -1]})

    def check(result: tuple[np.ndarray, float]) -> None:
        inv_freq, factor = result
        assert inv_freq.shape == (dim // 2,) and np.isfinite(inv_freq).all() and np.all(inv_freq > 0)
        assert math.isfinite(factor) and factor > 0
        if kw["scaling"] is None:
            np.testing.assert_array_max_ulp(inv_freq, ref.inverse_frequencies(dim, kw["base"]), maxulp=1)

    classify(Call(lambda: attnkit.rope_frequencies(**kw), tuple(kw), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_rope_cos_sin(data):
    dim = 2 * data.draw(st.integers(0, 8))
    positions: Any = data.draw(st.one_of(st.integers(0, 40), st.lists(st.integers(0, 2**20), min_size=1, max_size=6).map(np.array)))
    kw: dict[str, Any] = {"positions": positions, "rotary_dim": dim, "base": data.draw(st.floats(2.0, 1e6)),
                          "dtype": data.draw(st.sampled_from([np.float32, np.float64]))}
    bad = corrupt(data, kw, {"positions": REQUIRED + [np.array([0.5]), -3, 2**70], "rotary_dim": NOT_INTS + [None, 3],
                             "base": NOT_REALS + [None], "dtype": [np.int16, "x"], "scaling": bad_scalings(dim)})

    def check(result: tuple[np.ndarray, np.ndarray]) -> None:
        pos = np.arange(positions) if isinstance(positions, int) else positions
        want = ref.rope_cos_sin(pos, ref.inverse_frequencies(dim, kw["base"]), 1.0, kw["dtype"])
        for got, w in zip(result, want):
            np.testing.assert_array_max_ulp(got, w, maxulp=1)

    classify(Call(lambda: attnkit.rope_cos_sin(**kw), tuple(kw) + ("scaling",), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_apply_rope(data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64, *HALF_DTYPES]))
    b, h, s = (data.draw(st.integers(0, 3)) for _ in range(3))
    head_dim = data.draw(st.integers(0, 8))
    half = data.draw(st.integers(0, head_dim // 2))
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]))
    style = data.draw(st.sampled_from(["half", "interleaved"]))
    x = floats(data, (b, h, s, head_dim), dtype, True)
    table_dtype = data.draw(st.sampled_from([dtype, np.float32, np.float64])) if dtype in HALF_DTYPES else dtype
    cos, sin = floats(data, (s, half), table_dtype), floats(data, (s, half), table_dtype)
    kw: dict[str, Any] = {"x": memory_layout(data, x.transpose(0, 2, 1, 3) if layout == "bshd" else x), "cos": cos, "sin": sin,
                          "style": style, "layout": layout}
    wrong_table = cos.astype(np.int32 if dtype in HALF_DTYPES else np.float16)
    bad = corrupt(data, kw, {"x": REQUIRED + [np.zeros((2, 2, 2)), np.zeros(x.shape, np.int32)], "cos": REQUIRED + [wrong_table],
                             "style": ["neox", None], "layout": ["sbhd", 0]})

    def check(out: np.ndarray) -> None:
        want = ref.apply_rope(kw["x"], cos, sin, style, layout)
        both_nan = np.isnan(out) & np.isnan(want)
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf
            err = np.where(both_nan | (out == want), 0, np.abs(out - want))
        assert out.shape == want.shape and out.dtype == dtype
        assert np.all(err <= 4 * eps(dtype) * (1 + np.abs(np.nan_to_num(want))))

    classify(Call(lambda: attnkit.apply_rope(**kw), tuple(kw), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_alibi_slopes(data):
    kw: dict[str, Any] = {"num_heads": data.draw(st.integers(0, 200))}
    bad = corrupt(data, kw, {"num_heads": NOT_INTS + [None, -1, 2**40]})

    def check(out: np.ndarray) -> None:
        n = kw["num_heads"]
        want = np.array(ref.alibi_slopes_paper(n) if n else [])
        np.testing.assert_allclose(out, want, rtol=1e-14, atol=0)

    classify(Call(lambda: attnkit.alibi_slopes(**kw), tuple(kw), check, bad, describe(kw)))


I64 = np.iinfo(np.int64)


@given(st.data())
@FUZZ
def test_fuzz_relative_position_bucket(data):
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    info = np.iinfo(dtype)
    rel = np.array(data.draw(st.lists(st.integers(int(info.min), int(info.max)), max_size=8)), dtype=dtype)
    bidirectional = data.draw(st.booleans())
    buckets = data.draw(st.integers(4, 2**40))
    exact = (buckets // 2 if bidirectional else buckets) // 2
    kw: dict[str, Any] = {"relative_position": rel, "bidirectional": bidirectional, "num_buckets": buckets,
                          "max_distance": data.draw(st.integers(exact + 1, exact + 2**40))}
    bad = corrupt(data, kw, {"relative_position": REQUIRED + [np.array([0.5])], "bidirectional": ["yes", None],
                             "num_buckets": NOT_INTS + [None, 1, 0], "max_distance": ["3", 2.5, None, -(2**70), 0]})

    def check(out: np.ndarray) -> None:
        assert out.shape == rel.shape and out.dtype == np.int64
        assert np.all((out >= 0) & (out < kw["num_buckets"])), "a bucket out of range"
        for x, got in zip(rel.tolist(), out.tolist()):
            if abs(x) < 2**31 and kw["num_buckets"] < 2**20:
                assert got == ref.t5_bucket(x, bidirectional, kw["num_buckets"], kw["max_distance"])

    classify(Call(lambda: attnkit.relative_position_bucket(**kw), tuple(kw), check, bad, describe(kw)))


@given(st.data())
@FUZZ
def test_fuzz_relative_position_bias(data):
    heads = data.draw(st.integers(0, 3))
    table = floats(data, (32, heads), data.draw(st.sampled_from([np.float32, np.float64])))
    kw: dict[str, Any] = {"q_len": data.draw(st.integers(0, 9)), "k_len": data.draw(st.integers(0, 9)), "table": table}
    bad = corrupt(data, kw, {"q_len": NOT_INTS + [None, -1], "k_len": NOT_INTS + [None, -5],
                             "table": REQUIRED + [np.zeros((16, 2), np.float32), np.zeros((32, 2), int)]})

    def check(out: np.ndarray) -> None:
        q, k = kw["q_len"], kw["k_len"]
        want = np.zeros((heads, q, k), table.dtype)
        for i in range(q):
            for j in range(k):
                want[:, i, j] = table[ref.t5_bucket(j - i)]
        assert out.tobytes() == want.tobytes()

    classify(Call(lambda: attnkit.relative_position_bias(**kw), tuple(kw), check, bad, describe(kw)))


# --- attention -------------------------------------------------------------------------------

@given(st.data())
@FUZZ
def test_fuzz_scaled_dot_product_attention(data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64, *HALF_DTYPES]))
    b, hkv, group = data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    hq = hkv * group
    length, s = data.draw(st.integers(0, 20)), data.draw(st.integers(0, 140))
    e, ev = data.draw(st.integers(0, 9)), data.draw(st.sampled_from([0, 1, 5, 16, 17, 32]))
    q, k, v = (floats(data, shape, dtype, True) for shape in ((b, hq, length, e), (b, hkv, s, e), (b, hkv, s, ev)))
    half = dtype in HALF_DTYPES
    mixed = half and data.draw(st.booleans(), label="float32 queries over a 16-bit cache")
    if mixed:
        q = q.astype(np.float32)
    out_dtype = q.dtype
    ours: dict[str, Any] = {"enable_gqa": group > 1}
    theirs: dict[str, Any] = {}
    if data.draw(st.booleans(), label="causal"):
        ours["is_causal"] = theirs["causal"] = True
    if data.draw(st.booleans(), label="alignment"):
        ours["causal_alignment"] = theirs["alignment"] = "bottom_right"
    if data.draw(st.booleans(), label="window"):
        ours["window"] = theirs["window"] = tuple(data.draw(st.one_of(st.none(), st.integers(0, 150))) for _ in range(2))
    if data.draw(st.booleans(), label="key mask"):
        ours["key_mask"] = theirs["key_mask"] = np.random.default_rng(1).random((b, s)) < 0.7
    if data.draw(st.booleans(), label="bool mask"):
        ours["attn_mask"] = theirs["bool_mask"] = memory_layout(data, np.random.default_rng(2).random((1, hq, length, s)) < 0.8)
    elif data.draw(st.booleans(), label="float mask"):
        fm = floats(data, (length, s), q.dtype)
        fm[fm > 1.5] = -np.inf
        ours["attn_mask"] = memory_layout(data, fm)
        theirs["float_mask"] = fm
    if data.draw(st.booleans(), label="alibi"):
        ours["alibi_slopes"] = theirs["alibi"] = attnkit.alibi_slopes(hq)
    if data.draw(st.booleans(), label="softcap"):
        ours["softcap"] = theirs["softcap"] = data.draw(st.floats(0.5, 50))
    if data.draw(st.booleans(), label="scale"):
        ours["scale"] = theirs["scale"] = data.draw(st.floats(-4, 4))
    layout = data.draw(st.sampled_from(["bhsd", "bshd"]))
    args = [q, k, v] if layout == "bhsd" else [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    args = [memory_layout(data, x) for x in args]
    kw: dict[str, Any] = {"query": args[0], "key": args[1], "value": args[2], "layout": layout, "return_lse": True,
                          "return_weights": data.draw(st.booleans()), **ours}
    bad = corrupt(data, kw, {
        "query": REQUIRED + [np.zeros(q.shape, np.int32), np.zeros(q.shape, np.float64 if half else np.float16),
                             np.zeros(1)],
        "key": [k.astype(np.float64 if dtype in (np.float32, *HALF_DTYPES) else np.float32)],
        "attn_mask": NOT_ARRAYS + [np.zeros((3, 3, 3, 3, 7), bool), np.zeros((length, s), np.int64)],
        "key_mask": [np.ones((b, s + 1), bool), np.ones((b, s), np.float32)],
        "scale": NOT_REALS + ([1e39] if dtype != np.float64 else []), "softcap": NOT_REALS + [0.0, -1.0],
        "window": [(-1, 0), (1, 2, 3), "x", (0.5, 1)], "is_causal": [np.array([1, 0]), "yes", None],
        "dropout_p": [0.1, np.ones(2), "0"], "causal_alignment": ["bottom", None], "layout": ["bsdh", 1],
        "alibi_slopes": [np.full(hq, np.nan), np.ones(hq + 1)], "return_lse": [None, np.ones(2)],
        "enable_gqa": ["yes", np.ones(3)],
    })

    def check(result: tuple[np.ndarray, ...]) -> None:
        out, lse = result[0], result[1]
        if layout == "bshd":
            out = out.transpose(0, 2, 1, 3)
        want, want_lse, want_w, score_max = ref.attention(q, k, v, **theirs)
        nan_rows = np.isnan(want).any(axis=-1) | np.isnan(want_lse)
        assert np.array_equal(np.isnan(out).any(axis=-1), nan_rows) or not np.isfinite(q).all() or not np.isfinite(k).all()
        finite = ~(nan_rows[..., None] | ~np.isfinite(want))
        vmax = np.abs(np.nan_to_num(v, posinf=0, neginf=0)).max(initial=0.0)
        bound = 4 * eps(out_dtype) * max(vmax, 1.0) * (1 + np.nan_to_num(score_max).max(initial=0.0) + 50)
        err = np.abs(np.where(finite, out.astype(np.float64) - want, 0))
        assert np.all(err <= bound), f"error {err.max():.3e} above {bound:.3e}"
        assert out.dtype == out_dtype and lse.shape == want_lse.shape
        assert lse.dtype == (np.float32 if half else dtype)

    all_finite = all(np.isfinite(x).all() for x in (q, k, v))
    check_fn = check if all_finite else (lambda result: None)  # NaN propagation is tested in test_attention
    classify(Call(lambda: attnkit.scaled_dot_product_attention(**kw), tuple(kw) + ("dropout_p", "attn_mask"),
                  check_fn, bad, describe(kw)))


# --- the layer and the thread pool -------------------------------------------------------------

@given(st.data())
@FUZZ
def test_fuzz_multihead_attention(data):
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    embed = heads * head_dim
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    w = [(rng.standard_normal((embed, embed)) / math.sqrt(embed)).astype(dtype) for _ in range(4)]
    batch_first = data.draw(st.booleans())
    n, length = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 6))
    x = rng.standard_normal((n, length, embed) if batch_first else (length, n, embed)).astype(dtype)
    kpm = rng.random((n, length)) < 0.3
    init: dict[str, Any] = {"num_heads": heads, "batch_first": batch_first}
    call: dict[str, Any] = {"query": x, "key_padding_mask": kpm, "need_weights": data.draw(st.booleans()),
                            "is_causal": data.draw(st.booleans())}
    bad = corrupt(data, call, {"query": REQUIRED + [np.zeros(x.shape, np.int32), x[..., :-1]],
                               "key_padding_mask": [np.zeros((n + 1, length + 1), bool), np.zeros((n, length), np.int64)],
                               "attn_mask": [np.zeros((length + 1, length), bool), np.zeros((length, length), np.int8)],
                               "need_weights": [np.ones(2), "yes"], "average_attn_weights": [None, np.ones(2)]})
    if bad is None:
        bad = corrupt(data, init, {"num_heads": NOT_INTS + [None, 0, embed + 1], "batch_first": ["no", None, np.ones(2)]})

    def run() -> Any:
        return attnkit.MultiheadAttention(*w, **init)(**call)

    def check(result: tuple[np.ndarray, Any]) -> None:
        out = result[0] if batch_first else result[0].transpose(1, 0, 2)
        xb = x if batch_first else x.transpose(1, 0, 2)
        split = lambda y: y.reshape(n, length, heads, head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        qp, kp, vp = (split(xb.astype(np.float64) @ wi.T.astype(np.float64)) for wi in w[:3])
        att = ref.attention(qp, kp, vp, key_mask=~kpm, causal=call["is_causal"])[0]
        want = att.transpose(0, 2, 1, 3).reshape(n, length, embed) @ w[3].T.astype(np.float64)
        assert np.allclose(out, want, rtol=0, atol=200 * np.finfo(dtype).eps), "differs from the reference"

    classify(Call(run, tuple(init) + tuple(call) + ("attn_mask", "average_attn_weights", "key", "value", "q_weight", "num_kv_heads"), check, bad,
                  describe({**init, **call})))


@given(st.data())
@FUZZ
def test_fuzz_threads(data):
    kw: dict[str, Any] = {"n": data.draw(st.integers(1, 8))}
    bad = corrupt(data, kw, {"n": NOT_INTS + [None, 0, -1, 2**64, attnkit.MAX_THREADS + 1, True]})

    def run() -> int:
        attnkit.set_num_threads(**kw)
        return attnkit.get_num_threads()

    def check(got: int) -> None:
        assert got == kw["n"]

    classify(Call(run, ("n",), check, bad, describe(kw)))
