"""Which processes hold which listening sockets: the daemon's memory between scans. Pure.

What the owner tracker read from /proc goes in (a process's listening fds);
what it needs comes out (the holders of an inode, the inodes whose holders
changed). Socket inodes are unique on the host, so one index serves every
network namespace: a socket's namespace is a property of the socket, not of
the index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_NO_FDS: Mapping[bytes, int] = {}


class HolderIndex:
    """pid -> {fd name: socket inode} for every process holding a listening socket, and back.

    fd names are bytes, as the tracker reads them from /proc/<pid>/fd. The
    same socket may sit on several fds of one process (dup) and in several
    processes (fork, SCM_RIGHTS).
    """

    __slots__ = ("_dirty", "_fds", "_held")

    def __init__(self) -> None:
        self._fds: dict[int, dict[bytes, int]] = {}
        # inode -> its holder's pid, or a tuple of them when there are several (memory: most
        # sockets have one holder, and a set would cost 200 bytes each)
        self._held: dict[int, int | tuple[int, ...]] = {}
        self._dirty: set[int] = set()  # inodes whose holders changed since take_dirty()

    # -- questions -----------------------------------------------------------------

    def pids(self) -> Iterable[int]:
        """Every process that holds a listening socket."""
        return self._fds.keys()

    def holds(self, pid: int) -> bool:
        return pid in self._fds

    def fds(self, pid: int) -> Mapping[bytes, int]:
        """The listening fds of `pid` (empty when it holds none)."""
        return self._fds.get(pid, _NO_FDS)

    def holders_of(self, inode: int) -> tuple[int, ...]:
        held = self._held.get(inode, ())
        return (held,) if isinstance(held, int) else held

    def inodes_of(self, pid: int) -> set[int]:
        return set(self.fds(pid).values())

    def held_inodes(self) -> Iterable[int]:
        return self._held.keys()

    # -- what was read ---------------------------------------------------------------

    def set_fds(self, pid: int, fds: dict[bytes, int]) -> set[int]:
        """`pid` holds exactly these listening fds now; return the inodes it did not hold before."""
        before = self.inodes_of(pid)
        if fds:
            self._fds[pid] = fds
        else:
            self._fds.pop(pid, None)
        after = set(fds.values())
        for inode in before - after:
            self._unhold(inode, pid)
        for inode in after - before:
            held = self._held.get(inode)
            self._held[inode] = pid if held is None else (*self.holders_of(inode), pid)
            self._dirty.add(inode)
        return after - before

    def drop_fds(self, pid: int, names: Iterable[bytes]) -> None:
        """These fds of `pid` no longer hold what they held (closed, replaced, or it exited)."""
        fds = self._fds.get(pid)
        if fds is None:
            return
        for name in names:
            inode = fds.pop(name)
            if inode not in fds.values():  # the same socket may sit on two fds
                self._unhold(inode, pid)
        if not fds:
            del self._fds[pid]

    def forget(self, pid: int) -> None:
        """`pid` holds nothing (it exited, or may not be read)."""
        self.drop_fds(pid, list(self.fds(pid)))

    def keep_listening(self, listening: set[int]) -> None:
        """Forget the fds of sockets that no longer listen."""
        if self._held.keys() <= listening:
            return
        for pid, fds in list(self._fds.items()):
            gone = [name for name, inode in fds.items() if inode not in listening]
            if gone:
                self.drop_fds(pid, gone)

    # -- what changed ------------------------------------------------------------------

    def touch(self, inodes: Iterable[int]) -> None:
        """These inodes must be built anew (their holders' details changed)."""
        self._dirty.update(inodes)

    def take_dirty(self) -> set[int]:
        """The inodes whose holders changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _unhold(self, inode: int, pid: int) -> None:
        rest = tuple(p for p in self.holders_of(inode) if p != pid)
        if len(rest) > 1:
            self._held[inode] = rest
        elif rest:
            self._held[inode] = rest[0]
        else:
            self._held.pop(inode, None)
        self._dirty.add(inode)
