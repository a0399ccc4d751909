#!/usr/bin/env bash
# A short headless locust run against a fresh engine; fails on any failure.
#
# In a new temporary data dir: seed a small city (the embedded PostgreSQL is
# started for it and stopped again), serve it (serve starts the embedded
# server and stops it when it exits), run loadtest/locustfile.py headless
# for a few seconds with a handful of terminals, then require requests,
# zero failures and a balanced ledger. Everything started here is stopped
# on exit, whatever happens.
#
#   scripts/locust-smoke.sh                 # 8 terminals for 10 s
#   SMOKE_USERS=20 SMOKE_SECONDS=30 scripts/locust-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

users="${SMOKE_USERS:-8}"
seconds="${SMOKE_SECONDS:-10}"
cards="${SMOKE_CARDS:-2000}"
py=.venv/bin/python

# The smoke run owns its database: never a server named by the environment.
unset CITYCARD_DSN CITYCARD_DATA_DIR

dir="$(mktemp -d "${TMPDIR:-/tmp}/citycard-smoke-XXXXXX")"
engine_pid=""

cleanup() {
    local status=$?
    if [[ -n "$engine_pid" ]] && kill -0 "$engine_pid" 2>/dev/null; then
        kill -TERM "$engine_pid" 2>/dev/null || true
        wait "$engine_pid" 2>/dev/null || true
    fi
    # serve stops the server it started; this covers a serve that died first.
    "$py" - "$dir/pg" <<'EOF' || true
import sys
from pathlib import Path

from engine.embedded_db import EmbeddedPostgres

EmbeddedPostgres(Path(sys.argv[1])).stop()
EOF
    if [[ $status -ne 0 && -f "$dir/engine.err" ]]; then
        echo "--- engine stderr (tail)" >&2
        tail -n 20 "$dir/engine.err" >&2
    fi
    rm -rf "$dir"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== seed $cards cards in $dir"
.venv/bin/citycard seed --cards "$cards" --data-dir "$dir" >"$dir/seed.out"

echo "== serve"
.venv/bin/citycard serve --listen 127.0.0.1:0 --metrics off --admin off --data-dir "$dir" \
    >"$dir/engine.out" 2>"$dir/engine.err" &
engine_pid=$!
address=""
for _ in $(seq 1 600); do  # up to 60 s: the embedded server starts first
    if ! kill -0 "$engine_pid" 2>/dev/null; then
        echo "the engine exited before listening" >&2
        exit 1
    fi
    address="$("$py" -c 'import json, sys
for line in open(sys.argv[1]):
    if "listening" in line:
        print(json.loads(line)["listening"])
        break' "$dir/engine.out")"
    [[ -n "$address" ]] && break
    sleep 0.1
done
if [[ -z "$address" ]]; then
    echo "the engine did not print its listening line within 60 s" >&2
    exit 1
fi
echo "engine listening on $address"

echo "== locust: $users terminals for ${seconds}s"
locust_status=0
.venv/bin/locust -f loadtest/locustfile.py --headless -u "$users" -r "$users" -t "${seconds}s" \
    --host "tcp://$address" --data-dir "$dir" --csv "$dir/smoke" --only-summary \
    --exit-code-on-error 1 --loglevel WARNING || locust_status=$?

echo "== check"
"$py" - "$dir/smoke" "$seconds" <<'EOF'
import csv
import sys

prefix, seconds = sys.argv[1], float(sys.argv[2])
with open(f"{prefix}_stats.csv", newline="") as file:
    rows = list(csv.DictReader(file))
total = next((row for row in rows if row["Name"] == "Aggregated"), None)
if total is None:
    sys.exit(f"smoke failed: no Aggregated row in {prefix}_stats.csv")
requests, failures = int(total["Request Count"]), int(total["Failure Count"])
print(
    f"requests {requests}, failures {failures}, {float(total['Requests/s']):.1f} requests/s,"
    f" median {total['50%']} ms, p99 {total['99%']} ms"
)
for row in rows:
    if row["Name"] != "Aggregated":
        print(f"  {row['Type']:<9} {row['Name']:<18} {row['Request Count']:>7} requests {row['Failure Count']:>4} failures")
try:
    with open(f"{prefix}_outcomes.csv", newline="") as file:
        outcomes = list(csv.DictReader(file))
except FileNotFoundError:
    outcomes = []
declined = sum(int(row["Count"]) for row in outcomes if row["Result"] != "APPROVED")
print(f"outcomes: {sum(int(row['Count']) for row in outcomes)} answers, {declined} not approved (declines are valid)")
if failures or requests < seconds:  # at the very least one request a second
    sys.exit(f"smoke failed: {requests} requests, {failures} failures")
EOF
if [[ $locust_status -ne 0 ]]; then
    echo "locust exited with $locust_status" >&2
    exit "$locust_status"
fi

echo "== ledger"
.venv/bin/citycard status --data-dir "$dir" >"$dir/status.out" \
    || { cat "$dir/status.out" >&2; echo "the ledger does not balance after the run" >&2; exit 1; }

kill -TERM "$engine_pid"
wait "$engine_pid" || { echo "the engine did not stop cleanly" >&2; exit 1; }
engine_pid=""
echo "locust smoke: ok"
