"""LLaMA-family decoders (LLaMA, SmolLM2, TinyLlama, Mistral without its window): token ids to
next-token logits, and text generation through attnkit's ``KVCache``, in float32, with attnkit's
kernels and the matrix products of :class:`attnkit.F32Linear` (float32) or of :class:`attnkit.Bf16Linear`
(``dtype="bfloat16"``).

One layer (pre-norm)::

    x, h = rms_norm(previous, residual=h)                     # the add fused with the norm
    q, k, v = x @ W_q, x @ W_k, x @ W_v;  q, k = apply_rope(q), apply_rope(k)
    a = cache.attend(q) after cache.append(k, v)              # or one causal call (forward)
    y, h = rms_norm(a @ W_o, residual=h)
    previous = silu_mul(y @ W_gate, y @ W_up) @ W_down
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import attnkit
from attnkit.models._files import (
    F32,
    LoadError,
    PicklesTokenizer,
    Projection,
    read_json,
    read_safetensors,
    read_tokenizer,
    setting,
    tensor,
)



@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_positions: int
    # "half" for Hugging Face's weights; "interleaved" for GGUF files, whose query and key rows
    # llama.cpp stores in its own RoPE order (a permutation of each head's channels that q · k
    # does not see).
    rope_style: Literal["half", "interleaved"] = "half"
    eos_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: Path) -> LlamaConfig:
        hidden = setting(config, "hidden_size", path, int)
        heads = setting(config, "num_attention_heads", path, int)
        kv_heads = setting(config, "num_key_value_heads", path, int, heads)
        if heads % kv_heads:
            raise LoadError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = setting(config, "head_dim", path, int, hidden // heads)
        if head_dim % 2:
            raise LoadError(f"{path}: head_dim {head_dim} must be even (rotary pairs)")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise LoadError(f"{path}: hidden_act {act!r}: LLaMA-family models use 'silu'")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise LoadError(f"{path}: attention_bias / mlp_bias: biases are not supported")
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            layers=setting(config, "num_hidden_layers", path, int),
            intermediate=setting(config, "intermediate_size", path, int),
            vocab=setting(config, "vocab_size", path, int),
            eps=float(setting(config, "rms_norm_eps", path, float, 1e-6)),
            rope_theta=float(setting(config, "rope_theta", path, float, 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            max_positions=setting(config, "max_position_embeddings", path, int, 2048),
            eos_ids=_eos_ids(config.get("eos_token_id")),
        )


def _eos_ids(value: Any) -> tuple[int, ...]:
    """A config's ``eos_token_id``: one id, a list of them, or none."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


@dataclass(frozen=True)
class _Layer:
    attn_norm: F32
    qkv: Projection  # hidden -> (heads + 2 kv_heads) head_dim: the three projections, one product
    o: Projection  # heads head_dim -> hidden
    ffn_norm: F32
    gate_up: Projection  # hidden -> 2 intermediate: the gate and up projections side by side
    down: Projection  # intermediate -> hidden

    @classmethod
    def of(cls, attn_norm: F32, q: F32, k: F32, v: F32, o: F32, ffn_norm: F32, gate: F32, up: F32,
           down: F32, *, dtype: str) -> _Layer:
        """A layer from its matrices as checkpoints store them, (out, in)."""
        return cls(
            attn_norm=attn_norm,
            qkv=Projection(np.concatenate([q, k, v]), dtype=dtype),
            o=Projection(o, dtype=dtype),
            ffn_norm=ffn_norm,
            gate_up=Projection(np.concatenate([gate, up]), dtype=dtype),
            down=Projection(down, dtype=dtype),
        )


@dataclass
class _Weights:
    embed: F32  # (vocab, hidden)
    layers: list[_Layer]
    norm: F32
    lm_head: Projection  # hidden -> vocab


# Where each checkpoint format keeps a decoder's tensors ({n}: the layer).
HF_NAMES = {
    "attn_norm": "model.layers.{n}.input_layernorm.weight",
    "q": "model.layers.{n}.self_attn.q_proj.weight",
    "k": "model.layers.{n}.self_attn.k_proj.weight",
    "v": "model.layers.{n}.self_attn.v_proj.weight",
    "o": "model.layers.{n}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{n}.post_attention_layernorm.weight",
    "gate": "model.layers.{n}.mlp.gate_proj.weight",
    "up": "model.layers.{n}.mlp.up_proj.weight",
    "down": "model.layers.{n}.mlp.down_proj.weight",
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "head": "lm_head.weight",
}
GGUF_NAMES = {
    "attn_norm": "blk.{n}.attn_norm.weight",
    "q": "blk.{n}.attn_q.weight",
    "k": "blk.{n}.attn_k.weight",
    "v": "blk.{n}.attn_v.weight",
    "o": "blk.{n}.attn_output.weight",
    "ffn_norm": "blk.{n}.ffn_norm.weight",
    "gate": "blk.{n}.ffn_gate.weight",
    "up": "blk.{n}.ffn_up.weight",
    "down": "blk.{n}.ffn_down.weight",
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "head": "output.weight",
}


def read_weights(c: LlamaConfig, get: Callable[..., F32], names: dict[str, str], *, tied: bool,
                 dtype: str) -> _Weights:
    """A decoder's weights through ``get(name, *shape)`` (which checks the shape), by ``names``;
    ``tied``: the output matrix is the embedding table; ``dtype``: the matrix products'."""
    q_dim, kv_dim = c.heads * c.head_dim, c.kv_heads * c.head_dim
    shapes = {
        "attn_norm": (c.hidden,), "q": (q_dim, c.hidden), "k": (kv_dim, c.hidden), "v": (kv_dim, c.hidden),
        "o": (c.hidden, q_dim), "ffn_norm": (c.hidden,), "gate": (c.intermediate, c.hidden),
        "up": (c.intermediate, c.hidden), "down": (c.hidden, c.intermediate),
    }
    layers = [_Layer.of(**{part: get(names[part].format(n=n), *shape) for part, shape in shapes.items()},
                        dtype=dtype)
              for n in range(c.layers)]
    embed = get(names["embed"], c.vocab, c.hidden)
    lm_head = Projection(embed, dtype=dtype) if tied else Projection(
        get(names["head"], c.vocab, c.hidden), dtype=dtype)
    return _Weights(embed=embed, layers=layers, norm=get(names["norm"], c.hidden), lm_head=lm_head)


class LlamaDecoder(PicklesTokenizer):
    """A LLaMA-family decoder with its tokenizer.

    Made by :func:`attnkit.models.load`. :meth:`forward` gives next-token logits of (left- or
    right-) padded token ids; :meth:`generate` continues prompts, greedily at temperature 0, with a
    ``KVCache`` per layer. Picklable.

    Attributes:
        tokenizer: the checkpoint's ``tokenizers.Tokenizer``.
        config: the architecture (:class:`LlamaConfig`).
        dtype: the matrix products' dtype, ``"float32"`` or ``"bfloat16"`` (``load``'s).
    """

    def __init__(self, config: LlamaConfig, weights: _Weights, tokenizer: Any) -> None:
        self.config = config
        self._w = weights
        self.dtype = weights.lm_head.dtype
        self.tokenizer = tokenizer

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config_dict: dict[str, Any], dtype: str = "float32") -> LlamaDecoder:
        """A Hugging Face folder: config.json, model.safetensors, tokenizer.json."""
        config = LlamaConfig.from_dict(config_dict, folder / "config.json")
        if not config.eos_ids and (folder / "generation_config.json").is_file():
            eos_ids = _eos_ids(read_json(folder / "generation_config.json").get("eos_token_id"))
            config = LlamaConfig(**{**config.__dict__, "eos_ids": eos_ids})
        path = folder / "model.safetensors"
        raw = read_safetensors(path)

        def get(key: str, *shape: int) -> F32:
            return tensor(raw, key, shape, path)

        # Tied as the config says (transformers' default for LLaMA: not tied, so lm_head.weight
        # must be there).
        weights = read_weights(config, get, HF_NAMES, tied=bool(config_dict.get("tie_word_embeddings", False)),
                               dtype=dtype)
        return cls(config, weights, read_tokenizer(folder / "tokenizer.json"))

    def __repr__(self) -> str:
        c = self.config
        return (f"LlamaDecoder(layers={c.layers}, hidden={c.hidden}, heads={c.heads}/{c.kv_heads}, "
                f"head_dim={c.head_dim}, vocab={c.vocab}, rope_theta={c.rope_theta:g}, dtype={self.dtype!r})")

    # -- running -----------------------------------------------------------------------------

    def _tables(self, positions: npt.NDArray[np.int64]) -> tuple[F32, F32]:
        c = self.config
        return attnkit.rope_cos_sin(positions, c.head_dim, base=c.rope_theta, scaling=c.rope_scaling)

    def _layers(self, h: F32, cos: F32, sin: F32, attend: Any) -> F32:
        """The layer stack over token rows ``h`` ``(batch, seq, hidden)``; ``attend(n, q, k, v)``
        is layer ``n``'s attention (``bshd`` arrays). Returns the final norm of the last rows."""
        c = self.config
        b, s = h.shape[:2]
        layers = self._w.layers
        x = attnkit.rms_norm(h, c.hidden, layers[0].attn_norm, c.eps)
        q_dim, kv_dim = c.heads * c.head_dim, c.kv_heads * c.head_dim
        for n, layer in enumerate(layers):
            qkv = layer.qkv(x)
            q = attnkit.apply_rope(qkv[..., :q_dim].reshape(b, s, c.heads, c.head_dim), cos, sin,
                                   style=c.rope_style, layout="bshd")
            k = attnkit.apply_rope(qkv[..., q_dim:q_dim + kv_dim].reshape(b, s, c.kv_heads, c.head_dim), cos, sin,
                                   style=c.rope_style, layout="bshd")
            v = qkv[..., q_dim + kv_dim:].reshape(b, s, c.kv_heads, c.head_dim)
            a = attend(n, q, k, v).reshape(b, s, q_dim)
            y, h = attnkit.rms_norm(layer.o(a), c.hidden, layer.ffn_norm, c.eps, residual=h)
            gate_up = layer.gate_up(y)
            mlp = layer.down(attnkit.silu_mul(gate_up[..., :c.intermediate], gate_up[..., c.intermediate:]))
            following = layers[n + 1].attn_norm if n + 1 < len(layers) else self._w.norm
            x, h = attnkit.rms_norm(mlp, c.hidden, following, c.eps, residual=h)
        return x

    def forward(self, input_ids: npt.ArrayLike, attention_mask: npt.ArrayLike | None = None) -> F32:
        """Next-token logits ``(batch, seq, vocab)`` float32 of token ids ``(batch, seq)``, left- or
        right-padded (``attention_mask`` nonzero = a real token). Positions count real tokens only,
        so each sequence gets the logits it gets alone; padded rows give meaningless values."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected a 2-d array (batch, seq), got shape {ids.shape}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected shape {ids.shape} (that of input_ids), got {mask.shape}")
        cos, sin = self._tables(attnkit.position_ids(mask))
        h = attnkit.embedding(ids, self._w.embed)

        def attend(_: int, q: F32, k: F32, v: F32) -> F32:
            return attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, key_mask=mask, enable_gqa=True,
                                                        layout="bshd")

        return self._w.lm_head(self._layers(h, cos, sin, attend))

    def generate(
        self,
        prompts: str | Iterable[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str | list[str]:
        """Continues each prompt by up to ``max_new_tokens`` tokens (fewer when it ends with an
        end-of-sequence token), all prompts in one batch.

        The prompts are tokenized as they are (apply a chat template first for an instruct model),
        prefilled together with each sequence at its own length, then decoded one token per step
        through a ``KVCache`` per layer, logits computed for the last position only.

        Args:
            prompts: a string or an iterable of strings.
            max_new_tokens: ``>= 0``.
            temperature: 0 picks the most likely token (greedy); above 0 samples from
                ``softmax(logits / temperature)``.
            seed: the sampler's seed (``numpy.random.default_rng``).

        Returns:
            The generated text (without the prompt) of each prompt; a string for a string.
        """
        single = isinstance(prompts, str)
        texts: Sequence[str] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("prompts: expected a string or an iterable of strings")
        outs = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.generate_ids(
            [self.tokenizer.encode(t).ids for t in texts], max_new_tokens=max_new_tokens,
            temperature=temperature, seed=seed)]
        return outs[0] if single else outs

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """:meth:`generate` on token ids: the new ids of each prompt (end-of-sequence included)."""
        new: list[list[int]] = [[] for _ in prompts]
        for step in self.stream_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed):
            for i, token in enumerate(step):
                if token >= 0:
                    new[i].append(token)
        return new

    def stream_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Iterator[list[int]]:
        """:meth:`generate_ids` one step at a time: yields the new token of each prompt, or -1 for a
        prompt that has ended, until every prompt has ended or ``max_new_tokens`` steps. The
        arguments are checked at the call, before the first step."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        lengths = np.array([len(p) for p in prompts], np.int64)
        if len(prompts) and lengths.min() == 0:
            raise ValueError("prompts: every prompt needs at least one token")
        return self._steps(prompts, lengths, max_new_tokens, float(temperature), seed)

    def _steps(self, prompts: Sequence[Sequence[int]], lengths: npt.NDArray[np.int64], max_new_tokens: int,
               temperature: float, seed: int | None) -> Iterator[list[int]]:
        c = self.config
        b = len(prompts)
        if b == 0 or max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        caches = [attnkit.KVCache(b, c.kv_heads, c.head_dim, capacity=int(lengths.max()) + max_new_tokens)
                  for _ in range(c.layers)]
        # Prefill: right-padded, each sequence's queries aligned to its own positions.
        ids = np.zeros((b, int(lengths.max())), np.int64)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        steps = lengths
        done = np.zeros(b, bool)
        positions = np.arange(ids.shape[1])[None, :].repeat(b, 0)
        for _ in range(max_new_tokens):
            cos, sin = self._tables(positions)
            h = attnkit.embedding(ids, self._w.embed)

            # Lengths only for a ragged prefill: the cache's quick path takes whole appends.
            ragged = None if (steps == ids.shape[1]).all() else steps

            def attend(n: int, q: F32, k: F32, v: F32, ragged: Any = ragged) -> F32:
                caches[n].append(k, v, lengths=ragged, layout="bshd")
                return caches[n].attend(q, query_lengths=ragged, layout="bshd")  # type: ignore[no-any-return]

            x = self._layers(h, cos, sin, attend)
            last = x[np.arange(b), steps - 1]  # each sequence's last real row
            token = _pick(self._w.lm_head(last), temperature, rng)
            yield [-1 if done[i] else int(token[i]) for i in range(b)]
            done |= np.isin(token, c.eos_ids)
            if done.all():
                return
            ids = token[:, None]
            positions = caches[0].lengths[:, None]
            steps = np.ones(b, np.int64)


def _pick(logits: F32, temperature: float, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """The next token of each row: the most likely one, or a sample at ``temperature``."""
    if temperature == 0:
        return np.asarray(logits.argmax(axis=-1), np.int64)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p], np.int64)
