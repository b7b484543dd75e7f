"""What the metrics say about the host, computed from the daemon's state. Pure.

Every label is bounded by the config or by portwatch's own vocabulary (rule
names and the ports rules name, protocols, families, degraded reasons): never
a process name, a pid or a port nobody reserved, so a busy host cannot grow
the number of series.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from portwatch.config import Config
from portwatch.model import Proto, Snapshot

# Why the view is incomplete, as `degraded` events say (report.Reporter), by a fixed name.
DEGRADED_REASONS = (
    "permission_denied",  # some processes' fds could not be read
    "socket_units",  # systemd's socket units could not be resolved
    "journal",  # the journal cannot be followed: conflicts are not seen
    "netns_unread",  # a network namespace can be neither read nor entered
    "state_unsaved",  # the state file cannot be written
    "scan_failed",  # the last scan could not read every socket table
    "metrics",  # the metrics cannot be served or written
)


class Published(NamedTuple):
    """The daemon's state after a scan, handed to a scrape (never modified once made)."""

    config: Config
    snapshot: Snapshot | None
    taken: frozenset[int]  # inodes of reserved-port listeners held by an owner their rule refuses
    degraded: frozenset[str]  # of DEGRADED_REASONS
    last_scan: float | None  # when the last scan that worked began (seconds since the epoch)


def listener_counts(snapshot: Snapshot | None) -> dict[tuple[str, str], int]:
    """(proto, family) -> how many listeners; every pair is present, 0 when none."""
    counts = {(proto.value, f"ipv{family}"): 0 for proto in Proto for family in (4, 6)}
    if snapshot is not None:
        kinds = Counter((lst.socket.proto, lst.socket.family) for lst in snapshot.listeners.values())
        for (proto, family), count in kinds.items():
            counts[proto.value, f"ipv{family}"] = count
    return counts


def violations(state: Published) -> dict[tuple[str, str, int], int]:
    """(rule, proto, port) -> 1 when a listener on it is held by an owner the rule refuses.

    Each single port a rule names is always present (0 when in order); a port of a
    range only while it is violated, so ranges never multiply series.
    """
    series = {(rule.name, rule.proto.value, r.first): 0
              for rule in state.config.reserved for r in rule.ports if r.first == r.last}
    listeners = state.snapshot.listeners if state.snapshot is not None else {}
    for inode in state.taken:
        listener = listeners.get(inode)
        if listener is None:
            continue
        sock = listener.socket
        rule = state.config.rule_for(sock.proto, sock.port, listener.netns)
        if rule is not None:
            series[rule.name, sock.proto.value, sock.port] = 1
    return series
