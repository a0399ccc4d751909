"""The asyncio client: failures surface as its own exceptions, never hang."""

from __future__ import annotations

import time
from pathlib import Path

import asyncpg
import pytest

from engine.client import ConnectionLost, EngineError
from engine.codes import ResultCode
from tests.city import add_card, running_engine


async def test_request_after_close_is_connection_lost(city_dsn: str, tmp_path: Path, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    async with running_engine(city_dsn, tmp_path) as engine:
        await engine.restart()
        client = await engine.client()
        assert (await client.tap(time.time_ns() // 1000, card.uid)).result == ResultCode.APPROVED
        await client.close()
        with pytest.raises(ConnectionLost):
            await client.tap(time.time_ns() // 1000, card.uid)


async def test_engine_stopping_fails_outstanding_requests(city_dsn: str, tmp_path: Path) -> None:
    async with running_engine(city_dsn, tmp_path) as engine:
        client = await engine.client()
        await engine.stop()
        with pytest.raises((ConnectionLost, EngineError)) as raised:
            await client.ping(1)
        # Either the engine's SHUTTING_DOWN error or the closed connection.
        assert "SHUTTING_DOWN" in str(raised.value) or isinstance(raised.value, ConnectionLost)
