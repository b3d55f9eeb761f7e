#!/usr/bin/env bash
# Control-plane push benchmark: a real `trellis control` and a simulated mesh of 10,000
# instances (one session each, like one proxy each) of 1,000 services.
#   bench/push.sh            # defaults; BENCH_PUSH_ARGS="--instances 2000" for a smaller run
# Writes bench/results/push-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || true
cargo build --release -q -p trellis-cli -p trellis-bench
work=$(mktemp -d)
trap 'kill "$cp" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc="127.0.0.1:$(free_port)"; http="127.0.0.1:$(free_port)"
./target/release/trellis control --grpc "$grpc" --http "$http" --data-dir "$work/data" --log-level warn &
cp=$!
for _ in $(seq 100); do curl -sf "http://$http/healthz" >/dev/null && break; sleep 0.1; done
mkdir -p bench/results
{
  echo "Run: $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
  echo
  timeout 600 ./target/release/trellis-bench-push --control "$grpc" --http "$http" --data-dir "$work/data" --pid "$cp" ${BENCH_PUSH_ARGS:-}
} | tee bench/results/push-latest.md
