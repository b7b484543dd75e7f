"""Event output through structlog: JSON lines, a console view, or journald fields.

Every event is one line (or one journal entry). Values taken from processes
are data: JSON escapes every control character, the console view escapes them
with `portwatch.text.escape`, and journal fields carry the exact bytes with a
framing that cannot start a second field.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

from portwatch.events import describe, level_of
from portwatch.journal import (
    JOURNAL_SOCKET,
    MESSAGE_IDS,
    JournalSender,
    field_name,
    stream_is_journal,
)
from portwatch.text import escape


class _ImportedOnUse(types.ModuleType):
    """Stands in for a module until an attribute of it is used, then hands over to the real one."""

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def _import_structlog() -> types.ModuleType:
    """structlog, without loading asyncio before something uses it.

    structlog imports asyncio (and with it ssl) for its async logging methods,
    which portwatch never calls: 11 MiB that the daemon would carry for its
    whole life, a third of its memory on a large host. While structlog is
    imported a stand-in takes asyncio's place; structlog keeps it, and it
    loads the real asyncio the first time one of its attributes is used.
    """
    if "asyncio" in sys.modules:
        import structlog  # noqa: PLC0415

        return structlog
    stand_in = _ImportedOnUse("asyncio")
    sys.modules["asyncio"] = stand_in
    # structlog makes a LogRecord at import, and from 3.12 LogRecord() asks the asyncio in
    # sys.modules for the current task unless told not to.
    switch = "logAsyncioTasks"  # a module attribute, not in 3.11's logging (nor its stubs)
    asyncio_tasks = getattr(logging, switch, None)
    if asyncio_tasks is not None:
        setattr(logging, switch, False)
    try:
        import structlog  # noqa: PLC0415
    finally:
        if asyncio_tasks is not None:
            setattr(logging, switch, asyncio_tasks)
        if sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]  # whoever imports asyncio later gets the real one
    return structlog


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog()

FORMATS = ("auto", "json", "console", "journal")
JOURNAL_RETRY = 10.0  # seconds on stdout after the journal failed
PRIORITY = {"error": "3", "warning": "4", "info": "6", "debug": "7"}

EventDict = MutableMapping[str, Any]


def choose_format(requested: str, env: Mapping[str, str], stdout: TextIO) -> str:
    """auto: the journal when stdout/stderr is connected to it, console on a TTY, else JSON."""
    if requested != "auto":
        return requested
    if stream_is_journal(env):
        return "journal"
    try:
        return "console" if stdout.isatty() else "json"
    except ValueError:  # closed stream
        return "json"


def _sentence(_logger: object, _name: str, event_dict: EventDict) -> EventDict:
    """The event's name followed by its sentence, escaped: ConsoleRenderer prints it as it is."""
    event = str(event_dict["event"])
    body = {k: v for k, v in event_dict.items() if k not in ("event", "timestamp", "level")}
    return {**event_dict, "event": f"{event}: {escape(describe(event, body))}"}


# `TIME [LEVEL] EVENT: sentence key=value ...` on one line. Every value is printed as its repr,
# which escapes every character a terminal would act on (str.isprintable), and never in colour.
_CONSOLE = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0, sort_keys=False, repr_native_str=True)


def _drop_none(_logger: object, _name: str, event_dict: EventDict) -> EventDict:
    return {k: v for k, v in event_dict.items() if v is not None or k == "event"}


def journal_fields(event_dict: Mapping[str, Any]) -> list[tuple[str, str | bytes]]:
    """The journal entry for one event: MESSAGE, PRIORITY, MESSAGE_ID and PORTWATCH_* fields."""
    event = str(event_dict["event"])
    level = str(event_dict.get("level", level_of(event)))
    body = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp")}
    fields: list[tuple[str, str | bytes]] = [
        ("MESSAGE", escape(describe(event, dict(body)))),
        ("PRIORITY", PRIORITY.get(level, "6")),
        ("SYSLOG_IDENTIFIER", "portwatch"),
        ("PORTWATCH_EVENT", event),
    ]
    if event in MESSAGE_IDS:
        fields.append(("MESSAGE_ID", MESSAGE_IDS[event]))
    for key, value in body.items():
        name = field_name(key)
        if name is None or value is None:
            continue  # journald would drop an invalid name silently; we never build one
        fields.append((name, _journal_value(value)))
    return fields


def _journal_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value  # exact: encode_entry restores the original bytes
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=True)
    return str(value)


class _JournalLogger:
    """structlog's final stop for the journal: send, or fall back to a JSON line."""

    def __init__(self, sender: JournalSender, fallback: TextIO) -> None:
        self._sender = sender
        self._fallback = fallback
        self._skip_until = 0.0

    def msg(self, *, event_dict: EventDict) -> None:
        try:
            # After a failure, do not wait on a stuck journald once per event: stdout for a while.
            if time.monotonic() < self._skip_until:
                raise OSError("journal recently unreachable")
            self._sender.send(journal_fields(event_dict))
        except OSError:
            self._skip_until = time.monotonic() + JOURNAL_RETRY
            # journald is gone or stuck: no event is lost, it goes to stdout
            # (which under systemd is the journal's stream socket anyway).
            self._fallback.write(json.dumps(dict(event_dict), ensure_ascii=True) + "\n")
            self._fallback.flush()

    info = warning = error = debug = msg


def _to_journal_kwargs(_logger: object, _name: str, event_dict: EventDict) -> dict[str, Any]:
    return {"event_dict": event_dict}


class EventLog:
    """Writes events; safe to call from the hook threads."""

    def __init__(
        self,
        fmt: str = "json",
        *,
        stream: TextIO | None = None,
        journal_path: str = JOURNAL_SOCKET,
    ) -> None:
        if fmt not in FORMATS or fmt == "auto":
            raise ValueError(f"log format must be json, console or journal, not {fmt!r}")
        self.format = fmt
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._sender: JournalSender | None = None
        self._output_lost = False
        common: list[Any] = [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        ]
        logger: Any
        if fmt == "journal":
            self._sender = JournalSender(journal_path)
            processors = [*common, _drop_none, _to_journal_kwargs]
            logger = _JournalLogger(self._sender, self._stream)
        elif fmt == "console":
            processors = [*common, _drop_none, _sentence, _CONSOLE]
            logger = structlog.PrintLogger(self._stream)
        else:
            processors = [*common, structlog.processors.JSONRenderer(ensure_ascii=True)]
            logger = structlog.PrintLogger(self._stream)
        self._log = structlog.wrap_logger(logger, processors=processors)

    def emit(self, event: str, fields: Mapping[str, Any] | None = None) -> None:
        level = level_of(event)
        with self._lock:
            try:
                getattr(self._log, level)(event, **dict(fields or {}))
                if self.format != "journal":
                    self._stream.flush()
            except OSError as exc:
                # The reader went away (EPIPE: journald's stream restarted). Losing output must
                # not stop the watch: say it once on stderr and go on (hooks still run).
                if not self._output_lost:
                    self._output_lost = True
                    sys.stderr.write(f"portwatch: cannot write events: {exc.strerror or exc}\n")

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
