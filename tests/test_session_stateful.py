"""The session state machine against a reference model (hypothesis, stateful).

Hypothesis drives one ``TerminalSession`` on the in-memory rig of
``fuzz/rig.py`` with any sequence of HELLO, AUTH (right or wrong proof),
TAP/TOPUP/REVERSAL (valid or with a field the engine refuses), PING, frames
that break a rule of docs/protocol.md, and garbage, each delivered in
chunks split at arbitrary points. The model knows the state the session
must be in (AWAIT_HELLO, AWAIT_AUTH, OPEN, CLOSED) and exactly what each
message must make the engine write:

- HELLO: a CHALLENGE with the same request id, in AWAIT_HELLO only;
- AUTH: AUTH_OK with the engine's proof for a known active terminal and
  the right proof, else ERROR AUTH_FAILED; in AWAIT_AUTH only;
- a request: one TAP_RESULT echoing request id and sequence when OPEN
  (PROTOCOL_ERROR for a bad field), ERROR NOT_AUTHENTICATED before;
- PING: a PONG echoing request id and payload, in any state;
- HOTLIST_REQUEST, RULES_REQUEST, OFFLINE_UPLOAD when OPEN: one HOTLIST,
  RULES or OFFLINE_RESULT echoing the request id (the rig's hot list and
  rules version, one result per uploaded tap with its sequence), ERROR
  NOT_AUTHENTICATED before;
- a rule broken, or a message out of turn: ERROR with its code, then close;
- once OPEN, every frame both ways is sealed: the model seals what it
  sends with the session's key and counters, and a frame tampered with,
  replayed, reordered, reflected or left plain gets ERROR BAD_TAG,
  BAD_COUNTER or BAD_FLAGS and the close; what the engine writes after
  AUTH_OK is checked to be sealed with consecutive counters (``rig.frames()``);
- once closed: nothing more, whatever arrives.

Garbage leaves the stream at an unknown offset, so after it only the
invariants are checked: whole frames, nothing after an ERROR, close after
an ERROR, in-flight never negative. The twin is the one ``engine.fastpath``
selected; the suite runs once per twin (tox ``cython`` and ``pure``).
"""

from __future__ import annotations

import asyncio
import struct
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine import fastpath
from engine import session as session_module
from engine.keys import derive_terminal_key
from engine.processor import EVENT_TIME_MIN_MS
from engine.seal import Sealer
from fuzz import rig as rigs

AWAIT_HELLO, AWAIT_AUTH, OPEN, CLOSED, UNKNOWN = "AWAIT_HELLO", "AWAIT_AUTH", "OPEN", "CLOSED", "UNKNOWN"
SESSION_STATES = {
    AWAIT_HELLO: session_module.AWAIT_HELLO,
    AWAIT_AUTH: session_module.AWAIT_AUTH,
    OPEN: session_module.OPEN,
}
AUTHENTIC = {rigs.VALIDATOR, rigs.KIOSK}  # known, active, key version 1

EVENT_TIME_MS = 1_767_225_601_234  # the TAP vector's
INT64_MAX = 2**63 - 1
HEADER = struct.Struct(">IBBHI")

cuts = st.lists(st.integers(min_value=0, max_value=200), max_size=4)

# Frames that break one rule of docs/protocol.md, "Frames", by the error
# code and request id the engine must answer with (request id 0 when the
# length prefix alone is refused). Before the handshake ends frames are
# plain; after it, the same rules broken on sealed frames (OPEN_VIOLATIONS).
VIOLATIONS = {
    "too large": (HEADER.pack(16_381, 1, fastpath.MSG_PING, 0, 5), fastpath.ERR_FRAME_TOO_LARGE, 0),
    "too short": (HEADER.pack(7, 1, fastpath.MSG_PING, 0, 5), fastpath.ERR_FRAME_TOO_SHORT, 0),
    "version": (HEADER.pack(16, 2, fastpath.MSG_PING, 0, 5) + bytes(8), fastpath.ERR_UNSUPPORTED_VERSION, 5),
    "type": (HEADER.pack(16, 1, 0x55, 0, 5) + bytes(8), fastpath.ERR_UNKNOWN_TYPE, 5),
    "flags": (HEADER.pack(16, 1, fastpath.MSG_PING, 1, 5) + bytes(8), fastpath.ERR_BAD_FLAGS, 5),
    "body length": (HEADER.pack(17, 1, fastpath.MSG_PING, 0, 5) + bytes(9), fastpath.ERR_BAD_BODY_LENGTH, 5),
    "engine only": (fastpath.encode_tap_result(5, 1, 0, 0, 0), fastpath.ERR_UNEXPECTED_MESSAGE, 5),
}
SEALED_PING_LENGTH = 8 + 8 + fastpath.SEAL_TRAILER_BYTES
OPEN_VIOLATIONS = {
    **VIOLATIONS,
    "flags": (HEADER.pack(SEALED_PING_LENGTH, 1, fastpath.MSG_PING, 3, 5) + bytes(32), fastpath.ERR_BAD_FLAGS, 5),
    "body length": (
        HEADER.pack(SEALED_PING_LENGTH + 1, 1, fastpath.MSG_PING, fastpath.FLAG_SEALED, 5) + bytes(33),
        fastpath.ERR_BAD_BODY_LENGTH,
        5,
    ),
}
# Ways to break the seal of an open session, and what each must get.
TAMPERING = {
    "flipped bit": fastpath.ERR_BAD_TAG,
    "reflected": fastpath.ERR_BAD_TAG,
    "replayed": fastpath.ERR_BAD_COUNTER,
    "reordered": fastpath.ERR_BAD_COUNTER,
    "not sealed": fastpath.ERR_BAD_FLAGS,
}


async def new_rig() -> rigs.SessionRig:
    return rigs.SessionRig()  # connection_made() needs the running loop


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.rig = self.loop.run_until_complete(new_rig())
        self.model = AWAIT_HELLO
        self.terminal_id = 0
        self.client_nonce = b""
        self.server_nonce = b""
        self.request_id = 100
        self.next_seq = 1

    # --- helpers ---------------------------------------------------------------

    def send(self, data: bytes, split_at: list[int]) -> list[tuple[int, int, bytes]]:
        """Deliver data in chunks; return the frames it made the engine write
        (their seals checked and stripped)."""
        before = len(self.rig.frames())
        self.loop.run_until_complete(self.rig.send(data, split_at))
        return self.rig.frames()[before:]

    def sealed(self, frame: bytes) -> bytes:
        """The frame as the terminal sends it now: sealed once the session is open."""
        return self.rig.seal(frame) if self.model == OPEN else frame

    def next_request_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def expect_error(self, written: list[tuple[int, int, bytes]], code: int, request_id: int) -> None:
        assert len(written) == 1, written
        msg_type, answered, body = written[0]
        assert (msg_type, answered) == (fastpath.MSG_ERROR, request_id)
        assert fastpath.decode_error(body)[0] == code
        self.model = CLOSED

    def expect_nothing_if_closed(self, written: list[tuple[int, int, bytes]]) -> bool:
        """True when the model is CLOSED (then nothing must be written) or
        UNKNOWN (then only the invariants say anything)."""
        if self.model == CLOSED:
            assert written == []
        return self.model in (CLOSED, UNKNOWN)

    # --- rules -----------------------------------------------------------------

    @initialize(open_first=st.booleans(), terminal_id=st.sampled_from(sorted(AUTHENTIC)))
    def start(self, open_first: bool, terminal_id: int) -> None:
        # Most rules close a session that is not open yet: half of the runs
        # start with a valid handshake so that OPEN gets its share of steps.
        if open_first:
            self.hello(terminal_id, bytes(range(16)), [])
            self.auth(True, [])
            assert self.model == OPEN

    @rule(
        terminal_id=st.sampled_from([rigs.VALIDATOR, rigs.KIOSK, rigs.RETIRED_VALIDATOR, rigs.UNKNOWN_TERMINAL]),
        client_nonce=st.binary(min_size=16, max_size=16),
        split_at=cuts,
    )
    def hello(self, terminal_id: int, client_nonce: bytes, split_at: list[int]) -> None:
        request_id = self.next_request_id()
        frame = self.sealed(fastpath.encode_hello(request_id, terminal_id, rigs.KEY_VERSION, client_nonce))
        written = self.send(frame, split_at)
        if self.expect_nothing_if_closed(written):
            return
        if self.model != AWAIT_HELLO:
            self.expect_error(written, fastpath.ERR_UNEXPECTED_MESSAGE, request_id)
            return
        assert [(msg_type, answered) for msg_type, answered, _ in written] == [(fastpath.MSG_CHALLENGE, request_id)]
        self.server_nonce = fastpath.decode_challenge(written[0][2])
        self.terminal_id, self.client_nonce = terminal_id, client_nonce
        self.model = AWAIT_AUTH

    @rule(right=st.booleans(), split_at=cuts)
    def auth(self, right: bool, split_at: list[int]) -> None:
        request_id = self.next_request_id()
        key = derive_terminal_key(rigs.MASTER_KEY, self.terminal_id, rigs.KEY_VERSION)
        # Before any HELLO the session has no nonces: any proof is wrong then.
        nonces = (self.client_nonce or bytes(16), self.server_nonce or bytes(16))
        transcript = (self.terminal_id, rigs.KEY_VERSION, *nonces)
        proof = fastpath.terminal_proof(key, *transcript)
        if not right:
            proof = bytes([proof[0] ^ 1]) + proof[1:]
        written = self.send(self.sealed(fastpath.encode_auth(request_id, proof)), split_at)
        if self.expect_nothing_if_closed(written):
            return
        if self.model != AWAIT_AUTH:
            self.expect_error(written, fastpath.ERR_UNEXPECTED_MESSAGE, request_id)
            return
        if not right or self.terminal_id not in AUTHENTIC:
            self.expect_error(written, fastpath.ERR_AUTH_FAILED, request_id)
            return
        assert [(msg_type, answered) for msg_type, answered, _ in written] == [(fastpath.MSG_AUTH_OK, request_id)]
        engine_proof, _engine_time_ms = fastpath.decode_auth_ok(written[0][2])
        assert engine_proof == fastpath.engine_proof(key, *transcript)
        self.model = OPEN

    @rule(
        kind=st.sampled_from([fastpath.MSG_TAP, fastpath.MSG_TOPUP, fastpath.MSG_REVERSAL]),
        bad_field=st.sampled_from([None, "event time", "sequence", "tap flags"]),
        card_uid=st.sampled_from([rigs.CARD_RICH, rigs.CARD_POOR, rigs.CARD_BLOCKED, 0x1234]),
        amount_cents=st.integers(min_value=0, max_value=2**32 - 1),
        split_at=cuts,
    )
    def request(self, kind: int, bad_field: str | None, card_uid: int, amount_cents: int, split_at: list[int]) -> None:
        request_id = self.next_request_id()
        seq = INT64_MAX + 1 if bad_field == "sequence" else self.next_seq
        self.next_seq += 1
        event_time_ms = EVENT_TIME_MIN_MS - 1 if bad_field == "event time" else EVENT_TIME_MS
        if kind == fastpath.MSG_TAP:
            tap_flags = 0x80 if bad_field == "tap flags" else 0
            frame = fastpath.encode_tap(request_id, seq, card_uid, 7, event_time_ms, tap_flags)
        elif kind == fastpath.MSG_TOPUP:
            frame = fastpath.encode_topup(request_id, seq, card_uid, amount_cents, event_time_ms)
        else:
            frame = fastpath.encode_reversal(request_id, seq, max(seq - 1, 0), event_time_ms)
        refused = bad_field in ("event time", "sequence") or (bad_field == "tap flags" and kind == fastpath.MSG_TAP)
        written = self.send(self.sealed(frame), split_at)
        if self.expect_nothing_if_closed(written):
            return
        if self.model != OPEN:
            self.expect_error(written, fastpath.ERR_NOT_AUTHENTICATED, request_id)
            return
        assert [(msg_type, answered) for msg_type, answered, _ in written] == [(fastpath.MSG_TAP_RESULT, request_id)]
        answered_seq, result, amount, _balance, info = fastpath.decode_tap_result(written[0][2])
        assert answered_seq == seq
        if refused:
            assert (result, amount, info) == (fastpath.RESULT_PROTOCOL_ERROR, 0, 0)
        else:
            assert result != fastpath.RESULT_PROTOCOL_ERROR

    @rule(
        kind=st.sampled_from(["hotlist", "rules", "upload"]),
        since=st.sampled_from([0, 1, 5]),
        taps=st.lists(st.sampled_from([rigs.CARD_RICH, rigs.CARD_POOR, rigs.CARD_BLOCKED, 0x1234]), max_size=3),
        split_at=cuts,
    )
    def offline_request(self, kind: str, since: int, taps: list[int], split_at: list[int]) -> None:
        """What a terminal asks for working offline, and its upload."""
        request_id = self.next_request_id()
        seqs: list[int] = []
        if kind == "hotlist":
            frame, expected = fastpath.encode_hotlist_request(request_id, since, 0), fastpath.MSG_HOTLIST
        elif kind == "rules":
            frame, expected = fastpath.encode_rules_request(request_id, since), fastpath.MSG_RULES
        else:
            now = time.time_ns() // 1_000_000
            fare = rigs.BUS_FARE if self.terminal_id == rigs.VALIDATOR else 0  # the kiosk charges nothing
            upload = []
            for uid in taps:
                seqs.append(self.next_seq)
                refused = uid == rigs.CARD_BLOCKED  # on the rig's hot list
                result, amount = (fastpath.RESULT_CARD_NOT_ACTIVE, 0) if refused else (0, fare)
                upload.append((self.next_seq, uid, 0, now - 60_000, 0, rigs.RULES_VERSION, result, amount))
                self.next_seq += 1
            frame, expected = fastpath.encode_offline_upload(request_id, upload), fastpath.MSG_OFFLINE_RESULT
        written = self.send(self.sealed(frame), split_at)
        if self.expect_nothing_if_closed(written):
            return
        if self.model != OPEN:
            self.expect_error(written, fastpath.ERR_NOT_AUTHENTICATED, request_id)
            return
        assert [(msg_type, answered) for msg_type, answered, _ in written] == [(expected, request_id)]
        body = written[0][2]
        if kind == "hotlist":
            flags, _since, version, _after, entries, _signature = fastpath.decode_hotlist(body)
            if since == 1:  # the rig's version: nothing new
                assert (flags, version, entries) == (0, 1, [])
            else:  # none held, or a version the engine never had: the whole list
                assert (flags, version, entries) == (fastpath.HOTLIST_FLAG_FULL, 1, [(rigs.CARD_BLOCKED, 1)])
        elif kind == "rules":
            assert fastpath.decode_rules(body)[0] == rigs.RULES_VERSION
        else:
            results = fastpath.decode_offline_result(body)
            assert [result[0] for result in results] == seqs
            assert all(result[1] < fastpath.RESULT_BUSY_RETRY for result in results), results

    @rule(payloads=st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=4), split_at=cuts)
    def ping(self, payloads: list[int], split_at: list[int]) -> None:
        sent = [(self.next_request_id(), payload) for payload in payloads]
        written = self.send(b"".join(self.sealed(fastpath.encode_ping(*pair)) for pair in sent), split_at)
        if self.expect_nothing_if_closed(written):
            return
        assert [(msg_type, answered) for msg_type, answered, _ in written] == [
            (fastpath.MSG_PONG, request_id) for request_id, _ in sent
        ]
        assert [fastpath.decode_pong(body) for _, _, body in written] == payloads

    @rule(
        violation=st.sampled_from([*sorted(VIOLATIONS), "garbage"]),
        tail=st.binary(min_size=1, max_size=64),
        split_at=cuts,
    )
    def hostile(self, violation: str, tail: bytes, split_at: list[int]) -> None:
        """A frame that breaks one rule (then anything), or only garbage:
        one rule for both, so that they do not end most runs early."""
        if violation == "garbage":
            written = self.send(tail, split_at)
            if not self.expect_nothing_if_closed(written):
                # The stream is now at an unknown offset.
                self.model = CLOSED if self.rig.transport.closed else UNKNOWN
            return
        if self.model == OPEN:
            frame, code, request_id = OPEN_VIOLATIONS[violation]
            if violation == "engine only":
                frame = self.rig.seal(frame)
        else:
            frame, code, request_id = VIOLATIONS[violation]
        written = self.send(frame + tail, split_at)
        if self.expect_nothing_if_closed(written):
            return
        self.expect_error(written, code, request_id)

    @rule(how=st.sampled_from(sorted(TAMPERING)), position=st.integers(min_value=0, max_value=255), split_at=cuts)
    def tamper(self, how: str, position: int, split_at: list[int]) -> None:
        """A frame of an open session that fails its seal, or is not sealed."""
        if self.model != OPEN:
            return  # before the handshake nothing is sealed: "hostile" covers it
        request_id = self.next_request_id()
        ping = fastpath.encode_ping(request_id, 77)
        expected: list[tuple[int, int]] = []  # (type, request id) written before the ERROR
        if how == "flipped bit":
            # A bit of the body, counter or tag (the header's fields are the
            # reader's to refuse, and a changed request id would be echoed).
            altered = bytearray(self.rig.seal(ping))
            altered[12 + position % (len(altered) - 12)] ^= 1 << (position % 8)
            data = bytes(altered)
        elif how == "reflected":
            keys = self.rig.session_keys()
            assert keys is not None
            data = Sealer(keys.engine_to_terminal, self.rig.next_counter).seal(ping)
        elif how == "replayed":
            data = self.rig.seal(ping) * 2
            expected = [(fastpath.MSG_PONG, request_id)]
        elif how == "reordered":
            first, second = self.rig.seal(ping), self.rig.seal(fastpath.encode_ping(request_id + 1, 78))
            self.request_id += 1
            data = second + first
            request_id += 1
        else:
            data = ping
        written = self.send(data, split_at)
        assert [(msg_type, answered) for msg_type, answered, _ in written[:-1]] == expected
        self.expect_error(written[-1:], TAMPERING[how], request_id)
        assert self.rig.context.counters.frames_rejected

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def output_is_valid(self) -> None:
        self.rig.check_output()
        assert self.rig.min_in_flight >= 0
        assert self.rig.session._in_flight >= 0

    @invariant()
    def state_matches_model(self) -> None:
        if self.model == UNKNOWN:
            return
        if self.model == CLOSED:
            assert self.rig.transport.closed
            return
        assert not self.rig.transport.closed
        assert self.rig.session._state == SESSION_STATES[self.model]
        # Every request was answered once its batch settled.
        assert self.rig.session._in_flight == 0

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.rig.finish())
            self.rig.check_output()
        finally:
            self.loop.close()


SessionMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_session_state_machine = SessionMachine.TestCase
