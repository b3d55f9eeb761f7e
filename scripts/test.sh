#!/usr/bin/env bash
# The full test suite: unit, in-process integration and end-to-end tests (real binaries on
# loopback, port 0), then a short fuzz run of protocol detection and request-head parsing.
# Works on a fresh machine with only the Rust toolchain; installs what it needs.
#   FUZZ_SECONDS=0 scripts/test.sh   # skip the fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest..."
  cargo install cargo-nextest --locked --quiet
fi

cargo nextest run --workspace --all-targets --no-fail-fast

fuzz_seconds="${FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
