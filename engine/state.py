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
import operator
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from engine.bulk_load import FixedWidthColumns
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
    PositionIndex,
    Product,
)
from engine.limits import OFFICE_REFUND_WINDOW_S

# A fare of -1 in the tariff table means "this profile is not served here".
NO_FARE = -1

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

    # Slots: the decision ladder reads about twenty of these per tap, and a
    # slot is read without the instance dictionary's look-up.
    __slots__ = (
        "account_id",
        "account_position",
        "activity",
        "balance",
        "cap_daily",
        "cap_monthly",
        "card_account",
        "card_eligible_from",
        "card_eligible_until",
        "card_holder",
        "card_position",
        "card_profile",
        "card_status",
        "card_uid",
        "ceiling",
        "debt_limit",
        "fares",
        "floor",
        "group_ids",
        "pending_credit",
        "pending_debit",
        "product_by_id",
        "products",
        "revenue_account",
        "rules_version",
        "service_policy",
        "settings",
        "terminals",
    )

    def __init__(self) -> None:
        # Cards
        self.card_position = PositionIndex()  # uid -> card position
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
        self.account_position = PositionIndex()  # database id -> position
        self.account_id = array("q")
        self.balance = array("q")  # committed, cents
        self.pending_debit = array("q")  # decided, not yet committed, cents
        self.pending_credit = array("q")  # decided, not yet committed, cents
        self.floor = array("q")
        self.ceiling = array("q")
        # How far below its floor a card account may be taken by offline taps
        # that stand (schema: accounts.debt_limit_cents; 0 for other accounts).
        self.debt_limit = array("q")
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
        # Season passes and multi-ride tickets: account position -> the
        # account's products (few accounts hold any), and by database id.
        self.products: dict[int, list[Product]] = {}
        self.product_by_id: dict[int, Product] = {}
        # Service group code -> the number products and policy rows use for
        # it. Numbers are given on first sight and never change, so a
        # product sold under one rules version matches the policy rows of
        # every later one.
        self.group_ids: dict[str, int] = {}

    transfer_window_ms = _Setting(SETTING_TRANSFER_WINDOW_MS)
    transfer_percent_off = _Setting(SETTING_TRANSFER_PERCENT_OFF)
    show_id_permille = _Setting(SETTING_SHOW_ID_PERMILLE)
    clone_blocks_card = _Setting(SETTING_CLONE_BLOCKS_CARD)  # 0 or 1
    sharing_max_speed_kmh = _Setting(SETTING_SHARING_MAX_SPEED_KMH)
    sharing_min_distance_m = _Setting(SETTING_SHARING_MIN_DISTANCE_M)
    renewal_window_days = _Setting(SETTING_RENEWAL_WINDOW_DAYS)

    # --- building -------------------------------------------------------

    def add_account(self, account_id: int, balance: int, floor: int, ceiling: int, debt_limit: int = 0) -> int:
        position = len(self.account_id)
        self.account_position[account_id] = position
        self.account_id.append(account_id)
        self.balance.append(balance)
        self.pending_debit.append(0)
        self.pending_credit.append(0)
        self.floor.append(floor)
        self.ceiling.append(ceiling)
        self.debt_limit.append(debt_limit)
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

    def add_cards(
        self,
        uids: Sequence[int],
        statuses: Sequence[int],
        profiles: Sequence[int],
        account_ids: Sequence[int],
        holder_ids: Sequence[int],
        eligible_from: Sequence[int],
        eligible_until: Sequence[int],
    ) -> None:
        """Append many cards at once, column by column (``add_card`` for each,
        at a fraction of the cost: loading 10 million cards is mostly this).
        ``eligible_from``/``eligible_until`` are as ``eligibility_days`` gives
        them (the load computes them in SQL)."""
        start = len(self.card_uid)
        count = len(uids)
        self.card_uid.extend(uids)
        # Checked after the fact, once: a uid twice in the database is a
        # broken primary key, and the index would silently keep the last one.
        if self.card_position.add_range(uids, start) != count:
            raise InvariantError("duplicate card uids while loading")
        # Through array('B'): one byte each, and an OverflowError for a
        # value that does not fit (a bytearray would take the bytes of any
        # buffer as they are).
        self.card_status.extend(array("B", statuses))
        self.card_profile.extend(array("B", profiles))
        self.card_account.extend(self.account_position.positions(account_ids))
        self.card_holder.extend(holder_ids)
        self.card_eligible_from.extend(eligible_from)
        self.card_eligible_until.extend(eligible_until)

    def add_accounts(
        self,
        ids: Sequence[int],
        balances: Sequence[int],
        floors: Sequence[int],
        ceilings: Sequence[int],
        debt_limits: Sequence[int] | None = None,
    ) -> None:
        """Append many accounts at once, column by column (see add_cards);
        ``debt_limits`` None: none may go below its floor."""
        start = len(self.account_id)
        count = len(ids)
        self.account_id.extend(ids)
        if self.account_position.add_range(ids, start) != count:
            raise InvariantError("duplicate account ids while loading")
        self.balance.extend(balances)
        zeros = array("q", bytes(8 * count))
        self.pending_debit.extend(zeros)
        self.pending_credit.extend(zeros)
        self.floor.extend(floors)
        self.ceiling.extend(ceilings)
        self.debt_limit.extend(debt_limits if debt_limits is not None else zeros)

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

    def group_id(self, code: str) -> int:
        """The number of service group ``code`` (given on first sight)."""
        number = self.group_ids.get(code)
        if number is None:
            number = self.group_ids[code] = len(self.group_ids)
        return number

    def add_product(
        self,
        product_id: int,
        account_id: int,
        kind: int,
        group_code: str,
        valid: tuple[datetime.date, datetime.date] | None,
        rides: int,
        rides_used: int,
    ) -> Product:
        """Hold a new product (a card_products row) for its account; ``valid``
        is a season pass's first and last day, ``rides`` a ticket's rides."""
        first_day, last_day = (day_number(valid[0]), day_number(valid[1])) if valid is not None else (0, -1)
        self.add_products(
            [product_id], [account_id], [kind], [self.group_id(group_code)], [first_day], [last_day], [rides],
            [rides_used],
        )  # fmt: skip
        return self.product_by_id[product_id]

    def add_products(
        self,
        product_ids: Sequence[int],
        account_ids: Sequence[int],
        kinds: Sequence[int],
        groups: Sequence[int],
        first_days: Sequence[int],
        last_days: Sequence[int],
        rides: Sequence[int],
        rides_used: Sequence[int],
    ) -> None:
        """Hold many products at once (a whole load): columns as add_product
        takes them, with the group as its number and days since 1970-01-01."""
        position = self.account_position
        products = self.products
        by_id = self.product_by_id
        for product_id, account_id, kind, group, first_day, last_day, ride_count, used in zip(
            product_ids, account_ids, kinds, groups, first_days, last_days, rides, rides_used, strict=True
        ):
            product = Product(product_id, kind, group, first_day, last_day, ride_count, used)
            products.setdefault(position[account_id], []).append(product)
            by_id[product_id] = product

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

    def lowest(self, account: int) -> int:
        """The lowest balance ``account`` (a position) may ever hold: its
        floor, less its debt allowance for offline taps that stand."""
        return self.floor[account] - self.debt_limit[account]

    def check_invariants(self) -> None:
        """Raise InvariantError if any account breaks a money rule.

        O(accounts): for tests and for the writer's periodic self-check,
        not for the per-tap path. The scan runs in C (zip, any); only an
        account that breaks a rule is looked at in Python, to name it.
        A balance below its floor is allowed down to the account's debt
        limit (offline taps that stand), never further.
        """
        balance, debit, credit, floor = self.balance, self.pending_debit, self.pending_credit, self.floor
        debt = self.debt_limit
        if not len(balance) == len(debit) == len(credit) == len(floor) == len(debt) == len(self.account_id):
            raise InvariantError("account columns of different lengths")
        lowest = array("q", map(operator.sub, floor, debt)) if any(debt) else floor
        suspects = any(map(operator.lt, balance, lowest)) or (
            (any(debit) or any(credit))
            and (min(debit) < 0 or min(credit) < 0 or any(map(operator.lt, map(operator.sub, balance, debit), lowest)))
        )
        if not suspects:
            return
        for position in range(len(self.account_id)):
            committed = self.balance[position]
            if committed < lowest[position]:
                raise InvariantError(
                    f"account {self.account_id[position]}: balance {committed} below floor {self.floor[position]}"
                    f" less debt limit {self.debt_limit[position]}"
                )
            if self.pending_debit[position] < 0 or self.pending_credit[position] < 0:
                raise InvariantError(f"account {self.account_id[position]}: negative pending amount")
            if committed - self.pending_debit[position] < lowest[position]:
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


# A whole load reads fixed-width integer columns (engine.bulk_load), so
# every column is cast to its width and never NULL. Accounts in id order.
# debt_limit_cents counts for card accounts only (schema/0006_offline.sql).
_LOAD_ACCOUNTS_SQL = (
    "SELECT id, balance_cents, floor_cents, ceiling_cents,"
    " CASE WHEN kind = 0 THEN debt_limit_cents ELSE 0 END FROM accounts ORDER BY id"
)
_LOAD_ACCOUNTS_WIDTHS = (8, 8, 8, 8, 8)

# The cards, with eligibility_days() done by the server: $1 the standard
# profile, $2/$3 its always-period, $4/$5 the empty period of a concession
# with no eligibility row. No ORDER BY: card positions need no order, and
# sorting millions of rows would only make the start slower.
_LOAD_CARDS_SQL = (
    "SELECT c.uid, c.status::int2, h.profile_id::int2, c.account_id, c.holder_id,"
    " (CASE WHEN h.profile_id = $1 THEN $2 WHEN e.valid_from IS NULL THEN $4"
    " ELSE e.valid_from - DATE '1970-01-01' END)::int4,"
    " (CASE WHEN h.profile_id = $1 THEN $3 WHEN e.valid_from IS NULL THEN $5"
    " ELSE e.valid_until - DATE '1970-01-01' END)::int4"
    " FROM cards c JOIN holders h ON h.id = c.holder_id"
    " LEFT JOIN eligibility e ON e.holder_id = c.holder_id AND e.profile_id = h.profile_id"
)
_LOAD_CARDS_ARGS = (STANDARD_PROFILE, ALWAYS_FROM_DAY, ALWAYS_UNTIL_DAY, NEVER_FROM_DAY, NEVER_UNTIL_DAY)
_LOAD_CARDS_WIDTHS = (8, 2, 2, 8, 8, 4, 4)

# Memory for the load's hash joins (cards with holders and eligibility), set
# for its transaction only: at PostgreSQL's default of 4 MB a million-card
# city's join spills to temporary files and takes twice as long; 10 million
# cards need about 600 MB of hash tables.
LOAD_WORK_MEM = "1GB"

# One COPY reads a whole table: 10 million cards stream in about a minute on
# a slow machine; ten minutes is a database that is not answering.
LOAD_TIMEOUT_S = 600.0


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


async def _copy_columns(
    conn: asyncpg.Connection,
    sql: str,
    args: tuple[object, ...],
    widths: tuple[int, ...],
    consume: Callable[..., None],
) -> int:
    """Stream ``sql`` as binary COPY into ``consume(*columns)``, a batch at a time."""
    sink = FixedWidthColumns(widths, lambda columns: consume(*columns))
    await conn.copy_from_query(sql, *args, output=sink, format="binary", timeout=LOAD_TIMEOUT_S)
    sink.finish()
    return sink.rows


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
        "SELECT balance_cents, floor_cents, ceiling_cents, CASE WHEN kind = 0 THEN debt_limit_cents ELSE 0 END"
        " FROM accounts WHERE id = $1",
        account_id,
    )
    if row is None:
        raise LookupError(f"account {account_id} does not exist")
    return state.add_account(account_id, row[0], row[1], row[2], row[3])


# Products as the fast path holds them (schema/0004_products.sql).
_PRODUCTS_SQL = "SELECT id, account_id, kind, group_code, valid_from, valid_until, rides, rides_used FROM card_products"

# The same for a whole load, as fixed-width integers: the group as its
# number ($1 codes, $2 numbers: CityState.group_id of every code in the
# table), days since 1970-01-01. Only products that can still pay are held:
# current or future season passes, tickets with rides left, and spent
# tickets one of whose rides can still be refunded (the ride goes back).
_LOAD_PRODUCTS_SQL = (
    "SELECT p.id, p.account_id, p.kind::int2, g.number::int2,"
    " coalesce(p.valid_from - DATE '1970-01-01', 0)::int4, coalesce(p.valid_until - DATE '1970-01-01', -1)::int4,"
    " coalesce(p.rides, 0)::int4, p.rides_used::int4"
    " FROM card_products p JOIN unnest($1::text[], $2::int4[]) AS g (code, number) ON g.code = p.group_code"
    " WHERE (p.kind = 0 AND p.valid_until >= current_date - 1) OR (p.kind = 1 AND p.rides_used < p.rides)"
    " OR p.id IN (SELECT product_id FROM taps WHERE product_id IS NOT NULL"
    " AND recorded_at > clock_timestamp() - $3 * interval '1 second')"
)
_LOAD_PRODUCTS_WIDTHS = (8, 8, 2, 2, 4, 4, 4, 4)


def _add_product_row(state: CityState, row: asyncpg.Record) -> Product:
    valid = (row[4], row[5]) if row[4] is not None else None
    return state.add_product(row[0], row[1], row[2], row[3], valid, row[6] or 0, row[7])


async def refresh_products(conn: asyncpg.Connection, state: CityState, product_ids: Iterable[int]) -> int:
    """Hold newly sold products (card_products rows) in ``state``.

    Products the engine holds already are never re-read: their rides used
    change only through the engine's own batches, and the database row may
    lag the rides decided but not yet committed. Returns the number added.
    """
    wanted = [product_id for product_id in product_ids if product_id not in state.product_by_id]
    if not wanted:
        return 0
    rows = await conn.fetch(_PRODUCTS_SQL + " WHERE id = ANY($1::int8[])", wanted)
    for row in rows:
        if row[1] not in state.account_position:
            await refresh_account(conn, state, row[1])
        _add_product_row(state, row)
    return len(rows)


async def load_state(conn: asyncpg.Connection) -> CityState:
    """Read the whole city from the database into a new CityState.

    Runs in one REPEATABLE READ transaction so that cards, accounts and
    terminals come from the same snapshot.
    """
    state = CityState()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # SET LOCAL: the setting ends with the transaction.
        await conn.execute(f"SET LOCAL work_mem = '{LOAD_WORK_MEM}'")
        # Streamed as binary COPY and appended a batch at a time, column by
        # column (engine.bulk_load): the database produces rows while they
        # are decoded, and no row becomes a Python object of its own.
        await _copy_columns(conn, _LOAD_ACCOUNTS_SQL, (), _LOAD_ACCOUNTS_WIDTHS, state.add_accounts)
        await _copy_columns(conn, _LOAD_CARDS_SQL, _LOAD_CARDS_ARGS, _LOAD_CARDS_WIDTHS, state.add_cards)
        for service_id, revenue_account_id in await conn.fetch("SELECT id, revenue_account_id FROM services"):
            state.revenue_account[service_id] = state.account_position[revenue_account_id]
            state.fares.setdefault(service_id, array("q", [NO_FARE] * PROFILES_MAX))
        for service_id, profile_id, fare in await conn.fetch("SELECT service_id, profile_id, fare_cents FROM tariffs"):
            state.set_fare(service_id, profile_id, fare)
        # Kept forever (taps refer to them), so spent tickets and ended
        # passes are left on disk: only those that can still pay are held.
        codes = [row[0] for row in await conn.fetch("SELECT DISTINCT group_code FROM card_products")]
        numbers = [state.group_id(code) for code in codes]
        await _copy_columns(
            conn,
            _LOAD_PRODUCTS_SQL,
            (codes, numbers, OFFICE_REFUND_WINDOW_S),
            _LOAD_PRODUCTS_WIDTHS,
            state.add_products,
        )
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
