"""Socket-activated ports under a real systemd 252: attributed to their .socket units, allowed by them.

In the sandbox (tests/systemd_sandbox.py) with the system bus started: Debian's own
ssh.socket (Accept=no, moved to a loopback test port by a drop-in), a pair of our own
with Accept=no (a server that takes its socket from LISTEN_FDS) and one with Accept=yes.
The views run as root (systemd's private socket); the daemon is the hardened shipped
unit, a system user without root, which asks over the system bus.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROGRAMS, Holder, free_ports, start_holder
from tests.systemd_sandbox import Sandbox

pytestmark = [pytest.mark.systemd, pytest.mark.root]

UNIT = "portwatch.service"
NOBODY = 65534
SSHD = "/usr/sbin/sshd"

UNITS = {
    "demo.socket": "[Socket]\nListenStream=127.0.0.1:{demo}\n",
    "demo.service": "[Service]\nExecStart=/usr/bin/python3 {programs}/activated_server.py demo\n",
    "greet.socket": "[Socket]\nListenStream=127.0.0.1:{greet}\nAccept=yes\n",
    "greet@.service": (
        "[Service]\nExecStart=/usr/bin/python3 {programs}/activated_server.py greet accepted\n"
        "StandardInput=socket\n"
    ),
    # Debian's ssh.socket listens on 22: moved to a loopback test port.
    "ssh.socket.d/test.conf": "[Socket]\nListenStream=\nListenStream=127.0.0.1:{ssh}\n",
    f"{UNIT}.d/test.conf": (
        "[Service]\nExecStart=\nExecStart={venv}/bin/portwatch run --config {config}\nRestartSec=200ms\n"
    ),
}

CONFIG = """\
interval: 0.3
protocols: [tcp]
reserved:
  - name: demo
    ports: [{demo}]
    allow:
      - unit: demo.service
  - name: greet
    ports: [{greet}]
    allow:
      - unit: greet.socket
  - name: ssh             # as in etc/portwatch.yaml
    ports: [{ssh}]
    allow:
      - comm: sshd
      - unit: ssh.service
"""


@dataclass
class Scene:
    sandbox: Sandbox
    ports: dict[str, int]

    def portwatch(self, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return self.sandbox.run(*prefix, f"{self.sandbox.venv}/bin/portwatch", *args, check=False)

    def who(self, name: str) -> dict[str, Any]:
        done = self.portwatch("who", str(self.ports[name]), "--json")
        assert done.returncode == 0, done.stderr
        assert not done.stderr, done.stderr + self.sandbox.run("journalctl", "--no-pager", "-n", "60", "-o", "short-monotonic").stdout
        (listener,) = json.loads(done.stdout)
        return dict(listener)

    def invocation(self) -> str:
        return self.sandbox.show(UNIT, "InvocationID")["InvocationID"]

    def events(self, invocation: str, *matches: str) -> list[dict[str, Any]]:
        return self.sandbox.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}", *matches)

    def wait_event(self, invocation: str, *matches: str) -> dict[str, Any]:
        found = self.sandbox.wait_journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}", *matches)
        assert found, f"no {' '.join(matches)} from {UNIT}"
        return found[-1]

    def scanned(self, invocation: str, marker: Callable[[], Holder]) -> None:
        """Wait until the daemon has scanned after now: a listener opened now is in its journal."""
        holder = marker()
        try:
            self.wait_event(invocation, "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={holder.port}")
        finally:
            holder.stop()


def hello(port: int) -> str:
    """Connect as a client does and read the first line the server sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn, conn.makefile("r") as lines:
        return lines.readline().strip()


def holders_of(listener: dict[str, Any]) -> list[tuple[int, str | None]]:
    return [(p["pid"], p["unit"]) for p in listener["processes"]]


@pytest.fixture(scope="module")
def scene(systemd_sandbox: Sandbox) -> Iterator[Scene]:
    sandbox = systemd_sandbox
    if not Path(SSHD).exists():
        pytest.fail(f"{SSHD} is missing: .ci/run installs openssh-server (never started on the host)")
    programs = sandbox.workdir / "programs"
    programs.mkdir(exist_ok=True)
    for name in ("activated_server.py", "listener.py"):
        shutil.copy2(PROGRAMS / name, programs)
        (programs / name).chmod(0o644)  # read by systemd's services and by nobody
    demo, greet, ssh = free_ports(3)
    ports = {"demo": demo, "greet": greet, "ssh": ssh}
    config = sandbox.workdir / "socket-units.yaml"
    config.write_text(CONFIG.format(**ports))
    config.chmod(0o644)
    sandbox.install_portwatch(UNIT)
    for name, text in UNITS.items():
        path = sandbox.path(f"/run/systemd/system/{name}")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text.format(programs=programs, venv=sandbox.venv, config=config, **ports))
    sandbox.daemon_reload()
    sandbox.systemctl("start", "dbus.socket", "dbus.service", "demo.socket", "greet.socket", "ssh.socket")
    yield Scene(sandbox, ports)
    sandbox.systemctl("stop", UNIT, "ssh.socket", "ssh.service", "demo.socket", "demo.service",
                      "greet.socket", check=False)


@pytest.fixture
def marker() -> Iterator[Callable[[], Holder]]:
    started: list[Holder] = []

    def start() -> Holder:
        started.append(start_holder([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": 0}]))
        return started[-1]

    yield start
    for holder in started:
        holder.stop()


def test_accept_no_port_belongs_to_its_socket_unit_before_and_after_the_first_connection(
    scene: Scene,
) -> None:
    before = scene.who("demo")
    assert (before["socket_unit"], before["service_unit"]) == ("demo.socket", "demo.service")
    assert holders_of(before) == [(1, "init.scope")]
    name, pid = hello(scene.ports["demo"]).split()
    assert name == "demo"
    after = scene.who("demo")
    assert (after["socket_unit"], after["service_unit"]) == ("demo.socket", "demo.service")
    assert holders_of(after) == [(1, "init.scope"), (int(pid), "demo.service")]
    shown = scene.portwatch("who", str(scene.ports["demo"]))
    assert "demo.socket → demo.service" in shown.stdout, shown.stderr
    assert "init.scope" not in shown.stdout


def test_accept_yes_port_stays_the_socket_units(scene: Scene) -> None:
    """Per-connection instances hold only their connection: the listener stays systemd's."""
    for _ in range(2):
        assert hello(scene.ports["greet"]).startswith("greet ")
        listener = scene.who("greet")
        assert (listener["socket_unit"], listener["service_unit"]) == ("greet.socket", "greet@.service")
        assert holders_of(listener) == [(1, "init.scope")]


def test_debians_ssh_socket(scene: Scene) -> None:
    before = scene.who("ssh")
    assert (before["socket_unit"], before["service_unit"]) == ("ssh.socket", "ssh.service")
    assert holders_of(before) == [(1, "init.scope")]
    assert hello(scene.ports["ssh"]).startswith("SSH-2.0-OpenSSH")
    after = scene.who("ssh")
    assert [unit for _, unit in holders_of(after)] == ["init.scope", "ssh.service"]
    assert after["processes"][1]["comm"] == "sshd"
    assert after["socket_unit"] == "ssh.socket"


def test_ps_names_the_socket_units_of_systemds_sockets(scene: Scene) -> None:
    done = scene.portwatch("ps", "--json")
    (manager,) = [p for p in json.loads(done.stdout) if p["pid"] == 1]
    units = {p["port"]: (p["socket_unit"], p["service_unit"]) for p in manager["ports"]}
    assert units[scene.ports["demo"]] == ("demo.socket", "demo.service")
    assert units[scene.ports["greet"]] == ("greet.socket", "greet@.service")


def test_daemon_allows_socket_units_through_restarts_and_reports_a_squatter(
    scene: Scene, marker: Callable[[], Holder],
) -> None:
    sandbox = scene.sandbox
    sandbox.systemctl("restart", UNIT)
    invocation = scene.invocation()
    scene.wait_event(invocation, "PORTWATCH_EVENT=portwatch_started")
    # A first connection, a restart of the service, a restart of the socket unit.
    for port in ("demo", "greet", "ssh"):
        hello(scene.ports[port])
    sandbox.systemctl("restart", "demo.service")
    hello(scene.ports["demo"])
    sandbox.systemctl("stop", "demo.socket", "demo.service")
    closed = scene.wait_event(invocation, "PORTWATCH_EVENT=listener_closed", f"PORTWATCH_PORT={scene.ports['demo']}")
    sandbox.systemctl("start", "demo.socket")
    hello(scene.ports["demo"])
    scene.scanned(invocation, marker)
    # Not the listener that was there when the daemon started (the inventory, or a change while it was down).
    (opened,) = [e for e in scene.events(invocation, "PORTWATCH_EVENT=listener_opened",
                                         f"PORTWATCH_PORT={scene.ports['demo']}")
                 if "PORTWATCH_AT_STARTUP" not in e and "PORTWATCH_WHILE_DOWN" not in e]
    for event in (closed, opened):
        assert event.get("PORTWATCH_SOCKET_UNIT") == "demo.socket", [e["MESSAGE"] for e in scene.events(invocation)]
        assert event["PORTWATCH_SERVICE_UNIT"] == "demo.service"
        assert f"127.0.0.1:{scene.ports['demo']} (demo.socket → demo.service)" in event["MESSAGE"]
    assert scene.events(invocation, "PORTWATCH_EVENT=reserved_port_taken") == []
    assert scene.events(invocation, "PORTWATCH_EVENT=owner_changed", f"PORTWATCH_PORT={scene.ports['demo']}") == []
    assert scene.events(invocation, "PORTWATCH_EVENT=degraded") == []

    # While demo.socket is stopped, a squatter on its port is reported.
    sandbox.systemctl("stop", "demo.socket", "demo.service")
    squatter = start_holder(
        [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": scene.ports["demo"]}],
        prefix=[*sandbox.prefix, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
        python="/usr/bin/python3", program=sandbox.workdir / "programs" / "listener.py",
    )
    try:
        taken = scene.wait_event(invocation, "PORTWATCH_EVENT=reserved_port_taken",
                                 f"PORTWATCH_PORT={scene.ports['demo']}")
        assert taken["PORTWATCH_OFFENDER_PIDS"] == f"[{squatter.pid}]"
        assert "PORTWATCH_SOCKET_UNIT" not in taken or taken["PORTWATCH_SOCKET_UNIT"] in ("", "null")
    finally:
        sandbox.run("kill", "-TERM", str(squatter.pid), check=False)
        squatter.proc.wait(10)
        if squatter.proc.stdout is not None:
            squatter.proc.stdout.close()
    sandbox.systemctl("start", "demo.socket")


def test_without_the_system_bus_one_degraded_event_and_systemd_stays_the_owner(
    scene: Scene, marker: Callable[[], Holder],
) -> None:
    sandbox = scene.sandbox
    sandbox.systemctl("stop", "dbus.socket", "dbus.service")
    try:
        sandbox.systemctl("restart", UNIT)
        invocation = scene.invocation()
        degraded = scene.wait_event(invocation, "PORTWATCH_EVENT=degraded")
        assert "socket units could not be resolved" in degraded["PORTWATCH_REASON"]
        assert "system_bus_socket" in degraded["PORTWATCH_REASON"]
        taken = scene.wait_event(invocation, "PORTWATCH_EVENT=reserved_port_taken",
                                 f"PORTWATCH_PORT={scene.ports['demo']}")
        assert taken["PORTWATCH_PID"] == "1"
        # A new socket of systemd's: asked again, still unreachable, said only once.
        sandbox.systemctl("restart", "greet.socket")
        scene.scanned(invocation, marker)
        assert len(scene.events(invocation, "PORTWATCH_EVENT=degraded")) == 1
        # Root's views need no bus: systemd's private socket.
        assert scene.who("demo")["socket_unit"] == "demo.socket"
    finally:
        sandbox.systemctl("start", "dbus.socket", "dbus.service")
        sandbox.systemctl("restart", UNIT)


def test_views_where_the_manager_is_not_systemd(scene: Scene) -> None:
    """Where systemd is not the manager (no /run/systemd/system), the owner stays PID 1, said once."""
    hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs /run/systemd && exec "$@"', "sh")
    done = scene.portwatch("who", str(scene.ports["demo"]), "--json", prefix=hide)
    assert done.returncode == 0, done.stderr
    (listener,) = json.loads(done.stdout)
    assert holders_of(listener)[0] == (1, "init.scope")
    assert listener["socket_unit"] is None
    assert done.stderr.count("\n") == 1
    assert "socket units could not be resolved (the service manager is not systemd" in done.stderr
