"""The size of attnkit's thread pool.

attnkit runs its kernels on one pool of its own threads, never on the calling Python thread's
behalf only: heavy calls release the GIL, so several Python threads may call attnkit at once.
Results are bitwise identical for any number of threads.
"""

from __future__ import annotations

import os

from attnkit import _core
from attnkit._validate import integer

__all__ = ["get_num_threads", "set_num_threads"]

ENV_VAR = "ATTNKIT_NUM_THREADS"


def set_num_threads(n: int) -> None:
    """Sets the number of threads attnkit's kernels use.

    Args:
        n: a positive number of threads. 1 runs every kernel on the calling thread.

    Raises:
        TypeError: ``n`` not an int.
        ValueError: ``n`` < 1.

    Example:
        >>> import attnkit
        >>> attnkit.set_num_threads(2); attnkit.get_num_threads()
        2
    """
    _core.set_num_threads(integer(n, "n", minimum=1))


def get_num_threads() -> int:
    """The number of threads attnkit's kernels use: the last :func:`set_num_threads`, else
    ``ATTNKIT_NUM_THREADS`` as read at import, else the number of CPUs this process may use.

    Example:
        >>> import attnkit
        >>> attnkit.get_num_threads() >= 1
        True
    """
    return int(_core.get_num_threads())


def _configure_from_env() -> None:
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV_VAR}: expected a positive integer number of threads, got {raw!r}")
    _core.set_num_threads(n)
