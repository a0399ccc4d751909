"""``citycard``: the command line.

    citycard demo                       seed a demo city (first run) and serve it
    citycard serve --listen 127.0.0.1:7700 --metrics 127.0.0.1:9700
    citycard migrate
    citycard seed --cards 340000
    citycard tap --terminal 1 --card 1234567890 [--tls-ca engine.pem]
    citycard terminal-key --terminal 1
    citycard list-key                   the public key that signs terminals' hot list and rules
    citycard terminal rotate-key --terminal 1 --actor NAME  accept a new key too (engine/cli_terminal.py)
    citycard status
    citycard card block 1234567890 --reason lost     card-office operations (engine/cli_card.py)
    citycard rules load rules/gijon.toml --actor NAME  a new rules version (engine/cli_rules.py)
    citycard eligibility import registry.csv --actor NAME
    citycard report daily --date 2026-11-30
    citycard reconcile                                 balances against the ledger (engine/cli_office.py)

Every command that touches the database takes ``--dsn`` (or
``CITYCARD_DSN``); without one it starts the embedded PostgreSQL in
``--data-dir`` (default ``./var``, or ``CITYCARD_DATA_DIR``).

Exit codes: 0 success, 1 runtime failure (database unreachable, port in use),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson

from engine import __version__, fastpath, logs
from engine.blocking_client import BlockingTerminalClient
from engine.cli_card import CARD_COMMANDS, add_card_commands
from engine.cli_office import OFFICE_COMMANDS, add_office_commands
from engine.cli_rules import add_rules_commands, run_rules_command
from engine.cli_terminal import TERMINAL_COMMANDS, add_terminal_commands
from engine.client import AuthenticationError, ConnectionLost, EngineError
from engine.db import DatabaseUnavailable, connect, default_data_dir, describe_dsn, resolve_database
from engine.embedded_db import EmbeddedDatabaseError
from engine.keys import MasterKeyError, derive_terminal_key, load_master_key
from engine.migrate import MigrationError, migrate
from engine.seed import AlreadySeeded, seed_city
from engine.server import Engine, EngineConfig, EngineStartError
from engine.signing import ListSigner
from engine.tls import TlsConfigError, client_context, server_context

DEFAULT_LISTEN = "127.0.0.1:7700"
DEFAULT_METRICS = "127.0.0.1:9700"
DEFAULT_ADMIN = "127.0.0.1:9701"
# The demo city is Gijón's size.
DEMO_CARDS = 340_000

EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("citycard")


class EngineFailure(Exception):
    """The engine stopped itself on a bug (exit code 1)."""


class UsageError(Exception):
    """A bad argument or configuration value (exit code 2)."""


def parse_address(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error.

    >>> parse_address("127.0.0.1:7700", "--listen")
    ('127.0.0.1', 7700)
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{option} must be HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host.strip("[]"), int(port_text)


def _database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $CITYCARD_DSN, else the embedded server)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the embedded server and the master key live (default: $CITYCARD_DATA_DIR or ./var)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citycard", description="City card transaction engine")
    parser.add_argument("--version", action="version", version=f"citycard {__version__} ({fastpath.IMPLEMENTATION})")
    parser.add_argument("--log-level", default=os.environ.get("CITYCARD_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the engine")
    _database_options(serve)
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help=f"terminal port (default {DEFAULT_LISTEN})")
    serve.add_argument("--metrics", default=DEFAULT_METRICS, help="metrics HOST:PORT, or 'off'")
    serve.add_argument("--admin", default=DEFAULT_ADMIN, help="card-office interface HOST:PORT, or 'off'")
    serve.add_argument("--batch-max", type=int, default=None, help="most decisions per commit")
    serve.add_argument("--naive", action="store_true", help="one commit per tap (for comparison only)")
    serve.add_argument("--tls-cert", metavar="FILE", help="serve terminals over TLS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    # The fault harness's negative control; needs CITYCARD_ALLOW_UNSAFE=1 too.
    serve.add_argument("--unsafe-answer-before-commit", action="store_true", help=argparse.SUPPRESS)

    demo = commands.add_parser("demo", help="seed a demo city on first run, then serve it")
    _database_options(demo)
    demo.add_argument("--cards", type=int, default=DEMO_CARDS)
    demo.add_argument("--listen", default=DEFAULT_LISTEN)
    demo.add_argument("--metrics", default=DEFAULT_METRICS)
    demo.add_argument("--admin", default=DEFAULT_ADMIN, help="card-office interface HOST:PORT, or 'off'")

    migrate_cmd = commands.add_parser("migrate", help="apply schema migrations")
    _database_options(migrate_cmd)

    seed = commands.add_parser("seed", help="create a synthetic city")
    _database_options(seed)
    seed.add_argument("--cards", type=int, required=True)
    seed.add_argument("--seed", type=int, default=2026)

    tap = commands.add_parser("tap", help="act as a terminal once and print the result")
    _database_options(tap)
    tap.add_argument("--engine", default=DEFAULT_LISTEN, help="engine HOST:PORT")
    tap.add_argument("--terminal", type=int, required=True)
    tap.add_argument("--card", help="card uid (decimal, or 0x... hex)")
    tap.add_argument("--seq", type=int, help="terminal sequence (default: microseconds since the epoch)")
    tap.add_argument("--topup", type=int, metavar="CENTS", help="top up instead of paying (kiosks)")
    tap.add_argument("--reversal", type=int, metavar="SEQ", help="reverse this earlier sequence")
    tap.add_argument("--exit", action="store_true", help="mark the tap as an exit tap")
    tap.add_argument("--key-version", type=int, default=1, help="the terminal's key version (default 1)")
    tap.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's CAs")
    tap.add_argument("--tls-ca", metavar="FILE", help="connect over TLS, trusting this CA certificate (PEM)")

    key = commands.add_parser("terminal-key", help="print a terminal's key (hex) for provisioning")
    _database_options(key)
    key.add_argument("--terminal", type=int, required=True)

    list_key = commands.add_parser(
        "list-key", help="print the public key (hex) that signs the hot list and rules terminals keep offline"
    )
    list_key.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the master key lives (default: $CITYCARD_DATA_DIR or ./var)",
    )

    status = commands.add_parser("status", help="what the database holds, and whether the ledger balances")
    _database_options(status)

    add_card_commands(commands)
    add_rules_commands(commands)
    add_office_commands(commands)
    add_terminal_commands(commands)
    return parser


def _data_dir(args: argparse.Namespace) -> Path:
    return args.data_dir if args.data_dir is not None else default_data_dir()


async def _with_connection(dsn: str, work: Callable[..., Awaitable[object]]) -> object:
    conn = await connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    with resolve_database(args.dsn, _data_dir(args)) as database:
        applied = asyncio.run(_with_connection(database.dsn, migrate))
    print(orjson.dumps({"applied": applied}).decode())
    return 0


async def _seed(dsn: str, cards: int, seed: int) -> object:
    async def work(conn: asyncpg.Connection) -> object:
        await migrate(conn)
        return await seed_city(conn, cards, seed=seed)

    return await _with_connection(dsn, work)


def cmd_seed(args: argparse.Namespace) -> int:
    if args.cards < 1:
        raise UsageError("--cards must be at least 1")
    started = time.perf_counter()
    with resolve_database(args.dsn, _data_dir(args)) as database:
        summary = asyncio.run(_seed(database.dsn, args.cards, args.seed))
    print(orjson.dumps({"seeded": _as_dict(summary), "seconds": round(time.perf_counter() - started, 2)}).decode())
    return 0


def _as_dict(value: object) -> object:
    if hasattr(value, "__struct_fields__"):
        return {name: getattr(value, name) for name in value.__struct_fields__}
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    return value


def _engine_config(args: argparse.Namespace, dsn: str) -> EngineConfig:
    host, port = parse_address(args.listen, "--listen")
    metrics_host, metrics_port = ("", None) if args.metrics == "off" else parse_address(args.metrics, "--metrics")
    admin = getattr(args, "admin", "off")
    admin_host, admin_port = ("", None) if admin == "off" else parse_address(admin, "--admin")
    batch_max = getattr(args, "batch_max", None)
    if getattr(args, "naive", False):
        batch_max = 1
    options: dict[str, object] = {}
    if getattr(args, "unsafe_answer_before_commit", False):
        options["unsafe_answer_before_commit"] = True
    tls_cert, tls_key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and tls_key is not None:
        server_context(tls_cert, tls_key)  # a bad file is refused now, before anything starts
        options["tls_cert"], options["tls_key"] = tls_cert, tls_key
    if batch_max is not None:
        if batch_max < 1:
            raise UsageError("--batch-max must be at least 1")
        options["batch_taps_max"] = batch_max
    return EngineConfig(
        dsn=dsn,
        data_dir=str(_data_dir(args)),
        listen_host=host,
        listen_port=port,
        metrics_host=metrics_host or "127.0.0.1",
        metrics_port=metrics_port,
        admin_host=admin_host or "127.0.0.1",
        admin_port=admin_port,
        **options,  # type: ignore[arg-type]
    )


async def _serve(config: EngineConfig, banner: Callable[[Engine], None] | None = None) -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; this only guards odd platforms
        pass
    engine = Engine(config)
    await engine.start()
    if banner is not None:
        banner(engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    failed = asyncio.ensure_future(engine.failed.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    await engine.stop()
    if engine.failed.is_set():
        raise EngineFailure("the engine stopped on an internal error (see the log above)")


def _run_serve(config: EngineConfig, banner: Callable[[Engine], None] | None = None) -> None:
    try:
        import uvloop

        uvloop.run(_serve(config, banner))
    except ImportError:  # pragma: no cover
        asyncio.run(_serve(config, banner))


def cmd_serve(args: argparse.Namespace) -> int:
    config_probe = _engine_config(args, "")  # validate arguments before starting anything
    with resolve_database(args.dsn, _data_dir(args)) as database:
        config = EngineConfig(**{**_as_dict(config_probe), "dsn": database.dsn})  # type: ignore[arg-type, dict-item]

        def banner(engine: Engine) -> None:
            print(
                orjson.dumps(
                    {
                        "listening": f"{config.listen_host}:{engine.port}",
                        "metrics": f"{config.metrics_host}:{engine.metrics_port}" if engine.metrics_port else None,
                        "admin": f"{config.admin_host}:{engine.admin_port}" if engine.admin_port else None,
                        "database": describe_dsn(database.dsn),
                        "fastpath": fastpath.IMPLEMENTATION,
                    }
                ).decode(),
                flush=True,
            )

        _run_serve(config, banner)
    return 0


async def _count_cards(dsn: str) -> int:
    async def work(conn: asyncpg.Connection) -> int:
        await migrate(conn)
        return int(await conn.fetchval("SELECT count(*) FROM cards"))

    return int(await _with_connection(dsn, work))  # type: ignore[call-overload]


async def _first_terminal_and_card(dsn: str) -> tuple[int, int]:
    async def work(conn: asyncpg.Connection) -> tuple[int, int]:
        row = await conn.fetchrow(
            "SELECT (SELECT t.id FROM terminals t JOIN services s ON s.id = t.service_id"
            "        WHERE t.kind = 0 ORDER BY t.id LIMIT 1) AS terminal,"
            " (SELECT c.uid FROM cards c JOIN accounts a ON a.id = c.account_id"
            "  WHERE c.status = 0 AND a.balance_cents >= 500 ORDER BY c.uid LIMIT 1) AS card"
        )
        return int(row["terminal"]), int(row["card"])

    return await _with_connection(dsn, work)  # type: ignore[return-value]


def cmd_demo(args: argparse.Namespace) -> int:
    config_probe = _engine_config(args, "")
    with resolve_database(args.dsn, _data_dir(args)) as database:
        cards = asyncio.run(_count_cards(database.dsn))
        if cards == 0:
            print(f"seeding a demo city of {args.cards} cards...", flush=True)
            started = time.perf_counter()
            asyncio.run(_seed(database.dsn, args.cards, 2026))
            print(f"seeded in {time.perf_counter() - started:.1f}s", flush=True)
        terminal, card = asyncio.run(_first_terminal_and_card(database.dsn))
        config = EngineConfig(**{**_as_dict(config_probe), "dsn": database.dsn})  # type: ignore[arg-type, dict-item]

        def banner(engine: Engine) -> None:
            data_dir = "" if args.data_dir is None else f" --data-dir {args.data_dir}"
            print(
                f"\ncitycard demo: terminals connect to {config.listen_host}:{engine.port}"
                f" (metrics on {config.metrics_host}:{engine.metrics_port})\n"
                f"In another shell, tap a card:\n"
                f"  .venv/bin/citycard tap{data_dir} --engine {config.listen_host}:{engine.port}"
                f" --terminal {terminal} --card {card}\n"
                + (
                    f"and look at it as the card office does (admin interface on"
                    f" {config.admin_host}:{engine.admin_port}):\n"
                    f"  .venv/bin/citycard card show {card}{data_dir}"
                    + (
                        ""
                        if f"{config.admin_host}:{engine.admin_port}" == DEFAULT_ADMIN
                        else f" --admin-url http://{config.admin_host}:{engine.admin_port}"
                    )
                    + "\n"
                    if engine.admin_port
                    else ""
                )
                + "Stop with Ctrl-C.\n",
                flush=True,
            )

        _run_serve(config, banner)
    return 0


def _card_uid(text: str | None) -> int:
    if text is None:
        raise UsageError("--card is required for a tap or a top-up")
    return int(text, 0)


def cmd_tap(args: argparse.Namespace) -> int:
    host, port = parse_address(args.engine, "--engine")
    master = load_master_key(_data_dir(args), create=False)
    key_version = args.key_version
    key = derive_terminal_key(master, args.terminal, key_version)
    seq = args.seq if args.seq is not None else time.time_ns() // 1000
    tls = client_context(args.tls_ca) if args.tls or args.tls_ca is not None else None
    with BlockingTerminalClient(
        host, port, terminal_id=args.terminal, key=key, key_version=key_version, tls=tls
    ) as client:
        if args.reversal is not None:
            result = client.reversal(seq, args.reversal)
        elif args.topup is not None:
            result = client.topup(seq, _card_uid(args.card), args.topup)
        else:
            result = client.tap(seq, _card_uid(args.card), tap_flags=1 if args.exit else 0)
    print(
        orjson.dumps(
            {
                "terminal": args.terminal,
                "seq": result.terminal_seq,
                "result": result.result.name,
                "amount_cents": result.amount_cents,
                "balance_cents": result.balance_cents,
                "info": [flag.name for flag in result.info],
            }
        ).decode()
    )
    return 0 if result.approved else 3


def cmd_terminal_key(args: argparse.Namespace) -> int:
    master = load_master_key(_data_dir(args), create=False)

    async def key_versions(conn: asyncpg.Connection) -> tuple[int, int | None] | None:
        await migrate(conn)
        row = await conn.fetchrow("SELECT key_version, next_key_version FROM terminals WHERE id = $1", args.terminal)
        return None if row is None else (int(row[0]), row[1])

    with resolve_database(args.dsn, _data_dir(args)) as database:
        versions = asyncio.run(_with_connection(database.dsn, key_versions))
    if not isinstance(versions, tuple):
        raise UsageError(f"no terminal {args.terminal}")
    version, following = versions
    report: dict[str, object] = {
        "terminal": args.terminal,
        "key_version": version,
        "key": derive_terminal_key(master, args.terminal, version).hex(),
    }
    if following is not None:  # a rotation is pending (citycard terminal rotate-key)
        report["next_key_version"] = following
        report["next_key"] = derive_terminal_key(master, args.terminal, following).hex()
    print(orjson.dumps(report).decode())
    return 0


def cmd_list_key(args: argparse.Namespace) -> int:
    signer = ListSigner(load_master_key(_data_dir(args), create=False))
    print(orjson.dumps({"algorithm": "Ed25519", "public_key": signer.public_key.hex()}).decode())
    return 0


_STATUS_SQL = """
SELECT
  (SELECT count(*) FROM cards) AS cards,
  (SELECT count(*) FROM cards WHERE status = 0) AS cards_active,
  (SELECT count(*) FROM holders) AS holders,
  (SELECT count(*) FROM services) AS services,
  (SELECT count(*) FROM terminals) AS terminals,
  (SELECT count(*) FROM taps) AS taps,
  (SELECT count(*) FROM taps WHERE result = 0) AS approved,
  (SELECT count(*) FROM batches) AS batches,
  (SELECT max(committed_at) FROM batches) AS last_commit,
  (SELECT coalesce(sum(balance_cents), 0)::int8 FROM accounts WHERE kind = 0) AS card_balances_cents,
  (SELECT coalesce(sum(balance_cents), 0)::int8 FROM accounts) AS all_balances_cents,
  (SELECT coalesce(sum(amount_cents), 0)::int8 FROM ledger_entries) AS ledger_sum_cents,
  (SELECT count(*) FROM accounts a WHERE a.balance_cents <> coalesce(
      (SELECT sum(e.amount_cents) FROM ledger_entries e WHERE e.account_id = a.id), 0)) AS accounts_off_ledger,
  (SELECT count(*) FROM taps t WHERE NOT EXISTS (SELECT 1 FROM terminals x WHERE x.id = t.terminal_id)
       OR NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = t.batch_id)
       OR (t.account_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = t.account_id)))
    + (SELECT count(*) FROM ledger_entries e WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = e.account_id)
       OR NOT EXISTS (SELECT 1 FROM ledger_transfers l WHERE l.id = e.transfer_id)) AS orphan_rows
"""


def cmd_status(args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> dict[str, object]:
        await migrate(conn)
        row = await conn.fetchrow(_STATUS_SQL)
        return {key: (value.isoformat() if hasattr(value, "isoformat") else value) for key, value in row.items()}

    with resolve_database(args.dsn, _data_dir(args)) as database:
        report = asyncio.run(_with_connection(database.dsn, work))
        assert isinstance(report, dict)
        report["database"] = describe_dsn(database.dsn)
    report["ledger_balanced"] = (
        report["ledger_sum_cents"] == 0 and report["accounts_off_ledger"] == 0 and report["orphan_rows"] == 0
    )
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["ledger_balanced"] else EXIT_FAILURE


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "demo": cmd_demo,
    "migrate": cmd_migrate,
    "seed": cmd_seed,
    "tap": cmd_tap,
    "terminal-key": cmd_terminal_key,
    "list-key": cmd_list_key,
    "status": cmd_status,
    **TERMINAL_COMMANDS,
    **CARD_COMMANDS,
    "rules": run_rules_command,
    **OFFICE_COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(str(args.log_level))
    except ValueError as error:
        parser.error(str(error))
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        parser.error(str(error))
    except (MasterKeyError, AlreadySeeded, MigrationError, TlsConfigError) as error:
        print(f"citycard: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (DatabaseUnavailable, EmbeddedDatabaseError, EngineStartError, EngineFailure) as error:
        print(f"citycard: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except (
        ConnectionRefusedError,
        ConnectionLost,
        AuthenticationError,
        EngineError,
        fastpath.ProtocolError,
        OSError,
    ) as error:
        print(f"citycard: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return 0  # unreachable: parser.error exits


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
