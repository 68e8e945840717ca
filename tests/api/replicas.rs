//! Issue 14 item 6 (SPEC §8.7): three keypooler processes on one database — one SQLite file, or
//! one libSQL server (our Hrana test server) — hammered at once behave as one service: no budget
//! (in units: cost counts) and no rate window is exceeded across them, every 200 has its audit
//! row, and a replica killed with SIGKILL mid-load neither stalls the others nor breaks the
//! totals; restarted, it serves again.
//!
//! The tier, its keys (stored and one RegBot credential) and the consumer are created through
//! the first replica before the others start, so nothing here waits on propagation. Every wait
//! is bounded; loopback only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::open_db;
use crate::hrana::HranaServer;
use crate::process::{as_refs, distinctive, quiet_env, read_log, start_server, Server};

const REPLICAS: usize = 3;
const CALLERS_PER_REPLICA: usize = 6;
/// What each caller of a replica asks for, by its index: windowed `scrape` (one caller at cost
/// 2: windows count requests, budgets units) and unwindowed `crawl` at cost 1 or 3.
const CALLS: [(&str, i64); CALLERS_PER_REPLICA] = [
    ("scrape", 1),
    ("crawl", 1),
    ("crawl", 3),
    ("scrape", 2),
    ("crawl", 1),
    ("crawl", 3),
];
/// The longest one request on a live replica may take (issue 14: "a second or two"); a dead
/// replica's transaction left holding the database's write lock shows as a longer one.
const STALL_BOUND: Duration = Duration::from_secs(2);
/// A serve this close to the end of a reconstructed 1 s window may belong to the next one: not
/// counted. The audit row's time is its replica's reservation, but on one SQLite file the
/// database counts a serve in the window current when its commit lands (README, What is exact;
/// remotely a delta naming another window than the stored one is refused), and with three
/// replicas and the whole suite on 2 loaded cores a commit can land a few hundred ms later. An over-serving pool still fails by far: each
/// replica fills the window in its first milliseconds.
const WINDOW_EDGE_US: i64 = 300_000;
const REGBOT_KEY: &str = "regbot:1";
/// RegBot's `quota_used` at the start; `quota_total` is this plus the plan's RegBot budget.
const REGBOT_USED: i64 = 10;

#[derive(Clone, Copy)]
enum Driver {
    Sqlite,
    Libsql,
}

/// Budgets of the tier `exa` (feature `crawl`) and windows of the tier `paced` (`scrape`).
#[derive(Clone, Copy)]
struct Plan {
    key_budget: i64,
    regbot_budget: i64,
    per_second: i64,
    per_hour: i64,
}

/// Three replicas on one database and what the test set up through the first.
struct Cluster {
    db_path: PathBuf,
    /// The libSQL server in front of `db_path` (libSQL runs); lives as long as the cluster.
    remote: Option<HranaServer>,
    regbot_path: PathBuf,
    admin: String,
    replicas: Vec<Option<Server>>,
    token: String,
    plan: Plan,
    /// key id → (value, budget in units)
    keys: HashMap<String, (String, i64)>,
    /// Last, so it is removed after the replicas and the server are gone.
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(driver: Driver, plan: Plan) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = dir.path().join("data").join("pool.db");
        std::fs::create_dir_all(dir.path().join("data")).expect("data folder");
        let remote = match driver {
            Driver::Sqlite => None,
            Driver::Libsql => {
                let server = HranaServer::start(&db_path, None).await;
                // Serve commits are one request each, but a replica killed inside one of its
                // interactive transactions (a report, an admin write, an audit-index fill)
                // holds the write lock until the server expires its stream: the bound the
                // issue allows. 1 s here, so the survivors stall less than STALL_BOUND (the
                // test server's default of 10 s made them answer 503 once in a CI run).
                server.set_stream_idle_timeout(Duration::from_secs(1));
                Some(server)
            }
        };
        let regbot_value = distinctive("regbot-value-");
        let regbot_path = dir.path().join("regbot.db");
        let conn = rusqlite::Connection::open(&regbot_path).expect("regbot db");
        conn.execute_batch(
            "CREATE TABLE credentials (id INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, \
             api_key TEXT NOT NULL, email TEXT, quota_total INTEGER, quota_used INTEGER DEFAULT 0, \
             quota_unit TEXT DEFAULT 'requests', status TEXT DEFAULT 'active', \
             last_usage_check TIMESTAMP, extra_metadata TEXT, created_at TIMESTAMP, updated_at TIMESTAMP);",
        )
        .expect("regbot schema");
        conn.execute(
            "INSERT INTO credentials (service, api_key, quota_total, quota_used, extra_metadata, \
             created_at, updated_at) VALUES ('exaai', ?, ?, ?, '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            rusqlite::params![regbot_value, REGBOT_USED + plan.regbot_budget, REGBOT_USED],
        )
        .expect("regbot credential");
        drop(conn);

        let mut cluster = Cluster {
            db_path,
            remote,
            regbot_path,
            admin: distinctive("adm-"),
            replicas: Vec::new(),
            token: String::new(),
            plan,
            keys: HashMap::from([(REGBOT_KEY.to_string(), (regbot_value, plan.regbot_budget))]),
            dir,
        };
        let first = cluster.start_replica(0).await;
        // `exa`: budgets (stored keys and the RegBot credential), no window that binds;
        // `paced`: a 1 s and an hour window per key, budgets that never bind.
        let tiers = [
            (
                "exa",
                json!({ "crawl": { "rate_limit": 1_000_000, "window_seconds": 60 } }),
            ),
            (
                "paced",
                json!({ "scrape": [
                    { "rate_limit": plan.per_second, "window_seconds": 1 },
                    { "rate_limit": plan.per_hour, "window_seconds": 3600 }
                ] }),
            ),
        ];
        for (tier, features) in tiers {
            first
                .admin(
                    Method::POST,
                    "/admin/tiers",
                    Some(json!({ "name": tier, "features": features })),
                    StatusCode::CREATED,
                )
                .await;
            let budget = if tier == "exa" {
                plan.key_budget
            } else {
                1_000_000
            };
            for i in 0..3 {
                let value = distinctive(&format!("value-{tier}-{i}-"));
                let id = first
                    .add_key(
                        json!({ "name": format!("{tier}-{i}"), "key": value, "tier": tier,
                                     "usage_limit": budget }),
                    )
                    .await;
                cluster.keys.insert(id, (value, budget));
            }
        }
        let refreshed = first
            .admin(
                Method::POST,
                "/admin/sources/regbot/refresh",
                Some(json!({})),
                StatusCode::OK,
            )
            .await;
        assert_eq!(refreshed["tiers"], json!({ "exa": 1 }), "{refreshed}");
        let (consumer, token) = first.consumer("worker", "exa").await;
        first
            .admin(
                Method::POST,
                &format!("/admin/consumers/{consumer}/scopes"),
                Some(json!({ "tier": "paced" })),
                StatusCode::CREATED,
            )
            .await;
        cluster.token = token;
        cluster.replicas.push(Some(first));
        for i in 1..REPLICAS {
            let server = cluster.start_replica(i).await;
            cluster.replicas.push(Some(server));
        }
        cluster
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = quiet_env(&self.db_path);
        if let Some(remote) = &self.remote {
            env.retain(|(k, _)| *k != "DB_PATH");
            env.push(("DATABASE_URL", remote.url()));
        }
        env.push((
            "REGBOT_DATABASE_URL",
            self.regbot_path.display().to_string(),
        ));
        env.push(("REGBOT_REFRESH_SECONDS", "86400".into()));
        env
    }

    fn log(&self, replica: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{replica}.log"))
    }

    async fn start_replica(&self, replica: usize) -> Server {
        let env = self.env();
        start_server(
            &as_refs(&env),
            &self.admin,
            &self.log(replica),
            self.dir.path(),
        )
        .await
    }

    fn replica(&self, i: usize) -> &Server {
        self.replicas[i].as_ref().expect("replica running")
    }

    fn logs(&self) -> String {
        (0..REPLICAS)
            .map(|i| format!("--- replica {i}:\n{}", read_log(&self.log(i))))
            .collect()
    }

    /// CALLERS_PER_REPLICA callers on each of `replicas`, until `stop`, `within` or a 429 that
    /// will not free up soon (see [`Caller::run`]).
    fn load(&self, replicas: &[usize], within: Duration) -> Load {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new((0..REPLICAS).map(|_| AtomicUsize::new(0)).collect()),
            handles: Vec::new(),
        };
        let values: Arc<HashMap<String, String>> = Arc::new(
            self.keys
                .iter()
                .map(|(id, (value, _))| (id.clone(), value.clone()))
                .collect(),
        );
        let deadline = Instant::now() + within;
        let handles = replicas
            .iter()
            .flat_map(|&replica| {
                CALLS
                    .iter()
                    .map(move |&(feature, cost)| (replica, feature, cost))
            })
            .map(|(replica, feature, cost)| {
                let caller = Caller {
                    replica,
                    url: self
                        .replica(replica)
                        .url(&format!("/key?feature={feature}&cost={cost}")),
                    token: self.token.clone(),
                    feature,
                    cost,
                    values: values.clone(),
                    stop: load.stop.clone(),
                    ok: load.ok.clone(),
                    deadline,
                };
                tokio::spawn(caller.run())
            })
            .collect();
        Load { handles, ..load }
    }

    /// SIGTERM every running replica; each must exit 0.
    async fn terminate(&mut self) {
        let logs = self.logs();
        for server in self.replicas.iter_mut().flatten() {
            let exit = server.terminate(Duration::from_secs(15)).await;
            assert!(exit.success(), "SIGTERM exit: {exit}; logs:\n{logs}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load.

/// A 200 as the caller received it.
struct Served {
    replica: usize,
    key_id: String,
    feature: &'static str,
    cost: i64,
    sent: Instant,
}

#[derive(Default)]
struct Tally {
    served: Vec<Served>,
    /// (replica, status) → count, for every answer but 200 and 429.
    statuses: BTreeMap<(usize, u16), usize>,
    /// Connection or body errors: (replica, error).
    errors: Vec<(usize, String)>,
    /// 200s whose value is not the key's.
    wrong: Vec<String>,
    /// Every request: (replica, sent, how long its answer took).
    calls: Vec<(usize, Instant, Duration)>,
    /// 429s with a short Retry-After (a 1 s window), retried.
    window_429s: usize,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.served.extend(other.served);
        for (k, n) in other.statuses {
            *self.statuses.entry(k).or_default() += n;
        }
        self.errors.extend(other.errors);
        self.wrong.extend(other.wrong);
        self.calls.extend(other.calls);
        self.window_429s += other.window_429s;
    }

    fn per_replica(&self) -> [usize; REPLICAS] {
        let mut out = [0; REPLICAS];
        for s in &self.served {
            out[s.replica] += 1;
        }
        out
    }
}

struct Caller {
    replica: usize,
    url: String,
    token: String,
    feature: &'static str,
    cost: i64,
    values: Arc<HashMap<String, String>>,
    stop: Arc<AtomicBool>,
    ok: Arc<Vec<AtomicUsize>>,
    deadline: Instant,
}

impl Caller {
    /// GET /key in a loop. A 429 whose Retry-After is a few seconds at most (a 1 s window) is
    /// retried after 20 ms; any other 429 (budgets or hour windows spent), any other status or
    /// a connection error ends the caller.
    async fn run(self) -> Tally {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("reqwest client");
        let mut t = Tally::default();
        while !self.stop.load(Ordering::SeqCst) && Instant::now() < self.deadline {
            let sent = Instant::now();
            let response = match client.get(&self.url).bearer_auth(&self.token).send().await {
                Ok(r) => r,
                Err(e) => {
                    t.errors.push((self.replica, e.to_string()));
                    break;
                }
            };
            let status = response.status();
            let retry_after: Option<u64> = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let text = match response.text().await {
                Ok(text) => text,
                Err(e) => {
                    t.errors.push((self.replica, e.to_string()));
                    break;
                }
            };
            t.calls.push((self.replica, sent, sent.elapsed()));
            match status {
                StatusCode::OK => {
                    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let key_id = body["key_id"].as_str().unwrap_or_default().to_string();
                    if self.values.get(&key_id).map(String::as_str) != body["value"].as_str() {
                        t.wrong.push(text);
                    }
                    t.served.push(Served {
                        replica: self.replica,
                        key_id,
                        feature: self.feature,
                        cost: self.cost,
                        sent,
                    });
                    self.ok[self.replica].fetch_add(1, Ordering::SeqCst);
                }
                StatusCode::TOO_MANY_REQUESTS if retry_after.is_some_and(|s| s <= 5) => {
                    t.window_429s += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                StatusCode::TOO_MANY_REQUESTS => break,
                other => {
                    *t.statuses
                        .entry((self.replica, other.as_u16()))
                        .or_default() += 1;
                    break;
                }
            }
        }
        t
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    /// 200s received so far, per replica.
    ok: Arc<Vec<AtomicUsize>>,
    handles: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn ok(&self, replicas: &[usize]) -> usize {
        replicas
            .iter()
            .map(|&r| self.ok[r].load(Ordering::SeqCst))
            .sum()
    }

    /// Waits until `replicas` have `n` 200s between them, or `timeout`; returns how many.
    async fn wait_for(&self, replicas: &[usize], n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.ok(replicas) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.ok(replicas)
    }

    /// Stops the callers (each finishes the request it has in flight) and gathers them.
    async fn finish(self, stop: bool) -> Tally {
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        let mut total = Tally::default();
        for h in self.handles {
            let t = tokio::time::timeout_at(deadline, h)
                .await
                .expect("callers finished in time")
                .expect("caller task did not panic");
            total.merge(t);
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// The database as committed, and the exactness checks.

struct KeyRow {
    usage_count: i64,
    events: i64,
    units: i64,
    /// `created_at` of the key's `scrape` audit rows, µs since the epoch, ascending.
    scrape_at: Vec<i64>,
    /// (`created_at`, rowid) of the same rows: the rowid tells the order they were committed in.
    scrape_rows: Vec<(i64, i64)>,
}

async fn committed(cluster: &Cluster) -> (HashMap<String, KeyRow>, i64) {
    let db = open_db(&cluster.db_path).await;
    let mut rows = HashMap::new();
    for id in cluster.keys.keys() {
        let usage_count: i64 = if id == REGBOT_KEY {
            sqlx::query_scalar("SELECT usage_count FROM regbot_keys WHERE key_id = ?")
                .bind(id)
                .fetch_optional(&db)
                .await
                .expect("read the RegBot key's counter")
                .unwrap_or(0)
        } else {
            sqlx::query_scalar("SELECT usage_count FROM keys WHERE id = ?")
                .bind(id)
                .fetch_one(&db)
                .await
                .expect("read the key's counter")
        };
        let (events, units): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(COALESCE(cost, 1)), 0) FROM usage_events WHERE key_id = ?",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .expect("sum the key's audit rows");
        let times: Vec<(String, i64)> = sqlx::query_as(
            "SELECT CAST(created_at AS TEXT), rowid FROM usage_events WHERE key_id = ? AND feature = 'scrape'",
        )
        .bind(id)
        .fetch_all(&db)
        .await
        .expect("read the key's scrape audit rows");
        let mut scrape_rows: Vec<(i64, i64)> = times
            .iter()
            .map(|(t, rowid)| {
                let at = chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")
                    .unwrap_or_else(|e| panic!("audit row time {t:?}: {e}"))
                    .and_utc()
                    .timestamp_micros();
                (at, *rowid)
            })
            .collect();
        scrape_rows.sort_unstable();
        let scrape_at: Vec<i64> = scrape_rows.iter().map(|&(at, _)| at).collect();
        rows.insert(
            id.clone(),
            KeyRow {
                usage_count,
                events,
                units,
                scrape_at,
                scrape_rows,
            },
        );
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(&db)
        .await
        .expect("count all audit rows");
    db.close().await;
    (rows, total)
}

impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "usage_count {}, {} audit rows of {} units, {} of them scrape",
            self.usage_count,
            self.events,
            self.units,
            self.scrape_at.len()
        )
    }
}

/// Splits serve times into fixed windows as the pool opens them — each at the first serve
/// after the previous one elapsed — and returns the fullest one's count, serves within
/// WINDOW_EDGE_US of its end left out, with its start.
fn fullest_window(times: &[i64], window_us: i64) -> (usize, i64) {
    let mut fullest = (0, 0);
    let mut i = 0;
    while i < times.len() {
        let start = times[i];
        let end = times[i..].partition_point(|&t| t < start + window_us) + i;
        let counted = times[i..end]
            .iter()
            .filter(|&&t| t < start + window_us - WINDOW_EDGE_US)
            .count();
        if counted > fullest.0 {
            fullest = (counted, start);
        }
        i = end;
    }
    fullest
}

/// Every exactness property of issue 14 item 6. `undelivered`: how many committed serves may
/// never have reached their caller (those in flight on a replica when it was killed).
fn assert_exact(
    cluster: &Cluster,
    tally: &Tally,
    rows: &HashMap<String, KeyRow>,
    total: i64,
    undelivered: usize,
) {
    let plan = cluster.plan;
    let logs = || cluster.logs();
    assert!(
        tally.wrong.is_empty(),
        "wrong key material served: {:?}",
        tally.wrong
    );
    let mut delivered_total = 0;
    // Stored budgets first, then RegBot's, then the windowed keys: the same first failure each run.
    let mut keys: Vec<(&String, i64)> = cluster.keys.iter().map(|(id, (_, b))| (id, *b)).collect();
    keys.sort_by_key(|&(id, budget)| {
        let rank = match (budget == plan.key_budget, id == REGBOT_KEY) {
            (true, _) => 0,
            (_, true) => 1,
            _ => 2,
        };
        (rank, id.clone())
    });
    for (id, budget) in keys {
        let mine: Vec<&Served> = tally.served.iter().filter(|s| &s.key_id == id).collect();
        let units: i64 = mine.iter().map(|s| s.cost).sum();
        let mut by_replica = [0i64; REPLICAS];
        for s in &mine {
            by_replica[s.replica] += s.cost;
        }
        assert!(
            units <= budget,
            "key {id} over-served: the replicas delivered {units} units (per replica {by_replica:?}) \
             on a budget of {budget}; committed {:?}",
            rows[id]
        );
        let scrapes = mine.iter().filter(|s| s.feature == "scrape").count() as i64;
        assert!(
            scrapes <= plan.per_hour,
            "key {id}: {scrapes} scrape 200s in one hour window of {}",
            plan.per_hour
        );
        let row = &rows[id];
        assert_eq!(
            row.usage_count, row.units,
            "key {id}: the committed counter is the sum of its audit rows' units"
        );
        assert!(
            row.usage_count <= budget,
            "key {id} committed over its budget {budget}: {row:?}"
        );
        assert!(
            units <= row.units && mine.len() as i64 <= row.events,
            "key {id}: {} 200s ({units} units) delivered, only {row:?} committed",
            mine.len()
        );
        let hour = row.scrape_at.len() as i64;
        assert!(
            hour <= plan.per_hour,
            "key {id}: {hour} scrape audit rows in the hour window of {}",
            plan.per_hour
        );
        let (most, at) = fullest_window(&row.scrape_at, 1_000_000);
        assert!(
            most as i64 <= plan.per_second,
            "key {id}: {most} scrape serves in the 1 s window opened at {at} µs since the epoch \
             (limit {}); {row:?}; its rows and their neighbours (µs from its start, rowid = \
             commit order): {:?}",
            plan.per_second,
            row.scrape_rows
                .iter()
                .filter(|(t, _)| (at - 2_000_000..at + 3_000_000).contains(t))
                .map(|(t, rowid)| format!("{:+} r{rowid}", t - at))
                .collect::<Vec<_>>()
        );
        delivered_total += mine.len();
    }
    assert!(
        total >= delivered_total as i64 && total - delivered_total as i64 <= undelivered as i64,
        "{total} audit rows for {delivered_total} 200s received (at most {undelivered} committed \
         and never delivered); logs:\n{}",
        logs()
    );
}

fn summary(what: &str, tally: &Tally, rows: &HashMap<String, KeyRow>, total: i64) {
    let per_key: BTreeMap<&String, (i64, i64)> = rows
        .iter()
        .map(|(k, r)| (k, (r.usage_count, r.events)))
        .collect();
    let mut slowest = [Duration::ZERO; REPLICAS];
    for &(r, _, took) in &tally.calls {
        slowest[r] = slowest[r].max(took);
    }
    println!(
        "{what}: 200s per replica {:?}, {} window 429s, other statuses {:?}, errors {}, slowest \
         answer per replica {slowest:?}; committed (usage_count, audit rows) per key {per_key:?}, \
         {total} audit rows",
        tally.per_replica(),
        tally.window_429s,
        tally.statuses,
        tally.errors.len()
    );
}

// ---------------------------------------------------------------------------------------------
// The tests.

const HAMMER: Plan = Plan {
    key_budget: 120,
    regbot_budget: 80,
    per_second: 5,
    per_hour: 15,
};

/// Issue 14 item 6: all three replicas at once until every budget and hour window is spent.
async fn hammer(driver: Driver) {
    let mut cluster = Cluster::start(driver, HAMMER).await;
    let all: Vec<usize> = (0..REPLICAS).collect();
    let tally = cluster
        .load(&all, Duration::from_secs(8))
        .finish(false)
        .await;
    cluster.terminate().await;
    let (rows, total) = committed(&cluster).await;
    summary("three replicas", &tally, &rows, total);
    assert!(
        tally.errors.is_empty() && tally.statuses.is_empty(),
        "only 200s and 429s expected: errors {:?}, statuses {:?}; logs:\n{}",
        tally.errors,
        tally.statuses,
        cluster.logs()
    );
    assert!(
        tally.per_replica().iter().all(|&n| n > 0),
        "every replica served: {:?}",
        tally.per_replica()
    );
    assert_exact(&cluster, &tally, &rows, total, 0);
    assert_eq!(
        total,
        tally.served.len() as i64,
        "audit rows == 200s received"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_sqlite_file_never_exceed_a_budget_or_a_window() {
    hammer(Driver::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_libsql_server_never_exceed_a_budget_or_a_window() {
    hammer(Driver::Libsql).await;
}

const KILL: Plan = Plan {
    key_budget: 400,
    regbot_budget: 150,
    per_second: 10,
    per_hour: 30,
};

/// Issue 14 item 6: `kill -9` one replica mid-load; the others go on without a stall, its
/// restart serves again, and the totals stay exact once every budget is drawn dry.
async fn kill_one(driver: Driver) {
    const KILLED: usize = REPLICAS - 1;
    let survivors: Vec<usize> = (0..KILLED).collect();
    let all: Vec<usize> = (0..REPLICAS).collect();
    let mut cluster = Cluster::start(driver, KILL).await;

    let load = cluster.load(&all, Duration::from_secs(30));
    let before = load.wait_for(&all, 60, Duration::from_secs(15)).await;
    let mut killed = cluster.replicas[KILLED].take().expect("running");
    killed.child.sigkill();
    let killed_at = Instant::now();
    let survived = load.ok(&survivors);
    // Each survivor on its own: one stalled behind the dead replica's stream (up to the
    // server's 1 s idle expiry) while the other serves 120 meanwhile is still going on.
    for &r in &survivors {
        let had = load.ok(&[r]);
        load.wait_for(&[r], had + 20, Duration::from_secs(6)).await;
    }
    let after = load.ok(&survivors);
    let mut tally = load.finish(true).await;
    println!(
        "kill -9 of replica {KILLED} after {before} 200s; the others then went from {survived} to {after} 200s ({:?} per replica)",
        tally.per_replica()
    );
    let on_survivors = |r: &usize| survivors.contains(r);
    let errors: Vec<_> = tally
        .errors
        .iter()
        .filter(|(r, _)| on_survivors(r))
        .collect();
    let statuses: Vec<_> = tally
        .statuses
        .iter()
        .filter(|((r, _), _)| on_survivors(r))
        .collect();
    assert!(
        errors.is_empty() && statuses.is_empty(),
        "the survivors answered only 200 and 429: errors {errors:?}, statuses {statuses:?}; logs:\n{}",
        cluster.logs()
    );
    let slowest = tally
        .calls
        .iter()
        .filter(|(r, _, _)| on_survivors(r))
        .map(|c| c.2)
        .max()
        .unwrap_or_default();
    assert!(
        slowest <= STALL_BOUND,
        "a request on a surviving replica took {slowest:?} (bound {STALL_BOUND:?}); logs:\n{}",
        cluster.logs()
    );
    for r in &survivors {
        let after_kill = tally
            .served
            .iter()
            .filter(|s| s.replica == *r && s.sent >= killed_at)
            .count();
        assert!(
            after_kill > 0,
            "replica {r} went on serving after the kill; logs:\n{}",
            cluster.logs()
        );
    }

    // Restarted on the same database, it serves again; then all three draw the budgets dry.
    let restarted = cluster.start_replica(KILLED).await;
    let (status, body) = restarted
        .call(
            Method::GET,
            "/key?feature=crawl",
            Some(&cluster.token),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the restarted replica serves: {body}"
    );
    tally.served.push(Served {
        replica: KILLED,
        key_id: body["key_id"].as_str().unwrap_or_default().to_string(),
        feature: "crawl",
        cost: 1,
        sent: Instant::now(),
    });
    cluster.replicas[KILLED] = Some(restarted);
    let drain = cluster
        .load(&all, Duration::from_secs(10))
        .finish(false)
        .await;
    assert!(
        drain.errors.is_empty() && drain.statuses.is_empty(),
        "after the restart, only 200s and 429s: errors {:?}, statuses {:?}; logs:\n{}",
        drain.errors,
        drain.statuses,
        cluster.logs()
    );
    tally.merge(drain);
    cluster.terminate().await;
    let (rows, total) = committed(&cluster).await;
    summary("kill -9 and restart", &tally, &rows, total);
    // Each caller of the killed replica had at most one serve in flight when it died.
    assert_exact(&cluster, &tally, &rows, total, CALLERS_PER_REPLICA);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_replicas_on_sqlite_the_others_go_on_and_totals_stay_exact() {
    kill_one(Driver::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_replicas_on_libsql_the_others_go_on_and_totals_stay_exact() {
    kill_one(Driver::Libsql).await;
}
