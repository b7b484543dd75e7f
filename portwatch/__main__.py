"""`portwatch` and `python -m portwatch`.

For `list` and `who`, most of a run is the walk of every process's fds.
It starts here, in forked helpers, before the CLI's imports and argument
parsing (a quarter of a run); the CLI takes it over, or stops it when the
arguments turn out not to want it (`portwatch list --help`).
"""

from __future__ import annotations

import sys

from portwatch.procfd import DEFAULT_ROOT
from portwatch.walk import Walk

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def console() -> NoReturn:
    walk = Walk(DEFAULT_ROOT) if sys.argv[1:2] in (["list"], ["who"]) else None
    from portwatch.cli import console as cli_console  # noqa: PLC0415 (after the walk has begun)

    cli_console(walk)


if __name__ == "__main__":
    console()
