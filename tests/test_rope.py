"""RoPE: frequencies with every scaling variant, cos/sin tables, and the rotation itself."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attnkit
import reference as ref
from conftest import layouts

FLOATS = [np.float32, np.float64]
FAR = 1 << 20

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 2048},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 4096, "factor": 32.0,
                 "short_factor": list(np.linspace(1.0, 1.2, 32)), "long_factor": list(np.linspace(1.0, 40.0, 32))},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


def test_default_frequencies_are_the_float64_formula():
    inv_freq, factor = attnkit.rope_frequencies(128, base=500000.0)
    np.testing.assert_array_equal(inv_freq, ref.inverse_frequencies(128, 500000.0))
    assert factor == 1.0 and inv_freq.dtype == np.float64
    assert attnkit.rope_frequencies(0)[0].shape == (0,)


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [None, 1000, 20000])
def test_scaled_frequencies_match_transformers(name, seq_len):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    params = {k: v for k, v in scaling.items() if k != "max_position_embeddings"}
    cfg = transformers.LlamaConfig(
        hidden_size=512, num_attention_heads=8, head_dim=64,
        max_position_embeddings=scaling.get("max_position_embeddings", 131072),
        rope_parameters={"rope_theta": 10000.0, **params},
    )
    want, want_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu", seq_len=seq_len)
    inv_freq, factor = attnkit.rope_frequencies(64, scaling=scaling, seq_len=seq_len)
    # transformers computes in float32. Rounding the exponent 2i/d to float32 alone changes
    # base ** (2i/d) by up to ln(base) * 2**-24 relative; a few more roundings follow.
    rtol = 2 * np.log(10000.0) * 2.0**-24 + 4 * 2.0**-24
    np.testing.assert_allclose(inv_freq, want.double().numpy(), rtol=rtol)
    assert factor == pytest.approx(float(want_factor), rel=1e-12)


def test_dynamic_changes_only_past_the_trained_length_and_longrope_switches_factors():
    s = SCALINGS["dynamic"]
    np.testing.assert_array_equal(attnkit.rope_frequencies(64, scaling=s, seq_len=100)[0], attnkit.rope_frequencies(64)[0])
    assert np.all(attnkit.rope_frequencies(64, scaling=s, seq_len=8192)[0][1:] < attnkit.rope_frequencies(64)[0][1:])
    lr = SCALINGS["longrope"]
    short, f = attnkit.rope_frequencies(64, scaling=lr, seq_len=4096)
    long, _ = attnkit.rope_frequencies(64, scaling=lr, seq_len=4097)
    np.testing.assert_allclose(short * np.array(lr["short_factor"]), long * np.array(lr["long_factor"]), rtol=1e-15)
    assert f == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))


def test_old_style_type_key_and_transformers_v5_keys_are_accepted():
    a = attnkit.rope_frequencies(32, scaling={"type": "linear", "factor": 2.0})
    b = attnkit.rope_frequencies(32, scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                               "partial_rotary_factor": 1.0})
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", [None, "linear", "yarn", "llama3"])
def test_cos_sin_within_one_ulp_up_to_2_pow_20(dtype, name):
    scaling = SCALINGS[name] if name else None
    pos = np.concatenate([np.arange(100), np.random.default_rng(0).integers(0, FAR, 300), [FAR]])
    cos, sin = attnkit.rope_cos_sin(pos, 64, scaling=scaling, dtype=dtype)
    inv_freq, factor = attnkit.rope_frequencies(64, scaling=scaling, seq_len=FAR + 1)
    want_cos, want_sin = ref.rope_cos_sin(pos, inv_freq, factor, dtype)
    assert cos.shape == sin.shape == (pos.size, 32) and cos.dtype == dtype
    # factor * cos is one more float64 rounding: it can reach 2 float64 ulp when factor != 1.
    maxulp = 2 if dtype == np.float64 and factor != 1.0 else 1
    np.testing.assert_array_max_ulp(cos, want_cos, maxulp=maxulp)
    np.testing.assert_array_max_ulp(sin, want_sin, maxulp=maxulp)


def test_cos_sin_keep_the_shape_of_positions():
    pos = attnkit.position_ids(np.array([[0, 1, 1], [1, 1, 1]]))
    cos, sin = attnkit.rope_cos_sin(pos, 8)
    assert cos.shape == (2, 3, 4)
    np.testing.assert_array_equal(cos[1], attnkit.rope_cos_sin(3, 8)[0])


def random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("rotary,per_batch", [(16, False), (10, True), (0, False), (6, False)])
def test_apply_matches_reference(dtype, style, layout, rotary, per_batch):
    b, h, s, d = 2, 3, 7, 16
    x = random((b, h, s, d) if layout == "bhsd" else (b, s, h, d), dtype)
    pos = np.arange(b * s).reshape(b, s) * 37 if per_batch else np.arange(s)
    cos, sin = attnkit.rope_cos_sin(pos, rotary, dtype=dtype)
    out = attnkit.apply_rope(x, cos, sin, style=style, layout=layout)
    assert out.shape == x.shape and out.dtype == dtype
    want = ref.apply_rope(x, cos, sin, style, layout)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(out, want, rtol=0, atol=4 * eps * np.abs(x).max())
    rotated = slice(rotary, None)
    np.testing.assert_array_equal(out[..., rotated], x[..., rotated])


@pytest.mark.parametrize("dtype", FLOATS)
def test_half_style_is_the_numpy_expression_bit_for_bit(dtype):
    x = random((2, 4, 9, 8), dtype)
    cos, sin = attnkit.rope_cos_sin(9, 8, dtype=dtype)
    full_cos, full_sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_array_equal(attnkit.apply_rope(x, cos, sin), x * full_cos + rotate_half * full_sin)


def test_layouts_agree():
    x = random((2, 3, 5, 8), np.float32)
    cos, sin = attnkit.rope_cos_sin(5, 8)
    a = attnkit.apply_rope(x, cos, sin)
    b = attnkit.apply_rope(x.transpose(0, 2, 1, 3), cos, sin, layout="bshd")
    np.testing.assert_array_equal(a, b.transpose(0, 2, 1, 3))


def test_inputs_in_any_layout_give_the_same_bits():
    x = random((2, 3, 5, 8), np.float32)
    cos, sin = attnkit.rope_cos_sin(5, 6)
    want = attnkit.apply_rope(x, cos, sin)
    for name, variant in layouts(x):
        np.testing.assert_array_equal(attnkit.apply_rope(variant, cos, sin), want, err_msg=name)
    for name, variant in layouts(cos):
        np.testing.assert_array_equal(attnkit.apply_rope(x, variant, sin), want, err_msg=name)
    x0 = x.copy()
    attnkit.apply_rope(x, cos, sin)
    np.testing.assert_array_equal(x, x0)


def test_empty_shapes():
    for shape in [(0, 2, 3, 4), (2, 0, 3, 4), (1, 1, 0, 4), (1, 1, 3, 0)]:
        x = np.zeros(shape, np.float32)
        cos = np.zeros((shape[2], shape[3] // 2), np.float32)
        assert attnkit.apply_rope(x, cos, cos).shape == shape


def test_apply_matches_transformers_llama_bit_for_bit():
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = random((2, 4, 11, 64), np.float32, 1), random((2, 2, 11, 64), np.float32, 2)
    pos = np.array([np.arange(11), np.arange(11) + 100])
    cos, sin = attnkit.rope_cos_sin(pos, 64)
    full = lambda t: torch.from_numpy(np.concatenate([t, t], -1))  # noqa: E731
    want_q, want_k = llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), full(cos), full(sin))
    np.testing.assert_array_equal(attnkit.apply_rope(q, cos, sin), want_q.numpy())
    np.testing.assert_array_equal(attnkit.apply_rope(k, cos, sin), want_k.numpy())


def test_apply_matches_transformers_gptj_bit_for_bit():
    torch = pytest.importorskip("torch")
    gptj = pytest.importorskip("transformers.models.gptj.modeling_gptj")
    x = random((2, 7, 3, 32), np.float32)  # (batch, seq, heads, head_dim), GPT-J's layout
    cos, sin = attnkit.rope_cos_sin(np.tile(np.arange(7), (2, 1)), 16)  # rotary_dim 16 < head_dim
    t = torch.from_numpy(x)
    rot = gptj.apply_rotary_pos_emb(t[..., :16], torch.from_numpy(sin), torch.from_numpy(cos))
    want = torch.cat([rot, t[..., 16:]], -1).numpy()
    np.testing.assert_array_equal(attnkit.apply_rope(x, cos, sin, style="interleaved", layout="bshd"), want)


def test_cos_sin_match_transformers_rotary_embedding():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama = transformers.models.llama.modeling_llama
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=4096,
                                   rope_parameters={"rope_theta": 10000.0, **SCALINGS["yarn"]})
    pos = np.arange(2048)[None]
    want_cos, want_sin = llama.LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos))
    cos, sin = attnkit.rope_cos_sin(pos, 64, scaling=SCALINGS["yarn"])
    # transformers rounds the frequencies to float32, so phases drift by about position * 1e-7 * freq.
    np.testing.assert_allclose(cos, want_cos.numpy()[..., :32], atol=3e-4)
    np.testing.assert_allclose(sin, want_sin.numpy()[..., :32], atol=3e-4)


# ---------------------------------------------------------------- properties

vectors = hnp.arrays(np.float64, (2, 8), elements=st.floats(-100, 100, allow_nan=False))


@given(x=vectors, m=st.integers(0, FAR), style=st.sampled_from(["half", "interleaved"]))
def test_rotation_preserves_norms(x, m, style):
    cos, sin = attnkit.rope_cos_sin(np.array([m]), 8, dtype=np.float64)
    out = attnkit.apply_rope(x[None, :, None, :][:, :, :, :], cos, sin, style=style)[0, :, 0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13, atol=1e-12)


@given(q=vectors, m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(0, 5000),
       style=st.sampled_from(["half", "interleaved"]))
def test_dot_products_depend_only_on_the_position_difference(q, m, n, shift, style):
    def rotated(v, p):
        cos, sin = attnkit.rope_cos_sin(np.array([p]), 8, dtype=np.float64)
        return attnkit.apply_rope(v[None, None, None], cos, sin, style=style)[0, 0, 0]

    a = rotated(q[0], m) @ rotated(q[1], n)
    b = rotated(q[0], m + shift) @ rotated(q[1], n + shift)
    scale = np.linalg.norm(q[0]) * np.linalg.norm(q[1])
    assert abs(a - b) <= 1e-11 * max(scale, 1.0)
