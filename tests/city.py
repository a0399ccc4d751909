"""A tiny hand-made city for engine tests, with fares and balances chosen so
that every expected figure can be written down in the test.

Services: BUS (standard 150, student 75), LIBRARY (identification: standard
0; students not served there, for SERVICE_NOT_ALLOWED), KIOSK (standard 0).
Terminals: BUS_VALIDATOR, LIBRARY_GATE, KIOSK, INACTIVE_VALIDATOR (bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from engine.client import TerminalClient
from engine.codes import CardStatus, TerminalKind
from engine.keys import derive_terminal_key, load_master_key
from engine.rules import parse_rules, store_rules
from engine.server import Engine, EngineConfig

STANDARD = 0
STUDENT = 1
# A concession valid on any day a test runs.
ALWAYS_ELIGIBLE = (datetime.date(2000, 1, 1), datetime.date(2099, 12, 31))

BUS = 1
LIBRARY = 2
KIOSK_SERVICE = 3

BUS_VALIDATOR = 1
LIBRARY_GATE = 2
KIOSK = 3
INACTIVE_VALIDATOR = 4

BUS_FARE = 150
BUS_FARE_STUDENT = 75

FUNDING_ACCOUNT = 1
CARD_CEILING = 100_000

_next_id = 1_000


@dataclass(frozen=True)
class Card:
    uid: int
    account_id: int
    profile: int
    balance: int


async def create_city(conn: asyncpg.Connection) -> None:
    """Profiles, services, tariffs, terminals and the funding account."""
    await conn.execute(
        """
        INSERT INTO profiles (id, code, name) VALUES (0, 'standard', 'Standard'), (1, 'student', 'Student');
        INSERT INTO accounts (id, kind, name, floor_cents) VALUES (1, 2, 'funding', -4611686018427387904);
        INSERT INTO accounts (id, kind, name) VALUES (11, 1, 'bus revenue'), (12, 1, 'library revenue'),
                                                     (13, 1, 'kiosk revenue');
        INSERT INTO services (id, code, name, revenue_account_id) VALUES
            (1, 'bus', 'City bus', 11), (2, 'library', 'Libraries', 12), (3, 'kiosk', 'Kiosks', 13);
        INSERT INTO tariffs (service_id, profile_id, fare_cents) VALUES
            (1, 0, 150), (1, 1, 75), (2, 0, 0), (3, 0, 0), (3, 1, 0);
        INSERT INTO terminals (id, service_id, kind, name, status, funding_account_id) VALUES
            (1, 1, 0, 'bus validator', 0, NULL),
            (2, 2, 0, 'library gate', 0, NULL),
            (3, 3, 1, 'kiosk', 0, 1),
            (4, 1, 0, 'retired validator', 1, NULL);
        """
    )


async def add_card(
    conn: asyncpg.Connection,
    *,
    balance: int,
    profile: int = STANDARD,
    status: int = CardStatus.ACTIVE,
    floor: int = 0,
    eligible: tuple[datetime.date, datetime.date] | None = ALWAYS_ELIGIBLE,
) -> Card:
    """A holder with one card and an opening balance booked in the ledger.

    A concession holder (``profile`` other than STANDARD) gets an eligibility
    row for the period ``eligible`` (None: no row, the concession is not valid).
    """
    global _next_id
    _next_id += 1
    number = _next_id
    uid = 0x04_0000_0000_0000 + number
    async with conn.transaction():
        await conn.execute("INSERT INTO holders (id, profile_id) VALUES ($1, $2)", number, profile)
        await conn.execute(
            "INSERT INTO accounts (id, kind, name, balance_cents, floor_cents, ceiling_cents)"
            " VALUES ($1, 0, 'card', $2, $3, $4)",
            number,
            balance,
            floor,
            CARD_CEILING,
        )
        await conn.execute(
            "INSERT INTO cards (uid, holder_id, account_id, status) VALUES ($1, $2, $2, $3)", uid, number, status
        )
        if profile != STANDARD and eligible is not None:
            await conn.execute(
                "INSERT INTO eligibility (holder_id, profile_id, source, valid_from, valid_until)"
                " VALUES ($1, $2, 'office', $3, $4)",
                number,
                profile,
                *eligible,
            )
        if balance:
            transfer = -number  # opening transfers use negative ids, apart from the engine's
            await conn.execute("INSERT INTO ledger_transfers (id, kind) VALUES ($1, 3)", transfer)
            await conn.execute(
                "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES ($1, $2, $3), ($1, $4, $5)",
                transfer,
                number,
                balance,
                FUNDING_ACCOUNT,
                -balance,
            )
            await conn.execute("UPDATE accounts SET balance_cents = balance_cents - $1 WHERE id = 1", balance)
    return Card(uid=uid, account_id=number, profile=profile, balance=balance)


async def balance_of(conn: asyncpg.Connection, account_id: int) -> int:
    return int(await conn.fetchval("SELECT balance_cents FROM accounts WHERE id = $1", account_id))


async def check_books(conn: asyncpg.Connection) -> None:
    """The ledger invariants every test ends with."""
    assert await conn.fetchval("SELECT coalesce(sum(amount_cents), 0) FROM ledger_entries") == 0
    unbalanced = await conn.fetchval(
        "SELECT count(*) FROM (SELECT transfer_id FROM ledger_entries GROUP BY transfer_id"
        " HAVING sum(amount_cents) <> 0) t"
    )
    assert unbalanced == 0
    off_ledger = await conn.fetch(
        "SELECT a.id, a.balance_cents, coalesce(sum(e.amount_cents), 0) AS ledger FROM accounts a"
        " LEFT JOIN ledger_entries e ON e.account_id = a.id GROUP BY a.id HAVING a.balance_cents"
        " <> coalesce(sum(e.amount_cents), 0)"
    )
    assert off_ledger == []
    # Below the floor only a card account, only by offline taps, within its debt limit.
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM accounts WHERE balance_cents"
            " < floor_cents - CASE WHEN kind = 0 THEN debt_limit_cents ELSE 0 END"
        )
        == 0
    )
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM accounts a WHERE balance_cents < floor_cents AND NOT EXISTS"
            " (SELECT 1 FROM taps t WHERE t.account_id = a.id AND (t.info & 256) <> 0)"
        )
        == 0
    )
    assert await conn.fetchval("SELECT coalesce(sum(balance_cents), 0) FROM accounts") == 0


def terminal_key(data_dir: Path, terminal_id: int, key_version: int = 1) -> bytes:
    return derive_terminal_key(load_master_key(data_dir), terminal_id, key_version)


class EngineUnderTest:
    """An engine on a test database, with clients for its terminals."""

    def __init__(self, dsn: str, data_dir: Path, **options: object) -> None:
        self.dsn = dsn
        self.data_dir = data_dir
        self.options = options
        self.engine: Engine | None = None
        self.clients: list[TerminalClient] = []

    async def start(self) -> Engine:
        config = EngineConfig(dsn=self.dsn, data_dir=str(self.data_dir), listen_port=0, **self.options)  # type: ignore[arg-type]
        self.engine = Engine(config)
        await self.engine.start()
        return self.engine

    @property
    def port(self) -> int:
        assert self.engine is not None
        return self.engine.port

    @property
    def admin_port(self) -> int:
        """The card-office interface's port, for an engine started with ``admin_port=0``."""
        assert self.engine is not None and self.engine.admin_port is not None, "start the engine with admin_port=0"
        return self.engine.admin_port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def client(self, terminal_id: int = BUS_VALIDATOR, key_version: int = 1) -> TerminalClient:
        client = await TerminalClient.connect(
            "127.0.0.1",
            self.port,
            terminal_id=terminal_id,
            key=terminal_key(self.data_dir, terminal_id, key_version),
            key_version=key_version,
        )
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None

    async def restart(self) -> Engine:
        await self.stop()
        return await self.start()


@contextlib.asynccontextmanager
async def running_engine(dsn: str, data_dir: Path, **options: object) -> AsyncIterator[EngineUnderTest]:
    under_test = EngineUnderTest(dsn, data_dir, **options)
    await under_test.start()
    try:
        yield under_test
    finally:
        await under_test.stop()


async def wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    """Poll a condition (for effects that happen on the engine's loop)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# The services of create_city, as a rules file writes them: each table may be
# replaced (e.g. a library paid by the hour) and more appended.
BUS_RULES = f"""
[[services]]
code = "bus"
kind = "per_use"
fares = {{ standard = {BUS_FARE}, student = {BUS_FARE_STUDENT} }}
"""
LIBRARY_RULES = """
[[services]]
code = "library"
kind = "identification"
fares = { standard = 0 }
"""
KIOSK_RULES = """
[[services]]
code = "kiosk"
kind = "identification"
fares = { standard = 0, student = 0 }
"""


def city_rules(
    version: int, *, bus: str = BUS_RULES, library: str = LIBRARY_RULES, extra: str = "", name: str = "test city"
) -> str:
    """A rules file for create_city's city: its three services, then ``extra``."""
    return f'[rules]\nversion = {version}\nname = "{name}"\n{bus}{library}{KIOSK_RULES}{extra}'


async def load_city_rules(conn: asyncpg.Connection, **parts: str) -> int:
    """Store city_rules(...) as the next version (as `citycard rules load` does); return it."""
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) + 1 FROM rules_versions")
    await store_rules(conn, parse_rules(city_rules(version, **parts)), actor="test", source_name="test")
    return version


__all__ = ["TerminalKind"]
