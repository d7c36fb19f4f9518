"""BERT-family encoders (BERT, MiniLM, sentence-transformers' models on them): token ids to
contextual embeddings to pooled sentence vectors, in float32, with attnkit's kernels and the
matrix products of :class:`attnkit.F32Linear` (float32) or of :class:`attnkit.Bf16Linear`
(``dtype="bfloat16"``).

One layer (post-norm, as BERT)::

    q, k, v = split(h @ W_qkv.T + b_qkv)                     # one product for the three
    a = scaled_dot_product_attention(q, k, v, key_mask=attention_mask, layout="bshd")
    h = layer_norm(a @ W_o.T + b_o, residual=h)[0]              # the add fused with the norm
    h = layer_norm(gelu(h @ W_i.T + b_i) @ W_f.T + b_f, residual=h)[0]   # GELU fused too
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
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


_ACTIVATIONS: dict[str, Literal["none", "tanh"]] = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
# Sentences tokenized and sorted together by encode: enough for batches of even length, few enough
# that the padded ids of a huge input are not held at once.
_SORT_CHUNK = 4096
_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab: int
    positions: int
    type_vocab: int
    eps: float
    gelu: Literal["none", "tanh"]  # the erf form ("none") or the tanh approximation

    @classmethod
    def from_dict(cls, config: dict[str, Any], path: Path) -> BertConfig:
        hidden = setting(config, "hidden_size", path, int)
        heads = setting(config, "num_attention_heads", path, int)
        if hidden % heads:
            raise LoadError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        act = config.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise LoadError(f"{path}: hidden_act {act!r} is not one of {', '.join(map(repr, _ACTIVATIONS))}")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise LoadError(f"{path}: position_embedding_type {kind!r}: only 'absolute' is supported")
        return cls(
            hidden=hidden,
            heads=heads,
            layers=setting(config, "num_hidden_layers", path, int),
            intermediate=setting(config, "intermediate_size", path, int),
            vocab=setting(config, "vocab_size", path, int),
            positions=setting(config, "max_position_embeddings", path, int),
            type_vocab=setting(config, "type_vocab_size", path, int, 2),
            eps=float(setting(config, "layer_norm_eps", path, float, 1e-12)),
            gelu=_ACTIVATIONS[act],
        )


class _Buffers:
    """Named float32 buffers of ``(rows, cols)``, each grown when a call needs more rows and
    otherwise reused: a forward pass's big intermediate arrays, shared by the batches of a call."""

    def __init__(self) -> None:
        self._flat: dict[str, F32] = {}

    def take(self, name: str, rows: int, cols: int) -> F32:
        """Buffer ``name`` as a C-contiguous ``(rows, cols)`` array (its contents are undefined)."""
        size = rows * cols
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = np.empty(size, np.float32)
        return flat[:size].reshape(rows, cols)


@dataclass(frozen=True)
class _Layer:
    qkv: Projection  # hidden -> 3 hidden: the query, key and value projections side by side
    o: Projection  # hidden -> hidden
    ln1: tuple[F32, F32]
    i: Projection  # hidden -> intermediate
    f: Projection  # intermediate -> hidden
    ln2: tuple[F32, F32]


class BertEncoder(PicklesTokenizer):
    """A BERT-family encoder with its tokenizer, pooling and normalization.

    Made by :func:`attnkit.models.load`. :meth:`encode` turns sentences into vectors;
    :meth:`forward` gives the contextual embeddings of token ids. Picklable (the weights and the
    tokenizer travel), so it can be shipped to worker processes.

    Attributes:
        tokenizer: the checkpoint's ``tokenizers.Tokenizer``, truncating to ``max_seq_length``
            and padding each batch to its longest sentence.
        config: the architecture (:class:`BertConfig`).
        pooling: ``"mean"``, ``"cls"`` or ``"max"``.
        normalize: whether :meth:`encode` scales vectors to unit length by default.
        max_seq_length: the longest input in tokens (longer ones are truncated).
        dtype: the matrix products' dtype, ``"float32"`` or ``"bfloat16"`` (``load``'s).
    """

    def __init__(
        self,
        config: BertConfig,
        weights: dict[str, Any],
        tokenizer: Any,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        max_seq_length: int | None = None,
    ) -> None:
        self.config = config
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = min(max_seq_length or config.positions, config.positions)
        self._word, self._position, self._type = weights["word"], weights["position"], weights["type"]
        self._ln0: tuple[F32, F32] = weights["ln0"]
        self._layers: list[_Layer] = weights["layers"]
        self.dtype = self._layers[0].qkv.dtype if self._layers else "float32"
        self.tokenizer = tokenizer
        self._configure_tokenizer()

    def _configure_tokenizer(self) -> None:
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: Path, config_dict: dict[str, Any], dtype: str = "float32") -> BertEncoder:
        config = BertConfig.from_dict(config_dict, folder / "config.json")
        path = folder / "model.safetensors"
        raw = read_safetensors(path)
        # BertForX checkpoints put the encoder under "bert."; a BertModel's keys have no prefix.
        if "embeddings.word_embeddings.weight" not in raw and "bert.embeddings.word_embeddings.weight" in raw:
            raw = {k.removeprefix("bert."): v for k, v in raw.items()}
        h, i = config.hidden, config.intermediate

        def get(key: str, *shape: int) -> F32:
            return tensor(raw, key, shape, path)

        def norm(prefix: str) -> tuple[F32, F32]:
            # Old TensorFlow conversions name the parameters gamma and beta.
            if f"{prefix}.weight" not in raw and f"{prefix}.gamma" in raw:
                return get(f"{prefix}.gamma", h), get(f"{prefix}.beta", h)
            return get(f"{prefix}.weight", h), get(f"{prefix}.bias", h)

        layers = []
        for n in range(config.layers):
            p = f"encoder.layer.{n}"
            qkv = [get(f"{p}.attention.self.{name}.weight", h, h) for name in ("query", "key", "value")]
            qkv_b = [get(f"{p}.attention.self.{name}.bias", h) for name in ("query", "key", "value")]
            layers.append(_Layer(
                qkv=Projection(np.concatenate(qkv), np.concatenate(qkv_b), dtype=dtype),
                o=Projection(get(f"{p}.attention.output.dense.weight", h, h), get(f"{p}.attention.output.dense.bias", h),
                             dtype=dtype),
                ln1=norm(f"{p}.attention.output.LayerNorm"),
                i=Projection(get(f"{p}.intermediate.dense.weight", i, h), get(f"{p}.intermediate.dense.bias", i),
                             dtype=dtype),
                f=Projection(get(f"{p}.output.dense.weight", h, i), get(f"{p}.output.dense.bias", h), dtype=dtype),
                ln2=norm(f"{p}.output.LayerNorm"),
            ))
        weights = {
            "word": get("embeddings.word_embeddings.weight", config.vocab, h),
            "position": get("embeddings.position_embeddings.weight", config.positions, h),
            "type": get("embeddings.token_type_embeddings.weight", config.type_vocab, h),
            "ln0": norm("embeddings.LayerNorm"),
            "layers": layers,
        }
        tokenizer = read_tokenizer(folder / "tokenizer.json")
        pooling, normalize, max_len = _sentence_transformers_modules(folder)
        return cls(config, weights, tokenizer, pooling=pooling, normalize=normalize, max_seq_length=max_len)

    def static_embedding(self, token_id: int) -> F32:
        """Row ``token_id`` of the input embedding table: the token's vector before any context."""
        row: F32 = np.array(self._word[token_id], np.float32)
        return row

    @property
    def projection_parameters(self) -> int:
        """The weights of the layers' matrix products: one token costs twice as many FLOPs there."""
        return sum(p.shape[0] * p.shape[1] for layer in self._layers for p in (layer.qkv, layer.o, layer.i, layer.f))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"BertEncoder(layers={c.layers}, hidden={c.hidden}, heads={c.heads}, vocab={c.vocab}, "
            f"pooling={self.pooling!r}, normalize={self.normalize}, max_seq_length={self.max_seq_length}, "
            f"dtype={self.dtype!r})"
        )

    # -- running -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike | None = None,
        token_type_ids: npt.ArrayLike | None = None,
        *,
        output_attentions: bool = False,
    ) -> Any:
        """The last layer's contextual embeddings, ``(batch, seq, hidden)`` float32, of right- or
        left-padded token ids ``(batch, seq)`` (``attention_mask`` nonzero = a real token).
        Positions count from 0 at the first column, as in BERT.

        With ``output_attentions=True``, returns ``(embeddings, weights)``: ``weights[n]`` is layer
        ``n``'s attention weights, ``(batch, heads, seq, seq)`` (padded keys get 0)."""
        return self._forward(input_ids, attention_mask, token_type_ids, output_attentions, _Buffers())

    def _forward(
        self,
        input_ids: npt.ArrayLike,
        attention_mask: npt.ArrayLike | None,
        token_type_ids: npt.ArrayLike | None,
        output_attentions: bool,
        buffers: _Buffers,
    ) -> Any:
        """:meth:`forward`, its big arrays taken from ``buffers`` (the result is one of them)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected a 2-d array (batch, seq), got shape {ids.shape}")
        b, s = ids.shape
        if s > self.config.positions:
            raise ValueError(f"input_ids: {s} tokens, more than max_position_embeddings = {self.config.positions}")
        mask = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask) != 0
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected shape {ids.shape} (that of input_ids), got {mask.shape}")
        types = np.zeros((b, s), np.int64) if token_type_ids is None else np.asarray(token_type_ids)
        if types.shape != ids.shape:
            raise ValueError(f"token_type_ids: expected shape {ids.shape} (that of input_ids), got {types.shape}")
        c = self.config
        # The order of transformers' BertEmbeddings: (word + type) + position, then the norm.
        x = attnkit.embedding(ids, self._word) + attnkit.embedding(types, self._type)
        x += self._position[:s]
        d = c.hidden // c.heads
        weights = []

        def attend(qkv: F32, out: F32) -> None:
            q = qkv.reshape(b, s, 3, c.heads, d)
            result = attnkit.scaled_dot_product_attention(
                q[:, :, 0], q[:, :, 1], q[:, :, 2], key_mask=mask, layout="bshd",
                return_weights=output_attentions, out=out.reshape(b, s, c.heads, d),
            )
            if output_attentions:
                weights.append(result[1])

        h = self._layers_on_rows(x.reshape(b * s, c.hidden), attend, buffers).reshape(b, s, c.hidden)
        if output_attentions:
            return h, weights
        return h

    def _packed(self, ids: npt.NDArray[np.int64], types: npt.NDArray[np.int64], lengths: Sequence[int],
                buffers: _Buffers) -> F32:
        """The last layer's embeddings ``(sum(lengths), hidden)`` of sentences packed end to end
        without padding (``ids`` and ``types`` 1-d, sentence ``n`` the next ``lengths[n] >= 1``
        tokens, at least one sentence), as :meth:`forward` gives each one's real tokens. Every
        matrix product and norm then runs on real tokens alone; attention runs once per run of
        sentences of one length, which lie end to end as a ``(sentences, length, ...)`` array and
        need no mask."""
        c = self.config
        runs = []  # (first row, sentences, length) of each run of equal lengths
        row = 0
        for length, run in itertools.groupby(lengths):
            count = len(list(run))
            runs.append((row, count, length))
            row += count * length
        positions = np.concatenate([np.tile(np.arange(length), count) for _, count, length in runs])
        x = attnkit.embedding(ids, self._word) + attnkit.embedding(types, self._type)
        x += self._position[positions]
        d = c.hidden // c.heads

        def attend(qkv: F32, out: F32) -> None:
            for r0, count, length in runs:
                rows = slice(r0, r0 + count * length)
                q = qkv[rows].reshape(count, length, 3, c.heads, d)
                attnkit.scaled_dot_product_attention(
                    q[:, :, 0], q[:, :, 1], q[:, :, 2], layout="bshd",
                    out=out[rows].reshape(count, length, c.heads, d),
                )

        return self._layers_on_rows(x, attend, buffers)

    def _layers_on_rows(self, x: F32, attend: Callable[[F32, F32], None], buffers: _Buffers) -> F32:
        """The embeddings' norm and every layer on token rows ``x`` ``(rows, hidden)``: each
        matrix product one GEMM over all rows; ``attend(qkv, out)`` writes the attention of the
        ``(rows, 3 * hidden)`` projections into ``out`` ``(rows, hidden)``, heads side by side.
        The result is one of ``buffers``'."""
        c = self.config
        rows = x.shape[0]
        # Each layer's products and norms write into the same few buffers, which the batches of
        # one encode call share: fresh arrays would cost their memory's page faults each time.
        # The hidden state alternates between two (a norm's output cannot be its own residual
        # input).
        h, h_next, t, summed, a_out = (
            buffers.take(name, rows, c.hidden) for name in ("h", "h_next", "t", "summed", "attention")
        )
        qkv_out = buffers.take("qkv", rows, 3 * c.hidden)
        mid_out = buffers.take("mid", rows, c.intermediate)
        attnkit.layer_norm(x, c.hidden, *self._ln0, c.eps, out=h)
        for layer in self._layers:
            attend(layer.qkv(h, out=qkv_out), a_out)
            # Each residual add fused with the norm after it (the sum, unused, into `summed`).
            layer.o(a_out, out=t)
            attnkit.layer_norm(t, c.hidden, *layer.ln1, c.eps, residual=h, out=(h_next, summed))
            h, h_next = h_next, h
            mid = layer.i(h, gelu=c.gelu, out=mid_out)
            layer.f(mid, out=t)
            attnkit.layer_norm(t, c.hidden, *layer.ln2, c.eps, residual=h, out=(h_next, summed))
            h, h_next = h_next, h
        return h

    def pool(self, hidden: F32, attention_mask: npt.ArrayLike) -> F32:
        """Sentence vectors ``(batch, hidden)`` from contextual embeddings, by the checkpoint's
        pooling (as sentence-transformers computes it)."""
        mask = (np.asarray(attention_mask) != 0)[..., None]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return np.asarray(np.where(mask, hidden, np.float32(-1e9)).max(axis=1), np.float32)
        counts = np.maximum(mask.sum(axis=1, dtype=np.float32), np.float32(1e-9))
        return np.asarray((hidden * mask).sum(axis=1) / counts, np.float32)

    def _pool_packed(self, hidden: F32, lengths: npt.NDArray[np.int64]) -> F32:
        """:meth:`pool` of sentences packed end to end (``hidden`` ``(sum(lengths), hidden)``,
        every length >= 1): the same sums, in the same order."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if self.pooling == "cls":
            return np.asarray(hidden[starts], np.float32)
        if self.pooling == "max":
            return np.asarray(np.maximum.reduceat(hidden, starts, axis=0), np.float32)
        return np.asarray(np.add.reduceat(hidden, starts, axis=0) / lengths[:, None].astype(np.float32), np.float32)

    def encode(
        self,
        sentences: str | Iterable[str],
        *,
        batch_size: int = 32,
        normalize: bool | None = None,
    ) -> F32:
        """Sentence embeddings, as sentence-transformers' ``encode`` computes them.

        Sentences are sorted by their number of tokens and run ``batch_size`` at a time; the
        vectors come back in the input order. A batch runs without padding: its sentences' tokens
        end to end as the rows of every matrix product and norm, attention once per run of
        sentences of one length (sentence-transformers pads each batch to its longest: with its
        sort by characters, 11% of the rows of 1000 sentences of 3 to 40 words are padding; with
        a sort by tokens, still 2.4%). So a sentence's vector does not depend on its batch, to the
        bit (every step computes each sentence apart; in :meth:`forward`, attention over a
        sentence with padding beside it may round differently in the last bits).

        Args:
            sentences: a string or an iterable of strings.
            batch_size: sentences per forward pass (>= 1).
            normalize: scale each vector to unit length; None follows the checkpoint (its
                ``Normalize`` module).

        Returns:
            ``(n, hidden)`` float32 (``(hidden,)`` for a single string).
        """
        single = isinstance(sentences, str)
        texts: Sequence[str] = [sentences] if single else list(sentences)  # type: ignore[list-item]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("sentences: expected a string or an iterable of strings")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        normalize = self.normalize if normalize is None else bool(normalize)
        out = np.empty((len(texts), self.config.hidden), np.float32)
        buffers = _Buffers()  # sized by the first (longest) batch; this call's alone
        for first in range(0, len(texts), _SORT_CHUNK):
            chunk = range(first, min(first + _SORT_CHUNK, len(texts)))
            # Padded to the chunk's longest; each batch is cut to its own longest below.
            encs = self.tokenizer.encode_batch([texts[i] for i in chunk])
            ids = np.array([e.ids for e in encs], np.int64)
            mask = np.array([e.attention_mask for e in encs], np.int64)
            types = np.array([e.type_ids for e in encs], np.int64)
            lengths = mask.sum(axis=1)
            order = np.argsort(-lengths, kind="stable")  # most tokens first
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                lens = lengths[idx]
                width = max(int(lens.max()), 1)
                m = mask[idx, :width]
                real = np.arange(width) < lens[:, None]
                if lens.min() >= 1 and np.array_equal(m != 0, real):
                    # Each sentence's tokens first, then padding (as the tokenizer pads): the
                    # batch packed without its padding (`_packed`).
                    hidden = self._packed(ids[idx, :width][real], types[idx, :width][real], lens.tolist(), buffers)
                    out[first + idx] = self._pool_packed(hidden, lens)
                else:
                    hidden = self._forward(ids[idx, :width], m, types[idx, :width], False, buffers)
                    out[first + idx] = self.pool(hidden, m)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out[0] if single else out


def _sentence_transformers_modules(folder: Path) -> tuple[str, bool, int | None]:
    """Pooling, normalization and max_seq_length from sentence-transformers' configs: mean pooling,
    no normalization and the config's length when there are none."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return "mean", False, None
    modules = read_json(modules_path)
    if not isinstance(modules, list):
        raise LoadError(f"{modules_path}: expected a list of modules")
    pooling, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith(".Pooling"):
            pool_path = folder / str(module.get("path", "")) / "config.json"
            pool_config = read_json(pool_path)
            chosen = [name for key, name in _POOLING.items() if pool_config.get(key)]
            others = [k for k, v in pool_config.items() if k.startswith("pooling_mode") and v and k not in _POOLING]
            if len(chosen) != 1 or others:
                raise LoadError(
                    f"{pool_path}: expected exactly one of {', '.join(_POOLING)} set, got {chosen + others or 'none'}"
                )
            pooling = chosen[0]
        elif kind.endswith(".Normalize"):
            normalize = True
        elif not kind.endswith(".Transformer"):
            raise LoadError(f"{modules_path}: module type {kind!r} is not supported (Transformer, Pooling, Normalize)")
    max_len = None
    st_path = folder / "sentence_bert_config.json"
    if st_path.is_file():
        max_len = setting(read_json(st_path), "max_seq_length", st_path, int, 0) or None
    return pooling, normalize, max_len
