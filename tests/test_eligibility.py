"""Concession eligibility imports: every kind of bad row named by its line,
all or nothing, renewals, dry runs, the notification and the audit row.

Parsing tests need no database; the rest run on the tiny city of
tests/city.py (profiles standard and student), each with its own holders.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import re
from pathlib import Path

import asyncpg
import pytest

from engine import eligibility
from engine.cli_office import cmd_eligibility_import, cmd_eligibility_show, error_lines
from engine.eligibility import (
    AUDIT_ACTION,
    ELIGIBILITY_CHANNEL,
    ELIGIBILITY_ERRORS_REPORTED_MAX,
    ELIGIBILITY_FIELD_CHARS_MAX,
    ELIGIBILITY_FILE_BYTES_MAX,
    FILE_LINE,
    HEADER,
    SOURCES,
    EligibilityImportError,
    holder_eligibility,
    import_eligibility,
    parse_eligibility_csv,
)
from tests.city import STUDENT, add_card

PROFILES = {"standard": 0, "student": 1}
HEADER_LINE = ",".join(HEADER)
GOOD_ROW = "7,student,enrolment,2025-09-01,2026-08-31"
OTHER_GOOD_ROW = "8,student,enrolment,2025-09-01,2026-08-31"
# How long a notification may take to arrive on the listening connection.
NOTIFY_WAIT_S = 5.0


def csv_file(*rows: str) -> bytes:
    return ("\n".join([HEADER_LINE, *rows]) + "\n").encode()


# --- parsing, without a database ------------------------------------------------------


# One case per kind of bad row, always on line 3 between two good rows.
BAD_ROWS = [
    ("too few columns", "9,student,enrolment,2025-09-01", "expected 5 columns, got 4"),
    ("too many columns", "9,student,enrolment,2025-09-01,2026-08-31,x", "expected 5 columns, got 6"),
    ("holder not a number", "nine,student,enrolment,2025-09-01,2026-08-31", "holder_id 'nine' is not a positive"),
    ("holder zero", "0,student,enrolment,2025-09-01,2026-08-31", "holder_id '0' is not a positive"),
    ("holder negative", "-9,student,enrolment,2025-09-01,2026-08-31", "holder_id '-9' is not a positive"),
    ("holder past bigint", f"{2**63},student,enrolment,2025-09-01,2026-08-31", "is not a positive whole number"),
    ("unknown profile", "9,astronaut,enrolment,2025-09-01,2026-08-31", "unknown profile 'astronaut'"),
    ("standard profile", "9,standard,office,2025-09-01,2026-08-31", "'standard' is the standard fare and needs no"),
    ("unknown source", "9,student,friendship,2025-09-01,2026-08-31", "unknown source 'friendship'"),
    ("date not ISO", "9,student,enrolment,01/09/2025,2026-08-31", "valid_from '01/09/2025' is not a date (YYYY-MM-DD)"),
    ("date compact", "9,student,enrolment,20250901,2026-08-31", "valid_from '20250901' is not a date (YYYY-MM-DD)"),
    ("date impossible", "9,student,enrolment,2025-09-01,2026-02-30", "valid_until '2026-02-30' is not a date: day"),
    ("date empty", "9,student,enrolment,,2026-08-31", "valid_from '' is not a date"),
    ("end before start", "9,student,enrolment,2026-09-01,2026-08-31", "valid_until 2026-08-31 is before valid_from"),
    ("duplicate in file", GOOD_ROW.replace("2026-08-31", "2027-08-31"), "duplicate of line 2 (holder 7"),
    ("field too long", "9," + "s" * (ELIGIBILITY_FIELD_CHARS_MAX + 1) + ",enrolment,2025-09-01,2026-08-31", "longer"),
]


@pytest.mark.parametrize(("row", "message"), [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS])
def test_bad_row_named_by_line(row: str, message: str) -> None:
    parsed = parse_eligibility_csv(csv_file(GOOD_ROW, row, OTHER_GOOD_ROW), PROFILES)
    assert [error.line for error in parsed.errors] == [3]
    assert message in parsed.errors[0].message
    assert parsed.error_count == 1
    assert not parsed.ok
    assert [row.line for row in parsed.rows] == [2, 4]  # the good rows around it still parse


def test_every_problem_of_a_row_is_named() -> None:
    parsed = parse_eligibility_csv(csv_file("x,astronaut,friendship,2026-13-01,soon"), PROFILES)
    (error,) = parsed.errors
    assert error.line == 2
    for part in ("holder_id 'x'", "unknown profile", "unknown source", "valid_from", "valid_until 'soon'"):
        assert part in error.message


def test_good_file_parses_to_rows() -> None:
    parsed = parse_eligibility_csv(csv_file(GOOD_ROW, " 8 , student , pension , 2025-01-01 , 2025-01-01 "), PROFILES)
    assert parsed.ok and parsed.errors == []
    first, second = parsed.rows
    assert (first.line, first.holder_id, first.profile_id, first.source) == (2, 7, STUDENT, "enrolment")
    assert (first.valid_from, first.valid_until) == (datetime.date(2025, 9, 1), datetime.date(2026, 8, 31))
    # Spaces around fields are ignored, and a one-day period is a period.
    assert (second.holder_id, second.source, second.valid_from) == (8, "pension", second.valid_until)


def test_byte_order_mark_crlf_and_blank_lines_are_accepted() -> None:
    data = ("\ufeff" + HEADER_LINE + "\r\n" + GOOD_ROW + "\r\n\r\n" + OTHER_GOOD_ROW + "\r\n").encode()
    parsed = parse_eligibility_csv(data, PROFILES)
    assert parsed.ok
    assert [row.line for row in parsed.rows] == [2, 4]  # line numbers count the blank line


def test_header_only_is_an_empty_good_file() -> None:
    parsed = parse_eligibility_csv(csv_file(), PROFILES)
    assert parsed.ok and parsed.rows == []


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b"", FILE_LINE, "empty file"),
        (b"holder,profile,source,from,until\n" + GOOD_ROW.encode(), 1, "header must be holder_id,profile"),
        (csv_file(GOOD_ROW) + b"9,student,enrolment,2025-09-01,caf\xe9\n", FILE_LINE, "not UTF-8 text: byte 0xe9"),
        (csv_file('9,"student,enrolment,2025-09-01,2026-08-31'), 2, "not readable as CSV"),
    ],
    ids=["empty", "wrong header", "not utf-8", "unclosed quote"],
)
def test_bad_file(data: bytes, line: int, message: str) -> None:
    parsed = parse_eligibility_csv(data, PROFILES)
    assert parsed.errors[0].line == line
    assert message in parsed.errors[0].message


def test_file_too_large_is_refused_unread() -> None:
    parsed = parse_eligibility_csv(b"x" * (ELIGIBILITY_FILE_BYTES_MAX + 1), PROFILES)
    assert [(error.line, "more than the limit" in error.message) for error in parsed.errors] == [(FILE_LINE, True)]


def test_too_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eligibility, "ELIGIBILITY_ROWS_MAX", 2)
    parsed = parse_eligibility_csv(csv_file(GOOD_ROW, OTHER_GOOD_ROW, "9,student,age,2025-01-01,2025-12-31"), PROFILES)
    assert [(error.line, error.message) for error in parsed.errors] == [(FILE_LINE, "more than 2 rows")]


def test_errors_are_capped_and_counted() -> None:
    bad = [f"{holder},student,enrolment,2026-09-01,2026-08-31" for holder in range(1, 151)]
    parsed = parse_eligibility_csv(csv_file(*bad), PROFILES)
    assert parsed.error_count == 150
    assert len(parsed.errors) == ELIGIBILITY_ERRORS_REPORTED_MAX
    assert [error.line for error in parsed.errors] == list(range(2, 2 + ELIGIBILITY_ERRORS_REPORTED_MAX))
    lines = error_lines("registry.csv", parsed.errors, parsed.error_count)
    assert lines[0].startswith("registry.csv:2: valid_until")
    assert lines[-2:] == ["registry.csv: and 50 more", "registry.csv: 150 errors, nothing applied"]


# --- importing, on a database ----------------------------------------------------------------


async def eligibility_rows(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch("SELECT * FROM eligibility ORDER BY holder_id, profile_id")
    return [tuple(row.values()) for row in rows]


async def counts(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM eligibility_imports) AS imports, (SELECT count(*) FROM audit_log) AS audits"
    )
    return int(row["imports"]), int(row["audits"])


async def student_holders(conn: asyncpg.Connection, n: int) -> list[int]:
    """New student holders with no eligibility yet (tests/city.py numbers a
    card's holder and account alike)."""
    cards = [await add_card(conn, balance=0, profile=STUDENT, eligible=None) for _ in range(n)]
    return [card.account_id for card in cards]


async def test_import_applies_every_row_with_audit(conn: asyncpg.Connection) -> None:
    first, second = await student_holders(conn, 2)
    data = csv_file(
        f"{first},student,enrolment,2025-09-01,2026-08-31",
        f"{second},student,residency,2026-01-01,2026-12-31",
    )
    result = await import_eligibility(conn, data, file_name="registry-2026-01.csv", actor="ana")
    assert (result.rows, result.inserted, result.renewed, result.dry_run) == (2, 2, 0, False)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.import_id is not None

    rows = await conn.fetch(
        "SELECT holder_id, profile_id, source, valid_from, valid_until, import_id FROM eligibility"
        " WHERE holder_id = ANY($1::int8[]) ORDER BY holder_id",
        [first, second],
    )
    assert [tuple(row.values()) for row in rows] == [
        (first, STUDENT, "enrolment", datetime.date(2025, 9, 1), datetime.date(2026, 8, 31), result.import_id),
        (second, STUDENT, "residency", datetime.date(2026, 1, 1), datetime.date(2026, 12, 31), result.import_id),
    ]
    imported = await conn.fetchrow("SELECT * FROM eligibility_imports WHERE id = $1", result.import_id)
    assert (imported["file_name"], imported["sha256"], imported["rows"], imported["imported_by"]) == (
        "registry-2026-01.csv",
        result.sha256,
        2,
        "ana",
    )
    audit = await conn.fetch("SELECT * FROM audit_log WHERE subject = $1", f"import:{result.import_id}")
    assert len(audit) == 1
    assert (audit[0]["actor"], audit[0]["action"]) == ("ana", AUDIT_ACTION)
    assert json.loads(audit[0]["detail"]) == {"file": "registry-2026-01.csv", "rows": 2, "sha256": result.sha256}

    shown = await holder_eligibility(conn, first)
    assert shown is not None and shown.profile == "student"
    assert [(row.profile, row.source, row.import_id) for row in shown.eligibility] == [
        ("student", "enrolment", result.import_id)
    ]
    assert await holder_eligibility(conn, 987_654_321) is None


async def test_renewal_replaces_the_period(conn: asyncpg.Connection) -> None:
    (holder,) = await student_holders(conn, 1)
    first = await import_eligibility(
        conn, csv_file(f"{holder},student,enrolment,2024-09-01,2025-08-31"), file_name="a.csv", actor="ana"
    )
    renewal = await import_eligibility(
        conn, csv_file(f"{holder},student,residency,2025-09-01,2026-08-31"), file_name="b.csv", actor="luis"
    )
    assert (renewal.inserted, renewal.renewed) == (0, 1)
    rows = await conn.fetch(
        "SELECT source, valid_from, valid_until, import_id FROM eligibility WHERE holder_id = $1", holder
    )
    assert [tuple(row.values()) for row in rows] == [
        ("residency", datetime.date(2025, 9, 1), datetime.date(2026, 8, 31), renewal.import_id)
    ]
    assert renewal.import_id != first.import_id


@pytest.mark.parametrize("bad_row", ["987654321,student,enrolment,2025-09-01,2026-08-31", "x,student,age,,"])
async def test_one_bad_row_applies_nothing(conn: asyncpg.Connection, bad_row: str) -> None:
    first, second = await student_holders(conn, 2)
    before = (await eligibility_rows(conn), await counts(conn))
    data = csv_file(
        f"{first},student,enrolment,2025-09-01,2026-08-31",
        bad_row,
        f"{second},student,enrolment,2025-09-01,2026-08-31",
    )
    with pytest.raises(EligibilityImportError) as refused:
        await import_eligibility(conn, data, file_name="bad.csv", actor="ana")
    assert [error.line for error in refused.value.errors] == [3]
    assert refused.value.error_count == 1
    assert (await eligibility_rows(conn), await counts(conn)) == before


async def test_unknown_holders_are_reported_with_file_errors_in_line_order(conn: asyncpg.Connection) -> None:
    (holder,) = await student_holders(conn, 1)
    data = csv_file(
        "987654321,student,enrolment,2025-09-01,2026-08-31",
        f"{holder},student,enrolment,2026-09-01,2026-08-31",
        "987654322,student,enrolment,2025-09-01,2026-08-31",
    )
    with pytest.raises(EligibilityImportError) as refused:
        await import_eligibility(conn, data, file_name="bad.csv", actor="ana")
    assert [(error.line, error.message.split(" ")[0]) for error in refused.value.errors] == [
        (2, "unknown"),
        (3, "valid_until"),
        (4, "unknown"),
    ]
    assert refused.value.errors[0].message == "unknown holder 987654321"


async def test_dry_run_changes_nothing(conn: asyncpg.Connection) -> None:
    first, second = await student_holders(conn, 2)
    await import_eligibility(
        conn, csv_file(f"{first},student,enrolment,2024-09-01,2025-08-31"), file_name="a.csv", actor="ana"
    )
    before = (await eligibility_rows(conn), await counts(conn))
    data = csv_file(
        f"{first},student,enrolment,2025-09-01,2026-08-31",
        f"{second},student,enrolment,2025-09-01,2026-08-31",
    )
    result = await import_eligibility(conn, data, file_name="b.csv", actor="ana", dry_run=True)
    assert (result.import_id, result.rows, result.inserted, result.renewed, result.dry_run) == (None, 2, 1, 1, True)
    assert (await eligibility_rows(conn), await counts(conn)) == before
    with pytest.raises(EligibilityImportError):
        await import_eligibility(
            conn, csv_file("0,student,age,2025-01-01,2025-12-31"), file_name="c.csv", actor="a", dry_run=True
        )


async def test_notification_carries_the_import_id(conn: asyncpg.Connection, city_dsn: str) -> None:
    (holder,) = await student_holders(conn, 1)
    listener = await asyncpg.connect(city_dsn)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(ELIGIBILITY_CHANNEL, lambda *event: received.put_nowait(event[3]))
        data = csv_file(f"{holder},student,enrolment,2025-09-01,2026-08-31")
        # A dry run and a refused file notify nothing: the first notification
        # to arrive is the applied import's.
        await import_eligibility(conn, data, file_name="dry.csv", actor="ana", dry_run=True)
        with pytest.raises(EligibilityImportError):
            await import_eligibility(conn, data + b"1,student\n", file_name="bad.csv", actor="ana")
        result = await import_eligibility(conn, data, file_name="good.csv", actor="ana")
        payload = await asyncio.wait_for(received.get(), NOTIFY_WAIT_S)
        assert payload == str(result.import_id)
        assert received.empty()
    finally:
        await listener.close()


async def test_actor_must_fit_the_audit_log(conn: asyncpg.Connection) -> None:
    with pytest.raises(ValueError, match="actor"):
        await import_eligibility(conn, csv_file(), file_name="a.csv", actor="")


async def test_sources_match_the_schema(conn: asyncpg.Connection) -> None:
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'eligibility'::regclass AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%source%'"
    )
    assert set(re.findall(r"'([a-z_]+)'::text", definition)) == SOURCES


# --- the commands ------------------------------------------------------------------------------


def import_args(dsn: str, path: Path, *, dry_run: bool = False) -> argparse.Namespace:
    return argparse.Namespace(dsn=dsn, data_dir=None, file=path, actor="ana", dry_run=dry_run)


async def test_command_refuses_a_bad_file_with_every_error(
    conn: asyncpg.Connection, city_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (holder,) = await student_holders(conn, 1)
    path = tmp_path / "registry.csv"
    path.write_bytes(
        csv_file(
            f"{holder},student,enrolment,2025-09-01,2026-08-31",
            f"{holder},standard,office,2025-09-01,2026-08-31",
            "987654321,student,enrolment,2025-09-01,2026-08-31",
        )
    )
    before = await eligibility_rows(conn)
    assert cmd_eligibility_import(import_args(city_dsn, path)) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(f"{path}:3: profile 'standard'")
    assert errors[1] == f"{path}:4: unknown holder 987654321"
    assert errors[2] == f"{path}: 2 errors, nothing applied"
    assert await eligibility_rows(conn) == before


async def test_command_imports_and_shows(
    conn: asyncpg.Connection, city_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (holder,) = await student_holders(conn, 1)
    path = tmp_path / "registry.csv"
    path.write_bytes(csv_file(f"{holder},student,enrolment,2025-09-01,2026-08-31"))
    assert cmd_eligibility_import(import_args(city_dsn, path, dry_run=True)) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] is True
    shown_after_dry_run = await holder_eligibility(conn, holder)
    assert shown_after_dry_run is not None and shown_after_dry_run.eligibility == []
    assert cmd_eligibility_import(import_args(city_dsn, path)) == 0
    imported = json.loads(capsys.readouterr().out)
    assert (imported["rows"], imported["file_name"]) == (1, "registry.csv")

    assert cmd_eligibility_show(argparse.Namespace(dsn=city_dsn, data_dir=None, holder_id=holder)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["eligibility"][0]["valid_until"] == "2026-08-31"
    assert shown["eligibility"][0]["import_id"] == imported["import_id"]
    assert cmd_eligibility_show(argparse.Namespace(dsn=city_dsn, data_dir=None, holder_id=987_654_321)) == 2


def test_command_refuses_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_eligibility_import(import_args("postgresql://unused", tmp_path / "missing.csv")) == 2
    assert "cannot read" in capsys.readouterr().err
