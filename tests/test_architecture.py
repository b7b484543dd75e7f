"""The import rule: layers import downwards only, and pure modules do no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portwatch"

LAYERS = [
    {"__init__", "model", "text"},
    {"procfs", "snapshot", "policy", "config", "events", "render"},
    {"proc", "sockdiag", "procconn", "hooks", "journal", "notify", "watch", "state"},
    {"scan", "log"},
    {"daemon"},
    {"cli"},
    {"__main__"},
]
PURE = LAYERS[0] | LAYERS[1]
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
