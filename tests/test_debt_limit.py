"""A card's debt limit, set at the card office: a real engine with its admin
listener, a real database, offline taps uploaded over TCP.

The limit says how far below its floor offline taps that stand may take a
card account (docs/offline.md). A change must reach the very next upload's
decision without a restart, be audited, and never let memory allow more
than the database: a limit below what the account owes is refused, and
while a change commits memory holds the smaller of the two limits.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import asyncpg.transaction
import pytest

from engine import admin as engine_admin
from engine.client import TerminalClient
from engine.codes import ResultCode
from engine.limits import DEBT_LIMIT_MAX_CENTS, OFFLINE_DEBT_LIMIT_CENTS
from engine.state import CityState, refresh_cards
from tests.city import (
    BUS_FARE,
    KIOSK_SERVICE,
    EngineUnderTest,
    add_card,
    balance_of,
    check_books,
    load_city_rules,
    running_engine,
)
from tests.test_admin import OPERATOR, Office, admin_requests, audit_rows, fresh_seq, run_citycard

APPROVED = ResultCode.APPROVED


@pytest.fixture
async def rules_version(conn: asyncpg.Connection) -> int:
    """A rules version for the validators' offline taps, loaded once into this module's database."""
    loaded = await conn.fetchval("SELECT max(version) FROM rules_versions")
    if loaded is not None:
        return int(loaded)
    return await load_city_rules(conn)


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path, rules_version: int) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path, admin_port=0) as under_test:
        yield under_test


@pytest.fixture
async def office(engine: EngineUnderTest) -> AsyncIterator[Office]:
    async with aiohttp.ClientSession() as http:
        yield Office(http, engine)


def held_state(engine: EngineUnderTest) -> CityState:
    assert engine.engine is not None and engine.engine.state is not None
    return engine.engine.state


async def upload(bus: TerminalClient, uid: int, rules_version: int) -> tuple[int, int, int]:
    """One bus fare the validator charged offline a minute ago: (result, amount charged, balance after)."""
    when = int(time.time() * 1000) - 60_000
    [result] = await bus.upload_offline([(fresh_seq(), uid, 0, when, 0, rules_version, APPROVED, BUS_FARE)])
    return (int(result.result), result.amount_cents, result.balance_cents)


async def set_limit(office: Office, uid: int, cents: object) -> tuple[int, dict[str, Any]]:
    return await office.call("PUT", f"/v1/cards/{uid}/debt-limit", {"debt_limit_cents": cents})


async def limit_of(conn: asyncpg.Connection, account_id: int) -> int:
    return int(await conn.fetchval("SELECT debt_limit_cents FROM accounts WHERE id = $1", account_id))


async def test_lowering_and_raising_reach_the_very_next_upload(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection, rules_version: int
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    state = held_state(engine)
    account = state.account_position[card.account_id]
    assert state.debt_limit[account] == OFFLINE_DEBT_LIMIT_CENTS
    bus = await engine.client()

    status, lowered = await set_limit(office, card.uid, 100)
    assert status == 200, lowered
    assert lowered["uid"] == card.uid and isinstance(lowered["audit_id"], int)
    assert (
        lowered["account_id"],
        lowered["previous_debt_limit_cents"],
        lowered["debt_limit_cents"],
        lowered["outcome"],
    ) == (card.account_id, OFFLINE_DEBT_LIMIT_CENTS, 100, "changed")
    # The tap stands, charged down to the new limit only: 50 left uncollected.
    assert await upload(bus, card.uid, rules_version) == (APPROVED, 100, -100)

    status, raised = await set_limit(office, card.uid, 400)
    assert (status, raised["previous_debt_limit_cents"], raised["outcome"]) == (200, 100, "changed")
    assert await upload(bus, card.uid, rules_version) == (APPROVED, BUS_FARE, -250)
    assert await upload(bus, card.uid, rules_version) == (APPROVED, BUS_FARE, -400)
    assert await upload(bus, card.uid, rules_version) == (APPROVED, 0, -400)  # uncollected
    assert await balance_of(conn, card.account_id) == -400
    assert (await limit_of(conn, card.account_id), state.debt_limit[account]) == (400, 400)

    # Idempotent: the same limit again changes nothing, and is audited all the same.
    status, again = await set_limit(office, card.uid, 400)
    assert (status, again["previous_debt_limit_cents"], again["outcome"]) == (200, 400, "unchanged")

    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert (status, shown["balance_cents"], shown["debt_limit_cents"]) == (200, -400, 400)

    rows = await audit_rows(conn, f"card:{card.uid}")
    assert [(row["actor"], row["action"]) for row in rows] == [(OPERATOR, "card.debt_limit")] * 3 + [
        (OPERATOR, "card.show")
    ]
    details = [json.loads(row["detail"]) for row in rows[:3]]
    assert [(d["previous_debt_limit_cents"], d["debt_limit_cents"], d["outcome"]) for d in details] == [
        (OFFLINE_DEBT_LIMIT_CENTS, 100, "changed"),
        (100, 400, "changed"),
        (400, 400, "unchanged"),
    ]
    audit_ids = await conn.fetch(
        "SELECT id FROM audit_log WHERE subject = $1 AND action = 'card.debt_limit' ORDER BY id", f"card:{card.uid}"
    )
    assert [row["id"] for row in audit_ids] == [lowered["audit_id"], raised["audit_id"], again["audit_id"]]
    assert admin_requests(engine, "card.debt_limit", "ok") == 3
    await check_books(conn)


async def test_a_limit_below_the_debt_is_refused_and_changes_nothing(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection, rules_version: int
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    state = held_state(engine)
    account = state.account_position[card.account_id]
    bus = await engine.client()
    assert await upload(bus, card.uid, rules_version) == (APPROVED, BUS_FARE, -BUS_FARE)

    status, refused = await set_limit(office, card.uid, BUS_FARE - 1)
    assert (status, refused["code"]) == (409, "in_debt")
    assert f"owes {BUS_FARE} cents below its floor" in refused["error"]
    # Debits decided and not yet committed count too: they are what a
    # pending batch will take from the balance.
    state.pending_debit[account] += 100
    try:
        status, refused = await set_limit(office, card.uid, BUS_FARE)
    finally:
        state.pending_debit[account] -= 100
    assert (status, refused["code"]) == (409, "in_debt")
    assert f"owes {BUS_FARE + 100} cents" in refused["error"]

    assert (await limit_of(conn, card.account_id), state.debt_limit[account]) == (OFFLINE_DEBT_LIMIT_CENTS,) * 2
    assert await audit_rows(conn, f"card:{card.uid}") == []
    assert admin_requests(engine, "card.debt_limit", "conflict") == 2

    # Down to exactly what it owes: no further offline tap is collected.
    status, changed = await set_limit(office, card.uid, BUS_FARE)
    assert (status, changed["outcome"]) == (200, "changed")
    assert await upload(bus, card.uid, rules_version) == (APPROVED, 0, -BUS_FARE)
    assert await balance_of(conn, card.account_id) == -BUS_FARE
    await check_books(conn)


async def test_memory_holds_the_smaller_limit_while_a_change_commits(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    state = held_state(engine)
    account = state.account_position[card.account_id]

    # What memory allows while the change is in its transaction (at its audit row),
    # and faults to inject there or at the commit.
    during: list[int] = []
    failures: list[BaseException] = []
    lose_commit: list[bool] = []
    lost_commits: list[bool] = []
    real_audit = engine_admin._audit
    real_exit = asyncpg.transaction.Transaction.__aexit__

    async def watched_audit(conn: asyncpg.Connection, *args: Any) -> int:
        during.append(state.debt_limit[account])
        if failures:
            raise failures.pop()
        audit_id = await real_audit(conn, *args)
        lost_commits.extend(lose_commit)  # the very next transaction to end is this one
        lose_commit.clear()
        return audit_id

    async def exit_losing_the_commit(transaction: Any, extype: Any, ex: Any, tb: Any) -> None:
        lose = extype is None and bool(lost_commits) and lost_commits.pop()
        await real_exit(transaction, extype, ex, tb)
        if lose:
            raise ConnectionResetError("connection lost after COMMIT")

    monkeypatch.setattr(engine_admin, "_audit", watched_audit)
    monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", exit_losing_the_commit)

    # Lowered before its commit, raised only after.
    assert (await set_limit(office, card.uid, 500))[0] == 200
    assert (during[-1], state.debt_limit[account]) == (500, 500)
    assert (await set_limit(office, card.uid, 900))[0] == 200
    assert (during[-1], state.debt_limit[account]) == (500, 900)

    # A transaction that fails gives memory its old limit back.
    for target in (300, 1200):
        failures.append(OSError("connection reset"))
        status, answer = await set_limit(office, card.uid, target)
        assert (status, answer["code"]) == (503, "database_unavailable")
        assert (during[-1], state.debt_limit[account]) == (min(900, target), 900)
        assert await limit_of(conn, card.account_id) == 900

    # A commit whose outcome is unknown (here it happened) keeps the smaller limit.
    lose_commit.append(True)
    assert (await set_limit(office, card.uid, 200))[0] == 503
    assert (await limit_of(conn, card.account_id), state.debt_limit[account]) == (200, 200)
    lose_commit.append(True)
    assert (await set_limit(office, card.uid, 700))[0] == 503
    assert (await limit_of(conn, card.account_id), state.debt_limit[account]) == (700, 200)
    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert (status, shown["debt_limit_cents"]) == (200, 200)  # the limit taps are decided on
    # Repeating the request settles it.
    status, repeated = await set_limit(office, card.uid, 700)
    assert (status, repeated["outcome"], state.debt_limit[account]) == (200, "unchanged", 700)
    assert not lose_commit and not lost_commits


async def test_requests_refused_before_anything_changes(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    state = held_state(engine)
    account = state.account_position[card.account_id]
    path = f"/v1/cards/{card.uid}/debt-limit"
    malformed: list[dict[str, Any]] = [
        {"debt_limit_cents": -1},
        {"debt_limit_cents": DEBT_LIMIT_MAX_CENTS + 1},
        {"debt_limit_cents": 12.5},
        {"debt_limit_cents": "500"},
        {"debt_limit_cents": 500, "note": "x"},
        {},
    ]
    for body in malformed:
        status, answer = await office.call("PUT", path, body)
        assert (status, answer["code"]) == (400, "invalid_request"), body
    status, answer = await office.call("PUT", path, {"debt_limit_cents": DEBT_LIMIT_MAX_CENTS + 1})
    assert f"<= {DEBT_LIMIT_MAX_CENTS}" in answer["error"] and "debt_limit_cents" in answer["error"]
    status, answer = await set_limit(office, 12345, 500)
    assert (status, answer["code"]) == (404, "card_not_found")
    status, answer = await office.call("PUT", "/v1/cards/twelve/debt-limit", {"debt_limit_cents": 500})
    assert (status, answer["code"]) == (400, "invalid_path")
    status, answer = await office.call("POST", path, {"debt_limit_cents": 500})
    assert (status, answer["code"]) == (405, "method_not_allowed")
    for authorization in (None, f"Bearer {OPERATOR}:{'0' * 64}"):
        status, answer = await office.call("PUT", path, {"debt_limit_cents": 500}, authorization=authorization)
        assert (status, answer["code"]) == (401, "unauthorized")

    assert (await limit_of(conn, card.account_id), state.debt_limit[account]) == (OFFLINE_DEBT_LIMIT_CENTS,) * 2
    assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE subject = $1", f"card:{card.uid}") == 0
    assert admin_requests(engine, "card.debt_limit", "bad_request") == len(malformed) + 2
    assert admin_requests(engine, "card.debt_limit", "not_found") == 1
    assert admin_requests(engine, "card.debt_limit", "unauthorized") == 2

    # The largest limit is the schema's own bound.
    status, answer = await set_limit(office, card.uid, DEBT_LIMIT_MAX_CENTS)
    assert (status, answer["debt_limit_cents"], state.debt_limit[account]) == (200, *(DEBT_LIMIT_MAX_CENTS,) * 2)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(
            "UPDATE accounts SET debt_limit_cents = $2 WHERE id = $1", card.account_id, DEBT_LIMIT_MAX_CENTS + 1
        )


async def test_a_card_the_engine_does_not_hold_is_changed_for_its_next_start(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=0)  # after the engine loaded the city
    assert card.account_id not in held_state(engine).account_position
    status, answer = await set_limit(office, card.uid, 300)
    assert (status, answer["previous_debt_limit_cents"], answer["outcome"]) == (
        200,
        OFFLINE_DEBT_LIMIT_CENTS,
        "changed",
    )
    assert await limit_of(conn, card.account_id) == 300
    await engine.restart()
    state = held_state(engine)
    assert state.debt_limit[state.account_position[card.account_id]] == 300


async def test_an_account_read_in_while_its_limit_changes_gets_the_new_limit(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = await add_card(conn, balance=0)  # after the engine loaded the city
    state = held_state(engine)
    real_audit = engine_admin._audit

    async def audit_beside_an_import(admin_conn: asyncpg.Connection, *args: Any) -> int:
        # An eligibility import re-reads the holder's cards meanwhile
        # (engine.live), reading the limit committed so far.
        await refresh_cards(conn, state, uids=[card.uid])
        return await real_audit(admin_conn, *args)

    monkeypatch.setattr(engine_admin, "_audit", audit_beside_an_import)
    status, answer = await set_limit(office, card.uid, 300)
    assert (status, answer["outcome"]) == (200, "changed")
    assert state.debt_limit[state.account_position[card.account_id]] == 300


async def test_a_card_paying_from_another_kind_of_account_has_no_debt_limit(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=0)
    revenue = int(await conn.fetchval("SELECT revenue_account_id FROM services WHERE id = $1", KIOSK_SERVICE))
    await conn.execute("UPDATE cards SET account_id = $2 WHERE uid = $1", card.uid, revenue)
    await engine.restart()
    state = held_state(engine)
    status, answer = await set_limit(office, card.uid, 0)
    assert (status, answer["code"]) == (409, "not_a_card_account")
    assert (await limit_of(conn, revenue), state.debt_limit[state.account_position[revenue]]) == (
        OFFLINE_DEBT_LIMIT_CENTS,
        0,
    )
    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert (status, shown["debt_limit_cents"]) == (200, 0)


async def test_the_debt_limit_command(
    engine: EngineUnderTest,
    conn: asyncpg.Connection,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rules_version: int,
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    state = held_state(engine)
    account = state.account_position[card.account_id]
    common = ["--admin-url", engine.admin_url, "--operator", "desk-3", "--data-dir", str(tmp_path)]

    async def citycard(*argv: str) -> tuple[int, str, str]:
        return await run_citycard(capsys, *argv)

    status, out, _ = await citycard("card", "debt-limit", hex(card.uid), "300", *common)
    assert status == 0
    answer = json.loads(out)
    assert (answer["previous_debt_limit_cents"], answer["debt_limit_cents"], answer["outcome"]) == (
        OFFLINE_DEBT_LIMIT_CENTS,
        300,
        "changed",
    )
    assert state.debt_limit[account] == 300
    status, out, _ = await citycard("card", "show", str(card.uid), *common)
    assert (status, json.loads(out)["debt_limit_cents"]) == (0, 300)

    bus = await engine.client()
    assert await upload(bus, card.uid, rules_version) == (APPROVED, BUS_FARE, -BUS_FARE)
    status, _, err = await citycard("card", "debt-limit", str(card.uid), "100", *common)
    assert status == 3 and f"owes {BUS_FARE} cents" in err and "409 in_debt" in err
    status, _, err = await citycard("card", "debt-limit", str(card.uid), str(DEBT_LIMIT_MAX_CENTS + 1), *common)
    assert status == 3 and "400 invalid_request" in err
    assert state.debt_limit[account] == 300

    rows = await audit_rows(conn, f"card:{card.uid}")
    assert [(row["actor"], row["action"]) for row in rows] == [("desk-3", "card.debt_limit"), ("desk-3", "card.show")]
