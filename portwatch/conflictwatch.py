"""The daemon's journal side: follow the journal, turn failed binds into port_conflict events.

A thin driver: the follower (portwatch.journalfollow) reads, portwatch.bindfail parses,
the reporter's portwatch.conflicts decides when a conflict is reported and
Reporter.conflict says it. The follower's fd is registered in the daemon's selector
(data "journal") while the child runs; a child that ended is started again later.
"""

from __future__ import annotations

import os
import selectors
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from portwatch.activation import Unavailable
from portwatch.bindfail import Own, field_text, parse
from portwatch.model import Listener, Proto
from portwatch.policy import Rule
from portwatch.report import Reporter
from portwatch.state import JournalPosition


class Journal(Protocol):
    """The journal as it is followed (portwatch.journalfollow.JournalFollower)."""

    cursor: str | None
    problem: str | None

    def start(self, now: float) -> bool: ...
    def fileno(self) -> int | None: ...
    def read(self, now: float) -> list[dict[str, Any]]: ...
    def due_restart(self, now: float) -> bool: ...
    def close(self) -> None: ...


def socket_listen(unit: str) -> tuple[Proto, int] | None:
    """The first IP port a socket unit listens on, asked of systemd (for failures naming none)."""
    from portwatch.sdbus import socket_units  # noqa: PLC0415 (rarely needed)

    try:
        units = socket_units()
    except Unavailable:
        return None
    listens = next((u.listens for u in units if u.name == unit), ())
    return (listens[0].proto, listens[0].port) if listens else None


class ConflictWatch:
    def __init__(
        self, journal: Journal | None, report: Reporter, reopen: Callable[[], Journal | None],
        *, wall: Callable[[], float],
    ) -> None:
        self.journal = journal
        self.reporter = report
        self.wall = wall
        self.own = Own(os.getpid(), os.environ.get("INVOCATION_ID"))  # its entries are never failures
        self.selector: selectors.BaseSelector | None = None
        self._reopen = reopen  # a new follower, when a reload turns following on
        self._fd: int | None = None
        self._started_usec = 0  # entries older than the daemon's start happened while it was down

    def start(self, now: float, *, started_usec: int) -> None:
        self._started_usec = started_usec
        self._follow(now)

    def want(self, wanted: bool, now: float) -> None:
        """follow_journal changed by a reload: start or stop following."""
        if wanted and self.journal is None:
            self.journal = self._reopen()
            self._follow(now)
        elif not wanted and self.journal is not None:
            self._unregister()
            self.journal.close()
            self.journal = None
            self.reporter.journal_unreadable(None)

    def read(self, now: float, rules: Iterable[Rule]) -> bool:
        """What the journal has for us; True when the saved position moved."""
        if self.journal is None:
            return False
        before = self.journal.cursor
        entries = self.journal.read(now)
        for entry in entries:
            failure = parse(entry, self.own)
            if failure is not None:
                self.reporter.conflicts.observe(
                    failure, now, cursor_before=before, rules=rules, listen_of=socket_listen,
                    while_down=0 < failure.realtime_usec < self._started_usec,
                )
            before = field_text(entry.get("__CURSOR")) or before
        if self.journal.fileno() is None:
            self._unregister()  # the child ended: said once, started again later
        if self.journal.problem is not None:
            self.reporter.journal_unreadable(self.journal.problem)
        return bool(entries)

    def report_due(self, now: float, scanned_after: float, listening: Iterable[Listener]) -> bool:
        """Report the conflicts that are due (and restart a follower that ended); True if any."""
        if self.journal is not None and self.journal.due_restart(now):
            self._follow(now)
        due = self.reporter.conflicts.due(now, scanned_after)
        for episode in due:
            self.reporter.conflict(episode, listening)
        return bool(due)

    def position(self) -> JournalPosition | None:
        """Where to read from after a restart: before the oldest conflict not reported yet (it is
        reported then), else after the last entry read, else from now."""
        if self.journal is None:
            return None
        reported = dict(self.reporter.conflicts.reported)
        oldest = self.reporter.conflicts.oldest_open()
        if oldest is not None:
            if oldest.cursor_before is not None:
                return JournalPosition(oldest.cursor_before, None, reported)
            return JournalPosition(None, oldest.first.realtime_usec, reported)
        if self.journal.cursor is not None:
            return JournalPosition(self.journal.cursor, None, reported)
        return JournalPosition(None, int(self.wall() * 1e6), reported)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def _follow(self, now: float) -> None:
        if self.journal is None or self.selector is None:
            return
        fd = self.journal.fileno() if self.journal.start(now) else None
        if fd is None:
            self.reporter.journal_unreadable(self.journal.problem)
            return
        self._fd = fd
        self.selector.register(fd, selectors.EVENT_READ, "journal")
        self.reporter.journal_unreadable(None)

    def _unregister(self) -> None:
        if self._fd is not None and self.selector is not None:
            self.selector.unregister(self._fd)
        self._fd = None
