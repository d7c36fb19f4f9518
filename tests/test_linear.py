"""Bf16Linear and F32Linear: attnkit's matrix products against float64 references of their
definitions (bfloat16: the inputs rounded to bfloat16, then float32 sums; float32: blocked sums of
fused multiply-adds), the same bits for any thread count, code path and set of rows, bfloat16
inputs and outputs, pickling, and clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import attnkit
from attnkit import _core
from conftest import layouts

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 input cases skip
    ml_dtypes = None
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="needs ml_dtypes")


def to_bf16(x):
    """float32 ``x`` rounded to bfloat16 (nearest even; subnormals to zero, as the instruction
    reads them), as float32 values: the reference's own rounding, in NumPy."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = np.where(bits & 0x7F800000 == 0, bits & 0x80000000, bits)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def reference(x, w, b):
    """The definition in float64, and a bound on float32 summation's error: one rounding per
    product added (2 per pair) and one for the bias, each at most 2^-24 of the running sum."""
    xb, wb = to_bf16(x).astype(np.float64), to_bf16(w).astype(np.float64)
    exact = xb @ wb.T + (0.0 if b is None else b.astype(np.float32).astype(np.float64))
    k = x.shape[-1]
    bound = (k + 2) * 2.0**-24 * (np.abs(xb) @ np.abs(wb).T + np.abs(exact)) + 1e-30
    return exact, bound


def sample(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 7, 17), (7, 33, 70), (50, 64, 129), (130, 384, 200),
                                   (1, 576, 960), (2, 1, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_definition(m, k, n, bias):
    x, w = sample((m, k), 1), sample((n, k), 2)
    b = sample(n, 3) if bias else None
    layer = attnkit.Bf16Linear(w, b)
    out = layer(x)
    assert out.dtype == np.float32 and out.shape == (m, n)
    exact, bound = reference(x, w, b)
    assert (np.abs(out - exact) <= bound).all()
    np.testing.assert_array_equal(layer.weight, to_bf16(w))


def test_error_against_float32_inputs_is_bfloat16s():
    """What rounding the inputs costs: within a few 2^-9 of the row's scale, far beyond float32."""
    x, w = sample((64, 384), 4), sample((96, 384), 5)
    out = attnkit.Bf16Linear(w)(x)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    rel = np.abs(out - exact) / scale
    assert rel.max() < 2.0**-7 and rel.max() > 2.0**-20


def test_leading_axes_and_empty_shapes():
    w = sample((20, 6), 6)
    layer = attnkit.Bf16Linear(w)
    x = sample((2, 3, 6), 7)
    np.testing.assert_array_equal(layer(x), layer(x.reshape(6, 6)).reshape(2, 3, 20))
    np.testing.assert_array_equal(layer(x[0, 0]), layer(x[:1, :1])[0, 0])
    assert layer(np.zeros((0, 6), np.float32)).shape == (0, 20)
    assert attnkit.Bf16Linear(np.zeros((0, 6)))(x).shape == (2, 3, 0)
    assert attnkit.Bf16Linear(np.zeros((0, 6))).weight.shape == (0, 6)
    zero_k = attnkit.Bf16Linear(np.zeros((4, 0)), np.arange(4.0))
    assert zero_k.weight.shape == (4, 0)
    np.testing.assert_array_equal(zero_k(np.zeros((2, 0), np.float32)), np.tile(np.arange(4.0), (2, 1)))


def assert_same_bits_everywhere(layer_type, seed, threads, *, one_row=False):
    """``layer_type``'s outputs, rows split and columns split, at 2 threads and on the AVX2 and
    portable paths against 1 thread's bits (and, ``one_row``, a row computed alone)."""
    cases = [(sample((300, 200), seed), sample((70, 200), seed + 1)),  # rows split
             (sample((2, 200), seed + 2), sample((1000, 200), seed + 3))]  # columns split
    for x, w in cases:
        layer = layer_type(w, sample(w.shape[0], seed + 4))
        threads(1)
        want = layer(x).view(np.uint32)
        if one_row:
            np.testing.assert_array_equal(layer(x[1:2]).view(np.uint32), want[1:2], err_msg="one row alone")
        threads(2)
        np.testing.assert_array_equal(layer(x).view(np.uint32), want)
        threads(1)
        try:
            _core._set_simd_enabled(True, avx512=False)
            np.testing.assert_array_equal(layer(x).view(np.uint32), want, err_msg="without AVX-512")
            _core._set_simd_enabled(False)
            np.testing.assert_array_equal(layer(x).view(np.uint32), want, err_msg="portable")
        finally:
            _core._set_simd_enabled(True)


def test_same_bits_for_any_thread_count_and_code_path(threads):
    assert_same_bits_everywhere(attnkit.Bf16Linear, 8, threads)


def test_subnormal_and_tiny_sums_follow_the_instruction():
    """Subnormal inputs read as zero; sums below float32's smallest normal flush to zero, on every
    path alike."""
    tiny = np.float32(2.0**-130)
    x = np.array([[tiny, 1.0, 2.0**-70, 2.0**-60]], np.float32)
    w = np.array([[1.0, 0.0, 2.0**-60, 0.0], [1.0, 2.0**-127, 0.0, 2.0**-66]], np.float32)
    layer = attnkit.Bf16Linear(w)
    out = layer(x)
    try:
        _core._set_simd_enabled(False)
        np.testing.assert_array_equal(layer(x).view(np.uint32), out.view(np.uint32))
    finally:
        _core._set_simd_enabled(True)
    # 2^-130 reads as 0; 2^-130 (the product) flushes; 2^-126 is the smallest normal and stays.
    np.testing.assert_array_equal(out, [[0.0, 2.0**-126]])


def test_non_finite_values_propagate():
    w = sample((5, 4), 13)
    x = np.ones((3, 4), np.float32)
    x[0, 1], x[1, 2] = np.nan, np.inf
    out = attnkit.Bf16Linear(w)(x)
    assert np.isnan(out[0]).all()
    assert not np.isfinite(out[1]).any()
    assert np.isfinite(out[2]).all()


@needs_bf16
def test_bfloat16_input_gives_the_float32_result_rounded():
    x, w, b = sample((9, 40), 14), sample((33, 40), 15), sample(33, 16)
    layer = attnkit.Bf16Linear(w, b)
    xb = x.astype(BF16)
    out = layer(xb)
    assert out.dtype == BF16
    np.testing.assert_array_equal(out, layer(xb.astype(np.float32)).astype(BF16))
    # And float32 x is read as its bfloat16 rounding.
    np.testing.assert_array_equal(layer(x), layer(xb.astype(np.float32)))
    # A bfloat16 weight is held as it is.
    np.testing.assert_array_equal(attnkit.Bf16Linear(w.astype(BF16)).weight, w.astype(BF16).astype(np.float32))


def test_any_weight_dtype_is_rounded_once():
    # 1 + 2^-8 + 2^-30 is above the midpoint between bfloat16's 1 and 1 + 2^-7: float64 rounds it
    # up, and so must the layer (rounding through float32 first would give 1 + 2^-8, a tie, to 1).
    w = np.array([[1.0 + 2.0**-8 + 2.0**-30]])
    assert attnkit.Bf16Linear(w).weight[0, 0] == 1.0 + 2.0**-7
    assert attnkit.Bf16Linear(w.astype(np.float16)).weight[0, 0] == 1.0


def test_any_memory_layout_gives_the_contiguous_result():
    x, w = sample((6, 10), 17), sample((12, 10), 18)
    layer = attnkit.Bf16Linear(w)
    want = layer(x)
    for name, variant in layouts(x):
        np.testing.assert_array_equal(layer(variant), want, err_msg=name)
    for name, variant in layouts(w):
        np.testing.assert_array_equal(attnkit.Bf16Linear(variant)(x), want, err_msg=name)


def test_pickles():
    layer = attnkit.Bf16Linear(sample((30, 8), 19), sample(30, 20))
    x = sample((4, 8), 21)
    again = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(again(x), layer(x))
    assert repr(again) == "Bf16Linear(in_features=8, out_features=30, bias=True)"


def test_errors_name_the_argument():
    w = sample((5, 4), 22)
    with pytest.raises(ValueError, match="weight: expected 2 dimensions"):
        attnkit.Bf16Linear(w[0])
    with pytest.raises(TypeError, match="weight"):
        attnkit.Bf16Linear(np.ones((5, 4), np.int64))
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        attnkit.Bf16Linear(w, np.ones(4))
    layer = attnkit.Bf16Linear(w)
    with pytest.raises(ValueError, match="x: expected a last axis of 4"):
        layer(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="x: expected a last axis of 4"):
        layer(np.float32(1.0))
    with pytest.raises(TypeError, match="x: expected a float32 or bfloat16 array, got dtype float64"):
        layer(np.ones((2, 4)))
    with pytest.raises(TypeError, match="x"):
        layer(np.ones((2, 4), np.int32))
    with pytest.raises(TypeError, match="packed: expected a uint32"):
        _core.linear_bf16(np.ones((2, 4), np.float32), np.ones(64, np.int32), None, 5, 4)
    with pytest.raises(ValueError, match="packed"):
        _core.linear_bf16(np.ones((2, 4), np.float32), np.ones(10, np.uint32), None, 5, 4)
    with pytest.raises(ValueError, match="bias"):
        _core.linear_bf16(np.ones((2, 4), np.float32), layer._packed, np.ones(3, np.float32), 5, 4)


def test_gelu_epilogue_is_within_1e_6_of_the_exact_gelu():
    """The fused GELU, on inputs a 1 x 1 identity weight passes exactly (bfloat16 values), against
    x·Φ(x) in float64 (math.erfc), over [-14, 14] and powers of two down to the smallest normal."""
    import math

    grid = to_bf16(np.linspace(-14, 14, 40001, dtype=np.float32))
    powers = np.float32(2.0) ** np.arange(-126, 4, dtype=np.float32)
    x = np.unique(np.concatenate([grid, powers, -powers]))
    out = attnkit.Bf16Linear(np.ones((1, 1)))(x[:, None], activation="gelu")[:, 0]
    want = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])
    normal = np.abs(want) >= 2.0**-126
    rel = np.abs(out[normal] - want[normal]) / np.abs(want[normal])
    assert rel.max() <= 1e-6
    assert (np.abs(out[~normal] - want[~normal]) <= 2.0**-126).all()  # below the normal range: absolute
    # Whole strips of 64 columns take the epilogue four strips at a time: the same bits, for both
    # weights' dtypes.
    for layer in (attnkit.Bf16Linear(np.ones((64, 1))), attnkit.F32Linear(np.ones((64, 1)))):
        wide = layer(x[:, None], activation="gelu")
        np.testing.assert_array_equal(wide.view(np.uint32), np.repeat(out[:, None], 64, axis=1).view(np.uint32))
    special = attnkit.Bf16Linear(np.ones((1, 1)))(np.array([[np.nan], [np.inf], [-np.inf]], np.float32),
                                                  activation="gelu")
    assert np.isnan(special[0, 0]) and special[1, 0] == np.inf and np.isnan(special[2, 0])


def test_gelu_epilogue_applies_after_the_bias_on_every_path(threads):
    x, w, b = sample((120, 64), 23), sample((90, 64), 24), sample(90, 25)
    layer = attnkit.Bf16Linear(w, b)
    plain = layer(x)
    fused = layer(x, activation="gelu")
    import math

    want = np.vectorize(lambda v: v * 0.5 * math.erfc(-v / math.sqrt(2.0)))(plain.astype(np.float64))
    assert (np.abs(fused - want) <= 1e-6 * np.abs(want) + 1e-37).all()
    threads(2)
    np.testing.assert_array_equal(layer(x, activation="gelu").view(np.uint32), fused.view(np.uint32))
    np.testing.assert_array_equal(layer(x[:2], activation="gelu"), fused[:2])  # columns split
    threads(1)
    try:
        _core._set_simd_enabled(False)
        np.testing.assert_array_equal(layer(x, activation="gelu").view(np.uint32), fused.view(np.uint32))
    finally:
        _core._set_simd_enabled(True)


@needs_bf16
def test_out_dtype_is_chosen_apart_from_the_input():
    x, w, b = sample((7, 20), 26), sample((18, 20), 27), sample(18, 28)
    layer = attnkit.Bf16Linear(w, b)
    full = layer(x)
    np.testing.assert_array_equal(layer(x, out_dtype=BF16), full.astype(BF16))
    np.testing.assert_array_equal(layer(x.astype(BF16), out_dtype=np.float32), full)
    np.testing.assert_array_equal(layer(x, out_dtype="float32"), full)
    np.testing.assert_array_equal(layer(x, activation="gelu", out_dtype=BF16),
                                  layer(x, activation="gelu").astype(BF16))


def test_epilogue_and_out_dtype_errors():
    layer = attnkit.Bf16Linear(sample((5, 4), 29))
    x = sample((2, 4), 30)
    with pytest.raises(ValueError, match="activation: expected one of 'gelu'"):
        layer(x, activation="relu")
    with pytest.raises(TypeError, match="out_dtype: expected float32 or bfloat16"):
        layer(x, out_dtype=np.float64)
    with pytest.raises(TypeError, match="out_dtype"):
        layer(x, out_dtype="nonsense")


# F32Linear: float32 weights, each output a sum of blocks of 64 fused multiply-adds.

def reference_f32(x, w, b):
    """The exact result in float64, and a bound on the blocked float32 sum's error: at most one
    rounding per product within a block of 64, one per block added to the total and one for the
    bias, each at most 2^-24 of the sums involved."""
    xd, wd = x.astype(np.float64), w.astype(np.float32).astype(np.float64)
    exact = xd @ wd.T + (0.0 if b is None else b.astype(np.float32).astype(np.float64))
    k = x.shape[-1]
    steps = min(k, 64) + -(-k // 64) + 1
    bound = steps * 2.0**-24 * (np.abs(xd) @ np.abs(wd).T + np.abs(exact)) + 1e-30
    return exact, bound


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 7, 17), (7, 33, 70), (50, 64, 129), (130, 384, 200),
                                   (1, 576, 960), (4, 1536, 96), (2, 1, 300)])
@pytest.mark.parametrize("bias", [True, False])
def test_f32_matches_the_definition(m, k, n, bias):
    x, w = sample((m, k), 31), np.random.default_rng(32).standard_normal((n, k))  # a float64 weight
    b = sample(n, 33) if bias else None
    layer = attnkit.F32Linear(w, b)
    out = layer(x)
    assert out.dtype == np.float32 and out.shape == (m, n)
    exact, bound = reference_f32(x, w, b)
    assert (np.abs(out - exact) <= bound).all()
    np.testing.assert_array_equal(layer.weight, w.astype(np.float32))  # rounded once to float32


def test_f32_blocked_sums_keep_long_rows_accurate():
    """k = 4096 of one sign, where a single running sum's error grows with k: the blocks keep it
    near float32's resolution of the result."""
    x, w = np.abs(sample((3, 4096), 34)), np.abs(sample((40, 4096), 35))
    out = attnkit.F32Linear(w)(x)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert (np.abs(out - exact) / exact).max() < 1e-6  # one running sum: 2.3e-6 here; the blocks: 4e-7


def test_f32_same_bits_for_any_thread_count_code_path_and_rows(threads):
    assert_same_bits_everywhere(attnkit.F32Linear, 36, threads, one_row=True)


def test_f32_gelu_epilogue_is_the_bfloat16_layers_and_within_1e_6():
    """The same float32 GELU as Bf16Linear's (checked against x·Φ(x) above), on values both pass
    exactly; and within 1e-6 of x·Φ(x) on float32 values that are not bfloat16 ones."""
    import math

    on_bf16 = to_bf16(np.linspace(-14, 14, 4001, dtype=np.float32))[:, None]
    f32 = attnkit.F32Linear(np.ones((1, 1)))
    np.testing.assert_array_equal(f32(on_bf16, activation="gelu").view(np.uint32),
                                  attnkit.Bf16Linear(np.ones((1, 1)))(on_bf16, activation="gelu").view(np.uint32))
    x = np.linspace(-9, 9, 20001, dtype=np.float32) + np.float32(1e-3)
    out = f32(x[:, None], activation="gelu")[:, 0]
    want = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x.astype(np.float64)])
    assert (np.abs(out - want) <= 1e-6 * np.abs(want)).all()


def test_f32_leading_axes_empty_shapes_and_non_finite_values():
    w = sample((20, 6), 41)
    layer = attnkit.F32Linear(w)
    x = sample((2, 3, 6), 42)
    np.testing.assert_array_equal(layer(x), layer(x.reshape(6, 6)).reshape(2, 3, 20))
    assert layer(np.zeros((0, 6), np.float32)).shape == (0, 20)
    assert attnkit.F32Linear(np.zeros((0, 6)))(x).shape == (2, 3, 0)
    zero_k = attnkit.F32Linear(np.zeros((4, 0)), np.arange(4.0))
    assert zero_k.weight.shape == (4, 0)
    np.testing.assert_array_equal(zero_k(np.zeros((2, 0), np.float32)), np.tile(np.arange(4.0), (2, 1)))
    bad = np.ones((3, 6), np.float32)
    bad[0, 1], bad[1, 2] = np.nan, np.inf
    out = layer(bad)
    assert np.isnan(out[0]).all() and not np.isfinite(out[1]).any() and np.isfinite(out[2]).all()
    for name, variant in layouts(x[0]):
        np.testing.assert_array_equal(layer(variant), layer(x[0]), err_msg=name)


def test_f32_pickles_and_refuses_another_layout():
    layer = attnkit.F32Linear(sample((30, 8), 43), sample(30, 44))
    x = sample((4, 8), 45)
    again = pickle.loads(pickle.dumps(layer))
    np.testing.assert_array_equal(again(x), layer(x))
    assert repr(again) == "F32Linear(in_features=8, out_features=30, bias=True)"
    state = dict(layer.__dict__, _layout=99)
    with pytest.raises(ValueError, match="layout 99"):
        attnkit.F32Linear.__new__(attnkit.F32Linear).__setstate__(state)
    # A Bf16Linear pickled before layouts were recorded has layout 1.
    bf = attnkit.Bf16Linear(sample((30, 8), 43))
    old = {k: v for k, v in bf.__dict__.items() if k != "_layout"}
    revived = attnkit.Bf16Linear.__new__(attnkit.Bf16Linear)
    revived.__setstate__(old)
    np.testing.assert_array_equal(revived(x), bf(x))


def test_f32_errors_name_the_argument():
    w = sample((5, 4), 46)
    with pytest.raises(ValueError, match="weight: expected 2 dimensions"):
        attnkit.F32Linear(w[0])
    with pytest.raises(TypeError, match="weight"):
        attnkit.F32Linear(np.ones((5, 4), np.int64))
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        attnkit.F32Linear(w, np.ones(4))
    layer = attnkit.F32Linear(w)
    with pytest.raises(ValueError, match="x: expected a last axis of 4"):
        layer(np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match="x: expected a float32 array, got dtype float64"):
        layer(np.ones((2, 4)))
    with pytest.raises(ValueError, match="activation: expected one of 'gelu'"):
        layer(np.ones((2, 4), np.float32), activation="relu")
    with pytest.raises(TypeError, match="packed: expected a float32"):
        _core.linear_f32(np.ones((2, 4), np.float32), np.ones(64, np.uint32), None, 5, 4)
    with pytest.raises(ValueError, match="packed"):
        _core.linear_f32(np.ones((2, 4), np.float32), np.ones(10, np.float32), None, 5, 4)
    with pytest.raises(TypeError, match="x: expected a float32"):
        _core.linear_f32(np.ones((2, 4)), layer._packed, None, 5, 4)


# out=: the product written into the caller's buffer.

@pytest.mark.parametrize("make", [attnkit.F32Linear, attnkit.Bf16Linear])
def test_out_is_written_and_returned_with_the_new_arrays_bits(make):
    x, w, b = sample((2, 3, 40), 47), sample((70, 40), 48), sample(70, 49)
    layer = make(w, b)
    for activation in (None, "gelu"):
        buffer = np.full((2, 3, 70), np.nan, np.float32)
        result = layer(x, activation=activation, out=buffer)
        assert result is buffer
        np.testing.assert_array_equal(buffer, layer(x, activation=activation))
    rows = np.full((10, 70), np.nan, np.float32)  # a view of a bigger buffer, as models reuse them
    layer(x[0], out=rows[2:5])
    np.testing.assert_array_equal(rows[2:5], layer(x[0]))
    assert np.isnan(rows[:2]).all() and np.isnan(rows[5:]).all()


@needs_bf16
def test_bf16_out_sets_the_output_dtype():
    x, w = sample((3, 20), 50), sample((9, 20), 51)
    layer = attnkit.Bf16Linear(w)
    buffer = np.zeros((3, 9), BF16)
    assert layer(x, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, layer(x, out_dtype=BF16))
    with pytest.raises(TypeError, match="out: expected a numpy array of dtype float32"):
        layer(x, out_dtype=np.float32, out=buffer)


@pytest.mark.parametrize("make", [attnkit.F32Linear, attnkit.Bf16Linear])
def test_out_errors_name_it(make):
    layer = make(sample((6, 6), 52))
    x = sample((4, 6), 53)
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 6\)"):
        layer(x, out=np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="out: expected"):
        layer(x, out=np.zeros((4, 6), np.float64))
    with pytest.raises(TypeError, match="out: expected a numpy array or None"):
        layer(x, out=[[0.0] * 6] * 4)
    with pytest.raises(ValueError, match="out: expected a C-contiguous"):
        layer(x, out=np.zeros((6, 4), np.float32).T)
    frozen = np.zeros((4, 6), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        layer(x, out=frozen)
    with pytest.raises(ValueError, match="out: shares memory with an input"):
        layer(x, out=x)
    both = np.zeros((8, 6), np.float32)
    with pytest.raises(ValueError, match="out: shares memory with an input"):
        layer(both[:4], out=both[2:6])
    np.testing.assert_array_equal(x, sample((4, 6), 53))  # nothing written on refusal


def test_an_output_too_big_to_allocate_names_out_and_its_shape():
    layer = attnkit.F32Linear(np.ones((1 << 20, 1), np.float32))
    with pytest.raises(MemoryError, match=r"^out \(x.shape\[:-1\] \+ \(out_features,\)\): cannot allocate an "
                                          r"array of shape \(1048576, 1048576\)"):
        layer(np.ones((1 << 20, 1), np.float32))
