"""The proc connector, against real processes.

Who may subscribe differs between kernels and their builds, so what the
kernel does here is probed once per run (tests/programs/connector_probe.py)
and portwatch is checked against that, never against a version number.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portwatch.procconn import ProcConnector, parse_event
from tests.conftest import AS_NOBODY, DaemonProcess, Holder, no_netlink, python_for_nobody, run_python

Event = tuple[str, int]


@pytest.fixture
def conn(kernel_connector: dict[str, str]) -> Iterator[ProcConnector]:
    if kernel_connector["root"] != "events":  # test_open_does_what_the_kernel_allows checks that case
        pytest.skip(f"this kernel gives root no process events ({kernel_connector['root']})")
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


@pytest.mark.root
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


@pytest.mark.root
def test_a_fork_wakes_the_reader(conn: ProcConnector) -> None:
    """The socket becomes readable for a fork (collect waits on it in a selector)."""
    conn.read_events()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    seen = collect(conn, {("fork", pid)})
    os.waitpid(pid, 0)
    assert ("fork", pid) in seen


@pytest.mark.root
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


@pytest.mark.root
def test_read_events_never_blocks(conn: ProcConnector) -> None:
    """The socket is non-blocking, so read_events returns what is there, [] when nothing is."""
    assert not os.get_blocking(conn.fileno())
    for _ in range(3):  # whatever the host is doing meanwhile, each call returns
        assert isinstance(conn.read_events(), list)


@pytest.mark.root
def test_close_twice(conn: ProcConnector) -> None:
    conn.close()
    conn.close()
    assert conn.fileno() == -1


# Opens the connector the way the daemon does, forks, and says what happened: "events",
# "no events", "timeout" (TimeoutError) or "errno ENAME" (any other OSError).
_PROBE = r"""
import errno, os, selectors, sys, time
from portwatch.procconn import ProcConnector
try:
    pc = ProcConnector.open()
except TimeoutError:
    sys.exit(print("timeout"))
except OSError as exc:
    assert str(exc), "an error that says nothing"
    sys.exit(print("errno", errno.errorcode[exc.errno]))
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

# Where the kernel's answer differs between machines: who may subscribe, and from which namespace.
CONTEXTS = {
    "root": [],
    "nobody": list(AS_NOBODY),
    "pid namespace": ["unshare", "--pid", "--fork", "--kill-child=SIGTERM"],  # passes a stop on
    "user namespace": ["unshare", "--user", "--map-root-user"],
    "network namespace": ["unshare", "--net"],
}


def expected_from(kernel: str) -> str:
    """What ProcConnector.open must make of what the kernel did (connector_probe.py's words)."""
    if kernel == "events":
        return "events"
    if kernel == "ack, no events":
        return "no events"
    if kernel == "no ack":
        return "timeout"  # never hand out pids the kernel did not promise
    return "errno " + kernel.rsplit(" ", 1)[-1]  # the kernel's errno, whichever step gave it


def run_in(context: str, tree: Path, *argv: str) -> subprocess.Popen[str]:
    python = python_for_nobody() if context == "nobody" else sys.executable
    return subprocess.Popen(
        [*CONTEXTS[context], python, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/", env={"PYTHONPATH": str(tree), "PATH": os.environ["PATH"]},
    )


def outcomes(started: dict[str, subprocess.Popen[str]]) -> dict[str, str]:
    found = {}
    for context, child in started.items():
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, f"{context}: {err}"
        found[context] = out.strip()
    return found


@pytest.fixture(scope="session")
def kernel_connector(readable_tree: Path) -> dict[str, str]:
    """What the kernel does in each context, probed once per run by a client independent of portwatch."""
    probe = str(readable_tree / "programs" / "connector_probe.py")
    return outcomes({context: run_in(context, readable_tree, probe) for context in CONTEXTS})


@pytest.mark.root
def test_open_does_what_the_kernel_allows(readable_tree: Path, kernel_connector: dict[str, str]) -> None:
    """As root, as nobody, and in a child pid, user and network namespace: events where the
    kernel delivers them; where it does not, the kernel's own error (EPERM, ECONNREFUSED, ...)
    or TimeoutError for a subscription it never acknowledged, and never pids it did not promise."""
    found = outcomes({context: run_in(context, readable_tree, "-c", _PROBE) for context in CONTEXTS})
    expected = {context: expected_from(kernel) for context, kernel in kernel_connector.items()}
    assert found == expected, f"kernel said {kernel_connector}"


@pytest.mark.root
@pytest.mark.parametrize("context", ["root", "nobody", "pid namespace", "user namespace"])
def test_the_daemon_uses_events_where_the_kernel_gives_them(
    context: str, kernel_connector: dict[str, str], readable_tree: Path, nobody_work: Path,
    daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    """`portwatch run` says proc_events: true exactly where the kernel delivers events here;
    elsewhere it polls, says why in proc_events_unavailable, and logs no error; either way it
    reports a new listener."""
    config = nobody_work / "pw.yaml"
    config.write_text("interval: 0.2\n")
    config.chmod(0o644)
    python = python_for_nobody() if context == "nobody" else sys.executable
    env = {"PYTHONPATH": str(readable_tree), "PATH": os.environ["PATH"]}
    d = daemons(config, prefix=CONTEXTS[context], python=python, env=env, cwd="/",
                state_dir=nobody_work / "state")
    started = d.wait_event("portwatch_started", timeout=10)
    if kernel_connector[context] == "events":
        assert (started["proc_events"], started.get("proc_events_unavailable")) == (True, None)
    else:
        assert started["proc_events"] is False and started["proc_events_unavailable"]
    holder = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1"}])
    d.wait_event("listener_opened", port=holder.port)
    assert [e for e in d.events if e["level"] == "error"] == []


def test_unavailable_when_netlink_is_forbidden() -> None:
    """Under a RestrictAddressFamilies-like seccomp filter open() raises OSError(EAFNOSUPPORT)."""
    result = run_python(_PROBE, prefix=no_netlink())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "errno EAFNOSUPPORT"


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
