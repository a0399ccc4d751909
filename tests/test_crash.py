"""SIGKILL the engine under load, again and again: the bank checker finds nothing
lost, nothing doubled, every unknown resolved; and it does find the losses of
an engine that answers before its commit (the negative control).

Both run the harness as a user would (``python -m benchmarks.crash``), as a
subprocess, on a fresh database of the test run's PostgreSQL server. The
checker itself is described in ``benchmarks/crash.py`` and
``docs/reliability.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import run_json_module

# A cycle (engine start, retries, load, kill, check) takes about half a
# second on the 2-core development machine: 20 cycles in ~10-20 s. The
# limit only catches a hang.
HARNESS_TIMEOUT_S = 240

CI_CYCLES = 20
# The unsafe engine loses an acknowledged approval within a few cycles
# (usually the first or second); 30 makes a miss vanishingly unlikely.
NEGATIVE_CONTROL_CYCLES_MAX = 30


def run_harness(dsn: str, *options: str) -> tuple[int, dict[str, Any]]:
    return run_json_module("benchmarks.crash", "--dsn", dsn, *options, timeout_s=HARNESS_TIMEOUT_S)


@pytest.mark.slow
def test_crash_cycles_lose_nothing(fresh_db: Callable[..., str]) -> None:
    code, report = run_harness(fresh_db(migrated=False), "--cycles", str(CI_CYCLES), "--seed", "20")
    failures = {key: report.get(key) for key in ("first_loss", "failure_logs")}
    assert code == 0, failures
    assert report["cycles"] == CI_CYCLES
    assert report["kills"] == CI_CYCLES
    assert report["lost"] == 0, failures
    assert report["duplicated"] == 0
    assert report["below_floor"] == 0
    assert report["conserved"] is True, report["money"]
    assert report["unresolved"] == 0
    assert report["mismatched_retries"] == 0
    assert report["passed"] is True
    # The run exercised what it claims to: approvals and declines, answers
    # cut off by the kills (some already committed, some not), re-sends.
    assert report["approved"] > 0 and report["declined"] > 0
    assert report["unknown"] > 0 and report["resolved"] == report["unknown"]
    assert report["resends"] > 0
    for key in ("requests", "acknowledged", "seconds", "machine", "versions", "settings"):
        assert key in report, key


@pytest.mark.slow
def test_checker_catches_an_engine_that_answers_before_commit(fresh_db: Callable[..., str]) -> None:
    code, report = run_harness(
        fresh_db(migrated=False),
        "--unsafe",
        "--stop-at-first-loss",
        "--cycles",
        str(NEGATIVE_CONTROL_CYCLES_MAX),
        "--seed",
        "21",
    )
    assert report["settings"]["unsafe"] is True
    assert report["lost"] > 0, report
    assert report["passed"] is False
    assert code == 1
    first = report["first_loss"]
    assert isinstance(first, dict) and str(first["what"]).startswith("acknowledged"), first
    # The losses are acknowledged debits that never reached the database; the
    # database itself stays consistent (what it holds balances).
    assert report["conserved"] is True
    assert report["duplicated"] == 0
