"""From a request to its durable answer: exactly once, in memory first.

For every TAP, TOPUP and REVERSAL the processor

1. validates the fields the protocol leaves to the engine (ranges that the
   record can store), answering PROTOCOL_ERROR at once;
2. looks the idempotency key ``(terminal_id, terminal_seq)`` up: a request
   still pending gets the reply of the original when it commits, a recent
   final one gets its stored result at once, the same key with other content
   gets SEQUENCE_REUSED;
3. for a sequence the engine may have recorded before (at or below the
   terminal's highest sequence, e.g. after a restart), reads the record from
   the database instead of deciding again: this is the rare slow path;
4. otherwise decides synchronously with the decision ladder and hands the
   decision to the batch writer, or answers BUSY_RETRY at once when the
   writer has no room or the database is unavailable.

When a batch's outcome is known the processor applies it to the in-memory
balances (or undoes the pending amounts) and answers every waiting terminal.

Taps a terminal decided offline and uploads later (``engine/offline.py``)
share the same idempotency key and the same record: an uploaded tap the
engine holds already (pending, recent, or in the record) gets its recorded
answer; the others are decided there and handed to the writer's offline
queue (``claim``, ``read_records``, ``submit_offline`` below).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine

import asyncpg
import orjson

from engine.codes import CardStatus, OperationKind, ResultCode
from engine.decision import Decision, ReplyTarget, request_fingerprint
from engine.fastpath import CAP_DAY_TOTAL, CAP_GROUPS_MAX, CAP_MONTH_TOTAL, INFO_OFFLINE, NO_CAP, NO_PRODUCT
from engine.ladder import TAP_FLAG_EXIT, TAP_FLAGS_KNOWN, Original, decide_reversal, decide_tap, decide_topup
from engine.limits import (
    DB_COMMAND_TIMEOUT_S,
    LOOKUPS_MAX,
    OFFICE_REFUND_WINDOW_S,
    RECENT_RESULTS_PER_TERMINAL,
    REVERSAL_WINDOW_S,
)
from engine.state import CityState, InvariantError, Terminal, now_ms
from engine.writer import BatchWriter

log = logging.getLogger("citycard.processor")

# Fields the record stores as signed 64-bit integers.
INT64_MAX = (1 << 63) - 1

# Event times the record accepts: 2000-01-01 .. 2100-01-01 UTC. A terminal
# clock outside this range is broken; its taps are refused rather than
# recorded with a time nobody can use.
EVENT_TIME_MIN_MS = 946_684_800_000
EVENT_TIME_MAX_MS = 4_102_444_800_000

_TAP = OperationKind.TAP
_TOPUP = OperationKind.TOPUP
_REVERSAL = OperationKind.REVERSAL
_CARD_NOT_ACTIVE = ResultCode.CARD_NOT_ACTIVE
_CLONE_SUSPECTED = ResultCode.CLONE_SUSPECTED
_TAP = OperationKind.TAP

# A suspected clone blocked by the rules is written down as the card office
# would have: the card's status and an audit row, under this actor.
CLONE_BLOCK_ACTOR = "engine"
_CLONE_BLOCK_SQL = """
WITH blocked AS (
    UPDATE cards SET status = $2 WHERE uid = $1 AND status = $3 RETURNING uid
)
INSERT INTO audit_log (actor, action, subject, detail)
SELECT $4, 'card.block', 'card:' || uid, $5::jsonb FROM blocked
"""

_LOOKUP_SQL = (
    "SELECT kind, card_uid, card_counter, tap_flags, requested_cents, original_seq,"
    " (extract(epoch FROM event_time) * 1000)::int8 AS event_ms,"
    " (extract(epoch FROM recorded_at) * 1000)::int8 AS recorded_ms,"
    " result, amount_cents, balance_cents, info, service_id, account_id, product_id,"
    " original_terminal_id"
    " FROM taps WHERE terminal_id = $1 AND terminal_seq = $2"
)
# The same for many sequences of one terminal (an offline upload), by primary key.
_LOOKUP_MANY_SQL = (
    "SELECT terminal_seq, kind, card_uid, card_counter, tap_flags, requested_cents, original_seq,"
    " (extract(epoch FROM event_time) * 1000)::int8 AS event_ms,"
    " (extract(epoch FROM recorded_at) * 1000)::int8 AS recorded_ms,"
    " result, amount_cents, balance_cents, info, service_id, account_id, product_id,"
    " original_terminal_id"
    " FROM taps WHERE terminal_id = $1 AND terminal_seq = ANY($2::int8[])"
)
# Whichever terminal asked for it (schema: taps_one_reversal).
_REVERSED_SQL = (
    "SELECT EXISTS (SELECT 1 FROM taps WHERE coalesce(original_terminal_id, terminal_id) = $1"
    " AND original_seq = $2 AND kind = 2 AND result = 0)"
)

Fingerprint = tuple[int, int, int, int, int, int, int | None, int]
ResultCounter = Callable[[Decision], None]


class Processor:
    """Decides requests and routes their answers. One per engine."""

    def __init__(self, state: CityState, pool: asyncpg.Pool | None) -> None:
        self.state = state
        self.pool = pool
        self.writer: BatchWriter | None = None
        self._pending: dict[tuple[int, int], Decision] = {}
        # Per terminal, its last final results in the order they were decided.
        # An OrderedDict because the oldest is dropped at every tap: deleting
        # a plain dict's first key leaves a hole that every later
        # next(iter()) walks past until the dict is rebuilt (0.8 us a tap).
        self._recent: dict[int, OrderedDict[int, Decision]] = {}
        self._lookups: dict[tuple[int, int], list[tuple[ReplyTarget, int, Fingerprint]]] = {}
        self._reversing: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies are buffered per target and flushed once per batch or per
        # received chunk, so one write() carries many replies.
        self.dirty: set[ReplyTarget] = set()
        self.on_result: ResultCounter | None = None
        self.on_immediate: Callable[[int], None] | None = None
        self.reversal_window_ms = REVERSAL_WINDOW_S * 1000
        self.office_refund_window_ms = OFFICE_REFUND_WINDOW_S * 1000
        # How card uids appear in logs (engine.logs.CardPseudonyms); the
        # server sets it from the master key.
        self.card_ref: Callable[[int], str] = lambda uid: "card:?"
        # Look-ups that found no idle pool connection and had to wait.
        self.pool_waits = 0
        # Negative control for the fault harness ONLY: answer before the
        # commit, which can lose acknowledged debits on a crash. The harness
        # must show that its checker catches exactly that. Never in service.
        self.unsafe_answer_before_commit = False

    def attach(self, writer: BatchWriter) -> None:
        self.writer = writer

    # --- intake -----------------------------------------------------------

    def submit(
        self,
        target: ReplyTarget,
        request_id: int,
        terminal: Terminal,
        kind: int,
        terminal_seq: int,
        card_uid: int,
        card_counter: int,
        tap_flags: int,
        requested: int,
        original_seq: int | None,
        event_time_ms: int,
        original_terminal: int | None = None,
    ) -> None:
        """Take one request; its answer goes to ``target.deliver_result``.

        A REVERSAL names a request of the same terminal, or of
        ``original_terminal`` (card-office refunds, which have a longer
        window: OFFICE_REFUND_WINDOW_S).
        """
        if (
            terminal_seq > INT64_MAX
            or card_uid > INT64_MAX
            or (original_seq is not None and original_seq > INT64_MAX)
            or tap_flags & ~TAP_FLAGS_KNOWN
            or not EVENT_TIME_MIN_MS <= event_time_ms <= EVENT_TIME_MAX_MS
        ):
            self._answer_now(target, request_id, terminal_seq, ResultCode.PROTOCOL_ERROR)
            return
        key = (terminal.id, terminal_seq)
        decision = Decision(
            terminal.id,
            terminal_seq,
            kind,
            card_uid,
            card_counter,
            tap_flags,
            requested,
            original_seq,
            event_time_ms,
            now_ms(),
            terminal.service_id,
        )
        if terminal_seq > terminal.high_seq and kind != _REVERSAL and key not in self._lookups:
            # A sequence above every one this terminal has had decided or
            # recorded: nothing pending or remembered can hold it (high_seq
            # is raised before a decision is pending, and the record holds
            # none above it), so there is nothing to compare it with. Only
            # the claim of an uploaded offline tap can, in _lookups.
            writer = self.writer
            if writer is None or not writer.has_room():
                self._answer_now(target, request_id, terminal_seq, ResultCode.BUSY_RETRY)
                return
            if kind == _TAP:
                decide_tap(self.state, terminal, decision)
            else:
                decide_topup(self.state, terminal, decision)
            terminal.high_seq = terminal_seq
            decision.waiters.append((target, request_id))
            self._pending[key] = decision
            writer.submit(decision)
            if self.unsafe_answer_before_commit:
                self._answer_unsafely(decision)
            return
        if kind == _REVERSAL and original_terminal is None:
            original_terminal = terminal.id
        fingerprint = request_fingerprint(
            kind,
            card_uid if kind != _REVERSAL else 0,
            card_counter,
            tap_flags,
            requested,
            event_time_ms,
            original_seq,
            original_terminal if original_terminal is not None else -1,
        )
        pending = self._pending.get(key)
        if pending is not None:
            if pending.fingerprint() != fingerprint:
                self._answer_now(target, request_id, terminal_seq, ResultCode.SEQUENCE_REUSED)
            else:
                pending.waiters.append((target, request_id))
            return
        recent = self._recent.get(terminal.id)
        if recent is not None:
            final = recent.get(terminal_seq)
            if final is not None:
                self._answer_final(final, target, request_id, fingerprint)
                return
        waiting = self._lookups.get(key)
        if waiting is not None:
            waiting.append((target, request_id, fingerprint))
            return
        # Slow path: the record may already hold this sequence (a retry after
        # a restart, or an old one), or the decision (a reversal) needs it.
        if len(self._lookups) >= LOOKUPS_MAX:
            self._answer_now(target, request_id, terminal_seq, ResultCode.BUSY_RETRY)
            return
        if original_terminal is not None:
            decision.original_terminal = original_terminal
        self._lookups[key] = [(target, request_id, fingerprint)]
        self._spawn(self._decide_from_record(terminal, decision))

    # --- slow path ----------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_from_record(self, terminal: Terminal, decision: Decision) -> None:
        key = (terminal.id, decision.terminal_seq)
        try:
            recorded = await self._read_record(terminal.id, decision.terminal_seq)
            original: Original | None = None
            already_reversed = False
            original_key = (decision.original_terminal, decision.original_seq or 0)
            if recorded is None and decision.kind == _REVERSAL:
                if original_key in self._pending or original_key in self._reversing:
                    # The original or another reversal of it is not durable
                    # yet: its outcome decides ours.
                    self._finish_lookup(key, None, ResultCode.BUSY_RETRY)
                    return
                original, already_reversed = await self._read_original(*original_key)
        except Exception as error:  # noqa: BLE001 - the database is unavailable in some way
            log.warning("record look-up for terminal %d seq %d failed: %r", terminal.id, decision.terminal_seq, error)
            self._finish_lookup(key, None, ResultCode.BUSY_RETRY)
            return
        if recorded is not None:
            self._remember(recorded)
            self._finish_lookup(key, recorded, None)
            return
        writer = self.writer
        if writer is None or not writer.has_room():
            self._finish_lookup(key, None, ResultCode.BUSY_RETRY)
            return
        if original_key in self._pending or original_key in self._reversing:
            self._finish_lookup(key, None, ResultCode.BUSY_RETRY)
            return
        decision.recorded_ms = now_ms()
        if decision.kind == _TAP:
            decide_tap(self.state, terminal, decision)
        elif decision.kind == _TOPUP:
            decide_topup(self.state, terminal, decision)
        else:
            window_ms = self.reversal_window_ms if original_key[0] == terminal.id else self.office_refund_window_ms
            decide_reversal(self.state, terminal, decision, original, already_reversed, window_ms)
            if decision.result == ResultCode.APPROVED:
                self._reversing.add(original_key)
        terminal.high_seq = max(terminal.high_seq, decision.terminal_seq)
        waiters = self._lookups.pop(key)
        mine = decision.fingerprint()
        for target, request_id, fingerprint in waiters:
            if fingerprint == mine:
                decision.waiters.append((target, request_id))
            else:
                self._answer_now(target, request_id, decision.terminal_seq, ResultCode.SEQUENCE_REUSED)
        self.flush()
        self._pending[key] = decision
        writer.submit(decision)
        if self.unsafe_answer_before_commit:
            self._answer_unsafely(decision)
            self.flush()

    def _answer_unsafely(self, decision: Decision) -> None:
        for target, request_id in decision.waiters:
            target.deliver_result(
                request_id, decision.terminal_seq, decision.result, decision.amount, decision.balance, decision.info
            )
            self.dirty.add(target)
        decision.waiters.clear()

    def _finish_lookup(self, key: tuple[int, int], final: Decision | None, result: int | None) -> None:
        for target, request_id, fingerprint in self._lookups.pop(key, ()):
            if final is not None:
                self._answer_final(final, target, request_id, fingerprint)
            else:
                self._answer_now(target, request_id, key[1], result or ResultCode.BUSY_RETRY)
        self.flush()

    def _pool(self) -> asyncpg.Pool:
        """The look-up pool, counting the uses that find no idle connection
        (they wait for one to be opened or released)."""
        pool = self.pool
        assert pool is not None
        if pool.get_idle_size() == 0:
            self.pool_waits += 1
        return pool

    async def _read_record(self, terminal_id: int, terminal_seq: int) -> Decision | None:
        if self.pool is None:
            return None
        row = await self._pool().fetchrow(_LOOKUP_SQL, terminal_id, terminal_seq)
        if row is None:
            return None
        return _recorded(terminal_id, terminal_seq, row)

    async def _read_original(self, terminal_id: int, original_seq: int) -> tuple[Original | None, bool]:
        if self.pool is None:
            return None, False
        row = await self._pool().fetchrow(_LOOKUP_SQL, terminal_id, original_seq)
        if row is None or row["result"] != ResultCode.APPROVED or row["account_id"] is None:
            return None, False
        original = Original(
            row["kind"],
            row["card_uid"],
            row["amount_cents"],
            row["account_id"],
            row["recorded_ms"],
            row["service_id"],
            row["tap_flags"],
            row["info"],
            row["product_id"] if row["product_id"] is not None else NO_PRODUCT,
        )
        reversed_ = await self._pool().fetchval(_REVERSED_SQL, terminal_id, original_seq)
        return original, bool(reversed_)

    # --- taps decided offline (engine/offline.py) ----------------------------------

    def answer_known(
        self, target: ReplyTarget, index: int, terminal_id: int, terminal_seq: int, fingerprint: Fingerprint
    ) -> bool:
        """Answer an uploaded tap the engine holds in memory: pending (it
        joins the commit), recently decided, or being looked up or decided
        (it joins that). False when the engine does not hold it."""
        key = (terminal_id, terminal_seq)
        pending = self._pending.get(key)
        if pending is not None:
            if pending.fingerprint() != fingerprint:
                self._answer_now(target, index, terminal_seq, ResultCode.SEQUENCE_REUSED)
            else:
                pending.waiters.append((target, index))
            return True
        recent = self._recent.get(terminal_id)
        if recent is not None:
            final = recent.get(terminal_seq)
            if final is not None:
                self._answer_final(final, target, index, fingerprint)
                return True
        waiting = self._lookups.get(key)
        if waiting is not None:
            waiting.append((target, index, fingerprint))
            return True
        return False

    def claim(
        self, terminal_id: int, terminal_seq: int, target: ReplyTarget, index: int, fingerprint: Fingerprint
    ) -> None:
        """Hold an uploaded tap's key while its record is read and it is
        decided: a request for the same key meanwhile waits for its answer."""
        self._lookups[(terminal_id, terminal_seq)] = [(target, index, fingerprint)]

    def release(self, terminal_id: int, terminal_seq: int, result: int) -> None:
        """Answer everyone waiting on a claimed key with a non-decision."""
        self._finish_lookup((terminal_id, terminal_seq), None, result)

    def answer_recorded(self, recorded: Decision) -> None:
        """Answer everyone waiting on a claimed key from its record."""
        self._remember(recorded)
        self._finish_lookup((recorded.terminal_id, recorded.terminal_seq), recorded, None)

    async def read_records(self, terminal_id: int, terminal_seqs: list[int]) -> dict[int, Decision]:
        """The recorded decisions of a terminal's sequences, one query."""
        if self.pool is None or not terminal_seqs:
            return {}
        rows = await self._pool().fetch(_LOOKUP_MANY_SQL, terminal_id, terminal_seqs, timeout=DB_COMMAND_TIMEOUT_S)
        return {row["terminal_seq"]: _recorded(terminal_id, row["terminal_seq"], row) for row in rows}

    def submit_offline(self, terminal: Terminal, decision: Decision) -> None:
        """Hand a decided offline tap (its key claimed) to the writer's offline
        queue; everyone waiting on the key hears its answer at the commit."""
        key = (terminal.id, decision.terminal_seq)
        mine = decision.fingerprint()
        for target, request_id, fingerprint in self._lookups.pop(key, ()):
            if fingerprint == mine:
                decision.waiters.append((target, request_id))
            else:
                self._answer_now(target, request_id, decision.terminal_seq, ResultCode.SEQUENCE_REUSED)
        terminal.high_seq = max(terminal.high_seq, decision.terminal_seq)
        self._pending[key] = decision
        writer = self.writer
        assert writer is not None
        writer.submit_offline(decision)

    # --- answers ---------------------------------------------------------------

    def _answer_final(self, final: Decision, target: ReplyTarget, request_id: int, fingerprint: Fingerprint) -> None:
        if final.fingerprint() != fingerprint:
            self._answer_now(target, request_id, final.terminal_seq, ResultCode.SEQUENCE_REUSED)
            return
        target.deliver_result(request_id, final.terminal_seq, final.result, final.amount, final.balance, final.info)
        self.dirty.add(target)

    def _answer_now(self, target: ReplyTarget, request_id: int, terminal_seq: int, result: int) -> None:
        target.deliver_result(request_id, terminal_seq, result, 0, 0, 0)
        self.dirty.add(target)
        if self.on_immediate is not None:
            self.on_immediate(result)

    def flush(self) -> None:
        """Write out every buffered reply (one write per connection)."""
        dirty = self.dirty
        if dirty:
            for target in dirty:
                flush = getattr(target, "flush", None)
                if flush is not None:
                    flush()
            dirty.clear()

    def _remember(self, decision: Decision) -> None:
        recent = self._recent.get(decision.terminal_id)
        if recent is None:
            recent = self._recent[decision.terminal_id] = OrderedDict()
        recent[decision.terminal_seq] = decision
        if len(recent) > RECENT_RESULTS_PER_TERMINAL:
            recent.popitem(last=False)

    # --- batch outcomes -----------------------------------------------------------

    def batch_done(self, batch: list[Decision], committed: bool) -> None:
        """Called by the writer once a batch's outcome is certain."""
        state = self.state
        balance = state.balance
        floor = state.floor
        debt_limit = state.debt_limit
        pending_debit = state.pending_debit
        pending_credit = state.pending_credit
        pending = self._pending
        dirty = self.dirty
        on_result = self.on_result
        for d in batch:
            pending.pop((d.terminal_id, d.terminal_seq), None)
            offline = d.info & INFO_OFFLINE
            if d.kind == _REVERSAL and d.result == ResultCode.APPROVED:
                self._reversing.discard((d.original_terminal, d.original_seq or 0))
            amount = d.amount if d.result == ResultCode.APPROVED else 0
            card = d.card_account
            if amount:
                card_pays = d.source == card
                if card_pays:
                    pending_debit[card] -= amount
                else:
                    pending_credit[card] -= amount
                if committed:
                    source = d.source
                    balance[source] -= amount
                    balance[d.target] += amount
                    # Below the floor only by offline taps that stand, and
                    # never below the debt limit (the schema's rule too).
                    if balance[source] < floor[source] - debt_limit[source]:
                        raise InvariantError(
                            f"account {state.account_id[source]} below its floor after commit of {d!r}"
                        )
            if committed:
                self._remember(d)
                if on_result is not None:
                    on_result(d)
                # A terminal's own offline decision blocked nothing in the
                # engine, and was no card presented to the engine.
                if d.result == _CLONE_SUSPECTED and state.clone_blocks_card and not offline:
                    self._spawn(self._record_clone_block(d))
                if d.result == _CARD_NOT_ACTIVE and not offline:
                    # A blocked, lost or stolen card presented: worth a line
                    # for the card office, under a pseudonym.
                    log.warning(
                        "inactive card presented",
                        extra={"card": self.card_ref(d.card_uid), "terminal_id": d.terminal_id},
                    )
                for target, request_id in d.waiters:
                    target.deliver_result(request_id, d.terminal_seq, d.result, d.amount, d.balance, d.info)
                    dirty.add(target)
                # Remembered for retries: it must not keep closed sessions alive.
                d.waiters.clear()
            else:
                if offline:
                    self._forget_offline(d)
                elif d.kind == _TAP:
                    self._forget_tap(d)
                elif d.kind == _REVERSAL:
                    self._forget_reversal(d)
                for target, request_id in d.waiters:
                    target.deliver_result(request_id, d.terminal_seq, ResultCode.BUSY_RETRY, 0, 0, 0)
                    dirty.add(target)
                if self.on_immediate is not None:
                    self.on_immediate(ResultCode.BUSY_RETRY)
        self.flush()

    def _forget_tap(self, d: Decision) -> None:
        """Undo what the rules remembered of a tap whose batch failed: the
        terminal retries it with the same card counter (which must not look
        like a clone), and its fare must not count towards a cap."""
        state = self.state
        card = state.card_position.get(d.card_uid)
        activity = state.activity.get(card) if card is not None else None
        if card is None or activity is None:
            return
        if d.card_counter and activity.counter == d.card_counter:
            activity.counter = d.previous_counter
        if d.result == _CLONE_SUSPECTED and state.card_status[card] == CardStatus.BLOCKED:
            state.card_status[card] = CardStatus.ACTIVE  # the clone check blocked it: not recorded
        if d.result == ResultCode.APPROVED and activity.stay_service == d.service_id:
            if activity.stay_ms == d.recorded_ms and not d.tap_flags & TAP_FLAG_EXIT:
                # The entry that opened this stay was not recorded: no stay.
                activity.stay_service, activity.stay_ms, activity.stay_charged = -1, -1, 0
        if d.result == ResultCode.APPROVED and d.stay_ms >= 0:
            # The exit that closed a stay was not recorded: the stay is open again.
            activity.stay_service, activity.stay_ms, activity.stay_charged = d.service_id, d.stay_ms, d.stay_charged
        if d.result == ResultCode.APPROVED and d.amount and d.cap_group != NO_CAP:
            spent = activity.cap_spent
            spent[d.cap_group] -= d.amount
            spent[CAP_GROUPS_MAX + d.cap_group] -= d.amount
        if d.result == ResultCode.APPROVED and activity.last_ms == d.recorded_ms:
            # The passage was not recorded: its retry must not meet it as
            # anti-passback, nor as the other end of a shared card. The one
            # before is not kept, so it is forgotten too (in the holder's favour).
            activity.last_ms, activity.last_terminal, activity.last_service = -1, -1, -1
            if activity.transfer_ms == d.recorded_ms:
                activity.transfer_ms = -1  # the journey it started did not start
        self._forget_rides(d)

    def _forget_offline(self, d: Decision) -> None:
        """An offline tap whose batch failed raised only the card's counter
        (``engine/offline.py``): lower it back, unless a later tap raised it."""
        card = self.state.card_position.get(d.card_uid)
        activity = self.state.activity.get(card) if card is not None else None
        if activity is not None and d.card_counter and activity.counter == d.card_counter:
            activity.counter = d.previous_counter

    def _forget_reversal(self, d: Decision) -> None:
        """Undo what a reversal whose batch failed changed in memory: the
        ride it gave back, the stay it closed, the cap totals it lowered."""
        if d.result != ResultCode.APPROVED:
            return
        self._forget_rides(d)
        state = self.state
        card = state.card_position.get(d.card_uid)
        activity = state.activity.get(card) if card is not None else None
        if activity is None:
            return
        if d.stay_ms >= 0 and activity.stay_service == -1:
            activity.stay_service, activity.stay_ms, activity.stay_charged = d.service_id, d.stay_ms, d.stay_charged
        if d.cap_given_back & CAP_DAY_TOTAL:
            activity.cap_spent[d.cap_group] += d.amount
        if d.cap_given_back & CAP_MONTH_TOTAL:
            activity.cap_spent[CAP_GROUPS_MAX + d.cap_group] += d.amount

    def _forget_rides(self, d: Decision) -> None:
        if d.product_rides and d.result == ResultCode.APPROVED:
            product = self.state.product_by_id.get(d.product_id)
            if product is not None:
                product.rides_used -= d.product_rides

    async def _record_clone_block(self, d: Decision) -> None:
        """Write down the block a suspected clone got in memory."""
        detail = orjson.dumps(
            {"reason": "clone suspected", "terminal_id": d.terminal_id, "terminal_seq": d.terminal_seq}
        ).decode()
        try:
            async with self._pool().acquire() as conn:
                await conn.execute(
                    _CLONE_BLOCK_SQL,
                    d.card_uid,
                    CardStatus.BLOCKED,
                    CardStatus.ACTIVE,
                    CLONE_BLOCK_ACTOR,
                    detail,
                    timeout=DB_COMMAND_TIMEOUT_S,
                )
        except Exception as error:  # noqa: BLE001 - the card stays blocked in memory; logged for the office
            log.error(
                "could not record the block of a suspected clone: %r", error, extra={"card": self.card_ref(d.card_uid)}
            )
            return
        log.warning("suspected clone blocked", extra={"card": self.card_ref(d.card_uid), "terminal_id": d.terminal_id})

    async def drain(self) -> None:
        """Wait for slow-path tasks (used at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _recorded(terminal_id: int, terminal_seq: int, row: asyncpg.Record) -> Decision:
    """A decision as the record holds it (a retry hears it again)."""
    decision = Decision(
        terminal_id,
        terminal_seq,
        row["kind"],
        row["card_uid"],
        row["card_counter"],
        row["tap_flags"],
        row["requested_cents"],
        row["original_seq"],
        row["event_ms"],
        row["recorded_ms"],
        row["service_id"],
    )
    if row["original_terminal_id"] is not None:
        decision.original_terminal = row["original_terminal_id"]
    if row["product_id"] is not None:
        decision.product_id = row["product_id"]
    decision.result = row["result"]
    decision.amount = row["amount_cents"]
    decision.balance = row["balance_cents"]
    # A retry after a restart hears the same reasons as the original.
    decision.info = row["info"]
    return decision
