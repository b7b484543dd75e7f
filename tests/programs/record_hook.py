#!/usr/bin/env python3
"""Test hook: record exactly what the hook runner gave this process.

usage: record_hook.py OUTDIR [SECONDS]

Writes OUTDIR/<pid>.json (atomically) with argv, environment and stdin as hex
(byte-exact), the capability lines of /proc/self/status, its process ids and
working directory, and CLOCK_MONOTONIC times around an optional sleep.
"""

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    start = time.monotonic()  # system-wide clock: comparable across hooks
    outdir = Path(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    stdin = sys.stdin.buffer.read()
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap") or key == "NoNewPrivs":
            status[key] = value.strip()
    time.sleep(seconds)
    record = {
        "argv": [os.fsencode(arg).hex() for arg in sys.argv],
        "env": {key.hex(): value.hex() for key, value in os.environb.items()},
        "stdin": stdin.hex(),
        "status": status,
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "cwd": str(Path.cwd()),
        "start": start,
        "end": time.monotonic(),
    }
    tmp = outdir / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(outdir / f"{os.getpid()}.json")


if __name__ == "__main__":
    main()
