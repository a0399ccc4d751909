"""Binary COPY into columns (engine.bulk_load): against the real server's
COPY output, cut at every kind of chunk boundary, and against streams that
are not what the loader expects."""

from __future__ import annotations

import asyncio
import struct
from array import array

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import bulk_load
from engine.bulk_load import SIGNATURE, CopyFormatError, FixedWidthColumns
from engine.db import connect
from engine.state import _CARDS_SQL, eligibility_days, load_state

ROWS_SQL = (
    "SELECT g::int8 * 1000003 - 5000000000, (g % 7 - 3)::int2, (g * 31 - 40000)::int4 FROM generate_series(1, $1) g"
)
WIDTHS = (8, 2, 4)


def expected_rows(count: int) -> list[tuple[int, int, int]]:
    return [(g * 1000003 - 5000000000, g % 7 - 3, g * 31 - 40000) for g in range(1, count + 1)]


class Collected:
    """A consumer that keeps every batch's columns."""

    def __init__(self) -> None:
        self.batches: list[list[array[int]]] = []

    def __call__(self, columns: list[array[int]]) -> None:
        self.batches.append(columns)

    def rows(self) -> list[tuple[int, ...]]:
        return [row for batch in self.batches for row in zip(*batch, strict=True)]


async def copy_bytes(conn: asyncpg.Connection, count: int) -> bytes:
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(bytes(chunk))

    await conn.copy_from_query(ROWS_SQL, count, output=sink, format="binary")
    return b"".join(chunks)


async def test_the_servers_rows_come_back_as_typed_columns(conn: asyncpg.Connection) -> None:
    count = 2 * bulk_load.BATCH_ROWS + 17  # two whole batches and a rest
    collected = Collected()
    sink = FixedWidthColumns(WIDTHS, collected)
    await conn.copy_from_query(ROWS_SQL, count, output=sink, format="binary")
    sink.finish()
    assert sink.rows == count
    assert [len(batch[0]) for batch in collected.batches][-1] >= 17
    assert [column.typecode for column in collected.batches[0]] == ["q", "h", "i"]
    assert collected.rows() == expected_rows(count)


async def test_an_empty_result(conn: asyncpg.Connection) -> None:
    collected = Collected()
    sink = FixedWidthColumns(WIDTHS, collected)
    await conn.copy_from_query(ROWS_SQL, 0, output=sink, format="binary")
    sink.finish()
    assert (sink.rows, collected.batches) == (0, [])


@pytest.fixture(scope="module")
def stream(city_dsn: str) -> bytes:
    """300 rows as the server writes them, read once for the property test."""

    async def read() -> bytes:
        conn = await asyncpg.connect(city_dsn)
        try:
            return await copy_bytes(conn, 300)
        finally:
            await conn.close()

    return asyncio.run(read())


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_chunking_gives_the_same_rows(stream: bytes, cuts: list[int]) -> None:
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    collected = Collected()
    sink = FixedWidthColumns(WIDTHS, collected)
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        sink.feed(stream[start:end])
    sink.finish()
    assert collected.rows() == expected_rows(300)


def header() -> bytes:
    return SIGNATURE + struct.pack(">II", 0, 0)


def row(*fields: tuple[int, bytes | None]) -> bytes:
    out = struct.pack(">h", len(fields))
    for width, value in fields:
        out += struct.pack(">i", -1 if value is None else width) + (value or b"")
    return out


def test_a_null_or_a_wrong_width_is_refused() -> None:
    good = row((8, struct.pack(">q", 1)), (2, struct.pack(">h", 2)), (4, struct.pack(">i", 3)))
    null = row((8, struct.pack(">q", 1)), (2, None), (4, struct.pack(">i", 3)))
    for bad in (null + b"\x00\x00\x00\x00\x00\x00", row((8, struct.pack(">q", 1)), (8, bytes(8)))):
        sink = FixedWidthColumns(WIDTHS, Collected())
        sink.feed(header() + good + bad + b"\xff\xff")
        with pytest.raises(CopyFormatError):
            sink.finish()


def test_streams_that_are_not_binary_copy() -> None:
    with pytest.raises(CopyFormatError, match="signature"):
        FixedWidthColumns(WIDTHS, Collected()).feed(b"id,balance\n1,2\n" + bytes(20))
    truncated = FixedWidthColumns(WIDTHS, Collected())
    truncated.feed(header() + row((8, bytes(8)), (2, bytes(2)), (4, bytes(4)))[:-3])
    with pytest.raises(CopyFormatError, match="trailer"):
        truncated.finish()
    with pytest.raises(CopyFormatError, match="header"):
        FixedWidthColumns(WIDTHS, Collected()).finish()
    done = FixedWidthColumns(WIDTHS, Collected())
    done.feed(header() + b"\xff\xff")
    done.finish()
    with pytest.raises(CopyFormatError, match="after the end"):
        done.feed(b"\x00")
    with pytest.raises(ValueError, match="2, 4 or 8"):
        FixedWidthColumns((8, 3), Collected())


async def test_a_loaded_city_holds_exactly_its_rows(seeded_dsn: str) -> None:
    """load_state (binary COPY, columns) against the rows read one by one."""
    conn = await connect(seeded_dsn)
    try:
        state = await load_state(conn)
        cards = await conn.fetch(_CARDS_SQL)
        accounts = await conn.fetch("SELECT id, balance_cents, floor_cents, ceiling_cents FROM accounts")
        products = await conn.fetch("SELECT id, account_id, kind, rides, rides_used FROM card_products")
    finally:
        await conn.close()
    assert state.card_count() == len(cards) > 0
    for uid, status, profile, account_id, holder_id, from_day, until_day in cards:
        card = state.card_position[uid]
        assert (state.card_status[card], state.card_profile[card]) == (status, profile)
        assert state.card_holder[card] == holder_id
        assert state.account_id[state.card_account[card]] == account_id
        eligible = None if from_day is None else (from_day, until_day)
        assert (state.card_eligible_from[card], state.card_eligible_until[card]) == eligibility_days(profile, eligible)
    assert len(state.account_id) == len(accounts)
    for account_id, balance, floor, ceiling in accounts:
        account = state.account_position[account_id]
        assert (state.balance[account], state.floor[account], state.ceiling[account]) == (balance, floor, ceiling)
        assert state.pending_debit[account] == state.pending_credit[account] == 0
    assert len(state.product_by_id) == len(products) > 0  # all current in a fresh city
    for product_id, account_id, kind, rides, rides_used in products:
        held = state.product_by_id[product_id]
        assert held in state.products[state.account_position[account_id]]
        assert (held.kind, held.rides, held.rides_used) == (kind, rides or 0, rides_used)
