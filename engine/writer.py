"""Group commit: one task writes every decision to PostgreSQL in batches.

Decisions queue up while a commit is in flight; when it ends, everything
waiting (up to BATCH_TAPS_MAX) goes in the next one, and the batch just
committed is answered while PostgreSQL works on that one. There is no timer:
at low load a batch holds one tap and commits at once, at high load batches
grow by themselves and the cost of each fsync is shared by thousands of taps.

A batch is ONE SQL statement (data-modifying CTEs over unnest'ed arrays),
run outside an explicit transaction, so it is atomic and costs one round
trip. It inserts the batch marker, the tap records, the ledger transfers and
entries, updates each touched account once, in account-id order, and the
rides used of each multi-ride ticket the batch touched.
Batches are capped by count (BATCH_TAPS_MAX); every row has a fixed size
(about 150 bytes of arguments per tap), so the count caps the bytes too.

Taps uploaded by terminals that were offline queue apart and take at most
OFFLINE_TAPS_PER_BATCH_MAX of each batch, so a bus coming out of a tunnel
with a day of taps adds about a millisecond to the commits the online taps
wait for, never a whole batch; the rest of the batch is the online taps'.
When the offline queue is full, the engine stops deciding uploads until a
batch has taken some (``wait_offline_room``).

After a failure the outcome of the batch may be unknown (the connection died
during the commit). The writer never guesses: it reconnects, with backoff,
until it can read whether the batch's marker row exists, and only then
reports the batch as committed or not. Meanwhile it reports itself unhealthy
so new requests are answered BUSY_RETRY at once instead of queueing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from engine import fastpath
from engine.decision import Decision
from engine.limits import (
    BATCH_TAPS_MAX,
    DB_COMMAND_TIMEOUT_S,
    OFFLINE_QUEUE_MAX,
    OFFLINE_TAPS_PER_BATCH_MAX,
    WRITER_QUEUE_MAX,
    WRITER_RETRY_MAX_S,
    WRITER_RETRY_MIN_S,
)
from engine.state import CityState

log = logging.getLogger("citycard.writer")

# Connecting is the first thing a batch does after a failure; a database
# that does not answer within this is treated as unavailable (BUSY_RETRY)
# rather than holding the batch's terminals.
WRITER_CONNECT_TIMEOUT_S = 5.0

# The writer lock (an advisory lock key, "cityWRIT"): one engine per database.
WRITER_LOCK_KEY = 0x63697479_57524954
# How long a starting (or reconnecting) engine waits for the lock: a crashed
# predecessor's session ends within a commit's time; 30 s also covers a
# connection that died on the network and is noticed late by the server.
WRITER_LOCK_WAIT_S = 30.0
WRITER_LOCK_POLL_S = 0.1

# Settings of the writer's session. The commit statement is planned once: a
# custom plan per batch costs about 0.4 ms of planning (more than executing a
# small batch), and the generic plan (index look-ups of the accounts a batch
# touches) is the right one for every batch size up to BATCH_TAPS_MAX.
WRITER_SESSION_SETTINGS = {
    "application_name": "citycard-writer",
    "plan_cache_mode": "force_generic_plan",
    # A terminal hears APPROVED only once its batch is on disk, whatever the
    # server's default: never trust a DSN's server to have it on.
    "synchronous_commit": "on",
}

# Transfer ids are batch_id * TRANSFERS_PER_BATCH_MAX + k: a batch holds one
# transfer per (ledger kind, service), at most 3 kinds x 64 services.
TRANSFERS_PER_BATCH_MAX = 1024

_COMMIT_SQL = """
WITH
  batch AS (
    INSERT INTO batches (id, taps) VALUES ($1, $2)
  ),
  tap AS (
    INSERT INTO taps (terminal_id, terminal_seq, kind, card_uid, card_counter, tap_flags,
                      requested_cents, original_seq, event_time, recorded_at, result,
                      amount_cents, balance_cents, service_id, account_id, batch_id,
                      info, fare_profile, rules_version, product_id, original_terminal_id,
                      online_result)
    SELECT u.terminal_id, u.seq, u.kind, u.uid, u.counter, u.flags, u.requested, u.original,
           timestamptz 'epoch' + u.event_ms * interval '1 millisecond',
           timestamptz 'epoch' + u.recorded_ms * interval '1 millisecond',
           u.result, u.amount, u.balance, u.service_id, u.account_id, $1,
           u.info, u.fare_profile, u.rules_version, u.product_id, u.original_terminal,
           u.online_result
    FROM unnest($3::text::int4[], $4::text::int8[], $5::text::int2[], $6::text::int8[],
                $7::text::int8[], $8::text::int2[], $9::text::int8[], $10::text::int8[],
                $11::text::int8[], $12::text::int8[], $13::text::int2[], $14::text::int8[],
                $15::text::int8[], $16::text::int2[], $17::text::int8[], $18::text::int4[],
                $19::text::int2[], $20::text::int4[], $21::text::int8[], $22::text::int4[],
                $33::text::int2[])
      AS u(terminal_id, seq, kind, uid, counter, flags, requested, original, event_ms,
           recorded_ms, result, amount, balance, service_id, account_id, info,
           fare_profile, rules_version, product_id, original_terminal, online_result)
  ),
  account AS (
    UPDATE accounts SET balance_cents = accounts.balance_cents + d.delta
    FROM unnest($23::text::int8[], $24::text::int8[]) AS d(id, delta)
    WHERE accounts.id = d.id
  ),
  transfer AS (
    INSERT INTO ledger_transfers (id, batch_id, kind, service_id)
    SELECT x.id, $1, x.kind, x.service_id
    FROM unnest($25::text::int8[], $26::text::int2[], $27::text::int2[]) AS x(id, kind, service_id)
  ),
  entry AS (
    INSERT INTO ledger_entries (transfer_id, account_id, amount_cents)
    SELECT * FROM unnest($28::text::int8[], $29::text::int8[], $30::text::int8[])
  ),
  ride AS (
    UPDATE card_products SET rides_used = card_products.rides_used + r.delta
    FROM unnest($31::text::int8[], $32::text::int4[]) AS r(id, delta)
    WHERE card_products.id = r.id
  )
SELECT 1
"""

_BATCH_EXISTS_SQL = "SELECT EXISTS (SELECT 1 FROM batches WHERE id = $1)"

BatchDone = Callable[[list[Decision], bool], None]


def batch_arguments(batch_id: int, batch: list[Decision], state: CityState) -> tuple[object, ...]:
    """The commit statement's arguments: the tap record's columns as array
    literals, per-account sums and per-(kind, service) ledger transfers
    (``fastpath.encode_batch``, compiled)."""
    return fastpath.encode_batch(batch_id, batch, state.account_id, TRANSFERS_PER_BATCH_MAX)


class BatchWriter:
    """Owns the writer connection and commits queued decisions in batches.

    ``on_done(batch, committed)`` is called once per batch, after its outcome
    is known for certain.
    """

    def __init__(
        self,
        dsn: str,
        state: CityState,
        on_done: BatchDone,
        *,
        next_batch_id: int,
        batch_taps_max: int = BATCH_TAPS_MAX,
        queue_max: int = WRITER_QUEUE_MAX,
        on_commit_metrics: Callable[[int, float], None] | None = None,
        connection: asyncpg.Connection | None = None,
        offline_per_batch: int = OFFLINE_TAPS_PER_BATCH_MAX,
        offline_queue_max: int = OFFLINE_QUEUE_MAX,
    ) -> None:
        if batch_taps_max < 1 or queue_max < batch_taps_max:
            raise ValueError("need 1 <= batch_taps_max <= queue_max")
        self._dsn = dsn
        self._state = state
        self._on_done = on_done
        self._on_commit_metrics = on_commit_metrics
        self._batch_taps_max = batch_taps_max
        self._queue_max = queue_max
        self._queue: list[Decision] = []
        # Offline taps, apart: at most offline_per_batch of them per batch.
        self._offline: list[Decision] = []
        self._offline_per_batch = min(offline_per_batch, batch_taps_max)
        self._offline_queue_max = offline_queue_max
        self._offline_room = asyncio.Event()
        self._offline_room.set()
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        # The connection that holds the writer lock (see connect_writer).
        self._conn: asyncpg.Connection | None = connection
        self._next_batch_id = next_batch_id
        self._stopping = False
        self.healthy = True
        self.last_commit_unix: float = 0.0
        self.batches_committed = 0
        self.batches_failed = 0
        self.connections_opened = 0

    # --- intake -----------------------------------------------------------

    def depth(self) -> int:
        """Decisions queued or in flight."""
        return len(self._queue) + len(self._offline) + self._in_flight

    def has_room(self) -> bool:
        """False when a new decision must be answered BUSY_RETRY instead."""
        return self.healthy and not self._stopping and len(self._queue) + self._in_flight < self._queue_max

    def submit(self, decision: Decision) -> None:
        self._queue.append(decision)
        self._wakeup.set()

    def offline_accepting(self) -> bool:
        """False when uploaded taps must be answered BUSY_RETRY instead."""
        return self.healthy and not self._stopping

    async def wait_offline_room(self) -> bool:
        """Wait until the offline queue has room; False when the writer
        stopped accepting meanwhile (the database went away, or stopping)."""
        while self.offline_accepting() and len(self._offline) >= self._offline_queue_max:
            self._offline_room.clear()
            await self._offline_room.wait()
        return self.offline_accepting()

    def submit_offline(self, decision: Decision) -> None:
        """Queue an offline tap's decision (the caller waited for room)."""
        self._offline.append(decision)
        self._wakeup.set()

    # --- the loop -----------------------------------------------------------

    async def run(self) -> None:
        """Commit batches until stop() and the queue is empty."""
        delay = WRITER_RETRY_MIN_S
        # A batch whose outcome is certain but not yet reported (answered):
        # reported while PostgreSQL works on the next one, so that answering
        # a thousand taps (a few milliseconds of the event loop) does not
        # leave the database idle between commits. Batches are reported in
        # commit order, and never before their outcome is known.
        done: tuple[list[Decision], bool] | None = None
        while True:
            if not self.healthy:
                if done is not None:
                    self._on_done(*done)
                    done = None
                # The database was unreachable: probe it with backoff, and
                # answer what is queued BUSY_RETRY rather than hold it.
                if await self._try_connect() is None:
                    self._fail_queue()
                    if self._stopping:
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, WRITER_RETRY_MAX_S)
                    continue
                log.info("database reachable again")
                self.healthy = True
                delay = WRITER_RETRY_MIN_S
            if not self._queue and not self._offline:
                if done is not None:
                    self._on_done(*done)
                    done = None
                    continue  # reporting may have queued more (retries answered at once)
                if self._stopping:
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._next_batch()
            self._in_flight = len(batch) + (len(done[0]) if done is not None else 0)
            commit = asyncio.ensure_future(self._commit(batch))
            try:
                if done is not None:
                    # One turn of the loop lets the commit send its statement.
                    await asyncio.sleep(0)
                    self._on_done(*done)
                    done = None
                committed = await commit
            except BaseException:
                commit.cancel()  # as if awaited directly: the writer's end ends its commit
                raise
            finally:
                self._in_flight = 0
            done = (batch, committed)

    def _next_batch(self) -> list[Decision]:
        """The online taps, and at most offline_per_batch offline ones."""
        offline = self._offline[: self._offline_per_batch]
        online = self._queue[: self._batch_taps_max - len(offline)]
        del self._queue[: len(online)]
        if offline:
            del self._offline[: len(offline)]
            if len(self._offline) < self._offline_queue_max:
                self._offline_room.set()
        return online + offline

    def _fail_queue(self) -> None:
        if self._queue or self._offline:
            batch = self._queue + self._offline
            self._queue = []
            self._offline = []
            self._offline_room.set()
            self.batches_failed += 1
            self._on_done(batch, False)

    async def stop(self) -> None:
        """Let the queue drain, then close the connection."""
        self._stopping = True
        self._wakeup.set()
        self._offline_room.set()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=5)
            self._conn = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect_writer(self._dsn)
            self.connections_opened += 1
        return self._conn

    async def _try_connect(self) -> asyncpg.Connection | None:
        try:
            return await self._connection()
        except AnotherWriter:
            raise  # fatal: never commit beside another engine
        except Exception as error:  # noqa: BLE001 - any failure to connect means "unavailable"
            log.warning("database unavailable: %r", error)
            await self._drop_connection()
            return None

    async def _commit(self, batch: list[Decision]) -> bool:
        conn = await self._try_connect()
        if conn is None:
            # Nothing was sent: the batch certainly did not commit.
            self.healthy = False
            self.batches_failed += 1
            return False
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        arguments = batch_arguments(batch_id, batch, self._state)
        started = time.perf_counter()
        try:
            await conn.execute(_COMMIT_SQL, *arguments, timeout=DB_COMMAND_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - every failure is resolved the same way
            log.warning("batch %d of %d decisions failed: %r; resolving its outcome", batch_id, len(batch), error)
            self.healthy = False
            await self._drop_connection()
            committed = await self._resolve(batch_id)
            if committed:
                log.warning("batch %d was committed before the failure", batch_id)
                self._committed(len(batch), started)
            else:
                self.batches_failed += 1
            self.healthy = True
            return committed
        self._committed(len(batch), started)
        return True

    def _committed(self, size: int, started: float) -> None:
        self.batches_committed += 1
        self.last_commit_unix = time.time()
        if self._on_commit_metrics is not None:
            self._on_commit_metrics(size, time.perf_counter() - started)

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _resolve(self, batch_id: int) -> bool:
        """Find out, for certain, whether a batch committed. Retries forever:
        guessing either way could lose or duplicate money."""
        delay = WRITER_RETRY_MIN_S
        while True:
            try:
                conn = await self._connection()
                exists = await conn.fetchval(_BATCH_EXISTS_SQL, batch_id, timeout=DB_COMMAND_TIMEOUT_S)
                return bool(exists)
            except AnotherWriter:
                raise
            except Exception as error:  # noqa: BLE001 - the database is unavailable in some way
                log.warning("cannot resolve batch %d yet: %r; retrying in %.2fs", batch_id, error, delay)
                await self._drop_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITER_RETRY_MAX_S)


class AnotherWriter(Exception):
    """Another engine holds the writer lock of this database: this one must not commit."""


async def connect_writer(dsn: str) -> asyncpg.Connection:
    """A connection for the writer, holding the database's writer lock.

    The lock (a session advisory lock) makes the engine the only writer of
    its database: a second engine on the same database would decide on
    balances the first one is changing. It also closes a race after a crash:
    the dead engine's last commit may still be running in PostgreSQL, and its
    session keeps the lock until that commit ends, so a restarted engine loads
    the city only after it. Waits up to WRITER_LOCK_WAIT_S, then raises
    AnotherWriter.
    """
    conn = await asyncpg.connect(
        dsn, timeout=WRITER_CONNECT_TIMEOUT_S, command_timeout=None, server_settings=WRITER_SESSION_SETTINGS
    )
    try:
        deadline = time.monotonic() + WRITER_LOCK_WAIT_S
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", WRITER_LOCK_KEY):
            if time.monotonic() > deadline:
                raise AnotherWriter(
                    f"another engine holds the writer lock of this database (waited {WRITER_LOCK_WAIT_S:.0f} s)"
                )
            await asyncio.sleep(WRITER_LOCK_POLL_S)
    except BaseException:
        conn.terminate()
        raise
    return conn


async def next_batch_id(conn: asyncpg.Connection) -> int:
    """The first batch id this engine run may use: above every batch and
    transfer already written, so ids are never reused across restarts."""
    row = await conn.fetchrow(
        "SELECT coalesce((SELECT max(id) FROM batches), 0) AS batch,"
        " coalesce((SELECT max(id) FROM ledger_transfers), 0) AS transfer"
    )
    return max(row["batch"], row["transfer"] // TRANSFERS_PER_BATCH_MAX) + 1
