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

The record itself lives in the per-tap decision fast path
(``engine/_fastpath.pyx``, twin ``engine/_fastpath_py.py``) and is
re-exported here from ``engine.fastpath``, which picks the twin.
"""

from __future__ import annotations

from typing import Protocol

from engine.fastpath import (
    LEDGER_FARE,
    LEDGER_OPENING,
    LEDGER_REVERSAL,
    LEDGER_TOPUP,
    NO_ACCOUNT,
    Decision,
    request_fingerprint,
)


class ReplyTarget(Protocol):
    """Where a result goes: a terminal session (or a test)."""

    def deliver_result(
        self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int, info: int
    ) -> None: ...


__all__ = [
    "LEDGER_FARE",
    "LEDGER_OPENING",
    "LEDGER_REVERSAL",
    "LEDGER_TOPUP",
    "NO_ACCOUNT",
    "Decision",
    "ReplyTarget",
    "request_fingerprint",
]
