"""Parsing and validating the YAML config (/etc/portwatch.yaml) into a frozen Config.

Pure apart from `load_config`, which reads the file once. Validation is
strict and collects every problem as one line `PATH:LINE: key.path: what`,
so an admin fixes a file in one pass and a reload never half-applies. The
YAML itself is read by portwatch.yamlread (YAML 1.2 scalars, every value with
its line); this module is the schema.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from portwatch import DEFAULT_CONFIG
from portwatch.model import NetNs, Proto
from portwatch.policy import PORT_MAX, PORT_MIN, Allow, PortRange, Rule
from portwatch.text import escape
from portwatch.yamlread import NULL, NodeReader, describe, join_path, line_of, quote, suggest

DEFAULT_PATH = DEFAULT_CONFIG
DEFAULT_HOOK_TIMEOUT = 10.0

# A config is a few kilobytes; the cap stops `load_config("/dev/zero")` reading forever.
MAX_CONFIG_BYTES = 1 << 20

# /proc/<pid>/comm holds at most 15 bytes (TASK_COMM_LEN 16 with the NUL), so a
# longer literal comm such as "systemd-resolved" could never match.
COMM_MAX_BYTES = 15

_PORT_RE = re.compile(r"^[0-9]+$")
_RANGE_RE = re.compile(r"^([0-9]+)\s*-\s*([0-9]+)$")
# Rule and hook names appear in events and hook environments: keep them plain.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")


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


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Where the Prometheus metrics go: an HTTP listener, a node_exporter textfile, or both."""

    listen: tuple[str, int] | None = None  # (IP address, port)
    textfile: str | None = None  # an absolute path ending in .prom


ALL_PROTOCOLS = frozenset({Proto.TCP, Proto.UDP})


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config. Ports of one protocol belong to at most one rule."""

    path: str
    interval: float = 1.0
    protocols: frozenset[Proto] = ALL_PROTOCOLS
    log_listeners: bool = True
    reserved: tuple[Rule, ...] = ()
    # Not part of the hash (a dict is unhashable); still compared by ==.
    hooks: Mapping[str, HookSpec] = field(default_factory=dict, hash=False)
    hook_cooldown: float = 60.0
    max_parallel_hooks: int = 4
    state_dir: str | None = None
    follow_journal: bool = True
    conflict_hooks: tuple[str, ...] = ()
    netns: str = "all"  # every network namespace, or "host": portwatch's own only
    metrics: MetricsSettings | None = None
    # "hide": no listener_opened/closed for clients' ephemeral UDP sockets (portwatch.ephemeral)
    udp_ephemeral: str = "hide"

    def names(self, proto: Proto, port: int) -> bool:
        """A rule reserves `port`, in whatever namespace: a client's socket there is never hidden."""
        return any(rule.covers(proto, port) for rule in self.reserved)

    def rule_for(self, proto: Proto, port: int, netns: NetNs | None = None) -> Rule | None:
        """The rule reserving `port`/`proto` in `netns` (None: the host's); validation makes it
        unique."""
        for rule in self.reserved:
            if rule.covers(proto, port) and rule.applies_in(netns):
                return rule
        return None


def load_config(path: str) -> Config:
    """Read `path` and parse it; every failure is a ConfigError."""
    return parse_config(read_config(path), path)


def read_config(path: str) -> bytes:
    """The file's bytes, for parse_config; ConfigError when it cannot be read or is too large."""
    try:
        with open(path, "rb") as f:  # noqa: PTH123 - the one read; no pathlib in a pure module
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{escape(path)}: cannot read: {e.strerror or e}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{escape(path)}: cannot read: larger than {MAX_CONFIG_BYTES} bytes"])
    return data


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


def parse_listen(text: str) -> tuple[str, int] | str:
    """`127.0.0.1:9948` or `[::1]:9948` as (address, port), or what is wrong with it. An IP
    address, never a name: the daemon must not wait for a resolver to start."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        literal: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv6Address
    else:
        literal = ipaddress.IPv4Address
    expected = 'an IP address and a port, e.g. "127.0.0.1:9948" or "[::1]:9948"'
    if not sep or not _PORT_RE.match(port) or len(port) > 5 or not 1 <= int(port) <= PORT_MAX:
        return f"must be {expected}, not {quote(text)}"
    if literal is ipaddress.IPv4Address and ":" in host:
        return f'an IPv6 address goes in brackets ("[{host}]:{port}"), not {quote(text)}'
    try:
        address = str(literal(host))
    except ValueError:
        return f"{quote(host)} is not an IP{'v6' if literal is ipaddress.IPv6Address else 'v4'} address; " \
               f"expected {expected}"
    return address, int(port)


# --- validation ----------------------------------------------------------------------------


def _utf8(value: str) -> bytes:
    # A double-quoted "\udcff" escape gives a lone surrogate; never raise on it.
    return value.encode("utf-8", "surrogatepass")


@dataclass(slots=True)
class _PortSpan:
    """A validated port range with where it was written, for overlap messages."""

    range: PortRange
    rule: int  # index in reserved
    rule_name: str | None
    where: str
    node: Node


class _Validator(NodeReader):
    """The config's schema, on the strict YAML reader."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.hook_names: set[str] = set()  # every hook defined, valid or not

    def proto(self, node: Node, where: str) -> Proto | None:
        value = self.string(node, where, "tcp or udp")
        if value is None:
            return None
        if value not in ("tcp", "udp"):
            self.problem(node, where, f"unknown protocol {quote(value)}; expected tcp or udp")
            return None
        return Proto(value)

    def name(self, node: Node, where: str, what: str) -> str | None:
        value = self.string(node, where)
        if value is not None and not _NAME_RE.match(value):
            self.problem(
                node,
                where,
                f"invalid {what} name {quote(value)}: use 1-64 letters, digits, '.', '_', "
                "'-', '@' or ':', starting with a letter or digit",
            )
            return None
        return value

    # --- the schema -----------------------------------------------------------------------

    def config(self, root: Node | None) -> Config | None:
        if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
            return Config(path=self.path)  # empty or comment-only file: all defaults
        if not isinstance(root, MappingNode):
            self.problem(root, "", f"the top level must be a mapping, not {describe(root)}")
            return None
        keys = self.mapping(root, "", tuple(TOP_LEVEL))
        values: dict[str, Any] = {}
        for key in sorted(keys, key=lambda k: k in _AFTER_HOOKS):  # these refer to protocols and hooks
            values[key] = TOP_LEVEL[key](self, keys[key], values)
        if self.problems:
            return None
        return Config(path=self.path, **{k: v for k, v in values.items() if v is not None})

    def protocols(self, node: Node) -> frozenset[Proto] | None:
        items = self.sequence(node, "protocols", "a list of protocols, e.g. [tcp, udp]")
        if items is None:
            return None
        if not items:
            self.problem(node, "protocols", "must list at least one of tcp, udp")
            return None
        found: set[Proto] = set()

        def once(item: Node, where: str) -> Proto | None:
            proto = self.proto(item, where)
            if proto in found:
                self.problem(item, where, f"{proto} is listed twice")
            elif proto is not None:
                found.add(proto)
            return proto

        return frozenset(found) if self.each(items, "protocols", once) is not None else None

    def choice(self, node: Node, where: str, choices: tuple[str, str]) -> str | None:
        expected = " or ".join(choices)
        value = self.string(node, where, expected)
        if value is not None and value not in choices:
            self.problem(node, where, f"unknown value {quote(value)}; expected {expected}")
            return None
        return value

    def metrics(self, node: Node) -> MetricsSettings | None:
        if not isinstance(node, MappingNode):
            what = "a mapping with listen or textfile"
            self.wrong_type(node, self.scalar(node, "metrics"), "metrics", what)
            return None
        keys = self.mapping(node, "metrics", ("listen", "textfile"))
        if not node.value:
            self.problem(node, "metrics", "needs listen (an address:port to serve) or textfile (a path)")
            return None
        listen: tuple[str, int] | None = None
        textfile: str | None = None
        if "listen" in keys:
            text = self.string(keys["listen"], "metrics.listen", 'an address and port, e.g. "127.0.0.1:9948"')
            parsed = parse_listen(text) if text is not None else None
            if isinstance(parsed, str):
                self.problem(keys["listen"], "metrics.listen", parsed)
                return None
            listen = parsed
        if "textfile" in keys:
            textfile = self.string(keys["textfile"], "metrics.textfile", "an absolute path ending in .prom")
            if textfile is not None and (not textfile.startswith("/") or not textfile.endswith(".prom")
                                         or "\0" in textfile or textfile.endswith("/.prom")):
                self.problem(keys["textfile"], "metrics.textfile",
                             f"must be an absolute path ending in .prom (node_exporter reads only those), "
                             f"not {quote(textfile)}")
                return None
        if len(keys) != len(node.value) or ("listen" in keys and listen is None) \
                or ("textfile" in keys and textfile is None):
            return None
        return MetricsSettings(listen=listen, textfile=textfile)

    def max_parallel(self, node: Node) -> int | None:
        value = self.scalar(node, "max_parallel_hooks")
        if isinstance(value, bool) or not isinstance(value, int):
            self.wrong_type(node, value, "max_parallel_hooks", "an integer >= 1")
            return None
        if value < 1 or value > 1024:
            shown = quote(str(node.value))[1:-1]
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
                node, "state_dir", f"must be an absolute directory path, not {quote(path)}"
            )
            return None
        return path

    def hooks(self, node: Node) -> dict[str, HookSpec]:
        """Hook definitions; `hook_names` gets every defined name, valid or not."""
        if isinstance(node, ScalarNode) and node.tag == NULL:
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
            self.hook_names.add(key_value)
            where = join_path("hooks", key_value)
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
        first = f"{where}[0]"

        def arg(item: Node, at: str) -> str | None:
            value = self.scalar(item, at)
            if not isinstance(value, str):
                hint = " (quote it)" if isinstance(value, int | float) else ""
                self.wrong_type(item, value, at, f"a string{hint}")
            elif "\0" in value:
                self.problem(item, at, "must not contain a NUL character")
            elif at == first and not value:
                self.problem(item, at, "the program must not be empty")
            else:
                return value
            return None

        argv = self.each(items, where, arg)
        return tuple(argv) if argv is not None else None

    def reserved(self, node: Node, protocols: frozenset[Proto] | None) -> tuple[Rule, ...]:
        """The rules; `protocols` as configured (None when that key was invalid)."""
        items = self.sequence(node, "reserved", "a list of rules")
        if items is None:
            return ()
        names: dict[str, int] = {}  # rule name -> its line
        spans: dict[Proto, list[_PortSpan]] = {Proto.TCP: [], Proto.UDP: []}
        rules = [self.rule(item, i, protocols, names, spans) for i, item in enumerate(items)]
        for proto, found in spans.items():
            self.overlaps(proto, found)
        return tuple(rule for rule in rules if rule is not None)

    def rule(
        self, node: Node, index: int, protocols: frozenset[Proto] | None, names: dict[str, int],
        spans: dict[Proto, list[_PortSpan]],
    ) -> Rule | None:
        where = f"reserved[{index}]"
        if not isinstance(node, MappingNode):
            self.wrong_type(node, self.scalar(node, where), where, "a mapping (a rule)")
            return None
        fields = ("name", "ports", "proto", "allow", "hooks", "netns")
        keys = self.mapping(node, where, fields, ("name", "ports"))
        name = self.name(keys["name"], f"{where}.name", "rule") if "name" in keys else None
        if name is not None and name in names:
            first = f"duplicate rule name {name!r} (first at line {names[name]})"
            self.problem(keys["name"], f"{where}.name", first)
        elif name is not None:
            names[name] = line_of(keys["name"])
        proto: Proto | None = Proto.TCP
        if "proto" in keys:
            proto = self.proto(keys["proto"], f"{where}.proto")
            if proto is not None and protocols is not None and proto not in protocols:
                self.problem(keys["proto"], f"{where}.proto",
                             f"{proto} is not in protocols, so this rule would never be checked")
        ports = self.ports(keys["ports"], f"{where}.ports", index, name) if "ports" in keys else None
        if ports is not None and proto is not None:
            spans[proto].extend(ports)
        allow = self.allow(keys["allow"], f"{where}.allow") if "allow" in keys else ()
        hooks = self.rule_hooks(keys["hooks"], f"{where}.hooks") if "hooks" in keys else ()
        netns = self.string(keys["netns"], f"{where}.netns", 'a glob over namespace names, "*" for all') \
            if "netns" in keys else None
        if name is None or ports is None or proto is None or allow is None or hooks is None:
            return None
        return Rule(name, tuple(s.range for s in ports), proto, allow, hooks, netns)

    def ports(self, node: Node, where: str, rule: int, name: str | None) -> list[_PortSpan] | None:
        items = self.sequence(node, where, 'a list of ports, e.g. [5432, "6000-6010"]')
        if items is None:
            return None
        if not items:
            self.problem(node, where, "must list at least one port")
            return None
        ranges = self.each(items, where, self.port)
        if ranges is None:
            return None
        return [_PortSpan(r, rule, name, f"{where}[{i}]", item)
                for i, (r, item) in enumerate(zip(ranges, items, strict=True))]

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
                self.problem(node, where, f"invalid port {quote(value)}; expected {expected}")
                return None
            if any(len(p) > 1 and p.startswith("0") for p in parts):
                self.problem(node, where, f"invalid port {quote(value)}: no leading zeros")
                return None
            numbers = [int(p) if len(p) <= 10 else 10**10 for p in parts]
            first, last = numbers[0], numbers[-1]
        shown = quote(str(node.value).strip())[1:-1]
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
        at = f"{early.where}, line {line_of(early.node)}"
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
        entries = self.each(items, where, self.allow_entry) if items is not None else None
        return tuple(entries) if entries is not None else None

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
                    f"{quote(value)} can never match: the kernel truncates comm to "
                    f"{COMM_MAX_BYTES} bytes (use {quote(short)}, exe or unit)",
                )
                ok = False
                continue
            values[key] = value
        if not ok:
            return None
        return Allow(**values)

    def rule_hooks(self, node: Node, where: str) -> tuple[str, ...] | None:
        items = self.sequence(node, where, "a list of hook names")
        if items is None:
            return None
        seen: set[str] = set()

        def hook(item: Node, at: str) -> str | None:
            name = self.string(item, at, "a hook name")
            if name is not None and name not in self.hook_names:
                self.problem(item, at, f"hook {quote(name)} is not defined under hooks"
                             f"{suggest(name, self.hook_names)}")
            elif name in seen:
                self.problem(item, at, f"hook {quote(name)} is listed twice")
            elif name is not None:
                seen.add(name)
                return name
            return None

        names = self.each(items, where, hook)
        return tuple(names) if names is not None else None


# Every top-level key, in the order messages list them, and how its value is read (given what was
# read before it). A value of None means the problem was reported; an absent key keeps Config's default.
TOP_LEVEL: dict[str, Callable[[_Validator, Node, dict[str, Any]], Any]] = {
    "interval": lambda v, node, _: v.number(node, "interval", zero_ok=False),
    "protocols": lambda v, node, _: v.protocols(node),
    "log_listeners": lambda v, node, _: v.boolean(node, "log_listeners"),
    "reserved": lambda v, node, read: v.reserved(node, read.get("protocols", ALL_PROTOCOLS)),
    "hooks": lambda v, node, _: v.hooks(node),
    "hook_cooldown": lambda v, node, _: v.number(node, "hook_cooldown", zero_ok=True),
    "max_parallel_hooks": lambda v, node, _: v.max_parallel(node),
    "state_dir": lambda v, node, _: v.state_dir(node),
    "follow_journal": lambda v, node, _: v.boolean(node, "follow_journal"),
    "conflict_hooks": lambda v, node, _: v.rule_hooks(node, "conflict_hooks"),
    "netns": lambda v, node, _: v.choice(node, "netns", ("all", "host")),
    "metrics": lambda v, node, _: v.metrics(node),
    "udp_ephemeral": lambda v, node, _: v.choice(node, "udp_ephemeral", ("hide", "show")),
}
_AFTER_HOOKS = ("reserved", "conflict_hooks")
