"""`portwatch history`: a port's timeline and its holders at a moment, read back from the journal.

Pure tests first, on journalctl's JSON as a real journald wrote it (tests/fixtures/history).
Then end to end: the CLI against journals that are missing or unreadable; entries written
with the daemon's own encoder to the private journald (tests/journald_fixture.py) by
processes in cgroups named after units, so that journald itself sets `_SYSTEMD_UNIT`
(a process in the test's own cgroup gets none there); and the main story under a real
systemd (tests/systemd_sandbox.py): the shipped unit watching a reserved port through
an open, an owner change, a close, forged entries and a squatter with a hostile name (and
a second port held before it started), read inside the sandbox and from a copy of its
journal on the host.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from portwatch.history import (
    TIMELINE_HEADERS,
    At,
    Entry,
    entry_json,
    field_text,
    machines,
    match_groups,
    mixed,
    not_running,
    parse_entry,
    rows,
    timeline,
    wanted,
)
from portwatch.journalread import JournalError, JournalRead
from portwatch.render import table
from tests.conftest import (
    AS_NOBODY,
    NOBODY,
    PROGRAMS,
    ROOT,
    Holder,
    free_port,
    free_ports,
    python_for_nobody,
    run_cli,
    start_holder,
)
from tests.journald_fixture import Journald
from tests.systemd_sandbox import Sandbox

UNIT = "portwatch.service"
CAPTURED = ROOT / "tests" / "fixtures" / "history" / "web1.jsonl"
# The captured hostile name (comm keeps 15 bytes): a byte that is not UTF-8, a colour, a newline.
HOSTILE = b"ev\xff\x1b[31m\nname".decode("utf-8", "surrogateescape")
T0 = 1796569200_000000  # 2026-12-06 15:00:00 UTC, the fixture's first entry


def at(minutes: int, seconds: int = 0, usec: int = 0) -> int:
    """A moment of the captured afternoon, in the journal's microseconds."""
    return T0 + (minutes * 60 + seconds) * 1_000_000 + usec


def captured() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CAPTURED.read_text().splitlines() if line]


def entries(port: int | None = 8080, proto: str | None = "tcp") -> list[Entry]:
    parsed = [e for obj in captured() if (e := parse_entry(obj)) is not None]
    return [e for e in parsed if wanted(e, UNIT, port, proto)]


def state_at(usec: int, port: int | None = 8080, proto: str | None = "tcp") -> At:
    """What `--at` computes from the entries journalctl gives for `--until` that moment."""
    state = At()
    for entry in entries(port, proto):
        if entry.usec <= usec:
            state.feed(entry)
    state.finish()
    return state


def holders(state: At) -> list[tuple[Any, ...]]:
    return [(h.fields.get("port"), h.fields.get("proto"), h.fields.get("pid"), h.fields.get("pids"), h.since_usec)
            for h in state.listeners()]


def journalctl_json(event: str, usec: int, *, boot: str = "b1", unit: str | None = UNIT,
                    **fields: Any) -> dict[str, Any]:
    """An entry as journalctl -o json writes one: text when printable UTF-8, else a byte list."""
    from portwatch.log import journal_fields

    obj: dict[str, Any] = {"__REALTIME_TIMESTAMP": str(usec), "_BOOT_ID": boot, "__CURSOR": f"c{usec}"}
    if unit is not None:
        obj["_SYSTEMD_UNIT"] = unit
    for name, value in journal_fields({"event": event, **fields}):
        text = value if isinstance(value, str) else value.decode()
        raw = text.encode("utf-8", "surrogateescape")
        printable = text.isprintable() and raw.decode("utf-8", "replace") == text
        obj[name] = text if printable else list(raw)
    return obj


# -- pure: reading journalctl's JSON ---------------------------------------------------------------


def test_values_keep_the_daemons_exact_bytes() -> None:
    """A byte list (not printable UTF-8) decodes with surrogateescape; numbers, lists and
    booleans are typed; only PORTWATCH_* fields are taken."""
    (taken,) = [e for e in entries() if e.event == "reserved_port_taken"]
    assert taken.fields["comm"] == HOSTILE
    assert taken.fields["exe"] == b"/tmp/.x/ev\xffil".decode("utf-8", "surrogateescape")
    assert (taken.fields["port"], taken.fields["inode"], taken.fields["pid"]) == (8080, 1002, 200)
    assert taken.fields["pids"] == [200] and taken.fields["offender_pids"] == [200]
    assert taken.fields["verified"] is True and taken.fields["at_startup"] is False
    assert (taken.unit, taken.usec) == (UNIT, at(15, 0, 500))
    assert taken.cursor is not None and taken.boot == "cab3b8830fcd484f9cc293ab15f898da"
    assert "message" not in taken.fields and "event" not in taken.fields
    (opened,) = [e for e in entries() if e.event == "listener_opened" and e.fields["pid"] == 200]
    assert opened.fields["cmdline"] == [b"/tmp/.x/ev\xffil".decode("utf-8", "surrogateescape"),
                                        "--title=\x1b]0;owned\x07"]


def test_text_stays_text_where_it_does_not_parse() -> None:
    obj = journalctl_json("listener_opened", at(1), proto="tcp", address="127.0.0.1", port=80, inode=5,
                          pid=7, pids=[7], comm="true", user="1000")
    obj["PORTWATCH_PIDS"] = "[7, oops"
    obj["PORTWATCH_UNIT"] = ["first.service", [115, 10]]  # a repeated field: the first value
    entry = parse_entry(obj)
    assert entry is not None
    assert entry.fields["comm"] == "true" and entry.fields["user"] == "1000"
    assert entry.fields["pids"] == "[7, oops"
    assert entry.fields["unit"] == "first.service"
    assert field_text([115, 10]) == "s\n" and field_text([]) is None and field_text(None) is None
    assert parse_entry({"__REALTIME_TIMESTAMP": "1", "MESSAGE": "not portwatch's"}) is None


def test_only_the_units_entries_are_wanted() -> None:
    """The captured forgeries (from forger.service, and from a process in no unit) have every
    PORTWATCH_* field right; only the trusted _SYSTEMD_UNIT tells them apart."""
    parsed = [e for obj in captured() if (e := parse_entry(obj)) is not None]
    forged = [e for e in parsed if e.fields.get("comm") in ("forged", "forged2")]
    assert [e.unit for e in forged] == ["forger.service", None]
    assert all(e.fields["port"] == 8080 and e.fields["proto"] == "tcp" for e in forged)
    assert not any(wanted(e, UNIT, 8080, "tcp") for e in forged)
    assert [wanted(e, "forger.service", 8080, "tcp") for e in forged] == [True, False]
    assert {e.fields.get("proto") for e in entries() if e.event in ("listener_opened",)} == {"tcp"}
    assert {e.fields["proto"] for e in entries(8080, "udp") if "proto" in e.fields} == {"udp"}


def test_the_journalctl_command_line() -> None:
    reader = JournalRead(match_groups(UNIT, 8080, "tcp"), since="-2h", directory="/srv/web1")
    trusted = "_SYSTEMD_UNIT=portwatch.service"
    assert reader.argv == [
        "journalctl", "--output=json", "--no-pager", "--all", "--directory=/srv/web1", "--since=-2h",
        trusted, "PORTWATCH_EVENT=listener_opened", "PORTWATCH_EVENT=listener_closed",
        "PORTWATCH_EVENT=owner_changed", "PORTWATCH_EVENT=reserved_port_taken", "PORTWATCH_PORT=8080",
        "PORTWATCH_PROTO=tcp",
        "+", trusted, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_PORT=8080",
        "+", trusted, "PORTWATCH_EVENT=portwatch_started", "PORTWATCH_EVENT=portwatch_stopping",
        "PORTWATCH_EVENT=state_restored", "PORTWATCH_EVENT=state_reset",
    ]
    files = JournalRead(match_groups("x.service", None, None), until="@5", files=["a", "b"]).argv
    assert files[4:7] == ["--file=a", "--file=b", "--until=@5"]
    assert "PORTWATCH_PORT" not in " ".join(files)


def test_one_machine_at_a_time() -> None:
    """A directory systemd-journal-remote fills holds every sender's files: their sockets and boots
    are not one story, so entries of two machines are refused until --machine picks one."""
    argv = JournalRead(match_groups(UNIT, 22, "tcp", "0123abcd")).argv
    assert argv.count("_MACHINE_ID=0123abcd") == 3  # in each OR-ed group
    web1 = {**journalctl_json("listener_opened", at(1), port=22, proto="tcp"), "_MACHINE_ID": "aa", "_HOSTNAME": "web1"}
    db1 = {**journalctl_json("listener_opened", at(2), port=22, proto="tcp"), "_MACHINE_ID": "bb",
           "_HOSTNAME": "db\x1b1"}
    one = [e for e in map(parse_entry, [web1, web1]) if e is not None]
    assert machines(one) == {"aa": "web1"} and mixed(machines(one)) is None
    both = [e for e in map(parse_entry, [web1, db1]) if e is not None]
    line = mixed(machines(both))
    assert line is not None and "2 machines" in line and "web1 aa" in line and "db\\x1b1 bb" in line
    assert "--machine" in line


# -- pure: the timeline ------------------------------------------------------------------------------


def test_timeline_rows() -> None:
    got = rows(timeline(entries()), UTC)
    nginx = "127.0.0.1:8080"
    assert got == [
        ["2026-12-06 15:00:00+0000", "portwatch started", "", "", "", "", "watching 3 listeners"],
        ["2026-12-06 15:00:00+0000", "listening", "tcp", nginx, "nginx[100] unit nginx.service and 1 more", "web",
         "already listening at start"],
        ["2026-12-06 15:05:00+0000", "owner changed", "tcp", nginx, "nginx[101] unit nginx.service", "web",
         "previous pids 100,101"],
        ["2026-12-06 15:10:00+0000", "closed", "tcp", nginx, "was nginx[101] unit nginx.service", "web", ""],
        ["2026-12-06 15:15:00+0000", "opened", "tcp", "*:8080", f"{HOSTILE}[200] user nobody", "web", ""],
        ["2026-12-06 15:15:00+0000", "port taken", "tcp", "*:8080", f"{HOSTILE}[200] user nobody", "web",
         "offender pids 200"],
        ["2026-12-06 15:20:00+0000", "portwatch stopping", "", "", "", "", ""],
        ["2026-12-06 15:30:00+0000", "portwatch started", "", "", "", "", "watching 3 listeners"],
        ["2026-12-06 15:30:00+0000", "closed", "tcp", "*:8080", f"was {HOSTILE}[200] user nobody", "web",
         "while portwatch was down"],
        ["2026-12-06 15:30:00+0000", "opened", "tcp", nginx, "nginx[400] unit nginx.service and 2 more", "web",
         "while portwatch was down"],
        ["2026-12-06 15:40:00+0000", "bind conflict", "tcp", nginx, "nginx[400] unit nginx.service and 2 more",
         "web", "blocked: apache2.service (apache2[777])"],
        ["2026-12-06 15:45:00+0000", "portwatch stopping", "", "", "", "", ""],
        ["2026-12-06 15:50:00+0000", "portwatch started", "", "", "", "", "watching 2 listeners"],
        ["2026-12-06 15:50:00+0000", "listening", "tcp", nginx, "nginx[400] unit nginx.service and 2 more", "web",
         "already listening at start"],
    ]
    other = rows(timeline(entries(8080, "udp")), timezone(timedelta(hours=1)))
    assert [r[:5] for r in other] == [
        ["2026-12-06 16:50:00+0100", "portwatch started", "", "", ""],
        ["2026-12-06 16:55:00+0100", "opened", "udp", "127.0.0.1:8080", "dnsmasq[800] unit dnsmasq.service"],
    ]
    every = rows(timeline(entries(None, None)), UTC)
    assert ["tcp", "[::1]:9090", "unidentified (permission_denied)"] in [r[2:5] for r in every]


def test_timeline_keeps_only_the_restarts_around_the_ports_entries() -> None:
    def life(event: str, minute: int) -> dict[str, Any]:
        return journalctl_json(event, at(minute), pid=minute)

    story = [life("portwatch_started", 0), life("portwatch_stopping", 1), life("portwatch_started", 2),
             journalctl_json("listener_opened", at(3), proto="tcp", address="::", port=22, inode=9, pid=5, pids=[5],
                             comm="sshd", user="root"),
             life("portwatch_stopping", 4), life("portwatch_started", 5), life("portwatch_stopping", 6)]
    shown = timeline(e for obj in story if (e := parse_entry(obj)) is not None)
    assert [(e.event, e.usec) for e in shown] == [
        ("portwatch_started", at(2)), ("listener_opened", at(3)), ("portwatch_stopping", at(4))]
    assert rows(shown, UTC)[1][3] == "[::]:22"
    lifecycle_only = [e for obj in story[:2] if (e := parse_entry(obj)) is not None]
    assert timeline(lifecycle_only) == []


def test_the_table_escapes_hostile_names_and_the_json_keeps_them_exact() -> None:
    shown = timeline(entries())
    text = table(TIMELINE_HEADERS, rows(shown, UTC))
    assert "\x1b" not in text and "\x07" not in text and "\udcff" not in text
    assert len(text.splitlines()) == len(shown) + 1  # the newline in the name split no row
    assert "ev\\xff\\x1b[31m\\nname[200] user nobody" in text
    taken = next(entry_json(e) for e in shown if e.event == "reserved_port_taken")
    assert taken["comm"] == HOSTILE and taken["pid"] == 200 and taken["offender_pids"] == [200]
    assert (taken["time"], taken["realtime_usec"]) == ("2026-12-06T15:15:00.000500Z", at(15, 0, 500))
    assert taken["cmdline"] is None and taken["unit"] is None  # no such field: null, never missing
    dumped = json.dumps(taken, ensure_ascii=True)
    assert '"comm": "ev\\udcff\\u001b[31m\\nname"' in dumped
    opened = next(entry_json(e) for e in shown if e.event == "listener_opened" and e.fields.get("pid") == 200)
    assert "\\u001b]0;owned\\u0007" in json.dumps(opened["cmdline"], ensure_ascii=True)
    assert list(opened)[:6] == ["time", "realtime_usec", "event", "proto", "address", "port"]


# -- pure: the state at a moment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "expected", "running"),
    [
        (at(0) - 1, [], False),  # before portwatch's first entry
        (at(1), [(8080, "tcp", 100, [100, 101], at(0, 0, 100))], True),  # held when it started
        (at(6), [(8080, "tcp", 101, [101], at(5))], True),  # the owner change
        (at(11), [], True),  # closed
        (at(13), [], True),  # the forged opens at 15:12 are not the unit's
        (at(16), [(8080, "tcp", 200, [200], at(15))], True),  # taken: held since opened, not since judged
        (at(25), [(8080, "tcp", 200, [200], at(15))], False),  # as of when portwatch stopped at 15:20
        (at(35), [(8080, "tcp", 400, [400, 401, 402], at(30, 0, 300))], True),  # closed/opened while down
        (at(47), [(8080, "tcp", 400, [400, 401, 402], at(30, 0, 300))], False),
        (at(52), [(8080, "tcp", 400, [400, 401, 402], at(50, 0, 100))], True),  # re-announced at start
    ],
)
def test_who_held_8080(usec: int, expected: list[tuple[Any, ...]], running: bool) -> None:
    state = state_at(usec)
    assert holders(state) == expected
    assert state.running is running


def test_at_flags_and_the_not_running_line() -> None:
    (first,) = state_at(at(1)).listeners()
    assert (first.at_startup, first.while_down, first.taken, first.since_event) == (
        True, False, False, "listener_opened")
    (squatter,) = state_at(at(25)).listeners()
    assert (squatter.taken, squatter.fields["comm"], squatter.fields["offender_pids"]) == (True, HOSTILE, [200])
    line = not_running(state_at(at(25)), UTC)
    assert line is not None and "stopped at 2026-12-06 15:20:00+0000" in line and "as of when it stopped" in line
    (down,) = state_at(at(35)).listeners()
    assert (down.while_down, down.at_startup, down.fields["inode"]) == (True, False, 1003)
    assert not_running(state_at(at(35)), UTC) is None
    never = state_at(at(0) - 1)
    assert never.entries == 0
    assert not_running(never) == "portwatch had not started by then, as far as the journal says"


def test_at_without_a_port_and_a_start_without_saved_state() -> None:
    """Every port's holders; a fresh start's inventory replaces what was known: 9090 closed
    while portwatch was down with no state, so no entry says so, and it is not in the inventory."""
    ports = lambda usec: [(p, proto) for p, proto, *_ in holders(state_at(usec, None, None))]  # noqa: E731
    assert ports(at(1)) == [(8080, "tcp"), (9090, "tcp"), (5353, "udp")]
    assert ports(at(47)) == [(8080, "tcp"), (9090, "tcp"), (5353, "udp")]
    assert ports(at(52)) == [(8080, "tcp"), (5353, "udp")]
    assert ports(at(56)) == [(8080, "tcp"), (5353, "udp"), (8080, "udp")]
    assert holders(state_at(at(56), 8080, "udp")) == [(8080, "udp", 800, [800], at(55))]


def test_at_a_new_boot_ends_every_socket_and_a_restart_with_state_keeps_them() -> None:
    def opened(usec: int, boot: str, inode: int) -> dict[str, Any]:
        return journalctl_json("listener_opened", usec, boot=boot, proto="tcp", address="0.0.0.0", port=80,
                               inode=inode, pid=10, pids=[10], comm="httpd", user="root")

    def life(event: str, usec: int, boot: str) -> dict[str, Any]:
        return journalctl_json(event, usec, boot=boot, pid=1)

    def fed(objs: list[dict[str, Any]]) -> At:
        state = At()
        for obj in objs:
            entry = parse_entry(obj)
            assert entry is not None
            state.feed(entry)
        state.finish()
        return state

    restored = journalctl_json("state_restored", at(2, 0, 1), boot="b1", path="/var/lib/portwatch/state.json")
    same_boot = [life("portwatch_started", at(0), "b1"), opened(at(1), "b1", 7), life("portwatch_stopping", at(2), "b1"),
                 life("portwatch_started", at(2, 1), "b1"), restored]
    assert [h.fields["inode"] for h in fed(same_boot).listeners()] == [7]
    assert fed(same_boot[:-1]).listeners() == []  # no state_restored: a fresh start, and 7 not re-announced
    # The machine rebooted without a stop entry: the inode numbers of the last boot mean nothing now.
    rebooted = [life("portwatch_started", at(0), "b1"), opened(at(1), "b1", 7),
                life("portwatch_started", at(9), "b2"), restored | {"_BOOT_ID": "b2", "__REALTIME_TIMESTAMP": str(at(9, 1))}]
    assert fed(rebooted).listeners() == []


# -- end to end: journals that cannot be read -----------------------------------------------------------


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (["--directory", "/nonexistent/portwatch-journal"], 65,
         "cannot read the journal in /nonexistent/portwatch-journal: journalctl: Failed to open"),
        (["--directory", "{empty}"], 65, "cannot read the journal in {empty}: no journal files there"),
        (["--file", "/nonexistent/system.journal"], 65, "cannot read the journal file /nonexistent/system.journal"),
        (["--directory", "{journal}", "--since=not-a-time"], 2, "journalctl: Failed to parse timestamp"),
        (["--directory", "{journal}", "--at=now", "--until=-1h"], 2, "cannot be combined with --since or --until"),
    ],
)
def test_a_journal_that_cannot_be_read_is_one_line(
    args: list[str], status: int, said: str, tmp_path: Path, journald: Journald,
) -> None:
    places = {"empty": str(tmp_path), "journal": journald.directory}
    done = run_cli("history", "8080", *(a.format(**places) for a in args))
    assert done.returncode == status
    assert said.format(**places) in _one_line(done)
    assert done.stdout == ""


@pytest.mark.root
def test_a_missing_journalctl_is_a_journal_error(journald: Journald) -> None:
    reader = JournalRead(match_groups(UNIT, 8080, "tcp"), directory=journald.directory,
                         journalctl="/nonexistent/bin/journalctl")
    with pytest.raises(JournalError, match=r"^cannot run /nonexistent/bin/journalctl: No such file or directory$"):
        list(reader.entries())


# -- end to end: the private journald, units from cgroups ------------------------------------------------

SENDER = r"""
import json, os, sys
with open(sys.argv[1], "w") as procs:  # journald names the unit from this cgroup's path
    procs.write(str(os.getpid()))
from portwatch.journal import JournalSender
from portwatch.log import journal_fields
sender = JournalSender(sys.argv[2])
for line in sys.stdin:  # alive until stdin closes: journald reads /proc/<pid> as each entry arrives
    sender.send(journal_fields(json.loads(line)))
    print("sent", flush=True)
"""


def _cgroup2() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    pytest.fail("no cgroup2 hierarchy mounted: journald takes _SYSTEMD_UNIT from it")


class UnitSender:
    """A process in the cgroup `<slice>/<unit>`, sending events with the daemon's encoder."""

    def __init__(self, journald: Journald, top: Path, unit: str) -> None:
        self.cgroup = top / unit
        self.cgroup.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SENDER, str(self.cgroup / "cgroup.procs"), journald.socket],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def send(self, event: dict[str, Any]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(event) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "sent\n"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.cgroup.rmdir()


@dataclass
class Written:
    journald: Journald
    unit: str
    forger: str
    port: int
    usec: dict[str, int]  # event -> its __REALTIME_TIMESTAMP


@pytest.fixture(scope="module")
def written(journald: Journald) -> Iterator[Written]:
    token = secrets.token_hex(4)
    unit, forger, port = f"portwatch-history-{token}.service", f"forger-{token}.service", free_port()
    top = _cgroup2() / f"portwatch-history-{token}.slice"
    where = {"proto": "tcp", "address": "127.0.0.1", "port": port, "inode": 777001, "socket_uid": NOBODY}
    squatter = {**where, "pid": 4321, "pids": [4321], "comm": HOSTILE, "user": "nobody", "rule": "guarded",
                "exe": b"/tmp/\xffx".decode("utf-8", "surrogateescape"), "cmdline": ["x", "\x1b[2J\n"]}
    senders: list[UnitSender] = []
    try:
        daemon = UnitSender(journald, top, unit)
        senders.append(daemon)
        daemon.send({"event": "portwatch_started", "listeners": 0, "pid": 99})
        daemon.send({"event": "listener_opened", **squatter})
        daemon.send({"event": "reserved_port_taken", **squatter, "offender_pids": [4321], "verified": True,
                     "at_startup": False})
        forging = UnitSender(journald, top, forger)
        senders.append(forging)
        forged = {"event": "listener_opened", **where, "inode": 777002, "pid": 1, "pids": [1], "comm": "forged"}
        forging.send(forged)
        from portwatch.journal import JournalSender
        from portwatch.log import journal_fields

        with JournalSender(journald.socket) as sender:  # from the test's own cgroup: no unit at all
            sender.send(journal_fields({**forged, "comm": "forged-here"}))
        found = journald.query(f"PORTWATCH_PORT={port}", count=4)
        assert len(found) == 4, found
        units = {field_text(e.get("PORTWATCH_COMM")): e.get("_SYSTEMD_UNIT") for e in found}
        if units.get(HOSTILE) != unit:
            pytest.fail(f"journald did not attribute the sender in cgroup {top / unit} to {unit}: {units}")
        assert units["forged"] == forger and units["forged-here"] is None
        usec = {e["PORTWATCH_EVENT"]: int(e["__REALTIME_TIMESTAMP"]) for e in found
                if e.get("_SYSTEMD_UNIT") == unit}
        yield Written(journald, unit, forger, port, usec)
    finally:
        for sender_proc in senders:
            sender_proc.close()
        if top.exists():
            top.rmdir()


@pytest.mark.root
def test_only_what_journald_attributes_to_the_unit_is_read(written: Written) -> None:
    base = ["history", str(written.port), "--directory", written.journald.directory]
    done = run_cli(*base, "--unit", written.unit, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [e["event"] for e in got] == ["portwatch_started", "listener_opened", "reserved_port_taken"]
    assert [e["realtime_usec"] for e in got[1:]] == [written.usec[e["event"]] for e in got[1:]]
    opened = got[1]
    assert (opened["comm"], opened["pid"], opened["user"], opened["inode"]) == (HOSTILE, 4321, "nobody", 777001)
    assert opened["exe"] == b"/tmp/\xffx".decode("utf-8", "surrogateescape")
    assert opened["cmdline"] == ["x", "\x1b[2J\n"]
    assert '"comm": "ev\\udcff\\u001b[31m\\nname"' in done.stdout
    shown = run_cli(*base, "--unit", written.unit)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "forged" not in shown.stdout
    assert len(shown.stdout.splitlines()) == 4  # header, started, opened, taken
    assert "ev\\xff\\x1b[31m\\nname[4321] user nobody" in shown.stdout
    # The forged entry is there, with its own unit: the unit is what leaves it out.
    other = run_cli(*base, "--unit", written.forger, "--json")
    assert [e["comm"] for e in json.loads(other.stdout)] == ["forged"]


@pytest.mark.root
def test_at_names_the_holder_from_the_private_journal(written: Written) -> None:
    moment = written.usec["reserved_port_taken"] + 1
    done = run_cli("history", str(written.port), "--directory", written.journald.directory, "--unit", written.unit,
                   "--at", f"@{moment // 1_000_000}.{moment % 1_000_000:06d}", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["portwatch_running"] is True
    (held,) = answer["listeners"]
    assert (held["comm"], held["pids"], held["taken"]) == (HOSTILE, [4321], True)
    assert held["since_usec"] == written.usec["listener_opened"]
    before = written.usec["listener_opened"] - 1
    early = run_cli("history", str(written.port), "--directory", written.journald.directory, "--unit", written.unit,
                    "--at", f"@{before // 1_000_000}.{before % 1_000_000:06d}")
    assert early.returncode == 1 and "nobody held tcp port" in _one_line(early)


@pytest.mark.root
def test_journal_files_this_user_cannot_open_are_said(written: Written, nobody_work: Path,
                                                      readable_tree: Path) -> None:
    """As nobody: a copy it may read and a file it may not. It prints what it read, then one
    line saying the answer lacks the unreadable file's entries (exit 65); with no file it can
    read at all, journalctl refuses and that is the one line."""
    (machine,) = [p for p in Path(written.journald.directory).iterdir() if p.is_dir()]
    copy = nobody_work / "journal" / machine.name
    copy.mkdir(parents=True)
    shutil.copy2(machine / "system.journal", copy / "system.journal")
    shutil.copy2(machine / "system.journal", copy / "user-1000.journal")
    for path in (copy.parent, copy):
        path.chmod(0o755)
    (copy / "system.journal").chmod(0o644)
    (copy / "user-1000.journal").chmod(0o600)

    def as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AS_NOBODY, python_for_nobody(), "-m", "portwatch", "history", str(written.port),
             "--directory", str(copy.parent), "--unit", written.unit],
            capture_output=True, text=True, cwd="/", check=False, timeout=60,
            env={"PYTHONPATH": str(readable_tree), "PATH": os.environ["PATH"]},
        )

    partly = as_nobody()
    assert partly.returncode == 65
    assert "ev\\xff\\x1b[31m\\nname[4321]" in partly.stdout
    assert f"cannot open {copy / 'user-1000.journal'}: the answer above lacks the system's entries" in _one_line(partly)
    (copy / "system.journal").chmod(0o600)
    refused = as_nobody()
    assert refused.returncode == 65 and refused.stdout == ""
    assert "No journal files were opened due to insufficient permissions" in _one_line(refused)


# -- end to end: the daemon under a real systemd --------------------------------------------------------

CONFIG = """\
interval: 0.3
protocols: [tcp]
follow_journal: false
reserved:
  - name: guarded
    ports: [{port}]
    allow:
      - user: root
"""
DROP_IN = f"/run/systemd/system/{UNIT}.d/test.conf"
STATE_DIR = "/var/lib/portwatch-history"  # a state of its own: the first start is a fresh one
FORGER_UNIT = "pwhist-forger.service"
# Every PORTWATCH_* field of a real open, SYSLOG_IDENTIFIER=portwatch, and the unit named in
# UNIT= and (dropped by journald: a client cannot set trusted fields) _SYSTEMD_UNIT=.
FORGE = r"""
import os, signal, socket, sys
from portwatch.journal import encode_entry
from portwatch.log import journal_fields
port, name = int(sys.argv[1]), sys.argv[2]
fields = journal_fields({"event": "listener_opened", "proto": "tcp", "address": "127.0.0.1", "port": port,
                         "inode": 4242, "pid": 4242, "pids": [4242], "comm": name, "user": "root", "rule": "guarded"})
payload = encode_entry([*fields, ("UNIT", "portwatch.service")]) + b"_SYSTEMD_UNIT=portwatch.service\n"
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(payload, "/run/systemd/journal/socket")
print("sent", os.getpid(), flush=True)
signal.pause()  # alive until stopped, so that journald reads its cgroup
"""


@dataclass
class Story:
    sandbox: Sandbox
    port: int
    invocation: str
    early: Holder  # listening on a second port before portwatch started
    owner: int  # the allowed holder that forked and exited
    heir: int  # its child, which kept the socket
    squatter: int
    usec: dict[str, int]  # step -> __REALTIME_TIMESTAMP of the entry that marks it
    entries: list[dict[str, Any]]  # the unit's entries for the port, as journalctl gives them

    def portwatch(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(f"{self.sandbox.venv}/bin/portwatch", "history", str(self.port), *args, check=False)

    def at(self, step: str, offset: int = 0) -> str:
        usec = self.usec[step] + offset
        return f"@{usec // 1_000_000}.{usec % 1_000_000:06d}"


def _stamp(entry: dict[str, Any]) -> int:
    return int(entry["__REALTIME_TIMESTAMP"])


def _wait(sandbox: Sandbox, *matches: str) -> dict[str, Any]:
    found = sandbox.wait_journal(*matches)
    assert found, f"no entry matching {matches}"
    return found[-1]


class Stage:
    """What the story adds to the sandbox, and what it started there, so that all of it goes."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.programs = sandbox.workdir / "history-programs"
        self.port, self.early_port = free_ports(2)
        self.added = [sandbox.path(DROP_IN), sandbox.path(f"/run/systemd/system/{FORGER_UNIT}")]
        self.holders: list[Holder] = []
        self.alive: set[int] = set()  # pids (the sandbox's) of what this started and has not ended
        self.spawned: list[subprocess.Popen[str]] = []

    def install(self) -> None:
        sandbox, programs = self.sandbox, self.programs
        programs.mkdir(mode=0o755, exist_ok=True)
        shutil.copy2(PROGRAMS / "listener.py", programs)
        (programs / "forge.py").write_text(FORGE)
        for name in ("listener.py", "forge.py"):
            (programs / name).chmod(0o644)  # read by nobody and by systemd's services
        config = sandbox.workdir / "history.yaml"
        config.write_text(CONFIG.format(port=self.port))
        config.chmod(0o644)
        sandbox.install_portwatch(UNIT)
        drop_in, forger = self.added
        drop_in.parent.mkdir(exist_ok=True)
        drop_in.write_text(f"[Service]\nExecStart=\nExecStart={sandbox.venv}/bin/portwatch run --config {config} "
                           f"--state-dir {STATE_DIR}\nStateDirectory={Path(STATE_DIR).name}\nRestartSec=200ms\n")
        forger.write_text(f"[Service]\nExecStart={sandbox.venv}/bin/python {programs}/forge.py {self.port} "
                          "forged-unit\n")
        sandbox.daemon_reload()

    def listener(self, prefix: list[str], port: int | None = None, **kw: Any) -> Holder:
        where = {"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port or self.port}
        holder = start_holder([where],
                              prefix=prefix, python="/usr/bin/python3", program=self.programs / "listener.py", **kw)
        self.holders.append(holder)
        self.alive |= {holder.pid, *holder.children}
        return holder

    def kill(self, signal_name: str, pid: int) -> None:
        self.sandbox.run("kill", f"-{signal_name}", str(pid), check=False)
        self.alive.discard(pid)

    def forge_here(self) -> None:
        """A forgery from the test's own scope (nsenter keeps the test's cgroup)."""
        here = subprocess.Popen([*self.sandbox.prefix, f"{self.sandbox.venv}/bin/python",
                                 str(self.programs / "forge.py"), str(self.port), "forged-here"],
                                stdout=subprocess.PIPE, text=True)
        self.spawned.append(here)
        assert here.stdout is not None
        word, pid = here.stdout.readline().split()
        assert word == "sent"
        self.alive.add(int(pid))

    def play(self) -> Story:
        sandbox, port = self.sandbox, self.port
        early = self.listener(sandbox.prefix, port=self.early_port)
        sandbox.systemctl("start", UNIT)
        inv = sandbox.show(UNIT, "InvocationID")["InvocationID"]
        ours = ("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={inv}")
        usec = {"started": _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=portwatch_started"))}
        usec["inventory"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=listener_opened", "PORTWATCH_AT_STARTUP=true",
                                         f"PORTWATCH_PORT={self.early_port}"))
        # Root's pre-fork server: parent and child hold the socket; then the parent dies.
        owner = self.listener(sandbox.prefix, fork=1)
        parent, (child,) = owner.pid, owner.children
        usec["both"] = _stamp(_wait(sandbox, *ours, f"PORTWATCH_PORT={port}", f"PORTWATCH_PIDS=[{parent}, {child}]"))
        self.kill("KILL", parent)
        usec["heir"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=owner_changed", f"PORTWATCH_PIDS=[{child}]"))
        self.kill("TERM", child)
        usec["closed"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=listener_closed", f"PORTWATCH_PORT={port}"))
        sandbox.systemctl("start", FORGER_UNIT)
        self.forge_here()
        by_unit = _wait(sandbox, "PORTWATCH_COMM=forged-unit")
        by_scope = _wait(sandbox, "PORTWATCH_COMM=forged-here")
        assert by_unit["_SYSTEMD_UNIT"] == FORGER_UNIT and by_unit["UNIT"] == UNIT
        assert by_scope.get("_SYSTEMD_UNIT") != UNIT and by_scope["PORTWATCH_PORT"] == str(port)
        usec["forged"] = max(_stamp(by_unit), _stamp(by_scope))
        squatter = self.listener([*sandbox.prefix, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups"], name=HOSTILE.encode("utf-8", "surrogateescape"))
        usec["squatted"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=listener_opened",
                                        f"PORTWATCH_PID={squatter.pid}"))
        usec["taken"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=reserved_port_taken",
                                     f"PORTWATCH_OFFENDER_PIDS=[{squatter.pid}]"))
        sandbox.systemctl("stop", UNIT)
        usec["stopped"] = _stamp(_wait(sandbox, *ours, "PORTWATCH_EVENT=portwatch_stopping"))
        found = sandbox.journal(*ours, f"PORTWATCH_PORT={port}")
        return Story(sandbox, port, inv, early, parent, child, squatter.pid, usec, found)

    def clean(self) -> None:
        self.sandbox.systemctl("stop", UNIT, FORGER_UNIT, check=False)
        for pid in list(self.alive):
            self.kill("KILL", pid)
        for holder in self.holders:
            holder.proc.wait(10)  # nsenter, once what it started inside is gone
            if holder.proc.stdout is not None:
                holder.proc.stdout.close()
        for proc in self.spawned:
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        for path in self.added:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.sandbox.path(STATE_DIR), ignore_errors=True)
        self.sandbox.daemon_reload()


@pytest.fixture(scope="module")
def story(systemd_sandbox: Sandbox) -> Iterator[Story]:
    """The shipped unit starts (a listener on a second port already there) and watches port P
    (reserved for root): root's listener forks and exits (its child keeps the socket), the child
    exits, two forged opens of P, a squatter run as nobody with a hostile name, and the daemon
    stops. Everything added is removed at the end."""
    stage = Stage(systemd_sandbox)
    try:
        stage.install()
        yield stage.play()
    finally:
        stage.clean()


@pytest.mark.systemd
@pytest.mark.root
def test_the_ports_story_in_order(story: Story) -> None:
    done = story.portwatch("--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    port_events = [(e["event"], e["realtime_usec"]) for e in got if "port" in e]
    assert port_events == [(e["PORTWATCH_EVENT"], _stamp(e)) for e in story.entries]
    assert [e["event"] for e in got if "port" not in e] == ["portwatch_started", "portwatch_stopping"]
    assert got[0]["event"] == "portwatch_started" and got[-1]["event"] == "portwatch_stopping"
    names = " ".join(e["event"] for e in got)
    # The first scan may catch the parent before its fork: then an owner change adds the child.
    assert re.fullmatch(r"portwatch_started listener_opened (owner_changed )?owner_changed listener_closed "
                        r"listener_opened reserved_port_taken portwatch_stopping", names), names
    heir = next(e for e in got if e["event"] == "owner_changed" and e["pids"] == [story.heir])
    assert story.owner in heir["previous_pids"] and heir["pid"] == story.heir and heir["user"] == "root"
    closed = next(e for e in got if e["event"] == "listener_closed")
    assert (closed["pids"], closed["port"], closed["address"], closed["rule"]) == (
        [story.heir], story.port, "127.0.0.1", "guarded")
    taken = next(e for e in got if e["event"] == "reserved_port_taken")
    assert (taken["comm"], taken["pid"], taken["user"], taken["offender_pids"]) == (
        HOSTILE, story.squatter, "nobody", [story.squatter])
    assert '"comm": "ev\\udcff\\u001b[31m\\nname"' in done.stdout
    assert "forged" not in done.stdout  # neither forgery, though both carry every PORTWATCH_* field


@pytest.mark.systemd
@pytest.mark.root
def test_the_table_escapes_the_squatters_name(story: Story) -> None:
    done = story.portwatch()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(json.loads(story.portwatch("--json").stdout)) + 1
    assert lines[0].split() == ["TIME", "EVENT", "PROTO", "ADDRESS:PORT", "HOLDERS", "RULE", "NOTE"]
    assert "\x1b" not in done.stdout and "forged" not in done.stdout
    (taken,) = [line for line in lines if " port taken " in line]
    assert f"ev\\xff\\x1b[31m\\nname[{story.squatter}] user nobody" in taken
    assert f"offender pids {story.squatter}" in taken and "guarded" in taken
    changed = [line for line in lines if f"[{story.heir}] " in line and " owner changed " in line][-1]
    assert f"127.0.0.1:{story.port}" in changed and f"previous pids {story.owner},{story.heir}" in changed


@pytest.mark.systemd
@pytest.mark.root
def test_at_names_who_held_it_then(story: Story) -> None:
    def at(step: str, offset: int = 0) -> tuple[int, Any, str]:
        done = story.portwatch("--at", story.at(step, offset), "--json")
        return done.returncode, json.loads(done.stdout), done.stderr

    status, answer, said = at("heir", -1)
    assert (status, said, answer["portwatch_running"]) == (0, "", True)
    (held,) = answer["listeners"]
    assert held["pids"] == [story.owner, story.heir] and held["pid"] == story.owner
    status, answer, _ = at("heir", 1)
    (held,) = answer["listeners"]
    assert (held["pids"], held["since_usec"], held["since_event"]) == ([story.heir], story.usec["heir"],
                                                                       "owner_changed")
    # After the close and the forgeries: nobody.
    status, answer, said = at("forged", 1)
    assert (status, answer["listeners"]) == (1, [])
    assert said == f"portwatch: nobody held tcp port {story.port} at {story.at('forged', 1)}, as far as the journal says\n"
    table_done = story.portwatch("--at", story.at("forged", 1))
    assert table_done.returncode == 1 and table_done.stdout == ""
    # After the daemon stopped: the squatter, as of when it stopped, and a line that says so.
    status, answer, said = at("stopped", 1)
    assert (status, said, answer["portwatch_running"]) == (0, "", False)
    stopped = story.usec["stopped"]
    assert answer["portwatch_stopped"] == f"{datetime.fromtimestamp(stopped // 1_000_000, UTC):%Y-%m-%dT%H:%M:%S}.{stopped % 1_000_000:06d}Z"
    (held,) = answer["listeners"]
    assert (held["comm"], held["taken"], held["since_usec"]) == (HOSTILE, True, story.usec["squatted"])
    shown = story.portwatch("--at", story.at("stopped", 1))
    (row,) = shown.stdout.splitlines()[1:]
    assert f"ev\\xff\\x1b[31m\\nname[{story.squatter}] user nobody" in row and "\x1b" not in shown.stdout
    assert "portwatch: portwatch was not running then: it stopped at" in _one_line(shown)


@pytest.mark.systemd
@pytest.mark.root
def test_a_copy_of_the_journal_gives_the_same_answer(story: Story, tmp_path: Path) -> None:
    sources = [p for p in ("/var/log/journal", "/run/log/journal")
               if any(story.sandbox.path(p).glob("*/*.journal"))]
    assert sources, "the sandbox's journald wrote no journal files"
    copy = tmp_path / "web1"
    shutil.copytree(story.sandbox.path(sources[0]), copy)
    for args in ([], ["--json"], ["--at", story.at("heir", 1), "--json"], ["--at", story.at("forged", 1)]):
        inside = story.portwatch(*args)
        outside = run_cli("history", str(story.port), "--directory", str(copy), *args)
        assert (outside.returncode, outside.stdout, outside.stderr) == (
            inside.returncode, inside.stdout, inside.stderr.replace("the system journal", f"the journal in {copy}"))
    missing = run_cli("history", str(story.port), "--directory", str(tmp_path / "not-copied"))
    assert missing.returncode == 65 and missing.stdout == ""
    assert "not-copied: journalctl: Failed to open" in _one_line(missing)


@pytest.mark.systemd
@pytest.mark.root
def test_a_listener_there_before_portwatch_started(story: Story) -> None:
    """The first start's inventory: held at that time (already listening), not opened then."""
    port = story.early.port
    done = story.sandbox.run(f"{story.sandbox.venv}/bin/portwatch", "history", str(port), "--json", check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [e["event"] for e in got] == ["portwatch_started", "listener_opened", "portwatch_stopping"]
    assert (got[1]["pid"], got[1]["at_startup"], got[1]["realtime_usec"]) == (
        story.early.pid, True, story.usec["inventory"])
    shown = story.sandbox.run(f"{story.sandbox.venv}/bin/portwatch", "history", str(port), check=False).stdout
    (row,) = [line for line in shown.splitlines() if f"127.0.0.1:{port}" in line]
    assert " listening " in row and " opened " not in row and "already listening at start" in row
    held = story.sandbox.run(f"{story.sandbox.venv}/bin/portwatch", "history", str(port), "--at",
                             story.at("taken"), "--json", check=False)
    (listener,) = json.loads(held.stdout)["listeners"]
    assert (listener["pid"], listener["at_startup"], listener["since_usec"]) == (
        story.early.pid, True, story.usec["inventory"])
