"""Running `portwatch run` as a real process and reading its JSON event lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

Event = dict[str, Any]


class DaemonProcess:
    def __init__(self, config: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        if "--state-dir" not in extra:  # never the host's /var/lib/portwatch
            extra = (*extra, "--state-dir", str(config.parent / "state"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portwatch",
                "run",
                "--config",
                str(config),
                "--log-format",
                "json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self.events: list[Event] = []
        self.raw_lines: list[bytes] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw_lines.append(line)
                self.events.append(json.loads(line))  # every line must be one JSON object
                self._cond.notify_all()

    def mark(self) -> int:
        """A position in the event list; `since=` it waits only for later events."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = 5.0, since: int = 0
    ) -> Event:
        """The first event from position `since` matching `predicate`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    names = [e.get("event") for e in self.events]
                    raise AssertionError(f"no matching event within {timeout}s; saw {names}")
                self._cond.wait(min(left, 0.1))

    def wait_event(self, name: str, timeout: float = 5.0, since: int = 0, **fields: Any) -> Event:
        def match(e: Event) -> bool:
            return e.get("event") == name and all(e.get(k) == v for k, v in fields.items())

        return self.wait_for(match, timeout, since)

    def count(self, name: str, **fields: Any) -> int:
        with self._cond:
            return sum(
                1
                for e in self.events
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
            )

    def started(self, timeout: float = 10.0) -> Event:
        return self.wait_event("portwatch_started", timeout)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


@pytest.fixture
def daemons() -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(config: Path, *extra: str, **kw: Any) -> DaemonProcess:
        d = DaemonProcess(config, *extra, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
