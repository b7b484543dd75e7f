"""Turning what the scans saw into events and hook runs.

Each change is one event (closings first); each squatter is reported once
per owner set (judge.Judge) and its rule's hooks run then; a scan failure is
said once, and its recovery; a degraded view once per reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from portwatch import ephemeral
from portwatch.access import advice
from portwatch.config import Config
from portwatch.conflicts import Conflicts, Episode, holders
from portwatch.events import change_event, conflict_event, listener_fields
from portwatch.hooks import HookRunner
from portwatch.judge import Judge
from portwatch.model import Listener, Proto, Snapshot, listener_sort_key, on_host
from portwatch.policy import Rule, evaluate
from portwatch.snapshot import ChangeKind, diff

Emit = Callable[[str, Mapping[str, Any]], None]


class Reporter:
    """Says what happened. Each method returns whether the daemon's saved state is now stale."""

    def __init__(self, emit: Emit, hooks: HookRunner, config: Config, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.emit = emit
        self.hooks = hooks
        self.config = config
        self.clock = clock
        self.wall = wall
        self.judge = Judge()
        self.conflicts = Conflicts()
        self.seen: dict[int, float] = {}  # inode -> when first seen (wall clock), for holder_since
        self._failure: str | None = None  # the scan failure last said, until a whole scan
        self._said: set[str] = set()  # degraded reasons already said (once each)
        self.degraded: set[str] = set()  # what is degraded now, by gauges.DEGRADED_REASONS

    def changes(
        self, previous: Snapshot, snap: Snapshot, *, while_down: bool = False,
        known: Mapping[int, list[int]] | None = None, closed_netns: Mapping[int, str] | None = None,
    ) -> bool:
        """Each change from `previous` to `snap`, then the squatters among the new owners (after
        a restart, `while_down`: among every listener, `known` being those said before it).
        `closed_netns`: network namespaces whose listeners closed with them, and why."""
        changed: list[Listener] = []
        changes = diff(previous, snap)
        clients = self._clients(change.listener for change in changes)
        for change in changes:
            sock = change.listener.socket
            rule = self.config.rule_for(sock.proto, sock.port, change.listener.netns)
            if change.kind is ChangeKind.CLOSED:
                self.judge.closed(sock.inode)
                self.seen.pop(sock.inode, None)
                self.conflicts.closed(change.listener, self.clock())
            else:
                changed.append(change.listener)
                if change.kind is ChangeKind.OPENED:
                    self.seen[sock.inode] = self.wall()
            if self._logged(change.listener, rule, clients):
                name, fields = change_event(change, rule.name if rule else None)
                if sock.inode in clients:
                    fields["ephemeral"] = True
                netns = change.listener.netns
                if change.kind is ChangeKind.CLOSED and netns is not None and closed_netns:
                    fields["reason"] = closed_netns.get(netns.id)
                if while_down:
                    fields["while_down"] = True
                self.emit(name, fields)
        if while_down:
            return self.squatters(snap.listeners.values(), at_startup=True, known=known) or bool(changes)
        return self.squatters(changed, at_startup=False) or bool(changes)

    def inventory(self, listeners: Iterable[Listener]) -> None:
        """At a first start: listener_opened (at_startup) for each listener already there, so the
        journal knows who held a port from the start (`portwatch history`)."""
        listeners = sorted(listeners, key=listener_sort_key)
        clients = self._clients(listeners)
        for listener in listeners:
            sock = listener.socket
            rule = self.config.rule_for(sock.proto, sock.port, listener.netns)
            if self._logged(listener, rule, clients):
                fields = listener_fields(listener, rule.name if rule else None)
                fields["at_startup"] = True
                if sock.inode in clients:
                    fields["ephemeral"] = True
                self.emit("listener_opened", fields)

    @staticmethod
    def _clients(listeners: Iterable[Listener]) -> set[int]:
        """The inodes of clients' ephemeral UDP sockets among `listeners` (portwatch.ephemeral)."""
        udp = [x for x in listeners if x.socket.proto is Proto.UDP]
        return ephemeral.clients_here(udp)[0] if udp else set()

    def _logged(self, listener: Listener, rule: Rule | None, clients: Collection[int]) -> bool:
        """Its opening and closing are logged: its port is reserved, or log_listeners is on and it
        is not a client's ephemeral UDP socket (unless udp_ephemeral: show) on a port no rule names."""
        if rule is not None:
            return True
        if not self.config.log_listeners:
            return False
        sock = listener.socket
        return (self.config.udp_ephemeral == "show" or sock.inode not in clients
                or self.config.names(sock.proto, sock.port))

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

    def first_seen(self, listeners: Iterable[Listener], saved: Mapping[int, float]) -> None:
        """The listeners of the first scan: seen since the saved time, else since now."""
        now = self.wall()
        self.seen = {lst.socket.inode: saved.get(lst.socket.inode, now) for lst in listeners}

    def conflict(self, episode: Episode, listening: Iterable[Listener]) -> None:
        """port_conflict for one failed start, with the listener in the way, and its hooks."""
        port, holder, closed_since = episode.port, None, False
        if port is not None:
            closed = self.conflicts.recently_closed(self.clock())
            # A message rarely says TCP or UDP: TCP (live, then just closed) before UDP.
            for proto in (episode.proto,) if episode.proto else (Proto.TCP, Proto.UDP):
                for candidates, gone in ((listening, False), (closed, True)):
                    found = holders([x for x in candidates if on_host(x)], port, episode.address, proto)
                    if found and holder is None:
                        holder, closed_since = found[0], gone
        unresolved = None
        if port is None:
            unresolved = "the failure names no port, and neither a reserved rule nor a socket unit gives one"
        elif holder is None:
            unresolved = ("no listener on that port: it closed before portwatch looked, "
                          "or it is in another network namespace")
        proto = holder.socket.proto if holder is not None else episode.proto or Proto.TCP
        rule = self.config.rule_for(proto, port) if port is not None else None
        since = self.seen.get(holder.socket.inode) if holder is not None else None
        fields = conflict_event(
            episode, holder, holder_since=_iso(since), unresolved=unresolved,
            rule=rule.name if rule is not None else episode.rule,
            blocked_at=_iso(episode.first.realtime_usec / 1e6) or "",
        )
        if closed_since:
            fields["holder_closed"] = True
        self.emit("port_conflict", fields)
        # The rule's hooks are for a reserved port taken: not when its allowed owner is in the way.
        squatted = rule is not None and holder is not None and evaluate(rule, holder) is not None
        hook_names = dict.fromkeys((*self.config.conflict_hooks, *(rule.hooks if rule and squatted else ())))
        event = {"event": "port_conflict", **fields}
        for name in hook_names:
            spec = self.config.hooks[name]
            self.hooks.submit(name, spec.command, spec.timeout, event,
                              cooldown_key=("port_conflict", episode.key[0], port))

    def journal_unreadable(self, problem: str | None) -> None:
        """Once: conflicts cannot be seen, because the journal cannot be followed."""
        self._now("journal", problem is not None)
        if problem is not None and self._first("journal"):
            self.emit("degraded", {
                "reason": f"cannot follow the journal for failed binds: {problem}; "
                "port conflicts are not reported (everything else is)",
                "missing": "journalctl, and read access to the journal (group systemd-journal)",
            })

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
        self._now("scan_failed", error is not None)

    def denied(self, snap: Snapshot, capabilities: Callable[[], int | None]) -> None:
        """Once: some owners cannot be seen, and what would fix it (capabilities read only then)."""
        self._now("permission_denied", snap.denied_pids > 0)
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
        self._now("socket_units", problem is not None)
        if problem is not None and self._first("socket_units"):
            self.emit("degraded", {
                "reason": f"socket units could not be resolved: {problem}; listeners the service "
                "manager holds are attributed to it, not to their .socket units",
                "missing": "systemd's D-Bus API: the system bus, or root for /run/systemd/private",
            })

    def unread_netns(self, names: Iterable[str], problem: str | None) -> None:
        """Once per namespace while it lasts: no process is left to read it through, and it
        cannot be entered."""
        names = set(names)
        self._now("netns_unread", bool(names))
        self._said = {k for k in self._said if not k.startswith("netns ") or k[6:] in names}
        for name in sorted(names):
            if self._first(f"netns {name}"):
                self.emit("degraded", {
                    "reason": f"network namespace {name} has no process inside and cannot be entered "
                    f"({problem or 'setns refused'}): the listeners it had are kept while their "
                    "holders hold them, and a new one held in it from outside is not seen",
                    "missing": "CAP_SYS_ADMIN to enter it (setns; the shipped unit does not grant it)",
                    "netns": name,
                })

    def unsaved(self, path: str, exc: OSError) -> None:
        """Once: the state file cannot be written."""
        self._now("state_unsaved", True)
        if self._first("state"):
            self.emit("degraded", {
                "reason": f"cannot save state to {path}: {exc.strerror or exc}; "
                "changes while portwatch is down will not be reported after a restart",
                "missing": "a writable state directory",
            })

    def saved(self) -> None:
        self._now("state_unsaved", False)

    def metrics_unavailable(self, problem: str | None) -> None:
        """Once per problem: the metrics cannot be served or written (the rest goes on)."""
        if problem is None:
            if "metrics" in self.degraded:  # recovered: a problem after this is said again
                self._now("metrics", False)
                self._said = {k for k in self._said if not k.startswith("metrics ")}
            return
        self._now("metrics", True)
        if self._first(f"metrics {problem}"):
            self.emit("degraded", {
                "reason": f"metrics: {problem}; everything else is reported",
                "missing": "a free address for metrics.listen, or a writable directory for metrics.textfile",
            })

    def _now(self, reason: str, degraded: bool) -> None:
        if degraded:
            self.degraded.add(reason)
        else:
            self.degraded.discard(reason)

    def _first(self, reason: str) -> bool:
        first = reason not in self._said
        self._said.add(reason)
        return first


def _iso(epoch: float | None) -> str | None:
    if epoch is None or epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
