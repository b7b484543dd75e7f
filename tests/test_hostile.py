"""Hostile processes against the real daemon and CLI: names, argv and executables built to forge
log lines and journal fields, reach a terminal raw, or get run by a shell.

What test_daemon.py and test_cli.py already cover (JSON lines, tables, console through a pipe)
is not repeated. Here: the journal path against a real journald, a real TTY (pty), command lines
of 4 KB and more, and an executable whose own path is hostile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROGRAMS, ROOT, Holder
from tests.journald_fixture import Journald, field_values, journald  # noqa: F401 (fixture)

RECORDER = PROGRAMS / "record_event.py"
Event = dict[str, Any]

# 14 bytes (comm keeps 15): a newline, a would-be journal field, an escape.
FORGING_COMM = b"x\nMESSAGE=pwn\x1b"
# 15 bytes: CSI colour, a C1 CSI (U+009B as UTF-8), a newline and shell syntax.
TTY_COMM = b"ev\x1b[31m\xc2\x9b\n$(id)"
# Raw bytes a terminal would act on, or that would start a new line or reorder text.
RAW_CONTROLS = [b"\x1b", b"\x07", b"\xc2\x9b", b"\xe2\x80\xae", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff"]
EVENT_NAMES = {
    "portwatch_started", "portwatch_stopping", "listener_opened", "listener_closed", "owner_changed",
    "reserved_port_taken", "hook_finished", "hook_failed", "hook_suppressed", "hook_dropped",
    "config_reloaded", "config_rejected", "degraded", "state_restored", "state_reset", "scan_failed",
}


def hostile_argv(marker: Path) -> list[bytes]:
    """Arguments that try to forge journal fields, drive a terminal, run a shell, and are long."""
    return [
        b"\nPRIORITY=0\nMESSAGE_ID=" + b"0" * 32 + b"\nMESSAGE=forged\nPORTWATCH_FORGED=1\nEVIL=1\n",
        b"\xff\xfe\x1b[2J\x1b]0;owned\x07\xc2\x9b31m\r\xe2\x80\xae",
        f"$(touch {marker}); `touch {marker}` | touch {marker}; touch {marker} &".encode(),
        b"A" * 4096 + b"\n\x1b[31m" + b"B" * 100,  # a 4 KB argument, then more
    ]


def decoded(argv: Sequence[bytes]) -> list[str]:
    return [a.decode("utf-8", "surrogateescape") for a in argv]


def free_port(taken: Sequence[int] = ()) -> int:
    """A free port below the ephemeral range: no socket bound to port 0 (by this host's other
    programs, or the churn tests) can land on it and add a violation to a count."""
    import secrets
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = 10000 if low > 12000 else 1024
    for _ in range(1000):
        port = first + secrets.randbelow(max(1, low - first))
        if port in taken:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port below the ephemeral range")


def guarded_config(path: Path, port: int, hook_out: Path, *, interval: float = 0.2, extra: str = "") -> Path:
    command = [sys.executable, str(RECORDER), str(hook_out)]
    path.write_text(
        f"interval: {interval}\n"
        "hook_cooldown: 0\n"
        "reserved:\n"
        "  - name: guarded\n"
        f"    ports: [{port}]\n"
        "    hooks: [record]\n"
        f"{extra}"
        "hooks:\n"
        "  record:\n"
        f"    command: {json.dumps(command)}\n"
        "    timeout: 5\n"
    )
    return path


def hook_records(path: Path, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"the hook did not run {count} time(s) within {timeout}s")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without systemd's stream marker (auto would pick the journal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env.update(extra)
    return env


class Watcher:
    """`portwatch run` as a real process, started through any prefix (nsenter, setpriv, a
    seccomp launcher), any python and any log format. stdout lines are kept raw; those that are
    JSON objects are also parsed into `events`."""

    def __init__(
        self,
        config: Path,
        *extra: str,
        fmt: str = "json",
        prefix: Sequence[str] = (),
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        cwd: Path | str = ROOT,
        state_dir: Path | None = None,
    ) -> None:
        state = state_dir or config.parent / "state"
        self.argv = [*prefix, python, "-m", "portwatch", "run", "--config", str(config),
                     "--log-format", fmt, "--state-dir", str(state), *extra]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd, env=env if env is not None else clean_env())
        self.pid = self.proc.pid
        self.lines: list[bytes] = []
        self.events: list[Event] = []
        self.stderr = b""
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        self.events.append(event)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        data = self.proc.stderr.read()
        with self._cond:
            self.stderr = data

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0, since: int = 0) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[0].is_alive()):
                    names = [e.get("event") for e in self.events]
                    raise AssertionError(
                        f"no matching event within {timeout}s; saw {names}; stderr: {self.stderr[-2000:]!r}")
                self._cond.wait(min(left, 0.1))

    def wait_event(self, name: str, timeout: float = 5.0, since: int = 0, **fields: Any) -> Event:
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()), timeout, since)

    def count(self, name: str, **fields: Any) -> int:
        with self._cond:
            return sum(1 for e in self.events
                       if e.get("event") == name and all(e.get(k) == v for k, v in fields.items()))

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


@pytest.fixture
def watchers() -> Iterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def start(config: Path, *extra: str, **kw: Any) -> Watcher:
        w = Watcher(config, *extra, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def in_mount_namespace_of(pid: int) -> list[str]:
    """A prefix that runs a command in `pid`'s mount namespace, in this checkout (setns to a mount
    namespace moves the working directory to its root)."""
    return ["nsenter", f"--target={pid}", "--mount", f"--wd={ROOT}", "--"]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (namespaces, setpriv); CI runs as root")


# --- the journal path -----------------------------------------------------------------------------


def daemon_entries(journal: Journald, pid: int, *matches: str, count: int = 1) -> list[dict[str, Any]]:
    return journal.query(f"_PID={pid}", *matches, count=count)


@pytest.mark.root
def test_journal_one_entry_per_event_with_exact_bytes(
    tmp_path: Path, journald: Journald, holders: Callable[..., Holder],
    watchers: Callable[..., Watcher],
) -> None:
    """--log-format journal against a real journald: each event is one entry; PORTWATCH_COMM and
    PORTWATCH_CMDLINE carry the exact bytes; the name forges no field, no PRIORITY and no
    MESSAGE_ID; MESSAGE holds no control character; nothing reaches stdout; no shell ran."""
    need_root()
    marker = tmp_path / "pwned"
    port = free_port()
    out = tmp_path / "hook.jsonl"
    cfg = guarded_config(tmp_path / "pw.yaml", port, out)
    # journald's /run exists only in its mount namespace: run the daemon there, as under systemd.
    d = watchers(cfg, fmt="journal", prefix=in_mount_namespace_of(journald.pid))
    assert daemon_entries(journald, d.pid, "PORTWATCH_EVENT=portwatch_started"), d.stderr
    argv = hostile_argv(marker)
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
                name=FORGING_COMM, argv_extra=argv)
    for event in ("reserved_port_taken", "listener_opened"):
        assert daemon_entries(journald, d.pid, f"PORTWATCH_EVENT={event}", f"PORTWATCH_PORT={port}")
    (record,) = hook_records(out)
    h.stop()
    assert daemon_entries(journald, d.pid, "PORTWATCH_EVENT=listener_closed", f"PORTWATCH_PORT={port}")
    assert d.stop() == 0
    assert daemon_entries(journald, d.pid, "PORTWATCH_EVENT=portwatch_stopping")
    entries = daemon_entries(journald, d.pid)

    per_port: dict[str, int] = {}
    for entry in entries:
        fields = [k for k in entry if not k.startswith("_")]
        assert set(fields) <= {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "MESSAGE_ID"} | {
            k for k in fields if k.startswith("PORTWATCH_")}, fields
        assert "EVIL" not in fields and "PORTWATCH_FORGED" not in fields
        for key in fields:  # one value per field: nothing was appended from a value
            assert len(field_values(entry, key)) == 1, (key, entry[key])
        event = entry["PORTWATCH_EVENT"]
        assert event in EVENT_NAMES
        assert entry["PRIORITY"] in {"3", "4", "6"} and entry["SYSLOG_IDENTIFIER"] == "portwatch"
        message = field_values(entry, "MESSAGE")[0]
        assert not any(c < 0x20 or c == 0x7F for c in message), message
        assert b"\xc2\x9b" not in message and message not in {b"pwn", b"forged"}
        if entry.get("PORTWATCH_PORT") == str(port):
            per_port[event] = per_port.get(event, 0) + 1
    assert per_port == {"reserved_port_taken": 1, "listener_opened": 1, "listener_closed": 1,
                        "hook_finished": 1}

    (taken,) = [e for e in entries if e["PORTWATCH_EVENT"] == "reserved_port_taken"]
    assert taken["PRIORITY"] == "4" and taken["MESSAGE_ID"] == "37140c1bb01945f5952bd220ed88a8b5"
    assert field_values(taken, "PORTWATCH_COMM") == [FORGING_COMM]
    assert json.loads(field_values(taken, "PORTWATCH_CMDLINE")[0])[-len(argv):] == decoded(argv)
    assert taken["PORTWATCH_PID"] == str(h.pid) and taken["PORTWATCH_VERIFIED"] == "true"
    assert "x\\nMESSAGE=pwn\\x1b" in taken["MESSAGE"]
    # The hook got the same exact bytes.
    assert bytes.fromhex(record["env"]["PORTWATCH_COMM"]) == FORGING_COMM
    stdin = json.loads(bytes.fromhex(record["stdin"]))
    assert stdin["comm"] == FORGING_COMM.decode() and stdin["cmdline"][-len(argv):] == decoded(argv)
    assert d.lines == [], d.lines[:3]  # the journal took everything
    assert b"Traceback" not in d.stderr
    assert not marker.exists()


# --- a real terminal -------------------------------------------------------------------------------


class Pty:
    """A process on a pseudo-terminal of 50 x 30000 cells (so no row is cut); all output collected."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 30000, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if not ready:
                if self.proc.poll() is not None:
                    return
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not data:
                return
            with self._lock:
                self.output += data

    def text(self) -> bytes:
        with self._lock:
            return bytes(self.output)

    def wait_for(self, needle: bytes, timeout: float = 10.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            if time.monotonic() > deadline or not self._reader.is_alive():
                raise AssertionError(f"{needle!r} did not appear on the terminal: {self.text()[-3000:]!r}")
            time.sleep(0.05)

    def finish(self, timeout: float = 10.0) -> bytes:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)
        return self.text()


def assert_nothing_raw(screen: bytes) -> None:
    """No terminal control from a process reaches the screen; \\r only as the tty's own \\r\\n."""
    for raw in RAW_CONTROLS:
        assert raw not in screen, (raw, screen[max(0, screen.find(raw) - 200):screen.find(raw) + 200])
    assert screen.count(b"\r") == screen.count(b"\r\n"), "a bare carriage return reached the terminal"


def test_list_on_a_terminal_shows_nothing_raw(holders: Callable[..., Holder], tmp_path: Path) -> None:
    """`portwatch list`, `ps` and `who` on a real TTY: the name and argv are escaped, each row stays one line."""
    argv = hostile_argv(tmp_path / "pwned")
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}], name=TTY_COMM, argv_extra=argv)
    for view in (["list"], ["ps"], ["who", str(h.port)]):
        term = Pty([sys.executable, "-m", "portwatch", *view], clean_env())
        screen = term.finish()
        assert term.proc.returncode == 0, screen[-2000:]
        assert_nothing_raw(screen)
        rows = [row for row in screen.split(b"\r\n") if str(h.pid).encode() in row.split()]
        assert len(rows) == 1, rows
        assert b"ev\\x1b[31m\\x9b\\n$(id)" in rows[0]
        assert b"\\xff\\xfe\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\r\\u202e" in rows[0]
        assert b"A" * 4096 + b"\\n\\x1b[31m" + b"B" * 100 in rows[0]
    assert not (tmp_path / "pwned").exists()


def test_run_on_a_terminal_shows_nothing_raw(holders: Callable[..., Holder], tmp_path: Path) -> None:
    """`portwatch run` on a real TTY picks the console format by itself, and a hostile squatter's
    name, argv and the hook's failure output reach it only escaped, each event on one line."""
    port = free_port()
    # A hook that fails and prints the hostile name: its output is attacker-influenced too.
    echo_name = ["/bin/sh", "-c", 'printf "%s" "$PORTWATCH_COMM"; exit 3']
    cfg = tmp_path / "pw.yaml"
    cfg.write_text(
        "interval: 0.2\nreserved:\n  - name: guarded\n"
        f"    ports: [{port}]\n    hooks: [echo]\nhooks:\n  echo:\n    command: {json.dumps(echo_name)}\n"
    )
    term = Pty([sys.executable, "-m", "portwatch", "run", "--config", str(cfg),
                "--state-dir", str(tmp_path / "state")], clean_env())
    term.wait_for(b"portwatch_started")
    argv = hostile_argv(tmp_path / "pwned")
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
                name=TTY_COMM, argv_extra=argv)
    term.wait_for(b"reserved_port_taken")
    term.wait_for(b"hook_failed")
    term.wait_for(b"listener_opened")
    os.kill(term.proc.pid, signal.SIGTERM)
    screen = term.finish()
    assert term.proc.returncode == 0, screen[-2000:]
    assert_nothing_raw(screen)
    lines = screen.split(b"\r\n")
    taken = [line for line in lines if b" reserved_port_taken: " in line]
    assert len(taken) == 1 and f"pid={h.pid}".encode() in taken[0], taken
    assert b"ev\\x1b[31m\\x9b\\n$(id)" in taken[0]
    # Each argv item is escaped like any other value: \\x1b, never the byte.
    assert b"A" * 4096 in taken[0] and b"\\x1b]0;owned\\x07" in taken[0]
    failed = [line for line in lines if b" hook_failed: " in line]
    assert len(failed) == 1 and b"ev\\x1b[31m\\x9b\\n$(id)" in failed[0], failed
    assert not (tmp_path / "pwned").exists()


# --- long command lines and a hostile executable path ---------------------------------------------


def hostile_python(directory: Path) -> Path:
    """The test's python under a name holding a newline, an escape and shell syntax (a hard link, so
    /proc/<pid>/exe names it)."""
    directory.mkdir()
    path = directory / "py\n\x1b[31m$(id)"
    real = os.path.realpath(sys.executable)
    try:
        os.link(real, path)
    except OSError:  # another filesystem
        shutil.copy2(real, path)
    return path


def test_long_command_lines_and_hostile_exe_arrive_exact(
    tmp_path: Path, holders: Callable[..., Holder], watchers: Callable[..., Watcher],
) -> None:
    """A 64 KB command line made of 4 KB arguments full of newlines, escapes and invalid UTF-8, run
    from an executable whose path holds a newline: one JSON line per event with the exact strings,
    and the hook gets the exact bytes (PORTWATCH_EXE whole, the event on stdin whole)."""
    port = free_port()
    out = tmp_path / "hook.jsonl"
    d = watchers(guarded_config(tmp_path / "pw.yaml", port, out))
    d.wait_event("portwatch_started", timeout=10)
    python = hostile_python(tmp_path / "bin")
    chunk = bytes(range(1, 256)) * 16  # 4080 bytes: every byte value but NUL, invalid UTF-8 included
    argv = [chunk + bytes([n]) * 16 for n in range(1, 17)] + hostile_argv(tmp_path / "pwned")
    assert sum(len(a) + 1 for a in argv) > 64 * 1024
    h = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
                argv_extra=argv, python=str(python))
    taken = d.wait_event("reserved_port_taken", port=port)
    assert taken["pid"] == h.pid
    assert taken["exe"] == str(python)
    assert taken["cmdline"][0] == str(python) and taken["cmdline"][-len(argv):] == decoded(argv)
    opened = d.wait_event("listener_opened", port=port)
    assert opened["cmdline"] == taken["cmdline"]
    (record,) = hook_records(out)
    assert bytes.fromhex(record["env"]["PORTWATCH_EXE"]) == os.fsencode(python)
    stdin = json.loads(bytes.fromhex(record["stdin"]))
    assert stdin["cmdline"] == taken["cmdline"] and stdin["exe"] == str(python)
    d.stop()
    for line in d.lines:  # each line is exactly one event, ASCII only
        assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
        assert json.loads(line)["event"] in EVENT_NAMES
    assert not (tmp_path / "pwned").exists()


# --- an unprivileged watcher ----------------------------------------------------------------------

NOBODY = 65534
DROP = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
        "--ambient-caps=-all"]
SYSTEM_PYTHON = "/usr/bin/python3"


def copy_module(name: str, into: Path) -> None:
    """Copy an installed module or package (found where this interpreter imports it from)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        pytest.fail(f"{name} is not installed for {sys.executable}")
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        shutil.copytree(origin.parent, into / origin.parent.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(origin, into / origin.name)


@pytest.fixture
def nobody_tree() -> Iterator[Path]:
    """A world-readable copy of the package, its dependencies and the test programs, and a
    directory `nobody` may write (state, hook output)."""
    import tempfile

    tree = Path(tempfile.mkdtemp(prefix="portwatch-nobody-"))
    lib = tree / "lib"
    lib.mkdir()
    shutil.copytree(ROOT / "portwatch", lib / "portwatch", ignore=shutil.ignore_patterns("__pycache__"))
    deps = ["yaml", "structlog", "sdnotify", "pyinotify"]
    if sys.version_info >= (3, 12):
        deps.append("asyncore")  # pyasyncore, for pyinotify
    for dep in deps:
        copy_module(dep, lib)
    for program in ("listener.py", "record_event.py"):
        shutil.copy2(PROGRAMS / program, tree / program)
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    work = tree / "work"
    work.mkdir(mode=0o755)
    os.chown(work, NOBODY, NOBODY)
    yield tree
    shutil.rmtree(tree)


@pytest.mark.root
def test_unprivileged_watcher_says_what_it_cannot_see(
    nobody_tree: Path, holders: Callable[..., Holder], watchers: Callable[..., Watcher],
) -> None:
    """As `nobody` without CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH: every port is still watched; a
    root-owned squatter is reported unverified (unresolved: permission_denied, no pid) even though
    its rule would allow it, and never called disallowed; a squatter run as nobody is verified with
    its pid; one degraded event names the missing capabilities. A root watcher on the same config
    sees the first squatter is allowed."""
    need_root()
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.fail(f"{SYSTEM_PYTHON} is needed to run the daemon as nobody")
    lib, work = nobody_tree / "lib", nobody_tree / "work"
    root_port, nobody_port = free_port(), free_port()
    out = work / "hook.jsonl"
    hook = [SYSTEM_PYTHON, str(nobody_tree / "record_event.py"), str(out)]
    cfg = nobody_tree / "pw.yaml"
    cfg.write_text(
        "interval: 0.2\nhook_cooldown: 0\nreserved:\n"
        f"  - name: rootonly\n    ports: [{root_port}]\n    allow:\n      - comm: rootd\n"
        "    hooks: [record]\n"
        f"  - name: nobodyoff\n    ports: [{nobody_port}]\n    allow:\n      - user: root\n"
        f"hooks:\n  record:\n    command: {json.dumps(hook)}\n"
    )
    cfg.chmod(0o644)
    tcp = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}
    rootd = holders([{**tcp, "port": root_port}], name=b"rootd")
    env = {"PYTHONPATH": str(lib), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    d = watchers(cfg, prefix=DROP, python=SYSTEM_PYTHON, env=env, cwd="/", state_dir=work / "state")
    taken = d.wait_event("reserved_port_taken", timeout=10, port=root_port)
    assert taken["verified"] is False and taken["unresolved"] == "permission_denied"
    assert taken["pid"] is None and taken["offender_pids"] == [] and taken["socket_uid"] == 0
    assert taken["at_startup"] is True
    started = d.wait_event("portwatch_started")
    degraded = d.wait_event("degraded")
    assert "CAP_SYS_PTRACE" in degraded["missing"] and "CAP_DAC_READ_SEARCH" in degraded["missing"]
    assert degraded["denied_pids"] > 0 and "never as allowed" in degraded["reason"]
    # The hook hears the same: unverified, owner unknown, not an accusation.
    (record,) = hook_records(out, timeout=10)
    stdin = json.loads(bytes.fromhex(record["stdin"]))
    assert stdin["verified"] is False and stdin["unresolved"] == "permission_denied"
    assert bytes.fromhex(record["env"]["PORTWATCH_PID"]) == b""

    squatter = holders([{**tcp, "port": nobody_port}], name=b"squat", prefix=DROP,
                       python=SYSTEM_PYTHON, program=nobody_tree / "listener.py")
    mine = d.wait_event("reserved_port_taken", port=nobody_port)
    assert mine["verified"] is True and mine["pid"] == squatter.pid and mine["comm"] == "squat"
    assert mine["user"] == "nobody" and mine["unresolved"] is None
    # Every port is watched, whoever holds it.
    other_root = holders([tcp])
    opened = d.wait_event("listener_opened", port=other_root.port)
    assert opened["pid"] is None and opened["unresolved"] == "permission_denied" and opened["socket_uid"] == 0
    time.sleep(0.6)
    assert d.count("degraded") == 1
    assert started["socket_source"] == "netlink"
    assert d.proc.poll() is None, d.stderr

    # Control: with root's view the same config finds the first squatter allowed.
    root_view = watchers(cfg, state_dir=nobody_tree / "root-state")
    root_view.wait_event("portwatch_started", timeout=10)
    root_view.wait_event("reserved_port_taken", port=nobody_port)
    assert root_view.count("reserved_port_taken", port=root_port) == 0
    # (root may still be refused a process, e.g. PID 1 of a sandbox; it then says so, without
    # blaming capabilities it has)
    assert all("CAP_" not in e["missing"] for e in root_view.events if e["event"] == "degraded")
    assert rootd.proc.poll() is None
