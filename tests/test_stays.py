"""A stay paid by the hour, end to end: entry, exit, the books and the report.

The tiny city's library becomes a per-duration service by a rules version
loaded while the engine runs (as a city would for a car park): the entry tap
takes the maximum charge, the exit returns what the stay did not use, the
ledger balances, ``citycard reconcile`` finds every tap in the books, and
the day's report counts the return as a refund.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine.codes import ResultCode, TapInfo
from engine.reports import daily_report, reconcile
from tests.city import LIBRARY_GATE, EngineUnderTest, add_card, balance_of, load_city_rules, running_engine

HOURLY_FARE, MAXIMUM = 50, 600
APPLY_TIMEOUT_S = 5.0


# The library as a car park would be: paid per started hour, with a maximum.
PAID_LIBRARY = f"""
[[services]]
code = "library"
kind = "per_duration"
fares = {{ standard = {HOURLY_FARE} }}
max_charge_cents = {MAXIMUM}
"""


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path) as under_test:
        yield under_test


async def test_a_stay_is_charged_by_the_hour_and_the_books_agree(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=5000)
    await engine.restart()
    version = await load_city_rules(conn, library=PAID_LIBRARY, name="library paid by the hour")
    assert engine.engine is not None and engine.engine.state is not None
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while engine.engine.state.rules_version != version:
        assert time.monotonic() < deadline, "the rules version did not take effect"
        await asyncio.sleep(0.01)

    client = await engine.client(LIBRARY_GATE)
    seq = time.time_ns() // 1000
    entry = await client.tap(seq, card.uid)
    assert (entry.result, entry.amount_cents, entry.balance_cents) == (ResultCode.APPROVED, MAXIMUM, 5000 - MAXIMUM)
    exit_ = await client.tap(seq + 1, card.uid, tap_flags=0x01)
    # Under an hour: one hour's fare is kept, the rest returns.
    assert (exit_.result, exit_.amount_cents, exit_.info) == (
        ResultCode.APPROVED,
        MAXIMUM - HOURLY_FARE,
        TapInfo.REFUNDED,
    )
    assert exit_.balance_cents == 5000 - HOURLY_FARE
    assert await balance_of(conn, card.account_id) == 5000 - HOURLY_FARE

    result = await reconcile(conn)
    assert result.ok, result
    report = await daily_report(conn, datetime.datetime.now(datetime.UTC).date())
    (library,) = [line for line in report.services if line.service == "library"]
    assert library.fare_cents >= MAXIMUM and library.refund_cents >= MAXIMUM - HOURLY_FARE


async def test_a_stay_open_across_a_restart_is_settled_at_its_exit(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=5000)
    await engine.restart()
    await load_city_rules(conn, library=PAID_LIBRARY, name="library paid by the hour")
    await engine.restart()  # the new version from the start, and an empty memory of cards
    client = await engine.client(LIBRARY_GATE)
    seq = time.time_ns() // 1000
    assert (await client.tap(seq, card.uid)).amount_cents == MAXIMUM
    await engine.restart()
    client = await engine.client(LIBRARY_GATE)
    exit_ = await client.tap(seq + 1, card.uid, tap_flags=0x01)
    assert (exit_.amount_cents, exit_.info) == (MAXIMUM - HOURLY_FARE, TapInfo.REFUNDED)
    assert await balance_of(conn, card.account_id) == 5000 - HOURLY_FARE
    assert (await reconcile(conn)).ok
