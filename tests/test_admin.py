"""The card office's interface: a real engine with its admin listener, a real
database, taps over TCP. Every change must be audited and seen by the very
next tap, without a restart."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine import admin as engine_admin
from engine.cli import build_parser
from engine.codes import CardStatus, ResultCode
from engine.db import connect
from engine.keys import derive_operator_token, load_master_key
from engine.limits import ADMIN_BODY_MAX_BYTES, ADMIN_REFRESH_RETRY_S
from engine.state import day_number, refresh_cards
from tests.city import (
    BUS_FARE,
    KIOSK,
    STUDENT,
    EngineUnderTest,
    add_card,
    balance_of,
    check_books,
    create_city,
    running_engine,
    wait_for,
)

OPERATOR = "ana.garcia"

# The card office's promise: a block reaches the next tap within this.
BLOCK_EFFECTIVE_S = 1.0


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path, admin_port=0) as under_test:
        yield under_test


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def fresh_seq() -> int:
    """Sequences above anything earlier tests used on the shared terminals."""
    return time.time_ns() // 1000


async def run_citycard(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``citycard ARGV`` in a thread (it blocks on the admin interface the
    engine serves on this loop): exit status, stdout, stderr."""
    args = build_parser().parse_args(list(argv))
    status = await asyncio.to_thread(args.handler, args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Office:
    """An operator at the card office, speaking HTTP to the engine under test."""

    def __init__(self, http: aiohttp.ClientSession, engine: EngineUnderTest, operator: str = OPERATOR) -> None:
        self.http = http
        self.engine = engine
        self.operator = operator
        self.token = derive_operator_token(load_master_key(engine.data_dir), operator)

    @property
    def authorization(self) -> str:
        return f"Bearer {self.operator}:{self.token}"

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        data: bytes | None = None,
        authorization: str | None = "",
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer); ``authorization=None`` sends no header."""
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization or self.authorization
        async with self.http.request(
            method, self.engine.admin_url + path, json=body, data=data, headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)


async def audit_rows(conn: asyncpg.Connection, subject: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT actor, action, subject, detail::text AS detail FROM audit_log WHERE subject = $1 ORDER BY id", subject
    )


def admin_requests(engine: EngineUnderTest, operation: str, outcome: str) -> float:
    assert engine.engine is not None
    value = engine.engine.metrics.registry.get_sample_value(
        "citycard_admin_requests_total", {"operation": operation, "outcome": outcome}
    )
    return value or 0.0


# --- authentication ----------------------------------------------------------------------


async def test_requests_need_an_operator_token(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    card = await add_card(conn, balance=300)
    await engine.restart()
    office = Office(http, engine)
    path = f"/v1/cards/{card.uid}"
    someone_else = derive_operator_token(load_master_key(engine.data_dir), "someone.else")
    refused = [
        None,  # no header at all
        "Basic YW5hOmFuYQ==",
        f"Bearer {OPERATOR}",
        f"Bearer {OPERATOR}:{'0' * 64}",
        f"Bearer {OPERATOR}:{someone_else}",
        f"Bearer not a name:{office.token}",
    ]
    for authorization in refused:
        status, answer = await office.call("GET", path, authorization=authorization)
        assert (status, answer["code"]) == (401, "unauthorized"), authorization
    assert admin_requests(engine, "card.show", "unauthorized") == len(refused)

    status, answer = await office.call("GET", path)
    assert status == 200
    assert (answer["uid"], answer["status"], answer["balance_cents"]) == (card.uid, "active", 300)
    assert admin_requests(engine, "card.show", "ok") == 1
    rows = await audit_rows(conn, f"card:{card.uid}")
    assert [(row["actor"], row["action"]) for row in rows] == [(OPERATOR, "card.show")]

    # No token, no map of the interface: an unknown path is 401 first, 404 after.
    assert (await office.call("GET", "/v1/nothing", authorization=None))[0] == 401
    status, answer = await office.call("GET", "/v1/nothing")
    assert (status, answer["code"]) == (404, "not_found")


async def test_no_admin_listener_unless_asked(city_dsn: str, tmp_path: Path) -> None:
    async with running_engine(city_dsn, tmp_path) as under_test:
        assert under_test.engine is not None and under_test.engine.admin_port is None


# --- block and unblock -------------------------------------------------------------------


async def test_block_reaches_the_next_tap_within_a_second(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    office = Office(http, engine)
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), card.uid)).result == ResultCode.APPROVED

    started = time.perf_counter()
    status, answer = await office.call("POST", f"/v1/cards/{card.uid}/block", {"reason": "lost"})
    declined = await bus.tap(fresh_seq(), card.uid)
    elapsed = time.perf_counter() - started
    assert (status, answer["status"], answer["outcome"]) == (200, "lost", "changed")
    assert declined.result == ResultCode.CARD_NOT_ACTIVE
    assert elapsed < BLOCK_EFFECTIVE_S, f"block took {elapsed:.3f} s to reach a tap"
    assert await conn.fetchval("SELECT status FROM cards WHERE uid = $1", card.uid) == CardStatus.LOST

    # Idempotent: the same request again changes nothing.
    status, answer = await office.call("POST", f"/v1/cards/{card.uid}/block", {"reason": "lost"})
    assert (status, answer["outcome"]) == (200, "unchanged")

    status, answer = await office.call("POST", f"/v1/cards/{card.uid}/unblock")
    assert (status, answer["status"], answer["previous_status"]) == (200, "active", "lost")
    again = await bus.tap(fresh_seq(), card.uid)
    assert (again.result, again.balance_cents) == (ResultCode.APPROVED, 1000 - 2 * BUS_FARE)
    status, answer = await office.call("POST", f"/v1/cards/{card.uid}/unblock")
    assert (status, answer["outcome"]) == (200, "unchanged")

    rows = await audit_rows(conn, f"card:{card.uid}")
    assert [(row["actor"], row["action"]) for row in rows] == [
        (OPERATOR, "card.block"),
        (OPERATOR, "card.block"),
        (OPERATOR, "card.unblock"),
        (OPERATOR, "card.unblock"),
    ]
    first = json.loads(rows[0]["detail"])
    assert (first["reason"], first["previous_status"], first["outcome"]) == ("lost", "active", "changed")
    await check_books(conn)


async def test_block_committed_during_a_database_fault_still_reaches_memory(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    failures = [OSError("connection reset while reading the card back")]

    async def flaky_refresh(*args: Any, **kwargs: Any) -> int:
        if failures:
            raise failures.pop()
        return await refresh_cards(*args, **kwargs)

    monkeypatch.setattr(engine_admin, "refresh_cards", flaky_refresh)
    office = Office(http, engine)
    status, answer = await office.call("POST", f"/v1/cards/{card.uid}/block", {"reason": "stolen"})
    assert (status, answer["code"]) == (503, "not_yet_effective")
    assert await conn.fetchval("SELECT status FROM cards WHERE uid = $1", card.uid) == CardStatus.STOLEN
    assert engine.engine is not None and engine.engine.state is not None
    state = engine.engine.state
    position = state.card_position[card.uid]
    # The engine keeps re-reading the committed change until it lands.
    await wait_for(lambda: state.card_status[position] == CardStatus.STOLEN, timeout_s=5 * ADMIN_REFRESH_RETRY_S)
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), card.uid)).result == ResultCode.CARD_NOT_ACTIVE


# --- issue and top up ----------------------------------------------------------------------


async def test_issue_top_up_and_tap_without_restart(
    fresh_db: Callable[..., str], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # A database of its own: issuing allocates ids above the current ones,
    # which the shared database's add_card helper would collide with.
    dsn = fresh_db()
    conn = await connect(dsn)
    try:
        await create_city(conn)
        async with running_engine(dsn, tmp_path, admin_port=0) as engine:
            office = Office(http, engine)
            uid = 0x05_0000_0000_0001
            status, issued = await office.call(
                "POST", "/v1/cards", {"uid": uid, "profile": "student", "birth_date": "2006-04-01"}
            )
            assert status == 201, issued
            assert (issued["new_holder"], issued["new_account"], issued["profile"]) == (True, True, "student")
            assert await conn.fetchval("SELECT ceiling_cents FROM accounts WHERE id = $1", issued["account_id"]) > 0

            status, shown = await office.call("GET", f"/v1/cards/{uid}")
            assert (status, shown["status"], shown["balance_cents"], shown["birth_date"]) == (
                200,
                "active",
                0,
                "2006-04-01",
            )

            seq = fresh_seq()
            topup = {"amount_cents": 500, "terminal_id": KIOSK, "terminal_seq": seq}
            status, topped = await office.call("POST", f"/v1/cards/{uid}/topup", topup)
            assert status == 200, topped
            assert (topped["result"], topped["amount_cents"], topped["balance_cents"]) == ("APPROVED", 500, 500)
            # The reply came after the commit.
            assert await balance_of(conn, issued["account_id"]) == 500
            # A retry of the same (terminal, sequence) is answered, not applied again.
            status, retried = await office.call("POST", f"/v1/cards/{uid}/topup", topup)
            assert (status, retried["result"], retried["balance_cents"]) == (200, "APPROVED", 500)
            assert await balance_of(conn, issued["account_id"]) == 500

            # After a restart the retry is answered from the record, not applied again.
            await engine.restart()
            status, retried = await office.call("POST", f"/v1/cards/{uid}/topup", topup)
            assert (status, retried["result"], retried["balance_cents"]) == (200, "APPROVED", 500)
            assert await balance_of(conn, issued["account_id"]) == 500

            bus = await engine.client()
            ride = await bus.tap(fresh_seq(), uid)
            assert ride.result == ResultCode.APPROVED
            assert ride.balance_cents == 500 - ride.amount_cents

            # A second card for the same holder spends the same account.
            second = 0x05_0000_0000_0002
            status, more = await office.call("POST", "/v1/cards", {"uid": second, "holder_id": issued["holder_id"]})
            assert status == 201, more
            assert (more["new_holder"], more["new_account"], more["account_id"]) == (
                False,
                False,
                issued["account_id"],
            )
            other_ride = await bus.tap(fresh_seq(), second)
            assert (other_ride.result, other_ride.balance_cents) == (
                ResultCode.APPROVED,
                ride.balance_cents - other_ride.amount_cents,
            )

            status, refused = await office.call(
                "POST", f"/v1/cards/{uid}/topup", {**topup, "terminal_id": 1, "terminal_seq": fresh_seq()}
            )
            assert (status, refused["code"]) == (422, "not_a_kiosk")
            status, refused = await office.call("POST", "/v1/cards", {"uid": uid, "holder_id": issued["holder_id"]})
            assert (status, refused["code"]) == (409, "card_exists")
            status, refused = await office.call("POST", "/v1/cards", {"uid": 77, "profile": "astronaut"})
            assert (status, refused["code"]) == (422, "unknown_profile")
            status, refused = await office.call("POST", "/v1/cards", {"uid": 77})
            assert (status, refused["code"]) == (400, "invalid_request")

            actions = await conn.fetch("SELECT action, subject FROM audit_log ORDER BY id")
            assert [row["action"] for row in actions].count("card.issue") == 2
            assert [row["action"] for row in actions].count("card.topup") == 3
        await check_books(conn)
    finally:
        await conn.close()


# --- replace ------------------------------------------------------------------------------------


async def test_replacement_keeps_the_balance_and_retires_the_old_card(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    old = await add_card(conn, balance=1000)
    await engine.restart()
    office = Office(http, engine)
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), old.uid)).balance_cents == 1000 - BUS_FARE
    ledger_before = await conn.fetch(
        "SELECT transfer_id, account_id, amount_cents FROM ledger_entries ORDER BY transfer_id, account_id"
    )

    new_uid = old.uid + 0x10_0000_0000
    status, answer = await office.call("POST", f"/v1/cards/{old.uid}/replace", {"new_uid": new_uid})
    assert status == 201, answer
    assert (answer["status"], answer["new_uid"], answer["account_id"]) == ("replaced", new_uid, old.account_id)
    ledger_after = await conn.fetch(
        "SELECT transfer_id, account_id, amount_cents FROM ledger_entries ORDER BY transfer_id, account_id"
    )
    assert ledger_after == ledger_before  # no money moved

    ride = await bus.tap(fresh_seq(), new_uid)
    assert (ride.result, ride.balance_cents) == (ResultCode.APPROVED, 1000 - 2 * BUS_FARE)
    assert (await bus.tap(fresh_seq(), old.uid)).result == ResultCode.CARD_NOT_ACTIVE

    row = await conn.fetchrow("SELECT account_id, replaces_uid, status FROM cards WHERE uid = $1", new_uid)
    assert (row["account_id"], row["replaces_uid"], row["status"]) == (old.account_id, old.uid, CardStatus.ACTIVE)
    rows = await conn.fetch(
        "SELECT actor, subject, detail::text AS detail FROM audit_log WHERE action = 'card.replace'"
    )
    mine = [row for row in rows if json.loads(row["detail"])["new_uid"] == new_uid]
    assert len(mine) == 1
    assert (mine[0]["actor"], mine[0]["subject"]) == (OPERATOR, f"card:{old.uid}")

    status, answer = await office.call("POST", f"/v1/cards/{old.uid}/replace", {"new_uid": new_uid + 1})
    assert (status, answer["code"]) == (409, "already_replaced")
    # A replaced card stays retired: it cannot be blocked and then unblocked back to life.
    status, answer = await office.call("POST", f"/v1/cards/{old.uid}/unblock")
    assert (status, answer["code"]) == (409, "invalid_status")
    status, answer = await office.call("POST", f"/v1/cards/{old.uid}/block", {"reason": "stolen"})
    assert (status, answer["code"]) == (409, "invalid_status")
    status, shown = await office.call("GET", f"/v1/cards/{old.uid}")
    assert (shown["status"], shown["replaced_by"]) == ("replaced", new_uid)
    await check_books(conn)


# --- eligibility -------------------------------------------------------------------------------


async def test_eligibility_renewal_reaches_memory(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    ended = (datetime.date(2020, 9, 1), datetime.date(2021, 6, 30))
    card = await add_card(conn, balance=1000, profile=STUDENT, eligible=ended)
    holder_id = await conn.fetchval("SELECT holder_id FROM cards WHERE uid = $1", card.uid)
    await engine.restart()
    assert engine.engine is not None and engine.engine.state is not None
    state = engine.engine.state
    position = state.card_position[card.uid]
    assert (state.card_eligible_from[position], state.card_eligible_until[position]) == tuple(
        day_number(day) for day in ended
    )

    office = Office(http, engine)
    renewed = {"profile": "student", "source": "enrolment", "valid_from": "2025-09-01", "valid_until": "2099-06-30"}
    status, answer = await office.call("PUT", f"/v1/holders/{holder_id}/eligibility", renewed)
    assert status == 200, answer
    assert answer["previous"]["valid_until"] == "2021-06-30"
    assert state.card_eligible_from[position] == day_number(datetime.date(2025, 9, 1))
    assert state.card_eligible_until[position] == day_number(datetime.date(2099, 6, 30))
    row = await conn.fetchrow(
        "SELECT source, valid_from, valid_until FROM eligibility WHERE holder_id = $1 AND profile_id = $2",
        holder_id,
        STUDENT,
    )
    assert tuple(row) == ("enrolment", datetime.date(2025, 9, 1), datetime.date(2099, 6, 30))
    rows = await audit_rows(conn, f"holder:{holder_id}")
    assert [(row["actor"], row["action"]) for row in rows] == [(OPERATOR, "holder.eligibility")]

    backwards = {**renewed, "valid_from": "2026-01-01", "valid_until": "2025-01-01"}
    status, answer = await office.call("PUT", f"/v1/holders/{holder_id}/eligibility", backwards)
    assert (status, answer["code"]) == (422, "invalid_period")
    status, answer = await office.call("PUT", f"/v1/holders/{holder_id}/eligibility", {**renewed, "source": "luck"})
    assert (status, answer["code"]) == (400, "invalid_request")
    status, answer = await office.call("PUT", "/v1/holders/999999999/eligibility", renewed)
    assert (status, answer["code"]) == (404, "holder_not_found")


# --- errors -------------------------------------------------------------------------------------


async def test_errors_are_json_with_a_code(
    engine: EngineUnderTest, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    card = await add_card(conn, balance=100)
    other = await add_card(conn, balance=100)
    await engine.restart()
    office = Office(http, engine)
    expected = [
        (("GET", "/v1/cards/12345", None, None), 404, "card_not_found"),
        (("GET", "/v1/cards/twelve", None, None), 400, "invalid_path"),
        (("POST", f"/v1/cards/{card.uid}/replace", {"new_uid": other.uid}, None), 409, "card_exists"),
        (("POST", f"/v1/cards/{card.uid}/block", None, b'{"reason": "lost"'), 400, "invalid_json"),
        (("POST", f"/v1/cards/{card.uid}/block", {"reason": "bored"}, None), 400, "invalid_request"),
        (("POST", f"/v1/cards/{card.uid}/block", {"reason": "lost", "note": "x"}, None), 400, "invalid_request"),
        (("POST", f"/v1/cards/{card.uid}/block", None, b"{}"), 400, "invalid_request"),
        (("POST", f"/v1/cards/{card.uid}/block", None, b" " * (ADMIN_BODY_MAX_BYTES + 1)), 413, "body_too_large"),
        (("DELETE", f"/v1/cards/{card.uid}", None, None), 405, "method_not_allowed"),
        (("POST", f"/v1/cards/{card.uid}/topup", {"amount_cents": 0, "terminal_id": KIOSK, "terminal_seq": 1}, None),
         400, "invalid_request"),
        (("POST", "/v1/cards/12345/topup", {"amount_cents": 100, "terminal_id": KIOSK, "terminal_seq": 1}, None),
         404, "card_not_found"),
    ]  # fmt: skip
    for (method, path, body, data), status, code in expected:
        got_status, answer = await office.call(method, path, body, data=data)
        assert (got_status, answer.get("code")) == (status, code), (method, path, answer)
        assert isinstance(answer["error"], str) and answer["error"]
    # Nothing was changed by the refused requests.
    assert await conn.fetchval("SELECT status FROM cards WHERE uid = $1", card.uid) == CardStatus.ACTIVE
    assert admin_requests(engine, "card.replace", "conflict") == 1
    assert admin_requests(engine, "card.block", "too_large") == 1


# --- the command line ---------------------------------------------------------------------------


async def test_card_commands_against_the_running_engine(
    engine: EngineUnderTest, conn: asyncpg.Connection, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = await add_card(conn, balance=700)
    await engine.restart()
    common = ["--admin-url", engine.admin_url, "--operator", "desk-3", "--data-dir", str(tmp_path)]

    async def citycard(*argv: str) -> tuple[int, str, str]:
        return await run_citycard(capsys, *argv)

    status, out, _ = await citycard("card", "block", hex(card.uid), "--reason", "stolen", *common)
    assert status == 0
    assert json.loads(out)["status"] == "stolen"
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), card.uid)).result == ResultCode.CARD_NOT_ACTIVE

    status, out, _ = await citycard("card", "show", str(card.uid), *common)
    assert status == 0
    shown = json.loads(out)
    assert (shown["status"], shown["balance_cents"]) == ("stolen", 700)
    rows = await audit_rows(conn, f"card:{card.uid}")
    assert [(row["actor"], row["action"]) for row in rows] == [("desk-3", "card.block"), ("desk-3", "card.show")]

    status, _, err = await citycard("card", "show", "12345", *common)
    assert status == 3 and "no card with uid 12345" in err
    status, _, err = await citycard("card", "show", str(card.uid), *common[:4], "--token", "f" * 64)
    assert status == 3 and "401" in err
    unreachable = ["--admin-url", f"http://127.0.0.1:{free_port()}", *common[2:]]
    status, _, err = await citycard("card", "show", str(card.uid), *unreachable)
    assert status == 1 and "no answer" in err

    status, out, _ = await citycard("admin-token", "desk-3", "--data-dir", str(tmp_path))
    assert status == 0
    assert out.strip() == derive_operator_token(load_master_key(tmp_path), "desk-3")
    status, _, err = await citycard("admin-token", "desk 3", "--data-dir", str(tmp_path))
    assert status == 2 and "operator name" in err
