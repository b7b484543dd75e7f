"""The shared test harness: real listener processes, free ports, other users, a CLI runner."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

# The journald and systemd sandboxes' fixtures, for the tests that ask for them by name.
pytest_plugins = ["tests.journald_fixture", "tests.systemd_sandbox"]

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"

Event = dict[str, Any]
# Every event portwatch emits: the product's interface, as the README's table lists it.
EVENT_NAMES = frozenset({
    "portwatch_started", "portwatch_stopping", "listener_opened", "listener_closed", "owner_changed",
    "reserved_port_taken", "port_conflict", "hook_finished", "hook_failed", "hook_suppressed", "hook_dropped",
    "config_reloaded", "config_rejected", "degraded", "state_restored", "state_reset", "scan_failed",
    "scan_recovered",
})
T = TypeVar("T")
NOBODY = 65534
# Runs a command as nobody with no capability at all (setpriv execs it: the pid stays).
AS_NOBODY = (
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
    "--bounding-set=-all",
)


# Runs "$@" with its own socket tables masked the way a container runtime masks /proc paths: in a
# private mount namespace /proc/<pid>/net becomes a tmpfs, the tables in $KEEP are bound back from
# the real directory (bound at $SAVED first), those in $UNREADABLE are empty files of mode 000, the
# rest are missing. Root then loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH so that mode 000 holds
# for it too. sh, setpriv and the command are one process (exec): the pid the mounts name.
MASK_NET_TABLES = r"""
set -e
mount --make-rprivate /
mount --bind "/proc/$$/net" "$SAVED"
mount -t tmpfs -o mode=755 tmpfs "/proc/$$/net"
for table in $KEEP; do touch "/proc/$$/net/$table"; mount --bind "$SAVED/$table" "/proc/$$/net/$table"; done
for table in $UNREADABLE; do touch "/proc/$$/net/$table"; chmod 000 "/proc/$$/net/$table"; done
exec setpriv --bounding-set=-dac_override,-dac_read_search "$@"
"""
TABLES = ("tcp", "tcp6", "udp", "udp6")


def masked_net_tables(saved: Path, *, missing: Sequence[str] = (), unreadable: Sequence[str] = ()) -> list[str]:
    """A prefix that runs a command with the socket tables given missing or unreadable (as root)."""
    saved.mkdir(exist_ok=True)
    keep = [t for t in TABLES if t not in missing and t not in unreadable]
    env = [f"SAVED={saved}", f"KEEP={' '.join(keep)}", f"UNREADABLE={' '.join(unreadable)}"]
    return ["unshare", "--mount", "env", *env, "sh", "-c", MASK_NET_TABLES, "sh"]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `root` fails, never skips, without root: CI runs the suite as root."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (namespaces, setpriv, other users): run the suite as root")


def in_mount_namespace_of(pid: int) -> list[str]:
    """A prefix that runs a command in `pid`'s mount namespace, in this checkout (setns to a mount
    namespace moves the working directory to its root)."""
    return ["nsenter", f"--target={pid}", "--mount", f"--wd={ROOT}", "--"]


def reserved_config(path: Path, rules: list[tuple[str, list[int], list[str]]],
                    hooks: dict[str, tuple[list[str], float]], *, interval: float = 0.2,
                    extra: str = "") -> Path:
    """A config with one rule per (name, ports, hook names) and the given hooks (argv, timeout)."""
    text = f"interval: {interval}\nhook_cooldown: 0\n{extra}reserved:\n"
    for name, ports, hook_names in rules:
        text += f"  - name: {name}\n    ports: {json.dumps(ports)}\n    hooks: {json.dumps(hook_names)}\n"
    if hooks:
        text += "hooks:\n"
        for name, (argv, timeout) in hooks.items():
            text += f"  {name}:\n    command: {json.dumps(argv)}\n    timeout: {timeout}\n"
    path.write_text(text)
    return path


def no_netlink() -> list[str]:
    """A prefix that runs a command with AF_NETLINK refused, as RestrictAddressFamilies= does."""
    machine = os.uname().machine
    if machine not in ("x86_64", "aarch64"):
        pytest.skip(f"tests/programs/no_netlink.py knows x86_64 and aarch64 syscalls, not {machine}")
    return [sys.executable, str(PROGRAMS / "no_netlink.py")]


def run_python(code: str, *args: str, prefix: Sequence[str] = (), timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
    """`python -c CODE ARGS` (through `prefix`) with this checkout importable; both streams kept."""
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def free_port(taken: Sequence[int] = ()) -> int:
    """A port free for TCP and UDP on 127.0.0.1 and ::1, below the ephemeral range, so that no
    socket bound to port 0 meanwhile (by the host's programs or other tests) can land on it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = 10000 if low > 12000 else 1024
    for _ in range(1000):
        port = first + secrets.randbelow(max(1, low - first))
        if port in taken:
            continue
        try:
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(family, kind) as s:
                        s.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError("no free port below the ephemeral range")


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        ports.append(free_port(ports))
    return ports


def wait_exited(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` has exited (gone, or a zombie not yet reaped); False after `timeout`.

    Waits for the exit itself (a pidfd becomes readable then), not for a guess
    at how long a kill takes to land.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def read_pids(path: Path, timeout: float = 10.0) -> list[int]:
    """The pids a test program wrote to `path`, once it has."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.01)
    return [int(pid) for pid in path.read_text().split()]


def hook_records(path: Path, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The events record_event.py wrote to `path`, once it holds `count` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
        time.sleep(0.05)
    raise AssertionError(f"the hook did not run {count} time(s) within {timeout}s")


def python_for_nobody() -> str:
    """An interpreter user nobody can run (the pyenv ones live under /root, mode 0700)."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        path = Path(candidate)
        if all(p.stat().st_mode & 0o001 for p in [path, *path.parents]):
            return str(path)
    pytest.fail("no Python interpreter that user nobody may run")


@pytest.fixture
def nobody_work() -> Iterator[Path]:
    """A directory user nobody may write (a config, state, hook output), outside the checkout."""
    work = Path(tempfile.mkdtemp(prefix="portwatch-nobody-"))
    work.chmod(0o755)
    os.chown(work, NOBODY, NOBODY)
    yield work
    shutil.rmtree(work)


@pytest.fixture(scope="session")
def readable_tree() -> Iterator[Path]:
    """A copy of the package, its dependencies and tests/programs that user nobody can read (put
    it on PYTHONPATH): the checkout may sit in a directory only root can enter (a CI runner's)."""
    tree = Path(tempfile.mkdtemp(prefix="portwatch-readable-"))
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "portwatch", tree / "portwatch", ignore=ignore)
    shutil.copytree(PROGRAMS, tree / "programs", ignore=ignore)
    deps = ["yaml", "structlog", "sdnotify", "pyinotify"]
    if sys.version_info >= (3, 12):
        deps.append("asyncore")  # pyasyncore, for pyinotify
    for dep in deps:
        spec = importlib.util.find_spec(dep)
        if spec is None or spec.origin is None:
            pytest.fail(f"{dep} is not installed for {sys.executable}")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            shutil.copytree(origin.parent, tree / origin.parent.name, ignore=ignore)
        else:
            shutil.copy2(origin, tree / origin.name)
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield tree
    shutil.rmtree(tree)


@dataclass
class Holder:
    """A running listener.py process and what it reported."""

    proc: subprocess.Popen[str]
    pid: int
    children: list[int]
    sockets: list[dict[str, int]]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.sockets[0]["port"]

    @property
    def inode(self) -> int:
        return self.sockets[0]["inode"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for child in self.children:  # forked workers we started; reap-safe kill by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def start_holder(
    sockets: list[dict[str, Any]],
    *,
    name: bytes | None = None,
    fork: int = 0,
    argv_extra: list[bytes] | None = None,
    prefix: list[str] | None = None,
    python: str = sys.executable,
    program: Path = PROGRAMS / "listener.py",
) -> Holder:
    spec = {"sockets": sockets, "fork": fork, "name_hex": name.hex() if name is not None else None}
    argv: list[Any] = [*(prefix or []), python, str(program), json.dumps(spec)]
    argv += argv_extra or []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise RuntimeError(f"listener.py failed to start: {argv!r}")
    info = json.loads(line)
    return Holder(proc, info["pid"], info["children"], info["sockets"], spec)


@pytest.fixture
def holders() -> Iterator[Callable[..., Holder]]:
    """Start listener processes; every one is stopped at the end of the test."""
    started: list[Holder] = []

    def start(sockets: list[dict[str, Any]], **kw: Any) -> Holder:
        holder = start_holder(sockets, **kw)
        started.append(holder)
        return holder

    yield start
    for holder in started:
        holder.stop()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run `python -m portwatch ARGS` as a user would (through `prefix`), capturing both streams."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "portwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without systemd's stream marker (auto would pick the journal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env.update(extra)
    return env


class DaemonProcess:
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

    def started(self, timeout: float = 10.0) -> Event:
        return self.wait_event("portwatch_started", timeout)

    def mark(self) -> int:
        """A position in the event list; `since=` it waits only for later events."""
        with self._cond:
            return len(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0, since: int = 0) -> Event:
        """The first event from position `since` matching `predicate`; fails after `timeout` seconds."""
        return self._wait(lambda: next((e for e in self.events[since:] if predicate(e)), None), timeout,
                          lambda: f"no matching event; saw {[e.get('event') for e in self.events]}")

    def wait_line(self, part: bytes, timeout: float = 10.0) -> bytes:
        """The first raw stdout line holding `part` (for formats other than JSON)."""
        return self._wait(lambda: next((line for line in self.lines if part in line), None), timeout,
                          lambda: f"no line with {part!r}; saw {self.lines[-20:]}")

    def _wait(self, find: Callable[[], T | None], timeout: float, failure: Callable[[], str]) -> T:
        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := find()) is None:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._threads[0].is_alive()):
                    raise AssertionError(f"{failure()} within {timeout}s; stderr: {self.stderr[-2000:]!r}")
                self._cond.wait(min(left, 0.1))
            return found

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
        for thread, stream in zip(self._threads, (self.proc.stdout, self.proc.stderr), strict=True):
            # A reader still blocked (a process the prefix left behind holds the pipe) holds the
            # stream's lock: closing would wait for it forever. Fail instead.
            assert not thread.is_alive(), f"something still holds the output of {self.argv}"
            if stream is not None:
                stream.close()
        return self.proc.returncode


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    """Start `portwatch run` processes; every one is stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config: Path, *extra: str, **kw: Any) -> DaemonProcess:
        w = DaemonProcess(config, *extra, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
