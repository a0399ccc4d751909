"""Passes, tickets and refunds at the card office: a real engine with its admin
listener, a real database, taps over TCP.

A product sold through the admin interface pays the very next tap; a
ticket's rides are durable (a restart finds them used) and follow the
account to a replacement card; a refund of another terminal's tap gives the
money (or the ride) back once, is idempotent by the desk's sequence, and
leaves the books reconciled.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import tests.test_admin
from engine.codes import CardStatus, ResultCode, TapInfo
from engine.reports import daily_report, reconcile
from tests.city import (
    BUS_FARE,
    BUS_VALIDATOR,
    KIOSK,
    LIBRARY_GATE,
    STUDENT,
    EngineUnderTest,
    add_card,
    balance_of,
    check_books,
    load_city_rules,
    running_engine,
    wait_for,
)

OPERATOR = "luis.menendez"

# The library charges here, with no transfers: its rides are counted one by one.
LIBRARY_FARE = 100
PAID_LIBRARY = f"""
[[services]]
code = "library"
kind = "per_use"
fares = {{ standard = {LIBRARY_FARE} }}
"""

TRANSFER = """
[transfer]
window_minutes = 45
services = ["bus"]
fare = "free"
"""

PRODUCTS = """
[[products]]
code = "bus_month"
kind = "season"
group = "bus"
days = 30
price_cents = 3000

[[products]]
code = "bus_2"
kind = "multi_ride"
group = "bus"
rides = 2
price_cents = 280

[[products]]
code = "library_2"
kind = "multi_ride"
group = "library"
rides = 2
price_cents = 180

[[products]]
code = "student_month"
kind = "season"
group = "bus"
days = 30
price_cents = 1500
profiles = ["student"]
"""


@pytest.fixture
async def rules_version(conn: asyncpg.Connection) -> int:
    """The rules with products, loaded once into this module's database."""
    loaded = await conn.fetchval("SELECT max(version) FROM rules_versions WHERE name = 'products city'")
    if loaded is not None:
        return int(loaded)
    return await load_city_rules(conn, library=PAID_LIBRARY, extra=TRANSFER + PRODUCTS, name="products city")


@pytest.fixture
async def engine(city_dsn: str, tmp_path: Path, rules_version: int) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(city_dsn, tmp_path, admin_port=0) as under_test:
        assert under_test.engine is not None
        await wait_for(lambda: under_test.engine is not None and under_test.engine.state.rules_version == rules_version)
        yield under_test


@pytest.fixture
async def office(engine: EngineUnderTest) -> AsyncIterator[Office]:
    async with aiohttp.ClientSession() as http:
        yield Office(http, engine, OPERATOR)


class Office(tests.test_admin.Office):
    """An operator at the desk (tests/test_admin.py), who also sells and refunds."""

    async def sell(self, uid: int, product: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        return await self.call("POST", f"/v1/cards/{uid}/products", {"product": product, **extra})

    async def refund(self, terminal: int, seq: int, desk_seq: int, desk: int = KIOSK) -> tuple[int, dict[str, Any]]:
        body = {"terminal_id": desk, "terminal_seq": desk_seq}
        return await self.call("POST", f"/v1/taps/{terminal}/{seq}/refund", body)


def fresh_seq() -> int:
    return time.time_ns() // 1000


async def test_a_season_pass_sold_pays_the_next_tap(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    status, sold = await office.sell(card.uid, "bus_month")
    assert status == 201, sold
    today = datetime.datetime.now(datetime.UTC).date()
    assert (sold["kind"], sold["valid_from"], sold["valid_until"], sold["price_cents"]) == (
        "season",
        today.isoformat(),
        (today + datetime.timedelta(days=29)).isoformat(),
        3000,
    )
    bus = await engine.client()
    for _ in range(3):
        ride = await bus.tap(fresh_seq(), card.uid)
        assert (ride.result, ride.amount_cents, ride.balance_cents) == (ResultCode.APPROVED, 0, 1000)
        assert ride.info & TapInfo.PASS_USED
    assert await balance_of(conn, card.account_id) == 1000  # the pass was paid at the desk
    recorded = await conn.fetchval(
        "SELECT count(*) FROM taps WHERE card_uid = $1 AND product_id = $2", card.uid, sold["product_id"]
    )
    assert recorded == 3
    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert [(p["product"], p["kind"], p["rides_left"]) for p in shown["products"]] == [("bus_month", "season", None)]
    audit = await conn.fetchrow(
        "SELECT actor, detail->>'product' AS product FROM audit_log WHERE action = 'card.sell_product'"
        " AND subject = $1",
        f"card:{card.uid}",
    )
    assert (audit["actor"], audit["product"]) == (OPERATOR, "bus_month")


async def test_a_ticket_is_used_up_durably_and_follows_a_replacement(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    status, sold = await office.sell(card.uid, "library_2")
    assert status == 201, sold
    library = await engine.client(LIBRARY_GATE)
    first = await library.tap(fresh_seq(), card.uid)
    assert (first.result, first.amount_cents, first.info & TapInfo.PASS_USED) == (ResultCode.APPROVED, 0, 32)
    # The ride used is on disk with the tap: a restart finds it used.
    await engine.restart()
    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert shown["products"][0]["rides_left"] == 1
    assert await conn.fetchval("SELECT rides_used FROM card_products WHERE id = $1", sold["product_id"]) == 1
    # A replacement card keeps the ticket: it belongs to the account.
    new_uid = card.uid + 0x1000_0000
    status, replaced = await office.call("POST", f"/v1/cards/{card.uid}/replace", {"new_uid": new_uid})
    assert status == 201, replaced
    library = await engine.client(LIBRARY_GATE)
    second = await library.tap(fresh_seq(), new_uid)
    assert (second.result, second.amount_cents, second.balance_cents) == (ResultCode.APPROVED, 0, 1000)
    third = await library.tap(fresh_seq(), new_uid)  # the ticket is used up: stored value pays
    assert (third.result, third.amount_cents, third.info & TapInfo.PASS_USED) == (ResultCode.APPROVED, LIBRARY_FARE, 0)
    assert await conn.fetchval("SELECT rides_used FROM card_products WHERE id = $1", sold["product_id"]) == 2
    result = await reconcile(conn)
    assert result.ok and result.tickets_checked >= 1, result


async def test_sales_the_office_refuses(engine: EngineUnderTest, office: Office, conn: asyncpg.Connection) -> None:
    card = await add_card(conn, balance=0)
    blocked = await add_card(conn, balance=0, status=CardStatus.LOST)
    expired_student = await add_card(
        conn, balance=0, profile=STUDENT, eligible=(datetime.date(2020, 9, 1), datetime.date(2021, 6, 30))
    )
    await engine.restart()
    status, refused = await office.sell(card.uid, "ferry_month")
    assert (status, refused["code"]) == (422, "unknown_product")
    assert "bus_month" in refused["error"]
    status, refused = await office.sell(card.uid, "student_month")
    assert (status, refused["code"]) == (422, "not_entitled")
    yesterday = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    status, refused = await office.sell(card.uid, "bus_month", valid_from=yesterday.isoformat())
    assert (status, refused["code"]) == (422, "invalid_period")
    status, refused = await office.sell(0x7FFF_0000_0000_0001, "bus_month")
    assert (status, refused["code"]) == (404, "card_not_found")
    status, refused = await office.sell(blocked.uid, "bus_month")
    assert (status, refused["code"]) == (409, "card_not_active")
    status, refused = await office.sell(expired_student.uid, "student_month")
    assert (status, refused["code"]) == (422, "not_entitled")
    assert "renew" in refused["error"]
    assert await conn.fetchval("SELECT count(*) FROM card_products WHERE sold_to_card = $1", card.uid) == 0


async def test_a_refund_of_a_bus_tap_at_the_desk(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=1000)
    await engine.restart()
    bus = await engine.client()
    tap_seq = fresh_seq()
    assert (await bus.tap(tap_seq, card.uid)).result == ResultCode.APPROVED
    desk_seq = fresh_seq()
    status, refunded = await office.refund(BUS_VALIDATOR, tap_seq, desk_seq)
    assert status == 200, refunded
    assert (refunded["result"], refunded["amount_cents"], refunded["balance_cents"]) == ("APPROVED", BUS_FARE, 1000)
    assert await balance_of(conn, card.account_id) == 1000
    # The same desk request again is answered, not applied again, even after a restart.
    status, again = await office.refund(BUS_VALIDATOR, tap_seq, desk_seq)
    assert (status, again["result"], again["balance_cents"]) == (200, "APPROVED", 1000)
    await engine.restart()
    status, again = await office.refund(BUS_VALIDATOR, tap_seq, desk_seq)
    assert (status, again["result"], again["balance_cents"]) == (200, "APPROVED", 1000)
    # A new request to refund it again, at the desk or on the bus, is refused.
    status, twice = await office.refund(BUS_VALIDATOR, tap_seq, fresh_seq())
    assert (status, twice["result"], twice["approved"]) == (200, "ALREADY_REVERSED", False)
    bus = await engine.client()
    assert (await bus.reversal(fresh_seq(), tap_seq)).result == ResultCode.ALREADY_REVERSED
    # A tap nobody recorded, and a top-up (reversed at its own kiosk only).
    status, missing = await office.refund(BUS_VALIDATOR, tap_seq + 10**9, fresh_seq())
    assert (status, missing["result"]) == (200, "ORIGINAL_NOT_FOUND")
    kiosk = await engine.client(KIOSK)
    topup_seq = fresh_seq()
    assert (await kiosk.topup(topup_seq, card.uid, 500)).result == ResultCode.APPROVED
    status, desk = await office.call(
        "POST", f"/v1/taps/{KIOSK}/{topup_seq}/refund", {"terminal_id": LIBRARY_GATE, "terminal_seq": 1}
    )
    assert (status, desk["code"]) == (422, "not_a_kiosk")
    assert await balance_of(conn, card.account_id) == 1500
    reversal = await conn.fetchrow(
        "SELECT terminal_id, original_terminal_id, service_id, amount_cents FROM taps"
        " WHERE terminal_id = $1 AND terminal_seq = $2",
        KIOSK,
        desk_seq,
    )
    # Recorded at the desk, naming the bus's tap, booked to the bus's revenue.
    assert tuple(reversal) == (KIOSK, BUS_VALIDATOR, 1, BUS_FARE)
    report = await daily_report(conn, datetime.datetime.now(datetime.UTC).date())
    bus_line = next(line for line in report.services if line.service == "bus")
    assert bus_line.refund_cents >= BUS_FARE
    result = await reconcile(conn)
    assert result.ok, result
    await check_books(conn)


async def test_a_refunded_ticket_ride_returns_to_the_ticket(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=0)
    await engine.restart()
    status, sold = await office.sell(card.uid, "bus_2")
    assert status == 201, sold
    bus = await engine.client()
    tap_seq = fresh_seq()
    ride = await bus.tap(tap_seq, card.uid)
    assert (ride.result, ride.info & TapInfo.PASS_USED) == (ResultCode.APPROVED, 32)
    status, refunded = await office.refund(BUS_VALIDATOR, tap_seq, fresh_seq())
    assert (status, refunded["result"], refunded["amount_cents"]) == (200, "APPROVED", 0)
    assert await conn.fetchval("SELECT rides_used FROM card_products WHERE id = $1", sold["product_id"]) == 0
    status, shown = await office.call("GET", f"/v1/cards/{card.uid}")
    assert shown["products"][0]["rides_left"] == 2
    report = await daily_report(conn, datetime.datetime.now(datetime.UTC).date())
    assert any(line.product == "bus_2" and line.sold >= 1 and line.uses >= 1 for line in report.products)
    result = await reconcile(conn)
    assert result.ok, result


async def test_a_journey_a_ticket_started_survives_a_restart(
    engine: EngineUnderTest, office: Office, conn: asyncpg.Connection
) -> None:
    """The change of bus after a restart is still a free transfer: the rebuilt
    memory knows the journey a ticket ride started (and uses no second ride)."""
    card = await add_card(conn, balance=0)
    await engine.restart()
    status, sold = await office.sell(card.uid, "bus_2")
    assert status == 201, sold
    bus = await engine.client()
    assert (await bus.tap(fresh_seq(), card.uid)).info & TapInfo.PASS_USED
    await engine.restart()
    bus = await engine.client()
    change = await bus.tap(fresh_seq(), card.uid)
    assert (change.result, change.amount_cents, change.info & (TapInfo.TRANSFER | TapInfo.PASS_USED)) == (
        ResultCode.APPROVED,
        0,
        TapInfo.TRANSFER,
    )
    assert await conn.fetchval("SELECT rides_used FROM card_products WHERE id = $1", sold["product_id"]) == 1
