"""The wire codec and the per-tap decision, from the compiled fast path when there is one.

Import them from here (or from ``engine.decision`` and ``engine.ladder``),
never from the twins directly::

    from engine import fastpath
    frame = fastpath.encode_ping(1, 42)

``engine._fastpath`` (Cython) is used when it is built; otherwise, or when
the environment variable ``CITYCARD_NO_EXTENSIONS`` is set to anything but
``""`` or ``"0"``, ``engine._fastpath_py`` (pure Python) is. The two have the
same API, behaviour and error text, so the choice changes speed only.
``IMPLEMENTATION`` says which one was picked ("cython" or "pure"), for logs
and benchmark reports.
"""

from __future__ import annotations

import os

from engine import _fastpath_py
from engine._fastpath_py import *  # noqa: F403

#: The environment switch that forces the pure-Python twin, as in aiohttp's
#: AIOHTTP_NO_EXTENSIONS: for debugging, profiling Python code, or
#: platforms without a compiler.
NO_EXTENSIONS_ENV = "CITYCARD_NO_EXTENSIONS"


def extensions_disabled() -> bool:
    """True when CITYCARD_NO_EXTENSIONS asks for the pure-Python twin."""
    return os.environ.get(NO_EXTENSIONS_ENV, "") not in ("", "0")


IMPLEMENTATION = "pure"

if not extensions_disabled():
    try:
        from engine._fastpath import *  # type: ignore[import-not-found, unused-ignore]  # noqa: F403
    except ImportError:  # not built: the pure twin imported above stays
        pass
    else:
        IMPLEMENTATION = "cython"

__all__ = ["IMPLEMENTATION", "NO_EXTENSIONS_ENV", "extensions_disabled"]
__all__ += _fastpath_py.__all__
