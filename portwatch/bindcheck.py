"""What the kernel says about binding a port now: a real bind(), closed at once, and the
settings that decide whether an IPv6 wildcard takes IPv4 too."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from portwatch.model import Proto

BINDV6ONLY = "/proc/sys/net/ipv6/bindv6only"


def system_v6only(path: str = BINDV6ONLY) -> bool:
    """net.ipv6.bindv6only: the IPV6_V6ONLY a socket gets when its program sets none."""
    try:
        with open(path) as f:  # noqa: PTH123 (one small read)
            return f.read().strip() == "1"
    except OSError:
        return False


def try_bind(proto: Proto, address: str, port: int, *, v6only: bool) -> OSError | None:
    """Bind as a server does (SO_REUSEADDR) and close at once: None, or what it raised."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if proto is Proto.TCP else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            sock.bind((address, port))
        except OSError as exc:
            return exc
    return None


def process_started(pid: int, proc: str = "/proc") -> str | None:
    """When a process started (UTC, to the second), from its stat and the boot time."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:  # noqa: PTH123
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"{proc}/stat", "rb") as f:  # noqa: PTH123
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, IndexError, ValueError, StopIteration):
        return None
    started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

