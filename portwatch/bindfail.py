"""A journal entry that reports a failed bind, read into who failed and on which port. Pure.

Who failed comes from the fields journald sets itself (`_SYSTEMD_UNIT`, `_PID`,
`_COMM`, `_EXE`), which a process cannot forge; `UNIT=` only when systemd wrote
the entry (its own unit is init.scope). The message text is the program's and
attacker-controlled: it is used to see that a bind failed and on which
address and port, never for who failed.

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
_ENDPOINT = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)(?:%[\w.-]+)?\]:(?P<p6>\d{1,5})\b"
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


def parse(entry: Mapping[str, Any]) -> BindFailure | None:
    """The failed bind an entry of `journalctl -o json` reports, or None."""
    message = field_text(entry.get("MESSAGE"))
    if message is None:
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
    sshd = _SSHD.search(message)
    if sshd is not None:
        port = _port(sshd.group(1))
        if port is not None:
            return _address(sshd.group(2)), port
    for found in _ENDPOINT.finditer(message):
        port = _port(found.group("p6") or found.group("p4"))
        if port is not None:
            return _address(found.group("v6") if found.group("p6") else found.group("v4")), port
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
    if unit == MANAGER_UNIT:  # systemd itself: the unit it writes about
        return field_text(entry.get("UNIT"))
    return unit


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
