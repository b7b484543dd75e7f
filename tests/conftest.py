"""Shared fixtures: real listener processes, the project root, a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"


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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m portwatch ARGS` as a user would, capturing both streams."""
    return subprocess.run(
        [sys.executable, "-m", "portwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )
