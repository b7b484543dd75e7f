"""Reserved-port policy: who an allow entry matches, and the verdict on one listener."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portwatch.model import Listener, Process, Proto, Socket, Unresolved
from portwatch.policy import Allow, PortRange, Rule, Violation, evaluate


def proc(
    pid: int = 100,
    *,
    comm: str = "postgres",
    exe: str | None = "/usr/lib/postgresql/15/bin/postgres",
    uid: int | None = 105,
    user: str | None = "postgres",
    unit: str | None = "postgresql@15-main.service",
) -> Process:
    return Process(pid=pid, comm=comm, exe=exe, cmdline=(comm,), uid=uid, user=user, unit=unit)


def listener(
    *processes: Process,
    port: int = 5432,
    proto: Proto = Proto.TCP,
    unresolved: Unresolved | None = None,
) -> Listener:
    sock = Socket(proto=proto, family=4, address="127.0.0.1", port=port, inode=4242, uid=0)
    return Listener(socket=sock, processes=processes, unresolved=unresolved)


PG = Rule(
    name="postgres",
    ports=(PortRange(5432, 5432), PortRange(6000, 6010)),
    allow=(Allow(user="postgres"), Allow(unit="postgresql*.service")),
    hooks=("page",),
)
INTRUDER = proc(pid=666, comm="nc", exe="/usr/bin/nc.openbsd", uid=1000, user="mallory", unit=None)

# --- PortRange --------------------------------------------------------------------------------


def test_port_range_contains_and_prints() -> None:
    """A range is inclusive at both ends and prints as N or A-B."""
    r = PortRange(6000, 6010)
    assert 6000 in r
    assert 6010 in r
    assert 5999 not in r
    assert 6011 not in r
    assert "6005" not in r
    assert str(r) == "6000-6010"
    assert str(PortRange(5432, 5432)) == "5432"


@pytest.mark.parametrize(("first", "last"), [(0, 1), (10, 9), (1, 65536), (-1, 5)])
def test_port_range_rejects_impossible_ranges(first: int, last: int) -> None:
    """A range outside 1-65535 or reversed cannot be built."""
    with pytest.raises(ValueError, match="bad port range"):
        PortRange(first, last)


# --- Allow.matches ----------------------------------------------------------------------------

MATCHES = [
    # (case id, allow entry, process, expected)
    ("comm-exact", Allow(comm="postgres"), proc(), True),
    ("comm-other", Allow(comm="postgres"), proc(comm="postgres2"), False),
    ("comm-glob", Allow(comm="post*"), proc(), True),
    ("comm-case-sensitive", Allow(comm="Postgres"), proc(), False),
    ("comm-charclass", Allow(comm="[pq]ostgres"), proc(), True),
    ("exe-glob", Allow(exe="/usr/lib/postgresql/*/bin/postgres"), proc(), True),
    (
        "exe-glob-other",
        Allow(exe="/usr/lib/postgresql/*/bin/postgres"),
        proc(exe="/tmp/postgres"),
        False,
    ),
    ("exe-none", Allow(exe="*"), proc(exe=None), False),
    ("user-name", Allow(user="postgres"), proc(), True),
    ("user-uid", Allow(user="105"), proc(), True),
    ("user-uid-glob", Allow(user="10?"), proc(), True),
    ("user-uid-when-name-unknown", Allow(user="105"), proc(user=None), True),
    ("user-name-when-name-unknown", Allow(user="postgres"), proc(user=None), False),
    ("user-all-unknown", Allow(user="*"), proc(user=None, uid=None), False),
    ("user-root-by-uid", Allow(user="0"), proc(uid=0, user="root"), True),
    ("user-other", Allow(user="postgres"), proc(uid=1000, user="mallory"), False),
    ("unit-glob", Allow(unit="postgresql*.service"), proc(), True),
    ("unit-other", Allow(unit="postgresql*.service"), proc(unit="evil.service"), False),
    ("unit-none", Allow(unit="*"), proc(unit=None), False),
    ("and-all-match", Allow(comm="postgres", user="postgres", exe="/usr/lib/*"), proc(), True),
    ("and-one-fails", Allow(comm="postgres", user="root"), proc(), False),
    ("and-none-field-fails", Allow(comm="postgres", unit="*"), proc(unit=None), False),
    ("no-keys-matches-nobody", Allow(), proc(), False),
]


@pytest.mark.parametrize(
    ("entry", "process", "expected"), [c[1:] for c in MATCHES], ids=[c[0] for c in MATCHES]
)
def test_allow_matches(entry: Allow, process: Process, expected: bool) -> None:
    """Set keys are AND-ed globs; a None process field never matches a set key."""
    assert entry.matches(process) is expected


def test_rule_allows_if_any_entry_matches() -> None:
    """Allow entries are OR-ed: one matching entry is enough."""
    assert PG.allows(proc(user="postgres", unit=None))
    assert PG.allows(proc(user="mallory", uid=1000, unit="postgresql@15-main.service"))
    assert not PG.allows(INTRUDER)
    assert not Rule(name="closed", ports=(PortRange(1, 1),)).allows(proc())


HOSTILE = ["[", "]", "[!", "*", "?", "\\", "a\nb", "\x1b[31m", "\udcff\udcfe", "[z-a]", "", "\0"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_process_strings_never_raise_or_match_by_accident(name: str) -> None:
    """Glob metacharacters in process strings are literal text, and matching never raises."""
    hostile = proc(comm=name, exe=name, user=name, unit=name)
    assert not Allow(comm="postgres").matches(hostile)
    assert not Allow(exe="/usr/bin/*").matches(hostile)
    assert Allow(comm="*", exe="*", user="*", unit="*").matches(hostile)
    assert not Allow(comm="x", exe="x", user="x", unit="x").matches(hostile)


def test_glob_metacharacters_in_a_name_are_literal() -> None:
    """A process named '*' or '[ab]' matches only patterns that match that literal text."""
    assert not Allow(comm="a").matches(proc(comm="*"))
    assert not Allow(comm="a").matches(proc(comm="[ab]"))
    assert Allow(comm="[[]ab]").matches(proc(comm="[ab]"))
    assert not Allow(comm="postgres").matches(proc(comm="postgres\n"))


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.text(alphabet=st.sampled_from("ab*?[]!-\\\n"), max_size=12),
    value=st.text(max_size=12),
)
def test_any_pattern_against_any_name_never_raises(pattern: str, value: str) -> None:
    """Arbitrary globs against arbitrary process strings return a bool, never raise."""
    process = proc(comm=value, exe=value, user=value, unit=value)
    assert isinstance(
        Allow(comm=pattern, exe=pattern, user=pattern, unit=pattern).matches(process), bool
    )


# --- Rule.covers ------------------------------------------------------------------------------


def test_rule_covers_its_ports_for_its_protocol_only() -> None:
    """A tcp rule covers its ports and ranges over tcp, and nothing over udp."""
    assert PG.covers(Proto.TCP, 5432)
    assert PG.covers(Proto.TCP, 6007)
    assert not PG.covers(Proto.TCP, 5433)
    assert not PG.covers(Proto.UDP, 5432)
    dns = Rule(name="dns", ports=(PortRange(53, 53),), proto=Proto.UDP)
    assert dns.covers(Proto.UDP, 53)
    assert not dns.covers(Proto.TCP, 53)


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_allowed_owner_is_no_violation() -> None:
    """Every holder allowed: no violation."""
    assert evaluate(PG, listener(proc())) is None


def test_evaluate_all_holders_allowed_is_no_violation() -> None:
    """A socket shared by a postmaster and its forked children, all allowed."""
    assert evaluate(PG, listener(proc(pid=100), proc(pid=101), proc(pid=102))) is None


def test_evaluate_disallowed_owner_is_a_verified_violation() -> None:
    """A stranger on a reserved port is a verified violation naming the stranger."""
    held = listener(INTRUDER, port=6001)
    assert evaluate(PG, held) == Violation(
        rule=PG, listener=held, offenders=(INTRUDER,), verified=True
    )


def test_evaluate_mixed_holders_names_only_the_offenders() -> None:
    """With allowed and disallowed holders sharing a socket, only the disallowed are offenders."""
    other = proc(pid=777, comm="socat", exe="/usr/bin/socat", uid=0, user="root", unit="x.service")
    held = listener(proc(pid=100), INTRUDER, other)
    violation = evaluate(PG, held)
    assert violation is not None
    assert violation.offenders == (INTRUDER, other)
    assert violation.verified is True
    assert violation.rule is PG
    assert violation.listener is held


@pytest.mark.parametrize("why", list(Unresolved))
def test_evaluate_unresolved_owner_is_an_unverified_violation(why: Unresolved) -> None:
    """A reserved port held by someone we cannot see is reported, flagged unverified."""
    held = listener(unresolved=why)
    assert evaluate(PG, held) == Violation(rule=PG, listener=held, offenders=(), verified=False)


def test_evaluate_empty_allow_list_allows_nobody() -> None:
    """A rule with no allow entries reports every holder, even root."""
    closed = Rule(name="closed", ports=(PortRange(5432, 5432),))
    root = proc(comm="sshd", uid=0, user="root", unit="ssh.service")
    violation = evaluate(closed, listener(root))
    assert violation is not None
    assert violation.offenders == (root,)


@pytest.mark.parametrize(
    ("port", "proto"), [(5433, Proto.TCP), (5432, Proto.UDP), (6011, Proto.TCP)]
)
def test_evaluate_ignores_listeners_the_rule_does_not_cover(port: int, proto: Proto) -> None:
    """A rule judges only its own ports and protocol, even for unknown holders."""
    assert evaluate(PG, listener(INTRUDER, port=port, proto=proto)) is None
    assert evaluate(PG, listener(port=port, proto=proto, unresolved=Unresolved.NO_PROCESS)) is None


def test_exe_of_a_replaced_binary_still_matches() -> None:
    """After a package upgrade /proc/PID/exe reads 'PATH (deleted)'; the allow entry for PATH still matches."""
    proc = Process(1, "postgres", "/usr/lib/postgresql/15/bin/postgres (deleted)", (), 0, "root", None)
    assert Allow(exe="/usr/lib/postgresql/*/bin/postgres").matches(proc)
    assert not Allow(exe="/usr/lib/postgresql/*/bin/pg_ctl").matches(proc)
