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

# The dashboard test drives a real headless Chromium; the Prometheus test runs a real
# Prometheus against the demo mesh.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing ${need[*]}..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The shipped Prometheus rules and their unit tests.
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml

cargo nextest run --workspace --all-targets --no-fail-fast

fuzz_seconds="${FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ]; then
  scripts/fuzz.sh "$fuzz_seconds"
fi
