#!/usr/bin/env python3
"""Test hooks that misbehave, for the hook runner's tests.

usage: misbehave_hook.py MODE PIDFILE [ARG]

hang    ignore SIGTERM, start a child in the same group that ignores it too,
        write "PID CHILDPID" and sleep; only SIGKILL to the group ends both.
detach  start `sleep ARG` in a new session (it escapes the hook's group and
        holds the hook's stdout open), write its pid, exit 0 at once.
flood   write the pid, then ARG bytes of output (0: until killed), then
        "END-OF-FLOOD" and exit 1.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def write_pids(path: Path, *pids: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(" ".join(map(str, pids)))
    tmp.replace(path)


def main() -> None:
    mode, pidfile = sys.argv[1], Path(sys.argv[2])
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child through exec
        child = subprocess.Popen(["sleep", "300"])
        write_pids(pidfile, os.getpid(), child.pid)
        time.sleep(300)
    elif mode == "detach":
        grandchild = subprocess.Popen(["sleep", sys.argv[3]], start_new_session=True)
        write_pids(pidfile, grandchild.pid)
        print("left a grandchild", flush=True)
    elif mode == "flood":
        write_pids(pidfile, os.getpid())
        total = int(sys.argv[3])
        chunk = b"flood\n" * (1 << 17)
        written = 0
        out = sys.stdout.buffer
        while total == 0 or written < total:
            out.write(chunk)
            written += len(chunk)
        out.write(b"\nEND-OF-FLOOD\n")
        out.flush()
        sys.exit(1)
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
