"""Decode + decide + encode per tap, with the city's rules on and off: the compiled fast path against its pure twin.

One round is what the engine does with a service day of the city's taps,
without the network and the database::

    FrameReader.feed(buffer of N TAP frames)
      -> decode_tap -> Decision(...) -> decide_tap -> encode_tap_result

The city is synthetic and in memory (``CityState`` filled directly, no
database), shaped like the seeded one (``engine.seed``): 340,000 cards in
its profiles and shares, one account each, its services and terminals, every
terminal at a place in Gijón (latitude and longitude, for the card-sharing
check). Fares and policies come from ``rules/gijon.toml``, compiled by
``engine.policy.compile_policy`` and installed as the engine does: per-use
buses with a free transfer and daily and monthly caps, gates with
anti-passback, identification services, bikes with a minimum balance to
enter, ID checks on a share of concession taps, clone blocking and the
sharing check. Concession cards hold an eligibility period: most valid, a
few expired (standard fare), a few ending within the renewal window. The
rules' memory of each card (``state.activity``) starts as it would on a
late-month morning: the counter last seen, the last passage yesterday or
before, this month's capped spending; a tenth of the day's cards have none
(new to the engine).

The frames are one service day (06:00 to 22:00 UTC, ``DAY``), in time
order, each from a terminal of its service: bus riders make one to five
journeys, a quarter of them with a change of bus (a transfer), heavy riders
reach the daily or monthly cap; gates see a few second entries within the
passback window; car parks and bikes get an entry and an exit tap;
libraries, civic centres and kiosks an identification tap. Every card
presents its own counter, one higher at each tap, and taps move forward in
time; on purpose, a few boardings come from a card lent to someone far away
(sharing suspected) and a few taps replay a counter (a cloned card: declined
and, with the rules on, blocked). The terminal's clock is the engine's
here: each tap is decided at its event time.

Each round is run with the rules on (``cython_ns_per_tap``,
``pure_ns_per_tap``) and off (``*_rules_off``): the same city and frames
under an empty ``CompiledPolicy`` (no service policy, no transfer, caps,
ID sampling, renewal warning or clone blocking) and unlocated terminals,
since the fast path's only switch for the sharing check is a terminal
without a place (an empty policy's 0 km/h would flag every change of
terminal). ``rules_cost_percent`` is what the rules add to the compiled
per-tap time (``pure_rules_cost_percent`` to the pure one): the median over
rounds of rules on / rules off - 1 within each round. Before every round the city is reset to the morning: pending
debits settled, the card memory and the statuses changed by clone blocks
restored, so every round decides the same taps the same way. Rounds are
interleaved (each runs every twin with the rules on and off, the rules off
first every other round) so that a noisy neighbour on the machine weighs on
all four alike; the report gives the median of the rounds, and ``results`` counts the decisions of the
rules-on round by result code and info flag, to show the rules fired.

    python -m benchmarks.fastpath --json
    python -m benchmarks.fastpath --taps 50000 --rounds 15 --json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import math
import random
import statistics
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from types import ModuleType

from benchmarks.common import describe_machine, describe_versions, print_json
from engine import _fastpath_py
from engine.codes import CardStatus, ProductKind, ResultCode, TapInfo, TerminalKind
from engine.policy import CompiledPolicy, compile_policy
from engine.rules import Rules, read_rules_file, rules_sha256
from engine.seed import PRODUCT_HOLDER_SHARE, PROFILES, RULES_FILE, RULES_SOURCE_NAME, SERVICES
from engine.state import NO_FARE, STANDARD_PROFILE, CityState, Terminal, day_number

DEFAULT_SEED = 20_240_601
# The size of the city the engine is built for.
DEFAULT_CARDS = 340_000
# Taps per round: about what Gijón's card sees in a day (32,000 uses), enough
# frames that per-round overheads (reader creation, timer reads) vanish, few
# enough that a pure round stays under a second.
DEFAULT_TAPS = 20_000
DEFAULT_ROUNDS = 9

# The service day: a Tuesday late in a month, so that this month's capped
# spending has built up; taps from 06:00 to 22:00 UTC, inside one UTC day
# (caps count UTC days).
DAY = datetime.date(2026, 6, 23)
SERVICE_DAY_START_H = 6
SERVICE_DAY_END_H = 22
MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000

# Terminals stand within this distance of Gijón's centre (the city is about
# 8 km across), each at a random place.
CITY_CENTRE = (43.5357, -5.6615)
TERMINAL_SPREAD_M = 4_000
METRES_PER_DEGREE_LATITUDE = 111_320

# Cards: lost, stolen and expired cards still tapped; nearly empty cards
# (below the bikes' minimum balance, a fare or two left).
BLOCKED_SHARE = 0.005
NEARLY_EMPTY_SHARE = 0.05
NEARLY_EMPTY_CENTS = (0, 50, 120, 180)
BALANCE_CENTS = (500, 4_000)
FIRST_ACCOUNT_ID = 1_000_000
FIRST_CARD_UID = 0x04_00_00_00_00_00_00

# Concession eligibility: most periods run for months or years around DAY;
# a few ended already (the standard fare applies) and a few end within the
# rules' renewal window (the holder is asked to renew).
EXPIRED_SHARE = 0.02
RENEWAL_DUE_SHARE = 0.03
ELIGIBLE_SINCE_DAYS_MAX = 3 * 365
ELIGIBLE_REMAINING_DAYS = (60, 4 * 365)
EXPIRED_DAYS_MAX = 365

# The rules' memory of a card at the start of the day: a tenth of the day's
# cards are new to it (unused for 35 days, or never used); the others last
# passed a validator between an hour and five days before the service day,
# and have ridden up to twice a working day this month (heavy riders are at
# the monthly cap). A card's counter after years of use: well inside u32.
NO_HISTORY_SHARE = 0.10
LAST_PASSAGE_BEFORE_MS = (MS_PER_HOUR, 5 * 24 * MS_PER_HOUR)
MONTH_RIDES_MAX = 44
COUNTER_HISTORY_MAX = 60_000

# Bus riders: journeys in the day, with their weights (most go and come back;
# the fourth full fare of a standard card meets the daily cap).
JOURNEYS_PER_RIDER = ((1, 0.25), (2, 0.55), (3, 0.10), (4, 0.06), (5, 0.04))
# Journeys start at least this far apart: longer than the rules' 45-minute
# transfer window, so each journey starts with a full fare.
JOURNEYS_APART_MIN_MS = 60 * MS_PER_MINUTE
# A quarter of journeys change bus, 10 to 40 minutes after boarding (inside
# the window; no faster than 48 km/h across the city, so not "sharing").
TRANSFER_SHARE = 0.25
TRANSFER_AFTER_MS = (10 * MS_PER_MINUTE, 40 * MS_PER_MINUTE)
# A card lent to someone: another boarding 20 to 60 s later at a stop at
# least 3 km away, faster than the rules' 120 km/h.
SHARED_JOURNEY_SHARE = 0.01
SHARED_AFTER_MS = (20_000, 60_000)
SHARED_DISTANCE_MIN_M = 3_000
# Tries at drawing a far enough stop before giving up on a lent card.
SHARED_STOP_TRIES = 100
# Gates with anti-passback: a second entry with the same card within the
# rules' 300-second window (a friend let through).
PASSBACK_RETRY_SHARE = 0.05
PASSBACK_RETRY_AFTER_MS = (10_000, 240_000)
# Car parks and bikes: the exit tap 10 minutes to 3 hours after the entry.
STAY_MS = (10 * MS_PER_MINUTE, 180 * MS_PER_MINUTE)
# Taps replaying an earlier counter of their card (a cloned card), 1 to 30
# minutes after the tap they copy.
CLONED_TAP_SHARE = 0.0005
CLONE_AFTER_MS = (MS_PER_MINUTE, 30 * MS_PER_MINUTE)
# Draws of a card whose profile the service serves, before taking any card.
SERVED_CARD_TRIES = 20

# How each kind of service is used in the day (see build_day).
JOURNEYS, STAY, GATE, SINGLE = "journeys", "stay", "gate", "single"


@dataclass
class BenchCity:
    """The in-memory city, its rules, and the morning the rounds start from."""

    state: CityState
    rules: Rules
    rules_on: CompiledPolicy
    rules_off: CompiledPolicy
    located: dict[int, Terminal]  # terminal id -> terminal with its place
    unlocated: dict[int, Terminal]  # the same terminals without a place
    by_service: dict[int, list[Terminal]]  # service id -> its (located) terminals
    status_at_start: bytes
    # Card position -> (counter, last_ms, last_terminal, last_service,
    # cap_day, cap_month, cap group, month's spending), for the cards with a memory.
    history: dict[int, tuple[int, int, int, int, int, int, int, int]] = field(default_factory=dict)
    # Passes and tickets held in the morning, as (id, account position,
    # kind, group, first day, last day, rides): the twin's own Product
    # objects are built from them by reset().
    products: list[tuple[int, int, int, int, int, int, int]] = field(default_factory=list)


@dataclass(slots=True)
class PlannedTap:
    time_ms: int
    card: int
    terminal_id: int
    flags: int
    replays: PlannedTap | None = None  # a clone: the tap whose counter it presents
    counter: int = 0


def build_city(cards: int, rng: random.Random) -> BenchCity:
    """A city of ``cards`` cards with the rules of rules/gijon.toml."""
    rules = read_rules_file(RULES_FILE)
    service_ids = {service.code: service.id for service in SERVICES}
    profile_ids = {profile.code: profile.id for profile in PROFILES}
    state = CityState()
    funding = state.add_account(1, 0, -(2**62), 2**63 - 1)
    for service_rules in rules.services:
        service_id = service_ids[service_rules.code]
        state.revenue_account[service_id] = state.add_account(100 + service_id, 0, 0, 2**63 - 1)
        for profile_code, fare in service_rules.fares.items():
            state.set_fare(service_id, profile_ids[profile_code], fare)
    located: dict[int, Terminal] = {}
    by_service: dict[int, list[Terminal]] = {}
    for service in SERVICES:
        kiosk = service.terminal_kind == TerminalKind.KIOSK
        for _ in range(service.terminals):
            latitude, longitude = _place(rng)
            terminal = Terminal(
                id=len(located) + 1,
                service_id=service.id,
                kind=service.terminal_kind,
                key_version=1,
                active=True,
                funding_account=funding if kiosk else -1,
                high_seq=-1,
                latitude=latitude,
                longitude=longitude,
            )
            located[terminal.id] = terminal
            by_service.setdefault(service.id, []).append(terminal)
    state.terminals = located
    unlocated = {terminal_id: replace(t, latitude=None, longitude=None) for terminal_id, t in located.items()}

    today = day_number(DAY)
    renewal_days = rules.concessions.renewal_window_days
    profiles = rng.choices([p.id for p in PROFILES], weights=[p.share for p in PROFILES], k=cards)
    for n in range(cards):
        account_id = FIRST_ACCOUNT_ID + n
        if rng.random() < NEARLY_EMPTY_SHARE:
            balance = rng.choice(NEARLY_EMPTY_CENTS)
        else:
            balance = rng.randrange(*BALANCE_CENTS)
        state.add_account(account_id, balance, 0, 100_000)
        status = CardStatus.BLOCKED if rng.random() < BLOCKED_SHARE else CardStatus.ACTIVE
        eligible: tuple[int, int] | None = None
        profile = profiles[n]
        if profile != STANDARD_PROFILE:
            draw = rng.random()
            if draw < EXPIRED_SHARE:
                until_day = today - rng.randint(1, EXPIRED_DAYS_MAX)
            elif draw < EXPIRED_SHARE + RENEWAL_DUE_SHARE:
                until_day = today + rng.randrange(max(renewal_days, 1))
            else:
                until_day = today + rng.randint(*ELIGIBLE_REMAINING_DAYS)
            eligible = (min(today, until_day) - rng.randint(1, ELIGIBLE_SINCE_DAYS_MAX), until_day)
        state.add_card(FIRST_CARD_UID + n, status, profile, account_id, holder_id=n + 1, eligible=eligible)

    rules_on = compile_policy(rules, service_ids, state.group_id)
    # Everything off; renewal warnings too (CompiledPolicy's window is 0).
    rules_off = CompiledPolicy()
    # As the demo city holds them (engine.seed): current season passes and
    # tickets with rides left, for PRODUCT_HOLDER_SHARE of the entitled
    # active cards. A generator of their own leaves the day's draws as they were.
    products: list[tuple[int, int, int, int, int, int, int]] = []
    products_rng = random.Random(cards)
    code_of = {profile.id: profile.code for profile in PROFILES}
    for product in rules.products:
        for card in range(cards):
            if products_rng.random() >= PRODUCT_HOLDER_SHARE or state.card_status[card] != CardStatus.ACTIVE:
                continue
            if product.profiles is not None and code_of[state.card_profile[card]] not in product.profiles:
                continue
            if product.kind == "season":
                first = today - products_rng.randrange(product.days or 1)
                held = (ProductKind.SEASON, first, first + (product.days or 1) - 1, 0)
            else:
                held = (ProductKind.MULTI_RIDE, 0, -1, product.rides or 1)
            kind, first, last, rides = held
            group = state.group_id(product.group)
            products.append((len(products) + 1, state.card_account[card], kind, group, first, last, rides))
    return BenchCity(
        state=state,
        rules=rules,
        rules_on=rules_on,
        rules_off=rules_off,
        located=located,
        unlocated=unlocated,
        by_service=by_service,
        status_at_start=bytes(state.card_status),
        products=products,
    )


def _place(rng: random.Random) -> tuple[float, float]:
    """A random point within TERMINAL_SPREAD_M of the centre (uniform over the disc)."""
    distance = TERMINAL_SPREAD_M * math.sqrt(rng.random())
    bearing = rng.uniform(0, 2 * math.pi)
    latitude = CITY_CENTRE[0] + distance * math.cos(bearing) / METRES_PER_DEGREE_LATITUDE
    metres_per_degree_longitude = METRES_PER_DEGREE_LATITUDE * math.cos(math.radians(CITY_CENTRE[0]))
    longitude = CITY_CENTRE[1] + distance * math.sin(bearing) / metres_per_degree_longitude
    return latitude, longitude


def _distance(a: Terminal, b: Terminal) -> float:
    assert a.latitude is not None and a.longitude is not None
    assert b.latitude is not None and b.longitude is not None
    return _fastpath_py.distance_m(a.latitude, a.longitude, b.latitude, b.longitude)


# --- the day ----------------------------------------------------------------------------


def build_day(city: BenchCity, taps: int, rng: random.Random) -> list[PlannedTap]:
    """``taps`` taps of one service day, in time order, with their counters;
    fills ``city.history`` for the cards that tap."""
    rules = city.rules
    service_ids = {service.code: service.id for service in SERVICES}
    transfer_services = set(rules.transfer.services) if rules.transfer is not None else set()
    kinds: dict[int, str] = {}
    for service in rules.services:
        if service.code in transfer_services:
            kind = JOURNEYS
        elif service.kind == "per_duration":
            kind = STAY
        elif service.passback_window_s:
            kind = GATE
        else:
            kind = SINGLE
        kinds[service_ids[service.code]] = kind
    journeys_mean = sum(count * weight for count, weight in JOURNEYS_PER_RIDER)
    taps_per_visit = {
        JOURNEYS: journeys_mean * (1 + TRANSFER_SHARE + SHARED_JOURNEY_SHARE),
        STAY: 2.0,
        GATE: 1 + PASSBACK_RETRY_SHARE,
        SINGLE: 1.0,
    }
    # Visits weighted so that each service gets its share of the taps (engine.seed).
    services = [service.id for service in SERVICES]
    weights = [service.traffic_permille / taps_per_visit[kinds[service.id]] for service in SERVICES]
    start_ms = day_number(DAY) * _fastpath_py.MS_PER_DAY + SERVICE_DAY_START_H * MS_PER_HOUR
    end_ms = day_number(DAY) * _fastpath_py.MS_PER_DAY + SERVICE_DAY_END_H * MS_PER_HOUR
    cards = city.state.card_count()
    clones = round(taps * CLONED_TAP_SHARE)
    planned: list[PlannedTap] = []
    while len(planned) < taps - clones:
        service_id = rng.choices(services, weights)[0]
        card = _served_card(city, service_id, cards, rng)
        terminals = city.by_service[service_id]
        kind = kinds[service_id]
        if kind == JOURNEYS:
            _journeys(planned, card, terminals, start_ms, end_ms, rng)
        elif kind == STAY:
            entry_ms = rng.randrange(start_ms, end_ms - STAY_MS[1])
            planned.append(PlannedTap(entry_ms, card, rng.choice(terminals).id, 0))
            exit_ms = entry_ms + rng.randrange(*STAY_MS)
            planned.append(PlannedTap(exit_ms, card, rng.choice(terminals).id, _fastpath_py.TAP_FLAG_EXIT))
        else:
            terminal = rng.choice(terminals)
            entry_ms = rng.randrange(start_ms, end_ms)
            planned.append(PlannedTap(entry_ms, card, terminal.id, 0))
            if kind == GATE and rng.random() < PASSBACK_RETRY_SHARE:
                planned.append(PlannedTap(entry_ms + rng.randrange(*PASSBACK_RETRY_AFTER_MS), card, terminal.id, 0))
    del planned[taps - clones :]  # the last visit's later taps, if it overflowed
    for original in rng.sample(planned, clones):
        service_id = city.located[original.terminal_id].service_id
        copy_ms = original.time_ms + rng.randrange(*CLONE_AFTER_MS)
        planned.append(PlannedTap(copy_ms, original.card, rng.choice(city.by_service[service_id]).id, 0, original))
    planned.sort(key=lambda tap: tap.time_ms)

    rides = _rides(city)
    counters: dict[int, int] = {}
    for tap in planned:
        if tap.replays is not None:
            tap.counter = tap.replays.counter  # later in time: already numbered
            continue
        counter = counters.get(tap.card)
        if counter is None:
            counter = rng.randrange(1, COUNTER_HISTORY_MAX)
            if rng.random() >= NO_HISTORY_SHARE:
                city.history[tap.card] = _history(city, rides, tap.card, counter, start_ms, rng)
        tap.counter = counters[tap.card] = counter + 1
    return planned


def _served_card(city: BenchCity, service_id: int, cards: int, rng: random.Random) -> int:
    """A random card whose profile the service serves (holders use the
    services meant for them: a pensioner at the senior centre)."""
    fares = city.state.fares[service_id]
    profiles = city.state.card_profile
    card = rng.randrange(cards)
    for _ in range(SERVED_CARD_TRIES):
        if fares[profiles[card]] != NO_FARE:
            break
        card = rng.randrange(cards)
    return card


def _journeys(
    planned: list[PlannedTap], card: int, stops: Sequence[Terminal], start_ms: int, end_ms: int, rng: random.Random
) -> None:
    """A rider's bus journeys of the day, each in its own slot of the day."""
    count = rng.choices([c for c, _ in JOURNEYS_PER_RIDER], [w for _, w in JOURNEYS_PER_RIDER])[0]
    slot_ms = (end_ms - start_ms) // count
    for number in range(count):
        board_ms = start_ms + number * slot_ms + rng.randrange(slot_ms - JOURNEYS_APART_MIN_MS)
        stop = rng.choice(stops)
        planned.append(PlannedTap(board_ms, card, stop.id, 0))
        if rng.random() < SHARED_JOURNEY_SHARE:
            for _ in range(SHARED_STOP_TRIES):
                far = rng.choice(stops)
                if _distance(stop, far) >= SHARED_DISTANCE_MIN_M:
                    planned.append(PlannedTap(board_ms + rng.randrange(*SHARED_AFTER_MS), card, far.id, 0))
                    break
        if rng.random() < TRANSFER_SHARE:
            planned.append(PlannedTap(board_ms + rng.randrange(*TRANSFER_AFTER_MS), card, rng.choice(stops).id, 0))


@dataclass(frozen=True)
class Rides:
    """What a card's memory of earlier days is about: rides on the transfer service."""

    service_id: int
    stops: Sequence[Terminal]
    cap_group: int
    monthly_cap_cents: int


def _rides(city: BenchCity) -> Rides | None:
    """The service whose rides the cards remember (the first transfer service); None without one."""
    for service_id, row in city.rules_on.service_policy.items():
        if row[_fastpath_py.POLICY_TRANSFER]:
            group = row[_fastpath_py.POLICY_CAP_GROUP]
            monthly = city.rules_on.cap_monthly[group] if group != _fastpath_py.NO_CAP else -1
            return Rides(service_id, city.by_service[service_id], group, monthly)
    return None


def _history(
    city: BenchCity, rides: Rides | None, card: int, counter: int, start_ms: int, rng: random.Random
) -> tuple[int, int, int, int, int, int, int, int]:
    """The memory of a card at the start of the day: the counter last seen,
    its last ride, this month's capped spending."""
    if rides is None:
        return (counter, -1, -1, -1, -1, -1, _fastpath_py.NO_CAP, 0)
    state = city.state
    last_ms = start_ms - rng.randrange(*LAST_PASSAGE_BEFORE_MS)
    last_day = last_ms // _fastpath_py.MS_PER_DAY
    today = start_ms // _fastpath_py.MS_PER_DAY
    profile = state.card_profile[card]
    if not state.card_eligible_from[card] <= today <= state.card_eligible_until[card]:
        profile = STANDARD_PROFILE
    spent = 0
    month = _fastpath_py.month_of_day(last_day)
    # Spending of an earlier month is not this month's.
    if rides.cap_group != _fastpath_py.NO_CAP and month == _fastpath_py.month_of_day(today):
        spent = max(state.fares[rides.service_id][profile], 0) * rng.randint(0, MONTH_RIDES_MAX)
        if rides.monthly_cap_cents >= 0:
            spent = min(spent, rides.monthly_cap_cents)
    stop = rng.choice(rides.stops).id
    return (counter, last_ms, stop, rides.service_id, last_day, month, rides.cap_group, spent)


def encode_frames(planned: Sequence[PlannedTap]) -> bytes:
    """The day's TAP frames in one buffer; terminal sequences count per terminal."""
    frames = []
    next_seq: collections.Counter[int] = collections.Counter()
    for request_id, tap in enumerate(planned):
        seq = next_seq[tap.terminal_id]
        next_seq[tap.terminal_id] += 1
        frames.append(
            _fastpath_py.encode_tap(
                request_id & 0xFFFF_FFFF, seq, FIRST_CARD_UID + tap.card, tap.counter, tap.time_ms, tap.flags
            )
        )
    return b"".join(frames)


# --- rounds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    policy: CompiledPolicy
    rules_version: int
    terminals: dict[int, Terminal]


def reset(fp: ModuleType, city: BenchCity, mode: Mode) -> None:
    """Put the city back to the morning under ``mode``'s rules: pending debits
    settled, statuses changed by clone blocks undone, each card's memory as
    it was before the day (built from the twin's own Activity)."""
    state = city.state
    state.pending_debit[:] = array("q", bytes(8 * len(state.pending_debit)))
    state.card_status[:] = city.status_at_start
    mode.policy.install(state)
    state.rules_version = mode.rules_version
    state.terminals = mode.terminals
    activities = {}
    cap_groups_max = fp.CAP_GROUPS_MAX
    for card, (counter, last_ms, last_terminal, last_service, cap_day, cap_month, group, spent) in city.history.items():
        activity = fp.Activity()
        activity.counter = counter
        activity.last_ms = last_ms
        activity.last_terminal = last_terminal
        activity.last_service = last_service
        activity.transfer_ms = last_ms
        activity.cap_day = cap_day
        activity.cap_month = cap_month
        if group != fp.NO_CAP:
            activity.cap_spent[cap_groups_max + group] = spent
        activities[card] = activity
    state.activity = activities
    held: dict[int, list[object]] = {}
    by_id = {}
    for product_id, account, kind, group, first_day, last_day, rides in city.products:
        product = fp.Product(product_id, kind, group, first_day, last_day, rides, 0)
        held.setdefault(account, []).append(product)
        by_id[product_id] = product
    state.products = held  # type: ignore[assignment]
    state.product_by_id = by_id


# What the loop needs of each frame's terminal: (terminal, id, service id).
FrameTerminal = tuple[Terminal, int, int]


def one_round(
    fp: ModuleType, state: CityState, buffer: bytes, terminals: Sequence[FrameTerminal]
) -> tuple[int, int, int]:
    """Decode, decide and encode every frame of buffer; return (ns, taps, approved)."""
    FrameReader, decode_tap, Decision = fp.FrameReader, fp.decode_tap, fp.Decision
    decide_tap, encode_tap_result = fp.decide_tap, fp.encode_tap_result
    tap_kind = fp.OPERATION_TAP
    approved = 0
    replies = []
    start = time.perf_counter_ns()
    for (_msg_type, request_id, body), (terminal, terminal_id, service_id) in zip(
        FrameReader().feed(buffer), terminals, strict=True
    ):
        seq, uid, counter, event_time_ms, flags = decode_tap(body)
        decision = Decision(
            terminal_id, seq, tap_kind, uid, counter, flags, 0, None, event_time_ms, event_time_ms, service_id
        )
        decide_tap(state, terminal, decision)
        replies.append(
            encode_tap_result(request_id, seq, decision.result, decision.amount, decision.balance, decision.info)
        )
        approved += decision.result == 0
    elapsed = time.perf_counter_ns() - start
    return elapsed, len(replies), approved


def outcomes(
    fp: ModuleType, state: CityState, buffer: bytes, terminals: Sequence[FrameTerminal]
) -> list[tuple[int, ...]]:
    """(result, amount, balance, info) of every frame, off the clock: to count and to compare twins."""
    found: list[tuple[int, ...]] = []
    for (_msg_type, _request_id, body), (terminal, terminal_id, service_id) in zip(
        fp.FrameReader().feed(buffer), terminals, strict=True
    ):
        seq, uid, counter, event_time_ms, flags = fp.decode_tap(body)
        decision = fp.Decision(
            terminal_id, seq, fp.OPERATION_TAP, uid, counter, flags, 0, None, event_time_ms, event_time_ms, service_id
        )
        fp.decide_tap(state, terminal, decision)
        found.append((decision.result, decision.amount, decision.balance, decision.info))
    return found


def count_outcomes(found: Sequence[tuple[int, ...]]) -> dict[str, dict[str, int]]:
    """Decisions by result code, and by info flag (a decision may carry several)."""
    by_code = collections.Counter(ResultCode(result).name for result, *_ in found)
    by_info: collections.Counter[str] = collections.Counter()
    for *_, info in found:
        for flag in TapInfo:
            if flag and info & flag:
                by_info[str(flag.name)] += 1
    return {"by_code": dict(sorted(by_code.items())), "by_info": dict(sorted(by_info.items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cards", type=int, default=DEFAULT_CARDS)
    parser.add_argument("--taps", type=int, default=DEFAULT_TAPS, help="taps per round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    args = parser.parse_args(argv)
    if args.cards < 1 or args.taps < 1 or args.rounds < 1:
        parser.error("--cards, --taps and --rounds must be at least 1")

    try:
        from engine import _fastpath as compiled  # type: ignore[attr-defined, unused-ignore]
    except ImportError as error:
        sys.stderr.write(f"engine._fastpath is not built ({error}): build it first\n")
        return 2
    twins: dict[str, ModuleType] = {"cython": compiled, "pure": _fastpath_py}

    rng = random.Random(args.seed)
    city = build_city(args.cards, rng)
    planned = build_day(city, args.taps, rng)
    buffer = encode_frames(planned)
    modes = (
        Mode("rules_on", city.rules_on, city.rules.version, city.located),
        Mode("rules_off", city.rules_off, 0, city.unlocated),
    )
    frame_terminals: dict[str, list[FrameTerminal]] = {}
    for mode in modes:
        terminals = [mode.terminals[tap.terminal_id] for tap in planned]
        frame_terminals[mode.name] = [(terminal, terminal.id, terminal.service_id) for terminal in terminals]
    state = city.state

    # The twins must decide the day alike, tap by tap, in each mode.
    counted: dict[str, dict[str, dict[str, int]]] = {}
    for mode in modes:
        decided = {}
        for name, fp in twins.items():
            reset(fp, city, mode)
            decided[name] = outcomes(fp, state, buffer, frame_terminals[mode.name])
        if decided["cython"] != decided["pure"]:
            sys.stderr.write(f"the twins decided the same taps differently ({mode.name})\n")
            return 1
        counted[mode.name] = count_outcomes(decided["cython"])

    per_tap_ns: dict[str, list[float]] = collections.defaultdict(list)
    approved: dict[str, int] = {}
    for number in range(args.rounds + 1):  # the first round warms caches and branch predictors
        # Every other round runs the rules off first: neither mode always
        # follows the other.
        for mode in modes if number % 2 else modes[::-1]:
            for name, fp in twins.items():
                key = name if mode.name == "rules_on" else f"{name}_rules_off"
                reset(fp, city, mode)
                gc.collect()
                elapsed, taps, approved[key] = one_round(fp, state, buffer, frame_terminals[mode.name])
                if number:
                    per_tap_ns[key].append(elapsed / taps)
    measurements = {
        key: {
            "ns_per_tap": round(statistics.median(values), 1),
            "ns_per_tap_min": round(min(values), 1),
            "ns_per_tap_max": round(max(values), 1),
            "approved_per_round": approved[key],
        }
        for key, values in per_tap_ns.items()
    }

    def median(key: str) -> float:
        return float(measurements[key]["ns_per_tap"])

    def rules_cost_percent(name: str) -> float:
        """The median over rounds of what the rules added within the round:
        rounds taken moments apart share the machine's state, so a noisy
        neighbour cancels out of each ratio."""
        ratios = [on / off for on, off in zip(per_tap_ns[name], per_tap_ns[f"{name}_rules_off"], strict=True)]
        return round(100.0 * (statistics.median(ratios) - 1.0), 1)

    try:
        cython_version: str | None = metadata.version("Cython")
    except metadata.PackageNotFoundError:
        cython_version = None
    service_codes = {service.id: service.code for service in SERVICES}
    taps_by_service = collections.Counter(service_codes[city.located[tap.terminal_id].service_id] for tap in planned)
    print_json(
        {
            "benchmark": "fastpath",
            "measures": "FrameReader.feed + decode_tap + Decision + decide_tap + encode_tap_result, per tap",
            "cython_ns_per_tap": median("cython"),
            "pure_ns_per_tap": median("pure"),
            "cython_ns_per_tap_rules_off": median("cython_rules_off"),
            "pure_ns_per_tap_rules_off": median("pure_rules_off"),
            # What the rules add to the per-tap time, in percent of the time without them.
            "rules_cost_percent": rules_cost_percent("cython"),
            "pure_rules_cost_percent": rules_cost_percent("pure"),
            "speedup": round(median("pure") / median("cython"), 2),
            "taps": len(planned),
            "rounds": args.rounds,
            "statistic": "median of rounds",
            "results": counted["rules_on"],
            "results_rules_off": counted["rules_off"],
            "measurements": measurements,
            "machine": describe_machine(),
            "versions": {**describe_versions(), "cython": cython_version},
            "settings": {
                "seed": args.seed,
                "cards": args.cards,
                "taps_per_round": len(planned),
                "rounds": args.rounds,
                "rules": {
                    "file": RULES_SOURCE_NAME,
                    "version": city.rules.version,
                    "sha256": rules_sha256(city.rules),
                },
                "rules_off": "empty CompiledPolicy (rules version 0), terminals without a place",
                "day": f"{DAY.isoformat()} {SERVICE_DAY_START_H:02d}:00-{SERVICE_DAY_END_H:02d}:00 UTC",
                "terminals": len(city.located),
                "cards_tapping": len({tap.card for tap in planned}),
                "cards_with_memory": len(city.history),
                "taps_by_service": dict(taps_by_service.most_common()),
                "journeys_per_rider": JOURNEYS_PER_RIDER,
                "transfer_share": TRANSFER_SHARE,
                "shared_journey_share": SHARED_JOURNEY_SHARE,
                "passback_retry_share": PASSBACK_RETRY_SHARE,
                "cloned_tap_share": CLONED_TAP_SHARE,
                "blocked_share": BLOCKED_SHARE,
                "nearly_empty_share": NEARLY_EMPTY_SHARE,
                "concessions": {"expired_share": EXPIRED_SHARE, "renewal_due_share": RENEWAL_DUE_SHARE},
                "gc": "enabled, collected before each round",
                "warm_up_rounds": 1,
                "order": "rounds interleaved: each runs cython and pure, rules on and off, off first every other round",
                "rules_cost_statistic": "median over rounds of (rules on / rules off - 1) within the round",
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
