"""Following the system journal for failed binds: one long-lived `journalctl` child.

`journalctl --follow -o json` rather than a binding to libsystemd: it is on every
host with journald, it reads every journal file format that host's journald
writes (a library bundled in a wheel can be older than the files), it follows
rotation and vacuuming itself, and it filters (`--grep`, when built with PCRE2)
in its own process, so a flood of unrelated lines costs the daemon nothing.
Resuming after a cursor is `--after-cursor`; a cursor whose entries were
vacuumed resumes at the oldest entry left.

The daemon reads the child's stdout when it is readable, at most READ_LIMIT
bytes per call, so a flood of matching lines cannot starve scans or the
watchdog; a line longer than LINE_LIMIT is dropped, not buffered.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from portwatch.bindfail import field_text

READ_LIMIT = 64 * 1024  # bytes read per wake-up
LINE_LIMIT = 256 * 1024  # a longer JSON line is dropped
STDERR_KEPT = 2048  # bytes of the child's complaints kept for the degraded event
RESTART_AFTER = 30.0  # seconds before a dead child is started again
JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")
# What journalctl itself keeps (PCRE2, case-insensitive); bindfail.parse decides.
GREP = r"address already in use|eaddrinuse|errno 98|could not bind|cannot bind|can't bind|unable to bind"
# Only the fields bindfail reads (journalctl adds __CURSOR and the timestamps).
FIELDS = "MESSAGE,ERRNO,UNIT,_SYSTEMD_UNIT,_SYSTEMD_INVOCATION_ID,_PID,_UID,_COMM,_EXE"
_UNREADABLE_HINT = b"not seeing messages from other users and the system"


class JournalFollower:
    """The child, its output as journal entries, and why it is not running when it is not."""

    def __init__(self, cursor: str | None, since_usec: int | None = None, *, journalctl: str | None = None,
                 directories: tuple[str, ...] = JOURNAL_DIRS) -> None:
        self.cursor = cursor  # the last entry read
        self.since_usec = since_usec  # without a cursor: entries from this time on (None: from now)
        self.problem: str | None = None
        self._journalctl = journalctl or shutil.which("journalctl") or "/usr/bin/journalctl"
        self._directories = directories
        self._grep = True
        self._proc: subprocess.Popen[bytes] | None = None
        self._partial = bytearray()
        self._dropping = False
        self._stderr = bytearray()
        self._died_at: float | None = None

    def start(self, now: float) -> bool:
        """Start following; False (and `problem` says why) when the journal cannot be read, and
        then again RESTART_AFTER seconds later (due_restart)."""
        self._died_at = now
        self.problem = readable_system_journal(self._directories)
        if self.problem is not None:
            return False
        # Every journal, users' too: who failed comes from trusted fields, not from where it is.
        argv = [self._journalctl, "--follow", "--output=json", "--no-pager", f"--output-fields={FIELDS}"]
        if self.cursor:
            argv.append(f"--after-cursor={self.cursor}")
        elif self.since_usec:
            argv.append(f"--since=@{self.since_usec // 1_000_000}.{self.since_usec % 1_000_000:06d}")
        else:
            argv.append("--lines=0")
        if self._grep:
            argv += [f"--grep={GREP}", "--case-sensitive=false"]
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                close_fds=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_COLORS": "0"},
            )
        except OSError as exc:
            self.problem = f"cannot run {self._journalctl}: {exc.strerror or exc}"
            return False
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is None:
                continue
            flags = fcntl.fcntl(pipe.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._partial.clear()
        self._stderr.clear()
        self._dropping = False
        self._died_at = None
        return True


    def fileno(self) -> int | None:
        return self._proc.stdout.fileno() if self._proc is not None and self._proc.stdout else None

    def read(self, now: float) -> list[dict[str, Any]]:
        """The entries that arrived (at most READ_LIMIT bytes' worth); on end of output the
        child is reaped and `problem` says why it stopped."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return []
        self._drain_stderr()
        try:
            chunk = os.read(proc.stdout.fileno(), READ_LIMIT)
        except BlockingIOError:
            return []
        if not chunk:
            self._ended(now)
            return []
        return self._entries(chunk)

    def due_restart(self, now: float) -> bool:
        """A child that ended, or never started, is started again after RESTART_AFTER seconds."""
        return self._proc is None and self._died_at is not None and now - self._died_at >= RESTART_AFTER

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # our own child, by its pid
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def _entries(self, chunk: bytes) -> list[dict[str, Any]]:
        lines = chunk.split(b"\n")
        lines[0] = bytes(self._partial) + lines[0]
        self._partial[:] = lines.pop()
        if len(self._partial) > LINE_LIMIT:
            self._partial.clear()
            self._dropping = True
        entries = []
        for n, line in enumerate(lines):
            if n == 0 and self._dropping:
                self._dropping = False  # the end of a line too long to keep
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                self.cursor = field_text(entry.get("__CURSOR")) or self.cursor
                entries.append(entry)
        return entries

    def _drain_stderr(self) -> None:
        if self._proc is None or self._proc.stderr is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._proc.stderr.fileno(), 4096):
                self._stderr += chunk
                del self._stderr[:-STDERR_KEPT]
        if _UNREADABLE_HINT in self._stderr and self.problem is None:
            self.problem = "journalctl sees only this user's own entries (not in group systemd-journal)"

    def _ended(self, now: float) -> None:
        proc = self._proc
        if proc is None:
            return
        self._drain_stderr()
        self.close()
        said = self._stderr.decode("utf-8", "replace").strip().splitlines()
        if self._grep and any("pattern" in line.lower() or "pcre" in line.lower() for line in said):
            self._grep = False  # built without PCRE2: filter here instead
            self._died_at = now - RESTART_AFTER
            return
        if self.cursor is not None and any("cursor" in line.lower() for line in said):
            self.cursor = self.since_usec = None  # not this journal's (a copied state file): from now
            self._died_at = now - RESTART_AFTER
            return
        why = said[-1] if said else f"exit status {proc.returncode}"
        self.problem = f"journalctl stopped: {why}"
        self._died_at = now


def readable_system_journal(directories: tuple[str, ...] = JOURNAL_DIRS) -> str | None:
    """None when a system journal file can be read here; else why not."""
    found = False
    for top in directories:
        try:
            files = [machine / "system.journal" for machine in Path(top).iterdir()]
        except OSError:
            continue
        for path in files:
            if path.exists():
                found = True
                if os.access(path, os.R_OK):
                    return None
    if found:
        return ("the system journal is not readable by this user "
                "(SupplementaryGroups=systemd-journal in the unit gives that)")
    return f"no system journal in {' or '.join(directories)} (is systemd-journald running?)"

