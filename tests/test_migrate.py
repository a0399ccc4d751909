"""Migrations (apply, re-run, concurrency, tampering) and the money rules the
schema enforces on its own, whatever the engine does."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from engine.db import connect
from engine.migrate import SCHEMA_DIR, ChecksumMismatch, MigrationError, applied_versions, discover, migrate

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every migration in schema/, in order: what a fresh database gets.
ALL_VERSIONS = [migration.version for migration in discover()]


# --- migrations -----------------------------------------------------------------


async def test_fresh_database_gets_every_migration_once(fresh_db: Callable[..., str]) -> None:
    conn = await connect(fresh_db(migrated=False))
    try:
        expected = [migration.version for migration in discover()]
        assert await migrate(conn) == expected
        assert await migrate(conn) == []
        assert await applied_versions(conn) == expected
        rows = await conn.fetch("SELECT version, name, sha256, applied_at FROM schema_migrations ORDER BY version")
        first = rows[0]
        assert (first["version"], first["name"]) == (1, "core")
        assert first["sha256"] == hashlib.sha256((SCHEMA_DIR / "0001_core.sql").read_bytes()).hexdigest()
        assert first["applied_at"] is not None
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(fresh_db: Callable[..., str]) -> None:
    dsn = fresh_db(migrated=False)
    connections = [await connect(dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    assert sorted(results) == [[], [], [], ALL_VERSIONS]


def test_two_processes_migrating_at_once(fresh_db: Callable[..., str]) -> None:
    dsn = fresh_db(migrated=False)
    script = (
        "import asyncio, sys\n"
        "from engine.db import connect\n"
        "from engine.migrate import migrate\n"
        "async def main():\n"
        "    conn = await connect(sys.argv[1])\n"
        "    print(await migrate(conn))\n"
        "    await conn.close()\n"
        "asyncio.run(main())\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, dsn], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()
        outputs.append(stdout.decode().strip())
    assert sorted(outputs) == [str(ALL_VERSIONS), "[]"]


def _copy_schema(target: Path) -> Path:
    target.mkdir()
    shutil.copy(SCHEMA_DIR / "0001_core.sql", target / "0001_core.sql")
    return target


async def test_a_changed_applied_file_is_refused(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    schema = _copy_schema(tmp_path / "schema")
    conn = await connect(fresh_db(migrated=False))
    try:
        assert await migrate(conn, schema) == [1]
        with open(schema / "0001_core.sql", "a", encoding="utf-8") as sql:
            sql.write("\n-- an innocent-looking edit\n")
        with pytest.raises(ChecksumMismatch, match=r"0001_core\.sql changed since it was applied"):
            await migrate(conn, schema)
        # A new file is not applied while an old one is in doubt.
        (schema / "0002_more.sql").write_text("CREATE TABLE more (id int);\n")
        with pytest.raises(ChecksumMismatch):
            await migrate(conn, schema)
        assert await applied_versions(conn) == [1]
    finally:
        await conn.close()


async def test_new_files_apply_and_a_failing_one_leaves_no_trace(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    schema = _copy_schema(tmp_path / "schema")
    conn = await connect(fresh_db(migrated=False))
    try:
        assert await migrate(conn, schema) == [1]
        (schema / "0002_more.sql").write_text("CREATE TABLE more (id int);\n")
        (schema / "0003_broken.sql").write_text("CREATE TABLE broken (id int);\nSELECT no_such_function();\n")
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrate(conn, schema)
        assert await applied_versions(conn) == [1, 2]
        assert await conn.fetchval("SELECT to_regclass('broken')") is None
        (schema / "0003_broken.sql").write_text("CREATE TABLE fixed (id int);\n")
        assert await migrate(conn, schema) == [3]
    finally:
        await conn.close()


def test_misnamed_and_duplicate_files_are_refused(tmp_path: Path) -> None:
    schema = _copy_schema(tmp_path / "schema")
    (schema / "2_bad.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=r"must be named NNNN_lowercase_name\.sql"):
        discover(schema)
    (schema / "2_bad.sql").unlink()
    (schema / "0001_again.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match="version 1 also used by"):
        discover(schema)


# --- schema constraints -----------------------------------------------------------------


@pytest.fixture
async def world(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction holding a tiny city, rolled back after
    the test, so the module's database stays empty between tests."""
    conn = await connect(db_dsn)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute(
        """
        INSERT INTO profiles (id, code, name) VALUES (0, 'standard', 'General');
        INSERT INTO accounts (id, kind, name, floor_cents) VALUES
            (1, 2, 'funding', -4611686018427387904),
            (100, 1, 'revenue: bus', 0),
            (1000001, 0, 'card 1', 0);
        INSERT INTO holders (id, profile_id) VALUES (1, 0);
        INSERT INTO cards (uid, holder_id, account_id) VALUES (77, 1, 1000001);
        INSERT INTO services (id, code, name, revenue_account_id) VALUES (0, 'bus', 'Bus', 100);
        INSERT INTO terminals (id, service_id, kind, name) VALUES (1, 0, 0, 'bus-001');
        INSERT INTO batches (id, taps) VALUES (1, 1);
        """
    )
    try:
        yield conn
    finally:
        if not conn.is_closed():
            await transaction.rollback()
            await conn.close()


_TAP = """
    INSERT INTO taps (terminal_id, terminal_seq, kind, card_uid, event_time, recorded_at,
                      result, amount_cents, service_id, account_id, batch_id)
    VALUES (1, $1, 0, 77, now(), now(), $2, $3, 0, 1000001, 1)
"""


async def _violates(conn: asyncpg.Connection, error: type[Exception], sql: str, *args: object) -> None:
    # Each attempt in a savepoint, so the test's transaction survives it.
    with pytest.raises(error):
        async with conn.transaction():
            await conn.execute(sql, *args)


async def test_a_balance_below_the_floor_is_rejected(world: asyncpg.Connection) -> None:
    # A card account goes below its floor only by its debt limit (offline
    # taps that stand, docs/offline.md), other accounts never.
    await _violates(world, asyncpg.CheckViolationError, "UPDATE accounts SET balance_cents = -2001 WHERE id = 1000001")
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "UPDATE accounts SET balance_cents = -1, debt_limit_cents = 0 WHERE id = 1000001",
    )
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (id, kind, name, balance_cents) VALUES (5, 1, 'x', -1)",
    )
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (id, kind, name, debt_limit_cents) VALUES (7, 0, 'x', 100001)",
    )
    # A card may be allowed a small debt, never more than 1,000 EUR.
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "INSERT INTO accounts (id, kind, name, floor_cents) VALUES (6, 0, 'x', -100001)",
    )
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "UPDATE accounts SET balance_cents = 100001, ceiling_cents = 100000 WHERE id = 1000001",
    )
    await world.execute("UPDATE accounts SET balance_cents = -5 WHERE id = 1")  # funding may go negative


async def test_taps_are_append_only(world: asyncpg.Connection) -> None:
    await world.execute(_TAP, 1, 0, 100)
    await _violates(world, asyncpg.InsufficientPrivilegeError, "UPDATE taps SET amount_cents = 0")
    await _violates(world, asyncpg.InsufficientPrivilegeError, "DELETE FROM taps")
    await _violates(world, asyncpg.InsufficientPrivilegeError, "DELETE FROM batches")
    for table in ("taps", "batches", "ledger_entries", "ledger_transfers"):
        await _violates(world, asyncpg.InsufficientPrivilegeError, f"TRUNCATE {table} CASCADE")


async def test_a_terminal_sequence_is_recorded_once(world: asyncpg.Connection) -> None:
    await world.execute(_TAP, 7, 0, 100)
    await _violates(world, asyncpg.UniqueViolationError, _TAP, 7, 0, 100)
    await world.execute(_TAP, 8, 0, 100)


async def test_a_decline_moves_no_money(world: asyncpg.Connection) -> None:
    await _violates(world, asyncpg.CheckViolationError, _TAP, 9, 25, 100)
    await world.execute(_TAP, 9, 25, 0)


async def test_an_unbalanced_ledger_transfer_is_rejected(world: asyncpg.Connection) -> None:
    await world.execute("INSERT INTO ledger_transfers (id, batch_id, kind, service_id) VALUES (10, 1, 0, 0)")
    await _violates(
        world,
        asyncpg.CheckViolationError,
        "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES (10, 1000001, -100), (10, 100, 99)",
    )
    await world.execute(
        "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES (10, 1000001, -100), (10, 100, 100)"
    )
    # COPY is checked like INSERT: the seed and any bulk load go through it.
    await world.execute("INSERT INTO ledger_transfers (id, batch_id, kind, service_id) VALUES (11, 1, 3, NULL)")
    with pytest.raises(asyncpg.CheckViolationError):
        async with world.transaction():
            await world.copy_records_to_table(
                "ledger_entries",
                records=[(11, 1000001, 500), (11, 1, -499)],
                columns=("transfer_id", "account_id", "amount_cents"),
            )
    # Entries are append-only too: a balanced transfer cannot be edited afterwards.
    await _violates(world, asyncpg.InsufficientPrivilegeError, "UPDATE ledger_entries SET amount_cents = 1")


async def test_a_kiosk_needs_a_funding_account(world: asyncpg.Connection) -> None:
    await _violates(
        world, asyncpg.CheckViolationError, "INSERT INTO terminals (id, service_id, kind, name) VALUES (2, 0, 1, 'k')"
    )
    await world.execute(
        "INSERT INTO terminals (id, service_id, kind, name, funding_account_id) VALUES (2, 0, 1, 'k', 1)"
    )
