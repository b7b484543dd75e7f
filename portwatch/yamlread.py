"""Reading YAML strictly, every value with its line: the layer under the config schema. Pure.

YAML 1.1 as PyYAML's SafeLoader implements it turns `on`/`no` into booleans,
`22:22` into the base-60 int 1342, `0755` into octal 493 and dates into
`datetime.date`. `StrictLoader` resolves only `true`/`false`, decimal ints,
plain floats and null; everything else stays a string, so a typo is rejected
where a number belongs instead of becoming a valid-looking number. PyYAML's
composed node tree keeps the line of every value; `NodeReader` turns nodes
into Python values and collects every problem as `PATH:LINE: where: what`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from portwatch.text import escape

T = TypeVar("T")

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, NULL = (_T + k for k in ("str", "int", "float", "bool", "null"))
MAP, SEQ = _T + "map", _T + "seq"

_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
# YAML 1.2 core floats, minus .inf/.nan and leading zeros (so "0755" stays a string).
_FLOAT_RE = re.compile(r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")
# Keys shown as `a.b` in key paths; others are quoted: `hooks['x.y']`.
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
# Seconds: anything larger (about 31 years) is a typo.
_NUMBER_MAX = 1e9
# Words YAML 1.1 reads as booleans: worth a hint when one shows up as a string.
_YAML11_BOOLS = {"y", "n", "yes", "no", "on", "off"}


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that resolves plain scalars like YAML 1.2's core schema.

    Only `true`/`false` are booleans, only `[-+]?(0|[1-9][0-9]*)` are ints,
    floats are decimal (`1.0`, `.5`, `1e3`), and `~`/`null`/empty are null.
    There are no merge keys, no timestamps, no octal or base-60 numbers.
    """

    yaml_implicit_resolvers: dict[str | None, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012 - PyYAML's class-level registry, filled once below


StrictLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|false)$"), list("tf"))
StrictLoader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
StrictLoader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
StrictLoader.add_implicit_resolver(
    NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


def _compose(text: str) -> Node | None:
    loader = StrictLoader(text)  # checks every character up front (ReaderError)
    try:
        node: Node | None = loader.get_single_node()
    finally:
        loader.dispose()
    return node


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def quote(value: str, limit: int = 60) -> str:
    # repr escapes control and format characters, so a value cannot break the line.
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def join_path(where: str, key: str) -> str:
    if _PLAIN_KEY_RE.match(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{quote(key)}]"


def describe(node: Node) -> str:
    """What a node is, for 'must be X, not Y' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    if node.tag == _STR:
        hint = " (YAML 1.1 booleans are not accepted)" if value.lower() in _YAML11_BOOLS else ""
        return f"the string {quote(value)}{hint}"
    if node.tag == _INT:
        return f"the integer {quote(value)[1:-1]}"
    if node.tag == _FLOAT:
        return f"the number {quote(value)[1:-1]}"
    if node.tag == _BOOL:
        return f"the boolean {value}"
    if node.tag == NULL:
        return "null (an empty value)"
    return f"a value tagged {quote(str(node.tag))}"


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class NodeReader:
    """Collects problems while turning a node tree into values (one per call; None on a problem)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[tuple[int, int, str]] = []  # line, column, message

    def lines(self) -> list[str]:
        # File order, so an admin can fix the file top to bottom.
        shown = escape(self.path)
        ordered = sorted(self.problems, key=lambda p: p[:2])
        out = [f"{shown}:{line}: {msg}" for line, _, msg in ordered]
        return list(dict.fromkeys(out))  # an alias used twice may repeat a problem

    def problem(self, node: Node | int, where: str, message: str) -> None:
        line, column = (node, 0) if isinstance(node, int) else (line_of(node), node.start_mark.column)
        self.problems.append((line, column, f"{where}: {message}" if where else message))

    # --- YAML layer -----------------------------------------------------------------------

    def compose(self, text: str | bytes) -> Node | None:
        if isinstance(text, bytes):
            data = text
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data.count(b"\n", 0, e.start) + 1
                self.problem(line, "", f"not a UTF-8 text file (byte 0x{data[e.start]:02x})")
                return None
        try:
            return _compose(text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 1
            column = f" (column {mark.column + 1})" if mark is not None else ""
            what = "; ".join(str(x) for x in (e.context, e.problem) if x)
            self.problem(line, "", f"YAML syntax error: {escape(what)}{column}")
            return None
        except yaml.reader.ReaderError as e:
            line = text.count("\n", 0, e.position) + 1
            char = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "?")
            self.problem(line, "", f"character U+{char:04X} is not allowed in YAML")
            return None
        except yaml.YAMLError as e:  # no other kind is known; keep the promise of one line
            self.problem(1, "", f"YAML error: {quote(str(e), 200)}")
            return None
        except RecursionError:  # the composer recurses once per nesting level
            self.problem(1, "", "YAML nesting is too deep")
            return None

    def check_keys(self, root: Node) -> None:
        """Report duplicate keys and unsupported collection tags, wherever they are."""
        seen: set[int] = set()
        stack: list[tuple[Node, str]] = [(root, "")]
        while stack:  # iterative, and each node once: aliases may share or loop
            node, where = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, MappingNode | SequenceNode) and node.tag not in (MAP, SEQ):
                self.problem(node, where, f"unsupported YAML tag {quote(str(node.tag))}")
            if isinstance(node, SequenceNode):
                stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, MappingNode):
                first: dict[tuple[str, str], int] = {}
                for key, value in node.value:
                    if not isinstance(key, ScalarNode):
                        continue
                    ident = (str(key.tag), str(key.value))
                    if ident in first:
                        self.problem(
                            key,
                            where,
                            f"duplicate key {quote(ident[1])} (first at line {first[ident]})",
                        )
                    else:
                        first[ident] = line_of(key)
                    stack.append((value, join_path(where, str(key.value))))

    # --- scalars and containers -----------------------------------------------------------

    def scalar(self, node: Node, where: str) -> str | int | float | bool | Node | None:
        """The Python value of a scalar node; a collection node is returned as is."""
        if isinstance(node, MappingNode | SequenceNode):
            return node  # an unsupported collection tag is reported by check_keys
        text = str(node.value)
        if node.tag == _STR:
            return text
        if node.tag == _BOOL and text in ("true", "false"):
            return text == "true"
        if node.tag == NULL:
            return None
        if node.tag == _INT and _INT_RE.match(text):
            # int() refuses over 4300 digits (CVE-2020-10735); anything that long is out of range.
            return int(text) if len(text) <= 100 else (-1 if text[0] == "-" else 1) * 10**100
        if node.tag == _FLOAT:
            try:
                return float(text)
            except ValueError:
                pass
        if node.tag in (_INT, _FLOAT, _BOOL):
            kind = str(node.tag).removeprefix(_T)
            self.problem(node, where, f"{quote(text)} is not a valid !!{kind}")
        else:
            self.problem(node, where, f"unsupported YAML tag {quote(str(node.tag))}")
        return node  # reported; callers treat a node as "wrong type" and say nothing more

    def mapping(
        self, node: Node, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Node]:
        """The string-keyed values of a mapping node; unknown and missing keys are reported."""
        out: dict[str, Node] = {}
        for key, value in node.value:
            name = self.scalar(key, where)
            if not isinstance(name, str):
                if not (isinstance(name, Node) and isinstance(key, ScalarNode)):  # else reported
                    self.problem(key, where, f"a key must be a string, not {describe(key)}")
                continue
            if name in allowed:
                out.setdefault(name, value)  # a repeated key is reported by check_keys
            elif name == "<<":
                self.problem(key, where, "merge keys ('<<') are not supported")
            else:
                expected = ", ".join(allowed)
                what = "unknown key" if where else "unknown top-level key"
                self.problem(
                    key,
                    where,
                    f"{what} {quote(name)}{suggest(name, allowed)}; expected one of: {expected}",
                )
        for name in required:
            if name not in out:
                self.problem(node, where, f"missing required key {name!r}")
        return out

    def sequence(self, node: Node, where: str, what: str) -> list[Node] | None:
        """The items of a list node; null counts as an empty list."""
        value = self.scalar(node, where)
        if value is None:
            return []
        if isinstance(value, SequenceNode):
            return list(value.value)
        self.wrong_type(node, value, where, what)
        return None

    def wrong_type(self, node: Node, value: object, where: str, what: str) -> None:
        if isinstance(value, Node) and (
            isinstance(node, ScalarNode) or node.tag not in (MAP, SEQ)
        ):
            return  # an unsupported tag, already reported
        self.problem(node, where, f"must be {what}, not {describe(node)}")

    def number(self, node: Node, where: str, *, zero_ok: bool) -> float | None:
        value = self.scalar(node, where)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.wrong_type(node, value, where, "a number")
            return None
        shown = quote(str(node.value))[1:-1]
        if not math.isfinite(value):
            self.problem(node, where, f"must be a finite number, got {shown}")
        elif value > _NUMBER_MAX:
            self.problem(node, where, f"must be at most {_NUMBER_MAX:.0f}, got {shown}")
        elif value < 0 or (value == 0 and not zero_ok):
            self.problem(node, where, f"must be {'>= 0' if zero_ok else '> 0'}, got {shown}")
        else:
            return float(value)
        return None

    def string(self, node: Node, where: str, what: str = "a non-empty string") -> str | None:
        value = self.scalar(node, where)
        if not isinstance(value, str):
            self.wrong_type(node, value, where, what)
            return None
        if not value:
            self.problem(node, where, f"must be {what}, not empty")
            return None
        return value

    def boolean(self, node: Node, where: str) -> bool | None:
        value = self.scalar(node, where)
        if not isinstance(value, bool):
            self.wrong_type(node, value, where, "true or false")
            return None
        return value

    def each(self, items: list[Node], where: str, read: Callable[[Node, str], T | None]) -> list[T] | None:
        """Every item read by `read` (as `where[i]`), or None when any was not (each one said)."""
        values = [read(item, f"{where}[{i}]") for i, item in enumerate(items)]
        if any(value is None for value in values):
            return None
        return [value for value in values if value is not None]
