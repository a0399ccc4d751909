"""Prometheus metrics, counted cheaply.

The hot path never touches a prometheus-client object per tap: results are
counted per committed batch with pre-bound label children, and gauges that
mirror engine state (queue depth, connections) are read at scrape time
through callbacks. The HTTP endpoint runs in prometheus-client's own thread,
so a scrape never blocks the event loop.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from engine import __version__, fastpath
from engine.codes import OperationKind, ResultCode
from engine.decision import Decision

# Latency objectives (docs/performance.md) are bucket edges, so the ratio of
# requests within each objective is exact, not interpolated.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.010, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.010, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


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
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for edge, count in zip(self.edges, counts, strict=False):
            cumulative += count
            buckets.append((repr(float(edge)), cumulative))
        cumulative += counts[-1]
        buckets.append(("+Inf", cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.total)


class EngineMetrics:
    """The engine's metrics in their own registry (tests run several engines)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        build = Info("citycard_build", "Engine version and fast-path implementation.", registry=registry)
        build.info({"version": __version__, "fastpath": fastpath.IMPLEMENTATION})
        self.requests = Counter(
            "citycard_requests_total",
            "Decided requests by operation and result.",
            ["operation", "result"],
            registry=registry,
        )
        self.immediate = Counter(
            "citycard_immediate_answers_total",
            "Requests answered without a decision (busy, protocol error, sequence reused).",
            ["result"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "citycard_batch_size", "Decisions per committed batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.commit_seconds = Histogram(
            "citycard_commit_duration_seconds",
            "Time to commit one batch.",
            buckets=COMMIT_BUCKETS_S,
            registry=registry,
        )
        self.request_latency = LoopHistogram(
            "citycard_request_duration_seconds",
            "TAP, TOPUP and REVERSAL: from the frame received to its reply written.",
            LATENCY_BUCKETS_S,
            registry,
        )
        self.last_commit = Gauge(
            "citycard_last_commit_timestamp_seconds", "Unix time of the last successful commit.", registry=registry
        )
        # Pre-bound children: labels resolved once, not per tap.
        self._children: dict[tuple[int, int], Counter] = {
            (kind, result): self.requests.labels(OperationKind(kind).name.lower(), ResultCode(result).name.lower())
            for kind in OperationKind
            for result in ResultCode
        }
        self._immediate_children: dict[int, Counter] = {
            result: self.immediate.labels(ResultCode(result).name.lower()) for result in ResultCode
        }

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a value the engine already keeps, read at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def count_decision(self, decision: Decision) -> None:
        self._children[(decision.kind, decision.result)].inc()

    def count_immediate(self, result: int) -> None:
        self._immediate_children[result].inc()

    def observe_commit(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)
        self.last_commit.set(time.time())

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
