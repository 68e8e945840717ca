#!/usr/bin/env python3
"""keypooler admin page load time (issue 15 item 1): prints how long the page takes with a small
and a 10,000-key pool, measured in the same run.

Starts target/release/keypooler on 127.0.0.1 with a temp SQLite database, seeds a tier with
BENCH_UI_SMALL keys (default 10), opens /admin/ui in headless Chromium through chromedriver
(raw WebDriver over HTTP: no Python package needed), signs in, and reads what the page itself
measured: `data-first-load-ms` (sign-in to the first full render: six admin reads, parsing and
rendering) and `data-refresh-ms` (one background refresh, the median of BENCH_UI_REFRESHES).
Then imports keys up to BENCH_UI_KEYS (default 10,000) and measures again in a fresh browser
session, plus a page turn and a name filter over the whole pool. Also times GET /admin/keys
alone from Python. Prints times and ratios; asserts what the page shows, never a duration.
Needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver).
"""
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BINARY, free_port  # noqa: E402

ADMIN = "bench-admin-token-" + os.urandom(8).hex()
SMALL = int(os.environ.get("BENCH_UI_SMALL", "10"))
KEYS = int(os.environ.get("BENCH_UI_KEYS", "10000"))
REFRESHES = int(os.environ.get("BENCH_UI_REFRESHES", "3"))
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Every wait below is bounded by this.
WAIT_SECONDS = 60


def request(port, method, path, body=None, token=ADMIN, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def call(port, method, path, body=None, token=ADMIN):
    status, data = request(port, method, path, body, token)
    return status, (json.loads(data) if data else None)


def wait_http(port, path):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            request(port, "GET", path, token=None, timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing answered on port {port}")


class WebDriver:
    """A chromedriver process and one headless Chromium session, spoken to in raw WebDriver."""

    def __init__(self, port):
        self.port = port
        self.profile = tempfile.mkdtemp(prefix="keypooler-ui-bench-profile-")
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--user-data-dir=" + self.profile]}}}}
        status, answer = call(port, "POST", "/session", caps, token=None)
        if status != 200:
            sys.exit(f"no browser session: {status} {answer}")
        self.session = answer["value"]["sessionId"]

    def cmd(self, method, path, body=None):
        status, answer = call(self.port, method, f"/session/{self.session}{path}", body, token=None)
        if status != 200:
            raise RuntimeError(f"WebDriver {path}: {status} {answer}")
        return answer["value"]

    def run(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def until(self, what, script, *args):
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            value = self.run(script, *args)
            if value:
                return value
            time.sleep(0.02)
        sys.exit(f"timed out waiting for {what}")

    def close(self):
        try:
            call(self.port, "DELETE", f"/session/{self.session}", token=None)
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


def measure(driver_port, base, expect_keys):
    """Opens the page in a fresh session, signs in, and returns what the page measured."""
    browser = WebDriver(driver_port)
    try:
        browser.cmd("POST", "/url", {"url": base + "/admin/ui"})
        browser.until("the token field", "return !document.getElementById('login').hidden;")
        browser.run("""document.getElementById('token').value = arguments[0];
                       document.getElementById('login-form').requestSubmit();""", ADMIN)
        first = float(browser.until("the first render", "return document.body.dataset.firstLoadMs;"))
        info = browser.run("return document.getElementById('page-info').textContent;")
        assert info.endswith(f"of {expect_keys:,}"), info
        rows = browser.run("return document.querySelectorAll('#keys tbody tr').length;")
        assert rows == min(50, expect_keys), rows
        refreshes = []
        for _ in range(REFRESHES):
            browser.run("document.body.dataset.refreshMs = '';")
            refreshes.append(float(browser.until(
                "a background refresh", "return document.body.dataset.refreshMs;")))
        # A page turn and a name filter over the whole pool, timed inside the page.
        turn = browser.run("""const t = performance.now();
            document.getElementById('page-next').click();
            return performance.now() - t;""")
        search = browser.run("""const t = performance.now();
            const f = document.getElementById('filter-name');
            f.value = 'ui-0999'; f.dispatchEvent(new Event('input'));
            return performance.now() - t;""")
        return first, statistics.median(refreshes), turn, search
    finally:
        browser.close()


def admin_keys(port):
    started = time.monotonic()
    status, data = request(port, "GET", "/admin/keys")
    assert status == 200, status
    return (time.monotonic() - started) * 1000, len(data)


def import_keys(port, start, end):
    keys = [{"name": f"ui-{i:05}", "key": f"value-{i:05}-{os.urandom(8).hex()}",
             "usage_limit": 1000, "usage_window_seconds": 86400} for i in range(start, end)]
    for chunk in range(0, len(keys), 5000):
        status, answer = call(port, "POST", "/admin/keys/import",
                              {"tier": "bench", "keys": keys[chunk:chunk + 5000]})
        assert status == 200 and answer["created"] == len(keys[chunk:chunk + 5000]), (status, answer)


def main():
    for tool in (BINARY, CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(tool):
            sys.exit(f"{tool} missing (cargo build --release; apt-get install chromium chromium-driver)")
    tmp = tempfile.mkdtemp(prefix="keypooler-ui-bench-")
    port, driver_port = free_port(), free_port()
    env = {"PATH": os.environ.get("PATH", ""), "ADMIN_TOKEN": ADMIN,
           "DB_PATH": os.path.join(tmp, "pool.db"), "SERVER_PORT": str(port),
           "LOG_LEVEL": "warn", "LOG_REQUESTS": "false"}
    server = subprocess.Popen([BINARY], env=env, stdout=subprocess.DEVNULL)
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={driver_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(port, "/health")
        wait_http(driver_port, "/status")
        status, _ = call(port, "POST", "/admin/tiers", {"name": "bench", "features": {
            "scrape": {"rate_limit": 100, "window_seconds": 60},
            "search": {"rate_limit": 10, "window_seconds": 60}}})
        assert status == 201, status
        for i in range(20):
            status, consumer = call(port, "POST", "/admin/consumers", {"name": f"consumer-{i:02}"})
            assert status == 201, status
            call(port, "POST", f"/admin/consumers/{consumer['id']}/scopes", {"tier": "bench"})
        import_keys(port, 0, SMALL)
        for _ in range(30):
            status, _ = call(port, "GET", "/key?feature=scrape")
            assert status == 200, status
        small = measure(driver_port, base, SMALL)
        small_api = admin_keys(port)
        import_keys(port, SMALL, KEYS)
        big = measure(driver_port, base, KEYS)
        big_api = admin_keys(port)
    finally:
        server.terminate()
        server.wait()
        try:
            os.killpg(driver.pid, 15)
        except ProcessLookupError:
            pass
        driver.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print("admin page, headless Chromium on the same 2 shared cores as the release server")
    print(f"{'':34}{SMALL:>10,} keys{KEYS:>12,} keys     ratio")
    rows = [("first load (sign-in to render)", small[0], big[0]),
            ("background refresh (median)", small[1], big[1]),
            ("GET /admin/keys alone", small_api[0], big_api[0]),
            ("page turn (50 rows)", small[2], big[2]),
            ("name filter over the pool", small[3], big[3])]
    for label, a, b in rows:
        print(f"{label:34}{a:10.0f} ms{b:12.0f} ms {b / max(a, 1):8.1f}x")
    print(f"{'GET /admin/keys body':34}{small_api[1] / 1024:10.0f} KiB{big_api[1] / 1048576:10.1f} MiB")


if __name__ == "__main__":
    main()
