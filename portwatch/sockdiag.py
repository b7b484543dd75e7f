"""Listening sockets from the kernel's sock_diag netlink interface (what `ss` uses).

One dump per (protocol, family) with the state filter applied in the kernel:
for TCP LISTEN the kernel walks only its listening hash, so established
connections cost nothing, where /proc/net/tcp formats every socket as text.
Standard library only (AF_NETLINK); no privilege is needed.

The result is exactly what `portwatch.proc` parses from /proc/net for the same
sockets (same states, same address text via `portwatch.procfs`), so either
path can feed a snapshot. When netlink is refused (systemd's
RestrictAddressFamilies=, a seccomp filter, a kernel without udp_diag) this
raises SockDiagUnavailable and the caller falls back to /proc.

Layouts: include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator

from portwatch.model import Proto, Socket
from portwatch.procfs import format_ipv4, format_ipv6

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3

TCP_CLOSE = 7  # a bound UDP socket with no peer (connect() makes it ESTABLISHED)
TCP_LISTEN = 10
_STATE = {Proto.TCP: TCP_LISTEN, Proto.UDP: TCP_CLOSE}
_IPPROTO = {Proto.TCP: socket.IPPROTO_TCP, Proto.UDP: socket.IPPROTO_UDP}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}

# nlmsghdr + inet_diag_req_v2 with a zeroed inet_diag_sockid (48 bytes).
_REQUEST = struct.Struct("=IHHII BBBxI 48x")

# nlmsghdr + inet_diag_msg, keeping only what a Socket needs: len, type, seq,
# state, sport (as two bytes: it is big-endian), src, uid, inode. The address
# is 4 bytes for AF_INET (the other 12 are zero) and 16 for AF_INET6.
_MSG_FORMAT = {4: "=IH2xI4xxB2xBB2x4s12x40xII", 6: "=IH2xI4xxB2xBB2x16s40xII"}
_MSG = {family: struct.Struct(fmt) for family, fmt in _MSG_FORMAT.items()}
_MSG_LEN = 88  # 16 header + 72 inet_diag_msg, then attributes
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")
_NLMSG_HDRLEN = 16

# One dump reply is at most 32 KiB (netlink_recvmsg caps max_recvmsg_len), so
# a bigger buffer reads no more at once. The slack lets a whole _MSG be
# unpacked at any offset inside a reply before the message type is known.
_BUFSIZE = 64 * 1024
# A dump answers during send() and recv(); never let a stuck read starve the
# systemd watchdog.
_TIMEOUT = 5.0


class SockDiagUnavailable(Exception):
    """The sock_diag netlink socket cannot be created or used; the message says why."""


def list_listeners(
    protocols: Iterable[Proto] = (Proto.TCP, Proto.UDP), families: Iterable[int] = (4, 6)
) -> list[Socket]:
    """Listening sockets of this network namespace, in no particular order.

    TCP sockets in LISTEN and UDP sockets in CLOSE (bound, unconnected): the
    same rows `ProcFS.read_sockets` returns for /proc/self/net/{tcp,udp}{,6}.
    Deduplicated by inode (a dump that races with socket churn can repeat
    one); sockets with inode 0 are all kept, as in the /proc reader.
    Families other than 4 and 6 are ignored. Raises SockDiagUnavailable.
    """
    return _OWN.list(protocols, families)


class Dumper:
    """Dumps the listening sockets of one network namespace: portwatch's own (a netlink socket
    opened for each listing), or another's (`inside`: one opened there and kept)."""

    __slots__ = ("_before", "_jobs", "_listed", "_sock")

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock
        # The replies of the last listing, by (protocol, family, position in its dump). On a
        # quiet host each reply is byte for byte the one before (same sockets, same queue
        # lengths), and hashing 8 KiB of bytes costs a fiftieth of parsing them.
        self._before: dict[tuple[Proto, int, int], _Reply] = {}
        # The last listing and what it asked for. Never mutated by its users (Namespaces copies it
        # before adding other namespaces' sockets), so an unchanged listing hands back this object.
        self._listed: list[Socket] = []
        self._jobs: list[tuple[Proto, int]] = []

    @classmethod
    def inside(cls, netns_fd: int) -> Dumper:
        """A dumper of the network namespace `netns_fd` refers to (an open /proc/<pid>/ns/net or
        `ip netns` file). Entering it needs CAP_SYS_ADMIN: raises SockDiagUnavailable."""
        return cls(_open_inside(netns_fd))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def list(self, protocols: Iterable[Proto], families: Iterable[int]) -> list[Socket]:
        """See list_listeners."""
        fams = set(families)
        jobs: list[tuple[Proto, int]] = [
            (p, f) for p in dict.fromkeys(protocols) for f in (4, 6) if f in fams]
        before = self._before
        # The last listing's sockets by inode, made when a reply changed. A listener outlives
        # many scans, and handing back the equal Socket from the scan before (they are
        # immutable) is cheaper than building it again and leaves the collector nothing new.
        previous: dict[int, Socket] | None = None
        seen: dict[tuple[Proto, int, int], _Reply] = {}
        sock = self._sock if self._sock is not None else _open()
        try:
            buf = bytearray(_BUFSIZE + _MSG_LEN)
            for seq, (proto, family) in enumerate(jobs, start=1):
                dump = _Dump(proto, family, seq=seq)
                for n, length in enumerate(_replies(sock, buf, dump.request(), dump.name)):
                    key = (proto, family, n)
                    raw = bytes(memoryview(buf)[:length])
                    digest = _digest(raw)
                    reply = before.get(key)
                    if reply is None or reply.digest != digest:
                        if previous is None:
                            previous = {s.inode: s for r in before.values() for s in r.sockets}
                        reply = dump.take(raw, digest, previous)
                    seen[key] = reply
                    if reply.done:
                        break
        finally:
            if sock is not self._sock:
                sock.close()
        self._before = seen  # replaced whole, never mutated: a listing in a thread is safe
        if previous is None and seen.keys() == before.keys() and jobs == self._jobs:
            return self._listed  # every reply as before: the very same list, for its users to skip
        found: dict[int, Socket] = {}
        zeros: list[Socket] = []
        for reply in seen.values():
            for s in reply.sockets:
                found[s.inode] = s
            zeros.extend(reply.zeros)
        self._listed, self._jobs = [*found.values(), *zeros], jobs
        return self._listed


def _digest(raw: bytes) -> tuple[int, int]:
    """Length and hash of a reply. Python's hash of bytes is SipHash keyed at random per
    process: no one on the host can make two replies collide, and keeping 16 bytes instead of
    the reply saves a large host a megabyte."""
    return len(raw), hash(raw)


class _Reply:
    """One netlink reply of a dump (the digest of its bytes) and what it said."""

    __slots__ = ("digest", "done", "sockets", "zeros")

    def __init__(self, digest: tuple[int, int]) -> None:
        self.digest = digest
        self.sockets: list[Socket] = []  # listeners with an inode
        self.zeros: list[Socket] = []  # listeners with inode 0
        self.done = False  # it ended the dump


_OWN = Dumper()


def _open() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
        sock.settimeout(_TIMEOUT)
    except OSError as exc:
        raise SockDiagUnavailable(f"cannot open a NETLINK_SOCK_DIAG socket: {_why(exc)}") from exc
    return sock


def _open_inside(netns_fd: int) -> socket.socket:
    """A sock_diag socket in another network namespace: made by a thread that enters it (setns
    moves only the calling thread), so this thread never leaves its own. A socket keeps the
    namespace it was made in."""
    from portwatch.libc import CLONE_NEWNET, setns  # noqa: PLC0415 (only for other namespaces)

    made: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
            made.append(_open())
        except Exception as exc:
            made.append(exc)

    try:
        thread = threading.Thread(target=enter_and_open, name="portwatch-setns")
        thread.start()
        thread.join()
    except RuntimeError as exc:  # no thread could be started
        raise SockDiagUnavailable(f"cannot enter the network namespace: {exc}") from exc
    result = made[0] if made else SockDiagUnavailable("cannot enter the network namespace")
    if isinstance(result, socket.socket):
        return result
    if isinstance(result, OSError):
        raise SockDiagUnavailable(f"cannot enter the network namespace: {_why(result)}") from result
    if isinstance(result, SockDiagUnavailable):
        raise result
    raise SockDiagUnavailable(f"cannot enter the network namespace: {result!r}") from result


def _replies(sock: socket.socket, buf: bytearray, request: bytes, name: str) -> Iterator[int]:
    """Send `request`, then read replies into `buf` and yield the length of each."""
    try:
        sock.send(request)
        while True:
            n, (sender, _groups) = sock.recvfrom_into(buf, _BUFSIZE, socket.MSG_TRUNC)
            if n > _BUFSIZE:
                raise SockDiagUnavailable(f"{name}: netlink reply of {n} bytes truncated")
            if sender == 0:  # only the kernel answers a dump
                yield n
    except TimeoutError as exc:
        raise SockDiagUnavailable(f"{name}: no reply within {_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise SockDiagUnavailable(f"{name}: {_why(exc)}") from exc


class _Dump:
    """One SOCK_DIAG_BY_FAMILY dump: builds the request and parses its replies.

    A listener equal to the one `previous` has for its inode is that object.
    """

    def __init__(self, proto: Proto, family: int, *, seq: int) -> None:
        self.proto = proto
        self.family = family
        self.seq = seq
        self.state = _STATE[proto]
        self.name = f"sock_diag {proto.value}{'6' if family == 6 else ''}"
        self.format = format_ipv4 if family == 4 else format_ipv6
        self.addresses: dict[bytes, str] = {}  # listeners share few addresses: format each once

    def request(self) -> bytes:
        return _REQUEST.pack(
            _REQUEST.size,
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            self.seq,
            0,
            _AF[self.family],
            _IPPROTO[self.proto],
            0,  # idiag_ext: no optional attributes
            1 << self.state,  # the kernel skips every socket in another state
        )

    def take(self, raw: bytes, digest: tuple[int, int], previous: dict[int, Socket]) -> _Reply:
        """Parse one reply (`digest`: its `_digest`)."""
        reply = _Reply(digest)
        if not self._take_uniform(raw, reply, previous):
            reply.sockets.clear()
            reply.done = self._take_any(raw, reply)
        return reply

    def _take_uniform(self, data: bytes, reply: _Reply, previous: dict[int, Socket]) -> bool:
        """The fast path: a reply made only of inet_diag_msgs of one length.

        That is the usual case (every socket of a dump carries the same
        attributes), and struct.iter_unpack then walks it with no offset
        arithmetic per listener. False, having
        added nothing to `reply.zeros`, as soon as the reply is anything
        else; `reply.sockets` may then hold some of its sockets.
        """
        if len(data) < _MSG_LEN:
            return False
        (first,) = _U32.unpack_from(data)
        if first < _MSG_LEN or first % 4 or len(data) % first:
            return False
        seq, state, proto, family = self.seq, self.state, self.proto, self.family
        found, addresses = reply.sockets.append, self.addresses
        zeros: list[Socket] = []
        for length, mtype, mseq, mstate, phi, plo, src, uid, inode in _uniform(family, first).iter_unpack(
            data
        ):
            if length != first or mtype != SOCK_DIAG_BY_FAMILY or mseq != seq or mstate != state:
                return False
            address = addresses.get(src)
            if address is None:
                address = addresses[src] = self.format(src)
            port = phi << 8 | plo
            old = previous.get(inode)
            if (
                old is not None
                and old.port == port
                and old.address == address
                and old.uid == uid
                and old.proto is proto
                and old.family == family
            ):
                sock = old
            else:
                sock = Socket(proto, family, address, port, inode, uid)
            if inode:
                found(sock)
            else:
                zeros.append(sock)
        reply.zeros = zeros
        return True

    def _take_any(self, raw: bytes, reply: _Reply) -> bool:
        """Walk a reply message by message: any mix of data, errors and NLMSG_DONE; True at DONE."""
        unpack = _MSG[self.family].unpack_from
        end = len(raw)
        buf = raw + bytes(_MSG_LEN)  # room to unpack a whole inet_diag_msg after the last message
        off = 0
        while off < end:
            length, mtype, mseq, state, phi, plo, src, uid, inode = unpack(buf, off)
            if length < _NLMSG_HDRLEN or off + length > end:
                raise SockDiagUnavailable(f"{self.name}: malformed netlink message")
            if mseq != self.seq:
                pass  # a late reply to an earlier request: not this dump's
            elif mtype == SOCK_DIAG_BY_FAMILY:
                if length < _MSG_LEN:
                    raise SockDiagUnavailable(f"{self.name}: short inet_diag_msg")
                if state == self.state:
                    address = self.addresses.get(src) or self.addresses.setdefault(src, self.format(src))
                    sock = Socket(self.proto, self.family, address, phi << 8 | plo, inode, uid)
                    (reply.sockets if inode else reply.zeros).append(sock)
            elif mtype in (NLMSG_DONE, NLMSG_ERROR):
                self._check_status(buf, off, length)
                if mtype == NLMSG_DONE:
                    return True
            off += (length + 3) & ~3
        return False

    def _check_status(self, buf: bytes, off: int, length: int) -> None:
        """NLMSG_DONE and NLMSG_ERROR carry an int: 0 (NLMSG_ERROR 0 is an ack), or a negative
        errno, raised here."""
        if length < _NLMSG_HDRLEN + _ERRNO.size:
            raise SockDiagUnavailable(f"{self.name}: short NLMSG_DONE/NLMSG_ERROR")
        (err,) = _ERRNO.unpack_from(buf, off + _NLMSG_HDRLEN)
        if err < 0:
            raise SockDiagUnavailable(self._error(-err))

    def _error(self, err: int) -> str:
        if err == errno.ENOENT:  # inet_diag has no handler for this protocol
            return f"{self.name}: not supported by this kernel (no {self.proto.value}_diag)"
        return f"{self.name} refused: {os.strerror(err)} ({errno.errorcode.get(err, err)})"


@functools.lru_cache(maxsize=16)
def _uniform(family: int, stride: int) -> struct.Struct:
    """_MSG padded to `stride` bytes, for iter_unpack over a uniform reply."""
    return struct.Struct(f"{_MSG_FORMAT[family]}{stride - _MSG_LEN}x")


def _why(exc: OSError) -> str:
    if exc.errno is None:
        return str(exc)
    return f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"




INET_DIAG_SKV6ONLY = 11  # a u8 attribute every AF_INET6 socket carries
_NLA = struct.Struct("=HH")
_INODE_AT = _NLMSG_HDRLEN + 68  # inet_diag_msg.idiag_inode


def v6only_flags(proto: Proto) -> dict[int, bool]:
    """inode -> IPV6_V6ONLY of each IPv6 listener: whether `[::]` also holds IPv4 addresses.
    Raises SockDiagUnavailable."""
    flags: dict[int, bool] = {}
    dump = _Dump(proto, 6, seq=1)
    with _open() as sock:
        buf = bytearray(_BUFSIZE + _MSG_LEN)
        for length in _replies(sock, buf, dump.request(), dump.name):
            raw = bytes(memoryview(buf)[:length])
            off = 0
            while off + _NLMSG_HDRLEN <= length:
                size, mtype = struct.unpack_from("=IH", raw, off)
                if size < _NLMSG_HDRLEN or off + size > length:
                    raise SockDiagUnavailable(f"{dump.name}: malformed netlink message")
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    dump._check_status(raw, off, size)
                    return flags
                if mtype == SOCK_DIAG_BY_FAMILY and size >= _MSG_LEN:
                    (inode,) = _U32.unpack_from(raw, off + _INODE_AT)
                    attr = off + _MSG_LEN
                    while attr + _NLA.size <= off + size:
                        alen, atype = _NLA.unpack_from(raw, attr)
                        if alen < _NLA.size:
                            break
                        if atype == INET_DIAG_SKV6ONLY and alen > _NLA.size:
                            flags[inode] = bool(raw[attr + _NLA.size])
                        attr += (alen + 3) & ~3
                off += (size + 3) & ~3
    return flags
