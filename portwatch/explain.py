"""The policy's dry run: for one listener, its rule, each holder against each allow entry, the verdict.

Pure. The verdict is `policy.evaluate`'s, the very function the daemon judges
with, and each holder's line comes from `Allow.check`, which `Allow.matches`
(the daemon's test) is made of: what `explain` says is what the daemon does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from portwatch.model import Listener, Process, endpoint
from portwatch.policy import Rule, evaluate
from portwatch.render import listener_json

UNRESERVED = "unreserved"  # no rule reserves the port here
ALLOWED = "allowed"  # every holder is allowed
TAKEN = "taken"  # some holder is not allowed: reserved_port_taken
UNIDENTIFIED = "unidentified"  # nobody could be seen holding it: reserved_port_taken, verified false


class HolderVerdict(NamedTuple):
    process: Process
    allowed: bool
    entry: int | None  # the index of the first allow entry that matched
    keys: tuple[str, ...]  # that entry's keys, every one of which matched
    misses: tuple[str, ...]  # why each entry did not match (when none did)


class Explanation(NamedTuple):
    listener: Listener
    rule: Rule | None
    verdict: str
    holders: tuple[HolderVerdict, ...]

    @property
    def violated(self) -> bool:
        return self.verdict in (TAKEN, UNIDENTIFIED)


def explain(listener: Listener, rule: Rule | None) -> Explanation:
    """`rule`: the one the config gives for the listener's port and namespace (Config.rule_for)."""
    if rule is None:
        return Explanation(listener, None, UNRESERVED, ())
    violation = evaluate(rule, listener)
    holders = tuple(_holder(rule, process, listener) for process in listener.processes)
    verdict = ALLOWED if violation is None else TAKEN if violation.verified else UNIDENTIFIED
    return Explanation(listener, rule, verdict, holders)


def _holder(rule: Rule, process: Process, listener: Listener) -> HolderVerdict:
    misses = []
    for index, entry in enumerate(rule.allow):
        match = entry.check(process, listener)
        if match.matched:
            return HolderVerdict(process, True, index, match.keys, ())
        misses.append(f"allow[{index}]: {match.miss}")
    return HolderVerdict(process, False, None, (), tuple(misses) or ("the rule allows nobody",))


def reason(explanation: Explanation, holder: HolderVerdict | None) -> str:
    """Why, in one line (process data in it: escape to show)."""
    if explanation.rule is None:
        return "no rule reserves this port here"
    if holder is None:
        unresolved = explanation.listener.unresolved
        return f"holder unknown ({unresolved.value if unresolved else 'no process'}): reported as taken"
    if holder.allowed:
        return f"allow[{holder.entry}] matches on {', '.join(holder.keys)}"
    return "; ".join(holder.misses)


def rows(explanations: list[Explanation]) -> list[list[str]]:
    """PROTO LOCAL RULE VERDICT HOLDER WHY: one row per holder, one for a port nobody is seen holding."""
    out = []
    for e in explanations:
        sock = e.listener.socket
        rule = e.rule.name if e.rule else "-"
        head = [sock.proto.value, endpoint(sock.address, sock.port), rule, e.verdict]
        if not e.holders:
            out.append([*head, "-", reason(e, None)])
        for holder in e.holders:
            out.append([*head, _who(holder.process), reason(e, holder)])
    return out


HEADERS = ["PROTO", "LOCAL", "RULE", "VERDICT", "HOLDER", "WHY"]


def _who(process: Process) -> str:
    text = f"{process.comm}[{process.pid}]"
    if process.user is not None or process.uid is not None:
        text += f" user {process.user if process.user is not None else process.uid}"
    if process.unit:
        text += f" unit {process.unit}"
    return text


def to_json(explanation: Explanation, *, ephemeral: bool = False) -> dict[str, Any]:
    """The listener as `list --json` gives it, with the rule, the verdict and each holder's match."""
    e = explanation
    listener = listener_json(e.listener, ephemeral=ephemeral)
    by_pid = {h.process.pid: h for h in e.holders}
    for process in listener["processes"]:
        holder = by_pid.get(process["pid"])
        if holder is not None:
            process.update(allowed=holder.allowed, allow_entry=holder.entry, matched_keys=list(holder.keys),
                           misses=list(holder.misses))
    return {**listener, "rule": e.rule.name if e.rule else None, "verdict": e.verdict,
            "reason": reason(e, None) if not e.holders else None}
