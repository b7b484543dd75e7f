"""The few C library calls that `os` lacks, through ctypes; each a quiet no-op where libc has none."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _function(name: str, *argtypes: type[ctypes._SimpleCData[Any]]) -> Any:
    """A libc function with its argument types set once, or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_PRCTL = _function("prctl", ctypes.c_int, *[ctypes.c_ulong] * 4)
_FALLOCATE = _function("fallocate64", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_MALLOC_TRIM = _function("malloc_trim", ctypes.c_size_t)  # glibc only
_SETNS = _function("setns", ctypes.c_int, ctypes.c_int)

CLONE_NEWNET = 0x40000000


def drop_ambient_capabilities() -> None:
    """Clear the calling thread's ambient capabilities so children start without any.

    Capabilities are per thread: call it in every thread that spawns. A quiet
    no-op where the kernel has no ambient set (before 4.3) or libc is missing.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def punch_hole(fd: int, length: int) -> bool:
    """Free the disk blocks of the first `length` bytes of `fd`, keeping its size and offset.

    False where the filesystem or libc cannot (the file then keeps its blocks).
    """
    if _FALLOCATE is None:
        return False
    done: int = _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length)
    return done == 0


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim).

    Worth it after a large transient, such as the daemon's first walk of every
    process: at 10,000 listeners it leaves ~1 MiB freed but still resident.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace `fd` refers to (os.setns is Python 3.12+).

    Raises OSError: EPERM without CAP_SYS_ADMIN (or under a seccomp filter
    such as systemd's RestrictNamespaces=), ENOSYS where libc has no setns.
    """
    if _SETNS is None:
        raise OSError(errno.ENOSYS, "setns is not available")
    if _SETNS(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
