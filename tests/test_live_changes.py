"""Concession eligibility and rules versions, changed while the engine runs.

Each change is committed the way the card office's commands commit it (one
transaction ending in a NOTIFY); the very next tap must see it, without a
restart. The record of each tap says which rules version decided it, which
profile's fare applied, and why (``taps.info``).
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
from engine.live import ELIGIBILITY_CHANNEL
from engine.state import STANDARD_PROFILE
from tests.city import (
    BUS_FARE,
    BUS_FARE_STUDENT,
    BUS_RULES,
    STUDENT,
    EngineUnderTest,
    add_card,
    load_city_rules,
    running_engine,
)

TODAY = datetime.datetime.now(datetime.UTC).date()
DAY = datetime.timedelta(days=1)
# The live listener applies a notice within milliseconds; this only bounds a hang.
APPLY_TIMEOUT_S = 5.0


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path) as under_test:
        yield under_test


def fresh_seq() -> int:
    return time.time_ns() // 1000


async def applied_after(engine: EngineUnderTest, before: int) -> None:
    """Wait until the engine has applied one more notice than ``before``."""
    live = engine.engine._live  # type: ignore[union-attr]
    assert live is not None
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while live.applied <= before:
        assert time.monotonic() < deadline, "the engine did not apply the change"
        await asyncio.sleep(0.005)


def applied_count(engine: EngineUnderTest) -> int:
    live = engine.engine._live  # type: ignore[union-attr]
    assert live is not None
    return live.applied


async def recorded(conn: asyncpg.Connection, seq: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT result, amount_cents, fare_profile, info, rules_version FROM taps WHERE terminal_seq = $1", seq
    )
    assert row is not None
    return row


async def set_eligibility(
    conn: asyncpg.Connection, holder_id: int, valid_from: datetime.date, until: datetime.date
) -> None:
    """As ``citycard eligibility import`` does it: an import row, the periods, a notice."""
    async with conn.transaction():
        import_id = await conn.fetchval(
            "INSERT INTO eligibility_imports (file_name, sha256, rows, imported_by)"
            " VALUES ('registry.csv', repeat('0', 64), 1, 'test') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO eligibility (holder_id, profile_id, source, valid_from, valid_until, import_id)"
            " VALUES ($1, $2, 'enrolment', $3, $4, $5)"
            " ON CONFLICT (holder_id, profile_id) DO UPDATE SET valid_from = EXCLUDED.valid_from,"
            " valid_until = EXCLUDED.valid_until, import_id = EXCLUDED.import_id",
            holder_id,
            STUDENT,
            valid_from,
            until,
            import_id,
        )
        await conn.execute("SELECT pg_notify($1, $2)", ELIGIBILITY_CHANNEL, str(import_id))


async def test_an_expired_concession_pays_the_standard_fare_and_says_why(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000, profile=STUDENT, eligible=(TODAY - 400 * DAY, TODAY - DAY))
    await engine.restart()
    client = await engine.client()
    seq = fresh_seq()
    result = await client.tap(seq, card.uid)
    assert (result.result, result.amount_cents) == (ResultCode.APPROVED, BUS_FARE)
    row = await recorded(conn, seq)
    assert row["fare_profile"] == STANDARD_PROFILE
    assert row["info"] == TapInfo.CONCESSION_NOT_VALID


async def test_a_concession_ending_soon_warns(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000, profile=STUDENT, eligible=(TODAY - 400 * DAY, TODAY + 3 * DAY))
    await engine.restart()
    client = await engine.client()
    seq = fresh_seq()
    result = await client.tap(seq, card.uid)
    assert (result.result, result.amount_cents) == (ResultCode.APPROVED, BUS_FARE_STUDENT)
    row = await recorded(conn, seq)
    assert (row["fare_profile"], row["info"]) == (STUDENT, TapInfo.RENEWAL_DUE)


async def test_eligibility_renewed_and_ended_live(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=5000, profile=STUDENT, eligible=None)
    await engine.restart()
    client = await engine.client()
    # No eligibility yet: standard fare.
    assert (await client.tap(fresh_seq(), card.uid)).amount_cents == BUS_FARE

    before = applied_count(engine)
    await set_eligibility(conn, card.account_id, TODAY - DAY, TODAY + 365 * DAY)
    await applied_after(engine, before)
    seq = fresh_seq()
    assert (await client.tap(seq, card.uid)).amount_cents == BUS_FARE_STUDENT
    assert (await recorded(conn, seq))["info"] == 0

    # The registry ends it (yesterday): the very next tap pays the standard fare.
    before = applied_count(engine)
    await set_eligibility(conn, card.account_id, TODAY - 30 * DAY, TODAY - DAY)
    await applied_after(engine, before)
    seq = fresh_seq()
    assert (await client.tap(seq, card.uid)).amount_cents == BUS_FARE
    assert (await recorded(conn, seq))["info"] == TapInfo.CONCESSION_NOT_VALID


def bus_at(fare: int) -> str:
    """The bus's rules table with another standard fare."""
    return BUS_RULES.replace(f"standard = {BUS_FARE}", f"standard = {fare}")


async def test_a_new_rules_version_decides_the_next_tap(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=5000)
    await engine.restart()
    client = await engine.client()
    seq = fresh_seq()
    assert (await client.tap(seq, card.uid)).amount_cents == BUS_FARE
    version = (await recorded(conn, seq))["rules_version"]

    new_fare = BUS_FARE + 20
    before = applied_count(engine)
    next_version = await load_city_rules(conn, bus=bus_at(new_fare), name="a dearer bus")
    try:
        await applied_after(engine, before)
        seq = fresh_seq()
        assert (await client.tap(seq, card.uid)).amount_cents == new_fare
        assert (await recorded(conn, seq))["rules_version"] == next_version > version
    finally:
        # Later tests in this module expect the usual fare.
        await load_city_rules(conn)


async def test_a_notice_lost_while_the_listener_was_down_is_caught_up(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=90_000, profile=STUDENT, eligible=None)
    await engine.restart()
    client = await engine.client()
    assert (await client.tap(fresh_seq(), card.uid)).amount_cents == BUS_FARE
    # An import whose notice never arrives (as if sent while the engine's
    # listening connection was down)...
    async with conn.transaction():
        import_id = await conn.fetchval(
            "INSERT INTO eligibility_imports (file_name, sha256, rows, imported_by)"
            " VALUES ('registry.csv', repeat('0', 64), 1, 'test') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO eligibility (holder_id, profile_id, source, valid_from, valid_until, import_id)"
            " VALUES ($1, $2, 'enrolment', $3, $4, $5)",
            card.account_id,
            STUDENT,
            TODAY - DAY,
            TODAY + 365 * DAY,
            import_id,
        )
    # ...then the listening connection drops: the engine reconnects and catches up.
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'citycard-live'"
    )
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while True:
        if (await client.tap(fresh_seq(), card.uid)).amount_cents == BUS_FARE_STUDENT:
            break
        assert time.monotonic() < deadline, "the missed import was never applied"
        await asyncio.sleep(0.05)
    # The catch-up counts as an applied change: a test (or a log reader)
    # waiting for one is not left waiting for a notice that never comes.
    assert applied_count(engine) == 1
