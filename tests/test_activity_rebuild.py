"""The rules' memory of each card survives a restart of the engine.

Each memory (the card's counter, its last passage, the start of its
journey, its cap totals) is made by taps decided through a running engine;
after a restart the next tap must be decided as if the engine had never
stopped. ``rebuild_activity`` itself is checked on record rows written with
chosen times, so that every window's edge can be placed exactly.

The tiny city (tests/city.py) gets a tram and a rules version: a free
transfer within 45 minutes on the bus, a daily cap on the tram, and
anti-passback of 300 s at the library gate. The cap is on a service of its
own because every bus tap within 45 minutes of a paid one is a free
transfer, which a cap would never see.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from engine import fastpath
from engine.activity_rebuild import (
    ACTIVITY_COUNTER_DAYS,
    PASSAGE_LOOKBACK_MAX_MS,
    rebuild_activity,
    sharing_horizon_ms,
)
from engine.codes import OperationKind, ResultCode, TapInfo
from engine.db import connect, run_sync
from engine.live import apply_current_rules
from engine.state import CityState, Terminal, load_state
from tests.city import (
    BUS,
    BUS_FARE,
    BUS_VALIDATOR,
    LIBRARY,
    LIBRARY_GATE,
    LIBRARY_RULES,
    EngineUnderTest,
    add_card,
    create_city,
    load_city_rules,
    running_engine,
)

TRAM = 4
TRAM_VALIDATOR = 5
TRAM_FARE = 200
TRAM_DAILY_CAP = 300
PASSBACK_S = 300
TRANSFER_MINUTES = 45

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS


# The library gate with anti-passback; a tram with a daily cap; the bus with
# a free transfer.
GATED_LIBRARY = LIBRARY_RULES + f"passback_window_s = {PASSBACK_S}\n"
TRAM_TRANSFER_AND_CAP = f"""
[[services]]
code = "tram"
kind = "per_use"
fares = {{ standard = {TRAM_FARE} }}

[transfer]
window_minutes = {TRANSFER_MINUTES}
services = ["bus"]
fare = "free"

[[caps]]
group = "tram"
daily_cents = {TRAM_DAILY_CAP}
"""


async def add_tram_and_rules(conn: asyncpg.Connection) -> None:
    """The tram (service, revenue account, validator) and the rules version."""
    await conn.execute(
        f"""
        INSERT INTO accounts (id, kind, name) VALUES (14, 1, 'tram revenue');
        INSERT INTO services (id, code, name, revenue_account_id) VALUES ({TRAM}, 'tram', 'Tram', 14);
        INSERT INTO terminals (id, service_id, kind, name) VALUES ({TRAM_VALIDATOR}, {TRAM}, 0, 'tram validator');
        """
    )
    await load_city_rules(
        conn, library=GATED_LIBRARY, extra=TRAM_TRANSFER_AND_CAP, name="test city with transfers, a cap and a gate"
    )


@pytest.fixture(scope="module")
def transit_dsn(city_dsn: str) -> str:
    async def build() -> None:
        conn = await connect(city_dsn)
        try:
            await add_tram_and_rules(conn)
        finally:
            await conn.close()

    run_sync(build())
    return city_dsn


@pytest.fixture
async def engine(transit_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(transit_dsn, tmp_path) as under_test:
        yield under_test


def fresh_seq() -> int:
    """Sequences above anything earlier tests used on the shared terminals."""
    return time.time_ns() // 1000


# --- Through a running engine ---------------------------------------------------


async def test_a_repeated_counter_is_a_clone_after_a_restart(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    copied = await add_card(conn, balance=1000)
    genuine = await add_card(conn, balance=1000)
    await engine.restart()  # cards are loaded at start
    bus = await engine.client(BUS_VALIDATOR)
    for card in (copied, genuine):
        assert (await bus.tap(fresh_seq(), card.uid, card_counter=7)).result == ResultCode.APPROVED

    await engine.restart()
    bus = await engine.client(BUS_VALIDATOR)
    # The same count again: a copy of the card.
    assert (await bus.tap(fresh_seq(), copied.uid, card_counter=7)).result == ResultCode.CLONE_SUSPECTED
    # A card that counts on is still the card.
    assert (await bus.tap(fresh_seq(), genuine.uid, card_counter=8)).result == ResultCode.APPROVED


async def test_a_declined_tap_counter_is_remembered_too(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    bus = await engine.client(BUS_VALIDATOR)
    assert (await bus.tap(fresh_seq(), card.uid, card_counter=3)).result == ResultCode.INSUFFICIENT_FUNDS

    await engine.restart()
    bus = await engine.client(BUS_VALIDATOR)
    assert (await bus.tap(fresh_seq(), card.uid, card_counter=3)).result == ResultCode.CLONE_SUSPECTED


async def test_passback_holds_across_a_restart(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    gate = await engine.client(LIBRARY_GATE)
    assert (await gate.tap(fresh_seq(), card.uid)).result == ResultCode.APPROVED

    await engine.restart()
    gate = await engine.client(LIBRARY_GATE)
    assert (await gate.tap(fresh_seq(), card.uid)).result == ResultCode.ALREADY_VALIDATED
    # Leaving is never refused.
    assert (await gate.tap(fresh_seq(), card.uid, tap_flags=fastpath.TAP_FLAG_EXIT)).result == ResultCode.APPROVED


async def test_a_transfer_stays_free_across_a_restart(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    bus = await engine.client(BUS_VALIDATOR)
    assert (await bus.tap(fresh_seq(), card.uid)).amount_cents == BUS_FARE

    await engine.restart()
    bus = await engine.client(BUS_VALIDATOR)
    result = await bus.tap(fresh_seq(), card.uid)
    assert (result.result, result.amount_cents, result.info) == (ResultCode.APPROVED, 0, TapInfo.TRANSFER)


async def test_the_daily_cap_spent_before_a_restart_caps_after_it(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    tram = await engine.client(TRAM_VALIDATOR)
    assert (await tram.tap(fresh_seq(), card.uid)).amount_cents == TRAM_FARE

    await engine.restart()
    tram = await engine.client(TRAM_VALIDATOR)
    result = await tram.tap(fresh_seq(), card.uid)
    assert (result.result, result.amount_cents, result.info) == (
        ResultCode.APPROVED,
        TRAM_DAILY_CAP - TRAM_FARE,
        TapInfo.CAPPED,
    )
    result = await tram.tap(fresh_seq(), card.uid)
    assert (result.amount_cents, result.info) == (0, TapInfo.CAPPED)


async def test_no_taps_recorded_no_activity(fresh_db: Callable[..., str], tmp_path: Path) -> None:
    dsn = fresh_db()
    conn = await connect(dsn)
    try:
        await create_city(conn)
        await add_card(conn, balance=1000)
        async with running_engine(dsn, tmp_path) as under_test:
            assert under_test.engine is not None
            assert under_test.engine.state.activity == {}
    finally:
        await conn.close()


# --- rebuild_activity on chosen record times ------------------------------------

NOW_MS = int(datetime.datetime(2026, 3, 15, 10, 0, tzinfo=datetime.UTC).timestamp() * 1000)
TODAY = NOW_MS // DAY_MS
EARLIER_THIS_MONTH_MS = int(datetime.datetime(2026, 3, 2, 18, 0, tzinfo=datetime.UTC).timestamp() * 1000)
LAST_MONTH_MS = int(datetime.datetime(2026, 2, 28, 23, 0, tzinfo=datetime.UTC).timestamp() * 1000)
UNKNOWN_CARD = 0x0F_0000_0000_0001


class Record:
    """Writes rows into ``taps`` as the batch writer would, at chosen times."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.seq = 0

    async def __call__(
        self,
        card_uid: int,
        at_ms: int,
        *,
        terminal_id: int = BUS_VALIDATOR,
        service_id: int = BUS,
        kind: int = OperationKind.TAP,
        counter: int = 0,
        flags: int = 0,
        result: int = ResultCode.APPROVED,
        amount: int = 0,
        info: int = 0,
        original_seq: int | None = None,
    ) -> int:
        self.seq += 1
        at = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(milliseconds=at_ms)
        await self.conn.execute(
            "INSERT INTO taps (terminal_id, terminal_seq, kind, card_uid, card_counter, tap_flags, original_seq,"
            " event_time, recorded_at, result, amount_cents, service_id, batch_id, info)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, 1, $12)",
            terminal_id,
            self.seq,
            kind,
            card_uid,
            counter,
            flags,
            original_seq,
            at,
            result,
            amount,
            service_id,
            info,
        )
        return self.seq


async def rebuilt_state(conn: asyncpg.Connection) -> CityState:
    state = await load_state(conn)
    await apply_current_rules(conn, state)
    summary = await rebuild_activity(conn, state, now_ms=NOW_MS)
    assert summary.cards == len(state.activity)
    return state


async def test_rebuild_reads_each_memory_from_its_window(fresh_db: Callable[..., str]) -> None:
    conn = await connect(fresh_db())
    try:
        await create_city(conn)
        await add_tram_and_rules(conn)
        rider = await add_card(conn, balance=1000)
        idle = await add_card(conn, balance=1000)
        quiet = await add_card(conn, balance=1000)
        record = Record(conn)

        # The highest counter of the last ACTIVITY_COUNTER_DAYS, declines included,
        # suspected clones not.
        await record(rider.uid, NOW_MS - (ACTIVITY_COUNTER_DAYS + 1) * DAY_MS, counter=50, amount=BUS_FARE)
        await record(rider.uid, NOW_MS - 10 * DAY_MS, counter=20, amount=BUS_FARE)
        await record(rider.uid, NOW_MS - 2 * HOUR_MS, counter=21, result=ResultCode.INSUFFICIENT_FUNDS)
        await record(rider.uid, NOW_MS - HOUR_MS, counter=99, result=ResultCode.CLONE_SUSPECTED)
        # The journey started with the last full fare on the bus; the transfer after it did not start one.
        await record(rider.uid, NOW_MS - 30 * MINUTE_MS, amount=BUS_FARE)
        await record(rider.uid, NOW_MS - 20 * MINUTE_MS, info=TapInfo.TRANSFER)
        # The last passage: the latest approved tap; a decline is no passage.
        await record(rider.uid, NOW_MS - 100_000, terminal_id=LIBRARY_GATE, service_id=LIBRARY)
        await record(
            rider.uid, NOW_MS - 10_000, terminal_id=LIBRARY_GATE, service_id=LIBRARY, result=ResultCode.CARD_NOT_ACTIVE
        )
        # Tram fares: today's and this month's count, last month's not. A
        # reversed fare gives its room under the cap back, as in the ladder.
        tram: dict[str, int] = {"terminal_id": TRAM_VALIDATOR, "service_id": TRAM}
        reversed_seq = await record(rider.uid, NOW_MS - 3 * HOUR_MS, amount=TRAM_FARE, **tram)
        await record(rider.uid, NOW_MS - 150 * MINUTE_MS, amount=100, info=TapInfo.CAPPED, **tram)
        await record(rider.uid, NOW_MS - 140 * MINUTE_MS, result=ResultCode.INSUFFICIENT_FUNDS, **tram)
        await record(
            rider.uid,
            NOW_MS - 100 * MINUTE_MS,
            kind=OperationKind.REVERSAL,
            original_seq=reversed_seq,
            amount=TRAM_FARE,
            **tram,
        )
        await record(rider.uid, EARLIER_THIS_MONTH_MS, amount=TRAM_FARE, **tram)
        await record(rider.uid, LAST_MONTH_MS, amount=TRAM_FARE, **tram)

        # Beyond the passback and transfer windows: only its counter is kept.
        await record(idle.uid, NOW_MS - (TRANSFER_MINUTES + 5) * MINUTE_MS, counter=5, amount=BUS_FARE)
        # A card the city does not know is skipped.
        await record(UNKNOWN_CARD, NOW_MS - MINUTE_MS, counter=9, amount=BUS_FARE)

        state = await rebuilt_state(conn)
    finally:
        await conn.close()

    assert set(state.activity) == {state.card_position[rider.uid], state.card_position[idle.uid]}
    assert state.card_position[quiet.uid] not in state.activity

    activity = state.activity[state.card_position[rider.uid]]
    assert activity.counter == 21
    assert (activity.last_ms, activity.last_terminal, activity.last_service) == (
        NOW_MS - 100_000,
        LIBRARY_GATE,
        LIBRARY,
    )
    assert activity.transfer_ms == NOW_MS - 30 * MINUTE_MS
    group = state.service_policy[TRAM][fastpath.POLICY_CAP_GROUP]
    assert (activity.cap_day, activity.cap_month) == (TODAY, fastpath.month_of_day(TODAY))
    assert activity.cap_spent[group] == 100  # TRAM_FARE + 100, less the reversed TRAM_FARE
    assert activity.cap_spent[fastpath.CAP_GROUPS_MAX + group] == TRAM_FARE + 100

    idle_activity = state.activity[state.card_position[idle.uid]]
    assert idle_activity.counter == 5
    assert (idle_activity.last_ms, idle_activity.last_terminal, idle_activity.transfer_ms) == (-1, -1, -1)
    assert idle_activity.cap_day == -1
    assert list(idle_activity.cap_spent) == [0] * (2 * fastpath.CAP_GROUPS_MAX)


async def test_rebuild_with_no_taps_installs_an_empty_memory(fresh_db: Callable[..., str]) -> None:
    conn = await connect(fresh_db())
    try:
        await create_city(conn)
        await add_tram_and_rules(conn)
        await add_card(conn, balance=1000)
        state = await load_state(conn)
        await apply_current_rules(conn, state)
        summary = await rebuild_activity(conn, state, now_ms=NOW_MS)
    finally:
        await conn.close()
    assert state.activity == {}
    assert (summary.cards, summary.rows) == (0, 0)


def located(*places: tuple[float, float]) -> CityState:
    state = CityState()
    # The sharing check as a rules version sets it (it is off without one).
    state.sharing_max_speed_kmh, state.sharing_min_distance_m = 120, 500
    for number, (latitude, longitude) in enumerate(places, start=1):
        state.terminals[number] = Terminal(
            id=number,
            service_id=BUS,
            kind=0,
            key_version=1,
            active=True,
            funding_account=-1,
            high_seq=-1,
            latitude=latitude,
            longitude=longitude,
        )
    return state


def test_the_sharing_horizon_covers_the_farthest_pair() -> None:
    # Three stops across Gijón, the farthest two about 4.5 km apart.
    state = located((43.5453, -5.6615), (43.5322, -5.6611), (43.5390, -5.7100))
    farthest_m = max(
        fastpath.distance_m(*a, *b)
        for a in [(43.5453, -5.6615), (43.5322, -5.6611), (43.5390, -5.7100)]
        for b in [(43.5453, -5.6615), (43.5322, -5.6611), (43.5390, -5.7100)]
    )
    crossing_ms = farthest_m * 3600 / state.sharing_max_speed_kmh
    assert crossing_ms <= sharing_horizon_ms(state) <= PASSAGE_LOOKBACK_MAX_MS

    # Terminals closer together than the rules' minimum distance never count.
    assert sharing_horizon_ms(located((43.5453, -5.6615), (43.5454, -5.6615))) == 0
    # Fewer than two located terminals: nothing to compare.
    assert sharing_horizon_ms(located((43.5453, -5.6615))) == 0
