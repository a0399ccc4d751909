"""Crash faults: SIGKILL the engine under load, restart it, retry, and audit the books.

    python -m benchmarks.crash --cycles 20 --json
    python -m benchmarks.crash --cycles 1000 --seed 7 --json
    python -m benchmarks.crash --cycles 30 --unsafe --stop-at-first-loss --json   # negative control

A checker in the spirit of Jepsen's bank test (docs/reliability.md):

1. Sets up a database: the embedded PostgreSQL in a temporary data directory
   (fsync and synchronous_commit on, as in production), or ``--dsn`` (which
   must hold no city yet: the harness creates its own). The city is small and
   known: ``CARDS`` cards with recorded opening balances (some poor, some
   allowed a negative floor, one near its ceiling), ``--terminals`` bus
   validators and one kiosk that tops cards up.
2. Repeats ``--cycles`` times: start ``citycard serve`` as a subprocess (same
   ``--data-dir`` every time, so the master key persists; ``--metrics off``);
   every terminal opens a session and first retries ALL its requests whose
   outcome is unknown, with the same sequence and the same content (event
   time included), until each gets a final answer, re-sends a few requests
   it already had answered (the answer must not change), then sends new
   requests with strictly increasing sequences, ``--pipeline`` in flight.
   At a moment drawn from the seeded RNG the engine is killed with SIGKILL:
   either 0-300 ms after the load started (which lands anywhere: during a
   commit, between commit and reply, during the retries), or right after
   the k-th approval of the cycle (a batch just committed, the next one in
   flight). Each request ends the cycle acknowledged (a final result) or
   unknown (no reply). With the engine dead and its database sessions gone,
   every answer of the cycle is compared with the database's record, and
   every unknown is classified as committed or not (so the report shows the
   kills hit both windows).
3. Restarts the engine once more, resolves every unknown, re-sends a sample,
   stops it with SIGTERM (it must exit 0), and checks the database:

   - ``lost``: acknowledged approvals whose record is missing or differs
     (checked after every crash and at the end; counted once per request);
   - ``declines_lost``: the same for acknowledged declines (decisions are
     recorded before their reply too);
   - ``duplicated``: keys recorded twice, plus accounts whose balance is not
     their opening balance plus the effects of their recorded requests,
     each counted once (a request applied twice shows here);
   - ``accounts_off_ledger``: accounts whose balance differs from the sum of
     their ledger entries;
   - ``mismatched_retries``: re-sends whose answer differs from the original;
   - ``conserved``: all balances sum to zero (the funding account holds the
     opposite of all money issued), the ledger sums to zero, and card
     balances + revenue == opening card total + top-ups;
   - ``below_floor``: accounts below their floor;
   - ``unresolved``: requests whose outcome is still unknown;
   - ``phantom``: records of requests the harness never sent, or with other
     content than it sent.

Prints one JSON object (``--json``) or a summary; exits 0 only if every
count above is zero, money is conserved and the engine stopped cleanly.
``--unsafe`` starts the engine with ``--unsafe-answer-before-commit`` (and
``CITYCARD_ALLOW_UNSAFE=1``): acknowledged debits can then be lost, and the
checker must say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import asyncpg
import uvloop

from benchmarks.common import (
    REPOSITORY_ROOT,
    describe_machine,
    describe_versions,
    free_port,
    print_json,
)
from engine.client import ConnectionLost, EngineError, TerminalClient
from engine.codes import OperationKind, ResultCode
from engine.db import resolve_database
from engine.keys import derive_terminal_key, load_master_key
from engine.migrate import migrate

DEFAULT_CYCLES = 20
DEFAULT_TERMINALS = 4
DEFAULT_PIPELINE = 4
DEFAULT_SEED = 2026

# --- the city ------------------------------------------------------------------------------

FUNDING_ACCOUNT = 1
BUS_REVENUE_ACCOUNT = 11
KIOSK_REVENUE_ACCOUNT = 13
BUS_SERVICE = 1
KIOSK_SERVICE = 3
STANDARD = 0
STUDENT = 1
BUS_FARE_CENTS = 150
BUS_FARE_STUDENT_CENTS = 75
FIRST_VALIDATOR_ID = 101
KIOSK_ID = 200
CARD_CEILING_CENTS = 100_000

# 40 cards: 28 the kiosk keeps topping up (fares approved), 8 never topped
# up (they run dry: INSUFFICIENT_FUNDS), 3 of those allowed down to -300
# (the floor is then what stops them), 1 near its ceiling (BALANCE_LIMIT).
CARDS_TOPPED_UP = 28
CARDS_POOR = 8
CARDS_NEGATIVE_FLOOR = 3
CARDS = CARDS_TOPPED_UP + CARDS_POOR + CARDS_NEGATIVE_FLOOR + 1
NEGATIVE_FLOOR_CENTS = -300
NEAR_CEILING_CENTS = 99_000
FIRST_CARD_NUMBER = 1_001
CARD_UID_BASE = 0x04_0000_0000_0000
# A uid no card has: a few taps use it and are declined UNKNOWN_CARD.
UNKNOWN_CARD_UID = 0x04_FFFF_FFFF_FFFF

# Shares of the load, in percent, drawn per request from the terminal's RNG.
EXIT_TAP_PERCENT = 10
UNKNOWN_CARD_PERCENT = 3
NEAR_CEILING_TOPUP_PERCENT = 10
TOPUP_MIN_CENTS = 300
TOPUP_MAX_CENTS = 2_000
# A kiosk serves one customer at a time. With the default four validators
# at four in flight, top-ups (1,150 on average) bring in a little less than
# the fares take out, so the topped-up cards hover near empty: approvals and
# INSUFFICIENT_FUNDS both keep happening over a thousand cycles.
KIOSK_PIPELINE = 1

# --- the faults ----------------------------------------------------------------------------

# A timed kill lands 0-300 ms after the load starts: an engine start plus a
# few batches, so it hits retries, decisions, commits and replies alike.
KILL_DELAY_MAX_S = 0.3
# A kill after the k-th approval of the cycle, k in 1..40: a burst of
# replies has just gone out and the next batch is being committed.
KILL_AFTER_APPROVALS_MAX = 40
# If the k-th approval never comes (every card dry, engine stuck), kill anyway.
KILL_DEADLINE_S = 2.0
# Requests that were answered, re-sent after each restart per terminal: the
# answer must be the original one.
RESENDS_PER_TERMINAL = 3

# --- timing --------------------------------------------------------------------------------

# BUSY_RETRY backoff, as docs/protocol.md asks of terminals (shortened: the
# engine is on this machine).
BUSY_BACKOFF_MIN_S = 0.005
BUSY_BACKOFF_MAX_S = 0.2
# A request unanswered this long on a live engine is a hang, reported as such.
REQUEST_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 10.0
# The final restart resolves every unknown within this, or reports it unresolved.
FINAL_RESOLVE_S = 60.0
# The engine loads this small city and listens in about a second.
ENGINE_START_TIMEOUT_S = 60.0
ENGINE_START_ATTEMPTS = 3
# SIGTERM drains in-flight batches (at most 10 s in engine/server.py).
ENGINE_STOP_TIMEOUT_S = 30.0
# After SIGKILL, PostgreSQL finishes the dead engine's statement (a commit
# in flight completes) and ends its sessions within milliseconds.
ORPHAN_SESSIONS_TIMEOUT_S = 30.0
ORPHAN_POLL_S = 0.01
# The engine's database sessions are named citycard, citycard-writer, ...
# (engine/db.py, engine/writer.py): the harness waits for these to end after
# a kill. Its own session is named otherwise.
ENGINE_APPLICATION_NAME_PATTERN = "citycard%"
CHECKER_APPLICATION_NAME = "crash-checker"
LOG_TAIL_CHARS = 2000

_APPROVED = ResultCode.APPROVED
_BUSY = ResultCode.BUSY_RETRY


class HarnessError(Exception):
    """The harness could not run (engine would not start, database not empty)."""


class Answer(NamedTuple):
    """A final TAP_RESULT: what the terminal was told."""

    result: int
    amount_cents: int
    balance_cents: int
    info: int


@dataclass(slots=True, eq=False)
class Request:
    """One TAP or TOPUP, with everything needed to send it again identically."""

    terminal_id: int
    seq: int
    kind: int
    card_uid: int
    amount_cents: int
    card_counter: int
    tap_flags: int
    event_time_ms: int
    cycle: int
    answer: Answer | None = None
    # The cycle in which it first had no reply, if ever.
    unknown_since: int | None = None
    # Its answer was compared with the database after a crash.
    verified: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.terminal_id, self.seq)


@dataclass(eq=False)
class Terminal:
    terminal_id: int
    key: bytes
    is_kiosk: bool
    rng: random.Random
    next_seq: int = 1
    unknown: dict[int, Request] = field(default_factory=dict)
    verified: list[Request] = field(default_factory=list)


@dataclass
class Card:
    uid: int
    account_id: int
    profile: int
    opening_cents: int
    floor_cents: int
    topped_up: bool


@dataclass
class Tally:
    """What the terminals saw."""

    requests: int = 0
    acknowledged: int = 0
    approved: int = 0
    declined: int = 0
    unknown: int = 0
    unknown_committed: int = 0
    unknown_uncommitted: int = 0
    resolved: int = 0
    resends: int = 0
    mismatched_retries: int = 0
    unexpected_results: int = 0
    busy_retries: int = 0
    timeouts: int = 0
    kills: int = 0
    engine_failures: int = 0
    results: Counter[str] = field(default_factory=Counter)
    kill_modes: Counter[str] = field(default_factory=Counter)
    lost_keys: set[tuple[int, int]] = field(default_factory=set)
    declines_lost_keys: set[tuple[int, int]] = field(default_factory=set)
    first_loss: dict[str, object] | None = None
    failure_logs: list[str] = field(default_factory=list)


@dataclass
class KillPlan:
    """When this cycle's SIGKILL comes: ``delay_s`` after the load starts, or
    right after the ``approvals``-th approval (``mode``)."""

    mode: str
    delay_s: float = 0.0
    approvals: int = 0

    @classmethod
    def draw(cls, rng: random.Random) -> KillPlan:
        if rng.random() < 0.5:
            return cls("timer", delay_s=rng.uniform(0.0, KILL_DELAY_MAX_S))
        return cls("after_approvals", approvals=rng.randint(1, KILL_AFTER_APPROVALS_MAX))


# --- the engine process ----------------------------------------------------------------------


class EngineRun:
    """One ``citycard serve`` subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    def kill(self) -> bool:
        """SIGKILL now (synchronous: called from the reply path). False if already gone."""
        if self.process.returncode is not None:
            return False
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


async def start_engine(dsn: str, data_dir: Path, log_path: Path, *, unsafe: bool) -> EngineRun:
    """Start the engine and wait for its banner (it listens once the banner is out)."""
    environment = dict(os.environ)
    if unsafe:
        environment["CITYCARD_ALLOW_UNSAFE"] = "1"
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
            "off",
            "--admin",
            "off",
            "--dsn",
            dsn,
            "--data-dir",
            str(data_dir),
        ]
        if unsafe:
            command.append("--unsafe-answer-before-commit")
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=REPOSITORY_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=environment,
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
    raise HarnessError(f"the engine did not start:\n{last_tail}")


async def stop_engine(run: EngineRun) -> int:
    """SIGTERM and wait; the exit code (killed if it does not stop in time)."""
    if run.process.returncode is None:
        run.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(run.process.wait(), ENGINE_STOP_TIMEOUT_S)
        except TimeoutError:
            run.kill()
            await run.process.wait()
    assert run.process.returncode is not None
    return run.process.returncode


# --- the city ----------------------------------------------------------------------------------


def plan_cards(seed: int) -> list[Card]:
    """The cards and their opening balances, drawn from ``seed``."""
    rng = random.Random(f"{seed}-cards")
    cards: list[Card] = []
    for index in range(CARDS):
        number = FIRST_CARD_NUMBER + index
        profile = STUDENT if index % 4 == 3 else STANDARD
        floor = 0
        topped_up = index < CARDS_TOPPED_UP
        if topped_up:
            opening = rng.randrange(500, 5_001)
        elif index < CARDS_TOPPED_UP + CARDS_POOR:
            opening = rng.randrange(0, 401)
        elif index < CARDS - 1:
            opening = rng.randrange(0, 401)
            floor = NEGATIVE_FLOOR_CENTS
        else:
            opening = NEAR_CEILING_CENTS
        cards.append(Card(CARD_UID_BASE + number, number, profile, opening, floor, topped_up))
    return cards


async def create_city(conn: asyncpg.Connection, cards: list[Card], validators: int) -> None:
    """Profiles, services, fares, terminals, the funding account and the cards,
    with every opening balance booked in the ledger (transfer kind 3)."""
    await migrate(conn)
    if await conn.fetchval("SELECT count(*) FROM terminals") or await conn.fetchval("SELECT count(*) FROM accounts"):
        raise HarnessError("the database already holds a city: the crash harness needs an empty database")
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO profiles (id, code, name) VALUES (0, 'standard', 'Standard'), (1, 'student', 'Student');
            INSERT INTO accounts (id, kind, name, floor_cents) VALUES (1, 2, 'funding', -4611686018427387904);
            INSERT INTO accounts (id, kind, name) VALUES (11, 1, 'bus revenue'), (13, 1, 'kiosk revenue');
            INSERT INTO services (id, code, name, revenue_account_id) VALUES
                (1, 'bus', 'City bus', 11), (3, 'kiosk', 'Kiosks', 13);
            INSERT INTO tariffs (service_id, profile_id, fare_cents) VALUES
                (1, 0, 150), (1, 1, 75), (3, 0, 0), (3, 1, 0);
            """
        )
        await conn.executemany(
            "INSERT INTO terminals (id, service_id, kind, name) VALUES ($1, 1, 0, 'bus validator')",
            [(FIRST_VALIDATOR_ID + i,) for i in range(validators)],
        )
        await conn.execute(
            "INSERT INTO terminals (id, service_id, kind, name, funding_account_id) VALUES ($1, 3, 1, 'kiosk', 1)",
            KIOSK_ID,
        )
        await conn.executemany(
            "INSERT INTO holders (id, profile_id) VALUES ($1, $2)", [(c.account_id, c.profile) for c in cards]
        )
        await conn.executemany(
            "INSERT INTO accounts (id, kind, name, balance_cents, floor_cents, ceiling_cents)"
            " VALUES ($1, 0, 'card', $2, $3, $4)",
            [(c.account_id, c.opening_cents, c.floor_cents, CARD_CEILING_CENTS) for c in cards],
        )
        await conn.executemany(
            "INSERT INTO cards (uid, holder_id, account_id) VALUES ($1, $2, $2)", [(c.uid, c.account_id) for c in cards]
        )
        funded = [c for c in cards if c.opening_cents]
        # Opening transfers use negative ids, apart from the engine's.
        await conn.executemany(
            "INSERT INTO ledger_transfers (id, kind) VALUES ($1, 3)", [(-c.account_id,) for c in funded]
        )
        for card in funded:
            await conn.execute(
                "INSERT INTO ledger_entries (transfer_id, account_id, amount_cents) VALUES ($1, $2, $3), ($1, $4, $5)",
                -card.account_id,
                card.account_id,
                card.opening_cents,
                FUNDING_ACCOUNT,
                -card.opening_cents,
            )
        await conn.execute(
            "UPDATE accounts SET balance_cents = $1 WHERE id = $2",
            -sum(c.opening_cents for c in cards),
            FUNDING_ACCOUNT,
        )


# --- the terminals -----------------------------------------------------------------------------


class Cycle:
    """One engine run: its terminals' sessions, the kill, what was seen."""

    def __init__(self, harness: Harness, number: int, engine: EngineRun, plan: KillPlan | None) -> None:
        self.harness = harness
        self.number = number
        self.engine = engine
        self.plan = plan
        self.killed = False
        self.new_load = plan is not None
        self.approvals = 0
        self.load_started = asyncio.Event()
        # Requests answered or left unknown in this cycle, for the check after the crash.
        self.answered: list[Request] = []
        self.left_unknown: list[Request] = []

    def kill(self, mode: str) -> None:
        if self.killed:
            return
        self.killed = True
        if self.engine.kill():
            self.harness.tally.kills += 1
            self.harness.tally.kill_modes[mode] += 1

    def approved(self) -> None:
        self.approvals += 1
        plan = self.plan
        if plan is not None and plan.mode == "after_approvals" and self.approvals >= plan.approvals:
            self.kill(plan.mode)

    async def kill_on_timer(self) -> None:
        plan = self.plan
        assert plan is not None
        await self.load_started.wait()
        delay = plan.delay_s if plan.mode == "timer" else KILL_DEADLINE_S
        await asyncio.sleep(delay)
        self.kill(plan.mode if plan.mode == "timer" else "deadline")


async def send(client: TerminalClient, request: Request) -> Answer:
    if request.kind == OperationKind.TOPUP:
        reply = await client.topup(
            request.seq, request.card_uid, request.amount_cents, event_time_ms=request.event_time_ms
        )
    else:
        reply = await client.tap(
            request.seq,
            request.card_uid,
            card_counter=request.card_counter,
            event_time_ms=request.event_time_ms,
            tap_flags=request.tap_flags,
        )
    if reply.terminal_seq != request.seq:
        raise EngineError(0, f"reply for seq {reply.terminal_seq} to a request with seq {request.seq}")
    return Answer(int(reply.result), reply.amount_cents, reply.balance_cents, int(reply.info))


class Harness:
    """The city, the terminals and everything they were told, across cycles."""

    def __init__(self, args: argparse.Namespace, dsn: str, data_dir: Path) -> None:
        self.args = args
        self.dsn = dsn
        self.data_dir = data_dir
        self.log_path = data_dir / "engine.log"
        self.cards = plan_cards(args.seed)
        self.card_by_uid = {card.uid: card for card in self.cards}
        self.topped_up = [card for card in self.cards if card.topped_up]
        self.near_ceiling = self.cards[-1]
        # The last balance a reply showed per card: the kiosk tops up the poorest.
        self.known_balance = {card.uid: card.opening_cents for card in self.cards}
        self.kill_rng = random.Random(f"{args.seed}-kills")
        master = load_master_key(data_dir)
        ids = [FIRST_VALIDATOR_ID + i for i in range(args.terminals)] + [KIOSK_ID]
        self.terminals = [
            Terminal(tid, derive_terminal_key(master, tid, 1), tid == KIOSK_ID, random.Random(f"{args.seed}-{tid}"))
            for tid in ids
        ]
        self.terminals_by_id = {t.terminal_id: t for t in self.terminals}
        self.requests: dict[tuple[int, int], Request] = {}
        self.tally = Tally()
        self.card_counters: dict[int, int] = {}

    # --- requests ----------------------------------------------------------------------

    def new_request(self, terminal: Terminal, cycle: int) -> Request:
        rng = terminal.rng
        seq = terminal.next_seq
        terminal.next_seq += 1
        now = time.time_ns() // 1_000_000
        if terminal.is_kiosk:
            if rng.randrange(100) < NEAR_CEILING_TOPUP_PERCENT:
                card = self.near_ceiling
            else:
                card = min(rng.sample(self.topped_up, 3), key=lambda c: self.known_balance[c.uid])
            amount = rng.randrange(TOPUP_MIN_CENTS, TOPUP_MAX_CENTS + 1)
            request = Request(terminal.terminal_id, seq, OperationKind.TOPUP, card.uid, amount, 0, 0, now, cycle)
        else:
            draw = rng.randrange(100)
            uid = UNKNOWN_CARD_UID if draw < UNKNOWN_CARD_PERCENT else rng.choice(self.cards).uid
            flags = 1 if draw >= 100 - EXIT_TAP_PERCENT else 0
            # Each card counts up, as a real card does: a random counter
            # would make nearly every tap a suspected clone and the load
            # would move no money. Taps of one card from two terminals may
            # still arrive out of order: those are declined CLONE_SUSPECTED,
            # a decision like any other for the checker.
            self.card_counters[uid] = counter = self.card_counters.get(uid, 0) + 1
            request = Request(terminal.terminal_id, seq, OperationKind.TAP, uid, 0, counter, flags, now, cycle)
        self.requests[request.key] = request
        self.tally.requests += 1
        return request

    async def until_final(
        self, client: TerminalClient, request: Request, deadline: float | None = None
    ) -> Answer | None:
        """Send (and re-send on BUSY_RETRY) until a final answer; None when the
        connection died, the request timed out or ``deadline`` passed."""
        delay = BUSY_BACKOFF_MIN_S
        while True:
            try:
                answer = await asyncio.wait_for(send(client, request), REQUEST_TIMEOUT_S)
            except TimeoutError:
                self.tally.timeouts += 1
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
        """Record what the terminal was told about ``request`` (None: nothing)."""
        tally = self.tally
        if answer is None:
            if request.answer is None:
                if request.unknown_since is None:
                    request.unknown_since = cycle.number
                    tally.unknown += 1
                    cycle.left_unknown.append(request)
                terminal.unknown[request.seq] = request
            return
        if request.answer is not None:
            # A re-send of an answered request: the answer must be the same.
            tally.resends += 1
            if answer != request.answer:
                tally.mismatched_retries += 1
                self.note_first_loss(cycle.number, "mismatched retry", request, answer)
            return
        request.answer = answer
        terminal.unknown.pop(request.seq, None)
        cycle.answered.append(request)
        tally.acknowledged += 1
        if request.unknown_since is not None:
            tally.resolved += 1
        try:
            name = ResultCode(answer.result).name
        except ValueError:
            name = str(answer.result)
        tally.results[name] += 1
        if answer.result >= _BUSY:
            tally.unexpected_results += 1
        elif answer.result == _APPROVED:
            tally.approved += 1
        else:
            tally.declined += 1
        if request.card_uid in self.known_balance:
            self.known_balance[request.card_uid] = answer.balance_cents

    def note_first_loss(self, cycle: int, what: str, request: Request, seen: object) -> None:
        if self.tally.first_loss is None:
            self.tally.first_loss = {
                "cycle": cycle,
                "what": what,
                "terminal_id": request.terminal_id,
                "terminal_seq": request.seq,
                "answer": list(request.answer) if request.answer is not None else None,
                "seen": seen,
            }

    # --- one terminal in one cycle ----------------------------------------------------------

    async def drive(self, terminal: Terminal, client: TerminalClient, cycle: Cycle, deadline: float | None) -> None:
        """Retry the unknowns, re-send a sample, then (if the cycle has load) new requests."""
        unknowns = list(terminal.unknown.values())
        answers = await asyncio.gather(*(self.until_final(client, request, deadline) for request in unknowns))
        for request, answer in zip(unknowns, answers, strict=True):
            self.settle(terminal, request, answer, cycle)
        if terminal.unknown:
            return  # the connection died: new requests wait until every unknown is resolved
        if terminal.verified:
            sample = [terminal.rng.choice(terminal.verified) for _ in range(RESENDS_PER_TERMINAL)]
            answers = await asyncio.gather(*(self.until_final(client, request, deadline) for request in sample))
            for request, answer in zip(sample, answers, strict=True):
                self.settle(terminal, request, answer, cycle)
        if cycle.new_load:
            lanes = KIOSK_PIPELINE if terminal.is_kiosk else self.args.pipeline
            await asyncio.gather(*(self.lane(terminal, client, cycle) for _ in range(lanes)))

    async def lane(self, terminal: Terminal, client: TerminalClient, cycle: Cycle) -> None:
        """One of the terminal's pipelined request streams, until the engine dies."""
        while not cycle.killed:
            request = self.new_request(terminal, cycle.number)
            answer = await self.until_final(client, request)
            self.settle(terminal, request, answer, cycle)
            if answer is None:
                return
            if answer.result == _APPROVED:
                cycle.approved()

    # --- cycles ------------------------------------------------------------------------------

    async def run_cycle(self, number: int, plan: KillPlan | None) -> Cycle:
        """Start the engine, run the terminals, and kill it (or, without a plan,
        resolve what is unknown and stop it with SIGTERM)."""
        engine = await start_engine(self.dsn, self.data_dir, self.log_path, unsafe=self.args.unsafe)
        cycle = Cycle(self, number, engine, plan)
        clients: list[TerminalClient] = []
        killer: asyncio.Task[None] | None = None
        try:
            opened = await asyncio.gather(*(self.connect(t, engine) for t in self.terminals), return_exceptions=True)
            clients = [client for client in opened if isinstance(client, TerminalClient)]
            errors = [error for error in opened if not isinstance(error, TerminalClient)]
            if errors:
                # The engine listened, then refused or dropped a session: it is broken.
                self.tally.engine_failures += 1
                self.tally.failure_logs.append(f"cycle {number}: cannot connect: {errors[0]!r}\n{engine.log_tail()}")
                cycle.kill("after_failure")
                return cycle
            if plan is not None:
                killer = asyncio.create_task(cycle.kill_on_timer())
            deadline = None if plan is not None else time.monotonic() + FINAL_RESOLVE_S
            cycle.load_started.set()
            await asyncio.gather(
                *(self.drive(t, c, cycle, deadline) for t, c in zip(self.terminals, clients, strict=True))
            )
            if plan is not None and not cycle.killed:
                # Every lane ended without a kill: the engine died by itself.
                self.tally.engine_failures += 1
                self.tally.failure_logs.append(f"cycle {number}: load ended before the kill\n{engine.log_tail()}")
                cycle.kill("after_failure")
        finally:
            if killer is not None:
                killer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await killer
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.close()
            if plan is not None or cycle.killed:
                cycle.kill("cleanup")
                await engine.process.wait()
        if plan is None:
            code = await stop_engine(engine)
            if code != 0:
                self.tally.engine_failures += 1
                self.tally.failure_logs.append(f"final stop: exit code {code}\n{engine.log_tail()}")
        elif engine.process.returncode != -signal.SIGKILL:
            self.tally.engine_failures += 1
            self.tally.failure_logs.append(
                f"cycle {number}: engine exited with {engine.process.returncode}\n{engine.log_tail()}"
            )
        return cycle

    async def connect(self, terminal: Terminal, engine: EngineRun) -> TerminalClient:
        return await TerminalClient.connect(
            "127.0.0.1", engine.port, terminal_id=terminal.terminal_id, key=terminal.key, timeout=CONNECT_TIMEOUT_S
        )

    async def check_after_crash(self, conn: asyncpg.Connection, cycle: Cycle) -> None:
        """With the engine dead: every answer of the cycle must match its record,
        and each new unknown is either recorded (killed between commit and
        reply) or not (killed before its commit finished)."""
        await wait_for_orphan_sessions(conn)
        requests = cycle.answered + cycle.left_unknown
        rows = await records(conn, [r.key for r in requests])
        for request in cycle.left_unknown:
            if request.answer is None:
                if request.key in rows:
                    self.tally.unknown_committed += 1
                else:
                    self.tally.unknown_uncommitted += 1
        for request in cycle.answered:
            self.verify(request, rows.get(request.key), cycle.number)
            if not request.verified:
                request.verified = True
                if request.key not in self.tally.lost_keys and request.key not in self.tally.declines_lost_keys:
                    self.terminals_by_id[request.terminal_id].verified.append(request)

    def verify(self, request: Request, row: asyncpg.Record | None, cycle: int) -> None:
        """Compare one acknowledged answer with its record."""
        answer = request.answer
        assert answer is not None
        if answer.result >= _BUSY:
            return
        matches = (
            row is not None
            and row["result"] == answer.result
            and row["amount_cents"] == answer.amount_cents
            and row["balance_cents"] == answer.balance_cents
            and row["info"] == answer.info
        )
        if matches:
            return
        seen = None if row is None else [row["result"], row["amount_cents"], row["balance_cents"], row["info"]]
        if answer.result == _APPROVED:
            self.tally.lost_keys.add(request.key)
            self.note_first_loss(cycle, "acknowledged approval missing or different", request, seen)
        else:
            self.tally.declines_lost_keys.add(request.key)
            self.note_first_loss(cycle, "acknowledged decline missing or different", request, seen)

    async def run(self, conn: asyncpg.Connection) -> dict[str, object]:
        """Every cycle, the final restart, the checker: the report's figures."""
        cycles_run = 0
        for number in range(1, self.args.cycles + 1):
            plan = KillPlan.draw(self.kill_rng)
            cycle = await self.run_cycle(number, plan)
            cycles_run = number
            await self.check_after_crash(conn, cycle)
            if self.args.stop_at_first_loss and self.tally.lost_keys:
                break
        final = await self.run_cycle(cycles_run + 1, None)
        await self.check_after_crash(conn, final)
        audit = await audit_database(conn, self)
        return {"cycles": cycles_run, **audit}


async def wait_for_orphan_sessions(conn: asyncpg.Connection) -> None:
    """Wait until the killed engine's database sessions have ended, so that a
    commit it had in flight is either durable or rolled back."""
    deadline = time.monotonic() + ORPHAN_SESSIONS_TIMEOUT_S
    while await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid() AND application_name LIKE $1",
        ENGINE_APPLICATION_NAME_PATTERN,
    ):
        if time.monotonic() > deadline:
            raise HarnessError(f"the killed engine's database sessions still exist after {ORPHAN_SESSIONS_TIMEOUT_S} s")
        await asyncio.sleep(ORPHAN_POLL_S)


async def records(conn: asyncpg.Connection, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], asyncpg.Record]:
    """The tap records of ``keys``, by key."""
    keys = list(keys)
    if not keys:
        return {}
    rows = await conn.fetch(
        "SELECT t.terminal_id, t.terminal_seq, t.result, t.amount_cents, t.balance_cents, t.info"
        " FROM taps t JOIN unnest($1::int4[], $2::int8[]) AS k(terminal_id, terminal_seq)"
        " USING (terminal_id, terminal_seq)",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(row["terminal_id"], row["terminal_seq"]): row for row in rows}


# --- the checker -------------------------------------------------------------------------------


async def audit_database(conn: asyncpg.Connection, harness: Harness) -> dict[str, object]:
    """The bank test over the final database."""
    tally = harness.tally
    rows = await conn.fetch(
        "SELECT terminal_id, terminal_seq, kind, card_uid, card_counter, tap_flags, requested_cents,"
        " (extract(epoch FROM event_time) * 1000)::int8 AS event_ms,"
        " result, amount_cents, balance_cents, info, account_id FROM taps"
    )
    # Every answer against the final record too (a record could change later).
    by_key = {(row["terminal_id"], row["terminal_seq"]): row for row in rows}
    for request in harness.requests.values():
        if request.answer is not None:
            harness.verify(request, by_key.get(request.key), cycle=-1)
    phantom = 0
    for key, row in by_key.items():
        sent = harness.requests.get(key)
        if sent is None or (
            row["kind"],
            row["card_uid"],
            row["card_counter"],
            row["tap_flags"],
            row["requested_cents"],
            row["event_ms"],
        ) != (
            sent.kind,
            sent.card_uid,
            sent.card_counter,
            sent.tap_flags,
            sent.amount_cents,
            sent.event_time_ms,
        ):
            phantom += 1
    duplicate_keys = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM taps GROUP BY terminal_id, terminal_seq HAVING count(*) > 1) d"
    )
    # What each account should hold: its opening balance plus each recorded
    # effect once.
    expected: dict[int, int] = {card.account_id: card.opening_cents for card in harness.cards}
    opening_total = sum(expected.values())
    fares = topups = 0
    for row in rows:
        if row["result"] != _APPROVED or not row["amount_cents"]:
            continue
        amount = row["amount_cents"]
        account = row["account_id"]
        if row["kind"] == OperationKind.TOPUP:
            topups += amount
            expected[account] = expected.get(account, 0) + amount
        else:
            fares += amount
            expected[account] = expected.get(account, 0) - amount
    expected[FUNDING_ACCOUNT] = -(opening_total + topups)
    expected[BUS_REVENUE_ACCOUNT] = fares
    expected[KIOSK_REVENUE_ACCOUNT] = 0
    accounts = await conn.fetch(
        "SELECT a.id, a.kind, a.balance_cents, a.floor_cents,"
        " coalesce((SELECT sum(e.amount_cents) FROM ledger_entries e WHERE e.account_id = a.id), 0)::int8 AS ledger"
        " FROM accounts a"
    )
    accounts_off_records = sum(1 for a in accounts if a["balance_cents"] != expected.get(a["id"], 0))
    accounts_off_ledger = sum(1 for a in accounts if a["balance_cents"] != a["ledger"])
    below_floor = sum(1 for a in accounts if a["balance_cents"] < a["floor_cents"])
    card_total = sum(a["balance_cents"] for a in accounts if a["kind"] == 0)
    revenue_total = sum(a["balance_cents"] for a in accounts if a["kind"] == 1)
    all_total = sum(a["balance_cents"] for a in accounts)
    ledger_total = await conn.fetchval("SELECT coalesce(sum(amount_cents), 0)::int8 FROM ledger_entries")
    batch_rows = await conn.fetchval("SELECT coalesce(sum(taps), 0)::int8 FROM batches")
    conserved = all_total == 0 and ledger_total == 0 and card_total + revenue_total == opening_total + topups
    unresolved = sum(1 for request in harness.requests.values() if request.answer is None)
    lost = len(tally.lost_keys)
    duplicated = int(duplicate_keys) + accounts_off_records
    return {
        "acknowledged": tally.acknowledged,
        "lost": lost,
        "duplicated": duplicated,
        "below_floor": below_floor,
        "conserved": conserved,
        "unresolved": unresolved,
        "mismatched_retries": tally.mismatched_retries,
        "declines_lost": len(tally.declines_lost_keys),
        "accounts_off_ledger": accounts_off_ledger,
        "phantom": phantom,
        "batch_rows_off": int(batch_rows) - len(rows),
        "money": {
            "opening_cards_cents": opening_total,
            "topups_cents": topups,
            "fares_cents": fares,
            "cards_cents": card_total,
            "revenue_cents": revenue_total,
            "all_accounts_cents": all_total,
            "ledger_cents": int(ledger_total),
        },
        "records": len(rows),
    }


# --- the command -------------------------------------------------------------------------------


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
        "timeouts",
        "engine_failures",
    )
    return report["conserved"] is True and all(report[name] == 0 for name in zeros)


async def run_harness(args: argparse.Namespace, dsn: str, data_dir: Path) -> dict[str, object]:
    harness = Harness(args, dsn, data_dir)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": CHECKER_APPLICATION_NAME})
    try:
        await create_city(conn, harness.cards, args.terminals)
        postgres_version = str(await conn.fetchval("SHOW server_version"))
        postgres_settings = {name: str(await conn.fetchval(f"SHOW {name}")) for name in ("fsync", "synchronous_commit")}
        started = time.perf_counter()
        figures = await harness.run(conn)
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
    tally = harness.tally
    cycles = int(figures["cycles"])  # type: ignore[call-overload]
    report: dict[str, object] = {"benchmark": "crash", **figures}
    report.update(
        {
            "requests": tally.requests,
            "approved": tally.approved,
            "declined": tally.declined,
            "unknown": tally.unknown,
            "unknown_committed": tally.unknown_committed,
            "unknown_uncommitted": tally.unknown_uncommitted,
            "resolved": tally.resolved,
            "resends": tally.resends,
            "busy_retries": tally.busy_retries,
            "unexpected_results": tally.unexpected_results,
            "timeouts": tally.timeouts,
            "engine_failures": tally.engine_failures,
            "kills": tally.kills,
            "kill_modes": dict(tally.kill_modes),
            "results": dict(tally.results),
            "first_loss": tally.first_loss,
            "seconds": round(seconds, 1),
            "seconds_per_cycle": round(seconds / max(cycles, 1), 3),
        }
    )
    if tally.failure_logs:
        report["failure_logs"] = tally.failure_logs[:5]
    report["passed"] = passed(report)
    report["versions"] = describe_versions(postgres_version)
    report["settings"] = {
        "cycles_asked": args.cycles,
        "terminals": args.terminals,
        "kiosks": 1,
        "pipeline": args.pipeline,
        "kiosk_pipeline": KIOSK_PIPELINE,
        "seed": args.seed,
        "unsafe": args.unsafe,
        "stop_at_first_loss": args.stop_at_first_loss,
        "cards": CARDS,
        "kill": f"SIGKILL; half the cycles 0-{int(KILL_DELAY_MAX_S * 1000)} ms after the load starts,"
        f" half right after the k-th approval (k in 1..{KILL_AFTER_APPROVALS_MAX})",
        "resends_per_terminal": RESENDS_PER_TERMINAL,
        "database": "external (--dsn)" if args.dsn else "embedded PostgreSQL in a temporary directory",
        "postgres": postgres_settings,
        "engine": "citycard serve subprocess, --metrics off, --log-level WARNING"
        + (", --unsafe-answer-before-commit" if args.unsafe else ""),
    }
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crash", description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=DEFAULT_CYCLES, help="engine runs ended by SIGKILL")
    parser.add_argument("--terminals", type=int, default=DEFAULT_TERMINALS, help="bus validators (plus one kiosk)")
    parser.add_argument("--pipeline", type=int, default=DEFAULT_PIPELINE, help="requests in flight per terminal")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the city, the load and the kills")
    parser.add_argument("--dsn", help="an empty database to use instead of an embedded server in a temporary directory")
    parser.add_argument("--data-dir", type=Path, help="data directory (master key, engine log, embedded server); kept")
    parser.add_argument("--unsafe", action="store_true", help="negative control: the engine answers before commit")
    parser.add_argument("--stop-at-first-loss", action="store_true", help="end the cycles once a loss is seen")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.terminals < 1 or args.pipeline < 1:
        parser.error("--cycles, --terminals and --pipeline must be at least 1")
    return run_in_data_dir(args, "crash", run_harness, print_summary)


HarnessRun = Callable[[argparse.Namespace, str, Path], Coroutine[object, object, dict[str, object]]]


def run_in_data_dir(
    args: argparse.Namespace,
    name: str,
    harness: HarnessRun,
    summary: Callable[[dict[str, object]], None],
) -> int:
    """The main of a fault harness: a data directory (temporary unless
    ``--data-dir``), the database (embedded unless ``--dsn``), the harness,
    then the report as JSON or a summary. Exit 0 only if the checker passed."""
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix=f"citycard-{name}-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    try:
        with resolve_database(args.dsn, data_dir) as database:
            report = uvloop.run(harness(args, database.dsn, data_dir))
    except HarnessError as error:
        print(f"benchmarks.{name}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    report["machine"] = machine
    if args.json:
        print_json(report)
    else:
        summary(report)
    return 0 if report["passed"] else 1


def print_summary(report: dict[str, object]) -> None:
    print(
        f"{report['cycles']} cycles, {report['kills']} kills, {report['requests']:,} requests"
        f" ({report['acknowledged']:,} acknowledged, {report['unknown']:,} unknown at a kill:"
        f" {report['unknown_committed']} committed, {report['unknown_uncommitted']} not) in {report['seconds']} s"
    )
    print(
        f"lost {report['lost']}, duplicated {report['duplicated']}, below floor {report['below_floor']},"
        f" conserved {report['conserved']}, unresolved {report['unresolved']},"
        f" mismatched retries {report['mismatched_retries']} of {report['resends']} re-sends"
    )
    if report["passed"]:
        print("PASSED")
        return
    print(
        f"FAILED: first problem {report['first_loss']}; engine failures {report['engine_failures']},"
        f" timeouts {report['timeouts']}, unexpected results {report['unexpected_results']},"
        f" phantom records {report['phantom']}"
    )
    for log in report.get("failure_logs", []):  # type: ignore[attr-defined]
        print(log)


if __name__ == "__main__":
    raise SystemExit(main())
