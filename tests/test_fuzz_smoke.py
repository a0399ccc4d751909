"""The fuzz targets on a small budget, and their regression corpus replayed.

Each target runs in its own process (atheris takes over the process and
exits it), from the checked-in corpus in ``fuzz/corpus/``, and must exit 0:
no crash, no invariant broken, no hang (libFuzzer's per-input timeout), no
RSS above its limit. The long runs and their figures are in
docs/reliability.md, "Fuzzing". The corpus is also replayed in this process
through the target functions, which needs no atheris, so a regression input
fails the suite even where atheris is not installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import CORPUS_DIR, frames, session

ROOT = Path(__file__).resolve().parent.parent

# Budgets measured on the shared 2-core machine: ~10,000 inputs/s for the
# frame target and ~2,000/s for the session target from the checked-in
# corpus, so each run is a few seconds.
SMOKE_RUNS = {"frames": 50_000, "session": 5_000}
SMOKE_TIMEOUT_S = 120  # far above the few seconds a smoke run takes

needs_atheris = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install -e '.[dev]'): the corpus replay below still runs",
)


def corpus(target: str) -> list[Path]:
    inputs = sorted((CORPUS_DIR / target).iterdir())
    assert inputs, f"no regression inputs in {CORPUS_DIR / target}"
    return inputs


@needs_atheris
@pytest.mark.parametrize("target", sorted(SMOKE_RUNS))
def test_fuzz_target_small_budget(target: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", f"fuzz.{target}", "--runs", str(SMOKE_RUNS[target]), "--", "-seed=1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"Done {SMOKE_RUNS[target]} runs" in completed.stderr


@pytest.mark.parametrize("path", corpus("frames"), ids=lambda path: path.name)
def test_frames_corpus_replays(path: Path) -> None:
    frames.check_input(path.read_bytes(), frames.load_twins("both"))


@pytest.mark.parametrize("path", corpus("session"), ids=lambda path: path.name)
def test_session_corpus_replays(path: Path) -> None:
    asyncio.run(session.run_input(path.read_bytes()))
