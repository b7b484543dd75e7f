"""The proc connector, against real processes.

What the kernel does here was checked on Linux 6.18 (see procconn's
docstring): any user may listen since 6.6, and a listener in another pid or
user namespace gets no acknowledgement.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portwatch.procconn import ProcConnector, parse_event
from tests.conftest import ROOT
from tests.test_sockdiag import SECCOMP_NO_NETLINK

Event = tuple[str, int]


@pytest.fixture
def conn() -> Iterator[ProcConnector]:
    pc = ProcConnector.open()
    yield pc
    pc.close()


def collect(pc: ProcConnector, done: set[Event], timeout: float = 3.0) -> list[Event]:
    """Read events until every one in `done` was seen (or the timeout passes)."""
    seen: list[Event] = []
    with selectors.DefaultSelector() as sel:
        sel.register(pc, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not done <= set(seen) and (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                seen += pc.read_events()
    return seen


# Starts a thread (not a process: must not be reported) and forks a child
# that exits at once; prints their ids.
_CHILD = r"""
import json, os, threading
ready = threading.Event()
tid = []
def run():
    tid.append(threading.get_native_id()); ready.set()
t = threading.Thread(target=run); t.start(); ready.wait(); t.join()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"grandchild": pid, "thread": tid[0]}))
"""


def test_fork_exec_exit_of_real_processes(conn: ProcConnector) -> None:
    conn.read_events()  # drop what came before
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=10)
    ids = json.loads(out)
    grand, thread = ids["grandchild"], ids["thread"]
    want = {
        ("fork", child.pid),
        ("exec", child.pid),
        ("fork", grand),
        ("exit", grand),
        ("exit", child.pid),
    }
    seen = collect(conn, want)
    assert want <= set(seen)
    assert seen.index(("fork", child.pid)) < seen.index(("exec", child.pid))
    assert seen.index(("exec", child.pid)) < seen.index(("fork", grand))
    assert seen.index(("exit", grand)) < seen.index(("exit", child.pid))
    assert all(pid != thread for _, pid in seen), "thread start/exit is not a process event"
    assert {kind for kind, _ in seen} <= {"fork", "exec", "exit"}


def test_fork_is_seen_within_a_second(conn: ProcConnector) -> None:
    conn.read_events()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    seen = collect(conn, {("fork", pid)}, timeout=1.0)
    elapsed = time.monotonic() - start
    os.waitpid(pid, 0)
    assert ("fork", pid) in seen
    assert elapsed < 1.0


def test_overrun_is_reported_then_events_resume(conn: ProcConnector) -> None:
    # The smallest receive buffer holds a couple of events; 40 events overflow it.
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    assert conn.read_events() == [("overrun", 0)]
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    seen = collect(conn, {("fork", pid), ("exit", pid)})
    assert ("overrun", 0) not in seen
    assert {("fork", pid), ("exit", pid)} <= set(seen)


def test_read_events_never_blocks(conn: ProcConnector) -> None:
    conn.read_events()
    start = time.monotonic()
    for _ in range(20):
        conn.read_events()
    assert time.monotonic() - start < 0.5


def test_close_twice() -> None:
    pc = ProcConnector.open()
    pc.close()
    pc.close()
    assert pc.fileno() == -1


def _kernel_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


# Opens the connector, forks, and reports whether the fork was seen.
_PROBE = r"""
import os, selectors, sys, time
from portwatch.procconn import ProcConnector
try:
    pc = ProcConnector.open()
except OSError as exc:
    print(type(exc).__name__, exc.errno)
    sys.exit()
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
sel = selectors.DefaultSelector()
sel.register(pc, selectors.EVENT_READ)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    if sel.select(0.1) and ("fork", pid) in pc.read_events():
        print("events")
        break
else:
    print("no events")
pc.close()
"""


@pytest.mark.root
def test_unprivileged_user(readable_tree: Path) -> None:
    """Without any capability: events since Linux 6.6, PermissionError before."""
    assert os.geteuid() == 0, "this test drops privileges with setpriv and must start as root"
    drop = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]
    result = subprocess.run(
        [*drop, _python_for_nobody(), "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
        env={"PYTHONPATH": str(readable_tree), "PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result.stderr
    expected = "events" if _kernel_at_least(6, 6) else "PermissionError 1"
    assert result.stdout.strip() == expected


@pytest.mark.root
def test_refused_outside_the_initial_namespaces() -> None:
    """In a child pid or user namespace open() fails (TimeoutError) instead of giving host pids."""
    assert os.geteuid() == 0, "unshare needs root"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen([*unshare, sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True, env=env)
        for unshare in (["unshare", "--pid", "--fork"], ["unshare", "--user", "--map-root-user"])
    ]
    for child in children:
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        assert out.strip() == "TimeoutError 110"


def test_unavailable_when_netlink_is_forbidden() -> None:
    """Under a RestrictAddressFamilies-like seccomp filter open() raises OSError(EAFNOSUPPORT)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"seccomp test knows x86_64 and aarch64 syscalls, not {platform.machine()}")
    result = subprocess.run(
        [sys.executable, "-c", SECCOMP_NO_NETLINK, _PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OSError 97"


def _message(what: int, a: int, b: int, *, c: int = 0, d: int = 0, idx: int = 1) -> bytes:
    """A connector message as the kernel sends it (nlmsghdr, cn_msg, proc_event)."""
    event = struct.pack("=IIQiiiiii", what, 0, 0, a, b, c, d, 0, 0)
    cn_msg = struct.pack("=IIIIHH", idx, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn_msg), 3, 0, 0, 0) + cn_msg


def test_parse_event() -> None:
    assert parse_event(_message(0x1, 10, 10, c=11, d=11)) == ("fork", 11)
    assert parse_event(_message(0x1, 10, 10, c=12, d=11)) is None  # a new thread of 11
    assert parse_event(_message(0x2, 11, 11)) == ("exec", 11)
    assert parse_event(_message(0x80000000, 11, 11)) == ("exit", 11)
    assert parse_event(_message(0x80000000, 12, 11)) is None  # a thread of 11 ended
    assert parse_event(_message(0x200, 11, 11)) is None  # comm change
    assert parse_event(_message(0x0, 0, 0)) is None  # an acknowledgement
    assert parse_event(_message(0x1, 10, 10, c=11, d=11, idx=2)) is None  # another connector
    assert parse_event(_message(0x1, 10, 10, c=11, d=11)[:50]) is None  # truncated


def _python_for_nobody() -> str:
    """An interpreter user 65534 can run (a pyenv under /root is not one)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        path = Path(candidate)
        if all(p.stat().st_mode & 0o001 for p in [path, *path.parents]):
            return str(path)
    pytest.fail("no Python interpreter that user 65534 may run")


@pytest.fixture
def readable_tree() -> Iterator[Path]:
    """A copy of the package that user 65534 can read."""
    tree = Path(tempfile.mkdtemp(prefix="portwatch-procconn-"))
    shutil.copytree(ROOT / "portwatch", tree / "portwatch", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield tree
    shutil.rmtree(tree)
