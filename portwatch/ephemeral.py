"""Which unconnected UDP sockets are clients' rather than servers': ports from the ephemeral range.

A UDP client that sends without binding (a resolver's query socket, a syslog
forwarder, an SNMP poller) gets a port from `net.ipv4.ip_local_port_range`
(which governs IPv6 too), minus `ip_local_reserved_ports`, which the kernel
never hands out. Such a socket shows up as an unconnected UDP socket just as a
server's does, and the kernel does not say whether the port was chosen by the
program or by itself, so the range decides: a server that binds a port inside
it on purpose is listed as ephemeral too, unless the port is in
ip_local_reserved_ports (where a server's fixed port belongs) or a reserved
rule names it. A socket is never hidden when the range cannot be read.

The range is the one of the network namespace that reads it (sysctls under
/proc/sys/net are per namespace): portwatch's own, applied to every namespace.
"""

from __future__ import annotations

from collections.abc import Iterable

from portwatch.model import Listener, Proto

RANGE = "sys/net/ipv4/ip_local_port_range"
RESERVED = "sys/net/ipv4/ip_local_reserved_ports"


class EphemeralPorts:
    """The ports the kernel gives clients: `first`-`last` except the `reserved` ranges.

    A plain class: a NamedTuple's class is built with exec, a millisecond of every view's start.
    """

    __slots__ = ("first", "last", "reserved")

    def __init__(self, first: int, last: int, reserved: tuple[tuple[int, int], ...] = ()) -> None:
        self.first = first
        self.last = last
        self.reserved = reserved

    def __contains__(self, port: object) -> bool:
        return (isinstance(port, int) and self.first <= port <= self.last
                and not any(low <= port <= high for low, high in self.reserved))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EphemeralPorts) and (self.first, self.last, self.reserved) == (
            other.first, other.last, other.reserved)

    __hash__ = None  # type: ignore[assignment]  # mutable attributes: not a dict key

    def __repr__(self) -> str:
        return f"EphemeralPorts({self.first}, {self.last}, {self.reserved})"

    def __str__(self) -> str:
        text = f"{self.first}-{self.last}"
        if self.reserved:
            text += " except " + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.reserved)
        return text


def parse(port_range: str, reserved: str) -> EphemeralPorts:
    """The two sysctls' text ("32768\\t60999", "8080,9000-9100" or ""); ValueError when malformed."""
    first, last = (int(n) for n in port_range.split())
    spans = []
    for part in reserved.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            spans.append((int(low), int(high or low)))
    return EphemeralPorts(first, last, tuple(spans))


def read(proc_root: str = "/proc") -> tuple[EphemeralPorts | None, str | None]:
    """This namespace's ephemeral ports, or None and why they could not be read."""
    texts = []
    for name in (RANGE, RESERVED):
        path = f"{proc_root}/{name}"
        try:
            with open(path, "rb") as f:  # noqa: PTH123 (bytes: a text file would load a codec module)
                texts.append(f.read().decode(errors="replace"))
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
    try:
        return parse(*texts), None
    except ValueError:
        return None, f"cannot parse {proc_root}/{RANGE}: {texts[0].strip()!r}"


def clients_here(listeners: Iterable[Listener], proc_root: str = "/proc") -> tuple[set[int], str | None]:
    """`clients` by this namespace's range, and why the range could not be read (nothing is then
    taken for a client's)."""
    ports, problem = read(proc_root)
    return clients(listeners, ports), problem


def clients(listeners: Iterable[Listener], ports: EphemeralPorts | None) -> set[int]:
    """The inodes of the unconnected UDP sockets (the only UDP sockets listed) on ports the kernel
    hands out to clients. One pass: a view calls it on every listener of the host."""
    if ports is None:
        return set()
    udp = Proto.UDP
    return {sock.inode for x in listeners if (sock := x.socket).proto is udp and sock.port in ports}
