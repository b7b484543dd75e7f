"""Faults around the daemon: hooks that misbehave, a config that becomes unreadable, journald
going away, netlink refused, the state file lost, torn or corrupt, and SIGKILL.

Each fault is real: real hook programs, a config path replaced by a directory or routed through
a file, a real journald killed, a seccomp filter that refuses AF_NETLINK the way systemd's
RestrictAddressFamilies= does, a real SIGKILL. Hook runner unit behaviour is in
tests/test_hooks.py; this file checks it through `portwatch run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    PROGRAMS,
    DaemonProcess,
    Holder,
    free_ports,
    hook_records,
    in_mount_namespace_of,
    masked_net_tables,
    no_netlink,
    read_pids,
    reserved_config,
    run_cli,
    run_python,
    wait_exited,
)
from tests.journald_fixture import start_journald, stop_journald

MISBEHAVE = PROGRAMS / "misbehave_hook.py"
RECORDER = PROGRAMS / "record_event.py"
TCP = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}



def proc_state(pid: int) -> str | None:
    """The state letter of `pid` (Z for a zombie), None once it is gone entirely."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `pid`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append((int(name), fields[0]))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- hooks that misbehave ----------------------------------------------------------------------


def test_every_hook_failure_is_reported_bounded_and_reaped(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """Missing executable, no execute permission, non-zero exit, 200 MB of output, a hang that
    ignores SIGTERM, a detached grandchild: each reported with its reason, output kept to 4 KiB,
    the hooks reaped, and the daemon's memory unaffected."""
    noexec = tmp_path / "noexec.sh"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    noexec.chmod(0o644)
    hang_pids, flood_pids, detach_pids = tmp_path / "hang.pids", tmp_path / "flood.pids", tmp_path / "detach.pids"
    hooks = {
        "missing": (["/nonexistent/portwatch-hook"], 5.0),
        "noexec": ([str(noexec)], 5.0),
        "exit3": (["/bin/sh", "-c", "echo oops; exit 3"], 5.0),
        "flood": ([sys.executable, str(MISBEHAVE), "flood", str(flood_pids), str(200 << 20)], 20.0),
        "hang": ([sys.executable, str(MISBEHAVE), "hang", str(hang_pids)], 1.0),
        "detach": ([sys.executable, str(MISBEHAVE), "detach", str(detach_pids), "30"], 5.0),
    }
    ports = dict(zip(hooks, free_ports(len(hooks)), strict=True))
    cfg = reserved_config(tmp_path / "pw.yaml", [(name, [ports[name]], [name]) for name in hooks], hooks,
                          extra="max_parallel_hooks: 6\n")
    d = daemons(cfg)
    d.wait_event("portwatch_started", timeout=10)
    rss_before = rss_kib(d.pid)
    holders([{**TCP, "port": port} for port in ports.values()], name=b"squatter")
    for name in hooks:
        d.wait_event("reserved_port_taken", port=ports[name])

    def failed(name: str, timeout: float = 10.0) -> dict[str, Any]:
        event = d.wait_event("hook_failed", timeout=timeout, hook=name)
        assert event["level"] == "error" and event["port"] == ports[name] and event["rule"] == name
        return event

    assert failed("missing")["reason"] == "not found"
    assert failed("noexec")["reason"] == "permission denied"
    exit3 = failed("exit3")
    assert (exit3["reason"], exit3["exit_code"], exit3["output"]) == ("exit status 3", 3, "oops\n")
    flood = failed("flood", timeout=20)
    assert flood["reason"] == "exit status 1"
    assert len(flood["output"].encode()) <= 4096 and flood["output"].endswith("END-OF-FLOOD\n")
    hang = failed("hang")
    assert hang["reason"] == "timeout" and hang["signal"] == signal.SIGKILL
    assert hang["duration"] >= 1.0  # its timeout; then TERM, and KILL after the grace
    d.wait_event("hook_finished", hook="detach")
    (grandchild,) = read_pids(detach_pids)
    try:
        # Reported while the grandchild that keeps its output open still runs (it escaped its
        # group, as documented): it did not hold the report up.
        assert proc_state(grandchild) not in (None, "Z")
    finally:
        os.kill(grandchild, signal.SIGKILL)
    hook_pid, hang_child = read_pids(hang_pids)
    assert wait_exited(hook_pid) and proc_state(hook_pid) is None  # killed and reaped, not a zombie
    assert wait_exited(hang_child)  # killed with its group (reaped by its own parent)
    (flood_pid,) = read_pids(flood_pids)
    assert wait_exited(flood_pid) and proc_state(flood_pid) is None
    assert not [c for c in children_of(d.pid) if c[1] == "Z"], children_of(d.pid)
    # 200 MB of output went to a file trimmed as it grew, never into the daemon's memory.
    assert rss_kib(d.pid) - rss_before < 20_000
    failures = [(e["hook"], e["reason"]) for e in d.events if e["event"] == "hook_failed"]
    taken = [(e["rule"], e["pid"], e["comm"]) for e in d.events if e["event"] == "reserved_port_taken"]
    assert len(failures) == 5 and len(taken) == len(hooks), (failures, taken)  # one report, one run each
    assert d.proc.poll() is None


class ChildSampler:
    """Samples the daemon's direct children (running hooks) every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            live = [c for c, state in children_of(self.pid) if state != "Z"]
            self.most = max(self.most, len(live))
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def test_hook_burst_is_bounded_and_detection_never_stalls(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """80 reserved ports taken at once, each with a hook that hangs: 2 hooks run at a time
    (max_parallel_hooks), 64 wait, the other 14 are reported dropped; every violation is
    reported. While the hooks hang, a new squatter and a new listener are reported; SIGTERM
    stops the daemon and kills the hanging hooks."""
    pids = tmp_path / "hook.pids"
    hang = ["/bin/sh", "-c", f"echo $$ >> {pids}; exec sleep 30"]
    burst, (late,) = free_ports(80), free_ports(1)
    cfg = reserved_config(tmp_path / "pw.yaml", [("burst", burst, ["hang"]), ("late", [late], [])],
                          {"hang": (hang, 5.0)}, extra="max_parallel_hooks: 2\n")
    d = daemons(cfg)
    d.wait_event("portwatch_started", timeout=10)
    sampler = ChildSampler(d.pid)
    holders([{**TCP, "port": port} for port in burst], name=b"burst")
    for port in burst:
        d.wait_event("reserved_port_taken", port=port)
    d.wait_event("hook_dropped")
    dropped = -1
    while dropped != d.count("hook_dropped"):  # until the burst is over
        dropped = d.count("hook_dropped")
        time.sleep(0.3)
    # 64 wait in the queue; 2 more if the workers took theirs before it filled.
    assert 14 <= dropped <= 16, dropped
    assert {e["reason"] for e in d.events if e["event"] == "hook_dropped"} == {"queue full"}
    read_pids(pids)
    # Both workers are stuck in hooks now (for their 5 s timeout); detection goes on meanwhile.
    running = [int(p) for p in pids.read_text().split()]
    assert len(running) == 2
    squatter = holders([{**TCP, "port": late}], name=b"late")
    d.wait_event("reserved_port_taken", port=late, pid=squatter.pid)
    other = holders([TCP])
    d.wait_event("listener_opened", port=other.port)
    assert all(proc_state(pid) not in (None, "Z") for pid in running)  # seen while they hang
    assert sampler.stop() == 2
    assert d.stop() == 0
    for pid in running:
        assert wait_exited(pid) and proc_state(pid) is None
    assert len(pids.read_text().split()) == 2  # nothing queued was started at shutdown


# --- the config file made unreadable ---------------------------------------------------------------


def test_config_replaced_by_a_directory_keeps_the_last_good_one(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """The config path becomes a directory (EISDIR), then a path through a regular file (ENOTDIR):
    each is reported once as config_rejected with the reason, the last good rules keep being
    enforced, and a good file put back is loaded."""
    etc = tmp_path / "etc"
    etc.mkdir()
    first, second = free_ports(2)
    cfg = reserved_config(etc / "pw.yaml", [("guarded", [first, second], [])], {})
    good = cfg.read_text()
    d = daemons(cfg)
    d.wait_event("portwatch_started", timeout=10)

    mark = d.mark()
    cfg.unlink()
    cfg.mkdir()
    # Between the unlink and the mkdir the path did not exist: that may be rejected first.
    rejected = d.wait_for(lambda e: e.get("event") == "config_rejected" and "Is a directory" in e["error"],
                          5.0, mark)
    assert rejected["path"] == str(cfg)
    h = holders([{**TCP, "port": first}], name=b"first")
    d.wait_event("reserved_port_taken", since=mark, port=first, pid=h.pid)
    again = d.mark()
    d.proc.send_signal(signal.SIGHUP)  # asking again changes nothing
    d.wait_event("config_rejected", since=again)

    mark = d.mark()
    cfg.rmdir()
    cfg.write_text(good)
    d.proc.send_signal(signal.SIGHUP)  # the same rules as in force: only a HUP says it is good
    d.wait_event("config_reloaded", since=mark, reserved_rules=1)
    # Never the empty file the write began with (a valid config without rules).
    assert [e for e in d.events[mark:] if e["event"] == "config_reloaded" and e["reserved_rules"] != 1] == []
    mark = d.mark()
    moved = tmp_path / "etc.moved"
    etc.rename(moved)
    etc.write_text("not a directory\n")
    d.proc.send_signal(signal.SIGHUP)
    # Between the rename and the write the path did not exist: that may be rejected first.
    rejected = d.wait_for(lambda e: e.get("event") == "config_rejected" and "Not a directory" in e["error"],
                          5.0, mark)
    assert rejected["path"] == str(cfg)
    h2 = holders([{**TCP, "port": second}], name=b"second")
    d.wait_event("reserved_port_taken", since=mark, port=second, pid=h2.pid)
    quiet = d.count("config_rejected")
    time.sleep(1.0)  # five intervals: said once per change or HUP, never once per scan
    assert d.count("config_rejected") == quiet

    mark = d.mark()
    etc.unlink()
    moved.rename(etc)
    third = free_ports(1)
    reserved_config(cfg, [("guarded", [first, second, *third], [])], {})  # and an edit
    reloaded = d.wait_event("config_reloaded", since=mark)
    assert reloaded["reserved_rules"] == 1
    assert d.proc.poll() is None and b"Traceback" not in d.stderr


# --- journald going away ---------------------------------------------------------------------------


@pytest.mark.root
def test_journald_killed_mid_run_events_continue_on_stdout(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """--log-format journal, then journald is SIGKILLed: every later event is a JSON line on stdout,
    none is lost, none is written twice, and detection and hooks go on."""
    journal, jproc = start_journald(tmp_path)
    try:
        before, after = free_ports(2)
        out = tmp_path / "hook.jsonl"
        hook = [sys.executable, str(RECORDER), str(out)]
        cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [before, after], ["record"])],
                              {"record": (hook, 5.0)})
        d = daemons(cfg, fmt="journal", prefix=in_mount_namespace_of(journal.pid))
        assert journal.query(f"_PID={d.pid}", "PORTWATCH_EVENT=portwatch_started")
        a = holders([{**TCP, "port": before}], name=b"before")
        assert journal.query(f"_PID={d.pid}", "PORTWATCH_EVENT=hook_finished", f"PORTWATCH_PORT={before}")
        in_journal = journal.query(f"_PID={d.pid}", count=4)
        assert d.lines == []
    finally:
        jproc.kill()
        jproc.wait()
    b = holders([{**TCP, "port": after}], name=b"after")
    d.wait_event("reserved_port_taken", port=after, pid=b.pid)
    d.wait_event("listener_opened", port=after)
    d.wait_event("hook_finished", port=after)
    a.stop()
    d.wait_event("listener_closed", port=before)
    assert d.stop() == 0
    d.wait_event("portwatch_stopping")
    assert len(hook_records(out, count=2)) == 2
    assert all(json.loads(line)["event"] for line in d.lines)  # every line is one JSON event
    journal_events = [(e["PORTWATCH_EVENT"], e.get("PORTWATCH_PORT")) for e in in_journal]
    stdout_events = [(e["event"], str(e.get("port")) if "port" in e else None) for e in d.events]
    for event in ("portwatch_started", "reserved_port_taken", "listener_opened", "hook_finished"):
        assert (event, None if event == "portwatch_started" else str(before)) in journal_events
    assert not set(journal_events) & set(stdout_events)  # written once, in one place
    assert d.events[0]["event"] != "portwatch_started"
    assert b"Traceback" not in d.stderr
    stop_journald(jproc)


def fill_datagram_queue(path: str) -> list[socket.socket]:
    """Queue datagrams on a socket nobody reads until the kernel takes no more (max_dgram_qlen)."""
    senders: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        senders.append(s)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                s.sendto(b"MESSAGE=filler\n", path)
                sent += 1
        if sent == 0:
            return senders
        assert len(senders) < 64, "the journal socket never filled up"


@pytest.mark.root
def test_journald_hung_does_not_stall_detection(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """journald stops reading (SIGSTOP; its queue full): events must still come out, on stdout,
    without holding up detection: three new listeners are all reported within 3.5 seconds.

    The sender waits SEND_TIMEOUT (2 s) for each event before falling back, so a stuck journald
    makes every event cost 2 s and a burst of them stalls the scan loop for minutes."""
    journal, jproc = start_journald(tmp_path)
    senders: list[socket.socket] = []
    try:
        cfg = reserved_config(tmp_path / "pw.yaml", [], {})
        d = daemons(cfg, fmt="journal", prefix=in_mount_namespace_of(journal.pid))
        assert journal.query(f"_PID={d.pid}", "PORTWATCH_EVENT=portwatch_started")
        os.kill(jproc.pid, signal.SIGSTOP)
        senders = fill_datagram_queue(journal.socket)
        t0 = time.monotonic()
        h = holders([TCP, TCP, TCP])
        for sock in h.sockets:
            d.wait_event("listener_opened", timeout=max(0.0, t0 + 3.5 - time.monotonic()), port=sock["port"])
        assert d.proc.poll() is None
    finally:
        for s in senders:
            s.close()
        os.kill(jproc.pid, signal.SIGCONT)
        stop_journald(jproc)


def test_broken_stdout_does_not_stop_the_watch(
    tmp_path: Path, holders: Callable[..., Holder],
) -> None:
    """The reader of stdout goes away (under systemd: the journal stream, when journald restarts;
    also where journal events fall back to). Writing an event then fails with EPIPE; the watch
    must go on: a squatter that comes later still gets its hook run. (Exiting 0 instead means
    systemd's Restart=on-failure never starts it again.)"""
    (port,) = free_ports(1)
    out = tmp_path / "hook.jsonl"
    cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [port], ["record"])],
                          {"record": ([sys.executable, str(RECORDER), str(out)], 5.0)})
    rfd, wfd = os.pipe()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "portwatch", "run", "--config", str(cfg), "--log-format", "json",
         "--state-dir", str(tmp_path / "state")],
        stdout=wfd, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as reader:
            assert b"portwatch_started" in reader.readline() + reader.readline()
        first = holders([TCP])  # an event to write into the broken pipe
        assert daemon.stderr is not None
        assert select.select([daemon.stderr], [], [], 10)[0], "nothing said of the broken stdout"
        said = daemon.stderr.readline()  # it says so once, and goes on watching
        assert b"cannot write events" in said, said
        squatter = holders([{**TCP, "port": port}], name=b"later")
        records = hook_records(out, timeout=5.0) if daemon.poll() is None else []
        assert daemon.poll() is None, (
            f"portwatch stopped watching (exit status {daemon.returncode}) when stdout broke; "
            f"stderr: {daemon.stderr.read()[-500:] if daemon.stderr else b''!r}")
        assert json.loads(bytes.fromhex(records[0]["stdin"]))["pid"] == squatter.pid
        assert first.proc.poll() is None
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(5)
        if daemon.stderr is not None:
            daemon.stderr.close()


# --- netlink refused -------------------------------------------------------------------------------

def test_netlink_refused_falls_back_to_proc(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """With AF_NETLINK refused by a seccomp filter, the daemon says so at start (socket_source proc,
    the reason, no proc connector) and still reports listeners and squatters from /proc/net."""
    probe = run_python("import socket\ntry:\n socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)\n"
                       "except OSError as e:\n print(e.errno)\nsocket.socket().close()", prefix=no_netlink())
    assert probe.stdout.strip() == "97", probe  # the filter works, and only on AF_NETLINK
    (port,) = free_ports(1)
    cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [port], [])], {}, extra="udp_ephemeral: show\n")
    d = daemons(cfg, prefix=no_netlink())
    started = d.wait_event("portwatch_started", timeout=10)
    assert started["socket_source"] == "proc"
    assert "Address family not supported" in started["netlink_unavailable"]
    assert started["proc_events"] is False and started["proc_events_unavailable"]
    h = holders([{**TCP, "port": port}], name=b"squatter")
    d.wait_event("reserved_port_taken", port=port, pid=h.pid)
    other = holders([{"proto": "udp", "family": 6, "address": "::1"}])
    d.wait_event("listener_opened", port=other.port, pid=other.pid)
    other.stop()
    d.wait_event("listener_closed", port=other.port)
    assert d.count("scan_failed") == 0 and d.proc.poll() is None


def test_forced_netlink_that_is_refused_fails_at_start(tmp_path: Path) -> None:
    """--source netlink where netlink is refused: one line and exit 69 at start, not an error per scan."""
    cfg = reserved_config(tmp_path / "pw.yaml", [], {})
    result = run_cli("run", "--config", str(cfg), "--source", "netlink", "--log-format", "json",
                     "--state-dir", str(tmp_path / "state"), prefix=no_netlink())
    assert result.returncode == 69, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--source netlink" in lines[0] and "Traceback" not in result.stderr


# --- a socket table that cannot be read ---------------------------------------------------------


@pytest.mark.root
def test_an_unreadable_table_closes_nothing_until_it_is_read_again(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """/proc/net/tcp made unreadable under a running daemon (--source proc): scan_failed once,
    naming it; a listener that closes meanwhile is not reported closed while the other tables
    are still watched; once the table is back, scan_recovered, then the closing."""
    saved = tmp_path / "net"
    cfg = reserved_config(tmp_path / "pw.yaml", [], {}, extra="udp_ephemeral: show\n")
    d = daemons(cfg, "--source", "proc", prefix=masked_net_tables(saved))
    d.wait_event("portwatch_started", timeout=10)
    goes = holders([TCP])
    d.wait_event("listener_opened", port=goes.port)

    table = f"/proc/{d.pid}/net/tcp"
    in_its_namespace = ["nsenter", f"--target={d.pid}", "--mount", "--", "sh", "-c"]
    subprocess.run([*in_its_namespace, f"umount {table} && chmod 000 {table}"], check=True)
    failed = d.wait_event("scan_failed")
    assert failed["partial"] is True and "/proc/self/net/tcp:" in failed["error"]
    goes.stop()
    later = holders([{**TCP, "proto": "udp"}])
    d.wait_event("listener_opened", port=later.port)  # scans went on after the closing ...
    assert d.count("listener_closed", port=goes.port) == 0  # ... and did not report it

    subprocess.run([*in_its_namespace, f"mount --bind {saved}/tcp {table}"], check=True)
    closed = d.wait_event("listener_closed", port=goes.port)
    assert d.events.index(d.wait_event("scan_recovered")) < d.events.index(closed)
    assert d.count("scan_failed") == 1  # not once per scan
    assert d.proc.poll() is None


# --- restarts --------------------------------------------------------------------------------------


def state_file(directory: Path) -> Path:
    return directory / "state.json"


def wait_saved(path: Path, inode: int, present: bool = True, timeout: float = 8.0) -> None:
    """Until the state file does (or does not) record `inode`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            inodes = {x["inode"] for x in json.loads(path.read_text())["listeners"]}
            if (inode in inodes) == present:
                return
        time.sleep(0.05)
    raise AssertionError(f"{path} never {'recorded' if present else 'dropped'} inode {inode}")


def test_restart_reports_what_changed_while_down(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """SIGTERM, changes, start again: listeners opened and closed meanwhile are reported with
    while_down; a squatter reported before is reported again with reported_before_restart true and
    its hook is not run twice; a new squatter gets reported_before_restart false and its hook."""
    state = tmp_path / "state"
    out = tmp_path / "hook.jsonl"
    old_port, new_port = free_ports(2)
    hook = [sys.executable, str(RECORDER), str(out)]
    cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [old_port, new_port], ["record"])],
                          {"record": (hook, 5.0)})
    stays, closes = holders([TCP]), holders([TCP])
    old_squatter = holders([{**TCP, "port": old_port}], name=b"old")
    d1 = daemons(cfg, state_dir=state)
    d1.wait_event("reserved_port_taken", timeout=10, port=old_port)
    hook_records(out, count=1)
    assert d1.stop() == 0
    assert oct(state_file(state).stat().st_mode & 0o777) == "0o600"  # argv may be secret
    assert [p.name for p in state.iterdir()] == ["state.json"]  # no temporary file left

    closes.stop()
    opened = holders([TCP], name=b"meanwhile")
    new_squatter = holders([{**TCP, "port": new_port}], name=b"new")
    d2 = daemons(cfg, state_dir=state)
    restored = d2.wait_event("state_restored", timeout=10)
    assert restored["path"] == str(state_file(state)) and restored["listeners"] >= 3
    closed = d2.wait_event("listener_closed", port=closes.port)
    assert closed["while_down"] is True and closed["pid"] == closes.pid
    new = d2.wait_event("listener_opened", port=opened.port)
    assert new["while_down"] is True and new["pid"] == opened.pid
    again = d2.wait_event("reserved_port_taken", port=old_port)
    assert again["reported_before_restart"] is True and again["pid"] == old_squatter.pid
    fresh = d2.wait_event("reserved_port_taken", port=new_port)
    assert fresh["reported_before_restart"] is False and fresh["pid"] == new_squatter.pid
    d2.wait_event("portwatch_started")
    records = hook_records(out, count=2)
    time.sleep(0.5)
    assert len(out.read_text().splitlines()) == 2  # the old squatter's hook did not run again
    assert json.loads(bytes.fromhex(records[1]["stdin"]))["port"] == new_port
    assert d2.count("listener_opened", port=stays.port) == 0
    assert d2.count("listener_closed", port=stays.port) == 0
    assert d2.count("state_reset") == 0


def test_sigkill_then_restart_reports_changes_since_the_last_save(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """No clean shutdown: after SIGKILL a restart still reports what changed since the last save.
    A squatter reported (its hooks may have run) is saved within seconds, with the listeners
    as they were then; a listener that only opened is saved later (within a minute), and after
    a SIGKILL before that the restart reports it again, as opened while down."""
    state = tmp_path / "state"
    port = free_ports(1)[0]
    cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [port], [])], {})
    d1 = daemons(cfg, state_dir=state)
    d1.wait_event("portwatch_started", timeout=10)
    goes = holders([{**TCP, "port": port}], name=b"goes")
    d1.wait_event("reserved_port_taken", port=port)
    wait_saved(state_file(state), goes.inode)
    unsaved = holders([TCP], name=b"unsaved")
    d1.wait_event("listener_opened", port=unsaved.port)
    d1.proc.kill()
    d1.proc.wait()
    assert unsaved.inode not in {x["inode"] for x in json.loads(state_file(state).read_text())["listeners"]}
    goes.stop()
    comes = holders([TCP], name=b"comes")
    d2 = daemons(cfg, state_dir=state)
    assert d2.wait_event("listener_closed", timeout=10, port=goes.port)["while_down"] is True
    assert d2.wait_event("listener_opened", port=comes.port)["while_down"] is True
    assert d2.wait_event("listener_opened", port=unsaved.port)["while_down"] is True
    assert d2.count("state_reset") == 0


def test_sigkill_right_after_start_keeps_the_baseline(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """A first start, then SIGKILL before any later scan (a long interval, no proc connector, so
    nothing on the host can trigger one): the baseline was saved at start, so a listener that
    closed while portwatch was down is still reported after the restart."""
    state = tmp_path / "state"
    slow = reserved_config(tmp_path / "slow.yaml", [], {}, interval=30)
    goes = holders([TCP], name=b"goes")
    d1 = daemons(slow, "--no-proc-events", state_dir=state)
    d1.wait_event("portwatch_started", timeout=10)
    wait_saved(state_file(state), goes.inode)  # written at start: no later scan comes within 30 s
    d1.proc.kill()
    d1.proc.wait()
    goes.stop()
    d2 = daemons(reserved_config(tmp_path / "pw.yaml", [], {}), state_dir=state)
    d2.wait_event("state_restored", timeout=10)
    assert d2.wait_event("listener_closed", port=goes.port)["while_down"] is True


def _valid_state(tmp_path: Path, holders: Callable[..., Holder]) -> bytes:
    """The bytes of a real state file, made by a real run."""
    state = tmp_path / "model-state"
    cfg = reserved_config(tmp_path / "model.yaml", [], {})
    w = DaemonProcess(cfg, state_dir=state)
    try:
        w.wait_event("portwatch_started", timeout=10)
    finally:
        assert w.stop() == 0
    return state_file(state).read_bytes()


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "garbage": lambda good: b"\x00\xff\x1b[2J" * 100,
    "other version": lambda good: good.replace(b'"version": 1', b'"version": 99'),
    "number out of range": lambda good: good.replace(b'"port": ', b'"port": 1e999, "x": ', 1),
    "nested too deep": lambda good: good.replace(b'"listeners": [', b'"listeners": [' + b"[" * 100_000
                                                 + b"]" * 100_000 + b",", 1),
}


def test_corrupt_state_file_is_reported_and_replaced(
    tmp_path: Path, holders: Callable[..., Holder],
) -> None:
    """Each kind of corrupt or torn state file: state_reset naming the file and the fault, the
    daemon watches on (a squatter is reported), and a good file replaces the bad one."""
    holders([TCP])  # so that the model file has a listener to truncate in the middle of
    good = _valid_state(tmp_path, holders)
    assert json.loads(good)["listeners"]
    (port,) = free_ports(1)
    cfg = reserved_config(tmp_path / "pw.yaml", [("guarded", [port], [])], {})
    failures = []
    for name, corrupt in CORRUPTIONS.items():
        state = tmp_path / f"state-{name.replace(' ', '-')}"
        state.mkdir()
        state_file(state).write_bytes(corrupt(good))
        w = DaemonProcess(cfg, state_dir=state)
        squatter = None
        try:
            reset = w.wait_event("state_reset", timeout=10)
            assert reset["path"] == str(state_file(state)) and reset["level"] == "error"
            assert str(state_file(state)) in reset["error"]
            w.wait_event("portwatch_started")
            squatter = holders([{**TCP, "port": port}])
            w.wait_event("reserved_port_taken", port=port, pid=squatter.pid)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}; stderr: {w.stderr.decode(errors='replace')[-300:]}")
            continue
        finally:
            w.stop()
            if squatter is not None:
                squatter.stop()
        saved = json.loads(state_file(state).read_bytes())
        if saved["version"] != 1 or not saved["listeners"]:
            failures.append(f"{name}: the bad file was not replaced by a good one")
    assert not failures, "\n".join(failures)


def test_unwritable_state_dir_is_said_once(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """A state directory that cannot be created (its parent is a file): one degraded event with the
    reason; watching goes on."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = reserved_config(tmp_path / "pw.yaml", [], {})
    d = daemons(cfg, state_dir=blocker / "state")
    d.wait_event("portwatch_started", timeout=10)
    first = holders([TCP])
    degraded = d.wait_for(lambda e: e["event"] == "degraded" and "state" in e["missing"])
    assert "Not a directory" in degraded["reason"]
    second = holders([TCP])
    d.wait_event("listener_opened", port=first.port)
    d.wait_event("listener_opened", port=second.port)
    time.sleep(0.3)
    assert sum(1 for e in d.events if e["event"] == "degraded" and "state" in e["missing"]) == 1
