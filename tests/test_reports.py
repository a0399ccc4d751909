"""The daily report and the reconciliation, on tiny cities where every figure
can be written down.

The daily report reads tap records written here directly, so each case
(fare profile recorded or not, a refund, a reversed top-up, a day's edges)
is exact. The reconciliation runs on the books a real engine wrote, which
must agree, and then on books deliberately broken in each way it checks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from engine.cli_office import (
    OFFICE_COMMANDS,
    add_office_commands,
    cmd_reconcile,
    cmd_report_daily,
    run_office_command,
)
from engine.codes import OperationKind, ResultCode
from engine.reports import NO_PROFILE, DailyFigures, daily_report, reconcile
from tests.city import (
    BUS,
    BUS_FARE,
    BUS_VALIDATOR,
    KIOSK,
    KIOSK_SERVICE,
    LIBRARY,
    LIBRARY_GATE,
    STUDENT,
    Card,
    add_card,
    check_books,
    create_city,
    running_engine,
)

DAY = datetime.date(2030, 1, 15)
BUS_REVENUE_ACCOUNT = 11
BATCH = 1


def at(hour: int, minute: int = 0, *, day: datetime.date = DAY) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(hour, minute), tzinfo=datetime.UTC)


@dataclass
class Recorder:
    """Writes tap records as the engine would, one sequence per terminal."""

    conn: asyncpg.Connection
    seq: int = 0

    async def record(
        self,
        terminal: int,
        service: int,
        card: Card | None,
        *,
        when: datetime.datetime,
        kind: int = OperationKind.TAP,
        result: int = ResultCode.APPROVED,
        amount: int = 0,
        fare_profile: int | None = None,
        original_seq: int | None = None,
    ) -> int:
        self.seq += 1
        await self.conn.execute(
            "INSERT INTO taps (terminal_id, terminal_seq, kind, card_uid, event_time, recorded_at, result,"
            " amount_cents, service_id, account_id, batch_id, fare_profile, original_seq)"
            " VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10, $11, $12)",
            terminal,
            self.seq,
            kind,
            card.uid if card is not None else 0x0DEAD,
            when,
            result,
            amount,
            service,
            card.account_id if card is not None else None,
            BATCH,
            fare_profile,
            original_seq,
        )
        return self.seq


@pytest.fixture
async def city(fresh_db: Callable[..., str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A database of its own holding the tiny city (tests/city.py)."""
    dsn = fresh_db()
    conn = await asyncpg.connect(dsn)
    try:
        await create_city(conn)
        yield dsn, conn
    finally:
        await conn.close()


def figures(line: DailyFigures) -> tuple[int, ...]:
    return (
        line.uses,
        line.fare_cents,
        line.refund_cents,
        line.revenue_cents,
        line.topups,
        line.topup_cents,
        line.topup_reversed_cents,
    )


# --- the daily report -------------------------------------------------------------------------


async def test_daily_report_counts_and_cents(
    city: tuple[str, asyncpg.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, conn = city
    adult = await add_card(conn, balance=5000)
    student = await add_card(conn, balance=5000, profile=STUDENT)
    taps = Recorder(conn)
    bus = (BUS_VALIDATOR, BUS)
    first_fare = await taps.record(*bus, adult, when=at(8), amount=BUS_FARE, fare_profile=0)
    # Recorded before taps carried their fare profile: the holder's profile counts.
    await taps.record(*bus, adult, when=at(9), amount=BUS_FARE)
    await taps.record(*bus, student, when=at(10), amount=75, fare_profile=STUDENT)
    # A student whose concession was not valid paid the standard fare: counted as standard.
    await taps.record(*bus, student, when=at(11), amount=BUS_FARE, fare_profile=0)
    await taps.record(*bus, adult, when=at(12), result=ResultCode.INSUFFICIENT_FUNDS, fare_profile=0)
    await taps.record(*bus, None, when=at(12, 30), result=ResultCode.UNKNOWN_CARD)
    # The refund of the 08:00 fare, counted where the fare was.
    await taps.record(*bus, adult, when=at(13), kind=OperationKind.REVERSAL, amount=150, original_seq=first_fare)
    # Just outside the day, on either side.
    await taps.record(*bus, adult, when=at(23, 59, day=DAY - datetime.timedelta(days=1)), amount=BUS_FARE)
    await taps.record(*bus, adult, when=at(0, day=DAY + datetime.timedelta(days=1)), amount=BUS_FARE)

    kiosk = (KIOSK, KIOSK_SERVICE)
    await taps.record(*kiosk, adult, when=at(14), kind=OperationKind.TOPUP, amount=2000)
    student_topup = await taps.record(*kiosk, student, when=at(14, 5), kind=OperationKind.TOPUP, amount=1000)
    await taps.record(
        *kiosk, student, when=at(14, 10), kind=OperationKind.REVERSAL, amount=1000, original_seq=student_topup
    )
    await taps.record(*kiosk, adult, when=at(14, 20), kind=OperationKind.TOPUP, result=ResultCode.INVALID_AMOUNT)

    library = (LIBRARY_GATE, LIBRARY)
    await taps.record(*library, adult, when=at(15), fare_profile=0)
    await taps.record(*library, student, when=at(15, 5), result=ResultCode.SERVICE_NOT_ALLOWED, fare_profile=STUDENT)

    report = await daily_report(conn, DAY)
    assert (report.starts_at, report.ends_at, report.time_zone) == (
        at(0),
        at(0, day=DAY + datetime.timedelta(1)),
        "UTC",
    )
    #   uses, fares, refunds, revenue, top-ups, top-up cents, reversed top-up cents
    assert [(line.service, line.profile, figures(line), line.declines) for line in report.lines] == [
        ("bus", NO_PROFILE, (0, 0, 0, 0, 0, 0, 0), {"UNKNOWN_CARD": 1}),
        ("bus", "standard", (3, 450, 150, 300, 0, 0, 0), {"INSUFFICIENT_FUNDS": 1}),
        ("bus", "student", (1, 75, 0, 75, 0, 0, 0), {}),
        ("library", "standard", (1, 0, 0, 0, 0, 0, 0), {}),
        ("library", "student", (0, 0, 0, 0, 0, 0, 0), {"SERVICE_NOT_ALLOWED": 1}),
        ("kiosk", "standard", (0, 0, 0, 0, 1, 2000, 0), {"INVALID_AMOUNT": 1}),
        ("kiosk", "student", (0, 0, 0, 0, 1, 1000, 1000), {}),
    ]
    assert [(line.service, figures(line)) for line in report.services] == [
        ("bus", (4, 525, 150, 375, 0, 0, 0)),
        ("library", (1, 0, 0, 0, 0, 0, 0)),
        ("kiosk", (0, 0, 0, 0, 2, 3000, 1000)),
    ]
    assert figures(report.total) == (5, 525, 150, 375, 2, 3000, 1000)
    # Declines in the order of their result codes.
    assert list(report.total.declines.items()) == [
        ("UNKNOWN_CARD", 1),
        ("SERVICE_NOT_ALLOWED", 1),
        ("INVALID_AMOUNT", 1),
        ("INSUFFICIENT_FUNDS", 1),
    ]

    assert cmd_report_daily(argparse.Namespace(dsn=dsn, data_dir=None, date=DAY, json=True)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["day"] == "2030-01-15"
    assert printed["total"]["revenue_cents"] == 375
    assert printed["lines"][1] | {"declines": None} == {
        "uses": 3,
        "fare_cents": 450,
        "refund_cents": 150,
        "revenue_cents": 300,
        "topups": 0,
        "topup_cents": 0,
        "topup_reversed_cents": 0,
        "declines": None,
        "service": "bus",
        "profile": "standard",
    }

    assert cmd_report_daily(argparse.Namespace(dsn=dsn, data_dir=None, date=DAY, json=False)) == 0
    table = capsys.readouterr().out.splitlines()
    assert "(UTC)" in table[0]
    assert table[1].split() == ["service", "profile", "uses", "fares", "refunds", "revenue", "top-ups", "top-up",
                                "cents", "reversed", "declines"]  # fmt: skip
    assert table[3].split() == ["bus", "standard", "3", "450", "150", "300", "0", "0", "0", "INSUFFICIENT_FUNDS", "1"]
    assert table[5].split() == ["bus", "all", "4", "525", "150", "375", "0", "0", "0", "UNKNOWN_CARD", "1,",
                                "INSUFFICIENT_FUNDS", "1"]  # fmt: skip
    assert table[-1].split()[:8] == ["TOTAL", "5", "525", "150", "375", "2", "3000", "1000"]


async def test_daily_report_of_a_quiet_day(city: tuple[str, asyncpg.Connection]) -> None:
    _, conn = city
    report = await daily_report(conn, DAY)
    assert (report.lines, report.services, figures(report.total)) == ([], [], (0, 0, 0, 0, 0, 0, 0))


# --- the reconciliation ------------------------------------------------------------------------


@dataclass
class Books:
    dsn: str
    conn: asyncpg.Connection
    adult: Card
    student: Card


def fresh_seq() -> int:
    return time.time_ns() // 1000


@pytest.fixture
async def books(city: tuple[str, asyncpg.Connection], tmp_path: Path) -> Books:
    """The books a real engine wrote: fares, a refund, top-ups, a reversed
    top-up, a free tap and declines, in several batches."""
    dsn, conn = city
    adult = await add_card(conn, balance=1000)
    student = await add_card(conn, balance=300, profile=STUDENT)
    async with running_engine(dsn, tmp_path) as engine:
        bus = await engine.client(BUS_VALIDATOR)
        kiosk = await engine.client(KIOSK)
        gate = await engine.client(LIBRARY_GATE)
        fare = fresh_seq()
        assert (await bus.tap(fare, adult.uid)).result == ResultCode.APPROVED
        assert (await bus.tap(fare + 1, adult.uid)).result == ResultCode.APPROVED
        assert (await bus.reversal(fare + 2, fare + 1)).result == ResultCode.APPROVED
        assert (await bus.tap(fare + 3, student.uid)).result == ResultCode.APPROVED
        assert (await bus.tap(fare + 4, 0x0DEAD)).result == ResultCode.UNKNOWN_CARD
        topup = fresh_seq()
        assert (await kiosk.topup(topup, adult.uid, 500)).result == ResultCode.APPROVED
        assert (await kiosk.topup(topup + 1, student.uid, 200)).result == ResultCode.APPROVED
        assert (await kiosk.reversal(topup + 2, topup + 1)).result == ResultCode.APPROVED
        assert (await gate.tap(fresh_seq(), adult.uid)).result == ResultCode.APPROVED
    await check_books(conn)
    return Books(dsn, conn, adult, student)


def run_reconcile(dsn: str, capsys: pytest.CaptureFixture[str], *, as_json: bool = False) -> tuple[int, str]:
    status = cmd_reconcile(argparse.Namespace(dsn=dsn, data_dir=None, json=as_json))
    return status, capsys.readouterr().out


async def test_books_written_by_the_engine_agree(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    result = await reconcile(books.conn)
    assert result.ok, result
    assert result.batches_checked >= 1
    assert result.accounts_checked == 6  # funding, three revenue accounts, two cards
    status, printed = run_reconcile(books.dsn, capsys)
    assert (status, printed.splitlines()[-1]) == (0, "OK: the books agree")

    # The same taps in the daily report, whatever day (UTC) they fell on.
    days = await books.conn.fetch("SELECT DISTINCT (recorded_at AT TIME ZONE 'UTC')::date AS day FROM taps")
    reports = [await daily_report(books.conn, row["day"]) for row in days]
    totals = [figures(report.total) for report in reports]
    #   uses (three fares, one free tap), fares, refunds, revenue, top-ups, cents, reversed
    assert tuple(map(sum, zip(*totals, strict=True))) == (4, 375, 150, 225, 2, 700, 200)


async def test_a_balance_that_disagrees_fails(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    balance = int(await books.conn.fetchval("SELECT balance_cents FROM accounts WHERE id = $1", books.adult.account_id))
    await books.conn.execute(
        "UPDATE accounts SET balance_cents = balance_cents + 7 WHERE id = $1", books.adult.account_id
    )

    status, printed = run_reconcile(books.dsn, capsys)
    assert status == 1
    lines = printed.splitlines()
    assert f"account {books.adult.account_id}: balance {balance + 7}, ledger {balance}, difference 7" in lines
    assert lines[-1] == "FAILED: 1 differences"

    status, printed = run_reconcile(books.dsn, capsys, as_json=True)
    report = json.loads(printed)
    assert (status, report["ok"], report["account_differences_total"]) == (1, False, 1)
    assert report["account_differences"] == [
        {"account_id": books.adult.account_id, "balance_cents": balance + 7, "ledger_cents": balance,
         "difference_cents": 7}
    ]  # fmt: skip


async def test_a_transfer_that_does_not_sum_to_zero_fails(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    transfer = await books.conn.fetchval("SELECT min(id) FROM ledger_transfers WHERE batch_id IS NOT NULL")
    # Only by switching off the schema's own guard can a transfer be unbalanced.
    await books.conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_balanced")
    await books.conn.execute(
        "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES ($1, 1, 5)", transfer
    )
    result = await reconcile(books.conn)
    assert [(item.transfer_id, item.sum_cents) for item in result.transfer_differences] == [(transfer, 5)]
    assert [(item.account_id, item.difference_cents) for item in result.account_differences] == [(1, -5)]
    status, printed = run_reconcile(books.dsn, capsys)
    assert status == 1
    assert f"transfer {transfer}: entries sum to 5, not 0" in printed.splitlines()


async def test_money_booked_without_a_tap_fails(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    """A balanced fare in the ledger, with the balances to match, but no tap
    record: only the per-batch check can see it."""
    batch = await books.conn.fetchval("SELECT min(id) FROM batches")
    card = books.adult.account_id
    async with books.conn.transaction():
        await books.conn.execute(
            "INSERT INTO ledger_transfers (id, batch_id, kind, service_id) VALUES (-999, $1, 0, $2)", batch, BUS
        )
        await books.conn.execute(
            "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES (-999, $1, -40), (-999, $2, 40)",
            card,
            BUS_REVENUE_ACCOUNT,
        )
        await books.conn.execute("UPDATE accounts SET balance_cents = balance_cents - 40 WHERE id = $1", card)
        await books.conn.execute(
            "UPDATE accounts SET balance_cents = balance_cents + 40 WHERE id = $1", BUS_REVENUE_ACCOUNT
        )
    result = await reconcile(books.conn)
    assert (result.account_differences_total, result.transfer_differences_total) == (0, 0)
    differences = [
        (item.batch_id, item.movement, item.ledger_kind, item.service_id, item.account_id, item.difference_cents)
        for item in result.batch_differences
    ]
    assert differences == [(batch, "card", None, None, card, 40), (batch, "revenue", "fare", BUS, None, -40)]
    status, printed = run_reconcile(books.dsn, capsys)
    assert status == 1
    assert f"batch {batch}: card account {card}: " in printed


async def test_a_tap_without_ledger_entries_fails(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    batch = await books.conn.fetchval("SELECT max(id) FROM batches")
    await books.conn.execute(
        "INSERT INTO taps (terminal_id, terminal_seq, kind, card_uid, event_time, recorded_at, result,"
        " amount_cents, service_id, account_id, batch_id) VALUES ($1, 1, 0, $2, now(), now(), 0, $3, $4, $5, $6)",
        BUS_VALIDATOR,
        books.student.uid,
        BUS_FARE,
        BUS,
        books.student.account_id,
        batch,
    )
    result = await reconcile(books.conn)
    assert [(item.movement, item.taps_cents, item.ledger_cents) for item in result.batch_differences] == [
        ("card", -BUS_FARE, 0),
        ("revenue", BUS_FARE, 0),
    ]
    status, printed = run_reconcile(books.dsn, capsys)
    assert (status, printed.splitlines()[-1]) == (1, "FAILED: 2 differences")


# --- the command line -----------------------------------------------------------------------------


def test_office_commands_parse() -> None:
    parser = argparse.ArgumentParser(prog="citycard")
    add_office_commands(parser.add_subparsers(dest="command", required=True))
    daily = parser.parse_args(["report", "daily", "--date", "2030-01-15", "--json", "--dsn", "postgresql://x"])
    assert (daily.handler, daily.date, daily.json, daily.dsn) == (cmd_report_daily, DAY, True, "postgresql://x")
    check = parser.parse_args(["reconcile"])
    assert (check.handler, check.json, check.dsn, check.data_dir) == (cmd_reconcile, False, None, None)
    load = parser.parse_args(["eligibility", "import", "registry.csv", "--actor", "ana", "--dry-run"])
    assert (load.file, load.actor, load.dry_run) == (Path("registry.csv"), "ana", True)
    show = parser.parse_args(["eligibility", "show", "1042"])
    assert show.holder_id == 1042
    assert {OFFICE_COMMANDS[name] for name in ("eligibility", "report", "reconcile")} == {run_office_command}
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "daily", "--date", "15/01/2030"])
    with pytest.raises(SystemExit):
        parser.parse_args(["eligibility", "import", "registry.csv"])  # --actor is required
