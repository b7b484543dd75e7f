"""What the Prometheus metrics cost the daemon: the idle tick with them off, served and written, and
a scrape.

Run as root from a checkout, with prometheus_client installed for `--python`:

    sudo python3 bench/metrics.py [--scene medium] [--pairs 3] [--warmup 15] [--seconds 20] [--scrapes 300]

On bench/scene.py's scene (real processes holding real listeners), at interval 1 s, without
the proc connector (so nothing but the clock makes the daemon scan):

1. Idle: whole-process CPU per second of `portwatch run` over `--seconds` after `--warmup`,
   with `metrics:` unset, with `listen` (nobody scraping) and with `textfile`, rotating the
   three modes `--pairs` times; RSS beside it, and its private part (RssAnon: without the
   pages of shared libraries such as libssl, which other processes map too).
2. Scrape: with `listen`, `--scrapes` scrapes of /metrics, one every 50 ms; the daemon's CPU
   over them (from /proc/<pid>/stat, which keeps the time of the exited request threads) less
   its idle CPU over the same time, per scrape; and the scrape's wall time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run import ROOT, Daemon, Scene, Tree  # noqa: E402

MODES = ("off", "listen", "textfile")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """utime + stime of the whole process, exited threads included, in seconds (clock ticks:
    used where threads come and go, over enough work for the 10 ms steps not to matter)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def anon_mib(pid: int) -> float:
    """The private part of RSS (RssAnon): what is left of it once shared library pages are not counted."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics_config(mode: str, workdir: Path, port: int) -> str:
    if mode == "listen":
        return f'metrics:\n  listen: "127.0.0.1:{port}"\n'
    if mode == "textfile":
        return f"metrics:\n  textfile: {workdir}/portwatch.prom\n"
    return ""


def idle(tree: Tree, workdir: Path, mode: str, warmup: float, seconds: float) -> dict[str, float]:
    daemon = Daemon(tree, workdir, proc_events=False, interval=1.0,
                    extra_config=metrics_config(mode, workdir, free_port()))
    try:
        time.sleep(warmup)
        # Idle, no thread starts or ends: the threads' own nanosecond counters (schedstat).
        before, start = daemon.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        cpu, elapsed = daemon.cpu_seconds() - before, time.monotonic() - start
        return {"ms_per_s": cpu / elapsed * 1000, "rss_mib": daemon.memory()["VmRSS"],
                "anon_mib": anon_mib(daemon.proc.pid)}
    finally:
        daemon.stop()


def scrape_cost(tree: Tree, workdir: Path, warmup: float, scrapes: int, idle_ms_per_s: float
                ) -> dict[str, Any]:
    port = free_port()
    daemon = Daemon(tree, workdir, proc_events=False, interval=1.0,
                    extra_config=metrics_config("listen", workdir, port))
    try:
        time.sleep(warmup)
        url = f"http://127.0.0.1:{port}/metrics"
        size = len(urllib.request.urlopen(url, timeout=10).read())
        walls = []
        before, start = process_cpu(daemon.proc.pid), time.monotonic()
        for n in range(scrapes):
            began = time.monotonic()
            urllib.request.urlopen(url, timeout=10).read()
            walls.append(time.monotonic() - began)
            time.sleep(max(0.0, start + (n + 1) * 0.05 - time.monotonic()))
        cpu, elapsed = process_cpu(daemon.proc.pid) - before, time.monotonic() - start
        extra = cpu - idle_ms_per_s / 1000 * elapsed
        return {"scrapes": scrapes, "ms_per_scrape": extra / scrapes * 1000, "bytes": size,
                "wall_ms_median": statistics.median(walls) * 1000,
                "wall_ms_p95": sorted(walls)[int(len(walls) * 0.95)] * 1000}
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scene", default="medium")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scrapes", type=int, default=300)
    opts = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    scene = Scene(opts.scene)
    try:
        with Tree.prepare(opts.python, ROOT) as tree, tempfile.TemporaryDirectory() as tmp:
            for n in range(opts.pairs):
                for mode in MODES[n % 3:] + MODES[:n % 3]:  # each mode first once in three
                    run = idle(tree, Path(tmp) / f"{mode}-{n}", mode, opts.warmup, opts.seconds)
                    runs[mode].append(run)
                    print(f"{mode:>8}: {run['ms_per_s']:.2f} ms/s, RSS {run['rss_mib']:.1f} MiB "
                          f"(anon {run['anon_mib']:.1f})", flush=True)
            idle_on = statistics.median(r["ms_per_s"] for r in runs["listen"])
            scrape = scrape_cost(tree, Path(tmp) / "scrape", opts.warmup, opts.scrapes, idle_on)
    finally:
        scene.close()
    print(f"\nscene {opts.scene}: {scene.info.get('listeners')} listeners, interval 1 s, "
          f"medians of {opts.pairs} runs of {opts.seconds:.0f} s")
    off = statistics.median(r["ms_per_s"] for r in runs["off"])
    off_rss = statistics.median(r["rss_mib"] for r in runs["off"])
    off_anon = statistics.median(r["anon_mib"] for r in runs["off"])
    for mode in MODES:
        cpu = statistics.median(r["ms_per_s"] for r in runs[mode])
        rss = statistics.median(r["rss_mib"] for r in runs[mode])
        anon = statistics.median(r["anon_mib"] for r in runs[mode])
        print(f"  {mode:>8}: {cpu:6.2f} ms/s ({cpu - off:+.2f}), RSS {rss:5.1f} MiB ({rss - off_rss:+.1f}; "
              f"anon {anon - off_anon:+.1f})")
    print(f"  scrape: {scrape['ms_per_scrape']:.2f} ms of the daemon's CPU each "
          f"({scrape['scrapes']} scrapes, {scrape['bytes']} bytes), "
          f"wall median {scrape['wall_ms_median']:.1f} ms, p95 {scrape['wall_ms_p95']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
