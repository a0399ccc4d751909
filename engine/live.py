"""Changes made outside the tap path reach the running engine at once.

The card office loads a new rules version (``citycard rules load``) or a
registry file of concession eligibility (``citycard eligibility import``)
in one transaction that ends with a ``NOTIFY``. The engine listens on its
own connection and, on each notice, re-reads what changed and swaps it into
its in-memory city between two taps: the very next tap is decided under the
new rules or eligibility, without a restart.

Channels and payloads:

- ``citycard_rules``: the new version number. The engine reads the tariffs
  table (which the same transaction rewrote) and the version's document.
- ``citycard_eligibility``: an ``eligibility_imports.id``. The engine
  re-reads the cards of every holder that import touched.
- ``citycard_terminal_keys``: a terminal id. The engine re-reads that
  terminal's key versions (a key rotation started, ``engine/key_rotation.py``).
- ``citycard_hotlist``: no payload. A card's status changed: the engine reads
  the new ``hotlist_changes`` rows into its hot list (``engine/sync.py``).

After a new rules version or hot-list change is applied, ``on_change`` is
called, which tells the terminals' open sessions (NOTICE).

A notice lost while the listening connection was down (or sent before it
first listened) is not lost for good: on every connect the engine reloads
the newest rules version, applies every eligibility import newer than the
last one it holds (imports are numbered; the engine reads the newest number
before it loads the city), re-reads every terminal's key versions and reads
the hot-list changes above the version it holds.
"""

from __future__ import annotations

import asyncio
import logging
from array import array
from collections.abc import Callable

import asyncpg
import msgspec

from engine.key_rotation import TERMINAL_KEYS_CHANNEL, KeyRotation
from engine.limits import DB_COMMAND_TIMEOUT_S
from engine.policy import CompiledPolicy, compile_policy
from engine.rules import Rules, RulesError
from engine.state import DEFAULT_RENEWAL_WINDOW_DAYS, NO_FARE, PROFILES_MAX, CityState, refresh_cards
from engine.sync import HOTLIST_CHANNEL, HotList, catch_up_hotlist

log = logging.getLogger("citycard.live")

RULES_CHANNEL = "citycard_rules"
ELIGIBILITY_CHANNEL = "citycard_eligibility"

# Reconnecting the listener after the database went away: the same backoff
# bounds as the writer's, so a restarting database is not hammered.
LISTEN_RETRY_MIN_S = 0.1
LISTEN_RETRY_MAX_S = 5.0

# Holders refreshed per query when an import is applied: one round trip per
# 10,000 holders keeps a 340,000-row import to a few dozen queries, each a
# few megabytes.
REFRESH_HOLDERS_PER_QUERY = 10_000


async def apply_current_rules(conn: asyncpg.Connection, state: CityState) -> int:
    """Put the newest rules version in force: its tariffs, its policies.

    Everything is read in one snapshot and built aside, then installed with
    no await in between, so no tap is decided with half of a version.
    Returns the version (0 when no rules version was ever loaded: tariffs
    only, every other rule off).
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            "SELECT version, document::text FROM rules_versions ORDER BY version DESC LIMIT 1",
            timeout=DB_COMMAND_TIMEOUT_S,
        )
        service_ids: dict[str, int] = dict(
            await conn.fetch("SELECT code, id FROM services", timeout=DB_COMMAND_TIMEOUT_S)
        )
        tariffs = await conn.fetch(
            "SELECT service_id, profile_id, fare_cents FROM tariffs", timeout=DB_COMMAND_TIMEOUT_S
        )
    fares: dict[int, array[int]] = {
        service_id: array("q", [NO_FARE] * PROFILES_MAX) for service_id in service_ids.values()
    }
    for service_id, profile_id, fare in tariffs:
        fares[service_id][profile_id] = fare
    if row is None:
        version, policy = 0, CompiledPolicy(renewal_window_days=DEFAULT_RENEWAL_WINDOW_DAYS)
    else:
        version = row["version"]
        try:
            rules = msgspec.json.decode(row["document"], type=Rules)
        except msgspec.ValidationError as error:
            raise RulesError(f"rules version {version} as stored does not parse: {error}") from None
        policy = compile_policy(rules, service_ids, state.group_id)
    state.fares = fares
    policy.install(state)
    state.rules_version = version
    return version


async def apply_eligibility_import(conn: asyncpg.Connection, state: CityState, import_id: int) -> int:
    """Re-read the cards of every holder an eligibility import touched."""
    holders = [
        row[0]
        for row in await conn.fetch(
            "SELECT holder_id FROM eligibility WHERE import_id = $1", import_id, timeout=DB_COMMAND_TIMEOUT_S
        )
    ]
    cards = 0
    for start in range(0, len(holders), REFRESH_HOLDERS_PER_QUERY):
        cards += await refresh_cards(conn, state, holders=holders[start : start + REFRESH_HOLDERS_PER_QUERY])
    return cards


# Queued by the connection's termination listener: not a channel's notice.
_CONNECTION_LOST = ("", "")


class LiveChanges:
    """Listens for rules and eligibility notices and applies them to the city.

    Notices are applied one at a time, in arrival order, by one task: two
    rules versions cannot interleave.
    """

    def __init__(
        self,
        dsn: str,
        state: CityState,
        *,
        last_import_id: int = 0,
        key_rotation: KeyRotation | None = None,
        hotlist: HotList | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._state = state
        self._key_rotation = key_rotation
        self._hotlist = hotlist
        self._on_change = on_change
        # The newest eligibility import the city holds: read before the city
        # was loaded, so an import committed meanwhile is applied, not missed.
        self._last_import_id = last_import_id
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._stopping = False
        # Changes applied: notices, and imports caught up with on connecting
        # (an import committed while the first LISTEN was on its way has no
        # notice that arrives). For tests and logs.
        self.applied = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="citycard-live-changes")

    async def stop(self) -> None:
        # The flag ends the loop even when a notice arriving at the same
        # moment as the cancellation lets the wait for it return normally.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._close()

    async def _run(self) -> None:
        delay = LISTEN_RETRY_MIN_S
        first = True
        while not self._stopping:
            try:
                conn = await self._listen()
                # Notices sent while nobody listened (before the first LISTEN,
                # or while the connection was down) are gone: catch up from
                # the record. Applying a change twice is harmless.
                await apply_current_rules(conn, self._state)
                if self._key_rotation is not None:
                    await self._key_rotation.load(conn, self._state)
                caught_up = await self._catch_up_imports(conn)
                self.applied += caught_up
                if self._hotlist is not None:
                    await catch_up_hotlist(conn, self._hotlist)
                self._changed()
                if not first or caught_up:
                    log.info("live changes: caught up with %d eligibility imports", caught_up)
                first = False
                delay = LISTEN_RETRY_MIN_S
                while not conn.is_closed() and not self._stopping:
                    try:
                        async with asyncio.timeout(LISTEN_RETRY_MAX_S):
                            channel, payload = await self._queue.get()
                    except TimeoutError:
                        continue
                    if (channel, payload) == _CONNECTION_LOST:
                        break
                    await self._apply(conn, channel, payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure: reconnect and catch up
                log.warning("live changes: %r; reconnecting", error)
            await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX_S)

    async def _listen(self) -> asyncpg.Connection:
        conn = self._conn = await asyncpg.connect(
            self._dsn, timeout=DB_COMMAND_TIMEOUT_S, server_settings={"application_name": "citycard-live"}
        )
        for channel in (RULES_CHANNEL, ELIGIBILITY_CHANNEL, TERMINAL_KEYS_CHANNEL, HOTLIST_CHANNEL):
            await conn.add_listener(channel, self._notified)
        # A lost connection wakes the loop at once (not at its next poll), so
        # the catch-up after reconnecting comes within moments.
        conn.add_termination_listener(self._terminated)
        return conn

    def _terminated(self, _conn: object) -> None:
        self._queue.put_nowait(_CONNECTION_LOST)

    def _notified(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._queue.put_nowait((channel, payload))

    async def _apply(self, conn: asyncpg.Connection, channel: str, payload: str) -> None:
        if channel == RULES_CHANNEL:
            version = await apply_current_rules(conn, self._state)
            log.info("rules version %d in force", version, extra={"notified": payload})
            self._changed()
        elif channel == HOTLIST_CHANNEL and self._hotlist is not None:
            changes = await catch_up_hotlist(conn, self._hotlist)
            log.info("hot list at version %d", self._hotlist.version, extra={"changes": changes})
            self._changed()
        elif channel == ELIGIBILITY_CHANNEL:
            try:
                import_id = int(payload)
            except ValueError:
                log.warning("eligibility notice with a bad payload %r: ignored", payload)
                return
            cards = await apply_eligibility_import(conn, self._state, import_id)
            self._last_import_id = max(self._last_import_id, import_id)
            log.info("eligibility import %d applied to %d cards", import_id, cards)
        elif channel == TERMINAL_KEYS_CHANNEL and self._key_rotation is not None:
            try:
                terminal_id = int(payload)
            except ValueError:
                log.warning("terminal key notice with a bad payload %r: ignored", payload)
                return
            await self._key_rotation.load(conn, self._state, terminal_id)
            log.info(
                "terminal key versions read",
                extra={"terminal_id": terminal_id, "next_key_version": self._key_rotation.pending.get(terminal_id)},
            )
        self.applied += 1

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def _catch_up_imports(self, conn: asyncpg.Connection) -> int:
        """Apply the eligibility imports newer than the last one applied."""
        newer = await conn.fetch(
            "SELECT id FROM eligibility_imports WHERE id > $1 ORDER BY id",
            self._last_import_id,
            timeout=DB_COMMAND_TIMEOUT_S,
        )
        for row in newer:
            await apply_eligibility_import(conn, self._state, row["id"])
            self._last_import_id = row["id"]
        return len(newer)

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), DB_COMMAND_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - closing a connection that may be dead already
                conn.terminate()
