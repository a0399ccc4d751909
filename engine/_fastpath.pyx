# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The byte-level wire codec of protocol v1 and the per-tap decision, compiled.

This module turns bytes from a terminal's TCP stream into frames and fields,
and fields back into frames, exactly as ``docs/protocol.md`` specifies. It is
the hot path of every connection, so it is Cython: big-endian integers are
assembled from a ``const unsigned char*`` without the ``struct`` module, and
frames are split without copying the stream more than once. The frames of an
open session are sealed: ``SealKey`` computes and checks their tags
(HMAC-SHA256, with SHA-256 written out in C, on the CPU's SHA
instructions where it has them) and ``FrameReader`` holds them
to their sizes.

It knows nothing of asyncio, the database or metrics, and imports nothing
from the rest of ``engine``: the numbers it needs are repeated below as
module constants with the names and values of ``engine/codes.py`` and
``engine/limits.py`` (``tests/test_codec.py`` checks that they agree).

``engine/_fastpath_py.py`` is its pure-Python twin: same API, same
behaviour, same exception types and the same error text. Import the codec
through ``engine.fastpath``, which picks one of the two.

Below the codec is the per-tap decision fast path: the ``Decision`` record
and the decision ladder (``decide_tap``, ``decide_topup``,
``decide_reversal``), which read and write the city's column arrays in place
through raw pointers, each index checked once.

Every read of untrusted bytes goes through ``_take()``, the one
bounds-checked primitive; the unchecked big-endian helpers are only ever
applied to a pointer that ``_take()`` returned.

Example::

    >>> reader = FrameReader()
    >>> reader.feed(encode_ping(7, 42))
    [(32, 7, b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00*')]
"""

from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython cimport array
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport Py_SIZE
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from libc.math cimport NAN, asin, cos, isnan, sin, sqrt, M_PI

cimport cython

import array

import hmac as _hmac

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
# Constants. `cpdef enum` makes each name both a C constant (free to use in
# the hot path) and a plain int attribute of the module (for Python callers).
# =============================================================================

cpdef enum:
    # Wire limits, as in engine/limits.py.
    PROTOCOL_VERSION = 1
    FRAME_HEADER_BYTES = 12  # length prefix + version, type, flags, request id
    MAX_FRAME_BYTES = 16384  # largest frame, length prefix included
    ERROR_TEXT_MAX_BYTES = 200  # an ERROR's text is a hint for logs
    NONCE_BYTES = 16
    PROOF_BYTES = 32  # HMAC-SHA256 output
    # Derived from the frame layout in docs/protocol.md.
    LENGTH_PREFIX_BYTES = 4
    # The length prefix counts what follows it: the smallest legal value is
    # the rest of the header with an empty body.
    MIN_FRAME_LENGTH = FRAME_HEADER_BYTES - LENGTH_PREFIX_BYTES
    ERROR_BODY_MIN_BYTES = 3  # code u8 + text_length u16
    TERMINAL_KEY_BYTES = 32  # provisioned by the card office
    # Sealed frames (docs/protocol.md, "Sealed frames"): after the handshake
    # every frame has this flag set and its body is followed by a u64
    # counter and a tag (HMAC-SHA256 truncated to 128 bits).
    FLAG_SEALED = 0x0001
    SEAL_COUNTER_BYTES = 8
    SEAL_TAG_BYTES = 16
    SEAL_TRAILER_BYTES = SEAL_COUNTER_BYTES + SEAL_TAG_BYTES
    # Lists for terminals that work offline (docs/protocol.md, "Hot list,
    # rules and offline taps"): each HOTLIST and RULES body ends with an
    # Ed25519 signature; the most entries one frame carries, as in
    # engine/limits.py.
    SIGNATURE_BYTES = 64
    HOTLIST_PAGE_ENTRIES_MAX = 1800
    RULES_FARES_MAX = 64
    OFFLINE_TAPS_PER_UPLOAD_MAX = 256
    # HOTLIST flags: the entries are the whole list (from after_uid on),
    # not changes; more entries follow in another page.
    HOTLIST_FLAG_FULL = 0x01
    HOTLIST_FLAG_MORE = 0x02

cpdef enum:
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

cpdef enum:
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

cpdef enum:
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

cdef enum:
    # Fixed body sizes, from the per-type tables of docs/protocol.md.
    _HELLO_BODY = 22  # terminal_id u32, key_version u16, client_nonce
    _CHALLENGE_BODY = 16  # server_nonce
    _AUTH_BODY = 32  # proof
    _AUTH_OK_BODY = 40  # engine_proof, engine_time_ms u64
    _TAP_BODY = 29  # seq u64, uid u64, counter u32, time u64, flags u8
    _TOPUP_BODY = 28  # seq u64, uid u64, amount u32, time u64
    _REVERSAL_BODY = 24  # seq u64, original_seq u64, time u64
    _TAP_RESULT_BODY = 23  # seq u64, result u8, amount i32, balance i64, info u16
    _PING_BODY = 8  # payload u64
    _HOTLIST_REQUEST_BODY = 16  # since_version u64, after_uid u64
    _RULES_REQUEST_BODY = 4  # rules_version u32
    _NOTICE_BODY = 12  # hotlist_version u64, rules_version u32
    # Counted bodies: a head (with a u16 count), count entries, a tail.
    _HOTLIST_HEAD = 27  # flags u8, since_version u64, version u64, after_uid u64, count u16
    _HOTLIST_COUNT_AT = 25
    _HOTLIST_ENTRY = 9  # card_uid u64, reason u8
    # rules_version u32, service_id u16, service_kind u8,
    # min_balance_to_enter_cents u32, tolerated_negative_cents u32,
    # passback_window_s u32, max_charge_cents u32, transfer_window_minutes
    # u16, transfer_percent_off u8, cap_daily_cents i32, cap_monthly_cents
    # i32, count u16
    _RULES_HEAD = 36
    _RULES_COUNT_AT = 34
    _RULES_FARE = 5  # profile_id u8, fare_cents u32
    _COUNT_BYTES = 2  # the u16 count that heads an upload and its result
    # seq u64, uid u64, counter u32, time u64, tap_flags u8, rules_version
    # u32, result u8, amount u32
    _OFFLINE_TAP = 38
    # _body_size() answers for a type that is not a message type at all, for
    # ERROR, whose body size depends on its text_length field, and for the
    # counted bodies (COUNTED_LAYOUTS).
    _UNKNOWN_TYPE = -1
    _VARIABLE_SIZE = -2
    _COUNTED_SIZE = -3
    # FrameReader._frame_size() outcomes besides a frame size.
    _NEED_MORE = -1
    _VIOLATION = -2

# The fixed body size of every message type but ERROR (see ERROR_BODY_MIN_BYTES).
BODY_SIZES = {
    MSG_HELLO: _HELLO_BODY,
    MSG_CHALLENGE: _CHALLENGE_BODY,
    MSG_AUTH: _AUTH_BODY,
    MSG_AUTH_OK: _AUTH_OK_BODY,
    MSG_TAP: _TAP_BODY,
    MSG_TOPUP: _TOPUP_BODY,
    MSG_REVERSAL: _REVERSAL_BODY,
    MSG_TAP_RESULT: _TAP_RESULT_BODY,
    MSG_PING: _PING_BODY,
    MSG_PONG: _PING_BODY,
    MSG_HOTLIST_REQUEST: _HOTLIST_REQUEST_BODY,
    MSG_RULES_REQUEST: _RULES_REQUEST_BODY,
    MSG_NOTICE: _NOTICE_BODY,
}

# The bodies sized by a count of entries: (head bytes, offset of the u16
# count in the head, bytes per entry, tail bytes after the entries, most
# entries). The body is exactly head + count * entry + tail bytes.
COUNTED_LAYOUTS = {
    MSG_HOTLIST: (_HOTLIST_HEAD, _HOTLIST_COUNT_AT, _HOTLIST_ENTRY, SIGNATURE_BYTES,
                  HOTLIST_PAGE_ENTRIES_MAX),
    MSG_RULES: (_RULES_HEAD, _RULES_COUNT_AT, _RULES_FARE, SIGNATURE_BYTES, RULES_FARES_MAX),
    MSG_OFFLINE_UPLOAD: (_COUNT_BYTES, 0, _OFFLINE_TAP, 0, OFFLINE_TAPS_PER_UPLOAD_MAX),
    MSG_OFFLINE_RESULT: (_COUNT_BYTES, 0, _TAP_RESULT_BODY, 0, OFFLINE_TAPS_PER_UPLOAD_MAX),
}

# Names for error text only: the hot path switches on the numbers.
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

# Integer field bounds as Python ints, so that range checks compare against
# cached objects instead of building them per call.
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

    def __init__(self, code, message, request_id=0):
        Exception.__init__(self, message)
        self.code = code
        self.request_id = request_id

    def __reduce__(self):
        return (type(self), (self.code, str(self), self.request_id))

    def __repr__(self):
        return (
            f"ProtocolError(code={self.code!r}, message={str(self)!r}, "
            f"request_id={self.request_id!r})"
        )


# =============================================================================
# Reading untrusted bytes
# =============================================================================

cdef inline const unsigned char* _take(
    const unsigned char* data, Py_ssize_t size, Py_ssize_t offset,
    Py_ssize_t count,
) except NULL:
    """Return data + offset after checking that count bytes are there.

    The one bounds-checked read of the module. Callers check lengths before,
    with a protocol-level message; reaching the raise means a codec bug, and
    a bug must never read past a buffer.
    """
    if offset < 0 or count < 0 or count > size - offset:
        raise ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"insufficient data: requested {count} bytes at offset {offset},"
            f" {size - offset} remaining",
        )
    return data + offset


# Unchecked big-endian loads, only for pointers returned by _take(). Written
# byte by byte so they are independent of alignment and host byte order;
# compilers turn them into a single load and byte swap.

cdef inline uint16_t _be16(const unsigned char* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | <uint16_t>p[1]


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16)
            | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline uint64_t _be64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | <uint64_t>_be32(p + 4)


cdef inline void _put16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void _put32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _put64(unsigned char* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)


cdef inline bytes _as_bytes(object value, str name):
    """Accept any bytes-like value (asyncio gives bytes; tests may not)."""
    if type(value) is bytes:
        return <bytes>value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, not {type(value).__name__}")


cdef inline Py_ssize_t _body_size(int msg_type) noexcept nogil:
    if msg_type == MSG_HELLO:
        return _HELLO_BODY
    if msg_type == MSG_CHALLENGE:
        return _CHALLENGE_BODY
    if msg_type == MSG_AUTH:
        return _AUTH_BODY
    if msg_type == MSG_AUTH_OK:
        return _AUTH_OK_BODY
    if msg_type == MSG_TAP:
        return _TAP_BODY
    if msg_type == MSG_TOPUP:
        return _TOPUP_BODY
    if msg_type == MSG_REVERSAL:
        return _REVERSAL_BODY
    if msg_type == MSG_TAP_RESULT:
        return _TAP_RESULT_BODY
    if msg_type == MSG_PING or msg_type == MSG_PONG:
        return _PING_BODY
    if msg_type == MSG_ERROR:
        return _VARIABLE_SIZE
    if msg_type == MSG_HOTLIST_REQUEST:
        return _HOTLIST_REQUEST_BODY
    if msg_type == MSG_RULES_REQUEST:
        return _RULES_REQUEST_BODY
    if msg_type == MSG_NOTICE:
        return _NOTICE_BODY
    if (msg_type == MSG_HOTLIST or msg_type == MSG_RULES
            or msg_type == MSG_OFFLINE_UPLOAD or msg_type == MSG_OFFLINE_RESULT):
        return _COUNTED_SIZE
    return _UNKNOWN_TYPE


cdef struct _Counted:
    # A counted body's layout (COUNTED_LAYOUTS).
    Py_ssize_t head
    Py_ssize_t count_at
    Py_ssize_t entry
    Py_ssize_t tail
    Py_ssize_t most


cdef inline _Counted _counted_layout(int msg_type) noexcept nogil:
    cdef _Counted layout
    if msg_type == MSG_HOTLIST:
        layout.head = _HOTLIST_HEAD
        layout.count_at = _HOTLIST_COUNT_AT
        layout.entry = _HOTLIST_ENTRY
        layout.tail = SIGNATURE_BYTES
        layout.most = HOTLIST_PAGE_ENTRIES_MAX
    elif msg_type == MSG_RULES:
        layout.head = _RULES_HEAD
        layout.count_at = _RULES_COUNT_AT
        layout.entry = _RULES_FARE
        layout.tail = SIGNATURE_BYTES
        layout.most = RULES_FARES_MAX
    else:
        layout.head = _COUNT_BYTES
        layout.count_at = 0
        layout.entry = _OFFLINE_TAP if msg_type == MSG_OFFLINE_UPLOAD else _TAP_RESULT_BODY
        layout.tail = 0
        layout.most = OFFLINE_TAPS_PER_UPLOAD_MAX
    return layout


cdef object _body_length_error(
    int msg_type, Py_ssize_t body_length, uint32_t request_id,
):
    """The ProtocolError for a fixed-size body of the wrong length."""
    return ProtocolError(
        ERR_BAD_BODY_LENGTH,
        f"{_TYPE_NAMES[msg_type]} body length {body_length},"
        f" expected {_body_size(msg_type)}",
        request_id,
    )


cdef object _error_body_error(
    const unsigned char* body, Py_ssize_t available, Py_ssize_t body_length,
    uint32_t request_id,
):
    """Check an ERROR body's size against its text_length field.

    ``body`` holds ``available`` bytes of a body that will be ``body_length``
    long. Returns None when valid, the ProtocolError otherwise; raises
    nothing, so the reader can record the error and keep earlier frames.
    """
    cdef uint16_t text_length
    if (body_length < ERROR_BODY_MIN_BYTES
            or body_length > ERROR_BODY_MIN_BYTES + ERROR_TEXT_MAX_BYTES):
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR body length {body_length}, expected"
            f" {ERROR_BODY_MIN_BYTES}..{ERROR_BODY_MIN_BYTES + ERROR_TEXT_MAX_BYTES}",
            request_id,
        )
    if available < ERROR_BODY_MIN_BYTES:
        return None  # text_length not here yet; the reader waits for it
    text_length = _be16(_take(body, available, 1, 2))
    if text_length > ERROR_TEXT_MAX_BYTES:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR text length {text_length} above maximum"
            f" {ERROR_TEXT_MAX_BYTES}",
            request_id,
        )
    if body_length != ERROR_BODY_MIN_BYTES + text_length:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"ERROR body length {body_length}, expected"
            f" {ERROR_BODY_MIN_BYTES} + text length {text_length}",
            request_id,
        )
    return None


cdef object _counted_body_error(
    int msg_type, const unsigned char* body, Py_ssize_t available,
    Py_ssize_t body_length, uint32_t request_id,
):
    """Check a counted body's size (COUNTED_LAYOUTS) against its count field.

    As _error_body_error: ``body`` holds ``available`` bytes of a body that
    will be ``body_length`` long. The length alone must fit some count
    (judged at once); once the count has arrived, the length must be
    exactly that count's.
    """
    cdef _Counted layout = _counted_layout(msg_type)
    cdef Py_ssize_t fixed = layout.head + layout.tail
    cdef Py_ssize_t count
    if (body_length < fixed or body_length > fixed + layout.most * layout.entry
            or (body_length - fixed) % layout.entry):
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"{_TYPE_NAMES[msg_type]} body length {body_length}, expected"
            f" {fixed} + {layout.entry} * count (count 0..{layout.most})",
            request_id,
        )
    if available < layout.count_at + _COUNT_BYTES:
        return None  # the count is not here yet; the reader waits for it
    count = _be16(_take(body, available, layout.count_at, _COUNT_BYTES))
    if body_length != fixed + count * layout.entry:
        return ProtocolError(
            ERR_BAD_BODY_LENGTH,
            f"{_TYPE_NAMES[msg_type]} body length {body_length}, expected"
            f" {fixed} + {layout.entry} * count {count}",
            request_id,
        )
    return None


# =============================================================================
# Splitting the stream into frames
# =============================================================================

cdef class FrameReader:
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

    cdef bytearray _pending  # the start of an incomplete frame
    cdef uint32_t _max_length  # the largest acceptable length prefix
    cdef readonly object error  # the first ProtocolError, then sticky
    cdef readonly Py_ssize_t max_frame_bytes
    cdef readonly bint sealed  # an AUTH or AUTH_OK was delivered

    def __init__(self, max_frame_bytes=MAX_FRAME_BYTES):
        if not isinstance(max_frame_bytes, int):
            raise TypeError(
                "max_frame_bytes must be int, not"
                f" {type(max_frame_bytes).__name__}"
            )
        if not FRAME_HEADER_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(
                f"max_frame_bytes {int(max_frame_bytes)} out of range"
                f" ({FRAME_HEADER_BYTES}..{MAX_FRAME_BYTES})"
            )
        self.max_frame_bytes = max_frame_bytes
        self._max_length = <uint32_t>(max_frame_bytes - LENGTH_PREFIX_BYTES)
        self._pending = bytearray()
        self.error = None
        self.sealed = False

    def buffered(self):
        """Bytes held for an incomplete frame."""
        return PyByteArray_GET_SIZE(self._pending)

    def feed(self, data):
        """Append ``data``; return the complete frames it finished."""
        if self.error is not None:
            raise self.error
        cdef bytes chunk = _as_bytes(data, "data")
        cdef list frames = []
        cdef Py_ssize_t consumed, held = PyByteArray_GET_SIZE(self._pending)
        cdef Py_ssize_t size
        if held == 0:
            # The common case: the chunk starts at a frame boundary. Split
            # it in place and keep only its incomplete tail.
            size = PyBytes_GET_SIZE(chunk)
            consumed = self._split(
                <const unsigned char*>PyBytes_AS_STRING(chunk), size, frames)
            if self.error is None and consumed < size:
                self._pending = PyByteArray_FromStringAndSize(
                    PyBytes_AS_STRING(chunk) + consumed, size - consumed)
        else:
            self._pending += chunk
            size = PyByteArray_GET_SIZE(self._pending)
            consumed = self._split(
                <const unsigned char*>PyByteArray_AS_STRING(self._pending),
                size, frames)
            if consumed:
                # Deleting a bytearray's head is O(1) in CPython.
                del self._pending[:consumed]
        if self.error is not None:
            self._pending = bytearray()  # a dead connection holds nothing
        return frames

    cdef Py_ssize_t _split(
        self, const unsigned char* data, Py_ssize_t size, list frames,
    ) except -1:
        """Append every complete frame of data[:size]; return bytes used."""
        cdef Py_ssize_t pos = 0, total
        cdef const unsigned char* header
        while True:
            total = self._frame_size(data, size, pos)
            if total < 0 or total > size - pos:
                return pos  # need more bytes, or stopped at a violation
            header = _take(data, size, pos, total)
            frames.append((
                header[5],
                _be32(header + 8),
                PyBytes_FromStringAndSize(
                    <char*>header + FRAME_HEADER_BYTES,
                    total - FRAME_HEADER_BYTES),
            ))
            pos += total
            if not self.sealed and (header[5] == MSG_AUTH or header[5] == MSG_AUTH_OK):
                self.sealed = True  # the handshake's last frame: seals from here on

    cdef Py_ssize_t _frame_size(
        self, const unsigned char* data, Py_ssize_t size, Py_ssize_t pos,
    ) except -3:
        """Validate the frame starting at pos with what has arrived of it.

        Returns its whole size (length prefix included) once every check
        that its bytes allow has passed, _NEED_MORE when a check still waits
        for bytes, or _VIOLATION after recording self.error.
        """
        cdef Py_ssize_t available = size - pos
        cdef const unsigned char* p
        cdef uint32_t length, request_id
        cdef Py_ssize_t expected, body_length
        cdef Py_ssize_t trailer = 0
        cdef int version, msg_type, flags
        if available < LENGTH_PREFIX_BYTES:
            return _NEED_MORE
        length = _be32(_take(data, size, pos, LENGTH_PREFIX_BYTES))
        # The length is judged alone, before anything else of the frame is
        # awaited: this is what bounds the memory a peer can make us hold.
        if length < MIN_FRAME_LENGTH:
            self.error = ProtocolError(
                ERR_FRAME_TOO_SHORT,
                f"frame length {length} below minimum {MIN_FRAME_LENGTH}",
            )
            return _VIOLATION
        if length > self._max_length:
            self.error = ProtocolError(
                ERR_FRAME_TOO_LARGE,
                f"frame length {length} above maximum {self._max_length}",
            )
            return _VIOLATION
        if available < FRAME_HEADER_BYTES:
            # Wait for the request id, so that the ERROR can carry it.
            return _NEED_MORE
        p = _take(data, size, pos, FRAME_HEADER_BYTES)
        version = p[4]
        msg_type = p[5]
        flags = _be16(p + 6)
        request_id = _be32(p + 8)
        if version != PROTOCOL_VERSION:
            self.error = ProtocolError(
                ERR_UNSUPPORTED_VERSION,
                f"unsupported protocol version {version}"
                f" (expected {PROTOCOL_VERSION})",
                request_id,
            )
            return _VIOLATION
        expected = _body_size(msg_type)
        if expected == _UNKNOWN_TYPE:
            self.error = ProtocolError(
                ERR_UNKNOWN_TYPE, f"unknown message type 0x{msg_type:02x}",
                request_id,
            )
            return _VIOLATION
        if self.sealed:
            if flags != FLAG_SEALED:
                self.error = ProtocolError(
                    ERR_BAD_FLAGS,
                    f"flags 0x{flags:04x} after the handshake (must be"
                    f" 0x{FLAG_SEALED:04x}, sealed)",
                    request_id,
                )
                return _VIOLATION
            if length - MIN_FRAME_LENGTH < SEAL_TRAILER_BYTES:
                self.error = ProtocolError(
                    ERR_BAD_BODY_LENGTH,
                    f"sealed frame length {length} below minimum"
                    f" {MIN_FRAME_LENGTH + SEAL_TRAILER_BYTES}",
                    request_id,
                )
                return _VIOLATION
            trailer = SEAL_TRAILER_BYTES
        elif flags != 0:
            self.error = ProtocolError(
                ERR_BAD_FLAGS, f"reserved flags 0x{flags:04x} set (must be 0)",
                request_id,
            )
            return _VIOLATION
        # The body's own length: a sealed frame's trailer is not part of it.
        body_length = length - MIN_FRAME_LENGTH - trailer
        if expected == _VARIABLE_SIZE:
            self.error = _error_body_error(
                p + FRAME_HEADER_BYTES,
                min(available, LENGTH_PREFIX_BYTES + length) - FRAME_HEADER_BYTES,
                body_length, request_id)
            if self.error is not None:
                return _VIOLATION
            if available < FRAME_HEADER_BYTES + ERROR_BODY_MIN_BYTES:
                return _NEED_MORE
        elif expected == _COUNTED_SIZE:
            self.error = _counted_body_error(
                msg_type, p + FRAME_HEADER_BYTES,
                min(available, LENGTH_PREFIX_BYTES + length) - FRAME_HEADER_BYTES,
                body_length, request_id)
            if self.error is not None:
                return _VIOLATION
            if (available < FRAME_HEADER_BYTES + _counted_layout(msg_type).count_at
                    + _COUNT_BYTES):
                return _NEED_MORE
        elif body_length != expected:
            self.error = _body_length_error(msg_type, body_length, request_id)
            return _VIOLATION
        return LENGTH_PREFIX_BYTES + length


# =============================================================================
# Encoding. Encoders build the whole frame, length prefix included. Their
# arguments come from the engine, not the peer: a bad one is a bug, reported
# as ValueError/TypeError, never as a ProtocolError.
# =============================================================================

cdef int _check_unsigned(
    str name, object value, object maximum, str kind,
) except -1:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < 0 or value > maximum:
        raise ValueError(
            f"{name} {int(value)} out of range for {kind} (0..{maximum})")
    return 0


cdef int _check_signed(
    str name, object value, object minimum, object maximum, str kind,
) except -1:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value < minimum or value > maximum:
        raise ValueError(
            f"{name} {int(value)} out of range for {kind}"
            f" ({minimum}..{maximum})")
    return 0


cdef bytes _check_fixed_bytes(str name, object value, Py_ssize_t size):
    cdef bytes data = _as_bytes(value, name)
    if PyBytes_GET_SIZE(data) != size:
        raise ValueError(
            f"{name} must be {size} bytes, got {PyBytes_GET_SIZE(data)}")
    return data


cdef inline unsigned char* _frame_body(bytes frame) noexcept:
    return <unsigned char*>PyBytes_AS_STRING(frame) + FRAME_HEADER_BYTES


cdef bytes _new_frame(int msg_type, object request_id, Py_ssize_t body_size):
    """A frame with its header written and an uninitialised body to fill."""
    _check_unsigned("request_id", request_id, _U32_MAX, "u32")
    cdef bytes frame = PyBytes_FromStringAndSize(
        NULL, FRAME_HEADER_BYTES + body_size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(frame)
    _put32(p, <uint32_t>(MIN_FRAME_LENGTH + body_size))
    p[4] = PROTOCOL_VERSION
    p[5] = <unsigned char>msg_type
    _put16(p + 6, 0)
    _put32(p + 8, <uint32_t>request_id)
    return frame


def encode_hello(request_id, terminal_id, key_version, client_nonce):
    """HELLO: who the terminal is, and its fresh nonce.

    >>> len(encode_hello(1, 4242, 1, bytes(16)))
    34
    """
    _check_unsigned("terminal_id", terminal_id, _U32_MAX, "u32")
    _check_unsigned("key_version", key_version, _U16_MAX, "u16")
    cdef bytes nonce = _check_fixed_bytes("client_nonce", client_nonce, NONCE_BYTES)
    cdef bytes frame = _new_frame(MSG_HELLO, request_id, _HELLO_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put32(p, <uint32_t>terminal_id)
    _put16(p + 4, <uint16_t>key_version)
    memcpy(p + 6, PyBytes_AS_STRING(nonce), NONCE_BYTES)
    return frame


def encode_challenge(request_id, server_nonce):
    """CHALLENGE: the engine's nonce, the other half of the transcript."""
    cdef bytes nonce = _check_fixed_bytes("server_nonce", server_nonce, NONCE_BYTES)
    cdef bytes frame = _new_frame(MSG_CHALLENGE, request_id, _CHALLENGE_BODY)
    memcpy(_frame_body(frame), PyBytes_AS_STRING(nonce), NONCE_BYTES)
    return frame


def encode_auth(request_id, proof):
    """AUTH: the terminal's proof that it holds its key."""
    cdef bytes data = _check_fixed_bytes("proof", proof, PROOF_BYTES)
    cdef bytes frame = _new_frame(MSG_AUTH, request_id, _AUTH_BODY)
    memcpy(_frame_body(frame), PyBytes_AS_STRING(data), PROOF_BYTES)
    return frame


def encode_auth_ok(request_id, engine_proof, engine_time_ms):
    """AUTH_OK: the engine's proof and clock; the session is open."""
    cdef bytes data = _check_fixed_bytes("engine_proof", engine_proof, PROOF_BYTES)
    _check_unsigned("engine_time_ms", engine_time_ms, _U64_MAX, "u64")
    cdef bytes frame = _new_frame(MSG_AUTH_OK, request_id, _AUTH_OK_BODY)
    cdef unsigned char* p = _frame_body(frame)
    memcpy(p, PyBytes_AS_STRING(data), PROOF_BYTES)
    _put64(p + PROOF_BYTES, <uint64_t>engine_time_ms)
    return frame


def encode_tap(
    request_id, terminal_seq, card_uid, card_counter, event_time_ms, tap_flags,
):
    """TAP: one card presented to a validator.

    >>> decode_tap(encode_tap(1, 1001, 0x04A1B2C3D4E580, 7, 0, 0)[12:])[0]
    1001
    """
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
    _check_unsigned("card_counter", card_counter, _U32_MAX, "u32")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    _check_unsigned("tap_flags", tap_flags, _U8_MAX, "u8")
    cdef bytes frame = _new_frame(MSG_TAP, request_id, _TAP_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>terminal_seq)
    _put64(p + 8, <uint64_t>card_uid)
    _put32(p + 16, <uint32_t>card_counter)
    _put64(p + 20, <uint64_t>event_time_ms)
    p[28] = <unsigned char>tap_flags
    return frame


def encode_topup(request_id, terminal_seq, card_uid, amount_cents, event_time_ms):
    """TOPUP: stored value added at a kiosk."""
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
    _check_unsigned("amount_cents", amount_cents, _U32_MAX, "u32")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    cdef bytes frame = _new_frame(MSG_TOPUP, request_id, _TOPUP_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>terminal_seq)
    _put64(p + 8, <uint64_t>card_uid)
    _put32(p + 16, <uint32_t>amount_cents)
    _put64(p + 20, <uint64_t>event_time_ms)
    return frame


def encode_reversal(request_id, terminal_seq, original_seq, event_time_ms):
    """REVERSAL: cancel an approved TAP or TOPUP of the same terminal."""
    _check_unsigned("terminal_seq", terminal_seq, _U64_MAX, "u64")
    _check_unsigned("original_seq", original_seq, _U64_MAX, "u64")
    _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
    cdef bytes frame = _new_frame(MSG_REVERSAL, request_id, _REVERSAL_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>terminal_seq)
    _put64(p + 8, <uint64_t>original_seq)
    _put64(p + 16, <uint64_t>event_time_ms)
    return frame


def encode_tap_result(
    request_id, terminal_seq, result, amount_cents, balance_cents, info=0,
):
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
    cdef bytes frame = _new_frame(MSG_TAP_RESULT, request_id, _TAP_RESULT_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>terminal_seq)
    p[8] = <unsigned char>result
    # Two's complement, as the protocol's i32/i64 require.
    _put32(p + 9, <uint32_t><int32_t>amount_cents)
    _put64(p + 13, <uint64_t><int64_t>balance_cents)
    _put16(p + 21, <uint16_t>info)
    return frame


cdef bytes _encode_ping_like(int msg_type, object request_id, object payload):
    _check_unsigned("payload", payload, _U64_MAX, "u64")
    cdef bytes frame = _new_frame(msg_type, request_id, _PING_BODY)
    _put64(_frame_body(frame), <uint64_t>payload)
    return frame


def encode_ping(request_id, payload):
    """PING: keep-alive; the peer echoes request_id and payload in a PONG."""
    return _encode_ping_like(MSG_PING, request_id, payload)


def encode_pong(request_id, payload):
    """PONG: the echo of a PING."""
    return _encode_ping_like(MSG_PONG, request_id, payload)


def encode_error(request_id, code, text):
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
    cdef bytes encoded = (<str>text).encode("utf-8", "replace")
    cdef Py_ssize_t cut = PyBytes_GET_SIZE(encoded)
    cdef const unsigned char* raw = <const unsigned char*>PyBytes_AS_STRING(encoded)
    if cut > ERROR_TEXT_MAX_BYTES:
        cut = ERROR_TEXT_MAX_BYTES
        # Back up over continuation bytes (10xxxxxx) so that the character
        # the cut falls into is dropped whole.
        while cut > 0 and (raw[cut] & 0xC0) == 0x80:
            cut -= 1
    cdef bytes frame = _new_frame(MSG_ERROR, request_id, ERROR_BODY_MIN_BYTES + cut)
    cdef unsigned char* p = _frame_body(frame)
    p[0] = <unsigned char>code
    _put16(p + 1, <uint16_t>cut)
    if cut:
        memcpy(p + ERROR_BODY_MIN_BYTES, raw, cut)
    return frame


# --- Lists for offline terminals, and offline taps ----------------------------

cdef object _entries(str name, object value, Py_ssize_t fields, Py_ssize_t most):
    """A list of entries, each a tuple of ``fields`` values, at most ``most``."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list, not {type(value).__name__}")
    if len(value) > most:
        raise ValueError(f"{name} has {len(value)} entries, at most {most}")
    for index, entry in enumerate(value):
        if not isinstance(entry, (tuple, list)):
            raise TypeError(
                f"{name}[{index}] must be a tuple, not {type(entry).__name__}")
        if len(entry) != fields:
            raise ValueError(
                f"{name}[{index}] must have {fields} fields, got {len(entry)}")
    return value


def encode_hotlist_request(request_id, since_version, after_uid):
    """HOTLIST_REQUEST: the hot list's changes since ``since_version`` (0: the
    whole list), continuing a whole list above ``after_uid``.

    >>> decode_hotlist_request(encode_hotlist_request(1, 41, 0)[12:])
    (41, 0)
    """
    _check_unsigned("since_version", since_version, _U64_MAX, "u64")
    _check_unsigned("after_uid", after_uid, _U64_MAX, "u64")
    cdef bytes frame = _new_frame(MSG_HOTLIST_REQUEST, request_id, _HOTLIST_REQUEST_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>since_version)
    _put64(p + 8, <uint64_t>after_uid)
    return frame


def encode_hotlist(request_id, flags, since_version, version, after_uid, entries,
                   signature):
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
    cdef bytes signed = _check_fixed_bytes("signature", signature, SIGNATURE_BYTES)
    cdef Py_ssize_t count = len(entries)
    for card_uid, reason in entries:
        _check_unsigned("card_uid", card_uid, _U64_MAX, "u64")
        _check_unsigned("reason", reason, _U8_MAX, "u8")
    cdef bytes frame = _new_frame(
        MSG_HOTLIST, request_id, _HOTLIST_HEAD + count * _HOTLIST_ENTRY + SIGNATURE_BYTES)
    cdef unsigned char* p = _frame_body(frame)
    p[0] = <unsigned char>flags
    _put64(p + 1, <uint64_t>since_version)
    _put64(p + 9, <uint64_t>version)
    _put64(p + 17, <uint64_t>after_uid)
    _put16(p + _HOTLIST_COUNT_AT, <uint16_t>count)
    p += _HOTLIST_HEAD
    for card_uid, reason in entries:
        _put64(p, <uint64_t>card_uid)
        p[8] = <unsigned char>reason
        p += _HOTLIST_ENTRY
    memcpy(p, PyBytes_AS_STRING(signed), SIGNATURE_BYTES)
    return frame


def encode_rules_request(request_id, rules_version):
    """RULES_REQUEST: the rules of the terminal's service, version
    ``rules_version`` (0: the version in force)."""
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    cdef bytes frame = _new_frame(MSG_RULES_REQUEST, request_id, _RULES_REQUEST_BODY)
    _put32(_frame_body(frame), <uint32_t>rules_version)
    return frame


def encode_rules(
    request_id, rules_version, service_id, service_kind,
    min_balance_to_enter_cents, tolerated_negative_cents, passback_window_s,
    max_charge_cents, transfer_window_minutes, transfer_percent_off,
    cap_daily_cents, cap_monthly_cents, fares, signature,
):
    """RULES: what a terminal needs of one rules version to decide taps at
    its service offline, ``fares`` as (profile_id, fare_cents) pairs, signed."""
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    _check_unsigned("service_id", service_id, _U16_MAX, "u16")
    _check_unsigned("service_kind", service_kind, _U8_MAX, "u8")
    _check_unsigned("min_balance_to_enter_cents", min_balance_to_enter_cents,
                    _U32_MAX, "u32")
    _check_unsigned("tolerated_negative_cents", tolerated_negative_cents,
                    _U32_MAX, "u32")
    _check_unsigned("passback_window_s", passback_window_s, _U32_MAX, "u32")
    _check_unsigned("max_charge_cents", max_charge_cents, _U32_MAX, "u32")
    _check_unsigned("transfer_window_minutes", transfer_window_minutes,
                    _U16_MAX, "u16")
    _check_unsigned("transfer_percent_off", transfer_percent_off, _U8_MAX, "u8")
    _check_signed("cap_daily_cents", cap_daily_cents, _I32_MIN, _I32_MAX, "i32")
    _check_signed("cap_monthly_cents", cap_monthly_cents, _I32_MIN, _I32_MAX, "i32")
    _entries("fares", fares, 2, RULES_FARES_MAX)
    cdef bytes signed = _check_fixed_bytes("signature", signature, SIGNATURE_BYTES)
    cdef Py_ssize_t count = len(fares)
    for profile_id, fare_cents in fares:
        _check_unsigned("profile_id", profile_id, _U8_MAX, "u8")
        _check_unsigned("fare_cents", fare_cents, _U32_MAX, "u32")
    cdef bytes frame = _new_frame(
        MSG_RULES, request_id, _RULES_HEAD + count * _RULES_FARE + SIGNATURE_BYTES)
    cdef unsigned char* p = _frame_body(frame)
    _put32(p, <uint32_t>rules_version)
    _put16(p + 4, <uint16_t>service_id)
    p[6] = <unsigned char>service_kind
    _put32(p + 7, <uint32_t>min_balance_to_enter_cents)
    _put32(p + 11, <uint32_t>tolerated_negative_cents)
    _put32(p + 15, <uint32_t>passback_window_s)
    _put32(p + 19, <uint32_t>max_charge_cents)
    _put16(p + 23, <uint16_t>transfer_window_minutes)
    p[25] = <unsigned char>transfer_percent_off
    _put32(p + 26, <uint32_t><int32_t>cap_daily_cents)
    _put32(p + 30, <uint32_t><int32_t>cap_monthly_cents)
    _put16(p + _RULES_COUNT_AT, <uint16_t>count)
    p += _RULES_HEAD
    for profile_id, fare_cents in fares:
        p[0] = <unsigned char>profile_id
        _put32(p + 1, <uint32_t>fare_cents)
        p += _RULES_FARE
    memcpy(p, PyBytes_AS_STRING(signed), SIGNATURE_BYTES)
    return frame


def encode_notice(request_id, hotlist_version, rules_version):
    """NOTICE: the engine's hot list and rules versions now (sent unasked)."""
    _check_unsigned("hotlist_version", hotlist_version, _U64_MAX, "u64")
    _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
    cdef bytes frame = _new_frame(MSG_NOTICE, request_id, _NOTICE_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put64(p, <uint64_t>hotlist_version)
    _put32(p + 8, <uint32_t>rules_version)
    return frame


def encode_offline_upload(request_id, taps):
    """OFFLINE_UPLOAD: taps a terminal decided while offline, each
    (terminal_seq, card_uid, card_counter, event_time_ms, tap_flags,
    rules_version, result, amount_cents).

    >>> len(encode_offline_upload(1, [(7, 0x04A1, 3, 1767225601234, 0, 2, 0, 150)]))
    52
    """
    _entries("taps", taps, 8, OFFLINE_TAPS_PER_UPLOAD_MAX)
    cdef Py_ssize_t count = len(taps)
    for seq, uid, counter, event_time_ms, tap_flags, rules_version, result, amount in taps:
        _check_unsigned("terminal_seq", seq, _U64_MAX, "u64")
        _check_unsigned("card_uid", uid, _U64_MAX, "u64")
        _check_unsigned("card_counter", counter, _U32_MAX, "u32")
        _check_unsigned("event_time_ms", event_time_ms, _U64_MAX, "u64")
        _check_unsigned("tap_flags", tap_flags, _U8_MAX, "u8")
        _check_unsigned("rules_version", rules_version, _U32_MAX, "u32")
        _check_unsigned("result", result, _U8_MAX, "u8")
        _check_unsigned("amount_cents", amount, _U32_MAX, "u32")
    cdef bytes frame = _new_frame(
        MSG_OFFLINE_UPLOAD, request_id, _COUNT_BYTES + count * _OFFLINE_TAP)
    cdef unsigned char* p = _frame_body(frame)
    _put16(p, <uint16_t>count)
    p += _COUNT_BYTES
    for seq, uid, counter, event_time_ms, tap_flags, rules_version, result, amount in taps:
        _put64(p, <uint64_t>seq)
        _put64(p + 8, <uint64_t>uid)
        _put32(p + 16, <uint32_t>counter)
        _put64(p + 20, <uint64_t>event_time_ms)
        p[28] = <unsigned char>tap_flags
        _put32(p + 29, <uint32_t>rules_version)
        p[33] = <unsigned char>result
        _put32(p + 34, <uint32_t>amount)
        p += _OFFLINE_TAP
    return frame


def encode_offline_result(request_id, results):
    """OFFLINE_RESULT: the answer to an OFFLINE_UPLOAD, one (terminal_seq,
    result, amount_cents, balance_cents, info) per tap, in upload order."""
    _entries("results", results, 5, OFFLINE_TAPS_PER_UPLOAD_MAX)
    cdef Py_ssize_t count = len(results)
    for seq, result, amount, balance, info in results:
        _check_unsigned("terminal_seq", seq, _U64_MAX, "u64")
        _check_unsigned("result", result, _U8_MAX, "u8")
        _check_signed("amount_cents", amount, _I32_MIN, _I32_MAX, "i32")
        _check_signed("balance_cents", balance, _I64_MIN, _I64_MAX, "i64")
        _check_unsigned("info", info, _U16_MAX, "u16")
    cdef bytes frame = _new_frame(
        MSG_OFFLINE_RESULT, request_id, _COUNT_BYTES + count * _TAP_RESULT_BODY)
    cdef unsigned char* p = _frame_body(frame)
    _put16(p, <uint16_t>count)
    p += _COUNT_BYTES
    for seq, result, amount, balance, info in results:
        _put64(p, <uint64_t>seq)
        p[8] = <unsigned char>result
        _put32(p + 9, <uint32_t><int32_t>amount)
        _put64(p + 13, <uint64_t><int64_t>balance)
        _put16(p + 21, <uint16_t>info)
        p += _TAP_RESULT_BODY
    return frame


# =============================================================================
# Decoding. Decoders take a body as FrameReader returns it. The reader has
# already checked its length, but a decoder handed a body directly checks
# again: a wrong length is the peer's fault, hence a ProtocolError.
# =============================================================================

cdef inline const unsigned char* _fixed_body(
    int msg_type, bytes body,
) except NULL:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t expected = _body_size(msg_type)
    if size != expected:
        raise _body_length_error(msg_type, size, 0)
    return _take(<const unsigned char*>PyBytes_AS_STRING(body), size, 0, expected)


def decode_hello(body):
    """HELLO body -> (terminal_id, key_version, client_nonce)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_HELLO, data)
    return (
        _be32(p),
        _be16(p + 4),
        PyBytes_FromStringAndSize(<char*>p + 6, NONCE_BYTES),
    )


def decode_challenge(body):
    """CHALLENGE body -> server_nonce."""
    cdef bytes data = _as_bytes(body, "body")
    _fixed_body(MSG_CHALLENGE, data)
    return data


def decode_auth(body):
    """AUTH body -> proof."""
    cdef bytes data = _as_bytes(body, "body")
    _fixed_body(MSG_AUTH, data)
    return data


def decode_auth_ok(body):
    """AUTH_OK body -> (engine_proof, engine_time_ms)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_AUTH_OK, data)
    return (
        PyBytes_FromStringAndSize(<char*>p, PROOF_BYTES),
        _be64(p + PROOF_BYTES),
    )


def decode_tap(body):
    """TAP body -> (terminal_seq, card_uid, card_counter, event_time_ms,
    tap_flags)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_TAP, data)
    return (_be64(p), _be64(p + 8), _be32(p + 16), _be64(p + 20), p[28])


def decode_topup(body):
    """TOPUP body -> (terminal_seq, card_uid, amount_cents, event_time_ms)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_TOPUP, data)
    return (_be64(p), _be64(p + 8), _be32(p + 16), _be64(p + 20))


def decode_reversal(body):
    """REVERSAL body -> (terminal_seq, original_seq, event_time_ms)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_REVERSAL, data)
    return (_be64(p), _be64(p + 8), _be64(p + 16))


def decode_tap_result(body):
    """TAP_RESULT body -> (terminal_seq, result, amount_cents, balance_cents,
    info)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_TAP_RESULT, data)
    return (
        _be64(p),
        p[8],
        <int32_t>_be32(p + 9),
        <int64_t>_be64(p + 13),
        _be16(p + 21),
    )


def decode_ping(body):
    """PING body -> payload."""
    cdef bytes data = _as_bytes(body, "body")
    return _be64(_fixed_body(MSG_PING, data))


def decode_pong(body):
    """PONG body -> payload."""
    cdef bytes data = _as_bytes(body, "body")
    return _be64(_fixed_body(MSG_PONG, data))


def decode_error(body):
    """ERROR body -> (code, text). Invalid UTF-8 is replaced, never raised:
    the text is only a hint, and a bad one must not hide the code."""
    cdef bytes data = _as_bytes(body, "body")
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    error = _error_body_error(p, size, size, 0)
    if error is not None:
        raise error
    p = _take(p, size, 0, size)
    return (
        p[0],
        (<const char*>p)[ERROR_BODY_MIN_BYTES:size].decode("utf-8", "replace"),
    )


cdef const unsigned char* _counted_body(
    int msg_type, bytes data, Py_ssize_t* count,
) except NULL:
    """A counted body (COUNTED_LAYOUTS) checked whole: its bytes, and its count."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    error = _counted_body_error(msg_type, p, size, size, 0)
    if error is not None:
        raise error
    cdef _Counted layout = _counted_layout(msg_type)
    count[0] = _be16(_take(p, size, layout.count_at, _COUNT_BYTES))
    return _take(p, size, 0, layout.head + count[0] * layout.entry + layout.tail)


def decode_hotlist_request(body):
    """HOTLIST_REQUEST body -> (since_version, after_uid)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_HOTLIST_REQUEST, data)
    return (_be64(p), _be64(p + 8))


def decode_hotlist(body):
    """HOTLIST body -> (flags, since_version, version, after_uid, entries,
    signature); the signature covers ``body[:-SIGNATURE_BYTES]``."""
    cdef bytes data = _as_bytes(body, "body")
    cdef Py_ssize_t count, _index
    cdef const unsigned char* p = _counted_body(MSG_HOTLIST, data, &count)
    cdef const unsigned char* entry = p + _HOTLIST_HEAD
    cdef list entries = []
    for _index in range(count):
        entries.append((_be64(entry), entry[8]))
        entry += _HOTLIST_ENTRY
    return (p[0], _be64(p + 1), _be64(p + 9), _be64(p + 17), entries,
            PyBytes_FromStringAndSize(<char*>entry, SIGNATURE_BYTES))


def decode_rules_request(body):
    """RULES_REQUEST body -> rules_version."""
    cdef bytes data = _as_bytes(body, "body")
    return _be32(_fixed_body(MSG_RULES_REQUEST, data))


def decode_rules(body):
    """RULES body -> (rules_version, service_id, service_kind,
    min_balance_to_enter_cents, tolerated_negative_cents, passback_window_s,
    max_charge_cents, transfer_window_minutes, transfer_percent_off,
    cap_daily_cents, cap_monthly_cents, fares, signature); the signature
    covers ``body[:-SIGNATURE_BYTES]``."""
    cdef bytes data = _as_bytes(body, "body")
    cdef Py_ssize_t count, _index
    cdef const unsigned char* p = _counted_body(MSG_RULES, data, &count)
    cdef const unsigned char* fare = p + _RULES_HEAD
    cdef list fares = []
    for _index in range(count):
        fares.append((fare[0], _be32(fare + 1)))
        fare += _RULES_FARE
    return (
        _be32(p), _be16(p + 4), p[6], _be32(p + 7), _be32(p + 11),
        _be32(p + 15), _be32(p + 19), _be16(p + 23), p[25],
        <int32_t>_be32(p + 26), <int32_t>_be32(p + 30), fares,
        PyBytes_FromStringAndSize(<char*>fare, SIGNATURE_BYTES),
    )


def decode_notice(body):
    """NOTICE body -> (hotlist_version, rules_version)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef const unsigned char* p = _fixed_body(MSG_NOTICE, data)
    return (_be64(p), _be32(p + 8))


def decode_offline_upload(body):
    """OFFLINE_UPLOAD body -> taps, each (terminal_seq, card_uid,
    card_counter, event_time_ms, tap_flags, rules_version, result,
    amount_cents)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef Py_ssize_t count, _index
    cdef const unsigned char* p = _counted_body(MSG_OFFLINE_UPLOAD, data, &count)
    cdef list taps = []
    p += _COUNT_BYTES
    for _index in range(count):
        taps.append((_be64(p), _be64(p + 8), _be32(p + 16), _be64(p + 20), p[28],
                     _be32(p + 29), p[33], _be32(p + 34)))
        p += _OFFLINE_TAP
    return taps


def decode_offline_result(body):
    """OFFLINE_RESULT body -> results, each (terminal_seq, result,
    amount_cents, balance_cents, info)."""
    cdef bytes data = _as_bytes(body, "body")
    cdef Py_ssize_t count, _index
    cdef const unsigned char* p = _counted_body(MSG_OFFLINE_RESULT, data, &count)
    cdef list results = []
    p += _COUNT_BYTES
    for _index in range(count):
        results.append((_be64(p), p[8], <int32_t>_be32(p + 9),
                        <int64_t>_be64(p + 13), _be16(p + 21)))
        p += _TAP_RESULT_BODY
    return results


# =============================================================================
# Handshake proofs (docs/protocol.md, AUTH)
# =============================================================================

cdef bytes _transcript(terminal_id, key_version, client_nonce, server_nonce):
    """terminal_id u32 || key_version u16 || client_nonce || server_nonce."""
    _check_unsigned("terminal_id", terminal_id, _U32_MAX, "u32")
    _check_unsigned("key_version", key_version, _U16_MAX, "u16")
    cdef bytes client = _check_fixed_bytes("client_nonce", client_nonce, NONCE_BYTES)
    cdef bytes server = _check_fixed_bytes("server_nonce", server_nonce, NONCE_BYTES)
    cdef unsigned char head[6]
    _put32(head, <uint32_t>terminal_id)
    _put16(head + 4, <uint16_t>key_version)
    return (<char*>head)[:6] + client + server


cdef bytes _proof(bytes label, key, terminal_id, key_version, client_nonce,
                  server_nonce):
    cdef bytes secret = _check_fixed_bytes("key", key, TERMINAL_KEY_BYTES)
    cdef bytes transcript = _transcript(
        terminal_id, key_version, client_nonce, server_nonce)
    return _hmac.digest(secret, label + transcript, "sha256")


def terminal_proof(key, terminal_id, key_version, client_nonce, server_nonce):
    """HMAC-SHA256(key, "citycard/v1/terminal-proof" || transcript): what the
    terminal sends in AUTH. Compare with hmac.compare_digest, never ==."""
    return _proof(TERMINAL_PROOF_LABEL, key, terminal_id, key_version,
                  client_nonce, server_nonce)


def engine_proof(key, terminal_id, key_version, client_nonce, server_nonce):
    """HMAC-SHA256(key, "citycard/v1/engine-proof" || transcript): what the
    engine sends in AUTH_OK to prove it knows the terminal's key too."""
    return _proof(ENGINE_PROOF_LABEL, key, terminal_id, key_version,
                  client_nonce, server_nonce)


# =============================================================================
# Sealed frames (docs/protocol.md, "Sealed frames"): the tag of each frame
# after the handshake, HMAC-SHA256 under a session key truncated to
# SEAL_TAG_BYTES. SHA-256 (FIPS 180-4) is written out here so that a tag
# costs a few compressions and no allocation: through hashlib each tag would
# cost several Python calls and OpenSSL's per-call setup, more than the rest
# of a tap's decoding and encoding. A compression uses the CPU's SHA
# instructions where it has them (engine/_sha256_x86.h), else the portable
# C below. engine/seal.py holds the session keys and counters;
# tests/test_seal.py holds both compressions against hmac and hashlib.
# =============================================================================

cdef extern from "_sha256_x86.h":
    const uint32_t citycard_sha256_k[64]  # the round constants
    int citycard_sha256_ni_supported() noexcept nogil
    void citycard_sha256_compress_ni(uint32_t* state, const unsigned char* block) noexcept nogil

# Asked once, at import: CPUID does not change while the process runs.
cdef bint _sha256_ni = citycard_sha256_ni_supported() != 0


def _sha256_compression():
    """Which SHA-256 compression seals frames: "sha-ni" or "portable"."""
    return "sha-ni" if _sha256_ni else "portable"


def _use_sha256_compression(name):
    """Choose the compression ("sha-ni" or "portable"), for tests that hold
    each against hashlib; "sha-ni" where the CPU lacks it raises ValueError."""
    global _sha256_ni
    if name == "portable":
        _sha256_ni = False
    elif name == "sha-ni" and citycard_sha256_ni_supported():
        _sha256_ni = True
    else:
        raise ValueError(f"no SHA-256 compression {name!r} on this CPU")


cdef enum:
    _SHA256_BLOCK = 64
    _SHA256_DIGEST = 32
    _SHA256_LENGTH_FIELD = 8  # the message length in bits, u64, ends the padding
    _SEALED_SIGNED_HEAD = 8  # version, type, flags, request_id
    _SESSION_KEY_BYTES = 32

cdef uint32_t[8] _SHA256_IV = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
]


cdef struct _Sha256:
    uint32_t state[8]
    unsigned char block[_SHA256_BLOCK]  # the message's bytes not compressed yet
    Py_ssize_t used  # bytes in block
    uint64_t total  # bytes hashed so far


cdef inline uint32_t _rotr(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


cdef inline void _sha256_compress(uint32_t* state, const unsigned char* block) noexcept nogil:
    if _sha256_ni:
        citycard_sha256_compress_ni(state, block)
    else:
        _sha256_compress_portable(state, block)


cdef void _sha256_compress_portable(uint32_t* state, const unsigned char* block) noexcept nogil:
    cdef uint32_t w[64]
    cdef uint32_t a, b, c, d, e, f, g, h, t1, t2
    cdef int i
    for i in range(16):
        w[i] = _be32(block + 4 * i)
    for i in range(16, 64):
        w[i] = (w[i - 16] + w[i - 7]
                + (_rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3))
                + (_rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)))
    a = state[0]
    b = state[1]
    c = state[2]
    d = state[3]
    e = state[4]
    f = state[5]
    g = state[6]
    h = state[7]
    for i in range(64):
        t1 = (h + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25))
              + ((e & f) ^ (~e & g)) + citycard_sha256_k[i] + w[i])
        t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22))
              + ((a & b) ^ (a & c) ^ (b & c)))
        h = g
        g = f
        f = e
        e = d + t1
        d = c
        c = b
        b = a
        a = t1 + t2
    state[0] += a
    state[1] += b
    state[2] += c
    state[3] += d
    state[4] += e
    state[5] += f
    state[6] += g
    state[7] += h


cdef void _sha256_init(_Sha256* s) noexcept nogil:
    memcpy(s.state, _SHA256_IV, sizeof(s.state))
    s.used = 0
    s.total = 0


cdef void _sha256_update(_Sha256* s, const unsigned char* data, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t take
    s.total += <uint64_t>size
    while size > 0:
        take = _SHA256_BLOCK - s.used
        if take > size:
            take = size
        memcpy(s.block + s.used, data, take)
        s.used += take
        data += take
        size -= take
        if s.used == _SHA256_BLOCK:
            _sha256_compress(s.state, s.block)
            s.used = 0


cdef void _sha256_final(_Sha256* s, unsigned char* digest) noexcept nogil:
    """Pad, compress the last block(s), write the 32-byte digest; s is spent."""
    cdef uint64_t bits = s.total * 8
    cdef int i
    s.block[s.used] = 0x80
    s.used += 1
    if s.used > _SHA256_BLOCK - _SHA256_LENGTH_FIELD:
        memset(s.block + s.used, 0, _SHA256_BLOCK - s.used)
        _sha256_compress(s.state, s.block)
        s.used = 0
    memset(s.block + s.used, 0, _SHA256_BLOCK - _SHA256_LENGTH_FIELD - s.used)
    _put64(s.block + _SHA256_BLOCK - _SHA256_LENGTH_FIELD, bits)
    _sha256_compress(s.state, s.block)
    for i in range(8):
        _put32(digest + 4 * i, s.state[i])


cdef class SealKey:
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

    cdef _Sha256 _inner  # after the key's inner padded block
    cdef _Sha256 _outer  # after the key's outer padded block

    def __init__(self, key):
        cdef bytes secret = _check_fixed_bytes("key", key, _SESSION_KEY_BYTES)
        cdef unsigned char inner[_SHA256_BLOCK]
        cdef unsigned char outer[_SHA256_BLOCK]
        cdef const unsigned char* raw = <const unsigned char*>PyBytes_AS_STRING(secret)
        cdef int i
        for i in range(_SHA256_BLOCK):
            inner[i] = (raw[i] if i < _SESSION_KEY_BYTES else 0) ^ 0x36
            outer[i] = (raw[i] if i < _SESSION_KEY_BYTES else 0) ^ 0x5C
        _sha256_init(&self._inner)
        _sha256_update(&self._inner, inner, _SHA256_BLOCK)
        _sha256_init(&self._outer)
        _sha256_update(&self._outer, outer, _SHA256_BLOCK)

    cdef void _tag(
        self, const unsigned char* head, const unsigned char* rest,
        Py_ssize_t rest_size, unsigned char* tag,
    ) noexcept:
        """The full HMAC of head (the 8 signed header bytes) || rest."""
        cdef _Sha256 hashing = self._inner
        cdef unsigned char inner_digest[_SHA256_DIGEST]
        _sha256_update(&hashing, head, _SEALED_SIGNED_HEAD)
        _sha256_update(&hashing, rest, rest_size)
        _sha256_final(&hashing, inner_digest)
        hashing = self._outer
        _sha256_update(&hashing, inner_digest, _SHA256_DIGEST)
        _sha256_final(&hashing, tag)

    def seal(self, frame, counter):
        """A whole frame as the encoders make it (flags 0), sealed with ``counter``."""
        cdef bytes data = _as_bytes(frame, "frame")
        _check_unsigned("counter", counter, _U64_MAX, "u64")
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        if size < FRAME_HEADER_BYTES or _be32(p) != size - LENGTH_PREFIX_BYTES:
            raise ValueError(f"frame must be a whole frame, got {size} bytes")
        if _be16(p + 6) != 0:
            raise ValueError("seal() takes a frame with flags 0")
        cdef bytes sealed = PyBytes_FromStringAndSize(NULL, size + SEAL_TRAILER_BYTES)
        cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(sealed)
        cdef unsigned char digest[_SHA256_DIGEST]
        memcpy(out, p, size)
        _put32(out, <uint32_t>(size - LENGTH_PREFIX_BYTES + SEAL_TRAILER_BYTES))
        _put16(out + 6, FLAG_SEALED)
        _put64(out + size, <uint64_t>counter)
        self._tag(out + LENGTH_PREFIX_BYTES, out + FRAME_HEADER_BYTES,
                  size - FRAME_HEADER_BYTES + SEAL_COUNTER_BYTES, digest)
        memcpy(out + size + SEAL_COUNTER_BYTES, digest, SEAL_TAG_BYTES)
        return sealed

    def open(self, msg_type, request_id, body, counter):
        """A sealed frame's body as FrameReader delivers it (trailer included)
        -> the body alone, once its tag verifies and its counter is ``counter``.

        Raises ProtocolError: BAD_TAG when the tag does not verify (checked
        first, in constant time), BAD_COUNTER when the counter differs.
        """
        _check_unsigned("msg_type", msg_type, _U8_MAX, "u8")
        _check_unsigned("request_id", request_id, _U32_MAX, "u32")
        _check_unsigned("counter", counter, _U64_MAX, "u64")
        cdef bytes data = _as_bytes(body, "body")
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data) - SEAL_TRAILER_BYTES
        if size < 0:
            raise ProtocolError(
                ERR_BAD_BODY_LENGTH,
                f"sealed body of {PyBytes_GET_SIZE(data)} bytes is shorter than its seal",
                request_id,
            )
        cdef const unsigned char* p = _take(
            <const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
            0, size + SEAL_TRAILER_BYTES)
        cdef unsigned char head[_SEALED_SIGNED_HEAD]
        cdef unsigned char digest[_SHA256_DIGEST]
        cdef unsigned char difference = 0
        cdef int i
        head[0] = PROTOCOL_VERSION
        head[1] = <unsigned char>msg_type
        _put16(head + 2, FLAG_SEALED)
        _put32(head + 4, <uint32_t>request_id)
        self._tag(head, p, size + SEAL_COUNTER_BYTES, digest)
        for i in range(SEAL_TAG_BYTES):
            difference |= digest[i] ^ p[size + SEAL_COUNTER_BYTES + i]
        if difference:
            raise ProtocolError(
                ERR_BAD_TAG,
                f"the tag of a sealed frame of type 0x{<int>msg_type:02x} does not verify",
                request_id,
            )
        cdef uint64_t received = _be64(p + size)
        if received != <uint64_t>counter:
            raise ProtocolError(
                ERR_BAD_COUNTER,
                f"frame counter {received}, expected {counter}"
                " (replayed, reordered or lost frame)",
                request_id,
            )
        return PyBytes_FromStringAndSize(<const char*>p, size)


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
# nothing from the engine. The city's columns are read and written in place
# through raw pointers: ``array('q')`` through ``data.as_longlongs`` and
# bytearrays through ``PyByteArray_AS_STRING``. No buffer is exported, so
# the arrays stay resizable (cards are added at run time); a pointer is only
# used between two points where no Python code can run. Every index is
# checked once against the columns it reads (_check_position), so a wrong
# position raises IndexError instead of touching memory it does not own.
# Money sums stay far inside int64 for every value the schema allows
# (balances between floor and ceiling, fares and top-ups in cents).
# =============================================================================

cpdef enum:
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
    # TAP flag bits (docs/protocol.md): bit 0 marks an exit tap; the rest
    # are reserved.
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
    # Decision.online_result of a tap decided online: no second opinion.
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
    POLICY_PASSBACK_MS = 3  # same card, same service within this: declined
    POLICY_TRANSFER = 4  # 1: a change within the transfer window is discounted
    POLICY_CAP_GROUP = 5  # index of the service's cap group, -1: not capped
    POLICY_MAX_CHARGE = 6  # per-duration: charged when the exit is missing
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
    # Cap groups a rules version may define: the card keeps a day and a
    # month total per group.
    CAP_GROUPS_MAX = 8
    NO_CAP = -1
    # A card counter of 0 means "this card does not count": no clone check.
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


@cython.freelist(64)
cdef class Decision:
    """One decided TAP, TOPUP or REVERSAL, pending until its batch commits.

    Numbers are signed 64-bit (the record stores bigints); ``original_seq``
    is None but for a REVERSAL, and ``waiters`` holds the
    ``(reply target, request_id)`` pairs waiting for the reply.

    >>> d = Decision(7, 1001, OPERATION_TAP, 0x04A1, 3, 0, 0, None, 0, 0, 1)
    >>> d.result, d.card_account, d.waiters
    (0, -1, [])
    """

    cdef public int64_t terminal_id
    cdef public int64_t terminal_seq
    cdef public int64_t kind
    cdef public int64_t card_uid
    cdef public int64_t card_counter
    cdef public int64_t tap_flags
    cdef public int64_t requested
    cdef public object original_seq  # int, or None
    cdef public int64_t event_time_ms
    cdef public int64_t recorded_ms
    cdef public int64_t service_id
    cdef public int64_t result
    cdef public int64_t amount
    cdef public int64_t balance
    cdef public int64_t card_account
    cdef public int64_t source
    cdef public int64_t target
    cdef public int64_t ledger_kind
    cdef public int64_t info
    cdef public int64_t fare_profile
    cdef public int64_t rules_version
    cdef public int64_t previous_counter
    cdef public int64_t cap_group
    cdef public int64_t stay_ms
    cdef public int64_t stay_charged
    cdef public int64_t product_id
    cdef public int64_t product_rides
    cdef public int64_t original_terminal
    cdef public int64_t cap_given_back
    cdef public int64_t online_result
    cdef public list waiters

    def __init__(
        self,
        int64_t terminal_id,
        int64_t terminal_seq,
        int64_t kind,
        int64_t card_uid,
        int64_t card_counter,
        int64_t tap_flags,
        int64_t requested,
        object original_seq,
        int64_t event_time_ms,
        int64_t recorded_ms,
        int64_t service_id,
    ):
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
        self.waiters = []

    def fingerprint(self):
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
    def moves_money(self):
        return self.amount > 0

    def __repr__(self):
        return (
            f"Decision({_OPERATION_NAMES.get(self.kind, self.kind)}"
            f" terminal={self.terminal_id} seq={self.terminal_seq}"
            f" result={self.result} amount={self.amount})"
        )


def request_fingerprint(
    kind, card_uid, card_counter, tap_flags, requested, event_time_ms,
    original_seq, original_terminal=-1,
):
    """Same layout as Decision.fingerprint, for an incoming request
    (``original_terminal``: a REVERSAL's, -1 for other requests).

    >>> request_fingerprint(0, 0x04A1, 3, 0, 0, 0, None)
    (0, 1185, 3, 0, 0, 0, None, -1)
    """
    return (kind, card_uid, card_counter, tap_flags, requested, event_time_ms,
            original_seq, original_terminal)


cdef class Original:
    """The approved request a REVERSAL names, as read from the record."""

    cdef public int64_t kind
    cdef public int64_t card_uid
    cdef public int64_t amount
    cdef public int64_t account_id
    cdef public int64_t recorded_ms
    cdef public int64_t service_id
    cdef public int64_t tap_flags
    cdef public int64_t info
    cdef public int64_t product_id

    def __init__(
        self, int64_t kind, int64_t card_uid, int64_t amount,
        int64_t account_id, int64_t recorded_ms, int64_t service_id,
        int64_t tap_flags=0, int64_t info=0, int64_t product_id=NO_PRODUCT,
    ):
        self.kind = kind
        self.card_uid = card_uid
        self.amount = amount
        self.account_id = account_id
        self.recorded_ms = recorded_ms
        self.service_id = service_id
        self.tap_flags = tap_flags
        self.info = info
        self.product_id = product_id


cdef class Product:
    """A season pass or multi-ride ticket an account holds (``state.products``,
    account position -> list of Product; schema: card_products).

    >>> p = Product(12, PRODUCT_MULTI_RIDE, 3, 0, 0, 10, 4)
    >>> p.rides - p.rides_used
    6
    """

    cdef public int64_t id
    cdef public int64_t kind
    cdef public int64_t group
    cdef public int64_t first_day
    cdef public int64_t last_day
    cdef public int64_t rides
    cdef public int64_t rides_used

    def __init__(
        self, int64_t id, int64_t kind, int64_t group, int64_t first_day,
        int64_t last_day, int64_t rides, int64_t rides_used,
    ):
        self.id = id
        self.kind = kind
        self.group = group
        # Season passes: valid on days [first_day, last_day] since 1970-01-01.
        self.first_day = first_day
        self.last_day = last_day
        # Multi-ride tickets: rides bought, rides used.
        self.rides = rides
        self.rides_used = rides_used

    def __repr__(self):
        kind = "season" if self.kind == PRODUCT_SEASON else "multi_ride"
        return f"Product({self.id} {kind} group={self.group})"


cdef Product _season_pass(list held, int64_t group, int64_t day):
    """The valid season pass for ``group`` that ends first, or None."""
    cdef Product product
    cdef Product best = None
    for item in held:
        product = item
        if (product.kind == PRODUCT_SEASON and product.group == group
                and product.first_day <= day <= product.last_day
                and (best is None or product.last_day < best.last_day)):
            best = product
    return best


cdef Product _ride_ticket(list held, int64_t group):
    """The oldest multi-ride ticket for ``group`` with rides left, or None."""
    cdef Product product
    cdef Product best = None
    for item in held:
        product = item
        if (product.kind == PRODUCT_MULTI_RIDE and product.group == group
                and product.rides_used < product.rides
                and (best is None or product.id < best.id)):
            best = product
    return best


cdef class Activity:
    """What the rules remember of one card between taps (kept for the cards
    that tapped: ``state.activity``, card position -> Activity).

    >>> a = Activity()
    >>> a.counter, a.last_terminal, len(a.cap_spent)
    (0, -1, 16)
    """

    cdef public int64_t counter
    cdef public int64_t last_ms
    cdef public int64_t last_terminal
    cdef public int64_t last_service
    cdef public double last_latitude
    cdef public double last_longitude
    cdef public int64_t transfer_ms
    cdef public int64_t cap_day
    cdef public int64_t cap_month
    cdef public object cap_spent
    cdef public int64_t stay_service
    cdef public int64_t stay_ms
    cdef public int64_t stay_charged

    def __init__(self):
        self.counter = NO_COUNTER  # the highest card counter seen
        self.last_ms = -1  # the last tap that passed the checks: when, where
        self.last_terminal = -1
        self.last_service = -1
        # Where the last passage was, NaN when its terminal is not located.
        self.last_latitude = NAN
        self.last_longitude = NAN
        self.transfer_ms = -1  # the last full-fare boarding at a transfer service
        self.cap_day = -1  # the day and month the cap totals are for
        self.cap_month = -1
        # Cents charged under each cap group: [day totals..., month totals...].
        self.cap_spent = array.array("q", [0] * (2 * CAP_GROUPS_MAX))
        # An open stay at a per-duration service: where, since when, and the
        # maximum charge taken at its entry (part of it returns at the exit).
        self.stay_service = -1
        self.stay_ms = -1
        self.stay_charged = 0


cdef inline int64_t _floor_div(int64_t a, int64_t b):
    """Python's floor division for a positive divisor."""
    cdef int64_t q = a // b
    if (a % b != 0) and (a < 0):
        q -= 1
    return q


cpdef int64_t month_of_day(int64_t day):
    """Calendar month number (year * 12 + month - 1) of a day since 1970-01-01.

    >>> month_of_day(0), month_of_day(31), month_of_day(20_422)
    (23640, 23641, 24310)
    """
    # Howard Hinnant's civil_from_days, integer-only.
    cdef int64_t z = day + 719468
    cdef int64_t era = _floor_div(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int64_t month = mp + 3 if mp < 10 else mp - 9
    cdef int64_t year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year * 12 + month - 1


cpdef bint show_id_sampled(int64_t card_uid, int64_t terminal_seq, int64_t permille):
    """Whether this tap is one of the ``permille`` sampled for an ID check.

    Deterministic (a retry gets the same answer) and spread evenly: a
    multiplicative hash of the card and the terminal's sequence.

    >>> show_id_sampled(0x04A1, 7, 1000), show_id_sampled(0x04A1, 7, 0)
    (True, False)
    """
    cdef uint64_t mixed = (((<uint64_t>card_uid) ^ (<uint64_t>terminal_seq))
                           * <uint64_t>2654435761) & <uint64_t>0xFFFFFFFF
    return <int64_t>(mixed % 1000) < permille


# Mean Earth radius, metres: the sharing check needs tens of metres, not
# geodesy.
EARTH_RADIUS_M = 6371000.0


cpdef double distance_m(double latitude_a, double longitude_a,
                        double latitude_b, double longitude_b):
    """Great-circle distance (haversine), metres.

    >>> round(distance_m(43.5453, -5.6615, 43.5322, -5.6611))
    1457
    """
    cdef double phi_a = latitude_a * M_PI / 180.0
    cdef double phi_b = latitude_b * M_PI / 180.0
    cdef double half_dphi = (phi_b - phi_a) / 2
    cdef double half_dlambda = (longitude_b - longitude_a) * M_PI / 180.0 / 2
    cdef double h = (sin(half_dphi) ** 2
                     + cos(phi_a) * cos(phi_b) * sin(half_dlambda) ** 2)
    return 2 * 6371000.0 * asin(min(1.0, sqrt(h)))


cdef bint _sharing_suspected(Activity activity, double latitude, double longitude,
                             int64_t recorded_ms, int64_t speed_kmh,
                             int64_t min_distance_m) except -1:
    """The card's last passage was at a located terminal farther from this
    one (at ``latitude``, ``longitude``) than can be travelled at the
    rules' speed in the time since."""
    if speed_kmh <= 0 or isnan(activity.last_latitude):  # off, or not located
        return False
    cdef double metres = distance_m(activity.last_latitude, activity.last_longitude,
                                    latitude, longitude)
    if metres < <double>min_distance_m:
        return False
    cdef int64_t elapsed_ms = recorded_ms - activity.last_ms
    # km/h -> metres per millisecond: speed * 1000 / 3_600_000.
    return metres * 3600 > speed_kmh * max(elapsed_ms, 0)


# --- The position index ------------------------------------------------------
#
# Card uid -> card position and account id -> account position. A dict of
# 340,000 (or 10 million) int keys costs a look-up about four cache misses:
# its index, its entry, the key object to compare, the value object to read.
# Here a key and its position sit side by side in one C array, open
# addressing with linear probing: a look-up reads one or two neighbouring
# slots of one cache line, and the ladder makes no Python int for it.

cdef struct _IndexSlot:
    int64_t key
    int64_t position  # -1: the slot is empty


# A table of 2**k slots is kept at most 3/4 full: about two slots read per
# hit with linear probing; 16 bytes a slot, so 10 million keys take 256 MiB
# of table (a dict and its int keys took about 900 MiB).
cdef enum:
    _INDEX_LOAD_NUM = 3
    _INDEX_LOAD_DEN = 4
    _INDEX_INITIAL_SLOTS = 16


cdef inline uint64_t _mix_key(int64_t key) noexcept nogil:
    """splitmix64's finaliser: keys issued in sequence, or sharing a
    manufacturer's prefix, spread over the whole table."""
    cdef uint64_t x = <uint64_t>key
    x ^= x >> 30
    x *= <uint64_t>0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= <uint64_t>0x94D049BB133111EB
    x ^= x >> 31
    return x


cdef _IndexSlot* _empty_slots(Py_ssize_t count) except NULL:
    cdef _IndexSlot* slots = <_IndexSlot*>PyMem_Malloc(count * sizeof(_IndexSlot))
    if slots == NULL:
        raise MemoryError(f"position index of {count} slots")
    cdef Py_ssize_t slot
    for slot in range(count):
        slots[slot].key = 0
        slots[slot].position = -1
    return slots


@cython.final
cdef class PositionIndex:
    """Key -> position (see the pure twin's for the contract): ``get``,
    ``[]``, ``in``, ``len`` and ``add_range``; nothing is ever removed."""

    cdef _IndexSlot* _slots
    cdef Py_ssize_t _mask  # slots - 1; slots is a power of two
    cdef Py_ssize_t _count

    def __cinit__(self):
        self._slots = _empty_slots(_INDEX_INITIAL_SLOTS)
        self._mask = _INDEX_INITIAL_SLOTS - 1
        self._count = 0

    def __dealloc__(self):
        PyMem_Free(self._slots)

    cdef inline int64_t find(self, int64_t key) noexcept:
        """The key's position, or -1 when the key is not there."""
        cdef _IndexSlot* slots = self._slots
        cdef Py_ssize_t mask = self._mask
        cdef Py_ssize_t slot = <Py_ssize_t>(_mix_key(key) & <uint64_t>mask)
        while slots[slot].position >= 0:
            if slots[slot].key == key:
                return slots[slot].position
            slot = (slot + 1) & mask
        return -1

    cdef int _reserve(self, Py_ssize_t keys) except -1:
        """Grow (rehash) so that ``keys`` keys fit under the load limit."""
        cdef Py_ssize_t size = self._mask + 1
        cdef Py_ssize_t wanted = size
        while keys * _INDEX_LOAD_DEN > wanted * _INDEX_LOAD_NUM:
            wanted *= 2
        if wanted == size:
            return 0
        cdef _IndexSlot* old = self._slots
        cdef _IndexSlot* slots = _empty_slots(wanted)
        cdef Py_ssize_t mask = wanted - 1
        cdef Py_ssize_t index, slot
        for index in range(size):
            if old[index].position >= 0:
                slot = <Py_ssize_t>(_mix_key(old[index].key) & <uint64_t>mask)
                while slots[slot].position >= 0:
                    slot = (slot + 1) & mask
                slots[slot] = old[index]
        self._slots = slots
        self._mask = mask
        PyMem_Free(old)
        return 0

    cdef int _put(self, int64_t key, int64_t position) except -1:
        """Store; 1 when the key is new, 0 when its position was replaced."""
        self._reserve(self._count + 1)
        cdef _IndexSlot* slots = self._slots
        cdef Py_ssize_t mask = self._mask
        cdef Py_ssize_t slot = <Py_ssize_t>(_mix_key(key) & <uint64_t>mask)
        while slots[slot].position >= 0:
            if slots[slot].key == key:
                slots[slot].position = position
                return 0
            slot = (slot + 1) & mask
        slots[slot].key = key
        slots[slot].position = position
        self._count += 1
        return 1

    def get(self, key, default=None):
        cdef int64_t packed
        try:
            packed = key
        except OverflowError:
            return default
        cdef int64_t position = self.find(packed)
        return default if position < 0 else position

    def __getitem__(self, key):
        cdef int64_t packed, position = -1
        try:
            packed = key
            position = self.find(packed)
        except OverflowError:
            pass
        if position < 0:
            raise KeyError(key)
        return position

    def __contains__(self, key):
        cdef int64_t packed
        try:
            packed = key
        except OverflowError:
            return False
        return self.find(packed) >= 0

    def positions(self, keys):
        """The position of each of ``keys``, as an array('q'); KeyError for
        the first key not there."""
        cdef array.array found = array.array("q")
        cdef int64_t[::1] packed
        cdef int64_t[::1] out
        cdef Py_ssize_t index
        cdef int64_t position
        if isinstance(keys, array.array) and keys.typecode == "q":
            # The load's path: typed keys, no Python int.
            packed = keys
            array.resize(found, packed.shape[0])
            out = found
            for index in range(packed.shape[0]):
                position = self.find(packed[index])
                if position < 0:
                    raise KeyError(packed[index])
                out[index] = position
            return found
        for key in keys:
            found.append(self[key])
        return found

    def __len__(self):
        return self._count

    def __setitem__(self, key, position):
        cdef int64_t packed, value
        try:
            packed = key
        except OverflowError:
            raise OverflowError(f"index key {key} is not an int64") from None
        try:
            value = position
        except OverflowError:
            value = -1
        if value < 0:
            raise OverflowError(f"index position {position} is not 0..2**63-1")
        self._put(packed, value)

    def add_range(self, keys, int64_t start):
        """Map ``keys`` to the positions start, start + 1, ...; returns how
        many were new (fewer than given: a key was there already, or twice)."""
        cdef int64_t[::1] packed
        cdef Py_ssize_t index, added = 0
        if start < 0:
            raise OverflowError(f"index position {start} is not 0..2**63-1")
        if isinstance(keys, array.array) and keys.typecode == "q":
            # The load's path: typed keys, one reservation, no Python int.
            packed = keys
            self._reserve(self._count + packed.shape[0])
            for index in range(packed.shape[0]):
                added += self._put(packed[index], start + index)
            return added
        cdef Py_ssize_t before = self._count
        for key in keys:
            self[key] = start
            start += 1
        return self._count - before


# --- The city's columns, checked once per use -------------------------------

cdef extern from "Python.h":
    # With a NULL exception an out-of-range int is clamped, not raised: the
    # clamped value fails the position check like any other bad index.
    Py_ssize_t PyNumber_AsSsize_t(object value, PyObject* exc) except? -1

# Where an empty column "points": never read, since no position passes the
# check against a size of 0, but not NULL, which would signal an error.
cdef long long _NO_CELLS[1]


cdef long long* _int64_column(object column, str name) except NULL:
    """The raw cells of an array('q') column of the city.

    Any other type would be read with the wrong cell size, hence the check.
    """
    if not isinstance(column, array.array) or (
            (<array.array>column).ob_descr.typecode != c'q'):
        raise TypeError(_column_type_text(column, name, "array('q')"))
    if Py_SIZE(column) == 0:
        return _NO_CELLS
    return (<array.array>column).data.as_longlongs


cdef int* _int32_column(object column, str name) except NULL:
    """The raw cells of an array('i') column of the city."""
    if not isinstance(column, array.array) or (
            (<array.array>column).ob_descr.typecode != c'i'):
        raise TypeError(_column_type_text(column, name, "array('i')"))
    if Py_SIZE(column) == 0:
        return <int*>_NO_CELLS
    return (<array.array>column).data.as_ints


cdef unsigned char* _byte_column(object column, str name) except NULL:
    """The raw cells of a bytearray column of the city."""
    if not isinstance(column, bytearray):
        raise TypeError(_column_type_text(column, name, "bytearray"))
    return <unsigned char*>PyByteArray_AS_STRING(column)


cdef str _column_type_text(object column, str name, str expected):
    if isinstance(column, array.array):
        return f"state.{name} must be {expected}, not array('{column.typecode}')"
    return f"state.{name} must be {expected}, not {type(column).__name__}"


cdef inline Py_ssize_t _check_index(
    long long position, Py_ssize_t size, str what,
) except -1:
    """The one index check of each access path: position must be a cell."""
    if position < 0 or position >= size:
        raise IndexError(
            f"{what} position {position} out of range for {size} {what}s")
    return <Py_ssize_t>position


cdef inline Py_ssize_t _check_position(
    object value, Py_ssize_t size, str what,
) except -1:
    """_check_index for a position held as a Python int (a dict value)."""
    cdef Py_ssize_t position = PyNumber_AsSsize_t(value, NULL)
    if position < 0 or position >= size:
        raise IndexError(
            f"{what} position {value} out of range for {size} {what}s")
    return position


cdef inline int64_t _find_card(state, int64_t uid) except? -2:
    """The card's position by ``state.card_position``, -1 when unknown.

    A PositionIndex is read in C. Any other mapping (the pure twin's, when the
    two are compared on one city) through ``get``: its values are ints of
    0..2**63-1, as both twins' indexes allow no others.
    """
    index = state.card_position
    if type(index) is PositionIndex:
        return (<PositionIndex>index).find(uid)
    found = index.get(uid)
    if found is None:
        return -1
    return PyNumber_AsSsize_t(found, NULL)


# --- The ladder --------------------------------------------------------------
#
# Each function reads what it needs from Python objects first (terminal
# fields, the card's position, the columns), then works on raw cells: from
# the first pointer to the last no Python code runs that could resize a
# column. The pure twin reads in the same order, so the two raise the same
# errors for the same broken input.

def decide_tap(state, terminal, Decision decision not None):
    """Decide a TAP in place: sets result, amount, balance, accounts and info.

    The ladder, in order (docs/rules.md): terminal, card, card status, clone
    (the card's counter), concession eligibility (the standard fare when it
    is not valid, a warning near its end), service, anti-passback, the fare
    (exit taps free, transfer discount, caps), minimum balance to enter, and
    funds down to the service's tolerated negative balance. Then the card's
    activity (counter, last tap, transfer start, cap totals) is updated.

    >>> decide_tap(state, state.terminals[7], decision)  # doctest: +SKIP
    """
    cdef Py_ssize_t card, account
    cdef unsigned char status, profile
    cdef int64_t available, fare, committed, pending, account_floor, day
    cdef int64_t eligible_from, eligible_until, counter
    cdef int64_t recorded_ms, minimum_balance, passback_ms, service, left
    cdef int64_t cap_group = NO_CAP
    cdef int64_t info = 0
    cdef bint exit_tap, transfer = False, starts_journey = False, per_duration = False
    cdef int64_t max_charge = 0, refund = 0, hours
    cdef int64_t product_group = NO_GROUP
    cdef Activity activity
    cdef Product product = None
    cdef long long* policy
    cdef long long* spent
    if not terminal.active:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    cdef int64_t found = _find_card(state, decision.card_uid)
    if found < 0:
        decision.result = RESULT_UNKNOWN_CARD
        return
    service_id = terminal.service_id
    cdef dict fares_by_service = state.fares
    decision.rules_version = state.rules_version
    card_account_column = state.card_account
    card_status_column = state.card_status
    card_profile_column = state.card_profile
    eligible_from_column = state.card_eligible_from
    eligible_until_column = state.card_eligible_until
    balance_column = state.balance
    pending_debit_column = state.pending_debit
    floor_column = state.floor
    cdef long long* card_account = _int64_column(card_account_column, "card_account")
    cdef unsigned char* card_status = _byte_column(card_status_column, "card_status")
    cdef unsigned char* card_profile = _byte_column(card_profile_column, "card_profile")
    cdef int* card_eligible_from = _int32_column(eligible_from_column, "card_eligible_from")
    cdef int* card_eligible_until = _int32_column(eligible_until_column, "card_eligible_until")
    # The settings array is never resized (a rules version installs a new
    # one), and this local keeps the one read alive: its pointer stays valid.
    settings_column = state.settings
    cdef long long* settings = _int64_column(settings_column, "settings")
    _check_index(SETTINGS_FIELDS - 1, Py_SIZE(settings_column), "setting")
    cdef long long* balance = _int64_column(balance_column, "balance")
    cdef long long* pending_debit = _int64_column(pending_debit_column, "pending_debit")
    cdef long long* floor = _int64_column(floor_column, "floor")
    card = _check_index(found, min(Py_SIZE(card_account_column), Py_SIZE(card_status_column),
                                   Py_SIZE(card_profile_column), Py_SIZE(eligible_from_column),
                                   Py_SIZE(eligible_until_column)), "card")
    # The card's cells, then its account's three, are read together:
    # they sit in different arrays of a city far larger than the caches, so
    # their misses overlap instead of queueing one behind the other.
    status = card_status[card]
    profile = card_profile[card]
    eligible_from = card_eligible_from[card]
    eligible_until = card_eligible_until[card]
    account = _check_index(card_account[card], min(Py_SIZE(balance_column), Py_SIZE(pending_debit_column),
                                                   Py_SIZE(floor_column)), "account")
    committed = balance[account]
    pending = pending_debit[account]
    account_floor = floor[account]
    decision.card_account = account
    available = committed - pending
    decision.balance = available
    if status != CARD_STATUS_ACTIVE:
        decision.result = RESULT_CARD_NOT_ACTIVE
        return
    cdef dict activities = state.activity
    found_activity = activities.get(card)
    counter = decision.card_counter
    if found_activity is not None:
        activity = found_activity
        if (counter != NO_COUNTER and activity.counter != NO_COUNTER
                and counter <= activity.counter):  # backwards, or the same count again
            decision.result = RESULT_CLONE_SUSPECTED
            if settings[SETTING_CLONE_BLOCKS_CARD]:
                # Python code ran since the pointers were taken: take it again.
                _byte_column(card_status_column, "card_status")[card] = CARD_STATUS_BLOCKED
            return
    recorded_ms = decision.recorded_ms
    if profile != STANDARD_PROFILE:
        # Floor division: record times are after 1970, never negative.
        day = recorded_ms // MS_PER_DAY
        if day < eligible_from or day > eligible_until:
            profile = STANDARD_PROFILE
            info |= INFO_CONCESSION_NOT_VALID
        elif eligible_until - day < settings[SETTING_RENEWAL_WINDOW_DAYS]:
            info |= INFO_RENEWAL_DUE
    decision.fare_profile = profile
    # A dict look-up by an int key runs no Python code.
    fares_row = fares_by_service[service_id]
    cdef long long* fares = _int64_column(fares_row, "fares row")
    fare = fares[_check_index(profile, Py_SIZE(fares_row), "profile")]
    if fare == NO_FARE:
        decision.info = info
        decision.result = RESULT_SERVICE_NOT_ALLOWED
        return
    if found_activity is None:
        activity = Activity()
        activities[card] = activity
    else:
        activity = found_activity
    if counter != NO_COUNTER:
        decision.previous_counter = activity.counter
        activity.counter = counter
    service = service_id
    policy_row = state.service_policy.get(service_id)
    exit_tap = (decision.tap_flags & TAP_FLAG_EXIT) != 0
    minimum_balance = 0
    if policy_row is not None:
        policy = _int64_column(policy_row, "policy row")
        _check_index(POLICY_FIELDS - 1, Py_SIZE(policy_row), "policy field")
        minimum_balance = policy[POLICY_MIN_BALANCE]
        # The account's floor is the hard limit (the schema's); a service
        # tolerates at most its own negative balance above it.
        account_floor = max(account_floor, -policy[POLICY_TOLERATED_NEGATIVE])
        passback_ms = policy[POLICY_PASSBACK_MS]
        if (passback_ms and not exit_tap and activity.last_service == service
                and recorded_ms - activity.last_ms < passback_ms):
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
    located = terminal.latitude
    cdef double latitude = NAN, longitude = NAN
    if located is not None:
        latitude = located
        longitude = terminal.longitude
    if (located is not None and activity.last_ms >= 0
            and activity.last_terminal != decision.terminal_id
            and _sharing_suspected(activity, latitude, longitude, recorded_ms,
                                   settings[SETTING_SHARING_MAX_SPEED_KMH],
                                   settings[SETTING_SHARING_MIN_DISTANCE_M])):
        info |= INFO_SHARING_SUSPECTED
        if profile != STANDARD_PROFILE:
            info |= INFO_SHOW_ID
    if profile != STANDARD_PROFILE and show_id_sampled(
            decision.card_uid, decision.terminal_seq, settings[SETTING_SHOW_ID_PERMILLE]):
        info |= INFO_SHOW_ID
    if exit_tap:
        if (per_duration and activity.stay_service == service
                and activity.stay_charged > 0):
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
        elif (transfer and activity.transfer_ms >= 0
                and recorded_ms - activity.transfer_ms <= settings[SETTING_TRANSFER_WINDOW_MS]):
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
    if (not exit_tap and minimum_balance > 0 and available < minimum_balance
            and product is None):
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
    activity.last_latitude = latitude
    activity.last_longitude = longitude
    activity.last_service = service
    if starts_journey:
        activity.transfer_ms = recorded_ms
    if per_duration:
        if not exit_tap:
            activity.stay_service = service
            activity.stay_ms = recorded_ms
            activity.stay_charged = fare
        elif activity.stay_service == service:
            decision.stay_ms = activity.stay_ms
            decision.stay_charged = activity.stay_charged
            activity.stay_service = -1
            activity.stay_ms = -1
            activity.stay_charged = 0
    if refund:
        # A credit, spendable once committed (like a refunded reversal).
        # Python code ran since the pointers were taken: take it again.
        pending_credit_column = state.pending_credit
        _check_index(account, Py_SIZE(pending_credit_column), "account")
        _int64_column(pending_credit_column, "pending_credit")[account] += refund
        decision.amount = refund
        decision.balance = available + refund
        decision.source = state.revenue_account[service_id]
        decision.target = account
        decision.ledger_kind = LEDGER_FARE
    if fare:
        if cap_group != NO_CAP:
            spent = _int64_column(activity.cap_spent, "cap_spent")
            _check_index(2 * CAP_GROUPS_MAX - 1, Py_SIZE(activity.cap_spent), "cap total")
            spent[cap_group] += fare
            spent[CAP_GROUPS_MAX + cap_group] += fare
            decision.cap_group = cap_group
        # Python code ran since the pointers were taken: take them again.
        pending_debit = _int64_column(pending_debit_column, "pending_debit")
        _check_index(account, Py_SIZE(pending_debit_column), "account")
        pending_debit[account] += fare
        decision.source = account
        decision.target = state.revenue_account[service_id]
        decision.ledger_kind = LEDGER_FARE


cdef int64_t _capped(state, Activity activity, int64_t group, int64_t recorded_ms,
                     int64_t fare) except? -1:
    """What is left of ``fare`` under the group's daily and monthly caps."""
    cdef Py_ssize_t index
    _check_index(group, CAP_GROUPS_MAX, "cap group")
    spent_column = activity.cap_spent
    cdef long long* spent = _int64_column(spent_column, "cap_spent")
    _check_index(2 * CAP_GROUPS_MAX - 1, Py_SIZE(spent_column), "cap total")
    cdef int64_t day = recorded_ms // MS_PER_DAY
    cdef int64_t month
    if activity.cap_day != day:
        activity.cap_day = day
        for index in range(CAP_GROUPS_MAX):
            spent[index] = 0
        month = month_of_day(day)
        if activity.cap_month != month:
            activity.cap_month = month
            for index in range(CAP_GROUPS_MAX, 2 * CAP_GROUPS_MAX):
                spent[index] = 0
    cdef int64_t left = fare
    daily_column = state.cap_daily
    monthly_column = state.cap_monthly
    cdef long long* daily = _int64_column(daily_column, "cap_daily")
    cdef long long* monthly = _int64_column(monthly_column, "cap_monthly")
    _check_index(group, min(Py_SIZE(daily_column), Py_SIZE(monthly_column)), "cap group")
    if daily[group] >= 0:
        left = min(left, max(daily[group] - spent[group], 0))
    if monthly[group] >= 0:
        left = min(left, max(monthly[group] - spent[CAP_GROUPS_MAX + group], 0))
    return left


def decide_topup(state, terminal, Decision decision not None):
    """Decide a TOPUP in place. The credit is spendable only once committed.

    >>> decide_topup(state, state.terminals[900], decision)  # doctest: +SKIP
    """
    cdef Py_ssize_t card, account
    cdef int64_t available, amount
    if not terminal.active or not terminal.is_kiosk:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    cdef int64_t found = _find_card(state, decision.card_uid)
    if found < 0:
        decision.result = RESULT_UNKNOWN_CARD
        return
    cdef int64_t funding_account = terminal.funding_account
    card_account_column = state.card_account
    card_status_column = state.card_status
    balance_column = state.balance
    pending_debit_column = state.pending_debit
    pending_credit_column = state.pending_credit
    ceiling_column = state.ceiling
    cdef long long* card_account = _int64_column(card_account_column, "card_account")
    cdef unsigned char* card_status = _byte_column(card_status_column, "card_status")
    cdef long long* balance = _int64_column(balance_column, "balance")
    cdef long long* pending_debit = _int64_column(pending_debit_column, "pending_debit")
    cdef long long* pending_credit = _int64_column(pending_credit_column, "pending_credit")
    cdef long long* ceiling = _int64_column(ceiling_column, "ceiling")
    card = _check_index(found, min(Py_SIZE(card_account_column), Py_SIZE(card_status_column)), "card")
    account = _check_index(card_account[card], min(Py_SIZE(balance_column), Py_SIZE(pending_debit_column),
                                                   Py_SIZE(pending_credit_column), Py_SIZE(ceiling_column)),
                           "account")
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
    state, terminal, Decision decision not None, Original original,
    bint already_reversed, int64_t window_ms,
):
    """Decide a REVERSAL of ``original`` (None when not found) in place.

    A refunded fare is a credit (spendable once committed); a reversed top-up
    is a debit and needs the money to still be there. A ride a multi-ride
    ticket paid is given back to the ticket, and the fare no longer counts
    towards the card's caps. An exit tap cannot be undone (it may have
    settled a stay), nor an entry at a per-duration service whose stay has
    ended; reversing an entry whose stay is open closes the stay.

    >>> decide_reversal(state, terminal, decision, None, False, 600_000)  # doctest: +SKIP
    """
    cdef Py_ssize_t account
    cdef int64_t available, amount, day, group = NO_CAP
    cdef Activity activity = None
    cdef Product product = None
    cdef bint closes_stay = False
    cdef long long* policy
    cdef long long* spent
    if not terminal.active:
        decision.result = RESULT_TERMINAL_NOT_ALLOWED
        return
    if original is None or original.kind == OPERATION_REVERSAL:
        decision.result = RESULT_ORIGINAL_NOT_FOUND
        return
    found = state.account_position[original.account_id]
    cdef int64_t funding_account = terminal.funding_account
    balance_column = state.balance
    pending_debit_column = state.pending_debit
    pending_credit_column = state.pending_credit
    floor_column = state.floor
    cdef long long* balance = _int64_column(balance_column, "balance")
    cdef long long* pending_debit = _int64_column(pending_debit_column, "pending_debit")
    cdef long long* pending_credit = _int64_column(pending_credit_column, "pending_credit")
    cdef long long* floor = _int64_column(floor_column, "floor")
    account = _check_position(found, min(Py_SIZE(balance_column), Py_SIZE(pending_debit_column),
                                         Py_SIZE(pending_credit_column), Py_SIZE(floor_column)), "account")
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
            _check_index(POLICY_FIELDS - 1, Py_SIZE(policy_row), "policy field")
            group = policy[POLICY_CAP_GROUP]
            if policy[POLICY_KIND] == SERVICE_PER_DURATION:
                if (activity is None or activity.stay_service != original.service_id
                        or activity.stay_ms != original.recorded_ms):
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
        if closes_stay:
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
            _check_index(group, CAP_GROUPS_MAX, "cap group")
            spent = _int64_column(activity.cap_spent, "cap_spent")
            _check_index(2 * CAP_GROUPS_MAX - 1, Py_SIZE(activity.cap_spent), "cap total")
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
# array literals (text, cast in SQL): "{1,2,3}". Formatting every integer here
# in C, into one growing buffer per column, replaces a str() per value and a
# join per column in Python, which at tens of thousands of taps a second was
# the engine's largest single cost.

cdef enum:
    # Characters of the longest int64 ("-9223372036854775808") plus its comma.
    _INT64_TEXT_MAX = 21


cdef class _ArrayLiteral:
    """An array literal under construction: '{', values, '}'."""

    cdef bytearray data
    cdef Py_ssize_t length
    cdef bint empty

    def __cinit__(self, Py_ssize_t values_expected):
        self.data = bytearray(values_expected * 8 + 16)
        (<char*>PyByteArray_AS_STRING(self.data))[0] = c'{'
        self.length = 1
        self.empty = True

    cdef char* _room(self, Py_ssize_t needed) except NULL:
        cdef Py_ssize_t size = PyByteArray_GET_SIZE(self.data)
        if self.length + needed > size:
            PyByteArray_Resize(self.data, 2 * size + needed)
        return <char*>PyByteArray_AS_STRING(self.data) + self.length

    cdef int add(self, int64_t value) except -1:
        cdef char* out = self._room(_INT64_TEXT_MAX)
        cdef char digits[20]
        cdef Py_ssize_t count = 0, written = 0
        # Work on the magnitude as unsigned so that INT64_MIN is no exception.
        cdef uint64_t magnitude = <uint64_t>value
        if not self.empty:
            out[written] = c','
            written += 1
        if value < 0:
            out[written] = c'-'
            written += 1
            magnitude = (~magnitude) + 1
        while True:
            digits[count] = <char>(c'0' + magnitude % 10)
            count += 1
            magnitude //= 10
            if magnitude == 0:
                break
        while count:
            count -= 1
            out[written] = digits[count]
            written += 1
        self.length += written
        self.empty = False
        return 0

    cdef int add_null(self) except -1:
        cdef char* out = self._room(5)
        cdef Py_ssize_t written = 0
        if not self.empty:
            out[0] = c','
            written = 1
        memcpy(out + written, b"NULL", 4)
        self.length += written + 4
        self.empty = False
        return 0

    cdef str finish(self):
        cdef char* out = self._room(1)
        out[0] = c'}'
        return PyUnicode_DecodeASCII(
            <char*>PyByteArray_AS_STRING(self.data), self.length + 1, NULL)


cdef str _literal(list values):
    cdef _ArrayLiteral literal = _ArrayLiteral(len(values))
    for value in values:
        literal.add(value)
    return literal.finish()


def encode_batch(batch_id, list batch not None, account_ids,
                 transfers_per_batch):
    """The commit statement's 33 arguments for one batch.

    Per decision, one row of the tap record (21 columns, the last one
    after the ledger's and the tickets' arrays). Per account, the
    sum of its movements (each account updated once, in id order). Per
    (ledger kind, service), one transfer whose entries are the per-account
    sums. Transfer ids are ``batch_id * transfers_per_batch + k``. Per
    multi-ride ticket, the rides used (or given back) in the batch.

    >>> encode_batch(1, [], array.array('q'), 1024)[2]
    '{}'
    """
    cdef long long* ids = _int64_column(account_ids, "account_id")
    cdef Py_ssize_t accounts = Py_SIZE(account_ids)
    cdef Py_ssize_t n = len(batch)
    cdef _ArrayLiteral terminal_ids = _ArrayLiteral(n)
    cdef _ArrayLiteral seqs = _ArrayLiteral(n)
    cdef _ArrayLiteral kinds = _ArrayLiteral(n)
    cdef _ArrayLiteral uids = _ArrayLiteral(n)
    cdef _ArrayLiteral counters = _ArrayLiteral(n)
    cdef _ArrayLiteral flags = _ArrayLiteral(n)
    cdef _ArrayLiteral requested = _ArrayLiteral(n)
    cdef _ArrayLiteral originals = _ArrayLiteral(n)
    cdef _ArrayLiteral event_ms = _ArrayLiteral(n)
    cdef _ArrayLiteral recorded_ms = _ArrayLiteral(n)
    cdef _ArrayLiteral results = _ArrayLiteral(n)
    cdef _ArrayLiteral amounts = _ArrayLiteral(n)
    cdef _ArrayLiteral balances = _ArrayLiteral(n)
    cdef _ArrayLiteral services = _ArrayLiteral(n)
    cdef _ArrayLiteral card_accounts = _ArrayLiteral(n)
    cdef _ArrayLiteral infos = _ArrayLiteral(n)
    cdef _ArrayLiteral fare_profiles = _ArrayLiteral(n)
    cdef _ArrayLiteral rules_versions = _ArrayLiteral(n)
    cdef _ArrayLiteral product_ids = _ArrayLiteral(n)
    cdef _ArrayLiteral original_terminals = _ArrayLiteral(n)
    cdef _ArrayLiteral online_results = _ArrayLiteral(n)
    cdef dict rides = {}
    cdef dict deltas = {}
    cdef dict transfers = {}
    cdef dict entries
    cdef Decision d
    cdef int64_t amount
    for item in batch:
        d = item
        terminal_ids.add(d.terminal_id)
        seqs.add(d.terminal_seq)
        kinds.add(d.kind)
        uids.add(d.card_uid)
        counters.add(d.card_counter)
        flags.add(d.tap_flags)
        requested.add(d.requested)
        if d.original_seq is None:
            originals.add_null()
        else:
            originals.add(d.original_seq)
        event_ms.add(d.event_time_ms)
        recorded_ms.add(d.recorded_ms)
        results.add(d.result)
        amounts.add(d.amount)
        balances.add(d.balance)
        services.add(d.service_id)
        if d.card_account == NO_ACCOUNT:
            card_accounts.add_null()
        else:
            card_accounts.add(ids[_check_index(d.card_account, accounts, "account")])
        infos.add(d.info)
        if d.fare_profile == NO_PROFILE:
            fare_profiles.add_null()
        else:
            fare_profiles.add(d.fare_profile)
        rules_versions.add(d.rules_version)
        if d.product_id == NO_PRODUCT:
            product_ids.add_null()
        else:
            product_ids.add(d.product_id)
        if d.kind == OPERATION_REVERSAL and d.original_terminal != d.terminal_id:
            original_terminals.add(d.original_terminal)
        else:
            original_terminals.add_null()
        if d.online_result == NO_RESULT:
            online_results.add_null()
        else:
            online_results.add(d.online_result)
        if d.product_rides and d.result == RESULT_APPROVED:
            rides[d.product_id] = rides.get(d.product_id, 0) + d.product_rides
        amount = d.amount
        if amount != 0 and d.result == RESULT_APPROVED:
            _check_index(d.source, accounts, "account")
            _check_index(d.target, accounts, "account")
            deltas[d.source] = deltas.get(d.source, 0) - amount
            deltas[d.target] = deltas.get(d.target, 0) + amount
            key = (d.ledger_kind, d.service_id)
            entries = transfers.get(key)
            if entries is None:
                entries = transfers[key] = {}
            entries[d.source] = entries.get(d.source, 0) - amount
            entries[d.target] = entries.get(d.target, 0) + amount
    ride_items = sorted([item for item in rides.items() if item[1]])
    return _finish_batch(
        batch_id, n, ids, deltas, transfers, transfers_per_batch,
        (terminal_ids.finish(), seqs.finish(), kinds.finish(), uids.finish(),
         counters.finish(), flags.finish(), requested.finish(),
         originals.finish(), event_ms.finish(), recorded_ms.finish(),
         results.finish(), amounts.finish(), balances.finish(),
         services.finish(), card_accounts.finish(), infos.finish(),
         fare_profiles.finish(), rules_versions.finish(),
         product_ids.finish(), original_terminals.finish())) + (
        _literal([item[0] for item in ride_items]),
        _literal([item[1] for item in ride_items]),
        online_results.finish(),
    )


cdef tuple _finish_batch(batch_id, Py_ssize_t n, long long* ids, dict deltas,
                         dict transfers, transfers_per_batch, tuple columns):
    # Each account once, in id order: a stable lock order for the UPDATE.
    delta_items = sorted(
        [(ids[<Py_ssize_t>p], delta) for p, delta in deltas.items() if delta])
    transfer_ids = []
    transfer_kinds = []
    transfer_services = []
    entry_transfers = []
    entry_accounts = []
    entry_amounts = []
    for number, ((kind, service), entries) in enumerate(sorted(transfers.items())):
        nonzero = [(ids[<Py_ssize_t>p], cents)
                   for p, cents in (<dict>entries).items() if cents]
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
    return (batch_id, n) + columns + (
        _literal([item[0] for item in delta_items]),
        _literal([item[1] for item in delta_items]),
        _literal(transfer_ids),
        _literal(transfer_kinds),
        _literal(transfer_services),
        _literal(entry_transfers),
        _literal(entry_accounts),
        _literal(entry_amounts),
    )
