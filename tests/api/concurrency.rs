//! SPEC §7 invariants under many concurrent callers: exact counts of 200s, of `usage_count`
//! and of `usage_events` rows.

use std::collections::HashMap;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::Mutex;

use crate::helpers::*;

/// Runs `callers` tasks, each drawing until it sees a non-200; returns served key ids and statuses.
async fn hammer(
    app: &TestApp,
    feature: &str,
    token: &str,
    callers: usize,
    max_each: usize,
) -> (Vec<String>, HashMap<u16, usize>) {
    let served = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (client, url, token, feature) = (
            app.client.clone(),
            app.url("/key"),
            token.to_string(),
            feature.to_string(),
        );
        let (served, statuses) = (served.clone(), statuses.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..max_each {
                let r = client
                    .get(&url)
                    .query(&[("feature", &feature)])
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("send");
                let status = r.status();
                *statuses.lock().await.entry(status.as_u16()).or_insert(0) += 1;
                if status == StatusCode::OK {
                    let body: serde_json::Value = r.json().await.expect("json");
                    served
                        .lock()
                        .await
                        .push(body["key_id"].as_str().expect("key_id").to_string());
                } else {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller task");
    }
    let served = served.lock().await.clone();
    let statuses = statuses.lock().await.clone();
    (served, statuses)
}

async fn per_key(app: &TestApp, sql: &str) -> HashMap<String, i64> {
    app.rows(sql)
        .await
        .into_iter()
        .map(|r| {
            (
                r[0].clone().expect("id"),
                r[1].as_deref().expect("n").parse().expect("integer"),
            )
        })
        .collect()
}

on_both_drivers! {
async fn usage_limit_holds_under_64_concurrent_callers() {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 1_000_000, 60)]).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(app.add_key(json!({ "name": format!("k{i}"), "key": format!("v{i}"), "tier": "t", "usage_limit": 500 })).await);
    }
    let (_, token) = app.consumer("c", &["t"]).await;
    let (served, statuses) = hammer(&app, "scrape", &token, 64, 1000).await;

    assert_eq!(served.len(), 2000, "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&64), "every caller ends on a 429: {statuses:?}");
    assert_eq!(statuses.len(), 2, "only 200 and 429: {statuses:?}");
    let mut by_key: HashMap<String, i64> = HashMap::new();
    for id in &served {
        *by_key.entry(id.clone()).or_default() += 1;
    }
    let counts = per_key(&app, "SELECT id, usage_count FROM keys").await;
    let events = per_key(&app, "SELECT key_id, COUNT(*) FROM usage_events GROUP BY key_id").await;
    for id in &ids {
        assert_eq!(by_key[id], 500, "200s for {id}");
        assert_eq!(counts[id], 500, "usage_count for {id}");
        assert_eq!(events[id], 500, "usage_events for {id}");
    }
}

async fn rate_limit_holds_under_64_concurrent_callers() {
    let app = spawn_app().await;
    // One-hour windows: the whole test runs inside the first window.
    app.create_tier("t", &[("scrape", 50, 3600)]).await;
    for i in 0..3 {
        app.add_key(json!({ "name": format!("k{i}"), "key": format!("v{i}"), "tier": "t" })).await;
    }
    let (served, statuses) = hammer(&app, "scrape", ADMIN_TOKEN, 64, 100).await;
    assert_eq!(served.len(), 150, "{statuses:?}");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 150);
    assert_eq!(app.count("SELECT SUM(usage_count) FROM keys").await, 150);
    let list = app.admin_get("/admin/keys").await;
    for k in list.body.as_array().unwrap() {
        assert_eq!(k["usage"]["scrape"]["used"], 50);
    }
}

async fn budgets_and_rates_hold_together_for_mixed_callers() {
    let app = spawn_app().await;
    app.create_tier("a", &[("scrape", 120, 3600)]).await;
    app.create_tier("b", &[("scrape", 1_000, 3600)]).await;
    app.add_key(json!({ "name": "a1", "key": "va1", "tier": "a", "usage_limit": 100 })).await;
    app.add_key(json!({ "name": "a2", "key": "va2", "tier": "a", "usage_limit": 300 })).await;
    app.add_key(json!({ "name": "b1", "key": "vb1", "tier": "b", "usage_limit": 250, "usage_window_seconds": 2592000 })).await;
    let (_, ca) = app.consumer("ca", &["a"]).await;
    let (_, cb) = app.consumer("cb", &["b"]).await;
    let (_, cab) = app.consumer("cab", &["a", "b"]).await;
    let (r1, r2, r3, r4) = tokio::join!(
        hammer(&app, "scrape", &ca, 16, 1000),
        hammer(&app, "scrape", &cb, 16, 1000),
        hammer(&app, "scrape", &cab, 16, 1000),
        hammer(&app, "scrape", ADMIN_TOKEN, 16, 1000),
    );
    let total = r1.0.len() + r2.0.len() + r3.0.len() + r4.0.len();
    // a1: min(100, 120) + a2: min(300, 120) + b1: 250
    assert_eq!(total, 100 + 120 + 250);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, total as i64);
    assert_eq!(app.count("SELECT SUM(usage_count) FROM keys").await, total as i64);
}
}

/// SQLite-only: the blocker is a second writer on the same file. Issue 7: the load pauses at
/// exact counts while the fault is put in place, so the outage always lands mid-load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_stay_exact_when_commits_fail_under_load() {
    let app = spawn_app_with(&[("DB_BUSY_TIMEOUT_MS", "50")]).await;
    app.create_tier("t", &[("scrape", 1_000_000, 3600)]).await;
    for i in 0..3 {
        app.add_key(json!({ "name": format!("k{i}"), "key": format!("v{i}"), "tier": "t", "usage_limit": 400 })).await;
    }
    let load = GatedLoad::start(&app, "scrape", 32, 300);
    // Block the database twice for longer than the busy timeout: after 300 and 900 serves,
    // each time until 32 requests were refused while the callers keep running.
    let blocker = app.db().await;
    for (at, next) in [(300, 600), (900, 32)] {
        load.wait_until("the serves before the outage", |l| l.served() == at)
            .await;
        let mut conn = blocker.acquire().await.expect("conn");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .expect("lock");
        let refused = load.unavailable();
        load.release(next);
        load.wait_until("503s during the outage", |l| {
            l.unavailable() >= refused + 32
        })
        .await;
        sqlx::query("ROLLBACK")
            .execute(&mut *conn)
            .await
            .expect("unlock");
    }
    blocker.close().await;
    let (served, unavailable) = load.finish().await;
    assert!(
        unavailable >= 64,
        "the blocker caused failed commits: {unavailable}"
    );
    assert_eq!(
        served, 1200,
        "failed serves were given back, so the whole budget is still served"
    );
    assert_eq!(app.count("SELECT SUM(usage_count) FROM keys").await, 1200);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 1200);
}
