"""The synthetic city: shape, determinism, a ledger that explains every balance,
tariffs from the rules file and an eligibility period for every concession."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest

from engine.codes import CardStatus, TerminalKind
from engine.db import connect
from engine.rules import read_rules_file, rules_sha256
from engine.seed import (
    ELIGIBILITY_SOURCES,
    FUNDING_ACCOUNT_ID,
    FUNDING_FLOOR_CENTS,
    OPENING_MAX_CENTS,
    PROFILES,
    REFERENCE_DATE,
    RULES_FILE,
    SERVICES,
    AlreadySeeded,
    list_terminals,
    sample_cards,
    seed_city,
    traffic_weights,
)

# The ~1% of blocked or lost cards is drawn at random: in a few thousand cards
# the share lands within a factor of three of it.
NOT_ACTIVE_SHARE_RANGE = (0.003, 0.03)

# The ~3% of concessions due for renewal, likewise, among ~1,800 concession
# holders of a 4,000-card city.
RENEWAL_DUE_SHARE_RANGE = (0.015, 0.05)


async def test_counts_match_the_city(seeded_dsn: str, seeded_cards: int) -> None:
    conn = await connect(seeded_dsn)
    try:
        count = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}")  # fixed table names
            for table in ("profiles", "services", "holders", "cards", "terminals", "tariffs")
        }
        kinds = dict(await conn.fetch("SELECT kind, count(*) FROM accounts GROUP BY kind"))
        funding = await conn.fetchrow("SELECT kind, name, floor_cents FROM accounts WHERE id = $1", FUNDING_ACCOUNT_ID)
        kiosks_without_funding = await conn.fetchval(
            "SELECT count(*) FROM terminals WHERE kind = 1 AND funding_account_id IS DISTINCT FROM $1",
            FUNDING_ACCOUNT_ID,
        )
        revenue_accounts = await conn.fetchval(
            "SELECT count(*) FROM services s JOIN accounts a ON a.id = s.revenue_account_id WHERE a.kind = 1"
        )
        cards_per_holder = await conn.fetchval("SELECT max(n) FROM (SELECT count(*) n FROM cards GROUP BY holder_id) x")
    finally:
        await conn.close()
    assert count["profiles"] == 8
    assert 18 <= count["services"] <= 22
    assert count["holders"] == count["cards"] == seeded_cards
    assert cards_per_holder == 1
    assert kinds == {0: seeded_cards, 1: count["services"], 2: 1}
    assert revenue_accounts == count["services"]
    assert (funding["kind"], funding["floor_cents"]) == (2, FUNDING_FLOOR_CENTS)
    assert kiosks_without_funding == 0
    assert count["terminals"] == sum(service.terminals for service in SERVICES)


async def test_terminals_follow_the_traffic(seeded_dsn: str) -> None:
    conn = await connect(seeded_dsn)
    try:
        terminals = await list_terminals(conn)
    finally:
        await conn.close()
    bus = [terminal for terminal in terminals if terminal.service_code == "bus"]
    kiosks = [terminal for terminal in terminals if terminal.kind == TerminalKind.KIOSK]
    assert 200 <= len(bus) <= 500
    assert all(terminal.kind == TerminalKind.VALIDATOR for terminal in bus)
    assert kiosks and all(terminal.funding_account_id == FUNDING_ACCOUNT_ID for terminal in kiosks)
    weights = traffic_weights()
    assert sum(weights.values()) == 1000
    assert 700 <= weights[0] <= 800  # the bus: about three quarters of uses


async def test_fixed_terminals_stand_in_gijon_and_buses_move(seeded_dsn: str) -> None:
    conn = await connect(seeded_dsn)
    try:
        rows = await conn.fetch(
            "SELECT s.code, t.latitude, t.longitude FROM terminals t JOIN services s ON s.id = t.service_id"
        )
    finally:
        await conn.close()
    located = [row for row in rows if row["latitude"] is not None]
    assert all(row["latitude"] is None and row["longitude"] is None for row in rows if row["code"] == "bus")
    assert len(located) == sum(1 for row in rows if row["code"] != "bus")
    assert all(43.50 <= row["latitude"] <= 43.56 and -5.72 <= row["longitude"] <= -5.60 for row in located)
    # Two gates per site: far fewer places than terminals, but more than one.
    places = {(row["latitude"], row["longitude"]) for row in located}
    assert 1 < len(places) <= len(located) // 2 + len({row["code"] for row in located})


async def test_tariffs_favour_concessions_and_children_ride_free(seeded_dsn: str) -> None:
    conn = await connect(seeded_dsn)
    try:
        fares = {
            (row["service"], row["profile"]): row["fare"]
            for row in await conn.fetch(
                "SELECT s.code AS service, p.code AS profile, t.fare_cents AS fare"
                " FROM tariffs t JOIN services s ON s.id = t.service_id JOIN profiles p ON p.id = t.profile_id"
            )
        }
    finally:
        await conn.close()
    assert fares[("bus", "child")] == 0
    assert fares[("bus", "standard")] > fares[("bus", "pensioner")] > 0
    for (service, profile), fare in fares.items():
        standard = fares.get((service, "standard"))
        if standard is not None:
            assert fare <= standard, (service, profile)
    assert all(fares[("library_access", profile.code)] == 0 for profile in PROFILES)
    assert ("parking", "child") not in fares  # not served: SERVICE_NOT_ALLOWED


async def test_the_ledger_explains_every_balance(seeded_dsn: str) -> None:
    conn = await connect(seeded_dsn)
    try:
        unbalanced = await conn.fetchval(
            "SELECT count(*) FROM (SELECT transfer_id FROM ledger_entries GROUP BY transfer_id"
            " HAVING sum(amount_cents) <> 0) x"
        )
        total = await conn.fetchval("SELECT coalesce(sum(amount_cents), 0) FROM ledger_entries")
        mismatched = await conn.fetchval(
            "SELECT count(*) FROM accounts a"
            " LEFT JOIN (SELECT account_id, sum(amount_cents) AS s FROM ledger_entries GROUP BY account_id) e"
            " ON e.account_id = a.id WHERE a.balance_cents <> coalesce(e.s, 0)"
        )
        transfers = await conn.fetch("SELECT id, kind, batch_id FROM ledger_transfers")
        low, high = await conn.fetchrow("SELECT min(balance_cents), max(balance_cents) FROM accounts WHERE kind = 0")
        funding = await conn.fetchval("SELECT balance_cents FROM accounts WHERE id = $1", FUNDING_ACCOUNT_ID)
        cards_total = await conn.fetchval("SELECT sum(balance_cents) FROM accounts WHERE kind = 0")
    finally:
        await conn.close()
    assert unbalanced == 0
    assert total == 0
    assert mismatched == 0
    assert [(row["id"], row["kind"], row["batch_id"]) for row in transfers] == [(1, 3, None)]
    assert 0 <= low and high <= OPENING_MAX_CENTS
    assert funding == -cards_total < 0


async def test_profile_mix_and_card_shapes(fresh_db: Callable[..., str]) -> None:
    cards = 4000
    conn = await connect(fresh_db())
    try:
        summary = await seed_city(conn, cards)
        by_profile = dict(
            await conn.fetch(
                "SELECT h.profile_id, count(*) FROM cards c JOIN holders h ON h.id = c.holder_id GROUP BY 1"
            )
        )
        uids = [row[0] for row in await conn.fetch("SELECT uid FROM cards")]
        not_active = await conn.fetchval("SELECT count(*) FROM cards WHERE status <> 0")
        statuses = {row[0] for row in await conn.fetch("SELECT DISTINCT status FROM cards")}
        child_ages = await conn.fetchrow(
            "SELECT min(age(DATE '2026-01-01', birth_date)), max(age(DATE '2026-01-01', birth_date))"
            " FROM holders WHERE profile_id = 7"
        )
    finally:
        await conn.close()
    for profile in PROFILES:
        assert abs(by_profile[profile.id] / cards - profile.share) < 0.005, profile.code
    assert summary.cards_by_profile == tuple(by_profile[profile.id] for profile in PROFILES)
    assert len(set(uids)) == cards
    assert all(uid >> 48 == 0x04 for uid in uids)  # 7 bytes, NXP manufacturer byte first
    low, high = NOT_ACTIVE_SHARE_RANGE
    assert low <= not_active / cards <= high
    assert summary.cards_not_active == not_active
    assert statuses <= {CardStatus.ACTIVE, CardStatus.BLOCKED, CardStatus.LOST}
    assert child_ages[0].days >= 4 * 365 and child_ages[1].days < 12 * 366


async def _fingerprint(dsn: str) -> list[tuple[object, ...]]:
    conn = await connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT c.uid, c.holder_id, c.account_id, c.status, h.profile_id, h.birth_date, a.balance_cents"
            " FROM cards c JOIN holders h ON h.id = c.holder_id JOIN accounts a ON a.id = c.account_id"
            " ORDER BY c.holder_id"
        )
    finally:
        await conn.close()
    return [tuple(row) for row in rows]


async def _seed(dsn: str, cards: int, seed: int) -> object:
    conn = await connect(dsn)
    try:
        return await seed_city(conn, cards, seed=seed)
    finally:
        await conn.close()


async def test_the_same_seed_builds_the_same_city(fresh_db: Callable[..., str]) -> None:
    first, second, other = fresh_db(), fresh_db(), fresh_db()
    assert await _seed(first, 500, 7) == await _seed(second, 500, 7)
    await _seed(other, 500, 8)
    assert await _fingerprint(first) == await _fingerprint(second)
    first_uids = {row[0] for row in await _fingerprint(first)}
    other_uids = {row[0] for row in await _fingerprint(other)}
    assert not first_uids & other_uids


async def test_seeding_twice_is_refused(seeded_dsn: str, seeded_cards: int) -> None:
    conn = await connect(seeded_dsn)
    try:
        with pytest.raises(AlreadySeeded):
            await seed_city(conn, 10)
        assert await conn.fetchval("SELECT count(*) FROM cards") == seeded_cards
    finally:
        await conn.close()


async def test_sample_cards_is_repeatable(seeded_dsn: str, seeded_cards: int) -> None:
    conn = await connect(seeded_dsn)
    try:
        sample = await sample_cards(conn, 20)
        again = await sample_cards(conn, 20)
        other = await sample_cards(conn, 20, seed=1)
        everything = await sample_cards(conn, 10 * seeded_cards, active_only=False)
    finally:
        await conn.close()
    assert sample == again
    assert sample != other
    assert len({card.uid for card in sample}) == 20
    assert all(card.status == CardStatus.ACTIVE for card in sample)
    assert len(everything) == seeded_cards


async def test_tariffs_and_kinds_come_from_the_rules_file(seeded_dsn: str) -> None:
    rules = read_rules_file(RULES_FILE)
    conn = await connect(seeded_dsn)
    try:
        fares = {
            (row[0], row[1]): row[2]
            for row in await conn.fetch(
                "SELECT s.code, p.code, t.fare_cents FROM tariffs t"
                " JOIN services s ON s.id = t.service_id JOIN profiles p ON p.id = t.profile_id"
            )
        }
        kinds = dict(await conn.fetch("SELECT code, kind FROM services"))
        stored = await conn.fetch("SELECT version, sha256, loaded_by FROM rules_versions")
        audit = await conn.fetch("SELECT actor, action, subject FROM audit_log")
    finally:
        await conn.close()
    assert fares == {(item.code, profile): fare for item in rules.services for profile, fare in item.fares.items()}
    assert kinds == {item.code: item.service_kind for item in rules.services}
    assert [tuple(row) for row in stored] == [(1, rules_sha256(rules), "seed")]
    assert [tuple(row) for row in audit] == [("seed", "rules.load", "rules:1")]


async def test_every_concession_holder_is_eligible_for_a_while(fresh_db: Callable[..., str]) -> None:
    cards = 4000
    rules = read_rules_file(RULES_FILE)
    conn = await connect(fresh_db())
    try:
        summary = await seed_city(conn, cards)
        rows = await conn.fetch(
            "SELECT h.profile_id AS holder_profile, e.profile_id, e.source, e.valid_from, e.valid_until"
            " FROM holders h LEFT JOIN eligibility e ON e.holder_id = h.id"
        )
    finally:
        await conn.close()
    code_of = {profile.id: profile.code for profile in PROFILES}
    standard = [row for row in rows if code_of[row["holder_profile"]] == "standard"]
    concessions = [row for row in rows if code_of[row["holder_profile"]] != "standard"]
    assert all(row["profile_id"] is None for row in standard)
    assert concessions and all(row["profile_id"] == row["holder_profile"] for row in concessions)
    assert {code_of[row["profile_id"]]: row["source"] for row in concessions} == ELIGIBILITY_SOURCES
    assert all(row["valid_from"] < REFERENCE_DATE < row["valid_until"] for row in concessions)
    window_end = REFERENCE_DATE + datetime.timedelta(days=rules.concessions.renewal_window_days)
    due = sum(1 for row in concessions if row["valid_until"] <= window_end)
    low, high = RENEWAL_DUE_SHARE_RANGE
    assert low <= due / len(concessions) <= high
    assert (summary.eligibility, summary.renewal_due, summary.rules_version) == (len(concessions), due, 1)


async def test_some_holders_hold_current_passes_and_unused_tickets(seeded_dsn: str, seeded_cards: int) -> None:
    conn = await connect(seeded_dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.product_code, p.kind, p.valid_from, p.valid_until, p.rides, p.rides_used, c.status,"
            " c.account_id = p.account_id AS own_account"
            " FROM card_products p JOIN cards c ON c.uid = p.sold_to_card"
        )
    finally:
        await conn.close()
    rules = read_rules_file(RULES_FILE)
    today = datetime.datetime.now(datetime.UTC).date()
    by_code = {product.code: product for product in rules.products}
    for product in rules.products:
        held = [row for row in rows if row["product_code"] == product.code]
        # PRODUCT_HOLDER_SHARE (4%) of the entitled holders, within a factor of three.
        assert 0.013 * seeded_cards <= len(held) <= 0.12 * seeded_cards, product.code
    for row in rows:
        product = by_code[row["product_code"]]
        assert row["own_account"] and row["status"] == CardStatus.ACTIVE
        if product.kind == "season":
            assert row["valid_from"] <= today <= row["valid_until"]
            assert (row["valid_until"] - row["valid_from"]).days == (product.days or 1) - 1
        else:
            assert (row["rides"], row["rides_used"]) == (product.rides, 0)
