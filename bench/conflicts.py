"""What following the journal costs the daemon: the idle tick with and without it, and a flood.

Run as root from a checkout (needs systemd-journald, journalctl, unshare, nsenter):

    sudo python3 bench/conflicts.py [--scene medium] [--pairs 3] [--warmup 60] [--seconds 20]

A private systemd-journald runs in a mount namespace of its own (tmpfs on /run and /var/log,
volatile storage, no rate limit), and the daemon runs in that namespace (nsenter -m), so its
`journalctl` child follows that journal and nothing of the host's is touched. The scene is
bench/scene.py's (real processes holding real listeners).

1. Idle: whole-process CPU of `portwatch run` (utime + stime from /proc/<pid>/stat) over
   `--seconds` after `--warmup`, with `follow_journal` true and false, alternating, `--pairs`
   times; the journalctl child's CPU is given beside it.
2. Flood: 10,000 matching lines in 10 s (one writer, one port; then one writer, a new port for
   every line), written over journald's native socket; the daemon's CPU over those 10 s and
   the 3 s after, its RSS growth, and the child's CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run import ROOT, Scene, Tree  # noqa: E402

JOURNALD_CONF = """\
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
START_JOURNALD = """\
set -eu
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/log
mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d
printf '%s' "$1" > /run/systemd/journald.conf.d/zz-bench.conf
exec /lib/systemd/systemd-journald
"""
# Sends `count` native entries in `seconds`, evenly spaced; argv: count seconds first_port step
WRITER = r"""
import socket, sys, time
count, seconds, port, step = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
start = time.monotonic()
for n in range(count):
    message = f"bind() to 127.0.0.1:{port + n * step} failed (98: Address already in use)"
    sock.sendto(f"MESSAGE={message}\nPRIORITY=3\n".encode(), "/run/systemd/journal/socket")
    delay = start + (n + 1) * seconds / count - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""


def cpu_of(pid: int) -> float:
    """CPU seconds of every thread of `pid` (schedstat: nanoseconds, not clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


class Journald:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                      START_JOURNALD, "sh", JOURNALD_CONF])
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{self.proc.pid}/root/run/systemd/journal/socket").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("journald did not start")
            time.sleep(0.05)

    def enter(self) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--"]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Daemon:
    def __init__(self, tree: Tree, journald: Journald, workdir: Path, *, follow: bool) -> None:
        workdir.mkdir(parents=True)
        config = workdir / "portwatch.yaml"
        config.write_text(f"interval: 1\nlog_listeners: true\nfollow_journal: {str(follow).lower()}\n")
        argv = [*journald.enter(), *tree.argv("run", "--config", str(config), "--log-format", "json",
                                              "--state-dir", str(workdir / "state"), "--no-proc-events")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=tree.env(), cwd=workdir)
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 300
        while not any(e.get("event") == "portwatch_started" for e in self.events):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the daemon, and of its journalctl child."""
        child = sum(cpu_of(pid) for pid in children(self.proc.pid)
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "journalctl")
        return cpu_of(self.proc.pid), child

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self._reader.join(5)


def idle(tree: Tree, journald: Journald, work: Path, opts: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for n in range(opts.pairs):
        for follow in (True, False) if n % 2 == 0 else (False, True):
            daemon = Daemon(tree, journald, work / f"idle-{n}-{follow}", follow=follow)
            try:
                time.sleep(opts.warmup)
                before, child_before = daemon.cpu()
                time.sleep(opts.seconds)
                after, child_after = daemon.cpu()
            finally:
                daemon.stop()
            runs.append({"follow_journal": follow, "ms_per_s": 1000 * (after - before) / opts.seconds,
                         "journalctl_ms_per_s": 1000 * (child_after - child_before) / opts.seconds})
            print(json.dumps(runs[-1]), flush=True)
    return runs


def flood(tree: Tree, journald: Journald, work: Path, step: int) -> dict[str, Any]:
    daemon = Daemon(tree, journald, work / f"flood-{step}", follow=True)
    try:
        time.sleep(10)
        rss_before = rss_mib(daemon.proc.pid)
        before, child_before = daemon.cpu()
        start = time.monotonic()
        subprocess.run([*journald.enter(), sys.executable, "-c", WRITER, "10000", "10", "20000", str(step)],
                       check=True)
        time.sleep(max(0.0, start + 13 - time.monotonic()))
        after, child_after = daemon.cpu()
        seconds = time.monotonic() - start
        rss_after = rss_mib(daemon.proc.pid)
        conflicts = [e for e in daemon.events if e.get("event") == "port_conflict"]
    finally:
        daemon.stop()
    return {"ports": "one" if step == 0 else "a new one per line", "seconds": round(seconds, 1),
            "daemon_cpu_share": round((after - before) / seconds, 3),
            "journalctl_cpu_share": round((child_after - child_before) / seconds, 3),
            "rss_growth_mib": round(rss_after - rss_before, 2), "port_conflict_events": len(conflicts),
            "repeats_reported": sum(int(e.get("repeats") or 0) for e in conflicts),
            "suppressed_reported": sum(int(e.get("suppressed") or 0) for e in conflicts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scene", default="medium")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--python", default=sys.executable)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="portwatch-conflicts-"))
    with Tree.prepare(opts.python, ROOT) as tree:
        scene = Scene(opts.scene)
        journald = Journald()
        try:
            runs = idle(tree, journald, work, opts)
            floods = [flood(tree, journald, work, step) for step in (0, 1)]
        finally:
            journald.close()
            scene.close()
    on = sorted(r["ms_per_s"] for r in runs if r["follow_journal"])
    off = sorted(r["ms_per_s"] for r in runs if not r["follow_journal"])
    print(f"idle daemon CPU, {opts.scene} scene, ms per s: follow_journal on {on}, off {off}; "
          f"median ratio {on[len(on) // 2] / off[len(off) // 2]:.3f} (budget 1.10)")
    for result in floods:
        print("flood:", json.dumps(result), "(budget: daemon < 0.20, RSS growth < 5 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
