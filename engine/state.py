"""The in-memory city: cards, accounts, tariffs and terminals.

The engine is the only writer of this state. It is loaded once at start and
then changed only by the decision fast path (pending amounts) and by the batch
writer (committed amounts), so every tap is decided without a database round
trip.

Cards and accounts are stored column-wise in typed arrays indexed by a dense
position rather than as one Python object each: 340,000 cards cost a few
megabytes instead of a few hundred, and the compiled fast path reads them
without touching Python objects.

Money rule, checked here and again by the schema: an account's spendable
balance is its committed balance minus the debits decided but not yet
committed. Credits (top-ups, refunds) count only once committed.
"""

from __future__ import annotations

import datetime
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from engine.codes import TerminalKind
from engine.fastpath import (
    CAP_GROUPS_MAX,
    SETTING_CLONE_BLOCKS_CARD,
    SETTING_RENEWAL_WINDOW_DAYS,
    SETTING_SHARING_MAX_SPEED_KMH,
    SETTING_SHARING_MIN_DISTANCE_M,
    SETTING_SHOW_ID_PERMILLE,
    SETTING_TRANSFER_PERCENT_OFF,
    SETTING_TRANSFER_WINDOW_MS,
    SETTINGS_FIELDS,
    Activity,
)

# A fare of -1 in the tariff table means "this profile is not served here".
NO_FARE = -1

# Rows fetched per round trip while loading the city: large enough that the
# round trips do not matter (500 for 10 million cards), small enough that a
# batch of records is a few megabytes.
LOAD_PREFETCH_ROWS = 20_000

# Profiles are small integers (schema: 0 <= id < 64), so a service's fares are
# a 64-slot row indexed by profile.
PROFILES_MAX = 64

# The profile whose fare applies when a holder's concession is not valid
# (schema: profiles.id 0, code 'standard'). It needs no eligibility.
STANDARD_PROFILE = 0

# Eligibility periods are held as days since 1970-01-01 (UTC), inclusive at
# both ends. A standard card is always "eligible"; a concession card with no
# eligibility row never is: its period is empty (from > until).
ALWAYS_FROM_DAY = -(2**31)
ALWAYS_UNTIL_DAY = 2**31 - 1
NEVER_FROM_DAY = 1
NEVER_UNTIL_DAY = 0
_EPOCH = datetime.date(1970, 1, 1)

# A cap of -1 cents: this group has no such cap.
NO_CAP_CENTS = -1

# Card sharing, until a rules version sets it (rules: security): a speed of
# 0 turns the check off, like every other rule without a rules version.
SHARING_CHECK_OFF_KMH = 0

# Days before a concession ends during which taps warn the holder to renew,
# until a rules version sets its own (rules: concessions.renewal_window_days).
DEFAULT_RENEWAL_WINDOW_DAYS = 30


class InvariantError(Exception):
    """A money invariant does not hold: a bug. The engine stops rather than
    continue on state it cannot trust."""


@dataclass(slots=True)
class Terminal:
    """One terminal as the engine needs it to decide."""

    id: int
    service_id: int
    kind: int
    key_version: int
    active: bool
    funding_account: int  # account position for kiosks, -1 otherwise
    high_seq: int  # the highest terminal_seq ever recorded or decided
    # Where it stands (WGS84 degrees), for the card-sharing check; None: not located.
    latitude: float | None = None
    longitude: float | None = None

    @property
    def is_kiosk(self) -> bool:
        return self.kind == TerminalKind.KIOSK


class _Setting:
    """A CityState attribute kept in ``state.settings`` at a fixed index."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, state: CityState, owner: object = None) -> int:
        return state.settings[self.index]

    def __set__(self, state: CityState, value: int) -> None:
        state.settings[self.index] = int(value)


class CityState:
    """Cards, accounts, services and terminals, held column-wise.

    Positions (``card`` and ``account`` below) are dense indexes into the
    arrays; database ids are kept alongside for writing back.
    """

    def __init__(self) -> None:
        # Cards
        self.card_position: dict[int, int] = {}  # uid -> card position
        self.card_uid = array("q")
        self.card_status = bytearray()
        self.card_profile = bytearray()
        self.card_account = array("q")  # -> account position
        self.card_holder = array("q")  # holder id (database), for eligibility changes
        # The holder's eligibility for the card's profile, in days since
        # 1970-01-01, inclusive (see ALWAYS_*/NEVER_* above).
        self.card_eligible_from = array("i")
        self.card_eligible_until = array("i")
        # Accounts
        self.account_position: dict[int, int] = {}  # database id -> position
        self.account_id = array("q")
        self.balance = array("q")  # committed, cents
        self.pending_debit = array("q")  # decided, not yet committed, cents
        self.pending_credit = array("q")  # decided, not yet committed, cents
        self.floor = array("q")
        self.ceiling = array("q")
        # Services: service id -> fares by profile, and the revenue account position.
        self.fares: dict[int, array[int]] = {}
        self.revenue_account: dict[int, int] = {}
        self.terminals: dict[int, Terminal] = {}
        # The rules version deciding taps now (recorded with each), and the
        # concession renewal warning window it sets.
        self.rules_version = 0
        # The rules' policies as the fast path reads them (engine.policy
        # fills them from a rules version; these defaults turn every rule
        # off): service id -> policy row, and the city-wide settings.
        self.service_policy: dict[int, array[int]] = {}
        self.cap_daily = array("q", [NO_CAP_CENTS] * CAP_GROUPS_MAX)
        self.cap_monthly = array("q", [NO_CAP_CENTS] * CAP_GROUPS_MAX)
        # The city-wide settings, packed for the fast path (the SETTING_*
        # fields of engine.fastpath); read and set through the attributes below.
        self.settings = array("q", [0] * SETTINGS_FIELDS)
        self.settings[SETTING_RENEWAL_WINDOW_DAYS] = DEFAULT_RENEWAL_WINDOW_DAYS
        self.settings[SETTING_SHARING_MAX_SPEED_KMH] = SHARING_CHECK_OFF_KMH
        # What the rules remember of each card that tapped (counter, last
        # passage, journey start, cap totals): card position -> Activity.
        self.activity: dict[int, Activity] = {}

    transfer_window_ms = _Setting(SETTING_TRANSFER_WINDOW_MS)
    transfer_percent_off = _Setting(SETTING_TRANSFER_PERCENT_OFF)
    show_id_permille = _Setting(SETTING_SHOW_ID_PERMILLE)
    clone_blocks_card = _Setting(SETTING_CLONE_BLOCKS_CARD)  # 0 or 1
    sharing_max_speed_kmh = _Setting(SETTING_SHARING_MAX_SPEED_KMH)
    sharing_min_distance_m = _Setting(SETTING_SHARING_MIN_DISTANCE_M)
    renewal_window_days = _Setting(SETTING_RENEWAL_WINDOW_DAYS)

    # --- building -------------------------------------------------------

    def add_account(self, account_id: int, balance: int, floor: int, ceiling: int) -> int:
        position = len(self.account_id)
        self.account_position[account_id] = position
        self.account_id.append(account_id)
        self.balance.append(balance)
        self.pending_debit.append(0)
        self.pending_credit.append(0)
        self.floor.append(floor)
        self.ceiling.append(ceiling)
        return position

    def add_card(
        self,
        uid: int,
        status: int,
        profile: int,
        account_id: int,
        holder_id: int = 0,
        eligible: tuple[int, int] | None = None,
    ) -> int:
        """Append a card; ``eligible`` is its holder's (from_day, until_day)
        for its profile, None when there is no eligibility row."""
        position = len(self.card_uid)
        self.card_position[uid] = position
        self.card_uid.append(uid)
        self.card_status.append(status)
        self.card_profile.append(profile)
        self.card_account.append(self.account_position[account_id])
        self.card_holder.append(holder_id)
        from_day, until_day = eligibility_days(profile, eligible)
        self.card_eligible_from.append(from_day)
        self.card_eligible_until.append(until_day)
        return position

    def update_card(
        self, uid: int, status: int, profile: int, account_id: int, holder_id: int, eligible: tuple[int, int] | None
    ) -> int:
        """Set a known card's columns from its database row, or append it if new."""
        position = self.card_position.get(uid)
        if position is None:
            return self.add_card(uid, status, profile, account_id, holder_id, eligible)
        self.card_status[position] = status
        self.card_profile[position] = profile
        self.card_account[position] = self.account_position[account_id]
        self.card_holder[position] = holder_id
        from_day, until_day = eligibility_days(profile, eligible)
        self.card_eligible_from[position] = from_day
        self.card_eligible_until[position] = until_day
        return position

    def set_fare(self, service_id: int, profile: int, fare_cents: int) -> None:
        row = self.fares.get(service_id)
        if row is None:
            row = self.fares[service_id] = array("q", [NO_FARE] * PROFILES_MAX)
        row[profile] = fare_cents

    # --- reading --------------------------------------------------------

    def available(self, account: int) -> int:
        """Spendable cents: committed balance minus pending debits."""
        return self.balance[account] - self.pending_debit[account]

    def card_count(self) -> int:
        return len(self.card_uid)

    def check_invariants(self) -> None:
        """Raise InvariantError if any account breaks a money rule.

        O(accounts): for tests and for the writer's periodic self-check,
        not for the per-tap path.
        """
        for position in range(len(self.account_id)):
            committed = self.balance[position]
            if committed < self.floor[position]:
                raise InvariantError(
                    f"account {self.account_id[position]}: balance {committed} below floor {self.floor[position]}"
                )
            if self.pending_debit[position] < 0 or self.pending_credit[position] < 0:
                raise InvariantError(f"account {self.account_id[position]}: negative pending amount")
            if committed - self.pending_debit[position] < self.floor[position]:
                raise InvariantError(f"account {self.account_id[position]}: pending debits exceed the floor")


# A card with its holder's profile and the holder's eligibility for that
# profile (days since 1970-01-01; NULL when there is no row). No ORDER BY:
# card positions need no order, and sorting millions of rows would only make
# the start slower.
_CARDS_SQL = (
    "SELECT c.uid, c.status, h.profile_id, c.account_id, c.holder_id,"
    " (e.valid_from - DATE '1970-01-01'), (e.valid_until - DATE '1970-01-01')"
    " FROM cards c JOIN holders h ON h.id = c.holder_id"
    " LEFT JOIN eligibility e ON e.holder_id = c.holder_id AND e.profile_id = h.profile_id"
)


def day_number(day: datetime.date) -> int:
    """Days since 1970-01-01."""
    return (day - _EPOCH).days


def eligibility_days(profile: int, eligible: tuple[int, int] | None) -> tuple[int, int]:
    """The (from_day, until_day) a card holds for its profile."""
    if profile == STANDARD_PROFILE:
        return (ALWAYS_FROM_DAY, ALWAYS_UNTIL_DAY)
    if eligible is None:
        return (NEVER_FROM_DAY, NEVER_UNTIL_DAY)
    return eligible


def _period(from_day: int | None, until_day: int | None) -> tuple[int, int] | None:
    return None if from_day is None or until_day is None else (from_day, until_day)


async def refresh_cards(
    conn: asyncpg.Connection, state: CityState, *, uids: Iterable[int] = (), holders: Iterable[int] = ()
) -> int:
    """Re-read cards (by uid, or every card of the given holders) from the
    database into ``state``: status, profile, account, eligibility. New cards
    are appended; their accounts must be loaded first (``refresh_account``).

    The card office commits a change, then calls this on the engine's event
    loop, so the very next tap sees it. Returns the number of cards read.
    """
    uid_list = list(uids)
    holder_list = list(holders)
    rows = await conn.fetch(
        _CARDS_SQL + " WHERE c.uid = ANY($1::int8[]) OR c.holder_id = ANY($2::int8[])", uid_list, holder_list
    )
    for row in rows:
        if row[3] not in state.account_position:
            await refresh_account(conn, state, row[3])
        state.update_card(row[0], row[1], row[2], row[3], row[4], _period(row[5], row[6]))
    return len(rows)


async def refresh_account(conn: asyncpg.Connection, state: CityState, account_id: int) -> int:
    """Load an account the engine does not hold yet (a newly issued card's).

    Known accounts are never re-read: their balances change only through the
    engine's own batches, and the database row may lag the pending amounts.
    """
    position = state.account_position.get(account_id)
    if position is not None:
        return position
    row = await conn.fetchrow(
        "SELECT balance_cents, floor_cents, ceiling_cents FROM accounts WHERE id = $1", account_id
    )
    if row is None:
        raise LookupError(f"account {account_id} does not exist")
    return state.add_account(account_id, row[0], row[1], row[2])


async def load_state(conn: asyncpg.Connection) -> CityState:
    """Read the whole city from the database into a new CityState.

    Runs in one REPEATABLE READ transaction so that cards, accounts and
    terminals come from the same snapshot.
    """
    state = CityState()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # Streamed through cursors: holding every row of a 10-million-card
        # city as asyncpg records at once would cost gigabytes at start.
        accounts = conn.cursor(
            "SELECT id, balance_cents, floor_cents, ceiling_cents FROM accounts ORDER BY id",
            prefetch=LOAD_PREFETCH_ROWS,
        )
        async for row in accounts:
            state.add_account(row[0], row[1], row[2], row[3])
        # No ORDER BY: card positions need no order, and sorting millions of
        # rows would only make the start slower.
        cards = conn.cursor(_CARDS_SQL, prefetch=LOAD_PREFETCH_ROWS)
        async for row in cards:
            state.add_card(row[0], row[1], row[2], row[3], row[4], _period(row[5], row[6]))
        for service_id, revenue_account_id in await conn.fetch("SELECT id, revenue_account_id FROM services"):
            state.revenue_account[service_id] = state.account_position[revenue_account_id]
            state.fares.setdefault(service_id, array("q", [NO_FARE] * PROFILES_MAX))
        for service_id, profile_id, fare in await conn.fetch("SELECT service_id, profile_id, fare_cents FROM tariffs"):
            state.set_fare(service_id, profile_id, fare)
        terminals = await conn.fetch(
            "SELECT t.id, t.service_id, t.kind, t.key_version, t.status, t.funding_account_id, t.latitude, t.longitude,"
            " (SELECT max(terminal_seq) FROM taps WHERE terminal_id = t.id) AS high_seq"
            " FROM terminals t"
        )
        for row in terminals:
            funding = row["funding_account_id"]
            state.terminals[row["id"]] = Terminal(
                id=row["id"],
                service_id=row["service_id"],
                kind=row["kind"],
                key_version=row["key_version"],
                active=row["status"] == 0,
                funding_account=state.account_position[funding] if funding is not None else -1,
                high_seq=row["high_seq"] if row["high_seq"] is not None else -1,
                latitude=row["latitude"],
                longitude=row["longitude"],
            )
    state.check_invariants()
    return state


def now_ms() -> int:
    """Engine wall clock in Unix milliseconds (record time)."""
    return time.time_ns() // 1_000_000
