"""An asyncio terminal client with pipelining, on the engine's own codec.

>>> async def ride():                                              # doctest: +SKIP
...     client = await TerminalClient.connect("127.0.0.1", 7700, terminal_id=1, key=key)
...     result = await client.tap(terminal_seq=1, card_uid=0x04A1B2C3D4E5F6)
...     print(result.result.name, result.amount_cents, result.balance_cents)
...     await client.close()

Many requests may be outstanding at once (``asyncio.gather`` over ``tap``):
each gets its own request id and its reply is matched by it. Every frame
after the handshake is sealed both ways (``engine/seal.py``); with ``tls``
(``engine.tls.client_context()``) the connection is TLS too.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import ssl
import time

import msgspec

from engine import fastpath
from engine.codes import ErrorCode, MessageType, ResultCode, TapInfo
from engine.limits import MAX_IN_FLIGHT_PER_CONNECTION, NONCE_BYTES
from engine.seal import Opener, Sealer, derive_session_keys

# Request ids wrap at 2**32; a terminal never has that many outstanding.
REQUEST_ID_MODULUS = 1 << 32

# Bytes read from the socket per call: many replies per read under load.
READ_CHUNK_BYTES = 64 * 1024

DEFAULT_TIMEOUT_S = 10.0


class TapResult(msgspec.Struct, frozen=True):
    """The engine's answer to a TAP, TOPUP or REVERSAL.

    ``info`` says why, beyond the result code: what the terminal shows or
    asks for (docs/protocol.md, "Info bits").

    >>> TapResult(1001, ResultCode.APPROVED, 150, 1850, TapInfo.CONCESSION_NOT_VALID).info.name
    'CONCESSION_NOT_VALID'
    """

    terminal_seq: int
    result: ResultCode
    amount_cents: int
    balance_cents: int
    info: TapInfo = TapInfo.NONE

    @property
    def approved(self) -> bool:
        return self.result == ResultCode.APPROVED


class EngineError(Exception):
    """The engine sent ERROR (and closed the connection)."""

    def __init__(self, code: int, text: str) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"{name}: {text}")
        self.code = code
        self.text = text


class ConnectionLost(Exception):
    """The connection closed with requests unanswered: retry them with the same sequence."""


class AuthenticationError(Exception):
    """The engine refused the terminal, or failed to prove it knows the key."""


class TerminalClient:
    """One authenticated session. Not thread-safe; one event loop."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_in_flight: int = MAX_IN_FLIGHT_PER_CONNECTION,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = fastpath.FrameReader()
        self._next_request_id = 1
        self._waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._receiver: asyncio.Task[None] | None = None
        self._failure: Exception | None = None
        # Set during the handshake: the engine's frames after AUTH_OK are
        # opened, ours after AUTH are sealed.
        self._opener: Opener | None = None
        self._receiving_sealed = False
        self._sealer: Sealer | None = None
        self.engine_time_ms = 0
        # The engine closes a connection with more unanswered requests than
        # its limit; callers may gather thousands, so the client waits here.
        self._slots = asyncio.Semaphore(max_in_flight)

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        terminal_id: int,
        key: bytes,
        key_version: int = 1,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> TerminalClient:
        """Open a connection (TLS with ``tls``) and run the handshake."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), timeout)
        client = cls(reader, writer)
        client._receiver = asyncio.create_task(client._receive())
        try:
            await asyncio.wait_for(client._handshake(terminal_id, key, key_version), timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _handshake(self, terminal_id: int, key: bytes, key_version: int) -> None:
        client_nonce = os.urandom(NONCE_BYTES)
        msg_type, body = await self._request(
            lambda rid: fastpath.encode_hello(rid, terminal_id, key_version, client_nonce)
        )
        if msg_type != MessageType.CHALLENGE:
            raise AuthenticationError(f"expected CHALLENGE, got type 0x{msg_type:02x}")
        server_nonce = fastpath.decode_challenge(body)
        proof = fastpath.terminal_proof(key, terminal_id, key_version, client_nonce, server_nonce)
        keys = derive_session_keys(key, terminal_id, key_version, client_nonce, server_nonce)
        self._opener = Opener(keys.engine_to_terminal)
        try:
            msg_type, body = await self._request(lambda rid: fastpath.encode_auth(rid, proof))
        except EngineError as error:
            raise AuthenticationError(str(error)) from None
        if msg_type != MessageType.AUTH_OK:
            raise AuthenticationError(f"expected AUTH_OK, got type 0x{msg_type:02x}")
        engine_proof, self.engine_time_ms = fastpath.decode_auth_ok(body)
        expected = fastpath.engine_proof(key, terminal_id, key_version, client_nonce, server_nonce)
        if not hmac.compare_digest(engine_proof, expected):
            raise AuthenticationError("the engine's proof is wrong: not our engine")
        self._sealer = Sealer(keys.terminal_to_engine)

    # --- requests -----------------------------------------------------------------

    async def tap(
        self,
        terminal_seq: int,
        card_uid: int,
        *,
        card_counter: int = 0,
        event_time_ms: int | None = None,
        tap_flags: int = 0,
    ) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        return await self._result(
            lambda rid: fastpath.encode_tap(rid, terminal_seq, card_uid, card_counter, when, tap_flags)
        )

    async def topup(
        self, terminal_seq: int, card_uid: int, amount_cents: int, *, event_time_ms: int | None = None
    ) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        return await self._result(lambda rid: fastpath.encode_topup(rid, terminal_seq, card_uid, amount_cents, when))

    async def reversal(self, terminal_seq: int, original_seq: int, *, event_time_ms: int | None = None) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        return await self._result(lambda rid: fastpath.encode_reversal(rid, terminal_seq, original_seq, when))

    async def ping(self, payload: int = 0) -> int:
        _, body = await self._request(lambda rid: fastpath.encode_ping(rid, payload))
        return int(fastpath.decode_pong(body))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (for protocol tests)."""
        self._writer.write(data)
        await self._writer.drain()

    def seal(self, frame: bytes) -> bytes:
        """Seal a frame as the next one this session sends (for protocol tests,
        with ``send_raw``); the frame must then be sent before any other."""
        if self._sealer is None:
            raise RuntimeError("the session is not open")
        return self._sealer.seal(frame)

    async def _result(self, encode: object) -> TapResult:
        msg_type, body = await self._request(encode)
        if msg_type != MessageType.TAP_RESULT:
            raise EngineError(ErrorCode.UNEXPECTED_MESSAGE, f"expected TAP_RESULT, got type 0x{msg_type:02x}")
        seq, result, amount, balance, info = fastpath.decode_tap_result(body)
        return TapResult(seq, ResultCode(result), amount, balance, TapInfo(info))

    async def _request(self, encode: object) -> tuple[int, bytes]:
        async with self._slots:
            if self._failure is not None:
                raise self._failure
            request_id = self._next_request_id
            self._next_request_id = (request_id + 1) % REQUEST_ID_MODULUS or 1
            if self._writer.is_closing():
                raise ConnectionLost("connection closed")
            future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = future
            frame: bytes = encode(request_id)  # type: ignore[operator]
            sealer = self._sealer
            try:
                self._writer.write(frame if sealer is None else sealer.seal(frame))
            except (ConnectionError, OSError, RuntimeError) as error:
                # RuntimeError: uvloop's transport when it was closed under us.
                self._waiting.pop(request_id, None)
                raise ConnectionLost(f"connection lost: {error}") from None
            return await future

    # --- receiving -------------------------------------------------------------------

    async def _receive(self) -> None:
        failure: Exception = ConnectionLost("connection closed by the engine")
        try:
            while True:
                data = await self._reader.read(READ_CHUNK_BYTES)
                if not data:
                    break
                for msg_type, request_id, body in self._frames.feed(data):
                    if self._receiving_sealed:
                        assert self._opener is not None
                        body = self._opener.open(msg_type, request_id, body)
                    elif msg_type == MessageType.AUTH_OK:
                        if self._opener is None:
                            raise fastpath.ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "AUTH_OK before AUTH")
                        self._receiving_sealed = True  # every frame after it is sealed
                    if msg_type == MessageType.ERROR:
                        code, text = fastpath.decode_error(body)
                        failure = EngineError(code, text)
                        future = self._waiting.pop(request_id, None)
                        if future is not None and not future.done():
                            future.set_exception(failure)
                        continue
                    future = self._waiting.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result((msg_type, body))
                if self._frames.error is not None:
                    failure = self._frames.error
                    break
        except (ConnectionError, OSError) as error:
            failure = ConnectionLost(f"connection lost: {error}")
        except fastpath.ProtocolError as error:
            # A frame that fails its seal: nothing more from this engine is trusted.
            failure = error
            self._writer.close()
        except asyncio.CancelledError:
            failure = ConnectionLost("client closed")
        self._failure = failure
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(failure)
        self._waiting.clear()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        if self._receiver is not None:
            self._receiver.cancel()
            try:
                await self._receiver
            except asyncio.CancelledError:
                pass
