"""Taking snapshots: list the listening sockets, then find every process holding each.

Two ways to find holders:
- `full_scan` walks every process's fds once; the one-shot CLI views use it
  because they must name every owner of every socket.
- `OwnerTracker` is the daemon's: it remembers which (pid, fd) held which
  inode, re-checks those cheaply each tick, reads the fds of processes that
  are new since the last tick, and walks everything else only when an inode
  appears that none of that explains. A slow rotation over the remaining
  processes catches sockets handed to an old process (SCM_RIGHTS) and
  refreshes cached process details.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from portwatch import sockdiag
from portwatch.model import Process, Proto, Snapshot, Socket
from portwatch.proc import AccessDenied, ProcessGone, ProcFS, TableRead
from portwatch.snapshot import build_snapshot


class Source(StrEnum):
    AUTO = "auto"  # sock_diag, falling back to /proc/net when netlink is unavailable
    NETLINK = "netlink"
    PROC = "proc"


@dataclass(slots=True)
class SocketLister:
    """Lists listening sockets through sock_diag or /proc/net."""

    procfs: ProcFS
    source: Source = Source.AUTO
    # Why netlink is not used, once it failed in AUTO mode (said once by the caller).
    fallback_reason: str | None = None

    @property
    def active_source(self) -> str:
        """What the last listing used: "netlink" or "proc"."""
        return "proc" if self.source is Source.PROC or self.fallback_reason else "netlink"

    def list(self, protocols: Iterable[Proto], families: Iterable[int]) -> TableRead:
        protocols, families = tuple(protocols), tuple(families)
        if self.source is not Source.PROC and self.fallback_reason is None:
            try:
                return TableRead(sockdiag.list_listeners(protocols, families))
            except sockdiag.SockDiagUnavailable as exc:
                if self.source is Source.NETLINK:
                    raise
                self.fallback_reason = str(exc)
        return self.procfs.read_sockets(protocols, families)


@dataclass(slots=True)
class WalkResult:
    holders: dict[int, set[int]] = field(default_factory=dict)  # inode -> pids
    denied: set[int] = field(default_factory=set)


def walk_holders(procfs: ProcFS, inodes: set[int], pids: Iterable[int]) -> WalkResult:
    """Read the fds of `pids` and record which of them hold one of `inodes`."""
    result = WalkResult()
    for pid in pids:
        try:
            fds = procfs.socket_fds(pid)
        except ProcessGone:
            continue
        except AccessDenied:
            result.denied.add(pid)
            continue
        for inode in fds.values():
            if inode in inodes:
                result.holders.setdefault(inode, set()).add(pid)
    return result


def read_processes(procfs: ProcFS, pids: Iterable[int]) -> dict[int, Process]:
    found = {}
    for pid in pids:
        info = procfs.process(pid)
        if info is not None:
            found[pid] = info
    return found


def full_scan(
    procfs: ProcFS,
    lister: SocketLister,
    protocols: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[int] = (4, 6),
) -> Snapshot:
    """One complete snapshot: every listener and every process holding it."""
    table = lister.list(protocols, families)
    inodes = {s.inode for s in table.sockets if s.inode}
    walk = walk_holders(procfs, inodes, procfs.pids())
    holder_pids = set().union(*walk.holders.values()) if walk.holders else set()
    return build_snapshot(
        table.sockets,
        walk.holders,
        read_processes(procfs, holder_pids),
        complete=table.complete,
        denied_pids=len(walk.denied),
    )


@dataclass(slots=True)
class TickStats:
    """What one tracker update cost, for the benchmark and debug logs."""

    rechecked_fds: int = 0
    walked_pids: int = 0
    full_walk: bool = False


class OwnerTracker:
    """Incremental owner resolution for the daemon (see the module docstring)."""

    def __init__(self, procfs: ProcFS, *, rotation_ticks: int = 30) -> None:
        self.procfs = procfs
        self.rotation_ticks = max(1, rotation_ticks)
        self._pid_fds: dict[int, dict[int, int]] = {}  # holder pid -> {fd: listening inode}
        self._known_pids: set[int] = set()
        self._unresolved: set[int] = set()  # inodes a full walk found no holder for
        self._processes: dict[int, Process] = {}
        self._denied: set[int] = set()
        self._rotation: list[int] = []
        self.last = TickStats()

    def forget_processes(self, pids: Iterable[int]) -> None:
        """Drop cached details (after exec) so they are read again."""
        for pid in pids:
            self._processes.pop(pid, None)

    def update(
        self,
        sockets: list[Socket],
        *,
        complete: bool,
        hint_pids: Iterable[int] = (),
        on_progress: Callable[[], None] | None = None,
    ) -> Snapshot:
        stats = TickStats()
        listening = {s.inode for s in sockets if s.inode}
        self._recheck(listening, stats)
        current = set(self.procfs.pids())
        walked: set[int] = set()

        # New processes first: forked workers inherit listeners, new servers open them.
        fresh = (current - self._known_pids) | (set(hint_pids) & current)
        self._walk(fresh, listening, walked, stats)
        if on_progress:
            on_progress()

        held = self._held_inodes()
        missing = listening - held - self._unresolved
        if missing:
            # Pid order says nothing about age (pids wrap), so walk everyone
            # left until every new inode is found.
            stats.full_walk = True
            for pid in current - walked:
                self._walk((pid,), listening, walked, stats)
                if len(walked) % 256 == 0 and on_progress:
                    on_progress()
                missing -= self._held_inodes_of(pid)
                if not missing:
                    break
            self._unresolved |= missing
        self._unresolved &= listening

        self._rotate(current, walked, listening, stats)
        self._known_pids = current
        self._denied &= current
        self.last = stats
        return self._snapshot(sockets, complete)

    def _recheck(self, listening: set[int], stats: TickStats) -> None:
        for pid in list(self._pid_fds):
            fds = self._pid_fds[pid]
            for fd, inode in list(fds.items()):
                stats.rechecked_fds += 1
                now = None
                if inode in listening:
                    try:
                        now = self.procfs.fd_inode(pid, fd)
                    except AccessDenied:
                        now = None
                if now != inode:
                    del fds[fd]
            if not fds:
                del self._pid_fds[pid]
                self._processes.pop(pid, None)

    def _walk(self, pids: Iterable[int], listening: set[int], walked: set[int], st: TickStats) -> None:
        for pid in pids:
            walked.add(pid)
            st.walked_pids += 1
            try:
                fds = self.procfs.socket_fds(pid)
            except ProcessGone:
                self._pid_fds.pop(pid, None)
                continue
            except AccessDenied:
                self._denied.add(pid)
                continue
            self._denied.discard(pid)
            mine = {fd: inode for fd, inode in fds.items() if inode in listening}
            if mine:
                self._pid_fds[pid] = mine
            else:
                self._pid_fds.pop(pid, None)

    def _rotate(self, current: set[int], walked: set[int], listening: set[int], st: TickStats) -> None:
        """Walk a slice of the processes not walked this tick, and refresh their details."""
        if not self._rotation:
            self._rotation = sorted(current)
        share = max(1, len(current) // self.rotation_ticks)
        batch, self._rotation = self._rotation[:share], self._rotation[share:]
        todo = [pid for pid in batch if pid in current and pid not in walked]
        self._walk(todo, listening, walked, st)
        self.forget_processes(todo)

    def _held_inodes(self) -> set[int]:
        return {inode for fds in self._pid_fds.values() for inode in fds.values()}

    def _held_inodes_of(self, pid: int) -> set[int]:
        return set(self._pid_fds.get(pid, {}).values())

    def _snapshot(self, sockets: list[Socket], complete: bool) -> Snapshot:
        holders: dict[int, set[int]] = {}
        for pid, fds in self._pid_fds.items():
            for inode in fds.values():
                holders.setdefault(inode, set()).add(pid)
            if pid not in self._processes:
                info = self.procfs.process(pid)
                if info is not None:
                    self._processes[pid] = info
        return build_snapshot(
            sockets, holders, self._processes, complete=complete, denied_pids=len(self._denied)
        )
