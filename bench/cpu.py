"""Server CPU per request: durable GET /key against N keys (default 10,000) and /health.

Usage: python3 bench/cpu.py BINARY... (N=10 for a small pool). For each binary it starts a
server on a temp dir, runs wrk twice per endpoint (3 s each) and reads the server's
utime+stime from /proc/PID/stat around each run, so figures are CPU microseconds per request
(steadier than req/s on a loaded machine). Compare binaries back to back.
"""
import os, sys, shutil, subprocess, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench
N = int(os.environ.get('N', '10000'))
def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
def run(BIN):
    workdir = tempfile.mkdtemp()
    port = bench.free_port()
    env = bench.server_env(workdir, port)
    srv = subprocess.Popen([BIN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_port(port)
        a = bench.Admin(port)
        a.ok("POST", "/admin/tiers", {"name": "big", "features": {"big_scrape": {"rate_limit": 1_000_000_000, "window_seconds": 1}}})
        for i in range(N):
            a.ok("POST", "/admin/keys", {"name": f"big-{i:05}", "key": f"sk-big-{i}", "tier": "big", "usage_limit": 1_000_000_000_000})
        c = a.ok("POST", "/admin/consumers", {"name": "bench"})
        a.ok("POST", f"/admin/consumers/{c['id']}/scopes", {"tier": "big"})
        base = f"http://127.0.0.1:{port}"
        bench.wrk(base + "/key?feature=big_scrape", c['token'], seconds=2)
        out = []
        for _ in range(2):
            for name, url, tok in (("health", base + "/health", None), ("key", base + "/key?feature=big_scrape", c['token'])):
                t0 = cpu(srv.pid); r = bench.wrk(url, tok, seconds=3); t1 = cpu(srv.pid)
                out.append((name, r['rps'], (t1 - t0) / r['total'] * 1e6))
        res = {}
        for name, rps, us in out:
            res.setdefault(name, []).append((rps, us))
        return res
    finally:
        srv.terminate(); srv.wait()
        shutil.rmtree(workdir, ignore_errors=True)
for b in sys.argv[1:]:
    r = run(b)
    h = max(r['health']); k = max(r['key'])
    print(f"{os.path.basename(b):16} health {h[0]:7.0f}/s {min(x[1] for x in r['health']):5.1f}us  key {k[0]:7.0f}/s ({k[0]/h[0]:.2f}x) cpu/serve {min(x[1] for x in r['key']):5.1f}us")
