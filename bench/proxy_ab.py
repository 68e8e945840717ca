#!/usr/bin/env python3
"""Paired A/B of the proxy against a stub that answers after BENCH_STUB_DELAY_MS (default 20 ms),
32 connections in lockstep (bench/proxy.py's lockstep case): added p50, the average wait for the
attempt's durable serve, and proxied ÷ direct throughput.

Usage: python3 bench/proxy_ab.py BINARY... (ROUNDS=8). Starts one stub and every binary on its
own temp database (one tier, 8 keys, the stub as upstream), then per round measures the stub
directly and each binary through /proxy, the binaries' order reversed every round, so they meet
the same machine state within seconds; prints each run and the medians. A single bench/proxy.py
run per build cannot show a few tenths of a millisecond on a noisy shared machine, and which
build runs first in a pair of such runs moved this figure more than the builds did.
"""
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proxy  # noqa: E402
from bench import free_port, server_env, wait_port, wrk  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "8"))


def start(binary, stub_port):
    workdir = tempfile.mkdtemp(prefix="keypooler-proxy-ab-")
    port = free_port()
    server = subprocess.Popen([binary], env=server_env(workdir, port), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(port)
    proxy.set_up_tier(port, stub_port)
    return server, port


def main():
    binaries = sys.argv[1:]
    if not binaries:
        sys.exit(__doc__)
    stub = subprocess.Popen([proxy.STUB, "0"], stdout=subprocess.PIPE, text=True)
    stub_port = int(stub.stdout.readline().strip().split("=")[1])
    servers = []
    try:
        for binary in binaries:
            server, port = start(binary, stub_port)
            servers.append((os.path.basename(binary), port, server))
        path = f"/slow?ms={proxy.DELAY_MS}"
        runs = {name: [] for name, _, _ in servers}
        for r in range(ROUNDS):
            direct = wrk(f"http://127.0.0.1:{stub_port}{path}")
            for name, port, _ in (servers if r % 2 == 0 else servers[::-1]):
                p = proxy.proxied_wrk(port, f"/proxy/bench{path}")
                run = (p["p50"] - direct["p50"], p["draw"], p["rps"] / direct["rps"])
                runs[name].append(run)
                print(f"round {r} {name:24} added p50 {run[0]:.3f} ms  durable serve {run[1]:.3f} ms avg  "
                      f"proxied/direct {run[2]:.2f}x", flush=True)
        print(f"medians over {ROUNDS} rounds:")
        for name, values in runs.items():
            added, draw, ratio = (statistics.median(v[i] for v in values) for i in range(3))
            print(f"  {name:24} added p50 {added:.3f} ms  durable serve {draw:.3f} ms avg  proxied/direct {ratio:.2f}x")
    finally:
        for _, _, server in servers:
            server.terminate()
        stub.terminate()


if __name__ == "__main__":
    main()
