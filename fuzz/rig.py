"""One terminal session in memory: a tiny city, a fake transport, a fake writer.

Shared by the session fuzz target (``fuzz/session.py``) and the stateful
test (``tests/test_session_stateful.py``). No socket and no database: the
session is driven by calling ``data_received()`` as asyncio would, the
processor is the real one, and the batch writer is a fake that keeps the
decisions submitted until the rig commits (or rolls back) them with the
processor's own ``batch_done()``. Its turns of the event loop are tiny
(``TURN_INLINE_FRAMES``, engine/turns.py), so that most inputs leave frames
for the pump of later turns, as a crowd of pipelining terminals does.

Once the session is open, every frame must be sealed both ways: the rig
seals what it is asked to (``seal()``) with the session's terminal-to-engine
key, and ``frames()`` checks the seal of everything the engine wrote after
its AUTH_OK (a frame that fails it is a finding) and returns the bodies
without their trailers.

Example::

    rig = SessionRig()
    await rig.open()               # HELLO, CHALLENGE, AUTH with the right proof
    await rig.send(rig.seal(fastpath.encode_ping(7, 1)))
    rig.frames()[-1][0] == fastpath.MSG_PONG
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any, cast

from engine import fastpath
from engine.codes import CardStatus, HotlistReason, TerminalKind
from engine.decision import Decision
from engine.keys import derive_terminal_key
from engine.offline import OfflineUploads
from engine.processor import Processor
from engine.rules import Rules, parse_rules
from engine.seal import Opener, Sealer, SessionKeys, derive_session_keys
from engine.session import SessionContext, SessionLimits, TerminalSession
from engine.signing import ListSigner
from engine.state import CityState, Terminal
from engine.sync import HotList, Sync
from engine.turns import TurnBudget
from engine.versions import RulesVersions, compile_version
from engine.writer import BatchWriter
from fuzz import FuzzFinding

MASTER_KEY = bytes(range(32))

# The terminals and cards of docs/protocol.md's vectors, so that a vector
# from the corpus reaches the decision ladder.
VALIDATOR = 4242  # the handshake example's terminal id
KIOSK = 4243
RETIRED_VALIDATOR = 4244
UNKNOWN_TERMINAL = 4245
KEY_VERSION = 1
BUS = 1
KIOSK_SERVICE = 3
BUS_FARE = 150
CARD_RICH = 0x04A1B2C3D4E580  # the TAP vector's card
CARD_POOR = 0xDEADBEEF  # the TOPUP vector's card
CARD_BLOCKED = 0x04000000000001
CARD_CEILING = 100_000
FUNDING_FLOOR = -(2**62)

# Bounds of the rig's own loops, so that a session bug shows as a finding
# rather than as a hang of the rig.
SETTLE_ROUNDS_MAX = 32  # event-loop passes to let slow-path tasks finish
LIMITS = SessionLimits(max_in_flight=16)  # small, so the fuzzer reaches it
# Frames a turn decides at once and by the pump (engine/turns.py): small, so
# that an input of a few frames already leaves some for later turns, and
# the settling loop below still drains the longest input (2,048 bytes, at
# most ~170 frames) well within SETTLE_ROUNDS_MAX turns.
TURN_INLINE_FRAMES = 4
TURN_PUMP_FRAMES = 8

# The rig city's rules, version 1 (what RULES sends, what offline taps name).
RULES_VERSION = 1
RULES_TEXT = f"""
[rules]
version = {RULES_VERSION}
name = "rig city"

[[services]]
code = "bus"
kind = "per_use"
fares = {{ standard = {BUS_FARE} }}

[[services]]
code = "kiosk"
kind = "identification"
fares = {{ standard = 0 }}
"""
SERVICE_IDS = {"bus": BUS, "kiosk": KIOSK_SERVICE}


# What every rig shares, made once: parsing the rules and deriving the list
# key took 40% of a fuzz input's time when each rig made its own. The rules
# are frozen structs, the signer holds only its key, and a terminal key is
# a pure function of its inputs, so sharing them cannot carry state across
# inputs.
@functools.cache
def rig_rules() -> Rules:
    return parse_rules(RULES_TEXT)


@functools.cache
def rig_signer() -> ListSigner:
    return ListSigner(MASTER_KEY)


@functools.cache
def terminal_key(terminal_id: int, key_version: int) -> bytes:
    return derive_terminal_key(MASTER_KEY, terminal_id, key_version)


def build_city() -> CityState:
    """Two services, four terminals, three cards; balances easy to follow."""
    city = CityState()
    funding = city.add_account(1, 0, FUNDING_FLOOR, 2**63 - 1)
    city.revenue_account[BUS] = city.add_account(11, 0, 0, 2**63 - 1)
    city.revenue_account[KIOSK_SERVICE] = city.add_account(13, 0, 0, 2**63 - 1)
    city.set_fare(BUS, 0, BUS_FARE)
    city.set_fare(KIOSK_SERVICE, 0, 0)
    for number, (uid, balance, status) in enumerate(
        [(CARD_RICH, 10_000, CardStatus.ACTIVE), (CARD_POOR, 100, CardStatus.ACTIVE), (CARD_BLOCKED, 500, 1)]
    ):
        city.add_account(100 + number, balance, 0, CARD_CEILING)
        city.add_card(uid, status, 0, 100 + number)
    for terminal_id, service, kind, active in [
        (VALIDATOR, BUS, TerminalKind.VALIDATOR, True),
        (KIOSK, KIOSK_SERVICE, TerminalKind.KIOSK, True),
        (RETIRED_VALIDATOR, BUS, TerminalKind.VALIDATOR, False),
    ]:
        city.terminals[terminal_id] = Terminal(
            id=terminal_id,
            service_id=service,
            kind=kind,
            key_version=KEY_VERSION,
            active=active,
            funding_account=funding if kind == TerminalKind.KIOSK else -1,
            high_seq=-1,
        )
    return city


class FakeTransport:
    """What the session sees of a socket: write() collects, close() marks."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.writes_after_close = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # As asyncio does: connection_lost comes on a later loop pass.
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("203.0.113.7", 40_000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeWriter:
    """Keeps submitted decisions until the rig decides their batch's fate."""

    def __init__(self, room: bool = True) -> None:
        self.room = room
        self.queued: list[Decision] = []
        self.submitted = 0

    def has_room(self) -> bool:
        return self.room

    def submit(self, decision: Decision) -> None:
        self.queued.append(decision)
        self.submitted += 1

    def offline_accepting(self) -> bool:
        return self.room

    async def wait_offline_room(self) -> bool:
        return self.room

    def submit_offline(self, decision: Decision) -> None:
        self.submit(decision)

    def take(self) -> list[Decision]:
        batch, self.queued = self.queued, []
        return batch


class SessionRig:
    """One session on a fresh city; see the module docstring. Build it in
    a running event loop (``connection_made()`` arms the handshake timer)."""

    def __init__(self, *, writer_room: bool = True, commit: bool = True) -> None:
        self.state = build_city()
        self.processor = Processor(self.state, None)
        self.writer = FakeWriter(writer_room)
        self.processor.attach(cast(BatchWriter, self.writer))
        self.commit = commit  # batches commit (True) or roll back (False)
        # The lists for working offline: one card on the hot list, rules version 1.
        self.state.rules_version = RULES_VERSION
        hotlist = HotList()
        hotlist.apply(1, CARD_BLOCKED, HotlistReason.BLOCKED)
        versions = RulesVersions(self.state, None)
        versions.hold(compile_version(RULES_VERSION, rig_rules(), SERVICE_IDS, {"standard": 0}, self.state))
        self.sync = Sync(self.state, hotlist, versions, rig_signer())
        self.offline = OfflineUploads(self.state, self.processor, versions)
        self.offline.start()
        self.context = SessionContext(
            self.state,
            self.processor,
            MASTER_KEY,
            limits=LIMITS,
            sync=self.sync,
            offline=self.offline,
            turns=TurnBudget(inline_frames=TURN_INLINE_FRAMES, pump_frames=TURN_PUMP_FRAMES),
        )
        self.session = TerminalSession(self.context)
        self.transport = FakeTransport(self.session)
        self.session.connection_made(cast(asyncio.Transport, self.transport))
        self.min_in_flight = 0
        self._sealer: Sealer | None = None
        # The keys of the handshake they were derived for: checking the
        # output asks for them after every chunk.
        self._keys: tuple[Any, SessionKeys] | None = None

    # --- driving -------------------------------------------------------------

    async def send(self, data: bytes, cuts: Sequence[int] = ()) -> None:
        """Deliver data in chunks split at cuts, settling after each."""
        points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
        for start, end in itertools.pairwise(points):
            self.session.data_received(data[start:end])
            await self.settle()

    async def settle(self) -> None:
        """Let slow-path tasks and waiting frames run, and commit what they
        and the chunk queued."""
        for _ in range(SETTLE_ROUNDS_MAX):
            self._check_in_flight()
            await asyncio.sleep(0)
            batch = self.writer.take()
            if batch:
                self.processor.batch_done(batch, self.commit)
                self.state.check_invariants()
            elif (
                not self.processor._tasks
                and not self.offline.busy
                and not self.session._tasks
                and not self.session.has_backlog()
            ):
                break
        self._check_in_flight()
        if self.session.has_backlog():
            raise FuzzFinding(f"frames still waiting after {SETTLE_ROUNDS_MAX} turns")

    async def hello(self, terminal_id: int = VALIDATOR, request_id: int = 1) -> bytes:
        """Send HELLO; return the server nonce of the CHALLENGE (or b"")."""
        self.client_nonce = os.urandom(fastpath.NONCE_BYTES)
        self.hello_terminal = terminal_id
        before = len(self.transport.written)
        await self.send(fastpath.encode_hello(request_id, terminal_id, KEY_VERSION, self.client_nonce))
        for msg_type, _, body in parse_frames(bytes(self.transport.written[before:])):
            if msg_type == fastpath.MSG_CHALLENGE:
                self.server_nonce: bytes = fastpath.decode_challenge(body)
                return self.server_nonce
        return b""

    def proof(self) -> bytes:
        """The right proof for the last HELLO and CHALLENGE."""
        key = terminal_key(self.hello_terminal, KEY_VERSION)
        return bytes(
            fastpath.terminal_proof(key, self.hello_terminal, KEY_VERSION, self.client_nonce, self.server_nonce)
        )

    async def open(self, terminal_id: int = VALIDATOR) -> None:
        """HELLO and AUTH with the right proof: the session is OPEN after."""
        await self.hello(terminal_id)
        await self.send(fastpath.encode_auth(2, self.proof()))

    def session_keys(self) -> SessionKeys | None:
        """The keys of the session's handshake (HELLO and CHALLENGE as the
        session holds them), or None before its CHALLENGE."""
        hello = self.session._hello
        server_nonce: bytes = self.session._server_nonce
        if hello is None or not server_nonce:
            return None
        handshake = (hello, server_nonce)
        if self._keys is None or self._keys[0] != handshake:
            terminal_id, key_version, client_nonce = hello
            key = terminal_key(terminal_id, key_version)
            self._keys = (handshake, derive_session_keys(key, terminal_id, key_version, client_nonce, server_nonce))
        return self._keys[1]

    def seal(self, frame: bytes) -> bytes:
        """Seal a frame as the terminal's next one (the session must have opened)."""
        if self._sealer is None:
            keys = self.session_keys()
            if keys is None:
                raise RuntimeError("no handshake to seal with")
            self._sealer = Sealer(keys.terminal_to_engine)
        return self._sealer.seal(frame)

    @property
    def next_counter(self) -> int:
        """The counter of the terminal's next sealed frame."""
        return 0 if self._sealer is None else self._sealer.counter

    def seal_stream(self, stream: bytes) -> bytes:
        """Seal every plain whole frame at the start of a stream, in order;
        a frame already flagged, and whatever follows the first bytes that
        are not a frame, pass as they are."""
        out = []
        pos = 0
        for _msg_type, _request_id, body in fastpath.FrameReader().feed(stream):
            size = fastpath.FRAME_HEADER_BYTES + len(body)
            frame = stream[pos : pos + size]
            out.append(self.seal(frame) if frame[6:8] == b"\x00\x00" else frame)
            pos += size
        return b"".join(out) + stream[pos:]

    async def finish(self) -> None:
        """Answer everything pending, then lose the connection as asyncio would."""
        await self.settle()
        if not self.transport.closed:
            self.session.connection_lost(None)
        await self.offline.stop()
        await self.settle()
        await self.sync.stop()
        await self.processor.drain()
        await asyncio.sleep(0)

    # --- checking -------------------------------------------------------------

    def _check_in_flight(self) -> None:
        in_flight: int = self.session._in_flight
        self.min_in_flight = min(self.min_in_flight, in_flight)
        if in_flight < 0:
            raise FuzzFinding(f"in-flight count {in_flight} below zero")

    def frames(self) -> list[tuple[int, int, bytes]]:
        """Every frame written so far (checked: the output is whole frames,
        sealed after AUTH_OK with consecutive counters and valid tags), with
        sealed bodies opened."""
        frames = parse_frames(bytes(self.transport.written))
        opener: Opener | None = None
        opened = []
        for msg_type, request_id, body in frames:
            if opener is not None:
                try:
                    body = opener.open(msg_type, request_id, body)
                except fastpath.ProtocolError as error:
                    raise FuzzFinding(f"the engine wrote a frame that fails its seal: {error!r}") from error
            elif msg_type == fastpath.MSG_AUTH_OK:
                keys = self.session_keys()
                if keys is None:
                    raise FuzzFinding("AUTH_OK written without a handshake")
                opener = Opener(keys.engine_to_terminal)
            opened.append((msg_type, request_id, body))
        return opened

    def check_output(self) -> list[tuple[int, int, bytes]]:
        """The invariants of what the session wrote; returns its frames."""
        frames = self.frames()
        if self.transport.writes_after_close:
            raise FuzzFinding(f"{self.transport.writes_after_close} writes after close")
        engine_sends = set(DECODER_BY_TYPE)
        for index, (msg_type, _, body) in enumerate(frames):
            if msg_type not in engine_sends:
                raise FuzzFinding(f"the engine wrote a frame of type 0x{msg_type:02x}")
            getattr(fastpath, DECODER_BY_TYPE[msg_type])(body)
            if msg_type == fastpath.MSG_ERROR:
                if index != len(frames) - 1:
                    raise FuzzFinding(f"{len(frames) - 1 - index} frames written after an ERROR")
                if not self.transport.closed:
                    raise FuzzFinding("ERROR written but the transport was not closed")
        return frames


DECODER_BY_TYPE = {
    fastpath.MSG_CHALLENGE: "decode_challenge",
    fastpath.MSG_AUTH_OK: "decode_auth_ok",
    fastpath.MSG_TAP_RESULT: "decode_tap_result",
    fastpath.MSG_PONG: "decode_pong",
    fastpath.MSG_HOTLIST: "decode_hotlist",
    fastpath.MSG_RULES: "decode_rules",
    fastpath.MSG_NOTICE: "decode_notice",
    fastpath.MSG_OFFLINE_RESULT: "decode_offline_result",
    fastpath.MSG_ERROR: "decode_error",
}


def parse_frames(output: bytes) -> list[tuple[int, int, bytes]]:
    """Split the engine's output; it must be whole, valid frames."""
    reader = fastpath.FrameReader()
    try:
        frames: list[tuple[int, int, bytes]] = reader.feed(output)
    except fastpath.ProtocolError as error:
        raise FuzzFinding(f"the engine wrote an invalid stream: {error!r}") from error
    if reader.error is not None or reader.buffered():
        raise FuzzFinding(f"the engine wrote an invalid stream: {reader.error!r}, {reader.buffered()} bytes left")
    return frames
