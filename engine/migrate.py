"""Schema migrations: numbered SQL files applied once, in order.

``schema/NNNN_name.sql`` files are applied in version order, each in its own
transaction together with its row in ``schema_migrations`` (version, name,
sha256, applied_at), so a file is either wholly applied and recorded or not
at all. A file already applied is never run again; if its bytes changed since,
migration stops with ``ChecksumMismatch``: the database was built from other
SQL than the repository now holds, and a person must decide what to do.

Several processes may migrate at once (engines starting together, parallel
test workers): a transaction-independent advisory lock makes them take turns,
and the later ones find nothing left to do.

Example::

    conn = await connect(dsn)
    applied = await migrate(conn)  # [1] on a new database, [] afterwards
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"

# pg_advisory_lock key held while migrating. Any fixed bigint works as long as
# nothing else in the database uses it; this one is "citycard" in ASCII
# (0x63_69_74_79_63_61_72_64), so it is recognisable in pg_locks.
MIGRATION_LOCK_KEY = 0x6369747963617264

# How long a migrator waits for another one to finish. Applying the whole
# schema takes well under a second; a minute means the holder is stuck.
MIGRATION_LOCK_WAIT_S = 60.0

# One SQL file runs in one statement round trip; building the schema on an
# empty database is quick, but a data migration on 340,000 cards may not be.
MIGRATION_STATEMENT_TIMEOUT_S = 600.0

FILE_NAME_PATTERN = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    sha256      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The schema directory and the database disagree; nothing more was applied."""


class ChecksumMismatch(MigrationError):
    """An applied migration file has changed since it was applied."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One ``schema/NNNN_name.sql`` file."""

    version: int
    name: str
    path: Path
    sql: str
    sha256: str


def discover(schema_dir: Path = SCHEMA_DIR) -> list[Migration]:
    """The migration files of ``schema_dir``, in version order.

    Files not named ``NNNN_name.sql`` are ignored only if they do not end in
    ``.sql``: a misnamed SQL file is an error rather than silently skipped.

    >>> [m.version for m in discover()][:1]
    [1]
    """
    migrations: dict[int, Migration] = {}
    for path in sorted(schema_dir.glob("*.sql")):
        match = FILE_NAME_PATTERN.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files must be named NNNN_lowercase_name.sql")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(f"{path}: version {version} also used by {migrations[version].path.name}")
        data = path.read_bytes()
        migrations[version] = Migration(
            version=version,
            name=match["name"],
            path=path,
            sql=data.decode("utf-8"),
            sha256=hashlib.sha256(data).hexdigest(),
        )
    return [migrations[version] for version in sorted(migrations)]


async def migrate(conn: asyncpg.Connection, schema_dir: Path = SCHEMA_DIR) -> list[int]:
    """Apply the pending migrations of ``schema_dir``; return their versions.

    Example::

        await migrate(conn)  # [1]
        await migrate(conn)  # [] (nothing to do)
    """
    if conn.is_in_transaction():
        raise MigrationError("migrate() needs a connection outside any transaction: each file is its own")
    migrations = discover(schema_dir)
    # Session-level lock: it must outlive the per-file transactions.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=MIGRATION_LOCK_WAIT_S)
    try:
        await conn.execute(_CREATE_TABLE)
        applied = {
            row["version"]: row for row in await conn.fetch("SELECT version, name, sha256 FROM schema_migrations")
        }
        pending = _check_against_applied(migrations, applied)
        for migration in pending:
            async with conn.transaction():
                await conn.execute(migration.sql, timeout=MIGRATION_STATEMENT_TIMEOUT_S)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.sha256,
                )
        return [migration.version for migration in pending]
    finally:
        # A broken connection has already released its session locks; trying
        # to unlock would only hide the error that broke it.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def applied_versions(conn: asyncpg.Connection) -> list[int]:
    """Versions recorded in ``schema_migrations`` (empty before the first migrate)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return []
    return [row[0] for row in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]


def _check_against_applied(migrations: list[Migration], applied: dict[int, asyncpg.Record]) -> list[Migration]:
    """The migrations still to apply, after checking the applied ones are unchanged."""
    by_version = {migration.version: migration for migration in migrations}
    for version, row in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(f"migration {version:04d}_{row['name']} is applied but its file is missing")
        if migration.name != row["name"] or migration.sha256 != row["sha256"]:
            raise ChecksumMismatch(
                f"{migration.path.name} changed since it was applied as {version:04d}_{row['name']}"
                f" (sha256 {row['sha256'][:12]}..., file now {migration.sha256[:12]}...);"
                " applied migrations are immutable: add a new file instead"
            )
    pending = [migration for migration in migrations if migration.version not in applied]
    newest_applied = max(applied, default=0)
    for migration in pending:
        if migration.version < newest_applied:
            raise MigrationError(
                f"{migration.path.name} is older than applied migration {newest_applied}"
                " but was never applied; renumber it after the newest"
            )
    return pending
