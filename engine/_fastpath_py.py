"""The byte-level wire codec of protocol v1 and the per-tap decision, in pure Python.

The twin of ``engine/_fastpath.pyx``: the same public API, the same
behaviour, the same exception types and the same error text, for platforms
without a compiler and for debugging (``CITYCARD_NO_EXTENSIONS=1``). Every
test of the codec runs against both. Change one twin, change the other.

It imports nothing from the rest of ``engine``: the numbers it needs are
repeated below with the names and values of ``engine/codes.py`` and
``engine/limits.py`` (``tests/test_codec.py`` checks that they agree).

Below the codec is the per-tap decision fast path: the ``Decision`` record
and the decision ladder (``decide_tap``, ``decide_topup``,
``decide_reversal``), with the same index checks and error text as the
compiled twin.

Untrusted bytes are read only through ``_take()`` (bounds-checked); field
layouts are precompiled ``struct.Struct`` objects. The tags of sealed frames
(``SealKey``) are HMAC-SHA256 computed with ``hashlib``.

Example::

    >>> reader = FrameReader()
    >>> reader.feed(encode_ping(7, 42))
    [(32, 7, b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00*')]
"""

from __future__ import annotations

import hashlib as _hashlib
import hmac as _hmac
import math as _math
import struct
from array import array as _array
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BODY_SIZES",
    "CAP_DAY_TOTAL",
    "CAP_GROUPS_MAX",
    "CAP_MONTH_TOTAL",
    "CARD_STATUS_ACTIVE",
    "CARD_STATUS_BLOCKED",
    "COUNTED_LAYOUTS",
    "ENGINE_PROOF_LABEL",
    "ERROR_BODY_MIN_BYTES",
    "ERROR_TEXT_MAX_BYTES",
    "ERR_AUTH_FAILED",
    "ERR_BAD_BODY_LENGTH",
    "ERR_BAD_COUNTER",
    "ERR_BAD_FIELD",
    "ERR_BAD_FLAGS",
    "ERR_BAD_TAG",
    "ERR_FRAME_TOO_LARGE",
    "ERR_FRAME_TOO_SHORT",
    "ERR_HANDSHAKE_TIMEOUT",
    "ERR_IDLE_TIMEOUT",
    "ERR_INTERNAL",
    "ERR_NOT_AUTHENTICATED",
    "ERR_SHUTTING_DOWN",
    "ERR_TOO_MANY_CONNECTIONS",
    "ERR_TOO_MANY_IN_FLIGHT",
    "ERR_UNEXPECTED_MESSAGE",
    "ERR_UNKNOWN_TYPE",
    "ERR_UNSUPPORTED_VERSION",
    "FLAG_SEALED",
    "FRAME_HEADER_BYTES",
    "HOTLIST_FLAG_FULL",
    "HOTLIST_FLAG_MORE",
    "HOTLIST_PAGE_ENTRIES_MAX",
    "INFO_CAPPED",
    "INFO_CONCESSION_NOT_VALID",
    "INFO_OFFLINE",
    "INFO_OFFLINE_DIFFERS",
    "INFO_PASS_USED",
    "INFO_REFUNDED",
    "INFO_RENEWAL_DUE",
    "INFO_SHARING_SUSPECTED",
    "INFO_SHOW_ID",
    "INFO_TRANSFER",
    "LEDGER_FARE",
    "LEDGER_OPENING",
    "LEDGER_REVERSAL",
    "LEDGER_TOPUP",
    "LENGTH_PREFIX_BYTES",
    "MAX_FRAME_BYTES",
    "MIN_FRAME_LENGTH",
    "MSG_AUTH",
    "MSG_AUTH_OK",
    "MSG_CHALLENGE",
    "MSG_ERROR",
    "MSG_HELLO",
    "MSG_HOTLIST",
    "MSG_HOTLIST_REQUEST",
    "MSG_NOTICE",
    "MSG_OFFLINE_RESULT",
    "MSG_OFFLINE_UPLOAD",
    "MSG_PING",
    "MSG_PONG",
    "MSG_REVERSAL",
    "MSG_RULES",
    "MSG_RULES_REQUEST",
    "MSG_TAP",
    "MSG_TAP_RESULT",
    "MSG_TOPUP",
    "MS_PER_DAY",
    "MS_PER_HOUR",
    "NONCE_BYTES",
    "NO_ACCOUNT",
    "NO_CAP",
    "NO_COUNTER",
    "NO_FARE",
    "NO_GROUP",
    "NO_PRODUCT",
    "NO_PROFILE",
    "NO_RESULT",
    "OFFLINE_TAPS_PER_UPLOAD_MAX",
    "OPERATION_REVERSAL",
    "OPERATION_TAP",
    "OPERATION_TOPUP",
    "POLICY_CAP_GROUP",
    "POLICY_FIELDS",
    "POLICY_GROUP",
    "POLICY_KIND",
    "POLICY_MAX_CHARGE",
    "POLICY_MIN_BALANCE",
    "POLICY_PASSBACK_MS",
    "POLICY_TOLERATED_NEGATIVE",
    "POLICY_TRANSFER",
    "PRODUCT_MULTI_RIDE",
    "PRODUCT_SEASON",
    "PROOF_BYTES",
    "PROTOCOL_VERSION",
    "RESULT_ALREADY_REVERSED",
    "RESULT_ALREADY_VALIDATED",
    "RESULT_APPROVED",
    "RESULT_BALANCE_LIMIT",
    "RESULT_BUSY_RETRY",
    "RESULT_CARD_NOT_ACTIVE",
    "RESULT_CLONE_SUSPECTED",
    "RESULT_INSUFFICIENT_FUNDS",
    "RESULT_INVALID_AMOUNT",
    "RESULT_MINIMUM_BALANCE",
    "RESULT_NOT_REVERSIBLE",
    "RESULT_ORIGINAL_NOT_FOUND",
    "RESULT_PROTOCOL_ERROR",
    "RESULT_REVERSAL_WINDOW_EXPIRED",
    "RESULT_SEQUENCE_REUSED",
    "RESULT_SERVICE_NOT_ALLOWED",
    "RESULT_TERMINAL_NOT_ALLOWED",
    "RESULT_UNKNOWN_CARD",
    "RULES_FARES_MAX",
    "SEAL_COUNTER_BYTES",
    "SEAL_TAG_BYTES",
    "SEAL_TRAILER_BYTES",
    "SERVICE_PER_DURATION",
    "SETTINGS_FIELDS",
    "SETTING_CLONE_BLOCKS_CARD",
    "SETTING_RENEWAL_WINDOW_DAYS",
    "SETTING_SHARING_MAX_SPEED_KMH",
    "SETTING_SHARING_MIN_DISTANCE_M",
    "SETTING_SHOW_ID_PERMILLE",
    "SETTING_TRANSFER_PERCENT_OFF",
    "SETTING_TRANSFER_WINDOW_MS",
    "SIGNATURE_BYTES",
    "STANDARD_PROFILE",
    "TAP_FLAGS_KNOWN",
    "TAP_FLAG_EXIT",
    "TERMINAL_KEY_BYTES",
    "TERMINAL_PROOF_LABEL",
    "TOPUP_MAX_CENTS",
    "Activity",
    "Decision",
    "FrameReader",
    "Original",
    "PositionIndex",
    "Product",
    "ProtocolError",
    "SealKey",
    "decide_reversal",
    "decide_tap",
    "decide_topup",
    "decode_auth",
    "decode_auth_ok",
    "decode_challenge",
    "decode_error",
    "decode_hello",
    "decode_hotlist",
    "decode_hotlist_request",
    "decode_notice",
    "decode_offline_result",
    "decode_offline_upload",
    "decode_ping",
    "decode_pong",
    "decode_reversal",
    "decode_rules",
    "decode_rules_request",
    "decode_tap",
    "decode_tap_result",
    "decode_topup",
    "distance_m",
    "encode_auth",
    "encode_auth_ok",
    "encode_batch",
    "encode_challenge",
    "encode_error",
    "encode_hello",
    "encode_hotlist",
    "encode_hotlist_request",
    "encode_notice",
    "encode_offline_result",
    "encode_offline_upload",
    "encode_ping",
    "encode_pong",
    "encode_reversal",
    "encode_rules",
    "encode_rules_request",
    "encode_tap",
    "encode_tap_result",
    "encode_topup",
    "engine_proof",
    "month_of_day",
    "request_fingerprint",
    "show_id_sampled",
    "terminal_proof",
]

# =============================================================================
# Constants
# =============================================================================

# Wire limits, as in engine/limits.py.
PROTOCOL_VERSION = 1
FRAME_HEADER_BYTES = 12  # length prefix + version, type, flags, request id
MAX_FRAME_BYTES = 16384  # largest frame, length prefix included
ERROR_TEXT_MAX_BYTES = 200  # an ERROR's text is a hint for logs
NONCE_BYTES = 16
PROOF_BYTES = 32  # HMAC-SHA256 output
# Derived from the frame layout in docs/protocol.md.
LENGTH_PREFIX_BYTES = 4
# The length prefix counts what follows it: the smallest legal value is the
# rest of the header with an empty body.
MIN_FRAME_LENGTH = FRAME_HEADER_BYTES - LENGTH_PREFIX_BYTES
ERROR_BODY_MIN_BYTES = 3  # code u8 + text_length u16
TERMINAL_KEY_BYTES = 32  # provisioned by the card office
# Sealed frames (docs/protocol.md, "Sealed frames"): after the handshake
# every frame has this flag set and its body is followed by a u64 counter
# and a tag (HMAC-SHA256 truncated to 128 bits).
FLAG_SEALED = 0x0001
SEAL_COUNTER_BYTES = 8
SEAL_TAG_BYTES = 16
SEAL_TRAILER_BYTES = SEAL_COUNTER_BYTES + SEAL_TAG_BYTES
# Lists for terminals that work offline (docs/protocol.md, "Hot list, rules
# and offline taps"): each HOTLIST and RULES body ends with an Ed25519
# signature; the most entries one frame carries, as in engine/limits.py.
SIGNATURE_BYTES = 64
HOTLIST_PAGE_ENTRIES_MAX = 1800
RULES_FARES_MAX = 64
OFFLINE_TAPS_PER_UPLOAD_MAX = 256
# HOTLIST flags: the entries are the whole list (from after_uid on), not
# changes; more entries follow in another page.
HOTLIST_FLAG_FULL = 0x01
HOTLIST_FLAG_MORE = 0x02

# Message types (engine.codes.MessageType).
MSG_HELLO = 0x01
MSG_CHALLENGE = 0x02
MSG_AUTH = 0x03
MSG_AUTH_OK = 0x04
MSG_TAP = 0x10
MSG_TOPUP = 0x11
MSG_REVERSAL = 0x12
MSG_TAP_RESULT = 0x13
MSG_PING = 0x20
MSG_PONG = 0x21
MSG_HOTLIST_REQUEST = 0x30
MSG_HOTLIST = 0x31
MSG_RULES_REQUEST = 0x32
MSG_RULES = 0x33
MSG_NOTICE = 0x34
MSG_OFFLINE_UPLOAD = 0x40
MSG_OFFLINE_RESULT = 0x41
MSG_ERROR = 0x7F

# Result codes (engine.codes.ResultCode), lowest wins.
RESULT_APPROVED = 0
RESULT_TERMINAL_NOT_ALLOWED = 16
RESULT_UNKNOWN_CARD = 17
RESULT_CARD_NOT_ACTIVE = 18
RESULT_SERVICE_NOT_ALLOWED = 19
RESULT_INVALID_AMOUNT = 20
RESULT_BALANCE_LIMIT = 21
RESULT_ORIGINAL_NOT_FOUND = 22
RESULT_REVERSAL_WINDOW_EXPIRED = 23
RESULT_ALREADY_REVERSED = 24
RESULT_INSUFFICIENT_FUNDS = 25
RESULT_CLONE_SUSPECTED = 26
RESULT_ALREADY_VALIDATED = 27
RESULT_MINIMUM_BALANCE = 28
RESULT_NOT_REVERSIBLE = 29
RESULT_BUSY_RETRY = 64
RESULT_SEQUENCE_REUSED = 65
RESULT_PROTOCOL_ERROR = 66

# ERROR frame codes (engine.codes.ErrorCode).
ERR_FRAME_TOO_LARGE = 1
ERR_FRAME_TOO_SHORT = 2
ERR_UNSUPPORTED_VERSION = 3
ERR_UNKNOWN_TYPE = 4
ERR_BAD_BODY_LENGTH = 5
ERR_BAD_FLAGS = 6
ERR_NOT_AUTHENTICATED = 7
ERR_AUTH_FAILED = 8
ERR_UNEXPECTED_MESSAGE = 9
ERR_HANDSHAKE_TIMEOUT = 10
ERR_IDLE_TIMEOUT = 11
ERR_TOO_MANY_IN_FLIGHT = 12
ERR_SHUTTING_DOWN = 13
ERR_INTERNAL = 14
ERR_BAD_FIELD = 15
ERR_TOO_MANY_CONNECTIONS = 16
ERR_BAD_TAG = 17
ERR_BAD_COUNTER = 18

# Field layouts, big-endian, from the per-type tables of docs/protocol.md.
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IBBHI")  # length, version, type, flags, request_id
_HELLO = struct.Struct(">IH16s")  # terminal_id, key_version, client_nonce
_AUTH_OK = struct.Struct(">32sQ")  # engine_proof, engine_time_ms
_TAP = struct.Struct(">QQIQB")  # seq, uid, counter, time, tap_flags
_TOPUP = struct.Struct(">QQIQ")  # seq, uid, amount, time
_REVERSAL = struct.Struct(">QQQ")  # seq, original_seq, time
_TAP_RESULT = struct.Struct(">QBiqH")  # seq, result, amount, balance, info
_PING = struct.Struct(">Q")  # payload
_ERROR_HEAD = struct.Struct(">BH")  # code, text_length
_HOTLIST_REQUEST = struct.Struct(">QQ")  # since_version, after_uid
_HOTLIST_HEAD = struct.Struct(">BQQQH")  # flags, since_version, version, after_uid, count
_HOTLIST_ENTRY = struct.Struct(">QB")  # card_uid, reason
_RULES_REQUEST = struct.Struct(">I")  # rules_version
# rules_version, service_id, service_kind, min_balance_to_enter_cents,
# tolerated_negative_cents, passback_window_s, max_charge_cents,
# transfer_window_minutes, transfer_percent_off, cap_daily_cents,
# cap_monthly_cents, count
_RULES_HEAD = struct.Struct(">IHBIIIIHBiiH")
_RULES_FARE = struct.Struct(">BI")  # profile_id, fare_cents
_NOTICE = struct.Struct(">QI")  # hotlist_version, rules_version
_COUNT = struct.Struct(">H")  # the entries of a counted body
# seq, uid, counter, time, tap_flags, rules_version, result, amount
_OFFLINE_TAP = struct.Struct(">QQIQBIBI")
_TRANSCRIPT_HEAD = struct.Struct(">IH")  # terminal_id, key_version

# The fixed body size of every message type but ERROR (see ERROR_BODY_MIN_BYTES).
BODY_SIZES = {
    MSG_HELLO: _HELLO.size,
    MSG_CHALLENGE: NONCE_BYTES,
    MSG_AUTH: PROOF_BYTES,
    MSG_AUTH_OK: _AUTH_OK.size,
    MSG_TAP: _TAP.size,
    MSG_TOPUP: _TOPUP.size,
    MSG_REVERSAL: _REVERSAL.size,
    MSG_TAP_RESULT: _TAP_RESULT.size,
    MSG_PING: _PING.size,
    MSG_PONG: _PING.size,
    MSG_HOTLIST_REQUEST: _HOTLIST_REQUEST.size,
    MSG_RULES_REQUEST: _RULES_REQUEST.size,
    MSG_NOTICE: _NOTICE.size,
}

# The bodies sized by a count of entries: (head bytes, offset of the u16
# count in the head, bytes per entry, tail bytes after the entries, most
# entries). The body is exactly head + count * entry + tail bytes.
COUNTED_LAYOUTS = {
    MSG_HOTLIST: (_HOTLIST_HEAD.size, 25, _HOTLIST_ENTRY.size, SIGNATURE_BYTES, HOTLIST_PAGE_ENTRIES_MAX),
    MSG_RULES: (_RULES_HEAD.size, 34, _RULES_FARE.size, SIGNATURE_BYTES, RULES_FARES_MAX),
    MSG_OFFLINE_UPLOAD: (_COUNT.size, 0, _OFFLINE_TAP.size, 0, OFFLINE_TAPS_PER_UPLOAD_MAX),
    MSG_OFFLINE_RESULT: (_COUNT.size, 0, _TAP_RESULT.size, 0, OFFLINE_TAPS_PER_UPLOAD_MAX),
}

# _BODY_SIZE[type]: the fixed body size, _VARIABLE_SIZE for ERROR (sized by
# its text_length field), _COUNTED_SIZE for the COUNTED_LAYOUTS,
# _UNKNOWN_TYPE for a byte that is no message type.
# A private table indexed by the type byte: faster than a dict lookup, and
# immune to a caller mutating the public BODY_SIZES.
_UNKNOWN_TYPE = -1
_VARIABLE_SIZE = -2
_COUNTED_SIZE = -3
_BODY_SIZE = [_UNKNOWN_TYPE] * 256
for _type, _size in BODY_SIZES.items():
    _BODY_SIZE[_type] = _size
_BODY_SIZE[MSG_ERROR] = _VARIABLE_SIZE
for _type in COUNTED_LAYOUTS:
    _BODY_SIZE[_type] = _COUNTED_SIZE
del _type, _size

# FrameReader._frame_size() outcomes besides a frame size.
_NEED_MORE = -1
_VIOLATION = -2

# Names for error text only.
_TYPE_NAMES = {
    MSG_HELLO: "HELLO",
    MSG_CHALLENGE: "CHALLENGE",
    MSG_AUTH: "AUTH",
    MSG_AUTH_OK: "AUTH_OK",
    MSG_TAP: "TAP",
    MSG_TOPUP: "TOPUP",
    MSG_REVERSAL: "REVERSAL",
    MSG_TAP_RESULT: "TAP_RESULT",
    MSG_PING: "PING",
    MSG_PONG: "PONG",
    MSG_HOTLIST_REQUEST: "HOTLIST_REQUEST",
    MSG_HOTLIST: "HOTLIST",
    MSG_RULES_REQUEST: "RULES_REQUEST",
    MSG_RULES: "RULES",
    MSG_NOTICE: "NOTICE",
    MSG_OFFLINE_UPLOAD: "OFFLINE_UPLOAD",
    MSG_OFFLINE_RESULT: "OFFLINE_RESULT",
    MSG_ERROR: "ERROR",
}

# Labels that keep a terminal proof from ever being replayed as an engine
# proof (and vice versa): same key, same transcript, different messages.
TERMINAL_PROOF_LABEL = b"citycard/v1/terminal-proof"
ENGINE_PROOF_LABEL = b"citycard/v1/engine-proof"

_U8_MAX = 0xFF
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_I32_MIN = -(1 << 31)
_I32_MAX = (1 << 31) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


# =============================================================================
# Errors
# =============================================================================


class ProtocolError(Exception):
    """A frame-level violation of the protocol by the peer.

    ``code`` is the ErrorCode to send back in an ERROR frame, ``request_id``
    the offending frame's request id when its header could be read (else 0),
    and ``str(error)`` a short hint for logs. Misuse of this API by the
    engine itself raises ValueError or TypeError instead.

    >>> ProtocolError(ERR_BAD_FLAGS, "reserved flags 0x0001 set", 9).code
    6
    """

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        Exception.__init__(self, message)
        self.code = code
        self.request_id = request_id

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[int, str, int]]:
        return (type(self), (self.code, str(self), self.request_id))

    def __repr__(self) -> str:
        return f"ProtocolError(code={self.code!r}, message={str(self)!r}, request_id={self.request_id!r})"


# =============================================================================
# Reading untrusted bytes
# =============================================================================

_Buffer = bytes | bytearray


def _take(data: _Buffer, offset: int, count: int) -> int:
    """Check that data[offset:offset + count] exists; return offset.

    The one bounds-checked read of the module: every unpack of untrusted
    bytes is at an offset this returned. Callers check lengths before, with
    a protocol-level message; reaching the raise means a codec bug, and a
    bug must never read a field short.
    """
    size = len(data)
    if offset < 0 or count < 0 or count > size - offset:
        raise ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"insufficient data: requested {count} bytes at offset {offset}, {size - offset} remaining",
        )
    return offset


def _as_bytes(value: object, name: str) -> bytes:
    """Accept any bytes-like value (asyncio gives bytes; tests may not)."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


def _body_length_error(msg_type: int, body_length: int, request_id: int) -> ProtocolError:
    """The ProtocolError for a fixed-size body of the wrong length."""
    return ProtocolError(
        ERR_BAD_BODY_LENGTH,
        f"{_TYPE_NAMES[msg_type]} body length {body_length}, expected {_BODY_SIZE[msg_type]}",
        request_id,
    )


def _error_body_error(
    data: _Buffer, start: int, available: int, body_length: int, request_id: int
) -> ProtocolError | None:
    """Check an ERROR body's size against its text_length field.

    The body starts at data[start], ``available`` bytes of it are there, and
    it will be ``body_length`` long. Returns None when valid, the
    ProtocolError otherwise; raises nothing, so the reader can record the
    error and keep earlier frames.
    """
    if not (ERROR_BODY_MIN_BYTES <= body_length <= ERROR_BODY_MIN_BYTES + ERROR_TEXT_MAX_BYTES):
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR body length {body_length}, expected"
            f" {ERROR_BODY_MIN_BYTES}..{ERROR_BODY_MIN_BYTES + ERROR_TEXT_MAX_BYTES}",
            request_id,
        )
    if available < ERROR_BODY_MIN_BYTES:
        return None  # text_length not here yet; the reader waits for it
    _code, text_length = _ERROR_HEAD.unpack_from(data, _take(data, start, ERROR_BODY_MIN_BYTES))
    if text_length > ERROR_TEXT_MAX_BYTES:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR text length {text_length} above maximum {ERROR_TEXT_MAX_BYTES}",
            request_id,
        )
    if body_length != ERROR_BODY_MIN_BYTES + text_length:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR body length {body_length}, expected {ERROR_BODY_MIN_BYTES} + text length {text_length}",
            request_id,
        )
    return None


def _counted_body_error(
    msg_type: int, data: _Buffer, start: int, available: int, body_length: int, request_id: int
) -> ProtocolError | None:
    """Check a counted body's size (COUNTED_LAYOUTS) against its count field.

    As _error_body_error: the body starts at data[start], ``available``
    bytes of it are there, and it will be ``body_length`` long. The length
    alone must fit some count (judged at once); once the count has arrived,
    the length must be exactly that count's.
    """
    head, count_at, entry, tail, most = COUNTED_LAYOUTS[msg_type]
    fixed = head + tail
    if body_length < fixed or body_length > fixed + most * entry or (body_length - fixed) % entry:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"{_TYPE_NAMES[msg_type]} body length {body_length}, expected {fixed} + {entry} * count (count 0..{most})",
            request_id,
        )
    if available < count_at + _COUNT.size:
        return None  # the count is not here yet; the reader waits for it
    (count,) = _COUNT.unpack_from(data, _take(data, start + count_at, _COUNT.size))
    if body_length != fixed + count * entry:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"{_TYPE_NAMES[msg_type]} body length {body_length}, expected {fixed} + {entry} * count {count}",
            request_id,
        )
    return None


# =============================================================================
# Splitting the stream into frames
# =============================================================================


class FrameReader:
    """Incremental frame splitter for one connection.

    ``feed()`` takes whatever the transport delivered and returns every
    complete, header-valid frame as ``(msg_type, request_id, body)``. Each
    header is checked as soon as its bytes are there: a length prefix out of
    range is refused from its 4 bytes alone, before the body is awaited or
    stored, so a hostile prefix costs nothing. The first violation stops the
    reader: ``error`` holds it, the frames before it are still returned,
    and every later ``feed()`` raises it. The reader holds at most one
    incomplete frame (under ``max_frame_bytes``) between calls.

    A stream's frames after its first AUTH (the terminal's stream) or
    AUTH_OK (the engine's) are sealed: from the frame that follows it on,
    the reader requires the FLAG_SEALED flag and a body followed by the
    SEAL_TRAILER_BYTES of counter and tag, and delivers the body with its
    trailer (``engine/seal.py`` checks and strips it). Before it, the flag
    is refused like any other. ``sealed`` says which rule the next frame
    is held to.

    >>> reader = FrameReader()
    >>> frame = encode_ping(1, 5)
    >>> reader.feed(frame[:3]), reader.buffered()
    ([], 3)
    >>> reader.feed(frame[3:])[0][:2]
    (32, 1)
    """

    __slots__ = ("_error", "_max_frame_bytes", "_max_length", "_pending", "_sealed")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not isinstance(max_frame_bytes, int):
            raise TypeError(f"max_frame_bytes must be int, not {type(max_frame_bytes).__name__}")
        if not FRAME_HEADER_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(
                f"max_frame_bytes {int(max_frame_bytes)} out of range ({FRAME_HEADER_BYTES}..{MAX_FRAME_BYTES})"
            )
        self._max_frame_bytes = int(max_frame_bytes)
        # The largest acceptable length prefix.
        self._max_length = self._max_frame_bytes - LENGTH_PREFIX_BYTES
        self._pending = bytearray()  # the start of an incomplete frame
        self._error: ProtocolError | None = None
        self._sealed = False  # an AUTH or AUTH_OK was delivered

    # Read-only, as in the compiled twin.
    @property
    def error(self) -> ProtocolError | None:
        """The first ProtocolError met, or None while the stream is valid."""
        return self._error

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    @property
    def sealed(self) -> bool:
        """True once an AUTH or AUTH_OK was delivered: later frames are sealed."""
        return self._sealed

    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Append ``data``; return the complete frames it finished."""
        if self._error is not None:
            raise self._error
        chunk = _as_bytes(data, "data")
        frames: list[tuple[int, int, bytes]] = []
        if not self._pending:
            # The common case: the chunk starts at a frame boundary. Split
            # it in place and keep only its incomplete tail.
            consumed = self._split(chunk, frames)
            if self._error is None and consumed < len(chunk):
                self._pending = bytearray(chunk[consumed:])
        else:
            self._pending += chunk
            consumed = self._split(self._pending, frames)
            if consumed:
                # Deleting a bytearray's head is O(1) in CPython.
                del self._pending[:consumed]
        if self._error is not None:
            self._pending = bytearray()  # a dead connection holds nothing
        return frames

    def _split(self, data: _Buffer, frames: list[tuple[int, int, bytes]]) -> int:
        """Append every complete frame of data; return the bytes used."""
        pos = 0
        size = len(data)
        while True:
            total = self._frame_size(data, pos)
            if total < 0 or total > size - pos:
                return pos  # need more bytes, or stopped at a violation
            _length, _version, msg_type, _flags, request_id = _HEADER.unpack_from(data, _take(data, pos, total))
            frames.append((msg_type, request_id, bytes(data[pos + FRAME_HEADER_BYTES : pos + total])))
            pos += total
            if not self._sealed and (msg_type == MSG_AUTH or msg_type == MSG_AUTH_OK):
                self._sealed = True  # the handshake's last frame: seals from here on

    def _frame_size(self, data: _Buffer, pos: int) -> int:
        """Validate the frame starting at pos with what has arrived of it.

        Returns its whole size (length prefix included) once every check
        that its bytes allow has passed, _NEED_MORE when a check still waits
        for bytes, or _VIOLATION after recording self._error.
        """
        available = len(data) - pos
        if available < LENGTH_PREFIX_BYTES:
            return _NEED_MORE
        length: int
        (length,) = _LENGTH.unpack_from(data, _take(data, pos, LENGTH_PREFIX_BYTES))
        # The length is judged alone, before anything else of the frame is
        # awaited: this is what bounds the memory a peer can make us hold.
        if length < MIN_FRAME_LENGTH:
            self._error = ProtocolError(
                ERR_FRAME_TOO_SHORT,
                f"frame length {length} below minimum {MIN_FRAME_LENGTH}",
            )
            return _VIOLATION
        if length > self._max_length:
            self._error = ProtocolError(
                ERR_FRAME_TOO_LARGE,
                f"frame length {length} above maximum {self._max_length}",
            )
            return _VIOLATION
        if available < FRAME_HEADER_BYTES:
            # Wait for the request id, so that the ERROR can carry it.
            return _NEED_MORE
        _length, version, msg_type, flags, request_id = _HEADER.unpack_from(data, _take(data, pos, FRAME_HEADER_BYTES))
        if version != PROTOCOL_VERSION:
            self._error = ProtocolError(
                ERR_UNSUPPORTED_VERSION,
                f"unsupported protocol version {version} (expected {PROTOCOL_VERSION})",
                request_id,
            )
            return _VIOLATION
        expected = _BODY_SIZE[msg_type]
        if expected == _UNKNOWN_TYPE:
            self._error = ProtocolError(ERR_UNKNOWN_TYPE, f"unknown message type 0x{msg_type:02x}", request_id)
            return _VIOLATION
        trailer = 0
        if self._sealed:
            if flags != FLAG_SEALED:
                self._error = ProtocolError(
                    ERR_BAD_FLAGS,
                    f"flags 0x{flags:04x} after the handshake (must be 0x{FLAG_SEALED:04x}, sealed)",
                    request_id,
                )
                return _VIOLATION
            if length - MIN_FRAME_LENGTH < SEAL_TRAILER_BYTES:
                self._error = ProtocolError(
                    ERR_BAD_BODY_LENGTH,
                    f"sealed frame length {length} below minimum {MIN_FRAME_LENGTH + SEAL_TRAILER_BYTES}",
                    request_id,
                )
                return _VIOLATION
            trailer = SEAL_TRAILER_BYTES
        elif flags != 0:
            self._error = ProtocolError(ERR_BAD_FLAGS, f"reserved flags 0x{flags:04x} set (must be 0)", request_id)
            return _VIOLATION
        # The body's own length: a sealed frame's trailer is not part of it.
        body_length = length - MIN_FRAME_LENGTH - trailer
        if expected == _VARIABLE_SIZE:
            self._error = _error_body_error(
                data,
                pos + FRAME_HEADER_BYTES,
                min(available, LENGTH_PREFIX_BYTES + length) - FRAME_HEADER_BYTES,
                body_length,
                request_id,
            )
            if self._error is not None:
                return _VIOLATION
            if available < FRAME_HEADER_BYTES + ERROR_BODY_MIN_BYTES:
                return _NEED_MORE
        elif expected == _COUNTED_SIZE:
            self._error = _counted_body_error(
                msg_type,
                data,
                pos + FRAME_HEADER_BYTES,
                min(available, LENGTH_PREFIX_BYTES + length) - FRAME_HEADER_BYTES,
                body_length,
                request_id,
            )
            if self._error is not None:
                return _VIOLATION
            if available < FRAME_HEADER_BYTES + COUNTED_LAYOUTS[msg_type][1] + _COUNT.size:
                return _NEED_MORE
        elif body_length != expected:
            self._error = _body_length_error(msg_type, body_length, request_id)
            return _VIOLATION
        return LENGTH_PREFIX_BYTES + length


# =============================================================================
# Encoding. Encoders build the whole frame, length prefix included. Their
# arguments come from the engine, not the peer: a bad one is a bug, reported
# as ValueError/TypeError, never as a ProtocolError.
# =============================================================================


def _check_unsigned(name: str, value: object, maximum: int, kind: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < 0 or value > maximum:
        raise ValueError(f"{name} {int(value)} out of range for {kind} (0..{maximum})")


def _check_signed(name: str, value: object, minimum: int, maximum: int, kind: str) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < minimum or value > maximum:
        raise ValueError(f"{name} {int(value)} out of range for {kind} ({minimum}..{maximum})")


def _check_fixed_bytes(name: str, value: object, size: int) -> bytes:
    data = _as_bytes(value, name)
    if len(data) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(data)}")
    return data


def _header(msg_type: int, request_id: object, body_size: int) -> bytes:
    """The 12 header bytes of a frame whose body is body_size bytes."""
    _check_unsigned("request_id", request_id, _U32_MAX, "u32")
    return _HEADER.pack(MIN_FRAME_LENGTH + body_size, PROTOCOL_VERSION, msg_type, 0, request_id)


def encode_hello(request_id: int, terminal_id: int, key_version: int, client_nonce: bytes) -> bytes:
    """HELLO: who the terminal is, and its fresh nonce.

    >>> len(encode_hello(1, 4242, 1, bytes(16)))
    34
    """
    _check_unsigned("terminal_id", terminal_id, _U32_MAX, "u32")
    _check_unsigned("key_version", key_version, _U16_MAX, "u16")
    nonce = _check_fixed_bytes("client_nonce", client_nonce, NONCE_BYTES)
    return _header(MSG_HELLO, request_id, _HELLO.size) + _HELLO.pack(terminal_id, key_version, nonce)


def encode_challenge(request_id: int, server_nonce: bytes) -> bytes:
    """CHALLENGE: the engine's nonce, the other half of the transcript."""
    nonce = _check_fixed_bytes("server_nonce", server_nonce, NONCE_BYTES)
    return _header(MSG_CHALLENGE, request_id, NONCE_BYTES) + nonce


def encode_auth(request_id: int, proof: bytes) -> bytes:
    """AUTH: the terminal's proof that it holds its key."""
    data = _check_fixed_bytes("proof", proof, PROOF_BYTES)
    return _header(MSG_AUTH, request_id, PROOF_BYTES) + data


def encode_auth_ok(request_id: int, engine_proof: bytes, engine_time_ms: int) -> bytes:
    """AUTH_OK: the engine's proof and clock; the session is open."""
    data = _check_fixed_bytes("engine_proof", engine_proof, PROOF_BYTES)
    _check_unsigned("engine_time_ms", engine_time_ms, _U64_MAX, "u64")
    return _header(MSG_AUTH_OK, request_id, _AUTH_OK.size) + _AUTH_OK.pack(data, engine_time_ms)


def encode_tap(
    request_id: int,
    terminal_seq: int,
    card_uid: int,
    card_counter: int,
    event_time_ms: int,
    tap_flags: int,
) -> bytes:
    """TAP: one card presented to a validator.

    >>> decode_tap(encode_tap(1, 1001, 0x04A1B2C3D4E580, 7, 0, 0)[12:])[0]
    1001
    """
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
    _check_unsigned("card_counter", card_counter, _U32_MAX, "u32")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    _check_unsigned("tap_flags", tap_flags, _U8_MAX, "u8")
    return _header(MSG_TAP, request_id, _TAP.size) + _TAP.pack(
        terminal_seq, card_uid, card_counter, event_time_ms, tap_flags
    )


def encode_topup(
    request_id: int,
    terminal_seq: int,
    card_uid: int,
    amount_cents: int,
    event_time_ms: int,
) -> bytes:
    """TOPUP: stored value added at a kiosk."""
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
    _check_unsigned("amount_cents", amount_cents, _U32_MAX, "u32")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    return _header(MSG_TOPUP, request_id, _TOPUP.size) + _TOPUP.pack(
        terminal_seq, card_uid, amount_cents, event_time_ms
    )


def encode_reversal(request_id: int, terminal_seq: int, original_seq: int, event_time_ms: int) -> bytes:
    """REVERSAL: cancel an approved TAP or TOPUP of the same terminal."""
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("original_seq", original_seq, _U64_MAX, "u64")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    return _header(MSG_REVERSAL, request_id, _REVERSAL.size) + _REVERSAL.pack(terminal_seq, original_seq, event_time_ms)


def encode_tap_result(
    request_id: int,
    terminal_seq: int,
    result: int,
    amount_cents: int,
    balance_cents: int,
    info: int = 0,
) -> bytes:
    """TAP_RESULT: the outcome of a TAP, TOPUP or REVERSAL.

    ``info`` holds the engine.codes.TapInfo bits that tell the terminal
    why (a concession not valid, an ID to show, ...); 0 for a reply that
    is not a decision.

    >>> decode_tap_result(encode_tap_result(1, 1001, 0, 150, -35, 0x03)[12:])
    (1001, 0, 150, -35, 3)
    """
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("result", result, _U8_MAX, "u8")
    _check_signed("amount_cents", amount_cents, _I32_MIN, _I32_MAX, "i32")
    _check_signed("balance_cents", balance_cents, _I64_MIN, _I64_MAX, "i64")
    _check_unsigned("info", info, _U16_MAX, "u16")
    return _header(MSG_TAP_RESULT, request_id, _TAP_RESULT.size) + _TAP_RESULT.pack(
        terminal_seq, result, amount_cents, balance_cents, info
    )


def _encode_ping_like(msg_type: int, request_id: int, payload: int) -> bytes:
    _check_unsigned("payload", payload, _U64_MAX, "u64")
    return _header(msg_type, request_id, _PING.size) + _PING.pack(payload)


def encode_ping(request_id: int, payload: int) -> bytes:
    """PING: keep-alive; the peer echoes request_id and payload in a PONG."""
    return _encode_ping_like(MSG_PING, request_id, payload)


def encode_pong(request_id: int, payload: int) -> bytes:
    """PONG: the echo of a PING."""
    return _encode_ping_like(MSG_PONG, request_id, payload)


def encode_error(request_id: int, code: int, text: str) -> bytes:
    """ERROR: a protocol fault; the sender closes the connection after it.

    ``text`` is cut to ERROR_TEXT_MAX_BYTES of UTF-8 at a character
    boundary, so that a long hint never makes the frame invalid.

    >>> decode_error(encode_error(0, 1, "é" * 150)[12:])[1] == "é" * 100
    True
    """
    _check_unsigned("code", code, _U8_MAX, "u8")
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    # "replace": a lone surrogate in a hint must not stop the ERROR.
    encoded = text.encode("utf-8", "replace")
    if len(encoded) > ERROR_TEXT_MAX_BYTES:
        cut = ERROR_TEXT_MAX_BYTES
        # Back up over continuation bytes (10xxxxxx) so that the character
        # the cut falls into is dropped whole.
        while cut > 0 and (encoded[cut] & 0xC0) == 0x80:
            cut -= 1
        encoded = encoded[:cut]
    body_size = ERROR_BODY_MIN_BYTES + len(encoded)
    return _header(MSG_ERROR, request_id, body_size) + _ERROR_HEAD.pack(code, len(encoded)) + encoded


# --- Lists for offline terminals, and offline taps ----------------------------


def _entries(name: str, value: object, fields: int, most: int) -> list[Any] | tuple[Any, ...]:
    """A list of entries, each a tuple of ``fields`` values, at most ``most``."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list, not {type(value).__name__}")
    if len(value) > most:
        raise ValueError(f"{name} has {len(value)} entries, at most {most}")
    for index, entry in enumerate(value):
        if not isinstance(entry, (tuple, list)):
            raise TypeError(f"{name}[{index}] must be a tuple, not {type(entry).__name__}")
        if len(entry) != fields:
            raise ValueError(f"{name}[{index}] must have {fields} fields, got {len(entry)}")
    return value


def encode_hotlist_request(request_id: int, since_version: int, after_uid: int) -> bytes:
    """HOTLIST_REQUEST: the hot list's changes since ``since_version`` (0: the
    whole list), continuing a whole list above ``after_uid``.

    >>> decode_hotlist_request(encode_hotlist_request(1, 41, 0)[12:])
    (41, 0)
    """
    _check_unsigned("since_version", since_version, _U64_MAX, "u64")
    _check_unsigned("after_uid", after_uid, _U64_MAX, "u64")
    return _header(MSG_HOTLIST_REQUEST, request_id, _HOTLIST_REQUEST.size) + _HOTLIST_REQUEST.pack(
        since_version, after_uid
    )


def encode_hotlist(
    request_id: int,
    flags: int,
    since_version: int,
    version: int,
    after_uid: int,
    entries: list[tuple[int, int]],
    signature: bytes,
) -> bytes:
    """HOTLIST: one signed page of the hot list, ``entries`` as (card_uid,
    reason) pairs (reason 0: the card left the list).

    >>> len(encode_hotlist(1, 0, 4, 5, 0, [(0x04A1, 1)], bytes(64)))
    112
    """
    _check_unsigned("flags", flags, _U8_MAX, "u8")
    _check_unsigned("since_version", since_version, _U64_MAX, "u64")
    _check_unsigned("version", version, _U64_MAX, "u64")
    _check_unsigned("after_uid", after_uid, _U64_MAX, "u64")
    _entries("entries", entries, 2, HOTLIST_PAGE_ENTRIES_MAX)
    signed = _check_fixed_bytes("signature", signature, SIGNATURE_BYTES)
    parts = [_HOTLIST_HEAD.pack(flags, since_version, version, after_uid, len(entries))]
    for card_uid, reason in entries:
        _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
        _check_unsigned("reason", reason, _U8_MAX, "u8")
        parts.append(_HOTLIST_ENTRY.pack(card_uid, reason))
    parts.append(signed)
    body = b"".join(parts)
    return _header(MSG_HOTLIST, request_id, len(body)) + body


def encode_rules_request(request_id: int, rules_version: int) -> bytes:
    """RULES_REQUEST: the rules of the terminal's service, version
    ``rules_version`` (0: the version in force)."""
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    return _header(MSG_RULES_REQUEST, request_id, _RULES_REQUEST.size) + _RULES_REQUEST.pack(rules_version)


def encode_rules(
    request_id: int,
    rules_version: int,
    service_id: int,
    service_kind: int,
    min_balance_to_enter_cents: int,
    tolerated_negative_cents: int,
    passback_window_s: int,
    max_charge_cents: int,
    transfer_window_minutes: int,
    transfer_percent_off: int,
    cap_daily_cents: int,
    cap_monthly_cents: int,
    fares: list[tuple[int, int]],
    signature: bytes,
) -> bytes:
    """RULES: what a terminal needs of one rules version to decide taps at
    its service offline, ``fares`` as (profile_id, fare_cents) pairs, signed."""
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    _check_unsigned("service_id", service_id, _U16_MAX, "u16")
    _check_unsigned("service_kind", service_kind, _U8_MAX, "u8")
    _check_unsigned("min_balance_to_enter_cents", min_balance_to_enter_cents, _U32_MAX, "u32")
    _check_unsigned("tolerated_negative_cents", tolerated_negative_cents, _U32_MAX, "u32")
    _check_unsigned("passback_window_s", passback_window_s, _U32_MAX, "u32")
    _check_unsigned("max_charge_cents", max_charge_cents, _U32_MAX, "u32")
    _check_unsigned("transfer_window_minutes", transfer_window_minutes, _U16_MAX, "u16")
    _check_unsigned("transfer_percent_off", transfer_percent_off, _U8_MAX, "u8")
    _check_signed("cap_daily_cents", cap_daily_cents, _I32_MIN, _I32_MAX, "i32")
    _check_signed("cap_monthly_cents", cap_monthly_cents, _I32_MIN, _I32_MAX, "i32")
    _entries("fares", fares, 2, RULES_FARES_MAX)
    signed = _check_fixed_bytes("signature", signature, SIGNATURE_BYTES)
    parts = [
        _RULES_HEAD.pack(
            rules_version,
            service_id,
            service_kind,
            min_balance_to_enter_cents,
            tolerated_negative_cents,
            passback_window_s,
            max_charge_cents,
            transfer_window_minutes,
            transfer_percent_off,
            cap_daily_cents,
            cap_monthly_cents,
            len(fares),
        )
    ]
    for profile_id, fare_cents in fares:
        _check_unsigned("profile_id", profile_id, _U8_MAX, "u8")
        _check_unsigned("fare_cents", fare_cents, _U32_MAX, "u32")
        parts.append(_RULES_FARE.pack(profile_id, fare_cents))
    parts.append(signed)
    body = b"".join(parts)
    return _header(MSG_RULES, request_id, len(body)) + body


def encode_notice(request_id: int, hotlist_version: int, rules_version: int) -> bytes:
    """NOTICE: the engine's hot list and rules versions now (sent unasked)."""
    _check_unsigned("hotlist_version", hotlist_version, _U64_MAX, "u64")
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    return _header(MSG_NOTICE, request_id, _NOTICE.size) + _NOTICE.pack(hotlist_version, rules_version)


def encode_offline_upload(request_id: int, taps: list[tuple[int, int, int, int, int, int, int, int]]) -> bytes:
    """OFFLINE_UPLOAD: taps a terminal decided while offline, each
    (terminal_seq, card_uid, card_counter, event_time_ms, tap_flags,
    rules_version, result, amount_cents).

    >>> len(encode_offline_upload(1, [(7, 0x04A1, 3, 1767225601234, 0, 2, 0, 150)]))
    52
    """
    _entries("taps", taps, 8, OFFLINE_TAPS_PER_UPLOAD_MAX)
    parts = [_COUNT.pack(len(taps))]
    for seq, uid, counter, event_time_ms, tap_flags, rules_version, result, amount_cents in taps:
        _check_unsigned("terminal_seq", seq, _U64_MAX, "u64")
        _check_unsigned("card_uid", uid, _U64_MAX, "u64")
        _check_unsigned("card_counter", counter, _U32_MAX, "u32")
        _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
        _check_unsigned("tap_flags", tap_flags, _U8_MAX, "u8")
        _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
        _check_unsigned("result", result, _U8_MAX, "u8")
        _check_unsigned("amount_cents", amount_cents, _U32_MAX, "u32")
        parts.append(
            _OFFLINE_TAP.pack(seq, uid, counter, event_time_ms, tap_flags, rules_version, result, amount_cents)
        )
    body = b"".join(parts)
    return _header(MSG_OFFLINE_UPLOAD, request_id, len(body)) + body


def encode_offline_result(request_id: int, results: list[tuple[int, int, int, int, int]]) -> bytes:
    """OFFLINE_RESULT: the answer to an OFFLINE_UPLOAD, one (terminal_seq,
    result, amount_cents, balance_cents, info) per tap, in upload order."""
    _entries("results", results, 5, OFFLINE_TAPS_PER_UPLOAD_MAX)
    parts = [_COUNT.pack(len(results))]
    for seq, result, amount_cents, balance_cents, info in results:
        _check_unsigned("terminal_seq", seq, _U64_MAX, "u64")
        _check_unsigned("result", result, _U8_MAX, "u8")
        _check_signed("amount_cents", amount_cents, _I32_MIN, _I32_MAX, "i32")
        _check_signed("balance_cents", balance_cents, _I64_MIN, _I64_MAX, "i64")
        _check_unsigned("info", info, _U16_MAX, "u16")
        parts.append(_TAP_RESULT.pack(seq, result, amount_cents, balance_cents, info))
    body = b"".join(parts)
    return _header(MSG_OFFLINE_RESULT, request_id, len(body)) + body


# =============================================================================
# Decoding. Decoders take a body as FrameReader returns it. The reader has
# already checked its length, but a decoder handed a body directly checks
# again: a wrong length is the peer's fault, hence a ProtocolError.
# =============================================================================


def _fixed_body(msg_type: int, body: object) -> bytes:
    data = _as_bytes(body, "body")
    expected = _BODY_SIZE[msg_type]
    if len(data) != expected:
        raise _body_length_error(msg_type, len(data), 0)
    _take(data, 0, expected)
    return data


def decode_hello(body: bytes) -> tuple[int, int, bytes]:
    """HELLO body -> (terminal_id, key_version, client_nonce)."""
    terminal_id, key_version, nonce = _HELLO.unpack(_fixed_body(MSG_HELLO, body))
    return (terminal_id, key_version, nonce)


def decode_challenge(body: bytes) -> bytes:
    """CHALLENGE body -> server_nonce."""
    return _fixed_body(MSG_CHALLENGE, body)


def decode_auth(body: bytes) -> bytes:
    """AUTH body -> proof."""
    return _fixed_body(MSG_AUTH, body)


def decode_auth_ok(body: bytes) -> tuple[bytes, int]:
    """AUTH_OK body -> (engine_proof, engine_time_ms)."""
    proof, engine_time_ms = _AUTH_OK.unpack(_fixed_body(MSG_AUTH_OK, body))
    return (proof, engine_time_ms)


def decode_tap(body: bytes) -> tuple[int, int, int, int, int]:
    """TAP body -> (terminal_seq, card_uid, card_counter, event_time_ms,
    tap_flags)."""
    seq, uid, counter, event_time_ms, tap_flags = _TAP.unpack(_fixed_body(MSG_TAP, body))
    return (seq, uid, counter, event_time_ms, tap_flags)


def decode_topup(body: bytes) -> tuple[int, int, int, int]:
    """TOPUP body -> (terminal_seq, card_uid, amount_cents, event_time_ms)."""
    seq, uid, amount_cents, event_time_ms = _TOPUP.unpack(_fixed_body(MSG_TOPUP, body))
    return (seq, uid, amount_cents, event_time_ms)


def decode_reversal(body: bytes) -> tuple[int, int, int]:
    """REVERSAL body -> (terminal_seq, original_seq, event_time_ms)."""
    seq, original_seq, event_time_ms = _REVERSAL.unpack(_fixed_body(MSG_REVERSAL, body))
    return (seq, original_seq, event_time_ms)


def decode_tap_result(body: bytes) -> tuple[int, int, int, int, int]:
    """TAP_RESULT body -> (terminal_seq, result, amount_cents, balance_cents,
    info)."""
    seq, result, amount_cents, balance_cents, info = _TAP_RESULT.unpack(_fixed_body(MSG_TAP_RESULT, body))
    return (seq, result, amount_cents, balance_cents, info)


def decode_ping(body: bytes) -> int:
    """PING body -> payload."""
    payload: int = _PING.unpack(_fixed_body(MSG_PING, body))[0]
    return payload


def decode_pong(body: bytes) -> int:
    """PONG body -> payload."""
    payload: int = _PING.unpack(_fixed_body(MSG_PONG, body))[0]
    return payload


def decode_error(body: bytes) -> tuple[int, str]:
    """ERROR body -> (code, text). Invalid UTF-8 is replaced, never raised:
    the text is only a hint, and a bad one must not hide the code."""
    data = _as_bytes(body, "body")
    error = _error_body_error(data, 0, len(data), len(data), 0)
    if error is not None:
        raise error
    _take(data, 0, len(data))
    return (data[0], data[ERROR_BODY_MIN_BYTES:].decode("utf-8", "replace"))


def _counted_body(msg_type: int, body: object) -> tuple[bytes, int]:
    """A counted body (COUNTED_LAYOUTS) checked whole -> (data, count)."""
    data = _as_bytes(body, "body")
    error = _counted_body_error(msg_type, data, 0, len(data), len(data), 0)
    if error is not None:
        raise error
    head, count_at, entry, tail, _most = COUNTED_LAYOUTS[msg_type]
    (count,) = _COUNT.unpack_from(data, _take(data, count_at, _COUNT.size))
    _take(data, 0, head + count * entry + tail)
    return data, count


def decode_hotlist_request(body: bytes) -> tuple[int, int]:
    """HOTLIST_REQUEST body -> (since_version, after_uid)."""
    since_version, after_uid = _HOTLIST_REQUEST.unpack(_fixed_body(MSG_HOTLIST_REQUEST, body))
    return (since_version, after_uid)


def decode_hotlist(body: bytes) -> tuple[int, int, int, int, list[tuple[int, int]], bytes]:
    """HOTLIST body -> (flags, since_version, version, after_uid, entries,
    signature); the signature covers ``body[:-SIGNATURE_BYTES]``."""
    data, count = _counted_body(MSG_HOTLIST, body)
    flags, since_version, version, after_uid, _count = _HOTLIST_HEAD.unpack_from(data, 0)
    start = _HOTLIST_HEAD.size
    entries = [_HOTLIST_ENTRY.unpack_from(data, start + index * _HOTLIST_ENTRY.size) for index in range(count)]
    return (flags, since_version, version, after_uid, entries, data[len(data) - SIGNATURE_BYTES :])


def decode_rules_request(body: bytes) -> int:
    """RULES_REQUEST body -> rules_version."""
    rules_version: int = _RULES_REQUEST.unpack(_fixed_body(MSG_RULES_REQUEST, body))[0]
    return rules_version


def decode_rules(
    body: bytes,
) -> tuple[int, int, int, int, int, int, int, int, int, int, int, list[tuple[int, int]], bytes]:
    """RULES body -> (rules_version, service_id, service_kind,
    min_balance_to_enter_cents, tolerated_negative_cents, passback_window_s,
    max_charge_cents, transfer_window_minutes, transfer_percent_off,
    cap_daily_cents, cap_monthly_cents, fares, signature); the signature
    covers ``body[:-SIGNATURE_BYTES]``."""
    data, count = _counted_body(MSG_RULES, body)
    head = _RULES_HEAD.unpack_from(data, 0)
    start = _RULES_HEAD.size
    fares = [_RULES_FARE.unpack_from(data, start + index * _RULES_FARE.size) for index in range(count)]
    return (*head[:-1], fares, data[len(data) - SIGNATURE_BYTES :])


def decode_notice(body: bytes) -> tuple[int, int]:
    """NOTICE body -> (hotlist_version, rules_version)."""
    hotlist_version, rules_version = _NOTICE.unpack(_fixed_body(MSG_NOTICE, body))
    return (hotlist_version, rules_version)


def decode_offline_upload(body: bytes) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """OFFLINE_UPLOAD body -> taps, each (terminal_seq, card_uid,
    card_counter, event_time_ms, tap_flags, rules_version, result,
    amount_cents)."""
    data, count = _counted_body(MSG_OFFLINE_UPLOAD, body)
    size = _OFFLINE_TAP.size
    return [_OFFLINE_TAP.unpack_from(data, _COUNT.size + index * size) for index in range(count)]


def decode_offline_result(body: bytes) -> list[tuple[int, int, int, int, int]]:
    """OFFLINE_RESULT body -> results, each (terminal_seq, result,
    amount_cents, balance_cents, info)."""
    data, count = _counted_body(MSG_OFFLINE_RESULT, body)
    size = _TAP_RESULT.size
    return [_TAP_RESULT.unpack_from(data, _COUNT.size + index * size) for index in range(count)]


# =============================================================================
# Handshake proofs (docs/protocol.md, AUTH)
# =============================================================================


def _transcript(terminal_id: int, key_version: int, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """terminal_id u32 || key_version u16 || client_nonce || server_nonce."""
    _check_unsigned("terminal_id", terminal_id, _U32_MAX, "u32")
    _check_unsigned("key_version", key_version, _U16_MAX, "u16")
    client = _check_fixed_bytes("client_nonce", client_nonce, NONCE_BYTES)
    server = _check_fixed_bytes("server_nonce", server_nonce, NONCE_BYTES)
    return _TRANSCRIPT_HEAD.pack(terminal_id, key_version) + client + server


def _proof(
    label: bytes,
    key: bytes,
    terminal_id: int,
    key_version: int,
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    secret = _check_fixed_bytes("key", key, TERMINAL_KEY_BYTES)
    transcript = _transcript(terminal_id, key_version, client_nonce, server_nonce)
    return _hmac.digest(secret, label + transcript, "sha256")


def terminal_proof(
    key: bytes,
    terminal_id: int,
    key_version: int,
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    """HMAC-SHA256(key, "citycard/v1/terminal-proof" || transcript): what the
    terminal sends in AUTH. Compare with hmac.compare_digest, never ==."""
    return _proof(TERMINAL_PROOF_LABEL, key, terminal_id, key_version, client_nonce, server_nonce)


def engine_proof(
    key: bytes,
    terminal_id: int,
    key_version: int,
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    """HMAC-SHA256(key, "citycard/v1/engine-proof" || transcript): what the
    engine sends in AUTH_OK to prove it knows the terminal's key too."""
    return _proof(ENGINE_PROOF_LABEL, key, terminal_id, key_version, client_nonce, server_nonce)


# =============================================================================
# Sealed frames (docs/protocol.md, "Sealed frames"): the tag of each frame
# after the handshake, HMAC-SHA256 under a session key truncated to
# SEAL_TAG_BYTES. engine/seal.py holds the session keys and counters.
# =============================================================================

_SHA256_BLOCK = 64
_SESSION_KEY_BYTES = 32
_SEALED_HEAD = struct.Struct(">BBHI")  # version, type, flags, request_id: the signed header
_SEAL_COUNTER = struct.Struct(">Q")
_SEALED_FLAGS = FLAG_SEALED.to_bytes(2, "big")


class SealKey:
    """One session key of one direction: seals frames, or opens them.

    HMAC-SHA256 (RFC 2104) with the key's padded blocks hashed once here,
    truncated to SEAL_TAG_BYTES. The counter is the caller's to keep
    (``engine/seal.py``): ``seal()`` writes the one given, ``open()``
    requires the one expected.

    >>> key = SealKey(bytes(32))
    >>> sealed = key.seal(encode_ping(1, 42), 0)
    >>> decode_ping(key.open(MSG_PING, 1, sealed[FRAME_HEADER_BYTES:], 0))
    42
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        secret = _check_fixed_bytes("key", key, _SESSION_KEY_BYTES).ljust(_SHA256_BLOCK, b"\x00")
        self._inner = _hashlib.sha256(bytes(byte ^ 0x36 for byte in secret))
        self._outer = _hashlib.sha256(bytes(byte ^ 0x5C for byte in secret))

    def _tag(self, head: bytes | memoryview, rest: bytes | memoryview) -> bytes:
        inner = self._inner.copy()
        inner.update(head)
        inner.update(rest)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:SEAL_TAG_BYTES]

    def seal(self, frame: bytes, counter: int) -> bytes:
        """A whole frame as the encoders make it (flags 0), sealed with ``counter``."""
        data = _as_bytes(frame, "frame")
        _check_unsigned("counter", counter, _U64_MAX, "u64")
        size = len(data)
        if size < FRAME_HEADER_BYTES or _LENGTH.unpack_from(data)[0] != size - LENGTH_PREFIX_BYTES:
            raise ValueError(f"frame must be a whole frame, got {size} bytes")
        if data[6] or data[7]:
            raise ValueError("seal() takes a frame with flags 0")
        signed = data[LENGTH_PREFIX_BYTES:6] + _SEALED_FLAGS + data[8:] + _SEAL_COUNTER.pack(counter)
        inner = self._inner.copy()
        inner.update(signed)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _LENGTH.pack(len(signed) + SEAL_TAG_BYTES) + signed + outer.digest()[:SEAL_TAG_BYTES]

    def open(self, msg_type: int, request_id: int, body: bytes, counter: int) -> bytes:
        """A sealed frame's body as FrameReader delivers it (trailer included)
        -> the body alone, once its tag verifies and its counter is ``counter``.

        Raises ProtocolError: BAD_TAG when the tag does not verify (checked
        first, in constant time), BAD_COUNTER when the counter differs.
        """
        _check_unsigned("msg_type", msg_type, _U8_MAX, "u8")
        _check_unsigned("request_id", request_id, _U32_MAX, "u32")
        _check_unsigned("counter", counter, _U64_MAX, "u64")
        data = _as_bytes(body, "body")
        size = len(data) - SEAL_TRAILER_BYTES
        if size < 0:
            raise ProtocolError(
                ERR_BAD_BODY_LENGTH, f"sealed body of {len(data)} bytes is shorter than its seal", request_id
            )
        signed_end = size + SEAL_COUNTER_BYTES
        view = memoryview(data)
        tag = self._tag(
            _SEALED_HEAD.pack(PROTOCOL_VERSION, msg_type, FLAG_SEALED, request_id),
            view[_take(data, 0, signed_end) : signed_end],
        )
        if not _hmac.compare_digest(tag, view[signed_end:]):
            raise ProtocolError(
                ERR_BAD_TAG, f"the tag of a sealed frame of type 0x{msg_type:02x} does not verify", request_id
            )
        (received,) = _SEAL_COUNTER.unpack_from(data, size)
        if received != counter:
            raise ProtocolError(
                ERR_BAD_COUNTER,
                f"frame counter {received}, expected {counter} (replayed, reordered or lost frame)",
                request_id,
            )
        return data[:size]


# =============================================================================
# Per-tap decision fast path
#
# The Decision record and the decision ladder (engine/decision.py and
# engine/ladder.py re-export them). The codec above stays self-contained:
# nothing above this line depends on what is below it.
#
# A Decision is made synchronously by the decision ladder, travels through
# the batch writer, and is answered to every waiting terminal once its batch
# is durable (or undone when the batch fails). Every decision that moves
# money is one transfer of ``amount`` cents from a ``source`` account to a
# ``target`` account; the card's side of it is held as pending until the
# commit:
#
# - a fare:            card    -> revenue   (card's pending debit)
# - a top-up:          funding -> card      (card's pending credit)
# - a fare refunded:   revenue -> card      (card's pending credit)
# - a top-up reversed: card    -> funding   (card's pending debit)
#
# The ladder functions take the city (``engine.state.CityState``) and a
# terminal (``engine.state.Terminal``) duck-typed: this module imports
# nothing from the engine. Columns and positions are checked exactly as the
# compiled twin checks them (which must, to stay memory-safe): a column of
# the wrong type raises TypeError, a position outside its columns raises
# IndexError, with the same text. Python's negative indexes are refused too.
# =============================================================================

# Card status a tap can pass (engine.codes.CardStatus.ACTIVE).
CARD_STATUS_ACTIVE = 0
# A tariff of -1: this profile is not served here (engine.state.NO_FARE).
NO_FARE = -1
# Largest top-up in cents, as in engine/limits.py.
TOPUP_MAX_CENTS = 50000
# Ledger transfer kinds (schema: ledger_transfers.kind).
LEDGER_FARE = 0
LEDGER_TOPUP = 1
LEDGER_REVERSAL = 2
LEDGER_OPENING = 3
# The account of a decision that moves no money.
NO_ACCOUNT = -1
# TAP flag bits (docs/protocol.md): bit 0 marks an exit tap; the rest are
# reserved.
TAP_FLAG_EXIT = 0x01
TAP_FLAGS_KNOWN = TAP_FLAG_EXIT
# The request a tap record answers (engine.codes.OperationKind).
OPERATION_TAP = 0
OPERATION_TOPUP = 1
OPERATION_REVERSAL = 2
# The profile whose fare applies when a concession is not valid
# (engine.state.STANDARD_PROFILE), and "no fare decided yet".
STANDARD_PROFILE = 0
NO_PROFILE = -1
# Decision.info bits (engine.codes.TapInfo).
INFO_CONCESSION_NOT_VALID = 0x01
INFO_RENEWAL_DUE = 0x02
# Eligibility is kept in days since 1970-01-01.
MS_PER_DAY = 86400000
# More Decision.info bits (engine.codes.TapInfo).
INFO_SHOW_ID = 0x04
INFO_TRANSFER = 0x08
INFO_CAPPED = 0x10
INFO_PASS_USED = 0x20
INFO_SHARING_SUSPECTED = 0x40
INFO_REFUNDED = 0x80
# A tap its terminal decided offline and uploaded later; and one the
# engine's own ladder would have decided otherwise (engine.codes.TapInfo).
INFO_OFFLINE = 0x100
INFO_OFFLINE_DIFFERS = 0x200
# Decision.online_result of a tap decided online: there is no second opinion.
NO_RESULT = -1
# A service charged by the hour (engine.codes.ServiceKind.PER_DURATION).
SERVICE_PER_DURATION = 1
MS_PER_HOUR = 3600000
# Card status a suspected clone is given when the rules say so
# (engine.codes.CardStatus.BLOCKED).
CARD_STATUS_BLOCKED = 1
# A service's policy row (engine.policy builds them from the rules):
POLICY_KIND = 0  # engine.codes.ServiceKind
POLICY_MIN_BALANCE = 1  # cents needed to enter
POLICY_TOLERATED_NEGATIVE = 2  # cents a tap may take the balance below zero
POLICY_PASSBACK_MS = 3  # same card, same service again within this: declined (0: off)
POLICY_TRANSFER = 4  # 1: a change within the transfer window is discounted here
POLICY_CAP_GROUP = 5  # index of the service's cap group, -1: not capped
POLICY_MAX_CHARGE = 6  # per-duration services: charged when the exit is missing
POLICY_GROUP = 7  # the service group passes and tickets name (NO_GROUP: none sold)
POLICY_FIELDS = 8
# The city-wide rule settings, one int64 each in ``state.settings`` (read
# once per tap instead of an attribute each):
SETTING_TRANSFER_WINDOW_MS = 0
SETTING_TRANSFER_PERCENT_OFF = 1
SETTING_SHOW_ID_PERMILLE = 2
SETTING_CLONE_BLOCKS_CARD = 3  # 1: a suspected clone is blocked
SETTING_SHARING_MAX_SPEED_KMH = 4  # 0: the sharing check is off
SETTING_SHARING_MIN_DISTANCE_M = 5
SETTING_RENEWAL_WINDOW_DAYS = 6
SETTINGS_FIELDS = 7
# Cap groups a rules version may define: the card keeps a day and a month
# total per group.
CAP_GROUPS_MAX = 8
NO_CAP = -1
# A card counter of 0 means "this card does not count" (older cards and
# terminals that cannot read the counter): no clone check.
NO_COUNTER = 0
# Products (schema: card_products.kind), and "no product".
PRODUCT_SEASON = 0
PRODUCT_MULTI_RIDE = 1
NO_PRODUCT = -1
NO_GROUP = -1
# Decision.cap_given_back bits.
CAP_DAY_TOTAL = 1
CAP_MONTH_TOTAL = 2

# Names for repr only.
_OPERATION_NAMES = {
    OPERATION_TAP: "TAP",
    OPERATION_TOPUP: "TOPUP",
    OPERATION_REVERSAL: "REVERSAL",
}

_Fingerprint = tuple[int, int, int, int, int, int, int | None, int]


class Decision:
    """One decided TAP, TOPUP or REVERSAL, pending until its batch commits.

    Numbers are signed 64-bit (the record stores bigints); ``original_seq``
    is None but for a REVERSAL, and ``waiters`` holds the
    ``(reply target, request_id)`` pairs waiting for the reply.

    >>> d = Decision(7, 1001, OPERATION_TAP, 0x04A1, 3, 0, 0, None, 0, 0, 1)
    >>> d.result, d.card_account, d.waiters
    (0, -1, [])
    """

    __slots__ = (
        "amount",
        "balance",
        "cap_given_back",
        "cap_group",
        "card_account",
        "card_counter",
        "card_uid",
        "event_time_ms",
        "fare_profile",
        "info",
        "kind",
        "ledger_kind",
        "online_result",
        "original_seq",
        "original_terminal",
        "previous_counter",
        "product_id",
        "product_rides",
        "recorded_ms",
        "requested",
        "result",
        "rules_version",
        "service_id",
        "source",
        "stay_charged",
        "stay_ms",
        "tap_flags",
        "target",
        "terminal_id",
        "terminal_seq",
        "waiters",
    )

    def __init__(
        self,
        terminal_id: int,
        terminal_seq: int,
        kind: int,
        card_uid: int,
        card_counter: int,
        tap_flags: int,
        requested: int,
        original_seq: int | None,
        event_time_ms: int,
        recorded_ms: int,
        service_id: int,
    ) -> None:
        self.terminal_id = terminal_id
        self.terminal_seq = terminal_seq
        self.kind = kind
        self.card_uid = card_uid
        self.card_counter = card_counter
        self.tap_flags = tap_flags
        self.requested = requested
        self.original_seq = original_seq
        self.event_time_ms = event_time_ms
        self.recorded_ms = recorded_ms
        self.service_id = service_id
        self.result = 0
        self.amount = 0
        self.balance = 0
        self.card_account = NO_ACCOUNT
        self.source = NO_ACCOUNT
        self.target = NO_ACCOUNT
        self.ledger_kind = LEDGER_FARE
        self.info = 0
        self.fare_profile = NO_PROFILE
        self.rules_version = 0
        # What the batch writer needs to undo the rules' memory of this tap
        # if its batch fails (Processor.batch_done).
        self.previous_counter = NO_COUNTER
        self.cap_group = NO_CAP
        # The stay an exit tap closed (its entry time and charge), -1: none.
        self.stay_ms = -1
        self.stay_charged = 0
        # The pass or ticket that paid (or whose ride a reversal gave back),
        # and the rides it used: +1, -1 given back, 0 a season pass.
        self.product_id = NO_PRODUCT
        self.product_rides = 0
        # A REVERSAL's original is a request of this terminal unless the
        # card office names another one's.
        self.original_terminal = terminal_id
        # A reversal's fare taken off the cap totals: CAP_DAY_TOTAL | CAP_MONTH_TOTAL.
        self.cap_given_back = 0
        # A tap decided offline by its terminal: what the engine's own
        # ladder decided of it at upload (NO_RESULT: decided online).
        self.online_result = NO_RESULT
        # (engine.decision.ReplyTarget, request_id) pairs.
        self.waiters: list[tuple[Any, int]] = []

    def fingerprint(self) -> _Fingerprint:
        """The request's content: a retry must match it exactly.

        A REVERSAL carries no card on the wire (its record names the card of
        the original), so its card does not take part. A TAP's ``requested``
        is what its terminal charged when it decided offline: the terminal's
        decision, not part of the tap, so a tap recorded online and the
        same tap uploaded from offline are one request.
        """
        return (
            self.kind,
            0 if self.kind == OPERATION_REVERSAL else self.card_uid,
            self.card_counter,
            self.tap_flags,
            0 if self.kind == OPERATION_TAP else self.requested,
            self.event_time_ms,
            self.original_seq,
            self.original_terminal if self.kind == OPERATION_REVERSAL else -1,
        )

    @property
    def moves_money(self) -> bool:
        return self.amount > 0

    def __repr__(self) -> str:
        return (
            f"Decision({_OPERATION_NAMES.get(self.kind, self.kind)}"
            f" terminal={self.terminal_id} seq={self.terminal_seq}"
            f" result={self.result} amount={self.amount})"
        )


def request_fingerprint(
    kind: int,
    card_uid: int,
    card_counter: int,
    tap_flags: int,
    requested: int,
    event_time_ms: int,
    original_seq: int | None,
    original_terminal: int = -1,
) -> _Fingerprint:
    """Same layout as Decision.fingerprint, for an incoming request
    (``original_terminal``: a REVERSAL's, -1 for other requests).

    >>> request_fingerprint(0, 0x04A1, 3, 0, 0, 0, None)
    (0, 1185, 3, 0, 0, 0, None, -1)
    """
    return (kind, card_uid, card_counter, tap_flags, requested, event_time_ms, original_seq, original_terminal)


class Original:
    """The approved request a REVERSAL names, as read from the record."""

    __slots__ = (
        "account_id",
        "amount",
        "card_uid",
        "info",
        "kind",
        "product_id",
        "recorded_ms",
        "service_id",
        "tap_flags",
    )

    def __init__(
        self,
        kind: int,
        card_uid: int,
        amount: int,
        account_id: int,
        recorded_ms: int,
        service_id: int,
        tap_flags: int = 0,
        info: int = 0,
        product_id: int = NO_PRODUCT,
    ) -> None:
        self.kind = kind
        self.card_uid = card_uid
        self.amount = amount
        self.account_id = account_id
        self.recorded_ms = recorded_ms
        self.service_id = service_id
        self.tap_flags = tap_flags
        self.info = info
        self.product_id = product_id


class Product:
    """A season pass or multi-ride ticket an account holds (``state.products``,
    account position -> list of Product; schema: card_products).

    >>> p = Product(12, PRODUCT_MULTI_RIDE, 3, 0, 0, 10, 4)
    >>> p.rides - p.rides_used
    6
    """

    __slots__ = ("first_day", "group", "id", "kind", "last_day", "rides", "rides_used")

    def __init__(
        self, id: int, kind: int, group: int, first_day: int, last_day: int, rides: int, rides_used: int
    ) -> None:
        self.id = id
        self.kind = kind
        self.group = group
        # Season passes: valid on days [first_day, last_day] since 1970-01-01.
        self.first_day = first_day
        self.last_day = last_day
        # Multi-ride tickets: rides bought, rides used.
        self.rides = rides
        self.rides_used = rides_used

    def __repr__(self) -> str:
        kind = "season" if self.kind == PRODUCT_SEASON else "multi_ride"
        return f"Product({self.id} {kind} group={self.group})"


def _season_pass(held: list[Product], group: int, day: int) -> Product | None:
    """The valid season pass for ``group`` that ends first, or None."""
    best: Product | None = None
    for product in held:
        if (
            product.kind == PRODUCT_SEASON
            and product.group == group
            and product.first_day <= day <= product.last_day
            and (best is None or product.last_day < best.last_day)
        ):
            best = product
    return best


def _ride_ticket(held: list[Product], group: int) -> Product | None:
    """The oldest multi-ride ticket for ``group`` with rides left, or None."""
    best: Product | None = None
    for product in held:
        if (
            product.kind == PRODUCT_MULTI_RIDE
            and product.group == group
            and product.rides_used < product.rides
            and (best is None or product.id < best.id)
        ):
            best = product
    return best


# A coordinate of a terminal that is not located (NaN never compares equal,
# not even to itself).
_NOT_LOCATED = float("nan")


class Activity:
    """What the rules remember of one card between taps (kept for the cards
    that tapped: ``state.activity``, card position -> Activity).

    >>> a = Activity()
    >>> a.counter, a.last_terminal, len(a.cap_spent)
    (0, -1, 16)
    """

    __slots__ = (
        "cap_day",
        "cap_month",
        "cap_spent",
        "counter",
        "last_latitude",
        "last_longitude",
        "last_ms",
        "last_service",
        "last_terminal",
        "stay_charged",
        "stay_ms",
        "stay_service",
        "transfer_ms",
    )

    def __init__(self) -> None:
        self.counter = NO_COUNTER  # the highest card counter seen
        self.last_ms = -1  # the last tap that passed the checks: when, where
        self.last_terminal = -1
        self.last_service = -1
        # Where the last passage was, NaN when its terminal is not located.
        self.last_latitude = _NOT_LOCATED
        self.last_longitude = _NOT_LOCATED
        self.transfer_ms = -1  # the last full-fare boarding at a transfer service
        self.cap_day = -1  # the day and month the cap totals are for
        self.cap_month = -1
        # Cents charged under each cap group: [day totals..., month totals...].
        self.cap_spent = _array("q", [0] * (2 * CAP_GROUPS_MAX))
        # An open stay at a per-duration service: where, since when, and the
        # maximum charge taken at its entry (part of it returns at the exit).
        self.stay_service = -1
        self.stay_ms = -1
        self.stay_charged = 0


def month_of_day(day: int) -> int:
    """Calendar month number (year * 12 + month - 1) of a day since 1970-01-01.

    >>> month_of_day(0), month_of_day(31), month_of_day(20_422)
    (23640, 23641, 24310)
    """
    # Howard Hinnant's civil_from_days, integer-only.
    z = day + 719_468
    era = z // 146_097  # floor division, as the algorithm means it
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year * 12 + month - 1


def show_id_sampled(card_uid: int, terminal_seq: int, permille: int) -> bool:
    """Whether this tap is one of the ``permille`` sampled for an ID check.

    Deterministic (a retry gets the same answer) and spread evenly: a
    multiplicative hash of the card and the terminal's sequence.

    >>> show_id_sampled(0x04A1, 7, 1000), show_id_sampled(0x04A1, 7, 0)
    (True, False)
    """
    mixed = ((card_uid ^ terminal_seq) * 2_654_435_761) & 0xFFFF_FFFF
    return mixed % 1000 < permille


# Mean Earth radius, metres: the sharing check needs tens of metres, not
# geodesy.
EARTH_RADIUS_M = 6_371_000.0


def distance_m(latitude_a: float, longitude_a: float, latitude_b: float, longitude_b: float) -> float:
    """Great-circle distance (haversine), metres.

    >>> round(distance_m(43.5453, -5.6615, 43.5322, -5.6611))
    1457
    """
    phi_a = _math.radians(latitude_a)
    phi_b = _math.radians(latitude_b)
    half_dphi = (phi_b - phi_a) / 2
    half_dlambda = _math.radians(longitude_b - longitude_a) / 2
    h = _math.sin(half_dphi) ** 2 + _math.cos(phi_a) * _math.cos(phi_b) * _math.sin(half_dlambda) ** 2
    return 2 * EARTH_RADIUS_M * _math.asin(min(1.0, _math.sqrt(h)))


def _sharing_suspected(state: Any, activity: Activity, latitude: float, longitude: float, recorded_ms: int) -> bool:
    """The card's last passage was at a located terminal farther from this
    one (at ``latitude``, ``longitude``) than can be travelled at the
    rules' speed in the time since."""
    settings = state.settings
    speed_kmh = settings[SETTING_SHARING_MAX_SPEED_KMH]
    if speed_kmh <= 0 or activity.last_latitude != activity.last_latitude:  # off, or not located (NaN)
        return False
    metres = distance_m(activity.last_latitude, activity.last_longitude, latitude, longitude)
    if metres < settings[SETTING_SHARING_MIN_DISTANCE_M]:
        return False
    elapsed_ms = recorded_ms - activity.last_ms
    # km/h -> metres per millisecond: speed * 1000 / 3_600_000.
    return metres * 3600 > speed_kmh * max(elapsed_ms, 0)


# --- The position index ------------------------------------------------------

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class PositionIndex(dict[int, int]):
    """Card uid -> card position, account id -> account position: the look-up
    every tap starts with (``state.card_position``, ``state.account_position``).

    A dict here; the compiled twin's is an open-addressing table of
    (key, position) pairs in one C array, which the ladder reads without
    making a Python int. The two accept the same keys and values: a key is
    an int64 (as in the database), a position an int64 of at least 0;
    anything else is refused when stored (OverflowError) and not found when
    looked up. Nothing is ever removed.
    """

    __slots__ = ()

    def __setitem__(self, key: int, position: int) -> None:
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise OverflowError(f"index key {key} is not an int64")
        if not 0 <= position <= _INT64_MAX:
            raise OverflowError(f"index position {position} is not 0..2**63-1")
        dict.__setitem__(self, key, position)

    def add_range(self, keys: Iterable[int], start: int) -> int:
        """Map ``keys`` to the positions start, start + 1, ...; returns how
        many were new (fewer than given: a key was there already, or twice)."""
        if start < 0:
            raise OverflowError(f"index position {start} is not 0..2**63-1")
        before = len(self)
        position = start
        for key in keys:
            self[key] = position
            position += 1
        return len(self) - before

    def positions(self, keys: Iterable[int]) -> _array[int]:
        """The position of each of ``keys``, as an array('q'); KeyError for
        the first key not there."""
        return _array("q", [self[key] for key in keys])


# --- The city's columns, checked once per use -------------------------------


def _int64_column(column: Any, name: str) -> _array[int]:
    """An array('q') column of the city (the compiled twin reads its cells
    raw, so any other type is refused)."""
    if not isinstance(column, _array) or column.typecode != "q":
        raise TypeError(_column_type_text(column, name, "array('q')"))
    return column


def _int32_column(column: Any, name: str) -> _array[int]:
    """An array('i') column of the city."""
    if not isinstance(column, _array) or column.typecode != "i":
        raise TypeError(_column_type_text(column, name, "array('i')"))
    return column


def _byte_column(column: Any, name: str) -> bytearray:
    """A bytearray column of the city."""
    if not isinstance(column, bytearray):
        raise TypeError(_column_type_text(column, name, "bytearray"))
    return column


def _column_type_text(column: object, name: str, expected: str) -> str:
    if isinstance(column, _array):
        return f"state.{name} must be {expected}, not array('{column.typecode}')"
    return f"state.{name} must be {expected}, not {type(column).__name__}"


def _check_position(position: int, size: int, what: str) -> int:
    """The one index check of each access path: position must be a cell."""
    if position < 0 or position >= size:
        raise IndexError(f"{what} position {position} out of range for {size} {what}s")
    return position


# --- The ladder --------------------------------------------------------------
#
# Reads happen in the same order as in the compiled twin, so the two raise the
# same errors for the same broken input.


def decide_tap(state: Any, terminal: Any, decision: Decision) -> None:
    """Decide a TAP in place: sets result, amount, balance, accounts and info.

    The ladder, in order (docs/rules.md): terminal, card, card status, clone
    (the card's counter), concession eligibility (the standard fare when it
    is not valid, a warning near its end), service, anti-passback, the fare
    (exit taps free, transfer discount, caps), minimum balance to enter, and
    funds down to the service's tolerated negative balance. Then the card's
    activity (counter, last tap, transfer start, cap totals) is updated.

    >>> decide_tap(state, state.terminals[7], decision)  # doctest: +SKIP
    """
    info = 0
    if not terminal.active:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    found = state.card_position.get(decision.card_uid)
    if found is None:
        decision.result = RESULT_UNKNOWN_CARD
        return
    service_id = terminal.service_id
    fares_by_service = state.fares
    decision.rules_version = state.rules_version
    card_account = _int64_column(state.card_account, "card_account")
    card_status = _byte_column(state.card_status, "card_status")
    card_profile = _byte_column(state.card_profile, "card_profile")
    card_eligible_from = _int32_column(state.card_eligible_from, "card_eligible_from")
    card_eligible_until = _int32_column(state.card_eligible_until, "card_eligible_until")
    settings = _int64_column(state.settings, "settings")
    _check_position(SETTINGS_FIELDS - 1, len(settings), "setting")
    balance = _int64_column(state.balance, "balance")
    pending_debit = _int64_column(state.pending_debit, "pending_debit")
    floor = _int64_column(state.floor, "floor")
    card = _check_position(
        found,
        min(len(card_account), len(card_status), len(card_profile), len(card_eligible_from), len(card_eligible_until)),
        "card",
    )
    profile = card_profile[card]
    eligible_from = card_eligible_from[card]
    eligible_until = card_eligible_until[card]
    account = _check_position(card_account[card], min(len(balance), len(pending_debit), len(floor)), "account")
    decision.card_account = account
    available = balance[account] - pending_debit[account]
    decision.balance = available
    if card_status[card] != CARD_STATUS_ACTIVE:
        decision.result = RESULT_CARD_NOT_ACTIVE
        return
    activities = state.activity
    activity = activities.get(card)
    counter = decision.card_counter
    if (
        activity is not None
        and counter != NO_COUNTER
        and activity.counter != NO_COUNTER
        and counter <= activity.counter  # backwards, or the same count again
    ):
        decision.result = RESULT_CLONE_SUSPECTED
        if settings[SETTING_CLONE_BLOCKS_CARD]:
            card_status[card] = CARD_STATUS_BLOCKED
        return
    recorded_ms = decision.recorded_ms
    if profile != STANDARD_PROFILE:
        day = recorded_ms // MS_PER_DAY
        if day < eligible_from or day > eligible_until:
            profile = STANDARD_PROFILE
            info |= INFO_CONCESSION_NOT_VALID
        elif eligible_until - day < settings[SETTING_RENEWAL_WINDOW_DAYS]:
            info |= INFO_RENEWAL_DUE
    decision.fare_profile = profile
    fares = _int64_column(fares_by_service[service_id], "fares row")
    fare = fares[_check_position(profile, len(fares), "profile")]
    if fare == NO_FARE:
        decision.info = info
        decision.result = RESULT_SERVICE_NOT_ALLOWED
        return
    if activity is None:
        activity = Activity()
        activities[card] = activity
    if counter != NO_COUNTER:
        decision.previous_counter = activity.counter
        activity.counter = counter
    policy_row = state.service_policy.get(service_id)
    exit_tap = decision.tap_flags & TAP_FLAG_EXIT
    account_floor = floor[account]
    minimum_balance = 0
    cap_group = NO_CAP
    transfer = False
    per_duration = False
    max_charge = 0
    product_group = NO_GROUP
    if policy_row is not None:
        policy = _int64_column(policy_row, "policy row")
        _check_position(POLICY_FIELDS - 1, len(policy), "policy field")
        minimum_balance = policy[POLICY_MIN_BALANCE]
        # The account's floor is the hard limit (the schema's); a service
        # tolerates at most its own negative balance above it.
        account_floor = max(account_floor, -policy[POLICY_TOLERATED_NEGATIVE])
        passback_ms = policy[POLICY_PASSBACK_MS]
        if (
            passback_ms
            and not exit_tap
            and activity.last_service == service_id
            and recorded_ms - activity.last_ms < passback_ms
        ):
            decision.info = info
            decision.result = RESULT_ALREADY_VALIDATED
            return
        transfer = policy[POLICY_TRANSFER] != 0
        cap_group = policy[POLICY_CAP_GROUP]
        per_duration = policy[POLICY_KIND] == SERVICE_PER_DURATION
        max_charge = policy[POLICY_MAX_CHARGE]
        product_group = policy[POLICY_GROUP]
    # Cards without products (nearly all) cost one dict miss, and only
    # where some product could pay.
    held = None
    if fare and not exit_tap and product_group != NO_GROUP:
        held = state.products.get(account)
    product: Product | None = None
    latitude = terminal.latitude
    longitude = _NOT_LOCATED
    if latitude is not None:
        longitude = terminal.longitude
    if (
        latitude is not None
        and activity.last_ms >= 0
        and activity.last_terminal != terminal.id
        and _sharing_suspected(state, activity, latitude, longitude, recorded_ms)
    ):
        info |= INFO_SHARING_SUSPECTED
        if profile != STANDARD_PROFILE:
            info |= INFO_SHOW_ID
    concession = profile != STANDARD_PROFILE
    if concession and show_id_sampled(decision.card_uid, decision.terminal_seq, settings[SETTING_SHOW_ID_PERMILLE]):
        info |= INFO_SHOW_ID
    starts_journey = False
    refund = 0
    if exit_tap:
        if per_duration and activity.stay_service == service_id and activity.stay_charged > 0:
            # The stay costs the hourly fare per started hour, at most what
            # was taken at the entry; the rest goes back to the card.
            hours = max((recorded_ms - activity.stay_ms + MS_PER_HOUR - 1) // MS_PER_HOUR, 1)
            refund = activity.stay_charged - min(fare * hours, activity.stay_charged)
            if refund:
                info |= INFO_REFUNDED
        fare = 0
    elif fare and per_duration:
        if held is not None:
            product = _season_pass(held, product_group, recorded_ms // MS_PER_DAY)
            if product is None:
                product = _ride_ticket(held, product_group)
        if product is not None:
            # A pass or one ride pays the whole stay.
            fare = 0
            info |= INFO_PASS_USED
        else:
            # The entry takes the most one stay can cost: a stay whose exit
            # is never tapped has paid its maximum charge.
            fare = max_charge
    elif fare:
        # Ways to pay, first that applies (docs/rules.md): season pass,
        # free transfer, multi-ride ticket, stored value under a cap.
        if held is not None:
            product = _season_pass(held, product_group, recorded_ms // MS_PER_DAY)
        if product is not None:
            fare = 0
            info |= INFO_PASS_USED
            starts_journey = transfer
        elif (
            transfer
            and activity.transfer_ms >= 0
            and recorded_ms - activity.transfer_ms <= settings[SETTING_TRANSFER_WINDOW_MS]
        ):
            fare = fare * (100 - settings[SETTING_TRANSFER_PERCENT_OFF]) // 100
            info |= INFO_TRANSFER
        else:
            starts_journey = transfer
        if fare and held is not None and product is None:
            product = _ride_ticket(held, product_group)
            if product is not None:
                fare = 0
                info |= INFO_PASS_USED
        if cap_group != NO_CAP and fare:
            left = _capped(state, activity, cap_group, recorded_ms, fare)
            if left < fare:
                fare = left
                info |= INFO_CAPPED
    decision.info = info
    if not exit_tap and minimum_balance > 0 and available < minimum_balance and product is None:
        decision.result = RESULT_MINIMUM_BALANCE
        return
    if available - fare < account_floor:
        decision.result = RESULT_INSUFFICIENT_FUNDS
        return
    # After this point the tap must succeed.
    decision.result = RESULT_APPROVED
    decision.amount = fare
    decision.balance = available - fare
    if product is not None:
        decision.product_id = product.id
        if product.kind == PRODUCT_MULTI_RIDE:
            product.rides_used += 1
            decision.product_rides = 1
    # Only an approved tap is a passage: the next checks start from it.
    activity.last_ms = recorded_ms
    activity.last_terminal = decision.terminal_id
    if latitude is not None:
        activity.last_latitude = latitude
        activity.last_longitude = longitude
    else:
        activity.last_latitude = activity.last_longitude = _NOT_LOCATED
    activity.last_service = service_id
    if starts_journey:
        activity.transfer_ms = recorded_ms
    if per_duration:
        if not exit_tap:
            activity.stay_service = service_id
            activity.stay_ms = recorded_ms
            activity.stay_charged = fare
        elif activity.stay_service == service_id:
            decision.stay_ms = activity.stay_ms
            decision.stay_charged = activity.stay_charged
            activity.stay_service = -1
            activity.stay_ms = -1
            activity.stay_charged = 0
    if refund:
        # A credit, spendable once committed (like a refunded reversal).
        decision.amount = refund
        decision.balance = available + refund
        pending_credit = _int64_column(state.pending_credit, "pending_credit")
        pending_credit[_check_position(account, len(pending_credit), "account")] += refund
        decision.source = state.revenue_account[service_id]
        decision.target = account
        decision.ledger_kind = LEDGER_FARE
    if fare:
        if cap_group != NO_CAP:
            spent = activity.cap_spent
            spent[cap_group] += fare
            spent[CAP_GROUPS_MAX + cap_group] += fare
            decision.cap_group = cap_group
        pending_debit[account] += fare
        decision.source = account
        decision.target = state.revenue_account[service_id]
        decision.ledger_kind = LEDGER_FARE


def _capped(state: Any, activity: Activity, group: int, recorded_ms: int, fare: int) -> int:
    """What is left of ``fare`` under the group's daily and monthly caps."""
    _check_position(group, CAP_GROUPS_MAX, "cap group")
    spent = activity.cap_spent
    day = recorded_ms // MS_PER_DAY
    if activity.cap_day != day:
        activity.cap_day = day
        for index in range(CAP_GROUPS_MAX):
            spent[index] = 0
        month = month_of_day(day)
        if activity.cap_month != month:
            activity.cap_month = month
            for index in range(CAP_GROUPS_MAX, 2 * CAP_GROUPS_MAX):
                spent[index] = 0
    left = fare
    daily = _int64_column(state.cap_daily, "cap_daily")[group]
    if daily >= 0:
        left = min(left, max(daily - spent[group], 0))
    monthly = _int64_column(state.cap_monthly, "cap_monthly")[group]
    if monthly >= 0:
        left = min(left, max(monthly - spent[CAP_GROUPS_MAX + group], 0))
    return left


def decide_topup(state: Any, terminal: Any, decision: Decision) -> None:
    """Decide a TOPUP in place. The credit is spendable only once committed.

    >>> decide_topup(state, state.terminals[900], decision)  # doctest: +SKIP
    """
    if not terminal.active or not terminal.is_kiosk:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    found = state.card_position.get(decision.card_uid)
    if found is None:
        decision.result = RESULT_UNKNOWN_CARD
        return
    funding_account = terminal.funding_account
    card_account = _int64_column(state.card_account, "card_account")
    card_status = _byte_column(state.card_status, "card_status")
    balance = _int64_column(state.balance, "balance")
    pending_debit = _int64_column(state.pending_debit, "pending_debit")
    pending_credit = _int64_column(state.pending_credit, "pending_credit")
    ceiling = _int64_column(state.ceiling, "ceiling")
    card = _check_position(found, min(len(card_account), len(card_status)), "card")
    account = _check_position(
        card_account[card], min(len(balance), len(pending_debit), len(pending_credit), len(ceiling)), "account"
    )
    decision.card_account = account
    available = balance[account] - pending_debit[account]
    decision.balance = available
    if card_status[card] != CARD_STATUS_ACTIVE:
        decision.result = RESULT_CARD_NOT_ACTIVE
        return
    amount = decision.requested
    if amount < 1 or amount > TOPUP_MAX_CENTS:
        decision.result = RESULT_INVALID_AMOUNT
        return
    # Pending credits count against the ceiling: two top-ups in one batch
    # must not together pass it.
    if balance[account] + pending_credit[account] + amount > ceiling[account]:
        decision.result = RESULT_BALANCE_LIMIT
        return
    # After this point the top-up must succeed.
    decision.result = RESULT_APPROVED
    decision.amount = amount
    decision.balance = available + amount
    pending_credit[account] += amount
    decision.source = funding_account
    decision.target = account
    decision.ledger_kind = LEDGER_TOPUP


def decide_reversal(
    state: Any,
    terminal: Any,
    decision: Decision,
    original: Original | None,
    already_reversed: bool,
    window_ms: int,
) -> None:
    """Decide a REVERSAL of ``original`` (None when not found) in place.

    A refunded fare is a credit (spendable once committed); a reversed top-up
    is a debit and needs the money to still be there. A ride a multi-ride
    ticket paid is given back to the ticket, and the fare no longer counts
    towards the card's caps. An exit tap cannot be undone (it may have
    settled a stay), nor an entry at a per-duration service whose stay has
    ended; reversing an entry whose stay is open closes the stay.

    >>> decide_reversal(state, terminal, decision, None, False, 600_000)  # doctest: +SKIP
    """
    group = NO_CAP
    activity: Activity | None = None
    product: Product | None = None
    closes_stay = False
    if not terminal.active:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    if original is None or original.kind == OPERATION_REVERSAL:
        decision.result = RESULT_ORIGINAL_NOT_FOUND
        return
    found = state.account_position[original.account_id]
    funding_account = terminal.funding_account
    balance = _int64_column(state.balance, "balance")
    pending_debit = _int64_column(state.pending_debit, "pending_debit")
    pending_credit = _int64_column(state.pending_credit, "pending_credit")
    floor = _int64_column(state.floor, "floor")
    account = _check_position(found, min(len(balance), len(pending_debit), len(pending_credit), len(floor)), "account")
    decision.card_account = account
    # The record names the card whose money moves; the request had no card.
    decision.card_uid = original.card_uid
    available = balance[account] - pending_debit[account]
    decision.balance = available
    if decision.recorded_ms - original.recorded_ms > window_ms:
        decision.result = RESULT_REVERSAL_WINDOW_EXPIRED
        return
    if already_reversed:
        decision.result = RESULT_ALREADY_REVERSED
        return
    if original.kind == OPERATION_TOPUP and decision.original_terminal != decision.terminal_id:
        # A top-up is reversed at its own kiosk, into its own funding account.
        decision.result = RESULT_NOT_REVERSIBLE
        return
    if original.kind == OPERATION_TAP:
        if original.tap_flags & TAP_FLAG_EXIT or original.info & INFO_REFUNDED:
            decision.result = RESULT_NOT_REVERSIBLE
            return
        # The refund belongs to the fare's service (a card-office refund is
        # made at another terminal): its revenue, its stays, its caps.
        decision.service_id = original.service_id
        card_found = state.card_position.get(original.card_uid)
        if card_found is not None:
            activity = state.activity.get(card_found)
        policy_row = state.service_policy.get(original.service_id)
        if policy_row is not None:
            policy = _int64_column(policy_row, "policy row")
            _check_position(POLICY_FIELDS - 1, len(policy), "policy field")
            group = policy[POLICY_CAP_GROUP]
            if policy[POLICY_KIND] == SERVICE_PER_DURATION:
                if (
                    activity is None
                    or activity.stay_service != original.service_id
                    or activity.stay_ms != original.recorded_ms
                ):
                    decision.result = RESULT_NOT_REVERSIBLE
                    return
                closes_stay = True
        if original.product_id != NO_PRODUCT:
            product = state.product_by_id.get(original.product_id)
    amount = original.amount
    if original.kind == OPERATION_TOPUP:
        if available - amount < floor[account]:
            decision.result = RESULT_INSUFFICIENT_FUNDS
            return
        # After this point the reversal must succeed.
        pending_debit[account] += amount
        decision.source = account
        decision.target = funding_account if funding_account >= 0 else NO_ACCOUNT
        decision.balance = available - amount
    else:
        # After this point the reversal must succeed.
        pending_credit[account] += amount
        decision.source = state.revenue_account[original.service_id]
        decision.target = account
        decision.balance = available + amount
        if closes_stay and activity is not None:
            # The holder did not stay: the exit, if tapped, settles nothing.
            decision.stay_ms = activity.stay_ms
            decision.stay_charged = activity.stay_charged
            activity.stay_service = -1
            activity.stay_ms = -1
            activity.stay_charged = 0
        if product is not None:
            decision.product_id = product.id
            if product.kind == PRODUCT_MULTI_RIDE and product.rides_used > 0:
                product.rides_used -= 1
                decision.product_rides = -1
        if group != NO_CAP and amount and activity is not None:
            _check_position(group, CAP_GROUPS_MAX, "cap group")
            spent = activity.cap_spent
            day = original.recorded_ms // MS_PER_DAY
            # The fare counted towards the totals of its own day and month
            # only: totals of a later period never held it.
            if activity.cap_day == day and spent[group] >= amount:
                spent[group] -= amount
                decision.cap_group = group
                decision.cap_given_back |= CAP_DAY_TOTAL
            if activity.cap_month == month_of_day(day) and spent[CAP_GROUPS_MAX + group] >= amount:
                spent[CAP_GROUPS_MAX + group] -= amount
                decision.cap_group = group
                decision.cap_given_back |= CAP_MONTH_TOTAL
    decision.result = RESULT_APPROVED
    decision.amount = amount
    decision.ledger_kind = LEDGER_REVERSAL


# --- Batch encoding -------------------------------------------------------------
#
# The writer sends a batch as one SQL statement whose columns are PostgreSQL
# array literals (text, cast in SQL): "{1,2,3}". The compiled twin formats the
# integers in C; here str() and join give the same text.


def _literal(values: list[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _nullable_literal(values: list[int | None]) -> str:
    return "{" + ",".join("NULL" if value is None else str(value) for value in values) + "}"


def encode_batch(
    batch_id: int, batch: list[Decision], account_ids: _array[int], transfers_per_batch: int
) -> tuple[object, ...]:
    """The commit statement's 33 arguments for one batch.

    Per decision, one row of the tap record (21 columns, the last one
    after the ledger's and the tickets' arrays). Per account, the
    sum of its movements (each account updated once, in id order). Per
    (ledger kind, service), one transfer whose entries are the per-account
    sums. Transfer ids are ``batch_id * transfers_per_batch + k``. Per
    multi-ride ticket, the rides used (or given back) in the batch.

    >>> encode_batch(1, [], _array('q'), 1024)[2]
    '{}'
    """
    if not isinstance(batch, list):
        raise TypeError(f"Argument 'batch' has incorrect type (expected list, got {type(batch).__name__})")
    ids = _int64_column(account_ids, "account_id")
    accounts = len(ids)
    columns: list[list[int | None]] = [[] for _ in range(21)]
    (
        terminal_ids,
        seqs,
        kinds,
        uids,
        counters,
        flags,
        requested,
        originals,
        event_ms,
        recorded_ms,
        results,
        amounts,
        balances,
        services,
        card_accounts,
        infos,
        fare_profiles,
        rules_versions,
        product_ids,
        original_terminals,
        online_results,
    ) = columns
    rides: dict[int, int] = {}
    deltas: dict[int, int] = {}
    transfers: dict[tuple[int, int], dict[int, int]] = {}
    for d in batch:
        if not isinstance(d, Decision):
            raise TypeError(f"Cannot convert {type(d).__name__} to engine._fastpath.Decision")
        terminal_ids.append(d.terminal_id)
        seqs.append(d.terminal_seq)
        kinds.append(d.kind)
        uids.append(d.card_uid)
        counters.append(d.card_counter)
        flags.append(d.tap_flags)
        requested.append(d.requested)
        originals.append(d.original_seq)
        event_ms.append(d.event_time_ms)
        recorded_ms.append(d.recorded_ms)
        results.append(d.result)
        amounts.append(d.amount)
        balances.append(d.balance)
        services.append(d.service_id)
        if d.card_account == NO_ACCOUNT:
            card_accounts.append(None)
        else:
            card_accounts.append(ids[_check_position(d.card_account, accounts, "account")])
        infos.append(d.info)
        fare_profiles.append(None if d.fare_profile == NO_PROFILE else d.fare_profile)
        rules_versions.append(d.rules_version)
        product_ids.append(None if d.product_id == NO_PRODUCT else d.product_id)
        if d.kind == OPERATION_REVERSAL and d.original_terminal != d.terminal_id:
            original_terminals.append(d.original_terminal)
        else:
            original_terminals.append(None)
        online_results.append(None if d.online_result == NO_RESULT else d.online_result)
        if d.product_rides and d.result == RESULT_APPROVED:
            rides[d.product_id] = rides.get(d.product_id, 0) + d.product_rides
        amount = d.amount
        if amount != 0 and d.result == RESULT_APPROVED:
            source = _check_position(d.source, accounts, "account")
            target = _check_position(d.target, accounts, "account")
            deltas[source] = deltas.get(source, 0) - amount
            deltas[target] = deltas.get(target, 0) + amount
            entries = transfers.get((d.ledger_kind, d.service_id))
            if entries is None:
                entries = transfers[(d.ledger_kind, d.service_id)] = {}
            entries[source] = entries.get(source, 0) - amount
            entries[target] = entries.get(target, 0) + amount
    # Each account once, in id order: a stable lock order for the UPDATE.
    delta_items = sorted((ids[p], delta) for p, delta in deltas.items() if delta)
    transfer_ids: list[int] = []
    transfer_kinds: list[int] = []
    transfer_services: list[int] = []
    entry_transfers: list[int] = []
    entry_accounts: list[int] = []
    entry_amounts: list[int] = []
    for number, ((kind, service), entries) in enumerate(sorted(transfers.items())):
        nonzero = [(ids[p], cents) for p, cents in entries.items() if cents]
        if not nonzero:
            continue  # e.g. a fare and its refund in the same batch
        transfer_id = batch_id * transfers_per_batch + number
        transfer_ids.append(transfer_id)
        transfer_kinds.append(kind)
        transfer_services.append(service)
        for account_id, cents in sorted(nonzero):
            entry_transfers.append(transfer_id)
            entry_accounts.append(account_id)
            entry_amounts.append(cents)
    ride_items = sorted(item for item in rides.items() if item[1])
    nullable = (7, 14, 16, 18, 19, 20)
    texts = tuple(
        _nullable_literal(column) if index in nullable else _literal(column)  # type: ignore[arg-type]
        for index, column in enumerate(columns)
    )
    return (
        batch_id,
        len(batch),
        *texts[:20],
        _literal([item[0] for item in delta_items]),
        _literal([item[1] for item in delta_items]),
        _literal(transfer_ids),
        _literal(transfer_kinds),
        _literal(transfer_services),
        _literal(entry_transfers),
        _literal(entry_accounts),
        _literal(entry_amounts),
        _literal([item[0] for item in ride_items]),
        _literal([item[1] for item in ride_items]),
        texts[20],
    )
