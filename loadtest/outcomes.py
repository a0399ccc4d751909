"""Business outcomes of a run: approvals and declines by service class.

Locust counts requests and failures; a declined tap (INSUFFICIENT_FUNDS,
UNKNOWN_CARD, ...) is a correct answer, not a failure, so the outcomes are
counted here instead: ``(service class, operation, result name) -> count``.
Workers send their counts to the master with each stats report, the master
(or a local run) logs a table at the end, writes ``<csv prefix>_outcomes.csv``
when ``--csv`` is given, and serves the counts as JSON at
``/citycard/outcomes`` in the web UI.

Example::

    install(environment)          # once, from the locustfile's init hook
    record("bus", "TAP", "APPROVED")
    totals()                      # {('bus', 'TAP', 'APPROVED'): 1}
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from typing import Any

from locust.env import Environment

log = logging.getLogger("citycard.loadtest")

Key = tuple[str, str, str]

_REPORT_KEY = "citycard_outcomes"

_pending: Counter[Key] = Counter()  # this process's counts not yet sent to the master
_totals: Counter[Key] = Counter()  # everything seen (local run or master)


def record(service_class: str, operation: str, result: str) -> None:
    """Count one answer."""
    key = (service_class, operation, result)
    _pending[key] += 1
    _totals[key] += 1


def totals() -> dict[Key, int]:
    """Counts so far: this process's in a local run, all workers' on the master."""
    return dict(_totals)


def install(environment: Environment) -> None:
    """Wire the counts into locust's worker reports, end of run and web UI."""
    events = environment.events

    @events.report_to_master.add_listener
    def _send(client_id: str, data: dict[str, Any]) -> None:
        data[_REPORT_KEY] = [[*key, count] for key, count in _pending.items()]
        _pending.clear()

    @events.worker_report.add_listener
    def _receive(client_id: str, data: dict[str, Any]) -> None:
        for service_class, operation, result, count in data.get(_REPORT_KEY, ()):
            _totals[(service_class, operation, result)] += count

    @events.test_start.add_listener
    def _reset(environment: Environment, **_: Any) -> None:
        _pending.clear()
        _totals.clear()

    @events.quitting.add_listener
    def _report(environment: Environment, **_: Any) -> None:
        if environment.parsed_options is not None and environment.parsed_options.worker:
            return
        rows = sorted(_totals.items())
        if not rows:
            return
        lines = [f"  {cls:<10} {op:<9} {result:<24} {count:>9}" for (cls, op, result), count in rows]
        log.info("citycard outcomes (class, operation, result, count):\n%s", "\n".join(lines))
        prefix = getattr(environment.parsed_options, "csv_prefix", None)
        if prefix:
            with open(f"{prefix}_outcomes.csv", "w", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                writer.writerow(["Class", "Operation", "Result", "Count"])
                writer.writerows([*key, count] for key, count in rows)

    if environment.web_ui is not None and environment.web_ui.app is not None:

        @environment.web_ui.app.route("/citycard/outcomes")
        def _outcomes() -> dict[str, Any]:
            return {"outcomes": [[*key, count] for key, count in sorted(_totals.items())]}
