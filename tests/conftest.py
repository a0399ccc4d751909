"""Database fixtures: one real PostgreSQL per test run, a fresh database per module.

No test talks to a mock database. The server is the embedded PostgreSQL 18
(``engine.embedded_db``) started once per run in a temporary directory, or
the server named by ``CITYCARD_TEST_DSN`` (a DSN allowed to CREATE DATABASE),
so CI can point the suite at a managed PostgreSQL instead.

Fixtures are synchronous and run their async work with ``run_sync``
(``asyncio.run``, or a worker thread when a factory is called from inside an
async test), so they never share an event loop with the tests that use them.

- ``pg_admin_dsn`` (session): DSN of the server's ``postgres`` database.
- ``pg_data_dir`` (function) and ``server_dir_factory`` (session): empty
  directories for a test's own embedded server (restart and crash tests must
  not disturb the shared one). Use them rather than ``tmp_path``: see
  ``_server_directory``.
- ``db_dsn`` (module): DSN of a fresh database with the schema applied.
- ``fresh_db`` (function): a factory ``fresh_db(migrated=True) -> dsn`` for
  tests that need several databases, or an empty one.
- ``seeded_dsn`` (module): DSN of a fresh database holding a small seeded city
  (``seeded_cards`` cards, seed ``DEFAULT_SEED``).
- ``seeded_cards`` (session): that number of cards.

Example::

    async def test_something(db_dsn):
        conn = await connect(db_dsn)
        ...
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType

import asyncpg
import pytest

from engine.db import connect, describe_dsn, ensure_database, quote_identifier, run_sync, with_database
from engine.embedded_db import BIN_DIR, POSTGRES_MAJOR_VERSION, EmbeddedPostgres
from engine.migrate import migrate
from engine.seed import DEFAULT_SEED, seed_city
from tests.twins import TWIN_MODULES, load_twin

TEST_DSN_ENV = "CITYCARD_TEST_DSN"

# Enough cards for every profile and service to appear, small enough to seed
# in well under a second.
SEEDED_CARDS = 200

# Database names are identifiers: at most 63 bytes.
_DATABASE_NAME_MAX = 63


@contextlib.contextmanager
def _server_directory() -> Iterator[Path]:
    """A new empty directory for an embedded server, removed afterwards.

    Not under pytest's ``tmp_path``: when we run as root the server runs as an
    unprivileged user who must traverse the path, and pytest resets its temp
    root to mode 0700 whenever a session starts, so another pytest run on the
    machine would lock our server out of its own files.
    """
    path = Path(tempfile.mkdtemp(prefix="citycard-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server_dir_factory() -> Iterator[Callable[[], Path]]:
    """Makes empty directories for embedded servers (see ``_server_directory``);
    all are removed at the end of the run, after their servers have stopped."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(_server_directory())


@pytest.fixture(scope="module", params=list(TWIN_MODULES))
def fp(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin of the fast path in turn: the compiled one, then the pure one."""
    return load_twin(request.param)


@pytest.fixture(scope="session")
def pg_admin_dsn(server_dir_factory: Callable[[], Path]) -> Iterator[str]:
    """The admin DSN of the test run's PostgreSQL server."""
    external = os.environ.get(TEST_DSN_ENV)
    if external:
        yield external
        return
    server = EmbeddedPostgres(server_dir_factory() / "pg")
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@pytest.fixture
def pg_data_dir() -> Iterator[Path]:
    """An empty directory for a test's own embedded server, removed after the
    test (which must stop any server it started there)."""
    with _server_directory() as path:
        yield path


@pytest.fixture(scope="module")
def db_dsn(pg_admin_dsn: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for the test module."""
    name = _database_name(request.module.__name__)
    dsn = run_sync(_create(pg_admin_dsn, name, migrated=True))
    try:
        yield dsn
    finally:
        run_sync(_drop(pg_admin_dsn, name))


@pytest.fixture
def fresh_db(pg_admin_dsn: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """A factory of fresh databases, all dropped after the test.

    ``fresh_db()`` returns the DSN of a new migrated database,
    ``fresh_db(migrated=False)`` that of an empty one.
    """
    created: list[str] = []

    def factory(*, migrated: bool = True) -> str:
        name = _database_name(request.node.name)
        created.append(name)
        return run_sync(_create(pg_admin_dsn, name, migrated=migrated))

    yield factory
    for name in created:
        run_sync(_drop(pg_admin_dsn, name))


@pytest.fixture(scope="module")
def seeded_dsn(pg_admin_dsn: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database holding a small seeded city."""
    name = _database_name(request.module.__name__ + "_seeded")
    dsn = run_sync(_create(pg_admin_dsn, name, migrated=True, cards=SEEDED_CARDS))
    try:
        yield dsn
    finally:
        run_sync(_drop(pg_admin_dsn, name))


@pytest.fixture(scope="module")
def city_dsn(db_dsn: str) -> str:
    """The module's database holding the tiny hand-made city of tests/city.py."""
    from tests.city import create_city

    async def build() -> None:
        conn = await connect(db_dsn)
        try:
            await create_city(conn)
        finally:
            await conn.close()

    run_sync(build())
    return db_dsn


@pytest.fixture
async def conn(city_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the tiny city's database, for the test's own cards and checks."""
    connection = await asyncpg.connect(city_dsn)
    yield connection
    await connection.close()


@pytest.fixture(scope="session")
def seeded_cards() -> int:
    """How many cards ``seeded_dsn`` holds."""
    return SEEDED_CARDS


def _database_name(hint: str) -> str:
    # Unique per call, recognisable in pg_database when a run is interrupted.
    suffix = uuid.uuid4().hex[:8]
    slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")
    return f"t_{slug[: _DATABASE_NAME_MAX - len(suffix) - 3]}_{suffix}"


async def _create(admin_dsn: str, name: str, *, migrated: bool, cards: int | None = None) -> str:
    await ensure_database(admin_dsn, name)
    dsn = with_database(admin_dsn, name)
    if migrated or cards is not None:
        conn = await connect(dsn)
        try:
            await migrate(conn)
            if cards is not None:
                await seed_city(conn, cards, seed=DEFAULT_SEED)
        finally:
            await conn.close()
    return dsn


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await connect(admin_dsn)
    try:
        # FORCE: a test that failed may have left connections open.
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_identifier(name)} WITH (FORCE)")
    finally:
        await conn.close()


def pytest_report_header(config: pytest.Config) -> str:
    """Say which PostgreSQL the run uses."""
    external = os.environ.get(TEST_DSN_ENV)
    if external:
        return f"database: {describe_dsn(external)} (from {TEST_DSN_ENV})"
    return f"database: embedded PostgreSQL {POSTGRES_MAJOR_VERSION} ({BIN_DIR})"
