"""Pure snapshot logic: join sockets with their holders, and diff two snapshots."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple

from portwatch.model import Listener, NetNs, Process, Snapshot, Socket, Unresolved


def build_snapshot(
    sockets: Iterable[Socket],
    holders: Mapping[int, Iterable[int]],
    processes: Mapping[int, Process],
    *,
    complete: bool = True,
    denied_pids: int = 0,
    netns_of: Mapping[int, NetNs] | None = None,
    host: NetNs | None = None,
) -> Snapshot:
    """Join listening sockets with the pids holding each inode.

    Each listener is in the namespace `netns_of` gives for its inode, else in `host`.

    A holder whose details could not be read (it exited in between) is left
    out. A socket with no holder says why: if some process could not be
    read, its owner may be among them (`permission_denied`); otherwise no
    visible process holds it (`no_process`: kernel socket, other pid namespace).
    """
    listeners: dict[int, Listener] = {}
    # One tuple per set of holders, shared by all its sockets: a server holds hundreds.
    owner_sets: dict[tuple[int, ...], tuple[Process, ...]] = {}
    for sock in sockets:
        pids = tuple(sorted(set(holders.get(sock.inode, ()))))
        owners = owner_sets.get(pids)
        if owners is None:
            owners = owner_sets[pids] = tuple(processes[pid] for pid in pids if pid in processes)
        unresolved = None
        if not owners:
            unresolved = Unresolved.PERMISSION_DENIED if denied_pids else Unresolved.NO_PROCESS
        netns = netns_of.get(sock.inode, host) if netns_of else host
        listeners[sock.inode] = Listener(sock, owners, unresolved, netns=netns)
    return Snapshot(listeners, complete=complete, denied_pids=denied_pids)


def rebuild_snapshot(
    previous: Snapshot | None,
    sockets: Sequence[Socket],
    *,
    changed: Collection[int],
    holders_of: Callable[[int], Iterable[int]],
    processes: Mapping[int, Process],
    complete: bool,
    denied_pids: int,
    same_sockets: bool,
    netns_of: Mapping[int, NetNs] | None = None,
    host: NetNs | None = None,
) -> Snapshot:
    """The snapshot of `sockets`, carrying over every Listener of `previous` that did not change.

    `changed`: inodes whose holders, or their holders' details, changed.
    `same_sockets`: `sockets` are those of the listing that made `previous`.
    When nothing changed, `previous` itself is returned: the daemon's diff
    then costs nothing.
    """
    comparable = (
        previous is not None and previous.complete == complete and previous.denied_pids == denied_pids
    )
    if previous is not None and comparable and same_sockets and not changed:
        return previous
    old = previous.listeners if previous is not None and comparable else {}
    listeners: dict[int, Listener | None] = {}
    stale: list[Socket] = []
    for sock in sockets:
        inode = sock.inode
        before = old.get(inode)
        if before is not None and inode not in changed and (before.socket is sock or before.socket == sock):
            listeners[inode] = before
        else:
            listeners[inode] = None
            stale.append(sock)
    if previous is not None and comparable and not stale and len(listeners) == len(old):
        return previous  # the same listeners, every one unchanged
    if stale:
        holders = {s.inode: holders_of(s.inode) for s in stale}
        fresh = build_snapshot(stale, holders, processes, complete=complete, denied_pids=denied_pids,
                               netns_of=netns_of, host=host)
        listeners.update(fresh.listeners)
    return Snapshot(
        {inode: listener for inode, listener in listeners.items() if listener is not None},
        complete=complete,
        denied_pids=denied_pids,
    )


class ChangeKind(StrEnum):
    OPENED = "listener_opened"
    CLOSED = "listener_closed"
    OWNER_CHANGED = "owner_changed"


class Change(NamedTuple):
    kind: ChangeKind
    listener: Listener  # the listener as it is now (as it was, for CLOSED)
    before: Listener | None = None  # for OWNER_CHANGED


def owner_identity(listener: Listener) -> frozenset[tuple[int | str | None, ...]]:
    """What makes two owner sets different: pid, name, executable and uid.

    The command line is left out on purpose: servers such as PostgreSQL
    rewrite it constantly (setproctitle), and that is not a new owner. The
    holders of a socket unit's socket (the manager, the service it started)
    count as the unit: the service starting, restarting or stopping behind
    its socket is not a new owner.
    """
    owners: set[tuple[int | str | None, ...]] = {
        (p.pid, p.comm, p.exe, p.uid) for p in listener.processes if not listener.serves_socket_unit(p)
    }
    if listener.socket_unit is not None:
        owners.add((listener.socket_unit, listener.service_unit))
    return frozenset(owners)


def diff(old: Snapshot, new: Snapshot) -> list[Change]:
    """Changes from `old` to `new`, keyed by socket inode, closings first.

    Closings come first because they happened first: a server restarted
    between two scans closed its old socket before binding the new one. An
    incomplete `new` never closes anything: a table that could not be read is
    not evidence that its sockets are gone. A socket that moved from
    unresolved to resolved (or back) is an owner change.
    """
    if old is new:
        return []  # the daemon's tracker hands back the same snapshot when nothing changed
    changes: list[Change] = []
    if new.complete:
        changes.extend(
            Change(ChangeKind.CLOSED, listener)
            for inode, listener in old.listeners.items()
            if inode not in new.listeners
        )
    for inode, listener in new.listeners.items():
        before = old.listeners.get(inode)
        if before is None:
            changes.append(Change(ChangeKind.OPENED, listener))
        elif before is not listener and owner_identity(before) != owner_identity(listener):
            changes.append(Change(ChangeKind.OWNER_CHANGED, listener, before))
    return changes


def carry_forward(old: Snapshot, new: Snapshot) -> Snapshot:
    """The snapshot to keep after `new`: an incomplete scan keeps what it could not see."""
    if new.complete:
        return new
    merged = dict(old.listeners)
    merged.update(new.listeners)
    return Snapshot(merged, complete=False, denied_pids=new.denied_pids)
