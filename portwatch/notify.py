"""Telling systemd how the daemon is doing (sd_notify), through the sdnotify package.

sdnotify sends the datagram; this wrapper adds what it lacks:
- no socket at all outside systemd: SystemdNotifier() always makes one and, when
  NOTIFY_SOCKET is unset, drops it unclosed (a ResourceWarning);
- the address comes from the mapping we are given, not from os.environ;
- RELOADING=1 carries MONOTONIC_USEC in the same datagram;
- STATUS= text is one ASCII line: sdnotify encodes latin-1 and would silently
  drop anything else, and process names are attacker-controlled;
- WATCHDOG_USEC/WATCHDOG_PID are honoured as sd_watchdog_enabled(3) says.

Error policy: sdnotify is used with debug=True so send errors reach us. An
OSError (socket gone, systemd busy) never reaches the daemon: the method
returns False and keeps the error in `last_error`, and the next call connects
afresh. Anything else is a bug here and is not hidden.

A lock keeps a reconnect from racing a send, so hook workers may call
status() while the main loop pings the watchdog.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Mapping

import sdnotify

from portwatch.closing import Closing
from portwatch.text import escape

STATUS_LIMIT = 200
# A send blocks only if systemd stops reading; give up rather than starve the watchdog loop.
SEND_TIMEOUT = 2.0
# Errors that mean "this connection is stale", worth one fresh connect at once.
_STALE = {errno.ECONNREFUSED, errno.ENOTCONN, errno.ENOENT, errno.EPIPE, errno.EBADF}


def socket_address(value: str | None) -> str | None:
    """NOTIFY_SOCKET as a connect() address: a path, or '@name' for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and relative paths are not understood by systemd 252 either


def ascii_line(text: str, limit: int = STATUS_LIMIT) -> str:
    r"""`text` as one printable ASCII line of at most `limit` characters.

    Controls become escapes (portwatch.text.escape), other non-ASCII becomes
    \uXXXX / \UXXXXXXXX; a cut never splits an escape.
    """
    pieces: list[str] = []
    for ch in escape(text):
        code = ord(ch)
        if code < 0x80:
            pieces.append(ch)
        elif code <= 0xFFFF:
            pieces.append(f"\\u{code:04x}")
        else:
            pieces.append(f"\\U{code:08x}")
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > limit - 3:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out) + "..."


class _Transport(sdnotify.SystemdNotifier):  # type: ignore[misc]  # sdnotify is untyped
    """sdnotify's sender, connected to the address we were given instead of os.environ's."""

    def __init__(self, address: str) -> None:
        # Not calling super().__init__: it reads os.environ and swallows errors.
        self.debug = True  # notify() re-raises; Notifier decides what to swallow
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.settimeout(SEND_TIMEOUT)
            self.socket.connect(address)
        except BaseException:
            self.socket.close()
            raise

    def close(self) -> None:
        self.socket.close()


class Notifier(Closing):
    """sd_notify for the daemon; every method is a no-op returning False outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        if env is None:
            env = os.environ
        self._address = socket_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        pid = env.get("WATCHDOG_PID")
        # Set but unparsable (even empty) means "not for us", as in sd_watchdog_enabled(3).
        self._watchdog_pid: int | None = _positive_int(pid) if pid is not None else os.getpid()
        self._transport: _Transport | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.last_error: OSError | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None and not self._closed

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None when not asked for."""
        if self._watchdog_usec is None or self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self._send("READY=1")
        return self._send("READY=1", "STATUS=" + ascii_line(status))

    def reloading(self) -> bool:
        # systemd matches the reload to this timestamp, so both go in one datagram.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self._send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self._send("STATUS=" + ascii_line(text))

    def watchdog(self) -> bool:
        if self.watchdog_interval is None:
            return False
        return self._send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
                self._transport = None

    def _send(self, *lines: str) -> bool:
        if self._address is None or self._closed:
            return False
        message = "\n".join(lines)
        # Every caller builds ASCII lines; sdnotify would drop anything else silently.
        if not message.isascii():
            raise ValueError("sd_notify message must be ASCII")
        with self._lock:
            for attempt in (1, 2):
                reused = self._transport is not None
                try:
                    if self._transport is None:
                        self._transport = _Transport(self._address)
                    self._transport.notify(message)
                except OSError as err:
                    self.last_error = err
                    if self._transport is not None:
                        self._transport.close()
                        self._transport = None
                    # A connection made earlier may be stale (systemd re-bound the socket):
                    # one fresh try. A fresh one that fails will fail again; do not wait twice.
                    if attempt == 1 and reused and err.errno in _STALE:
                        continue
                    return False
                else:
                    self.last_error = None
                    return True
        return False


def _positive_int(value: str | None) -> int | None:
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    number = int(value)
    return number if number > 0 else None
