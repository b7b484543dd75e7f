"""`portwatch explain`: the policy's dry run on real listeners, compared with what the daemon emits.

Real processes on loopback, a real config file, the real `portwatch run`; as root, and as
user nobody where the owners of root's sockets cannot be read (permission_denied).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AS_NOBODY, DaemonProcess, Holder, python_for_nobody, run_cli

pytestmark = pytest.mark.root

TCP = {"proto": "tcp", "family": 4, "address": "127.0.0.1"}


def _config(path: Path, ports: dict[str, int]) -> Path:
    exe = os.path.realpath(sys.executable)
    path.write_text(
        "interval: 0.2\nprotocols: [tcp]\nreserved:\n"
        f"  - name: good\n    ports: [{ports['good']}]\n    allow:\n      - comm: sshd\n"
        f"      - exe: {json.dumps(exe)}\n        user: root\n"
        f"  - name: bad\n    ports: [{ports['bad']}]\n    allow:\n      - comm: sshd\n"
        "      - unit: nginx.service\n"
        f"  - name: roots\n    ports: [{ports['roots']}]\n    allow:\n      - user: root\n"
    )
    path.chmod(0o644)
    return path


def _explain(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
             python: str = sys.executable) -> tuple[int, list[dict[str, Any]], str]:
    done = subprocess.run([*prefix, python, "-m", "portwatch", "explain", "--json", *args],
                          capture_output=True, text=True, env=env, cwd="/" if prefix else None,
                          check=False, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout or "[]"), done.stderr


def _by_port(found: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {entry["port"]: entry for entry in found}


def test_each_verdict_and_the_daemon_agrees(
    tmp_path: Path, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
) -> None:
    good = holders([TCP], name=b"good\x1b[2Jone")
    bad = holders([TCP], name=b"squat\nter", fork=1)
    free = holders([TCP])
    roots = holders([TCP])
    ports = {"good": good.port, "bad": bad.port, "roots": roots.port}
    config = _config(tmp_path / "pw.yaml", ports)

    status, found, _ = _explain("--config", str(config))
    assert status == 1  # a reserved port is taken
    by_port = _by_port(found)
    allowed, taken, unreserved = by_port[good.port], by_port[bad.port], by_port[free.port]
    assert (allowed["rule"], allowed["verdict"]) == ("good", "allowed")
    (holder,) = allowed["processes"]
    assert (holder["allowed"], holder["allow_entry"], holder["matched_keys"]) == (True, 1, ["exe", "user"])
    assert holder["comm"] == "good\x1b[2Jone"  # exact in JSON
    assert (taken["rule"], taken["verdict"]) == ("bad", "taken")
    assert [p["pid"] for p in taken["processes"]] == sorted([bad.pid, *bad.children])
    for process in taken["processes"]:
        assert process["allowed"] is False and process["allow_entry"] is None
        assert process["misses"] == [
            "allow[0]: comm 'squat\\nter' does not match 'sshd'",
            "allow[1]: unit 'nginx.service': the process is in no systemd unit"
            if process["unit"] is None else
            f"allow[1]: unit {process['unit']!r} does not match 'nginx.service'",
        ]
    assert (unreserved["rule"], unreserved["verdict"]) == (None, "unreserved")
    assert by_port[roots.port]["verdict"] == "allowed"

    # One port: exit 0 when it is held by whom its rule allows, 1 when not.
    assert _explain(str(good.port), "--config", str(config))[0] == 0
    assert _explain(str(bad.port), "--config", str(config))[0] == 1
    status, found, stderr = _explain(str(free.port), "--udp", "--config", str(config))
    assert (status, found) == (0, []) and "nothing listens on udp port" in stderr

    # The table escapes what the processes call themselves.
    table = run_cli("explain", "--config", str(config))
    assert table.returncode == 1
    assert "good\\x1b[2Jone" in table.stdout and "\x1b" not in table.stdout
    assert "squat\\nter" in table.stdout
    row = next(line for line in table.stdout.splitlines() if f":{good.port} " in line)
    assert "allowed" in row and "allow[1] matches on exe, user" in row

    # The daemon, on the same host with the same config, reports exactly the ports explain calls taken.
    d = daemons(config)
    d.started()
    marker = holders([TCP])
    d.wait_event("listener_opened", port=marker.port)
    reported = {e["port"]: e for e in d.events if e["event"] == "reserved_port_taken"}
    violated = {port for port, e in by_port.items() if e["verdict"] in ("taken", "unidentified")}
    assert set(reported) == violated == {bad.port}
    assert sorted(reported[bad.port]["offender_pids"]) == sorted([bad.pid, *bad.children])


def test_unidentified_holder_as_nobody_agrees_with_the_daemon(
    holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess], readable_tree: Path,
) -> None:
    """As nobody the owner of root's socket cannot be read: explain says unidentified
    (permission_denied) and exits 1; a daemon run as nobody reports it taken, unverified."""
    roots = holders([TCP])
    config = _config(readable_tree / "pw.yaml", {"good": 1, "bad": 2, "roots": roots.port})
    env = {"PYTHONPATH": str(readable_tree), "PATH": os.environ["PATH"]}
    python = python_for_nobody()
    status, found, stderr = _explain(str(roots.port), "--config", str(config), prefix=AS_NOBODY, env=env,
                                     python=python)
    assert status == 1, stderr
    (entry,) = found
    assert (entry["verdict"], entry["unresolved"], entry["processes"]) == ("unidentified", "permission_denied", [])
    assert "permission_denied" in entry["reason"]

    state = readable_tree / "state"
    state.mkdir(mode=0o777)
    d = daemons(config, prefix=AS_NOBODY, python=python, env=env, cwd="/", state_dir=state)
    taken = d.wait_event("reserved_port_taken", port=roots.port)
    assert (taken["verified"], taken["unresolved"], taken["rule"]) == (False, "permission_denied", "roots")


def test_a_bad_config_is_78_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("reserved:\n  - name: x\n    ports: [99999]\n")
    done = run_cli("explain", "--config", str(bad))
    assert done.returncode == 78 and done.stdout == ""
    assert done.stderr.startswith(f"{bad}:3: reserved[0].ports[0]: port 99999 is outside 1-65535")


def test_what_it_does_not_judge_is_said(tmp_path: Path) -> None:
    """A protocol the config does not watch, and rules for other network namespaces: named on
    stderr, as explain reads only portwatch's own namespace."""
    config = tmp_path / "pw.yaml"
    config.write_text("protocols: [tcp]\nreserved:\n  - name: web\n    ports: [8080]\n    netns: \"web*\"\n")
    done = run_cli("explain", "53", "--udp", "--config", str(config))
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "udp is not in the config's protocols" in done.stderr
    assert "rules for other network namespaces (web*) are not judged here" in done.stderr
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("reserved:\n  - name: web\n    ports: [8080]\n")
    assert "not judged" not in run_cli("explain", "--config", str(quiet)).stderr
