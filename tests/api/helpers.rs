//! `spawn_app()`: the real router on 127.0.0.1:0 against a real SQLite file in a temp dir,
//! and a `TestApp` whose helpers read like the API's users.
//!
//! Driver: tests written inside `on_both_drivers! { … }` run twice — on the embedded SQLite
//! driver, and on the libSQL driver talking Hrana over HTTP to the test server in `hrana.rs`
//! (backed by the same temp file). With `KEYPOOLER_TEST_DATABASE_URL` (and optionally
//! `KEYPOOLER_TEST_DATABASE_AUTH_TOKEN`) set, the libSQL runs use that real server instead;
//! each test then wipes its tables first, so run them with `--test-threads=1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::SqlitePool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::hrana::HranaServer;

/// Which storage driver a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Libsql,
}

tokio::task_local! {
    pub static BACKEND: Backend;
}

pub fn backend() -> Backend {
    BACKEND.try_with(|b| *b).unwrap_or(Backend::Sqlite)
}

fn external_url() -> Option<String> {
    std::env::var("KEYPOOLER_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Defines each test twice: `…::sqlite` on the embedded driver, `…::libsql` on the remote one.
macro_rules! on_both_drivers {
    ($(async fn $name:ident() $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::helpers::BACKEND.scope($crate::helpers::Backend::Sqlite, async $body).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn libsql() {
                $crate::helpers::BACKEND.scope($crate::helpers::Backend::Libsql, async $body).await
            }
        }
    )*};
}

/// Every table the service keeps (the Go schema's seven, `schema_migrations`, then ours).
pub const TABLES: [&str; 23] = [
    "tiers",
    "tier_features",
    "keys",
    "key_secrets",
    "consumers",
    "consumer_scopes",
    "usage_events",
    "schema_migrations",
    "key_health",
    "tier_health",
    "usage_by_key",
    "usage_by_consumer",
    "usage_index_state",
    "usage_rollup",
    "usage_rollup_state",
    "tier_sources",
    "regbot_keys",
    "feature_windows",
    "rate_windows",
    "tier_upstreams",
    "change_log",
    "change_log_state",
    "window_counts",
];

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Resp {
    /// The `error` message of a JSON error body (panics if the body is not one).
    pub fn error(&self) -> &str {
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not a JSON error body: {}", self.text))
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: Arc<tempfile::TempDir>,
    pub db_path: PathBuf,
    pub env: Vec<(String, String)>,
    /// The remote database (libSQL runs on the test server); kept across restarts.
    pub remote: Option<Arc<tokio::sync::Mutex<HranaServer>>>,
    remote_url: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// A test-only setting in a test app's env list: `Config::host_throttle_floor`, in ms.
pub const HOST_THROTTLE_FLOOR_MS: &str = "TEST_HOST_THROTTLE_FLOOR_MS";

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts the service with extra environment variables on top of the test defaults.
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let db_path = dir.path().join("data").join("pool.db");
    let mut env = vec![
        ("ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("DB_PATH".to_string(), db_path.display().to_string()),
        ("LOG_REQUESTS".to_string(), "false".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let (remote, remote_url) = match backend() {
        Backend::Sqlite => (None, None),
        Backend::Libsql => match external_url() {
            Some(url) => {
                wipe_external(&url).await;
                if let Ok(token) = std::env::var("KEYPOOLER_TEST_DATABASE_AUTH_TOKEN") {
                    env.push(("DATABASE_AUTH_TOKEN".into(), token));
                }
                (None, Some(url))
            }
            None => {
                std::fs::create_dir_all(db_path.parent().expect("parent")).expect("data dir");
                let server = HranaServer::start(&db_path, None).await;
                let url = server.url();
                (Some(Arc::new(tokio::sync::Mutex::new(server))), Some(url))
            }
        },
    };
    if let Some(url) = &remote_url {
        env.push(("DATABASE_URL".into(), url.clone()));
    }
    start(dir, db_path, env, remote, remote_url).await
}

/// Starts the service (embedded SQLite) on a database file that already exists, e.g. one
/// the Go service wrote.
pub async fn spawn_app_on_file(db_path: &std::path::Path, extra: &[(&str, &str)]) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut env = vec![
        ("ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("DB_PATH".to_string(), db_path.display().to_string()),
        ("LOG_REQUESTS".to_string(), "false".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    start(dir, db_path.to_path_buf(), env, None, None).await
}

/// Drops every table of an external test database so the test starts from nothing.
async fn wipe_external(url: &str) {
    let token = std::env::var("KEYPOOLER_TEST_DATABASE_AUTH_TOKEN").unwrap_or_default();
    let db = libsql::Builder::new_remote(url.to_string(), token)
        .build()
        .await
        .expect("external db");
    let conn = db.connect().expect("connect");
    for t in TABLES {
        conn.execute(&format!("DROP TABLE IF EXISTS {t}"), ())
            .await
            .expect("drop");
    }
}

async fn start(
    dir: Arc<tempfile::TempDir>,
    db_path: PathBuf,
    env: Vec<(String, String)>,
    remote: Option<Arc<tokio::sync::Mutex<HranaServer>>>,
    remote_url: Option<String>,
) -> TestApp {
    let mut config = keypooler::config::Config::from_vars(env.clone()).expect("valid test config");
    // Not an environment variable of the service (it ignores it): the tests' own way to set
    // a field that production always leaves at SPEC §8.2's value.
    if let Some((_, ms)) = env.iter().find(|(k, _)| k == HOST_THROTTLE_FLOOR_MS) {
        config.host_throttle_floor = Some(Duration::from_millis(ms.parse().expect("milliseconds")));
    }
    // Migrations run first at a generous busy timeout: a test's short one is meant for the
    // write it blocks, and remotely every startup statement within 100 ms failed on a loaded
    // machine (each migration is a remote transaction of its own).
    if config.db_busy_timeout < Duration::from_secs(1) {
        let mut setup = config.clone();
        setup.db_busy_timeout = Duration::from_secs(30);
        let db = keypooler::store::Db::open(&setup)
            .await
            .expect("database migrates");
        db.close().await;
    }
    let app = keypooler::build(&config).await.expect("app builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        keypooler::serve(listener, app, async {
            let _ = rx.await;
        })
        .await
        .expect("serve");
    });
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client"),
        dir,
        db_path,
        env,
        remote,
        remote_url,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// Graceful stop: in-flight requests finish, pending serves are committed.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
    }

    /// Stops and starts a new server on the same database file and environment.
    pub async fn restart(&mut self) {
        self.stop().await;
        let fresh = start(
            self.dir.clone(),
            self.db_path.clone(),
            self.env.clone(),
            self.remote.clone(),
            self.remote_url.clone(),
        )
        .await;
        *self = fresh;
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        let r = req.send().await.expect("request sent");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            body,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        self.get(path, Some(ADMIN_TOKEN)).await
    }

    pub async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> Resp {
        self.admin_send(reqwest::Method::POST, path, Some(&body))
            .await
    }

    pub async fn admin_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        raw: impl Into<reqwest::Body>,
    ) -> Resp {
        let req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(raw);
        self.send(req).await
    }

    /// `GET /key?feature=…` with a token.
    pub async fn draw(&self, feature: &str, token: &str) -> Resp {
        let req = self
            .client
            .get(self.url("/key"))
            .query(&[("feature", feature)])
            .bearer_auth(token);
        self.send(req).await
    }

    /// Creates a tier with features given as (feature, rate_limit, window_seconds).
    pub async fn create_tier(&self, name: &str, features: &[(&str, i64, i64)]) -> Value {
        let features: serde_json::Map<String, Value> = features
            .iter()
            .map(|(f, r, w)| {
                (
                    f.to_string(),
                    json!({ "rate_limit": r, "window_seconds": w }),
                )
            })
            .collect();
        let r = self
            .admin_post(
                "/admin/tiers",
                json!({ "name": name, "features": features }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body
    }

    /// Adds a key from a full request body; returns its id.
    pub async fn add_key(&self, body: Value) -> String {
        let r = self.admin_post("/admin/keys", body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        r.body["id"].as_str().expect("id").to_string()
    }

    /// Creates a consumer scoped to `tiers`; returns (id, token).
    pub async fn consumer(&self, name: &str, tiers: &[&str]) -> (String, String) {
        let r = self
            .admin_post("/admin/consumers", json!({ "name": name }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().expect("id").to_string();
        let token = r.body["token"].as_str().expect("token").to_string();
        for tier in tiers {
            let g = self
                .admin_post(
                    &format!("/admin/consumers/{id}/scopes"),
                    json!({ "tier": tier }),
                )
                .await;
            assert_eq!(g.status, StatusCode::CREATED, "{}", g.text);
        }
        (id, token)
    }

    /// A separate connection to the same SQLite file, to count what was really committed.
    pub async fn db(&self) -> SqlitePool {
        open_db(&self.db_path).await
    }

    /// Rows of a query as text cells, read through the driver under test's own protocol
    /// (sqlx on the file, or the libSQL client over Hrana).
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        self.rows_with(sql, &[]).await
    }

    pub async fn rows_with(&self, sql: &str, params: &[&str]) -> Vec<Vec<Option<String>>> {
        match &self.remote_url {
            None => {
                use sqlx::Row;
                let db = self.db().await;
                let mut q = sqlx::query(sql);
                for p in params {
                    q = q.bind(*p);
                }
                let rows = q.fetch_all(&db).await.expect("query");
                db.close().await;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get_unchecked::<Option<String>, _>(i).expect("cell"))
                            .collect()
                    })
                    .collect()
            }
            Some(url) => {
                let token = std::env::var("KEYPOOLER_TEST_DATABASE_AUTH_TOKEN").unwrap_or_default();
                let db = libsql::Builder::new_remote(url.clone(), token)
                    .build()
                    .await
                    .expect("libsql");
                let conn = db.connect().expect("connect");
                let values: Vec<libsql::Value> = params
                    .iter()
                    .map(|p| libsql::Value::Text(p.to_string()))
                    .collect();
                let mut rows = conn
                    .query(sql, libsql::params::Params::Positional(values))
                    .await
                    .expect("query");
                let mut out = Vec::new();
                while let Some(row) = rows.next().await.expect("row") {
                    let cells = (0..row.column_count())
                        .map(|i| match row.get_value(i).expect("cell") {
                            libsql::Value::Null => None,
                            libsql::Value::Integer(n) => Some(n.to_string()),
                            libsql::Value::Real(f) => Some(f.to_string()),
                            libsql::Value::Text(t) => Some(t),
                            libsql::Value::Blob(b) => {
                                Some(String::from_utf8_lossy(&b).into_owned())
                            }
                        })
                        .collect();
                    out.push(cells);
                }
                out
            }
        }
    }

    /// The single integer a query returns (NULL reads as 0).
    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql).await;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .map(|s| s.parse().expect("integer"))
            .unwrap_or(0)
    }

    /// Waits until the audit side indexes cover every audit row there is now: no background
    /// fill is due, so a commit fault injected next hits the write under test, not a fill.
    pub async fn audit_indexed(&self) {
        let last = self.count("SELECT max(rowid) FROM usage_events").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self
            .count("SELECT indexed_through FROM usage_index_state")
            .await
            < last
        {
            assert!(
                std::time::Instant::now() < deadline,
                "side indexes not filled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first cell of the first row, as text.
    pub async fn scalar(&self, sql: &str) -> String {
        self.rows(sql)
            .await
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .expect("a value")
    }
}

pub async fn open_db(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open sqlite")
}

/// Load that a test can pause at an exact count, so a fault lands mid-load however fast the
/// machine is: every request needs a permit, a 200 spends it, any other answer gives it back.
/// With `n` permits handed out, exactly `n` serves happen and then the callers wait.
pub struct GatedLoad {
    permits: Arc<tokio::sync::Semaphore>,
    served: Arc<std::sync::atomic::AtomicUsize>,
    unavailable: Arc<std::sync::atomic::AtomicUsize>,
    callers: Vec<JoinHandle<()>>,
}

impl GatedLoad {
    /// `callers` loops of `GET /key?feature=<feature>` with the admin token, each ending at its
    /// first 429; any answer but 200, 429 and 503 fails the test. `permits` serves may happen
    /// before the first `release`.
    pub fn start(app: &TestApp, feature: &str, callers: usize, permits: usize) -> GatedLoad {
        use std::sync::atomic::Ordering;
        let gate = Arc::new(tokio::sync::Semaphore::new(permits));
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let unavailable = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let callers = (0..callers)
            .map(|_| {
                let (client, url, feature) =
                    (app.client.clone(), app.url("/key"), feature.to_string());
                let (gate, served, unavailable) =
                    (gate.clone(), served.clone(), unavailable.clone());
                tokio::spawn(async move {
                    loop {
                        let permit = gate.acquire().await.expect("gate open");
                        let status = client
                            .get(&url)
                            .query(&[("feature", &feature)])
                            .bearer_auth(ADMIN_TOKEN)
                            .send()
                            .await
                            .expect("request sent")
                            .status();
                        match status {
                            StatusCode::OK => {
                                permit.forget();
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            StatusCode::SERVICE_UNAVAILABLE => {
                                unavailable.fetch_add(1, Ordering::SeqCst);
                            }
                            StatusCode::TOO_MANY_REQUESTS => break,
                            other => panic!("unexpected {other}"),
                        }
                    }
                })
            })
            .collect();
        GatedLoad {
            permits: gate,
            served,
            unavailable,
            callers,
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn unavailable(&self) -> usize {
        self.unavailable.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets `n` more serves happen.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    /// Waits (at most 30 s) until `check` holds.
    pub async fn wait_until(&self, what: &str, check: impl Fn(&GatedLoad) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !check(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what} (served {}, 503s {})",
                self.served(),
                self.unavailable()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Lets the callers run to their 429s (at most 30 s); returns (served, 503s).
    pub async fn finish(mut self) -> (usize, usize) {
        self.release(tokio::sync::Semaphore::MAX_PERMITS / 2);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        for caller in std::mem::take(&mut self.callers) {
            tokio::time::timeout_at(deadline, caller)
                .await
                .expect("callers end within 30 s")
                .expect("caller task");
        }
        (self.served(), self.unavailable())
    }
}
