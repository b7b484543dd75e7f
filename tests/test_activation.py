"""Socket activation, the pure parts: systemd's Listen entries, the unit cache, policy, diff, views.

What systemd itself answers, and the whole path under a real systemd, is in test_socket_units.py.
"""

from __future__ import annotations

import pytest

from portwatch.activation import (
    Activation,
    Endpoint,
    SocketUnit,
    Unavailable,
    UnitCache,
    match,
    parse_listen,
    service_of,
)
from portwatch.events import change_event, describe, violation_event
from portwatch.model import MANAGER_UNIT, Listener, Process, Proto, Snapshot, Socket
from portwatch.policy import Allow, PortRange, Rule, evaluate
from portwatch.render import ProcessPorts, listener_json, listener_rows, process_ports_json, process_rows
from portwatch.snapshot import ChangeKind, diff
from portwatch.state import _decode, _encode_listener

SYSTEMD = Process(1, "systemd", "/usr/lib/systemd/systemd", ("/sbin/init",), 0, "root", MANAGER_UNIT)
SSHD = Process(172, "sshd", "/usr/sbin/sshd", ("sshd: /usr/sbin/sshd -D",), 0, "root", "ssh.service")
SQUATTER = Process(666, "sshd", "/tmp/sshd", ("sshd",), 1000, "mallory", "session-3.scope")
SOCK = Socket(Proto.TCP, 6, "::", 22, 5001, 0)
SSH_UNIT = SocketUnit("ssh.socket", "ssh.service", (Endpoint(Proto.TCP, "::", 22),))


def held(*processes: Process, sock: Socket = SOCK, units: bool = True) -> Listener:
    listener = Listener(sock, processes)
    return listener._replace(socket_unit="ssh.socket", service_unit="ssh.service") if units else listener


# --- what systemd's Socket.Listen says ------------------------------------------------------


@pytest.mark.parametrize(("kind", "text", "expected"), [
    ("Stream", "127.0.0.1:2222", Endpoint(Proto.TCP, "127.0.0.1", 2222)),
    ("Stream", "[::]:22", Endpoint(Proto.TCP, "::", 22)),
    ("Stream", "0.0.0.0:80", Endpoint(Proto.TCP, "0.0.0.0", 80)),
    ("Datagram", "[::1]:53", Endpoint(Proto.UDP, "::1", 53)),
    ("Stream", "[fe80::1%2]:22", Endpoint(Proto.TCP, "fe80::1", 22)),
    ("Stream", "[0:0:0:0:0:0:0:1]:8080", Endpoint(Proto.TCP, "::1", 8080)),  # as the kernel prints it
    ("Stream", "[::ffff:127.0.0.1]:9", Endpoint(Proto.TCP, "::ffff:127.0.0.1", 9)),
    ("Stream", "/run/dbus/system_bus_socket", None),
    ("Stream", "@/org/freedesktop/hostname", None),
    ("Datagram", "/run/systemd/journal/socket", None),
    ("FIFO", "/run/initctl", None),
    ("Netlink", "kobject-uevent 1", None),
    ("SequentialPacket", "127.0.0.1:5", None),
    ("Stream", "vsock:2:1234", None),
    ("Stream", "127.0.0.1:", None),
])
def test_listen_entries(kind: str, text: str, expected: Endpoint | None) -> None:
    """IP listen addresses become endpoints printed as the kernel's tables print them; the rest none."""
    assert parse_listen(kind, text) == expected


def test_the_service_a_socket_starts() -> None:
    """Accept=no: what it triggers (Service= or the same name); Accept=yes: its template."""
    assert service_of("ssh.socket", False, ["ssh.service"]) == "ssh.service"
    assert service_of("web.socket", False, ["other.service"]) == "other.service"
    assert service_of("echo.socket", True, []) == "echo@.service"
    assert service_of("odd.socket", False, []) is None


def test_match_needs_protocol_address_and_port() -> None:
    units = [SocketUnit("dns.socket", "dns.service", (Endpoint(Proto.UDP, "::", 22),)), SSH_UNIT]
    assert match(SOCK, units) == Activation("ssh.socket", "ssh.service")
    assert match(SOCK._replace(port=23), units) is None
    assert match(SOCK._replace(address="::1"), units) is None


# --- the cache: ask only about sockets not seen before --------------------------------------


class Manager:
    """A lookup that counts its calls; `fail` makes it raise as an unreachable manager does."""

    def __init__(self, units: list[SocketUnit]) -> None:
        self.units = units
        self.calls = 0
        self.fail: str | None = None

    def __call__(self) -> list[SocketUnit]:
        self.calls += 1
        if self.fail:
            raise Unavailable(self.fail)
        return self.units


def snapshot(*listeners: Listener) -> Snapshot:
    return Snapshot({x.socket.inode: x for x in listeners})


def test_asks_once_per_new_socket_of_the_manager() -> None:
    manager = Manager([SSH_UNIT])
    cache = UnitCache(manager)
    other = Listener(Socket(Proto.TCP, 4, "127.0.0.1", 8080, 7000, 33), (SQUATTER,))
    first = cache.apply(snapshot(held(SYSTEMD, units=False), other))
    assert first.listeners[SOCK.inode].socket_unit == "ssh.socket"
    assert first.listeners[SOCK.inode].service_unit == "ssh.service"
    assert first.listeners[7000].socket_unit is None
    assert manager.calls == 1
    # The same sockets, sshd now holding too: answered from the cache.
    again = cache.apply(snapshot(held(SYSTEMD, SSHD, units=False), other))
    assert again.listeners[SOCK.inode].socket_unit == "ssh.socket"
    assert manager.calls == 1
    # A snapshot already attributed is handed back as it is (the daemon then diffs nothing).
    assert cache.apply(again) is again
    assert manager.calls == 1
    # No manager-held socket at all: never asked.
    idle = UnitCache(manager)
    assert idle.apply(snapshot(other)).listeners[7000] is other
    assert manager.calls == 1


def test_a_socket_that_reopens_is_asked_about_again() -> None:
    manager = Manager([SSH_UNIT])
    cache = UnitCache(manager)
    cache.apply(snapshot(held(SYSTEMD, units=False)))
    cache.apply(snapshot())  # the socket unit was stopped
    reopened = held(SYSTEMD, sock=SOCK._replace(inode=5002), units=False)
    assert cache.apply(snapshot(reopened)).listeners[5002].socket_unit == "ssh.socket"
    assert manager.calls == 2


def test_an_unreachable_manager_is_said_and_asked_again_at_the_next_new_socket() -> None:
    manager = Manager([SSH_UNIT])
    manager.fail = "cannot ask systemd over D-Bus: /run/dbus/system_bus_socket: No such file or directory"
    cache = UnitCache(manager)
    first = cache.apply(snapshot(held(SYSTEMD, units=False)))
    assert first.listeners[SOCK.inode].socket_unit is None
    assert cache.problem == manager.fail
    cache.apply(snapshot(held(SYSTEMD, units=False)))
    assert manager.calls == 1  # not asked again for the same socket
    manager.fail = None
    dns = held(SYSTEMD, sock=Socket(Proto.UDP, 4, "127.0.0.1", 53, 6000, 0), units=False)
    later = cache.apply(snapshot(held(SYSTEMD, units=False), dns))
    assert manager.calls == 2
    assert cache.problem is None
    assert later.listeners[SOCK.inode].socket_unit == "ssh.socket"  # the earlier one too
    assert later.listeners[6000].socket_unit is None  # the manager's, but no unit lists it


# --- policy ------------------------------------------------------------------------------------


SSH_RULE = Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="sshd"), Allow(unit="ssh.service")))


@pytest.mark.parametrize("holders", [(SYSTEMD,), (SYSTEMD, SSHD)])
def test_a_rule_naming_the_service_holds_before_and_after_the_first_connection(
    holders: tuple[Process, ...],
) -> None:
    assert evaluate(SSH_RULE, held(*holders)) is None


def test_the_manager_is_matched_on_units_only() -> None:
    """comm, exe and user say nothing about whose socket systemd holds: they never allow it."""
    for entry in (Allow(comm="systemd*"), Allow(user="root"), Allow(exe="/usr/lib/systemd/*"),
                  Allow(comm="sshd"), Allow(unit="other.service")):
        verdict = evaluate(Rule("ssh", (PortRange(22, 22),), allow=(entry,)), held(SYSTEMD))
        assert verdict is not None
        assert verdict.offenders == (SYSTEMD,)
    for entry in (Allow(unit="ssh.socket"), Allow(unit="ssh.service"), Allow(unit="ssh.*")):
        assert evaluate(Rule("ssh", (PortRange(22, 22),), allow=(entry,)), held(SYSTEMD)) is None


def test_unresolved_the_manager_is_still_not_allowed_by_its_name() -> None:
    """Without the socket unit (D-Bus down) only `unit: init.scope` would allow systemd: said, not hidden."""
    rule = Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="systemd"), Allow(unit="ssh.service")))
    verdict = evaluate(rule, held(SYSTEMD, units=False))
    assert verdict is not None
    assert verdict.offenders == (SYSTEMD,)


def test_a_user_manager_without_a_known_socket_unit_is_the_users_process() -> None:
    user_manager = Process(4000, "systemd", "/usr/lib/systemd/systemd", ("systemd", "--user"), 1000,
                           "alice", MANAGER_UNIT)
    rule = Rule("dev", (PortRange(22, 22),), allow=(Allow(user="alice"),))
    assert evaluate(rule, held(user_manager, units=False)) is None
    assert evaluate(rule, held(SYSTEMD, units=False)) is not None


def test_the_socket_unit_allows_every_holder_of_its_socket_and_nothing_else() -> None:
    rule = Rule("ssh", (PortRange(22, 22),), allow=(Allow(unit="ssh.socket"),))
    assert evaluate(rule, held(SYSTEMD, SSHD)) is None
    # A squatter on the port while ssh.socket is stopped: no socket unit, reported.
    verdict = evaluate(rule, Listener(SOCK._replace(inode=9), (SQUATTER,)))
    assert verdict is not None
    assert verdict.offenders == (SQUATTER,)
    # The other keys of an entry still apply to the service's processes.
    strict = Rule("ssh", (PortRange(22, 22),), allow=(Allow(unit="ssh.socket", comm="nginx"),))
    verdict = evaluate(strict, held(SYSTEMD, SSHD))
    assert verdict is not None
    assert verdict.offenders == (SSHD,)


# --- diff: the service behind its socket is not a new owner -------------------------------------


def test_the_service_starting_and_restarting_behind_its_socket_changes_no_owner() -> None:
    waiting, serving = snapshot(held(SYSTEMD)), snapshot(held(SYSTEMD, SSHD))
    restarted = snapshot(held(SYSTEMD, SSHD._replace(pid=180)))
    assert diff(waiting, serving) == []
    assert diff(serving, restarted) == []
    assert diff(restarted, waiting) == []


def test_a_foreign_holder_of_a_socket_units_socket_is_an_owner_change() -> None:
    before, after = snapshot(held(SYSTEMD, SSHD)), snapshot(held(SYSTEMD, SSHD, SQUATTER))
    (change,) = diff(before, after)
    assert change.kind is ChangeKind.OWNER_CHANGED


def test_accept_yes_instances_count_as_the_template() -> None:
    listener = Listener(SOCK, (SYSTEMD,), socket_unit="echo.socket", service_unit="echo@.service")
    instance = SSHD._replace(unit="echo@3-127.0.0.1:22-127.0.0.1:5000.service")
    assert listener.serves_socket_unit(instance)
    assert not listener.serves_socket_unit(SSHD._replace(unit="echoes.service"))
    assert diff(snapshot(listener), snapshot(listener._replace(processes=(SYSTEMD, instance)))) == []


# --- what the views, the events and the state file carry ---------------------------------------


def test_views_name_the_socket_unit_instead_of_init_scope() -> None:
    listener = held(SYSTEMD, SSHD)
    data = listener_json(listener)
    assert (data["socket_unit"], data["service_unit"]) == ("ssh.socket", "ssh.service")
    rows = listener_rows([listener], {})
    assert [row[5] for row in rows] == ["ssh.socket → ssh.service", "ssh.service"]
    assert listener_json(held(SSHD, units=False))["socket_unit"] is None
    entry = ProcessPorts(SYSTEMD)
    entry.sockets = [SOCK]
    entry.socket_units[SOCK.inode] = Activation("ssh.socket", "ssh.service")
    assert process_ports_json(entry)["ports"][0]["socket_unit"] == "ssh.socket"
    assert process_rows([entry])[0][3] == "tcp/[::]:22(ssh.socket)"


def test_events_carry_the_units_and_say_them() -> None:
    _, opened = change_event(diff(snapshot(), snapshot(held(SYSTEMD)))[0], "ssh")
    assert (opened["socket_unit"], opened["service_unit"]) == ("ssh.socket", "ssh.service")
    assert describe("listener_opened", opened).startswith("new listener tcp/[::]:22 (ssh.socket → ssh.service)")
    verdict = evaluate(Rule("ssh", (PortRange(22, 22),), allow=(Allow(comm="sshd"),)), held(SYSTEMD))
    assert verdict is not None
    _, fields = violation_event(verdict, at_startup=True)
    assert fields["socket_unit"] == "ssh.socket"


def test_the_state_file_keeps_the_units() -> None:
    """After a restart the saved listeners compare equal to the live ones: no owner_changed noise."""
    listener = held(SYSTEMD, SSHD)
    plain = held(SSHD, sock=SOCK._replace(inode=8), units=False)
    data = {"listeners": [_encode_listener(listener), _encode_listener(plain)]}
    restored = _decode(data).snapshot
    assert restored.listeners[SOCK.inode] == listener
    assert restored.listeners[8] == plain
    assert "socket_unit" not in _encode_listener(plain)
