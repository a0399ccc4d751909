"""The database goes away under load: nothing approved is lost or doubled.

These tests run their own embedded PostgreSQL so that restarting it does not
disturb the rest of the suite.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from engine.client import TerminalClient
from engine.codes import ResultCode
from engine.db import ensure_database, run_sync, with_database
from engine.embedded_db import EmbeddedPostgres
from engine.keys import derive_terminal_key, load_master_key
from engine.migrate import migrate
from tests.city import Card, add_card, check_books, create_city, running_engine

CONNECTIONS = 8
CARDS = 40
# Retries per request before the test gives up: the database is back within
# seconds, and each BUSY_RETRY is answered at once, so allow a generous count
# with a pause between tries.
RETRIES_MAX = 2000
RETRY_PAUSE_S = 0.01


@pytest.fixture
def private_server() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's tmp_path: when run as root the server runs as an
    # unprivileged user, and pytest's base temp directory is private to root
    # and pruned by other pytest runs.
    data_dir = Path(tempfile.mkdtemp(prefix="citycard-faults-"))
    server = EmbeddedPostgres(data_dir / "pg")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def prepare(dsn: str) -> list[Card]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await create_city(conn)
        await conn.executemany(
            "INSERT INTO terminals (id, service_id, kind, name) VALUES ($1, 1, 0, 'bus validator')",
            [(100 + i,) for i in range(CONNECTIONS)],
        )
        return [await add_card(conn, balance=50_000) for _ in range(CARDS)]
    finally:
        await conn.close()


async def tap_until_final(client: TerminalClient, seq: int, card: Card, when: int) -> ResultCode:
    """What a terminal does: retry BUSY_RETRY with the same sequence and content."""
    for _ in range(RETRIES_MAX):
        result = await client.tap(seq, card.uid, event_time_ms=when)
        if result.result != ResultCode.BUSY_RETRY:
            return result.result
        await asyncio.sleep(RETRY_PAUSE_S)
    raise AssertionError(f"seq {seq} still busy after {RETRIES_MAX} tries")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_database_restart_under_load(private_server: EmbeddedPostgres, tmp_path: Path, mode: str) -> None:
    dsn = with_database(private_server.dsn(), "citycard")
    run_sync(ensure_database(private_server.dsn(), "citycard"))
    cards = await prepare(dsn)
    approved: dict[tuple[int, int], int] = {}
    writer_connections = 0
    async with running_engine(dsn, tmp_path) as engine:
        master = load_master_key(tmp_path)
        clients = [
            await TerminalClient.connect(
                "127.0.0.1", engine.port, terminal_id=100 + i, key=derive_terminal_key(master, 100 + i, 1)
            )
            for i in range(CONNECTIONS)
        ]
        engine.clients.extend(clients)
        stop = asyncio.Event()
        base = time.time_ns() // 1000

        async def terminal(index: int) -> None:
            rng = random.Random(index)
            seq = base + index * 1_000_000
            while not stop.is_set():
                seq += 1
                card = cards[rng.randrange(CARDS)]
                result = await tap_until_final(clients[index], seq, card, time.time_ns() // 1_000_000)
                if result == ResultCode.APPROVED:
                    approved[(100 + index, seq)] = card.account_id

        workers = [asyncio.create_task(terminal(i)) for i in range(CONNECTIONS)]
        await asyncio.sleep(0.5)
        before = len(approved)
        await asyncio.to_thread(private_server.restart, mode)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        assert engine.engine is not None and engine.engine.writer is not None
        writer_connections = engine.engine.writer.connections_opened
    assert before > 0 and len(approved) > before  # traffic before and after the restart
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT terminal_id, terminal_seq, result FROM taps WHERE terminal_id >= 100")
        recorded = {(row["terminal_id"], row["terminal_seq"]): row["result"] for row in rows}
        # Every approval the terminals heard is recorded, exactly once, as approved.
        for key in approved:
            assert recorded.get(key) == ResultCode.APPROVED, key
        assert sum(1 for result in recorded.values() if result == ResultCode.APPROVED) == len(approved)
        spent = await conn.fetchval(
            "SELECT sum(50000 - balance_cents) FROM accounts WHERE id = ANY($1::int8[])",
            [card.account_id for card in cards],
        )
        fares = await conn.fetchval("SELECT sum(amount_cents) FROM taps WHERE terminal_id >= 100 AND result = 0")
        assert spent == fares
        await check_books(conn)
    finally:
        await conn.close()
    # The restart really hit the writer: it lost its first connection (opened
    # at start, holding the writer lock) and made at least one new one.
    assert writer_connections >= 1
