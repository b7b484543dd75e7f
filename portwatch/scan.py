"""Taking snapshots: list the listening sockets, then find every process holding each.

Two ways to find holders:
- `full_scan` walks every process's fds once (portwatch.walk); the one-shot
  CLI views use it because they must name every owner of every socket.
- `OwnerTracker` is the daemon's: it remembers which (pid, fd) held which
  listening inode and re-checks those (one readlink each, through a
  directory fd kept open per holder: every fd of a holder once per
  RECHECK_TICKS updates, and at the others one fd, enough to see an exit),
  reads the fds of processes that are new since the last tick, and
  searches the others only when an inode appears that none of that
  explains: recently started processes first, then those of the socket's
  uid, stopping as soon as every new inode is found. Inodes no process
  holds are remembered, so they do not cause a search every tick. A slow
  rotation over all processes (each once per 60 updates) catches a socket
  handed to a process that already existed (SCM_RIGHTS) while its sender
  keeps it too, and refreshes cached process details (a holder renaming
  itself).
"""

from __future__ import annotations

import errno
import operator
import os
import resource
import time
from collections.abc import Callable, Iterable
from enum import StrEnum

from portwatch import sockdiag
from portwatch.model import Listener, Process, Proto, Snapshot, Socket
from portwatch.proc import ProcFS, TableRead
from portwatch.procfd import AccessDenied, ProcessGone
from portwatch.snapshot import build_snapshot
from portwatch.walk import Walk


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
) -> tuple[Snapshot, list[str]]:
    """Every listening socket and every process holding it, and the socket tables that could
    not be read (each as "what: why"; the snapshot is then incomplete).

    `walk`: one begun earlier over procfs.root (the `portwatch` command starts
    it before its own start-up); else one is made here with `workers`.
    """
    if walk is None:
        walk = Walk(procfs.root, workers=workers)
    try:
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
    )
    return snap, table.errors


# -- the daemon's incremental resolution ---------------------------------------


class TickStats:
    """What one tracker update did and cost (seconds of wall time), for the benchmark and debug logs."""

    __slots__ = (
        "full_walk", "links_read", "listed_pids", "rebuilt", "recheck_s", "rechecked_fds", "rotate_s",
        "search_s", "snapshot_s", "total_s", "walked_pids",
    )

    def __init__(self) -> None:
        self.rechecked_fds = 0  # holder fds re-checked with one readlink each
        self.walked_pids = 0  # processes whose fd directory was read whole
        self.links_read = 0  # fd links read, re-checks included: the syscalls that cost
        self.full_walk = False  # an inode nothing explained made us search old processes
        self.listed_pids = False  # /proc was listed (something was forked since the last tick)
        self.rebuilt = 0  # listeners built anew (the rest were carried over unchanged)
        self.recheck_s = 0.0
        self.search_s = 0.0  # new and hinted processes, and the search for unexplained inodes
        self.rotate_s = 0.0
        self.snapshot_s = 0.0
        self.total_s = 0.0

    def __repr__(self) -> str:
        return "TickStats(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


class _Holder:
    """The listening sockets one process holds, as fd name -> socket inode.

    Inodes rather than the link text a re-check compares readlink's answer
    with: formatting `socket:[N]` at each re-check costs less than keeping
    that text for every holder fd (a megabyte on a large host).
    """

    __slots__ = ("dfd", "links")

    def __init__(self, dfd: int) -> None:
        self.dfd = dfd  # a directory fd on /proc/<pid>/fd, or -1 (re-check by path)
        self.links: dict[bytes, int] = {}

    def inodes(self) -> set[int]:
        return set(self.links.values())


_FD_NAMES: dict[int, bytes] = {}


def _fd_name(fd: int) -> bytes:
    """Its name in /proc/<pid>/fd, one object shared by all holders (listeners sit on the same few fds)."""
    name = _FD_NAMES.get(fd)
    if name is None:
        name = b"%d" % fd
        if len(_FD_NAMES) < 65536:
            _FD_NAMES[fd] = name
    return name


# Processes first seen within this many ticks are searched first for a new inode.
RECENT_TICKS = 120
# Every fd of a holder is re-checked once per this many ticks, one of them at the others: a
# holder's exit is still seen at the next tick, and an fd closed by a running holder (an owner
# set shrinking, rare) within 4; the re-check, over half of a quiet tick, costs a quarter as much.
RECHECK_TICKS = 4
# Leave this share of RLIMIT_NOFILE (at least 256 fds) to the rest of the daemon.
_FD_RESERVE = 4
_PROGRESS_EVERY = 256  # processes walked between two on_progress calls
_PID_COST = 8  # a process costs about as much as this many fds to open, list and close


class OwnerTracker:
    """Incremental owner resolution for the daemon (see the module docstring).

    Keeps one directory fd open per holding process (within RLIMIT_NOFILE:
    raise the soft limit to serve big hosts); `close()` releases them.
    """

    # 60: at 30 the rotation was a third of a quiet tick's cost, for changes that are rare
    # (a handover while the sender keeps the socket is the only owner change left to it).
    def __init__(self, procfs: ProcFS, *, rotation_ticks: int = 60) -> None:
        self.procfs = procfs
        self.rotation_ticks = max(1, rotation_ticks)
        self._holders: dict[int, _Holder] = {}  # pid -> its listening fds
        # inode -> its holder's pid, or a tuple of them when there are several (memory: most
        # sockets have one holder, and a set would cost 200 bytes each)
        self._held: dict[int, int | tuple[int, ...]] = {}
        self._known_pids: set[int] = set()
        self._last_pid: int | None = None  # /proc/loadavg's, at the last listing of /proc
        # pid -> the last tick it started, was hinted, or opened a listener: where new listeners appear
        self._recent: dict[int, int] = {}
        self._unresolved: set[int] = set()  # inodes a search found no holder for
        self._processes: dict[int, Process] = {}  # details of holders
        self._refresh: set[int] = set()  # holders whose details must be read again
        self._denied: set[int] = set()
        self._slots: list[set[int]] = [set() for _ in range(self.rotation_ticks)]  # the rotation
        self._slot_of: dict[int, int] = {}
        self._weight: dict[int, int] = {}  # pid -> what reading it cost last time (fds + a bit)
        self._load: list[int] = [0] * self.rotation_ticks  # the sum of the weights in each slot
        self._next_slot = 0
        self._dirty: set[int] = set()  # inodes whose Listener must be built anew
        self._vanished: set[int] = set()  # listed this tick, but closed before their holder was found
        self._snapshot: Snapshot | None = None
        self._last_sockets: list[Socket] = []
        self._last_listening: set[int] = set()
        self._tick = 0
        self._rechecks = 0  # regular updates only: early ones skip the re-check, so they must not skip turns
        self._dir_fds = 0
        self._dir_fd_cap: int | None = None  # lowered once the process ran out of fds
        self.last = TickStats()

    # -- public --------------------------------------------------------------

    def forget_processes(self, pids: Iterable[int]) -> None:
        """Read these processes' details again (after exec) at the next update."""
        for pid in pids:
            holder = self._holders.get(pid)
            if holder is not None:
                self._refresh.add(pid)
                self._dirty.update(holder.inodes())

    def close(self) -> None:
        """Release the kept directory fds. The tracker can still be used (it reopens them)."""
        for holder in self._holders.values():
            self._close_dir(holder)

    def __enter__(self) -> OwnerTracker:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def update(
        self,
        sockets: list[Socket],
        *,
        complete: bool,
        hint_pids: Iterable[int] = (),
        on_progress: Callable[[], None] | None = None,
        relist: Callable[[], Iterable[int]] | None = None,
        early: bool = False,
    ) -> Snapshot:
        """Resolve the holders of `sockets` (this tick's listing) and return the snapshot.

        `hint_pids`: processes to read whole now (the proc connector's forks
        and execs). `on_progress` is called every few hundred processes of a
        long walk (the watchdog). `relist`, when given, lists the listening
        inodes again; it is called before searching old processes for an
        inode, so a listener that closed since `sockets` were listed (a
        short-lived process that exited) does not cost a walk of every
        process. `early=True` is for the extra updates run while processes
        start, to catch their listeners: only the hinted processes are read,
        and the re-check of known holders, the listing of /proc and the
        rotation step wait for the next regular update (so early updates stay
        cheap on a large host, and the rotation keeps the regular pace).
        """
        clock = time.perf_counter
        start = clock()
        stats = TickStats()
        links_before = self.procfs.links_read
        self._tick += 1
        # sock_diag hands back the very Socket objects of the last listing when nothing changed:
        # then the set of inodes, the check for closed listeners and the snapshot are the last ones.
        last = self._last_sockets
        same = len(sockets) == len(last) and all(map(operator.is_, sockets, last))
        listening = self._last_listening if same else {s.inode for s in sockets if s.inode}
        self._last_sockets, self._last_listening = list(sockets), listening  # a copy: callers may reuse lists
        if not same:
            self._drop_closed(listening)
        if not early:
            self._recheck(stats)
        t_recheck = clock()

        if early:  # the hinted pids are the new processes; exits are noticed by the next regular update
            current = self._known_pids.union(hint_pids)
        else:
            last_pid = self.procfs.last_pid()
            if last_pid is not None and last_pid == self._last_pid:
                # No pid was given out since the last listing, so there is no new process (a
                # wrap back to the same pid within one interval would take millions of forks).
                # Exits need no listing: a holder's re-check fails, others are forgotten when
                # the rotation or the next listing meets them.
                current = self._known_pids
            else:
                current = set(self.procfs.pids())
                stats.listed_pids = True
                for pid in self._known_pids - current:
                    self._forget_pid(pid)
            self._last_pid = last_pid
        new = current - self._known_pids
        hinted = current.intersection(hint_pids)
        if self._tick > 1:  # at the first update everything is new, and nothing is recent
            for pid in new | hinted:
                self._recent[pid] = self._tick
        walked: set[int] = set()
        # New processes first: forked workers inherit listeners, new servers open them.
        self._walk(new | hinted, listening, walked, stats, on_progress)
        stats.full_walk = self._tick == 1
        missing = listening - self._held.keys() - self._unresolved
        if missing:
            stats.full_walk = True
            self._search(
                missing=missing, sockets=sockets, candidates=current - walked, listening=listening,
                walked=walked, stats=stats, on_progress=on_progress, relist=relist,
            )
        self._unresolved &= listening
        t_search = clock()

        if not early:
            self._rotate(current, walked, listening, stats, on_progress)
        self._known_pids = current
        self._denied &= current
        if self._recent and self._tick % 10 == 0:
            oldest = self._tick - RECENT_TICKS
            self._recent = {p: t for p, t in self._recent.items() if t > oldest}
        t_rotate = clock()

        if self._vanished:
            sockets = [s for s in sockets if s.inode not in self._vanished]
            self._vanished.clear()
            same = False
        snap = self._build(sockets, complete, stats, same=same)
        end = clock()
        stats.links_read = self.procfs.links_read - links_before
        stats.recheck_s = t_recheck - start
        stats.search_s = t_search - t_recheck
        stats.rotate_s = t_rotate - t_search
        stats.snapshot_s = end - t_rotate
        stats.total_s = end - start
        self.last = stats
        return snap

    # -- re-checking what is known ---------------------------------------------

    def _drop_closed(self, listening: set[int]) -> None:
        """Forget the fds of listeners that are no longer listed."""
        if not self._held.keys() <= listening:
            for pid, holder in list(self._holders.items()):
                gone = [name for name, inode in holder.links.items() if inode not in listening]
                if gone:
                    self._drop_fds(pid, holder, gone)

    def _recheck(self, stats: TickStats) -> None:
        """Drop the holder fds that changed (closed, exited, replaced): see RECHECK_TICKS.

        One fd is enough to see an exit: the directory fd is bound to the
        process, so every readlink through it fails once the process is gone.
        """
        stale_fds = self.procfs.stale_fds
        self._rechecks += 1
        turn = self._rechecks % RECHECK_TICKS
        for pid, holder in list(self._holders.items()):
            links = holder.links
            if pid % RECHECK_TICKS != turn and len(links) > 1:
                first = next(iter(links))
                links = {first: links[first]}
            stats.rechecked_fds += len(links)
            stale = stale_fds(pid, holder.dfd, links)
            if stale and links is not holder.links:  # gone, or that fd changed: look at every fd
                stale = stale_fds(pid, holder.dfd, holder.links)
                stats.rechecked_fds += len(holder.links)
            if stale:
                self._drop_fds(pid, holder, stale)

    def _drop_fds(self, pid: int, holder: _Holder, names: list[bytes]) -> None:
        for name in names:
            inode = holder.links.pop(name)
            if inode not in holder.links.values():  # the same socket may sit on two fds
                self._unhold(inode, pid)
        if not holder.links:
            self._drop_holder(pid)

    def _unhold(self, inode: int, pid: int) -> None:
        if inode in self._held:
            rest = tuple(p for p in self._holders_of(inode) if p != pid)
            if len(rest) > 1:
                self._held[inode] = rest
            elif rest:
                self._held[inode] = rest[0]
            else:
                del self._held[inode]
        self._dirty.add(inode)

    def _drop_holder(self, pid: int) -> None:
        holder = self._holders.pop(pid, None)
        if holder is not None:
            for inode in holder.inodes():
                self._unhold(inode, pid)
            self._close_dir(holder)
        self._processes.pop(pid, None)
        self._refresh.discard(pid)

    def _forget_pid(self, pid: int) -> None:
        self._drop_holder(pid)
        self._recent.pop(pid, None)
        slot = self._slot_of.pop(pid, None)
        if slot is not None:
            self._slots[slot].discard(pid)
            self._load[slot] -= self._weight.pop(pid)
        self._denied.discard(pid)

    # -- reading processes ---------------------------------------------------

    def _walk(
        self,
        pids: Iterable[int],
        listening: set[int],
        walked: set[int],
        stats: TickStats,
        on_progress: Callable[[], None] | None,
    ) -> None:
        for pid in pids:
            self._walk_one(pid, listening, walked, stats)
            if on_progress is not None and stats.walked_pids % _PROGRESS_EVERY == 0:
                on_progress()

    def _walk_one(self, pid: int, listening: set[int], walked: set[int], stats: TickStats) -> None:
        """Read all of `pid`'s fds and record the listening ones."""
        walked.add(pid)
        stats.walked_pids += 1
        links_before = self.procfs.links_read
        holder = self._holders.get(pid)
        dfd = holder.dfd if holder is not None else -1
        opened = dfd < 0
        try:
            if opened:
                dfd = self._open_dir(pid)
            fds = self.procfs.socket_fds_at(dfd, listening)
        except ProcessGone:
            if opened and dfd >= 0:
                os.close(dfd)
            self._forget_pid(pid)
            return
        except AccessDenied:
            if opened and dfd >= 0:
                os.close(dfd)
            self._denied.add(pid)
            self._weigh(pid, 0)  # tried again at each rotation: its owner may change
            self._drop_holder(pid)
            return
        self._denied.discard(pid)
        self._weigh(pid, self.procfs.links_read - links_before)
        mine = {_fd_name(fd): inode for fd, inode in fds.items()}
        if not mine:
            if opened:
                os.close(dfd)
            self._drop_holder(pid)
            return
        if holder is None:
            holder = self._holders[pid] = _Holder(-1)
        if opened:
            if self._dir_fds < self._dir_fd_budget():
                holder.dfd = dfd
                self._dir_fds += 1
            else:
                os.close(dfd)
        if mine != holder.links:
            before = holder.inodes()
            holder.links = mine
            after = set(mine.values())
            for inode in before - after:
                self._unhold(inode, pid)
            for inode in after - before:
                held = self._held.get(inode)
                self._held[inode] = pid if held is None else (*self._holders_of(inode), pid)
                self._unresolved.discard(inode)
                self._dirty.add(inode)
            if after - before and self._tick > 1:
                self._recent[pid] = self._tick

    def _search(
        self,
        *,
        missing: set[int],
        sockets: list[Socket],
        candidates: set[int],
        listening: set[int],
        walked: set[int],
        stats: TickStats,
        on_progress: Callable[[], None] | None,
        relist: Callable[[], Iterable[int]] | None,
    ) -> None:
        """Walk old processes until every inode in `missing` is found, likeliest first.

        Pid numbers wrap, so they say nothing about age; what this tracker saw
        does. First the processes it saw start, exec or open a listener
        lately (newest first: a server that opened one port often opens
        more), then those running as the socket's uid (the kernel records the
        creator's uid on the socket), then everyone else. Whatever is still
        missing after all of them has no visible holder.
        """

        def visit(pid: int) -> bool:
            self._walk_one(pid, listening, walked, stats)
            if on_progress is not None and stats.walked_pids % _PROGRESS_EVERY == 0:
                on_progress()
            missing.difference_update(self._inodes_of(pid))
            return not missing

        seen = self._recent
        recent = sorted((p for p in candidates if p in seen), key=seen.__getitem__, reverse=True)
        for pid in recent:
            if visit(pid):
                return
        if relist is not None:
            # Those closed since the listing need no search, and are no longer listeners.
            try:
                vanished = missing.difference(relist())
            except Exception:  # a failed listing proves nothing closed: search for all of them
                vanished = set()
            self._vanished |= vanished
            missing -= vanished
            if not missing:
                return
        uids = {s.uid for s in sockets if s.inode in missing}
        later: list[int] = []
        for pid in candidates.difference(recent):
            if self.procfs.owner_uid(pid) not in uids:
                later.append(pid)
            elif visit(pid):
                return
        for pid in later:
            if visit(pid):
                return
        self._unresolved |= missing

    def _rotate(
        self,
        current: set[int],
        walked: set[int],
        listening: set[int],
        stats: TickStats,
        on_progress: Callable[[], None] | None,
    ) -> None:
        """Walk the next slot's processes (those not walked this tick), and refresh their details.

        Every process has a slot, so each is read once every rotation_ticks
        rotation steps. A new process goes to the slot with the least work
        (fds read at the last visit): slots by pid number would put
        processes started together, often alike (a pool of workers with
        thousands of connections each), in one tick.
        """
        slot = self._next_slot
        self._next_slot = (slot + 1) % self.rotation_ticks
        todo = [pid for pid in self._slots[slot] if pid in current and pid not in walked]
        self._walk(todo, listening, walked, stats, on_progress)
        self._refresh.update(pid for pid in todo if pid in self._holders)

    def _weigh(self, pid: int, links: int) -> None:
        """Record what reading `pid` cost, giving it a rotation slot when it has none."""
        cost = links + _PID_COST
        slot = self._slot_of.get(pid)
        if slot is None:
            slot = min(range(self.rotation_ticks), key=self._load.__getitem__)
            self._slot_of[pid] = slot
            self._slots[slot].add(pid)
            self._load[slot] += cost
        else:
            self._load[slot] += cost - self._weight[pid]
        self._weight[pid] = cost

    def _holders_of(self, inode: int) -> tuple[int, ...]:
        held = self._held.get(inode, ())
        return (held,) if isinstance(held, int) else held

    def _inodes_of(self, pid: int) -> set[int]:
        holder = self._holders.get(pid)
        return holder.inodes() if holder is not None else set()

    # -- directory fds -----------------------------------------------------------

    def _open_dir(self, pid: int) -> int:
        try:
            return self.procfs.open_fd_dir(pid)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._dir_fds:
                raise
        # Out of fds: give the kept ones back and keep fewer from now on.
        self._dir_fd_cap = self._dir_fds // 2
        self.close()
        return self.procfs.open_fd_dir(pid)

    def _close_dir(self, holder: _Holder) -> None:
        if holder.dfd >= 0:
            os.close(holder.dfd)
            holder.dfd = -1
            self._dir_fds -= 1

    def _dir_fd_budget(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        budget = max(0, soft - max(256, soft // _FD_RESERVE))
        return budget if self._dir_fd_cap is None else min(budget, self._dir_fd_cap)

    # -- the snapshot ----------------------------------------------------------------

    def _build(self, sockets: list[Socket], complete: bool, stats: TickStats, *, same: bool) -> Snapshot:
        """The snapshot, carrying over every Listener that did not change (and the Snapshot itself).

        `same`: `sockets` are the very objects of the last update, in order.
        """
        for pid in self._refresh:
            info = self.procfs.process(pid)
            if info is not None and info != self._processes.get(pid):
                self._processes[pid] = info
                self._dirty.update(self._inodes_of(pid))
        self._refresh.clear()
        for pid in self._holders.keys() - self._processes.keys():
            info = self.procfs.process(pid)
            if info is not None:
                self._processes[pid] = info
                self._dirty.update(self._inodes_of(pid))

        previous = self._snapshot
        denied = len(self._denied)
        if (same and not self._dirty and previous is not None and previous.complete == complete
                and previous.denied_pids == denied):
            return previous
        dirty, self._dirty = self._dirty, set()
        if previous is None or previous.complete != complete or previous.denied_pids != denied:
            old: dict[int, Listener] = {}
        else:
            old = previous.listeners
        listeners: dict[int, Listener | None] = {}
        rebuild: list[Socket] = []
        for sock in sockets:
            inode = sock.inode
            before = old.get(inode)
            if before is not None and inode not in dirty and (before.socket is sock or before.socket == sock):
                listeners[inode] = before
            else:
                listeners[inode] = None
                rebuild.append(sock)
        stats.rebuilt = len(rebuild)
        if not rebuild and previous is not None and len(listeners) == len(old):
            return previous  # nothing changed: the very same snapshot
        if rebuild:
            holders = {s.inode: self._holders_of(s.inode) for s in rebuild}
            fresh = build_snapshot(rebuild, holders, self._processes, complete=complete, denied_pids=denied)
            for inode, listener in fresh.listeners.items():
                listeners[inode] = listener
        snap = Snapshot(
            {inode: listener for inode, listener in listeners.items() if listener is not None},
            complete=complete,
            denied_pids=denied,
        )
        self._snapshot = snap
        return snap
