"""The pure core: joining sockets with holders, diffing snapshots, events and rendering."""

from __future__ import annotations

import pytest

from portwatch.events import change_event, describe, status_line, violation_event
from portwatch.model import Listener, Process, Proto, Snapshot, Socket, Unresolved, endpoint
from portwatch.policy import Allow, PortRange, Rule, evaluate
from portwatch.render import listener_rows, table
from portwatch.snapshot import ChangeKind, build_snapshot, carry_forward, diff

SSH = Socket(Proto.TCP, 4, "0.0.0.0", 22, 100, 0)
WEB = Socket(Proto.TCP, 6, "::", 80, 200, 33)


def proc(pid: int, comm: str = "nginx", exe: str = "/usr/sbin/nginx") -> Process:
    return Process(pid, comm, exe, (exe, "-g", "daemon off;"), 0, "root", "nginx.service")


def snap(*listeners: Listener, complete: bool = True) -> Snapshot:
    return Snapshot({x.socket.inode: x for x in listeners}, complete=complete)


def test_build_keeps_every_holder_sorted() -> None:
    """A socket held by a master and its workers lists all of them, by pid."""
    s = build_snapshot([WEB], {200: [12, 10, 11]}, {p: proc(p) for p in (10, 11, 12)})
    assert s.listeners[200].pids == (10, 11, 12)
    assert s.listeners[200].unresolved is None


def test_build_says_why_an_owner_is_unknown() -> None:
    """No holder: permission_denied when some process was unreadable, no_process otherwise."""
    assert build_snapshot([SSH], {}, {}).listeners[100].unresolved is Unresolved.NO_PROCESS
    denied = build_snapshot([SSH], {}, {}, denied_pids=3)
    assert denied.listeners[100].unresolved is Unresolved.PERMISSION_DENIED
    # A holder that exited before its details were read is left out.
    assert build_snapshot([SSH], {100: [5]}, {}).listeners[100].processes == ()


def test_diff_opened_closed_owner_changed() -> None:
    """New inodes open, missing ones close, a changed holder set is owner_changed."""
    old = snap(Listener(SSH, (proc(1, "sshd"),)), Listener(WEB, (proc(10), proc(11))))
    new_web = Listener(WEB, (proc(10),))
    dns = Listener(Socket(Proto.UDP, 4, "127.0.0.1", 53, 300, 0), (proc(7, "unbound"),))
    changes = diff(old, snap(new_web, dns))
    kinds = {(c.kind, c.listener.socket.inode) for c in changes}
    assert kinds == {(ChangeKind.OWNER_CHANGED, 200), (ChangeKind.OPENED, 300), (ChangeKind.CLOSED, 100)}
    changed = next(c for c in changes if c.kind is ChangeKind.OWNER_CHANGED)
    assert changed.before is not None and changed.before.pids == (10, 11)


def test_a_restart_between_two_scans_closes_before_it_opens() -> None:
    """The old socket on an address and port closed before the new one was bound: so the diff
    says, whatever the order of the inodes."""
    for old_inode, new_inode in ((100, 900), (900, 100)):
        old = snap(Listener(SSH._replace(inode=old_inode), (proc(1, "sshd"),)))
        new = snap(Listener(SSH._replace(inode=new_inode), (proc(2, "sshd"),)))
        assert [(c.kind, c.listener.socket.inode) for c in diff(old, new)] == [
            (ChangeKind.CLOSED, old_inode), (ChangeKind.OPENED, new_inode)
        ]


def test_incomplete_scan_closes_nothing() -> None:
    """A scan that could not read a table never reports a close, and keeps what it missed."""
    old = snap(Listener(SSH, (proc(1, "sshd"),)), Listener(WEB, (proc(10),)))
    partial = snap(Listener(WEB, (proc(10),)), complete=False)
    assert diff(old, partial) == []
    kept = carry_forward(old, partial)
    assert set(kept.listeners) == {100, 200} and not kept.complete
    assert carry_forward(old, snap()).listeners == {}


def test_command_line_changes_are_not_owner_changes() -> None:
    """setproctitle rewrites command lines all the time; that is not a new owner."""
    a = Listener(WEB, (proc(10),))
    retitled = Process(10, "nginx", "/usr/sbin/nginx", ("nginx: worker process",), 0, "root", "nginx.service")
    assert diff(snap(a), snap(Listener(WEB, (retitled,)))) == []
    execd = Listener(WEB, (proc(10, comm="evil", exe="/tmp/evil"),))
    assert [c.kind for c in diff(snap(a), snap(execd))] == [ChangeKind.OWNER_CHANGED]


def test_violation_event_fields() -> None:
    """reserved_port_taken names the first disallowed holder, all pids, and whether it is verified."""
    rule = Rule("web", (PortRange(80, 80),), allow=(Allow(comm="nginx"),))
    listener = Listener(WEB, (proc(10), proc(11, "intruder", "/tmp/x")))
    violation = evaluate(rule, listener)
    assert violation is not None
    name, fields = violation_event(violation, at_startup=True)
    assert name == "reserved_port_taken"
    assert (fields["pid"], fields["comm"], fields["pids"], fields["offender_pids"]) == (11, "intruder", [10, 11], [11])
    assert fields["verified"] is True and fields["at_startup"] is True and fields["rule"] == "web"
    unknown = evaluate(rule, Listener(WEB, (), Unresolved.PERMISSION_DENIED))
    assert unknown is not None
    _, fields = violation_event(unknown, at_startup=False)
    assert fields["verified"] is False and fields["pid"] is None and fields["unresolved"] == "permission_denied"
    assert "cannot identify (permission_denied)" in describe("reserved_port_taken", fields)


def test_change_event_carries_previous_pids() -> None:
    """owner_changed says who held the socket before."""
    (change,) = diff(snap(Listener(WEB, (proc(10), proc(11)))), snap(Listener(WEB, (proc(10),))))
    name, fields = change_event(change, "web")
    assert (name, fields["pids"], fields["previous_pids"], fields["rule"]) == ("owner_changed", [10], [10, 11], "web")


def test_endpoint_text() -> None:
    """Wildcards print as ss prints them; IPv6 is bracketed."""
    assert endpoint(SSH.address, SSH.port) == "*:22"
    assert endpoint(WEB.address, WEB.port) == "[::]:80"
    assert endpoint("::ffff:127.0.0.1", 5432) == "[::ffff:127.0.0.1]:5432"
    assert endpoint("127.0.0.53", 53) == "127.0.0.53:53"


def test_table_escapes_and_aligns() -> None:
    """A hostile name is escaped inside its cell; every row stays one line."""
    hostile = Process(5, "a\nb\x1b[2J", "/x", ("run\tme", "\udcff"), 0, None, None)
    rows = listener_rows([Listener(SSH, (hostile,)), Listener(WEB, (), Unresolved.NO_PROCESS)], {33: "www-data"})
    text = table(["PROTO", "LOCAL", "USER", "PID", "COMM", "UNIT", "COMMAND"], rows)
    lines = text.splitlines()
    assert len(lines) == 3
    assert "a\\nb\\x1b[2J" in lines[1] and "run\\tme \\xff" in lines[1] and "\x1b" not in text
    assert "(no_process)" in lines[2] and "www-data" in lines[2]
    # Columns line up: the PID column starts at the same offset in the header and the row.
    assert lines[1][lines[0].index("PID"):].startswith("5 ")


def test_messages_name_the_offenders_not_the_first_holder() -> None:
    """A socket held by PID 1 (disallowed) and sshd (allowed): the message blames PID 1 alone and
    says the other holder is allowed; two offenders are both named; IPv6 is written [::1]:22."""
    systemd = Process(1, "systemd", "/usr/lib/systemd/systemd", (), 0, "root", "init.scope")
    sshd = Process(172, "sshd", "/usr/sbin/sshd", (), 0, "root", "ssh.service")
    ssh6 = Socket(Proto.TCP, 6, "::1", 22, 300, 0)
    rule = Rule("ssh", (PortRange(22, 22),), allow=(Allow(unit="ssh.service"),))
    violation = evaluate(rule, Listener(ssh6, (systemd, sshd)))
    assert violation is not None
    text = describe(*violation_event(violation, at_startup=False))
    assert text == ("reserved port tcp/[::1]:22 (rule ssh) taken by systemd[1] user root unit init.scope; "
                    "also held by allowed pids 172")
    two = evaluate(rule, Listener(SSH, (systemd, proc(9, "intruder"))))
    assert two is not None
    assert describe(*violation_event(two, at_startup=False)) == (
        "reserved port tcp/*:22 (rule ssh) taken by systemd[1] user root unit init.scope "
        "and 1 more it does not allow (pids 9)")


@pytest.mark.parametrize(
    ("event", "fields", "says"),
    [
        ("listener_opened", {"proto": "tcp", "address": "::1", "port": 8080, "pid": 5, "comm": "x",
                             "pids": [5, 6]}, "new listener tcp/[::1]:8080 held by x[5] and 1 more"),
        ("hook_suppressed", {"hook": "page", "rule": "ssh", "port": 22, "until": 41.5},
         "hook page for rule ssh port 22 not run again: cool-down, 41.5 s left"),
        ("hook_dropped", {"hook": "page", "rule": "ssh", "port": 22, "reason": "queue full"},
         "hook page for rule ssh port 22 dropped: queue full"),
        ("state_restored", {"path": "/var/lib/portwatch/state.json", "listeners": 12,
                            "saved_at": "2026-12-04T10:00:00+00:00"},
         "state restored from /var/lib/portwatch/state.json: 12 listeners as saved at 2026-12-04T10:00:00+00:00"),
        ("scan_failed", {"error": "/proc/self/net/tcp: Permission denied", "partial": True},
         "scan partly failed, nothing is reported closed until it succeeds: /proc/self/net/tcp: Permission denied"),
        ("scan_recovered", {"error": "x"}, "scans whole again (after: x)"),
    ],
)
def test_every_message_carries_its_details(event: str, fields: dict[str, object], says: str) -> None:
    assert describe(event, dict(fields)) == says


def test_status_line_counts_in_words() -> None:
    assert status_line(1, 1, "10:00:00 UTC") == "watching 1 listener, 1 reserved port taken, last scan 10:00:00 UTC"
    assert status_line(12, 0, "t") == "watching 12 listeners, 0 reserved ports taken, last scan t"
