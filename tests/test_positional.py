"""Sinusoidal encodings, position ids, ALiBi slopes and T5 relative positions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnkit
import reference as ref
from conftest import layouts

FLOATS = [np.float32, np.float64]
FAR = 1 << 20


def far_positions(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.arange(64), rng.integers(0, FAR + 1, size=n), [FAR - 1, FAR]]).astype(np.int64)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["interleaved", "halves"])
@pytest.mark.parametrize("dim", [2, 64, 130])
def test_sinusoidal_within_one_ulp_up_to_2_pow_20(dtype, layout, dim):
    pos = far_positions()
    out = attnkit.sinusoidal_positions(pos, dim, layout=layout, dtype=dtype)
    assert out.shape == (pos.size, dim) and out.dtype == dtype
    np.testing.assert_array_max_ulp(out, ref.sinusoidal(pos, dim, layout=layout, dtype=dtype), maxulp=1)


def test_sinusoidal_layouts_hold_the_same_values():
    a = attnkit.sinusoidal_positions(7, 8, layout="interleaved")
    b = attnkit.sinusoidal_positions(7, 8, layout="halves")
    np.testing.assert_array_equal(a[:, 0::2], b[:, :4])
    np.testing.assert_array_equal(a[:, 1::2], b[:, 4:])


def test_sinusoidal_matches_the_paper_at_small_positions():
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), written out directly.
    d = 6
    out = attnkit.sinusoidal_positions(np.array([0, 1, 9]), d, dtype=np.float64)
    for r, pos in enumerate([0, 1, 9]):
        for i in range(d // 2):
            assert out[r, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)), abs=1e-15)
            assert out[r, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)), abs=1e-15)


@pytest.mark.parametrize("shape", [(), (0,), (2, 3), (4, 0)])
def test_sinusoidal_position_shapes(shape):
    pos = np.full(shape, 5, dtype=np.int16)
    out = attnkit.sinusoidal_positions(pos, 4)
    assert out.shape == shape + (4,)
    if out.size:
        np.testing.assert_array_equal(out.reshape(-1, 4), attnkit.sinusoidal_positions(np.array([5]), 4).repeat(out.size // 4, 0))
    assert attnkit.sinusoidal_positions(3, 0).shape == (3, 0)


def test_sinusoidal_positions_in_any_layout_and_negative():
    pos = np.array([[3, -7, 1000], [0, 2, 2**20]], dtype=np.int64)
    want = attnkit.sinusoidal_positions(pos, 16)
    for name, variant in layouts(pos):
        np.testing.assert_array_equal(attnkit.sinusoidal_positions(variant, 16), want, err_msg=name)
    np.testing.assert_array_max_ulp(want, ref.sinusoidal(pos, 16), maxulp=1)


def test_position_ids_left_and_right_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])
    want = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 0, 0], [0, 0, 1, 0, 2], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(attnkit.position_ids(mask), want)
    np.testing.assert_array_equal(attnkit.position_ids(mask.astype(bool), offset=2), np.where(mask, want + 2, 2))
    assert attnkit.position_ids(np.zeros((2, 0), np.int64)).shape == (2, 0)
    assert attnkit.position_ids(mask).dtype == np.int64


def test_learned_positions_are_embedding_of_position_ids():
    table = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    out = attnkit.embedding(attnkit.position_ids(mask), table)
    np.testing.assert_array_equal(out[0, 1:], table[:2])
    np.testing.assert_array_equal(out[1], table[:3])


# ---------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("n", list(range(1, 65)) + [80, 96, 100, 128])
def test_alibi_slopes_follow_the_paper_for_every_head_count(n):
    out = attnkit.alibi_slopes(n)
    assert out.shape == (n,) and out.dtype == np.float64
    # The paper's code raises a rounded base to the power h, so its error grows with h (up to about
    # n + 2 rounding units); ours is one exp2 per slope, within 1 ulp of the exact value.
    np.testing.assert_allclose(out, ref.alibi_slopes_paper(n), rtol=(n + 2) * 2.0**-53)
    exact = np.exp2(-np.longdouble(8) * np.array(ref.alibi_exponents(n), dtype=np.longdouble))
    np.testing.assert_array_max_ulp(out, exact.astype(np.float64), maxulp=1)


def test_alibi_slopes_exact_for_powers_of_two():
    np.testing.assert_array_equal(attnkit.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    assert attnkit.alibi_slopes(0).shape == (0,)


@pytest.mark.parametrize("n", [1, 5, 8, 12, 16, 24, 32, 40, 112])
def test_alibi_slopes_match_bloom(n):
    torch = pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    alibi = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)  # (heads, 1, 2): slope * position
    # BLOOM raises a float32-rounded base to the power h in float32: (n + 2) float32 rounding units.
    np.testing.assert_allclose(attnkit.alibi_slopes(n), alibi[:, 0, 1].double().numpy(), rtol=(n + 2) * 2.0**-24)


# ---------------------------------------------------------------- T5 relative positions

BUCKET_OPTIONS = [(True, 32, 128), (False, 32, 128), (True, 64, 256), (False, 8, 20), (True, 4, 3)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKET_OPTIONS)
def test_buckets_match_t5_scalar_reference(bidirectional, num_buckets, max_distance):
    rel = np.arange(-600, 601)
    out = attnkit.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    want = [ref.t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(out, want)
    assert out.min() >= 0 and out.max() < num_buckets


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKET_OPTIONS)
def test_buckets_match_transformers_t5(bidirectional, num_buckets, max_distance):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = np.arange(-5000, 5000).reshape(4, -1)
    want = t5.T5Attention._relative_position_bucket(torch.from_numpy(rel), bidirectional, num_buckets, max_distance)
    out = attnkit.relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(out, want.numpy())


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (5, 9), (9, 5), (0, 4), (3, 0), (40, 300)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_bias_gathers_the_table_by_bucket(q_len, k_len, bidirectional):
    table = np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32)
    out = attnkit.relative_position_bias(q_len, k_len, table, bidirectional=bidirectional)
    assert out.shape == (3, q_len, k_len) and out.dtype == np.float32
    for i in range(q_len):
        for j in range(k_len):
            np.testing.assert_array_equal(out[:, i, j], table[ref.t5_bucket(j - i, bidirectional), :])


def test_bias_matches_transformers_t5_compute_bias():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, is_decoder=False)
    attn = transformers.models.t5.modeling_t5.T5Attention(cfg, has_relative_attention_bias=True)
    table = np.random.default_rng(2).standard_normal((32, 4)).astype(np.float32)
    with torch.no_grad():
        attn.relative_attention_bias.weight.copy_(torch.from_numpy(table))
        want = attn.compute_bias(37, 150)[0].numpy()
    np.testing.assert_array_equal(attnkit.relative_position_bias(37, 150, table), want)


@given(st.integers(-(10**6), 10**6), st.booleans())
def test_bucket_property_symmetric_range(r, bidirectional):
    b = int(attnkit.relative_position_bucket(np.array([r]), bidirectional=bidirectional)[0])
    assert 0 <= b < 32
    assert b == ref.t5_bucket(r, bidirectional)
