"""Socket activation: which `.socket` unit a listener held by the service manager belongs to.

Pure. systemd binds a socket unit's listen addresses itself and hands the
sockets to the service it starts, so the kernel shows the manager (PID 1, or
a user's `systemd --user`) as a holder. What the manager holds on behalf of
which unit only the manager can say (its D-Bus API, `portwatch.sdbus`); this
module matches its answer to the listeners, keeps the answers per socket
inode, and decides when to ask again: only when a socket the manager holds
appears that was not seen before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from portwatch.model import Listener, Proto, Snapshot, Socket, is_manager, on_host
from portwatch.procfs import format_ipv4, format_ipv6


class Endpoint(NamedTuple):
    proto: Proto
    address: str  # as model.Socket prints it
    port: int


class SocketUnit(NamedTuple):
    """An active socket unit: its name, the service it activates, its IP listen addresses."""

    name: str
    service: str | None
    listens: tuple[Endpoint, ...]


class Activation(NamedTuple):
    socket_unit: str
    service_unit: str | None


class Unavailable(Exception):
    """The manager could not be asked; the message says why, for the `degraded` event."""


def parse_listen(kind: str, text: str) -> Endpoint | None:
    """An IP endpoint from one entry of `org.freedesktop.systemd1.Socket.Listen`, else None.

    `("Stream", "127.0.0.1:2222")`, `("Stream", "[::]:22")`, `("Datagram", "[fe80::1%2]:53")`;
    Unix paths, netlink, FIFOs and the rest are not IP listeners and give None.
    """
    proto = {"Stream": Proto.TCP, "Datagram": Proto.UDP}.get(kind)
    host, sep, port_text = text.rpartition(":")
    if proto is None or not sep or not port_text.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1].partition("%")[0]
    import ipaddress  # noqa: PLC0415 (only when systemd is asked; its import slows every view)

    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        return None
    address = format_ipv4(packed) if len(packed) == 4 else format_ipv6(packed)  # as the kernel's are
    return Endpoint(proto, address, int(port_text))


def service_of(name: str, accept: bool, triggers: Iterable[str]) -> str | None:
    """The unit a socket unit starts: what it triggers, or for `Accept=yes` its template."""
    if accept:
        return name.removesuffix(".socket") + "@.service"
    return next((t for t in triggers if t.endswith(".service")), None)


def match(s: Socket, units: Iterable[SocketUnit]) -> Activation | None:
    """The socket unit that lists this socket's address, or None."""
    here = Endpoint(s.proto, s.address, s.port)
    for unit in units:
        if here in unit.listens:
            return Activation(unit.name, unit.service)
    return None


class UnitCache:
    """Socket units per socket inode, asked of the manager only for sockets it has not seen.

    `lookup` lists the active socket units (raises Unavailable). A socket the
    manager holds that no unit lists is remembered as None and matched again
    only at the next lookup, which a new socket of the manager's brings on.
    `problem` is why the last lookup failed, or None.
    """

    def __init__(self, lookup: Callable[[], list[SocketUnit]]) -> None:
        self._lookup = lookup
        self._known: dict[int, Activation | None] = {}
        self.problem: str | None = None
        self._applied: tuple[Snapshot | None, Snapshot] = (None, Snapshot({}))  # the last input, output
        self._manager: dict[int, Listener] = {}  # the listeners of that input the manager holds

    def apply(self, snap: Snapshot) -> Snapshot:
        if snap is self._applied[0]:
            return self._applied[1]  # the tracker's unchanged snapshot: nothing to look at again
        self._applied = (snap, self._apply(snap))
        return self._applied[1]

    def _apply(self, snap: Snapshot) -> Snapshot:
        before = self._applied[0]
        old = before.listeners if before is not None else {}
        manager = self._manager
        for inode, x in snap.listeners.items():
            if old.get(inode) is not x:  # unchanged listeners are the same objects: looked at once
                # systemd's socket units are the host's: a container's own systemd holds its own.
                if on_host(x) and any(map(is_manager, x.processes)):
                    manager[inode] = x
                else:
                    manager.pop(inode, None)
        for inode in [i for i in manager if i not in snap.listeners]:
            del manager[inode]
        held = list(manager.values())
        # Sockets that closed are forgotten, so a reused inode number is asked about afresh.
        known = {x.socket.inode: self._known.get(x.socket.inode) for x in held}
        if any(x.socket.inode not in self._known for x in held):
            try:
                units = self._lookup()
            except Unavailable as exc:
                units, self.problem = [], str(exc)
            else:
                self.problem = None
            for x in held:  # the unmatched ones too: the manager may have been unreachable
                known[x.socket.inode] = known[x.socket.inode] or match(x.socket, units)
        self._known = known
        stale = {i: a for i, a in known.items() if a is not None and _units(snap.listeners[i]) != a}
        if not stale:
            return snap  # the tracker's unchanged snapshot stays the same object: nothing to diff
        listeners = dict(snap.listeners)
        for inode, activation in stale.items():
            listeners[inode] = listeners[inode]._replace(
                socket_unit=activation.socket_unit, service_unit=activation.service_unit)
        return snap._replace(listeners=listeners)


def _units(listener: Listener) -> tuple[str | None, str | None]:
    return (listener.socket_unit, listener.service_unit)
