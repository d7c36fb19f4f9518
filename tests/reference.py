"""Slow, obviously correct float64 references for every kernel.

Each function is a direct transcription of the formula, with loops where they make the formula
clearer. Transcendentals are evaluated in numpy.longdouble (80-bit on x86) so the reference is
more accurate than either output dtype.
"""

from __future__ import annotations

import math

import numpy as np


def embedding(ids, weight, scale=None):
    out = np.asarray(weight)[np.asarray(ids)]
    if scale is not None:
        out = out * weight.dtype.type(scale)
    return out


def embedding_bag(bags, weight, mode, per_sample_weights=None, padding_idx=None):
    """``bags``: a list of lists of ids; ``per_sample_weights``: a matching list of lists."""
    w = np.asarray(weight, dtype=np.float64)
    out = np.zeros((len(bags), w.shape[1]))
    for b, bag in enumerate(bags):
        kept = [(j, i) for j, i in enumerate(bag) if i != padding_idx]
        if not kept:
            continue
        rows = np.array([w[i] * (per_sample_weights[b][j] if per_sample_weights else 1.0) for j, i in kept])
        if mode == "sum":
            out[b] = rows.sum(axis=0)
        elif mode == "mean":
            out[b] = rows.sum(axis=0) / len(kept)
        else:
            out[b] = rows.max(axis=0)
    return out


def inverse_frequencies(dim, base=10000.0):
    return np.array([1.0 / base ** (2 * i / dim) for i in range(dim // 2)], dtype=np.float64)


def _phases(positions, inv_freq):
    """float64 phases from exact positions, widened to long double for sin/cos."""
    p = np.asarray(positions, dtype=np.int64).astype(np.float64)
    return (p[..., None] * np.asarray(inv_freq, dtype=np.float64)).astype(np.longdouble)


def sinusoidal(positions, dim, base=10000.0, layout="interleaved", dtype=np.float32):
    phase = _phases(positions, inverse_frequencies(dim, base))
    s, c = np.sin(phase), np.cos(phase)
    out = np.empty(phase.shape[:-1] + (dim,), dtype=np.longdouble)
    if layout == "interleaved":
        out[..., 0::2], out[..., 1::2] = s, c
    else:
        out[..., : dim // 2], out[..., dim // 2 :] = s, c
    return out.astype(dtype)


def rope_cos_sin(positions, inv_freq, factor=1.0, dtype=np.float32):
    phase = _phases(positions, inv_freq)
    f = np.longdouble(factor)
    return (f * np.cos(phase)).astype(dtype), (f * np.sin(phase)).astype(dtype)


def apply_rope(x, cos, sin, style="half", layout="bhsd"):
    """float64 rotation, one pair of channels at a time."""
    x = np.asarray(x, dtype=np.float64)
    if layout == "bshd":
        x = x.transpose(0, 2, 1, 3)
    cos, sin = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    out = x.copy()
    h = cos.shape[-1]
    batch, heads, seq, _ = x.shape
    for b in range(batch):
        c, s = cos[b % cos.shape[0]], sin[b % sin.shape[0]]
        for i in range(h):
            a, z = (i, i + h) if style == "half" else (2 * i, 2 * i + 1)
            xa, xz = x[b, :, :, a], x[b, :, :, z]
            out[b, :, :, a] = xa * c[:, i] - xz * s[:, i]
            out[b, :, :, z] = xz * c[:, i] + xa * s[:, i]
    return out.transpose(0, 2, 1, 3) if layout == "bshd" else out


def alibi_slopes_paper(n):
    """The ALiBi paper's reference code (ofirpress/attention_with_linear_biases), verbatim."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + alibi_slopes_paper(2 * closest_power_of_2)[0::2][
        : n - closest_power_of_2
    ]


def alibi_exponents(n):
    """Slope h is 2 ** (-8 * e[h]): e = (h + 1) / m for the largest power of two m <= n, then the odd
    multiples of 1 / (2m) for the remaining heads."""
    m = 2 ** math.floor(math.log2(n))
    return [(h + 1) / m for h in range(m)] + [(2 * k + 1) / (2 * m) for k in range(n - m)]


def t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket function for one int, with its float32 logarithm, scalar by scalar."""
    bucket = 0
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        bucket += num_buckets if n > 0 else 0
        n = abs(n)
    else:
        n = -min(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    f32 = np.float32
    large = f32(np.log(f32(n) / f32(max_exact))) / f32(math.log(max_distance / max_exact)) * f32(num_buckets - max_exact)
    return bucket + min(max_exact + int(large), num_buckets - 1)


def attention(q, k, v, *, bool_mask=None, float_mask=None, key_mask=None, causal=False,
              alignment="top_left", window=None, alibi=None, softcap=None, scale=None):
    """float64 attention on (B, H, L, E) arrays, one query row at a time; invalid keys are left out
    entirely. Returns (out, lse, weights, max |scaled score| per (b, h))."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    offset = S - L if alignment == "bottom_right" else 0
    full = (B, Hq, L, S)
    allowed = np.ones(full, dtype=bool)
    if bool_mask is not None:
        allowed &= np.broadcast_to(np.asarray(bool_mask, dtype=bool), full)
    bias = np.zeros(full)
    if float_mask is not None:
        fm = np.broadcast_to(np.asarray(float_mask, dtype=np.float64), full)
        allowed &= fm != -np.inf
        bias = bias + np.where(fm == -np.inf, 0.0, fm)
    if key_mask is not None:
        allowed &= np.asarray(key_mask, dtype=bool)[:, None, None, :]
    pos = np.arange(L)[:, None] + offset
    keys = np.arange(S)[None, :]
    if causal:
        allowed &= keys <= pos
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= keys >= pos - left
        if right is not None:
            allowed &= keys <= pos + right
    if alibi is not None:
        slopes = np.broadcast_to(np.asarray(alibi, dtype=np.float64).reshape(-1, Hq), (B, Hq))
        bias = bias - slopes[:, :, None, None] * np.abs(pos - keys)[None, None]
    out = np.zeros((B, Hq, L, Ev))
    lse = np.full((B, Hq, L), -np.inf)
    weights = np.zeros(full)
    score_max = np.zeros((B, Hq))
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(L):
                js = np.flatnonzero(allowed[b, h, i])
                if js.size == 0:
                    continue
                s = scale * (k[b, g, js] @ q[b, h, i])
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                score_max[b, h] = max(score_max[b, h], np.abs(s).max())
                s = s + bias[b, h, i, js]
                m = s.max()
                p = np.exp(s - m)
                out[b, h, i] = p @ v[b, g, js] / p.sum()
                lse[b, h, i] = m + np.log(p.sum())
                weights[b, h, i, js] = p / p.sum()
    return out, lse, weights, score_max


def normal_cdf(x):
    """Φ(x) in float64, from the standard library's erfc (accurate in both tails)."""
    return np.vectorize(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), otypes=[np.float64])(x)


def _sigmoid(v):
    """1 / (1 + e^-v) without overflow, in float64."""
    v = np.asarray(v, np.float64)
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def gelu(x, approximate="none"):
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return x * _sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))
    return x * normal_cdf(x)


def silu_mul(gate, up):
    g = np.asarray(gate, np.float64)
    return g * _sigmoid(g) * np.asarray(up, np.float64)


def layer_norm(h, n_axes, weight=None, bias=None, eps=1e-5):
    """float64, over the last ``n_axes`` axes: two passes, biased variance."""
    h = np.asarray(h, np.float64)
    axes = tuple(range(h.ndim - n_axes, h.ndim))
    mean = h.mean(axis=axes, keepdims=True)
    var = ((h - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (h - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def rms_norm(h, n_axes, weight=None, eps=1e-6):
    h = np.asarray(h, np.float64)
    axes = tuple(range(h.ndim - n_axes, h.ndim))
    y = h / np.sqrt((h**2).mean(axis=axes, keepdims=True) + eps)
    return y if weight is None else y * np.asarray(weight, np.float64)
