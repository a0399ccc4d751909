"""City rules and tariffs as data: a versioned TOML document.

A rules file (``rules/*.toml``, described field by field in
``docs/rules.md``) says, for one version of the city's rules, how each
service charges and whom it serves, the transfer window, fare caps, passes
and multi-ride tickets, the concession policy and the security checks.
``parse_rules`` reads it into frozen ``msgspec`` structs and checks it;
``store_rules`` loads it into the database as a new version, in one
transaction with the ``tariffs`` and ``services.kind`` it implies, an audit
row and a notification to running engines. Every tap records the version
that decided it, so a past decision can always be explained from
``rules_versions``.

Errors say where: ``RulesError`` messages end in a path into the document,
such as ``- at `$.services[3].fares```.

Example::

    rules = read_rules_file("rules/gijon.toml")
    rules.fare("bus", "student")  # 50
    version = await store_rules(conn, rules, actor="maria", source_name="gijon.toml")
    version, rules = await current_rules(conn)
"""

from __future__ import annotations

import datetime
import hashlib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
import msgspec

from engine.codes import ServiceKind
from engine.fastpath import CAP_GROUPS_MAX
from engine.limits import BALANCE_MAX_CENTS

# --- Limits -----------------------------------------------------------------------

# rules_versions.version is a PostgreSQL integer.
VERSION_MAX = 2**31 - 1

# Codes (services, profiles, groups, products) are short lowercase words, so
# that they read the same in TOML keys, SQL and logs; 40 characters fits
# "street_parking_residents_zone_b" with room to spare.
CODE_PATTERN = "^[a-z][a-z0-9_]*$"
CODE_LENGTH_MAX = 40

# A rules name is a human label ("Gijón 2026, summer timetable").
NAME_LENGTH_MAX = 200

# The schema's bound on tariffs.fare_cents: 1,000 EUR, far above any fare.
FARE_MAX_CENTS = 100_000

# A card never holds more than BALANCE_MAX_CENTS, so a higher minimum would
# close the service to everyone.
MIN_BALANCE_TO_ENTER_MAX_CENTS = BALANCE_MAX_CENTS

# The city tolerates a small debt (a last bus ride home), not credit: 10 EUR.
TOLERATED_NEGATIVE_MAX_CENTS = 1_000

# Anti-passback refuses a second entry with the same card at a gate; longer
# than a day it would refuse the holder's next visit.
PASSBACK_WINDOW_MAX_S = 86_400

# A change of bus after more than four hours is a new journey, not a transfer.
TRANSFER_WINDOW_MAX_MINUTES = 240
TRANSFER_WINDOW_DEFAULT_MINUTES = 45

# 10,000 EUR: far above a month of fares for any service; a larger cap is a
# typo, and keeps sums of capped fares far from integer limits.
CAP_MAX_CENTS = 1_000_000

# A pass or ticket is bought with stored value or at the card office; it
# costs no more than a card can hold.
PRODUCT_PRICE_MAX_CENTS = BALANCE_MAX_CENTS

# A season pass lasts at most a (leap) year; a ticket of more than 100 rides
# would be a season pass without an end.
SEASON_DAYS_MAX = 366
MULTI_RIDE_RIDES_MAX = 100

# Concession renewal warnings start at most a year before expiry.
RENEWAL_WINDOW_DAYS_MAX = 365
RENEWAL_WINDOW_DEFAULT_DAYS = 30

# Card sharing: the same card at two terminals farther apart than this
# distance, faster than this speed. 1,000 km/h is an aircraft; 100 km covers a
# region's network.
SHARING_SPEED_MAX_KMH = 1_000
SHARING_DISTANCE_MAX_M = 100_000

# A region has a few hundred services; the engine keeps per-service arrays.
SERVICES_MAX = 1_000
# Caps are a handful per city; each card keeps a day and a month total per
# capped group, so the engine holds a fixed number of them per card
# (fastpath.CAP_GROUPS_MAX): a file with more could be stored but never put
# in force, so it is refused here.
CAPS_MAX = CAP_GROUPS_MAX
# Products are a handful per city; a hundred is a generated file gone wrong.
PRODUCTS_MAX = 100

# A city's rules are a few kilobytes; a megabyte is a wrong file.
RULES_FILE_MAX_BYTES = 1024 * 1024

# audit_log.actor is 1..100 characters (schema 0003).
ACTOR_LENGTH_MAX = 100

# Running engines LISTEN here; the payload is the new version number. Sent
# with pg_notify inside the loading transaction, so it arrives at commit and
# never for a version that was rolled back.
RULES_CHANNEL = "citycard_rules"

AUDIT_ACTION = "rules.load"

# --- The document -----------------------------------------------------------------
# Every table is a frozen struct that forbids unknown fields: the rules of a
# version never change once read, and a misspelt key is an error, not a
# silently ignored setting.

Code = Annotated[str, msgspec.Meta(pattern=CODE_PATTERN, min_length=1, max_length=CODE_LENGTH_MAX)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_LENGTH_MAX)]
FareCents = Annotated[int, msgspec.Meta(ge=0, le=FARE_MAX_CENTS)]
CapCents = Annotated[int, msgspec.Meta(ge=0, le=CAP_MAX_CENTS)]

ServiceKindName = Literal["per_use", "per_duration", "identification"]
ProductKind = Literal["season", "multi_ride"]

SERVICE_KINDS: dict[str, ServiceKind] = {
    "per_use": ServiceKind.PER_USE,
    "per_duration": ServiceKind.PER_DURATION,
    "identification": ServiceKind.IDENTIFICATION,
}


class RulesError(Exception):
    """A rules document that cannot be read, is not valid, or does not fit the
    database it is loaded into. The message says what and where."""


class RulesHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[rules]``: which version this is."""

    version: Annotated[int, msgspec.Meta(ge=1, le=VERSION_MAX)]
    name: Name


class ServiceRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[services]]``: how one service charges, and whom it serves."""

    code: Code
    kind: ServiceKindName
    # profile code -> cents (per started hour for per_duration); a profile
    # missing here is not served at this service.
    fares: Annotated[dict[Code, FareCents], msgspec.Meta(min_length=1)]
    min_balance_to_enter_cents: Annotated[int, msgspec.Meta(ge=0, le=MIN_BALANCE_TO_ENTER_MAX_CENTS)] = 0
    tolerated_negative_cents: Annotated[int, msgspec.Meta(ge=0, le=TOLERATED_NEGATIVE_MAX_CENTS)] = 0
    passback_window_s: Annotated[int, msgspec.Meta(ge=0, le=PASSBACK_WINDOW_MAX_S)] = 0
    max_charge_cents: FareCents | None = None
    # Empty in the file means "the service code": set in __post_init__.
    group: Code = ""

    def __post_init__(self) -> None:
        if not self.group:
            msgspec.structs.force_setattr(self, "group", self.code)
        if self.kind == "per_duration":
            if self.max_charge_cents is None:
                raise ValueError("a per_duration service needs max_charge_cents (charged when the exit tap is missing)")
            dearest = max(self.fares.values())
            if self.max_charge_cents < dearest:
                raise ValueError(f"max_charge_cents {self.max_charge_cents} is below the fare of one hour ({dearest})")
        elif self.max_charge_cents is not None:
            raise ValueError(f"max_charge_cents applies only to per_duration services, not {self.kind}")
        if self.kind == "identification":
            charged = {profile: fare for profile, fare in self.fares.items() if fare != 0}
            if charged:
                listed = ", ".join(f"{profile} = {fare}" for profile, fare in charged.items())
                raise ValueError(f"an identification service charges nothing, but its fares say {listed}")

    @property
    def service_kind(self) -> ServiceKind:
        """The kind as stored in ``services.kind``."""
        return SERVICE_KINDS[self.kind]


class TransferRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[transfer]``: a change within the window at these services is a transfer."""

    window_minutes: Annotated[int, msgspec.Meta(ge=1, le=TRANSFER_WINDOW_MAX_MINUTES)] = TRANSFER_WINDOW_DEFAULT_MINUTES
    services: Annotated[tuple[Code, ...], msgspec.Meta(min_length=1, max_length=SERVICES_MAX)] = ("bus",)
    # Either fare = "free" or discount_percent; neither means free.
    fare: Literal["free"] | None = None
    discount_percent: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None

    def __post_init__(self) -> None:
        if self.fare is not None and self.discount_percent is not None:
            raise ValueError('give fare = "free" or discount_percent, not both')
        if self.fare is None and self.discount_percent is None:
            msgspec.structs.force_setattr(self, "fare", "free")
        _refuse_duplicates(self.services, "service")

    @property
    def percent_off(self) -> int:
        """How much of the fare a transfer saves: 100 when free."""
        return 100 if self.discount_percent is None else self.discount_percent


class CapRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[caps]]``: the most one card pays a service group per day and month."""

    group: Code
    daily_cents: CapCents | None = None
    monthly_cents: CapCents | None = None

    def __post_init__(self) -> None:
        if self.daily_cents is None and self.monthly_cents is None:
            raise ValueError("a cap needs daily_cents, monthly_cents or both")
        if self.daily_cents is not None and self.monthly_cents is not None and self.daily_cents > self.monthly_cents:
            raise ValueError(f"daily_cents {self.daily_cents} is above monthly_cents {self.monthly_cents}")


class ProductRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[[products]]``: a season pass or a multi-ride ticket for a service group."""

    code: Code
    kind: ProductKind
    group: Code
    price_cents: Annotated[int, msgspec.Meta(ge=0, le=PRODUCT_PRICE_MAX_CENTS)]
    days: Annotated[int, msgspec.Meta(ge=1, le=SEASON_DAYS_MAX)] | None = None
    rides: Annotated[int, msgspec.Meta(ge=1, le=MULTI_RIDE_RIDES_MAX)] | None = None
    # None: every profile may buy it.
    profiles: Annotated[tuple[Code, ...], msgspec.Meta(min_length=1)] | None = None

    def __post_init__(self) -> None:
        if self.kind == "season" and (self.days is None or self.rides is not None):
            raise ValueError("a season product needs days and no rides")
        if self.kind == "multi_ride" and (self.rides is None or self.days is not None):
            raise ValueError("a multi_ride product needs rides and no days")
        if self.profiles is not None:
            _refuse_duplicates(self.profiles, "profile")


class ConcessionRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[concessions]``: renewal warnings, ID checks, the fallback profile."""

    renewal_window_days: Annotated[int, msgspec.Meta(ge=0, le=RENEWAL_WINDOW_DAYS_MAX)] = RENEWAL_WINDOW_DEFAULT_DAYS
    show_id_permille: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    standard_profile: Code = "standard"


class SecurityRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[security]``: what a suspected clone or shared card leads to."""

    clone_blocks_card: bool = True
    sharing_max_speed_kmh: Annotated[int, msgspec.Meta(ge=1, le=SHARING_SPEED_MAX_KMH)] = 120
    sharing_min_distance_m: Annotated[int, msgspec.Meta(ge=0, le=SHARING_DISTANCE_MAX_M)] = 500


class Rules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole rules document, validated. Plain data: engines compile their own view.

    Example::

        rules = parse_rules(text)
        rules.version, rules.name        # (1, 'Gijón 2026')
        rules.service("parking").kind    # 'per_duration'
        rules.fare("parking", "child")   # None: not served
    """

    rules: RulesHeader
    services: Annotated[tuple[ServiceRules, ...], msgspec.Meta(min_length=1, max_length=SERVICES_MAX)]
    transfer: TransferRules | None = None
    caps: Annotated[tuple[CapRules, ...], msgspec.Meta(max_length=CAPS_MAX)] = ()
    products: Annotated[tuple[ProductRules, ...], msgspec.Meta(max_length=PRODUCTS_MAX)] = ()
    concessions: ConcessionRules = msgspec.field(default_factory=ConcessionRules)
    security: SecurityRules = msgspec.field(default_factory=SecurityRules)

    @property
    def version(self) -> int:
        return self.rules.version

    @property
    def name(self) -> str:
        return self.rules.name

    def service(self, code: str) -> ServiceRules:
        """The service with this code; KeyError if the rules do not name it."""
        for service in self.services:
            if service.code == code:
                return service
        raise KeyError(f"rules version {self.version} have no service {code!r}")

    def fare(self, service_code: str, profile_code: str) -> int | None:
        """Cents for this profile at this service; None when it is not served there.

        >>> parse_rules(EXAMPLE).fare("bus", "student")
        50
        """
        return self.service(service_code).fares.get(profile_code)

    def groups(self) -> set[str]:
        """Every service group named by a service."""
        return {service.group for service in self.services}

    def profile_codes(self) -> set[str]:
        """Every profile code the document names."""
        codes = {profile for service in self.services for profile in service.fares}
        codes.update(profile for product in self.products for profile in product.profiles or ())
        codes.add(self.concessions.standard_profile)
        return codes


# A small valid document, for examples and tests.
EXAMPLE = """
[rules]
version = 1
name = "example"

[[services]]
code = "bus"
kind = "per_use"
fares = { standard = 100, student = 50 }
"""

# --- Reading ----------------------------------------------------------------------


def parse_rules(text: str) -> Rules:
    """A rules document from TOML text, validated; RulesError otherwise.

    >>> parse_rules(EXAMPLE).version
    1
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RulesError(f"not valid TOML: {error}") from None
    return _from_data(data)


def read_rules_file(path: str | os.PathLike[str]) -> Rules:
    """``parse_rules`` of a file; errors start with the file's path.

    Example::

        rules = read_rules_file("rules/gijon.toml")
    """
    try:
        with open(path, "rb") as file:
            raw = file.read(RULES_FILE_MAX_BYTES + 1)
    except OSError as error:
        raise RulesError(f"{os.fspath(path)}: cannot read: {error.strerror or error}") from None
    if len(raw) > RULES_FILE_MAX_BYTES:
        raise RulesError(f"{os.fspath(path)}: larger than {RULES_FILE_MAX_BYTES} bytes: not a rules file")
    try:
        return parse_rules(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RulesError(f"{os.fspath(path)}: not UTF-8 text (byte {error.start})") from None
    except RulesError as error:
        raise RulesError(f"{os.fspath(path)}: {error}") from None


_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder(Rules)


def canonical_json(rules: Rules) -> bytes:
    """The document as stored: JSON with every field, keys sorted."""
    return _ENCODER.encode(rules)


def rules_sha256(rules: Rules) -> str:
    """Hex SHA-256 of ``canonical_json``: equal documents, equal digests,
    however their files were laid out."""
    return hashlib.sha256(canonical_json(rules)).hexdigest()


def _from_data(data: object) -> Rules:
    try:
        rules = msgspec.convert(data, Rules)
    except msgspec.ValidationError as error:
        raise RulesError(str(error)) from None
    _check_references(rules)
    return rules


def _check_references(rules: Rules) -> None:
    """Checks across tables of the document (each table checks itself)."""
    services: dict[str, int] = {}
    for index, service in enumerate(rules.services):
        if service.code in services:
            raise RulesError(
                f"duplicate service code {service.code!r} (first at `$.services[{services[service.code]}]`)"
                f" - at `$.services[{index}].code`"
            )
        services[service.code] = index
    if rules.transfer is not None:
        for index, code in enumerate(rules.transfer.services):
            if code not in services:
                raise RulesError(f"unknown service {code!r} - at `$.transfer.services[{index}]`")
            kind = rules.services[services[code]].kind
            if kind != "per_use":
                raise RulesError(
                    f"transfers apply to per_use services; {code!r} is {kind} - at `$.transfer.services[{index}]`"
                )
    groups = rules.groups()
    capped: dict[str, int] = {}
    for index, cap in enumerate(rules.caps):
        if cap.group not in groups:
            raise RulesError(f"unknown service group {cap.group!r} ({_listing(groups)}) - at `$.caps[{index}].group`")
        if cap.group in capped:
            raise RulesError(
                f"a second cap for group {cap.group!r} (first at `$.caps[{capped[cap.group]}]`)"
                f" - at `$.caps[{index}].group`"
            )
        capped[cap.group] = index
    products: dict[str, int] = {}
    for index, product in enumerate(rules.products):
        if product.code in products:
            raise RulesError(
                f"duplicate product code {product.code!r} (first at `$.products[{products[product.code]}]`)"
                f" - at `$.products[{index}].code`"
            )
        products[product.code] = index
        if product.group not in groups:
            raise RulesError(
                f"unknown service group {product.group!r} ({_listing(groups)}) - at `$.products[{index}].group`"
            )


def _refuse_duplicates(codes: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for code in codes:
        if code in seen:
            raise ValueError(f"{what} {code!r} is listed twice")
        seen.add(code)


def _listing(codes: Iterable[str]) -> str:
    return "known: " + ", ".join(sorted(codes))


# --- The database -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRules:
    """A row of ``rules_versions``: the rules and who loaded them when."""

    version: int
    name: str
    sha256: str
    loaded_at: datetime.datetime
    loaded_by: str
    rules: Rules


async def store_rules(conn: asyncpg.Connection, rules: Rules, *, actor: str, source_name: str) -> int:
    """Load ``rules`` as a new version, in one transaction; returns the version.

    Checks its codes against ``services`` and ``profiles`` and that it is
    newer than every stored version (RulesError otherwise, with nothing
    written), then records the version, sets ``services.kind``, replaces the
    ``tariffs`` rows, writes an audit row and notifies ``citycard_rules``.

    Example::

        version = await store_rules(conn, read_rules_file(path), actor="maria", source_name=path.name)
    """
    async with conn.transaction():
        return await write_rules(conn, rules, actor=actor, source_name=source_name)


async def write_rules(conn: asyncpg.Connection, rules: Rules, *, actor: str, source_name: str) -> int:
    """``store_rules`` inside the caller's transaction (the seed's, for one)."""
    if not conn.is_in_transaction():
        raise RuntimeError("write_rules needs a transaction: use store_rules")
    if not 1 <= len(actor) <= ACTOR_LENGTH_MAX:
        raise ValueError(f"actor must be 1 to {ACTOR_LENGTH_MAX} characters, got {len(actor)}")
    # Loaders take turns, so the version check below and the tariffs written
    # after it belong to the same, newest version. Readers are not blocked.
    await conn.execute("LOCK TABLE rules_versions IN SHARE ROW EXCLUSIVE MODE")
    service_ids: dict[str, int] = dict(await conn.fetch("SELECT code, id FROM services"))
    profile_ids: dict[str, int] = dict(await conn.fetch("SELECT code, id FROM profiles"))
    _check_against_database(rules, service_ids, profile_ids)
    current = await conn.fetchval("SELECT max(version) FROM rules_versions")
    if current is not None and rules.version <= current:
        raise RulesError(f"version {rules.version} is not newer than the current version {current}")

    document = canonical_json(rules)
    digest = hashlib.sha256(document).hexdigest()
    await conn.execute(
        "INSERT INTO rules_versions (version, name, document, sha256, loaded_by) VALUES ($1, $2, $3::jsonb, $4, $5)",
        rules.version,
        rules.name,
        document.decode(),
        digest,
        actor,
    )
    await conn.execute(
        "UPDATE services s SET kind = v.kind FROM unnest($1::smallint[], $2::smallint[]) AS v(id, kind)"
        " WHERE s.id = v.id AND s.kind IS DISTINCT FROM v.kind",
        [service_ids[service.code] for service in rules.services],
        [int(service.service_kind) for service in rules.services],
    )
    tariffs = [
        (service_ids[service.code], profile_ids[profile], fare)
        for service in rules.services
        for profile, fare in service.fares.items()
    ]
    # The rules cover every service (checked above), so every tariff row is theirs.
    await conn.execute("DELETE FROM tariffs")
    await conn.execute(
        "INSERT INTO tariffs (service_id, profile_id, fare_cents)"
        " SELECT * FROM unnest($1::smallint[], $2::smallint[], $3::integer[])",
        [row[0] for row in tariffs],
        [row[1] for row in tariffs],
        [row[2] for row in tariffs],
    )
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        AUDIT_ACTION,
        f"rules:{rules.version}",
        msgspec.json.encode({"name": rules.name, "sha256": digest, "source": source_name}).decode(),
    )
    await conn.execute("SELECT pg_notify($1, $2)", RULES_CHANNEL, str(rules.version))
    return rules.version


async def current_rules(conn: asyncpg.Connection) -> tuple[int, Rules] | None:
    """The highest stored version and its rules; None before any is loaded.

    Example::

        found = await current_rules(conn)
        if found is not None:
            version, rules = found
    """
    stored = await stored_rules(conn)
    return None if stored is None else (stored.version, stored.rules)


async def rules_version(conn: asyncpg.Connection, version: int) -> Rules:
    """The rules of a stored version (to explain a past decision); RulesError if none.

    Example::

        rules = await rules_version(conn, tap["rules_version"])
    """
    stored = await stored_rules(conn, version)
    if stored is None:
        raise RulesError(f"no rules version {version} in the database")
    return stored.rules


async def stored_rules(conn: asyncpg.Connection, version: int | None = None) -> StoredRules | None:
    """A stored version with who loaded it when (the newest when ``version`` is
    None); None when there is no such version."""
    row = await conn.fetchrow(
        "SELECT version, name, document::text AS document, sha256, loaded_at, loaded_by FROM rules_versions"
        " WHERE $1::integer IS NULL OR version = $1 ORDER BY version DESC LIMIT 1",
        version,
    )
    if row is None:
        return None
    try:
        rules = _DECODER.decode(row["document"])
    except msgspec.ValidationError as error:
        raise RulesError(f"stored rules version {row['version']} no longer reads: {error}") from None
    return StoredRules(row["version"], row["name"], row["sha256"], row["loaded_at"], row["loaded_by"], rules)


def _check_against_database(rules: Rules, service_ids: Mapping[str, Any], profile_ids: Mapping[str, Any]) -> None:
    """Every code the rules name exists, and every service has rules."""
    for index, service in enumerate(rules.services):
        if service.code not in service_ids:
            raise RulesError(
                f"unknown service code {service.code!r} ({_listing(service_ids)}) - at `$.services[{index}].code`"
            )
        for profile in service.fares:
            if profile not in profile_ids:
                raise RulesError(
                    f"unknown profile code {profile!r} ({_listing(profile_ids)}) - at `$.services[{index}].fares`"
                )
    for index, product in enumerate(rules.products):
        for profile in product.profiles or ():
            if profile not in profile_ids:
                raise RulesError(
                    f"unknown profile code {profile!r} ({_listing(profile_ids)}) - at `$.products[{index}].profiles`"
                )
    if rules.concessions.standard_profile not in profile_ids:
        raise RulesError(
            f"unknown profile code {rules.concessions.standard_profile!r} ({_listing(profile_ids)})"
            " - at `$.concessions.standard_profile`"
        )
    uncovered = set(service_ids) - {service.code for service in rules.services}
    if uncovered:
        # A service without rules could not be decided, nor explained later.
        raise RulesError(f"services in the database without rules: {', '.join(sorted(uncovered))} - at `$.services`")
