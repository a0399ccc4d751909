"""Broken networks on both sides of the engine: the bank checker finds nothing
lost, nothing doubled, every unknown resolved; and the proxy that breaks them
does what it says.

The harness runs as a user would (``python -m benchmarks.network_faults``),
as a subprocess, on a fresh database of the test run's PostgreSQL server.
The proxy is tested on its own against a small echo server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from benchmarks.proxy import FaultyProxy
from tests.harness import run_json_module

# 15 s of faults, a second of start and audit; the limit only catches a hang
# (a stuck unknown may take the harness's FINAL_RESOLVE_S, 90 s, to give up).
HARNESS_SECONDS = 15
HARNESS_TIMEOUT_S = 240
# Echo tests: everything happens on this machine within milliseconds.
ECHO_TIMEOUT_S = 5.0


def run_harness(dsn: str, *options: str) -> tuple[int, dict[str, Any]]:
    return run_json_module("benchmarks.network_faults", "--dsn", dsn, *options, timeout_s=HARNESS_TIMEOUT_S)


@pytest.mark.slow
def test_network_faults_lose_nothing(fresh_db: Callable[..., str]) -> None:
    code, report = run_harness(fresh_db(), "--seconds", str(HARNESS_SECONDS), "--seed", "6")
    failures = {key: report.get(key) for key in ("first_loss", "failure_logs", "engine_log_tail")}
    assert code == 0, failures
    assert report["lost"] == 0, failures
    assert report["duplicated"] == 0
    assert report["below_floor"] == 0
    assert report["conserved"] is True, report["money"]
    assert report["unresolved"] == 0
    assert report["mismatched_retries"] == 0
    assert report["passed"] is True
    # The faults happened, on both sides, and reached the writer.
    faults = report["faults"]
    assert faults["terminal_side"].get("reset", 0) > 0, faults
    assert faults["database_side"].get("reset", 0) > 0, faults
    writer = report["writer"]
    assert report["writer_resolutions"] > 0 or writer["writer_connections_opened"] > 1, writer
    assert report["unknown"] > 0 and report["resolved"] == report["unknown"]
    assert report["approved"] > 0 and report["declined"] > 0
    for key in ("seconds", "requests", "acknowledged", "machine", "versions", "settings"):
        assert key in report, key


# --- the proxy --------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultyProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultyProxy("127.0.0.1", port) as faulty:
        yield faulty
    server.close()
    await server.wait_closed()


async def _open(proxy: FaultyProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), ECHO_TIMEOUT_S)


async def test_proxy_forwards_both_ways(proxy: FaultyProxy) -> None:
    reader, writer = await _open(proxy)
    payload = bytes(range(256)) * 400  # larger than one read chunk
    assert await _round_trip(reader, writer, payload) == payload
    assert proxy.connections_open == 1
    writer.close()


async def test_proxy_reset_breaks_current_connections_only(proxy: FaultyProxy) -> None:
    reader, writer = await _open(proxy)
    assert await _round_trip(reader, writer, b"before") == b"before"
    assert proxy.reset() == 1
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _round_trip(reader, writer, b"after")
    assert proxy.faults["reset"] == 1
    # A new connection works.
    reader, writer = await _open(proxy)
    assert await _round_trip(reader, writer, b"again") == b"again"
    writer.close()


async def test_proxy_stall_holds_data_then_delivers_it(proxy: FaultyProxy) -> None:
    reader, writer = await _open(proxy)
    assert await _round_trip(reader, writer, b"warm") == b"warm"
    proxy.stall(0.3)
    started = time.monotonic()
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.1)
    assert proxy.stalled
    assert await asyncio.wait_for(reader.readexactly(4), ECHO_TIMEOUT_S) == b"held"
    assert time.monotonic() - started >= 0.25
    assert not proxy.stalled
    writer.close()


async def test_proxy_fragments_without_reordering(proxy: FaultyProxy) -> None:
    proxy.fragment = True
    reader, writer = await _open(proxy)
    payload = bytes(range(256)) * 4
    writer.write(payload)
    await writer.drain()
    pieces: list[bytes] = []
    received = 0
    while received < len(payload):
        piece = await asyncio.wait_for(reader.read(4096), ECHO_TIMEOUT_S)
        assert piece
        pieces.append(piece)
        received += len(piece)
    assert b"".join(pieces) == payload
    assert len(pieces) > 4  # it really arrived in small pieces
    writer.close()
