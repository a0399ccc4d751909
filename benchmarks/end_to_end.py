"""End to end: terminals over TCP -> engine -> PostgreSQL, with durable answers.

    python -m benchmarks.end_to_end --seconds 10 --json
    python -m benchmarks.end_to_end --seconds 10 --rate 2000 --json
    python -m benchmarks.end_to_end --seconds 2 --dsn postgresql://... --cards 500 --json

What it does:

1. Sets up a database: the embedded PostgreSQL in a temporary data directory
   (``engine.db.resolve_database``; fsync and synchronous_commit on, as in
   production), or ``--dsn``. Migrates it and seeds a city of ``--cards``
   cards unless it already holds one. Nothing is topped up: taps on cards
   whose balance runs out are declined INSUFFICIENT_FUNDS, a decision that is
   committed durably like an approval, so both count as taps; the report
   gives approved and declined separately.
2. Open loop on the batched engine, first, when ``--rate`` is given (after
   the closed loop it would also measure PostgreSQL writing back the rows the
   closed loop just committed): taps are scheduled
   at fixed intervals (1/rate, round robin over the connections) and sent at
   their scheduled time whatever the replies do; latency is measured from the
   scheduled time, so queueing in the engine and in this generator counts
   (no coordinated omission). A connection never has more than the
   protocol's 256 requests unanswered: beyond that taps wait here, and that
   wait is part of their latency.
3. Closed loop on the batched engine: ``citycard serve`` runs as a
   subprocess on that database; this process opens ``--connections``
   authenticated sessions (each a different bus validator; keys derived from
   the master key in the shared data directory) and keeps ``--pipeline``
   taps in flight on each, sending a new tap for every reply. After
   ``--warmup`` seconds, replies are counted for ``--seconds``: ``taps_per_s``
   is replies received per second (every result code counts; errors are
   reported separately), latency is send -> reply of the replies received in
   the window. The seeded city's rules are in force (``rules/gijon.toml``,
   stored by the seed as version 1): the bus validators' taps pay a fare,
   and a card's later taps within 45 minutes are free transfers.
4. With ``--rules-cost``, on the same engine right after: a rules version
   with the same services and fares and every policy off
   (``rules_without_policies``: no transfer, caps, products, passback,
   minimum or tolerated balance, ID sampling, renewal warning or clone
   blocking) is stored with ``engine.rules.store_rules``; the engine puts it
   in force through LISTEN/NOTIFY, which the benchmark waits for by tapping
   until a tap's record shows the new ``taps.rules_version``. The closed loop
   runs again (``rules_off_taps_per_s``; ``rules_cost_percent = 100 * (1 -
   taps_per_s / rules_off_taps_per_s)``, and the same for the engine's CPU
   per tap), then the city's rules are stored again as a further version
   and waited for, so every later phase runs under them. The two loops do
   not write the same things: every card taps again within seconds, so
   under the city's rules nearly every tap after a card's first is a free
   transfer (no ledger entry, no balance to update), while with every
   policy off each pays and cards run dry (INSUFFICIENT_FUNDS). The figure
   is what the rules do to the whole engine on this load; what deciding
   them costs per tap is ``benchmarks.fastpath``'s.
5. The closed loop again against the engine started with ``--naive`` (one
   commit per tap), for ``--naive-seconds`` (default: ``--seconds``):
   ``ratio = taps_per_s / naive_taps_per_s``.

Every phase reports its replies by result code (``results``) and by info
bit (``info``: TRANSFER, CAPPED, ...), so a reader sees which rules fired.

``batch_size_mean`` is read from the engine's Prometheus endpoint
(``citycard_batch_size_sum / citycard_batch_size_count`` over the window).
``cpu_percent`` gives the CPU used in the window by the engine, this load
generator and PostgreSQL (embedded server only), in percent of one core: on
a 2-core machine they share 200%.

Terminal sequences start at microseconds since the epoch and increase by one
per tap, so a rerun on the same database never reuses a sequence. Cards
present a counter, as city cards do, so the engine's clone check runs on
every tap: each card counts up from above the highest counter the
database holds, one a tap, and always taps through the same session (the
cards are dealt to the sessions, ``CardCycle``), whose frames the engine
decides in order, so no tap of the benchmark is ever a suspected clone.

One load-generating process, decided by measurement (docs/performance.md):
on the 2-core development machine the generator uses 2-10% of a core, the
engine 15-25%, PostgreSQL 40-70%, and the engine's writer is committing 90%
of the time: the commit statement is the bottleneck, not this process, and a
second generator would only take CPU from the engine and the database.
``cpu_percent`` and ``writer_busy_percent`` in every report let a reader
check this on their machine; revisit if the generator nears 100%.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import asyncpg
import msgspec
import uvloop

from benchmarks.common import (
    EngineProcess,
    describe_machine,
    describe_versions,
    latency_summary,
    metric_sum,
    new_latency_histogram,
    postgres_pids,
    print_json,
    process_cpu_seconds,
    record_latencies_us,
    serve_engine,
)
from benchmarks.host_stalls import ProbeProcess, Stalls
from benchmarks.plot import RESULTS_DIR, write_latency_curve
from engine import fastpath
from engine.codes import ErrorCode, MessageType, ResultCode, TapInfo, TerminalKind
from engine.db import connect, resolve_database
from engine.keys import derive_terminal_key, load_master_key
from engine.limits import MAX_IN_FLIGHT_PER_CONNECTION, NONCE_BYTES
from engine.migrate import migrate
from engine.rules import NAME_LENGTH_MAX, Rules, current_rules, store_rules
from engine.seal import Opener, Sealer, derive_session_keys
from engine.seed import list_terminals, sample_cards, seed_city

DEFAULT_SECONDS = 10.0
DEFAULT_WARMUP_S = 1.0
DEFAULT_CONNECTIONS = 32
DEFAULT_PIPELINE = 64
DEFAULT_CARDS = 20_000
SEED = 2026

# The bus takes three quarters of the city's taps, and it has 240
# validators: the benchmark drives bus validators first, then other gates.
PREFERRED_SERVICE = "bus"

# After the window ends, replies still due are awaited this long; what is
# still unanswered then counts as errors. A full writer queue (16,384
# decisions) commits in well under a second on any machine.
DRAIN_TIMEOUT_S = 30.0

# Opening every session (TCP + HELLO/CHALLENGE/AUTH) within this.
CONNECT_TIMEOUT_S = 10.0

# The open loop's timer: uvloop's timers have 1 ms resolution, so taps due
# within the same millisecond go out in one write. Their lateness is
# measured (latency runs from the scheduled time), not hidden.
OPEN_LOOP_TICK_S = 0.001

_TAP_RESULT = MessageType.TAP_RESULT
_ERROR = MessageType.ERROR
_CHALLENGE = MessageType.CHALLENGE
_AUTH_OK = MessageType.AUTH_OK

# Result byte of a TAP_RESULT body: after the 8-byte terminal_seq; the info
# bits (u16, big-endian) end it (docs/protocol.md).
_RESULT_OFFSET = 8
_INFO_OFFSET = 21
_FINAL_DECLINE_MIN = 16
_NOT_A_DECISION_MIN = ResultCode.BUSY_RETRY


# --- the load generator -------------------------------------------------------------------


@dataclass
class Phase:
    """What one phase counts. Replies received in ``[record_from_ns, record_until_ns)``
    are recorded (latency, result); those in ``[rate_from_ns, rate_until_ns)``
    make the throughput."""

    closed_loop: bool
    pipeline: int = 0
    record_from_ns: int = 0
    record_until_ns: int = 0
    rate_from_ns: int = 0
    rate_until_ns: int = 0
    # Closed loop: no new taps once this passes.
    send_until_ns: int = 0
    replies_in_rate_window: int = 0
    results: list[int] = field(default_factory=lambda: [0] * 256)
    infos: dict[int, int] = field(default_factory=dict)  # info bits -> replies
    latency_us: dict[int, int] = field(default_factory=dict)
    # Open loop: from the actual send, to show how much is the generator's lateness.
    latency_from_send_us: dict[int, int] = field(default_factory=dict)
    # Open loop: (scheduled_ns, replied_ns) of every recorded tap, to set
    # each against the host's stall windows (benchmarks.host_stalls).
    spans: list[tuple[int, int]] = field(default_factory=list)
    sent: int = 0
    error_frames: collections.Counter[str] = field(default_factory=collections.Counter)
    connections_lost: int = 0
    unanswered: int = 0
    unexpected_replies: int = 0


class CardLane:
    """One terminal's cards in a fixed random order, round and round, with
    the counter each card presents next (one higher at every tap)."""

    def __init__(self, uids: Sequence[int], first_counter: int) -> None:
        self.uids = list(uids)
        self.counters = [first_counter] * len(self.uids)
        self.index = 0


class CardCycle:
    """Every usable card, dealt to the terminals: each card taps through one
    terminal only. The engine decides a session's frames in the order they
    arrive, so a card's counters reach it in increasing order whatever the
    other sessions do: no tap of the benchmark can look like a clone."""

    def __init__(self, uids: Sequence[int], terminal_ids: Sequence[int], first_counter: int) -> None:
        if len(uids) < len(terminal_ids):
            raise ValueError(f"{len(uids)} usable cards cannot be dealt to {len(terminal_ids)} terminals")
        lanes = len(terminal_ids)
        self.lanes = {
            terminal_id: CardLane(uids[number::lanes], first_counter) for number, terminal_id in enumerate(terminal_ids)
        }

    def lane(self, terminal_id: int) -> CardLane:
        return self.lanes[terminal_id]


class LoadConnection(asyncio.Protocol):
    """One terminal session of the load generator: handshake, then taps."""

    def __init__(
        self,
        terminal_id: int,
        key: bytes,
        key_version: int,
        first_seq: int,
        cards: CardLane,
        phase: Phase,
    ) -> None:
        self.terminal_id = terminal_id
        self.key = key
        self.key_version = key_version
        self.next_seq = first_seq
        self.cards = cards
        self.phase = phase
        self.reader = fastpath.FrameReader()
        self.transport: asyncio.Transport | None = None
        self.next_request_id = 1
        # request id -> (reference ns, sent ns); the reference is the
        # scheduled time in the open loop, the send time in the closed loop.
        self.waiting: dict[int, tuple[int, int]] = {}
        self.backlog: collections.deque[int] = collections.deque()
        self.client_nonce = os.urandom(NONCE_BYTES)
        self.server_nonce = b""
        # Every frame after the handshake is sealed both ways, as a terminal's are.
        self.opener: Opener | None = None
        self.receiving_sealed = False
        self.sealer: Sealer | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(fastpath.encode_hello(0, self.terminal_id, self.key_version, self.client_nonce))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiting or self.backlog:
            self.phase.connections_lost += 1
            self.phase.unanswered += len(self.waiting) + len(self.backlog)
            self.waiting.clear()
            self.backlog.clear()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"terminal {self.terminal_id}: connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        phase = self.phase
        waiting = self.waiting
        replies = 0
        recording = phase.record_from_ns <= now < phase.record_until_ns
        results = phase.results
        infos = phase.infos
        latency_us = phase.latency_us
        opener = self.opener
        for msg_type, request_id, body in self.reader.feed(data):
            if self.receiving_sealed:
                try:
                    body = opener.open(msg_type, request_id, body)  # type: ignore[union-attr]
                except fastpath.ProtocolError as error:
                    phase.error_frames[f"engine frame failed its seal: {error}"] += 1
                    if self.transport is not None:
                        self.transport.close()
                    return
            if msg_type == _TAP_RESULT:
                times = waiting.pop(request_id, None)
                if times is None:
                    phase.unexpected_replies += 1
                    continue
                replies += 1
                if recording:
                    results[body[_RESULT_OFFSET]] += 1
                    info = body[_INFO_OFFSET] << 8 | body[_INFO_OFFSET + 1]
                    infos[info] = infos.get(info, 0) + 1
                    latency = (now - times[0]) // 1000
                    latency_us[latency] = latency_us.get(latency, 0) + 1
                    if not phase.closed_loop:
                        from_send = phase.latency_from_send_us
                        latency = (now - times[1]) // 1000
                        from_send[latency] = from_send.get(latency, 0) + 1
                        phase.spans.append((times[0], now))
            elif msg_type == _ERROR:
                code, text = fastpath.decode_error(body)
                try:
                    name = ErrorCode(code).name
                except ValueError:
                    name = f"code {code}"
                phase.error_frames[name] += 1
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"terminal {self.terminal_id}: {name}: {text}"))
            elif msg_type == _CHALLENGE:
                self._on_challenge(body)
                opener = self.opener
            elif msg_type == _AUTH_OK:
                self._on_auth_ok(body)
                self.receiving_sealed = True
        if self.reader.error is not None:
            phase.error_frames[f"bad frame from engine: {self.reader.error}"] += 1
            if self.transport is not None:
                self.transport.close()
            return
        if replies and phase.rate_from_ns <= now < phase.rate_until_ns:
            phase.replies_in_rate_window += replies
        if phase.closed_loop:
            if replies and now < phase.send_until_ns:
                self.send_taps(replies, now)
        elif self.backlog:
            self.pump(now)

    # --- handshake -------------------------------------------------------------------

    def _on_challenge(self, body: bytes) -> None:
        assert self.transport is not None
        self.server_nonce = fastpath.decode_challenge(body)
        proof = fastpath.terminal_proof(
            self.key, self.terminal_id, self.key_version, self.client_nonce, self.server_nonce
        )
        keys = derive_session_keys(self.key, self.terminal_id, self.key_version, self.client_nonce, self.server_nonce)
        self.opener = Opener(keys.engine_to_terminal)
        self.sealer = Sealer(keys.terminal_to_engine)
        self.transport.write(fastpath.encode_auth(0, proof))

    def _on_auth_ok(self, body: bytes) -> None:
        engine_proof, _engine_time_ms = fastpath.decode_auth_ok(body)
        expected = fastpath.engine_proof(
            self.key, self.terminal_id, self.key_version, self.client_nonce, self.server_nonce
        )
        if engine_proof != expected:
            self.ready.set_exception(ConnectionError(f"terminal {self.terminal_id}: wrong engine proof"))
        elif not self.ready.done():
            self.ready.set_result(None)

    # --- taps --------------------------------------------------------------------------

    def send_taps(self, count: int, now: int, scheduled: Sequence[int] | None = None) -> None:
        """Send ``count`` taps now; ``scheduled`` gives each one's reference time (default: now)."""
        transport = self.transport
        if transport is None:
            return
        encode_tap = fastpath.encode_tap
        seal = self.sealer.seal  # type: ignore[union-attr]  # taps only follow the handshake
        event_ms = time.time_ns() // 1_000_000
        cards = self.cards
        uids = cards.uids
        counters = cards.counters
        card_count = len(uids)
        index = cards.index
        waiting = self.waiting
        request_id = self.next_request_id
        seq = self.next_seq
        frames = []
        for number in range(count):
            counter = counters[index]
            counters[index] = counter + 1
            frames.append(seal(encode_tap(request_id, seq, uids[index], counter, event_ms, 0)))
            index = index + 1 if index + 1 < card_count else 0
            waiting[request_id] = (now if scheduled is None else scheduled[number], now)
            request_id += 1
            seq += 1
        cards.index = index
        self.next_request_id = request_id
        self.next_seq = seq
        self.phase.sent += count
        transport.write(b"".join(frames))

    def pump(self, now: int) -> None:
        """Open loop: send what is due, up to the protocol's in-flight limit."""
        room = MAX_IN_FLIGHT_PER_CONNECTION - len(self.waiting)
        if room <= 0 or not self.backlog:
            return
        backlog = self.backlog
        count = min(room, len(backlog))
        scheduled = [backlog.popleft() for _ in range(count)]
        self.send_taps(count, now, scheduled)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Terminal:
    id: int
    key: bytes
    key_version: int


@dataclass
class Resources:
    """What the measurements sample: CPU of each process, the engine's batch-size histogram."""

    engine: EngineProcess
    pgdata: Path | None

    def sample(self) -> dict[str, float]:
        postgres = postgres_pids(self.pgdata) if self.pgdata is not None else []
        times = os.times()
        sample = {
            "engine_cpu_s": self.engine.cpu_seconds(),
            "load_generator_cpu_s": times.user + times.system,
            "postgres_cpu_s": process_cpu_seconds(postgres) if postgres else -1.0,
            "wall_s": time.perf_counter(),
        }
        if self.engine.metrics_port is not None:
            exposition = self.engine.scrape()
            sample["batch_size_sum"] = metric_sum(exposition, "citycard_batch_size_sum")
            sample["batch_size_count"] = metric_sum(exposition, "citycard_batch_size_count")
            sample["commit_s_sum"] = metric_sum(exposition, "citycard_commit_duration_seconds_sum")
            sample["loop_lag_s_sum"] = metric_sum(exposition, "citycard_event_loop_lag_seconds_sum")
            sample["loop_lag_count"] = metric_sum(exposition, "citycard_event_loop_lag_seconds_count")
        return sample


def usage(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    """CPU percent per process and the mean batch size between two samples."""
    wall = after["wall_s"] - before["wall_s"]

    def percent(name: str) -> float | None:
        if before[name] < 0 or after[name] < 0:
            return None
        return round(100 * (after[name] - before[name]) / wall, 1)

    batches = after.get("batch_size_count", 0.0) - before.get("batch_size_count", 0.0)
    decisions = after.get("batch_size_sum", 0.0) - before.get("batch_size_sum", 0.0)
    commit_s = after.get("commit_s_sum", 0.0) - before.get("commit_s_sum", 0.0)
    lag_s = after.get("loop_lag_s_sum", 0.0) - before.get("loop_lag_s_sum", 0.0)
    lag_samples = after.get("loop_lag_count", 0.0) - before.get("loop_lag_count", 0.0)
    return {
        "cpu_percent": {
            "engine": percent("engine_cpu_s"),
            "load_generator": percent("load_generator_cpu_s"),
            "postgres": percent("postgres_cpu_s"),
        },
        "batches": int(batches),
        "batch_size_mean": round(decisions / batches, 1) if batches else None,
        "commit_ms_mean": round(1000 * commit_s / batches, 2) if batches else None,
        # Share of the window in which the writer was committing: near 100%
        # means the database round trip is the bottleneck.
        "writer_busy_percent": round(100 * commit_s / wall, 1) if wall > 0 else None,
        # How late the engine's 100 ms timer ran, on average: the length of
        # the event loop's turns, which a finished commit waits out too.
        "loop_lag_ms_mean": round(1000 * lag_s / lag_samples, 2) if lag_samples else None,
    }


async def open_sessions(
    host: str, port: int, terminals: Sequence[Terminal], seqs: dict[int, int], cards: CardCycle, phase: Phase
) -> list[LoadConnection]:
    loop = asyncio.get_running_loop()
    connections: list[LoadConnection] = []
    for terminal in terminals:

        def factory(terminal: Terminal = terminal) -> LoadConnection:
            return LoadConnection(
                terminal.id, terminal.key, terminal.key_version, seqs[terminal.id], cards.lane(terminal.id), phase
            )

        _transport, protocol = await asyncio.wait_for(loop.create_connection(factory, host, port), CONNECT_TIMEOUT_S)
        connections.append(protocol)
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in connections)), CONNECT_TIMEOUT_S)
    return connections


async def close_sessions(connections: Sequence[LoadConnection], seqs: dict[int, int], phase: Phase) -> None:
    """Wait for every reply still due (bounded), then close; remember where each sequence got to."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while any(c.waiting or c.backlog for c in connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for connection in connections:
        seqs[connection.terminal_id] = connection.next_seq
        if connection.waiting or connection.backlog:
            phase.unanswered += len(connection.waiting) + len(connection.backlog)
            connection.waiting.clear()
            connection.backlog.clear()
        connection.close()
    await asyncio.gather(*(c.closed for c in connections))


async def closed_loop(
    engine: EngineProcess,
    pgdata: Path | None,
    terminals: Sequence[Terminal],
    seqs: dict[int, int],
    cards: CardCycle,
    *,
    seconds: float,
    warmup_s: float,
    pipeline: int,
) -> dict[str, object]:
    phase = Phase(closed_loop=True, pipeline=pipeline)
    connections = await open_sessions(engine.host, engine.port, terminals, seqs, cards, phase)
    resources = Resources(engine, pgdata)
    now = time.perf_counter_ns()
    start = now + int(warmup_s * 1e9)
    end = start + int(seconds * 1e9)
    phase.record_from_ns = phase.rate_from_ns = start
    phase.record_until_ns = phase.rate_until_ns = phase.send_until_ns = end
    for connection in connections:
        connection.send_taps(pipeline, now)
    await asyncio.sleep(max(0.0, (start - time.perf_counter_ns()) / 1e9))
    before = resources.sample()
    await asyncio.sleep(max(0.0, (end - time.perf_counter_ns()) / 1e9))
    if before is None:  # the schedule ended before the window began (a tiny rate)
        before = resources.sample()
    after = resources.sample()
    await close_sessions(connections, seqs, phase)
    return summarize(phase, seconds, usage(before, after))


async def send_on_schedule(
    connections: Sequence[LoadConnection],
    times: Sequence[int],
    resources: Resources,
    measured_from: int,
    end: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Send one tap at each scheduled time (round robin over the sessions),
    whatever the replies do; sample the resources over [measured_from, end).

    Returns the (before, after) resource samples.
    """
    before = resources.sample() if times and times[0] >= measured_from else None
    count = len(connections)
    due = 0
    total = len(times)
    while due < total:
        now = time.perf_counter_ns()
        if before is None and now >= measured_from:
            before = resources.sample()
        touched: set[LoadConnection] = set()
        while due < total and times[due] <= now:
            connection = connections[due % count]
            connection.backlog.append(times[due])
            touched.add(connection)
            due += 1
        for connection in touched:
            connection.pump(now)
        if due < total:
            # At least one tick: shorter sleeps round to zero and the loop
            # would spin, taking CPU from the engine and the database.
            wait_ns = times[due] - time.perf_counter_ns()
            await asyncio.sleep(max(wait_ns / 1e9, OPEN_LOOP_TICK_S))
    await asyncio.sleep(max(0.0, (end - time.perf_counter_ns()) / 1e9))
    if before is None:  # the schedule ended before the window began (a tiny rate)
        before = resources.sample()
    return before, resources.sample()


async def open_loop(
    engine: EngineProcess,
    pgdata: Path | None,
    terminals: Sequence[Terminal],
    seqs: dict[int, int],
    cards: CardCycle,
    *,
    seconds: float,
    rate: float,
    warmup_s: float,
) -> dict[str, object]:
    phase = Phase(closed_loop=False)
    connections = await open_sessions(engine.host, engine.port, terminals, seqs, cards, phase)
    resources = Resources(engine, pgdata)
    # The same rate during the warm-up, unmeasured: the first second of a
    # fresh engine (cold caches, new sessions) is not its steady state.
    start = time.perf_counter_ns() + 10_000_000
    times = scheduled_times_ns(start, [(rate, seconds + warmup_s)])
    total = len(times)
    measured_from = start + int(warmup_s * 1e9)
    end = measured_from + int(seconds * 1e9)
    phase.record_from_ns = phase.rate_from_ns = measured_from
    phase.record_until_ns = 1 << 62  # every scheduled tap's reply counts, however late
    phase.rate_until_ns = end
    probe = ProbeProcess(warmup_s + seconds + HOST_PROBE_DRAIN_S)
    try:
        before, after = await send_on_schedule(connections, times, resources, measured_from, end)
        await close_sessions(connections, seqs, phase)
        stalls = await asyncio.get_running_loop().run_in_executor(None, probe.result)
    finally:
        probe.kill()
    report = summarize(phase, seconds, usage(before, after))
    histogram = new_latency_histogram()
    record_latencies_us(histogram, phase.latency_from_send_us)
    from_send = latency_summary(histogram)
    return {
        "offered_rate": rate,
        "scheduled": total,
        "achieved_rate": report.pop("taps_per_s"),
        **report,
        "from_send_p50_ms": from_send["p50_ms"],
        "from_send_p99_ms": from_send["p99_ms"],
        **clear_of_stalls(phase.spans, stalls),
    }


def clear_of_stalls(spans: Sequence[tuple[int, int]], stalls: Stalls) -> dict[str, object]:
    """The latency of the taps whose life (scheduled -> reply) touched no
    host stall window, beside how much of the run the host stalled.

    Taps queued behind a stall but scheduled after it ended count as clear:
    what the engine takes to catch up is the engine's."""
    histogram = new_latency_histogram()
    clear = 0
    for scheduled, replied in spans:
        if not stalls.overlaps(scheduled, replied):
            histogram.record_value(max((replied - scheduled) // 1000, 1))
            clear += 1
    latency = latency_summary(histogram)
    return {
        "host_stalls": stalls.describe(),
        "clear_of_host_stalls_percent": round(100.0 * clear / len(spans), 2) if spans else None,
        "clear_of_host_stalls_p50_ms": latency["p50_ms"],
        "clear_of_host_stalls_p99_ms": latency["p99_ms"],
    }


# The host-stall probe runs this long past the open loop's window: the last
# replies arrive within it (DRAIN_TIMEOUT_S is for failures, not the norm).
HOST_PROBE_DRAIN_S = 2.0

# Open-loop rates of the latency-versus-throughput curve (--plot): from a
# quiet city to well past Gijón's peak, up to where queueing shows.
PLOT_RATES = [500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0]
CURVE_KEYS = ("offered_rate", "achieved_rate", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "errors")

# The burst scenario: a quiet city, then a step to rush-hour-times-ten, then
# quiet again (issue: "from 50 to 20,000 taps a second in one step and back").
BURST_LOW_RATE = 50.0
BURST_HIGH_RATE = 20_000.0
BURST_LOW_SECONDS = 3.0


def burst_schedule(
    high_seconds: float, low_rate: float = BURST_LOW_RATE, high_rate: float = BURST_HIGH_RATE
) -> list[tuple[float, float]]:
    """(rate, seconds) segments: low, high, low."""
    return [
        (low_rate, BURST_LOW_SECONDS),
        (high_rate, high_seconds),
        (low_rate, BURST_LOW_SECONDS),
    ]


def scheduled_times_ns(start_ns: int, schedule: Sequence[tuple[float, float]]) -> list[int]:
    """Send times of every tap of a piecewise-constant rate schedule.

    >>> scheduled_times_ns(0, [(2.0, 1.0), (4.0, 0.5)])
    [0, 500000000, 1000000000, 1250000000]
    """
    times: list[int] = []
    segment_start = start_ns
    for rate, seconds in schedule:
        interval_ns = 1e9 / rate
        count = int(rate * seconds)
        times.extend(segment_start + int(i * interval_ns) for i in range(count))
        segment_start += int(seconds * 1e9)
    return times


async def burst_loop(
    engine: EngineProcess,
    pgdata: Path | None,
    terminals: Sequence[Terminal],
    seqs: dict[int, int],
    cards: CardCycle,
    *,
    high_seconds: float,
    low_rate: float = BURST_LOW_RATE,
    high_rate: float = BURST_HIGH_RATE,
) -> dict[str, object]:
    """Open loop over the burst schedule; every tap's latency counts, from its
    scheduled time, and every error or lost connection is reported."""
    schedule = burst_schedule(high_seconds, low_rate, high_rate)
    phase = Phase(closed_loop=False)
    connections = await open_sessions(engine.host, engine.port, terminals, seqs, cards, phase)
    resources = Resources(engine, pgdata)
    start = time.perf_counter_ns() + 10_000_000
    times = scheduled_times_ns(start, schedule)
    seconds = sum(segment_seconds for _, segment_seconds in schedule)
    end = start + int(seconds * 1e9)
    phase.record_from_ns = phase.rate_from_ns = start
    phase.record_until_ns = 1 << 62
    phase.rate_until_ns = end
    before, after = await send_on_schedule(connections, times, resources, start, end)
    await close_sessions(connections, seqs, phase)
    report = summarize(phase, seconds, usage(before, after))
    return {
        "schedule": [{"rate": rate, "seconds": segment_seconds} for rate, segment_seconds in schedule],
        "scheduled": len(times),
        "achieved_rate": report.pop("taps_per_s"),
        **report,
    }


# --- the city's rules on versus off ---------------------------------------------------------

# The versions --rules-cost loads are recorded as loaded by this actor, from this source.
RULES_ACTOR = "benchmark"
RULES_SOURCE_NAME = "benchmarks.end_to_end --rules-cost"

# A running engine puts a stored version in force within milliseconds of its
# commit (a NOTIFY, then a few queries); beyond this its listener is broken.
RULES_APPLY_TIMEOUT_S = 30.0
# Each probe is a closed loop of one tap in flight on one session, this
# long; the record of its last tap then says which version decided it.
RULES_PROBE_S = 0.05
RULES_PROBE_INTERVAL_S = 0.1


def rules_without_policies(rules: Rules, version: int) -> Rules:
    """``rules`` as version ``version`` with the same services, kinds and fares
    and every policy off: no transfer, caps or products, no passback, minimum
    balance or tolerated negative balance, no ID sampling or renewal warning,
    no clone blocking. (The sharing check needs located terminals; the seeded
    city has none, so it runs in neither phase.)

    >>> from engine.rules import EXAMPLE, parse_rules
    >>> off = rules_without_policies(parse_rules(EXAMPLE), 2)
    >>> off.version, off.transfer, off.security.clone_blocks_card
    (2, None, False)
    """
    replace = msgspec.structs.replace
    return replace(
        rules,
        rules=replace(rules.rules, version=version, name=f"{rules.name} (every policy off)"[:NAME_LENGTH_MAX]),
        services=tuple(
            replace(service, min_balance_to_enter_cents=0, tolerated_negative_cents=0, passback_window_s=0)
            for service in rules.services
        ),
        transfer=None,
        caps=(),
        products=(),
        concessions=replace(rules.concessions, show_id_permille=0, renewal_window_days=0),
        security=replace(rules.security, clone_blocks_card=False),
    )


async def wait_for_rules(
    conn: asyncpg.Connection,
    engine: EngineProcess,
    pgdata: Path | None,
    terminals: Sequence[Terminal],
    seqs: dict[int, int],
    cards: CardCycle,
    version: int,
) -> tuple[float, int]:
    """Tap on one session until a tap's record shows ``version``: the engine
    decides every later tap under it. Returns (seconds waited, errors among
    the probe's taps)."""
    probe = terminals[:1]
    started = time.monotonic()
    errors = 0
    while True:
        report = await closed_loop(engine, pgdata, probe, seqs, cards, seconds=RULES_PROBE_S, warmup_s=0.0, pipeline=1)
        errors += _count(report, "errors")
        decided_by = await conn.fetchval(
            "SELECT rules_version FROM taps WHERE terminal_id = $1 AND terminal_seq = $2",
            probe[0].id,
            seqs[probe[0].id] - 1,
        )
        if decided_by is not None and decided_by >= version:
            return time.monotonic() - started, errors
        if time.monotonic() - started > RULES_APPLY_TIMEOUT_S:
            raise SystemExit(
                f"rules version {version} not in force after {RULES_APPLY_TIMEOUT_S:.0f} s"
                f" (the probe's last tap was decided by version {decided_by})"
            )
        await asyncio.sleep(RULES_PROBE_INTERVAL_S)


async def rules_off_loop(
    engine: EngineProcess,
    dsn: str,
    pgdata: Path | None,
    terminals: Sequence[Terminal],
    seqs: dict[int, int],
    cards: CardCycle,
    *,
    seconds: float,
    warmup_s: float,
    pipeline: int,
) -> dict[str, object]:
    """The closed loop under the city's rules with every policy off, loaded
    into the running engine as a new version; then the city's rules again,
    as a further version, so that later phases run under them."""
    conn = await connect(dsn)
    try:
        found = await current_rules(conn)
        if found is None:
            raise SystemExit("--rules-cost: the city has no rules version to compare with")
        version, rules = found
        rules_off = rules_without_policies(rules, version + 1)
        await store_rules(conn, rules_off, actor=RULES_ACTOR, source_name=RULES_SOURCE_NAME)
        off_after_s, off_probe_errors = await wait_for_rules(
            conn, engine, pgdata, terminals, seqs, cards, rules_off.version
        )
        report = await closed_loop(
            engine, pgdata, terminals, seqs, cards, seconds=seconds, warmup_s=warmup_s, pipeline=pipeline
        )
        rules_again = msgspec.structs.replace(rules, rules=msgspec.structs.replace(rules.rules, version=version + 2))
        await store_rules(conn, rules_again, actor=RULES_ACTOR, source_name=RULES_SOURCE_NAME)
        again_after_s, again_probe_errors = await wait_for_rules(
            conn, engine, pgdata, terminals, seqs, cards, rules_again.version
        )
    finally:
        await conn.close()
    return {
        **report,
        "rules_versions": {"on": version, "off": rules_off.version, "on_again": rules_again.version},
        "in_force_after_s": {"off": round(off_after_s, 3), "on_again": round(again_after_s, 3)},
        "probe_errors": off_probe_errors + again_probe_errors,
    }


def _rate(report: dict[str, object] | None) -> float:
    assert report is not None
    return float(report["taps_per_s"])  # type: ignore[arg-type]


def _count(report: dict[str, object] | None, key: str) -> int:
    """An integer of a phase's report; 0 for a phase that did not run."""
    value = report[key] if report is not None else 0
    assert isinstance(value, int), (key, value)
    return value


def _cpu_cost_percent(on: dict[str, object], off: dict[str, object] | None) -> float | None:
    """How much more engine CPU per tap ``on`` took than ``off``, in percent."""
    if off is None:
        return None
    on_us, off_us = on["engine_cpu_us_per_tap"], off["engine_cpu_us_per_tap"]
    if not isinstance(on_us, float | int) or not isinstance(off_us, float | int) or not off_us:
        return None
    return round(100.0 * (on_us / off_us - 1.0), 1)


def summarize(phase: Phase, seconds: float, resource_usage: dict[str, object]) -> dict[str, object]:
    histogram = new_latency_histogram()
    record_latencies_us(histogram, phase.latency_us)
    latency = latency_summary(histogram)
    results = {ResultCode(code).name: n for code, n in enumerate(phase.results) if n and code in _RESULT_CODES}
    unknown_results = sum(n for code, n in enumerate(phase.results) if n and code not in _RESULT_CODES)
    info = {str(flag.name): sum(n for bits, n in phase.infos.items() if bits & flag) for flag in TapInfo if flag}
    taps_per_s = round(phase.replies_in_rate_window / seconds, 1)
    cpu_percent = resource_usage.get("cpu_percent")
    engine_percent = cpu_percent.get("engine") if isinstance(cpu_percent, dict) else None
    approved = phase.results[ResultCode.APPROVED]
    declined = sum(phase.results[_FINAL_DECLINE_MIN:_NOT_A_DECISION_MIN])
    not_decided = sum(phase.results[_NOT_A_DECISION_MIN:])
    errors = (
        not_decided + unknown_results + sum(phase.error_frames.values()) + phase.unanswered + phase.unexpected_replies
    )
    return {
        "taps_per_s": taps_per_s,
        # The engine's CPU per reply in the window, apart from the database's:
        # what deciding and answering a tap cost the engine.
        "engine_cpu_us_per_tap": (
            round(engine_percent / 100 * 1e6 / taps_per_s, 1) if engine_percent is not None and taps_per_s else None
        ),
        "p50_ms": latency["p50_ms"],
        "p90_ms": latency["p90_ms"],
        "p99_ms": latency["p99_ms"],
        "p999_ms": latency["p999_ms"],
        "max_ms": latency["max_ms"],
        "replies": phase.replies_in_rate_window,
        "approved": approved,
        "declined": declined,
        "errors": errors,
        "results": results,
        "info": {name: n for name, n in info.items() if n},
        "error_detail": {
            "not_decided_results": not_decided,
            "error_frames": dict(phase.error_frames),
            "connections_lost": phase.connections_lost,
            "unanswered": phase.unanswered,
            "unexpected_replies": phase.unexpected_replies,
        },
        **resource_usage,
    }


_RESULT_CODES = {int(code) for code in ResultCode}


# --- the city ---------------------------------------------------------------------------------


@dataclass
class City:
    terminals: list[Terminal]
    card_uids: list[int]
    # Above every counter the city's taps ever presented: the first counter
    # each card presents, so that a run on a reused database is no clone.
    first_counter: int
    cards_in_city: int
    seeded_now: bool
    postgres_version: str
    postgres_settings: dict[str, str]


async def prepare_city(dsn: str, cards: int, connections: int, master: bytes) -> City:
    conn = await connect(dsn)
    try:
        await migrate(conn)
        existing = int(await conn.fetchval("SELECT count(*) FROM cards"))
        seeded_now = existing == 0
        if seeded_now:
            await seed_city(conn, cards, seed=SEED)
        # Start every run from a settled database: without this, PostgreSQL
        # may be vacuuming the freshly seeded tables or writing them back (a
        # checkpoint) during the measurement. CHECKPOINT needs a superuser or
        # pg_checkpoint; skipped without.
        await conn.execute("VACUUM ANALYZE")
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
        cards_in_city = int(await conn.fetchval("SELECT count(*) FROM cards"))
        terminals = [t for t in await list_terminals(conn) if t.kind == TerminalKind.VALIDATOR and t.status == 0]
        terminals.sort(key=lambda t: (t.service_code != PREFERRED_SERVICE, t.id))
        if len(terminals) < connections:
            raise SystemExit(f"--connections {connections}: the city has only {len(terminals)} active validators")
        chosen = terminals[:connections]
        samples = await sample_cards(conn, cards_in_city, seed=SEED)
        uids = [card.uid for card in samples if card.balance_cents > 0]
        if len(uids) < connections:
            raise SystemExit(f"--connections {connections}: the city has only {len(uids)} active cards with a balance")
        first_counter = int(await conn.fetchval("SELECT coalesce(max(card_counter), 0) + 1 FROM taps"))
        version = str(await conn.fetchval("SHOW server_version"))
        settings = {}
        for name in ("fsync", "synchronous_commit", "shared_buffers", "wal_sync_method", "max_connections"):
            settings[name] = str(await conn.fetchval(f"SHOW {name}"))
    finally:
        await conn.close()
    return City(
        terminals=[Terminal(t.id, derive_terminal_key(master, t.id, t.key_version), t.key_version) for t in chosen],
        card_uids=uids,
        first_counter=first_counter,
        cards_in_city=cards_in_city,
        seeded_now=seeded_now,
        postgres_version=version,
        postgres_settings=settings,
    )


# --- the command ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unmeasured seconds first")
    parser.add_argument("--naive-seconds", type=float, default=None, help="naive phase length (default --seconds)")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, help="terminal sessions")
    parser.add_argument("--pipeline", type=int, default=DEFAULT_PIPELINE, help="taps in flight per session")
    parser.add_argument("--rate", type=float, default=None, help="also run an open loop at this many taps/s")
    parser.add_argument("--cards", type=int, default=DEFAULT_CARDS, help="cards to seed (an existing city is reused)")
    parser.add_argument("--dsn", help="use this database instead of an embedded server in a temporary directory")
    parser.add_argument("--data-dir", type=Path, help="data directory (master key, embedded server); kept")
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive phase")
    parser.add_argument(
        "--plot",
        type=Path,
        nargs="?",
        const=RESULTS_DIR / "latency_vs_throughput.png",
        default=None,
        help="also run the open loop at --plot-rates and write a latency-versus-throughput PNG"
        " (default path benchmarks/results/latency_vs_throughput.png)",
    )
    parser.add_argument(
        "--plot-rates",
        type=lambda text: [float(rate) for rate in text.split(",")],
        default=PLOT_RATES,
        help="comma-separated open-loop rates for --plot",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help=f"also run a burst: {BURST_LOW_RATE:.0f} taps/s, {BURST_HIGH_RATE:.0f}/s for --seconds, then back",
    )
    parser.add_argument(
        "--burst-rates",
        type=lambda text: [float(rate) for rate in text.split(",")][:2],
        default=[BURST_LOW_RATE, BURST_HIGH_RATE],
        metavar="LOW,HIGH",
        help="the burst's quiet and peak rates",
    )
    parser.add_argument(
        "--metrics-cost",
        action="store_true",
        help="also run the closed loop with metrics off, to show what counting costs",
    )
    parser.add_argument(
        "--rules-cost",
        action="store_true",
        help="also run the closed loop under the same fares with every rules policy off, to show what the rules cost",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0:
        parser.error("--seconds must be positive and --warmup not negative")
    if not 1 <= args.pipeline <= MAX_IN_FLIGHT_PER_CONNECTION:
        parser.error(f"--pipeline must be between 1 and {MAX_IN_FLIGHT_PER_CONNECTION} (the protocol's limit)")
    if args.connections < 1 or args.cards < 1:
        parser.error("--connections and --cards must be at least 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    naive_seconds = args.naive_seconds if args.naive_seconds is not None else args.seconds

    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="citycard-bench-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    try:
        report = run(args, data_dir, naive_seconds)
    finally:
        if temporary and not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["machine"] = machine
    if args.keep_data or not temporary:
        report["settings"]["data_dir"] = str(data_dir)  # type: ignore[index]
    if args.json:
        print_json(report)
    else:
        print_summary(report)
    return 0


def run(args: argparse.Namespace, data_dir: Path, naive_seconds: float) -> dict[str, object]:
    master = load_master_key(data_dir)
    log_dir = data_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    with resolve_database(args.dsn, data_dir) as database:
        pgdata = database.embedded.pgdata if database.embedded is not None else None
        city = uvloop.run(prepare_city(database.dsn, args.cards, args.connections, master))
        random.Random(SEED).shuffle(city.card_uids)
        cards = CardCycle(city.card_uids, [terminal.id for terminal in city.terminals], city.first_counter)
        base_seq = time.time_ns() // 1000
        seqs = {terminal.id: base_seq for terminal in city.terminals}
        open_report: dict[str, object] | None = None
        burst_report: dict[str, object] | None = None
        curve: list[dict[str, object]] = []
        with serve_engine(database.dsn, data_dir, log_dir=log_dir, name="batched") as engine:
            # The open loop first: measured after the closed loop, it would
            # also measure PostgreSQL writing back the hundreds of thousands
            # of rows the closed loop just committed.
            if args.rate is not None:
                open_report = uvloop.run(
                    open_loop(
                        engine,
                        pgdata,
                        city.terminals,
                        seqs,
                        cards,
                        seconds=args.seconds,
                        rate=args.rate,
                        warmup_s=args.warmup,
                    )
                )
            if args.plot is not None:
                for curve_rate in args.plot_rates:
                    point = uvloop.run(
                        open_loop(
                            engine,
                            pgdata,
                            city.terminals,
                            seqs,
                            cards,
                            seconds=args.seconds,
                            rate=curve_rate,
                            warmup_s=args.warmup,
                        )
                    )
                    curve.append({key: point[key] for key in CURVE_KEYS})
            if args.burst:
                burst_report = uvloop.run(
                    burst_loop(
                        engine,
                        pgdata,
                        city.terminals,
                        seqs,
                        cards,
                        high_seconds=args.seconds,
                        low_rate=args.burst_rates[0],
                        high_rate=args.burst_rates[1],
                    )
                )
            batched = uvloop.run(
                closed_loop(
                    engine,
                    pgdata,
                    city.terminals,
                    seqs,
                    cards,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    pipeline=args.pipeline,
                )
            )
            rules_off: dict[str, object] | None = None
            if args.rules_cost:
                # The same engine, the same closed loop, right after, under
                # the same fares with every policy off; the city's rules are
                # back in force when it returns.
                rules_off = uvloop.run(
                    rules_off_loop(
                        engine,
                        database.dsn,
                        pgdata,
                        city.terminals,
                        seqs,
                        cards,
                        seconds=args.seconds,
                        warmup_s=args.warmup,
                        pipeline=args.pipeline,
                    )
                )
        metrics_off: dict[str, object] | None = None
        metrics_on_again: dict[str, object] | None = None
        if args.metrics_cost:
            # The same closed loop on an engine that counts nothing per
            # request (metrics off), then with metrics on again: compared
            # with each other, the two see the same mix of decisions.
            for metrics_on in (False, True):
                with serve_engine(
                    database.dsn, data_dir, log_dir=log_dir, metrics=metrics_on, name=f"metrics-{metrics_on}"
                ) as engine:
                    phase_report = uvloop.run(
                        closed_loop(
                            engine,
                            pgdata,
                            city.terminals,
                            seqs,
                            cards,
                            seconds=args.seconds,
                            warmup_s=args.warmup,
                            pipeline=args.pipeline,
                        )
                    )
                if metrics_on:
                    metrics_on_again = phase_report
                else:
                    metrics_off = phase_report
        naive: dict[str, object] | None = None
        if not args.skip_naive:
            with serve_engine(database.dsn, data_dir, log_dir=log_dir, naive=True, name="naive") as engine:
                naive = uvloop.run(
                    closed_loop(
                        engine,
                        pgdata,
                        city.terminals,
                        seqs,
                        cards,
                        seconds=naive_seconds,
                        warmup_s=args.warmup,
                        pipeline=args.pipeline,
                    )
                )
    taps_per_s = float(batched["taps_per_s"])  # type: ignore[arg-type]
    naive_taps_per_s = float(naive["taps_per_s"]) if naive is not None else None  # type: ignore[arg-type]
    report: dict[str, object] = {
        "benchmark": "end_to_end",
        "taps_per_s": taps_per_s,
        "p50_ms": batched["p50_ms"],
        "p90_ms": batched["p90_ms"],
        "p99_ms": batched["p99_ms"],
        "p999_ms": batched["p999_ms"],
        "max_ms": batched["max_ms"],
        "batch_size_mean": batched["batch_size_mean"],
        "naive_taps_per_s": naive_taps_per_s,
        "ratio": round(taps_per_s / naive_taps_per_s, 2) if naive_taps_per_s else None,
        "metrics_off_taps_per_s": metrics_off["taps_per_s"] if metrics_off is not None else None,
        "metrics_on_again_taps_per_s": metrics_on_again["taps_per_s"] if metrics_on_again is not None else None,
        # Throughput lost to counting: the metrics-on phase run right after
        # the metrics-off one, in percent of the latter (negative: within the
        # noise of the machine). Not the first phase: balances run out as the
        # run goes on, later phases see more declines, which cost less.
        "metrics_cost_percent": (
            round(
                100.0 * (1.0 - _rate(metrics_on_again) / _rate(metrics_off)),
                1,
            )
            if metrics_off is not None and metrics_on_again is not None
            else None
        ),
        "rules_off_taps_per_s": rules_off["taps_per_s"] if rules_off is not None else None,
        # Throughput lost to the city's rules: the closed loop under the
        # seeded rules against the same loop right after it, same engine,
        # same fares, every policy off, in percent of the latter (negative:
        # the rules-on loop was faster).
        "rules_cost_percent": (
            round(100.0 * (1.0 - taps_per_s / _rate(rules_off)), 1) if rules_off is not None else None
        ),
        # The same comparison for the engine's CPU per tap, apart from the database's.
        "rules_engine_cpu_cost_percent": _cpu_cost_percent(batched, rules_off),
        "approved": batched["approved"],
        "declined": batched["declined"],
        "errors": batched["errors"]
        + (naive["errors"] if naive is not None else 0)  # type: ignore[operator]
        + (open_report["errors"] if open_report is not None else 0)
        + (burst_report["errors"] if burst_report is not None else 0)
        + (metrics_off["errors"] if metrics_off is not None else 0)
        + (metrics_on_again["errors"] if metrics_on_again is not None else 0)
        + _count(rules_off, "errors")
        + _count(rules_off, "probe_errors"),
        "seconds": args.seconds,
        "connections": args.connections,
        "pipeline": args.pipeline,
        "cards": city.cards_in_city,
        "batched": batched,
        "naive": naive,
        "metrics_off": metrics_off,
        "metrics_on_again": metrics_on_again,
        "rules_off": rules_off,
    }
    if open_report is not None:
        report["open_loop"] = open_report
    if burst_report is not None:
        report["burst"] = burst_report
    if args.plot is not None:
        report["latency_curve"] = curve
        title = f"citycard open loop, {city.cards_in_city:,} cards, {args.connections} sessions"
        report["plot"] = str(write_latency_curve(curve, args.plot, title=title))
    report["versions"] = describe_versions(city.postgres_version)
    report["settings"] = {
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "naive_seconds": None if args.skip_naive else naive_seconds,
        "connections": args.connections,
        "pipeline": args.pipeline,
        "rate": args.rate,
        "cards_in_city": city.cards_in_city,
        "cards_tapped": len(city.card_uids),
        "seeded_now": city.seeded_now,
        "database": "external (--dsn)" if args.dsn else "embedded PostgreSQL in a temporary directory",
        "postgres": city.postgres_settings,
        "load_generator": "1 process, uvloop, engine.fastpath codec",
        "card_counters": f"each card through one session, counters from {city.first_counter} up, one a tap",
        "rules_cost": args.rules_cost,
        "engine": "citycard serve subprocess, --log-level WARNING",
    }
    return report


def print_summary(report: dict[str, object]) -> None:
    lines: list[str] = []
    add: Callable[[str], None] = lines.append
    batched = report["batched"]
    assert isinstance(batched, dict)
    add(
        f"batched: {report['taps_per_s']:,.0f} taps/s, p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms,"
        f" mean batch {report['batch_size_mean']}, cpu {batched['cpu_percent']}"
    )
    add(f"  approved {report['approved']:,}, declined {report['declined']:,}, errors {report['errors']}")
    naive = report.get("naive")
    if isinstance(naive, dict):
        add(
            f"naive:   {naive['taps_per_s']:,.0f} taps/s, p50 {naive['p50_ms']} ms, p99 {naive['p99_ms']} ms"
            f" -> ratio {report['ratio']}"
        )
    open_report = report.get("open_loop")
    if isinstance(open_report, dict):
        add(
            f"open loop at {open_report['offered_rate']:,.0f}/s: achieved {open_report['achieved_rate']:,.0f}/s,"
            f" p50 {open_report['p50_ms']} ms, p99 {open_report['p99_ms']} ms, errors {open_report['errors']}"
        )
    rules_off = report.get("rules_off")
    if isinstance(rules_off, dict):
        add(
            f"rules off: {rules_off['taps_per_s']:,.0f} taps/s, p50 {rules_off['p50_ms']} ms,"
            f" p99 {rules_off['p99_ms']} ms -> rules cost {report['rules_cost_percent']} %"
        )
    add(f"{report['connections']} connections x {report['pipeline']} in flight, {report['cards']:,} cards")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
