"""The wire codec, run against both twins: compiled and pure Python.

Every test takes the ``fp`` fixture, which is ``engine._fastpath`` (Cython)
or ``engine._fastpath_py`` (pure), so behaviour and error text cannot drift
apart. A missing compiled module FAILS the "cython" half instead of skipping
it, so that a broken build is never mistaken for a green run; set
``CITYCARD_NO_EXTENSIONS=1`` to test the pure twin alone on purpose.

Tests that compare the twins directly (``twins`` fixture) feed the same
bytes to both and demand the same frames, the same exceptions and the same
messages.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import itertools
import pickle
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import limits
from engine.codes import ErrorCode, FrameFlag, MessageType, ResultCode, TapInfo
from tests.twins import load_twin


# Module scope: a twin is a stateless module, and hypothesis needs fixtures
# that are not reset between examples.
@pytest.fixture(scope="module")
def twins() -> tuple[ModuleType, ModuleType]:
    return load_twin("cython"), load_twin("pure")


# --- Helpers ----------------------------------------------------------------

U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

_HEADER = struct.Struct(">IBBHI")


def header(length: int, msg_type: int, *, version: int = 1, flags: int = 0, request_id: int = 0) -> bytes:
    """A frame header built by hand, for frames the encoders refuse to make."""
    return _HEADER.pack(length, version, msg_type, flags, request_id)


def raw_frame(msg_type: int, body: bytes, request_id: int = 0) -> bytes:
    return header(8 + len(body), msg_type, request_id=request_id) + body


# The reader holds a sealed frame to its sizes; its counter and tag are
# checked by engine/seal.py (tests/test_seal.py), so any 24 bytes do here.
TRAILER = bytes(range(0xA0, 0xB8))
HANDSHAKE_ENDS = (MessageType.AUTH, MessageType.AUTH_OK)


def sealed_shape(frame: bytes) -> bytes:
    """A frame as it travels after the handshake: SEALED set, trailer after the body."""
    length, version, msg_type, _flags, request_id = _HEADER.unpack_from(frame)
    return _HEADER.pack(length + len(TRAILER), version, msg_type, FrameFlag.SEALED, request_id) + frame[12:] + TRAILER


def as_sent(frames: list[bytes]) -> bytes:
    """Frames as a peer sends them: those after the first AUTH or AUTH_OK sealed."""
    out, sealed = [], False
    for frame in frames:
        out.append(sealed_shape(frame) if sealed else frame)
        sealed = sealed or frame[5] in HANDSHAKE_ENDS
    return b"".join(out)


def as_delivered(frames: list[bytes]) -> list[tuple[int, int, bytes]]:
    """What a reader delivers for as_sent(frames): sealed bodies keep their trailer."""
    out, sealed = [], False
    for frame in frames:
        out.append((frame[5], _HEADER.unpack_from(frame)[4], frame[12:] + (TRAILER if sealed else b"")))
        sealed = sealed or frame[5] in HANDSHAKE_ENDS
    return out


def outcome(func: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """What func(*args) did, comparable across twins (class name, not class)."""
    try:
        return ("ok", func(*args))
    except Exception as exc:  # noqa: BLE001 - recorded, then compared
        return (type(exc).__name__, (str(exc), getattr(exc, "code", None), getattr(exc, "request_id", None)))


def feed_all(reader: Any, chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    frames: list[tuple[int, int, bytes]] = []
    for chunk in chunks:
        frames += reader.feed(chunk)
        if reader.error is not None:
            break
    return frames


# One sample of every message: (name, type, request_id, encoder args).
# Decoders return the args (a bare value when there is only one).
SAMPLES: list[tuple[str, MessageType, int, tuple[Any, ...]]] = [
    ("hello", MessageType.HELLO, 1, (4242, 3, bytes(range(16)))),
    ("challenge", MessageType.CHALLENGE, 1, (bytes(range(16, 32)),)),
    ("auth", MessageType.AUTH, 2, (bytes(range(32)),)),
    ("auth_ok", MessageType.AUTH_OK, 2, (bytes(range(32, 64)), 1_767_225_600_000)),
    ("tap", MessageType.TAP, 3, (1001, 0x04A1B2C3D4E580, 77, 1_767_225_601_234, 1)),
    ("topup", MessageType.TOPUP, 4, (1002, 0xDEADBEEF, 2000, 1_767_225_602_000)),
    ("reversal", MessageType.REVERSAL, 5, (1003, 1001, 1_767_225_603_000)),
    ("tap_result", MessageType.TAP_RESULT, 3, (1001, 0, 150, 1850, 0)),
    ("tap_result", MessageType.TAP_RESULT, 6, (1004, 25, 0, -35, 0)),
    ("tap_result", MessageType.TAP_RESULT, 10, (1006, 0, 150, 700, 0x03)),
    ("ping", MessageType.PING, 7, (U64,)),
    ("pong", MessageType.PONG, 7, (0,)),
    ("error", MessageType.ERROR, 8, (1, "frame length 20000 above maximum 16380")),
    ("error", MessageType.ERROR, 0, (14, "")),
    ("error", MessageType.ERROR, 9, (9, "señal ünïcode ✓")),
    ("hotlist_request", MessageType.HOTLIST_REQUEST, 11, (41, 0x04A1B2C3D4E580)),
    ("hotlist", MessageType.HOTLIST, 11, (2, 41, 45, 0, [(0x04A1B2C3D4E580, 2), (U64, 0)], bytes(range(64)))),
    ("hotlist", MessageType.HOTLIST, 12, (1, 0, 45, 7, [], b"\xff" * 64)),
    ("rules_request", MessageType.RULES_REQUEST, 13, (U32,)),
    (
        "rules",
        MessageType.RULES,
        13,
        (2, 1, 0, 200, 100, 300, 0, 45, 50, 300, -1, [(0, 150), (1, 75), (63, U32)], bytes(range(64, 128))),
    ),
    ("notice", MessageType.NOTICE, 0, (U64, 7)),
    ("offline_upload", MessageType.OFFLINE_UPLOAD, 14, ([(1001, 0x04A1, 3, 1_767_225_601_234, 1, 2, 0, 150)] * 3,)),
    ("offline_upload", MessageType.OFFLINE_UPLOAD, 15, ([],)),
    ("offline_result", MessageType.OFFLINE_RESULT, 14, ([(1001, 0, 150, -50, 0x300), (1002, 18, 0, 7, 0x100)],)),
]
# Bodies sized by a count of entries (COUNTED_LAYOUTS): head, count offset,
# entry, tail, most entries.
COUNTED = {
    MessageType.HOTLIST: (27, 25, 9, 64, limits.HOTLIST_PAGE_ENTRIES_MAX),
    MessageType.RULES: (36, 34, 5, 64, limits.RULES_FARES_MAX),
    MessageType.OFFLINE_UPLOAD: (2, 0, 38, 0, limits.OFFLINE_TAPS_PER_UPLOAD_MAX),
    MessageType.OFFLINE_RESULT: (2, 0, 23, 0, limits.OFFLINE_TAPS_PER_UPLOAD_MAX),
}


def decoded(args: tuple[Any, ...]) -> Any:
    return args if len(args) > 1 else args[0]


# --- Constants ----------------------------------------------------------------


def test_constants_match_codes_and_limits(fp: ModuleType) -> None:
    for member in MessageType:
        assert getattr(fp, f"MSG_{member.name}") == member.value
    for result in ResultCode:
        assert getattr(fp, f"RESULT_{result.name}") == result.value
    for error in ErrorCode:
        assert getattr(fp, f"ERR_{error.name}") == error.value
    # ...and no constant that the enums do not have.
    names = {n for n in dir(fp) if n.startswith(("MSG_", "RESULT_", "ERR_"))}
    assert names == (
        {f"MSG_{m.name}" for m in MessageType}
        | {f"RESULT_{m.name}" for m in ResultCode}
        | {f"ERR_{m.name}" for m in ErrorCode}
    )
    for name in (
        "PROTOCOL_VERSION",
        "FRAME_HEADER_BYTES",
        "MAX_FRAME_BYTES",
        "ERROR_TEXT_MAX_BYTES",
        "NONCE_BYTES",
        "PROOF_BYTES",
        "SEAL_COUNTER_BYTES",
        "SEAL_TAG_BYTES",
        "SEAL_TRAILER_BYTES",
        "SIGNATURE_BYTES",
        "HOTLIST_PAGE_ENTRIES_MAX",
        "RULES_FARES_MAX",
        "OFFLINE_TAPS_PER_UPLOAD_MAX",
    ):
        assert getattr(fp, name) == getattr(limits, name), name
    for flag in (TapInfo.OFFLINE, TapInfo.OFFLINE_DIFFERS):
        assert getattr(fp, f"INFO_{flag.name}") == flag
    assert fp.FLAG_SEALED == FrameFlag.SEALED
    assert fp.MIN_FRAME_LENGTH == limits.FRAME_HEADER_BYTES - 4


def test_body_sizes_cover_every_fixed_size_type(fp: ModuleType) -> None:
    assert set(fp.BODY_SIZES) == set(MessageType) - {MessageType.ERROR} - set(COUNTED)
    assert fp.COUNTED_LAYOUTS == COUNTED
    assert fp.BODY_SIZES == {
        0x01: 22,
        0x02: 16,
        0x03: 32,
        0x04: 40,
        0x10: 29,
        0x11: 28,
        0x12: 24,
        0x13: 23,
        0x20: 8,
        0x21: 8,
        0x30: 16,
        0x32: 4,
        0x34: 12,
    }
    # The largest counted bodies fit a sealed frame.
    for head, _count_at, entry, tail, most in COUNTED.values():
        assert 12 + head + most * entry + tail + 24 <= limits.MAX_FRAME_BYTES


def test_twins_export_the_same_api(twins: tuple[ModuleType, ModuleType]) -> None:
    compiled, pure = twins
    assert sorted(compiled.__all__) == sorted(pure.__all__)
    assert len(set(pure.__all__)) == len(pure.__all__)
    for name in pure.__all__:
        assert hasattr(compiled, name) and hasattr(pure, name), name
        if not callable(getattr(pure, name)):
            assert getattr(compiled, name) == getattr(pure, name), name


# --- Round trips ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "msg_type", "request_id", "args"), SAMPLES)
def test_round_trip_every_message_type(
    fp: ModuleType, name: str, msg_type: int, request_id: int, args: tuple[Any, ...]
) -> None:
    frame = getattr(fp, f"encode_{name}")(request_id, *args)
    assert type(frame) is bytes
    length, version, frame_type, flags, frame_request_id = _HEADER.unpack_from(frame)
    assert (length, version, frame_type, flags, frame_request_id) == (
        len(frame) - 4,
        1,
        msg_type,
        0,
        request_id,
    )
    if msg_type in COUNTED:
        head, _count_at, entry, tail, _most = COUNTED[msg_type]
        assert (
            len(frame)
            == 12 + head + len(args[-2 if msg_type in (MessageType.HOTLIST, MessageType.RULES) else 0]) * entry + tail
        )
    elif msg_type != MessageType.ERROR:
        assert len(frame) == 12 + fp.BODY_SIZES[msg_type]
    reader = fp.FrameReader()
    [(got_type, got_request_id, body)] = reader.feed(frame)
    assert (got_type, got_request_id) == (msg_type, request_id)
    assert type(body) is bytes and body == frame[12:]
    assert getattr(fp, f"decode_{name}")(body) == decoded(args)
    assert reader.error is None and reader.buffered() == 0


def test_decoders_accept_bytes_like(fp: ModuleType) -> None:
    body = fp.encode_ping(1, 99)[12:]
    assert fp.decode_ping(bytearray(body)) == 99
    assert fp.decode_ping(memoryview(body)) == 99
    assert fp.FrameReader().feed(bytearray(fp.encode_ping(1, 99)))[0][2] == body
    with pytest.raises(TypeError, match=r"^body must be bytes, not int$"):
        fp.decode_ping(8)
    with pytest.raises(TypeError, match=r"^data must be bytes, not str$"):
        fp.FrameReader().feed("abc")


def test_signed_fields_use_twos_complement(fp: ModuleType) -> None:
    frame = fp.encode_tap_result(1, 1, 0, I32_MIN, I64_MIN)
    assert frame[12 + 9 : 12 + 21] == bytes.fromhex("80000000" + "8000000000000000")
    assert fp.decode_tap_result(frame[12:]) == (1, 0, I32_MIN, I64_MIN, 0)
    frame = fp.encode_tap_result(1, 1, 0, -1, -1)
    assert frame[12 + 9 : 12 + 21] == b"\xff" * 12


def test_tap_result_info_is_a_trailing_u16(fp: ModuleType) -> None:
    # Appended after balance_cents, so the fields before it keep their offsets.
    plain = fp.encode_tap_result(3, 1001, 0, 150, 1850)
    frame = fp.encode_tap_result(3, 1001, 0, 150, 1850, 0x0102)
    assert len(frame) == 12 + 23
    assert frame[: 12 + 21] == plain[: 12 + 21]
    assert plain[12 + 21 :] == b"\x00\x00"  # info defaults to 0
    assert frame[12 + 21 :] == b"\x01\x02"  # big-endian
    assert fp.decode_tap_result(frame[12:]) == (1001, 0, 150, 1850, 0x0102)


def test_field_extremes_round_trip(fp: ModuleType) -> None:
    assert fp.decode_tap(fp.encode_tap(U32, U64, U64, U32, U64, U8)[12:]) == (
        U64,
        U64,
        U32,
        U64,
        U8,
    )
    assert fp.decode_hello(fp.encode_hello(0, U32, U16, b"\xff" * 16)[12:]) == (
        U32,
        U16,
        b"\xff" * 16,
    )
    assert fp.decode_tap_result(fp.encode_tap_result(0, 0, U8, I32_MAX, I64_MAX, U16)[12:]) == (
        0,
        U8,
        I32_MAX,
        I64_MAX,
        U16,
    )


# --- Header violations ---------------------------------------------------------

# (case id, bytes, error code, request id, message). Each is a complete
# prefix of a stream: nothing after it is needed to reject it.
VIOLATIONS = [
    ("length-0", b"\x00\x00\x00\x00", ErrorCode.FRAME_TOO_SHORT, 0, "frame length 0 below minimum 8"),
    ("length-7", b"\x00\x00\x00\x07", ErrorCode.FRAME_TOO_SHORT, 0, "frame length 7 below minimum 8"),
    (
        "length-16381",
        (16381).to_bytes(4, "big"),
        ErrorCode.FRAME_TOO_LARGE,
        0,
        "frame length 16381 above maximum 16380",
    ),
    (
        "length-20000",
        (20000).to_bytes(4, "big"),
        ErrorCode.FRAME_TOO_LARGE,
        0,
        "frame length 20000 above maximum 16380",
    ),
    (
        "length-u32-max",
        b"\xff\xff\xff\xff",
        ErrorCode.FRAME_TOO_LARGE,
        0,
        "frame length 4294967295 above maximum 16380",
    ),
    (
        "version-0",
        header(16, 0x20, version=0, request_id=5),
        ErrorCode.UNSUPPORTED_VERSION,
        5,
        "unsupported protocol version 0 (expected 1)",
    ),
    (
        "version-2",
        header(16, 0x20, version=2, request_id=6),
        ErrorCode.UNSUPPORTED_VERSION,
        6,
        "unsupported protocol version 2 (expected 1)",
    ),
    ("type-0x00", header(8, 0x00, request_id=7), ErrorCode.UNKNOWN_TYPE, 7, "unknown message type 0x00"),
    ("type-0x05", header(16, 0x05, request_id=8), ErrorCode.UNKNOWN_TYPE, 8, "unknown message type 0x05"),
    ("type-0xff", header(16, 0xFF, request_id=U32), ErrorCode.UNKNOWN_TYPE, U32, "unknown message type 0xff"),
    (
        "flags-1",
        header(16, 0x20, flags=1, request_id=9),
        ErrorCode.BAD_FLAGS,
        9,
        "reserved flags 0x0001 set (must be 0)",
    ),
    (
        "flags-8000",
        header(16, 0x20, flags=0x8000, request_id=9),
        ErrorCode.BAD_FLAGS,
        9,
        "reserved flags 0x8000 set (must be 0)",
    ),
    # Checks run in the order of docs/protocol.md: version, type, flags, size.
    (
        "version-before-type",
        header(9, 0x05, version=2, flags=1),
        ErrorCode.UNSUPPORTED_VERSION,
        0,
        "unsupported protocol version 2 (expected 1)",
    ),
    ("type-before-flags", header(9, 0x05, flags=1), ErrorCode.UNKNOWN_TYPE, 0, "unknown message type 0x05"),
    ("flags-before-size", header(9, 0x20, flags=1), ErrorCode.BAD_FLAGS, 0, "reserved flags 0x0001 set (must be 0)"),
    # ERROR frames: 3 + text_length bytes of body, text_length <= 200.
    (
        "error-body-0",
        header(8, 0x7F, request_id=3),
        ErrorCode.BAD_BODY_LENGTH,
        3,
        "ERROR body length 0, expected 3..203",
    ),
    (
        "error-body-2",
        header(10, 0x7F, request_id=3),
        ErrorCode.BAD_BODY_LENGTH,
        3,
        "ERROR body length 2, expected 3..203",
    ),
    (
        "error-body-204",
        header(212, 0x7F, request_id=3),
        ErrorCode.BAD_BODY_LENGTH,
        3,
        "ERROR body length 204, expected 3..203",
    ),
    (
        "error-text-201",
        header(8 + 203, 0x7F, request_id=3) + b"\x01\x00\xc9",
        ErrorCode.BAD_BODY_LENGTH,
        3,
        "ERROR text length 201 above maximum 200",
    ),
    (
        "error-text-65535",
        header(8 + 203, 0x7F, request_id=3) + b"\x01\xff\xff",
        ErrorCode.BAD_BODY_LENGTH,
        3,
        "ERROR text length 65535 above maximum 200",
    ),
    (
        "error-text-short",
        header(8 + 10, 0x7F, request_id=4) + b"\x01\x00\x05",
        ErrorCode.BAD_BODY_LENGTH,
        4,
        "ERROR body length 10, expected 3 + text length 5",
    ),
    (
        "error-text-long",
        header(8 + 5, 0x7F, request_id=4) + b"\x01\x00\x05",
        ErrorCode.BAD_BODY_LENGTH,
        4,
        "ERROR body length 5, expected 3 + text length 5",
    ),
]
# Every fixed-size type, one byte short and one byte long, judged from the
# header alone (the body is never awaited).
for _type, _size in {
    MessageType.HELLO: 22,
    MessageType.CHALLENGE: 16,
    MessageType.AUTH: 32,
    MessageType.AUTH_OK: 40,
    MessageType.TAP: 29,
    MessageType.TOPUP: 28,
    MessageType.REVERSAL: 24,
    MessageType.TAP_RESULT: 23,
    MessageType.PING: 8,
    MessageType.PONG: 8,
}.items():
    for _body in (_size - 1, _size + 1, 0):
        VIOLATIONS.append(
            (
                f"{_type.name}-body-{_body}",
                header(8 + _body, _type, request_id=_body),
                ErrorCode.BAD_BODY_LENGTH,
                _body,
                f"{_type.name} body length {_body}, expected {_size}",
            )
        )


@pytest.mark.parametrize(
    ("data", "code", "request_id", "message"),
    [case[1:] for case in VIOLATIONS],
    ids=[case[0] for case in VIOLATIONS],
)
def test_header_violation(fp: ModuleType, data: bytes, code: int, request_id: int, message: str) -> None:
    reader = fp.FrameReader()
    assert reader.feed(data) == []
    error = reader.error
    assert isinstance(error, fp.ProtocolError)
    assert (error.code, error.request_id, str(error)) == (code, request_id, message)
    assert reader.buffered() == 0  # a dead connection holds nothing
    # The reader is stopped for good: the same error, whatever comes next.
    with pytest.raises(fp.ProtocolError) as raised:
        reader.feed(fp.encode_ping(1, 1))
    assert raised.value is error


@pytest.mark.parametrize("data", [case[1] for case in VIOLATIONS], ids=[case[0] for case in VIOLATIONS])
def test_violation_detected_byte_by_byte(fp: ModuleType, data: bytes) -> None:
    """The last byte of each violation case is the one that reveals it."""
    reader = fp.FrameReader()
    for index in range(len(data) - 1):
        assert reader.feed(data[index : index + 1]) == []
        assert reader.error is None, f"rejected early, at byte {index}"
    assert reader.feed(data[-1:]) == []
    assert reader.error is not None


def test_too_large_is_refused_from_the_prefix_alone(fp: ModuleType) -> None:
    reader = fp.FrameReader()
    assert reader.feed(b"\x00\x00") == [] and reader.error is None
    assert reader.feed(b"\x4e\x20") == []  # 20000: no body awaited, none stored
    assert reader.error is not None
    assert reader.error.code == ErrorCode.FRAME_TOO_LARGE
    assert reader.buffered() == 0


def test_largest_length_is_not_too_large(fp: ModuleType) -> None:
    # 16380 is a legal length; a PING that long fails on its body size.
    reader = fp.FrameReader()
    reader.feed(header(16380, MessageType.PING))
    assert reader.error is not None
    assert reader.error.code == ErrorCode.BAD_BODY_LENGTH


def test_max_frame_bytes_can_be_lowered(fp: ModuleType) -> None:
    reader = fp.FrameReader(max_frame_bytes=20)
    assert reader.max_frame_bytes == 20
    assert len(reader.feed(fp.encode_ping(1, 2))) == 1  # 20 bytes: fits
    reader.feed(fp.encode_tap(1, 1, 1, 1, 1, 0))
    assert reader.error is not None
    assert str(reader.error) == "frame length 37 above maximum 16"


@pytest.mark.parametrize(
    ("value", "exc_type", "message"),
    [
        (11, ValueError, "max_frame_bytes 11 out of range (12..16384)"),
        (16385, ValueError, "max_frame_bytes 16385 out of range (12..16384)"),
        (2.0, TypeError, "max_frame_bytes must be int, not float"),
    ],
)
def test_max_frame_bytes_is_validated(fp: ModuleType, value: Any, exc_type: type[Exception], message: str) -> None:
    with pytest.raises(exc_type) as raised:
        fp.FrameReader(value)
    assert str(raised.value) == message


def test_reader_error_is_read_only(fp: ModuleType) -> None:
    reader = fp.FrameReader()
    with pytest.raises(AttributeError):
        reader.error = fp.ProtocolError(1, "x")


# --- Stream splitting ---------------------------------------------------------------


def sample_frames(fp: ModuleType) -> list[bytes]:
    return [getattr(fp, f"encode_{name}")(request_id, *args) for name, _type, request_id, args in SAMPLES]


def all_sample_frames(fp: ModuleType) -> bytes:
    """Every sample in order: those after AUTH sealed, as a stream has them."""
    return as_sent(sample_frames(fp))


def expected_sample_frames(fp: ModuleType) -> list[tuple[int, int, bytes]]:
    return as_delivered(sample_frames(fp))


def test_byte_by_byte_delivery(fp: ModuleType) -> None:
    stream = all_sample_frames(fp)
    reader = fp.FrameReader()
    frames = []
    for index in range(len(stream)):
        frames += reader.feed(stream[index : index + 1])
        assert reader.buffered() < 12 + 203  # never more than one frame
    assert frames == expected_sample_frames(fp)
    assert reader.error is None and reader.buffered() == 0


def test_many_frames_in_one_chunk(fp: ModuleType) -> None:
    stream = b"".join(fp.encode_ping(i, i * 3) for i in range(2000))
    frames = fp.FrameReader().feed(stream)
    assert len(frames) == 2000
    assert frames[1999] == (MessageType.PING, 1999, (1999 * 3).to_bytes(8, "big"))


def test_chunk_boundary_inside_every_frame(fp: ModuleType) -> None:
    stream = as_sent(sample_frames(fp) * 3)
    expected = as_delivered(sample_frames(fp) * 3)
    for step in (2, 5, 11, 12, 13, 34, 100):
        reader = fp.FrameReader()
        chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
        assert feed_all(reader, chunks) == expected, step
        assert reader.buffered() == 0


def test_empty_feed(fp: ModuleType) -> None:
    reader = fp.FrameReader()
    assert reader.feed(b"") == []
    reader.feed(b"\x00\x00\x00")
    assert reader.feed(b"") == [] and reader.buffered() == 3


def test_good_frames_before_a_bad_one_are_delivered(fp: ModuleType) -> None:
    good = fp.encode_ping(1, 10) + fp.encode_tap(2, 1001, 5, 0, 0, 0)
    bad = header(16, MessageType.PING, flags=2, request_id=3) + bytes(8)
    after = fp.encode_ping(4, 40)
    reader = fp.FrameReader()
    frames = reader.feed(good + bad + after)
    assert [(t, r) for t, r, _ in frames] == [(MessageType.PING, 1), (MessageType.TAP, 2)]
    assert reader.error is not None
    assert (reader.error.code, reader.error.request_id) == (ErrorCode.BAD_FLAGS, 3)
    assert reader.buffered() == 0
    with pytest.raises(fp.ProtocolError) as raised:
        reader.feed(b"")
    assert raised.value is reader.error


# --- Sealed frames (after the handshake) ----------------------------------------------


@pytest.mark.parametrize("last", HANDSHAKE_ENDS, ids=lambda t: t.name)
def test_reader_turns_sealed_after_the_handshake(fp: ModuleType, last: MessageType) -> None:
    """The frame after AUTH (terminal's stream) or AUTH_OK (engine's) is sealed,
    even when both arrive in one chunk; the trailer is delivered with the body."""
    end = fp.encode_auth(2, bytes(32)) if last == MessageType.AUTH else fp.encode_auth_ok(2, bytes(32), 7)
    ping = fp.encode_ping(3, 42)
    error = fp.encode_error(4, ErrorCode.BAD_TAG, "tag")
    reader = fp.FrameReader()
    assert reader.sealed is False
    frames = reader.feed(fp.encode_ping(1, 1) + end + sealed_shape(ping) + sealed_shape(error))
    assert frames == [
        (MessageType.PING, 1, fp.encode_ping(1, 1)[12:]),
        (last, 2, end[12:]),
        (MessageType.PING, 3, ping[12:] + TRAILER),
        (MessageType.ERROR, 4, error[12:] + TRAILER),
    ]
    assert reader.sealed is True and reader.error is None
    with pytest.raises(AttributeError):
        reader.sealed = False


SEALED_VIOLATIONS = [
    (
        "plain-after-handshake",
        header(16, MessageType.PING, request_id=9),
        ErrorCode.BAD_FLAGS,
        9,
        "flags 0x0000 after the handshake (must be 0x0001, sealed)",
    ),
    (
        "reserved-bit-with-sealed",
        header(40, MessageType.PING, flags=3, request_id=9),
        ErrorCode.BAD_FLAGS,
        9,
        "flags 0x0003 after the handshake (must be 0x0001, sealed)",
    ),
    (
        "shorter-than-its-seal",
        header(8 + 23, MessageType.PING, flags=1, request_id=9),
        ErrorCode.BAD_BODY_LENGTH,
        9,
        "sealed frame length 31 below minimum 32",
    ),
    (
        "body-long",
        header(8 + 9 + 24, MessageType.PING, flags=1, request_id=9),
        ErrorCode.BAD_BODY_LENGTH,
        9,
        "PING body length 9, expected 8",
    ),
    (
        "empty-body",
        header(8 + 24, MessageType.TAP, flags=1, request_id=9),
        ErrorCode.BAD_BODY_LENGTH,
        9,
        "TAP body length 0, expected 29",
    ),
    (
        "error-short",
        header(8 + 2 + 24, MessageType.ERROR, flags=1, request_id=9),
        ErrorCode.BAD_BODY_LENGTH,
        9,
        "ERROR body length 2, expected 3..203",
    ),
    (
        "error-text-mismatch",
        header(8 + 3 + 24, MessageType.ERROR, flags=1, request_id=9) + b"\x01\x00\x05",
        ErrorCode.BAD_BODY_LENGTH,
        9,
        "ERROR body length 3, expected 3 + text length 5",
    ),
]


@pytest.mark.parametrize(
    ("data", "code", "request_id", "message"),
    [case[1:] for case in SEALED_VIOLATIONS],
    ids=[case[0] for case in SEALED_VIOLATIONS],
)
def test_sealed_frame_violation(fp: ModuleType, data: bytes, code: int, request_id: int, message: str) -> None:
    """After the handshake: refused at the byte that shows it, never earlier."""
    reader = fp.FrameReader()
    reader.feed(fp.encode_auth(1, bytes(32)))
    for index in range(len(data) - 1):
        assert reader.feed(data[index : index + 1]) == []
        assert reader.error is None, f"rejected early, at byte {index}"
    assert reader.feed(data[-1:]) == []
    assert reader.error is not None
    assert (reader.error.code, reader.error.request_id, str(reader.error)) == (code, request_id, message)
    assert reader.buffered() == 0


def test_sealed_frame_before_the_handshake_is_refused(fp: ModuleType) -> None:
    reader = fp.FrameReader()
    assert reader.feed(fp.encode_ping(1, 1) + sealed_shape(fp.encode_ping(2, 2)))[0][1] == 1
    assert reader.error is not None
    assert (reader.error.code, reader.error.request_id) == (ErrorCode.BAD_FLAGS, 2)
    assert str(reader.error) == "reserved flags 0x0001 set (must be 0)"
    assert reader.sealed is False


def test_twins_agree_on_sealed_streams(twins: tuple[ModuleType, ModuleType]) -> None:
    compiled, pure = twins
    for _case_id, data, *_rest in SEALED_VIOLATIONS:
        stream = compiled.encode_auth_ok(1, bytes(32), 0) + data
        compiled_reader, pure_reader = compiled.FrameReader(), pure.FrameReader()
        assert outcome(compiled_reader.feed, stream) == outcome(pure_reader.feed, stream)
        assert outcome(compiled_reader.feed, b"x") == outcome(pure_reader.feed, b"x")
        assert compiled_reader.sealed == pure_reader.sealed


def test_good_frames_before_a_bad_one_across_chunks(fp: ModuleType) -> None:
    # The bad header arrives while a partial frame is buffered.
    stream = fp.encode_ping(1, 10) + fp.encode_ping(2, 20) + b"\x00\x00\x00\x01"
    reader = fp.FrameReader()
    assert reader.feed(stream[:25]) == [(MessageType.PING, 1, (10).to_bytes(8, "big"))]
    assert reader.buffered() == 5
    assert reader.feed(stream[25:]) == [(MessageType.PING, 2, (20).to_bytes(8, "big"))]
    assert reader.error is not None
    assert reader.error.code == ErrorCode.FRAME_TOO_SHORT


# --- Encoders: misuse is ValueError / TypeError -----------------------------------

# (call, exception type, message): the twins must raise the same.
MISUSE: list[tuple[str, Callable[[ModuleType], Any], type[Exception], str]] = [
    (
        "request-id-negative",
        lambda fp: fp.encode_ping(-1, 0),
        ValueError,
        "request_id -1 out of range for u32 (0..4294967295)",
    ),
    (
        "request-id-too-big",
        lambda fp: fp.encode_ping(U32 + 1, 0),
        ValueError,
        "request_id 4294967296 out of range for u32 (0..4294967295)",
    ),
    (
        "payload-too-big",
        lambda fp: fp.encode_pong(1, U64 + 1),
        ValueError,
        "payload 18446744073709551616 out of range for u64 (0..18446744073709551615)",
    ),
    ("payload-float", lambda fp: fp.encode_ping(1, 1.5), TypeError, "payload must be int, not float"),
    ("request-id-str", lambda fp: fp.encode_ping("1", 1), TypeError, "request_id must be int, not str"),
    (
        "terminal-id",
        lambda fp: fp.encode_hello(1, U32 + 1, 1, bytes(16)),
        ValueError,
        "terminal_id 4294967296 out of range for u32 (0..4294967295)",
    ),
    (
        "key-version",
        lambda fp: fp.encode_hello(1, 1, U16 + 1, bytes(16)),
        ValueError,
        "key_version 65536 out of range for u16 (0..65535)",
    ),
    (
        "client-nonce-short",
        lambda fp: fp.encode_hello(1, 1, 1, bytes(15)),
        ValueError,
        "client_nonce must be 16 bytes, got 15",
    ),
    (
        "client-nonce-str",
        lambda fp: fp.encode_hello(1, 1, 1, "x" * 16),
        TypeError,
        "client_nonce must be bytes, not str",
    ),
    (
        "server-nonce-long",
        lambda fp: fp.encode_challenge(1, bytes(17)),
        ValueError,
        "server_nonce must be 16 bytes, got 17",
    ),
    ("proof-short", lambda fp: fp.encode_auth(1, bytes(31)), ValueError, "proof must be 32 bytes, got 31"),
    (
        "engine-proof-none",
        lambda fp: fp.encode_auth_ok(1, None, 0),
        TypeError,
        "engine_proof must be bytes, not NoneType",
    ),
    (
        "engine-time",
        lambda fp: fp.encode_auth_ok(1, bytes(32), -1),
        ValueError,
        "engine_time_ms -1 out of range for u64 (0..18446744073709551615)",
    ),
    (
        "tap-flags",
        lambda fp: fp.encode_tap(1, 1, 1, 1, 1, 256),
        ValueError,
        "tap_flags 256 out of range for u8 (0..255)",
    ),
    (
        "card-counter",
        lambda fp: fp.encode_tap(1, 1, 1, -5, 1, 0),
        ValueError,
        "card_counter -5 out of range for u32 (0..4294967295)",
    ),
    (
        "card-uid",
        lambda fp: fp.encode_topup(1, 1, U64 + 1, 1, 1),
        ValueError,
        "card_uid 18446744073709551616 out of range for u64 (0..18446744073709551615)",
    ),
    (
        "amount-topup",
        lambda fp: fp.encode_topup(1, 1, 1, -1, 1),
        ValueError,
        "amount_cents -1 out of range for u32 (0..4294967295)",
    ),
    (
        "original-seq",
        lambda fp: fp.encode_reversal(1, 1, -1, 1),
        ValueError,
        "original_seq -1 out of range for u64 (0..18446744073709551615)",
    ),
    ("result", lambda fp: fp.encode_tap_result(1, 1, 300, 0, 0), ValueError, "result 300 out of range for u8 (0..255)"),
    (
        "amount-i32",
        lambda fp: fp.encode_tap_result(1, 1, 0, I32_MAX + 1, 0),
        ValueError,
        "amount_cents 2147483648 out of range for i32 (-2147483648..2147483647)",
    ),
    (
        "balance-i64",
        lambda fp: fp.encode_tap_result(1, 1, 0, 0, I64_MIN - 1),
        ValueError,
        "balance_cents -9223372036854775809 out of range for i64 (-9223372036854775808..9223372036854775807)",
    ),
    (
        "info-u16",
        lambda fp: fp.encode_tap_result(1, 1, 0, 0, 0, U16 + 1),
        ValueError,
        "info 65536 out of range for u16 (0..65535)",
    ),
    (
        "info-negative",
        lambda fp: fp.encode_tap_result(1, 1, 0, 0, 0, -1),
        ValueError,
        "info -1 out of range for u16 (0..65535)",
    ),
    ("info-none", lambda fp: fp.encode_tap_result(1, 1, 0, 0, 0, None), TypeError, "info must be int, not NoneType"),
    ("error-code", lambda fp: fp.encode_error(1, 256, ""), ValueError, "code 256 out of range for u8 (0..255)"),
    ("error-text-bytes", lambda fp: fp.encode_error(1, 1, b"x"), TypeError, "text must be str, not bytes"),
    (
        "proof-key-short",
        lambda fp: fp.terminal_proof(bytes(16), 1, 1, bytes(16), bytes(16)),
        ValueError,
        "key must be 32 bytes, got 16",
    ),
    (
        "proof-nonce",
        lambda fp: fp.engine_proof(bytes(32), 1, 1, bytes(16), bytes(8)),
        ValueError,
        "server_nonce must be 16 bytes, got 8",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc_type", "message"),
    [case[1:] for case in MISUSE],
    ids=[case[0] for case in MISUSE],
)
def test_encoder_misuse(
    fp: ModuleType,
    call: Callable[[ModuleType], Any],
    exc_type: type[Exception],
    message: str,
) -> None:
    with pytest.raises(exc_type) as raised:
        call(fp)
    assert type(raised.value) is exc_type  # never a ProtocolError
    assert str(raised.value) == message


def test_encoders_accept_int_enums_and_bytes_like(fp: ModuleType) -> None:
    frame = fp.encode_tap_result(1, 1, ResultCode.INSUFFICIENT_FUNDS, 0, 5)
    assert fp.decode_tap_result(frame[12:])[1] == 25
    frame = fp.encode_tap_result(1, 1, 0, 150, 5, TapInfo.SHOW_ID | TapInfo.RENEWAL_DUE)
    assert fp.decode_tap_result(frame[12:])[4] == 0x06
    assert fp.encode_challenge(1, bytearray(16)) == fp.encode_challenge(1, bytes(16))


def test_error_text_is_truncated_at_a_character_boundary(fp: ModuleType) -> None:
    cases = {
        "a" * 200: "a" * 200,
        "a" * 201: "a" * 200,
        "a" * 199 + "é": "a" * 199,  # é is 2 bytes: it would end at 201
        "a" * 198 + "é": "a" * 198 + "é",  # ends exactly at 200
        "a" * 198 + "€": "a" * 198,  # 3 bytes
        "a" * 197 + "😀": "a" * 197,  # 4 bytes, would end at 201
        "a" * 196 + "😀": "a" * 196 + "😀",
        "é" * 101: "é" * 100,
    }
    for text, kept in cases.items():
        frame = fp.encode_error(1, ErrorCode.INTERNAL, text)
        assert len(kept.encode()) <= 200
        assert frame[12 + 1 : 12 + 3] == len(kept.encode()).to_bytes(2, "big")
        assert fp.decode_error(frame[12:]) == (ErrorCode.INTERNAL, kept)
        assert fp.FrameReader().feed(frame)[0][0] == MessageType.ERROR


def test_error_text_with_lone_surrogate_is_encoded(fp: ModuleType) -> None:
    assert fp.decode_error(fp.encode_error(0, 1, "a\ud800b")[12:]) == (1, "a?b")


# --- Decoders -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "msg_type"),
    [(t.name.lower(), t) for t in MessageType if t != MessageType.ERROR and t not in COUNTED],
)
def test_decoder_refuses_a_wrong_body_length(fp: ModuleType, name: str, msg_type: MessageType) -> None:
    size = fp.BODY_SIZES[msg_type]
    decode = getattr(fp, f"decode_{name}")
    for length in (0, size - 1, size + 1):
        with pytest.raises(fp.ProtocolError) as raised:
            decode(bytes(length))
        error = raised.value
        assert (error.code, error.request_id) == (ErrorCode.BAD_BODY_LENGTH, 0)
        assert str(error) == f"{msg_type.name} body length {length}, expected {size}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "ERROR body length 0, expected 3..203"),
        (b"\x01\x00", "ERROR body length 2, expected 3..203"),
        (b"\x01\x00\x02a", "ERROR body length 4, expected 3 + text length 2"),
        (b"\x01\x00\xc9" + b"a" * 201, "ERROR body length 204, expected 3..203"),
        (b"\x01\x00\xc9" + b"a" * 200, "ERROR text length 201 above maximum 200"),
    ],
)
def test_decode_error_refuses_inconsistent_bodies(fp: ModuleType, body: bytes, message: str) -> None:
    with pytest.raises(fp.ProtocolError) as raised:
        fp.decode_error(body)
    assert raised.value.code == ErrorCode.BAD_BODY_LENGTH
    assert str(raised.value) == message


def test_decode_error_replaces_invalid_utf8(fp: ModuleType) -> None:
    body = b"\x0e\x00\x04a\xff\xc3b"
    assert fp.decode_error(body) == (14, "a\ufffd\ufffdb")
    frames = fp.FrameReader().feed(raw_frame(MessageType.ERROR, body))
    assert fp.decode_error(frames[0][2]) == (14, "a\ufffd\ufffdb")


# --- ProtocolError ------------------------------------------------------------------


def test_protocol_error(fp: ModuleType) -> None:
    error = fp.ProtocolError(ErrorCode.BAD_FLAGS, "reserved flags 0x0001 set", 9)
    assert isinstance(error, Exception)
    assert (error.code, error.request_id, str(error)) == (6, 9, "reserved flags 0x0001 set")
    assert fp.ProtocolError(1, "x").request_id == 0
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.code, copy.request_id, str(copy)) == (
        fp.ProtocolError,
        6,
        9,
        "reserved flags 0x0001 set",
    )
    assert repr(error) == (
        "ProtocolError(code=<ErrorCode.BAD_FLAGS: 6>, message='reserved flags 0x0001 set', request_id=9)"
    )


# --- Handshake proofs -------------------------------------------------------------------


def test_proofs_follow_the_documented_formula(fp: ModuleType) -> None:
    key, client, server = bytes(range(32)), b"\x11" * 16, b"\x22" * 16
    transcript = struct.pack(">IH", 4242, 3) + client + server
    expected_terminal = hmac.new(key, b"citycard/v1/terminal-proof" + transcript, hashlib.sha256).digest()
    expected_engine = hmac.new(key, b"citycard/v1/engine-proof" + transcript, hashlib.sha256).digest()
    assert fp.terminal_proof(key, 4242, 3, client, server) == expected_terminal
    assert fp.engine_proof(key, 4242, 3, client, server) == expected_engine
    assert expected_terminal != expected_engine
    # Every input is bound into the proof.
    assert fp.terminal_proof(key, 4243, 3, client, server) != expected_terminal
    assert fp.terminal_proof(key, 4242, 4, client, server) != expected_terminal
    assert fp.terminal_proof(key, 4242, 3, server, client) != expected_terminal


# --- Twins compared directly ------------------------------------------------------------


def test_twins_raise_identical_errors(twins: tuple[ModuleType, ModuleType]) -> None:
    compiled, pure = twins
    for _case_id, call, _exc_type, _message in MISUSE:
        assert outcome(call, compiled) == outcome(call, pure)
    for _case_id, data, *_rest in VIOLATIONS:
        compiled_reader, pure_reader = compiled.FrameReader(), pure.FrameReader()
        assert outcome(compiled_reader.feed, data) == outcome(pure_reader.feed, data)
        assert outcome(compiled_reader.feed, b"x") == outcome(pure_reader.feed, b"x")
    for name in ("hello", "tap", "error", "ping", "auth_ok", "tap_result"):
        for body in (b"", b"\x01\x00\x05", bytes(21), bytes(23), bytes(300)):
            decoder = f"decode_{name}"
            assert outcome(getattr(compiled, decoder), body) == outcome(getattr(pure, decoder), body)


# --- Property tests ---------------------------------------------------------------------

u8 = st.integers(0, U8)
u16 = st.integers(0, U16)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
i32 = st.integers(I32_MIN, I32_MAX)
i64 = st.integers(I64_MIN, I64_MAX)
nonce = st.binary(min_size=16, max_size=16)
proof = st.binary(min_size=32, max_size=32)

FIELDS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "hello": st.tuples(u32, u16, nonce),
    "challenge": st.tuples(nonce),
    "auth": st.tuples(proof),
    "auth_ok": st.tuples(proof, u64),
    "tap": st.tuples(u64, u64, u32, u64, u8),
    "topup": st.tuples(u64, u64, u32, u64),
    "reversal": st.tuples(u64, u64, u64),
    "tap_result": st.tuples(u64, u8, i32, i64, u16),
    "ping": st.tuples(u64),
    "pong": st.tuples(u64),
    # Texts whose UTF-8 fits: longer ones are truncated (tested above).
    "error": st.tuples(u8, st.text(max_size=50)),
}
messages = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), u32, FIELDS[name]))

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(message=messages)
def test_property_round_trip(fp: ModuleType, message: tuple[str, int, tuple[Any, ...]]) -> None:
    name, request_id, args = message
    frame = getattr(fp, f"encode_{name}")(request_id, *args)
    [(msg_type, got_request_id, body)] = fp.FrameReader().feed(frame)
    assert msg_type == getattr(fp, f"MSG_{name.upper()}")
    assert got_request_id == request_id
    assert getattr(fp, f"decode_{name}")(body) == decoded(args)


@PROPERTY_SETTINGS
@given(stream=st.lists(messages, max_size=8), cuts=st.lists(st.integers(0, 400)))
def test_property_any_split_gives_the_same_frames(
    fp: ModuleType, stream: list[tuple[str, int, tuple[Any, ...]]], cuts: list[int]
) -> None:
    data = as_sent([getattr(fp, f"encode_{name}")(request_id, *args) for name, request_id, args in stream])
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(fp.FrameReader(), chunks) == fp.FrameReader().feed(data)
    assert len(fp.FrameReader().feed(data)) == len(stream)


def _garbage_outcome(module: ModuleType, chunks: list[bytes]) -> tuple[Any, ...]:
    reader = module.FrameReader()
    frames = []
    for chunk in chunks:
        try:
            frames += reader.feed(chunk)
        except module.ProtocolError as exc:
            # Only after the reader stopped, and always the recorded error.
            assert exc is reader.error
        # Never more than one max-size frame between calls.
        assert reader.buffered() < module.MAX_FRAME_BYTES
    error = reader.error
    return (
        frames,
        None if error is None else (error.code, error.request_id, str(error)),
        reader.buffered(),
    )


# Garbage that often looks like frames: a valid-ish length and version make
# the later checks reachable, which pure random bytes rarely do.
plausible_headers = st.builds(
    header,
    st.one_of(st.integers(0, 40), st.integers(0, U32)),
    st.sampled_from([*MessageType, 0x00, 0x05, 0xFF]),
    version=st.sampled_from([1, 1, 1, 2]),
    flags=st.sampled_from([0, 0, 0, 1]),
    request_id=u32,
)
garbage = st.lists(st.one_of(st.binary(max_size=64), plausible_headers), max_size=12).map(b"".join)


@PROPERTY_SETTINGS
@given(data=garbage, sizes=st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_property_garbage_only_raises_protocol_error(fp: ModuleType, data: bytes, sizes: list[int]) -> None:
    chunks, pos = [], 0
    while pos < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos += size
    frames, error, held = _garbage_outcome(fp, chunks)
    # Whatever the split, the reader sees the same stream.
    assert _garbage_outcome(fp, [data]) == (frames, error, held)
    sealed = False
    for msg_type, _request_id, body in frames:
        name = MessageType(msg_type).name.lower()
        try:
            getattr(fp, f"decode_{name}")(body[: -len(TRAILER)] if sealed else body)
        except fp.ProtocolError:  # pragma: no cover - the reader checked sizes
            pytest.fail("a frame from FrameReader failed to decode")
        sealed = sealed or msg_type in HANDSHAKE_ENDS


@PROPERTY_SETTINGS
@given(data=garbage, message=messages)
def test_property_twins_agree_on_any_input(
    twins: tuple[ModuleType, ModuleType],
    data: bytes,
    message: tuple[str, int, tuple[Any, ...]],
) -> None:
    compiled, pure = twins
    assert _garbage_outcome(compiled, [data]) == _garbage_outcome(pure, [data])
    name, request_id, args = message
    encode = f"encode_{name}"
    assert getattr(compiled, encode)(request_id, *args) == getattr(pure, encode)(request_id, *args)
    for body in (data[:40], data[3:]):
        for decoder in ("decode_tap", "decode_error", "decode_hello"):
            assert outcome(getattr(compiled, decoder), body) == outcome(getattr(pure, decoder), body)


# --- The selector ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("1", "pure"), ("0", None), ("", None)])
def test_selector_honours_the_environment_switch(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str | None
) -> None:
    import engine.fastpath

    monkeypatch.setenv("CITYCARD_NO_EXTENSIONS", value)
    try:
        module = importlib.reload(engine.fastpath)
        if expected is None:  # the switch is off: compiled when it is built
            try:
                importlib.import_module("engine._fastpath")
                expected = "cython"
            except ImportError:
                expected = "pure"
        assert module.IMPLEMENTATION == expected
        assert module.FrameReader is load_twin(expected).FrameReader
        for name in load_twin("pure").__all__:
            assert hasattr(module, name), name
    finally:
        monkeypatch.undo()
        importlib.reload(engine.fastpath)


# --- Counted bodies (HOTLIST, RULES, OFFLINE_UPLOAD, OFFLINE_RESULT) -------------


@pytest.mark.parametrize("msg_type", list(COUNTED), ids=lambda t: t.name)
def test_counted_body_lengths_are_judged_from_the_header_then_the_count(fp: ModuleType, msg_type: MessageType) -> None:
    head, count_at, entry, tail, most = COUNTED[msg_type]
    name = msg_type.name
    fixed = head + tail
    # From the header alone: a length no count can make.
    for length in (fixed - 1, fixed + 1, fixed + most * entry + entry):
        reader = fp.FrameReader()
        assert reader.feed(header(8 + length, msg_type, request_id=3)) == []
        assert reader.error is not None and (reader.error.code, reader.error.request_id) == (
            ErrorCode.BAD_BODY_LENGTH,
            3,
        )
        assert str(reader.error) == f"{name} body length {length}, expected {fixed} + {entry} * count (count 0..{most})"
    # Then the count: the length must be exactly its own, judged as soon as the count has arrived.
    body = bytearray(fixed + 2 * entry)
    body[count_at : count_at + 2] = (3).to_bytes(2, "big")
    data = header(8 + len(body), msg_type, request_id=4) + bytes(body)
    reader = fp.FrameReader()
    for index in range(12 + count_at + 1):
        assert reader.feed(data[index : index + 1]) == [] and reader.error is None
    assert reader.feed(data[12 + count_at + 1 : 12 + count_at + 2]) == []
    assert reader.error is not None and reader.error.request_id == 4
    assert str(reader.error) == f"{name} body length {len(body)}, expected {fixed} + {entry} * count 3"
    # Decoders judge a body handed to them the same way.
    decode = getattr(fp, f"decode_{name.lower()}")
    with pytest.raises(fp.ProtocolError) as raised:
        decode(bytes(body))
    assert str(raised.value) == f"{name} body length {len(body)}, expected {fixed} + {entry} * count 3"
    with pytest.raises(fp.ProtocolError) as raised:
        decode(bytes(fixed - 1))
    assert raised.value.code == ErrorCode.BAD_BODY_LENGTH


def test_the_largest_counted_frames_round_trip(fp: ModuleType) -> None:
    entries = [(U64 - n, n % 7) for n in range(limits.HOTLIST_PAGE_ENTRIES_MAX)]
    frame = fp.encode_hotlist(1, 2, 5, 9, 0, entries, bytes(64))
    reader = fp.FrameReader()
    [(_msg_type, _, body)] = reader.feed(frame)
    assert fp.decode_hotlist(body)[4] == entries
    taps = [(n, n, n, n, 0, 1, 0, n) for n in range(limits.OFFLINE_TAPS_PER_UPLOAD_MAX)]
    assert fp.decode_offline_upload(fp.encode_offline_upload(1, taps)[12:]) == taps


COUNTED_MISUSE: list[tuple[str, Callable[[ModuleType], Any], type[Exception], str]] = [
    (
        "entries-not-a-list",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, 5, bytes(64)),
        TypeError,
        "entries must be a list, not int",
    ),
    (
        "too-many-entries",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, [(1, 1)] * 1801, bytes(64)),
        ValueError,
        "entries has 1801 entries, at most 1800",
    ),
    (
        "entry-not-a-tuple",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, [5], bytes(64)),
        TypeError,
        "entries[0] must be a tuple, not int",
    ),
    (
        "entry-arity",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, [(1, 2, 3)], bytes(64)),
        ValueError,
        "entries[0] must have 2 fields, got 3",
    ),
    (
        "reason",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, [(1, 256)], bytes(64)),
        ValueError,
        "reason 256 out of range for u8 (0..255)",
    ),
    (
        "signature",
        lambda fp: fp.encode_hotlist(1, 0, 0, 0, 0, [], bytes(63)),
        ValueError,
        "signature must be 64 bytes, got 63",
    ),
    (
        "cap",
        lambda fp: fp.encode_rules(1, 1, 1, 0, 0, 0, 0, 0, 0, 0, I32_MAX + 1, -1, [], bytes(64)),
        ValueError,
        "cap_daily_cents 2147483648 out of range for i32 (-2147483648..2147483647)",
    ),
    (
        "fare",
        lambda fp: fp.encode_rules(1, 1, 1, 0, 0, 0, 0, 0, 0, 0, -1, -1, [(0, -1)], bytes(64)),
        ValueError,
        "fare_cents -1 out of range for u32 (0..4294967295)",
    ),
    (
        "taps",
        lambda fp: fp.encode_offline_upload(1, [(1, 1, 1, 1, 1, 1, 1, 1)] * 257),
        ValueError,
        "taps has 257 entries, at most 256",
    ),
    (
        "tap-amount",
        lambda fp: fp.encode_offline_upload(1, [(1, 1, 1, 1, 1, 1, 1, U32 + 1)]),
        ValueError,
        "amount_cents 4294967296 out of range for u32 (0..4294967295)",
    ),
    (
        "result-info",
        lambda fp: fp.encode_offline_result(1, [(1, 0, 0, 0, U16 + 1)]),
        ValueError,
        "info 65536 out of range for u16 (0..65535)",
    ),
    (
        "notice",
        lambda fp: fp.encode_notice(0, 0, U32 + 1),
        ValueError,
        "rules_version 4294967296 out of range for u32 (0..4294967295)",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc_type", "message"),
    [case[1:] for case in COUNTED_MISUSE],
    ids=[case[0] for case in COUNTED_MISUSE],
)
def test_counted_encoder_misuse(
    fp: ModuleType, call: Callable[[ModuleType], Any], exc_type: type[Exception], message: str
) -> None:
    with pytest.raises(exc_type) as raised:
        call(fp)
    assert type(raised.value) is exc_type
    assert str(raised.value) == message
