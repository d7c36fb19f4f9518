"""float16 and bfloat16 (ml_dtypes) everywhere float32 works: against float64 references from the
same 16-bit inputs, rounded once, the same bits on every path; and clear errors for the small
dtypes attnkit does not compute in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from attnkit import _core
from conftest import layouts
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
sdpa = attnkit.scaled_dot_product_attention


def eps(dtype):
    """The spacing of 1.0 in ``dtype``."""
    return float(ml_dtypes.finfo(dtype).eps)


def qkv(dtype, b=2, hq=4, hkv=2, length=37, s=53, e=16, ev=16, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((b, hq, length, e)) * spread).astype(dtype)
    k = (rng.standard_normal((b, hkv, s, e)) * spread).astype(dtype)
    v = rng.standard_normal((b, hkv, s, ev)).astype(dtype)
    return q, k, v


def ulp(x, dtype):
    """The spacing of ``dtype``'s values around the float64 values ``x`` (subnormals included)."""
    info = ml_dtypes.finfo(dtype)
    _, e = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(1.0, e - 1 - info.nmant), float(info.smallest_subnormal))


def widened(*arrays):
    return tuple(a.astype(np.float32) for a in arrays)


def assert_within_bound(out, q, k, v, out_dtype, **kw):
    """The issue's bound, per (batch, head), against float64 from the same 16-bit inputs:
    ``|out - ref| <= 4 eps(out) max|V| (1 + max|scaled score|)``."""
    want, _, _, score_max = ref.attention(q, k, v, **kw)
    err = np.abs(out.astype(np.float64) - want).max(axis=(2, 3))
    vmax = np.abs(v.astype(np.float64)).max(axis=(2, 3))
    group = q.shape[1] // k.shape[1]
    bound = 4 * eps(out_dtype) * np.repeat(vmax, group, axis=1) * (1 + score_max)
    assert (err <= bound).all(), f"worst error / bound: {(err / bound).max():.3f}"
    return float((err / bound).max())


CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, alignment="bottom_right", window=(9, 2)),
    dict(softcap=5.0, alibi=True),
]


def _call(q, k, v, case, **extra):
    kw = dict(is_causal=case.get("causal", False), enable_gqa=q.shape[1] != k.shape[1])
    if "alignment" in case:
        kw["causal_alignment"] = case["alignment"]
    if "window" in case:
        kw["window"] = case["window"]
    if "softcap" in case:
        kw["softcap"] = case["softcap"]
    if case.get("alibi"):
        kw["alibi_slopes"] = attnkit.alibi_slopes(q.shape[1])
    return sdpa(q, k, v, **kw, **extra)


def _ref_kw(q, case):
    kw = {key: val for key, val in case.items() if key != "alibi"}
    if case.get("alibi"):
        kw["alibi"] = attnkit.alibi_slopes(q.shape[1])
    return kw


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES, ids=["plain", "causal", "window", "softcap-alibi"])
@pytest.mark.parametrize("length", [1, 5, 37])  # decode path (L <= 16) and tiled path
def test_attention_meets_the_bound_and_is_float32_rounded_once(dtype, case, length):
    q, k, v = qkv(dtype, length=length, s=140)
    out = _call(q, k, v, case)
    assert out.dtype == dtype
    f32 = _call(*widened(q, k, v), case)
    if dtype == F16 or length <= 16:
        # Computed in float32 from the exactly widened inputs, each output rounded once.
        assert out.tobytes() == f32.astype(dtype).tobytes()
    else:
        # bfloat16 prefill: dot-product pairs and P rounded to bfloat16 (vdpbf16ps's arithmetic).
        assert out.tobytes() != f32.astype(dtype).tobytes()
    assert_within_bound(out, q, k, v, dtype, **_ref_kw(q, case))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [1, 3, 40])
def test_mixed_precision_float32_queries_over_a_16_bit_cache(dtype, length):
    q, k, v = qkv(dtype, length=length, s=600)
    q32 = q.astype(np.float32) + np.float32(1e-3)  # queries that are not 16-bit values
    out, lse = sdpa(q32, k, v, is_causal=True, causal_alignment="bottom_right", enable_gqa=True, return_lse=True)
    assert out.dtype == lse.dtype == np.float32
    want, want_lse = sdpa(q32, *widened(k, v), is_causal=True, causal_alignment="bottom_right", enable_gqa=True,
                          return_lse=True)
    assert out.tobytes() == want.tobytes() and lse.tobytes() == want_lse.tobytes()
    assert_within_bound(out, q32, k, v, np.float32, causal=True, alignment="bottom_right")


@pytest.mark.parametrize("dtype", HALF)
def test_lse_and_weights_are_float32(dtype):
    q, k, v = qkv(dtype, length=9, s=30)
    km = np.ones((2, 30), bool)
    km[1, 20:] = False
    out, lse, w = sdpa(q, k, v, key_mask=km, enable_gqa=True, return_lse=True, return_weights=True)
    assert (out.dtype, lse.dtype, w.dtype) == (dtype, np.float32, np.float32)
    out32, lse32, w32 = sdpa(*widened(q, k, v), key_mask=km, enable_gqa=True, return_lse=True, return_weights=True)
    assert lse.tobytes() == lse32.tobytes() and w.tobytes() == w32.tobytes()


@pytest.mark.parametrize("dtype", HALF)
def test_a_16_bit_float_mask_is_widened_exactly(dtype):
    q, k, v = qkv(dtype, hq=2, hkv=2, length=7, s=20)
    rng = np.random.default_rng(1)
    mask = rng.standard_normal((7, 20)).astype(dtype)
    mask[:, 3] = -np.inf
    out = sdpa(q, k, v, mask)
    assert out.tobytes() == sdpa(*widened(q, k, v), mask.astype(np.float32)).astype(dtype).tobytes()
    with pytest.raises(TypeError, match="a float mask must have the query's dtype"):
        sdpa(q, k, v, mask.astype(np.float32))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [1, 40])
def test_masked_poison_never_reaches_the_output(dtype, length):
    q, k, v = qkv(dtype, length=length, s=300)
    km = np.ones((2, 300), bool)
    km[:, ::7] = False
    clean = sdpa(q, k, v, key_mask=km, enable_gqa=True)
    kp, vp = k.copy(), v.copy()
    kp[:, :, ::7] = np.nan
    vp[:, :, ::7] = np.inf
    assert sdpa(q, kp, vp, key_mask=km, enable_gqa=True).tobytes() == clean.tobytes()
    assert np.isfinite(clean.astype(np.float32)).all()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("level", ["explicit", "portable"])
def test_a_valid_nan_key_makes_exactly_its_rows_nan(dtype, level):
    """NaN in an attended key makes the rows that attend it NaN (never zeros, never passed over),
    also where it is a row's only valid key; rows that do not attend it stay finite."""
    q, k, v = qkv(dtype, b=1, hq=1, hkv=1, length=40, s=50, e=32, ev=32)
    k[0, 0, 7, 3] = np.nan
    only_7 = np.zeros((1, 50), bool)
    only_7[0, 7] = True
    if level == "portable":
        _core._set_simd_enabled(False)
    try:
        causal = sdpa(q, k, v, is_causal=True).astype(np.float32)[0, 0]
        alone = sdpa(q, k, v, key_mask=only_7).astype(np.float32)[0, 0]
    finally:
        _core._set_simd_enabled(True)
    assert np.isfinite(causal[:7]).all() and np.isnan(causal[7:]).all()
    assert np.isnan(alone).all()


def test_a_masked_value_cannot_change_the_sign_of_a_zero_output():
    """bfloat16's dot-product steps flush tiny results to zero of their sign, so the output's
    accumulator can be −0.0 when it meets a masked key, whose value's sign would then decide the
    sign of the zero; outputs are never −0.0, so that it cannot show."""
    length, e, s = 40, 16, 6
    q = np.zeros((1, 1, length, e), np.float32)
    q[..., 0] = 1
    k = np.zeros((1, 1, s, e), np.float32)
    k[0, 0, [1, 4, 5], 0] = -6.9375  # probability 2^-10 against key 0's 1
    v = np.full((1, 1, s, e), -0.0, np.float32)
    v[0, 0, 1] = -(2.0**-120)  # times 2^-10: below the smallest normal, flushed to −0.0
    km = np.ones((1, s), bool)
    km[0, 2:4] = False
    outs = []
    for sign in (1.0, -1.0):
        v[0, 0, 2:4] = sign
        out = sdpa(q.astype(BF16), k.astype(BF16), v.astype(BF16), key_mask=km, scale=1.0)
        outs.append(out.view(np.uint16))
    assert (outs[0] == 0).all() and (outs[1] == 0).all()


@pytest.mark.parametrize("dtype", HALF)
def test_a_non_finite_value_just_past_a_blocks_keys_stays_out(dtype, threads):
    """bfloat16's P·V runs over key pairs: a query block whose last allowed key is the first of a
    pair reads the pair's second value too (with probability +0). An infinite value there must
    not turn into NaN, at any thread count (one task reads it, a split task does not pack it)."""
    q, k, v = qkv(dtype, b=1, hq=1, hkv=1, length=200, s=301, e=32, ev=32)
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    clean = sdpa(q, k, v, **kw)
    poisoned = v.copy()
    poisoned[:, :, 133] = np.inf  # rows 0..31 (the first query block) see keys up to 132
    for n in (1, 2):
        threads(n)
        out = sdpa(q, k, poisoned, **kw)
        assert out[:, :, :32].tobytes() == clean[:, :, :32].tobytes(), f"{n} threads"
        assert not np.isfinite(out[:, :, 32:].astype(np.float32)).all(axis=-1).any()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [2, 70])
def test_same_bits_for_threads_layouts_batch_splits_and_grouped_heads(dtype, length, threads):
    q, k, v = qkv(dtype, b=3, hq=8, hkv=2, length=length, s=260, e=32, ev=32)
    kw = dict(is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
    threads(1)
    want = sdpa(q, k, v, **kw)
    threads(2)
    assert sdpa(q, k, v, **kw).tobytes() == want.tobytes()
    bshd = sdpa(*(np.swapaxes(x, 1, 2) for x in (q, k, v)), layout="bshd", **kw)
    assert np.ascontiguousarray(np.swapaxes(bshd, 1, 2)).tobytes() == want.tobytes()
    assert sdpa(q[1:2], k[1:2], v[1:2], **kw).tobytes() == want[1:2].tobytes()
    rep = dict(is_causal=True, causal_alignment="bottom_right")
    assert sdpa(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), **rep).tobytes() == want.tobytes()
    for name, variant in layouts(k):
        assert sdpa(q, variant, v, **kw).tobytes() == want.tobytes(), name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [1, 6, 40, 133])
@pytest.mark.parametrize("level", ["portable", "avx2"])
def test_every_path_gives_the_same_bits(dtype, length, level):
    """The explicit kernels of this CPU (AVX512_BF16's vdpbf16ps where it has it) against the
    portable code (`level="portable"`) and against the code without AVX-512 (`"avx2"`), which
    emulate the instruction's arithmetic step by step; with masks that take the fused score
    kernel, the generic masking and the skipping of masked pairs beside non-finite values."""
    if not _core._simd_accelerated():
        pytest.skip("this CPU has no AVX2: only the portable path exists")
    q, k, v = qkv(dtype, length=length, s=700, e=72, ev=64, spread=4.0)
    q32 = q.astype(np.float32)
    km = np.ones((2, 700), bool)
    km[:, ::9] = False
    kp, vp = k.copy(), v.copy()
    kp[:, :, ::9] = np.nan
    vp[:, :, ::9] = np.inf
    tiny = (v * np.asarray(1e-38, dtype)).astype(dtype)  # subnormal products and sums
    calls = lambda: [sdpa(q, k, v, is_causal=True, enable_gqa=True),  # noqa: E731
                     sdpa(q, k, v, enable_gqa=True, key_mask=km, softcap=3.0),
                     sdpa(q, kp, vp, enable_gqa=True, key_mask=km, window=(50, 0), causal_alignment="bottom_right"),
                     sdpa(q, k, tiny, enable_gqa=True, is_causal=True),
                     sdpa(q32, k, v, enable_gqa=True, return_lse=True)[0],
                     attnkit.embedding(np.arange(50) % 7, k[0, 0], scale=3.0),
                     attnkit.apply_rope(k[..., :64], *attnkit.rope_cos_sin(700, 64))]
    want = calls()
    if level == "portable":
        _core._set_simd_enabled(False)
    else:
        _core._set_simd_enabled(True, avx512=False)
    try:
        got = calls()
    finally:
        _core._set_simd_enabled(True)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.tobytes() == b.tobytes(), f"call {i}"


def test_fully_masked_rows_give_zeros_in_16_bits():
    q, k, v = qkv(BF16, b=1, hq=1, hkv=1, length=3, s=4)
    out, lse = sdpa(q, k, v, key_mask=np.zeros((1, 4), bool), return_lse=True)
    assert (out.astype(np.float32) == 0).all() and (lse == -np.inf).all()


def test_all_bits_widen_exactly_through_attention():
    """Every 16-bit pattern as a value: one key, one query of 1.0, so the output is the value."""
    for dtype in (F16, BF16):
        bits = np.arange(2**16, dtype=np.uint16).view(dtype)
        finite = bits[np.isfinite(bits.astype(np.float32))]
        v = finite.reshape(1, 1, 1, -1)
        q = k = np.ones((1, 1, 1, 1), dtype)
        out = sdpa(q, k, v)
        # Equal values (a value of -0.0 comes out +0.0: the sum starts at +0.0).
        assert out.dtype == dtype and (out.astype(np.float32) == v.astype(np.float32)).all()


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("dtype", HALF)
def test_embedding_is_a_bit_exact_copy(dtype):
    bits = np.arange(2**16, dtype=np.uint16)
    table = bits.reshape(-1, 64).view(dtype)  # every pattern, NaN payloads and -0.0 included
    ids = np.random.default_rng(0).integers(0, table.shape[0], 500)
    out = attnkit.embedding(ids, table)
    assert out.dtype == dtype and out.view(np.uint16).tobytes() == bits.reshape(-1, 64)[ids].tobytes()


@pytest.mark.parametrize("dtype", HALF)
def test_embedding_scale_is_applied_in_float32_and_rounded_once(dtype):
    table = np.random.default_rng(0).standard_normal((50, 24)).astype(dtype)
    ids = np.arange(50)[::-1]
    out = attnkit.embedding(ids, table, scale=np.sqrt(24))
    want = (table[ids].astype(np.float32) * np.float32(np.sqrt(24))).astype(dtype)
    assert out.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_accumulates_wide_and_rounds_once(dtype, mode):
    rng = np.random.default_rng(2)
    table = rng.standard_normal((40, 16)).astype(dtype)
    ids = rng.integers(0, 40, 60)
    offsets = np.array([0, 5, 5, 22, 41])
    psw = rng.standard_normal(60).astype(dtype) if mode == "sum" else None
    out = attnkit.embedding_bag(ids, table, offsets, mode=mode, per_sample_weights=psw)
    bounds = list(offsets) + [60]
    bags = [list(ids[a:b]) for a, b in zip(bounds, bounds[1:])]
    weights = None if psw is None else [list(psw.astype(np.float64)[a:b]) for a, b in zip(bounds, bounds[1:])]
    want = ref.embedding_bag(bags, table.astype(np.float64), mode, weights)
    assert out.dtype == dtype
    # Rounded once from float64 (NumPy and ml_dtypes round float64 directly, to nearest even).
    assert out.tobytes() == want.astype(dtype).tobytes()


# ---------------------------------------------------------------- position tables and RoPE


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("dtype", HALF)
def test_position_tables_are_rounded_once_from_float64(dtype):
    pos = np.arange(0, 70000, 37)
    s64 = attnkit.sinusoidal_positions(pos, 64, dtype=np.float64)
    s16 = attnkit.sinusoidal_positions(pos, 64, dtype=dtype)
    assert s16.dtype == dtype and s16.tobytes() == s64.astype(dtype).tobytes()
    c64, n64 = attnkit.rope_cos_sin(pos, 128, scaling=YARN, dtype=np.float64)
    c16, n16 = attnkit.rope_cos_sin(pos, 128, scaling=YARN, dtype=dtype)
    assert c16.tobytes() == c64.astype(dtype).tobytes() and n16.tobytes() == n64.astype(dtype).tobytes()
    # ULP: within half a unit of the long-double reference (plus float64's own error).
    want = ref.sinusoidal(pos, 64, dtype=np.float64)
    err = np.abs(s16.astype(np.float64) - want)
    assert (err <= 0.5 * ulp(want, dtype) * (1 + 1e-9) + 1e-15).all()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_apply_rope_computes_in_float32_and_rounds_once(dtype, style):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 11, 20)).astype(dtype)
    c64, s64 = attnkit.rope_cos_sin(11, 16, dtype=np.float64)
    for tables in ((c64, s64), (c64.astype(np.float32), s64.astype(np.float32)), (c64.astype(dtype), s64.astype(dtype))):
        out = attnkit.apply_rope(x, *tables, style=style)
        c32, s32 = (t.astype(np.float32) for t in tables)
        want = attnkit.apply_rope(x.astype(np.float32), c32, s32, style=style).astype(dtype)
        assert out.dtype == dtype and out.tobytes() == want.tobytes()
        # The pass-through channels are copied bit for bit.
        assert out[..., 16:].tobytes() == x[..., 16:].tobytes()
    exact = ref.apply_rope(x, c64, s64, style=style)
    err = np.abs(out.astype(np.float64) - exact)
    assert (err <= 2 * eps(dtype) * (np.abs(exact) + np.abs(x.astype(np.float64))) + 1e-7).all()
    with pytest.raises(TypeError, match="cos, sin: expected one dtype"):
        attnkit.apply_rope(x, c64, s64.astype(np.float32))


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize("dtype", HALF)
def test_multihead_attention_projects_in_float32_and_rounds_once(dtype):
    rng = np.random.default_rng(4)
    w = [(rng.standard_normal((16, 16)) / 4).astype(dtype) for _ in range(4)]
    bias = (rng.standard_normal(16) / 4).astype(dtype)
    layer = attnkit.MultiheadAttention(*w, q_bias=bias, o_bias=bias, num_heads=4, batch_first=True)
    x = rng.standard_normal((2, 9, 16)).astype(dtype)
    out, weights = layer(x, is_causal=True, need_weights=True)
    assert out.dtype == dtype and weights.dtype == np.float32
    # The same steps by hand: float32 products, each result rounded once to the weights' dtype.
    w32 = [a.astype(np.float32) for a in w]
    b32 = bias.astype(np.float32)
    x32 = x.astype(np.float32)
    q = (x32 @ w32[0].T + b32).astype(dtype).reshape(2, 9, 4, 4)
    k = (x32 @ w32[1].T).astype(dtype).reshape(2, 9, 4, 4)
    v = (x32 @ w32[2].T).astype(dtype).reshape(2, 9, 4, 4)
    att = sdpa(q, k, v, is_causal=True, layout="bshd").reshape(2, 9, 16)
    want = (att.astype(np.float32) @ w32[3].T + b32).astype(dtype)
    assert out.tobytes() == want.tobytes()
    f32 = attnkit.MultiheadAttention(*w32, q_bias=b32, o_bias=b32, num_heads=4, batch_first=True)(x32, is_causal=True)[0]
    assert np.abs(out.astype(np.float32) - f32).max() < 40 * eps(dtype)


# ---------------------------------------------------------------- errors and ml_dtypes


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "int4", "float4_e2m1fn"])
def test_other_small_custom_dtypes_are_refused_by_name(name):
    if not hasattr(ml_dtypes, name):
        pytest.skip(f"this ml_dtypes has no {name}")
    dt = np.dtype(getattr(ml_dtypes, name))
    x = np.zeros((1, 1, 4, 8), dt)
    with pytest.raises(TypeError, match=rf"query: expected a float32, float64, float16 or bfloat16 .*got dtype {name}.*astype"):
        sdpa(x, x, x)
    with pytest.raises(TypeError, match=rf"weight: .*got dtype {name}"):
        attnkit.embedding(np.arange(2), np.zeros((3, 8), dt))
    with pytest.raises(TypeError, match=r"dtype: expected numpy.float32, numpy.float64, numpy.float16 or ml_dtypes.bfloat16"):
        attnkit.sinusoidal_positions(4, 8, dtype=dt)
    with pytest.raises(TypeError, match=r"query: expected a float32, float64, float16 or bfloat16 numpy array"):
        _core.attention(x, x, x, "bhsd", 1.0, None, False, (None, None), "top_left")


@pytest.mark.parametrize("q_dtype,kv_dtype", [(F16, BF16), (BF16, np.float32), (np.float64, F16), (F16, np.float32)])
def test_dtypes_that_do_not_go_together_are_refused(q_dtype, kv_dtype):
    q = np.zeros((1, 1, 2, 4), q_dtype)
    kv = np.zeros((1, 1, 3, 4), kv_dtype)
    with pytest.raises(TypeError, match="do not go together"):
        sdpa(q, kv, kv)
    with pytest.raises(TypeError, match="do not go together"):
        _core.attention(q, kv, kv, "bhsd", 1.0, None, False, (None, None), "top_left")


def test_options_infinite_in_float32_are_refused_for_16_bit_inputs():
    q = np.zeros((1, 1, 2, 4), F16)
    with pytest.raises(ValueError, match=r"scale: must be finite in float32 \(the dtype computed in\)"):
        sdpa(q, q, q, scale=1e39)


def test_without_ml_dtypes_everything_else_works_and_bfloat16_is_explained():
    """In a fresh interpreter that never imports ml_dtypes: float16 works, naming bfloat16 raises a
    TypeError that says what to install, and attnkit itself never imports ml_dtypes."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import attnkit
        q = np.ones((1, 1, 3, 4), np.float16)
        assert attnkit.scaled_dot_product_attention(q, q, q).dtype == np.float16
        assert attnkit.sinusoidal_positions(3, 4, dtype=np.float16).dtype == np.float16
        try:
            attnkit.rope_cos_sin(3, 4, dtype="bfloat16")
        except TypeError as exc:
            assert "ml_dtypes" in str(exc), exc
        else:
            raise AssertionError("no TypeError for bfloat16 without ml_dtypes")
        try:
            from attnkit import _core
            _core.sinusoidal(np.arange(3), np.ones(2), "halves", "bfloat16")
        except TypeError as exc:
            assert "ml_dtypes" in str(exc), exc
        else:
            raise AssertionError("no TypeError from the core for bfloat16 without ml_dtypes")
        assert "ml_dtypes" not in sys.modules
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
