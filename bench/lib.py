#!/usr/bin/env python3
"""Helpers for bench/run.sh (python3 stdlib only).

Subcommands:
  free-ports N                    print N distinct free loopback TCP ports
  wait-http URL TIMEOUT [PID..]   poll URL until it answers 200 (exit 1 on timeout,
                                  exit 3 if one of PIDs died meanwhile)
  rss PID..                       print the summed VmRSS of PIDs in kB
  rss-sample OUT PID..            sample summed VmRSS every 100 ms until killed,
                                  keep the max (kB) in OUT
  busy-monitor OUT ROOT PCT       until killed, measure CPU used by processes
                                  other than ROOT's descendants; note it in OUT
                                  if it averages >= PCT % of one core
  keepalive URL N                 send N GETs over one keep-alive connection;
                                  prints "ok=.. bad=.. reconnects=.."
  oha-summary FILE                one-line summary of an oha JSON result
  cg-total FILE                   total Ir from a cachegrind/callgrind out file
  report RESULTS_DIR OUT_MD       aggregate records into the markdown report
"""

import glob
import http.client
import json
import os
import signal
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request


def free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    print(" ".join(str(p) for p in ports))


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


def wait_http(url, timeout, pids):
    deadline = time.monotonic() + float(timeout)
    last = "no answer"
    while time.monotonic() < deadline:
        for p in pids:
            if not pid_alive(p):
                print(f"process {p} exited while waiting for {url} (last: {last})", file=sys.stderr)
                return 3
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return 0
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.headers.get('x-trellis-error', '') or ''}".strip()
        except Exception as e:  # connection refused, reset, timeout...
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    print(f"timeout after {timeout}s waiting for 200 from {url} (last: {last})", file=sys.stderr)
    return 1


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(pids):
    print(sum(rss_kb(p) for p in pids))


def rss_sample(out, pids):
    best = 0
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    deadline = time.monotonic() + 3600  # hard bound in case nobody stops us
    while not stop and time.monotonic() < deadline:
        best = max(best, sum(rss_kb(p) for p in pids))
        with open(out + ".tmp", "w") as f:
            f.write(str(best))
        os.replace(out + ".tmp", out)
        time.sleep(0.1)


def _proc_table():
    """pid -> (comm, ppid, cpu ticks) for every process."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        lp, rp = raw.find("("), raw.rfind(")")
        if lp < 0 or rp < 0:
            continue
        rest = raw[rp + 2:].split()
        try:
            table[int(d)] = (raw[lp + 1:rp], int(rest[1]), int(rest[11]) + int(rest[12]))
        except (IndexError, ValueError):
            continue
    return table


def busy_monitor(out, root, threshold):
    """Until SIGTERM: measure the CPU used by processes that are NOT ours (not
    descendants of ROOT, not kernel threads). If it averages above THRESHOLD
    percent of one core, write a summary to OUT, e.g.
    "38% of a core used by other processes: rustc 30%, cargo 5%"."""
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    hz = os.sysconf("SC_CLK_TCK")
    prev = None
    used = {}
    t0 = time.monotonic()
    deadline = t0 + 3600
    while not stop and time.monotonic() < deadline:
        table = _proc_table()
        children = {}
        for pid, (_, ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [root]
        while todo:
            p = todo.pop()
            if p not in ours:
                ours.add(p)
                todo.extend(children.get(p, []))
        cur = {}
        for pid, (comm, ppid, ticks) in table.items():
            if pid in ours or pid == 2 or ppid == 2:
                continue
            cur[pid] = (comm, ticks)
        if prev is not None:
            for pid, (comm, ticks) in cur.items():
                # A process that appeared since the last sample started during
                # the measurement: all of its CPU time counts.
                delta = ticks - prev[pid][1] if pid in prev else ticks
                if delta > 0:
                    used[comm] = used.get(comm, 0) + delta
            elapsed = time.monotonic() - t0
            total = sum(used.values()) / hz
            pct = 100.0 * total / elapsed if elapsed > 0 else 0.0
            if pct >= threshold:
                top = sorted(used.items(), key=lambda kv: -kv[1])[:4]
                parts = ", ".join(f"{c} {100.0 * v / hz / elapsed:.0f}%" for c, v in top)
                with open(out, "w") as f:
                    f.write(f"{pct:.0f}% of a core used by other processes ({parts})")
            elif os.path.exists(out):
                os.remove(out)
        else:
            t0 = time.monotonic()
        prev = cur
        time.sleep(0.5)


def keepalive(url, n):
    assert url.startswith("http://")
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.partition(":")
    path = "/" + path
    ok = bad = reconnects = 0
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=60)
    deadline = time.monotonic() + 1800
    for _ in range(n):
        if time.monotonic() > deadline:
            print("keepalive: 30 min bound reached", file=sys.stderr)
            break
        try:
            conn.request("GET", path, headers={"Host": hostport})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                ok += 1
            else:
                bad += 1
            if r.will_close:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port or 80), timeout=60)
                reconnects += 1
        except Exception:
            bad += 1
            conn.close()
            conn = http.client.HTTPConnection(host, int(port or 80), timeout=60)
            reconnects += 1
    conn.close()
    print(f"ok={ok} bad={bad} reconnects={reconnects}")
    return 0 if bad == 0 else 1


def load_oha(path):
    with open(path) as f:
        d = json.load(f)
    s = d.get("summary", {})
    total_time = s.get("total") or 0.0
    codes = d.get("statusCodeDistribution", {}) or {}
    errors = d.get("errorDistribution", {}) or {}
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    non2xx = sum(v for k, v in codes.items() if not str(k).startswith("2"))
    # With -z, requests in flight at the deadline are reported as
    # "aborted due to deadline"; that is not a failure of the target.
    real_errors = {k: v for k, v in errors.items() if "deadline" not in k}
    lp = d.get("latencyPercentilesSuccessful") or d.get("latencyPercentiles") or {}

    def pct(key):
        v = lp.get(key)
        return None if v is None else v * 1000.0

    return {
        "ok": ok,
        "non2xx": non2xx,
        "codes": codes,
        "errors": sum(real_errors.values()),
        "error_kinds": real_errors,
        "rps": (ok / total_time) if total_time else 0.0,
        "p50": pct("p50"),
        "p99": pct("p99"),
        "p999": pct("p99.9"),
    }


def oha_summary(path):
    r = load_oha(path)
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    line = (f"ok={r['ok']} rps={r['rps']:.0f} p50={f(r['p50'])}ms p99={f(r['p99'])}ms "
            f"p99.9={f(r['p999'])}ms")
    if r["non2xx"]:
        line += f" NON-2XX={r['non2xx']} codes={r['codes']}"
    if r["errors"]:
        line += f" ERRORS={r['error_kinds']}"
    print(line)


def cg_total(path):
    total = None
    with open(path) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                parts = line.split()
                if len(parts) >= 2:
                    total = int(parts[1])
                    if line.startswith("summary:"):
                        break
    if total is None:
        print(f"no summary line in {path}", file=sys.stderr)
        return 1
    print(total)
    return 0


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

TARGET_ORDER = ["direct", "haproxy-1", "envoy-1", "trellis-1", "trellis-1-trace0",
                "trellis-1-trace001", "trellis-1-trace1", "trellis-1-log", "nginx-1",
                "haproxy-2", "envoy-2", "trellis-2", "trellis-mtls-2"]
LABELS = {
    "direct": ("direct (backend)", 0),
    "haproxy-1": ("HAProxy", 1),
    "envoy-1": ("Envoy", 1),
    "trellis-1": ("trellis", 1),
    "trellis-1-trace0": ("trellis, tracing sampling 0", 1),
    "trellis-1-trace001": ("trellis, tracing sampling 0.01", 1),
    "trellis-1-trace1": ("trellis, tracing sampling 1.0", 1),
    "trellis-1-log": ("trellis, access log on", 1),
    "nginx-1": ("nginx (reference)", 1),
    "haproxy-2": ("HAProxy", 2),
    "envoy-2": ("Envoy", 2),
    "trellis-2": ("trellis", 2),
    "trellis-mtls-2": ("trellis mTLS (control plane)", 2),
}


def read_lines(path):
    try:
        with open(path) as f:
            return [l.rstrip("\n") for l in f if l.strip()]
    except OSError:
        return []


def report(results_dir, out_md):
    agg = os.environ.get("BENCH_AGG", "median")
    rates = [int(r) for r in os.environ.get("BENCH_RATES", "1000 10000").split()]
    pick_lat = (lambda xs: min(xs)) if agg == "best" else statistics.median
    pick_rps = (lambda xs: max(xs)) if agg == "best" else statistics.median

    # records: <target>/round<K>/{rate<R>.json,max.json,rss_idle,rss_load}
    data = {}
    notes = []
    for t in TARGET_ORDER:
        tdir = os.path.join(results_dir, t)
        if not os.path.isdir(tdir):
            continue
        rounds = sorted(glob.glob(os.path.join(tdir, "round*")))
        d = {"rates": {r: [] for r in rates}, "max": [], "rss_idle": [], "rss_load": [],
             "failed": read_lines(os.path.join(tdir, "failed"))}
        for rd in rounds:
            for r in rates:
                p = os.path.join(rd, f"rate{r}.json")
                if os.path.exists(p):
                    try:
                        d["rates"][r].append(load_oha(p))
                    except Exception as e:
                        notes.append(f"{t}: cannot parse {p}: {e}")
            p = os.path.join(rd, "max.json")
            if os.path.exists(p):
                try:
                    d["max"].append(load_oha(p))
                except Exception as e:
                    notes.append(f"{t}: cannot parse {p}: {e}")
            for k in ("rss_idle", "rss_load"):
                v = read_lines(os.path.join(rd, k))
                if v and v[0].isdigit() and int(v[0]) > 0:
                    d[k].append(int(v[0]) / 1024.0)
        ir = read_lines(os.path.join(tdir, "ir_per_req"))
        d["ir"] = ir[0] if ir else None
        d["ir_note"] = read_lines(os.path.join(tdir, "ir_note"))
        data[t] = d

    def agg_rate(t, r, key):
        xs = [x[key] for x in data[t]["rates"][r] if x.get(key) is not None and x["ok"] > 0]
        if not xs:
            return None
        return pick_rps(xs) if key == "rps" else pick_lat(xs)

    def agg_max(t):
        xs = [x["rps"] for x in data[t]["max"] if x["ok"] > 0]
        return pick_rps(xs) if xs else None

    def fmt(v, nd=3, signed=False):
        if v is None:
            return "—"
        return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"

    header = ["target", "hops"]
    for r in rates:
        k = f"{r // 1000}k" if r % 1000 == 0 else str(r)
        header += [f"+p50 @{k}", f"+p99 @{k}", f"+p99.9 @{k}"]
    header += [f"rps @{(r // 1000) if r % 1000 == 0 else r}{'k' if r % 1000 == 0 else ''}" for r in rates]
    header += ["max rps", "vs direct", "RSS idle MB", "RSS load MB", "instr/req"]

    rows = []
    direct_max = agg_max("direct") if "direct" in data else None
    for t in TARGET_ORDER:
        if t not in data:
            continue
        d = data[t]
        label, hops = LABELS[t]
        row = [label, str(hops)]
        for r in rates:
            for key in ("p50", "p99", "p999"):
                v = agg_rate(t, r, key)
                base = agg_rate("direct", r, key) if "direct" in data else None
                if t == "direct":
                    row.append(f"({fmt(v)})" if v is not None else "—")
                else:
                    row.append(fmt(v - base, signed=True) if v is not None and base is not None else "—")
        for r in rates:
            v = agg_rate(t, r, "rps")
            row.append(f"{v:.0f}" if v is not None else "—")
        m = agg_max(t)
        row.append(f"{m:.0f}" if m is not None else "—")
        row.append(f"{m / direct_max:.2f}" if m is not None and direct_max else "—")
        row.append(fmt(statistics.median(d["rss_idle"]), 1) if d["rss_idle"] else "—")
        row.append(fmt(max(d["rss_load"]), 1) if d["rss_load"] else "—")
        row.append(d["ir"] if d["ir"] else "—")
        rows.append(row)

        for msg in d["failed"]:
            notes.append(f"**{label} {hops}-hop**: {msg}")
        for msg in d["ir_note"]:
            notes.append(f"{label} {hops}-hop instructions: {msg}")
        for r in rates:
            for i, x in enumerate(d["rates"][r]):
                if x["non2xx"] or x["errors"]:
                    notes.append(f"{label} {hops}-hop @{r} rps round {i + 1}: {x['ok']} ok, "
                                 f"{x['non2xx']} non-2xx {x['codes']}, errors {x['error_kinds']}")
                if x["rps"] < 0.95 * r and x["ok"] > 0:
                    notes.append(f"{label} {hops}-hop @{r} rps round {i + 1}: only {x['rps']:.0f} rps achieved")
        for i, x in enumerate(d["max"]):
            if x["non2xx"] or x["errors"]:
                notes.append(f"{label} {hops}-hop max run round {i + 1}: {x['ok']} ok, "
                             f"{x['non2xx']} non-2xx {x['codes']}, errors {x['error_kinds']}")

    notes.extend(read_lines(os.path.join(results_dir, "busy")))
    notes.extend(read_lines(os.path.join(results_dir, "handshakes")))

    lines = []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)

    # Raw per-round numbers, for transparency.
    raw = ["| target | round | rate | ok | rps | p50 ms | p99 ms | p99.9 ms |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for t in TARGET_ORDER:
        if t not in data:
            continue
        label, hops = LABELS[t]
        for r in rates + ["max"]:
            xs = data[t]["max"] if r == "max" else data[t]["rates"][r]
            for i, x in enumerate(xs):
                raw.append(f"| {label} {hops}-hop | {i + 1} | {r} | {x['ok']} | {x['rps']:.0f} | "
                           f"{fmt(x['p50'])} | {fmt(x['p99'])} | {fmt(x['p999'])} |")

    header_md = ""
    hp = os.path.join(results_dir, "header.md")
    if os.path.exists(hp):
        with open(hp) as f:
            header_md = f.read()

    with open(out_md, "w") as f:
        f.write(header_md)
        f.write("\n## Results\n\n")
        f.write(f"Latency columns: ADDED latency over direct in ms (target minus direct, {agg} over rounds; "
                f"the direct row shows its absolute value in parentheses). `rps @R`: achieved 2xx "
                f"responses per second at the fixed offered rate R. RSS is summed over all proxy "
                f"processes of the target (direct row: the backend itself).\n\n")
        f.write(table + "\n")
        if notes:
            f.write("\n### Notes\n\n")
            for n in notes:
                f.write(f"- {n}\n")
        f.write("\n### Raw per-round numbers (absolute latency)\n\n")
        f.write("\n".join(raw) + "\n")
    print(table)
    if notes:
        print("\nNotes:")
        for n in notes:
            print(f"- {n}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "free-ports":
        free_ports(int(args[0]))
        return 0
    if cmd == "wait-http":
        return wait_http(args[0], args[1], [int(p) for p in args[2:]])
    if cmd == "rss":
        rss([int(p) for p in args])
        return 0
    if cmd == "rss-sample":
        rss_sample(args[0], [int(p) for p in args[1:]])
        return 0
    if cmd == "busy-monitor":
        busy_monitor(args[0], int(args[1]), float(args[2]))
        return 0
    if cmd == "keepalive":
        return keepalive(args[0], int(args[1]))
    if cmd == "oha-summary":
        oha_summary(args[0])
        return 0
    if cmd == "cg-total":
        return cg_total(args[0])
    if cmd == "report":
        return report(args[0], args[1])
    print(f"unknown subcommand {cmd}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
