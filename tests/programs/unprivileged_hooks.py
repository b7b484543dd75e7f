#!/usr/bin/env python3
"""Run a few hooks as an unprivileged daemon would, and print the reports as JSON.

Started by tests/test_hooks.py as a non-root user holding an ambient
capability (setpriv), with PYTHONPATH pointing at the source tree. Without root
the runner spawns hooks directly (no setpriv), so this covers the spawn-error
paths and the per-thread ambient capability drop.
"""

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from portwatch.hooks import HookRunner

CAPS = "grep -E '^Cap(Eff|Prm|Amb)' /proc/self/status; exit 1"


def main() -> None:
    # Control: a child of this (main) thread does inherit the ambient capability.
    control = subprocess.run(
        ["/bin/sh", "-c", CAPS], capture_output=True, text=True, check=False
    ).stdout
    events: list[tuple[str, dict[str, Any]]] = []
    done = threading.Condition()

    def emit(name: str, fields: dict[str, Any]) -> None:
        with done:
            events.append((name, fields))
            done.notify_all()

    with tempfile.TemporaryDirectory() as tmp:
        noexec = Path(tmp, "noexec")
        noexec.write_text("#!/bin/sh\nexit 0\n")
        noshebang = Path(tmp, "noshebang")
        noshebang.write_text("echo should not run\n")
        noshebang.chmod(0o755)
        hooks = {
            "missing": [str(Path(tmp, "missing"))],
            "missing-on-path": ["portwatch-no-such-hook"],
            "noexec": [str(noexec)],
            "noshebang": [str(noshebang)],
            "caps": ["/bin/sh", "-c", CAPS],
        }
        runner = HookRunner(emit, max_parallel=2, cooldown=0)
        for name, argv in hooks.items():
            runner.submit(name, argv, 5.0, {"event": "test"}, name)
        with done:
            done.wait_for(lambda: len(events) == len(hooks), timeout=10)
        runner.close()
    json.dump({"control": control, "events": events}, sys.stdout)


if __name__ == "__main__":
    main()
