"""One terminal connection: framing, the handshake, sealing, limits, replies.

States: AWAIT_HELLO -> AWAIT_AUTH -> OPEN. Every frame after the handshake
is sealed in both directions (``engine/seal.py``): the terminal's frames
after its AUTH are checked and stripped before they are dispatched, the
engine's frames after its AUTH_OK are sealed as they are queued. Any protocol
fault sends one ERROR frame and closes this connection only. Replies are
buffered and written once per received chunk or per committed batch, so a
pipelining terminal gets many replies per system call.

An open session also serves what a terminal needs for working offline
(``engine/sync.py``: HOTLIST_REQUEST, RULES_REQUEST, and a NOTICE pushed
when either list changes) and takes the taps it decided offline
(``engine/offline.py``: OFFLINE_UPLOAD, answered with OFFLINE_RESULT).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from engine import fastpath
from engine.codes import ErrorCode, MessageType, OperationKind
from engine.key_rotation import KeyRotation
from engine.keys import derive_terminal_key
from engine.limits import (
    HANDSHAKE_DEADLINE_S,
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_IN_FLIGHT_PER_CONNECTION,
    NONCE_BYTES,
    WRITE_HIGH_WATER_BYTES,
)
from engine.processor import Processor
from engine.seal import (
    REJECTED_BAD_COUNTER,
    REJECTED_BAD_TAG,
    REJECTED_NOT_SEALED,
    Opener,
    Sealer,
    derive_session_keys,
)
from engine.state import CityState, Terminal, now_ms
from engine.turns import TurnBudget

if TYPE_CHECKING:
    from engine.offline import OfflineUploads
    from engine.sync import Sync

log = logging.getLogger("citycard.session")

AWAIT_HELLO = 0
AWAIT_AUTH = 1
OPEN = 2

# Types only the engine sends; a terminal sending one is confused.
_ENGINE_ONLY = frozenset(
    {
        MessageType.CHALLENGE,
        MessageType.AUTH_OK,
        MessageType.TAP_RESULT,
        MessageType.HOTLIST,
        MessageType.RULES,
        MessageType.NOTICE,
        MessageType.OFFLINE_RESULT,
        MessageType.ERROR,
    }
)

_TAP = MessageType.TAP
_TOPUP = MessageType.TOPUP
_REVERSAL = MessageType.REVERSAL
_PING = MessageType.PING
_HOTLIST_REQUEST = MessageType.HOTLIST_REQUEST
_RULES_REQUEST = MessageType.RULES_REQUEST
_OFFLINE_UPLOAD = MessageType.OFFLINE_UPLOAD

_REJECTED_BY_CODE: dict[int, str] = {ErrorCode.BAD_TAG: REJECTED_BAD_TAG, ErrorCode.BAD_COUNTER: REJECTED_BAD_COUNTER}


@dataclass
class SessionLimits:
    """Per-connection deadlines and bounds; tests shorten them."""

    handshake_deadline_s: float = HANDSHAKE_DEADLINE_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_in_flight: int = MAX_IN_FLIGHT_PER_CONNECTION
    max_connections: int = MAX_CONNECTIONS


@dataclass
class SessionCounters:
    """What sessions count; the metrics module exports these."""

    connections_open: int = 0
    connections_total: int = 0
    connections_rejected: int = 0
    auth_failures: int = 0
    protocol_errors: dict[int, int] = field(default_factory=dict)
    # Frames of open sessions refused by their seal, by reason (REJECTED_*).
    frames_rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class SessionContext:
    """What every session shares."""

    state: CityState
    processor: Processor
    master_key: bytes
    limits: SessionLimits = field(default_factory=SessionLimits)
    counters: SessionCounters = field(default_factory=SessionCounters)
    sessions: set[TerminalSession] = field(default_factory=set)
    # Which key versions each terminal may authenticate with (a rotation
    # in progress accepts the next one too).
    key_rotation: KeyRotation = field(default_factory=KeyRotation)
    accepting: bool = True
    # Called with the seconds from a request's frame received to its reply
    # written (the engine's own latency, the figure its objectives are about).
    observe_latency: Callable[[float], None] | None = None
    # The hot list and rules for terminals working offline, and their
    # uploads; None: not served (such requests close the connection).
    sync: Sync | None = None
    offline: OfflineUploads | None = None
    # How many frames sessions decide per turn of the loop (engine/turns.py).
    turns: TurnBudget = field(default_factory=TurnBudget)


class TerminalSession(asyncio.Protocol):
    """The engine's side of one terminal connection."""

    def __init__(self, context: SessionContext) -> None:
        self._context = context
        self._processor = context.processor
        self._reader = fastpath.FrameReader()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._state = AWAIT_HELLO
        self._closed = False
        self._in_flight = 0
        self._terminal: Terminal | None = None
        self._hello: tuple[int, int, bytes] | None = None
        self._server_nonce = b""
        # Set by a successful AUTH: every frame after it, both ways, is sealed.
        self._opener: Opener | None = None
        self._sealer: Sealer | None = None
        self._last_received = 0.0
        self._chunk_received = 0.0
        # request id -> when its frame arrived; replies due -> when theirs did.
        self._received_at: dict[int, float] = {}
        self._replies_received_at: list[float] = []
        # With metrics off nothing is timed: no clock read, no bookkeeping per request.
        self._observing = context.observe_latency is not None
        self._deadline: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.peer = "?"
        # Frames received but left for a later turn (engine/turns.py), in
        # order, and the reader's fault that came after them, if any.
        self._backlog: collections.deque[tuple[int, int, bytes]] | None = None
        self._backlog_fault: fastpath.ProtocolError | None = None
        # Reading stops while replies back up or frames wait; it resumes
        # when neither holds.
        self._writing_paused = False

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        context = self._context
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not context.accepting or len(context.sessions) >= context.limits.max_connections:
            context.counters.connections_rejected += 1
            code = ErrorCode.SHUTTING_DOWN if not context.accepting else ErrorCode.TOO_MANY_CONNECTIONS
            text = "engine is stopping" if not context.accepting else "too many connections"
            transport.write(fastpath.encode_error(0, code, text))
            transport.close()
            self._closed = True
            return
        context.sessions.add(self)
        context.counters.connections_open += 1
        context.counters.connections_total += 1
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        loop = asyncio.get_running_loop()
        self._last_received = loop.time()
        self._deadline = loop.call_later(context.limits.handshake_deadline_s, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self in self._context.sessions:
            self._context.sessions.discard(self)
            self._context.counters.connections_open -= 1
        self._closed = True
        self._transport = None
        self._out.clear()
        self._backlog = None

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop taking its requests
        # until it catches up, so its replies cannot pile up without bound.
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._closed and self._backlog is None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed or self._backlog_fault is not None:
            return  # closed, or closing once the frames before its fault are decided
        self._last_received = asyncio.get_running_loop().time()
        if self._observing:
            self._chunk_received = time.perf_counter()
        frames = self._reader.feed(data)
        fault = self._reader.error
        backlog = self._backlog
        if backlog is not None:
            # Reading stopped with frames waiting; whatever was already on
            # its way joins them.
            backlog.extend(frames)
            if fault is not None:
                self._backlog_fault = fault
            return
        granted = self._context.turns.grant(len(frames))
        if granted < len(frames):
            self._backlog = collections.deque(frames[granted:])
            self._backlog_fault = fault
            fault = None
            frames = frames[:granted]
            if self._transport is not None:
                self._transport.pause_reading()
            self._context.turns.wait(self, len(self._backlog))
        self._handle(frames, fault)

    def has_backlog(self) -> bool:
        return self._backlog is not None

    def handle_backlog(self, most: int) -> int:
        """Decide up to ``most`` of the frames left waiting (the pump of
        engine/turns.py); return how many were taken."""
        backlog = self._backlog
        if backlog is None:
            return 0
        if self._closed:
            self._backlog = None
            return 0
        taken = min(most, len(backlog))
        frames = [backlog.popleft() for _ in range(taken)]
        fault = None
        if not backlog:
            self._backlog = None
            fault, self._backlog_fault = self._backlog_fault, None
            if self._transport is not None and not self._writing_paused:
                self._transport.resume_reading()
        self._handle(frames, fault)
        return taken

    def _handle(self, frames: list[tuple[int, int, bytes]], fault: fastpath.ProtocolError | None) -> None:
        """Open and dispatch frames in order, then the reader's fault (if
        any), then write the replies they made."""
        for msg_type, request_id, body in frames:
            if self._closed:
                return
            try:
                # The reader turns sealed after the AUTH frame exactly as the
                # session opens on it: the opener is set for every frame after.
                if self._opener is not None:
                    body = self._opener.open(msg_type, request_id, body)
                self._dispatch(msg_type, request_id, body)
            except fastpath.ProtocolError as error:
                reason = _REJECTED_BY_CODE.get(error.code)
                if reason is not None:
                    self._rejected(reason, msg_type, request_id, str(error))
                self.fail(error.code, str(error), request_id)
                return
        if fault is not None and not self._closed:
            if fault.code == ErrorCode.BAD_FLAGS and self._opener is not None:
                self._rejected(REJECTED_NOT_SEALED, None, fault.request_id, str(fault))
            self.fail(fault.code, str(fault), fault.request_id)
            return
        self._processor.flush()
        self.flush()

    # --- messages -----------------------------------------------------------------

    def _dispatch(self, msg_type: int, request_id: int, body: bytes) -> None:
        if msg_type == _TAP or msg_type == _TOPUP or msg_type == _REVERSAL:
            if self._state != OPEN:
                self.fail(ErrorCode.NOT_AUTHENTICATED, "request before the session is open", request_id)
                return
            if self._in_flight >= self._context.limits.max_in_flight:
                self.fail(
                    ErrorCode.TOO_MANY_IN_FLIGHT,
                    f"more than {self._context.limits.max_in_flight} unanswered requests",
                    request_id,
                )
                return
            terminal = self._terminal
            assert terminal is not None
            self._in_flight += 1
            if self._observing:
                self._received_at[request_id] = self._chunk_received
            if msg_type == _TAP:
                seq, uid, counter, event_ms, flags = fastpath.decode_tap(body)
                self._processor.submit(
                    self, request_id, terminal, OperationKind.TAP, seq, uid, counter, flags, 0, None, event_ms
                )
            elif msg_type == _TOPUP:
                seq, uid, amount, event_ms = fastpath.decode_topup(body)
                self._processor.submit(
                    self, request_id, terminal, OperationKind.TOPUP, seq, uid, 0, 0, amount, None, event_ms
                )
            else:
                seq, original, event_ms = fastpath.decode_reversal(body)
                self._processor.submit(
                    self, request_id, terminal, OperationKind.REVERSAL, seq, 0, 0, 0, 0, original, event_ms
                )
        elif msg_type == _PING:
            self._emit(fastpath.encode_pong(request_id, fastpath.decode_ping(body)))
        elif msg_type == _HOTLIST_REQUEST or msg_type == _RULES_REQUEST or msg_type == _OFFLINE_UPLOAD:
            self._on_offline_request(msg_type, request_id, body)
        elif msg_type == MessageType.HELLO:
            self._on_hello(request_id, body)
        elif msg_type == MessageType.AUTH:
            self._on_auth(request_id, body)
        elif msg_type == MessageType.PONG:
            pass  # an answer to a PING of ours; nothing to do
        elif msg_type in _ENGINE_ONLY:
            self.fail(ErrorCode.UNEXPECTED_MESSAGE, f"message type 0x{msg_type:02x} is sent by the engine", request_id)
        else:  # the reader admits only known types; this is a bug
            self.fail(ErrorCode.INTERNAL, f"unhandled message type 0x{msg_type:02x}", request_id)

    def _on_offline_request(self, msg_type: int, request_id: int, body: bytes) -> None:
        """HOTLIST_REQUEST (answered at once), RULES_REQUEST and
        OFFLINE_UPLOAD (answered by deliver_frame, counted in flight)."""
        if self._state != OPEN:
            self.fail(ErrorCode.NOT_AUTHENTICATED, "request before the session is open", request_id)
            return
        context = self._context
        sync = context.sync
        terminal = self._terminal
        assert terminal is not None
        if msg_type == _HOTLIST_REQUEST:
            since_version, after_uid = fastpath.decode_hotlist_request(body)
            if sync is None:
                self.fail(ErrorCode.UNEXPECTED_MESSAGE, "this engine serves no hot list", request_id)
                return
            self._emit(sync.hotlist_frame(request_id, since_version, after_uid))
            return
        if self._in_flight >= context.limits.max_in_flight:
            self.fail(
                ErrorCode.TOO_MANY_IN_FLIGHT,
                f"more than {context.limits.max_in_flight} unanswered requests",
                request_id,
            )
            return
        if msg_type == _RULES_REQUEST:
            rules_version = fastpath.decode_rules_request(body)
            if sync is None:
                self.fail(ErrorCode.UNEXPECTED_MESSAGE, "this engine serves no rules", request_id)
                return
            self._in_flight += 1
            task = asyncio.ensure_future(self._answer_rules(sync, terminal, request_id, rules_version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        offline = context.offline
        if offline is None:
            self.fail(ErrorCode.UNEXPECTED_MESSAGE, "this engine takes no offline taps", request_id)
            return
        taps = fastpath.decode_offline_upload(body)
        self._in_flight += 1
        offline.accept(self, request_id, terminal, taps)

    async def _answer_rules(self, sync: Sync, terminal: Terminal, request_id: int, rules_version: int) -> None:
        try:
            compiled = await sync.rules_for(rules_version, terminal.service_id)
        except Exception as error:  # noqa: BLE001 - the database is unavailable in some way
            log.warning("rules for terminal %d unavailable: %r", terminal.id, error)
            compiled = sync.versions.cached(self._context.state.rules_version)
        frame = sync.rules_frame(request_id, compiled, terminal.service_id) if compiled is not None else None
        if frame is None:
            self.fail(ErrorCode.INTERNAL, "no rules for this terminal's service", request_id)
            return
        self.deliver_frame(frame)

    def _on_hello(self, request_id: int, body: bytes) -> None:
        if self._state != AWAIT_HELLO:
            self.fail(ErrorCode.UNEXPECTED_MESSAGE, "HELLO after the handshake started", request_id)
            return
        self._hello = fastpath.decode_hello(body)
        self._server_nonce = os.urandom(NONCE_BYTES)
        self._state = AWAIT_AUTH
        self._emit(fastpath.encode_challenge(request_id, self._server_nonce))

    def _on_auth(self, request_id: int, body: bytes) -> None:
        if self._state != AWAIT_AUTH or self._hello is None:
            self.fail(ErrorCode.UNEXPECTED_MESSAGE, "AUTH without a preceding HELLO", request_id)
            return
        proof = fastpath.decode_auth(body)
        terminal_id, key_version, client_nonce = self._hello
        terminal = self._context.state.terminals.get(terminal_id)
        rotation = self._context.key_rotation
        # Compute the proof even for an unknown terminal so that the answer
        # takes the same time whether or not the id exists.
        key = derive_terminal_key(self._context.master_key, terminal_id, key_version)
        expected = fastpath.terminal_proof(key, terminal_id, key_version, client_nonce, self._server_nonce)
        valid = hmac.compare_digest(proof, expected)
        if terminal is None or not terminal.active or not rotation.accepts(terminal, key_version) or not valid:
            self._context.counters.auth_failures += 1
            log.warning(
                "authentication failed",
                extra={"terminal_id": terminal_id, "key_version": key_version, "peer": self.peer},
            )
            self.fail(ErrorCode.AUTH_FAILED, "authentication failed", request_id)
            return
        # The first session under a pending key version completes its rotation.
        rotation.authenticated(terminal, key_version)
        self._terminal = terminal
        self._state = OPEN
        keys = derive_session_keys(key, terminal_id, key_version, client_nonce, self._server_nonce)
        self._opener = Opener(keys.terminal_to_engine)
        engine_proof = fastpath.engine_proof(key, terminal_id, key_version, client_nonce, self._server_nonce)
        self._out.append(fastpath.encode_auth_ok(request_id, engine_proof, now_ms()))
        self._sealer = Sealer(keys.engine_to_terminal)  # every frame after AUTH_OK
        if self._deadline is not None:
            self._deadline.cancel()
        self._schedule_idle_check()

    # --- replies ---------------------------------------------------------------------

    def deliver_result(
        self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int, info: int
    ) -> None:
        """Queue a TAP_RESULT; written by flush()."""
        if self._closed:
            return  # the terminal will retry with the same sequence
        self._in_flight -= 1
        if self._observing:
            received_at = self._received_at.pop(request_id, None)
            if received_at is not None:
                self._replies_received_at.append(received_at)
        frame = fastpath.encode_tap_result(request_id, terminal_seq, result, amount, balance, info)
        sealer = self._sealer  # always set here: results answer requests of an open session
        self._out.append(frame if sealer is None else sealer.seal(frame))

    def deliver_frame(self, frame: bytes) -> None:
        """Write the answer to a request counted in flight (RULES,
        OFFLINE_RESULT) at once."""
        if self._closed:
            return  # the terminal will ask again
        self._in_flight -= 1
        self._emit(frame)
        self.flush()

    def push(self, frame: bytes) -> None:
        """Write a frame the terminal did not ask for (NOTICE) at once,
        when the session is open."""
        if self._closed or self._state != OPEN:
            return
        self._emit(frame)
        self.flush()

    @property
    def terminal(self) -> Terminal | None:
        """The authenticated terminal, None before AUTH_OK."""
        return self._terminal

    def _emit(self, frame: bytes) -> None:
        """Queue a frame, sealed once the handshake is over."""
        sealer = self._sealer
        self._out.append(frame if sealer is None else sealer.seal(frame))

    def flush(self) -> None:
        if self._out and self._transport is not None and not self._closed:
            self._transport.write(b"".join(self._out))
            observe = self._context.observe_latency
            if observe is not None and self._replies_received_at:
                written = time.perf_counter()
                for received_at in self._replies_received_at:
                    observe(written - received_at)
        self._replies_received_at.clear()
        self._out.clear()

    def fail(self, code: int, text: str, request_id: int = 0) -> None:
        """Send ERROR and close this connection, keeping replies already due."""
        if self._closed:
            return
        counters = self._context.counters
        counters.protocol_errors[code] = counters.protocol_errors.get(code, 0) + 1
        log.info("protocol error", extra={"code": int(code), "error": text, "peer": self.peer})
        self._emit(fastpath.encode_error(request_id, code, text))
        self.flush()
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def _rejected(self, reason: str, msg_type: int | None, request_id: int, text: str) -> None:
        """Count and log a frame of an open session refused by its seal."""
        counters = self._context.counters.frames_rejected
        counters[reason] = counters.get(reason, 0) + 1
        terminal = self._terminal
        log.warning(
            "frame rejected",
            extra={
                "reason": reason,
                "terminal_id": terminal.id if terminal is not None else None,
                "key_version": self._hello[1] if self._hello is not None else None,
                "peer": self.peer,
                "msg_type": f"0x{msg_type:02x}" if msg_type is not None else None,
                "request_id": request_id,
                "error": text,
            },
        )

    # --- deadlines ----------------------------------------------------------------------

    def _check_deadline(self) -> None:
        self._deadline = None
        if self._state != OPEN and not self._closed:
            self.fail(ErrorCode.HANDSHAKE_TIMEOUT, "session not open within the handshake deadline")

    def _schedule_idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self._context.limits.idle_timeout_s
        due = self._last_received + idle
        self._deadline = loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        self._deadline = None
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_received >= self._context.limits.idle_timeout_s:
            self.fail(ErrorCode.IDLE_TIMEOUT, "nothing received within the idle deadline")
        else:
            self._schedule_idle_check()

    def shut_down(self) -> None:
        """Tell the terminal the engine is stopping, then close."""
        self.fail(ErrorCode.SHUTTING_DOWN, "engine is stopping")
