#!/usr/bin/env python3
"""Proxy mode benchmark (issue 13 item 6): keypooler's /proxy against a fast local upstream.

Starts target/release/examples/upstream_stub and target/release/keypooler on 127.0.0.1, gives a
tier the stub as its upstream (8 keys, no effective rate limit), then in one run:
  - wrk on the stub's small JSON answer, direct and through the proxy: throughput ratio
    (goal >= 0.5x) and added p50 (goal <= 1 ms). The stub answers in microseconds, so this
    case compares the proxy's whole per-request work (the caller's HTTP exchange, a durable
    serve, an HTTP exchange with the stub, the outcome) with the stub's alone, on the same
    shared cores that also run wrk and the stub;
  - the same through a stub that answers after BENCH_STUB_DELAY_MS (default 20 ms, a fast real
    API) at the same concurrency: the proxy's cost as an upstream's caller sees it, added
    latency and lost throughput — once with the 32 connections in lockstep, once with each
    pausing a random 0..BENCH_PAUSE_MS before each request (callers arriving independently);
  - first SSE event latency, direct and proxied, median of BENCH_SSE_SAMPLES requests
    (goal: <= 5 ms added);
  - a 1 GiB response streamed through the proxy while keypooler's RSS is sampled every 10 ms:
    peak RSS against the idle RSS before it (flat memory), and the throughput.
The headline is the stub with a service time and independent callers: against a real upstream
the proxy's cost is the latency it adds (one durable serve plus a second HTTP exchange), and
the 0.5x / 1 ms goals are judged there; the lockstep run is printed beside it. The instant
stub is printed too, as the proxy's whole CPU cost per request beside the stub's; it is bounded
by GET /key alone (each proxied request makes that durable serve), and printed beside nginx as a
plain reverse proxy to the same stub when nginx is installed: a proxy that draws no key and
writes nothing, the bound of any proxy on these shared cores. For each proxied case the
split of the proxy's time comes from its /metrics: the wait for the attempt's durable serve
(keypooler_proxy_draw_duration_seconds: average, and the share within 0.5 / 1 / 2.5 ms) and the
upstream exchange up to the response head (keypooler_proxy_upstream_duration_seconds, average).
Every figure comes from one run; compare the ratios, not absolute numbers, across machines.
"""
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import ADMIN, BINARY, ROOT, Admin, free_port, rss_kib, server_env, wait_port, wrk  # noqa: E402

STUB = os.environ.get("BENCH_STUB") or os.path.join(ROOT, "target", "release", "examples", "upstream_stub")
SSE_SAMPLES = int(os.environ.get("BENCH_SSE_SAMPLES", "200"))
BIG_MIB = int(os.environ.get("BENCH_BIG_MIB", "1024"))
DELAY_MS = int(os.environ.get("BENCH_STUB_DELAY_MS", "20"))
# Independent callers: wrk waits a random 0..BENCH_PAUSE_MS (default: the stub's delay) before
# each request, so the connections do not move in lockstep.
PAUSE_MS = int(os.environ.get("BENCH_PAUSE_MS", str(DELAY_MS)))


def first_event_ms(port, path, headers):
    """Median ms from sending a request to reading its first SSE event (one keep-alive connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples = []
    for _ in range(SSE_SAMPLES):
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        assert r.status == 200, r.status
        line = r.readline()
        while line and not line.startswith(b"data:"):
            line = r.readline()
        samples.append((time.perf_counter() - t0) * 1000)
        r.read()
    conn.close()
    return statistics.median(samples)


# Histogram bucket bounds (seconds) the draw's distribution is printed at; an average alone is
# moved by a few stalls on a loaded machine.
DRAW_BOUNDS = ("0.0005", "0.001", "0.0025")


def proxy_phases(port):
    """Running sums and counts of the proxy's draw and upstream-head durations (seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for phase, name in (("draw", "keypooler_proxy_draw_duration_seconds"),
                        ("upstream", "keypooler_proxy_upstream_duration_seconds")):
        for part in ("sum", "count"):
            out[phase, part] = sum(float(v) for v in re.findall(rf"^{name}_{part}{{[^}}]*}} (\S+)$", text, re.M))
        for le in DRAW_BOUNDS:
            out[phase, le] = sum(float(v) for v in re.findall(rf'^{name}_bucket{{[^}}]*le="{le}"}} (\S+)$', text, re.M))
    return out


def proxied_wrk(port, path, script=None):
    """wrk through the proxy, with the average draw and upstream-head ms over the run."""
    before = proxy_phases(port)
    r = wrk(f"http://127.0.0.1:{port}{path}", token=ADMIN, script=script)
    after = proxy_phases(port)
    for phase in ("draw", "upstream"):
        n = after[phase, "count"] - before[phase, "count"]
        r[phase] = (after[phase, "sum"] - before[phase, "sum"]) / n * 1000 if n else float("nan")
    n = after["draw", "count"] - before["draw", "count"]
    r["draw_within"] = [(after["draw", le] - before["draw", le]) / n * 100 if n else float("nan") for le in DRAW_BOUNDS]
    return r


class PeakRss:
    """Samples a process's VmRSS every 10 ms while active (peak kept)."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, rss_kib(self.pid, "VmRSS"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()


def stream_all(port, path, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    assert r.status == 200, r.status
    total, t0 = 0, time.perf_counter()
    while True:
        chunk = r.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    took = time.perf_counter() - t0
    conn.close()
    return total, took


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  upstream stub {{ server 127.0.0.1:{stub}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://stub;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header x-api-key "sk-reference";
      proxy_buffering off;
    }}
  }}
}}
"""


def reference_proxy(workdir, stub_port):
    """nginx as a plain reverse proxy to the stub (keep-alive upstream, one worker: its best
    on these cores), if installed: the bound of a proxy that draws no key and writes nothing."""
    import shutil
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        return None, None
    port = free_port()
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(dir=workdir, stub=stub_port, port=port))
    proc = subprocess.Popen([nginx, "-c", conf, "-p", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def set_up_tier(port, stub_port):
    """Feature `bench` on a tier whose upstream is the stub, with 8 keys and no effective limit."""
    admin = Admin(port)
    admin.ok("POST", "/admin/tiers", {
        "name": "proxied",
        "features": {"bench": {"rate_limit": 1_000_000_000, "window_seconds": 1}},
        "upstream": {"base_url": f"http://127.0.0.1:{stub_port}", "auth": {"header": "x-api-key"}},
    })
    for i in range(8):
        admin.ok("POST", "/admin/keys", {"name": f"k{i}", "key": f"sk-bench-{i}", "tier": "proxied"})


def main():
    for path in (BINARY, STUB):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing (bash bench/run.sh proxy builds it)")
    workdir = tempfile.mkdtemp(prefix="keypooler-proxy-bench-")
    stub = subprocess.Popen([STUB, "0"], stdout=subprocess.PIPE, text=True)
    stub_port = int(stub.stdout.readline().strip().split("=")[1])
    port = free_port()
    env = server_env(workdir, port)
    server = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = None
    try:
        wait_port(port)
        wait_port(stub_port)
        set_up_tier(port, stub_port)
        auth = {"Authorization": f"Bearer {ADMIN}"}

        direct = wrk(f"http://127.0.0.1:{stub_port}/small")
        proxied = proxied_wrk(port, "/proxy/bench/small")
        # Warm both paths once more and measure again; the second pair is reported too.
        direct2 = wrk(f"http://127.0.0.1:{stub_port}/small")
        proxied2 = proxied_wrk(port, "/proxy/bench/small")
        # The same through a plain reverse proxy: on two cores shared by wrk, the stub and the
        # proxy, a proxy makes two HTTP exchanges where direct makes one.
        nginx, nginx_port = reference_proxy(workdir, stub_port)
        reference = wrk(f"http://127.0.0.1:{nginx_port}/small") if nginx else None
        direct3 = wrk(f"http://127.0.0.1:{stub_port}/small") if nginx else None

        # An upstream with a service time: throughput is then bounded by concurrency ÷ latency,
        # so what the proxy adds shows as latency (and the throughput it costs).
        slow_direct = wrk(f"http://127.0.0.1:{stub_port}/slow?ms={DELAY_MS}")
        slow_proxied = proxied_wrk(port, f"/proxy/bench/slow?ms={DELAY_MS}")
        # The same upstream with callers that arrive independently (a random pause before each
        # request): against a stub with a fixed service time, 32 connections started together
        # stay in lockstep, so every draw of a wave queues behind the others' group commits.
        pause = os.path.join(workdir, "pause.lua")
        with open(pause, "w") as f:
            f.write(f"function delay()\n  return math.random(0, {PAUSE_MS})\nend\n")
        paced_direct = wrk(f"http://127.0.0.1:{stub_port}/slow?ms={DELAY_MS}", script=pause)
        paced_proxied = proxied_wrk(port, f"/proxy/bench/slow?ms={DELAY_MS}", script=pause)

        # The draw alone (same tier, same token): what every proxied attempt pays before its
        # upstream request — a serve counted and audited in the group commit.
        key_only = wrk(f"http://127.0.0.1:{port}/key?feature=bench", token=ADMIN)
        # The same draw at light load (2 connections, about as many serves in flight as the
        # proxied requests to the slow stub have): what the durable serve alone costs there.
        connections, bench.CONNECTIONS = bench.CONNECTIONS, 2
        key_light = wrk(f"http://127.0.0.1:{port}/key?feature=bench", token=ADMIN)
        bench.CONNECTIONS = connections

        sse_direct = first_event_ms(stub_port, "/sse?events=3", {})
        sse_proxied = first_event_ms(port, "/proxy/bench/sse?events=3", auth)

        idle_rss = rss_kib(server.pid, "VmRSS")
        with PeakRss(server.pid) as peak:
            total, took = stream_all(port, f"/proxy/bench/big?mib={BIG_MIB}", auth)
        direct_total, direct_took = stream_all(stub_port, f"/big?mib={BIG_MIB}", {})
        assert total == BIG_MIB << 20, total

        print(f"{'case':44} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
        for name, r in (("direct to the stub (small JSON)", direct), ("through /proxy (small JSON)", proxied),
                        ("direct to the stub, again", direct2), ("through /proxy, again", proxied2),
                        ("GET /key alone (the draw each attempt makes)", key_only),
                        ("GET /key alone, 2 connections", key_light),
                        (f"direct to the stub ({DELAY_MS} ms answer)", slow_direct),
                        (f"through /proxy ({DELAY_MS} ms answer)", slow_proxied),
                        (f"direct, {DELAY_MS} ms, paused 0-{PAUSE_MS} ms", paced_direct),
                        (f"through /proxy, {DELAY_MS} ms, paused 0-{PAUSE_MS} ms", paced_proxied)):
            print(f"{name:44} {r['rps']:>10.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['non2xx'] + r['socket']:>8}")

        def met(ok):
            return "met" if ok else "NOT met"

        def verdict(label, d, p):
            ratio, added = p["rps"] / d["rps"], p["p50"] - d["p50"]
            print(f"{label}: proxied/direct throughput {ratio:.2f}x (goal >= 0.5x: {met(ratio >= 0.5)}), "
                  f"added p50 {added:.3f} ms (goal <= 1 ms: {met(added <= 1.0)}); of the proxy's time per "
                  f"request, waiting for the durable serve {p['draw']:.3f} ms avg "
                  f"({' / '.join(f'{w:.0f}' for w in p['draw_within'])} % within "
                  f"{' / '.join(f'{float(b) * 1000:g}' for b in DRAW_BOUNDS)} ms), upstream to response head "
                  f"{p['upstream']:.3f} ms avg (direct p50 {d['p50']:.3f} ms)")

        print(f"HEADLINE, stub answering after {DELAY_MS} ms (an upstream with a service time), callers "
              f"pausing 0-{PAUSE_MS} ms before each request (independent arrivals):")
        verdict(f"  {DELAY_MS} ms stub, paused callers", paced_direct, paced_proxied)
        print("The same with the 32 connections in lockstep (every request of a wave drawn at once):")
        verdict(f"  {DELAY_MS} ms stub, lockstep", slow_direct, slow_proxied)
        print(f"  (a durable serve alone at light load, GET /key at 2 connections: p50 {key_light['p50']:.3f} ms)")
        print("Instant stub (the proxy's whole CPU cost beside the stub's; bounded by GET /key alone, "
              f"{key_only['rps'] / direct['rps']:.2f}x / {key_only['rps'] / direct2['rps']:.2f}x direct here):")
        verdict("  instant stub, run 1", direct, proxied)
        verdict("  instant stub, run 2", direct2, proxied2)
        if reference:
            print(f"  reference: nginx as a plain reverse proxy to the same stub (keep-alive, no key drawn, nothing "
                  f"written): {reference['rps']:.0f} req/s, {reference['rps'] / direct3['rps']:.2f}x direct "
                  f"({direct3['rps']:.0f} req/s, measured right after), added p50 {reference['p50'] - direct3['p50']:.3f} ms; "
                  f"keypooler's /proxy reached {proxied2['rps'] / reference['rps']:.2f}x nginx's throughput")
        else:
            print("  reference: nginx is not installed (apt-get install nginx-light), so no plain reverse proxy "
                  "was measured beside it")
        print(f"first SSE event (median of {SSE_SAMPLES}): direct {sse_direct:.3f} ms, proxied {sse_proxied:.3f} ms, "
              f"added {sse_proxied - sse_direct:.3f} ms (goal <= 5 ms: {met(sse_proxied - sse_direct <= 5)})")
        print(f"{BIG_MIB} MiB streamed through /proxy in {took:.2f} s ({total / took / 2**20:.0f} MiB/s; "
              f"direct {direct_total / direct_took / 2**20:.0f} MiB/s); keypooler RSS idle {idle_rss / 1024:.1f} MiB, "
              f"peak while streaming {peak.peak / 1024:.1f} MiB")
    finally:
        for p in (server, stub, nginx):
            if p is None:
                continue
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
