"""The watcher: scan, diff, judge, report, run hooks; reload and stop on request.

One thread runs the loop below; hooks run on the hook runner's threads. The
loop sleeps in one `select` over a signal wake-up pipe, the config watcher's
inotify fd and the proc connector, so a signal, a config edit or a new
process wakes it at once (while a look at young processes is coming, the
connector's events wait for it instead). Signal handlers only set flags. The decisions are
pure and live elsewhere: what to report (snapshot.diff, judge.Judge), when to
scan early and when to save (pace), how to scan (scan.Scanner).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from portwatch.config import DEFAULT_PATH, Config, ConfigError, MetricsSettings, load_config
from portwatch.conflictwatch import ConflictWatch, Journal
from portwatch.events import status_line
from portwatch.gauges import Published
from portwatch.hooks import HookRunner
from portwatch.libc import drop_ambient_capabilities, release_free_heap
from portwatch.log import EventLog, choose_format
from portwatch.model import Listener, Proto, Snapshot
from portwatch.notify import Notifier
from portwatch.pace import Pacer, SaveThrottle
from portwatch.proc import ProcFS
from portwatch.report import Reporter
from portwatch.scan import Scanner, ScanResult, Source
from portwatch.snapshot import carry_forward
from portwatch.sockdiag import SockDiagUnavailable
from portwatch.state import JournalPosition, SavedState, StateError, StateStore, state_dir
from portwatch.watch import ConfigWatcher

if TYPE_CHECKING:
    from portwatch.metrics import Metrics

EX_CONFIG = 78  # the unit's RestartPreventExitStatus=
EX_UNAVAILABLE = 69  # a required facility (netlink, when forced) is missing
POLL_CONFIG_EVERY = 0.5  # seconds: polled this often without inotify; with it, asked no more often


class ProcEvents(Protocol):
    """The proc connector as the daemon uses it (portwatch.procconn.ProcConnector)."""

    def fileno(self) -> int: ...
    def read_events(self) -> list[tuple[str, int]]: ...
    def close(self) -> None: ...


class Scans(Protocol):
    """What the daemon asks of its scanner (portwatch.scan.Scanner)."""

    @property
    def active_source(self) -> str: ...
    @property
    def fallback_reason(self) -> str | None: ...
    @property
    def searched(self) -> bool: ...

    def scan(self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int] = (),
             on_progress: Callable[[], None] | None = None) -> ScanResult: ...
    def scan_early(self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int],
                   on_progress: Callable[[], None] | None = None) -> ScanResult: ...
    @property
    def netns_problem(self) -> str | None: ...

    def forget_processes(self, pids: Iterable[int]) -> None: ...
    def peek(self, pids: Collection[int], *, fresh: Collection[int] = ()) -> bool: ...
    def capabilities(self) -> int | None: ...
    def watch_namespaces(self, wanted: bool) -> None: ...
    def close(self) -> None: ...


class Daemon:
    def __init__(
        self,
        config: Config,
        log: EventLog,
        *,
        scanner: Scans,
        notifier: Notifier | None = None,
        hooks: HookRunner | None = None,
        proc_events: ProcEvents | None = None,
        proc_events_reason: str | None = None,
        state: StateStore | None = None,
        journal: Journal | None = None,
        journal_position: JournalPosition | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.log = log
        self.metrics: Metrics | None = None  # made when the config first asks for metrics
        self._metrics_problem: str | None = None  # why the listener could not be had
        self.scanner = scanner
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.hooks = hooks or HookRunner(
            self.emit, max_parallel=config.max_parallel_hooks, cooldown=config.hook_cooldown
        )
        self.watcher = ConfigWatcher(config.path)
        self.proc_events = proc_events
        self.proc_events_reason = None if proc_events is not None else proc_events_reason
        self.state = state
        self.snapshot: Snapshot | None = None
        self.report = Reporter(self.emit, self.hooks, config, clock=clock, wall=wall)
        if journal_position is not None:
            self.report.conflicts.reported.update(journal_position.reported)
        reopen = lambda: open_journal(self.config, JournalPosition())  # noqa: E731
        self.conflict_watch = ConflictWatch(journal, self.report, reopen, wall=wall)
        self.wall = wall
        self._scanned_after = float("-inf")  # when the last finished scan began
        self._last_scan_wall: float | None = None  # the same, by the wall clock, once one worked
        self._selector: selectors.BaseSelector | None = None
        self.pace = Pacer(config.interval)
        self.saves = SaveThrottle()
        self._stop = self._reload = False
        self._rejected = False  # the file on disk was refused; a valid one is news even if unchanged
        self._saved: SavedState | None = None  # the state restored, until a scan works
        self._started = False
        self._last_ping = 0.0
        self._last_status = ""
        self._following = False  # the selector wakes for the proc connector's events
        self._judged = 0  # the judge's changes when the state was last saved
        self._config_checked = float("-inf")  # when the watcher was last asked

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = _install_signals(wfd, self._on_stop, self._on_hup)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ, "signal")
        if self.watcher.fileno() is not None:
            sel.register(self.watcher.fileno(), selectors.EVENT_READ, "config")  # type: ignore[arg-type]
        self.conflict_watch.selector = self._selector = sel
        try:
            self.start()
            self._loop(sel, rfd)
        finally:
            self._save_state(force=True)  # a conflict not reported yet is read again at the next start
            self._shutdown()
            sel.close()
            for fd in (rfd, wfd):
                os.close(fd)
            _restore_signals(previous)
        return 0

    def start(self) -> None:
        """The first scan, then `portwatch_started`, then what the first scan found."""
        saved, state_event = restore(self.state)
        self._metrics_problem = self._configure_metrics(self.config.metrics)
        scan = self._scan(early=False)  # a refused forced netlink source propagates: no start
        snap = self.snapshot or Snapshot({})
        self.emit("portwatch_started", {
            "listeners": len(snap.listeners), "config": self.config.path,
            "reserved_rules": len(self.config.reserved), "interval": self.config.interval,
            "socket_source": self.scanner.active_source, "netlink_unavailable": self.scanner.fallback_reason,
            "config_watch": self.watcher.mode, "config_watch_fallback": self.watcher.fallback_reason,
            "proc_events": self.proc_events is not None, "proc_events_unavailable": self.proc_events_reason,
            "metrics": self.metrics.where() if self.metrics is not None else None, "pid": os.getpid(),
        })
        self._started = True
        if state_event is not None:
            self.emit(*state_event)
        self.report.scan(scan.error, partial=scan.partial)
        self.report.unattributed(scan.socket_units_problem)  # before the squatters it may explain
        if self.snapshot is None:
            self._saved = saved  # compared with the first scan that works, not with nothing
        else:
            self._baseline(self.snapshot, saved)
        self._save_state(force=True)  # the baseline, so a SIGKILL before any change loses nothing
        self.report.denied(snap, self.scanner.capabilities)
        self.conflict_watch.start(self.clock(), started_usec=int(self.wall() * 1e6))
        self._update_status()
        self._publish()
        self._last_ping = self.pace.last_scan
        self.notifier.ready(self._status_text())

    def _loop(self, sel: selectors.BaseSelector, rfd: int) -> None:
        while not self._stop:
            now = self.clock()
            conflict_due = self.report.conflicts.next_due(self._scanned_after)
            wake = min(self.pace.next_scan(now), self._next_ping(), conflict_due)
            if self.watcher.mode == "polling":
                wake = min(wake, now + POLL_CONFIG_EVERY)
            self._follow_proc_events(sel, not self.pace.waiting(now))
            config_event = False
            for key, _ in sel.select(max(0.0, wake - now)):
                if key.data == "signal":
                    _drain(rfd)
                elif key.data == "config":
                    config_event = True
                elif key.data == "proc":
                    self._read_proc_events()
                elif key.data == "journal":
                    self.saves.urgent |= self.conflict_watch.read(self.clock(), self.config.reserved)
                elif key.data == "metrics" and self.metrics is not None:
                    self.metrics.serve()
            if self._stop:
                break
            # Asked even on a HUP (one reload answers both); else on its own events, and no more
            # often than it is polled: not at every wake-up of a busy host.
            if self._reload or config_event or self.clock() >= self._config_checked + POLL_CONFIG_EVERY:
                self._config_checked = self.clock()
                if self.watcher.changed() or self._reload:
                    self.reload(signal_requested=self._reload)
            now = self.clock()
            if now >= self.pace.next_scan(now):
                self._read_proc_events()  # the exits of what started meanwhile: nothing to look at
                self._scan_when_due()
            reported = self.conflict_watch.report_due(self.clock(), self._scanned_after, self._listening())
            self.saves.urgent |= reported
            self._save_state(force=reported)  # a crash right after a report must not repeat it
            self._ping_watchdog()

    def _shutdown(self) -> None:
        if self._started:  # a start refused (a forced netlink source) says why and nothing more
            self.emit("portwatch_stopping", {"pid": os.getpid()})
        self.notifier.stopping()
        self.hooks.close(timeout=1.0)
        if self.metrics is not None:
            self.metrics.close_listener()  # a textfile stays: its stale last scan says portwatch stopped
        self.watcher.close()
        self.scanner.close()
        if self.proc_events is not None:
            self.proc_events.close()
        self.conflict_watch.close()
        self.notifier.close()

    def _on_stop(self) -> None:
        self._stop = True

    def _on_hup(self) -> None:
        self._reload = True  # repeated HUPs before the loop runs merge into one reload

    # -- scanning --------------------------------------------------------------

    def _follow_proc_events(self, sel: selectors.BaseSelector, wanted: bool) -> None:
        """Wake for the proc connector's events, or (an early scan coming) let them queue."""
        if self.proc_events is None or wanted == self._following:
            return
        if wanted:
            sel.register(self.proc_events.fileno(), selectors.EVENT_READ, "proc")
        else:
            sel.unregister(self.proc_events.fileno())
        self._following = wanted

    def _read_proc_events(self) -> None:
        if self.proc_events is not None:
            self.pace.saw(self.proc_events.read_events(), self.clock())

    def _scan_when_due(self) -> None:
        """A regular scan; or an early one, unless no young process holds a socket it did not
        hold at the last look (then only the cadence moves on)."""
        now = self.clock()
        if now < self.pace.next_scan(now):
            return
        early = self.pace.early(now)
        if early and not self.scanner.peek(self.pace.due(now), fresh=self.pace.fresh()):
            self.pace.scanning(now)
            return
        self.tick(early=early)

    def tick(self, *, early: bool = False) -> None:
        """One scan after the first: list, resolve owners, diff, judge, report. An early scan
        (processes are starting) reads only those processes (see OwnerTracker.update_early)."""
        previous = self.snapshot
        try:
            scan = self._scan(early=early)
        except SockDiagUnavailable:  # forced netlink that worked at start
            scan = ScanResult(None, "netlink became unavailable")
        self.report.scan(scan.error, partial=scan.partial)
        if scan.snapshot is not None:
            self._scanned_after = self.pace.last_scan
            if previous is None:  # the first scan failed: this is the baseline
                stale = self._baseline(scan.snapshot, self._saved)
                self._saved = None
            else:
                stale = self.report.changes(previous, scan.snapshot, closed_netns=scan.closed_netns)
            self.saves.dirty |= stale
            self.report.denied(scan.snapshot, self.scanner.capabilities)
            self.report.unattributed(scan.socket_units_problem)
            self.report.unread_netns(scan.unread_netns, self.scanner.netns_problem)
        self._update_status()
        self._publish()

    def _listening(self) -> Iterable[Listener]:
        return self.snapshot.listeners.values() if self.snapshot is not None else ()

    def _baseline(self, snap: Snapshot, saved: SavedState | None) -> bool:
        """The first snapshot: what changed since the saved state, or the squatters found at start."""
        self._scanned_after = self.pace.last_scan
        self.report.first_seen(snap.listeners.values(), saved.seen if saved is not None else {})
        if saved is not None:
            return self.report.changes(saved.snapshot, snap, while_down=True, known=saved.taken)
        self.report.inventory(snap.listeners.values())
        return self.report.squatters(snap.listeners.values(), at_startup=True)

    def _scan(self, *, early: bool) -> ScanResult:
        """Scan into self.snapshot (an incomplete scan keeps what it could not see); say nothing."""
        began = self.clock()
        began_wall = self.wall()
        self.pace.scanning(began)
        hints, execs = self.pace.take(began)
        self.scanner.forget_processes(execs)
        scan = self.scanner.scan_early if early else self.scanner.scan
        protocols = sorted(self.config.protocols)
        result = scan(self.snapshot, protocols, hints=hints, on_progress=self._ping_watchdog)
        if self.scanner.searched:  # its transient dicts leave freed heap pages resident
            release_free_heap()
        if self.metrics is not None:
            self.metrics.scanned(self.clock() - began)
        if result.snapshot is not None:
            self._last_scan_wall = began_wall
            previous = self.snapshot
            self.snapshot = result.snapshot if previous is None else carry_forward(previous, result.snapshot)
        return result

    def _save_state(self, *, force: bool = False) -> None:
        now = self.clock()
        if self.report.judge.changes != self._judged:
            self.saves.urgent = True
        if self.state is None or self.snapshot is None or not self.saves.due(now, force=force):
            return
        try:
            self.state.save(self.snapshot, self.report.judge.taken(), datetime.now(UTC).isoformat(),
                            seen=self.report.seen, journal=self.conflict_watch.position())
        except OSError as exc:
            self.report.unsaved(self.state.path, exc)
            return
        self.report.saved()
        self.saves.saved(now)
        self._judged = self.report.judge.changes

    # -- reload ----------------------------------------------------------------

    def reload(self, *, signal_requested: bool) -> None:
        """Read the config again: a valid one replaces the old, an invalid one is refused."""
        self._reload = False
        self.notifier.reloading()
        if signal_requested:
            self.watcher.adopt()  # what is read now answers any change the watcher has yet to report
        path = self.config.path
        try:
            new, problems = load_config(path), None
        except ConfigError as exc:
            new, problems = None, exc.problems
        if not signal_requested and not self.watcher.matches():
            pass  # changed again while read (being rewritten): judged once it is complete
        elif new is None:
            self._reject(path, "; ".join(problems or ()))
        elif (refused := self._configure_metrics(new.metrics)) and self._serving_metrics():
            self._reject(path, f"metrics.listen: {refused}; the metrics stay where they were")
        elif new == self.config and refused == self._metrics_problem and not signal_requested \
                and not self._rejected:
            pass  # touched, not changed
        else:
            self._rejected = False
            self._metrics_problem = refused  # with no listener to keep, the rest applies (degraded)
            self.config = new
            self.pace.interval = new.interval
            self.hooks.configure(max_parallel=new.max_parallel_hooks, cooldown=new.hook_cooldown)
            self.emit("config_reloaded", {"path": path, "reserved_rules": len(new.reserved)})
            self.conflict_watch.want(new.follow_journal, self.clock())
            self.scanner.watch_namespaces(new.netns == "all")
            self.saves.urgent |= self.report.reconfigured(new, self._listening())
            self._update_status()
            self._publish()
        self.notifier.ready(self._status_text())

    def _reject(self, path: str, error: str) -> None:
        self._rejected = True
        self.emit("config_rejected", {"path": path, "error": error})

    # -- metrics -----------------------------------------------------------------------

    def emit(self, event: str, fields: Mapping[str, Any]) -> None:
        """Every event goes to the log, and is counted when there are metrics (any thread)."""
        self.log.emit(event, fields)
        if self.metrics is not None:
            self.metrics.count(event, fields)

    def _configure_metrics(self, settings: MetricsSettings | None) -> str | None:
        """Serve and write the metrics as `settings` say: the problem, keeping the old, if not."""
        if settings is None and self.metrics is None:
            return None
        if self.metrics is None:
            from portwatch.metrics import Metrics  # noqa: PLC0415 (its library only when asked for)

            self.metrics = Metrics()
        fd = self.metrics.fileno()
        if self._selector is not None and fd is not None:
            self._selector.unregister(fd)  # first: a new listener may get the same fd number
        try:
            return self.metrics.apply(settings)
        finally:
            fd = self.metrics.fileno()
            if self._selector is not None and fd is not None:
                self._selector.register(fd, selectors.EVENT_READ, "metrics")

    def _serving_metrics(self) -> bool:
        return self.metrics is not None and self.metrics.listening is not None

    def _publish(self) -> None:
        """Hand the state to the metrics (and the textfile) after a scan or a reload."""
        if self.metrics is None:
            return
        metrics = self.metrics
        self.report.metrics_unavailable(self._metrics_problem or metrics.unwritten)
        metrics.publish(Published(
            self.config, self.snapshot, frozenset(self.report.judge.taken()),
            frozenset(self.report.degraded), self._last_scan_wall))
        before = metrics.unwritten
        metrics.write(self.clock())
        if metrics.unwritten != before:  # said now; the gauge says it from the next scan
            self.report.metrics_unavailable(self._metrics_problem or metrics.unwritten)

    # -- watchdog and status -------------------------------------------------------

    def _next_ping(self) -> float:
        interval = self.notifier.watchdog_interval  # already half of WatchdogSec=
        return self._last_ping + interval if interval else float("inf")

    def _ping_watchdog(self) -> None:
        if self.clock() >= self._next_ping():
            self.notifier.watchdog()
            self._last_ping = self.clock()

    def _status_text(self) -> str:
        listeners = len(self.snapshot.listeners) if self.snapshot is not None else 0
        return status_line(listeners, len(self.report.judge), datetime.now(UTC).strftime("%H:%M:%S UTC"))

    def _update_status(self) -> None:
        text = self._status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)


def restore(state: StateStore | None) -> tuple[SavedState | None, tuple[str, dict[str, Any]] | None]:
    """The saved state, and the event that says what became of it (emitted after start)."""
    if state is None:
        return None, None
    try:
        saved = state.load()
    except StateError as exc:  # reported, and replaced at the next save; never fatal
        return None, ("state_reset", {"path": state.path, "error": str(exc)})
    if saved is None:
        return None, None
    return saved, ("state_restored", {"path": state.path, "saved_at": saved.saved_at,
                                      "listeners": len(saved.snapshot.listeners)})


def _install_signals(wfd: int, on_stop: Callable[[], None], on_hup: Callable[[], None]) -> dict[int, Any]:
    """Handlers that only set flags; the wake-up fd makes select() return (PEP 475 would
    restart it)."""
    previous: dict[int, Any] = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda _sig, _frame: on_stop()),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda _sig, _frame: on_stop()),
        signal.SIGHUP: signal.signal(signal.SIGHUP, lambda _sig, _frame: on_hup()),
    }
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    signal.set_wakeup_fd(-1)
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def open_proc_events(wanted: bool) -> tuple[ProcEvents | None, str | None]:
    """The proc connector, or None and why not (never fatal: the daemon then polls)."""
    if not wanted:
        return None, "disabled by --no-proc-events"
    from portwatch.procconn import ProcConnector  # noqa: PLC0415 (not loaded when disabled)

    try:
        return ProcConnector.open(), None
    except OSError as exc:  # the kernel's answer varies (privilege, namespaces)
        return None, f"{exc.strerror or exc}; polling every interval"


def open_journal(config: Config, position: JournalPosition) -> Journal | None:
    """The journal follower when the config asks for it (imported only then)."""
    if not config.follow_journal:
        return None
    from portwatch.journalfollow import JournalFollower  # noqa: PLC0415

    return JournalFollower(position.cursor, position.since_usec)


def run_from_args(args: argparse.Namespace) -> int:
    """`portwatch run`: refuse a bad config with its messages, then watch until stopped."""
    path = args.config or DEFAULT_PATH
    try:
        config = load_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EX_CONFIG
    log = EventLog(choose_format(args.log_format, os.environ, sys.stdout))
    # Hooks must not inherit the capabilities the unit grants for reading /proc.
    drop_ambient_capabilities()
    store = StateStore(state_dir(args.state_dir, config.state_dir, os.environ))
    proc_events, why_not = open_proc_events(not args.no_proc_events)
    position = store.load_journal()
    scanner = Scanner(ProcFS(), Source(args.source), all_netns=config.netns == "all")
    daemon = Daemon(config, log, scanner=scanner, proc_events=proc_events,
                    proc_events_reason=why_not, state=store, journal=open_journal(config, position),
                    journal_position=position)
    try:
        return daemon.run()
    except SockDiagUnavailable as exc:
        sys.stderr.write(f"portwatch: --source netlink, but {exc}; use --source auto or proc\n")
        return EX_UNAVAILABLE
    finally:
        log.close()
