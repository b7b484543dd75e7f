"""The one module that reads /proc.

It reads each file whole and hands the text to the pure parsers in
`portwatch.procfs`. Races are normal here: a process may exit between any two
reads. That is translated in one place (`_gone_or_denied`): ENOENT and ESRCH
mean the process left and are skipped quietly; EACCES and EPERM are counted
as denied so callers can say what they could not see; anything else is raised.
"""

from __future__ import annotations

import errno
import os
import pwd
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from portwatch.model import Process, Proto, Socket
from portwatch.procfs import (
    ByteOrder,
    parse_cgroup_unit,
    parse_cmdline,
    parse_comm,
    parse_net_table,
    parse_socket_link,
    parse_status_uid,
)

DEFAULT_ROOT = "/proc"
_T = TypeVar("_T")

_GONE = {errno.ENOENT, errno.ESRCH}
_DENIED = {errno.EACCES, errno.EPERM}


class ProcessGone(Exception):
    """The process exited while we were reading it."""


class AccessDenied(Exception):
    """We may not read this process's fds (another user, no CAP_SYS_PTRACE)."""


class TableUnreadable(Exception):
    """A socket table that must exist could not be read."""


def _gone_or_denied(exc: OSError) -> Exception:
    if exc.errno in _GONE:
        return ProcessGone()
    if exc.errno in _DENIED:
        return AccessDenied()
    return exc


@dataclass(slots=True)
class TableRead:
    """The listening sockets of one scan of the socket tables."""

    sockets: list[Socket] = field(default_factory=list)
    complete: bool = True
    errors: list[str] = field(default_factory=list)


class ProcFS:
    """Reads /proc under `root` (a parameter so tests and containers can point elsewhere)."""

    def __init__(self, root: str = DEFAULT_ROOT, byteorder: ByteOrder | None = None) -> None:
        self.root = root
        self.byteorder: ByteOrder = byteorder or ("little" if sys.byteorder == "little" else "big")
        self._users: dict[int, str | None] = {}

    # -- socket tables -------------------------------------------------------

    def read_sockets(
        self, protocols: Iterable[Proto] = (Proto.TCP, Proto.UDP), families: Iterable[int] = (4, 6)
    ) -> TableRead:
        """Listening sockets from /proc/self/net/{tcp,tcp6,udp,udp6}.

        `self/net` rather than `net`: under systemd's ProcSubset=pid the
        /proc/net link is hidden but /proc/self/net is not, and both show the
        reader's own network namespace. A missing tcp6/udp6 means IPv6 is
        disabled and is not an error. Parse errors propagate (ProcParseError).
        """
        result = TableRead()
        seen: set[int] = set()
        fams = set(families)
        for proto in protocols:
            for family in (4, 6):
                if family not in fams:
                    continue
                name = proto.value + ("6" if family == 6 else "")
                path = f"{self.root}/self/net/{name}"
                try:
                    with open(path, "rb") as f:
                        text = f.read().decode("ascii", "replace")
                except FileNotFoundError:
                    if family == 6:
                        continue
                    result.complete = False
                    result.errors.append(f"{path}: missing")
                    continue
                except OSError as exc:
                    result.complete = False
                    result.errors.append(f"{path}: {exc.strerror}")
                    continue
                for sock in parse_net_table(text, proto, source=path, byteorder=self.byteorder):
                    # The kernel builds the text as we read it: a socket may move
                    # between hash buckets and be printed twice.
                    if sock.inode == 0 or sock.inode not in seen:
                        seen.add(sock.inode)
                        result.sockets.append(sock)
        return result

    # -- processes -----------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process id visible under root (tasks that are not thread leaders are not listed)."""
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def socket_fds(self, pid: int) -> dict[int, int]:
        """{fd: socket inode} for every socket fd of `pid`.

        Raises ProcessGone or AccessDenied. readlink relative to a directory
        fd saves the kernel a path walk per fd, which is most of the cost on
        hosts with hundreds of thousands of fds.
        """
        try:
            dfd = os.open(f"{self.root}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _gone_or_denied(exc) from None
        try:
            return self._socket_fds_at(dfd)
        except OSError as exc:
            raise _gone_or_denied(exc) from None
        finally:
            os.close(dfd)

    @staticmethod
    def _socket_fds_at(dfd: int) -> dict[int, int]:
        found: dict[int, int] = {}
        for name in os.listdir(dfd):
            try:
                target = os.readlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue  # closed since listdir
            inode = parse_socket_link(target)
            if inode is not None:
                found[int(name)] = inode
        return found

    def fd_inode(self, pid: int, fd: int) -> int | None:
        """The socket inode behind one fd now, or None when it is closed or not a socket."""
        try:
            return parse_socket_link(os.readlink(f"{self.root}/{pid}/fd/{fd}"))
        except OSError as exc:
            err = _gone_or_denied(exc)
            if isinstance(err, ProcessGone):
                return None
            raise err from None

    def process(self, pid: int) -> Process | None:
        """Who `pid` is: comm, exe, cmdline, uid, user, unit. None when it has exited.

        Fields we may not read (exe of another user's process) are None
        rather than an error: the pid and name are still worth reporting.
        """
        base = f"{self.root}/{pid}"
        try:
            comm = parse_comm(_read(f"{base}/comm"))
            status = _read(f"{base}/status").decode("utf-8", "surrogateescape")
        except OSError as exc:
            if isinstance(_gone_or_denied(exc), ProcessGone):
                return None
            raise
        uid = parse_status_uid(status)
        exe = self._optional(lambda: os.readlink(f"{base}/exe"))
        cmdline_raw = self._optional(lambda: _read(f"{base}/cmdline"))
        cgroup_raw = self._optional(lambda: _read(f"{base}/cgroup"))
        return Process(
            pid=pid,
            comm=comm,
            exe=exe,
            cmdline=parse_cmdline(cmdline_raw) if cmdline_raw is not None else (),
            uid=uid,
            user=self.user_name(uid) if uid is not None else None,
            unit=parse_cgroup_unit(cgroup_raw.decode("utf-8", "replace")) if cgroup_raw else None,
        )

    @staticmethod
    def _optional(read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except OSError as exc:
            if exc.errno in _GONE or exc.errno in _DENIED:
                return None
            raise

    def user_name(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
