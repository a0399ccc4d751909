"""Every stored rules version, compiled on demand and kept for a while.

The engine decides online taps with the rules version in force only
(``engine/policy.py`` installs it on the city). Two things need others:

- a tap a terminal decided offline is judged by the version that terminal
  held (``engine/offline.py``), which may be older than the one in force;
- a terminal asks for the rules of its service to work offline, in force
  or of a given version (RULES, ``engine/sync.py``).

``RulesVersions.get(n)`` reads version ``n``'s document from
``rules_versions``, compiles it (``compile_policy``, the same compilation as
the version in force, with the same service group numbers) together with its
fares by service and profile, and keeps the last RULES_VERSIONS_CACHED
versions. ``CompiledVersion.view(state)`` is the city as the decision ladder
sees it under that version: the city's cards and accounts, that version's
fares and policies, and no memory of earlier taps.

Version 0 is a city that has never loaded a rules file: the tariffs table
with every other rule off, as the engine decides then.

>>> versions = RulesVersions(state, pool)          # doctest: +SKIP
>>> compiled = await versions.get(3)               # doctest: +SKIP
>>> decide_tap(compiled.view(state), terminal, d)  # doctest: +SKIP
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from engine import fastpath
from engine.codes import ServiceKind
from engine.limits import DB_COMMAND_TIMEOUT_S, RULES_VERSIONS_CACHED
from engine.policy import CompiledPolicy, compile_policy
from engine.rules import Rules, RulesError
from engine.state import DEFAULT_RENEWAL_WINDOW_DAYS, NO_CAP_CENTS, NO_FARE, PROFILES_MAX, CityState

_MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class ServiceTerms:
    """What a terminal needs of one version to decide taps at its service
    offline (the fields of a RULES message, docs/protocol.md)."""

    service_id: int
    service_kind: int
    min_balance_to_enter_cents: int
    tolerated_negative_cents: int
    passback_window_s: int
    max_charge_cents: int
    transfer_window_minutes: int  # 0: a change here is no transfer
    transfer_percent_off: int
    cap_daily_cents: int  # -1: no daily cap for the service's group
    cap_monthly_cents: int  # -1: no monthly cap
    fares: tuple[tuple[int, int], ...]  # (profile id, cents), by profile id

    @property
    def most_charged_cents(self) -> int:
        """The most one tap at the service can cost under this version: the
        dearest fare, or a stay's maximum charge."""
        return max([fare for _, fare in self.fares] + [self.max_charge_cents])


class VersionView:
    """The city as the decision ladder reads it under one rules version.

    Cards, accounts, products and terminals are the city's own (read through
    to ``state``); the fares, service policies, cap limits and settings are
    the version's. ``activity`` is empty: the view decides a tap on its own,
    without the card's earlier taps.
    """

    __slots__ = (
        "_state",
        "activity",
        "cap_daily",
        "cap_monthly",
        "fares",
        "rules_version",
        "service_policy",
        "settings",
    )

    def __init__(self, state: CityState, compiled: CompiledVersion) -> None:
        self._state = state
        self.rules_version = compiled.version
        self.fares = compiled.fares
        self.service_policy = compiled.policy.service_policy
        self.cap_daily = compiled.policy.cap_daily
        self.cap_monthly = compiled.policy.cap_monthly
        self.settings = compiled.settings
        self.activity: dict[int, fastpath.Activity] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


@dataclass(frozen=True)
class CompiledVersion:
    """One rules version, compiled for the ladder and for RULES."""

    version: int
    fares: dict[int, array[int]]  # service id -> fare by profile id (NO_FARE: not served)
    policy: CompiledPolicy
    settings: array[int]
    terms: dict[int, ServiceTerms]  # service id -> what its terminals are sent

    def view(self, state: CityState) -> VersionView:
        return VersionView(state, self)


def compile_version(
    version: int,
    rules: Rules,
    service_ids: Mapping[str, int],
    profile_ids: Mapping[str, int],
    state: CityState,
) -> CompiledVersion:
    """Compile ``rules`` (stored as ``version``) for the ladder and for RULES."""
    policy = compile_policy(rules, service_ids, state.group_id)
    fares = {service_id: array("q", [NO_FARE] * PROFILES_MAX) for service_id in service_ids.values()}
    terms: dict[int, ServiceTerms] = {}
    transfer_services = set(rules.transfer.services) if rules.transfer is not None else set()
    for service in rules.services:
        service_id = service_ids[service.code]
        row = fares[service_id]
        for profile, cents in service.fares.items():
            profile_id = profile_ids.get(profile)
            if profile_id is None:
                raise RulesError(f"rules version {version} names profile {profile!r}, not in the database")
            row[profile_id] = cents
        cap = policy.service_policy[service_id][fastpath.POLICY_CAP_GROUP]
        transfer = rules.transfer if service.code in transfer_services else None
        terms[service_id] = ServiceTerms(
            service_id=service_id,
            service_kind=int(service.service_kind),
            min_balance_to_enter_cents=service.min_balance_to_enter_cents,
            tolerated_negative_cents=service.tolerated_negative_cents,
            passback_window_s=service.passback_window_s,
            max_charge_cents=service.max_charge_cents or 0,
            transfer_window_minutes=transfer.window_minutes if transfer is not None else 0,
            transfer_percent_off=transfer.percent_off if transfer is not None else 0,
            cap_daily_cents=policy.cap_daily[cap] if cap != fastpath.NO_CAP else NO_CAP_CENTS,
            cap_monthly_cents=policy.cap_monthly[cap] if cap != fastpath.NO_CAP else NO_CAP_CENTS,
            fares=tuple(sorted((profile_ids[profile], cents) for profile, cents in service.fares.items())),
        )
    return CompiledVersion(version, fares, policy, policy.settings_row(), terms)


def compile_tariffs(tariffs: list[tuple[int, int, int]], service_ids: Mapping[str, int]) -> CompiledVersion:
    """Version 0: a city without a rules version decides from its tariffs
    table (``(service id, profile id, cents)`` rows) with every rule off."""
    policy = CompiledPolicy(renewal_window_days=DEFAULT_RENEWAL_WINDOW_DAYS)
    fares = {service_id: array("q", [NO_FARE] * PROFILES_MAX) for service_id in service_ids.values()}
    for service_id, profile_id, cents in tariffs:
        fares[service_id][profile_id] = cents
    terms = {
        service_id: ServiceTerms(
            service_id=service_id,
            service_kind=int(ServiceKind.PER_USE),
            min_balance_to_enter_cents=0,
            tolerated_negative_cents=0,
            passback_window_s=0,
            max_charge_cents=0,
            transfer_window_minutes=0,
            transfer_percent_off=0,
            cap_daily_cents=NO_CAP_CENTS,
            cap_monthly_cents=NO_CAP_CENTS,
            fares=tuple((profile_id, cents) for profile_id, cents in enumerate(row) if cents != NO_FARE),
        )
        for service_id, row in fares.items()
    }
    return CompiledVersion(0, fares, policy, policy.settings_row(), terms)


class RulesVersions:
    """Compiled rules versions by number: the last few used, read on demand."""

    def __init__(self, state: CityState, pool: asyncpg.Pool | None) -> None:
        self._state = state
        self._pool = pool
        self._cache: OrderedDict[int, CompiledVersion] = OrderedDict()

    def hold(self, compiled: CompiledVersion) -> None:
        """Keep a version compiled elsewhere (an engine without a database)."""
        self._cache[compiled.version] = compiled

    def cached(self, version: int) -> CompiledVersion | None:
        """Version ``version`` if it is compiled already (no database)."""
        compiled = self._cache.get(version)
        if compiled is not None:
            self._cache.move_to_end(version)
        return compiled

    async def get(self, version: int) -> CompiledVersion | None:
        """Version ``version``, compiled; None when the database has no such
        version (version 0 exists only until the first rules file is loaded)."""
        compiled = self.cached(version)
        if compiled is not None or self._pool is None:
            return compiled
        async with self._pool.acquire() as conn:
            compiled = await read_version(conn, self._state, version)
        if compiled is not None and version != 0:
            # Version 0 is never cached: it ends when the first file is loaded.
            self._cache[version] = compiled
            while len(self._cache) > RULES_VERSIONS_CACHED:
                self._cache.popitem(last=False)
        return compiled


async def read_version(conn: asyncpg.Connection, state: CityState, version: int) -> CompiledVersion | None:
    """Read and compile one version (see ``RulesVersions.get``)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        service_ids: dict[str, int] = dict(
            await conn.fetch("SELECT code, id FROM services", timeout=DB_COMMAND_TIMEOUT_S)
        )
        if version == 0:
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM rules_versions)", timeout=DB_COMMAND_TIMEOUT_S):
                return None
            tariffs = await conn.fetch(
                "SELECT service_id, profile_id, fare_cents FROM tariffs", timeout=DB_COMMAND_TIMEOUT_S
            )
            return compile_tariffs([tuple(row) for row in tariffs], service_ids)
        document = await conn.fetchval(
            "SELECT document::text FROM rules_versions WHERE version = $1", version, timeout=DB_COMMAND_TIMEOUT_S
        )
        if document is None:
            return None
        profile_ids: dict[str, int] = dict(
            await conn.fetch("SELECT code, id FROM profiles", timeout=DB_COMMAND_TIMEOUT_S)
        )
    try:
        rules = msgspec.json.decode(document, type=Rules)
    except msgspec.ValidationError as error:
        raise RulesError(f"rules version {version} as stored does not parse: {error}") from None
    return compile_version(version, rules, service_ids, profile_ids, state)
