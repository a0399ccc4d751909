"""Liveness and readiness, from plain attributes the event loop keeps.

``/healthz`` and ``/readyz`` are answered by the metrics endpoint's thread,
which must never wait for the event loop: a wedged loop is exactly what
``/healthz`` has to report. So the loop keeps the facts up to date and the
HTTP thread only reads them:

- ``DatabaseProbe`` asks the database ``SELECT 1`` every few seconds;
- ``LoopLagMonitor`` (``engine/loop_lag.py``) ticks ten times a second;
- the writer keeps ``healthy``, the sessions' context ``accepting``.

Alive (``/healthz`` 200) means the process can still do its job: the loop
turns and the writer has not died on a bug; 503 means restart it. Ready
(``/readyz`` 200) means send terminals here: alive, the city loaded, the
database reachable, the writer able to commit, connections accepted; 503
means not now (starting, stopping, or the database is away).

>>> health = EngineHealth(...)                             # doctest: +SKIP
>>> health.readiness().to_json()
b'{"ok":true,"checks":{"alive":true,"state_loaded":true,...}}'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import orjson

from engine.loop_lag import LoopLagMonitor

if TYPE_CHECKING:
    from engine.session import SessionContext
    from engine.state import CityState
    from engine.writer import BatchWriter

log = logging.getLogger("citycard.health")

# A probe every 2 s finds an unreachable database within the 5 s a load
# balancer typically waits between readiness checks, for one trivial query.
DATABASE_PROBE_INTERVAL_S = 2.0

# SELECT 1 answers in well under a millisecond on a healthy server; a server
# that needs 2 s (connection included) cannot hold the commit objective.
DATABASE_PROBE_TIMEOUT_S = 2.0


class DatabaseProbe:
    """Asks the database ``SELECT 1`` every few seconds, on the engine's loop.

    ``reachable`` and ``last_success_unix`` are plain attributes any thread
    may read. The probe starts reachable: the engine has just loaded the city
    from this database.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        interval_s: float = DATABASE_PROBE_INTERVAL_S,
        timeout_s: float = DATABASE_PROBE_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.reachable = True
        self.last_success_unix = time.time()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="citycard-database-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """Probe once now; returns (and records) whether the database answered."""
        try:
            async with asyncio.timeout(self.timeout_s), self._pool.acquire(timeout=self.timeout_s) as conn:
                await conn.fetchval("SELECT 1", timeout=self.timeout_s)
        except Exception as error:  # noqa: BLE001 - any failure means "not reachable now"
            if self.reachable:
                log.warning("database probe failed", extra={"error": repr(error)})
            self.reachable = False
            return False
        if not self.reachable:
            log.info("database probe succeeded again")
        self.reachable = True
        self.last_success_unix = time.time()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()


@dataclass(frozen=True)
class HealthReport:
    """An answer to /healthz or /readyz: ``ok`` and the checks behind it."""

    ok: bool
    checks: dict[str, bool]

    @property
    def status(self) -> int:
        return 200 if self.ok else 503

    def to_json(self) -> bytes:
        return orjson.dumps({"ok": self.ok, "checks": self.checks})


class EngineHealth:
    """Liveness and readiness of one engine, safe to evaluate from any thread."""

    def __init__(
        self,
        *,
        state: CityState | None,
        writer: BatchWriter,
        context: SessionContext,
        database: DatabaseProbe,
        loop: LoopLagMonitor,
        failed: asyncio.Event,
    ) -> None:
        self._state = state
        self._writer = writer
        self._context = context
        self._database = database
        self._loop = loop
        self._failed = failed

    @property
    def database_reachable(self) -> bool:
        return self._database.reachable

    def liveness(self) -> HealthReport:
        checks = {
            "loop_turning": self._loop.turning(),
            # Event.is_set() reads one attribute: no loop interaction.
            "writer_running": not self._failed.is_set(),
        }
        return HealthReport(all(checks.values()), checks)

    def readiness(self) -> HealthReport:
        checks = {
            "alive": self.liveness().ok,
            "state_loaded": self._state is not None,
            "database_reachable": self._database.reachable,
            "writer_healthy": self._writer.healthy,
            "accepting": self._context.accepting,
        }
        return HealthReport(all(checks.values()), checks)
