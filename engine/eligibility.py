"""Concession eligibility from the municipal registry: a CSV file, checked
row by row, applied all or nothing.

The registry says which holder may use which concession profile, on what
grounds and for which days. Its file is the only source of those rights, so
a file with any bad row is refused whole: applying the good rows of a wrong
export would grant or renew concessions nobody checked.

The file (``docs/card-office.md`` has an example)::

    holder_id,profile,source,valid_from,valid_until
    1042,student,enrolment,2025-09-01,2026-08-31

A valid file is applied in ONE transaction: a row in ``eligibility_imports``,
every row upserted (a renewal replaces the period) with that import's id, one
``audit_log`` row, and a notification on ``ELIGIBILITY_CHANNEL`` carrying the
import id, delivered at commit, so a running engine re-reads exactly the rows
of that import.

Example::

    parsed = parse_eligibility_csv(data, {"standard": 0, "student": 1})
    parsed.errors  # [] when every row is good
    result = await import_eligibility(conn, data, file_name="registry.csv", actor="ana")
    result.import_id  # 7
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io

import asyncpg
import msgspec
import orjson

from engine.limits import DB_COMMAND_TIMEOUT_S
from engine.state import STANDARD_PROFILE

# The registry exports one row per (holder, concession). Gijón has ~340,000
# holders and about 45% of them hold a concession; a million rows leaves room
# for every holder holding three at once, or a region's first load.
ELIGIBILITY_ROWS_MAX = 1_000_000

# The longest valid row is about 60 bytes ("20000000,large_family,
# large_family,2026-01-01,2027-01-01"), so ELIGIBILITY_ROWS_MAX rows fit in
# 64 MiB with room for spaces and CRLF line ends. A larger file is not a
# registry export, and is refused before it is read.
ELIGIBILITY_FILE_BYTES_MAX = 64 * 1024 * 1024

# An operator fixes a file from its first errors, and a file wrong throughout
# (a wrong export, a shifted column) shows its pattern long before a hundred.
# The rest are counted ("and N more"), not listed.
ELIGIBILITY_ERRORS_REPORTED_MAX = 100

# No field of a valid row is longer than a profile code or a holder id; a
# field past this is a broken file (an unclosed quote swallowing the rest).
ELIGIBILITY_FIELD_CHARS_MAX = 200

# A COPY of many rows may take longer than an ordinary statement: allow 50 us
# a row on top of the usual timeout (a slow disk copies ~20,000 rows a
# second), so the largest file still loads on a slow machine.
IMPORT_SECONDS_PER_ROW = 50e-6

# The audit log's actor column holds 1 to 100 characters (schema CHECK).
ACTOR_CHARS_MAX = 100

# Listeners (the engine) re-read the rows of the import id sent here.
ELIGIBILITY_CHANNEL = "citycard_eligibility"

AUDIT_ACTION = "eligibility.import"

HEADER = ("holder_id", "profile", "source", "valid_from", "valid_until")

# The grounds a concession may rest on: the CHECK list of eligibility.source
# in schema/0003_city_rules.sql (tests/test_eligibility.py checks they agree).
SOURCES = frozenset(
    {"enrolment", "pension", "unemployment", "age", "residency", "disability", "large_family", "office"}
)

# holder_id is a PostgreSQL bigint.
_HOLDER_ID_MAX = 2**63 - 1

# Line 0 in a RowError means the file as a whole (too large, not text, ...).
FILE_LINE = 0


class EligibilityRow(msgspec.Struct, frozen=True):
    """One good row of a registry file, with the line it came from."""

    line: int
    holder_id: int
    profile_id: int
    source: str
    valid_from: datetime.date
    valid_until: datetime.date


class RowError(msgspec.Struct, frozen=True):
    """What is wrong with one line (``FILE_LINE``: with the whole file)."""

    line: int
    message: str


class ParsedFile(msgspec.Struct, frozen=True):
    """A registry file read against the known profiles.

    ``errors`` lists the first ``ELIGIBILITY_ERRORS_REPORTED_MAX`` bad lines
    in line order; ``error_count`` counts them all.
    """

    rows: list[EligibilityRow]
    errors: list[RowError]
    error_count: int

    @property
    def ok(self) -> bool:
        return self.error_count == 0


class ImportResult(msgspec.Struct, frozen=True):
    """What an import applied (or, with ``dry_run``, would apply).

    ``renewed`` rows replaced the period of an existing (holder, profile);
    ``inserted`` ones are new. ``import_id`` is None on a dry run.
    """

    import_id: int | None
    file_name: str
    sha256: str
    rows: int
    inserted: int
    renewed: int
    dry_run: bool


class EligibilityImportError(Exception):
    """The file was refused and nothing was applied.

    ``errors`` holds the first ``ELIGIBILITY_ERRORS_REPORTED_MAX`` problems
    in line order; ``error_count`` counts them all.
    """

    def __init__(self, errors: list[RowError], error_count: int) -> None:
        self.errors = errors
        self.error_count = error_count
        first = f": line {errors[0].line}: {errors[0].message}" if errors else ""
        super().__init__(f"eligibility file refused, {error_count} error(s){first}")


# --- reading the file -------------------------------------------------------------


def parse_eligibility_csv(data: bytes, profiles: dict[str, int]) -> ParsedFile:
    """Check a registry file row by row, without a database.

    ``profiles`` maps profile codes to ids (the ``profiles`` table). Holders
    are not checked here (that needs the database: ``import_eligibility``).

    >>> parsed = parse_eligibility_csv(
    ...     b"holder_id,profile,source,valid_from,valid_until\\n"
    ...     b"7,student,enrolment,2025-09-01,2026-08-31\\n"
    ...     b"8,student,enrolment,2026-09-01,2026-08-31\\n",
    ...     {"standard": 0, "student": 1},
    ... )
    >>> [(row.line, row.holder_id) for row in parsed.rows]
    [(2, 7)]
    >>> parsed.errors
    [RowError(line=3, message='valid_until 2026-08-31 is before valid_from 2026-09-01')]
    """
    errors = _ErrorList()
    if len(data) > ELIGIBILITY_FILE_BYTES_MAX:
        errors.add(FILE_LINE, f"file is {len(data)} bytes, more than the limit of {ELIGIBILITY_FILE_BYTES_MAX}")
        return errors.parsed([])
    try:
        # utf-8-sig: spreadsheet exports often start with a byte order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        errors.add(FILE_LINE, f"not UTF-8 text: byte 0x{data[error.start]:02x} at offset {error.start}")
        return errors.parsed([])
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[EligibilityRow] = []
    first_line_of: dict[tuple[int, int], int] = {}
    header_seen = False
    data_rows = 0
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or fields == [""]:
                continue  # blank lines carry nothing; a trailing one is common
            if not header_seen:
                header_seen = True
                header = tuple(field.strip() for field in fields)
                if header != HEADER:
                    shown = ",".join(header)[:ELIGIBILITY_FIELD_CHARS_MAX]  # not a whole line of noise
                    errors.add(line, f"header must be {','.join(HEADER)}, got {shown}")
                    # Without the agreed columns no row can be read safely.
                    return errors.parsed([])
                continue
            data_rows += 1
            if data_rows > ELIGIBILITY_ROWS_MAX:
                errors.add(FILE_LINE, f"more than {ELIGIBILITY_ROWS_MAX} rows")
                return errors.parsed(rows)
            row, problems = _parse_row(line, fields, profiles)
            if row is not None:
                key = (row.holder_id, row.profile_id)
                first = first_line_of.setdefault(key, line)
                if first != line:
                    problems.append(f"duplicate of line {first} (holder {row.holder_id}, same profile)")
                elif not problems:
                    rows.append(row)
            if problems:
                errors.add(line, "; ".join(problems))
    except csv.Error as error:
        errors.add(reader.line_num, f"not readable as CSV: {error}")
        return errors.parsed(rows)
    if not header_seen:
        errors.add(FILE_LINE, f"empty file: expected the header {','.join(HEADER)}")
    return errors.parsed(rows)


def _parse_row(line: int, fields: list[str], profiles: dict[str, int]) -> tuple[EligibilityRow | None, list[str]]:
    """The row, or None when it cannot be built, and every problem found."""
    if len(fields) != len(HEADER):
        return None, [f"expected {len(HEADER)} columns, got {len(fields)}"]
    holder_text, profile_code, source, from_text, until_text = (field.strip() for field in fields)
    too_long = [name for name, field in zip(HEADER, fields, strict=True) if len(field) > ELIGIBILITY_FIELD_CHARS_MAX]
    if too_long:
        return None, [f"{name} longer than {ELIGIBILITY_FIELD_CHARS_MAX} characters" for name in too_long]
    problems: list[str] = []
    holder_id = _holder_id(holder_text, problems)
    profile_id = profiles.get(profile_code)
    if profile_id is None:
        problems.append(f"unknown profile {profile_code!r}")
    elif profile_id == STANDARD_PROFILE:
        problems.append(f"profile {profile_code!r} is the standard fare and needs no eligibility")
    if source not in SOURCES:
        problems.append(f"unknown source {source!r} (one of {', '.join(sorted(SOURCES))})")
    valid_from = _date("valid_from", from_text, problems)
    valid_until = _date("valid_until", until_text, problems)
    if valid_from is not None and valid_until is not None and valid_until < valid_from:
        problems.append(f"valid_until {valid_until} is before valid_from {valid_from}")
    if holder_id is None or profile_id is None or valid_from is None or valid_until is None:
        return None, problems
    return EligibilityRow(line, holder_id, profile_id, source, valid_from, valid_until), problems


def _holder_id(text: str, problems: list[str]) -> int | None:
    # isascii: str.isdigit also accepts digits of other scripts ("٣", "²").
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= _HOLDER_ID_MAX:
        problems.append(f"holder_id {text!r} is not a positive whole number")
        return None
    return int(text)


def _date(name: str, text: str, problems: list[str]) -> datetime.date | None:
    # Only YYYY-MM-DD: fromisoformat alone also takes "20260131" and week
    # dates, forms the registry never sends and a reader could misread.
    digits = text.replace("-", "")
    if len(text) != 10 or text[4] != "-" or text[7] != "-" or not (digits.isascii() and digits.isdigit()):
        problems.append(f"{name} {text!r} is not a date (YYYY-MM-DD)")
        return None
    try:
        return datetime.date.fromisoformat(text)
    except ValueError as error:
        problems.append(f"{name} {text!r} is not a date: {error}")
        return None


class _ErrorList:
    """The first ELIGIBILITY_ERRORS_REPORTED_MAX errors, and how many in all."""

    def __init__(self) -> None:
        self.errors: list[RowError] = []
        self.count = 0

    def add(self, line: int, message: str) -> None:
        self.count += 1
        # A problem with the whole file (at most one, it ends the reading) is
        # always listed, even after a hundred bad rows: it explains them.
        if line == FILE_LINE or len(self.errors) < ELIGIBILITY_ERRORS_REPORTED_MAX:
            self.errors.append(RowError(line, message))

    def parsed(self, rows: list[EligibilityRow]) -> ParsedFile:
        errors = sorted(self.errors, key=_by_line)[:ELIGIBILITY_ERRORS_REPORTED_MAX]
        return ParsedFile(rows=rows, errors=errors, error_count=self.count)


def _by_line(error: RowError) -> int:
    return error.line


# --- applying it --------------------------------------------------------------------

_INCOMING_SQL = """
CREATE TEMPORARY TABLE eligibility_incoming (
    line         integer NOT NULL,
    holder_id    bigint NOT NULL,
    profile_id   smallint NOT NULL,
    source       text NOT NULL,
    valid_from   date NOT NULL,
    valid_until  date NOT NULL
) ON COMMIT DROP
"""
_INCOMING_COLUMNS = ("line", "holder_id", "profile_id", "source", "valid_from", "valid_until")

_UNKNOWN_HOLDERS_SQL = """
SELECT i.line, i.holder_id, count(*) OVER () AS total
FROM eligibility_incoming i
WHERE NOT EXISTS (SELECT 1 FROM holders h WHERE h.id = i.holder_id)
ORDER BY i.line
LIMIT $1
"""

_RENEWED_SQL = """
SELECT count(*) FROM eligibility_incoming i
JOIN eligibility e ON e.holder_id = i.holder_id AND e.profile_id = i.profile_id
"""

_UPSERT_SQL = """
INSERT INTO eligibility (holder_id, profile_id, source, valid_from, valid_until, import_id, updated_at)
SELECT holder_id, profile_id, source, valid_from, valid_until, $1, clock_timestamp()
FROM eligibility_incoming
ORDER BY holder_id, profile_id
ON CONFLICT (holder_id, profile_id) DO UPDATE
SET source = EXCLUDED.source,
    valid_from = EXCLUDED.valid_from,
    valid_until = EXCLUDED.valid_until,
    import_id = EXCLUDED.import_id,
    updated_at = EXCLUDED.updated_at
"""


async def import_eligibility(
    conn: asyncpg.Connection, data: bytes, *, file_name: str, actor: str, dry_run: bool = False
) -> ImportResult:
    """Check a registry file and, when every row is good and ``dry_run`` is
    false, apply it in one transaction. Raises ``EligibilityImportError``
    (nothing applied) when any row is bad.

    Example::

        result = await import_eligibility(conn, Path("registry.csv").read_bytes(),
                                          file_name="registry.csv", actor="ana")
        result.rows, result.renewed  # (340000, 12000)
    """
    if not 1 <= len(actor) <= ACTOR_CHARS_MAX:
        raise ValueError(f"actor must be 1 to {ACTOR_CHARS_MAX} characters, got {len(actor)}")
    profiles = {str(code): int(profile_id) for code, profile_id in await conn.fetch("SELECT code, id FROM profiles")}
    parsed = parse_eligibility_csv(data, profiles)
    sha256 = hashlib.sha256(data).hexdigest()
    timeout_s = DB_COMMAND_TIMEOUT_S + len(parsed.rows) * IMPORT_SECONDS_PER_ROW
    transaction = conn.transaction()
    await transaction.start()
    try:
        if not dry_run:
            # One import at a time, and no card-office edit of eligibility in
            # between: the renewed count and the rows stamped with this
            # import id describe exactly what the commit changed. Plain reads
            # (the engine loading the city) are not blocked.
            await conn.execute("LOCK TABLE eligibility IN SHARE ROW EXCLUSIVE MODE", timeout=timeout_s)
        await conn.execute(_INCOMING_SQL)
        await conn.copy_records_to_table(
            "eligibility_incoming",
            records=[
                (row.line, row.holder_id, row.profile_id, row.source, row.valid_from, row.valid_until)
                for row in parsed.rows
            ],
            columns=_INCOMING_COLUMNS,
            timeout=timeout_s,
        )
        # Statistics for the joins below: without them the planner guesses
        # the table is small and may walk the holders index row by row.
        await conn.execute("ANALYZE eligibility_incoming", timeout=timeout_s)
        errors, error_count = await _all_errors(conn, parsed, timeout_s)
        if error_count:
            raise EligibilityImportError(errors, error_count)
        renewed = int(await conn.fetchval(_RENEWED_SQL, timeout=timeout_s))
        import_id: int | None = None
        if not dry_run:
            import_id = await _apply(conn, file_name, sha256, len(parsed.rows), actor, timeout_s)
    except BaseException:
        await transaction.rollback()
        raise
    if dry_run:
        await transaction.rollback()
    else:
        await transaction.commit()
    return ImportResult(
        import_id=import_id,
        file_name=file_name,
        sha256=sha256,
        rows=len(parsed.rows),
        inserted=len(parsed.rows) - renewed,
        renewed=renewed,
        dry_run=dry_run,
    )


async def _all_errors(conn: asyncpg.Connection, parsed: ParsedFile, timeout_s: float) -> tuple[list[RowError], int]:
    """The file's errors and its unknown holders, first ones by line, capped."""
    unknown = await conn.fetch(_UNKNOWN_HOLDERS_SQL, ELIGIBILITY_ERRORS_REPORTED_MAX, timeout=timeout_s)
    unknown_count = int(unknown[0]["total"]) if unknown else 0
    # Each list is the first ones of its kind by line, so the first ones of
    # both together are among them.
    merged = parsed.errors + [RowError(row["line"], f"unknown holder {row['holder_id']}") for row in unknown]
    merged.sort(key=_by_line)
    return merged[:ELIGIBILITY_ERRORS_REPORTED_MAX], parsed.error_count + unknown_count


async def _apply(conn: asyncpg.Connection, file_name: str, sha256: str, rows: int, actor: str, timeout_s: float) -> int:
    import_id = int(
        await conn.fetchval(
            "INSERT INTO eligibility_imports (file_name, sha256, rows, imported_by) VALUES ($1, $2, $3, $4)"
            " RETURNING id",
            file_name,
            sha256,
            rows,
            actor,
        )
    )
    await conn.execute(_UPSERT_SQL, import_id, timeout=timeout_s)
    detail = orjson.dumps({"file": file_name, "rows": rows, "sha256": sha256}).decode()
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        AUDIT_ACTION,
        f"import:{import_id}",
        detail,
    )
    # Delivered when the transaction commits, never before and never on rollback.
    await conn.execute("SELECT pg_notify($1, $2)", ELIGIBILITY_CHANNEL, str(import_id))
    return import_id


# --- reading it back ------------------------------------------------------------------


class EligibilityRecord(msgspec.Struct, frozen=True):
    """A holder's eligibility for one profile, as stored."""

    profile: str
    source: str
    valid_from: datetime.date
    valid_until: datetime.date
    import_id: int | None
    updated_at: datetime.datetime


class HolderEligibility(msgspec.Struct, frozen=True):
    """A holder's own profile and every eligibility row they hold."""

    holder_id: int
    profile: str
    eligibility: list[EligibilityRecord]


async def holder_eligibility(conn: asyncpg.Connection, holder_id: int) -> HolderEligibility | None:
    """The holder's eligibility rows by profile, or None when there is no such holder.

    Example::

        found = await holder_eligibility(conn, 1042)
        [(row.profile, row.valid_until) for row in found.eligibility]
        # [('student', datetime.date(2026, 8, 31))]
    """
    profile = await conn.fetchval(
        "SELECT p.code FROM holders h JOIN profiles p ON p.id = h.profile_id WHERE h.id = $1", holder_id
    )
    if profile is None:
        return None
    rows = await conn.fetch(
        "SELECT p.code, e.source, e.valid_from, e.valid_until, e.import_id, e.updated_at"
        " FROM eligibility e JOIN profiles p ON p.id = e.profile_id"
        " WHERE e.holder_id = $1 ORDER BY e.profile_id",
        holder_id,
    )
    return HolderEligibility(
        holder_id=holder_id, profile=str(profile), eligibility=[EligibilityRecord(*row) for row in rows]
    )
