"""Pure parsers for the /proc files portwatch reads. Nothing here opens a file.

Each function takes the text (or bytes) of one file and returns typed values,
so every parser is tested on captured text alone. The reading side lives in
`portwatch.proc`.
"""

from __future__ import annotations

from typing import Literal

from portwatch.model import Proto, Socket
from portwatch.text import decode

ByteOrder = Literal["little", "big"]

# include/net/tcp_states.h: TCP_LISTEN is 10 (0A). A bound UDP socket without a
# peer stays in TCP_CLOSE (07); connect() moves it to TCP_ESTABLISHED (01).
LISTEN_STATE = {Proto.TCP: "0A", Proto.UDP: "07"}

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"
_MIN_FIELDS = 10  # sl local rem st tx:rx tr:when retrnsmt uid timeout inode


class ProcParseError(ValueError):
    """A /proc line that does not have the documented shape.

    The message names the file, the 1-based line number and quotes the line.
    """

    def __init__(self, source: str, lineno: int, line: str, reason: str) -> None:
        super().__init__(f"{source}:{lineno}: {reason}: {line!r}")
        self.source = source
        self.lineno = lineno
        self.line = line


def format_ipv4(packed: bytes) -> str:
    """Dotted quad from 4 bytes in network order."""
    return ".".join(str(b) for b in packed)


def format_ipv6(packed: bytes) -> str:
    """RFC 5952 text from 16 bytes in network order, `::ffff:a.b.c.d` when mapped.

    Python 3.11's ipaddress prints a mapped address as `::ffff:7f00:1`; `ss`,
    and RFC 5952 section 5, print the IPv4 part dotted. Done here rather than
    with ipaddress, whose import is a tenth of `portwatch list`'s start-up.
    """
    if packed[:12] == _MAPPED_PREFIX:
        return "::ffff:" + format_ipv4(packed[12:])
    words = [f"{packed[i] << 8 | packed[i + 1]:x}" for i in range(0, 16, 2)]
    # RFC 5952 4.2: the longest run of two or more zero words becomes "::", the first on a tie.
    best_start, best_len, i = 0, 0, 0
    while i < 8:
        j = i
        while j < 8 and words[j] == "0":
            j += 1
        if j - i > best_len:
            best_start, best_len = i, j - i
        i = j + 1
    if best_len < 2:
        return ":".join(words)
    return ":".join(words[:best_start]) + "::" + ":".join(words[best_start + best_len :])


def decode_address(hexaddr: str, byteorder: ByteOrder) -> tuple[int, str]:
    """Decode the address part of `local_address`: (family, printable address).

    The kernel prints each 32-bit word of the address as it sits in memory,
    read as a host-order integer (`%08X`), so on little-endian machines
    127.0.0.1 is `0100007F`. IPv6 is four such words.

    >>> decode_address("0100007F", "little")
    (4, '127.0.0.1')
    """
    if len(hexaddr) not in (8, 32):
        raise ValueError(f"address of {len(hexaddr)} hex digits")
    if not _is_hex(hexaddr):  # int(x, 16) would also take '-', '+', '_' and '0x'
        raise ValueError(f"invalid literal for int() with base 16: {hexaddr!r}")
    packed = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(hexaddr), 8)
    )
    if len(packed) == 4:
        return 4, format_ipv4(packed)
    return 6, format_ipv6(packed)


def parse_endpoint(text: str, byteorder: ByteOrder) -> tuple[int, str, int]:
    """`0100007F:0016` -> (4, '127.0.0.1', 22). The port is plain hex."""
    hexaddr, sep, hexport = text.partition(":")
    if not sep or len(hexport) != 4 or not _is_hex(hexport):
        raise ValueError("endpoint is not ADDRESS:PORT")
    family, address = decode_address(hexaddr, byteorder)
    return family, address, int(hexport, 16)


def parse_net_table(
    text: str, proto: Proto, *, source: str, byteorder: ByteOrder
) -> list[Socket]:
    """Listening sockets from the text of /proc/net/{tcp,tcp6,udp,udp6}.

    Fields are split on whitespace (lines end in spaces and udp has an extra
    `drops` column). Rows that are not listeners are checked for shape only;
    their addresses are not decoded, which keeps busy hosts cheap.
    See Documentation/networking/proc_net_tcp.rst in the kernel tree.
    """
    wanted = LISTEN_STATE[proto]
    sockets: list[Socket] = []
    lines = text.split("\n")
    for lineno, line in enumerate(lines[1:], start=2):  # line 1 is the header
        fields = line.split()
        if not fields:
            continue
        if len(fields) < _MIN_FIELDS or not fields[0].endswith(":"):
            raise ProcParseError(source, lineno, line, f"expected at least {_MIN_FIELDS} fields")
        state = fields[3]
        if len(state) != 2 or not _is_hex(state):
            raise ProcParseError(source, lineno, line, f"bad state {state!r}")
        if state.upper() != wanted:
            continue
        try:
            family, address, port = parse_endpoint(fields[1], byteorder)
            uid = int(fields[7])
            inode = int(fields[9])
        except ValueError as exc:
            raise ProcParseError(source, lineno, line, str(exc)) from None
        if uid < 0 or inode < 0:
            raise ProcParseError(source, lineno, line, "negative uid or inode")
        sockets.append(Socket(proto, family, address, port, inode, uid))
    return sockets


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def parse_sockstat_inuse(text: str) -> dict[str, int]:
    """{"TCP": 3, "UDP": 1, ...} from /proc/net/sockstat or sockstat6: each protocol's `inuse`
    (lines such as `TCP: inuse 3 orphan 0 tw 0 alloc 5 mem 1`; only `inuse` is per namespace)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        proto, sep, rest = line.partition(":")
        words = rest.split()
        if sep and len(words) >= 2 and words[0] == "inuse" and words[1].isdigit():
            counts[proto] = int(words[1])
    return counts


def parse_last_pid(text: str) -> int | None:
    """/proc/loadavg's fifth field: the pid most recently given out in this pid namespace.

    `0.10 0.21 0.34 1/737 2134` -> 2134; None when the text has another shape.
    """
    fields = text.split()
    if len(fields) == 5 and fields[4].isascii() and fields[4].isdigit():
        return int(fields[4])
    return None


def parse_comm(raw: bytes) -> str:
    """/proc/<pid>/comm: the name, up to 15 bytes, with the kernel's newline removed.

    Only the one trailing newline is the kernel's; a name may itself hold
    newlines, escapes or invalid UTF-8 (kept as surrogate escapes).
    """
    return decode(raw[:-1] if raw.endswith(b"\n") else raw)


def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """/proc/<pid>/cmdline: NUL-separated argv. Empty for kernel threads and zombies.

    A process that rewrote its argv (setproctitle: nginx workers, PostgreSQL
    backends) leaves the rest of the old argv area as NUL padding, which reads
    as a tail of empty arguments; like ps, trailing NULs are dropped (and with
    them any empty arguments a program was really given last).
    """
    raw = raw.rstrip(b"\0")
    if not raw:
        return ()
    return tuple(decode(arg) for arg in raw.split(b"\0"))


def parse_status_uid(text: str) -> int | None:
    """Real uid from /proc/<pid>/status (`Uid:\\t1000\\t1000\\t1000\\t1000`)."""
    for line in text.split("\n"):
        if line.startswith("Uid:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isascii() and fields[1].isdigit():
                return int(fields[1])
            return None
    return None


def parse_status_capabilities(text: str) -> int | None:
    """The effective capability set from /proc/<pid>/status (`CapEff:\t000001ffffffffff`)."""
    for line in text.split("\n"):
        if line.startswith("CapEff:"):
            fields = line.split()
            if len(fields) == 2 and len(fields[1]) <= 16 and _is_hex(fields[1]):
                return int(fields[1], 16)
            return None
    return None


_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".slice")


def parse_cgroup_unit(text: str) -> str | None:
    """The innermost systemd unit in /proc/<pid>/cgroup, or None.

    cgroup v2 has one line `0::/system.slice/ssh.service`; v1 has one line per
    hierarchy and systemd's is `N:name=systemd:/...`. Slices are containers,
    not units a process runs in, so they are skipped:
    `0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service`
    -> `foo.service`; a delegated sub-cgroup (`.../x.service/worker`) stays
    with `x.service`.
    """
    path = None
    for line in text.split("\n"):
        hierarchy, _, rest = line.partition(":")
        controllers, sep, cgpath = rest.partition(":")
        if not sep:
            continue
        if controllers == "name=systemd" or (hierarchy == "0" and controllers == ""):
            path = cgpath
            if controllers == "name=systemd":
                break
    if not path:
        return None
    for part in reversed(path.split("/")):
        if part.endswith(_UNIT_SUFFIXES) and not part.endswith(".slice"):
            return part
    return None
