"""A blocking terminal client (sockets, no event loop), on the shared codec.

For tools that are not asyncio: the locust suite, ``citycard tap``, scripts.
Every frame after the handshake is sealed both ways (``engine/seal.py``);
with ``tls`` (``engine.tls.client_context()``) the connection is TLS too.

>>> with BlockingTerminalClient("127.0.0.1", 7700, terminal_id=1, key=key) as client:  # doctest: +SKIP
...     print(client.tap(terminal_seq=1, card_uid=0x04A1B2C3D4E5F6))
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import time
from types import TracebackType

from engine import fastpath
from engine.client import (
    DEFAULT_TIMEOUT_S,
    READ_CHUNK_BYTES,
    REQUEST_ID_MODULUS,
    AuthenticationError,
    ConnectionLost,
    EngineError,
    TapResult,
)
from engine.codes import ErrorCode, MessageType, ResultCode, TapInfo
from engine.limits import NONCE_BYTES
from engine.seal import Opener, Sealer, derive_session_keys


class BlockingTerminalClient:
    """One authenticated session; each call sends one request and waits for its reply."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        terminal_id: int,
        key: bytes,
        key_version: int = 1,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._frames = fastpath.FrameReader()
        self._ready: list[tuple[int, int, bytes]] = []
        self._next_request_id = 1
        # Set during the handshake: the engine's frames after AUTH_OK are
        # opened, ours after AUTH are sealed.
        self._opener: Opener | None = None
        self._receiving_sealed = False
        self._sealer: Sealer | None = None
        try:
            if tls is not None:
                self._socket = tls.wrap_socket(self._socket, server_hostname=host)
            self._handshake(terminal_id, key, key_version)
        except BaseException:
            self.close()
            raise

    def _handshake(self, terminal_id: int, key: bytes, key_version: int) -> None:
        client_nonce = os.urandom(NONCE_BYTES)
        rid = self._take_id()
        msg_type, body = self._exchange(rid, fastpath.encode_hello(rid, terminal_id, key_version, client_nonce))
        if msg_type != MessageType.CHALLENGE:
            raise AuthenticationError(f"expected CHALLENGE, got type 0x{msg_type:02x}")
        server_nonce = fastpath.decode_challenge(body)
        proof = fastpath.terminal_proof(key, terminal_id, key_version, client_nonce, server_nonce)
        keys = derive_session_keys(key, terminal_id, key_version, client_nonce, server_nonce)
        self._opener = Opener(keys.engine_to_terminal)
        rid = self._take_id()
        try:
            msg_type, body = self._exchange(rid, fastpath.encode_auth(rid, proof))
        except EngineError as error:
            raise AuthenticationError(str(error)) from None
        if msg_type != MessageType.AUTH_OK:
            raise AuthenticationError(f"expected AUTH_OK, got type 0x{msg_type:02x}")
        engine_proof, self.engine_time_ms = fastpath.decode_auth_ok(body)
        expected = fastpath.engine_proof(key, terminal_id, key_version, client_nonce, server_nonce)
        if not hmac.compare_digest(engine_proof, expected):
            raise AuthenticationError("the engine's proof is wrong: not our engine")
        self._sealer = Sealer(keys.terminal_to_engine)

    def tap(
        self,
        terminal_seq: int,
        card_uid: int,
        *,
        card_counter: int = 0,
        event_time_ms: int | None = None,
        tap_flags: int = 0,
    ) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        rid = self._take_id()
        return self._result(rid, fastpath.encode_tap(rid, terminal_seq, card_uid, card_counter, when, tap_flags))

    def topup(
        self, terminal_seq: int, card_uid: int, amount_cents: int, *, event_time_ms: int | None = None
    ) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        rid = self._take_id()
        return self._result(rid, fastpath.encode_topup(rid, terminal_seq, card_uid, amount_cents, when))

    def reversal(self, terminal_seq: int, original_seq: int, *, event_time_ms: int | None = None) -> TapResult:
        when = event_time_ms if event_time_ms is not None else time.time_ns() // 1_000_000
        rid = self._take_id()
        return self._result(rid, fastpath.encode_reversal(rid, terminal_seq, original_seq, when))

    def ping(self, payload: int = 0) -> int:
        rid = self._take_id()
        _, body = self._exchange(rid, fastpath.encode_ping(rid, payload))
        return int(fastpath.decode_pong(body))

    def _take_id(self) -> int:
        rid = self._next_request_id
        self._next_request_id = (rid + 1) % REQUEST_ID_MODULUS or 1
        return rid

    def _result(self, request_id: int, frame: bytes) -> TapResult:
        msg_type, body = self._exchange(request_id, frame)
        if msg_type != MessageType.TAP_RESULT:
            raise EngineError(ErrorCode.UNEXPECTED_MESSAGE, f"expected TAP_RESULT, got type 0x{msg_type:02x}")
        seq, result, amount, balance, info = fastpath.decode_tap_result(body)
        return TapResult(seq, ResultCode(result), amount, balance, TapInfo(info))

    def _exchange(self, request_id: int, frame: bytes) -> tuple[int, bytes]:
        sealer = self._sealer
        try:
            self._socket.sendall(frame if sealer is None else sealer.seal(frame))
            while True:
                for index, (msg_type, rid, body) in enumerate(self._ready):
                    if msg_type == MessageType.ERROR:
                        code, text = fastpath.decode_error(body)
                        raise EngineError(code, text)
                    if rid == request_id:
                        del self._ready[index]
                        return msg_type, body
                data = self._socket.recv(READ_CHUNK_BYTES)
                if not data:
                    raise ConnectionLost("connection closed by the engine")
                for msg_type, rid, body in self._frames.feed(data):
                    self._ready.append((msg_type, rid, self._open(msg_type, rid, body)))
                if self._frames.error is not None:
                    raise self._frames.error
        except OSError as error:  # timeouts included
            raise ConnectionLost(f"connection lost: {error}") from None

    def _open(self, msg_type: int, request_id: int, body: bytes) -> bytes:
        """A received frame's body, its seal checked and stripped after AUTH_OK."""
        if self._receiving_sealed:
            assert self._opener is not None
            return self._opener.open(msg_type, request_id, body)
        if msg_type == MessageType.AUTH_OK:
            if self._opener is None:
                raise fastpath.ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "AUTH_OK before AUTH")
            self._receiving_sealed = True  # every frame after it is sealed
        return body

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> BlockingTerminalClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
