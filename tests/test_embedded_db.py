"""The embedded PostgreSQL: start, reuse, restart (clean and crash-like), stop,
and the DSN resolution that decides whether to start it at all."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from engine.db import DatabaseUnavailable, connect, describe_dsn, resolve_database
from engine.embedded_db import EmbeddedDatabaseError, EmbeddedPostgres


@pytest.fixture(scope="module")
def server(server_dir_factory: Callable[[], Path]) -> Iterator[EmbeddedPostgres]:
    # A server of its own: these tests restart and stop it, which must not
    # disturb the run's shared server.
    pg = EmbeddedPostgres(server_dir_factory() / "pg")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


async def _scalar(dsn: str, query: str) -> object:
    conn = await connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_start_gives_a_tcp_dsn_with_durable_settings(server: EmbeddedPostgres) -> None:
    assert server.is_running()
    assert server.dsn() == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    conn = await connect(server.dsn())
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes", "max_connections", "shared_buffers")
        }
        version = await conn.fetchval("SHOW server_version_num")
    finally:
        await conn.close()
    assert settings == {
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "200",
        "shared_buffers": "256MB",
    }
    assert int(version) >= 180000
    assert server.log_path.parent == server.data_dir
    assert server.log_path.exists()


async def test_listens_on_a_unix_socket_in_the_data_dir(server: EmbeddedPostgres) -> None:
    assert (server.data_dir / f".s.PGSQL.{server.port}").is_socket()
    conn = await asyncpg.connect(host=str(server.data_dir), port=server.port, user="postgres", database="postgres")
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_a_second_start_reuses_the_running_server(server: EmbeddedPostgres) -> None:
    started_at = await _scalar(server.dsn(), "SELECT pg_postmaster_start_time()")
    again = EmbeddedPostgres(server.data_dir)  # as another process would
    assert again.start() == server.dsn()
    assert not again.launched
    assert await _scalar(server.dsn(), "SELECT pg_postmaster_start_time()") == started_at
    assert (server.data_dir / "port").read_text().strip() == str(server.port)


async def test_committed_rows_survive_a_fast_restart(server: EmbeddedPostgres) -> None:
    conn = await connect(server.dsn())
    await conn.execute("CREATE TABLE fast_restart (id int PRIMARY KEY)")
    await conn.execute("INSERT INTO fast_restart VALUES (1)")
    await conn.close()
    port = server.port
    assert server.restart("fast") == server.dsn()
    assert server.port == port
    assert await _scalar(server.dsn(), "SELECT count(*) FROM fast_restart") == 1


async def test_immediate_restart_keeps_committed_and_loses_uncommitted(server: EmbeddedPostgres) -> None:
    conn = await connect(server.dsn())
    await conn.execute("CREATE TABLE crash (id int PRIMARY KEY)")
    await conn.execute("INSERT INTO crash VALUES (1)")
    open_transaction = conn.transaction()
    await open_transaction.start()
    await conn.execute("INSERT INTO crash VALUES (2)")
    log_size = server.log_path.stat().st_size

    server.restart("immediate")

    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError, OSError)):
        await conn.fetchval("SELECT 1")
    conn.terminate()
    assert await _scalar(server.dsn(), "SELECT array_agg(id ORDER BY id) FROM crash") == [1]
    # Proof that it was a crash, not a clean stop: the next start recovered.
    log = server.log_path.read_bytes()[log_size:].decode()
    assert "not properly shut down; automatic recovery in progress" in log


async def test_stop_then_start_uses_the_same_port(server: EmbeddedPostgres) -> None:
    port = server.port
    server.stop()
    assert not server.is_running()
    server.stop()  # stopping a stopped server is a no-op
    with pytest.raises(DatabaseUnavailable):
        await connect(server.dsn(), timeout_s=2)
    server.start()
    assert server.launched
    assert server.port == port
    assert await _scalar(server.dsn(), "SELECT 1") == 1


def test_start_failure_quotes_the_server_log(pg_data_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        pg = EmbeddedPostgres(pg_data_dir / "pg", port=taken)
        with pytest.raises(EmbeddedDatabaseError, match=r"could not bind|Address already in use"):
            pg.start()
    assert not pg.is_running()


def test_a_given_dsn_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CITYCARD_DSN", raising=False)
    with resolve_database("postgresql://app@db.example:6432/citycard", tmp_path) as handle:
        assert handle.dsn == "postgresql://app@db.example:6432/citycard"
        assert handle.embedded is None
    monkeypatch.setenv("CITYCARD_DSN", "postgresql://env@db.example:6432/citycard")
    with resolve_database(None, tmp_path) as handle:
        assert handle.dsn == "postgresql://env@db.example:6432/citycard"
        assert handle.embedded is None
    assert list(tmp_path.iterdir()) == []


async def test_no_dsn_starts_the_embedded_server_with_a_citycard_database(
    pg_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CITYCARD_DSN", raising=False)
    first = resolve_database(None, pg_data_dir)
    try:
        assert first.embedded is not None and first.embedded.launched
        assert first.embedded.data_dir == (pg_data_dir / "pg").resolve()
        assert first.dsn.endswith("/citycard")
        assert await _scalar(first.dsn, "SELECT current_database()") == "citycard"
        # A second handle finds the server running; closing it leaves it alone.
        second = resolve_database(None, pg_data_dir)
        assert second.dsn == first.dsn
        second.close()
        assert first.embedded.is_running()
    finally:
        first.close()
    assert not first.embedded.is_running()


async def test_unreachable_database_names_host_and_port_but_not_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dsn = f"postgresql://app:s3cret@127.0.0.1:{closed_port}/citycard"
    with pytest.raises(DatabaseUnavailable) as caught:
        await connect(dsn, timeout_s=2)
    assert f"127.0.0.1:{closed_port}" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert describe_dsn(dsn) == f"app@127.0.0.1:{closed_port}/citycard"
