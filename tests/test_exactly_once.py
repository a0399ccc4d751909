"""The same (terminal, sequence) is decided once, whatever the path back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from engine import fastpath
from engine.codes import ResultCode
from engine.decision import request_fingerprint
from fuzz import rig as rigs
from tests.city import BUS_FARE, BUS_VALIDATOR, KIOSK, EngineUnderTest, add_card, balance_of, check_books
from tests.city import running_engine as start_engine


def fresh_seq() -> int:
    return time.time_ns() // 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def taps_recorded(conn: asyncpg.Connection, seq: int) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM taps WHERE terminal_id = $1 AND terminal_seq = $2", BUS_VALIDATOR, seq
        )
    )


async def test_retry_on_same_connection(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    async with start_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        seq, when = fresh_seq(), now_ms()
        first = await client.tap(seq, card.uid, event_time_ms=when)
        again = await client.tap(seq, card.uid, event_time_ms=when)
    assert first == again
    assert first.result == ResultCode.APPROVED
    assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE
    assert await taps_recorded(conn, seq) == 1


async def test_duplicates_in_flight_share_one_decision(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    async with start_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        seq, when = fresh_seq(), now_ms()
        results = await asyncio.gather(*(client.tap(seq, card.uid, event_time_ms=when) for _ in range(20)))
    assert len(set(results)) == 1 and results[0].result == ResultCode.APPROVED
    assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE


async def test_retry_on_new_connection(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    async with start_engine(city_dsn, tmp_path) as engine:
        seq, when = fresh_seq(), now_ms()
        first_client = await engine.client()
        first = await first_client.tap(seq, card.uid, event_time_ms=when)
        await first_client.close()
        second_client = await engine.client()
        again = await second_client.tap(seq, card.uid, event_time_ms=when)
    assert first == again
    assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE


async def test_retry_after_engine_restart(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    seq, when = fresh_seq(), now_ms()
    async with start_engine(city_dsn, tmp_path) as engine:
        first = await (await engine.client()).tap(seq, card.uid, event_time_ms=when)
    async with start_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        again = await client.tap(seq, card.uid, event_time_ms=when)
        reused = await client.tap(seq, card.uid, event_time_ms=when + 1)
        # A sequence never used before, but below the terminal's highest one,
        # is decided normally after the record says it is new.
        late = await client.tap(seq - 1, card.uid, event_time_ms=when)
    assert first == again
    assert reused.result == ResultCode.SEQUENCE_REUSED
    assert late.result == ResultCode.APPROVED
    assert await balance_of(conn, card.account_id) == 1000 - 2 * BUS_FARE
    assert await taps_recorded(conn, seq) == 1
    await check_books(conn)


async def test_decline_is_remembered_too(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    """A retry gets the original decline even if the card could pay now."""
    card = await add_card(conn, balance=BUS_FARE - 1)
    seq, when = fresh_seq(), now_ms()
    async with start_engine(city_dsn, tmp_path) as engine:
        first = await (await engine.client()).tap(seq, card.uid, event_time_ms=when)
        kiosk_seq = fresh_seq()
        topped = await (await engine.client(KIOSK)).topup(kiosk_seq, card.uid, 1000)
        again = await (await engine.client()).tap(seq, card.uid, event_time_ms=when)
    assert topped.result == ResultCode.APPROVED
    assert first.result == again.result == ResultCode.INSUFFICIENT_FUNDS
    assert await balance_of(conn, card.account_id) == BUS_FARE - 1 + 1000


async def test_engine_under_test_restart_keeps_balances(
    city_dsn: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    engine = EngineUnderTest(city_dsn, tmp_path)
    await engine.start()
    try:
        client = await engine.client()
        base = fresh_seq()
        for i in range(3):
            assert (await client.tap(base + i, card.uid)).result == ResultCode.APPROVED
        await engine.restart()
        client = await engine.client()
        result = await client.tap(fresh_seq(), card.uid)
    finally:
        await engine.stop()
    assert result.balance_cents == 1000 - 4 * BUS_FARE


async def test_one_engine_per_database(city_dsn: str, tmp_path: Path) -> None:
    """A second engine on the same database refuses to start: two writers
    would decide on balances the other is changing."""
    from engine import writer
    from engine.server import EngineStartError

    async with start_engine(city_dsn, tmp_path):
        waited = writer.WRITER_LOCK_WAIT_S
        writer.WRITER_LOCK_WAIT_S = 0.2
        try:
            second = EngineUnderTest(city_dsn, tmp_path / "second")
            with pytest.raises(EngineStartError, match="another engine holds the writer lock"):
                await second.start()
        finally:
            writer.WRITER_LOCK_WAIT_S = waited
    # Once the first engine is gone, the lock is free again.
    async with start_engine(city_dsn, tmp_path) as engine:
        assert engine.engine is not None and engine.engine.writer is not None


async def test_retries_after_restart_read_the_record_and_count_pool_waits(
    city_dsn: str, tmp_path: Path, conn: asyncpg.Connection
) -> None:
    """After a restart, retries of old sequences are answered from the record
    (the slow path), many at once through a small pool: the waits are counted."""
    card = await add_card(conn, balance=100_000)
    base, when = fresh_seq(), now_ms()
    retries = 40
    async with start_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        first = await asyncio.gather(*(client.tap(base + i, card.uid, event_time_ms=when) for i in range(retries)))
    async with start_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        again = await asyncio.gather(*(client.tap(base + i, card.uid, event_time_ms=when) for i in range(retries)))
        assert engine.engine is not None and engine.engine.processor is not None
        waits = engine.engine.processor.pool_waits
    assert again == first
    assert await balance_of(conn, card.account_id) == 100_000 - retries * BUS_FARE
    assert waits > 0


async def test_a_tap_above_every_sequence_waits_for_an_uploads_claim() -> None:
    """A TAP whose sequence is above every one its terminal has had decided
    skips the look-ups of pending and remembered requests (none can hold
    it); the claim of an uploaded offline tap still can, and the TAP waits
    for its outcome instead of being decided a second time."""
    rig = rigs.SessionRig()
    terminal = rig.state.terminals[rigs.VALIDATOR]
    seq = terminal.high_seq + 10
    when = now_ms()
    fingerprint = request_fingerprint(0, rigs.CARD_RICH, 7, 0, 0, when, None, -1)

    class Replies:
        def __init__(self) -> None:
            self.results: list[tuple[int, int, int]] = []

        def deliver_result(
            self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int, info: int
        ) -> None:
            self.results.append((request_id, terminal_seq, result))

    uploader, tapper = Replies(), Replies()
    rig.processor.claim(terminal.id, seq, uploader, 0, fingerprint)  # type: ignore[arg-type]
    rig.processor.submit(tapper, 5, terminal, fastpath.OPERATION_TAP, seq, rigs.CARD_RICH, 7, 0, 0, None, when)  # type: ignore[arg-type]
    assert rig.writer.queued == [] and tapper.results == []
    rig.processor.release(terminal.id, seq, ResultCode.BUSY_RETRY)
    assert uploader.results == [(0, seq, ResultCode.BUSY_RETRY)]
    assert tapper.results == [(5, seq, ResultCode.BUSY_RETRY)]
    # Without a claim, the same request is decided at once.
    rig.processor.submit(tapper, 6, terminal, fastpath.OPERATION_TAP, seq, rigs.CARD_RICH, 7, 0, 0, None, when)  # type: ignore[arg-type]
    assert [decision.terminal_seq for decision in rig.writer.queued] == [seq]
