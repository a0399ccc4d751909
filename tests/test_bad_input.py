"""Hostile and broken peers get one ERROR frame and a close; others are served."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine import fastpath
from engine.codes import ErrorCode, MessageType, ResultCode
from engine.keys import derive_terminal_key, load_master_key
from tests.city import BUS_VALIDATOR, Card, EngineUnderTest, add_card, create_city, running_engine

HANDSHAKE_DEADLINE_S = 0.5
IDLE_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def city_dsn(db_dsn: str) -> str:
    async def build() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            await create_city(conn)
            await add_card(conn, balance=100_000)
        finally:
            await conn.close()

    asyncio.run(build())
    return db_dsn


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(
        city_dsn, tmp_path, handshake_deadline_s=HANDSHAKE_DEADLINE_S, idle_timeout_s=IDLE_TIMEOUT_S
    ) as under_test:
        yield under_test


@pytest.fixture
async def card(city_dsn: str) -> Card:
    conn = await asyncpg.connect(city_dsn)
    try:
        row = await conn.fetchrow("SELECT uid, account_id FROM cards ORDER BY uid LIMIT 1")
    finally:
        await conn.close()
    return Card(uid=row["uid"], account_id=row["account_id"], profile=0, balance=100_000)


async def exchange(port: int, data: bytes, *, wait_s: float = 5.0) -> list[tuple[int, int, bytes]]:
    """Send raw bytes, read until the engine closes, return the frames received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), wait_s)  # until EOF
    finally:
        writer.close()
    frames = fastpath.FrameReader()
    result = frames.feed(received)
    assert frames.error is None
    return result


def error_of(frames: list[tuple[int, int, bytes]]) -> int:
    """The code of the final ERROR frame (every fault ends with exactly one)."""
    assert frames, "the engine closed without an ERROR frame"
    msg_type, _, body = frames[-1]
    assert msg_type == MessageType.ERROR
    code, text = fastpath.decode_error(body)
    assert text
    return int(code)


async def assert_still_serving(engine: EngineUnderTest, card: Card) -> None:
    client = await engine.client()
    result = await client.tap(time.time_ns() // 1000, card.uid)
    assert result.result == ResultCode.APPROVED


def hello(terminal_id: int = BUS_VALIDATOR, key_version: int = 1, nonce: bytes = bytes(16)) -> bytes:
    return fastpath.encode_hello(1, terminal_id, key_version, nonce)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),
        (struct.pack(">I", 16381), ErrorCode.FRAME_TOO_LARGE),
        (struct.pack(">I", 3) + b"\x01\x01\x00", ErrorCode.FRAME_TOO_SHORT),
        (struct.pack(">IBBHI", 8, 2, MessageType.PING, 0, 1), ErrorCode.UNSUPPORTED_VERSION),
        (struct.pack(">IBBHI", 8, 1, 0x55, 0, 1), ErrorCode.UNKNOWN_TYPE),
        (struct.pack(">IBBHI", 8, 1, MessageType.PING, 1, 1), ErrorCode.BAD_FLAGS),
        (struct.pack(">IBBHI", 9, 1, MessageType.PING, 0, 1) + b"\x00", ErrorCode.BAD_BODY_LENGTH),
        (fastpath.encode_tap(5, 1, 2, 3, 1_700_000_000_000, 0), ErrorCode.NOT_AUTHENTICATED),
        (fastpath.encode_auth(1, bytes(32)), ErrorCode.UNEXPECTED_MESSAGE),
        (fastpath.encode_tap_result(1, 1, 0, 0, 0), ErrorCode.UNEXPECTED_MESSAGE),
    ],
    ids=[
        "length-max",
        "length-just-over",
        "length-under-header",
        "version",
        "unknown-type",
        "flags",
        "body-length",
        "tap-before-auth",
        "auth-before-hello",
        "engine-only-type",
    ],
)
async def test_malformed_frames(engine: EngineUnderTest, card: Card, data: bytes, code: ErrorCode) -> None:
    assert error_of(await exchange(engine.port, data)) == code
    await assert_still_serving(engine, card)


async def test_oversized_frame_is_refused_before_its_body_arrives(engine: EngineUnderTest) -> None:
    # Only the prefix is sent: the engine must not wait for 16 MB that never come.
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    writer.write(struct.pack(">I", 16 * 1024 * 1024))
    received = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    frames = fastpath.FrameReader().feed(received)
    assert error_of(frames) == ErrorCode.FRAME_TOO_LARGE


async def test_garbage(engine: EngineUnderTest, card: Card) -> None:
    for seed in range(20):
        garbage = bytes((seed * 131 + i * 29) % 256 for i in range(64))
        code = error_of(await exchange(engine.port, garbage))
        assert code in set(ErrorCode)
    await assert_still_serving(engine, card)


async def test_truncated_frame_hits_the_handshake_deadline(engine: EngineUnderTest, card: Card) -> None:
    started = time.monotonic()
    frames = await exchange(engine.port, hello()[:10])
    assert error_of(frames) == ErrorCode.HANDSHAKE_TIMEOUT
    assert time.monotonic() - started < HANDSHAKE_DEADLINE_S + 2
    await assert_still_serving(engine, card)


async def test_slow_handshake_is_cut_at_the_absolute_deadline(engine: EngineUnderTest) -> None:
    """A byte at a time does not keep a connection alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    frame = hello()
    started = time.monotonic()
    try:
        for byte in frame:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(HANDSHAKE_DEADLINE_S / 10)
    except OSError:
        pass  # the engine closed the connection while we were still sending
    try:
        received = await asyncio.wait_for(reader.read(), 5)
    except OSError:
        received = b""
    writer.close()
    elapsed = time.monotonic() - started
    assert elapsed < HANDSHAKE_DEADLINE_S * 4
    if received:  # the ERROR frame may be lost to the reset of a half-sent stream
        assert error_of(fastpath.FrameReader().feed(received)) == ErrorCode.HANDSHAKE_TIMEOUT
    assert engine.engine is not None and engine.engine.context is not None
    assert engine.engine.context.counters.protocol_errors[ErrorCode.HANDSHAKE_TIMEOUT] == 1


async def test_idle_session_is_closed(engine: EngineUnderTest) -> None:
    client = await engine.client()
    await asyncio.sleep(IDLE_TIMEOUT_S * 3)
    from engine.client import EngineError

    with pytest.raises(EngineError, match="IDLE_TIMEOUT"):
        await client.ping(1)


async def handshake_frames(port: int, terminal_id: int, key: bytes, key_version: int = 1) -> list[int]:
    """Run a handshake with a given key by hand; return the message types received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    frames = fastpath.FrameReader()
    client_nonce = os.urandom(16)
    writer.write(fastpath.encode_hello(1, terminal_id, key_version, client_nonce))
    received: list[tuple[int, int, bytes]] = []
    while not received:
        received.extend(frames.feed(await reader.read(4096)))
    msg_type, _, body = received[0]
    assert msg_type == MessageType.CHALLENGE  # even for unknown terminals
    server_nonce = fastpath.decode_challenge(body)
    proof = fastpath.terminal_proof(key, terminal_id, key_version, client_nonce, server_nonce)
    writer.write(fastpath.encode_auth(2, proof))
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    received.extend(frames.feed(rest))
    types = [t for t, _, _ in received]
    if types[-1] == MessageType.ERROR:
        types.append(error_of(received))
    return types


async def test_failed_authentication(engine: EngineUnderTest, card: Card) -> None:
    good_key = derive_terminal_key(load_master_key(engine.data_dir), BUS_VALIDATOR, 1)
    wrong_key = bytes(32)
    assert await handshake_frames(engine.port, BUS_VALIDATOR, wrong_key) == [
        MessageType.CHALLENGE,
        MessageType.ERROR,
        ErrorCode.AUTH_FAILED,
    ]
    unknown = 999
    unknown_key = derive_terminal_key(load_master_key(engine.data_dir), unknown, 1)
    assert (await handshake_frames(engine.port, unknown, unknown_key))[-1] == ErrorCode.AUTH_FAILED
    # A valid key for a version the terminal does not have.
    old_key = derive_terminal_key(load_master_key(engine.data_dir), BUS_VALIDATOR, 2)
    assert (await handshake_frames(engine.port, BUS_VALIDATOR, old_key, key_version=2))[-1] == ErrorCode.AUTH_FAILED
    assert engine.engine is not None and engine.engine.context is not None
    assert engine.engine.context.counters.auth_failures == 3
    assert good_key != wrong_key
    await assert_still_serving(engine, card)


async def test_hello_twice(engine: EngineUnderTest) -> None:
    frames = await exchange(engine.port, hello() + hello())
    assert [t for t, _, _ in frames[:-1]] == [MessageType.CHALLENGE]
    assert error_of(frames) == ErrorCode.UNEXPECTED_MESSAGE


async def test_too_many_in_flight(engine: EngineUnderTest, card: Card) -> None:
    client = await engine.client()
    base = time.time_ns() // 1000
    flood = b"".join(
        client.seal(fastpath.encode_tap(1000 + i, base + i, card.uid, 0, time.time_ns() // 1_000_000, 0))
        for i in range(300)
    )
    await client.send_raw(flood)
    from engine.client import EngineError

    with pytest.raises(EngineError, match="TOO_MANY_IN_FLIGHT"):
        await client.ping(1)
    await assert_still_serving(engine, card)


async def test_ping_before_and_after_auth(engine: EngineUnderTest) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    writer.write(fastpath.encode_ping(77, 123456789))
    frames = fastpath.FrameReader()
    received: list[tuple[int, int, bytes]] = []
    while not received:
        received.extend(frames.feed(await reader.read(4096)))
    writer.close()
    assert received[0][0] == MessageType.PONG and received[0][1] == 77
    assert fastpath.decode_pong(received[0][2]) == 123456789
    client = await engine.client()
    assert await client.ping(2**64 - 1) == 2**64 - 1


async def test_protocol_errors_are_counted(engine: EngineUnderTest) -> None:
    await exchange(engine.port, b"\xff\xff\xff\xff")
    await exchange(engine.port, struct.pack(">IBBHI", 8, 1, 0x55, 0, 1))
    assert engine.engine is not None and engine.engine.context is not None
    counted = engine.engine.context.counters.protocol_errors
    assert counted[ErrorCode.FRAME_TOO_LARGE] == 1
    assert counted[ErrorCode.UNKNOWN_TYPE] == 1


async def test_connections_beyond_the_limit_are_refused(city_dsn: str, tmp_path: Path, card: Card) -> None:
    async with running_engine(city_dsn, tmp_path, max_connections=3) as engine:
        clients = [await engine.client() for _ in range(3)]
        frames = await exchange(engine.port, hello())
        assert error_of(frames) == ErrorCode.TOO_MANY_CONNECTIONS
        assert engine.engine is not None and engine.engine.context is not None
        assert engine.engine.context.counters.connections_rejected == 1
        # The three sessions in place are served as before.
        result = await clients[0].tap(time.time_ns() // 1000, card.uid)
        assert result.result == ResultCode.APPROVED
