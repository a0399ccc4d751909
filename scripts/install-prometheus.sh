#!/usr/bin/env bash
# Install Prometheus and promtool (Debian's `prometheus` package) for the
# observability tests, if they are missing. Never fails the build: where they
# cannot be installed (no apt, not root, no network) it says why and exits 0,
# and the tests that need them skip with that reason.
set -uo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

skip() {
    echo "install-prometheus: $1; the tests that need prometheus/promtool will be skipped" >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || skip "apt-get is not available"
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        skip "not root and no password-less sudo"
    fi
else
    SUDO=()
fi

echo "install-prometheus: installing Debian's prometheus package (prometheus, promtool)" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq || skip "apt-get update failed"
# --no-install-recommends: the exporters and web assets it recommends are not needed.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null || skip "apt-get install prometheus failed"
# The package starts a system-wide Prometheus where systemd runs; the tests start their own.
command -v promtool >/dev/null 2>&1 || skip "the package did not provide promtool"
echo "install-prometheus: $(prometheus --version 2>&1 | head -n 1)" >&2
