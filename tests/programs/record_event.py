#!/usr/bin/env python3
"""A hook that records what it was given: argv, PORTWATCH_* environment (as hex bytes), stdin.

Usage: record_event.py OUTFILE [args...]; appends one JSON line per run.
"""

import json
import os
import sys

record = {
    "argv": [os.fsencode(a).hex() for a in sys.argv],
    "env": {k.decode(): v.hex() for k, v in os.environb.items() if k.startswith(b"PORTWATCH_")},
    "inherited": sorted(
        k.decode()
        for k in os.environb
        if k in (b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID")
    ),
    "stdin": sys.stdin.buffer.read().hex(),
    "pid": os.getpid(),
}
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(record) + "\n")
