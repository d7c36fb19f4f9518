"""ONNX's conformance cases for Attention and RotaryEmbedding, run through attnkit as a user would:
the inputs and expected outputs come from onnx's own case generators (skipped without onnx), and
each ONNX attribute maps to attnkit's arguments. float16 and bfloat16 cases included."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import attnkit

onnx = pytest.importorskip("onnx")
ml_dtypes = pytest.importorskip("ml_dtypes")
from onnx import helper  # noqa: E402
from onnx.backend.test.case.node import attention as onnx_attention  # noqa: E402
from onnx.backend.test.case.node import rotaryembedding as onnx_rope  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _collect(module, cls):
    """``(name, node, inputs, outputs)`` of every case the generator class exports."""
    cases = []
    original = module.expect
    module.expect = lambda node, inputs, outputs, name, **_: cases.append((name, node, inputs, outputs))
    try:
        np.random.seed(0)
        for name, export in sorted(inspect.getmembers(cls, inspect.isfunction)):
            if name.startswith("export"):
                export()
    finally:
        module.expect = original
    return cases


ATTENTION = _collect(onnx_attention, onnx_attention.Attention)
ROPE = _collect(onnx_rope, onnx_rope.RotaryEmbedding)



def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


ROLES = ["Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"]


def _named(node, inputs):
    """The node's inputs by their role in ONNX's Attention (absent optional ones left out)."""
    given = iter(inputs)
    return {role: next(given) for role, name in zip(ROLES, node.input) if name}


def _attention(node, inputs):
    """ONNX Attention through attnkit.scaled_dot_product_attention: ``[Y, present_key, present_value]``
    (as many as the node outputs), or the reason attnkit cannot express the case."""
    x = _named(node, inputs)
    q, k, v = x["Q"], x["K"], x["V"]
    mask, past_k, past_v, nonpad = (x.get(r) for r in ROLES[3:])
    a = _attrs(node)
    three_d = q.ndim == 3
    if three_d:  # (batch, seq, heads * dim)
        def heads(t, h):
            return t.reshape(t.shape[0], t.shape[1], h, t.shape[2] // h).transpose(0, 2, 1, 3)
        q, k, v = heads(q, a["q_num_heads"]), heads(k, a["kv_num_heads"]), heads(v, a["kv_num_heads"])
    if past_k is not None:
        k, v = np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2)
    b, hq, length, _ = q.shape
    s = k.shape[2]
    kw = {"enable_gqa": hq != k.shape[1]}
    if mask is not None:  # a mask shorter than the keys is padded with "masked"
        pad = s - mask.shape[-1]
        if pad > 0:
            fill = False if mask.dtype == bool else -np.inf
            mask = np.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)], constant_values=fill).astype(mask.dtype)
        kw["attn_mask"] = mask
    if nonpad is not None:  # never with a past cache; queries end at each item's last valid key
        kw["key_lengths"] = nonpad.reshape(-1)
    if "scale" in a:
        kw["scale"] = a["scale"]
    if a.get("softcap"):
        kw["softcap"] = a["softcap"]
    # ONNX places query i at key position i + (past length): bottom-right alignment when the new
    # keys are as many as the queries, else an explicit mask with that offset.
    offset = 0 if past_k is None else past_k.shape[2]
    left, right = a.get("left_window_size", -1), a.get("right_window_size", -1)
    if nonpad is not None or offset in (0, s - length):
        kw["is_causal"] = bool(a.get("is_causal"))
        kw["causal_alignment"] = "bottom_right" if offset or nonpad is not None else "top_left"
        if left >= 0 or right >= 0:
            kw["window"] = (None if left < 0 else left, None if right < 0 else right)
    else:
        i, j = np.arange(length)[:, None] + offset, np.arange(s)[None, :]
        allowed = np.ones((length, s), bool)
        if a.get("is_causal"):
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        m = kw.get("attn_mask")
        kw["attn_mask"] = (allowed if m is None else m & allowed if m.dtype == bool
                           else np.where(allowed, m, -np.inf).astype(m.dtype))
    # qk_matmul_output: mode 3 the probabilities (return_weights), mode 2 the scores with masks
    # and biases (return_scores), modes 0 and 1 the scaled (and softcapped) scores alone: those of
    # a call without masks.
    mode = a.get("qk_matmul_output_mode", 0) if len(node.output) > 3 and node.output[3] else None
    if mode == 3:
        y, qk = attnkit.scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    elif mode == 2:
        y, qk = attnkit.scaled_dot_product_attention(q, k, v, return_scores=True, **kw)
    else:
        y = attnkit.scaled_dot_product_attention(q, k, v, **kw)
    if mode in (0, 1):
        plain = {n: kw[n] for n in ("scale", "softcap", "enable_gqa") if n in kw}
        qk = attnkit.scaled_dot_product_attention(q, k, v, return_scores=True, **plain)[1]
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(b, length, -1)
    outs = [y]
    if len(node.output) > 1 and node.output[1]:
        outs += [k, v]  # present_key, present_value: the concatenated caches
    if mode is not None:
        outs.append(qk.astype(y.dtype))
    return outs


def _ulp(x, dtype):
    """The spacing of ``dtype``'s values at the float64 values ``x``."""
    info = ml_dtypes.finfo(dtype)
    _, e = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(1.0, e - 1 - info.nmant), float(info.smallest_subnormal))


def _assert_matches(got, want, exact, bound, name):
    """float32 outputs to 1e-5 of ONNX's. A 16-bit output, which ONNX's reference computes in
    that dtype with a rounding at every step, within ``bound`` of the float64 value of the same
    inputs (``exact``), and as close to ONNX's as ONNX's is to that value, plus ``bound``."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert (np.isnan(got64) == np.isnan(want64)).all(), name
    infinite = np.isinf(want64)  # masked scores: -inf on both sides
    assert (got64[infinite] == want64[infinite]).all(), name
    ok = ~np.isnan(want64) & ~infinite
    got64, want64 = np.where(ok, got64, 0), np.where(ok, want64, 0)
    err = np.abs(got64 - want64)[ok]
    if want.dtype == np.float32:
        assert (err <= 1e-5).all(), f"{name}: max error {err.max()}"
        return
    exact = np.where(ok, exact, 0)
    ours = np.abs(got64 - exact)[ok]
    theirs = np.abs(want64 - exact)[ok]
    bound = np.broadcast_to(bound, got64.shape)[ok]
    assert (ours <= bound).all(), f"{name}: {(ours / bound).max():.2f} of the bound from float64"
    assert (err <= theirs + bound).all(), f"{name}: max difference {err.max()} from ONNX's"


def _attention_bound(x, scale, dim, out_dtype):
    """The half-precision bound, 4 eps(out) max|V| (1 + max|scaled score|), over the whole call
    (the issue sets it per (batch, head); this is the largest), with max|scaled score| bounded
    by Cauchy-Schwarz: scale · E · max|q| · max|k|."""
    eps = float(ml_dtypes.finfo(out_dtype).eps)
    q, k, v = (np.abs(np.asarray(x[r], np.float64)) for r in ("Q", "K", "V"))
    keys = k.max() if "past_key" not in x else max(k.max(), np.abs(np.asarray(x["past_key"], np.float64)).max())
    values = v.max() if "past_value" not in x else max(v.max(), np.abs(np.asarray(x["past_value"], np.float64)).max())
    score = (scale if scale is not None else 1 / np.sqrt(dim)) * dim * q.max() * keys
    return 4 * eps * values * (1 + score)


@pytest.mark.parametrize("case", ATTENTION, ids=[c[0] for c in ATTENTION])
def test_onnx_attention_cases(case):
    name, node, inputs, outputs = case
    got = _attention(node, inputs)
    if isinstance(got, str):
        pytest.skip(got)
    if inputs[0].dtype == np.float32:
        for g, w in zip(got, outputs, strict=True):
            _assert_matches(g, w, None, None, name)
        return
    from onnx.reference.ops.op_attention import _compute_attention

    a = _attrs(node)
    x = _named(node, inputs)
    wide = {r: (t.astype(np.float64) if t.dtype.kind != "i" and t.dtype != bool else t) for r, t in x.items()}
    options = {k: a[k] for k in ("scale", "is_causal", "q_num_heads", "kv_num_heads", "softcap",
                                 "left_window_size", "right_window_size", "qk_matmul_output_mode") if k in a}
    y, present_k, present_v, qk = _compute_attention(**wide, **options)
    has_present, has_qk = len(node.output) > 1 and node.output[1], len(node.output) > 3 and node.output[3]
    exact = [y] + ([present_k, present_v] if has_present else []) + ([qk] if has_qk else [])
    dim = x["Q"].shape[-1] // (a["q_num_heads"] if x["Q"].ndim == 3 else 1)  # E
    bounds = [_attention_bound(x, a.get("scale"), dim, got[0].dtype)] + [0.0, 0.0][:2 * bool(has_present)]
    if has_qk:  # scores or probabilities, each rounded once to 16 bits
        finite = np.asarray(qk, np.float64)[np.isfinite(qk)]
        bounds.append(4 * float(ml_dtypes.finfo(got[0].dtype).eps) * max(1.0, np.abs(finite).max(initial=0)))
    for g, w, e, bound in zip(got, outputs, exact, bounds, strict=True):
        _assert_matches(g, w, np.asarray(e, np.float64), bound, name)


def test_every_attention_case_runs():
    assert len(ATTENTION) >= 90
    skipped = {c[0]: got for c in ATTENTION if isinstance(got := _attention(c[1], c[2]), str)}
    assert not skipped


def test_every_nonpad_kv_seqlen_case_runs_with_key_lengths():
    nonpad = [c for c in ATTENTION if "nonpad_kv_seqlen" in _named(c[1], c[2])]
    assert len(nonpad) >= 10
    skipped = [(c[0], got) for c in nonpad if isinstance(got := _attention(c[1], c[2]), str)]
    assert not skipped


def _rope(node, inputs):
    """ONNX RotaryEmbedding through attnkit.apply_rope."""
    a = _attrs(node)
    x, cos, sin = inputs[:3]
    pos = inputs[3] if len(inputs) > 3 else None
    if pos is not None:  # (max_pos, r/2) caches indexed per (batch, seq)
        cos, sin = cos[pos], sin[pos]
    three_d = x.ndim == 3
    xs = x.reshape(x.shape[0], x.shape[1], a["num_heads"], -1) if three_d else x
    layout = "bshd" if three_d else "bhsd"
    style = "interleaved" if a.get("interleaved") else "half"
    out = attnkit.apply_rope(xs, cos, sin, style=style, layout=layout)
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", ROPE, ids=[c[0] for c in ROPE])
def test_onnx_rotary_embedding_cases(case, dtype):
    """The float32 cases as ONNX ships them; in 16 bits, the same inputs cast to the dtype, against
    ONNX's reference evaluated on them (which computes in that dtype)."""
    name, node, inputs, outputs = case
    if dtype != np.float32:
        from onnx.reference.ops.op_rotary_embedding import rotary_embedding

        inputs = [t.astype(dtype) if t.dtype == np.float32 else t for t in inputs]
        a = _attrs(node)
        kwargs = {key: a[key] for key in ("interleaved", "rotary_embedding_dim", "num_heads") if key in a}
        outputs = [rotary_embedding(*inputs, **kwargs).astype(dtype)]
    got = _rope(node, inputs)
    if dtype == np.float32:
        _assert_matches(got, outputs[0], None, None, name)
    else:
        # attnkit: float32 products and sum (relative error 2^-24 each, of terms at most `mag`),
        # then one rounding: within half a unit of the float64 value, plus that.
        exact = _exact_rope(node, inputs)
        mag = np.abs(inputs[0].astype(np.float64)).max() * max(np.abs(t.astype(np.float64)).max() for t in inputs[1:3])
        _assert_matches(got, outputs[0], exact, 0.5 * _ulp(exact, dtype) + 2**-22 * mag, name)


def _exact_rope(node, inputs):
    """The rotation in float64 from the same 16-bit inputs."""
    from onnx.reference.ops.op_rotary_embedding import rotary_embedding

    a = _attrs(node)
    kwargs = {key: a[key] for key in ("interleaved", "rotary_embedding_dim", "num_heads") if key in a}
    wide = [t.astype(np.float64) if t.dtype != np.int64 else t for t in inputs]
    return rotary_embedding(*wide, **kwargs)
