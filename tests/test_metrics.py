"""Prometheus metrics: served by a real `portwatch run`, written for node_exporter, reloaded, and
carried end to end by Debian's prometheus, prometheus-alertmanager and prometheus-node-exporter
(installed by .ci/run, started here on loopback ports with temporary storage) to a webhook."""

from __future__ import annotations

import contextlib
import json
import platform
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, DaemonProcess, Holder, free_port, free_ports, run_python

ALERTS = ROOT / "etc" / "prometheus" / "portwatch-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "portwatch-alerts.test.yml"
HOSTILE = b"evil\x1b[31m\"} 1\nportwatch_x"  # a process name that would break the exposition format

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: .ci/run installs it (Debian's prometheus packages)"
    return path


def fetch(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def wait_until(read: Callable[[], Samples], check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Read again until `check` holds (fails after `timeout` with the last reading)."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if check(found):
            return found
        if time.monotonic() > deadline:
            shown = {k: v for k, v in found.items() if k[0].startswith("portwatch_")}
            raise AssertionError(f"metrics never matched within {timeout}s: {shown}")
        time.sleep(0.1)


def config(path: Path, port: int, metrics: str, hooks: str = "") -> Path:
    path.write_text(f"""\
interval: 0.2
hook_cooldown: 0
reserved:
  - name: guarded
    ports: [{port}]
    allow:
      - comm: nginx
{"    hooks: [ok]" if hooks else ""}
{hooks}
metrics:
{metrics}
""")
    return path


def listen(port: int) -> str:
    return f'  listen: "127.0.0.1:{port}"'


def reload(d: DaemonProcess, path: Path, text: str, event: str) -> dict[str, Any]:
    """Replace the config (the daemon watches it) and wait for its verdict."""
    mark = d.mark()
    new = path.with_suffix(".new")
    new.write_text(text)
    new.replace(path)
    return d.wait_event(event, since=mark)


def metrics_degraded(d: DaemonProcess) -> dict[str, Any]:
    return d.wait_for(lambda e: e.get("event") == "degraded" and e["reason"].startswith("metrics: "))


def test_the_metrics_follow_a_squatter_and_its_hook(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    port, mport = free_ports(2)
    hook = "hooks:\n  ok:\n    command: [/bin/true]\n"
    d = daemons(config(tmp_path / "pw.yaml", port, listen(mport), hook))
    assert d.started()["metrics"] == f"http://127.0.0.1:{mport}/metrics"
    found = samples(fetch(mport))
    assert value(found, "portwatch_reserved_port_violation", rule="guarded", proto="tcp", port=str(port)) == 0
    assert value(found, "portwatch_events_total", event="portwatch_started") == 1
    assert value(found, "portwatch_events_total", event="reserved_port_taken") == 0
    assert value(found, "portwatch_build_info", version="0.1.0", python=platform.python_version()) == 1
    assert (value(found, "portwatch_listeners", proto="tcp", family="ipv4") or 0) >= 1  # its own, at least
    assert (value(found, "process_resident_memory_bytes") or 0) > 0
    assert (value(found, "portwatch_scan_duration_seconds_count") or 0) >= 1
    assert value(found, "portwatch_scan_interval_seconds") == 0.2
    assert value(found, "portwatch_degraded", reason="metrics") == 0

    squatter = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}], name=HOSTILE)
    taken = wait_until(lambda: samples(fetch(mport)), lambda f: value(
        f, "portwatch_reserved_port_violation", rule="guarded", proto="tcp", port=str(port)) == 1)
    assert value(taken, "portwatch_events_total", event="reserved_port_taken") == 1
    ran = wait_until(lambda: samples(fetch(mport)),
                     lambda f: value(f, "portwatch_hook_runs_total", hook="ok", result="ok") == 1)
    assert value(ran, "portwatch_events_total", event="hook_finished") == 1
    text = fetch(mport)
    assert "evil" not in text and str(squatter.pid) not in text  # labels come from the config only

    squatter.stop()
    wait_until(lambda: samples(fetch(mport)), lambda f: value(
        f, "portwatch_reserved_port_violation", rule="guarded", proto="tcp", port=str(port)) == 0)
    d.wait_event("listener_closed", port=port)
    checked = subprocess.run([tool("promtool"), "check", "metrics"], input=fetch(mport),
                             capture_output=True, text=True, check=False)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_a_reload_rebinds_and_refuses_an_address_in_use(
    tmp_path: Path, daemons: Callable[..., DaemonProcess],
) -> None:
    port, first, second, busy = free_ports(4)
    path = config(tmp_path / "pw.yaml", port, listen(first))
    d = daemons(path)
    d.started()
    fetch(first)
    text = path.read_text()
    reload(d, path, text.replace(str(first), str(second)), "config_reloaded")
    assert "portwatch_events_total" in fetch(second)
    with pytest.raises(urllib.error.URLError):
        fetch(first)

    with socket.create_server(("127.0.0.1", busy)):  # someone else's listener
        rejected = reload(d, path, text.replace(str(first), str(busy)), "config_rejected")
        assert rejected["error"].startswith(f"metrics.listen: cannot listen on 127.0.0.1:{busy}: ")
        assert "in use" in rejected["error"]
        found = samples(fetch(second))  # the old listener, and the counters it had
        assert value(found, "portwatch_events_total", event="config_reloaded") == d.count("config_reloaded") == 1
        assert value(found, "portwatch_events_total", event="config_rejected") == d.count("config_rejected") == 1
    reload(d, path, text.split("metrics:", 1)[0], "config_reloaded")  # turned off
    with pytest.raises(urllib.error.URLError):
        fetch(second)


SAME_PORT = """
import sys, urllib.request
from portwatch.config import MetricsSettings
from portwatch.metrics import Metrics
metrics, port = Metrics(), int(sys.argv[1])
assert metrics.apply(MetricsSettings(listen=("127.0.0.1", port))) is None
assert metrics.apply(MetricsSettings(listen=("0.0.0.0", port))) is None, "ours was in the way"
assert metrics.listening == ("0.0.0.0", port)
import socket
busy = socket.create_server(("0.0.0.0", port + 1))  # someone else's, on another port
print(metrics.apply(MetricsSettings(listen=("0.0.0.0", port + 1))))
assert metrics.listening == ("0.0.0.0", port)  # kept
import select, threading
def serve_one():  # what the daemon's loop does when the listener is readable
    select.select([metrics.fileno()], [], [], 10)
    metrics.serve()
threading.Thread(target=serve_one).start()
assert b"portwatch_events_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
"""


@pytest.mark.root
def test_the_same_port_moves_to_another_address() -> None:
    """127.0.0.1:P -> 0.0.0.0:P: the old listener is what is in the way (in a network namespace of
    the test's own, where 0.0.0.0 is loopback only)."""
    prefix = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    done = run_python(SAME_PORT, "9948", prefix=prefix)  # any port: the namespace is empty
    assert done.returncode == 0, done.stderr
    assert done.stdout == "cannot listen on *:9949: Address already in use\n", done.stdout


def test_idle_connections_cannot_take_a_thread_each(tmp_path: Path, daemons: Callable[..., DaemonProcess]) -> None:
    """A local user holding connections open gets MAX_REQUESTS threads, no more; scrapes come back
    when they close."""
    from portwatch.metrics import MAX_REQUESTS

    port, mport = free_ports(2)
    daemons(config(tmp_path / "pw.yaml", port, listen(mport))).started()
    idle = [socket.create_connection(("127.0.0.1", mport)) for _ in range(MAX_REQUESTS)]
    try:
        with pytest.raises(OSError):  # accepted after the idle ones (the backlog is in order), and closed
            fetch(mport)
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: samples(fetch(mport)) if _answers(mport) else {},
               lambda f: value(f, "portwatch_events_total", event="portwatch_started") == 1)


def test_a_client_resetting_mid_request_leaves_no_trace_on_stderr(
    tmp_path: Path, daemons: Callable[..., DaemonProcess],
) -> None:
    port, mport = free_ports(2)
    d = daemons(config(tmp_path / "pw.yaml", port, listen(mport)))
    d.started()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", mport)) as half:
            half.sendall(b"GET /metrics HTTP/1.1\r\nHost")
            half.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    wait_until(lambda: samples(fetch(mport)) if _answers(mport) else {},
               lambda f: value(f, "portwatch_events_total", event="portwatch_started") == 1)
    assert d.stop() == 0
    assert d.stderr == b"", d.stderr


def _answers(port: int) -> bool:
    try:
        fetch(port)
    except OSError:
        return False
    return True


def test_an_address_in_use_at_start_is_degraded_and_retried_at_reload(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    port, mport = free_ports(2)
    path = config(tmp_path / "pw.yaml", port, listen(mport))
    with socket.create_server(("127.0.0.1", mport)):
        d = daemons(path)
        assert d.started()["metrics"] is None
        degraded = metrics_degraded(d)
        assert degraded["reason"].startswith(f"metrics: cannot listen on 127.0.0.1:{mport}: ")
        holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}])
        d.wait_event("reserved_port_taken", port=port)  # the watch goes on
        # No listener to keep: a reload while the address is still taken applies the rest.
        reload(d, path, path.read_text().replace("interval: 0.2", "interval: 0.3"), "config_reloaded")
        assert d.count("config_rejected") == 0
    reload(d, path, path.read_text(), "config_reloaded")
    found = samples(fetch(mport))
    assert value(found, "portwatch_reserved_port_violation", rule="guarded", proto="tcp", port=str(port)) == 1
    assert value(found, "portwatch_degraded", reason="metrics") == 0


def test_the_textfile_is_replaced_whole_readable_and_removed_when_turned_off(
    tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
) -> None:
    port = free_port()
    textfile = tmp_path / "collector" / "portwatch.prom"
    textfile.parent.mkdir()
    path = config(tmp_path / "pw.yaml", port, f"  textfile: {textfile}")
    d = daemons(path)
    assert d.started()["metrics"] == str(textfile)

    def read() -> Samples:
        return samples(textfile.read_text()) if textfile.exists() else {}

    wait_until(read, lambda f: value(f, "portwatch_events_total", event="portwatch_started") == 1)
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter runs as another user
    assert "\nprocess_" not in textfile.read_text()  # node_exporter's own would clash
    holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}])
    wait_until(read, lambda f: value(
        f, "portwatch_reserved_port_violation", rule="guarded", proto="tcp", port=str(port)) == 1)
    assert sorted(p.name for p in textfile.parent.iterdir()) == ["portwatch.prom"]  # no temporary left

    text = path.read_text()
    reload(d, path, text.replace(str(textfile), str(tmp_path / "missing" / "portwatch.prom")), "config_reloaded")
    assert not textfile.exists()  # turned off here: node_exporter must not serve stale values
    degraded = metrics_degraded(d)
    assert degraded["reason"].startswith(f"metrics: cannot write {tmp_path}/missing/portwatch.prom: ")


def test_hook_results_and_blocked_units_are_counted_within_bounds() -> None:
    """Events as the hook runner and the conflict watch emit them: a bounded set of series."""
    from prometheus_client import generate_latest

    from portwatch.metrics import MAX_BLOCKED_UNITS, Metrics

    metrics = Metrics()
    for event, fields in [
        ("hook_finished", {"exit_code": 0}),
        ("hook_failed", {"exit_code": 2, "signal": None}),
        ("hook_failed", {"exit_code": None, "signal": 9}),  # a timeout kills the group
        ("hook_failed", {"exit_code": None, "signal": None}),  # could not start
        ("hook_dropped", {}), ("hook_suppressed", {}),
    ]:
        metrics.count(event, {"hook": "page", **fields})
    for n in range(MAX_BLOCKED_UNITS + 5):  # transient units: run-u1.service, run-u2.service ...
        metrics.count("port_conflict", {"blocked_unit": f"run-u{n}.service", "rule": None})
    metrics.count("port_conflict", {"blocked_unit": "run-u0.service", "rule": "web"})
    found = samples(generate_latest(metrics.registry).decode())
    runs = {dict(labels)["result"]: v for (name, labels), v in found.items() if name == "portwatch_hook_runs_total"}
    assert runs == {"ok": 1, "failed": 2, "error": 1, "dropped": 1, "suppressed": 1}
    conflicts = {dict(labels)["blocked_unit"]: v for (name, labels), v in found.items()
                 if name == "portwatch_port_conflicts_total" and dict(labels)["rule"] == ""}
    assert len(conflicts) == MAX_BLOCKED_UNITS + 1 and conflicts["other"] == 5
    assert value(found, "portwatch_port_conflicts_total", blocked_unit="run-u0.service", rule="web") == 1
    assert value(found, "portwatch_events_total", event="port_conflict") == MAX_BLOCKED_UNITS + 6


def test_the_shipped_alert_rules_pass_promtool() -> None:
    checked = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool("promtool"), "test", "rules", ALERT_TESTS.name],
                            cwd=ALERT_TESTS.parent, capture_output=True, text=True, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# --- end to end: portwatch -> Prometheus -> Alertmanager -> a webhook ------------------------


class Receiver(ThreadingHTTPServer):
    """The webhook Alertmanager notifies: every alert of every notification, in arrival order."""

    def __init__(self, port: int) -> None:
        self.alerts: queue.Queue[dict[str, Any]] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                for alert in body["alerts"]:
                    receiver.alerts.put(alert)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)

    def wait(self, status: str, labels: dict[str, str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                alert = self.alerts.get(timeout=left)
                seen.append(alert)
                if alert["status"] == status and labels.items() <= alert["labels"].items():
                    return alert
        raise AssertionError(f"no {status} alert with {labels} within {timeout}s; got {seen}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Servers:
    """Prometheus, Alertmanager and node_exporter processes started for one test, stopped after."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], port: int) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir))
        log.close()
        ready = "/metrics" if name == "node_exporter" else "/-/ready"
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch(port, ready)
                return
            except (OSError, urllib.error.URLError):
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not start:\n"
                                         f"{(self.workdir / f'{name}.log').read_text()[-3000:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.stop()


def start_alertmanager(servers: Servers, receiver: Receiver) -> int:
    port = free_port()
    am = servers.workdir / "alertmanager"
    am.mkdir()
    (am / "alertmanager.yml").write_text(f"""\
route:
  receiver: test
  group_by: [alertname, rule, port]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: http://127.0.0.1:{receiver.server_address[1]}/
        send_resolved: true
""")
    servers.start("alertmanager", [
        tool("prometheus-alertmanager"), f"--config.file={am / 'alertmanager.yml'}",
        f"--storage.path={am / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port on the host's addresses
    ], port)
    return port


def start_prometheus(servers: Servers, alertmanager: int, job: str, target: int) -> None:
    port = free_port()
    directory = servers.workdir / "prometheus"
    directory.mkdir()
    (directory / "prometheus.yml").write_text(f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{ALERTS}]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["127.0.0.1:{alertmanager}"]}}]
scrape_configs:
  - job_name: {job}
    static_configs: [{{targets: ["127.0.0.1:{target}"]}}]
""")
    servers.start("prometheus", [
        tool("prometheus"), f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
    ], port)


@pytest.mark.parametrize("output", ["listen", "textfile"])
def test_a_squatter_reaches_alertmanager_and_its_departure_resolves_it(
    output: str, tmp_path: Path, daemons: Callable[..., DaemonProcess], holders: Callable[..., Holder],
    servers: Servers, receiver: Receiver,
) -> None:
    port = free_port()
    if output == "listen":
        target = free_port([port])
        metrics, job = listen(target), "portwatch"
    else:  # node_exporter's textfile collector carries the same metrics
        collector = tmp_path / "textfile"
        collector.mkdir()
        metrics, job, target = f"  textfile: {collector}/portwatch.prom", "node", free_port([port])
        servers.start("node_exporter", [
            tool("prometheus-node-exporter"), "--collector.disable-defaults", "--collector.textfile",
            f"--collector.textfile.directory={collector}", f"--web.listen-address=127.0.0.1:{target}",
        ], target)
    d = daemons(config(tmp_path / "pw.yaml", port, metrics))
    d.started()
    start_prometheus(servers, start_alertmanager(servers, receiver), job, target)
    wanted = {"alertname": "PortwatchReservedPortTaken", "rule": "guarded", "port": str(port), "proto": "tcp",
              "severity": "critical", "service": "portwatch", "job": job}

    squatter = holders([{"proto": "tcp", "family": 4, "address": "127.0.0.1", "port": port}], name=b"squatter")
    firing = receiver.wait("firing", wanted, timeout=30)
    assert firing["annotations"]["summary"] == f"Reserved tcp port {port} taken on 127.0.0.1:{target}"
    squatter.stop()
    receiver.wait("resolved", wanted, timeout=30)
    if output == "textfile":  # node_exporter took the file whole, with nothing clashing with its own
        assert "portwatch_scan_duration_seconds_count" in fetch(target)
        log = (tmp_path / "node_exporter.log").read_text()
        assert "collected before" not in log and "level=error" not in log, log


def test_the_readmes_fleet_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    """The fleet page's prometheus.yml and alertmanager.yml are what the real tools accept."""
    fleet = (ROOT / "README.md").read_text().split("## Metrics and alerts for a fleet", 1)[1].split("\n## ", 1)[0]
    blocks = fleet.split("```yaml\n")[1:]
    prometheus = next(b for b in blocks if b.startswith("# prometheus.yml")).split("```", 1)[0]
    alertmanager = next(b for b in blocks if b.startswith("# alertmanager.yml")).split("```", 1)[0]
    main, targets = prometheus.split("# /etc/prometheus/targets/portwatch-web.yml\n")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "portwatch-web.yml").write_text(targets)
    main = main.replace("/etc/prometheus/portwatch-alerts.yml", str(ALERTS))
    main = main.replace("/etc/prometheus/targets/", f"{tmp_path}/targets/")
    (tmp_path / "prometheus.yml").write_text(main)
    (tmp_path / "alertmanager.yml").write_text(alertmanager)
    for argv in ([tool("promtool"), "check", "config", "prometheus.yml"],
                 [tool("amtool"), "check-config", "alertmanager.yml"]):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
