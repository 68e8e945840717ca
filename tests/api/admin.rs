//! `/admin/*` resources: tiers, keys, consumers, scopes, usage — every row of SPEC §6.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

on_both_drivers! {
async fn tiers_are_created_listed_by_name_and_patched() {
    let app = spawn_app().await;
    let r = app
        .admin_post(
            "/admin/tiers",
            json!({ "name": "zeta", "description": "z", "features": { "scrape": { "rate_limit": 10 } } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["features"], json!({ "scrape": { "rate_limit": 10, "window_seconds": 60 } }));
    assert_eq!(r.body["description"], "z");
    assert!(r.body["id"].as_str().is_some_and(|id| id.len() == 36));
    app.create_tier("alpha", &[("search", 5, 0)]).await;

    let list = app.admin_get("/admin/tiers").await;
    assert_eq!(list.status, StatusCode::OK);
    let names: Vec<&str> = list.body.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "zeta"]);
    assert_eq!(list.body[0]["features"]["search"]["window_seconds"], 60, "0 means 60");

    let dup = app.admin_post("/admin/tiers", json!({ "name": "zeta", "features": { "a": { "rate_limit": 1 } } })).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert!(dup.error().contains("zeta"));

    let patched = app
        .admin_send(
            Method::PATCH,
            "/admin/tiers",
            Some(&json!({ "name": "zeta", "features": { "crawl": { "rate_limit": 2, "window_seconds": 30 } } })),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
    assert_eq!(patched.body["features"], json!({ "crawl": { "rate_limit": 2, "window_seconds": 30 } }));
    assert_eq!(patched.body["description"], "z", "description kept when not given");
    assert_eq!(patched.body["id"], r.body["id"]);
    let rows = app.count("SELECT COUNT(*) FROM tier_features").await;
    assert_eq!(rows, 2, "zeta's features replaced, alpha's kept");

    let missing = app
        .admin_send(Method::PATCH, "/admin/tiers", Some(&json!({ "name": "nope", "features": { "a": { "rate_limit": 1 } } })))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

async fn patched_features_take_effect_on_the_next_draw() {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 1, 60)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS);
    let body = json!({ "name": "t", "features": { "scrape": { "rate_limit": 3 }, "search": { "rate_limit": 1 } } });
    assert_eq!(app.admin_send(Method::PATCH, "/admin/tiers", Some(&body)).await.status, StatusCode::OK);
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    assert_eq!(app.draw("search", ADMIN_TOKEN).await.status, StatusCode::OK);
    let body = json!({ "name": "t", "features": { "search": { "rate_limit": 1 } } });
    assert_eq!(app.admin_send(Method::PATCH, "/admin/tiers", Some(&body)).await.status, StatusCode::OK);
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::NOT_FOUND);
}

async fn keys_are_added_listed_without_values_and_deleted_with_their_secrets() {
    let app = spawn_app().await;
    app.create_tier("fc", &[("scrape", 10, 60), ("search", 5, 30)]).await;
    let r = app
        .admin_post(
            "/admin/keys",
            json!({
                "name": "fc-01", "key": "fc-VALUE-1", "tier": "fc",
                "expires_at": "2099-01-02T03:04:05Z",
                "usage_limit": 1000, "usage_window_seconds": 2592000,
                "metadata": { "plan": "free", "n": 1 },
                "secrets": { "webhook_secret": "whsec-SECRET-1", "b": "x" }
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.body,
        json!({
            "id": id, "name": "fc-01", "tier": "fc", "expires_at": "2099-01-02T03:04:05Z",
            "usage_limit": 1000, "usage_window_seconds": 2592000,
            "metadata": { "plan": "free", "n": 1 }, "secret_names": ["b", "webhook_secret"]
        })
    );
    assert!(!r.text.contains("fc-VALUE-1") && !r.text.contains("whsec-SECRET-1"));

    let served = app.draw("scrape", ADMIN_TOKEN).await;
    assert_eq!(served.status, StatusCode::OK);

    let list = app.admin_get("/admin/keys").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text.contains("fc-VALUE-1") && !list.text.contains("whsec-SECRET-1"));
    let k = &list.body[0];
    assert_eq!(k["id"], id.as_str());
    assert_eq!(k["tier_id"], app.admin_get("/admin/tiers").await.body[0]["id"]);
    assert_eq!(k["is_active"], true);
    assert_eq!(k["usage_limit"], 1000);
    assert_eq!(k["usage_count"], 1);
    assert_eq!(k["secret_names"], json!(["b", "webhook_secret"]));
    assert_eq!(k["metadata"], json!({ "plan": "free", "n": 1 }));
    assert_eq!(k["usage"]["scrape"], json!({ "used": 1, "limit": 10, "window_seconds": 60 }));
    assert_eq!(k["usage"]["search"], json!({ "used": 0, "limit": 5, "window_seconds": 30 }));

    let unknown_tier = app.admin_post("/admin/keys", json!({ "name": "x", "key": "y", "tier": "nope" })).await;
    assert_eq!(unknown_tier.status, StatusCode::NOT_FOUND);

    let del = app.admin_send(Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(del.status, StatusCode::OK);
    assert_eq!(del.body, json!({ "status": "deleted" }));
    assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM key_secrets").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 1, "the audit log is kept");
    let again = app.admin_send(Method::DELETE, &format!("/admin/keys/{id}"), None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::TOO_MANY_REQUESTS, "deleted key is gone");
}

async fn values_are_sealed_at_rest_when_encryption_is_on() {
    let app = spawn_app_with(&[("ENCRYPTION_KEY", &"0f".repeat(32))]).await;
    app.create_tier("t", &[("scrape", 10, 60)]).await;
    app.add_key(json!({ "name": "k", "key": "plain-VALUE", "tier": "t", "secrets": { "s": "plain-SECRET" } })).await;
    let value = app.scalar("SELECT key_value FROM keys").await;
    let secret = app.scalar("SELECT value FROM key_secrets").await;
    assert!(value.starts_with("enc:gcm:") && secret.starts_with("enc:gcm:"));
    assert!(!value.contains("plain"));
    let served = app.draw("scrape", ADMIN_TOKEN).await;
    assert_eq!(served.body["value"], "plain-VALUE");
    assert_eq!(served.body["secrets"], json!({ "s": "plain-SECRET" }));
}

async fn consumers_get_a_token_once_and_list_without_it() {
    let app = spawn_app().await;
    app.create_tier("b-tier", &[("scrape", 10, 60)]).await;
    app.create_tier("a-tier", &[("search", 10, 60)]).await;
    let r = app.admin_post("/admin/consumers", json!({ "name": "runner", "description": "siphon" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["id"].as_str().unwrap().to_string();
    let token = r.body["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(r.body, json!({ "id": id, "name": "runner", "token": token }));

    let stored = app.scalar("SELECT token_hash FROM consumers").await;
    use sha2::Digest;
    assert_eq!(stored, hex::encode(sha2::Sha256::digest(token.as_bytes())));

    for tier in ["b-tier", "a-tier", "a-tier"] {
        let g = app.admin_post(&format!("/admin/consumers/{id}/scopes"), json!({ "tier": tier })).await;
        assert_eq!(g.status, StatusCode::CREATED, "granting twice is fine");
        assert_eq!(g.body, json!({ "consumer_id": id, "tier": tier }));
    }
    let list = app.admin_get("/admin/consumers").await;
    assert_eq!(
        list.body,
        json!([{ "id": id, "name": "runner", "description": "siphon", "is_active": true, "scopes": ["a-tier", "b-tier"] }])
    );
    assert!(!list.text.contains(&token) && !list.text.contains(&stored));

    let dup = app.admin_post("/admin/consumers", json!({ "name": "runner" })).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    let bad_tier = app.admin_post(&format!("/admin/consumers/{id}/scopes"), json!({ "tier": "nope" })).await;
    assert_eq!(bad_tier.status, StatusCode::NOT_FOUND);
    let bad_consumer = app.admin_post("/admin/consumers/nope/scopes", json!({ "tier": "a-tier" })).await;
    assert_eq!(bad_consumer.status, StatusCode::NOT_FOUND);

    let del = app.admin_send(Method::DELETE, &format!("/admin/consumers/{id}"), None).await;
    assert_eq!(del.status, StatusCode::OK);
    assert_eq!(del.body, json!({ "status": "deleted" }));
    assert_eq!(app.count("SELECT COUNT(*) FROM consumer_scopes").await, 0);
    assert_eq!(app.admin_send(Method::DELETE, &format!("/admin/consumers/{id}"), None).await.status, StatusCode::NOT_FOUND);
}

async fn usage_lists_newest_first_with_a_default_and_a_maximum() {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 10_000, 60)]).await;
    let key_id = app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    let (cid, token) = app.consumer("c", &["t"]).await;
    for i in 0..105 {
        let who = if i % 2 == 0 { ADMIN_TOKEN } else { token.as_str() };
        assert_eq!(app.draw("scrape", who).await.status, StatusCode::OK);
    }
    let r = app.admin_get("/admin/usage").await;
    assert_eq!(r.status, StatusCode::OK);
    let rows = r.body.as_array().unwrap();
    assert_eq!(rows.len(), 100, "default limit");
    assert_eq!(rows[0]["consumer_id"], "admin", "the 105th serve (admin) is newest");
    assert_eq!(rows[1]["consumer_id"], cid.as_str());
    assert_eq!(rows[0]["key_id"], key_id.as_str());
    assert_eq!(rows[0]["feature"], "scrape");
    let times: Vec<&str> = rows.iter().map(|r| r["created_at"].as_str().unwrap()).collect();
    assert!(times.iter().all(|t| t.ends_with('Z') && t.contains('T')), "RFC 3339");
    // Compare instants, not strings: RFC 3339 drops trailing zero fractions ("05Z", "05.12Z"),
    // so text order is not time order.
    let instants: Vec<chrono::DateTime<chrono::FixedOffset>> = times
        .iter()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339"))
        .collect();
    assert!(instants.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    assert_eq!(app.admin_get("/admin/usage?limit=3").await.body.as_array().unwrap().len(), 3);
    assert_eq!(app.admin_get("/admin/usage?limit=5000").await.body.as_array().unwrap().len(), 105);
    assert_eq!(app.admin_get("/admin/usage?limit=0").await.status, StatusCode::BAD_REQUEST);
}

async fn admin_routes_need_the_admin_token() {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 10, 60)]).await;
    let (_, token) = app.consumer("c", &["t"]).await;
    for path in ["/admin/tiers", "/admin/keys", "/admin/consumers", "/admin/usage", "/admin/health"] {
        assert_eq!(app.get(path, None).await.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(app.get(path, Some("wrong")).await.status, StatusCode::UNAUTHORIZED, "{path}");
        let r = app.get(path, Some(&token)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert!(!r.error().is_empty());
    }
}
}
