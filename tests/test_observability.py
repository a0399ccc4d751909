"""deploy/: dashboards, alert rules and scrape config, checked against a real engine.

- every metric a dashboard panel or an alert uses exists in a live scrape;
- ``promtool check config``, ``check rules`` and ``test rules`` pass;
- a real Prometheus scrapes an engine under a short load, loads the alert
  rules, and every dashboard panel's query returns data from it.

Tests that need ``prometheus`` or ``promtool`` (Debian package
``prometheus``; ``scripts/install-prometheus.sh``) skip, saying so, when they
are not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.client import TerminalClient
from tests.city import BUS_VALIDATOR, KIOSK, LIBRARY_GATE, STUDENT, Card, EngineUnderTest, add_card
from tests.city import running_engine as engine_running
from tests.metrics_helpers import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARDS,
    DEPLOY,
    alert_expressions,
    dashboard_queries,
    http_get,
    metric_names,
    panels,
    rule_expressions,
    sample_names,
    scrape,
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
_INSTALL_HINT = "(Debian package 'prometheus': run scripts/install-prometheus.sh)"
NEEDS_PROMTOOL = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool is not installed {_INSTALL_HINT}")
NEEDS_PROMETHEUS = pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus is not installed {_INSTALL_HINT}")

# Series Prometheus makes itself for every target; an engine never exports them.
PROMETHEUS_MADE = {"up"}

# Grafana's $__rate_interval for a 1 s scrape: several samples per window.
RATE_INTERVAL = "10s"

# The real-Prometheus test: scrape and rule evaluation every second, and a
# load long enough for every rate() window to hold several samples.
SCRAPE_INTERVAL_S = 1
SCRAPES_UNDER_LOAD = 8


@contextlib.asynccontextmanager
async def engine_with_cards(dsn: str, data_dir: Path) -> AsyncIterator[tuple[EngineUnderTest, list[Card]]]:
    """An engine serving metrics, with cards to tap: rich, broke and a student."""
    conn = await asyncpg.connect(dsn)
    try:
        cards = [await add_card(conn, balance=90_000) for _ in range(20)]
        cards.append(await add_card(conn, balance=0))
        cards.append(await add_card(conn, balance=90_000, profile=STUDENT))
    finally:
        await conn.close()
    async with engine_running(dsn, data_dir, metrics_port=0) as under_test:
        yield under_test, cards


def metrics_port(engine: EngineUnderTest) -> int:
    assert engine.engine is not None and engine.engine.metrics_port is not None
    return engine.engine.metrics_port


# --- the files themselves ------------------------------------------------------------


def test_promql_metric_names_are_extracted() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{le="0.01", x=~"y|z"}[$__rate_interval])))'
        " / ignoring (reason) group_left sum(b_total offset 10m) > 3 * c and time() - d_seconds > 30"
        ' or absent(up{job="citycard"}) unless max_over_time(e[1m:10s])'
    )
    assert metric_names(expression) == {"a_seconds_bucket", "b_total", "c", "d_seconds", "up", "e"}


def test_rules_are_read_whole() -> None:
    rules = alert_expressions()
    assert len(rules) == len(re.findall(r"^\s*- alert:", ALERTS.read_text(), re.MULTILINE)) >= 9
    assert all(metric_names(expression) for expression in rules.values())
    inline = rule_expressions("  - record: r\n    expr: sum(x)\n  - alert: A\n    expr: |\n      y\n      > 1\n")
    assert inline == {"r": "sum(x)", "A": "y > 1"}


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert set(alert_expressions()) <= tested


def test_dashboards_are_well_formed() -> None:
    assert {path.name for path in DASHBOARDS} == {"citycard-overview.json", "citycard-writer.json"}
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in panels(dashboard):
            position = panel["gridPos"]
            assert position["x"] + position["w"] <= 24, f"{path.name}: {panel['title']} is off the grid"
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel.get("description"), f"{path.name}: panel without title or description"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(target["expr"] for target in panel["targets"]), panel["title"]
    assert len(uids) == len(DASHBOARDS)
    provider = (DEPLOY / "grafana" / "provisioning" / "dashboards" / "citycard.yml").read_text()
    assert "path: /var/lib/grafana/dashboards/citycard" in provider
    datasource = (DEPLOY / "grafana" / "provisioning" / "datasources" / "citycard.yml").read_text()
    assert "uid: citycard-prometheus" in datasource and "type: prometheus" in datasource


def test_the_overview_shows_what_the_issue_asks_for() -> None:
    """Taps by service and result, p50/p95/p99, declines by reason, batch size,
    commit latency, connections, errors."""
    queries = " ".join(expr for name, _, expr in dashboard_queries() if name == "citycard-overview.json")
    for needed in (
        "sum by (service, result) (rate(citycard_requests_total",
        "histogram_quantile(0.5, sum by (le) (rate(citycard_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(citycard_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(citycard_request_duration_seconds_bucket",
        "sum by (reason) (rate(citycard_declines_total",
        "citycard_batch_size",
        "citycard_commit_duration_seconds_bucket",
        "citycard_connections_open",
        "citycard_protocol_errors_total",
        "citycard_auth_failures_total",
    ):
        assert needed in queries, needed


async def test_every_metric_of_the_dashboards_and_alerts_exists_in_a_live_scrape(city_dsn: str, tmp_path: Path) -> None:
    async with engine_with_cards(city_dsn, tmp_path) as (engine, cards):
        client = await engine.client()
        await client.tap(time.time_ns() // 1000, cards[0].uid)
        exported = sample_names(await asyncio.to_thread(scrape, metrics_port(engine)))
    used: dict[str, set[str]] = {}
    for name, title, expression in dashboard_queries():
        for metric in metric_names(expression):
            used.setdefault(metric, set()).add(f"{name}: {title}")
    for alert, expression in alert_expressions().items():
        for metric in metric_names(expression):
            used.setdefault(metric, set()).add(f"alert {alert}")
    assert {"citycard_requests_total", "citycard_request_duration_seconds_bucket"} <= set(used)
    missing = {metric: sorted(where) for metric, where in used.items() if metric not in exported | PROMETHEUS_MADE}
    assert missing == {}, f"used but not exported: {missing}"


# --- promtool ----------------------------------------------------------------------------


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *arguments], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


@NEEDS_PROMTOOL
def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", "prometheus/alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_expressions())} rules found" in checked.stdout


@NEEDS_PROMTOOL
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    tested = promtool("test", "rules", "prometheus/alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@NEEDS_PROMTOOL
def test_promtool_checks_the_scrape_config() -> None:
    checked = promtool("check", "config", "prometheus/prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- a real Prometheus ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def prometheus_server(directory: Path, target_port: int) -> Iterator[int]:
    """A Prometheus scraping one engine every second, with deploy/'s alert rules."""
    assert PROMETHEUS is not None
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        "  - job_name: citycard\n"
        f'    static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]\n'
    )
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def prometheus_api(port: int, path: str, **parameters: str) -> Any:
    query = urllib.parse.urlencode(parameters)
    status, body = await asyncio.to_thread(http_get, port, f"/api/v1/{path}?{query}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (path, parameters, answer)
    return answer["data"]


async def query(port: int, expression: str) -> list[Any]:
    data = await prometheus_api(port, "query", query=expression, time=f"{time.time():.3f}")
    result = data["result"]
    return list(result) if data["resultType"] == "vector" else [{"value": result}]


async def scrapes(port: int) -> float:
    result = await query(port, 'count_over_time(up{job="citycard"}[1m])')
    return float(result[0]["value"][1]) if result else 0.0


async def tap_steadily(engine: EngineUnderTest, cards: list[Card], stop: asyncio.Event) -> int:
    """Taps at a few hundred a second from a validator, a gate and a kiosk, until ``stop``."""
    validator = await engine.client(BUS_VALIDATOR)
    gate = await engine.client(LIBRARY_GATE)
    kiosk = await engine.client(KIOSK)
    sequence = time.time_ns() // 1000
    answered = 0

    async def one(client: TerminalClient, card_uid: int, topup: bool = False) -> None:
        nonlocal sequence, answered
        sequence += 1
        if topup:
            await client.topup(sequence, card_uid, 100)
        else:
            await client.tap(sequence, card_uid)
        answered += 1

    round_number = 0
    while not stop.is_set():
        round_number += 1
        requests = [one(validator, card.uid) for card in cards]  # rich ones approved, the broke one declined
        requests.append(one(validator, 0x1))  # unknown card
        requests.extend(one(gate, card.uid) for card in cards[-3:])  # the student is not served at libraries
        if round_number % 5 == 0:
            requests.append(one(kiosk, cards[-2].uid, topup=True))
        await asyncio.gather(*requests)
        await asyncio.sleep(0.02)
    return answered


@NEEDS_PROMETHEUS
async def test_a_real_prometheus_gets_data_for_every_panel_and_loads_the_alerts(city_dsn: str, tmp_path: Path) -> None:
    async with engine_with_cards(city_dsn, tmp_path) as (engine, cards):
        with prometheus_server(tmp_path, metrics_port(engine)) as port:
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(_ready, port)) is False:
                assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                await asyncio.sleep(0.2)
            stop = asyncio.Event()
            load = asyncio.create_task(tap_steadily(engine, cards, stop))
            try:
                # Prometheus hands new targets to its scrapers every 5 s: wait
                # for enough scrapes under load, not for a fixed time.
                deadline = time.monotonic() + 40
                while await scrapes(port) < SCRAPES_UNDER_LOAD:
                    assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
                    await asyncio.sleep(0.5)
                empty = []
                for dashboard, title, expression in dashboard_queries():
                    result = await query(port, expression.replace("$__rate_interval", RATE_INTERVAL))
                    values = [float(series["value"][1]) for series in result]
                    if not any(math.isfinite(v) for v in values):
                        empty.append(f"{dashboard}: {title}: {expression} -> {result}")
                assert empty == [], "panels without data:\n" + "\n".join(empty)
            finally:
                stop.set()
                answered = await load
            assert answered > 500

            exported = sample_names(await asyncio.to_thread(scrape, metrics_port(engine)))
            rules = await prometheus_api(port, "rules", type="alert")
            loaded = {rule["name"]: rule for group in rules["groups"] for rule in group["rules"]}
            expected = alert_expressions()
            assert set(loaded) == set(expected)
            for name, rule in loaded.items():
                # Prometheus's own reading of each rule selects the same metrics as ours, all exported.
                assert metric_names(rule["query"]) == metric_names(expected[name]), name
                assert metric_names(rule["query"]) <= exported | PROMETHEUS_MADE, name
                assert rule["health"] == "ok", (name, rule.get("lastError"))
            firing = await query(port, 'ALERTS{alertstate="firing", alertname="CitycardEngineDown"}')
            assert firing == []


def _ready(port: int) -> bool:
    try:
        return http_get(port, "/-/ready", timeout_s=1.0)[0] == 200
    except OSError:
        return False
