"""Embedding a corpus too big for one machine with Ray Data: a callable class that loads the
encoder once per worker, for ``Dataset.map_batches``.

    import ray
    from attnkit.models import Embedder

    ds = ray.data.read_text("corpus/")                       # a "text" column
    ds = ds.map_batches(Embedder, fn_constructor_args=("path/to/all-MiniLM-L6-v2",),
                        batch_size=1024, batch_format="numpy", num_cpus=2, concurrency=8)
    ds.write_parquet("embeddings/")                          # "text" and "embedding" columns

Threads: Ray starts each worker process with ``OMP_NUM_THREADS`` set to its ``num_cpus``; NumPy's
BLAS reads it when it loads, and ``Embedder`` sets attnkit's pool to the same share (or to
``threads``), so the workers of a node never run more threads than it has cores.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

import attnkit


class Embedder:
    """Sentence embeddings of a column of text, for ``ray.data.Dataset.map_batches`` (or any
    batch of ``{column: array of strings}``).

    Args:
        path: the encoder's folder (:func:`attnkit.models.load`).
        column: the text column (``"text"``, what ``ray.data.read_text`` makes).
        output: the column the vectors go to.
        batch_size: sentences per forward pass.
        threads: attnkit's threads in this worker; None: ``OMP_NUM_THREADS`` (Ray sets it to the
            worker's ``num_cpus``), else 1.
        dtype: the matrix products' dtype (:func:`attnkit.models.load`'s).
    """

    def __init__(self, path: str, *, column: str = "text", output: str = "embedding", batch_size: int = 32,
                 threads: int | None = None, dtype: str = "float32") -> None:
        from attnkit.models import BertEncoder, load

        if threads is None:
            share = os.environ.get("OMP_NUM_THREADS", "1")
            threads = int(share) if share.isdigit() and int(share) > 0 else 1
        attnkit.set_num_threads(threads)
        self.threads = threads
        encoder = load(path, dtype=dtype)
        if not isinstance(encoder, BertEncoder):
            raise ValueError(f"path: {path} holds a {type(encoder).__name__}, not an encoder (BERT family)")
        self.encoder = encoder
        self.column, self.output, self.batch_size = column, output, batch_size

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        if self.column not in batch:
            raise ValueError(f"batch: no column {self.column!r} (columns: {', '.join(batch)})")
        texts = [str(t) for t in batch[self.column]]
        vectors = self.encoder.encode(texts, batch_size=self.batch_size)
        return {**batch, self.output: np.asarray(vectors)}
