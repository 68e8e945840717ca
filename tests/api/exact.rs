//! Issue 14 items 1 and 2 (SPEC §8.7): budgets and rate windows decided by the database, so
//! two servers on one database serve exactly what one would — the second learns of the first's
//! serves only when the database refuses its commit, then redraws (next key, or 429).

use std::collections::HashMap;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::process::{start_server, Server};

/// A second app on the first one's SQLite file, started after the first wrote its tiers and
/// keys (it loads them at startup).
async fn second_on(first: &TestApp) -> TestApp {
    spawn_app_on_file(&first.db_path, &[]).await
}

fn retry_after(r: &Resp) -> Option<u64> {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

// Issue 14 item 1: a budget spent through one server is refused to the other by the database
// — never N × the limit — and the refused serve answers 429 exactly as if the pool had known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_spent_on_one_server_is_refused_on_the_other() {
    let a = spawn_app().await;
    a.create_tier("t", &[("f", 1000, 3600)]).await;
    let key = a
        .add_key(json!({"name": "k", "key": "v", "tier": "t", "usage_limit": 10}))
        .await;
    let b = second_on(&a).await;
    for _ in 0..6 {
        assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    // B believes all 10 are left: 4 are.
    for i in 0..4 {
        let r = b.draw("f", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "draw {i}: {}", r.text);
    }
    let refused = b.draw("f", ADMIN_TOKEN).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text
    );
    assert_eq!(
        retry_after(&refused),
        None,
        "a lifetime budget never frees up"
    );
    assert_eq!(
        b.draw("f", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        a.draw("f", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        a.count(&format!("SELECT usage_count FROM keys WHERE id = '{key}'"))
            .await,
        10
    );
    assert_eq!(a.count("SELECT COUNT(*) FROM usage_events").await, 10);
}

// Issue 14 item 1: a rate window filled through one server is refused to the other, with the
// window's end as Retry-After; the stored window counts every serve once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_window_filled_on_one_server_is_refused_on_the_other() {
    let a = spawn_app().await;
    a.create_tier("t", &[("f", 5, 60)]).await;
    a.add_key(json!({"name": "k", "key": "v", "tier": "t"}))
        .await;
    let b = second_on(&a).await;
    for _ in 0..3 {
        assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(b.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    let refused = b.draw("f", ADMIN_TOKEN).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text
    );
    let wait = retry_after(&refused).expect("Retry-After");
    assert!((1..=60).contains(&wait), "the window's end: {wait}");
    assert_eq!(
        a.draw("f", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        a.rows("SELECT window_seconds, count FROM window_counts")
            .await,
        vec![vec![Some("60".into()), Some("5".into())]]
    );
    assert_eq!(a.count("SELECT COUNT(*) FROM usage_events").await, 5);
}

// Issue 14 item 1: a serve the database refuses goes on to the next key of the draw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_serve_is_redrawn_on_the_next_key() {
    let a = spawn_app().await;
    a.create_tier("t", &[("f", 1000, 3600)]).await;
    let small = a
        .add_key(json!({"name": "small", "key": "v1", "tier": "t", "usage_limit": 2}))
        .await;
    let big = a
        .add_key(json!({"name": "big", "key": "v2", "tier": "t"}))
        .await;
    let b = second_on(&a).await;
    // A spends the small key (the rotation alternates, so four draws reach it twice).
    for _ in 0..4 {
        assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    assert_eq!(
        a.count(&format!(
            "SELECT usage_count FROM keys WHERE id = '{small}'"
        ))
        .await,
        2
    );
    // B still believes the small key has 2 left: every draw is served, by the big key.
    for i in 0..4 {
        let r = b.draw("f", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "draw {i}: {}", r.text);
        assert_eq!(r.body["key_id"], big.as_str(), "draw {i}");
    }
    assert_eq!(
        a.count(&format!(
            "SELECT usage_count FROM keys WHERE id = '{small}'"
        ))
        .await,
        2
    );
    assert_eq!(a.count("SELECT COUNT(*) FROM usage_events").await, 8);
}

// Issue 14 item 1: a RegBot-free stored key with a windowed budget: the window a server opened
// is the one the other counts in (the database's start wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_budget_is_shared_across_servers() {
    let a = spawn_app().await;
    a.create_tier("t", &[("f", 1000, 3600)]).await;
    let key = a
        .add_key(json!({"name": "k", "key": "v", "tier": "t", "usage_limit": 3, "usage_window_seconds": 3600}))
        .await;
    let b = second_on(&a).await;
    assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    assert_eq!(b.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    assert_eq!(a.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    let refused = b.draw("f", ADMIN_TOKEN).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text
    );
    let wait = retry_after(&refused).expect("a windowed budget frees up");
    assert!((3500..=3600).contains(&wait), "{wait}");
    assert_eq!(
        a.count(&format!("SELECT usage_count FROM keys WHERE id = '{key}'"))
            .await,
        3
    );
}

/// Draws `feature` on `server` with `callers` concurrent callers until each gets a 429;
/// returns the served key ids.
async fn drain(server: &Server, feature: &str, callers: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let client = server.client.clone();
        let url = server.url(&format!("/key?feature={feature}"));
        let token = server.admin_token.clone();
        tasks.push(tokio::spawn(async move {
            let mut served = Vec::new();
            loop {
                let r = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("draw");
                match r.status() {
                    StatusCode::OK => {
                        let body: Value = r.json().await.expect("json");
                        served.push(body["key_id"].as_str().expect("key_id").to_string());
                    }
                    StatusCode::TOO_MANY_REQUESTS => return served,
                    other => panic!("unexpected {other}: {}", r.text().await.unwrap_or_default()),
                }
            }
        }));
    }
    let mut served = Vec::new();
    for t in tasks {
        served.extend(t.await.expect("caller"));
    }
    served
}

// Issue 14 item 1: two server processes on one SQLite file, hammered at once: the budget and
// the window are met exactly — every 200 counted once, nothing past a limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_file_meet_a_budget_and_a_window_exactly() {
    let dir = tempfile::tempdir().expect("dir");
    let db_path = dir.path().join("pool.db");
    let db = db_path.display().to_string();
    let env = [("DB_PATH", db.as_str()), ("LOG_REQUESTS", "false")];
    let admin = "exact-admin-token-0123456789";
    let one = start_server(&env, admin, &dir.path().join("one.log"), dir.path()).await;
    one.admin(
        Method::POST,
        "/admin/tiers",
        Some(json!({"name": "t", "features": {"f": {"rate_limit": 40, "window_seconds": 3600}}})),
        StatusCode::CREATED,
    )
    .await;
    let mut ids = HashMap::new();
    for (name, limit) in [("budget", json!(25)), ("window", Value::Null)] {
        let key = one
            .admin(
                Method::POST,
                "/admin/keys",
                Some(json!({"name": name, "key": format!("v-{name}"), "tier": "t", "usage_limit": limit})),
                StatusCode::CREATED,
            )
            .await;
        ids.insert(name, key["id"].as_str().expect("id").to_string());
    }
    let two = start_server(&env, admin, &dir.path().join("two.log"), dir.path()).await;
    let (served_one, served_two) = tokio::join!(drain(&one, "f", 12), drain(&two, "f", 12));
    let served: Vec<&String> = served_one.iter().chain(&served_two).collect();
    let per = |name: &str| served.iter().filter(|k| ***k == ids[name]).count() as i64;
    assert_eq!(per("budget"), 25, "the budget: {served:?}");
    assert_eq!(per("window"), 40, "the window: {served:?}");
    assert!(
        !served_one.is_empty() && !served_two.is_empty(),
        "both served"
    );
    let pool = open_db(&db_path).await;
    let scalar = |sql: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .expect(&sql)
        }
    };
    assert_eq!(scalar("SELECT COUNT(*) FROM usage_events".into()).await, 65);
    assert_eq!(
        scalar(format!(
            "SELECT usage_count FROM keys WHERE id = '{}'",
            ids["budget"]
        ))
        .await,
        25
    );
    assert_eq!(
        scalar(format!(
            "SELECT count FROM window_counts WHERE key_id = '{}'",
            ids["window"]
        ))
        .await,
        40
    );
    assert_eq!(
        scalar(format!(
            "SELECT count FROM window_counts WHERE key_id = '{}'",
            ids["budget"]
        ))
        .await,
        25
    );
}
