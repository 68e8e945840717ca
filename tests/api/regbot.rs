//! Issue 12 (SPEC §8.5): the RegBot credentials source. RegBot's database is created here with
//! the seed's exact `CREATE TABLE credentials`; on the SQLite driver the service reads it as a
//! local file, on the libSQL driver behind a second test Hrana server with a token.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

use crate::helpers::*;
use crate::hrana::HranaServer;

/// The seed's statement, verbatim (comments included).
const SEED_SCHEMA: &str = "CREATE TABLE credentials (
id INTEGER PRIMARY KEY AUTOINCREMENT,
service TEXT NOT NULL, -- 'assemblyai', 'exaai', 'firecrawl', 'groq', 'tavily', 'serper', 'elevenlabs', 'cartesia', 'deepgram'
api_key TEXT NOT NULL,
email TEXT,
quota_total INTEGER,
quota_used INTEGER DEFAULT 0,
quota_unit TEXT DEFAULT 'requests',
status TEXT DEFAULT 'active', -- active, expired, suspended
last_usage_check TIMESTAMP,
extra_metadata TEXT, -- JSON
created_at TIMESTAMP,
updated_at TIMESTAMP
);";

const REGBOT_TOKEN: &str = "regbot-token-SECRET-0123";

/// RegBot's database for one test: the file, and (libSQL runs) the server in front of it.
struct RegBot {
    path: PathBuf,
    server: Option<HranaServer>,
    _dir: tempfile::TempDir,
}

impl RegBot {
    async fn new() -> RegBot {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("regbot.db");
        let conn = rusqlite::Connection::open(&path).expect("regbot db");
        conn.execute_batch(SEED_SCHEMA).expect("seed schema");
        drop(conn);
        let server = match backend() {
            Backend::Sqlite => None,
            Backend::Libsql => Some(HranaServer::start(&path, Some(REGBOT_TOKEN)).await),
        };
        RegBot {
            path,
            server,
            _dir: dir,
        }
    }

    /// The service's environment for this RegBot (a refresh only on demand, unless `every`).
    fn env(&self, every: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![(
            "REGBOT_REFRESH_SECONDS".to_string(),
            every.unwrap_or("86400").to_string(),
        )];
        match &self.server {
            None => env.push((
                "REGBOT_DATABASE_URL".into(),
                self.path.display().to_string(),
            )),
            Some(server) => {
                env.push(("REGBOT_DATABASE_URL".into(), server.url()));
                env.push(("REGBOT_AUTH_TOKEN".into(), REGBOT_TOKEN.into()));
            }
        }
        env
    }

    async fn app(&self, every: Option<&str>) -> TestApp {
        let env = self.env(every);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        spawn_app_with(&pairs).await
    }

    fn exec(&self, sql: &str, params: &[&dyn rusqlite::ToSql]) {
        let conn = rusqlite::Connection::open(&self.path).expect("regbot db");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy");
        conn.execute(sql, params).expect("regbot write");
    }

    /// Adds a credential the way RegBot writes one (TIMESTAMP columns as CURRENT_TIMESTAMP
    /// text); returns its id.
    fn add(
        &self,
        service: &str,
        api_key: &str,
        email: Option<&str>,
        total: Option<i64>,
        used: i64,
    ) -> i64 {
        let conn = rusqlite::Connection::open(&self.path).expect("regbot db");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy");
        conn.execute(
            "INSERT INTO credentials (service, api_key, email, quota_total, quota_used, \
             extra_metadata, created_at, updated_at, last_usage_check) \
             VALUES (?, ?, ?, ?, ?, '{\"plan\":\"free\"}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, NULL)",
            rusqlite::params![service, api_key, email, total, used],
        )
        .expect("insert credential");
        conn.last_insert_rowid()
    }

    fn set(&self, id: i64, assignment: &str) {
        self.exec(
            &format!("UPDATE credentials SET {assignment} WHERE id = ?"),
            &[&id],
        );
    }
}

async fn patch_tier(app: &TestApp, body: Value) -> Resp {
    app.admin_send(reqwest::Method::PATCH, "/admin/tiers", Some(&body))
        .await
}

impl TestApp {
    async fn refresh_regbot(&self) -> Value {
        let r = self
            .admin_post("/admin/sources/regbot/refresh", json!({}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
    }

    /// The key ids `feature` serves in `n` admin draws (429s skipped).
    async fn served_ids(&self, feature: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let r = self.draw(feature, ADMIN_TOKEN).await;
            if r.status == StatusCode::OK {
                out.push(r.body["key_id"].as_str().expect("key_id").to_string());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    async fn key_view(&self, id: &str) -> Option<Value> {
        let keys = self.admin_get("/admin/keys").await;
        keys.body
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
    }
}

fn file_hash(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read file"),
    ))
}

on_both_drivers! {
    // Issue 12 items 2, 3 and 4: the default mapping and an explicit source; stored and RegBot
    // keys in one tier; rows added, suspended, deleted between refreshes; values never listed
    // or stored; counters and audit rows keyed by `regbot:N`.
    async fn regbot_credentials_are_served_by_mapping_and_follow_each_refresh() {
        let regbot = RegBot::new().await;
        let k1 = regbot.add("exaai", "exa-key-1-SECRET", Some("one@example.com"), Some(100), 0);
        let k2 = regbot.add("exaai", "exa-key-2-SECRET", None, None, 0);
        regbot.set(k2, "status = 'suspended'");
        let k3 = regbot.add("firecrawl", "fc-key-3-SECRET", None, Some(10), 0);
        regbot.add("groq", "groq-key-SECRET", None, None, 0);
        let app = regbot.app(None).await;

        // A tier named like a seed service reads it by default; another names its service.
        app.create_tier("exa", &[("exa_search", 1000, 60)]).await;
        let fc = app
            .admin_post(
                "/admin/tiers",
                json!({"name": "fc-pool", "features": {"fc_scrape": {"rate_limit": 1000}},
                       "source": {"regbot_service": "firecrawl"}}),
            )
            .await;
        assert_eq!(fc.status, StatusCode::CREATED, "{}", fc.text);
        assert_eq!(fc.body["source"], json!({"regbot_service": "firecrawl"}));
        let stored = app
            .add_key(json!({"name": "stored", "key": "stored-SECRET", "tier": "fc-pool"}))
            .await;

        let source = app.refresh_regbot().await;
        assert_eq!(source["name"], "regbot");
        assert_eq!(source["status"], "ok", "{source}");
        assert_eq!(source["credentials"], 2, "{source}");
        assert_eq!(source["tiers"], json!({"exa": 1, "fc-pool": 1}));
        assert_eq!(source["refresh_seconds"], 86400);
        assert!(source["last_success_at"].is_string() && source["last_error"].is_null());

        let r = app.draw("exa_search", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["key_id"], format!("regbot:{k1}"));
        assert_eq!(r.body["value"], "exa-key-1-SECRET");
        assert_eq!(r.body["metadata"]["email"], "one@example.com");
        assert_eq!(r.body["metadata"]["quota_unit"], "requests");
        assert_eq!(r.body["metadata"]["plan"], "free");
        // Both kinds rotate in one tier.
        assert_eq!(app.served_ids("fc_scrape", 4).await, {
            let mut v = vec![format!("regbot:{k3}"), stored.clone()];
            v.sort();
            v
        });

        let listed = app.admin_get("/admin/keys").await;
        assert!(!listed.text.contains("SECRET"), "no value listed: {}", listed.text);
        let view = app.key_view(&format!("regbot:{k1}")).await.expect("listed");
        assert_eq!(view["source"], "regbot");
        assert_eq!(view["name"], "one@example.com");
        assert_eq!(view["quota"], json!({"total": 100, "used": 0, "unit": "requests", "served_here": 1}));
        assert_eq!(view["health"]["state"], "active");
        assert!(app.key_view(&stored).await.expect("stored")["source"].is_null());

        // Our database: the audit row and the counter by `regbot:N`, never the value.
        let id1 = format!("regbot:{k1}");
        assert_eq!(app.count(&format!("SELECT COUNT(*) FROM usage_events WHERE key_id = '{id1}'")).await, 1);
        assert_eq!(app.count(&format!("SELECT usage_count FROM regbot_keys WHERE key_id = '{id1}'")).await, 1);
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 1, "only the stored key is a row");
        for table in ["keys", "regbot_keys", "key_secrets"] {
            let dump = app.rows(&format!("SELECT * FROM {table}")).await;
            assert!(!format!("{dump:?}").contains("exa-key"), "{table}: {dump:?}");
        }

        // Suspended, reactivated, added and deleted between refreshes.
        regbot.set(k1, "status = 'suspended'");
        regbot.set(k2, "status = 'active'");
        let k4 = regbot.add("exaai", "exa-key-4-SECRET", None, None, 0);
        regbot.exec("DELETE FROM credentials WHERE id = ?", &[&k3]);
        let source = app.refresh_regbot().await;
        assert_eq!(source["tiers"], json!({"exa": 2, "fc-pool": 0}));
        assert_eq!(
            app.served_ids("exa_search", 6).await,
            vec![format!("regbot:{k2}"), format!("regbot:{k4}")]
        );
        assert_eq!(app.served_ids("fc_scrape", 3).await, vec![stored.clone()]);
        assert!(app.key_view(&id1).await.is_none(), "a suspended credential leaves the pool");

        // A key RegBot owns is not changed through our admin API.
        let id2 = format!("regbot:{k2}");
        let patch = app
            .admin_send(reqwest::Method::PATCH, &format!("/admin/keys/{id2}"), Some(&json!({"is_active": false})))
            .await;
        assert_eq!(patch.status, StatusCode::CONFLICT, "{}", patch.text);
        let delete = app.admin_send(reqwest::Method::DELETE, &format!("/admin/keys/{id2}"), None).await;
        assert_eq!(delete.status, StatusCode::CONFLICT, "{}", delete.text);
        // RegBot keys never hold a tier in place: an unforced delete only counts stored keys.
        let gone = app.admin_send(reqwest::Method::DELETE, "/admin/tiers/exa", None).await;
        assert_eq!(gone.status, StatusCode::OK, "{}", gone.text);
        assert_eq!(app.draw("exa_search", ADMIN_TOKEN).await.status, StatusCode::NOT_FOUND);
    }

    // Issue 12 item 4: the budget is quota_total - quota_used, counted from what is served
    // here since RegBot last changed quota_used; it survives a restart; a used-up credential
    // is not served.
    async fn regbot_quota_is_the_budget_across_refreshes_and_restarts() {
        let regbot = RegBot::new().await;
        let id = regbot.add("tavily", "tv-SECRET", None, Some(5), 2);
        let mut app = regbot.app(None).await;
        app.create_tier("tavily", &[("search", 1000, 60)]).await;
        app.refresh_regbot().await;
        let key_id = format!("regbot:{id}");
        for _ in 0..3 {
            assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::OK);
        }
        let spent = app.draw("search", ADMIN_TOKEN).await;
        assert_eq!(spent.status, StatusCode::TOO_MANY_REQUESTS, "{}", spent.text);
        assert!(spent.headers.get("retry-after").is_none(), "RegBot must change the quota first");
        let view = app.key_view(&key_id).await.expect("listed");
        assert_eq!(view["quota"], json!({"total": 5, "used": 2, "unit": "requests", "served_here": 3}));

        app.restart().await;
        assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS, "counted across a restart");

        // RegBot checked the balance: 3 used. Our count starts over from here: 2 more.
        regbot.set(id, "quota_used = 3");
        app.refresh_regbot().await;
        for _ in 0..2 {
            let r = app.draw("search", ADMIN_TOKEN).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(app.count(&format!("SELECT usage_count FROM regbot_keys WHERE key_id = '{key_id}'")).await, 5);

        // RegBot raises the quota, then reports it used up.
        regbot.set(id, "quota_total = 1000, quota_used = 3");
        app.refresh_regbot().await;
        assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::OK);
        regbot.set(id, "quota_used = 1000");
        app.refresh_regbot().await;
        assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS);
        let view = app.key_view(&key_id).await.expect("listed");
        assert_eq!(view["quota"]["served_here"], 0);
        assert_eq!(app.count(&format!("SELECT COUNT(*) FROM usage_events WHERE key_id = '{key_id}'")).await, 6);
    }

    // Issue 12 item 4 with issue 11's cost: a RegBot quota counts units. 10 left: cost 4 twice,
    // then a cost-4 serve no longer fits (429) while a cost-2 one still does.
    async fn regbot_quota_counts_units_of_cost() {
        let regbot = RegBot::new().await;
        let id = regbot.add("serper", "sp-SECRET", None, Some(12), 2);
        let app = regbot.app(None).await;
        app.create_tier("serper", &[("search", 1000, 60)]).await;
        app.refresh_regbot().await;
        let draw = async |cost: u32| {
            app.get(&format!("/key?feature=search&cost={cost}"), Some(ADMIN_TOKEN))
                .await
        };
        for _ in 0..2 {
            let r = draw(4).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        }
        assert_eq!(draw(4).await.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(draw(2).await.status, StatusCode::OK);
        assert_eq!(draw(1).await.status, StatusCode::TOO_MANY_REQUESTS);
        let view = app.key_view(&format!("regbot:{id}")).await.expect("listed");
        assert_eq!(view["quota"]["served_here"], 10);
    }

    // Issue 12 item 5: RegBot unreachable → the last good snapshot keeps serving, the source
    // is `stale` with its last success and the error (never the token), /readyz stays ready;
    // recovery by itself. A cold start without RegBot serves nothing from it and starts.
    async fn regbot_down_serves_the_last_snapshot_and_recovers() {
        let mut regbot = RegBot::new().await;
        let moved = regbot.path.with_extension("away");
        // Cold start with RegBot unreachable.
        match &mut regbot.server {
            Some(server) => server.stop().await,
            None => std::fs::rename(&regbot.path, &moved).expect("move away"),
        }
        let app = regbot.app(Some("1")).await;
        app.create_tier("serper", &[("serp", 1000, 60)]).await;
        let sources = app.admin_get("/admin/sources").await;
        let source = &sources.body["sources"][0];
        assert_eq!(source["status"], "stale", "{}", sources.text);
        assert!(source["last_success_at"].is_null() && source["age_seconds"].is_null());
        let error = source["last_error"].as_str().expect("an error");
        assert!(!error.contains(REGBOT_TOKEN), "{error}");
        assert_eq!(app.draw("serp", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(app.get("/readyz", None).await.status, StatusCode::OK);

        // RegBot comes up: the loop (every second) picks it up by itself.
        match &mut regbot.server {
            Some(server) => server.restart().await,
            None => std::fs::rename(&moved, &regbot.path).expect("move back"),
        }
        let id = regbot.add("serper", "serp-SECRET", None, None, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = app.admin_get("/admin/sources").await.body["sources"][0].clone();
            if s["status"] == "ok" && s["credentials"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "no recovery: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(app.draw("serp", ADMIN_TOKEN).await.body["key_id"], format!("regbot:{id}"));

        // Down again: stale, the last snapshot serves, metrics say so.
        match &mut regbot.server {
            Some(server) => server.stop().await,
            None => std::fs::rename(&regbot.path, &moved).expect("move away"),
        }
        let source = app.refresh_regbot().await;
        assert_eq!(source["status"], "stale", "{source}");
        assert!(source["last_success_at"].is_string() && source["age_seconds"].is_number());
        assert!(!source.to_string().contains(REGBOT_TOKEN));
        assert_eq!(source["credentials"], 1);
        assert_eq!(app.draw("serp", ADMIN_TOKEN).await.status, StatusCode::OK, "last good snapshot");
        assert_eq!(app.get("/readyz", None).await.status, StatusCode::OK);
        let metrics = app.get("/metrics", None).await.text;
        assert!(metrics.contains("keypooler_source_stale{source=\"regbot\"} 1"), "{metrics}");
        assert!(metrics.contains("keypooler_source_refresh_age_seconds{source=\"regbot\"}"), "{metrics}");
        assert!(!metrics.contains(REGBOT_TOKEN));

        match &mut regbot.server {
            Some(server) => server.restart().await,
            None => std::fs::rename(&moved, &regbot.path).expect("move back"),
        }
        assert_eq!(app.refresh_regbot().await["status"], "ok");
    }

    // Issue 12 item 5: malformed rows are skipped (the rest serve); other statuses and
    // unmapped services are never read.
    async fn malformed_regbot_rows_are_skipped() {
        let regbot = RegBot::new().await;
        let good = regbot.add("cartesia", "good-SECRET", None, Some(10), 1);
        let empty = regbot.add("cartesia", "", None, None, 0);
        let blank = regbot.add("cartesia", "   ", None, None, 0);
        let json_bad = regbot.add("cartesia", "badjson-SECRET", None, None, 0);
        regbot.set(json_bad, "extra_metadata = '{not json'");
        let negative = regbot.add("cartesia", "neg-SECRET", None, Some(-5), 0);
        let used_bad = regbot.add("cartesia", "usedbad-SECRET", None, Some(5), 0);
        regbot.set(used_bad, "quota_used = -1");
        let odd = regbot.add("cartesia", "odd-SECRET", None, None, 0);
        regbot.set(odd, "status = 'weird'");
        regbot.add("not-a-service", "unmapped-SECRET", None, None, 0);
        let app = regbot.app(None).await;
        app.create_tier("cartesia", &[("tts", 1000, 60)]).await;
        let source = app.refresh_regbot().await;
        assert_eq!(source["status"], "ok");
        assert_eq!(source["credentials"], 1, "{source}");
        assert_eq!(app.served_ids("tts", 5).await, vec![format!("regbot:{good}")]);
        for id in [empty, blank, json_bad, negative, used_bad, odd] {
            assert!(app.key_view(&format!("regbot:{id}")).await.is_none(), "row {id}");
        }
    }

    // Issue 12 item 3: a refresh in the middle of 64 concurrent callers: no window or budget
    // exceeded, and no serve of a suspended key begun after the refresh that saw it.
    async fn a_refresh_amid_64_callers_keeps_every_limit() {
        let regbot = RegBot::new().await;
        let ids: Vec<i64> = (0..8)
            .map(|i| regbot.add("deepgram", &format!("dg-{i}-SECRET"), None, Some(12), 2))
            .collect();
        let app = regbot.app(None).await;
        app.create_tier("deepgram", &[("stt", 7, 3600)]).await;
        app.refresh_regbot().await;
        let app = std::sync::Arc::new(app);
        let suspended: Vec<String> = ids[..4].iter().map(|id| format!("regbot:{id}")).collect();
        let refreshed_at = std::sync::Arc::new(parking_lot::Mutex::new(None::<Instant>));
        let mut callers = Vec::new();
        for _ in 0..64 {
            let app = app.clone();
            callers.push(tokio::spawn(async move {
                let mut served = Vec::new();
                for _ in 0..3 {
                    let started = Instant::now();
                    let r = app.draw("stt", ADMIN_TOKEN).await;
                    if r.status == StatusCode::OK {
                        served.push((started, r.body["key_id"].as_str().expect("id").to_string()));
                    } else {
                        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
                    }
                    tokio::task::yield_now().await;
                }
                served
            }));
        }
        regbot.exec("UPDATE credentials SET status = 'suspended' WHERE id <= ?", &[&ids[3]]);
        app.refresh_regbot().await;
        *refreshed_at.lock() = Some(Instant::now());
        let mut per_key: std::collections::HashMap<String, i64> = Default::default();
        let mut total = 0;
        for caller in callers {
            for (started, key) in caller.await.expect("caller") {
                let after = refreshed_at.lock().is_some_and(|at| started > at);
                assert!(!(after && suspended.contains(&key)), "{key} served after the refresh that saw it suspended");
                *per_key.entry(key).or_default() += 1;
                total += 1;
            }
        }
        for (key, n) in &per_key {
            // Rate: 7 per hour; budget: 12 - 2 = 10. The rate binds.
            assert!(*n <= 7, "{key} served {n} times");
        }
        assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, total);
        for (key, n) in &per_key {
            assert_eq!(app.count(&format!("SELECT usage_count FROM regbot_keys WHERE key_id = '{key}'")).await, *n);
        }
    }

    // Issue 12 item 2: the tier's `source` field: shown, PATCH absent keeps, null removes,
    // bad input 400, one service per tier (409), removed with a forced tier delete.
    async fn tier_source_field_is_validated_and_stored() {
        let app = spawn_app().await;
        let sources = app.admin_get("/admin/sources").await;
        assert_eq!((sources.status, sources.body.clone()), (StatusCode::OK, json!({"sources": []})));
        let refresh = app.admin_post("/admin/sources/regbot/refresh", json!({})).await;
        assert_eq!(refresh.status, StatusCode::NOT_FOUND, "{}", refresh.text);
        assert!(refresh.body["error"].is_string());

        let t = app.create_tier("plain", &[("f", 5, 60)]).await;
        assert!(t["source"].is_null());
        for bad in [json!({"regbot_service": ""}), json!({"service": "x"}), json!("exaai"),
                    json!({"regbot_service": 3}), json!({"regbot_service": "a", "x": 1})] {
            let r = app.admin_post("/admin/tiers", json!({"name": "bad", "features": {"f": {"rate_limit": 1}}, "source": bad})).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
            assert!(r.error().contains("source"), "{}", r.text);
        }
        assert_eq!(app.count("SELECT COUNT(*) FROM tiers").await, 1, "nothing half-applied");
        let r = patch_tier(&app, json!({"name": "plain", "features": {"f": {"rate_limit": 5}}, "source": {"regbot_service": "groq"}})).await;
        assert_eq!((r.status, r.body["source"].clone()), (StatusCode::OK, json!({"regbot_service": "groq"})), "{}", r.text);
        let r = patch_tier(&app, json!({"name": "plain", "features": {"f": {"rate_limit": 6}}})).await;
        assert_eq!(r.body["source"], json!({"regbot_service": "groq"}), "absent keeps it");
        let clash = app.admin_post("/admin/tiers", json!({"name": "other", "features": {"f": {"rate_limit": 1}}, "source": {"regbot_service": "groq"}})).await;
        assert_eq!(clash.status, StatusCode::CONFLICT, "{}", clash.text);
        let listed = app.admin_get("/admin/tiers").await;
        assert_eq!(listed.body[0]["source"], json!({"regbot_service": "groq"}));
        assert_eq!(app.count("SELECT COUNT(*) FROM tier_sources").await, 1);
        let r = patch_tier(&app, json!({"name": "plain", "features": {"f": {"rate_limit": 6}}, "source": null})).await;
        assert!(r.body["source"].is_null(), "{}", r.text);
        assert_eq!(app.count("SELECT COUNT(*) FROM tier_sources").await, 0);
        patch_tier(&app, json!({"name": "plain", "features": {"f": {"rate_limit": 6}}, "source": {"regbot_service": "groq"}})).await;
        let mut app = app;
        app.restart().await;
        assert_eq!(app.admin_get("/admin/tiers").await.body[0]["source"], json!({"regbot_service": "groq"}));
        let gone = app.admin_send(reqwest::Method::DELETE, "/admin/tiers/plain?force=true", None).await;
        assert_eq!(gone.status, StatusCode::OK, "{}", gone.text);
        assert_eq!(app.count("SELECT COUNT(*) FROM tier_sources").await, 0);
    }
}

// Issue 12 item 1: the local file is opened read-only: its bytes are unchanged after serves,
// outcome reports and refreshes, and no journal or WAL file appears next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_regbot_file_is_never_written() {
    let regbot = RegBot::new().await;
    let id = regbot.add(
        "elevenlabs",
        "el-SECRET",
        Some("el@example.com"),
        Some(50),
        3,
    );
    regbot.add("elevenlabs", "el2-SECRET", None, None, 0);
    let before = file_hash(&regbot.path);
    let mut app = regbot.app(None).await;
    app.create_tier("elevenlabs", &[("voice", 1000, 60)]).await;
    app.refresh_regbot().await;
    let key_id = format!("regbot:{id}");
    let mut serve_ids = Vec::new();
    for _ in 0..10 {
        let r = app.draw("voice", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if r.body["key_id"] == key_id.as_str() {
            serve_ids.push(r.body["serve_id"].as_str().expect("serve").to_string());
        }
        app.refresh_regbot().await;
    }
    for (i, serve) in serve_ids.iter().enumerate() {
        let status = if i == 0 { 200 } else { 503 };
        let r = app
            .send(
                app.client
                    .post(app.url(&format!("/serves/{serve}/outcome")))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"status": status})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    app.restart().await;
    app.refresh_regbot().await;
    assert_eq!(app.draw("voice", ADMIN_TOKEN).await.status, StatusCode::OK);
    app.stop().await;
    assert_eq!(file_hash(&regbot.path), before, "RegBot's file changed");
    for suffix in ["-journal", "-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", regbot.path.display()));
        assert!(!side.exists(), "{} appeared", side.display());
    }
}

// Issue 12 item 6: an auth_invalid quarantine of `regbot:N` holds across refreshes and a
// restart until RegBot changes the row's api_key or updated_at; then the key is probed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_holds_until_regbot_changes_the_row() {
    let regbot = RegBot::new().await;
    let id = regbot.add("assemblyai", "aai-SECRET", None, None, 0);
    let mut app = regbot.app(None).await;
    app.create_tier("assemblyai", &[("transcribe", 1000, 60)])
        .await;
    app.refresh_regbot().await;
    let key_id = format!("regbot:{id}");
    let mut serves = Vec::new();
    for _ in 0..2 {
        let r = app.draw("transcribe", ADMIN_TOKEN).await;
        assert_eq!(r.body["key_id"], key_id.as_str(), "{}", r.text);
        serves.push(r.body["serve_id"].as_str().expect("serve").to_string());
    }
    let mut last = Value::Null;
    for serve in &serves {
        last = app
            .send(
                app.client
                    .post(app.url(&format!("/serves/{serve}/outcome")))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"status": 401})),
            )
            .await
            .body;
    }
    assert_eq!(last["key_state"], "quarantined", "{last}");
    app.refresh_regbot().await;
    assert_eq!(
        app.draw("transcribe", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    app.restart().await;
    app.refresh_regbot().await;
    assert_eq!(
        app.key_view(&key_id).await.expect("listed")["health"]["state"],
        "quarantined"
    );
    assert_eq!(
        app.draw("transcribe", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // RegBot re-validates the row: updated_at moves (D1 writes CURRENT_TIMESTAMP text).
    regbot.set(id, "updated_at = '2099-01-01 00:00:00'");
    app.refresh_regbot().await;
    let r = app.draw("transcribe", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK, "probed again: {}", r.text);
    assert_eq!(
        app.key_view(&key_id).await.expect("listed")["health"]["state"],
        "probing"
    );
}

// Issue 12 item 3 (defect found in review): a credential's count survives its tier being
// deleted and created again — before, the refresh looked for the previous key in the pool
// only, where the deletion had dropped it, and the count restarted at 0 (over-serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_keeps_its_count_when_its_tier_is_recreated() {
    let regbot = RegBot::new().await;
    regbot.add("groq", "groq-SECRET", None, Some(3), 0);
    let app = regbot.app(None).await;
    app.create_tier("groq", &[("chat", 1000, 60)]).await;
    app.refresh_regbot().await;
    for _ in 0..2 {
        assert_eq!(app.draw("chat", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    let gone = app
        .admin_send(
            reqwest::Method::DELETE,
            "/admin/tiers/groq?force=true",
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::OK, "{}", gone.text);
    app.refresh_regbot().await;
    app.create_tier("groq", &[("chat", 1000, 60)]).await;
    app.refresh_regbot().await;
    assert_eq!(app.draw("chat", ADMIN_TOKEN).await.status, StatusCode::OK);
    let spent = app.draw("chat", ADMIN_TOKEN).await;
    assert_eq!(
        spent.status,
        StatusCode::TOO_MANY_REQUESTS,
        "quota 3, served 3: {}",
        spent.text
    );
}
