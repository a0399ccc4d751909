"""The engine's CPU per tap on its whole serving path, without PostgreSQL or sockets.

``benchmarks.fastpath`` times the codec and the decision alone; the closed
loop of ``benchmarks.end_to_end`` times everything, on a machine it shares
with PostgreSQL and the load generator, so its CPU per tap moves with
whatever else runs. This benchmark runs, in one process and on the CPU
clock, what the serving engine does with each tap between the socket and
the database, with the real classes:

- **receive**: ``TerminalSession.data_received`` of each terminal's chunk
  of sealed TAP frames (the reader, the seal's check, decoding, the
  processor's idempotency key and ``Decision``, the decision ladder, the
  writer's queue);
- **encode**: the commit statement's arguments of each batch
  (``engine.writer.batch_arguments``);
- **answer**: ``Processor.batch_done`` of each batch as committed (balances
  applied, results remembered and counted, TAP_RESULT frames sealed and
  written, one write per connection).

The city and its day are those of ``benchmarks.fastpath`` (20,000 cards by
default, the rules of ``rules/gijon.toml`` on, a service day of taps at
every service, each terminal one authenticated session). Taps go in waves
of ``--batch`` in the day's order, each wave one batch, as the writer forms
them at peak. Each round runs the whole day on fresh sessions and the city
reset to its morning; the report gives the median of the rounds per part
and in total, in nanoseconds of the process's CPU time per tap. The
transport is a list that keeps what is written, the writer a list that
keeps what is queued; neither is timed. Metrics are counted as the engine
counts them (``EngineMetrics``).

    python -m benchmarks.serving --json
    python -m benchmarks.serving --cards 340000 --rounds 9 --json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

import uvloop

from benchmarks.common import describe_machine, describe_versions, print_json
from benchmarks.fastpath import DEFAULT_SEED, FIRST_CARD_UID, Mode, PlannedTap, build_city, build_day, reset
from engine import fastpath
from engine.codes import ResultCode
from engine.decision import Decision
from engine.keys import derive_terminal_key
from engine.limits import BATCH_TAPS_MAX
from engine.metrics import EngineMetrics
from engine.processor import Processor
from engine.seal import Opener, Sealer, derive_session_keys
from engine.session import SessionContext, SessionLimits, TerminalSession
from engine.state import CityState
from engine.turns import TurnBudget
from engine.writer import BatchWriter, batch_arguments

# The closed loop's city (benchmarks.end_to_end seeds 20,000 cards).
DEFAULT_CARDS = 20_000
DEFAULT_TAPS = 20_000
DEFAULT_ROUNDS = 7
MASTER_KEY = bytes(range(32))
KEY_VERSION = 1
# A wave is delivered without the loop turning, so the turn budget must not
# bind: more frames than the handshakes and a day's taps ever come to.
UNLIMITED_FRAMES = 2**62


class ListTransport:
    """What a session writes, kept; the rest of asyncio.Transport, inert."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 40_000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class ListWriter:
    """The batch writer's intake: always room, decisions kept for the round's commit."""

    def __init__(self) -> None:
        self.queued: list[Decision] = []

    def has_room(self) -> bool:
        return True

    def submit(self, decision: Decision) -> None:
        self.queued.append(decision)

    def take(self) -> list[Decision]:
        batch, self.queued = self.queued, []
        return batch


class Link:
    """One terminal's connection as both ends see it."""

    def __init__(
        self,
        session: TerminalSession,
        transport: ListTransport,
        reader: fastpath.FrameReader,
        sealer: Sealer,
        opener: Opener,
    ) -> None:
        self.session = session
        self.transport = transport
        self.reader = reader  # the terminal's, past the AUTH_OK: it reads sealed frames
        self.sealer = sealer  # the terminal's, for its TAPs
        self.opener = opener  # the terminal's, for the engine's replies


def open_session(context: SessionContext, terminal_id: int) -> Link:
    """A session through HELLO, CHALLENGE and AUTH, OPEN."""
    session = TerminalSession(context)
    transport = ListTransport()
    session.connection_made(cast(asyncio.Transport, transport))
    client_nonce = os.urandom(fastpath.NONCE_BYTES)
    reader = fastpath.FrameReader()
    session.data_received(fastpath.encode_hello(1, terminal_id, KEY_VERSION, client_nonce))
    ((msg_type, _, body),) = reader.feed(transport.written.pop())
    if msg_type != fastpath.MSG_CHALLENGE:
        raise RuntimeError(f"terminal {terminal_id}: no CHALLENGE to its HELLO (type 0x{msg_type:02x})")
    server_nonce = fastpath.decode_challenge(body)
    key = derive_terminal_key(MASTER_KEY, terminal_id, KEY_VERSION)
    proof = fastpath.terminal_proof(key, terminal_id, KEY_VERSION, client_nonce, server_nonce)
    session.data_received(fastpath.encode_auth(2, bytes(proof)))
    ((msg_type, _, _),) = reader.feed(transport.written.pop())
    if msg_type != fastpath.MSG_AUTH_OK:
        raise RuntimeError(f"terminal {terminal_id}: AUTH not accepted (type 0x{msg_type:02x})")
    keys = derive_session_keys(key, terminal_id, KEY_VERSION, client_nonce, server_nonce)
    return Link(session, transport, reader, Sealer(keys.terminal_to_engine), Opener(keys.engine_to_terminal))


# What one terminal sends in one read: (terminal id, sealed TAP frames).
Chunk = tuple[int, bytes]


def waves(planned: Sequence[PlannedTap], terminals: dict[int, Link], batch: int) -> list[list[list[Chunk]]]:
    """The day as waves of at most ``batch`` taps, each wave one batch.

    A wave is delivered in steps, each holding at most one tap of a card,
    and within a step each terminal's taps go in one chunk: the engine sees
    every card's taps in the order it made them (a card whose counter went
    backwards would be a suspected clone), and terminals pipeline as far as
    the day allows.
    """
    out: list[list[list[Chunk]]] = []
    next_seq: collections.Counter[int] = collections.Counter()
    for start in range(0, len(planned), batch):
        steps: list[dict[int, list[bytes]]] = [{}]
        cards: set[int] = set()
        for tap in planned[start : start + batch]:
            if tap.card in cards:
                steps.append({})
                cards.clear()
            cards.add(tap.card)
            seq = next_seq[tap.terminal_id]
            next_seq[tap.terminal_id] += 1
            frame = fastpath.encode_tap(seq, seq, FIRST_CARD_UID + tap.card, tap.counter, tap.time_ms, tap.flags)
            steps[-1].setdefault(tap.terminal_id, []).append(terminals[tap.terminal_id].sealer.seal(frame))
        out.append([[(terminal_id, b"".join(frames)) for terminal_id, frames in step.items()] for step in steps])
    return out


def one_round(
    state: CityState, planned: Sequence[PlannedTap], batch: int
) -> tuple[dict[str, int], collections.Counter[str], int]:
    """The day once: CPU nanoseconds per part, the replies' results, and
    the number of chunks delivered."""
    processor = Processor(state, None)
    writer = ListWriter()
    processor.attach(cast(BatchWriter, writer))
    metrics = EngineMetrics()
    processor.on_result = metrics.count_decision
    # A wave may bring one terminal more taps than a real one pipelines, and
    # a wave is delivered without the loop turning: no per-turn limit.
    context = SessionContext(
        state,
        processor,
        MASTER_KEY,
        limits=SessionLimits(max_in_flight=batch),
        turns=TurnBudget(inline_frames=UNLIMITED_FRAMES),
    )
    terminals: dict[int, Link] = {}
    for terminal_id in sorted({tap.terminal_id for tap in planned}):
        state.terminals[terminal_id].high_seq = -1
        terminals[terminal_id] = open_session(context, terminal_id)
    day = waves(planned, terminals, batch)
    chunks = sum(len(step) for wave in day for step in wave)

    spent = {"receive": 0, "encode": 0, "answer": 0}
    clock = time.process_time_ns
    gc.collect()
    for batch_id, wave in enumerate(day, start=1):
        started = clock()
        for step in wave:
            for terminal_id, chunk in step:
                terminals[terminal_id].session.data_received(chunk)
        received = clock()
        decisions = writer.take()
        batch_arguments(batch_id, decisions, state)
        encoded = clock()
        processor.batch_done(decisions, True)
        answered = clock()
        spent["receive"] += received - started
        spent["encode"] += encoded - received
        spent["answer"] += answered - encoded

    # Off the clock: every tap answered once, in a reply whose seal holds.
    results: collections.Counter[str] = collections.Counter()
    for terminal_id, terminal in terminals.items():
        if terminal.transport.closed:
            raise RuntimeError(f"terminal {terminal_id}: the session closed during the round")
        for msg_type, request_id, body in terminal.reader.feed(b"".join(terminal.transport.written)):
            if msg_type != fastpath.MSG_TAP_RESULT:
                raise RuntimeError(f"terminal {terminal_id}: a reply of type 0x{msg_type:02x}")
            result = fastpath.decode_tap_result(terminal.opener.open(msg_type, request_id, body))[1]
            results[ResultCode(result).name] += 1
    return spent, results, chunks


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    city = build_city(args.cards, rng)
    planned = build_day(city, args.taps, rng)
    mode = Mode("rules_on", city.rules_on, city.rules.version, city.located)
    per_tap: dict[str, list[float]] = collections.defaultdict(list)
    results: collections.Counter[str] = collections.Counter()
    for number in range(args.rounds + 1):  # the first round warms caches and branch predictors
        reset(fastpath, city, mode)
        spent, results, chunks = one_round(city.state, planned, args.batch)
        replies = sum(results.values())
        if replies != len(planned):
            raise RuntimeError(f"{replies} replies to {len(planned)} taps")
        if number:
            for part, ns in spent.items():
                per_tap[part].append(ns / len(planned))
            per_tap["total"].append(sum(spent.values()) / len(planned))
    return {
        "benchmark": "serving",
        "measures": "process CPU time per tap: session receive (seal check, decode, decide, queue),"
        " batch encode, batch answer (apply, remember, count, seal, write); no database, no sockets",
        "fastpath": fastpath.IMPLEMENTATION,
        "ns_per_tap": {part: round(statistics.median(values)) for part, values in per_tap.items()},
        "ns_per_tap_min": {part: round(min(values)) for part, values in per_tap.items()},
        "statistic": "median of rounds",
        "results": dict(results.most_common()),
        "machine": describe_machine(),
        "versions": describe_versions(),
        "settings": {
            "seed": args.seed,
            "cards": args.cards,
            "taps_per_round": len(planned),
            "rounds": args.rounds,
            "batch": args.batch,
            "sessions": len({tap.terminal_id for tap in planned}),
            "taps_per_chunk_mean": round(len(planned) / chunks, 1),
            "rules": "rules/gijon.toml, on",
            "loop": "uvloop",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cards", type=int, default=DEFAULT_CARDS)
    parser.add_argument("--taps", type=int, default=DEFAULT_TAPS, help="taps per round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--batch", type=int, default=BATCH_TAPS_MAX, help="taps per wave (one batch)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    args = parser.parse_args(argv)
    if args.cards < 1 or args.taps < 1 or args.rounds < 1 or args.batch < 1:
        parser.error("--cards, --taps, --rounds and --batch must be at least 1")
    # The engine's log lines (inactive cards presented, clone blocks that
    # cannot be recorded without a database) are made, as when serving, but
    # not printed.
    logging.getLogger("citycard").addHandler(logging.NullHandler())
    logging.getLogger("citycard").propagate = False
    report = uvloop.run(run(args))
    print_json(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
