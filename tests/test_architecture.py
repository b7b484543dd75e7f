"""The import rule: layers import downwards only, and pure modules do no I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portwatch"

LAYERS = [
    {"__init__", "model", "text", "closing"},
    {"procfs", "snapshot", "policy", "config", "events", "render", "access", "holders", "schedule",
     "judge", "pace", "yamlread", "bindfail", "conflicts", "why", "netns", "gauges", "baseline", "explain",
     "ephemeral"},
    {"activation"},
    {"procfd", "libc", "atomicfile"},  # procfd reads /proc/<pid>/fd importing only os (the walk starts early)
    {"proc", "sockdiag", "procconn", "hooks", "journal", "notify", "watch", "state", "sdbus", "bindcheck",
     "journalfollow", "journalread", "metrics", "output"},
    {"walk", "namespaces"},
    {"scan", "log", "report", "history"},
    {"conflictwatch"},
    {"daemon"},
    {"cli"},
    {"__main__"},
]
PURE = LAYERS[0] | LAYERS[1] | LAYERS[2]
IO_MODULES = {"os", "subprocess", "socket", "time", "structlog", "pyinotify", "select", "selectors",
              "signal", "shutil", "pathlib", "threading", "sdnotify", "tempfile", "ctypes"}


def _layer(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"portwatch/{name}.py is in no layer: add it to LAYERS")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "portwatch":
                found |= {
                    f"portwatch.{alias.name}" if (PACKAGE / f"{alias.name}.py").exists()
                    else "portwatch.__init__"
                    for alias in node.names
                }
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_down(name: str) -> None:
    """A module imports only from lower layers; edges never import each other."""
    mine = _layer(name)
    for module in _imports(PACKAGE / f"{name}.py"):
        if not module.startswith("portwatch."):
            continue
        other = module.split(".")[1]
        theirs = _layer(other)
        assert theirs < mine or (theirs == mine and mine in (0, 1) and other != name), (
            f"{name} (layer {mine}) imports {other} (layer {theirs})"
        )


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    """Parsers and decisions take text and values; they never open, spawn, sleep or log."""
    path = PACKAGE / f"{name}.py"
    if not path.exists():
        pytest.fail(f"missing pure module {name}")
    bad = {m for m in _imports(path) if m.split(".")[0] in IO_MODULES}
    assert not bad, f"{name} imports {bad}"


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code`."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent,
    )
    return set(out.stdout.split())


def test_one_shot_views_import_little() -> None:
    """Start-up is a large part of `portwatch list`: keep the heavy modules off its path."""
    loaded = _modules_after("from portwatch.cli import build_parser; build_parser().parse_args(['list'])")
    loaded -= _modules_after("pass")  # what the interpreter loads anyway (site, an editable install's hook)
    heavy = {"dataclasses", "inspect", "ipaddress", "json", "shutil", "structlog", "yaml", "pyinotify",
             "jeepney", "prometheus_client"}
    assert not loaded & heavy
    daemon = _modules_after("import portwatch.daemon")
    assert "jeepney" not in daemon  # only once systemd holds a listener
    assert "prometheus_client" not in daemon  # only when the config asks for metrics


def test_the_daemon_does_not_load_asyncio_for_structlog() -> None:
    """structlog imports asyncio (and ssl, 11 MiB) for methods portwatch never calls: it gets a stand-in."""
    loaded = _modules_after("import portwatch.daemon")
    assert "structlog" in loaded
    assert not loaded & {"asyncio.base_events", "ssl"}
    # The stand-in hands over to the real asyncio at first use, and later importers get the real one.
    code = """
import portwatch.log, structlog._native as native, asyncio, types
assert type(asyncio) is types.ModuleType and asyncio.get_running_loop is native.asyncio.get_running_loop
async def main(): return 42
assert asyncio.run(main()) == 42
"""
    assert "asyncio.base_events" in _modules_after(code)
