"""What watching every network namespace costs: the daemon's CPU with 50 extra namespaces of
10 listeners each on a bench scene, `portwatch list --all-netns` against `ss -ltnup` run once per
namespace, and the daemon's memory.

As root, from a checkout (see bench/README.md):
    sudo /tmp/pwbench/bin/python bench/netns.py --scene medium --json netns.json

Each namespace is an `ip netns` namespace (loopback up) with one process holding its listeners;
everything started is stopped by pid and every namespace deleted at the end. The daemon runs
with `--no-proc-events` at interval 1 s in three modes, alternated: `netns: host` (today's
host-only watch), `netns: all` reading other namespaces through /proc/<pid>/net (as under the
hardened unit: started without CAP_SYS_ADMIN, so it cannot setns), and `netns: all` entering
them (root with CAP_SYS_ADMIN: a sock_diag socket opened inside each). Its CPU time over
`--seconds` (60 by default: one whole refresh period of the /proc path) after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import ROOT, Daemon, Scene, Tree, finish, timed

HOLDER = r"""
import socket, sys, time
count = int(sys.argv[1])
held = []
for i in range(count):
    family = socket.AF_INET6 if i % 3 == 2 else socket.AF_INET
    kind = socket.SOCK_DGRAM if i % 5 == 4 else socket.SOCK_STREAM
    s = socket.socket(family, kind)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 20000 + i))
    if kind == socket.SOCK_STREAM:
        s.listen()
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""

MODES = {
    "host": ("netns: host\n", []),
    "all, /proc/<pid>/net": ("netns: all\n",
                             ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]),
    "all, setns + sock_diag": ("netns: all\n", []),
}


class Namespaces:
    """`count` ip netns namespaces, each with one process holding `listeners` listeners."""

    def __init__(self, count: int, listeners: int) -> None:
        self.names: list[str] = []
        self.holders: list[subprocess.Popen[str]] = []
        try:
            self._start(count, listeners)
        except BaseException:
            self.close()
            raise

    def _start(self, count: int, listeners: int) -> None:
        for name in (f"pwbench-{os.getpid()}-{i}" for i in range(count)):
            self.names.append(name)
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            argv = ["ip", "netns", "exec", name, sys.executable, "-c", HOLDER, str(listeners)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.holders.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the holder in {name} did not start")

    def close(self) -> None:
        for proc in self.holders:
            finish(proc)
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], check=False)


def daemon_cpu(tree: Tree, workdir: Path, mode: str, warmup: float, seconds: float) -> dict[str, float]:
    extra, prefix = MODES[mode]
    where = workdir / mode.replace("/", "_").replace(" ", "")
    daemon = Daemon(tree, where, proc_events=False, extra_config=extra, prefix=prefix)
    try:
        time.sleep(warmup)
        before, start = daemon.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        used, took = daemon.cpu_seconds() - before, time.monotonic() - start
        listeners = daemon.started.get("listeners", 0)
        return {"ms_per_s": used / took * 1000, **daemon.memory(), "listeners_at_start": listeners}
    finally:
        daemon.stop()


def listing(tree: Tree, names: list[str], pairs: int) -> dict[str, Any]:
    """`portwatch list --all-netns` against `ss -ltnup` in the host and in each namespace."""
    ratios, ours, theirs = [], [], []
    for i in range(pairs):
        def portwatch() -> float:
            return timed(tree.argv("list", "--all-netns"), env=tree.env())[0]

        def ss_everywhere() -> float:
            total = timed(["ss", "-ltnup"])[0]
            for name in names:
                total += timed(["ip", "netns", "exec", name, "ss", "-ltnup"])[0]
            return total

        if i % 2:
            b, a = ss_everywhere(), portwatch()
        else:
            a, b = portwatch(), ss_everywhere()
        ours.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return {"ratio": statistics.median(ratios), "portwatch_s": statistics.median(ours),
            "ss_s": statistics.median(theirs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scene", default="medium")
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--listeners", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2, help="daemon runs per mode, alternated")
    parser.add_argument("--pairs", type=int, default=5, help="alternating list/ss pairs")
    parser.add_argument("--skip", default="", help="comma-separated: cpu,list")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"scene": args.scene, "namespaces": args.namespaces, "listeners": args.listeners}
    with Tree.prepare(sys.executable, ROOT) as tree, tempfile.TemporaryDirectory() as tmp:
        scene = Scene(args.scene)
        spaces = None
        try:
            spaces = Namespaces(args.namespaces, args.listeners)
            if "cpu" not in skip:
                runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
                for r in range(args.rounds):
                    order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        runs[mode].append(daemon_cpu(tree, Path(tmp), mode, args.warmup, args.seconds))
                        print(f"{mode}: {runs[mode][-1]}", file=sys.stderr, flush=True)
                result["daemon"] = runs
            if "list" not in skip:
                result["list"] = listing(tree, spaces.names, args.pairs)
        finally:
            if spaces is not None:
                spaces.close()
            scene.close()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def report(r: dict[str, Any]) -> str:
    n = r["namespaces"]
    lines = [f"{r['scene']} scene + {n} namespaces of {r['listeners']} listeners"]
    host = None
    for mode, runs in r.get("daemon", {}).items():
        cpu = statistics.median(x["ms_per_s"] for x in runs)
        rss = max(x.get("VmRSS", 0.0) for x in runs)
        spread = ", ".join(f"{x['ms_per_s']:.1f}" for x in runs)
        if mode == "host":
            host = cpu
        extra = "" if host is None or mode == "host" else f"; +{(cpu - host) / n:.2f} ms per namespace"
        lines.append(f"  daemon CPU, {mode}: {cpu:.1f} ms/s (runs {spread}), RSS {rss:.1f} MiB{extra}")
    if "list" in r:
        x = r["list"]
        lines.append(f"  list --all-netns / ss -ltnup per namespace: {x['ratio']:.2f} "
                     f"({x['portwatch_s'] * 1000:.0f} ms against {x['ss_s'] * 1000:.0f} ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
