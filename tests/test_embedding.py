"""attnkit.embedding and attnkit.embedding_bag against the float64 reference and PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attnkit
from conftest import layouts
from reference import embedding as ref_embedding
from reference import embedding_bag as ref_bag

ID_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOATS = [np.float32, np.float64]


def table(rows, dim, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(dtype)


def bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_lookup_is_a_bit_exact_copy_for_every_id_dtype(id_dtype, dtype):
    w = table(100, 7, dtype)
    w[3, 0] = np.frombuffer(np.uint32(0x7FC01234).tobytes(), np.float32)[0] if dtype == np.float32 else np.nan
    w[3, 1] = -0.0
    ids = np.random.default_rng(1).integers(0, 100, size=(4, 9)).astype(id_dtype)
    ids[0, 0] = 3
    out = attnkit.embedding(ids, w)
    assert out.shape == (4, 9, 7) and out.dtype == dtype
    np.testing.assert_array_equal(bits(out), bits(ref_embedding(ids, w)))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 5), (2, 3, 4)])
def test_lookup_shapes_including_0d_and_empty(shape):
    w = table(10, 4)
    ids = np.full(shape, 2, dtype=np.int64)
    out = attnkit.embedding(ids, w)
    assert out.shape == shape + (4,)
    np.testing.assert_array_equal(out, ref_embedding(ids, w))


def test_lookup_with_empty_table_dimension():
    out = attnkit.embedding(np.array([1, 0]), np.zeros((2, 0), np.float32))
    assert out.shape == (2, 0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_scale_multiplies_in_the_table_dtype(dtype):
    w = table(50, 16, dtype)
    ids = np.arange(50)
    scale = float(np.sqrt(16.0)) + 0.1
    out = attnkit.embedding(ids, w, scale=scale)
    np.testing.assert_array_equal(bits(out), bits(w[ids] * dtype(scale)))


def test_inputs_in_any_layout_give_the_same_bits():
    w = table(40, 12)
    ids = np.random.default_rng(2).integers(0, 40, size=(6, 5)).astype(np.int32)
    want = attnkit.embedding(ids, w)
    for name, variant in layouts(ids):
        np.testing.assert_array_equal(attnkit.embedding(variant, w), want, err_msg=f"ids {name}")
    for name, variant in layouts(w):
        np.testing.assert_array_equal(attnkit.embedding(ids, variant), want, err_msg=f"weight {name}")
    broadcast = np.broadcast_to(ids[:1], (6, 5))
    np.testing.assert_array_equal(attnkit.embedding(broadcast, w), attnkit.embedding(broadcast.copy(), w))


def test_inputs_are_not_modified():
    w = table(10, 3)
    ids = np.array([1, 2, 3])
    w0, ids0 = w.copy(), ids.copy()
    attnkit.embedding(ids, w, scale=2.0)
    attnkit.embedding_bag(ids, w, np.array([0]), mode="sum")
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(ids, ids0)


@given(
    ids=hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6), elements=st.integers(0, 19)),
    dim=st.integers(0, 9),
)
def test_lookup_property_matches_reference(ids, dim):
    w = table(20, dim)
    np.testing.assert_array_equal(attnkit.embedding(ids, w), ref_embedding(ids, w))


# ---------------------------------------------------------------- bags


def split(ids, offsets):
    bounds = list(offsets) + [len(ids)]
    return [list(ids[bounds[b] : bounds[b + 1]]) for b in range(len(offsets))]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("padding_idx", [None, 4, -1])
def test_variable_bags_match_reference(mode, dtype, padding_idx):
    w = table(30, 11, dtype)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30, size=40)
    ids[::5] = 4
    ids[1::7] = 29
    offsets = np.array([0, 0, 3, 3, 17, 39])  # two empty bags
    out = attnkit.embedding_bag(ids, w, offsets, mode=mode, padding_idx=padding_idx)
    pad = None if padding_idx is None else padding_idx % 30
    want = ref_bag(split(ids, offsets), w, mode, padding_idx=pad)
    assert out.dtype == dtype and out.shape == (6, 11)
    eps = np.finfo(dtype).eps
    # float64 accumulation, one rounding: within half an ulp of the float64 reference (plus its own error).
    np.testing.assert_allclose(out, want, rtol=eps, atol=eps * np.abs(w).max() * 1e-3)
    np.testing.assert_array_equal(out[0], 0.0)


def test_fixed_bags_and_per_sample_weights():
    w = table(10, 4)
    ids = np.array([[1, 2, 3], [4, 4, 9]])
    psw = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 0.25]], dtype=np.float32)
    out = attnkit.embedding_bag(ids, w, mode="sum", per_sample_weights=psw)
    want = ref_bag(ids.tolist(), w, "sum", per_sample_weights=psw.astype(np.float64).tolist())
    np.testing.assert_allclose(out, want, rtol=1e-7, atol=1e-7)


def test_include_last_offset_ignores_trailing_ids_like_torch():
    w = table(5, 2)
    ids = np.array([0, 1, 2, 3])
    out = attnkit.embedding_bag(ids, w, np.array([0, 2, 3]), mode="sum", include_last_offset=True)
    np.testing.assert_allclose(out, ref_bag([[0, 1], [2]], w, "sum"), rtol=1e-7)


def test_max_propagates_nan_whatever_its_position():
    w = np.array([[np.nan], [1.0]], dtype=np.float32)
    for ids in ([0, 1], [1, 0]):
        assert np.isnan(attnkit.embedding_bag(np.array(ids), w, np.array([0]), mode="max")[0, 0])


def test_empty_batches():
    w = table(5, 3)
    assert attnkit.embedding_bag(np.zeros((0, 4), np.int64), w).shape == (0, 3)
    np.testing.assert_array_equal(attnkit.embedding_bag(np.zeros((2, 0), np.int64), w), np.zeros((2, 3), np.float32))
    assert attnkit.embedding_bag(np.zeros(0, np.int64), w, np.zeros(0, np.int64)).shape == (0, 3)


# ---------------------------------------------------------------- PyTorch as an oracle


@pytest.mark.parametrize("dtype", FLOATS)
def test_lookup_matches_torch_bit_for_bit(dtype):
    torch = pytest.importorskip("torch")
    w = table(64, 13, dtype)
    ids = np.random.default_rng(4).integers(0, 64, size=(3, 17))
    want = torch.nn.functional.embedding(torch.from_numpy(ids), torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(bits(attnkit.embedding(ids, w)), bits(want))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_bags_match_torch(mode, padding_idx):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    w = table(20, 6)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 20, size=30)
    ids[::4] = 2
    offsets = np.array([0, 5, 5, 12, 29])
    psw = rng.standard_normal(30).astype(np.float32) if mode == "sum" else None
    got = attnkit.embedding_bag(ids, w, offsets, mode=mode, padding_idx=padding_idx, per_sample_weights=psw)
    want = F.embedding_bag(
        torch.from_numpy(ids), torch.from_numpy(w), torch.from_numpy(offsets), mode=mode, padding_idx=padding_idx,
        per_sample_weights=None if psw is None else torch.from_numpy(psw),
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    fixed = ids[:28].reshape(4, 7)
    got = attnkit.embedding_bag(fixed, w, mode=mode, padding_idx=padding_idx)
    want = F.embedding_bag(torch.from_numpy(fixed), torch.from_numpy(w), mode=mode, padding_idx=padding_idx).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
