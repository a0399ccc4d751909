"""The decision ladder: one synchronous function per request kind.

Each function walks an ordered ladder of guards, each returning a result
code, in the precedence order of ``engine.codes.ResultCode``. After the last
guard the request must succeed: the only state it changes is the card's
pending amount, which the batch writer turns into a committed balance or
undoes.

No database, no I/O: everything needed is in the CityState. Rules added
later (passes, transfers, caps, concessions) are further rungs here.

The ladder lives in the per-tap decision fast path (``engine/_fastpath.pyx``,
twin ``engine/_fastpath_py.py``: change both) and is re-exported here from
``engine.fastpath``, which picks the twin.
"""

from __future__ import annotations

from engine.fastpath import (
    TAP_FLAG_EXIT,
    TAP_FLAGS_KNOWN,
    Original,
    decide_reversal,
    decide_tap,
    decide_topup,
)

__all__ = [
    "TAP_FLAGS_KNOWN",
    "TAP_FLAG_EXIT",
    "Original",
    "decide_reversal",
    "decide_tap",
    "decide_topup",
]
