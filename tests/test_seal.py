"""Sealed frames (engine/seal.py): key derivation, sealing, and every way a
frame can fail its seal. No socket and no database: the sealer of one side
against the opener of the other, and the codec's reader of each twin in
between where the bytes travel as a stream."""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import struct
from collections.abc import Iterator
from types import ModuleType

import pytest

from engine import fastpath, seal
from engine.codes import ErrorCode, MessageType
from engine.seal import Opener, Sealer, SessionKeys, derive_session_keys, hkdf_sha256
from tests.twins import load_twin

KEY = bytes(range(32))
TERMINAL_ID, KEY_VERSION = 4242, 1
CLIENT_NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")
SERVER_NONCE = bytes.fromhex("ffeeddccbbaa99887766554433221100")


def session_keys(client_nonce: bytes = CLIENT_NONCE, server_nonce: bytes = SERVER_NONCE) -> SessionKeys:
    return derive_session_keys(KEY, TERMINAL_ID, KEY_VERSION, client_nonce, server_nonce)


def tap(request_id: int = 3, seq: int = 1001) -> bytes:
    return fastpath.encode_tap(request_id, seq, 0x04A1B2C3D4E580, 77, 1_767_225_601_234, 0)


def refused(opener: Opener, frame: bytes) -> tuple[int, int]:
    """Open a sealed frame that must fail: (error code, request id)."""
    msg_type, request_id = frame[5], struct.unpack_from(">I", frame, 8)[0]
    with pytest.raises(fastpath.ProtocolError) as raised:
        opener.open(msg_type, request_id, frame[12:])
    return raised.value.code, raised.value.request_id


# --- Key derivation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "okm"),
    [
        (  # RFC 5869, test case 1
            bytes([0x0B] * 22),
            bytes(range(13)),
            bytes(range(0xF0, 0xFA)),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (  # RFC 5869, test case 3: no salt, no info
            bytes([0x0B] * 22),
            b"",
            b"",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
    ids=["rfc5869-1", "rfc5869-3"],
)
def test_hkdf_matches_rfc_5869(ikm: bytes, salt: bytes, info: bytes, okm: str) -> None:
    assert hkdf_sha256(ikm, salt, info, 42).hex() == okm


def test_session_keys_follow_the_documented_formula() -> None:
    keys = session_keys()
    salt = CLIENT_NONCE + SERVER_NONCE
    tail = struct.pack(">IH", TERMINAL_ID, KEY_VERSION)
    # HKDF written out, one block: PRK = HMAC(salt, IKM), OKM = HMAC(PRK, info || 0x01).
    prk = hmac.new(salt, KEY, hashlib.sha256).digest()
    for label, key in (
        (b"citycard/v1/seal/terminal-to-engine", keys.terminal_to_engine),
        (b"citycard/v1/seal/engine-to-terminal", keys.engine_to_terminal),
    ):
        assert key == hmac.new(prk, label + tail + b"\x01", hashlib.sha256).digest()


def test_keys_differ_by_direction_session_terminal_and_version() -> None:
    keys = session_keys()
    assert keys.terminal_to_engine != keys.engine_to_terminal
    others = [
        session_keys(client_nonce=bytes(16)),
        session_keys(server_nonce=bytes(16)),
        derive_session_keys(KEY, TERMINAL_ID + 1, KEY_VERSION, CLIENT_NONCE, SERVER_NONCE),
        derive_session_keys(KEY, TERMINAL_ID, KEY_VERSION + 1, CLIENT_NONCE, SERVER_NONCE),
        derive_session_keys(bytes(32), TERMINAL_ID, KEY_VERSION, CLIENT_NONCE, SERVER_NONCE),
    ]
    seen = {keys.terminal_to_engine, keys.engine_to_terminal}
    for other in others:
        assert {other.terminal_to_engine, other.engine_to_terminal}.isdisjoint(seen)


def test_session_keys_never_print() -> None:
    keys = session_keys()
    for text in (repr(keys), str(keys)):
        assert keys.terminal_to_engine.hex() not in text and "terminal_to_engine=" not in text


# --- Sealing ---------------------------------------------------------------------------------


def test_a_sealed_frame_is_the_frame_plus_counter_and_tag() -> None:
    key = session_keys().terminal_to_engine
    plain = tap()
    sealed = Sealer(key, counter=5).seal(plain)
    assert len(sealed) == len(plain) + 24
    length, version, msg_type, flags, request_id = struct.unpack_from(">IBBHI", sealed)
    assert (length, version, msg_type, flags, request_id) == (len(sealed) - 4, 1, MessageType.TAP, 0x0001, 3)
    assert sealed[12:-24] == plain[12:]
    assert sealed[-24:-16] == (5).to_bytes(8, "big")
    # The tag covers version, type, flags, request id, body and counter.
    assert sealed[-16:] == hmac.new(key, sealed[4:-16], hashlib.sha256).digest()[:16]


def test_tags_are_hmac_sha256_for_any_key_and_frame() -> None:
    rng = random.Random(7)
    for _ in range(200):
        key = rng.randbytes(32)
        frame = fastpath.encode_error(rng.randrange(2**32), rng.randrange(256), "x" * rng.randrange(200))
        sealed = Sealer(key, counter=rng.randrange(2**63)).seal(frame)
        assert sealed[-16:] == hmac.digest(key, sealed[4:-16], "sha256")[:16]


def test_round_trip_with_consecutive_counters() -> None:
    keys = session_keys()
    sealer, opener = Sealer(keys.engine_to_terminal), Opener(keys.engine_to_terminal)
    frames = [fastpath.encode_pong(n, n * 7) for n in range(1, 50)]
    for frame in frames:
        sealed = sealer.seal(frame)
        assert opener.open(sealed[5], struct.unpack_from(">I", sealed, 8)[0], sealed[12:]) == frame[12:]
    assert sealer.counter == opener.counter == len(frames)


def test_seal_refuses_a_frame_with_flags() -> None:
    sealer = Sealer(session_keys().terminal_to_engine)
    once = sealer.seal(tap())
    with pytest.raises(ValueError, match="flags 0"):
        sealer.seal(once)


# --- Every way to fail ---------------------------------------------------------------------


def test_any_flipped_bit_fails_the_tag() -> None:
    """Header fields, body, counter or tag: one bit changed is BAD_TAG."""
    key = session_keys().terminal_to_engine
    sealed = Sealer(key).seal(tap())
    # The length prefix, version and flags never reach the opener changed: the
    # reader refuses a wrong version or flags, and a wrong length misframes.
    checked_by_the_reader = {0, 1, 2, 3, 4, 6, 7}
    for position in sorted(set(range(len(sealed))) - checked_by_the_reader):
        for bit in range(8):
            altered = bytearray(sealed)
            altered[position] ^= 1 << bit
            code, _ = refused(Opener(key), bytes(altered))
            assert code == ErrorCode.BAD_TAG, (position, bit)


def test_a_replayed_frame_fails_the_counter() -> None:
    key = session_keys().terminal_to_engine
    sealer, opener = Sealer(key), Opener(key)
    first = sealer.seal(tap())
    assert opener.open(MessageType.TAP, 3, first[12:]) == tap()[12:]
    assert refused(opener, first) == (ErrorCode.BAD_COUNTER, 3)


def test_a_reordered_or_lost_frame_fails_the_counter() -> None:
    key = session_keys().terminal_to_engine
    sealer = Sealer(key)
    first, second = sealer.seal(tap(3, 1001)), sealer.seal(tap(4, 1002))
    assert refused(Opener(key), second) == (ErrorCode.BAD_COUNTER, 4)  # reordered
    opener = Opener(key)
    opener.open(MessageType.TAP, 3, first[12:])
    assert refused(opener, sealer.seal(tap(5, 1003))) == (ErrorCode.BAD_COUNTER, 5)  # one lost between


def test_a_reflected_frame_fails_the_tag() -> None:
    """A frame sealed by the engine, sent back to it as if from the terminal."""
    keys = session_keys()
    from_engine = Sealer(keys.engine_to_terminal).seal(fastpath.encode_ping(9, 1))
    assert refused(Opener(keys.terminal_to_engine), from_engine) == (ErrorCode.BAD_TAG, 9)


def test_a_frame_of_another_session_fails_the_tag() -> None:
    earlier = session_keys(client_nonce=os.urandom(16))
    replayed = Sealer(earlier.terminal_to_engine).seal(tap())
    assert refused(Opener(session_keys().terminal_to_engine), replayed)[0] == ErrorCode.BAD_TAG


def test_error_text_says_what_failed() -> None:
    key = session_keys().terminal_to_engine
    sealer, opener = Sealer(key), Opener(key)
    sealed = sealer.seal(tap())
    opener.open(MessageType.TAP, 3, sealed[12:])
    with pytest.raises(fastpath.ProtocolError, match=r"frame counter 0, expected 1"):
        opener.open(MessageType.TAP, 3, sealed[12:])
    with pytest.raises(fastpath.ProtocolError, match=r"tag of a sealed frame of type 0x10 does not verify"):
        opener.open(MessageType.TAP, 4, sealed[12:])


# --- Through each twin's reader ------------------------------------------------------------


def test_a_sealed_stream_through_the_reader(fp: ModuleType) -> None:
    """What a terminal writes after its AUTH, read by the engine's reader and opened."""
    keys = session_keys()
    sealer = Sealer(keys.terminal_to_engine)
    requests = [tap(n, 1000 + n) for n in range(3, 9)] + [fastpath.encode_ping(9, 5)]
    stream = fp.encode_auth(2, bytes(32)) + b"".join(sealer.seal(frame) for frame in requests)
    reader, opener = fp.FrameReader(), Opener(keys.terminal_to_engine)
    delivered = []
    for index in range(0, len(stream), 7):
        delivered += reader.feed(stream[index : index + 7])
    assert reader.error is None and delivered[0][0] == MessageType.AUTH
    opened = [opener.open(msg_type, request_id, body) for msg_type, request_id, body in delivered[1:]]
    assert opened == [frame[12:] for frame in requests]
    assert seal.REJECTED_REASONS == ("bad_tag", "bad_counter", "not_sealed")


# --- The compiled twin's two SHA-256 compressions ------------------------------------------


@pytest.fixture(params=["sha-ni", "portable"])
def compression(request: pytest.FixtureRequest) -> Iterator[str]:
    """The compiled twin sealing with one compression, then as it was."""
    compiled = load_twin("cython")
    before = compiled._sha256_compression()
    try:
        compiled._use_sha256_compression(request.param)
    except ValueError:
        pytest.skip("this CPU has no SHA instructions: only the portable compression can run here")
    yield request.param
    compiled._use_sha256_compression(before)


def test_each_compression_gives_hmac_sha256_at_every_length(compression: str) -> None:
    """Every frame length from the smallest ERROR to one of several blocks:
    each padding case (the length field in the last block or in one more)."""
    compiled = load_twin("cython")
    assert compiled._sha256_compression() == compression
    rng = random.Random(11)
    for text_length in range(0, 300):
        key = rng.randbytes(32)
        frame = compiled.encode_error(rng.randrange(2**32), rng.randrange(256), "y" * text_length)
        sealed = compiled.SealKey(key).seal(frame, rng.randrange(2**64))
        assert sealed[-16:] == hmac.digest(key, sealed[4:-16], "sha256")[:16], text_length
        body = compiled.SealKey(key).open(
            sealed[5],
            struct.unpack_from(">I", sealed, 8)[0],
            sealed[12:],
            struct.unpack_from(">Q", sealed, len(sealed) - 24)[0],
        )
        assert body == frame[12:]


def test_the_selected_compression_is_the_fast_one_where_the_cpu_has_it() -> None:
    """Detection: the CPU's flags as Linux lists them against the module's choice."""
    compiled = load_twin("cython")
    try:
        flags = {flag for line in open("/proc/cpuinfo") if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    expected = "sha-ni" if {"sha_ni", "sse4_1", "ssse3"} <= flags else "portable"
    assert compiled._sha256_compression() == expected
