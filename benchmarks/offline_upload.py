"""Offline uploads under online load: a validator's day of taps decided
offline, uploaded twice, while other terminals tap online.

    python -m benchmarks.offline_upload --json
    python -m benchmarks.offline_upload --taps 20000 --rate 500 --json

What it does (docs/offline.md):

1. Sets up a database and a seeded city as ``benchmarks.end_to_end`` does
   (the embedded PostgreSQL in a temporary directory, fsync and
   synchronous_commit on, or ``--dsn``), and runs ``citycard serve`` as a
   subprocess with its metrics on.
2. The offline validator (one bus validator of the city, apart from the
   online ones) connects, takes the hot list (every page signature-checked)
   and its service's rules, and "goes offline": it decides ``--taps`` taps
   alone, as docs/offline.md describes a terminal doing, over half of the
   city's cards plus some that are on the hot list (refused), each at its
   profile's fare of the rules it holds, with event times spread over the
   last hours and counters above any the database holds.
3. Online load starts on ``--connections`` other validators: an open loop
   at ``--rate`` taps a second (scheduled times, no coordinated omission,
   as in ``benchmarks.end_to_end``) over the other half of the cards.
4. After ``--warmup`` seconds (unmeasured) and ``--baseline`` seconds of
   online load alone (``online_without_uploads``: the reference), the
   validator uploads every tap in OFFLINE_UPLOAD frames of 256,
   ``--window`` frames in flight, waiting for each OFFLINE_RESULT; then
   uploads all of them again (the duplicates). The online load runs
   throughout and stops when the second pass ends.

Figures (one run):

- ``uploaded``: distinct taps uploaded (each twice); ``applied``: taps of the
  offline validator the database holds afterwards; ``duplicates_applied``:
  taps the engine decided anew in the second pass (its
  ``citycard_offline_taps_total`` outcomes agreed + differs + uncollected,
  second pass minus first), which must be 0, and the second pass's answers
  must equal the first's (``second_pass_identical``); the money the
  database holds for the validator's taps is checked against the first
  pass's answers (``charged_cents_match``).
- ``online_p99_ms``: the 99th percentile latency, from scheduled time to
  reply, of the online taps scheduled while the uploads ran (both passes),
  against the online objective (``online_objective_ms``, 10 ms). As in
  ``benchmarks.end_to_end``, the host-stall probe (``benchmarks.host_stalls``)
  runs meanwhile, and ``online_clear_of_host_stalls`` gives the same figure
  for the taps whose life touched no window in which the host took the
  CPUs away (docs/performance.md, "The latency tail"); the report gives the
  probe's findings beside it.
- Per pass: seconds and taps a second; the engine's batches in the upload
  window (mean size, mean commit time); CPU of engine, generator and
  PostgreSQL; machine and versions.

The load generator and the uploader share this process (one event loop,
uvloop): ``cpu_percent.load_generator`` shows what it took.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import asyncpg
import uvloop

from benchmarks.common import (
    EngineProcess,
    describe_machine,
    describe_versions,
    latency_summary,
    new_latency_histogram,
    print_json,
    serve_engine,
)
from benchmarks.end_to_end import (
    OPEN_LOOP_TICK_S,
    SEED,
    CardCycle,
    City,
    LoadConnection,
    Phase,
    Resources,
    Terminal,
    clear_of_stalls,
    close_sessions,
    open_sessions,
    prepare_city,
    usage,
)
from benchmarks.host_stalls import ProbeProcess
from engine.client import HotlistCopy, ServiceRules, TerminalClient
from engine.codes import ResultCode
from engine.db import connect, resolve_database
from engine.keys import load_master_key
from engine.limits import OFFLINE_TAPS_PER_UPLOAD_MAX
from engine.signing import ListSigner

DEFAULT_TAPS = 100_000
DEFAULT_RATE = 1000.0
DEFAULT_CONNECTIONS = 16
DEFAULT_CARDS = 20_000
DEFAULT_WARMUP_S = 1.0
# Online load alone, measured before the uploads start: the reference the
# figures during the uploads are read against.
DEFAULT_BASELINE_S = 3.0
# Upload frames in flight: a validator sends the next while the engine
# decides and commits the previous ones.
DEFAULT_WINDOW = 4

# The latency objective of an online tap (docs/performance.md).
ONLINE_OBJECTIVE_MS = 10.0

# Cards on the hot list among the offline taps: the validator refuses them.
LISTED_CARDS_MAX = 500
LISTED_SHARE_PERMILLE = 10

# Offline taps are spread over this many hours before the upload.
OFFLINE_HOURS = 6

# An upload pass longer than this is a stuck engine.
UPLOAD_TIMEOUT_S = 600.0

OUTCOMES_DECIDED = ("agreed", "differs", "uncollected")

# The host-stall probe runs from the baseline to the end of the uploads,
# whose length is not known in advance: it is stopped then, at most this.
PROBE_SECONDS_MAX = 3600.0

# The validator's process ends within this once it has reported.
VALIDATOR_JOIN_TIMEOUT_S = 30.0

OfflineTap = tuple[int, int, int, int, int, int, int, int]


@dataclass
class OfflineCard:
    uid: int
    profile: int


def decide_alone(
    cards: list[OfflineCard], hotlist: HotlistCopy, rules: ServiceRules, count: int, first_seq: int, first_counter: int
) -> list[OfflineTap]:
    """The validator's day offline: refuse a listed card, charge the others
    their profile's fare (refuse a profile the service does not serve)."""
    rng = random.Random(SEED)
    now_ms = time.time_ns() // 1_000_000
    start_ms = now_ms - OFFLINE_HOURS * 3_600_000
    step_ms = max(1, (now_ms - 60_000 - start_ms) // count)
    counters: dict[int, int] = {}
    taps: list[OfflineTap] = []
    for number in range(count):
        card = cards[rng.randrange(len(cards))]
        counter = counters.get(card.uid, first_counter)
        counters[card.uid] = counter + 1
        fare = rules.fare(card.profile)
        if hotlist.refuses(card.uid):
            result, amount = ResultCode.CARD_NOT_ACTIVE, 0
        elif fare is None:
            result, amount = ResultCode.SERVICE_NOT_ALLOWED, 0
        else:
            result, amount = ResultCode.APPROVED, fare
        taps.append(
            (first_seq + number, card.uid, counter, start_ms + number * step_ms, 0, rules.rules_version, result, amount)
        )
    return taps


@dataclass
class ValidatorPlan:
    """What the validator's process needs (pickled to it)."""

    host: str
    port: int
    terminal: Terminal
    public_key: bytes
    cards: list[OfflineCard]
    listed_uids: set[int]
    taps: int
    first_seq: int
    first_counter: int
    window: int


def validator_main(pipe: Connection, plan: ValidatorPlan) -> None:
    """The offline validator's process: see ``validator``."""
    uvloop.run(validator(pipe, plan))


async def validator(pipe: Connection, plan: ValidatorPlan) -> None:
    """Take the lists, decide the taps alone, then upload them twice when
    told to; report each pass's span (perf_counter_ns, the same clock in
    every process) and, at the end, what the answers came to."""
    loop = asyncio.get_running_loop()
    terminal = plan.terminal
    client = await TerminalClient.connect(
        plan.host, plan.port, terminal_id=terminal.id, key=terminal.key, key_version=terminal.key_version
    )
    hotlist = HotlistCopy(plan.public_key)
    pages = await hotlist.refresh(client)
    rules = await client.rules(public_key=plan.public_key)
    await client.close()
    rng = random.Random(SEED)
    cards = [card for card in plan.cards if card.uid not in plan.listed_uids]
    listed = [card for card in plan.cards if card.uid in plan.listed_uids]
    if listed:
        cards += [listed[rng.randrange(len(listed))] for _ in range(len(cards) * LISTED_SHARE_PERMILLE // 1000)]
    taps = decide_alone(cards, hotlist, rules, plan.taps, plan.first_seq, plan.first_counter)
    frames = [
        taps[start : start + OFFLINE_TAPS_PER_UPLOAD_MAX] for start in range(0, len(taps), OFFLINE_TAPS_PER_UPLOAD_MAX)
    ]
    pipe.send(
        ({"pages": pages, "version": hotlist.version, "listed": len(hotlist.listed)}, rules.rules_version, len(taps))
    )
    await loop.run_in_executor(None, pipe.recv)  # the link is back
    client = await TerminalClient.connect(
        plan.host, plan.port, terminal_id=terminal.id, key=terminal.key, key_version=terminal.key_version
    )
    started = time.perf_counter_ns()
    first = await upload_pass(client, frames, plan.window)
    between = time.perf_counter_ns()
    pipe.send((started, between))
    await loop.run_in_executor(None, pipe.recv)
    second = await upload_pass(client, frames, plan.window)
    pipe.send((between, time.perf_counter_ns()))
    await client.close()
    results: dict[str, int] = {}
    for answer in first:
        name = ResultCode(answer[1]).name
        results[name] = results.get(name, 0) + 1
    pipe.send((sum(answer[2] for answer in first), results, first == second))


async def upload_pass(client: TerminalClient, frames: list[list[OfflineTap]], window: int) -> list[tuple[int, ...]]:
    """Upload every frame, ``window`` in flight; the answers in upload order."""
    answers: list[list[tuple[int, ...]]] = [[] for _ in frames]
    slots = asyncio.Semaphore(window)

    async def one(index: int) -> None:
        async with slots:
            results = await client.upload_offline(frames[index])
        answers[index] = [
            (r.terminal_seq, int(r.result), r.amount_cents, r.balance_cents, int(r.info)) for r in results
        ]

    await asyncio.wait_for(asyncio.gather(*(one(index) for index in range(len(frames)))), UPLOAD_TIMEOUT_S)
    return [answer for frame in answers for answer in frame]


def span_latency(spans: list[tuple[int, int]]) -> dict[str, float | int]:
    """Percentiles of (scheduled, replied) spans, in milliseconds."""
    histogram = new_latency_histogram()
    for scheduled_ns, replied_ns in spans:
        histogram.record_value(max((replied_ns - scheduled_ns) // 1000, 1))
    return latency_summary(histogram)


def loop_lag(exposition: str) -> dict[str, float]:
    """The engine's event-loop lag histogram: cumulative count by bucket edge."""
    buckets: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith('citycard_event_loop_lag_seconds_bucket{le="'):
            buckets[line.split('"', 2)[1]] = float(line.rsplit(" ", 1)[1])
    return buckets


def lag_during(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How late the engine's loop ran its 100 ms timer while the uploads ran:
    the share of ticks later than each edge, in percent."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if not total:
        return {}
    return {
        f"over_{float(edge) * 1000:g}_ms_percent": round(100 * (1 - (after[edge] - before.get(edge, 0.0)) / total), 2)
        for edge in after
        if edge != "+Inf" and float(edge) in (0.001, 0.005, 0.01, 0.025, 0.05)
    }


def outcomes(exposition: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith('citycard_offline_taps_total{outcome="'):
            outcome = line.split('"', 2)[1]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


async def online_until(
    connections: list[LoadConnection], rate: float, stop: asyncio.Event, started: asyncio.Event
) -> int:
    """Open loop: one tap every 1/rate seconds, round robin, until ``stop``."""
    interval_ns = int(1e9 / rate)
    due = time.perf_counter_ns()
    scheduled = 0
    started.set()
    while not stop.is_set():
        now = time.perf_counter_ns()
        touched: set[LoadConnection] = set()
        while due <= now:
            connection = connections[scheduled % len(connections)]
            connection.backlog.append(due)
            touched.add(connection)
            due += interval_ns
            scheduled += 1
        for connection in touched:
            connection.pump(now)
        await asyncio.sleep(max((due - time.perf_counter_ns()) / 1e9, OPEN_LOOP_TICK_S))
    return scheduled


async def measure(args: argparse.Namespace, data_dir: Path) -> dict[str, object]:
    master = load_master_key(data_dir)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    with resolve_database(args.dsn, data_dir) as database:
        pgdata = database.embedded.pgdata if database.embedded is not None else None
        city = await prepare_city(database.dsn, args.cards, args.connections + 1, master)
        uploader, online_terminals = city.terminals[-1], city.terminals[:-1]
        random.Random(SEED).shuffle(city.card_uids)
        online_uids, offline_uids = city.card_uids[0::2], city.card_uids[1::2]
        conn = await connect(database.dsn)
        try:
            rows = await conn.fetch(
                "SELECT c.uid, h.profile_id FROM cards c JOIN holders h ON h.id = c.holder_id"
                " WHERE c.uid = ANY($1::int8[]) OR (c.status <> 0 AND c.uid IN"
                " (SELECT uid FROM cards WHERE status <> 0 ORDER BY uid LIMIT $2))",
                offline_uids,
                LISTED_CARDS_MAX,
            )
        finally:
            await conn.close()
        listed_uids = {row[0] for row in rows} - set(offline_uids)
        with serve_engine(database.dsn, data_dir, log_dir=log_dir, name="offline-upload") as engine:
            return await run(
                args,
                Setting(database.dsn, master, engine, pgdata, city),
                uploader,
                online_terminals,
                online_uids,
                [OfflineCard(row[0], row[1]) for row in rows],
                listed_uids,
            )


@dataclass
class Setting:
    """Where the run happens."""

    dsn: str
    master: bytes
    engine: EngineProcess
    pgdata: Path | None
    city: City


async def run(
    args: argparse.Namespace,
    setting: Setting,
    uploader: Terminal,
    online_terminals: list[Terminal],
    online_uids: list[int],
    offline_cards: list[OfflineCard],
    listed_uids: set[int],
) -> dict[str, object]:
    engine, city = setting.engine, setting.city
    # The validator, in a process of its own (its work must not delay the
    # online load generator's clock): its lists, then a day of taps alone.
    first_seq = time.time_ns() // 1000
    context = multiprocessing.get_context("spawn")
    pipe, child_pipe = context.Pipe()
    validator = context.Process(
        target=validator_main,
        args=(
            child_pipe,
            ValidatorPlan(
                host=engine.host,
                port=engine.port,
                terminal=uploader,
                public_key=ListSigner(setting.master).public_key,
                cards=offline_cards,
                listed_uids=listed_uids,
                taps=args.taps,
                first_seq=first_seq,
                first_counter=city.first_counter,
                window=args.window,
            ),
        ),
        name="offline-validator",
    )
    validator.start()
    loop = asyncio.get_running_loop()
    probe: ProbeProcess | None = None
    try:
        ready = await loop.run_in_executor(None, pipe.recv)

        # Online load on the other validators, then the link returns.
        phase = Phase(closed_loop=False)
        phase.record_from_ns, phase.record_until_ns = 0, 1 << 62
        phase.rate_from_ns, phase.rate_until_ns = 0, 1 << 62
        cycle = CardCycle(online_uids, [terminal.id for terminal in online_terminals], city.first_counter)
        seqs = {terminal.id: first_seq for terminal in online_terminals}
        connections = await open_sessions(engine.host, engine.port, online_terminals, seqs, cycle, phase)
        stop, started = asyncio.Event(), asyncio.Event()
        online = asyncio.create_task(online_until(connections, args.rate, stop, started))
        # The probe starts with the warm-up: its own start-up is not in the figures.
        probe = ProbeProcess(PROBE_SECONDS_MAX)
        await started.wait()
        await asyncio.sleep(args.warmup)
        baseline_start = time.perf_counter_ns()
        await asyncio.sleep(args.baseline)
        resources = Resources(engine, setting.pgdata)
        before = resources.sample()
        lag_before = loop_lag(engine.scrape())
        pipe.send("first")
        upload_start, between = await loop.run_in_executor(None, pipe.recv)
        after_first = outcomes(engine.scrape())
        pipe.send("second")
        _, upload_end = await loop.run_in_executor(None, pipe.recv)
        exposition = engine.scrape()
        after_second = outcomes(exposition)
        lag_after = loop_lag(exposition)
        after = resources.sample()
        stop.set()
        scheduled = await online
        probe.stop()
        stalls = await loop.run_in_executor(None, probe.result)
        await close_sessions(connections, seqs, phase)
        passes = await loop.run_in_executor(None, pipe.recv)
    finally:
        if probe is not None:
            probe.kill()
        validator.join(VALIDATOR_JOIN_TIMEOUT_S)
        if validator.is_alive():
            validator.kill()
    hotlist_info, rules_version, taps_count = ready
    first_answers_sum, results, identical = passes
    frames_count = -(-taps_count // OFFLINE_TAPS_PER_UPLOAD_MAX)

    # The record of the validator's taps.
    conn = await connect(setting.dsn)
    try:
        record: asyncpg.Record = await conn.fetchrow(
            "SELECT count(*), coalesce(sum(amount_cents), 0)::int8 FROM taps"
            " WHERE terminal_id = $1 AND terminal_seq BETWEEN $2 AND $3",
            uploader.id,
            first_seq,
            first_seq + taps_count - 1,
        )
    finally:
        await conn.close()
    applied, charged = int(record[0]), int(record[1])

    spans = [(start, end) for start, end in phase.spans if upload_start <= start <= upload_end]
    online_taps = len(spans)
    latency = span_latency(spans)
    clear = clear_of_stalls(spans, stalls)
    baseline_spans = [(start, end) for start, end in phase.spans if baseline_start <= start < upload_start]
    baseline = span_latency(baseline_spans)
    baseline_clear = clear_of_stalls(baseline_spans, stalls)
    by_pass = {
        "first_pass": span_latency([(start, end) for start, end in spans if start < between]),
        "second_pass": span_latency([(start, end) for start, end in spans if start >= between]),
    }
    decided = [sum(counts.get(name, 0.0) for name in OUTCOMES_DECIDED) for counts in (after_first, after_second)]
    first_s = (between - upload_start) / 1e9
    second_s = (upload_end - between) / 1e9
    online_errors = (
        sum(phase.results[ResultCode.BUSY_RETRY :])
        + sum(phase.error_frames.values())
        + phase.unanswered
        + phase.unexpected_replies
    )
    return {
        "benchmark": "offline_upload",
        "uploaded": taps_count,
        "uploads": 2,
        "frames_per_pass": frames_count,
        "applied": int(applied),
        "duplicates_applied": int(decided[1] - decided[0]) + max(0, int(applied) - taps_count),
        "second_pass_identical": identical,
        "charged_cents": int(charged),
        "charged_cents_match": int(charged) == first_answers_sum,
        "online_p99_ms": latency["p99_ms"],
        "online_objective_ms": ONLINE_OBJECTIVE_MS,
        "online_within_objective": latency["p99_ms"] <= ONLINE_OBJECTIVE_MS,
        "online_during_upload": {**latency, "taps": online_taps, "rate": args.rate, **by_pass},
        "online_without_uploads": {
            **baseline,
            "seconds": args.baseline,
            "clear_of_host_stalls_p99_ms": baseline_clear["clear_of_host_stalls_p99_ms"],
        },
        "engine_loop_lag_during_upload": lag_during(lag_before, lag_after),
        "online_clear_of_host_stalls": {
            "p50_ms": clear["clear_of_host_stalls_p50_ms"],
            "p99_ms": clear["clear_of_host_stalls_p99_ms"],
            "percent_of_taps": clear["clear_of_host_stalls_percent"],
            "within_objective": isinstance(clear["clear_of_host_stalls_p99_ms"], float)
            and clear["clear_of_host_stalls_p99_ms"] <= ONLINE_OBJECTIVE_MS,
        },
        "host_stalls": clear["host_stalls"],
        "online_scheduled": scheduled,
        "online_errors": online_errors,
        "first_pass": {
            "seconds": round(first_s, 3),
            "taps_per_s": round(taps_count / first_s, 1),
            "results": results,
            "outcomes": after_first,
        },
        "second_pass": {
            "seconds": round(second_s, 3),
            "taps_per_s": round(taps_count / second_s, 1),
            "outcomes": after_second,
        },
        "hotlist": hotlist_info,
        "rules_version": rules_version,
        **usage(before, after),
        "how": (
            f"{taps_count} taps decided offline by terminal {uploader.id} from its signed lists, uploaded in"
            f" {frames_count} OFFLINE_UPLOAD frames ({args.window} in flight), twice, by a process of its own,"
            f" while {len(online_terminals)} other validators tapped online in an open loop at {args.rate:g}/s;"
            " online_p99_ms is scheduled time to reply of the online taps scheduled during the two passes"
        ),
        "settings": {
            "taps": args.taps,
            "rate": args.rate,
            "connections": args.connections,
            "cards": city.cards_in_city,
            "window": args.window,
            "warmup_s": args.warmup,
            "baseline_s": args.baseline,
            "postgres": city.postgres_settings,
        },
        "versions": describe_versions(city.postgres_version),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.offline_upload", description=__doc__.split("\n")[0])
    parser.add_argument("--taps", type=int, default=DEFAULT_TAPS, help="offline taps to upload (each twice)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="online taps a second meanwhile")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, help="online terminal sessions")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="upload frames in flight")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="online seconds, unmeasured, first")
    parser.add_argument(
        "--baseline", type=float, default=DEFAULT_BASELINE_S, help="online seconds measured alone before uploading"
    )
    parser.add_argument("--cards", type=int, default=DEFAULT_CARDS, help="cards to seed (an existing city is reused)")
    parser.add_argument("--dsn", help="use this database instead of an embedded server in a temporary directory")
    parser.add_argument("--data-dir", type=Path, help="data directory (master key, embedded server); kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.taps < 1 or args.rate <= 0 or args.connections < 1 or args.window < 1:
        parser.error("--taps, --rate, --connections and --window must be positive")
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="citycard-bench-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    try:
        report = uvloop.run(measure(args, data_dir))
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["machine"] = machine
    if args.json:
        print_json(report)
    else:
        for key in ("uploaded", "applied", "duplicates_applied", "online_p99_ms", "second_pass_identical"):
            print(f"{key}: {report[key]}")
    return 0 if report["duplicates_applied"] == 0 and report["second_pass_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
