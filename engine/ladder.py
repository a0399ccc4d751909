"""The decision ladder: one synchronous function per request kind.

Each function walks an ordered ladder of guards, each returning a result
code, in the precedence order of ``engine.codes.ResultCode``. After the last
guard the request must succeed: the only state it changes is the card's
pending amount, which the batch writer turns into a committed balance or
undoes.

No database, no I/O: everything needed is in the CityState. Rules added
later (passes, transfers, caps, concessions) are further rungs here.
"""

from __future__ import annotations

from engine.codes import CardStatus, OperationKind, ResultCode
from engine.decision import LEDGER_FARE, LEDGER_REVERSAL, LEDGER_TOPUP, Decision
from engine.limits import TOPUP_MAX_CENTS
from engine.state import NO_FARE, CityState, Terminal

# TAP flag bits (docs/protocol.md): bit 0 marks an exit tap; the rest are reserved.
TAP_FLAG_EXIT = 0x01
TAP_FLAGS_KNOWN = TAP_FLAG_EXIT

_APPROVED = ResultCode.APPROVED
_ACTIVE = CardStatus.ACTIVE


def decide_tap(state: CityState, terminal: Terminal, decision: Decision) -> None:
    """Decide a TAP in place: sets result, amount, balance and accounts.

    An exit tap records the passage and charges nothing: with per-use fares
    the entry already paid.
    """
    if not terminal.active:
        decision.result = ResultCode.TERMINAL_NOT_ALLOWED
        return
    card = state.card_position.get(decision.card_uid)
    if card is None:
        decision.result = ResultCode.UNKNOWN_CARD
        return
    account = state.card_account[card]
    decision.card_account = account
    available = state.balance[account] - state.pending_debit[account]
    decision.balance = available
    if state.card_status[card] != _ACTIVE:
        decision.result = ResultCode.CARD_NOT_ACTIVE
        return
    fare = state.fares[terminal.service_id][state.card_profile[card]]
    if fare == NO_FARE:
        decision.result = ResultCode.SERVICE_NOT_ALLOWED
        return
    if decision.tap_flags & TAP_FLAG_EXIT:
        fare = 0
    if available - fare < state.floor[account]:
        decision.result = ResultCode.INSUFFICIENT_FUNDS
        return
    # After this point the tap must succeed.
    decision.result = _APPROVED
    decision.amount = fare
    decision.balance = available - fare
    if fare:
        state.pending_debit[account] += fare
        decision.source = account
        decision.target = state.revenue_account[terminal.service_id]
        decision.ledger_kind = LEDGER_FARE


def decide_topup(state: CityState, terminal: Terminal, decision: Decision) -> None:
    """Decide a TOPUP in place. The credit is spendable only once committed."""
    if not terminal.active or not terminal.is_kiosk:
        decision.result = ResultCode.TERMINAL_NOT_ALLOWED
        return
    card = state.card_position.get(decision.card_uid)
    if card is None:
        decision.result = ResultCode.UNKNOWN_CARD
        return
    account = state.card_account[card]
    decision.card_account = account
    available = state.balance[account] - state.pending_debit[account]
    decision.balance = available
    if state.card_status[card] != _ACTIVE:
        decision.result = ResultCode.CARD_NOT_ACTIVE
        return
    amount = decision.requested
    if amount < 1 or amount > TOPUP_MAX_CENTS:
        decision.result = ResultCode.INVALID_AMOUNT
        return
    # Pending credits count against the ceiling: two top-ups in one batch
    # must not together pass it.
    if state.balance[account] + state.pending_credit[account] + amount > state.ceiling[account]:
        decision.result = ResultCode.BALANCE_LIMIT
        return
    # After this point the top-up must succeed.
    decision.result = _APPROVED
    decision.amount = amount
    decision.balance = available + amount
    state.pending_credit[account] += amount
    decision.source = terminal.funding_account
    decision.target = account
    decision.ledger_kind = LEDGER_TOPUP


class Original:
    """The approved request a REVERSAL names, as read from the record."""

    __slots__ = ("kind", "card_uid", "amount", "account_id", "recorded_ms", "service_id")

    def __init__(
        self, kind: int, card_uid: int, amount: int, account_id: int, recorded_ms: int, service_id: int
    ) -> None:
        self.kind = kind
        self.card_uid = card_uid
        self.amount = amount
        self.account_id = account_id
        self.recorded_ms = recorded_ms
        self.service_id = service_id


def decide_reversal(
    state: CityState,
    terminal: Terminal,
    decision: Decision,
    original: Original | None,
    already_reversed: bool,
    window_ms: int,
) -> None:
    """Decide a REVERSAL of ``original`` (None when not found) in place.

    A refunded fare is a credit (spendable once committed); a reversed top-up
    is a debit and needs the money to still be there.
    """
    if not terminal.active:
        decision.result = ResultCode.TERMINAL_NOT_ALLOWED
        return
    if original is None or original.kind == OperationKind.REVERSAL:
        decision.result = ResultCode.ORIGINAL_NOT_FOUND
        return
    account = state.account_position[original.account_id]
    decision.card_account = account
    # The record names the card whose money moves; the request had no card.
    decision.card_uid = original.card_uid
    available = state.balance[account] - state.pending_debit[account]
    decision.balance = available
    if decision.recorded_ms - original.recorded_ms > window_ms:
        decision.result = ResultCode.REVERSAL_WINDOW_EXPIRED
        return
    if already_reversed:
        decision.result = ResultCode.ALREADY_REVERSED
        return
    amount = original.amount
    if original.kind == OperationKind.TOPUP:
        if available - amount < state.floor[account]:
            decision.result = ResultCode.INSUFFICIENT_FUNDS
            return
        # After this point the reversal must succeed.
        state.pending_debit[account] += amount
        decision.source = account
        decision.target = terminal.funding_account if terminal.funding_account >= 0 else -1
        decision.balance = available - amount
    else:
        # After this point the reversal must succeed.
        state.pending_credit[account] += amount
        decision.source = state.revenue_account[original.service_id]
        decision.target = account
        decision.balance = available + amount
    decision.result = _APPROVED
    decision.amount = amount
    decision.ledger_kind = LEDGER_REVERSAL
