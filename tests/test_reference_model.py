"""The engine's decisions against a small, obviously correct reference model.

Hypothesis draws random days of city life on the rules city of
tests/test_city_rules.py: taps at buses, a pool gate, a bike dock and a
library (with card counters, exits and time passing), top-ups at a kiosk,
season passes and multi-ride tickets sold, card-office refunds of earlier
taps, blocks and unblocks, and card replacements. Each step goes to the engine's
decision ladder (the selected twin), whose approved amounts are committed at
once as the batch writer would, and to the model below: a plain
re-statement of docs/rules.md with dictionaries and no shortcuts. Every
decision (result, amount, info) and every balance must agree.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import fastpath
from engine.codes import CardStatus, ResultCode, TapInfo, TerminalKind
from engine.limits import OFFICE_REFUND_WINDOW_S
from engine.processor import Processor
from engine.state import CityState, Terminal
from tests.test_city_rules import (
    BIKE_DOCK,
    BUS,
    BUS_A,
    BUS_B,
    CARDS,
    FAR_BUS,
    LIBRARY_GATE,
    LOCATIONS,
    POOL,
    POOL_GATE,
    STANDARD,
    T0,
    build_city,
)

R = ResultCode
KIOSK = 9
KIOSK_SERVICE = 4  # the library's service: kiosks identify, their money comes from funding
DAY_MS = 86_400_000
EPOCH = datetime.date(1970, 1, 1)

# The rules of tests/test_city_rules.py, restated.
FARES = {BUS: {0: 150, 1: 75}, POOL: {0: 400, 1: 250}, 3: {0: 50, 1: 25}, 4: {0: 0, 1: 0}}
TOLERATED = {BUS: 50}
PASSBACK_MS = {POOL: 300_000}
MINIMUM = {3: 200}
HOURLY = {3: 600}  # service -> the maximum charge of a stay (bikes, by the hour)
HOUR_MS = 3_600_000
TRANSFER_MS = 45 * 60_000
DAILY_CAP, MONTHLY_CAP = 300, 400
SPEED_KMH, MIN_DISTANCE_M = 120, 500
TOPUP_MAX = fastpath.TOPUP_MAX_CENTS
GROUPS = {BUS: "bus", POOL: "pool", 3: "bikes", 4: "library"}
REFUND_WINDOW_MS = OFFICE_REFUND_WINDOW_S * 1000


@dataclass
class ModelProduct:
    id: int
    group: str
    season: bool
    first_day: int = 0  # season passes: valid on [first_day, last_day]
    last_day: int = 0
    rides: int = 0  # tickets
    used: int = 0


@dataclass
class ModelTap:
    """An approved tap as the record holds it, for refunds."""

    uid: int
    terminal: int
    service: int
    at: int
    amount: int
    info: int
    exit_tap: bool
    product: ModelProduct | None
    decision: object  # the engine's Decision, for its Original
    refunded: bool = False


@dataclass
class ModelCard:
    account: int
    profile: int
    status: int = CardStatus.ACTIVE
    counter: int = 0


@dataclass
class ModelAccount:
    balance: int
    floor: int
    products: list[ModelProduct] = field(default_factory=list)
    counter_seen: int = 0
    last: tuple[int, int, int] | None = None  # (ms, terminal, service) of the last approved tap
    journey_start: int | None = None
    cap_day: int | None = None
    day_spent: int = 0
    cap_month: tuple[int, int] | None = None
    month_spent: int = 0
    stay: tuple[int, int, int] | None = None  # (service, entry ms, charged) of an open stay


@dataclass
class Model:
    cards: dict[int, ModelCard] = field(default_factory=dict)
    accounts: dict[int, ModelAccount] = field(default_factory=dict)
    # Card memory is kept per card in the engine; replacements here share the
    # account but not the memory, as in the engine.
    memory: dict[int, ModelAccount] = field(default_factory=dict)

    def tap(
        self, uid: int, terminal: int, service: int, at: int, counter: int, exit_tap: bool
    ) -> tuple[int, int, int, ModelProduct | None]:
        card = self.cards.get(uid)
        if card is None:
            return (R.UNKNOWN_CARD, 0, 0, None)
        if card.status != CardStatus.ACTIVE:
            return (R.CARD_NOT_ACTIVE, 0, 0, None)
        account = self.accounts[card.account]
        memory = self.memory.setdefault(uid, ModelAccount(0, 0))
        if counter and memory.counter_seen and counter <= memory.counter_seen:
            card.status = CardStatus.BLOCKED  # the rules block suspected clones
            return (R.CLONE_SUSPECTED, 0, 0, None)
        fare = FARES[service].get(card.profile)
        if fare is None:
            return (R.SERVICE_NOT_ALLOWED, 0, 0, None)
        if counter:
            memory.counter_seen = counter
        if service in PASSBACK_MS and not exit_tap and memory.last is not None:
            when, _, last_service = memory.last
            if last_service == service and at - when < PASSBACK_MS[service]:
                return (R.ALREADY_VALIDATED, 0, 0, None)
        info = 0
        if memory.last is not None and self._too_far(memory.last, terminal, at):
            info |= TapInfo.SHARING_SUSPECTED
            if card.profile != STANDARD:
                info |= TapInfo.SHOW_ID
        starts_journey = False
        refund = 0
        product = None
        day = at // DAY_MS
        seasons = [
            p for p in account.products if p.season and p.group == GROUPS[service] and p.first_day <= day <= p.last_day
        ]
        tickets = [p for p in account.products if not p.season and p.group == GROUPS[service] and p.used < p.rides]
        season = min(seasons, key=lambda p: p.last_day) if seasons else None
        ticket = min(tickets, key=lambda p: p.id) if tickets else None
        if exit_tap:
            if service in HOURLY and memory.stay is not None and memory.stay[0] == service and memory.stay[2] > 0:
                _, entered, charged = memory.stay
                hours = max(math.ceil((at - entered) / HOUR_MS), 1)
                refund = charged - min(fare * hours, charged)
                if refund:
                    info |= TapInfo.REFUNDED
            fare = 0
        elif fare and service in HOURLY:
            product = season or ticket
            fare = 0 if product is not None else HOURLY[service]
        elif fare:
            if season is not None:
                product, fare = season, 0
                starts_journey = service == BUS
            elif service == BUS and memory.journey_start is not None and at - memory.journey_start <= TRANSFER_MS:
                fare = 0
                info |= TapInfo.TRANSFER
            else:
                starts_journey = service == BUS
            if fare and ticket is not None:
                product, fare = ticket, 0
            if service == BUS and fare:
                day = at // DAY_MS
                month = month_of(day)
                if memory.cap_day != day:
                    memory.cap_day, memory.day_spent = day, 0
                    if memory.cap_month != month:
                        memory.cap_month, memory.month_spent = month, 0
                left = min(fare, max(DAILY_CAP - memory.day_spent, 0), max(MONTHLY_CAP - memory.month_spent, 0))
                if left < fare:
                    fare = left
                    info |= TapInfo.CAPPED
        if product is not None:
            info |= TapInfo.PASS_USED
        available = account.balance
        if not exit_tap and MINIMUM.get(service, 0) and available < MINIMUM[service] and product is None:
            return (R.MINIMUM_BALANCE, 0, info, None)
        floor = max(account.floor, -TOLERATED.get(service, 0))
        if available - fare < floor:
            return (R.INSUFFICIENT_FUNDS, 0, info, None)
        account.balance -= fare
        if product is not None and not product.season:
            product.used += 1
        memory.last = (at, terminal, service)
        if service in HOURLY:
            if not exit_tap:
                memory.stay = (service, at, fare)
            elif memory.stay is not None and memory.stay[0] == service:
                memory.stay = None
        if refund:
            account.balance += refund
            return (R.APPROVED, refund, info, None)
        if starts_journey:
            memory.journey_start = at
        if service == BUS and fare:
            memory.day_spent += fare
            memory.month_spent += fare
        return (R.APPROVED, fare, info, product)

    def refund(self, tap: ModelTap, at: int) -> tuple[int, int]:
        """The card office refunds an approved tap (docs/rules.md, "Refunds")."""
        if at - tap.at > REFUND_WINDOW_MS:
            return (R.REVERSAL_WINDOW_EXPIRED, 0)
        if tap.refunded:
            return (R.ALREADY_REVERSED, 0)
        if tap.exit_tap or tap.info & TapInfo.REFUNDED:
            return (R.NOT_REVERSIBLE, 0)
        memory = self.memory.setdefault(tap.uid, ModelAccount(0, 0))
        if tap.service in HOURLY:
            if memory.stay is None or memory.stay[:2] != (tap.service, tap.at):
                return (R.NOT_REVERSIBLE, 0)
            memory.stay = None
        tap.refunded = True
        account = self.accounts[self.cards[tap.uid].account]
        account.balance += tap.amount
        if tap.product is not None and not tap.product.season and tap.product.used > 0:
            tap.product.used -= 1
        if tap.service == BUS and tap.amount:
            day = tap.at // DAY_MS
            if memory.cap_day == day and memory.day_spent >= tap.amount:
                memory.day_spent -= tap.amount
            if memory.cap_month == month_of(day) and memory.month_spent >= tap.amount:
                memory.month_spent -= tap.amount
        return (R.APPROVED, tap.amount)

    def topup(self, uid: int, amount: int) -> tuple[int, int]:
        card = self.cards.get(uid)
        if card is None:
            return (R.UNKNOWN_CARD, 0)
        if card.status != CardStatus.ACTIVE:
            return (R.CARD_NOT_ACTIVE, 0)
        if not 1 <= amount <= TOPUP_MAX:
            return (R.INVALID_AMOUNT, 0)
        account = self.accounts[card.account]
        if account.balance + amount > 100_000:
            return (R.BALANCE_LIMIT, 0)
        account.balance += amount
        return (R.APPROVED, amount)

    @staticmethod
    def _too_far(last: tuple[int, int, int], terminal: int, at: int) -> bool:
        when, previous, _ = last
        if previous == terminal or previous not in LOCATIONS or terminal not in LOCATIONS:
            return False
        (lat_a, lon_a), (lat_b, lon_b) = LOCATIONS[previous], LOCATIONS[terminal]
        phi_a, phi_b = math.radians(lat_a), math.radians(lat_b)
        h = (
            math.sin((phi_b - phi_a) / 2) ** 2
            + math.cos(phi_a) * math.cos(phi_b) * math.sin(math.radians(lon_b - lon_a) / 2) ** 2
        )
        metres = 2 * 6_371_000.0 * math.asin(min(1.0, math.sqrt(h)))
        return metres >= MIN_DISTANCE_M and metres * 3600 > SPEED_KMH * max(at - when, 0)


def month_of(day: int) -> tuple[int, int]:
    import datetime

    date = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
    return (date.year, date.month)


# Buses twice over: most of a city's taps are on the bus.
TERMINALS = [BUS_A, BUS_B, FAR_BUS, BUS_A, BUS_B, FAR_BUS, POOL_GATE, BIKE_DOCK, LIBRARY_GATE]
UIDS = list(CARDS)
NEW_UIDS = [500, 501, 502]

tap_step = st.tuples(
    st.just("tap"),
    # A holder (by number: after a replacement, the holder taps the new card),
    # or now and then a card the city does not know.
    st.sampled_from([*range(len(UIDS))] * 5 + [999]),
    st.sampled_from(TERMINALS),
    # Mostly minutes (passback, transfers, sharing), sometimes hours or days
    # (caps roll over by day and by month).
    st.one_of(
        st.integers(min_value=0, max_value=10 * 60_000),
        st.integers(min_value=0, max_value=3 * 3_600_000),
        st.integers(min_value=0, max_value=4 * DAY_MS),
    ),
    st.integers(min_value=0, max_value=2),
    st.booleans(),
)
topup_step = st.tuples(st.just("topup"), st.sampled_from(UIDS + NEW_UIDS), st.integers(min_value=-10, max_value=60_000))
block_step = st.tuples(st.just("block"), st.integers(min_value=0, max_value=len(UIDS) - 1))
unblock_step = st.tuples(st.just("unblock"), st.integers(min_value=0, max_value=len(UIDS) - 1))
replace_step = st.tuples(st.just("replace"), st.sampled_from(UIDS), st.sampled_from(NEW_UIDS))
sell_step = st.tuples(
    st.just("sell"),
    st.integers(min_value=0, max_value=len(UIDS) - 1),
    st.sampled_from([BUS, POOL, 3]),
    st.booleans(),  # a season pass, else a ticket
    st.integers(min_value=0, max_value=2),  # starts in days (passes)
    st.integers(min_value=1, max_value=30),  # days (passes) or rides (tickets, at most 3)
)
# Which of the approved taps so far (counted from the latest) the office refunds.
refund_step = st.tuples(st.just("refund"), st.integers(min_value=0, max_value=5))


def _weighted(percent: int) -> st.SearchStrategy[tuple[object, ...]]:
    """Taps are most of a day; the card office's operations are rare."""
    if percent < 80:
        return tap_step
    if percent < 86:
        return topup_step
    if percent < 89:
        return sell_step
    if percent < 92:
        return refund_step
    if percent < 94:
        return block_step
    if percent < 98:
        return unblock_step
    return replace_step


step = st.integers(min_value=0, max_value=99).flatmap(_weighted)


def add_kiosk(city: CityState) -> None:
    city.terminals[KIOSK] = Terminal(
        id=KIOSK, service_id=KIOSK_SERVICE, kind=TerminalKind.KIOSK, key_version=1, active=True,
        funding_account=0, high_seq=-1,
    )  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=30, max_size=120))
def test_the_engine_decides_as_the_model_does(steps: list[tuple[object, ...]]) -> None:
    city = build_city()
    add_kiosk(city)
    processor = Processor(city, None)
    model = Model()
    for uid, (balance, floor, profile) in CARDS.items():
        model.cards[uid] = ModelCard(account=1000 + uid, profile=profile)
        model.accounts[1000 + uid] = ModelAccount(balance=balance, floor=floor)
    now, seq, counters = T0, 0, dict.fromkeys([*UIDS, *NEW_UIDS, 999], 0)
    current = list(UIDS)  # each holder's card in use
    approved: list[ModelTap] = []
    product_id = 0
    for entry in steps:
        seq += 1
        kind = entry[0]
        if kind == "tap":
            _, holder, terminal, step_ms, counter_step, exit_tap = entry
            uid = current[holder] if holder < len(current) else holder  # type: ignore[operator, index]
            now += step_ms  # type: ignore[operator]
            counters[uid] += counter_step  # type: ignore[index, operator]
            counter = counters[uid] if counter_step else 0  # type: ignore[index]
            service = city.terminals[terminal].service_id  # type: ignore[index]
            d = fastpath.Decision(
                terminal, seq, 0, uid, counter, fastpath.TAP_FLAG_EXIT if exit_tap else 0, 0, None, now, now, service
            )
            fastpath.decide_tap(city, city.terminals[terminal], d)  # type: ignore[index]
            *expected, product = model.tap(uid, terminal, service, now, counter, bool(exit_tap))  # type: ignore[arg-type]
            assert [d.result, d.amount, d.info] == expected, (entry, d)
            assert d.product_id == (product.id if product is not None else fastpath.NO_PRODUCT), (entry, d)
            if product is not None and d.result == R.APPROVED:
                event("paid by a season pass" if product.season else "paid by a ticket ride")
            processor.batch_done([d], committed=True)
            if d.result == R.APPROVED:
                approved.append(
                    ModelTap(uid, terminal, service, now, d.amount, d.info, bool(exit_tap), product, d)  # type: ignore[arg-type]
                )
        elif kind == "sell":
            _, holder, service, season, starts, size = entry
            card = model.cards[current[holder]]  # type: ignore[index]
            product_id += 1
            day = now // DAY_MS + starts  # type: ignore[operator]
            if season:
                sold = ModelProduct(product_id, GROUPS[service], True, day, day + size - 1)  # type: ignore[index, operator]
                valid = (EPOCH + datetime.timedelta(days=day), EPOCH + datetime.timedelta(days=day + size - 1))  # type: ignore[operator]
                city.add_product(product_id, card.account, fastpath.PRODUCT_SEASON, sold.group, valid, 0, 0)
            else:
                sold = ModelProduct(product_id, GROUPS[service], False, rides=1 + size % 3)  # type: ignore[index, operator]
                city.add_product(product_id, card.account, fastpath.PRODUCT_MULTI_RIDE, sold.group, None, sold.rides, 0)
            model.accounts[card.account].products.append(sold)
        elif kind == "refund":
            _, back = entry
            if not approved:
                continue
            original = approved[-1 - back % len(approved)]  # type: ignore[operator]
            now += 1
            recorded = original.decision
            d = fastpath.Decision(KIOSK, seq, 2, 0, 0, 0, 0, recorded.terminal_seq, now, now, KIOSK_SERVICE)  # type: ignore[attr-defined]
            d.original_terminal = original.terminal
            fastpath.decide_reversal(
                city,
                city.terminals[KIOSK],
                d,
                fastpath.Original(
                    0,
                    original.uid,
                    original.amount,
                    city.account_id[recorded.card_account],  # type: ignore[attr-defined]
                    original.at,
                    original.service,
                    recorded.tap_flags,  # type: ignore[attr-defined]
                    original.info,
                    recorded.product_id,  # type: ignore[attr-defined]
                ),
                original.refunded,
                REFUND_WINDOW_MS,
            )
            assert (d.result, d.amount) == model.refund(original, now), (entry, d)
            event(f"refund: {R(d.result).name}")
            processor.batch_done([d], committed=True)
        elif kind == "topup":
            _, uid, amount = entry
            d = fastpath.Decision(KIOSK, seq, 1, uid, 0, 0, amount, None, now, now, KIOSK_SERVICE)
            fastpath.decide_topup(city, city.terminals[KIOSK], d)
            assert (d.result, d.amount) == model.topup(uid, amount), (entry, d)  # type: ignore[arg-type]
            processor.batch_done([d], committed=True)
        elif kind in ("block", "unblock"):
            _, holder = entry
            uid = current[holder]  # type: ignore[index]
            card = model.cards.get(uid)  # type: ignore[arg-type]
            if card is None or card.status == CardStatus.REPLACED:
                continue
            status = CardStatus.BLOCKED if kind == "block" else CardStatus.ACTIVE
            card.status = status
            city.card_status[city.card_position[uid]] = status  # type: ignore[index]
        else:
            _, old, new = entry
            if new in model.cards or old not in current:
                continue
            replaced = model.cards[old]  # type: ignore[index]
            model.cards[new] = ModelCard(account=replaced.account, profile=replaced.profile)  # type: ignore[index]
            replaced.status = CardStatus.REPLACED
            current[current.index(old)] = new  # type: ignore[arg-type]
            position = city.card_position[old]  # type: ignore[index]
            city.card_status[position] = CardStatus.REPLACED
            city.add_card(
                new,  # type: ignore[arg-type]
                CardStatus.ACTIVE,
                city.card_profile[position],
                replaced.account,
                holder_id=city.card_holder[position],
                eligible=(city.card_eligible_from[position], city.card_eligible_until[position]),
            )
        for account_id, account in model.accounts.items():
            position = city.account_position[account_id]
            assert city.balance[position] == account.balance, (entry, account_id)
            assert city.pending_debit[position] == city.pending_credit[position] == 0
            for sold in account.products:
                assert city.product_by_id[sold.id].rides_used == sold.used, (entry, sold)
    city.check_invariants()
