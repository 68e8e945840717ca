#!/usr/bin/env python3
"""keypooler remote and multi-replica benchmark (issue 14 item 4, SPEC §8.7).

In one run, with the release binary:
  - remote: examples/libsql_server.rs (the test suite's Hrana server as a program) serves a temp
    SQLite file with REMOTE_DELAY_MS (default 20) of delay on every request; one keypooler
    replica uses it (DATABASE_URL=http://127.0.0.1:PORT); wrk drives /key with REMOTE_CALLERS
    (default 64) connections. Prints /key throughput and p50 in ms and in measured round trips
    against the goal (>= 1,000 /key/s, p50 <= 3 round trips), and 200s / counted / audited.
  - three replicas on one SQLite file: /key throughput of one replica alone, then of three at
    once (one wrk each, the same connections in all), per replica and in total.
Loopback only, bounded, stops by itself and deletes its files. The machine may be shared:
compare figures within one run, not across runs.
Run: `bash bench/run.sh remote` (builds release first) or `python3 bench/remote.py`.
"""
import http.client
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from audit import ROOT, Server  # noqa: E402  (same server helper)

LIBSQL_SERVER = os.environ.get("LIBSQL_SERVER") or os.path.join(ROOT, "target", "release", "examples", "libsql_server")
DELAY_MS = int(os.environ.get("REMOTE_DELAY_MS", "20"))
CALLERS = int(os.environ.get("REMOTE_CALLERS", "64"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
KEYS = 10
HUGE = 1_000_000_000


def wrk(url, token, connections, threads=2, seconds=SECONDS):
    """Starts wrk; `result(proc)` parses what it printed."""
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result(proc):
    out, _ = proc.communicate(timeout=SECONDS + 60)
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        sys.exit(f"wrk failed:\n{out}")
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(found.group(1)),
        "p50": lat["50"],
        "p99": lat["99"],
        "total": int(re.search(r"(\d+) requests in", out).group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket": sum(int(x) for x in errors.groups()) if errors else 0,
    }


def setup(server):
    """A tier with KEYS keys (budgets and windows that never bind) and a consumer; its token."""
    server.ok("POST", "/admin/tiers", {"name": "t", "features": {"scrape": {"rate_limit": HUGE, "window_seconds": 60}}})
    for i in range(KEYS):
        server.ok("POST", "/admin/keys", {"name": f"k{i}", "key": f"sk-{i}-{os.urandom(4).hex()}", "tier": "t", "usage_limit": 10**12})
    consumer, _ = server.ok("POST", "/admin/consumers", {"name": "bench"})
    server.ok("POST", f"/admin/consumers/{consumer['id']}/scopes", {"tier": "t"})
    return consumer["token"]


def committed(db_path):
    """(sum of the keys' usage_count, audit rows) as the database file holds them."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    (counted,) = db.execute("SELECT COALESCE(SUM(usage_count), 0) FROM keys").fetchone()
    (rows,) = db.execute("SELECT COUNT(*) FROM usage_events").fetchone()
    db.close()
    return counted, rows


def round_trip_ms(url):
    """Median of 20 one-statement pipelines to the libSQL server: the round trip keypooler sees."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"baton": None, "requests": [{"type": "execute", "stmt": {"sql": "SELECT 1"}}, {"type": "close"}]})
    samples = []
    for _ in range(20):
        t = time.perf_counter()
        conn.request("POST", "/v2/pipeline", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
        samples.append((time.perf_counter() - t) * 1000)
    conn.close()
    return statistics.median(samples)


def remote_case(workdir):
    db_path = os.path.join(workdir, "remote.db")
    libsql = subprocess.Popen([LIBSQL_SERVER, "--db", db_path, "--delay-ms", str(DELAY_MS)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = None
    try:
        line = libsql.stdout.readline().strip()
        if not line.startswith("url="):
            sys.exit(f"libsql_server did not start: {line!r}")
        url = line[len("url="):]
        rt = round_trip_ms(url)
        server = Server(os.path.join(workdir, "unused.db"), {"DATABASE_URL": url})
        token = setup(server)
        base = f"http://127.0.0.1:{server.port}"
        health = result(wrk(f"{base}/health", None, CALLERS))
        key = result(wrk(f"{base}/key?feature=scrape", token, CALLERS))
        startup = server.startup
        server.stop()
        server = None
        counts, rows = committed(db_path)
    finally:
        if server:
            server.stop()
        libsql.terminate()
        try:
            libsql.wait(timeout=30)
        except subprocess.TimeoutExpired:
            libsql.kill()
    return {"rt": rt, "startup": startup, "health": health, "key": key, "counted": counts, "rows": rows}


def replicas_case(workdir):
    db_path = os.path.join(workdir, "replicas.db")
    servers = [Server(db_path)]
    try:
        token = setup(servers[0])
        servers += [Server(db_path), Server(db_path)]
        urls = [f"http://127.0.0.1:{s.port}/key?feature=scrape" for s in servers]
        alone = result(wrk(urls[0], token, CALLERS))
        share = [CALLERS // 3 + (1 if i < CALLERS % 3 else 0) for i in range(3)]
        procs = [wrk(u, token, c, threads=1) for u, c in zip(urls, share)]
        together = [result(p) for p in procs]
    finally:
        for s in servers:
            s.stop()
    counts, rows = committed(db_path)
    return {"alone": alone, "together": together, "counted": counts, "rows": rows}


def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is required (bench/run.sh installs it)")
    if not os.path.exists(LIBSQL_SERVER):
        sys.exit(f"{LIBSQL_SERVER} is missing: cargo build --release --example libsql_server")
    workdir = tempfile.mkdtemp(prefix="keypooler-remote-bench-")
    started = time.time()
    try:
        remote = remote_case(workdir)
        replicas = replicas_case(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    key, rt = remote["key"], remote["rt"]
    print()
    print(f"keypooler remote benchmark — {os.cpu_count()} CPUs, wrk {SECONDS} s per case; shared machines make "
          "absolute figures noisy, compare within one run")
    print(f"remote: libSQL test server with {DELAY_MS} ms delay per request (measured round trip {rt:.1f} ms), "
          f"{CALLERS} callers, one replica (started in {remote['startup']:.1f} s)")
    print(f"{'case':30} {'req/s':>9} {'p50 ms':>8} {'p50 RTs':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in (("/health", remote["health"]), ("/key 200 (remote)", key)):
        print(f"{name:30} {r['rps']:>9.0f} {r['p50']:>8.1f} {r['p50'] / rt:>8.2f} {r['p99']:>8.1f} {r['non2xx'] + r['socket']:>7}")
    rps_ok = key["rps"] >= 1000
    p50_ok = key["p50"] <= 3 * rt
    print(f"goal /key >= 1,000/s: {'met' if rps_ok else 'NOT met'} ({key['rps']:.0f}/s); "
          f"goal p50 <= 3 round trips: {'met' if p50_ok else 'NOT met'} ({key['p50'] / rt:.2f})")
    delivered = key["total"] - key["non2xx"]
    print(f"{'remote 200s / counted / audited':30} {delivered} / {remote['counted']} / {remote['rows']}   "
          "(counted and audited may exceed 200s by the answers wrk did not wait for)")
    print()
    alone, together = replicas["alone"], replicas["together"]
    total = sum(r["rps"] for r in together)
    print(f"three replicas on one SQLite file, {CALLERS} callers in all")
    print(f"{'case':30} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print(f"{'one replica alone':30} {alone['rps']:>9.0f} {alone['p50']:>8.2f} {alone['p99']:>8.2f} {alone['non2xx'] + alone['socket']:>7}")
    for i, r in enumerate(together):
        print(f"{f'replica {i + 1} of 3 at once':30} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['non2xx'] + r['socket']:>7}")
    print(f"{'three at once, total':30} {total:>9.0f}   ({total / alone['rps']:.2f}× one alone)")
    served = alone["total"] - alone["non2xx"] + sum(r["total"] - r["non2xx"] for r in together)
    print(f"{'replicas 200s / counted / audited':30} {served} / {replicas['counted']} / {replicas['rows']}   "
          "(counted equals audited: the database adds each replica's deltas)")
    print(f"total run time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
