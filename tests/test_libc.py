"""The libc calls `os` lacks (portwatch.libc), on this machine's real C library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from portwatch.libc import drop_ambient_capabilities, punch_hole
from tests.conftest import ROOT


def test_drop_ambient_capabilities_is_quiet_without_any() -> None:
    drop_ambient_capabilities()  # nothing to clear here: must not raise
    drop_ambient_capabilities()


def test_punch_hole_frees_blocks_and_keeps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with open(path, "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        fd = f.fileno()
        before = os.fstat(fd)
        assert punch_hole(fd, 1 << 19)
        after = os.fstat(fd)
    assert after.st_size == before.st_size == 1 << 20
    assert after.st_blocks < before.st_blocks
    with open(path, "rb") as f:
        data = f.read()
    assert data[: 1 << 19] == b"\0" * (1 << 19) and data[1 << 19 :] == b"x" * (1 << 19)


# Fill the C heap with 30 MiB of 1 KiB objects, free all but every 64th (so the top of the heap
# stays in use and malloc cannot give it back by itself), then trim. Prints resident KiB.
TRANSIENT = """
import sys
from portwatch.libc import release_free_heap
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
blocks = [bytes(1024) + bytes([i % 256]) for i in range(30 * 1024)]
kept = blocks[::64]
del blocks
before = rss()
release_free_heap()
print(before, rss())
"""


def test_release_free_heap_gives_back_what_a_transient_left() -> None:
    out = subprocess.run([sys.executable, "-c", TRANSIENT], capture_output=True, text=True, check=True, cwd=ROOT)
    before, after = map(int, out.stdout.split())
    assert before - after > 20 * 1024, (before, after)  # of the ~30 MiB freed, most goes back
