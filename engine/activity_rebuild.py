"""The rules' memory of each card, rebuilt from the record of taps at start.

The decision ladder remembers, per card, what its checks need from earlier
taps (``state.activity``, card position -> ``fastpath.Activity``): the
highest card counter (clone check), the last passage (anti-passback, card
sharing), the start of the current journey (transfers) and the cap totals.
It lives in memory and is filled as taps are decided, so an engine that
starts with it empty would forgive a clone, let a gate be passed twice,
charge a transfer as a new journey and reset every cap.

``rebuild_activity`` reads it back from ``taps`` (append-only, every
decision) with one grouped query per memory, each over the time range in
which that memory can still change a decision, and installs the result in
one assignment. It runs after the rules version is installed, because the
rules say which services have transfers and caps and how long the windows
are::

    await apply_current_rules(conn, state)
    summary = await rebuild_activity(conn, state, now_ms=now_ms())
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from engine import fastpath
from engine.codes import OperationKind, ResultCode, TapInfo
from engine.limits import DB_COMMAND_TIMEOUT_S
from engine.rules import PASSBACK_WINDOW_MAX_S
from engine.state import CityState

log = logging.getLogger("citycard.activity")

# How far back the highest card counter is looked for: five weeks, a month
# of a card's use and a margin. The counters are the one memory read for
# nearly every card that tapped, so this range sets how long a start takes
# (about a million taps for Gijón). A card unused for longer starts its
# clone check afresh after a restart, as after its first tap ever.
ACTIVITY_COUNTER_DAYS = 35

# The longest look-back for the last passage. Anti-passback windows are at
# most a day (engine.rules.PASSBACK_WINDOW_MAX_S). The sharing check's
# horizon (sharing_horizon_ms) is minutes for a city at any plausible speed;
# with no speed set (no rules version) it has none, and a day bounds it.
PASSAGE_LOOKBACK_MAX_MS = PASSBACK_WINDOW_MAX_S * 1000

# Memory for each grouping's hash table. The default (4 MB) makes the
# counters' GROUP BY spill to disk from about 50,000 cards; a month of
# Gijón (340,000 cards) needs about 25 MB. Set for the rebuild's transaction
# only.
REBUILD_WORK_MEM = "64MB"

_MS_PER_DAY = 86_400_000
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

# Per card, the highest counter it presented. Declined taps count: the card
# counted up all the same. Taps refused as clones do not: that counter was
# the clone's, not the card's.
_COUNTERS_SQL = """
SELECT card_uid, max(card_counter)
FROM taps
WHERE recorded_at >= $1 AND kind = $2 AND card_counter > 0 AND result <> $3
GROUP BY card_uid
"""

# Per card, its latest approved tap: only an approved tap is a passage.
_PASSAGES_SQL = """
SELECT DISTINCT ON (card_uid)
       card_uid, (extract(epoch FROM recorded_at) * 1000)::int8, terminal_id, service_id
FROM taps
WHERE recorded_at >= $1 AND kind = $2 AND result = $3
ORDER BY card_uid, recorded_at DESC
"""

# Per card, its latest boarding that started a journey at a transfer
# service: approved, not itself a transfer, and charged a fare. A boarding
# whose fare a cap took down to nothing started a journey as well (the
# ladder decides the transfer before the cap): CAPPED marks it; so did one
# a pass or ticket paid: PASS_USED.
_JOURNEYS_SQL = """
SELECT card_uid, (extract(epoch FROM max(recorded_at)) * 1000)::int8
FROM taps
WHERE recorded_at >= $1 AND kind = $2 AND result = $3 AND service_id = ANY($4::int2[])
  AND (info & $5) = 0 AND (amount_cents > 0 OR (info & $6) <> 0)
GROUP BY card_uid
"""

# Per card and capped service, the fares of this month and of today, less
# the approved reversals of those fares: the ladder gives a reversed fare's
# room under the cap back to the day and month the fare was in (the
# reversal's service is its original's), and the rebuilt totals must be the
# ones the engine would hold had it not restarted.
_CAP_TOTALS_SQL = """
SELECT card_uid, service_id, sum(day_cents)::int8, sum(month_cents)::int8
FROM (
    SELECT card_uid, service_id, CASE WHEN recorded_at >= $2 THEN amount_cents ELSE 0 END AS day_cents,
           amount_cents AS month_cents
    FROM taps
    WHERE recorded_at >= $1 AND kind = $3 AND result = $4 AND amount_cents > 0 AND service_id = ANY($5::int2[])
    UNION ALL
    SELECT o.card_uid, o.service_id, CASE WHEN o.recorded_at >= $2 THEN -r.amount_cents ELSE 0 END,
           -r.amount_cents
    FROM taps r
    JOIN taps o ON o.terminal_id = coalesce(r.original_terminal_id, r.terminal_id) AND o.terminal_seq = r.original_seq
    WHERE r.recorded_at >= $1 AND r.kind = $6 AND r.result = $4 AND r.amount_cents > 0
      AND o.recorded_at >= $1 AND o.kind = $3 AND o.service_id = ANY($5::int2[])
) moved
GROUP BY card_uid, service_id
"""


# Per card and per-duration service, its latest approved tap there: when it
# is an entry that took a charge (or was paid by a pass or ticket) and was
# not reversed, the stay is still open (its exit may come after the restart
# and returns what the stay did not use). Stays older than
# STAY_LOOKBACK_DAYS have paid their maximum charge for good.
_STAYS_SQL = """
SELECT card_uid, service_id, (extract(epoch FROM recorded_at) * 1000)::int8, amount_cents
FROM (
    SELECT DISTINCT ON (card_uid, service_id)
           card_uid, service_id, recorded_at, tap_flags, amount_cents, product_id, terminal_id, terminal_seq
    FROM taps
    WHERE recorded_at >= $1 AND kind = $2 AND result = $3 AND service_id = ANY($4::int2[])
    ORDER BY card_uid, service_id, recorded_at DESC
) latest
WHERE (tap_flags & $5) = 0 AND (amount_cents > 0 OR product_id IS NOT NULL)
  AND NOT EXISTS (
      SELECT 1 FROM taps r
      WHERE coalesce(r.original_terminal_id, r.terminal_id) = latest.terminal_id
        AND r.original_seq = latest.terminal_seq AND r.kind = $6 AND r.result = $3
  )
"""
STAY_LOOKBACK_DAYS = 7


@dataclass(frozen=True, slots=True)
class RebuildSummary:
    """What a rebuild did: cards given an activity, rows read, time taken."""

    cards: int
    rows: int
    seconds: float


async def rebuild_activity(conn: asyncpg.Connection, state: CityState, *, now_ms: int) -> RebuildSummary:
    """Rebuild ``state.activity`` from the taps recorded before ``now_ms``.

    Only cards the state holds get an activity. The rules version must be
    installed first (``engine.live.apply_current_rules``).

    >>> summary = await rebuild_activity(conn, state, now_ms=now_ms())  # doctest: +SKIP
    >>> summary.cards, summary.rows  # doctest: +SKIP
    (41327, 97410)
    """
    started = time.perf_counter()
    builder = _Builder(state)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{REBUILD_WORK_MEM}'", timeout=DB_COMMAND_TIMEOUT_S)
        await _read_counters(conn, builder, now_ms)
        await _read_passages(conn, builder, now_ms)
        await _read_journeys(conn, builder, now_ms)
        await _read_cap_totals(conn, builder, now_ms)
        await _read_stays(conn, builder, now_ms)
    # One assignment: the ladder sees the old memory or the new, never half.
    state.activity = builder.activities
    summary = RebuildSummary(cards=len(builder.activities), rows=builder.rows, seconds=time.perf_counter() - started)
    log.info(
        "card activity rebuilt",
        extra={"cards": summary.cards, "rows": summary.rows, "seconds": round(summary.seconds, 3)},
    )
    return summary


class _Builder:
    """The activities being rebuilt, by card position."""

    def __init__(self, state: CityState) -> None:
        self.state = state
        self.activities: dict[int, fastpath.Activity] = {}
        self.rows = 0

    def activity(self, card_uid: int) -> fastpath.Activity | None:
        """The card's activity, made on first use; None for a card the city does not hold."""
        position = self.state.card_position.get(card_uid)
        if position is None:
            return None
        activity = self.activities.get(position)
        if activity is None:
            activity = self.activities[position] = fastpath.Activity()
        return activity

    async def columns(self, conn: asyncpg.Connection, sql: str, names: str, *args: object) -> list[list[Any]]:
        """The result of ``sql`` (whose columns are ``names``), one list per column.

        Each column comes back as one array: decoding a few arrays costs far
        less than a record per row, and a start reads hundreds of thousands.
        """
        aggregates = ", ".join(f"array_agg({name})" for name in names.split(", "))
        row = await conn.fetchrow(
            f"SELECT {aggregates} FROM ({sql}) AS result ({names})", *args, timeout=DB_COMMAND_TIMEOUT_S
        )
        assert row is not None  # an aggregate without GROUP BY always returns a row
        columns = [list(column) if column is not None else [] for column in row]
        self.rows += len(columns[0])
        return columns


async def _read_counters(conn: asyncpg.Connection, builder: _Builder, now_ms: int) -> None:
    since = _time(now_ms - ACTIVITY_COUNTER_DAYS * _MS_PER_DAY)
    uids, counters = await builder.columns(
        conn, _COUNTERS_SQL, "card_uid, counter", since, OperationKind.TAP, ResultCode.CLONE_SUSPECTED
    )
    for card_uid, counter in zip(uids, counters, strict=True):
        if (activity := builder.activity(card_uid)) is not None:
            activity.counter = counter


async def _read_passages(conn: asyncpg.Connection, builder: _Builder, now_ms: int) -> None:
    window_ms = passage_window_ms(builder.state)
    if window_ms <= 0:
        return
    uids, times_ms, terminals, services = await builder.columns(
        conn,
        _PASSAGES_SQL,
        "card_uid, last_ms, terminal_id, service_id",
        _time(now_ms - window_ms),
        OperationKind.TAP,
        ResultCode.APPROVED,
    )
    for card_uid, last_ms, terminal_id, service_id in zip(uids, times_ms, terminals, services, strict=True):
        if (activity := builder.activity(card_uid)) is not None:
            activity.last_ms = last_ms
            activity.last_terminal = terminal_id
            activity.last_service = service_id
            terminal = builder.state.terminals.get(terminal_id)
            if terminal is not None and terminal.latitude is not None and terminal.longitude is not None:
                activity.last_latitude = terminal.latitude
                activity.last_longitude = terminal.longitude


async def _read_journeys(conn: asyncpg.Connection, builder: _Builder, now_ms: int) -> None:
    state = builder.state
    services = [service for service, row in state.service_policy.items() if row[fastpath.POLICY_TRANSFER]]
    if not services or state.transfer_window_ms <= 0:
        return
    uids, times_ms = await builder.columns(
        conn,
        _JOURNEYS_SQL,
        "card_uid, transfer_ms",
        _time(now_ms - state.transfer_window_ms),
        OperationKind.TAP,
        ResultCode.APPROVED,
        services,
        TapInfo.TRANSFER,
        TapInfo.CAPPED | TapInfo.PASS_USED,
    )
    for card_uid, transfer_ms in zip(uids, times_ms, strict=True):
        if (activity := builder.activity(card_uid)) is not None:
            activity.transfer_ms = transfer_ms


async def _read_cap_totals(conn: asyncpg.Connection, builder: _Builder, now_ms: int) -> None:
    groups = {
        service: row[fastpath.POLICY_CAP_GROUP]
        for service, row in builder.state.service_policy.items()
        if row[fastpath.POLICY_CAP_GROUP] != fastpath.NO_CAP
    }
    if not groups:
        return
    # The ladder's calendar: UTC days, months as fastpath.month_of_day numbers them.
    day = now_ms // _MS_PER_DAY
    month = fastpath.month_of_day(day)
    uids, services, day_totals, month_totals = await builder.columns(
        conn,
        _CAP_TOTALS_SQL,
        "card_uid, service_id, day_cents, month_cents",
        _month_start(month),
        _time(day * _MS_PER_DAY),
        OperationKind.TAP,
        ResultCode.APPROVED,
        list(groups),
        OperationKind.REVERSAL,
    )
    month_offset = fastpath.CAP_GROUPS_MAX
    for card_uid, service_id, day_cents, month_cents in zip(uids, services, day_totals, month_totals, strict=True):
        if (activity := builder.activity(card_uid)) is not None:
            group = groups[service_id]
            activity.cap_day = day
            activity.cap_month = month
            spent = activity.cap_spent
            spent[group] += day_cents
            spent[month_offset + group] += month_cents


def passage_window_ms(state: CityState) -> int:
    """How far back a card's last passage can still change a decision: the
    longest anti-passback window or the sharing check's horizon, whichever is
    longer, at most PASSAGE_LOOKBACK_MAX_MS. (The transfer window does not
    count: the start of a journey is read on its own.)"""
    passback_ms = max((row[fastpath.POLICY_PASSBACK_MS] for row in state.service_policy.values()), default=0)
    return min(max(passback_ms, sharing_horizon_ms(state)), PASSAGE_LOOKBACK_MAX_MS)


def sharing_horizon_ms(state: CityState) -> int:
    """The time after a passage beyond which the sharing check cannot fire.

    The check suspects sharing when two terminals are farther apart than the
    rules' speed covers in the time between the taps; past the time it
    takes to cover the largest distance between two located terminals, it
    never does. 0 when no two terminals are far enough apart to count.
    """
    located = [
        (terminal.latitude, terminal.longitude)
        for terminal in state.terminals.values()
        if terminal.latitude is not None and terminal.longitude is not None
    ]
    if len(located) < 2:
        return 0
    # No two terminals are farther apart than twice the farthest one is from
    # any one of them (triangle inequality): a bound in one pass, where the
    # exact largest distance would compare every pair.
    origin_latitude, origin_longitude = located[0]
    reach_m = 2 * max(
        fastpath.distance_m(origin_latitude, origin_longitude, latitude, longitude) for latitude, longitude in located
    )
    if reach_m < state.sharing_min_distance_m:
        return 0
    speed_kmh = state.sharing_max_speed_kmh
    if speed_kmh <= 0:
        return PASSAGE_LOOKBACK_MAX_MS
    # The ladder's test: metres * 3600 > speed_kmh * elapsed_ms.
    return math.ceil(reach_m * 3600 / speed_kmh)


def _time(epoch_ms: int) -> datetime.datetime:
    """A record time (``taps.recorded_at``) from Unix milliseconds."""
    return _EPOCH + datetime.timedelta(milliseconds=epoch_ms)


def _month_start(month: int) -> datetime.datetime:
    """Midnight UTC of the first day of a month numbered as by
    ``fastpath.month_of_day`` (year * 12 + month - 1)."""
    return datetime.datetime(month // 12, month % 12 + 1, 1, tzinfo=datetime.UTC)


async def _read_stays(conn: asyncpg.Connection, builder: _Builder, now_ms: int) -> None:
    services = [
        service
        for service, row in builder.state.service_policy.items()
        if row[fastpath.POLICY_KIND] == fastpath.SERVICE_PER_DURATION
    ]
    if not services:
        return
    uids, stay_services, times_ms, charges = await builder.columns(
        conn,
        _STAYS_SQL,
        "card_uid, service_id, stay_ms, charged",
        _time(now_ms - STAY_LOOKBACK_DAYS * _MS_PER_DAY),
        OperationKind.TAP,
        ResultCode.APPROVED,
        services,
        fastpath.TAP_FLAG_EXIT,
        OperationKind.REVERSAL,
    )
    # A card holds one open stay: the latest entry wins, as in the ladder
    # (an entry elsewhere replaces the stay it remembers).
    latest: dict[int, tuple[int, int, int]] = {}
    for card_uid, service_id, stay_ms, charged in zip(uids, stay_services, times_ms, charges, strict=True):
        if card_uid not in latest or stay_ms > latest[card_uid][1]:
            latest[card_uid] = (service_id, stay_ms, charged)
    for card_uid, (service_id, stay_ms, charged) in latest.items():
        if (activity := builder.activity(card_uid)) is not None:
            activity.stay_service = service_id
            activity.stay_ms = stay_ms
            activity.stay_charged = charged
