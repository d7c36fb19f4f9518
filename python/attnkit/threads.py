"""The size of attnkit's thread pool.

attnkit runs its kernels on one pool of its own threads: heavy calls release the GIL, so several
Python threads may call attnkit at once. Results are bitwise identical for any number of threads.

The size follows the conventions other libraries and distributed engines use: an explicit
:func:`set_num_threads`, else ``ATTNKIT_NUM_THREADS``, else ``OMP_NUM_THREADS`` (which Ray, Dask
and Spark workers set to their CPU share), else the CPUs this process may run on. When
threadpoolctl is installed, the pool is one of the pools it lists and limits
(``threadpool_info()``, ``threadpool_limits(1)``), under ``user_api="attnkit"``.
"""

from __future__ import annotations

import os
from typing import Any

from attnkit import _core
from attnkit._validate import integer

__all__ = ["MAX_THREADS", "get_num_threads", "set_num_threads"]

ENV_VAR = "ATTNKIT_NUM_THREADS"
#: The most threads the pool may have (``set_num_threads`` and the variables are checked
#: against it): more than any CPU attnkit runs on has, few enough to start in milliseconds.
MAX_THREADS = int(_core.MAX_THREADS)


def set_num_threads(n: int) -> None:
    """Sets the number of threads attnkit's kernels use.

    Args:
        n: the number of threads, from 1 to :data:`attnkit.MAX_THREADS` (1024). 1 runs every
            kernel on the calling thread.

    Raises:
        TypeError: ``n`` not an int.
        ValueError: ``n`` < 1 or > ``MAX_THREADS``.

    Example:
        >>> import attnkit
        >>> attnkit.set_num_threads(2); attnkit.get_num_threads()
        2
    """
    _core.set_num_threads(_thread_count(integer(n, "n"), "n"))


def get_num_threads() -> int:
    """The number of threads attnkit's kernels use: the last :func:`set_num_threads`, else
    ``ATTNKIT_NUM_THREADS`` as read at import, else ``OMP_NUM_THREADS`` as read at import, else
    the number of CPUs this process may use (its CPU affinity and cgroup quota).

    Example:
        >>> import attnkit
        >>> attnkit.get_num_threads() >= 1
        True
    """
    return int(_core.get_num_threads())


def _thread_count(n: int, name: str) -> int:
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name}: expected a number of threads from 1 to {MAX_THREADS}, got {n}")
    return n


def _configure_from_env() -> None:
    """``ATTNKIT_NUM_THREADS`` (an error when malformed: it is attnkit's own), else the first
    entry of ``OMP_NUM_THREADS`` (ignored when malformed, as OpenMP runtimes do; capped at
    ``MAX_THREADS``)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: expected a positive integer number of threads, got {raw!r}") from None
        _core.set_num_threads(_thread_count(n, ENV_VAR))
        return
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:
        _core.set_num_threads(min(int(omp), MAX_THREADS))


def _register_with_threadpoolctl() -> None:
    """Makes the pool visible to threadpoolctl, when it is installed (attnkit does not need it)."""
    try:
        import threadpoolctl
    except ImportError:
        return
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return  # threadpoolctl < 3.0
    ours = os.path.realpath(_core.__file__)

    class AttnkitController(threadpoolctl.LibController):  # type: ignore[misc]
        """attnkit's pool, found as the loaded library that is attnkit's compiled core."""

        user_api = "attnkit"
        internal_api = "attnkit"
        filename_prefixes = (os.path.basename(ours).lower(),)

        def _mine(self) -> bool:
            # Another package's extension module can have the same file name.
            return os.path.realpath(str(self.filepath)) == ours

        def get_num_threads(self) -> Any:
            return get_num_threads() if self._mine() else None

        def set_num_threads(self, num_threads: int) -> None:
            if self._mine():
                set_num_threads(min(max(int(num_threads), 1), MAX_THREADS))

        def get_version(self) -> Any:
            return _core.__version__ if self._mine() else None

    threadpoolctl.register(AttnkitController)
