"""systemd's active socket units, asked over D-Bus.

The manager's D-Bus API is systemd's stable interface for what a socket unit
listens on (`org.freedesktop.systemd1.Socket.Listen`). It is reached through
the system bus, which lets any user read these properties, or, as root,
through the manager's private socket (`/run/systemd/private`, the way
`systemctl` talks to it), which works without a bus daemon.

jeepney (pure Python) builds and parses the messages; this module does the
blocking I/O with a deadline over its sans-I/O core, since its blocking
connection always greets a bus and the private socket is not one. Callers
import this module only when the manager holds a listener, so views and a
daemon on hosts without socket units never load jeepney.
"""

from __future__ import annotations

import os
import socket
import time
from itertools import count
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, HeaderFields, Message, MessageType, Parser, new_method_call
from jeepney.auth import BEGIN, make_auth_external
from jeepney.bus import find_system_bus

from portwatch.activation import SocketUnit, Unavailable, parse_listen, service_of

BOOTED = "/run/systemd/system"  # sd_booted(): the running service manager is systemd
PRIVATE_SOCKET = "/run/systemd/private"
SYSTEMD = "org.freedesktop.systemd1"
LOOKUP_TIMEOUT = 2.0  # for the whole lookup: a hung manager must not stall a scan for long


def socket_units(timeout: float = LOOKUP_TIMEOUT) -> list[SocketUnit]:
    """The socket units the system manager has active, with their IP listen addresses."""
    if not Path(BOOTED).is_dir():
        raise Unavailable(f"the service manager is not systemd ({BOOTED} does not exist)")
    deadline = time.monotonic() + timeout
    try:
        with _connect(deadline) as client:
            return _socket_units(client)
    except (OSError, _CallFailed, ValueError) as exc:
        raise Unavailable(f"cannot ask systemd over D-Bus: {exc}") from exc


def _connect(deadline: float) -> _Client:
    """The private socket as root (no bus daemon needed), else the system bus."""
    problems = []
    routes = [(PRIVATE_SOCKET, False)] if os.geteuid() == 0 else []
    routes.append((find_system_bus(), True))  # honours DBUS_SYSTEM_BUS_ADDRESS
    for path, is_bus in routes:
        try:
            return _Client(path, deadline, greet=is_bus)
        except (OSError, _CallFailed) as exc:
            problems.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")
    raise _CallFailed("; ".join(problems))


def _socket_units(client: _Client) -> list[SocketUnit]:
    (listed,) = client.call("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
                            "ListUnitsByPatterns", "asas", ([], ["*.socket"]))
    units = []
    for name, _description, _load, active, _sub, _following, path, *_job in listed:
        if active in ("inactive", "failed"):
            continue
        listen = client.get(path, "org.freedesktop.systemd1.Socket", "Listen")
        endpoints = tuple(e for kind, text in listen if (e := parse_listen(kind, text)) is not None)
        if not endpoints:
            continue  # Unix sockets, FIFOs, netlink: no port
        accept = bool(client.get(path, "org.freedesktop.systemd1.Socket", "Accept"))
        triggers = client.get(path, "org.freedesktop.systemd1.Unit", "Triggers")
        units.append(SocketUnit(name, service_of(name, accept, triggers), endpoints))
    return units


class _CallFailed(Exception):
    """An error reply, or a connection that ended or timed out."""


class _Client:
    """One blocking D-Bus connection with a deadline for everything done on it."""

    def __init__(self, path: str, deadline: float, *, greet: bool) -> None:
        self._deadline = deadline
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._settimeout()
            self._sock.connect(path)
            self._authenticate()
        except BaseException:
            self._sock.close()
            raise
        self._parser = Parser()
        self._serials = count(1)
        if greet:  # a bus wants Hello first; the manager's private socket is no bus
            self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello",
                      destination="org.freedesktop.DBus")

    def _authenticate(self) -> None:
        """SASL EXTERNAL (the server checks our uid with SO_PEERCRED), BEGIN sent with AUTH.

        Pipelined as sd-bus does it. Sent after the OK, BEGIN can reach systemd 252 in one
        read with the first call, which it then keeps unanswered until the next read.
        """
        self._sock.sendall(b"\0" + make_auth_external() + BEGIN)
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 1024:
            self._settimeout()
            data = self._sock.recv(1024 - len(line))
            if not data:
                raise _CallFailed("the connection was closed during authentication")
            line += data
        if not line.startswith(b"OK "):
            raise _CallFailed(f"authentication refused: {line[:80]!r}")

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._sock.close()

    def get(self, path: str, interface: str, name: str) -> Any:
        (variant,) = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", (interface, name))
        return variant[1]  # a variant is (signature, value)

    def call(self, path: str, interface: str, method: str, signature: str = "",
             body: tuple[Any, ...] = (), *, destination: str = SYSTEMD) -> Any:
        address = DBusAddress(path, bus_name=destination, interface=interface)
        serial = next(self._serials)
        self._settimeout()
        message = new_method_call(address, method, signature or None, body).serialise(serial)
        self._sock.sendall(message)
        reply = self._reply_to(serial)
        if reply.header.message_type == MessageType.error:
            raise _CallFailed(f"{method}: {reply.body[0] if reply.body else 'error'}")
        return reply.body

    def _reply_to(self, serial: int) -> Message:
        while True:
            message = self._parser.get_next_message()
            if message is None:
                self._settimeout()
                try:
                    data = self._sock.recv(65536)
                except TimeoutError as exc:
                    raise _CallFailed("no reply in time") from exc
                if not data:
                    raise _CallFailed("the connection was closed")
                self._parser.add_data(data)
            elif message.header.fields.get(HeaderFields.reply_serial) == serial:
                return message
            # else a signal (the bus's NameAcquired): not ours

    def _settimeout(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _CallFailed("no reply in time")
        self._sock.settimeout(left)

