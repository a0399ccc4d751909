"""Short turns of the event loop (engine/turns.py): a session decides at
most the turn's budget of frames at once and the rest later, in order, with
reading paused meanwhile. No socket and no database: the session rig of
fuzz/rig.py, its turn budget made tiny so that a handful of frames exceed it.
"""

from __future__ import annotations

import asyncio

import pytest

from engine import fastpath
from engine.codes import ResultCode
from engine.state import now_ms
from engine.turns import TurnBudget
from fuzz import rig as rigs


def taps(rig: rigs.SessionRig, count: int, first_seq: int = 1) -> bytes:
    """``count`` sealed TAPs of the rich card, sequences and counters from ``first_seq``."""
    return b"".join(
        rig.seal(fastpath.encode_tap(seq, seq, rigs.CARD_RICH, seq, now_ms(), 0))
        for seq in range(first_seq, first_seq + count)
    )


async def open_rig(inline_frames: int, pump_frames: int) -> tuple[rigs.SessionRig, list[str]]:
    """An open session whose turns allow ``inline_frames`` at once and
    ``pump_frames`` by the pump; the list records the transport's reading."""
    rig = rigs.SessionRig()
    await rig.open()
    rig.context.turns = TurnBudget(inline_frames=inline_frames, pump_frames=pump_frames)
    reading: list[str] = []
    rig.transport.pause_reading = lambda: reading.append("pause")  # type: ignore[method-assign]
    rig.transport.resume_reading = lambda: reading.append("resume")  # type: ignore[method-assign]
    return rig, reading


def queued_seqs(rig: rigs.SessionRig) -> list[int]:
    return [decision.terminal_seq for decision in rig.writer.queued]


async def test_frames_beyond_the_budget_are_decided_by_the_pump_in_order() -> None:
    rig, reading = await open_rig(inline_frames=2, pump_frames=3)
    rig.session.data_received(taps(rig, 10))
    # Two at once; the rest wait, and the socket is not read meanwhile.
    assert queued_seqs(rig) == [1, 2]
    assert rig.session.has_backlog() and reading == ["pause"]
    await asyncio.sleep(0)  # one turn: the pump takes three
    assert queued_seqs(rig) == [1, 2, 3, 4, 5]
    for _ in range(3):
        await asyncio.sleep(0)
    assert queued_seqs(rig) == list(range(1, 11))
    assert not rig.session.has_backlog() and reading == ["pause", "resume"]
    assert rig.context.turns.deferred_frames == 8 and rig.context.turns.deferred_sessions == 1
    rig.processor.batch_done(rig.writer.take(), True)
    results = [
        fastpath.decode_tap_result(body) for msg_type, _, body in rig.frames() if msg_type == fastpath.MSG_TAP_RESULT
    ]
    assert [(seq, result) for seq, result, *_ in results] == [(seq, ResultCode.APPROVED) for seq in range(1, 11)]
    rig.check_output()


async def test_the_budget_is_per_turn() -> None:
    rig, reading = await open_rig(inline_frames=4, pump_frames=4)
    rig.session.data_received(taps(rig, 3, first_seq=1))
    rig.session.data_received(taps(rig, 3, first_seq=4))  # one left for this turn: two wait
    assert queued_seqs(rig) == [1, 2, 3, 4] and reading == ["pause"]
    await asyncio.sleep(0)  # the pump decides the two; the budget is whole again
    assert queued_seqs(rig) == list(range(1, 7)) and reading == ["pause", "resume"]
    rig.session.data_received(taps(rig, 4, first_seq=7))
    assert queued_seqs(rig) == list(range(1, 11)) and not rig.session.has_backlog()


async def test_a_fault_after_waiting_frames_closes_the_session_only_after_them() -> None:
    rig, _ = await open_rig(inline_frames=1, pump_frames=1)
    bad_version = b"\x00\x00\x00\x08\x07\x20\x00\x01\x00\x00\x00\x09"
    rig.session.data_received(taps(rig, 3) + bad_version)
    assert queued_seqs(rig) == [1] and not rig.transport.closed
    rig.session.data_received(taps(rig, 1, first_seq=4))  # after the fault: ignored
    for _ in range(3):
        await asyncio.sleep(0)
    assert queued_seqs(rig) == [1, 2, 3]
    assert rig.transport.closed
    frames = rig.check_output()
    assert frames[-1][0] == fastpath.MSG_ERROR
    assert fastpath.decode_error(frames[-1][2])[0] == fastpath.ERR_UNSUPPORTED_VERSION


async def test_reading_stays_paused_while_replies_back_up() -> None:
    rig, reading = await open_rig(inline_frames=1, pump_frames=8)
    rig.session.data_received(taps(rig, 3))
    rig.session.pause_writing()
    await asyncio.sleep(0)
    assert not rig.session.has_backlog()
    assert reading == ["pause", "pause"]  # the backlog drained, but replies wait
    rig.session.resume_writing()
    assert reading == ["pause", "pause", "resume"]


async def test_a_session_closed_while_waiting_leaves_the_line() -> None:
    rig, _ = await open_rig(inline_frames=1, pump_frames=1)
    rig.session.data_received(taps(rig, 5))
    rig.session.connection_lost(None)
    await asyncio.sleep(0)
    assert queued_seqs(rig) == [1] and rig.context.turns.waiting() == 0


async def test_the_pump_serves_waiting_sessions_round_robin() -> None:
    handled: list[tuple[str, int]] = []

    class Waiting:
        def __init__(self, name: str, frames: int) -> None:
            self.name, self.frames = name, frames

        def handle_backlog(self, most: int) -> int:
            taken = min(most, self.frames)
            self.frames -= taken
            handled.append((self.name, taken))
            return taken

        def has_backlog(self) -> bool:
            return self.frames > 0

    turns = TurnBudget(inline_frames=1, pump_frames=4)
    for name, frames in [("a", 5), ("b", 1), ("c", 4)]:
        turns.wait(Waiting(name, frames), frames)
    await asyncio.sleep(0)
    assert handled == [("a", 4)]
    await asyncio.sleep(0)
    assert handled == [("a", 4), ("b", 1), ("c", 3)]
    await asyncio.sleep(0)
    assert handled == [("a", 4), ("b", 1), ("c", 3), ("a", 1), ("c", 1)]
    assert turns.waiting() == 0


def test_a_turn_allows_at_least_one_frame() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        TurnBudget(inline_frames=0)
