"""attnkit.scaled_dot_product_attention against the float64 reference, its metamorphic
properties, PyTorch, and its error contract."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnkit
import reference as ref
from attnkit import _core
from conftest import layouts, run_forked

sdpa = attnkit.scaled_dot_product_attention
FLOATS = [np.float32, np.float64]


def qkv(b=2, hq=4, hkv=2, length=13, s=21, e=8, ev=8, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, length, e)).astype(dtype), rng.standard_normal((b, hkv, s, e)).astype(dtype),
            rng.standard_normal((b, hkv, s, ev)).astype(dtype))


def assert_within_bound(out, want, v, score_max, dtype, hq):
    """The guide's scale-aware bound, per (batch, head): c * eps * max|V| * (1 + max|score|), c = 4."""
    eps = np.finfo(dtype).eps
    vmax = np.abs(v).max(axis=(2, 3), initial=0.0)  # (B, Hkv)
    vmax = np.repeat(vmax, hq // v.shape[1], axis=1)
    bound = 4 * eps * np.maximum(vmax, np.finfo(dtype).tiny) * (1 + score_max)
    err = np.abs(out.astype(np.float64) - want).max(axis=(2, 3))
    assert np.all(err <= bound), f"error {err.max():.3e} above bound {bound[np.argmax(err - bound)]:.3e}"


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "causal bottom-right": {"causal": True, "alignment": "bottom_right"},
    "window": {"window": (3, 2)},
    "window left only, bottom-right": {"window": (4, None), "alignment": "bottom_right"},
    "causal + window": {"causal": True, "window": (5, None)},
    "alibi": {"alibi": "heads"},
    "alibi per batch, causal": {"alibi": "batch", "causal": True},
    "softcap": {"softcap": 1.5},
    "key mask": {"key_mask": True},
    "bool mask": {"bool_mask": (1, 1, 13, 21)},
    "bool mask per head": {"bool_mask": (4, 1, 21)},
    "float mask": {"float_mask": (13, 21)},
    "everything": {"causal": True, "alignment": "bottom_right", "key_mask": True, "bool_mask": (2, 4, 13, 21),
                   "float_mask": (1, 21), "alibi": "heads", "softcap": 3.0, "window": (8, 1)},
}


def build(case, q, k, v, seed=1):
    """(attnkit kwargs, reference kwargs) for one named case."""
    rng = np.random.default_rng(seed)
    b, hq, length, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    ours, theirs = {}, {}
    if case.get("causal"):
        ours["is_causal"] = theirs["causal"] = True
    if "alignment" in case:
        ours["causal_alignment"] = theirs["alignment"] = case["alignment"]
    if "window" in case:
        ours["window"] = theirs["window"] = case["window"]
    if "softcap" in case:
        ours["softcap"] = theirs["softcap"] = case["softcap"]
    if "alibi" in case:
        slopes = attnkit.alibi_slopes(hq)
        if case["alibi"] == "batch":
            slopes = np.stack([slopes, slopes / 2])[:b]
        ours["alibi_slopes"] = theirs["alibi"] = slopes
    if case.get("key_mask"):
        km = np.ones((b, s), dtype=np.int64)
        km[0, s // 2:] = 0
        ours["key_mask"] = theirs["key_mask"] = km
    masks = []
    if "bool_mask" in case:
        masks.append(rng.random(case["bool_mask"]) > 0.3)
    if "float_mask" in case:
        fm = rng.standard_normal(case["float_mask"]).astype(q.dtype)
        fm[..., ::5] = -np.inf
        masks.append(fm)
    if len(masks) == 2:  # our attn_mask takes one; fold the bool mask into the float one
        fm = np.where(np.broadcast_to(masks[0], (b, hq, length, s)), masks[1], -np.inf).astype(q.dtype)
        masks = [fm]
    if masks:
        ours["attn_mask"] = masks[0]
        theirs["float_mask" if masks[0].dtype != bool else "bool_mask"] = masks[0]
    return ours, theirs


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    q, k, v = qkv(dtype=dtype)
    ours, theirs = build(CASES[name], q, k, v)
    out, lse, weights = sdpa(q, k, v, enable_gqa=True, return_lse=True, return_weights=True, **ours)
    want, want_lse, want_w, score_max = ref.attention(q, k, v, **theirs)
    assert out.dtype == lse.dtype == weights.dtype == dtype
    assert_within_bound(out, want, v, score_max, dtype, q.shape[1])
    eps = np.finfo(dtype).eps
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    lse_err = np.abs(lse[finite] - want_lse[finite])
    assert np.all(lse_err <= 16 * eps * (1 + np.abs(want_lse[finite]))), lse_err.max()
    np.testing.assert_allclose(weights, want_w, rtol=0, atol=16 * eps)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)])
def test_zero_size_dimensions(shape):
    b, h, length, e = shape
    q = np.ones(shape, np.float32)
    k = np.ones((b, h, 5, e), np.float32)
    out, lse = sdpa(q, k, k, return_lse=True)
    assert out.shape == shape and lse.shape == (b, h, length)
    out, lse, w = sdpa(q, k[:, :, :0], k[:, :, :0], return_lse=True, return_weights=True)  # no keys
    assert out.shape == shape and np.all(out == 0) and np.all(lse == -np.inf) and w.shape == (b, h, length, 0)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = qkv(b=1, hq=2, hkv=2, length=4, s=6)
    mask = np.ones((4, 6), bool)
    mask[1] = False
    out, lse, w = sdpa(q, k, v, attn_mask=mask, return_lse=True, return_weights=True)
    assert np.all(out[:, :, 1] == 0) and np.all(lse[:, :, 1] == -np.inf) and np.all(w[:, :, 1] == 0)
    assert np.all(np.isfinite(out))


def test_masked_positions_never_enter_the_arithmetic():
    q, k, v = qkv(b=2, hq=2, hkv=2, length=9, s=140)
    km = np.ones((2, 140), bool)
    km[:, 3::7] = False
    mask = np.ones((9, 140), bool)
    mask[:, 100:] = False
    mask[4] = False  # a fully masked query row
    want = sdpa(q, k, v, attn_mask=mask, key_mask=km, is_causal=True, causal_alignment="bottom_right")
    kp, vp, qp = k.copy(), v.copy(), q.copy()
    for poison in (np.nan, np.inf, 3e38):
        kp[:, :, 3::7], vp[:, :, 3::7] = poison, poison
        kp[:, :, 100:], vp[:, :, 100:] = poison, -poison
        qp[:, :, 4] = poison
        got = sdpa(qp, kp, vp, attn_mask=mask, key_mask=km, is_causal=True, causal_alignment="bottom_right")
        assert got.tobytes() == want.tobytes()


def test_nan_in_unmasked_inputs_stays_in_its_rows():
    q, k, v = qkv(b=1, hq=1, hkv=1, length=5, s=70)
    q = q.copy()
    q[0, 0, 2, 0] = np.nan
    out = sdpa(q, k, v)
    assert np.isnan(out[0, 0, 2]).all() and not np.isnan(np.delete(out[0, 0], 2, axis=0)).any()
    k = k.copy()
    k[0, 0, 66, 1] = np.nan  # in the second key block: reaches every query row
    assert np.isnan(sdpa(q, k, v)).all()


@pytest.mark.parametrize("threads_n", [2, 3, 8])
def test_thread_count_does_not_change_the_bits(threads, threads_n):
    q, k, v = qkv(b=3, hq=8, hkv=4, length=70, s=150, e=32, ev=32)
    kw = {"is_causal": True, "enable_gqa": True, "key_mask": np.arange(150)[None].repeat(3, 0) < 120}
    threads(1)
    want = sdpa(q, k, v, **kw)
    threads(threads_n)
    assert sdpa(q, k, v, **kw).tobytes() == want.tobytes()


@pytest.mark.parametrize("hq,length", [(3, 200), (8, 100), (1, 300)])
def test_tasks_split_along_the_queries_keep_every_row_in_place(threads, hq, length):
    """With few (batch, key/value head) tasks for the threads, each is split into parts of whole
    query blocks (group 3: parts of 96 rows); outputs, lse and weights land in place, bit for bit."""
    q, k, v = qkv(b=1, hq=hq, hkv=1, length=length, s=150, e=16, ev=16)
    km = np.arange(150)[None] < 140
    kw = dict(enable_gqa=True, key_mask=km, is_causal=True, causal_alignment="bottom_right", window=(90, None),
              return_lse=True, return_weights=True)
    threads(1)
    want = sdpa(q, k, v, **kw)
    ref_out, ref_lse, ref_w, _ = ref.attention(q, k, v, key_mask=km, causal=True, alignment="bottom_right",
                                               window=(90, None))
    np.testing.assert_allclose(want[0], ref_out, atol=1e-5)
    np.testing.assert_allclose(want[1], ref_lse, atol=1e-5)
    np.testing.assert_allclose(want[2], ref_w, atol=1e-6)
    for n in (2, 5, 16):
        threads(n)
        got = sdpa(q, k, v, **kw)
        for a, b in zip(got, want, strict=True):
            assert a.tobytes() == b.tobytes()


def test_batch_items_equal_the_same_items_run_alone():
    q, k, v = qkv(b=3, hq=2, hkv=2, length=40, s=70)
    km = np.ones((3, 70), bool)
    km[1, 50:] = False
    whole = sdpa(q, k, v, key_mask=km, is_causal=True)
    for b in range(3):
        alone = sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1], key_mask=km[b:b + 1], is_causal=True)
        assert alone.tobytes() == whole[b:b + 1].tobytes()


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("length,s", [(7, 7), (5, 11), (11, 5)])
def test_is_causal_equals_an_explicit_triangular_mask(alignment, length, s):
    q, k, v = qkv(b=1, hq=2, hkv=2, length=length, s=s)
    offset = s - length if alignment == "bottom_right" else 0
    tri = np.arange(s)[None, :] <= np.arange(length)[:, None] + offset
    a = sdpa(q, k, v, is_causal=True, causal_alignment=alignment)
    b = sdpa(q, k, v, attn_mask=tri)
    assert a.tobytes() == b.tobytes()


def test_gqa_equals_repeated_key_value_heads():
    q, k, v = qkv(b=2, hq=6, hkv=2, length=9, s=17)
    a = sdpa(q, k, v, enable_gqa=True, is_causal=True)
    b = sdpa(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), is_causal=True)
    assert a.tobytes() == b.tobytes()


def test_layouts_and_memory_layouts_give_the_same_bits():
    q, k, v = qkv(b=2, hq=2, hkv=2, length=9, s=17)
    want = sdpa(q, k, v, is_causal=True)
    swap = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    got = sdpa(swap(q), swap(k), swap(v), is_causal=True, layout="bshd")
    assert got.tobytes() == swap(want).tobytes()
    for name, variant in layouts(q):
        assert sdpa(variant, k, v, is_causal=True).tobytes() == want.tobytes(), name
    for name, variant in layouts(v):
        assert sdpa(q, k, variant, is_causal=True).tobytes() == want.tobytes(), name


# out=: the output written into the caller's array.

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_out_is_written_and_returned_with_the_new_arrays_bits(layout):
    q, k, v = qkv(b=3, hq=4, hkv=2, length=20, s=20, e=8, ev=16)  # length > 16: the tiled path
    swap = (lambda x: np.ascontiguousarray(x.swapaxes(1, 2))) if layout == "bshd" else (lambda x: x)  # noqa: E731
    q, k, v = swap(q), swap(k), swap(v)
    mask = np.arange(20)[None, :] < np.array([20, 7, 0])[:, None]  # the last item has no key at all
    for length in (20, 5):  # the tiled path, and short queries' path
        qs = q[:, :length] if layout == "bshd" else q[:, :, :length]
        want = sdpa(qs, k, v, enable_gqa=True, key_mask=mask, layout=layout)
        buffer = np.full(want.shape, np.nan, np.float32)
        got = sdpa(qs, k, v, enable_gqa=True, key_mask=mask, layout=layout, out=buffer)
        assert got is buffer
        assert buffer.tobytes() == want.tobytes()
    # A view of a bigger buffer (a model's reused one), leading batch dimensions and lse beside it.
    rows = np.full((4,) + want.shape[1:], np.nan, np.float32)
    got, lse = sdpa(qs, k, v, enable_gqa=True, key_mask=mask, layout=layout, out=rows[1:], return_lse=True)
    assert got.base is rows and rows[1:].tobytes() == want.tobytes() and np.isnan(rows[0]).all()
    assert np.isneginf(lse[2]).all()
    nested = np.zeros((1,) + want.shape, np.float32)
    sdpa(qs[None], k[None], v[None], enable_gqa=True, key_mask=mask[None], layout=layout, out=nested)
    assert nested[0].tobytes() == want.tobytes()


def test_bshd_query_lengths_zero_each_items_padding_rows():
    q, k, v = qkv(b=3, hq=2, hkv=2, length=20, s=20)
    swap = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    ql = np.array([20, 17, 0])
    want = sdpa(q, k, v, is_causal=True, query_lengths=ql)
    for out in (None, np.full((3, 20, 2, 8), np.nan, np.float32)):
        got = sdpa(swap(q), swap(k), swap(v), is_causal=True, query_lengths=ql, layout="bshd", out=out)
        assert got.tobytes() == swap(want).tobytes()
        assert (got[1, 17:] == 0).all() and (got[2] == 0).all()


def test_out_errors_name_it():
    q, k, v = qkv(b=1, hq=2, hkv=2, length=3, s=5)
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 2, 3, 8\) \(that of the output\)"):
        sdpa(q, k, v, out=np.zeros((1, 3, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 3, 2, 8\)"):
        sdpa(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), layout="bshd", out=np.zeros((1, 2, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 8\)"):
        sdpa(q[0, 0], k[0, 0], v[0, 0], out=np.zeros((1, 3, 8), np.float32))
    with pytest.raises(TypeError, match="out: expected a numpy array of dtype float32"):
        sdpa(q, k, v, out=np.zeros((1, 2, 3, 8), np.float64))
    with pytest.raises(TypeError, match="out: expected a numpy array or None"):
        sdpa(q, k, v, out=np.zeros((1, 2, 3, 8)).tolist())
    with pytest.raises(ValueError, match="out: expected a C-contiguous array"):
        sdpa(q, k, v, out=np.zeros((1, 2, 8, 3), np.float32).swapaxes(2, 3))
    frozen = np.zeros((1, 2, 3, 8), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out: the array is read-only"):
        sdpa(q, k, v, out=frozen)
    with pytest.raises(ValueError, match="out: shares memory with an input"):
        sdpa(q, q, q, out=q)
    q3, k3, v3 = qkv(b=1, hq=2, hkv=2, length=3, s=3)
    with pytest.raises(ValueError, match="out: shares memory with an input"):
        sdpa(q3, k3, v3, out=v3)
    np.testing.assert_array_equal(v3, qkv(b=1, hq=2, hkv=2, length=3, s=3)[2])  # nothing written on refusal


def test_leading_batch_dimensions_and_2d_inputs():
    q, k, v = qkv(b=6, hq=2, hkv=2, length=5, s=7)
    want = sdpa(q, k, v)
    got = sdpa(q.reshape(2, 3, 2, 5, 8), k.reshape(2, 3, 2, 7, 8), v.reshape(2, 3, 2, 7, 8))
    assert got.tobytes() == want.reshape(2, 3, 2, 5, 8).tobytes()
    assert sdpa(q[0, 0], k[0, 0], v[0, 0]).tobytes() == want[0, 0].tobytes()


@given(st.integers(0, 2), st.integers(1, 3), st.integers(0, 9), st.integers(0, 12), st.integers(0, 5), st.booleans(),
       st.sampled_from(["top_left", "bottom_right"]))
def test_property_matches_reference(b, h, length, s, e, causal, alignment):
    q, k, v = qkv(b=b, hq=h, hkv=h, length=length, s=s, e=e, ev=3, seed=length * 31 + s)
    out = sdpa(q, k, v, is_causal=causal, causal_alignment=alignment)
    want, _, _, score_max = ref.attention(q, k, v, causal=causal, alignment=alignment)
    assert out.shape == want.shape
    if out.size:
        assert_within_bound(out, want, v, score_max, np.float32, h)
        assert not np.isnan(out).any()


# ---------------------------------------------------------------- PyTorch as an oracle


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal", "causal+bool", "gqa"])
def test_matches_torch_sdpa(kind, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    q, k, v = qkv(b=2, hq=4, hkv=2 if kind == "gqa" else 4, length=33, s=33, e=16, ev=16, dtype=dtype)
    rng = np.random.default_rng(3)
    mask = None
    if "bool" in kind:
        mask = rng.random((33, 33)) > 0.2
        mask[:, 0] = True  # torch < 2.5 gave NaN for fully masked rows; keep every row attending
    if kind == "float":
        mask = rng.standard_normal((2, 1, 33, 33)).astype(dtype)
    causal = kind.startswith("causal")
    ours = sdpa(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=kind == "gqa")
    t = [torch.from_numpy(x) for x in (q, k, v)]
    tm = None if mask is None else torch.from_numpy(mask)
    if causal and mask is not None:  # torch does not take both; fold the causal mask in
        tm = tm & torch.ones(33, 33, dtype=torch.bool).tril()
        ours = sdpa(q, k, v, attn_mask=mask, is_causal=True)
    theirs = F.scaled_dot_product_attention(*t, attn_mask=tm, is_causal=causal and mask is None,
                                            enable_gqa=kind == "gqa").numpy()
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=64 * eps)


def test_bottom_right_matches_torch_lower_right_causal_bias():
    torch = pytest.importorskip("torch")
    bias = pytest.importorskip("torch.nn.attention.bias")
    q, k, v = qkv(b=1, hq=2, hkv=2, length=5, s=12, e=16, ev=16)
    t = [torch.from_numpy(x) for x in (q, k, v)]
    theirs = torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=bias.causal_lower_right(5, 12)).numpy()
    ours = sdpa(q, k, v, is_causal=True, causal_alignment="bottom_right")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- errors

Q, K, V = qkv(b=1, hq=2, hkv=2, length=3, s=4)
ERRORS = [
    ("dropout", lambda: sdpa(Q, K, V, dropout_p=0.1), ValueError, r"dropout_p"),
    ("mixed dtypes", lambda: sdpa(Q, K.astype(np.float64), V), TypeError, r"query, key, value: dtypes float32, float64 and float32 do not go together"),
    ("int query", lambda: sdpa(Q.astype(int), K, V), TypeError, r"query: expected a float32, float64, float16 or bfloat16"),
    ("key value lengths", lambda: sdpa(Q, K, V[:, :, :3]), ValueError, r"value: 2 heads x 3 keys, expected 2 x 4"),
    ("embedding sizes", lambda: sdpa(Q, K[..., :4], V), ValueError, r"key: embedding size 4 differs"),
    ("gqa not enabled", lambda: sdpa(Q, K[:, :1], V[:, :1]), ValueError, r"enable_gqa=True"),
    ("heads do not divide", lambda: sdpa(np.concatenate([Q, Q[:, :1]], 1), K, V, enable_gqa=True), ValueError, r"cannot be shared by 3"),
    ("zero kv heads", lambda: sdpa(Q, K[:, :0], V[:, :0], enable_gqa=True), ValueError, r"0 key/value heads"),
    ("rank", lambda: sdpa(Q[0, 0, 0], K, V), ValueError, r"same rank"),
    ("batch dims", lambda: sdpa(Q, np.concatenate([K, K]), np.concatenate([V, V])), ValueError, r"batch dimensions"),
    ("int mask", lambda: sdpa(Q, K, V, attn_mask=np.ones((3, 4), int)), TypeError, r"attn_mask: expected a bool mask"),
    ("float mask dtype", lambda: sdpa(Q, K, V, attn_mask=np.zeros((3, 4))), TypeError, r"attn_mask: a float mask must have the query's dtype float32"),
    ("mask shape", lambda: sdpa(Q, K, V, attn_mask=np.ones((3, 5), bool)), ValueError, r"attn_mask: shape \(3, 5\) does not broadcast to \(1, 2, 3, 4\)"),
    ("mask enlarges", lambda: sdpa(Q, K, V, attn_mask=np.ones((2, 1, 2, 3, 4), bool)), ValueError, r"does not broadcast"),
    ("key mask shape", lambda: sdpa(Q, K, V, key_mask=np.ones((1, 5), bool)), ValueError, r"key_mask: expected shape \(1, 4\)"),
    ("key mask float", lambda: sdpa(Q, K, V, key_mask=np.ones((1, 4))), TypeError, r"key_mask: expected an integer"),
    ("scale nan", lambda: sdpa(Q, K, V, scale=float("nan")), ValueError, r"scale: expected a finite"),
    ("softcap", lambda: sdpa(Q, K, V, softcap=0.0), ValueError, r"softcap: expected a finite positive"),
    ("window shape", lambda: sdpa(Q, K, V, window=3), ValueError, r"window: expected \(left, right\)"),
    ("window negative", lambda: sdpa(Q, K, V, window=(-1, None)), ValueError, r"window: expected an int >= 0"),
    ("alignment", lambda: sdpa(Q, K, V, causal_alignment="center"), ValueError, r"causal_alignment: expected one of"),
    ("layout", lambda: sdpa(Q, K, V, layout="hbsd"), ValueError, r"layout: expected one of"),
    ("alibi shape", lambda: sdpa(Q, K, V, alibi_slopes=np.ones(3)), ValueError, r"alibi_slopes: expected shape \(2,\)"),
    ("masked array", lambda: sdpa(np.ma.masked_array(Q), K, V), TypeError, r"MaskedArray"),
    ("core strides", lambda: _core.attention(Q, K, V[..., :4][:, :, :3], "bhsd", 1.0, None, False, (None, None), "top_left"),
     ValueError, r"do not fit together"),
]


@pytest.mark.parametrize("name,call,exc,pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_raises_the_contract_exception(name, call, exc, pattern):
    import re

    status, detail = run_forked(call)
    assert status == "raised", f"{name}: nothing was raised"
    assert detail[0] == exc.__name__, f"{name}: {detail}"
    assert re.search(pattern, detail[1]), f"{name}: {detail[1]!r} does not match {pattern!r}"


@pytest.mark.parametrize("s", [300, 1300])
@pytest.mark.parametrize("length", [1, 3, 16, 17])
def test_decode_shapes_keep_every_promise(length, s, threads):
    """Decode-like calls: the short-query path (L <= 16; S = 1300 splits the keys into three
    chunks merged at the end) and, at L = 17, the tiled path."""
    q, k, v = qkv(b=2, hq=8, hkv=2, length=length, s=s, e=24, ev=40)
    km = np.ones((2, s), bool)
    km[:, ::7] = False
    km[1, 200:700] = False  # whole key blocks padded, and a chunk nearly so
    kw = {"key_mask": km, "is_causal": True, "causal_alignment": "bottom_right"}
    out = sdpa(q, k, v, enable_gqa=True, **kw)
    want, want_lse, want_w, score_max = ref.attention(q, k, v, key_mask=km, causal=True, alignment="bottom_right")
    assert_within_bound(out, want, v, score_max, np.float32, 8)
    out_w, lse, w = sdpa(q, k, v, enable_gqa=True, return_lse=True, return_weights=True, **kw)
    assert out_w.tobytes() == out.tobytes()
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(lse, want_lse, rtol=16 * eps, atol=0)
    np.testing.assert_allclose(w, want_w, rtol=0, atol=16 * eps)
    assert sdpa(q, np.repeat(k, 4, 1), np.repeat(v, 4, 1), **kw).tobytes() == out.tobytes()
    kp, vp = k.copy(), v.copy()
    kp[:, :, ::7], vp[:, :, ::7] = np.nan, np.inf
    assert sdpa(q, kp, vp, enable_gqa=True, **kw).tobytes() == out.tobytes()
    threads(1)
    one = sdpa(q, k, v, enable_gqa=True, **kw)
    threads(3)
    assert sdpa(q, k, v, enable_gqa=True, **kw).tobytes() == one.tobytes()


def test_fast_path_for_plain_calls_gives_the_full_paths_bits():
    q, k, v = qkv(b=2, hq=4, hkv=4, length=9, s=13)
    for causal in (False, True):
        fast = sdpa(q, k, v, is_causal=causal)
        full, _ = sdpa(q, k, v, is_causal=causal, return_lse=True)  # any extra takes the full path
        assert fast.tobytes() == full.tobytes()
    with pytest.raises(ValueError, match="enable_gqa=True"):
        sdpa(q, k[:, :2], v[:, :2])  # the core would take grouped heads; the API asks for enable_gqa
    with pytest.raises(TypeError, match="do not go together"):
        sdpa(q, k.astype(np.float64), v)  # refused by the core, explained by the full path


def explicit_kernel_calls(length, s, e, ev, hq, hkv):
    """float32 calls that go through every explicit kernel and around it (L <= 16: decode path)."""
    q, k, v = qkv(b=2, hq=hq, hkv=hkv, length=length, s=s, e=e, ev=ev, seed=length + s)
    km = np.ones((2, s), bool)
    km[0, ::5] = False
    km[1, : s // 3] = False  # leading padding
    km[1, -(s // 4):] = False  # and trailing
    qn, kp, vp = q.copy(), k.copy(), v.copy()
    qn[0, 1, length // 2, 0] = np.nan  # one NaN row
    kp[0, :, ::5], vp[0, :, ::5] = np.nan, np.inf  # poison where masked
    calls = [
        dict(),
        dict(is_causal=True),
        dict(is_causal=True, causal_alignment="bottom_right", window=(40, 3)),
        dict(key_mask=km, return_lse=True, return_weights=True),
        dict(key_mask=km, is_causal=True, causal_alignment="bottom_right"),
        dict(key_mask=km, softcap=2.0, alibi_slopes=attnkit.alibi_slopes(hq)),  # the generic score path
    ]
    out = []
    for kw in calls:
        out.append(sdpa(q, k, v, enable_gqa=True, **kw))
        out.append(sdpa(qn, kp, vp, enable_gqa=True, **kw) if "key_mask" in kw else sdpa(qn, k, v, enable_gqa=True, **kw))
    return [a for r in out for a in (r if isinstance(r, tuple) else (r,))]


@pytest.mark.parametrize("length,s,e,ev,hq,hkv", [
    (17, 7, 5, 16, 4, 2), (37, 300, 64, 64, 4, 2), (70, 130, 33, 20, 4, 2), (130, 257, 8, 48, 4, 2),  # tiled
    (45, 200, 128, 112, 4, 1), (23, 141, 32, 32, 2, 2),  # tiled: 8-row tiles and a 4-row rest, 7 strips
    (1, 700, 64, 64, 8, 2), (1, 300, 13, 32, 4, 1), (3, 1100, 24, 40, 4, 2), (16, 129, 64, 16, 2, 2),  # decode
    (5, 600, 128, 80, 8, 2),  # decode: 20 rows of tiles (eight-row dots twice, then four), 5 strips
    (1, 300, 64, 64, 8, 1), (2, 301, 20, 32, 8, 2),  # decode: eight-row dots, with a dimension tail
    (1, 601, 64, 64, 2, 2), (3, 601, 13, 48, 4, 2), (2, 300, 40, 80, 3, 3),  # decode: single rows
])
@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_explicit_kernels_give_the_portable_bits(length, s, e, ev, hq, hkv, level):
    """The explicit kernels (fast.rs: AVX2, and AVX-512 where the CPU has it) against the generic
    code they replace, on both paths."""
    if not _core._simd_accelerated():
        pytest.skip("this CPU has no AVX2: only the portable path exists")
    if level == "avx512" and not _core._simd_avx512():
        pytest.skip("this CPU lacks AVX-512F or AVX-512VL: the AVX2 kernels run instead")
    _core._set_simd_enabled(True, avx512=level == "avx512")
    try:
        assert _core._simd_avx512() == (level == "avx512")
        want = explicit_kernel_calls(length, s, e, ev, hq, hkv)
        _core._set_simd_enabled(False)
        got = explicit_kernel_calls(length, s, e, ev, hq, hkv)
    finally:
        _core._set_simd_enabled(True)
    assert np.isfinite(want[0]).all() and any(np.isnan(a).any() for a in want)  # the NaN row is there
    for a, b in zip(got, want, strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16"])
def test_buffers_a_thread_keeps_between_calls_cannot_change_a_later_call(dtype):
    """Each thread keeps its tasks' working buffers between calls (bfloat16: the pair mode's own);
    whatever an earlier call of another shape left in them (here NaN and infinities, wider rows,
    more keys) must not reach a later call's bits: the same call before and after gives the same
    results."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((3, 4, n, 32)).astype(dtype) for n in (40, 21, 21))
    mask = np.arange(21)[None, :] < np.array([21, 17, 9])[:, None]

    def call():
        return attnkit.scaled_dot_product_attention(q, k, v, key_mask=mask, return_lse=True)

    before = call()
    big = rng.standard_normal((2, 4, 300, 80)).astype(dtype)
    big[:, :, ::7] = np.nan
    big[:, :, 3::11] = np.inf
    threads_before = attnkit.get_num_threads()
    try:
        with np.errstate(invalid="ignore"):
            for threads in (1, 2):
                attnkit.set_num_threads(threads)
                attnkit.scaled_dot_product_attention(big, big, big, is_causal=True)
                after = call()
                for a, b in zip(before, after):
                    np.testing.assert_array_equal(a, b)
    finally:
        attnkit.set_num_threads(threads_before)
    assert np.isfinite(before[0]).all()
