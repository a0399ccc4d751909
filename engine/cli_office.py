"""The card office's commands: eligibility imports, the daily report, reconciliation.

    citycard eligibility import registry.csv --actor ana [--dry-run]
    citycard eligibility show 1042
    citycard report daily --date 2026-03-02 [--json]
    citycard reconcile [--json]

``add_office_commands(subparsers)`` adds them to the ``citycard`` parser;
each leaf command sets ``handler``, a plain function of the parsed arguments
that returns the exit status, and ``OFFICE_COMMANDS`` maps the top-level
names to ``run_office_command``, which calls it.

Exit statuses: 0 success; 1 a runtime failure, or differences found by
``reconcile``; 2 bad usage, or an eligibility file refused.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import orjson

from engine.db import connect, default_data_dir, resolve_database, run_sync
from engine.eligibility import (
    ACTOR_CHARS_MAX,
    ELIGIBILITY_FILE_BYTES_MAX,
    FILE_LINE,
    EligibilityImportError,
    RowError,
    holder_eligibility,
    import_eligibility,
)
from engine.migrate import migrate
from engine.reports import DailyFigures, DailyReport, ReconcileResult, daily_report, reconcile

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_T = TypeVar("_T")

Handler = Callable[[argparse.Namespace], int]


def add_office_commands(subparsers: Any) -> None:
    """Add ``eligibility``, ``report`` and ``reconcile`` to ``citycard``'s subparsers.

    Example::

        commands = parser.add_subparsers(dest="command", required=True)
        add_office_commands(commands)
        args = parser.parse_args(["reconcile", "--json"])
        args.handler(args)  # 0 when the books agree
    """
    eligibility = subparsers.add_parser("eligibility", help="concession eligibility from the municipal registry")
    eligibility_commands = eligibility.add_subparsers(dest="eligibility_command", required=True)
    load = eligibility_commands.add_parser("import", help="check a registry CSV file and apply it, all or nothing")
    add_database_options(load)
    load.add_argument("file", type=Path, help="the registry's CSV file (docs/card-office.md)")
    load.add_argument("--actor", required=True, help="who is importing, for the audit log")
    load.add_argument("--dry-run", action="store_true", help="check and report only; apply nothing")
    load.set_defaults(handler=cmd_eligibility_import)
    show = eligibility_commands.add_parser("show", help="a holder's eligibility rows")
    add_database_options(show)
    show.add_argument("holder_id", type=int)
    show.set_defaults(handler=cmd_eligibility_show)

    report = subparsers.add_parser("report", help="reports from the tap record")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    daily = report_commands.add_parser("daily", help="one UTC day per service and fare profile")
    add_database_options(daily)
    daily.add_argument("--date", type=_iso_date, required=True, help="the day, YYYY-MM-DD (UTC)")
    daily.add_argument("--json", action="store_true", help="print JSON instead of a table")
    daily.set_defaults(handler=cmd_report_daily)

    check = subparsers.add_parser("reconcile", help="check balances, transfers and batches against the ledger")
    add_database_options(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(handler=cmd_reconcile)


def run_office_command(args: argparse.Namespace) -> int:
    """Run the leaf command ``add_office_commands`` parsed."""
    handler: Handler = args.handler
    return handler(args)


OFFICE_COMMANDS: dict[str, Handler] = {
    "eligibility": run_office_command,
    "report": run_office_command,
    "reconcile": run_office_command,
}


def add_database_options(parser: argparse.ArgumentParser) -> None:
    """``--dsn`` and ``--data-dir``, exactly as every other ``citycard`` command
    takes them. Defined here rather than imported from ``engine.cli``, which
    imports this module: the import would go round in a circle."""
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $CITYCARD_DSN, else the embedded server)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded server and the master key live (default: $CITYCARD_DATA_DIR or ./var)",
    )


def _iso_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def _on_database(args: argparse.Namespace, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
    """Run ``work`` on a connection to the command's database, migrated first
    (as ``citycard status`` does, so a new data directory just works)."""

    async def run(dsn: str) -> _T:
        conn = await connect(dsn)
        try:
            await migrate(conn)
            return await work(conn)
        finally:
            await conn.close()

    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    with resolve_database(args.dsn, data_dir) as database:
        return run_sync(run(database.dsn))


def _json(value: object) -> str:
    return orjson.dumps(msgspec.to_builtins(value), option=orjson.OPT_INDENT_2).decode()


def _error(message: str) -> None:
    print(f"citycard: error: {message}", file=sys.stderr)


# --- eligibility ------------------------------------------------------------------------


def cmd_eligibility_import(args: argparse.Namespace) -> int:
    """``citycard eligibility import FILE --actor NAME [--dry-run]``: 0 applied
    (or, dry, would apply), 2 refused with every error printed."""
    path: Path = args.file
    try:
        size = path.stat().st_size
        if size > ELIGIBILITY_FILE_BYTES_MAX:
            _error(f"{path}: {size} bytes, more than the limit of {ELIGIBILITY_FILE_BYTES_MAX}")
            return EXIT_USAGE
        data = path.read_bytes()
    except OSError as error:
        _error(f"cannot read {path}: {error.strerror or error}")
        return EXIT_USAGE
    if not 1 <= len(args.actor) <= ACTOR_CHARS_MAX:
        _error(f"--actor must be 1 to {ACTOR_CHARS_MAX} characters")
        return EXIT_USAGE

    async def work(conn: asyncpg.Connection) -> object:
        return await import_eligibility(conn, data, file_name=path.name, actor=args.actor, dry_run=args.dry_run)

    try:
        result = _on_database(args, work)
    except EligibilityImportError as refused:
        for line in error_lines(str(path), refused.errors, refused.error_count):
            print(line, file=sys.stderr)
        return EXIT_USAGE
    print(_json(result))
    return EXIT_OK


def error_lines(file_name: str, errors: list[RowError], error_count: int) -> list[str]:
    """``FILE:LINE: message`` per error (the form editors jump to), then
    ``and N more`` when some were not listed, then what happened.

    >>> error_lines("r.csv", [RowError(3, "unknown holder 9")], 5)
    ['r.csv:3: unknown holder 9', 'r.csv: and 4 more', 'r.csv: 5 errors, nothing applied']
    """
    lines = [
        f"{file_name}: {error.message}" if error.line == FILE_LINE else f"{file_name}:{error.line}: {error.message}"
        for error in errors
    ]
    if error_count > len(errors):
        lines.append(f"{file_name}: and {error_count - len(errors)} more")
    lines.append(f"{file_name}: {error_count} error{'' if error_count == 1 else 's'}, nothing applied")
    return lines


def cmd_eligibility_show(args: argparse.Namespace) -> int:
    """``citycard eligibility show HOLDER_ID``: the holder's rows as JSON; 2 if no such holder."""

    async def work(conn: asyncpg.Connection) -> object:
        return await holder_eligibility(conn, args.holder_id)

    found = _on_database(args, work)
    if found is None:
        _error(f"no holder {args.holder_id}")
        return EXIT_USAGE
    print(_json(found))
    return EXIT_OK


# --- reports ------------------------------------------------------------------------------


def cmd_report_daily(args: argparse.Namespace) -> int:
    """``citycard report daily --date YYYY-MM-DD [--json]``."""

    async def work(conn: asyncpg.Connection) -> DailyReport:
        return await daily_report(conn, args.date)

    report = _on_database(args, work)
    print(_json(report) if args.json else "\n".join(daily_report_table(report)))
    return EXIT_OK


_TABLE_COLUMNS = (
    ("uses", "uses"),
    ("fare_cents", "fares"),
    ("refund_cents", "refunds"),
    ("revenue_cents", "revenue"),
    ("topups", "top-ups"),
    ("topup_cents", "top-up cents"),
    ("topup_reversed_cents", "reversed"),
)


def daily_report_table(report: DailyReport) -> list[str]:
    """The report as a plain-text table: a line per service and profile, a
    total per service, and the day's total. Money is in cents."""
    rows: list[tuple[str, str, DailyFigures]] = []
    for service in report.services:
        rows += [(line.service, line.profile, line) for line in report.lines if line.service == service.service]
        rows.append((service.service, "all", service))
    rows.append(("TOTAL", "", report.total))
    service_width = max(len("service"), *(len(row[0]) for row in rows))
    profile_width = max(len("profile"), *(len(row[1]) for row in rows))
    widths = [max(len(title), *(len(str(getattr(row[2], name))) for row in rows)) for name, title in _TABLE_COLUMNS]

    def format_row(service: str, profile: str, cells: list[str], declines: str) -> str:
        numbers = "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))
        return f"{service:<{service_width}}  {profile:<{profile_width}}  {numbers}  {declines}".rstrip()

    lines = [
        f"Daily report {report.day.isoformat()}: taps recorded from {report.starts_at.isoformat()}"
        f" to {report.ends_at.isoformat()} (UTC). Money in cents.",
        format_row("service", "profile", [title for _, title in _TABLE_COLUMNS], "declines"),
    ]
    for service_code, profile_code, figures in rows:
        declines = ", ".join(f"{name} {count}" for name, count in figures.declines.items()) or "-"
        cells = [str(getattr(figures, name)) for name, _ in _TABLE_COLUMNS]
        lines.append(format_row(service_code, profile_code, cells, declines))
    if report.products:
        lines.append("Passes and tickets (paid at the card office, not in the fares above):")
        for sales in report.products:
            lines.append(
                f"  {sales.product} ({sales.kind}): {sales.sold} sold for {sales.price_cents}, {sales.uses} taps paid"
            )
    offline = report.offline
    if offline.taps or offline.accounts_in_debt:
        differs = ", ".join(f"{name} {count}" for name, count in offline.differs.items()) or "none"
        lines.append(
            f"Taps decided offline (uploaded this day, counted above too): {offline.taps},"
            f" {offline.approved} approved charging {offline.charged_cents}, {offline.declined} declined;"
            f" the engine would have decided otherwise: {differs}; uncollected beyond the debt limit:"
            f" {offline.uncollected_cents}"
        )
        lines.append(f"Card accounts in debt now: {offline.accounts_in_debt}, owing {offline.debt_cents}")
    return lines


def cmd_reconcile(args: argparse.Namespace) -> int:
    """``citycard reconcile [--json]``: 0 when the books agree, 1 when any difference is found."""
    result = _on_database(args, reconcile)
    print(
        _json({"ok": result.ok, **msgspec.structs.asdict(result)}) if args.json else "\n".join(reconcile_text(result))
    )
    return EXIT_OK if result.ok else EXIT_FAILURE


def reconcile_text(result: ReconcileResult) -> list[str]:
    """Every difference found, one a line, then the verdict."""
    lines = [
        f"checked {result.accounts_checked} accounts, {result.transfers_checked} ledger transfers,"
        f" {result.batches_checked} batches, {result.tickets_checked} multi-ride tickets"
    ]
    for account in result.account_differences:
        balance = "no such account" if account.balance_cents is None else str(account.balance_cents)
        lines.append(
            f"account {account.account_id}: balance {balance}, ledger {account.ledger_cents},"
            f" difference {account.difference_cents}"
        )
    lines += _more(result.account_differences_total, len(result.account_differences), "account")
    for transfer in result.transfer_differences:
        lines.append(f"transfer {transfer.transfer_id}: entries sum to {transfer.sum_cents}, not 0")
    lines += _more(result.transfer_differences_total, len(result.transfer_differences), "transfer")
    for batch in result.batch_differences:
        if batch.movement == "card":
            subject = f"card account {batch.account_id}"
        else:
            subject = f"{batch.ledger_kind} transfer of service {batch.service_id}, {batch.movement} accounts"
        lines.append(
            f"batch {batch.batch_id}: {subject}: taps {batch.taps_cents}, ledger {batch.ledger_cents},"
            f" difference {batch.difference_cents}"
        )
    lines += _more(result.batch_differences_total, len(result.batch_differences), "batch")
    for ticket in result.ticket_differences:
        lines.append(
            f"ticket {ticket.product_id}: {ticket.rides_used} of {ticket.rides} rides used,"
            f" taps record {ticket.rides_recorded}"
        )
    lines += _more(result.ticket_differences_total, len(result.ticket_differences), "ticket")
    lines.append("OK: the books agree" if result.ok else f"FAILED: {result.differences_total} differences")
    return lines


def _more(total: int, listed: int, what: str) -> list[str]:
    return [f"and {total - listed} more {what} differences"] if total > listed else []
