"""`portwatch baseline`: from what listens to a config that `check` accepts and the daemon keeps.

The rules are checked pure (built from listeners, parsed back, judged by the policy) and live
in the systemd sandbox: a pre-fork server run as a unit, a socket-activated unit and a
pre-fork server outside any unit; baseline -> check -> the shipped unit runs it with no
violation -> a squatter on one of the ports is reported.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portwatch.baseline import MergeError, build, config_text, merge, scalar
from portwatch.config import load_config, parse_config
from portwatch.model import MANAGER_UNIT, Listener, Process, Proto, Socket, Unresolved
from portwatch.policy import evaluate
from tests.conftest import PROGRAMS, ROOT, Holder, free_ports, start_holder
from tests.systemd_sandbox import Sandbox

UNIT = "portwatch.service"
NOBODY = 65534


def _process(pid: int, comm: str, exe: str | None, unit: str | None = None, user: str | None = "www",
             uid: int | None = 33) -> Process:
    return Process(pid, comm, exe, (comm,), uid, user, unit)


def _listener(port: int, *processes: Process, proto: Proto = Proto.TCP, address: str = "0.0.0.0",
              socket_unit: str | None = None, service_unit: str | None = None, inode: int = 0) -> Listener:
    sock = Socket(proto, 6 if ":" in address else 4, address, port, inode or port * 10 + len(address), 0)
    unresolved = None if processes else Unresolved.PERMISSION_DENIED
    return Listener(sock, processes, unresolved, socket_unit, service_unit)


HOSTILE = "evil\n- name: x\x1b[2J"
LISTENERS = [
    # nginx: one service, two ports, IPv4 and IPv6
    _listener(80, _process(10, "nginx", "/usr/sbin/nginx", "nginx.service"), _process(11, "nginx", "/usr/sbin/nginx", "nginx.service")),
    _listener(80, _process(10, "nginx", "/usr/sbin/nginx", "nginx.service"), address="::"),
    _listener(443, _process(10, "nginx", "/usr/sbin/nginx", "nginx.service")),
    # a socket unit before its service started, and an Accept=yes one
    _listener(22, _process(1, "systemd", "/usr/lib/systemd/systemd", MANAGER_UNIT, "root", 0),
              socket_unit="ssh.socket", service_unit="ssh.service"),
    _listener(7000, _process(1, "systemd", "/usr/lib/systemd/systemd", MANAGER_UNIT, "root", 0),
              socket_unit="greet.socket", service_unit="greet@.service"),
    # a program outside any service, with a path that is a glob and a name that is YAML
    _listener(8080, _process(20, HOSTILE, "/opt/app[1]/bin/*srv (deleted)", "session-4.scope", "dev", 1000)),
    # an executable that could not be read: the comm stands in
    _listener(9000, _process(30, "java", None, None, None, 1001)),
    # systemd's own socket (or one whose socket unit could not be asked for)
    _listener(5355, _process(1, "systemd", "/usr/lib/systemd/systemd", MANAGER_UNIT, "root", 0)),
    # DNS over UDP from a service
    _listener(53, _process(40, "unbound", "/usr/sbin/unbound", "unbound.service"), proto=Proto.UDP),
    # nobody seen holding it
    _listener(2049),
]


def test_rules_allow_exactly_todays_owners() -> None:
    made = build(LISTENERS)
    text = config_text(made, host="web-1", when="2026-12-06 10:00 UTC")
    config = parse_config(text, "baseline.yaml")  # what `check` runs
    by_name = {rule.name: rule for rule in config.reserved}
    assert set(by_name) == {"nginx", "ssh", "greet", "srv-8080", "java-9000", "unbound-udp", "systemd"}
    assert by_name["systemd"].allow[0].unit == "init.scope"
    assert [str(r) for r in by_name["nginx"].ports] == ["80", "443"]
    # A unit with its user: a user's own manager can name a unit anything.
    assert [(a.unit, a.exe, a.user, a.comm) for a in by_name["nginx"].allow] == [("nginx.service", None, "www", None)]
    impostor = _listener(443, _process(60, "nginx", "/usr/sbin/nginx", "nginx.service", "mallory", 1000))
    assert evaluate(by_name["nginx"], impostor) is not None
    assert by_name["ssh"].allow[0].unit == "ssh.service"
    assert by_name["greet"].allow[0].unit == "greet@*.service"
    (app,) = by_name["srv-8080"].allow
    assert (app.exe, app.user, app.unit) == ("/opt/app[[]1]/bin/[*]srv", "dev", None)
    (java,) = by_name["java-9000"].allow
    assert (java.comm, java.user, java.exe) == ("java", "1001", None)
    assert by_name["unbound-udp"].proto is Proto.UDP
    assert "2049" not in json.dumps([str(p) for r in config.reserved for p in r.ports])
    assert "# tcp port 2049: its holder is unknown (permission_denied); not reserved" in text
    assert "# tcp *:80, [::]:80: nginx[10,11] /usr/sbin/nginx user www unit nginx.service\n" in text
    assert "# tcp port 9000: the executable was unreadable, so a comm (the name a process gives itself)" in text
    # Nothing a process calls itself can end a comment and start a key.
    assert "\n- name: x" not in text and "evil\\n- name: x\\x1b[2J" in text
    # The daemon's own judgement: every listener the rules cover is allowed as it is.
    for listener in LISTENERS:
        rule = config.rule_for(listener.socket.proto, listener.socket.port)
        if listener.processes:
            assert rule is not None and evaluate(rule, listener) is None, listener
    # ... and someone else on one of the ports is not.
    squatter = _listener(443, _process(99, "nginx", "/tmp/nginx", None, "www", 33))
    assert evaluate(by_name["nginx"], squatter) is not None
    assert evaluate(by_name["srv-8080"], _listener(8080, _process(98, "x", "/opt/app1/bin/Xsrv", None, "dev", 1000)))


def test_scalars_read_back_exactly() -> None:
    for text in ("nginx.service", "true", "null", "0755", "22", "a: b", "-x", "#x", "\udcff\n'\"", "ü", "x:", "@x",
                 "`x", ":x", "%x", "!x", "&x", "*x", "x #y"):
        config = f"reserved:\n  - name: n\n    ports: [1]\n    allow:\n      - exe: {scalar(text)}\n"
        assert parse_config(config, "t").reserved[0].allow[0].exe == text


EXISTING = (ROOT / "etc" / "portwatch.yaml").read_text()


def test_merge_keeps_every_byte_and_adds_only_new_ports() -> None:
    existing = parse_config(EXISTING, "etc/portwatch.yaml")
    made = build(LISTENERS, taken_names=[r.name for r in existing.reserved],
                 covered=lambda proto, port: existing.rule_for(proto, port) is not None)
    names = [new.rule.name for new in made.rules]
    assert "ssh" not in names and "nginx" in names  # port 22 is reserved already; 53/udp too
    assert all(new.rule.proto is Proto.TCP for new in made.rules)
    merged = merge(EXISTING, made.rules, made.skipped)
    after = parse_config(merged, "merged.yaml")
    assert after.reserved[: len(existing.reserved)] == existing.reserved
    assert after.hooks == existing.hooks and after.conflict_hooks == existing.conflict_hooks
    assert [r.name for r in after.reserved[len(existing.reserved):]] == names
    # Only lines were added: the old file is the new one with some lines taken out.
    old_lines = iter(merged.splitlines())
    assert all(any(line == new for new in old_lines) for line in EXISTING.splitlines())
    # Run again on its own output: nothing new, nothing changed.
    again = parse_config(merged, "merged.yaml")
    more = build(LISTENERS, covered=lambda proto, port: again.rule_for(proto, port) is not None)
    assert more.rules == [] and merge(merged, more.rules, more.skipped) == merged


ALIASED = """\
hooks:
  page: {command: [/bin/true]}
reserved:
  - name: a
    ports: [1]
    allow: &admins
      - user: root
    hooks: [page]
  - name: b
    ports: [2]
    allow: *admins
# hooks for the next key
interval: 2
"""


@pytest.mark.parametrize("existing", [
    "interval: 2\n", "", "# only a comment\n", "reserved: []\nhooks: {}\n", "reserved:\n# none yet\nhooks: {}\n",
    "reserved: ~\n", "reserved: null  # none yet\ninterval: 2\n", "reserved:\n", "---\ninterval: 2",
    "reserved:\n    -   name: a\n        ports: [1]\n    # the end\nhooks: {}\n", ALIASED,
])
def test_merge_into_each_shape_of_reserved(existing: str) -> None:
    made = build(LISTENERS[:3])
    merged = merge(existing, made.rules)
    config, before = parse_config(merged, "merged.yaml"), parse_config(existing, "merged.yaml")
    assert [r.name for r in config.reserved] == [*(r.name for r in before.reserved), "nginx"]
    assert config.reserved[: len(before.reserved)] == before.reserved and config.hooks == before.hooks
    assert config.interval == before.interval


@pytest.mark.parametrize(("existing", "why"), [
    ("reserved: [{name: a, ports: [1]}]\n", "flow list"),
    ("{interval: 2}\n", "not a block mapping"),
    ("~\n", "not a block mapping"),
    ("interval: 2\n...\n", "ends a YAML document"),
    ("reserved: 7\n", "not a list"),
])
def test_merge_refuses_what_it_would_have_to_rewrite(existing: str, why: str) -> None:
    with pytest.raises(MergeError, match=why):
        merge(existing, build(LISTENERS[:1]).rules)


# --- live, in the systemd sandbox -------------------------------------------------------------


@dataclass
class Scene:
    sandbox: Sandbox
    ports: dict[str, int]
    solo: Holder

    def portwatch(self, *args: str) -> Any:
        return self.sandbox.run(f"{self.sandbox.venv}/bin/portwatch", *args, check=False)


UNITS = {
    "bl-web.service": "[Service]\nExecStart=/usr/bin/python3 {programs}/listener.py "
                      "'{{\"sockets\": [{{\"proto\": \"tcp\", \"family\": 4, \"address\": \"127.0.0.1\", "
                      "\"port\": {web}}}], \"fork\": 2}}'\n",
    "bl-act.socket": "[Socket]\nListenStream=127.0.0.1:{act}\n",
    "bl-act.service": "[Service]\nExecStart=/usr/bin/python3 {programs}/activated_server.py act\n",
    f"{UNIT}.d/test.conf": "[Service]\nExecStart=\nExecStart={venv}/bin/portwatch run --config {config}\n",
}


@pytest.fixture
def scene(systemd_sandbox: Sandbox) -> Iterator[Scene]:
    sandbox = systemd_sandbox
    programs = sandbox.workdir / "programs"
    programs.mkdir(exist_ok=True)
    for name in ("activated_server.py", "listener.py"):
        shutil.copy2(PROGRAMS / name, programs)
        (programs / name).chmod(0o644)
    web, act, solo = free_ports(3)
    ports = {"web": web, "act": act, "solo": solo}
    config = sandbox.workdir / "baseline.yaml"
    sandbox.install_portwatch(UNIT)
    written = []
    for name, text in UNITS.items():
        path = sandbox.path(f"/run/systemd/system/{name}")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text.format(programs=programs, venv=sandbox.venv, config=config, **ports))
        written.append(path)
    sandbox.daemon_reload()
    sandbox.systemctl("start", "dbus.socket", "dbus.service", "bl-web.service", "bl-act.socket")
    holder = start_holder([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": solo}], fork=1,
                          prefix=sandbox.prefix, python="/usr/bin/python3", program=programs / "listener.py")
    try:
        yield Scene(sandbox, ports, holder)
    finally:
        holder.stop()
        sandbox.systemctl("stop", UNIT, "bl-web.service", "bl-act.socket", "bl-act.service", check=False)
        for path in written:
            path.unlink()
        sandbox.daemon_reload()


def _rules(config: Path) -> dict[int, dict[str, Any]]:
    loaded = load_config(str(config))
    return {r.ports[0].first: {"name": r.name, "allow": [
        {k: v for k in ("comm", "exe", "user", "unit") if (v := getattr(a, k)) is not None} for a in r.allow]}
        for r in loaded.reserved}


@pytest.mark.systemd
@pytest.mark.root
def test_baseline_check_run_then_a_squatter(scene: Scene) -> None:
    sandbox, ports = scene.sandbox, scene.ports
    # The solo server's unit, as this machine puts the test's processes in one (or none).
    who = json.loads(scene.portwatch("who", str(ports["solo"]), "--json").stdout)
    solo_unit = who[0]["processes"][0]["unit"]

    # By default: the ports of systemd's services (and the system ports), not the solo server's.
    default = scene.portwatch("baseline")
    assert default.returncode in (0, 65), default.stderr
    text = default.stdout
    assert f"ports: [{ports['web']}]" in text and f"ports: [{ports['act']}]" in text
    assert (f"ports: [{ports['solo']}]" in text) == (solo_unit or "").endswith(".service")

    config = sandbox.workdir / "baseline.yaml"
    chosen = ",".join(str(p) for p in ports.values())
    done = scene.portwatch("baseline", "--ports", chosen, "-o", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and config.stat().st_mode & 0o777 == 0o644
    assert f"reserved rule bl-web: tcp {ports['web']}" in done.stderr
    rules = _rules(config)
    assert rules[ports["web"]]["allow"] == [{"unit": "bl-web.service", "user": "root"}]  # parent and workers
    assert rules[ports["act"]]["allow"] == [{"unit": "bl-act.service"}]  # systemd holds it for bl-act.socket
    if (solo_unit or "").endswith(".service"):
        assert rules[ports["solo"]]["allow"] == [{"unit": solo_unit, "user": "root"}]
    else:
        assert rules[ports["solo"]]["allow"] == [{"exe": who[0]["processes"][0]["exe"], "user": "root"}]
    assert scene.portwatch("check", "--config", str(config)).stdout == "ok\n"
    explained = scene.portwatch("explain", "--config", str(config), "--json")
    assert explained.returncode == 0, explained.stdout + explained.stderr
    verdicts = {e["port"]: e["verdict"] for e in json.loads(explained.stdout) if e["port"] in ports.values()}
    assert verdicts == dict.fromkeys(ports.values(), "allowed")

    # The shipped unit with that config, on the unchanged host: no violation.
    config.chmod(0o644)
    sandbox.systemctl("restart", UNIT)
    invocation = sandbox.show(UNIT, "InvocationID")["InvocationID"]
    seen = sandbox.wait_journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}",
                                "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={ports['solo']}")
    assert seen and seen[0]["PORTWATCH_AT_STARTUP"] == "true"
    # A listener opened after the start is reported after whatever the first scan found.
    (later,) = free_ports(1)
    marker = start_holder([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": later}],
                          prefix=sandbox.prefix, python="/usr/bin/python3",
                          program=sandbox.workdir / "programs" / "listener.py")
    try:
        assert sandbox.wait_journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}",
                                    "PORTWATCH_EVENT=listener_opened", f"PORTWATCH_PORT={later}")
    finally:
        marker.stop()
    first = sandbox.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}", "PORTWATCH_EVENT=reserved_port_taken")
    assert first == []

    # bl-web stops and a squatter takes its port.
    sandbox.systemctl("stop", "bl-web.service")
    _squatter_is_reported(sandbox, invocation, ports["web"], "bl-web")

    # Merging into the file it made: nothing new, and the file is left as it was.
    before = config.read_text()
    again = scene.portwatch("baseline", "--ports", chosen, "--config", str(config), "-o", str(config))
    assert again.returncode == 0 and "nothing to add" in again.stderr and config.read_text() == before


def _squatter_is_reported(sandbox: Sandbox, invocation: str, port: int, rule: str) -> None:
    """A process of user nobody listens on `port`: that, and nothing else, is reserved_port_taken."""
    squatter = start_holder(
        [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
        prefix=[*sandbox.prefix, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
        python="/usr/bin/python3", program=sandbox.workdir / "programs" / "listener.py",
    )
    try:
        taken = sandbox.wait_journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}",
                                     "PORTWATCH_EVENT=reserved_port_taken", f"PORTWATCH_PORT={port}")
        assert taken and taken[-1]["PORTWATCH_RULE"] == rule
        assert taken[-1]["PORTWATCH_OFFENDER_PIDS"] == f"[{squatter.pid}]"
        every = sandbox.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}",
                                "PORTWATCH_EVENT=reserved_port_taken")
        assert {e["PORTWATCH_PORT"] for e in every} == {str(port)}
    finally:
        sandbox.run("kill", "-TERM", str(squatter.pid), check=False)
        squatter.proc.wait(10)
        if squatter.proc.stdout is not None:
            squatter.proc.stdout.close()
