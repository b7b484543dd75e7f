"""A journal entry that reports a failed bind, read into who failed and on which port. Pure.

Who failed comes from the fields journald sets itself (`_SYSTEMD_UNIT`, `_PID`,
`_COMM`, `_EXE`, `_UID`), which a process cannot forge; `UNIT=` only when root
wrote the entry without a unit of its own (systemd, whose unit is init.scope, and
its short-lived `(sd-listen)` helper, gone before journald could read its cgroup).
The message text is the program's and attacker-controlled: it is used to see that
a bind failed and on which address and port, never for who failed. portwatch's
own entries (and its hooks') are never read back as failures: a process named
"errno 98" would otherwise turn its listener_opened into a conflict.

What real programs write (systemd 252): nginx `bind() to 127.0.0.1:8080 failed
(98: Address already in use)` and later `still could not bind()`; sshd
`Bind to port 2226 on 127.0.0.1 failed: Address already in use.` and
`fatal: Cannot bind any address.`; Python `OSError: [Errno 98] Address already
in use`; a socket unit's helper `bad.socket: Failed to create listening socket
(127.0.0.1:8082): Address already in use` with ERRNO=98.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from portwatch.model import MANAGER_UNIT

EADDRINUSE = 98
MESSAGE_LIMIT = 512  # characters of the program's message kept in the event

# The failure itself; the follow-ups name no address and only join a failure already seen.
_IN_USE = re.compile(r"address already in use|eaddrinuse|errno 98\b", re.IGNORECASE)
_FOLLOW_UP = re.compile(r"(?:could not|cannot|can't|unable to) bind", re.IGNORECASE)

# Where, most specific first: sshd's words, then an address:port as programs write them.
_SSHD = re.compile(r"\bport (\d{1,5}) on (\S+) failed", re.IGNORECASE)
_TUPLE = re.compile(r"\('([0-9A-Fa-f:.]*)', (\d{1,5})\)")  # asyncio/uvicorn: ('127.0.0.1', 8000)
_ENDPOINT = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)(?:%[\w.-]+)?\]:(?P<p6>\d{1,5})\b"
    r"|(?<![\w.:])(?P<any6>::):(?P<pany>\d{1,5})\b"  # Node: :::3000
    r"|(?<![\w.:])(?P<v4>\d{1,3}(?:\.\d{1,3}){3}|\*|localhost)?:(?P<p4>\d{1,5})\b(?![.\d]|:\d)"
)
_ANY = {"*": None, "": None}


class BindFailure(NamedTuple):
    """One journal entry saying a bind failed (or, `follow_up`, that it still did)."""

    unit: str | None
    pid: int | None
    comm: str | None
    exe: str | None
    message: str  # the program's words, cut to MESSAGE_LIMIT; not escaped here
    address: str | None  # as the program wrote it; None: any address, or not said
    port: int | None
    follow_up: bool
    realtime_usec: int  # when journald received it
    cursor: str


class Own(NamedTuple):
    """What marks portwatch's own entries: its pid, and its unit's invocation (hooks too)."""

    pid: int
    invocation: str | None


def parse(entry: Mapping[str, Any], own: Own | None = None) -> BindFailure | None:
    """The failed bind an entry of `journalctl -o json` reports, or None."""
    message = field_text(entry.get("MESSAGE"))
    if message is None or (own is not None and _is_own(entry, own)):
        return None
    errno = field_text(entry.get("ERRNO"))
    in_use = errno == str(EADDRINUSE) or _IN_USE.search(message) is not None
    follow_up = not in_use and _FOLLOW_UP.search(message) is not None
    if not in_use and not follow_up:
        return None
    address, port = endpoint_in(message)
    return BindFailure(
        unit=_unit(entry),
        pid=_int(entry.get("_PID")),
        comm=field_text(entry.get("_COMM")),
        exe=field_text(entry.get("_EXE")),
        message=message[:MESSAGE_LIMIT],
        address=address,
        port=port,
        follow_up=follow_up,
        realtime_usec=_int(entry.get("__REALTIME_TIMESTAMP")) or 0,
        cursor=field_text(entry.get("__CURSOR")) or "",
    )


def endpoint_in(message: str) -> tuple[str | None, int | None]:
    """The first address and port a message names: `127.0.0.1:80`, `[::]:80`, `*:80`, `:80`,
    `port 80 on 10.0.0.1`. The address is None when any address is meant or none is said."""
    for pattern in (_SSHD, _TUPLE):
        found = pattern.search(message)
        if found is not None:
            address, port = found.groups()[::-1] if pattern is _SSHD else found.groups()
            if _port(port) is not None:
                return _address(address), _port(port)
    for found in _ENDPOINT.finditer(message):
        for address_group, port_group in (("v6", "p6"), ("any6", "pany"), ("v4", "p4")):
            port = _port(found.group(port_group))
            if port is not None:
                return _address(found.group(address_group)), port
    return None, None


def field_text(value: Any) -> str | None:
    """A field of journalctl's JSON as text: a string, or bytes given as a list of numbers
    (binary or control characters), or the first of a repeated field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(b, int) and 0 <= b < 256 for b in value):
            return bytes(value).decode("utf-8", "replace")
        return field_text(value[0])
    return None


def _unit(entry: Mapping[str, Any]) -> str | None:
    unit = field_text(entry.get("_SYSTEMD_UNIT"))
    if unit in (None, MANAGER_UNIT) and field_text(entry.get("_UID")) == "0":
        return field_text(entry.get("UNIT")) or unit  # systemd and its helpers: the unit meant
    return unit


def _is_own(entry: Mapping[str, Any], own: Own) -> bool:
    if own.invocation is not None and field_text(entry.get("_SYSTEMD_INVOCATION_ID")) == own.invocation:
        return True
    return _int(entry.get("_PID")) == own.pid


def _address(text: str | None) -> str | None:
    if text is None:
        return None
    return _ANY.get(text, "127.0.0.1" if text == "localhost" else text)


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def _int(value: Any) -> int | None:
    text = field_text(value)
    return int(text) if text is not None and text.isdigit() else None
