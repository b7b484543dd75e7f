"""Property-based fuzzing of everything that reads untrusted bytes.

Each parser may fail only with its documented error: `ProcParseError` for
the socket tables, nothing at all for the per-process files (a process
chooses its name and argv; the kernel writes the rest), `StateError` for the
state file. What a process wrote must come back byte for byte, and must
never leave its field in any output format.

The config loader is fuzzed in tests/test_config.py
(test_arbitrary_text_only_raises_config_error, test_arbitrary_bytes_only_raise_config_error,
test_config_shaped_documents_only_raise_config_error); it is not repeated here.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from portwatch.events import listener_fields
from portwatch.journal import encode_entry
from portwatch.log import EventLog, journal_fields
from portwatch.model import Listener, Process, Proto, Snapshot, Socket, Unresolved
from portwatch.proc import ProcFS
from portwatch.procfd import AccessDenied, ProcessGone
from portwatch.procfs import (
    ProcParseError,
    format_ipv4,
    format_ipv6,
    parse_cgroup_unit,
    parse_cmdline,
    parse_comm,
    parse_net_table,
    parse_status_uid,
)
from portwatch.state import FORMAT_VERSION, StateError, StateStore, boot_id
from portwatch.text import decode, encode
from tests.journald_fixture import parse_native

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode"
)

# Characters that int() and str.isdigit() treat differently from the kernel's ASCII,
# signs and separators int() accepts, and the framing of the table itself.
_TRICKY = ["²", "٣", "\u07c0", "-", "+", "_", "0x", ":", " ", "\t", "\n", "\x00", "\udcff", "\uff21\uff22"]
_HEXISH = st.text(alphabet="0123456789ABCDEFabcdef", min_size=0, max_size=34)
_TOKEN = st.one_of(
    _HEXISH,
    st.sampled_from(_TRICKY),
    st.builds(lambda a, b: a + b, st.sampled_from(_TRICKY), _HEXISH),
    st.builds(lambda a, t, b: a + t + b, _HEXISH, st.sampled_from(_TRICKY), _HEXISH),
    st.text(max_size=6),
)


def _row_strategy() -> st.SearchStrategy[str]:
    """Rows shaped like the kernel's (so the parser gets past its first checks), with any field replaced."""
    endpoint = st.one_of(
        st.builds(lambda a, p: f"{a}:{p}", _TOKEN, _TOKEN),
        st.builds(lambda a, p: f"{a:08X}:{p:04X}", st.integers(0, 2**32 - 1), st.integers(0, 65535)),
        _TOKEN,
    )
    fields = st.tuples(
        st.sampled_from(["0:", "   1:", "x", "0", "²:"]),  # slot
        endpoint,  # local
        endpoint,  # remote
        st.one_of(st.sampled_from(["0A", "07", "0a", "01", "A", "0AA", "٣A", "+A", "-7"]), _TOKEN),  # state
        st.one_of(st.integers(-5, 2**32).map(str), _TOKEN),  # uid
        st.one_of(st.integers(-5, 2**64).map(str), _TOKEN),  # inode
        st.lists(_TOKEN, max_size=4),  # the rest
    )
    return fields.map(lambda f: " ".join([f[0], f[1], f[2], f[3], "00000000:00000000", "00:00000000",
                                          "00000000", f[4], "0", f[5], *f[6]]))


def _check_table(text: str, proto: Proto, byteorder: Any) -> list[Socket]:
    error: ProcParseError | None = None
    try:
        sockets = parse_net_table(text, proto, source="/proc/self/net/x", byteorder=byteorder)
    except ProcParseError as exc:
        error = exc
    if error is not None:
        # The documented error names the file and a line that exists.
        assert str(error).startswith("/proc/self/net/x:")
        assert 2 <= error.lineno <= text.count("\n") + 1
        return []
    for sock in sockets:
        # Whatever the parser accepts is a socket that can exist.
        assert 0 <= sock.port <= 65535, sock
        assert sock.family in (4, 6) and sock.uid >= 0 and sock.inode >= 0
        assert sock.address.isascii() and sock.address.isprintable()
    return sockets


@FUZZ
@given(st.text(), st.sampled_from(list(Proto)), st.sampled_from(["little", "big"]))
def test_net_table_arbitrary_text(text: str, proto: Proto, byteorder: str) -> None:
    """Any text: a list of valid sockets, or ProcParseError naming the line."""
    _check_table(text, proto, byteorder)


@FUZZ
@given(st.lists(_row_strategy(), min_size=1, max_size=5), st.sampled_from(list(Proto)),
       st.sampled_from(["little", "big"]))
@example(["   0: -1234567:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1234 1"],
         Proto.TCP, "little")
@example(["   0: 0100007F:-016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1234 1"],
         Proto.TCP, "little")
def test_net_table_kernel_shaped_rows(rows: list[str], proto: Proto, byteorder: str) -> None:
    """Rows shaped like the kernel's with hostile fields: valid sockets or ProcParseError, nothing else.

    The two examples are the shortest failures found: a signed address
    (int(..., 16) accepts '-', to_bytes then raises OverflowError) and a signed
    port (accepted as port -22).
    """
    _check_table("\n".join([TCP_HEADER, *rows, ""]), proto, byteorder)


def _kernel_row(slot: int, proto: Proto, *, packed: bytes, port: int, uid: int, inode: int,
                byteorder: Any) -> str:
    """One row as net/ipv4/tcp_ipv4.c and udp.c print it: each 32-bit word as a host-order %08X."""
    words = "".join(f"{int.from_bytes(packed[i:i + 4], byteorder):08X}" for i in range(0, len(packed), 4))
    zero = "0" * len(words)
    state = "0A" if proto is Proto.TCP else "07"
    row = (f"{slot:4d}: {words}:{port:04X} {zero}:0000 {state} 00000000:00000000 00:00000000 "
           f"00000000 {uid:5d}        0 {inode} 2 0000000000000000 100 0 0 10 0")
    return row + (" 0" if proto is Proto.UDP else "")  # udp's drops column


_SOCKETS = st.lists(
    st.tuples(
        st.sampled_from([4, 6]),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 65535),
        st.integers(0, 2**32 - 1),
        st.integers(1, 2**63),
    ),
    max_size=20,
)


@FUZZ
@given(_SOCKETS, st.sampled_from(list(Proto)), st.sampled_from(["little", "big"]))
def test_net_table_round_trip(specs: list[tuple[int, bytes, int, int, int]], proto: Proto, byteorder: Any) -> None:
    """Every listener the kernel could print comes back with its exact address, port, uid and inode."""
    rows, want = [TCP_HEADER], []
    for slot, (family, raw, port, uid, inode) in enumerate(specs):
        packed = raw[:4] if family == 4 else raw
        rows.append(_kernel_row(slot, proto, packed=packed, port=port, uid=uid, inode=inode, byteorder=byteorder))
        address = format_ipv4(packed) if family == 4 else format_ipv6(packed)
        want.append(Socket(proto, family, address, port, inode, uid))
    got = parse_net_table("\n".join(rows) + "\n", proto, source="t", byteorder=byteorder)
    assert got == want


@FUZZ
@given(st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF]) | st.integers(0, 0xFFFF), min_size=8, max_size=8))
@example([0] * 8)
@example([1, 0, 0, 2, 0, 0, 3, 4])  # two equal zero runs: the first becomes "::"
@example([0, 0, 0, 0, 0, 0xFFFF, 0x7F00, 1])  # mapped: dotted, as ss prints it
def test_ipv6_text_is_rfc5952(words: list[int]) -> None:
    """format_ipv6 (written without ipaddress, for start-up time) agrees with ipaddress."""
    packed = b"".join(w.to_bytes(2, "big") for w in words)
    expected = ipaddress.IPv6Address(packed)
    if expected.ipv4_mapped is not None:
        assert format_ipv6(packed) == f"::ffff:{expected.ipv4_mapped}"
    else:
        assert format_ipv6(packed) == expected.compressed


@given(st.binary(max_size=64))
def test_comm_any_bytes_round_trip(raw: bytes) -> None:
    """comm: never raises, and only the kernel's one trailing newline is dropped."""
    comm = parse_comm(raw)
    assert encode(comm) == (raw[:-1] if raw.endswith(b"\n") else raw)


@FUZZ
@given(st.lists(st.binary(max_size=300).filter(lambda b: b"\0" not in b), max_size=20))
def test_cmdline_any_argv_round_trip(argv: list[bytes]) -> None:
    """cmdline: the exact argv back, invalid UTF-8, newlines and escapes included, but for empty
    arguments at the end (they read as the NUL padding of a rewritten argv, and ps drops them too)."""
    raw = b"".join(arg + b"\0" for arg in argv)
    while argv and not argv[-1]:
        argv = argv[:-1]
    assert [encode(arg) for arg in parse_cmdline(raw)] == argv


@FUZZ
@given(st.binary(max_size=400))
def test_cmdline_any_bytes(raw: bytes) -> None:
    """Also without the final NUL (a process that rewrote its argv area)."""
    args = parse_cmdline(raw)
    assert b"\0".join(encode(a) for a in args) == raw.removesuffix(b"\0")


_STATUS_LINES = st.one_of(
    st.text(max_size=40),
    st.builds(lambda v: f"Uid:\t{v}", st.text(max_size=12)),
    st.builds(lambda v: f"Uid:\t{v}\t{v}\t{v}\t{v}", st.sampled_from(["²", "٣", "-1", "+5", "1_000", ""])),
)


@FUZZ
@given(st.lists(_STATUS_LINES, max_size=8))
@example(["Name:\tx", "Uid:\t²\t0\t0\t0"])
def test_status_uid_any_text(lines: list[str]) -> None:
    """status: an int uid or None, never an exception (a superscript digit is a digit to isdigit())."""
    uid = parse_status_uid("\n".join(lines))
    assert uid is None or (isinstance(uid, int) and uid >= 0)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.text(max_size=30).filter(lambda s: "\n" not in s))
def test_status_uid_real_shape(uid: int, name: str) -> None:
    text = f"Name:\t{name}\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
    assert parse_status_uid(text) == uid


_CGROUP_PART = st.one_of(
    st.sampled_from(["", "system.slice", "x.service", "a.scope", "b.slice", "..", "c.socket",
                     "d.mount", "e.swap", ".service", "init.scope"]),
    st.text(max_size=12),
)
_CGROUP_LINE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda h, c, parts: f"{h}:{c}:/" + "/".join(parts),
              st.sampled_from(["0", "1", "12", "x", ""]),
              st.sampled_from(["", "name=systemd", "cpu,cpuacct", "memory", ":"]),
              st.lists(_CGROUP_PART, max_size=6)),
)


@FUZZ
@given(st.lists(_CGROUP_LINE, max_size=6))
def test_cgroup_unit_any_text(lines: list[str]) -> None:
    """cgroup: a unit name (no '/', a unit suffix, never a slice) or None."""
    unit = parse_cgroup_unit("\n".join(lines))
    if unit is not None:
        assert "/" not in unit and "\n" not in unit
        assert unit.endswith((".service", ".scope", ".socket", ".mount", ".swap"))


# --- the /proc readers over real files with arbitrary content --------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@FILES
@given(
    comm=st.binary(max_size=40),
    cmdline=st.binary(max_size=5000),
    status=st.binary(max_size=200),
    cgroup=st.binary(max_size=200),
    missing=st.sets(st.sampled_from(["cmdline", "cgroup", "exe"])),
)
def test_process_reader_on_files_with_any_bytes(
    comm: bytes, cmdline: bytes, status: bytes, cgroup: bytes, missing: set[str]
) -> None:
    """ProcFS.process over a /proc/<pid> of real files holding any bytes (invalid UTF-8, NULs):
    a Process with the exact comm and argv bytes, never an exception."""
    with tempfile.TemporaryDirectory() as root:
        base = Path(root, "4242")
        _write(base / "comm", comm)
        _write(base / "status", status)
        if "cmdline" not in missing:
            _write(base / "cmdline", cmdline)
        if "cgroup" not in missing:
            _write(base / "cgroup", cgroup)
        if "exe" not in missing:
            (base / "exe").symlink_to("/usr/bin/\udcff evil\n(deleted)")
        proc = ProcFS(root).process(4242)
    assert proc is not None
    assert encode(proc.comm) == comm.removesuffix(b"\n")
    want_argv = parse_cmdline(cmdline) if "cmdline" not in missing else ()
    assert proc.cmdline == want_argv
    assert proc.exe == (None if "exe" in missing else "/usr/bin/\udcff evil\n(deleted)")
    assert proc.uid is None or proc.uid >= 0
    assert proc.unit is None or "/" not in proc.unit


@FILES
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(
    ["socket:[²]", "socket:[12]", "socket:[-1]", "socket:[]", "pipe:[3]", "/tmp/socket:[9]",
     "anon_inode:[eventfd]", "socket:[٣]"])).filter(lambda t: t and "\0" not in t), max_size=6))
@example(["socket:[²]"])
def test_socket_fds_on_real_links_with_any_target(targets: list[str]) -> None:
    """ProcFS.socket_fds over real symlinks with any target: {fd: inode}, or the documented
    ProcessGone / AccessDenied; a link whose target merely looks like a socket never crashes it."""
    with tempfile.TemporaryDirectory() as root:
        fd_dir = Path(root, "77", "fd")
        fd_dir.mkdir(parents=True)
        for fd, target in enumerate(targets):
            os.symlink(encode(target), fd_dir / str(fd))
        try:
            found = ProcFS(root).socket_fds(77)
        except (ProcessGone, AccessDenied):
            return
    assert all(isinstance(v, int) and v >= 0 for v in found.values())
    for fd, target in enumerate(targets):
        if target.startswith("socket:[") and target[8:-1].isascii() and target[8:-1].isdigit():
            assert found[fd] == int(target[8:-1])


@FILES
@given(st.binary(max_size=600), st.sampled_from(["tcp", "tcp6", "udp", "udp6"]))
def test_socket_table_reader_on_a_file_with_any_bytes(data: bytes, name: str) -> None:
    """ProcFS.read_sockets over a real net/<table> of any bytes: sockets, or ProcParseError."""
    with tempfile.TemporaryDirectory() as root:
        _write(Path(root, "self", "net", name), data)
        proto = Proto.TCP if name.startswith("tcp") else Proto.UDP
        with contextlib.suppress(ProcParseError):
            ProcFS(root).read_sockets((proto,), (6,) if name.endswith("6") else (4,))


# --- the state file ----------------------------------------------------------------------------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_LISTENER_KEYS = ["proto", "family", "address", "port", "inode", "uid", "unresolved", "processes"]
_PROCESS_KEYS = ["pid", "comm", "exe", "cmdline", "uid", "user", "unit"]


def _state_document(listeners: list[dict[str, Any]], taken: Any, extra: dict[str, Any]) -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "boot_id": boot_id(), "saved_at": "x", "complete": True,
            "listeners": listeners, "taken": taken, **extra}


_VALID_PROCESS: dict[str, Any] = {"pid": 1, "comm": "x", "exe": None, "cmdline": [], "uid": 0, "user": None,
                                  "unit": None}
_VALID_LISTENER: dict[str, Any] = {"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": 22, "inode": 5,
                   "uid": 0, "unresolved": None, "processes": [_VALID_PROCESS]}
_MUTATED_LISTENER = st.builds(
    lambda key, value, pkey, pvalue: {
        **_VALID_LISTENER, key: value,
        "processes": [{**_VALID_PROCESS, pkey: pvalue}],
    },
    st.sampled_from(_LISTENER_KEYS), _JSON, st.sampled_from(_PROCESS_KEYS), _JSON,
)


def _load_state_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(directory)
        Path(store.path).write_bytes(data)
        error: StateError | None = None
        try:
            saved = store.load()
        except StateError as exc:
            error = exc
    if error is not None:
        assert str(error).startswith(store.path)
        return
    if saved is not None:
        assert isinstance(saved.snapshot, Snapshot)


@FILES
@given(st.binary(max_size=300))
def test_state_file_any_bytes(data: bytes) -> None:
    """A state file of any bytes: restored, ignored (another boot) or StateError; nothing else."""
    _load_state_bytes(data)


@FILES
@given(st.lists(_MUTATED_LISTENER, min_size=1, max_size=3),
       st.one_of(_JSON, st.dictionaries(st.text(max_size=4), _JSON, max_size=3)),
       st.dictionaries(st.sampled_from(["complete", "saved_at"]), _JSON, max_size=2))
@example([{**_VALID_LISTENER, "port": float("inf")}], {}, {})
@example([{**_VALID_LISTENER, "inode": float("nan")}], {}, {})
def test_state_file_of_ours_with_any_values(listeners: list[dict[str, Any]], taken: Any,
                                            extra: dict[str, Any]) -> None:
    """A file with our version and boot id but any value in any field: restored or StateError.

    json.loads reads 1e999 as inf and accepts Infinity/NaN; int(inf) raises
    OverflowError, which the loader does not turn into StateError.
    """
    text = json.dumps(_state_document(listeners, taken, extra))
    _load_state_bytes(text.encode("utf-8", "surrogatepass"))


def test_state_file_deeply_nested() -> None:
    """A nested-array bomb is corrupt, not a RecursionError."""
    _load_state_bytes(b'{"version": 1, "boot_id": "' + boot_id().encode() + b'", "listeners": '
                      + b"[" * 200_000 + b"]" * 200_000 + b"}")


# --- hostile strings through every output format ---------------------------------------------------

_HOSTILE_TEXT = st.one_of(
    st.text(),
    st.binary(max_size=60).map(decode),  # what /proc gives for any bytes
    st.lists(st.sampled_from(["\n", "\r", "\x1b[31m", "\x1b]0;t\x07", "\x9b2J", "\u202e", "\u2028",
                              "PRIORITY=0", "MESSAGE=", "\udcff", '{"event":"x"}', "\\", "\0", "$(id)"]),
             max_size=8).map("".join),
)


def _listener(comm: str, cmdline: list[str]) -> Listener:
    sock = Socket(Proto.TCP, 4, "127.0.0.1", 5432, 99, 0)
    proc = Process(4242, comm, "/usr/bin/x", tuple(cmdline), 0, "root", "x.service")
    return Listener(sock, (proc,), None)


def _raw_controls(text: str) -> list[str]:
    """Characters a terminal or a line-oriented reader would act on."""
    return [c for c in text if unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs"}]


@FUZZ
@given(_HOSTILE_TEXT, st.lists(_HOSTILE_TEXT, max_size=4))
def test_hostile_strings_stay_in_their_field_in_every_format(comm: str, cmdline: list[str]) -> None:
    """JSON: one line that parses back to the exact strings. Console: one line, no control
    character. Journal: the native framing parses back to exactly the fields sent, with the
    exact bytes, and MESSAGE holds no control character."""
    fields = listener_fields(_listener(comm, cmdline), "guarded")
    for fmt in ("json", "console"):
        out = io.StringIO()
        EventLog(fmt, stream=out).emit("listener_opened", fields)
        text = out.getvalue()
        assert text.endswith("\n") and text.count("\n") == 1
        line = text[:-1]
        assert "\r" not in line and "\u2028" not in line and "\x85" not in line
        if fmt == "json":
            event = json.loads(line)
            assert (event["comm"], event["cmdline"]) == (comm, cmdline)
            assert line.isascii()
        else:
            assert not _raw_controls(line), line
    entry = journal_fields({"event": "listener_opened", "level": "info", **fields})
    payload = encode_entry(entry)
    parsed = parse_native(payload)
    assert [name for name, _ in parsed] == [name for name, _ in entry]
    got = dict(parsed)
    assert got["PORTWATCH_COMM"] == encode(comm)
    assert json.loads(got["PORTWATCH_CMDLINE"]) == cmdline
    assert got["PRIORITY"] == b"6" and got["PORTWATCH_EVENT"] == b"listener_opened"
    message = got["MESSAGE"].decode("utf-8", "surrogateescape")
    assert not _raw_controls(message), message
    # Unresolved owners too: no process fields, the reason instead.
    bare = Listener(Socket(Proto.UDP, 6, "::1", 53, 7, 0), (), Unresolved.PERMISSION_DENIED)
    assert dict(parse_native(encode_entry(journal_fields(
        {"event": "listener_opened", **listener_fields(bare, None)}))))["PORTWATCH_UNRESOLVED"] == b"permission_denied"


_PROCESSES = st.builds(
    Process,
    pid=st.integers(1, 2**22), comm=_HOSTILE_TEXT, exe=st.none() | _HOSTILE_TEXT,
    cmdline=st.lists(_HOSTILE_TEXT, max_size=3).map(tuple), uid=st.none() | st.integers(0, 2**32 - 1),
    user=st.none() | _HOSTILE_TEXT, unit=st.none() | _HOSTILE_TEXT,
)
_LISTENERS = st.builds(
    lambda proto, family, port, inode, uid, processes: Listener(
        Socket(proto, family, "::1" if family == 6 else "127.0.0.1", port, inode, uid),
        tuple(processes), None if processes else Unresolved.NO_PROCESS,
    ),
    st.sampled_from(list(Proto)), st.sampled_from([4, 6]), st.integers(1, 65535), st.integers(1, 2**32),
    st.integers(0, 2**32 - 1), st.lists(_PROCESSES, max_size=3),
)


@FILES
@given(st.lists(_LISTENERS, max_size=5, unique_by=lambda x: x.socket.inode), st.booleans(),
       st.dictionaries(st.integers(1, 2**32), st.lists(st.integers(1, 2**22), max_size=3), max_size=3))
def test_state_file_round_trip(listeners: list[Listener], complete: bool, taken: dict[int, list[int]]) -> None:
    """What the daemon saves (hostile names included) is exactly what it loads after a restart."""
    snapshot = Snapshot({x.socket.inode: x for x in listeners}, complete=complete)
    with tempfile.TemporaryDirectory() as directory:
        store = StateStore(directory)
        store.save(snapshot, taken, "2026-11-29T00:00:00Z")
        saved = store.load()
    assert saved is not None
    assert saved.snapshot == snapshot
    assert saved.taken == taken
