"""The hot list in memory (engine/sync.py): deltas, whole-list pages, and a
terminal's copy that follows them (engine/client.py, HotlistCopy.apply).

No engine, no database: the pages are checked against a model that replays
the changes, for many random histories."""

from __future__ import annotations

import random

import pytest

from engine import fastpath
from engine.client import HotlistCopy, HotlistPage
from engine.codes import HotlistReason
from engine.limits import HOTLIST_CHANGES_KEPT, HOTLIST_PAGE_ENTRIES_MAX
from engine.sync import HotList

LOST = HotlistReason.LOST
DELISTED = HotlistReason.DELISTED


def listed_at(changes: list[tuple[int, int, int]], version: int) -> dict[int, int]:
    """The model: the list after replaying every change up to ``version``."""
    listed: dict[int, int] = {}
    for number, uid, reason in changes:
        if number > version:
            break
        if reason == DELISTED:
            listed.pop(uid, None)
        else:
            listed[uid] = reason
    return listed


def history(seed: int, count: int, cards: int) -> list[tuple[int, int, int]]:
    """``count`` changes to ``cards`` cards, with gaps in the versions (a
    rolled-back transaction uses a version too)."""
    rng = random.Random(seed)
    changes = []
    version = 0
    for _ in range(count):
        version += rng.choice((1, 1, 1, 2))
        changes.append((version, rng.randrange(1, cards + 1), rng.choice((0, 0, 1, 2, 3, 4, 6))))
    return changes


def page(hotlist: HotList, since: int, after_uid: int = 0) -> HotlistPage:
    flags, since_version, version, after, entries = hotlist.page(since, after_uid)
    return HotlistPage(flags, since_version, version, after, entries, b"", b"")


def follow(hotlist: HotList, copy: HotlistCopy) -> int:
    """HotlistCopy.refresh's loop, on the in-memory hot list; returns the pages."""
    pages = 0
    since, after = copy.version, 0
    whole_version: int | None = None
    while True:
        got = page(hotlist, since, after)
        pages += 1
        copy.apply(got)
        if got.whole_list:
            whole_version = got.version if whole_version is None else whole_version
            if got.more:
                since, after = 0, got.entries[-1][0]
                continue
            copy.version, whole_version, since, after = whole_version, None, whole_version, 0
            if copy.version == 0:
                return pages
            continue
        copy.version = got.version
        if not got.more:
            return pages
        since = got.version


def test_changes_since_n_are_exactly_those_up_to_m() -> None:
    changes = history(seed=1, count=300, cards=40)
    hotlist = HotList()
    for change in changes:
        hotlist.apply(*change)
    versions = [number for number, _, _ in changes]
    for since in [0, 1, *random.Random(2).sample(versions, 40), versions[-1]]:
        got = page(hotlist, since)
        if since == 0:
            assert got.whole_list and not got.more
            assert dict(got.entries) == listed_at(changes, versions[-1])
            continue
        assert (got.flags, got.since_version, got.version) == (0, since, versions[-1])
        # Each card changed after N once, with its reason at M (0: left the list)...
        changed = {uid for number, uid, _ in changes if number > since}
        at_m = listed_at(changes, versions[-1])
        assert got.entries == sorted((uid, at_m.get(uid, DELISTED)) for uid in changed)
        # ...which takes a copy at N exactly to the list at M.
        copy = HotlistCopy(None)
        copy.listed, copy.version = listed_at(changes, since), since
        copy.apply(got)
        assert copy.listed == at_m


def test_a_copy_follows_any_history() -> None:
    for seed in range(20):
        changes = history(seed, count=200, cards=30)
        hotlist = HotList()
        copy = HotlistCopy(None)
        rng = random.Random(seed)
        for change in changes:
            hotlist.apply(*change)
            if rng.random() < 0.2:
                follow(hotlist, copy)
                assert (copy.version, copy.listed) == (hotlist.version, hotlist.listed)
        follow(hotlist, copy)
        assert (copy.version, copy.listed) == (hotlist.version, listed_at(changes, changes[-1][0]))


def test_a_long_list_comes_in_pages_by_uid() -> None:
    hotlist = HotList()
    cards = 2 * HOTLIST_PAGE_ENTRIES_MAX + 7
    for number in range(1, cards + 1):
        hotlist.apply(number, 10_000 + 3 * number, int(LOST))
    first = page(hotlist, 0)
    assert first.flags == fastpath.HOTLIST_FLAG_FULL | fastpath.HOTLIST_FLAG_MORE
    assert len(first.entries) == HOTLIST_PAGE_ENTRIES_MAX
    copy = HotlistCopy(None)
    assert follow(hotlist, copy) == 4  # three pages of the list, then "no change since"
    assert (copy.version, len(copy.listed)) == (cards, cards)
    # A delta of more changes than a page holds comes in pages by version.
    for number in range(cards + 1, cards + 1 + HOTLIST_PAGE_ENTRIES_MAX + 5):
        hotlist.apply(number, 10_000 + 3 * (number - cards), int(DELISTED))
    delta = page(hotlist, cards)
    assert delta.more and len(delta.entries) == HOTLIST_PAGE_ENTRIES_MAX
    assert follow(hotlist, copy) == 2
    assert (copy.version, copy.listed) == (hotlist.version, hotlist.listed)
    assert len(copy.listed) == cards - HOTLIST_PAGE_ENTRIES_MAX - 5


def test_the_whole_list_when_the_copy_is_older_than_the_changes_kept() -> None:
    newest = 99 + HOTLIST_CHANGES_KEPT
    recent = [(version, 5, int(LOST)) for version in range(newest, 99, -1)]  # newest first, as read
    hotlist = HotList()
    hotlist.load(newest, [(5, int(LOST))], recent)  # as many as are kept: older ones were not read
    assert page(hotlist, 98).whole_list
    assert not page(hotlist, 99).whole_list  # every change above 99 is held
    hotlist = HotList()
    hotlist.load(newest, [(5, int(LOST))], recent[:10])  # fewer: nothing older exists
    assert not page(hotlist, 3).whole_list
    assert page(hotlist, newest + 1).whole_list  # a version the engine never had: start again
    # Changes beyond those kept push the oldest out.
    hotlist = HotList()
    for version in range(1, HOTLIST_CHANGES_KEPT + 3):
        hotlist.apply(version, version % 7, int(LOST))
    assert page(hotlist, 1).whole_list and not page(hotlist, 2).whole_list


@pytest.mark.parametrize("reason", [int(r) for r in HotlistReason if r != DELISTED])
def test_a_card_listed_then_delisted_leaves_the_list(reason: int) -> None:
    hotlist = HotList()
    hotlist.apply(1, 77, reason)
    hotlist.apply(2, 77, int(DELISTED))
    assert hotlist.listed == {} and page(hotlist, 0).entries == []
    assert page(hotlist, 1).entries == [(77, int(DELISTED))]
    assert page(hotlist, 0 + 0).version == 2
    hotlist.apply(2, 77, reason)  # an old change read again is ignored
    assert hotlist.listed == {}


def test_a_list_that_never_changed_is_read_once() -> None:
    """Version 0 is "nothing held": a list with no history comes whole, empty,
    and the copy is current without asking again."""
    hotlist = HotList()
    first = page(hotlist, 0)
    assert (first.flags, first.version, first.entries) == (fastpath.HOTLIST_FLAG_FULL, 0, [])
    copy = HotlistCopy(None)
    assert follow(hotlist, copy) == 1
    assert (copy.version, copy.listed) == (0, {})
