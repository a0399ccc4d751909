"""Commits are durable whatever the server's defaults say."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.city import create_city, running_engine


async def test_writer_forces_synchronous_commit(fresh_db: object, tmp_path: Path) -> None:
    dsn = fresh_db()  # type: ignore[operator]
    conn = await asyncpg.connect(dsn)
    try:
        await create_city(conn)
        database = await conn.fetchval("SELECT current_database()")
        # A server (or database) configured for speed over safety.
        await conn.execute(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    finally:
        await conn.close()
    async with running_engine(dsn, tmp_path) as engine:
        assert engine.engine is not None and engine.engine.writer is not None
        writer_connection = engine.engine.writer._conn
        assert writer_connection is not None
        assert await writer_connection.fetchval("SHOW synchronous_commit") == "on"
        other = await asyncpg.connect(dsn)
        try:
            assert await other.fetchval("SHOW synchronous_commit") == "off"  # the setting really was off
        finally:
            await other.close()
