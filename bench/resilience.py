#!/usr/bin/env python3
"""Helpers for bench/resilience.sh (python3 stdlib only; reuses bench/lib.py).

Subcommands:
  wait-listening LOG PID TIMEOUT      wait for `listening ADDR` as LOG's first line; print ADDR
                                      (exit 1 on timeout, 3 if PID died)
  wait-trellis ADMIN N TIMEOUT [PID..]
                                      poll the client proxy's GET /config until destination
                                      `backend` has N healthy endpoints and the route's retry
                                      and timeout and the DestinationPolicy are in force
  scrape TARGET ADMIN OUT             counters of the client side (TARGET trellis: /metrics;
                                      envoy: /stats) as JSON in OUT
  backend-stats OUT ADDR..            GET /__stats of each backend instance, JSON list in OUT
                                      (an instance that does not answer is recorded as null)
  watch-rotation TARGET ADMIN VICTIM KILL_EPOCH TIMEOUT OUT
                                      poll every 50 ms until the client side stops sending to
                                      VICTIM (ip:port): trellis: gone from /config or not
                                      `healthy`; envoy: /clusters health_flags show
                                      failed_outlier_check (or the host is gone). Writes
                                      "MS REASON" (ms since KILL_EPOCH) or "never" to OUT
  oha-summary FILE                    one-line summary of an oha JSON result
  report RECORDS OUT_MD               the markdown report
"""

import glob
import json
import os
import re
import statistics
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402  (bench/lib.py: pid_alive, read_lines)

N_INSTANCES = 3


def http_get(url, timeout=2.0):
    """(status, text); status 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except Exception as e:  # refused, reset, timeout
        return 0, f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------
# start-up
# --------------------------------------------------------------------------

def wait_listening(log, pid, timeout):
    deadline = time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        try:
            with open(log) as f:
                first = f.readline().strip()
        except OSError:
            first = ""
        if first.startswith("listening "):
            print(first.split(" ", 1)[1])
            return 0
        if not lib.pid_alive(int(pid)):
            print(f"process {pid} exited before printing its address", file=sys.stderr)
            return 3
        time.sleep(0.05)
    print(f"no `listening ADDR` line in {log} within {timeout}s", file=sys.stderr)
    return 1


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def trellis_ready_state(cfg, n):
    """'' when ready, else what is still missing."""
    dest = _get(cfg, "destinations", "backend")
    if not isinstance(dest, dict):
        return "destination backend unknown"
    eps = dest.get("endpoints") or []
    healthy = [e for e in eps if e.get("state") == "healthy"]
    if len(eps) != n or len(healthy) != n:
        return f"{len(healthy)}/{len(eps)} healthy endpoints, want {n}"
    rules = _get(dest, "routes", "rules") or []
    if not rules or not rules[0].get("retry"):
        return "route retry not pushed"
    keys = [k for k in ("request_timeout", "requestTimeout") if k in rules[0]]
    if keys and all(rules[0][k] is None for k in keys):
        return "route timeout not pushed"
    policy = dest.get("policy") or {}
    if _get(policy, "outlier", "consecutiveFailures") != 5:
        return "circuitBreaker not pushed"
    if _get(policy, "retryBudget", "minPerSecond") != 10:
        return "retryBudget not pushed"
    return ""


def wait_trellis(admin, n, timeout, pids):
    deadline = time.monotonic() + float(timeout)
    last = "no answer"
    while time.monotonic() < deadline:
        for p in pids:
            if not lib.pid_alive(p):
                print(f"process {p} exited while waiting for the client's config ({last})",
                      file=sys.stderr)
                return 3
        status, text = http_get(f"http://{admin}/config")
        if status == 200:
            try:
                last = trellis_ready_state(json.loads(text), n)
            except ValueError as e:
                last = f"bad /config JSON: {e}"
            if not last:
                return 0
        else:
            last = f"/config: {status or text}"
        time.sleep(0.2)
    print(f"client proxy not configured within {timeout}s: {last}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------

PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def prom_sum(text, name, include=(), exclude=()):
    """Sum of the samples of metric NAME whose label set contains every `include` and no
    `exclude` fragment (e.g. 'result="retried"')."""
    total = 0.0
    for line in text.splitlines():
        m = PROM_LINE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = m.group(2) or ""
        if all(f in labels for f in include) and not any(f in labels for f in exclude):
            try:
                total += float(m.group(3))
            except ValueError:
                pass
    return total


def scrape_trellis(admin):
    status, text = http_get(f"http://{admin}/metrics", timeout=5)
    if status != 200:
        return {"error": f"/metrics: {status or text}"}
    return {
        "retries": prom_sum(text, "trellis_http_retries_total", include=['result="retried"']),
        "retries_refused": prom_sum(text, "trellis_http_retries_total",
                                    include=['result="budget-exhausted"']),
        "ejections": prom_sum(text, "trellis_endpoint_ejections_total",
                              exclude=['reason="refused-max-percent"']),
        "ejections_refused": prom_sum(text, "trellis_endpoint_ejections_total",
                                      include=['reason="refused-max-percent"']),
    }


ENVOY_STATS = {
    "retries": "cluster.backend.upstream_rq_retry",
    "retries_refused": "cluster.backend.upstream_rq_retry_overflow",
    "ejections": "cluster.backend.outlier_detection.ejections_enforced_total",
    "ejections_refused": "cluster.backend.outlier_detection.ejections_overflow",
    "retry_success": "cluster.backend.upstream_rq_retry_success",
    "connect_fail": "cluster.backend.upstream_cx_connect_fail",
    "rq_timeout": "cluster.backend.upstream_rq_timeout",
}


def scrape_envoy(admin):
    status, text = http_get(f"http://{admin}/stats", timeout=5)
    if status != 200:
        return {"error": f"/stats: {status or text}"}
    values = {}
    for line in text.splitlines():
        k, sep, v = line.partition(": ")
        if sep:
            values[k.strip()] = v.strip()
    out = {}
    for key, stat in ENVOY_STATS.items():
        try:
            out[key] = float(values[stat])
        except (KeyError, ValueError):
            out[key] = None
    return out


def scrape(target, admin, out):
    data = scrape_trellis(admin) if target == "trellis" else scrape_envoy(admin)
    with open(out, "w") as f:
        json.dump(data, f)
    if "error" in data:
        print(data["error"], file=sys.stderr)
        return 1
    return 0


def backend_stats(out, addrs):
    res = []
    for a in addrs:
        status, text = http_get(f"http://{a}/__stats", timeout=2)
        try:
            res.append(json.loads(text) if status == 200 else None)
        except ValueError:
            res.append(None)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


# --------------------------------------------------------------------------
# time out of rotation after a kill
# --------------------------------------------------------------------------

def _trellis_victim_state(admin, victim):
    status, text = http_get(f"http://{admin}/config", timeout=1)
    if status != 200:
        return None
    try:
        eps = _get(json.loads(text), "destinations", "backend", "endpoints") or []
    except ValueError:
        return None
    port = victim.rsplit(":", 1)[-1]
    for e in eps:
        addr = str(e.get("address", ""))
        if addr == victim or addr.endswith(":" + port):
            st = e.get("state", "?")
            return None if st in ("healthy", "half-open") else st
    return "removed"


def _envoy_victim_state(admin, victim):
    status, text = http_get(f"http://{admin}/clusters", timeout=1)
    if status != 200:
        return None
    seen = False
    for line in text.splitlines():
        if line.startswith(f"backend::{victim}::"):
            seen = True
            if line.startswith(f"backend::{victim}::health_flags::"):
                flags = line.split("::health_flags::", 1)[1]
                if "failed_outlier_check" in flags:
                    return "ejected"
                if flags.strip() != "healthy":
                    return flags.strip()
    return None if seen else "removed"


def watch_rotation(target, admin, victim, kill_epoch, timeout, out):
    probe = _trellis_victim_state if target == "trellis" else _envoy_victim_state
    deadline = time.monotonic() + float(timeout)
    result = "never"
    while time.monotonic() < deadline:
        state = probe(admin, victim)
        if state:
            ms = (time.time() - float(kill_epoch)) * 1000.0
            result = f"{ms:.0f} {state}"
            break
        time.sleep(0.05)
    with open(out, "w") as f:
        f.write(result + "\n")
    return 0


# --------------------------------------------------------------------------
# oha results
# --------------------------------------------------------------------------

def load_run(path):
    """Client-observed numbers of one oha JSON result. Latency percentiles are over all
    responses, failed ones included (that is what the client waited for)."""
    with open(path) as f:
        d = json.load(f)
    s = d.get("summary", {}) or {}
    codes = {str(k): int(v) for k, v in (d.get("statusCodeDistribution") or {}).items()}
    errors = d.get("errorDistribution") or {}
    # With -z, requests in flight at the deadline are "aborted due to deadline": not sent
    # to completion, not a failure of the target.
    real_errors = {k: int(v) for k, v in errors.items() if "deadline" not in k}
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    n_err = sum(real_errors.values())
    total = ok + non2xx + n_err
    lp = d.get("latencyPercentiles") or d.get("latencyPercentilesSuccessful") or {}

    def ms(v):
        return None if v is None else float(v) * 1000.0

    return {
        "requests": total,
        "ok": ok,
        "non2xx": non2xx,
        "errors": n_err,
        "codes": codes,
        "error_kinds": real_errors,
        "success": (100.0 * ok / total) if total else None,
        "p50": ms(lp.get("p50")),
        "p99": ms(lp.get("p99")),
        "max": ms(s.get("slowest")),
        "seconds": s.get("total"),
    }


def oha_summary(path):
    r = load_run(path)
    f = lambda v, nd=1: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
    line = (f"requests={r['requests']} success={f(r['success'], 3)}% p50={f(r['p50'], 2)}ms "
            f"p99={f(r['p99'], 2)}ms max={f(r['max'], 1)}ms")
    if r["non2xx"]:
        line += f" non2xx={r['codes']}"
    if r["errors"]:
        line += f" errors={r['error_kinds']}"
    print(line)
    return 0


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

SCENARIO_ORDER = ["baseline", "kill", "slow", "failing"]
TARGET_ORDER = ["trellis", "envoy"]
TARGET_LABELS = {"trellis": "trellis (2 hops, mTLS)", "envoy": "Envoy (1 hop)"}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def counter_delta(before, after, key):
    if not isinstance(after, dict) or after.get(key) is None:
        return None
    b = before.get(key) if isinstance(before, dict) else None
    return after[key] - (b or 0.0)


def per_instance(before, after, killed):
    """'b0 / b1 / b2' requests each instance answered during the measured run."""
    out = []
    for i in range(N_INSTANCES):
        b = before[i] if isinstance(before, list) and i < len(before) else None
        a = after[i] if isinstance(after, list) and i < len(after) else None
        if a and b:
            s = f"{a['requests'] - b['requests']}"
            failed = a.get("failed", 0) - b.get("failed", 0)
            if failed:
                s += f" ({failed}×503)"
            out.append(s)
        elif i == 0 and killed:
            out.append("killed")
        else:
            out.append("?")
    return " / ".join(out)


def load_visit(rd, scenario):
    v = {"round": os.path.basename(rd), "failed": lib.read_lines(os.path.join(rd, "failed"))}
    p = os.path.join(rd, "load.json")
    if os.path.exists(p):
        try:
            v["run"] = load_run(p)
        except Exception as e:  # malformed / truncated JSON
            v["failed"].append(f"cannot parse {p}: {e}")
    before = read_json(os.path.join(rd, "before.json"))
    after = read_json(os.path.join(rd, "after.json"))
    for k in ("retries", "retries_refused", "ejections", "ejections_refused"):
        v[k] = counter_delta(before, after, k)
    v["instances"] = per_instance(read_json(os.path.join(rd, "backends_before.json")),
                                  read_json(os.path.join(rd, "backends_after.json")),
                                  scenario == "kill")
    rot = lib.read_lines(os.path.join(rd, "rotation"))
    v["rotation"] = rot[0] if rot else None
    kill = lib.read_lines(os.path.join(rd, "kill"))
    v["kill"] = kill[0] if kill else None
    return v


def report(rec, out_md):
    def fnum(x, nd=1):
        return "—" if x is None else f"{x:,.{nd}f}"

    def fint(x):
        return "—" if x is None else f"{x:,.0f}"

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    scenarios = [s for s in SCENARIO_ORDER if os.path.isdir(os.path.join(rec, s))]
    notes, raw = [], []
    header = ["scenario", "target", "requests", "success %", "failed", "p50 ms", "p99 ms",
              "max ms", "retries", "retries refused by budget", "ejections",
              "victim out of rotation after", "requests per instance (b0 / b1 / b2)"]
    rows = []
    for s in scenarios:
        for t in TARGET_ORDER:
            tdir = os.path.join(rec, s, t)
            if not os.path.isdir(tdir):
                continue
            visits = [load_visit(rd, s) for rd in sorted(glob.glob(os.path.join(tdir, "round*")))]
            runs = [v["run"] for v in visits if "run" in v and v["run"]["requests"] > 0]
            label = TARGET_LABELS.get(t, t)
            for v in visits:
                for msg in v["failed"]:
                    notes.append(f"**{s} / {label}, {v['round']}**: {msg}")
                r = v.get("run")
                if r and (r["non2xx"] or r["errors"]):
                    notes.append(f"{s} / {label}, {v['round']}: {r['non2xx']} non-2xx {r['codes']}, "
                                 f"{r['errors']} errors {r['error_kinds']}")
                if v["kill"]:
                    notes.append(f"{s} / {label}, {v['round']}: {v['kill']}")
                if r:
                    raw.append([s, label, v["round"], fint(r["requests"]), fnum(r["success"], 3),
                                fint(r["non2xx"] + r["errors"]), fnum(r["p50"], 2),
                                fnum(r["p99"], 2), fnum(r["max"], 1), fint(v["retries"]),
                                fint(v["retries_refused"]), fint(v["ejections"]),
                                v["rotation"] or "—", v["instances"]])
            if not runs:
                rows.append([s, label] + ["failed"] + ["—"] * (len(header) - 3))
                continue
            rot = [v["rotation"] for v in visits if v["rotation"]]
            rot_txt = "—"
            if rot:
                ms = [float(x.split()[0]) for x in rot if x.split()[0].replace(".", "").isdigit()]
                if ms:
                    reasons = sorted({x.split(" ", 1)[1] for x in rot if " " in x})
                    rot_txt = f"{statistics.median(ms):,.0f} ms ({', '.join(reasons)})"
                else:
                    rot_txt = "not within the run"
            rows.append([
                s, label,
                fint(med([r["requests"] for r in runs])),
                fnum(med([r["success"] for r in runs]), 3),
                fint(med([r["non2xx"] + r["errors"] for r in runs])),
                fnum(med([r["p50"] for r in runs]), 2),
                fnum(med([r["p99"] for r in runs]), 2),
                fnum(med([r["max"] for r in runs]), 1),
                fint(med([v["retries"] for v in visits])),
                fint(med([v["retries_refused"] for v in visits])),
                fint(med([v["ejections"] for v in visits])),
                rot_txt if s == "kill" else "—",
                visits[-1]["instances"] if len(visits) == 1 else
                "; ".join(f"{v['round']}: {v['instances']}" for v in visits),
            ])

    notes.extend(lib.read_lines(os.path.join(rec, "busy")))

    def table(hdr, body):
        lines = ["| " + " | ".join(hdr) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(hdr))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    main_table = table(header, rows)
    header_md = ""
    hp = os.path.join(rec, "header.md")
    if os.path.exists(hp):
        with open(hp) as f:
            header_md = f.read()
    rounds = len({r[2] for r in raw})
    with open(out_md, "w") as f:
        f.write(header_md)
        f.write("\n## Results\n\n")
        f.write("Client-observed (oha): `success %` = 2xx responses / all requests (non-2xx and "
                "connection errors count as failures; requests cut off by the end of the run do "
                "not count). Latency over all responses, failures included, with latency "
                "correction. Counters are the client side's, measured over the run (after minus "
                "before): trellis from the client proxy's `/metrics` "
                "(`trellis_http_retries_total{result=\"retried\"}`, "
                "`{result=\"budget-exhausted\"}`, `trellis_endpoint_ejections_total` without "
                "`reason=\"refused-max-percent\"`); Envoy from `/stats` "
                "(`cluster.backend.upstream_rq_retry`, `upstream_rq_retry_overflow`, "
                "`outlier_detection.ejections_enforced_total`). `requests per instance`: what each "
                "backend app answered during the run (with retries, their sum exceeds the client's "
                "requests); b0 is the instance that is killed, slow or failing."
                + (f" Values are medians over {rounds} rounds; every round is listed below."
                   if rounds > 1 else "") + "\n\n")
        f.write(main_table + "\n")
        if notes:
            f.write("\n### Notes\n\n")
            for n in notes:
                f.write(f"- {n}\n")
        if rounds > 1:
            f.write("\n### Every round\n\n")
            f.write(table(["scenario", "target", "round"] + header[2:], raw) + "\n")
    print(main_table)
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"- {n}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, a = argv[1], argv[2:]
    if cmd == "wait-listening":
        return wait_listening(a[0], a[1], a[2])
    if cmd == "wait-trellis":
        return wait_trellis(a[0], int(a[1]), a[2], [int(p) for p in a[3:]])
    if cmd == "scrape":
        return scrape(a[0], a[1], a[2])
    if cmd == "backend-stats":
        return backend_stats(a[0], a[1:])
    if cmd == "watch-rotation":
        return watch_rotation(*a[:6])
    if cmd == "oha-summary":
        return oha_summary(a[0])
    if cmd == "report":
        return report(a[0], a[1])
    print(f"unknown subcommand {cmd}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
