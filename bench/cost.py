"""What the daemon costs the host it watches: whole-process CPU per second, quiet and busy.

Run as root from a checkout:

    sudo python3 bench/cost.py [--scenes medium,large] [--warmup 10] [--seconds 20] [--json out.json]

On each of bench/scene.py's scenes, one real `portwatch run` (interval 1 s, the proc connector
on, as the shipped unit runs it) is measured from outside: the CPU time of the whole process
(every thread's, from /proc/<pid>/task/*/schedstat) over `--seconds`, `--settle` seconds after
its start, then under each load in turn after `--warmup` seconds of it, the load made by this
script and stopped before the next:

- quiet: nothing;
- spawns N/s (10, 50, 200): `/bin/true` started with posix_spawn and reaped, like cron jobs,
  CI steps and monitoring scripts;
- listeners in running processes R/s (1, 10): 20 helper processes, started before the daemon,
  each told in turn to open a new TCP listener on loopback, and the one half a round away
  to close its oldest;
- short-lived listener processes 10/s: a new process listens on loopback for 0.5 s and exits.

Every case is run `--rounds` times, the order reversed each round (quiet first and last), and
the table gives the mean with the runs beside it: runs of one case differ by 1-2 ms/s on the
medium scene, as much as some targets leave. The load is bounded: at most 400 spawns in
flight, about 20 helper listeners, 10 short-lived processes alive. Beside it: the in-process
tick parts (bench/run.py's), RSS, and `portwatch list` against `ss -ltnup` (median of
alternating pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run import LISTENER, ROOT, Daemon, Scene, Tree, clean_env, one_shot, tick_parts  # noqa: E402

HELPERS = 20
HELPER = r"""
import socket, sys
held = []
for line in sys.stdin:
    if line.startswith("open"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        held.append(s)
    elif held:
        held.pop(0).close()
    sys.stdout.write("ok\n")
    sys.stdout.flush()
"""
# ms of whole-process CPU per second: (scene, case) -> limit, or a multiple of quiet
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("medium", "quiet"): ("ms", 5.0),
    ("medium", "spawns 50/s"): ("x quiet", 2.0),
    ("medium", "listeners in running processes 1/s"): ("ms", 10.0),
    ("large", "quiet"): ("ms", 40.0),
    ("large", "spawns 50/s"): ("x quiet", 2.0),
    ("large", "listeners in running processes 1/s"): ("ms", 80.0),
}
PARTS = ("dump_s", "recheck_s", "search_s", "rotate_s", "snapshot_s", "diff_s", "total_s", "cpu_s")
LIST_TARGET = {"medium": 0.9, "large": 0.7}
RSS_TARGET = {"large": 30.0}


class Load:
    """Calls `step` `rate` times a second on a thread of its own until stopped."""

    def __init__(self, rate: float, step: Callable[[], None], tidy: Callable[[], None]) -> None:
        self.rate, self.step, self.tidy = rate, step, tidy
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.tidy()
            due = start + self.done / self.rate
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            self.step()
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.tidy()


class Spawns:
    """Short processes that exit at once (/bin/true), reaped as they go."""

    def __init__(self) -> None:
        self.alive: set[int] = set()

    def step(self) -> None:
        if len(self.alive) < 400:
            self.alive.add(os.posix_spawn("/bin/true", ["true"], clean_env()))

    def tidy(self) -> None:
        for pid in list(self.alive):
            if os.waitpid(pid, os.WNOHANG)[0]:
                self.alive.discard(pid)

    def close(self) -> None:
        for pid in self.alive:
            os.waitpid(pid, 0)
        self.alive.clear()


class Helpers:
    """Processes started before the daemon that open (and close) listeners when told."""

    def __init__(self, python: str) -> None:
        self.procs = [subprocess.Popen([python, "-S", "-c", HELPER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=clean_env())
                      for _ in range(HELPERS)]
        self.turn = 0

    def step(self) -> None:
        """A new listener in one helper; the oldest of the helper half a round away closes (at
        another time than the open, as a service that adds a port does)."""
        n = self.turn
        self.turn += 1
        self._tell(self.procs[n % len(self.procs)], "open")
        self._tell(self.procs[(n + len(self.procs) // 2) % len(self.procs)], "close")

    @staticmethod
    def _tell(proc: subprocess.Popen[str], command: str) -> None:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        proc.stdout.readline()

    def tidy(self) -> None:
        pass

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


class ShortLived:
    """A new process a step, listening for 0.5 s."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.alive: list[subprocess.Popen[bytes]] = []

    def step(self) -> None:
        if len(self.alive) < 10:
            self.alive.append(subprocess.Popen([self.python, "-S", "-c", LISTENER, "0.5"],
                                               stdout=subprocess.DEVNULL, env=clean_env()))

    def tidy(self) -> None:
        self.alive = [p for p in self.alive if p.poll() is None]

    def close(self) -> None:
        for p in self.alive:
            p.wait()


def measure(daemon: Daemon, warmup: float, seconds: float, load: Load | None) -> dict[str, float]:
    time.sleep(warmup)
    mark, done = daemon.mark(), load.done if load else 0
    # The daemon starts no thread here (no hooks, no metrics): its threads' own nanosecond
    # counters (schedstat) rather than /proc/<pid>/stat's 10 ms steps.
    before, start = daemon.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    cpu, elapsed = daemon.cpu_seconds() - before, time.monotonic() - start
    if load is not None:
        load.stop()
    return {"ms_per_s": cpu / elapsed * 1000, "events": daemon.mark() - mark,
            "load_per_s": ((load.done - done) / elapsed) if load else 0.0}


def bench_scene(name: str, tree: Tree, workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    print(f"scene {name}: building", flush=True)
    scene = Scene(name)
    result: dict[str, Any] = {"scene": name, "info": {k: v for k, v in scene.info.items() if k != "pids"},
                              "cases": {}}
    helpers = Helpers(tree.python)
    daemon = None
    try:
        if "parts" not in opts.skip:
            result["parts"] = tick_parts(tree, 30)
        daemon = Daemon(tree, workdir, proc_events=True, interval=1.0)
        cases: list[tuple[str, Callable[[], Load | None]]] = [("quiet", lambda: None)]
        spawns = Spawns()
        for rate in (10, 50, 200):
            cases.append((f"spawns {rate}/s", lambda r=rate: Load(r, spawns.step, spawns.tidy)))
        for rate in (1, 10):
            cases.append((f"listeners in running processes {rate}/s",
                          lambda r=rate: Load(r, helpers.step, helpers.tidy)))
        short = ShortLived(tree.python)
        cases.append(("short-lived listener processes 10/s", lambda: Load(10, short.step, short.tidy)))
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in cases}
        order = [c for n in range(opts.rounds) for c in (cases if n % 2 == 0 else cases[::-1])]
        for n, (label, start) in enumerate(order):
            run = measure(daemon, opts.settle if n == 0 else opts.warmup, opts.seconds, start())
            spawns.close()
            short.close()
            runs[label].append(run)
            print(f"  {label}: {run['ms_per_s']:.1f} ms/s ({run['events']} events, "
                  f"{run['load_per_s']:.1f} load steps/s)", flush=True)
        for label, done in runs.items():
            result["cases"][label] = {"ms_per_s": statistics.mean(r["ms_per_s"] for r in done),
                                      "runs": [r["ms_per_s"] for r in done]}
        result["rss_mib"] = daemon.memory()["VmRSS"]
        daemon.stop()
        daemon = None
        if "list" not in opts.skip:
            result["list"] = one_shot(tree, opts.pairs, ("ss -ltnup",))["ss -ltnup"]
    finally:
        if daemon is not None:
            daemon.stop()
        helpers.close()
        scene.close()
    return result


def verdicts(r: dict[str, Any]) -> list[str]:
    lines = []
    quiet = r["cases"]["quiet"]["ms_per_s"]
    for (scene, case), (kind, limit) in TARGETS.items():
        if scene != r["scene"] or case not in r["cases"]:
            continue
        got = r["cases"][case]["ms_per_s"]
        if kind == "ms":
            verdict = "met" if got <= limit else "MISSED"
            lines.append(f"{case}: {got:.1f} ms/s, target <= {limit:.0f}: {verdict}")
        else:
            lines.append(f"{case}: {got / quiet:.2f} x quiet, target <= {limit:.0f} x: "
                         f"{'met' if got <= limit * quiet else 'MISSED'}")
    if r["scene"] in RSS_TARGET:
        limit = RSS_TARGET[r["scene"]]
        lines.append(f"RSS: {r['rss_mib']:.1f} MiB, target <= {limit:.0f}: "
                     f"{'met' if r['rss_mib'] <= limit else 'MISSED'}")
    if "list" in r and r["scene"] in LIST_TARGET:
        ratio, limit = r["list"]["ratio"], LIST_TARGET[r["scene"]]
        verdict = "met" if ratio <= limit else "MISSED"
        lines.append(f"list / ss -ltnup: {ratio:.2f}, target <= {limit}: {verdict}")
    return lines


def report(results: list[dict[str, Any]]) -> str:
    names = [r["scene"] for r in results]
    out = ["| daemon, whole-process CPU (ms per second) | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    for case in results[0]["cases"]:
        cells = []
        for r in results:
            c = r["cases"].get(case)
            runs = "" if c is None or len(c.get("runs", [])) < 2 else " (" + ", ".join(
                f"{x:.1f}" for x in c["runs"]) + ")"
            cells.append("" if c is None else f"{c['ms_per_s']:.1f}{runs}")
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    out.append("| RSS at the end, MiB | " + " | ".join(f"{r['rss_mib']:.1f}" for r in results) + " |")
    if all("list" in r for r in results):
        out.append("| `portwatch list` / `ss -ltnup` (wall) | "
                   + " | ".join(f"{r['list']['ratio']:.2f}" for r in results) + " |")
    if all("parts" in r for r in results):
        out.append("| in-process tick parts, ms (median of 30 ticks): | " + " | " * (len(names) - 1) + " |")
        for key in PARTS:
            cells = " | ".join(f"{r['parts'][key] * 1000:.1f}" for r in results)
            out.append(f"| {key[:-2]} | {cells} |")
    for r in results:
        out.append("")
        out.append(f"{r['scene']} ({r['info'].get('listeners')} listeners, {r['info'].get('host_processes')} "
                   f"processes, {r['info'].get('host_fds')} fds):")
        out.extend(f"- {line}" for line in verdicts(r))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", default="medium,large")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--tree", type=Path, default=ROOT, help="a checkout whose portwatch/ to measure")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds from the start to the first case")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of a load before it is measured")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2, help="every case this many times, order reversed")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: parts, list")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print the table of an earlier --json, measure nothing")
    opts = parser.parse_args(argv)
    if opts.report:
        print(report(json.loads(opts.report.read_text())))
        return 0
    opts.skip = set(filter(None, opts.skip.split(",")))
    results = []
    with Tree.prepare(opts.python, opts.tree) as tree, tempfile.TemporaryDirectory() as tmp:
        for name in opts.scenes.split(","):
            results.append(bench_scene(name, tree, Path(tmp) / name, opts))
            if opts.json:
                opts.json.write_text(json.dumps(results, indent=1))
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
