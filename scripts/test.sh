#!/usr/bin/env bash
# Set up citycard in ./.venv (once) and run the whole test suite: lint and
# types, then the tests on the compiled fast path, then again on the
# pure-Python twin. Every test uses a real PostgreSQL (embedded, or
# $CITYCARD_TEST_DSN). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
echo "== lint"
.venv/bin/ruff check .
.venv/bin/cython-lint engine/_fastpath.pyx
.venv/bin/mypy
echo "== tests, compiled fast path"
.venv/bin/python -c 'import engine.fastpath as f, sys; sys.exit(f.IMPLEMENTATION != "cython")' \
    || { echo "the compiled fast path did not build" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
echo "== tests, pure-Python twin"
CITYCARD_NO_EXTENSIONS=1 .venv/bin/python -m pytest "$@"
