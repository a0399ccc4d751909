"""Latency versus throughput: the open-loop curve as a PNG.

>>> points = [{"achieved_rate": 500.0, "p50_ms": 1.0, "p99_ms": 3.0},
...           {"achieved_rate": 2000.0, "p50_ms": 1.5, "p99_ms": 9.0}]
>>> write_latency_curve(points, Path("/tmp/curve.png"), title="demo")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Where plots go by default (kept out of git: see .gitignore).
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The latency objective drawn on the plot (docs/performance.md).
OBJECTIVE_P99_MS = 10.0


def write_latency_curve(points: Sequence[dict[str, object]], path: Path, *, title: str) -> Path:
    """Plot p50 and p99 (log scale) against the achieved rate; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    rates = [float(point["achieved_rate"]) for point in points]  # type: ignore[arg-type]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        values = [float(point[key]) for point in points if key in point]  # type: ignore[arg-type]
        if len(values) == len(rates):
            axes.plot(rates, values, marker="o", label=label)
    axes.axhline(OBJECTIVE_P99_MS, linestyle="--", color="grey", label=f"objective p99 {OBJECTIVE_P99_MS:g} ms")
    axes.set_yscale("log")
    axes.set_xlabel("taps per second (achieved, open loop)")
    axes.set_ylabel("latency from scheduled send (ms)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
