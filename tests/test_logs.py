"""Structured logs: JSON lines, and card uids never in clear."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import asyncpg
import pytest

from engine.codes import CardStatus, ResultCode
from engine.logs import CardPseudonyms, JsonFormatter, configure
from tests.city import add_card, create_city, running_engine


def test_json_lines_carry_extra_fields() -> None:
    record = logging.makeLogRecord({"name": "citycard.test", "levelname": "WARNING", "msg": "hello %s", "args": ("x",)})
    record.terminal_id = 7
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "hello x"
    assert (line["level"], line["logger"], line["terminal_id"]) == ("warning", "citycard.test", 7)
    assert line["ts"].endswith("+00:00")


def test_bad_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level must be one of"):
        configure("LOUD")


def test_pseudonyms_are_stable_keyed_and_not_the_uid() -> None:
    uid = 0x04A1B2C3D4E5F6
    ours, theirs = CardPseudonyms(bytes(32)), CardPseudonyms(bytes(range(32)))
    assert ours(uid) == ours(uid)
    assert ours(uid) != theirs(uid)  # another deployment cannot link them
    assert ours(uid) != ours(uid + 1)
    assert str(uid) not in ours(uid) and f"{uid:x}" not in ours(uid)


async def test_inactive_card_is_logged_under_a_pseudonym(
    db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await create_city(conn)
        card = await add_card(conn, balance=1000, status=CardStatus.STOLEN)
    finally:
        await conn.close()
    caplog.set_level(logging.WARNING, logger="citycard.processor")
    async with running_engine(db_dsn, tmp_path) as engine:
        client = await engine.client()
        result = await client.tap(time.time_ns() // 1000, card.uid)
        master = (tmp_path / "master.key").read_bytes()
    assert result.result == ResultCode.CARD_NOT_ACTIVE
    records = [r for r in caplog.records if r.getMessage() == "inactive card presented"]
    assert len(records) == 1
    assert records[0].card == CardPseudonyms(master)(card.uid)  # type: ignore[attr-defined]
    assert str(card.uid) not in JsonFormatter().format(records[0])
