"""Coverage-guided fuzz targets (atheris) for the wire codec and the session.

- ``python -m fuzz.frames --runs N``: the frame reader and every decoder, on
  both twins at once, compared with each other (``fuzz/frames.py``).
- ``python -m fuzz.session --runs N``: the session state machine behind a
  fake transport (``fuzz/session.py``, on the rig of ``fuzz/rig.py``).

Each target starts from its regression corpus in ``fuzz/corpus/<target>/``
(hand-made frames from the vectors of docs/protocol.md). A target function
takes the fuzzer's bytes and raises only on a finding, so the corpus can also
be replayed without atheris (``tests/test_fuzz_smoke.py`` does). The
figures of the last long runs are in docs/reliability.md, "Fuzzing".
"""

from __future__ import annotations

from pathlib import Path

#: Where the checked-in regression inputs live, one directory per target.
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


class FuzzFinding(Exception):
    """An invariant of a fuzz target does not hold: a bug to report."""
