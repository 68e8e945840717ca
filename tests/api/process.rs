//! The built binary as a subprocess (SPEC §2, §7): `kill -9` mid-load never over-serves and
//! loses no counted serve, SIGTERM drains and exits 0, no secret reaches the log even at debug,
//! and a bad configuration fails with one line naming the variable.
//!
//! Every child runs under a [`ChildGuard`] that kills and reaps it when the test ends, panics
//! included; every wait is bounded.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::open_db;

const BIN: &str = env!("CARGO_BIN_EXE_keypooler");
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const CALLERS: usize = 32;

/// A distinctive, random-looking string that cannot appear in a log by accident.
pub(crate) fn distinctive(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A port that was free a moment ago (the binary binds 0.0.0.0 on it).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0 to find a free port")
        .local_addr()
        .expect("local address of the probe socket")
        .port()
}

/// Kills (SIGKILL) and reaps the child when dropped, whatever happened to the test.
pub(crate) struct ChildGuard(pub(crate) Child);

impl ChildGuard {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Polls until the child exits or `timeout` passes.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait on the child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn sigkill(&mut self) {
        self.0.kill().expect("SIGKILL the server");
        self.0.wait().expect("reap the killed server");
    }

    pub(crate) fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run `kill -TERM`");
        assert!(
            status.success(),
            "`kill -TERM {}` failed: {status}",
            self.pid()
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running keypooler binary.
pub(crate) struct Server {
    pub(crate) child: ChildGuard,
    pub(crate) base: String,
    pub(crate) admin_token: String,
    pub(crate) log: PathBuf,
    pub(crate) client: reqwest::Client,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(CALLERS * 2)
        .build()
        .expect("reqwest client")
}

pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Starts the binary with exactly `env` (plus ADMIN_TOKEN and SERVER_PORT), stdout and stderr
/// appended to `log`, and waits until it answers `/admin/health` with our admin token (so a
/// different server that happens to own the port cannot pass for ours). Retries on a port race.
pub(crate) async fn start_server(
    env: &[(&str, &str)],
    admin_token: &str,
    log: &Path,
    cwd: &Path,
) -> Server {
    start_server_via(&[], env, &[], admin_token, log, cwd).await
}

/// [`start_server`] with extra variables given as the OS holds them (they may not be UTF-8).
async fn start_server_with(
    env: &[(&str, &str)],
    os_env: &[(OsString, OsString)],
    admin_token: &str,
    log: &Path,
    cwd: &Path,
) -> Server {
    start_server_via(&[], env, os_env, admin_token, log, cwd).await
}

/// [`start_server`], the binary run through `launcher` (a command that ends by exec'ing its
/// last argument, e.g. `nsenter … --`), so the child's pid is still the server's.
pub(crate) async fn start_server_via(
    launcher: &[&str],
    env: &[(&str, &str)],
    os_env: &[(OsString, OsString)],
    admin_token: &str,
    log: &Path,
    cwd: &Path,
) -> Server {
    for attempt in 1..=3 {
        let port = free_port();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the log file");
        let err = out.try_clone().expect("clone the log file handle");
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .env_clear()
            .envs(env.iter().copied())
            .envs(os_env.iter().map(|(k, v)| (k, v)))
            .env("ADMIN_TOKEN", admin_token)
            .env("SERVER_PORT", port.to_string())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn the keypooler binary");
        let mut child = ChildGuard(child);
        let base = format!("http://127.0.0.1:{port}");
        let client = client();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.0.try_wait().expect("try_wait on the server") {
                let text = read_log(log);
                if text.contains("cannot listen") && attempt < 3 {
                    break; // someone took the port between probe and bind: try another
                }
                panic!("server exited before it was ready ({status}); log:\n{text}");
            }
            let probe = client
                .get(format!("{base}/admin/health"))
                .bearer_auth(admin_token)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&probe, Ok(r) if r.status() == StatusCode::OK) {
                return Server {
                    child,
                    base,
                    admin_token: admin_token.to_string(),
                    log: log.to_path_buf(),
                    client,
                };
            }
            if Instant::now() >= deadline {
                panic!(
                    "server not ready within {READY_TIMEOUT:?}; log:\n{}",
                    read_log(log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    unreachable!("the loop returns or panics")
}

impl Server {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method.clone(), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: request failed: {e}"));
        let status = r.status();
        let text = r
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: body failed: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// An admin call that must answer `expected`; returns the body.
    pub(crate) async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        expected: StatusCode,
    ) -> Value {
        let (status, got) = self
            .call(method.clone(), path, Some(&self.admin_token), body.as_ref())
            .await;
        assert_eq!(status, expected, "{method} {path} answered {got}");
        got
    }

    pub(crate) async fn add_key(&self, body: Value) -> String {
        let created = self
            .admin(Method::POST, "/admin/keys", Some(body), StatusCode::CREATED)
            .await;
        created["id"]
            .as_str()
            .expect("created key has an id")
            .to_string()
    }

    /// Creates a consumer scoped to `tier`; returns (id, token).
    pub(crate) async fn consumer(&self, name: &str, tier: &str) -> (String, String) {
        let c = self
            .admin(
                Method::POST,
                "/admin/consumers",
                Some(json!({ "name": name })),
                StatusCode::CREATED,
            )
            .await;
        let id = c["id"].as_str().expect("consumer id").to_string();
        let token = c["token"].as_str().expect("consumer token").to_string();
        let path = format!("/admin/consumers/{id}/scopes");
        self.admin(
            Method::POST,
            &path,
            Some(json!({ "tier": tier })),
            StatusCode::CREATED,
        )
        .await;
        (id, token)
    }

    /// SIGTERM, then the exit status within `timeout` (panics with the log if it does not exit).
    pub(crate) async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.child.sigterm();
        match self.child.wait_exit(timeout).await {
            Some(status) => status,
            None => panic!(
                "server did not exit within {timeout:?} of SIGTERM; log:\n{}",
                read_log(&self.log)
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load: CALLERS concurrent loops of GET /key, each stopping at its first connection error,
// 429 or other non-200 answer.

#[derive(Default)]
struct Tally {
    /// key_id of every 200 whose body arrived whole.
    served: Vec<String>,
    /// Of those, how many arrived after the signal was sent.
    served_after_signal: usize,
    /// Non-200 statuses.
    statuses: BTreeMap<u16, usize>,
    /// Connection errors seen before the signal (there should be none).
    errors_before_signal: Vec<String>,
    errors_after_signal: usize,
    /// 200s whose value or key_id did not match what was added.
    wrong: Vec<String>,
    retry_after_on_429: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.served.extend(other.served);
        self.served_after_signal += other.served_after_signal;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.errors_before_signal.extend(other.errors_before_signal);
        self.errors_after_signal += other.errors_after_signal;
        self.wrong.extend(other.wrong);
        self.retry_after_on_429.extend(other.retry_after_on_429);
    }

    fn per_key(&self) -> HashMap<String, i64> {
        let mut out = HashMap::new();
        for k in &self.served {
            *out.entry(k.clone()).or_default() += 1;
        }
        out
    }
}

struct Load {
    url: String,
    token: String,
    /// key_id → value it must be served with.
    values: Arc<HashMap<String, String>>,
    signalled: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
}

impl Load {
    fn new(server: &Server, feature: &str, token: &str, values: &HashMap<String, String>) -> Load {
        Load {
            url: server.url(&format!("/key?feature={feature}")),
            token: token.to_string(),
            values: Arc::new(values.clone()),
            signalled: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn spawn(&self, callers: usize) -> Vec<tokio::task::JoinHandle<Tally>> {
        (0..callers)
            .map(|_| {
                let client = client();
                let url = self.url.clone();
                let token = self.token.clone();
                let values = self.values.clone();
                let signalled = self.signalled.clone();
                let ok = self.ok.clone();
                tokio::spawn(async move {
                    let mut t = Tally::default();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < deadline {
                        let response = match client.get(&url).bearer_auth(&token).send().await {
                            Ok(r) => r,
                            Err(e) => {
                                t.error(&signalled, e);
                                break;
                            }
                        };
                        let status = response.status();
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .map(|v| format!("{v:?}"));
                        let text = match response.text().await {
                            Ok(text) => text,
                            Err(e) => {
                                t.error(&signalled, e);
                                break;
                            }
                        };
                        if status != StatusCode::OK {
                            *t.statuses.entry(status.as_u16()).or_default() += 1;
                            if status == StatusCode::TOO_MANY_REQUESTS {
                                t.retry_after_on_429.extend(retry_after);
                            }
                            break;
                        }
                        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        let key_id = body["key_id"].as_str().unwrap_or_default().to_string();
                        if values.get(&key_id).map(String::as_str) != body["value"].as_str() {
                            t.wrong.push(text);
                        }
                        if signalled.load(Ordering::SeqCst) {
                            t.served_after_signal += 1;
                        }
                        t.served.push(key_id);
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    t
                })
            })
            .collect()
    }

    /// Waits until `n` 200s were received or `timeout` passed; returns how many were.
    async fn wait_for_ok(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.ok.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.ok.load(Ordering::SeqCst)
    }
}

impl Tally {
    fn error(&mut self, signalled: &AtomicBool, e: reqwest::Error) {
        if signalled.load(Ordering::SeqCst) {
            self.errors_after_signal += 1;
        } else {
            self.errors_before_signal.push(e.to_string());
        }
    }
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut total = Tally::default();
    for h in handles {
        let t = tokio::time::timeout_at(deadline, h)
            .await
            .expect("callers finished in time")
            .expect("caller task did not panic");
        total.merge(t);
    }
    total
}

// ---------------------------------------------------------------------------------------------
// The database as committed.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRow {
    usage_count: i64,
    usage_limit: Option<i64>,
    events: i64,
}

/// Per key: its counters and audit rows; plus the total number of audit rows in the file.
async fn committed(db_path: &Path, key_ids: &[String]) -> (HashMap<String, KeyRow>, i64) {
    let db = open_db(db_path).await;
    let mut rows = HashMap::new();
    for id in key_ids {
        let (usage_count, usage_limit): (i64, Option<i64>) =
            sqlx::query_as("SELECT usage_count, usage_limit FROM keys WHERE id = ?")
                .bind(id)
                .fetch_one(&db)
                .await
                .expect("read the key's counters");
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE key_id = ?")
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("count the key's usage events");
        rows.insert(
            id.clone(),
            KeyRow {
                usage_count,
                usage_limit,
                events,
            },
        );
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(&db)
        .await
        .expect("count all usage events");
    db.close().await;
    (rows, total)
}

pub(crate) fn quiet_env(db_path: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("DB_PATH", db_path.display().to_string()),
        ("LOG_LEVEL", "warn".into()),
        ("LOG_FORMAT", "json".into()),
        ("LOG_REQUESTS", "false".into()),
        ("SERVER_SHUTDOWN_TIMEOUT_SECONDS", "10".into()),
    ]
}

pub(crate) fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// ---------------------------------------------------------------------------------------------

/// A started server with a tier `bulk` (feature `scrape`), one key per entry of `key_fields`
/// (extra fields of its POST body) and a consumer `worker` scoped to the tier.
struct Bulk {
    server: Server,
    db_path: PathBuf,
    /// key id → its value
    values: HashMap<String, String>,
    key_ids: Vec<String>,
    consumer_id: String,
    token: String,
    log: PathBuf,
}

async fn bulk_server(dir: &Path, key_fields: &[Value]) -> Bulk {
    let db_path = dir.join("data").join("pool.db");
    let log = dir.join("server.log");
    let admin = distinctive("adm-");
    let env = quiet_env(&db_path);
    let server = start_server(&as_refs(&env), &admin, &log, dir).await;
    server
        .admin(
            Method::POST,
            "/admin/tiers",
            Some(json!({ "name": "bulk", "features": { "scrape": { "rate_limit": 1_000_000, "window_seconds": 60 } } })),
            StatusCode::CREATED,
        )
        .await;
    let mut values = HashMap::new();
    let mut key_ids = Vec::new();
    for (i, extra) in key_fields.iter().enumerate() {
        let value = format!("value-{i}-{}", uuid::Uuid::new_v4().simple());
        let mut body = json!({ "name": format!("k{i}"), "key": value, "tier": "bulk" });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let id = server.add_key(body).await;
        values.insert(id.clone(), value);
        key_ids.push(id);
    }
    let (consumer_id, token) = server.consumer("worker", "bulk").await;
    Bulk {
        server,
        db_path,
        values,
        key_ids,
        consumer_id,
        token,
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_never_over_serves_and_every_delivered_serve_is_counted() {
    const LIMIT: i64 = 300;
    const KILL_AFTER: usize = 200;
    let dir = tempfile::tempdir().expect("temp dir");
    let limited = json!({ "usage_limit": LIMIT });
    let Bulk {
        mut server,
        db_path,
        values,
        key_ids,
        consumer_id,
        token,
        log,
    } = bulk_server(dir.path(), &[limited.clone(), limited.clone(), limited]).await;
    let (env, admin) = (quiet_env(&db_path), server.admin_token.clone());

    // Run 1: load, then SIGKILL once enough 200s have arrived.
    let load = Load::new(&server, "scrape", &token, &values);
    let handles = load.spawn(CALLERS);
    let before_kill = load.wait_for_ok(KILL_AFTER, Duration::from_secs(15)).await;
    load.signalled.store(true, Ordering::SeqCst);
    server.child.sigkill();
    let run1 = join_all(handles).await;
    println!(
        "kill -9: {before_kill} 200s seen when the kill was sent, {} delivered in all ({} after the kill was sent), \
         {} connection errors after, statuses {:?}",
        run1.served.len(),
        run1.served_after_signal,
        run1.errors_after_signal,
        run1.statuses
    );
    assert!(
        run1.errors_before_signal.is_empty(),
        "errors before the kill: {:?}",
        run1.errors_before_signal
    );
    assert!(
        run1.statuses.is_empty(),
        "only 200s expected before the kill, got {:?}",
        run1.statuses
    );
    assert!(
        run1.wrong.is_empty(),
        "wrong key material served: {:?}",
        run1.wrong
    );
    assert!(
        before_kill > 0,
        "no 200 before the kill; log:\n{}",
        read_log(&log)
    );
    let delivered1 = run1.per_key();

    // What the killed process left on disk.
    let (after_kill, total_events) = committed(&db_path, &key_ids).await;
    let counted: i64 = after_kill.values().map(|r| r.usage_count).sum();
    println!("after kill -9, on disk: {after_kill:?} (usage_count total {counted}, usage_events {total_events})");
    for id in &key_ids {
        let row = after_kill[id];
        let delivered = delivered1.get(id).copied().unwrap_or(0);
        assert_eq!(row.usage_limit, Some(LIMIT), "key {id}");
        assert!(row.usage_count <= LIMIT, "key {id} over-served: {row:?}");
        assert!(
            delivered <= row.usage_count,
            "key {id}: {delivered} delivered but only {row:?} counted"
        );
        assert_eq!(
            row.events, row.usage_count,
            "key {id}: one audit row per counted serve"
        );
    }
    assert_eq!(total_events, counted, "no audit row for any other key");

    // Run 2: restart on the same file; the counts survive, then draw the budgets dry.
    let mut server = start_server(&as_refs(&env), &admin, &log, dir.path()).await;
    let listed = server
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    for k in listed.as_array().expect("key list") {
        let id = k["id"].as_str().expect("listed key id");
        assert_eq!(
            k["usage_count"].as_i64(),
            Some(after_kill[id].usage_count),
            "restart reloads {id}: {k}"
        );
    }
    let load = Load::new(&server, "scrape", &token, &values);
    let run2 = join_all(load.spawn(CALLERS)).await;
    println!(
        "after restart: {} more 200s, statuses {:?}",
        run2.served.len(),
        run2.statuses
    );
    assert!(
        run2.errors_before_signal.is_empty(),
        "errors after restart: {:?}",
        run2.errors_before_signal
    );
    assert!(
        run2.wrong.is_empty(),
        "wrong key material served: {:?}",
        run2.wrong
    );
    assert_eq!(
        run2.statuses,
        BTreeMap::from([(429, CALLERS)]),
        "every caller ends on 429 once the budgets are spent, nothing else"
    );
    assert!(
        run2.retry_after_on_429.is_empty(),
        "spent lifetime caps never free up: {:?}",
        run2.retry_after_on_429
    );
    let (status, body) = server
        .call(Method::GET, "/key?feature=scrape", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );

    let exit = server.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.success(),
        "graceful exit after the drain: {exit}; log:\n{}",
        read_log(&log)
    );

    let delivered2 = run2.per_key();
    let (last, total_events) = committed(&db_path, &key_ids).await;
    for id in &key_ids {
        let d1 = delivered1.get(id).copied().unwrap_or(0);
        let d2 = delivered2.get(id).copied().unwrap_or(0);
        assert!(
            d1 + d2 <= LIMIT,
            "key {id} delivered {d1} + {d2} > {LIMIT} across the crash"
        );
        assert_eq!(
            d2,
            LIMIT - after_kill[id].usage_count,
            "key {id}: the restart serves exactly what was left"
        );
        assert_eq!(last[id].usage_count, LIMIT, "key {id}: {:?}", last[id]);
        assert_eq!(last[id].events, LIMIT, "key {id}: {:?}", last[id]);
    }
    assert_eq!(total_events, LIMIT * key_ids.len() as i64);
    let db = open_db(&db_path).await;
    let foreign: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM usage_events WHERE consumer_id != ? OR feature != ?",
    )
    .bind(&consumer_id)
    .bind("scrape")
    .fetch_one(&db)
    .await
    .expect("count audit rows of another consumer or feature");
    db.close().await;
    assert_eq!(
        foreign, 0,
        "every audit row names the consumer and the feature"
    );
}

// Issue 11 item 3: rate windows of a minute or longer survive `kill -9` mid-load: what the
// killed process committed is the window's count, and the restarted one serves only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_never_lets_a_window_be_exceeded() {
    const WINDOW: i64 = 150;
    const KILL_AFTER: usize = 100;
    const COST: i64 = 2;
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("data").join("pool.db");
    let log = dir.path().join("server.log");
    let admin = distinctive("adm-");
    let env = quiet_env(&db_path);
    let mut server = start_server(&as_refs(&env), &admin, &log, dir.path()).await;
    server
        .admin(
            Method::POST,
            "/admin/tiers",
            Some(json!({ "name": "plan", "features": { "scrape": [
                { "rate_limit": 1_000_000, "window_seconds": 1 },
                { "rate_limit": WINDOW, "window_seconds": 3600 }
            ] } })),
            StatusCode::CREATED,
        )
        .await;
    let mut values = HashMap::new();
    let mut key_ids = Vec::new();
    for i in 0..3 {
        let value = format!("value-{i}-{}", uuid::Uuid::new_v4().simple());
        let id = server
            .add_key(json!({ "name": format!("k{i}"), "key": value, "tier": "plan", "usage_limit": 1_000_000 }))
            .await;
        values.insert(id.clone(), value);
        key_ids.push(id);
    }
    let (_, token) = server.consumer("worker", "plan").await;
    let feature = format!("scrape&cost={COST}");

    let load = Load::new(&server, &feature, &token, &values);
    let handles = load.spawn(CALLERS);
    let before_kill = load.wait_for_ok(KILL_AFTER, Duration::from_secs(15)).await;
    load.signalled.store(true, Ordering::SeqCst);
    server.child.sigkill();
    let run1 = join_all(handles).await;
    assert!(
        before_kill > 0,
        "no 200 before the kill; log:\n{}",
        read_log(&log)
    );
    assert!(
        run1.errors_before_signal.is_empty(),
        "{:?}",
        run1.errors_before_signal
    );
    assert!(
        run1.statuses.is_empty(),
        "only 200s before the kill: {:?}",
        run1.statuses
    );
    let delivered1 = run1.per_key();

    // On disk: each key's hour window counts exactly its committed serves, at least those delivered.
    let (after_kill, _) = committed(&db_path, &key_ids).await;
    let db = open_db(&db_path).await;
    let mut stored = HashMap::new();
    for id in &key_ids {
        let count: Option<i64> = sqlx::query_scalar(
            "SELECT count FROM window_counts WHERE key_id = ? AND feature = 'scrape' AND window_seconds = 3600",
        )
        .bind(id)
        .fetch_optional(&db)
        .await
        .expect("read the stored window");
        let count = count.unwrap_or(0);
        let row = after_kill[id];
        assert_eq!(
            count, row.events,
            "key {id}: the window counts every committed serve"
        );
        assert_eq!(
            row.usage_count,
            COST * row.events,
            "key {id}: the budget counts units"
        );
        assert!(
            delivered1.get(id).copied().unwrap_or(0) as i64 <= count,
            "key {id}"
        );
        stored.insert(id.clone(), count);
    }
    // Issue 14: every window is persisted (replicas agree on each window), a per-second one
    // too; it has ended long before a restart serves again.
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM window_counts WHERE window_seconds = 1 AND count > 1000000"
        )
        .fetch_one(&db)
        .await
        .expect("count per-second rows"),
        0,
        "a per-second window never holds more than its limit"
    );
    db.close().await;

    // Restart on the same file and drain: each key serves exactly what its window had left.
    let mut server = start_server(&as_refs(&env), &admin, &log, dir.path()).await;
    let load = Load::new(&server, &feature, &token, &values);
    let run2 = join_all(load.spawn(CALLERS)).await;
    assert!(
        run2.errors_before_signal.is_empty(),
        "{:?}",
        run2.errors_before_signal
    );
    assert!(run2.wrong.is_empty(), "{:?}", run2.wrong);
    assert_eq!(
        run2.statuses,
        BTreeMap::from([(429, CALLERS)]),
        "every caller ends on the window's 429"
    );
    assert_eq!(
        run2.retry_after_on_429.len(),
        CALLERS,
        "the window frees up: Retry-After on every 429"
    );
    let delivered2 = run2.per_key();
    for id in &key_ids {
        let d1 = delivered1.get(id).copied().unwrap_or(0) as i64;
        let d2 = delivered2.get(id).copied().unwrap_or(0) as i64;
        assert!(
            d1 + d2 <= WINDOW,
            "key {id}: {d1} + {d2} > {WINDOW} within the hour, across the crash"
        );
        assert_eq!(
            d2,
            WINDOW - stored[id],
            "key {id}: the restart serves exactly what the window had left"
        );
    }
    let exit = server.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.success(),
        "graceful exit: {exit}; log:\n{}",
        read_log(&log)
    );
}

// Issue 9 item 6: key health answered 200 survives `kill -9` (the crash test's companion):
// a quarantine, a long cooldown and an operator's disable, killed while serves are running;
// and (issue 9 remainder, item 2) a first 401, so a second one after the crash quarantines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_every_key_health_change_that_was_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Bulk {
        mut server,
        db_path,
        values,
        key_ids,
        token,
        log,
        ..
    } = bulk_server(dir.path(), &[json!({}), json!({}), json!({}), json!({})]).await;
    let (env, admin) = (quiet_env(&db_path), server.admin_token.clone());
    // Serves of the first two keys and the last, to report on.
    let mut serves: HashMap<String, Vec<String>> = HashMap::new();
    while serves.get(&key_ids[0]).map_or(0, Vec::len) < 2
        || serves.get(&key_ids[1]).map_or(0, Vec::len) < 1
        || serves.get(&key_ids[3]).map_or(0, Vec::len) < 2
    {
        let (status, body) = server
            .call(Method::GET, "/key?feature=scrape", Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let key = body["key_id"].as_str().expect("key_id").to_string();
        let serve = body["serve_id"].as_str().expect("serve_id").to_string();
        serves.entry(key).or_default().push(serve);
    }
    let report = |serve: &str, body: Value| {
        let path = format!("/serves/{serve}/outcome");
        let server = &server;
        let token = token.clone();
        async move {
            server
                .call(Method::POST, &path, Some(&token), Some(&body))
                .await
        }
    };
    let load = Load::new(&server, "scrape", &token, &values);
    let handles = load.spawn(4);
    load.wait_for_ok(20, Duration::from_secs(15)).await;
    let k0 = &serves[&key_ids[0]];
    assert_eq!(
        report(&k0[0], json!({ "status": 401 })).await.0,
        StatusCode::OK
    );
    let (status, body) = report(&k0[1], json!({ "status": 401 })).await;
    assert_eq!(
        (status, body["key_state"].clone()),
        (StatusCode::OK, json!("quarantined")),
        "{body}"
    );
    let (status, body) = report(
        &serves[&key_ids[1]][0],
        json!({ "status": 429, "retry_after_seconds": 3600 }),
    )
    .await;
    assert_eq!(
        (status, body["key_state"].clone()),
        (StatusCode::OK, json!("cooling")),
        "{body}"
    );
    server
        .admin(
            Method::PATCH,
            &format!("/admin/keys/{}", key_ids[2]),
            Some(json!({ "is_active": false })),
            StatusCode::OK,
        )
        .await;
    let k3 = serves[&key_ids[3]].clone();
    let (status, body) = report(&k3[0], json!({ "status": 401 })).await;
    assert_eq!(
        (status, body["key_state"].clone()),
        (StatusCode::OK, json!("cooling")),
        "{body}"
    );
    let before = server
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    load.signalled.store(true, Ordering::SeqCst);
    server.child.sigkill();
    let _ = join_all(handles).await;

    let server = start_server(&as_refs(&env), &admin, &log, dir.path()).await;
    let after = server
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    let health = |list: &Value, id: &str| {
        list.as_array()
            .expect("keys")
            .iter()
            .find(|k| k["id"] == id)
            .expect("listed")["health"]
            .clone()
    };
    for (id, state) in [
        (&key_ids[0], "quarantined"),
        (&key_ids[1], "cooling"),
        (&key_ids[2], "disabled"),
        (&key_ids[3], "cooling"),
    ] {
        let (was, now) = (health(&before, id), health(&after, id));
        assert_eq!(now["state"], state, "key {id} after kill -9: {now}");
        assert_eq!(was, now, "key {id}: health as answered before the kill");
    }
    let counts = server
        .admin(Method::GET, "/admin/health", None, StatusCode::OK)
        .await;
    assert_eq!(counts["key_states"]["cooling"], 2, "{counts}");
    // The first 401 was kept: a second one, from another serve, quarantines.
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/serves/{}/outcome", k3[1]),
            Some(&token),
            Some(&json!({ "status": 401 })),
        )
        .await;
    assert_eq!(
        (status, body["key_state"].clone()),
        (StatusCode::OK, json!("quarantined")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    const SIGNAL_AFTER: usize = 150;
    let dir = tempfile::tempdir().expect("temp dir");
    let Bulk {
        mut server,
        db_path,
        values,
        key_ids,
        token,
        log,
        ..
    } = bulk_server(
        dir.path(),
        &[
            json!({}),
            json!({ "usage_limit": 1_000_000 }),
            json!({ "usage_limit": 1_000_000, "usage_window_seconds": 3600 }),
        ],
    )
    .await;
    let load = Load::new(&server, "scrape", &token, &values);
    let handles = load.spawn(CALLERS);
    let before_signal = load
        .wait_for_ok(SIGNAL_AFTER, Duration::from_secs(15))
        .await;
    load.signalled.store(true, Ordering::SeqCst);
    let signalled_at = Instant::now();
    let exit = server.terminate(Duration::from_secs(15)).await;
    let took = signalled_at.elapsed();
    let tally = join_all(handles).await;
    println!(
        "SIGTERM: {before_signal} 200s seen when sent, {} in all ({} after the signal), {} connection errors after, \
         statuses {:?}, exited {exit} after {took:?}",
        tally.served.len(),
        tally.served_after_signal,
        tally.errors_after_signal,
        tally.statuses
    );
    assert!(
        exit.success(),
        "SIGTERM must exit 0, got {exit}; log:\n{}",
        read_log(&log)
    );
    assert!(
        took < Duration::from_secs(10),
        "exit within SERVER_SHUTDOWN_TIMEOUT_SECONDS=10, took {took:?}"
    );
    assert!(
        tally.errors_before_signal.is_empty(),
        "errors before SIGTERM: {:?}",
        tally.errors_before_signal
    );
    assert!(
        tally.statuses.is_empty(),
        "only 200s or connection errors, got {:?}",
        tally.statuses
    );
    assert!(
        tally.wrong.is_empty(),
        "wrong key material served: {:?}",
        tally.wrong
    );
    assert!(before_signal > 0, "no 200 before SIGTERM");

    let delivered = tally.per_key();
    let (rows, total_events) = committed(&db_path, &key_ids).await;
    let counted: i64 = rows.values().map(|r| r.usage_count).sum();
    println!("after SIGTERM, on disk: {rows:?} (usage_count total {counted}, usage_events {total_events})");
    assert_eq!(
        counted,
        tally.served.len() as i64,
        "usage_count total == 200s received"
    );
    assert_eq!(
        total_events,
        tally.served.len() as i64,
        "usage_events rows == 200s received"
    );
    for id in &key_ids {
        let d = delivered.get(id).copied().unwrap_or(0);
        assert_eq!(rows[id].usage_count, d, "key {id}: {:?}", rows[id]);
        assert_eq!(rows[id].events, d, "key {id}: {:?}", rows[id]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_ever_appears_in_the_log_even_at_debug() {
    for format in ["json", "pretty"] {
        secrets_stay_out_of_the_log(format).await;
    }
}

async fn secrets_stay_out_of_the_log(format: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("data").join("pool.db");
    let log = dir.path().join("server.log");
    let admin = distinctive("adm-");
    let encryption_key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    assert_eq!(encryption_key.len(), 64);
    let db = db_path.display().to_string();
    let metrics_token = distinctive("metrics-");
    let env = [
        ("DB_PATH", db.as_str()),
        ("LOG_LEVEL", "debug"),
        ("LOG_FORMAT", format),
        ("LOG_REQUESTS", "true"),
        ("ENCRYPTION_KEY", encryption_key.as_str()),
        ("METRICS_TOKEN", metrics_token.as_str()),
    ];
    let mut server = start_server(&env, &admin, &log, dir.path()).await;
    let mut secrets: Vec<(String, String)> = vec![
        ("admin token".into(), admin.clone()),
        ("encryption key".into(), encryption_key.clone()),
        ("metrics token".into(), metrics_token.clone()),
    ];
    // Issue 8 item 3: scrapes with the right and a wrong metrics token.
    for (token, status) in [
        (metrics_token.as_str(), StatusCode::OK),
        (admin.as_str(), StatusCode::UNAUTHORIZED),
    ] {
        let (got, _) = server
            .call(Method::GET, "/metrics", Some(token), None)
            .await;
        assert_eq!(got, status);
    }

    server
        .admin(
            Method::POST,
            "/admin/tiers",
            Some(json!({ "name": "vault", "features": { "scrape": { "rate_limit": 100, "window_seconds": 60 } } })),
            StatusCode::CREATED,
        )
        .await;
    let mut key_ids = Vec::new();
    let mut values = HashMap::new();
    for i in 0..2 {
        let value = distinctive("keyval-");
        let client_secret = distinctive("clientsecret-");
        let password = distinctive("password-");
        let id = server
            .add_key(json!({
                "name": format!("k{i}"),
                "key": value,
                "tier": "vault",
                "usage_limit": 50,
                "metadata": { "region": "eu" },
                "secrets": { "client_secret": client_secret, "password": password },
            }))
            .await;
        values.insert(id.clone(), value.clone());
        key_ids.push(id);
        secrets.push((format!("key value {i}"), value));
        secrets.push((format!("client_secret {i}"), client_secret));
        secrets.push((format!("password {i}"), password));
    }
    // Operator mistakes that carry a secret: unknown tier, malformed JSON, wrong type.
    let stray = distinctive("strayval-");
    secrets.push(("value sent to an unknown tier".into(), stray.clone()));
    server
        .admin(
            Method::POST,
            "/admin/keys",
            Some(
                json!({ "name": "lost", "key": stray, "tier": "nope", "secrets": { "s": stray } }),
            ),
            StatusCode::NOT_FOUND,
        )
        .await;
    let broken = distinctive("brokenjson-");
    secrets.push(("value in malformed JSON".into(), broken.clone()));
    let r = server
        .client
        .post(server.url("/admin/keys"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(format!("{{\"name\":\"x\",\"key\":\"{broken}\",\"tier\":"))
        .send()
        .await
        .expect("malformed JSON request");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let typed = distinctive("wrongtype-");
    secrets.push(("value of the wrong type".into(), typed.clone()));
    server
        .admin(
            Method::POST,
            "/admin/keys",
            Some(json!({ "name": "x", "key": "v", "tier": "vault", "usage_limit": typed })),
            StatusCode::BAD_REQUEST,
        )
        .await;

    let (consumer_id, token) = server.consumer("reader", "vault").await;
    secrets.push(("consumer token".into(), token.clone()));

    // Draws with the consumer token and the admin token.
    for t in [&token, &admin] {
        let (status, body) = server
            .call(Method::GET, "/key?feature=scrape", Some(t), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let id = body["key_id"].as_str().expect("served key id");
        assert_eq!(
            body["value"].as_str(),
            values.get(id).map(String::as_str),
            "{body}"
        );
    }
    // Bad tokens: unknown, consumer on /admin, wrong scheme, none.
    let unknown = distinctive("badtoken-");
    secrets.push(("unknown bearer token".into(), unknown.clone()));
    let (status, _) = server
        .call(Method::GET, "/key?feature=scrape", Some(&unknown), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::GET, "/admin/keys", Some(&unknown), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::GET, "/admin/keys", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let r = server
        .client
        .get(server.url("/key?feature=scrape"))
        .header("authorization", format!("Basic {admin}"))
        .send()
        .await
        .expect("wrong-scheme request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::GET, "/key?feature=scrape", None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A secret in the query string.
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/key?feature=scrape&token={token}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // Every listing.
    for path in [
        "/admin/tiers",
        "/admin/keys",
        "/admin/consumers",
        "/admin/usage?limit=1000",
        "/admin/health",
    ] {
        let body = server.admin(Method::GET, path, None, StatusCode::OK).await;
        let text = body.to_string();
        for (what, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{path} shows the {what}: {text}"
            );
        }
    }

    // Deletes.
    server
        .admin(
            Method::DELETE,
            &format!("/admin/consumers/{consumer_id}"),
            None,
            StatusCode::OK,
        )
        .await;
    let (status, _) = server
        .call(Method::GET, "/key?feature=scrape", Some(&token), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a deleted consumer's token is rejected"
    );
    server
        .admin(
            Method::DELETE,
            &format!("/admin/keys/{}", key_ids[0]),
            None,
            StatusCode::OK,
        )
        .await;

    let exit = server.terminate(Duration::from_secs(15)).await;
    assert!(exit.success(), "SIGTERM exit: {exit}");

    let text = read_log(&log);
    assert!(!text.trim().is_empty(), "the log is empty");
    assert!(
        text.contains("/admin/keys"),
        "LOG_REQUESTS=true logs request paths ({format}):\n{text}"
    );
    let lower = text.to_ascii_lowercase();
    for (what, secret) in &secrets {
        assert!(
            !text.contains(secret.as_str()) && !lower.contains(&secret.to_ascii_lowercase()),
            "the {what} appears in the {format} log:\n{text}"
        );
    }
    println!(
        "{format} log: {} lines, {} bytes, no secret found",
        text.lines().count(),
        text.len()
    );
}

type BadConfig<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_nonzero_with_one_line_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir
        .path()
        .join("data")
        .join("pool.db")
        .display()
        .to_string();
    let secret_key = format!("{}zz", "ab".repeat(31)); // 64 chars, not hex
                                                       // (variable named, environment, value that must not be echoed)
    let cases: Vec<BadConfig> = vec![
        ("ADMIN_TOKEN", vec![], None),
        (
            "SERVER_PORT",
            vec![("ADMIN_TOKEN", "t0k"), ("SERVER_PORT", "abc")],
            None,
        ),
        (
            "ENCRYPTION_KEY",
            vec![("ADMIN_TOKEN", "t0k"), ("ENCRYPTION_KEY", "xyz")],
            Some("xyz"),
        ),
        (
            "ENCRYPTION_KEY",
            vec![
                ("ADMIN_TOKEN", "t0k"),
                ("ENCRYPTION_KEY", secret_key.as_str()),
            ],
            Some(secret_key.as_str()),
        ),
        (
            "LOG_LEVEL",
            vec![("ADMIN_TOKEN", "t0k"), ("LOG_LEVEL", "loud")],
            None,
        ),
        (
            "DB_MAX_OPEN_CONNS",
            vec![("ADMIN_TOKEN", "t0k"), ("DB_MAX_OPEN_CONNS", "0")],
            None,
        ),
    ];
    for (var, vars, hidden) in cases {
        let vars: Vec<(OsString, OsString)> = vars
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        assert_bad_configuration(dir.path(), &db, var, &vars, hidden.map(str::as_bytes)).await;
    }
    assert!(
        !dir.path().join("data").exists(),
        "no bad configuration got as far as creating the database"
    );

    // A DB_PATH whose folders do not exist yet: they are created and the server starts.
    let nested = dir
        .path()
        .join("tmp")
        .join("nested")
        .join("deeper")
        .join("pool.db");
    let nested_str = nested.display().to_string();
    let log = dir.path().join("nested.log");
    let env = [("DB_PATH", nested_str.as_str()), ("LOG_LEVEL", "warn")];
    let mut server = start_server(&env, &distinctive("adm-"), &log, dir.path()).await;
    let (status, body) = server.call(Method::GET, "/health", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    assert!(nested.is_file(), "{} was created", nested.display());
    let exit = server.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.success(),
        "SIGTERM exit: {exit}; log:\n{}",
        read_log(&log)
    );
}

/// Starts the binary with `vars` (plus DB_PATH and SERVER_PORT) and checks it stops with exit
/// code 2 and one line on stderr naming `var`, no panic, and `hidden` (if any) echoed nowhere.
async fn assert_bad_configuration(
    cwd: &Path,
    db: &str,
    var: &str,
    vars: &[(OsString, OsString)],
    hidden: Option<&[u8]>,
) {
    let port = free_port().to_string();
    let child = Command::new(BIN)
        .env_clear()
        .env("DB_PATH", db)
        .env("SERVER_PORT", &port)
        .env("RUST_BACKTRACE", "1")
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the keypooler binary");
    let mut child = ChildGuard(child);
    let status = child
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!("{var}: a bad configuration must stop the binary, it kept running")
        });
    let mut stderr = Vec::new();
    let mut stdout = Vec::new();
    if let Some(mut e) = child.0.stderr.take() {
        std::io::Read::read_to_end(&mut e, &mut stderr).expect("read stderr");
    }
    if let Some(mut o) = child.0.stdout.take() {
        std::io::Read::read_to_end(&mut o, &mut stdout).expect("read stdout");
    }
    if let Some(value) = hidden {
        for out in [&stderr, &stdout] {
            assert!(
                !out.windows(value.len()).any(|w| w == value),
                "{var}: the bad value is echoed: {:?}",
                String::from_utf8_lossy(out)
            );
        }
    }
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    println!("{var} {vars:?}: {status}, stderr: {stderr:?}");
    assert_eq!(
        status.code(),
        Some(2),
        "{var}: a bad configuration exits 2, got {status}; stderr: {stderr:?}"
    );
    let line = stderr.trim_end_matches(['\n', '\r']);
    assert!(!line.trim().is_empty(), "{var}: stderr is empty");
    assert!(
        !line.contains('\n'),
        "{var}: stderr must be one line, got {stderr:?}"
    );
    assert!(
        line.contains(var),
        "{var}: stderr must name the variable, got {stderr:?}"
    );
    for out in [&stderr, &stdout] {
        assert!(!out.contains("panicked"), "{var}: panicked: {out}");
        assert!(
            !out.to_ascii_lowercase().contains("backtrace"),
            "{var}: backtrace: {out}"
        );
    }
}

fn non_utf8(bytes: &[u8]) -> OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(bytes).to_os_string()
}

// Issue 7 item 6: a non-UTF-8 variable used to panic the binary at startup (`std::env::vars`).
// One that is not ours must not matter; one of ours is one line naming it, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_variables_are_ignored_unless_they_are_ours() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("data").join("pool.db");
    let log = dir.path().join("server.log");
    let unrelated = [
        (OsString::from("LC_WEIRD"), non_utf8(b"caf\xe9-\xff")),
        (non_utf8(b"NAME_\xff"), OsString::from("x")),
    ];
    let env = quiet_env(&db_path);
    let mut server = start_server_with(
        &as_refs(&env),
        &unrelated,
        &distinctive("adm-"),
        &log,
        dir.path(),
    )
    .await;
    let (status, body) = server.call(Method::GET, "/health", None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    let exit = server.terminate(Duration::from_secs(15)).await;
    assert!(
        exit.success(),
        "SIGTERM exit: {exit}; log:\n{}",
        read_log(&log)
    );

    let db = db_path.display().to_string();
    let secret = b"s3cret-\xff-token";
    for (var, value) in [
        ("ADMIN_TOKEN", &secret[..]),
        ("ENCRYPTION_KEY", &secret[..]),
        ("LOG_LEVEL", &b"info\xff"[..]),
    ] {
        let mut vars = vec![(OsString::from("ADMIN_TOKEN"), OsString::from("t0k"))];
        vars.extend(unrelated.iter().cloned());
        vars.push((OsString::from(var), non_utf8(value)));
        assert_bad_configuration(dir.path(), &db, var, &vars, Some(b"s3cret")).await;
    }
}

/// The remote driver at LOG_LEVEL=debug: the database token and URL never reach the log, even
/// though the libsql client logs whole requests at trace (its target is held at warn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_token_and_url_never_appear_in_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_token = distinctive("dbtoken");
    let server_db = dir.path().join("remote.db");
    let remote = crate::hrana::HranaServer::start(&server_db, Some(&db_token)).await;
    let url = remote.url();
    let database_url = format!("{url}?authToken={db_token}");
    let log = dir.path().join("keypooler.log");
    let admin_token = distinctive("admin");
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("LOG_LEVEL", "debug"),
        ("LOG_REQUESTS", "true"),
    ];
    let mut server = start_server(&env, &admin_token, &log, dir.path()).await;
    server
        .admin(
            Method::POST,
            "/admin/tiers",
            Some(json!({ "name": "t", "features": { "scrape": { "rate_limit": 100 } } })),
            StatusCode::CREATED,
        )
        .await;
    server
        .add_key(json!({ "name": "k", "key": distinctive("value"), "tier": "t" }))
        .await;
    let (_, token) = server.consumer("c", "t").await;
    for _ in 0..5 {
        let (status, _) = server
            .call(Method::GET, "/key?feature=scrape", Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    server
        .admin(Method::GET, "/admin/usage", None, StatusCode::OK)
        .await;
    let status = server.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    let text = read_log(&log);
    assert!(text.contains("request"), "requests were logged:\n{text}");
    for secret in [db_token.as_str(), database_url.as_str()] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into the log:\n{text}"
        );
    }
    assert!(
        !text.contains(&format!("{url}/v")),
        "a request URL of the database leaked:\n{text}"
    );
    assert!(
        !text.contains("Bearer"),
        "an Authorization header leaked:\n{text}"
    );
}

/// `id -u` of this process.
fn own_uid() -> String {
    let out = Command::new("id").arg("-u").output().expect("run `id -u`");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// Issue 7 item 10: the container's entrypoint. Started as root, it hands the data folder and
// the Railway volume (root-owned, like a freshly mounted one) to 10001:10001 and runs the
// command as that user with no other groups; started as anyone else, it just runs the command.
// Docker cannot run here, so the script is run directly with a fake data folder.
#[test]
fn the_container_entrypoint_hands_the_data_folder_to_uid_10001_then_drops_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/docker-entrypoint.sh");
    let syntax = Command::new("sh")
        .args(["-n", script])
        .status()
        .expect("run sh -n");
    assert!(syntax.success(), "sh -n {script}: {syntax}");

    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("let uid 10001 into the temp dir");
    let data = dir.path().join("app").join("data");
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(volume.join("nested")).expect("volume folder");
    std::fs::write(volume.join("nested").join("pool.db"), b"old").expect("a file on the volume");
    let run = || {
        let out = Command::new("sh")
            .arg(script)
            .args([
                "sh",
                "-c",
                r#"id -u; id -g; id -G; touch "$0/written" "$1/written""#,
            ])
            .arg(&data)
            .arg(&volume)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("KEYPOOLER_DATA_DIR", &data)
            .env("RAILWAY_VOLUME_MOUNT_PATH", &volume)
            .output()
            .expect("run the entrypoint");
        assert!(
            out.status.success(),
            "entrypoint failed: {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let uid = own_uid();
    if uid != "0" {
        let loud = format!(
            "!!! NOT RUN: the entrypoint's root path needs root (this test runs as uid {uid}); \
             only its non-root path was checked !!!"
        );
        std::fs::create_dir_all(&data).expect("data folder");
        let ids: Vec<String> = run().lines().map(str::to_string).collect();
        assert_eq!(ids[0], uid, "not root: the command runs as is");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{loud} (CI=true: CI runs as root, so this must not happen there)"
        );
        eprintln!("{loud}");
        return;
    }
    let out = run();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["10001", "10001", "10001"],
        "uid, gid and the only group of the command"
    );
    for path in [
        data.clone(),
        data.join("written"),
        volume.clone(),
        volume.join("nested"),
        volume.join("nested").join("pool.db"),
        volume.join("written"),
    ] {
        let meta = std::fs::metadata(&path).expect("the path exists");
        assert_eq!(
            (meta.uid(), meta.gid()),
            (10001, 10001),
            "{} belongs to 10001:10001",
            path.display()
        );
    }
}

// Issue 7 item 10: Railway refuses a Dockerfile with a VOLUME instruction (hadolint does not
// flag one), and the image must start through the entrypoint that hands /app/data over.
#[test]
fn the_dockerfile_has_no_volume_and_starts_through_the_entrypoint() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile"))
        .expect("read the Dockerfile");
    let instructions: Vec<String> = dockerfile
        .lines()
        .map(|l| l.trim_start().to_ascii_uppercase())
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        !instructions.iter().any(|l| l.starts_with("VOLUME")),
        "Railway refuses Dockerfiles with VOLUME"
    );
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("DOCKER-ENTRYPOINT.SH")),
        "the image starts through docker-entrypoint.sh"
    );
    assert!(
        dockerfile.contains("ENV DB_PATH=/app/data/pool.db"),
        "the database lives in the folder the entrypoint hands over"
    );
}
