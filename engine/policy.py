"""A rules version, compiled into what the fast path reads.

``engine.rules`` holds a rules version as data (msgspec structs, by service
code and profile code). The decision ladder reads plain integers by service
id instead: one ``array('q')`` policy row per service (the POLICY_* fields of
``engine.fastpath``) and a few city-wide numbers on ``CityState``. Building
them is done once per version, off the tap path; installing them is a few
assignments with no await in between, so no tap sees half of a version.

    policy = compile_policy(rules, service_ids={"bus": 0, ...}, group_id=state.group_id)
    policy.install(state)
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine import fastpath
from engine.rules import Rules, RulesError
from engine.state import NO_CAP_CENTS, CityState

_MS_PER_SECOND = 1000
_MS_PER_MINUTE = 60_000


@dataclass
class CompiledPolicy:
    """Everything ``install`` puts on a CityState."""

    service_policy: dict[int, array[int]] = field(default_factory=dict)
    transfer_window_ms: int = 0
    transfer_percent_off: int = 0
    cap_daily: array[int] = field(default_factory=lambda: array("q", [NO_CAP_CENTS] * fastpath.CAP_GROUPS_MAX))
    cap_monthly: array[int] = field(default_factory=lambda: array("q", [NO_CAP_CENTS] * fastpath.CAP_GROUPS_MAX))
    cap_groups: dict[str, int] = field(default_factory=dict)
    show_id_permille: int = 0
    clone_blocks_card: bool = False
    sharing_max_speed_kmh: int = 0  # 0: the sharing check is off
    sharing_min_distance_m: int = 0
    renewal_window_days: int = 0

    def settings_row(self) -> array[int]:
        """The city-wide settings as the fast path reads them (``state.settings``):
        one int64 per SETTING_* field of engine.fastpath."""
        row = array("q", [0] * fastpath.SETTINGS_FIELDS)
        row[fastpath.SETTING_TRANSFER_WINDOW_MS] = self.transfer_window_ms
        row[fastpath.SETTING_TRANSFER_PERCENT_OFF] = self.transfer_percent_off
        row[fastpath.SETTING_SHOW_ID_PERMILLE] = self.show_id_permille
        row[fastpath.SETTING_CLONE_BLOCKS_CARD] = int(self.clone_blocks_card)
        row[fastpath.SETTING_SHARING_MAX_SPEED_KMH] = self.sharing_max_speed_kmh
        row[fastpath.SETTING_SHARING_MIN_DISTANCE_M] = self.sharing_min_distance_m
        row[fastpath.SETTING_RENEWAL_WINDOW_DAYS] = self.renewal_window_days
        return row

    def install(self, state: CityState) -> None:
        """Put this policy in force on ``state`` (between two taps)."""
        state.service_policy = self.service_policy
        state.transfer_window_ms = self.transfer_window_ms
        state.transfer_percent_off = self.transfer_percent_off
        state.cap_daily = self.cap_daily
        state.cap_monthly = self.cap_monthly
        state.show_id_permille = self.show_id_permille
        state.clone_blocks_card = self.clone_blocks_card
        state.sharing_max_speed_kmh = self.sharing_max_speed_kmh
        state.sharing_min_distance_m = self.sharing_min_distance_m
        state.renewal_window_days = self.renewal_window_days


def compile_policy(rules: Rules, service_ids: Mapping[str, int], group_id: Callable[[str], int]) -> CompiledPolicy:
    """The fast path's view of ``rules``; ``service_ids`` maps codes to ids,
    ``group_id`` service group codes to the numbers products hold
    (``CityState.group_id``).

    Raises RulesError when the version needs more cap groups than the engine
    keeps per card (fastpath.CAP_GROUPS_MAX).
    """
    compiled = CompiledPolicy()
    for number, cap in enumerate(rules.caps):
        if number >= fastpath.CAP_GROUPS_MAX:
            raise RulesError(f"at most {fastpath.CAP_GROUPS_MAX} capped groups, the rules have {len(rules.caps)}")
        compiled.cap_groups[cap.group] = number
        compiled.cap_daily[number] = cap.daily_cents if cap.daily_cents is not None else NO_CAP_CENTS
        compiled.cap_monthly[number] = cap.monthly_cents if cap.monthly_cents is not None else NO_CAP_CENTS
    transfer_services: set[str] = set()
    if rules.transfer is not None:
        transfer_services = set(rules.transfer.services)
        compiled.transfer_window_ms = rules.transfer.window_minutes * _MS_PER_MINUTE
        compiled.transfer_percent_off = rules.transfer.percent_off
    for service in rules.services:
        service_id = service_ids.get(service.code)
        if service_id is None:
            raise RulesError(f"service {service.code!r} of the rules is not in the database")
        row = array("q", [0] * fastpath.POLICY_FIELDS)
        row[fastpath.POLICY_KIND] = service.service_kind
        row[fastpath.POLICY_MIN_BALANCE] = service.min_balance_to_enter_cents
        row[fastpath.POLICY_TOLERATED_NEGATIVE] = service.tolerated_negative_cents
        row[fastpath.POLICY_PASSBACK_MS] = service.passback_window_s * _MS_PER_SECOND
        row[fastpath.POLICY_TRANSFER] = 1 if service.code in transfer_services else 0
        row[fastpath.POLICY_CAP_GROUP] = compiled.cap_groups.get(service.group or service.code, fastpath.NO_CAP)
        row[fastpath.POLICY_MAX_CHARGE] = service.max_charge_cents or 0
        # Every service names its group, sold products or not: a pass sold
        # under an earlier version keeps paying while it is valid.
        row[fastpath.POLICY_GROUP] = group_id(service.group or service.code)
        compiled.service_policy[service_id] = row
    compiled.show_id_permille = rules.concessions.show_id_permille
    compiled.renewal_window_days = rules.concessions.renewal_window_days
    compiled.clone_blocks_card = rules.security.clone_blocks_card
    compiled.sharing_max_speed_kmh = rules.security.sharing_max_speed_kmh
    compiled.sharing_min_distance_m = rules.security.sharing_min_distance_m
    return compiled
