"""Port conflicts under a real systemd 252: the service that could not bind, and the holder.

In the sandbox (tests/systemd_sandbox.py), with the hardened shipped unit running the daemon
(a system user in group systemd-journal): Debian's real nginx.service pointed at a config for a
loopback port a squatter holds, a .socket unit on a taken port, a Python server unit that dies
with `OSError: [Errno 98]` naming no address, a forged journal entry, a restart of portwatch while
a unit fails, and a journal the daemon may not read.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROGRAMS, Holder, free_ports, start_holder
from tests.systemd_sandbox import Sandbox, field_bytes

pytestmark = [pytest.mark.systemd, pytest.mark.root]

UNIT = "portwatch.service"
NOBODY = 65534
NGINX = "/usr/sbin/nginx"

NGINX_CONF = """\
pid /run/nginx.pid;
error_log stderr;
events {{}}
http {{ access_log off; server {{ listen 127.0.0.1:{web}; }} }}
"""
# The Python server dies as Python does: the traceback's last line names no address.
PYFAIL = "import socket; socket.socket().bind(('127.0.0.1', {py}))"
# A forged entry: a newline, an escape and journal-field lookalikes inside one MESSAGE.
FORGE = r"""
import socket
def field(name, value):
    return name + b"\n" + len(value).to_bytes(8, "little") + value + b"\n"
msg = b"bind() to 127.0.0.1:{forge} failed (98: Address already in use)\nPORTWATCH_PORT=1\nPORTWATCH_BLOCKED_UNIT=ssh.service\x1b[2J"
entry = field(b"MESSAGE", msg) + b"UNIT=ssh.service\nPRIORITY=3\n"
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(entry, "/run/systemd/journal/socket")
"""

# A unit that writes "Address already in use" ten thousand times, as fast as it can.
FLOOD = (
    "import sys\n"
    "line = 'bind() to 127.0.0.1:{flood} failed (98: Address already in use)\\n'\n"
    "for _ in range(10000):\n"
    "    sys.stdout.write(line)\n"
)

UNITS = {
    "nginx.service.d/test.conf": (
        "[Service]\nExecStartPre=\nExecStart=\n"
        "ExecStart=/usr/sbin/nginx -c {work}/nginx.conf -g 'daemon on; master_process on;'\nExecReload=\n"
    ),
    "bad.socket": "[Socket]\nListenStream=127.0.0.1:{sock}\n",
    "bad.service": "[Service]\nExecStart=/bin/true\n",
    "pyfail.service": "[Service]\nExecStart=/usr/bin/python3 {work}/pyfail.py\n",
    "forge.service": "[Service]\nType=oneshot\nExecStart=/usr/bin/python3 {work}/forge.py\n",
    "flood.service": "[Service]\nType=oneshot\nExecStart=/usr/bin/python3 {work}/flood.py\n",
    f"{UNIT}.d/test.conf": (
        "[Service]\nExecStart=\nExecStart={venv}/bin/portwatch run --config {config}\nRestartSec=200ms\n"
    ),
}

CONFIG = """\
interval: 0.3
protocols: [tcp]
log_listeners: true
reserved:
  - name: pyapp
    ports: [{py}]
    allow:
      - unit: pyfail.service
metrics:
  listen: "127.0.0.1:{metrics}"
"""


@dataclass
class Scene:
    sandbox: Sandbox
    ports: dict[str, int]
    squatters: dict[str, Holder] = field(default_factory=dict)

    def invocation(self) -> str:
        return self.sandbox.show(UNIT, "InvocationID")["InvocationID"]

    def events(self, invocation: str, *matches: str) -> list[dict[str, Any]]:
        return self.sandbox.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}", *matches)

    def wait_event(self, invocation: str, *matches: str, timeout: float = 10.0) -> dict[str, Any]:
        found = self.sandbox.wait_journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}", *matches,
                                          timeout=timeout)
        assert found, f"no {' '.join(matches)}; saw {[e['MESSAGE'] for e in self.events(invocation)]}"
        return found[-1]

    def squat(self, name: str) -> Holder:
        """A process of nobody's holding the port first, inside the sandbox's pid namespace."""
        holder = start_holder(
            [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": self.ports[name]}],
            name=b"squatter",
            prefix=[*self.sandbox.prefix, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
            python="/usr/bin/python3", program=self.sandbox.workdir / "listener.py",
        )
        self.squatters[name] = holder
        return holder

    def scanned(self, invocation: str) -> None:
        """Wait until the daemon has scanned after now: a listener opened now is in its journal."""
        marker = start_holder([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": 0}],
                              prefix=self.sandbox.prefix, python="/usr/bin/python3",
                              program=self.sandbox.workdir / "listener.py")
        try:
            self.wait_event(invocation, "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={marker.port}")
        finally:
            self.sandbox.run("kill", "-TERM", str(marker.pid), check=False)
            marker.proc.wait(10)
            if marker.proc.stdout is not None:
                marker.proc.stdout.close()

    def restart_portwatch(self) -> str:
        self.sandbox.systemctl("restart", UNIT)
        invocation = self.invocation()
        self.wait_event(invocation, "PORTWATCH_EVENT=portwatch_started")
        return invocation


@pytest.fixture(scope="module")
def scene(systemd_sandbox: Sandbox) -> Iterator[Scene]:
    sandbox = systemd_sandbox
    if not Path(NGINX).exists():
        pytest.fail(f"{NGINX} is missing: .ci/run installs nginx-light (never started on the host)")
    work = sandbox.workdir
    web, sock, py, forge, flood, metrics = free_ports(6)
    ports = {"web": web, "sock": sock, "py": py, "forge": forge, "flood": flood, "metrics": metrics}
    shutil.copy2(PROGRAMS / "listener.py", work)
    files = {"nginx.conf": NGINX_CONF, "pyfail.py": PYFAIL, "forge.py": FORGE, "flood.py": FLOOD,
             "conflicts.yaml": CONFIG}
    for name, text in files.items():
        (work / name).write_text(text.format(**ports))
    for path in work.iterdir():
        if path.is_file():
            path.chmod(0o644)
    for directory in ("/var/log/nginx", "/var/lib/nginx"):
        sandbox.path(directory).mkdir(exist_ok=True)
    sandbox.install_portwatch(UNIT)
    for name, text in UNITS.items():
        path = sandbox.path(f"/run/systemd/system/{name}")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text.format(work=work, venv=sandbox.venv, config=work / "conflicts.yaml", **ports))
    sandbox.daemon_reload()
    sandbox.systemctl("start", "dbus.socket", "dbus.service", UNIT)
    scene = Scene(sandbox, ports)
    yield scene
    sandbox.systemctl("stop", UNIT, "nginx.service", "bad.socket", check=False)
    for holder in scene.squatters.values():
        sandbox.run("kill", "-TERM", str(holder.pid), check=False)
        holder.proc.wait(10)
        if holder.proc.stdout is not None:
            holder.proc.stdout.close()


def _usec(entry: dict[str, Any]) -> int:
    return int(entry["__REALTIME_TIMESTAMP"])


def test_nginx_blocked_by_a_squatter_is_one_conflict_naming_both(scene: Scene) -> None:
    invocation = scene.restart_portwatch()
    squatter = scene.squat("web")
    scene.wait_event(invocation, "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={scene.ports['web']}")
    failed = scene.sandbox.systemctl("start", "nginx.service", check=False)
    assert failed.returncode != 0
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict")
    assert conflict["PORTWATCH_BLOCKED_UNIT"] == "nginx.service"
    assert conflict["PORTWATCH_BLOCKED_COMM"] == "nginx"
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["web"])
    assert conflict["PORTWATCH_PID"] == str(squatter.pid) and conflict["PORTWATCH_COMM"] == "squatter"
    assert conflict["PORTWATCH_USER"] == "nobody"
    assert conflict["PRIORITY"] == "4" and conflict["MESSAGE_ID"] == "da61e53f6cb9401993dc65b774fba725"
    assert "HOLDER_UNRESOLVED" not in json.dumps(conflict) and conflict["PORTWATCH_HOLDER_SINCE"]
    # nginx's own lines: five bind() errors and "still could not bind()", one event for all.
    lines = scene.sandbox.journal("-u", "nginx.service", "--grep", "bind")
    assert int(conflict["PORTWATCH_REPEATS"]) == len(lines) >= 2
    assert "could not bind 127.0.0.1:" in conflict["MESSAGE"] and "squatter[" in conflict["MESSAGE"]
    assert _usec(conflict) - _usec(lines[-1]) <= 2_000_000
    # The unit's own id for the same pid the journal names.
    assert conflict["PORTWATCH_BLOCKED_PID"] == lines[0]["_PID"]
    scene.scanned(invocation)  # a scan later, still just one
    assert len(scene.events(invocation, "PORTWATCH_EVENT=port_conflict")) == 1
    # Counted for Prometheus by the blocked unit (the restart above started the count afresh).
    with urllib.request.urlopen(f"http://127.0.0.1:{scene.ports['metrics']}/metrics", timeout=10) as response:
        counted = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(response.read().decode()) for s in family.samples}
    assert counted["portwatch_port_conflicts_total", (("blocked_unit", "nginx.service"), ("rule", ""))] == 1


def test_a_socket_unit_on_a_taken_port(scene: Scene) -> None:
    invocation = scene.invocation()
    squatter = scene.squat("sock")
    scene.wait_event(invocation, "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={scene.ports['sock']}")
    assert scene.sandbox.systemctl("start", "bad.socket", check=False).returncode != 0
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=bad.socket")
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["sock"])
    assert conflict["PORTWATCH_PID"] == str(squatter.pid)


def test_a_python_server_naming_no_address_gets_its_port_from_the_rule(scene: Scene) -> None:
    invocation = scene.invocation()
    squatter = scene.squat("py")
    taken = scene.wait_event(invocation, "PORTWATCH_EVENT=reserved_port_taken", f"PORTWATCH_PORT={scene.ports['py']}")
    assert taken["PORTWATCH_PID"] == str(squatter.pid)
    scene.sandbox.systemctl("start", "pyfail.service", check=False)
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict",
                                "PORTWATCH_BLOCKED_UNIT=pyfail.service")
    assert conflict["PORTWATCH_BLOCKED_MESSAGE"] == "OSError: [Errno 98] Address already in use"
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["py"]) and conflict["PORTWATCH_RULE"] == "pyapp"
    assert conflict["PORTWATCH_PID"] == str(squatter.pid)


def test_a_forged_message_cannot_forge_fields(scene: Scene) -> None:
    invocation = scene.invocation()
    scene.sandbox.systemctl("start", "forge.service", check=False)
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=forge.service")
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["forge"])  # one value: not a list of two
    assert conflict["PORTWATCH_HOLDER_UNRESOLVED"].startswith("no listener on that port")
    message = field_bytes(conflict, "PORTWATCH_BLOCKED_MESSAGE")
    assert message is not None and b"\nPORTWATCH_PORT=1\n" in message  # the program's words, one field
    assert "\n" not in conflict["MESSAGE"] and "\x1b" not in conflict["MESSAGE"]
    assert not scene.events(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=ssh.service")


def test_a_flood_of_failures_is_one_conflict_and_scans_go_on(scene: Scene) -> None:
    invocation = scene.invocation()
    scene.sandbox.systemctl("start", "flood.service")
    scene.scanned(invocation)  # a listener opened after the flood is still reported
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=flood.service")
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["flood"]) and int(conflict["PORTWATCH_REPEATS"]) > 1
    scene.scanned(invocation)
    assert len(scene.events(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=flood.service")) == 1
    assert scene.invocation() == invocation  # never killed by the watchdog meanwhile


def test_a_restart_repeats_nothing_and_misses_nothing(scene: Scene) -> None:
    sandbox = scene.sandbox
    before = scene.invocation()
    reported = len(scene.events(before, "PORTWATCH_EVENT=port_conflict"))
    assert reported >= 3
    sandbox.systemctl("stop", UNIT)
    assert sandbox.systemctl("start", "nginx.service", check=False).returncode != 0
    after = scene.restart_portwatch()
    missed = scene.wait_event(after, "PORTWATCH_EVENT=port_conflict")
    assert missed["PORTWATCH_BLOCKED_UNIT"] == "nginx.service" and missed["PORTWATCH_WHILE_DOWN"] == "true"
    assert missed["PORTWATCH_PID"] == str(scene.squatters["web"].pid)
    scene.scanned(after)  # nothing else follows it
    assert len(scene.events(after, "PORTWATCH_EVENT=port_conflict")) == 1
    assert scene.events(after, "PORTWATCH_EVENT=degraded") == []


def test_a_restart_in_the_middle_of_a_failure_reports_it_once(scene: Scene) -> None:
    """portwatch restarted while nginx is still retrying: the failure is reported once, by the
    new run, which reads it again from before its first line."""
    sandbox = scene.sandbox
    before = scene.invocation()
    earlier = sandbox.show("nginx.service", "InvocationID")["InvocationID"]
    sandbox.systemctl("start", "--no-block", "nginx.service")
    nginx = earlier
    while nginx == earlier:  # the job runs at once (no ExecStartPre=); its invocation is new
        nginx = sandbox.show("nginx.service", "InvocationID")["InvocationID"]
    (first, *_) = sandbox.wait_journal(f"_SYSTEMD_INVOCATION_ID={nginx}", "--grep", "bind")
    sandbox.systemctl("restart", UNIT)
    after = scene.invocation()
    conflict = scene.wait_event(after, "PORTWATCH_EVENT=port_conflict", f"PORTWATCH_BLOCKED_PID={first['_PID']}")
    assert conflict["PORTWATCH_PID"] == str(scene.squatters["web"].pid)
    scene.scanned(after)
    said = [e for invocation in (before, after) for e in scene.events(
        invocation, "PORTWATCH_EVENT=port_conflict", f"PORTWATCH_BLOCKED_PID={first['_PID']}")]
    assert len(said) == 1


def test_a_cursor_of_another_journal_is_dropped_and_following_goes_on(scene: Scene) -> None:
    """A state file copied from another host: its cursor means nothing here. Following starts
    from now, silently, and the next failure is reported."""
    sandbox = scene.sandbox
    sandbox.systemctl("stop", UNIT)
    state = sandbox.path("/var/lib/portwatch/state.json")
    data = json.loads(state.read_text())
    data["journal"]["cursor"] = "not-a-cursor"
    state.write_text(json.dumps(data))
    invocation = scene.restart_portwatch()
    scene.scanned(invocation)
    sandbox.systemctl("start", "pyfail.service", check=False)  # Type=simple: it dies after starting
    conflict = scene.wait_event(invocation, "PORTWATCH_EVENT=port_conflict", "PORTWATCH_BLOCKED_UNIT=pyfail.service")
    assert conflict["PORTWATCH_PORT"] == str(scene.ports["py"])
    assert scene.events(invocation, "PORTWATCH_EVENT=degraded") == []


def test_an_unreadable_journal_is_one_degraded_event_and_scans_go_on(scene: Scene) -> None:
    sandbox = scene.sandbox
    dropin = sandbox.path(f"/run/systemd/system/{UNIT}.d/nojournal.conf")
    dropin.write_text("[Service]\nSupplementaryGroups=\n")
    sandbox.daemon_reload()
    try:
        invocation = scene.restart_portwatch()
        degraded = scene.wait_event(invocation, "PORTWATCH_EVENT=degraded")
        assert "cannot follow the journal" in degraded["PORTWATCH_REASON"]
        assert "systemd-journal" in degraded["PORTWATCH_REASON"]
        scene.scanned(invocation)
        assert len(scene.events(invocation, "PORTWATCH_EVENT=degraded")) == 1
    finally:
        dropin.unlink()
        sandbox.daemon_reload()
