#!/usr/bin/env python3
"""keypooler audit benchmark (issue 10 items 3-4): a big audit table, filtered pages, summaries,
startup, and pruning under /key load.

Builds AUDIT_ROWS audit rows (default 10 million) spread over AUDIT_DAYS days straight into a
fresh database file (python sqlite3, one transaction; UUID v7-like ids and the service's own
timestamp form), starts target/release/keypooler on it and prints:
  - startup time on that file (until /readyz answers 200),
  - filtered-page latency by key and by consumer (first page and a cursor page; target <= 50 ms),
  - 30-day summary latency per group_by (target <= 1 s) once the daily rollup has caught up,
  - how long the service takes to fill its side indexes and daily rollup for that file,
  - durable /key throughput as a ratio to /health without and with pruning of AUDIT_PRUNE_ROWS
    rows (default 1 million) running underneath (target: within 20 %),
  - summaries before and after pruning (they must agree).
Loopback only, bounded (every wait has a deadline), stops by itself and deletes its files.
Run: `bash bench/run.sh audit` (builds release first) or `python3 bench/audit.py`.
"""
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("BENCH_BINARY") or os.path.join(ROOT, "target", "release", "keypooler")
ADMIN = "audit-bench-admin-" + os.urandom(8).hex()
ROWS = int(os.environ.get("AUDIT_ROWS", "10000000"))
DAYS = int(os.environ.get("AUDIT_DAYS", "90"))
PRUNE_ROWS = int(os.environ.get("AUDIT_PRUNE_ROWS", "1000000"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
TIERS, KEYS_PER_TIER, CONSUMERS = 20, 25, 100
RARE_EVERY = max(ROWS // 50, 1)
CLASSES = ["ok", "client_error", "auth_invalid", "quota_exhausted", "rate_limited", "upstream_error", "network"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The release binary on `db_path`, with `extra` environment; stopped with SIGTERM."""

    def __init__(self, db_path, extra=None):
        self.port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ADMIN_TOKEN": ADMIN,
            "DB_PATH": db_path,
            "SERVER_PORT": str(self.port),
            "LOG_LEVEL": "warn",
            "LOG_REQUESTS": "false",
            **(extra or {}),
        }
        started = time.perf_counter()
        self.proc = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"keypooler exited with {self.proc.returncode}")
            try:
                if self.call("GET", "/readyz", token=None)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                sys.exit("keypooler did not become ready within 120 s")
            time.sleep(0.02)
        self.startup = time.perf_counter() - started
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def call(self, method, path, body=None, token=ADMIN, conn=None):
        c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        c.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = c.getresponse()
        data = r.read()
        if conn is None:
            c.close()
        return r.status, (json.loads(data) if data else None), r

    def ok(self, method, path, body=None):
        status, data, r = self.call(method, path, body, conn=self.conn)
        if status >= 300:
            self.stop()
            sys.exit(f"{method} {path} -> {status} {data}")
        return data, r

    def timed(self, path):
        t = time.perf_counter()
        data, r = self.ok("GET", path)
        return (time.perf_counter() - t) * 1000, data, r

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(url, token=None):
    cmd = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 30).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), int(non2xx.group(1)) if non2xx else 0


def key_ratio(server, token):
    """Best of ROUNDS alternating rounds: durable /key req/s ÷ /health req/s."""
    base = f"http://127.0.0.1:{server.port}"
    health, key, errors = 0.0, 0.0, 0
    for _ in range(ROUNDS):
        health = max(health, wrk(f"{base}/health")[0])
        rps, bad = wrk(f"{base}/key?feature=f0", token)
        key, errors = max(key, rps), errors + bad
    return key / health, key, health, errors


def uuid7(ms):
    r = random.getrandbits(74)
    h = f"{ms:012x}{0x7000 | (r >> 62 & 0xfff):04x}{0x8000 | (r >> 48 & 0x3fff):04x}{r & 0xffffffffffff:012x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def build(db_path, tiers):
    """ROWS audit rows over DAYS days ending now, in time order (as the service writes them)."""
    consumers = tiers["consumers"]
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=DAYS)
    span_us = DAYS * 86400 * 1_000_000
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA cache_size = -1000000")
    db.execute("PRAGMA journal_mode = WAL")
    # Indexes are dropped for the load and built again after it (same definitions): much faster.
    indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_events' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    rng = random.Random(7)
    step = span_us / ROWS

    def rows():
        for i in range(ROWS):
            us = int(i * step + rng.random() * step)
            at = start + timedelta(microseconds=us)
            consumer_id, tier = consumers[rng.randrange(len(consumers))]
            key_id = tiers["keys"][tier][rng.randrange(KEYS_PER_TIER)]
            feature = f"f{rng.randrange(4)}"
            cls = CLASSES[rng.randrange(len(CLASSES))] if rng.random() < 0.3 else None
            yield (uuid7(int(at.timestamp() * 1000)), key_id, consumer_id, feature,
                   at.strftime("%Y-%m-%d %H:%M:%S.%f"), cls)

    t = time.perf_counter()
    with db:
        db.executemany("INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at, outcome_class) VALUES (?, ?, ?, ?, ?, ?)", rows())
    # A rare key: one row in every RARE_EVERY (50 in 10 million), spread over the whole table,
    # so its page walks every side-index bucket (the worst case for a filtered page).
    with db:
        db.execute("UPDATE usage_events SET key_id = 'rare-key' WHERE rowid % ? = 0", (RARE_EVERY,))
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    for _, sql in indexes:
        db.execute(sql)
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return loaded, time.perf_counter() - t


def percentiles(ms):
    ms = sorted(ms)
    return f"median {statistics.median(ms):7.1f} ms   p95 {ms[int(len(ms) * 0.95) - 1]:7.1f} ms   max {ms[-1]:7.1f} ms"


def summary_without_progress(server, query):
    _, data, _ = server.timed(f"/admin/usage/summary?{query}")
    data.pop("rolled_up_through", None)
    return data


def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is required (bench/run.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="keypooler-audit-bench-")
    db_path = os.path.join(workdir, "pool.db")
    started = time.time()
    try:
        run(db_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total run time {time.time() - started:.0f} s")


def run(db_path):
    # The pool through the API (so every table is the service's own), then the audit rows.
    server = Server(db_path)
    tiers = {"keys": {}, "consumers": []}
    for t in range(TIERS):
        server.ok("POST", "/admin/tiers", {"name": f"t{t}", "features": {f"f{i}": {"rate_limit": 1_000_000_000, "window_seconds": 1} for i in range(4)} if t == 0 else {f"f{i}-{t}": {"rate_limit": 1000, "window_seconds": 60} for i in range(4)}})
        tiers["keys"][t] = [server.ok("POST", "/admin/keys", {"name": f"t{t}-k{k}", "key": f"sk-{t}-{k}", "tier": f"t{t}", "usage_limit": 10**12})[0]["id"] for k in range(KEYS_PER_TIER)]
    token = None
    for c in range(CONSUMERS):
        made, _ = server.ok("POST", "/admin/consumers", {"name": f"c{c}"})
        tier = c % TIERS
        server.ok("POST", f"/admin/consumers/{made['id']}/scopes", {"tier": f"t{tier}"})
        tiers["consumers"].append((made["id"], tier))
        if tier == 0 and token is None:
            token = made["token"]
    server.stop()
    loaded, indexed = build(db_path, tiers)
    size = os.path.getsize(db_path) / 1024 / 1024
    print()
    print(f"keypooler audit benchmark — {os.cpu_count()} CPUs, {ROWS:,} audit rows over {DAYS} days "
          f"({TIERS * KEYS_PER_TIER} keys, {CONSUMERS} consumers, 4 features per tier)")
    print(f"{'build: rows inserted / indexes built':44} {loaded:8.1f} s / {indexed:.1f} s   (file {size:,.0f} MiB)")

    server = Server(db_path)
    print(f"{'startup on that file (until /readyz 200)':44} {server.startup * 1000:8.0f} ms")

    # The side indexes of key/consumer filters are filled in the background after the first
    # start on this file (a service running all along keeps them current every second).
    t = time.perf_counter()
    deadline = time.time() + 1800
    while True:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        through = db.execute("SELECT coalesce((SELECT indexed_through FROM usage_index_state), 0)").fetchone()[0]
        last = db.execute("SELECT max(rowid) FROM usage_events").fetchone()[0]
        db.close()
        if through >= last:
            break
        if time.time() > deadline:
            sys.exit("the side indexes were not filled within 30 minutes")
        time.sleep(0.5)
    print(f"{'side indexes filled after first start':44} {time.perf_counter() - t:8.1f} s")

    # Filtered pages: first page and the page its cursor points to, 100 rows each.
    rng = random.Random(11)
    for what, ids in (("key_id", [k for ks in tiers["keys"].values() for k in ks]), ("consumer_id", [c for c, _ in tiers["consumers"]])):
        first, second = [], []
        for ident in rng.sample(ids, 20):
            ms, rows, r = server.timed(f"/admin/usage?{what}={ident}&limit=100")
            assert len(rows) == 100 and all(row[what] == ident for row in rows), (what, len(rows))
            first.append(ms)
            cursor = r.getheader("x-next-cursor")
            ms, rows, _ = server.timed(f"/admin/usage?{what}={ident}&limit=100&cursor={cursor}")
            second.append(ms)
        print(f"{'page of 100 by ' + what + ' (first page)':44} {percentiles(first)}")
        print(f"{'page of 100 by ' + what + ' (cursor page)':44} {percentiles(second)}")
    ms = []
    for _ in range(10):
        t, rows, _ = server.timed("/admin/usage?key_id=rare-key&limit=100")
        assert len(rows) == ROWS // RARE_EVERY, len(rows)
        ms.append(t)
    print(f"{'page by a key with one row in ' + format(RARE_EVERY, ',') :44} {percentiles(ms)}")
    since_30 = (datetime.now(timezone.utc) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for label, query in (("page of 100, no filter", "limit=100"), ("page of 100 by feature", "feature=f1&limit=100"),
                         ("page of 100 by key, last 30 days", f"key_id={tiers['keys'][3][0]}&since={since_30}&limit=100")):
        ms = [server.timed(f"/admin/usage?{query}")[0] for _ in range(10)]
        print(f"{label + ' (informational)':44} {percentiles(ms)}")

    # The daily rollup catches up in the background after the first start on this file.
    t = time.perf_counter()
    final_day = (datetime.now(timezone.utc) - timedelta(hours=1, minutes=10)).date() - timedelta(days=1)
    deadline = time.time() + 1800
    while True:
        _, data, _ = server.timed("/admin/usage/summary?group_by=day&since=2999-01-01T00:00:00Z")
        if data["rolled_up_through"] and data["rolled_up_through"] >= final_day.isoformat():
            break
        if time.time() > deadline:
            sys.exit("the rollup did not catch up within 30 minutes")
        time.sleep(0.5)
    print(f"{'rollup catch-up of ' + str(DAYS) + ' days after first start':44} {time.perf_counter() - t:8.1f} s")
    for group in ("key", "consumer", "feature", "day"):
        ms = [server.timed(f"/admin/usage/summary?group_by={group}&since={since_30}")[0] for _ in range(5)]
        print(f"{'30-day summary by ' + group:44} {percentiles(ms)}")

    # Pruning: a retention that makes about PRUNE_ROWS rows due (whole days at the old end).
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    per_day = db.execute("SELECT date(created_at) AS d, COUNT(*) FROM usage_events GROUP BY d ORDER BY d").fetchall()
    db.close()
    today = datetime.now(timezone.utc).date()
    due, before_day = 0, None
    for day, n in per_day:
        if due + n > PRUNE_ROWS and due > 0:
            break
        due += n
        before_day = datetime.strptime(day, "%Y-%m-%d").date() + timedelta(days=1)
    retention = (today - before_day).days
    yesterday = (today - timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    # Summaries of the days before today (the /key load below only adds rows today).
    queries = [f"group_by={g}&until={yesterday}" for g in ("key", "consumer", "feature", "day")]
    before = [summary_without_progress(server, q) for q in queries]
    ratio_plain, key_plain, health_plain, errors_plain = key_ratio(server, token)
    server.stop()

    server = Server(db_path, {"AUDIT_RETENTION_DAYS": str(retention)})
    t = time.perf_counter()
    ratio_pruning, key_pruning, health_pruning, errors_pruning = key_ratio(server, token)

    def remaining():
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        n = db.execute("SELECT COUNT(*) FROM usage_events WHERE julianday(created_at) < julianday(?)", (before_day.isoformat(),)).fetchone()[0]
        db.close()
        return n

    left_after_load = remaining()
    deadline = time.time() + 1800
    while remaining() > 0:
        if time.time() > deadline:
            sys.exit("pruning did not finish within 30 minutes")
        time.sleep(0.5)
    prune_seconds = time.perf_counter() - t
    after = [summary_without_progress(server, q) for q in queries]
    server.stop()

    print(f"{'rows due (retention ' + str(retention) + ' days)':44} {due:8,}   still due after the load runs: {left_after_load:,}")
    print(f"{'pruning all due rows took':44} {prune_seconds:8.1f} s   ({due / prune_seconds:,.0f} rows/s)")
    print(f"wrk -t2 -c{CONNECTIONS} -d{SECONDS}s, best of {ROUNDS} alternating rounds")
    for label, ratio, key, health, errors in (
        ("/key durable ÷ /health, no pruning", ratio_plain, key_plain, health_plain, errors_plain),
        ("/key durable ÷ /health, while pruning", ratio_pruning, key_pruning, health_pruning, errors_pruning),
    ):
        print(f"{label:44} {ratio:8.3f}   (/key {key:,.0f} req/s, /health {health:,.0f} req/s, errors {errors})")
    print(f"{'pruning ÷ no pruning (target ≥ 0.80)':44} {ratio_pruning / ratio_plain:8.2f}")
    agree = before == after
    print(f"{'summaries before and after pruning agree':44} {'yes' if agree else 'NO'}")
    if not agree:
        for q, b, a in zip(queries, before, after):
            if b != a:
                print(f"  {q}: before {json.dumps(b)[:300]} … after {json.dumps(a)[:300]} …")
        sys.exit(1)


if __name__ == "__main__":
    main()
