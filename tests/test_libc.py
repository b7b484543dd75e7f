"""The libc calls `os` lacks (portwatch.libc), on this machine's real C library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from portwatch.libc import punch_hole
from tests.conftest import ROOT, run_python


@pytest.mark.root
def test_drop_ambient_capabilities_clears_what_children_would_inherit() -> None:
    """Started with an ambient capability (as the unit grants them), the set is empty after the
    call, and again after a second one."""
    code = ("from portwatch.libc import drop_ambient_capabilities as drop\n"
            "ambient = lambda: next(x for x in open('/proc/self/status') if x.startswith('CapAmb')).split()[1]\n"
            "print(ambient()); drop(); print(ambient()); drop(); print(ambient())")
    grant = ["setpriv", "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
    result = run_python(code, prefix=grant)
    assert result.stdout.split() == ["0000000000000400", "0" * 16, "0" * 16]  # bit 10: CAP_NET_BIND_SERVICE


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
import pytest

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
