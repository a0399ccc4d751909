"""The position index (card uid or account id -> position), both twins.

The compiled twin's is an open-addressing table in C, the pure twin's a
dict: they must find, refuse and count alike, and the compiled one must keep
every key findable while it grows (rehashes) under any pattern of keys.
"""

from __future__ import annotations

import random
import re
from array import array
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.twins import TWIN_MODULES, load_twin

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@pytest.fixture(scope="module", params=list(TWIN_MODULES))
def fp(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin(request.param)


def test_an_empty_index_finds_nothing(fp: ModuleType) -> None:
    index = fp.PositionIndex()
    assert len(index) == 0
    assert index.get(1) is None
    assert index.get(1, "missing") == "missing"
    assert 1 not in index
    with pytest.raises(KeyError):
        index[1]


def test_stored_cards_are_found_and_replaced(fp: ModuleType) -> None:
    index = fp.PositionIndex()
    index[1234567890] = 0
    index[INT64_MAX] = 1
    index[INT64_MIN] = 2
    index[0] = 3
    index[-5] = 4
    assert [index[uid] for uid in (1234567890, INT64_MAX, INT64_MIN, 0, -5)] == [0, 1, 2, 3, 4]
    assert len(index) == 5
    index[0] = 40
    assert index[0] == 40 and len(index) == 5
    assert 7 not in index and index.get(7) is None


@pytest.mark.parametrize(
    ("uid", "position", "text"),
    [
        (2**63, 0, f"index key {2**63} is not an int64"),
        (INT64_MIN - 1, 0, f"index key {INT64_MIN - 1} is not an int64"),
        (1, -1, "index position -1 is not 0..2**63-1"),
        (1, 2**70, f"index position {2**70} is not 0..2**63-1"),
    ],
)
def test_out_of_range_uids_and_positions_are_refused_alike(fp: ModuleType, uid: int, position: int, text: str) -> None:
    index = fp.PositionIndex()
    with pytest.raises(OverflowError, match=f"^{re.escape(text)}$"):
        index[uid] = position
    assert len(index) == 0


@pytest.mark.parametrize("uid", [2**63, 2**64 + 1, INT64_MIN - 1, -(2**80)])
def test_uids_beyond_int64_are_not_found(fp: ModuleType, uid: int) -> None:
    # A wire uid is a u64: one above 2**63 - 1 can reach a look-up, and is
    # simply not a card the engine holds.
    index = fp.PositionIndex()
    index[uid & INT64_MAX] = 1
    assert index.get(uid) is None
    assert uid not in index


@pytest.mark.parametrize("packed", [True, False], ids=["array", "list"])
def test_add_range_numbers_from_start_and_counts_the_new(fp: ModuleType, packed: bool) -> None:
    index = fp.PositionIndex()
    index[99] = 0
    uids: Any = [10, 20, 30]
    assert index.add_range(array("q", uids) if packed else uids, 1) == 3
    assert [index[uid] for uid in (99, 10, 20, 30)] == [0, 1, 2, 3]
    # A uid already held, or given twice, is not new: the caller's count shows it.
    again: Any = [40, 20, 40]
    assert index.add_range(array("q", again) if packed else again, 4) == 1
    assert len(index) == 5


def test_add_range_refuses_a_negative_start(fp: ModuleType) -> None:
    with pytest.raises(OverflowError, match=r"^index position -1 is not 0\.\.2\*\*63-1$"):
        fp.PositionIndex().add_range(array("q", [1]), -1)


@pytest.mark.parametrize(
    "pattern",
    ["sequential", "stride_2_32", "random", "negative"],
)
def test_every_card_stays_findable_while_the_table_grows(fp: ModuleType, pattern: str) -> None:
    rng = random.Random(7)
    count = 100_000
    if pattern == "sequential":
        uids = list(range(10**12, 10**12 + count))
    elif pattern == "stride_2_32":
        # A manufacturer's prefix in the high bits, a serial in the low ones.
        uids = [(serial << 32) | 0x04A1 for serial in range(count)]
    elif pattern == "random":
        uids = rng.sample(range(1, 2**56), count)
    else:
        uids = [-uid for uid in range(1, count + 1)]
    index = fp.PositionIndex()
    half = count // 2
    for position, uid in enumerate(uids[:half]):
        index[uid] = position
    assert index.add_range(array("q", uids[half:]), half) == count - half
    assert len(index) == count
    assert all(index[uid] == position for position, uid in enumerate(uids))
    held = set(uids)
    absent = [uid + 1 for uid in uids[:1000] if uid + 1 not in held]
    assert all(index.get(uid) is None for uid in absent)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "get", "range"]),
            st.integers(min_value=-50, max_value=50) | st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
            st.integers(min_value=0, max_value=2**40),
        ),
        max_size=300,
    )
)
def test_the_twins_agree_with_a_dict(operations: list[tuple[str, int, int]]) -> None:
    indexes = [load_twin(name).PositionIndex() for name in TWIN_MODULES]
    model: dict[int, int] = {}
    for operation, uid, position in operations:
        if operation == "set":
            model[uid] = position
            for index in indexes:
                index[uid] = position
        elif operation == "range":
            uids = [uid, uid + 1, uid] if uid < INT64_MAX else [uid]
            new = len(set(uids) - set(model))
            for offset, each in enumerate(uids):
                model[each] = position + offset
            assert [index.add_range(array("q", uids), position) for index in indexes] == [new] * len(indexes)
        assert [index.get(uid) for index in indexes] == [model.get(uid)] * len(indexes)
        assert [len(index) for index in indexes] == [len(model)] * len(indexes)
    assert all(index[uid] == position for index in indexes for uid, position in model.items())


@pytest.mark.parametrize("packed", [True, False], ids=["array", "list"])
def test_positions_reads_many_keys_and_names_the_first_missing(fp: ModuleType, packed: bool) -> None:
    index = fp.PositionIndex()
    index.add_range(array("q", [70, 80, 90]), 5)
    keys: Any = [90, 70, 90]
    found = index.positions(array("q", keys) if packed else keys)
    assert (found.typecode, list(found)) == ("q", [7, 5, 7])
    missing: Any = [80, 81, 82]
    with pytest.raises(KeyError, match=r"^81$"):
        index.positions(array("q", missing) if packed else missing)
