"""Event-loop lag: how late the loop runs what is due.

Every decision, reply and commit of the engine runs on one event loop, so a
callback that hogs it (a long GC pause, a slow synchronous call) delays every
terminal at once. A small task sleeps a fixed interval and measures by how
much it overslept; that overshoot is the delay any tap arriving at the same
moment would have waited before the engine even looked at it.

>>> monitor = LoopLagMonitor(observe=print)               # doctest: +SKIP
>>> monitor.start()                                       # on the engine's loop
>>> monitor.turning()                                     # from any thread
True
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

# Ten wake-ups a second cost nothing measurable and still catch every stall
# long enough to matter against a 10 ms latency objective several times over.
LOOP_LAG_INTERVAL_S = 0.1

# A loop that has not turned for this long is wedged, not busy: no burst of
# taps keeps one loop iteration running for 10 s. /healthz reports it so the
# process is restarted.
LOOP_STALL_S = 10.0


class LoopLagMonitor:
    """Measures the loop's lag on the loop; ``turning()`` may be read from any thread."""

    def __init__(self, observe: Callable[[float], None] | None = None, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._observe = observe
        # Plain attributes, written by the loop only.
        self.last_lag_s = 0.0
        self.last_tick = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.last_tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="citycard-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def turning(self, stall_s: float = LOOP_STALL_S) -> bool:
        """False when the loop has not run this monitor for ``stall_s``."""
        return self._task is not None and time.monotonic() - self.last_tick < stall_s

    async def _run(self) -> None:
        interval_s = self.interval_s
        observe = self._observe
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            lag_s = max(0.0, now - asleep - interval_s)
            self.last_lag_s = lag_s
            self.last_tick = now
            if observe is not None:
                observe(lag_s)
