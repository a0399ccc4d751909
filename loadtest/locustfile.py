"""Locust users that are city terminals speaking the binary protocol.

Each user is one terminal of the seeded city: it authenticates with that
terminal's key, keeps its own strictly increasing ``terminal_seq``, and
sends taps (validators and kiosks), top-ups (kiosks), a few reversals and a
few retries of answered requests, paced so that the whole run follows the
city's traffic mix (``loadtest.city``). Every request fires a locust request
event: type ``TAP``/``TOPUP``/``REVERSAL``/``RETRY``/``CONNECT``, name the
service code (``bus``, ``pools``, ``kiosks``...).

A decline is a correct answer and counts as a success; its result is
counted in ``loadtest.outcomes``. Failures are what a terminal must not see:
ERROR frames, lost connections, timeouts, BUSY_RETRY after every retry,
SEQUENCE_REUSED or PROTOCOL_ERROR (this suite never reuses a sequence), a
reply for another sequence, or a retry answered differently from the
original.

Run it (see loadtest/README.md for shapes and distributed runs)::

    locust -f loadtest/locustfile.py --host tcp://127.0.0.1:7700 --data-dir var
"""

from __future__ import annotations

import collections
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from gevent.lock import BoundedSemaphore
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser

from engine import fastpath
from engine.blocking_client import BlockingTerminalClient
from engine.client import AuthenticationError, ConnectionLost, EngineError, TapResult
from engine.codes import ResultCode
from engine.db import DATA_DIR_ENV, DSN_ENV, default_data_dir
from engine.keys import MasterKeyError, derive_terminal_key, load_master_key
from engine.tls import client_context
from loadtest import outcomes
from loadtest.city import (
    DEFAULT_CARD_SAMPLE,
    CardPicker,
    CityPlan,
    PlanError,
    Terminal,
    class_of_slot,
    class_rate,
    is_kiosk,
    load_plan,
    terminal_order,
    unknown_uid,
)
from loadtest.shapes import SHAPES, CityShape

__all__ = ["CityShape", "TerminalUser"]

log = logging.getLogger("citycard.loadtest")

DEFAULT_PORT = 7700

# A BUSY_RETRY answer means "not decided, retry the same request later". The
# terminal waits 10 ms, doubling, over six attempts (~0.6 s in all): longer
# than any writer backlog the engine admits, so exhausting them is a failure.
BUSY_RETRIES_MAX = 6
BUSY_BACKOFF_FIRST_S = 0.01

# After a lost connection the terminal reconnects with backoff (docs/protocol.md:
# 100 ms doubling to 10 s).
RECONNECT_BACKOFF_FIRST_S = 0.1
RECONNECT_BACKOFF_MAX_S = 10.0

# A pacing debt older than this is forgotten: a terminal that fell behind
# (slow engine) resumes its rate instead of bursting to catch up.
PACING_SLACK_S = 1.0

# Top-up amounts at kiosks (cents) and how often each is chosen.
TOPUP_AMOUNTS_CENTS = (500, 1000, 2000, 5000)
TOPUP_AMOUNT_WEIGHTS = (2, 4, 3, 1)
# Share of kiosk requests that are top-ups; the rest are identification taps.
KIOSK_TOPUP_SHARE = 0.6
# A card seen at or below this balance goes to the kiosks' queue of cards to
# top up: holders go to a kiosk when their card runs low.
LOW_BALANCE_CENTS = 300
LOW_BALANCE_QUEUE_MAX = 1000
# Share of top-ups that serve a card from that queue (the rest: any card).
TOPUP_FROM_QUEUE_SHARE = 0.7

# A retry over a new connection instead of the same one, one time in four.
RETRY_RECONNECT_SHARE = 0.25

# Bytes of a TAP_RESULT frame, reported as locust's response length.
TAP_RESULT_BYTES = len(fastpath.encode_tap_result(1, 0, 0, 0, 0))


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    # On locust's own parser, not an argument group: only it knows is_secret.
    # The options show in the web UI's form, and the master sends them to workers.
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV) or str(default_data_dir()),
        help=f"the engine's data dir: master key, embedded database (default ${DATA_DIR_ENV} or ./var)",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get(DSN_ENV) or "",
        is_secret=True,
        help=f"database to read the city from (default ${DSN_ENV}, else the embedded one in --data-dir)",
    )
    parser.add_argument("--shape", choices=SHAPES, default="soak", help="load shape: soak, day or spike")
    parser.add_argument(
        "--rate", type=float, default=5.0, help="requests a second per terminal, on average (0: as fast as answered)"
    )
    parser.add_argument("--cards", type=int, default=DEFAULT_CARD_SAMPLE, help="cards sampled from the city")
    parser.add_argument("--card-skew", type=float, default=0.8, help="Zipf exponent of card popularity")
    parser.add_argument("--bad-card-permille", type=int, default=10, help="taps with unknown or blocked cards")
    parser.add_argument("--retry-permille", type=int, default=20, help="answered requests sent again")
    parser.add_argument("--reversal-permille", type=int, default=5, help="approved fares reversed")
    parser.add_argument("--tap-timeout", type=float, default=5.0, help="seconds to wait for an answer")
    parser.add_argument("--tls-ca", default="", help="connect over TLS, trusting this CA (PEM); empty: plain TCP")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the card sample and the choices")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    outcomes.install(environment)


class BusyExhausted(Exception):
    """BUSY_RETRY after every retry."""


class WrongAnswer(Exception):
    """An answer no correct engine gives this request."""


class NoTerminal(Exception):
    """More users than the city has terminals of a class (per worker)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request, kept whole so it can be sent again with the same content."""

    operation: str  # TAP, TOPUP or REVERSAL
    terminal_seq: int
    card_uid: int
    amount_cents: int  # TOPUP only
    original_seq: int  # REVERSAL only
    card_counter: int
    event_time_ms: int
    service_class: str


class _Process:
    """What the users of one locust process share: the city, terminal slots,
    the kiosks' queue of cards to top up."""

    def __init__(self) -> None:
        self.lock = BoundedSemaphore()
        self.plan: CityPlan | None = None
        self.cards: CardPicker | None = None
        self.orders: dict[str, list[Terminal]] = {}
        self.slots: set[int] = set()
        self.users_by_class: collections.Counter[str] = collections.Counter()
        self.low_balance: collections.deque[int] = collections.deque(maxlen=LOW_BALANCE_QUEUE_MAX)
        self.master_key: bytes | None = None
        self.error: MasterKeyError | PlanError | None = None

    def ensure_city(self, options: Any) -> CityPlan:
        """Read the city once per process (the first user waits, the others wait for it)."""
        with self.lock:
            if self.error is not None:
                raise self.error
            if self.plan is None:
                data_dir = Path(options.data_dir)
                try:
                    self.master_key = load_master_key(data_dir, create=False)
                    self.plan = load_plan(options.dsn or None, data_dir, options.cards, options.seed)
                except (MasterKeyError, PlanError) as error:
                    self.error = error
                    raise
                # Holders who pay for services keep a balance; the quarter of
                # seeded cards that hold nothing come last in popularity.
                by_use = sorted(self.plan.cards, key=lambda card: card.balance_cents == 0)
                self.cards = CardPicker(by_use, options.card_skew)
                log.info(
                    "city: %d terminals, %d cards sampled, %d inactive",
                    len(self.plan.terminals),
                    len(self.plan.cards),
                    len(self.plan.inactive_uids),
                )
            return self.plan

    def take_terminal(self, environment: Environment) -> tuple[int, str, Terminal]:
        """The lowest free slot of this process and its terminal.

        In a distributed run worker w of W takes the class's terminals
        w, w + W, w + 2W...: no two users anywhere share a terminal.
        """
        plan = self.plan
        assert plan is not None
        workers, worker = _worker_position(environment)
        slot = next(slot for slot in range(len(self.slots) + 1) if slot not in self.slots)
        service_class, rank = class_of_slot(slot)
        if service_class not in self.orders:
            self.orders[service_class] = terminal_order(plan, service_class)
        order = self.orders[service_class]
        index = rank * workers + worker
        if index >= len(order):
            raise NoTerminal(
                f"no {service_class} terminal left for user slot {slot} (worker {worker} of {workers}):"
                f" the city has {len(order)}; run fewer users"
            )
        self.slots.add(slot)
        self.users_by_class[service_class] += 1
        return slot, service_class, order[index]

    def release(self, slot: int, service_class: str) -> None:
        self.slots.discard(slot)
        self.users_by_class[service_class] -= 1


_process = _Process()


def _worker_position(environment: Environment) -> tuple[int, int]:
    """(workers, this worker's index); (1, 0) in a local run."""
    runner = environment.runner
    options = environment.parsed_options
    if options is None or not options.worker or runner is None:
        return 1, 0
    workers = int(getattr(options, "expect_workers", 1) or 1)
    worker = int(getattr(runner, "worker_index", 0))
    if not 0 <= worker < workers:
        raise NoTerminal(f"worker index {worker} is not below --expect-workers {workers}: terminals would be shared")
    return workers, worker


def _engine_address(host: str | None) -> tuple[str, int]:
    """``tcp://127.0.0.1:7700`` or ``127.0.0.1:7700`` -> (host, port)."""
    text = (host or "").strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    name, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", DEFAULT_PORT
    if not port.isdigit():
        raise ValueError(f"--host must be tcp://HOST:PORT or HOST:PORT, got {host!r}")
    return name.strip("[]") or "127.0.0.1", int(port)


class TerminalUser(User):
    """One terminal of the city (see the module doc)."""

    host = f"tcp://127.0.0.1:{DEFAULT_PORT}"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.options: Any = environment.parsed_options
        self.client: BlockingTerminalClient | None = None
        self.slot = -1
        self.service_class = ""
        self.terminal: Terminal | None = None
        self.key = b""
        self.rng = random.Random()
        self.next_seq = time.time_ns() // 1000  # never below a previous run's sequences
        self.unanswered: Request | None = None  # lost with its connection: to be retried
        self.reconnect_backoff_s = RECONNECT_BACKOFF_FIRST_S
        self.due = time.monotonic()

    # --- life cycle ---------------------------------------------------------------

    def on_start(self) -> None:
        try:
            _process.ensure_city(self.options)
            self.slot, self.service_class, self.terminal = _process.take_terminal(self.environment)
        except (MasterKeyError, PlanError, NoTerminal) as error:
            # A run that cannot start must not look like a quiet one: one
            # failure per user, then the user stops.
            self.environment.events.request.fire(
                request_type="CONNECT", name="(setup)", response_time=0.0, response_length=0, exception=error
            )
            raise StopUser(str(error)) from None
        assert _process.master_key is not None
        self.key = derive_terminal_key(_process.master_key, self.terminal.id, self.terminal.key_version)
        self.rng = random.Random(self.options.seed * 1_000_003 + self.terminal.id)
        self.due = time.monotonic()

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.slot >= 0:
            _process.release(self.slot, self.service_class)
            self.slot = -1

    def wait_time(self) -> float:
        """Poisson arrivals at this terminal's share of the process's rate
        (none with ``--rate 0``: each terminal sends as fast as it is answered)."""
        if self.options.rate <= 0:
            return 0.0
        rate = class_rate(self.service_class, dict(_process.users_by_class), self.options.rate)
        now = time.monotonic()
        self.due = max(self.due, now - PACING_SLACK_S) + self.rng.expovariate(rate)
        return max(0.0, self.due - now)

    # --- the work -------------------------------------------------------------------

    @task
    def work(self) -> None:
        if not self._connected():
            return
        if self.unanswered is not None:
            request, self.unanswered = self.unanswered, None
            self._send("RETRY", request)
            return
        request = self._next_request()
        result = self._send(request.operation, request)
        if result is None:
            return
        if self.rng.random() * 1000 < self.options.retry_permille:
            self._retry(request, result)
        if (
            request.operation == "TAP"
            and result.result == ResultCode.APPROVED
            and result.amount_cents > 0
            and self.rng.random() * 1000 < self.options.reversal_permille
        ):
            self._send("REVERSAL", self._reversal_of(request))

    def _next_request(self) -> Request:
        assert self.terminal is not None and _process.cards is not None and _process.plan is not None
        operation, amount = "TAP", 0
        if is_kiosk(self.terminal) and self.rng.random() < KIOSK_TOPUP_SHARE:
            operation = "TOPUP"
            amount = self.rng.choices(TOPUP_AMOUNTS_CENTS, TOPUP_AMOUNT_WEIGHTS)[0]
        uid = _process.cards.draw(self.rng).uid
        if operation == "TOPUP" and _process.low_balance and self.rng.random() < TOPUP_FROM_QUEUE_SHARE:
            uid = _process.low_balance.popleft()
        elif self.rng.random() * 1000 < self.options.bad_card_permille:
            inactive = _process.plan.inactive_uids
            uid = self.rng.choice(inactive) if inactive and self.rng.random() < 0.5 else unknown_uid(self.rng)
        return Request(
            operation,
            self._take_seq(),
            uid,
            amount,
            0,
            self.rng.getrandbits(16),
            time.time_ns() // 1_000_000,
            self.service_class,
        )

    def _reversal_of(self, original: Request) -> Request:
        return Request(
            "REVERSAL",
            self._take_seq(),
            0,
            0,
            original.terminal_seq,
            0,
            time.time_ns() // 1_000_000,
            self.service_class,
        )

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _retry(self, request: Request, first: TapResult) -> None:
        """Send an answered request again: the engine must give the same answer."""
        if self.rng.random() < RETRY_RECONNECT_SHARE:
            self._disconnect()
            if not self._connected():
                return
        self._send("RETRY", request, expected=first)

    # --- one request, with its BUSY_RETRY loop and its locust event ------------------------

    def _send(self, request_type: str, request: Request, expected: TapResult | None = None) -> TapResult | None:
        assert self.terminal is not None
        started = time.perf_counter()
        result: TapResult | None = None
        error: Exception | None = None
        try:
            result = self._exchange(request)
            error = _check(request, result, expected)
        except (ConnectionLost, EngineError, fastpath.ProtocolError) as lost:
            # The answer may have been decided: retry it with the same sequence.
            self.unanswered = request
            self._disconnect()
            error = lost
        except BusyExhausted as busy:
            error = busy
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        name = self.terminal.service_code
        if result is not None:
            outcomes.record(request.service_class, request_type, result.result.name)
            self._note_balance(request, result)
        else:
            outcomes.record(request.service_class, request_type, type(error).__name__)
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=elapsed_ms,
            response_length=TAP_RESULT_BYTES if result is not None else 0,
            exception=error,
            context={"terminal": self.terminal.id, "seq": request.terminal_seq},
        )
        return result if error is None else None

    def _exchange(self, request: Request) -> TapResult:
        backoff_s = BUSY_BACKOFF_FIRST_S
        for _ in range(BUSY_RETRIES_MAX + 1):
            result = self._once(request)
            if result.result != ResultCode.BUSY_RETRY:
                return result
            gevent.sleep(backoff_s)
            backoff_s *= 2
        raise BusyExhausted(f"BUSY_RETRY {BUSY_RETRIES_MAX + 1} times in a row")

    def _once(self, request: Request) -> TapResult:
        client = self.client
        if client is None:
            raise ConnectionLost("not connected")
        if request.operation == "TAP":
            return client.tap(
                request.terminal_seq,
                request.card_uid,
                card_counter=request.card_counter,
                event_time_ms=request.event_time_ms,
            )
        if request.operation == "TOPUP":
            return client.topup(
                request.terminal_seq, request.card_uid, request.amount_cents, event_time_ms=request.event_time_ms
            )
        return client.reversal(request.terminal_seq, request.original_seq, event_time_ms=request.event_time_ms)

    def _note_balance(self, request: Request, result: TapResult) -> None:
        if request.operation != "TAP":
            return
        low = result.result == ResultCode.INSUFFICIENT_FUNDS or (
            result.result == ResultCode.APPROVED and result.balance_cents <= LOW_BALANCE_CENTS
        )
        if low:
            _process.low_balance.append(request.card_uid)

    # --- the connection --------------------------------------------------------------------

    def _connected(self) -> bool:
        """Connect (with the protocol's backoff after a failure); False if not connected."""
        if self.client is not None:
            return True
        assert self.terminal is not None
        host, port = _engine_address(self.host)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.client = BlockingTerminalClient(
                host,
                port,
                terminal_id=self.terminal.id,
                key=self.key,
                key_version=self.terminal.key_version,
                timeout=self.options.tap_timeout,
                tls=client_context(self.options.tls_ca) if self.options.tls_ca else None,
            )
        except (OSError, ConnectionLost, EngineError, AuthenticationError, fastpath.ProtocolError) as failure:
            error = failure
        self.environment.events.request.fire(
            request_type="CONNECT",
            name=self.terminal.service_code,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=0,
            exception=error,
            context={"terminal": self.terminal.id},
        )
        if error is not None:
            gevent.sleep(self.reconnect_backoff_s * (0.5 + self.rng.random()))
            self.reconnect_backoff_s = min(self.reconnect_backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
            return False
        self.reconnect_backoff_s = RECONNECT_BACKOFF_FIRST_S
        return True

    def _disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _check(request: Request, result: TapResult, expected: TapResult | None) -> Exception | None:
    """None if ``result`` is an answer a correct engine may give ``request``."""
    if result.terminal_seq != request.terminal_seq:
        return WrongAnswer(f"answer for seq {result.terminal_seq}, sent {request.terminal_seq}")
    if result.result in (ResultCode.SEQUENCE_REUSED, ResultCode.PROTOCOL_ERROR):
        return WrongAnswer(f"{result.result.name} for a well-formed request with a fresh sequence")
    if expected is not None and result != expected:
        return WrongAnswer(
            f"retry answered {result.result.name} {result.amount_cents}/{result.balance_cents}"
            f" info 0x{result.info:02x}, first answer {expected.result.name}"
            f" {expected.amount_cents}/{expected.balance_cents} info 0x{expected.info:02x}"
        )
    return None
