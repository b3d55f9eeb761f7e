#!/usr/bin/env bash
# Runs the protocol-detection / request-head fuzzer for a bounded time.
#   scripts/fuzz.sh [SECONDS]   (default 60)
# Needs cargo-fuzz (installed here if missing). cargo-fuzz needs nightly-only rustc flags; with
# only a stable toolchain on the machine we opt in with RUSTC_BOOTSTRAP=1, for this build only.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz..."
  cargo install cargo-fuzz --locked --quiet
fi
mkdir -p fuzz/corpus/detect_and_head
# Seeds: one of each protocol the detector knows.
printf 'GET / HTTP/1.1\r\nHost: a\r\n\r\n' > fuzz/corpus/detect_and_head/http1
printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' > fuzz/corpus/detect_and_head/h2
printf '\x16\x03\x01\x02\x00\x01' > fuzz/corpus/detect_and_head/tls
printf 'CONNECT db:5432 HTTP/1.1\r\n\r\n' > fuzz/corpus/detect_and_head/connect
cd fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run detect_and_head --sanitizer none -- \
  -max_total_time="$seconds" -max_len=4096
