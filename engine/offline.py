"""Taps a terminal decided while offline, uploaded when its link returns.

A validator without a link keeps letting citizens on: it decides each tap
from its own hot list and the rules version it holds (``engine/sync.py``),
keeps the tap with its sequence number, event time, rules version and its
own decision, and uploads them (OFFLINE_UPLOAD, up to
OFFLINE_TAPS_PER_UPLOAD_MAX a frame) when it can. This module applies them
(docs/offline.md):

1. **Exactly once.** An uploaded tap is identified like any request, by
   ``(terminal, terminal_seq)``, and compared by its content (card, card
   counter, event time, flags). One the engine holds already (pending,
   recently decided, or recorded: one query per upload) gets its recorded
   answer and changes nothing; uploading a batch twice, or batches that
   overlap, applies each tap once.
2. **The engine's own decision.** The tap is decided again by the engine's
   ladder under the rules version the terminal held, at the tap's event
   time, on the card as it is now and without the card's memory of earlier
   taps (their order is not the record's): the tap's ``online_result``.
3. **The tap stands.** The recorded result is the terminal's: an approved
   tap is charged the amount the terminal charged, even when the engine
   would have refused it (a card blocked meanwhile, too little money); the
   balance may then go below its floor, down to the account's debt limit
   (``accounts.debt_limit_cents``), and what the limit does not cover is
   left uncollected (``requested_cents - amount_cents``). A tap the terminal
   refused moves nothing. Either way, a decision that differs from the
   engine's is marked ``TapInfo.OFFLINE_DIFFERS``; every uploaded tap is
   marked ``TapInfo.OFFLINE``.
4. **Online first.** Uploads are decided by one task, OFFLINE_DECIDE_SLICE
   taps per turn of the event loop, and queued apart for the writer, which
   gives them at most OFFLINE_TAPS_PER_BATCH_MAX of each batch.

The answer (OFFLINE_RESULT) lists every tap's recorded result, amount,
balance and info in upload order, once all of them are durable (or known
not to be: BUSY_RETRY, upload again).

>>> uploads = OfflineUploads(state, processor, versions)   # doctest: +SKIP
>>> uploads.start()                                       # doctest: +SKIP
>>> uploads.accept(session, request_id, terminal, taps)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine import fastpath
from engine.codes import OperationKind, ResultCode
from engine.decision import LEDGER_FARE, Decision, request_fingerprint
from engine.ladder import TAP_FLAGS_KNOWN, decide_tap
from engine.limits import (
    OFFLINE_ANSWERS_PER_TURN,
    OFFLINE_CHECKS_PER_TURN,
    OFFLINE_CLOCK_AHEAD_MAX_S,
    OFFLINE_DECIDE_SLICE,
    OFFLINE_TAP_AGE_MAX_S,
    OFFLINE_UPLOADS_QUEUED_MAX,
)
from engine.processor import EVENT_TIME_MAX_MS, EVENT_TIME_MIN_MS, INT64_MAX, Processor
from engine.state import CityState, Terminal, now_ms
from engine.versions import CompiledVersion, RulesVersions, VersionView

if TYPE_CHECKING:
    from engine.session import TerminalSession

log = logging.getLogger("citycard.offline")

# What became of each uploaded tap: the label values of
# citycard_offline_taps_total{outcome}.
AGREED = "agreed"  # applied; the engine would have decided the same
DIFFERS = "differs"  # applied; the engine would have decided otherwise (the tap stands)
UNCOLLECTED = "uncollected"  # applied; the debt limit, or an unknown card, left part or all of it unpaid
DUPLICATE = "duplicate"  # held already: answered from the record, nothing applied
REFUSED = "refused"  # a field the engine cannot accept, or a sequence reused: not recorded
BUSY = "busy"  # not decided now (database away, engine busy): upload it again
OUTCOMES = (AGREED, DIFFERS, UNCOLLECTED, DUPLICATE, REFUSED, BUSY)

_APPROVED = ResultCode.APPROVED
_FINAL_DECLINES = range(16, 64)  # the final decline codes a terminal may have decided
_TAP = OperationKind.TAP

# One uploaded tap: (terminal_seq, card_uid, card_counter, event_time_ms,
# tap_flags, rules_version, result, amount_cents), as OFFLINE_UPLOAD carries it.
OfflineTap = tuple[int, int, int, int, int, int, int, int]


def decide_offline(state: CityState, view: VersionView, terminal: Terminal, decision: Decision, result: int) -> None:
    """Apply one offline tap in place: the engine's own decision of it
    (``decision.online_result``), then the terminal's (``result``, and the
    amount it charged, ``decision.requested``), which stands.

    ``view`` is the city under the rules version the terminal held
    (``CompiledVersion.view``); ``decision.recorded_ms`` is the record time.
    The engine's ladder runs at the tap's event time and its effects are
    undone: only the terminal's decision moves money. The card's counter
    memory rises to the tap's counter (the card counted it), for the clone
    check of later taps.
    """
    verdict = Decision(
        decision.terminal_id,
        decision.terminal_seq,
        _TAP,
        decision.card_uid,
        decision.card_counter,
        decision.tap_flags,
        0,
        None,
        decision.event_time_ms,
        decision.event_time_ms,  # decided as of the tap's own time
        terminal.service_id,
    )
    decide_tap(view, terminal, verdict)
    _undo(state, verdict)
    view.activity.clear()
    decision.rules_version = view.rules_version
    decision.online_result = verdict.result
    decision.fare_profile = verdict.fare_profile
    decision.info = fastpath.INFO_OFFLINE | (fastpath.INFO_OFFLINE_DIFFERS if verdict.result != result else 0)
    decision.result = result
    card = state.card_position.get(decision.card_uid)
    if card is None:
        return  # no card, no account: nothing to charge
    account = state.card_account[card]
    decision.card_account = account
    available = state.balance[account] - state.pending_debit[account]
    decision.balance = available
    counter = decision.card_counter
    if counter != fastpath.NO_COUNTER:
        activity = state.activity.get(card)
        if activity is None:
            activity = state.activity[card] = fastpath.Activity()
        decision.previous_counter = activity.counter
        activity.counter = max(activity.counter, counter)
    if result != _APPROVED:
        return
    # The tap stands: the terminal's amount, down to the debt limit at most.
    charge = min(decision.requested, max(available - state.lowest(account), 0))
    decision.amount = charge
    decision.balance = available - charge
    if charge:
        state.pending_debit[account] += charge
        decision.source = account
        decision.target = state.revenue_account[terminal.service_id]
        decision.ledger_kind = LEDGER_FARE


def _undo(state: CityState, verdict: Decision) -> None:
    """Give back what the engine's own decision of an offline tap held."""
    if verdict.result != _APPROVED:
        return  # a decline holds nothing (and the view kept its memory apart)
    account = verdict.card_account
    if verdict.amount:
        if verdict.source == account:
            state.pending_debit[account] -= verdict.amount
        elif verdict.target == account:
            state.pending_credit[account] -= verdict.amount
    if verdict.product_rides:
        product = state.product_by_id.get(verdict.product_id)
        if product is not None:
            product.rides_used -= verdict.product_rides


def tap_refusal(tap: OfflineTap, compiled: CompiledVersion | None, service_id: int, recorded_ms: int) -> str | None:
    """Why an uploaded tap cannot be recorded (it is answered PROTOCOL_ERROR),
    or None. ``compiled`` is the rules version it names (None: not stored)."""
    seq, uid, _counter, event_ms, flags, _version, result, amount = tap
    if seq > INT64_MAX or uid > INT64_MAX or flags & ~TAP_FLAGS_KNOWN:
        return "a field out of range"
    if not EVENT_TIME_MIN_MS <= event_ms <= EVENT_TIME_MAX_MS:
        return "event time out of range"
    if event_ms < recorded_ms - OFFLINE_TAP_AGE_MAX_S * 1000:
        return "event time too old"
    if event_ms > recorded_ms + OFFLINE_CLOCK_AHEAD_MAX_S * 1000:
        return "event time ahead of the engine's clock"
    if compiled is None or service_id not in compiled.fares:
        return "a rules version the engine does not have for this service"
    if result != _APPROVED and result not in _FINAL_DECLINES:
        return "a result that is no decision"
    if result != _APPROVED and amount:
        return "an amount charged on a decline"
    terms = compiled.terms.get(service_id)
    if amount > (terms.most_charged_cents if terms is not None else 0):
        return "an amount above what the rules version charges here"
    return None


class UploadAnswer:
    """Collects the answers to one upload's taps; writes OFFLINE_RESULT once
    every tap has one. The processor calls ``deliver_result`` with the
    tap's index as request id."""

    __slots__ = ("_missing", "_uploads", "claimed", "decided", "request_id", "results", "session", "taps")

    def __init__(
        self, uploads: OfflineUploads, session: TerminalSession, request_id: int, taps: Sequence[OfflineTap]
    ) -> None:
        self._uploads = uploads
        self.session = session
        self.request_id = request_id
        self.taps = taps
        self.results: list[tuple[int, int, int, int, int] | None] = [None] * len(taps)
        self.decided = [False] * len(taps)  # decided by this upload (not a duplicate)
        self.claimed: set[int] = set()  # taps whose key this upload holds (Processor.claim)
        self._missing = len(taps)
        if not taps:
            self._finish()

    def deliver_result(
        self, request_id: int, terminal_seq: int, result: int, amount: int, balance: int, info: int
    ) -> None:
        if self.results[request_id] is None:
            self._missing -= 1
        self.results[request_id] = (terminal_seq, result, amount, balance, info)
        if self._missing == 0:
            self._finish()

    def _finish(self) -> None:
        results = [answer for answer in self.results if answer is not None]
        self._uploads.count(self)
        self.session.deliver_frame(fastpath.encode_offline_result(self.request_id, results))


class OfflineUploads:
    """Decides uploaded offline taps, one upload at a time, in arrival order."""

    def __init__(self, state: CityState, processor: Processor, versions: RulesVersions) -> None:
        self._state = state
        self._processor = processor
        self._versions = versions
        self._queue: deque[tuple[UploadAnswer, Terminal]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._deciding = False
        # Uploaded taps by outcome (OUTCOMES), for the metrics.
        self.outcomes = dict.fromkeys(OUTCOMES, 0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="citycard-offline-uploads")

    async def stop(self) -> None:
        """Finish the upload being decided; answer the queued ones BUSY_RETRY."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # noqa: BLE001 - logged by _run; stopping regardless
                pass
            self._task = None

    def accept(self, session: TerminalSession, request_id: int, terminal: Terminal, taps: Sequence[OfflineTap]) -> None:
        """Take one OFFLINE_UPLOAD; its answer goes to ``session.deliver_frame``."""
        answer = UploadAnswer(self, session, request_id, taps)
        if not taps:
            return
        if self._stopping or len(self._queue) >= OFFLINE_UPLOADS_QUEUED_MAX:
            self._answer_all(answer, ResultCode.BUSY_RETRY)
            return
        self._queue.append((answer, terminal))
        self._wakeup.set()

    @property
    def busy(self) -> bool:
        """True while uploads wait or one is being decided."""
        return self._deciding or bool(self._queue)

    def count(self, answer: UploadAnswer) -> None:
        """Count an answered upload's taps by outcome."""
        outcomes = self.outcomes
        for index, found in enumerate(answer.results):
            if found is None:
                continue
            _seq, result, amount, _balance, info = found
            if result >= ResultCode.BUSY_RETRY:
                outcome = BUSY if result == ResultCode.BUSY_RETRY else REFUSED
            elif not answer.decided[index]:
                outcome = DUPLICATE
            elif result == _APPROVED and amount < answer.taps[index][7]:
                outcome = UNCOLLECTED
            elif info & fastpath.INFO_OFFLINE_DIFFERS:
                outcome = DIFFERS
            else:
                outcome = AGREED
            outcomes[outcome] += 1

    # --- the worker ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            answer, terminal = self._queue.popleft()
            if self._stopping:
                self._answer_all(answer, ResultCode.BUSY_RETRY)
                continue
            self._deciding = True
            try:
                await self._decide(answer, terminal)
            except Exception:  # a bug: logged; the taps not answered yet are answered BUSY_RETRY
                log.exception("offline upload of terminal %d failed", terminal.id)
                for index in sorted(answer.claimed):
                    self._processor.release(terminal.id, answer.taps[index][0], ResultCode.BUSY_RETRY)
                answer.claimed.clear()
                self._answer_all(answer, ResultCode.BUSY_RETRY)
            finally:
                self._deciding = False

    def _answer_all(self, answer: UploadAnswer, result: int) -> None:
        for index, tap in enumerate(answer.taps):
            if answer.results[index] is None:
                answer.deliver_result(index, tap[0], result, 0, 0, 0)

    async def _decide(self, answer: UploadAnswer, terminal: Terminal) -> None:
        processor = self._processor
        taps = answer.taps
        versions: dict[int, CompiledVersion | None] = {}
        for version in {tap[5] for tap in taps}:
            try:
                versions[version] = await self._versions.get(version)
            except Exception as error:  # noqa: BLE001 - the database is unavailable in some way
                log.warning("rules version %d unavailable for an offline upload: %r", version, error)
                self._answer_all(answer, ResultCode.BUSY_RETRY)
                return
        recorded_ms = now_ms()
        claimed: list[int] = []
        refused: list[tuple[int, str]] = []  # (sequence, why), in upload order
        for index, tap in enumerate(taps):
            if index and not index % OFFLINE_CHECKS_PER_TURN:
                processor.flush()
                await asyncio.sleep(0)  # online taps first
            seq = tap[0]
            reason = tap_refusal(tap, versions[tap[5]], terminal.service_id, recorded_ms)
            if reason is not None:
                refused.append((seq, reason))
                answer.deliver_result(index, seq, ResultCode.PROTOCOL_ERROR, 0, 0, 0)
                continue
            fingerprint = request_fingerprint(_TAP, tap[1], tap[2], tap[4], 0, tap[3], None, -1)
            if processor.answer_known(answer, index, terminal.id, seq, fingerprint):
                continue
            processor.claim(terminal.id, seq, answer, index, fingerprint)
            answer.claimed.add(index)
            claimed.append(index)
        processor.flush()
        if refused:
            # One line an upload, naming the first: a terminal with a wrong
            # clock refuses every tap it uploads.
            first_seq, reason = refused[0]
            log.warning(
                "offline taps refused",
                extra={
                    "terminal_id": terminal.id,
                    "refused": len(refused),
                    "terminal_seq": first_seq,
                    "reason": reason,
                },
            )
        # Sequences the record may hold: one query for all of them.
        maybe = [taps[index][0] for index in claimed if taps[index][0] <= terminal.high_seq]
        if maybe:
            try:
                recorded = await processor.read_records(terminal.id, maybe)
            except Exception as error:  # noqa: BLE001 - the database is unavailable in some way
                log.warning("record look-up for an offline upload of terminal %d failed: %r", terminal.id, error)
                self._release(answer, terminal, claimed)
                return
            found = list(recorded.values())
            for start in range(0, len(found), OFFLINE_ANSWERS_PER_TURN):
                if start:
                    await asyncio.sleep(0)  # online taps first
                for one in found[start : start + OFFLINE_ANSWERS_PER_TURN]:
                    processor.answer_recorded(one)
            answer.claimed.difference_update(index for index in claimed if taps[index][0] in recorded)
            claimed = [index for index in claimed if taps[index][0] not in recorded]
        writer = processor.writer
        assert writer is not None
        views = {version: compiled.view(self._state) for version, compiled in versions.items() if compiled is not None}
        for start in range(0, len(claimed), OFFLINE_DECIDE_SLICE):
            part = claimed[start : start + OFFLINE_DECIDE_SLICE]
            if not await writer.wait_offline_room():
                self._release(answer, terminal, claimed[start:])
                return
            recorded_ms = now_ms()
            for index in part:
                seq, uid, counter, event_ms, flags, version, result, amount = taps[index]
                decision = Decision(
                    terminal.id,
                    seq,
                    _TAP,
                    uid,
                    counter,
                    flags,
                    amount,
                    None,
                    event_ms,
                    recorded_ms,
                    terminal.service_id,
                )
                decide_offline(self._state, views[version], terminal, decision, result)
                answer.decided[index] = True
                answer.claimed.discard(index)
                processor.submit_offline(terminal, decision)
            processor.flush()
            await asyncio.sleep(0)  # online taps first

    def _release(self, answer: UploadAnswer, terminal: Terminal, indices: list[int]) -> None:
        """Answer claimed taps BUSY_RETRY: the terminal uploads them again."""
        for index in indices:
            answer.claimed.discard(index)
            self._processor.release(terminal.id, answer.taps[index][0], ResultCode.BUSY_RETRY)
