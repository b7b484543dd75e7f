"""portwatch.journal against a datagram socket we read ourselves, and against a real journald."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from portwatch.journal import (
    JOURNAL_SOCKET,
    MESSAGE_IDS,
    JournalSender,
    encode_entry,
    field_name,
    stream_is_journal,
    valid_field_name,
)
from tests.conftest import EVENT_NAMES
from tests.journald_fixture import (
    FakeJournal,
    Journald,
    field_values,
    parse_native,
)

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "systemd" / "portwatch.catalog"
# A process may name itself anything, newlines and escape sequences included.
HOSTILE_COMM = "ng\x1b[31minx\nPRIORITY=0\nMESSAGE_ID=00000000000000000000000000000000\n"


def _big_entry_size() -> int:
    # Bigger than the sender's default socket buffer, so a datagram must fail with EMSGSIZE.
    wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    return max(400_000, wmem + 65_536)


# --- names and ids ---------------------------------------------------------------------


def test_default_socket_path() -> None:
    assert JOURNAL_SOCKET == "/run/systemd/journal/socket"


@pytest.mark.parametrize("name", ["MESSAGE", "PRIORITY", "PORTWATCH_PORT", "A", "X1_2", "A" * 64])
def test_valid_field_names(name: str) -> None:
    assert valid_field_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "port", "Port", "_PID", "__CURSOR", "1ABC", "A" * 65, "A-B", "A=B", "A\nB", "A B",
     "ÄRGER", "PORT\x00"],
)  # fmt: skip
def test_invalid_field_names(name: str) -> None:
    assert not valid_field_name(name)


def test_field_name_prefixes_and_uppercases() -> None:
    assert field_name("pids") == "PORTWATCH_PIDS"
    assert field_name("conflict_with") == "PORTWATCH_CONFLICT_WITH"
    assert field_name("Port") == "PORTWATCH_PORT"
    assert field_name("x" * (64 - len("PORTWATCH_"))) == "PORTWATCH_" + "X" * 54


@pytest.mark.parametrize("key", ["", "a-b", "a.b", "a b", "x" * 55, "straße", "ß", "a\nb", "a=b"])
def test_field_name_rejects_what_would_be_invalid(key: str) -> None:
    assert field_name(key) is None


def test_message_ids_one_per_event_fixed_format() -> None:
    assert set(MESSAGE_IDS) == EVENT_NAMES
    for event, mid in MESSAGE_IDS.items():
        assert re.fullmatch(r"[0-9a-f]{32}", mid), event
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)


# --- framing ---------------------------------------------------------------------------


def test_encode_simple_and_binary_framing() -> None:
    data = encode_entry(
        [("MESSAGE", "hi"), ("PORTWATCH_TRACE", "a\nb"), ("PORTWATCH_RAW", b"\xff")]
    )
    assert data == (
        b"MESSAGE=hi\nPORTWATCH_TRACE\n" + (3).to_bytes(8, "little") + b"a\nb\nPORTWATCH_RAW=\xff\n"
    )


def test_encode_keeps_exact_bytes_of_undecodable_names() -> None:
    comm = b"bad\xff\xfename".decode("utf-8", "surrogateescape")
    assert encode_entry([("PORTWATCH_COMM", comm)]) == b"PORTWATCH_COMM=bad\xff\xfename\n"


def test_encode_rejects_invalid_names() -> None:
    with pytest.raises(ValueError, match="invalid journal field name"):
        encode_entry([("MESSAGE", "ok"), ("PRIORITY\nMESSAGE", "x")])
    with pytest.raises(ValueError, match="invalid journal field name"):
        encode_entry([("port", "9")])


def test_hostile_value_cannot_forge_fields() -> None:
    fields = parse_native(encode_entry([("PORTWATCH_COMM", HOSTILE_COMM), ("PRIORITY", "4")]))
    assert fields == [("PORTWATCH_COMM", HOSTILE_COMM.encode()), ("PRIORITY", b"4")]


# --- against a socket we read ----------------------------------------------------------


def test_send_arrives_as_one_datagram(fake_journal: FakeJournal) -> None:
    entry: list[tuple[str, str | bytes]] = [
        ("MESSAGE", "port 5432/tcp taken by nginx[77]"),
        ("MESSAGE_ID", MESSAGE_IDS["reserved_port_taken"]),
        ("PRIORITY", "3"),
        ("PORTWATCH_PORT", "5432"),
        ("PORTWATCH_DETAIL", "line one\nline two\n\nline four"),
        ("PORTWATCH_COMM", HOSTILE_COMM),
        ("PORTWATCH_RAW", b"\x00\x01\xff"),
    ]
    with JournalSender(fake_journal.path) as sender:
        sender.send(entry)
    got = fake_journal.receive()
    assert got.fds == []
    assert parse_native(got.payload) == [
        (name, value.encode() if isinstance(value, str) else value) for name, value in entry
    ]
    assert not fake_journal.pending()


def test_large_entry_goes_through_sealed_memfd(fake_journal: FakeJournal) -> None:
    import fcntl

    big = ("0123456789abcdef\n" * (_big_entry_size() // 17 + 1)).encode()
    entry = [("MESSAGE", b"big"), ("PORTWATCH_BLOB", big)]
    with JournalSender(fake_journal.path) as sender:
        sender.send(entry)
    got = fake_journal.receive()
    assert got.datagram == b""
    assert len(got.fds) == 1
    want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert got.seals is not None
    assert got.seals & want == want
    assert parse_native(got.payload) == entry


def test_small_entry_does_not_use_memfd(fake_journal: FakeJournal) -> None:
    with JournalSender(fake_journal.path) as sender:
        sender.send([("MESSAGE", "x" * 100_000)])
    assert fake_journal.receive().fds == []


def test_invalid_name_sends_nothing(fake_journal: FakeJournal) -> None:
    with JournalSender(fake_journal.path) as sender, pytest.raises(ValueError):
        sender.send([("MESSAGE", "x"), ("lower", "y")])
    assert not fake_journal.pending()


def test_unreachable_journal_raises_oserror(tmp_path: Path) -> None:
    with JournalSender(str(tmp_path / "missing.sock")) as sender, pytest.raises(OSError):
        sender.send([("MESSAGE", "x")])
    # A socket file nobody reads any more (journald stopped): refused.
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(dead))
    with JournalSender(str(dead)) as sender, pytest.raises(ConnectionRefusedError):
        sender.send([("MESSAGE", "x")])


def test_sender_reaches_a_restarted_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.sock"
    with JournalSender(str(path)) as sender:
        for round_ in range(2):
            receiver = FakeJournal(path)
            try:
                sender.send([("MESSAGE", f"round {round_}")])
                assert parse_native(receiver.receive().payload) == [
                    ("MESSAGE", f"round {round_}".encode())
                ]
            finally:
                receiver.close()
                path.unlink()


# --- JOURNAL_STREAM --------------------------------------------------------------------


def test_stream_is_journal_matches_dev_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(env, (a.fileno(),))
        assert stream_is_journal(env, (b.fileno(), a.fileno()))
        assert not stream_is_journal(env, (b.fileno(),))
        assert not stream_is_journal({}, (a.fileno(),))
        for bad in ("", f"{st.st_dev}", f"{st.st_dev}:", f":{st.st_ino}", "x:y",
                    f"{st.st_dev}:{st.st_ino}:1", f" {st.st_dev}:{st.st_ino}"):  # fmt: skip
            assert not stream_is_journal({"JOURNAL_STREAM": bad}, (a.fileno(),)), bad
    closed = os.open(tmp_path / "a", os.O_RDONLY)
    os.close(closed)
    assert not stream_is_journal(env, (closed,))  # EBADF is "no", not an error


def _child_says(env_stream: str, stderr: Path, stdout: Path) -> str:
    code = "import os; from portwatch.journal import stream_is_journal as s; print(s(os.environ))"
    with stderr.open("w") as err, stdout.open("w") as out:
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={"JOURNAL_STREAM": env_stream, "PATH": os.environ.get("PATH", "")},
            stdout=out,
            stderr=err,
            check=True,
            timeout=20,
        )
    return stdout.read_text().strip()


def test_stream_is_journal_default_fds_in_a_real_process(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    stream.touch()
    st = stream.stat()
    mark = f"{st.st_dev}:{st.st_ino}"
    # The stream as stderr (stdout elsewhere), then redirected away.
    assert _child_says(mark, stream, tmp_path / "out1") == "True"
    assert _child_says(mark, tmp_path / "err", tmp_path / "out2") == "False"


# --- the message catalog ---------------------------------------------------------------

_ENTRY = re.compile(r"^-- ([0-9a-f]{32})$", re.MULTILINE)
# Only fields whose values portwatch itself produces may be pasted by journalctl -x,
# which inserts them raw (see the catalog's header).
_SAFE_SUBSTITUTIONS = {"PORTWATCH_PORT", "PORTWATCH_PROTO"}


def _catalog_entries() -> dict[str, str]:
    text = CATALOG.read_text(encoding="utf-8")
    for line in text.splitlines():
        assert not (line.startswith("--") and not _ENTRY.match(line)), f"bad entry line {line!r}"
    parts = _ENTRY.split(text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_catalog_has_one_complete_entry_per_message_id() -> None:
    entries = _catalog_entries()
    assert sorted(entries) == sorted(MESSAGE_IDS.values())
    assert len(_ENTRY.findall(CATALOG.read_text())) == len(MESSAGE_IDS)
    for mid, body in entries.items():
        head, sep, text = body.strip("\n").partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines())
        assert sep, mid
        assert set(headers) == {"Subject", "Defined-By", "Support"}, mid
        assert headers["Defined-By"] == "portwatch", mid
        assert len(text.split()) > 20, mid  # a real explanation, not a stub
        for line in body.splitlines():
            assert not line.startswith("#"), f"{mid}: '#' starts a comment in a catalog"
        assert set(re.findall(r"@([A-Za-z0-9_]+)@", body)) <= _SAFE_SUBSTITUTIONS, mid


def test_catalog_reserved_port_text_names_the_owner_fields() -> None:
    text = _catalog_entries()[MESSAGE_IDS["reserved_port_taken"]]
    for name in ("PORTWATCH_PID", "PORTWATCH_COMM", "PORTWATCH_EXE", "PORTWATCH_USER",
                 "PORTWATCH_UNIT", "PORTWATCH_VERIFIED=false", "/etc/portwatch.yaml"):  # fmt: skip
        assert name in text


def test_catalog_compiles_with_journalctl(tmp_path: Path) -> None:
    # --root keeps journalctl away from the host's /var/lib/systemd/catalog/database.
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    (catalog_dir / "portwatch.catalog").write_bytes(CATALOG.read_bytes())
    run = [ "journalctl", f"--root={tmp_path}"]  # fmt: skip
    done = subprocess.run([*run, "--update-catalog"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "var/lib/systemd/catalog/database").stat().st_size > 0
    listed = subprocess.run(
        [*run, "--list-catalog"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    subjects = dict(line.split(" ", 1) for line in listed)
    assert sorted(subjects) == sorted(MESSAGE_IDS.values())
    assert all(subject.startswith("portwatch: ") for subject in subjects.values())
    dumped = subprocess.run(
        [*run, "--dump-catalog", MESSAGE_IDS["reserved_port_taken"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "PORTWATCH_VERIFIED=false" in dumped


# --- against a real systemd-journald ---------------------------------------------------


def _run_id() -> str:
    return uuid.uuid4().hex


@pytest.mark.root
def test_real_journald_stores_fields(journald: Journald) -> None:
    run = _run_id()
    comm = HOSTILE_COMM + "\udcff"  # plus a byte that is not UTF-8
    with JournalSender(journald.socket) as sender:
        sender.send([
            ("MESSAGE", "port 5432/tcp taken by an unexpected process"),
            ("MESSAGE_ID", MESSAGE_IDS["reserved_port_taken"]),
            ("PRIORITY", "2"),
            ("SYSLOG_IDENTIFIER", "portwatch"),
            ("PORTWATCH_EVENT", "reserved_port_taken"),
            ("PORTWATCH_PORT", "5432"),
            ("PORTWATCH_COMM", comm),
            ("PORTWATCH_DETAIL", "first line\nsecond line\n"),
            ("PORTWATCH_RUN", run),
        ])  # fmt: skip
    entries = journald.query(
        "PORTWATCH_EVENT=reserved_port_taken", "PORTWATCH_PORT=5432", f"PORTWATCH_RUN={run}"
    )
    assert len(entries) == 1
    entry = entries[0]
    assert entry["MESSAGE"] == "port 5432/tcp taken by an unexpected process"
    assert entry["MESSAGE_ID"] == MESSAGE_IDS["reserved_port_taken"]
    assert entry["PRIORITY"] == "2"
    assert entry["SYSLOG_IDENTIFIER"] == "portwatch"
    assert entry["_TRANSPORT"] == "journal"
    assert entry["_PID"] == str(os.getpid())
    assert entry["PORTWATCH_DETAIL"] == "first line\nsecond line\n"
    # The hostile name is one field with its exact bytes, and forged nothing.
    assert field_values(entry, "PORTWATCH_COMM") == [b"ng\x1b[31minx\nPRIORITY=0\nMESSAGE_ID="
                                                     + b"0" * 32 + b"\n\xff"]  # fmt: skip
    assert not [key for key in entry if key not in {
        "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "PORTWATCH_EVENT",
        "PORTWATCH_PORT", "PORTWATCH_COMM", "PORTWATCH_DETAIL", "PORTWATCH_RUN",
    } and not key.startswith("_")]  # fmt: skip


@pytest.mark.root
def test_real_journald_large_entry_via_memfd(journald: Journald) -> None:
    run = _run_id()
    size = _big_entry_size()
    blob = ("x" * 79 + "\n") * (size // 80 + 1)
    # Proof that this size cannot go as a datagram: a plain send fails.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as plain, pytest.raises(OSError) as err:
        plain.sendto(encode_entry([("PORTWATCH_BLOB", blob)]), journald.socket)
    assert err.value.errno == errno.EMSGSIZE
    with JournalSender(journald.socket) as sender:
        sender.send([("MESSAGE", "big entry"), ("PORTWATCH_BLOB", blob), ("PORTWATCH_RUN", run)])
    entries = journald.query(f"PORTWATCH_RUN={run}")
    assert len(entries) == 1
    assert entries[0]["MESSAGE"] == "big entry"
    assert entries[0]["PORTWATCH_BLOB"] == blob


@pytest.mark.root
def test_real_journald_drops_nothing_in_a_burst(journald: Journald) -> None:
    run = _run_id()
    with JournalSender(journald.socket) as sender:
        for i in range(200):
            sender.send([("MESSAGE", f"n{i}"), ("PORTWATCH_RUN", run), ("PORTWATCH_N", str(i))])
    entries = journald.query(f"PORTWATCH_RUN={run}", count=200)
    assert sorted(int(e["PORTWATCH_N"]) for e in entries) == list(range(200))


@pytest.mark.root
def test_catalog_explains_a_real_entry(journald: Journald, tmp_path: Path) -> None:
    """journalctl -x with our catalog, compiled in a private mount namespace.

    -x reads /var/lib/systemd/catalog/database whatever --root says (systemd 252), so
    the test gives journalctl tmpfs copies of both catalog directories instead.
    """
    run = _run_id()
    with JournalSender(journald.socket) as sender:
        sender.send([
            ("MESSAGE", "port 5432/tcp taken"),
            ("MESSAGE_ID", MESSAGE_IDS["reserved_port_taken"]),
            ("PORTWATCH_PORT", "5432"),
            ("PORTWATCH_PROTO", "tcp"),
            ("PORTWATCH_COMM", HOSTILE_COMM),
            ("PORTWATCH_RUN", run),
        ])  # fmt: skip
    assert len(journald.query(f"PORTWATCH_RUN={run}")) == 1
    script = """set -eu
mount -t tmpfs tmpfs /var/lib/systemd
mount -t tmpfs tmpfs /usr/lib/systemd/catalog
cp "$1" /usr/lib/systemd/catalog/
journalctl --update-catalog
exec journalctl --no-pager -x --directory="$2" "PORTWATCH_RUN=$3"
"""
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "-",
         str(CATALOG), journald.directory, run],
        capture_output=True, check=False, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8", "replace")
    assert "Subject: Reserved port 5432/tcp taken by an unexpected process" in out
    assert "Port 5432/tcp is reserved" in out
    assert "@PORTWATCH" not in out
    # Nothing of the attacker's text is pasted into the explanation.
    explanation = out.split("\n", 1)[1]
    assert "\x1b" not in explanation
    assert "PRIORITY=0" not in explanation


def test_fixture_output_is_json_lines() -> None:
    # field_values understands all three shapes journalctl -o json uses.
    entry = json.loads('{"A":"x","B":[255,0],"C":["x","y"],"D":[[255],"z"]}')
    assert field_values(entry, "A") == [b"x"]
    assert field_values(entry, "B") == [b"\xff\x00"]
    assert field_values(entry, "C") == [b"x", b"y"]
    assert field_values(entry, "D") == [b"\xff", b"z"]
    assert field_values(entry, "E") == []
