"""The daemon in-process, with a fake clock and a fake scanner: what it reports, when it runs
hooks and saves its state, across reloads and restarts. Nothing sleeps, no /proc is read.

(tests/test_daemon.py runs `portwatch run` end to end against real processes.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from portwatch import ephemeral
from portwatch.config import load_config
from portwatch.daemon import Daemon
from portwatch.hooks import HookRunner
from portwatch.log import EventLog
from portwatch.model import Listener, Process, Proto, Snapshot, Socket, Unresolved
from portwatch.pace import EARLY_SCAN_PERIOD, STATE_SAVE_CHANGES_EVERY, STATE_SAVE_EVERY
from portwatch.procconn import ProcConnector
from portwatch.scan import ScanResult
from portwatch.state import StateStore

SSHD = Process(700, "sshd", "/usr/sbin/sshd", ("sshd",), 0, "root", "ssh.service")
SQUATTER = Process(900, "nc", "/usr/bin/nc", ("nc", "-l", "22"), 1000, "mallory", "session-3.scope")
WEB = Process(800, "nginx", "/usr/sbin/nginx", ("nginx",), 33, "www-data", "nginx.service")
CONFIG = """\
interval: 1
reserved:
  - name: ssh
    ports: [22]
    allow:
      - comm: sshd
    hooks: [page]
hooks:
  page:
    command: [/bin/true]
"""


def listener(inode: int, port: int, *holders: Process, address: str = "0.0.0.0") -> Listener:
    sock = Socket(Proto.TCP, 6 if ":" in address else 4, address, port, inode, 0)
    return Listener(sock, tuple(holders), None if holders else Unresolved.NO_PROCESS)


def snap(*listeners: Listener, complete: bool = True) -> Snapshot:
    return Snapshot({x.socket.inode: x for x in listeners}, complete=complete)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeScanner:
    """Hands out the scans a test queues; remembers what the daemon asked of it."""

    active_source = "netlink"
    fallback_reason: str | None = None
    netns_problem: str | None = None
    searched = False

    def __init__(self) -> None:
        self.queued: list[ScanResult] = []
        self.calls: list[tuple[str, set[int]]] = []
        self.forgotten: list[int] = []
        self.young_changed = True  # what peek() answers

    def then(self, *listeners: Listener, complete: bool = True, error: str | None = None) -> None:
        self.queued.append(ScanResult(snap(*listeners, complete=complete), error, partial=error is not None))

    def fail(self, error: str) -> None:
        self.queued.append(ScanResult(None, error))

    def scan(self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int] = (),
             on_progress: Callable[[], None] | None = None) -> ScanResult:
        self.calls.append(("regular", set(hints)))
        return self.queued.pop(0)

    def scan_early(self, previous: Snapshot | None, protocols: Iterable[Proto], *, hints: Iterable[int],
                   on_progress: Callable[[], None] | None = None) -> ScanResult:
        self.calls.append(("early", set(hints)))
        return self.queued.pop(0)

    def forget_processes(self, pids: Iterable[int]) -> None:
        self.forgotten += pids

    def peek(self, pids: Collection[int], *, fresh: Collection[int] = ()) -> bool:
        self.calls.append(("peek", set(pids)))
        return self.young_changed

    def capabilities(self) -> int | None:
        return None

    def watch_namespaces(self, wanted: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Events:
    """A real EventLog writing JSON lines to memory, read back as (event, fields)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.log = EventLog("json", stream=self.stream)
        self._taken = 0

    @property
    def all(self) -> list[tuple[str, dict[str, Any]]]:
        lines = self.stream.getvalue().splitlines()[self._taken:]
        return [(fields.pop("event"), fields) for fields in map(json.loads, lines)]

    def names(self) -> list[str]:
        return [name for name, _ in self.all]

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        taken = self.all
        self._taken += len(taken)
        return taken


class Hooks:
    """The HookRunner's place: what was submitted."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, dict[str, Any]]] = []

    def submit(self, name: str, command: Iterable[str], timeout: float, event: Mapping[str, Any],
               cooldown_key: object) -> bool:
        self.submitted.append((name, dict(event)))
        return True

    def configure(self, *, max_parallel: int, cooldown: float) -> None:
        pass

    def close(self, timeout: float = 1.0) -> None:
        pass


class World:
    """A daemon wired to fakes, with its config file and state directory under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.config_path = tmp_path / "portwatch.yaml"
        self.config_path.write_text(CONFIG)
        self.state = StateStore(str(tmp_path / "state"))
        self.clock = Clock()
        self.daemons: list[Daemon] = []

    def daemon(self) -> tuple[Daemon, FakeScanner, Events, Hooks]:
        scanner, events, hooks = FakeScanner(), Events(), Hooks()
        daemon = Daemon(load_config(str(self.config_path)), events.log, scanner=scanner,
                        hooks=_as(HookRunner, hooks), state=self.state, clock=self.clock)
        self.daemons.append(daemon)
        return daemon, scanner, events, hooks


def _as(kind: type[Any], fake: object) -> Any:
    return fake  # a fake in the place of `kind`: the daemon uses only what the fake has


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    for daemon in w.daemons:
        daemon.watcher.close()


def test_a_squatter_at_start_is_reported_once_after_started_and_its_hook_runs_once(world: World) -> None:
    daemon, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SSHD, SQUATTER))
    daemon.start()
    assert events.names() == ["portwatch_started", "listener_opened", "reserved_port_taken"]
    taken = events.all[2][1]
    assert (taken["pid"], taken["offender_pids"], taken["at_startup"]) == (900, [900], True)
    assert [name for name, _ in hooks.submitted] == ["page"]
    scanner.then(listener(1, 22, SSHD, SQUATTER))
    daemon.tick()
    assert events.names() == ["portwatch_started", "listener_opened", "reserved_port_taken"]  # nothing new
    assert len(hooks.submitted) == 1


def test_owner_changes_are_judged_again(world: World) -> None:
    daemon, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SSHD))
    daemon.start()
    events.take()
    scanner.then(listener(1, 22, SSHD, SQUATTER))  # a squatter joins the socket (SCM_RIGHTS)
    daemon.tick()
    assert [name for name, _ in events.take()] == ["owner_changed", "reserved_port_taken"]
    scanner.then(listener(1, 22, SSHD))  # it leaves
    daemon.tick()
    scanner.then(listener(1, 22, SSHD, SQUATTER))  # and comes back: reported again
    daemon.tick()
    assert [name for name, _ in events.take()] == ["owner_changed", "owner_changed", "reserved_port_taken"]
    assert len(hooks.submitted) == 2


def test_a_restart_between_scans_is_closed_then_opened_and_judged_anew(world: World) -> None:
    daemon, scanner, events, _ = world.daemon()
    scanner.then(listener(1, 22, SQUATTER))
    daemon.start()
    events.take()
    scanner.then(listener(2, 22, SQUATTER))  # the same program restarted: a new socket
    daemon.tick()
    assert [(name, fields["inode"]) for name, fields in events.take()] == [
        ("listener_closed", 1), ("listener_opened", 2), ("reserved_port_taken", 2)]


def test_reload_applies_new_rules_to_what_listens_and_refuses_a_bad_file(world: World) -> None:
    daemon, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SSHD), listener(2, 80, SQUATTER))
    daemon.start()
    events.take()
    world.config_path.write_text(CONFIG.replace("reserved:\n", "reserved:\n  - {name: web, ports: [80]}\n"))
    daemon.reload(signal_requested=True)
    assert [name for name, _ in events.all] == ["config_reloaded", "reserved_port_taken"]
    assert events.take()[1][1]["rule"] == "web"
    world.config_path.write_text("interval: 0\n")
    daemon.reload(signal_requested=True)
    ((name, fields),) = events.take()
    assert name == "config_rejected" and "interval" in fields["error"]
    assert daemon.config.rule_for(Proto.TCP, 80) is not None  # the old config stays
    assert len(hooks.submitted) == 0  # the web rule has no hook


def test_a_restart_reports_what_changed_while_down_and_does_not_run_hooks_twice(world: World) -> None:
    first, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SQUATTER), listener(3, 8080, WEB))
    first.start()
    assert len(hooks.submitted) == 1
    first.watcher.close()

    second, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SQUATTER), listener(4, 9090, WEB))  # 8080 closed, 9090 opened meanwhile
    second.start()
    assert events.names() == ["portwatch_started", "state_restored", "listener_closed", "listener_opened",
                              "reserved_port_taken"]
    closed, opened, taken = (fields for _, fields in events.all[2:])
    assert closed["port"] == 8080 and closed["while_down"] and opened["port"] == 9090 and opened["while_down"]
    assert taken["reported_before_restart"] is True and taken["pid"] == 900
    assert hooks.submitted == []


def test_after_a_restart_whose_first_scan_fails_the_first_scan_that_works_is_compared_with_the_state(
    world: World,
) -> None:
    first, scanner, events, hooks = world.daemon()
    scanner.then(listener(1, 22, SQUATTER), listener(3, 8080, WEB))
    first.start()
    first.watcher.close()

    second, scanner, events, hooks = world.daemon()
    scanner.fail("/proc/self/net/tcp: Permission denied")
    second.start()
    assert events.names() == ["portwatch_started", "state_restored", "scan_failed"]  # nothing closed
    scanner.then(listener(1, 22, SQUATTER), listener(3, 8080, WEB))
    second.tick()
    assert events.names()[3:] == ["scan_recovered", "reserved_port_taken"]
    assert events.all[4][1]["reported_before_restart"] is True
    assert hooks.submitted == []


def test_a_failed_or_partial_scan_is_said_once_and_closes_nothing(world: World) -> None:
    daemon, scanner, events, _ = world.daemon()
    scanner.then(listener(1, 22, SSHD), listener(2, 8080, WEB))
    daemon.start()
    events.take()
    scanner.fail("sock_diag tcp: refused")
    scanner.fail("sock_diag tcp: refused")
    scanner.then(listener(1, 22, SSHD), complete=False, error="/proc/self/net/tcp: Permission denied")
    scanner.then(listener(1, 22, SSHD), complete=False, error="/proc/self/net/tcp: Permission denied")
    for _ in range(4):
        daemon.tick()
    assert [(name, fields.get("partial")) for name, fields in events.take()] == [
        ("scan_failed", None), ("scan_failed", True)]  # once per failure, nothing closed
    scanner.then(listener(1, 22, SSHD))
    daemon.tick()
    assert [name for name, _ in events.take()] == ["scan_recovered", "listener_closed"]


def test_state_is_saved_at_start_soon_after_a_squatter_and_later_after_other_changes(world: World) -> None:
    daemon, scanner, _, _ = world.daemon()
    scanner.then()
    daemon.start()
    assert world.state.load() is not None  # the baseline
    scanner.then(listener(5, 8080, WEB))
    daemon.tick()
    world.clock.now += STATE_SAVE_EVERY
    daemon._save_state()
    saved = world.state.load()
    assert saved is not None and 5 not in saved.snapshot.listeners  # a listener opened: not urgent
    world.clock.now += STATE_SAVE_CHANGES_EVERY - STATE_SAVE_EVERY
    daemon._save_state()
    saved = world.state.load()
    assert saved is not None and 5 in saved.snapshot.listeners
    scanner.then(listener(5, 8080, WEB), listener(6, 22, SQUATTER))
    daemon.tick()
    daemon._save_state()
    saved = world.state.load()
    assert saved is not None and 6 not in saved.taken  # too soon after the last save
    world.clock.now += STATE_SAVE_EVERY
    daemon._save_state()  # the squatter's hooks ran: a restart must know it was said
    saved = world.state.load()
    assert saved is not None and saved.taken == {6: [900]}


def test_a_started_process_brings_early_scans_of_it_alone(world: World) -> None:
    daemon, scanner, _, _ = world.daemon()
    scanner.then()
    daemon.start()
    now = world.clock.now
    assert daemon.pace.next_scan(now) == now + 1.0  # the interval
    daemon.pace.saw([("fork", 41), ("exec", 42)], now)
    assert daemon.pace.next_scan(now) == now + EARLY_SCAN_PERIOD and daemon.pace.early(now)
    scanner.then(listener(6, 8080, WEB))
    daemon.tick(early=True)
    assert scanner.calls[-1] == ("early", {41, 42}) and scanner.forgotten == [42]
    world.clock.now = now + 1.0
    scanner.then(listener(6, 8080, WEB))
    daemon.tick()
    assert scanner.calls[-1] == ("regular", set())


def test_an_early_scan_happens_only_when_a_young_process_holds_a_new_socket(world: World) -> None:
    daemon, scanner, _, _ = world.daemon()
    scanner.then()
    daemon.start()
    now = world.clock.now
    daemon.pace.saw([("fork", 41)], now)
    world.clock.now = now + EARLY_SCAN_PERIOD
    scanner.young_changed = False
    daemon._scan_when_due()
    assert scanner.calls[-1] == ("peek", {41})  # looked at, not scanned: nothing new to find
    assert daemon.pace.next_scan(world.clock.now) == world.clock.now + EARLY_SCAN_PERIOD
    world.clock.now += EARLY_SCAN_PERIOD
    scanner.young_changed = True
    scanner.then(listener(6, 8080, WEB))
    daemon._scan_when_due()
    assert scanner.calls[-2:] == [("peek", {41}), ("early", {41})]
    world.clock.now = now + 1.0
    scanner.then(listener(6, 8080, WEB))
    daemon._scan_when_due()  # a regular scan needs no peek
    assert scanner.calls[-1] == ("regular", set())


class QueuedEvents:
    """Proc connector events queued on a real pipe: readable while some wait."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK)
        self.queued: list[tuple[str, int]] = []

    def push(self, *events: tuple[str, int]) -> None:
        self.queued += events
        os.write(self.wfd, b"x")

    def fileno(self) -> int:
        return self.rfd

    def read_events(self) -> list[tuple[str, int]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self.rfd, 4096)
        events, self.queued = self.queued, []
        return events

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def test_events_wait_for_a_coming_early_look_and_a_process_gone_by_then_costs_no_look(world: World) -> None:
    """A fork wakes the daemon; until the look it brings, events queue instead of waking it, and
    read all at once then, an exit among them leaves nothing to look at."""
    daemon, scanner, _, _ = world.daemon()
    events = QueuedEvents()
    daemon.proc_events = _as(ProcConnector, events)
    sel = selectors.DefaultSelector()
    try:
        scanner.then()
        daemon.start()
        now = world.clock.now
        daemon._follow_proc_events(sel, not daemon.pace.waiting(now))
        events.push(("fork", 41))
        assert [key.data for key, _ in sel.select(0)] == ["proc"]
        daemon._read_proc_events()
        daemon._follow_proc_events(sel, not daemon.pace.waiting(now))
        events.push(("exec", 41), ("exit", 41))
        assert sel.select(0) == []  # a look is coming: no wake-up per event
        world.clock.now = now + EARLY_SCAN_PERIOD
        daemon._read_proc_events()  # as the loop does when the look is due
        calls = len(scanner.calls)
        daemon._scan_when_due()
        assert len(scanner.calls) == calls  # gone: neither peeked at nor scanned
        daemon._follow_proc_events(sel, not daemon.pace.waiting(world.clock.now))
        events.push(("fork", 42))
        assert [key.data for key, _ in sel.select(0)] == ["proc"]
    finally:
        sel.close()
        events.close()


@pytest.mark.parametrize("setting", ["hide", "show"])
def test_clients_udp_sockets_are_said_only_when_shown_or_reserved(world: World, setting: str) -> None:
    """This machine's ephemeral range decides (probed, not assumed): a UDP socket on a client port
    is in no listener event unless udp_ephemeral: show, or a rule names the port; a server's is."""
    ports, problem = ephemeral.read()
    assert ports is not None, problem
    client_port, named_port = ports.first, ports.first + 1
    text = (CONFIG + f"udp_ephemeral: {setting}\n").replace("reserved:\n", f"""reserved:
  - name: mine
    proto: udp
    ports: [{named_port}]
    allow:
      - comm: sshd
""", 1)
    world.config_path.write_text(text)
    daemon, scanner, events, _ = world.daemon()

    def udp(inode: int, port: int) -> Listener:
        return Listener(Socket(Proto.UDP, 4, "0.0.0.0", port, inode, 0), (SSHD,))

    server = udp(3, 53) if 53 not in ports else udp(3, ports.last + 1)
    scanner.then(udp(1, client_port), udp(2, named_port), server)
    daemon.start()
    said = {f["port"]: f for name, f in events.all if name == "listener_opened"}
    assert said[named_port]["rule"] == "mine" and said[named_port]["ephemeral"] is True
    assert "ephemeral" not in said[server.socket.port]
    if setting == "hide":
        assert client_port not in said
    else:
        assert said[client_port]["ephemeral"] is True and said[client_port]["at_startup"] is True
    scanner.then(udp(2, named_port), server)  # the client's socket closes
    daemon.tick()
    closed = [f["port"] for name, f in events.all if name == "listener_closed"]
    assert closed == ([] if setting == "hide" else [client_port])
