#!/usr/bin/env python3
"""keypooler import and rekey timing (issue 10 items 5-6): prints how long they take.

Starts target/release/keypooler on 127.0.0.1 with a temp SQLite database and ENCRYPTION_KEY
A, imports BENCH_IMPORT_KEYS keys (default 10,000, each with one bound secret) in one request,
imports the same file again (nothing created), then restarts with key B (A previous) and times
POST /admin/rekey. Prints wall times; asserts only the counts, never a duration.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("BENCH_BINARY") or os.path.join(ROOT, "target", "release", "keypooler")
ADMIN = "bench-admin-token-" + os.urandom(8).hex()
KEYS = int(os.environ.get("BENCH_IMPORT_KEYS", "10000"))
KEY_A = os.urandom(32).hex()
KEY_B = os.urandom(32).hex()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(db_path, port, env_extra):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ADMIN_TOKEN": ADMIN,
        "DB_PATH": db_path,
        "SERVER_PORT": str(port),
        "LOG_LEVEL": "warn",
        "LOG_REQUESTS": "false",
        "SERVER_WRITE_TIMEOUT_SECONDS": "300",
    }
    env.update(env_extra)
    proc = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL)
    for _ in range(300):
        try:
            call(port, "GET", "/health")
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("keypooler did not start")


def call(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": "Bearer " + ADMIN, "Content-Type": "application/json"}
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data else None)


def timed(port, method, path, body=None):
    started = time.monotonic()
    status, answer = call(port, method, path, body)
    return status, answer, (time.monotonic() - started) * 1000


def main():
    if not os.path.exists(BINARY):
        sys.exit(f"{BINARY} missing: cargo build --release first")
    tmp = tempfile.mkdtemp(prefix="keypooler-import-bench-")
    db_path = os.path.join(tmp, "pool.db")
    port = free_port()
    proc = start(db_path, port, {"ENCRYPTION_KEY": KEY_A})
    try:
        status, _ = call(port, "POST", "/admin/tiers",
                         {"name": "bulk", "features": {"f": {"rate_limit": 10, "window_seconds": 60}}})
        assert status == 201, status
        keys = [{"name": f"bulk-{i:05}", "key": f"fc-bulk-{i:05}-{os.urandom(12).hex()}",
                 "usage_limit": 1000, "secrets": {"webhook": f"whsec-{os.urandom(8).hex()}"}}
                for i in range(KEYS)]
        body = {"tier": "bulk", "keys": keys}
        size = len(json.dumps(body))
        status, first, first_ms = timed(port, "POST", "/admin/keys/import", body)
        assert status == 200 and first["created"] == KEYS, (status, first and first.get("created"))
        status, again, again_ms = timed(port, "POST", "/admin/keys/import", body)
        assert status == 200 and again["created"] == 0 and again["existing"] == KEYS
        status, dry, dry_ms = timed(port, "POST", "/admin/keys/import", dict(body, dry_run=True))
        assert status == 200 and dry["created"] == 0
    finally:
        proc.terminate()
        proc.wait()
    proc = start(db_path, port, {"ENCRYPTION_KEY": KEY_B, "ENCRYPTION_KEY_PREVIOUS": KEY_A})
    try:
        status, report, rekey_ms = timed(port, "POST", "/admin/rekey")
        assert status == 200 and report["resealed"] == 2 * KEYS, (status, report)
        status, report2, rekey2_ms = timed(port, "POST", "/admin/rekey")
        assert status == 200 and report2["already_current"] == 2 * KEYS, (status, report2)
    finally:
        proc.terminate()
        proc.wait()
    print(f"keys: {KEYS} (one secret each), request body {size / 1048576:.1f} MiB")
    print(f"import, first (all created):   {first_ms:8.0f} ms")
    print(f"import, same file (all exist): {again_ms:8.0f} ms")
    print(f"import, dry run:               {dry_ms:8.0f} ms")
    print(f"rekey A -> B ({2 * KEYS} values):   {rekey_ms:8.0f} ms")
    print(f"rekey again (all current):     {rekey2_ms:8.0f} ms")


if __name__ == "__main__":
    main()
