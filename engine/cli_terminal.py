"""Terminal key commands: provisioning and rotation.

    citycard terminal rotate-key --terminal 12 --actor ana

``rotate-key`` makes the terminal's next key version acceptable besides its
current one (``terminals.next_key_version``), writes an audit row and tells
the running engine, in one transaction, then prints the new key for the
terminal to be provisioned with. The terminal may open sessions with either
key until its first handshake under the new one, which retires the old key
(``engine/key_rotation.py``). Run again while the rotation is pending, it
changes nothing and prints the same new key.

Exit statuses: 0 done; 1 the database unreachable; 2 bad usage (no such
terminal, a bad actor name, no master key).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg
import orjson

from engine.cli_office import add_database_options
from engine.db import connect, default_data_dir, resolve_database, run_sync
from engine.key_rotation import AUDIT_ROTATION_STARTED, TERMINAL_KEYS_CHANNEL
from engine.keys import derive_terminal_key, load_master_key
from engine.migrate import migrate
from engine.rules import ACTOR_LENGTH_MAX

EXIT_OK = 0
EXIT_USAGE = 2

# terminals.key_version is a smallint (the protocol's field is a u16).
KEY_VERSION_MAX = 2**15 - 1


class RotationRefused(Exception):
    """The rotation cannot start: no such terminal, or no version left."""


def add_terminal_commands(subparsers: Any) -> None:
    """Add ``terminal rotate-key`` to ``citycard``'s subparsers."""
    terminal = subparsers.add_parser("terminal", help="terminal keys: rotation")
    commands = terminal.add_subparsers(dest="terminal_command", required=True)
    rotate = commands.add_parser(
        "rotate-key", help="accept the terminal's next key version too, and print its key for provisioning"
    )
    add_database_options(rotate)
    rotate.add_argument("--terminal", type=int, required=True)
    rotate.add_argument("--actor", required=True, help="who starts the rotation, for the audit log")
    rotate.set_defaults(handler=cmd_rotate_key)


async def start_rotation(conn: asyncpg.Connection, terminal_id: int, actor: str) -> tuple[int, int, bool]:
    """Make ``key_version + 1`` acceptable for a terminal; notify the engine.

    Returns (current version, next version, whether this call started it).
    """
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT key_version, next_key_version FROM terminals WHERE id = $1 FOR UPDATE", terminal_id
        )
        if row is None:
            raise RotationRefused(f"no terminal {terminal_id}")
        current, pending = int(row["key_version"]), row["next_key_version"]
        if pending is not None:
            return current, int(pending), False
        if current >= KEY_VERSION_MAX:
            raise RotationRefused(f"terminal {terminal_id} is at the last key version ({current})")
        await conn.execute("UPDATE terminals SET next_key_version = $2 WHERE id = $1", terminal_id, current + 1)
        await conn.execute(
            "INSERT INTO audit_log (actor, action, subject, detail) VALUES ($1, $2, $3, $4::jsonb)",
            actor,
            AUDIT_ROTATION_STARTED,
            f"terminal:{terminal_id}",
            orjson.dumps({"key_version": current, "next_key_version": current + 1}).decode(),
        )
        # Delivered at commit: the engine accepts the new key from then on.
        await conn.execute("SELECT pg_notify($1, $2)", TERMINAL_KEYS_CHANNEL, str(terminal_id))
        return current, current + 1, True


def cmd_rotate_key(args: argparse.Namespace) -> int:
    if not 1 <= len(args.actor) <= ACTOR_LENGTH_MAX:
        return _refuse(f"--actor must be 1 to {ACTOR_LENGTH_MAX} characters")
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    master = load_master_key(data_dir, create=False)

    async def run(dsn: str) -> tuple[int, int, bool]:
        conn = await connect(dsn)
        try:
            await migrate(conn)
            return await start_rotation(conn, args.terminal, args.actor)
        finally:
            await conn.close()

    try:
        with resolve_database(args.dsn, data_dir) as database:
            current, following, started = run_sync(run(database.dsn))
    except RotationRefused as error:
        return _refuse(str(error))
    print(
        orjson.dumps(
            {
                "terminal": args.terminal,
                "key_version": current,
                "next_key_version": following,
                "started": started,
                "next_key": derive_terminal_key(master, args.terminal, following).hex(),
            }
        ).decode()
    )
    return EXIT_OK


def _refuse(message: str) -> int:
    print(f"citycard: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_terminal_command(args: argparse.Namespace) -> int:
    """Run the leaf command ``add_terminal_commands`` parsed."""
    return int(args.handler(args))


TERMINAL_COMMANDS = {"terminal": run_terminal_command}
