"""A preallocated key/value cache for decoding: new tokens are written in place, and attention
reads the cache where it lies (never a copy of the history)."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import (
    _as_array,
    allocating,
    choice,
    counts,
    flag,
    float_array,
    float_dtype,
    int_array,
    integer,
    is_half,
)
from attnkit.attention import merge_attention, scaled_dot_product_attention

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of ``batch`` sequences, ``(batch, num_kv_heads, capacity, dim)`` each.

    Each sequence has its own length (``lengths``): :meth:`append` writes new tokens after it, in
    place, and :meth:`attend` runs attention of new queries over each sequence's keys, with query
    ``i`` of a sequence of length ``n`` (``L`` queries) at position ``n - L + i``: causal masks,
    windows and ALiBi are aligned per sequence. Appending costs the new tokens, never a copy of the
    history; attention reads the cache in place.

    Args:
        batch: sequences (beams, requests) held side by side.
        num_kv_heads: key/value heads (the query may have a multiple of them: grouped-query
            attention).
        head_dim: the size of a key.
        capacity: positions reserved per sequence.
        value_dim: the size of a value (``head_dim`` by default).
        dtype: the storage: float32, float64, float16 or ``ml_dtypes.bfloat16``. A 16-bit cache
            takes float32 keys and values (rounded once, to nearest even, as they are stored) and
            float32 or 16-bit queries.
        growable: whether an append past ``capacity`` doubles it (copying the cache once) instead of
            raising.
        window: makes the cache a rotating buffer of bounded size for sliding-window attention
            (Mistral, Gemma-2's local layers): each query attends to its own position and the
            ``window`` before it, and :meth:`attend` gives the bits of a full cache attended with
            ``window=(window, None)``. ``capacity`` is then the most new positions one append
            adds (and one attend call queries, and :meth:`crop` rolls back).
        sink_tokens: with ``window``, the first ``sink_tokens`` positions are kept besides it and
            every query attends to them too (StreamingLLM's attention sinks; the keys are stored as
            given, so positions, RoPE included, are the caller's). Computed as the window's
            result merged with the sink tokens' by log-sum-exp; ALiBi is not taken with them.

    Storage: the values as ``(batch, num_kv_heads, positions, value_dim)``; the keys transposed in
    strips of 16 positions, ``(batch, num_kv_heads, positions / 16, head_dim, 16)``, the form in
    which attention packs them for its matrix products. So attention never transposes the cache,
    and one query at a time computes each score in the order a long query does: decoding token by
    token gives the bits of one causal call over the whole sequence, for every dtype (bfloat16
    queries over a bfloat16 cache take the ``vdpbf16ps`` pairs of long calls at every length,
    which costs their decode steps a packing of the keys and values, a block at a time, on each
    call).

    Memory: ``batch * num_kv_heads * positions * (head_dim + value_dim)`` elements, allocated at
    once, ``positions`` being ``capacity`` rounded up to a multiple of 16; with ``window``, twice
    ``window + 2 * capacity`` rounded up to a multiple of 512 (plus up to 511) positions instead,
    whatever the length: the buffer is mirrored, so that every run of keys is contiguous. An
    :meth:`attend` call of at most 16 queries allocates its output, scratch for one key block and,
    for each 512 keys, one partial result per query row (``value_dim + 2`` numbers, merged at the
    end). Longer calls copy the keys they read, one key/value head at a time per thread, as a long
    call does.

    Example:
        >>> import numpy as np, attnkit
        >>> cache = attnkit.KVCache(1, 2, 8, capacity=16)
        >>> rng = np.random.default_rng(0)
        >>> k, v = (rng.standard_normal((1, 2, 5, 8), dtype=np.float32) for _ in range(2))
        >>> cache.append(k, v)                      # a prompt of five tokens
        >>> q = rng.standard_normal((1, 4, 5, 8), dtype=np.float32)
        >>> cache.attend(q).shape                    # four query heads share two
        (1, 4, 5, 8)
        >>> cache.lengths
        array([5])
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        capacity: int,
        value_dim: int | None = None,
        dtype: Any = np.float32,
        growable: bool = False,
        window: int | None = None,
        sink_tokens: int = 0,
    ) -> None:
        self._batch = integer(batch, "batch", minimum=1)
        self._heads = integer(num_kv_heads, "num_kv_heads", minimum=1)
        self._dim = integer(head_dim, "head_dim", minimum=1)
        self._vdim = self._dim if value_dim is None else integer(value_dim, "value_dim", minimum=1)
        capacity = integer(capacity, "capacity", minimum=0)
        self._dtype = float_dtype(dtype)
        self._growable = flag(growable, "growable")
        self._window: int | None = None
        self._ring = 0  # rows of the rotating buffer (mirrored: twice as many are stored)
        self._capacity = capacity
        if window is not None:
            self._window = integer(window, "window", minimum=0)
            if self._growable:
                raise ValueError("window: a rotating cache has a fixed size; growable=True does not apply")
            if capacity < 1:
                raise ValueError("capacity: a rotating cache needs capacity >= 1 (the most new positions an append adds)")
            self._ring = _ring_rows(self._window, capacity)
        self._sink_tokens = integer(sink_tokens, "sink_tokens", minimum=0)
        if self._sink_tokens and not self._ring:
            raise ValueError("sink_tokens: kept besides a window; pass window= as well (a full cache keeps every token)")
        self._k, self._v = self._buffers(2 * self._ring if self._ring else capacity)
        self._sk, self._sv = self._buffers(self._sink_tokens, strips=False)
        self._set_lengths(np.zeros(self._batch, np.int64))

    def _set_lengths(self, lengths: npt.NDArray[np.int64]) -> None:
        self._lengths = np.array(lengths, np.int64)  # the cache's own (a caller's array may be passed)
        self._uniform = bool((lengths == lengths[0]).all())  # every sequence alike

    def _buffers(self, capacity: int, strips: bool = True) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """Keys (in strips of STRIP positions, or rows) and values (rows) for ``capacity`` positions
        (rounded up to a multiple of STRIP)."""
        n = _strips(capacity) * STRIP if strips else capacity
        what = (f"KVCache storage ({self._batch} x {self._heads} heads x {n} positions x "
                f"({self._dim} + {self._vdim}) {self._dtype})")
        b, h = self._batch, self._heads
        with allocating(what):
            k = np.zeros((b, h, n // STRIP, self._dim, STRIP) if strips else (b, h, n, self._dim), self._dtype)
            return k, np.zeros((b, h, n, self._vdim), self._dtype)

    def _store_keys(self, b: int | None, positions: npt.NDArray[np.int64], k: npt.NDArray[Any]) -> None:
        """Writes keys ``k`` ``(num_kv_heads, n, head_dim)`` of sequence ``b`` at its ``positions``
        ``(n,)``; ``b`` None: ``k`` ``(batch, ...)``, every sequence."""
        strip, lane = positions // STRIP, positions % STRIP
        if b is None:  # (advanced indices apart: their axis comes first)
            self._k[:, :, strip, :, lane] = k.transpose(2, 0, 1, 3)
        else:
            self._k[b][:, strip, :, lane] = k.transpose(1, 0, 2)

    def _write_all(self, start: int, k: npt.NDArray[Any], v: npt.NDArray[Any]) -> None:
        """Writes keys ``k`` and values ``v`` ``(batch, heads, n, dim)`` at positions ``start..start
        + n`` of every sequence."""
        n = k.shape[2]
        if n == 1:  # one token (a decode step): basic indexing, the quickest write
            self._k[:, :, start // STRIP, :, start % STRIP] = k[:, :, 0]
        else:
            self._store_keys(None, np.arange(start, start + n), k)
        self._v[:, :, start:start + n] = v

    def _write(self, k: npt.NDArray[Any], v: npt.NDArray[Any], added: npt.NDArray[np.int64] | None = None) -> None:
        """Writes new keys ``k`` and values ``v`` ``(batch, heads, n, dim)`` after each sequence's
        length: all ``n`` of them, or the first ``added[b]`` of sequence ``b``. (The lengths are
        the caller's to update.)"""
        n = k.shape[2]
        if added is None and self._uniform:  # every sequence alike: one assignment
            self._write_all(int(self._lengths[0]), k, v)
        elif added is None and n == 1:  # a ragged batch's decode step: one indexed assignment
            seqs, at = np.arange(self._batch), self._lengths
            # Advanced indices apart (axes 0, 2 and 4) put their axis first: (batch, heads, dim).
            self._k[seqs, :, at // STRIP, :, at % STRIP] = k[:, :, 0]
            self._v[seqs, :, at] = v[:, :, 0]
        else:
            counts = np.full(self._batch, n) if added is None else added
            for b in np.flatnonzero(counts).tolist():
                start, count = int(self._lengths[b]), int(counts[b])
                self._store_keys(b, np.arange(start, start + count), k[b, :, :count])
                self._v[b, :, start:start + count] = v[b, :, :count]

    def _load_keys(self, b: int, positions: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """Sequence ``b``'s keys at ``positions`` ``(n,)``, as ``(num_kv_heads, n, head_dim)``."""
        keys: npt.NDArray[Any] = self._k[b][:, positions // STRIP, :, positions % STRIP]
        return keys.transpose(1, 0, 2)

    def _key_rows(self, positions: int) -> npt.NDArray[Any]:
        """The first ``positions`` keys of every sequence as rows, ``(batch, heads, positions,
        head_dim)`` (a copy)."""
        k = self._k[:, :, :_strips(positions)]
        return k.transpose(0, 1, 2, 4, 3).reshape(k.shape[:2] + (-1, self._dim))[:, :, :positions]

    # -- what it holds ------------------------------------------------------------------------

    @property
    def lengths(self) -> npt.NDArray[np.int64]:
        """``(batch,)`` int64: each sequence's length (a copy)."""
        return self._lengths.copy()

    @property
    def capacity(self) -> int:
        """Positions reserved per sequence; for a rotating cache (``window=``), the most new
        positions one append may add."""
        return self._capacity

    @property
    def window(self) -> int | None:
        """For a rotating cache, the keys a query attends to before its own position."""
        return self._window

    @property
    def dtype(self) -> np.dtype[Any]:
        """The storage dtype."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, num_kv_heads, positions, head_dim)``: the positions stored (``capacity``
        rounded up to a multiple of 16; a rotating cache's mirrored buffer)."""
        return self._batch, self._heads, int(self._v.shape[2]), self._dim

    def keys(self) -> npt.NDArray[Any]:
        """A copy of the keys, ``(batch, num_kv_heads, max(lengths), head_dim)`` (they are stored
        in strips); a sequence's positions past its length hold nothing meaningful. A rotating
        cache gives each sequence's last ``min(max(lengths), window)`` positions, right-aligned
        (zeros before a short sequence's first)."""
        return self._view(keys=True)

    def values(self) -> npt.NDArray[Any]:
        """The values, as :meth:`keys` gives the keys, but a read-only view where the cache is
        not rotating."""
        return self._view(keys=False)

    def _view(self, keys: bool) -> npt.NDArray[Any]:
        if not self._ring:
            n = int(self._lengths.max())
            if keys:
                return self._key_rows(n)
            view = self._v[:, :, :n]
            view.flags.writeable = False
            return view
        kept = min(int(self._lengths.max()), self._window or 0)
        dim = self._dim if keys else self._vdim
        out = np.zeros((self._batch, self._heads, kept, dim), self._dtype)
        for b, n in enumerate(self._lengths.tolist()):
            m = min(n, kept)
            rows = np.arange(n - m, n) % self._ring
            if keys:
                out[b, :, kept - m:] = self._load_keys(b, rows)
            else:
                out[b, :, kept - m:] = self._v[b][:, rows]
        return out

    def __repr__(self) -> str:
        lengths = np.array2string(self._lengths, threshold=8, separator=", ")
        vdim = "" if self._vdim == self._dim else f", value_dim={self._vdim}"
        grow = ", growable=True" if self._growable else (f", window={self._window}" if self._ring else "")
        grow += f", sink_tokens={self._sink_tokens}" if self._sink_tokens else ""
        return (f"KVCache(batch={self._batch}, num_kv_heads={self._heads}, head_dim={self._dim}{vdim}, "
                f"capacity={self.capacity}, dtype={self._dtype.name}{grow}, lengths={lengths})")

    # -- pickling: the filled positions only --------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        used = self._ring or int(self._lengths.max())  # a rotating cache: one copy of its rows
        return {"batch": self._batch, "heads": self._heads, "dim": self._dim, "vdim": self._vdim,
                "dtype": self._dtype, "growable": self._growable, "capacity": self.capacity,
                "window": self._window, "lengths": self._lengths.copy(), "k": self._key_rows(used),
                "v": self._v[:, :, :used].copy(), "sk": self._sk.copy(), "sv": self._sv.copy()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._batch, self._heads, self._dim, self._vdim = state["batch"], state["heads"], state["dim"], state["vdim"]
        self._dtype, self._growable = np.dtype(state["dtype"]), state["growable"]
        self._window, self._capacity = state.get("window"), state["capacity"]
        self._ring = 0 if self._window is None else _ring_rows(self._window, self._capacity)
        self._k, self._v = self._buffers(2 * self._ring if self._ring else state["capacity"])
        used = state["k"].shape[2]
        self._sk, self._sv = state["sk"], state["sv"]
        self._sink_tokens = self._sk.shape[2]
        for copy in range(2 if self._ring else 1):  # a rotating cache's mirror
            self._store_keys(None, np.arange(copy * used, (copy + 1) * used), state["k"])
            self._v[:, :, copy * used:(copy + 1) * used] = state["v"]
        self._set_lengths(np.array(state["lengths"], np.int64))

    # -- writing ------------------------------------------------------------------------------

    def append(
        self,
        key: npt.ArrayLike,
        value: npt.ArrayLike,
        *,
        lengths: npt.ArrayLike | None = None,
        layout: Literal["bhsd", "bshd"] = "bhsd",
    ) -> None:
        """Writes new tokens after each sequence's current length, in place.

        Args:
            key: ``(batch, num_kv_heads, n, head_dim)`` (``layout="bshd"``: ``(batch, n,
                num_kv_heads, head_dim)``), the cache's dtype (or float32 for a 16-bit cache).
            value: likewise with ``value_dim``.
            lengths: ``(batch,)`` integers in ``0..n``: how many of the ``n`` new positions are
                real for each sequence (the first ones; ragged appends). All ``n`` by default.
            layout: ``"bhsd"`` or ``"bshd"``.

        Raises:
            TypeError: another dtype; ValueError: shapes that do not fit the cache, lengths out of
            range, or (not growable) positions past ``capacity``. The cache is unchanged after any
            error.
        """
        if (  # the common step, checked first (a decode loop calls this per layer and token)
            lengths is None and type(key) is np.ndarray and type(value) is np.ndarray
            and key.dtype == self._dtype and value.dtype == self._dtype and key.ndim == value.ndim == 4
            and (layout == "bhsd" or layout == "bshd") and not self._ring
        ):
            k, v = (key.swapaxes(1, 2), value.swapaxes(1, 2)) if layout == "bshd" else (key, value)
            n = k.shape[2]
            if (k.shape[:2] == v.shape[:2] == (self._batch, self._heads) and v.shape[2] == n
                    and k.shape[3] == self._dim and v.shape[3] == self._vdim
                    and int(self._lengths.max()) + n <= self.capacity):
                self._write(k, v)
                self._lengths = self._lengths + n  # a new array: never one a caller holds
                return
        layout = choice(layout, "layout", ("bhsd", "bshd"))  # type: ignore[assignment]
        k = self._new(key, "key", self._dim, layout)
        v = self._new(value, "value", self._vdim, layout)
        n = k.shape[2]
        if v.shape[2] != n:
            raise ValueError(f"value: {v.shape[2]} new positions, the key has {n}")
        if lengths is None:
            added = np.full(self._batch, n, np.int64)
        else:
            added = self._per_sequence(lengths, "lengths", n, f"n = {n}, the new positions")
        end = self._lengths + added
        if self._ring:
            if n > self._capacity:
                raise ValueError(f"key: {n} new positions, more than the {self._capacity} (capacity) a rotating cache "
                                 "takes in one append")
            for b in np.flatnonzero(added).tolist():
                rows = np.arange(int(self._lengths[b]), int(end[b])) % self._ring
                count = int(added[b])
                for mirror in (rows, rows + self._ring):  # (self._v[b, :, rows] would put rows first)
                    self._store_keys(b, mirror, k[b, :, :count])
                    self._v[b][:, mirror] = v[b, :, :count]
                first, sinks = int(self._lengths[b]), min(int(end[b]), self._sink_tokens)
                if first < sinks:  # the first tokens are kept besides the window, too
                    self._sk[b, :, first:sinks] = k[b, :, :sinks - first]
                    self._sv[b, :, first:sinks] = v[b, :, :sinks - first]
            self._set_lengths(end)
            return
        if end.size and int(end.max()) > self.capacity:
            if not self._growable:
                b = int(np.argmax(end))
                raise ValueError(
                    f"key: sequence {b} would reach {int(end[b])} positions, past the cache's capacity "
                    f"{self.capacity} (make the cache larger, or growable=True)"
                )
            self._grow(int(end.max()))
        self._write(k, v, None if (added == n).all() else added)
        self._set_lengths(end)

    def _new(self, x: npt.ArrayLike, name: str, dim: int, layout: str) -> npt.NDArray[Any]:
        """New keys or values as ``(batch, heads, n, dim)`` of a dtype the cache can store."""
        arr = float_array(x, name, in_place=True)
        if arr.dtype != self._dtype and not (is_half(self._dtype) and arr.dtype == np.float32):
            expected = f"{self._dtype}" + (" or float32" if is_half(self._dtype) else "")
            raise TypeError(f"{name}: dtype {arr.dtype} for a {self._dtype} cache (expected {expected})")
        if arr.ndim != 4:
            raise ValueError(f"{name}: expected a 4-d array ({layout}), got shape {arr.shape}")
        if layout == "bshd":
            arr = arr.swapaxes(1, 2)
        if arr.shape[0] != self._batch or arr.shape[1] != self._heads or arr.shape[3] != dim:
            raise ValueError(
                f"{name}: {arr.shape[0]} sequences x {arr.shape[1]} heads x size {arr.shape[3]}, the cache holds "
                f"{self._batch} x {self._heads} x {dim}"
            )
        return arr

    def _per_sequence(self, x: npt.ArrayLike, name: str, most: int, what: str) -> npt.NDArray[np.int64]:
        """One count per sequence (an int: the same for all), each in ``0..most``."""
        n = _as_array(x, name)
        return counts(np.full(self._batch, n) if n.shape == () else n, name, (self._batch,), most, what)

    def _queries(self, length: int, query_lengths: npt.ArrayLike | None) -> npt.NDArray[np.int64]:
        """Each sequence's real queries of ``length``."""
        if query_lengths is None:
            return np.full(self._batch, length, np.int64)
        return self._per_sequence(query_lengths, "query_lengths", length, f"L = {length}, the queries")

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        k, v = self._buffers(capacity)
        used = int(self._lengths.max())
        k[:, :, :_strips(used)] = self._k[:, :, :_strips(used)]
        v[:, :, :used] = self._v[:, :, :used]
        self._k, self._v, self._capacity = k, v, capacity

    def reorder(self, indices: npt.ArrayLike) -> None:
        """Sequence ``b`` becomes what sequence ``indices[b]`` was (beam search).

        Raises:
            IndexError: an index outside ``0..batch-1``; ValueError: not one index per sequence.
        """
        idx = int_array(_as_array(indices, "indices"), "indices")
        if idx.shape != (self._batch,):
            raise ValueError(f"indices: expected shape ({self._batch},) (one per sequence), got {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self._batch):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise IndexError(f"indices: {bad} is not a sequence of the cache (0..{self._batch - 1})")
        used = 2 * self._ring if self._ring else int(self._lengths.max())
        self._sk[...] = self._sk[idx]
        self._sv[...] = self._sv[idx]
        self._k[:, :, :_strips(used)] = self._k[idx, :, :_strips(used)]
        self._v[:, :, :used] = self._v[idx, :, :used]
        self._set_lengths(self._lengths[idx])

    def crop(self, lengths: npt.ArrayLike) -> None:
        """Shortens sequences to ``lengths`` (an int for all, or one per sequence), each at most
        its current length: rejected draft tokens of speculative decoding, say."""
        new = self._per_sequence(lengths, "lengths", int(self._lengths.max()), "at most the current lengths")
        longer = new > self._lengths
        if longer.any():
            b = int(np.argmax(longer))
            raise ValueError(f"lengths: {int(new[b])} for sequence {b}, longer than its {int(self._lengths[b])} positions")
        if self._ring and (self._lengths - new > self._capacity).any():
            b = int(np.argmax(self._lengths - new > self._capacity))
            raise ValueError(f"lengths: {int(new[b])} for sequence {b} rolls back {int(self._lengths[b] - new[b])} positions; "
                             f"a rotating cache keeps {self._capacity} (capacity) to roll back")
        self._set_lengths(new)

    # -- reading ------------------------------------------------------------------------------

    def attend(
        self,
        query: npt.ArrayLike,
        *,
        is_causal: bool = True,
        query_lengths: npt.ArrayLike | None = None,
        scale: float | None = None,
        window: tuple[int | None, int | None] | None = None,
        alibi_slopes: npt.ArrayLike | None = None,
        softcap: float | None = None,
        sinks: npt.ArrayLike | None = None,
        return_lse: bool = False,
        layout: Literal["bhsd", "bshd"] = "bhsd",
    ) -> Any:
        """Attention of new queries over each sequence's cached keys, read in place.

        The queries are the last positions of each sequence (append their keys and values
        first): query ``i`` of ``L`` sits at ``lengths[b] - L + i``, or at ``lengths[b] -
        query_lengths[b] + i`` when only the first ``query_lengths[b]`` are real.

        Args:
            query: ``(batch, Hq, L, head_dim)`` (``bshd``: ``(batch, L, Hq, head_dim)``), ``Hq`` a
                multiple of ``num_kv_heads``; the cache's dtype, or float32 over a 16-bit cache
                (computed in float32, output float32).
            is_causal: each query attends to the keys up to its own position (True by default, as
                in decoding); False: to all of its sequence's keys.
            query_lengths: ``(batch,)``: the real queries of each sequence (ragged chunks); the
                rows after them give zeros (lse ``-inf``).
            scale, window, alibi_slopes, softcap, sinks, return_lse, layout: as in
                :func:`attnkit.scaled_dot_product_attention`.

        Returns:
            ``out`` ``(batch, Hq, L, value_dim)`` (``bshd``: ``(batch, L, Hq, value_dim)``), or
            ``(out, lse)``.
        """
        if (  # the common step, checked first: the core re-validates and refuses what it cannot take
            type(query) is np.ndarray and query.ndim == 4 and query.dtype == self._dtype
            and (layout == "bhsd" or layout == "bshd")
            and query_lengths is None and window is None and alibi_slopes is None and softcap is None
            and sinks is None and type(is_causal) is bool and return_lse is False
            and query.shape[0] == self._batch and query.shape[3] == self._dim
            and query.shape[1 if layout == "bhsd" else 2] % self._heads == 0
            and (scale is None or (type(scale) is float and math.isfinite(scale))) and not self._ring
        ):
            n = _strips(int(self._lengths.max()))
            s = scale if scale is not None else 1.0 / math.sqrt(self._dim)
            q = query if layout == "bhsd" else query.swapaxes(1, 2)  # the core reads it through its strides
            try:
                out = _core.attention(
                    q, self._k[:, :, :n], self._v[:, :, :n * STRIP], "bhsd", s, None, is_causal, (None, None),
                    "bottom_right", None, None, None, None, False, False, self._lengths, key_strips=True,
                )[0]
            except (TypeError, ValueError):
                pass  # explained by the full path below
            else:
                return out if layout == "bhsd" else np.ascontiguousarray(out.swapaxes(1, 2))
        layout = choice(layout, "layout", ("bhsd", "bshd"))  # type: ignore[assignment]
        q = float_array(query, "query", in_place=True)
        if q.ndim != 4:
            raise ValueError(f"query: expected a 4-d array ({layout}), got shape {q.shape}")
        heads = q.shape[1] if layout == "bhsd" else q.shape[2]
        if q.shape[0] != self._batch or q.shape[3] != self._dim or heads % self._heads:
            raise ValueError(
                f"query: {q.shape[0]} sequences x {heads} heads x size {q.shape[3]} for a cache of "
                f"{self._batch} sequences x {self._heads} key/value heads x size {self._dim} (the query "
                "heads must be a multiple of the cache's)"
            )
        if q.dtype != self._dtype and not (is_half(self._dtype) and q.dtype == np.float32):
            raise TypeError(f"query: dtype {q.dtype} for a {self._dtype} cache (expected {self._dtype}"
                            + (" or float32)" if is_half(self._dtype) else ")"))
        if layout == "bshd":  # the cache is bhsd; the core reads the query through its strides
            q = q.swapaxes(1, 2)
        lengths, starts = self._lengths, None
        if self._ring:
            if self._sink_tokens and alibi_slopes is not None:
                raise ValueError("alibi_slopes: not taken with sink_tokens (the sink tokens' distances are not kept)")
            real = self._queries(q.shape[2], query_lengths)
            window, lengths, starts = self._ring_window(q.shape[2], real, window)
            n = _strips(int((starts + lengths).max()))  # the rows any run reaches: no empty chunks past them
        else:
            n = _strips(int(self._lengths.max()))
        k, v = self._k[:, :, :n], self._v[:, :, :n * STRIP]
        stand_in = np.broadcast_to(np.zeros((), self._dtype), v.shape[:3] + (self._dim,))  # the keys' shape
        # (`_key_strips` is private to the cache: no public overload takes it.)
        result = scaled_dot_product_attention(  # type: ignore[call-overload, misc]
            q, stand_in, v, _key_strips=k, is_causal=is_causal, scale=scale, enable_gqa=True, key_lengths=lengths, key_starts=starts,
            query_lengths=query_lengths, causal_alignment="bottom_right", window=window,
            alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, return_lse=return_lse or self._sink_tokens > 0,
        )
        if self._sink_tokens:
            assert isinstance(result, tuple) and window is not None
            result = self._with_sink_tokens(q, result, real, int(window[0] or 0), scale, softcap, return_lse)
        if layout == "bshd":
            if isinstance(result, tuple):
                return np.ascontiguousarray(result[0].swapaxes(1, 2)), result[1]
            return np.ascontiguousarray(result.swapaxes(1, 2))
        return result

    def _with_sink_tokens(self, q: npt.NDArray[Any], window_part: tuple[Any, ...], real: npt.NDArray[np.int64],
                          left: int, scale: float | None, softcap: float | None, return_lse: bool) -> Any:
        """The window's result merged (`merge_attention`) with attention over the sink tokens that
        lie before each query's window (those inside it are in the window's result already);
        ``real``: each sequence's real queries."""
        length = q.shape[2]
        position = self._lengths[:, None] - real[:, None] + np.arange(length)[None, :]  # (B, L)
        j = np.arange(self._sink_tokens)[None, None, :]
        allowed = (j < position[:, :, None] - left) & (np.arange(length)[None, :, None] < real[:, None, None])
        out_s, lse_s = scaled_dot_product_attention(
            q, self._sk, self._sv, allowed[:, None], scale=scale, enable_gqa=True, softcap=softcap, return_lse=True)
        out, lse = merge_attention([window_part[0], out_s], [window_part[1], lse_s])
        return (out, lse) if return_lse else out

    def _ring_window(
        self, length: int, real: npt.NDArray[np.int64], window: tuple[int | None, int | None] | None
    ) -> tuple[tuple[int | None, int | None], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """For a rotating cache: the window to apply, and each sequence's keys as a run of rows of
        the mirrored buffer, for ``length`` queries of which ``real`` are real per sequence. The
        run starts at a multiple of ``CHUNK`` positions at or before the
        first key any of its queries may see, so that key blocks and chunks fall where they fall
        in a full cache, and the bits are a full cache's."""
        w = self._window or 0
        if window is None:
            window = (w, None)
        if not isinstance(window, (tuple, list)) or len(window) != 2 or not (
                isinstance(window[0], int) and 0 <= window[0] <= w):
            raise ValueError(f"window: a rotating cache of window {w} takes (left, right) with 0 <= left <= {w}, "
                             f"got {window!r}")
        left: int = window[0]
        if length > self._capacity:
            raise ValueError(f"query: {length} queries, more than the {self._capacity} (capacity) a rotating cache "
                             "attends at once")
        first = np.maximum(self._lengths - real - left, 0)  # each sequence's first key in reach
        start = first // CHUNK * CHUNK
        return (left, window[1]), self._lengths - start, start % self._ring


# Keys per chunk of the kernels' merge (`merge.rs`): a rotating cache's runs of keys start at
# multiples of it.
CHUNK = 512
# Positions per strip of the stored keys (the kernels' `NR`).
STRIP = 16


def _strips(positions: int) -> int:
    """Strips holding ``positions`` positions."""
    return -(-positions // STRIP)


def _ring_rows(window: int, capacity: int) -> int:
    """Rows of a rotating cache's buffer: a multiple of CHUNK holding, besides the window, the
    CHUNK - 1 keys before it that a run may start with, an append's new positions and as many to
    roll back."""
    return -(-(window + 2 * capacity + CHUNK - 1) // CHUNK) * CHUNK
