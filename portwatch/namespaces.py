"""The listening sockets of every network namespace, and which namespace each one is in.

Namespaces are found from processes (the inode of /proc/<pid>/ns/net; those
in portwatch's own are not remembered) and from the files `ip netns` binds
under /run/netns. Each other namespace is read one of two ways: through a
sock_diag socket opened inside it and kept, when this process may enter it
(setns needs CAP_SYS_ADMIN: root outside the hardened unit); else through
/proc/<pid>/net/{tcp,tcp6,udp,udp6} of a process inside it, which needs no
privilege beyond reading /proc/<pid> and gives the same rows. Either costs
the host's size, however few sockets the namespace has: a dump walks the
host's whole listening hash, the TCP files its whole connection hash
(milliseconds each). So a namespace is read again only when its count of
sockets in use (/proc/<pid>/net/sockstat{,6}, tens of microseconds) changed,
when asked (`force`: the daemon saw one of its listeners open or change
holders, so a holder that closed one listener and opened another in the same
interval is read within the holder re-check's 4 ticks), and at least every
REFRESH_LISTINGS listings (one a tick, more while processes start). Through
/proc only the tables whose protocol's count changed are read. A namespace
with no process inside (`ip netns` keeps it) is dumped at every listing, or
cannot be read at all without setns.
A namespace is gone when no process is left in it (none known, and none of
its listeners' holders) and no file binds it: its listeners are then closed
with it. One that cannot be read (no process inside, setns refused) keeps
the listeners it had while their holders hold them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple, TypeVar

from portwatch import sockdiag
from portwatch.model import Container, NetNs, Proto, Socket
from portwatch.netns import container_from_cgroup, docker_name, make_netns, podman_names
from portwatch.proc import ProcFS, TableRead
from portwatch.procfd import ProcessGone

REFRESH_LISTINGS = 60
BOUND_DIRS = ("/run/netns", "/var/run/netns")  # where `ip netns add` bind-mounts its namespaces
_ListHost = Callable[[tuple[Proto, ...], tuple[int, ...]], TableRead]
_HoldersOf = Callable[[int], Iterable[int]]
_T = TypeVar("_T")


class Listing(NamedTuple):
    """One listing of every namespace's sockets."""

    table: TableRead  # every socket, the host's first; `complete` and `errors` cover all
    netns_of: dict[int, NetNs]  # inode -> namespace, for each socket outside the host's
    gone: frozenset[int]  # namespaces that disappeared since the last listing
    unread: list[str]  # namespaces that could not be read (no process inside, setns refused)
    renamed: frozenset[int]  # namespaces whose name changed (an `ip netns` name given or taken)


class _Space:
    """What is kept about one namespace other than the host's."""

    __slots__ = ("asked", "bound", "counts", "dumper", "members", "netns", "read_at", "sockets", "tables")

    def __init__(self, netns: NetNs, bound: str | None) -> None:
        self.netns = netns
        self.bound = bound  # the path `ip netns` binds it at
        self.members: set[int] = set()
        self.dumper: sockdiag.Dumper | None = None
        self.counts: dict[str, int] = {}
        self.tables: dict[tuple[Proto, int], list[Socket]] = {}
        self.sockets: list[Socket] = []  # of the last listing
        self.read_at = 0  # the listing its tables were last all read at
        self.asked: tuple[tuple[Proto, ...], tuple[int, ...]] | None = None  # what they were read for


class Namespaces:
    """Every network namespace's listening sockets (see the module docstring).

    `host`: this process's own namespace, listed by `list_host` (a
    scan.SocketLister's `list`). `enter`: whether to try setns; None: try
    once, and remember the answer.
    """

    def __init__(self, procfs: ProcFS, list_host: _ListHost, host: NetNs, *, enter: bool | None = None,
                 bound_dirs: Iterable[str] = BOUND_DIRS) -> None:
        self.procfs = procfs
        self.list_host = list_host
        self.host = host
        self.enter = enter
        self.enter_problem: str | None = None  # why setns was refused, once it was
        self.unread: list[str] = []  # the last listing's (see Listing)
        self._bound_dirs = tuple(bound_dirs)
        self._bound_stamp: tuple[float, ...] | None = None
        self._bound: dict[int, tuple[str, str]] = {}
        self._nsfs = _device(f"{procfs.root}/self/ns/net")
        self._spaces: dict[int, _Space] = {}
        self._pid_ns: dict[int, int] = {}  # pid -> namespace, for pids outside the host's
        self._gone: set[int] = set()  # found gone between listings (an inode number reused)
        self._renamed: set[int] = set()
        self._names = ContainerNames()
        self._listings = 0

    @property
    def others(self) -> list[NetNs]:
        return [space.netns for space in self._spaces.values()]

    def members(self, netns_ids: Iterable[int]) -> set[int]:
        return {pid for i in netns_ids if (s := self._spaces.get(i)) is not None for pid in s.members}

    def look(self, pids: Iterable[int]) -> set[int]:
        """Find which namespace each pid is in; the namespaces seen for the first time (or with
        a process in them for the first time: an `ip netns` one could not be read before)."""
        new: set[int] = set()
        for pid in pids:
            inode = netns_inode(self.procfs.root, pid)
            if inode is None:
                continue  # exited, or hidden from us: seen again if it matters
            before = self._pid_ns.get(pid)
            if inode == before:
                continue
            if before is not None:
                self._leave(pid, before)
            if inode == self.host.id:
                continue
            space = self._spaces.get(inode)
            if space is not None and space.bound is None and self._member(space) is None:
                # Every process of the namespace we knew is gone: this is a new namespace that
                # was given the same inode number (nsfs reuses them at once).
                self._gone.add(inode)
                self._drop(inode)
                space = None
            if space is None:
                space = self._spaces[inode] = self._make(inode, pid)
            if not space.members:
                new.add(inode)
            space.members.add(pid)
            self._pid_ns[pid] = inode
        return new

    def listing_all(self, protocols: Iterable[Proto], families: Iterable[int]) -> Listing:
        """One listing after looking at every process: the one-shot views'."""
        self.look(self.procfs.pids())
        return self.listing(protocols, families)

    def forget(self, pids: Iterable[int]) -> None:
        """These processes exited."""
        for pid in pids:
            inode = self._pid_ns.pop(pid, None)
            if inode is not None and (space := self._spaces.get(inode)) is not None:
                space.members.discard(pid)

    def listing(self, protocols: Iterable[Proto], families: Iterable[int], *,
                force: Collection[int] = (), holders_of: _HoldersOf | None = None) -> Listing:
        """The host's sockets (as `list_host` lists them), then every other namespace's.
        `force`: namespaces whose tables must be read whole now. `holders_of`: the processes
        known to hold a socket (the daemon's tracker), to find a namespace's processes that
        entered it unseen, and to keep what a namespace that cannot be read still holds."""
        self._listings += 1
        protocols, families = tuple(protocols), tuple(families)
        self._check_bound()
        host = self.list_host(protocols, families)
        # Alone, the host's listing as it came (an unchanged one is the same object: see
        # sockdiag.Dumper.list); with other namespaces, a copy to add theirs to.
        table = TableRead(list(host.sockets) if self._spaces else host.sockets, host.complete,
                          list(host.errors))
        netns_of: dict[int, NetNs] = {}
        gone, self._gone = self._gone, set()
        unread: list[str] = []
        for inode, space in list(self._spaces.items()):
            try:
                sockets = self._read(space, protocols, families, force=inode in force, table=table,
                                     holders_of=holders_of)
            except _Gone:
                gone.add(inode)
                self._drop(inode)
                continue
            if sockets is None:
                unread.append(space.netns.name)
                held = holders_of or (lambda _inode: ())
                sockets = [s for s in space.sockets if any(held(s.inode))]
            space.sockets = sockets
            for sock in sockets:
                netns_of[sock.inode] = space.netns
            table.sockets.extend(sockets)
        self.unread = unread
        renamed, self._renamed = self._renamed, set()
        return Listing(table, netns_of, frozenset(gone), unread, frozenset(renamed))

    def close(self) -> None:
        for space in self._spaces.values():
            if space.dumper is not None:
                space.dumper.close()
                space.dumper = None

    # -- finding and naming ------------------------------------------------------------

    def _make(self, inode: int, pid: int | None) -> _Space:
        bound = self._bound.get(inode)
        container = None
        if pid is not None:
            try:
                with open(f"{self.procfs.root}/{pid}/cgroup", "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                text = ""
            # Read from the process that was in the namespace, not one that took its pid since.
            if netns_inode(self.procfs.root, pid) == inode:
                container = container_from_cgroup(text)
            if container is not None:
                container = self._names.named(container)
        netns = make_netns(inode, host=False, bound=bound[0] if bound else None, container=container)
        return _Space(netns, bound[1] if bound else None)

    def _leave(self, pid: int, inode: int) -> None:
        del self._pid_ns[pid]
        space = self._spaces.get(inode)
        if space is not None:
            space.members.discard(pid)

    def _check_bound(self) -> None:
        """Read the `ip netns` directories again when one of them changed."""
        stamp = tuple(_mtime(d) for d in self._bound_dirs)
        if stamp == self._bound_stamp:
            return
        self._bound_stamp = stamp
        found = bound_namespaces(self._bound_dirs, device=self._nsfs)
        if found is None:  # a file not bound yet (`ip netns add` creates it, then mounts on it)
            self._bound_stamp = None
            return
        self._bound = found
        for inode, (name, path) in self._bound.items():
            if inode == self.host.id:
                continue
            space = self._spaces.get(inode)
            if space is None:
                self._spaces[inode] = self._make(inode, None)
            elif space.bound != path:
                space.bound = path
                self._rename(space, name)
        for inode, space in self._spaces.items():
            if space.bound is not None and inode not in self._bound:
                space.bound = None
                self._rename(space, None)

    def _rename(self, space: _Space, bound: str | None) -> None:
        netns = space.netns
        space.netns = make_netns(netns.id, host=False, bound=bound, container=netns.container)
        if space.netns != netns:
            self._renamed.add(netns.id)

    def _drop(self, inode: int) -> None:
        space = self._spaces.pop(inode)
        if space.dumper is not None:
            space.dumper.close()
        for pid in space.members:
            self._pid_ns.pop(pid, None)

    # -- reading -------------------------------------------------------------------------

    def _read(self, space: _Space, protocols: tuple[Proto, ...], families: tuple[int, ...], *,
              force: bool, table: TableRead, holders_of: _HoldersOf | None) -> list[Socket] | None:
        """The namespace's sockets; None when it cannot be read. Raises _Gone."""
        tried: set[int] = set()
        while True:
            member = self._member(space, tried) or self._adopt(space, holders_of, tried)
            if member is None and space.bound is None:
                raise _Gone
            try:
                counts = self.procfs.sockets_in_use(member) if member is not None else None
                return self._read_with(space, member, counts, protocols, families, force=force, table=table)
            except ProcessGone:  # it left between the check and the read: another one, if any
                if member is None:
                    raise
                tried.add(member)
                space.members.discard(member)
                self._pid_ns.pop(member, None)

    def _read_with(self, space: _Space, member: int | None, counts: dict[str, int] | None,
                   protocols: tuple[Proto, ...], families: tuple[int, ...], *, force: bool,
                   table: TableRead) -> list[Socket] | None:
        """Read what may have changed (see the module docstring). Raises ProcessGone, having
        changed nothing."""
        asked = (protocols, families)
        whole = (force or space.asked != asked or self._listings - space.read_at >= REFRESH_LISTINGS
                 or counts is None)
        if space.dumper is None and self.enter is not False:
            self._open_dumper(space, member)
        if space.dumper is not None:
            if not whole and counts == space.counts:
                return space.sockets
            try:
                sockets = space.dumper.list(protocols, families)
            except sockdiag.SockDiagUnavailable as exc:
                space.dumper.close()
                space.dumper = None
                if member is None:
                    table.errors.append(f"netns {space.netns.name}: {exc}")
                    table.complete = False
                    return None
            else:
                self._read_whole(space, asked, counts, whole=whole)
                return sockets
        if member is None or counts is None:
            return None
        fresh: dict[tuple[Proto, int], TableRead] = {}
        for proto in protocols:
            for family in families:
                key = (proto, family)
                name = proto.value.upper() + ("6" if family == 6 else "")
                if whole or key not in space.tables or counts.get(name) != space.counts.get(name):
                    fresh[key] = self.procfs.read_sockets((proto,), (family,), pid=member)
        for key, read in fresh.items():
            space.tables[key] = read.sockets
            if not read.complete:
                table.complete = False
                table.errors.extend(f"netns {space.netns.name}: {error}" for error in read.errors)
        self._read_whole(space, asked, counts, whole=whole)
        return [sock for p in protocols for f in families for sock in space.tables[(p, f)]]

    def _read_whole(self, space: _Space, asked: tuple[tuple[Proto, ...], tuple[int, ...]],
                    counts: dict[str, int] | None, *, whole: bool) -> None:
        """Remember what a read was of: the counts it answers to, when it was whole."""
        if whole:
            # Spread the namespaces' whole reads over the period rather than all at one listing.
            first = space.asked is None
            space.read_at = self._listings - (space.netns.id % REFRESH_LISTINGS if first else 0)
        space.asked = asked
        space.counts = counts or {}

    def _member(self, space: _Space, tried: Collection[int] = ()) -> int | None:
        """A process still in the namespace (checked: it may have exited or moved)."""
        for pid in list(space.members):
            if pid not in tried and netns_inode(self.procfs.root, pid) == space.netns.id:
                return pid
            space.members.discard(pid)
            self._pid_ns.pop(pid, None)
        return None

    def _adopt(self, space: _Space, holders_of: _HoldersOf | None, tried: Collection[int]) -> int | None:
        """A holder of one of the namespace's listeners that is in it, though not seen entering."""
        if holders_of is None:
            return None
        candidates = {pid for sock in space.sockets for pid in holders_of(sock.inode)}
        for pid in candidates.difference(tried):
            if netns_inode(self.procfs.root, pid) == space.netns.id:
                space.members.add(pid)
                self._pid_ns[pid] = space.netns.id
                return pid
        return None

    def _open_dumper(self, space: _Space, member: int | None) -> None:
        path = space.bound if member is None else f"{self.procfs.root}/{member}/ns/net"
        if path is None:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if os.fstat(fd).st_ino != space.netns.id:
                return  # the pid was reused, or the file bound anew, since it was looked at
            space.dumper = sockdiag.Dumper.inside(fd)
            self.enter = True
        except sockdiag.SockDiagUnavailable as exc:
            if self.enter is None and isinstance(exc.__cause__, OSError) and exc.__cause__.errno in (
                errno.EPERM, errno.ENOSYS, errno.EACCES,
            ):
                self.enter = False  # not allowed here: never tried again
                self.enter_problem = str(exc)
        finally:
            os.close(fd)


def netns_inode(root: str, pid: int | str) -> int | None:
    """The inode of `pid`'s network namespace; None when it has exited or may not be looked at."""
    try:
        return os.stat(f"{root}/{pid}/ns/net").st_ino
    except OSError:
        return None


def bound_namespaces(dirs: Iterable[str] = BOUND_DIRS, *, device: int | None = None
                     ) -> dict[int, tuple[str, str]] | None:
    """inode -> (name, path) of every namespace `ip netns` keeps (a missing directory is none).
    `device`: nsfs's, which a bound file is on; None when a file is not (yet) bound."""
    found: dict[int, tuple[str, str]] = {}
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = f"{directory}/{name}"
            try:
                st = os.stat(path)
            except OSError:
                continue
            if device is not None and st.st_dev != device:
                return None
            found.setdefault(st.st_ino, (name, path))
    return found


class ContainerNames:
    """Containers' names from their engines' state files, each file read once per change."""

    # The engines' default state locations (rootful).
    PODMAN = "/var/lib/containers/storage/overlay-containers/containers.json"
    DOCKER = "/var/lib/docker/containers/{id}/config.v2.json"

    def __init__(self) -> None:
        self._podman: tuple[float, dict[str, str]] | None = None  # (mtime, id -> name)
        self._docker: dict[str, str | None] = {}

    def named(self, container: Container) -> Container:
        if container.engine in ("nspawn", "lxc"):
            return container._replace(name=container.id)
        name = None
        if container.engine == "podman":
            name = self._podman_name(container.id)
        elif container.engine == "docker":
            name = self._docker_name(container.id)
        return container._replace(name=name)

    def _podman_name(self, ident: str) -> str | None:
        try:
            mtime = os.stat(self.PODMAN).st_mtime
        except OSError:
            return None
        if self._podman is None or self._podman[0] != mtime:
            self._podman = (mtime, _read_json(self.PODMAN, podman_names))
        return self._podman[1].get(ident)

    def _docker_name(self, ident: str) -> str | None:
        if ident not in self._docker:
            if len(self._docker) >= 1024:  # containers come and go: keep the cache bounded
                self._docker.clear()
            self._docker[ident] = _read_json(self.DOCKER.format(id=ident), docker_name)
        return self._docker[ident]


def _read_json(path: str, parse: Callable[[object], _T]) -> _T:
    import json  # noqa: PLC0415 (only when a container is named: the views' start-up does without)

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 24))
    except (OSError, ValueError):
        data = None
    return parse(data)


class _Gone(Exception):
    """The namespace has no process left and nothing binds it."""


def _device(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0
