"""The host-stall probe finds slow windows, and only those (benchmarks.host_stalls)."""

from __future__ import annotations

from benchmarks.host_stalls import STALL_MERGE_S, WINDOW_MARGIN_NS, ProbeProcess, find_stalls

MS = 1_000_000
UNIT_NS = 100_000  # a 100 us unit, as on the development machine


def steady(start_ms: int, end_ms: int, every_ms: int = 5) -> list[tuple[int, int]]:
    return [(t * MS, UNIT_NS) for t in range(start_ms, end_ms, every_ms)]


def test_a_steady_cpu_has_no_stalls() -> None:
    stalls = find_stalls(steady(0, 1000))
    assert stalls.median_unit_ns == UNIT_NS
    assert stalls.windows == []
    assert stalls.stalled_percent == 0.0
    assert not stalls.overlaps(0, 1000 * MS)


def test_slow_units_close_together_make_one_window() -> None:
    # 100 ms in which every unit takes 12 times longer, as on the host.
    slow = [(t * MS, 12 * UNIT_NS) for t in range(500, 600, 5)]
    units = sorted([*steady(0, 500), *slow, *steady(600, 2000)])
    stalls = find_stalls(units)
    assert len(stalls.windows) == 1
    start, end = stalls.windows[0]
    assert start == 500 * MS - WINDOW_MARGIN_NS
    assert end == 595 * MS + 12 * UNIT_NS + WINDOW_MARGIN_NS
    assert 5.0 < stalls.stalled_percent < 6.0
    assert stalls.slowest_factor == 12.0
    described = stalls.describe()
    assert described["stall_windows"] == 1 and described["window_ms_max"] == round((end - start) / MS, 1)


def test_slow_units_far_apart_are_separate_windows() -> None:
    gap_ms = int(STALL_MERGE_S * 1000) * 4
    units = sorted([*steady(0, 1000), (100 * MS + 1, 10 * UNIT_NS), ((100 + gap_ms) * MS + 1, 10 * UNIT_NS)])
    assert len(find_stalls(units).windows) == 2


def test_a_unit_only_somewhat_slower_is_not_a_stall() -> None:
    units = sorted([*steady(0, 1000), (501 * MS, 3 * UNIT_NS)])
    assert find_stalls(units).windows == []


def test_overlaps_is_exact_at_the_edges() -> None:
    units = sorted([*steady(0, 500), (500 * MS, 10 * UNIT_NS), *steady(505, 3000)])
    stalls = find_stalls(units)
    ((start, end),) = stalls.windows
    assert stalls.overlaps(start - 10, start)
    assert stalls.overlaps(end, end + 10)
    assert stalls.overlaps(start - MS, end + MS)
    assert not stalls.overlaps(start - 2 * MS, start - 1)
    assert not stalls.overlaps(end + 1, end + MS)
    assert not stalls.overlaps(2000 * MS, 2500 * MS)


def test_no_units_at_all() -> None:
    stalls = find_stalls([])
    assert stalls.windows == [] and stalls.stalled_percent == 0.0


def test_the_probe_process_reports_what_it_measured() -> None:
    # In its own process, as the benchmark runs it: the child may switch
    # itself to the real-time scheduler, which this test process must not.
    probe = ProbeProcess(0.2)
    try:
        stalls = probe.result()
    finally:
        probe.kill()
    assert stalls.scheduler in ("fifo", "normal")
    assert stalls.median_unit_ns > 0
    assert 0.15 < (stalls.ended_ns - stalls.started_ns) / 1e9 < 1.0
