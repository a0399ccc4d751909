"""Store and forward: a validator loses its link, keeps deciding taps from its
own lists, and uploads them when the link returns (docs/offline.md).

The money must come out exact: every uploaded tap applied once however often
it is uploaded, the tap standing when the engine would have refused it
(down to the account's debt limit), the engine's own decision kept beside
it, and the books, the reconciliation and the daily report all agreeing."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.client import HotlistCopy, ServiceRules, TapResult, TerminalClient
from engine.codes import CardStatus, ResultCode, TapInfo
from engine.db import connect
from engine.keys import derive_operator_token, load_master_key
from engine.limits import OFFLINE_DEBT_LIMIT_CENTS, OFFLINE_TAP_AGE_MAX_S
from engine.reports import daily_report, reconcile
from engine.signing import ListSigner
from tests.city import (
    BUS_FARE,
    BUS_FARE_STUDENT,
    BUS_VALIDATOR,
    STANDARD,
    STUDENT,
    Card,
    EngineUnderTest,
    add_card,
    balance_of,
    check_books,
    create_city,
    load_city_rules,
    running_engine,
)

OPERATOR = "ana.garcia"
OFFLINE = TapInfo.OFFLINE
DIFFERS = TapInfo.OFFLINE | TapInfo.OFFLINE_DIFFERS
MINUTE_MS = 60_000


@dataclass
class Presented:
    """A card as a validator reads it: its uid, and the profile it carries."""

    uid: int
    profile: int = STANDARD


class OfflineValidator:
    """A bus validator as a vendor builds it from docs/offline.md: it keeps
    the hot list and its service's rules from the engine, decides taps alone
    while its link is down, and uploads them when the link returns."""

    def __init__(self, public_key: bytes, first_seq: int) -> None:
        self.hotlist = HotlistCopy(public_key)
        self.public_key = public_key
        self.rules: ServiceRules | None = None
        self.next_seq = first_seq
        self.held: list[tuple[int, int, int, int, int, int, int, int]] = []

    async def sync(self, client: TerminalClient) -> None:
        await self.hotlist.refresh(client)
        self.rules = await client.rules(public_key=self.public_key)

    def tap(self, card: Presented, event_time_ms: int, counter: int = 0) -> tuple[int, int]:
        """Decide a tap alone: refuse a listed card, else charge its profile's fare."""
        assert self.rules is not None
        fare = self.rules.fare(card.profile)
        if self.hotlist.refuses(card.uid):
            result, amount = ResultCode.CARD_NOT_ACTIVE, 0
        elif fare is None:
            result, amount = ResultCode.SERVICE_NOT_ALLOWED, 0
        else:
            result, amount = ResultCode.APPROVED, fare
        self.held.append(
            (self.next_seq, card.uid, counter, event_time_ms, 0, self.rules.rules_version, int(result), amount)
        )
        self.next_seq += 1
        return int(result), amount


async def office_post(engine: EngineUnderTest, path: str, body: dict[str, Any] | None = None) -> None:
    token = derive_operator_token(load_master_key(engine.data_dir), OPERATOR)
    headers = {"Authorization": f"Bearer {OPERATOR}:{token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(engine.admin_url + path, json=body or {}, headers=headers) as response:
            assert response.status == 200, await response.text()


@pytest.fixture
async def city(fresh_db: Callable[..., str]) -> tuple[str, asyncpg.Connection]:
    """A database of its own: the report's figures are this test's alone."""
    dsn = fresh_db()
    conn = await connect(dsn)
    await create_city(conn)
    await load_city_rules(conn)
    return dsn, conn


def expect(results: list[TapResult]) -> list[tuple[int, int, int, int]]:
    return [(int(r.result), r.amount_cents, r.balance_cents, int(r.info)) for r in results]


async def test_a_validator_offline_uploads_twice_and_the_books_are_exact(
    city: tuple[str, asyncpg.Connection], tmp_path: Path
) -> None:
    dsn, conn = city
    try:
        rich = await add_card(conn, balance=1000)
        student = await add_card(conn, balance=500, profile=STUDENT)
        poor = await add_card(conn, balance=100)
        blocked_meanwhile = await add_card(conn, balance=800)
        lost_before = await add_card(conn, balance=300, status=CardStatus.LOST)
        unblocked_meanwhile = await add_card(conn, balance=400, status=CardStatus.BLOCKED)
        broke = await add_card(conn, balance=0)
        await conn.execute("UPDATE accounts SET debt_limit_cents = 200 WHERE id = $1", broke.account_id)
        unknown = Presented(0x04_FFFF_0000_0001)
        async with running_engine(dsn, tmp_path, admin_port=0) as engine:
            await offline_day(
                engine, conn, rich, student, poor, blocked_meanwhile, lost_before, unblocked_meanwhile, broke, unknown
            )
    finally:
        await conn.close()


async def offline_day(
    engine: EngineUnderTest,
    conn: asyncpg.Connection,
    rich: Card,
    student: Card,
    poor: Card,
    blocked_meanwhile: Card,
    lost_before: Card,
    unblocked_meanwhile: Card,
    broke: Card,
    unknown: Presented,
) -> None:
    key = ListSigner(load_master_key(engine.data_dir)).public_key
    validator = OfflineValidator(key, first_seq=time.time_ns() // 1000)
    client = await engine.client(BUS_VALIDATOR)
    await validator.sync(client)
    assert validator.hotlist.refuses(lost_before.uid) and validator.hotlist.refuses(unblocked_meanwhile.uid)
    await client.close()  # into the tunnel

    # Meanwhile the card office blocks one card and unblocks another.
    await office_post(engine, f"/v1/cards/{blocked_meanwhile.uid}/block", {"reason": "stolen"})
    await office_post(engine, f"/v1/cards/{unblocked_meanwhile.uid}/unblock")

    start = int(time.time() * 1000) - 90 * MINUTE_MS
    riders = [
        Presented(rich.uid),
        Presented(student.uid, STUDENT),
        Presented(poor.uid),
        Presented(blocked_meanwhile.uid),
        Presented(lost_before.uid),
        Presented(rich.uid),
        Presented(unblocked_meanwhile.uid),
        Presented(broke.uid),
        Presented(broke.uid),
        Presented(broke.uid),
        unknown,
    ]
    for minute, rider in enumerate(riders):
        validator.tap(rider, start + minute * MINUTE_MS, counter=minute + 1)
    taps = validator.held

    # Out of the tunnel: two overlapping uploads at once, then all of it again.
    client = await engine.client(BUS_VALIDATOR)
    first, second = await asyncio.gather(client.upload_offline(taps[:6]), client.upload_offline(taps[4:]))
    again = await client.upload_offline(taps)
    assert expect(again) == expect(first) + expect(second)[2:]
    assert expect(second)[:2] == expect(first)[4:]

    approved, declined = ResultCode.APPROVED, ResultCode.CARD_NOT_ACTIVE
    assert expect(again) == [
        (approved, BUS_FARE, 850, OFFLINE),  # rich
        (approved, BUS_FARE_STUDENT, 425, OFFLINE),  # student
        (approved, BUS_FARE, -50, DIFFERS),  # poor: the engine would refuse it, the tap stands, in debt
        (approved, BUS_FARE, 650, DIFFERS),  # blocked meanwhile: stands
        (declined, 0, 300, OFFLINE),  # on the validator's list: refused, as the engine would
        (approved, BUS_FARE, 700, OFFLINE),  # rich again
        (declined, 0, 400, DIFFERS),  # unblocked meanwhile: the validator refused it, nothing moves
        (approved, BUS_FARE, -150, DIFFERS),  # broke: into debt...
        (approved, 50, -200, DIFFERS),  # ...down to its debt limit of 200
        (approved, 0, -200, DIFFERS),  # ...and no further: uncollected
        (approved, 0, 0, DIFFERS),  # no such card: nothing to charge
    ]

    # The record: one row per tap, the terminal's decision and the engine's.
    rows = await conn.fetch(
        "SELECT terminal_seq, result, amount_cents, requested_cents, online_result, info, rules_version,"
        " (extract(epoch FROM event_time) * 1000)::int8 AS event_ms, recorded_at > event_time AS later"
        " FROM taps WHERE terminal_id = $1 AND terminal_seq >= $2 ORDER BY terminal_seq",
        BUS_VALIDATOR,
        taps[0][0],
    )
    assert [row["terminal_seq"] for row in rows] == [tap[0] for tap in taps]
    assert [row["online_result"] for row in rows] == [
        approved,
        approved,
        ResultCode.INSUFFICIENT_FUNDS,
        declined,
        declined,
        approved,
        approved,
        ResultCode.INSUFFICIENT_FUNDS,
        ResultCode.INSUFFICIENT_FUNDS,
        ResultCode.INSUFFICIENT_FUNDS,
        ResultCode.UNKNOWN_CARD,
    ]
    assert [row["requested_cents"] for row in rows] == [tap[7] for tap in taps]
    assert [row["event_ms"] for row in rows] == [tap[3] for tap in taps]
    assert all(row["later"] and row["rules_version"] == taps[0][5] for row in rows)

    # Balances, ledger, reconciliation.
    expected = {rich: 700, student: 425, poor: -50, blocked_meanwhile: 650, lost_before: 300}
    expected |= {unblocked_meanwhile: 400, broke: -200}
    assert {card: await balance_of(conn, card.account_id) for card in expected} == expected
    charged = 2 * BUS_FARE + BUS_FARE_STUDENT + 3 * BUS_FARE + 50
    assert await balance_of(conn, 11) == charged  # the bus's revenue
    await check_books(conn)
    assert (await reconcile(conn)).ok

    # The daily report counts them, apart too.
    report = await daily_report(conn, datetime.datetime.now(datetime.UTC).date())
    assert report.total.uses == 9 and report.total.fare_cents == charged
    offline = report.offline
    assert (offline.taps, offline.approved, offline.declined) == (11, 9, 2)
    assert offline.differs == {"APPROVED": 1, "UNKNOWN_CARD": 1, "CARD_NOT_ACTIVE": 1, "INSUFFICIENT_FUNDS": 4}
    assert (offline.charged_cents, offline.uncollected_cents) == (charged, 100 + BUS_FARE + BUS_FARE)
    assert (offline.accounts_in_debt, offline.debt_cents) == (2, 50 + 200)

    # And the engine counted what became of every uploaded tap.
    assert engine.engine is not None and engine.engine.offline is not None
    outcomes = engine.engine.offline.outcomes
    assert outcomes == {"agreed": 4, "differs": 4, "uncollected": 3, "duplicate": 2 + 11, "refused": 0, "busy": 0}
    metric = engine.engine.metrics.registry.get_sample_value("citycard_offline_taps_total", {"outcome": "duplicate"})
    assert metric == 13

    # The uploaded counters count for the clone check of later taps.
    replayed = await client.tap(validator.next_seq, rich.uid, card_counter=6)
    assert replayed.result == ResultCode.CLONE_SUSPECTED


async def test_a_tap_recorded_online_and_uploaded_from_offline_is_one_tap(
    city: tuple[str, asyncpg.Connection], tmp_path: Path
) -> None:
    """A validator that got no answer to a TAP lets the citizen on by its own
    decision and uploads it under the same sequence: if the engine recorded
    the TAP, that record stands and nothing is charged twice."""
    dsn, conn = city
    try:
        card = await add_card(conn, balance=1000)
        async with running_engine(dsn, tmp_path) as engine:
            client = await engine.client(BUS_VALIDATOR)
            seq = time.time_ns() // 1000
            when = int(time.time() * 1000) - 5000
            online = await client.tap(seq, card.uid, card_counter=3, event_time_ms=when)
            version = int(await conn.fetchval("SELECT max(version) FROM rules_versions"))
            [uploaded] = await client.upload_offline([(seq, card.uid, 3, when, 0, version, 0, BUS_FARE)])
            assert (uploaded.result, uploaded.amount_cents, uploaded.balance_cents, uploaded.info) == (
                online.result,
                online.amount_cents,
                online.balance_cents,
                TapInfo.NONE,
            )
            # The same sequence with another card is another request.
            [reused] = await client.upload_offline([(seq, card.uid + 1, 3, when, 0, version, 0, BUS_FARE)])
            assert reused.result == ResultCode.SEQUENCE_REUSED
            assert engine.engine is not None and engine.engine.offline is not None
            assert engine.engine.offline.outcomes["duplicate"] == 1
            assert engine.engine.offline.outcomes["refused"] == 1
        assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE
        await check_books(conn)
    finally:
        await conn.close()


async def test_uploaded_taps_the_engine_cannot_accept_are_refused(
    city: tuple[str, asyncpg.Connection], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dsn, conn = city
    try:
        card = await add_card(conn, balance=1000)
        async with running_engine(dsn, tmp_path) as engine:
            client = await engine.client(BUS_VALIDATOR)
            version = int(await conn.fetchval("SELECT max(version) FROM rules_versions"))
            now = int(time.time() * 1000)
            seq = time.time_ns() // 1000
            bad = [
                (seq, card.uid, 0, now + 3_600_000, 0, version, 0, BUS_FARE),  # an hour ahead of the engine
                (seq + 1, card.uid, 0, now - (OFFLINE_TAP_AGE_MAX_S + 60) * 1000, 0, version, 0, BUS_FARE),  # too old
                (seq + 2, card.uid, 0, now, 0, version + 7, 0, BUS_FARE),  # a rules version never stored
                (seq + 3, card.uid, 0, now, 0, version, 0, BUS_FARE + 1),  # more than the version charges here
                (seq + 4, card.uid, 0, now, 0, version, ResultCode.CARD_NOT_ACTIVE, 10),  # a decline that charged
                (seq + 5, card.uid, 0, now, 0, version, ResultCode.BUSY_RETRY, 0),  # not a decision
                (seq + 6, card.uid, 0, now, 0x80, version, 0, BUS_FARE),  # reserved tap flags
                (2**63, card.uid, 0, now, 0, version, 0, BUS_FARE),  # a sequence the record cannot hold
            ]
            good = (seq + 8, card.uid, 0, now, 0, version, 0, BUS_FARE)
            results = await client.upload_offline([*bad, good])
            assert [r.result for r in results] == [ResultCode.PROTOCOL_ERROR] * len(bad) + [ResultCode.APPROVED]
            assert (await client.upload_offline([])) == []
        # One line for the upload, naming the first refusal (docs/operations.md).
        [logged] = [r for r in caplog.records if r.getMessage() == "offline taps refused"]
        assert (logged.terminal_id, logged.terminal_seq) == (BUS_VALIDATOR, seq)  # type: ignore[attr-defined]
        assert logged.reason == "event time ahead of the engine's clock"  # type: ignore[attr-defined]
        assert logged.refused == len(bad)  # type: ignore[attr-defined]
        recorded = await conn.fetchval(
            "SELECT count(*) FROM taps WHERE terminal_id = $1 AND terminal_seq >= $2", 1, seq
        )
        assert recorded == 1
        assert await balance_of(conn, card.account_id) == 1000 - BUS_FARE
    finally:
        await conn.close()


async def test_the_default_debt_limit_is_the_limits_one(city: tuple[str, asyncpg.Connection]) -> None:
    _, conn = city
    try:
        card = await add_card(conn, balance=0)
        limit = await conn.fetchval("SELECT debt_limit_cents FROM accounts WHERE id = $1", card.account_id)
        assert limit == OFFLINE_DEBT_LIMIT_CENTS
        # The schema holds a card account to it, whatever writes.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE accounts SET balance_cents = -$2::int8 - 1 WHERE id = $1",
                card.account_id,
                OFFLINE_DEBT_LIMIT_CENTS,
            )
    finally:
        await conn.close()
