"""Which reserved ports are taken by an owner their rule does not allow, each said once. Pure.

The judge remembers the owner set it reported for each socket, so a squatter
is reported once, again when its owners change, and again after a reload (new
rules apply to what already listens). After a restart the owner sets reported
before it (`known`) are reported again, so the journal of the new run names
them too, but their hooks do not run twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from portwatch.events import violation_event
from portwatch.model import Listener, NetNs, Proto
from portwatch.policy import Rule, evaluate
from portwatch.snapshot import owner_identity

RuleFor = Callable[[Proto, int, NetNs | None], Rule | None]


class Verdict(NamedTuple):
    """A reserved_port_taken event to emit, and whether the rule's hooks run for it."""

    rule: Rule
    fields: dict[str, Any]
    run_hooks: bool


class Judge:
    __slots__ = ("_taken", "changes")

    def __init__(self) -> None:
        # inode -> the owners reported taking it, and their pids
        self._taken: dict[int, tuple[frozenset[Any], list[int]]] = {}
        self.changes = 0  # how often `taken()` changed: the state file must follow soon

    def judge(
        self, listeners: Iterable[Listener], rule_for: RuleFor, *, at_startup: bool,
        known: Mapping[int, list[int]] | None = None,
    ) -> list[Verdict]:
        """A verdict for each listener on a reserved port whose owners were not reported yet."""
        verdicts = []
        for listener in listeners:
            sock = listener.socket
            rule = rule_for(sock.proto, sock.port, listener.netns)
            violation = evaluate(rule, listener) if rule is not None else None
            if rule is None or violation is None:
                self.closed(sock.inode)
                continue
            identity = owner_identity(listener)
            said = self._taken.get(sock.inode)
            if said is not None and said[0] == identity:
                continue
            self._taken[sock.inode] = (identity, sorted(listener.pids))
            self.changes += 1
            _, fields = violation_event(violation, at_startup=at_startup)
            reported_before = known is not None and known.get(sock.inode) == list(listener.pids)
            if known is not None:
                fields["reported_before_restart"] = reported_before
            verdicts.append(Verdict(rule, fields, not reported_before))
        return verdicts

    def closed(self, inode: int) -> None:
        if self._taken.pop(inode, None) is not None:
            self.changes += 1

    def reset(self) -> None:
        """Forget what was said (new rules): the next judgement reports every squatter again."""
        self._taken.clear()
        self.changes += 1

    def taken(self) -> dict[int, list[int]]:
        """inode -> the pids reported taking it, for the state file."""
        return {inode: pids for inode, (_, pids) in self._taken.items()}

    def __len__(self) -> int:
        return len(self._taken)
