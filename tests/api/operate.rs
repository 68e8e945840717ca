//! Issue 10 items 1, 2 and 7 (SPEC §8.3): operating the pool over HTTP — PATCH a key (every
//! field, applied to the next `/key`), delete and rename tiers, change consumers, rotate their
//! tokens with a grace, revoke scopes; bad input on each; and the two concurrency guarantees.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const FUTURE: &str = "2099-01-01T00:00:00Z";

impl TestApp {
    async fn patch(&self, path: &str, body: Value) -> Resp {
        self.admin_send(Method::PATCH, path, Some(&body)).await
    }

    async fn delete(&self, path: &str) -> Resp {
        self.admin_send(Method::DELETE, path, None).await
    }

    /// The key as `GET /admin/keys` lists it.
    async fn listed_key(&self, id: &str) -> Value {
        let r = self.admin_get("/admin/keys").await;
        r.body
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    async fn listed_consumer(&self, id: &str) -> Value {
        let r = self.admin_get("/admin/consumers").await;
        r.body
            .as_array()
            .expect("consumers")
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Everything an operator can see, to show a refused request changed nothing.
    async fn everything(&self) -> Value {
        json!({
            "tiers": self.admin_get("/admin/tiers").await.body,
            "keys": self.admin_get("/admin/keys").await.body,
            "consumers": self.admin_get("/admin/consumers").await.body,
            "stored_keys": self.rows("SELECT id, name, key_value, tier_id, is_active, expires_at, usage_limit, usage_count, usage_window_seconds, metadata_json FROM keys ORDER BY id").await,
            "stored_secrets": self.rows("SELECT key_id, name, value FROM key_secrets ORDER BY key_id, name").await,
            "stored_consumers": self.rows("SELECT id, name, token_hash, description, is_active, previous_token_hash, previous_token_expires_at FROM consumers ORDER BY id").await,
            "stored_scopes": self.rows("SELECT consumer_id, tier_id FROM consumer_scopes ORDER BY consumer_id, tier_id").await,
            "stored_tiers": self.rows("SELECT id, name, description FROM tiers ORDER BY id").await,
        })
    }
}

/// A pool of tier `t1` (features f, h) and `t2` (feature g), one key in t1, a consumer on both.
async fn small_pool(app: &TestApp) -> (String, String, String) {
    app.create_tier("t1", &[("f", 1000, 60), ("h", 1000, 60)])
        .await;
    app.create_tier("t2", &[("g", 1000, 60)]).await;
    let key = app
        .add_key(json!({
            "name": "k", "key": "v1", "tier": "t1",
            "metadata": { "x": 1 },
            "secrets": { "a": "a1", "b": "b1" },
        }))
        .await;
    let (consumer, token) = app.consumer("c", &["t1", "t2"]).await;
    (key, consumer, token)
}

on_both_drivers! {

// Issue 10 item 1: every field of PATCH /admin/keys/{id} applies to the very next /key, and
// the usage count is kept unless `reset_usage`; everything survives a restart.
async fn patching_every_key_field_applies_to_the_next_key() {
    let mut app = spawn_app().await;
    let (key, _, token) = small_pool(&app).await;
    let path = format!("/admin/keys/{key}");
    assert_eq!(app.draw("f", &token).await.body["value"], "v1");

    let r = app
        .patch(&path, json!({
            "name": "k2", "key": "v2", "metadata": { "y": 2 },
            "secrets": { "a": "a2", "b": null, "c": "c2" },
            "expires_at": FUTURE, "usage_limit": 5, "usage_window_seconds": 3600,
        }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["name"], "k2");
    assert_eq!(r.body["usage_limit"], 5);
    assert_eq!(r.body["usage_window_seconds"], 3600);
    assert_eq!(r.body["secret_names"], json!(["a", "c"]));
    assert_eq!(r.body["usage_count"], 1, "usage kept: {}", r.text);
    assert!(!r.text.contains("\"v2\"") && !r.text.contains("\"a2\""), "no value or secret echoed");

    let d = app.draw("f", &token).await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.text);
    assert_eq!(d.body["value"], "v2");
    assert_eq!(d.body["metadata"], json!({ "y": 2 }));
    assert_eq!(d.body["secrets"], json!({ "a": "a2", "c": "c2" }));
    assert_eq!(app.listed_key(&key).await["usage_count"], 2);

    // The new budget holds from the next serve: 5 in all, 2 used.
    for _ in 0..3 {
        assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
    }
    assert_eq!(app.draw("f", &token).await.status, StatusCode::TOO_MANY_REQUESTS);

    // reset_usage: counting starts over, in memory and stored.
    let r = app.patch(&path, json!({ "reset_usage": true })).await;
    assert_eq!((r.status, r.body["usage_count"].clone()), (StatusCode::OK, json!(0)), "{}", r.text);
    assert_eq!(app.count(&format!("SELECT usage_count FROM keys WHERE id = '{key}'")).await, 0);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);

    // Lifting the limits (null) and the expiry.
    let r = app
        .patch(&path, json!({ "usage_limit": null, "usage_window_seconds": null, "expires_at": null }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!((r.body["usage_limit"].clone(), r.body["expires_at"].clone()), (Value::Null, Value::Null));
    for _ in 0..6 {
        assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
    }

    // is_active: disabled keys are not served, enabled ones are.
    assert_eq!(app.patch(&path, json!({ "is_active": false })).await.body["is_active"], false);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.patch(&path, json!({ "is_active": true })).await.body["is_active"], true);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);

    // Tier move: served for t2's feature, no longer for t1's.
    let r = app.patch(&path, json!({ "tier": "t2" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.draw("g", &token).await.body["key_id"], key.as_str());
    assert_eq!(app.draw("f", &token).await.status, StatusCode::TOO_MANY_REQUESTS);

    let served = app.count(&format!("SELECT COUNT(*) FROM usage_events WHERE key_id = '{key}'")).await;
    let listed = app.listed_key(&key).await;
    app.restart().await;
    let after = app.listed_key(&key).await;
    assert_eq!(after["name"], "k2");
    assert_eq!(after["tier"], "t2");
    assert_eq!(after["usage_count"], listed["usage_count"]);
    assert_eq!(listed["usage_count"], served - 5, "the 5 serves before the reset are not counted");
    let d = app.draw("g", &token).await;
    assert_eq!((d.body["value"].clone(), d.body["secrets"].clone()), (json!("v2"), json!({ "a": "a2", "c": "c2" })));
}

// Issue 10 item 1: a rotated value and set secrets are sealed under the current encryption key.
async fn rotated_values_are_sealed_under_the_encryption_key() {
    let app = spawn_app_with(&[("ENCRYPTION_KEY", &"ab".repeat(32))]).await;
    let (key, _, token) = small_pool(&app).await;
    let r = app
        .patch(&format!("/admin/keys/{key}"), json!({ "key": "rotated-value", "secrets": { "a": "new-secret" } }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let stored = app.scalar(&format!("SELECT key_value FROM keys WHERE id = '{key}'")).await;
    assert!(stored.starts_with("enc:gcm:") && !stored.contains("rotated"), "{stored}");
    let secret = app.scalar(&format!("SELECT value FROM key_secrets WHERE key_id = '{key}' AND name = 'a'")).await;
    assert!(secret.starts_with("enc:gcm:"), "{secret}");
    let d = app.draw("f", &token).await;
    assert_eq!((d.body["value"].clone(), d.body["secrets"]["a"].clone()), (json!("rotated-value"), json!("new-secret")));
}

// Issue 10 item 7: bad PATCH bodies answer 4xx naming the field and change nothing.
async fn bad_key_patches_name_the_field_and_change_nothing() {
    let app = spawn_app().await;
    let (key, _, _) = small_pool(&app).await;
    let path = format!("/admin/keys/{key}");
    let before = app.everything().await;
    for (body, status, needle) in [
        (json!({}), 400, "nothing to change"),
        (json!({ "name": null }), 400, "name must not be null"),
        (json!({ "key": null }), 400, "key must not be null"),
        (json!({ "tier": null }), 400, "tier must not be null"),
        (json!({ "is_active": null }), 400, "is_active"),
        (json!({ "metadata": null }), 400, "metadata"),
        (json!({ "secrets": null }), 400, "secrets"),
        (json!({ "reset_usage": null }), 400, "reset_usage"),
        (json!({ "name": 5 }), 400, "name must be a string"),
        (json!({ "key": "" }), 400, "key must not be empty"),
        (json!({ "usage_limit": "5" }), 400, "usage_limit"),
        (json!({ "usage_limit": 1.5 }), 400, "usage_limit"),
        (json!({ "usage_limit": 0 }), 400, "usage_limit"),
        (json!({ "usage_window_seconds": 60 }), 400, "usage_window_seconds needs a usage_limit"),
        (json!({ "expires_at": "2001-01-01T00:00:00Z" }), 400, "expires_at"),
        (json!({ "expires_at": 5 }), 400, "expires_at"),
        (json!({ "metadata": [1] }), 400, "metadata"),
        (json!({ "secrets": { "a": 1 } }), 400, "secrets.a"),
        (json!({ "secrets": { "a": "" } }), 400, "secret 'a'"),
        (json!({ "secrets": { " ": "x" } }), 400, "secret name"),
        (json!({ "colour": "red" }), 400, "colour"),
        // A valid field beside a bad one: nothing of it is applied.
        (json!({ "name": "renamed", "usage_limit": -1 }), 400, "usage_limit"),
        (json!({ "name": "renamed", "tier": "nope" }), 404, "no tier named 'nope'"),
    ] {
        let r = app.patch(&path, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    let r = app.patch(&format!("/admin/keys/{}", uuid::Uuid::new_v4()), json!({ "name": "x" })).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no key with that id"));
    let r = app.admin_raw(Method::PATCH, &path, "[1]").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // A limit set with a window, then the limit alone lifted: refused, names both.
    let ok = app.patch(&path, json!({ "usage_limit": 9, "usage_window_seconds": 60 })).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let r = app.patch(&path, json!({ "usage_limit": null })).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.error().contains("usage_window_seconds"), "{}", r.text);
    let r = app.patch(&path, json!({ "usage_limit": null, "usage_window_seconds": null })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.everything().await["stored_keys"], before["stored_keys"]);
    assert_eq!(app.everything().await["stored_secrets"], before["stored_secrets"]);
}

// Issue 10 item 2: a tier in use is not deleted (409 naming its keys and consumers) unless
// forced; forced, its features, keys, secrets and scopes go in one transaction, audit rows stay.
async fn deleting_a_tier_in_use_needs_force_and_keeps_the_audit() {
    let app = spawn_app().await;
    let (key, consumer, token) = small_pool(&app).await;
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
    let before = app.everything().await;
    let r = app.delete("/admin/tiers/t1").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert!(r.error().contains("1 key(s)") && r.error().contains("'c'"), "{}", r.text);
    for query in ["?force=yes", "?force=1"] {
        let r = app.delete(&format!("/admin/tiers/t1{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert!(r.error().contains("force"), "{}", r.text);
    }
    let r = app.delete("/admin/tiers/nope?force=true").await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no tier named 'nope'"));
    assert_eq!(app.everything().await, before, "nothing changed");

    let r = app.delete("/admin/tiers/t1?force=true").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({ "status": "deleted", "keys": 1, "scopes": 1 }));
    assert_eq!(app.draw("f", &token).await.status, StatusCode::NOT_FOUND);
    assert!(app.listed_key(&key).await.is_null());
    assert_eq!(app.listed_consumer(&consumer).await["scopes"], json!(["t2"]));
    for (table, column) in [("keys", "id"), ("key_secrets", "key_id")] {
        assert_eq!(app.count(&format!("SELECT COUNT(*) FROM {table} WHERE {column} = '{key}'")).await, 0);
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM tiers WHERE name = 't1'").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM tier_features WHERE feature = 'f'").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM consumer_scopes").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 1, "audit rows stay");

    // An unused tier goes without force; a tier of that name can be made again.
    let r = app.admin_post(&format!("/admin/consumers/{consumer}/scopes"), json!({ "tier": "t2" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    app.create_tier("t3", &[("f", 5, 60)]).await;
    assert_eq!(app.delete("/admin/tiers/t3").await.body, json!({ "status": "deleted", "keys": 0, "scopes": 0 }));
    app.create_tier("t1", &[("f", 5, 60)]).await;
}

// Issue 10 item 7: a tier rename is validated like a name, and colliding with another tier's
// name answers 409 naming it; a rename keeps the tier's keys and scopes.
async fn renaming_a_tier_keeps_its_keys_and_refuses_a_taken_name() {
    let app = spawn_app().await;
    let (key, consumer, token) = small_pool(&app).await;
    let features = json!({ "f": { "rate_limit": 1000 }, "h": { "rate_limit": 1000 } });
    let before = app.everything().await;
    let r = app.patch("/admin/tiers", json!({ "name": "t1", "new_name": "t2", "features": features })).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert!(r.error().contains("new_name") && r.error().contains("'t2'"), "{}", r.text);
    for bad in [json!(""), json!(5), json!("a\u{7}")] {
        let r = app.patch("/admin/tiers", json!({ "name": "t1", "new_name": bad, "features": features })).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
        assert!(r.error().contains("new_name"), "{}", r.text);
    }
    assert_eq!(app.everything().await, before, "nothing changed");

    let r = app.patch("/admin/tiers", json!({ "name": "t1", "new_name": "renamed", "features": features })).await;
    assert_eq!((r.status, r.body["name"].clone()), (StatusCode::OK, json!("renamed")), "{}", r.text);
    assert_eq!(app.listed_key(&key).await["tier"], "renamed");
    assert_eq!(app.listed_consumer(&consumer).await["scopes"], json!(["renamed", "t2"]));
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
    let r = app.admin_post("/admin/keys", json!({ "name": "k9", "key": "v9", "tier": "t1" })).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the old name is free: {}", r.text);
}

// Issue 10 item 2: PATCH /admin/consumers/{id} — name, description, is_active (an inactive
// consumer's token is refused like an unknown one, 401); bad input changes nothing.
async fn patching_a_consumer_applies_to_its_next_request() {
    let app = spawn_app().await;
    let (_, consumer, token) = small_pool(&app).await;
    app.consumer("other", &[]).await;
    let path = format!("/admin/consumers/{consumer}");
    let before = app.everything().await;
    for (body, status, needle) in [
        (json!({}), 400, "nothing to change"),
        (json!({ "name": null }), 400, "name must not be null"),
        (json!({ "description": null }), 400, "description must not be null"),
        (json!({ "is_active": null }), 400, "is_active must not be null"),
        (json!({ "is_active": "no" }), 400, "is_active"),
        (json!({ "name": 1 }), 400, "name must be a string"),
        (json!({ "name": "" }), 400, "name"),
        (json!({ "description": "d".repeat(2001) }), 400, "description"),
        (json!({ "token": "x" }), 400, "token"),
        (json!({ "name": "other" }), 409, "'other'"),
        (json!({ "name": "fine", "is_active": 0 }), 400, "is_active"),
    ] {
        let r = app.patch(&path, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    let r = app.patch(&format!("/admin/consumers/{}", uuid::Uuid::new_v4()), json!({ "is_active": false })).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no consumer with that id"));
    assert_eq!(app.everything().await, before, "nothing changed");

    let r = app.patch(&path, json!({ "name": "c2", "description": "runner", "is_active": false })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["name"], "c2");
    assert_eq!(r.body["description"], "runner");
    assert_eq!(r.body["is_active"], false);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.patch(&path, json!({ "is_active": true })).await.status, StatusCode::OK);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
    assert_eq!(app.listed_consumer(&consumer).await["name"], "c2");
}

// Issue 10 item 2: a rotated token is shown once; the old one works for the grace — also after
// a restart inside it — then only the new one; grace out of range is refused.
async fn token_rotation_keeps_the_old_token_for_the_grace_only() {
    let mut app = spawn_app().await;
    let (_, consumer, old) = small_pool(&app).await;
    let path = format!("/admin/consumers/{consumer}/token");
    let before = app.everything().await;
    for bad in [json!(-1), json!(2_592_001), json!(1.5), json!("5"), json!(true)] {
        let r = app.admin_post(&path, json!({ "grace_seconds": bad })).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
        assert!(r.error().contains("grace_seconds"), "{bad}: {}", r.text);
    }
    let r = app.admin_post(&path, json!({ "grace": 5 })).await;
    assert!(r.status == StatusCode::BAD_REQUEST && r.error().contains("grace"), "{}", r.text);
    let r = app.admin_post(&format!("/admin/consumers/{}/token", uuid::Uuid::new_v4()), json!({})).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no consumer with that id"));
    assert_eq!(app.everything().await, before, "nothing changed");

    let grace = 3;
    let r = app.admin_post(&path, json!({ "grace_seconds": grace })).await;
    let rotated_at = Instant::now();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new = r.body["token"].as_str().expect("token").to_string();
    assert_eq!(new.len(), 64);
    assert_ne!(new, old);
    assert!(r.body["previous_token_expires_at"].is_string(), "{}", r.text);
    assert!(!app.admin_get("/admin/consumers").await.text.contains(&new), "never listed");
    assert_eq!(app.draw("f", &old).await.status, StatusCode::OK);
    assert_eq!(app.draw("f", &new).await.status, StatusCode::OK);

    app.restart().await;
    if rotated_at.elapsed() < Duration::from_secs(grace) {
        assert_eq!(app.draw("f", &old).await.status, StatusCode::OK, "kept across a restart inside the grace");
    } else {
        eprintln!("LOUD: the restart took longer than the grace; the old token's survival across it was not observed");
    }
    assert_eq!(app.draw("f", &new).await.status, StatusCode::OK);
    // Bounded wait for the grace to end.
    let deadline = rotated_at + Duration::from_secs(grace + 10);
    loop {
        let r = app.draw("f", &old).await;
        if r.status == StatusCode::UNAUTHORIZED {
            assert!(rotated_at.elapsed() >= Duration::from_secs(grace) - Duration::from_millis(50));
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
        assert!(Instant::now() < deadline, "the old token still works after its grace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.draw("f", &new).await.status, StatusCode::OK);

    // No grace (the default): the old token stops at once.
    let r = app.admin_post(&path, json!({})).await;
    assert_eq!((r.status, r.body["previous_token_expires_at"].clone()), (StatusCode::OK, Value::Null));
    let newest = r.body["token"].as_str().expect("token").to_string();
    assert_eq!(app.draw("f", &new).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.draw("f", &newest).await.status, StatusCode::OK);
}

// Issue 10 item 2: revoking a scope applies to the next /key; revoking one not granted, or for
// an unknown consumer or tier, is a 404 saying which.
async fn revoking_a_scope_applies_to_the_next_key() {
    let app = spawn_app().await;
    let (_, consumer, token) = small_pool(&app).await;
    let path = format!("/admin/consumers/{consumer}/scopes/t1");
    let r = app.delete(&path).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.listed_consumer(&consumer).await["scopes"], json!(["t2"]));
    assert_eq!(app.count(&format!("SELECT COUNT(*) FROM consumer_scopes WHERE consumer_id = '{consumer}'")).await, 1);
    let before = app.everything().await;
    let r = app.delete(&path).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "consumer 'c' holds no scope on tier 't1'"));
    let r = app.delete(&format!("/admin/consumers/{consumer}/scopes/nope")).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no tier named 'nope'"));
    let r = app.delete(&format!("/admin/consumers/{}/scopes/t1", uuid::Uuid::new_v4())).await;
    assert_eq!((r.status, r.error()), (StatusCode::NOT_FOUND, "no consumer with that id"));
    assert_eq!(app.everything().await, before, "nothing changed");
    let r = app.admin_post(&format!("/admin/consumers/{consumer}/scopes"), json!({ "tier": "t1" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
}

// Issue 10 (concurrency): PATCHes rotating the value and changing the limit, racing many
// concurrent /key on the same key, never serve a mix of old and new (value and secret always
// from one version) and never exceed the limit in force: every 200 is counted and audited.
async fn concurrent_patches_and_draws_never_mix_versions_or_exceed_limits() {
    let app = Arc::new(spawn_app().await);
    app.create_tier("t", &[("f", 1_000_000, 60)]).await;
    let key = app
        .add_key(json!({ "name": "k", "key": "v0", "tier": "t", "usage_limit": 40, "secrets": { "s": "v0-s" } }))
        .await;
    let done = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..12 {
        let (app, done) = (app.clone(), done.clone());
        callers.push(tokio::spawn(async move {
            let mut served: Vec<(String, String)> = Vec::new();
            let mut refused = 0;
            // Until refused once the last PATCH is in force, however long the PATCHes take on
            // this machine (a fixed number of tries ran out before them on a loaded one). In
            // force: the draw was sent after the last PATCH was answered. A 429 to a draw sent
            // before it may predate it.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                assert!(std::time::Instant::now() < deadline, "the PATCHes never finished");
                let sent_after_last_patch = done.load(Ordering::SeqCst);
                let r = app.draw("f", ADMIN_TOKEN).await;
                match r.status {
                    StatusCode::OK => served.push((
                        r.body["value"].as_str().expect("value").to_string(),
                        r.body["secrets"]["s"].as_str().expect("secret").to_string(),
                    )),
                    StatusCode::TOO_MANY_REQUESTS => {
                        refused += 1;
                        if sent_after_last_patch {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    other => panic!("unexpected {other}: {}", r.text),
                }
            }
            (served, refused)
        }));
    }
    let path = format!("/admin/keys/{key}");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = app.patch(&path, json!({ "key": "v1", "secrets": { "s": "v1-s" }, "usage_limit": 30 })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = app.patch(&path, json!({ "key": "v2", "secrets": { "s": "v2-s" }, "usage_limit": 70 })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    done.store(true, Ordering::SeqCst);
    let mut by_value: HashMap<String, usize> = HashMap::new();
    for caller in callers {
        let (served, _) = caller.await.expect("caller");
        for (value, secret) in served {
            assert_eq!(secret, format!("{value}-s"), "a serve mixed versions");
            *by_value.entry(value).or_default() += 1;
        }
    }
    let count = |v: &str| by_value.get(v).copied().unwrap_or(0);
    let total: usize = by_value.values().sum();
    assert!(count("v0") <= 40, "{by_value:?}");
    assert!(count("v0") + count("v1") <= 40, "v1 served only below 30: {by_value:?}");
    assert_eq!(total, 70, "the final limit is reached exactly: {by_value:?}");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 70);
    assert_eq!(app.count(&format!("SELECT usage_count FROM keys WHERE id = '{key}'")).await, 70);
    assert_eq!(app.listed_key(&key).await["usage_count"], 70);
}

// Issue 10 (concurrency): rotating a consumer's token with a grace while it draws under load
// drops no request that used a valid token (old or new).
async fn token_rotation_under_load_drops_no_valid_request() {
    let app = Arc::new(spawn_app().await);
    app.create_tier("t", &[("f", 1_000_000, 60)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    let (consumer, old) = app.consumer("c", &["t"]).await;
    let current = Arc::new(parking_lot::Mutex::new(old.clone()));
    let rotated = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for i in 0..12 {
        let (app, current, rotated, old) = (app.clone(), current.clone(), rotated.clone(), old.clone());
        callers.push(tokio::spawn(async move {
            let (mut ok, mut after) = (0usize, 0usize);
            while after < 20 {
                // Half the callers switch to the new token once it exists; half keep the old
                // one, which its grace keeps valid.
                let token = if i % 2 == 0 { current.lock().clone() } else { old.clone() };
                let r = app.draw("f", &token).await;
                assert_eq!(r.status, StatusCode::OK, "a valid token was refused: {}", r.text);
                ok += 1;
                if rotated.load(Ordering::SeqCst) {
                    after += 1;
                }
            }
            ok
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = app.admin_post(&format!("/admin/consumers/{consumer}/token"), json!({ "grace_seconds": 60 })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    *current.lock() = r.body["token"].as_str().expect("token").to_string();
    rotated.store(true, Ordering::SeqCst);
    let mut total = 0;
    for caller in callers {
        total += caller.await.expect("caller");
    }
    assert_eq!(app.draw("f", &old).await.status, StatusCode::OK, "still inside the grace");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, total as i64 + 1);
}

}

// Issue 10 items 1–2 on the remote driver: a change whose COMMIT answer is lost is read back,
// answered as applied, and memory follows (two answers are lost, so a retry would lose too).
mod lost_commit_answers {
    use super::*;
    use crate::remote::remote;

    async fn app_losing_answers() -> (TestApp, String, String, String) {
        let app = BACKEND.scope(Backend::Libsql, spawn_app()).await;
        let (key, consumer, token) = small_pool(&app).await;
        app.audit_indexed().await;
        remote(&app).await.lose_commit_answers(2);
        (app, key, consumer, token)
    }

    async fn stop_losing(app: &TestApp) {
        remote(app).await.lose_commit_answers(0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_patch_is_read_back_and_applies() {
        let (app, key, _, token) = app_losing_answers().await;
        let r = app
            .patch(
                &format!("/admin/keys/{key}"),
                json!({ "key": "v9", "name": "k9" }),
            )
            .await;
        stop_losing(&app).await;
        assert_eq!(
            (r.status, r.body["name"].clone()),
            (StatusCode::OK, json!("k9")),
            "{}",
            r.text
        );
        assert_eq!(app.draw("f", &token).await.body["value"], "v9");
        assert_eq!(
            app.scalar(&format!("SELECT key_value FROM keys WHERE id = '{key}'"))
                .await,
            "v9"
        );
    }

    // A key patch whose COMMIT never landed is read back as not applied: 503, nothing changed,
    // the key still served as before (and not left paused by a reset).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_patch_that_never_landed_changes_nothing() {
        let (app, key, _, token) = app_losing_answers().await;
        stop_losing(&app).await;
        assert_eq!(app.draw("f", &token).await.status, StatusCode::OK);
        app.audit_indexed().await;
        remote(&app).await.drop_commits(1);
        let r = app
            .patch(&format!("/admin/keys/{key}"), json!({ "key": "v9" }))
            .await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        assert!(r.error().contains("nothing was changed"), "{}", r.text);
        assert_eq!(app.draw("f", &token).await.body["value"], "v1");
        assert_eq!(
            app.scalar(&format!("SELECT key_value FROM keys WHERE id = '{key}'"))
                .await,
            "v1"
        );
        let r = app
            .patch(&format!("/admin/keys/{key}"), json!({ "key": "v9" }))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(app.draw("f", &token).await.body["value"], "v9");
        assert_eq!(
            app.listed_key(&key).await["usage_count"],
            3,
            "usage kept throughout"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_forced_tier_delete_is_read_back_and_applies() {
        let (app, _, _, token) = app_losing_answers().await;
        let r = app.delete("/admin/tiers/t1?force=true").await;
        stop_losing(&app).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(app.draw("f", &token).await.status, StatusCode::NOT_FOUND);
        assert_eq!(app.count("SELECT COUNT(*) FROM keys").await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_rotation_is_read_back_and_both_tokens_work() {
        let (app, _, consumer, old) = app_losing_answers().await;
        let r = app
            .admin_post(
                &format!("/admin/consumers/{consumer}/token"),
                json!({ "grace_seconds": 60 }),
            )
            .await;
        stop_losing(&app).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let new = r.body["token"].as_str().expect("token");
        assert_eq!(app.draw("f", new).await.status, StatusCode::OK);
        assert_eq!(app.draw("f", &old).await.status, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_patch_and_a_scope_revoke_are_read_back_and_apply() {
        let (app, _, consumer, token) = app_losing_answers().await;
        let r = app
            .delete(&format!("/admin/consumers/{consumer}/scopes/t1"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(app.draw("f", &token).await.status, StatusCode::FORBIDDEN);
        app.audit_indexed().await;
        remote(&app).await.lose_commit_answers(2);
        let r = app
            .patch(
                &format!("/admin/consumers/{consumer}"),
                json!({ "is_active": false }),
            )
            .await;
        stop_losing(&app).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(app.draw("g", &token).await.status, StatusCode::UNAUTHORIZED);
    }
}

// Issue 10 item 7: the new bodies are documented with the limits the handlers check.
#[tokio::test]
async fn new_bodies_are_documented_with_their_limits() {
    let app = spawn_app().await;
    let schemas = app.get("/openapi.json", None).await.body["components"]["schemas"].clone();
    let patch = &schemas["KeyPatch"];
    assert_eq!(patch["minProperties"], 1, "{patch}");
    assert_eq!(patch["additionalProperties"], false, "{patch}");
    assert!(patch.get("required").is_none(), "{patch}");
    assert_eq!(
        patch["properties"]["usage_limit"]["type"],
        json!(["integer", "null"])
    );
    assert_eq!(
        patch["properties"]["name"]["type"], "string",
        "null is refused: {patch}"
    );
    let consumer = &schemas["ConsumerPatch"];
    assert_eq!(consumer["minProperties"], 1, "{consumer}");
    assert!(consumer.get("required").is_none(), "{consumer}");
    let grace = &schemas["TokenBody"]["properties"]["grace_seconds"];
    assert_eq!(
        (grace["minimum"].clone(), grace["maximum"].clone()),
        (json!(0), json!(2_592_000)),
        "{grace}"
    );
    assert_eq!(
        schemas["TierPatchBody"]["properties"]["new_name"]["maxLength"],
        200
    );
}
