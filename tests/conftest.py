"""Shared fixtures: thread-count control, memory-layout variants, and running a call in a forked
child so that a crash fails one test instead of killing the run."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import attnkit


@pytest.fixture
def threads():
    """Sets attnkit's thread count inside a test and restores it afterwards."""
    before = attnkit.get_num_threads()
    yield attnkit.set_num_threads
    attnkit.set_num_threads(before)


def layouts(arr):
    """``(name, variant)`` pairs holding ``arr``'s values in other memory layouts."""
    arr = np.asarray(arr)
    out = [("contiguous", np.ascontiguousarray(arr)), ("fortran", np.asfortranarray(arr))]
    ro = arr.copy()
    ro.flags.writeable = False
    out.append(("readonly", ro))
    swapped = arr.astype(arr.dtype.newbyteorder("S"))
    out.append(("byteswapped", swapped))
    if arr.dtype.itemsize > 1 and arr.size:  # an empty array has no misaligned variant
        buf = np.zeros(arr.nbytes + 1, dtype=np.uint8)
        mis = np.frombuffer(buf.data, dtype=arr.dtype, count=arr.size, offset=1).reshape(arr.shape)
        mis[...] = arr
        assert not mis.flags.aligned
        out.append(("misaligned", mis))
    if arr.ndim:
        doubled = np.repeat(arr, 2, axis=-1)[..., ::2]
        out.append(("strided", doubled))
        rev = np.flip(arr, axis=-1).copy()
        out.append(("negative-stride", np.flip(rev, axis=-1)))
    return out


def run_forked(fn, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` in a forked child. Returns ``("ok", None)`` or
    ``("raised", (exception type name, message))``; a crash (signal, abort) fails the test."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            fn(*args, **kwargs)
            result = ("ok", None)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
            result = ("raised", (type(exc).__name__, str(exc)))
        with os.fdopen(write_fd, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or not data:
        pytest.fail(f"the call crashed the process (wait status {status}): {fn.__name__}{args!r}"[:500])
    return pickle.loads(data)


# Hypothesis: keep the suite fast on a 2-core machine; CI gets the same profile.
try:
    from hypothesis import settings

    settings.register_profile("attnkit", max_examples=60, deadline=None)
    settings.load_profile("attnkit")
except ImportError:  # pragma: no cover
    pass

