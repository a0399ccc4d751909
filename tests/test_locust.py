"""The locust load suite (loadtest/): its traffic model, and a short run.

The run is what an engineer or CI does: ``citycard serve`` in a subprocess
on a small seeded city, then locust headless in another subprocess for a few
seconds. Importing locust monkey-patches the process with gevent, which
would break the asyncio tests sharing this pytest process, so nothing here
imports ``locust`` or ``loadtest.locustfile``/``loadtest.shapes``; their
doctests run in a child process.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.seed import SERVICES
from loadtest.city import (
    CLASS_OF_SERVICE,
    CLASS_PERMILLE,
    SERVICE_CLASSES,
    Card,
    CardPicker,
    class_of_slot,
    class_rate,
)

REPO = Path(__file__).resolve().parent.parent
CLASSES = {group.name for group in SERVICE_CLASSES}
# Seconds for serve to print its banner, and for locust to start, run and stop.
START_TIMEOUT_S = 60
RUN_SECONDS = 4
RUN_TIMEOUT_S = 60


# --- the traffic model --------------------------------------------------------------------


def test_every_service_is_in_exactly_one_class() -> None:
    listed = [code for group in SERVICE_CLASSES for code in group.services]
    assert sorted(listed) == sorted(service.code for service in SERVICES)
    assert sum(CLASS_PERMILLE.values()) == 1000
    assert CLASS_PERMILLE["bus"] == 750


def test_the_first_users_cover_every_class_and_later_ones_follow_the_weights() -> None:
    assert {class_of_slot(slot)[0] for slot in range(len(CLASSES))} == CLASSES
    users = Counter(class_of_slot(slot)[0] for slot in range(1000))
    for name, permille in CLASS_PERMILLE.items():
        assert abs(users[name] - permille) <= len(CLASSES)
    ranks = [class_of_slot(slot) for slot in range(200)]
    assert len(set(ranks)) == len(ranks), "two slots would share a terminal"


@pytest.mark.parametrize("users", [5, 8, 13, 100])
def test_pacing_gives_the_city_mix_whatever_the_user_count(users: int) -> None:
    by_class = Counter(class_of_slot(slot)[0] for slot in range(users))
    rates = {name: class_rate(name, dict(by_class), 10.0) * count for name, count in by_class.items()}
    assert sum(rates.values()) == pytest.approx(10.0 * users)
    for name, rate in rates.items():
        assert rate / sum(rates.values()) == pytest.approx(CLASS_PERMILLE[name] / 1000)


def test_card_popularity_is_skewed_but_spread() -> None:
    cards = [Card(uid, 0, 1000) for uid in range(1000)]
    picker = CardPicker(cards, skew=0.8)
    rng = random.Random(1)
    draws = Counter(picker.draw(rng).uid for _ in range(20_000))
    top_ten = sum(draws[uid] for uid in range(10))
    assert 0.10 < top_ten / 20_000 < 0.40  # uniform would be 0.01
    assert len(draws) > 500


def test_doctests_of_the_load_suite() -> None:
    """Run where importing locust cannot disturb this process."""
    code = (
        "import doctest, sys, loadtest.city, loadtest.shapes\n"
        "sys.exit(sum(doctest.testmod(m).failed for m in (loadtest.city, loadtest.shapes)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- a run --------------------------------------------------------------------------------


@pytest.fixture
def engine_address(seeded_dsn: str, tmp_path: Path) -> Iterator[str]:
    """``citycard serve`` on the seeded city, on a port of its choosing."""
    serve = ["serve", "--listen", "127.0.0.1:0", "--metrics", "off", "--admin", "off", "--dsn", seeded_dsn]
    serve += ["--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *serve],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        address = ""
        while not address and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited ({process.wait()}): {process.stderr.read()}")  # type: ignore[union-attr]
            if "listening" in line:
                address = json.loads(line)["listening"]
        assert address, "serve printed no listening line"
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_a_short_run_has_no_failures_and_reaches_every_class(
    seeded_dsn: str, tmp_path: Path, engine_address: str
) -> None:
    prefix = tmp_path / "run"
    # More retries, reversals and bad cards than the defaults, so that a few
    # seconds exercise every path.
    run = ["--headless", "-u", "8", "-r", "8", "-t", f"{RUN_SECONDS}s", "--host", f"tcp://{engine_address}"]
    city = ["--dsn", seeded_dsn, "--data-dir", str(tmp_path)]
    report = ["--csv", str(prefix), "--only-summary", "--exit-code-on-error", "1", "--loglevel", "WARNING"]
    mix = ["--rate", "10", "--retry-permille", "100", "--reversal-permille", "50", "--bad-card-permille", "100"]
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", *run, *city, *report, *mix],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with open(f"{prefix}_stats.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    assert int(total["Failure Count"]) == 0
    assert int(total["Request Count"]) >= 100
    work = {row["Name"]: int(row["Request Count"]) for row in rows if row["Type"] in ("TAP", "TOPUP")}
    by_class: Counter[str] = Counter()
    for name, count in work.items():
        by_class[CLASS_OF_SERVICE[name]] += count
    assert set(by_class) == CLASSES
    assert 0.6 <= by_class["bus"] / sum(by_class.values()) <= 0.9  # three quarters, give or take a short run

    with open(f"{prefix}_outcomes.csv", newline="") as file:
        outcomes = {(row["Class"], row["Operation"], row["Result"]): int(row["Count"]) for row in csv.DictReader(file)}
    seen = {(operation, answer) for (_, operation, answer) in outcomes}
    assert ("TOPUP", "APPROVED") in seen
    assert ("TAP", "UNKNOWN_CARD") in seen
    assert any(operation == "RETRY" for operation, _ in seen)
    assert not any(answer in ("SEQUENCE_REUSED", "PROTOCOL_ERROR", "BUSY_RETRY") for _, answer in seen)

    status = subprocess.run(
        [sys.executable, "-m", "engine.cli", "status", "--dsn", seeded_dsn, "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["ledger_balanced"] is True
