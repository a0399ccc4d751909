# Sourced by the other scripts: create ./.venv and install citycard with its
# development extras, compiling the Cython fast path. Idempotent.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "citycard needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
CITYCARD_REQUIRE_EXTENSION=1 .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# Tools run from the venv find each other (cython-lint runs pycodestyle).
export PATH="$PWD/.venv/bin:$PATH"
