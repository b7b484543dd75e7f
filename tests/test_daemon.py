"""`portwatch run` end to end: real processes grab real ports, real hooks run, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portwatch.events import describe
from tests.conftest import (
    PROGRAMS,
    ROOT,
    DaemonProcess,
    Holder,
    clean_env,
    free_port,
    hook_records,
    run_cli,
    wait_exited,
)
from tests.systemd_sandbox import make_cgroups, remove_cgroups

RECORDER = PROGRAMS / "record_event.py"
HOSTILE = b'x\n{"event":1}\x1b'  # 15 bytes: a newline, a fake JSON event, an escape


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_text(
    port: int,
    hook_out: Path,
    *,
    allow: str = "",
    interval: float = 0.2,
    extra_rules: str = "",
    proto: str = "tcp",
    hook_timeout: float = 5,
    hook_cmd: list[str] | None = None,
) -> str:
    command = hook_cmd or [sys.executable, str(RECORDER), str(hook_out)]
    allow_block = f"    allow:\n{allow}" if allow else ""
    return (
        f"interval: {interval}\n"
        "hook_cooldown: 0.5\n"
        "reserved:\n"
        "  - name: guarded\n"
        f"    ports: [{port}]\n"
        f"    proto: {proto}\n"
        f"{allow_block}"
        "    hooks: [record]\n"
        f"{extra_rules}"
        "hooks:\n"
        "  record:\n"
        f"    command: {json.dumps(command)}\n"
        f"    timeout: {hook_timeout}\n"
    )


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)


@pytest.fixture
def tcp4() -> list[dict[str, Any]]:
    return [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": free_port()}]


def test_reserved_port_taken_runs_hook(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """A disallowed process on a reserved port: one warning with its pid and comm, and the hook gets the event."""
    port = tcp4[0]["port"]
    out = tmp_path / "hook.jsonl"
    cfg = write_config(tmp_path / "pw.yaml", config_text(port, out, allow="      - comm: nginx\n"))
    d = daemons(cfg, env=clean_env(NOTIFY_SOCKET="@portwatch-test-unused", WATCHDOG_USEC="999999999"))
    d.started()
    h = holders(tcp4, name=b"squatter")
    taken = d.wait_event("reserved_port_taken", port=port)
    assert (taken["pid"], taken["comm"], taken["rule"], taken["level"]) == (
        h.pid,
        "squatter",
        "guarded",
        "warning",
    )
    assert taken["verified"] is True and taken["at_startup"] is False
    assert taken["pids"] == [h.pid] and taken["proto"] == "tcp" and taken["address"] == "127.0.0.1"
    assert taken["timestamp"].endswith("Z")
    opened = d.wait_event("listener_opened", port=port)
    assert opened["rule"] == "guarded" and opened["inode"] == h.inode
    (record,) = hook_records(out)
    env = {k: unhex(v).decode() for k, v in record["env"].items()}
    assert env["PORTWATCH_EVENT"] == "reserved_port_taken"
    assert env["PORTWATCH_PID"] == str(h.pid) and env["PORTWATCH_COMM"] == "squatter"
    assert env["PORTWATCH_PORT"] == str(port) and env["PORTWATCH_RULE"] == "guarded"
    assert env["PORTWATCH_PROTO"] == "tcp" and env["PORTWATCH_ADDRESS"] == "127.0.0.1"
    assert record["inherited"] == []  # NOTIFY_SOCKET / WATCHDOG_* never reach a hook
    stdin = json.loads(unhex(record["stdin"]))
    assert stdin["event"] == "reserved_port_taken" and stdin["pid"] == h.pid
    finished = d.wait_event("hook_finished", hook="record")
    assert finished["exit_code"] == 0
    h.stop()
    closed = d.wait_event("listener_closed", port=port)
    assert closed["inode"] == h.inode
    assert d.count("reserved_port_taken") == 1


@pytest.mark.root
def test_allowed_owners_raise_nothing(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
) -> None:
    """Owners allowed by comm, exe, user or unit are not violations; a wrong one in the same run is."""
    ports = [free_port() for _ in range(5)]
    unit = f"portwatch-test-{os.getpid()}.service"
    rules = "".join(
        f"  - name: r{i}\n    ports: [{port}]\n    allow:\n{allow}"
        for i, (port, allow) in enumerate(
            zip(
                ports,
                [
                    "      - comm: good-*\n",
                    f"      - exe: {os.path.realpath(sys.executable)}\n        comm: exe-ok\n",
                    "      - user: root\n",
                    f"      - unit: {unit}\n",
                    "      - comm: good-*\n        user: nobody\n",  # AND: right name, wrong user
                ],
                strict=True,
            )
        )
    )
    cfg = write_config(tmp_path / "pw.yaml", f"interval: 0.2\nreserved:\n{rules}")
    d = daemons(cfg)
    d.started()
    sock = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}
    by_comm = holders([{**sock, "port": ports[0]}], name=b"good-server")
    by_exe = holders([{**sock, "port": ports[1]}], name=b"exe-ok")
    by_user = holders([{**sock, "port": ports[2]}], name=b"anything")
    # A cgroup named like a unit in every hierarchy portwatch reads units from (name=systemd
    # and/or cgroup2, whichever this machine has), joined before the socket opens, as a
    # service's process would be.
    cgroups: list[Path] = []
    procs = make_cgroups(unit, cgroups)
    try:
        join = ["sh", "-c", "".join(f"echo $$ > {p} && " for p in procs) + 'exec "$@"', "sh"]
        by_unit = holders([{**sock, "port": ports[3]}], name=b"in-unit", prefix=join)
        wrong_user = holders([{**sock, "port": ports[4]}], name=b"good-but-root")
        taken = d.wait_event("reserved_port_taken", port=ports[4])
        assert taken["pid"] == wrong_user.pid
        for holder in (by_comm, by_exe, by_user, by_unit):
            d.wait_event("listener_opened", port=holder.port, pid=holder.pid)
        opened_in_unit = d.wait_event("listener_opened", port=ports[3])
        assert opened_in_unit["unit"] == unit
        time.sleep(0.5)
        assert d.count("reserved_port_taken") == 1
    finally:
        by_unit.stop()
        assert remove_cgroups(cgroups) == []


def test_violation_present_at_startup(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """A squatter already there when the daemon starts is reported, flagged at_startup, after
    portwatch_started (events come in the order things happened)."""
    h = holders(tcp4, name=b"early-bird")
    out = tmp_path / "hook.jsonl"
    d = daemons(write_config(tmp_path / "pw.yaml", config_text(h.port, out)))
    taken = d.wait_event("reserved_port_taken", port=h.port)
    assert taken["at_startup"] is True and taken["pid"] == h.pid and taken["comm"] == "early-bird"
    started = d.started()
    assert started["listeners"] >= 1
    assert d.events[0] is started
    hook_records(out)
    # What was already there is in the journal as held at start (the inventory `history` reads),
    # before the squatters, and is not reported as opened again.
    (present,) = [e for e in d.events if e["event"] == "listener_opened" and e.get("port") == h.port]
    assert present["at_startup"] is True and present["pid"] == h.pid
    assert d.events.index(present) < d.events.index(taken)
    assert "listening when portwatch started" in describe("listener_opened", present)


def test_hostile_name_cannot_forge_events_or_run(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """A name holding a newline, fake JSON and an escape stays inside one event and reaches the hook exactly."""
    marker = tmp_path / "pwned"
    out = tmp_path / "hook.jsonl"
    port = tcp4[0]["port"]
    d = daemons(write_config(tmp_path / "pw.yaml", config_text(port, out)))
    d.started()
    hostile_arg = f"$(touch {marker}); `touch {marker}` | touch {marker}\n".encode()
    h = holders(tcp4, name=HOSTILE, argv_extra=[hostile_arg, b"\xff\xfe"])
    taken = d.wait_event("reserved_port_taken", port=port)
    assert taken["comm"] == HOSTILE.decode()
    assert taken["cmdline"][-2:] == [hostile_arg.decode(), "\udcff\udcfe"]
    (record,) = hook_records(out)
    assert unhex(record["env"]["PORTWATCH_COMM"]) == HOSTILE
    assert json.loads(unhex(record["stdin"]))["cmdline"][-1] == "\udcff\udcfe"
    d.stop()
    assert not marker.exists()
    # Every line is exactly one event; the fake event inside the name never became a line.
    assert all(
        isinstance(json.loads(line), dict) and "event" in json.loads(line) for line in d.lines
    )
    assert all(json.loads(line)["event"] != 1 for line in d.lines)
    assert h.pid == taken["pid"]


def test_owner_changed_not_closed(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """When a worker holding a shared socket exits, the socket's owners changed; it did not close."""
    h = holders(tcp4, fork=2)
    d = daemons(write_config(tmp_path / "pw.yaml", "interval: 0.2\n"))
    d.started()
    os.kill(h.children[0], signal.SIGKILL)
    changed = d.wait_event("owner_changed", port=h.port)
    assert sorted(changed["previous_pids"]) == sorted([h.pid, *h.children])
    assert sorted(changed["pids"]) == sorted([h.pid, h.children[1]])
    time.sleep(0.5)
    assert d.count("listener_closed", port=h.port) == 0


def test_reload_by_rename_in_place_and_sighup(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """Atomic rename, an in-place write and SIGHUP each reload within a second; a bad edit is rejected and the old rules stay."""
    port = tcp4[0]["port"]
    out = tmp_path / "hook.jsonl"
    cfg = write_config(tmp_path / "pw.yaml", "interval: 0.2\n")
    d = daemons(cfg)
    d.started()
    # 1. atomic replace, as editors and configuration management do it
    tmp = tmp_path / ".pw.yaml.tmp"
    tmp.write_text(config_text(port, out, interval=0.2))
    os.replace(tmp, cfg)
    d.wait_event("config_reloaded", timeout=1.0, path=str(cfg))
    h = holders(tcp4, name=b"intruder")
    d.wait_event("reserved_port_taken", port=port, pid=h.pid)
    # 2. a bad edit in place: rejected with file and line; the old config stays in force
    mark = d.mark()
    cfg.write_text(config_text(port, out) + "bogus_key: 1\n")
    rejected = d.wait_event("config_rejected", timeout=1.0, since=mark)
    assert f"{cfg}:" in rejected["error"] and "bogus_key" in rejected["error"]
    h.stop()
    second = holders(tcp4, name=b"intruder2")
    d.wait_event("reserved_port_taken", port=port, pid=second.pid)
    # 3. SIGHUP reloads the (fixed) file
    mark = d.mark()
    cfg.write_text(config_text(port, out, allow="      - comm: intruder2\n"))
    d.wait_event("config_reloaded", timeout=1.0, since=mark)
    mark = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_event("config_reloaded", timeout=1.0, since=mark)
    # 3b. a refused edit undone (the file equals the config in force again): said, not silent
    good = cfg.read_text()
    mark = d.mark()
    cfg.write_text("interval: [\n")
    d.wait_event("config_rejected", timeout=1.0, since=mark)
    mark = d.mark()
    cfg.write_text(good)
    d.wait_event("config_reloaded", timeout=1.0, since=mark)
    # 4. the file deleted: rejected, last good config kept
    mark = d.mark()
    cfg.unlink()
    gone = d.wait_event("config_rejected", timeout=1.0, since=mark, path=str(cfg))
    assert "cannot read" in gone["error"]
    assert d.proc.poll() is None


def test_sigterm_stops_within_two_seconds(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
) -> None:
    """SIGTERM: portwatch_stopping and exit 0 within two seconds (SIGINT the same)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = daemons(write_config(tmp_path / "pw.yaml", "interval: 5\n"))
        d.started()
        t0 = time.monotonic()
        d.proc.send_signal(sig)
        assert d.proc.wait(2) == 0
        assert time.monotonic() - t0 < 2.0
        d.wait_event("portwatch_stopping")


def test_hook_timeout_kills_its_group(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
) -> None:
    """A hook that hangs past its timeout, with a child of its own, is reported and its whole group killed."""
    pids = tmp_path / "pids"
    hang = ["/bin/sh", "-c", f"sleep 30 & echo $$ $! > {pids}; wait"]
    port = tcp4[0]["port"]
    d = daemons(
        write_config(
            tmp_path / "pw.yaml", config_text(port, tmp_path / "x", hook_cmd=hang, hook_timeout=0.5)
        )
    )
    d.started()
    holders(tcp4)
    failed = d.wait_event("hook_failed", timeout=5)
    assert failed["reason"].startswith("timeout")
    for pid in map(int, pids.read_text().split()):
        assert wait_exited(pid)  # SIGKILL was sent to the group; it lands when they next run
    # Detection did not wait for the hook: the daemon kept scanning meanwhile.
    assert d.proc.poll() is None


def test_invalid_config_refuses_to_start(tmp_path: Path) -> None:
    """run and check print PATH:LINE messages and exit 78 on a bad config; check prints ok on a good one."""
    bad = write_config(
        tmp_path / "bad.yaml", "interval: 0\nreserved:\n  - name: x\n    ports: [70000]\n"
    )
    for command in ("run", "check"):
        result = run_cli(command, "--config", str(bad))
        assert result.returncode == 78
        lines = result.stderr.splitlines()
        assert any(line.startswith(f"{bad}:1:") and "interval" in line for line in lines), (
            result.stderr
        )
        assert any(line.startswith(f"{bad}:4:") and "70000" in line for line in lines), (
            result.stderr
        )
        assert "Traceback" not in result.stderr
    good = write_config(tmp_path / "good.yaml", "interval: 1\n")
    ok = run_cli("check", "--config", str(good))
    assert (ok.returncode, ok.stdout) == (0, "ok\n")


def test_shipped_example_config_passes_check() -> None:
    """etc/portwatch.yaml, the file the README starts the watcher with, is valid."""
    result = run_cli("check", "--config", "etc/portwatch.yaml")
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr


COMM_BREAKING_OUT = 'x"$(touch {marker})`touch {marker}`;touch {marker}\n'
EXAMPLE_HOOKS = {
    "log-violation": ({"event": "reserved_port_taken", "rule": "ssh", "proto": "tcp", "address": "0.0.0.0",
                       "port": 22, "pid": 4242, "comm": COMM_BREAKING_OUT, "unit": "evil.service"},
                      "reserved port tcp/22 (rule ssh) taken by pid 4242 ({comm}, unit evil.service)"),
    "log-conflict": ({"event": "port_conflict", "proto": "tcp", "address": "0.0.0.0", "port": 80,
                      "pid": 4242, "comm": COMM_BREAKING_OUT, "unit": "evil.service",
                      "blocked_unit": "nginx.service", "blocked_pid": 812},
                     "nginx.service (pid 812) could not bind port 80: held by pid 4242 ({comm}, unit evil.service)"),
}


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(EXAMPLE_HOOKS))
def test_shipped_example_hook_passes_hostile_values_as_data(tmp_path: Path, name: str) -> None:
    """The example hooks, run with the environment portwatch gives hooks and a process name made
    to break out of shell quoting: logger (replaced in a private mount namespace by a recorder)
    gets the one message, the name in it literally, and nothing ran."""
    from portwatch.config import load_config
    from portwatch.hooks import hook_environment

    hook = load_config(str(ROOT / "etc" / "portwatch.yaml")).hooks[name]
    marker, out = tmp_path / "pwned", tmp_path / "logger-args"
    comm = COMM_BREAKING_OUT.format(marker=marker)
    fields, expected = EXAMPLE_HOOKS[name]
    event = {**fields, "comm": comm}
    recorder = tmp_path / "logger"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {out}\n")
    recorder.chmod(0o755)
    replace_logger = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /usr/bin/logger && exec "$@"',
                      str(recorder)]
    env = hook_environment(event, {"PATH": "/usr/bin:/bin"})
    subprocess.run([*replace_logger, *hook.command], env=env, check=True, timeout=10)
    args = out.read_bytes().split(b"\0")[:-1]
    assert args[:3] == [b"-t", b"portwatch-hook", b"--"]
    assert args[3:] == [expected.format(comm=comm).encode()]
    assert not marker.exists()


@pytest.fixture
def console_env() -> dict[str, str]:
    return {"NO_COLOR": "1"}


def test_console_format_escapes(
    tmp_path: Path,
    daemons: Callable[..., DaemonProcess],
    holders: Callable[..., Holder],
    tcp4: list[dict[str, Any]],
    console_env: dict[str, str],
) -> None:
    """--log-format console writes one line per event with hostile names escaped."""
    port = tcp4[0]["port"]
    cfg = write_config(tmp_path / "pw.yaml", config_text(port, tmp_path / "o"))
    d = daemons(cfg, fmt="console", env=clean_env(**console_env))
    d.wait_line(b"portwatch_started")
    h = holders(tcp4, name=HOSTILE)
    d.wait_line(b"reserved_port_taken")
    d.stop()
    text = b"".join(d.lines).decode()
    assert "\x1b" not in text
    taken = [line for line in text.splitlines() if "reserved_port_taken" in line]
    assert len(taken) == 1 and "x\\n{" in taken[0] and "\\x1b" in taken[0]
    assert str(h.pid) in taken[0]
