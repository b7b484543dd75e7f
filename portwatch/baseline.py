"""A policy from what listens now: one reserved rule per port, or per unit holding several. Pure.

Each rule allows today's owners as precisely as can be trusted: the systemd
service with its user (a user's own manager can give a unit any name; for a socket
unit's port, the service it starts, which also allows systemd holding the socket
for it), else the executable and the user. A comm
is what a process calls itself, so it is used only where the executable
cannot be read, and the comment says so. A port nobody could be seen holding
(a kernel socket, or owners hidden from this user) gets no rule: the daemon
would report it taken by an unidentified process at once.

Process fields are attacker data. In the YAML a value is plain only when it reads
back exactly, else a JSON string (which YAML reads as a double-quoted one); as glob
patterns they have `*?[` bracketed; in comments they are escaped so a newline
cannot end the comment and start a key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from portwatch.config import ConfigError, parse_config
from portwatch.model import MANAGER_UNIT, Listener, Process, Proto, endpoint, is_manager
from portwatch.policy import Allow, PortRange, Rule
from portwatch.text import escape

# A port below this is a system port (only root may bind it by default).
SYSTEM_PORTS = 1024
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.@:-]+")
_PLAIN = re.compile(r"^[A-Za-z0-9_/][A-Za-z0-9_./@:+-]*$")  # no indicator (@ : - ...) first
_NOT_PLAIN = re.compile(r"^(true|false|null|~|[-+.0-9].*|.*:$)$", re.IGNORECASE)


@dataclass
class PortOwners:
    """Who holds one port of one protocol, on every address it listens on."""

    proto: Proto
    port: int
    allow: list[Allow] = field(default_factory=list)
    seen: dict[str, list[int]] = field(default_factory=dict)  # holder (but its pid) -> pids, for the comment
    addresses: list[str] = field(default_factory=list)
    guessed: bool = False  # an entry names a comm: the executable was unreadable


@dataclass
class NewRule:
    """A rule to write, with the comment lines that say what it was made from."""

    rule: Rule
    comments: list[str]


@dataclass
class Baseline:
    rules: list[NewRule]
    skipped: list[str]  # one sentence per port left out, and why


def wanted(listener: Listener, ports: Sequence[tuple[int, int]] | None, every: bool) -> bool:
    """The default: system ports and ports a systemd service holds; or `--ports`, or `--all`."""
    port = listener.socket.port
    if ports is not None:
        return any(low <= port <= high for low, high in ports)
    return every or port < SYSTEM_PORTS or listener.socket_unit is not None or any(
        _service(p) is not None for p in listener.processes)


def build(listeners: Iterable[Listener], *, taken_names: Iterable[str] = (),
          covered: Callable[[Proto, int], bool] | None = None) -> Baseline:
    """The rules for `listeners` (already chosen: host's, not clients' ephemeral ones), leaving
    out ports `covered` says are reserved already, named otherwise than `taken_names`."""
    by_port: dict[tuple[Proto, int], PortOwners] = {}
    skipped: dict[tuple[Proto, int], str] = {}
    for listener in listeners:
        sock = listener.socket
        key = (sock.proto, sock.port)
        if covered is not None and covered(*key):
            continue
        owners = by_port.setdefault(key, PortOwners(sock.proto, sock.port))
        owners.addresses.append(endpoint(sock.address, sock.port))
        if not listener.processes:
            why = listener.unresolved.value if listener.unresolved else "no process"
            skipped[key] = f"{sock.proto} port {sock.port}: its holder is unknown ({why}); not reserved"
        for process in listener.processes:
            entry, guessed = owner_entry(process, listener)
            if entry is None:
                skipped[key] = (f"{sock.proto} port {sock.port}: pid {process.pid} has neither a readable "
                                "executable nor a user; not reserved")
                continue
            owners.guessed |= guessed
            if entry not in owners.allow:
                owners.allow.append(entry)
            owners.seen.setdefault(_holder_text(process, listener), []).append(process.pid)
    names = set(taken_names)
    resolved = (owners for key, owners in sorted(by_port.items()) if key not in skipped)
    rules = [_rule(group, names) for group in _groups(resolved)]
    return Baseline(rules, [skipped[k] for k in sorted(skipped)])


def owner_entry(process: Process, listener: Listener) -> tuple[Allow | None, bool]:
    """The allow entry naming `process` as precisely as can be trusted, and whether it rests on
    the process's own name (its executable was unreadable)."""
    if is_manager(process):
        # The policy lets only `unit` allow systemd: the service its socket unit starts, the socket
        # unit, or (a socket of its own, or one whose socket unit was not known) init.scope itself.
        if listener.service_unit is not None:
            return Allow(unit=_unit_pattern(listener.service_unit)), False
        return Allow(unit=_glob_escape(listener.socket_unit or MANAGER_UNIT)), False
    unit = _service(process)
    user = process.user if process.user is not None else (None if process.uid is None else str(process.uid))
    if unit is not None:
        # With its user: a user's own manager can run a unit of any name (systemd-run --user --unit=).
        return Allow(unit=_unit_pattern(unit), user=None if user is None else _glob_escape(user)), False
    exe = process.exe.removesuffix(" (deleted)") if process.exe else None
    if exe is not None and user is not None:
        return Allow(exe=_glob_escape(exe), user=_glob_escape(user)), False
    if user is not None:
        return Allow(comm=_glob_escape(process.comm), user=_glob_escape(user)), True
    return None, False


def _service(process: Process) -> str | None:
    """The systemd service `process` runs in; not a scope (a login session, a terminal)."""
    unit = process.unit
    return unit if unit is not None and unit.endswith(".service") and unit != MANAGER_UNIT else None


def _unit_pattern(unit: str) -> str:
    # An Accept=yes socket starts `name@.service` instances: any instance is its own.
    if unit.endswith("@.service"):
        return _glob_escape(unit[: -len(".service")]) + "*.service"
    return _glob_escape(unit)


def _glob_escape(text: str) -> str:
    """`text` as a glob that matches only itself (fnmatch has no escape character: brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _groups(ports: Iterable[PortOwners]) -> list[list[PortOwners]]:
    """Ports whose owners are the same systemd units share a rule; every other port has its own."""
    groups: dict[tuple[Proto, tuple[Allow, ...]], list[PortOwners]] = {}
    alone: list[list[PortOwners]] = []
    for owners in ports:
        if all(entry.unit is not None for entry in owners.allow):
            groups.setdefault((owners.proto, tuple(owners.allow)), []).append(owners)
        else:
            alone.append([owners])
    return sorted([*groups.values(), *alone], key=lambda g: (g[0].proto, g[0].port))


def _rule(group: list[PortOwners], names: set[str]) -> NewRule:
    first = group[0]
    allow = tuple(first.allow)
    if all(entry.unit is not None for entry in allow):
        unit = allow[0].unit or ""
        base = "systemd" if unit == MANAGER_UNIT else unit.removesuffix(".service").removesuffix(
            ".socket").removesuffix("*").removesuffix("@")
    else:
        comm = next((e.comm for e in allow if e.comm), None)
        exe = next((e.exe for e in allow if e.exe), None)
        stem = _NAME_CHARS.sub("-", (exe or "").rsplit("/", 1)[-1] or comm or "").strip("-_.@:")
        base = f"{stem or first.proto.value}-{first.port}"
    name = _unique(base if first.proto is Proto.TCP else f"{base}-udp", names)
    ports = _ranges([owners.port for owners in group])
    comments = []
    for owners in group:
        where = ", ".join(dict.fromkeys(owners.addresses))
        holders = [text.format(pids=",".join(map(str, sorted(set(pids)))))
                   for text, pids in owners.seen.items()]
        comments.append(f"{owners.proto} {where}: " + "; ".join(holders))
        if owners.guessed:
            comments.append(f"{owners.proto} port {owners.port}: the executable was unreadable, so a comm "
                            "(the name a process gives itself) stands in: make it an exe if you can")
    rule = Rule(name=name, ports=tuple(ports), proto=first.proto, allow=allow)
    return NewRule(rule, comments)


def _unique(base: str, names: set[str]) -> str:
    base = _NAME_CHARS.sub("-", base).strip("-_.@:")[:56] or "port"
    name, n = base, 2
    while name in names:
        name, n = f"{base}-{n}", n + 1
    names.add(name)
    return name


def _ranges(ports: list[int]) -> list[PortRange]:
    spans: list[PortRange] = []
    for port in sorted(set(ports)):
        if spans and spans[-1].last == port - 1:
            spans[-1] = PortRange(spans[-1].first, port)
        else:
            spans.append(PortRange(port, port))
    return spans


def _holder_text(process: Process, listener: Listener) -> str:
    """The holder for the rule's comment, `{pids}` standing for its pid (and those like it)."""
    if is_manager(process) and listener.socket_unit is not None:
        return f"systemd for {_braces(listener.socket_unit)} -> {_braces(listener.service_unit or '?')}"
    text = f"{_braces(process.comm)}[{{pids}}]"
    text += f" {_braces(process.exe)}" if process.exe else " (executable unreadable)"
    text += f" user {_braces(str(process.user if process.user is not None else process.uid))}"
    if process.unit:
        text += f" unit {_braces(process.unit)}"
    return text


def _braces(text: str) -> str:
    """`text` as a literal in a str.format template (a process may call itself `{pids}`)."""
    return text.replace("{", "{{").replace("}", "}}")


# --- YAML ----------------------------------------------------------------------------------


def scalar(text: str) -> str:
    """`text` as a YAML scalar that reads back exactly: plain when that is safe, else a JSON
    string (YAML 1.2 reads it as a double-quoted scalar; a non-UTF-8 byte stays \\udcXX)."""
    if _PLAIN.match(text) and not _NOT_PLAIN.match(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def comment(text: str) -> str:
    """One comment line: escaped, so nothing in `text` can end it."""
    return "# " + escape(text)


def rules_yaml(rules: Sequence[NewRule], indent: int = 2) -> str:
    """The rules as items of a block sequence, each item's dash at column `indent`."""
    pad = " " * indent
    out = []
    for new in rules:
        rule = new.rule
        out += [f"{pad}{comment(line)}" for line in new.comments]
        out.append(f"{pad}- name: {scalar(rule.name)}")
        out.append(f"{pad}  ports: [{', '.join(_port_text(str(r)) for r in rule.ports)}]")
        out.append(f"{pad}  proto: {rule.proto.value}")
        out.append(f"{pad}  allow:")
        for entry in rule.allow:
            keys = [(k, getattr(entry, k)) for k in ("comm", "exe", "user", "unit") if getattr(entry, k)]
            for n, (key, value) in enumerate(keys):
                out.append(f"{pad}    {'- ' if n == 0 else '  '}{key}: {scalar(value)}")
        out.append("")
    return "\n".join(out)


def _port_text(text: str) -> str:
    return f'"{text}"' if "-" in text else text


HEADER = """\
# portwatch configuration, made by `portwatch baseline` on {host} at {when}.
#
# Each rule below reserves ports that were listening then for the owners that
# held them: the systemd service when there was one (for a socket-activated
# port, the service its .socket unit starts), else the executable and user.
# Anyone else listening on these ports is reported as reserved_port_taken.
# Review it before use: a rule allows exactly what was running, good or bad.
#
#   portwatch check --config FILE     validate it
#   portwatch explain --config FILE   the verdict on every listener, as the daemon would give it
#   portwatch run --config FILE       enforce it
#
# Every key is optional; values are read strictly (only true/false are booleans,
# unknown keys are errors). The README describes each one.

# Seconds between two scans of the listening sockets.
interval: 1.0
# Which socket tables to watch.
protocols: [tcp, udp]
# Log listener_opened / listener_closed for every listener (false: reserved ports only).
log_listeners: true
# UDP sockets of clients on ports the kernel handed out (ip_local_port_range): hide
# their listener_opened / listener_closed, or show them.
udp_ephemeral: hide
# Follow the journal for services that fail with "Address already in use" (port_conflict).
follow_journal: true
# Every network namespace (containers, `ip netns`), or host: portwatch's own only.
netns: all
# Seconds before a rule's hooks may run again for the same port; hooks at once at most.
hook_cooldown: 60.0
max_parallel_hooks: 4
# state_dir: /var/lib/portwatch
# metrics:
#   listen: "127.0.0.1:9948"

# Commands to run when a rule is broken: name them in a rule's `hooks: [...]`.
# Each is an argv list (never a shell string); event details arrive in PORTWATCH_*
# environment variables and as JSON on stdin.
hooks: {{}}

reserved:
"""


def config_text(baseline: Baseline, *, host: str, when: str) -> str:
    """A complete config: the settings with their defaults, then the rules."""
    text = HEADER.format(host=escape(host), when=when)
    if not baseline.rules:
        text = text.replace("\nreserved:\n", "\nreserved: []\n")
    text += rules_yaml(baseline.rules)
    for line in baseline.skipped:
        text += comment(line) + "\n"
    return text


# --- adding rules to an existing config ------------------------------------------------------


class MergeError(Exception):
    """The existing file cannot take new rules without rewriting what it has."""


def merge(existing: str, rules: Sequence[NewRule], skipped: Sequence[str] = ()) -> str:
    """`existing` with `rules` added at the end of its `reserved` list, every other line as it was.

    Where to add is found in the text (where the key after `reserved` starts, back over the
    comments that belong to it), not from node positions: an alias (`allow: *admins`) has the
    position of its anchor. The result must say all the old file said, or MergeError.
    """
    if not rules:
        return existing
    documents = len(re.findall(r"^---", existing, re.MULTILINE))
    if re.search(r"^\.\.\.", existing, re.MULTILINE) or documents > 1:
        raise MergeError("it ends a YAML document (... or a second ---): add the rules by hand")
    text = existing if not existing or existing.endswith("\n") else existing + "\n"
    block = rules_yaml(rules) + "".join(comment(line) + "\n" for line in skipped)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    pairs = root.value if isinstance(root, MappingNode) and not root.flow_style else None
    if root is not None and pairs is None:
        raise MergeError("its top level is not a block mapping")
    keys = [key.value for key, _ in pairs or ()]
    if "reserved" not in keys:
        merged = text + "\nreserved:\n" + block
    else:
        index = keys.index("reserved")
        key, value = (pairs or [])[index]
        following = (pairs or [])[index + 1][0].start_mark.line if index + 1 < len(keys) else None
        merged = _added(text, key, value, following, block)
    try:
        before, after = parse_config(existing, "old"), parse_config(merged, "old")
    except ConfigError as exc:
        raise MergeError(f"the result would not be valid ({exc.problems[0]})") from None
    kept = after.reserved[: len(before.reserved)]
    if kept != before.reserved or replace(after, reserved=before.reserved) != before:
        raise MergeError("adding to it would change what its rules or settings say")
    return merged


def _added(text: str, key: Node, value: Node, following: int | None, block: str) -> str:
    """`text` with `block` (rules at indent 2) added to the `reserved` value `value`."""
    lines = text.splitlines(keepends=True)
    if isinstance(value, ScalarNode) and value.tag.endswith(":null"):  # `reserved:`, `reserved: ~`
        start, end = value.start_mark.index, value.end_mark.index
        text = text[:start] + text[end:]
        lines = text.splitlines(keepends=True)
        lines.insert(key.start_mark.line + 1, block)
        return "".join(lines)
    if not isinstance(value, SequenceNode):
        raise MergeError("reserved is not a list")
    if value.flow_style:
        if value.value:
            raise MergeError("reserved is a flow list ([...]): write it as a block list to add to it")
        start, end = value.start_mark.index, value.end_mark.index
        return text[:start].rstrip(" ") + "\n" + block + text[end:].lstrip(" ")
    # The first item's dash, found in the text: its node may be an alias.
    dash = next(len(line) - len(line.lstrip(" ")) for line in lines[key.start_mark.line + 1:]
                if line.lstrip(" ").startswith("-"))
    at = following if following is not None else len(lines)
    while at > key.start_mark.line + 1 and (not lines[at - 1].strip() or lines[at - 1].lstrip()[0] == "#"):
        at -= 1  # a comment before the next key is that key's
    lines.insert(at, "\n" + _indented(block, dash))
    return "".join(lines)


def _indented(block: str, indent: int) -> str:
    """`block` (made at indent 2) moved to `indent`."""
    if indent == 2:
        return block
    pad = " " * indent
    lines = block.splitlines(keepends=True)
    return "".join(pad + line[2:] if line.startswith("  ") else line for line in lines)
