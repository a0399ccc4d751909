"""Many terminals at once: the books balance to the cent."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import pytest

from engine.codes import ResultCode
from engine.keys import derive_terminal_key, load_master_key
from tests.city import STUDENT, add_card, check_books, create_city, running_engine

CONNECTIONS = 50
CARDS = 100
TAPS = 1000
FIRST_TERMINAL = 100


async def add_validators(conn: asyncpg.Connection, count: int) -> list[int]:
    ids = list(range(FIRST_TERMINAL, FIRST_TERMINAL + count))
    await conn.executemany(
        "INSERT INTO terminals (id, service_id, kind, name) VALUES ($1, 1, 0, 'bus validator')",
        [(terminal_id,) for terminal_id in ids],
    )
    return ids


@pytest.mark.slow
async def test_thousand_taps_fifty_connections_hundred_cards(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await create_city(conn)
        rng = random.Random(7)
        # Low balances so that many taps are declined for funds: the
        # interesting case for "never below the floor".
        cards = [
            await add_card(conn, balance=rng.randrange(0, 1500), profile=STUDENT if i % 4 == 0 else 0)
            for i in range(CARDS)
        ]
        terminals = await add_validators(conn, CONNECTIONS)
        opening = {card.account_id: card.balance for card in cards}
        async with running_engine(db_dsn, tmp_path) as engine:
            master = load_master_key(tmp_path)
            from engine.client import TerminalClient

            clients = [
                await TerminalClient.connect(
                    "127.0.0.1", engine.port, terminal_id=t, key=derive_terminal_key(master, t, 1)
                )
                for t in terminals
            ]
            engine.clients.extend(clients)
            base = time.time_ns() // 1000
            plan = [(clients[i % CONNECTIONS], base + i, cards[rng.randrange(CARDS)]) for i in range(TAPS)]
            results = await asyncio.gather(*(client.tap(seq, card.uid) for client, seq, card in plan))
        approved_by_account: dict[int, int] = {}
        for (_, _, card), result in zip(plan, results, strict=True):
            assert result.result in (ResultCode.APPROVED, ResultCode.INSUFFICIENT_FUNDS)
            if result.result == ResultCode.APPROVED:
                approved_by_account[card.account_id] = approved_by_account.get(card.account_id, 0) + result.amount_cents
        approved = sum(1 for result in results if result.result == ResultCode.APPROVED)
        assert 0 < approved < TAPS  # both outcomes happened
        for account_id, balance in opening.items():
            expected = balance - approved_by_account.get(account_id, 0)
            assert await conn.fetchval("SELECT balance_cents FROM accounts WHERE id = $1", account_id) == expected
        assert await conn.fetchval("SELECT count(*) FROM taps WHERE terminal_id >= $1", FIRST_TERMINAL) == TAPS
        await check_books(conn)
    finally:
        await conn.close()
