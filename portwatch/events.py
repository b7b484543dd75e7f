"""Pure mapping from changes and violations to flat event dicts.

Event names and fields are the product's interface (journal fields, hook
environment, JSON lines); they are built here and nowhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from portwatch.model import Listener, Process, endpoint
from portwatch.policy import Violation
from portwatch.snapshot import Change

if TYPE_CHECKING:
    from portwatch.conflicts import Episode

WARNING_EVENTS = frozenset(
    {"reserved_port_taken", "port_conflict", "config_rejected", "degraded", "hook_suppressed"}
)
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
    netns, container = listener.netns, listener.netns.container if listener.netns else None
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
        "socket_unit": listener.socket_unit,
        "service_unit": listener.service_unit,
        # The namespace's name (`host`, an `ip netns` name, a container's, or `netns:[<inode>]`).
        "netns": netns.name if netns is not None else None,
        "netns_id": netns.id if netns is not None else None,
        "container": f"{container.engine}:{container.id}" if container is not None else None,
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


def conflict_event(
    episode: Episode, holder: Listener | None, *, holder_since: str | None, unresolved: str | None,
    rule: str | None, blocked_at: str,
) -> dict[str, Any]:
    """port_conflict: the blocked side (blocked_*) and the holder (the listener fields)."""
    failure = episode.first
    first = holder.processes[0] if holder is not None and holder.processes else None
    if holder is not None:
        where = _owner_fields(holder, first)
    else:
        where = {"proto": episode.proto.value if episode.proto else None, "address": episode.address,
                 "port": episode.port}
    return {
        **where,
        "rule": rule,
        "blocked_unit": failure.unit,
        "blocked_pid": failure.pid,
        "blocked_comm": failure.comm,
        "blocked_exe": failure.exe,
        "blocked_address": episode.address,
        "blocked_message": failure.message,
        "blocked_at": blocked_at,
        "repeats": episode.repeats + episode.earlier,
        "suppressed": episode.suppressed,
        "holder_since": holder_since,
        "holder_unresolved": unresolved,
        "while_down": episode.while_down,
    }


# One sentence per event, filled from its fields and from these: where (proto/endpoint), who
# (the first holder), offenders (a violation's), previous (pids), hook_for, failed.
_MESSAGES = {
    "reserved_port_taken": "reserved port {where} (rule {rule}) taken by {offenders}",
    "port_conflict": "{blocked} could not bind {wanted}: {holder}",
    "listener_opened": "new listener {where} held by {who}",
    "listener_closed": "listener {where} closed (was held by {who}){gone}",
    "owner_changed": "listener {where} now held by {who} (was pids {previous})",
    "hook_finished": "{hook_for} finished with exit code {exit_code} in {duration} s",
    "hook_failed": "{hook_for} failed: {reason}",
    "hook_suppressed": "{hook_for} not run again: cool-down, {until} s left",
    "hook_dropped": "{hook_for} dropped: {reason}",
    "config_rejected": "config {path} rejected, keeping the last good one: {error}",
    "config_reloaded": "config {path} reloaded: {reserved_rules} reserved-port rules",
    "portwatch_started": "portwatch started, watching {listeners} listeners",
    "portwatch_stopping": "portwatch stopping",
    "degraded": "owner resolution degraded: {reason}; {missing}",
    "state_restored": "state restored from {path}: {listeners} listeners as saved at {saved_at}",
    "state_reset": "state file unusable, starting afresh: {error}",
    "scan_failed": "scan {failed}, nothing is reported closed until it succeeds: {error}",
    "scan_recovered": "scans whole again (after: {error})",
}
KNOWN_EVENTS = frozenset(_MESSAGES)
_UNIDENTIFIED = (
    "reserved port {where} (rule {rule}) is held by a process portwatch cannot identify ({unresolved})"
)


class _Fields(dict[str, Any]):
    """An event's fields for str.format_map: a field it lacks reads as None, as fields.get gives."""

    def __missing__(self, key: str) -> None:
        return None


def describe(event: str, fields: dict[str, Any]) -> str:
    """A one-line sentence for a person (journal MESSAGE, console). Values are not escaped here."""
    template = _MESSAGES.get(event)
    if template is None:
        return event.replace("_", " ")
    if event == "reserved_port_taken" and not fields.get("verified", True):
        template = _UNIDENTIFIED
    elif event == "listener_opened" and fields.get("at_startup"):
        template = "listener {where} held by {who} (listening when portwatch started)"
    port = fields.get("port")
    address = endpoint(str(fields.get("address")), port if isinstance(port, int) else 0)
    values = _Fields(fields)
    where = f"{fields.get('proto')}/{address}"
    if fields.get("netns") not in (None, "host"):
        where += f" in netns {fields['netns']}"
    if fields.get("socket_unit"):
        where += f" ({fields['socket_unit']} → {fields.get('service_unit') or '?'})"
    values.update(
        where=where,
        who=_who(fields), offenders=_offenders(fields), previous=_pids(fields.get("previous_pids")),
        hook_for=f"hook {fields.get('hook')} for rule {fields.get('rule')} port {port}",
        failed="partly failed" if fields.get("partial") else "failed",
        gone=": its network namespace is gone" if fields.get("reason") == "netns_gone" else "",
    )
    if event == "port_conflict":
        values.update(_conflict_parts(fields, port))
    return template.format_map(values)


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


def _conflict_parts(fields: dict[str, Any], port: Any) -> dict[str, str]:
    blocked = fields.get("blocked_unit") or "a process"
    if fields.get("blocked_pid") is not None:
        blocked += f" ({fields.get('blocked_comm')}[{fields['blocked_pid']}])"
    wanted = "its port" if port is None else endpoint(str(fields.get("blocked_address") or "*"), port)
    if fields.get("holder_unresolved"):
        holder = f"holder not found ({fields['holder_unresolved']})"
    else:
        holder = f"held by {_who(fields)}"
        if fields.get("socket_unit"):
            holder += f" ({fields['socket_unit']} → {fields.get('service_unit') or '?'})"
        if fields.get("holder_since"):
            holder += f" since {fields['holder_since']}"
    if fields.get("rule"):
        holder += f"; reserved by rule {fields['rule']}"
    if (fields.get("repeats") or 1) > 1:
        holder += f"; {fields['repeats']} failures"
    if fields.get("suppressed"):
        holder += f"; {fields['suppressed']} failures on other ports not reported before this"
    if fields.get("while_down"):
        holder += "; while portwatch was down"
    return {"blocked": blocked, "wanted": wanted, "holder": holder}


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
