"""Turning what the scans saw into events and hook runs.

Each change is one event (closings first); each squatter is reported once
per owner set (judge.Judge) and its rule's hooks run then; a scan failure is
said once, and its recovery; a degraded view once per reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from portwatch.access import advice
from portwatch.config import Config
from portwatch.events import change_event
from portwatch.hooks import HookRunner
from portwatch.judge import Judge
from portwatch.model import Listener, Snapshot
from portwatch.snapshot import ChangeKind, diff

Emit = Callable[[str, Mapping[str, Any]], None]


class Reporter:
    """Says what happened. Each method returns whether the daemon's saved state is now stale."""

    def __init__(self, emit: Emit, hooks: HookRunner, config: Config) -> None:
        self.emit = emit
        self.hooks = hooks
        self.config = config
        self.judge = Judge()
        self._failure: str | None = None  # the scan failure last said, until a whole scan
        self._said: set[str] = set()  # degraded reasons already said (once each)

    def changes(
        self, previous: Snapshot, snap: Snapshot, *, while_down: bool = False,
        known: Mapping[int, list[int]] | None = None,
    ) -> bool:
        """Each change from `previous` to `snap`, then the squatters among the new owners (after
        a restart, `while_down`: among every listener, `known` being those said before it)."""
        changed: list[Listener] = []
        changes = diff(previous, snap)
        for change in changes:
            sock = change.listener.socket
            rule = self.config.rule_for(sock.proto, sock.port)
            if change.kind is ChangeKind.CLOSED:
                self.judge.closed(sock.inode)
            else:
                changed.append(change.listener)
            if self.config.log_listeners or rule is not None:
                name, fields = change_event(change, rule.name if rule else None)
                if while_down:
                    fields["while_down"] = True
                self.emit(name, fields)
        if while_down:
            return self.squatters(snap.listeners.values(), at_startup=True, known=known) or bool(changes)
        return self.squatters(changed, at_startup=False) or bool(changes)

    def squatters(
        self, listeners: Iterable[Listener], *, at_startup: bool,
        known: Mapping[int, list[int]] | None = None,
    ) -> bool:
        """reserved_port_taken once per owner set, and the rule's hooks (not again for `known`)."""
        verdicts = self.judge.judge(listeners, self.config.rule_for, at_startup=at_startup, known=known)
        for verdict in verdicts:
            self.emit("reserved_port_taken", verdict.fields)
            if verdict.run_hooks:
                event = {"event": "reserved_port_taken", **verdict.fields}
                for hook_name in verdict.rule.hooks:
                    spec = self.config.hooks[hook_name]
                    self.hooks.submit(hook_name, spec.command, spec.timeout, event,
                                      cooldown_key=(verdict.rule.name, event["proto"], event["port"]))
        return bool(verdicts)

    def reconfigured(self, config: Config, listening: Iterable[Listener]) -> bool:
        """New rules apply to what already listens: every squatter is said again."""
        self.config = config
        self.judge.reset()
        return self.squatters(listening, at_startup=False)

    def scan(self, error: str | None, *, partial: bool) -> None:
        """scan_failed once for each new failure, scan_recovered when a whole scan follows."""
        if error is not None and error != self._failure:
            self.emit("scan_failed", {"error": error, **({"partial": True} if partial else {})})
        elif error is None and self._failure is not None:
            self.emit("scan_recovered", {"error": self._failure})
        self._failure = error

    def denied(self, snap: Snapshot, capabilities: Callable[[], int | None]) -> None:
        """Once: some owners cannot be seen, and what would fix it (capabilities read only then)."""
        if snap.denied_pids and self._first("denied"):
            what = "process" if snap.denied_pids == 1 else "processes"
            self.emit("degraded", {
                "reason": f"{snap.denied_pids} {what} could not be inspected; the owners of their "
                "sockets are reported as unresolved=permission_denied, never as allowed",
                "missing": advice(capabilities(), os.geteuid()),
                "denied_pids": snap.denied_pids,
            })

    def unattributed(self, problem: str | None) -> None:
        """Once: systemd holds listeners whose socket units could not be had."""
        if problem is not None and self._first("socket_units"):
            self.emit("degraded", {
                "reason": f"socket units could not be resolved: {problem}; listeners the service "
                "manager holds are attributed to it, not to their .socket units",
                "missing": "systemd's D-Bus API: the system bus, or root for /run/systemd/private",
            })

    def unsaved(self, path: str, exc: OSError) -> None:
        """Once: the state file cannot be written."""
        if self._first("state"):
            self.emit("degraded", {
                "reason": f"cannot save state to {path}: {exc.strerror or exc}; "
                "changes while portwatch is down will not be reported after a restart",
                "missing": "a writable state directory",
            })

    def _first(self, reason: str) -> bool:
        first = reason not in self._said
        self._said.add(reason)
        return first
