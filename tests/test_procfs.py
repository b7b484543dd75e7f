"""The pure /proc parsers, on captured and hand-made text with the expected result beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portwatch.model import Proto, Socket
from portwatch.procfs import (
    ProcParseError,
    decode_address,
    parse_cgroup_unit,
    parse_cmdline,
    parse_comm,
    parse_last_pid,
    parse_net_table,
    parse_status_uid,
)

FIXTURES = Path(__file__).parent / "fixtures" / "net"
TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)
TCP6_HEADER = (
    "  sl  local_address                         remote_address                        st "
    "tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def _row(local: str, state: str = "0A", uid: int = 0, inode: int = 4242, rem: str | None = None) -> str:
    rem = rem or ("0" * len(local.split(":", maxsplit=1)[0]) + ":0000")
    return (
        f"   0: {local} {rem} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:>5}        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("capture_*.txt")))
def test_captured_tables(name: str) -> None:
    """Tables captured from this kernel parse to the sockets the capture script opened."""
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    proto = Proto(expected["proto"])
    text = (FIXTURES / f"{name}.txt").read_text()
    got = parse_net_table(text, proto, source=name, byteorder=expected["byteorder"])
    want = [Socket(proto, fam, addr, port, inode, uid) for fam, addr, port, inode, uid in expected["listeners"]]
    assert sorted(want) == sorted(got)


CASES = [
    # (name, header, row, proto, byteorder, expected socket fields or None when filtered out)
    ("ipv4 loopback", TCP_HEADER, _row("0100007F:1F90"), Proto.TCP, "little", (4, "127.0.0.1", 8080)),
    ("ipv4 any", TCP_HEADER, _row("00000000:0016"), Proto.TCP, "little", (4, "0.0.0.0", 22)),
    ("ipv4 10.0.0.5", TCP_HEADER, _row("0500000A:0016"), Proto.TCP, "little", (4, "10.0.0.5", 22)),
    ("ipv4 big-endian", TCP_HEADER, _row("7F000001:1F90"), Proto.TCP, "big", (4, "127.0.0.1", 8080)),
    ("ipv4 big-endian 10.0.0.5", TCP_HEADER, _row("0A000005:0016"), Proto.TCP, "big", (4, "10.0.0.5", 22)),
    ("ipv6 loopback", TCP6_HEADER, _row("00000000000000000000000001000000:0050"), Proto.TCP, "little", (6, "::1", 80)),
    ("ipv6 any", TCP6_HEADER, _row("00000000000000000000000000000000:0050"), Proto.TCP, "little", (6, "::", 80)),
    # 2001:db8::1 is bytes 20 01 0d b8 ... 00 00 00 01; each word printed as a little-endian u32.
    ("ipv6 2001:db8::1", TCP6_HEADER, _row("B80D0120000000000000000001000000:01BB"), Proto.TCP, "little", (6, "2001:db8::1", 443)),
    ("ipv6 big-endian", TCP6_HEADER, _row("20010DB8000000000000000000000001:01BB"), Proto.TCP, "big", (6, "2001:db8::1", 443)),
    # RFC 5952: the longest run of zeros is compressed, lowercase, no leading zeros.
    ("ipv6 fe80::1:0:0:2", TCP6_HEADER, _row("000080FE000000000000010002000000:0016"), Proto.TCP, "little", (6, "fe80::1:0:0:2", 22)),
    ("ipv6 first of equal runs", TCP6_HEADER, _row("B80D0120000000000000010001000000:0016"), Proto.TCP, "little", (6, "2001:db8::1:0:0:1", 22)),
    ("ipv4-mapped", TCP6_HEADER, _row("0000000000000000FFFF00000100007F:1F90"), Proto.TCP, "little", (6, "::ffff:127.0.0.1", 8080)),
    ("ipv4-mapped big-endian", TCP6_HEADER, _row("00000000000000000000FFFF7F000001:1F90"), Proto.TCP, "big", (6, "::ffff:127.0.0.1", 8080)),
    ("port 0", TCP_HEADER, _row("0100007F:0000"), Proto.TCP, "little", (4, "127.0.0.1", 0)),
    ("port 65535", TCP_HEADER, _row("0100007F:FFFF"), Proto.TCP, "little", (4, "127.0.0.1", 65535)),
    ("lowercase hex", TCP_HEADER, _row("0100007f:1f90", state="0a"), Proto.TCP, "little", (4, "127.0.0.1", 8080)),
    ("udp bound", TCP_HEADER, _row("0100007F:0035", state="07"), Proto.UDP, "little", (4, "127.0.0.1", 53)),
    ("udp connected is not a listener", TCP_HEADER, _row("0100007F:0035", state="01", rem="0100007F:1234"), Proto.UDP, "little", None),
    ("tcp established is not a listener", TCP_HEADER, _row("0100007F:0035", state="01", rem="0100007F:1234"), Proto.TCP, "little", None),
    ("tcp time-wait is not a listener", TCP_HEADER, _row("0100007F:0035", state="06", inode=0), Proto.TCP, "little", None),
    ("tcp close (07) is not a listener", TCP_HEADER, _row("0100007F:0035", state="07"), Proto.TCP, "little", None),
]


@pytest.mark.parametrize(
    ("header", "row", "proto", "byteorder", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_rows(header: str, row: str, proto: Proto, byteorder: str, expected: tuple[int, str, int] | None) -> None:
    """Each hand-made row decodes to its address, port and family, or is filtered out."""
    got = parse_net_table(header + row, proto, source="t", byteorder=byteorder)  # type: ignore[arg-type]
    if expected is None:
        assert got == []
    else:
        assert [(s.family, s.address, s.port) for s in got] == [expected]


def test_inode_uid_and_trailing_spaces() -> None:
    """uid and inode come through, inode 0 is kept, and trailing spaces and blank lines are fine."""
    text = TCP_HEADER + _row("0100007F:1F90", uid=1000, inode=0).rstrip("\n") + "      \n\n"
    (sock,) = parse_net_table(text, Proto.TCP, source="t", byteorder="little")
    assert (sock.uid, sock.inode) == (1000, 0)


def test_udp_drops_column() -> None:
    """udp has a trailing `drops` column; the parser splits on whitespace, not offsets."""
    header = TCP_HEADER.rstrip("\n") + " ref pointer drops            \n"
    row = "  695: 0100007F:BBD5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 8696 2 000000003a0cd02b 0          \n"
    (sock,) = parse_net_table(header + row, Proto.UDP, source="udp", byteorder="little")
    assert (sock.port, sock.inode) == (48085, 8696)


def test_header_only_and_empty() -> None:
    """A table with no sockets, or an empty text, yields nothing."""
    assert parse_net_table(TCP_HEADER, Proto.TCP, source="t", byteorder="little") == []
    assert parse_net_table("", Proto.TCP, source="t", byteorder="little") == []


MALFORMED = [
    ("too few fields", "   0: 0100007F:1F90 00000000:0000 0A\n", "expected at least 10 fields"),
    ("no sl colon", _row("0100007F:1F90").replace("0:", "0", 1), "expected at least 10 fields"),
    ("bad state", _row("0100007F:1F90", state="ZZ"), "bad state 'ZZ'"),
    ("bad address hex", _row("0100007G:1F90"), "invalid literal"),
    ("address of 6 digits", _row("01007F:1F90"), "address of 6 hex digits"),
    ("no port", _row("0100007F1F90"), "endpoint is not ADDRESS:PORT"),
    ("bad inode", _row("0100007F:1F90").replace(" 4242 ", " 42x2 "), "invalid literal"),
]


@pytest.mark.parametrize(("row", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_lines(row: str, reason: str) -> None:
    """A malformed line raises ProcParseError naming the file, the line number and the line."""
    text = TCP_HEADER + _row("0100007F:0016") + row
    with pytest.raises(ProcParseError) as info:
        parse_net_table(text, Proto.TCP, source="/proc/net/tcp", byteorder="little")
    message = str(info.value)
    assert message.startswith("/proc/net/tcp:3: ")
    assert reason in message
    assert repr(row.rstrip("\n")) in message or repr(row) in message
    assert info.value.lineno == 3


def test_decode_address_examples() -> None:
    """The docstring examples hold."""
    assert decode_address("0100007F", "little") == (4, "127.0.0.1")
    assert decode_address("7F000001", "big") == (4, "127.0.0.1")


@pytest.mark.parametrize(("text", "expected"), [
    ("0.10 0.21 0.34 1/737 2134\n", 2134),  # this kernel's
    ("0.00 0.00 0.00 1/1 1", 1),
    ("0.10 0.21 0.34 1/737\n", None),
    ("0.10 0.21 0.34 1/737 21x4\n", None),
    ("0.10 0.21 0.34 1/737 \u0663\n", None),  # a non-ASCII digit is not a pid
    ("", None),
])
def test_last_pid_from_loadavg(text: str, expected: int | None) -> None:
    assert parse_last_pid(text) == expected


def test_comm_keeps_hostile_bytes() -> None:
    """Only the kernel's trailing newline is removed; newlines, escapes and bad UTF-8 stay."""
    assert parse_comm(b"nginx\n") == "nginx"
    assert parse_comm(b"a\nb\x1b[31m\n") == "a\nb\x1b[31m"
    assert parse_comm(b"\xff\xfe\n") == "\udcff\udcfe"
    assert parse_comm(b"") == ""


def test_cmdline() -> None:
    """argv is NUL-separated; a rewritten title with spaces stays one element."""
    assert parse_cmdline(b"/usr/sbin/sshd\0-D\0") == ("/usr/sbin/sshd", "-D")
    assert parse_cmdline(b"postgres: checkpointer ") == ("postgres: checkpointer ",)
    assert parse_cmdline(b"") == ()
    assert parse_cmdline(b"a\0\0b\0") == ("a", "", "b")
    # nginx's worker as /proc shows it: the title, then the old argv area as NUL padding
    assert parse_cmdline(b"nginx: worker process" + b"\0" * 27) == ("nginx: worker process",)
    assert parse_cmdline(b"\0\0\0") == ()


def test_status_uid() -> None:
    """The real uid is the first number on the Uid: line."""
    text = "Name:\tsshd\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
    assert parse_status_uid(text) == 1000
    assert parse_status_uid("Name:\tx\n") is None
    assert parse_status_uid("Uid:\tbogus\n") is None


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/ssh.service\n", "ssh.service"),
        ("0::/system.slice/postgresql@15-main.service\n", "postgresql@15-main.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n", "foo.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/system.slice/docker.service/worker\n", "docker.service"),
        ("0::/init.scope\n", "init.scope"),
        ("0::/\n", None),
        ("0::/user.slice\n", None),
        ("12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service"),
        ("0::/\n1:name=systemd:/system.slice/cron.service\n", "cron.service"),
        ("9:name=systemd:/\n0::/\n", None),
        ("garbage\n", None),
        ("", None),
    ],
)
def test_cgroup_unit(text: str, unit: str | None) -> None:
    """The innermost systemd unit is named; slices and the root are not units."""
    assert parse_cgroup_unit(text) == unit
