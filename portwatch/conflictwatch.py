"""The daemon's journal side: follow the journal, turn failed binds into port_conflict events.

A thin driver: the follower (portwatch.journalfollow) reads, portwatch.bindfail parses,
the reporter's portwatch.conflicts decides when a conflict is reported and
Reporter.conflict says it. The follower's fd is registered in the daemon's selector
(data "journal") while the child runs; a child that ended is started again later.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from portwatch.activation import Unavailable
from portwatch.bindfail import field_text, parse
from portwatch.model import Listener, Proto
from portwatch.policy import Rule
from portwatch.report import Reporter
from portwatch.state import JournalPosition


class Journal(Protocol):
    """The journal as it is followed (portwatch.journalfollow.JournalFollower)."""

    cursor: str | None
    problem: str | None

    def start(self) -> bool: ...
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
        self, journal: Journal | None, report: Reporter, reopen: Callable[[], Journal | None]
    ) -> None:
        self.journal = journal
        self.reporter = report
        self.selector: selectors.BaseSelector | None = None
        self._reopen = reopen  # a new follower, when a reload turns following on
        self._fd: int | None = None
        self._started_usec = 0  # entries older than the daemon's start happened while it was down

    def start(self, *, started_usec: int) -> None:
        self._started_usec = started_usec
        self._follow()

    def want(self, wanted: bool) -> None:
        """follow_journal changed by a reload: start or stop following."""
        if wanted and self.journal is None:
            self.journal = self._reopen()
            self._follow()
        elif not wanted and self.journal is not None:
            self._unregister()
            self.journal.close()
            self.journal = None

    def read(self, now: float, rules: Iterable[Rule]) -> bool:
        """What the journal has for us; True when the saved position moved."""
        if self.journal is None:
            return False
        before = self.journal.cursor
        entries = self.journal.read(now)
        for entry in entries:
            failure = parse(entry)
            if failure is not None:
                self.reporter.conflicts.observe(
                    failure, now, cursor_before=before or "", rules=rules, listen_of=socket_listen,
                    while_down=0 < failure.realtime_usec < self._started_usec,
                )
            before = field_text(entry.get("__CURSOR")) or before
        if self.journal.fileno() is None and self._fd is not None:
            self._unregister()  # the child ended: said once, started again later
            self.reporter.journal_unreadable(self.journal.problem)
        return bool(entries)

    def report_due(self, now: float, scanned_after: float, listening: Iterable[Listener]) -> bool:
        """Report the conflicts that are due (and restart a follower that ended); True if any."""
        if self.journal is not None and self.journal.due_restart(now):
            self._follow()
        due = self.reporter.conflicts.due(now, scanned_after)
        for episode in due:
            self.reporter.conflict(episode, listening)
        return bool(due)

    def flush(self, now: float, listening: Iterable[Listener]) -> None:
        """What is still open when stopping is reported now, with what is known."""
        for episode in self.reporter.conflicts.flush(now):
            self.reporter.conflict(episode, listening)

    def position(self) -> JournalPosition | None:
        if self.journal is None:
            return None
        conflicts = self.reporter.conflicts
        cursor = conflicts.cursor_before_open() or self.journal.cursor
        return JournalPosition(cursor, dict(conflicts.reported))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def _follow(self) -> None:
        if self.journal is None or self.selector is None:
            return
        fd = self.journal.fileno() if self.journal.start() else None
        if fd is None:
            self.reporter.journal_unreadable(self.journal.problem)
            return
        self._fd = fd
        self.selector.register(fd, selectors.EVENT_READ, "journal")

    def _unregister(self) -> None:
        if self._fd is not None and self.selector is not None:
            self.selector.unregister(self._fd)
        self._fd = None
