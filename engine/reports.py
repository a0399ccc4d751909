"""What the city reads from the record: the daily report and the reconciliation.

The daily report counts one UTC day of tap records (``taps.recorded_at``,
the engine's clock) per service and per fare profile: uses, revenue, top-ups
and declines by reason. Taps decided offline by their terminal count on the
day they were uploaded, like every record, and are also summed apart
(``OfflineFigures``): how many, how many the engine would have decided
otherwise and why, what they charged and what the debt limit left unpaid. The profile is the one whose fare applied
(``taps.fare_profile``); records written before that column existed have
none, and fall back to the card holder's profile as it is now.

The reconciliation proves the books from the database alone:

1. every account's balance equals the sum of its ledger entries;
2. every ledger transfer sums to zero;
3. per batch, the money the tap records say moved equals what the ledger
   entries of that batch's transfers moved. A tap record's ``amount_cents``
   is exactly the money it moved, and the writer books one transfer per
   (batch, ledger kind, service), with the tap's kind as the ledger kind
   (fare 0, top-up 1, reversal 2). So, per transfer key, the revenue accounts
   gained the fares minus the refunded fares and the funding accounts gained
   the reversed top-ups minus the top-ups; and per (batch, card account), the
   card gained its top-ups and refunds minus its fares and reversed top-ups.
   This catches what the first two checks cannot: a fare booked to the
   wrong card or the wrong service's revenue, money booked with no tap
   record, a tap record with no booking, all with every transfer balanced.
4. every multi-ride ticket's rides used equal the approved taps it paid
   minus the approved reversals that gave a ride back, and stay within the
   rides bought.

Example::

    report = await daily_report(conn, datetime.date(2026, 3, 2))
    report.total.revenue_cents  # 2_714_350
    result = await reconcile(conn)
    result.ok  # True
"""

from __future__ import annotations

import datetime
from typing import Any

import asyncpg
import msgspec

from engine.codes import ProductKind, ResultCode

# Reports count tap records by the day they were recorded in UTC: the
# database's clock is unambiguous, with no day of 23 or 25 hours.
REPORT_TIME_ZONE = datetime.UTC

# Tap records that name no known card (UNKNOWN_CARD declines) have no
# profile; their line in the report carries this instead of a profile code.
NO_PROFILE = "(no card)"

# Each reconciliation check lists its first differences, ordered by id; a
# database wrong everywhere (340,000 accounts) shows its pattern in far
# fewer, and the rest are counted rather than printed.
RECONCILE_DIFFERENCES_MAX = 1_000

# The checks read every account, ledger entry and money-moving tap record:
# about 6 s per million such records on a 2-CPU machine (a month of Gijón's
# taps); ten minutes covers years of a city's record, or a region's month.
RECONCILE_TIMEOUT_S = 600.0

# Memory for the reconciliation's hash tables (one session, one run at a
# time): a month of Gijón's money-moving taps is about a million (batch,
# card) groups, some 150 MB of hash table, which then fit in memory; at
# PostgreSQL's default of 4 MB they spill to temporary files and the run
# takes half as long again. Larger runs still finish, spilling what does not
# fit.
RECONCILE_WORK_MEM = "256MB"

# A day's taps are at most a few hundred thousand rows, read by index.
REPORT_TIMEOUT_S = 120.0

# ledger_transfers.kind (and taps.kind, which the writer books it from).
LEDGER_KIND_NAMES = {0: "fare", 1: "top-up", 2: "reversal", 3: "opening"}


# --- the daily report -------------------------------------------------------------------


class DailyFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Counts and cents of one slice of a day.

    ``revenue_cents`` is ``fare_cents - refund_cents``: fares of approved
    taps, minus approved reversals of fares recorded the same day (whatever
    day the fare was). ``topup_reversed_cents`` are approved reversals of
    top-ups. ``declines`` counts declined records of every kind by result
    code name.
    """

    uses: int
    fare_cents: int
    refund_cents: int
    revenue_cents: int
    topups: int
    topup_cents: int
    topup_reversed_cents: int
    declines: dict[str, int]


class ProfileLine(DailyFigures, frozen=True, kw_only=True):
    """One service and fare profile (``NO_PROFILE`` when the card is unknown)."""

    service: str
    profile: str


class ServiceLine(DailyFigures, frozen=True, kw_only=True):
    """One service, all profiles."""

    service: str


class ProductSales(msgspec.Struct, frozen=True, kw_only=True):
    """Passes or tickets of one product sold at the card office in the day,
    and the taps they paid (``uses``, also counted in the service lines)."""

    product: str
    kind: str
    sold: int
    price_cents: int
    uses: int


class OfflineFigures(msgspec.Struct, frozen=True, kw_only=True):
    """Taps decided offline by their terminals and uploaded in the day
    (also counted in the lines above: uses, fares, declines).

    ``differs`` counts those the engine's own decision would have changed,
    by that decision's result code name (``APPROVED``: a tap the terminal
    refused). ``charged_cents`` is what the approved ones charged;
    ``uncollected_cents`` what their terminals charged beyond it (the debt
    limit stopped it). ``accounts_in_debt`` and ``debt_cents`` are the card
    accounts below their floor when the report is made, and by how much.
    """

    taps: int = 0
    approved: int = 0
    declined: int = 0
    differs: dict[str, int] = msgspec.field(default_factory=dict)
    charged_cents: int = 0
    uncollected_cents: int = 0
    accounts_in_debt: int = 0
    debt_cents: int = 0


class DailyReport(msgspec.Struct, frozen=True, kw_only=True):
    """Taps recorded in ``[starts_at, ends_at)``, which is ``day`` in UTC,
    and the products sold then (paid at the desk: not in the fares)."""

    day: datetime.date
    time_zone: str
    starts_at: datetime.datetime
    ends_at: datetime.datetime
    lines: list[ProfileLine]
    services: list[ServiceLine]
    total: DailyFigures
    products: list[ProductSales] = msgspec.field(default_factory=list)
    offline: OfflineFigures = msgspec.field(default_factory=OfflineFigures)


# One row per (service, profile, result): the decline reasons are spread over
# rows and folded in Python; the money and uses sit on the result 0 rows.
# An exit tap marked TapInfo.REFUNDED (info bit 128) returned money to the
# card: the rest of the maximum charge its stay's entry took.
# A reversal is counted under its original's fare profile when it records
# none itself, so a refund lands where the fare did. The range on recorded_at
# reads the day through the taps_recorded_at index (BRIN, schema/0007).
# Originals are looked up by primary key for reversals only (a join would be flattened by the
# planner into hashing the whole tap record to serve a handful of rows).
_DAILY_SQL = """
WITH day AS MATERIALIZED (
    SELECT t.service_id, t.kind, t.result, t.amount_cents, t.card_uid, t.fare_profile,
           (t.info & 128) <> 0 AS refunded,
           CASE WHEN t.kind = 2 THEN (
               SELECT o.kind FROM taps o
               WHERE o.terminal_id = coalesce(t.original_terminal_id, t.terminal_id) AND o.terminal_seq = t.original_seq
           ) END AS original_kind,
           CASE WHEN t.kind = 2 THEN (
               SELECT o.fare_profile FROM taps o
               WHERE o.terminal_id = coalesce(t.original_terminal_id, t.terminal_id) AND o.terminal_seq = t.original_seq
           ) END AS original_profile
    FROM taps t
    WHERE t.recorded_at >= $1 AND t.recorded_at < $2
)
SELECT d.service_id,
       s.code AS service,
       coalesce(d.fare_profile, d.original_profile, h.profile_id) AS profile_id,
       p.code AS profile,
       d.result,
       count(*) FILTER (WHERE d.kind = 0 AND d.result = 0) AS uses,
       coalesce(sum(d.amount_cents) FILTER (WHERE d.kind = 0 AND d.result = 0 AND NOT d.refunded), 0)::int8
           AS fare_cents,
       coalesce(sum(d.amount_cents) FILTER (
           WHERE d.result = 0 AND ((d.kind = 2 AND d.original_kind = 0) OR (d.kind = 0 AND d.refunded))
       ), 0)::int8 AS refund_cents,
       count(*) FILTER (WHERE d.kind = 1 AND d.result = 0) AS topups,
       coalesce(sum(d.amount_cents) FILTER (WHERE d.kind = 1 AND d.result = 0), 0)::int8 AS topup_cents,
       coalesce(sum(d.amount_cents) FILTER (WHERE d.kind = 2 AND d.result = 0 AND d.original_kind = 1), 0)::int8
           AS topup_reversed_cents,
       count(*) FILTER (WHERE d.result <> 0) AS declines
FROM day d
LEFT JOIN cards c ON coalesce(d.fare_profile, d.original_profile) IS NULL AND c.uid = d.card_uid
LEFT JOIN holders h ON h.id = c.holder_id
LEFT JOIN services s ON s.id = d.service_id
LEFT JOIN profiles p ON p.id = coalesce(d.fare_profile, d.original_profile, h.profile_id)
GROUP BY d.service_id, s.code, coalesce(d.fare_profile, d.original_profile, h.profile_id), p.code, d.result
"""

# Products sold in the day, and the day's taps each product paid.
_PRODUCTS_SQL = """
WITH sold AS (
    SELECT product_code, kind, count(*) AS sold, sum(price_cents)::int8 AS price_cents
    FROM card_products WHERE sold_at >= $1 AND sold_at < $2 GROUP BY product_code, kind
), used AS (
    SELECT p.product_code, p.kind, count(*) AS uses
    FROM taps t JOIN card_products p ON p.id = t.product_id
    WHERE t.recorded_at >= $1 AND t.recorded_at < $2 AND t.kind = 0 AND t.result = 0
    GROUP BY p.product_code, p.kind
)
SELECT coalesce(s.product_code, u.product_code) AS product, coalesce(s.kind, u.kind) AS kind,
       coalesce(s.sold, 0) AS sold, coalesce(s.price_cents, 0)::int8 AS price_cents, coalesce(u.uses, 0) AS uses
FROM sold s FULL JOIN used u ON u.product_code = s.product_code AND u.kind = s.kind
ORDER BY 1, 2
"""

# Offline taps (info bit 256, TapInfo.OFFLINE) of the day, by the engine's own
# decision where it differs (bit 512, OFFLINE_DIFFERS); and the card accounts
# below their floor now.
_OFFLINE_SQL = """
SELECT count(*) AS taps,
       count(*) FILTER (WHERE result = 0) AS approved,
       coalesce(sum(amount_cents) FILTER (WHERE result = 0), 0)::int8 AS charged_cents,
       coalesce(sum(requested_cents - amount_cents) FILTER (WHERE result = 0), 0)::int8 AS uncollected_cents
FROM taps WHERE recorded_at >= $1 AND recorded_at < $2 AND (info & 256) <> 0
"""
_OFFLINE_DIFFERS_SQL = """
SELECT online_result, count(*) AS taps
FROM taps WHERE recorded_at >= $1 AND recorded_at < $2 AND (info & 512) <> 0
GROUP BY online_result ORDER BY online_result
"""
_DEBT_SQL = """
SELECT count(*) AS accounts, coalesce(sum(floor_cents - balance_cents), 0)::int8 AS cents
FROM accounts WHERE kind = 0 AND balance_cents < floor_cents
"""

_FIGURE_COLUMNS = ("uses", "fare_cents", "refund_cents", "topups", "topup_cents", "topup_reversed_cents")


class _Tally:
    """Figures being added up."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(_FIGURE_COLUMNS, 0)
        self.declines: dict[int, int] = {}

    def add(self, row: asyncpg.Record) -> None:
        for column in _FIGURE_COLUMNS:
            self.sums[column] += int(row[column])
        if row["declines"]:
            result = int(row["result"])
            self.declines[result] = self.declines.get(result, 0) + int(row["declines"])

    def merge(self, other: _Tally) -> None:
        for column in _FIGURE_COLUMNS:
            self.sums[column] += other.sums[column]
        for result, count in other.declines.items():
            self.declines[result] = self.declines.get(result, 0) + count

    def figures(self) -> dict[str, Any]:
        return {
            **self.sums,
            "revenue_cents": self.sums["fare_cents"] - self.sums["refund_cents"],
            "declines": {result_name(result): self.declines[result] for result in sorted(self.declines)},
        }


def result_name(code: int) -> str:
    """The result code's name, or ``RESULT_<n>`` for a number this version does not know.

    >>> result_name(25), result_name(99)
    ('INSUFFICIENT_FUNDS', 'RESULT_99')
    """
    try:
        return ResultCode(code).name
    except ValueError:
        return f"RESULT_{code}"


def day_bounds(day: datetime.date) -> tuple[datetime.datetime, datetime.datetime]:
    """The first instant of ``day`` in UTC and the first of the next day.

    >>> [moment.isoformat() for moment in day_bounds(datetime.date(2026, 3, 29))]
    ['2026-03-29T00:00:00+00:00', '2026-03-30T00:00:00+00:00']
    """
    starts_at = datetime.datetime.combine(day, datetime.time(), tzinfo=REPORT_TIME_ZONE)
    return starts_at, starts_at + datetime.timedelta(days=1)


async def daily_report(conn: asyncpg.Connection, day: datetime.date) -> DailyReport:
    """Uses, revenue, top-ups and declines of the taps recorded on ``day`` (UTC),
    per service and fare profile, per service, and in total.

    Example::

        report = await daily_report(conn, datetime.date(2026, 3, 2))
        [(line.service, line.profile, line.uses) for line in report.lines][:1]
        # [('bus', 'standard', 13120)]
    """
    starts_at, ends_at = day_bounds(day)
    rows = await conn.fetch(_DAILY_SQL, starts_at, ends_at, timeout=REPORT_TIMEOUT_S)
    products = await conn.fetch(_PRODUCTS_SQL, starts_at, ends_at, timeout=REPORT_TIMEOUT_S)
    offline = await conn.fetchrow(_OFFLINE_SQL, starts_at, ends_at, timeout=REPORT_TIMEOUT_S)
    differs = await conn.fetch(_OFFLINE_DIFFERS_SQL, starts_at, ends_at, timeout=REPORT_TIMEOUT_S)
    debt = await conn.fetchrow(_DEBT_SQL, timeout=REPORT_TIMEOUT_S)
    by_line: dict[tuple[int, int], tuple[str, str, _Tally]] = {}
    by_service: dict[int, tuple[str, _Tally]] = {}
    total = _Tally()
    for row in rows:
        service_id = int(row["service_id"])
        # Services are never deleted, but taps carry no foreign key: name a
        # missing one by its id rather than drop its money from the report.
        service = row["service"] if row["service"] is not None else f"service {service_id}"
        profile_id = -1 if row["profile_id"] is None else int(row["profile_id"])
        profile = row["profile"] if row["profile"] is not None else NO_PROFILE
        line = by_line.setdefault((service_id, profile_id), (service, profile, _Tally()))
        line[2].add(row)
    for (service_id, _), (service, _, tally) in sorted(by_line.items()):
        by_service.setdefault(service_id, (service, _Tally()))[1].merge(tally)
        total.merge(tally)
    return DailyReport(
        day=day,
        time_zone="UTC",
        starts_at=starts_at,
        ends_at=ends_at,
        lines=[
            ProfileLine(service=service, profile=profile, **tally.figures())
            for _, (service, profile, tally) in sorted(by_line.items())
        ],
        services=[
            ServiceLine(service=service, **tally.figures()) for _, (service, tally) in sorted(by_service.items())
        ],
        total=DailyFigures(**total.figures()),
        products=[
            ProductSales(
                product=row["product"],
                kind=ProductKind(row["kind"]).code,
                sold=int(row["sold"]),
                price_cents=int(row["price_cents"]),
                uses=int(row["uses"]),
            )
            for row in products
        ],
        offline=OfflineFigures(
            taps=int(offline["taps"]),
            approved=int(offline["approved"]),
            declined=int(offline["taps"]) - int(offline["approved"]),
            differs={result_name(int(row["online_result"])): int(row["taps"]) for row in differs},
            charged_cents=int(offline["charged_cents"]),
            uncollected_cents=int(offline["uncollected_cents"]),
            accounts_in_debt=int(debt["accounts"]),
            debt_cents=int(debt["cents"]),
        ),
    )


# --- reconciliation ------------------------------------------------------------------


class AccountDifference(msgspec.Struct, frozen=True):
    """An account whose balance is not the sum of its ledger entries.

    ``balance_cents`` is None when ledger entries name an account that does
    not exist.
    """

    account_id: int
    balance_cents: int | None
    ledger_cents: int
    difference_cents: int


class TransferDifference(msgspec.Struct, frozen=True):
    """A ledger transfer whose entries do not sum to zero."""

    transfer_id: int
    sum_cents: int


class BatchDifference(msgspec.Struct, frozen=True, kw_only=True):
    """Money a batch's tap records moved that its ledger entries did not.

    ``movement`` says what was compared: ``revenue`` or ``funding`` (the
    revenue or funding accounts of the transfer ``ledger_kind``/``service_id``)
    or ``card`` (card account ``account_id``, all of the batch's transfers).
    """

    batch_id: int
    movement: str
    ledger_kind: str | None
    service_id: int | None
    account_id: int | None
    taps_cents: int
    ledger_cents: int
    difference_cents: int


class TicketDifference(msgspec.Struct, frozen=True):
    """A multi-ride ticket whose rides used do not match the taps it paid."""

    product_id: int
    rides: int
    rides_used: int
    rides_recorded: int


class ReconcileResult(msgspec.Struct, frozen=True, kw_only=True):
    """Each check's first differences (``RECONCILE_DIFFERENCES_MAX``) and their count."""

    accounts_checked: int
    transfers_checked: int
    batches_checked: int
    account_differences: list[AccountDifference]
    account_differences_total: int
    transfer_differences: list[TransferDifference]
    transfer_differences_total: int
    batch_differences: list[BatchDifference]
    batch_differences_total: int
    tickets_checked: int = 0
    ticket_differences: list[TicketDifference] = msgspec.field(default_factory=list)
    ticket_differences_total: int = 0

    @property
    def differences_total(self) -> int:
        return (
            self.account_differences_total
            + self.transfer_differences_total
            + self.batch_differences_total
            + self.ticket_differences_total
        )

    @property
    def ok(self) -> bool:
        return self.differences_total == 0


# One pass over the ledger grouped by account, joined in full to the accounts:
# an account with no entries must hold zero, and entries naming no account
# are a difference too.
_ACCOUNTS_SQL = """
WITH ledger AS (
    SELECT account_id, sum(amount_cents)::int8 AS cents FROM ledger_entries GROUP BY account_id
)
SELECT coalesce(a.id, l.account_id) AS account_id,
       a.balance_cents,
       coalesce(l.cents, 0)::int8 AS ledger_cents,
       count(*) OVER () AS total
FROM accounts a
FULL JOIN ledger l ON l.account_id = a.id
WHERE a.balance_cents IS DISTINCT FROM coalesce(l.cents, 0)
ORDER BY 1
LIMIT $1
"""

_TRANSFERS_SQL = """
SELECT transfer_id, sum(amount_cents)::int8 AS sum_cents, count(*) OVER () AS total
FROM ledger_entries
GROUP BY transfer_id
HAVING sum(amount_cents) <> 0
ORDER BY transfer_id
LIMIT $1
"""

# Approved money-moving tap records with their original's kind (reversals:
# a primary-key look-up each, rather than hashing the whole record to serve
# the few that need it), read once and compared twice: per transfer key (revenue and funding sides)
# and per (batch, card account). Opening balances and adjustments have no
# batch and no tap record, and are left to the first two checks.
_BATCHES_SQL = """
WITH moved AS MATERIALIZED (
    SELECT t.batch_id, t.kind, t.service_id, t.account_id, t.amount_cents,
           (t.info & 128) <> 0 AS refunded,
           CASE WHEN t.kind = 2 THEN (
               SELECT o.kind FROM taps o
               WHERE o.terminal_id = coalesce(t.original_terminal_id, t.terminal_id) AND o.terminal_seq = t.original_seq
           ) END AS original_kind
    FROM taps t
    WHERE t.result = 0 AND t.amount_cents <> 0
),
booked AS MATERIALIZED (
    SELECT x.batch_id, x.kind, x.service_id, e.account_id, a.kind AS account_kind, e.amount_cents
    FROM ledger_transfers x
    JOIN ledger_entries e ON e.transfer_id = x.id
    LEFT JOIN accounts a ON a.id = e.account_id
    WHERE x.batch_id IS NOT NULL
),
-- Each comparison adds both sides up in one aggregate (tap records and
-- ledger entries side by side), which is cheaper than aggregating each side
-- and joining the two: per (batch, card) there are about as many groups as
-- money-moving taps.
by_transfer AS (
    SELECT batch_id, kind, service_id,
           sum(taps_revenue)::int8 AS taps_revenue, sum(ledger_revenue)::int8 AS ledger_revenue,
           sum(taps_funding)::int8 AS taps_funding, sum(ledger_funding)::int8 AS ledger_funding
    FROM (
        SELECT batch_id, kind, service_id,
               CASE WHEN kind = 0 AND refunded THEN -amount_cents
                    WHEN kind = 0 THEN amount_cents
                    WHEN original_kind = 0 THEN -amount_cents
                    ELSE 0 END AS taps_revenue,
               0 AS ledger_revenue,
               CASE WHEN kind = 1 THEN -amount_cents WHEN original_kind = 1 THEN amount_cents ELSE 0 END
                   AS taps_funding,
               0 AS ledger_funding
        FROM moved
        UNION ALL
        SELECT batch_id, kind, service_id,
               0, CASE WHEN account_kind = 1 THEN amount_cents ELSE 0 END,
               0, CASE WHEN account_kind = 2 THEN amount_cents ELSE 0 END
        FROM booked
    ) sides
    GROUP BY batch_id, kind, service_id
),
by_card AS (
    SELECT batch_id, account_id, sum(taps_cents)::int8 AS taps_cents, sum(ledger_cents)::int8 AS ledger_cents
    FROM (
        SELECT batch_id, account_id,
               CASE WHEN kind = 0 AND refunded THEN amount_cents
                    WHEN kind = 0 THEN -amount_cents
                    WHEN kind = 1 THEN amount_cents
                    WHEN original_kind = 0 THEN amount_cents
                    WHEN original_kind = 1 THEN -amount_cents
                    ELSE 0 END AS taps_cents,
               0 AS ledger_cents
        FROM moved
        UNION ALL
        SELECT batch_id, account_id, 0, amount_cents FROM booked WHERE account_kind = 0
    ) sides
    GROUP BY batch_id, account_id
    HAVING sum(taps_cents) <> sum(ledger_cents)
),
differences AS (
    SELECT t.batch_id, side.movement, t.kind AS ledger_kind, t.service_id, NULL::int8 AS account_id,
           side.taps_cents, side.ledger_cents
    FROM by_transfer t
    CROSS JOIN LATERAL (VALUES
        ('revenue', t.taps_revenue, t.ledger_revenue),
        ('funding', t.taps_funding, t.ledger_funding)
    ) AS side (movement, taps_cents, ledger_cents)
    WHERE side.taps_cents <> side.ledger_cents
    UNION ALL
    SELECT batch_id, 'card', NULL, NULL, account_id, taps_cents, ledger_cents FROM by_card
)
SELECT *, count(*) OVER () AS total
FROM differences
ORDER BY batch_id, movement, ledger_kind, service_id, account_id
LIMIT $1
"""

# Rides recorded per ticket: approved taps it paid, minus approved reversals
# that name it (a reversal of a ticket ride carries the ticket's id).
_TICKETS_SQL = """
WITH recorded AS (
    SELECT product_id, sum(CASE WHEN kind = 0 THEN 1 ELSE -1 END)::int8 AS rides
    FROM taps WHERE product_id IS NOT NULL AND result = 0 AND kind IN (0, 2)
    GROUP BY product_id
)
SELECT p.id, p.rides, p.rides_used, coalesce(r.rides, 0)::int8 AS rides_recorded, count(*) OVER () AS total
FROM card_products p
LEFT JOIN recorded r ON r.product_id = p.id
WHERE p.kind = 1 AND (p.rides_used <> coalesce(r.rides, 0) OR p.rides_used > p.rides)
ORDER BY p.id
LIMIT $1
"""

_COUNTS_SQL = """
SELECT (SELECT count(*) FROM accounts) AS accounts,
       (SELECT count(*) FROM ledger_transfers) AS transfers,
       (SELECT count(*) FROM batches) AS batches,
       (SELECT count(*) FROM card_products WHERE kind = 1) AS tickets
"""


async def reconcile(conn: asyncpg.Connection) -> ReconcileResult:
    """Check the books (see the module's docstring) on one snapshot of the database.

    Example::

        result = await reconcile(conn)
        result.ok, result.accounts_checked  # (True, 340021)
    """
    limit = RECONCILE_DIFFERENCES_MAX
    # One snapshot for every check: batches committing meanwhile are either
    # wholly seen (taps, entries and balances) or not at all.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # SET LOCAL: the setting ends with the transaction, the caller's session keeps its own.
        await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
        counts = await conn.fetchrow(_COUNTS_SQL, timeout=RECONCILE_TIMEOUT_S)
        accounts = await conn.fetch(_ACCOUNTS_SQL, limit, timeout=RECONCILE_TIMEOUT_S)
        transfers = await conn.fetch(_TRANSFERS_SQL, limit, timeout=RECONCILE_TIMEOUT_S)
        batches = await conn.fetch(_BATCHES_SQL, limit, timeout=RECONCILE_TIMEOUT_S)
        tickets = await conn.fetch(_TICKETS_SQL, limit, timeout=RECONCILE_TIMEOUT_S)
    return ReconcileResult(
        accounts_checked=int(counts["accounts"]),
        transfers_checked=int(counts["transfers"]),
        batches_checked=int(counts["batches"]),
        account_differences=[
            AccountDifference(
                account_id=int(row["account_id"]),
                balance_cents=row["balance_cents"],
                ledger_cents=int(row["ledger_cents"]),
                difference_cents=(row["balance_cents"] or 0) - int(row["ledger_cents"]),
            )
            for row in accounts
        ],
        account_differences_total=_total(accounts),
        transfer_differences=[TransferDifference(int(row["transfer_id"]), int(row["sum_cents"])) for row in transfers],
        transfer_differences_total=_total(transfers),
        batch_differences=[
            BatchDifference(
                batch_id=int(row["batch_id"]),
                movement=row["movement"],
                ledger_kind=None
                if row["ledger_kind"] is None
                else LEDGER_KIND_NAMES.get(row["ledger_kind"], f"kind {row['ledger_kind']}"),
                service_id=row["service_id"],
                account_id=row["account_id"],
                taps_cents=int(row["taps_cents"]),
                ledger_cents=int(row["ledger_cents"]),
                difference_cents=int(row["taps_cents"]) - int(row["ledger_cents"]),
            )
            for row in batches
        ],
        batch_differences_total=_total(batches),
        tickets_checked=int(counts["tickets"]),
        ticket_differences=[
            TicketDifference(int(row["id"]), int(row["rides"]), int(row["rides_used"]), int(row["rides_recorded"]))
            for row in tickets
        ],
        ticket_differences_total=_total(tickets),
    )


def _total(rows: list[asyncpg.Record]) -> int:
    """How many differences in all (every row carries the count before LIMIT)."""
    return int(rows[0]["total"]) if rows else 0
