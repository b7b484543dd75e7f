"""Taking snapshots: list the listening sockets, then find every process holding each.

Two ways to find holders:
- `full_scan` walks every process's fds once (portwatch.walk); the one-shot
  CLI views use it because they must name every owner of every socket.
- `OwnerTracker` is the daemon's, and what keeps a tick cheap on a host with
  hundreds of thousands of fds:
  - listeners come from sock_diag, which filters by state in the kernel, so
    established connections cost nothing;
  - it remembers which (pid, fd) held which listening inode
    (portwatch.holders) and how many fds each process had open when last
    read; through a directory fd kept open per holder, one fstat a tick
    gives a holder's fd count (its exit fails it); only a holder whose count
    changed is re-checked, one readlink per remembered fd (every fd once per
    RECHECK_TICKS ticks, one fd at the others);
  - it reads the fds of processes that are new since the last tick, and
    lists /proc only when /proc/loadavg says a pid was given out;
  - it searches the other processes only when an inode appears that none
    of that explains: recently started processes first, then those whose fd
    count changed (one stat each), the socket's uid first, stopping as soon
    as every new inode is found; before reading the rest it lists the
    sockets again, so a listener whose process exited right after the
    listing costs no walk of the host; inodes no process holds (kernel
    sockets) are remembered, so they never cause a search again;
  - a slow rotation looks at every process once per 60 ticks and reads the
    fds of those whose count changed (all of them one round in ten): it
    catches a socket handed to a process that already existed (SCM_RIGHTS)
    while its sender keeps it too, and refreshes holders' cached details (a
    holder renaming itself);
  - between ticks, while processes start, `peek` reads only those: the
    sockets are listed again only when one of them holds a socket it did not
    hold at the last look;
  - a tick that changed nothing hands back the very same snapshot (and the
    lister the very same list), so what follows the listing costs nothing.
  The decisions (which fds, which processes, in what order) are pure, in
  portwatch.holders and portwatch.schedule; this module does the reading.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Collection, Iterable, Mapping
from enum import StrEnum
from typing import NamedTuple

from portwatch import sockdiag
from portwatch.activation import SocketUnit, UnitCache
from portwatch.holders import HolderIndex
from portwatch.model import NetNs, Process, Proto, Snapshot, Socket
from portwatch.namespaces import Namespaces, netns_inode
from portwatch.netns import make_netns
from portwatch.proc import ProcFS, TableRead
from portwatch.procfd import AccessDenied, ProcessGone
from portwatch.procfs import ProcParseError
from portwatch.schedule import Recency, RecheckTurns, Rotation, SearchOrder
from portwatch.snapshot import build_snapshot, rebuild_snapshot
from portwatch.walk import Walk

FAMILIES = (4, 6)


class Source(StrEnum):
    AUTO = "auto"  # sock_diag, falling back to /proc/net when netlink is unavailable
    NETLINK = "netlink"
    PROC = "proc"


class SocketLister:
    """Lists listening sockets through sock_diag or /proc/net."""

    __slots__ = ("fallback_reason", "procfs", "source")

    def __init__(
        self, procfs: ProcFS, source: Source = Source.AUTO, fallback_reason: str | None = None
    ) -> None:
        self.procfs = procfs
        self.source = source
        # Why netlink is not used, once it failed in AUTO mode (said once by the caller).
        self.fallback_reason = fallback_reason

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


def full_scan(
    procfs: ProcFS,
    lister: SocketLister,
    protocols: Iterable[Proto] = (Proto.TCP, Proto.UDP),
    families: Iterable[int] = (4, 6),
    *,
    walk: Walk | None = None,
    workers: int | None = None,
    namespaces: Namespaces | None = None,
) -> tuple[Snapshot, list[str]]:
    """Every listening socket and every process holding it, and the socket tables that could
    not be read (each as "what: why"; the snapshot is then incomplete).

    `walk`: one begun earlier over procfs.root (the `portwatch` command starts
    it before its own start-up); else one is made here with `workers`.
    `namespaces`: list every network namespace's sockets, not only this one's.
    """
    if walk is None:
        walk = Walk(procfs.root, workers=workers)
    netns_of: dict[int, NetNs] = {}
    try:
        if namespaces is not None:
            listing = namespaces.listing_all(protocols, families)
            table, netns_of = listing.table, listing.netns_of
        else:
            table = lister.list(protocols, families)
    except BaseException:
        walk.abandon()  # its helpers are already walking
        raise
    found = walk.finish(procfs, {s.inode for s in table.sockets if s.inode})
    snap = build_snapshot(
        table.sockets,
        found.holders,
        found.processes,
        complete=table.complete,
        denied_pids=len(found.denied),
        netns_of=netns_of,
        host=own_netns(procfs) if namespaces is None else namespaces.host,
    )
    return snap, table.errors


def own_netns(procfs: ProcFS) -> NetNs | None:
    """This process's network namespace, named `host`; None when /proc does not say."""
    inode = netns_inode(procfs.root, "self")
    return make_netns(inode, host=True) if inode is not None else None


def socket_units() -> list[SocketUnit]:
    """systemd's active socket units (raises activation.Unavailable)."""
    from portwatch.sdbus import socket_units as ask  # noqa: PLC0415 (loads jeepney: only when needed)

    return ask()


# -- the daemon's scans -------------------------------------------------------------


class ScanResult(NamedTuple):
    """A snapshot (None when the listing failed), and why the scan was not whole."""

    snapshot: Snapshot | None
    error: str | None = None
    partial: bool = False  # some tables were read, others not
    socket_units_problem: str | None = None  # why systemd's socket units could not be had
    # Network namespaces whose listeners close with them, and why: netns_gone, netns_unwatched.
    closed_netns: Mapping[int, str] = {}
    unread_netns: tuple[str, ...] = ()  # namespaces that could not be read (see Namespaces)


class Scanner:
    """The daemon's scans: list the sockets, resolve their owners (OwnerTracker).

    A listener whose every holder vanished during the scan may simply have
    closed after the listing: it is listed again and, if gone, left out (the
    next scan reports it closed) rather than reported as owned by nobody.
    A socket systemd holds is attributed to its socket unit (UnitCache).
    With `all_netns`, every network namespace is listed (Namespaces): those
    of the processes the tracker sees start (and hinted), of a slice of the
    others each tick (a process that entered one later), and `ip netns`'s.
    A refused forced netlink source raises SockDiagUnavailable; other
    failures are in the result.
    """

    def __init__(self, procfs: ProcFS, source: Source = Source.AUTO, *, all_netns: bool = True) -> None:
        self.lister = SocketLister(procfs, source)
        self.tracker = OwnerTracker(procfs)
        self.units = UnitCache(socket_units)
        self.host = own_netns(procfs)
        self.namespaces: Namespaces | None = None
        self._known: set[int] = set()  # the tracker's processes when namespaces were last looked at
        self._young: set[int] = set()  # processes new at the last look: looked at once more
        self._restat: list[int] = []  # the others, a slice a tick
        self._unwatched: dict[int, str] = {}  # namespaces no longer watched, for the next scan
        self._resolved: Snapshot | None = None  # the tracker's last snapshot
        self._holderless: list[int] = []  # its listeners that no process holds
        self._stale_netns: set[int] = set()  # namespaces to read whole at the next scan
        self.watch_namespaces(all_netns)

    def watch_namespaces(self, wanted: bool) -> None:
        """Every network namespace (True), or only this process's own."""
        if wanted and self.namespaces is None and self.host is not None:
            self.namespaces = Namespaces(self.tracker.procfs, self.lister.list, self.host)
            self._known, self._young, self._restat = set(), set(), []
        elif not wanted and self.namespaces is not None:
            self._unwatched = {n.id: "netns_unwatched" for n in self.namespaces.others}
            self.namespaces.close()
            self.namespaces = None

    def scan(
        self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int] = (),
        on_progress: Callable[[], None] | None = None,
    ) -> ScanResult:
        """A regular scan (see OwnerTracker.update)."""
        return self._scan(previous, tuple(protocols), hints, on_progress, self.tracker.update, regular=True)

    def scan_early(
        self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int],
        on_progress: Callable[[], None] | None = None,
    ) -> ScanResult:
        """A scan of the processes that just started (see OwnerTracker.update_early)."""
        return self._scan(previous, tuple(protocols), hints, on_progress, self.tracker.update_early,
                          regular=False)

    @property
    def active_source(self) -> str:
        return self.lister.active_source

    @property
    def fallback_reason(self) -> str | None:
        return self.lister.fallback_reason

    @property
    def searched(self) -> bool:
        """The last scan had to read old processes (a search, or the first scan)."""
        return self.tracker.searched

    @property
    def netns_problem(self) -> str | None:
        """Why other namespaces are read through /proc/<pid>/net (setns refused), if it was."""
        return self.namespaces.enter_problem if self.namespaces is not None else None

    def forget_processes(self, pids: Iterable[int]) -> None:
        self.tracker.forget_processes(pids)

    def peek(self, pids: Collection[int], *, fresh: Collection[int] = ()) -> bool:
        """Whether an early scan of these young processes can find anything (OwnerTracker.peek)."""
        return self.tracker.peek(pids, fresh=fresh)

    def capabilities(self) -> int | None:
        """The effective capabilities this process reads /proc with."""
        return self.lister.procfs.own_capabilities()

    def close(self) -> None:
        self.tracker.close()
        if self.namespaces is not None:
            self.namespaces.close()

    def _scan(
        self, previous: Snapshot | None, protocols: tuple[Proto, ...], hints: Iterable[int],
        on_progress: Callable[[], None] | None, resolve: Callable[..., Snapshot], *, regular: bool,
    ) -> ScanResult:
        hints = tuple(hints)
        spaces = self.namespaces
        closed: dict[int, str] = self._unwatched
        self._unwatched = {}
        try:
            if spaces is not None:
                spaces.look(hints)  # a process that just started may be in a namespace of its own
                table, netns_of, unread = self._list_namespaces(spaces, protocols, closed, self._stale_netns)
            else:
                table, netns_of, unread = self.lister.list(protocols, FAMILIES), {}, []
        except (ProcParseError, OSError) as exc:
            return ScanResult(None, str(exc))
        snap = resolve(table.sockets, complete=table.complete, hint_pids=hints, on_progress=on_progress,
                       netns_of=netns_of, host=self.host,
                       still_listed=self._still_listed(protocols, netns_of))
        if spaces is not None and regular and (appeared := self._look_at_processes()):
            # A namespace seen for the first time: its sockets and holders, in this scan.
            searched = self.tracker.searched
            try:
                table, netns_of, unread = self._list_namespaces(spaces, protocols, closed)
            except (ProcParseError, OSError):
                pass  # the scan that worked stands; the next one reads the namespace
            else:
                snap = self.tracker.update_early(table.sockets, complete=table.complete,
                                                 hint_pids=spaces.members(appeared), on_progress=on_progress,
                                                 netns_of=netns_of, host=self.host)
                self.tracker.searched |= searched
        if spaces is not None:
            self._stale_netns = self._owners_changed(snap, netns_of)
        if snap is not self._resolved:  # an unchanged snapshot is the same object: skip the walk
            self._holderless = [i for i, x in snap.listeners.items() if not x.processes]
        self._resolved = snap
        snap = self._without_closed_meanwhile(previous, snap, protocols, closed)
        return ScanResult(self.units.apply(snap), "; ".join(table.errors) or None, partial=bool(table.errors),
                          socket_units_problem=self.units.problem, closed_netns=closed,
                          unread_netns=tuple(unread))

    def _still_listed(self, protocols: tuple[Proto, ...], netns_of: Mapping[int, NetNs]) -> StillListed:
        """What the tracker asks before a search reads every process: the host's listening
        inodes now (another namespace's are taken as still there: listed again they would be
        read whole), None when they cannot be had whole."""
        def listed() -> Collection[int] | None:
            try:
                table = self.lister.list(protocols, FAMILIES)
            except (ProcParseError, OSError, sockdiag.SockDiagUnavailable):
                return None
            return {s.inode for s in table.sockets}.union(netns_of) if table.complete else None
        return listed

    def _list_namespaces(
        self, spaces: Namespaces, protocols: tuple[Proto, ...], closed: dict[int, str],
        force: Collection[int] = (),
    ) -> tuple[TableRead, dict[int, NetNs], list[str]]:
        """Every namespace's sockets; the namespaces gone are added to `closed`."""
        index = self.tracker.index
        listing = spaces.listing(protocols, FAMILIES, force=force, holders_of=index.holders_of)
        closed.update(dict.fromkeys(listing.gone, "netns_gone"))
        if listing.renamed:  # built anew, so the new name reaches the snapshot
            index.touch(i for i, n in listing.netns_of.items() if n.id in listing.renamed)
        return listing.table, listing.netns_of, listing.unread

    def _owners_changed(self, snap: Snapshot, netns_of: Mapping[int, NetNs]) -> set[int]:
        """Namespaces with a listener opened or whose holders changed since the last scan: read
        whole at the next one (a holder that closed one listener may have opened another)."""
        before = self._resolved
        if before is None or snap is before:
            return set()
        old, new = before.listeners, snap.listeners
        return {n.id for i, n in netns_of.items() if new.get(i) is not old.get(i)}

    def _look_at_processes(self) -> set[int]:
        """Which namespace the tracker's new processes are in (and last tick's new ones, and a
        slice of the others: a process may enter one after it started); the new namespaces."""
        spaces = self.namespaces
        if spaces is None:
            return set()
        known = self.tracker.known
        new: set[int] = set()
        if known is not self._known:
            new = known - self._known
            spaces.forget(self._known - known)
            self._known = known
        if not self._restat:
            self._restat = list(known)
        step = max(1, -(-len(known) // self.tracker.rotation.ticks))
        look = new | self._young | set(self._restat[-step:])
        del self._restat[-step:]
        self._young = new
        return spaces.look(look)

    def _without_closed_meanwhile(
        self, previous: Snapshot | None, snap: Snapshot, protocols: tuple[Proto, ...], closed: dict[int, str],
    ) -> Snapshot:
        """The snapshot without the listeners that lost every holder because they closed (listing
        again); namespaces found gone meanwhile are added to `closed`."""
        if previous is None:
            return snap
        lost = [i for i in self._holderless if (p := previous.listeners.get(i)) is not None and p.processes]
        if not lost:
            return snap
        try:
            if self.namespaces is not None:
                elsewhere = {n.id for i in lost if (n := snap.listeners[i].netns) is not None and not n.host}
                again = self._list_namespaces(self.namespaces, protocols, closed, elsewhere)[0]
            else:
                again = self.lister.list(protocols, FAMILIES)
        except (ProcParseError, OSError, sockdiag.SockDiagUnavailable):
            return snap  # the scan that worked stands; the next one says what failed
        if not again.complete:
            return snap
        gone = set(lost).difference(s.inode for s in again.sockets)
        if not gone:
            return snap
        kept = {i: x for i, x in snap.listeners.items() if i not in gone}
        return Snapshot(kept, complete=snap.complete, denied_pids=snap.denied_pids)


# -- the daemon's incremental resolution ---------------------------------------

StillListed = Callable[[], Collection[int] | None]

# Leave this share of RLIMIT_NOFILE (at least 256 fds) to the rest of the daemon.
_FD_RESERVE = 4
_PROGRESS_EVERY = 256  # processes read between two on_progress calls
_FD_NAMES: dict[int, bytes] = {}


def _fd_name(fd: int) -> bytes:
    """Its name in /proc/<pid>/fd, one object shared by all holders (listeners sit on the same few fds)."""
    name = _FD_NAMES.get(fd)
    if name is None:
        name = b"%d" % fd
        if len(_FD_NAMES) < 65536:
            _FD_NAMES[fd] = name
    return name


class DirFds:
    """Directory fds on /proc/<pid>/fd kept open for holders, within RLIMIT_NOFILE.

    A kept fd is bound to its process: once it exits, every read through it
    fails, even if the pid is reused. Past the budget a holder is read by path.
    """

    def __init__(self, procfs: ProcFS) -> None:
        self.procfs = procfs
        self._kept: dict[int, int] = {}  # pid -> directory fd
        self._cap: int | None = None  # lowered once the process ran out of fds

    def get(self, pid: int) -> int:
        """The kept fd of `pid`, or -1."""
        return self._kept.get(pid, -1)

    def open(self, pid: int) -> int:
        """A new directory fd on `pid` (ProcessGone, AccessDenied); out of fds, give kept ones back."""
        try:
            return self.procfs.open_fd_dir(pid)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._kept:
                raise
        self._cap = len(self._kept) // 2
        self.close_all()
        return self.procfs.open_fd_dir(pid)

    def keep(self, pid: int, dfd: int) -> None:
        """Keep `dfd` for `pid` if the budget allows, else close it."""
        if len(self._kept) < self._budget():
            self._kept[pid] = dfd
        else:
            os.close(dfd)

    def close(self, pid: int) -> None:
        dfd = self._kept.pop(pid, -1)
        if dfd >= 0:
            os.close(dfd)

    def close_all(self) -> None:
        for dfd in self._kept.values():
            os.close(dfd)
        self._kept.clear()

    def _budget(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        budget = max(0, soft - max(256, soft // _FD_RESERVE))
        return budget if self._cap is None else min(budget, self._cap)


class OwnerTracker:
    """Incremental owner resolution for the daemon (see the module docstring).

    `update` for a regular tick, `update_early` while processes start (only
    the hinted ones are read). Keeps one directory fd open per holder (raise
    RLIMIT_NOFILE's soft limit to serve big hosts); `close()` releases them.
    `searched` says whether the last update had to read old processes.
    """

    def __init__(self, procfs: ProcFS, *, rotation_ticks: int = 60) -> None:
        self.procfs = procfs
        self.index = HolderIndex()
        self.dirs = DirFds(procfs)
        self.rotation = Rotation(rotation_ticks)
        self.recency = Recency()
        self.turns = RecheckTurns()
        self.searched = False
        self._known: set[int] = set()  # every process seen at the last listing
        self._last_pid: int | None = None  # /proc/loadavg's, at the last listing of /proc
        self._unresolved: set[int] = set()  # inodes a search found no holder for
        self._denied: set[int] = set()
        self._processes: dict[int, Process] = {}  # details of holders
        self._refresh: set[int] = set()  # holders whose details must be read again
        self._inodes: list[int] = []  # of the last listing, in its order
        self._sockets: list[Socket] | None = None  # the last listing
        self._listening: set[int] = set()  # its inodes
        self._snapshot: Snapshot | None = None
        self._tick = 0
        self._peeked: dict[int, frozenset[int]] = {}  # young pid -> its socket inodes at the last peek
        self._fd_counts: dict[int, int] = {}  # pid -> fds it had open when last read whole
        self._rechecked: dict[int, int] = {}  # holder pid -> fds it had open at its last re-check

    def update(
        self, sockets: list[Socket], *, complete: bool, hint_pids: Iterable[int] = (),
        on_progress: Callable[[], None] | None = None, netns_of: Mapping[int, NetNs] | None = None,
        host: NetNs | None = None, still_listed: StillListed | None = None,
    ) -> Snapshot:
        """A regular tick: re-check known holders, read new and hinted processes, search for
        what is still unexplained, take a rotation step; the snapshot of `sockets`.

        `on_progress` is called every few hundred processes of a long walk (the watchdog).
        `netns_of`/`host`: the namespace of each socket (see snapshot.build_snapshot).
        `still_listed`: lists again (the inodes, None when that failed) before a search reads
        the unlikely processes; a socket no longer listed then is left out of the snapshot.
        """
        listening, same = self._listing(sockets)
        self._recheck()
        last_pid = self.procfs.last_pid()
        if last_pid is None or last_pid != self._last_pid:
            # A pid was given out since the last listing: there may be new processes. (Exits
            # need no listing: a holder's re-check fails, others are forgotten when the
            # rotation or the next listing meets them.)
            current = set(self.procfs.pids())
            for pid in self._known - current:
                self._forget(pid)
            self._last_pid = last_pid
        else:
            current = self._known
        walked, gone = self._resolve(current, hint_pids, sockets, listening, on_progress,
                                     still_listed=still_listed)
        self._rotate(current, listening, walked, on_progress)
        if gone:
            sockets, same = self._without(sockets, gone), False
        return self._finish(sockets, complete, same, netns_of, host)

    def update_early(
        self, sockets: list[Socket], *, complete: bool, hint_pids: Iterable[int],
        on_progress: Callable[[], None] | None = None, netns_of: Mapping[int, NetNs] | None = None,
        host: NetNs | None = None, still_listed: StillListed | None = None,
    ) -> Snapshot:
        """An extra tick while processes start: only the hinted ones (the proc connector's forks
        and execs) are read. The re-check, the listing of /proc and the rotation wait for the
        next regular tick, so early ticks stay cheap on a large host."""
        listening, same = self._listing(sockets)
        _, gone = self._resolve(self._known.union(hint_pids), hint_pids, sockets, listening, on_progress,
                                still_listed=still_listed)
        if gone:
            sockets, same = self._without(sockets, gone), False
        return self._finish(sockets, complete, same, netns_of, host)

    def _without(self, sockets: list[Socket], gone: set[int]) -> list[Socket]:
        """The listing without the sockets found closed meanwhile; remembered as the last one, so
        the next listing is compared with what the snapshot holds."""
        kept = [s for s in sockets if s.inode not in gone]
        self._sockets, self._inodes = kept, [s.inode for s in kept]
        self._listening = self._listening - gone
        return kept

    def peek(self, pids: Collection[int], *, fresh: Collection[int] = ()) -> bool:
        """Whether one of these young processes holds a socket it did not hold when last peeked
        at: only then can an early scan find something (a new listener, a forked worker sharing
        its parent's, a holder that exec'd: `fresh` are those that forked or exec'd since, whose
        earlier look no longer counts). A process that cannot be read counts as changed. A
        socket seen before it listens (a server that resolves names between bind and listen) is
        not looked for again: its listener waits for the next regular scan."""
        before, self._peeked = self._peeked, {}
        for pid in fresh:
            before.pop(pid, None)
        changed = False
        for pid in pids:
            dfd = kept = self.dirs.get(pid)
            try:
                if dfd < 0:
                    dfd = self.dirs.open(pid)
                inodes = frozenset(self.procfs.socket_fds_at(dfd)[0].values())
            except ProcessGone:
                continue
            except AccessDenied:
                changed = True
                continue
            finally:
                if dfd >= 0 and kept < 0:
                    os.close(dfd)
            self._peeked[pid] = inodes
            changed = changed or not inodes <= before.get(pid, frozenset())
        return changed

    @property
    def known(self) -> set[int]:
        """The processes of the last listing of /proc (the same object until it changes)."""
        return self._known

    def forget_processes(self, pids: Iterable[int]) -> None:
        """Read these processes' details again (after exec) at the next update."""
        for pid in pids:
            if self.index.holds(pid):
                self._refresh.add(pid)

    def close(self) -> None:
        """Release the kept directory fds. The tracker can still be used (it reopens them)."""
        self.dirs.close_all()

    # -- the steps of an update ---------------------------------------------------------

    def _listing(self, sockets: list[Socket]) -> tuple[set[int], bool]:
        """The listening inodes, and whether they are those of the last listing."""
        self._tick += 1
        self.searched = self._tick == 1
        if sockets is self._sockets:  # the lister's unchanged listing: the same object
            return self._listening, True
        self._sockets = sockets
        inodes = [s.inode for s in sockets]
        same = inodes == self._inodes
        self._inodes = inodes
        listening = self._listening = {i for i in inodes if i}
        if not same:
            self.index.keep_listening(listening)
            self._unresolved &= listening
        return listening, same

    def _recheck(self) -> None:
        """Drop the holder fds that changed (closed, exited, replaced): see schedule.RecheckTurns.
        A holder whose kept directory fd says it has as many fds open as at its last whole look
        costs one fstat: it has not exited, and has closed none (or opened another in the same
        interval: that waits for the rotation, which reads holders whole)."""
        turn = self.turns.next()
        read, rechecked = self._fd_counts, self._rechecked
        for pid in list(self.index.pids()):
            fds = self.index.fds(pid)
            dfd = self.dirs.get(pid)
            # By path (past the budget of kept directory fds) a pid may be another process's
            # now: only a kept fd vouches for the count.
            count = self.procfs.fd_count(dfd) if dfd >= 0 else 0
            if count is None:
                stale = list(fds)  # it exited
            elif count and count == rechecked.get(pid, read.get(pid)):
                continue
            else:
                if len(fds) > 1 and not self.turns.whole(pid, turn):
                    first = next(iter(fds))
                    if not self.procfs.stale_fds(pid, dfd, {first: fds[first]}):
                        continue  # one fd is enough to see an exit
                stale = self.procfs.stale_fds(pid, dfd, fds)
                # Apart from the count at the last read: a search still puts it among the changed.
                rechecked[pid] = count
            if stale:
                self.index.drop_fds(pid, stale)
                self._let_go(pid)

    def _resolve(
        self, current: set[int], hint_pids: Iterable[int], sockets: list[Socket], listening: set[int],
        on_progress: Callable[[], None] | None, *, still_listed: StillListed | None,
    ) -> tuple[set[int], set[int]]:
        """Read new and hinted processes, then search the rest for inodes still unexplained; the
        processes read, and the listening inodes found closed meanwhile."""
        new = current - self._known
        hinted = current.intersection(hint_pids)
        if self._tick > 1:  # at the first update everything is new, and nothing is recent
            self.recency.note(new | hinted, self._tick)
        walked: set[int] = set()
        self._read_all(new | hinted, listening, walked, on_progress)  # forked workers, new servers
        missing = listening.difference(self.index.held_inodes(), self._unresolved)
        gone: set[int] = set()
        if missing:
            self.searched = True
            uids = {s.uid for s in sockets if s.inode in missing}
            order = SearchOrder(current - walked, self.recency, uids, self._look)
            missing = self._search(order.likely(), missing, listening, walked, on_progress)
            if missing and still_listed is not None and (listed := still_listed()) is not None:
                # Before reading every other process: a listener whose process exited right after
                # the listing (a short-lived server) is listed no more, and nobody holds it.
                gone = missing.difference(listed)
                missing -= gone
            if missing:
                missing = self._search(order.rest(), missing, listening, walked, on_progress)
            self._unresolved |= missing
        self._known = current
        self._denied &= current
        if self._tick % 10 == 0:
            self.recency.expire(self._tick)
        return walked, gone

    def _search(self, pids: Iterable[int], missing: set[int], listening: set[int], walked: set[int],
                on_progress: Callable[[], None] | None) -> set[int]:
        """Read `pids` in turn until every missing inode is found; what is still missing."""
        for pid in pids:
            if not missing:
                break
            self._read_all((pid,), listening, walked, on_progress)
            missing = missing - self.index.inodes_of(pid)
        return missing

    def _look(self, pid: int) -> tuple[int | None, bool]:
        """Its uid, and whether its fd count changed since it was last read (never read: yes;
        a kernel that does not count: no, or every process would be a likely one)."""
        uid, count = self.procfs.fd_look(pid)
        return uid, bool(count) and count != self._fd_counts.get(pid, -1)

    def _rotate(
        self, current: set[int], listening: set[int], walked: set[int], on_progress: Callable[[], None] | None
    ) -> None:
        """Read the processes whose rotation turn it is (unless read already), and their details.
        Outside a thorough round, a process that holds no listener and has as many fds open as
        when last read is left unread (one stat)."""
        step = [pid for pid in self.rotation.step() if pid in current and pid not in walked]
        if self.procfs.counts_fds and not self.rotation.thorough():
            counts, holds, denied = self._fd_counts, self.index.holds, self._denied
            step = [pid for pid in step if holds(pid) or pid in denied
                    or not (count := self.procfs.fd_look(pid)[1]) or count != counts.get(pid)]
        self._read_all(step, listening, walked, on_progress)
        self._refresh.update(pid for pid in step if self.index.holds(pid))

    def _read_all(
        self, pids: Iterable[int], listening: set[int], walked: set[int],
        on_progress: Callable[[], None] | None,
    ) -> None:
        for pid in pids:
            walked.add(pid)
            self._read(pid, listening)
            if on_progress is not None and len(walked) % _PROGRESS_EVERY == 0:
                on_progress()

    def _read(self, pid: int, listening: set[int]) -> None:
        """Read all of `pid`'s fds and record the listening ones."""
        dfd = kept = self.dirs.get(pid)
        try:
            if dfd < 0:
                dfd = self.dirs.open(pid)
            found, links = self.procfs.socket_fds_at(dfd, listening)
        except (ProcessGone, AccessDenied) as exc:
            if dfd >= 0 and kept < 0:
                os.close(dfd)
            if isinstance(exc, ProcessGone):
                self._forget(pid)
            else:  # read again at each rotation step: its owner may change
                self._denied.add(pid)
                self.rotation.weigh(pid, 0)
                self.index.forget(pid)
                self._let_go(pid)
            return
        self._denied.discard(pid)
        self.rotation.weigh(pid, links)
        self._fd_counts[pid] = links
        self._rechecked.pop(pid, None)
        if kept < 0:
            if found:
                self.dirs.keep(pid, dfd)
            else:
                os.close(dfd)
        opened = self.index.set_fds(pid, {_fd_name(fd): inode for fd, inode in found.items()})
        self._let_go(pid)
        if opened:
            self._unresolved -= opened
            if self._tick > 1:
                self.recency.note((pid,), self._tick)

    def _let_go(self, pid: int) -> None:
        """Drop what is kept for `pid` once it holds no listener."""
        if not self.index.holds(pid):
            self.dirs.close(pid)
            self._processes.pop(pid, None)
            self._refresh.discard(pid)
            self._rechecked.pop(pid, None)

    def _forget(self, pid: int) -> None:
        self.index.forget(pid)
        self._fd_counts.pop(pid, None)
        self._rechecked.pop(pid, None)
        self._let_go(pid)
        self.recency.forget(pid)
        self.rotation.forget(pid)
        self._denied.discard(pid)

    def _finish(self, sockets: list[Socket], complete: bool, same: bool,
                netns_of: Mapping[int, NetNs] | None, host: NetNs | None) -> Snapshot:
        """Read the details of new holders and of those to refresh; build the snapshot."""
        stale = self._refresh | (self.index.pids() - self._processes.keys())
        self._refresh = set()
        for pid in stale:
            info = self.procfs.process(pid)
            if info is not None and info != self._processes.get(pid):
                self._processes[pid] = info
                self.index.touch(self.index.inodes_of(pid))
        self._snapshot = rebuild_snapshot(
            self._snapshot, sockets, changed=self.index.take_dirty(), holders_of=self.index.holders_of,
            processes=self._processes, complete=complete, denied_pids=len(self._denied), same_sockets=same,
            netns_of=netns_of, host=host,
        )
        return self._snapshot
