"""Prometheus metrics, counted cheaply, served from their own thread.

The hot path never touches a prometheus-client object per tap. A committed
decision adds one to a plain dict keyed by (service, operation, result); an
immediate answer (BUSY_RETRY, PROTOCOL_ERROR, SEQUENCE_REUSED) one to
another. Everything else the engine already counts (writer, sessions, pool,
health) is read as plain attributes at scrape time by ``EngineCollector``.
Only per-batch figures (batch size, commit time) use prometheus-client
histograms, once per batch.

The HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``) runs in its own
threads, so a scrape never blocks the event loop, and a wedged loop still
gets reported. Reading counters while the loop adds to them is safe under the
GIL: a scrape can be a few taps behind, never wrong by more.

Names follow Prometheus conventions: ``citycard_`` prefix, base units
(seconds), ``_total`` on counters. Labels are bounded sets (service codes,
operations, result codes, error kinds): never a card or terminal id.

>>> metrics = EngineMetrics()                               # doctest: +SKIP
>>> port = metrics.serve("127.0.0.1", 0, health)            # then GET /metrics
"""

from __future__ import annotations

import socket
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import asyncpg
from prometheus_client import CollectorRegistry, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from engine import __version__, fastpath
from engine.codes import ErrorCode, OperationKind, ResultCode, TapInfo
from engine.decision import Decision
from engine.seal import REJECTED_REASONS

# The outcomes of an uploaded offline tap (engine.offline.OUTCOMES; not
# imported from there, which depends on the processor and the ladder).
OFFLINE_OUTCOMES = ("agreed", "differs", "uncollected", "duplicate", "refused", "busy")

if TYPE_CHECKING:
    from engine.health import EngineHealth
    from engine.session import SessionCounters
    from engine.state import CityState
    from engine.sync import Sync
    from engine.turns import TurnBudget
    from engine.writer import BatchWriter

# Latency objectives (p99 <= 10 ms, and 5 ms and 50 ms for the dashboards;
# docs/performance.md) are bucket edges, so the share of requests within each
# objective is exact, not interpolated. 100 us to 5 s covers a fast tap to a
# database stall.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.010, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.010, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# The lag monitor's timer has millisecond resolution: finer edges would be noise.
LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Label value for a service id the services table did not name at start.
UNKNOWN_SERVICE = "unknown"

_OPERATION_NAMES = {int(kind): kind.name.lower() for kind in OperationKind}
_RESULT_NAMES = {int(code): code.name.lower() for code in ResultCode}
# Every TapInfo flag, one bit each, and its label value.
_INFO_BITS = tuple(int(flag) for flag in TapInfo if flag.value and flag.value & (flag.value - 1) == 0)
_INFO_NAMES = {int(flag): str(flag.name).lower() for flag in TapInfo if flag.value}
_DECLINES = tuple(int(code) for code in ResultCode if code.is_final and code != ResultCode.APPROVED)
_IMMEDIATE = (ResultCode.BUSY_RETRY, ResultCode.SEQUENCE_REUSED, ResultCode.PROTOCOL_ERROR)
_ERROR_NAMES = {int(code): code.name.lower() for code in ErrorCode}


class LoopHistogram(Collector):
    """A histogram observed from the event loop only, without locks.

    prometheus-client's Histogram takes a lock and walks every bucket per
    observation (about a microsecond); this one costs one bisect and two
    additions, which matters when it runs once per tap. The scrape thread
    reads the counts while the loop may be adding to them: a scrape can be
    one observation behind, never wrong by more.
    """

    def __init__(self, name: str, documentation: str, edges: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.edges = tuple(edges)
        self.counts = [0] * (len(self.edges) + 1)
        self.total = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.edges, value)] += 1
        self.total += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = list(self.counts)
        total = self.total
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for edge, count in zip(self.edges, counts, strict=False):
            cumulative += count
            buckets.append((repr(float(edge)), cumulative))
        cumulative += counts[-1]
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


@dataclass
class EngineSources:
    """What the engine collector reads at scrape time: plain attributes only."""

    writer: BatchWriter
    sessions: SessionCounters
    state: CityState
    health: EngineHealth
    # The pool goes away when the engine stops; read it through this.
    pool: Callable[[], asyncpg.Pool | None]
    # Look-ups that found no idle pool connection (Processor.pool_waits).
    pool_waits: Callable[[], int]
    writer_queue_capacity: int
    # Uploaded offline taps by outcome (OfflineUploads.outcomes).
    offline_outcomes: Callable[[], dict[str, int]] = dict
    # The hot list and the lists and notices sent to terminals (engine.sync).
    sync: Sync | None = None
    # Frames left for a later turn of the event loop (engine.turns).
    turns: TurnBudget | None = None


class EngineCollector(Collector):
    """Exports the engine's plain counters and gauges when scraped."""

    def __init__(self, metrics: EngineMetrics, sources: EngineSources) -> None:
        self._metrics = metrics
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics.collect_decisions()
        yield from self._writer()
        yield from self._sessions()
        yield from self._database()
        yield from self._health()
        yield from self._offline()

    def _offline(self) -> Iterator[Metric]:
        seen = dict(self._sources.offline_outcomes())
        taps = CounterMetricFamily(
            "citycard_offline_taps",
            "Taps decided offline by their terminal and uploaded, by outcome: agreed or differs (applied;"
            " the engine's own decision was the same, or not), uncollected (applied; the debt limit left"
            " part unpaid), duplicate (held already), refused, busy (upload again).",
            labels=["outcome"],
        )
        for outcome in OFFLINE_OUTCOMES:
            taps.add_metric([outcome], seen.get(outcome, 0))
        yield taps
        yield _gauge(
            "citycard_rules_version",
            "The rules version in force (terminals offline decide by it).",
            self._sources.state.rules_version,
        )
        sync = self._sources.sync
        if sync is None:
            return
        hotlist = sync.hotlist
        yield _gauge(
            "citycard_hotlist_version",
            "The newest hot-list change the engine holds: a terminal whose list is older is behind.",
            hotlist.version,
        )
        yield _gauge(
            "citycard_hotlist_cards",
            "Cards on the hot list (blocked, lost, stolen, clone suspected).",
            len(hotlist.listed),
        )
        frames = CounterMetricFamily(
            "citycard_list_frames",
            "Signed lists sent to terminals, by kind: hotlist_full (a page of the whole hot list),"
            " hotlist_changes (a page of its changes since a version), rules (a service's rules).",
            labels=["kind"],
        )
        for kind, count in dict(sync.frames_sent).items():
            frames.add_metric([kind], count)
        yield frames
        yield _counter(
            "citycard_notices",
            "NOTICE frames sent to open sessions (the hot list or rules changed).",
            sync.notices_sent,
        )

    def _writer(self) -> Iterator[Metric]:
        writer = self._sources.writer
        yield _gauge("citycard_writer_queue_depth", "Decisions queued for the writer or in flight.", writer.depth())
        yield _gauge(
            "citycard_writer_queue_capacity",
            "Decisions the writer may hold; beyond it requests are answered BUSY_RETRY.",
            self._sources.writer_queue_capacity,
        )
        yield _gauge(
            "citycard_writer_healthy",
            "1 when the writer can commit, 0 while the database is away.",
            float(writer.healthy),
        )
        batches = CounterMetricFamily(
            "citycard_batches", "Batches by outcome: committed, or failed (answered BUSY_RETRY).", labels=["outcome"]
        )
        batches.add_metric(["committed"], writer.batches_committed)
        batches.add_metric(["failed"], writer.batches_failed)
        yield batches
        yield _counter(
            "citycard_writer_connections_opened",
            "Database connections the writer opened (1 plus one per reconnection).",
            writer.connections_opened,
        )
        yield _gauge(
            "citycard_last_commit_timestamp_seconds",
            "Unix time of the last committed batch (0 before the first).",
            writer.last_commit_unix,
        )

    def _sessions(self) -> Iterator[Metric]:
        turns = self._sources.turns
        if turns is not None:
            yield _counter(
                "citycard_frames_deferred",
                "Frames decided in a later turn of the event loop than the one they arrived in (more arrived"
                " at once than a turn decides).",
                turns.deferred_frames,
            )
            yield _gauge("citycard_sessions_waiting", "Sessions with frames waiting for a later turn.", turns.waiting())
        counters = self._sources.sessions
        yield _gauge("citycard_connections_open", "Open terminal connections.", counters.connections_open)
        yield _counter("citycard_connections_accepted", "Terminal connections accepted.", counters.connections_total)
        yield _counter(
            "citycard_connections_rejected",
            "Terminal connections refused (connection limit, or the engine stopping).",
            counters.connections_rejected,
        )
        yield _counter(
            "citycard_auth_failures",
            "Handshakes refused: unknown or inactive terminal, wrong key version or proof.",
            counters.auth_failures,
        )
        errors = CounterMetricFamily(
            "citycard_protocol_errors", "ERROR frames sent (each closes its connection), by kind.", labels=["kind"]
        )
        seen = dict(counters.protocol_errors)
        for code, name in _ERROR_NAMES.items():
            errors.add_metric([name], seen.get(code, 0))
        yield errors
        rejected = CounterMetricFamily(
            "citycard_frames_rejected",
            "Frames of open sessions refused by their seal (each closes its connection), by reason.",
            labels=["reason"],
        )
        refused = dict(counters.frames_rejected)
        for reason in REJECTED_REASONS:
            rejected.add_metric([reason], refused.get(reason, 0))
        yield rejected

    def _database(self) -> Iterator[Metric]:
        pool = self._sources.pool()
        size = idle = maximum = 0
        if pool is not None:
            size, idle, maximum = pool.get_size(), pool.get_idle_size(), pool.get_max_size()
        connections = GaugeMetricFamily(
            "citycard_db_pool_connections",
            "Open connections of the look-up pool (the writer has its own), by state.",
            labels=["state"],
        )
        connections.add_metric(["in_use"], max(0, size - idle))
        connections.add_metric(["idle"], idle)
        yield connections
        yield _gauge("citycard_db_pool_connections_max", "Most connections the look-up pool may open.", maximum)
        yield _counter(
            "citycard_db_pool_waits_total",
            "Record look-ups that found no idle pool connection and waited for one.",
            self._sources.pool_waits(),
        )

    def _health(self) -> Iterator[Metric]:
        sources = self._sources
        health = sources.health
        yield _gauge("citycard_cards_loaded", "Cards held in memory.", sources.state.card_count())
        yield _gauge(
            "citycard_database_reachable",
            "1 when the last database probe (SELECT 1 every 2 s) succeeded.",
            float(health.database_reachable),
        )
        yield _gauge("citycard_ready", "1 when /readyz answers 200.", float(health.readiness().ok))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class EngineMetrics:
    """The engine's metrics in their own registry (tests run several engines)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        build = Info("citycard_build", "Engine version and fast-path implementation.", registry=registry)
        build.info({"version": __version__, "fastpath": fastpath.IMPLEMENTATION})
        self.batch_size = Histogram(
            "citycard_batch_size", "Decisions per committed batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.commit_seconds = Histogram(
            "citycard_commit_duration_seconds",
            "Time to commit one batch (one statement, synchronous commit).",
            buckets=COMMIT_BUCKETS_S,
            registry=registry,
        )
        self.request_latency = LoopHistogram(
            "citycard_request_duration_seconds",
            "TAP, TOPUP and REVERSAL: from the frame received to its reply written.",
            LATENCY_BUCKETS_S,
            registry,
        )
        self.loop_lag = LoopHistogram(
            "citycard_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 100 ms.",
            LOOP_LAG_BUCKETS_S,
            registry,
        )
        # (service id, operation, result, TapInfo bits) -> committed
        # decisions. Written by the loop only; copied whole by the scrape
        # thread, which sums it per result and splits the bits per flag. One
        # dict update a decision: most bus taps carry a flag (TRANSFER), so
        # counting each flag on the loop would cost a loop over the flags.
        self._decisions: dict[tuple[int, int, int, int], int] = {}
        self._immediate: dict[int, int] = {}
        self._services: dict[int, str] = {}
        self._http: ThreadingHTTPServer | None = None

    # --- counting, on the event loop ------------------------------------------------

    def count_decision(self, decision: Decision) -> None:
        """One committed decision (``Processor.on_result``): a dict update."""
        key = (decision.service_id, decision.kind, decision.result, decision.info)
        decisions = self._decisions
        decisions[key] = decisions.get(key, 0) + 1

    def count_immediate(self, result: int) -> None:
        """One request answered without a decision (``Processor.on_immediate``)."""
        immediate = self._immediate
        immediate[result] = immediate.get(result, 0) + 1

    def observe_commit(self, size: int, seconds: float) -> None:
        """One committed batch (``BatchWriter.on_commit_metrics``)."""
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)

    # --- wiring ------------------------------------------------------------------------

    def attach(self, sources: EngineSources, services: dict[int, str]) -> None:
        """Export the engine's own counters; ``services`` maps service ids to codes (label values)."""
        self._services = dict(services)
        self.registry.register(EngineCollector(self, sources))

    def collect_decisions(self) -> Iterator[Metric]:
        """The per-decision counters, aggregated at scrape time."""
        decisions = self._decisions.copy()
        immediate = self._immediate.copy()
        services = self._services
        requests = CounterMetricFamily(
            "citycard_requests",
            "Committed decisions on TAP, TOPUP and REVERSAL by service, operation and result.",
            labels=["service", "operation", "result"],
        )
        # Every (service, reason) from zero, so a first decline is a rate, not a new series.
        declines = {(service, reason): 0 for service in services.values() for reason in _DECLINES}
        by_result: dict[tuple[int, int, int], int] = {}
        flags: dict[tuple[int, int], int] = {}  # (service id, TapInfo bit) -> committed decisions
        for (service_id, kind, result, info), count in decisions.items():
            by_result[(service_id, kind, result)] = by_result.get((service_id, kind, result), 0) + count
            for bit in _INFO_BITS:
                if info & bit:
                    flags[(service_id, bit)] = flags.get((service_id, bit), 0) + count
        for (service_id, kind, result), count in sorted(by_result.items()):
            service = services.get(service_id, UNKNOWN_SERVICE)
            requests.add_metric([service, _OPERATION_NAMES[kind], _RESULT_NAMES[result]], count)
            if result in _DECLINES:
                declines[(service, result)] = declines.get((service, result), 0) + count
        yield requests
        by_reason = CounterMetricFamily(
            "citycard_declines", "Committed final declines by service and reason.", labels=["service", "reason"]
        )
        for (service, reason), count in declines.items():
            by_reason.add_metric([service, _RESULT_NAMES[reason]], count)
        yield by_reason
        answers = CounterMetricFamily(
            "citycard_immediate_answers",
            "Requests answered without a committed decision (busy, protocol error, sequence reused).",
            labels=["result"],
        )
        for result in _IMMEDIATE:
            answers.add_metric([_RESULT_NAMES[result]], immediate.get(result, 0))
        yield answers
        flagged = CounterMetricFamily(
            "citycard_tap_flags",
            "Committed decisions by service and TapInfo flag (concession not valid, renewal due, show ID,"
            " transfer, capped, pass used, sharing suspected, refunded).",
            labels=["service", "flag"],
        )
        for service_id, service in sorted(services.items()):
            for bit in _INFO_BITS:
                flagged.add_metric([service, _INFO_NAMES[bit]], flags.get((service_id, bit), 0))
        yield flagged

    # --- the HTTP endpoint ---------------------------------------------------------------

    def serve(self, host: str, port: int, health: EngineHealth | None = None) -> int:
        """Serve /metrics, /healthz and /readyz from daemon threads; returns the bound port."""
        handler = type("MetricsHandler", (_MetricsHandler,), {"registry": self.registry, "health": health})
        # IPv4 or IPv6, whichever the host is.
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (ThreadingHTTPServer,), {"address_family": family})
        server = server_class((host, port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="citycard-metrics", daemon=True).start()
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint (blocks until its loop exits, a fraction of a second)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _MetricsHandler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    health: EngineHealth | None
    # A client that connects and says nothing gives its thread back after this.
    timeout = 10.0

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.registry))
        elif path in ("/healthz", "/readyz"):
            if self.health is None:
                # Metrics served without an engine behind them: alive, never ready.
                if path == "/healthz":
                    self._reply(200, "application/json", b'{"ok":true,"checks":{}}')
                else:
                    self._reply(503, "application/json", b'{"ok":false,"checks":{}}')
                return
            report = self.health.liveness() if path == "/healthz" else self.health.readiness()
            self._reply(report.status, "application/json", report.to_json())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds are not news: no access log."""
