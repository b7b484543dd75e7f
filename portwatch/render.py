"""Pure rendering of the CLI views: plain-text tables and JSON-ready objects.

Text cells are escaped (`portwatch.text.escape`) so a hostile process name
can neither split a row nor reach the terminal raw; JSON objects carry the
exact strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from portwatch.model import Listener, NetNs, Process, Socket, endpoint, is_manager
from portwatch.netns import forwards_to
from portwatch.text import escape, is_plain


def process_json(proc: Process) -> dict[str, Any]:
    return {
        "pid": proc.pid,
        "comm": proc.comm,
        "exe": proc.exe,
        "cmdline": list(proc.cmdline),
        "uid": proc.uid,
        "user": proc.user,
        "unit": proc.unit,
    }


def netns_json(netns: NetNs | None) -> dict[str, Any] | None:
    if netns is None:
        return None
    container = netns.container
    return {
        "id": netns.id,
        "name": netns.name,
        "host": netns.host,
        "container": None if container is None else
        {"engine": container.engine, "id": container.id, "name": container.name},
    }


def listener_json(listener: Listener, *, ephemeral: bool = False) -> dict[str, Any]:
    """`ephemeral`: an unconnected UDP socket on a client port (portwatch.ephemeral)."""
    s = listener.socket
    forwards = next((f for p in listener.processes if (f := forwards_to(p)) is not None), None)
    return {
        "proto": s.proto.value,
        "family": s.family,
        "address": s.address,
        "port": s.port,
        "inode": s.inode,
        "uid": s.uid,
        "processes": [process_json(p) for p in listener.processes],
        "unresolved": listener.unresolved.value if listener.unresolved else None,
        "socket_unit": listener.socket_unit,
        "service_unit": listener.service_unit,
        "netns": netns_json(listener.netns),
        "forwards_to": forwards,
        "ephemeral": ephemeral,
    }


def command_text(proc: Process) -> str:
    return " ".join(proc.cmdline) if proc.cmdline else f"[{proc.comm}]"


def listener_rows(
    listeners: Iterable[Listener], users: dict[int, str | None], *, netns: bool = False
) -> list[list[str]]:
    """One row per (socket, holder); a shared socket has a row for each holder. `netns`: the
    rows start with the namespace's name (LISTENER_HEADERS_NETNS)."""
    rows = []
    for listener in listeners:
        s = listener.socket
        head = [s.proto.value, endpoint(s.address, s.port)]
        if netns:
            head.insert(0, listener.netns.name if listener.netns is not None else "?")
        if not listener.processes:
            owner = users.get(s.uid) or str(s.uid)
            reason = listener.unresolved.value if listener.unresolved else "unknown"
            rows.append([*head, owner, "", f"({reason})", "", ""])
            continue
        for proc in listener.processes:
            user = proc.user or (str(proc.uid) if proc.uid is not None else "?")
            rows.append(
                [*head, user, str(proc.pid), proc.comm, unit_text(listener, proc), command_text(proc)]
            )
    return rows


def unit_text(listener: Listener, proc: Process) -> str:
    """The holder's unit; for systemd holding a socket unit's socket, that unit and its service."""
    if is_manager(proc) and listener.socket_unit is not None:
        return f"{listener.socket_unit} → {listener.service_unit or '?'}"
    return proc.unit or ""


LISTENER_HEADERS = ["PROTO", "LOCAL", "USER", "PID", "COMM", "UNIT", "COMMAND"]
LISTENER_HEADERS_NETNS = ["NETNS", *LISTENER_HEADERS]


class ProcessPorts:
    """A process and the listening sockets it holds, for `portwatch ps`."""

    __slots__ = ("fds_readable", "process", "socket_units", "sockets")

    def __init__(self, process: Process) -> None:
        self.process = process
        self.sockets: list[Socket] = []
        self.fds_readable = True
        # inode -> (socket unit, service unit) of the sockets systemd holds for socket units
        self.socket_units: dict[int, tuple[str, str | None]] = {}


def process_ports_json(
    entry: ProcessPorts, netns_of: Mapping[int, NetNs] | None = None, host: NetNs | None = None
) -> dict[str, Any]:
    """`netns_of`: the namespace of each socket outside `host`."""
    netns_of = netns_of or {}
    out = process_json(entry.process)
    out["ports"] = []
    for s in entry.sockets:
        socket_unit, service_unit = entry.socket_units.get(s.inode, (None, None))
        out["ports"].append({"proto": s.proto.value, "address": s.address, "port": s.port, "inode": s.inode,
                             "socket_unit": socket_unit, "service_unit": service_unit,
                             "netns": netns_json(netns_of.get(s.inode, host))})
    out["fds_readable"] = entry.fds_readable
    return out


def process_rows(
    entries: Iterable[ProcessPorts], netns_of: Mapping[int, NetNs] | None = None
) -> list[list[str]]:
    """`netns_of`: the namespace of each socket outside the host's, named before its port."""
    netns_of = netns_of or {}
    rows = []
    for entry in entries:
        p = entry.process
        ports = ",".join(_port_text(s, entry.socket_units.get(s.inode), netns_of.get(s.inode))
                         for s in entry.sockets)
        if not entry.fds_readable:
            ports = "(permission_denied)"
        user = p.user or (str(p.uid) if p.uid is not None else "?")
        rows.append([str(p.pid), user, p.comm, ports, command_text(p)])
    return rows


def _port_text(s: Socket, units: tuple[str, str | None] | None, netns: NetNs | None) -> str:
    text = f"{s.proto.value}/{endpoint(s.address, s.port)}"
    if netns is not None:
        text = f"{netns.name}:{text}"
    return f"{text}({units[0]})" if units is not None else text


PROCESS_HEADERS = ["PID", "USER", "COMM", "LISTENING", "COMMAND"]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, width: int | None = None) -> str:
    """Left-aligned columns; the last column is not padded and may be cut to `width`."""
    cells = [list(headers), *map(_escaped, rows)]
    # Column by column with max() and map(): every row has len(headers) cells.
    widths = [max(map(len, column)) for column in zip(*cells, strict=True)][:-1]
    lines = []
    for row in cells:
        line = "  ".join([*map(str.ljust, row, widths), row[-1]]).rstrip()
        if width is not None and len(line) > width:
            line = line[: max(width - 1, 0)] + ">"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _escaped(row: Sequence[str]) -> list[str]:
    if is_plain("".join(row)):
        return list(row)  # nothing to escape in any cell: one check instead of one per cell
    return [escape(c) for c in row]
