"""The daemon's memory across restarts: the last snapshot, kept in a state file.

Written atomically (temporary file, fsync, rename, fsync of the directory),
so a crash or power loss leaves either the old file or the new one, never a
torn one. A file that cannot be read back is reported and replaced, never fatal.
Socket inodes only mean something within one boot, so the file records the
boot id and a file from another boot is not used.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from portwatch.model import Container, Listener, NetNs, Process, Proto, Snapshot, Socket, Unresolved

FORMAT_VERSION = 1
FILE_NAME = "state.json"
DEFAULT_DIR = "/var/lib/portwatch"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


class StateError(Exception):
    """The state file exists but cannot be used; the message says why."""


@dataclass(slots=True)
class SavedState:
    snapshot: Snapshot
    # inode -> pids of the owner set already reported as reserved_port_taken
    taken: dict[int, list[int]] = field(default_factory=dict)
    saved_at: str = ""
    # inode -> when portwatch first saw that listener (seconds since the epoch)
    seen: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class JournalPosition:
    """Where the journal was read up to, kept across reboots (cursors are not per boot)."""

    cursor: str | None = None
    since_usec: int | None = None  # without a cursor: read the entries from this time on
    # "unit port" -> journal time (usec) of the last failure reported for it
    reported: dict[str, int] = field(default_factory=dict)


def state_dir(option: str | None, configured: str | None, env: Mapping[str, str]) -> str:
    """--state-dir, then the config's state_dir, then systemd's $STATE_DIRECTORY, then the default."""
    if option:
        return option
    if configured:
        return configured
    from_systemd = env.get("STATE_DIRECTORY", "").split(":")[0]
    return from_systemd or DEFAULT_DIR


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()
    except OSError:
        return ""


class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME)
        self.boot = boot_id()

    def load(self) -> SavedState | None:
        """The saved state, None when there is none (first start) or it is from another boot.

        Raises StateError for a file that is unreadable, truncated or not ours.
        """
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise StateError(f"{self.path}: not a portwatch state file of version {FORMAT_VERSION}")
            if data.get("boot_id") != self.boot:
                return None
            return _decode(data)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise StateError(f"{self.path}: corrupt ({type(exc).__name__}: {exc})") from None

    def load_journal(self) -> JournalPosition:
        """The journal position saved by any boot; a missing or unusable file gives none."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            journal = data.get("journal") or {}
            cursor, since = journal.get("cursor"), journal.get("since_usec")
            reported = {str(k): int(v) for k, v in (journal.get("reported") or {}).items()}
            return JournalPosition(cursor if isinstance(cursor, str) and cursor else None,
                                   since if isinstance(since, int) and since > 0 else None, reported)
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            return JournalPosition()

    def save(self, snapshot: Snapshot, taken: Mapping[int, list[int]], saved_at: str, *,
             seen: Mapping[int, float] | None = None, journal: JournalPosition | None = None) -> None:
        """Replace the state file atomically. Raises OSError (the caller reports it).

        Written one listener at a time: the whole document as objects and
        text would cost a host with ten thousand listeners some 20 MiB at
        every save, and a long-running daemon keeps such a peak as RSS.
        """
        head = {
            "version": FORMAT_VERSION,
            "boot_id": self.boot,
            "saved_at": saved_at,
            "complete": snapshot.complete,
            "taken": {str(inode): pids for inode, pids in taken.items()},
            "journal": {"cursor": journal.cursor, "since_usec": journal.since_usec,
                        "reported": journal.reported} if journal else None,
        }
        seen = seen or {}
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=self.directory)
        try:
            # ASCII only: process names that are not UTF-8 survive as \udcXX escapes.
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(json.dumps(head)[:-1] + ', "listeners": [')
                for n, listener in enumerate(snapshot.listeners.values()):
                    since = seen.get(listener.socket.inode)
                    f.write((", " if n else "") + json.dumps(_encode_listener(listener, since)))
                f.write("]}")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # the rename itself is durable only once the directory is
        finally:
            os.close(dfd)


def _encode_listener(listener: Listener, since: float | None = None) -> dict[str, Any]:
    s = listener.socket
    units = {"socket_unit": listener.socket_unit, "service_unit": listener.service_unit}
    netns = listener.netns
    return {
        **(units if listener.socket_unit is not None else {}),
        **({"netns": _encode_netns(netns)} if netns is not None else {}),
        **({"since": since} if since is not None else {}),
        "proto": s.proto.value, "family": s.family, "address": s.address, "port": s.port,
        "inode": s.inode, "uid": s.uid,
        "unresolved": listener.unresolved.value if listener.unresolved else None,
        "processes": [
            {"pid": p.pid, "comm": p.comm, "exe": p.exe, "cmdline": list(p.cmdline),
             "uid": p.uid, "user": p.user, "unit": p.unit}
            for p in listener.processes
        ],
    }


def _decode(data: dict[str, Any]) -> SavedState:
    listeners: dict[int, Listener] = {}
    seen: dict[int, float] = {}
    for item in data["listeners"]:
        sock = Socket(
            Proto(item["proto"]), int(item["family"]), str(item["address"]), int(item["port"]),
            int(item["inode"]), int(item["uid"]),
        )
        processes = tuple(
            Process(
                int(p["pid"]), str(p["comm"]), None if p["exe"] is None else str(p["exe"]),
                tuple(str(a) for a in p["cmdline"]),
                None if p["uid"] is None else int(p["uid"]),
                _optional_str(p["user"]), _optional_str(p["unit"]),
            )
            for p in item["processes"]
        )
        unresolved = Unresolved(item["unresolved"]) if item["unresolved"] else None
        if item.get("since") is not None:
            seen[sock.inode] = float(item["since"])
        listeners[sock.inode] = Listener(
            sock, processes, unresolved, _optional_str(item.get("socket_unit")),
            _optional_str(item.get("service_unit")), _decode_netns(item.get("netns")),
        )
    taken = {int(k): [int(p) for p in v] for k, v in data.get("taken", {}).items()}
    snapshot = Snapshot(listeners, complete=bool(data.get("complete", True)))
    return SavedState(snapshot, taken, str(data.get("saved_at", "")), seen)


def _encode_netns(netns: NetNs) -> dict[str, Any]:
    c = netns.container
    return {"id": netns.id, "name": netns.name, **({"host": True} if netns.host else {}),
            **({"container": [c.engine, c.id, c.name]} if c is not None else {})}


def _decode_netns(item: Any) -> NetNs | None:
    """A saved listener's namespace (None in a file from before namespaces were watched)."""
    if item is None:
        return None
    c = item.get("container")
    container = Container(str(c[0]), str(c[1]), _optional_str(c[2])) if c else None
    return NetNs(int(item["id"]), str(item["name"]), bool(item.get("host", False)), container)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)
