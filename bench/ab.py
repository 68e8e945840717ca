"""Paired A/B of durable GET /key (or outcome reports): CPU per request and req/s, side by side.

Usage: python3 bench/ab.py BINARY... (N=10 for a small pool, default 10,000 keys, 10 with
MODE=reports; ROUNDS=4; SECS=3; MODE=reports for outcome reports instead of /key). Starts
every binary once on its own temp database, sets up N keys with 1 s windows, serves each key
once, then alternates wrk runs between the servers (the order reversed every
round) and reads each server's CPU time from /proc per thread (the SQLite worker threads
apart). Prints each run and the medians: the binaries meet the same machine state within
seconds of each other, which a noisy shared machine needs; run it several times for fresh
instances.

MODE=reports (issue 9 item 9): each round first draws serves on every server for 2 s, then,
alternating, runs /health for 1 s and POST /serves/{id}/outcome for 1 s on that server's
newest 50,000 serves (bench/report.lua, as bench.py's "recent serves" case), printing report
req/s, their ratio to that server's /health just before, and per request of each: the server's
CPU, wrk's CPU and the machine's idle share (two cores shared by both: a report's ratio is
what its CPU and the cores' idle time leave). BENCH_CONNECTIONS (default 32) sets wrk's
connections for both.
"""
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "4"))
SECS = int(os.environ.get("SECS", "3"))
MODE = os.environ.get("MODE", "key")
# Keys in the pool: 10,000 for /key; 10 for reports (bench.py's "recent serves" case).
N = int(os.environ.get("N", "10" if MODE == "reports" else "10000"))
REPORT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.lua")
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    """CPU seconds of the process: (all threads, SQLite worker threads)."""
    total = sqlite = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / TICK
        total += seconds
        if "sqlite" in name:
            sqlite += seconds
    return total, sqlite


def start(binary):
    workdir = tempfile.mkdtemp()
    port = bench.free_port()
    srv = subprocess.Popen([binary], env=bench.server_env(workdir, port),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.wait_port(port)
    a = bench.Admin(port)
    a.ok("POST", "/admin/tiers", {"name": "big", "features": {
        "big_scrape": {"rate_limit": 1_000_000_000, "window_seconds": 1}}})
    for i in range(N):
        a.ok("POST", "/admin/keys", {"name": f"big-{i:05}", "key": f"sk-big-{i}", "tier": "big",
                                     "usage_limit": 1_000_000_000_000})
    c = a.ok("POST", "/admin/consumers", {"name": "bench"})
    a.ok("POST", f"/admin/consumers/{c['id']}/scopes", {"tier": "big"})
    url = f"http://127.0.0.1:{port}/key?feature=big_scrape"
    bench.wrk(url, c["token"], seconds=2)  # every key's window row written once
    return srv, workdir, url, c["token"]


def serve_file(workdir, url, token, name):
    """Draws serves for 2 s; writes the newest 50,000 serve ids to a file; its path."""
    db_path = os.path.join(workdir, "pool.db")

    def ids(query, *args):
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            return db.execute(query, args).fetchall()
        finally:
            db.close()

    (before,), = ids("SELECT COALESCE(MAX(rowid), 0) FROM usage_events")
    bench.wrk(url, token, seconds=2)
    rows = ids("SELECT id FROM usage_events WHERE rowid > ? ORDER BY rowid", before)[-50_000:]
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write("\n".join(r[0] for r in rows) + "\n")
    return path


def reports(binaries, pairs, results):
    """MODE=reports: see the module doc."""
    for r in range(ROUNDS):
        order = pairs if r % 2 == 0 else pairs[::-1]
        files = {b: serve_file(workdir, url, token, f"serves-{r}.txt")
                 for b, (_, workdir, url, token) in order}
        for b, (srv, _, url, token) in order:
            base = url.split("/key")[0]
            health, h_split = split(srv, lambda: bench.wrk(base + "/health", seconds=1))
            w, w_split = split(srv, lambda: bench.wrk(base, token, REPORT_SCRIPT, (files[b], "2"), 1))
            row = (w["rps"], w["rps"] / health["rps"], *w_split, *h_split)
            results[b].append(row)
            print(f"{os.path.basename(b):20} {row[0]:8.0f} reports/s  {row[1]:.2f}x /health  "
                  f"CPU per report {row[2]:5.1f} µs (SQLite threads {row[3]:4.1f}), wrk {row[4]:4.1f} µs, "
                  f"idle {row[5]:4.1f} %  | /health: CPU {row[6]:4.1f} µs, wrk {row[8]:4.1f} µs, "
                  f"idle {row[9]:4.1f} %", flush=True)
    print(f"medians over {ROUNDS} rounds:")
    first = statistics.median(x[0] for x in results[binaries[0]])
    for b in binaries:
        rps, ratio, us, sq, wrk_us, idle, h_us, _, h_wrk, h_idle = (
            statistics.median(x[i] for x in results[b]) for i in range(10))
        print(f"  {os.path.basename(b):20} {rps:8.0f} reports/s ({rps / first - 1:+.1%})  "
              f"{ratio:.2f}x /health  CPU per report {us:5.1f} µs (SQLite threads {sq:4.1f}), "
              f"wrk {wrk_us:4.1f} µs, idle {idle:4.1f} %  | /health: CPU {h_us:4.1f} µs, "
              f"wrk {h_wrk:4.1f} µs, idle {h_idle:4.1f} %")


def idle_ticks():
    """(idle + iowait, all) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


def split(srv, run):
    """Runs `run` (a wrk run); returns its result and, per request: the server's CPU µs (all
    threads, SQLite threads), wrk's CPU µs, and the machine's idle share in %."""
    r0, s0, i0 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu(srv.pid), idle_ticks()
    w = run()
    r1, s1, i1 = resource.getrusage(resource.RUSAGE_CHILDREN), cpu(srv.pid), idle_ticks()
    n = max(w["total"], 1)
    wrk_s = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    idle = (i1[0] - i0[0]) / max(i1[1] - i0[1], 1) * 100
    return w, ((s1[0] - s0[0]) / n * 1e6, (s1[1] - s0[1]) / n * 1e6, wrk_s / n * 1e6, idle)


def main():
    binaries = sys.argv[1:]
    if not binaries:
        sys.exit(__doc__)
    if not shutil.which("wrk"):
        sys.exit("wrk is required (bench/run.sh installs it)")
    servers = []
    results = {b: [] for b in binaries}
    try:
        for b in binaries:
            servers.append(start(b))
        pairs = list(zip(binaries, servers))
        if MODE == "reports":
            return reports(binaries, pairs, results)
        for r in range(ROUNDS):
            for b, (srv, _, url, token) in pairs if r % 2 == 0 else pairs[::-1]:
                t0 = cpu(srv.pid)
                w = bench.wrk(url, token, seconds=SECS)
                t1 = cpu(srv.pid)
                n = max(w["total"], 1)
                row = (w["rps"], (t1[0] - t0[0]) / n * 1e6, (t1[1] - t0[1]) / n * 1e6)
                results[b].append(row)
                print(f"{os.path.basename(b):20} {row[0]:8.0f} req/s  CPU per serve "
                      f"{row[1]:5.1f} µs (SQLite threads {row[2]:4.1f})", flush=True)
    finally:
        for srv, workdir, *_ in servers:
            srv.terminate()
            srv.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"medians over {ROUNDS} rounds, {N} keys:")
    first = statistics.median(x[0] for x in results[binaries[0]])
    for b in binaries:
        rps, us, sq = (statistics.median(x[i] for x in results[b]) for i in range(3))
        print(f"  {os.path.basename(b):20} {rps:8.0f} req/s ({rps / first - 1:+.1%})  "
              f"CPU per serve {us:5.1f} µs (SQLite threads {sq:4.1f})")


if __name__ == "__main__":
    main()
