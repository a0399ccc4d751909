"""A flood of idle connections and slow writers: each closed by its deadline,
memory bounded, real terminals served (benchmarks/flood.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import run_json_module

# Handshake deadline (5 s) plus the harness's slack and set-up.
FLOOD_TIMEOUT_S = 180


@pytest.mark.slow
def test_flood_is_closed_by_deadline_and_terminals_are_served(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    dsn = fresh_db(migrated=False)
    code, report = run_json_module(
        "benchmarks.flood",
        "--idle",
        "400",
        "--slow",
        "40",
        "--dsn",
        dsn,
        "--data-dir",
        str(tmp_path),
        timeout_s=FLOOD_TIMEOUT_S,
    )
    assert code == 0, report
    assert report["closed_by_deadline"] == 440 and report["not_closed"] == 0
    assert report["max_close_after_s"] <= report["handshake_deadline_s"] + 2
    assert report["terminal_taps"] > 0 and report["terminal_errors"] == 0
    # Bounded memory: a few KiB per open connection, not the 16 KiB frame
    # buffer each could claim (measured ~2.5 KiB).
    assert report["rss_per_connection_kb"] < 64
