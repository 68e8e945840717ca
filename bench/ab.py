"""Paired A/B of durable GET /key: server CPU per serve and req/s, binaries side by side.

Usage: python3 bench/ab.py BINARY... (N=10 for a small pool, default 10,000 keys; ROUNDS=4;
SECS=3). Starts every binary once on its own temp database, sets up N keys with 1 s windows,
serves each key once, then alternates wrk runs between the servers (the order reversed every
round) and reads each server's CPU time from /proc per thread (the SQLite worker threads
apart). Prints each run and the medians: the binaries meet the same machine state within
seconds of each other, which a noisy shared machine needs; run it several times for fresh
instances.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

N = int(os.environ.get("N", "10000"))
ROUNDS = int(os.environ.get("ROUNDS", "4"))
SECS = int(os.environ.get("SECS", "3"))
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
