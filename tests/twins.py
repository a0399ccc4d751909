"""The two twins of the fast path, for tests that run against both.

``load_twin("cython")`` imports ``engine._fastpath``; ``load_twin("pure")``
imports ``engine._fastpath_py``. A missing compiled twin FAILS the test
instead of skipping it, so that a broken build is never mistaken for a green
run, unless ``CITYCARD_NO_EXTENSIONS`` is set (then the compiled half is
skipped on purpose). Test modules build their fixtures on it::

    @pytest.fixture(scope="module", params=list(TWIN_MODULES))
    def fp(request):
        return load_twin(request.param)
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

TWIN_MODULES = {"cython": "engine._fastpath", "pure": "engine._fastpath_py"}


def extensions_disabled() -> bool:
    # The same rule as engine.fastpath: "" and "0" mean "not set".
    return os.environ.get("CITYCARD_NO_EXTENSIONS", "") not in ("", "0")


def load_twin(name: str) -> ModuleType:
    """Import one twin; a missing compiled twin fails unless disabled."""
    try:
        return importlib.import_module(TWIN_MODULES[name])
    except ImportError as exc:
        if name == "cython" and extensions_disabled():
            pytest.skip("CITYCARD_NO_EXTENSIONS is set and engine._fastpath is not built: testing the pure twin only")
        pytest.fail(
            f"cannot import {TWIN_MODULES[name]} ({exc}); build it with"
            " `.venv/bin/cythonize -i -3 engine/_fastpath.pyx`, or set"
            " CITYCARD_NO_EXTENSIONS=1 to test the pure twin only"
        )
