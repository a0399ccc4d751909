"""The city-card rules in the decision ladder, one rule at a time, on both twins.

A small city with a rules version compiled by engine.policy: a bus (per use,
45-minute free transfer, daily cap 300, monthly cap 400, a little debt
tolerated), a pool (anti-passback 300 s), a bike dock (a minimum balance to
enter), a library (identification only). Every test decides taps with the
``fp`` twin (compiled, then pure) on a fresh city and checks result, fare and
``info``; a property test then runs random tap sequences through both twins
and compares every decision and every cell of the city.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import fastpath
from engine.codes import CardStatus, ResultCode, ServiceKind, TapInfo, TerminalKind
from engine.policy import compile_policy
from engine.processor import Processor
from engine.rules import parse_rules
from engine.state import CityState, Terminal
from tests.twins import load_twin

R = ResultCode
STANDARD, STUDENT = 0, 1
BUS, POOL, BIKES, LIBRARY = 1, 2, 3, 4
SERVICE_IDS = {"bus": BUS, "pool": POOL, "bikes": BIKES, "library": LIBRARY}
BUS_FARE, BUS_FARE_STUDENT, POOL_FARE, BIKE_FARE = 150, 75, 400, 50
BUS_A, BUS_B, POOL_GATE, BIKE_DOCK, LIBRARY_GATE, FAR_BUS = 1, 2, 3, 4, 5, 6

RULES = """
[rules]
version = 7
name = "rules under test"

[[services]]
code = "bus"
kind = "per_use"
fares = { standard = 150, student = 75 }
tolerated_negative_cents = 50

[[services]]
code = "pool"
kind = "per_use"
fares = { standard = 400, student = 250 }
passback_window_s = 300

[[services]]
code = "bikes"
kind = "per_duration"
fares = { standard = 50, student = 25 }
max_charge_cents = 600
min_balance_to_enter_cents = 200

[[services]]
code = "library"
kind = "identification"
fares = { standard = 0, student = 0 }

[transfer]
window_minutes = 45
services = ["bus"]
fare = "free"

[[caps]]
group = "bus"
daily_cents = 300
monthly_cents = 400

[concessions]
show_id_permille = 0

[security]
clone_blocks_card = true
sharing_max_speed_kmh = 120
sharing_min_distance_m = 500
"""

# 2023-11-14 22:13:20 UTC, a Tuesday in the middle of a month.
T0 = 1_700_000_000_000
MINUTE = 60_000
DAY = 86_400_000

RICH, STUDENT_CARD, POOR, DEBT = 100, 101, 102, 103
CARDS = {  # uid -> (balance, floor, profile)
    RICH: (10_000, 0, STANDARD),
    STUDENT_CARD: (10_000, 0, STUDENT),
    POOR: (150, 0, STANDARD),
    DEBT: (100, -100, STANDARD),
}
# Two bus stops 10 km apart (Gijón's centre and the university), and one
# 200 m from the first.
LOCATIONS = {BUS_A: (43.5453, -5.6615), BUS_B: (43.5240, -5.6110), FAR_BUS: (43.5440, -5.6600)}


def build_city(rules_text: str = RULES) -> CityState:
    city = CityState()
    funding = city.add_account(1, 0, -(2**62), 2**63 - 1)
    for service_id in SERVICE_IDS.values():
        city.revenue_account[service_id] = city.add_account(10 + service_id, 0, 0, 2**63 - 1)
    rules = parse_rules(rules_text)
    for code, service_id in SERVICE_IDS.items():
        for profile_code, fare in rules.service(code).fares.items():
            city.set_fare(service_id, {"standard": STANDARD, "student": STUDENT}[profile_code], fare)
    compile_policy(rules, SERVICE_IDS, city.group_id).install(city)
    city.rules_version = rules.version
    for uid, (balance, floor, profile) in CARDS.items():
        city.add_account(1000 + uid, balance, floor, 100_000)
        city.add_card(uid, CardStatus.ACTIVE, profile, 1000 + uid, holder_id=uid, eligible=(0, 2**31 - 1))
    for terminal_id, service in (
        (BUS_A, BUS),
        (BUS_B, BUS),
        (POOL_GATE, POOL),
        (BIKE_DOCK, BIKES),
        (LIBRARY_GATE, LIBRARY),
        (FAR_BUS, BUS),
    ):
        latitude, longitude = LOCATIONS.get(terminal_id, (None, None))
        city.terminals[terminal_id] = Terminal(
            id=terminal_id, service_id=service, kind=TerminalKind.VALIDATOR, key_version=1, active=True,
            funding_account=funding if False else -1, high_seq=-1, latitude=latitude, longitude=longitude,
        )  # fmt: skip
    return city


_seq = 0


def tap(
    fp: ModuleType, city: CityState, terminal: int, uid: int, at_ms: int, *, counter: int = 0, exit_tap: bool = False
) -> Any:
    global _seq
    _seq += 1
    d = fp.Decision(
        terminal, _seq, 0, uid, counter, fp.TAP_FLAG_EXIT if exit_tap else 0, 0, None, at_ms, at_ms,
        city.terminals[terminal].service_id,
    )  # fmt: skip
    fp.decide_tap(city, city.terminals[terminal], d)
    return d


def outcome(d: Any) -> tuple[int, int, int]:
    return (d.result, d.amount, d.info)


# --- the policy as compiled --------------------------------------------------------


def test_the_rules_compile_into_policy_rows() -> None:
    city = build_city()
    bus = city.service_policy[BUS]
    assert bus[fastpath.POLICY_KIND] == ServiceKind.PER_USE
    assert bus[fastpath.POLICY_TOLERATED_NEGATIVE] == 50
    assert bus[fastpath.POLICY_TRANSFER] == 1
    assert bus[fastpath.POLICY_CAP_GROUP] == 0
    assert city.service_policy[POOL][fastpath.POLICY_PASSBACK_MS] == 300_000
    assert city.service_policy[POOL][fastpath.POLICY_CAP_GROUP] == fastpath.NO_CAP
    assert city.service_policy[BIKES][fastpath.POLICY_KIND] == ServiceKind.PER_DURATION
    assert city.service_policy[BIKES][fastpath.POLICY_MIN_BALANCE] == 200
    assert city.service_policy[BIKES][fastpath.POLICY_MAX_CHARGE] == 600
    assert (city.cap_daily[0], city.cap_monthly[0], city.cap_daily[1]) == (300, 400, -1)
    assert (city.transfer_window_ms, city.transfer_percent_off) == (45 * MINUTE, 100)
    assert city.clone_blocks_card and city.rules_version == 7


# --- clones --------------------------------------------------------------------------


def test_a_counter_that_repeats_or_goes_back_is_a_clone_and_blocks_the_card(fp: ModuleType) -> None:
    city = build_city()
    assert tap(fp, city, LIBRARY_GATE, RICH, T0, counter=5).result == R.APPROVED
    assert tap(fp, city, LIBRARY_GATE, RICH, T0 + MINUTE, counter=6).result == R.APPROVED
    clone = tap(fp, city, LIBRARY_GATE, RICH, T0 + 2 * MINUTE, counter=6)
    assert clone.result == R.CLONE_SUSPECTED
    assert city.card_status[city.card_position[RICH]] == CardStatus.BLOCKED
    # Blocked at once: the genuine card is declined too until the office looks at it.
    assert tap(fp, city, LIBRARY_GATE, RICH, T0 + 3 * MINUTE, counter=7).result == R.CARD_NOT_ACTIVE


def test_a_counter_going_backwards_is_a_clone(fp: ModuleType) -> None:
    city = build_city()
    tap(fp, city, LIBRARY_GATE, RICH, T0, counter=9)
    assert tap(fp, city, LIBRARY_GATE, RICH, T0 + MINUTE, counter=3).result == R.CLONE_SUSPECTED


def test_without_the_blocking_policy_a_clone_is_declined_but_not_blocked(fp: ModuleType) -> None:
    city = build_city(RULES.replace("clone_blocks_card = true", "clone_blocks_card = false"))
    tap(fp, city, LIBRARY_GATE, RICH, T0, counter=5)
    assert tap(fp, city, LIBRARY_GATE, RICH, T0 + MINUTE, counter=5).result == R.CLONE_SUSPECTED
    assert city.card_status[city.card_position[RICH]] == CardStatus.ACTIVE
    assert tap(fp, city, LIBRARY_GATE, RICH, T0 + 2 * MINUTE, counter=6).result == R.APPROVED


def test_cards_that_do_not_count_are_never_clones(fp: ModuleType) -> None:
    city = build_city()
    results = [tap(fp, city, LIBRARY_GATE, RICH, T0 + n * MINUTE, counter=0).result for n in range(3)]
    assert results == [R.APPROVED] * 3


def test_a_declined_tap_still_moves_the_counter_on(fp: ModuleType) -> None:
    city = build_city()
    assert tap(fp, city, POOL_GATE, POOR, T0, counter=4).result == R.INSUFFICIENT_FUNDS
    assert tap(fp, city, POOL_GATE, POOR, T0 + MINUTE, counter=4).result == R.CLONE_SUSPECTED


# --- anti-passback ---------------------------------------------------------------------


def test_passback_at_a_gate_service(fp: ModuleType) -> None:
    city = build_city()
    assert outcome(tap(fp, city, POOL_GATE, RICH, T0)) == (R.APPROVED, POOL_FARE, 0)
    assert tap(fp, city, POOL_GATE, RICH, T0 + 10_000).result == R.ALREADY_VALIDATED
    # The exit is not a passback, and it is free.
    assert outcome(tap(fp, city, POOL_GATE, RICH, T0 + 20_000, exit_tap=True)) == (R.APPROVED, 0, 0)
    # An exit counts as the last passage: the window runs from it.
    assert tap(fp, city, POOL_GATE, RICH, T0 + 20_000 + 299_999).result == R.ALREADY_VALIDATED
    assert tap(fp, city, POOL_GATE, RICH, T0 + 20_000 + 300_000).result == R.APPROVED


def test_a_declined_tap_is_no_passage(fp: ModuleType) -> None:
    city = build_city()
    assert tap(fp, city, POOL_GATE, POOR, T0).result == R.INSUFFICIENT_FUNDS
    city.balance[city.card_account[city.card_position[POOR]]] = 1000  # topped up meanwhile
    assert tap(fp, city, POOL_GATE, POOR, T0 + 10_000).result == R.APPROVED


def test_passback_does_not_apply_where_the_rules_do_not_set_it(fp: ModuleType) -> None:
    city = build_city()
    assert [tap(fp, city, LIBRARY_GATE, RICH, T0 + n).result for n in range(3)] == [R.APPROVED] * 3


# --- transfers and caps -----------------------------------------------------------------


def test_a_change_of_bus_within_the_window_is_free(fp: ModuleType) -> None:
    city = build_city(RULES.replace("daily_cents = 300", "daily_cents = 3000").replace("= 400", "= 4000"))
    assert outcome(tap(fp, city, BUS_A, RICH, T0)) == (R.APPROVED, BUS_FARE, 0)
    # Changes at a stop 200 m away (no sharing suspected between them).
    assert outcome(tap(fp, city, FAR_BUS, RICH, T0 + 44 * MINUTE)) == (R.APPROVED, 0, TapInfo.TRANSFER)
    assert outcome(tap(fp, city, BUS_A, RICH, T0 + 45 * MINUTE)) == (R.APPROVED, 0, TapInfo.TRANSFER)
    # The window runs from the first paid boarding, not from the last change.
    assert outcome(tap(fp, city, FAR_BUS, RICH, T0 + 46 * MINUTE)) == (R.APPROVED, BUS_FARE, 0)


def test_a_discounted_transfer(fp: ModuleType) -> None:
    rules = RULES.replace('fare = "free"', "discount_percent = 40").replace("daily_cents = 300", "daily_cents = 3000")
    city = build_city(rules.replace("= 400", "= 4000"))
    tap(fp, city, BUS_A, STUDENT_CARD, T0)
    assert outcome(tap(fp, city, BUS_B, STUDENT_CARD, T0 + 5 * MINUTE)) == (R.APPROVED, 45, TapInfo.TRANSFER)


def test_the_daily_cap_charges_only_what_is_left(fp: ModuleType) -> None:
    city = build_city(RULES.replace("window_minutes = 45", "window_minutes = 1"))
    fares = [outcome(tap(fp, city, BUS_A, RICH, T0 - 60 * MINUTE + n * 2 * MINUTE)) for n in range(3)]
    assert fares == [(R.APPROVED, 150, 0), (R.APPROVED, 150, 0), (R.APPROVED, 0, TapInfo.CAPPED)]


def test_a_partly_spent_cap(fp: ModuleType) -> None:
    city = build_city(
        RULES.replace("daily_cents = 300", "daily_cents = 200").replace("window_minutes = 45", "window_minutes = 1")
    )
    fares = [outcome(tap(fp, city, BUS_A, RICH, T0 - 60 * MINUTE + n * 2 * MINUTE)) for n in range(3)]
    assert fares == [(R.APPROVED, 150, 0), (R.APPROVED, 50, TapInfo.CAPPED), (R.APPROVED, 0, TapInfo.CAPPED)]


def test_the_monthly_cap_outlasts_the_day(fp: ModuleType) -> None:
    city = build_city(RULES.replace("window_minutes = 45", "window_minutes = 1"))
    day_one = [tap(fp, city, BUS_A, RICH, T0 - 60 * MINUTE + n * 2 * MINUTE).amount for n in range(2)]
    day_two = [tap(fp, city, BUS_A, RICH, T0 + DAY + n * 2 * MINUTE).amount for n in range(3)]
    assert day_one == [150, 150]
    assert day_two == [100, 0, 0]  # 400 a month: 100 left


def test_a_new_month_starts_the_caps_again(fp: ModuleType) -> None:
    city = build_city(RULES.replace("window_minutes = 45", "window_minutes = 1"))
    for n in range(3):
        tap(fp, city, BUS_A, RICH, T0 - 60 * MINUTE + n * 2 * MINUTE)
    # 2023-12-01: a new day and a new month.
    december = 1_701_388_800_000 + 8 * 3_600_000
    assert tap(fp, city, BUS_A, RICH, december).amount == BUS_FARE


# --- paid by the hour ------------------------------------------------------------------

HOUR = 3_600_000
BIKE_MAX = 600


def test_an_hourly_stay_takes_the_maximum_at_entry_and_returns_the_rest_at_exit(fp: ModuleType) -> None:
    city = build_city()
    entry = tap(fp, city, BIKE_DOCK, RICH, T0)
    assert (entry.result, entry.amount, entry.balance) == (R.APPROVED, BIKE_MAX, 10_000 - BIKE_MAX)
    account = city.card_account[city.card_position[RICH]]
    assert city.pending_debit[account] == BIKE_MAX
    # 90 minutes: two started hours at 50.
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 90 * MINUTE, exit_tap=True)
    assert outcome(exit_) == (R.APPROVED, BIKE_MAX - 2 * BIKE_FARE, TapInfo.REFUNDED)
    assert (exit_.source, exit_.target) == (city.revenue_account[BIKES], account)
    assert city.pending_credit[account] == BIKE_MAX - 2 * BIKE_FARE  # spendable once committed
    assert (exit_.stay_ms, exit_.stay_charged) == (T0, BIKE_MAX)
    # The stay is closed: a second exit returns nothing.
    assert outcome(tap(fp, city, BIKE_DOCK, RICH, T0 + 91 * MINUTE, exit_tap=True)) == (R.APPROVED, 0, 0)


def test_a_short_stay_costs_one_hour_and_a_long_one_the_maximum(fp: ModuleType) -> None:
    city = build_city()
    tap(fp, city, BIKE_DOCK, RICH, T0)
    assert tap(fp, city, BIKE_DOCK, RICH, T0 + 1000, exit_tap=True).amount == BIKE_MAX - BIKE_FARE
    tap(fp, city, BIKE_DOCK, RICH, T0 + 2 * HOUR)
    # 20 hours at 50 would be 1,000: the stay costs its maximum, nothing returns.
    assert outcome(tap(fp, city, BIKE_DOCK, RICH, T0 + 22 * HOUR, exit_tap=True)) == (R.APPROVED, 0, 0)


def test_a_missing_exit_leaves_the_maximum_charged(fp: ModuleType) -> None:
    city = build_city()
    first = tap(fp, city, BIKE_DOCK, RICH, T0)
    second = tap(fp, city, BIKE_DOCK, RICH, T0 + 3 * HOUR)  # a new entry: the first stay never ended
    assert (first.amount, second.amount) == (BIKE_MAX, BIKE_MAX)
    exit_ = tap(fp, city, BIKE_DOCK, RICH, T0 + 3 * HOUR + 10 * MINUTE, exit_tap=True)
    assert exit_.amount == BIKE_MAX - BIKE_FARE  # only the second stay is settled


def test_a_free_profile_has_nothing_held(fp: ModuleType) -> None:
    city = build_city(
        RULES.replace("fares = { standard = 50, student = 25 }", "fares = { standard = 50, student = 0 }")
    )
    assert outcome(tap(fp, city, BIKE_DOCK, STUDENT_CARD, T0)) == (R.APPROVED, 0, 0)
    assert outcome(tap(fp, city, BIKE_DOCK, STUDENT_CARD, T0 + HOUR, exit_tap=True)) == (R.APPROVED, 0, 0)


def test_an_entry_needs_the_maximum_charge(fp: ModuleType) -> None:
    city = build_city(RULES.replace("min_balance_to_enter_cents = 200", "min_balance_to_enter_cents = 0"))
    assert tap(fp, city, BIKE_DOCK, POOR, T0).result == R.INSUFFICIENT_FUNDS  # 150 < 600


def test_a_failed_batch_reopens_or_forgets_a_stay() -> None:
    city = build_city()
    processor = Processor(city, None)
    entry = tap(fastpath, city, BIKE_DOCK, RICH, T0)
    processor.batch_done([entry], committed=False)
    activity = city.activity[city.card_position[RICH]]
    assert (activity.stay_service, activity.stay_charged) == (-1, 0)  # the entry never happened
    entry = tap(fastpath, city, BIKE_DOCK, RICH, T0 + 1000)
    processor.batch_done([entry], committed=True)
    exit_ = tap(fastpath, city, BIKE_DOCK, RICH, T0 + 2000, exit_tap=True)
    processor.batch_done([exit_], committed=False)
    assert (activity.stay_service, activity.stay_ms, activity.stay_charged) == (BIKES, T0 + 1000, BIKE_MAX)
    # The terminal's retry settles the same stay.
    assert tap(fastpath, city, BIKE_DOCK, RICH, T0 + 3000, exit_tap=True).amount == BIKE_MAX - BIKE_FARE


# --- money at the door ------------------------------------------------------------------


def test_a_minimum_balance_to_enter(fp: ModuleType) -> None:
    city = build_city()
    assert tap(fp, city, BIKE_DOCK, POOR, T0).result == R.MINIMUM_BALANCE
    # Returning a bike is an exit: no minimum.
    assert tap(fp, city, BIKE_DOCK, POOR, T0 + MINUTE, exit_tap=True).result == R.APPROVED
    assert outcome(tap(fp, city, BIKE_DOCK, RICH, T0)) == (R.APPROVED, 600, 0)  # the hold of a stay


def test_a_small_tolerated_negative_balance(fp: ModuleType) -> None:
    city = build_city()
    d = tap(fp, city, BUS_A, DEBT, T0)
    assert (d.result, d.balance) == (R.APPROVED, -50)  # the bus tolerates 50 below zero
    # The pool tolerates nothing: 400 on -50 is declined, not taken to the account's floor.
    assert tap(fp, city, POOL_GATE, DEBT, T0 + MINUTE).result == R.INSUFFICIENT_FUNDS


def test_the_account_floor_is_the_hard_limit(fp: ModuleType) -> None:
    city = build_city(RULES.replace("tolerated_negative_cents = 50", "tolerated_negative_cents = 1000"))
    assert tap(fp, city, BUS_A, POOR, T0).balance == 0
    assert tap(fp, city, BUS_A, POOR, T0 + 50 * MINUTE).result == R.INSUFFICIENT_FUNDS  # floor 0


# --- inspection -------------------------------------------------------------------------


def test_show_id_is_sampled_among_concession_taps(fp: ModuleType) -> None:
    city = build_city(RULES.replace("show_id_permille = 0", "show_id_permille = 1000"))
    assert tap(fp, city, LIBRARY_GATE, STUDENT_CARD, T0).info == TapInfo.SHOW_ID
    assert tap(fp, city, LIBRARY_GATE, RICH, T0).info == 0  # standard fares are not inspected
    city = build_city(RULES.replace("show_id_permille = 0", "show_id_permille = 100"))
    flagged = sum(bool(tap(fp, city, LIBRARY_GATE, STUDENT_CARD, T0 + n).info & TapInfo.SHOW_ID) for n in range(2000))
    assert 120 <= flagged <= 280  # 10% of 2,000, give or take


def test_a_card_seen_too_far_too_soon_is_flagged(fp: ModuleType) -> None:
    city = build_city()
    tap(fp, city, BUS_A, STUDENT_CARD, T0)
    # 10 km in two minutes: 300 km/h.
    flagged = tap(fp, city, BUS_B, STUDENT_CARD, T0 + 2 * MINUTE)
    assert flagged.info == TapInfo.SHARING_SUSPECTED | TapInfo.SHOW_ID | TapInfo.TRANSFER
    # 200 m is under the minimum distance, however soon.
    tap(fp, city, BUS_A, RICH, T0)
    assert not tap(fp, city, FAR_BUS, RICH, T0 + 1000).info & TapInfo.SHARING_SUSPECTED
    # 10 km in an hour is a bus ride.
    tap(fp, city, BUS_A, POOR, T0)
    assert not tap(fp, city, BUS_B, POOR, T0 + 60 * MINUTE).info & TapInfo.SHARING_SUSPECTED


# --- a failed batch is forgotten --------------------------------------------------------


def test_a_failed_batch_gives_back_the_counter_and_the_cap() -> None:
    city = build_city()
    processor = Processor(city, None)
    d = tap(fastpath, city, BUS_A, RICH, T0, counter=11)
    assert (d.result, d.amount, d.cap_group) == (R.APPROVED, BUS_FARE, 0)
    activity = city.activity[city.card_position[RICH]]
    assert (activity.counter, activity.cap_spent[0]) == (11, BUS_FARE)
    processor.batch_done([d], committed=False)
    assert (activity.counter, activity.cap_spent[0], activity.cap_spent[fastpath.CAP_GROUPS_MAX]) == (0, 0, 0)
    # The terminal's retry with the same counter is not a clone.
    assert tap(fastpath, city, BUS_A, RICH, T0 + 1000, counter=11).result == R.APPROVED


# --- both twins, random sequences ----------------------------------------------------------

TERMINALS = [BUS_A, BUS_B, POOL_GATE, BIKE_DOCK, LIBRARY_GATE, FAR_BUS]
steps = st.lists(
    st.tuples(
        st.sampled_from(TERMINALS),
        st.sampled_from(list(CARDS)),
        st.integers(min_value=0, max_value=3 * DAY),  # time step, ms
        st.integers(min_value=0, max_value=3),  # counter step (0: the card does not count)
        st.booleans(),  # exit
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_twins_agree_on_random_days(sequence: list[tuple[int, int, int, int, bool]]) -> None:
    compiled, pure = load_twin("cython"), load_twin("pure")
    cities = {compiled: build_city(), pure: build_city()}
    decided: dict[ModuleType, list[tuple[int, ...]]] = {compiled: [], pure: []}
    for fp in (compiled, pure):
        city = cities[fp]
        now, counters = T0, dict.fromkeys(CARDS, 0)
        for terminal, uid, step_ms, counter_step, exit_tap in sequence:
            now += step_ms
            counters[uid] += counter_step
            counter = counters[uid] if counter_step else 0
            d = tap(fp, city, terminal, uid, now, counter=counter, exit_tap=exit_tap)
            decided[fp].append((d.result, d.amount, d.balance, d.info, d.fare_profile, d.cap_group))
    assert decided[compiled] == decided[pure]
    for column in ("pending_debit", "card_status"):
        assert bytes(getattr(cities[compiled], column)) == bytes(getattr(cities[pure], column))


def test_a_failed_batch_forgets_the_passage() -> None:
    """The terminal's retry of a tap whose batch failed is not "already validated"."""
    city = build_city()
    processor = Processor(city, None)
    d = tap(fastpath, city, POOL_GATE, RICH, T0)
    processor.batch_done([d], committed=False)
    retry = tap(fastpath, city, POOL_GATE, RICH, T0 + 1000)
    assert (retry.result, retry.amount) == (R.APPROVED, POOL_FARE)
    assert tap(fastpath, city, POOL_GATE, RICH, T0 + 2000).result == R.ALREADY_VALIDATED
