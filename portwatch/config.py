"""Parsing and validating the YAML config (/etc/portwatch.yaml) into a frozen Config.

Pure apart from `load_config`, which reads the file once. Validation is
strict and collects every problem as one line `PATH:LINE: key.path: what`,
so an admin fixes a file in one pass and a reload never half-applies.

YAML 1.1 as PyYAML's SafeLoader implements it turns `on`/`no` into booleans,
`22:22` into the base-60 int 1342, `0755` into octal 493 and dates into
`datetime.date` (platform-notes.md section 5). `StrictLoader` resolves only
`true`/`false`, decimal ints, plain floats and null; everything else stays a
string, so a typo is rejected where a number belongs instead of becoming a
valid-looking number. Validation walks the composed node tree, which keeps
the line of every value.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from portwatch.model import Proto
from portwatch.policy import PORT_MAX, PORT_MIN, Allow, PortRange, Rule
from portwatch.text import escape

DEFAULT_PATH = "/etc/portwatch.yaml"
DEFAULT_HOOK_TIMEOUT = 10.0

# A config is a few kilobytes; the cap stops `load_config("/dev/zero")` reading forever.
MAX_CONFIG_BYTES = 1 << 20

# /proc/<pid>/comm holds at most 15 bytes (TASK_COMM_LEN 16 with the NUL), so a
# longer literal comm such as "systemd-resolved" could never match.
COMM_MAX_BYTES = 15

_T = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_T + k for k in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ = _T + "map", _T + "seq"

_INT_RE = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
# YAML 1.2 core floats, minus .inf/.nan and leading zeros (so "0755" stays a string).
_FLOAT_RE = re.compile(r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")
_PORT_RE = re.compile(r"^[0-9]+$")
_RANGE_RE = re.compile(r"^([0-9]+)\s*-\s*([0-9]+)$")
# Rule and hook names appear in events and hook environments: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")
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
    _NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `PATH:LINE: message` line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class HookSpec:
    """A command run on a violation: an argv list, never a shell string."""

    name: str
    command: tuple[str, ...]
    timeout: float = DEFAULT_HOOK_TIMEOUT


_ALL_PROTOCOLS = frozenset({Proto.TCP, Proto.UDP})


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config. Ports of one protocol belong to at most one rule."""

    path: str
    interval: float = 1.0
    protocols: frozenset[Proto] = _ALL_PROTOCOLS
    log_listeners: bool = True
    reserved: tuple[Rule, ...] = ()
    # Not part of the hash (a dict is unhashable); still compared by ==.
    hooks: Mapping[str, HookSpec] = field(default_factory=dict, hash=False)
    hook_cooldown: float = 60.0
    max_parallel_hooks: int = 4
    state_dir: str | None = None

    def rule_for(self, proto: Proto, port: int) -> Rule | None:
        """The rule reserving `port`/`proto`; validation makes it unique."""
        for rule in self.reserved:
            if rule.covers(proto, port):
                return rule
        return None


def load_config(path: str) -> Config:
    """Read `path` and parse it; every failure is a ConfigError."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123 - the one read; no pathlib in a pure module
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{escape(path)}: cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{escape(path)}: cannot read: larger than {MAX_CONFIG_BYTES} bytes"])
    return parse_config(data, path)


def parse_config(text: str | bytes, path: str) -> Config:
    """Parse and validate config text; `path` only names the file in messages."""
    v = _Validator(path)
    root = v.compose(text)
    config = None
    if not v.problems:
        if root is not None:
            v.check_keys(root)
        config = v.config(root)
    if v.problems or config is None:
        raise ConfigError(v.lines())
    return config


# --- validation ----------------------------------------------------------------------------


def _compose(text: str) -> Node | None:
    loader = StrictLoader(text)  # checks every character up front (ReaderError)
    try:
        node: Node | None = loader.get_single_node()
    finally:
        loader.dispose()
    return node


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _quote(value: str, limit: int = 60) -> str:
    # repr escapes control and format characters, so a value cannot break the line.
    return repr(value if len(value) <= limit else value[: limit - 3] + "...")


def _join(where: str, key: str) -> str:
    if _PLAIN_KEY_RE.match(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{_quote(key)}]"


def _describe(node: Node) -> str:
    """What a node is, for 'must be X, not Y' messages."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    if node.tag == _STR:
        hint = " (YAML 1.1 booleans are not accepted)" if value.lower() in _YAML11_BOOLS else ""
        return f"the string {_quote(value)}{hint}"
    if node.tag == _INT:
        return f"the integer {_quote(value)[1:-1]}"
    if node.tag == _FLOAT:
        return f"the number {_quote(value)[1:-1]}"
    if node.tag == _BOOL:
        return f"the boolean {value}"
    if node.tag == _NULL:
        return "null (an empty value)"
    return f"a value tagged {_quote(str(node.tag))}"


def _utf8(value: str) -> bytes:
    # A double-quoted "\udcff" escape gives a lone surrogate; never raise on it.
    return value.encode("utf-8", "surrogatepass")


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(slots=True)
class _PortSpan:
    """A validated port range with where it was written, for overlap messages."""

    range: PortRange
    rule: int  # index in reserved
    rule_name: str | None
    where: str
    node: Node


class _Validator:
    """Collects problems while turning a node tree into a Config."""

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
        line, column = (node, 0) if isinstance(node, int) else (_line(node), node.start_mark.column)
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
            self.problem(1, "", f"YAML error: {_quote(str(e), 200)}")
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
            if isinstance(node, MappingNode | SequenceNode) and node.tag not in (_MAP, _SEQ):
                self.problem(node, where, f"unsupported YAML tag {_quote(str(node.tag))}")
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
                            f"duplicate key {_quote(ident[1])} (first at line {first[ident]})",
                        )
                    else:
                        first[ident] = _line(key)
                    stack.append((value, _join(where, str(key.value))))

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
        if node.tag == _NULL:
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
            self.problem(node, where, f"{_quote(text)} is not a valid !!{kind}")
        else:
            self.problem(node, where, f"unsupported YAML tag {_quote(str(node.tag))}")
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
                    self.problem(key, where, f"a key must be a string, not {_describe(key)}")
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
                    f"{what} {_quote(name)}{_suggest(name, allowed)}; expected one of: {expected}",
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
            isinstance(node, ScalarNode) or node.tag not in (_MAP, _SEQ)
        ):
            return  # an unsupported tag, already reported
        self.problem(node, where, f"must be {what}, not {_describe(node)}")

    def number(self, node: Node, where: str, *, zero_ok: bool) -> float | None:
        value = self.scalar(node, where)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.wrong_type(node, value, where, "a number")
            return None
        shown = _quote(str(node.value))[1:-1]
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

    def proto(self, node: Node, where: str) -> Proto | None:
        value = self.string(node, where, "tcp or udp")
        if value is None:
            return None
        if value not in ("tcp", "udp"):
            self.problem(node, where, f"unknown protocol {_quote(value)}; expected tcp or udp")
            return None
        return Proto(value)

    def name(self, node: Node, where: str, what: str) -> str | None:
        value = self.string(node, where)
        if value is not None and not _NAME_RE.match(value):
            self.problem(
                node,
                where,
                f"invalid {what} name {_quote(value)}: use 1-64 letters, digits, '.', '_', "
                "'-', '@' or ':', starting with a letter or digit",
            )
            return None
        return value

    # --- the schema -----------------------------------------------------------------------

    def config(self, root: Node | None) -> Config | None:
        if root is None or (isinstance(root, ScalarNode) and root.tag == _NULL):
            return Config(path=self.path)  # empty or comment-only file: all defaults
        if not isinstance(root, MappingNode):
            self.problem(root, "", f"the top level must be a mapping, not {_describe(root)}")
            return None
        keys = self.mapping(
            root,
            "",
            (
                "interval",
                "protocols",
                "log_listeners",
                "reserved",
                "hooks",
                "hook_cooldown",
                "max_parallel_hooks",
                "state_dir",
            ),
        )
        defaults = Config(path=self.path)

        interval = defaults.interval
        if "interval" in keys:
            interval = self.number(keys["interval"], "interval", zero_ok=False) or interval

        protocols: frozenset[Proto] | None = defaults.protocols
        if "protocols" in keys:
            protocols = self.protocols(keys["protocols"])

        log_listeners = defaults.log_listeners
        if "log_listeners" in keys:
            flag = self.boolean(keys["log_listeners"], "log_listeners")
            log_listeners = log_listeners if flag is None else flag

        hook_names: set[str] = set()
        hooks: dict[str, HookSpec] = {}
        if "hooks" in keys:
            hooks = self.hooks(keys["hooks"], hook_names)

        reserved: tuple[Rule, ...] = ()
        if "reserved" in keys:
            reserved = self.reserved(keys["reserved"], protocols, hook_names)

        cooldown = defaults.hook_cooldown
        if "hook_cooldown" in keys:
            value = self.number(keys["hook_cooldown"], "hook_cooldown", zero_ok=True)
            cooldown = cooldown if value is None else value

        parallel = defaults.max_parallel_hooks
        if "max_parallel_hooks" in keys:
            parallel = self.max_parallel(keys["max_parallel_hooks"]) or parallel

        state_dir = defaults.state_dir
        if "state_dir" in keys:
            state_dir = self.state_dir(keys["state_dir"])

        if self.problems or protocols is None:
            return None
        return Config(
            path=self.path,
            interval=interval,
            protocols=protocols,
            log_listeners=log_listeners,
            reserved=reserved,
            hooks=hooks,
            hook_cooldown=cooldown,
            max_parallel_hooks=parallel,
            state_dir=state_dir,
        )

    def protocols(self, node: Node) -> frozenset[Proto] | None:
        items = self.sequence(node, "protocols", "a list of protocols, e.g. [tcp, udp]")
        if items is None:
            return None
        if not items:
            self.problem(node, "protocols", "must list at least one of tcp, udp")
            return None
        found: set[Proto] = set()
        ok = True
        for i, item in enumerate(items):
            proto = self.proto(item, f"protocols[{i}]")
            if proto is None:
                ok = False
            elif proto in found:
                self.problem(item, f"protocols[{i}]", f"{proto} is listed twice")
            else:
                found.add(proto)
        return frozenset(found) if ok else None

    def max_parallel(self, node: Node) -> int | None:
        value = self.scalar(node, "max_parallel_hooks")
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(node, value, "max_parallel_hooks", "an integer >= 1")
            return None
        if value < 1 or value > 1024:
            shown = _quote(str(node.value))[1:-1]
            self.problem(node, "max_parallel_hooks", f"must be between 1 and 1024, got {shown}")
            return None
        return value

    def state_dir(self, node: Node) -> str | None:
        value = self.scalar(node, "state_dir")
        if value is None:
            return None
        path = self.string(node, "state_dir", "an absolute directory path")
        if path is not None and (not path.startswith("/") or "\0" in path):
            self.problem(
                node, "state_dir", f"must be an absolute directory path, not {_quote(path)}"
            )
            return None
        return path

    def hooks(self, node: Node, names: set[str]) -> dict[str, HookSpec]:
        """Hook definitions; `names` gets every defined name, valid or not."""
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return {}
        if not isinstance(node, MappingNode):
            what = "a mapping of hook name to {command, timeout}"
            self.wrong_type(node, self.scalar(node, "hooks"), "hooks", what)
            return {}
        out: dict[str, HookSpec] = {}
        for key, value in node.value:
            key_value = self.scalar(key, "hooks")
            if not isinstance(key_value, str):
                self.wrong_type(key, key_value, "hooks", "a hook name (a string)")
                continue
            names.add(key_value)
            where = _join("hooks", key_value)
            name = self.name(key, "hooks", "hook")
            spec = self.hook(value, where)
            if name is not None and spec is not None:
                out[name] = HookSpec(name=name, command=spec[0], timeout=spec[1])
        return out

    def hook(self, node: Node, where: str) -> tuple[tuple[str, ...], float] | None:
        if not isinstance(node, MappingNode):
            self.wrong_type(node, self.scalar(node, where), where, "a mapping with command")
            return None
        keys = self.mapping(node, where, ("command", "timeout"), required=("command",))
        timeout: float | None = DEFAULT_HOOK_TIMEOUT
        if "timeout" in keys:
            timeout = self.number(keys["timeout"], f"{where}.timeout", zero_ok=False)
        command = self.command(keys["command"], f"{where}.command") if "command" in keys else None
        if command is None or timeout is None:
            return None
        return command, timeout

    def command(self, node: Node, where: str) -> tuple[str, ...] | None:
        value = self.scalar(node, where)
        if isinstance(value, str):
            self.problem(node, where, "must be a list of strings (argv), not a shell string")
            return None
        items = self.sequence(node, where, "a list of strings (argv)")
        if items is None:
            return None
        if not items:
            self.problem(node, where, "must not be empty: argv[0] is the program to run")
            return None
        argv: list[str] = []
        for i, item in enumerate(items):
            arg = self.scalar(item, f"{where}[{i}]")
            if not isinstance(arg, str):
                hint = " (quote it)" if isinstance(arg, int | float) else ""
                self.wrong_type(item, arg, f"{where}[{i}]", f"a string{hint}")
            elif "\0" in arg:
                self.problem(item, f"{where}[{i}]", "must not contain a NUL character")
            elif i == 0 and not arg:
                self.problem(item, f"{where}[{i}]", "the program must not be empty")
            else:
                argv.append(arg)
        return tuple(argv) if len(argv) == len(items) else None

    def reserved(
        self, node: Node, protocols: frozenset[Proto] | None, hook_names: set[str]
    ) -> tuple[Rule, ...]:
        items = self.sequence(node, "reserved", "a list of rules")
        if items is None:
            return ()
        rules: list[Rule] = []
        first_line: dict[str, int] = {}
        spans: dict[Proto, list[_PortSpan]] = {Proto.TCP: [], Proto.UDP: []}
        for i, item in enumerate(items):
            where = f"reserved[{i}]"
            if not isinstance(item, MappingNode):
                self.wrong_type(item, self.scalar(item, where), where, "a mapping (a rule)")
                continue
            keys = self.mapping(
                item, where, ("name", "ports", "proto", "allow", "hooks"), ("name", "ports")
            )
            name = self.name(keys["name"], f"{where}.name", "rule") if "name" in keys else None
            if name is not None:
                if name in first_line:
                    self.problem(
                        keys["name"],
                        f"{where}.name",
                        f"duplicate rule name {name!r} (first at line {first_line[name]})",
                    )
                else:
                    first_line[name] = _line(keys["name"])
            proto: Proto | None = Proto.TCP
            if "proto" in keys:
                proto = self.proto(keys["proto"], f"{where}.proto")
                if proto is not None and protocols is not None and proto not in protocols:
                    self.problem(
                        keys["proto"],
                        f"{where}.proto",
                        f"{proto} is not in protocols, so this rule would never be checked",
                    )
            ports = (
                self.ports(keys["ports"], f"{where}.ports", i, name) if "ports" in keys else None
            )
            if ports is not None and proto is not None:
                spans[proto].extend(ports)
            allow: tuple[Allow, ...] | None = ()
            if "allow" in keys:
                allow = self.allow(keys["allow"], f"{where}.allow")
            hooks: tuple[str, ...] | None = ()
            if "hooks" in keys:
                hooks = self.rule_hooks(keys["hooks"], f"{where}.hooks", hook_names)
            if (
                name is not None
                and ports is not None
                and proto is not None
                and allow is not None
                and hooks is not None
            ):
                rules.append(Rule(name, tuple(s.range for s in ports), proto, allow, hooks))
        for proto, found in spans.items():
            self.overlaps(proto, found)
        return tuple(rules)

    def ports(self, node: Node, where: str, rule: int, name: str | None) -> list[_PortSpan] | None:
        items = self.sequence(node, where, 'a list of ports, e.g. [5432, "6000-6010"]')
        if items is None:
            return None
        if not items:
            self.problem(node, where, "must list at least one port")
            return None
        spans: list[_PortSpan] = []
        for i, item in enumerate(items):
            port_range = self.port(item, f"{where}[{i}]")
            if port_range is not None:
                spans.append(_PortSpan(port_range, rule, name, f"{where}[{i}]", item))
        return spans if len(spans) == len(items) else None

    def port(self, node: Node, where: str) -> PortRange | None:
        value = self.scalar(node, where)
        expected = 'a port (5432) or a range ("6000-6010")'
        if isinstance(value, bool) or not isinstance(value, int | str):
            self.wrong_type(node, value, where, expected)
            return None
        if isinstance(value, int):
            first = last = value
        else:
            text = value.strip()
            match = _RANGE_RE.match(text)
            parts = match.groups() if match else (text,) if _PORT_RE.match(text) else None
            if parts is None:
                self.problem(node, where, f"invalid port {_quote(value)}; expected {expected}")
                return None
            if any(len(p) > 1 and p.startswith("0") for p in parts):
                self.problem(node, where, f"invalid port {_quote(value)}: no leading zeros")
                return None
            numbers = [int(p) if len(p) <= 10 else 10**10 for p in parts]
            first, last = numbers[0], numbers[-1]
        shown = _quote(str(node.value).strip())[1:-1]
        if first > last:
            self.problem(node, where, f"range {shown} is reversed (write {last}-{first})")
        elif first < PORT_MIN or last > PORT_MAX:
            what = "port" if first == last and "-" not in shown[1:] else "range"
            self.problem(node, where, f"{what} {shown} is outside {PORT_MIN}-{PORT_MAX}")
        else:
            return PortRange(first, last)
        return None

    def overlaps(self, proto: Proto, spans: list[_PortSpan]) -> None:
        """Report ports that two ranges of one protocol share (a port has one rule).

        A sweep in port order compares each range with the one reaching
        furthest so far; the later of the two in the file is reported, once.
        """
        order = {id(s): n for n, s in enumerate(spans)}  # spans are in file order
        reported: set[int] = set()
        reach: _PortSpan | None = None
        for span in sorted(spans, key=lambda s: (s.range.first, order[id(s)])):
            if reach is not None and span.range.first <= reach.range.last:
                early, late = sorted((reach, span), key=lambda s: order[id(s)])
                if id(late) not in reported:
                    reported.add(id(late))
                    self.overlap(proto, early, late)
            if reach is None or span.range.last > reach.range.last:
                reach = span

    def overlap(self, proto: Proto, early: _PortSpan, late: _PortSpan) -> None:
        shared = PortRange(
            max(early.range.first, late.range.first), min(early.range.last, late.range.last)
        )
        one = shared.first == shared.last
        ports = f"port {shared} is" if one else f"ports {shared} are"
        at = f"{early.where}, line {_line(early.node)}"
        if early.rule == late.rule:
            owner = f"already listed in this rule ({at})"
        else:
            rule = repr(early.rule_name) if early.rule_name else f"reserved[{early.rule}]"
            owner = f"already reserved by rule {rule} ({at})"
        self.problem(
            late.node, late.where, f"{proto} {ports} {owner}; a port may belong to one rule only"
        )

    def allow(self, node: Node, where: str) -> tuple[Allow, ...] | None:
        items = self.sequence(node, where, "a list of allowed owners")
        if items is None:
            return None
        out: list[Allow] = []
        for i, item in enumerate(items):
            entry = self.allow_entry(item, f"{where}[{i}]")
            if entry is not None:
                out.append(entry)
        return tuple(out) if len(out) == len(items) else None

    def allow_entry(self, node: Node, where: str) -> Allow | None:
        fields = ("comm", "exe", "user", "unit")
        if not isinstance(node, MappingNode):
            what = "a mapping with comm, exe, user or unit"
            self.wrong_type(node, self.scalar(node, where), where, what)
            return None
        keys = self.mapping(node, where, fields)
        if not node.value:
            self.problem(node, where, "an allow entry needs at least one of comm, exe, user, unit")
            return None
        values: dict[str, str] = {}
        ok = len(keys) == len(node.value)  # unknown keys were reported
        for key, value_node in keys.items():
            value: str | None
            raw = self.scalar(value_node, f"{where}.{key}")
            if key == "user" and isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                value = str(raw)  # `user: 0` is a uid, and matches as its decimal text
            else:
                value = self.string(value_node, f"{where}.{key}")
            if value is None:
                ok = False
                continue
            literal = not re.search(r"[*?\[]", value)
            if key == "comm" and literal and len(_utf8(value)) > COMM_MAX_BYTES:
                short = _utf8(value)[:COMM_MAX_BYTES].decode("utf-8", "ignore")
                self.problem(
                    value_node,
                    f"{where}.comm",
                    f"{_quote(value)} can never match: the kernel truncates comm to "
                    f"{COMM_MAX_BYTES} bytes (use {_quote(short)}, exe or unit)",
                )
                ok = False
                continue
            values[key] = value
        if not ok:
            return None
        return Allow(**values)

    def rule_hooks(self, node: Node, where: str, defined: set[str]) -> tuple[str, ...] | None:
        items = self.sequence(node, where, "a list of hook names")
        if items is None:
            return None
        out: list[str] = []
        for i, item in enumerate(items):
            name = self.string(item, f"{where}[{i}]", "a hook name")
            if name is None:
                continue
            if name not in defined:
                self.problem(
                    item,
                    f"{where}[{i}]",
                    f"hook {_quote(name)} is not defined under hooks{_suggest(name, defined)}",
                )
            elif name in out:
                self.problem(item, f"{where}[{i}]", f"hook {_quote(name)} is listed twice")
            else:
                out.append(name)
        return tuple(out) if len(out) == len(items) else None
