"""What the engine decided about one request, on its way to the database.

A Decision is made synchronously by the decision ladder, travels through the
batch writer, and is answered to every waiting terminal once its batch is
durable (or undone when the batch fails). Every decision that moves money is
one transfer of ``amount`` cents from a ``source`` account to a ``target``
account; the card's side of it is held as pending until the commit:

- a fare:            card    -> revenue   (card's pending debit)
- a top-up:          funding -> card      (card's pending credit)
- a fare refunded:   revenue -> card      (card's pending credit)
- a top-up reversed: card    -> funding   (card's pending debit)
"""

from __future__ import annotations

from typing import Protocol

from engine.codes import OperationKind


class ReplyTarget(Protocol):
    """Where a result goes: a terminal session (or a test)."""

    def deliver_result(self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int) -> None: ...


# Ledger transfer kinds (schema: ledger_transfers.kind).
LEDGER_FARE = 0
LEDGER_TOPUP = 1
LEDGER_REVERSAL = 2
LEDGER_OPENING = 3

NO_ACCOUNT = -1


class Decision:
    """One decided TAP, TOPUP or REVERSAL, pending until its batch commits."""

    __slots__ = (
        "terminal_id",
        "terminal_seq",
        "kind",
        "card_uid",
        "card_counter",
        "tap_flags",
        "requested",
        "original_seq",
        "event_time_ms",
        "recorded_ms",
        "service_id",
        "result",
        "amount",
        "balance",
        "card_account",
        "source",
        "target",
        "ledger_kind",
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
        # (target, request_id) pairs waiting for this decision's reply.
        self.waiters: list[tuple[ReplyTarget, int]] = []

    def fingerprint(self) -> tuple[int, int, int, int, int, int, int | None]:
        """The request's content: a retry must match it exactly.

        A REVERSAL carries no card on the wire (its record names the card of
        the original), so its card does not take part.
        """
        return (
            self.kind,
            0 if self.kind == OperationKind.REVERSAL else self.card_uid,
            self.card_counter,
            self.tap_flags,
            self.requested,
            self.event_time_ms,
            self.original_seq,
        )

    @property
    def moves_money(self) -> bool:
        return self.amount > 0

    def __repr__(self) -> str:
        return (
            f"Decision({OperationKind(self.kind).name} terminal={self.terminal_id} seq={self.terminal_seq}"
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
) -> tuple[int, int, int, int, int, int, int | None]:
    """Same layout as Decision.fingerprint, for an incoming request."""
    return (kind, card_uid, card_counter, tap_flags, requested, event_time_ms, original_seq)
