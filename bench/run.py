"""Benchmark portwatch on generated scenes, side by side with ss, netstat and psutil.

    sudo python bench/run.py [--scenes medium,large] [--json results.json] [--plot cost.png]
    python bench/run.py --report results.json [--plot cost.png]   # the table of an earlier run

For each scene (bench/scene.py builds it on loopback and tears it down) it
measures, in one run:

1. `portwatch list` against `ss -ltnup`, `netstat -ltnup` and a psutil
   script: wall time of alternating pairs (each includes interpreter or
   program start-up), reported as the median of the per-pair ratios, with
   the CPU time beside it;
2. the daemon's steady-state tick: a real `portwatch run --log-format json
   --no-proc-events` process, its CPU time (from /proc/<pid>/task/*/schedstat)
   over 30 ticks (half a rotation: its slots carry equal work) with nothing
   changing, divided by the ticks;
   RSS from /proc/<pid>/status. Then the scene drops its established
   connections (same processes, same fd count) and the tick is measured
   again. An in-process run of the same code path gives the parts of a tick;
3. detection latency: a new process opens a listener at a random moment
   relative to the tick; the time from its listen() to the daemon's
   listener_opened line naming its pid, with and without the proc connector;
4. short-lived listeners: a new process listens for 100 ms, 300 ms or 1 s and
   exits; the share the daemon reports (with its pid), with and without the
   proc connector.

portwatch runs from a byte-compiled copy of the package in a temporary
directory (so neither PYTHONDONTWRITEBYTECODE nor an editable install's
import hook skews start-up), with the interpreter given by --python.
Needs root (other processes' fds, the proc connector), ss and netstat, and
psutil for --python (matplotlib for --plot in this interpreter). Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
INTERVAL = 1.0
ROTATION_TICKS = 60  # OwnerTracker's default
# Ticks per steady-state sample: half a rotation, whose slots carry equal work by design.
SAMPLE_TICKS = 30
LIFETIMES = [0.1, 0.3, 1.0]  # seconds a short-lived listener lives

PSUTIL_LIST = r"""
import socket, psutil
names = {}
rows = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
        if c.pid is not None and c.pid not in names:
            try:
                names[c.pid] = psutil.Process(c.pid).name()
            except psutil.Error:
                names[c.pid] = "?"
        rows.append(f"{c.laddr.ip}:{c.laddr.port} {c.pid} {names.get(c.pid, '')}")
print("\n".join(rows))
"""

# A new process that listens on a fresh loopback port, says when (CLOCK_MONOTONIC
# is one clock for every process), then holds it for argv[1] seconds, or until
# stdin closes when that is 0.
LISTENER = r"""
import os, socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
t = time.monotonic()
sys.stdout.write(f"{os.getpid()} {s.getsockname()[1]} {t!r}\n")
sys.stdout.flush()
hold = float(sys.argv[1])
if hold > 0:
    time.sleep(hold)
else:
    sys.stdin.read()
"""


# -- portwatch, ready to run -------------------------------------------------------


@dataclass
class Tree:
    """A byte-compiled copy of the portwatch package, and how to run it."""

    python: str
    path: Path

    @classmethod
    @contextlib.contextmanager
    def prepare(cls, python: str, source: Path) -> Iterator[Tree]:
        tmp = Path(tempfile.mkdtemp(prefix="portwatch-bench-"))
        try:
            shutil.copytree(source / "portwatch", tmp / "portwatch",
                            ignore=shutil.ignore_patterns("__pycache__"))
            subprocess.run([python, "-m", "compileall", "-q", str(tmp / "portwatch")], check=True,
                           env=clean_env())
            yield cls(python, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def env(self) -> dict[str, str]:
        return {**clean_env(), "PYTHONPATH": str(self.path)}

    def argv(self, *args: str) -> list[str]:
        return [self.python, "-m", "portwatch", *args]


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME"):
        env.pop(name, None)
    return env


# -- the scene ------------------------------------------------------------------------


class Scene:
    """bench/scene.py as a child process; torn down on close (or if we die: its stdin closes)."""

    def __init__(self, name: str, *, connections: bool = True) -> None:
        argv = [sys.executable, str(BENCH / "scene.py"), name]
        if not connections:
            argv.append("--no-connections")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        info = json.loads(line) if line else {"error": "scene.py exited"}
        if "error" in info:
            self.close()
            raise RuntimeError(f"scene {name}: {info['error']}")
        self.info: dict[str, Any] = info

    def drop_connections(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write("drop-connections\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer.startswith("dropped"):
            raise RuntimeError(f"scene did not drop its connections: {answer!r}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- 1. one-shot listings ---------------------------------------------------------------


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (the process and everything it waited for) and lines of output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, check=False,
                         cwd="/").stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.count(b"\n")


def one_shot(tree: Tree, pairs: int, tools: Sequence[str] = ("ss -ltnup", "netstat -ltnup", "psutil")
             ) -> dict[str, Any]:
    mine = (tree.argv("list"), tree.env())
    others = {
        "ss -ltnup": (["ss", "-ltnup"], None),
        "netstat -ltnup": (["netstat", "-ltnup"], None),
        "psutil": ([tree.python, "-c", PSUTIL_LIST], clean_env()),
    }
    result: dict[str, Any] = {}
    for name in tools:
        argv, env = others[name]
        timed(*mine)
        timed(argv, env)  # warm caches for both
        ours: list[tuple[float, float, int]] = []
        theirs: list[tuple[float, float, int]] = []
        for i in range(pairs):
            if i % 2:
                theirs.append(timed(argv, env))
                ours.append(timed(*mine))
            else:
                ours.append(timed(*mine))
                theirs.append(timed(argv, env))
        result[name] = {
            "ratio": statistics.median(a[0] / b[0] for a, b in zip(ours, theirs, strict=True)),
            "cpu_ratio": statistics.median(a[1] / b[1] for a, b in zip(ours, theirs, strict=True) if b[1]),
            "portwatch_s": statistics.median(a[0] for a in ours),
            "portwatch_cpu_s": statistics.median(a[1] for a in ours),
            "tool_s": statistics.median(b[0] for b in theirs),
            "tool_cpu_s": statistics.median(b[1] for b in theirs),
            "portwatch_lines": ours[-1][2],
            "tool_lines": theirs[-1][2],
        }
        print(f"  list vs {name}: {result[name]['portwatch_s'] * 1000:.0f} ms vs "
              f"{result[name]['tool_s'] * 1000:.0f} ms, ratio {result[name]['ratio']:.2f}", flush=True)
    return result


# -- the daemon --------------------------------------------------------------------------


class Daemon:
    """`portwatch run --log-format json` with a reader thread stamping each line on arrival."""

    def __init__(self, tree: Tree, workdir: Path, *, proc_events: bool, interval: float = INTERVAL,
                 extra_config: str = "", prefix: Sequence[str] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "portwatch.yaml"
        config.write_text(f"interval: {interval}\nlog_listeners: true\nprotocols: [tcp, udp]\n{extra_config}")
        argv = [*prefix, *tree.argv("run", "--config", str(config), "--log-format", "json",
                                    "--state-dir", str(workdir / "state"))]
        if not proc_events:
            argv.append("--no-proc-events")
        # Not in the checkout: `python -m` puts the working directory first on sys.path.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=tree.env(),
                                     cwd=workdir)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = self.wait_for(lambda e: e.get("event") == "portwatch_started", timeout=300)
        if started is None:
            self.stop()
            raise RuntimeError("the daemon did not start")
        self.started = started[1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.events.append((now, json.loads(line)))
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float, since: int = 0
                 ) -> tuple[float, dict[str, Any]] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for arrived, event in self.events[since:]:
                    if match(event):
                        return arrived, event
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.05))

    def cpu_seconds(self) -> float:
        """CPU time of every thread, in nanoseconds precision (schedstat), as seconds."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def memory(self) -> dict[str, float]:
        found = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def forks_so_far() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def busy_cpu_seconds() -> float:
    """CPU seconds every CPU of the host spent not idle, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# Other work may use this share of one CPU during a steady-state sample. Not less: a kernel
# thread can be always busy (on the machine of the README table, DAMON's kdamond used 6-11%).
QUIET_OTHER_CPU = 0.15


def steady_tick(daemon: Daemon, seconds: float, attempts: int, wanted: int = 3) -> dict[str, float]:
    """CPU per tick with nothing changing: the median of `wanted` quiet samples of `seconds`.

    Other work on the host (processes starting, listeners opening) makes the
    daemon work, and other processes using the CPUs slow it down (caches,
    memory bandwidth): a sample in which the daemon reported any change, or
    the rest of the host used more than 5% of a CPU, is not counted, up to
    `attempts` samples in all.
    Without any quiet sample, the quietest is kept; its changes and the
    host's forks are reported either way. Memory is read at the end.
    """
    quiet: list[dict[str, float]] = []
    loudest_kept: dict[str, float] | None = None
    for _ in range(attempts):
        time.sleep(INTERVAL / 2)
        mark, forks, busy0 = daemon.mark(), forks_so_far(), busy_cpu_seconds()
        cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
        ticks = (t1 - t0) / INTERVAL
        other = (busy_cpu_seconds() - busy0 - (cpu1 - cpu0)) / (t1 - t0)
        sample = {
            "cpu_per_tick_s": (cpu1 - cpu0) / ticks, "ticks": ticks,
            "events": daemon.mark() - mark, "host_forks": forks_so_far() - forks, "other_cpu": other,
        }
        if not sample["events"] and other < QUIET_OTHER_CPU:
            quiet.append(sample)
            if len(quiet) == wanted:
                break
        elif loudest_kept is None or (sample["events"], sample["other_cpu"]) < (
                loudest_kept["events"], loudest_kept["other_cpu"]):
            loudest_kept = sample
    if not quiet:
        assert loudest_kept is not None
        return {**loudest_kept, "samples": 1, **daemon.memory()}
    cpu = sorted(q["cpu_per_tick_s"] for q in quiet)
    return {
        "cpu_per_tick_s": statistics.median(cpu), "cpu_min_s": cpu[0], "cpu_max_s": cpu[-1],
        "ticks": sum(q["ticks"] for q in quiet), "events": 0,
        "host_forks": sum(q["host_forks"] for q in quiet), "samples": len(quiet),
        "other_cpu": max(q["other_cpu"] for q in quiet), **daemon.memory(),
    }


def tick_parts(tree: Tree, ticks: int) -> dict[str, float]:
    """The daemon's tick in a process of its own, timed part by part (median seconds over `ticks`).

    One tick per interval, as in the daemon: back to back they would run with
    warm caches and cost a third less.
    """
    code = f"""
import json, statistics, time
from portwatch.model import Proto
from portwatch.proc import ProcFS
from portwatch.scan import OwnerTracker, SocketLister
from portwatch.snapshot import diff
procfs = ProcFS()
lister = SocketLister(procfs)
tracker = OwnerTracker(procfs)
protocols = (Proto.TCP, Proto.UDP)
tick = {{}}

def timed(obj, name, key):
    # The tracker keeps no statistics: its steps are timed from here.
    original = getattr(obj, name)
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return original(*args, **kw)
        finally:
            tick[key] = tick.get(key, 0.0) + time.perf_counter() - t
    setattr(obj, name, wrapper)

def add(**values):
    for k, v in values.items():
        tick[k] = tick.get(k, 0) + v

def counted(name, count):
    original = getattr(procfs, name)
    def wrapper(*args, **kw):
        result = original(*args, **kw)
        count(args, result)
        return result
    setattr(procfs, name, wrapper)

for name, key in (("_recheck", "recheck_s"), ("_resolve", "search_s"), ("_rotate", "rotate_s"),
                  ("_finish", "snapshot_s"), ("update", "update_s")):
    timed(tracker, name, key)
counted("socket_fds_at", lambda args, result: add(walked_pids=1, links_read=result[1]))
counted("stale_fds", lambda args, result: add(rechecked_fds=len(args[2]), links_read=len(args[2])))
t = time.perf_counter()
table = lister.list(protocols, (4, 6))
snap = tracker.update(table.sockets, complete=table.complete)
first = time.perf_counter() - t
keys = ("dump_s", "recheck_s", "search_s", "rotate_s", "snapshot_s", "diff_s", "total_s", "links_read",
        "rechecked_fds", "walked_pids", "rebuilt", "cpu_s")
parts = {{k: [] for k in keys}}
for _ in range({ticks}):
    time.sleep(max(0.0, {INTERVAL} - (time.perf_counter() - t)))  # as the daemon: caches go cold
    c = time.process_time()
    tick.clear()
    t = time.perf_counter()
    table = lister.list(protocols, (4, 6))
    tick["dump_s"] = time.perf_counter() - t
    new = tracker.update(table.sockets, complete=table.complete)
    t = time.perf_counter()
    diff(snap, new)
    tick["diff_s"] = time.perf_counter() - t
    tick["rebuilt"] = sum(1 for inode, x in new.listeners.items() if snap.listeners.get(inode) is not x)
    snap = new
    tick["total_s"] = tick["dump_s"] + tick["update_s"] + tick["diff_s"]
    tick["cpu_s"] = time.process_time() - c
    for k in keys:
        parts[k].append(tick.get(k, 0))
tracker.close()
out = {{k: statistics.median(v) for k, v in parts.items()}}
out["cpu_mean_s"] = statistics.mean(parts["cpu_s"])
out["first_update_s"] = first
print(json.dumps(out))
"""
    run = subprocess.run([tree.python, "-c", code], capture_output=True, text=True, env=tree.env(),
                         check=True, cwd="/")
    return dict(json.loads(run.stdout))


def spawn_listener(tree: Tree, hold: float) -> tuple[subprocess.Popen[str], int, int, float]:
    child = subprocess.Popen([tree.python, "-S", "-c", LISTENER, str(hold)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=clean_env())
    assert child.stdout is not None
    pid, port, when = child.stdout.readline().split()
    return child, int(pid), int(port), float(when)


def reported(daemon: Daemon, pid: int, port: int, since: int, timeout: float) -> float | None:
    """When the daemon named `pid` as the holder of `port` (listener_opened or owner_changed)."""
    def match(e: dict[str, Any]) -> bool:
        return (e.get("event") in ("listener_opened", "owner_changed") and e.get("port") == port
                and pid in (e.get("pids") or ()))
    found = daemon.wait_for(match, timeout, since)
    return found[0] if found else None


def finish(child: subprocess.Popen[str]) -> None:
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def detection(tree: Tree, daemon: Daemon, trials: int, rng: random.Random) -> dict[str, Any]:
    latencies: list[float] = []
    for _ in range(trials):
        time.sleep(rng.uniform(0, INTERVAL))
        mark = daemon.mark()
        child, pid, port, listened = spawn_listener(tree, 0)
        try:
            arrived = reported(daemon, pid, port, mark, INTERVAL + 3)
        finally:
            finish(child)
        latencies.append(arrived - listened if arrived is not None else float("inf"))
        time.sleep(0.2)
    latencies.sort()
    return {
        "trials": trials,
        "missed": sum(1 for x in latencies if x == float("inf")),
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "max_s": latencies[-1],
    }


def short_lived(tree: Tree, daemon: Daemon, lifetimes: list[float], trials: int,
                rng: random.Random) -> dict[str, float]:
    shares = {}
    for life in lifetimes:
        seen = 0
        for _ in range(trials):
            time.sleep(rng.uniform(0, INTERVAL))
            mark = daemon.mark()
            child, pid, port, _listened = spawn_listener(tree, life)
            try:
                if reported(daemon, pid, port, mark, life + 1.0) is not None:
                    seen += 1
            finally:
                finish(child)
        shares[f"{int(life * 1000)}ms"] = seen / trials
    return shares


# -- running it all ------------------------------------------------------------------------


@dataclass
class Options:
    pairs: int
    trials: int
    short_trials: int
    steady_seconds: float
    steady_attempts: int
    breakdown_ticks: int
    seed: int
    skip: set[str] = field(default_factory=set)


def detect_and_short(tree: Tree, daemon: Daemon, opts: Options, rng: random.Random, *, mode: str,
                     label: str) -> dict[str, Any]:
    """Detection latency and the short-lived shares of one daemon, as `detect_<mode>`, `short_<mode>`."""
    found: dict[str, Any] = {}
    if "detect" not in opts.skip:
        found[f"detect_{mode}"] = detection(tree, daemon, opts.trials, rng)
        print(f"  detection, {label}: {found[f'detect_{mode}']}", flush=True)
    if "short" not in opts.skip:
        found[f"short_{mode}"] = short_lived(tree, daemon, LIFETIMES, opts.short_trials, rng)
        print(f"  short-lived, {label}: {found[f'short_{mode}']}", flush=True)
    return found


def bench_scene(name: str, tree: Tree, opts: Options, workdir: Path) -> dict[str, Any]:
    rng = random.Random(opts.seed)  # noqa: S311 (timing jitter, not a secret)
    result: dict[str, Any] = {"scene": name}
    print(f"scene {name}: building", flush=True)
    scene = Scene(name)
    try:
        info = scene.info
        result["info"] = {k: v for k, v in info.items() if k != "pids"}
        print(f"  {info['listeners']} listeners, {info['connections']} connections, "
              f"{info['host_processes']} processes, {info['host_fds']} fds on the host", flush=True)
        if "list" not in opts.skip:
            result["one_shot"] = one_shot(tree, opts.pairs)
        if "tick" not in opts.skip:
            result["parts"] = tick_parts(tree, opts.breakdown_ticks)
            print(f"  tick parts: {json.dumps({k: round(v, 4) for k, v in result['parts'].items()})}",
                  flush=True)
        if not opts.skip.issuperset({"detect", "short"}):
            daemon = Daemon(tree, workdir / f"{name}-events", proc_events=True)
            try:
                result["proc_events"] = daemon.started.get("proc_events")
                result.update(detect_and_short(tree, daemon, opts, rng, mode="events",
                                               label="proc connector"))
            finally:
                daemon.stop()
        daemon = Daemon(tree, workdir / f"{name}-poll", proc_events=False)
        try:
            if "tick" not in opts.skip:
                time.sleep(ROTATION_TICKS * INTERVAL)  # settle: the first rotation after start costs more
                result["steady"] = steady_tick(daemon, opts.steady_seconds, opts.steady_attempts)
                print(f"  steady tick: {result['steady']}", flush=True)
            result.update(detect_and_short(tree, daemon, opts, rng, mode="poll", label="polling"))
            if "tick" not in opts.skip and info["connections"]:
                # Same processes and fd count, no established connection: the tick must not change.
                scene.drop_connections()
                time.sleep(2 * INTERVAL)
                result["steady_noconn"] = steady_tick(daemon, opts.steady_seconds, opts.steady_attempts)
                print(f"  steady tick, no connections: {result['steady_noconn']}", flush=True)
        finally:
            daemon.stop()
    finally:
        scene.close()
    return result


# -- the report ------------------------------------------------------------------------------

TARGETS = {
    "medium": {"list_vs_ss": 0.9, "tick_cpu_s": 0.010},
    "large": {"list_vs_ss": 0.7, "tick_cpu_s": 0.100, "rss_mib": 30},
}


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) for one scene."""
    out: list[tuple[str, str, bool | None]] = []
    target = TARGETS.get(r["scene"], {})
    ss = r.get("one_shot", {}).get("ss -ltnup")
    if ss and "list_vs_ss" in target:
        out.append((f"list <= {target['list_vs_ss']} x ss", f"{ss['ratio']:.2f}",
                    ss["ratio"] <= target["list_vs_ss"]))
    for key, label in (("steady", "with connections"), ("steady_noconn", "no connections")):
        if key in r and "tick_cpu_s" in target:
            cpu = r[key]["cpu_per_tick_s"]
            out.append((f"tick CPU <= {target['tick_cpu_s'] * 1000:.0f} ms ({label})",
                        f"{cpu * 1000:.1f} ms", cpu <= target["tick_cpu_s"]))
    if "steady" in r and "rss_mib" in target:
        rss = r["steady"].get("VmRSS", 0.0)
        out.append((f"RSS <= {target['rss_mib']} MiB", f"{rss:.1f} MiB", rss <= target["rss_mib"]))
    for key, label in (("detect_events", "proc connector"), ("detect_poll", "polling")):
        if key in r:
            p95 = r[key]["p95_s"]
            out.append((f"new listener p95 <= interval + 0.2 s ({label})", f"{p95:.2f} s",
                        p95 <= INTERVAL + 0.2))
    if "short_events" in r:
        share = r["short_events"]["300ms"]
        out.append(("300 ms listener reported >= 95% (proc connector)", f"{share:.0%}", share >= 0.95))
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    names = [r["scene"] for r in results]
    rows: list[list[str]] = []

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        cells = []
        for r in results:
            try:
                cells.append(get(r))
            except (KeyError, TypeError, ValueError):
                cells.append("-")
        rows.append([label, *cells])

    row("listeners / connections", lambda r: f"{r['info']['listeners']:,} / {r['info']['connections']:,}")
    row("processes / fds on the host",
        lambda r: f"{r['info']['host_processes']:,} / {r['info']['host_fds']:,}")
    def ratio(tool: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['one_shot'][tool]['ratio']:.2f}"

    def tool_ms(tool: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{_ms(r['one_shot'][tool]['tool_s'])} / {_ms(r['one_shot'][tool]['tool_cpu_s'])}"

    def latency(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r[key]['p50_s']:.2f} / {r[key]['p95_s']:.2f} / {r[key]['max_s']:.2f}"

    def shares(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: " / ".join(f"{r[key][life]:.0%}" for life in ("100ms", "300ms", "1000ms"))

    for tool in ("ss -ltnup", "netstat -ltnup", "psutil"):
        row(f"`portwatch list` / `{tool}` (wall, median of pairs)", ratio(tool))
    row("`portwatch list` / `ss -ltnup` (CPU)", lambda r: f"{r['one_shot']['ss -ltnup']['cpu_ratio']:.2f}")
    row("`portwatch list`, ms (wall / CPU)", lambda r: (
        f"{_ms(r['one_shot']['ss -ltnup']['portwatch_s'])} / "
        f"{_ms(r['one_shot']['ss -ltnup']['portwatch_cpu_s'])}"))
    for tool in ("ss -ltnup", "netstat -ltnup", "psutil"):
        row(f"`{tool}`, ms (wall / CPU)", tool_ms(tool))
    def tick_cpu(key: str) -> Callable[[dict[str, Any]], str]:
        def show(r: dict[str, Any]) -> str:
            s = r[key]
            spread = f" ({s['cpu_min_s'] * 1000:.1f}-{s['cpu_max_s'] * 1000:.1f})" if "cpu_min_s" in s else ""
            return f"{s['cpu_per_tick_s'] * 1000:.1f}{spread}"
        return show

    row("daemon tick CPU, ms, median of quiet samples (range) (connections as built)", tick_cpu("steady"))
    row("daemon tick CPU, ms, median of quiet samples (range) (0 connections)", tick_cpu("steady_noconn"))
    row("daemon RSS / peak, MiB", lambda r: f"{r['steady']['VmRSS']:.1f} / {r['steady']['VmHWM']:.1f}")
    row("during the tick samples: host forks / daemon events / other CPU use", lambda r: " ; ".join(
        f"{r[k]['host_forks']} / {r[k]['events']} / {r[k].get('other_cpu', 0):.0%}"
        for k in ("steady", "steady_noconn") if k in r))
    row("tick parts, ms: dump / re-check / new+search / rotation / snapshot / diff", lambda r: " / ".join(
        f"{r['parts'][k] * 1000:.1f}" for k in
        ("dump_s", "recheck_s", "search_s", "rotate_s", "snapshot_s", "diff_s")))
    row("links read per tick (re-checked)", lambda r: (
        f"{r['parts']['links_read']:,.0f} ({r['parts']['rechecked_fds']:,.0f})"))
    row("daemon first scan, s", lambda r: f"{r['parts']['first_update_s']:.2f}")
    for key, label in (("detect_events", "proc connector"), ("detect_poll", "polling")):
        row(f"new listener reported, p50 / p95 / max s ({label})", latency(key))
    for key, label in (("short_events", "proc connector"), ("short_poll", "polling")):
        row(f"short-lived reported, 100 ms / 300 ms / 1 s ({label})", shares(key))
    header = ["", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines.append("")
    for r in results:
        for target, figure, met in verdicts(r):
            status = "met" if met else "MISSED"
            lines.append(f"- {r['scene']}: {target}: {figure} ({status})")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = [r for r in results if "one_shot" in r or "steady" in r]
    fds = [r["info"]["host_fds"] for r in scenes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tool in ("ss -ltnup", "netstat -ltnup", "psutil"):
        xs = [f for f, r in zip(fds, scenes, strict=True) if "one_shot" in r]
        ys = [r["one_shot"][tool]["tool_s"] * 1000 for r in scenes if "one_shot" in r]
        left.plot(xs, ys, marker="o", label=tool)
    xs = [f for f, r in zip(fds, scenes, strict=True) if "one_shot" in r]
    ys = [r["one_shot"]["ss -ltnup"]["portwatch_s"] * 1000 for r in scenes if "one_shot" in r]
    left.plot(xs, ys, marker="s", linewidth=2.5, label="portwatch list")
    left.set(xscale="log", yscale="log", xlabel="open fds on the host", ylabel="wall time, ms",
             title="one-shot listing with owners")
    left.legend()
    for key, label in (("steady", "tick, connections as built"), ("steady_noconn", "tick, 0 connections")):
        pts = [(f, r[key]["cpu_per_tick_s"] * 1000) for f, r in zip(fds, scenes, strict=True) if key in r]
        if pts:
            right.plot(*zip(*pts, strict=True), marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="open fds on the host", ylabel="CPU per tick, ms",
              title="daemon, nothing changing")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", default="medium,large", help="comma-separated: small, medium, large")
    parser.add_argument("--python", default=sys.executable, help="interpreter for portwatch and psutil")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="directory holding the portwatch package to measure (default: this checkout)")
    parser.add_argument("--pairs", type=int, default=9, help="alternating pairs per tool")
    parser.add_argument("--trials", type=int, default=40, help="detection trials per mode")
    parser.add_argument("--short-trials", type=int, default=40, help="trials per short lifetime and mode")
    parser.add_argument("--steady-seconds", type=float, default=SAMPLE_TICKS * INTERVAL,
                        help="one tick sample (default: half a rotation of the owner tracker)")
    parser.add_argument("--steady-attempts", type=int, default=10,
                        help="samples to try for three in which nothing changed on the host")
    parser.add_argument("--breakdown-ticks", type=int, default=SAMPLE_TICKS)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: list, tick, detect, short")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG of cost against scale (needs matplotlib)")
    parser.add_argument("--report", type=Path, help="print the table (and --plot) of an earlier --json")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())["results"]
    else:
        if os.geteuid() != 0:
            parser.error("run as root: the benchmark reads every process's fds")
        for tool in ("ss", "netstat"):
            if shutil.which(tool) is None:
                parser.error(f"{tool} is not installed")
        opts = Options(args.pairs, args.trials, args.short_trials, args.steady_seconds, args.steady_attempts,
                       args.breakdown_ticks, args.seed, {s for s in args.skip.split(",") if s})
        results = []
        work_dir = tempfile.TemporaryDirectory(prefix="portwatch-bench-")
        with Tree.prepare(args.python, args.tree) as tree, work_dir as work:
            for name in [s for s in args.scenes.split(",") if s]:
                results.append(bench_scene(name, tree, opts, Path(work)))
                if args.json:  # after every scene: a late failure keeps what was measured
                    args.json.write_text(json.dumps(
                        {"python": args.python, "tree": str(args.tree), "results": results}, indent=1))
    print()
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
