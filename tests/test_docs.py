"""The README, the unit and the CLI agree."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from portwatch.cli import build_parser
from tests.conftest import EVENT_NAMES, ROOT

README = (ROOT / "README.md").read_text()


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_command_is_documented(command: str) -> None:
    """Each subcommand appears in the README as `portwatch COMMAND`."""
    assert f"portwatch {command}" in README


def test_unit_exec_start_parses() -> None:
    """The unit's ExecStart= is a command line the CLI accepts."""
    unit = (ROOT / "systemd" / "portwatch.service").read_text()
    (line,) = re.findall(r"^ExecStart=(.+)$", unit, re.MULTILINE)
    argv = shlex.split(line)
    assert argv[0].endswith("/portwatch")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("run", "/etc/portwatch.yaml")


def test_quick_start_has_two_commands_and_ci_runs_the_second() -> None:
    """The Quick start is two commands; .ci/run runs the test one verbatim."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", quick, re.DOTALL)
    assert len(commands) == 2
    assert "portwatch run --config etc/portwatch.yaml" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_event_is_in_the_events_table() -> None:
    """Each event portwatch emits has a row in the README's table (`event` or `a` / `b`)."""
    table = README.split("### Events", 1)[1].split("\n### ", 1)[0]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert documented == EVENT_NAMES
