"""``citycard rules``: check, load and show the city's rules (``docs/rules.md``).

    citycard rules check rules/gijon.toml              validate a file, offline
    citycard rules load rules/gijon.toml --actor maria  store it as a new version
    citycard rules show [--version N] [--json]           print a stored version

``load`` and ``show`` take ``--dsn`` / ``--data-dir`` like every command that
touches the database. ``show`` prints the stored document as a rules file
(TOML) that ``check`` and ``load`` accept again, or as JSON with ``--json``.

Exit codes: 0 success, 1 runtime failure (database unreachable), 2 a rules
file or request that is not valid (the message says what and where).

Wiring, in ``engine.cli``::

    add_rules_commands(commands)           # in build_parser
    COMMANDS["rules"] = run_rules_command
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import orjson

from engine.db import connect, default_data_dir, resolve_database, run_sync
from engine.migrate import migrate
from engine.rules import (
    ACTOR_LENGTH_MAX,
    Rules,
    RulesError,
    StoredRules,
    canonical_json,
    read_rules_file,
    rules_sha256,
    store_rules,
    stored_rules,
)

EXIT_USAGE = 2

_T = TypeVar("_T")


def add_rules_commands(subparsers: Any) -> None:
    """Add ``rules check|load|show`` to a parser's subcommands
    (``subparsers`` is what ``ArgumentParser.add_subparsers`` returned)."""
    rules = subparsers.add_parser("rules", help="check, load and show the city's rules and tariffs")
    actions = rules.add_subparsers(dest="rules_command", required=True, metavar="{check,load,show}")

    check = actions.add_parser("check", help="validate a rules file without touching the database")
    check.add_argument("file", type=Path)

    load = actions.add_parser("load", help="store a rules file as a new version and apply its tariffs")
    _database_options(load)
    load.add_argument("file", type=Path)
    load.add_argument("--actor", required=True, help="who loads it (recorded in the audit log)")

    show = actions.add_parser("show", help="print a stored rules version (default: the current one)")
    _database_options(show)
    show.add_argument("--version", type=int, default=None, help="the version to show")
    show.add_argument("--json", action="store_true", help="JSON with who loaded it and when, not TOML")


def run_rules_command(args: argparse.Namespace) -> int:
    """Run the ``rules`` subcommand parsed into ``args``; returns the exit code."""
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "check": _check,
        "load": _load,
        "show": _show,
    }
    try:
        return handlers[args.rules_command](args)
    except RulesError as error:
        return _refuse(str(error))


def _refuse(message: str) -> int:
    print(f"citycard: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _database_options(parser: argparse.ArgumentParser) -> None:
    # The same options, with the same meaning, as every other command's.
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $CITYCARD_DSN, else the embedded server)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded server and the master key live (default: $CITYCARD_DATA_DIR or ./var)",
    )


def _check(args: argparse.Namespace) -> int:
    rules = read_rules_file(args.file)
    print(_summary(rules))
    return 0


def _load(args: argparse.Namespace) -> int:
    if not 1 <= len(args.actor) <= ACTOR_LENGTH_MAX:
        return _refuse(f"--actor must be 1 to {ACTOR_LENGTH_MAX} characters")
    rules = read_rules_file(args.file)

    async def work(conn: asyncpg.Connection) -> int:
        return await store_rules(conn, rules, actor=args.actor, source_name=Path(args.file).name)

    _in_database(args, work)
    print(_summary(rules))
    return 0


def _show(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> StoredRules | None:
        return await stored_rules(conn, args.version)

    stored = _in_database(args, work)
    if stored is None:
        if args.version is None:
            raise RulesError("the database holds no rules yet (load a file with: citycard rules load FILE)")
        raise RulesError(f"no rules version {args.version} in the database")
    if args.json:
        print(
            orjson.dumps(
                {
                    "version": stored.version,
                    "name": stored.name,
                    "sha256": stored.sha256,
                    "loaded_at": stored.loaded_at.isoformat(),
                    "loaded_by": stored.loaded_by,
                    "document": orjson.Fragment(canonical_json(stored.rules)),
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
    else:
        print(
            f"# rules version {stored.version}, loaded {stored.loaded_at.isoformat()} by {stored.loaded_by}\n"
            f"# sha256 {stored.sha256}\n"
        )
        print(render_toml(stored.rules), end="")
    return 0


def _summary(rules: Rules) -> str:
    return orjson.dumps({"version": rules.version, "name": rules.name, "sha256": rules_sha256(rules)}).decode()


def _in_database(args: argparse.Namespace, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()

    async def run(dsn: str) -> _T:
        conn = await connect(dsn)
        try:
            await migrate(conn)
            return await work(conn)
        finally:
            await conn.close()

    with resolve_database(args.dsn, data_dir) as database:
        return run_sync(run(database.dsn))


# --- TOML ---------------------------------------------------------------------------

# The document's tables in the order a rules file lists them. Arrays of
# tables are written as [[name]] blocks, mappings as inline tables.
_TABLES = ("rules", "services", "transfer", "caps", "products", "concessions", "security")


def render_toml(rules: Rules) -> str:
    """``rules`` as a rules file: ``parse_rules(render_toml(rules)) == rules``.

    >>> from engine.rules import EXAMPLE, parse_rules
    >>> print(render_toml(parse_rules(EXAMPLE)).splitlines()[1])
    version = 1
    """
    document = msgspec.to_builtins(rules)
    blocks: list[str] = []
    for table in _TABLES:
        value = document.get(table)
        if isinstance(value, (list, tuple)):
            blocks.extend(_table(f"[[{table}]]", item) for item in value)
        elif isinstance(value, dict):
            blocks.append(_table(f"[{table}]", value))
    return "\n".join(blocks)


def _table(header: str, fields: dict[str, Any]) -> str:
    lines = [header]
    lines.extend(f"{key} = {_value(value)}" for key, value in fields.items() if value is not None)
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (the same quotes and escapes),
        # except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        # Keys are codes (lowercase words): bare keys in TOML.
        return "{ " + ", ".join(f"{key} = {_value(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")
