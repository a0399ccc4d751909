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

For working offline (docs/offline.md) a terminal keeps a ``HotlistCopy``
(``await copy.refresh(client)`` brings it to the engine's version, checking
every page's signature), the rules of its service (``client.rules()``), and
uploads what it decided meanwhile (``client.upload_offline(taps)``). The
engine's NOTICEs land in ``client.notices``.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import ssl
import time

import msgspec

from engine import fastpath
from engine.codes import ErrorCode, HotlistReason, MessageType, ResultCode, TapInfo
from engine.limits import MAX_IN_FLIGHT_PER_CONNECTION, NONCE_BYTES, SIGNATURE_BYTES
from engine.seal import Opener, Sealer, derive_session_keys
from engine.signing import HOTLIST_LABEL, RULES_LABEL, verify

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


class HotlistPage(msgspec.Struct, frozen=True):
    """One HOTLIST page; ``content`` is what ``signature`` signs (after the label)."""

    flags: int
    since_version: int
    version: int
    after_uid: int
    entries: list[tuple[int, int]]
    signature: bytes
    content: bytes

    @property
    def whole_list(self) -> bool:
        return bool(self.flags & fastpath.HOTLIST_FLAG_FULL)

    @property
    def more(self) -> bool:
        return bool(self.flags & fastpath.HOTLIST_FLAG_MORE)


class ServiceRules(msgspec.Struct, frozen=True):
    """One RULES message: a rules version's terms for the terminal's service."""

    rules_version: int
    service_id: int
    service_kind: int
    min_balance_to_enter_cents: int
    tolerated_negative_cents: int
    passback_window_s: int
    max_charge_cents: int
    transfer_window_minutes: int
    transfer_percent_off: int
    cap_daily_cents: int
    cap_monthly_cents: int
    fares: list[tuple[int, int]]
    signature: bytes
    content: bytes

    def fare(self, profile_id: int) -> int | None:
        """The fare for a profile, None when the service does not serve it."""
        return dict(self.fares).get(profile_id)


class SignatureError(Exception):
    """A list from the engine whose signature does not verify: not the engine's."""


class HotlistCopy:
    """A terminal's own copy of the hot list, kept current from the engine.

    ``listed`` maps card uid -> reason (engine.codes.HotlistReason);
    ``version`` is the engine's version this copy holds. ``refresh`` asks
    for the changes since it, page by page (the whole list when the copy is
    empty or too old), and checks each page's signature with the engine's
    list key (``citycard list-key``) before applying it.

    >>> copy = HotlistCopy(public_key)                 # doctest: +SKIP
    >>> await copy.refresh(client); copy.refuses(uid)  # doctest: +SKIP
    """

    def __init__(self, public_key: bytes | None) -> None:
        self.public_key = public_key
        self.version = 0
        self.listed: dict[int, int] = {}

    def refuses(self, card_uid: int) -> bool:
        return card_uid in self.listed

    def apply(self, page: HotlistPage) -> None:
        """Apply one page whose signature was checked."""
        if page.whole_list and page.after_uid == 0:
            self.listed.clear()
        for card_uid, reason in page.entries:
            if reason == HotlistReason.DELISTED:
                self.listed.pop(card_uid, None)
            else:
                self.listed[card_uid] = reason

    async def refresh(self, client: TerminalClient) -> int:
        """Bring the copy to the engine's version; returns the pages read.

        A whole list comes in pages by uid, each of the version current when
        it was sent: the copy then holds the version of the first page, and
        the changes since it (asked for next) bring every card up to date.
        """
        pages = 0
        since, after_uid = self.version, 0
        whole_list_version: int | None = None
        while True:
            page = await client.hotlist(since, after_uid)
            pages += 1
            if self.public_key is not None and not verify(self.public_key, HOTLIST_LABEL, page.content, page.signature):
                raise SignatureError(f"HOTLIST page since {since} after {after_uid}: bad signature")
            self.apply(page)
            if page.whole_list:
                if whole_list_version is None:
                    whole_list_version = page.version
                if page.more:
                    since, after_uid = 0, page.entries[-1][0]
                    continue
                self.version = whole_list_version
                whole_list_version = None
                if self.version == 0:
                    return pages  # the list has never changed: nothing came meanwhile
                since, after_uid = self.version, 0
                continue  # then the changes made while the pages came
            self.version = page.version
            if not page.more:
                return pages
            since = page.version


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
        # NOTICEs the engine pushed: (hotlist_version, rules_version), newest last.
        self.notices: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
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

    async def hotlist(self, since_version: int = 0, after_uid: int = 0) -> HotlistPage:
        """One HOTLIST page: the changes since ``since_version`` (0: the whole list)."""
        msg_type, body = await self._request(lambda rid: fastpath.encode_hotlist_request(rid, since_version, after_uid))
        self._expect(msg_type, MessageType.HOTLIST)
        flags, since, version, after, entries, signature = fastpath.decode_hotlist(body)
        return HotlistPage(flags, since, version, after, entries, signature, body[:-SIGNATURE_BYTES])

    async def rules(self, rules_version: int = 0, *, public_key: bytes | None = None) -> ServiceRules:
        """The rules of this terminal's service (``rules_version`` 0: in force);
        with ``public_key``, their signature is checked."""
        msg_type, body = await self._request(lambda rid: fastpath.encode_rules_request(rid, rules_version))
        self._expect(msg_type, MessageType.RULES)
        *fields, fares, signature = fastpath.decode_rules(body)
        content = body[:-SIGNATURE_BYTES]
        if public_key is not None and not verify(public_key, RULES_LABEL, content, signature):
            raise SignatureError("RULES: bad signature")
        return ServiceRules(*fields, fares, signature, content)  # type: ignore[arg-type, call-arg]

    async def upload_offline(self, taps: list[tuple[int, int, int, int, int, int, int, int]]) -> list[TapResult]:
        """Upload taps decided offline, each (terminal_seq, card_uid,
        card_counter, event_time_ms, tap_flags, rules_version, result,
        amount_cents); returns each one's recorded answer, in order."""
        msg_type, body = await self._request(lambda rid: fastpath.encode_offline_upload(rid, taps))
        self._expect(msg_type, MessageType.OFFLINE_RESULT)
        return [
            TapResult(seq, ResultCode(result), amount, balance, TapInfo(info))
            for seq, result, amount, balance, info in fastpath.decode_offline_result(body)
        ]

    def _expect(self, msg_type: int, expected: MessageType) -> None:
        if msg_type != expected:
            raise EngineError(ErrorCode.UNEXPECTED_MESSAGE, f"expected {expected.name}, got type 0x{msg_type:02x}")

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
                    if msg_type == MessageType.NOTICE:
                        self.notices.put_nowait(fastpath.decode_notice(body))
                        continue
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
