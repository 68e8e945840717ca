//! The libSQL driver's remote realities: an unreachable or slow database answers 503 in
//! bounded time without serving an uncounted key and recovers by itself; startup failures
//! are one clear line that never carries the token.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;
use crate::hrana::HranaServer;

async fn remote_app(extra: &[(&str, &str)]) -> TestApp {
    BACKEND.scope(Backend::Libsql, spawn_app_with(extra)).await
}

async fn remote(app: &TestApp) -> tokio::sync::MutexGuard<'_, HranaServer> {
    app.remote
        .as_ref()
        .expect("libSQL test server")
        .lock()
        .await
}

async fn assert_exact(app: &TestApp, served: i64) {
    assert_eq!(app.count("SELECT SUM(usage_count) FROM keys").await, served);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_answers_503_in_bounded_time_and_recovers() {
    let app = remote_app(&[("DB_BUSY_TIMEOUT_MS", "500")]).await;
    app.create_tier("t", &[("scrape", 100, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t", "usage_limit": 5 }))
        .await;
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);

    remote(&app).await.stop().await;
    for _ in 0..3 {
        let started = Instant::now();
        let r = app.draw("scrape", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        assert!(r.body.get("value").is_none());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    let admin = app
        .admin_post("/admin/consumers", json!({ "name": "while-down" }))
        .await;
    assert_eq!(admin.status, StatusCode::SERVICE_UNAVAILABLE);

    remote(&app).await.restart().await;
    // The failed serves were given back: four more fit in the budget of five.
    for _ in 0..4 {
        assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    assert_eq!(
        app.draw("scrape", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_exact(&app, 5).await;
    assert_eq!(
        app.admin_post("/admin/consumers", json!({ "name": "after" }))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_answers_503_in_bounded_time_and_never_over_counts() {
    let app = remote_app(&[("DB_BUSY_TIMEOUT_MS", "300")]).await;
    app.create_tier("t", &[("scrape", 100, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t", "usage_limit": 3 }))
        .await;
    remote(&app).await.set_delay(Duration::from_secs(2));
    let started = Instant::now();
    let r = app.draw("scrape", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    // One attempt and one retry, each bounded by DB_BUSY_TIMEOUT_MS.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    remote(&app).await.set_delay(Duration::ZERO);
    for _ in 0..3 {
        assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    }
    assert_eq!(
        app.draw("scrape", ADMIN_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_exact(&app, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_work_after_streams_expired_while_idle() {
    let app = remote_app(&[]).await;
    remote(&app)
        .await
        .set_stream_idle_timeout(Duration::from_millis(100));
    app.create_tier("t", &[("scrape", 100, 3600)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" }))
        .await;
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        app.admin_get("/admin/usage")
            .await
            .body
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(app.draw("scrape", ADMIN_TOKEN).await.status, StatusCode::OK);
    app.add_key(json!({ "name": "k2", "key": "v2", "tier": "t" }))
        .await;
    assert_exact(&app, 2).await;
}

fn config(url: &str, token: Option<&str>) -> keypooler::config::Config {
    let mut vars = vec![
        ("ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("DATABASE_URL".to_string(), url.to_string()),
    ];
    if let Some(t) = token {
        vars.push(("DATABASE_AUTH_TOKEN".to_string(), t.to_string()));
    }
    vars.push(("DB_BUSY_TIMEOUT_MS".to_string(), "2000".to_string()));
    keypooler::config::Config::from_vars(vars).expect("config")
}

async fn startup_error(config: &keypooler::config::Config) -> String {
    match keypooler::build(config).await {
        Ok(_) => panic!("startup should fail"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_fails_startup_with_one_clear_line() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}?authToken=sekret-token-xyz");
    let cfg = config(&url, None);
    let e = startup_error(&cfg).await;
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("sekret-token-xyz") && !e.contains('\n'), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_fails_startup_with_one_clear_line() {
    let dir = tempfile::tempdir().expect("dir");
    let server = HranaServer::start(&dir.path().join("remote.db"), Some("the-right-token")).await;
    let e = startup_error(&config(&server.url(), Some("a-wrong-token-123"))).await;
    assert!(e.contains("rejected the auth token"), "{e}");
    assert!(
        !e.contains("a-wrong-token-123") && !e.contains("the-right-token"),
        "{e}"
    );

    let mut vars = vec![("ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
    vars.push((
        "DATABASE_URL".to_string(),
        format!("{}?authToken=the-right-token", server.url()),
    ));
    let cfg = keypooler::config::Config::from_vars(vars).expect("config");
    assert!(
        keypooler::build(&cfg).await.is_ok(),
        "the right token in the URL works"
    );
}
