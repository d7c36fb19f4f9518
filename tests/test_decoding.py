"""Decoding: per-item key lengths (ragged batches) in scaled_dot_product_attention."""

from __future__ import annotations

import numpy as np
import pytest

import attnkit

try:
    import ml_dtypes

    DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:  # bfloat16 needs ml_dtypes
    DTYPES = [np.float32, np.float64, np.float16]

sdpa = attnkit.scaled_dot_product_attention


def qkv(dtype, b=3, hq=4, hkv=2, length=5, s=300, e=32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, length, e)).astype(dtype)
    k = rng.standard_normal((b, hkv, s, e)).astype(dtype)
    v = rng.standard_normal((b, hkv, s, e)).astype(dtype)
    return q, k, v


# L = 1 and 5 take the decode path, 40 the tiled one (and bfloat16's pair mode there).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 5, 40])
@pytest.mark.parametrize("options", [
    {},
    {"is_causal": True, "causal_alignment": "bottom_right"},
    {"is_causal": True},
    {"window": (7, 0), "causal_alignment": "bottom_right"},
    {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625]), "causal_alignment": "bottom_right"},
])
def test_key_lengths_equal_each_item_alone_bit_for_bit(dtype, length, options, threads):
    q, k, v = qkv(dtype, length=length)
    lengths = np.array([300, 131, 45])
    for n in (1, 2):
        threads(n)
        out, lse = sdpa(q, k, v, enable_gqa=True, key_lengths=lengths, return_lse=True, **options)
        for b, kl in enumerate(lengths):
            alone, alone_lse = sdpa(q[b:b + 1], k[b:b + 1, :, :kl], v[b:b + 1, :, :kl], enable_gqa=True,
                                    return_lse=True, **options)
            assert np.array_equal(out[b:b + 1], alone, equal_nan=True), (b, n)
            assert np.array_equal(lse[b:b + 1], alone_lse), (b, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 40])
def test_key_lengths_equal_a_key_mask_of_leading_trues(dtype, length):
    q, k, v = qkv(dtype, length=length)
    lengths = np.array([17, 300, 0])
    mask = np.arange(k.shape[2])[None, :] < lengths[:, None]
    for causal in (False, True):
        got = sdpa(q, k, v, enable_gqa=True, is_causal=causal, key_lengths=lengths, return_weights=True)
        want = sdpa(q, k, v, enable_gqa=True, is_causal=causal, key_mask=mask, return_weights=True)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)
    # Both together: the keys that both allow.
    other = np.random.default_rng(1).random((3, k.shape[2])) < 0.7
    got = sdpa(q, k, v, enable_gqa=True, key_lengths=lengths, key_mask=other)
    assert np.array_equal(got, sdpa(q, k, v, enable_gqa=True, key_mask=other & mask))


@pytest.mark.parametrize("length", [1, 40])
def test_keys_past_the_lengths_are_never_read(length):
    q, k, v = qkv(np.float32, length=length)
    lengths = np.array([5, 299, 150])
    clean = sdpa(q, k, v, enable_gqa=True, key_lengths=lengths, is_causal=True, causal_alignment="bottom_right")
    for poison in (np.nan, np.inf, -np.inf):
        kp, vp = k.copy(), v.copy()
        for b, n in enumerate(lengths):
            kp[b, :, n:] = poison
            vp[b, :, n:] = poison
        got = sdpa(q, kp, vp, enable_gqa=True, key_lengths=lengths, is_causal=True, causal_alignment="bottom_right")
        assert np.array_equal(got, clean)


def test_a_zero_key_length_gives_zeros_and_lse_minus_inf():
    q, k, v = qkv(np.float32, length=3)
    out, lse = sdpa(q, k, v, enable_gqa=True, key_lengths=np.array([0, 4, 0]), return_lse=True)
    assert (out[0] == 0).all() and (out[2] == 0).all() and np.isneginf(lse[[0, 2]]).all()
    assert np.isfinite(lse[1]).all()


def test_key_lengths_take_batch_dimensions_and_the_bshd_layout():
    q, k, v = qkv(np.float32, b=6, length=4)
    lengths = np.array([[3, 200, 300], [1, 50, 77]])
    got = sdpa(q.reshape(2, 3, *q.shape[1:]), k.reshape(2, 3, *k.shape[1:]), v.reshape(2, 3, *v.shape[1:]),
               enable_gqa=True, key_lengths=lengths)
    want = sdpa(q, k, v, enable_gqa=True, key_lengths=lengths.reshape(-1))
    assert np.array_equal(got.reshape(want.shape), want)
    t = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    got = sdpa(t(q), t(k), t(v), enable_gqa=True, key_lengths=lengths.reshape(-1), layout="bshd")
    assert np.array_equal(got, t(want))


@pytest.mark.parametrize("lengths, error, words", [
    (np.array([1, 2]), ValueError, "key_lengths: expected shape (3,)"),
    (np.array([1, 2, 301]), ValueError, "0..300"),
    (np.array([1, -1, 3]), ValueError, "got -1"),
    (np.array([1.0, 2.0, 3.0]), TypeError, "key_lengths: expected an integer array"),
    (np.array([True, True, False]), TypeError, "key_lengths: expected an integer array"),
    (np.array([1, 2, 2**63], dtype=np.uint64), ValueError, "0..300"),
])
def test_bad_key_lengths_are_named(lengths, error, words):
    q, k, v = qkv(np.float32)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        sdpa(q, k, v, enable_gqa=True, key_lengths=lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 40])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_views_into_a_bigger_buffer_are_read_in_place(dtype, length, layout):
    """K and V as the first n positions of a preallocated cache: the same bits as copies, and no
    copy made (the call allocates its output and little else)."""
    import tracemalloc

    rng = np.random.default_rng(2)
    b, hq, hkv, cap, e, n = 2, 4, 2, 2048, 64, 700
    shape = (b, hkv, cap, e) if layout == "bhsd" else (b, cap, hkv, e)
    buf_k, buf_v = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    q = rng.standard_normal((b, hq, length, e) if layout == "bhsd" else (b, length, hq, e)).astype(dtype)
    view = (lambda x: x[:, :, :n]) if layout == "bhsd" else (lambda x: x[:, :n])
    k, v = view(buf_k), view(buf_v)
    assert not k.flags.c_contiguous
    kw = {"enable_gqa": True, "is_causal": True, "causal_alignment": "bottom_right", "layout": layout}
    want = sdpa(q, np.ascontiguousarray(k), np.ascontiguousarray(v), **kw)
    tracemalloc.start()
    try:
        got = sdpa(q, k, v, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(got, want)
    assert peak < k.nbytes / 4, f"{peak} bytes allocated for a {k.nbytes}-byte key view"


def test_views_the_core_cannot_read_in_place_are_copied():
    q, k, v = qkv(np.float32, length=3, s=64)
    want = sdpa(q, k, v, enable_gqa=True)
    for kk, vv in [(k[..., ::-1][..., ::-1], v), (np.repeat(k, 2, axis=-1)[..., ::2], v),
                   (k[:, :, ::-1][:, :, ::-1], v[:, :, ::-1][:, :, ::-1])]:
        assert np.array_equal(sdpa(q, kk, vv, enable_gqa=True), want)
    from attnkit import _core
    with pytest.raises(ValueError, match="key: _core needs .* contiguous last axis"):
        _core.attention(q, np.repeat(k, 2, axis=-1)[..., ::2], v, "bhsd", 0.25, None, False, (None, None), "top_left")
    with pytest.raises(ValueError, match="key: _core needs .* non-negative strides"):
        _core.attention(q, k[:, :, ::-1], v, "bhsd", 0.25, None, False, (None, None), "top_left")


def test_query_lengths_place_each_items_last_real_query_at_its_last_key():
    q, k, v = qkv(np.float32, length=20, s=80)
    kl, ql = np.array([80, 33, 20]), np.array([20, 17, 0])  # > 16: alone, the tiled path too
    out, lse, w = sdpa(q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right",
                       key_lengths=kl, query_lengths=ql, return_lse=True, return_weights=True)
    for b in range(3):
        if ql[b]:
            alone = sdpa(q[b:b + 1, :, :ql[b]], k[b:b + 1, :, :kl[b]], v[b:b + 1, :, :kl[b]], enable_gqa=True,
                         is_causal=True, causal_alignment="bottom_right")
            assert np.array_equal(out[b:b + 1, :, :ql[b]], alone)
        assert (out[b, :, ql[b]:] == 0).all() and np.isneginf(lse[b, :, ql[b]:]).all()
        assert (w[b, :, ql[b]:] == 0).all()
    with pytest.raises(ValueError, match=r"query_lengths: each must lie in 0\.\.20"):
        sdpa(q, k, v, enable_gqa=True, query_lengths=np.array([1, 21, 0]))
    with pytest.raises(ValueError, match=r"query_lengths: expected shape \(3,\)"):
        sdpa(q, k, v, enable_gqa=True, query_lengths=np.array([1, 2]))


def _sink_reference(q, k, v, sinks, causal_offset=None):
    """float64: softmax over the scores and the head's sink logit, the sink's column dropped."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if causal_offset is not None:
        i, j = np.arange(q.shape[2])[:, None] + causal_offset, np.arange(k.shape[2])[None, :]
        s = np.where(j <= i, s, -np.inf)
    sink = np.asarray(sinks, np.float64)[None, :, None, None]
    big = np.maximum(s.max(axis=-1, keepdims=True), sink)
    p = np.exp(s - big)
    den = p.sum(axis=-1, keepdims=True) + np.exp(sink - big)
    return (p @ v) / den, (big + np.log(den))[..., 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 40])
def test_sink_logits_join_each_softmax_denominator(dtype, length):
    q, k, v = qkv(dtype, length=length, s=600)
    sinks = np.array([0.5, 3.0, -2.0, 10.0])
    out, lse = sdpa(q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right", sinks=sinks,
                    return_lse=True)
    want, want_lse = _sink_reference(q, k, v, sinks, causal_offset=600 - length)
    eps = float(np.finfo(np.float32 if np.dtype(dtype).itemsize == 2 else dtype).eps)
    out_eps = 2.0 ** -7 if np.dtype(dtype).itemsize == 2 and np.dtype(dtype) != np.float16 else (
        2.0 ** -10 if np.dtype(dtype) == np.float16 else eps)
    vmax = np.abs(np.asarray(v, np.float64)).max()
    assert np.abs(np.asarray(out, np.float64) - want).max() <= 4 * out_eps * vmax * (1 + 6)
    assert np.abs(lse - want_lse).max() <= 64 * max(eps, 2.0 ** -8 if np.dtype(dtype).itemsize == 2 else 0)
    # Through the cache: the same bound (it computes short queries' scores in the order of
    # long ones), and the same bits where the call is long.
    cache = attnkit.KVCache(3, 2, 32, capacity=600, dtype=dtype)
    cache.append(k, v)
    cached = cache.attend(q, sinks=sinks)
    assert np.abs(np.asarray(cached, np.float64) - want).max() <= 4 * out_eps * vmax * (1 + 6)
    if length > 16:
        assert np.array_equal(cached, out)


def test_a_row_with_no_key_but_a_sink_gives_zeros_and_the_sink_as_lse():
    q, k, v = qkv(np.float32, length=3, s=10)
    sinks = np.array([0.5, 3.0, -2.0, 10.0])
    for length in (3, 20):
        qq = np.repeat(q, 7, axis=2)[:, :, :length]
        out, lse, w = sdpa(qq, k, v, enable_gqa=True, key_lengths=np.array([0, 10, 0]), sinks=sinks,
                           return_lse=True, return_weights=True)
        assert (out[0] == 0).all() and (w[0] == 0).all()
        assert np.array_equal(lse[0], np.broadcast_to(sinks.astype(np.float32)[:, None], lse[0].shape))
        # Weights count the sink: a row's weights sum to less than one.
        assert (w[1].sum(axis=-1) < 1).all()


@pytest.mark.parametrize("sinks, error, words", [
    (np.zeros(3), ValueError, r"sinks: expected shape \(4,\)"),
    (np.array([0.0, np.inf, 0.0, 0.0]), ValueError, "sinks: must be finite"),
    (np.array([0.0, 1e39, 0.0, 0.0]), ValueError, "sinks: must be finite in float32"),
    (np.array(["a", "b", "c", "d"]), TypeError, "sinks: expected a float32, float64"),
])
def test_bad_sinks_are_named(sinks, error, words):
    q, k, v = qkv(np.float32)
    with pytest.raises(error, match=words):
        sdpa(q, k, v, enable_gqa=True, sinks=sinks)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("length", [3, 30])
def test_merge_attention_of_the_kernels_own_chunks_gives_the_bits_of_one_call(dtype, length):
    q, k, v = qkv(dtype, length=length, s=1500)
    whole, whole_lse = sdpa(q, k, v, enable_gqa=True, return_lse=True)
    parts = [sdpa(q, k[:, :, a:b], v[:, :, a:b], enable_gqa=True, return_lse=True)
             for a, b in ((0, 512), (512, 1024), (1024, 1500))]
    out, lse = attnkit.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert np.array_equal(out, whole) and np.array_equal(lse, whole_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_of_any_split_meets_the_float_bound(dtype):
    q, k, v = qkv(dtype, length=5, s=300)
    whole = sdpa(q, k, v, enable_gqa=True)
    cuts = [0, 7, 150, 151, 300]
    parts = [sdpa(q, k[:, :, a:b], v[:, :, a:b], enable_gqa=True, return_lse=True) for a, b in zip(cuts, cuts[1:])]
    out, lse = attnkit.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == np.dtype(dtype) and lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    eps = {2: 2.0 ** -7 if np.dtype(dtype) != np.float16 else 2.0 ** -10}.get(np.dtype(dtype).itemsize,
                                                                             float(np.finfo(dtype).eps))
    err = np.abs(np.asarray(out, np.float64) - np.asarray(whole, np.float64)).max()
    assert err <= 8 * eps * np.abs(np.asarray(v, np.float64)).max()


def test_merge_attention_leaves_out_empty_partials_and_keeps_nan():
    q, k, v = qkv(np.float32, length=2, s=40)
    a = sdpa(q, k[:, :, :20], v[:, :, :20], enable_gqa=True, return_lse=True)
    b = sdpa(q, k[:, :, 20:], v[:, :, 20:], enable_gqa=True, return_lse=True)
    empty_out, empty_lse = np.full_like(a[0], np.nan), np.full_like(a[1], -np.inf)
    out, lse = attnkit.merge_attention([a[0], empty_out, b[0]], [a[1], empty_lse, b[1]])
    want = attnkit.merge_attention([a[0], b[0]], [a[1], b[1]])
    assert np.array_equal(out, want[0]) and np.array_equal(lse, want[1])
    out, lse = attnkit.merge_attention([empty_out], [empty_lse])
    assert (out == 0).all() and np.isneginf(lse).all()
    nan_lse = a[1].copy()
    nan_lse[0, 1, 0] = np.nan
    out, lse = attnkit.merge_attention([a[0], b[0]], [nan_lse, b[1]])
    assert np.isnan(out[0, 1, 0]).all() and np.isnan(lse[0, 1, 0])
    assert not np.isnan(out[0, 1, 1]).any() and not np.isnan(lse[0, 1, 1])


@pytest.mark.parametrize("call, error, words", [
    (lambda a, b: attnkit.merge_attention([], []), ValueError, "at least one"),
    (lambda a, b: attnkit.merge_attention([a[0]], [a[1], b[1]]), ValueError, "as many partials"),
    (lambda a, b: attnkit.merge_attention([a[0], b[0][..., :8]], [a[1], b[1]]), ValueError, r"outs\[1\], lses\[1\]: shapes"),
    (lambda a, b: attnkit.merge_attention([a[0], b[0].astype(np.float64)], [a[1], b[1]]), TypeError, r"outs\[1\]: dtype float64"),
    (lambda a, b: attnkit.merge_attention([a[0]], [a[1].astype(np.float64)]), TypeError, r"lses\[0\]: dtype float64 for float32"),
    (lambda a, b: attnkit.merge_attention(np.stack([a[0], b[0]]), [a[1], b[1]]), TypeError, "sequences"),
])
def test_merge_attention_errors_are_named(call, error, words):
    q, k, v = qkv(np.float32, length=2, s=40)
    a = sdpa(q, k[:, :, :20], v[:, :, :20], enable_gqa=True, return_lse=True)
    b = sdpa(q, k[:, :, 20:], v[:, :, 20:], enable_gqa=True, return_lse=True)
    with pytest.raises(error, match=words):
        call(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [3, 40])
def test_return_scores_gives_the_masked_scores_before_the_softmax(dtype, length, threads):
    q, k, v = qkv(dtype, length=length, s=600)
    rng = np.random.default_rng(5)
    compute = np.float64 if dtype == np.float64 else np.float32
    bias = rng.standard_normal((1, 4, length, 600)).astype(dtype)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    lengths = np.array([600, 333, 17])
    kw = {"enable_gqa": True, "is_causal": True, "causal_alignment": "bottom_right", "softcap": 5.0,
          "attn_mask": bias, "alibi_slopes": slopes, "key_lengths": lengths}
    threads(1)
    out, weights, scores = sdpa(q, k, v, return_weights=True, return_scores=True, **kw)
    assert scores.dtype == compute and scores.shape == (3, 4, length, 600)
    # float64 reference: scaled, softcapped, then the bias and ALiBi added, masked pairs -inf.
    q64, k64 = (np.asarray(x, np.float64) for x in (q, k))
    raw = q64 @ np.repeat(k64, 2, axis=1).swapaxes(-1, -2) / np.sqrt(32)
    want = 5.0 * np.tanh(raw / 5.0) + np.asarray(bias, np.float64)
    for b, n in enumerate(lengths):
        i = np.arange(length)[:, None] + n - length
        j = np.arange(600)[None, :]
        want[b] -= slopes[:, None, None] * np.abs(i - j)
        want[b] = np.where((j <= i) & (j < n), want[b], -np.inf)
    masked = np.isneginf(want)
    assert (np.isneginf(scores) == masked).all()
    tol = 64 * float(np.finfo(compute).eps) * (1 + np.abs(np.where(masked, 0, want)))
    assert (np.abs(np.where(masked, 0, scores - np.where(masked, 0, want))) <= tol).all()
    # The weights are their softmax; the bits do not depend on the thread count.
    s64 = np.asarray(scores, np.float64)
    top = s64.max(axis=-1, keepdims=True)
    soft = np.exp(s64 - np.where(np.isneginf(top), 0, top))  # rows with no key: all zero
    total = soft.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(weights, soft / np.where(total == 0, 1, total), rtol=0, atol=1e-5)
    threads(2)
    again = sdpa(q, k, v, return_weights=True, return_scores=True, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(again, (out, weights, scores)))


def test_key_starts_read_each_items_keys_from_its_own_row():
    q, k, v = qkv(np.float32, length=20, s=1000)
    starts, lengths = np.array([0, 512, 300]), np.array([400, 488, 37])
    kw = {"enable_gqa": True, "is_causal": True, "causal_alignment": "bottom_right"}
    got = sdpa(q, k, v, key_lengths=lengths, key_starts=starts, **kw)
    for b in range(3):
        rows = slice(starts[b], starts[b] + lengths[b])
        assert np.array_equal(got[b:b + 1], sdpa(q[b:b + 1], k[b:b + 1, :, rows], v[b:b + 1, :, rows], **kw))
    with pytest.raises(ValueError, match="key_starts: needs key_lengths"):
        sdpa(q, k, v, key_starts=starts, **kw)
    with pytest.raises(ValueError, match="key_starts: item 1's 488 keys from row 513 do not fit the 1000 rows"):
        sdpa(q, k, v, key_lengths=lengths, key_starts=np.array([0, 513, 0]), **kw)
