"""Pure mapping from changes and violations to flat event dicts.

Event names and fields are the product's interface (journal fields, hook
environment, JSON lines); they are built here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from portwatch.model import Listener, Process
from portwatch.policy import Violation
from portwatch.snapshot import Change

WARNING_EVENTS = frozenset({"reserved_port_taken", "config_rejected", "degraded", "hook_suppressed"})
ERROR_EVENTS = frozenset({"hook_failed", "hook_dropped", "scan_failed", "state_reset"})


def level_of(event: str) -> str:
    if event in ERROR_EVENTS:
        return "error"
    if event in WARNING_EVENTS:
        return "warning"
    return "info"


def _owner_fields(listener: Listener, first: Process | None) -> dict[str, Any]:
    s = listener.socket
    return {
        "proto": s.proto.value,
        "address": s.address,
        "port": s.port,
        "inode": s.inode,
        "socket_uid": s.uid,
        "pid": first.pid if first else None,
        "pids": list(listener.pids),
        "comm": first.comm if first else None,
        "exe": first.exe if first else None,
        "cmdline": list(first.cmdline) if first else None,
        "user": first.user if first else None,
        "unit": first.unit if first else None,
        "unresolved": listener.unresolved.value if listener.unresolved else None,
    }


def listener_fields(listener: Listener, rule: str | None) -> dict[str, Any]:
    """Fields of listener_opened / listener_closed / owner_changed."""
    first = listener.processes[0] if listener.processes else None
    return {**_owner_fields(listener, first), "rule": rule}


def change_event(change: Change, rule: str | None) -> tuple[str, dict[str, Any]]:
    fields = listener_fields(change.listener, rule)
    if change.before is not None:
        fields["previous_pids"] = list(change.before.pids)
    return change.kind.value, fields


def violation_event(violation: Violation, *, at_startup: bool) -> tuple[str, dict[str, Any]]:
    """reserved_port_taken: `pid`, `comm` ... describe the first holder the rule does not allow.

    `verified` is False when no holder could be identified: the port is
    taken, but we cannot say by whom, so we do not claim the owner is
    disallowed (`unresolved` says why).
    """
    listener = violation.listener
    first = violation.offenders[0] if violation.offenders else None
    fields = {
        "rule": violation.rule.name,
        **_owner_fields(listener, first),
        "offender_pids": [p.pid for p in violation.offenders],
        "verified": violation.verified,
        "at_startup": at_startup,
    }
    return "reserved_port_taken", fields


def describe(event: str, fields: dict[str, Any]) -> str:
    """A one-line sentence for a person (journal MESSAGE, console). Values are not escaped here."""
    where = f"{fields.get('proto')}/{fields.get('address')}:{fields.get('port')}"
    who = _who(fields)
    if event == "reserved_port_taken":
        if not fields.get("verified", True):
            return (
                f"reserved port {where} (rule {fields.get('rule')}) is held by a process "
                f"portwatch cannot identify ({fields.get('unresolved')})"
            )
        return f"reserved port {where} (rule {fields.get('rule')}) taken by {who}"
    if event == "listener_opened":
        return f"new listener {where} held by {who}"
    if event == "listener_closed":
        return f"listener {where} closed (was held by {who})"
    if event == "owner_changed":
        return f"listener {where} now held by {who} (was pids {fields.get('previous_pids')})"
    if event == "hook_finished":
        return f"hook {fields.get('hook')} finished with exit code {fields.get('exit_code')}"
    if event == "hook_failed":
        return f"hook {fields.get('hook')} failed: {fields.get('reason')}"
    if event == "config_rejected":
        return f"config {fields.get('path')} rejected, keeping the last good one: {fields.get('error')}"
    if event == "config_reloaded":
        return f"config {fields.get('path')} reloaded"
    if event == "portwatch_started":
        return f"portwatch started, watching {fields.get('listeners')} listeners"
    if event == "portwatch_stopping":
        return "portwatch stopping"
    if event == "degraded":
        return f"owner resolution degraded: {fields.get('missing')}"
    return event.replace("_", " ")


def _who(fields: dict[str, Any]) -> str:
    pid = fields.get("pid")
    if pid is None:
        return f"an unidentified process ({fields.get('unresolved')})"
    text = f"{fields.get('comm')}[{pid}]"
    if fields.get("user"):
        text += f" user {fields['user']}"
    if fields.get("unit"):
        text += f" unit {fields['unit']}"
    if len(fields.get("pids") or ()) > 1:
        text += f" and {len(fields['pids']) - 1} more"
    return text
