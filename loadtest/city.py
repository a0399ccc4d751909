"""The traffic model of the load suite: which terminals, which cards, what mix.

Nothing here imports locust or gevent, so the model can be tested and reused
on its own. The city comes from the database the engine serves (terminals,
and a sample of cards with their balances), read by ``load_plan`` in a child
process (``python -m loadtest.city``) because asyncpg needs asyncio, which
does not mix with locust's gevent monkey-patching.

The mix: every service belongs to one of five service classes (bus,
libraries, pools, parking, kiosks). Each locust user is one terminal. Users
take process-local slots in a fixed order (``class_of_slot``): the first five
slots cover the five classes, later slots follow the classes' traffic
weights. Each user then paces its requests (``class_rate``) so that the taps
of the process follow the city's traffic weights (bus three quarters)
whatever the number of users, as long as every class has a user.

Example::

    plan = load_plan(dsn=None, data_dir=Path("var"), cards=10_000)
    order = terminal_order(plan, "libraries")  # library_access first, by weight
    picker = CardPicker(plan.cards, skew=0.8)
    uid = picker.draw(random.Random(1))
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from engine.codes import CardStatus, TerminalKind
from engine.seed import SERVICES, UID_MANUFACTURER_BYTE, traffic_weights


@dataclass(frozen=True, slots=True)
class ServiceClass:
    """A group of services whose terminals behave alike."""

    name: str
    services: tuple[str, ...]  # service codes, as in engine.seed.SERVICES


# Every seeded service belongs to exactly one class (tests/test_locust.py checks).
SERVICE_CLASSES: tuple[ServiceClass, ...] = (
    ServiceClass("bus", ("bus",)),
    ServiceClass(
        "libraries",
        (
            "library_access",
            "library_loans",
            "civic_centres",
            "museums",
            "senior_centres",
            "botanic_garden",
            "courses",
            "recycling_points",
            "play_rooms",
            "telecentres",
            "register_office",
        ),
    ),
    ServiceClass("pools", ("pools", "sports_centres", "sports_courts")),
    ServiceClass("parking", ("parking", "street_parking", "bikes")),
    ServiceClass("kiosks", ("kiosks", "atms")),
)

CLASS_OF_SERVICE: dict[str, str] = {code: group.name for group in SERVICE_CLASSES for code in group.services}

_PERMILLE_BY_CODE: dict[str, int] = {service.code: traffic_weights()[service.id] for service in SERVICES}

# Share of taps per class, in permille (bus 750; sums to 1000).
CLASS_PERMILLE: dict[str, int] = {
    group.name: sum(_PERMILLE_BY_CODE.get(code, 0) for code in group.services) for group in SERVICE_CLASSES
}

# Cards sampled from the database: enough for a realistic spread of holders,
# small enough to read in well under a second.
DEFAULT_CARD_SAMPLE = 10_000

# Inactive cards (blocked, lost) kept aside to tap with on purpose.
INACTIVE_SAMPLE_MAX = 200

# Seeded uids all start with the NXP byte 0x04; a uid under 0x05 is one no
# city card has, so a tap with it must be answered UNKNOWN_CARD.
UNKNOWN_UID_PREFIX = (UID_MANUFACTURER_BYTE + 1) << 48

# The child process that reads the city may start the embedded server and
# wait for it; a minute covers a cold start on a slow disk.
PLAN_TIMEOUT_S = 120


class Terminal(msgspec.Struct, frozen=True):
    id: int
    service_code: str
    kind: int
    key_version: int


class Card(msgspec.Struct, frozen=True):
    uid: int
    profile_id: int
    balance_cents: int


class CityPlan(msgspec.Struct, frozen=True):
    """What the load generator knows about the city at the start of a run."""

    terminals: list[Terminal]  # active terminals, by id
    cards: list[Card]  # active cards, in a random but fixed order (the popularity rank)
    inactive_uids: list[int]  # blocked or lost cards


class PlanError(Exception):
    """The city could not be read (database unreachable, not seeded)."""


# --- reading the city ---------------------------------------------------------------


async def read_plan(dsn: str, cards: int, seed: int) -> CityPlan:
    """Read terminals and a card sample from a seeded database."""
    from engine.db import connect
    from engine.seed import list_terminals, sample_cards

    conn = await connect(dsn)
    try:
        terminals = await list_terminals(conn)
        active = await sample_cards(conn, cards, seed=seed)
        mixed = await sample_cards(conn, max(cards, INACTIVE_SAMPLE_MAX * 20), seed=seed + 1, active_only=False)
    finally:
        await conn.close()
    return CityPlan(
        terminals=[Terminal(t.id, t.service_code, t.kind, t.key_version) for t in terminals if t.status == 0],
        cards=[Card(card.uid, card.profile_id, card.balance_cents) for card in active],
        inactive_uids=[card.uid for card in mixed if card.status != CardStatus.ACTIVE][:INACTIVE_SAMPLE_MAX],
    )


def load_plan(dsn: str | None, data_dir: Path, cards: int = DEFAULT_CARD_SAMPLE, seed: int = 0) -> CityPlan:
    """Read the city in a child process (``python -m loadtest.city``) and decode it.

    With no DSN the child uses the embedded server in ``data_dir``; it starts
    it if it is not running, and then stops it again on exit (the engine
    normally runs it already).
    """
    command = [sys.executable, "-m", "loadtest.city", "--data-dir", str(data_dir), "--cards", str(cards)]
    command += ["--seed", str(seed)]
    if dsn:
        command += ["--dsn", dsn]
    try:
        completed = subprocess.run(command, capture_output=True, timeout=PLAN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise PlanError(f"reading the city took more than {PLAN_TIMEOUT_S} s") from None
    if completed.returncode != 0:
        raise PlanError(f"reading the city failed: {completed.stderr.decode(errors='replace').strip()}")
    plan = msgspec.json.decode(completed.stdout, type=CityPlan)
    if not plan.terminals or not plan.cards:
        raise PlanError("the database holds no active terminals or cards: seed it first (citycard seed)")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Print the city plan as JSON (what ``load_plan`` runs in a child process)."""
    from engine.db import default_data_dir, resolve_database

    parser = argparse.ArgumentParser(prog="python -m loadtest.city", description=main.__doc__)
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cards", type=int, default=DEFAULT_CARD_SAMPLE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with resolve_database(args.dsn, args.data_dir or default_data_dir()) as database:
        plan = asyncio.run(read_plan(database.dsn, args.cards, args.seed))
    sys.stdout.buffer.write(msgspec.json.encode(plan))
    return 0


# --- the mix --------------------------------------------------------------------------


def _by_deficit(weights: dict[str, float], capacity: dict[str, int] | None = None) -> list[str]:
    """Names in an order whose every prefix follows ``weights`` as closely as
    counts allow (largest deficit first; ties by the order of ``weights``).

    >>> _by_deficit({"a": 3, "b": 1})[:4]
    ['a', 'a', 'b', 'a']
    """
    left = dict(capacity) if capacity is not None else None
    names = [name for name in weights if weights[name] > 0 and (left is None or left[name] > 0)]
    total = sum(weights[name] for name in names)
    taken = dict.fromkeys(names, 0)
    order: list[str] = []
    limit = sum(left[name] for name in names) if left is not None else len(names) * 1000
    while names and len(order) < limit:
        n = len(order) + 1
        name = max(names, key=lambda x: (weights[x] / total * n - taken[x], -list(weights).index(x)))
        taken[name] += 1
        order.append(name)
        if left is not None:
            left[name] -= 1
            if left[name] == 0:
                names.remove(name)
    return order


_CLASS_NAMES = [group.name for group in SERVICE_CLASSES]
# Slots 0-4 take one class each (biggest first); later slots follow the weights.
_SLOT_ORDER = _CLASS_NAMES + _by_deficit({name: CLASS_PERMILLE[name] for name in _CLASS_NAMES})


def class_of_slot(slot: int) -> tuple[str, int]:
    """(service class, rank within the class) of a process-local user slot.

    >>> [class_of_slot(slot) for slot in range(6)]
    [('bus', 0), ('libraries', 0), ('pools', 0), ('parking', 0), ('kiosks', 0), ('bus', 1)]
    """
    if slot >= len(_SLOT_ORDER):
        # Beyond the precomputed order (thousands of users): plain bus slots.
        return "bus", _SLOT_ORDER.count("bus") + slot - len(_SLOT_ORDER)
    name = _SLOT_ORDER[slot]
    return name, _SLOT_ORDER[:slot].count(name)


def terminal_order(plan: CityPlan, class_name: str) -> list[Terminal]:
    """The class's terminals in the order users take them: services interleaved
    by traffic weight, so the first few users of a class hit its main services."""
    services = next(group.services for group in SERVICE_CLASSES if group.name == class_name)
    pools: dict[str, list[Terminal]] = {code: [] for code in services}
    for terminal in plan.terminals:
        if terminal.service_code in pools:
            pools[terminal.service_code].append(terminal)
    weights = {code: float(_PERMILLE_BY_CODE.get(code, 1)) for code in services}
    capacity = {code: len(pools[code]) for code in services}
    taken = dict.fromkeys(services, 0)
    ordered: list[Terminal] = []
    for code in _by_deficit(weights, capacity):
        ordered.append(pools[code][taken[code]])
        taken[code] += 1
    return ordered


def class_rate(class_name: str, users_by_class: dict[str, int], rate_per_terminal: float) -> float:
    """Requests a second for one user of ``class_name``, so that the process
    sends ``rate_per_terminal`` times its user count in total, split between
    the classes present by their traffic weights.

    >>> round(class_rate("bus", {"bus": 6, "kiosks": 2}, 10.0), 2)
    13.14
    """
    users = sum(users_by_class.values())
    mine = users_by_class.get(class_name, 0)
    present = sum(CLASS_PERMILLE[name] for name, count in users_by_class.items() if count > 0)
    if mine == 0 or present == 0:
        return rate_per_terminal
    return rate_per_terminal * users * CLASS_PERMILLE[class_name] / present / mine


class CardPicker:
    """Draws cards with Zipf-like popularity: the card of rank k is drawn with
    weight 1 / (k + 1) ** skew (skew 0 is uniform; 1 is classic Zipf)."""

    def __init__(self, cards: Sequence[Card], skew: float) -> None:
        if not cards:
            raise ValueError("no cards to draw from")
        self.cards = list(cards)
        self._cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** skew for rank in range(len(cards))))

    def draw(self, rng: random.Random) -> Card:
        point = rng.random() * self._cumulative[-1]
        return self.cards[min(bisect.bisect_right(self._cumulative, point), len(self.cards) - 1)]


def unknown_uid(rng: random.Random) -> int:
    """A uid no seeded card has (manufacturer byte 0x05)."""
    return UNKNOWN_UID_PREFIX | rng.getrandbits(48)


def is_kiosk(terminal: Terminal) -> bool:
    return terminal.kind == TerminalKind.KIOSK


if __name__ == "__main__":
    sys.exit(main())
