"""What portwatch tells an administrator it would need to see every socket's owner."""

from __future__ import annotations

import pytest

from portwatch.access import CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, advice, lacking
from portwatch.procfs import parse_status_capabilities

BOTH = 1 << CAP_SYS_PTRACE | 1 << CAP_DAC_READ_SEARCH
EVERY = (1 << 41) - 1


@pytest.mark.parametrize(
    ("effective", "euid", "missing", "says", "never"),
    [
        (0, 65534, ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"], "run as root, or grant", "kernel"),
        (1 << CAP_SYS_PTRACE, 1000, ["CAP_DAC_READ_SEARCH"], "grant CAP_DAC_READ_SEARCH", "kernel"),
        (None, 1000, ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"], "run as root", "kernel"),
        (BOTH, 1000, [], "kernel refused", "run as root"),
        (EVERY, 0, [], "kernel refused", "grant"),
        (None, 0, [], "kernel refused", "grant"),  # root, capabilities unreadable: assumed held
        (EVERY & ~(1 << CAP_SYS_PTRACE), 0, ["CAP_SYS_PTRACE"], "root runs without CAP_SYS_PTRACE",
         "run as root"),
    ],
)
def test_advice_names_what_is_really_missing(
    effective: int | None, euid: int, missing: list[str], says: str, never: str
) -> None:
    assert lacking(effective, euid) == missing
    text = advice(effective, euid)
    assert says in text and never not in text


def test_capabilities_from_status() -> None:
    status = "Name:\tsshd\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n"
    assert parse_status_capabilities(status) == 0x1FFFEFFFFFF
    assert parse_status_capabilities("Name:\tx\n") is None
    assert parse_status_capabilities("CapEff:\tzz\n") is None
