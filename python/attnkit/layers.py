"""`MultiheadAttention`: projections, optional rotary embeddings, the fused attention kernel and
the output projection, with weights held as NumPy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from attnkit._validate import float_array, integer
from attnkit.attention import scaled_dot_product_attention
from attnkit.rope import apply_rope

__all__ = ["MultiheadAttention"]


def _to_numpy(value: Any, name: str) -> npt.NDArray[Any]:
    """An array from a NumPy array or a tensor-like (``.detach()``, ``.cpu()``, ``__array__``),
    without importing any framework."""
    for method in ("detach", "cpu"):
        if hasattr(value, method):
            value = getattr(value, method)()
    return float_array(np.asarray(value), name)


class MultiheadAttention:
    """Multi-head attention with its own projection weights, like ``torch.nn.MultiheadAttention``
    with ``batch_first=True`` in eval mode.

    ``q = query Wqᵀ + bq``, ``k = key Wkᵀ + bk``, ``v = value Wvᵀ + bv`` split into heads; attention
    per head (:func:`attnkit.scaled_dot_product_attention`); heads concatenated and projected by
    ``Wo``. With ``num_kv_heads < num_heads`` the key/value heads are shared (grouped-query
    attention).

    Args:
        q_weight: ``(num_heads * head_dim, embed_dim)``.
        k_weight: ``(num_kv_heads * head_dim, kdim)``.
        v_weight: ``(num_kv_heads * head_dim_v, vdim)``.
        o_weight: ``(out_dim, num_heads * head_dim_v)``.
        q_bias, k_bias, v_bias, o_bias: optional biases of the matching output sizes.
        num_heads: number of query heads.
        num_kv_heads: number of key/value heads (default ``num_heads``); must divide it.

    All weights must share one float dtype (float32 or float64); inputs must have it too.
    The projections are NumPy matrix products, so their threads are NumPy's BLAS threads;
    attention runs on attnkit's pool.

    Raises:
        TypeError: non-float or mixed weight dtypes.
        ValueError: weight shapes that do not fit the head counts.

    Example:
        >>> import numpy as np, attnkit
        >>> rng = np.random.default_rng(0)
        >>> w = [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(4)]
        >>> layer = attnkit.MultiheadAttention(*w, num_heads=2)
        >>> x = rng.standard_normal((1, 5, 8)).astype(np.float32)       # (batch, seq, embed)
        >>> out, weights = layer(x, need_weights=True)
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
    ) -> None:
        self.num_heads = integer(num_heads, "num_heads", minimum=1)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else integer(num_kv_heads, "num_kv_heads", minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads = {self.num_heads}")
        names = ("q_weight", "k_weight", "v_weight", "o_weight")
        self.q_weight, self.k_weight, self.v_weight, self.o_weight = (
            _to_numpy(w, n) for w, n in zip((q_weight, k_weight, v_weight, o_weight), names)
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

    def _bias(self, bias: Any, weight: npt.NDArray[Any], name: str) -> npt.NDArray[Any] | None:
        if bias is None:
            return None
        b = _to_numpy(bias, name)
        if b.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {b.dtype} differs from the weights' {self.dtype}")
        if b.shape != (weight.shape[0],):
            raise ValueError(f"{name}: expected shape ({weight.shape[0]},), got {b.shape}")
        return b

    @classmethod
    def from_torch_state_dict(cls, state_dict: Mapping[str, Any], num_heads: int) -> MultiheadAttention:
        """A layer from the ``state_dict()`` of a ``torch.nn.MultiheadAttention``.

        Accepts the packed ``in_proj_weight`` (and ``in_proj_bias``) or separate
        ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (``kdim``/``vdim`` differing from
        ``embed_dim``), and ``out_proj.weight``/``out_proj.bias``. Values may be torch tensors or
        arrays; torch is not imported.

        Raises:
            ValueError: missing keys, or ``bias_k``/``bias_v`` (``add_bias_kv``), which attnkit
                does not support.

        Example:
            >>> import numpy as np, attnkit
            >>> sd = {"in_proj_weight": np.eye(6, 2, dtype=np.float32), "out_proj.weight": np.eye(2, dtype=np.float32)}
            >>> attnkit.MultiheadAttention.from_torch_state_dict(sd, num_heads=1).head_dim
            2
        """
        if "bias_k" in state_dict or "bias_v" in state_dict:
            raise ValueError("state_dict: bias_k/bias_v (add_bias_kv=True) are not supported")
        if "out_proj.weight" not in state_dict:
            raise ValueError("state_dict: missing 'out_proj.weight'")
        if "in_proj_weight" in state_dict and state_dict["in_proj_weight"] is not None:
            packed = _to_numpy(state_dict["in_proj_weight"], "in_proj_weight")
            if packed.ndim != 2 or packed.shape[0] % 3:
                raise ValueError(f"in_proj_weight: expected shape (3 * embed_dim, embed_dim), got {packed.shape}")
            wq, wk, wv = np.split(packed, 3)
        else:
            missing = [n for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight") if n not in state_dict]
            if missing:
                raise ValueError(f"state_dict: needs 'in_proj_weight' or {', '.join(map(repr, missing))}")
            wq, wk, wv = (state_dict[n] for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        bq = bk = bv = None
        if state_dict.get("in_proj_bias") is not None:
            bq, bk, bv = np.split(_to_numpy(state_dict["in_proj_bias"], "in_proj_bias"), 3)
        return cls(wq, wk, wv, state_dict["out_proj.weight"], q_bias=bq, k_bias=bk, v_bias=bv,
                   o_bias=state_dict.get("out_proj.bias"), num_heads=num_heads)

    def _project(self, x: npt.NDArray[Any], w: npt.NDArray[Any], b: npt.NDArray[Any] | None, heads: int) -> npt.NDArray[Any]:
        # One (batch·seq, features) matmul: NumPy runs a 3-d operand as one BLAS call per batch
        # item, which measured 1.2-1.4x slower on BERT-base shapes.
        y = x.reshape(x.shape[0] * x.shape[1], x.shape[2]) @ w.T
        if b is not None:
            y += b
        # (batch, seq, heads, dim): bshd
        return cast(npt.NDArray[Any], y.reshape(x.shape[:-1] + (heads, w.shape[0] // heads)))

    def _input(self, x: Any, name: str, features: int) -> npt.NDArray[Any]:
        arr = float_array(x, name)
        if arr.dtype != self.dtype:
            raise TypeError(f"{name}: dtype {arr.dtype} differs from the weights' {self.dtype}")
        if arr.ndim != 3 or arr.shape[-1] != features:
            raise ValueError(f"{name}: expected shape (batch, seq, {features}), got {arr.shape}")
        return arr

    def __call__(
        self,
        query: npt.ArrayLike,
        key: npt.ArrayLike | None = None,
        value: npt.ArrayLike | None = None,
        *,
        key_mask: npt.ArrayLike | None = None,
        attn_mask: npt.ArrayLike | None = None,
        is_causal: bool = False,
        rope: tuple[Any, ...] | None = None,
        need_weights: bool = False,
        average_attn_weights: bool = True,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
        """Attention of ``query`` over ``key``/``value`` (self-attention when they are None).

        Masks use attnkit's polarity: **true / nonzero = may attend**. PyTorch's
        ``key_padding_mask`` (true = ignore) becomes ``key_mask=~key_padding_mask``, and its bool
        ``attn_mask`` (true = not allowed) becomes ``attn_mask=~attn_mask``; float masks are the same.

        Args:
            query: ``(batch, L, embed_dim)``.
            key: ``(batch, S, kdim)``, default ``query``.
            value: ``(batch, S, vdim)``, default ``key``.
            key_mask: ``(batch, S)``, nonzero = may attend (a tokenizer's ``attention_mask``).
            attn_mask: bool or float, broadcastable to ``(batch, num_heads, L, S)``.
            is_causal: causal masking (top-left aligned).
            rope: ``(cos, sin)`` or ``(cos, sin, style)`` from :func:`attnkit.rope_cos_sin`,
                applied to the projected queries and keys (``(L, d/2)`` or ``(batch, L, d/2)``).
            need_weights: also return the attention weights.
            average_attn_weights: average the weights over heads (``(batch, L, S)``) instead of
                returning them per head (``(batch, num_heads, L, S)``).

        Returns:
            ``(out, weights)``: ``out`` of shape ``(batch, L, out_dim)``; ``weights`` or None. A
            query with nothing to attend to gives zeros where PyTorch gives NaN.

        Raises:
            TypeError, ValueError: as :func:`attnkit.scaled_dot_product_attention`, and inputs
                whose dtype or feature size does not match the weights.
        """
        q_in = self._input(query, "query", self.q_weight.shape[1])
        k_in = q_in if key is None else self._input(key, "key", self.k_weight.shape[1])
        v_in = k_in if value is None else self._input(value, "value", self.v_weight.shape[1])
        q = self._project(q_in, self.q_weight, self.q_bias, self.num_heads)
        k = self._project(k_in, self.k_weight, self.k_bias, self.num_kv_heads)
        v = self._project(v_in, self.v_weight, self.v_bias, self.num_kv_heads)
        if rope is not None:
            if not isinstance(rope, tuple) or len(rope) not in (2, 3):
                raise ValueError("rope: expected (cos, sin) or (cos, sin, style)")
            style = cast(Literal["half", "interleaved"], rope[2] if len(rope) == 3 else "half")
            q = apply_rope(q, rope[0], rope[1], style=style, layout="bshd")
            k = apply_rope(k, rope[0], rope[1], style=style, layout="bshd")
        result = scaled_dot_product_attention(
            q, k, v, attn_mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads,
            key_mask=key_mask, return_weights=need_weights, layout="bshd",
        )
        out, weights = result if need_weights else (result, None)
        b, length, heads, dim = out.shape
        out = (out.reshape(b * length, heads * dim) @ self.o_weight.T).reshape(b, length, self.o_weight.shape[0])
        if self.o_bias is not None:
            out += self.o_bias
        if weights is not None and average_attn_weights:
            weights = weights.mean(axis=1)
        return out, weights
