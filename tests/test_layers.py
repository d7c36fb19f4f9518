"""attnkit.MultiheadAttention against torch.nn.MultiheadAttention and against its own parts."""

from __future__ import annotations

import numpy as np
import pytest

import attnkit
from conftest import run_forked

MHA = attnkit.MultiheadAttention


def weights(embed=16, heads=4, kv_heads=None, kdim=None, vdim=None, bias=True, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    kv_heads = kv_heads or heads
    d = embed // heads
    w = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)  # noqa: E731
    b = lambda o: rng.standard_normal(o).astype(dtype) if bias else None  # noqa: E731
    return dict(q_weight=w(embed, embed), k_weight=w(kv_heads * d, kdim or embed), v_weight=w(kv_heads * d, vdim or embed),
                o_weight=w(embed, embed), q_bias=b(embed), k_bias=b(kv_heads * d), v_bias=b(kv_heads * d), o_bias=b(embed),
                num_heads=heads, num_kv_heads=kv_heads, batch_first=True)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_matches_torch_multihead_attention(packed, bias, average):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    kdim = None if packed else 12
    m = torch.nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=kdim, batch_first=True).eval()
    layer = MHA.from_torch_state_dict(m.state_dict(), num_heads=4, batch_first=True)
    x = torch.randn(3, 7, 16)
    kv = x if packed else torch.randn(3, 9, 12)
    kpm = torch.zeros(3, kv.shape[1], dtype=torch.bool)
    kpm[1, -3:] = True
    with torch.no_grad():
        want, want_w = m(x, kv, kv, key_padding_mask=kpm, need_weights=True, average_attn_weights=average)
    out, w = layer(x.numpy(), kv.numpy(), kv.numpy(), key_padding_mask=kpm.numpy(), average_attn_weights=average)
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(w, want_w.numpy(), rtol=0, atol=2e-6)
    out_only, none = layer(x.numpy(), kv.numpy(), kv.numpy(), key_mask=~kpm.numpy(), need_weights=False)
    assert none is None and out_only.tobytes() == out.tobytes()


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_masks_match_torch(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(2)
    m = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    layer = MHA.from_torch_state_dict(m.state_dict(), num_heads=2, batch_first=True)
    x = torch.randn(2, 6, 16)
    if kind == "float":
        mask = torch.randn(6, 6)
        ours = {"attn_mask": mask.numpy()}
    else:
        mask = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch: True = not allowed
        if kind == "bool":
            mask[2, 4] = True
        ours = {"attn_mask": mask.numpy()} if kind == "bool" else {"is_causal": True}
    with torch.no_grad():
        want, _ = m(x, x, x, attn_mask=mask, need_weights=False)
    out, _ = layer(x.numpy(), **ours)
    np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=2e-6)


def test_fully_padded_rows_give_zeros_where_torch_gives_nan():
    torch = pytest.importorskip("torch")
    m = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    layer = MHA.from_torch_state_dict(m.state_dict(), num_heads=2, batch_first=True)
    x = torch.randn(1, 4, 8)
    kpm = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        want, _ = m(x, x, x, key_padding_mask=kpm)
    out, _ = layer(x.numpy(), key_padding_mask=kpm.numpy())
    assert np.isnan(want.numpy()).all()
    np.testing.assert_allclose(out, np.broadcast_to(layer.o_bias, out.shape), rtol=0, atol=0)


@pytest.mark.parametrize("batch,length,s", [(0, 5, 5), (2, 0, 5), (2, 3, 0)])
def test_empty_batches_and_sequences_give_empty_or_bias_outputs(batch, length, s):
    w = weights(embed=24, heads=6, kv_heads=2)
    x = np.ones((batch, length, 24), np.float32)
    kv = np.ones((batch, s, 24), np.float32)
    out, weights_ = MHA(**w)(x, kv, kv, need_weights=True, average_attn_weights=False)
    assert out.shape == (batch, length, 24) and weights_.shape == (batch, 6, length, s)
    # No key to attend to: the attention is zero and the output is the output bias.
    np.testing.assert_array_equal(out, np.broadcast_to(w["o_bias"], out.shape))


def test_grouped_query_attention_equals_repeated_key_value_weights():
    w = weights(embed=24, heads=6, kv_heads=2)
    gqa = MHA(**w)
    d = 4
    rep = lambda a: np.repeat(a.reshape(2, d, *a.shape[1:]), 3, axis=0).reshape(6 * d, *a.shape[1:])  # noqa: E731
    full = MHA(w["q_weight"], rep(w["k_weight"]), rep(w["v_weight"]), w["o_weight"], q_bias=w["q_bias"],
               k_bias=rep(w["k_bias"]), v_bias=rep(w["v_bias"]), o_bias=w["o_bias"], num_heads=6, batch_first=True)
    x = np.random.default_rng(3).standard_normal((2, 5, 24)).astype(np.float32)
    np.testing.assert_array_equal(gqa(x, is_causal=True)[0], full(x, is_causal=True)[0])


def test_rope_rotates_projected_queries_and_keys():
    w = weights(embed=16, heads=2, bias=False)
    layer = MHA(**w)
    x = np.random.default_rng(4).standard_normal((1, 5, 16)).astype(np.float32)
    cos, sin = attnkit.rope_cos_sin(5, 8)
    out, _ = layer(x, rope=(cos, sin), is_causal=True)
    q = (x @ w["q_weight"].T).reshape(1, 5, 2, 8)
    k = (x @ w["k_weight"].T).reshape(1, 5, 2, 8)
    v = (x @ w["v_weight"].T).reshape(1, 5, 2, 8)
    q, k = (attnkit.apply_rope(t, cos, sin, layout="bshd") for t in (q, k))
    att = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, layout="bshd")
    np.testing.assert_array_equal(out, att.reshape(1, 5, 16) @ w["o_weight"].T)


def test_float64_layer():
    layer = MHA(**weights(dtype=np.float64))
    out, _ = layer(np.ones((1, 3, 16)))
    assert out.dtype == np.float64


ERRORS = [
    ("heads", lambda: MHA(**{**weights(), "num_kv_heads": 3}), ValueError, r"num_kv_heads: 3 does not divide"),
    ("dtype mix", lambda: MHA(**{**weights(), "o_weight": np.zeros((16, 16))}), TypeError, r"o_weight: dtype float64"),
    ("weight shape", lambda: MHA(**{**weights(), "k_weight": np.zeros((8, 16), np.float32)}), ValueError, r"k_weight: expected 4 x 4"),
    ("bias shape", lambda: MHA(**{**weights(), "q_bias": np.zeros(3, np.float32)}), ValueError, r"q_bias: expected shape \(16,\)"),
    ("input dtype", lambda: MHA(**weights())(np.zeros((1, 2, 16))), TypeError, r"query: dtype float64 differs"),
    ("input shape", lambda: MHA(**weights())(np.zeros((1, 2, 15), np.float32)), ValueError, r"query: expected shape \(batch, seq, 16\) \(batch_first=True\)"),
    ("bias_kv", lambda: MHA.from_torch_state_dict({"bias_k": 1, "out_proj.weight": 1}, 2), ValueError, r"bias_k/bias_v"),
    ("missing", lambda: MHA.from_torch_state_dict({"out_proj.weight": np.eye(4, dtype=np.float32)}, 2), ValueError, r"missing keys \['q_proj_weight', 'k_proj_weight', 'v_proj_weight'\] \(or 'in_proj_weight'\)"),
    ("rope", lambda: MHA(**weights())(np.zeros((1, 2, 16), np.float32), rope=("cos",)), ValueError, r"rope: expected"),
]


@pytest.mark.parametrize("name,call,exc,pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_raises_the_contract_exception(name, call, exc, pattern):
    import re

    status, detail = run_forked(call)
    assert status == "raised" and detail[0] == exc.__name__, f"{name}: {detail}"
    assert re.search(pattern, detail[1]), f"{name}: {detail[1]!r}"
