"""`MultiheadAttention`: projections, optional rotary embeddings, the fused attention kernel and
the output projection, with weights held as NumPy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast, overload

import numpy as np
import numpy.typing as npt

from attnkit._validate import _as_array, compute_dtype, flag, float_array, integer, is_half
from attnkit.attention import scaled_dot_product_attention
from attnkit.rope import apply_rope

__all__ = ["MultiheadAttention"]


class MultiheadAttention:
    """Multi-head attention with its own projection weights: ``torch.nn.MultiheadAttention`` in
    eval mode, on NumPy arrays.

    ``q = query Wqᵀ + bq``, ``k = key Wkᵀ + bk``, ``v = value Wvᵀ + bv`` split into heads; attention
    per head (:func:`attnkit.scaled_dot_product_attention`); heads concatenated and projected by
    ``Wo``. With ``num_kv_heads < num_heads`` the key/value heads are shared (grouped-query
    attention).

    Every argument named as in torch means what it means there (``batch_first``,
    ``key_padding_mask`` and ``attn_mask`` with true = masked, ``need_weights`` on by default,
    ``average_attn_weights``); attnkit's own masks, with true = may attend, have names of their
    own (``key_mask``, ``attend_mask``). From a torch call::

        mha = torch.nn.MultiheadAttention(E, H, batch_first=bf).eval()
        out, w = mha(q, k, v, key_padding_mask=kpm, attn_mask=m)            # torch
        layer = attnkit.MultiheadAttention.from_torch(mha)                  # or from_torch_state_dict(
        out, w = layer(q, k, v, key_padding_mask=kpm, attn_mask=m)          #   sd, num_heads=H, batch_first=bf)

    The one difference: a query with no key to attend to gives zeros (then the output bias)
    where torch's layer gives NaN.

    Args:
        q_weight: ``(num_heads * head_dim, embed_dim)``.
        k_weight: ``(num_kv_heads * head_dim, kdim)``.
        v_weight: ``(num_kv_heads * head_dim_v, vdim)``.
        o_weight: ``(out_dim, num_heads * head_dim_v)``.
        q_bias, k_bias, v_bias, o_bias: optional biases of the matching output sizes.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (default ``num_heads``); must divide it.
        batch_first: inputs and outputs are ``(batch, seq, feature)``; False (torch's default):
            ``(seq, batch, feature)``.

    All weights must share one float dtype (float32, float64, float16 or ``ml_dtypes.bfloat16``);
    inputs must have it too. The projections are NumPy matrix products, so their threads are
    NumPy's BLAS threads; attention runs on attnkit's pool. With 16-bit weights the projections
    compute in float32 (from float32 copies of the weights, made once: NumPy has no fast 16-bit
    matrix product), and their results are rounded once to the weights' dtype, as a 16-bit model
    holds them; attention then runs on the 16-bit queries, keys and values (in float32), and the
    returned attention weights are float32.

    Raises:
        TypeError: non-float or mixed weight dtypes.
        ValueError: weight shapes that do not fit the head counts.

    Example:
        >>> import numpy as np, attnkit
        >>> rng = np.random.default_rng(0)
        >>> w = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(4)]
        >>> layer = attnkit.MultiheadAttention(*w, num_heads=2, batch_first=True)
        >>> x = rng.standard_normal((1, 5, 8)).astype(np.float32)       # (batch, seq, embed)
        >>> out, weights = layer(x)
        >>> out.shape, weights.shape
        ((1, 5, 8), (1, 5, 5))
    """

    def __init__(
        self,
        q_weight: npt.ArrayLike,
        k_weight: npt.ArrayLike,
        v_weight: npt.ArrayLike,
        o_weight: npt.ArrayLike,
        *,
        q_bias: npt.ArrayLike | None = None,
        k_bias: npt.ArrayLike | None = None,
        v_bias: npt.ArrayLike | None = None,
        o_bias: npt.ArrayLike | None = None,
        num_heads: int,
        num_kv_heads: int | None = None,
        batch_first: bool = False,
    ) -> None:
        self.batch_first = flag(batch_first, "batch_first")
        self.num_heads = integer(num_heads, "num_heads", minimum=1)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else integer(num_kv_heads, "num_kv_heads", minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads = {self.num_heads}")
        names = ("q_weight", "k_weight", "v_weight", "o_weight")
        self.q_weight, self.k_weight, self.v_weight, self.o_weight = (
            float_array(w, n) for w, n in zip((q_weight, k_weight, v_weight, o_weight), names)
        )
        self.dtype = self.q_weight.dtype
        for w, n in zip((self.k_weight, self.v_weight, self.o_weight), names[1:]):
            if w.dtype != self.dtype:
                raise TypeError(f"{n}: dtype {w.dtype} differs from q_weight's {self.dtype}")
        for w, n in zip((self.q_weight, self.k_weight, self.v_weight, self.o_weight), names):
            if w.ndim != 2:
                raise ValueError(f"{n}: expected a 2-d (out_features, in_features) array, got shape {w.shape}")
        if self.q_weight.shape[0] % self.num_heads:
            raise ValueError(f"q_weight: {self.q_weight.shape[0]} output features do not split into {self.num_heads} heads")
        self.head_dim = self.q_weight.shape[0] // self.num_heads
        if self.k_weight.shape[0] != self.num_kv_heads * self.head_dim:
            raise ValueError(f"k_weight: expected {self.num_kv_heads} x {self.head_dim} output features, got {self.k_weight.shape[0]}")
        if self.v_weight.shape[0] % self.num_kv_heads:
            raise ValueError(f"v_weight: {self.v_weight.shape[0]} output features do not split into {self.num_kv_heads} heads")
        self.head_dim_v = self.v_weight.shape[0] // self.num_kv_heads
        if self.o_weight.shape[1] != self.num_heads * self.head_dim_v:
            raise ValueError(f"o_weight: expected {self.num_heads * self.head_dim_v} input features, got {self.o_weight.shape[1]}")
        biases = ((q_bias, self.q_weight, "q_bias"), (k_bias, self.k_weight, "k_bias"), (v_bias, self.v_weight, "v_bias"),
                  (o_bias, self.o_weight, "o_bias"))
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (self._bias(b, w, n) for b, w, n in biases)
        # The weights and biases in the dtype the projections compute in (the same arrays, but
        # float32 copies for 16-bit weights).
        compute = compute_dtype(self.dtype)
        self._compute = compute
        pairs = ((self.q_weight, self.q_bias), (self.k_weight, self.k_bias), (self.v_weight, self.v_bias),
                 (self.o_weight, self.o_bias))
        self._projections = [(w.astype(compute, copy=False), None if b is None else b.astype(compute, copy=False))
                             for w, b in pairs]

    def _bias(self, bias: Any, weight: npt.NDArray[Any], name: str) -> npt.NDArray[Any] | None:
        if bias is None:
            return None
        b = float_array(bias, name)
        if b.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {b.dtype} differs from the weights' {self.dtype}")
        if b.shape != (weight.shape[0],):
            raise ValueError(f"{name}: expected shape ({weight.shape[0]},), got {b.shape}")
        return b

    @classmethod
    def from_torch_state_dict(
        cls, state_dict: Mapping[str, Any], num_heads: int, *, batch_first: bool = False
    ) -> MultiheadAttention:
        """A layer from the ``state_dict()`` of a ``torch.nn.MultiheadAttention``.

        Accepts the packed ``in_proj_weight`` (and ``in_proj_bias``) or separate
        ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (``kdim``/``vdim`` differing from
        ``embed_dim``), and ``out_proj.weight``/``out_proj.bias``. Strict, as torch's
        ``load_state_dict(strict=True)``: unknown and missing keys raise. Values may be torch
        tensors or arrays; torch is not imported.

        Args:
            state_dict: the module's ``state_dict()``.
            num_heads: the module's ``num_heads``.
            batch_first: the module's ``batch_first`` (torch's default, False, unless given).

        Raises:
            ValueError: missing or unknown keys (listed), ``bias_k``/``bias_v``
                (``add_bias_kv``), which attnkit does not support, or shapes that do not fit.
            TypeError: values that are not float arrays or tensors (a masked array included).

        Example:
            >>> import numpy as np, attnkit
            >>> sd = {"in_proj_weight": np.eye(6, 2, dtype=np.float32), "out_proj.weight": np.eye(2, dtype=np.float32)}
            >>> attnkit.MultiheadAttention.from_torch_state_dict(sd, num_heads=1).head_dim
            2
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
        if "bias_k" in state_dict or "bias_v" in state_dict:
            raise ValueError("state_dict: bias_k/bias_v (add_bias_kv=True) are not supported")
        known = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "out_proj.weight", "out_proj.bias"}
        unknown = sorted(str(k) for k in state_dict if k not in known)
        present = {k for k in known if state_dict.get(k) is not None}
        separate = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        missing = [] if "out_proj.weight" in present else ["out_proj.weight"]
        if "in_proj_weight" not in present:
            missing += [n for n in separate if n not in present]
        if unknown or missing:
            what = [f"unknown keys {unknown}"] if unknown else []
            what += [f"missing keys {missing}" + ("" if "in_proj_weight" in present else " (or 'in_proj_weight')")] if missing else []
            raise ValueError(f"state_dict: {' and '.join(what)}; expected the keys of a torch.nn.MultiheadAttention")
        if "in_proj_weight" in present:
            packed = float_array(state_dict["in_proj_weight"], "in_proj_weight")
            if packed.ndim != 2 or packed.shape[0] % 3:
                raise ValueError(f"in_proj_weight: expected shape (3 * embed_dim, embed_dim), got {packed.shape}")
            wq, wk, wv = np.split(packed, 3)
        else:
            wq, wk, wv = (state_dict[n] for n in separate)
        bq = bk = bv = None
        if "in_proj_bias" in present:
            packed_bias = float_array(state_dict["in_proj_bias"], "in_proj_bias")
            rows = 3 * np.shape(wq)[0] if np.ndim(wq) == 2 else None
            if packed_bias.shape != (rows,):
                raise ValueError(f"in_proj_bias: expected shape ({rows},) (three times embed_dim), got {packed_bias.shape}")
            bq, bk, bv = np.split(packed_bias, 3)
        return cls(wq, wk, wv, state_dict["out_proj.weight"], q_bias=bq, k_bias=bk, v_bias=bv,
                   o_bias=state_dict.get("out_proj.bias"), num_heads=num_heads, batch_first=batch_first)

    @classmethod
    def from_torch(cls, module: Any) -> MultiheadAttention:
        """A layer from a ``torch.nn.MultiheadAttention`` module: its weights, ``num_heads`` and
        ``batch_first`` (torch is not imported).

        Raises:
            TypeError: an object without those attributes.
            ValueError: as :meth:`from_torch_state_dict`.

        Example:
            >>> import numpy as np, attnkit
            >>> from types import SimpleNamespace        # stands in for torch.nn.MultiheadAttention(2, 1)
            >>> sd = {"in_proj_weight": np.eye(6, 2, dtype=np.float32), "out_proj.weight": np.eye(2, dtype=np.float32)}
            >>> mha = SimpleNamespace(state_dict=lambda: sd, num_heads=1, batch_first=False)
            >>> attnkit.MultiheadAttention.from_torch(mha).batch_first
            False
        """
        if not all(hasattr(module, a) for a in ("state_dict", "num_heads", "batch_first")):
            raise TypeError(f"module: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        return cls.from_torch_state_dict(module.state_dict(), int(module.num_heads), batch_first=bool(module.batch_first))

    def _project(self, x: npt.NDArray[Any], which: int, heads: int) -> npt.NDArray[Any]:
        """Projection ``which`` (0-3: q, k, v, o) of ``(batch, seq, features)`` as ``(batch, seq,
        heads, dim)`` (bshd), in the weights' dtype (computed in float32 for 16-bit weights)."""
        w, b = self._projections[which]
        # One (batch·seq, features) matmul: NumPy runs a 3-d operand as one BLAS call per batch
        # item, which measured 1.2-1.4x slower on BERT-base shapes.
        y = x.reshape(x.shape[0] * x.shape[1], x.shape[2]).astype(self._compute, copy=False) @ w.T
        if b is not None:
            y += b
        y = y.astype(self.dtype, copy=False)  # rounded once, for 16-bit weights
        return cast(npt.NDArray[Any], y.reshape(x.shape[:-1] + (heads, w.shape[0] // heads)))

    def _input(self, x: Any, name: str, features: int) -> npt.NDArray[Any]:
        """``x`` as ``(batch, seq, features)`` (a view when ``batch_first`` is False)."""
        arr = float_array(x, name)
        if arr.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {arr.dtype} differs from the weights' {self.dtype}")
        layout = "(batch, seq" if self.batch_first else "(seq, batch"
        if arr.ndim != 3 or arr.shape[-1] != features:
            raise ValueError(f"{name}: expected shape {layout}, {features}) (batch_first={self.batch_first}), got {arr.shape}")
        return arr if self.batch_first else arr.transpose(1, 0, 2)

    @overload
    def __call__(
        self,
        query: npt.ArrayLike,
        key: npt.ArrayLike | None = None,
        value: npt.ArrayLike | None = None,
        key_padding_mask: npt.ArrayLike | None = None,
        need_weights: Literal[True] = True,
        attn_mask: npt.ArrayLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        key_mask: npt.ArrayLike | None = None,
        attend_mask: npt.ArrayLike | None = None,
        rope: tuple[Any, ...] | None = None,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...

    @overload
    def __call__(
        self,
        query: npt.ArrayLike,
        key: npt.ArrayLike | None = None,
        value: npt.ArrayLike | None = None,
        key_padding_mask: npt.ArrayLike | None = None,
        *,
        need_weights: Literal[False],
        attn_mask: npt.ArrayLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        key_mask: npt.ArrayLike | None = None,
        attend_mask: npt.ArrayLike | None = None,
        rope: tuple[Any, ...] | None = None,
    ) -> tuple[npt.NDArray[Any], None]: ...

    @overload
    def __call__(
        self,
        query: npt.ArrayLike,
        key: npt.ArrayLike | None = None,
        value: npt.ArrayLike | None = None,
        key_padding_mask: npt.ArrayLike | None = None,
        need_weights: bool = True,
        attn_mask: npt.ArrayLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        key_mask: npt.ArrayLike | None = None,
        attend_mask: npt.ArrayLike | None = None,
        rope: tuple[Any, ...] | None = None,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]: ...

    def __call__(
        self,
        query: npt.ArrayLike,
        key: npt.ArrayLike | None = None,
        value: npt.ArrayLike | None = None,
        key_padding_mask: npt.ArrayLike | None = None,
        need_weights: bool = True,
        attn_mask: npt.ArrayLike | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        key_mask: npt.ArrayLike | None = None,
        attend_mask: npt.ArrayLike | None = None,
        rope: tuple[Any, ...] | None = None,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
        """Attention of ``query`` over ``key``/``value`` (self-attention when they are None), with
        the arguments of ``torch.nn.MultiheadAttention.forward``, in its order and meaning.

        Args:
            query: ``(L, batch, embed_dim)``, or ``(batch, L, embed_dim)`` with ``batch_first``.
            key: ``(S, batch, kdim)`` (``batch_first``: ``(batch, S, kdim)``), default ``query``.
            value: ``(S, batch, vdim)`` likewise, default ``key``.
            key_padding_mask: torch's: ``(batch, S)``, bool **true = ignore** this key, or float
                added to the scores.
            need_weights: also return the attention weights (torch's default: True).
            attn_mask: torch's: ``(L, S)`` or ``(batch * num_heads, L, S)``, bool **true = not
                allowed**, or float added to the scores.
            average_attn_weights: average the weights over heads (``(batch, L, S)``) instead of
                returning them per head (``(batch, num_heads, L, S)``).
            is_causal: causal masking (top-left aligned); combined with any mask given.
            key_mask: attnkit's ``(batch, S)``, nonzero = **may attend** (a tokenizer's
                ``attention_mask``).
            attend_mask: attnkit's bool mask, **true = may attend**, broadcastable to
                ``(batch, num_heads, L, S)``.
            rope: ``(cos, sin)`` or ``(cos, sin, style)`` from :func:`attnkit.rope_cos_sin`,
                applied to the projected queries and keys (``(L, d/2)`` or ``(batch, L, d/2)``).

        Returns:
            ``(out, weights)``: ``out`` shaped like ``query`` with ``out_dim`` features;
            ``weights`` (always batch first, as in torch) or None. A query with nothing to
            attend to gives zeros (then the output bias) where torch's layer gives NaN.

        Raises:
            TypeError, ValueError: as :func:`attnkit.scaled_dot_product_attention`; inputs whose
                dtype or feature size does not match the weights; masks whose shape does not
                fit the batch (as when ``batch_first`` does not describe the inputs).

        Example:
            >>> import numpy as np, attnkit
            >>> w = [np.eye(4, dtype=np.float32)] * 4
            >>> layer = attnkit.MultiheadAttention(*w, num_heads=1)        # batch_first=False
            >>> x = np.ones((3, 2, 4), np.float32)                            # (seq, batch, embed)
            >>> padding = np.array([[False, False, True], [False, False, False]])
            >>> out, weights = layer(x, key_padding_mask=padding)
            >>> out.shape, weights[0, 0].round(2)
            ((3, 2, 4), array([0.5, 0.5, 0. ], dtype=float32))
        """
        need_weights = flag(need_weights, "need_weights")
        average_attn_weights = flag(average_attn_weights, "average_attn_weights")
        q_in = self._input(query, "query", self.q_weight.shape[1])
        k_in = q_in if key is None else self._input(key, "key", self.k_weight.shape[1])
        v_in = k_in if value is None else self._input(value, "value", self.v_weight.shape[1])
        batch, length, s_len = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        if k_in.shape[0] != batch or v_in.shape[:2] != k_in.shape[:2]:
            raise ValueError(f"query, key, value: batch and sequence sizes {q_in.shape[:2]}, {k_in.shape[:2]}, "
                             f"{v_in.shape[:2]} (batch, seq) do not fit (batch_first={self.batch_first})")
        masks = self._masks(key_padding_mask, attn_mask, key_mask, attend_mask, batch, length, s_len)
        q = self._project(q_in, 0, self.num_heads)
        k = self._project(k_in, 1, self.num_kv_heads)
        v = self._project(v_in, 2, self.num_kv_heads)
        if rope is not None:
            if not isinstance(rope, tuple) or len(rope) not in (2, 3):
                raise ValueError("rope: expected (cos, sin) or (cos, sin, style)")
            style = cast(Literal["half", "interleaved"], rope[2] if len(rope) == 3 else "half")
            q = apply_rope(q, rope[0], rope[1], style=style, layout="bshd")
            k = apply_rope(k, rope[0], rope[1], style=style, layout="bshd")
        kw: dict[str, Any] = dict(is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads,
                                  key_mask=masks[1], layout="bshd")
        weights: npt.NDArray[Any] | None = None
        if need_weights:
            out, weights = scaled_dot_product_attention(q, k, v, masks[0], return_weights=True, **kw)
        else:
            out = scaled_dot_product_attention(q, k, v, masks[0], **kw)
        b, length, heads, dim = out.shape
        out = self._project(out.reshape(b, length, heads * dim), 3, 1).reshape(b, length, self.o_weight.shape[0])
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)
        return (out if self.batch_first else np.ascontiguousarray(out.transpose(1, 0, 2))), weights

    def _masks(
        self, key_padding_mask: Any, attn_mask: Any, key_mask: Any, attend_mask: Any, batch: int, length: int, s_len: int
    ) -> tuple[npt.NDArray[Any] | None, npt.NDArray[Any] | None]:
        """torch's and attnkit's masks as one ``attn_mask`` (bool, true = may attend, or float of
        the weights' dtype) over ``(batch, heads, L, S)`` and one ``key_mask`` (nonzero = may attend)."""
        hint = f" (batch_first={self.batch_first})"
        float_parts: list[npt.NDArray[Any]] = []
        allowed: list[npt.NDArray[Any]] = []
        keys = None
        if key_padding_mask is not None:
            kpm = _as_array(key_padding_mask, "key_padding_mask")
            if kpm.shape != (batch, s_len):
                raise ValueError(f"key_padding_mask: expected shape (batch, S) = {(batch, s_len)}{hint}, got {kpm.shape}")
            if kpm.dtype == bool:
                keys = ~kpm
            elif kpm.dtype.kind == "f" or is_half(kpm.dtype):
                float_parts.append(_float_mask(kpm, self.dtype, "key_padding_mask")[:, None, None, :])
            else:
                raise TypeError(f"key_padding_mask: expected a bool (true = ignore) or float mask, got dtype {kpm.dtype}")
        if key_mask is not None:
            km = _as_array(key_mask, "key_mask")
            if km.shape != (batch, s_len):
                raise ValueError(f"key_mask: expected shape (batch, S) = {(batch, s_len)}{hint}, got {km.shape}")
            keys = km if keys is None else (keys & (km != 0))
        if attn_mask is not None:
            m = _as_array(attn_mask, "attn_mask")
            if m.ndim == 3 and m.shape == (batch * self.num_heads, length, s_len):
                m = m.reshape(batch, self.num_heads, length, s_len)
            elif m.shape != (length, s_len):
                raise ValueError(f"attn_mask: expected shape (L, S) = {(length, s_len)} or (batch * num_heads, L, S) = "
                                 f"{(batch * self.num_heads, length, s_len)}{hint}, got {m.shape}")
            if m.dtype == bool:
                allowed.append(~m)
            elif m.dtype.kind == "f" or is_half(m.dtype):
                float_parts.append(_float_mask(m, self.dtype, "attn_mask"))
            else:
                raise TypeError(f"attn_mask: expected a bool (true = not allowed) or float mask, got dtype {m.dtype}")
        if attend_mask is not None:
            am = _as_array(attend_mask, "attend_mask")
            if am.dtype != bool:
                raise TypeError(f"attend_mask: expected a bool mask (true = may attend), got dtype {am.dtype}")
            allowed.append(am)
        if not float_parts:
            combined = None if not allowed else allowed[0] if len(allowed) == 1 else np.logical_and(*allowed)
            return combined, keys
        total = float_parts[0] if len(float_parts) == 1 else float_parts[0] + float_parts[1]
        for a in allowed:  # as torch does: a bool mask becomes -inf where not allowed, and masks add
            total = np.where(a, total, -np.inf).astype(self.dtype)
        return np.asarray(total, self.dtype), keys


def _float_mask(m: npt.NDArray[Any], dtype: np.dtype[Any], name: str) -> npt.NDArray[Any]:
    if m.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"{name}: a float mask must have the weights' dtype {dtype}, got {m.dtype}")
    return m
