"""Reserved-port rules and the pure verdict on one listener.

A rule reserves some ports of one protocol for the owners its `allow`
entries describe. `evaluate` says whether a listener breaks a rule; acting
on the verdict (logging, hooks) happens at the edges.

Process fields are attacker data: a process may call itself `[`, `*` or
`a\\nb`. They are only ever the *name* side of `fnmatch.fnmatchcase`, which
escapes everything in the name, so matching them never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NamedTuple

from portwatch.model import MANAGER_UNIT, Listener, NetNs, Process, Proto, is_manager

PORT_MIN = 1
PORT_MAX = 65535


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of ports, `first` <= `last`, both in 1-65535."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not PORT_MIN <= self.first <= self.last <= PORT_MAX:
            raise ValueError(f"bad port range {self.first}-{self.last}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Allow:
    """One allowed owner: every key that is set must match (shell-style globs).

    An entry with no keys set matches nothing, so a malformed entry can
    never allow everyone.

    On a socket unit's listener, `unit` also matches the socket unit, so
    `unit: demo.socket` allows every holder of demo.socket's socket. The
    service manager (systemd, which binds the socket) is matched on `unit`
    alone, against the socket unit and the service it starts: its name, path
    and user say nothing about whose socket it holds, so an entry without
    `unit` never allows it, and `comm: systemd*` is never what lets a port pass.
    (A user's `systemd --user` whose socket unit is not known is matched as
    the user's process it is.)
    """

    comm: str | None = None
    exe: str | None = None
    user: str | None = None  # a user name or a decimal uid
    unit: str | None = None

    def matches(self, process: Process, listener: Listener | None = None) -> bool:
        return self.check(process, listener).matched

    def check(self, process: Process, listener: Listener | None = None) -> Match:
        """Whether `process` (holding `listener`) is this entry's owner, on which keys, or why not."""
        socket_unit = listener.socket_unit if listener is not None else None
        if is_manager(process) and (process.pid == 1 or socket_unit is not None):
            units = [u for u in (MANAGER_UNIT, socket_unit, listener.service_unit if listener else None) if u]
            if self.unit is None:
                return Match(False, (), "the service manager is allowed only by unit (of its socket unit "
                                        "or the service it starts), and this entry has no unit")
            if any(_glob(u, self.unit) for u in units):
                return Match(True, ("unit",))
            return Match(False, (), f"unit {self.unit!r} matches none of {', '.join(map(repr, units))}")
        checks = (
            ("comm", self.comm, (process.comm,)),
            ("exe", self.exe, (_undeleted(process.exe),)),
            ("user", self.user, (process.user, None if process.uid is None else str(process.uid))),
            ("unit", self.unit, (process.unit, socket_unit)),
        )
        keys: list[str] = []
        for key, pattern, values in checks:
            if pattern is None:
                continue
            if not any(_glob(value, pattern) for value in values):
                return Match(False, tuple(keys), _miss(key, pattern, values))
            keys.append(key)
        return Match(bool(keys), tuple(keys), None if keys else "the entry has no keys")


class Match(NamedTuple):
    """An allow entry against one holder: matched, the keys that matched, or the first that did not."""

    matched: bool
    keys: tuple[str, ...]
    miss: str | None = None  # a sentence with the process's values: attacker data, escape to show


def _miss(key: str, pattern: str, values: tuple[str | None, ...]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        unknown = {"exe": "the executable is unreadable", "user": "the user is unknown",
                   "unit": "the process is in no systemd unit"}
        return f"{key} {pattern!r}: {unknown.get(key, 'unknown')}"
    shown = " / ".join(map(repr, known))
    return f"{key} {shown} does not match {pattern!r}"


def _undeleted(exe: str | None) -> str | None:
    """The path a still-running binary had before a package upgrade replaced it.

    The kernel appends " (deleted)" to /proc/<pid>/exe once the file is
    unlinked; the process is still the program that was installed there.
    Only root can have had a file at a system path, so this opens nothing.
    """
    suffix = " (deleted)"
    return exe[: -len(suffix)] if exe is not None and exe.endswith(suffix) else exe


def _glob(value: str | None, pattern: str) -> bool:
    # An unknown field (unreadable exe, no passwd entry, no unit) never matches.
    return value is not None and fnmatchcase(value, pattern)


@dataclass(frozen=True, slots=True)
class Rule:
    """Ports of one protocol that only the `allow`ed owners may listen on."""

    name: str
    ports: tuple[PortRange, ...]
    proto: Proto = Proto.TCP
    allow: tuple[Allow, ...] = ()  # empty: nobody may hold these ports
    hooks: tuple[str, ...] = ()  # names of hooks to run on a violation
    # A glob over network namespace names ("*": all, the host's being "host"); None: the host's
    # only, as a port inside a container does not collide with the host's.
    netns: str | None = None

    def covers(self, proto: Proto, port: int) -> bool:
        return proto == self.proto and any(port in r for r in self.ports)

    def applies_in(self, netns: NetNs | None) -> bool:
        """The rule holds in `netns` (None: the host's)."""
        if self.netns is None:
            return netns is None or netns.host
        return fnmatchcase("host" if netns is None or netns.host else netns.name, self.netns)

    def allows(self, process: Process, listener: Listener | None = None) -> bool:
        return any(entry.matches(process, listener) for entry in self.allow)


@dataclass(frozen=True, slots=True)
class Violation:
    """A reserved port held by someone the rule does not allow.

    `verified` is False when no holder could be identified (the listener
    is unresolved): the port is taken, but we cannot say by whom, so
    `offenders` is empty.
    """

    rule: Rule
    listener: Listener
    offenders: tuple[Process, ...]
    verified: bool


def evaluate(rule: Rule, listener: Listener) -> Violation | None:
    """The violation of `rule` by `listener`, or None when every holder is allowed.

    A listener on a port the rule does not cover never violates it. A
    covered listener with no known process is an unverified violation: a
    reserved port held by an owner we cannot see is still worth reporting.
    """
    sock = listener.socket
    if not rule.covers(sock.proto, sock.port) or not rule.applies_in(listener.netns):
        return None
    if not listener.processes:
        return Violation(rule=rule, listener=listener, offenders=(), verified=False)
    offenders = tuple(p for p in listener.processes if not rule.allows(p, listener))
    if not offenders:
        return None
    return Violation(rule=rule, listener=listener, offenders=offenders, verified=True)
