"""Process events (fork, exec, exit) from the kernel's proc connector.

The connector (NETLINK_CONNECTOR, group CN_IDX_PROC) reports each event
within microseconds, which tells the daemon when to look again and which pids
to look at first, instead of waiting for the next poll.

Who may listen differs between kernels and their builds, so the daemon tries
and falls back to polling on any OSError; it never decides from the version:
- bind() to the group may need CAP_NET_ADMIN (upstream before 6.6, and some
  later builds, refuse it to other users and in user namespaces): open()
  raises PermissionError.
- Outside the initial pid namespace a subscription may be refused with
  EPERM, or silently not acknowledged; yet a socket merely bound to the group
  can still receive every host event, with host pids that mean nothing in a
  container's /proc. So open() waits for the kernel's acknowledgement and
  raises TimeoutError (an OSError) without it, rather than hand out pids from
  another namespace.
- In a network namespace other than the initial one there is no connector:
  the subscription is refused (ECONNREFUSED).
See drivers/connector/cn_proc.c and include/uapi/linux/cn_proc.h.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import time

from portwatch.closing import Closing

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3  # connector messages travel as nlmsg_type NLMSG_DONE

PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x0  # the acknowledgement of a LISTEN/IGNORE request
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_EXIT = 0x80000000
_WANTED = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_HEADER = struct.Struct("=16xIIIIHH")  # cn_msg after the nlmsghdr: idx, val, seq, ack, len, flags
# proc_event after nlmsghdr (16) + cn_msg (20): what, cpu, timestamp_ns, then
# the union; every member used here starts with two pids.
_EVENT = struct.Struct("=36xI4xQiiii")
_EVENT_LEN = _EVENT.size

_ACK_TIMEOUT = 1.0  # the kernel acks during our send(); a second is generous
_RCVBUF = 4 * 1024 * 1024  # an event is 76 bytes but costs ~1 KiB of buffer
_MAX_BATCH = 4096  # per read_events call, so a fork storm cannot hold the caller


class ProcConnector(Closing):
    """A subscription to fork/exec/exit events. Use `open()`; not thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def open(cls) -> ProcConnector:
        """Subscribe, and return once the kernel has acknowledged it.

        Raises PermissionError where listening needs CAP_NET_ADMIN or the
        namespace may not subscribe, TimeoutError when the kernel does not
        acknowledge (another pid or user namespace), and OSError otherwise
        (no AF_NETLINK, no connector in this network namespace).
        """
        try:
            sock = socket.socket(
                socket.AF_NETLINK,
                socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                NETLINK_CONNECTOR,
            )
        except OSError as exc:
            raise _error(exc, "cannot open a NETLINK_CONNECTOR socket") from exc
        try:
            _grow_rcvbuf(sock)
            try:
                sock.bind((0, CN_IDX_PROC))
            except PermissionError as exc:
                raise _error(exc, "joining CN_IDX_PROC was refused (CAP_NET_ADMIN needed here)") from exc
            except OSError as exc:
                raise _error(exc, "cannot join CN_IDX_PROC") from exc
            _subscribe(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        """The non-blocking socket, readable when events are waiting (for selectors)."""
        return self._sock.fileno()

    def read_events(self) -> list[tuple[str, int]]:
        """Every event waiting now, oldest first; never blocks.

        ("fork", child_pid), ("exec", pid), ("exit", pid), per process:
        threads starting and ending are left out. [("overrun", 0)] when the
        kernel dropped events because the socket buffer was full: the caller
        cannot know what it missed and should rescan everything. At most
        _MAX_BATCH events per call; the socket stays readable if more wait.
        """
        events: list[tuple[str, int]] = []
        overrun = False
        for _ in range(_MAX_BATCH):
            try:
                data, (sender, _groups) = self._sock.recvfrom(256)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overrun = True  # reported once; what is still queued is stale: drained below
                    continue
                raise
            if sender == 0:  # only the kernel sends process events
                event = parse_event(data)
                if event is not None:
                    events.append(event)
        return [("overrun", 0)] if overrun else events

    def close(self) -> None:
        """Unsubscribe and close. Safe to call twice."""
        if self._sock.fileno() < 0:
            return
        # Before 6.6 the kernel counts listeners and only IGNORE lowers the
        # count; a socket closed without it leaves event reporting on for good.
        with contextlib.suppress(OSError):  # closing anyway
            self._sock.send(_request(PROC_CN_MCAST_IGNORE, 0))
        self._sock.close()


def parse_event(data: bytes) -> tuple[str, int] | None:
    """One connector message -> ("fork"|"exec"|"exit", pid), or None for anything else.

    Fork of a thread (child pid != child tgid) and exit of a thread that is
    not the group leader are None: no new process, no process gone.
    """
    if len(data) < _EVENT_LEN:
        return None
    idx, val, _seq, _ack, data_len, _flags = _HEADER.unpack_from(data)
    if idx != CN_IDX_PROC or val != CN_VAL_PROC or data_len < _EVENT_LEN - 36:
        return None
    what, _ts, a, b, c, d = _EVENT.unpack_from(data)
    if what == PROC_EVENT_FORK:  # parent pid, parent tgid, child pid, child tgid
        return ("fork", c) if c == d else None
    if what == PROC_EVENT_EXEC:  # pid, tgid
        return ("exec", b)
    if what == PROC_EVENT_EXIT:  # pid, tgid, exit code, signal
        return ("exit", a) if a == b else None
    return None


def _request(op: int, ack: int, events: int | None = None) -> bytes:
    """A connector message: a proc_cn_mcast_op, or a proc_input (op + event mask, 6.6+)."""
    payload = struct.pack("=I", op) if events is None else struct.pack("=II", op, events)
    cn_msg = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn_msg), NLMSG_DONE, 0, 0, 0) + cn_msg


def _subscribe(sock: socket.socket) -> None:
    """Send PROC_CN_MCAST_LISTEN and wait for the kernel's acknowledgement.

    The ack is an event of type NONE whose cn_msg.ack is ours plus one (its
    seq is rewritten by the kernel since 6.6); acks go to every listener, so
    a random ack number tells ours apart. Events read meanwhile are dropped:
    the caller scans everything once after opening anyway.
    """
    ack = random.randrange(1, 1 << 30)  # noqa: S311 (tells acks apart; not a secret)
    try:
        sock.send(_request(PROC_CN_MCAST_LISTEN, ack))
    except OSError as exc:  # ECONNREFUSED: no connector in this network namespace
        raise _error(exc, "cannot subscribe") from exc
    deadline = time.monotonic() + _ACK_TIMEOUT
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            break
        try:
            data, (sender, _groups) = sock.recvfrom(256)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                continue  # a burst of events; the ack may still be queued
            raise
        if sender != 0 or len(data) < _EVENT_LEN:
            continue
        msg_ack = _HEADER.unpack_from(data)[3]
        what, _ts, err, *_ = _EVENT.unpack_from(data)
        if what == PROC_EVENT_NONE and msg_ack == ack + 1:
            if err:
                raise OSError(err, f"proc connector refused to subscribe: {os.strerror(err)}")
            # Since 6.6 the kernel can drop the events we ignore (comm, uid,
            # gid, sid, ptrace, coredump) before they reach the buffer; older
            # kernels ignore a message of this size, so nothing is lost.
            sock.send(_request(PROC_CN_MCAST_LISTEN, ack, _WANTED))
            return
    raise TimeoutError(
        errno.ETIMEDOUT,
        f"proc connector did not acknowledge within {_ACK_TIMEOUT:g} s; it serves only "
        "processes in the initial pid and user namespaces",
    )


def _grow_rcvbuf(sock: socket.socket) -> None:
    """Room for bursts: RCVBUFFORCE passes rmem_max with CAP_NET_ADMIN, else RCVBUF."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _RCVBUF)
        except OSError:
            continue
        return


def _error(exc: OSError, what: str) -> OSError:
    """The same kind of OSError (PermissionError stays one), saying what failed."""
    return OSError(exc.errno, f"proc connector: {what}: {exc.strerror}")
