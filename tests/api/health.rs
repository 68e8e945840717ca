use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

on_both_drivers! {
async fn health_is_public_and_ok() {
    let app = spawn_app().await;
    let r = app.get("/health", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, json!({ "status": "ok" }));
}

async fn admin_health_counts_every_stored_key_and_reports_encryption() {
    let key = "ab".repeat(32);
    let app = spawn_app_with(&[("ENCRYPTION_KEY", &key)]).await;
    assert_eq!(app.admin_get("/admin/health").await.body, json!({ "pool_size": 0, "encryption": true }));
    app.create_tier("t", &[("scrape", 5, 60)]).await;
    app.add_key(json!({ "name": "k1", "key": "v1", "tier": "t" })).await;
    app.add_key(json!({ "name": "k2", "key": "v2", "tier": "t", "usage_limit": 1 })).await;
    assert_eq!(app.admin_get("/admin/health").await.body, json!({ "pool_size": 2, "encryption": true }));
    let unauth = app.get("/admin/health", None).await;
    assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
}

async fn unknown_routes_and_wrong_methods_answer_json() {
    let app = spawn_app().await;
    let r = app.get("/nope", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.error().is_empty());
    let r = app.admin_send(reqwest::Method::PUT, "/health", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!r.error().is_empty());
    let r = app.admin_send(reqwest::Method::DELETE, "/admin/tiers", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}
}
