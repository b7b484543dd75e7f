"""Replacing a file in one rename: a reader sees the old content or the new one, never a part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: Path, data: bytes, mode: int, *, durable: bool = False) -> None:
    """Write `data` to a temporary file beside `path` with `mode`, then rename it over `path`.
    `durable`: on disk before the rename (a config file), not for a file rewritten every minute."""
    fd, name = tempfile.mkstemp(prefix=".portwatch-", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
