#!/usr/bin/env python3
"""keypooler RegBot source benchmark (issue 12 item 3): refresh time and the /key ratio.

Creates RegBot's database (the seed's `CREATE TABLE credentials`) with BENCH_REGBOT_KEYS
(default 10,000) active `exaai` credentials, starts target/release/keypooler reading it
(REGBOT_DATABASE_URL, refreshed only on demand), imports as many stored keys into a second
tier, then:
  1. times POST /admin/sources/regbot/refresh (the first builds every key; later ones carry
     counters over) — wall time of the whole HTTP call;
  2. loads GET /key on each tier with wrk, alternating, BENCH_ROUNDS rounds, and prints the
     durable /key throughput with 10,000 RegBot keys over the same with 10,000 stored keys.
Every figure comes from one run; the machine is shared, so read the ratio, not the numbers.
"""
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ADMIN, BINARY, ROUNDS, Admin, free_port, server_env, wrk  # noqa: E402

KEYS = int(os.environ.get("BENCH_REGBOT_KEYS", "10000"))
SEED_SCHEMA = """CREATE TABLE credentials (
id INTEGER PRIMARY KEY AUTOINCREMENT,
service TEXT NOT NULL,
api_key TEXT NOT NULL,
email TEXT,
quota_total INTEGER,
quota_used INTEGER DEFAULT 0,
quota_unit TEXT DEFAULT 'requests',
status TEXT DEFAULT 'active',
last_usage_check TIMESTAMP,
extra_metadata TEXT,
created_at TIMESTAMP,
updated_at TIMESTAMP
);"""


def regbot_db(path):
    db = sqlite3.connect(path)
    db.execute(SEED_SCHEMA)
    db.executemany(
        "INSERT INTO credentials (service, api_key, email, quota_total, quota_used, extra_metadata, "
        "created_at, updated_at) VALUES ('exaai', ?, ?, 1000000000, 0, '{\"plan\":\"free\"}', "
        "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        [(f"exa-{i}-{os.urandom(8).hex()}", f"acct{i}@example.com") for i in range(KEYS)],
    )
    db.commit()
    db.close()


def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is required (bench/run.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="keypooler-regbot-bench-")
    regbot = os.path.join(workdir, "regbot.db")
    regbot_db(regbot)
    port = free_port()
    env = server_env(workdir, port, SERVER_WRITE_TIMEOUT_SECONDS="300",
                     REGBOT_DATABASE_URL=regbot, REGBOT_REFRESH_SECONDS="86400")
    server = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                Admin(port).call("GET", "/health")
                break
            except OSError:
                time.sleep(0.05)
        admin = Admin(port)
        limit = {"rate_limit": 1_000_000_000, "window_seconds": 60}
        admin.ok("POST", "/admin/tiers", {"name": "exa", "features": {"regbot_search": limit}})
        admin.ok("POST", "/admin/tiers", {"name": "stored", "features": {"stored_search": limit}})
        keys = [{"name": f"stored-{i}", "key": f"st-{i}-{os.urandom(8).hex()}", "usage_limit": 1_000_000_000}
                for i in range(KEYS)]
        admin.ok("POST", "/admin/keys/import", {"tier": "stored", "keys": keys})
        consumer = admin.ok("POST", "/admin/consumers", {"name": "bench"})
        for tier in ("exa", "stored"):
            admin.ok("POST", f"/admin/consumers/{consumer['id']}/scopes", {"tier": tier})
        token = consumer["token"]

        times = []
        for _ in range(5):
            started = time.perf_counter()
            source = admin.ok("POST", "/admin/sources/regbot/refresh")
            times.append((time.perf_counter() - started) * 1000)
            if source["status"] != "ok" or source["credentials"] != KEYS:
                sys.exit(f"refresh did not load {KEYS} credentials: {json.dumps(source)}")

        cases = [
            (f"/key 200 (durable, {KEYS:,} RegBot keys)", f"{base}/key?feature=regbot_search"),
            (f"/key 200 (durable, {KEYS:,} stored keys)", f"{base}/key?feature=stored_search"),
        ]
        results = {name: [] for name, _ in cases}
        for _ in range(ROUNDS):
            for name, url in cases:
                results[name].append(wrk(url, token))
        print(f"RegBot refresh of {KEYS:,} credentials (POST /admin/sources/regbot/refresh, wall ms):")
        print(f"  first (builds every key): {times[0]:.0f} ms; later: median {statistics.median(times[1:]):.0f} ms, "
              f"max {max(times[1:]):.0f} ms")
        print(f"{'case':44} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
        best = {}
        for name, _ in cases:
            b = max(results[name], key=lambda r: r["rps"])
            best[name] = b
            print(f"{name:44} {b['rps']:>10.0f} {b['p50']:>8.2f} {b['p99']:>8.2f} {b['non2xx']:>8}")
        (rb, _), (st, _) = cases
        print(f"ratio RegBot / stored /key throughput: {best[rb]['rps'] / best[st]['rps']:.3f}")
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
