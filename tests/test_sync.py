"""Sync down, through a real engine: the hot list and the rules a terminal
keeps for working offline, their signatures, and the NOTICE that tells
connected terminals of a change (docs/offline.md, docs/protocol.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine import fastpath
from engine.cli import main as cli_main
from engine.client import HotlistCopy, SignatureError, TerminalClient
from engine.codes import CardStatus, HotlistReason
from engine.keys import derive_operator_token, load_master_key
from engine.signing import HOTLIST_LABEL, RULES_LABEL, ListSigner, verify
from tests.city import (
    BUS,
    BUS_FARE,
    BUS_FARE_STUDENT,
    BUS_VALIDATOR,
    KIOSK,
    LIBRARY_GATE,
    STANDARD,
    STUDENT,
    EngineUnderTest,
    add_card,
    load_city_rules,
    running_engine,
)
from tests.metrics_helpers import scrape, value

OPERATOR = "ana.garcia"

# The promise: a block is in every connected terminal's list within this
# (NOTICE, then the terminal's HOTLIST_REQUEST; milliseconds on one host).
BLOCK_REACHES_TERMINALS_S = 2.0

# Terminals connected at once in the block test (sessions of the test
# city's three active terminals).
CONNECTED_TERMINALS = 30


@pytest.fixture(scope="module")
def rules_dsn(city_dsn: str) -> str:
    """The tiny city with a rules version stored (terminals work offline
    only with one)."""

    async def load() -> None:
        conn = await asyncpg.connect(city_dsn)
        try:
            await load_city_rules(conn)
        finally:
            await conn.close()

    asyncio.run(load())
    return city_dsn


@pytest.fixture
async def engine(rules_dsn: str, tmp_path: Path) -> AsyncIterator[EngineUnderTest]:
    async with running_engine(rules_dsn, tmp_path, admin_port=0) as under_test:
        yield under_test


class Office:
    """The card office, through the engine's admin interface."""

    def __init__(self, http: aiohttp.ClientSession, engine: EngineUnderTest) -> None:
        self.http = http
        self.engine = engine
        token = derive_operator_token(load_master_key(engine.data_dir), OPERATOR)
        self.headers = {"Authorization": f"Bearer {OPERATOR}:{token}"}

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self.http.post(self.engine.admin_url + path, json=body or {}, headers=self.headers) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
            assert response.status in (200, 201), answer
            return answer

    async def block(self, uid: int, reason: str = "blocked") -> None:
        await self.post(f"/v1/cards/{uid}/block", {"reason": reason})

    async def unblock(self, uid: int) -> None:
        await self.post(f"/v1/cards/{uid}/unblock")

    async def replace(self, uid: int, new_uid: int) -> None:
        await self.post(f"/v1/cards/{uid}/replace", {"new_uid": new_uid})


def public_key(engine: EngineUnderTest) -> bytes:
    return ListSigner(load_master_key(engine.data_dir)).public_key


async def hotlist_version(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM hotlist_changes"))


async def database_list(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT DISTINCT ON (card_uid) card_uid, reason FROM hotlist_changes ORDER BY card_uid, version DESC"
    )
    return {row[0]: row[1] for row in rows if row[1] != HotlistReason.DELISTED}


async def test_the_hot_list_follows_card_status_in_the_database(conn: asyncpg.Connection) -> None:
    """Every change that lists or delists a card writes its row, in its own
    transaction, whoever makes it (here plain SQL)."""
    before = await hotlist_version(conn)
    card = await add_card(conn, balance=0, status=CardStatus.LOST)
    active = await add_card(conn, balance=0)
    await conn.execute("UPDATE cards SET status = 2 WHERE uid = $1", card.uid)  # unchanged: no row
    await conn.execute("UPDATE cards SET status = 3 WHERE uid = $1", card.uid)
    await conn.execute("UPDATE cards SET status = 0 WHERE uid = $1", card.uid)
    async with conn.transaction():
        await conn.execute("SELECT set_config('citycard.block_reason', 'clone_suspected', true)")
        await conn.execute("UPDATE cards SET status = 1 WHERE uid = $1", active.uid)
    rows = await conn.fetch(
        "SELECT card_uid, listed, reason FROM hotlist_changes WHERE version > $1 ORDER BY version", before
    )
    assert [tuple(row) for row in rows] == [
        (card.uid, True, HotlistReason.LOST),
        (card.uid, True, HotlistReason.STOLEN),
        (card.uid, False, HotlistReason.DELISTED),
        (active.uid, True, HotlistReason.CLONE_SUSPECTED),
    ]
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("DELETE FROM hotlist_changes WHERE version > $1", before)


async def test_a_terminal_at_version_n_receives_exactly_the_changes_to_m(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    cards = [await add_card(conn, balance=100) for _ in range(5)]
    lost_before = await add_card(conn, balance=0, status=CardStatus.LOST)
    await engine.restart()
    client = await engine.client(BUS_VALIDATOR)
    copy = HotlistCopy(public_key(engine))
    await copy.refresh(client)
    n = copy.version
    assert n == await hotlist_version(conn) and copy.listed == await database_list(conn)
    assert copy.listed[lost_before.uid] == HotlistReason.LOST

    async with aiohttp.ClientSession() as http:
        office = Office(http, engine)
        await office.block(cards[0].uid, "lost")
        await office.block(cards[1].uid, "stolen")
        await office.unblock(cards[1].uid)  # listed and delisted between N and M
        await office.replace(cards[2].uid, cards[2].uid + 0x1_0000_0000)
        await office.block(cards[3].uid)
        await office.block(cards[3].uid, "stolen")  # listed twice: its last reason
        await office.unblock(lost_before.uid)
    m = await hotlist_version(conn)
    assert engine.engine is not None
    await wait_until(lambda: engine.engine is not None and engine.engine.hotlist.version == m)

    page = await client.hotlist(n)
    assert (page.flags, page.since_version, page.version) == (0, n, m)
    assert page.entries == sorted(
        [
            (cards[0].uid, HotlistReason.LOST),
            (cards[1].uid, HotlistReason.DELISTED),
            (cards[2].uid, HotlistReason.REPLACED),
            (cards[3].uid, HotlistReason.STOLEN),
            (lost_before.uid, HotlistReason.DELISTED),
        ]
    )
    assert verify(public_key(engine), HOTLIST_LABEL, page.content, page.signature)
    await copy.refresh(client)
    assert copy.version == m and copy.listed == await database_list(conn)
    # Nothing new: an empty page at M.
    empty = await client.hotlist(m)
    assert (empty.flags, empty.version, empty.entries) == (0, m, [])
    # A new terminal (version 0) gets the whole list at M.
    whole = HotlistCopy(public_key(engine))
    await whole.refresh(await engine.client(LIBRARY_GATE))
    assert (whole.version, whole.listed) == (m, copy.listed)


async def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_a_block_reaches_every_connected_terminal_within_seconds(
    engine: EngineUnderTest, conn: asyncpg.Connection
) -> None:
    card = await add_card(conn, balance=500)
    await engine.restart()
    key = public_key(engine)
    terminals = [BUS_VALIDATOR, LIBRARY_GATE, KIOSK]
    clients = [await engine.client(terminals[n % len(terminals)]) for n in range(CONNECTED_TERMINALS)]
    copies = [HotlistCopy(key) for _ in clients]
    for client, copy in zip(clients, copies, strict=True):
        await copy.refresh(client)
        assert not copy.refuses(card.uid)

    async def follow(client: TerminalClient, copy: HotlistCopy) -> float:
        """What a terminal does: on every NOTICE, ask for what it lacks."""
        while not copy.refuses(card.uid):
            hotlist_version, _rules_version = await client.notices.get()
            if hotlist_version > copy.version:
                await copy.refresh(client)
        return time.perf_counter()

    followers = [asyncio.create_task(follow(client, copy)) for client, copy in zip(clients, copies, strict=True)]
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        await Office(http, engine).block(card.uid, "stolen")
    done = await asyncio.wait_for(asyncio.gather(*followers), BLOCK_REACHES_TERMINALS_S * 5)
    slowest = max(done) - started
    print(f"a block reached {len(clients)} connected terminals' lists in {1000 * slowest:.1f} ms")
    assert slowest < BLOCK_REACHES_TERMINALS_S, f"the block took {slowest:.3f} s to reach every terminal"
    assert all(copy.listed[card.uid] == HotlistReason.STOLEN for copy in copies)
    # One page signed for all of them.
    assert engine.engine is not None and engine.engine.sync is not None
    assert engine.engine.sync.pages_signed <= 2 + len(clients)


async def test_rules_of_the_terminals_service_are_signed(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    key = public_key(engine)
    client = await engine.client(BUS_VALIDATOR)
    version = int(await conn.fetchval("SELECT max(version) FROM rules_versions"))
    rules = await client.rules(public_key=key)
    assert (rules.rules_version, rules.service_id) == (version, BUS)
    assert rules.fares == [(STANDARD, BUS_FARE), (STUDENT, BUS_FARE_STUDENT)]
    assert (rules.cap_daily_cents, rules.cap_monthly_cents, rules.transfer_window_minutes) == (-1, -1, 0)
    assert verify(key, RULES_LABEL, rules.content, rules.signature)
    assert not verify(key, HOTLIST_LABEL, rules.content, rules.signature)  # one list's signature is not the other's
    tampered = bytearray(rules.content)
    tampered[-1] ^= 1  # the last fare
    assert not verify(key, RULES_LABEL, bytes(tampered), rules.signature)
    # The same version asked by number; a version the engine does not have: the one in force.
    assert (await client.rules(version)).content == rules.content
    assert (await client.rules(version + 1000)).rules_version == version
    # Another key (another engine's) refuses them.
    with pytest.raises(SignatureError):
        await client.rules(public_key=ListSigner(bytes(32)).public_key)


async def test_a_new_rules_version_is_noticed_and_sent(engine: EngineUnderTest, conn: asyncpg.Connection) -> None:
    client = await engine.client(LIBRARY_GATE)
    old = await client.rules()
    extra = '\n[transfer]\nwindow_minutes = 30\nservices = ["bus"]\ndiscount_percent = 50\n'
    version = await load_city_rules(conn, extra=extra)
    while True:
        _, noticed = await asyncio.wait_for(client.notices.get(), 5)
        if noticed == version:
            break
    new = await client.rules()
    assert (old.rules_version, new.rules_version) == (version - 1, version)
    bus = await (await engine.client(BUS_VALIDATOR)).rules()
    assert (bus.transfer_window_minutes, bus.transfer_percent_off) == (30, 50)


async def test_list_key_prints_the_public_key(
    engine: EngineUnderTest, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CITYCARD_MASTER_KEY", raising=False)
    assert cli_main(["list-key", "--data-dir", str(engine.data_dir)]) == 0
    printed = capsys.readouterr().out
    assert f'"public_key":"{public_key(engine).hex()}"' in printed


async def test_sync_requests_need_an_open_session(engine: EngineUnderTest) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    writer.write(fastpath.encode_hotlist_request(5, 0, 0))
    frames = fastpath.FrameReader().feed(await asyncio.wait_for(reader.read(1024), 5))
    writer.close()
    assert frames[0][:2] == (fastpath.MSG_ERROR, 5)
    assert fastpath.decode_error(frames[0][2])[0] == fastpath.ERR_NOT_AUTHENTICATED


async def test_lists_and_notices_are_counted_for_the_operators(
    rules_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """What an SRE sees of sync down (docs/operations.md): the hot list's
    version and size, the rules version in force, the lists sent by kind and
    the notices pushed."""
    card = await add_card(conn, balance=500)
    async with running_engine(rules_dsn, tmp_path, admin_port=0, metrics_port=0) as engine:
        assert engine.engine is not None and engine.engine.metrics_port is not None
        port = engine.engine.metrics_port

        async def read() -> str:
            return await asyncio.to_thread(scrape, port)

        before = await read()
        assert value(before, "citycard_rules_version") == await conn.fetchval("SELECT max(version) FROM rules_versions")
        assert value(before, "citycard_hotlist_version") == await hotlist_version(conn)
        assert value(before, "citycard_hotlist_cards") == len(await database_list(conn))
        client = await engine.client(BUS_VALIDATOR)
        copy = HotlistCopy(public_key(engine))
        await copy.refresh(client)  # a first copy: the whole list
        await client.rules(public_key=public_key(engine))
        async with aiohttp.ClientSession() as http:
            await Office(http, engine).block(card.uid, "lost")
        await asyncio.wait_for(client.notices.get(), BLOCK_REACHES_TERMINALS_S)
        noticed = await read()
        await copy.refresh(client)  # then only what changed
        after = await read()

    def sent(exposition: str, kind: str) -> float:
        return value(exposition, "citycard_list_frames_total", kind=kind)

    assert sent(noticed, "hotlist_full") - sent(before, "hotlist_full") >= 1
    assert sent(noticed, "rules") - sent(before, "rules") == 1
    assert value(noticed, "citycard_notices_total") - value(before, "citycard_notices_total") >= 1
    assert sent(after, "hotlist_changes") - sent(noticed, "hotlist_changes") >= 1
    assert sent(after, "hotlist_full") == sent(noticed, "hotlist_full")
    assert value(after, "citycard_hotlist_version") == await hotlist_version(conn)
    assert value(after, "citycard_hotlist_cards") == value(before, "citycard_hotlist_cards") + 1
