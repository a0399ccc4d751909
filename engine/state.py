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

import time
from array import array
from dataclasses import dataclass

import asyncpg

from engine.codes import TerminalKind

# A fare of -1 in the tariff table means "this profile is not served here".
NO_FARE = -1

# Rows fetched per round trip while loading the city: large enough that the
# round trips do not matter (500 for 10 million cards), small enough that a
# batch of records is a few megabytes.
LOAD_PREFETCH_ROWS = 20_000

# Profiles are small integers (schema: 0 <= id < 64), so a service's fares are
# a 64-slot row indexed by profile.
PROFILES_MAX = 64


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

    @property
    def is_kiosk(self) -> bool:
        return self.kind == TerminalKind.KIOSK


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

    def add_card(self, uid: int, status: int, profile: int, account_id: int) -> int:
        position = len(self.card_uid)
        self.card_position[uid] = position
        self.card_uid.append(uid)
        self.card_status.append(status)
        self.card_profile.append(profile)
        self.card_account.append(self.account_position[account_id])
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
        cards = conn.cursor(
            "SELECT c.uid, c.status, h.profile_id, c.account_id FROM cards c JOIN holders h ON h.id = c.holder_id",
            prefetch=LOAD_PREFETCH_ROWS,
        )
        async for row in cards:
            state.add_card(row[0], row[1], row[2], row[3])
        for service_id, revenue_account_id in await conn.fetch("SELECT id, revenue_account_id FROM services"):
            state.revenue_account[service_id] = state.account_position[revenue_account_id]
            state.fares.setdefault(service_id, array("q", [NO_FARE] * PROFILES_MAX))
        for service_id, profile_id, fare in await conn.fetch("SELECT service_id, profile_id, fare_cents FROM tariffs"):
            state.set_fare(service_id, profile_id, fare)
        terminals = await conn.fetch(
            "SELECT t.id, t.service_id, t.kind, t.key_version, t.status, t.funding_account_id,"
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
            )
    state.check_invariants()
    return state


def now_ms() -> int:
    """Engine wall clock in Unix milliseconds (record time)."""
    return time.time_ns() // 1_000_000

