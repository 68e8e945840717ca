#!/usr/bin/env bash
# The load benchmark (not a test; not run in CI). Builds the release binary, installs wrk
# from Debian if missing, then runs bench/bench.py: loopback only, bounded, stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  echo "installing wrk from Debian…" >&2
  (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) >/dev/null
fi
cargo build --release --locked
# `bash bench/run.sh proxy`: the proxy benchmark (bench/proxy.py) against examples/upstream_stub.rs.
if [ "${1:-}" = "proxy" ]; then
  shift
  cargo build --release --locked --example upstream_stub
  exec python3 bench/proxy.py "$@"
fi
# `bash bench/run.sh audit`: the audit benchmark (bench/audit.py; AUDIT_ROWS etc. in its header).
if [ "${1:-}" = "audit" ]; then
  shift
  exec python3 bench/audit.py "$@"
fi
# `bash bench/run.sh regbot|ui|limits|remote`: the RegBot source (bench/regbot.py, issue 12), the admin
# page's load time (bench/ui.py; needs chromium, chromedriver), plan-shaped limits
# (bench/limits.py, issue 11), a remote database 20 ms away and three replicas on one file
# (bench/remote.py, issue 14).
case "${1:-}" in
  regbot) shift; exec python3 bench/regbot.py "$@" ;;
  ui) shift; exec python3 bench/ui.py "$@" ;;
  limits) shift; exec python3 bench/limits.py "$@" ;;
  remote) shift; cargo build --release --locked --example libsql_server; exec python3 bench/remote.py "$@" ;;
esac
exec python3 bench/bench.py "$@"
