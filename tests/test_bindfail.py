"""Failed binds read from journal entries (as `journalctl -o json` prints them), and joined into
one conflict per failed start. Pure: the entries are what real programs wrote under systemd 252."""

from __future__ import annotations

from typing import Any

import pytest

from portwatch.bindfail import BindFailure, Own, endpoint_in, parse
from portwatch.conflicts import MAX_EPISODES, MAX_HOLD, MAX_PER_UNIT, QUIET, Conflicts, Episode, holders
from portwatch.model import Listener, Process, Proto, Socket
from portwatch.policy import Allow, PortRange, Rule


def entry(message: Any, unit: str = "nginx.service", **extra: str) -> dict[str, Any]:
    fields = {"MESSAGE": message, "_SYSTEMD_UNIT": unit, "_PID": "812", "_COMM": "nginx",
              "_EXE": "/usr/sbin/nginx", "__REALTIME_TIMESTAMP": "1796456000000000", "__CURSOR": "s=1;i=5"}
    return {**fields, **extra}


@pytest.mark.parametrize(("message", "address", "port"), [
    ("nginx: [emerg] bind() to 127.0.0.1:8080 failed (98: Address already in use)", "127.0.0.1", 8080),
    ("nginx: [emerg] bind() to [::]:80 failed (98: Address already in use)", "::", 80),
    ("nginx: [emerg] bind() to 0.0.0.0:443 failed (98: Address already in use)", "0.0.0.0", 443),
    ("error: Bind to port 2226 on 127.0.0.1 failed: Address already in use.", "127.0.0.1", 2226),
    ("error: Bind to port 22 on :: failed: Address already in use.", "::", 22),
    ("bad.socket: Failed to create listening socket (127.0.0.1:8082): Address already in use",
     "127.0.0.1", 8082),
    ("listen tcp :8080: bind: address already in use", None, 8080),
    ("Error: listen EADDRINUSE: address already in use :::3000", "::", 3000),  # Node
    ("Error: listen EADDRINUSE: address already in use 127.0.0.1:3000", "127.0.0.1", 3000),
    ("ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address "
     "already in use", "127.0.0.1", 8000),  # uvicorn
    ("OSError: [Errno 98] Address already in use", None, None),
    ("couldn't bind to [fe80::1%eth0]:53: Address already in use", "fe80::1", 53),
])
def test_what_real_programs_write(message: str, address: str | None, port: int | None) -> None:
    failure = parse(entry(message))
    assert failure is not None and not failure.follow_up
    assert (failure.address, failure.port) == (address, port)
    assert (failure.unit, failure.pid, failure.comm, failure.exe) == ("nginx.service", 812, "nginx",
                                                                       "/usr/sbin/nginx")
    assert failure.cursor == "s=1;i=5" and failure.realtime_usec == 1796456000000000


@pytest.mark.parametrize("message", [
    "nginx: [emerg] still could not bind()",
    "fatal: Cannot bind any address.",
])
def test_follow_ups_name_no_port(message: str) -> None:
    failure = parse(entry(message))
    assert failure is not None and failure.follow_up and failure.port is None


@pytest.mark.parametrize("message", [
    "Started nginx.service - A high performance web server.",
    "Failed to receive listening socket (127.0.0.1:8082): Input/output error",
    "connection from 10.0.0.1:5555 closed",
    "12:30:45 bind ok",
])
def test_other_lines_are_not_failures(message: str) -> None:
    assert parse(entry(message)) is None


def test_errno_field_counts_and_systemd_names_the_unit_it_writes_about() -> None:
    """systemd's own entries (unit init.scope, or none: its `(sd-listen)` helper may be gone
    before journald reads its cgroup) name their unit in UNIT=; anyone else's UNIT= is their own
    words and ignored, also when they exit before journald could see their unit."""
    by_manager = parse(entry("bad.socket: Failed to create listening socket (127.0.0.1:8082): x",
                             unit="init.scope", UNIT="bad.socket", ERRNO="98", _UID="0"))
    assert by_manager is not None and by_manager.unit == "bad.socket" and by_manager.port == 8082
    helper = entry("bad.socket: Failed to create listening socket (127.0.0.1:8082): x",
                   UNIT="bad.socket", ERRNO="98", _UID="0")
    del helper["_SYSTEMD_UNIT"]
    assert parse(helper) is not None and parse(helper).unit == "bad.socket"  # type: ignore[union-attr]
    forged = parse(entry("bind() to 127.0.0.1:81 failed (98: Address already in use)",
                         unit="evil.service", UNIT="ssh.service", _UID="1000"))
    assert forged is not None and forged.unit == "evil.service"
    quick = {**helper, "_UID": "1000"}
    assert parse(quick) is not None and parse(quick).unit is None  # type: ignore[union-attr]


def test_portwatchs_own_entries_and_its_hooks_are_never_failures() -> None:
    """A process named "errno 98" listening makes portwatch write that name into its journal;
    read back, it must not become a conflict."""
    own = Own(pid=700, invocation="abc")
    line = "new listener tcp/*:1234 held by errno 98[4242]"
    assert parse(entry(line, unit="portwatch.service", _PID="700"), own) is None
    assert parse(entry(line, unit="portwatch.service", _PID="701", _SYSTEMD_INVOCATION_ID="abc"), own) is None
    assert parse(entry(line, unit="other.service", _PID="701", _SYSTEMD_INVOCATION_ID="def"), own) is not None


def test_binary_and_repeated_fields() -> None:
    raw = list(b"bind() to 127.0.0.1:99 failed (98: Address already in use)\n\x1b[2J\xff")
    failure = parse(entry(raw, _COMM=["a", "b"]))
    assert failure is not None and failure.port == 99 and failure.comm == "a"
    assert "\x1b[2J" in failure.message  # kept; escaped where it is shown


def test_ports_out_of_range_and_timestamps_are_not_endpoints() -> None:
    assert endpoint_in("bind() to 127.0.0.1:70000 failed") == (None, None)
    assert endpoint_in("at 10:00:01 address already in use") == (None, None)
    assert endpoint_in("failed on localhost:8000: address already in use") == ("127.0.0.1", 8000)


# --- one conflict per failed start --------------------------------------------------------


def failure(message: str = "bind() to 127.0.0.1:8080 failed (98: Address already in use)",
            unit: str = "nginx.service", usec: int = 1) -> BindFailure:
    found = parse(entry(message, unit=unit, __REALTIME_TIMESTAMP=str(usec), __CURSOR=f"c{usec}"))
    assert found is not None
    return found


def nginx_fails(conflicts: Conflicts, start: float, usec: int = 1) -> None:
    """What nginx writes: five bind() errors 0.5 s apart, then "still could not bind()"."""
    for n in range(5):
        conflicts.observe(failure(usec=usec + n), start + n * 0.5, cursor_before=f"c{usec + n - 1}",
                          while_down=False)
    conflicts.observe(failure("nginx: [emerg] still could not bind()", usec=usec + 5), start + 2.5,
                      cursor_before=f"c{usec + 4}", while_down=False)


def test_nginx_is_one_conflict_reported_once_quiet_and_scanned() -> None:
    conflicts = Conflicts()
    nginx_fails(conflicts, 100.0)
    assert conflicts.due(100.0 + MAX_HOLD - 0.1, scanned_after=101.0) == []
    oldest = conflicts.oldest_open()
    assert oldest is not None and oldest.cursor_before == "c0"
    # Quiet long enough, but no scan has begun since the failure: the holder may be unseen yet.
    assert conflicts.due(100.0 + MAX_HOLD + 1, scanned_after=99.0) == []
    (episode,) = conflicts.due(100.0 + MAX_HOLD + 1, scanned_after=100.5)
    assert episode.repeats == 6 and episode.port == 8080 and episode.first.unit == "nginx.service"
    assert conflicts.oldest_open() is None and len(conflicts) == 0
    assert conflicts.reported == {"nginx.service 8080": 6}


def test_repeats_within_the_quiet_time_count_into_the_next_report() -> None:
    conflicts = Conflicts()
    nginx_fails(conflicts, 0.0)
    conflicts.due(10.0, scanned_after=5.0)
    nginx_fails(conflicts, 20.0, usec=100)  # systemd restarted it: the same unit and port
    assert conflicts.due(30.0, scanned_after=25.0) == []
    nginx_fails(conflicts, QUIET + 20.0, usec=200)
    (episode,) = conflicts.due(QUIET + 30.0, scanned_after=QUIET + 25.0)
    assert (episode.repeats, episode.earlier) == (6, 6)


def test_a_failure_without_port_takes_the_port_of_the_rule_allowing_its_unit() -> None:
    rules = [Rule("app", (PortRange(9000, 9000),), Proto.TCP, (Allow(unit="app.service"),)),
             Rule("wide", (PortRange(7000, 7010),), Proto.TCP, (Allow(unit="other.service"),))]
    conflicts = Conflicts()
    for unit in ("app.service", "other.service", "nobody.service"):
        conflicts.observe(failure("OSError: [Errno 98] Address already in use", unit=unit), 0.0,
                          cursor_before="", while_down=False, rules=rules)
    episodes = {e.first.unit: e for e in flush(conflicts, 10.0)}
    assert (episodes["app.service"].port, episodes["app.service"].rule) == (9000, "app")
    assert episodes["app.service"].proto is Proto.TCP
    assert episodes["other.service"].port is None  # a range names no one port
    assert episodes["nobody.service"].port is None


def test_a_follow_up_alone_is_nothing_and_lines_seen_before_a_restart_are_skipped() -> None:
    conflicts = Conflicts(reported={"nginx.service 8080": 5})
    conflicts.observe(failure("nginx: [emerg] still could not bind()"), 0.0, cursor_before="", while_down=False)
    conflicts.observe(failure(usec=5), 0.0, cursor_before="", while_down=False)
    assert len(conflicts) == 0
    conflicts.observe(failure(usec=6), 0.0, cursor_before="c5", while_down=True)
    (episode,) = flush(conflicts, 1.0)
    assert episode.while_down


def test_a_flood_of_distinct_units_keeps_memory_bounded() -> None:
    conflicts = Conflicts()
    for n in range(MAX_EPISODES * 4):
        conflicts.observe(failure(unit=f"u{n}.service", usec=n + 1), n * 0.001, cursor_before="",
                          while_down=False)
    assert len(conflicts) == MAX_EPISODES
    conflicts.due(1e6, scanned_after=1e6)
    assert len(conflicts.reported) <= MAX_EPISODES


def flush(conflicts: Conflicts, now: float) -> list[Episode]:
    """Every open episode, as if quiet and scanned long enough."""
    return conflicts.due(now + 1e6, scanned_after=now + 1e6)


def listener(address: str, port: int, inode: int, proto: Proto = Proto.TCP) -> Listener:
    family = 6 if ":" in address else 4
    return Listener(Socket(proto, family, address, port, inode, 0),
                    (Process(inode, "holder", None, (), 0, "root", None),))


def test_holders_best_match_first() -> None:
    found = [listener("0.0.0.0", 80, 1), listener("127.0.0.1", 80, 2), listener("10.0.0.1", 80, 3),
             listener("::", 80, 4), listener("127.0.0.1", 81, 5), listener("127.0.0.1", 80, 6, Proto.UDP)]
    assert [x.socket.inode for x in holders(found, 80, "127.0.0.1", Proto.TCP)] == [2, 1, 4]
    assert [x.socket.inode for x in holders(found, 80, None, Proto.TCP)] == [1, 2, 3, 4]
    assert [x.socket.inode for x in holders(found, 80, "127.0.0.1", Proto.UDP)] == [6]
    assert [x.socket.inode for x in holders(found, 80, "::1", Proto.TCP)] == [4]
    mapped = [listener("::ffff:127.0.0.1", 80, 7)]
    assert [x.socket.inode for x in holders(mapped, 80, "127.0.0.1", Proto.TCP)] == [7]


def test_one_unit_failing_on_many_ports_is_rate_limited_and_counted() -> None:
    conflicts = Conflicts()
    for n in range(100):
        line = f"bind() to 127.0.0.1:{20000 + n} failed (98: Address already in use)"
        conflicts.observe(failure(line, unit="flood.service", usec=n + 1), n * 0.01, cursor_before="",
                          while_down=False)
    assert len(conflicts) == MAX_PER_UNIT
    assert len(conflicts.due(10.0, scanned_after=5.0)) == MAX_PER_UNIT
    later = "bind() to 127.0.0.1:30000 failed (98: Address already in use)"
    conflicts.observe(failure(later, unit="flood.service", usec=500), QUIET + 20.0, cursor_before="",
                      while_down=False)
    (episode,) = flush(conflicts, QUIET + 21.0)
    assert episode.port == 30000 and episode.suppressed == 100 - MAX_PER_UNIT


def test_a_socket_unit_naming_no_port_gets_its_listen_port_from_systemd() -> None:
    asked: list[str] = []

    def listen_of(unit: str) -> tuple[Proto, int] | None:
        asked.append(unit)
        return (Proto.UDP, 5353) if unit == "mdns.socket" else None

    conflicts = Conflicts()
    for unit in ("mdns.socket", "app.service"):
        conflicts.observe(failure("Failed to listen: Address already in use", unit=unit), 0.0,
                          cursor_before="", while_down=False, listen_of=listen_of)
    episodes = {e.first.unit: e for e in flush(conflicts, 1.0)}
    assert (episodes["mdns.socket"].proto, episodes["mdns.socket"].port) == (Proto.UDP, 5353)
    assert episodes["app.service"].port is None
    assert asked == ["mdns.socket"]  # systemd is asked about socket units only
