"""The rest of a transformer block: layer_norm, rms_norm, gelu and silu_mul against float64
references (each output the rounded float64 value: within half a unit in the last place, plus the
float64 evaluation's own error), the same bits for any thread count and code path, PyTorch's
meaning, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

import attnkit
from attnkit import _core
from conftest import layouts
import reference as ref

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases skip
    ml_dtypes = None
    BF16 = None

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
NARROW = [
    pytest.param(F32, id="float32"),
    pytest.param(F16, id="float16"),
    pytest.param(BF16, id="bfloat16", marks=pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes")),
]
ALL = [pytest.param(F64, id="float64"), *NARROW]


def ulp(x, dtype):
    """The spacing of ``dtype``'s values at the float64 values ``x`` (subnormals included)."""
    info = ml_dtypes.finfo(dtype) if ml_dtypes is not None else np.finfo(dtype)
    _, e = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(1.0, e - 1 - int(info.nmant)), float(info.smallest_subnormal))


def assert_rounded_once(out, want, dtype, rel=1e-9):
    """``out`` is ``want`` (float64) rounded to ``dtype``: within half a unit in the last place,
    plus ``rel`` relative for the float64 evaluation (1e-10 or better in the kernels). Returns the
    worst error in units in the last place."""
    assert out.dtype == dtype
    err = np.abs(out.astype(np.float64) - want)
    units = ulp(want, dtype)
    assert (err <= 0.5 * units + rel * np.abs(want)).all(), f"worst {np.max(err / units):.4f} ulp"
    return float(np.max(err / units, initial=0.0))


def sample(shape, dtype, seed=0, spread=3.0):
    x = np.random.default_rng(seed).standard_normal(shape) * spread
    return x.astype(dtype)


# -- elementwise -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_is_the_formula_rounded_once(dtype, approximate):
    # Normal samples and a dense sweep of both tails (up to where GELU underflows to zero).
    x = np.concatenate([sample(20_000, dtype).ravel(), np.linspace(-16, 16, 20_001).astype(dtype)])
    want = ref.gelu(x.astype(np.float64), approximate)
    assert_rounded_once(attnkit.gelu(x, approximate), want, dtype)


def test_gelu_float64_within_a_few_ulp_scaled_by_the_exponent():
    x = np.linspace(-35, 35, 40_001)
    for approximate, exponent in (("none", x**2 / 2), ("tanh", 2 * np.abs(0.7978845608 * (x + 0.044715 * x**3)))):
        got, want = attnkit.gelu(x, approximate), ref.gelu(x, approximate)
        nz = np.abs(want) > 1e-290  # below float64's normal range, exp flushes to zero
        rel = np.abs(got[nz] - want[nz]) / np.abs(want[nz])
        # A relative rounding error of the argument of exp (1e-16) is multiplied by its size, up
        # to 700 in the left tail, in the kernel and in the reference alike.
        assert (rel <= 1e-14 + 1e-15 * exponent[nz]).all(), (approximate, rel.max())


@pytest.mark.parametrize("dtype", NARROW)
def test_silu_mul_is_the_formula_rounded_once(dtype):
    g, u = sample((300, 70), dtype, 1), sample((300, 70), dtype, 2)
    assert_rounded_once(attnkit.silu_mul(g, u), ref.silu_mul(g, u), dtype)


@pytest.mark.parametrize("dtype", ALL)
def test_elementwise_special_values(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], dtype)
    g = attnkit.gelu(x)
    assert np.isnan(g[0]) and g[1] == np.inf and np.isnan(g[2])  # NaN at -inf, as in PyTorch
    assert g[3] == 0 and np.signbit(g[4]) and g[3].dtype == dtype
    s = attnkit.silu_mul(x, np.ones_like(x))
    assert np.isnan(s[0]) and s[1] == np.inf and np.isnan(s[2]) and s[3] == 0


# -- norms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("n", [1, 7, 384, 1000])
def test_layer_norm_is_the_formula_rounded_once(dtype, n):
    x = sample((5, 3, n), dtype) + np.asarray(2.0, dtype)  # a mean away from zero
    w, b = sample(n, np.float32, 3), sample(n, np.float32, 4)
    want = ref.layer_norm(x, 1, w, b, 1e-5)
    assert_rounded_once(attnkit.layer_norm(x, n, w, b), want, dtype)
    assert_rounded_once(attnkit.layer_norm(x, (n,)), ref.layer_norm(x, 1), dtype)


@pytest.mark.parametrize("dtype", NARROW)
def test_rms_norm_is_the_formula_rounded_once(dtype):
    x, w = sample((6, 4, 96), dtype), sample(96, np.float32, 5)
    assert_rounded_once(attnkit.rms_norm(x, 96, w, 1e-6), ref.rms_norm(x, 1, w, 1e-6), dtype)
    # eps=None is numpy.finfo(dtype).eps, as PyTorch's finfo(dtype).eps.
    eps = float((ml_dtypes.finfo if ml_dtypes else np.finfo)(dtype).eps)
    assert_rounded_once(attnkit.rms_norm(x, 96), ref.rms_norm(x, 1, None, eps), dtype)


def test_norms_over_several_trailing_axes_and_float64():
    x = sample((4, 3, 5, 6), F64)
    w, b = sample((5, 6), F64, 1), sample((5, 6), F64, 2)
    np.testing.assert_allclose(attnkit.layer_norm(x, (5, 6), w, b), ref.layer_norm(x, 2, w, b), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(attnkit.rms_norm(x, [5, 6], w, 1e-6), ref.rms_norm(x, 2, w, 1e-6), rtol=1e-13)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_residual_returns_the_sum_numpy_gives_and_its_norm(dtype, kind):
    x, r = sample((7, 40), dtype, 1), sample((7, 40), dtype, 2)
    w = sample(40, np.float32, 3)
    if kind == "layer":
        y, h = attnkit.layer_norm(x, 40, w, w, 1e-5, residual=r)
        alone = attnkit.layer_norm(x + r, 40, w, w, 1e-5)
    else:
        y, h = attnkit.rms_norm(x, 40, w, 1e-6, residual=r)
        alone = attnkit.rms_norm(x + r, 40, w, 1e-6)
    assert h.dtype == dtype and (h.view(np.uint8) == (x + r).view(np.uint8)).all()
    assert (y.view(np.uint8) == alone.view(np.uint8)).all()


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_out_takes_the_normalized_rows(dtype, kind):
    x, r = sample((7, 40), dtype, 4), sample((7, 40), dtype, 5)
    w = sample(40, np.float32, 6)
    norm = (lambda a, **kw: attnkit.layer_norm(a, 40, w, w, 1e-5, **kw)) if kind == "layer" else (
        lambda a, **kw: attnkit.rms_norm(a, 40, w, 1e-6, **kw))
    buffer = np.zeros((9, 40), dtype)[1:8]  # rows of a bigger buffer
    assert norm(x, out=buffer) is buffer
    assert (buffer.view(np.uint8) == norm(x).view(np.uint8)).all()
    y, h = norm(x, residual=r, out=buffer)
    want_y, want_h = norm(x, residual=r)
    assert y is buffer and (y.view(np.uint8) == want_y.view(np.uint8)).all()
    assert h is not buffer and (h.view(np.uint8) == want_h.view(np.uint8)).all()
    both = np.zeros((2, 7, 40), dtype)
    first, second = both
    y, h = norm(x, residual=r, out=(first, second))  # a pair: the norm's and the sum's
    assert y is first and h is second
    assert (both[0].view(np.uint8) == want_y.view(np.uint8)).all()
    assert (both[1].view(np.uint8) == want_h.view(np.uint8)).all()
    sum_only = np.zeros((7, 40), dtype)
    y, h = norm(x, residual=r, out=(None, sum_only))
    assert h is sum_only and (y.view(np.uint8) == want_y.view(np.uint8)).all()
    assert (sum_only.view(np.uint8) == want_h.view(np.uint8)).all()


def test_out_pairs_are_refused_where_they_cannot_be_written():
    x = np.ones((3, 4), np.float32)
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"out\[1\]: shares memory with an input or another output"):
        attnkit.layer_norm(x, 4, residual=x + 1, out=(a, a))
    with pytest.raises(ValueError, match=r"out\[0\]: shares memory with an input or another output"):
        attnkit.rms_norm(x, 4, residual=a, out=(a, None))
    with pytest.raises(ValueError, match=r"out\[1\]: expected shape \(3, 4\)"):
        attnkit.layer_norm(x, 4, residual=x + 1, out=(None, np.zeros((3, 5), np.float32)))
    with pytest.raises(TypeError, match=r"out\[0\]: expected a numpy array or None"):
        attnkit.layer_norm(x, 4, residual=x + 1, out=([0.0], None))
    with pytest.raises(ValueError, match="out: expected an array or a pair of arrays"):
        attnkit.layer_norm(x, 4, residual=x + 1, out=(a, None, None))
    with pytest.raises(TypeError, match="out: expected a numpy array or None"):
        attnkit.layer_norm(x, 4, out=(a, None))  # a pair only with a residual


def test_a_nan_stays_in_its_row():
    x = sample((4, 16), F32)
    x[2, 5] = np.nan
    for y in (attnkit.layer_norm(x, 16), attnkit.rms_norm(x, 16)):
        assert np.isnan(y[2]).all() and not np.isnan(y[[0, 1, 3]]).any()


def test_constant_rows_normalize_to_the_bias():
    x = np.full((3, 8), 5.0, np.float32)
    b = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(attnkit.layer_norm(x, 8, None, b), np.broadcast_to(b, (3, 8)))


# -- invariance ----------------------------------------------------------------------------------


def _calls(dtype):
    x = sample((67, 129), dtype, 7)  # rows and lengths that split unevenly into blocks and lanes
    r = sample((67, 129), dtype, 8)
    w = sample(129, np.float32, 9)
    return {
        "gelu": lambda: attnkit.gelu(x),
        "gelu_tanh": lambda: attnkit.gelu(x, "tanh"),
        "silu_mul": lambda: attnkit.silu_mul(x, r),
        "layer_norm": lambda: attnkit.layer_norm(x, 129, w, w),
        "layer_norm_residual": lambda: attnkit.layer_norm(x, 129, w, residual=r)[0],
        "rms_norm_residual": lambda: attnkit.rms_norm(x, 129, w, 1e-5, residual=r)[0],
    }


@pytest.mark.parametrize("dtype", ALL)
def test_same_bits_for_any_thread_count_and_code_path(dtype, threads):
    big = sample((300, 300), dtype)  # above the size where calls go parallel
    for name, call in [*_calls(dtype).items(), ("big gelu", lambda: attnkit.gelu(big)),
                       ("big norm", lambda: attnkit.rms_norm(big, 300))]:
        threads(1)
        want = call().view(np.uint8)
        threads(2)
        assert (call().view(np.uint8) == want).all(), name
        threads(1)
        try:
            _core._set_simd_enabled(True, avx512=False)
            assert (call().view(np.uint8) == want).all(), f"{name} without AVX-512"
            _core._set_simd_enabled(False)
            assert (call().view(np.uint8) == want).all(), f"{name} portable"
        finally:
            _core._set_simd_enabled(True)


def test_any_memory_layout_gives_the_contiguous_result():
    x = sample((6, 10), F32)
    want = attnkit.layer_norm(x, 10)
    for name, variant in layouts(x):
        np.testing.assert_array_equal(attnkit.layer_norm(variant, 10), want, err_msg=name)
        np.testing.assert_array_equal(attnkit.gelu(variant), attnkit.gelu(x), err_msg=name)


def test_empty_inputs_give_empty_outputs():
    assert attnkit.gelu(np.zeros((0, 3), np.float32)).shape == (0, 3)
    assert attnkit.layer_norm(np.zeros((0, 4), np.float32), 4).shape == (0, 4)
    assert attnkit.silu_mul(np.zeros(0), np.zeros(0)).shape == (0,)


# -- PyTorch's meaning ---------------------------------------------------------------------------


def test_torch_names_mean_what_torch_means():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = sample((33, 64), F32)
    t = torch.from_numpy(x)
    w, b = sample(64, F32, 1), sample(64, F32, 2)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    close = dict(rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(attnkit.gelu(x), F.gelu(t).numpy(), **close)
    np.testing.assert_allclose(attnkit.gelu(x, "tanh"), F.gelu(t, approximate="tanh").numpy(), **close)
    np.testing.assert_allclose(attnkit.silu_mul(x, x[::-1]), (F.silu(t) * t.flip(0)).numpy(), **close)
    np.testing.assert_allclose(attnkit.layer_norm(x, 64, w, b), F.layer_norm(t, (64,), tw, tb).numpy(), **close)
    np.testing.assert_allclose(attnkit.layer_norm(x, 64, w, b, 1e-3), F.layer_norm(t, (64,), tw, tb, 1e-3).numpy(), **close)
    np.testing.assert_allclose(attnkit.rms_norm(x, 64, w), F.rms_norm(t, (64,), tw).numpy(), **close)
    np.testing.assert_allclose(attnkit.rms_norm(x, 64, w, 1e-5), F.rms_norm(t, (64,), tw, 1e-5).numpy(), **close)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda x: attnkit.layer_norm(x, 5), ValueError, "normalized_shape"),
        (lambda x: attnkit.layer_norm(x, (2, 4)), ValueError, "normalized_shape"),
        (lambda x: attnkit.layer_norm(x, (1, 3, 4)), ValueError, "normalized_shape"),
        (lambda x: attnkit.layer_norm(x, 0), ValueError, "normalized_shape"),
        (lambda x: attnkit.layer_norm(x, 4.0), TypeError, "normalized_shape"),
        (lambda x: attnkit.layer_norm(x, 4, np.ones(5)), ValueError, "weight"),
        (lambda x: attnkit.layer_norm(x, 4, None, np.ones((1, 4))), ValueError, "bias"),
        (lambda x: attnkit.layer_norm(x, 4, np.ones(4, np.int32)), TypeError, "weight"),
        (lambda x: attnkit.layer_norm(x, 4, eps=-1.0), ValueError, "eps"),
        (lambda x: attnkit.layer_norm(x, 4, eps=float("nan")), ValueError, "eps"),
        (lambda x: attnkit.rms_norm(x, 4, eps="a"), TypeError, "eps"),
        (lambda x: attnkit.rms_norm(x, 4, residual=x.astype(np.float64)), TypeError, "residual"),
        (lambda x: attnkit.rms_norm(x, 4, residual=x[:2]), ValueError, "residual"),
        (lambda x: attnkit.layer_norm(x.astype(np.int64), 4), TypeError, "x"),
        (lambda x: attnkit.gelu(x, "erf"), ValueError, "approximate"),
        (lambda x: attnkit.gelu(np.arange(3)), TypeError, "x"),
        (lambda x: attnkit.silu_mul(x, x[:, :2]), ValueError, "up"),
        (lambda x: attnkit.silu_mul(x, x.astype(np.float64)), TypeError, "up"),
        (lambda x: attnkit.layer_norm(x, 4, out=np.zeros((3, 4))), TypeError, "out: expected a numpy array of dtype float32"),
        (lambda x: attnkit.layer_norm(x, 4, out=np.zeros((4, 3), np.float32)), ValueError, r"out: expected shape \(3, 4\)"),
        (lambda x: attnkit.rms_norm(x, 4, out=np.zeros((4, 3), np.float32).T), ValueError, "out: expected a C-contiguous"),
        (lambda x: attnkit.rms_norm(x, 4, out=x), ValueError, "out: shares memory with an input"),
        (lambda x: attnkit.layer_norm(x, 4, residual=x + 1, out=x), ValueError, "out: shares memory with an input"),
        (lambda x: attnkit.layer_norm(x, 4, out="y"), TypeError, "out: expected a numpy array or None"),
    ],
)
def test_bad_input_raises_a_clear_error(call, exc, pattern):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(exc, match=pattern):
        call(x)
