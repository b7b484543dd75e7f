"""`portwatch why PORT`: the overlap rule (pure), and the command checked against what bind() does.

Each live case holds real sockets on loopback, asks portwatch, then binds the same address and
port itself the way a server does: portwatch's answer must be the kernel's.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterator

import pytest

from portwatch.cli import main
from portwatch.model import Listener, Process, Proto, Socket
from portwatch.why import Blocker, explain, overlap
from tests.conftest import free_port


@pytest.mark.parametrize(("held", "held_v6only", "wanted", "wanted_v6only", "blocks"), [
    ("127.0.0.1", None, "127.0.0.1", False, True),
    ("127.0.0.1", None, "127.0.0.2", False, False),
    ("0.0.0.0", None, "127.0.0.1", False, True),
    ("127.0.0.1", None, "0.0.0.0", False, True),
    ("::", False, "127.0.0.1", False, True),  # dual-stack [::] holds IPv4 too
    ("::", True, "127.0.0.1", False, False),
    ("::", None, "0.0.0.0", False, True),  # unknown: counted as Linux's default, dual-stack
    ("0.0.0.0", None, "::", False, True),  # a new dual-stack [::] needs 0.0.0.0
    ("0.0.0.0", None, "::", True, False),
    ("127.0.0.1", None, "::1", False, False),
    ("::ffff:127.0.0.1", None, "127.0.0.1", False, True),
    ("::1", None, "::", True, True),
])
def test_overlap(held: str, held_v6only: bool | None, wanted: str, wanted_v6only: bool, blocks: bool) -> None:
    assert (overlap(held, held_v6only, wanted, wanted_v6only=wanted_v6only) is not None) is blocks


def test_what_bind_errors_mean() -> None:
    """EACCES says only that this user may not bind the port: the listeners decide then."""
    holder = Listener(Socket(Proto.TCP, 4, "0.0.0.0", 80, 9, 0), (Process(9, "nginx", None, (), 0, "root", None),))
    blocked = [Blocker(holder, "it listens on every IPv4 address")]
    assert explain(Proto.TCP, "127.0.0.1", 80, [], bind_failed=OSError(errno.EACCES, 'Permission denied'), uid=1000, since={})[0] is True
    can, text = explain(Proto.TCP, "127.0.0.1", 80, blocked, bind_failed=OSError(errno.EACCES, 'Permission denied'), uid=1000, since={9: "x"})
    assert not can and "nginx[9] (user root) listens on *:80 since x" in text and "uid 1000" in text
    can, text = explain(Proto.TCP, "192.0.2.1", 80, [], bind_failed=OSError(errno.EADDRNOTAVAIL, 'Cannot assign requested address'), uid=0, since={})
    assert not can and "no interface of this host has the address 192.0.2.1" in text
    can, text = explain(Proto.TCP, "127.0.0.1", 80, [], bind_failed=OSError(errno.EADDRINUSE, 'Address already in use'), uid=0, since={})
    assert not can and "no listener portwatch can see overlaps it" in text


def kernel_allows(address: str, port: int, proto: int = socket.SOCK_STREAM) -> bool:
    """What bind() says, as a server that sets SO_REUSEADDR and nothing else binds."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
        return True


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def listen(held: list[socket.socket], address: str, port: int, *, v6only: bool | None = None) -> None:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((address, port))
    sock.listen()
    held.append(sock)


def ask(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    status = main(["why", *args, "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("holding", "wanted", "blocked"), [
    ([], "0.0.0.0", False),  # free
    ([("127.0.0.1", None)], "127.0.0.1", True),  # taken: the same address
    ([("127.0.0.1", None)], "127.0.0.2", False),
    ([("0.0.0.0", None)], "127.0.0.1", True),  # wildcard-blocked
    ([("::", False)], "127.0.0.1", True),  # [::] dual-stack blocks IPv4
    ([("::", True)], "127.0.0.1", False),  # v6only leaves IPv4 free
    ([("::1", None)], "::1", True),
])
def test_why_agrees_with_bind(capsys: pytest.CaptureFixture[str], held: list[socket.socket],
                              holding: list[tuple[str, bool | None]], wanted: str, blocked: bool) -> None:
    port = free_port()
    for address, v6only in holding:
        listen(held, address, port, v6only=v6only)
    status, answer = ask(capsys, str(port), "--address", wanted)
    assert kernel_allows(wanted, port) is not blocked  # the case is what it says it is
    assert answer["would_bind"] is not blocked and status == (1 if blocked else 0)
    blockers = answer["blockers"]
    assert isinstance(blockers, list)
    if blocked:
        assert answer["bind_error"] == "Address already in use"
        assert [b["port"] for b in blockers] == [port] and blockers[0]["processes"][0]["pid"] > 0
        assert "cannot be bound now" in str(answer["explanation"])
    else:
        assert blockers == [] and answer["bind_error"] is None


def test_the_paragraph_names_the_holder(capsys: pytest.CaptureFixture[str], held: list[socket.socket]) -> None:
    port = free_port()
    listen(held, "127.0.0.1", port)
    assert main(["why", str(port)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"listens on 127.0.0.1:{port} since " in out
    assert "the new socket would take every address, this one included" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["why"], ["why", "0"], ["why", "80", "--address", "not-an-ip"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
    assert "not an IP address" in capsys.readouterr().err
