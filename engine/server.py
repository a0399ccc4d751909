"""The engine's lifecycle: load the city, start the writer, listen, stop.

>>> async def main():                                      # doctest: +SKIP
...     engine = Engine(EngineConfig(dsn="postgresql://...", listen_port=0))
...     await engine.start()
...     print(engine.port)
...     await engine.stop()
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import ssl
from pathlib import Path

import asyncpg
import msgspec

from engine.activity_rebuild import rebuild_activity
from engine.admin import AdminServer
from engine.db import create_pool
from engine.fd_limit import ensure_descriptors
from engine.health import DatabaseProbe, EngineHealth
from engine.key_rotation import KeyRotation
from engine.keys import load_master_key
from engine.limits import (
    BATCH_TAPS_MAX,
    DB_COMMAND_TIMEOUT_S,
    HANDSHAKE_DEADLINE_S,
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    WRITER_QUEUE_MAX,
)
from engine.live import LiveChanges, apply_current_rules
from engine.logs import CardPseudonyms
from engine.loop_lag import LoopLagMonitor
from engine.metrics import EngineMetrics, EngineSources
from engine.migrate import migrate
from engine.offline import OfflineUploads
from engine.processor import Processor
from engine.session import SessionContext, SessionLimits, TerminalSession
from engine.signing import ListSigner
from engine.state import CityState, load_state, now_ms
from engine.sync import HotList, Sync, load_hotlist
from engine.tls import TlsConfigError, server_context
from engine.versions import RulesVersions
from engine.writer import AnotherWriter, BatchWriter, connect_writer, next_batch_id

log = logging.getLogger("citycard.server")

# The environment switch that allows the unsafe negative-control mode.
UNSAFE_ENV = "CITYCARD_ALLOW_UNSAFE"

# How long stop() waits for in-flight batches before closing anyway.
SHUTDOWN_DRAIN_S = 10.0


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything an engine run needs. ``listen_port=0`` picks a free port."""

    dsn: str
    data_dir: str = "var"
    listen_host: str = "127.0.0.1"
    listen_port: int = 7700
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    # The card office's HTTP interface (engine/admin.py); None: not served.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    # TLS on the terminal listener (PEM files); both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    batch_taps_max: int = BATCH_TAPS_MAX
    writer_queue_max: int = WRITER_QUEUE_MAX
    max_connections: int = MAX_CONNECTIONS
    handshake_deadline_s: float = HANDSHAKE_DEADLINE_S
    idle_timeout_s: float = IDLE_TIMEOUT_S
    migrate: bool = True
    # Test-only negative control (see Processor.unsafe_answer_before_commit);
    # refused unless CITYCARD_ALLOW_UNSAFE=1 is set as well.
    unsafe_answer_before_commit: bool = False


# Allocations between young-generation collections. CPython's default (700)
# makes the collector run every few hundred taps; each Decision is a tracked
# object, so at 20,000 taps a second that is dozens of collections a second,
# and the occasional full collection walks every object the engine retains.
GC_GENERATION0_THRESHOLD = 50_000


def _settle_garbage_collector() -> None:
    """Move the loaded city out of the collector's sight and space out collections.

    The city is loaded once and lives as long as the engine; ``gc.freeze()``
    puts it in a permanent generation that full collections skip, so their
    pauses (tail latency) do not grow with the number of cards.
    """
    gc.collect()
    gc.freeze()
    _, generation1, generation2 = gc.get_threshold()
    gc.set_threshold(GC_GENERATION0_THRESHOLD, generation1, generation2)


class EngineStartError(Exception):
    """The engine cannot start: configuration or environment fault, with a clear message."""


class Engine:
    """One engine: the single writer of the city's state."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.state: CityState | None = None
        self.processor: Processor | None = None
        self.writer: BatchWriter | None = None
        self.metrics = EngineMetrics()
        self.health: EngineHealth | None = None
        self._database_probe: DatabaseProbe | None = None
        self._loop_lag: LoopLagMonitor | None = None
        # Service id -> code, the label values of the per-service metrics.
        self._services: dict[int, str] = {}
        self.context: SessionContext | None = None
        self.key_rotation = KeyRotation()
        self._pool: asyncpg.Pool | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._live: LiveChanges | None = None
        # What terminals keep for working offline, and their uploads.
        self.hotlist = HotList()
        self.sync: Sync | None = None
        self.offline: OfflineUploads | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.admin: AdminServer | None = None
        self.admin_port: int | None = None
        # Set when the engine can no longer be trusted to answer (the writer
        # died on a bug): the process should stop and be restarted.
        self.failed = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        master_key = load_master_key(Path(config.data_dir))
        tls = self._tls_context()
        self._pool = await create_pool(config.dsn)
        async with self._pool.acquire() as conn:
            if config.migrate:
                await migrate(conn)
        # The writer lock first, the city second: see connect_writer.
        try:
            writer_connection = await connect_writer(config.dsn)
        except AnotherWriter as error:
            await self._abort()
            raise EngineStartError(str(error)) from None
        async with self._pool.acquire() as conn:
            # Before the city: an import committed while it loads is then
            # applied by the live listener rather than missed.
            last_import_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM eligibility_imports")
            state = await load_state(conn)
            await self.key_rotation.load(conn, state)
            await apply_current_rules(conn, state)
            await rebuild_activity(conn, state, now_ms=now_ms())
            # After the city: a status changed meanwhile is read again by the
            # live listener's catch-up (applying a change twice is harmless).
            await load_hotlist(conn, self.hotlist)
            first_batch_id = await next_batch_id(conn)
            self._services = {row["id"]: row["code"] for row in await conn.fetch("SELECT id, code FROM services")}
        self.state = state
        _settle_garbage_collector()
        processor = self.processor = Processor(state, self._pool)
        processor.card_ref = CardPseudonyms(master_key)
        writer = self.writer = BatchWriter(
            config.dsn,
            state,
            processor.batch_done,
            next_batch_id=first_batch_id,
            batch_taps_max=config.batch_taps_max,
            queue_max=max(config.writer_queue_max, config.batch_taps_max),
            on_commit_metrics=self.metrics.observe_commit,
            connection=writer_connection,
        )
        processor.attach(writer)
        if config.unsafe_answer_before_commit:
            if os.environ.get(UNSAFE_ENV) != "1":
                await self._abort()
                raise EngineStartError(f"unsafe_answer_before_commit needs {UNSAFE_ENV}=1: it can lose debits")
            log.critical("UNSAFE: answering before commit; acknowledged debits can be lost")
            processor.unsafe_answer_before_commit = True
        # With metrics off (no port), nothing is counted per request either:
        # the benchmark compares the two to show what counting costs.
        counting = config.metrics_port is not None
        if counting:
            processor.on_result = self.metrics.count_decision
            processor.on_immediate = self.metrics.count_immediate
        self.key_rotation.attach(self._pool)
        versions = RulesVersions(state, self._pool)
        await versions.get(state.rules_version)  # terminals ask for it first
        sync = self.sync = Sync(state, self.hotlist, versions, ListSigner(master_key))
        offline = self.offline = OfflineUploads(state, processor, versions)
        self._live = LiveChanges(
            config.dsn,
            state,
            last_import_id=last_import_id,
            key_rotation=self.key_rotation,
            hotlist=self.hotlist,
            on_change=sync.changed,
        )
        self._live.start()
        offline.start()
        self._writer_task = asyncio.create_task(writer.run(), name="citycard-writer")
        self._writer_task.add_done_callback(self._writer_ended)
        limits = SessionLimits(
            handshake_deadline_s=config.handshake_deadline_s,
            idle_timeout_s=config.idle_timeout_s,
            max_connections=ensure_descriptors(config.max_connections),
        )
        context = self.context = SessionContext(
            state=state,
            processor=processor,
            master_key=master_key,
            limits=limits,
            key_rotation=self.key_rotation,
            observe_latency=self.metrics.request_latency.observe if counting else None,
            sync=sync,
            offline=offline,
        )
        sync.sessions = lambda: list(context.sessions)
        self._start_health()
        self._register_gauges()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: TerminalSession(context), config.listen_host, config.listen_port, backlog=1024, ssl=tls
            )
        except OSError as error:
            await self._abort()
            if error.errno == errno.EADDRINUSE:
                raise EngineStartError(f"port {config.listen_host}:{config.listen_port} is already in use") from None
            raise EngineStartError(f"cannot listen on {config.listen_host}:{config.listen_port}: {error}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        if config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port, self.health)
            except OSError as error:
                await self.stop()
                raise EngineStartError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {error}"
                ) from None
        if config.admin_port is not None:
            assert self._pool is not None
            self.admin = AdminServer(state, processor, self._pool, master_key, self.metrics.registry)
            try:
                self.admin_port = await self.admin.start(config.admin_host, config.admin_port)
            except OSError as error:
                await self.stop()
                where = f"{config.admin_host}:{config.admin_port}"
                if error.errno == errno.EADDRINUSE:
                    raise EngineStartError(f"admin port {where} is already in use") from None
                raise EngineStartError(f"cannot serve the admin interface on {where}: {error}") from None
        log.info(
            "engine started",
            extra={
                "port": self.port,
                "tls": tls is not None,
                "cards": state.card_count(),
                "terminals": len(state.terminals),
            },
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context, or None; checked before anything starts."""
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise EngineStartError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        try:
            return server_context(cert, key)
        except TlsConfigError as error:
            raise EngineStartError(str(error)) from None

    def _start_health(self) -> None:
        """The database probe and the loop-lag monitor, whose findings /healthz and /readyz read."""
        assert self._pool is not None and self.writer is not None and self.context is not None
        probe = self._database_probe = DatabaseProbe(self._pool)
        loop_lag = self._loop_lag = LoopLagMonitor(self.metrics.loop_lag.observe)
        self.health = EngineHealth(
            state=self.state,
            writer=self.writer,
            context=self.context,
            database=probe,
            loop=loop_lag,
            failed=self.failed,
        )
        probe.start()
        loop_lag.start()

    async def _stop_health(self) -> None:
        if self._database_probe is not None:
            await self._database_probe.stop()
        if self._loop_lag is not None:
            await self._loop_lag.stop()

    def _register_gauges(self) -> None:
        writer = self.writer
        context = self.context
        state = self.state
        health = self.health
        processor = self.processor
        assert writer is not None and context is not None and state is not None and health is not None
        assert processor is not None
        sources = EngineSources(
            writer=writer,
            sessions=context.counters,
            state=state,
            health=health,
            pool=lambda: self._pool,
            pool_waits=lambda: processor.pool_waits,
            writer_queue_capacity=max(self.config.writer_queue_max, self.config.batch_taps_max),
            offline_outcomes=lambda: self.offline.outcomes if self.offline is not None else {},
            sync=self.sync,
            turns=context.turns,
        )
        self.metrics.attach(sources, self._services)

    def _writer_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A writer that died leaves decisions unanswered and in-memory
            # state it cannot vouch for: this is fatal. A restart reloads the
            # state from the database, which holds only committed batches.
            log.critical("batch writer stopped", exc_info=task.exception())
            self.failed.set()

    async def stop(self) -> None:
        """Stop accepting, answer what is pending, close every connection."""
        if self.context is not None:
            self.context.accepting = False
        if self._server is not None:
            self._server.close()
        # Before the writer stops: a card-office top-up in progress waits for
        # its commit, and so does the offline upload being decided.
        await self._stop_admin()
        if self.offline is not None:
            await self.offline.stop()
        if self.processor is not None:
            await self.processor.drain()
        if self.writer is not None and self._writer_task is not None:
            await self.writer.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer_task), SHUTDOWN_DRAIN_S)
            except Exception:  # noqa: BLE001 - shutting down regardless, timeouts included
                self._writer_task.cancel()
            await self.writer.close()
        if self.context is not None:
            for session in list(self.context.sessions):
                session.flush()
                session.shut_down()
        if self._server is not None:
            await self._server.wait_closed()
        await self.key_rotation.close()
        await self._abort()

    async def _stop_admin(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None

    async def _abort(self) -> None:
        await self._stop_admin()
        if self._live is not None:
            await self._live.stop()
        if self.sync is not None:
            await self.sync.stop()
        await self._stop_health()
        # Stopping the HTTP thread waits for its poll (up to half a second): not on the loop.
        await asyncio.to_thread(self.metrics.close)
        if self._writer_task is not None and not self._writer_task.done():
            self._writer_task.cancel()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), DB_COMMAND_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the database may be gone already
                self._pool.terminate()
            self._pool = None
