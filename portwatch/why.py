"""`portwatch why PORT`: which listeners keep a new server from binding ADDR:PORT, in words. Pure.

The kernel's rule for listeners (what `bind()` checks): two sockets of one protocol
on one port overlap when their addresses are equal or either is the wildcard of
its family; an IPv6 `[::]` without IPV6_V6ONLY also holds every IPv4 address
(and a new `[::]` bind without it needs 0.0.0.0 free too); an IPv4-mapped address
`::ffff:a.b.c.d` is that IPv4 address. SO_REUSEADDR never lets a second socket
bind where one is listening; SO_REUSEPORT can (same user, both set), and UDP
sockets that both set SO_REUSEADDR share: the real `bind()` the CLI makes decides.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from portwatch.model import Listener, Proto, endpoint

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
SAME = "the same address"


class Blocker(NamedTuple):
    listener: Listener
    reason: str  # why it overlaps, in words


def overlap(held: str, held_v6only: bool | None, wanted: str, *, wanted_v6only: bool) -> str | None:
    """Why a listener on `held` keeps a bind of `wanted` (same protocol and port) from
    succeeding, or None when it does not. `held_v6only` None: not known (counted as dual-stack,
    Linux's default)."""
    try:
        a, b = _ip(held), _ip(wanted)
    except ValueError:
        return None
    if a == b:
        return SAME
    if a.version == b.version:
        if a.is_unspecified:
            return f"it listens on every IPv{a.version} address"
        if b.is_unspecified:
            return "the new socket would take every address, this one included"
        return None
    if a.version == 6 and a.is_unspecified and not held_v6only:
        return "[::] without IPV6_V6ONLY also listens on every IPv4 address"
    if b.version == 6 and b.is_unspecified and not wanted_v6only:
        return "a new [::] without IPV6_V6ONLY needs every IPv4 address too"
    return None


def blockers(listeners: Iterable[Listener], proto: Proto, wanted: str, port: int, *,
             v6only: Mapping[int, bool], wanted_v6only: bool) -> list[Blocker]:
    """The listeners in the way of a bind of `wanted`:`port`; `v6only` by inode of IPv6 ones."""
    found = []
    for listener in listeners:
        sock = listener.socket
        if sock.proto is not proto or sock.port != port:
            continue
        held_v6only = v6only.get(sock.inode) if sock.family == 6 else None
        reason = overlap(sock.address, held_v6only, wanted, wanted_v6only=wanted_v6only)
        if reason is not None:
            found.append(Blocker(listener, reason))
    return found


def explain(proto: Proto, wanted: str, port: int, found: list[Blocker], *, bind_failed: OSError | None,
            uid: int, since: Mapping[int, str]) -> tuple[bool, str]:
    """Whether a server could bind now, and one paragraph saying why (or why not).

    `bind_failed`: what the real bind() raised (None: it bound). EACCES only says that this user
    may not bind the port (no CAP_NET_BIND_SERVICE): the listeners found decide then.
    """
    where = f"{proto.value} {endpoint(wanted, port)}"
    parts = [f"{_holder(b.listener)} listens on {endpoint(b.listener.socket.address, port)}"
             + (f" since {since[b.listener.socket.inode]}" if b.listener.socket.inode in since else "")
             + f": {b.reason}" for b in found]
    blockers = "; ".join(parts)
    bind_errno = None if bind_failed is None else bind_failed.errno
    if bind_errno == errno.EACCES:
        untested = (f"bind() could not test it: uid {uid} may not bind ports below "
                    "net.ipv4.ip_unprivileged_port_start without CAP_NET_BIND_SERVICE")
        if found:
            return False, f"{where} cannot be bound now: {blockers}. ({untested}.)"
        return True, (f"{where} can be bound by a server allowed to bind it: no listener overlaps it "
                      f"({untested}).")
    if bind_errno == errno.EADDRNOTAVAIL:
        return False, f"{where} cannot be bound: no interface of this host has the address {wanted}."
    if bind_errno is None:
        if not found:
            return True, f"{where} can be bound now: no listener overlaps it and bind() succeeded."
        return True, (f"{where} can be bound now although these overlap (they share the port: "
                      f"SO_REUSEPORT, or UDP with SO_REUSEADDR): {blockers}.")
    failed = f"bind() failed: {bind_failed.strerror if bind_failed is not None else '?'}"
    if not found:
        return False, (f"{where} cannot be bound now ({failed}), and no listener portwatch can see "
                       "overlaps it: a socket bound but not listening, or a connection, holds the port.")
    return False, (f"{where} cannot be bound now ({failed}): {blockers}. "
                   "Stop or move that holder, or bind the server elsewhere.")


def _holder(listener: Listener) -> str:
    if not listener.processes:
        return f"a process portwatch cannot identify ({listener.unresolved})"
    first = listener.processes[0]
    details = [f"user {first.user}"] if first.user else []
    unit = listener.socket_unit or first.unit
    if unit:
        details.append(f"unit {unit}")
    text = f"{first.comm}[{first.pid}]" + (f" ({', '.join(details)})" if details else "")
    more = len(listener.processes) - 1
    return text + (f" and {more} more" if more > 0 else "")


def _ip(text: str) -> Address:
    """An address; IPv4-mapped IPv6 (::ffff:a.b.c.d) is the IPv4 address it maps."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
