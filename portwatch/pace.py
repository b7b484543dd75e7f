"""When the daemon scans early and when it saves its state. Pure: times are given, never read."""

from __future__ import annotations

from collections.abc import Iterable

# After a fork or exec, rescan at this pace for a while: a new process usually binds within a
# few hundred milliseconds of starting.
EARLY_SCAN_PERIOD = 0.1
EARLY_SCAN_WINDOW = 1.0
# The state file is rewritten at most this often while things change (and at stop); after a
# crash the changes since are found again by the startup diff.
STATE_SAVE_EVERY = 5.0


class Pacer:
    """When to scan: once per interval, keeping the cadence; and while processes start (the
    proc connector saw them fork or exec), every EARLY_SCAN_PERIOD, reading only those."""

    __slots__ = ("_hints", "_until", "execs", "interval", "last_scan", "next_regular")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_scan = float("-inf")  # when the last scan began
        self.next_regular = float("-inf")
        self._hints: set[int] = set()
        self._until = float("-inf")
        self.execs: list[int] = []  # exec'd since the last take(): their details must be read again

    def saw(self, events: Iterable[tuple[str, int]], now: float) -> None:
        """The proc connector's (kind, pid) events; an overrun loses the hints (a regular scan
        looks at every new process anyway)."""
        execs = []
        for kind, pid in events:
            if kind in ("fork", "exec"):
                self._hints.add(pid)
                if kind == "exec":
                    execs.append(pid)
            elif kind == "overrun":
                self._hints.clear()
        self.execs += execs
        if self._hints or execs:
            self._until = now + EARLY_SCAN_WINDOW

    def take(self) -> tuple[set[int], list[int]]:
        """The pids to read at the next scan, and those that exec'd; both forgotten here."""
        hints, self._hints = self._hints, set()
        execs, self.execs = self.execs, []
        return hints, execs

    def next_scan(self, now: float) -> float:
        """When the next scan is due: the regular one, or sooner while processes are starting."""
        if self._until > now:
            return min(self.next_regular, self.last_scan + EARLY_SCAN_PERIOD)
        return self.next_regular

    def early(self, now: float) -> bool:
        """A scan now is an early one (between two regular scans)."""
        return now < self.next_regular

    def scanning(self, now: float) -> None:
        """A scan begins now; a regular one sets the next (after a scan slower than the
        interval, the cadence starts afresh)."""
        self.last_scan = now
        if now >= self.next_regular:
            self.next_regular += self.interval
            if self.next_regular <= now:
                self.next_regular = now + self.interval


class SaveThrottle:
    """Save the state when it changed, at most once per STATE_SAVE_EVERY (always when forced)."""

    __slots__ = ("_saved_at", "dirty")

    def __init__(self) -> None:
        self.dirty = False
        self._saved_at = float("-inf")

    def due(self, now: float, *, force: bool = False) -> bool:
        return force or (self.dirty and now - self._saved_at >= STATE_SAVE_EVERY)

    def saved(self, now: float) -> None:
        self.dirty = False
        self._saved_at = now
