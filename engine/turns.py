"""Short turns of the event loop: what sessions may decide at once, and the rest later.

Everything the engine does runs on one event loop, and the writer learns
that a commit ended only when the loop gets to it. In a turn where many
terminals' requests arrive together (the replies of a committed batch go
out to every pipelining terminal at once, and their next requests come back
together), deciding all of them before anything else would keep a finished
commit waiting for tens of milliseconds, and PostgreSQL idle meanwhile.

So in one turn sessions decide at most ``inline_frames`` frames as they
arrive (``grant()``). A session given fewer than it received keeps the rest
in order, stops reading from its socket, and waits in line (``wait()``);
the pump takes ``pump_frames`` frames from the sessions in line per turn,
round robin, and puts a session back at the end while it has more. A
session's frames are decided in the order they came, whether at once or by
the pump; only the turn they are decided in changes. Under light load no
turn reaches the limit and every frame is decided at once, as it arrives.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from engine.limits import PUMP_FRAMES_PER_TURN, SESSION_FRAMES_PER_TURN


class Backlogged(Protocol):
    """A session with frames received but not yet decided."""

    def handle_backlog(self, most: int) -> int:
        """Decide up to ``most`` waiting frames; return how many it took."""
        ...

    def has_backlog(self) -> bool: ...


class TurnBudget:
    """The frames sessions may still decide in the current turn, and the line of those waiting."""

    def __init__(self, inline_frames: int = SESSION_FRAMES_PER_TURN, pump_frames: int = PUMP_FRAMES_PER_TURN) -> None:
        if inline_frames < 1 or pump_frames < 1:
            raise ValueError("a turn must allow at least one frame inline and one by the pump")
        self._inline_frames = inline_frames
        self._pump_frames = pump_frames
        self._left = inline_frames
        self._reset_due = False
        self._line: collections.deque[Backlogged] = collections.deque()
        self._pumping = False
        # What the pump did: frames it decided, and sessions that waited.
        self.deferred_frames = 0
        self.deferred_sessions = 0

    def grant(self, wanted: int) -> int:
        """How many of ``wanted`` frames a session may decide now."""
        if not self._reset_due:
            # The budget is per turn: the reset runs once the turn's I/O
            # callbacks (every session that received something) are done.
            self._reset_due = True
            asyncio.get_running_loop().call_soon(self._reset)
        granted = wanted if wanted <= self._left else self._left
        self._left -= granted
        return granted

    def wait(self, session: Backlogged, frames: int) -> None:
        """Put a session with ``frames`` frames left in line for the pump."""
        self.deferred_sessions += 1
        self.deferred_frames += frames
        self._line.append(session)
        if not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    def waiting(self) -> int:
        """Sessions in line."""
        return len(self._line)

    def _reset(self) -> None:
        self._left = self._inline_frames
        self._reset_due = False

    def _pump(self) -> None:
        left = self._pump_frames
        line = self._line
        while line and left > 0:
            session = line.popleft()
            left -= session.handle_backlog(left)
            if session.has_backlog():
                line.append(session)
        if line:
            asyncio.get_running_loop().call_soon(self._pump)
        else:
            self._pumping = False
