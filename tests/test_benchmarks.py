"""The end-to-end benchmark runs and reports what it promises.

A smoke test, not a performance test: machines are noisy, so it checks the
report's shape and sanity (taps flowed, nothing failed), never a target.
It runs the benchmark as a user would, as a subprocess, against a fresh
database on the test run's PostgreSQL server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import run_json_module

# Three 1-second phases, two engine starts and a 500-card seed take ~15 s
# on the 2-core development machine (the other phases add ~15 s); the limit
# only catches a hang.
BENCHMARK_TIMEOUT_S = 240

COMMAND = [
    "--seconds",
    "1",
    "--warmup",
    "0.5",
    "--connections",
    "4",
    "--pipeline",
    "8",
    "--cards",
    "500",
    "--rate",
    "200",
]


@pytest.mark.slow
def test_end_to_end_benchmark_reports_sane_figures(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    dsn = fresh_db(migrated=False)
    code, report = run_json_module(
        "benchmarks.end_to_end",
        *COMMAND,
        *("--dsn", dsn, "--data-dir", str(tmp_path), "--plot", str(tmp_path / "curve.png")),
        *("--plot-rates", "100,300", "--burst-rates", "20,400", "--burst", "--metrics-cost", "--rules-cost"),
        timeout_s=BENCHMARK_TIMEOUT_S,
    )
    assert code == 0, report

    for key in (
        "taps_per_s",
        "p50_ms",
        "p99_ms",
        "batch_size_mean",
        "naive_taps_per_s",
        "ratio",
        "approved",
        "declined",
        "errors",
        "seconds",
        "connections",
        "pipeline",
        "cards",
        "machine",
        "versions",
        "settings",
        "open_loop",
    ):
        assert key in report, key
    assert report["taps_per_s"] > 0
    assert report["naive_taps_per_s"] > 0
    assert report["ratio"] > 0
    assert report["errors"] == 0, report
    assert report["approved"] + report["declined"] > 0
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["batch_size_mean"] >= 1
    assert (report["seconds"], report["connections"], report["pipeline"], report["cards"]) == (1.0, 4, 8, 500)
    assert report["naive"]["batch_size_mean"] == 1.0  # --naive commits one tap at a time

    open_loop = report["open_loop"]
    assert open_loop["offered_rate"] == 200
    assert open_loop["achieved_rate"] > 0
    assert 0 < open_loop["p50_ms"] <= open_loop["p99_ms"]
    assert open_loop["errors"] == 0, open_loop
    # The host-stall probe ran beside it and the taps were set against it.
    assert open_loop["host_stalls"]["probe_seconds"] > 1.5
    assert open_loop["host_stalls"]["median_unit_us"] > 0
    assert 0 <= open_loop["clear_of_host_stalls_percent"] <= 100

    # The latency curve and its plot, the burst, metrics on versus off.
    assert [point["offered_rate"] for point in report["latency_curve"]] == [100, 300]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    burst = report["burst"]
    assert [segment["rate"] for segment in burst["schedule"]] == [20, 400, 20]
    assert burst["errors"] == 0 and burst["error_detail"]["connections_lost"] == 0, burst
    assert report["metrics_off_taps_per_s"] > 0 and report["metrics_cost_percent"] is not None

    # The city's rules on versus every policy off, on the same engine: the
    # seed's version 1, then version 2 without policies, then the rules again.
    rules_off = report["rules_off"]
    assert report["rules_off_taps_per_s"] > 0
    assert isinstance(report["rules_cost_percent"], float)
    assert report["rules_engine_cpu_cost_percent"] is not None
    assert rules_off["rules_versions"] == {"on": 1, "off": 2, "on_again": 3}
    assert rules_off["errors"] == 0 and rules_off["probe_errors"] == 0, rules_off
    assert rules_off["approved"] + rules_off["declined"] > 0
    # A card taps the bus again within minutes: a transfer under the city's
    # rules, a full fare with every policy off.
    assert report["batched"]["info"].get("TRANSFER", 0) > 0, report["batched"]
    assert "TRANSFER" not in rules_off["info"], rules_off
    # Every card presents a counter, one higher at each tap: nothing looks cloned.
    phases = [report["batched"], report["naive"], report["metrics_off"], report["metrics_on_again"], rules_off]
    for phase in [*phases, open_loop, burst]:
        assert "CLONE_SUSPECTED" not in phase["results"], phase["results"]

    assert report["machine"]["cpu_count"] >= 1
    assert report["versions"]["fastpath"] in ("cython", "pure")
    assert report["versions"]["postgres"]


@pytest.mark.slow
def test_offline_upload_benchmark_reports_its_figures(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    """python -m benchmarks.offline_upload: every tap applied once, whatever
    the second pass uploads, with the online figures beside it."""
    dsn = fresh_db(migrated=False)
    code, report = run_json_module(
        "benchmarks.offline_upload",
        *("--taps", "700", "--rate", "100", "--connections", "2", "--cards", "500"),
        *("--warmup", "0.2", "--baseline", "0.5", "--dsn", dsn, "--data-dir", str(tmp_path)),
        timeout_s=BENCHMARK_TIMEOUT_S,
    )
    assert code == 0, report
    assert (report["uploaded"], report["applied"], report["duplicates_applied"]) == (700, 700, 0)
    assert report["second_pass_identical"] and report["charged_cents_match"]
    assert report["frames_per_pass"] == 3  # 256 taps a frame
    assert report["second_pass"]["outcomes"]["duplicate"] == 700
    assert report["online_p99_ms"] > 0 and report["online_objective_ms"] == 10.0
    assert report["online_errors"] == 0
    assert report["online_during_upload"]["taps"] > 0 and report["online_without_uploads"]["count"] > 0
    assert report["hotlist"]["pages"] >= 1 and report["rules_version"] == 1
    assert report["host_stalls"]["probe_seconds"] > 0  # it ran beside the online load
    assert report["versions"]["fastpath"] in ("cython", "pure")
