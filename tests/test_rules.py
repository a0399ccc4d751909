"""Rules files: validation with errors that say where, the demo city's file,
loading into a real database (one transaction, versions only grow), the
notification to engines, and the ``citycard rules`` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import asyncpg
import msgspec
import pytest

from engine.cli_rules import add_rules_commands, render_toml, run_rules_command
from engine.codes import ServiceKind
from engine.db import connect, run_sync
from engine.fastpath import CAP_GROUPS_MAX
from engine.rules import (
    EXAMPLE,
    RULES_CHANNEL,
    Rules,
    RulesError,
    RulesHeader,
    ServiceRules,
    canonical_json,
    current_rules,
    parse_rules,
    read_rules_file,
    rules_sha256,
    rules_version,
    store_rules,
    stored_rules,
    write_rules,
)
from engine.seed import RULES_FILE, SERVICES, seed_city

# Seconds to wait for a notification that a commit has already sent.
NOTIFY_WAIT_S = 10.0

# A small city for loading tests: enough cards to be a city, seeded in well
# under a second.
CITY_CARDS = 20

HEADER = '[rules]\nversion = 1\nname = "test"\n'
BUS = '[[services]]\ncode = "bus"\nkind = "per_use"\nfares = { standard = 100, student = 50 }\n'
LIBRARY = '[[services]]\ncode = "library"\nkind = "identification"\nfares = { standard = 0 }\n'
PARKING = '[[services]]\ncode = "parking"\nkind = "per_duration"\nfares = { standard = 150 }\nmax_charge_cents = 1500\n'
VALID = HEADER + BUS + LIBRARY + PARKING


def service(code: str, kind: str, fares: str, extra: str = "") -> str:
    return f'[[services]]\ncode = "{code}"\nkind = "{kind}"\nfares = {{ {fares} }}\n{extra}'


# (what is wrong, the document, a fragment the error must contain)
INVALID: list[tuple[str, str, str]] = [
    ("TOML syntax", HEADER + "[[services]]\ncode = \n", "not valid TOML: Invalid value (at line 5, column 8)"),
    ("no [rules]", BUS, "Object missing required field `rules`"),
    ("version 0", HEADER.replace("version = 1", "version = 0") + BUS, "Expected `int` >= 1 - at `$.rules.version`"),
    ("version as text", HEADER.replace("version = 1", 'version = "1"') + BUS, "got `str` - at `$.rules.version`"),
    ("empty name", HEADER.replace('"test"', '""') + BUS, "length >= 1 - at `$.rules.name`"),
    ("no services", HEADER, "Object missing required field `services`"),
    (
        "misspelt key",
        VALID + "[security]\nclone_block_card = true\n",
        "unknown field `clone_block_card` - at `$.security`",
    ),
    ("unknown table", VALID + "[discounts]\nx = 1\n", "Object contains unknown field `discounts`"),
    (
        "unknown kind",
        HEADER + service("bus", "monthly", "standard = 1"),
        "Invalid enum value 'monthly' - at `$.services[0].kind`",
    ),
    ("fare too high", HEADER + service("bus", "per_use", "standard = 100001"), "<= 100000 - at `$.services[0].fares"),
    ("negative fare", HEADER + service("bus", "per_use", "standard = -1"), ">= 0 - at `$.services[0].fares"),
    ("fare in euros", HEADER + service("bus", "per_use", "standard = 1.5"), "Expected `int`, got `float`"),
    ("profile code", HEADER + service("bus", "per_use", "Student = 1"), "at `key` in `$.services[0].fares`"),
    ("no fares", HEADER + service("bus", "per_use", ""), "length >= 1 - at `$.services[0].fares`"),
    (
        "identification charging",
        HEADER + BUS + service("library", "identification", "standard = 0, student = 20"),
        "an identification service charges nothing, but its fares say student = 20 - at `$.services[1]`",
    ),
    (
        "per_duration without a maximum",
        HEADER + BUS + service("parking", "per_duration", "standard = 150"),
        "a per_duration service needs max_charge_cents",
    ),
    (
        "maximum below one hour",
        HEADER + service("parking", "per_duration", "standard = 150", "max_charge_cents = 100\n"),
        "max_charge_cents 100 is below the fare of one hour (150) - at `$.services[0]`",
    ),
    (
        "maximum on per_use",
        HEADER + service("bus", "per_use", "standard = 1", "max_charge_cents = 100\n"),
        "max_charge_cents applies only to per_duration services, not per_use",
    ),
    (
        "too much debt",
        HEADER + service("bus", "per_use", "standard = 1", "tolerated_negative_cents = 1001\n"),
        "Expected `int` <= 1000 - at `$.services[0].tolerated_negative_cents`",
    ),
    (
        "passback of days",
        HEADER + service("bus", "per_use", "standard = 1", "passback_window_s = 86401\n"),
        "- at `$.services[0].passback_window_s`",
    ),
    (
        "bad group name",
        HEADER + service("bus", "per_use", "standard = 1", 'group = "Buses"\n'),
        "at `$.services[0].group`",
    ),
    (
        "more capped groups than a card keeps totals for",
        HEADER
        + "".join(service(f"s{n}", "per_use", "standard = 1", f'group = "g{n}"\n') for n in range(CAP_GROUPS_MAX + 1))
        + "".join(f'[[caps]]\ngroup = "g{n}"\ndaily_cents = 100\n' for n in range(CAP_GROUPS_MAX + 1)),
        f"length <= {CAP_GROUPS_MAX} - at `$.caps`",
    ),
    (
        "duplicate service",
        VALID + BUS,
        "duplicate service code 'bus' (first at `$.services[0]`) - at `$.services[3].code`",
    ),
    (
        "transfer to nowhere",
        VALID + '[transfer]\nservices = ["tram"]\n',
        "unknown service 'tram' - at `$.transfer.services[0]`",
    ),
    (
        "transfer at a library",
        VALID + '[transfer]\nservices = ["bus", "library"]\n',
        "transfers apply to per_use services; 'library' is identification - at `$.transfer.services[1]`",
    ),
    ("transfer default needs a bus", HEADER + LIBRARY + "[transfer]\n", "unknown service 'bus'"),
    (
        "free and discounted",
        VALID + '[transfer]\nfare = "free"\ndiscount_percent = 50\n',
        'give fare = "free" or discount_percent, not both - at `$.transfer`',
    ),
    ("discount over 100", VALID + "[transfer]\ndiscount_percent = 101\n", "at `$.transfer.discount_percent`"),
    ("fare not free", VALID + '[transfer]\nfare = "half"\n', "Invalid enum value 'half' - at `$.transfer.fare`"),
    ("window of a day", VALID + "[transfer]\nwindow_minutes = 1440\n", "<= 240 - at `$.transfer.window_minutes`"),
    ("duplicate transfer service", VALID + '[transfer]\nservices = ["bus", "bus"]\n', "service 'bus' is listed twice"),
    (
        "cap on an unknown group",
        VALID + '[[caps]]\ngroup = "trams"\ndaily_cents = 300\n',
        "unknown service group 'trams' (known: bus, library, parking) - at `$.caps[0].group`",
    ),
    (
        "cap of nothing",
        VALID + '[[caps]]\ngroup = "bus"\n',
        "a cap needs daily_cents, monthly_cents or both - at `$.caps[0]`",
    ),
    (
        "daily above monthly",
        VALID + '[[caps]]\ngroup = "bus"\ndaily_cents = 500\nmonthly_cents = 400\n',
        "daily_cents 500 is above monthly_cents 400",
    ),
    (
        "two caps for a group",
        VALID + '[[caps]]\ngroup = "bus"\ndaily_cents = 300\n[[caps]]\ngroup = "bus"\nmonthly_cents = 4000\n',
        "a second cap for group 'bus' (first at `$.caps[0]`) - at `$.caps[1].group`",
    ),
    (
        "season without days",
        VALID + '[[products]]\ncode = "month"\nkind = "season"\ngroup = "bus"\nprice_cents = 3000\nrides = 10\n',
        "a season product needs days and no rides - at `$.products[0]`",
    ),
    (
        "multi-ride with days",
        VALID + '[[products]]\ncode = "ten"\nkind = "multi_ride"\ngroup = "bus"\nprice_cents = 800\ndays = 30\n',
        "a multi_ride product needs rides and no days",
    ),
    (
        "product for an unknown group",
        VALID + '[[products]]\ncode = "ten"\nkind = "multi_ride"\ngroup = "pools"\nprice_cents = 800\nrides = 10\n',
        "unknown service group 'pools' (known: bus, library, parking) - at `$.products[0].group`",
    ),
    (
        "duplicate product",
        VALID
        + '[[products]]\ncode = "ten"\nkind = "multi_ride"\ngroup = "bus"\nprice_cents = 800\nrides = 10\n'
        + '[[products]]\ncode = "ten"\nkind = "season"\ngroup = "bus"\nprice_cents = 3000\ndays = 30\n',
        "duplicate product code 'ten' (first at `$.products[0]`) - at `$.products[1].code`",
    ),
    (
        "product for nobody",
        VALID
        + '[[products]]\ncode = "t"\nkind = "multi_ride"\ngroup = "bus"\nprice_cents = 8\nrides = 1\nprofiles = []\n',
        "length >= 1 - at `$.products[0].profiles`",
    ),
    (
        "show ID beyond always",
        VALID + "[concessions]\nshow_id_permille = 1001\n",
        "at `$.concessions.show_id_permille`",
    ),
    ("renewal years ahead", VALID + "[concessions]\nrenewal_window_days = 400\n", "<= 365"),
    ("standing still is not sharing", VALID + "[security]\nsharing_max_speed_kmh = 0\n", ">= 1"),
    ("a string for a bool", VALID + '[security]\nclone_blocks_card = "yes"\n', "Expected `bool`, got `str`"),
]


@pytest.mark.parametrize(("document", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_documents_say_what_and_where(document: str, expected: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(document)
    assert expected in str(raised.value)


def test_defaults_of_a_small_document() -> None:
    rules = parse_rules(VALID + "[transfer]\n")
    assert (rules.version, rules.name) == (1, "test")
    bus = rules.service("bus")
    assert (bus.kind, bus.service_kind, bus.group) == ("per_use", ServiceKind.PER_USE, "bus")
    assert (bus.min_balance_to_enter_cents, bus.tolerated_negative_cents, bus.passback_window_s) == (0, 0, 0)
    assert rules.service("parking").service_kind == ServiceKind.PER_DURATION
    assert rules.transfer is not None
    assert (rules.transfer.window_minutes, rules.transfer.services, rules.transfer.fare) == (45, ("bus",), "free")
    assert rules.transfer.percent_off == 100
    assert (rules.caps, rules.products) == ((), ())
    assert rules.concessions.renewal_window_days == 30
    assert rules.concessions.standard_profile == "standard"
    assert rules.security.clone_blocks_card is True
    assert (rules.security.sharing_max_speed_kmh, rules.security.sharing_min_distance_m) == (120, 500)
    assert rules.fare("bus", "student") == 50
    assert rules.fare("library", "student") is None
    with pytest.raises(KeyError, match="no service 'tram'"):
        rules.fare("tram", "standard")
    assert parse_rules(VALID).transfer is None
    assert parse_rules(EXAMPLE).fare("bus", "student") == 50


def test_a_discounted_transfer_and_shared_groups() -> None:
    rules = parse_rules(
        HEADER
        + service("bus", "per_use", "standard = 100", 'group = "transit"\n')
        + service("tram", "per_use", "standard = 150", 'group = "transit"\n')
        + '[transfer]\nservices = ["bus", "tram"]\ndiscount_percent = 50\n'
        + '[[caps]]\ngroup = "transit"\ndaily_cents = 500\n'
    )
    assert rules.transfer is not None and rules.transfer.percent_off == 50 and rules.transfer.fare is None
    assert rules.groups() == {"transit"}


# The demo city's fares (cents) by profile, in the order of engine.seed.PROFILES;
# None: not served. The seed and every test built on it rely on these figures.
PROFILE_CODES = ("standard", "student", "young", "pensioner", "unemployed", "large_family", "disability", "child")
FREE = (0,) * 8
NO = None
GIJON_FARES: dict[str, tuple[int | None, ...]] = {
    "bus": (100, 50, 60, 30, 30, 60, 30, 0),
    "library_access": FREE,
    "library_loans": FREE,
    "pools": (400, 250, 250, 200, 150, 250, 150, 150),
    "sports_centres": (350, 220, 220, 180, 120, 220, 120, 120),
    "sports_courts": (600, 400, 400, 300, 300, 400, 300, 300),
    "parking": (150, 150, 150, 150, 150, 150, 75, NO),
    "street_parking": (120, 120, 120, 120, 120, 120, 0, NO),
    "bikes": (50, 25, 25, 25, 25, 25, 25, NO),
    "museums": (250, 120, 120, 120, 0, 120, 0, 0),
    "botanic_garden": (300, 150, 150, 150, 0, 150, 0, 0),
    "civic_centres": FREE,
    "courses": FREE,
    "play_rooms": (NO, NO, NO, NO, NO, NO, NO, 0),
    "senior_centres": (NO, NO, NO, 0, NO, NO, NO, NO),
    "recycling_points": FREE,
    "telecentres": FREE,
    "register_office": FREE,
    "kiosks": FREE,
    "atms": FREE,
}  # fmt: skip


def test_the_demo_city_rules_file() -> None:
    rules = read_rules_file(RULES_FILE)
    assert rules.version == 1
    assert sorted(service.code for service in rules.services) == sorted(service.code for service in SERVICES)
    for code, fares in GIJON_FARES.items():
        assert tuple(rules.fare(code, profile) for profile in PROFILE_CODES) == fares, code
    kinds = {service.code: service.kind for service in rules.services}
    assert {code for code, kind in kinds.items() if kind == "per_duration"} == {"parking", "street_parking", "bikes"}
    for code in ("library_access", "civic_centres", "register_office", "kiosks", "atms"):
        assert kinds[code] == "identification", code
    for code in ("bus", "pools", "museums"):
        assert kinds[code] == "per_use", code
    assert rules.service("parking").max_charge_cents is not None
    assert rules.transfer is not None
    assert (rules.transfer.window_minutes, rules.transfer.services, rules.transfer.percent_off) == (45, ("bus",), 100)
    [cap] = rules.caps
    assert cap.group == "bus" and cap.daily_cents is not None and cap.monthly_cents is not None
    products = {product.code: product for product in rules.products}
    assert (products["bus_month"].kind, products["bus_month"].group, products["bus_month"].days) == (
        "season",
        "bus",
        30,
    )
    assert (products["pools_10"].kind, products["pools_10"].group, products["pools_10"].rides) == (
        "multi_ride",
        "pools",
        10,
    )
    assert (rules.concessions.renewal_window_days, rules.concessions.show_id_permille) == (30, 20)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(RulesError, match=f"{missing}: cannot read: No such file"):
        read_rules_file(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text(HEADER + "[[services]\n")
    with pytest.raises(RulesError, match=rf"{broken}: not valid TOML: .*line 4"):
        read_rules_file(broken)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[rules]\nname = "Gijón"\n'.encode("latin-1"))
    with pytest.raises(RulesError, match="not UTF-8"):
        read_rules_file(latin)


def test_the_document_round_trips() -> None:
    rules = read_rules_file(RULES_FILE)
    assert msgspec.json.decode(canonical_json(rules), type=Rules) == rules
    assert parse_rules(render_toml(rules)) == rules
    assert rules_sha256(parse_rules(render_toml(rules))) == rules_sha256(rules)
    tricky = msgspec.structs.replace(rules, rules=RulesHeader(version=2, name='"Gijón"\\ \t\x7f'))
    assert parse_rules(render_toml(tricky)) == tricky


# --- Loading into the database --------------------------------------------------------


def next_version(rules: Rules, version: int, **services: ServiceRules | None) -> Rules:
    """``rules`` as ``version``, with services replaced (or dropped when None) by code."""
    kept = [services.get(item.code, item) for item in rules.services]
    return msgspec.structs.replace(
        rules,
        rules=RulesHeader(version=version, name=f"{rules.name}, version {version}"),
        services=tuple(item for item in kept if item is not None),
    )


async def seeded_city(fresh_db: Callable[..., str]) -> asyncpg.Connection:
    conn = await connect(fresh_db())
    try:
        await seed_city(conn, CITY_CARDS)
    except BaseException:
        await conn.close()
        raise
    return conn


async def tariffs_by_code(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        "SELECT s.code, p.code, t.fare_cents FROM tariffs t"
        " JOIN services s ON s.id = t.service_id JOIN profiles p ON p.id = t.profile_id"
    )
    return {(row[0], row[1]): row[2] for row in rows}


def rules_tariffs(rules: Rules) -> dict[tuple[str, str], int]:
    return {(item.code, profile): fare for item in rules.services for profile, fare in item.fares.items()}


async def test_store_replaces_tariffs_and_kinds_and_is_audited(fresh_db: Callable[..., str]) -> None:
    conn = await seeded_city(fresh_db)
    try:
        first = read_rules_file(RULES_FILE)
        bus = first.service("bus")
        courts = first.service("sports_courts")
        second = next_version(
            first,
            2,
            bus=msgspec.structs.replace(bus, fares={"standard": 120, "pensioner": 40}),
            sports_courts=msgspec.structs.replace(courts, kind="per_duration", max_charge_cents=2400),
        )
        assert await store_rules(conn, second, actor="maria", source_name="gijon-2.toml") == 2

        assert await tariffs_by_code(conn) == rules_tariffs(second)
        assert ("bus", "student") not in await tariffs_by_code(conn)
        kinds = dict(await conn.fetch("SELECT code, kind FROM services"))
        assert kinds == {item.code: item.service_kind for item in second.services}
        assert kinds["sports_courts"] == ServiceKind.PER_DURATION

        row = await conn.fetchrow(
            "SELECT name, sha256, loaded_by, document = $1::jsonb AS same FROM rules_versions WHERE version = 2",
            canonical_json(second).decode(),
        )
        assert (row["name"], row["sha256"], row["loaded_by"], row["same"]) == (
            second.name,
            rules_sha256(second),
            "maria",
            True,
        )
        audit = await conn.fetch("SELECT actor, action, subject, detail FROM audit_log ORDER BY id")
        assert [(entry["actor"], entry["subject"]) for entry in audit] == [("seed", "rules:1"), ("maria", "rules:2")]
        assert audit[1]["action"] == "rules.load"
        assert json.loads(audit[1]["detail"]) == {
            "name": second.name,
            "sha256": rules_sha256(second),
            "source": "gijon-2.toml",
        }

        assert await current_rules(conn) == (2, second)
        assert await rules_version(conn, 1) == first
        stored = await stored_rules(conn, 1)
        assert stored is not None and (stored.loaded_by, stored.sha256) == ("seed", rules_sha256(first))
        with pytest.raises(RulesError, match="no rules version 7"):
            await rules_version(conn, 7)
    finally:
        await conn.close()


async def test_versions_only_grow(fresh_db: Callable[..., str]) -> None:
    conn = await seeded_city(fresh_db)
    try:
        first = read_rules_file(RULES_FILE)
        with pytest.raises(RulesError, match="version 1 is not newer than the current version 1"):
            await store_rules(conn, first, actor="maria", source_name="gijon.toml")
        assert await store_rules(conn, next_version(first, 5), actor="maria", source_name="x.toml") == 5
        with pytest.raises(RulesError, match="version 3 is not newer than the current version 5"):
            await store_rules(conn, next_version(first, 3), actor="maria", source_name="x.toml")
        assert [row[0] for row in await conn.fetch("SELECT version FROM rules_versions ORDER BY 1")] == [1, 5]
    finally:
        await conn.close()


async def test_unknown_codes_are_refused_and_nothing_is_applied(fresh_db: Callable[..., str]) -> None:
    conn = await seeded_city(fresh_db)
    try:
        first = read_rules_file(RULES_FILE)
        bus = first.service("bus")
        tram = msgspec.structs.replace(bus, code="tram", group="tram")
        refused = {
            "unknown service code 'tram'": msgspec.structs.replace(
                next_version(first, 2), services=(*first.services, tram)
            ),
            "unknown profile code 'retired'": next_version(
                first, 2, bus=msgspec.structs.replace(bus, fares={**bus.fares, "retired": 10})
            ),
            "services in the database without rules: atms - at `$.services`": next_version(first, 2, atms=None),
            "unknown profile code 'visitor'": msgspec.structs.replace(
                next_version(first, 2),
                concessions=msgspec.structs.replace(first.concessions, standard_profile="visitor"),
            ),
        }
        before = (
            await tariffs_by_code(conn),
            await conn.fetch("SELECT * FROM services ORDER BY id"),
            await conn.fetchval("SELECT count(*) FROM audit_log"),
        )
        for expected, rules in refused.items():
            with pytest.raises(RulesError, match=re.escape(expected)):
                await store_rules(conn, rules, actor="maria", source_name="bad.toml")
        after = (
            await tariffs_by_code(conn),
            await conn.fetch("SELECT * FROM services ORDER BY id"),
            await conn.fetchval("SELECT count(*) FROM audit_log"),
        )
        assert after == before
        assert await conn.fetchval("SELECT max(version) FROM rules_versions") == 1
        with pytest.raises(ValueError, match="actor must be 1 to 100 characters"):
            await store_rules(conn, next_version(first, 2), actor="", source_name="x.toml")
        with pytest.raises(RuntimeError, match="needs a transaction"):
            await write_rules(conn, next_version(first, 2), actor="maria", source_name="x.toml")
    finally:
        await conn.close()


async def test_engines_are_notified_at_commit_of_loaded_versions_only(fresh_db: Callable[..., str]) -> None:
    dsn = fresh_db()
    conn = await connect(dsn)
    listener = await connect(dsn)
    try:
        await seed_city(conn, CITY_CARDS)
        received: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener(RULES_CHANNEL, lambda _conn, _pid, _channel, payload: received.put_nowait(payload))
        first = read_rules_file(RULES_FILE)
        with pytest.raises(RulesError):
            await store_rules(conn, first, actor="maria", source_name="gijon.toml")  # refused: sends nothing
        async with conn.transaction():
            await write_rules(conn, next_version(first, 2), actor="maria", source_name="x.toml")
            await asyncio.sleep(0.2)
            assert received.empty()  # not before the commit
        assert await asyncio.wait_for(received.get(), NOTIFY_WAIT_S) == "2"
        await store_rules(conn, next_version(first, 3), actor="maria", source_name="x.toml")
        assert await asyncio.wait_for(received.get(), NOTIFY_WAIT_S) == "3"
    finally:
        await listener.close()
        await conn.close()


def test_no_rules_before_the_first_load(fresh_db: Callable[..., str]) -> None:
    async def check() -> None:
        conn = await connect(fresh_db())
        try:
            assert await current_rules(conn) is None
            assert await stored_rules(conn) is None
        finally:
            await conn.close()

    run_sync(check())


# --- citycard rules ---------------------------------------------------------------------


def rules_command(*args: str) -> int:
    parser = argparse.ArgumentParser(prog="citycard")
    add_rules_commands(parser.add_subparsers(dest="command", required=True))
    return run_rules_command(parser.parse_args(["rules", *args]))


def seeded_dsn_now(fresh_db: Callable[..., str]) -> str:
    async def seed(dsn: str) -> None:
        conn = await connect(dsn)
        try:
            await seed_city(conn, CITY_CARDS)
        finally:
            await conn.close()

    dsn = fresh_db()
    run_sync(seed(dsn))
    return dsn


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_command("check", str(RULES_FILE)) == 0
    rules = read_rules_file(RULES_FILE)
    assert json.loads(capsys.readouterr().out) == {"version": 1, "name": rules.name, "sha256": rules_sha256(rules)}
    bad = tmp_path / "bad.toml"
    bad.write_text(VALID + '[[caps]]\ngroup = "trams"\ndaily_cents = 1\n')
    assert rules_command("check", str(bad)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"citycard: error: {bad}: unknown service group 'trams'")
    assert "at `$.caps[0].group`" in error


def test_cli_load_and_show(fresh_db: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = seeded_dsn_now(fresh_db)
    first = read_rules_file(RULES_FILE)
    second = next_version(first, 2)
    newer = tmp_path / "gijon-2.toml"
    newer.write_text(render_toml(second))

    assert rules_command("load", str(RULES_FILE), "--actor", "maria", "--dsn", dsn) == 2
    assert "version 1 is not newer than the current version 1" in capsys.readouterr().err
    assert rules_command("load", str(newer), "--actor", "maria", "--dsn", dsn) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert rules_command("load", str(newer), "--actor", "", "--dsn", dsn) == 2
    assert "--actor must be 1 to 100 characters" in capsys.readouterr().err

    assert rules_command("show", "--dsn", dsn) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# rules version 2, loaded ")
    assert " by maria\n# sha256 " + rules_sha256(second) in shown
    assert parse_rules(shown) == second  # what show prints, load accepts

    assert rules_command("show", "--version", "1", "--json", "--dsn", dsn) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["loaded_by"], report["sha256"]) == (1, "seed", rules_sha256(first))
    assert msgspec.convert(report["document"], Rules) == first

    assert rules_command("show", "--version", "9", "--dsn", dsn) == 2
    assert "no rules version 9" in capsys.readouterr().err


def test_cli_show_without_rules(fresh_db: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    assert rules_command("show", "--dsn", fresh_db()) == 2
    assert "holds no rules yet" in capsys.readouterr().err
