"""The offline share of a batch: uploaded taps ride along with online ones,
at most OFFLINE_TAPS_PER_BATCH_MAX a batch, so that a fleet's uploads never
stand between an online tap and its commit (docs/offline.md, "Online first").

The batch is composed before any database is touched, so these tests drive
the writer's queues directly.
"""

from __future__ import annotations

import asyncio

from engine import fastpath
from engine.limits import OFFLINE_QUEUE_MAX, OFFLINE_TAPS_PER_BATCH_MAX
from engine.state import CityState
from engine.writer import BatchWriter


def _decision(seq: int) -> fastpath.Decision:
    return fastpath.Decision(1, seq, fastpath.OPERATION_TAP, 42, fastpath.NO_COUNTER, 0, 0, None, 0, 0, 0)


def _writer(batch_taps_max: int = 64) -> BatchWriter:
    return BatchWriter(
        "postgresql://unused",
        CityState(),
        lambda batch, committed: None,
        next_batch_id=1,
        batch_taps_max=batch_taps_max,
        queue_max=4 * batch_taps_max,
    )


def _seqs(batch: list[fastpath.Decision]) -> list[int]:
    return [decision.terminal_seq for decision in batch]


def test_a_batch_takes_at_most_its_offline_share_and_fills_with_online_taps() -> None:
    writer = _writer(batch_taps_max=10)
    for seq in range(100, 130):
        writer.submit_offline(_decision(seq))
    for seq in range(20):
        writer.submit(_decision(seq))
    first = _seqs(writer._next_batch())
    share = OFFLINE_TAPS_PER_BATCH_MAX
    assert first == list(range(10 - share)) + list(range(100, 100 + share))
    second = _seqs(writer._next_batch())
    assert second == list(range(10 - share, 2 * (10 - share))) + list(range(100 + share, 100 + 2 * share))


def test_offline_taps_alone_still_go_a_share_at_a_time() -> None:
    writer = _writer()
    for seq in range(3 * OFFLINE_TAPS_PER_BATCH_MAX):
        writer.submit_offline(_decision(seq))
    sizes = [len(writer._next_batch()) for _ in range(3)]
    assert sizes == [OFFLINE_TAPS_PER_BATCH_MAX] * 3
    assert writer.depth() == 0


async def test_a_full_offline_queue_holds_the_uploader_until_a_batch_takes_some() -> None:
    writer = _writer()
    for seq in range(OFFLINE_QUEUE_MAX):
        writer.submit_offline(_decision(seq))
    waiting = asyncio.ensure_future(writer.wait_offline_room())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    writer._next_batch()
    assert await asyncio.wait_for(waiting, 1.0) is True
