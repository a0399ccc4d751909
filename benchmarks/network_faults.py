"""Network faults: terminals and PostgreSQL reached through proxies that reset,
stall and fragment, under load; then the bank checker audits the books.

    python -m benchmarks.network_faults --seconds 60 --json
    python -m benchmarks.network_faults --seconds 300 --seed 7 --json

1. Sets up the small city of ``benchmarks.crash`` in the embedded PostgreSQL
   in a temporary directory, or in ``--dsn`` (an empty database).
2. Starts two ``benchmarks.proxy.FaultyProxy``: one in front of PostgreSQL,
   one in front of the engine. The engine (``citycard serve``, metrics on)
   is given a DSN that points at the database proxy; the terminals connect
   through the terminal proxy.
3. For ``--seconds``, the terminals send load (the crash harness's requests:
   fares, top-ups, declines) while a seeded schedule on each proxy injects
   resets (RST both ways), short stalls (50 ms - 2 s), fragment spells, and
   on the database side also a reset followed by a stall longer than the
   writer's connect timeout (``engine.writer.WRITER_CONNECT_TIMEOUT_S``), so
   the writer's commit dies, its reconnect gives up, and the batch's outcome
   can only be resolved by looking its id up later. With ``--long-stalls``
   the schedule also holds a connection silent past ``DB_COMMAND_TIMEOUT_S``
   (the commit statement times out; runs of two minutes or more).
   A terminal whose connection breaks (or whose request goes unanswered for
   ``REQUEST_TIMEOUT_S``) reconnects and re-sends every unknown request with
   the same sequence and content before anything new; BUSY_RETRY is re-sent
   with backoff.
4. Stops the faults, lets every terminal resolve what it does not know,
   re-sends a sample of answered requests (the answer must not change),
   reads the engine's writer metrics, stops the engine (SIGTERM, exit 0) and
   runs the crash harness's checker (``benchmarks.crash.audit_database``).

Prints one JSON object (``--json``) with the checker's counts, the faults by
kind and side, and ``writer_resolutions`` (batches whose outcome the writer
had to look up after a failure, from its log); exits 0 only if every count is
zero and money is conserved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks.common import REPOSITORY_ROOT, describe_versions, free_port, metric_sum
from benchmarks.crash import (
    _BUSY,
    BUSY_BACKOFF_MAX_S,
    BUSY_BACKOFF_MIN_S,
    CHECKER_APPLICATION_NAME,
    ENGINE_START_ATTEMPTS,
    ENGINE_START_TIMEOUT_S,
    KIOSK_PIPELINE,
    LOG_TAIL_CHARS,
    RESENDS_PER_TERMINAL,
    Answer,
    Cycle,
    EngineRun,
    Harness,
    HarnessError,
    Request,
    Terminal,
    audit_database,
    create_city,
    run_in_data_dir,
    send,
    stop_engine,
    wait_for_orphan_sessions,
)
from benchmarks.proxy import FaultyProxy
from engine.client import ConnectionLost, EngineError, TerminalClient
from engine.limits import DB_COMMAND_TIMEOUT_S
from engine.writer import WRITER_CONNECT_TIMEOUT_S

DEFAULT_SECONDS = 30.0
DEFAULT_TERMINALS = 4
DEFAULT_PIPELINE = 4
DEFAULT_SEED = 2026

# A terminal that hears nothing for this long gives up on the connection,
# reconnects and re-sends: longer than a short stall (2 s), shorter than the
# writer's worst wait (a commit timing out after DB_COMMAND_TIMEOUT_S).
REQUEST_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Pause between failed connection attempts of one terminal.
RECONNECT_PAUSE_MIN_S = 0.01
RECONNECT_PAUSE_MAX_S = 0.5
# After the faults stop, every unknown must be resolved within this: the
# writer's longest wait (a commit timing out, then the look-up) and change.
FINAL_RESOLVE_S = DB_COMMAND_TIMEOUT_S + 60.0
# Database side: a fifth of the stalls are a reset followed by silence past
# the writer's connect timeout (its reconnect gives up at least once).
CONNECT_GIVE_UP_STALL_S = WRITER_CONNECT_TIMEOUT_S + 1.0
# With --long-stalls: silence past the commit statement's timeout.
COMMAND_GIVE_UP_STALL_S = DB_COMMAND_TIMEOUT_S + 2.0
LONG_STALL_SHARE = 0.2
# Re-sends after a reconnection are drawn from the last this many answers
# of the terminal (bounded memory; the final audit checks every answer).
RESEND_SAMPLE_MAX = 1_000
# What the writer logs when a batch fails and its outcome must be looked up
# (engine/writer.py), and when the look-up finds it committed.
RESOLVING_LINE = "resolving its outcome"
COMMITTED_BEFORE_FAILURE_LINE = "was committed before the failure"


@dataclass
class NetworkTally:
    connects: int = 0
    connect_failures: int = 0
    connections_lost: int = 0
    request_timeouts: int = 0
    engine_failures: int = 0
    failure_logs: list[str] = field(default_factory=list)


class NetworkHarness(Harness):
    """The crash harness's city, requests and bookkeeping; terminals that
    reconnect through a proxy instead of living through engine restarts."""

    def __init__(self, args: argparse.Namespace, dsn: str, data_dir: Path) -> None:
        super().__init__(args, dsn, data_dir)
        self.network = NetworkTally()

    async def until_final(
        self, client: TerminalClient, request: Request, deadline: float | None = None
    ) -> Answer | None:
        """Send (re-send on BUSY_RETRY) until a final answer; None when the
        connection broke or went silent (the caller reconnects)."""
        delay = BUSY_BACKOFF_MIN_S
        while True:
            try:
                answer = await asyncio.wait_for(send(client, request), REQUEST_TIMEOUT_S)
            except TimeoutError:
                self.network.request_timeouts += 1
                return None
            except (ConnectionLost, EngineError, ConnectionError, OSError):
                return None
            if answer.result != _BUSY:
                return answer
            self.tally.busy_retries += 1
            if deadline is not None and time.monotonic() > deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BUSY_BACKOFF_MAX_S)

    def settle(self, terminal: Terminal, request: Request, answer: Answer | None, cycle: Cycle) -> None:
        """As the crash harness; a newly answered request joins the sample
        that is re-sent after each reconnection (its answer must not change)."""
        new = answer is not None and request.answer is None
        super().settle(terminal, request, answer, cycle)
        if new:
            terminal.verified.append(request)
            if len(terminal.verified) > RESEND_SAMPLE_MAX:
                del terminal.verified[: len(terminal.verified) - RESEND_SAMPLE_MAX]

    async def terminal(self, terminal: Terminal, port: int, phase: Cycle, stop: asyncio.Event) -> None:
        """One terminal: connect, resolve unknowns, send load until ``stop``;
        reconnect whenever the connection breaks. After ``stop``, resolve
        every unknown, re-send a sample, and return."""
        pause = RECONNECT_PAUSE_MIN_S
        final_deadline: float | None = None
        while True:
            if stop.is_set() and final_deadline is None:
                final_deadline = time.monotonic() + FINAL_RESOLVE_S
            if final_deadline is not None and time.monotonic() > final_deadline:
                return
            try:
                client = await TerminalClient.connect(
                    "127.0.0.1", port, terminal_id=terminal.terminal_id, key=terminal.key, timeout=CONNECT_TIMEOUT_S
                )
            except Exception as error:  # noqa: BLE001 - a handshake cut anywhere is a network fault
                self.network.connect_failures += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_PAUSE_MAX_S)
                if final_deadline is not None and time.monotonic() > final_deadline:
                    self.network.failure_logs.append(f"terminal {terminal.terminal_id}: {error!r}")
                continue
            self.network.connects += 1
            pause = RECONNECT_PAUSE_MIN_S
            try:
                done = await self.session(terminal, client, phase, stop, final_deadline)
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            if done:
                return
            self.network.connections_lost += 1

    async def session(
        self, terminal: Terminal, client: TerminalClient, phase: Cycle, stop: asyncio.Event, deadline: float | None
    ) -> bool:
        """One connection's work; True when the terminal is finished."""
        unknowns = list(terminal.unknown.values())
        answers = await asyncio.gather(*(self.until_final(client, request, deadline) for request in unknowns))
        for request, answer in zip(unknowns, answers, strict=True):
            self.settle(terminal, request, answer, phase)
        if terminal.unknown:
            return False
        if terminal.verified:
            sample = [terminal.rng.choice(terminal.verified) for _ in range(RESENDS_PER_TERMINAL)]
            answers = await asyncio.gather(*(self.until_final(client, request, deadline) for request in sample))
            for request, answer in zip(sample, answers, strict=True):
                if answer is not None:
                    self.settle(terminal, request, answer, phase)
        if stop.is_set():
            return not terminal.unknown
        lanes = KIOSK_PIPELINE if terminal.is_kiosk else self.args.pipeline
        await asyncio.gather(*(self.load_lane(terminal, client, phase, stop) for _ in range(lanes)))
        return False

    async def load_lane(self, terminal: Terminal, client: TerminalClient, phase: Cycle, stop: asyncio.Event) -> None:
        while not stop.is_set():
            request = self.new_request(terminal, phase.number)
            answer = await self.until_final(client, request)
            self.settle(terminal, request, answer, phase)
            if answer is None:
                # Break the connection for the other lanes too: everything
                # unknown is re-sent on the next one, before new load.
                with contextlib.suppress(Exception):
                    await client.close()
                return
        # The load stopped: end the connection so the terminal starts its final round.
        with contextlib.suppress(Exception):
            await client.close()


# --- the engine, through the database proxy ------------------------------------------------------


def through_proxy(dsn: str, port: int) -> str:
    """``dsn`` with its host and port replaced by the proxy's.

    >>> through_proxy("postgresql://postgres@127.0.0.1:5432/citycard", 6000)
    'postgresql://postgres@127.0.0.1:6000/citycard'
    """
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def start_engine(dsn: str, data_dir: Path, log_path: Path, metrics_port: int) -> EngineRun:
    """``citycard serve`` with metrics on (``benchmarks.crash.start_engine``
    starts it with metrics off); waits for its banner."""
    last_tail = ""
    for _ in range(ENGINE_START_ATTEMPTS):
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "engine.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            "--admin",
            "off",
            "--dsn",
            dsn,
            "--data-dir",
            str(data_dir),
        ]
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=REPOSITORY_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=dict(os.environ),
            )
        run = EngineRun(process, port, log_path)
        assert process.stdout is not None
        try:
            banner = await asyncio.wait_for(process.stdout.readline(), ENGINE_START_TIMEOUT_S)
        except TimeoutError:
            banner = b""
        if b'"listening"' in banner:
            return run
        run.kill()
        await process.wait()
        last_tail = run.log_tail()
        if "already in use" not in last_tail:
            break
        metrics_port = free_port()
    raise HarnessError(f"the engine did not start:\n{last_tail}")


async def writer_metrics(metrics_port: int) -> dict[str, float]:
    """The writer's counters from the engine's Prometheus endpoint."""
    import urllib.request

    def scrape() -> str:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as response:
            return str(response.read().decode("utf-8"))

    text = await asyncio.to_thread(scrape)
    failed = 0.0
    for line in text.splitlines():
        if line.startswith('citycard_batches_total{outcome="failed"}'):
            failed = float(line.split()[-1])
    return {
        "batches_failed": failed,
        "batches": metric_sum(text, "citycard_batches_total"),
        "writer_connections_opened": metric_sum(text, "citycard_writer_connections_opened_total"),
    }


def read_tail(log_path: Path) -> str:
    try:
        return log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""


def count_log_lines(log_path: Path, needle: str) -> int:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return len(re.findall(re.escape(needle), text))


# --- the run ---------------------------------------------------------------------------------------


async def run_harness(args: argparse.Namespace, dsn: str, data_dir: Path) -> dict[str, object]:
    settings = argparse.Namespace(
        seed=args.seed, terminals=args.terminals, pipeline=args.pipeline, unsafe=False, cycles=1
    )
    harness = NetworkHarness(settings, dsn, data_dir)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": CHECKER_APPLICATION_NAME})
    try:
        await create_city(conn, harness.cards, args.terminals)
        postgres_version = str(await conn.fetchval("SHOW server_version"))
        database = urlsplit(dsn)
        assert database.port is not None
        started = time.perf_counter()
        async with FaultyProxy(database.hostname or "127.0.0.1", database.port) as database_proxy:
            metrics_port = free_port()
            engine = await start_engine(
                through_proxy(dsn, database_proxy.port), data_dir, harness.log_path, metrics_port
            )
            try:
                async with FaultyProxy("127.0.0.1", engine.port) as terminal_proxy:
                    figures = await run_load(args, harness, engine, terminal_proxy, database_proxy)
                    try:
                        figures["writer"] = await writer_metrics(metrics_port)
                    except OSError as error:
                        figures["writer"] = {"error": repr(error)}
            finally:
                code = await stop_engine(engine)
            if code != 0:
                harness.network.engine_failures += 1
                harness.network.failure_logs.append(f"engine stop: exit code {code}\n{engine.log_tail()}")
        seconds = time.perf_counter() - started
        await wait_for_orphan_sessions(conn)
        audit = await audit_database(conn, harness)
    finally:
        await conn.close()
    return build_report(args, harness, figures, audit, seconds, postgres_version)


async def run_load(
    args: argparse.Namespace,
    harness: NetworkHarness,
    engine: EngineRun,
    terminal_proxy: FaultyProxy,
    database_proxy: FaultyProxy,
) -> dict[str, object]:
    phase = Cycle(harness, 1, engine, None)
    stop = asyncio.Event()
    terminals = [asyncio.create_task(harness.terminal(t, terminal_proxy.port, phase, stop)) for t in harness.terminals]
    long_stalls = [CONNECT_GIVE_UP_STALL_S] + ([COMMAND_GIVE_UP_STALL_S] if args.long_stalls else [])
    load_started = time.perf_counter()
    await asyncio.gather(
        terminal_proxy.chaos(random.Random(f"{args.seed}-terminal-side"), args.seconds),
        database_proxy.chaos(
            random.Random(f"{args.seed}-database-side"),
            args.seconds,
            long_stalls_s=long_stalls,
            long_stall_share=LONG_STALL_SHARE,
        ),
    )
    load_seconds = time.perf_counter() - load_started
    stop.set()
    resolve_started = time.perf_counter()
    await asyncio.gather(*terminals)
    if engine.process.returncode is not None:
        harness.network.engine_failures += 1
        harness.network.failure_logs.append(f"engine exited with {engine.process.returncode}\n{engine.log_tail()}")
    return {
        "load_seconds": round(load_seconds, 1),
        "resolve_seconds": round(time.perf_counter() - resolve_started, 1),
        "faults": {"terminal_side": dict(terminal_proxy.faults), "database_side": dict(database_proxy.faults)},
        "proxied_connections": {
            "terminal_side": terminal_proxy.connections_total,
            "database_side": database_proxy.connections_total,
        },
    }


def passed(report: dict[str, object]) -> bool:
    zeros = (
        "lost",
        "duplicated",
        "below_floor",
        "unresolved",
        "mismatched_retries",
        "declines_lost",
        "accounts_off_ledger",
        "phantom",
        "batch_rows_off",
        "unexpected_results",
        "engine_failures",
    )
    return report["conserved"] is True and all(report[name] == 0 for name in zeros)


def build_report(
    args: argparse.Namespace,
    harness: NetworkHarness,
    figures: dict[str, object],
    audit: dict[str, object],
    seconds: float,
    postgres_version: str,
) -> dict[str, object]:
    tally = harness.tally
    network = harness.network
    writer = figures.pop("writer")
    resolutions = count_log_lines(harness.log_path, RESOLVING_LINE)
    report: dict[str, object] = {"benchmark": "network_faults", "seconds": args.seconds}
    report.update(
        {
            "requests": tally.requests,
            **audit,
            "approved": tally.approved,
            "declined": tally.declined,
            "unknown": tally.unknown,
            "resolved": tally.resolved,
            "resends": tally.resends,
            "busy_retries": tally.busy_retries,
            "unexpected_results": tally.unexpected_results,
            "engine_failures": network.engine_failures,
            "results": dict(tally.results),
            "first_loss": tally.first_loss,
            **figures,
            "writer_resolutions": resolutions,
            "writer_resolved_committed": count_log_lines(harness.log_path, COMMITTED_BEFORE_FAILURE_LINE),
            "writer": writer,
            "terminal_connections": {
                "opened": network.connects,
                "lost": network.connections_lost,
                "connect_failures": network.connect_failures,
                "request_timeouts": network.request_timeouts,
            },
            "wall_seconds": round(seconds, 1),
        }
    )
    failure_logs = tally.failure_logs + network.failure_logs
    if failure_logs or not passed(report):
        report["failure_logs"] = failure_logs[:5]
        report["engine_log_tail"] = read_tail(harness.log_path)
    report["passed"] = passed(report)
    report["versions"] = describe_versions(postgres_version)
    report["settings"] = {
        "seconds": args.seconds,
        "seed": args.seed,
        "terminals": args.terminals,
        "kiosks": 1,
        "pipeline": args.pipeline,
        "long_stalls": args.long_stalls,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "faults": "per proxy, every 0.2-1.5 s: 40% reset (RST both ways), 35% stall (50 ms-2 s), 25% a fragment"
        " spell (1-16 byte pieces, up to 1 ms apart); on the database side a fifth of the stalls are a reset"
        f" then {CONNECT_GIVE_UP_STALL_S:.0f} s of silence"
        + (f" or {COMMAND_GIVE_UP_STALL_S:.0f} s" if args.long_stalls else ""),
        "database": "external (--dsn)" if args.dsn else "embedded PostgreSQL in a temporary directory",
        "engine": "citycard serve subprocess, DSN through the database proxy, metrics on, --log-level WARNING",
    }
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.network_faults", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="how long faults are injected")
    parser.add_argument("--terminals", type=int, default=DEFAULT_TERMINALS, help="bus validators (plus one kiosk)")
    parser.add_argument("--pipeline", type=int, default=DEFAULT_PIPELINE, help="requests in flight per terminal")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the city, the load and the faults")
    parser.add_argument("--dsn", help="an empty database to use instead of an embedded server in a temporary directory")
    parser.add_argument("--data-dir", type=Path, help="data directory (master key, engine log, embedded server); kept")
    parser.add_argument(
        "--long-stalls",
        action="store_true",
        help=f"also stall the database side past the commit timeout ({COMMAND_GIVE_UP_STALL_S:.0f} s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.terminals < 1 or args.pipeline < 1:
        parser.error("--seconds must be positive, --terminals and --pipeline at least 1")
    return run_in_data_dir(args, "network_faults", run_harness, print_summary)


def print_summary(report: dict[str, object]) -> None:
    print(
        f"{report['seconds']} s of faults {report['faults']}: {report['requests']:,} requests,"
        f" {report['acknowledged']:,} acknowledged, writer resolutions {report['writer_resolutions']}"
    )
    print(
        f"lost {report['lost']}, duplicated {report['duplicated']}, below floor {report['below_floor']},"
        f" conserved {report['conserved']}, unresolved {report['unresolved']},"
        f" mismatched retries {report['mismatched_retries']}"
    )
    print("PASSED" if report["passed"] else f"FAILED: {report.get('first_loss')} {report.get('failure_logs')}")


if __name__ == "__main__":
    raise SystemExit(main())
