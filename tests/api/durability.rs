//! What survives a restart, and what a failed commit does (SPEC §7: 503, count given back).

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

on_both_drivers! {
async fn restart_keeps_usage_counts_spent_budgets_and_secrets() {
    let mut app = spawn_app_with(&[("ENCRYPTION_KEY", &"5a".repeat(32))]).await;
    app.create_tier("t", &[("scrape", 1000, 60)]).await;
    app.add_key(json!({ "name": "spent", "key": "v-spent", "tier": "t", "usage_limit": 3 })).await;
    let live = app
        .add_key(json!({ "name": "live", "key": "v-live", "tier": "t", "usage_limit": 10, "secrets": { "s": "sec-live" } }))
        .await;
    let (_, token) = app.consumer("c", &["t"]).await;
    let mut served = 0;
    while app.draw("scrape", &token).await.status == StatusCode::OK {
        served += 1;
    }
    assert_eq!(served, 13);
    app.restart().await;
    assert_eq!(app.draw("scrape", &token).await.status, StatusCode::TOO_MANY_REQUESTS, "budgets stay spent");
    let keys = app.admin_get("/admin/keys").await;
    let counts: Vec<i64> = keys.body.as_array().unwrap().iter().map(|k| k["usage_count"].as_i64().unwrap()).collect();
    assert_eq!(counts, [10, 3], "live then spent, by name");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 13);

    // Raise nothing, add budget by a new key: the old consumer token still works after restart.
    app.add_key(json!({ "name": "more", "key": "v-more", "tier": "t" })).await;
    let r = app.draw("scrape", &token).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["value"], "v-more");
    app.restart().await;
    let keys = app.admin_get("/admin/keys").await;
    let live_row = keys.body.as_array().unwrap().iter().find(|k| k["id"] == live.as_str()).unwrap().clone();
    assert_eq!(live_row["secret_names"], json!(["s"]));
    assert_eq!(live_row["readable"], true);
}
}

#[tokio::test]
async fn a_failed_commit_answers_503_and_gives_the_count_back() {
    let app = spawn_app_with(&[("DB_BUSY_TIMEOUT_MS", "100")]).await;
    app.create_tier("t", &[("scrape", 5, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t", "usage_limit": 5 }))
        .await;
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);

    // Another writer holds the database longer than the busy timeout.
    let blocker = app.db().await;
    let mut conn = blocker.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .unwrap();
    for _ in 0..3 {
        let r = app.draw("scrape", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        assert!(r.error().contains("try again"));
        assert!(r.body.get("value").is_none());
    }
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    drop(conn);
    blocker.close().await;

    // Nothing was taken by the failures: four more serves fit in both the budget and the rate.
    for _ in 0..4 {
        assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    assert_eq!(
        app.draw("scrape", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(app.count("SELECT usage_count FROM keys").await, 5);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 5);
}

/// Holds the database's write lock from another connection for `hold`, as a long commit or a
/// checkpoint would; returns once the lock is taken. Both drivers write the same file.
async fn hold_write_lock(app: &TestApp, hold: std::time::Duration) -> tokio::task::JoinHandle<()> {
    let blocker = app.db().await;
    let mut conn = blocker.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
        drop(conn);
        blocker.close().await;
    })
}

/// A write timeout of 1 s and a commit that waits 1.5 s for the lock, within the busy timeout.
const SLOW_COMMIT: [(&str, &str); 2] = [
    ("SERVER_WRITE_TIMEOUT_SECONDS", "1"),
    ("DB_BUSY_TIMEOUT_MS", "5000"),
];
const LOCK_HELD: std::time::Duration = std::time::Duration::from_millis(1500);

on_both_drivers! {
// Issue 7 item 3: a serve counted before the write timeout is answered 200 once committed.
async fn a_serve_whose_commit_outlasts_the_write_timeout_is_answered_200_and_counted_once() {
    let app = spawn_app_with(&SLOW_COMMIT).await;
    app.create_tier("t", &[("scrape", 100, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    let holder = hold_write_lock(&app, LOCK_HELD).await;
    let r = app.draw("scrape", ADMIN_TOKEN).await;
    holder.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["value"], "v");
    assert_eq!(app.count("SELECT usage_count FROM keys").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 1);
}

// Issue 7 item 3: an admin write under way when the write timeout passes answers its true
// status, and memory matches the database.
async fn an_admin_write_whose_commit_outlasts_the_write_timeout_answers_its_true_status() {
    let app = spawn_app_with(&SLOW_COMMIT).await;
    app.create_tier("t", &[("scrape", 100, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    let holder = hold_write_lock(&app, LOCK_HELD).await;
    let r = app.admin_post("/admin/consumers", json!({ "name": "slow" })).await;
    holder.await.unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(app.count("SELECT COUNT(*) FROM consumers").await, 1);
    let id = r.body["id"].as_str().unwrap();
    let token = r.body["token"].as_str().unwrap();
    let grant = app.admin_post(&format!("/admin/consumers/{id}/scopes"), json!({ "tier": "t" })).await;
    assert_eq!(grant.status, StatusCode::CREATED, "{}", grant.text);
    assert_eq!(app.draw("scrape", token).await.status, StatusCode::OK);
}

// Issue 7 item 3: a client that disconnects while its admin write waits for the database
// leaves memory equal to the database (the write completes in both).
async fn an_admin_write_whose_client_disconnects_mid_write_leaves_memory_equal_to_the_database() {
    let app = spawn_app_with(&SLOW_COMMIT).await;
    let holder = hold_write_lock(&app, LOCK_HELD).await;
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let gone = impatient
        .post(app.url("/admin/consumers"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "name": "gone" }))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up before the answer");
    drop(impatient);
    holder.await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let stored = app.count("SELECT COUNT(*) FROM consumers WHERE name = 'gone'").await;
        let listed = app.admin_get("/admin/consumers").await.body.as_array().unwrap().len();
        if stored == 1 && listed == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "database {stored}, memory {listed}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
}

on_both_drivers! {
// Issue 7 item 1: the read-back of one tier, key or consumer (used after an unconfirmed admin
// write) returns exactly what the database holds, children included, and nothing for an unknown id.
async fn one_tier_key_or_consumer_reads_back_as_stored() {
    let app = spawn_app().await;
    let tier = app.create_tier("t", &[("scrape", 5, 60), ("search", 7, 120)]).await;
    let key = app
        .add_key(json!({ "name": "k", "key": "v", "tier": "t", "usage_limit": 9, "secrets": { "a": "1", "b": "2" } }))
        .await;
    let (consumer, _) = app.consumer("c", &["t"]).await;
    let config = keypooler::config::Config::from_vars(app.env.clone()).unwrap();
    let db = keypooler::store::Db::open(&config).await.unwrap();

    let tier_id = tier["id"].as_str().unwrap();
    let stored = db.read_tier(tier_id).await.unwrap().expect("tier");
    assert_eq!((stored.name.as_str(), stored.features.len()), ("t", 2));
    assert_eq!(stored.features["search"][0].rate_limit, 7);

    let stored = db.read_key(&key).await.unwrap().expect("key");
    assert_eq!((stored.name.as_str(), stored.tier_id.as_str(), stored.usage_limit), ("k", tier_id, Some(9)));
    let mut secrets: Vec<&str> = stored.secrets.iter().map(|(n, _)| n.as_str()).collect();
    secrets.sort();
    assert_eq!(secrets, ["a", "b"]);

    let stored = db.read_consumer(&consumer).await.unwrap().expect("consumer");
    assert_eq!((stored.name.as_str(), stored.scopes.clone()), ("c", vec![tier_id.to_string()]));

    assert!(db.read_tier("no-such-id").await.unwrap().is_none());
    assert!(db.read_key("no-such-id").await.unwrap().is_none());
    assert!(db.read_consumer("no-such-id").await.unwrap().is_none());
    db.close().await;
}
}
