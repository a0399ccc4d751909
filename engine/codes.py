"""Numbers that cross the wire: message types, result codes and error codes.

These are the public names of the protocol (see ``docs/protocol.md``). The
compiled fast path and its pure twin carry the same numbers as module
constants; ``tests/test_codec.py`` checks that the three never drift apart.

Result codes 16..25 are ordered by precedence: when several declines apply to
one request, the lowest code wins, exactly as the decision ladder checks them.
The city-card rule codes (26..) were added later; the ladder checks them in
the order docs/protocol.md gives.
"""

from __future__ import annotations

import enum


class MessageType(enum.IntEnum):
    """The ``type`` byte of a frame header."""

    HELLO = 0x01  # terminal -> engine: who I am, my nonce
    CHALLENGE = 0x02  # engine -> terminal: the engine's nonce
    AUTH = 0x03  # terminal -> engine: proof of the terminal key
    AUTH_OK = 0x04  # engine -> terminal: proof of the engine, session open
    TAP = 0x10  # terminal -> engine: a card tap
    TOPUP = 0x11  # kiosk -> engine: add stored value to a card
    REVERSAL = 0x12  # terminal -> engine: cancel an earlier approved request
    TAP_RESULT = 0x13  # engine -> terminal: the outcome of TAP, TOPUP or REVERSAL
    PING = 0x20  # either side: keep-alive / echo request
    PONG = 0x21  # reply to PING, same payload
    HOTLIST_REQUEST = 0x30  # terminal -> engine: the hot list's changes since a version
    HOTLIST = 0x31  # engine -> terminal: one signed page of the hot list
    RULES_REQUEST = 0x32  # terminal -> engine: the rules of its service, for deciding offline
    RULES = 0x33  # engine -> terminal: one rules version for one service, signed
    NOTICE = 0x34  # engine -> terminal, unasked: the hot list or the rules changed
    OFFLINE_UPLOAD = 0x40  # terminal -> engine: taps it decided while offline
    OFFLINE_RESULT = 0x41  # engine -> terminal: the recorded answer to each uploaded tap
    ERROR = 0x7F  # engine -> terminal: protocol fault, the connection closes after it


class ResultCode(enum.IntEnum):
    """The outcome of a TAP, TOPUP or REVERSAL, carried in TAP_RESULT.

    0 is approval. 16..63 are final declines (retrying changes nothing until
    the card, account or rules change). 64 and above are not decisions about
    the card: the terminal acts on them as documented per code.
    """

    APPROVED = 0

    # Final declines, in the order the decision ladder checks them.
    TERMINAL_NOT_ALLOWED = 16  # terminal inactive, or this operation is not for its kind
    UNKNOWN_CARD = 17  # no card with this uid
    CARD_NOT_ACTIVE = 18  # blocked, lost, stolen, expired or replaced
    SERVICE_NOT_ALLOWED = 19  # no tariff for this card's profile at this service
    INVALID_AMOUNT = 20  # top-up amount outside the allowed range
    BALANCE_LIMIT = 21  # the top-up would take the balance above its ceiling
    ORIGINAL_NOT_FOUND = 22  # reversal names a sequence this terminal never had approved
    REVERSAL_WINDOW_EXPIRED = 23  # reversal arrived too late
    ALREADY_REVERSED = 24  # the original was already reversed
    INSUFFICIENT_FUNDS = 25  # available balance minus fare would go below the floor
    # City-card rules (docs/rules.md). Numbered after the codes above; where
    # each is checked in the ladder is documented in docs/protocol.md.
    CLONE_SUSPECTED = 26  # the card's transaction counter went backwards or repeated
    ALREADY_VALIDATED = 27  # anti-passback: this card passed this gate service moments ago
    MINIMUM_BALANCE = 28  # the service asks for a minimum balance to enter
    NOT_REVERSIBLE = 29  # the original cannot be undone: a stay's exit, or an entry whose stay has ended

    # Not decisions about the card.
    BUSY_RETRY = 64  # not decided: retry later with the SAME sequence number
    SEQUENCE_REUSED = 65  # this sequence was used before with different content
    PROTOCOL_ERROR = 66  # the request was well framed but not valid (e.g. bad field)

    @property
    def is_final(self) -> bool:
        """True when retrying the same request cannot change the outcome."""
        return self < ResultCode.BUSY_RETRY


class ErrorCode(enum.IntEnum):
    """The ``code`` byte of an ERROR frame. Every ERROR ends the connection."""

    FRAME_TOO_LARGE = 1  # length prefix above MAX_FRAME_BYTES
    FRAME_TOO_SHORT = 2  # length prefix below the header size
    UNSUPPORTED_VERSION = 3  # header version is not 1
    UNKNOWN_TYPE = 4  # type byte is not a known message type
    BAD_BODY_LENGTH = 5  # body length does not match the message type
    BAD_FLAGS = 6  # reserved flag bits set
    NOT_AUTHENTICATED = 7  # a request arrived before the session was open
    AUTH_FAILED = 8  # unknown or inactive terminal, or a wrong proof
    UNEXPECTED_MESSAGE = 9  # a valid message at the wrong moment (e.g. HELLO twice)
    HANDSHAKE_TIMEOUT = 10  # the session was not open within the handshake deadline
    IDLE_TIMEOUT = 11  # nothing received within the idle deadline
    TOO_MANY_IN_FLIGHT = 12  # more unanswered requests than the per-connection limit
    SHUTTING_DOWN = 13  # the engine is stopping; reconnect later
    INTERNAL = 14  # a bug in the engine; the incident is logged
    BAD_FIELD = 15  # a field holds a value the protocol forbids
    TOO_MANY_CONNECTIONS = 16  # the engine is at its connection limit; reconnect later
    BAD_TAG = 17  # a sealed frame's tag does not verify: altered, forged or reflected
    BAD_COUNTER = 18  # a sealed frame's counter is not the previous one plus 1: replayed, reordered or lost


class FrameFlag(enum.IntFlag):
    """Bits of a frame header's ``flags`` field."""

    NONE = 0
    SEALED = 0x0001  # a counter and a tag follow the body; set on every frame after the handshake


class CardStatus(enum.IntEnum):
    """Card lifecycle, stored in ``cards.status``."""

    ACTIVE = 0
    BLOCKED = 1
    LOST = 2
    STOLEN = 3
    REPLACED = 4
    EXPIRED = 5


class TerminalKind(enum.IntEnum):
    """What a terminal may send. Stored in ``terminals.kind``."""

    VALIDATOR = 0  # bus validators and gates: TAP, REVERSAL
    KIOSK = 1  # kiosks and ATMs: TAP, TOPUP, REVERSAL


class OperationKind(enum.IntEnum):
    """The request a tap record answers. Stored in ``taps.kind``."""

    TAP = 0
    TOPUP = 1
    REVERSAL = 2


class ProductKind(enum.IntEnum):
    """A pass or ticket, stored in ``card_products.kind``; the names, lowercased,
    are the rules file's ``kind`` values."""

    SEASON = 0  # every tap at its group, from its first day to its last
    MULTI_RIDE = 1  # a number of taps at its group, no end date

    @property
    def code(self) -> str:
        """The rules file's name for it: "season" or "multi_ride"."""
        return self.name.lower()


class ServiceKind(enum.IntEnum):
    """How a service charges. Stored in ``services.kind``, set by the rules file."""

    PER_USE = 0  # one fare per entry tap
    PER_DURATION = 1  # entry takes a hold, exit settles it (a maximum when the exit is missing)
    IDENTIFICATION = 2  # nothing debited: the tap records an access


class TapInfo(enum.IntFlag):
    """Why a decision came out as it did, beyond its result code.

    Stored in ``taps.info``; bits only grow, a bit's meaning never changes.
    """

    NONE = 0
    CONCESSION_NOT_VALID = 0x01  # the holder's concession was not valid at the tap: standard fare
    RENEWAL_DUE = 0x02  # the concession ends within the renewal window: ask the holder to renew
    SHOW_ID = 0x04  # concession tap selected for inspection: the holder shows an ID
    TRANSFER = 0x08  # a change of bus within the transfer window
    CAPPED = 0x10  # the fare was reduced to what is left under a daily or monthly cap
    PASS_USED = 0x20  # a season pass or multi-ride ticket paid this tap
    SHARING_SUSPECTED = 0x40  # the card was used too far away too soon
    REFUNDED = 0x80  # an exit settled a stay: the amount went back to the card
    OFFLINE = 0x100  # decided by its terminal while offline, uploaded later
    OFFLINE_DIFFERS = 0x200  # offline: the engine's own ladder would have decided otherwise


class HotlistReason(enum.IntEnum):
    """Why a card is on the hot list (HOTLIST entries, ``hotlist_changes.reason``).

    The card statuses that keep a card out, plus a block the engine made on
    a suspected clone; 0 is a card that left the list (usable again).
    """

    DELISTED = 0
    BLOCKED = 1
    LOST = 2
    STOLEN = 3
    REPLACED = 4
    EXPIRED = 5
    CLONE_SUSPECTED = 6
