"""What a terminal keeps for working offline, and how it stays current.

A terminal that may lose its link keeps two lists (docs/offline.md):

- the **hot list**: every card it must refuse (any status but active), with
  the reason. The engine holds it in memory (``HotList``): the listed cards,
  and the recent changes, each numbered by the version of its row in
  ``hotlist_changes`` (schema/0006_offline.sql). A terminal holding version
  N asks for the changes since N (HOTLIST_REQUEST) and gets them in signed
  pages (HOTLIST); with N = 0, or N older than the changes kept, it gets the
  whole list instead, paged by card uid.
- the **rules** of its service: the fares by profile and the policy fields
  it needs, of the version in force (or one it names), signed (RULES).

The hot list follows the database: every status change writes its row and
notifies ``citycard_hotlist`` in the same transaction, and ``engine/live.py``
reads the new rows into ``HotList`` at once. Whenever the hot list or the
rules version changes, every open session gets a NOTICE with both versions,
and a terminal behind asks for what it lacks.

Pages and rules messages are signed (``engine/signing.py``) and kept
(HOTLIST_PAGES_CACHED): after a block every terminal asks for the same page,
which is signed once.

>>> hotlist = HotList()
>>> hotlist.apply(1, 0x04A1, 2)   # version 1: card 0x04A1 lost
>>> hotlist.page(0, 0)[4], hotlist.page(1, 0)[4]
([(1185, 2)], [])
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING

import asyncpg

from engine import fastpath
from engine.codes import HotlistReason
from engine.limits import (
    DB_COMMAND_TIMEOUT_S,
    HOTLIST_CHANGES_KEPT,
    HOTLIST_PAGE_ENTRIES_MAX,
    HOTLIST_PAGES_CACHED,
    SIGNATURE_BYTES,
)
from engine.signing import HOTLIST_LABEL, RULES_LABEL, ListSigner
from engine.state import CityState
from engine.versions import CompiledVersion, RulesVersions

if TYPE_CHECKING:
    from engine.session import TerminalSession

log = logging.getLogger("citycard.sync")

HOTLIST_CHANNEL = "citycard_hotlist"

# Sessions told of a change per turn of the event loop: sealing a NOTICE
# costs a few microseconds, so 256 keep each turn well under a millisecond
# while 10,000 terminals are told within a few dozen turns.
NOTICES_PER_TURN = 256

# A page: (flags, since_version, version, after_uid, entries), as HOTLIST carries it.
Page = tuple[int, int, int, int, list[tuple[int, int]]]
# RULES' fields before its fares: rules_version .. cap_monthly_cents.
RulesHead = tuple[int, int, int, int, int, int, int, int, int, int, int]

_NO_SIGNATURE = bytes(SIGNATURE_BYTES)

# The listed cards and every change above a version, as of one snapshot.
_LISTED_SQL = """
SELECT DISTINCT ON (card_uid) card_uid, reason FROM hotlist_changes ORDER BY card_uid, version DESC
"""
_RECENT_SQL = "SELECT version, card_uid, reason FROM hotlist_changes ORDER BY version DESC LIMIT $1"
_NEWER_SQL = "SELECT version, card_uid, reason FROM hotlist_changes WHERE version > $1 ORDER BY version LIMIT $2"


class HotList:
    """The hot list in memory: the listed cards and the recent changes.

    ``version`` is that of the newest change applied. ``page(since,
    after_uid)`` answers a HOTLIST_REQUEST: the changes above ``since``
    (each card once, with its newest reason; 0 for a card that left the
    list), or, when those are not all kept (``since`` 0 or too old), the
    whole list from ``after_uid`` on, in uid order.
    """

    def __init__(self) -> None:
        self.version = 0
        self.listed: dict[int, int] = {}  # card uid -> reason
        self._uids: list[int] = []  # the listed uids, sorted (pages of the whole list)
        # Recent changes in version order, at most HOTLIST_CHANGES_KEPT.
        self._versions: list[int] = []
        self._changes: list[tuple[int, int]] = []  # (card uid, reason)
        # Changes above this version are all kept: a request since an older
        # version gets the whole list.
        self._complete_since = 0

    def apply(self, version: int, card_uid: int, reason: int) -> None:
        """One change, newer than every change applied before."""
        if version <= self.version:
            return  # already held (a catch-up that overlaps)
        self.version = version
        self._versions.append(version)
        self._changes.append((card_uid, reason))
        if len(self._versions) > HOTLIST_CHANGES_KEPT:
            dropped = len(self._versions) - HOTLIST_CHANGES_KEPT
            self._complete_since = self._versions[dropped - 1]
            del self._versions[:dropped]
            del self._changes[:dropped]
        listed = card_uid in self.listed
        if reason == HotlistReason.DELISTED:
            if listed:
                del self.listed[card_uid]
                del self._uids[bisect.bisect_left(self._uids, card_uid)]
        else:
            if not listed:
                bisect.insort(self._uids, card_uid)
            self.listed[card_uid] = reason

    def load(self, version: int, listed: Iterable[tuple[int, int]], recent: list[tuple[int, int, int]]) -> None:
        """Start from a snapshot: the newest version, the listed cards and
        the newest changes (version, uid, reason), newest first."""
        self.version = version
        self.listed = {uid: reason for uid, reason in listed if reason != HotlistReason.DELISTED}
        self._uids = sorted(self.listed)
        ordered = sorted(recent)
        self._versions = [row[0] for row in ordered]
        self._changes = [(row[1], row[2]) for row in ordered]
        # Older changes were not read: deltas start at the oldest one read.
        self._complete_since = self._versions[0] - 1 if len(ordered) >= HOTLIST_CHANGES_KEPT else 0

    def page(self, since_version: int, after_uid: int) -> Page:
        """The HOTLIST page that answers ``(since_version, after_uid)``."""
        if since_version == 0 or since_version < self._complete_since or since_version > self.version:
            return self._whole_list_page(after_uid)
        start = bisect.bisect_right(self._versions, since_version)
        end = min(start + HOTLIST_PAGE_ENTRIES_MAX, len(self._versions))
        newest: dict[int, int] = {}
        for card_uid, reason in self._changes[start:end]:
            newest[card_uid] = reason
        version = self._versions[end - 1] if end > start else since_version
        flags = fastpath.HOTLIST_FLAG_MORE if end < len(self._versions) else 0
        return (flags, since_version, version, 0, sorted(newest.items()))

    def _whole_list_page(self, after_uid: int) -> Page:
        uids = self._uids
        start = bisect.bisect_right(uids, after_uid)
        end = min(start + HOTLIST_PAGE_ENTRIES_MAX, len(uids))
        flags = fastpath.HOTLIST_FLAG_FULL | (fastpath.HOTLIST_FLAG_MORE if end < len(uids) else 0)
        listed = self.listed
        return (flags, 0, self.version, after_uid, [(uid, listed[uid]) for uid in uids[start:end]])


async def load_hotlist(conn: asyncpg.Connection, hotlist: HotList) -> None:
    """Fill ``hotlist`` from one snapshot of ``hotlist_changes``."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM hotlist_changes", timeout=DB_COMMAND_TIMEOUT_S
        )
        listed = await conn.fetch(_LISTED_SQL, timeout=DB_COMMAND_TIMEOUT_S)
        recent = await conn.fetch(_RECENT_SQL, HOTLIST_CHANGES_KEPT, timeout=DB_COMMAND_TIMEOUT_S)
    hotlist.load(version, [(row[0], row[1]) for row in listed], [(row[0], row[1], row[2]) for row in recent])


async def catch_up_hotlist(conn: asyncpg.Connection, hotlist: HotList) -> int:
    """Apply the changes committed since ``hotlist.version``; returns how many."""
    applied = 0
    while True:
        rows = await conn.fetch(_NEWER_SQL, hotlist.version, HOTLIST_CHANGES_KEPT, timeout=DB_COMMAND_TIMEOUT_S)
        for version, card_uid, reason in rows:
            hotlist.apply(version, card_uid, reason)
        applied += len(rows)
        if len(rows) < HOTLIST_CHANGES_KEPT:
            return applied


# The kinds of list frame sent to terminals: the label values of
# citycard_list_frames_total{kind}. A page of the whole hot list, a page of
# its changes since a version, a service's rules.
HOTLIST_FULL = "hotlist_full"
HOTLIST_CHANGES = "hotlist_changes"
RULES = "rules"
LIST_FRAME_KINDS = (HOTLIST_FULL, HOTLIST_CHANGES, RULES)


class Sync:
    """Answers HOTLIST_REQUEST and RULES_REQUEST, and tells sessions of changes."""

    def __init__(self, state: CityState, hotlist: HotList, versions: RulesVersions, signer: ListSigner) -> None:
        self.state = state
        self.hotlist = hotlist
        self.versions = versions
        self.signer = signer
        self._pages: OrderedDict[tuple[int, int, int], tuple[Page, bytes]] = OrderedDict()
        self._rules: dict[tuple[int, int], tuple[RulesHead, list[tuple[int, int]], bytes]] = {}
        self._told = (hotlist.version, state.rules_version)
        self._tasks: set[asyncio.Task[None]] = set()
        # Where notices go: the open sessions (set by the engine).
        self.sessions: Callable[[], Iterable[TerminalSession]] = tuple
        self.pages_signed = 0
        # Frames sent to terminals, for the metrics: lists by kind
        # (LIST_FRAME_KINDS), and NOTICE frames.
        self.frames_sent = dict.fromkeys(LIST_FRAME_KINDS, 0)
        self.notices_sent = 0

    # --- the hot list --------------------------------------------------------------

    def hotlist_frame(self, request_id: int, since_version: int, after_uid: int) -> bytes:
        """The signed HOTLIST frame answering a HOTLIST_REQUEST."""
        hotlist = self.hotlist
        key = (since_version, after_uid, hotlist.version)
        cached = self._pages.get(key)
        if cached is None:
            page = hotlist.page(since_version, after_uid)
            content = fastpath.encode_hotlist(0, *page, _NO_SIGNATURE)[fastpath.FRAME_HEADER_BYTES : -SIGNATURE_BYTES]
            cached = (page, self.signer.sign(HOTLIST_LABEL, content))
            self.pages_signed += 1
            self._pages[key] = cached
            while len(self._pages) > HOTLIST_PAGES_CACHED:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(key)
        page, signature = cached
        self.frames_sent[HOTLIST_FULL if page[0] & fastpath.HOTLIST_FLAG_FULL else HOTLIST_CHANGES] += 1
        return fastpath.encode_hotlist(request_id, *page, signature)

    # --- rules ------------------------------------------------------------------------

    def rules_frame(self, request_id: int, compiled: CompiledVersion, service_id: int) -> bytes | None:
        """The signed RULES frame of ``compiled`` for one service; None when
        that version has no rules for it."""
        key = (compiled.version, service_id)
        cached = self._rules.get(key)
        if cached is None:
            terms = compiled.terms.get(service_id)
            if terms is None:
                return None
            head: RulesHead = (
                compiled.version,
                terms.service_id,
                terms.service_kind,
                terms.min_balance_to_enter_cents,
                terms.tolerated_negative_cents,
                terms.passback_window_s,
                terms.max_charge_cents,
                terms.transfer_window_minutes,
                terms.transfer_percent_off,
                terms.cap_daily_cents,
                terms.cap_monthly_cents,
            )
            fares = list(terms.fares)
            content = fastpath.encode_rules(0, *head, fares, _NO_SIGNATURE)[
                fastpath.FRAME_HEADER_BYTES : -SIGNATURE_BYTES
            ]
            cached = (head, fares, self.signer.sign(RULES_LABEL, content))
            self._rules[key] = cached
        head, fares, signature = cached
        self.frames_sent[RULES] += 1
        return fastpath.encode_rules(request_id, *head, fares, signature)

    async def rules_for(self, rules_version: int, service_id: int) -> CompiledVersion | None:
        """The version a RULES_REQUEST gets: the one named when the engine has
        it with rules for the service, else the version in force."""
        if rules_version:
            compiled = await self.versions.get(rules_version)
            if compiled is not None and service_id in compiled.terms:
                return compiled
        return await self.versions.get(self.state.rules_version)

    # --- notices ------------------------------------------------------------------------

    def changed(self) -> None:
        """The hot list or the rules version may have changed: tell every
        open session, once per change (``engine/live.py`` calls this)."""
        now = (self.hotlist.version, self.state.rules_version)
        before, self._told = self._told, now
        if now == before:
            return
        if now[1] != before[1] and self.versions.cached(now[1]) is None:
            self._spawn(self._prepare_rules(now[1]))
        self._spawn(self._notify(list(self.sessions())))

    async def _prepare_rules(self, version: int) -> None:
        """Compile the version in force before terminals ask for it."""
        try:
            await self.versions.get(version)
        except (OSError, asyncpg.PostgresError) as error:
            log.warning("could not read rules version %d ahead of requests: %r", version, error)

    async def _notify(self, sessions: list[TerminalSession]) -> None:
        for start in range(0, len(sessions), NOTICES_PER_TURN):
            if start:
                await asyncio.sleep(0)
            # Read when sent: a later change sent meanwhile is not undone.
            hotlist_version, rules_version = self._told
            frame = fastpath.encode_notice(0, hotlist_version, rules_version)
            for session in sessions[start : start + NOTICES_PER_TURN]:
                session.push(frame)
                self.notices_sent += 1

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
