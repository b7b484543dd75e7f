"""Pure mapping from changes and violations to flat event dicts.

Event names and fields are the product's interface (journal fields, hook
environment, JSON lines); they are built here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from portwatch.model import Listener, Process, endpoint
from portwatch.policy import Violation
from portwatch.snapshot import Change

WARNING_EVENTS = frozenset({"reserved_port_taken", "config_rejected", "degraded", "hook_suppressed"})
ERROR_EVENTS = frozenset({"hook_failed", "hook_dropped", "scan_failed", "state_reset"})
# Every other event (scan_recovered, state_restored, ...) is at level info.


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
    get = fields.get
    port = get("port")
    where = f"{get('proto')}/{endpoint(str(get('address')), port if isinstance(port, int) else 0)}"
    hook_for = f"hook {get('hook')} for rule {get('rule')} port {port}"
    if event == "reserved_port_taken":
        if not get("verified", True):
            return (
                f"reserved port {where} (rule {get('rule')}) is held by a process "
                f"portwatch cannot identify ({get('unresolved')})"
            )
        return f"reserved port {where} (rule {get('rule')}) taken by {_offenders(fields)}"
    if event == "listener_opened":
        return f"new listener {where} held by {_who(fields)}"
    if event == "listener_closed":
        return f"listener {where} closed (was held by {_who(fields)})"
    if event == "owner_changed":
        return f"listener {where} now held by {_who(fields)} (was pids {_pids(get('previous_pids'))})"
    if event == "hook_finished":
        return f"{hook_for} finished with exit code {get('exit_code')} in {get('duration')} s"
    if event == "hook_failed":
        return f"{hook_for} failed: {get('reason')}"
    if event == "hook_suppressed":
        return f"{hook_for} not run again: cool-down, {get('until')} s left"
    if event == "hook_dropped":
        return f"{hook_for} dropped: {get('reason')}"
    if event == "config_rejected":
        return f"config {get('path')} rejected, keeping the last good one: {get('error')}"
    if event == "config_reloaded":
        return f"config {get('path')} reloaded: {get('reserved_rules')} reserved-port rules"
    if event == "portwatch_started":
        return f"portwatch started, watching {get('listeners')} listeners"
    if event == "portwatch_stopping":
        return "portwatch stopping"
    if event == "degraded":
        return f"owner resolution degraded: {get('reason')}; {get('missing')}"
    if event == "state_restored":
        saved = f"{get('listeners')} listeners as saved at {get('saved_at')}"
        return f"state restored from {get('path')}: {saved}"
    if event == "state_reset":
        return f"state file unusable, starting afresh: {get('error')}"
    if event == "scan_failed":
        what = "partly failed" if get("partial") else "failed"
        return f"scan {what}, nothing is reported closed until it succeeds: {get('error')}"
    if event == "scan_recovered":
        return f"scans whole again (after: {get('error')})"
    return event.replace("_", " ")


def status_line(listeners: int, taken: int, when: str) -> str:
    """The service's status for `systemctl status` (sd_notify STATUS=)."""
    return (
        f"watching {listeners} {'listener' if listeners == 1 else 'listeners'}, {taken} reserved "
        f"{'port' if taken == 1 else 'ports'} taken, last scan {when}"
    )


def _who(fields: dict[str, Any]) -> str:
    """The first holder, and how many more there are."""
    pid = fields.get("pid")
    if pid is None:
        return f"an unidentified process ({fields.get('unresolved')})"
    text = _process(fields)
    others = len(fields.get("pids") or ()) - 1
    return text + (f" and {others} more" if others > 0 else "")


def _offenders(fields: dict[str, Any]) -> str:
    """The first holder the rule does not allow; the other offenders; the allowed holders."""
    offenders = list(fields.get("offender_pids") or ())
    allowed = [pid for pid in fields.get("pids") or () if pid not in offenders]
    text = _process(fields)
    if len(offenders) > 1:
        text += f" and {len(offenders) - 1} more it does not allow (pids {_pids(offenders[1:])})"
    if allowed:
        text += f"; also held by allowed pids {_pids(allowed)}"
    return text


def _process(fields: dict[str, Any]) -> str:
    text = f"{fields.get('comm')}[{fields.get('pid')}]"
    if fields.get("user"):
        text += f" user {fields['user']}"
    if fields.get("unit"):
        text += f" unit {fields['unit']}"
    return text


def _pids(pids: Any) -> str:
    return ", ".join(str(pid) for pid in pids or ())
