"""The hook runner, with real hook processes, real signals and real files.

Hook programs live in tests/programs: record_hook.py writes down what it got,
misbehave_hook.py hangs, floods or leaves a detached grandchild.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portwatch.hooks import (
    ENV_VALUE_LIMIT,
    KILL_GRACE,
    OUTPUT_TAIL,
    HookRunner,
    hook_environment,
)
from portwatch.text import decode, encode
from tests.conftest import PROGRAMS, python_for_nobody, read_pids, wait_exited

RECORD = str(PROGRAMS / "record_hook.py")
MISBEHAVE = str(PROGRAMS / "misbehave_hook.py")

EVENT: dict[str, Any] = {
    "event": "policy_violated",
    "rule": "ssh",
    "proto": "tcp",
    "address": "0.0.0.0",
    "port": 22,
    "pid": 4242,
    "comm": "nc",
    "exe": "/usr/bin/nc.openbsd",
    "user": "mallory",
    "unit": "evil.service",
}
ZERO_CAPS = "0000000000000000"


class Events:
    """A thread-safe emit callback that tests can wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        with self._cond:
            self._items.append((name, fields))
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self._items) >= count, timeout), self._items
            return list(self._items)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [fields for n, fields in self._items if n == name]

    @property
    def all(self) -> list[tuple[str, dict[str, Any]]]:
        with self._cond:
            return list(self._items)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def make_runner(events: Events) -> Iterator[Callable[..., HookRunner]]:
    runners: list[HookRunner] = []

    def make(**kwargs: Any) -> HookRunner:
        kwargs.setdefault("cooldown", 0.0)
        runner = HookRunner(events, **kwargs)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close(timeout=0.2)


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids of `sleep` processes a test caused to escape; killed at the end (we started them)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            if b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def records(outdir: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(outdir.glob("*.json"))
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(found) == count, found
    return [json.loads(path.read_text()) for path in found]


def record_env(record: dict[str, Any]) -> dict[bytes, bytes]:
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in record["env"].items()}


def wait_idle(runner: HookRunner, timeout: float = 2.0) -> int:
    """`running` once the workers have finished reporting (it counts until then)."""
    deadline = time.monotonic() + timeout
    while runner.running and time.monotonic() < deadline:
        time.sleep(0.005)
    return runner.running


# -- the environment ---------------------------------------------------------------


def test_environment_drops_systemd_variables_and_adds_event_values() -> None:
    base = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "x",
        "JOURNAL_STREAM": "8:1234",
        "INVOCATION_ID": "abc",
    }
    env = hook_environment({"event": "port_conflict", "port": 22, "pid": None, "blocked_unit": "nginx.service",
                            "blocked_pid": 41}, base)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PORTWATCH_EVENT": "port_conflict",
        "PORTWATCH_RULE": "",
        "PORTWATCH_PROTO": "",
        "PORTWATCH_ADDRESS": "",
        "PORTWATCH_PORT": "22",
        "PORTWATCH_PID": "",
        "PORTWATCH_COMM": "",
        "PORTWATCH_EXE": "",
        "PORTWATCH_USER": "",
        "PORTWATCH_UNIT": "",
        "PORTWATCH_BLOCKED_UNIT": "nginx.service",
        "PORTWATCH_BLOCKED_PID": "41",
    }
    assert base["NOTIFY_SOCKET"] == "/run/systemd/notify"  # the input is not changed


def test_environment_values_keep_exact_bytes_replace_nul_and_are_capped() -> None:
    raw_comm = b"ev\xffil\xc3(\n\x1b[2J"
    env = hook_environment(
        {
            "comm": decode(raw_comm),
            "exe": "/bin/a\0b",
            "unit": "x" * 5000,
            "user": "\u20ac" * 2000,  # 3 bytes each: 4096 falls inside a character
        },
        {},
    )
    assert encode(env["PORTWATCH_COMM"]) == raw_comm
    assert env["PORTWATCH_EXE"] == "/bin/a b"
    assert len(encode(env["PORTWATCH_UNIT"])) == ENV_VALUE_LIMIT
    user = encode(env["PORTWATCH_USER"])
    assert len(user) == 4095
    assert user.decode("utf-8") == "\u20ac" * 1365  # cut on a character boundary


# -- what a hook gets ----------------------------------------------------------------


def test_hook_gets_argv_environment_stdin_and_its_own_session(
    make_runner: Callable[..., HookRunner],
    events: Events,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID"):
        monkeypatch.setenv(name, "daemon-only")
    monkeypatch.setenv("PORTWATCH_TEST_INHERITED", "yes")
    runner = make_runner()
    assert runner.submit("record", [sys.executable, RECORD, str(tmp_path)], 10, EVENT, "k")
    ((name, fields),) = events.wait(1)
    (record,) = records(tmp_path, 1)

    assert name == "hook_finished"
    assert set(fields) == {"hook", "exit_code", "duration", "rule", "port"}
    assert fields["hook"] == "record"
    assert fields["exit_code"] == 0
    assert fields["rule"] == "ssh"
    assert fields["port"] == 22
    assert 0 < fields["duration"] < 5
    assert fields["duration"] == round(fields["duration"], 3)

    assert [bytes.fromhex(a) for a in record["argv"]] == [RECORD.encode(), str(tmp_path).encode()]
    env = record_env(record)
    for key, value in EVENT.items():
        assert env[f"PORTWATCH_{key.upper()}".encode()] == str(value).encode()
    for scrubbed in (b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID", b"INVOCATION_ID"):
        assert scrubbed not in env
    assert env[b"PORTWATCH_TEST_INHERITED"] == b"yes"
    stdin = bytes.fromhex(record["stdin"])
    assert json.loads(stdin) == EVENT
    assert stdin.endswith(b"\n")
    assert stdin.count(b"\n") == 1
    assert record["cwd"] == "/"
    assert record["pid"] == record["pgid"] == record["sid"]  # own session and group
    assert record["sid"] != os.getsid(0)
    assert wait_idle(runner) == 0


@pytest.mark.root
def test_root_daemon_hook_runs_without_any_capability(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    assert f"CapEff:\t{ZERO_CAPS}" not in Path("/proc/self/status").read_text()  # we have caps
    make_runner().submit("record", [sys.executable, RECORD, str(tmp_path)], 10, EVENT, "k")
    assert events.wait(1)[0][0] == "hook_finished"
    (record,) = records(tmp_path, 1)
    assert record["status"] == {
        "CapInh": ZERO_CAPS,
        "CapPrm": ZERO_CAPS,
        "CapEff": ZERO_CAPS,
        "CapBnd": ZERO_CAPS,
        "CapAmb": ZERO_CAPS,
        "NoNewPrivs": "1",
    }
    # setpriv execs the hook in place: the argv the hook sees is the configured one.
    assert bytes.fromhex(record["argv"][0]) == RECORD.encode()


def test_hostile_event_values_arrive_byte_exact_and_execute_nothing(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("still here")
    marks = [tmp_path / f"pwned{i}" for i in range(4)]
    raw_comm = (
        b"ev\xff\xfeil\n\x1b[31m$(touch " + bytes(marks[0]) + b")`touch " + bytes(marks[1]) + b"`"
    )
    event = dict(
        EVENT,
        comm=decode(raw_comm),
        exe=decode(b"/tmp/\xc3(bad\nname; touch " + bytes(marks[2])),
        user=f"; rm -rf {victim}",
        unit="a\0b",
        rule="ssh\nforged=1",
    )
    hostile_arg = f"$(touch {marks[3]})"
    shell_out = tmp_path / "shell.out"
    runner = make_runner()
    runner.submit("record", [sys.executable, RECORD, str(outdir), "0", hostile_arg], 10, event, 1)
    # How a hook script should use the values: quoted, and printf "%s".
    script = 'printf "%s" "$PORTWATCH_COMM" > "$1"'
    runner.submit("shell", ["/bin/sh", "-c", script, "sh", str(shell_out)], 10, event, 2)
    assert [name for name, _ in events.wait(2)] == ["hook_finished"] * 2

    (record,) = records(outdir, 1)
    env = record_env(record)
    assert env[b"PORTWATCH_COMM"] == raw_comm
    assert env[b"PORTWATCH_EXE"] == encode(event["exe"])
    assert env[b"PORTWATCH_USER"] == event["user"].encode()
    assert env[b"PORTWATCH_UNIT"] == b"a b"  # NUL cannot be in an environment
    assert env[b"PORTWATCH_RULE"] == b"ssh\nforged=1"
    stdin = bytes.fromhex(record["stdin"])
    assert stdin.isascii()
    assert stdin.count(b"\n") == 1  # one line: a value cannot start a second record
    decoded = json.loads(stdin)
    assert decoded == event
    assert encode(decoded["comm"]) == raw_comm
    assert bytes.fromhex(record["argv"][-1]) == hostile_arg.encode()
    assert shell_out.read_bytes() == raw_comm
    assert victim.read_text() == "still here"
    assert not any(mark.exists() for mark in marks)


# -- failures --------------------------------------------------------------------------


def test_non_zero_exit_is_reported_with_output(
    make_runner: Callable[..., HookRunner], events: Events
) -> None:
    make_runner().submit("fails", ["/bin/sh", "-c", "echo failing >&2; exit 3"], 10, EVENT, 1)
    ((name, fields),) = events.wait(1)
    assert name == "hook_failed"
    assert fields == {
        "hook": "fails",
        "reason": "exit status 3",
        "exit_code": 3,
        "signal": None,
        "duration": fields["duration"],
        "output": "failing\n",
        "rule": "ssh",
        "port": 22,
    }


def test_death_by_signal_is_reported(
    make_runner: Callable[..., HookRunner], events: Events
) -> None:
    make_runner().submit("killed", ["/bin/sh", "-c", "kill -SEGV $$"], 10, {"rule": "r"}, 1)
    ((name, fields),) = events.wait(1)
    assert (name, fields["reason"]) == ("hook_failed", f"killed by signal {signal.SIGSEGV}")
    assert fields["signal"] == signal.SIGSEGV
    assert fields["exit_code"] is None
    assert fields["rule"] == "r"
    assert "port" not in fields


def _no_exec_bit(tmp_path: Path) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    return str(path)


def _other_users_private_file(tmp_path: Path) -> str:
    # Executable for its owner only: root without CAP_DAC_OVERRIDE may not run it.
    path = tmp_path / "theirs.sh"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o700)
    os.chown(path, 65534, 65534)
    return str(path)


@pytest.mark.root
@pytest.mark.parametrize(
    ("make_command", "reason"),
    [
        (lambda tmp: "/nonexistent/portwatch-hook", "not found"),
        (lambda tmp: "portwatch-no-such-hook", "not found"),
        (_no_exec_bit, "permission denied"),
        (str, "permission denied"),
        (_other_users_private_file, "permission denied"),
    ],
    ids=["missing-path", "missing-on-PATH", "no-exec-bit", "directory", "others-0700"],
)
def test_spawn_errors_are_reported_under_setpriv(
    make_runner: Callable[..., HookRunner],
    events: Events,
    tmp_path: Path,
    make_command: Callable[[Path], str],
    reason: str,
) -> None:
    make_runner().submit("broken", [make_command(tmp_path)], 10, EVENT, 1)
    ((name, fields),) = events.wait(1)
    assert name == "hook_failed"
    assert fields["reason"] == reason
    assert fields["exit_code"] is None
    assert fields["signal"] is None


@pytest.mark.root
def test_unprivileged_daemon_reports_spawn_errors_and_drops_ambient_caps(readable_tree: Path) -> None:
    # Runs the runner itself as nobody with an ambient capability, the way the
    # unit runs the daemon, from a copy nobody can read (the checkout may be root's alone).
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(readable_tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": "/tmp",
    }
    result = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *("--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"),
            *(python_for_nobody(), str(readable_tree / "programs" / "unprivileged_hooks.py")),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "CapAmb:\t0000000000000400" in report["control"]  # children would inherit it
    reasons = {fields["hook"]: fields["reason"] for name, fields in report["events"]}
    assert reasons == {
        "missing": "not found",
        "missing-on-path": "not found",
        "noexec": "permission denied",
        "noshebang": "permission denied",
        "caps": "exit status 1",
    }
    (caps,) = [fields for _, fields in report["events"] if fields["hook"] == "caps"]
    assert caps["output"].splitlines() == [
        f"CapPrm:\t{ZERO_CAPS}",
        f"CapEff:\t{ZERO_CAPS}",
        f"CapAmb:\t{ZERO_CAPS}",
    ]


def test_hanging_hook_and_its_child_are_killed_at_timeout(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    make_runner().submit("hang", [sys.executable, MISBEHAVE, "hang", str(pidfile)], 0.5, EVENT, 1)
    leader, child = read_pids(pidfile)
    ((name, fields),) = events.wait(1)
    assert name == "hook_failed"
    assert fields["reason"] == "timeout"
    assert fields["signal"] == signal.SIGKILL  # it ignored SIGTERM
    assert fields["exit_code"] is None
    assert fields["duration"] >= 0.5 + KILL_GRACE  # TERM at the timeout, KILL only after the grace
    assert not Path(f"/proc/{leader}").exists()  # reaped: no zombie
    assert wait_exited(child)


def test_child_left_in_the_group_is_killed_when_the_hook_exits(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    script = 'sleep 30 & echo $! > "$1"; exit 0'
    make_runner().submit("bg", ["/bin/sh", "-c", script, "sh", str(pidfile)], 10, EVENT, 1)
    ((name, _fields),) = events.wait(1)  # reported although the child sleeps for 30 s
    assert name == "hook_finished"
    (child,) = read_pids(pidfile)
    assert wait_exited(child)


def test_output_flood_is_kept_to_a_bounded_tail(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    argv = [sys.executable, MISBEHAVE, "flood", str(tmp_path / "pid"), str(50_000_000)]
    make_runner().submit("flood", argv, 20, EVENT, 1)
    ((name, fields),) = events.wait(1, timeout=20)
    assert (name, fields["reason"]) == ("hook_failed", "exit status 1")
    assert fields["output"].endswith("flood\n\nEND-OF-FLOOD\n")
    assert len(fields["output"].encode()) <= OUTPUT_TAIL


def test_endless_flood_does_not_fill_the_disk(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    make_runner().submit(
        "flood", [sys.executable, MISBEHAVE, "flood", str(pidfile), "0"], 1.5, EVENT, 1
    )
    (pid,) = read_pids(pidfile)
    most_on_disk = most_written = 0
    while not events.all:
        try:  # the output file, seen through the flooding hook's stdout
            st = Path(f"/proc/{pid}/fd/1").stat()
        except FileNotFoundError:
            break
        most_on_disk = max(most_on_disk, st.st_blocks * 512)
        most_written = max(most_written, st.st_size)
        time.sleep(0.01)
    ((name, fields),) = events.wait(1)
    assert (name, fields["reason"]) == ("hook_failed", "timeout")
    assert len(fields["output"].encode()) <= OUTPUT_TAIL
    assert most_written > 1 << 28  # it did flood (here: several GiB)...
    assert most_on_disk < most_written // 4  # ...but old output was freed as it went (here: 1/40)


def test_detached_grandchild_does_not_delay_the_report(
    make_runner: Callable[..., HookRunner],
    events: Events,
    tmp_path: Path,
    leftovers: list[int],
) -> None:
    pidfile = tmp_path / "pid"
    argv = [sys.executable, MISBEHAVE, "detach", str(pidfile), "30"]
    make_runner().submit("detach", argv, 10, EVENT, 1)
    (grandchild,) = read_pids(pidfile)
    leftovers.append(grandchild)
    ((name, _fields),) = events.wait(1)
    assert name == "hook_finished"
    # Reported while the grandchild, which escaped the group kill and holds the output file
    # (never a pipe we read), still runs: its 30 s did not delay the report.
    assert not wait_exited(grandchild, timeout=0.1)


# -- concurrency, cool-down, queue -------------------------------------------------


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


def _run_slow_hooks(runner: HookRunner, outdir: Path, count: int, seconds: float) -> int:
    for i in range(count):
        argv = [sys.executable, RECORD, str(outdir), str(seconds)]
        assert runner.submit(f"slow{i}", argv, 10, EVENT, i)
    found = records(outdir, count, timeout=20)
    return _max_overlap([(r["start"], r["end"]) for r in found])


def test_at_most_max_parallel_hooks_run_at_once(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    runner = make_runner(max_parallel=2)
    samples: list[int] = []
    for i in range(10):
        runner.submit(f"slow{i}", [sys.executable, RECORD, str(tmp_path), "0.3"], 10, EVENT, i)
    while len(events.all) < 10:
        samples.append(runner.running)
        time.sleep(0.005)
    events.wait(10)
    overlap = _max_overlap([(r["start"], r["end"]) for r in records(tmp_path, 10)])
    assert overlap == 2
    assert max(samples) == 2
    assert wait_idle(runner) == 0


def test_configure_grows_and_shrinks_the_pool(
    make_runner: Callable[..., HookRunner], tmp_path: Path
) -> None:
    runner = make_runner(max_parallel=1)
    runner.configure(max_parallel=3, cooldown=0)
    (tmp_path / "wide").mkdir()
    assert _run_slow_hooks(runner, tmp_path / "wide", 3, 0.4) == 3
    runner.configure(max_parallel=1, cooldown=0)
    (tmp_path / "narrow").mkdir()
    assert _run_slow_hooks(runner, tmp_path / "narrow", 3, 0.2) == 1


def test_a_burst_on_one_key_runs_once_and_is_reported_once(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    clock = FakeClock()
    runner = make_runner(cooldown=60.0, clock=clock)
    argv = [sys.executable, RECORD, str(tmp_path)]
    accepted = [runner.submit("record", argv, 10, EVENT, ("ssh", 22))]
    clock.now += 10
    accepted += [runner.submit("record", argv, 10, EVENT, ("ssh", 22)) for _ in range(99)]
    assert accepted == [True] + [False] * 99
    events.wait(2)
    time.sleep(0.2)  # nothing more may arrive
    assert sorted(name for name, _ in events.all) == ["hook_finished", "hook_suppressed"]
    assert events.named("hook_suppressed") == [
        {"hook": "record", "rule": "ssh", "port": 22, "until": 50.0}
    ]
    assert len(records(tmp_path, 1)) == 1
    # Other hooks and other keys have their own cool-downs.
    assert runner.submit("other", ["/bin/true"], 10, EVENT, ("ssh", 22))
    assert runner.submit("record", ["/bin/true"], 10, EVENT, ("ssh", 2222))
    # After the window it runs again, and a new window gets one new notice.
    clock.now += 50
    assert runner.submit("record", ["/bin/true"], 10, EVENT, ("ssh", 22))
    assert not runner.submit("record", ["/bin/true"], 10, EVENT, ("ssh", 22))
    assert not runner.submit("record", ["/bin/true"], 10, EVENT, ("ssh", 22))
    events.wait(6)
    assert len(events.named("hook_suppressed")) == 2
    assert len(events.named("hook_finished")) == 4


def test_full_queue_drops_and_submit_never_blocks(
    make_runner: Callable[..., HookRunner], events: Events
) -> None:
    runner = make_runner(max_parallel=1, queue_limit=2)
    assert runner.submit("busy", ["sleep", "30"], 30, EVENT, 0)
    deadline = time.monotonic() + 5
    while runner.running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # Returns at once, while the only worker is busy for 30 s: a submit that waited for room
    # would accept all five.
    accepted = [runner.submit("later", ["sleep", "30"], 30, EVENT, i) for i in range(1, 6)]
    assert accepted == [True, True, False, False, False]
    assert (
        events.named("hook_dropped")
        == [{"hook": "later", "reason": "queue full", "rule": "ssh", "port": 22}] * 3
    )
    assert runner.running == 1


def test_close_ends_running_hooks_promptly(
    make_runner: Callable[..., HookRunner], events: Events, tmp_path: Path
) -> None:
    runner = make_runner(max_parallel=2)
    pidfiles = [tmp_path / "a", tmp_path / "b"]
    for i, pidfile in enumerate(pidfiles):
        runner.submit(f"hang{i}", [sys.executable, MISBEHAVE, "hang", str(pidfile)], 60, EVENT, i)
    runner.submit("queued", ["/bin/true"], 10, EVENT, 3)
    pids = [pid for pidfile in pidfiles for pid in read_pids(pidfile)]
    runner.close(timeout=0.5)  # the hooks' own timeout is 60 s: "shutdown" below, not "timeout"
    assert wait_idle(runner) == 0
    failed = events.named("hook_failed")
    assert sorted(f["hook"] for f in failed) == ["hang0", "hang1"]  # the queued one never ran
    assert {f["reason"] for f in failed} == {"shutdown"}
    assert all(wait_exited(pid) for pid in pids)
    assert not runner.submit("late", ["/bin/true"], 10, EVENT, 9)
    assert events.named("hook_dropped") == [
        {"hook": "late", "reason": "shutting down", "rule": "ssh", "port": 22}
    ]


def test_a_failing_emit_does_not_stop_the_workers(tmp_path: Path) -> None:
    calls: list[str] = []

    def emit(name: str, fields: dict[str, Any]) -> None:
        calls.append(name)
        raise RuntimeError("sink broken")

    runner = HookRunner(emit, max_parallel=1, cooldown=0)
    try:
        for i in range(3):
            assert runner.submit("true", ["/bin/true"], 10, EVENT, i)
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == ["hook_finished"] * 3
    finally:
        runner.close()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_parallel"):
        HookRunner(lambda name, fields: None, max_parallel=0)
    with pytest.raises(ValueError, match="queue_limit"):
        HookRunner(lambda name, fields: None, queue_limit=0)
