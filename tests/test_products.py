"""Season passes, multi-ride tickets and reversals in the decision ladder, on both twins.

The city of tests/test_city_rules.py (bus with a free 45-minute transfer and
daily and monthly caps, a pool gate, a bike dock charged by the hour with a
minimum balance to enter). Products are put in the city's memory as the
engine holds them after a sale; each test decides taps with the ``fp`` twin
and checks result, amount, ``info``, the product that paid and the rides
left. Reversals are decided from the ``Original`` the record would give.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import fastpath
from engine.codes import OperationKind, ProductKind, ResultCode, TapInfo
from engine.limits import OFFICE_REFUND_WINDOW_S, REVERSAL_WINDOW_S
from engine.processor import Processor
from engine.state import CityState
from tests.test_city_rules import (
    BIKE_DOCK,
    BIKE_FARE,
    BIKE_MAX,
    BIKES,
    BUS,
    BUS_A,
    BUS_B,
    BUS_FARE,
    CARDS,
    DAY,
    MINUTE,
    POOL_FARE,
    POOL_GATE,
    POOR,
    RICH,
    RULES,
    T0,
    build_city,
    tap,
)
from tests.twins import load_twin

R = ResultCode
PASS_USED = TapInfo.PASS_USED
TODAY = T0 // DAY
WINDOW_MS = REVERSAL_WINDOW_S * 1000
OFFICE_WINDOW_MS = OFFICE_REFUND_WINDOW_S * 1000

_product_ids = iter(range(1, 1_000_000))


def hold_season(fp: ModuleType, city: CityState, uid: int, group: str, first_day: int, last_day: int) -> Any:
    """Give the card's account a season pass for ``group`` valid on [first_day, last_day]."""
    return _hold(fp, city, uid, fp.Product(next(_product_ids), fp.PRODUCT_SEASON, city.group_id(group), first_day,
                                            last_day, 0, 0))  # fmt: skip


def hold_ticket(fp: ModuleType, city: CityState, uid: int, group: str, rides: int, used: int = 0) -> Any:
    """Give the card's account a multi-ride ticket for ``group``."""
    return _hold(fp, city, uid, fp.Product(next(_product_ids), fp.PRODUCT_MULTI_RIDE, city.group_id(group), 0, -1,
                                            rides, used))  # fmt: skip


def _hold(fp: ModuleType, city: CityState, uid: int, product: Any) -> Any:
    account = city.card_account[city.card_position[uid]]
    city.products.setdefault(account, []).append(product)
    city.product_by_id[product.id] = product
    return product


def paid(d: Any) -> tuple[int, int, int, int]:
    return (d.result, d.amount, d.info & ~TapInfo.SHOW_ID, d.product_id)


_reversal_seq = iter(range(10**9, 2 * 10**9))


def reverse(
    fp: ModuleType,
    city: CityState,
    original: Any,
    at_ms: int,
    *,
    terminal: int | None = None,
    window_ms: int = WINDOW_MS,
) -> Any:
    """Decide a REVERSAL of the decision ``original`` as recorded, at ``terminal``
    (default: the original's own; another one is a card-office refund)."""
    at_terminal = original.terminal_id if terminal is None else terminal
    d = fp.Decision(at_terminal, next(_reversal_seq), OperationKind.REVERSAL, 0, 0, 0, 0, original.terminal_seq,
                    at_ms, at_ms, city.terminals[at_terminal].service_id)  # fmt: skip
    d.original_terminal = original.terminal_id
    recorded = fp.Original(
        original.kind, original.card_uid, original.amount, city.account_id[original.card_account],
        original.recorded_ms, original.service_id, original.tap_flags, original.info, original.product_id,
    )  # fmt: skip
    fp.decide_reversal(city, city.terminals[at_terminal], d, recorded, False, window_ms)
    return d


def test_the_twins_number_products_as_the_record_does(fp: ModuleType) -> None:
    assert (fp.PRODUCT_SEASON, fp.PRODUCT_MULTI_RIDE) == (ProductKind.SEASON, ProductKind.MULTI_RIDE)
    assert [kind.code for kind in ProductKind] == ["season", "multi_ride"]  # the rules file's kinds


# --- season passes -----------------------------------------------------------------------


def test_a_valid_season_pass_pays_the_fare(fp: ModuleType) -> None:
    city = build_city()
    season = hold_season(fp, city, RICH, "bus", TODAY - 3, TODAY + 26)
    d = tap(fp, city, BUS_A, RICH, T0)
    assert paid(d) == (R.APPROVED, 0, PASS_USED, season.id)
    assert (d.balance, d.product_rides) == (10_000, 0)
    assert city.pending_debit[d.card_account] == 0


def test_a_season_pass_counts_only_within_its_days(fp: ModuleType) -> None:
    city = build_city()
    hold_season(fp, city, RICH, "bus", TODAY + 1, TODAY + 30)  # bought for next month
    assert paid(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, BUS_FARE, 0, -1)
    city = build_city()
    hold_season(fp, city, RICH, "bus", TODAY - 30, TODAY - 1)  # ended yesterday
    assert paid(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, BUS_FARE, 0, -1)
    city = build_city()
    season = hold_season(fp, city, RICH, "bus", TODAY - 29, TODAY)  # its last day
    assert paid(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, 0, PASS_USED, season.id)


def test_a_pass_pays_only_at_its_own_group(fp: ModuleType) -> None:
    city = build_city()
    hold_season(fp, city, RICH, "pool", TODAY, TODAY + 29)
    assert paid(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, BUS_FARE, 0, -1)


def test_of_two_passes_the_one_ending_first_pays(fp: ModuleType) -> None:
    city = build_city()
    hold_season(fp, city, RICH, "bus", TODAY - 1, TODAY + 300)
    ending_first = hold_season(fp, city, RICH, "bus", TODAY - 20, TODAY + 9)
    assert tap(fp, city, BUS_A, RICH, T0).product_id == ending_first.id


def test_another_card_of_the_account_holds_nothing_else(fp: ModuleType) -> None:
    city = build_city()
    hold_season(fp, city, RICH, "bus", TODAY, TODAY + 29)
    assert paid(tap(fp, city, BUS_A, POOR, T0)) == (R.APPROVED, BUS_FARE, 0, -1)


def test_a_pass_holder_needs_no_minimum_balance(fp: ModuleType) -> None:
    city = build_city()
    season = hold_season(fp, city, POOR, "bikes", TODAY, TODAY + 29)  # POOR holds 150 < 200 to enter
    entry = tap(fp, city, BIKE_DOCK, POOR, T0)
    assert paid(entry) == (R.APPROVED, 0, PASS_USED, season.id)
    exit_ = tap(fp, city, BIKE_DOCK, POOR, T0 + 3 * 60 * MINUTE, exit_tap=True)
    assert (exit_.result, exit_.amount, exit_.info & TapInfo.REFUNDED) == (R.APPROVED, 0, 0)  # nothing to settle


def test_a_season_pass_comes_before_the_cap(fp: ModuleType) -> None:
    city = build_city()
    hold_season(fp, city, RICH, "bus", TODAY, TODAY + 29)
    for minutes in (0, 60, 120, 180):
        assert paid(tap(fp, city, BUS_A, RICH, T0 + minutes * MINUTE))[:3] == (R.APPROVED, 0, PASS_USED)
    assert city.activity[city.card_position[RICH]].cap_spent[0] == 0  # nothing counted towards the cap


# --- multi-ride tickets ------------------------------------------------------------------------


def test_a_ticket_pays_its_rides_then_stored_value_does(fp: ModuleType) -> None:
    city = build_city()
    ticket = hold_ticket(fp, city, RICH, "pool", rides=2)
    first = tap(fp, city, POOL_GATE, RICH, T0)
    assert paid(first) == (R.APPROVED, 0, PASS_USED, ticket.id)
    assert (first.product_rides, ticket.rides_used) == (1, 1)
    second = tap(fp, city, POOL_GATE, RICH, T0 + DAY)
    assert (paid(second), ticket.rides_used) == ((R.APPROVED, 0, PASS_USED, ticket.id), 2)
    third = tap(fp, city, POOL_GATE, RICH, T0 + 2 * DAY)
    assert paid(third) == (R.APPROVED, POOL_FARE, 0, -1)
    assert ticket.rides_used == 2


def test_the_oldest_ticket_pays_first_and_a_pass_before_any(fp: ModuleType) -> None:
    city = build_city()
    newer = hold_ticket(fp, city, RICH, "pool", rides=5)
    older = hold_ticket(fp, city, RICH, "pool", rides=5)
    older.id, newer.id = newer.id, older.id  # the second held is the older sale
    city.product_by_id.update({older.id: older, newer.id: newer})
    assert tap(fp, city, POOL_GATE, RICH, T0).product_id == older.id
    season = hold_season(fp, city, RICH, "pool", TODAY, TODAY + 29)
    d = tap(fp, city, POOL_GATE, RICH, T0 + DAY)
    assert (d.product_id, d.product_rides, older.rides_used, newer.rides_used) == (season.id, 0, 1, 0)


def test_a_free_transfer_uses_no_ride(fp: ModuleType) -> None:
    city = build_city()
    ticket = hold_ticket(fp, city, RICH, "bus", rides=10)
    assert paid(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, 0, PASS_USED, ticket.id)
    change = tap(fp, city, BUS_B, RICH, T0 + 20 * MINUTE)
    assert paid(change) == (R.APPROVED, 0, TapInfo.TRANSFER, -1)
    assert ticket.rides_used == 1
    later = tap(fp, city, BUS_A, RICH, T0 + 3 * 60 * MINUTE)  # a new journey
    assert (later.product_id, ticket.rides_used) == (ticket.id, 2)


def test_a_discounted_transfer_takes_a_ride(fp: ModuleType) -> None:
    city = build_city(RULES.replace('fare = "free"', "discount_percent = 50"))
    ticket = hold_ticket(fp, city, RICH, "bus", rides=10)
    tap(fp, city, BUS_A, RICH, T0)
    change = tap(fp, city, BUS_B, RICH, T0 + 20 * MINUTE)
    assert paid(change) == (R.APPROVED, 0, TapInfo.TRANSFER | PASS_USED, ticket.id)
    assert ticket.rides_used == 2


def test_one_ride_pays_a_whole_stay(fp: ModuleType) -> None:
    city = build_city()
    ticket = hold_ticket(fp, city, RICH, "bikes", rides=3)
    entry = tap(fp, city, BIKE_DOCK, RICH, T0)
    assert paid(entry) == (R.APPROVED, 0, PASS_USED, ticket.id)
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 5 * 60 * MINUTE, exit_tap=True)
    assert (exit_.result, exit_.amount, exit_.product_id, ticket.rides_used) == (R.APPROVED, 0, -1, 1)


def test_a_declined_tap_uses_no_ride(fp: ModuleType) -> None:
    city = build_city()
    ticket = hold_ticket(fp, city, RICH, "pool", rides=3)
    tap(fp, city, POOL_GATE, RICH, T0)
    again = tap(fp, city, POOL_GATE, RICH, T0 + MINUTE)  # anti-passback
    assert (again.result, again.product_id, ticket.rides_used) == (R.ALREADY_VALIDATED, -1, 1)


def test_a_failed_batch_gives_the_ride_back() -> None:
    city = build_city()
    processor = Processor(city, None)
    ticket = hold_ticket(fastpath, city, RICH, "pool", rides=3)
    d = tap(fastpath, city, POOL_GATE, RICH, T0)
    assert ticket.rides_used == 1
    processor.batch_done([d], committed=False)
    assert ticket.rides_used == 0
    d = tap(fastpath, city, POOL_GATE, RICH, T0 + 1000)
    processor.batch_done([d], committed=True)
    assert ticket.rides_used == 1


# --- reversals -----------------------------------------------------------------------------------


def test_reversing_a_ticket_ride_gives_the_ride_back(fp: ModuleType) -> None:
    city = build_city()
    ticket = hold_ticket(fp, city, RICH, "pool", rides=3)
    ride = tap(fp, city, POOL_GATE, RICH, T0)
    back = reverse(fp, city, ride, T0 + MINUTE)
    assert (back.result, back.amount, back.product_id, back.product_rides) == (R.APPROVED, 0, ticket.id, -1)
    assert ticket.rides_used == 0


def test_a_card_office_refund_of_another_terminals_tap(fp: ModuleType) -> None:
    city = build_city()
    fare = tap(fp, city, BUS_A, RICH, T0)
    refund = reverse(fp, city, fare, T0 + MINUTE, terminal=POOL_GATE)
    assert (refund.result, refund.amount, refund.balance) == (R.APPROVED, BUS_FARE, 10_000)
    # The refund belongs to the bus: its revenue pays it back, its cap forgets the fare.
    assert (refund.service_id, refund.source, refund.original_terminal) == (BUS, city.revenue_account[BUS], BUS_A)
    assert city.activity[city.card_position[RICH]].cap_spent[0] == 0


def test_a_refunded_fare_no_longer_counts_towards_the_caps(fp: ModuleType) -> None:
    city = build_city()
    morning = T0 - 12 * 60 * MINUTE  # 10:13, the same day as T0
    first = tap(fp, city, BUS_A, RICH, morning)
    tap(fp, city, BUS_A, RICH, morning + 60 * MINUTE)
    assert tap(fp, city, BUS_A, RICH, morning + 120 * MINUTE).amount == 0  # 300 reached: capped
    # Refunded at the card office, within its 30 days.
    refund = reverse(fp, city, first, morning + 121 * MINUTE, terminal=POOL_GATE, window_ms=OFFICE_WINDOW_MS)
    assert refund.result == R.APPROVED
    assert paid(tap(fp, city, BUS_A, RICH, morning + 180 * MINUTE)) == (R.APPROVED, BUS_FARE, 0, -1)


def test_an_exit_cannot_be_reversed(fp: ModuleType) -> None:
    city = build_city()
    tap(fp, city, BIKE_DOCK, RICH, T0)
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 60 * MINUTE, exit_tap=True)
    assert exit_.info & TapInfo.REFUNDED
    assert reverse(fp, city, exit_, T0 + 61 * MINUTE).result == R.NOT_REVERSIBLE


def test_reversing_an_entry_closes_its_stay(fp: ModuleType) -> None:
    city = build_city()
    entry = tap(fp, city, BIKE_DOCK, RICH, T0)
    back = reverse(fp, city, entry, T0 + MINUTE)
    assert (back.result, back.amount, back.balance) == (R.APPROVED, BIKE_MAX, 10_000)
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 2 * MINUTE, exit_tap=True)
    assert (exit_.result, exit_.amount, exit_.info & TapInfo.REFUNDED) == (R.APPROVED, 0, 0)  # nothing more back


def test_an_entry_whose_stay_has_ended_cannot_be_reversed(fp: ModuleType) -> None:
    city = build_city()
    entry = tap(fp, city, BIKE_DOCK, RICH, T0)
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 5 * MINUTE, exit_tap=True)
    assert exit_.amount == BIKE_MAX - BIKE_FARE
    assert reverse(fp, city, entry, T0 + 6 * MINUTE).result == R.NOT_REVERSIBLE


def test_a_top_up_is_reversed_only_at_its_own_kiosk(fp: ModuleType) -> None:
    city = build_city()
    fare = tap(fp, city, BUS_A, RICH, T0)
    fare.kind = OperationKind.TOPUP  # as if BUS_A had recorded a top-up
    assert reverse(fp, city, fare, T0 + MINUTE, terminal=BUS_B).result == R.NOT_REVERSIBLE


def test_a_failed_batch_undoes_a_reversal() -> None:
    city = build_city()
    processor = Processor(city, None)
    ticket = hold_ticket(fastpath, city, RICH, "bikes", rides=3)
    entry = tap(fastpath, city, BIKE_DOCK, RICH, T0)
    processor.batch_done([entry], committed=True)
    back = reverse(fastpath, city, entry, T0 + MINUTE)
    activity = city.activity[city.card_position[RICH]]
    assert (ticket.rides_used, activity.stay_service) == (0, -1)
    processor.batch_done([back], committed=False)
    assert (ticket.rides_used, activity.stay_service, activity.stay_ms) == (1, BIKES, T0)
    fare = tap(fastpath, city, BUS_A, RICH, T0 + 2 * MINUTE)
    processor.batch_done([fare], committed=True)
    refund = reverse(fastpath, city, fare, T0 + 3 * MINUTE)
    assert activity.cap_spent[0] == 0
    processor.batch_done([refund], committed=False)
    assert (activity.cap_spent[0], activity.cap_spent[fastpath.CAP_GROUPS_MAX]) == (BUS_FARE, BUS_FARE)


# --- both twins agree ---------------------------------------------------------------------------

TERMINALS = [BUS_A, BUS_B, POOL_GATE, BIKE_DOCK]
steps = st.lists(
    st.tuples(
        st.sampled_from(TERMINALS),
        st.sampled_from(list(CARDS)),
        st.integers(min_value=0, max_value=DAY),  # time step, ms
        st.booleans(),  # exit
        st.booleans(),  # reverse it at once
    ),
    max_size=50,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.integers(min_value=0, max_value=3))
def test_twins_agree_with_products(sequence: list[tuple[int, int, int, bool, bool]], rides: int) -> None:
    compiled, pure = load_twin("cython"), load_twin("pure")
    decided: dict[ModuleType, list[tuple[int, ...]]] = {compiled: [], pure: []}
    for fp in (compiled, pure):
        city = build_city()
        global _product_ids
        _product_ids = iter(range(1, 1_000_000))
        hold_ticket(fp, city, RICH, "pool", rides=rides)
        hold_ticket(fp, city, POOR, "bikes", rides=rides)
        hold_season(fp, city, POOR, "bus", TODAY, TODAY + 1)
        now = T0
        for terminal, uid, step_ms, exit_tap, undo in sequence:
            now += step_ms
            d = tap(fp, city, terminal, uid, now, exit_tap=exit_tap)
            decided[fp].append((d.result, d.amount, d.balance, d.info, d.product_id, d.product_rides))
            if undo and d.result == R.APPROVED:
                back = reverse(fp, city, d, now + 1)
                decided[fp].append((back.result, back.amount, back.balance, back.product_id, back.product_rides))
        decided[fp].append(tuple(product.rides_used for product in city.product_by_id.values()))
    assert decided[compiled] == decided[pure]
