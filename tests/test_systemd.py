"""The shipped unit under a real systemd 252 (PID 1 of a private pid + mount namespace).

The unit file is installed as shipped; a drop-in only points ExecStart= at a
venv built from /usr/bin/python3 and at a test config, and shortens
WatchdogSec= and RestartSec=. Everything the daemon does here runs under the
unit's hardening: a system user of its own, two capabilities, the syscall filter,
MemoryDenyWriteExecute, ProtectProc=ptraceable, SupplementaryGroups=systemd-journal...
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PROGRAMS, ROOT, Holder, free_port, start_holder
from tests.systemd_sandbox import Sandbox, field_bytes

UNIT = "portwatch.service"
SHIPPED = ROOT / "systemd" / UNIT
MAX_EXPOSURE = 2.0
WATCHDOG_SEC = 2
NOBODY = 65534
# A process name no rule allows, with an escape sequence in it: it must reach
# the journal as its exact bytes and never raw in MESSAGE.
EVIL_NAME = b"evil\x1b[31mname"
STATE_DIR = HOOK_DIR = "/var/lib/portwatch"  # StateDirectory=portwatch

pytestmark = [pytest.mark.systemd, pytest.mark.root]


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, f"no exposure line in:\n{output}"
    return float(match.group(1))


@dataclass
class Installed:
    sandbox: Sandbox
    ports: tuple[int, int, int, int, int]  # four reserved, then the metrics listener's
    config: Path  # the good config (host path; the same path inside the sandbox)
    bad_config: Path
    programs: Path
    collector: Path  # node_exporter's textfile directory: root's, group portwatch, 0775

    def drop_in(self, *, config: Path | None = None, extra_args: str = "") -> None:
        """Point the unit at the venv and a config, with short watchdog and restart times."""
        text = (
            "[Service]\n"
            "ExecStart=\n"
            f"ExecStart={self.sandbox.venv}/bin/portwatch run --config {config or self.config}"
            f"{' ' + extra_args if extra_args else ''}\n"
            f"WatchdogSec={WATCHDOG_SEC}s\n"
            "RestartSec=200ms\n"
            # As the README says for metrics.textfile: the collector's directory, writable.
            f"ReadWritePaths={self.collector}\n"
        )
        path = self.sandbox.path(f"/run/systemd/system/{UNIT}.d/test.conf")
        path.parent.mkdir(exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            self.sandbox.daemon_reload()

    def state(self) -> dict[str, str]:
        return self.sandbox.show(
            UNIT,
            "ActiveState",
            "SubState",
            "StatusText",
            "NRestarts",
            "Result",
            "MainPID",
            "InvocationID",
            "ExecMainStatus",
            "ExecMainCode",
            "WatchdogUSec",
            "ActiveEnterTimestampMonotonic",
            "WatchdogTimestampMonotonic",
        )

    def events(
        self, event: str, invocation: str, *matches: str, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        return self.sandbox.wait_journal(
            "-u",
            UNIT,
            f"PORTWATCH_EVENT={event}",
            f"_SYSTEMD_INVOCATION_ID={invocation}",
            *matches,
            timeout=timeout,
        )

    def start_intruder(self, port: int, name: bytes = EVIL_NAME, **kw: Any) -> Holder:
        """A listener of user nobody inside the sandbox (its pid is the namespace's)."""
        return start_holder(
            [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
            name=name,
            prefix=[
                *self.sandbox.prefix,
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
            ],
            python="/usr/bin/python3",
            program=self.programs / "listener.py",
            **kw,
        )

    def stop_intruder(self, holder: Holder) -> None:
        # nsenter does not pass signals on: signal our listener by its namespace pid.
        self.sandbox.run("kill", "-TERM", str(holder.pid), check=False)
        holder.proc.wait(10)
        if holder.proc.stdout is not None:
            holder.proc.stdout.close()


CONFIG = """\
interval: 0.5
protocols: [tcp]
log_listeners: false
hook_cooldown: 0
reserved:
  - name: testsvc
    ports: [{p1}, {p2}]
    proto: tcp
    allow:
      - comm: allowed-name
    hooks: [record]
  - name: detachsvc
    ports: [{p3}]
    proto: tcp
    hooks: [detach]
  - name: anywhere
    ports: [{p4}]
    netns: "*"
hooks:
  record:
    command: [/usr/bin/python3, {programs}/record_hook.py, {hook_dir}]
    timeout: 10
  detach:
    command: [/usr/bin/python3, {programs}/misbehave_hook.py, detach, {hook_dir}/detached.pid, "300"]
    timeout: 10
metrics:
  listen: "127.0.0.1:{p5}"
  textfile: {collector}/portwatch.prom
"""


@pytest.fixture(scope="module")
def installed(systemd_sandbox: Sandbox) -> Iterator[Installed]:
    sandbox = systemd_sandbox
    programs = sandbox.workdir / "programs"
    programs.mkdir()
    programs.chmod(0o755)  # the service's user and nobody read these
    for name in ("listener.py", "record_hook.py", "misbehave_hook.py"):
        shutil.copy2(PROGRAMS / name, programs / name)
        (programs / name).chmod(0o644)
    etc = sandbox.workdir / "etc"
    etc.mkdir()
    etc.chmod(0o755)
    ports = (free_port(), free_port(), free_port(), free_port(), free_port())
    collector = sandbox.workdir / "collector"
    config = etc / "portwatch.yaml"
    config.write_text(
        CONFIG.format(p1=ports[0], p2=ports[1], p3=ports[2], p4=ports[3], p5=ports[4], programs=programs,
                      hook_dir=HOOK_DIR, collector=collector)
    )
    bad = etc / "bad.yaml"
    bad.write_text("interval: -1\nunknown_key: 1\n")
    for path in (config, bad):
        path.chmod(0o644)
    sandbox.install_portwatch(UNIT)
    collector.mkdir()
    sandbox.run("chgrp", "portwatch", str(collector))  # the README's way, with the sandbox's user
    collector.chmod(0o775)
    unit = Installed(sandbox, ports, config, bad, programs, collector)
    unit.drop_in()
    yield unit
    sandbox.systemctl("stop", UNIT, check=False)


@pytest.fixture
def running(installed: Installed) -> Installed:
    """The unit with the good config, started if it is not running."""
    installed.drop_in()
    if installed.state()["ActiveState"] != "active":
        installed.sandbox.systemctl("reset-failed", UNIT, check=False)
        installed.sandbox.systemctl("start", UNIT)
    return installed


def test_shipped_unit_passes_verify(systemd_sandbox: Sandbox) -> None:
    # verify wants ExecStart= to exist: in a throwaway mount namespace, /usr/local/bin
    # holds the venv's console script where `pip install` as root would put it.
    script = (
        "mount --make-rprivate / && mount -t tmpfs tmpfs /usr/local/bin && "
        'ln -s "$1" /usr/local/bin/portwatch && exec systemd-analyze verify "$2"'
    )
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(systemd_sandbox.venv / "bin" / "portwatch"),
            str(SHIPPED),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert UNIT not in done.stderr, done.stderr  # no warning about our file either


def test_offline_security_score_is_at_most_2() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", "--threshold=20", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert exposure(done.stdout) <= MAX_EXPOSURE


def test_starts_ready_with_status_and_only_its_two_capabilities(running: Installed) -> None:
    state = running.state()
    assert state["ActiveState"] == "active", state
    assert state["SubState"] == "running", state
    assert state["StatusText"].startswith("watching "), state
    assert state["NRestarts"] == "0", state
    started = running.events("portwatch_started", state["InvocationID"])
    assert len(started) == 1, started
    entry = started[0]
    assert entry["SYSLOG_IDENTIFIER"] == "portwatch"
    assert entry["MESSAGE_ID"] == "7218670578f04ba98b9dfd5ae4689ec8"
    assert entry["_SYSTEMD_UNIT"] == UNIT
    # sock_diag works under RestrictAddressFamilies= (the fast path, no fallback).
    assert entry["PORTWATCH_SOCKET_SOURCE"] == "netlink", entry
    assert entry["PORTWATCH_CONFIG_WATCH"] == "inotify", entry
    # Not root; CAP_DAC_READ_SEARCH (bit 2) and CAP_SYS_PTRACE (bit 19) only.
    assert int(entry["_UID"]) != 0
    assert entry["_CAP_EFFECTIVE"] == "80004", entry


def test_watchdog_pings_keep_it_running(running: Installed) -> None:
    state = running.state()
    assert state["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    # Three watchdog periods of uptime at least.
    up_since = int(state["ActiveEnterTimestampMonotonic"]) / 1e6
    time.sleep(max(0.0, up_since + 3 * WATCHDOG_SEC + 0.5 - time.monotonic()))
    after = running.state()
    assert after["ActiveState"] == "active", after
    assert after["NRestarts"] == "0", after
    assert after["MainPID"] == state["MainPID"]
    last_ping = int(after["WatchdogTimestampMonotonic"]) / 1e6
    assert time.monotonic() - last_ping < WATCHDOG_SEC, after  # pings keep arriving


def _wait_active(unit: Installed, timeout: float = 10.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state = unit.state()
        if state["ActiveState"] == "active" and state["SubState"] == "running":
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def test_reload_and_config_edit_are_picked_up(running: Installed) -> None:
    before = running.state()
    running.sandbox.systemctl("reload", UNIT)
    reloaded = running.events("config_reloaded", before["InvocationID"])
    assert len(reloaded) == 1, reloaded
    assert reloaded[0]["PORTWATCH_PATH"] == str(running.config)
    state = _wait_active(running)
    assert state["MainPID"] == before["MainPID"]
    assert state["NRestarts"] == "0"
    # An edit is seen through inotify on the config's directory, which
    # ProtectSystem=strict makes read-only for the service.
    text = running.config.read_text()
    try:
        running.config.write_text(text.replace("interval: 0.5", "interval: 0.4"))
        deadline = time.monotonic() + 10
        while len(reloaded) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            reloaded = running.events("config_reloaded", before["InvocationID"], timeout=0)
        assert len(reloaded) == 2, reloaded
    finally:
        running.config.write_text(text)


def _hook_records(unit: Installed, pid: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """What record_hook.py wrote for events about `pid` (in the unit's state directory)."""
    state_dir = unit.sandbox.path(STATE_DIR)
    wanted = str(pid).encode().hex()
    key = b"PORTWATCH_PID".hex()
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for path in state_dir.glob("*.json"):
            record = json.loads(path.read_text())
            # The daemon keeps its own state file here too.
            if isinstance(record, dict) and record.get("env", {}).get(key) == wanted:
                found.append(record)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_reserved_port_taken_by_another_user_is_resolved(running: Installed) -> None:
    invocation = running.state()["InvocationID"]
    port = running.ports[0]
    intruder = running.start_intruder(port)
    try:
        entries = running.events("reserved_port_taken", invocation, f"PORTWATCH_PORT={port}")
        assert len(entries) == 1, entries
        entry = entries[0]
        # Resolved under the unit's hardening: the namespace pid, the exact name.
        assert entry["PORTWATCH_VERIFIED"] == "true", entry
        assert entry["PORTWATCH_PID"] == str(intruder.pid), entry
        assert field_bytes(entry, "PORTWATCH_COMM") == EVIL_NAME
        assert entry["PORTWATCH_USER"] == "nobody"
        assert entry["PORTWATCH_RULE"] == "testsvc"
        assert entry["PORTWATCH_SOCKET_UID"] == str(NOBODY)
        assert entry["PRIORITY"] == "4"
        assert entry["MESSAGE_ID"] == "37140c1bb01945f5952bd220ed88a8b5"
        message = field_bytes(entry, "MESSAGE")
        assert message is not None
        assert b"\x1b" not in message
        assert f"evil\\x1b[31mname[{intruder.pid}]".encode() in message

        # The hook ran inside the unit's sandbox, as the service's user, without capabilities.
        records = _hook_records(running, intruder.pid)
        assert len(records) == 1, records
        record = records[0]
        env = {bytes.fromhex(k).decode(): bytes.fromhex(v) for k, v in record["env"].items()}
        assert env["PORTWATCH_COMM"] == EVIL_NAME
        assert env["PORTWATCH_EVENT"] == b"reserved_port_taken"
        for private in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID"):
            assert private not in env
        assert record["status"]["CapEff"] == "0000000000000000", record["status"]
        assert record["status"]["CapAmb"] == "0000000000000000", record["status"]
        assert record["status"]["NoNewPrivs"] == "1"
        finished = running.events("hook_finished", invocation, "PORTWATCH_HOOK=record")
        assert finished, "hook_finished is missing from the journal"
    finally:
        running.stop_intruder(intruder)
    assert running.state()["StatusText"].startswith("watching ")


def test_journalctl_x_explains_the_entry_with_the_catalog(running: Installed) -> None:
    # journalctl reads catalogs only from /usr/{local/,}lib/systemd/catalog: compile
    # ours under --root and put the database where -x looks (the sandbox's /var/lib).
    sandbox = running.sandbox
    catalog_dir = sandbox.path("/run/pwcat/usr/lib/systemd/catalog")
    catalog_dir.mkdir(parents=True)
    shutil.copy2(ROOT / "systemd" / "portwatch.catalog", catalog_dir)
    sandbox.run("journalctl", "--root=/run/pwcat", "--update-catalog")
    database = sandbox.path("/var/lib/systemd/catalog/database")
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sandbox.path("/run/pwcat/var/lib/systemd/catalog/database"), database)
    port = running.ports[0]
    intruder = running.start_intruder(port, name=b"catalogued")
    try:
        invocation = running.state()["InvocationID"]
        mine = (f"PORTWATCH_PORT={port}", f"PORTWATCH_PID={intruder.pid}")
        assert running.events("reserved_port_taken", invocation, *mine)
        shown = sandbox.run(
            "journalctl",
            "--no-pager",
            "-x",
            "-u",
            UNIT,
            "PORTWATCH_EVENT=reserved_port_taken",
            f"_SYSTEMD_INVOCATION_ID={invocation}",
            *mine,
        ).stdout
    finally:
        running.stop_intruder(intruder)
    explained = [line for line in shown.splitlines() if line.startswith("\N{LIGHT SHADE}")]
    assert explained, shown
    assert any(f"{port}/tcp" in line for line in explained), shown  # @PORTWATCH_PORT@ filled in
    assert any("PORTWATCH_VERIFIED=false" in line for line in explained), shown


def test_an_entry_too_big_for_a_datagram_arrives_through_a_memfd(running: Installed) -> None:
    # A 360 KB command line makes the reserved_port_taken entry bigger than a
    # datagram: the journal sender passes a sealed memfd instead (memfd_create,
    # fcntl seals, SCM_RIGHTS), all of which the unit's syscall filter must allow.
    invocation = running.state()["InvocationID"]
    port = running.ports[1]
    big = [b"x" * 120_000, b"y" * 120_000, b"z" * 120_000]
    intruder = running.start_intruder(port, name=b"bigcmdline", argv_extra=big)
    try:
        entries = running.events("reserved_port_taken", invocation, f"PORTWATCH_PORT={port}")
        assert len(entries) == 1, entries
        cmdline = json.loads(entries[0]["PORTWATCH_CMDLINE"])
        assert cmdline[-3:] == [b.decode() for b in big]
        assert entries[0]["PORTWATCH_PID"] == str(intruder.pid)
    finally:
        running.stop_intruder(intruder)


def test_the_state_file_knows_which_boot_it_is_from(running: Installed) -> None:
    """Under the shipped unit the daemon reads the boot id (ProcSubset=pid hid it, so a state file
    from before a reboot looked like this boot's) and follows the journal (no degraded event)."""
    invocation = running.state()["InvocationID"]
    assert running.events("portwatch_started", invocation)
    state = running.sandbox.path(f"{STATE_DIR}/state.json")
    deadline = time.monotonic() + 10
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()  # one kernel, one boot
    assert json.loads(state.read_text())["boot_id"] == boot
    assert running.sandbox.journal("-u", UNIT, "PORTWATCH_EVENT=degraded",
                                   f"_SYSTEMD_INVOCATION_ID={invocation}") == []


def test_procfs_fallback_works_in_the_shipped_unit(running: Installed) -> None:
    # The daemon reads its own /proc/self/net (what a ProcSubset=pid drop-in would leave).
    running.drop_in(extra_args="--source proc")
    try:
        running.sandbox.systemctl("restart", UNIT)
        invocation = running.state()["InvocationID"]
        started = running.events("portwatch_started", invocation)
        assert started
        assert started[0]["PORTWATCH_SOCKET_SOURCE"] == "proc", started[0]
        intruder = running.start_intruder(running.ports[0], name=b"procpath")
        try:
            entries = running.events("reserved_port_taken", invocation, f"PORTWATCH_PORT={running.ports[0]}")
            assert len(entries) == 1, entries
            assert entries[0]["PORTWATCH_PID"] == str(intruder.pid)
            assert entries[0]["PORTWATCH_VERIFIED"] == "true"
        finally:
            running.stop_intruder(intruder)
        assert not running.sandbox.journal(
            "-u", UNIT, "PORTWATCH_EVENT=scan_failed", f"_SYSTEMD_INVOCATION_ID={invocation}"
        )
    finally:
        running.drop_in()
        running.sandbox.systemctl("restart", UNIT)


def test_the_hardened_unit_sees_other_network_namespaces(running: Installed) -> None:
    """ProtectProc=ptraceable, the unit's two capabilities and RestrictNamespaces= (no setns)
    leave /proc/<pid>/net readable: a listener of user nobody in a network namespace of its own
    is found, named, and closed with its namespace."""
    invocation = running.state()["InvocationID"]
    port = running.ports[3]
    inside = start_holder(
        [{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}],
        name=b"in-netns",
        prefix=[*running.sandbox.prefix, "unshare", "--net", "setpriv", f"--reuid={NOBODY}",
                f"--regid={NOBODY}", "--clear-groups"],
        python="/usr/bin/python3",
        program=running.programs / "listener.py",
    )
    try:
        (entry,) = running.events("reserved_port_taken", invocation, f"PORTWATCH_PORT={port}")
        inode = running.sandbox.run("stat", "-L", "-c", "%i", f"/proc/{inside.pid}/ns/net").stdout.strip()
        assert entry["PORTWATCH_PID"] == str(inside.pid), entry
        assert entry["PORTWATCH_VERIFIED"] == "true"
        assert (entry["PORTWATCH_NETNS"], entry["PORTWATCH_NETNS_ID"]) == (f"netns:[{inode}]", inode), entry
        assert "PORTWATCH_CONTAINER" not in entry
    finally:
        running.stop_intruder(inside)
    (closed,) = running.events("listener_closed", invocation, f"PORTWATCH_PORT={port}")
    assert closed["PORTWATCH_REASON"] == "netns_gone", closed


def test_loaded_unit_exposure_is_at_most_2(running: Installed) -> None:
    done = running.sandbox.run("systemd-analyze", "security", "--no-pager", UNIT)
    assert exposure(done.stdout) <= MAX_EXPOSURE, done.stdout
    assert "metrics:" in running.config.read_text()  # with its metrics listener on


def test_the_hardened_unit_serves_its_metrics(running: Installed) -> None:
    """Scraped from outside the unit: a squatter shows, attributed under the unit's hardening
    (nothing denied), and shows no more once it leaves."""
    port, metrics = running.ports[0], running.ports[4]

    def violation() -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = {(s.name, tuple(sorted(s.labels.items()))): s.value
                 for family in text_string_to_metric_families(text) for s in family.samples}
        assert found["portwatch_degraded", (("reason", "permission_denied"),)] == 0
        assert found["portwatch_degraded", (("reason", "metrics"),)] == 0
        return found.get(("portwatch_reserved_port_violation",
                          (("port", str(port)), ("proto", "tcp"), ("rule", "testsvc"))))

    assert violation() == 0
    textfile = running.collector / "portwatch.prom"
    deadline = time.monotonic() + 10
    while not textfile.exists():
        assert time.monotonic() < deadline, "the unit never wrote its textfile"
        time.sleep(0.1)
    assert textfile.stat().st_mode & 0o777 == 0o644
    text = textfile.read_text()
    assert "portwatch_reserved_port_violation{" in text and "\nprocess_" not in text
    intruder = running.start_intruder(port)
    try:
        deadline = time.monotonic() + 10
        while violation() != 1:
            assert time.monotonic() < deadline, "the squatter never showed in the metrics"
            time.sleep(0.1)
    finally:
        running.stop_intruder(intruder)
    deadline = time.monotonic() + 10
    while violation() != 0:
        assert time.monotonic() < deadline, "the squatter's departure never showed in the metrics"
        time.sleep(0.1)


def test_stop_is_clean_and_kills_escaped_hook_grandchildren(running: Installed) -> None:
    sandbox = running.sandbox
    invocation = running.state()["InvocationID"]
    # A hook that leaves `sleep 300` behind in a session of its own, out of the
    # hook runner's reach; KillMode=mixed must still end it at stop.
    pidfile = sandbox.path(f"{STATE_DIR}/detached.pid")
    intruder = running.start_intruder(running.ports[2], name=b"detacher")
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(pidfile.read_text())
        assert sandbox.path(f"/proc/{grandchild}").exists()
        running.sandbox.systemctl("stop", UNIT)
    finally:
        running.stop_intruder(intruder)
    state = running.state()
    assert state["ActiveState"] == "inactive", state
    assert state["Result"] == "success", state
    assert state["ExecMainStatus"] == "0", state
    assert running.events("portwatch_stopping", invocation)
    deadline = time.monotonic() + 5
    while sandbox.path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox.path(f"/proc/{grandchild}").exists(), "the hook's grandchild outlived the unit"


def test_invalid_config_fails_with_78_and_does_not_restart(installed: Installed) -> None:
    sandbox = installed.sandbox
    sandbox.systemctl("stop", UNIT, check=False)
    sandbox.systemctl("reset-failed", UNIT, check=False)
    installed.drop_in(config=installed.bad_config)
    try:
        started = sandbox.systemctl("start", UNIT, check=False)
        assert started.returncode != 0
        # Restart=on-failure with RestartSec=200ms would have restarted it several times by now.
        time.sleep(1.5)
        state = installed.state()
        assert state["ActiveState"] == "failed", state
        assert state["Result"] == "exit-code", state
        assert state["ExecMainStatus"] == "78", state
        assert state["NRestarts"] == "0", state
        # The reasons reach the journal through stderr, one line each (bad.yaml is
        # this test's alone).
        deadline = time.monotonic() + 10
        messages: list[str] = []
        while not any("bad.yaml:1" in m for m in messages) and time.monotonic() < deadline:
            time.sleep(0.1)
            messages = [str(e.get("MESSAGE")) for e in sandbox.journal("-u", UNIT)]
        assert any("bad.yaml:1: interval" in m for m in messages), messages
        assert not any("Traceback" in m for m in messages), messages
    finally:
        sandbox.systemctl("reset-failed", UNIT, check=False)
        installed.drop_in()
