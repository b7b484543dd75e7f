"""Prometheus metrics: served over HTTP, or written for node_exporter's textfile collector.

The one module that imports prometheus_client, and the daemon imports it only
when the config has a `metrics:` section. The main loop counts events as it
emits them and publishes its state after each scan (gauges.Published, never
modified); a scrape reads the last one, so it never races a scan. The HTTP
listener is non-blocking and polled by the daemon's own select loop: nothing
runs while nobody scrapes, and each request is answered on a short-lived
thread, so a slow client cannot hold up a scan.
"""

from __future__ import annotations

import contextlib
import errno
import platform
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from portwatch import __version__
from portwatch.atomicfile import replace_file
from portwatch.config import MetricsSettings
from portwatch.events import KNOWN_EVENTS
from portwatch.gauges import DEGRADED_REASONS, Published, listener_counts, violations
from portwatch.model import endpoint

# `_created` series double what a counter costs and node_exporter's textfile collector
# has no use for them.
disable_created_metrics()  # type: ignore[no-untyped-call]

SCAN_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
MAX_BLOCKED_UNITS = 100  # distinct blocked_unit labels; later ones are counted as "other"
REQUEST_TIMEOUT = 10.0  # seconds a scrape's connection may stay silent
MAX_REQUESTS = 4  # answered at once; a connection beyond is closed (a scraper retries next interval)
TEXTFILE_REFRESH = 10.0  # seconds between rewrites of the textfile when nothing happened

_HOOK_RESULTS = {"hook_finished": "ok", "hook_dropped": "dropped", "hook_suppressed": "suppressed"}


class Metrics:
    """The registry, the counters the daemon feeds, and where the metrics go."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()  # portwatch's own: also the textfile's
        # Served over HTTP with the process's CPU, memory and fds, which node_exporter gives for
        # itself (the textfile's would clash); not GC or platform: a scrape pays per sample.
        self.http = CollectorRegistry()
        self.http.register(registry)
        ProcessCollector(registry=self.http)
        self.started = time.time()
        self.events = Counter("portwatch_events", "Events portwatch emitted, by event name.",
                              ["event"], registry=registry)
        for name in sorted(KNOWN_EVENTS):
            self.events.labels(name)
        self.hook_runs = Counter(
            "portwatch_hook_runs", "Hooks run, by hook and result: ok, failed (exit status, signal "
            "or timeout), error (could not start), dropped (queue full), suppressed (cool-down).",
            ["hook", "result"], registry=registry)
        self.conflicts = Counter(
            "portwatch_port_conflicts", "Services that could not bind their port because another "
            "listener held it, by the blocked unit and the rule reserving the port.",
            ["blocked_unit", "rule"], registry=registry)
        self.scan_duration = Histogram("portwatch_scan_duration_seconds", "How long each scan took.",
                                       buckets=SCAN_BUCKETS, registry=registry)
        Info("portwatch_build", "The running portwatch.", registry=registry).info(
            {"version": __version__, "python": platform.python_version()})
        registry.register(_StateCollector(self))
        self.state: Published | None = None
        self._units: set[str] = set()
        self._server: _Server | None = None
        self.listening: tuple[str, int] | None = None
        self.textfile: str | None = None
        self.unwritten: str | None = None  # why the textfile could not be written, last time
        self._written_at = float("-inf")
        self._counted = False  # an event since the textfile was last written: write it now

    # -- what the daemon feeds -------------------------------------------------------------

    def count(self, event: str, fields: Mapping[str, Any]) -> None:
        """One emitted event (from any thread)."""
        self._counted = True
        if event in KNOWN_EVENTS:
            self.events.labels(event).inc()
        if event in _HOOK_RESULTS or event == "hook_failed":
            result = _HOOK_RESULTS.get(event) or (
                "failed" if fields.get("exit_code") is not None or fields.get("signal") else "error")
            self.hook_runs.labels(str(fields.get("hook")), result).inc()
        elif event == "port_conflict":
            unit = str(fields.get("blocked_unit") or "")
            if unit not in self._units and len(self._units) >= MAX_BLOCKED_UNITS:
                unit = "other"
            self._units.add(unit)
            self.conflicts.labels(unit, str(fields.get("rule") or "")).inc()

    def scanned(self, seconds: float) -> None:
        self.scan_duration.observe(seconds)

    def publish(self, state: Published) -> None:
        self.state = state

    # -- where they go ------------------------------------------------------------------------

    def apply(self, settings: MetricsSettings | None) -> str | None:
        """Serve and write as `settings` say, or say why the listen address cannot be had. Then,
        with a listener running, nothing changes (the caller refuses the config); without one,
        the rest applies (the caller goes on without metrics over HTTP, and says so)."""
        listen = settings.listen if settings is not None else None
        problem = self._listen(listen) if listen != self.listening else None
        if problem is not None and self.listening is not None:
            return problem
        textfile = settings.textfile if settings is not None else None
        if textfile != self.textfile:
            if self.textfile is not None:
                with contextlib.suppress(OSError):
                    Path(self.textfile).unlink()  # turned off: node_exporter must not keep stale values
            self.textfile, self._written_at, self.unwritten = textfile, float("-inf"), None
        return problem

    def _listen(self, listen: tuple[str, int] | None) -> str | None:
        """Move the listener to `listen` (None: none); the problem, keeping the old one, if not."""
        old = self.listening
        if listen is None:
            self.close_listener()
            return None
        try:
            server = _Server(listen, self.http)
        except OSError as exc:
            if not (exc.errno == errno.EADDRINUSE and old is not None and old[1] == listen[1]):
                return f"cannot listen on {endpoint(*listen)}: {exc.strerror or exc}"
            # The same port on another address (127.0.0.1 -> 0.0.0.0): ours is in the way.
            self.close_listener()
            try:
                server = _Server(listen, self.http)
            except OSError as again:
                with contextlib.suppress(OSError):
                    self._server, self.listening = _Server(old, self.http), old
                return f"cannot listen on {endpoint(*listen)}: {again.strerror or again}"
        self.close_listener()
        self._server, self.listening = server, listen
        return None

    def fileno(self) -> int | None:
        return self._server.fileno() if self._server is not None else None

    def serve(self) -> None:
        """Answer the connection waiting on the listener (on a thread of its own)."""
        if self._server is not None:
            self._server.handle_request()

    def write(self, now: float) -> None:
        """Rewrite the textfile (atomically, world-readable for node_exporter) when an event was
        counted since the last time or it is due; `unwritten` says why the last attempt failed
        (retried each time)."""
        if self.textfile is None or (not self._counted and now - self._written_at < TEXTFILE_REFRESH):
            return
        self._counted = False
        try:
            replace_file(Path(self.textfile), generate_latest(self.registry), 0o644)  # node_exporter reads it
        except OSError as exc:
            self.unwritten = f"cannot write {self.textfile}: {exc.strerror or exc}"
            return
        self._written_at, self.unwritten = now, None

    def where(self) -> str | None:
        """Where the metrics go, for `portwatch_started`."""
        where = []
        if self.listening is not None:
            address, port = self.listening
            where.append(f"http://{f'[{address}]' if ':' in address else address}:{port}/metrics")
        if self.textfile is not None:
            where.append(self.textfile)
        return " and ".join(where) or None

    def close_listener(self) -> None:
        if self._server is not None:
            self._server.server_close()
            self._server = self.listening = None


class _StateCollector(Collector):
    """The gauges, read from the last published state at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        state = self.metrics.state
        listeners = GaugeMetricFamily("portwatch_listeners", "Listening sockets, by protocol and family.",
                                      labels=["proto", "family"])
        for (proto, family), count in listener_counts(state.snapshot if state else None).items():
            listeners.add_metric([proto, family], count)
        yield listeners
        degraded = GaugeMetricFamily("portwatch_degraded", "1 while portwatch's view is incomplete, "
                                     "by reason (the journal's degraded events say more).",
                                     labels=["reason"])
        for reason in DEGRADED_REASONS:
            degraded.add_metric([reason], int(state is not None and reason in state.degraded))
        yield degraded
        if state is None:
            return
        violation = GaugeMetricFamily(
            "portwatch_reserved_port_violation", "1 while a reserved port is held by an owner its rule "
            "does not allow (or cannot identify), by rule, protocol and port.",
            labels=["rule", "proto", "port"])
        for (rule, proto, port), value in sorted(violations(state).items()):
            violation.add_metric([rule, proto, str(port)], value)
        yield violation
        interval = GaugeMetricFamily("portwatch_scan_interval_seconds", "The configured scan interval.")
        interval.add_metric([], state.config.interval)
        yield interval
        last = GaugeMetricFamily("portwatch_last_scan_timestamp_seconds", "When the last scan that "
                                 "worked began, in seconds since the epoch (0: none has worked yet).")
        last.add_metric([], state.last_scan or 0)
        yield last
        started = GaugeMetricFamily("portwatch_start_time_seconds", "When these counters started: "
                                    "portwatch's start, or the reload that turned metrics on.")
        started.add_metric([], self.metrics.started)
        yield started


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not events: nothing is logged."""


class _Server(ThreadingMixIn, WSGIServer):
    """prometheus_client's WSGI app on a non-blocking listener the daemon polls."""

    daemon_threads = True

    def __init__(self, listen: tuple[str, int], registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        super().__init__(listen, _Handler)
        self.set_app(make_wsgi_app(registry))
        self.socket.setblocking(False)  # a client that connects and resets before accept: no wait
        self._busy = 0
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        # A local user opening connections by the thousand must not get a thread for each.
        with self._lock:
            if self._busy >= MAX_REQUESTS:
                self.shutdown_request(request)
                return
            self._busy += 1
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: nothing will count it down
            with self._lock:
                self._busy -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._busy -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets mid-request is not worth a traceback on the daemon's stderr."""

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the host's name: not in the daemon's loop.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


