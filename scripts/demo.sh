#!/usr/bin/env bash
# Set up citycard in ./.venv (once) and run the demo: an embedded PostgreSQL in
# ./var, a seeded city of 340,000 cards (first run only), and the engine
# listening for terminals on 127.0.0.1:7700 (metrics on 127.0.0.1:9700).
# Extra arguments go to `citycard demo` (e.g. --cards 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh
exec .venv/bin/citycard demo "$@"
