"""How steady is this machine's CPU? A probe that finds the moments it is not.

    python -m benchmarks.host_stalls --seconds 20 --json

A latency tail measured on a virtual machine can come from the engine or
from the host that runs the machine. The probe tells them apart: a separate
process runs a fixed unit of CPU work (about 100 us) every PROBE_INTERVAL_S
and times it. On a steady CPU every unit takes the same time; when the host
takes the CPU away, units take many times longer. Units slower than
STALL_FACTOR times the median mark a *stall*; stalls closer than
STALL_MERGE_S are one window.

On the 2-core development machine, idle, the probe finds a window of about
100 ms every 1.9 s in which both CPUs run 10-16 times slower (5-7% of wall
time), invisible to the guest kernel (no steal time reported). A tap that
arrives in such a window waits for it to end, whatever the engine does:
``benchmarks.end_to_end`` runs this probe beside its open loop and reports
the latency of the taps clear of any window next to the latency of all
(docs/performance.md, "The latency tail").

The probe runs under the real-time scheduler (SCHED_FIFO) when allowed
(root, or CAP_SYS_NICE): it then preempts every ordinary process at once, so
the benchmark's own load cannot slow it, and a slow unit means the host took
the CPU. Without that right it runs as an ordinary process, and the report
says so (``probe_scheduler``): busy neighbours in the guest then also count
as stalls.

The probe costs about 2% of one core. Its clock is ``time.perf_counter_ns``
(CLOCK_MONOTONIC on Linux), the same in every process, so windows compare
directly with the load generator's timestamps.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from benchmarks.common import describe_machine, print_json

# One unit of work: long enough to be timed well above the clock's
# resolution and the cost of a context switch, short enough that the probe
# takes ~2% of a core at one unit per PROBE_INTERVAL_S.
WORK_UNIT_ITERATIONS = 1500
PROBE_INTERVAL_S = 0.005

# A unit taking 4x the median did not merely meet a cache miss or an
# interrupt (those cost microseconds): the CPU was given to someone else.
STALL_FACTOR = 4.0

# Slow units closer than this belong to one window: within a host stall the
# probe's own sleeps make the slow units a few milliseconds apart.
STALL_MERGE_S = 0.05

# A unit's window is widened by the probe's interval on both sides: the
# stall may have begun just after the previous unit, or end just after this one.
WINDOW_MARGIN_NS = int(PROBE_INTERVAL_S * 1e9)

DEFAULT_SECONDS = 20.0


def _work_unit() -> int:
    total = 0
    for i in range(WORK_UNIT_ITERATIONS):
        total += i * i
    return total


# Real-time priority of the probe: above every ordinary process; low among
# real-time ones (kernel threads that use SCHED_FIFO run at 50 and above).
PROBE_RT_PRIORITY = 10


def use_realtime_scheduler() -> str:
    """Move this process to SCHED_FIFO if allowed; return the policy in use."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PROBE_RT_PRIORITY))
    except (PermissionError, AttributeError, OSError):
        return "normal"
    return "fifo"


# Set by SIGTERM in the probe's child process: stop early, report what was probed.
_stop_requested = False


def _request_stop(_signum: int, _frame: object) -> None:
    global _stop_requested
    _stop_requested = True


def probe(seconds: float) -> list[tuple[int, int]]:
    """Run the probe for ``seconds`` (or until SIGTERM in the child); return
    (start_ns, duration_ns) of every unit."""
    units: list[tuple[int, int]] = []
    end = time.perf_counter_ns() + int(seconds * 1e9)
    while True:
        started = time.perf_counter_ns()
        if started >= end or _stop_requested:
            return units
        _work_unit()
        units.append((started, time.perf_counter_ns() - started))
        time.sleep(PROBE_INTERVAL_S)


@dataclass
class Stalls:
    """What the probe found: the median unit and the stall windows."""

    median_unit_ns: int
    windows: list[tuple[int, int]]
    started_ns: int
    ended_ns: int
    slowest_factor: float
    scheduler: str = "normal"

    @property
    def stalled_percent(self) -> float:
        span = self.ended_ns - self.started_ns
        stalled = sum(end - start for start, end in self.windows)
        return round(100.0 * stalled / span, 2) if span > 0 else 0.0

    def overlaps(self, start_ns: int, end_ns: int) -> bool:
        """Whether [start_ns, end_ns] touches a stall window."""
        index = bisect.bisect_left(self.windows, (start_ns, start_ns)) - 1
        for window_start, window_end in self.windows[max(index, 0) :]:
            if window_start > end_ns:
                return False
            if window_end >= start_ns:
                return True
        return False

    def describe(self) -> dict[str, object]:
        span_s = (self.ended_ns - self.started_ns) / 1e9
        lengths = [(end - start) / 1e6 for start, end in self.windows]
        starts = [start for start, _ in self.windows]
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(starts)]
        return {
            "probe_seconds": round(span_s, 2),
            "median_unit_us": round(self.median_unit_ns / 1000, 1),
            "stall_factor": STALL_FACTOR,
            "stall_windows": len(self.windows),
            "stalled_percent": self.stalled_percent,
            "window_ms_median": round(statistics.median(lengths), 1) if lengths else None,
            "window_ms_max": round(max(lengths), 1) if lengths else None,
            "window_interval_s_median": round(statistics.median(gaps), 2) if gaps else None,
            "slowest_unit_factor": round(self.slowest_factor, 1),
            "probe_scheduler": self.scheduler,
        }


def find_stalls(units: Sequence[tuple[int, int]], scheduler: str = "normal") -> Stalls:
    """Windows of units slower than STALL_FACTOR x the median."""
    if not units:
        now = time.perf_counter_ns()
        return Stalls(0, [], now, now, 0.0, scheduler)
    median = int(statistics.median(duration for _, duration in units))
    threshold = median * STALL_FACTOR
    merge_ns = int(STALL_MERGE_S * 1e9)
    windows: list[tuple[int, int]] = []
    slowest = 0.0
    for started, duration in units:
        slowest = max(slowest, duration / median if median else 0.0)
        if duration <= threshold:
            continue
        start, end = started - WINDOW_MARGIN_NS, started + duration + WINDOW_MARGIN_NS
        if windows and start - windows[-1][1] <= merge_ns:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    last_start, last_duration = units[-1]
    return Stalls(median, windows, units[0][0], last_start + last_duration, slowest, scheduler)


class ProbeProcess:
    """The probe in its own process, so that it competes for the CPU like any
    other process and is not delayed by the load generator's event loop."""

    def __init__(self, seconds: float) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.host_stalls", "--probe", str(seconds)],
            stdout=subprocess.PIPE,
        )

    def stop(self) -> None:
        """Ask the probe to end now: ``result()`` then has what it probed so far."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)

    def result(self) -> Stalls:
        output, _ = self._process.communicate()
        if self._process.returncode != 0:
            raise RuntimeError(f"host stall probe exited {self._process.returncode}")
        result = orjson.loads(output)
        return find_stalls([(start, duration) for start, duration in result["units"]], result["scheduler"])

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_stalls", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="how long to probe")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--probe", type=float, help=argparse.SUPPRESS)  # the child: raw units on stdout
    args = parser.parse_args(argv)
    if args.probe is not None:
        signal.signal(signal.SIGTERM, _request_stop)
        scheduler = use_realtime_scheduler()
        sys.stdout.buffer.write(orjson.dumps({"scheduler": scheduler, "units": probe(args.probe)}))
        return 0
    scheduler = use_realtime_scheduler()
    stalls = find_stalls(probe(args.seconds), scheduler)
    report = {"benchmark": "host_stalls", **stalls.describe(), "machine": describe_machine()}
    if args.json:
        print_json(report)
    else:
        for key, value in report.items():
            if key != "machine":
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
