#!/usr/bin/env python3
"""Soak: run `portwatch run` for a long time against a medium scene with churn, and show that
its memory, open fds and threads do not grow.

The scene (a helper process, this script in --scene mode, single-threaded so it may fork):
- about 1,000 listeners (TCP and UDP, IPv4 and IPv6, on loopback) held by 200 "master"
  processes, a third of which fork 3 workers sharing their sockets (about 400 processes);
- churn: short-lived processes that bind one or two sockets, sometimes fork, and exit after
  0.05-3 s (--churn-rate a second), and every 5 s one master with its workers replaced by a new one;
- now and then a squatter on a reserved port for 5 s; the rule's hook runs (a hook that succeeds,
  and on one port a hook that fails), hook_cooldown 5 s.

Every --sample-every seconds it reads VmRSS and Threads from /proc/<daemon>/status, counts
/proc/<daemon>/fd, and notes CPU time and events so far. At the end it prints the table and a
verdict: over the second half of the run (after warm-up), the least-squares slope of each series
must be about zero, and no series may end above its first-half maximum by more than a small margin.
The series judged are RSS, threads, fds other than the /proc/<pid>/fd directories the owner
tracker keeps open (one per process holding a listener, so they follow the host's population),
and such directories kept for processes that no longer exist (a leak if it grows).

Usage: python bench/soak.py [--duration 600] [--json results.json]
Bounded: it stops by itself after --duration seconds (plus set-up and tear-down), and stops
every process it started, by pid. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
RNG = random.Random()  # noqa: S311 - the scene's choices; nothing secret

# Verdict margins for the second half of the run.
RSS_SLOPE_KIB_PER_MIN = 64.0  # about 4 MiB an hour: below that, RSS is flat within allocator noise
RSS_MARGIN_KIB = 1024
COUNT_SLOPE_PER_MIN = 0.1  # fds, threads: not even one more every 10 minutes
HOOK_FDS = 4  # two running hooks hold their stdin and output files for a moment


# --- the scene (runs in its own single-threaded process) ---------------------------------------------


def _bind(kind: int | None = None) -> socket.socket:
    kind = kind or RNG.choice([socket.SOCK_STREAM, socket.SOCK_DGRAM])
    family = RNG.choice([socket.AF_INET, socket.AF_INET6])
    s = socket.socket(family, kind)
    s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    if kind == socket.SOCK_STREAM:
        s.listen(16)
    return s


def _child(body: Any, *args: Any) -> int:
    """Fork; the child runs body(*args) and always exits (never returns into the scene's loop)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            RNG.seed(os.getpid() ^ time.monotonic_ns())  # not the same choices as the parent
            body(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def _master(sockets: int, workers: int, ready_fd: int) -> None:
    held = [_bind() for _ in range(sockets)]
    kids = [_child(signal.pause) for _ in range(workers)]

    def stop(_sig: int, _frame: object) -> None:
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGTERM)
        for kid in kids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(kid, 0)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    os.write(ready_fd, b"x")
    while held:  # `held` keeps the sockets open until the process ends
        signal.pause()


def _short_lived() -> None:
    held = [_bind() for _ in range(RNG.choice([1, 1, 2]))]
    if RNG.random() < 0.3:
        _child(time.sleep, RNG.uniform(0.01, 0.2))  # a worker sharing them, gone first
    time.sleep(RNG.uniform(0.05, 3.0))
    del held


def _squatter(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return
        s.listen(1)
        time.sleep(5.0)


def run_scene(spec: dict[str, Any]) -> int:
    stop = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rfd, wfd = os.pipe()
    masters: list[int] = []

    def start_master(index: int) -> int:
        return _child(_master, spec["sockets_per_master"], 3 if index % 3 == 0 else 0, wfd)

    for index in range(spec["masters"]):
        masters.append(start_master(index))
    for _ in masters:
        os.read(rfd, 1)
    print(json.dumps({"ready": True, "masters": len(masters)}), flush=True)

    others: set[int] = set()
    now = time.monotonic()
    deadline = now + spec["duration"]
    next_churn, next_replace, next_squat = now, now + 5.0, now + spec["violation_every"]
    replaced = squats = churned = 0
    while not stop and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_churn and len(others) < 400:
            others.add(_child(_short_lived))
            churned += 1
            next_churn = now + 1.0 / spec["churn_rate"]
        if now >= next_replace:
            victim = masters.pop(RNG.randrange(len(masters)))
            os.kill(victim, signal.SIGTERM)
            os.waitpid(victim, 0)
            masters.append(start_master(replaced))
            os.read(rfd, 1)
            replaced += 1
            next_replace = now + 5.0
        if now >= next_squat:
            others.add(_child(_squatter, spec["reserved"][squats % len(spec["reserved"])]))
            squats += 1
            next_squat = now + spec["violation_every"]
        while others:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                others.discard(pid)
                continue
            break
        time.sleep(min(0.01, 1.0 / spec["churn_rate"]))
    for pid in masters:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in [*masters, *others]:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    print(json.dumps({"done": True, "churned": churned, "replaced": replaced, "squats": squats}), flush=True)
    return 0


# --- the watcher and its samples -------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range, so the churn's port-0 binds never land on one."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in RNG.sample(range(10000, max(10001, low)), min(500, max(1, low - 10000))):
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port))
            ports.append(port)
        if len(ports) == count:
            return ports
    raise SystemExit("no free ports below the ephemeral range")


def resources(pid: int) -> dict[str, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    dirs = stale = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            parts = str(fd.readlink()).split("/")
            if len(parts) == 4 and parts[1] == "proc" and parts[2].isdigit() and parts[3] == "fd":
                dirs += 1  # the tracker keeps /proc/<holder>/fd open per holder process
                stale += not Path(f"/proc/{parts[2]}/stat").exists()
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(fds),
        "dir_fds": dirs,
        "stale_dir_fds": stale,  # kept open for a process that is gone: a leak if it grows
        "cpu_s": (int(stat[11]) + int(stat[12])) / CLK_TCK,
    }


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


class EventCounter:
    def __init__(self, stream: Any) -> None:
        self.counts: Counter[str] = Counter()
        self.started: dict[str, Any] | None = None
        self.bad_lines = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                event = json.loads(line)
                name = event["event"]
            except (ValueError, KeyError, TypeError):
                with self._lock:
                    self.bad_lines += 1
                continue
            with self._lock:
                self.counts[name] += 1
                if name == "portwatch_started":
                    self.started = event

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def join(self) -> None:
        self._thread.join(10)


def write_config(directory: Path, interval: float, ok_ports: list[int], bad_port: int) -> Path:
    ok_hook = ["/bin/sh", "-c", 'cat >/dev/null; test -n "$PORTWATCH_PORT"']
    bad_hook = ["/bin/sh", "-c", "cat >/dev/null; echo refusing; exit 3"]
    path = directory / "portwatch.yaml"
    path.write_text(
        f"interval: {interval}\n"
        "hook_cooldown: 5\n"
        "max_parallel_hooks: 2\n"
        "reserved:\n"
        "  - name: guarded\n"
        f"    ports: {json.dumps(ok_ports)}\n"
        "    allow:\n      - comm: nobody-has-it\n"
        "    hooks: [ok]\n"
        "  - name: failing\n"
        f"    ports: [{bad_port}]\n"
        "    hooks: [bad]\n"
        "hooks:\n"
        f"  ok:\n    command: {json.dumps(ok_hook)}\n    timeout: 5\n"
        f"  bad:\n    command: {json.dumps(bad_hook)}\n    timeout: 5\n"
    )
    return path


def verdict(rows: list[dict[str, float]]) -> tuple[bool, list[str]]:
    half = len(rows) // 2
    first, second = rows[: half or 1], rows[half:]
    lines, ok = [], True
    for row in rows:
        row.setdefault("other_fds", row["fds"] - row["dir_fds"])
    # Raw fds follow the host: the tracker keeps one /proc/<pid>/fd open per process holding a
    # listener, so another program's listeners coming and going move it. A leak shows as fds
    # that are not such directories growing, or as directories kept for processes that are gone.
    for key, max_slope, margin in (
        ("rss_kib", RSS_SLOPE_KIB_PER_MIN, RSS_MARGIN_KIB),
        ("other_fds", COUNT_SLOPE_PER_MIN, HOOK_FDS),
        ("stale_dir_fds", COUNT_SLOPE_PER_MIN, 2),
        ("threads", COUNT_SLOPE_PER_MIN, 0),
    ):
        slope = slope_per_minute([(r["t"], r[key]) for r in second])
        first_max = max(r[key] for r in first)
        last = second[-1][key]
        good = slope <= max_slope and last <= first_max + margin
        ok = ok and good
        lines.append(
            f"{key:8} second-half slope {slope:+9.3f}/min (limit {max_slope:g}), "
            f"first-half max {first_max:g}, last {last:g}: {'flat' if good else 'GROWS'}"
        )
    return ok, lines


def run_soak(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="portwatch-soak-"))
    *ok_ports, bad_port = free_ports(4)
    config = write_config(work, args.interval, ok_ports, bad_port)
    scene = start_scene(args, [*ok_ports, bad_port])
    with (work / "daemon.stderr").open("wb") as stderr_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "portwatch", "run", "--config", str(config), "--log-format", "json",
             "--state-dir", str(work / "state")],
            stdout=subprocess.PIPE, stderr=stderr_file, cwd=ROOT, text=True,
        )
    assert daemon.stdout is not None
    events = EventCounter(daemon.stdout)
    try:
        rows = sample_until_done(args, daemon, events, work)
    finally:
        alive = daemon.poll() is None
        stop(daemon)
        events.join()
        summary = stop_scene(scene)
    ok = report(args, rows, events, summary, exited_cleanly=alive and daemon.returncode == 0,
                stderr=(work / "daemon.stderr").read_text(errors="replace"))
    with contextlib.suppress(OSError):
        for path in sorted(work.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        work.rmdir()
    return 0 if ok else 1


def start_scene(args: argparse.Namespace, reserved: list[int]) -> subprocess.Popen[str]:
    spec = {
        "masters": args.masters, "sockets_per_master": args.sockets_per_master,
        "churn_rate": args.churn_rate, "violation_every": args.violation_every,
        "reserved": reserved, "duration": args.duration + 120,
    }
    scene = subprocess.Popen([sys.executable, __file__, "--scene", json.dumps(spec)], stdout=subprocess.PIPE,
                             text=True)
    assert scene.stdout is not None
    ready = json.loads(scene.stdout.readline())
    assert ready.get("ready"), ready
    return scene


def stop_scene(scene: subprocess.Popen[str]) -> dict[str, Any]:
    """Stop the scene (ours, by pid) and return the summary it prints."""
    assert scene.stdout is not None
    scene.send_signal(signal.SIGTERM)
    try:
        summary = json.loads(scene.stdout.readline() or "{}")
        scene.wait(30)
    except (subprocess.TimeoutExpired, ValueError):
        summary = {}
        scene.kill()
        scene.wait()
    return dict(summary)


def stop(daemon: subprocess.Popen[str]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def sample_until_done(args: argparse.Namespace, daemon: subprocess.Popen[str], events: EventCounter,
           work: Path) -> list[dict[str, float]]:
    """The daemon's resources every args.sample_every seconds for args.duration, one line each."""
    deadline = time.monotonic() + 30
    while events.started is None:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"portwatch did not start: {(work / 'daemon.stderr').read_text()[-2000:]}")
        time.sleep(0.1)
    started = events.started
    print(f"scene: {args.masters} masters x {args.sockets_per_master} sockets, a third with 3 workers; "
          f"daemon pid {daemon.pid} watching {started['listeners']} listeners "
          f"(source {started['socket_source']}, interval {args.interval} s)", flush=True)
    print(f"{'t_s':>6} {'rss_kib':>8} {'threads':>7} {'fds':>5} {'dirfds':>6} {'stale':>5} {'cpu_s':>7} "
          f"{'events':>8}", flush=True)
    rows: list[dict[str, float]] = []
    t0 = time.monotonic()
    while True:
        t = time.monotonic() - t0
        if daemon.poll() is not None:
            print("portwatch exited during the soak", flush=True)
            return rows
        row = {"t": round(t, 1), **resources(daemon.pid), "events": events.total()}
        rows.append(row)
        print(f"{row['t']:6.0f} {row['rss_kib']:8.0f} {row['threads']:7.0f} {row['fds']:5.0f} "
              f"{row['dir_fds']:6.0f} {row['stale_dir_fds']:5.0f} {row['cpu_s']:7.1f} "
              f"{row['events']:8.0f}", flush=True)
        if t >= args.duration:
            return rows
        time.sleep(max(0.0, t0 + len(rows) * args.sample_every - time.monotonic()))


def report(args: argparse.Namespace, rows: list[dict[str, float]], events: EventCounter,
           summary: dict[str, Any], *, exited_cleanly: bool, stderr: str) -> bool:
    ok, lines = verdict(rows) if len(rows) >= 4 else (False, ["too few samples"])
    ok = ok and exited_cleanly and "Traceback" not in stderr and events.bad_lines == 0
    cpu = rows[-1]["cpu_s"] - rows[0]["cpu_s"] if rows else 0.0
    span = rows[-1]["t"] - rows[0]["t"] if rows else 0.0
    print(f"\nscene: {summary}")
    print(f"events: {dict(sorted(events.counts.items()))}; "
          f"lines that were not one JSON event: {events.bad_lines}")
    print(f"daemon CPU {cpu:.1f} s over {span:.0f} s ({100 * cpu / span if span else 0:.1f}% of one core); "
          f"stopped cleanly: {exited_cleanly}; stderr {repr(stderr[-300:]) if stderr.strip() else 'empty'}")
    for line in lines:
        print(line)
    if rows:
        print(f"fds (raw) from {min(r['fds'] for r in rows):g} to {max(r['fds'] for r in rows):g}, "
              f"of which /proc/<pid>/fd directories of holders {min(r['dir_fds'] for r in rows):g} "
              f"to {max(r['dir_fds'] for r in rows):g}")
    print(f"verdict: {'PASS: RSS, fds and threads do not grow' if ok else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": rows, "events": dict(events.counts), "scene": summary, "verdict": lines, "ok": ok,
             "started": events.started}, indent=1))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of sampling (default 600)")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--masters", type=int, default=200, help="listener-holding processes")
    parser.add_argument("--sockets-per-master", type=int, default=5)
    parser.add_argument("--churn-rate", type=float, default=20.0, help="short-lived binders a second")
    parser.add_argument("--violation-every", type=float, default=20.0, help="seconds between squatters")
    parser.add_argument("--interval", type=float, default=1.0, help="the daemon's scan interval")
    parser.add_argument("--json", help="also write the samples and the verdict to this file")
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scene:
        return run_scene(json.loads(args.scene))
    return run_soak(args)


if __name__ == "__main__":
    sys.exit(main())
