"""The fast-path benchmark runs, and the city's rules really decide its taps.

A smoke test, not a performance test: machines are noisy, so it checks the
report's shape and sanity (both twins timed with the rules on and off, the
rules fired in the rules-on round and not in the other), never a target.
It runs the benchmark as a user would, as a subprocess, on a small city.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.twins import extensions_disabled

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

# A 5,000-card city and a day of 2,000 taps, one round of each twin with the
# rules on and off, take ~1 s; the limit only catches a hang.
BENCHMARK_TIMEOUT_S = 120

TAPS = 2000
COMMAND = ["--taps", str(TAPS), "--rounds", "1", "--cards", "5000", "--json"]

# The info flags only a rule sets (CONCESSION_NOT_VALID is the holder's
# eligibility, which no policy switches off).
RULE_FLAGS = {"TRANSFER", "CAPPED", "SHOW_ID", "RENEWAL_DUE", "SHARING_SUSPECTED"}
RULE_DECLINES = {"ALREADY_VALIDATED", "MINIMUM_BALANCE"}


def test_fastpath_benchmark_times_both_twins_with_the_rules_on_and_off() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.fastpath", *COMMAND],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=BENCHMARK_TIMEOUT_S,
    )
    if completed.returncode == 2 and "not built" in completed.stderr and extensions_disabled():
        pytest.skip("the benchmark compares the compiled twin, which is not built")
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stdout
    report = orjson.loads(lines[0])

    for key in (
        "cython_ns_per_tap",
        "pure_ns_per_tap",
        "cython_ns_per_tap_rules_off",
        "pure_ns_per_tap_rules_off",
    ):
        assert report[key] > 0, key
    assert isinstance(report["rules_cost_percent"], float)
    assert report["taps"] == TAPS and report["rounds"] == 1
    assert report["settings"]["rules"]["file"] == "rules/gijon.toml"
    assert report["machine"]["cpu_count"] >= 1

    rules_on, rules_off = report["results"], report["results_rules_off"]
    assert sum(rules_on["by_code"].values()) == sum(rules_off["by_code"].values()) == TAPS
    # The rules decided taps: transfers or capped fares with them on...
    assert rules_on["by_info"].get("TRANSFER", 0) + rules_on["by_info"].get("CAPPED", 0) > 0, rules_on
    # ...and nothing only a rule decides with them off.
    assert not RULE_FLAGS & set(rules_off["by_info"]), rules_off
    assert not RULE_DECLINES & set(rules_off["by_code"]), rules_off
