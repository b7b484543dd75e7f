"""The watcher: scan, diff, judge, report, run hooks; reload and stop on request.

One thread runs the loop below; hooks run on the hook runner's threads. The
loop sleeps in one `select` over a signal wake-up pipe, the config watcher's
inotify fd and the proc connector, so a signal, a config edit or a new
process wakes it at once. Signal handlers only set flags.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from portwatch.access import advice
from portwatch.config import DEFAULT_PATH, Config, ConfigError, load_config
from portwatch.events import change_event, describe, status_line, violation_event
from portwatch.hooks import HookRunner
from portwatch.libc import drop_ambient_capabilities, release_free_heap
from portwatch.log import EventLog, choose_format
from portwatch.model import Listener, Snapshot
from portwatch.notify import Notifier
from portwatch.policy import Rule, evaluate
from portwatch.proc import ProcFS
from portwatch.procfs import ProcParseError
from portwatch.scan import OwnerTracker, SocketLister, Source
from portwatch.snapshot import ChangeKind, carry_forward, diff, owner_identity
from portwatch.sockdiag import SockDiagUnavailable
from portwatch.state import SavedState, StateError, StateStore, state_dir
from portwatch.watch import ConfigWatcher

EX_CONFIG = 78  # the unit's RestartPreventExitStatus=
EX_UNAVAILABLE = 69  # a required facility (netlink, when forced) is missing
POLL_CONFIG_EVERY = 0.5  # seconds, when inotify is unavailable
# After a fork or exec, rescan at this pace for a while: the new process
# usually binds within a few hundred milliseconds of starting.
EARLY_SCAN_PERIOD = 0.1
EARLY_SCAN_WINDOW = 1.0
# The state file is rewritten at most this often while things change (and at
# stop); after a crash the changes since are found again by the startup diff.
STATE_SAVE_EVERY = 5.0


class _Scan(NamedTuple):
    """What one scan gave: the snapshot (None when listing failed) and why it is not whole."""

    snapshot: Snapshot | None
    error: str | None
    partial: bool = False


class Daemon:
    def __init__(
        self,
        config: Config,
        log: EventLog,
        *,
        procfs: ProcFS | None = None,
        source: Source = Source.AUTO,
        notifier: Notifier | None = None,
        proc_events: bool = True,
        state: StateStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.procfs = procfs or ProcFS()
        self.lister = SocketLister(self.procfs, source)
        self.tracker = OwnerTracker(self.procfs)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.hooks = HookRunner(
            self.emit, max_parallel=config.max_parallel_hooks, cooldown=config.hook_cooldown
        )
        self.watcher = ConfigWatcher(config.path)
        self.snapshot: Snapshot | None = None
        self._taken: dict[int, frozenset[Any]] = {}  # inode -> owners when reported taken
        self._stop = False
        self._reload = False
        self._rejected = False  # the file on disk was refused; a valid one is news even if unchanged
        self._said: set[str] = set()  # degraded reasons already reported (once each)
        self._failure: str | None = None  # the scan failure last reported, until a whole scan
        self.state = state
        self._state_dirty = False
        self._state_saved_at = 0.0
        self._hint_pids: set[int] = set()
        self._early_until = 0.0
        self._next_watchdog = 0.0
        self._last_scan = 0.0
        self._last_status = ""
        self._proc_events: Any = None
        self._proc_events_reason: str | None = "disabled by --no-proc-events"
        if proc_events:
            self._open_proc_events()

    # -- output ----------------------------------------------------------------

    def emit(self, event: str, fields: Mapping[str, Any] | None = None) -> None:
        self.log.emit(event, fields)

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = self._install_signals(wfd)
        sel = selectors.DefaultSelector()
        sel.register(rfd, selectors.EVENT_READ, "signal")
        if self.watcher.fileno() is not None:
            sel.register(self.watcher.fileno(), selectors.EVENT_READ, "config")  # type: ignore[arg-type]
        if self._proc_events is not None:
            sel.register(self._proc_events.fileno(), selectors.EVENT_READ, "proc")
        try:
            self._start()
            self._loop(sel, rfd)
        finally:
            self._save_state(force=True)
            self._shutdown()
            sel.close()
            for fd in (rfd, wfd):
                os.close(fd)
            self._restore_signals(previous)
        return 0

    def _start(self) -> None:
        """The first scan, then `portwatch_started`, then what the first scan found."""
        saved, state_event = self._load_state()
        scan = self._scan(first=True)
        snap = self.snapshot or Snapshot({})
        self.emit(
            "portwatch_started",
            {
                "listeners": len(snap.listeners),
                "config": self.config.path,
                "reserved_rules": len(self.config.reserved),
                "interval": self.config.interval,
                "socket_source": self.lister.active_source,
                "netlink_unavailable": self.lister.fallback_reason,
                "config_watch": self.watcher.mode,
                "config_watch_fallback": self.watcher.fallback_reason,
                "proc_events": self._proc_events is not None,
                "proc_events_unavailable": self._proc_events_reason,
                "pid": os.getpid(),
            },
        )
        if state_event is not None:
            self.emit(*state_event)
        self._say_scan_failure(scan)
        if saved is not None:
            self._report_changes(saved.snapshot, snap, while_down=True)
            self._judge(snap.listeners.values(), at_startup=True, known=saved.taken)
        else:
            self._judge(snap.listeners.values(), at_startup=True)
        self._save_state(force=True)  # the baseline, so a SIGKILL before any change loses nothing
        self._say_degraded(snap)
        self._update_status()
        self._next_watchdog = self._last_scan
        self.notifier.ready(self._status_text())

    def _loop(self, sel: selectors.BaseSelector, rfd: int) -> None:
        next_scan = self._last_scan + self.config.interval
        while not self._stop:
            now = self.clock()
            wake = min(self._scan_due(next_scan, now), self._next_watchdog_at())
            if self.watcher.mode == "polling":
                wake = min(wake, now + POLL_CONFIG_EVERY)
            for key, _ in sel.select(max(0.0, wake - now)):
                if key.data == "signal":
                    _drain(rfd)
                elif key.data == "proc":
                    self._on_proc_events()
            if self._stop:
                break
            if self._reload or self.watcher.changed():
                self.reload(signal_requested=self._reload)
            now = self.clock()
            if now >= self._scan_due(next_scan, now):
                self.tick(early=now < next_scan)
                self._save_state()
                if now >= next_scan:
                    # Keep the cadence; after a scan slower than the interval, start afresh.
                    next_scan += self.config.interval
                    if next_scan <= self._last_scan:
                        next_scan = self._last_scan + self.config.interval
            self._ping_watchdog()

    def _scan_due(self, next_scan: float, now: float) -> float:
        """The regular scan, or an early one while processes are starting."""
        if self._early_until > now:
            return min(next_scan, self._last_scan + EARLY_SCAN_PERIOD)
        return next_scan

    def _shutdown(self) -> None:
        self.emit("portwatch_stopping", {"pid": os.getpid()})
        self.notifier.stopping()
        self.hooks.close(timeout=1.0)
        self.watcher.close()
        if self._proc_events is not None:
            self._proc_events.close()
        self.notifier.close()

    def _install_signals(self, wfd: int) -> dict[int, Any]:
        def on_stop(_sig: int, _frame: object) -> None:
            self._stop = True

        def on_hup(_sig: int, _frame: object) -> None:
            self._reload = True  # repeated HUPs before the loop runs merge into one reload

        previous: dict[int, Any] = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
            signal.SIGHUP: signal.signal(signal.SIGHUP, on_hup),
        }
        # The handler runs between bytecodes, but select() would just be
        # restarted (PEP 475); the wake-up fd makes it return.
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # -- scanning --------------------------------------------------------------

    def tick(self, *, early: bool = False) -> None:
        """One scan after the first: list, resolve owners, diff, judge, report.

        An early scan (processes are starting) looks only at what they did;
        see OwnerTracker.update.
        """
        previous = self.snapshot
        scan = self._scan(early=early)
        self._say_scan_failure(scan)
        if scan.snapshot is not None:
            if previous is None:  # the first scan failed: this is the baseline
                self._judge(scan.snapshot.listeners.values(), at_startup=True)
            else:
                self._report_changes(previous, scan.snapshot)
            self._say_degraded(scan.snapshot)
        self._update_status()

    def _scan(self, *, first: bool = False, early: bool = False) -> _Scan:
        """List the sockets and resolve their owners into self.snapshot; say nothing yet.

        A failed listing keeps the previous snapshot (nothing is closed by a
        scan that saw nothing). At the first scan, a forced netlink source that
        is refused raises SockDiagUnavailable: the daemon must not start.
        """
        self._last_scan = self.clock()
        protocols = sorted(self.config.protocols)
        try:
            table = self.lister.list(protocols, (4, 6))
        except SockDiagUnavailable:
            if first:
                raise
            return _Scan(None, "netlink became unavailable")
        except (ProcParseError, OSError) as exc:
            return _Scan(None, str(exc))
        hints, self._hint_pids = self._hint_pids, set()
        snap = self.tracker.update(
            table.sockets, complete=table.complete, hint_pids=hints, on_progress=self._ping_watchdog,
            early=early,
        )
        if self.tracker.last.full_walk:  # its transient dicts leave freed heap pages resident
            release_free_heap()
        previous = self.snapshot
        snap = self._drop_closed_meanwhile(previous, snap, protocols)
        self.snapshot = snap if previous is None else carry_forward(previous, snap)
        return _Scan(snap, "; ".join(table.errors) or None, partial=bool(table.errors))

    def _say_scan_failure(self, scan: _Scan) -> None:
        """scan_failed once for each new failure, scan_recovered when a whole scan follows."""
        if scan.error is not None and scan.error != self._failure:
            fields: dict[str, Any] = {"error": scan.error}
            if scan.partial:
                fields["partial"] = True
            self.emit("scan_failed", fields)
        elif scan.error is None and self._failure is not None:
            self.emit("scan_recovered", {"error": self._failure})
        self._failure = scan.error

    def _drop_closed_meanwhile(
        self, previous: Snapshot | None, snap: Snapshot, protocols: list[Any]
    ) -> Snapshot:
        """A listener whose every holder vanished during this scan may simply have closed after
        the listing: list again, and drop those that are gone (the next scan reports them closed)
        instead of reporting an owner change to nobody."""
        if previous is None:
            return snap
        lost = [i for i, x in snap.listeners.items()
                if not x.processes and (p := previous.listeners.get(i)) is not None and p.processes]
        if not lost:
            return snap
        try:
            again = self.lister.list(protocols, (4, 6))
        except (ProcParseError, SockDiagUnavailable, OSError):
            return snap
        if not again.complete:
            return snap
        still = {s.inode for s in again.sockets}
        gone = set(lost) - still
        if not gone:
            return snap
        kept = {i: x for i, x in snap.listeners.items() if i not in gone}
        return Snapshot(kept, complete=snap.complete, denied_pids=snap.denied_pids)

    def _report_changes(self, previous: Snapshot, snap: Snapshot, *, while_down: bool = False) -> None:
        """Each change as its event (closings first), then the new owners judged."""
        changed: list[Listener] = []
        for change in diff(previous, snap):
            self._state_dirty = True
            rule = self.config.rule_for(change.listener.socket.proto, change.listener.socket.port)
            if change.kind is ChangeKind.CLOSED:
                self._taken.pop(change.listener.socket.inode, None)
            else:
                changed.append(change.listener)
            if self.config.log_listeners or rule is not None:
                name, fields = change_event(change, rule.name if rule else None)
                if while_down:
                    fields["while_down"] = True
                self.emit(name, fields)
        if not while_down:
            self._judge(changed, at_startup=False)

    def _judge(
        self, listeners: Iterable[Listener], *, at_startup: bool,
        known: Mapping[int, list[int]] | None = None,
    ) -> None:
        """Report each reserved port held by someone its rule does not allow, once per owner set.

        `known`: owner sets reported before a restart. They are reported again
        (a restart must still name a squatter) but their hooks do not run twice.
        """
        for listener in listeners:
            sock = listener.socket
            rule = self.config.rule_for(sock.proto, sock.port)
            violation = evaluate(rule, listener) if rule is not None else None
            if violation is None or rule is None:
                self._taken.pop(sock.inode, None)
                continue
            identity = owner_identity(listener)
            if self._taken.get(sock.inode) == identity:
                continue
            self._taken[sock.inode] = identity
            self._state_dirty = True
            name, fields = violation_event(violation, at_startup=at_startup)
            seen_before = known is not None and known.get(sock.inode) == list(listener.pids)
            if known is not None:
                fields["reported_before_restart"] = seen_before
            self.emit(name, fields)
            if not seen_before:
                self._run_hooks(rule, {"event": name, **fields})

    def _run_hooks(self, rule: Rule, event: dict[str, Any]) -> None:
        for hook_name in rule.hooks:
            spec = self.config.hooks[hook_name]
            self.hooks.submit(
                hook_name, spec.command, spec.timeout, event,
                cooldown_key=(rule.name, event["proto"], event["port"]),
            )

    def _say_degraded(self, snap: Snapshot) -> None:
        if snap.denied_pids and "denied" not in self._said:
            self._said.add("denied")
            what = "process" if snap.denied_pids == 1 else "processes"
            self.emit(
                "degraded",
                {
                    "reason": f"{snap.denied_pids} {what} could not be inspected; the owners of "
                    "their sockets are reported as unresolved=permission_denied, never as allowed",
                    "missing": advice(self.procfs.own_capabilities(), os.geteuid()),
                    "denied_pids": snap.denied_pids,
                },
            )

    # -- state across restarts --------------------------------------------------

    def _load_state(self) -> tuple[SavedState | None, tuple[str, dict[str, Any]] | None]:
        """The saved state, and the event that says what became of it (emitted after start)."""
        if self.state is None:
            return None, None
        try:
            saved = self.state.load()
        except StateError as exc:
            # Reported and replaced at the next save; never fatal.
            return None, ("state_reset", {"path": self.state.path, "error": str(exc)})
        if saved is None:
            return None, None
        return saved, ("state_restored", {
            "path": self.state.path, "saved_at": saved.saved_at,
            "listeners": len(saved.snapshot.listeners),
        })

    def _save_state(self, *, force: bool = False) -> None:
        if self.state is None or self.snapshot is None:
            return
        now = self.clock()
        if not force and (not self._state_dirty or now - self._state_saved_at < STATE_SAVE_EVERY):
            return
        taken = {inode: sorted(pid for pid, *_ in identity) for inode, identity in self._taken.items()}
        try:
            self.state.save(self.snapshot, taken, datetime.now(UTC).isoformat())
        except OSError as exc:
            if "state" not in self._said:
                self._said.add("state")
                self.emit("degraded", {
                    "reason": f"cannot save state to {self.state.path}: {exc.strerror or exc}; "
                    "changes while portwatch is down will not be reported after a restart",
                    "missing": "a writable state directory",
                })
            return
        self._state_dirty = False
        self._state_saved_at = now

    # -- reload ----------------------------------------------------------------

    def reload(self, *, signal_requested: bool) -> None:
        self._reload = False
        self.notifier.reloading()
        path = self.config.path
        try:
            new, problems = load_config(path), None
        except ConfigError as exc:
            new, problems = None, exc.problems
        if not signal_requested and not self.watcher.matches():
            self.notifier.ready(self._status_text())
            return  # changed again while read (being rewritten): judged once it is complete
        if new is None:
            self._rejected = True
            self.emit("config_rejected", {"path": path, "error": "; ".join(problems or ())})
            self.notifier.ready(self._status_text())
            return
        if new == self.config and not signal_requested and not self._rejected:
            self.notifier.ready(self._status_text())
            return  # touched, not changed
        self._rejected = False
        self.config = new
        self.hooks.configure(max_parallel=new.max_parallel_hooks, cooldown=new.hook_cooldown)
        self.emit("config_reloaded", {"path": path, "reserved_rules": len(new.reserved)})
        if self.snapshot is not None:
            # New or changed rules apply to what is already listening.
            self._taken.clear()
            self._judge(self.snapshot.listeners.values(), at_startup=False)
        self._update_status()
        self.notifier.ready(self._status_text())

    # -- proc connector and watchdog -------------------------------------------

    def _open_proc_events(self) -> None:
        try:
            from portwatch.procconn import ProcConnector  # noqa: PLC0415 (optional feature)

            self._proc_events = ProcConnector.open()
            self._proc_events_reason = None
        except OSError as exc:  # the kernel's answer varies (privilege, namespaces): never fatal
            self._proc_events_reason = f"{exc.strerror or exc}; polling every interval"

    def _on_proc_events(self) -> None:
        execs = []
        for kind, pid in self._proc_events.read_events():
            if kind in ("fork", "exec"):
                self._hint_pids.add(pid)
                if kind == "exec":
                    execs.append(pid)
            elif kind == "overrun":
                self._hint_pids.clear()
        if execs:
            self.tracker.forget_processes(execs)
        if self._hint_pids or execs:
            self._early_until = self.clock() + EARLY_SCAN_WINDOW

    def _next_watchdog_at(self) -> float:
        interval = self.notifier.watchdog_interval  # already half of WatchdogSec=
        return self._next_watchdog + interval if interval else float("inf")

    def _ping_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval and self.clock() >= self._next_watchdog + interval:
            self.notifier.watchdog()
            self._next_watchdog = self.clock()

    # -- status ----------------------------------------------------------------

    def _status_text(self) -> str:
        snap = self.snapshot or Snapshot({})
        return status_line(len(snap.listeners), len(self._taken), datetime.now(UTC).strftime("%H:%M:%S UTC"))

    def _update_status(self) -> None:
        text = self._status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def run_from_args(args: argparse.Namespace) -> int:
    """`portwatch run`: refuse a bad config with its messages, then watch until stopped."""
    path = args.config or DEFAULT_PATH
    try:
        config = load_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return EX_CONFIG
    fmt = choose_format(args.log_format, os.environ, sys.stdout)
    log = EventLog(fmt)
    # Hooks must not inherit the capabilities the unit grants for reading /proc.
    drop_ambient_capabilities()
    store = StateStore(state_dir(args.state_dir, config.state_dir, os.environ))
    daemon = Daemon(
        config, log, source=Source(args.source), proc_events=not args.no_proc_events, state=store
    )
    try:
        return daemon.run()
    except SockDiagUnavailable as exc:
        sys.stderr.write(f"portwatch: --source netlink, but {exc}; use --source auto or proc\n")
        return EX_UNAVAILABLE
    finally:
        log.close()


__all__ = ["Daemon", "describe", "run_from_args"]
