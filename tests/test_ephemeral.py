"""Clients' ephemeral UDP sockets: told apart by the namespace's port range, hidden by default.

The live tests run in a network namespace of their own (`unshare --net --mount`), where the
test sets ip_local_port_range and ip_local_reserved_ports, starts a DNS server on 127.0.0.1:53
that holds its answers, and points the resolver at it (resolv.conf and nsswitch.conf bind-
mounted in the private mount namespace). A real `getent hosts` and a client that sends from an
unbound socket wait for their answers while `portwatch list` and the daemon look.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portwatch.ephemeral import EphemeralPorts, parse
from tests.conftest import PROGRAMS, DaemonProcess, Holder, run_cli, wait_exited

FIRST, LAST, RESERVED = 40000, 40999, 40500


def test_parse_the_two_sysctls() -> None:
    ports = parse("32768\t60999\n", "8080,40000-40010\n")
    assert ports == EphemeralPorts(32768, 60999, ((8080, 8080), (40000, 40010)))
    assert 32768 in ports and 60999 in ports and 40011 in ports
    assert 32767 not in ports and 61000 not in ports and 40005 not in ports
    assert str(ports) == "32768-60999 except 8080,40000-40010"
    assert parse("1024 65535", "\n").reserved == ()
    with pytest.raises(ValueError):
        parse("garbage", "")


@dataclass
class Space:
    """A network + mount namespace held by a sleeping process, entered with nsenter."""

    pid: int
    workdir: Path

    @property
    def enter(self) -> list[str]:
        return ["nsenter", f"--target={self.pid}", "--net", "--mount"]

    def sh(self, script: str) -> None:
        subprocess.run([*self.enter, "sh", "-ec", script], check=True, timeout=30)

    def listing(self, *args: str) -> tuple[dict[int, dict[str, Any]], str]:
        done = run_cli("list", "--udp", "--json", *args, prefix=self.enter)
        assert done.returncode == 0, done.stderr
        return {entry["port"]: entry for entry in json.loads(done.stdout)}, done.stderr


@pytest.fixture
def space(tmp_path: Path) -> Iterator[Space]:
    holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{holder.pid}/ns/net").readlink() == Path("/proc/self/ns/net").readlink():
            assert time.monotonic() < deadline, "unshare did not enter a new network namespace"
            time.sleep(0.01)
        s = Space(holder.pid, tmp_path)
        (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
        (tmp_path / "nsswitch.conf").write_text("hosts: dns\n")
        s.sh(f"""ip link set lo up
echo '{FIRST} {LAST}' > /proc/sys/net/ipv4/ip_local_port_range
echo '{RESERVED}' > /proc/sys/net/ipv4/ip_local_reserved_ports
mount --bind {tmp_path}/resolv.conf /etc/resolv.conf
mount --bind {tmp_path}/nsswitch.conf /etc/nsswitch.conf""")
        yield s
    finally:
        holder.kill()
        holder.wait()


@dataclass
class Resolver:
    """The DNS server holding its answers, and the clients waiting for them."""

    stub: subprocess.Popen[str]
    release: Path
    clients: list[subprocess.Popen[str]]

    def query(self) -> dict[str, Any]:
        assert self.stub.stdout is not None
        return dict(json.loads(self.stub.stdout.readline()))


@pytest.fixture
def resolver(space: Space) -> Iterator[Resolver]:
    release = space.workdir / "release"
    stub = subprocess.Popen([*space.enter, sys.executable, str(PROGRAMS / "dns_stub.py"), str(release)],
                            stdout=subprocess.PIPE, text=True)
    assert stub.stdout is not None and stub.stdout.readline() == "ready\n"
    found = Resolver(stub, release, [])
    try:
        yield found
    finally:
        release.touch()
        for client in found.clients:
            client.communicate(timeout=30)
        stub.kill()
        stub.communicate()


# A client that sends from a socket it never bound nor connected: the kernel picks its port.
UNCONNECTED = """
import socket, struct, sys
query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\\x0apw-unbound\\x04test\\x00\\x00\\x01\\x00\\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(query, ("127.0.0.1", 53))
s.settimeout(60)
print(len(s.recv(512)), flush=True)
"""


@pytest.mark.root
def test_resolver_queries_are_hidden_and_servers_are_not(
    space: Space, resolver: Resolver, holders: Callable[..., Holder], tmp_path: Path,
) -> None:
    def server(port: int) -> Holder:
        return holders([{"proto": "udp", "family": 4, "address": "127.0.0.1", "port": port}], prefix=space.enter)

    on_purpose, reserved, above = server(40123), server(RESERVED), server(LAST + 500)
    getent = subprocess.Popen([*space.enter, "getent", "hosts", "pw-ephemeral.test"],
                              stdout=subprocess.PIPE, text=True)
    resolver.clients.append(getent)
    glibc = resolver.query()
    unbound = subprocess.Popen([*space.enter, sys.executable, "-c", UNCONNECTED], stdout=subprocess.PIPE, text=True)
    resolver.clients.append(unbound)
    while (asked := resolver.query())["name"] != "pw-unbound.test":
        pass  # getent's other queries (AAAA)
    assert FIRST <= glibc["port"] <= LAST and FIRST <= asked["port"] <= LAST

    shown, note = space.listing()
    everything, _ = space.listing("--all")
    # The unbound client's socket is unconnected: listed, ephemeral, hidden unless asked for.
    assert asked["port"] not in shown and everything[asked["port"]]["ephemeral"] is True
    assert "ephemeral UDP client socket" in note and "--all" in note
    # glibc connects its query socket, which is then no listener at all; if it did not, it is hidden too.
    assert glibc["port"] not in shown
    if glibc["port"] in everything:
        assert everything[glibc["port"]]["ephemeral"] is True
    # A server bound inside the range on purpose looks the same, and is hidden too ...
    assert everything[on_purpose.port]["ephemeral"] is True and on_purpose.port not in shown
    # ... but not where ip_local_reserved_ports keeps the port from clients, nor outside the range.
    for kept in (reserved, above):
        assert shown[kept.port]["ephemeral"] is False
    # A port a reserved rule names is never hidden.
    config = tmp_path / "pw.yaml"
    config.write_text(f"reserved:\n  - name: mine\n    proto: udp\n    ports: [{on_purpose.port}]\n")
    named, _ = space.listing("--config", str(config))
    assert named[on_purpose.port]["ephemeral"] is True and asked["port"] not in named
    # Where the config cannot be read, which ports it reserves is unknown: nothing is hidden.
    config.write_text("reserved: [\n")
    unknown, said = space.listing("--config", str(config))
    assert set(unknown) == set(everything) and "no ephemeral UDP socket hidden" in said
    assert f"{config}:" in said  # the config's own problem, with its file and line
    # The DNS server itself (port 53) is a server.
    assert shown[53]["ephemeral"] is False

    resolver.release.touch()
    assert getent.communicate(timeout=60)[0].split() == ["192.0.2.7", "pw-ephemeral.test"]
    assert unbound.communicate(timeout=60)[0].strip().isdigit()


@pytest.mark.root
@pytest.mark.parametrize("setting", ["hide", "show"])
def test_the_daemon_says_nothing_of_client_sockets_unless_told(
    space: Space, resolver: Resolver, holders: Callable[..., Holder], daemons: Callable[..., DaemonProcess],
    tmp_path: Path, setting: str,
) -> None:
    named = 40321
    config = tmp_path / "pw.yaml"
    config.write_text(f"interval: 0.2\nudp_ephemeral: {setting}\nprotocols: [udp]\n"
                      f"reserved:\n  - name: mine\n    proto: udp\n    ports: [{named}]\n"
                      "    allow:\n      - user: root\n")
    d = daemons(config, prefix=space.enter)
    d.started()
    client = subprocess.Popen([*space.enter, sys.executable, "-c", UNCONNECTED], stdout=subprocess.PIPE, text=True)
    resolver.clients.append(client)
    port = resolver.query()["port"]
    guarded = holders([{"proto": "udp", "family": 4, "address": "127.0.0.1", "port": named}], prefix=space.enter)
    d.wait_event("listener_opened", port=named)
    marker = holders([{"proto": "udp", "family": 4, "address": "127.0.0.1", "port": LAST + 7}], prefix=space.enter)
    d.wait_event("listener_opened", port=marker.port)  # the daemon has looked since the client sent
    opened = [e for e in d.events if e["event"] == "listener_opened" and e["port"] == port]
    if setting == "hide":
        assert opened == []
    else:
        (event,) = opened
        assert event["ephemeral"] is True and event["pid"] == client.pid  # nsenter execs it: one pid
    # A port a rule names is never hidden, inside the range or not.
    (event,) = [e for e in d.events if e["event"] == "listener_opened" and e["port"] == named]
    assert event["rule"] == "mine" and event.get("ephemeral") is True
    resolver.release.touch()
    client.communicate(timeout=60)
    assert wait_exited(client.pid)
    marker.stop()
    d.wait_event("listener_closed", port=marker.port)
    closing = [e for e in d.events if e["event"] == "listener_closed" and e["port"] == port]
    assert (closing == []) == (setting == "hide")
    guarded.stop()
