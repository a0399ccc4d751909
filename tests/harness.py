"""Running a benchmark or fault harness as a subprocess and reading its JSON.

The harnesses (``benchmarks.crash``, ``benchmarks.network_faults``,
``benchmarks.flood``) print exactly one JSON object with ``--json``; tests
run them the way an operator would and check that object.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def run_json_module(module: str, *arguments: str, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """``python -m module --json arguments...``: its exit code and its report.

    Fails the test, with the output's tail, unless exactly one line was printed.
    """
    completed = subprocess.run(
        [sys.executable, "-m", module, "--json", *arguments],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout: {completed.stdout[-2000:]}\nstderr: {completed.stderr[-4000:]}"
    report = orjson.loads(lines[0])
    assert isinstance(report, dict)
    return completed.returncode, report
