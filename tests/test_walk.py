"""The one-shot views' walk of /proc, shared with forked helpers, and the early start of it.

Real processes hold real sockets; helpers are real forks. A "crowd" of idle
processes makes the host busy enough for the default rule to fork helpers.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portwatch.model import Proto
from portwatch.proc import ProcFS
from portwatch.procfs import ProcParseError
from portwatch.scan import SocketLister, Source, full_scan
from portwatch.walk import MIN_PIDS_PER_HELPER, Walk, walk_holders
from tests.conftest import PROGRAMS, ROOT, Holder, free_port

TCP4 = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}


@pytest.fixture
def crowd() -> Iterator[None]:
    """Enough idle processes that `portwatch list` on this host forks walk helpers."""
    proc = subprocess.Popen([sys.executable, str(PROGRAMS / "crowd.py"), str(2 * MIN_PIDS_PER_HELPER)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    yield
    assert proc.stdin is not None
    proc.stdin.close()  # it ends its children and itself
    proc.wait(30)
    proc.stdout.close()


def _wait_until_empty(walk: Walk) -> None:
    """Until the helpers have taken every pid from the queue (each takes under a millisecond)."""
    assert walk._queue is not None
    deadline = time.monotonic() + 10
    while struct.unpack("i", fcntl.ioctl(walk._queue, termios.FIONREAD, b"\0" * 4))[0]:
        assert time.monotonic() < deadline, "the helpers did not drain the queue"
        time.sleep(0.01)


def test_a_helper_answers_what_a_serial_walk_finds(holders: Callable[..., Holder]) -> None:
    """When the helper takes every pid (this process waits until the queue is empty), its answer
    alone gives every holder of the wanted sockets, equal to a walk done here."""
    server = holders([TCP4, {**TCP4, "proto": "udp"}], fork=2)
    inodes = {s["inode"] for s in server.sockets}
    pids = [server.pid, *server.children, os.getpid()]
    walk = Walk("/proc", workers=2, pids=pids)
    assert len(walk._helpers) == 1
    _wait_until_empty(walk)
    result = walk.finish(ProcFS(), inodes)
    assert result.holders == {inode: {server.pid, *server.children} for inode in inodes}
    assert result.holders == walk_holders("/proc", inodes, pids).holders
    assert set(result.processes) == {server.pid, *server.children}
    assert result.processes[server.pid].cmdline[-1].startswith("{")  # listener.py's JSON spec


def test_a_helper_that_dies_leaves_the_walk_complete(holders: Callable[..., Holder]) -> None:
    """A helper killed mid-walk: the pids it took are walked again here, nothing is lost."""
    server = holders([TCP4], fork=3)
    pids = [server.pid, *server.children]
    walk = Walk("/proc", workers=2, pids=pids)
    os.kill(walk._helpers[0].pid, signal.SIGKILL)  # our own fork
    result = walk.finish(ProcFS(), {server.inode})
    assert result.holders == {server.inode: set(pids)}
    assert not walk._helpers


def test_the_helpers_are_not_named_as_holders_of_the_walkers_sockets() -> None:
    """A process walking with helpers while it holds a listener (`portwatch who` run with an
    inherited socket): the helpers, forked with copies of its fds, are not owners."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        inode = os.fstat(sock.fileno()).st_ino
        walk = Walk("/proc", workers=3)
        assert len(walk._helpers) == 2
        result = walk.finish(ProcFS(), {inode})
    assert result.holders == {inode: {os.getpid()}}


def test_abandon_ends_and_reaps_the_helpers() -> None:
    walk = Walk("/proc", workers=4)
    helpers = [h.pid for h in walk._helpers]
    assert len(helpers) == 3
    walk.abandon()
    for pid in helpers:
        with pytest.raises(ChildProcessError):  # reaped already: no longer a child of ours
            os.waitpid(pid, os.WNOHANG)
    walk.abandon()  # twice is harmless


def test_two_walks_at_once_both_finish() -> None:
    """A helper of the second walk does not keep the first one's pipes open (which would leave
    the first walk's helper waiting for end-of-file forever)."""
    def too_long(_signum: int, _frame: object) -> None:
        raise TimeoutError("a walk did not finish")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(30)
    try:
        first, second = Walk("/proc", workers=2), Walk("/proc", workers=2)
        assert first._helpers and second._helpers
        procfs = ProcFS()
        first.finish(procfs, set())
        second.finish(procfs, set())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_failed_listing_leaves_no_helper(tmp_path: Path) -> None:
    """full_scan starts its walk, then the socket table turns out unreadable: the error
    propagates and the helpers already walking are ended and reaped."""
    for pid in range(1, 9):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "fd" / "3").symlink_to("socket:[1234]")
    (tmp_path / "self" / "net").mkdir(parents=True)
    (tmp_path / "self" / "net" / "tcp").write_text("  sl  local_address rem_address\n   0: garbage\n")
    procfs = ProcFS(str(tmp_path))
    children = set(_children())
    with pytest.raises(ProcParseError):
        full_scan(procfs, SocketLister(procfs, Source.PROC), (Proto.TCP,), (4,), workers=3)
    assert set(_children()) == children


def _children() -> list[str]:
    found = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found += f.read().split()
    return found


# A wrapper that becomes the subreaper of what it runs, so a helper the command leaves
# behind becomes its child; it prints the exit status and how many such children it has.
SUBREAPER = r"""
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
cmd = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE if sys.argv[1] == "read" else subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
if sys.argv[1] == "read":
    cmd.stdout.read(10)
    cmd.stdout.close()  # the reader leaves early: `portwatch list | head -c 10`
status = cmd.wait()
# A helper orphaned by the command's exit was made our child before that exit could be waited for.
left = [pid for task in os.listdir("/proc/self/task")
        for pid in open(f"/proc/self/task/{task}/children").read().split()]
print(status, len(left))
"""


@pytest.mark.parametrize(
    ("mode", "args", "status"),
    [
        ("devnull", ["list"], 0),
        ("devnull", ["list", "--bogus"], 2),
        ("devnull", ["list", "--help"], 0),
        ("devnull", ["who", str(free_port())], 1),
    ],
)
def test_the_command_leaves_no_helper_behind(crowd: None, mode: str, args: list[str], status: int) -> None:
    """`portwatch list` and `who` start walking before parsing their arguments; whatever the
    arguments turn out to be (an error, --help, a reader that leaves), no helper outlives them."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: `portwatch list` walks alone, there is no helper to leave behind")
    probe = Walk("/proc")
    assert probe._helpers, "the crowd should make this host busy enough to fork helpers"
    probe.abandon()
    out = subprocess.run([sys.executable, "-c", SUBREAPER, mode, sys.executable, "-m", "portwatch", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    assert out.stdout.split() == [str(status), "0"]


def test_list_with_early_helpers_names_every_holder(crowd: None, holders: Callable[..., Holder]) -> None:
    """On a busy host, `portwatch list` (helpers forked before its start-up) finds every
    holder of a socket shared by four processes."""
    server = holders([TCP4], fork=3)
    out = subprocess.run([sys.executable, "-m", "portwatch", "list", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    mine = [x for x in json.loads(out.stdout) if x["inode"] == server.inode]
    assert [sorted(p["pid"] for p in x["processes"]) for x in mine] == [sorted([server.pid, *server.children])]
