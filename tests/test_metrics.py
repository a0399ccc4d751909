"""The metrics endpoint of a real engine: what it counts, /healthz, /readyz.

Every test runs an engine on a real database with ``metrics_port=0`` and
reads its endpoint over HTTP, as Prometheus would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine import __version__, fastpath
from engine.client import AuthenticationError
from engine.codes import ResultCode, TapInfo
from engine.db import create_pool
from engine.health import DatabaseProbe
from engine.loop_lag import LoopLagMonitor
from engine.metrics import LATENCY_BUCKETS_S, EngineMetrics
from tests.city import BUS_VALIDATOR, KIOSK, EngineUnderTest, add_card, running_engine
from tests.metrics_helpers import http_get, sample_names, samples, scrape, value

PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package 'prometheus'; scripts/install-prometheus.sh)"
)


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path, metrics_port=0) as under_test:
        yield under_test


def metrics_port(engine: EngineUnderTest) -> int:
    assert engine.engine is not None and engine.engine.metrics_port is not None
    return engine.engine.metrics_port


async def read_metrics(engine: EngineUnderTest) -> str:
    return await asyncio.to_thread(scrape, metrics_port(engine))


def fresh_seq() -> int:
    return time.time_ns() // 1000


async def test_taps_are_counted_by_service_operation_and_result(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    rich = await add_card(conn, balance=1000)
    broke = await add_card(conn, balance=0)
    await engine.restart()  # cards are loaded at start
    before = await read_metrics(engine)
    client = await engine.client()
    assert (await client.tap(fresh_seq(), rich.uid)).result == ResultCode.APPROVED
    assert (await client.tap(fresh_seq(), broke.uid)).result == ResultCode.INSUFFICIENT_FUNDS
    assert (await client.tap(fresh_seq(), 0x1)).result == ResultCode.UNKNOWN_CARD
    kiosk = await engine.client(KIOSK)
    assert (await kiosk.topup(fresh_seq(), broke.uid, 500)).result == ResultCode.APPROVED
    after = await read_metrics(engine)

    def requests(exposition: str, operation: str, result: str, service: str = "bus") -> float:
        key = (
            "citycard_requests_total",
            frozenset({"service": service, "operation": operation, "result": result}.items()),
        )
        return samples(exposition).get(key, 0.0)

    assert requests(after, "tap", "approved") - requests(before, "tap", "approved") == 1
    assert requests(after, "tap", "insufficient_funds") - requests(before, "tap", "insufficient_funds") == 1
    assert requests(after, "tap", "unknown_card") - requests(before, "tap", "unknown_card") == 1
    assert requests(after, "topup", "approved", "kiosk") - requests(before, "topup", "approved", "kiosk") == 1
    # Declines by reason, every (service, reason) exported from zero.
    assert value(after, "citycard_declines_total", service="bus", reason="insufficient_funds") == 1
    assert value(after, "citycard_declines_total", service="library", reason="already_reversed") == 0
    assert value(after, "citycard_request_duration_seconds_count") == 4
    assert value(after, "citycard_batch_size_count") >= 1
    assert value(after, "citycard_batch_size_sum") == 4
    assert value(after, "citycard_commit_duration_seconds_count") == value(after, "citycard_batch_size_count")
    assert value(after, "citycard_batches_total", outcome="committed") == value(after, "citycard_batch_size_count")
    assert value(after, "citycard_batches_total", outcome="failed") == 0
    assert time.time() - value(after, "citycard_last_commit_timestamp_seconds") < 30
    assert value(after, "citycard_connections_open") == 2
    assert value(after, "citycard_connections_accepted_total") == 2
    assert value(after, "citycard_cards_loaded") >= 2
    assert value(after, "citycard_writer_queue_depth") == 0
    assert value(after, "citycard_writer_queue_capacity") > 0
    assert value(after, "citycard_db_pool_connections_max") > 0
    assert value(after, "citycard_ready") == 1
    assert value(after, "citycard_database_reachable") == 1
    build = value(after, "citycard_build_info", version=__version__, fastpath=fastpath.IMPLEMENTATION)
    assert build == 1


async def test_labels_stay_bounded(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    """No card uid or terminal id ever becomes a label value."""
    card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    await client.tap(fresh_seq(), card.uid)
    label_names = {name for _, labels in samples(await read_metrics(engine)) for name, _ in labels}
    allowed = {
        "service",
        "operation",
        "result",
        "reason",
        "outcome",
        "kind",
        "state",
        "le",
        "version",
        "fastpath",
        "flag",
    }
    python_info = {"implementation", "major", "minor", "patchlevel"}
    assert label_names <= allowed | python_info


async def test_immediate_answers_auth_failures_and_protocol_errors(engine: EngineUnderTest) -> None:
    client = await engine.client()
    assert (await client.tap(fresh_seq(), 0x1, tap_flags=0x80)).result == ResultCode.PROTOCOL_ERROR
    with pytest.raises(AuthenticationError):
        await engine.client(BUS_VALIDATOR, key_version=9)
    exposition = await read_metrics(engine)
    assert value(exposition, "citycard_immediate_answers_total", result="protocol_error") == 1
    assert value(exposition, "citycard_immediate_answers_total", result="busy_retry") == 0
    assert value(exposition, "citycard_auth_failures_total") == 1
    assert value(exposition, "citycard_protocol_errors_total", kind="auth_failed") == 1
    assert value(exposition, "citycard_protocol_errors_total", kind="frame_too_large") == 0
    assert value(exposition, "citycard_connections_rejected_total") == 0


async def test_latency_objectives_are_bucket_edges(engine: EngineUnderTest) -> None:
    for objective in (0.005, 0.01, 0.05):
        assert objective in LATENCY_BUCKETS_S
    exposition = await read_metrics(engine)
    assert LATENCY_BUCKETS_S[0] == 0.0001 and LATENCY_BUCKETS_S[-1] >= 2.5
    for edge in ("0.005", "0.01", "0.05"):
        assert ("citycard_request_duration_seconds_bucket", frozenset({("le", edge)})) in samples(exposition)


async def test_health_and_readiness(engine: EngineUnderTest) -> None:
    port = metrics_port(engine)
    status, body = await asyncio.to_thread(http_get, port, "/healthz")
    assert status == 200 and json.loads(body)["ok"] is True
    status, body = await asyncio.to_thread(http_get, port, "/readyz")
    assert status == 200
    assert json.loads(body)["checks"] == {
        "alive": True,
        "state_loaded": True,
        "database_reachable": True,
        "writer_healthy": True,
        "accepting": True,
    }
    assert (await asyncio.to_thread(http_get, port, "/nothing-here"))[0] == 404

    running = engine.engine
    assert running is not None and running.writer is not None
    running.writer.healthy = False  # as while the database is away
    status, body = await asyncio.to_thread(http_get, port, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["writer_healthy"] is False
    assert (await asyncio.to_thread(http_get, port, "/healthz"))[0] == 200  # not ready, still alive
    assert value(await read_metrics(engine), "citycard_ready") == 0
    running.writer.healthy = True

    running.failed.set()  # the writer died on a bug: restart the process
    status, body = await asyncio.to_thread(http_get, port, "/healthz")
    assert status == 503 and json.loads(body)["checks"]["writer_running"] is False
    assert (await asyncio.to_thread(http_get, port, "/readyz"))[0] == 503
    running.failed.clear()


async def test_endpoint_answers_while_the_loop_is_blocked(engine: EngineUnderTest) -> None:
    """A scrape never waits for the event loop: here the loop itself makes the request."""
    port = metrics_port(engine)
    status, body = http_get(port, "/metrics", timeout_s=5)
    assert status == 200 and b"citycard_requests_total" in body
    assert http_get(port, "/healthz", timeout_s=5)[0] == 200


async def test_database_probe(city_dsn: str) -> None:
    pool = await create_pool(city_dsn)
    probe = DatabaseProbe(pool, timeout_s=1.0)
    assert await probe.check() is True and probe.reachable is True
    checked = probe.last_success_unix
    await pool.close()
    assert await probe.check() is False and probe.reachable is False
    assert probe.last_success_unix == checked


async def test_readiness_follows_the_database_probe(engine: EngineUnderTest) -> None:
    running = engine.engine
    assert running is not None and running._database_probe is not None
    running._database_probe.reachable = False  # as after a failed SELECT 1
    status, body = await asyncio.to_thread(http_get, metrics_port(engine), "/readyz")
    assert status == 503 and json.loads(body)["checks"]["database_reachable"] is False
    assert value(await read_metrics(engine), "citycard_database_reachable") == 0
    assert await running._database_probe.check() is True
    assert (await asyncio.to_thread(http_get, metrics_port(engine), "/readyz"))[0] == 200


async def test_stopping_the_engine_closes_the_endpoint(city_dsn: str, tmp_path: Path) -> None:
    async with running_engine(city_dsn, tmp_path, metrics_port=0) as under_test:
        port = metrics_port(under_test)
        assert (await asyncio.to_thread(http_get, port, "/healthz"))[0] == 200
    with pytest.raises(OSError):
        await asyncio.to_thread(http_get, port, "/healthz", 1.0)


async def test_loop_lag_is_measured() -> None:
    lags: list[float] = []
    monitor = LoopLagMonitor(lags.append, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # hog the loop, as a slow synchronous call would
    await asyncio.sleep(0.05)
    assert monitor.turning()
    assert max(lags) >= 0.15
    await monitor.stop()
    assert not monitor.turning()


def test_decisions_are_counted_in_a_dict_and_exported_at_scrape_time() -> None:
    """The per-tap hook is a dict update; labels are resolved once per scrape."""

    class FakeDecision:
        service_id = 7  # not named by the services table
        kind = 0
        result = int(ResultCode.CARD_NOT_ACTIVE)
        info = int(TapInfo.SHARING_SUSPECTED | TapInfo.SHOW_ID)

    metrics = EngineMetrics()
    for _ in range(1000):
        metrics.count_decision(FakeDecision())  # type: ignore[arg-type]
    families = {family.name: family for family in metrics.collect_decisions()}
    (requests,) = families["citycard_requests"].samples
    assert requests.labels == {"service": "unknown", "operation": "tap", "result": "card_not_active"}
    assert requests.value == 1000
    (declines,) = families["citycard_declines"].samples
    assert declines.labels == {"service": "unknown", "reason": "card_not_active"} and declines.value == 1000
    # Flags are exported for the services the engine knows (none here), never per unknown id.
    assert families["citycard_tap_flags"].samples == []


def test_flags_are_counted_per_service_and_flag_and_requests_per_result() -> None:
    class FakeDecision:
        service_id = 1
        kind = 0
        result = int(ResultCode.APPROVED)
        info = int(TapInfo.SHARING_SUSPECTED | TapInfo.SHOW_ID)

    class Plain(FakeDecision):
        info = 0

    class Transfer(FakeDecision):
        info = int(TapInfo.TRANSFER)

    metrics = EngineMetrics()
    metrics._services = {1: "bus", 2: "pools"}
    for decision in [FakeDecision(), Plain(), FakeDecision(), Transfer(), Plain(), FakeDecision()]:
        metrics.count_decision(decision)  # type: ignore[arg-type]
    families = {family.name: family for family in metrics.collect_decisions()}
    flagged = {(s.labels["service"], s.labels["flag"]): s.value for s in families["citycard_tap_flags"].samples}
    assert len(flagged) == 2 * 10  # every (service, flag) pair from zero
    assert flagged[("bus", "sharing_suspected")] == flagged[("bus", "show_id")] == 3
    assert flagged[("bus", "transfer")] == 1
    assert flagged[("bus", "capped")] == flagged[("pools", "show_id")] == 0
    # Whatever their flags, the decisions of one result are one series.
    (requests,) = families["citycard_requests"].samples
    assert requests.labels == {"service": "bus", "operation": "tap", "result": "approved"}
    assert requests.value == 6


@NEEDS_PROMTOOL
async def test_promtool_finds_nothing_to_lint_in_a_live_scrape(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    await client.tap(fresh_seq(), card.uid)
    exposition = await read_metrics(engine)
    assert "citycard_requests_total" in sample_names(exposition)
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", checked.stdout + checked.stderr
