"""sock_diag listener enumeration, against real sockets on loopback.

The oracle for every socket is os.fstat(fd).st_ino, its port from
getsockname() and our uid; the /proc reader must agree on the same sockets.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portwatch import sockdiag
from portwatch.model import Proto, Socket
from portwatch.proc import ProcFS
from portwatch.sockdiag import SockDiagUnavailable, list_listeners
from tests.conftest import AS_NOBODY, Holder, no_netlink, python_for_nobody, run_python


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _expected(sock: socket.socket, proto: Proto, family: int, address: str) -> Socket:
    return Socket(proto, family, address, sock.getsockname()[1], _inode(sock), os.getuid())


@pytest.fixture
def opened() -> Iterator[Callable[..., socket.socket]]:
    """Open sockets for a test; all closed at the end."""
    socks: list[socket.socket] = []

    def make(
        family: int, kind: int, address: str, *, listen: bool = True, v6only: int | None = None
    ) -> socket.socket:
        sock = socket.socket(family, kind)
        socks.append(sock)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind((address, 0))
        if listen and kind == socket.SOCK_STREAM:
            sock.listen()
        return sock

    yield make
    for sock in socks:
        sock.close()


def test_listeners_are_listed_exactly(opened: Callable[..., socket.socket]) -> None:
    """Each kind of listener appears with its inode, port, address and uid; non-listeners don't."""
    inet, inet6, tcp, udp = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
    tcp4 = opened(inet, tcp, "127.0.0.1")
    tcp6 = opened(inet6, tcp, "::1")
    dual = opened(inet6, tcp, "::", v6only=0)
    mapped = opened(inet6, tcp, "::ffff:127.0.0.1", v6only=0)
    udp4 = opened(inet, udp, "127.0.0.1")
    udp6 = opened(inet6, udp, "::1")
    udp_mapped = opened(inet6, udp, "::ffff:127.0.0.1", v6only=0)
    connected_udp = opened(inet, udp, "127.0.0.1")
    connected_udp.connect(udp4.getsockname())
    bound_only = opened(inet, tcp, "127.0.0.1", listen=False)  # TCP CLOSE: not a listener
    client = socket.create_connection(tcp4.getsockname())
    peer, _ = tcp4.accept()
    try:
        expected = {
            _expected(tcp4, Proto.TCP, 4, "127.0.0.1"),
            _expected(tcp6, Proto.TCP, 6, "::1"),
            _expected(dual, Proto.TCP, 6, "::"),
            _expected(mapped, Proto.TCP, 6, "::ffff:127.0.0.1"),
            _expected(udp4, Proto.UDP, 4, "127.0.0.1"),
            _expected(udp6, Proto.UDP, 6, "::1"),
            _expected(udp_mapped, Proto.UDP, 6, "::ffff:127.0.0.1"),
        }
        listed = list_listeners()
        assert expected <= set(listed)
        inodes = [s.inode for s in listed]
        assert len(inodes) == len(set(inodes)), "deduplicated by inode"
        for other in (connected_udp, bound_only, client, peer):
            assert _inode(other) not in inodes
    finally:
        client.close()
        peer.close()


def test_protocol_and_family_filters(opened: Callable[..., socket.socket]) -> None:
    inet, inet6, tcp, udp = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
    socks = {
        (Proto.TCP, 4): opened(inet, tcp, "127.0.0.1"),
        (Proto.TCP, 6): opened(inet6, tcp, "::1"),
        (Proto.UDP, 4): opened(inet, udp, "127.0.0.1"),
        (Proto.UDP, 6): opened(inet6, udp, "::1"),
    }
    ours = {_inode(s): key for key, s in socks.items()}
    for protocols, families in [
        ((Proto.TCP,), (4,)),
        ((Proto.UDP,), (6,)),
        ((Proto.UDP, Proto.TCP), (6,)),
        ((Proto.TCP,), (4, 6)),
        ((), (4, 6)),
        ((Proto.TCP, Proto.UDP), ()),
    ]:
        listed = list_listeners(protocols, families)
        assert all(s.proto in protocols and s.family in families for s in listed)
        seen = {ours[s.inode] for s in listed if s.inode in ours}
        assert seen == {(p, f) for p in protocols for f in families}


def test_many_listeners_span_several_replies(opened: Callable[..., socket.socket]) -> None:
    """600 listeners need several 32 KiB netlink replies; none is lost or doubled."""
    socks = [opened(socket.AF_INET6, socket.SOCK_STREAM, "::1") for _ in range(600)]
    expected = {_expected(s, Proto.TCP, 6, "::1") for s in socks}
    listed = list_listeners((Proto.TCP,), (6,))
    assert expected <= set(listed)
    assert len(listed) == len(set(listed))


def test_second_call_reuses_equal_sockets_and_never_stale_ones(
    opened: Callable[..., socket.socket],
) -> None:
    """The reuse of the previous result hands back only Sockets equal to fresh ones."""
    tcp = opened(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    right = _expected(tcp, Proto.TCP, 4, "127.0.0.1")
    first = {s.inode: s for s in list_listeners()}
    again = {s.inode: s for s in list_listeners()}
    assert again[right.inode] is first[right.inode]
    assert again[right.inode] == right
    # A remembered socket that no longer matches (inode numbers can be reused)
    # must not be handed back: each field is checked.
    for stale in (
        Socket(Proto.TCP, 4, "127.0.0.1", right.port + 1, right.inode, right.uid),
        Socket(Proto.TCP, 4, "127.0.0.2", right.port, right.inode, right.uid),
        Socket(Proto.TCP, 4, "127.0.0.1", right.port, right.inode, right.uid + 1),
        Socket(Proto.UDP, 4, "127.0.0.1", right.port, right.inode, right.uid),
        Socket(Proto.TCP, 6, "127.0.0.1", right.port, right.inode, right.uid),
    ):
        remembered = sockdiag._Reply((0, 0))  # a reply that matches none: its sockets are the last listing
        remembered.sockets = [stale]
        sockdiag._OWN._before = {(Proto.TCP, 4, 99): remembered}
        listed = {s.inode: s for s in list_listeners()}
        assert listed[right.inode] == right


def test_unchanged_replies_are_reused_and_changed_ones_parsed(
    opened: Callable[..., socket.socket],
) -> None:
    """A reply byte for byte like the last one gives the same sockets; any change is parsed anew."""
    socks = [opened(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1") for _ in range(300)]
    list_listeners((Proto.TCP,), (4,))
    before = dict(sockdiag._OWN._before)
    assert len(before) > 2, "300 listeners should take several replies"
    list_listeners((Proto.TCP,), (4,))
    assert all(sockdiag._OWN._before[key] is reply for key, reply in before.items())
    # Change the listing: one listener closed, one opened, one with a connection waiting in its
    # accept queue (same socket, different bytes: idiag_rqueue).
    closed = socks.pop(150)
    gone = _inode(closed)
    closed.close()
    fresh = opened(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    client = socket.create_connection(socks[0].getsockname()[:2])
    try:
        listed = {s.inode: s for s in list_listeners((Proto.TCP,), (4,))}
    finally:
        client.close()
    assert gone not in listed
    for sock in [*socks, fresh]:
        assert listed[_inode(sock)] == _expected(sock, Proto.TCP, 4, "127.0.0.1")


def test_an_unchanged_listing_is_the_same_list(opened: Callable[..., socket.socket]) -> None:
    """Every reply as before: the very list of the last listing, so the daemon's tracker skips
    it whole; any change, or another question, gives a new list."""
    dumper = sockdiag.Dumper()
    first = dumper.list((Proto.TCP, Proto.UDP), (4, 6))
    for _ in range(50):  # another process on the host may open or close a listener meanwhile
        again = dumper.list((Proto.TCP, Proto.UDP), (4, 6))
        if again is first:
            break
        first = again
    else:
        pytest.fail("the host's listeners never stayed the same between two listings")
    tcp = opened(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    changed = dumper.list((Proto.TCP, Proto.UDP), (4, 6))
    assert changed is not first and _inode(tcp) in {s.inode for s in changed}
    assert _inode(tcp) not in {s.inode for s in first}  # the old list was not touched
    assert dumper.list((Proto.TCP,), (4,)) is not changed  # asked for less: not the same answer


def test_both_parsers_agree_on_real_replies(opened: Callable[..., socket.socket]) -> None:
    """The uniform fast path and the message-by-message walk read real replies alike."""
    for _ in range(50):
        opened(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        opened(socket.AF_INET6, socket.SOCK_DGRAM, "::1")
    for proto, family in [(Proto.TCP, 4), (Proto.UDP, 6)]:
        results = []
        for walk_only in (False, True):
            found: dict[int, Socket] = {}
            dump = sockdiag._Dump(proto, family, seq=1)
            buf = bytearray(sockdiag._BUFSIZE + sockdiag._MSG_LEN)
            with sockdiag._open() as sock:
                for n in sockdiag._replies(sock, buf, dump.request(), dump.name):
                    raw = bytes(buf[:n])
                    if walk_only:
                        reply = sockdiag._Reply(sockdiag._digest(raw))
                        reply.done = dump._take_any(raw, reply)
                    else:
                        reply = dump.take(raw, sockdiag._digest(raw), {})
                    found.update({s.inode: s for s in reply.sockets})
                    if reply.done:
                        break
            results.append(found)
        assert results[0] == results[1]
        assert len(results[0]) >= 50


def test_kernel_error_is_reported_as_unavailable() -> None:
    """A dump for a protocol with no sock_diag handler ends in NLMSG_ERROR, reported with errno."""
    dump = sockdiag._Dump(Proto.UDP, 4, seq=1)
    request = bytearray(dump.request())
    request[17] = 253  # sdiag_protocol: IANA's "for experimentation", no handler in any kernel
    buf = bytearray(sockdiag._BUFSIZE + sockdiag._MSG_LEN)

    def run() -> None:
        with sockdiag._open() as sock:
            for n in sockdiag._replies(sock, buf, bytes(request), dump.name):
                raw = bytes(buf[:n])
                if dump.take(raw, sockdiag._digest(raw), {}).done:
                    break

    with pytest.raises(SockDiagUnavailable, match=r"not supported by this kernel"):
        run()


def test_same_listeners_as_proc(opened: Callable[..., socket.socket]) -> None:
    """Both paths give identical sets over the same live sockets (retried if the host churns)."""
    inet, inet6, tcp, udp = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
    ours = {
        _inode(s)
        for s in (
            opened(inet, tcp, "127.0.0.1"),
            opened(inet6, tcp, "::", v6only=0),
            opened(inet6, tcp, "::ffff:127.0.0.1", v6only=0),
            opened(inet, udp, "127.0.0.1"),
            opened(inet6, udp, "::1"),
        )
    }
    proc = ProcFS()
    for protocols in [(Proto.TCP, Proto.UDP), (Proto.TCP,), (Proto.UDP,)]:
        for _attempt in range(5):
            netlink = set(list_listeners(protocols))
            table = proc.read_sockets(protocols)
            assert table.complete, table.errors
            from_proc = set(table.sockets)
            if netlink == from_proc:
                break
        assert netlink == from_proc
        expected_ours = {s.inode for s in from_proc if s.inode in ours}
        assert {s.inode for s in netlink if s.inode in ours} == expected_ours
        if protocols == (Proto.TCP, Proto.UDP):
            assert expected_ours == ours


@pytest.mark.root
def test_uid_of_another_users_listener(holders: Callable[..., Holder], readable_tree: Path) -> None:
    """The uid is the socket owner's, here nobody's (65534), as /proc shows it."""
    holder = holders(
        [
            {"proto": "tcp", "family": 6, "address": "::1"},
            {"proto": "udp", "family": 4, "address": "127.0.0.1"},
        ],
        prefix=AS_NOBODY,
        python=python_for_nobody(),
        program=readable_tree / "programs" / "listener.py",
    )
    tcp, udp = holder.sockets
    listed = {s.inode: s for s in list_listeners()}
    assert listed[tcp["inode"]] == Socket(Proto.TCP, 6, "::1", tcp["port"], tcp["inode"], 65534)
    assert listed[udp["inode"]] == Socket(Proto.UDP, 4, "127.0.0.1", udp["port"], udp["inode"], 65534)
    from_proc = {s.inode: s for s in ProcFS().read_sockets().sockets}
    assert from_proc[tcp["inode"]] == listed[tcp["inode"]]


# Run inside a fresh network namespace: add addresses to lo, open listeners,
# and print what both paths list. The namespace holds nothing else, so the
# parent can compare whole sets.
_IN_NETNS = r"""
import json, os, socket, subprocess, sys
from portwatch.sockdiag import list_listeners
from portwatch.proc import ProcFS
spec = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for address in spec["addresses"]:
    subprocess.run(["ip", "-6", "addr", "add", address + "/128", "dev", "lo", "nodad"], check=True)
held, opened = [], []
for proto, family, address, v6only, connect in spec["sockets"]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, kind)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    scope = socket.if_nametoindex("lo") if address.startswith("fe80:") else 0
    s.bind((address, 0, 0, scope) if family == 6 else (address, 0))
    if kind == socket.SOCK_STREAM:
        s.listen()
    if connect:  # a client and its accepted peer: two more sockets, neither listening
        c = socket.create_connection(s.getsockname()[:2])
        held += [c, s.accept()[0]]
    held.append(s)
    opened.append([proto, family, address, s.getsockname()[1], os.fstat(s.fileno()).st_ino])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a connected UDP socket
u.bind(("127.0.0.1", 0)); u.connect(("127.0.0.1", 9)); held.append(u)
def rows(socks):
    return sorted([s.proto.value, s.family, s.address, s.port, s.inode, s.uid] for s in socks)
netlink, table = list_listeners(), ProcFS().read_sockets()
print(json.dumps({"opened": opened, "netlink": rows(netlink), "proc": rows(table.sockets)}))
"""


@pytest.mark.root
def test_addresses_in_a_network_namespace() -> None:
    """In an otherwise empty netns, both paths list exactly our listeners, in RFC 5952 form."""
    addresses = [
        "2001:db8::1",
        "fd00:1:2::5",
        "2001:0db8:0000:0000:0001:0000:0000:0001",
        "2001:db8:0:1:1:1:1:1",
        "fe80::1:2",
    ]
    sockets = [
        ["tcp", 6, "2001:db8::1", None, True],
        ["udp", 6, "fd00:1:2::5", None, False],
        ["tcp", 6, "2001:0db8:0000:0000:0001:0000:0000:0001", None, False],
        ["udp", 6, "2001:db8:0:1:1:1:1:1", None, False],
        ["tcp", 6, "fe80::1:2", None, False],
        ["tcp", 6, "::ffff:127.0.0.1", 0, False],
        ["udp", 6, "::ffff:0.0.0.0", 0, False],
        ["tcp", 6, "::", 0, False],
        ["udp", 6, "::", 1, False],
        ["tcp", 4, "127.5.6.7", None, True],
        ["udp", 4, "0.0.0.0", None, False],
    ]
    printed = {
        "2001:db8::1": "2001:db8::1",
        "fd00:1:2::5": "fd00:1:2::5",
        "2001:0db8:0000:0000:0001:0000:0000:0001": "2001:db8::1:0:0:1",  # first of two runs
        "2001:db8:0:1:1:1:1:1": "2001:db8:0:1:1:1:1:1",  # one zero field is not shortened
        "fe80::1:2": "fe80::1:2",
        "::ffff:127.0.0.1": "::ffff:127.0.0.1",
        "::ffff:0.0.0.0": "::ffff:0.0.0.0",
        "::": "::",
        "127.5.6.7": "127.5.6.7",
        "0.0.0.0": "0.0.0.0",
    }
    result = run_python(_IN_NETNS, json.dumps({"addresses": addresses, "sockets": sockets}),
                        prefix=["unshare", "--net"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = sorted(
        [proto, family, printed[address], port, inode, 0]
        for proto, family, address, port, inode in out["opened"]
    )
    assert out["netlink"] == expected
    assert out["proc"] == expected


def test_unavailable_when_netlink_is_forbidden() -> None:
    """Under a RestrictAddressFamilies-like seccomp filter: SockDiagUnavailable; /proc works."""
    child = r"""
from portwatch.sockdiag import SockDiagUnavailable, list_listeners
from portwatch.proc import ProcFS
try:
    list_listeners()
except SockDiagUnavailable as exc:
    print("unavailable:", exc)
print("proc:", ProcFS().read_sockets().complete)
"""
    result = run_python(child, prefix=no_netlink())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("unavailable: cannot open a NETLINK_SOCK_DIAG socket:")
    assert "EAFNOSUPPORT" in lines[0]
    assert lines[1] == "proc: True"
