#!/usr/bin/env python3
"""keypooler plan-shaped limits benchmark (issue 11 item 5, SPEC §8.4).

In one run, on one temp SQLite file, with the release binary:
  - durable /key throughput as a ratio to /health for a feature with one 60 s window and cost 1
    ("single") and for one with three windows (1 s, 60 s, 1 day) and cost 5 ("plan"), in
    alternating rounds (target: the plan ratio within 10 % of the single one);
  - after the load, that budgets counted units (usage_count = 5 × plan audit rows);
  - startup time (until /readyz 200) before and after LIMITS_AUDIT_ROWS audit rows (default
    1,000,000) are written straight into the file (rows built as bench/audit.py builds them).
Loopback only, bounded, stops by itself and deletes its files.
Run: `bash bench/run.sh limits` (builds release first) or `python3 bench/limits.py`.
"""
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from audit import Server, uuid7, wrk  # noqa: E402  (same server, wrk and id helpers)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
KEYS = 10
AUDIT_ROWS = int(os.environ.get("LIMITS_AUDIT_ROWS", "1000000"))
HUGE = 1_000_000_000


def setup(server):
    server.ok("POST", "/admin/tiers", {"name": "single", "features": {
        "single": {"rate_limit": HUGE, "window_seconds": 60}}})
    server.ok("POST", "/admin/tiers", {"name": "plan", "features": {"plan": [
        {"rate_limit": HUGE, "window_seconds": 1},
        {"rate_limit": HUGE, "window_seconds": 60},
        {"rate_limit": HUGE, "window_seconds": 86400}]}})
    keys = {}
    for tier in ("single", "plan"):
        keys[tier] = [server.ok("POST", "/admin/keys", {"name": f"{tier}-{i}", "key": f"sk-{tier}-{i}", "tier": tier,
                                                         "usage_limit": 10**12})[0]["id"] for i in range(KEYS)]
    consumer, _ = server.ok("POST", "/admin/consumers", {"name": "bench"})
    for tier in ("single", "plan"):
        server.ok("POST", f"/admin/consumers/{consumer['id']}/scopes", {"tier": tier})
    return consumer, keys


def add_audit_rows(db_path, keys, consumer_id):
    """AUDIT_ROWS rows over the last 30 days, in time order, straight into the file."""
    now = datetime.now(timezone.utc)
    span_us = 30 * 86400 * 1_000_000
    start = now - timedelta(microseconds=span_us)
    step = span_us / AUDIT_ROWS
    rng = random.Random(11)
    all_keys = [(k, t) for t, ks in keys.items() for k in ks]

    def rows():
        for i in range(AUDIT_ROWS):
            at = start + timedelta(microseconds=int(i * step + rng.random() * step))
            key_id, tier = all_keys[rng.randrange(len(all_keys))]
            yield (uuid7(int(at.timestamp() * 1000)), key_id, consumer_id, tier,
                   at.strftime("%Y-%m-%d %H:%M:%S.%f"), 5 if tier == "plan" else None)

    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode = WAL")
    t = time.perf_counter()
    with db:
        db.executemany("INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at, cost) VALUES (?, ?, ?, ?, ?, ?)", rows())
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - t


def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is required (bench/run.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="keypooler-limits-bench-")
    db_path = os.path.join(workdir, "pool.db")
    started = time.time()
    try:
        run(db_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total run time {time.time() - started:.0f} s")


def run(db_path):
    server = Server(db_path)
    first_start = server.startup
    consumer, keys = setup(server)
    token = consumer["token"]
    base = f"http://127.0.0.1:{server.port}"
    best = {"health": 0.0, "single": 0.0, "plan": 0.0}
    errors = 0
    try:
        for _ in range(ROUNDS):
            best["health"] = max(best["health"], wrk(f"{base}/health")[0])
            for name, url in (("single", f"{base}/key?feature=single"), ("plan", f"{base}/key?feature=plan&cost=5")):
                rps, bad = wrk(url, token)
                best[name], errors = max(best[name], rps), errors + bad
        listed, _ = server.ok("GET", "/admin/keys")
    finally:
        server.stop()
    plan_keys = set(keys["plan"])
    units = sum(k["usage_count"] for k in listed if k["id"] in plan_keys)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    plan_rows, plan_cost = db.execute("SELECT COUNT(*), SUM(cost) FROM usage_events WHERE feature = 'plan'").fetchone()
    windows = db.execute("SELECT COUNT(*) FROM rate_windows").fetchone()[0]
    db.close()

    single_ratio, plan_ratio = best["single"] / best["health"], best["plan"] / best["health"]
    print()
    print(f"keypooler limits benchmark — {os.cpu_count()} CPUs, wrk -t2 -c32, best of {ROUNDS} alternating rounds, {KEYS} keys per tier")
    print(f"{'case':46} {'req/s':>10} {'× /health':>10}")
    print(f"{'/health':46} {best['health']:>10.0f} {1.0:>10.2f}")
    print(f"{'/key single window, cost 1 (durable)':46} {best['single']:>10.0f} {single_ratio:>10.2f}")
    print(f"{'/key 3 windows (1 s, 60 s, 1 day), cost 5':46} {best['plan']:>10.0f} {plan_ratio:>10.2f}")
    print(f"{'plan ratio ÷ single ratio (target ≥ 0.90)':46} {plan_ratio / single_ratio:>10.2f}")
    print(f"{'non-2xx on /key':46} {errors:>10}")
    print(f"{'plan: usage_count units / audit rows / SUM(cost)':46} {units} / {plan_rows} / {plan_cost}"
          f"   ({'ok' if units == 5 * plan_rows == plan_cost else 'MISMATCH'})")
    print(f"{'rate_windows rows (60 s and 1 day windows)':46} {windows}")

    loaded = add_audit_rows(db_path, keys, consumer["id"])
    size = os.path.getsize(db_path) / 1024 / 1024
    server = Server(db_path)
    print(f"{'startup on the fresh file (until /readyz 200)':46} {first_start * 1000:>10.0f} ms")
    print(f"{f'+{AUDIT_ROWS:,} audit rows written':46} {loaded:>10.1f} s   (file {size:,.0f} MiB)")
    print(f"{'startup with them (until /readyz 200)':46} {server.startup * 1000:>10.0f} ms")
    status, _, _ = server.call("GET", "/key?feature=plan&cost=5", token=token)
    print(f"{'/key after that restart':46} {status:>10}")
    server.stop()


if __name__ == "__main__":
    main()
