"""Terminal key rotation without downtime.

A terminal's key is derived from the master secret, its id and its key
version (``engine/keys.py``); nothing secret is stored. Rotating it is moving
to the next version, in three steps:

1. ``citycard terminal rotate-key --terminal N --actor NAME`` sets
   ``terminals.next_key_version`` to the current version plus one, writes an
   audit row and notifies the engine (channel ``citycard_terminal_keys``),
   all in one transaction, and prints the new key for provisioning.
2. While a rotation is pending the terminal may authenticate with either
   version, so it can be re-provisioned whenever its turn comes, with no
   moment at which it cannot open a session.
3. The first successful handshake under the next version makes it current
   and retires the old one: at once in memory (the very next handshake with
   the old key is refused) and in the database, written by the engine with
   an audit row (retried until the database takes it; until then a restarted
   engine accepts both versions again, and the next handshake under the new
   one completes the switch again).

Sessions already open under the old version stay open: their seals use the
session keys derived when they opened.

Versions only move forward: what the engine reads from the database never
takes a terminal back to an older version than the one it switched to.

>>> rotation = KeyRotation()
>>> terminal = Terminal(id=7, service_id=1, kind=0, key_version=1, active=True, funding_account=-1, high_seq=-1)
>>> rotation.apply(terminal, key_version=1, next_key_version=2)
>>> rotation.accepts(terminal, 1), rotation.accepts(terminal, 2)
(True, True)
>>> rotation.authenticated(terminal, 2)
>>> rotation.accepts(terminal, 1), rotation.accepts(terminal, 2)
(False, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import orjson

from engine.limits import DB_COMMAND_TIMEOUT_S
from engine.state import CityState, Terminal

log = logging.getLogger("citycard.keys")

TERMINAL_KEYS_CHANNEL = "citycard_terminal_keys"

# The audit trail's actor and actions for key rotations.
ENGINE_ACTOR = "engine"
AUDIT_ROTATION_STARTED = "terminal.rotate_key"
AUDIT_ROTATION_COMPLETED = "terminal.key_rotated"

# Recording a completed rotation while the database is away: the writer's
# backoff bounds, so a restarting database is not hammered.
RECORD_RETRY_MIN_S = 0.05
RECORD_RETRY_MAX_S = 2.0

# How long stop() waits for completed rotations to be recorded.
RECORD_DRAIN_S = 5.0

_COMPLETE_SQL = """
WITH switched AS (
    UPDATE terminals SET key_version = $2, next_key_version = NULL
    WHERE id = $1 AND next_key_version = $2
    RETURNING id
)
INSERT INTO audit_log (actor, action, subject, detail)
SELECT $3, $4, 'terminal:' || id, $5::jsonb FROM switched
"""


class KeyRotation:
    """Which key versions each terminal may authenticate with.

    ``pending`` maps a terminal id to the next key version accepted besides
    its current one (``Terminal.key_version``).
    """

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.completed = 0  # rotations completed by a handshake since start
        self._pool: asyncpg.Pool | None = None
        self._records: set[asyncio.Task[None]] = set()

    def attach(self, pool: asyncpg.Pool) -> None:
        """Record completed rotations in the database through ``pool``."""
        self._pool = pool

    # --- deciding a handshake -----------------------------------------------------

    def accepts(self, terminal: Terminal, key_version: int) -> bool:
        """True for the terminal's current key version, or its pending next one."""
        return key_version == terminal.key_version or self.pending.get(terminal.id) == key_version

    def authenticated(self, terminal: Terminal, key_version: int) -> None:
        """A handshake under ``key_version`` succeeded: complete a pending rotation to it."""
        if self.pending.get(terminal.id) != key_version:
            return
        retired = terminal.key_version
        terminal.key_version = key_version
        del self.pending[terminal.id]
        self.completed += 1
        log.info(
            "terminal key rotated",
            extra={"terminal_id": terminal.id, "key_version": key_version, "retired_key_version": retired},
        )
        if self._pool is not None:
            task = asyncio.get_running_loop().create_task(self._record(terminal.id, key_version, retired))
            self._records.add(task)
            task.add_done_callback(self._records.discard)

    async def _record(self, terminal_id: int, key_version: int, retired: int) -> None:
        detail = orjson.dumps({"key_version": key_version, "retired_key_version": retired}).decode()
        delay = RECORD_RETRY_MIN_S
        while True:
            pool = self._pool
            assert pool is not None
            try:
                async with pool.acquire(timeout=DB_COMMAND_TIMEOUT_S) as conn:
                    await conn.execute(
                        _COMPLETE_SQL,
                        terminal_id,
                        key_version,
                        ENGINE_ACTOR,
                        AUDIT_ROTATION_COMPLETED,
                        detail,
                        timeout=DB_COMMAND_TIMEOUT_S,
                    )
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any database failure: retry
                log.warning(
                    "recording a key rotation failed; retrying",
                    extra={"terminal_id": terminal_id, "key_version": key_version, "error": repr(error)},
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_RETRY_MAX_S)

    async def close(self) -> None:
        """Wait (a bounded time) for completed rotations to be recorded."""
        if self._records:
            await asyncio.wait(set(self._records), timeout=RECORD_DRAIN_S)
        for task in list(self._records):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- reading the database -----------------------------------------------------

    def apply(self, terminal: Terminal, *, key_version: int, next_key_version: int | None) -> None:
        """Take a terminal's versions as the database holds them, never going back."""
        if key_version > terminal.key_version:
            terminal.key_version = key_version
        if next_key_version is not None and next_key_version > terminal.key_version:
            self.pending[terminal.id] = next_key_version
        else:
            self.pending.pop(terminal.id, None)

    async def load(self, conn: asyncpg.Connection, state: CityState, terminal_id: int | None = None) -> None:
        """Read the versions of one terminal, or of all (at start, after a lost notice)."""
        rows = await conn.fetch(
            "SELECT id, key_version, next_key_version FROM terminals WHERE $1::integer IS NULL OR id = $1",
            terminal_id,
            timeout=DB_COMMAND_TIMEOUT_S,
        )
        for row in rows:
            # A terminal added after the city was loaded is served after a restart.
            terminal = state.terminals.get(row["id"])
            if terminal is not None:
                self.apply(terminal, key_version=row["key_version"], next_key_version=row["next_key_version"])
