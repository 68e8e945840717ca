//! Issue 9 (SPEC §8.2): outcome reports over HTTP and the key health they drive — serve ids,
//! who may report, first report wins, the window, each class's effect on drawing, host-level
//! throttling, the operator's PATCH, persistence across restarts, and bad input.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

impl TestApp {
    /// `POST /serves/{serve_id}/outcome` as `token`.
    pub async fn report(&self, serve_id: &str, token: &str, body: Value) -> Resp {
        let req = self
            .client
            .post(self.url(&format!("/serves/{serve_id}/outcome")))
            .bearer_auth(token)
            .json(&body);
        self.send(req).await
    }

    /// A served key's (key_id, serve_id); panics unless the draw is a 200.
    pub async fn serve(&self, feature: &str, token: &str) -> (String, String) {
        let r = self.draw(feature, token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let key = r.body["key_id"].as_str().expect("key_id").to_string();
        let serve = r.body["serve_id"].as_str().expect("serve_id").to_string();
        (key, serve)
    }

    /// The `health` object `GET /admin/keys` shows for `key_id`.
    pub async fn health_of(&self, key_id: &str) -> Value {
        let keys = self.admin_get("/admin/keys").await;
        keys.body
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["id"] == key_id)
            .unwrap_or_else(|| panic!("key {key_id} in {}", keys.text))["health"]
            .clone()
    }

    /// Draws until `key_id` is served or `limit` draws passed; whether it was served.
    pub async fn serves_key(&self, feature: &str, key_id: &str, limit: usize) -> bool {
        for _ in 0..limit {
            let r = self.draw(feature, ADMIN_TOKEN).await;
            if r.status == StatusCode::OK && r.body["key_id"] == key_id {
                return true;
            }
        }
        false
    }
}

/// A tier `t` with feature `f` (generous rate), `n` keys, and a consumer scoped to it.
async fn pool_of(app: &TestApp, n: usize) -> (Vec<String>, String) {
    app.create_tier("t", &[("f", 10_000, 60)]).await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            app.add_key(
                json!({ "name": format!("k{i}"), "key": format!("value-{i}"), "tier": "t" }),
            )
            .await,
        );
    }
    let (_, token) = app.consumer("runner", &["t"]).await;
    (ids, token)
}

/// Draws until a serve of `key_id` comes back; its serve id.
async fn serve_of(app: &TestApp, token: &str, key_id: &str) -> String {
    for _ in 0..200 {
        let (key, serve) = app.serve("f", token).await;
        if key == key_id {
            return serve;
        }
    }
    panic!("key {key_id} was never served");
}

/// Sends one report per serve id, all at once; the statuses.
async fn report_all(app: &TestApp, serves: &[String], token: &str, body: Value) -> Vec<StatusCode> {
    let mut set = tokio::task::JoinSet::new();
    for serve in serves {
        let req = app
            .client
            .post(app.url(&format!("/serves/{serve}/outcome")))
            .bearer_auth(token)
            .json(&body);
        set.spawn(async move { req.send().await.expect("report sent").status() });
    }
    set.join_all().await
}

/// Polls `check` every 50 ms until it holds or `within` passes (bounded, never a long sleep).
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_drivers! {
// Issue 9 item 1: serve ids, the answer, the audit row and /admin/usage.
async fn a_report_is_recorded_on_the_serves_audit_row_and_listed() {
    let app = spawn_app().await;
    let (ids, token) = pool_of(&app, 1).await;
    let (key, serve) = app.serve("f", &token).await;
    assert_eq!(key, ids[0]);
    let stored = app.count(&format!("SELECT COUNT(*) FROM usage_events WHERE id = '{serve}'")).await;
    assert_eq!(stored, 1, "serve_id is the usage_events id");

    let r = app.report(&serve, &token, json!({ "status": 200 })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({ "serve_id": serve, "class": "ok", "key_state": "active" }));

    let usage = app.admin_get("/admin/usage").await;
    let row = &usage.body[0];
    assert_eq!(row["id"], serve);
    assert_eq!(row["outcome"]["class"], "ok");
    assert_eq!(row["outcome"]["status"], 200);
    assert!(row["outcome"]["reported_at"].is_string(), "{}", usage.text);

    // A serve without a report lists outcome null.
    let (_, unreported) = app.serve("f", &token).await;
    let usage = app.admin_get("/admin/usage").await;
    let row = usage.body.as_array().unwrap().iter().find(|r| r["id"] == unreported).unwrap().clone();
    assert_eq!(row["outcome"], Value::Null);
}

// Issue 9 item 1: the first report wins; the same again is 200, another is 409.
async fn first_report_wins_same_again_is_200_different_is_409() {
    let app = spawn_app().await;
    let (_, token) = pool_of(&app, 1).await;
    let (_, serve) = app.serve("f", &token).await;
    let first = app.report(&serve, &token, json!({ "status": 500 })).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["class"], "upstream_error");
    let again = app.report(&serve, &token, json!({ "status": 500 })).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    let other = app.report(&serve, &token, json!({ "status": 200 })).await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.text);
    assert!(other.error().contains("upstream_error"), "{}", other.text);
    let stored = app.rows(&format!("SELECT outcome_class, outcome_status FROM usage_events WHERE id = '{serve}'")).await;
    assert_eq!(stored, vec![vec![Some("upstream_error".into()), Some("500".into())]]);
}

// Issue 9 item 1: only the consumer that received the serve (or admin) may report; anyone
// else gets exactly the 404 of an unknown id.
async fn a_report_from_another_consumer_is_a_404_like_an_unknown_serve() {
    let app = spawn_app().await;
    let (_, token) = pool_of(&app, 1).await;
    let (_, other) = app.consumer("other", &["t"]).await;
    let (_, serve) = app.serve("f", &token).await;
    let foreign = app.report(&serve, &other, json!({ "status": 401 })).await;
    let unknown = app.report(&uuid::Uuid::now_v7().to_string(), &other, json!({ "status": 401 })).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    assert_eq!((foreign.status, foreign.body.clone()), (unknown.status, unknown.body.clone()));
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events WHERE outcome_class IS NOT NULL").await, 0);
    // Admin may report on anyone's serve; no token is a 401.
    assert_eq!(app.report(&serve, ADMIN_TOKEN, json!({ "status": 200 })).await.status, StatusCode::OK);
    let anonymous = app.send(app.client.post(app.url(&format!("/serves/{serve}/outcome"))).json(&json!({"status": 200}))).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

// Issue 9 item 2: bad input is a 400 naming the field; nothing is recorded.
async fn bad_reports_are_400s_naming_the_field() {
    let app = spawn_app().await;
    let (_, token) = pool_of(&app, 1).await;
    let (_, serve) = app.serve("f", &token).await;
    for (body, field) in [
        (json!({ "status": 99 }), "status"),
        (json!({ "status": 600 }), "status"),
        (json!({ "status": "500" }), "status"),
        (json!({ "status": 500.5 }), "status"),
        (json!({ "class": "dead" }), "class"),
        (json!({ "error": "dns" }), "error"),
        (json!({ "status": 429, "retry_after_seconds": -1 }), "retry_after_seconds"),
        (json!({ "status": 429, "retry_after_seconds": 86_401 }), "retry_after_seconds"),
        (json!({ "status": 429, "retry_after_seconds": "soon" }), "retry_after_seconds"),
        (json!({ "status": 402, "message": "x".repeat(501) }), "message"),
        (json!({ "status": 402, "message": 5 }), "message"),
        (json!({ "status": 200, "colour": "red" }), "colour"),
        (json!({}), "status"),
    ] {
        let r = app.report(&serve, &token, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(r.error().contains(field), "{body}: {}", r.text);
    }
    // 500 characters (not bytes) are fine: checked after every refusal above stored nothing.
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events WHERE outcome_class IS NOT NULL").await, 0);

    let raw = app.send(app.client.post(app.url(&format!("/serves/{serve}/outcome"))).bearer_auth(&token)
        .header("content-type", "application/json").body("{\"status\": 2")).await;
    assert_eq!(raw.status, StatusCode::BAD_REQUEST);
    assert!(raw.error().contains("JSON"), "{}", raw.text);

    let not_uuid = app.report("not-a-uuid", &token, json!({ "status": 200 })).await;
    assert_eq!(not_uuid.status, StatusCode::BAD_REQUEST);
    assert!(not_uuid.error().contains("serve_id"), "{}", not_uuid.text);

    let unknown = app.report(&uuid::Uuid::now_v7().to_string(), &token, json!({ "status": 200 })).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);

    let long = app.report(&serve, &token, json!({ "status": 402, "message": "é".repeat(500) })).await;
    assert_eq!(long.status, StatusCode::OK, "500 characters are fine: {}", long.text);
}

// Issue 9 item 1: a serve older than OUTCOME_WINDOW_SECONDS is 410.
async fn a_report_after_the_window_is_410() {
    let app = spawn_app_with(&[("OUTCOME_WINDOW_SECONDS", "1")]).await;
    let (_, token) = pool_of(&app, 1).await;
    let (_, serve) = app.serve("f", &token).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = app.report(&serve, &token, json!({ "status": 200 })).await;
    assert_eq!(r.status, StatusCode::GONE, "{}", r.text);
    assert!(r.error().contains("OUTCOME_WINDOW_SECONDS"), "{}", r.text);
}

// Issue 9 item 3: 401 twice from different serves quarantines the key, and it stops being
// served; one 401 only cools it.
async fn two_401s_from_different_serves_quarantine_a_key_and_one_only_cools_it() {
    let app = spawn_app().await;
    let (ids, token) = pool_of(&app, 2).await;
    let s1 = serve_of(&app, &token, &ids[0]).await;
    let s2 = serve_of(&app, &token, &ids[0]).await;
    let first = app.report(&s1, &token, json!({ "status": 401 })).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["key_state"], "cooling");
    let health = app.health_of(&ids[0]).await;
    assert_eq!((health["state"].clone(), health["reason"].clone()), (json!("cooling"), json!("auth_invalid")));
    assert_eq!(health["last_status"], 401);
    assert!(health["until"].is_string(), "{health}");
    // Repeating the same serve's report changes nothing.
    assert_eq!(app.report(&s1, &token, json!({ "status": 401 })).await.body["key_state"], "cooling");

    let second = app.report(&s2, &token, json!({ "status": 403 })).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    assert_eq!(second.body["key_state"], "quarantined");
    assert!(!app.serves_key("f", &ids[0], 20).await, "a quarantined key is not served");
    assert!(app.serves_key("f", &ids[1], 4).await, "the other key still serves");
    let counts = app.admin_get("/admin/health").await.body["key_states"].clone();
    assert_eq!((counts["quarantined"].clone(), counts["active"].clone()), (json!(1), json!(1)));
}

// Issue 9 item 3: 402 exhausts the key until its usage window resets.
async fn a_402_exhausts_the_key_until_its_usage_window_resets() {
    let app = spawn_app().await;
    app.create_tier("t", &[("f", 10_000, 60)]).await;
    let key = app.add_key(json!({ "name": "k", "key": "v", "tier": "t", "usage_limit": 1000, "usage_window_seconds": 2 })).await;
    let (_, token) = app.consumer("runner", &["t"]).await;
    let (_, serve) = app.serve("f", &token).await;
    let r = app.report(&serve, &token, json!({ "status": 402 })).await;
    assert_eq!(r.body["key_state"], "exhausted", "{}", r.text);
    let refused = app.draw("f", &token).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text);
    let wait: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After is the window's reset: {wait}");
    assert!(eventually(Duration::from_secs(5), async || app.draw("f", &token).await.status == StatusCode::OK).await,
        "served again once the window reset");
    let _ = key;
}

// Issue 9 item 3: a 429 with retry_after cools the key exactly that long.
async fn a_429_with_retry_after_cools_exactly_that_long() {
    let app = spawn_app().await;
    let (ids, token) = pool_of(&app, 2).await;
    let serve = serve_of(&app, &token, &ids[0]).await;
    let r = app.report(&serve, &token, json!({ "status": 429, "retry_after_seconds": 2 })).await;
    assert_eq!(r.body["key_state"], "cooling", "{}", r.text);
    let health = app.health_of(&ids[0]).await;
    let changed = chrono::DateTime::parse_from_rfc3339(health["changed_at"].as_str().unwrap()).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(health["until"].as_str().unwrap()).unwrap();
    assert_eq!((until - changed).num_milliseconds(), 2000, "no jitter on the upstream's own retry_after: {health}");
    assert!(!app.serves_key("f", &ids[0], 10).await, "cooling: not served");
    assert!(eventually(Duration::from_secs(6), async || app.serves_key("f", &ids[0], 4).await).await,
        "served again after the cooldown");
}

// Issue 9 item 3: five 5xx in a row open the breaker; a probe success closes it.
async fn five_5xx_in_a_row_open_the_key_and_a_probe_success_closes_it() {
    let app = spawn_app().await;
    // Ten keys, so the at-most-half guard is far away.
    let (ids, token) = pool_of(&app, 10).await;
    let mut serves = Vec::new();
    for _ in 0..5 {
        serves.push(serve_of(&app, &token, &ids[0]).await);
    }
    for (i, serve) in serves.iter().enumerate() {
        let r = app.report(serve, &token, json!({ "status": 503 })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let expected = if i < 4 { "active" } else { "cooling" };
        assert_eq!(r.body["key_state"], expected, "after {} 5xx", i + 1);
        if i < 4 {
            assert_eq!(app.health_of(&ids[0]).await["strikes"], i as u64 + 1);
        }
    }
    assert_eq!(app.health_of(&ids[0]).await["reason"], "upstream_error");
    assert!(!app.serves_key("f", &ids[0], 20).await, "open: not served");

    // The cooldown (30 s ± 20 %) is not waited out: its stored deadline is moved into the past
    // and the service restarted, which restores the key as due for a probe.
    let db = app.db().await;
    sqlx::query("UPDATE key_health SET until = '2001-01-01 00:00:00.000000' WHERE key_id = ?")
        .bind(&ids[0]).execute(&db).await.expect("move the deadline");
    db.close().await;
    let mut app = app;
    app.restart().await;
    let probe = serve_of(&app, &token, &ids[0]).await;
    assert_eq!(app.health_of(&ids[0]).await["state"], "probing");
    assert!(!app.serves_key("f", &ids[0], 20).await, "one probe in flight at a time");
    let closed = app.report(&probe, &token, json!({ "status": 200 })).await;
    assert_eq!(closed.body["key_state"], "active", "{}", closed.text);
    assert_eq!(app.health_of(&ids[0]).await["reason"], "ok");
    assert!(app.serves_key("f", &ids[0], 20).await, "closed: served again");
}

// Issue 9 item 4: a burst of 429s across a tier is host throttling: no key is penalised, the
// tier answers 429 with Retry-After, and serves resume after the cooldown (its floor, 30 s in
// production, is set to 5 s here and waited out, polling).
async fn a_burst_of_429s_across_a_tier_cools_the_tier_not_the_keys() {
    let app = spawn_app_with(&[(HOST_THROTTLE_FLOOR_MS, "5000")]).await;
    let (ids, token) = pool_of(&app, 4).await;
    let mut serves = Vec::new();
    for id in &ids {
        serves.push(serve_of(&app, &token, id).await);
    }
    for (i, serve) in serves.iter().take(3).enumerate() {
        let r = app.report(serve, &token, json!({ "status": 429, "retry_after_seconds": 1 })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if i == 2 {
            assert_eq!(r.body["key_state"], "active", "the third distinct key reveals throttling");
        }
    }
    for id in &ids {
        let health = app.health_of(id).await;
        assert_eq!(health["state"], "active", "no key penalised: {health}");
    }
    let refused = app.draw("f", &token).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text);
    let wait: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((4..=5).contains(&wait), "the tier cools for the floor, not the 1 s asked: {wait}");
    let started = Instant::now();
    assert!(eventually(Duration::from_secs(15), async || app.draw("f", &token).await.status == StatusCode::OK).await,
        "serves resume after the cooldown");
    assert!(started.elapsed() >= Duration::from_secs(wait.saturating_sub(2)), "not before it");
}

// Issue 9 item 3: client errors never count against a key; network errors neither.
async fn client_errors_and_network_failures_never_touch_a_key() {
    let app = spawn_app().await;
    let (ids, token) = pool_of(&app, 1).await;
    for status in [400, 404, 409, 422] {
        let (_, serve) = app.serve("f", &token).await;
        let r = app.report(&serve, &token, json!({ "status": status })).await;
        assert_eq!((r.body["class"].clone(), r.body["key_state"].clone()), (json!("client_error"), json!("active")), "{status}");
    }
    let (_, serve) = app.serve("f", &token).await;
    let r = app.report(&serve, &token, json!({ "error": "connect" })).await;
    assert_eq!((r.body["class"].clone(), r.body["key_state"].clone()), (json!("network"), json!("active")));
    let health = app.health_of(&ids[0]).await;
    assert_eq!((health["state"].clone(), health["strikes"].clone(), health["changed_at"].clone()), (json!("active"), json!(0), Value::Null));
    assert_eq!(app.count("SELECT COUNT(*) FROM key_health").await, 0, "nothing changed, nothing written");
}

// Issue 9 item 3: concurrent reports on one key make exactly one transition.
async fn concurrent_reports_on_one_key_make_exactly_one_transition() {
    let app = spawn_app().await;
    let (ids, token) = pool_of(&app, 4).await;
    let mut serves = Vec::new();
    for _ in 0..8 {
        serves.push(serve_of(&app, &token, &ids[0]).await);
    }
    let answers = report_all(&app, &serves, &token, json!({ "status": 429 })).await;
    assert!(answers.iter().all(|s| *s == StatusCode::OK), "{answers:?}");
    let health = app.health_of(&ids[0]).await;
    assert_eq!((health["state"].clone(), health["reason"].clone()), (json!("cooling"), json!("rate_limited")));
    // The first ladder step (30 s ± 20 %): later reports were stale and escalated nothing.
    let changed = chrono::DateTime::parse_from_rfc3339(health["changed_at"].as_str().unwrap()).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(health["until"].as_str().unwrap()).unwrap();
    let cooled = (until - changed).num_milliseconds();
    assert!((24_000..=36_000).contains(&cooled), "one transition, first step: {cooled} ms");
    // Every serve sent at once to the same serve id: one report recorded, the rest agree.
    let (_, one) = app.serve("f", &token).await;
    let answers = report_all(&app, &vec![one.clone(); 6], &token, json!({ "status": 200 })).await;
    assert!(answers.iter().all(|s| *s == StatusCode::OK), "{answers:?}");
    assert_eq!(app.count(&format!("SELECT COUNT(*) FROM usage_events WHERE id = '{one}' AND outcome_class = 'ok'")).await, 1);
}

// Issue 9 item 6: states survive a restart; a deadline that passed meanwhile is due at once.
async fn health_states_survive_a_restart() {
    let mut app = spawn_app().await;
    let (ids, token) = pool_of(&app, 3).await;
    let s1 = serve_of(&app, &token, &ids[0]).await;
    let s2 = serve_of(&app, &token, &ids[0]).await;
    app.report(&s1, &token, json!({ "status": 401 })).await;
    app.report(&s2, &token, json!({ "status": 401 })).await;
    let s3 = serve_of(&app, &token, &ids[1]).await;
    app.report(&s3, &token, json!({ "status": 429, "retry_after_seconds": 1 })).await;
    let quarantined = app.health_of(&ids[0]).await;
    let cooling = app.health_of(&ids[1]).await;
    assert_eq!(quarantined["state"], "quarantined");
    assert_eq!(cooling["state"], "cooling");

    app.restart().await;
    assert_eq!(app.health_of(&ids[0]).await, quarantined, "quarantine kept as it was");
    // The quarantined key is never served. Key 1's 1 s cooldown may already be over here (a
    // restart under load can take longer): then one of these draws is its probe, whose slot
    // stays taken (nobody reports it), so it counts as served again.
    let mut probed = false;
    for _ in 0..20 {
        let r = app.draw("f", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_ne!(r.body["key_id"], json!(ids[0]), "a quarantined key was served");
        probed |= r.body["key_id"] == json!(ids[1]);
    }
    // A report on a serve from before the restart still works (found in the database).
    let again = app.report(&s1, &token, json!({ "status": 401 })).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    // The 1 s cooldown: served again once it is over, probing first.
    assert!(probed || eventually(Duration::from_secs(5), async || app.serves_key("f", &ids[1], 4).await).await);
}

// Issue 9 item 7: an operator disables and enables a key; enabling clears automatic states.
async fn patch_is_active_disables_and_enables_a_key_and_clears_automatic_states() {
    let mut app = spawn_app().await;
    let (ids, token) = pool_of(&app, 2).await;
    let s1 = serve_of(&app, &token, &ids[0]).await;
    let s2 = serve_of(&app, &token, &ids[0]).await;
    app.report(&s1, &token, json!({ "status": 401 })).await;
    app.report(&s2, &token, json!({ "status": 401 })).await;
    assert_eq!(app.health_of(&ids[0]).await["state"], "quarantined");

    let path = format!("/admin/keys/{}", ids[0]);
    let r = app.admin_send(reqwest::Method::PATCH, &path, Some(&json!({ "is_active": true }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!((r.body["is_active"].clone(), r.body["health"]["state"].clone(), r.body["health"]["reason"].clone()),
        (json!(true), json!("active"), json!("operator")));
    assert!(app.serves_key("f", &ids[0], 4).await, "re-enabled: served");

    let r = app.admin_send(reqwest::Method::PATCH, &path, Some(&json!({ "is_active": false }))).await;
    assert_eq!(r.body["health"]["state"], "disabled", "{}", r.text);
    assert_eq!(app.scalar(&format!("SELECT is_active FROM keys WHERE id = '{}'", ids[0])).await, "0");
    assert!(!app.serves_key("f", &ids[0], 10).await, "disabled: never served");
    // Reports never undo disabled.
    let s3 = serve_of(&app, &token, &ids[1]).await;
    let _ = s3;
    let keys = app.admin_get("/admin/keys").await;
    let listed = keys.body.as_array().unwrap().iter().find(|k| k["id"] == ids[0]).unwrap().clone();
    assert_eq!((listed["is_active"].clone(), listed["health"]["state"].clone()), (json!(false), json!("disabled")));

    app.restart().await;
    assert_eq!(app.health_of(&ids[0]).await["state"], "disabled", "kept across a restart");
    let r = app.admin_send(reqwest::Method::PATCH, &path, Some(&json!({ "is_active": true }))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.scalar(&format!("SELECT is_active FROM keys WHERE id = '{}'", ids[0])).await, "1");
    assert!(app.serves_key("f", &ids[0], 4).await);

    // Bad PATCH bodies: 400 naming the field, nothing changed; unknown key 404.
    for (body, needle) in [
        (json!({ "name": " " }), "name"),
        (json!({ "usage_limit": 0 }), "usage_limit"),
        (json!({ "is_active": "yes" }), "is_active"),
        (json!({}), "is_active"),
        (json!({ "colour": 1 }), "colour"),
    ] {
        let r = app.admin_send(reqwest::Method::PATCH, &path, Some(&body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    let missing = app.admin_send(reqwest::Method::PATCH, &format!("/admin/keys/{}", uuid::Uuid::new_v4()), Some(&json!({ "is_active": false }))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(app.health_of(&ids[0]).await["state"], "active");
}

// Issue 9 items 1 and 6: a report whose commit fails is answered 503 and changes nothing —
// not the audit row, not the key's health in memory; sent again later it applies once.
async fn a_report_whose_commit_fails_is_503_and_changes_nothing() {
    let app = spawn_app_with(&[("DB_BUSY_TIMEOUT_MS", "100")]).await;
    let (ids, token) = pool_of(&app, 2).await;
    let serve = serve_of(&app, &token, &ids[0]).await;
    let blocker = app.db().await;
    let mut conn = blocker.acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await.expect("write lock");
    let r = app.report(&serve, &token, json!({ "status": 429, "retry_after_seconds": 600 })).await;
    let health = app.health_of(&ids[0]).await;
    sqlx::query("ROLLBACK").execute(&mut *conn).await.expect("release");
    drop(conn);
    blocker.close().await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(health["state"], "active", "the cooldown was undone in memory: {health}");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events WHERE outcome_class IS NOT NULL").await, 0);

    // "Later": the background audit jobs queued behind the blocker may hold the lock for a
    // moment past its release (100 ms busy timeout), and a 503 changes nothing, so send again.
    let mut again = app.report(&serve, &token, json!({ "status": 429, "retry_after_seconds": 600 })).await;
    for _ in 0..20 {
        if again.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        again = app.report(&serve, &token, json!({ "status": 429, "retry_after_seconds": 600 })).await;
    }
    assert_eq!((again.status, again.body["key_state"].clone()), (StatusCode::OK, json!("cooling")), "{}", again.text);
    let stored = app.rows(&format!("SELECT state, reason FROM key_health WHERE key_id = '{}'", ids[0])).await;
    assert_eq!(stored, vec![vec![Some("cooling".into()), Some("rate_limited".into())]]);

    // Issue 9 item 8: reports per class and keys per health state in /metrics.
    let text = crate::observe::scrape(&app).await;
    let reports = crate::observe::sample(&text, "keypooler_outcome_reports_total", &[("class", "rate_limited")]);
    assert_eq!(reports, Some(1.0), "only the recorded report counts: {text}");
    let keys = |state| crate::observe::sample(&text, "keypooler_keys", &[("tier", "t"), ("state", state)]);
    assert_eq!((keys("cooling"), keys("active")), (Some(1.0), Some(1.0)), "{text}");
}

// Issue 9 remainder, item 2: the first auth_invalid is kept across a restart, so a second one
// from another serve after it still quarantines the key (it only cooled it before).
async fn a_first_401_survives_a_restart_and_a_second_quarantines() {
    let mut app = spawn_app().await;
    let (ids, token) = pool_of(&app, 3).await;
    let s1 = serve_of(&app, &token, &ids[0]).await;
    let s2 = serve_of(&app, &token, &ids[0]).await;
    let first = app.report(&s1, &token, json!({ "status": 401 })).await;
    assert_eq!(first.body["key_state"], "cooling", "{}", first.text);
    let stored = app.rows(&format!("SELECT auth_serve_id FROM key_health WHERE key_id = '{}'", ids[0])).await;
    assert_eq!(stored, vec![vec![Some(s1.clone())]], "the strike is written with its cooldown");

    app.restart().await;
    let second = app.report(&s2, &token, json!({ "status": 401 })).await;
    assert_eq!((second.status, second.body["key_state"].clone()), (StatusCode::OK, json!("quarantined")), "{}", second.text);
    assert!(!app.serves_key("f", &ids[0], 10).await, "quarantined: not served");
}

// Issue 9 remainder, item 2: the rate ladder's step survives a restart: a 429 on the probe
// after it climbs to the second step (2 min ± 20 %), not the first (30 s).
async fn a_rate_limit_escalation_step_survives_a_restart() {
    let mut app = spawn_app().await;
    let (ids, token) = pool_of(&app, 4).await;
    let s1 = serve_of(&app, &token, &ids[0]).await;
    let r = app.report(&s1, &token, json!({ "status": 429, "retry_after_seconds": 1 })).await;
    assert_eq!(r.body["key_state"], "cooling", "{}", r.text);
    let stored = app.rows(&format!("SELECT CAST(rate_step AS TEXT) FROM key_health WHERE key_id = '{}'", ids[0])).await;
    assert_eq!(stored, vec![vec![Some("1".into())]]);

    app.restart().await;
    let mut probe = None;
    assert!(eventually(Duration::from_secs(10), async || {
        let (key, serve) = app.serve("f", &token).await;
        if key == ids[0] {
            probe = Some(serve);
        }
        probe.is_some()
    }).await, "the key is probed once its 1 s is over");
    let probe = probe.expect("probe serve");
    let r = app.report(&probe, &token, json!({ "status": 429 })).await;
    assert_eq!(r.body["key_state"], "cooling", "{}", r.text);
    let health = app.health_of(&ids[0]).await;
    let changed = chrono::DateTime::parse_from_rfc3339(health["changed_at"].as_str().unwrap()).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(health["until"].as_str().unwrap()).unwrap();
    let cooled = (until - changed).num_milliseconds();
    assert!((96_000..=144_000).contains(&cooled), "second step after the restart: {cooled} ms");
}

// Issue 9 remainder, item 2: a tier throttled as a whole stays cooling across a restart
// inside its cooldown (it served at once after one before).
async fn a_throttled_tier_keeps_cooling_across_a_restart() {
    let mut app = spawn_app().await;
    let (ids, token) = pool_of(&app, 4).await;
    let mut serves = Vec::new();
    for id in &ids {
        serves.push(serve_of(&app, &token, id).await);
    }
    for serve in serves.iter().take(3) {
        let r = app.report(serve, &token, json!({ "status": 429, "retry_after_seconds": 600 })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    assert_eq!(app.draw("f", &token).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.count("SELECT COUNT(*) FROM tier_health").await, 1, "the cooldown is written");

    app.restart().await;
    let refused = app.draw("f", &token).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "still cooling: {}", refused.text);
    let wait: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((500..=600).contains(&wait), "the rest of the 600 s: {wait}");
    for id in &ids {
        assert_eq!(app.health_of(id).await["state"], "active", "no key penalised");
    }
}

// Issue 9 remainder, item 1: reports on serves no longer in memory (here: after a restart)
// read their rows in batches; each report gets its own serve's answer, an unknown id a 404,
// and each outcome is recorded once.
async fn concurrent_reports_on_serves_read_from_the_database_each_get_their_own_answer() {
    let mut app = spawn_app().await;
    let (_, token) = pool_of(&app, 3).await;
    let mut serves = Vec::new();
    for _ in 0..24 {
        serves.push(app.serve("f", &token).await.1);
    }
    app.restart().await;
    let unknown: Vec<String> = (0..8).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let mut set = tokio::task::JoinSet::new();
    for (serve, known) in serves.iter().map(|s| (s, true)).chain(unknown.iter().map(|s| (s, false))) {
        let req = app.client.post(app.url(&format!("/serves/{serve}/outcome"))).bearer_auth(&token).json(&json!({ "status": 200 }));
        let serve = serve.clone();
        set.spawn(async move { (serve, known, req.send().await.expect("report sent").status()) });
    }
    for (serve, known, status) in set.join_all().await {
        let expected = if known { StatusCode::OK } else { StatusCode::NOT_FOUND };
        assert_eq!(status, expected, "{serve}");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events WHERE outcome_class = 'ok'").await, 24);
}

}

/// Takes the database's write lock, then sends `report`, whose caller gives up while the
/// report's commit waits for the lock; answers the connection that holds it.
async fn leave_while_locked(
    blocker: &sqlx::SqlitePool,
    report: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> sqlx::pool::PoolConnection<sqlx::Sqlite> {
    let mut conn = blocker.acquire().await.expect("connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .expect("write lock");
    assert!(
        report.await.is_err(),
        "the caller gave up while the commit waited"
    );
    conn
}

// Issue 9 item 9: a report runs in its request's task (no task of its own any more); a caller
// that disconnects while the report waits for its commit still gets its outcome recorded with
// the health change it made, and one whose commit then fails has that change undone in memory.
// SQLite only: the write lock held from outside is what makes the commit wait or fail (the
// remote test server queues a blocked write its own way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_whose_caller_disconnects_still_lands_or_is_undone() {
    let app = spawn_app_with(&[("DB_BUSY_TIMEOUT_MS", "5000")]).await;
    let (ids, token) = pool_of(&app, 4).await;
    let body = json!({ "status": 429, "retry_after_seconds": 600 });
    let gone = |serve: &str| {
        app.client
            .post(app.url(&format!("/serves/{serve}/outcome")))
            .bearer_auth(&token)
            .json(&body)
            .timeout(Duration::from_millis(300))
            .send()
    };
    let blocker = app.db().await;

    // Lands: the write lock is released while the commit still waits for it.
    let serve = serve_of(&app, &token, &ids[0]).await;
    let mut conn = leave_while_locked(&blocker, gone(&serve)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut *conn)
        .await
        .expect("release");
    drop(conn);
    let recorded = "SELECT COUNT(*) FROM usage_events WHERE outcome_class = 'rate_limited'";
    assert!(
        eventually(Duration::from_secs(10), async || app.count(recorded).await
            == 1)
        .await
    );
    assert_eq!(app.health_of(&ids[0]).await["state"], "cooling");
    let stored = app
        .rows(&format!(
            "SELECT state FROM key_health WHERE key_id = '{}'",
            ids[0]
        ))
        .await;
    assert_eq!(stored, vec![vec![Some("cooling".into())]]);
    let again = app.report(&serve, &token, body.clone()).await;
    assert_eq!(
        (again.status, again.body["key_state"].clone()),
        (StatusCode::OK, json!("cooling")),
        "{}",
        again.text
    );

    // Undone: the lock is held past the busy timeout, so the commit fails after the caller left.
    let serve = serve_of(&app, &token, &ids[1]).await;
    let mut conn = leave_while_locked(&blocker, gone(&serve)).await;
    let undone = eventually(Duration::from_secs(15), async || {
        app.health_of(&ids[1]).await["state"] == "active"
    })
    .await;
    sqlx::query("ROLLBACK")
        .execute(&mut *conn)
        .await
        .expect("release");
    drop(conn);
    blocker.close().await;
    assert!(
        undone,
        "the cooldown of a report whose commit failed is undone in memory"
    );
    assert_eq!(
        app.count(recorded).await,
        1,
        "only the first report is recorded"
    );
}
