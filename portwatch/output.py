"""What a command gives back: its exit status, and its answer on stdout as a table or JSON."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, TextIO

from portwatch.render import table


class ExitStatus(IntEnum):
    OK = 0
    # `who`: nothing listens on that port; `why`: it cannot be bound; `explain`: a reserved port is
    # taken; `history`: no entry
    NOT_FOUND = BLOCKED = VIOLATION = 1
    USAGE = 2  # bad arguments (argparse's convention)
    DATA_ERROR = 65  # EX_DATAERR: a /proc table or the journal could not be parsed or read
    SOFTWARE = 70  # EX_SOFTWARE: portwatch made something wrong (a bug), and says what
    IO_ERROR = 74  # EX_IOERR: the output could not be written
    CONFIG_ERROR = 78  # EX_CONFIG: the unit sets RestartPreventExitStatus=78


def terminal_columns() -> int:
    """What shutil.get_terminal_size().columns says, without importing shutil."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def print_json(data: Any, out: TextIO | None = None) -> None:
    import json  # noqa: PLC0415 (here: most runs print a table, and start-up is much of their cost)

    out = out or sys.stdout
    # ensure_ascii: names that are not valid UTF-8 stay exact as \udcXX escapes
    # and the output is always valid ASCII text.
    json.dump(data, out, indent=2, ensure_ascii=True)
    out.write("\n")


def print_table(headers: Sequence[str], rows: list[list[str]]) -> None:
    width = terminal_columns() if sys.stdout.isatty() else None
    sys.stdout.write(table(headers, rows, width=width))
