//! Issue 14 items 3 and 6 (SPEC §8.7): changes made through one replica are honoured by the
//! others within `SYNC_INTERVAL_MS` — three real server processes on one SQLite file, and three
//! on the test libSQL server — and the change log stays bounded (a replica behind its pruned
//! end refreshes from a snapshot).

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, ADMIN_TOKEN};
use crate::hrana::HranaServer;
use crate::process::{as_refs, distinctive, quiet_env, start_server, Server};

const SYNC_MS: u64 = 200;
/// The interval plus slack for a loaded machine (2 shared cores, other builds beside).
const BOUND: Duration = Duration::from_millis(SYNC_MS + 1800);

/// Polls `check` until it holds; panics past `BOUND`. Returns how long it took.
async fn honoured_within<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            let took = started.elapsed();
            eprintln!("propagated: {what} in {took:?}");
            return took;
        }
        assert!(
            started.elapsed() < BOUND,
            "{what}: not honoured within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn draw(server: &Server, feature: &str, token: &str) -> (StatusCode, Value) {
    server
        .call(
            Method::GET,
            &format!("/key?feature={feature}"),
            Some(token),
            None,
        )
        .await
}

/// `key_id` as `server` lists it.
async fn key_view(server: &Server, key_id: &str) -> Value {
    let keys = server
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    keys.as_array()
        .and_then(|ks| ks.iter().find(|k| k["id"] == key_id))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The `health` of `key_id` as `server` lists it.
async fn health_of(server: &Server, key_id: &str) -> Value {
    key_view(server, key_id).await["health"].clone()
}

/// Three replicas on one database; `db_env` says which (DB_PATH or DATABASE_URL). They start
/// at the same moment on the fresh database, so they race to migrate it: each must come up
/// (a migration applied by another process is recognised, never run twice).
async fn three_replicas(dir: &Path, db_env: &[(&'static str, String)]) -> Vec<Server> {
    let admin = distinctive("adm-");
    let mut env = quiet_env(&dir.join("unused.db"));
    env.retain(|(k, _)| *k != "DB_PATH");
    env.extend(db_env.iter().cloned());
    env.push(("SYNC_INTERVAL_MS", SYNC_MS.to_string()));
    let env = as_refs(&env);
    let logs = ["a", "b", "c"].map(|name| dir.join(format!("{name}.log")));
    let (a, b, c) = tokio::join!(
        start_server(&env, &admin, &logs[0], dir),
        start_server(&env, &admin, &logs[1], dir),
        start_server(&env, &admin, &logs[2], dir),
    );
    vec![a, b, c]
}

/// Issue 14 item 6 (propagation part): every kind of change made on A (or B) is honoured by C
/// (or A) within the interval plus slack. Returns the slowest propagation seen.
async fn every_change_propagates(servers: &[Server]) -> Duration {
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    let mut slowest = Duration::ZERO;
    a.admin(
        Method::POST,
        "/admin/tiers",
        Some(json!({ "name": "t", "features": { "f": { "rate_limit": 100000, "window_seconds": 60 } } })),
        StatusCode::CREATED,
    )
    .await;
    // A tier created on A is known to C and to B (429: listed, no key yet — not 404).
    for (name, other) in [("C", c), ("B", b)] {
        slowest = slowest.max(
            honoured_within(&format!("tier created on A, known to {name}"), || async {
                draw(other, "f", &other.admin_token).await.0 == StatusCode::TOO_MANY_REQUESTS
            })
            .await,
        );
    }
    // A key added on B is served by A.
    let k1 = b
        .add_key(json!({ "name": "k1", "key": "value-k1", "tier": "t" }))
        .await;
    slowest = slowest.max(
        honoured_within("key added on B, served by A", || async {
            let (status, body) = draw(a, "f", &a.admin_token).await;
            status == StatusCode::OK && body["key_id"] == k1.as_str() && body["value"] == "value-k1"
        })
        .await,
    );

    // Consumers made on A work on C; a scope revoked, a consumer deleted, a token rotated on A
    // are honoured by C.
    let (revoked, revoked_token) = a.consumer("revoked", "t").await;
    let (deleted, deleted_token) = a.consumer("deleted", "t").await;
    let (rotated, old_token) = a.consumer("rotated", "t").await;
    for token in [&revoked_token, &deleted_token, &old_token] {
        slowest = slowest.max(
            honoured_within("consumer created on A, accepted by C", || async {
                draw(c, "f", token).await.0 == StatusCode::OK
            })
            .await,
        );
    }
    a.admin(
        Method::DELETE,
        &format!("/admin/consumers/{revoked}/scopes/t"),
        None,
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("scope revoked on A, refused by C", || async {
            draw(c, "f", &revoked_token).await.0 == StatusCode::FORBIDDEN
        })
        .await,
    );
    a.admin(
        Method::DELETE,
        &format!("/admin/consumers/{deleted}"),
        None,
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("consumer deleted on A, refused by C", || async {
            draw(c, "f", &deleted_token).await.0 == StatusCode::UNAUTHORIZED
        })
        .await,
    );
    let fresh = a
        .admin(
            Method::POST,
            &format!("/admin/consumers/{rotated}/token"),
            Some(json!({ "grace_seconds": 0 })),
            StatusCode::OK,
        )
        .await;
    let new_token = fresh["token"].as_str().expect("new token").to_string();
    slowest = slowest.max(
        honoured_within(
            "token rotated on A: C takes the new one, refuses the old",
            || async {
                draw(c, "f", &new_token).await.0 == StatusCode::OK
                    && draw(c, "f", &old_token).await.0 == StatusCode::UNAUTHORIZED
            },
        )
        .await,
    );
    // A rotation with grace keeps the old token working on C until it ends.
    let graced = a
        .admin(
            Method::POST,
            &format!("/admin/consumers/{rotated}/token"),
            Some(json!({ "grace_seconds": 3600 })),
            StatusCode::OK,
        )
        .await;
    let newest = graced["token"].as_str().expect("token").to_string();
    slowest = slowest.max(
        honoured_within("token rotated with grace on A: C takes both", || async {
            draw(c, "f", &newest).await.0 == StatusCode::OK
                && draw(c, "f", &new_token).await.0 == StatusCode::OK
        })
        .await,
    );

    // A key disabled on A is never served by C.
    let k2 = a
        .add_key(json!({ "name": "k2", "key": "value-k2", "tier": "t" }))
        .await;
    slowest = slowest.max(
        honoured_within("second key added on A, served by C", || async {
            let (status, body) = draw(c, "f", &c.admin_token).await;
            status == StatusCode::OK && body["key_id"] == k2.as_str()
        })
        .await,
    );
    a.admin(
        Method::PATCH,
        &format!("/admin/keys/{k1}"),
        Some(json!({ "is_active": false })),
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("key disabled on A, disabled on C", || async {
            health_of(c, &k1).await["state"] == "disabled"
        })
        .await,
    );
    for _ in 0..6 {
        let (status, body) = draw(c, "f", &c.admin_token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["key_id"],
            k2.as_str(),
            "C served the key disabled on A"
        );
    }

    // A change to a key re-read from the database never lowers C's in-memory counters.
    let used_before = key_view(c, &k2).await["usage_count"]
        .as_i64()
        .expect("usage_count");
    assert!(used_before >= 6, "C counted its serves: {used_before}");
    a.admin(
        Method::PATCH,
        &format!("/admin/keys/{k2}"),
        Some(json!({ "name": "k2-renamed" })),
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("key renamed on A, renamed on C", || async {
            key_view(c, &k2).await["name"] == "k2-renamed"
        })
        .await,
    );
    let used_after = key_view(c, &k2).await["usage_count"]
        .as_i64()
        .expect("usage_count");
    assert!(
        used_after >= used_before,
        "C's count went from {used_before} to {used_after}"
    );

    // A key quarantined by health reports made on A is not served by C.
    a.admin(
        Method::POST,
        "/admin/tiers",
        Some(json!({ "name": "q", "features": { "fq": { "rate_limit": 100000, "window_seconds": 60 } } })),
        StatusCode::CREATED,
    )
    .await;
    let kq = a
        .add_key(json!({ "name": "kq", "key": "value-kq", "tier": "q" }))
        .await;
    slowest = slowest.max(
        honoured_within("quarantine candidate served by C", || async {
            draw(c, "fq", &c.admin_token).await.0 == StatusCode::OK
        })
        .await,
    );
    let mut serves = Vec::new();
    for _ in 0..2 {
        let (status, body) = draw(a, "fq", &a.admin_token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serves.push(body["serve_id"].as_str().expect("serve_id").to_string());
    }
    for serve in &serves {
        a.admin(
            Method::POST,
            &format!("/serves/{serve}/outcome"),
            Some(json!({ "status": 401 })),
            StatusCode::OK,
        )
        .await;
    }
    assert_eq!(health_of(a, &kq).await["state"], "quarantined");
    slowest = slowest.max(
        honoured_within("key quarantined on A, quarantined on C", || async {
            health_of(c, &kq).await["state"] == "quarantined"
        })
        .await,
    );
    let (status, body) = draw(c, "fq", &c.admin_token).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "C served a quarantined key: {body}"
    );

    // A feature added to a tier on A is drawable on C.
    a.admin(
        Method::PATCH,
        "/admin/tiers",
        Some(json!({ "name": "t", "features": {
            "f": { "rate_limit": 100000, "window_seconds": 60 },
            "g": { "rate_limit": 100000, "window_seconds": 60 } } })),
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("feature added on A, drawable on C", || async {
            let (status, body) = draw(c, "g", &c.admin_token).await;
            status == StatusCode::OK && body["key_id"] == k2.as_str()
        })
        .await,
    );
    // And B, which made none of these changes, agrees: the key deleted there leaves A and C.
    b.admin(
        Method::DELETE,
        &format!("/admin/keys/{k2}"),
        None,
        StatusCode::OK,
    )
    .await;
    slowest = slowest.max(
        honoured_within("key deleted on B, gone from C", || async {
            draw(c, "g", &c.admin_token).await.0 == StatusCode::TOO_MANY_REQUESTS
        })
        .await,
    );
    eprintln!("slowest propagation: {slowest:?} (SYNC_INTERVAL_MS={SYNC_MS})");
    slowest
}

// Issue 14 item 6: three processes on one SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_sqlite_file_honour_each_others_changes_within_the_interval() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("data").join("pool.db");
    let servers = three_replicas(dir.path(), &[("DB_PATH", db_path.display().to_string())]).await;
    let slowest = every_change_propagates(&servers).await;
    assert!(slowest < BOUND);
}

// Issue 14 item 6: three processes on the test libSQL server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_libsql_database_honour_each_others_changes_within_the_interval() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("remote.db");
    let mut server = HranaServer::start(&db_path, None).await;
    let servers = three_replicas(dir.path(), &[("DATABASE_URL", server.url())]).await;
    let slowest = every_change_propagates(&servers).await;
    assert!(slowest < BOUND);
    drop(servers);
    server.stop().await;
}

// Issue 14 item 3: the log stays bounded; a replica whose position fell below what pruning
// removed refreshes its pool from one snapshot, in place, and then follows the log again.
on_both_drivers! {
    async fn the_change_log_stays_bounded_and_a_replica_behind_it_catches_up() {
        let a = spawn_app_with(&[("SYNC_INTERVAL_MS", "100")]).await;
        // Replica C on the same database; its own poller waits a minute, so this test drives
        // a poller of its own by hand.
        let mut env = a.env.clone();
        env.push(("SYNC_INTERVAL_MS".into(), "60000".into()));
        let config = keypooler::config::Config::from_vars(env).expect("config");
        let c = keypooler::build(&config).await.expect("replica C builds");
        let bound = keypooler::sync::LogBound {
            keep_for: Duration::from_secs(3600),
            keep_rows: 5,
            every: Duration::ZERO,
        };
        let mut poller = keypooler::sync::Poller::new(
            c.state.db.change_log_position().await.expect("position"),
            bound,
        );
        a.create_tier("t", &[("f", 1000, 60)]).await;
        let mut ids = Vec::new();
        for i in 0..20 {
            ids.push(a.add_key(json!({ "name": format!("k{i}"), "key": format!("v{i}"), "tier": "t" })).await);
        }
        let consumer = a.admin_post("/admin/consumers", json!({ "name": "late" })).await;
        assert_eq!(consumer.status, StatusCode::CREATED, "{}", consumer.text);
        let logged = c.state.db.change_log_rows().await.expect("rows");
        assert!(logged > 20);
        // Serves (counters, audit rows, rate windows) add nothing to the log.
        for _ in 0..20 {
            assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
        }
        assert_eq!(c.state.db.change_log_rows().await.expect("rows"), logged);
        // Pruned to the newest 5 before C read any of it.
        let pruned = keypooler::sync::prune(&c.state.db, bound).await.expect("prune");
        assert!(pruned > 15, "pruned {pruned}");
        assert!(c.state.db.change_log_rows().await.expect("rows") <= 5);
        assert_eq!(c.state.pool.key_count(), 0);
        poller.poll(&c.state).await.expect("poll");
        assert_eq!(c.state.pool.key_count(), 20, "resynced from a snapshot");
        assert!(c.state.pool.tier_by_name("t").is_some());
        assert!(c.state.pool.consumers().iter().any(|x| x.name == "late"));
        let position = poller.position();
        assert_eq!(position, c.state.db.change_log_position().await.expect("position"));
        // Then it follows the log row by row again, and every poll keeps the log bounded.
        let r = a.admin_send(reqwest::Method::DELETE, &format!("/admin/keys/{}", ids[0]), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        poller.poll(&c.state).await.expect("poll");
        assert_eq!(c.state.pool.key_count(), 19);
        assert!(poller.position() > position);
        for i in 0..10 {
            a.add_key(json!({ "name": format!("m{i}"), "key": format!("m{i}"), "tier": "t" })).await;
        }
        poller.poll(&c.state).await.expect("poll");
        assert_eq!(c.state.pool.key_count(), 29);
        assert!(c.state.db.change_log_rows().await.expect("rows") <= 5);
        // A's own poller (100 ms) applies its own writes again harmlessly: still served.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
}

// Issue 14 item 3: an admin request first applies what other replicas changed, so an operator
// whose calls land on different replicas reads their own writes — even with a poll interval
// of a minute, nothing waits for the next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_on_one_replica_sees_what_another_just_changed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("pool.db");
    let admin = distinctive("adm-");
    let mut env = quiet_env(&db_path);
    env.push(("SYNC_INTERVAL_MS", "60000".to_string()));
    let env = as_refs(&env);
    let logs = ["a", "b"].map(|name| dir.path().join(format!("{name}.log")));
    let (a, b) = tokio::join!(
        start_server(&env, &admin, &logs[0], dir.path()),
        start_server(&env, &admin, &logs[1], dir.path()),
    );
    a.admin(
        Method::POST,
        "/admin/tiers",
        Some(json!({ "name": "t", "features": { "f": { "rate_limit": 100, "window_seconds": 60 } } })),
        StatusCode::CREATED,
    )
    .await;
    // The tier A just created is there for B's next admin request.
    let key = b
        .add_key(json!({ "name": "k", "key": "value-k", "tier": "t" }))
        .await;
    let listed = a
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    assert!(
        listed
            .as_array()
            .is_some_and(|ks| ks.iter().any(|k| k["id"] == key.as_str())),
        "A lists the key B just added: {listed}"
    );
    b.admin(
        Method::DELETE,
        &format!("/admin/keys/{key}"),
        None,
        StatusCode::OK,
    )
    .await;
    a.admin(
        Method::DELETE,
        &format!("/admin/keys/{key}"),
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
}
