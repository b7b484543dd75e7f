"""When the daemon scans early and when it saves its state. Pure: times are given, never read."""

from __future__ import annotations

from collections.abc import Iterable

# After a fork or exec, look at the new process every EARLY_SCAN_PERIOD for EARLY_SCAN_WINDOW: a
# new server usually binds within a few hundred milliseconds of starting. A process is looked at
# from a period after its event (read when the event is, at the latest at the next look), so
# one that exits at once (cron jobs, monitoring scripts, the bulk of what a busy host starts) is
# gone by then and costs no look.
EARLY_SCAN_PERIOD = 0.1
EARLY_SCAN_WINDOW = 1.0
# The state file is rewritten at most this often once what a restart must not repeat changed
# (a squatter reported, whose hooks ran; the journal read for conflicts), and at stop.
STATE_SAVE_EVERY = 5.0
# ... and this often when only listeners opened, closed or changed owners: a whole rewrite costs
# a large host a quarter of a second, and after a crash the startup diff finds those again.
STATE_SAVE_CHANGES_EVERY = 60.0


class Pacer:
    """When to scan: once per interval, keeping the cadence; and every EARLY_SCAN_PERIOD while a
    process the proc connector saw fork or exec within EARLY_SCAN_WINDOW is still running (its
    exit ends that)."""

    __slots__ = ("_fresh", "_young", "execs", "interval", "last_scan", "next_regular")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_scan = float("-inf")  # when the last scan (or look at young processes) began
        self.next_regular = float("-inf")
        # pid -> (when it was first seen start, when its window ends), until it exits
        self._young: dict[int, tuple[float, float]] = {}
        self._fresh: set[int] = set()  # young pids that forked or exec'd since the last look
        self.execs: list[int] = []  # exec'd since the last take(): their details must be read again

    def saw(self, events: Iterable[tuple[str, int]], now: float) -> None:
        """The proc connector's (kind, pid) events; an overrun loses the young processes (a
        regular scan looks at every new process anyway)."""
        young, fresh = self._young, self._fresh
        for kind, pid in events:
            if kind == "fork":
                young[pid] = (now, now + EARLY_SCAN_WINDOW)
                fresh.add(pid)
            elif kind == "exec":
                # A new program: its window starts again, but the look is not put off (the exec
                # of a fork read late, at a look, would put off the look at what it runs).
                young[pid] = (young[pid][0] if pid in young else now, now + EARLY_SCAN_WINDOW)
                fresh.add(pid)
                self.execs.append(pid)
            elif kind == "exit":
                young.pop(pid, None)
                fresh.discard(pid)
            elif kind == "overrun":
                young.clear()
                fresh.clear()

    def young(self, now: float) -> set[int]:
        """The processes that started or exec'd within the window and have not exited."""
        if any(until <= now for _, until in self._young.values()):
            self._young = {pid: times for pid, times in self._young.items() if times[1] > now}
            self._fresh &= self._young.keys()
        return set(self._young)

    def fresh(self) -> set[int]:
        """The young processes that forked or exec'd since the last call: what was seen of them
        before (a pid reused, a program replaced) no longer holds."""
        fresh, self._fresh = self._fresh, set()
        return fresh

    def due(self, now: float) -> set[int]:
        """The young processes first seen starting at least EARLY_SCAN_PERIOD ago: those worth
        a look now (a younger one has most likely not even exec'd its program yet)."""
        settled = now - EARLY_SCAN_PERIOD
        return {pid for pid, (since, until) in self._young.items() if since <= settled and now < until}

    def take(self, now: float) -> tuple[set[int], list[int]]:
        """The pids to read at a scan now (the young ones), and those that exec'd since the last
        take (forgotten here)."""
        execs, self.execs = self.execs, []
        return self.young(now), execs

    def waiting(self, now: float) -> bool:
        """An early scan is coming: the connector's events can wait for it (read all at once then,
        exits included) rather than wake the daemon one by one."""
        return bool(self.young(now))

    def next_scan(self, now: float) -> float:
        """When the next scan is due: the regular one, or sooner while young processes run."""
        young = self.young(now)
        if not young:
            return self.next_regular
        first_due = min(self._young[pid][0] for pid in young) + EARLY_SCAN_PERIOD
        return min(self.next_regular, max(self.last_scan + EARLY_SCAN_PERIOD, first_due))

    def early(self, now: float) -> bool:
        """A scan now is an early one (between two regular scans)."""
        return now < self.next_regular

    def scanning(self, now: float) -> None:
        """A scan (or a look at the young processes) begins now; a regular one sets the next
        (after a scan slower than the interval, the cadence starts afresh)."""
        self.last_scan = now
        if now >= self.next_regular:
            self.next_regular += self.interval
            if self.next_regular <= now:
                self.next_regular = now + self.interval


class SaveThrottle:
    """Save the state when it changed: within STATE_SAVE_EVERY when `urgent`, within
    STATE_SAVE_CHANGES_EVERY when only `dirty` (always when forced)."""

    __slots__ = ("_saved_at", "dirty", "urgent")

    def __init__(self) -> None:
        self.dirty = False  # listeners changed
        self.urgent = False  # what a restart must not repeat changed
        self._saved_at = float("-inf")

    def due(self, now: float, *, force: bool = False) -> bool:
        since = now - self._saved_at
        return force or (self.urgent and since >= STATE_SAVE_EVERY) or (
            self.dirty and since >= STATE_SAVE_CHANGES_EVERY)

    def saved(self, now: float) -> None:
        self.dirty = self.urgent = False
        self._saved_at = now
