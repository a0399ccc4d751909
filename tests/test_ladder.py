"""The decision ladder on a hand-built city, run against both twins.

Every test takes the ``fp`` fixture (``engine._fastpath`` or
``engine._fastpath_py``) and decides requests with ``fp.decide_*`` on a
fresh ``CityState``, so the compiled and the pure ladder are held to the same
table. The figures are small enough to check by hand:

- BUS fares 150 (standard) and 75 (student); LIBRARY charges 0 and does not
  serve students.
- Cards: RICH 1000, STUDENT 500, POOR 100, BLOCKED 1000, DEBT (100 with a
  floor of -100), NEAR_CEILING 99_000 (ceiling 100_000).
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import decision as decision_module
from engine import fastpath, ladder, limits
from engine import state as state_module
from engine.codes import CardStatus, OperationKind, ResultCode, TapInfo, TerminalKind
from engine.state import CityState, Terminal
from tests.twins import load_twin

R = ResultCode
TAP, TOPUP, REVERSAL = OperationKind.TAP, OperationKind.TOPUP, OperationKind.REVERSAL


@pytest.fixture(scope="module")
def twins() -> tuple[ModuleType, ModuleType]:
    return load_twin("cython"), load_twin("pure")


# --- The city ------------------------------------------------------------------

STANDARD, STUDENT_PROFILE = 0, 1
BUS, LIBRARY, KIOSK_SERVICE = 1, 2, 3
BUS_FARE, BUS_FARE_STUDENT = 150, 75
CEILING = 100_000
FUNDING_FLOOR = -(2**62)

FUNDING_ID, BUS_REVENUE_ID, LIBRARY_REVENUE_ID, KIOSK_REVENUE_ID = 1, 11, 12, 13

RICH, STUDENT, POOR, BLOCKED, DEBT, NEAR_CEILING, BLOCKED_STUDENT = 100, 101, 102, 103, 104, 105, 106
EXPIRED_STUDENT, FUTURE_STUDENT, RENEWING_STUDENT, LAST_DAY_STUDENT, UNREGISTERED_STUDENT = 107, 108, 109, 110, 111
UNKNOWN = 999
# Decisions are recorded at 1_700_000_000_000 ms: day 19,675 since 1970.
TODAY = 1_700_000_000_000 // 86_400_000
RENEWAL_DAYS = 30
# uid -> the holder's eligibility for the card's profile (from_day, until_day);
# concession cards not listed have none.
ELIGIBILITY = {
    STUDENT: (TODAY - 400, TODAY + 400),
    BLOCKED_STUDENT: (TODAY - 400, TODAY + 400),
    EXPIRED_STUDENT: (TODAY - 400, TODAY - 1),
    FUTURE_STUDENT: (TODAY + 1, TODAY + 400),
    RENEWING_STUDENT: (TODAY - 400, TODAY + RENEWAL_DAYS - 1),
    LAST_DAY_STUDENT: (TODAY - 400, TODAY),
}
# uid -> (balance, floor, profile, status)
CARDS = {
    RICH: (1000, 0, STANDARD, CardStatus.ACTIVE),
    STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
    POOR: (100, 0, STANDARD, CardStatus.ACTIVE),
    BLOCKED: (1000, 0, STANDARD, CardStatus.BLOCKED),
    DEBT: (100, -100, STANDARD, CardStatus.ACTIVE),
    NEAR_CEILING: (99_000, 0, STANDARD, CardStatus.ACTIVE),
    BLOCKED_STUDENT: (1000, 0, STUDENT_PROFILE, CardStatus.LOST),
    EXPIRED_STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
    FUTURE_STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
    RENEWING_STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
    LAST_DAY_STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
    UNREGISTERED_STUDENT: (500, 0, STUDENT_PROFILE, CardStatus.ACTIVE),
}

BUS_VALIDATOR, LIBRARY_GATE, KIOSK, INACTIVE_VALIDATOR, INACTIVE_KIOSK = 1, 2, 3, 4, 5


def build_city() -> CityState:
    city = CityState()
    funding = city.add_account(FUNDING_ID, 0, FUNDING_FLOOR, 2**63 - 1)
    revenue_ids = {BUS: BUS_REVENUE_ID, LIBRARY: LIBRARY_REVENUE_ID, KIOSK_SERVICE: KIOSK_REVENUE_ID}
    for service, revenue_id in revenue_ids.items():
        city.revenue_account[service] = city.add_account(revenue_id, 0, 0, 2**63 - 1)
    city.set_fare(BUS, STANDARD, BUS_FARE)
    city.set_fare(BUS, STUDENT_PROFILE, BUS_FARE_STUDENT)
    city.set_fare(LIBRARY, STANDARD, 0)
    city.set_fare(KIOSK_SERVICE, STANDARD, 0)
    for uid, (balance, floor, profile, status) in CARDS.items():
        city.add_account(10_000 + uid, balance, floor, CEILING)
        city.add_card(uid, status, profile, 10_000 + uid, holder_id=uid, eligible=ELIGIBILITY.get(uid))
    city.renewal_window_days = RENEWAL_DAYS
    city.rules_version = 3
    for terminal_id, service, kind, active in (
        (BUS_VALIDATOR, BUS, TerminalKind.VALIDATOR, True),
        (LIBRARY_GATE, LIBRARY, TerminalKind.VALIDATOR, True),
        (KIOSK, KIOSK_SERVICE, TerminalKind.KIOSK, True),
        (INACTIVE_VALIDATOR, BUS, TerminalKind.VALIDATOR, False),
        (INACTIVE_KIOSK, KIOSK_SERVICE, TerminalKind.KIOSK, False),
    ):
        city.terminals[terminal_id] = Terminal(
            id=terminal_id,
            service_id=service,
            kind=kind,
            key_version=1,
            active=active,
            funding_account=funding if kind == TerminalKind.KIOSK else -1,
            high_seq=-1,
        )
    return city


_seq = 0


def new_decision(
    fp: ModuleType,
    city: CityState,
    terminal_id: int,
    kind: int,
    uid: int,
    *,
    flags: int = 0,
    requested: int = 0,
    original_seq: int | None = None,
    recorded_ms: int = 1_700_000_000_000,
    counter: int = 0,  # 0: the card does not count (no clone check)
) -> Any:
    global _seq
    _seq += 1
    return fp.Decision(
        terminal_id,
        _seq,
        kind,
        uid,
        counter,
        flags,
        requested,
        original_seq,
        recorded_ms - 5,
        recorded_ms,
        city.terminals[terminal_id].service_id,
    )


def tap(fp: ModuleType, city: CityState, terminal_id: int, uid: int, flags: int = 0) -> Any:
    d = new_decision(fp, city, terminal_id, TAP, uid, flags=flags)
    fp.decide_tap(city, city.terminals[terminal_id], d)
    return d


def topup(fp: ModuleType, city: CityState, terminal_id: int, uid: int, amount: int) -> Any:
    d = new_decision(fp, city, terminal_id, TOPUP, uid, requested=amount)
    fp.decide_topup(city, city.terminals[terminal_id], d)
    return d


def account_of(city: CityState, uid: int) -> int:
    return city.card_account[city.card_position[uid]]


# --- Constants -------------------------------------------------------------------


def test_constants_match_the_engine(fp: ModuleType) -> None:
    assert fp.CARD_STATUS_ACTIVE == CardStatus.ACTIVE
    assert fp.NO_FARE == state_module.NO_FARE
    assert fp.TOPUP_MAX_CENTS == limits.TOPUP_MAX_CENTS
    assert (fp.OPERATION_TAP, fp.OPERATION_TOPUP, fp.OPERATION_REVERSAL) == (TAP, TOPUP, REVERSAL)
    assert (fp.LEDGER_FARE, fp.LEDGER_TOPUP, fp.LEDGER_REVERSAL, fp.LEDGER_OPENING) == (0, 1, 2, 3)
    assert fp.NO_ACCOUNT == -1
    assert fp.TAP_FLAG_EXIT == 0x01
    assert fp.TAP_FLAGS_KNOWN == fp.TAP_FLAG_EXIT
    assert fp.STANDARD_PROFILE == state_module.STANDARD_PROFILE
    assert fp.INFO_CONCESSION_NOT_VALID == TapInfo.CONCESSION_NOT_VALID
    assert fp.INFO_RENEWAL_DUE == TapInfo.RENEWAL_DUE
    assert fp.MS_PER_DAY == 86_400_000


def test_engine_modules_reexport_the_selected_twin() -> None:
    assert decision_module.Decision is fastpath.Decision
    assert decision_module.request_fingerprint is fastpath.request_fingerprint
    assert decision_module.NO_ACCOUNT == fastpath.NO_ACCOUNT
    assert ladder.decide_tap is fastpath.decide_tap
    assert ladder.decide_topup is fastpath.decide_topup
    assert ladder.decide_reversal is fastpath.decide_reversal
    assert ladder.Original is fastpath.Original
    assert ladder.TAP_FLAGS_KNOWN == fastpath.TAP_FLAGS_KNOWN


# --- The Decision record ---------------------------------------------------------


def test_decision_starts_undecided(fp: ModuleType) -> None:
    d = fp.Decision(7, 1001, TAP, 0x04A1, 3, 1, 0, None, 1_000, 2_000, BUS)
    assert (d.terminal_id, d.terminal_seq, d.kind, d.card_uid) == (7, 1001, TAP, 0x04A1)
    assert (d.card_counter, d.tap_flags) == (3, 1)
    assert (d.requested, d.original_seq, d.event_time_ms, d.recorded_ms, d.service_id) == (0, None, 1_000, 2_000, BUS)
    assert (d.result, d.amount, d.balance, d.ledger_kind) == (0, 0, 0, fp.LEDGER_FARE)
    assert (d.card_account, d.source, d.target) == (fp.NO_ACCOUNT,) * 3
    assert d.waiters == [] and not d.moves_money
    d.waiters.append(("target", 5))
    d.amount = 150
    assert d.moves_money
    assert repr(d) == "Decision(TAP terminal=7 seq=1001 result=0 amount=150)"
    with pytest.raises(AttributeError):
        d.no_such_field = 1  # type: ignore[attr-defined]


def test_fingerprints(fp: ModuleType) -> None:
    d = fp.Decision(7, 1001, TAP, 0x04A1, 3, 1, 0, None, 1_000, 2_000, BUS)
    expected = (0, 0x04A1, 3, 1, 0, 1_000, None, -1)
    assert d.fingerprint() == fp.request_fingerprint(TAP, 0x04A1, 3, 1, 0, 1_000, None) == expected
    # A REVERSAL's card comes from the record, not the request: it does not count.
    r = fp.Decision(7, 1002, REVERSAL, 0, 0, 0, 0, 1001, 1_000, 2_000, BUS)
    r.card_uid = 0x04A1
    assert (
        r.fingerprint()
        == (2, 0, 0, 0, 0, 1_000, 1001, 7)
        == fp.request_fingerprint(REVERSAL, 0, 0, 0, 0, 1_000, 1001, 7)
    )
    # The terminal whose tap it reverses is part of it: a refund of another
    # terminal's sequence 1001 is another request.
    r.original_terminal = 12
    assert r.fingerprint() == (2, 0, 0, 0, 0, 1_000, 1001, 12)
    assert repr(r) == "Decision(REVERSAL terminal=7 seq=1002 result=0 amount=0)"


# --- The ladder, table-driven ----------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    kind: int
    terminal: int
    uid: int
    result: int
    amount: int = 0
    balance: int = 0  # what the terminal is told
    flags: int = 0
    requested: int = 0
    info: int = 0
    fare_profile: int | None = None  # None: STANDARD when a fare was looked up


NOT_VALID, RENEWAL = TapInfo.CONCESSION_NOT_VALID, TapInfo.RENEWAL_DUE

CASES = [
    # TAP
    Case("tap approved", TAP, BUS_VALIDATOR, RICH, R.APPROVED, BUS_FARE, 1000 - BUS_FARE),
    Case("tap student fare", TAP, BUS_VALIDATOR, STUDENT, R.APPROVED, BUS_FARE_STUDENT, 500 - BUS_FARE_STUDENT),
    Case("tap exit is free", TAP, BUS_VALIDATOR, POOR, R.APPROVED, 0, 100, flags=0x01),
    Case("tap free service", TAP, LIBRARY_GATE, RICH, R.APPROVED, 0, 1000),
    Case("tap to the floor", TAP, BUS_VALIDATOR, DEBT, R.APPROVED, BUS_FARE, 100 - BUS_FARE),
    Case("tap inactive terminal", TAP, INACTIVE_VALIDATOR, RICH, R.TERMINAL_NOT_ALLOWED),
    Case("tap unknown card on inactive terminal", TAP, INACTIVE_VALIDATOR, UNKNOWN, R.TERMINAL_NOT_ALLOWED),
    Case("tap unknown card", TAP, BUS_VALIDATOR, UNKNOWN, R.UNKNOWN_CARD),
    Case("tap blocked card", TAP, BUS_VALIDATOR, BLOCKED, R.CARD_NOT_ACTIVE, 0, 1000),
    Case("tap lost card where not served", TAP, LIBRARY_GATE, BLOCKED_STUDENT, R.CARD_NOT_ACTIVE, 0, 1000),
    Case("tap not served", TAP, LIBRARY_GATE, STUDENT, R.SERVICE_NOT_ALLOWED, 0, 500),
    Case("tap insufficient", TAP, BUS_VALIDATOR, POOR, R.INSUFFICIENT_FUNDS, 0, 100),
    # Concessions apply only while the holder's eligibility is valid.
    Case(
        "tap concession expired: standard fare",
        TAP,
        BUS_VALIDATOR,
        EXPIRED_STUDENT,
        R.APPROVED,
        BUS_FARE,
        500 - BUS_FARE,
        info=NOT_VALID,
        fare_profile=STANDARD,
    ),
    Case(
        "tap concession not started: standard fare",
        TAP,
        BUS_VALIDATOR,
        FUTURE_STUDENT,
        R.APPROVED,
        BUS_FARE,
        500 - BUS_FARE,
        info=NOT_VALID,
        fare_profile=STANDARD,
    ),
    Case(
        "tap concession never registered: standard fare",
        TAP,
        BUS_VALIDATOR,
        UNREGISTERED_STUDENT,
        R.APPROVED,
        BUS_FARE,
        500 - BUS_FARE,
        info=NOT_VALID,
        fare_profile=STANDARD,
    ),
    Case(
        "tap concession ending: renew",
        TAP,
        BUS_VALIDATOR,
        RENEWING_STUDENT,
        R.APPROVED,
        BUS_FARE_STUDENT,
        500 - BUS_FARE_STUDENT,
        info=RENEWAL,
        fare_profile=STUDENT_PROFILE,
    ),
    Case(
        "tap concession last day still valid",
        TAP,
        BUS_VALIDATOR,
        LAST_DAY_STUDENT,
        R.APPROVED,
        BUS_FARE_STUDENT,
        500 - BUS_FARE_STUDENT,
        info=RENEWAL,
        fare_profile=STUDENT_PROFILE,
    ),
    Case(
        "tap expired concession where only standard is served",
        TAP,
        LIBRARY_GATE,
        EXPIRED_STUDENT,
        R.APPROVED,
        0,
        500,
        info=NOT_VALID,
        fare_profile=STANDARD,
    ),
    # TOPUP
    Case("topup approved", TOPUP, KIOSK, POOR, R.APPROVED, 500, 600, requested=500),
    Case("topup largest", TOPUP, KIOSK, POOR, R.APPROVED, 50_000, 50_100, requested=50_000),
    Case("topup to the ceiling", TOPUP, KIOSK, NEAR_CEILING, R.APPROVED, 1000, 100_000, requested=1000),
    Case("topup at a validator", TOPUP, BUS_VALIDATOR, POOR, R.TERMINAL_NOT_ALLOWED, requested=500),
    Case("topup inactive kiosk", TOPUP, INACTIVE_KIOSK, POOR, R.TERMINAL_NOT_ALLOWED, requested=500),
    Case("topup unknown card at validator", TOPUP, BUS_VALIDATOR, UNKNOWN, R.TERMINAL_NOT_ALLOWED, requested=500),
    Case("topup unknown card", TOPUP, KIOSK, UNKNOWN, R.UNKNOWN_CARD, requested=500),
    Case("topup blocked card", TOPUP, KIOSK, BLOCKED, R.CARD_NOT_ACTIVE, 0, 1000, requested=500),
    Case("topup blocked card bad amount", TOPUP, KIOSK, BLOCKED, R.CARD_NOT_ACTIVE, 0, 1000, requested=0),
    Case("topup zero", TOPUP, KIOSK, POOR, R.INVALID_AMOUNT, 0, 100, requested=0),
    Case("topup too large", TOPUP, KIOSK, POOR, R.INVALID_AMOUNT, 0, 100, requested=50_001),
    Case("topup too large near ceiling", TOPUP, KIOSK, NEAR_CEILING, R.INVALID_AMOUNT, 0, 99_000, requested=50_001),
    Case("topup above ceiling", TOPUP, KIOSK, NEAR_CEILING, R.BALANCE_LIMIT, 0, 99_000, requested=1001),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ladder_table(fp: ModuleType, case: Case) -> None:
    city = build_city()
    d = new_decision(fp, city, case.terminal, case.kind, case.uid, flags=case.flags, requested=case.requested)
    decide = fp.decide_tap if case.kind == TAP else fp.decide_topup
    decide(city, city.terminals[case.terminal], d)
    assert (d.result, d.amount, d.balance) == (case.result, case.amount, case.balance)
    assert d.info == case.info
    if case.kind == TAP:
        fare_looked_up = case.result in (R.APPROVED, R.SERVICE_NOT_ALLOWED, R.INSUFFICIENT_FUNDS)
        expected_profile = case.fare_profile
        if expected_profile is None:
            expected_profile = CARDS[case.uid][2] if fare_looked_up else fp.NO_PROFILE
        assert d.fare_profile == expected_profile
        known_card = case.uid in city.card_position and city.terminals[case.terminal].active
        assert d.rules_version == (3 if known_card else 0)
    known = case.uid in city.card_position and city.terminals[case.terminal].active
    if case.result == R.TERMINAL_NOT_ALLOWED or not known:
        assert d.card_account == fp.NO_ACCOUNT
    else:
        assert d.card_account == account_of(city, case.uid)
    account = d.card_account
    if case.result != R.APPROVED or case.amount == 0:
        # Declines and free passages move nothing and hold nothing.
        assert (d.source, d.target) == (fp.NO_ACCOUNT, fp.NO_ACCOUNT)
        assert not any(city.pending_debit) and not any(city.pending_credit)
    elif case.kind == TAP:
        assert (d.source, d.target, d.ledger_kind) == (account, city.revenue_account[BUS], fp.LEDGER_FARE)
        assert city.pending_debit[account] == case.amount and not any(city.pending_credit)
    else:
        assert (d.source, d.target, d.ledger_kind) == (city.terminals[KIOSK].funding_account, account, fp.LEDGER_TOPUP)
        assert city.pending_credit[account] == case.amount and not any(city.pending_debit)
    city.check_invariants()


def test_table_covers_every_result_of_tap_and_topup() -> None:
    assert {c.result for c in CASES if c.kind == TAP} == {
        R.APPROVED,
        R.TERMINAL_NOT_ALLOWED,
        R.UNKNOWN_CARD,
        R.CARD_NOT_ACTIVE,
        R.SERVICE_NOT_ALLOWED,
        R.INSUFFICIENT_FUNDS,
    }
    assert {c.result for c in CASES if c.kind == TOPUP} == {
        R.APPROVED,
        R.TERMINAL_NOT_ALLOWED,
        R.UNKNOWN_CARD,
        R.CARD_NOT_ACTIVE,
        R.INVALID_AMOUNT,
        R.BALANCE_LIMIT,
    }


def test_pending_debits_lower_what_the_next_tap_sees(fp: ModuleType) -> None:
    city = build_city()
    results = [tap(fp, city, BUS_VALIDATOR, RICH) for _ in range(7)]
    assert [(d.result, d.balance) for d in results] == [
        (R.APPROVED, 850),
        (R.APPROVED, 700),
        (R.APPROVED, 550),
        (R.APPROVED, 400),
        (R.APPROVED, 250),
        (R.APPROVED, 100),
        (R.INSUFFICIENT_FUNDS, 100),
    ]
    assert city.pending_debit[account_of(city, RICH)] == 6 * BUS_FARE
    assert city.balance[account_of(city, RICH)] == 1000  # committed only by the writer


def test_tolerated_negative_floor(fp: ModuleType) -> None:
    city = build_city()
    first, second = tap(fp, city, BUS_VALIDATOR, DEBT), tap(fp, city, BUS_VALIDATOR, DEBT)
    assert (first.result, first.balance) == (R.APPROVED, -50)
    assert (second.result, second.balance) == (R.INSUFFICIENT_FUNDS, -50)  # -200 is below the floor of -100
    assert city.available(account_of(city, DEBT)) == -50
    city.check_invariants()


def test_topup_is_not_spendable_until_committed(fp: ModuleType) -> None:
    city = build_city()
    account = account_of(city, POOR)
    credit = topup(fp, city, KIOSK, POOR, 500)
    assert (credit.result, credit.balance) == (R.APPROVED, 600)  # the balance once committed
    assert city.available(account) == 100
    fare = tap(fp, city, BUS_VALIDATOR, POOR)
    assert (fare.result, fare.balance) == (R.INSUFFICIENT_FUNDS, 100)
    assert (city.pending_credit[account], city.pending_debit[account]) == (500, 0)


def test_ceiling_counts_pending_credits(fp: ModuleType) -> None:
    city = build_city()
    first = topup(fp, city, KIOSK, NEAR_CEILING, 600)
    second = topup(fp, city, KIOSK, NEAR_CEILING, 600)
    third = topup(fp, city, KIOSK, NEAR_CEILING, 400)
    assert [d.result for d in (first, second, third)] == [R.APPROVED, R.BALANCE_LIMIT, R.APPROVED]
    assert city.pending_credit[account_of(city, NEAR_CEILING)] == 1000


# --- Reversals ------------------------------------------------------------------

WINDOW_MS = 600_000
RECORDED_MS = 1_700_000_000_000


def reverse(
    fp: ModuleType,
    city: CityState,
    terminal_id: int,
    original: Any,
    *,
    already_reversed: bool = False,
    late_ms: int = 0,
) -> Any:
    d = new_decision(fp, city, terminal_id, REVERSAL, 0, original_seq=1, recorded_ms=RECORDED_MS + late_ms)
    fp.decide_reversal(city, city.terminals[terminal_id], d, original, already_reversed, WINDOW_MS)
    return d


def original_of(fp: ModuleType, kind: int, uid: int, amount: int, service: int = BUS) -> Any:
    return fp.Original(kind, uid, amount, 10_000 + uid, RECORDED_MS, service)


def test_reversal_of_a_fare_is_a_pending_credit(fp: ModuleType) -> None:
    city = build_city()
    account = account_of(city, RICH)
    d = reverse(fp, city, BUS_VALIDATOR, original_of(fp, TAP, RICH, BUS_FARE), late_ms=WINDOW_MS)
    assert (d.result, d.amount, d.balance, d.card_uid) == (R.APPROVED, BUS_FARE, 1000 + BUS_FARE, RICH)
    assert (d.source, d.target, d.ledger_kind) == (city.revenue_account[BUS], account, fp.LEDGER_REVERSAL)
    assert (city.pending_credit[account], city.pending_debit[account], city.available(account)) == (BUS_FARE, 0, 1000)


@pytest.mark.parametrize(("terminal_id", "target"), [(KIOSK, 0), (BUS_VALIDATOR, -1)])
def test_reversal_of_a_topup_is_a_pending_debit(fp: ModuleType, terminal_id: int, target: int) -> None:
    city = build_city()
    account = account_of(city, RICH)
    d = reverse(fp, city, terminal_id, original_of(fp, TOPUP, RICH, 400, KIOSK_SERVICE))
    assert (d.result, d.amount, d.balance) == (R.APPROVED, 400, 600)
    assert (d.source, d.target, d.ledger_kind) == (account, target, fp.LEDGER_REVERSAL)
    assert (city.pending_debit[account], city.available(account)) == (400, 600)


@pytest.mark.parametrize(
    ("name", "terminal_id", "original", "already_reversed", "late_ms", "result", "balance"),
    [
        ("inactive terminal", INACTIVE_VALIDATOR, None, False, 0, R.TERMINAL_NOT_ALLOWED, 0),
        ("inactive terminal first", INACTIVE_VALIDATOR, (TAP, RICH, BUS_FARE), True, 10**9, R.TERMINAL_NOT_ALLOWED, 0),
        ("not found", BUS_VALIDATOR, None, False, 0, R.ORIGINAL_NOT_FOUND, 0),
        ("a reversal of a reversal", BUS_VALIDATOR, (REVERSAL, RICH, BUS_FARE), False, 0, R.ORIGINAL_NOT_FOUND, 0),
        ("expired", BUS_VALIDATOR, (TAP, RICH, BUS_FARE), False, WINDOW_MS + 1, R.REVERSAL_WINDOW_EXPIRED, 1000),
        ("expired first", BUS_VALIDATOR, (TAP, RICH, BUS_FARE), True, WINDOW_MS + 1, R.REVERSAL_WINDOW_EXPIRED, 1000),
        ("already reversed", BUS_VALIDATOR, (TAP, RICH, BUS_FARE), True, 0, R.ALREADY_REVERSED, 1000),
        ("money spent", KIOSK, (TOPUP, POOR, 500), False, 0, R.INSUFFICIENT_FUNDS, 100),
        ("to the floor", KIOSK, (TOPUP, DEBT, 200), False, 0, R.APPROVED, -100),
        ("below the floor", KIOSK, (TOPUP, DEBT, 201), False, 0, R.INSUFFICIENT_FUNDS, 100),
    ],
)
def test_reversal_ladder(
    fp: ModuleType,
    name: str,
    terminal_id: int,
    original: tuple[int, int, int] | None,
    already_reversed: bool,
    late_ms: int,
    result: int,
    balance: int,
) -> None:
    city = build_city()
    record = None if original is None else original_of(fp, *original)
    d = reverse(fp, city, terminal_id, record, already_reversed=already_reversed, late_ms=late_ms)
    assert (d.result, d.balance) == (result, balance)
    if result != R.APPROVED:
        assert d.amount == 0 and (d.source, d.target) == (fp.NO_ACCOUNT, fp.NO_ACCOUNT)
        assert not any(city.pending_debit) and not any(city.pending_credit)


# --- Bad positions and columns: the same error from both twins -----------------------


def _broken(mutate: str) -> CityState:
    city = build_city()
    card = city.card_position[RICH]
    if mutate == "card beyond":
        city.card_position[RICH] = len(city.card_uid)
    elif mutate == "account beyond":
        city.card_account[card] = 99
    elif mutate == "account negative":
        city.card_account[card] = -2
    elif mutate == "profile":
        city.card_profile[card] = 70
    elif mutate == "short column":
        # RICH now names the last card, whose account lost its pending_debit cell.
        city.pending_debit.pop()
        city.card_position[RICH] = len(city.card_uid) - 1
    elif mutate == "short eligibility column":
        city.card_eligible_from = array("i")
    elif mutate == "int64 eligibility column":
        city.card_eligible_until = array("q", city.card_eligible_until)  # type: ignore[assignment]
    elif mutate == "int32 column":
        city.balance = array("i", city.balance)  # type: ignore[assignment]
    elif mutate == "list column":
        city.card_status = list(city.card_status)  # type: ignore[assignment]
    return city


CARDS_N = len(CARDS)
ACCOUNTS_N = len(CARDS) + 4  # funding and three revenue accounts
BAD_STATES = [
    ("card beyond", IndexError, f"card position {CARDS_N} out of range for {CARDS_N} cards"),
    ("account beyond", IndexError, f"account position 99 out of range for {ACCOUNTS_N} accounts"),
    ("account negative", IndexError, f"account position -2 out of range for {ACCOUNTS_N} accounts"),
    ("profile", IndexError, "profile position 70 out of range for 64 profiles"),
    ("short column", IndexError, f"account position {ACCOUNTS_N - 1} out of range for {ACCOUNTS_N - 1} accounts"),
    ("short eligibility column", IndexError, "card position 0 out of range for 0 cards"),
    ("int32 column", TypeError, "state.balance must be array('q'), not array('i')"),
    ("int64 eligibility column", TypeError, "state.card_eligible_until must be array('i'), not array('q')"),
    ("list column", TypeError, "state.card_status must be bytearray, not list"),
]


@pytest.mark.parametrize(("mutate", "error", "text"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_wrong_positions_raise_the_same_error(fp: ModuleType, mutate: str, error: type[Exception], text: str) -> None:
    city = _broken(mutate)
    snapshot = [bytes(column) for column in (city.pending_debit, city.pending_credit)]
    with pytest.raises(error, match=f"^{re.escape(text)}$"):
        tap(fp, city, BUS_VALIDATOR, RICH)
    assert [bytes(column) for column in (city.pending_debit, city.pending_credit)] == snapshot


def test_wrong_reversal_account_raises_the_same_error(fp: ModuleType) -> None:
    city = build_city()
    city.account_position[10_000 + RICH] = ACCOUNTS_N
    with pytest.raises(IndexError, match=rf"^account position {ACCOUNTS_N} out of range for {ACCOUNTS_N} accounts$"):
        reverse(fp, city, BUS_VALIDATOR, original_of(fp, TAP, RICH, BUS_FARE))
    with pytest.raises(KeyError):
        reverse(fp, city, BUS_VALIDATOR, fp.Original(TAP, RICH, BUS_FARE, 424242, RECORDED_MS, BUS))


def test_wrong_topup_position_raises_the_same_error(fp: ModuleType) -> None:
    city = build_city()
    city.card_position[POOR] = 1000
    with pytest.raises(IndexError, match=rf"^card position 1000 out of range for {CARDS_N} cards$"):
        topup(fp, city, KIOSK, POOR, 500)


def test_cards_added_at_run_time_are_decided(fp: ModuleType) -> None:
    # The compiled twin must not pin the arrays: they grow while it runs.
    city = build_city()
    tap(fp, city, BUS_VALIDATOR, RICH)
    for n in range(1000):
        city.add_account(50_000 + n, 300, 0, CEILING)
        city.add_card(50_000 + n, CardStatus.ACTIVE, STANDARD, 50_000 + n)
    d = tap(fp, city, BUS_VALIDATOR, 50_999)
    assert (d.result, d.balance) == (R.APPROVED, 150)


# --- Both twins, same random traffic ----------------------------------------------------

UIDS = [*CARDS, UNKNOWN]
TERMINALS = [BUS_VALIDATOR, LIBRARY_GATE, KIOSK, INACTIVE_VALIDATOR, INACTIVE_KIOSK]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("tap"), st.sampled_from(TERMINALS), st.sampled_from(UIDS), st.sampled_from([0, 1])),
        st.tuples(
            st.just("topup"),
            st.sampled_from(TERMINALS),
            st.sampled_from(UIDS),
            st.integers(min_value=-10, max_value=60_000),
        ),
        st.tuples(
            st.just("reversal"),
            st.sampled_from(TERMINALS),
            st.integers(min_value=0, max_value=40),
            st.integers(min_value=0, max_value=2 * WINDOW_MS),
        ),
        st.tuples(st.just("commit"), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=60,
)


def _fields(d: Any) -> tuple[Any, ...]:
    return (
        d.terminal_id,
        d.terminal_seq,
        d.kind,
        d.card_uid,
        d.result,
        d.amount,
        d.balance,
        d.card_account,
        d.source,
        d.target,
        d.ledger_kind,
        d.fingerprint(),
    )


def _run(fp: ModuleType, ops: list[tuple[str, int, int, int]]) -> tuple[list[tuple[Any, ...]], CityState]:
    """Decide ops on a fresh city; "commit" settles everything decided so far."""
    city = build_city()
    decided: list[Any] = []
    unsettled: list[Any] = []
    seen = []
    for seq, (op, terminal_id, who, value) in enumerate(ops):
        if op == "commit":
            for d in unsettled:
                if d.result == R.APPROVED and d.amount:
                    if d.source == d.card_account:
                        city.pending_debit[d.card_account] -= d.amount
                    else:
                        city.pending_credit[d.card_account] -= d.amount
                    if d.target != fp.NO_ACCOUNT:
                        city.balance[d.source] -= d.amount
                        city.balance[d.target] += d.amount
            unsettled.clear()
            continue
        terminal = city.terminals[terminal_id]
        if op == "reversal":
            previous = decided[who] if who < len(decided) else None
            original = None
            if previous is not None and previous.result == R.APPROVED and previous.amount:
                original = fp.Original(
                    previous.kind,
                    previous.card_uid,
                    previous.amount,
                    city.account_id[previous.card_account],
                    previous.recorded_ms,
                    previous.service_id,
                )
            d = fp.Decision(terminal_id, seq, REVERSAL, 0, 0, 0, 0, who, 0, RECORDED_MS + value, terminal.service_id)
            fp.decide_reversal(city, terminal, d, original, who % 7 == 6, WINDOW_MS)
        else:
            kind = TAP if op == "tap" else TOPUP
            d = fp.Decision(
                terminal_id,
                seq,
                kind,
                who,
                0,
                value if op == "tap" else 0,
                value if op == "topup" else 0,
                None,
                0,
                RECORDED_MS,
                terminal.service_id,
            )
            (fp.decide_tap if op == "tap" else fp.decide_topup)(city, terminal, d)
        decided.append(d)
        unsettled.append(d)
        seen.append(_fields(d))
    return seen, city


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_twins_decide_random_traffic_identically(twins: tuple[ModuleType, ModuleType], ops: Any) -> None:
    compiled, pure = twins
    compiled_decisions, compiled_city = _run(compiled, ops)
    pure_decisions, pure_city = _run(pure, ops)
    assert compiled_decisions == pure_decisions
    for column in ("balance", "pending_debit", "pending_credit", "floor", "ceiling", "card_account"):
        assert getattr(compiled_city, column) == getattr(pure_city, column), column
    assert compiled_city.card_status == pure_city.card_status
    compiled_city.check_invariants()
