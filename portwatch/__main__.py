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
    walk = _early_walk()
    from portwatch.cli import console as cli_console  # noqa: PLC0415 (after the walk has begun)

    cli_console(walk)


def _early_walk() -> Walk | None:
    if sys.argv[1:2] not in (["list"], ["who"]):
        return None
    try:
        return Walk(DEFAULT_ROOT)
    except OSError:
        return None  # no /proc to walk: the CLI will say so


if __name__ == "__main__":
    console()
