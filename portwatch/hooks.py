"""Running hook programs: argv only, bounded in number, time and output.

A hook is an argv list run when a reserved port is taken or a service could
not bind its port (port_conflict). Contract for hook
authors (the values are chosen by whoever started the offending process, so
they are untrusted data, never code):

- Never run through a shell. Data arrives in `PORTWATCH_EVENT`, `_RULE`,
  `_PROTO`, `_ADDRESS`, `_PORT`, `_PID`, `_COMM`, `_EXE`, `_USER`, `_UNIT`, and
  for a conflict `_BLOCKED_UNIT`, `_BLOCKED_PID` (empty when unknown). Shell
  scripts must quote them: `"$PORTWATCH_COMM"`.
  A value holds the exact bytes of the process's name, except that a NUL
  (impossible in an environment) becomes a space, and it is cut at 4096 bytes.
- stdin holds the event as one line of JSON. It is pure ASCII: bytes that
  were not UTF-8 appear as `\\udcXX` escapes (PEP 383), so Python gets them
  back with `json.loads(...)` and `.encode("utf-8", "surrogateescape")`.
- The working directory is `/`. The hook gets its own session and process
  group; at its timeout, and after it exits, whatever is left in that group is
  killed. A grandchild that calls setsid() escapes that (systemd still kills it
  at service stop) and is never waited for.
- No systemd plumbing is inherited (`NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_*`,
  `JOURNAL_STREAM`, `INVOCATION_ID`) and no capabilities: worker threads clear
  their ambient set, and when the daemon runs as root each hook is started via
  `/usr/bin/setpriv` with empty inheritable, ambient and bounding sets and
  no_new_privs, so it keeps uid 0 but no capabilities. (Without setpriv a root
  daemon's hooks keep root's capabilities.) Under setpriv, glibc's execvp runs
  an executable file with no `#!` line through /bin/sh, where an unwrapped
  spawn reports "permission denied".

Outcomes are reported through `emit` as `hook_finished`, `hook_failed`,
`hook_suppressed` and `hook_dropped`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from portwatch.libc import drop_ambient_capabilities, punch_hole
from portwatch.text import decode, encode

Emit = Callable[[str, dict[str, Any]], None]

OUTPUT_TAIL = 4096  # bytes of hook output kept for hook_failed
ENV_VALUE_LIMIT = 4096  # bytes per PORTWATCH_* value
KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL

_TICK = 0.1  # a waiting worker wakes this often to trim output and notice close()
_FLOOD_TICK = 0.01  # ... and this often while the hook floods its output
_DISK_LIMIT = 1 << 20  # output bytes allowed on disk before the old part is punched out
_DISK_KEEP = 64 << 10  # bytes left before the end when punching

_SCRUBBED = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
    }
)
_EVENT_VARS = (
    ("PORTWATCH_EVENT", "event"),
    ("PORTWATCH_RULE", "rule"),
    ("PORTWATCH_PROTO", "proto"),
    ("PORTWATCH_ADDRESS", "address"),
    ("PORTWATCH_PORT", "port"),
    ("PORTWATCH_PID", "pid"),
    ("PORTWATCH_COMM", "comm"),
    ("PORTWATCH_EXE", "exe"),
    ("PORTWATCH_USER", "user"),
    ("PORTWATCH_UNIT", "unit"),
    ("PORTWATCH_BLOCKED_UNIT", "blocked_unit"),  # port_conflict: the service that could not bind
    ("PORTWATCH_BLOCKED_PID", "blocked_pid"),
)
_CONTEXT_KEYS = ("rule", "port")  # copied from the submitted event into every report

# Absolute paths only: a PATH lookup could be redirected.
_SETPRIV_PATHS = ("/usr/bin/setpriv", "/bin/setpriv")
_SETPRIV_ARGS = (
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
    "--",
)

def hook_environment(event: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
    """`base` without systemd's per-service variables, plus the PORTWATCH_* values.

    Strings may carry surrogate escapes (portwatch.text.decode); they are kept,
    so encoding with surrogateescape, as os.environ does, gives the exact bytes.
    """
    env = {key: value for key, value in base.items() if key not in _SCRUBBED}
    for var, key in _EVENT_VARS:
        env[var] = _env_value(event.get(key))
    return env


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    text = (value if isinstance(value, str) else str(value)).replace("\0", " ")
    try:
        raw = encode(text)
    except UnicodeEncodeError:  # a lone surrogate that no byte produced
        raw = text.encode("utf-8", "replace")
    if len(raw) > ENV_VALUE_LIMIT:
        cut = ENV_VALUE_LIMIT
        # Back off to a character boundary rather than leave half a UTF-8 sequence.
        while cut > ENV_VALUE_LIMIT - 3 and raw[cut] & 0xC0 == 0x80:
            cut -= 1
        raw = raw[:cut]
    return decode(raw)


def _setpriv_wrapper() -> tuple[str, ...]:
    if os.geteuid() != 0:
        return ()
    for path in _SETPRIV_PATHS:
        if os.access(path, os.X_OK):
            return (path, *_SETPRIV_ARGS)
    return ()


@dataclass(frozen=True, slots=True)
class _Job:
    name: str
    argv: tuple[str, ...]
    timeout: float
    event: dict[str, Any]


class HookRunner:
    """Runs hooks on a fixed pool of worker threads, beside the scan loop.

    `submit` never blocks: it queues (bounded), or reports why not. The
    cool-down for a (hook, key) starts when a run is accepted, so a burst is
    suppressed even while the first run still waits in the queue. `clock` only
    drives the cool-down; timeouts use the real monotonic clock.
    """

    def __init__(
        self,
        emit: Emit,
        *,
        max_parallel: int = 4,
        cooldown: float = 60.0,
        queue_limit: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_settings(max_parallel, cooldown)
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        self._emit = emit
        self._clock = clock
        self._queue_limit = queue_limit
        self._max_parallel = max_parallel
        self._cooldown = cooldown
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._last_run: dict[tuple[str, Hashable], float] = {}
        self._noticed: set[tuple[str, Hashable]] = set()
        self._workers: dict[int, threading.Thread] = {}
        self._running = 0
        self._closing = threading.Event()
        self._close_deadline = math.inf
        self._wrapper = _setpriv_wrapper()  # decided once: euid and setpriv do not change
        with self._cond:
            self._start_workers()

    @property
    def running(self) -> int:
        """Hooks running now."""
        with self._cond:
            return self._running

    def submit(
        self,
        name: str,
        command: Sequence[str],
        timeout: float,
        event: Mapping[str, Any],
        cooldown_key: Hashable,
    ) -> bool:
        """Queue a run of `command`; True if queued. Never blocks on a hook."""
        context = _context(event)
        key = (name, cooldown_key)
        report: tuple[str, dict[str, Any]] | None = None
        queued = False
        with self._cond:
            now = self._clock()
            last = self._last_run.get(key)
            if self._closing.is_set():
                report = ("hook_dropped", {"hook": name, "reason": "shutting down", **context})
            elif last is not None and now - last < self._cooldown:
                if key not in self._noticed:  # once per window, so the notices cannot flood
                    self._noticed.add(key)
                    left = round(self._cooldown - (now - last), 3)
                    report = ("hook_suppressed", {"hook": name, **context, "until": left})
            elif len(self._queue) >= self._queue_limit:
                report = ("hook_dropped", {"hook": name, "reason": "queue full", **context})
            else:
                self._queue.append(_Job(name, tuple(command), timeout, dict(event)))
                self._last_run[key] = now
                self._noticed.discard(key)
                self._forget_expired(now)
                self._cond.notify()
                queued = True
        if report is not None:
            self._report(*report)
        return queued

    def configure(self, *, max_parallel: int, cooldown: float) -> None:
        """Apply reloaded settings. Running hooks finish even if the pool shrinks."""
        _check_settings(max_parallel, cooldown)
        with self._cond:
            self._max_parallel = max_parallel
            self._cooldown = cooldown
            if not self._closing.is_set():
                self._start_workers()
            self._cond.notify_all()

    def close(self, timeout: float = 1.0) -> None:
        """Drop queued runs, end running hooks (TERM, then KILL at the deadline) and reap them."""
        with self._cond:
            if not self._closing.is_set():
                self._close_deadline = time.monotonic() + max(0.0, timeout)
                self._queue.clear()
                self._closing.set()
                self._cond.notify_all()
            workers = list(self._workers.values())
        give_up = time.monotonic() + max(0.0, timeout) + 0.9
        for worker in workers:
            worker.join(max(0.0, give_up - time.monotonic()))

    # -- workers ---------------------------------------------------------------

    def _start_workers(self) -> None:  # with self._cond held
        for index in range(self._max_parallel):
            if index not in self._workers:
                worker = threading.Thread(
                    target=self._work, args=(index,), name=f"portwatch-hook-{index}", daemon=True
                )
                self._workers[index] = worker
                worker.start()

    def _work(self, index: int) -> None:
        drop_ambient_capabilities()  # per thread, and this thread forks the hooks
        while True:
            with self._cond:
                while not self._queue and index < self._max_parallel and not self._closing.is_set():
                    self._cond.wait()
                if self._closing.is_set() or index >= self._max_parallel:
                    del self._workers[index]
                    return
                job = self._queue.popleft()
                self._running += 1
            try:
                self._run(job)
            except Exception as exc:  # one bad hook must not kill the worker
                self._report(
                    "hook_failed",
                    _failure(job, f"internal error: {type(exc).__name__}: {exc}", None, 0.0, ""),
                )
            finally:
                with self._cond:
                    self._running -= 1

    def _forget_expired(self, now: float) -> None:  # with self._cond held
        if len(self._last_run) <= 1024:
            return
        for key in [k for k, t in self._last_run.items() if now - t >= self._cooldown]:
            del self._last_run[key]
            self._noticed.discard(key)

    def _report(self, name: str, fields: dict[str, Any]) -> None:
        try:
            self._emit(name, fields)
        except Exception as exc:  # a broken sink must not stop the workers
            sys.stderr.write(f"portwatch: could not report {name}: {type(exc).__name__}\n")

    # -- one run -----------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        started = time.monotonic()
        env = hook_environment(job.event, os.environ)
        # Bytes, so the values reach the hook exact whatever the filesystem encoding.
        env_bytes = {encode(k): encode(v) for k, v in env.items()}
        # Files, not pipes: a detached grandchild holding a pipe open would
        # block us until it exits; a file lets us wait on the pid alone.
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out:
            stdin.write(_event_json(job.event))
            stdin.seek(0)
            problem = _precheck(job.argv, env.get("PATH")) if self._wrapper else None
            if problem is not None:
                self._report("hook_failed", _failure(job, problem, None, _since(started), ""))
                return
            try:
                proc = subprocess.Popen(
                    [*self._wrapper, *job.argv],
                    stdin=stdin,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    env=env_bytes,
                    start_new_session=True,
                    close_fds=True,
                )
            except (OSError, ValueError) as exc:
                self._report(
                    "hook_failed", _failure(job, _spawn_reason(exc), None, _since(started), "")
                )
                return
            cause = self._supervise(proc, job.timeout, out)
            duration = _since(started)
            code = proc.returncode
            if cause is None and code == 0:
                self._report(
                    "hook_finished",
                    {"hook": job.name, "exit_code": 0, "duration": duration, **_context(job.event)},
                )
                return
            if cause is None:
                cause = f"exit status {code}" if code > 0 else f"killed by signal {-code}"
            self._report("hook_failed", _failure(job, cause, code, duration, _tail(out)))

    def _supervise(
        self, proc: subprocess.Popen[bytes], timeout: float, out: IO[bytes]
    ) -> str | None:
        """Wait for the hook; return "timeout" or "shutdown" if it had to be stopped.

        The leader is only reaped after its group got SIGKILL: until then its
        pid, which is the group id, cannot be given to another process.
        """
        watch = _ExitWatch(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            cause: str | None = None
            tick = _TICK
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    cause = "timeout"
                    break
                if watch.wait(min(left, tick)):
                    break
                # A flooding hook is checked often enough to keep its file small.
                tick = _FLOOD_TICK if _trim(out) else _TICK
                if self._closing.is_set():
                    cause = "shutdown"
                    break
            if cause is not None:
                _signal_group(proc.pid, signal.SIGTERM)
                grace = KILL_GRACE
                if cause == "shutdown":
                    grace = min(grace, max(0.0, self._close_deadline - time.monotonic()))
                watch.wait(grace)
            return cause
        finally:
            # Also after a normal exit: nothing the hook left in its group survives it.
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            watch.close()


class _ExitWatch:
    """Waits for a child to exit without reaping it (pidfd; waitid polling before Linux 5.3)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._poll: select.poll | None = None
        self._fd = -1
        with contextlib.suppress(OSError):
            self._fd = os.pidfd_open(pid)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)

    def wait(self, timeout: float) -> bool:
        """True once the child has exited (it stays a zombie until Popen.wait)."""
        if self._poll is not None:
            return bool(self._poll.poll(max(0, math.ceil(timeout * 1000))))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    return True
            except ChildProcessError:  # reaped by someone else
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.01))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _check_settings(max_parallel: int, cooldown: float) -> None:
    if max_parallel < 1:
        raise ValueError("max_parallel must be at least 1")
    if cooldown < 0:
        raise ValueError("cooldown must not be negative")


def _context(event: Mapping[str, Any]) -> dict[str, Any]:
    return {key: event[key] for key in _CONTEXT_KEYS if key in event}


def _failure(
    job: _Job, reason: str, code: int | None, duration: float, output: str
) -> dict[str, Any]:
    return {
        "hook": job.name,
        "reason": reason,
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": -code if code is not None and code < 0 else None,
        "duration": duration,
        "output": output,
        **_context(job.event),
    }


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _event_json(event: Mapping[str, Any]) -> bytes:
    # ASCII always encodes, even strings with surrogate escapes; default=str for enums and paths.
    return (json.dumps(dict(event), ensure_ascii=True, default=str) + "\n").encode("ascii")


def _spawn_reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOEXEC
    ):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return f"spawn failed: {exc.strerror}"
    return f"spawn failed: {exc}"


def _precheck(argv: Sequence[str], path_var: str | None) -> str | None:
    """What exec will say, found before spawning through setpriv.

    setpriv would only exit 126/127; this gives the same reasons an unwrapped
    spawn does. Mirrors execvp: search PATH unless the name has a slash, and
    say "permission denied" only if something was found but none could run.
    """
    if not argv or not argv[0]:
        return "not found"
    if "\0" in "".join(argv):
        return "spawn failed: embedded null byte"
    program = argv[0]
    if "/" in program:
        candidates = [Path("/", program)]  # relative to the hook's working directory, /
    else:
        dirs = (path_var if path_var is not None else os.defpath).split(":")
        candidates = [Path("/", d or ".", program) for d in dirs]
    denied = False
    for candidate in candidates:
        try:
            st = candidate.stat()
            noexec = bool(os.statvfs(candidate).f_flag & os.ST_NOEXEC)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and not noexec and _may_execute_without_caps(st):
            return None
        denied = True
    return "permission denied" if denied else "not found"


def _may_execute_without_caps(st: os.stat_result) -> bool:
    # Without CAP_DAC_OVERRIDE even uid 0 needs the execute bit of its class.
    if st.st_uid == os.geteuid():
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _trim(out: IO[bytes]) -> bool:
    """Free the disk space of all but the end of a flooding hook's output; True if it did.

    Punching a hole keeps the size and the offset the hook writes at, so the
    tail stays readable; where the filesystem cannot, the file just grows.
    """
    fd = out.fileno()
    st = os.fstat(fd)
    end = (st.st_size - _DISK_KEEP) & ~0xFFFF
    if st.st_blocks * 512 <= _DISK_LIMIT or end <= 0:
        return False
    return punch_hole(fd, end)


def _tail(out: IO[bytes]) -> str:
    """The last OUTPUT_TAIL bytes, read without moving the offset a grandchild may share."""
    fd = out.fileno()
    size = os.fstat(fd).st_size
    start = max(0, size - OUTPUT_TAIL)
    return os.pread(fd, OUTPUT_TAIL, start).decode("utf-8", "replace")
