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
