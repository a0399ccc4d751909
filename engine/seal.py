"""Sealed frames: every frame of an open session authenticated, both ways.

After the handshake each frame carries a counter and a tag after its body
(docs/protocol.md, "Sealed frames")::

    length | version | type | flags = SEALED | request_id | body | counter u64 | tag (16 bytes)
    tag = HMAC-SHA256(direction key, version | type | flags | request_id | body | counter)[:16]

The two direction keys are derived anew for every connection from the
terminal key and both handshake nonces (HKDF-SHA256, RFC 5869), so a frame
sealed in one direction never verifies in the other (a reflected frame
fails) nor in another session (a frame replayed from an earlier connection
fails). Each direction's counter starts at 0 and grows by exactly 1 per
frame: a replayed, reordered or dropped frame fails too.

The bytes are the codec's: ``FrameReader`` holds a sealed frame to its
sizes and hands its body back with the trailer, ``SealKey`` computes and
checks tags. This module holds what is per connection: the keys and the
counters.

>>> keys = derive_session_keys(bytes(32), 7, 1, bytes(16), bytes(16))
>>> sealed = Sealer(keys.terminal_to_engine).seal(fastpath.encode_ping(1, 42))
>>> len(sealed) - len(fastpath.encode_ping(1, 42))
24
>>> fastpath.decode_ping(Opener(keys.terminal_to_engine).open(fastpath.MSG_PING, 1, sealed[12:]))
42
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field

from engine import fastpath
from engine.limits import NONCE_BYTES

# HKDF "info" labels, one per direction: the same terminal key and nonces
# give two unrelated keys.
TERMINAL_TO_ENGINE_LABEL = b"citycard/v1/seal/terminal-to-engine"
ENGINE_TO_TERMINAL_LABEL = b"citycard/v1/seal/engine-to-terminal"

# Why an open session refused a frame: the label values of
# citycard_frames_rejected_total.
REJECTED_BAD_TAG = "bad_tag"  # altered, forged, or sealed for the other direction or another session
REJECTED_BAD_COUNTER = "bad_counter"  # replayed, reordered or lost
REJECTED_NOT_SEALED = "not_sealed"  # flags other than SEALED after the handshake
REJECTED_REASONS = (REJECTED_BAD_TAG, REJECTED_BAD_COUNTER, REJECTED_NOT_SEALED)

SESSION_KEY_BYTES = 32  # one SHA-256 output: the HMAC key size that gains nothing by growing

_SHA256_BYTES = 32
_HKDF_BLOCKS_MAX = 255  # RFC 5869: L <= 255 * HashLen

_INFO_TAIL = struct.Struct(">IH")  # terminal_id, key_version


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = SESSION_KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``info``.

    RFC 5869's first test case:

    >>> hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42).hex()[:16]
    '3cb25f25faacd57a'
    """
    if not 0 < length <= _HKDF_BLOCKS_MAX * _SHA256_BYTES:
        raise ValueError(f"length must be 1..{_HKDF_BLOCKS_MAX * _SHA256_BYTES}, got {length}")
    prk = hmac.digest(salt or bytes(_SHA256_BYTES), ikm, "sha256")
    output = b""
    block = b""
    number = 1
    while len(output) < length:
        block = hmac.digest(prk, block + info + bytes([number]), "sha256")
        output += block
        number += 1
    return output[:length]


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The two keys of one connection; never printed (``repr`` hides them)."""

    terminal_to_engine: bytes = field(repr=False)
    engine_to_terminal: bytes = field(repr=False)


def derive_session_keys(
    terminal_key: bytes, terminal_id: int, key_version: int, client_nonce: bytes, server_nonce: bytes
) -> SessionKeys:
    """The keys that seal one session's frames, from its handshake.

    ``salt = client_nonce || server_nonce``; ``info = label || terminal_id
    (u32) || key_version (u16)``, one label per direction.
    """
    if len(client_nonce) != NONCE_BYTES or len(server_nonce) != NONCE_BYTES:
        raise ValueError(f"nonces must be {NONCE_BYTES} bytes")
    salt = bytes(client_nonce) + bytes(server_nonce)
    tail = _INFO_TAIL.pack(terminal_id, key_version)
    return SessionKeys(
        terminal_to_engine=hkdf_sha256(terminal_key, salt, TERMINAL_TO_ENGINE_LABEL + tail),
        engine_to_terminal=hkdf_sha256(terminal_key, salt, ENGINE_TO_TERMINAL_LABEL + tail),
    )


class Sealer:
    """Seals the frames one side sends: counter 0, 1, 2, ... and a tag each.

    ``seal()`` takes a whole frame as the codec's encoders make it (flags 0)
    and returns it sealed. Seal frames in the order they are written.
    """

    __slots__ = ("_counter", "_key")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        self._key = fastpath.SealKey(key)
        self._counter = counter

    @property
    def counter(self) -> int:
        """The counter the next sealed frame carries."""
        return self._counter

    def seal(self, frame: bytes) -> bytes:
        counter = self._counter
        sealed: bytes = self._key.seal(frame, counter)
        self._counter = counter + 1
        return sealed


class Opener:
    """Checks and strips the seal of the frames one side receives.

    ``open()`` takes a frame as a sealed ``FrameReader`` delivers it (body
    and trailer) and returns the body, or raises the codec's ProtocolError:
    BAD_TAG when the tag does not verify (altered, forged, or sealed for the
    other direction or another session), BAD_COUNTER when it does but the
    counter is not the one expected (replayed, reordered or lost).
    """

    __slots__ = ("_counter", "_key")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        self._key = fastpath.SealKey(key)
        self._counter = counter

    @property
    def counter(self) -> int:
        """The counter the next frame must carry."""
        return self._counter

    def open(self, msg_type: int, request_id: int, body: bytes) -> bytes:
        counter = self._counter
        opened: bytes = self._key.open(msg_type, request_id, body, counter)
        self._counter = counter + 1
        return opened
