"""Build a busy host on loopback for the benchmark, hold it, and tear it down.

    python bench/scene.py {small,medium,large} [--no-connections] [--max-seconds N]

One generator process forks every process of the scene (fork is cheap and the
children share the generator's memory):

- servers hold listeners (TCP and UDP, IPv4 and IPv6, all on 127.0.0.1, ::1
  or ::ffff:127.0.0.1); some fork workers that share every listener, as a
  pre-fork server does;
- connection holders each hold one listener and up to 2,500 established
  loopback connections (client and server side both, so 2 fds each);
- idle processes hold ordinary fds (/dev/null, pipes, a few AF_UNIX pairs).

When everything is ready the generator prints one JSON line (pids, counts, the
measured fd total) on stdout. Commands on stdin, one per line:
`drop-connections` replaces every connection fd by /dev/null (same processes,
same fd count, no established connections) and answers `dropped N`; `stop`,
EOF, SIGTERM, SIGINT or --max-seconds tear the scene down: every process it
started is killed by pid and reaped. Children also die with the generator
(PR_SET_PDEATHSIG), so a crashed runner leaves nothing behind. Nothing else on
the host is touched: only this process tree's RLIMIT_NOFILE is raised.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import gc
import json
import math
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
CONNS_PER_HOLDER = 2_500
MAX_FILLER = 15_000  # per process, under the usual hard RLIMIT_NOFILE of 20,000
LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT left behind


@dataclass(frozen=True)
class SceneSpec:
    name: str
    listeners: int
    connections: int
    processes: int
    fds: int
    seed: int = 1


PRESETS = {
    "small": SceneSpec("small", 100, 500, 150, 5_000),
    "medium": SceneSpec("medium", 1_000, 5_000, 650, 40_000),
    "large": SceneSpec("large", 10_000, 50_000, 2_400, 320_000),
}


@dataclass
class ProcPlan:
    kind: str  # server, worker-parent (a server with workers), conn, idle
    name: str
    listeners: list[tuple[str, int, str, int]] = field(default_factory=list)  # proto, family, addr, port
    workers: int = 0
    connections: int = 0
    filler: int = 0
    unix_pairs: int = 0


def plan(spec: SceneSpec) -> list[ProcPlan]:
    """Who holds what: deterministic for a given spec (seeded)."""
    rng = random.Random(spec.seed)  # noqa: S311 (a reproducible layout, not a secret)
    conn_holders = math.ceil(spec.connections / CONNS_PER_HOLDER) if spec.connections else 0
    servers = max(1, round(spec.processes * 0.2))
    with_workers = [rng.random() < 0.3 for _ in range(servers)]
    workers = [rng.randint(1, 4) if w else 0 for w in with_workers]
    idle = max(0, spec.processes - conn_holders - servers - sum(workers))
    procs: list[ProcPlan] = []

    ports = {"tcp4": 10_000, "tcp6": 10_000, "udp4": 10_000, "udp6": 10_000}

    def listener(kind: str) -> tuple[str, int, str, int]:
        proto, fam = kind[:3], int(kind[3])
        space = kind
        address = "127.0.0.1" if fam == 4 else "::1"
        if kind == "tcp6m":  # an IPv4-mapped IPv6 listener shares IPv4's port space
            proto, fam, address, space = "tcp", 6, "::ffff:127.0.0.1", "tcp4"
        ports[space] += 1
        return proto, fam, address, ports[space]

    def pick_kind() -> str:
        r = rng.random()
        if r < 0.68:
            return "tcp4"
        if r < 0.70:
            return "tcp6m"
        if r < 0.85:
            return "tcp6"
        if r < 0.95:
            return "udp4"
        return "udp6"

    for i in range(conn_holders):
        count = min(CONNS_PER_HOLDER, spec.connections - i * CONNS_PER_HOLDER)
        # One destination address per holder: ephemeral ports are per destination.
        addr = f"127.0.1.{i + 1}"
        procs.append(ProcPlan("conn", f"pw-conn-{i}", [("tcp", 4, addr, 9_000 + i)], connections=count))

    # Listeners per server: heavy-tailed, at least one each.
    to_spread = max(0, spec.listeners - conn_holders)
    weights = [rng.paretovariate(1.2) for _ in range(servers)]
    total = sum(weights)
    counts = [1 + int((to_spread - servers) * w / total) for w in weights]
    for i in range(to_spread - sum(counts)):
        counts[i % servers] += 1
    for i, count in enumerate(counts):
        kind = "worker-parent" if workers[i] else "server"
        procs.append(ProcPlan(kind, f"pw-srv-{i}", [listener(pick_kind()) for _ in range(count)],
                              workers=workers[i]))
    procs.extend(ProcPlan("idle", f"pw-idle-{i}") for i in range(idle))

    # Ordinary fds fill the rest of the fd budget. Every process has 5 of its
    # own (stdio, /dev/null, the ready pipe); listeners are in their holder and
    # in each worker; a connection is two fds.
    n_procs = len(procs) + sum(workers)
    used = 5 * n_procs + 2 * spec.connections
    used += sum(len(p.listeners) * (1 + p.workers) for p in procs)
    filler = max(0, spec.fds - used)
    holders = [p for p in procs if p.kind != "conn"]
    weights = [rng.lognormvariate(0, 1.3) for _ in holders]
    total = sum(weights)
    for p, w in zip(holders, weights, strict=True):
        p.filler = min(MAX_FILLER, int(filler * w / total))
        p.unix_pairs = 1 if rng.random() < 0.1 else 0
    return procs


# -- the generator -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int | bytes) -> None:
    value = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Generator:
    def __init__(self, spec: SceneSpec) -> None:
        self.spec = spec
        self.pids: list[int] = []  # every process started, grandchildren included
        self.kinds: dict[int, str] = {}
        self.conn_pids: list[int] = []
        self.rfd, self.wfd = os.pipe()
        self._buf = b""

    def build(self, timeout: float) -> dict[str, object]:
        start = time.monotonic()
        procs = plan(self.spec)
        expected = len(procs) + sum(p.workers for p in procs)
        gc.collect()
        gc.freeze()  # children do not dirty the parent's pages by collecting them
        for p in procs:
            pid = os.fork()
            if pid == 0:
                os.close(self.rfd)
                _child(p, self.wfd)  # never returns
            self.pids.append(pid)
            self.kinds[pid] = p.kind
        started = set(self.pids)
        ready = 0
        deadline = start + timeout
        while ready < expected:
            for line in self._lines(deadline):
                word, pid_text, *rest = line.split()
                pid = int(pid_text)
                if word == "error":
                    raise RuntimeError(f"scene process {pid}: {' '.join(rest)}")
                if word != "ready":
                    continue
                ready += 1
                if pid not in started:
                    self.pids.append(pid)  # a worker, forked by its server
                    self.kinds[pid] = "worker"
                    started.add(pid)
                if self.kinds[pid] == "conn":
                    self.conn_pids.append(pid)
        return self._report(procs, time.monotonic() - start)

    def _lines(self, deadline: float) -> list[str]:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
            raise TimeoutError("the scene was not ready in time")
        chunk = os.read(self.rfd, 65536)
        if not chunk:
            raise RuntimeError("scene processes closed the pipe")
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [x.decode() for x in lines if x]

    def _report(self, procs: list[ProcPlan], seconds: float) -> dict[str, object]:
        fds = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                fds += _count_fds(pid)
        return {
            "pid": os.getpid(),
            "spec": asdict(self.spec),
            "processes": len(self.pids),
            "listeners": sum(len(p.listeners) for p in procs),
            "shared_listeners": sum(len(p.listeners) for p in procs if p.workers),
            "ipv6_listeners": sum(1 for p in procs for x in p.listeners if x[1] == 6),
            "udp_listeners": sum(1 for p in procs for x in p.listeners if x[0] == "udp"),
            "connections": sum(p.connections for p in procs),
            "scene_fds": fds,
            "host_fds": host_fds(),
            "host_processes": len(_host_pids()),
            "build_seconds": round(seconds, 2),
            "pids": {kind: [p for p in self.pids if self.kinds[p] == kind]
                     for kind in sorted(set(self.kinds.values()))},
        }

    def drop_connections(self, timeout: float = 120.0) -> int:
        for pid in self.conn_pids:
            os.kill(pid, signal.SIGUSR1)
        done = 0
        deadline = time.monotonic() + timeout
        while done < len(self.conn_pids):
            done += sum(1 for line in self._lines(deadline) if line.startswith("dropped"))
        return done

    def teardown(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # We are the subreaper: the workers of killed servers come back to us.
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue


def host_fds() -> int:
    total = 0
    for pid in _host_pids():
        with contextlib.suppress(OSError):
            total += _count_fds(pid)
    return total


def _host_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _count_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


# -- one scene process -----------------------------------------------------------


def _child(p: ProcPlan, wfd: int) -> None:
    code = 0
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(PR_SET_NAME, p.name.encode()[:15])
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        held: list[socket.socket] = []
        for proto, family, address, port in p.listeners:
            held.append(_listen(proto, family, address, port))
        for _ in range(p.workers):  # workers share the listeners, nothing else
            pid = os.fork()
            if pid == 0:
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                _prctl(PR_SET_NAME, (p.name.replace("srv", "wrk")).encode()[:15])
                os.write(wfd, f"ready {os.getpid()}\n".encode())
                _pause()
        conn_fds = _connect(held[0], p.connections) if p.connections else []
        for _ in range(p.unix_pairs):
            held.extend(socket.socketpair())
        if p.filler:
            r, _w = os.pipe()
            for i in range(p.filler - 2):
                os.dup(null if i % 16 else r)
        if conn_fds:
            def drop(_sig: int, _frame: object) -> None:
                for fd in conn_fds:
                    os.dup2(null, fd)
                os.write(wfd, f"dropped {os.getpid()}\n".encode())

            signal.signal(signal.SIGUSR1, drop)
        os.write(wfd, f"ready {os.getpid()}\n".encode())
        _pause()
    except BaseException as exc:  # report anything, then exit without unwinding the parent's state
        with contextlib.suppress(OSError):
            os.write(wfd, f"error {os.getpid()} {type(exc).__name__}: {exc}\n".encode())
        code = 1
    os._exit(code)


def _pause() -> None:
    while True:
        signal.pause()


def _listen(proto: str, family: int, address: str, port: int) -> socket.socket:
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    sock = socket.socket(af, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    if family == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address.startswith("::ffff:") else 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        sock.bind((address, 0))  # someone on the host has that port: any other will do
    if proto == "tcp":
        sock.listen(4096)
    return sock


def _connect(server: socket.socket, count: int) -> list[int]:
    """`count` loopback connections to `server`, both ends kept here as raw fds."""
    fds: list[int] = []
    address = server.getsockname()
    batch = 500  # well under the accept backlog, so connect() never waits for a retransmit
    for start in range(0, count, batch):
        n = min(batch, count - start)
        for _ in range(n):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            client.connect(address)
            fds.append(client.detach())
        for _ in range(n):
            conn, _peer = server.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            fds.append(conn.detach())
    return fds


def _raise_nofile() -> None:
    """Soft limit up to the hard one, for this process tree only (raising the hard needs CAP_SYS_RESOURCE)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max(MAX_FILLER, 2 * CONNS_PER_HOLDER) + 64:
        raise SystemExit(f"scene.py: RLIMIT_NOFILE hard limit {hard} is too low; need {MAX_FILLER + 64}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scene", choices=sorted(PRESETS))
    parser.add_argument("--no-connections", action="store_true",
                        help="no established connections (ordinary fds instead, same total)")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="tear down after this long whatever happens (default 1 h)")
    parser.add_argument("--build-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    spec = PRESETS[args.scene]
    if args.no_connections:
        spec = SceneSpec(spec.name + "-noconn", spec.listeners, 0, spec.processes, spec.fds, spec.seed)
    _raise_nofile()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gen = Generator(spec)
    deadline = time.monotonic() + args.max_seconds
    try:
        report = gen.build(args.build_timeout)
        print(json.dumps(report), flush=True)
        while not stop and time.monotonic() < deadline:
            if not select.select([sys.stdin], [], [], 1.0)[0]:
                continue
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
            if line.strip() == "drop-connections":
                print(f"dropped {gen.drop_connections()}", flush=True)
    except Exception as exc:  # one line to the runner, never a half-built scene
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    finally:
        gen.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
