"""Value types shared by every layer: sockets, processes, listeners and snapshots.

Pure: standard library only. Everything is immutable so a snapshot can be kept,
diffed and handed to another thread without copying. NamedTuples rather than
frozen dataclasses: they build in a third of the time (a large host has tens of
thousands of sockets per scan) and do not import `dataclasses` and `inspect`,
which are a noticeable share of `portwatch list`'s start-up.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

# systemd runs itself, system or user manager, in the cgroup of the unit `init.scope`;
# only root can move a process there, so no other process can pass for it.
MANAGER_UNIT = "init.scope"


def is_manager(process: Process) -> bool:
    """The service manager itself: systemd, system or user instance."""
    return process.unit == MANAGER_UNIT


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Unresolved(StrEnum):
    """Why a listening socket has no owner: never a bare '-'."""

    # Some process directory could not be read: the owner may be among them.
    PERMISSION_DENIED = "permission_denied"
    # Every visible process was read and none holds it: a kernel socket
    # (NFS, WireGuard), or one held from another pid namespace.
    NO_PROCESS = "no_process"


class Socket(NamedTuple):
    """One listening socket as the kernel lists it (/proc/net/* or sock_diag).

    A TCP socket in LISTEN, or a bound UDP socket with no peer.
    `address` is printable: dotted IPv4, RFC 5952 IPv6, `::ffff:a.b.c.d` for
    IPv4-mapped. `uid` is the socket's owner as the kernel records it, which
    is readable without privilege even when the holding process is not.
    """

    proto: Proto
    family: int  # 4 or 6
    address: str
    port: int
    inode: int
    uid: int


class Process(NamedTuple):
    """A process holding a socket. Strings from the process are attacker data.

    Bytes that are not UTF-8 are kept as surrogate escapes (PEP 383) so the
    exact bytes can be given back to hooks and journald.
    """

    pid: int
    comm: str
    exe: str | None  # None when unreadable (kernel thread, permission, exited)
    cmdline: tuple[str, ...]
    uid: int | None
    user: str | None  # name from the passwd database; None when unknown
    unit: str | None  # systemd unit from /proc/<pid>/cgroup


class Container(NamedTuple):
    """The container a network namespace belongs to, from its processes' cgroup path."""

    engine: str  # docker, podman, containerd, crio, nspawn, lxc
    id: str  # the engine's id (a machine's or an lxc container's name for those two)
    name: str | None = None  # from the engine's own state, when that was cheap to read


class NetNs(NamedTuple):
    """A network namespace, identified by the inode of /proc/<pid>/ns/net.

    `name`: "host" for portwatch's own namespace, the `ip netns` name bound
    to it, the container's name (or `engine:id12`), else `netns:[<inode>]`.
    """

    id: int
    name: str
    host: bool = False
    container: Container | None = None


class Listener(NamedTuple):
    """A listening socket with every process that holds it (sorted by pid).

    A socket the service manager bound for a `.socket` unit names that unit
    and the service it starts (`name@.service` for `Accept=yes`). `netns`
    is the network namespace the socket lives in; None when that was not
    known (/proc/self/ns/net unreadable, a state file from an older version):
    taken as portwatch's own.
    """

    socket: Socket
    processes: tuple[Process, ...] = ()
    unresolved: Unresolved | None = None  # set exactly when processes is empty
    socket_unit: str | None = None
    service_unit: str | None = None
    netns: NetNs | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.processes)

    def serves_socket_unit(self, process: Process) -> bool:
        """`process` holds this socket for its socket unit: the manager, or the service it started."""
        if self.socket_unit is None:
            return False
        if is_manager(process):
            return True
        service = self.service_unit
        if service is None or process.unit is None:
            return False
        if service.endswith("@.service"):  # Accept=yes: any instance of the template
            return process.unit.startswith(service[: -len(".service")]) and process.unit.endswith(".service")
        return process.unit == service


class Snapshot(NamedTuple):
    """All listeners seen by one scan, keyed by socket inode.

    `complete` is False when a socket table could not be read whole; a diff
    against an incomplete snapshot never reports anything as closed.
    `denied_pids` counts processes whose fds could not be read.
    """

    listeners: dict[int, Listener]  # never modified once built
    complete: bool = True
    denied_pids: int = 0

    def sorted(self) -> list[Listener]:
        return sorted(self.listeners.values(), key=listener_sort_key)


def endpoint(address: str, port: int) -> str:
    """`127.0.0.1:22`, `[::1]:22`, `*:22` for the IPv4 wildcard, as ss prints them."""
    if address == "0.0.0.0":  # noqa: S104 - naming the wildcard, not binding it
        return f"*:{port}"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def listener_sort_key(listener: Listener) -> tuple[str, int, int, str, int]:
    s = listener.socket
    return (s.proto.value, s.port, s.family, s.address, s.inode)


def on_host(listener: Listener) -> bool:
    """The listener is in portwatch's own network namespace (or its namespace is not known)."""
    return listener.netns is None or listener.netns.host
