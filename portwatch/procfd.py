"""Which sockets a process holds, read from /proc/<pid>/fd; the rest of /proc is portwatch.proc.

Kept apart, with nothing but `os` imported, so that `portwatch list` can
start its walk of every process's fds (portwatch.walk) before its own
start-up (argparse, the parsers, typing) has run.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Container
    from typing import TypeVar

    T = TypeVar("T")

DEFAULT_ROOT = "/proc"
GONE = frozenset((errno.ENOENT, errno.ESRCH))
DENIED = frozenset((errno.EACCES, errno.EPERM))


class ProcessGone(Exception):
    """The process exited while we were reading it."""


class AccessDenied(Exception):
    """We may not read this process's fds (another user, no CAP_SYS_PTRACE)."""


def gone_or_denied(exc: OSError) -> Exception:
    """ENOENT and ESRCH as ProcessGone, EACCES and EPERM as AccessDenied, anything else as it is."""
    if exc.errno in GONE:
        return ProcessGone()
    if exc.errno in DENIED:
        return AccessDenied()
    return exc


def list_pids(root: str) -> list[int]:
    """Every process id visible under root (tasks that are not thread leaders are not listed)."""
    return [int(name) for name in os.listdir(root) if name.isdigit()]


def open_fd_dir(root: str, pid: int) -> int:
    """A directory fd on <root>/<pid>/fd (close-on-exec). Raises ProcessGone or AccessDenied.

    Kept open, it stays bound to that very process: once the process
    exits, reads through it fail even if the pid is reused.
    """
    try:
        return os.open(f"{root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise gone_or_denied(exc) from None


def socket_fds(root: str, pid: int, wanted: Container[int] | None = None) -> tuple[dict[int, int], int]:
    """({fd: socket inode}, fd links read) of `pid`, as socket_fds_at. Raises ProcessGone or AccessDenied."""
    dfd = open_fd_dir(root, pid)
    try:
        return socket_fds_at(dfd, wanted)
    finally:
        os.close(dfd)


def socket_fds_at(dfd: int, wanted: Container[int] | None = None) -> tuple[dict[int, int], int]:
    """({fd: socket inode}, fd links read) through a directory fd from `open_fd_dir`.

    `wanted`: keep only these inodes (the daemon then builds no 50,000-entry
    dict for a process with 50,000 connections; an early walk's helpers
    cannot, not knowing them yet). Raises ProcessGone or AccessDenied.
    This loop runs once per open fd on
    the host, so it is kept tight: one readlink per fd, relative to the
    directory fd (no path walk per fd), on bytes (a str name and target
    cost two conversions, a quarter of the call), the link parsed inline.
    """
    readlink = os.readlink
    found: dict[int, int] = {}
    try:
        names = os.listdir(dfd)
        for name in names:
            try:
                target = readlink(name.encode(), dir_fd=dfd)
            except FileNotFoundError:
                continue  # closed since listdir
            if target[:8] == b"socket:[" and target[-1:] == b"]":
                digits = target[8:-1]
                if digits.isdigit():  # bytes.isdigit is ASCII only
                    inode = int(digits)
                    if wanted is None or inode in wanted:
                        found[int(name)] = inode
    except OSError as exc:
        raise gone_or_denied(exc) from None
    return found, len(names)


# comm, status, the exe link, cmdline and cgroup of a process, as read.
ProcessFiles = tuple[bytes, bytes, str | None, bytes | None, bytes | None]


def process_files(root: str, pid: int) -> ProcessFiles | None:
    """The files that say who `pid` is, unparsed (proc.ProcFS.process_from parses them).

    None when the process has exited. comm and status must be readable (an
    OSError otherwise); the others are None when refused (the exe of another
    user's process). Here, not in portwatch.proc, so that a walk helper can
    read its share of them. The files are opened relative to one directory fd.
    """
    try:
        dfd = os.open(f"{root}/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return (
                _read_at(dfd, "comm"),
                _read_at(dfd, "status"),
                _optional(_readlink_at, dfd, "exe"),
                _optional(_read_at, dfd, "cmdline"),
                _optional(_read_at, dfd, "cgroup"),
            )
        finally:
            os.close(dfd)
    except OSError as exc:
        if isinstance(gone_or_denied(exc), ProcessGone):
            return None
        raise


def _read_at(dfd: int, name: str) -> bytes:
    """The whole file `name` under directory fd `dfd`, without the io module's layers."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return read_all(fd)
    finally:
        os.close(fd)


def read_all(fd: int) -> bytes:
    """Everything left to read from `fd` (a file, or a pipe until its writers close it)."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _readlink_at(dfd: int, name: str) -> str:
    return os.readlink(name, dir_fd=dfd)


def _optional(read: Callable[[int, str], T], dfd: int, name: str) -> T | None:
    try:
        return read(dfd, name)
    except OSError as exc:
        if exc.errno in GONE or exc.errno in DENIED:
            return None
        raise


def single_threaded() -> bool:
    """True when this process runs one thread, so fork() is safe (3.12+ warns otherwise)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return False
    return len(fields) > 17 and fields[17] == b"1"  # field 20, num_threads
