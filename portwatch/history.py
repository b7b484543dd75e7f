"""`portwatch history`: a port's timeline, read back from portwatch's own journal entries.

The daemon already writes every change it sees as an entry with PORTWATCH_* fields;
reading those back answers "who held 8080 on Tuesday at 03:00" with no store of its
own. Only entries that journald itself attributes to the daemon's unit are read: any
local process can write PORTWATCH_* fields (or SYSLOG_IDENTIFIER=portwatch), but
`_SYSTEMD_UNIT` is set by journald from the sender's cgroup and cannot be forged locally (in a
journal received from another host it is what that host's journald sent). Entries of more
than one machine (a systemd-journal-remote directory) are not mixed: --machine picks one.

Everything but `command` is pure: `parse_entry` (journalctl's JSON to an Entry),
`timeline` and `rows` / `entry_json` (the table and --json), `At` (the listeners
open at a moment). `command` runs journalctl (portwatch.journalread) and prints.

Strings keep the daemon's exact bytes: journalctl writes a value that is not
printable UTF-8 as a list of byte numbers, decoded here with surrogateescape as
portwatch decodes /proc. The table escapes every cell (render.table); the JSON
keeps the exact strings (\\udcXX for a byte that is not UTF-8).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

from portwatch.journalread import JournalError, JournalRead
from portwatch.model import endpoint
from portwatch.output import ExitStatus, print_json, print_table
from portwatch.text import escape

PORT_EVENTS = ("listener_opened", "listener_closed", "owner_changed", "reserved_port_taken", "port_conflict")
# portwatch_started/stopping say when the daemon was watching; state_restored right after a start
# says it carried on from its saved state (else the start is a fresh one: see At).
LIFECYCLE_EVENTS = ("portwatch_started", "portwatch_stopping", "state_restored", "state_reset")
_ROW_LIFECYCLE = ("portwatch_started", "portwatch_stopping")

# Field types as portwatch.log writes them: numbers as decimal text, lists as JSON, booleans
# as true/false. Other fields stay text: a process named "true" is a name, not a boolean.
_INT_FIELDS = frozenset({"port", "inode", "pid", "socket_uid", "netns_id", "blocked_pid", "repeats",
                         "suppressed", "listeners", "reserved_rules", "denied_pids"})
_LIST_FIELDS = frozenset({"pids", "previous_pids", "offender_pids", "cmdline"})
_BOOL_FIELDS = frozenset({"verified", "at_startup", "while_down", "holder_closed", "partial", "proc_events",
                          "ephemeral"})
# Every port event's JSON object has these keys (None when the daemon wrote no such field).
OWNER_KEYS = ("proto", "address", "port", "inode", "pid", "pids", "comm", "exe", "cmdline", "user", "unit",
              "unresolved", "socket_unit", "service_unit", "netns", "rule")
_PREFIX = "PORTWATCH_"

TIMELINE_HEADERS = ["TIME", "EVENT", "PROTO", "ADDRESS:PORT", "HOLDERS", "RULE", "NOTE"]
AT_HEADERS = ["PROTO", "ADDRESS:PORT", "HOLDERS", "RULE", "SINCE", "NOTE"]
_WORDS = {
    "listener_opened": "opened", "listener_closed": "closed", "owner_changed": "owner changed",
    "reserved_port_taken": "port taken", "port_conflict": "bind conflict",
    "portwatch_started": "portwatch started", "portwatch_stopping": "portwatch stopping",
}


class Entry(NamedTuple):
    """One of portwatch's journal entries."""

    usec: int  # __REALTIME_TIMESTAMP: when journald received it
    event: str
    fields: dict[str, Any]  # the PORTWATCH_* fields, lower-case names without the prefix, typed
    unit: str | None  # _SYSTEMD_UNIT, which journald sets itself
    boot: str | None
    cursor: str | None
    machine: str | None = None  # _MACHINE_ID: a directory from systemd-journal-remote holds many
    host: str | None = None  # _HOSTNAME, to name the machine in a message


# -- reading journalctl's JSON ----------------------------------------------------------------


def field_text(value: Any) -> str | None:
    """A field of journalctl's JSON as its exact text: a string; bytes written as a list of
    numbers (not printable UTF-8), decoded with surrogateescape; the first of a repeated field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value):
            return bytes(value).decode("utf-8", "surrogateescape")
        return field_text(value[0])
    return None


def typed(name: str, text: str) -> Any:
    """A field's value as the daemon meant it; text left as it is when it does not parse."""
    if name in _INT_FIELDS and text.isascii() and text.removeprefix("-").isdigit():
        return int(text)
    if name in _BOOL_FIELDS and text in ("true", "false"):
        return text == "true"
    if name in _LIST_FIELDS:
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, list) else text
    return text


def parse_entry(obj: Mapping[str, Any]) -> Entry | None:
    """An entry of `journalctl -o json` as an Entry; None when it is not one of portwatch's."""
    event = field_text(obj.get(_PREFIX + "EVENT"))
    stamp = field_text(obj.get("__REALTIME_TIMESTAMP"))
    if event is None or stamp is None or not stamp.isdigit():
        return None
    fields: dict[str, Any] = {}
    # Sorted: journalctl writes an entry's fields in an order that changes from run to run.
    for key, value in sorted(obj.items()):
        if key.startswith(_PREFIX) and key != _PREFIX + "EVENT":
            text = field_text(value)
            if text is not None:
                name = key[len(_PREFIX):].lower()
                fields[name] = typed(name, text)
    return Entry(int(stamp), event, fields, field_text(obj.get("_SYSTEMD_UNIT")),
                 field_text(obj.get("_BOOT_ID")), field_text(obj.get("__CURSOR")),
                 field_text(obj.get("_MACHINE_ID")), field_text(obj.get("_HOSTNAME")))


def unit_name(text: str) -> str:
    """`portwatch` means portwatch.service, as for systemctl."""
    return text if "." in text else f"{text}.service"


def match_groups(unit: str, port: int | None, proto: str | None, machine: str | None = None
                 ) -> list[list[str]]:
    """journalctl's matches: the port events of `port`/`proto` and the lifecycle events, each
    only from `unit` as journald attributes it (and from `machine`, when given). A conflict whose
    failure named no protocol has no PROTO field, so conflicts are matched on the port alone
    (`wanted` checks the protocol)."""
    trusted = [f"_SYSTEMD_UNIT={unit}", *([f"_MACHINE_ID={machine}"] if machine is not None else [])]
    where = [f"{_PREFIX}PORT={port}"] if port is not None else []
    changes = [*trusted, *(f"{_PREFIX}EVENT={e}" for e in PORT_EVENTS if e != "port_conflict"), *where]
    conflicts = [*trusted, f"{_PREFIX}EVENT=port_conflict", *where]
    if proto is not None:
        changes.append(f"{_PREFIX}PROTO={proto}")
    lifecycle = [*trusted, *(f"{_PREFIX}EVENT={e}" for e in LIFECYCLE_EVENTS)]
    return [changes, conflicts, lifecycle]


def machines(entries: Iterable[Entry]) -> dict[str, str | None]:
    """The machines the entries come from (_MACHINE_ID -> _HOSTNAME)."""
    return {e.machine: e.host for e in entries if e.machine is not None}


def mixed(seen: Mapping[str, str | None]) -> str | None:
    """One line when the entries come from more than one machine, whose sockets and boots are
    not one story (a directory systemd-journal-remote fills holds every sender's files)."""
    if len(seen) < 2:
        return None
    names = ", ".join(f"{escape(host or '?')} {machine}" for machine, host in sorted(seen.items()))
    return f"the journal holds portwatch's entries of {len(seen)} machines ({names}): pick one with --machine"


def wanted(entry: Entry, unit: str, port: int | None, proto: str | None) -> bool:
    """The same selection as match_groups, checked again here (for entries from anywhere)."""
    if entry.unit != unit:
        return False
    if entry.event in LIFECYCLE_EVENTS:
        return True
    if entry.event not in PORT_EVENTS:
        return False
    if port is not None and entry.fields.get("port") != port:
        return False
    have = entry.fields.get("proto")
    return proto is None or have == proto or (have is None and entry.event == "port_conflict")


# -- the timeline --------------------------------------------------------------------------------


def timeline(entries: Iterable[Entry]) -> list[Entry]:
    """The port events in journal order, with the daemon's starts and stops around them: from
    the last one before the first port event to the first one after the last (a journal of a
    year holds hundreds of restarts that say nothing about the port). Empty without a port event."""
    listed = [e for e in entries if e.event in PORT_EVENTS or e.event in _ROW_LIFECYCLE]
    ports = [n for n, e in enumerate(listed) if e.event in PORT_EVENTS]
    if not ports:
        return []
    first, last = ports[0], ports[-1]
    before = [n for n in range(first) if listed[n].event in _ROW_LIFECYCLE][-1:]
    after = [n for n in range(last + 1, len(listed)) if listed[n].event in _ROW_LIFECYCLE][:1]
    return [listed[n] for n in (*before, *range(first, last + 1), *after)]


def local_time(usec: int, tz: tzinfo | None = None) -> str:
    """`2026-12-06 15:00:01+0000`: local time (or `tz`) with its offset, to the second."""
    return datetime.fromtimestamp(usec // 1_000_000, tz).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S%z")


def iso_utc(usec: int) -> str:
    """`2026-12-06T15:00:01.123456Z`: exact, from the journal's microseconds."""
    return f"{datetime.fromtimestamp(usec // 1_000_000, UTC):%Y-%m-%dT%H:%M:%S}.{usec % 1_000_000:06d}Z"


def where_text(fields: Mapping[str, Any]) -> str:
    port = fields.get("port")
    address = fields.get("address")
    if not isinstance(port, int):
        return "?"
    return endpoint(address if isinstance(address, str) else "*", port)


def holders_text(fields: Mapping[str, Any]) -> str:
    """The first holder as `comm[pid] unit U` (`user U` without a unit), and how many more."""
    pid = fields.get("pid")
    if pid is None:
        unresolved = fields.get("unresolved")
        return f"unidentified ({unresolved})" if unresolved else ""
    text = f"{fields.get('comm')}[{pid}]"
    if fields.get("unit"):
        text += f" unit {fields['unit']}"
    elif fields.get("user"):
        text += f" user {fields['user']}"
    pids = fields.get("pids")
    more = len(pids) - 1 if isinstance(pids, list) else 0
    return text + (f" and {more} more" if more > 0 else "")


def _pids(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def notes(entry: Entry) -> list[str]:
    """What the row's other cells do not say: why, how, where."""
    f, said = entry.fields, []
    if entry.event == "portwatch_started" and f.get("listeners") is not None:
        said.append(f"watching {f['listeners']} listeners")
    if f.get("at_startup") is True:
        said.append("already listening at start" if entry.event == "listener_opened" else "at start")
    if f.get("while_down") is True:
        said.append("while portwatch was down")
    if entry.event == "owner_changed" and f.get("previous_pids") is not None:
        said.append(f"previous pids {_pids(f['previous_pids'])}")
    if entry.event == "reserved_port_taken":
        if f.get("offender_pids"):
            said.append(f"offender pids {_pids(f['offender_pids'])}")
        if f.get("verified") is False:
            said.append("holder not identified")
    if entry.event == "port_conflict":
        said += _conflict_notes(f)
    return said + _place_notes(f)


def _conflict_notes(f: Mapping[str, Any]) -> list[str]:
    blocked = str(f.get("blocked_unit") or "a process")
    if f.get("blocked_pid") is not None:
        blocked += f" ({f.get('blocked_comm')}[{f['blocked_pid']}])"
    said = [f"blocked: {blocked}"]
    if isinstance(f.get("repeats"), int) and f["repeats"] > 1:
        said.append(f"{f['repeats']} failures")
    if f.get("holder_unresolved"):
        said.append(f"holder not found: {f['holder_unresolved']}")
    if f.get("holder_closed") is True:
        said.append("the holder closed just before")
    return said


def _place_notes(f: Mapping[str, Any]) -> list[str]:
    """The socket unit behind a listener, and a network namespace other than the host's."""
    said = []
    if f.get("socket_unit"):
        said.append(f"socket {f['socket_unit']} → {f.get('service_unit') or '?'}")
    if f.get("netns") not in (None, "host"):
        said.append(f"netns {f['netns']}")
    if f.get("reason") == "netns_gone":
        said.append("its network namespace is gone")
    if f.get("ephemeral") is True:
        said.append("a client's ephemeral UDP socket")
    return said


def row(entry: Entry, tz: tzinfo | None = None) -> list[str]:
    """One table row (not escaped: render.table escapes every cell)."""
    f = entry.fields
    when = local_time(entry.usec, tz)
    if entry.event not in PORT_EVENTS:
        return [when, _WORDS.get(entry.event, entry.event), "", "", "", "", "; ".join(notes(entry))]
    word = _WORDS[entry.event]
    if entry.event == "listener_opened" and f.get("at_startup") is True:
        word = "listening"  # not an open: it was there when portwatch started
    holders = holders_text(f)
    if entry.event == "listener_closed" and holders:
        holders = f"was {holders}"
    if entry.event == "port_conflict" and not holders:
        holders = "none found"
    return [when, word, str(f.get("proto") or "?"), where_text(f), holders, str(f.get("rule") or ""),
            "; ".join(notes(entry))]


def rows(entries: Iterable[Entry], tz: tzinfo | None = None) -> list[list[str]]:
    return [row(e, tz) for e in entries]


def entry_json(entry: Entry) -> dict[str, Any]:
    """The entry with its exact values: time, event, the owner fields, then every other field
    (by name)."""
    base: dict[str, Any] = {"time": iso_utc(entry.usec), "realtime_usec": entry.usec, "event": entry.event}
    out = dict(base)
    if entry.event in PORT_EVENTS:
        out.update(dict.fromkeys(OWNER_KEYS))
    out.update((k, v) for k, v in entry.fields.items() if k not in base)
    out["cursor"] = entry.cursor
    return out


# -- the state at a moment -----------------------------------------------------------------------


class Held(NamedTuple):
    """A listener open at the moment asked about, and who held it."""

    fields: dict[str, Any]  # of the entry that last named its holders
    since_usec: int  # when that holder set was first reported
    since_event: str
    at_startup: bool  # already listening when portwatch started: held at least since then
    while_down: bool  # opened (or changed hands) while portwatch was down, before `since`
    taken: bool  # reported as reserved_port_taken by these holders


def socket_key(fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """A socket is its inode (unique within a boot); without one, where it listens."""
    inode = fields.get("inode")
    if isinstance(inode, int) and inode > 0:
        return ("inode", inode)
    return ("socket", fields.get("proto"), fields.get("address"), fields.get("port"), fields.get("netns"))


class At:
    """The listeners open after the entries fed so far (in journal order), and whether portwatch
    was running then.

    A new boot ends every socket of the last one. A start without a saved state (the entry right
    after portwatch_started is not state_restored) is followed by the inventory (listener_opened
    with at_startup): what was known before it is dropped, since a listener that closed while
    portwatch was down has no entry of its own then. After a start with a saved state, what
    changed while it was down comes as entries with while_down.
    """

    def __init__(self) -> None:
        self.held: dict[tuple[Any, ...], Held] = {}
        self.running = False
        self.started_usec: int | None = None
        self.stopped_usec: int | None = None
        self.entries = 0  # portwatch's entries fed, lifecycle ones included
        self._boot: str | None = None
        self._after_start = False  # the last entry was portwatch_started

    def feed(self, entry: Entry) -> None:
        self.entries += 1
        if entry.boot is not None:
            if self._boot is not None and entry.boot != self._boot:
                self.held.clear()
            self._boot = entry.boot
        if self._after_start:
            self._after_start = False
            if entry.event != "state_restored":
                self.held.clear()  # a fresh start: its inventory follows
        f = entry.fields
        if entry.event == "portwatch_started":
            self.running, self.started_usec, self.stopped_usec = True, entry.usec, None
            self._after_start = True
        elif entry.event == "portwatch_stopping":
            self.running, self.stopped_usec = False, entry.usec
        elif entry.event == "listener_closed":
            self.held.pop(socket_key(f), None)
        elif entry.event in ("listener_opened", "owner_changed", "reserved_port_taken"):
            self._holders(entry)

    def _holders(self, entry: Entry) -> None:
        f = entry.fields
        key = socket_key(f)
        before = self.held.get(key)
        taken = entry.event == "reserved_port_taken"
        if taken and before is not None and before.fields.get("pids") == f.get("pids"):
            # The verdict on the holders already known: they hold it since they were first seen.
            self.held[key] = before._replace(fields=f, taken=True)
            return
        self.held[key] = Held(f, entry.usec, entry.event, f.get("at_startup") is True,
                              f.get("while_down") is True, taken)

    def finish(self) -> None:
        """The end of the entries: a start with nothing after it was a fresh one."""
        if self._after_start:
            self._after_start = False
            self.held.clear()

    def listeners(self) -> list[Held]:
        def order(held: Held) -> tuple[str, int, str, int]:
            f = held.fields
            port = f.get("port")
            port = port if isinstance(port, int) else 0
            return str(f.get("proto")), port, str(f.get("address")), held.since_usec

        return sorted(self.held.values(), key=order)


def held_json(held: Held) -> dict[str, Any]:
    f = held.fields
    out: dict[str, Any] = {k: f.get(k) for k in OWNER_KEYS}
    out.update(since=iso_utc(held.since_usec), since_usec=held.since_usec, since_event=held.since_event,
               at_startup=held.at_startup, while_down=held.while_down, taken=held.taken,
               offender_pids=f.get("offender_pids") if held.taken else None)
    return out


def at_json(state: At, at: str) -> dict[str, Any]:
    return {
        "at": at,
        "portwatch_running": state.running,
        "portwatch_started": iso_utc(state.started_usec) if state.started_usec is not None else None,
        "portwatch_stopped": iso_utc(state.stopped_usec) if state.stopped_usec is not None else None,
        "listeners": [held_json(h) for h in state.listeners()],
    }


def at_row(held: Held, tz: tzinfo | None = None) -> list[str]:
    f = held.fields
    said = []
    if held.at_startup:
        said.append("already listening when portwatch started")
    if held.while_down:
        said.append("opened while portwatch was down, before that")
    if held.taken:
        said.append(f"taken: offender pids {_pids(f.get('offender_pids') or [])}")
    said += _place_notes(f)
    return [str(f.get("proto") or "?"), where_text(f), holders_text(f), str(f.get("rule") or ""),
            local_time(held.since_usec, tz), "; ".join(said)]


def not_running(state: At, tz: tzinfo | None = None) -> str | None:
    """The line saying portwatch was not watching at the moment asked about, or None."""
    if state.running:
        return None
    if state.stopped_usec is not None:
        return (f"portwatch was not running then: it stopped at {local_time(state.stopped_usec, tz)}; "
                "the answer is as of when it stopped")
    return "portwatch had not started by then, as far as the journal says"


# -- the command ---------------------------------------------------------------------------------


def command(args: argparse.Namespace) -> int:
    """`portwatch history`: the exit status (0; 1 nothing found; 2 usage; 65 the journal could not
    be read, or only part of it)."""
    if args.at is not None and (args.since is not None or args.until is not None):
        # The state at TIME needs every entry before it: a --since would drop the opens.
        sys.stderr.write("portwatch history: error: --at reads the journal from its start up to TIME; "
                         "it cannot be combined with --since or --until\n")
        return ExitStatus.USAGE
    unit = unit_name(args.unit)
    port: int | None = args.port
    proto = "udp" if args.udp else ("tcp" if port is not None else None)
    reader = JournalRead(match_groups(unit, port, proto, args.machine), since=args.since,
                         until=args.at if args.at is not None else args.until,
                         directory=args.directory, files=args.file or ())
    what = f"{proto} port {port}" if port is not None else (f"{proto} ports" if proto else "ports")
    try:
        found = (e for obj in reader.entries()
                 if (e := parse_entry(obj)) is not None and wanted(e, unit, port, proto))
        if args.at is not None:
            return _at(args, reader, found, what, unit)
        return _timeline(args, reader, list(found), what, unit)
    except JournalError as exc:
        sys.stderr.write(f"portwatch: {exc}\n")
        return ExitStatus.USAGE if exc.usage else ExitStatus.DATA_ERROR


def _timeline(args: argparse.Namespace, reader: JournalRead, found: list[Entry], what: str, unit: str) -> int:
    if (line := mixed(machines(found))) is not None:
        sys.stderr.write(f"portwatch: {line}\n")
        return ExitStatus.USAGE
    shown = timeline(found)
    if args.json:
        print_json([entry_json(e) for e in shown])
    elif shown:
        print_table(TIMELINE_HEADERS, rows(shown))
    if reader.incomplete:
        return _incomplete(reader)
    if not shown:
        sys.stderr.write(f"portwatch: no portwatch entries for {what} in {reader.where} "
                         f"(unit {escape(unit)})\n")
        return ExitStatus.NOT_FOUND
    return ExitStatus.OK


def _at(args: argparse.Namespace, reader: JournalRead, found: Iterator[Entry], what: str, unit: str) -> int:
    state, seen = At(), {}
    for entry in found:
        state.feed(entry)
        if entry.machine is not None:
            seen[entry.machine] = entry.host
    if (line := mixed(seen)) is not None:
        sys.stderr.write(f"portwatch: {line}\n")
        return ExitStatus.USAGE
    state.finish()
    held = state.listeners()
    if args.json:
        print_json(at_json(state, args.at))
    elif held:
        print_table(AT_HEADERS, [at_row(h) for h in held])
    if reader.incomplete:
        return _incomplete(reader)
    if not args.json and state.entries and (line := not_running(state)) is not None:
        sys.stderr.write(f"portwatch: {line}\n")  # --json: portwatch_running and portwatch_stopped say it
    if not held:
        if not state.entries:
            sys.stderr.write(f"portwatch: no portwatch entries for {what} up to {escape(args.at)} in "
                             f"{reader.where} (unit {escape(unit)})\n")
        else:
            sys.stderr.write(f"portwatch: nobody held {what} at {escape(args.at)}, "
                             "as far as the journal says\n")
        return ExitStatus.NOT_FOUND
    return ExitStatus.OK


def _incomplete(reader: JournalRead) -> int:
    """One line: the answer above lacks the entries of journal files this user cannot read."""
    if reader.unreadable:
        names = ", ".join(escape(path) for path in reader.unreadable[:3])
        more = f" and {len(reader.unreadable) - 3} more" if len(reader.unreadable) > 3 else ""
        lacking = f"cannot open {names}{more}"
    else:
        lacking = "journalctl sees only this user's own entries"
    sys.stderr.write(f"portwatch: {lacking}: the answer above lacks the system's entries, portwatch's "
                     "included (run as root, or as a member of group systemd-journal)\n")
    return ExitStatus.DATA_ERROR
