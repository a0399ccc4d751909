"""The batch encoder: both twins write the same SQL array literals."""

from __future__ import annotations

from array import array
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
ACCOUNTS = array("q", [1, 11, 12, 1_000_001, 1_000_002, 1_000_003])
TRANSFERS_PER_BATCH = 1024


def decision(module: ModuleType, **fields: object) -> object:
    d = module.Decision(
        fields.get("terminal_id", 7),
        fields.get("terminal_seq", 1001),
        fields.get("kind", module.OPERATION_TAP),
        fields.get("card_uid", 0x04A1),
        fields.get("card_counter", 0),
        fields.get("tap_flags", 0),
        fields.get("requested", 0),
        fields.get("original_seq"),
        fields.get("event_time_ms", 1_700_000_000_000),
        fields.get("recorded_ms", 1_700_000_000_001),
        fields.get("service_id", 1),
    )
    for name in (
        "result",
        "amount",
        "balance",
        "card_account",
        "source",
        "target",
        "ledger_kind",
        "info",
        "fare_profile",
        "rules_version",
        "product_id",
        "product_rides",
        "original_terminal",
    ):
        if name in fields:
            setattr(d, name, fields[name])
    return d


def test_a_fare_and_a_topup(fp: ModuleType) -> None:
    fare = decision(
        fp, amount=150, balance=850, card_account=3, source=3, target=1, info=3, fare_profile=0, rules_version=4
    )
    topup = decision(
        fp,
        terminal_seq=1002,
        kind=fp.OPERATION_TOPUP,
        requested=500,
        amount=500,
        balance=1350,
        card_account=3,
        source=0,
        target=3,
        ledger_kind=fp.LEDGER_TOPUP,
    )
    declined = decision(fp, terminal_seq=1003, card_uid=99, result=17)
    arguments = fp.encode_batch(5, [fare, topup, declined], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert len(arguments) == 33
    assert arguments[:4] == (5, 3, "{7,7,7}", "{1001,1002,1003}")
    assert arguments[9] == "{NULL,NULL,NULL}"  # original_seq
    assert arguments[16] == "{1000001,1000001,NULL}"  # the card's account id, NULL when unknown
    # info, the fare's profile (NULL when no fare was decided) and the rules version.
    assert arguments[17:20] == ("{3,0,0}", "{0,NULL,NULL}", "{4,0,0}")
    # No product paid, no reversal names another terminal.
    assert arguments[20:22] == ("{NULL,NULL,NULL}", "{NULL,NULL,NULL}")
    # Per account: the card -150 +500, bus revenue +150, funding -500.
    assert arguments[22:24] == ("{1,11,1000001}", "{-500,150,350}")
    # Two transfers (fare, top-up) of service 1, each summing to zero.
    assert arguments[24:27] == ("{5120,5121}", "{0,1}", "{1,1}")
    assert arguments[27:30] == ("{5120,5120,5121,5121}", "{11,1000001,1,1000001}", "{150,-150,-500,500}")
    assert arguments[30:32] == ("{}", "{}")  # no ticket rides
    assert arguments[32] == "{NULL,NULL,NULL}"  # decided online: no second opinion


def test_rides_and_refunds_of_other_terminals(fp: ModuleType) -> None:
    """Rides used per ticket are summed (given back ones too); a reversal of
    another terminal's tap names that terminal, one of its own does not."""
    rides = [
        decision(fp, terminal_seq=1, product_id=40, product_rides=1),
        decision(fp, terminal_seq=2, product_id=40, product_rides=1),
        decision(fp, terminal_seq=3, product_id=41, product_rides=1),
        decision(fp, terminal_seq=4, product_id=9, product_rides=0),  # a season pass
        decision(fp, terminal_seq=5, product_id=41, product_rides=1, result=25),  # declined: no ride
    ]
    office = decision(fp, terminal_seq=6, kind=fp.OPERATION_REVERSAL, original_seq=2, original_terminal=3)
    office.product_id, office.product_rides = 40, -1
    own = decision(fp, terminal_seq=7, kind=fp.OPERATION_REVERSAL, original_seq=3, original_terminal=7)
    arguments = fp.encode_batch(5, [*rides, office, own], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert arguments[20] == "{40,40,41,9,41,40,NULL}"
    assert arguments[21] == "{NULL,NULL,NULL,NULL,NULL,3,NULL}"
    assert arguments[30:32] == ("{40,41}", "{1,1}")


def test_extreme_values(fp: ModuleType) -> None:
    d = decision(fp, terminal_seq=2**63 - 1, card_uid=0, balance=-(2**63), original_seq=2**63 - 1)
    arguments = fp.encode_batch(1, [d], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert arguments[3] == "{9223372036854775807}"
    assert arguments[5] == "{0}"
    assert arguments[9] == "{9223372036854775807}"
    assert arguments[14] == "{-9223372036854775808}"


def test_empty_batch(fp: ModuleType) -> None:
    arguments = fp.encode_batch(9, [], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert arguments[:2] == (9, 0)
    assert set(arguments[2:]) == {"{}"}


def test_bad_positions_and_types(fp: ModuleType) -> None:
    with pytest.raises(IndexError, match="account position 6 out of range for 6 accounts"):
        fp.encode_batch(1, [decision(fp, card_account=6)], ACCOUNTS, TRANSFERS_PER_BATCH)
    with pytest.raises(IndexError, match="account position -2 out of range for 6 accounts"):
        fp.encode_batch(1, [decision(fp, amount=5, card_account=3, source=-2, target=1)], ACCOUNTS, 1024)
    with pytest.raises(TypeError, match="expected list, got tuple"):
        fp.encode_batch(1, (), ACCOUNTS, TRANSFERS_PER_BATCH)
    with pytest.raises(TypeError, match=r"Cannot convert str to engine\._fastpath\.Decision"):
        fp.encode_batch(1, ["not a decision"], ACCOUNTS, TRANSFERS_PER_BATCH)


decisions = st.lists(
    st.fixed_dictionaries(
        {
            "terminal_seq": INT64,
            "card_uid": INT64,
            "card_counter": INT64,
            "event_time_ms": INT64,
            "balance": INT64,
            "original_seq": st.none() | INT64,
            "card_account": st.integers(min_value=-1, max_value=5),
            "source": st.integers(min_value=0, max_value=5),
            "target": st.integers(min_value=0, max_value=5),
            "amount": st.integers(min_value=0, max_value=100_000),
            "result": st.sampled_from([0, 17, 25]),
            "ledger_kind": st.integers(min_value=0, max_value=2),
            "service_id": st.integers(min_value=0, max_value=20),
            "info": st.integers(min_value=0, max_value=0x7F),
            "fare_profile": st.integers(min_value=-1, max_value=63),
            "rules_version": st.integers(min_value=0, max_value=2**31 - 1),
            "product_id": st.sampled_from([-1, 1, 2, 2**40]),
            "product_rides": st.integers(min_value=-1, max_value=1),
            "original_terminal": st.integers(min_value=1, max_value=9),
        }
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(decisions)
def test_twins_agree(rows: list[dict[str, object]]) -> None:
    from engine import _fastpath_py as pure

    try:
        from engine import _fastpath as compiled
    except ImportError:
        pytest.skip("the compiled fast path is not built")
    expected = pure.encode_batch(3, [decision(pure, **row) for row in rows], ACCOUNTS, TRANSFERS_PER_BATCH)
    actual = compiled.encode_batch(3, [decision(compiled, **row) for row in rows], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert actual == expected


def test_an_offline_tap_carries_the_engines_own_result(fp: ModuleType) -> None:
    """A tap decided offline records the engine's own decision of it beside
    the terminal's (docs/offline.md), and the amount its terminal charged."""
    # Its card unknown to the engine: nothing charged, 150 uncollected.
    stands = decision(fp, terminal_seq=1, requested=150, info=fp.INFO_OFFLINE | fp.INFO_OFFLINE_DIFFERS)
    stands.online_result = fp.RESULT_UNKNOWN_CARD
    online = decision(fp, terminal_seq=2)
    arguments = fp.encode_batch(5, [stands, online], ACCOUNTS, TRANSFERS_PER_BATCH)
    assert arguments[32] == "{17,NULL}"
    assert arguments[8] == "{150,0}"  # requested: what the terminal charged
    assert arguments[17] == "{768,0}"
    # The tap is one request whatever its terminal charged.
    assert stands.fingerprint() == decision(fp, terminal_seq=1).fingerprint()
