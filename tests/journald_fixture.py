"""Journals for tests: a real systemd-journald in a private mount namespace, and a
plain datagram socket that decodes the native protocol.

Its fixtures are registered for every test module by tests/conftest.py (pytest_plugins).

The real journald (`journald`, session-scoped, root only) runs under
`unshare --mount`: tmpfs on /run and /var/log inside that namespace, so its
sockets and journal files never touch the host's /run/systemd/journal or
/var/log/journal. The test process stays outside and reaches both through
/proc/<pid>/root, which resolves paths in journald's mount namespace.
"""

from __future__ import annotations

import array
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

JOURNALD = "/lib/systemd/systemd-journald"

# Volatile storage in the namespace's tmpfs; no kmsg/audit import from the host, no
# forwarding anywhere, and no rate limit so a test that sends a burst sees all of it.
_JOURNALD_CONF = """\
[Journal]
Storage=volatile
ReadKMsg=no
Audit=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""

# Runs as root inside the new mount namespace, then becomes journald (same pid).
_START = """\
set -eu
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/log
mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d
cp "$1" /run/systemd/journald.conf.d/zz-portwatch-test.conf
exec /lib/systemd/systemd-journald
"""


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """Decode journald's native framing, strictly: any stray byte is an AssertionError."""
    fields: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert len(value) == size, "length prefix runs past the end"
            assert data[start + size : start + size + 1] == b"\n", "no newline after value"
            pos = start + size + 1
        fields.append((name.decode("ascii"), value))
    return fields


@dataclass
class Received:
    datagram: bytes
    fds: list[int]
    payload: bytes  # the datagram, or the memfd's content when one was passed
    seals: int | None  # F_GET_SEALS of the passed memfd


class FakeJournal:
    """An AF_UNIX datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)
        # Large enough to take a datagram the sender's buffer allows.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def receive(self) -> Received:
        import fcntl

        fds_size = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        msg, ancdata, _flags, _addr = self.sock.recvmsg(1 << 22, fds_size)
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        if not fds:
            return Received(msg, fds, msg, None)
        try:
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            size = os.fstat(fds[0]).st_size
            payload = os.pread(fds[0], size, 0)
        finally:
            for fd in fds:
                os.close(fd)
        return Received(msg, fds, payload, seals)

    def pending(self) -> bool:
        """Whether another datagram is queued (without waiting)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[FakeJournal]:
    journal = FakeJournal(tmp_path / "journal.sock")
    yield journal
    journal.close()


def field_values(entry: dict[str, Any], name: str) -> list[bytes]:
    """All values of `name` in one `journalctl -o json` entry, as bytes.

    journalctl writes a value as a string, as an array of byte numbers when it is
    not printable UTF-8, and as an array of those when the field repeats.
    """
    value = entry.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value.encode()]
    if value and all(isinstance(v, int) for v in value):
        return [bytes(value)]
    return [v.encode() if isinstance(v, str) else bytes(v) for v in value]


@dataclass
class Journald:
    pid: int
    socket: str  # the native socket, reachable from this (outer) namespace
    directory: str  # the journal directory, for `journalctl --directory=`

    def journalctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["journalctl", "--no-pager", f"--directory={self.directory}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )

    def query(self, *matches: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Entries matching `FIELD=value` matches, waiting until at least `count` are written."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.journalctl("--all", "--output=json", *matches)
            assert done.returncode in (0, 1), done.stderr  # 1: no entries yet
            entries = [json.loads(line) for line in done.stdout.splitlines() if line]
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)


def _need_root_tools() -> None:
    # These tests must fail, not skip, where they cannot run: CI runs them as root.
    if os.geteuid() != 0:
        pytest.fail("the real-journald tests need root (unshare --mount); run them as root")
    for tool in ("unshare", "journalctl", JOURNALD):
        if shutil.which(tool) is None:
            pytest.fail(f"the real-journald tests need {tool}")


def start_journald(
    workdir: Path, timeout: float = 10.0
) -> tuple[Journald, subprocess.Popen[bytes]]:
    _need_root_tools()
    conf = workdir / "journald-test.conf"
    conf.write_text(_JOURNALD_CONF)
    log = workdir / "journald.log"
    with log.open("wb") as out:
        # No --fork: unshare execs the script, which execs journald, so this pid is journald's.
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _START, "-", conf],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own log goes to our file, not the host's /dev/kmsg; no NOTIFY_SOCKET either.
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_LOG_TARGET": "console"},
        )
    root = Path(f"/proc/{proc.pid}/root")
    machine_id = Path("/etc/machine-id").read_text().strip()
    journal = Journald(
        pid=proc.pid,
        socket=str(root / "run/systemd/journal/socket"),
        directory=str(root / "run/log/journal"),
    )
    system_journal = root / "run/log/journal" / machine_id / "system.journal"
    deadline = time.monotonic() + timeout
    while not (
        _is_private_journald(proc.pid) and Path(journal.socket).exists() and system_journal.exists()
    ):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_journald(proc)
            pytest.fail(f"systemd-journald did not start: {log.read_text(errors='replace')}")
        time.sleep(0.02)
    return journal, proc


def _is_private_journald(pid: int) -> bool:
    """The pid runs journald in its own mount namespace (the host may run one of its own)."""
    proc = Path(f"/proc/{pid}")
    try:
        exe = (proc / "exe").readlink()
        namespace = (proc / "ns/mnt").readlink()
    except OSError:  # mid-exec
        return False
    return exe == Path(JOURNALD).resolve() and namespace != Path("/proc/self/ns/mnt").readlink()


def stop_journald(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    journal, proc = start_journald(tmp_path_factory.mktemp("journald"))
    try:
        yield journal
    finally:
        stop_journald(proc)
