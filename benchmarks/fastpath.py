"""Decode + decide + encode per tap: the compiled fast path against its pure twin.

One round is what the engine does for a chunk of taps from one terminal,
without the network and the database::

    FrameReader.feed(buffer of N TAP frames)
      -> decode_tap -> Decision(...) -> decide_tap -> encode_tap_result

on a synthetic in-memory city of 340,000 cards (``CityState`` filled
directly, no database) with realistic fares and balances. Pending debits are
reset between rounds, as the batch writer would settle them, so that the
city does not drift into declines. Both twins run in the same process on the
same city and the same frames; the report gives the median of the rounds.

    python -m benchmarks.fastpath --json
    python -m benchmarks.fastpath --taps 50000 --rounds 15 --json
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from array import array
from importlib import metadata
from types import ModuleType

from benchmarks.common import describe_machine, describe_versions, print_json
from engine import _fastpath_py
from engine.codes import CardStatus, TerminalKind
from engine.state import CityState, Terminal

DEFAULT_SEED = 20_240_601
# The size of the city the engine is built for.
DEFAULT_CARDS = 340_000
# Taps per round: enough frames that per-round overheads (reader creation,
# timer reads) vanish, few enough that a pure round stays under a second.
DEFAULT_TAPS = 20_000
DEFAULT_ROUNDS = 9

# Profiles with their share of cards: standard, student, senior, child, reduced.
PROFILE_SHARES = (0.55, 0.15, 0.15, 0.10, 0.05)
# Services: fares in cents by profile (None: not served) and share of taps.
SERVICES = {
    1: ((150, 75, 50, 0, 75), 0.80),  # city bus
    2: ((0, 0, 0, 0, 0), 0.10),  # libraries (identification only)
    3: ((120, None, 60, None, 60), 0.10),  # public bikes
}
BLOCKED_SHARE = 0.005  # lost, stolen and expired cards still tapped
EXIT_TAP_SHARE = 0.10  # gates that record the exit
FIRST_ACCOUNT_ID = 1_000_000
FIRST_CARD_UID = 0x04_00_00_00_00_00_00
EVENT_TIME_MS = 1_717_200_000_000


def build_city(cards: int, rng: random.Random) -> tuple[CityState, list[Terminal]]:
    """A city of ``cards`` cards, one account each, and a validator per service."""
    city = CityState()
    funding = city.add_account(1, 0, -(2**62), 2**63 - 1)
    terminals = []
    for service_id, (fares, _share) in SERVICES.items():
        city.revenue_account[service_id] = city.add_account(100 + service_id, 0, 0, 2**63 - 1)
        for profile, fare in enumerate(fares):
            if fare is not None:
                city.set_fare(service_id, profile, fare)
        terminals.append(
            Terminal(
                id=service_id,
                service_id=service_id,
                kind=TerminalKind.VALIDATOR,
                key_version=1,
                active=True,
                funding_account=-1,
                high_seq=-1,
            )
        )
    del funding
    profiles = rng.choices(range(len(PROFILE_SHARES)), weights=PROFILE_SHARES, k=cards)
    for n in range(cards):
        account_id = FIRST_ACCOUNT_ID + n
        # Most cards hold a few euros; some are nearly empty.
        balance = rng.choice((0, 50, 120)) if rng.random() < 0.05 else rng.randrange(500, 4_000)
        city.add_account(account_id, balance, 0, 100_000)
        status = CardStatus.BLOCKED if rng.random() < BLOCKED_SHARE else CardStatus.ACTIVE
        city.add_card(FIRST_CARD_UID + n, status, profiles[n], account_id)
    return city, terminals


def build_frames(fp: ModuleType, cards: int, taps: int, rng: random.Random) -> bytes:
    """``taps`` TAP frames from one terminal, random cards, in one buffer."""
    frames = []
    for seq in range(taps):
        uid = FIRST_CARD_UID + rng.randrange(cards)
        flags = fp.TAP_FLAG_EXIT if rng.random() < EXIT_TAP_SHARE else 0
        frames.append(fp.encode_tap(seq & 0xFFFF_FFFF, seq, uid, rng.randrange(1 << 16), EVENT_TIME_MS + seq, flags))
    return b"".join(frames)


def one_round(fp: ModuleType, city: CityState, terminal: Terminal, buffer: bytes) -> tuple[int, int, int]:
    """Decode, decide and encode every frame of buffer; return (ns, taps, approved)."""
    FrameReader, decode_tap, Decision = fp.FrameReader, fp.decode_tap, fp.Decision
    decide_tap, encode_tap_result = fp.decide_tap, fp.encode_tap_result
    tap_kind, terminal_id, service_id = fp.OPERATION_TAP, terminal.id, terminal.service_id
    approved = 0
    replies = []
    start = time.perf_counter_ns()
    for _msg_type, request_id, body in FrameReader().feed(buffer):
        seq, uid, counter, event_time_ms, flags = decode_tap(body)
        decision = Decision(
            terminal_id, seq, tap_kind, uid, counter, flags, 0, None, event_time_ms, EVENT_TIME_MS, service_id
        )
        decide_tap(city, terminal, decision)
        replies.append(encode_tap_result(request_id, seq, decision.result, decision.amount, decision.balance))
        approved += decision.result == 0
    elapsed = time.perf_counter_ns() - start
    return elapsed, len(replies), approved


def settle(city: CityState) -> None:
    """Undo every pending debit, as a failed batch would: rounds start equal."""
    city.pending_debit[:] = array("q", bytes(8 * len(city.pending_debit)))


def measure(fp: ModuleType, city: CityState, terminal: Terminal, buffer: bytes, rounds: int) -> dict[str, object]:
    one_round(fp, city, terminal, buffer)  # warm-up: caches, branch predictors
    settle(city)
    per_tap_ns = []
    approved = taps = 0
    for _ in range(rounds):
        gc.collect()
        elapsed, taps, approved = one_round(fp, city, terminal, buffer)
        settle(city)
        per_tap_ns.append(elapsed / taps)
    return {
        "ns_per_tap": round(statistics.median(per_tap_ns), 1),
        "ns_per_tap_min": round(min(per_tap_ns), 1),
        "ns_per_tap_max": round(max(per_tap_ns), 1),
        "approved_per_round": approved,
        "taps": taps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cards", type=int, default=DEFAULT_CARDS)
    parser.add_argument("--taps", type=int, default=DEFAULT_TAPS, help="taps per round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    args = parser.parse_args(argv)

    try:
        from engine import _fastpath as compiled  # type: ignore[attr-defined, unused-ignore]
    except ImportError as error:
        sys.stderr.write(f"engine._fastpath is not built ({error}): build it first\n")
        return 2
    pure: ModuleType = _fastpath_py

    rng = random.Random(args.seed)
    city, terminals = build_city(args.cards, rng)
    bus = terminals[0]
    buffer = build_frames(pure, args.cards, args.taps, rng)
    results = {name: measure(fp, city, bus, buffer, args.rounds) for name, fp in (("cython", compiled), ("pure", pure))}
    if results["cython"]["approved_per_round"] != results["pure"]["approved_per_round"]:
        sys.stderr.write("the twins decided the same taps differently\n")
        return 1
    cython_ns, pure_ns = results["cython"]["ns_per_tap"], results["pure"]["ns_per_tap"]
    assert isinstance(cython_ns, float) and isinstance(pure_ns, float)
    try:
        cython_version: str | None = metadata.version("Cython")
    except metadata.PackageNotFoundError:
        cython_version = None
    print_json(
        {
            "benchmark": "fastpath",
            "measures": "FrameReader.feed + decode_tap + Decision + decide_tap + encode_tap_result, per tap",
            "cython_ns_per_tap": cython_ns,
            "pure_ns_per_tap": pure_ns,
            "speedup": round(pure_ns / cython_ns, 2),
            "taps": args.taps,
            "rounds": args.rounds,
            "statistic": "median of rounds",
            "results": results,
            "machine": describe_machine(),
            "versions": {**describe_versions(), "cython": cython_version},
            "settings": {
                "seed": args.seed,
                "cards": args.cards,
                "taps_per_round": args.taps,
                "rounds": args.rounds,
                "services": {str(k): {"fares_by_profile": v[0], "share": v[1]} for k, v in SERVICES.items()},
                "exit_tap_share": EXIT_TAP_SHARE,
                "blocked_share": BLOCKED_SHARE,
                "terminal": "one bus validator",
                "gc": "enabled, collected before each round",
                "warm_up_rounds": 1,
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
