"""TAP_RESULT's ``info``: the terminal hears why, and hears it again on a retry.

A student whose concession has ended pays the standard fare; the reply says
so (``TapInfo.CONCESSION_NOT_VALID``), so that the validator can tell the
holder instead of leaving them to wonder about the price. ``info`` is part of
the decision: a retry of the same sequence gets the same bits, whether the
engine still remembers the answer or reads it back from its record after a
restart.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine.codes import ResultCode, TapInfo
from tests.city import BUS_FARE, STUDENT, EngineUnderTest, add_card, running_engine

TODAY = datetime.datetime.now(datetime.UTC).date()
DAY = datetime.timedelta(days=1)


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path) as under_test:
        yield under_test


def fresh_seq() -> int:
    return time.time_ns() // 1000


async def test_an_ended_concession_is_told_to_the_terminal_and_replayed_after_a_restart(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000, profile=STUDENT, eligible=(TODAY - 400 * DAY, TODAY - DAY))
    await engine.restart()  # the engine loads the new card
    client = await engine.client()
    seq = fresh_seq()
    when = time.time_ns() // 1_000_000  # a retry is the same request: same time
    first = await client.tap(seq, card.uid, event_time_ms=when)
    assert (first.result, first.amount_cents, first.balance_cents) == (ResultCode.APPROVED, BUS_FARE, 1000 - BUS_FARE)
    assert first.info == TapInfo.CONCESSION_NOT_VALID
    assert await conn.fetchval("SELECT info FROM taps WHERE terminal_seq = $1", seq) == TapInfo.CONCESSION_NOT_VALID

    # Remembered by the running engine...
    assert await client.tap(seq, card.uid, event_time_ms=when) == first

    # ...and read back from the record by a fresh one, which has no memory of it.
    await engine.restart()
    client = await engine.client()
    replayed = await client.tap(seq, card.uid, event_time_ms=when)
    assert replayed == first
    assert replayed.info == TapInfo.CONCESSION_NOT_VALID
    assert await conn.fetchval("SELECT count(*) FROM taps WHERE terminal_seq = $1", seq) == 1


async def test_replies_that_are_not_decisions_carry_no_info(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000, profile=STUDENT, eligible=(TODAY - 400 * DAY, TODAY - DAY))
    await engine.restart()
    client = await engine.client()
    seq = fresh_seq()
    when = time.time_ns() // 1_000_000
    assert (await client.tap(seq, card.uid, event_time_ms=when)).info == TapInfo.CONCESSION_NOT_VALID
    # The same sequence with other content is refused, not decided: no reasons to give.
    reused = await client.tap(seq, card.uid, event_time_ms=when, tap_flags=1)
    assert (reused.result, reused.info) == (ResultCode.SEQUENCE_REUSED, TapInfo.NONE)
