"""Flood: thousands of idle connections and slow writers against one engine.

    python -m benchmarks.flood --idle 5000 --slow 500 --json

A hostile or broken network opens connections that never speak (idle) or
speak one byte at a time (slow writers, a "slowloris"). The engine must close
each of them by its handshake deadline (absolute: a byte now and then does
not extend it), keep its memory bounded while they are open, and keep
serving real terminals. This harness:

1. sets up a small city (embedded PostgreSQL in a temporary directory, or
   ``--dsn`` of an empty database) and starts ``citycard serve``;
2. opens ``--idle`` connections that send nothing and ``--slow`` connections
   that send a HELLO one byte every ``--slow-interval`` seconds;
3. meanwhile, one authenticated terminal taps at ``--rate`` taps/s;
4. records when the engine closed each flood connection, the engine's
   resident memory before and at its peak, and the real terminal's latency.

It prints one JSON object with at least ``idle``, ``slow``,
``closed_by_deadline`` (flood connections the engine closed within the
handshake deadline plus ``DEADLINE_SLACK_S``), ``not_closed``,
``rss_before_mb``, ``rss_peak_mb``, ``rss_per_connection_kb``,
``terminal_taps``, ``terminal_errors``, ``terminal_p50_ms`` and
``terminal_p99_ms``; it exits 0 when every flood connection was closed in
time and the terminal had no error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from benchmarks.common import (
    describe_machine,
    describe_versions,
    latency_summary,
    new_latency_histogram,
    print_json,
    serve_engine,
)
from engine import fastpath
from engine.client import ConnectionLost, EngineError, TerminalClient
from engine.codes import ResultCode, TerminalKind
from engine.db import connect, resolve_database
from engine.keys import derive_terminal_key, load_master_key
from engine.limits import HANDSHAKE_DEADLINE_S
from engine.migrate import migrate
from engine.seed import list_terminals, sample_cards, seed_city

# A flood connection counts as closed in time if the engine closed it within
# the handshake deadline plus this: the deadline timer, the close and the
# client noticing EOF on a loaded 2-core machine.
DEADLINE_SLACK_S = 2.0

# Connections opened per burst: the kernel's accept backlog (1,024 in the
# engine) must not overflow while the flood is being set up.
OPEN_BATCH = 200

# Cards in the city: enough for a terminal to tap for the whole run.
CITY_CARDS = 2000

# Descriptors this process needs besides the flood connections.
RESERVED_DESCRIPTORS = 256


class FloodConnection:
    """One idle or slow connection; remembers when the engine closed it."""

    def __init__(self, opened_at: float) -> None:
        self.opened_at = opened_at
        self.closed_at: float | None = None
        self.reset = False


async def hold_idle(host: str, port: int, connection: FloodConnection) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.read()  # until the engine closes it
    except ConnectionError:
        connection.reset = True
    connection.closed_at = time.monotonic()
    writer.close()


async def hold_slow(host: str, port: int, connection: FloodConnection, interval_s: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    hello = fastpath.encode_hello(1, 1, 1, bytes(16))
    closed = asyncio.ensure_future(reader.read())
    try:
        for byte in hello:
            if closed.done():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.wait([closed], timeout=interval_s)
        await closed
    except ConnectionError:
        connection.reset = True
    connection.closed_at = time.monotonic()
    writer.close()


def engine_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def run_flood(
    args: argparse.Namespace, engine_host: str, engine_port: int, pid: int, city: dict[str, object]
) -> dict[str, object]:
    master = load_master_key(args.data_dir)
    terminal_id = int(city["terminal"])  # type: ignore[call-overload]
    cards: list[int] = city["cards"]  # type: ignore[assignment]
    client = await TerminalClient.connect(
        engine_host, engine_port, terminal_id=terminal_id, key=derive_terminal_key(master, terminal_id, 1)
    )
    rss_before = engine_rss_bytes(pid)
    rss_peak = rss_before
    flood: list[FloodConnection] = []
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    for index in range(args.idle + args.slow):
        connection = FloodConnection(time.monotonic())
        flood.append(connection)
        if index < args.idle:
            tasks.append(asyncio.create_task(hold_idle(engine_host, engine_port, connection)))
        else:
            tasks.append(asyncio.create_task(hold_slow(engine_host, engine_port, connection, args.slow_interval)))
        if index % OPEN_BATCH == OPEN_BATCH - 1:
            await asyncio.sleep(0.01)
    histogram = new_latency_histogram()
    taps = errors = 0
    seq = time.time_ns() // 1000 + 10**11
    deadline = started + HANDSHAKE_DEADLINE_S + DEADLINE_SLACK_S + 1.0
    interval = 1.0 / args.rate
    while time.monotonic() < deadline or not all(c.closed_at for c in flood):
        if time.monotonic() > deadline + 30:
            break  # some flood connection was never closed: reported below
        seq += 1
        sent = time.perf_counter()
        try:
            result = await client.tap(seq, cards[taps % len(cards)])
            if result.result not in (ResultCode.APPROVED, ResultCode.INSUFFICIENT_FUNDS):
                errors += 1
        except (ConnectionLost, EngineError):
            errors += 1
        taps += 1
        histogram.record_value(max(1, int((time.perf_counter() - sent) * 1e6)))
        rss_peak = max(rss_peak, engine_rss_bytes(pid))
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - sent)))
    await client.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    limit = HANDSHAKE_DEADLINE_S + DEADLINE_SLACK_S
    lifetimes = [c.closed_at - c.opened_at for c in flood if c.closed_at is not None]
    summary = latency_summary(histogram)
    connections = max(1, args.idle + args.slow)
    return {
        "closed_by_deadline": sum(1 for life in lifetimes if life <= limit),
        "not_closed": sum(1 for c in flood if c.closed_at is None),
        "max_close_after_s": round(max(lifetimes), 3) if lifetimes else None,
        "resets": sum(1 for c in flood if c.reset),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "rss_per_connection_kb": round((rss_peak - rss_before) / connections / 1024, 2),
        "terminal_taps": taps,
        "terminal_errors": errors,
        "terminal_p50_ms": summary["p50_ms"],
        "terminal_p99_ms": summary["p99_ms"],
        "terminal_max_ms": summary["max_ms"],
    }


async def prepare_city(dsn: str) -> dict[str, object]:
    conn = await connect(dsn)
    try:
        await migrate(conn)
        if int(await conn.fetchval("SELECT count(*) FROM cards")) == 0:
            await seed_city(conn, CITY_CARDS)
        terminal = next(t for t in await list_terminals(conn) if t.kind == TerminalKind.VALIDATOR and t.status == 0)
        cards = [card.uid for card in await sample_cards(conn, CITY_CARDS) if card.balance_cents > 0]
        version = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    return {"terminal": terminal.id, "cards": cards, "postgres": version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=2000, help="connections that never speak")
    parser.add_argument("--slow", type=int, default=200, help="connections sending a HELLO byte by byte")
    parser.add_argument("--slow-interval", type=float, default=0.2, help="seconds between a slow writer's bytes")
    parser.add_argument("--rate", type=float, default=200.0, help="the real terminal's taps per second")
    parser.add_argument("--dsn", help="an existing (empty or seeded) database instead of an embedded server")
    parser.add_argument("--data-dir", type=Path, default=None, help="kept data directory (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    needed = args.idle + args.slow + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    temporary = args.data_dir is None
    args.data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="citycard-flood-"))
    started = time.monotonic()
    try:
        load_master_key(args.data_dir)  # created here, shared with the engine
        (args.data_dir / "logs").mkdir(exist_ok=True)
        with resolve_database(args.dsn, args.data_dir) as database:
            city = uvloop.run(prepare_city(database.dsn))
            with serve_engine(database.dsn, args.data_dir, log_dir=args.data_dir / "logs", name="flood") as engine:
                figures = uvloop.run(run_flood(args, engine.host, engine.port, engine.pid, city))
    finally:
        if temporary:
            shutil.rmtree(args.data_dir, ignore_errors=True)
    report: dict[str, object] = {
        "benchmark": "flood",
        "idle": args.idle,
        "slow": args.slow,
        "handshake_deadline_s": HANDSHAKE_DEADLINE_S,
        **figures,
        "seconds": round(time.monotonic() - started, 1),
        "machine": describe_machine(),
        "versions": describe_versions(str(city["postgres"])),
        "settings": {"slow_interval_s": args.slow_interval, "rate": args.rate, "cards": CITY_CARDS},
    }
    passed = (
        report["not_closed"] == 0
        and report["closed_by_deadline"] == args.idle + args.slow
        and report["terminal_errors"] == 0
    )
    report["passed"] = passed
    if args.json:
        print_json(report)
    else:
        for key, value in report.items():
            if key not in ("machine", "versions", "settings"):
                print(f"{key}: {value}")
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
