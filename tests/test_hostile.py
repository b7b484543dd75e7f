"""Hostile processes against the real daemon and CLI: names, argv and executables built to forge
log lines and journal fields, reach a terminal raw, or get run by a shell.

What test_daemon.py and test_cli.py already cover (JSON lines, tables, console through a pipe)
is not repeated. Here: the journal path against a real journald, a real TTY (pty), command lines
of 4 KB and more, and an executable whose own path is hostile.
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    AS_NOBODY,
    EVENT_NAMES,
    PROGRAMS,
    ROOT,
    DaemonProcess,
    Holder,
    clean_env,
    free_port,
    hook_records,
    in_mount_namespace_of,
    python_for_nobody,
)
from tests.journald_fixture import Journald, field_values

RECORDER = PROGRAMS / "record_event.py"
Event = dict[str, Any]

# 14 bytes (comm keeps 15): a newline, a would-be journal field, an escape.
FORGING_COMM = b"x\nMESSAGE=pwn\x1b"
# 15 bytes: CSI colour, a C1 CSI (U+009B as UTF-8), a newline and shell syntax.
TTY_COMM = b"ev\x1b[31m\xc2\x9b\n$(id)"
# Raw bytes a terminal would act on, or that would start a new line or reorder text.
RAW_CONTROLS = [b"\x1b", b"\x07", b"\xc2\x9b", b"\xe2\x80\xae", b"\xe2\x80\xa8", b"\xc2\x85", b"\xff"]


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


# --- the journal path -----------------------------------------------------------------------------


def daemon_entries(journal: Journald, pid: int, *matches: str, count: int = 1) -> list[dict[str, Any]]:
    return journal.query(f"_PID={pid}", *matches, count=count)


@pytest.mark.root
def test_journal_one_entry_per_event_with_exact_bytes(
    tmp_path: Path, journald: Journald, holders: Callable[..., Holder],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """--log-format journal against a real journald: each event is one entry; PORTWATCH_COMM and
    PORTWATCH_CMDLINE carry the exact bytes; the name forges no field, no PRIORITY and no
    MESSAGE_ID; MESSAGE holds no control character; nothing reaches stdout; no shell ran."""
    marker = tmp_path / "pwned"
    port = free_port()
    out = tmp_path / "hook.jsonl"
    cfg = guarded_config(tmp_path / "pw.yaml", port, out)
    # journald's /run exists only in its mount namespace: run the daemon there, as under systemd.
    d = daemons(cfg, fmt="journal", prefix=in_mount_namespace_of(journald.pid))
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
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    """A 64 KB command line made of 4 KB arguments full of newlines, escapes and invalid UTF-8, run
    from an executable whose path holds a newline: one JSON line per event with the exact strings,
    and the hook gets the exact bytes (PORTWATCH_EXE whole, the event on stdin whole)."""
    port = free_port()
    out = tmp_path / "hook.jsonl"
    d = daemons(guarded_config(tmp_path / "pw.yaml", port, out))
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

@pytest.mark.root
def test_unprivileged_watcher_says_what_it_cannot_see(
    readable_tree: Path, nobody_work: Path, holders: Callable[..., Holder],
    daemons: Callable[..., DaemonProcess],
) -> None:
    """As `nobody` without CAP_SYS_PTRACE/CAP_DAC_READ_SEARCH: every port is still watched; a
    root-owned squatter is reported unverified (unresolved: permission_denied, no pid) even though
    its rule would allow it, and never called disallowed; a squatter run as nobody is verified with
    its pid; one degraded event names the missing capabilities. A root watcher on the same config
    sees the first squatter is allowed."""
    python, work = python_for_nobody(), nobody_work
    root_port, nobody_port = free_port(), free_port()
    out = work / "hook.jsonl"
    hook = [python, str(readable_tree / "programs" / "record_event.py"), str(out)]
    cfg = work / "pw.yaml"
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
    env = {"PYTHONPATH": str(readable_tree), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    d = daemons(cfg, prefix=AS_NOBODY, python=python, env=env, cwd="/", state_dir=work / "state")
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

    squatter = holders([{**tcp, "port": nobody_port}], name=b"squat", prefix=AS_NOBODY,
                       python=python, program=readable_tree / "programs" / "listener.py")
    mine = d.wait_event("reserved_port_taken", port=nobody_port)
    assert mine["verified"] is True and mine["pid"] == squatter.pid and mine["comm"] == "squat"
    assert mine["user"] == "nobody" and mine["unresolved"] is None
    # Every port is watched, whoever holds it.
    other_root = holders([tcp])
    opened = d.wait_event("listener_opened", port=other_root.port)
    assert opened["pid"] is None and opened["unresolved"] == "permission_denied" and opened["socket_uid"] == 0
    time.sleep(0.6)
    said = [e["reason"] for e in d.events if e["event"] == "degraded"]
    assert sum("could not be inspected" in reason for reason in said) == 1, said
    assert started["socket_source"] == "netlink"
    assert d.proc.poll() is None, d.stderr

    # Control: with root's view the same config finds the first squatter allowed.
    root_view = daemons(cfg, state_dir=work / "root-state")
    root_view.wait_event("portwatch_started", timeout=10)
    root_view.wait_event("reserved_port_taken", port=nobody_port)
    assert root_view.count("reserved_port_taken", port=root_port) == 0
    # (root may still be refused a process, e.g. PID 1 of a sandbox; it then says so, without
    # telling root to become root or to grant what it holds)
    assert root_view.stop() == 0
    for e in root_view.events:
        if e["event"] == "degraded":
            assert "run as root" not in e["missing"] and "grant" not in e["missing"], e
    assert rootd.proc.poll() is None
