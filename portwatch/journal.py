"""Writing structured entries to journald over its native protocol (stdlib only).

https://systemd.io/JOURNAL_NATIVE_PROTOCOL/: one AF_UNIX datagram per entry,
each field `KEY=value\\n`, or `KEY\\n<u64 LE length><bytes>\\n` when the value
holds a newline. An entry too big for a datagram goes in a sealed memfd whose
descriptor is passed with SCM_RIGHTS. Field names are checked here because
journald silently drops entries' invalid fields, and because a name is framing:
a newline or '=' in one would forge fields.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Mapping, Sequence

from portwatch.closing import Closing
from portwatch.text import encode

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# One fixed id per event (generated with `systemd-id128 new`): `journalctl MESSAGE_ID=…`
# finds an event across versions, and systemd/portwatch.catalog explains each one.
MESSAGE_IDS: dict[str, str] = {
    "portwatch_started": "7218670578f04ba98b9dfd5ae4689ec8",
    "portwatch_stopping": "7e7238f769fe4183a1f757c4aaa6bf57",
    "listener_opened": "131ec2cb447c4c0f8ac6e0c51a2fc84c",
    "listener_closed": "dd11214e8ba54e47b4170ea962d70669",
    "owner_changed": "50edf9fd4ace452ca13e164ea483bf9c",
    "reserved_port_taken": "37140c1bb01945f5952bd220ed88a8b5",
    "port_conflict": "da61e53f6cb9401993dc65b774fba725",
    "hook_finished": "64b471742bcf41ebbc2943de27d380b2",
    "hook_failed": "1e22310a77e1497286eb192938b7add2",
    "hook_suppressed": "29ba4ee93bc040c99f4bb92fe7635a4a",
    "hook_dropped": "5902b8fe29c84629b0c3d159d9ab94f4",
    "config_reloaded": "0ace0f802784464297199b260658dee2",
    "config_rejected": "286fcf4423ae4ab5be89568ed85753d8",
    "degraded": "8985c34842274c0dab329ae7ddc2c2be",
    "state_restored": "2ab0c8eeb95c44dc8b84ffd1b7be15e2",
    "state_reset": "e3484aa795a040f0b0f4717565237310",
    "scan_failed": "43d03b7c2eda42ab904df3b9359d5148",
    "scan_recovered": "5c91ed128de94f3b9489947f94319252",
}

FIELD_PREFIX = "PORTWATCH_"
# journald's rule (journal_field_valid): A-Z, 0-9, _, no leading digit or '_'
# ('_' fields are the trusted ones journald adds itself), at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# A send waits only while journald is not reading; then the caller falls back to stderr.
SEND_TIMEOUT = 2.0
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
# Too big for one datagram (sd_journal_sendv falls back to a memfd on the same two).
_TOO_BIG = {errno.EMSGSIZE, errno.ENOBUFS}


def valid_field_name(name: str) -> bool:
    return _FIELD_NAME.fullmatch(name) is not None


def field_name(key: str) -> str | None:
    """'pids' -> 'PORTWATCH_PIDS'; None when that is not a valid journal field name."""
    if not key or not key.isascii():  # str.upper() maps e.g. 'ß' to 'SS': refuse, not guess
        return None
    name = FIELD_PREFIX + key.upper()
    return name if valid_field_name(name) else None


def encode_entry(fields: Sequence[tuple[str, str | bytes]]) -> bytes:
    """The native-protocol payload for one entry; ValueError on an invalid field name.

    str values are encoded UTF-8 with surrogateescape, so a process name read
    from /proc arrives as its exact bytes. A value holding a newline gets the
    length-prefixed framing, so it can never start a field of its own.
    """
    out = bytearray()
    for name, value in fields:
        if not valid_field_name(name):
            raise ValueError(f"invalid journal field name: {name!r}")
        data = encode(value) if isinstance(value, str) else bytes(value)
        key = name.encode("ascii")
        if b"\n" in data:
            out += key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key + b"=" + data + b"\n"
    return bytes(out)


class JournalSender(Closing):
    """Sends entries to journald's native socket. send() raises OSError when it cannot."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        # Unconnected: sendto() each time reaches a restarted journald's new socket.
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(SEND_TIMEOUT)

    def send(self, fields: Sequence[tuple[str, str | bytes]]) -> None:
        payload = encode_entry(fields)
        try:
            self._sock.sendto(payload, self.path)
        except OSError as err:
            if err.errno not in _TOO_BIG:
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        # journald accepts a large entry as a sealed memfd passed with an empty datagram;
        # the seals prove to it that we cannot change the data while it reads.
        fd = os.memfd_create("portwatch-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            # sendmsg, not socket.send_fds: 3.11's send_fds ignores its address argument.
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))
            self._sock.sendmsg([b""], [rights], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


def stream_is_journal(env: Mapping[str, str], fds: Sequence[int] = (1, 2)) -> bool:
    """True when stdout or stderr is still the journal stream systemd connected.

    systemd.exec(5): JOURNAL_STREAM is "device:inode" of that stream; compare it
    with fstat() of the fd, since a redirect (e.g. `portwatch ... 2>file`) keeps
    the variable but not the stream.
    """
    dev, sep, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not (dev.isascii() and dev.isdigit() and ino.isascii() and ino.isdigit()):
        return False
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == int(dev) and st.st_ino == int(ino):
            return True
    return False
