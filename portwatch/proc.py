"""Reading /proc (with portwatch.procfd, its import-light part for the fd walk).

It reads each file whole and hands the text to the pure parsers in
`portwatch.procfs`. Races are normal here: a process may exit between any two
reads. That is translated in one place (`procfd.gone_or_denied`): ENOENT and
ESRCH mean the process left and are skipped quietly; EACCES and EPERM are
counted as denied so callers can say what they could not see; anything else
is raised.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Container, Iterable, Mapping

from portwatch.model import Process, Proto, Socket
from portwatch.procfd import (
    DEFAULT_ROOT,
    GONE,
    ProcessFiles,
    ProcessGone,
    list_pids,
    open_fd_dir,
    process_files,
    socket_fds,
    socket_fds_at,
)
from portwatch.procfs import (
    ByteOrder,
    parse_cgroup_unit,
    parse_cmdline,
    parse_comm,
    parse_last_pid,
    parse_net_table,
    parse_sockstat_inuse,
    parse_status_capabilities,
    parse_status_uid,
)


class TableRead:
    """The listening sockets of one scan of the socket tables.

    A plain class rather than a dataclass: building a dataclass costs
    `portwatch list` a share of its start-up, which is most of its time on
    a quiet host.
    """

    __slots__ = ("complete", "errors", "sockets")

    def __init__(
        self, sockets: list[Socket] | None = None, complete: bool = True, errors: list[str] | None = None
    ) -> None:
        self.sockets: list[Socket] = sockets if sockets is not None else []
        self.complete = complete
        self.errors: list[str] = errors if errors is not None else []

    def __repr__(self) -> str:
        return f"TableRead({len(self.sockets)} sockets, complete={self.complete}, errors={self.errors!r})"


class ProcFS:
    """Reads /proc under `root` (a parameter so tests and containers can point elsewhere)."""

    def __init__(self, root: str = DEFAULT_ROOT, byteorder: ByteOrder | None = None, *,
                 counts_fds: bool | None = None) -> None:
        self.root = root
        self.byteorder: ByteOrder = byteorder or ("little" if sys.byteorder == "little" else "big")
        self._users: dict[int, str | None] = {}
        # Whether /proc/<pid>/fd's size is its number of open fds (Linux 6.2+; 0 before): asked
        # of the kernel once, as this process holds fds (None: probe; False: act as if not).
        self.counts_fds = self._probe_fd_counts() if counts_fds is None else counts_fds

    def _probe_fd_counts(self) -> bool:
        try:
            return os.stat(f"{self.root}/self/fd").st_size > 0
        except OSError:
            return False

    # -- socket tables -------------------------------------------------------

    def read_sockets(
        self, protocols: Iterable[Proto] = (Proto.TCP, Proto.UDP), families: Iterable[int] = (4, 6),
        *, pid: int | None = None,
    ) -> TableRead:
        """Listening sockets from /proc/self/net/{tcp,tcp6,udp,udp6}.

        `self/net` rather than `net`: under systemd's ProcSubset=pid the
        /proc/net link is hidden but /proc/self/net is not, and both show the
        reader's own network namespace. `pid`: read /proc/<pid>/net instead,
        the tables of that process's network namespace (no setns needed). A
        missing tcp6/udp6 means IPv6 is disabled and is not an error; a
        `pid` that has exited raises ProcessGone. Parse errors propagate
        (ProcParseError).
        """
        result = TableRead()
        seen: set[int] = set()
        fams = set(families)
        for proto in protocols:
            for family in (4, 6):
                if family not in fams:
                    continue
                name = proto.value + ("6" if family == 6 else "")
                path = f"{self.root}/{pid or 'self'}/net/{name}"
                try:
                    with open(path, "rb") as f:
                        text = f.read().decode("ascii", "replace")
                except FileNotFoundError as exc:
                    if pid is not None and not os.path.exists(f"{self.root}/{pid}/net"):
                        raise ProcessGone(pid) from exc
                    if family == 6:
                        continue
                    result.complete = False
                    result.errors.append(f"{path}: {exc.strerror}")
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

    def sockets_in_use(self, pid: int) -> dict[str, int]:
        """{"TCP": n, "UDP": n, "TCP6": n, "UDP6": n}: the sockets hashed in `pid`'s network
        namespace (/proc/<pid>/net/sockstat{,6}); a listener opening or closing changes its
        count. Raises ProcessGone; a table that cannot be read is left out."""
        counts: dict[str, int] = {}
        for name in ("sockstat", "sockstat6"):
            try:
                with open(f"{self.root}/{pid}/net/{name}", "rb") as f:
                    counts.update(parse_sockstat_inuse(f.read().decode("ascii", "replace")))
            except FileNotFoundError as exc:
                if not os.path.exists(f"{self.root}/{pid}/net"):
                    raise ProcessGone(pid) from exc
            except OSError:
                pass
        return counts

    # -- processes -----------------------------------------------------------

    def last_pid(self) -> int | None:
        """The pid most recently given out (any new process or thread changes it); None if unknown."""
        try:
            with open(f"{self.root}/loadavg", "rb") as f:
                return parse_last_pid(f.read().decode("ascii", "replace"))
        except OSError:
            return None

    def pids(self) -> list[int]:
        return list_pids(self.root)

    def socket_fds(self, pid: int) -> dict[int, int]:
        """{fd: socket inode} for every socket fd of `pid`. Raises ProcessGone or AccessDenied."""
        return socket_fds(self.root, pid)[0]

    def open_fd_dir(self, pid: int) -> int:
        """A directory fd on /proc/<pid>/fd: see procfd.open_fd_dir."""
        return open_fd_dir(self.root, pid)

    def socket_fds_at(self, dfd: int, wanted: Container[int] | None = None) -> tuple[dict[int, int], int]:
        """({fd: socket inode}, fd links read) through a directory fd: see procfd.socket_fds_at."""
        return socket_fds_at(dfd, wanted)

    def stale_fds(self, pid: int, dfd: int, links: Mapping[bytes, int]) -> list[bytes]:
        """The fds (names) in `links` that no longer hold the socket given.

        `links` maps an fd name (bytes, for the speed of readlink: see
        socket_fds_at) to the socket inode it held. An fd that was closed,
        now holds something else, or cannot be read, is stale, and so is
        every fd once the process has exited. `dfd` is a directory fd from
        `open_fd_dir`, or -1 to go by path.
        """
        readlink = os.readlink
        prefix, dir_fd = (b"", dfd) if dfd >= 0 else (os.fsencode(f"{self.root}/{pid}/fd/"), None)
        stale: list[bytes] = []
        for name, inode in links.items():
            try:
                if readlink(prefix + name, dir_fd=dir_fd) == b"socket:[%d]" % inode:
                    continue
            except OSError:
                pass
            stale.append(name)
        return stale

    def own_capabilities(self) -> int | None:
        """This process's effective capability set, None when /proc does not say."""
        try:
            with open(f"{self.root}/self/status", "rb") as f:
                return parse_status_capabilities(f.read().decode("ascii", "replace"))
        except OSError:
            return None

    def fd_count(self, dfd: int) -> int | None:
        """How many fds the process of a directory fd from `open_fd_dir` has open: the size
        /proc/<pid>/fd reports (Linux 6.2+). 0 when the kernel does not say; None once the
        process has exited. One call, whatever the number of fds."""
        if not self.counts_fds:
            return 0
        try:
            return os.fstat(dfd).st_size
        except OSError as exc:
            return None if exc.errno in GONE else 0

    def fd_look(self, pid: int) -> tuple[int | None, int]:
        """The uid owning /proc/<pid>/fd (the process's effective uid, root when it is not
        dumpable) and its fd count by path (as fd_count; 0 when not known), from one stat.
        (None, 0) when it cannot be seen."""
        try:
            st = os.stat(f"{self.root}/{pid}/fd")
        except OSError:
            return None, 0
        return st.st_uid, st.st_size if self.counts_fds else 0

    def process(self, pid: int) -> Process | None:
        """Who `pid` is: comm, exe, cmdline, uid, user, unit. None when it has exited.

        Fields we may not read (exe of another user's process) are None
        rather than an error: the pid and name are still worth reporting.
        """
        files = process_files(self.root, pid)
        return None if files is None else self.process_from(pid, files)

    def process_from(self, pid: int, files: ProcessFiles) -> Process:
        """The Process that `procfd.process_files` read (here, or in a walk helper)."""
        comm, status, exe, cmdline, cgroup = files
        uid = parse_status_uid(status.decode("utf-8", "surrogateescape"))
        return Process(
            pid=pid,
            comm=parse_comm(comm),
            exe=exe,
            cmdline=parse_cmdline(cmdline) if cmdline is not None else (),
            uid=uid,
            user=self.user_name(uid) if uid is not None else None,
            unit=parse_cgroup_unit(cgroup.decode("utf-8", "replace")) if cgroup else None,
        )

    def user_name(self, uid: int) -> str | None:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = None
        return self._users[uid]
