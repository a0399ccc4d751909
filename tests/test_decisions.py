"""Every result code, produced by a real engine over TCP on a real database.

Each test uses its own cards, so the order of tests does not matter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine.codes import CardStatus, ResultCode
from tests.city import (
    BUS_FARE,
    BUS_FARE_STUDENT,
    CARD_CEILING,
    INACTIVE_VALIDATOR,
    KIOSK,
    LIBRARY_GATE,
    STUDENT,
    EngineUnderTest,
    add_card,
    balance_of,
    check_books,
    running_engine,
)


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path) as under_test:
        yield under_test


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fresh_seq() -> int:
    """Sequences above anything earlier tests used on the shared terminals."""
    return time.time_ns() // 1000


async def test_approved_tap_debits_fare_after_commit(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()  # cards are loaded at start
    client = await engine.client()
    result = await client.tap(fresh_seq(), card.uid)
    assert result.result == ResultCode.APPROVED
    assert (result.amount_cents, result.balance_cents) == (BUS_FARE, 1000 - BUS_FARE)
    # The reply comes after the commit: the database already shows it.
    assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE
    await check_books(conn)


async def test_concession_fare_for_student(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=500, profile=STUDENT)
    await engine.restart()
    client = await engine.client()
    result = await client.tap(fresh_seq(), card.uid)
    assert (result.result, result.amount_cents) == (ResultCode.APPROVED, BUS_FARE_STUDENT)


async def test_unknown_card(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    client = await engine.client()
    result = await client.tap(fresh_seq(), 0x0DEAD)
    assert (result.result, result.amount_cents, result.balance_cents) == (ResultCode.UNKNOWN_CARD, 0, 0)
    row = await conn.fetchrow("SELECT result, amount_cents FROM taps WHERE card_uid = $1", 0x0DEAD)
    assert row is not None and row["result"] == ResultCode.UNKNOWN_CARD  # declines are recorded too


@pytest.mark.parametrize("status", [CardStatus.BLOCKED, CardStatus.LOST, CardStatus.STOLEN, CardStatus.REPLACED])
async def test_card_not_active(engine: EngineUnderTest, conn: asyncpg.Connection, status: int) -> None:
    card = await add_card(conn, balance=1000, status=status)
    await engine.restart()
    client = await engine.client()
    result = await client.tap(fresh_seq(), card.uid)
    assert (result.result, result.amount_cents, result.balance_cents) == (ResultCode.CARD_NOT_ACTIVE, 0, 1000)
    assert await balance_of(conn, card.account_id) == 1000


async def test_service_not_allowed_for_profile(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000, profile=STUDENT)
    await engine.restart()
    client = await engine.client(LIBRARY_GATE)
    result = await client.tap(fresh_seq(), card.uid)
    assert result.result == ResultCode.SERVICE_NOT_ALLOWED


async def test_identification_only_tap_debits_nothing(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    client = await engine.client(LIBRARY_GATE)
    result = await client.tap(fresh_seq(), card.uid)
    assert (result.result, result.amount_cents, result.balance_cents) == (ResultCode.APPROVED, 0, 0)


async def test_insufficient_funds(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=BUS_FARE - 1)
    await engine.restart()
    client = await engine.client()
    result = await client.tap(fresh_seq(), card.uid)
    assert (result.result, result.balance_cents) == (ResultCode.INSUFFICIENT_FUNDS, BUS_FARE - 1)
    assert await balance_of(conn, card.account_id) == BUS_FARE - 1


async def test_tolerated_negative_floor(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=100, floor=-100)
    await engine.restart()
    client = await engine.client()
    first = await client.tap(fresh_seq(), card.uid)
    second = await client.tap(fresh_seq(), card.uid)
    assert (first.result, first.balance_cents) == (ResultCode.APPROVED, -50)
    assert (second.result, second.balance_cents) == (ResultCode.INSUFFICIENT_FUNDS, -50)
    await check_books(conn)


async def test_terminal_not_allowed_when_inactive(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    # An inactive terminal cannot even open a session.
    from engine.client import AuthenticationError

    with pytest.raises(AuthenticationError, match="AUTH_FAILED"):
        await engine.client(INACTIVE_VALIDATOR)


async def test_topup_from_validator_not_allowed(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    client = await engine.client()
    result = await client.topup(fresh_seq(), card.uid, 1000)
    assert result.result == ResultCode.TERMINAL_NOT_ALLOWED


async def test_topup_is_spendable_only_after_commit(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    kiosk = await engine.client(KIOSK)
    topped = await kiosk.topup(fresh_seq(), card.uid, 2000)
    assert (topped.result, topped.amount_cents, topped.balance_cents) == (ResultCode.APPROVED, 2000, 2000)
    assert await balance_of(conn, card.account_id) == 2000
    bus = await engine.client()
    ride = await bus.tap(fresh_seq(), card.uid)
    assert (ride.result, ride.balance_cents) == (ResultCode.APPROVED, 2000 - BUS_FARE)
    await check_books(conn)


@pytest.mark.parametrize("amount", [0, 50_001])
async def test_topup_invalid_amount(engine: EngineUnderTest, conn: asyncpg.Connection, amount: int) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    kiosk = await engine.client(KIOSK)
    result = await kiosk.topup(fresh_seq(), card.uid, amount)
    assert result.result == ResultCode.INVALID_AMOUNT


async def test_topup_balance_limit(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=CARD_CEILING - 100)
    await engine.restart()
    kiosk = await engine.client(KIOSK)
    assert (await kiosk.topup(fresh_seq(), card.uid, 101)).result == ResultCode.BALANCE_LIMIT
    assert (await kiosk.topup(fresh_seq(), card.uid, 100)).result == ResultCode.APPROVED


async def test_reversal_refunds_fare_once(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    tap_seq = fresh_seq()
    assert (await client.tap(tap_seq, card.uid)).result == ResultCode.APPROVED
    reversal = await client.reversal(fresh_seq(), tap_seq)
    assert (reversal.result, reversal.amount_cents, reversal.balance_cents) == (ResultCode.APPROVED, BUS_FARE, 1000)
    assert await balance_of(conn, card.account_id) == 1000
    again = await client.reversal(fresh_seq(), tap_seq)
    assert again.result == ResultCode.ALREADY_REVERSED
    await check_books(conn)


async def test_reversal_of_unknown_original(engine: EngineUnderTest) -> None:
    client = await engine.client()
    result = await client.reversal(fresh_seq(), 12345)
    assert result.result == ResultCode.ORIGINAL_NOT_FOUND


async def test_reversal_window_expired(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    tap_seq = fresh_seq()
    assert (await client.tap(tap_seq, card.uid)).result == ResultCode.APPROVED
    assert engine.engine is not None and engine.engine.processor is not None
    engine.engine.processor.reversal_window_ms = -1  # every original is now too old
    result = await client.reversal(fresh_seq(), tap_seq)
    assert result.result == ResultCode.REVERSAL_WINDOW_EXPIRED


async def test_reversal_of_topup_takes_money_back(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    kiosk = await engine.client(KIOSK)
    topup_seq = fresh_seq()
    assert (await kiosk.topup(topup_seq, card.uid, 500)).result == ResultCode.APPROVED
    result = await kiosk.reversal(fresh_seq(), topup_seq)
    assert (result.result, result.amount_cents, result.balance_cents) == (ResultCode.APPROVED, 500, 0)
    assert await balance_of(conn, card.account_id) == 0
    await check_books(conn)


async def test_reversal_of_spent_topup_is_insufficient(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    kiosk = await engine.client(KIOSK)
    topup_seq = fresh_seq()
    assert (await kiosk.topup(topup_seq, card.uid, 200)).result == ResultCode.APPROVED
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), card.uid)).result == ResultCode.APPROVED
    result = await kiosk.reversal(fresh_seq(), topup_seq)
    assert result.result == ResultCode.INSUFFICIENT_FUNDS


async def test_sequence_reused_with_other_content(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    first_card = await add_card(conn, balance=1000)
    other_card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    seq = fresh_seq()
    when = now_ms()
    assert (await client.tap(seq, first_card.uid, event_time_ms=when)).result == ResultCode.APPROVED
    reused = await client.tap(seq, other_card.uid, event_time_ms=when)
    assert reused.result == ResultCode.SEQUENCE_REUSED
    assert await balance_of(conn, other_card.account_id) == 1000


async def test_protocol_error_for_reserved_flags(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    client = await engine.client()
    result = await client.tap(fresh_seq(), card.uid, tap_flags=0x80)
    assert result.result == ResultCode.PROTOCOL_ERROR
    result = await client.tap(fresh_seq(), card.uid, event_time_ms=1)  # a clock in 1970
    assert result.result == ResultCode.PROTOCOL_ERROR
    # The connection stays usable: this is a result, not a protocol fault.
    assert await client.ping(7) == 7


async def test_busy_when_writer_has_no_room(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=100_000)
    async with running_engine(city_dsn, tmp_path, batch_taps_max=1, writer_queue_max=1) as engine:
        client = await engine.client()
        base = fresh_seq()
        results = await asyncio.gather(*(client.tap(base + i, card.uid) for i in range(50)))
    codes = {result.result for result in results}
    assert ResultCode.BUSY_RETRY in codes and ResultCode.APPROVED in codes
    approved = sum(result.amount_cents for result in results if result.result == ResultCode.APPROVED)
    assert await balance_of(conn, card.account_id) == 100_000 - approved
    busy = [base + i for i, result in enumerate(results) if result.result == ResultCode.BUSY_RETRY]
    recorded = await conn.fetchval("SELECT count(*) FROM taps WHERE terminal_seq = ANY($1::int8[])", busy)
    assert recorded == 0  # BUSY is not a decision: nothing recorded, nothing debited
