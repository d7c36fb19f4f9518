"""Embedding lookup: token ids to static embeddings, and bag reductions over them."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from attnkit import _core
from attnkit._validate import choice, flag, float_array, int_array, integer, real

__all__ = ["embedding", "embedding_bag"]


def _table(weight: Any) -> npt.NDArray[np.floating[Any]]:
    w = float_array(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight: expected a 2-d array (num_embeddings, embedding_dim), got shape {w.shape}")
    return w


def embedding(ids: npt.ArrayLike, weight: npt.ArrayLike, *, scale: float | None = None) -> npt.NDArray[Any]:
    """Looks up the rows of an embedding table.

    Args:
        ids: token ids of any integer dtype (int8 to int64, uint8 to uint64) and any shape, 0-d and
            empty included.
        weight: ``(num_embeddings, embedding_dim)`` table, float32, float64, float16 or
            ``ml_dtypes.bfloat16``.
        scale: if given, every row is multiplied by it (in the table's dtype; for a 16-bit table
            in float32, each product rounded once), e.g. ``sqrt(embedding_dim)`` as in the original
            transformer.

    Returns:
        ``ids.shape + (embedding_dim,)`` array of the table's dtype. Without ``scale`` the rows are a
        bit-exact copy (NaN payloads and -0.0 kept).

    Raises:
        TypeError: ``ids`` not integer, ``weight`` not float32, float64, float16 or bfloat16,
            ``scale`` not a number.
        ValueError: ``weight`` not 2-d, ``scale`` not finite.
        IndexError: an id negative or >= ``num_embeddings`` (the first such id, by position).

    Example:
        >>> import numpy as np, attnkit
        >>> table = np.arange(6, dtype=np.float32).reshape(3, 2)
        >>> attnkit.embedding(np.array([[2, 0]]), table)
        array([[[4., 5.],
                [0., 1.]]], dtype=float32)
    """
    if scale is None and type(ids) is np.ndarray and type(weight) is np.ndarray:
        # Fast path for small calls: the core re-validates everything and refuses (TypeError or
        # ValueError) what it cannot read directly; the path below then converts or explains.
        try:
            return _core.embedding(ids, weight, None)
        except (TypeError, ValueError):
            pass
    ids_arr = int_array(ids, "ids")
    table = _table(weight)
    s = None if scale is None else real(scale, "scale")
    return _core.embedding(ids_arr, table, s)


def embedding_bag(
    ids: npt.ArrayLike,
    weight: npt.ArrayLike,
    offsets: npt.ArrayLike | None = None,
    *,
    mode: Literal["sum", "mean", "max"] = "mean",
    per_sample_weights: npt.ArrayLike | None = None,
    padding_idx: int | None = None,
    include_last_offset: bool = False,
) -> npt.NDArray[Any]:
    """Sums, averages or takes the maximum of bags of embedding rows, like
    ``torch.nn.functional.embedding_bag``.

    Args:
        ids: 2-d ``(bags, bag_size)`` ids (fixed-size bags; ``offsets`` must be None), or 1-d ids
            split into bags by ``offsets``. Any integer dtype.
        weight: ``(num_embeddings, embedding_dim)`` table, float32, float64, float16 or
            ``ml_dtypes.bfloat16``.
        offsets: 1-d integer start of each bag in 1-d ``ids``; ``offsets[0]`` must be 0 and they
            must not decrease. With ``include_last_offset`` the last entry ends the last bag (ids
            after it are ignored, as in PyTorch).
        mode: ``"sum"``, ``"mean"`` or ``"max"`` (element-wise; a NaN in the bag gives NaN).
        per_sample_weights: weights of ``ids``' shape and the table's dtype, multiplied into each
            row; ``mode="sum"`` only.
        padding_idx: entries equal to it are left out of their bag (and of the count for
            ``"mean"``); negative values count from the end of the table.
        include_last_offset: whether ``offsets`` has one extra entry, the end of the last bag.

    Returns:
        ``(bags, embedding_dim)`` array of the table's dtype. A bag with no entries left is zeros.
        Sums are accumulated in float64 in bag order and rounded once.

    Raises:
        TypeError: non-integer ``ids``/``offsets``, non-float table, ``per_sample_weights`` of
            another dtype than the table.
        ValueError: bad ranks, bad ``offsets``, unknown ``mode``, ``per_sample_weights`` with a
            mode other than ``"sum"`` or of the wrong shape, ``padding_idx`` out of range.
        IndexError: an id negative or >= ``num_embeddings``.

    Example:
        >>> import numpy as np, attnkit
        >>> table = np.arange(8, dtype=np.float32).reshape(4, 2)
        >>> attnkit.embedding_bag(np.array([0, 1, 3]), table, np.array([0, 2]), mode="sum")
        array([[2., 4.],
               [6., 7.]], dtype=float32)
    """
    mode = choice(mode, "mode", ("sum", "mean", "max"))  # type: ignore[assignment]
    include_last_offset = flag(include_last_offset, "include_last_offset")
    ids_arr = int_array(ids, "ids")
    ids_shape = ids_arr.shape
    table = _table(weight)
    if ids_arr.ndim == 2:
        if offsets is not None:
            raise ValueError("offsets: must be None when ids is 2-d (each row of ids is one bag)")
        n_bags, size = ids_arr.shape
        bounds = np.arange(n_bags + 1, dtype=np.int64) * size
    elif ids_arr.ndim == 1:
        if offsets is None:
            raise ValueError("offsets: required when ids is 1-d (the start of each bag)")
        bounds = _bounds(offsets, len(ids_arr), include_last_offset)
        ids_arr = ids_arr[: bounds[-1]]
    else:
        raise ValueError(f"ids: expected a 1-d or 2-d array, got shape {ids_arr.shape}")
    psw = None
    if per_sample_weights is not None:
        w = float_array(per_sample_weights, "per_sample_weights")
        if w.dtype != table.dtype:
            raise TypeError(f"per_sample_weights: expected dtype {table.dtype} (the table's), got {w.dtype}")
        if w.shape != ids_shape:
            raise ValueError(f"per_sample_weights: expected shape {ids_shape} (that of ids), got {w.shape}")
        psw = np.ascontiguousarray(w.reshape(-1)[: ids_arr.size], dtype=np.float64)
    pad = None
    if padding_idx is not None:
        rows = table.shape[0]
        pad = integer(padding_idx, "padding_idx")
        if not -rows <= pad < rows:
            raise ValueError(f"padding_idx: must be in [-{rows}, {rows}) for a table of {rows} rows, got {pad}")
        pad %= rows
    return _core.embedding_bag(ids_arr.reshape(-1), table, bounds, mode, psw, pad)


def _bounds(offsets: npt.ArrayLike, n_ids: int, include_last_offset: bool) -> npt.NDArray[np.int64]:
    off = int_array(offsets, "offsets")
    if off.ndim != 1:
        raise ValueError(f"offsets: expected a 1-d array, got shape {off.shape}")
    if include_last_offset and off.size == 0:
        raise ValueError("offsets: with include_last_offset it needs at least one entry")
    if off.size and int(off[0]) != 0:
        raise ValueError(f"offsets: offsets[0] must be 0 (the first bag starts at the first id), got {int(off[0])}")
    if off.size and int(off.max()) > n_ids:
        raise ValueError(f"offsets: entries must be <= len(ids) = {n_ids}, got {int(off.max())}")
    if np.any(np.diff(off.astype(np.int64)) < 0):
        raise ValueError("offsets: must not decrease")
    bounds = off.astype(np.int64)
    if not include_last_offset:
        bounds = np.append(bounds, np.int64(n_ids))
    return bounds
