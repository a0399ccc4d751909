"""A synthetic Gijón: profiles, services, rules, terminals, holders and cards.

Tests, benchmarks and load tests need a city shaped like the real one: about
20 services with the bus taking three quarters of the traffic, concession
profiles in realistic proportions, a few hundred terminals, and (for the
benchmarks) 340,000 cards. ``seed_city`` builds one, deterministically from a
seed, in a single transaction, with bulk COPY so the full city takes seconds.

Everything here is synthetic. Service names follow Gijón's municipal services.
Fares, service kinds and policies come from the city's rules file
(``rules/gijon.toml``, illustrative figures in the range of the city's public
price lists), stored as rules version 1 by the same code as
``citycard rules load``, so ``tariffs`` and ``services.kind`` are whatever
that file says. Every concession holder gets an eligibility period around
REFERENCE_DATE.

Ids, chosen so that the engine's own ids never collide with them:

- account 1 is the funding account ("cash and opening balances", kind 2);
- account 100 + service id is that service's revenue account (kind 1);
- account 1,000,000 + holder id is that holder's card account (kind 0);
- holders are numbered 1..N, terminals 1..T;
- the opening balances are ledger transfer 1, with no batch (the writer
  numbers its transfers from batch ids, above every existing transfer).

Example::

    summary = await seed_city(conn, cards=200)
    summary.cards  # 200
    terminals = await list_terminals(conn)
    cards = await sample_cards(conn, 10)
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from engine.codes import CardStatus, ProductKind, TerminalKind
from engine.limits import BALANCE_MAX_CENTS, DB_COMMAND_TIMEOUT_S
from engine.rules import Rules, read_rules_file, write_rules

DEFAULT_SEED = 2026

# Gijón has ~340,000 holders; tests use a few hundred; the capacity benchmark
# loads 10,000,000 (a region). The upper bound keeps a typo from trying to
# build a city of a billion cards.
CARDS_MAX = 20_000_000

FUNDING_ACCOUNT_ID = 1
FUNDING_ACCOUNT_NAME = "cash and opening balances"
# Funding goes negative by design (money entering the system); -(2**62) is
# far below any sum the engine could reach and still far from bigint overflow.
FUNDING_FLOOR_CENTS = -(2**62)
REVENUE_ACCOUNT_BASE = 100
CARD_ACCOUNT_BASE = 1_000_000
OPENING_TRANSFER_ID = 1
OPENING_TRANSFER_KIND = 3  # ledger_transfers.kind: opening balance / adjustment

# Card accounts may not go below zero: the city tolerates no debt on seeded
# cards (the schema would allow down to -1,000 EUR).
CARD_FLOOR_CENTS = 0

# Opening balances: a quarter of cards hold nothing (identification-only and
# concession cards topped up when needed); the rest hold a skewed amount with
# a mean around 15 EUR, capped at 50 EUR (most top-ups are 5-20 EUR).
OPENING_ZERO_SHARE = 0.25
OPENING_MEAN_CENTS = 1500
OPENING_MAX_CENTS = 5000

# About 12,000 replacements a year on ~340,000 cards leaves ~1% of cards
# blocked or lost at any time; lost ones a little rarer than blocked.
NOT_ACTIVE_SHARE = 0.01
LOST_SHARE_OF_NOT_ACTIVE = 0.4

# ISO 14443 7-byte UIDs start with the manufacturer code; 0x04 is NXP, maker
# of the MIFARE DESFire cards city cards typically use. The other six bytes
# are random, so a uid is a positive integer below 2**56.
UID_MANUFACTURER_BYTE = 0x04

# Ages are computed from a fixed date, not today, so a seed gives the same
# city whenever it runs.
REFERENCE_DATE = datetime.date(2026, 1, 1)

# The demo city's rules: fares, service kinds, transfers, caps, products.
# Found from the repository root, like schema/ (engine/migrate.py).
RULES_FILE = Path(__file__).resolve().parent.parent / "rules" / "gijon.toml"
RULES_SOURCE_NAME = "rules/gijon.toml"
RULES_ACTOR = "seed"

# Where each concession comes from (eligibility.source): the municipal
# record that proves it. A concession profile missing here is granted by the
# card office.
ELIGIBILITY_SOURCES: dict[str, str] = {
    "student": "enrolment",
    "young": "age",
    "pensioner": "pension",
    "unemployed": "unemployment",
    "large_family": "large_family",
    "disability": "disability",
    "child": "age",
}
ELIGIBILITY_SOURCE_OTHERWISE = "office"

# Eligibility periods, spread deterministically around REFERENCE_DATE. Each
# began up to three years before it. RENEWAL_DUE_SHARE of them end within the
# rules' renewal window after it, so the renewal warning shows on a few
# concession taps; the rest end one to four years after it, so the city's
# concessions stay valid for a year of demos after REFERENCE_DATE.
RENEWAL_DUE_SHARE = 0.03
ELIGIBILITY_STARTED_DAYS_MAX = 3 * 365
ELIGIBILITY_REMAINING_DAYS_MIN = 366
ELIGIBILITY_REMAINING_DAYS_MAX = 4 * 365

# Eligibility is drawn from its own generator: the other draws of a seed
# (uids, balances, statuses) do not depend on the eligibility policy.
_ELIGIBILITY_SEED_SALT = "eligibility"

# Share of the active holders entitled to a product who hold one, per
# product of the rules (a monthly bus pass, a ten-swim ticket): a few in a
# hundred, so that load runs meet passes and tickets as a city's taps do.
# Season passes are current (started up to a period ago, counted from the
# day the city is seeded); tickets are unused, as their rides are counted
# from the taps that use them.
PRODUCT_HOLDER_SHARE = 0.04
_PRODUCTS_SEED_SALT = "products"
PRODUCTS_SOLD_BY = "seed"


@dataclass(frozen=True, slots=True)
class Profile:
    """A holder profile: a tariff column. ``share`` is the fraction of holders."""

    id: int
    code: str
    name: str
    share: float
    age_min: int
    age_max: int


# The mix of holders by profile. Assumptions, not official card statistics:
# Gijón has ~270,000 inhabitants, about a quarter over 65 (Asturias is Spain's
# oldest region), so pensioners are the largest concession group; students
# and young people (carné joven, 14-30) follow; registered unemployment is
# around 6% of residents, but only some claim the concession; large families
# and disability concessions are small groups; most children under 12 ride
# free without a card, so few hold one. Shares sum to 1.
PROFILES: tuple[Profile, ...] = (
    Profile(0, "standard", "General", 0.55, 18, 64),
    Profile(1, "student", "Estudiante", 0.12, 12, 25),
    Profile(2, "young", "Joven (carné joven)", 0.08, 14, 30),
    Profile(3, "pensioner", "Pensionista / mayor de 65", 0.17, 65, 95),
    Profile(4, "unemployed", "Persona desempleada", 0.03, 18, 64),
    Profile(5, "large_family", "Familia numerosa", 0.02, 4, 60),
    Profile(6, "disability", "Persona con discapacidad", 0.01, 6, 90),
    Profile(7, "child", "Infantil", 0.02, 4, 11),
)


@dataclass(frozen=True, slots=True)
class Service:
    """A municipal service: its terminals and its share of traffic. Its fares
    and kind are in the rules file (RULES_FILE), under the same code."""

    id: int
    code: str
    name: str
    terminals: int
    terminal_kind: TerminalKind
    traffic_permille: int  # share of all taps, for load generators


# About 20 services modelled on Gijón's card services. The bus (EMTUSA) takes
# ~3/4 of uses; libraries, pools and sports centres most of the rest.
# Terminal counts: a few hundred bus validators, and gates or validators per
# site elsewhere.
_VALIDATOR = TerminalKind.VALIDATOR
_KIOSK = TerminalKind.KIOSK

SERVICES: tuple[Service, ...] = (
    # id, code, name, terminals, terminal kind, traffic permille
    Service(0, "bus", "Autobús urbano (EMTUSA)", 240, _VALIDATOR, 750),
    Service(1, "library_access", "Bibliotecas municipales: acceso", 24, _VALIDATOR, 50),
    Service(2, "library_loans", "Bibliotecas municipales: préstamo", 12, _VALIDATOR, 20),
    Service(3, "pools", "Piscinas municipales", 14, _VALIDATOR, 40),
    Service(4, "sports_centres", "Polideportivos municipales", 20, _VALIDATOR, 40),
    Service(5, "sports_courts", "Pistas deportivas (reserva)", 8, _VALIDATOR, 5),
    Service(6, "parking", "Aparcamientos municipales", 16, _VALIDATOR, 20),
    Service(7, "street_parking", "Estacionamiento regulado (ORA)", 30, _VALIDATOR, 10),
    Service(8, "bikes", "Gijón-Bici (bicicleta pública)", 30, _VALIDATOR, 20),
    Service(9, "museums", "Museos municipales", 8, _VALIDATOR, 5),
    Service(10, "botanic_garden", "Jardín Botánico Atlántico", 2, _VALIDATOR, 3),
    Service(11, "civic_centres", "Centros municipales integrados", 14, _VALIDATOR, 10),
    Service(12, "courses", "Universidad Popular (cursos)", 4, _VALIDATOR, 3),
    Service(13, "play_rooms", "Ludotecas", 6, _VALIDATOR, 2),
    Service(14, "senior_centres", "Centros sociales de personas mayores", 8, _VALIDATOR, 4),
    Service(15, "recycling_points", "Puntos limpios (EMULSA)", 6, _VALIDATOR, 3),
    Service(16, "telecentres", "Telecentros (acceso a internet)", 10, _VALIDATOR, 2),
    Service(17, "register_office", "Registro y padrón (identificación)", 4, _VALIDATOR, 2),
    # Kiosks and ATMs take top-ups: their money comes in through the funding account.
    Service(18, "kiosks", "Puntos de atención ciudadana (quioscos)", 24, _KIOSK, 7),
    Service(19, "atms", "Cajeros ciudadanos", 12, _KIOSK, 4),
)  # fmt: skip


class AlreadySeeded(Exception):
    """The database already holds a city; seeding twice would mix two."""


@dataclass(frozen=True, slots=True)
class SeedSummary:
    """What ``seed_city`` wrote. Equal for equal seeds and card counts."""

    seed: int
    profiles: int
    services: int
    tariffs: int
    terminals: int
    kiosks: int
    holders: int
    cards: int
    cards_not_active: int
    cards_by_profile: tuple[int, ...]  # indexed by profile id
    opening_balance_cents: int  # total credited to cards, debited to funding
    eligibility: int  # concession holders, each with one eligibility period
    renewal_due: int  # of those, periods ending within the renewal window
    rules_version: int
    products: int = 0  # passes and tickets held (card_products)


@dataclass(frozen=True, slots=True)
class TerminalInfo:
    """A terminal as load generators and tests need it."""

    id: int
    service_id: int
    service_code: str
    kind: int
    status: int
    key_version: int
    funding_account_id: int | None
    name: str


@dataclass(frozen=True, slots=True)
class CardSample:
    """A card with what a test needs to predict the engine's answer."""

    uid: int
    holder_id: int
    account_id: int
    profile_id: int
    status: int
    balance_cents: int


async def seed_city(
    conn: asyncpg.Connection, cards: int, *, seed: int = DEFAULT_SEED, rules: Rules | None = None
) -> SeedSummary:
    """Write a synthetic city with ``cards`` holders (one card each) into an
    empty, migrated database, in one transaction. ``rules`` (default: read
    from RULES_FILE) must cover exactly the services of SERVICES.

    Example::

        summary = await seed_city(conn, 340_000)  # a few seconds
        summary.cards_by_profile[3]  # ~57,800 pensioners
    """
    if not 0 <= cards <= CARDS_MAX:
        raise ValueError(f"cards must be between 0 and {CARDS_MAX}, got {cards}")
    if rules is None:
        rules = read_rules_file(RULES_FILE)
    city = _generate(cards, seed, rules)
    async with conn.transaction():
        # A second seeder waits here, then finds the first one's cards.
        await conn.execute("LOCK TABLE cards, services IN SHARE ROW EXCLUSIVE MODE")
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM cards) OR EXISTS (SELECT 1 FROM services)"):
            raise AlreadySeeded("the database already has services or cards; seed a fresh database")
        await _write(conn, city, rules)
    # Fresh statistics, so the first queries on 340,000 cards are planned well.
    await conn.execute("ANALYZE holders, accounts, cards, ledger_entries, eligibility")
    return city.summary


async def list_terminals(conn: asyncpg.Connection) -> list[TerminalInfo]:
    """Every terminal, by id, with its service code."""
    rows = await conn.fetch(
        "SELECT t.id, t.service_id, s.code, t.kind, t.status, t.key_version, t.funding_account_id, t.name"
        " FROM terminals t JOIN services s ON s.id = t.service_id ORDER BY t.id"
    )
    return [TerminalInfo(*row) for row in rows]


async def sample_cards(
    conn: asyncpg.Connection, n: int, *, seed: int = 0, active_only: bool = True
) -> list[CardSample]:
    """``n`` cards (fewer if the city is smaller), the same ones for the same
    seed, ordered by a hash of uid and seed rather than by uid."""
    rows = await conn.fetch(
        "SELECT c.uid, c.holder_id, c.account_id, h.profile_id, c.status, a.balance_cents"
        " FROM cards c JOIN holders h ON h.id = c.holder_id JOIN accounts a ON a.id = c.account_id"
        " WHERE NOT $3 OR c.status = 0"
        " ORDER BY md5(c.uid::text || ':' || $2::bigint::text), c.uid LIMIT $1",
        n,
        seed,
        active_only,
    )
    return [CardSample(*row) for row in rows]


def traffic_weights() -> dict[int, int]:
    """Service id -> share of taps in permille (sums to 1000)."""
    return {service.id: service.traffic_permille for service in SERVICES}


# --- generation ---------------------------------------------------------------------


# A card_products row as seed_city copies it (columns in _write).
_ProductRow = tuple[int, str, int, str, int, datetime.date | None, datetime.date | None, int | None, int, str, int]


@dataclass(frozen=True, slots=True)
class _City:
    holders: list[tuple[int, int, datetime.date]]
    accounts: list[tuple[int, int, str, int, int, int]]
    cards: list[tuple[int, int, int, int]]
    entries: list[tuple[int, int, int]]
    terminals: list[tuple[int, int, int, str, int | None, float | None, float | None]]
    eligibility: list[tuple[int, int, str, datetime.date, datetime.date]]
    summary: SeedSummary
    products: list[_ProductRow]


def _generate(cards: int, seed: int, rules: Rules) -> _City:
    rng = random.Random(seed)
    profile_of = _profile_column(cards, rng)

    holders: list[tuple[int, int, datetime.date]] = []
    accounts: list[tuple[int, int, str, int, int, int]] = []
    card_rows: list[tuple[int, int, int, int]] = []
    entries: list[tuple[int, int, int]] = []
    uids: set[int] = set()
    reference_day = REFERENCE_DATE.toordinal()
    uid_prefix = UID_MANUFACTURER_BYTE << 48
    ages = [(profile.age_min * 365, profile.age_max * 365 + 364) for profile in PROFILES]
    by_profile = [0] * len(PROFILES)
    not_active = 0
    total = 0
    for index in range(cards):
        holder_id = index + 1
        account_id = CARD_ACCOUNT_BASE + holder_id
        profile_id = profile_of[index]
        by_profile[profile_id] += 1
        low, high = ages[profile_id]
        birth = datetime.date.fromordinal(reference_day - rng.randint(low, high))
        holders.append((holder_id, profile_id, birth))

        uid = uid_prefix | rng.getrandbits(48)
        while uid in uids:  # ~1 collision in 5,000 cities of 340,000 cards
            uid = uid_prefix | rng.getrandbits(48)
        uids.add(uid)

        status = CardStatus.ACTIVE
        if rng.random() < NOT_ACTIVE_SHARE:
            status = CardStatus.LOST if rng.random() < LOST_SHARE_OF_NOT_ACTIVE else CardStatus.BLOCKED
            not_active += 1
        card_rows.append((uid, holder_id, account_id, int(status)))

        balance = 0
        if rng.random() >= OPENING_ZERO_SHARE:
            balance = min(OPENING_MAX_CENTS, 1 + int(rng.expovariate(1 / OPENING_MEAN_CENTS)))
        accounts.append((account_id, 0, f"card {holder_id}", balance, CARD_FLOOR_CENTS, BALANCE_MAX_CENTS))
        if balance:
            entries.append((OPENING_TRANSFER_ID, account_id, balance))
            total += balance
    if total:
        entries.append((OPENING_TRANSFER_ID, FUNDING_ACCOUNT_ID, -total))

    eligibility = _eligibility(holders, seed, rules)
    products = _products(holders, card_rows, seed, rules)
    renewal_window_end = REFERENCE_DATE + datetime.timedelta(days=rules.concessions.renewal_window_days)
    terminals = _terminals()
    summary = SeedSummary(
        seed=seed,
        profiles=len(PROFILES),
        services=len(SERVICES),
        tariffs=sum(len(service.fares) for service in rules.services),
        terminals=len(terminals),
        kiosks=sum(1 for terminal in terminals if terminal[2] == TerminalKind.KIOSK),
        holders=cards,
        cards=cards,
        cards_not_active=not_active,
        cards_by_profile=tuple(by_profile),
        opening_balance_cents=total,
        eligibility=len(eligibility),
        renewal_due=sum(1 for row in eligibility if row[4] <= renewal_window_end),
        rules_version=rules.version,
        products=len(products),
    )
    return _City(holders, accounts, card_rows, entries, terminals, eligibility, summary, products)


def _products(
    holders: list[tuple[int, int, datetime.date]], card_rows: list[tuple[int, int, int, int]], seed: int, rules: Rules
) -> list[_ProductRow]:
    """card_products rows (account_id, product_code, kind, group_code,
    rules_version, valid_from, valid_until, rides, price_cents, sold_by,
    sold_to_card) for PRODUCT_HOLDER_SHARE of the entitled active holders."""
    rng = random.Random(f"{seed}:{_PRODUCTS_SEED_SALT}")
    today = datetime.datetime.now(datetime.UTC).date()
    code_of = {profile.id: profile.code for profile in PROFILES}
    rows: list[_ProductRow] = []
    for product in rules.products:
        for (_, profile_id, _birth), (uid, _, account_id, status) in zip(holders, card_rows, strict=True):
            if rng.random() >= PRODUCT_HOLDER_SHARE or status != CardStatus.ACTIVE:
                continue
            if product.profiles is not None and code_of[profile_id] not in product.profiles:
                continue
            valid_from = valid_until = None
            if product.kind == "season":
                days = product.days or 1
                valid_from = today - datetime.timedelta(days=rng.randrange(days))
                valid_until = valid_from + datetime.timedelta(days=days - 1)
            kind = int(ProductKind[product.kind.upper()])
            rows.append(
                (
                    account_id,
                    product.code,
                    kind,
                    product.group,
                    rules.version,
                    valid_from,
                    valid_until,
                    product.rides,
                    product.price_cents,
                    PRODUCTS_SOLD_BY,
                    uid,
                )
            )
    return rows


def _eligibility(
    holders: list[tuple[int, int, datetime.date]], seed: int, rules: Rules
) -> list[tuple[int, int, str, datetime.date, datetime.date]]:
    """(holder_id, profile_id, source, valid_from, valid_until) for every
    holder whose profile is a concession."""
    rng = random.Random(f"{seed}:{_ELIGIBILITY_SEED_SALT}")
    window_days = max(1, rules.concessions.renewal_window_days)
    reference_day = REFERENCE_DATE.toordinal()
    standard = rules.concessions.standard_profile
    source_of = {
        profile.id: ELIGIBILITY_SOURCES.get(profile.code, ELIGIBILITY_SOURCE_OTHERWISE)
        for profile in PROFILES
        if profile.code != standard
    }
    rows: list[tuple[int, int, str, datetime.date, datetime.date]] = []
    for holder_id, profile_id, _birth in holders:
        source = source_of.get(profile_id)
        if source is None:
            continue
        if rng.random() < RENEWAL_DUE_SHARE:
            remaining = rng.randint(1, window_days)
        else:
            remaining = rng.randint(ELIGIBILITY_REMAINING_DAYS_MIN, ELIGIBILITY_REMAINING_DAYS_MAX)
        started = rng.randint(1, ELIGIBILITY_STARTED_DAYS_MAX)
        valid_from = datetime.date.fromordinal(reference_day - started)
        valid_until = datetime.date.fromordinal(reference_day + remaining)
        rows.append((holder_id, profile_id, source, valid_from, valid_until))
    return rows


def _profile_column(cards: int, rng: random.Random) -> list[int]:
    """Profile ids for ``cards`` holders: exact shares (largest remainder), shuffled."""
    quotas = [profile.share * cards for profile in PROFILES]
    counts = [int(quota) for quota in quotas]
    by_remainder = sorted(range(len(PROFILES)), key=lambda i: (quotas[i] - counts[i], -i), reverse=True)
    for i in by_remainder[: cards - sum(counts)]:
        counts[i] += 1
    column = [profile.id for profile, count in zip(PROFILES, counts, strict=True) for _ in range(count)]
    rng.shuffle(column)
    return column


# Where terminals stand: sites spread over Gijón's urban area (WGS84). A site
# has two terminals (the gates of a pool, the readers of a library). Bus
# validators ride the buses: they have no fixed place and are not located,
# so the card-sharing check skips them.
CITY_LATITUDE_RANGE = (43.500, 43.560)
CITY_LONGITUDE_RANGE = (-5.720, -5.600)
TERMINALS_PER_SITE = 2
# Its own generator, so that locations never shift the cards a seed draws.
LOCATION_SEED = 43_5453


def _terminals() -> list[tuple[int, int, int, str, int | None, float | None, float | None]]:
    """(id, service_id, kind, name, funding_account_id, latitude, longitude), numbered from 1."""
    rng = random.Random(LOCATION_SEED)
    rows: list[tuple[int, int, int, str, int | None, float | None, float | None]] = []
    for service in SERVICES:
        kiosk = service.terminal_kind == TerminalKind.KIOSK
        located = service.code != "bus"
        latitude: float | None = None
        longitude: float | None = None
        for number in range(1, service.terminals + 1):
            if located and (number - 1) % TERMINALS_PER_SITE == 0:
                latitude = round(rng.uniform(*CITY_LATITUDE_RANGE), 5)
                longitude = round(rng.uniform(*CITY_LONGITUDE_RANGE), 5)
            rows.append(
                (
                    len(rows) + 1,
                    service.id,
                    int(service.terminal_kind),
                    f"{service.code}-{number:03d}",
                    FUNDING_ACCOUNT_ID if kiosk else None,
                    latitude,
                    longitude,
                )
            )
    return rows


async def _write(conn: asyncpg.Connection, city: _City, rules: Rules) -> None:
    await conn.executemany(
        "INSERT INTO profiles (id, code, name) VALUES ($1, $2, $3)",
        [(profile.id, profile.code, profile.name) for profile in PROFILES],
    )
    system_accounts = [(FUNDING_ACCOUNT_ID, 2, FUNDING_ACCOUNT_NAME, 0, FUNDING_FLOOR_CENTS, 2**63 - 1)]
    system_accounts += [
        (REVENUE_ACCOUNT_BASE + service.id, 1, f"revenue: {service.code}", 0, 0, 2**63 - 1) for service in SERVICES
    ]
    # The funding balance is written once the entries are in (below), so the
    # account row never shows a state the ledger does not explain.
    await conn.copy_records_to_table("accounts", records=system_accounts, columns=_ACCOUNT_COLUMNS)
    await conn.copy_records_to_table(
        "accounts", records=city.accounts, columns=_ACCOUNT_COLUMNS, timeout=_bulk_timeout(len(city.accounts))
    )
    await conn.executemany(
        "INSERT INTO services (id, code, name, revenue_account_id) VALUES ($1, $2, $3, $4)",
        [(service.id, service.code, service.name, REVENUE_ACCOUNT_BASE + service.id) for service in SERVICES],
    )
    # Service kinds and tariffs, the rules' record, its audit row: as a load would.
    await write_rules(conn, rules, actor=RULES_ACTOR, source_name=RULES_SOURCE_NAME)
    await conn.copy_records_to_table(
        "terminals",
        records=city.terminals,
        columns=("id", "service_id", "kind", "name", "funding_account_id", "latitude", "longitude"),
    )
    await conn.copy_records_to_table(
        "holders",
        records=city.holders,
        columns=("id", "profile_id", "birth_date"),
        timeout=_bulk_timeout(len(city.holders)),
    )
    await conn.copy_records_to_table(
        "eligibility",
        records=city.eligibility,
        columns=("holder_id", "profile_id", "source", "valid_from", "valid_until"),
        timeout=_bulk_timeout(len(city.eligibility)),
    )
    await conn.copy_records_to_table(
        "cards",
        records=city.cards,
        columns=("uid", "holder_id", "account_id", "status"),
        timeout=_bulk_timeout(len(city.cards)),
    )
    await conn.copy_records_to_table(
        "card_products",
        records=city.products,
        columns=(
            "account_id",
            "product_code",
            "kind",
            "group_code",
            "rules_version",
            "valid_from",
            "valid_until",
            "rides",
            "price_cents",
            "sold_by",
            "sold_to_card",
        ),
        timeout=_bulk_timeout(len(city.products)),
    )
    if city.entries:
        await conn.execute(
            "INSERT INTO ledger_transfers (id, batch_id, kind, service_id) VALUES ($1, NULL, $2, NULL)",
            OPENING_TRANSFER_ID,
            OPENING_TRANSFER_KIND,
        )
        # One COPY is one statement: the balance trigger sees the whole transfer.
        await conn.copy_records_to_table(
            "ledger_entries",
            records=city.entries,
            columns=("transfer_id", "account_id", "amount_cents"),
            timeout=_bulk_timeout(len(city.entries)),
        )
        await conn.execute(
            "UPDATE accounts SET balance_cents = $2 WHERE id = $1",
            FUNDING_ACCOUNT_ID,
            -city.summary.opening_balance_cents,
        )


_ACCOUNT_COLUMNS = ("id", "kind", "name", "balance_cents", "floor_cents", "ceiling_cents")

# A bulk copy may take longer than an ordinary statement's timeout: allow
# 50 us a row on top of it (a slow disk copies ~20,000 rows a second; this
# machine does ~500,000), so 10 million cards still seed on a slow machine.
SEED_SECONDS_PER_ROW = 50e-6


def _bulk_timeout(rows: int) -> float:
    """Seconds a COPY of ``rows`` rows may take."""
    return DB_COMMAND_TIMEOUT_S + rows * SEED_SECONDS_PER_ROW
