"""attnkit.KVCache: in-place appends, ragged batches, per-sequence alignment, chunked prefill,
beam reordering, cropping, growth, pickling, and errors that leave the cache unchanged."""

from __future__ import annotations

import pickle
import tracemalloc

import numpy as np
import pytest

import attnkit

try:
    import ml_dtypes

    BF16 = ml_dtypes.bfloat16
    DTYPES = [np.float32, np.float64, np.float16, BF16]
except ImportError:  # bfloat16 needs ml_dtypes
    BF16 = None
    DTYPES = [np.float32, np.float64, np.float16]

sdpa = attnkit.scaled_dot_product_attention
B, HKV, HQ, E, EV = 3, 2, 4, 32, 16


def tokens(dtype, n, seed=0, b=B):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, HQ, n, E)).astype(dtype)
    k = rng.standard_normal((b, HKV, n, E)).astype(dtype)
    v = rng.standard_normal((b, HKV, n, EV)).astype(dtype)
    return q, k, v


def state(cache):
    return cache.lengths, cache.keys().copy(), cache.values().copy()


def same_state(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [20, 100, 700])
def test_chunked_prefill_gives_the_bits_of_one_call(dtype, chunk, threads):
    """Chunks of more than 16 queries take the tiled path, as the one call does (shorter ones
    take the decode path: see the next test)."""
    q, k, v = tokens(dtype, 700)
    full = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    for n in (1, 2):
        threads(n)
        cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=1024, dtype=dtype)
        outs = []
        for c0 in range(0, 700, chunk):
            cache.append(k[:, :, c0:c0 + chunk], v[:, :, c0:c0 + chunk])
            outs.append(cache.attend(q[:, :, c0:c0 + chunk]))
        assert np.array_equal(np.concatenate(outs, axis=2), full)


# (query dtype, cache dtype): one dtype, or float32 queries over a 16-bit cache.
PAIRS = [(d, d) for d in DTYPES] + [(np.float32, np.float16)] + ([(np.float32, BF16)] if BF16 else [])


def _pair_id(pair):
    return "-".join(np.dtype(d).name for d in pair)




@pytest.mark.parametrize("pair", PAIRS, ids=_pair_id)
def test_decoding_token_by_token_gives_the_bits_of_one_causal_call(pair, threads):
    """One query at a time takes the decode path; it reads the keys in the strips the cache
    stores them in and computes each score in the tiled path's order (bfloat16 queries over a
    bfloat16 cache: the tiled path's pair mode itself), so every row is the row of one causal
    call over the whole sequence, bit for bit."""
    qdt, kdt = pair
    q, k, v = tokens(np.float32, 600)
    q, k, v = q.astype(qdt), k.astype(kdt), v.astype(kdt)
    full, full_lse = sdpa(q, k, v, is_causal=True, enable_gqa=True, return_lse=True)
    for n in (1, 2):
        threads(n)
        cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=600, dtype=kdt)
        for t in range(600):
            cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
            if n == 2 and t % 7:
                continue  # (at two threads, every seventh token)
            out, lse = cache.attend(q[:, :, t:t + 1], return_lse=True)
            assert np.array_equal(out, full[:, :, t:t + 1]), t
            assert np.array_equal(lse, full_lse[:, :, t:t + 1]), t


@pytest.mark.parametrize("hq, hkv", [(2, 2), (3, 1), (5, 1)])
def test_decoding_gives_the_bits_of_one_causal_call_for_any_group_of_heads(hq, hkv):
    """The decode kernel takes rows in pairs and a row left over alone: one, three and five rows
    per key/value head, over key counts that end inside a strip of 16."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, hq, 300, E), dtype=np.float32)
    k, v = (rng.standard_normal((2, hkv, 300, d), dtype=np.float32) for d in (E, EV))
    full = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    cache = attnkit.KVCache(2, hkv, E, value_dim=EV, capacity=300)
    for t in range(300):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert np.array_equal(cache.attend(q[:, :, t:t + 1]), full[:, :, t:t + 1]), t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("queries", [1, 20])
def test_a_ragged_batch_gives_each_sequence_the_bits_it_gets_alone(dtype, queries):
    """Sequences of different lengths, appended raggedly, then a step of new tokens for all."""
    q, k, v = tokens(dtype, 600)
    prompt = np.array([600 - queries, 150, 37])
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=640, dtype=dtype)
    cache.append(k[:, :, :600 - queries], v[:, :, :600 - queries], lengths=prompt)
    new = slice(600 - queries, 600)
    cache.append(k[:, :, new], v[:, :, new])
    out, lse = cache.attend(q[:, :, new], return_lse=True)
    assert cache.lengths.tolist() == (prompt + queries).tolist()
    for b in range(B):
        alone = attnkit.KVCache(1, HKV, E, value_dim=EV, capacity=640, dtype=dtype)
        alone.append(k[b:b + 1, :, :prompt[b]], v[b:b + 1, :, :prompt[b]])
        alone.append(k[b:b + 1, :, new], v[b:b + 1, :, new])
        want, want_lse = alone.attend(q[b:b + 1, :, new], return_lse=True)
        assert np.array_equal(out[b:b + 1], want)
        assert np.array_equal(lse[b:b + 1], want_lse)
        # ... and the last rows of one causal call over that sequence's own tokens.
        own = [np.concatenate([x[b:b + 1, :, :prompt[b]], x[b:b + 1, :, new]], axis=2) for x in (q, k, v)]
        one = sdpa(*own, is_causal=True, enable_gqa=True)
        assert np.array_equal(out[b:b + 1], one[:, :, -queries:])


def test_ragged_query_chunks_equal_each_sequence_alone():
    q, k, v = tokens(np.float32, 60)
    real = np.array([60, 25, 0])
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=64)
    cache.append(k, v, lengths=real)
    out, lse = cache.attend(q, query_lengths=real, return_lse=True)
    for b in range(B):
        alone = attnkit.KVCache(1, HKV, E, value_dim=EV, capacity=64)
        alone.append(k[b:b + 1, :, :real[b]], v[b:b + 1, :, :real[b]])
        if real[b]:
            assert np.array_equal(out[b:b + 1, :, :real[b]], alone.attend(q[b:b + 1, :, :real[b]]))
        assert (out[b, :, real[b]:] == 0).all() and np.isneginf(lse[b, :, real[b]:]).all()


@pytest.mark.parametrize("dtype", [t for t in DTYPES if np.dtype(t).itemsize == 2])
def test_a_16_bit_cache_stores_float32_rounded_once_and_takes_float32_queries(dtype):
    q, k, v = tokens(np.float32, 40)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=64, dtype=dtype)
    cache.append(k, v)
    assert np.array_equal(cache.keys(), k.astype(dtype)) and cache.keys().dtype == dtype
    out = cache.attend(q)
    assert out.dtype == np.float32
    assert np.array_equal(out, sdpa(q, k.astype(dtype), v.astype(dtype), is_causal=True, enable_gqa=True))
    out16 = cache.attend(q.astype(dtype))
    assert out16.dtype == dtype


def test_the_bshd_layout_for_appends_and_queries():
    q, k, v = tokens(np.float32, 30)
    t = lambda x: np.ascontiguousarray(x.swapaxes(1, 2))  # noqa: E731
    a = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32)
    b = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32)
    a.append(k, v)
    b.append(t(k), t(v), layout="bshd")
    assert np.array_equal(a.keys(), b.keys()) and np.array_equal(a.values(), b.values())
    assert np.array_equal(t(a.attend(q)), b.attend(t(q), layout="bshd"))


def test_appending_costs_the_new_tokens_not_the_history():
    """A one-token append into a cache holding 4000 positions allocates nothing near its size,
    and an attend call allocates its output and little else."""
    _, k, v = tokens(np.float32, 4001, b=1)
    q = np.ones((1, HQ, 1, E), np.float32)
    cache = attnkit.KVCache(1, HKV, E, value_dim=EV, capacity=4096)
    cache.append(k[:, :, :4000], v[:, :, :4000])
    history = cache.keys().nbytes
    tracemalloc.start()
    try:
        cache.append(k[:, :, 4000:], v[:, :, 4000:])
        cache.attend(q)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < history / 20, (peak, history)


def test_past_capacity_raises_and_leaves_the_cache_unchanged_unless_growable():
    q, k, v = tokens(np.float32, 40)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=50)
    cache.append(k[:, :, :30], v[:, :, :30], lengths=[30, 10, 20])
    before = state(cache)
    with pytest.raises(ValueError, match="sequence 0 would reach 60 positions, past the cache's capacity 50"):
        cache.append(k[:, :, :30], v[:, :, :30])
    assert same_state(state(cache), before)
    grows = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=8, growable=True)
    grows.append(k[:, :, :30], v[:, :, :30], lengths=[30, 10, 20])
    grows.append(k[:, :, 30:], v[:, :, 30:])
    cache.append(k[:, :, 30:], v[:, :, 30:], lengths=[10, 10, 10])
    assert grows.capacity >= 40 and same_state(state(grows), state(cache))
    assert np.array_equal(grows.attend(q[:, :, :3]), cache.attend(q[:, :, :3]))


@pytest.mark.parametrize("call, error, words", [
    (lambda c, k, v: c.append(k[:, :1], v[:, :1]), ValueError, "key: 3 sequences x 1 heads x size 32, the cache holds 3 x 2 x 32"),
    (lambda c, k, v: c.append(k, v[..., :8]), ValueError, "value: 3 sequences x 2 heads x size 8"),
    (lambda c, k, v: c.append(k, v[:, :, :3]), ValueError, "value: 3 new positions, the key has 4"),
    (lambda c, k, v: c.append(k.astype(np.float64), v), TypeError, "key: dtype float64 for a float32 cache"),
    (lambda c, k, v: c.append(k[0], v[0]), ValueError, "key: expected a 4-d array"),
    (lambda c, k, v: c.append(k, v, lengths=[1, 5, 1]), ValueError, "lengths: each must lie in 0..4"),
    (lambda c, k, v: c.append(k, v, lengths=[1, 1]), ValueError, r"lengths: expected shape \(3,\)"),
    (lambda c, k, v: c.append(k, v, lengths=[1.0, 1.0, 1.0]), TypeError, "lengths: expected an integer array"),
    (lambda c, k, v: c.append(k, v, layout="bsdh"), ValueError, "layout: expected one of"),
    (lambda c, k, v: c.reorder([0, 3, 1]), IndexError, "indices: 3 is not a sequence of the cache"),
    (lambda c, k, v: c.reorder([0, -1, 1]), IndexError, "indices: -1"),
    (lambda c, k, v: c.reorder([0, 1]), ValueError, r"indices: expected shape \(3,\)"),
    (lambda c, k, v: c.crop([4, 2, 1]), ValueError, "lengths: 4 for sequence 0, longer than its 2 positions"),
    (lambda c, k, v: c.attend(np.ones((3, 3, 1, 32), np.float32)), ValueError, "query heads must be a multiple"),
    (lambda c, k, v: c.attend(np.ones((3, 4, 1, 32), np.float64)), TypeError, "query: dtype float64 for a float32 cache"),
    (lambda c, k, v: c.attend(np.ones((2, 4, 1, 32), np.float32)), ValueError, "query: 2 sequences"),
])
def test_errors_name_the_argument_and_leave_the_cache_unchanged(call, error, words):
    _, k, v = tokens(np.float32, 4)
    cache = attnkit.KVCache(B, HKV, E, capacity=16)
    cache.append(k, tokens(np.float32, 4)[1], lengths=[2, 3, 4])
    before = state(cache)
    with pytest.raises(error, match=words):
        call(cache, k, tokens(np.float32, 4)[1])
    assert same_state(state(cache), before)


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="num_kv_heads: expected an int >= 1"):
        attnkit.KVCache(1, 0, 8, capacity=4)
    with pytest.raises(TypeError, match="capacity: expected an int"):
        attnkit.KVCache(1, 1, 8, capacity=4.0)
    with pytest.raises(TypeError, match="dtype: expected"):
        attnkit.KVCache(1, 1, 8, capacity=4, dtype=np.int32)
    with pytest.raises(MemoryError, match="KVCache storage"):
        attnkit.KVCache(1 << 20, 1 << 10, 1 << 10, capacity=1 << 20)


def test_reorder_follows_the_beams():
    q, k, v = tokens(np.float32, 20)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32)
    cache.append(k, v, lengths=[20, 5, 12])
    cache.reorder([2, 2, 0])
    want = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32)
    order = [2, 2, 0]
    want.append(k[order], v[order], lengths=[12, 12, 20])
    assert same_state(state(cache), state(want))
    assert np.array_equal(cache.attend(q[:, :, :1]), want.attend(q[:, :, :1]))


def test_crop_rolls_back_rejected_tokens():
    q, k, v = tokens(np.float32, 20)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32)
    cache.append(k[:, :, :10], v[:, :, :10])
    cache.append(k[:, :, 10:15], v[:, :, 10:15])  # draft tokens
    cache.crop([12, 10, 11])  # some accepted
    cache.append(k[:, :, 15:], v[:, :, 15:], lengths=[5, 5, 5])
    for b, kept in enumerate([12, 10, 11]):
        # The last rows of one causal call over the tokens kept (through a cache of its own: at
        # most 16 queries take the decode path, which computes as the cache's reads of them).
        own = [np.concatenate([x[b:b + 1, :, :kept], x[b:b + 1, :, 15:]], axis=2) for x in (q, k, v)]
        alone = attnkit.KVCache(1, HKV, E, value_dim=EV, capacity=32)
        alone.append(own[1], own[2])
        assert np.array_equal(cache.attend(q[:, :, 15:])[b:b + 1], alone.attend(own[0])[:, :, -5:])
    cache.crop(0)
    assert cache.lengths.tolist() == [0, 0, 0]


def test_pickle_round_trip_and_repr():
    q, k, v = tokens(np.float32, 9)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=4096)
    cache.append(k, v, lengths=[9, 3, 0])
    blob = pickle.dumps(cache)
    assert len(blob) < 2 * (k.nbytes + v.nbytes)  # the filled positions, not the capacity
    back = pickle.loads(blob)
    assert back.capacity == 4096 and same_state(state(back), state(cache))
    assert np.array_equal(back.attend(q[:, :, :1]), cache.attend(q[:, :, :1]))
    assert repr(cache) == ("KVCache(batch=3, num_kv_heads=2, head_dim=32, value_dim=16, capacity=4096, "
                           "dtype=float32, lengths=[9, 3, 0])")


def test_a_sequence_with_no_keys_attends_to_nothing():
    q, k, v = tokens(np.float32, 3)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=8)
    cache.append(k, v, lengths=[3, 0, 1])
    out, lse = cache.attend(q[:, :, :1], return_lse=True)
    assert (out[1] == 0).all() and np.isneginf(lse[1]).all() and np.isfinite(lse[[0, 2]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_quick_paths_of_append_and_attend_agree_with_the_full_ones(dtype):
    """A plain step (bhsd arrays of the cache's dtype, no options) skips the argument checks of
    the full path; both must give the same cache and the same bits."""
    q, k, v = tokens(dtype, 30)
    quick = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32, dtype=dtype)
    full = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=32, dtype=dtype)
    quick.append(k[:, :, :20], v[:, :, :20])
    full.append(list(k[:, :, :20]), list(v[:, :, :20]))  # lists: the full path
    assert same_state(state(quick), state(full))
    quick.append(k[:, :, 20:], v[:, :, 20:], lengths=[10, 4, 0])  # ragged: the full path
    quick.append(k[:, :, :1], v[:, :, :1])  # lengths differ: one token after each's own length
    full.append(k[:, :, 20:], v[:, :, 20:], lengths=[10, 4, 0])
    full.append(list(k[:, :, :1]), list(v[:, :, :1]))
    assert same_state(state(quick), state(full))
    assert np.array_equal(quick.attend(q[:, :, :1]), full.attend(q[:, :, :1], return_lse=True)[0])
    assert np.array_equal(quick.attend(q[:, :, :3], is_causal=False), full.attend(list(q[:, :, :3]), is_causal=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_bshd_steps_over_a_ragged_batch_give_each_sequence_the_bits_it_gets_alone(dtype):
    """A decoder's loop: a ragged prefill, then appends and queries in the bshd layout without
    lengths (the quick paths: one token at each sequence's own length, then two), against each
    sequence in a cache of its own fed bhsd arrays."""
    q, k, v = tokens(dtype, 40)
    t = lambda x: x.swapaxes(1, 2)  # noqa: E731 - bshd views, as a model's projections give
    prompt = [30, 11, 1]
    steps = [(30, 31), (31, 32), (32, 34), (34, 35)]
    batch = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=40, dtype=dtype)
    batch.append(t(k[:, :, :30]), t(v[:, :, :30]), lengths=prompt, layout="bshd")
    outs = []
    for a, b in steps:
        batch.append(t(k[:, :, a:b]), t(v[:, :, a:b]), layout="bshd")
        outs.append(batch.attend(t(q[:, :, a:b]), layout="bshd"))
        assert outs[-1].shape == (B, b - a, HQ, EV)
    assert batch.lengths.tolist() == [p + 5 for p in prompt]
    for i in range(B):
        alone = attnkit.KVCache(1, HKV, E, value_dim=EV, capacity=40, dtype=dtype)
        alone.append(k[i:i + 1, :, :prompt[i]], v[i:i + 1, :, :prompt[i]])
        for (a, b), out in zip(steps, outs):
            alone.append(k[i:i + 1, :, a:b], v[i:i + 1, :, a:b])
            assert np.array_equal(out[i:i + 1], t(alone.attend(q[i:i + 1, :, a:b]))), (i, a)
        n = prompt[i] + 5
        assert np.array_equal(batch.keys()[i, :, :n], alone.keys()[0])
        assert np.array_equal(batch.values()[i, :, :n], alone.values()[0])


def _grow_both(full, ring, k, v, chunks, lengths=None):
    """Appends the same tokens to a full cache and a rotating one, chunk by chunk."""
    for a, b in zip(chunks, chunks[1:]):
        extra = {} if lengths is None else {"lengths": np.minimum(lengths, b - a)}
        full.append(k[:, :, a:b], v[:, :, a:b], **extra)
        ring.append(k[:, :, a:b], v[:, :, a:b], **extra)
        yield a, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 24])
def test_a_rotating_cache_gives_the_bits_of_a_full_cache_with_its_window(dtype, step, threads):
    q, k, v = tokens(dtype, 1400)
    window = 300
    for n in (1, 2):
        threads(n)
        full = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=1400, dtype=dtype)
        ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=step, dtype=dtype, window=window)
        shape = ring.shape
        for a, b in _grow_both(full, ring, k, v, list(range(0, 1400, step)) + [1400]):
            if a % (5 * step) and b < 1390:
                continue
            want = full.attend(q[:, :, a:b], window=(window, None))
            assert np.array_equal(ring.attend(q[:, :, a:b]), want), (a, b)
        # Bounded: twice (the window, two appends' worth and a chunk of margin), whatever was appended.
        assert ring.shape == shape and shape[2] <= 2 * (window + 2 * step + 1023)
        assert np.array_equal(ring.keys(), full.keys()[:, :, -window:])


def test_a_rotating_cache_takes_ragged_appends_and_queries():
    q, k, v = tokens(np.float32, 900)
    full = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=900)
    ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=30, window=200)
    real = np.array([30, 17, 3])
    for a, b in _grow_both(full, ring, k, v, list(range(0, 900, 30)), lengths=real):
        ql = np.minimum(real, b - a)
        kw = {"query_lengths": ql, "return_lse": True}
        got, want = ring.attend(q[:, :, a:b], **kw), full.attend(q[:, :, a:b], window=(200, None), **kw)
        assert all(np.array_equal(x, y) for x, y in zip(got, want)), (a, b)


def test_a_rotating_cache_rolls_back_reorders_and_pickles():
    q, k, v = tokens(np.float32, 700)
    full = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=700)
    ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=8, window=100)
    list(_grow_both(full, ring, k, v, list(range(0, 600, 8)) + [600]))
    for cache in (full, ring):
        cache.crop([595, 592, 600])  # rejected draft tokens
        cache.reorder([2, 0, 0])
    list(_grow_both(full, ring, k, v, [600, 606]))
    back = pickle.loads(pickle.dumps(ring))
    assert repr(back) == repr(ring) and "window=100" in repr(ring)
    want = full.attend(q[:, :, 600:606], window=(100, None))
    assert np.array_equal(ring.attend(q[:, :, 600:606]), want)
    assert np.array_equal(back.attend(q[:, :, 600:606]), want)
    assert len(pickle.dumps(ring)) < 2.2 * (ring.shape[0] * ring.shape[1] * ring.shape[2] // 2) * (E + EV) * 4


@pytest.mark.parametrize("call, error, words", [
    (lambda c, q, k, v: c.append(k[:, :, :9], v[:, :, :9]), ValueError, "key: 9 new positions, more than the 8"),
    (lambda c, q, k, v: c.attend(q[:, :, :9]), ValueError, "query: 9 queries, more than the 8"),
    (lambda c, q, k, v: c.attend(q[:, :, :1], window=(101, None)), ValueError, "window: a rotating cache of window 100"),
    (lambda c, q, k, v: c.crop([0, 0, 0]), ValueError, "rolls back 40 positions; a rotating cache keeps 8"),
])
def test_rotating_cache_errors_leave_it_unchanged(call, error, words):
    q, k, v = tokens(np.float32, 40)
    ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=8, window=100)
    for a in range(0, 40, 8):
        ring.append(k[:, :, a:a + 8], v[:, :, a:a + 8])
    before = state(ring)
    with pytest.raises(error, match=words):
        call(ring, q, k, v)
    assert same_state(state(ring), before)


def test_a_rotating_cache_is_not_growable():
    with pytest.raises(ValueError, match="window: a rotating cache has a fixed size"):
        attnkit.KVCache(1, 1, 8, capacity=4, window=16, growable=True)
    with pytest.raises(ValueError, match="capacity: a rotating cache needs capacity >= 1"):
        attnkit.KVCache(1, 1, 8, capacity=0, window=16)


def _streaming_reference(q, k, v, first, window, sinks):
    """float64: query positions first.. over the keys up to each, within the window or among the
    first ``sinks`` positions."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    i, j = np.arange(first, first + q.shape[2])[:, None], np.arange(k.shape[2])[None, :]
    s = np.where((j <= i) & ((j >= i - window) | (j < sinks)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p @ v) / p.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 20])
def test_sink_tokens_are_attended_besides_the_window(dtype, step):
    q, k, v = tokens(dtype, 900)
    ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=step, dtype=dtype, window=200, sink_tokens=4)
    compute = np.float64 if dtype == np.float64 else np.float32
    eps = {np.float64: 2.0 ** -52, np.float32: 2.0 ** -23, np.float16: 2.0 ** -10}.get(dtype, 2.0 ** -7)
    for a in range(0, 900, step):
        ring.append(k[:, :, a:a + step], v[:, :, a:a + step])
        if a % (7 * step) and a < 880:
            continue
        out, lse = ring.attend(q[:, :, a:a + step], return_lse=True)
        assert out.dtype == dtype and lse.dtype == compute
        want = _streaming_reference(q[:, :, a:a + step], k[:, :, :a + step], v[:, :, :a + step], a, 200, 4)
        vmax = np.abs(np.asarray(v, np.float64)).max()
        assert np.abs(np.asarray(out, np.float64) - want).max() <= 16 * eps * vmax, a
    assert "sink_tokens=4" in repr(ring)
    back = pickle.loads(pickle.dumps(ring))
    assert np.array_equal(back.attend(q[:, :, :1]), ring.attend(q[:, :, :1]))


def test_sink_tokens_need_a_window_and_refuse_alibi():
    with pytest.raises(ValueError, match="sink_tokens: kept besides a window"):
        attnkit.KVCache(1, 1, 8, capacity=4, sink_tokens=2)
    q, k, v = tokens(np.float32, 4)
    ring = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=4, window=16, sink_tokens=2)
    ring.append(k, v)
    with pytest.raises(ValueError, match="alibi_slopes: not taken with sink_tokens"):
        ring.attend(q, alibi_slopes=np.ones(HQ))


def test_the_cache_never_shares_its_lengths_with_a_caller():
    """A decode loop crops back to an array it keeps; appending must change neither that array
    nor the crop that follows (the quick append path once grew such an array in place)."""
    _, k, v = tokens(np.float32, 8)
    cache = attnkit.KVCache(B, HKV, E, value_dim=EV, capacity=16)
    cache.append(k[:, :, :4], v[:, :, :4])
    steady = cache.lengths
    for _ in range(3):
        cache.append(k[:, :, 4:5], v[:, :, 4:5])
        assert cache.lengths.tolist() == [5, 5, 5] and steady.tolist() == [4, 4, 4]
        cache.crop(steady)
        assert cache.lengths.tolist() == [4, 4, 4]
    indices = np.array([2, 1, 0])
    cache.reorder(indices)
    cache.append(k[:, :, 4:5], v[:, :, 4:5])
    assert indices.tolist() == [2, 1, 0]
