"""Reading what the metrics endpoint serves, and which metrics a query uses.

Shared by ``test_metrics.py`` (the endpoint) and ``test_observability.py``
(dashboards, alerts and a real Prometheus). HTTP calls here block: call them
with ``asyncio.to_thread`` from a test whose loop runs the engine, unless the
point is that the endpoint answers without the loop.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"

Labels = frozenset[tuple[str, str]]


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of GET http://127.0.0.1:port/path, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(port: int) -> str:
    status, body = http_get(port, "/metrics")
    assert status == 200, status
    return body.decode()


def samples(exposition: str) -> dict[tuple[str, Labels], float]:
    """Every sample of a text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(exposition: str, name: str, **labels: str) -> float:
    """The sum of sample ``name`` over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    found = [v for (n, have), v in samples(exposition).items() if n == name and wanted <= have]
    assert found, f"no sample {name}{labels or ''} in the scrape"
    return sum(found)


def sample_names(exposition: str) -> set[str]:
    return {name for name, _ in samples(exposition)}


# --- PromQL ------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+)(?:ms|s|m|h|d|w|y)*(?![\w:])")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
    | {"inf", "nan", "start", "end", "atan2"}
)


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects.

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{le="0.01"}[5m])) / on() group_left b offset 1h > 0.5'))
    ['a_bucket', 'b']
    """
    text = _STRING.sub('""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries ([5m], [$__rate_interval])
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword, a function or an aggregation
        names.add(name)
    return names


# --- Grafana dashboards and Prometheus rules ---------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, those inside rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every query of every dashboard."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield path.name, str(panel["title"]), target["expr"]


def rule_expressions(text: str) -> dict[str, str]:
    """``{alert or record name: expr}`` from a rules file as deploy/ writes them.

    Handles ``expr: <one line>`` and block scalars (``expr: |`` with the
    expression on the more-indented lines below). The Prometheus test checks
    this reading against the rules the server itself loaded.
    """
    lines = text.splitlines()
    rules: dict[str, str] = {}
    name = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        named = re.match(r"\s*(?:-\s*)?(?:alert|record):\s*(\S+)", line)
        if named:
            name = named.group(1)
        expr = re.match(r"(\s*)(?:-\s*)?expr:\s*(.*?)\s*$", line)
        index += 1
        if not expr:
            continue
        indent, inline = len(expr.group(1)), expr.group(2)
        if inline in ("|", "|-", ">", ">-"):
            block = []
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                block.append(lines[index].strip())
                index += 1
            inline = " ".join(part for part in block if part)
        rules[name] = inline.strip("'\"")
    return rules


def alert_expressions() -> dict[str, str]:
    return rule_expressions(ALERTS.read_text())
