"""Masked multi-head scaled dot-product attention: the step that turns static embeddings into
contextual ones. One fused, tiled, multi-threaded kernel (online softmax), never an L x S buffer
unless the weights are asked for."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import (
    _as_array,
    _contiguous,
    allocating,
    choice,
    compute_dtype,
    counts,
    flag,
    float_array,
    int_array,
    integer,
    is_half,
    out_array,
    real,
)

__all__ = ["merge_attention", "scaled_dot_product_attention"]


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: Literal[False] = False,
    return_weights: Literal[False] = False,
    return_scores: Literal[False] = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any]: ...


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: Literal[True],
    return_weights: Literal[False] = False,
    return_scores: Literal[False] = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: Literal[False] = False,
    return_weights: Literal[True],
    return_scores: Literal[False] = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: Literal[True],
    return_weights: Literal[True],
    return_scores: Literal[False] = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...


@overload
def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    return_scores: bool = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any] | tuple[npt.NDArray[Any], ...]: ...


def scaled_dot_product_attention(
    query: npt.ArrayLike,
    key: npt.ArrayLike,
    value: npt.ArrayLike,
    attn_mask: npt.ArrayLike | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_mask: npt.ArrayLike | None = None,
    key_lengths: npt.ArrayLike | None = None,
    key_starts: npt.ArrayLike | None = None,
    query_lengths: npt.ArrayLike | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: npt.ArrayLike | None = None,
    softcap: float | None = None,
    sinks: npt.ArrayLike | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    return_scores: bool = False,
    layout: Literal["bhsd", "bshd"] = "bhsd",
    out: npt.NDArray[Any] | None = None,
    _key_strips: npt.NDArray[Any] | None = None,
) -> npt.NDArray[Any] | tuple[npt.NDArray[Any], ...]:
    """Attention as ``torch.nn.functional.scaled_dot_product_attention``, on NumPy arrays.

    ``out_i = sum_j softmax_j(scale * q_i . k_j + bias_ij) v_j`` over the keys ``j`` that query ``i``
    may attend to. Masks use one polarity everywhere: **true / nonzero = may attend**.

    Args:
        query: ``(..., Hq, L, E)`` float32, float64, float16 or ``ml_dtypes.bfloat16``
            (``layout="bshd"``: ``(..., L, Hq, E)``). 16-bit inputs are computed in float32 (each
            value widened exactly, products and sums in float32, the softmax in float32) and the
            output is rounded once; bfloat16 with ``L > 16`` (and ``Ev`` a multiple of 16) also
            rounds the probabilities to bfloat16 before they multiply the values, as PyTorch
            does, in the arithmetic of the ``vdpbf16ps`` instruction (emulated bit for bit where
            the CPU lacks it).
        key: ``(..., Hkv, S, E)``, the query's dtype and batch dimensions; or float16 or bfloat16
            for float32 queries (a 16-bit KV cache: computed in float32, output float32).
        value: ``(..., Hkv, S, Ev)``.
        attn_mask: bool (true = may attend) or float (added to the scores; ``-inf`` = masked) of
            the query's dtype, broadcastable to ``(..., Hq, L, S)``.
        dropout_p: must be 0 (attnkit is for inference).
        is_causal: query ``i`` attends to keys ``j <= i`` (``j <= i + S - L`` with
            ``causal_alignment="bottom_right"``); combined with ``attn_mask`` when both are given.
        scale: score scale, ``1 / sqrt(E)`` by default.
        enable_gqa: allows ``Hq`` to be a multiple of ``Hkv``; query head ``h`` uses key/value head
            ``h // (Hq // Hkv)``.
        key_mask: ``(..., S)`` bool or integer, nonzero = may attend (the ``attention_mask`` that
            tokenizers return), applied without building a dense mask; fully padded key blocks are
            skipped.
        key_lengths: ``(...,)`` integers: batch item ``b`` has ``key_lengths[b]`` valid keys, the
            first ones (ONNX's ``nonpad_kv_seqlen``); the keys after them are padding, never
            read. Bottom-right alignment then places query ``i`` at ``i + key_lengths[b] - L``
            for ``is_causal``, ``window`` and ``alibi_slopes``. Equal, bit for bit, to a
            ``key_mask`` of that many leading trues with that alignment; combines with
            ``key_mask`` when both are given.
        key_starts: ``(...,)`` integers, with ``key_lengths``: batch item ``b``'s keys and values
            are rows ``key_starts[b]`` to ``key_starts[b] + key_lengths[b] - 1`` of ``key`` and
            ``value`` (a window into a bigger buffer, such as a rotating cache), its key 0 at
            row ``key_starts[b]``.
        query_lengths: ``(...,)`` integers: batch item ``b`` has ``query_lengths[b]`` real queries,
            the first ones (a ragged chunk of new tokens); bottom-right alignment then places
            query ``i`` at ``i + key_lengths[b] - query_lengths[b]`` (``S`` without
            ``key_lengths``). The rows after them give zeros (weights zero, lse ``-inf``).
        causal_alignment: ``"top_left"`` or ``"bottom_right"``; also places queries for
            ``window`` and ``alibi_slopes``.
        window: ``(left, right)``: keys at most ``left`` before and ``right`` after the aligned
            diagonal (``None`` = unlimited on that side).
        alibi_slopes: ``(Hq,)`` or ``(..., Hq)``: adds ``-slope * |i' - j|`` to the scores.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before masks and biases.
        sinks: ``(Hq,)``: a sink logit per query head (gpt-oss's attention sinks), which joins
            every softmax denominator of its head and carries no value:
            ``out_i = sum_j exp(s_ij) v_j / (sum_j exp(s_ij) + exp(sinks[h]))``. A row with no
            valid key then gives zeros and ``lse = sinks[h]``; ``lse`` and the weights count the
            sink in the denominator.
        return_lse: also return the log-sum-exp ``(..., Hq, L)`` (float32 for 16-bit inputs).
        return_weights: also return the attention probabilities ``(..., Hq, L, S)`` (float32 for
            16-bit inputs).
        return_scores: also return the scores before the softmax ``(..., Hq, L, S)`` (float32 for
            16-bit inputs): scaled, softcapped, biases added, ``-inf`` at every masked pair
            (ONNX's ``qk_matmul_output`` with bias; for KV-eviction methods such as H2O).
        layout: ``"bhsd"`` or ``"bshd"`` for query, key, value and the output.
        out: an array to write the output into, as NumPy's ``out=``: C-contiguous, writeable, of
            the output's shape and the query's dtype, sharing no memory with an input; returned
            in place of a new array. (A model's layers can reuse one buffer this way.)

    Returns:
        ``out`` of shape ``(..., Hq, L, Ev)`` (``bshd``: ``(..., L, Hq, Ev)``), or a tuple of
        ``out`` and those requested, in the order ``lse``, ``weights``, ``scores``. A query row
        with no key to attend to gives zeros (weights zero, lse ``-inf``, or the sink logit with
        ``sinks``), never NaN; masked keys, values and queries never enter the arithmetic; results
        are bitwise identical for any thread count.

    Raises:
        TypeError: non-float dtypes (float8 and other small types included), dtypes that do
            not go together, integer masks, a float mask of another dtype, non-integer lengths or
            starts, flags (``is_causal``, ``enable_gqa``, ``return_lse``, ``return_weights``,
            ``return_scores``) that are not bools.
        ValueError: bad ranks or shapes, heads that do not divide, a mask that does not broadcast
            to ``(..., Hq, L, S)``, ``dropout_p != 0``, ``scale``, ``softcap``, ``alibi_slopes``
            or ``sinks`` not finite in the inputs' dtype, ``key_lengths``, ``key_starts`` or
            ``query_lengths`` of another shape than the batch or out of range (``key_starts``
            without ``key_lengths``, or keys past the rows given), bad ``window``,
            ``causal_alignment`` or ``layout``.
        MemoryError: an output that cannot be allocated (named, with the arguments that set its
            size).
        KeyboardInterrupt: Ctrl-C (or another signal whose handler raises) during a long call,
            within about 20 ms (100 ms while other Python threads run); no result is returned.

    Example:
        >>> import numpy as np, attnkit
        >>> q = k = v = np.eye(3, dtype=np.float32)[None, None]     # (1, 1, 3, 3)
        >>> attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0].round(3)
        array([[1.   , 0.   , 0.   ],
               [0.36 , 0.64 , 0.   ],
               [0.264, 0.264, 0.471]], dtype=float32)
    """
    if (
        type(query) is np.ndarray and type(key) is np.ndarray and type(value) is np.ndarray
        and query.ndim == 4 and key.ndim == 4 and query.shape[1] == key.shape[1]
        and attn_mask is None and key_mask is None and key_lengths is None and key_starts is None
        and query_lengths is None and window is None and alibi_slopes is None
        and softcap is None and sinks is None and return_lse is False and return_weights is False
        and return_scores is False and _key_strips is None and out is None
        and type(is_causal) is bool and type(enable_gqa) is bool and (dropout_p == 0 if type(dropout_p) in (float, int) else False)
        and layout == "bhsd" and causal_alignment == "top_left"
        and (scale is None or (type(scale) is float and math.isfinite(scale)))
    ):
        # Fast path for small calls: the core re-validates everything and refuses (TypeError or
        # ValueError) what it cannot take directly; the full path below then converts or explains.
        dim = query.shape[-1]
        s = scale if scale is not None else (1.0 / math.sqrt(dim) if dim else 1.0)
        try:
            return _core.attention(query, key, value, "bhsd", s, None, is_causal, (None, None), "top_left")[0]
        except (TypeError, ValueError):
            pass
    layout = choice(layout, "layout", ("bhsd", "bshd"))  # type: ignore[assignment]
    alignment = choice(causal_alignment, "causal_alignment", ("top_left", "bottom_right"))
    # Read in place where the core can (a view into a bigger buffer, such as a KV cache, is never
    # copied); copied to C order otherwise.
    q, k, v = (float_array(x, name, in_place=True) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    mixed = q.dtype == np.float32 and is_half(k.dtype)  # a 16-bit KV cache read by float32 queries
    if not (k.dtype == v.dtype and (q.dtype == k.dtype or mixed)):
        raise TypeError(
            f"query, key, value: dtypes {q.dtype}, {k.dtype} and {v.dtype} do not go together: expected one "
            "dtype for all three, or float32 queries with float16 or bfloat16 keys and values"
        )
    if real(dropout_p, "dropout_p") != 0:
        raise ValueError(f"dropout_p: attnkit is for inference and takes only 0.0, got {dropout_p}")
    is_causal, enable_gqa = flag(is_causal, "is_causal"), flag(enable_gqa, "enable_gqa")
    return_lse, return_weights = flag(return_lse, "return_lse"), flag(return_weights, "return_weights")
    return_scores = flag(return_scores, "return_scores")
    squeeze = q.ndim == 2
    if squeeze:  # (L, E): one batch item and one head, in either layout
        q, k, v = q[None], k[None], v[None]
        layout = "bhsd"
    if not (q.ndim == k.ndim == v.ndim) or q.ndim < 3:
        raise ValueError(
            f"query, key, value: expected arrays of the same rank >= 2, got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    batch_shape = q.shape[:-3]
    if k.shape[:-3] != batch_shape or v.shape[:-3] != batch_shape:
        raise ValueError(f"key, value: batch dimensions {k.shape[:-3]}, {v.shape[:-3]} differ from the query's {batch_shape}")
    head_axis, seq_axis = (-3, -2) if layout == "bhsd" else (-2, -3)
    hq, length, dim = q.shape[head_axis], q.shape[seq_axis], q.shape[-1]
    hkv, s_len = k.shape[head_axis], k.shape[seq_axis]
    if k.shape[-1] != dim:
        raise ValueError(f"key: embedding size {k.shape[-1]} differs from the query's {dim}")
    if v.shape[head_axis] != hkv or v.shape[seq_axis] != s_len:
        raise ValueError(f"value: {v.shape[head_axis]} heads x {v.shape[seq_axis]} keys, expected {hkv} x {s_len} (the key's)")
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"key: {hkv} heads for {hq} query heads; pass enable_gqa=True to share key/value heads")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"key: {hkv} key/value heads cannot be shared by {hq} query heads")
    if scale is None:
        scale_value = 1.0 / math.sqrt(dim) if dim else 1.0
    else:
        scale_value = real(scale, "scale")
    cap = None if softcap is None else real(softcap, "softcap", positive=True)
    b = int(np.prod(batch_shape, dtype=np.int64))
    q4, k4, v4 = (x.reshape((b,) + x.shape[-3:]) for x in (q, k, v))
    bool_mask, float_mask = _attn_mask(attn_mask, q.dtype, batch_shape, (hq, length, s_len))
    keys = None
    if key_mask is not None:
        km = _as_array(key_mask, "key_mask")
        if km.dtype != bool:
            km = int_array(km, "key_mask")
        if km.shape != batch_shape + (s_len,):
            raise ValueError(f"key_mask: expected shape {batch_shape + (s_len,)} (batch..., S), got {km.shape}")
        keys = np.ascontiguousarray(km.reshape(b, s_len) != 0, dtype=np.uint8)
    lengths = None if key_lengths is None else counts(key_lengths, "key_lengths", batch_shape, s_len, "S, the keys given")
    # (The core checks that key_starts comes with key_lengths and that each item's keys fit.)
    starts = None if key_starts is None else counts(key_starts, "key_starts", batch_shape, s_len, "S, the rows given")
    q_lengths = None
    if query_lengths is not None:
        q_lengths = counts(query_lengths, "query_lengths", batch_shape, length, "L, the queries given")
    slopes = None
    if alibi_slopes is not None:
        sl = float_array(alibi_slopes, "alibi_slopes").astype(np.float64)
        if sl.shape not in ((hq,), batch_shape + (hq,)):
            raise ValueError(f"alibi_slopes: expected shape ({hq},) or {batch_shape + (hq,)}, got {sl.shape}")
        slopes = np.ascontiguousarray(sl.reshape(-1))
    sink_logits = None
    if sinks is not None:
        sk = float_array(sinks, "sinks").astype(np.float64)
        if sk.shape != (hq,):
            raise ValueError(f"sinks: expected shape ({hq},) (one per query head), got {sk.shape}")
        sink_logits = np.ascontiguousarray(sk)
    win = _window(window)
    # (`_key_strips`, for KVCache alone: the keys transposed in strips of 16, `(B, Hkv, S / 16, E,
    # 16)`, which the core reads in place of `key`, then a stand-in of the keys' shape and dtype.)
    out, out4 = out_array(out), None
    if out is not None:
        ev = v.shape[-1]
        if squeeze:
            expected = (length, ev)
        else:
            expected = batch_shape + ((hq, length, ev) if layout == "bhsd" else (length, hq, ev))
        if out.shape != expected:
            raise ValueError(f"out: expected shape {expected} (that of the output), got {out.shape}")
        if not out.flags.c_contiguous:  # (a reshape of it would be a copy, and the results lost)
            raise ValueError("out: expected a C-contiguous array")
        out4 = out.reshape((b,) + q4.shape[1:3] + (ev,))
    result, lse, weights, scores = _core.attention(
        q4, k4 if _key_strips is None else _key_strips, v4, layout, scale_value, cap, is_causal, win, alignment,
        bool_mask, float_mask, keys, slopes, return_lse, return_weights, lengths, q_lengths,
        sink_logits, return_scores, starts, _key_strips is not None, out4,
    )
    if q_lengths is not None:  # the rows past each item's queries are padding: zeros
        padding = np.arange(length)[None, :] >= q_lengths[:, None]  # (b, L)
        rows = padding[:, None, :, None] if layout == "bhsd" else padding[:, :, None, None]
        result[np.broadcast_to(rows, result.shape)] = 0
        if lse is not None:
            lse[np.broadcast_to(padding[:, None, :], lse.shape)] = -np.inf
        if weights is not None:
            weights[np.broadcast_to(padding[:, None, :, None], weights.shape)] = 0
        if scores is not None:
            scores[np.broadcast_to(padding[:, None, :, None], scores.shape)] = -np.inf
    if out is None:
        out = result.reshape(batch_shape + result.shape[1:])
        if squeeze:
            out = out[0]
    results = [out]
    if lse is not None:
        lse = lse.reshape(batch_shape + lse.shape[1:])
        results.append(lse[0] if squeeze else lse)
    for extra in (weights, scores):
        if extra is not None:
            extra = extra.reshape(batch_shape + extra.shape[1:])
            results.append(extra[0] if squeeze else extra)
    return results[0] if len(results) == 1 else tuple(results)


def merge_attention(
    outs: Sequence[npt.ArrayLike], lses: Sequence[npt.ArrayLike]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Combines attention results over disjoint sets of keys into the result over all of them,
    by their log-sum-exp (as xformers' ``merge_attentions``): for split-KV decoding, a prompt
    prefix shared by many sequences, or cascades.

    With ``M = max_c lse_c`` and ``w_c = exp(lse_c - M)``: ``out = sum_c w_c out_c / sum_c w_c``
    and ``lse = M + log sum_c w_c``, the partials taken in order. A partial with ``lse = -inf``
    (no key to attend to) is left out, whatever its output holds; a row that none reaches gives
    zeros and ``-inf``; a NaN ``lse`` makes its row NaN. This is the arithmetic attnkit's kernels
    finish with over their own chunks of 512 keys, so float32 and float64 results of calls over
    keys ``[0, 512)``, ``[512, 1024)``, ... merge to the bits of one call over all the keys.

    Args:
        outs: the partial outputs, each ``(..., L, Ev)`` (as ``scaled_dot_product_attention``
            returns them), all of one dtype: float32, float64, float16 or bfloat16 (merged in
            float32 and rounded once).
        lses: their log-sum-exps, each ``(..., L)``: float32 (float64 for float64 outputs).

    Returns:
        ``(out, lse)``: ``out`` in the partials' dtype, ``lse`` in the dtype merged in.

    Raises:
        ValueError: no partial, or shapes that differ; TypeError: dtypes that differ or do not
            fit (float32 ``lses`` for float16/bfloat16 outputs).

    Example:
        >>> import numpy as np, attnkit
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 2, 3, 8), dtype=np.float32) for _ in range(3))
        >>> parts = [attnkit.scaled_dot_product_attention(q, k[:, :, s], v[:, :, s], return_lse=True)
        ...          for s in (slice(0, 2), slice(2, 3))]
        >>> out, lse = attnkit.merge_attention([p[0] for p in parts], [p[1] for p in parts])
        >>> whole = attnkit.scaled_dot_product_attention(q, k, v)
        >>> bool(np.allclose(out, whole, atol=1e-6))
        True
    """
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError("outs, lses: expected sequences (lists or tuples) of arrays, one per partial result")
    o_list = [float_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    l_list = [float_array(x, f"lses[{i}]") for i, x in enumerate(lses)]
    if not o_list or len(o_list) != len(l_list):
        raise ValueError(f"outs, lses: expected as many partials of each, at least one; got {len(o_list)} and {len(l_list)}")
    dtype = o_list[0].dtype
    wide = compute_dtype(dtype)
    for i, (o, x) in enumerate(zip(o_list, l_list)):
        if o.dtype != dtype:
            raise TypeError(f"outs[{i}]: dtype {o.dtype}, outs[0] has {dtype}")
        if x.dtype != wide:
            raise TypeError(f"lses[{i}]: dtype {x.dtype} for {dtype} outputs (expected {wide})")
        if o.ndim < 1 or o.shape != o_list[0].shape or x.shape != o.shape[:-1]:
            raise ValueError(
                f"outs[{i}], lses[{i}]: shapes {o.shape} and {x.shape}; expected outs of one shape (..., L, Ev) "
                f"({o_list[0].shape}) and lses of its shape without the last axis"
            )
    shape = o_list[0].shape
    rows, ev = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
    with allocating(f"outs (the {len(o_list)} partials stacked, widened to {wide})"):
        stacked = np.stack([o.reshape(rows, ev) for o in o_list]).astype(wide, copy=False)
        stacked_lse = np.ascontiguousarray(np.stack([x.reshape(rows) for x in l_list]))
    merged = _core.merge_attention(stacked, stacked_lse)
    out = np.ascontiguousarray(merged[:, :ev]).reshape(shape)
    lse = np.ascontiguousarray(merged[:, ev]).reshape(shape[:-1])
    return (out.astype(dtype) if dtype != wide else out), lse


def _attn_mask(
    mask: npt.ArrayLike | None, dtype: np.dtype[Any], batch_shape: tuple[int, ...], tail: tuple[int, int, int]
) -> tuple[npt.NDArray[np.uint8] | None, npt.NDArray[Any] | None]:
    """The mask as a compact 4-d array (size-1 axes broadcast) over (B, Hq, L, S)."""
    if mask is None:
        return None, None
    m = _as_array(mask, "attn_mask")
    if m.dtype == bool:
        pass
    elif m.dtype.kind == "f" or is_half(m.dtype):
        if m.dtype.newbyteorder("=") != dtype:
            raise TypeError(f"attn_mask: a float mask must have the query's dtype {dtype}, got {m.dtype}")
    else:
        raise TypeError(f"attn_mask: expected a bool mask (true = may attend) or a float mask, got dtype {m.dtype}")
    target = batch_shape + tail
    try:
        fits = np.broadcast_shapes(m.shape, target) == target
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"attn_mask: shape {m.shape} does not broadcast to {target} (..., Hq, L, S)")
    m = m.reshape((1,) * (len(target) - m.ndim) + m.shape)
    lead = m.shape[: len(batch_shape)]
    if any(n != 1 for n in lead) and lead != batch_shape:  # partly broadcast batch axes
        m = np.broadcast_to(m, batch_shape + m.shape[len(batch_shape):])
    b = 1 if all(n == 1 for n in m.shape[: len(batch_shape)]) else int(np.prod(batch_shape, dtype=np.int64))
    # A 16-bit mask is widened (exactly) to float32, the dtype the core computes in.
    m = _contiguous(m.reshape((b,) + m.shape[len(batch_shape):]), compute_dtype(m.dtype.newbyteorder("=")), "attn_mask")
    if m.dtype == bool:
        return m.view(np.uint8), None
    return None, m


def _window(window: Any) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window: expected (left, right), each an int >= 0 or None, got {window!r}")
    # Bounds beyond any sequence mean "unlimited"; clamped so that the core's integers hold them.
    left, right = (None if w is None else min(integer(w, "window", minimum=0), 2**62) for w in window)
    return left, right
