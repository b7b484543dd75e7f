"""Reading journal entries back: one `journalctl --output=json` child, streamed.

journalctl rather than a binding to libsystemd, for the reasons the daemon's
follower gives (portwatch.journalfollow): it is on every host with journald, it
reads every file format that host's journald writes, it reads a journal copied
from another host (--directory, --file), and it does the field matching in its
own process. Its stdout is read line by line, so a large journal never sits in
memory here. Every way it can fail (not installed, no journal files, a directory
that does not exist or cannot be read, a time it cannot parse) becomes one
JournalError with a one-line message; the child is killed and reaped whenever
reading stops early.

With --output=json journalctl is quiet: it says neither "No journal files were
found" nor that a user sees only their own entries. So the journal files are
looked at here first (a listing and an open() of each, no reading): none at all
is an error, and files this user cannot open are named (`unreadable`), so that
the caller can say its answer lacks their entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from portwatch.text import escape

# What the daemon's follower gives journalctl: no locale surprises, no colours. TZ is passed on
# when set, so that journalctl reads --since/--until in the zone the table is printed in.
BASE_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_COLORS": "0"}
JOURNAL_DIRS = ("/var/log/journal", "/run/log/journal")  # journalctl's own, without --directory/--file
STDERR_KEPT = 16 * 1024  # bytes of journalctl's complaints kept (the rest is read and dropped)
# journalctl's words (systemd 252) for the cases that get a message of their own.
OWN_ONLY_HINT = "not seeing messages from other users and the system"
NO_FILES = "No journal files were found"
NO_PERMISSION = "insufficient permissions"
_BAD_ARGUMENT = ("Failed to parse", "must be before")


class JournalError(Exception):
    """The journal could not be read; str() is one line. `usage`: an argument journalctl refused
    (a time it cannot parse), not a journal that is missing."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def journalctl_argv(
    groups: Sequence[Sequence[str]], *, since: str | None = None, until: str | None = None,
    directory: str | None = None, files: Sequence[str] = (), journalctl: str = "journalctl",
) -> list[str]:
    """The command line: entries matching any of `groups` (each a list of FIELD=value matches, all
    of which must hold; a field given twice in a group matches either value).

    --all: without it journalctl -o json writes a field longer than 4096 bytes as null
    (a long command line). Options take their value after '=' so that a value starting
    with '-' stays a value.
    """
    argv = [journalctl, "--output=json", "--no-pager", "--all"]
    if directory is not None:
        argv.append(f"--directory={directory}")
    argv += [f"--file={path}" for path in files]
    if since is not None:
        argv.append(f"--since={since}")
    if until is not None:
        argv.append(f"--until={until}")
    for n, group in enumerate(groups):
        if n:
            argv.append("+")  # journalctl's OR of match groups
        argv += group
    return argv


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    source = os.environ if env is None else env
    return {**BASE_ENV, **({"TZ": source["TZ"]} if source.get("TZ") else {})}


class JournalRead:
    """One run of journalctl over the system journal, a directory, or files.

    `entries()` yields its JSON objects. `unreadable`: journal files there that this user
    cannot open, whose entries are then missing (journalctl reads the others); `own_only`:
    journalctl said it sees only this user's own entries (set once the entries are read).
    """

    def __init__(
        self, groups: Sequence[Sequence[str]], *, since: str | None = None, until: str | None = None,
        directory: str | None = None, files: Sequence[str] = (), journalctl: str = "journalctl",
        roots: Sequence[str] = JOURNAL_DIRS, env: dict[str, str] | None = None,
    ) -> None:
        self.argv = journalctl_argv(groups, since=since, until=until, directory=directory, files=files,
                                    journalctl=journalctl)
        self.directory = directory
        self.files = tuple(files)
        self.roots = tuple(roots)
        self.env = environment() if env is None else env
        self.unreadable: list[str] = []
        self.own_only = False

    @property
    def where(self) -> str:
        """What is read, for messages."""
        if self.directory is not None:
            return f"the journal in {escape(self.directory)}"
        if self.files:
            return f"the journal file{'s' if len(self.files) > 1 else ''} {escape(', '.join(self.files))}"
        return "the system journal"

    @property
    def incomplete(self) -> bool:
        return self.own_only or bool(self.unreadable)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Each entry as journalctl's JSON object; JournalError when the journal cannot be read."""
        self._survey()
        try:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                close_fds=True, env=self.env,
            )
        except OSError as exc:
            raise JournalError(f"cannot run {escape(self.argv[0])}: {exc.strerror or exc}") from None
        out, err = proc.stdout, proc.stderr
        if out is None or err is None:  # never: both are pipes
            raise JournalError(f"cannot run {escape(self.argv[0])}: no pipes")
        # stderr on a thread of its own: a journalctl that says much (a warning per damaged file)
        # must not block on a full pipe while this reads stdout.
        complaints = _Drain(err)
        try:
            for line in out:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # not an entry (journalctl writes only entries on stdout)
                if isinstance(entry, dict):
                    yield entry
            status = proc.wait()
        finally:
            if proc.poll() is None:  # the reader stopped early, or failed: our child, by its pid
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
            complaints.join()
            out.close()
            err.close()
        self._check(status, complaints.text())

    def _survey(self) -> None:
        """No journal file at all is an error; those that cannot be opened go to `unreadable`.
        Where the listing itself fails (a directory that is not there), journalctl says why."""
        found = journal_files(self.directory, self.files, self.roots)
        if found is None:
            return
        if not found:
            there = "there" if self.directory is not None or self.files else (
                f"in {' or '.join(self.roots)} (is systemd-journald running?)")
            raise JournalError(f"cannot read {self.where}: no journal files {there}")
        self.unreadable = [path for path in found if not _can_open(path)]

    def _check(self, status: int, said: str) -> None:
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        self.own_only = OWN_ONLY_HINT in said
        problems = [line for line in lines if not line.startswith("Hint:") and OWN_ONLY_HINT not in line]
        if status != 0:
            why = problems[0] if problems else (
                f"killed by signal {-status}" if status < 0 else f"exit status {status}")
            if NO_PERMISSION in why:
                why += " (root, or a member of group systemd-journal or adm, can read it)"
            usage = any(word in why for word in _BAD_ARGUMENT)
            raise JournalError(f"cannot read {self.where}: journalctl: {escape(why)}", usage=usage)
        if any(NO_FILES in line for line in lines):
            raise JournalError(f"cannot read {self.where}: journalctl found no journal files there")


def journal_files(directory: str | None, files: Sequence[str], roots: Sequence[str] = JOURNAL_DIRS
                  ) -> list[str] | None:
    """The journal files journalctl would open; None when that cannot be told (a directory
    missing or not listable: journalctl's own error says more).

    --file: each path (a glob is left to journalctl). --directory: its *.journal files and
    those of its machine-id subdirectories, as journalctl looks. Neither: this machine's
    subdirectory of each of `roots` (journalctl reads another machine's only with --merge).
    """
    if files:
        plain = [path for path in files if not any(c in path for c in "*?[")]
        return plain if len(plain) == len(files) else None
    found: list[str] = []
    local = _machine_id()
    for top in [directory] if directory is not None else roots:
        try:
            children = list(Path(top).iterdir())
        except OSError:
            if directory is not None:
                return None
            continue  # journalctl skips a missing default directory too
        for child in children:
            if _is_journal(child.name):
                found.append(str(child))
            elif child.is_dir() and (directory is not None or local in (None, child.name)):
                with contextlib.suppress(OSError):
                    found += [str(p) for p in child.iterdir() if _is_journal(p.name)]
    return found


def _machine_id() -> str | None:
    try:
        return Path("/etc/machine-id").read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None  # then every machine's directory counts


def _is_journal(name: str) -> bool:
    return name.endswith((".journal", ".journal~"))


def _can_open(path: str) -> bool:
    """An open() as journalctl does it (ACLs and groups included), nothing read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return True  # rotated away meanwhile: not a file this user cannot read
    except OSError:
        return False
    os.close(fd)
    return True


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the first STDERR_KEPT bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self._pipe = pipe
        self._kept = bytearray()
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(self._pipe.fileno(), 4096):
                if len(self._kept) < STDERR_KEPT:
                    self._kept += chunk[: STDERR_KEPT - len(self._kept)]

    def text(self) -> str:
        return self._kept.decode("utf-8", "replace")
