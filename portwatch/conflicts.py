"""Failed binds joined into one conflict per failed start, and matched with the holder. Pure.

A program repeats its failure (nginx five times 0.5 s apart, then "still could
not bind()"; systemd restarts a unit a few times): the lines of one unit and
port are one episode, reported once it has been quiet for SETTLE seconds (at
most MAX_HOLD after its first line), and once a scan that began after its
first line has finished, so that a holder which bound just before the failure
has been seen. Later failures of the same unit and port within QUIET of a
report are counted into the next report instead of making their own. Memory is
bounded (MAX_EPISODES) whatever a flood of lines says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import NamedTuple

from portwatch.bindfail import BindFailure
from portwatch.model import Listener, Proto
from portwatch.policy import Rule
from portwatch.why import SAME, overlap

SETTLE = 1.0  # seconds without a repeat before an episode is reported
MAX_HOLD = 3.0  # an episode is reported at most this long after its first line
QUIET = 60.0  # repeats within this of a report are counted into the next one
RECENTLY_CLOSED = 10.0  # closed listeners kept this long: the holder may be gone by the report
MAX_EPISODES = 256  # episodes open at once (more are counted as suppressed), keys remembered
MAX_PER_UNIT = 3  # conflicts reported per unit (any port) within QUIET; more are only counted

Key = tuple[str, int | None]


@dataclass(slots=True)
class Episode:
    """The lines of one failed start: the first one says who and where."""

    key: Key
    first: BindFailure
    port: int | None
    address: str | None
    proto: Proto | None  # known only when the port came from a rule or a socket unit
    rule: str | None  # the rule the port came from
    first_at: float
    last_at: float
    cursor_before: str | None  # the journal position just before its first line (None: not known)
    last_usec: int  # journal time of its last line
    repeats: int = 1
    earlier: int = 0  # lines counted during the quiet time after the previous report
    suppressed: int = 0  # failures of the same unit on other ports not reported (rate limit)
    while_down: bool = False


class Closed(NamedTuple):
    listener: Listener
    at: float


class Conflicts:
    """The episodes open now, and the keys reported recently."""

    def __init__(self, reported: dict[str, int] | None = None) -> None:
        # "who port" -> journal time of the last line reported (kept in the state file, so the
        # lines read again after a restart are not reported twice)
        self.reported: dict[str, int] = dict(reported or {})
        self._open: dict[Key, Episode] = {}
        self._quiet: dict[Key, float] = {}  # key reported -> until when its repeats are only counted
        self._earlier: dict[Key, int] = {}  # key -> lines counted while quiet, for its next report
        self._suppressed: dict[str, int] = {}  # who -> failures not reported (rate limit, bounds)
        self._closed: deque[Closed] = deque(maxlen=MAX_EPISODES)

    def __len__(self) -> int:
        return len(self._open)

    def observe(
        self, failure: BindFailure, now: float, *, cursor_before: str | None, while_down: bool,
        rules: Iterable[Rule] = (), listen_of: Callable[[str], tuple[Proto, int] | None] = lambda _: None,
    ) -> None:
        """One failed-bind line. A line without a port joins its unit's open episode; a follow-up
        ("still could not bind") never opens one. Else its port is the failing socket unit's
        (`listen_of`, asked only then), or that of the reserved rule allowing its unit."""
        who = failure.unit or failure.exe or failure.comm or f"pid {failure.pid}"
        port, proto, rule = failure.port, None, None
        if port is None:
            # "still could not bind", or a program that names no port: a repeat of its unit's failure
            same_unit = [k for k in (*self._open, *self._resting(now)) if k[0] == who]
            if same_unit:
                self._repeat(same_unit[0], failure, now)
                return
            if failure.follow_up:
                return
            listen = listen_of(failure.unit) if failure.unit and failure.unit.endswith(".socket") else None
            found = port_from_rules(failure.unit, rules) if listen is None else (None, *listen)
            if found is not None:
                rule, proto, port = found
        elif failure.follow_up:
            return
        key = (who, port)
        if self.reported.get(f"{who} {port}", -1) >= failure.realtime_usec:
            return  # reported before a restart
        if key in self._open or self._quiet.get(key, 0.0) > now:
            self._repeat(key, failure, now)
            return
        recent = sum(k[0] == who for k in (*self._open, *self._resting(now)))
        if recent >= MAX_PER_UNIT or len(self._open) >= MAX_EPISODES:
            if who in self._suppressed or len(self._suppressed) < MAX_EPISODES:
                self._suppressed[who] = self._suppressed.get(who, 0) + 1
            return
        self._open[key] = Episode(key, failure, port, failure.address, proto, rule, now, now, cursor_before,
                                  failure.realtime_usec, earlier=self._earlier.pop(key, 0),
                                  suppressed=self._suppressed.pop(who, 0), while_down=while_down)

    def _repeat(self, key: Key, failure: BindFailure, now: float) -> None:
        """Another line of an open episode, or of one reported within QUIET (counted for the next)."""
        episode = self._open.get(key)
        if episode is not None:
            episode.repeats += 1
            episode.last_at = now
            episode.last_usec = max(episode.last_usec, failure.realtime_usec)
        else:
            self._earlier[key] = self._earlier.get(key, 0) + 1

    def next_due(self, scanned_after: float) -> float:
        """The earliest time an open episode may be reported (inf: none, or each waits for a scan)."""
        return min((min(e.last_at + SETTLE, e.first_at + MAX_HOLD) for e in self._open.values()
                    if scanned_after >= e.first_at), default=float("inf"))

    def due(self, now: float, scanned_after: float) -> list[Episode]:
        """Episodes to report now; `scanned_after`: when the last finished scan began."""
        self._expire(now)
        ready = [e for e in self._open.values()
                 if min(e.last_at + SETTLE, e.first_at + MAX_HOLD) <= now and scanned_after >= e.first_at]
        for episode in ready:
            del self._open[episode.key]
            self._remember(episode, now)
        return ready

    def oldest_open(self) -> Episode | None:
        """The episode to resume reading before, after a restart, so that none is lost."""
        return min(self._open.values(), key=lambda e: e.first_at, default=None)

    def closed(self, listener: Listener, now: float) -> None:
        self._closed.append(Closed(listener, now))

    def recently_closed(self, now: float) -> list[Listener]:
        while self._closed and self._closed[0].at < now - RECENTLY_CLOSED:
            self._closed.popleft()
        return [c.listener for c in self._closed]

    def _remember(self, episode: Episode, now: float) -> None:
        name = f"{episode.key[0]} {episode.key[1]}"
        self.reported.pop(name, None)  # re-inserted last: the oldest go first when over the bound
        self.reported[name] = episode.last_usec
        while len(self.reported) > MAX_EPISODES:
            del self.reported[next(iter(self.reported))]
        self._quiet[episode.key] = now + QUIET
        while len(self._quiet) > MAX_EPISODES:
            del self._quiet[next(iter(self._quiet))]

    def _resting(self, now: float) -> list[Key]:
        return [k for k, until in self._quiet.items() if until > now]

    def _expire(self, now: float) -> None:
        for key in [k for k, until in self._quiet.items() if until <= now]:
            del self._quiet[key]
        for key in [k for k in self._earlier if k not in self._quiet and k not in self._open]:
            if len(self._earlier) <= MAX_EPISODES:
                break
            del self._earlier[key]


def port_from_rules(unit: str | None, rules: Iterable[Rule]) -> tuple[str | None, Proto, int] | None:
    """The port of the one reserved rule that allows `unit` and reserves a single port."""
    if unit is None:
        return None
    found = [
        (rule.name, rule.proto, rule.ports[0].first) for rule in rules
        if len(rule.ports) == 1 and rule.ports[0].first == rule.ports[0].last
        and any(allow.unit is not None and fnmatchcase(unit, allow.unit) for allow in rule.allow)
    ]
    return found[0] if len(found) == 1 else None


def holders(listeners: Iterable[Listener], port: int, address: str | None, proto: Proto) -> list[Listener]:
    """The listeners of `proto` that keep a bind of `address`:`port` from succeeding (by the
    kernel's rule, why.overlap; v6-only not known here, so counted as Linux's default,
    dual-stack), the same address first; every one on the port when the address is not known."""
    found = []
    for listener in listeners:
        sock = listener.socket
        if sock.port != port or sock.proto is not proto:
            continue
        if address is None:
            found.append((1, sock.inode, listener))
            continue
        reason = overlap(sock.address, None, address, wanted_v6only=False)
        if reason is not None:
            found.append((reason != SAME, sock.inode, listener))
    return [listener for *_, listener in sorted(found, key=lambda f: f[:2])]
