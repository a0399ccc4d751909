"""Terminal security on a running engine: sealed frames, key rotation, TLS.

docs/reliability.md, "Terminal security", lists what these show:

- a frame of an open session that is altered, replayed, reordered,
  reflected or not sealed is refused with its ERROR code, not acted upon,
  counted in ``citycard_frames_rejected_total{reason}``, logged with who,
  what and when, and the connection closed; other terminals are served;
- a key rotation accepts the old and the new key until the terminal's
  first session under the new one, which retires the old key (also after a
  restart); sessions open under the old key stay open;
- no key, terminal or session, is ever written to the database or a log;
- TLS on the listener, for both clients and ``citycard tap``, and clear
  errors for bad certificate files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import prometheus_client
import pytest

from engine import cli, fastpath, logs
from engine.blocking_client import BlockingTerminalClient
from engine.cli_terminal import start_rotation
from engine.client import AuthenticationError, ConnectionLost, EngineError, TerminalClient
from engine.codes import ErrorCode, MessageType, ResultCode
from engine.keys import derive_terminal_key, load_master_key
from engine.limits import SESSION_FRAMES_PER_TURN
from engine.seal import Opener, Sealer, SessionKeys, derive_session_keys
from engine.tls import MINIMUM_VERSION, client_context
from tests.city import (
    BUS_VALIDATOR,
    Card,
    EngineUnderTest,
    add_card,
    create_city,
    running_engine,
    terminal_key,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
ROTATING = 21  # a bus validator whose key the rotation tests change
ROTATING_TOO = 22
COMMAND_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def city_dsn(db_dsn: str) -> str:
    async def build() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            await create_city(conn)
            await conn.execute(
                "INSERT INTO terminals (id, service_id, kind, name) VALUES ($1, 1, 0, 'rotating'), ($2, 1, 0, 'too')",
                ROTATING,
                ROTATING_TOO,
            )
            await add_card(conn, balance=100_000)
        finally:
            await conn.close()

    asyncio.run(build())
    return db_dsn


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path) as under_test:
        yield under_test


@pytest.fixture
async def card(city_dsn: str) -> Card:
    conn = await asyncpg.connect(city_dsn)
    try:
        row = await conn.fetchrow("SELECT uid, account_id FROM cards ORDER BY uid LIMIT 1")
    finally:
        await conn.close()
    return Card(uid=row["uid"], account_id=row["account_id"], profile=0, balance=100_000)


def fresh_seq() -> int:
    return time.time_ns() // 1000


class RawTerminal:
    """A terminal written out by hand, to send frames a client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = fastpath.FrameReader()
        self.keys: SessionKeys | None = None
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None  # the engine's frames after AUTH_OK are opened with it
        self.receiving_sealed = False
        self.received: list[tuple[int, int, bytes]] = []

    @classmethod
    async def open(cls, port: int, key: bytes, terminal_id: int = BUS_VALIDATOR, key_version: int = 1) -> RawTerminal:
        terminal = cls(*await asyncio.open_connection("127.0.0.1", port))
        client_nonce = os.urandom(fastpath.NONCE_BYTES)
        terminal.writer.write(fastpath.encode_hello(1, terminal_id, key_version, client_nonce))
        [(msg_type, _, body)] = await terminal.read_frames(1)
        assert msg_type == MessageType.CHALLENGE
        server_nonce = fastpath.decode_challenge(body)
        proof = fastpath.terminal_proof(key, terminal_id, key_version, client_nonce, server_nonce)
        terminal.keys = derive_session_keys(key, terminal_id, key_version, client_nonce, server_nonce)
        terminal.opener = Opener(terminal.keys.engine_to_terminal)
        terminal.writer.write(fastpath.encode_auth(2, proof))
        [(msg_type, _, body)] = await terminal.read_frames(1)
        assert msg_type == MessageType.AUTH_OK, fastpath.decode_error(body)
        terminal.sealer = Sealer(terminal.keys.terminal_to_engine)
        return terminal

    async def read_frames(self, count: int) -> list[tuple[int, int, bytes]]:
        """The next ``count`` frames, opened once the handshake is over."""
        while len(self.received) < count:
            data = await asyncio.wait_for(self.reader.read(4096), 5)
            if not data:
                break
            for msg_type, request_id, body in self.frames.feed(data):
                if self.receiving_sealed:
                    assert self.opener is not None
                    body = self.opener.open(msg_type, request_id, body)
                elif msg_type == MessageType.AUTH_OK:
                    self.receiving_sealed = True
                self.received.append((msg_type, request_id, body))
        taken, self.received = self.received[:count], self.received[count:]
        return taken

    async def until_closed(self) -> list[tuple[int, int, bytes]]:
        frames = await self.read_frames(1_000)
        self.writer.close()
        return frames

    def seal(self, frame: bytes) -> bytes:
        assert self.sealer is not None
        return self.sealer.seal(frame)

    def send(self, data: bytes) -> None:
        self.writer.write(data)


def tap(request_id: int, seq: int, card: Card) -> bytes:
    return fastpath.encode_tap(request_id, seq, card.uid, 0, time.time_ns() // 1_000_000, 0)


async def tampered(how: str, terminal: RawTerminal, card: Card, seq: int) -> bytes:
    """The bytes that break the seal ``how`` (the offending frame is REFUSALS' request id)."""
    if how == "flipped bit":
        sealed = bytearray(terminal.seal(tap(9, seq, card)))
        sealed[20] ^= 0x01  # a bit of the card uid
        return bytes(sealed)
    if how == "replayed":
        sealed = terminal.seal(fastpath.encode_ping(8, 1))
        terminal.send(sealed)
        [(msg_type, _, _)] = await terminal.read_frames(1)
        assert msg_type == MessageType.PONG
        return sealed  # answered once already
    if how == "reordered":
        first = terminal.seal(tap(8, seq - 1, card))
        second = terminal.seal(tap(9, seq, card))
        return second + first
    if how == "reflected":
        assert terminal.keys is not None and terminal.sealer is not None
        return Sealer(terminal.keys.engine_to_terminal, terminal.sealer.counter).seal(tap(9, seq, card))
    assert how == "not sealed"
    return tap(9, seq, card)


REFUSALS = {
    # how: (error code, reason label, request id of the ERROR)
    "flipped bit": (ErrorCode.BAD_TAG, "bad_tag", 9),
    "replayed": (ErrorCode.BAD_COUNTER, "bad_counter", 8),
    "reordered": (ErrorCode.BAD_COUNTER, "bad_counter", 9),
    "reflected": (ErrorCode.BAD_TAG, "bad_tag", 9),
    "not sealed": (ErrorCode.BAD_FLAGS, "not_sealed", 9),
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
async def test_a_frame_that_fails_its_seal_is_refused_counted_and_logged(
    engine: EngineUnderTest, card: Card, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    code, reason, request_id = REFUSALS[how]
    terminal = await RawTerminal.open(engine.port, terminal_key(engine.data_dir, BUS_VALIDATOR))
    seq = fresh_seq()
    caplog.set_level(logging.INFO, logger="citycard.session")
    terminal.send(await tampered(how, terminal, card, seq))
    frames = await terminal.until_closed()
    # One ERROR, sealed like every engine frame after AUTH_OK (read_frames opened it), then the close.
    assert [(msg_type, answered) for msg_type, answered, _ in frames] == [(MessageType.ERROR, request_id)]
    assert fastpath.decode_error(frames[0][2])[0] == code

    assert engine.engine is not None and engine.engine.context is not None
    assert engine.engine.context.counters.frames_rejected == {reason: 1}
    exposition = prometheus_client.generate_latest(engine.engine.metrics.registry).decode()
    assert f'citycard_frames_rejected_total{{reason="{reason}"}} 1.0' in exposition
    [record] = [r for r in caplog.records if r.getMessage() == "frame rejected"]
    assert record.levelno == logging.WARNING and record.created > 0  # when
    assert (record.terminal_id, record.key_version, record.reason) == (BUS_VALIDATOR, 1, reason)  # type: ignore[attr-defined]
    assert record.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert record.request_id == request_id  # type: ignore[attr-defined]
    if how != "not sealed":  # a plain frame is refused from its header, before its type is read
        assert record.msg_type in ("0x10", "0x20")  # type: ignore[attr-defined]

    # Nothing was acted upon: no tap of that sequence exists.
    conn = await asyncpg.connect(engine.dsn)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM taps WHERE terminal_id = $1 AND terminal_seq >= $2", 1, seq) == 0
        )
    finally:
        await conn.close()
    client = await engine.client()
    assert (await client.tap(fresh_seq(), card.uid)).result == ResultCode.APPROVED


async def test_sealed_requests_pipelined_behind_auth(engine: EngineUnderTest, card: Card) -> None:
    """A terminal may seal its requests right behind its AUTH, before AUTH_OK
    arrives; the engine's answers are sealed with consecutive counters."""
    key = terminal_key(engine.data_dir, BUS_VALIDATOR)
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    terminal = RawTerminal(reader, writer)
    client_nonce = os.urandom(16)
    writer.write(fastpath.encode_hello(1, BUS_VALIDATOR, 1, client_nonce))
    [(_, _, body)] = await terminal.read_frames(1)
    server_nonce = fastpath.decode_challenge(body)
    keys = derive_session_keys(key, BUS_VALIDATOR, 1, client_nonce, server_nonce)
    sealer = Sealer(keys.terminal_to_engine)
    proof = fastpath.terminal_proof(key, BUS_VALIDATOR, 1, client_nonce, server_nonce)
    terminal.opener = Opener(keys.engine_to_terminal)
    seq = fresh_seq()
    writer.write(
        fastpath.encode_auth(2, proof)
        + sealer.seal(fastpath.encode_ping(3, 5))
        + sealer.seal(tap(4, seq, card))
        + sealer.seal(fastpath.encode_ping(5, 6))
    )
    [(msg_type, _, _)] = await terminal.read_frames(1)
    assert msg_type == MessageType.AUTH_OK
    frames = await terminal.read_frames(3)
    assert sorted((msg_type, request_id) for msg_type, request_id, _ in frames) == sorted(
        [(MessageType.PONG, 3), (MessageType.TAP_RESULT, 4), (MessageType.PONG, 5)]
    )
    assert terminal.opener.counter == 3
    writer.close()


async def test_a_burst_beyond_a_turn_is_answered_in_order(engine: EngineUnderTest) -> None:
    """More sealed frames in one write than the engine decides in a turn of
    its loop (SESSION_FRAMES_PER_TURN): the rest wait for later turns, and
    every answer still comes, in order, sealed with consecutive counters."""
    terminal = await RawTerminal.open(engine.port, terminal_key(engine.data_dir, BUS_VALIDATOR))
    context = engine.engine.context
    assert terminal.sealer is not None and terminal.opener is not None and context is not None
    before = context.turns.deferred_frames
    count = 8 * SESSION_FRAMES_PER_TURN
    terminal.writer.write(b"".join(terminal.sealer.seal(fastpath.encode_ping(n, n)) for n in range(1, count + 1)))
    frames = await terminal.read_frames(count)
    assert [(msg_type, request_id) for msg_type, request_id, _ in frames] == [
        (MessageType.PONG, n) for n in range(1, count + 1)
    ]
    assert [fastpath.decode_pong(body) for _, _, body in frames] == list(range(1, count + 1))
    assert terminal.opener.counter == count
    # 4,096 frames of 44 bytes reach the engine in reads far larger than a turn's share.
    assert context.turns.deferred_frames > before
    terminal.writer.close()


class StandInEngine:
    """Answers a handshake as the engine would, then each PING with a PONG
    that fails its seal: its tag altered, or the first PONG sent again."""

    def __init__(self, key: bytes, tampering: str) -> None:
        self.key = key
        self.tampering = tampering

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = fastpath.FrameReader()
        pending: list[tuple[int, int, bytes]] = []

        async def receive() -> tuple[int, int, bytes]:
            while not pending:
                data = await reader.read(4096)
                if not data:
                    raise ConnectionError("closed")
                pending.extend(frames.feed(data))
            return pending.pop(0)

        _, request_id, body = await receive()  # HELLO
        terminal_id, key_version, client_nonce = fastpath.decode_hello(body)
        server_nonce = os.urandom(16)
        writer.write(fastpath.encode_challenge(request_id, server_nonce))
        _, request_id, _ = await receive()  # AUTH: the client's checks are under test, not its proof
        inputs = (terminal_id, key_version, client_nonce, server_nonce)
        writer.write(fastpath.encode_auth_ok(request_id, fastpath.engine_proof(self.key, *inputs), 0))
        sealer = Sealer(derive_session_keys(self.key, *inputs).engine_to_terminal)
        first = b""
        try:
            while True:
                _, request_id, _ = await receive()  # a sealed PING
                pong = first or sealer.seal(fastpath.encode_pong(request_id, 1))
                if self.tampering == "flipped bit":
                    pong = pong[:-1] + bytes([pong[-1] ^ 0x80])
                first = first or pong
                writer.write(pong)
        except ConnectionError:
            writer.close()


@pytest.mark.parametrize(
    ("tampering", "code"), [("flipped bit", ErrorCode.BAD_TAG), ("replayed", ErrorCode.BAD_COUNTER)]
)
async def test_clients_refuse_an_engine_frame_that_fails_its_seal(tampering: str, code: int) -> None:
    key = bytes(range(32))
    answered_first = tampering == "replayed"  # a replayed PONG is the first one, sent again
    async with await asyncio.start_server(StandInEngine(key, tampering), "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = await TerminalClient.connect("127.0.0.1", port, terminal_id=7, key=key, timeout=5)
        if answered_first:
            assert await client.ping(1) == 1
        with pytest.raises(fastpath.ProtocolError) as raised:
            await client.ping(1)
        assert raised.value.code == code
        with pytest.raises(fastpath.ProtocolError):
            await client.ping(1)  # nothing more from that connection
        await client.close()

        def blocking() -> int:
            with BlockingTerminalClient("127.0.0.1", port, terminal_id=7, key=key, timeout=5) as terminal:
                if answered_first:
                    assert terminal.ping(1) == 1
                with pytest.raises(fastpath.ProtocolError) as refused:
                    terminal.ping(1)
                return int(refused.value.code)

        assert await asyncio.to_thread(blocking) == code


# --- Key rotation ----------------------------------------------------------------------------


async def rotate(dsn: str, terminal_id: int) -> tuple[int, int, bool]:
    conn = await asyncpg.connect(dsn)
    try:
        return await start_rotation(conn, terminal_id, "test")
    finally:
        await conn.close()


async def versions(dsn: str, terminal_id: int) -> tuple[int, int | None]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT key_version, next_key_version FROM terminals WHERE id = $1", terminal_id)
    finally:
        await conn.close()
    return row[0], row[1]


async def test_key_rotation_without_downtime(engine: EngineUnderTest, card: Card) -> None:
    assert engine.engine is not None
    rotation = engine.engine.key_rotation
    old, new = 1, 2

    async def connect(version: int) -> TerminalClient:
        return await engine.client(ROTATING, key_version=version)

    before = await connect(old)
    with pytest.raises(AuthenticationError, match="AUTH_FAILED"):
        await connect(new)  # no rotation yet: the next key is refused

    assert await rotate(engine.dsn, ROTATING) == (old, new, True)
    assert await rotate(engine.dsn, ROTATING) == (old, new, False)  # again: nothing changes
    await wait_for(lambda: rotation.pending.get(ROTATING) == new)  # the notice reached the engine

    # The window: the old key still opens sessions, as often as needed.
    for _ in range(2):
        assert (await (await connect(old)).tap(fresh_seq(), card.uid)).approved
    assert await versions(engine.dsn, ROTATING) == (old, new)

    # The first session under the new key completes the rotation...
    after = await connect(new)
    assert (await after.tap(fresh_seq(), card.uid)).approved
    with pytest.raises(AuthenticationError, match="AUTH_FAILED"):
        await connect(old)  # ...and the old key is refused from then on,
    assert (await (await connect(new)).tap(fresh_seq(), card.uid)).approved
    assert (await before.tap(fresh_seq(), card.uid)).approved  # but a session open under it stays open.

    # In the database too, with the audit trail, and after a restart.
    await wait_for(lambda: not rotation._records)
    assert await versions(engine.dsn, ROTATING) == (new, None)
    conn = await asyncpg.connect(engine.dsn)
    try:
        actions = await conn.fetch(
            "SELECT actor, action, detail FROM audit_log WHERE subject = $1 ORDER BY id", f"terminal:{ROTATING}"
        )
    finally:
        await conn.close()
    assert [(row["actor"], row["action"]) for row in actions] == [
        ("test", "terminal.rotate_key"),
        ("engine", "terminal.key_rotated"),
    ]
    assert json.loads(actions[1]["detail"]) == {"key_version": new, "retired_key_version": old}
    await engine.restart()
    with pytest.raises(AuthenticationError, match="AUTH_FAILED"):
        await connect(old)
    assert (await (await connect(new)).tap(fresh_seq(), card.uid)).approved


async def test_a_pending_rotation_survives_a_restart(engine: EngineUnderTest) -> None:
    await rotate(engine.dsn, ROTATING_TOO)
    await engine.restart()  # the engine reads it at start, not from the notice
    assert engine.engine is not None
    assert engine.engine.key_rotation.pending[ROTATING_TOO] == 2
    await engine.client(ROTATING_TOO, key_version=1)
    await engine.client(ROTATING_TOO, key_version=2)
    with pytest.raises(AuthenticationError):
        await engine.client(ROTATING_TOO, key_version=1)


def citycard(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """The command in its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--data-dir", str(data_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


@pytest.fixture
def in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """The command run by ``engine.cli.main`` in this process (a second each
    saved), its logging left as the test set it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(logs, "configure", lambda level: None)

    def run(*args: str, data_dir: Path) -> tuple[int, str, str]:
        try:
            status = cli.main([*args, "--data-dir", str(data_dir)])
        except SystemExit as leaving:  # argparse's usage errors
            status = int(leaving.code or 0)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_rotate_key_command(city_dsn: str, tmp_path: Path, in_process: Callable[..., tuple[int, str, str]]) -> None:
    master = load_master_key(tmp_path)
    terminal = 3  # the kiosk
    rotate_key = ("terminal", "rotate-key", "--terminal", str(terminal), "--actor", "ana", "--dsn", city_dsn)
    done = citycard(*rotate_key, data_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["next_key"] == derive_terminal_key(master, terminal, printed["next_key_version"]).hex()
    assert (printed["key_version"] + 1, printed["started"]) == (printed["next_key_version"], True)
    status, out, _ = in_process(*rotate_key, data_dir=tmp_path)
    assert (status, json.loads(out)) == (0, {**printed, "started": False})  # again: nothing changes
    status, out, _ = in_process("terminal-key", "--terminal", str(terminal), "--dsn", city_dsn, data_dir=tmp_path)
    shown = json.loads(out)
    assert (shown["next_key_version"], shown["next_key"]) == (printed["next_key_version"], printed["next_key"])
    unknown = ("terminal", "rotate-key", "--terminal", "999", "--actor", "ana", "--dsn", city_dsn)
    assert in_process(*unknown, data_dir=tmp_path) == (2, "", "citycard: error: no terminal 999\n")


async def test_no_key_in_the_database_or_the_logs(
    engine: EngineUnderTest, card: Card, caplog: pytest.LogCaptureFixture
) -> None:
    """Every key in play (master, terminal keys old and new, session keys) is
    searched for in hex in every log record and every table."""
    caplog.set_level(logging.DEBUG)
    master = load_master_key(engine.data_dir)
    secrets = [master, terminal_key(engine.data_dir, BUS_VALIDATOR)]
    terminal = await RawTerminal.open(engine.port, secrets[1])
    assert terminal.keys is not None
    secrets += [terminal.keys.terminal_to_engine, terminal.keys.engine_to_terminal]
    terminal.send(terminal.seal(tap(3, fresh_seq(), card)))
    await terminal.read_frames(1)
    terminal.send(tap(4, fresh_seq(), card))  # refused: logged
    await terminal.until_closed()
    current, following, _ = await rotate(engine.dsn, ROTATING_TOO)
    secrets += [derive_terminal_key(master, ROTATING_TOO, version) for version in (current, following)]
    await wait_for(lambda: engine.engine is not None and ROTATING_TOO in engine.engine.key_rotation.pending)
    await engine.client(ROTATING_TOO, key_version=following)  # completes the rotation: logged and recorded
    await engine.stop()
    conn = await asyncpg.connect(engine.dsn)
    try:
        tables = [row[0] for row in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        dump = "\n".join(
            [
                await conn.fetchval(f"SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM \"{name}\" t")
                for name in tables
            ]
        )
    finally:
        await conn.close()
    formatter = logs.JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "frame rejected" in logged and "terminal key rotated" in logged
    assert f"terminal:{ROTATING_TOO}" in dump  # the tables were read, the audit trail with them
    for secret in secrets:
        for text in (secret.hex(), secret.hex().upper()):
            assert text not in logged
            assert text not in dump


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "engine.pem", directory / "engine.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    return cert, key


@pytest.fixture
async def tls_engine(city_dsn: str, tmp_path: Path, certificate: tuple[Path, Path]) -> AsyncIterator[EngineUnderTest]:
    cert, key = certificate
    async with running_engine(city_dsn, tmp_path, tls_cert=str(cert), tls_key=str(key)) as under_test:
        yield under_test


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_listener(tls_engine: EngineUnderTest, card: Card, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    key = terminal_key(tls_engine.data_dir, BUS_VALIDATOR)
    tls = client_context(str(cert))
    assert tls.minimum_version == MINIMUM_VERSION == ssl.TLSVersion.TLSv1_2
    client = await TerminalClient.connect("127.0.0.1", tls_engine.port, terminal_id=BUS_VALIDATOR, key=key, tls=tls)
    try:
        assert (await client.tap(fresh_seq(), card.uid)).approved
        assert client._writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    finally:
        await client.close()

    def blocking() -> bool:
        with BlockingTerminalClient(
            "localhost", tls_engine.port, terminal_id=BUS_VALIDATOR, key=key, tls=tls
        ) as terminal:
            return terminal.tap(fresh_seq(), card.uid).approved

    assert await asyncio.to_thread(blocking)

    # Without TLS, or trusting another CA, no session opens.
    with pytest.raises((ConnectionLost, ConnectionError, OSError, EngineError, TimeoutError, fastpath.ProtocolError)):
        await TerminalClient.connect("127.0.0.1", tls_engine.port, terminal_id=BUS_VALIDATOR, key=key, timeout=2)
    with pytest.raises(ssl.SSLCertVerificationError):
        await TerminalClient.connect(
            "127.0.0.1", tls_engine.port, terminal_id=BUS_VALIDATOR, key=key, tls=client_context()
        )
    too_old = client_context(str(cert))
    too_old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    too_old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await TerminalClient.connect("127.0.0.1", tls_engine.port, terminal_id=BUS_VALIDATOR, key=key, tls=too_old)


async def test_citycard_tap_over_tls(
    tls_engine: EngineUnderTest,
    card: Card,
    certificate: tuple[Path, Path],
    in_process: Callable[..., tuple[int, str, str]],
) -> None:
    cert, _ = certificate
    engine = f"127.0.0.1:{tls_engine.port}"
    args = ("tap", "--engine", engine, "--terminal", str(BUS_VALIDATOR), "--card", str(card.uid))
    # A blocking client: off the loop the engine runs on.
    status, out, err = await asyncio.to_thread(in_process, *args, "--tls-ca", str(cert), data_dir=tls_engine.data_dir)
    assert status == 0, err
    assert json.loads(out)["result"] == "APPROVED"
    status, out, err = await asyncio.to_thread(
        in_process, *args, "--tls-ca", f"{cert}.missing", data_dir=tls_engine.data_dir
    )
    assert (status, err) == (2, f"citycard: error: TLS: no such CA file: {cert}.missing\n")
    status, out, err = await asyncio.to_thread(in_process, *args, data_dir=tls_engine.data_dir)  # without TLS
    assert status == 1 and err.startswith("citycard: error: ")


@pytest.fixture
def bad_files(tmp_path: Path, certificate: tuple[Path, Path]) -> Iterator[dict[str, Path]]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    yield {"cert": certificate[0], "key": certificate[1], "garbage": garbage, "missing": tmp_path / "missing.pem"}


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        ("garbage", "key", "citycard: error: TLS: cannot use certificate {garbage} with key {key}: "),
        ("cert", "garbage", "citycard: error: TLS: cannot use certificate {cert} with key {garbage}: "),
        ("cert", None, "citycard: error: --tls-cert and --tls-key go together"),
    ],
    ids=["bad-cert", "bad-key", "no-key"],
)
def test_serve_refuses_bad_tls_files(
    bad_files: dict[str, Path],
    tmp_path: Path,
    in_process: Callable[..., tuple[int, str, str]],
    cert: str,
    key: str | None,
    message: str,
) -> None:
    args = ["serve", "--listen", "127.0.0.1:0", "--metrics", "off", "--tls-cert", str(bad_files[cert])]
    if key is not None:
        args += ["--tls-key", str(bad_files[key])]
    status, _, err = in_process(*args, data_dir=tmp_path)
    assert status == 2
    assert err.splitlines()[-1].startswith(message.format(**{name: str(path) for name, path in bad_files.items()}))


def test_serve_with_a_missing_certificate_exits_with_a_message(bad_files: dict[str, Path], tmp_path: Path) -> None:
    """In its own process: the exit status and one line, no traceback, nothing started."""
    done = citycard(
        "serve",
        "--metrics",
        "off",
        "--tls-cert",
        str(bad_files["missing"]),
        "--tls-key",
        str(bad_files["key"]),
        data_dir=tmp_path,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"citycard: error: TLS: no such file: {bad_files['missing']}\n"
    assert not (tmp_path / "pg").exists()
