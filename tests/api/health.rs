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
    assert_eq!(app.admin_get("/admin/health").await.body, json!({ "pool_size": 0, "encryption": true, "warnings": [], "unreadable_keys": 0, "key_states": key_states(0, 0) }));
    app.create_tier("t", &[("scrape", 5, 60)]).await;
    app.add_key(json!({ "name": "k1", "key": "v1", "tier": "t" })).await;
    app.add_key(json!({ "name": "k2", "key": "v2", "tier": "t", "usage_limit": 1 })).await;
    assert_eq!(app.admin_get("/admin/health").await.body, json!({ "pool_size": 2, "encryption": true, "warnings": [], "unreadable_keys": 0, "key_states": key_states(2, 0) }));
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

// Issue 7 item 10: on Railway, a SQLite file outside the service's volume is wiped by every
// redeploy; `/admin/health` says so (and the startup log does too).
#[tokio::test]
async fn admin_health_warns_when_railway_would_wipe_the_database() {
    let app = spawn_app_with(&[("RAILWAY_ENVIRONMENT", "production")]).await;
    let warnings = app.admin_get("/admin/health").await.body["warnings"].clone();
    let list = warnings.as_array().expect("warnings is a list");
    assert_eq!(list.len(), 1, "{warnings}");
    let text = list[0].as_str().expect("a warning is text");
    let db_path = app.db_path.display().to_string();
    assert!(
        text.contains("redeploy")
            && text.contains(&db_path)
            && text.contains("RAILWAY_VOLUME_MOUNT_PATH"),
        "{text}"
    );

    let elsewhere = app.dir.path().join("volume").display().to_string();
    let app = spawn_app_with(&[
        ("RAILWAY_ENVIRONMENT", "production"),
        ("RAILWAY_VOLUME_MOUNT_PATH", &elsewhere),
    ])
    .await;
    let body = app.admin_get("/admin/health").await.body;
    assert!(
        body["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains(&elsewhere)),
        "{body}"
    );

    // The test's database lives in a temp dir under the system's temp folder: call that the volume.
    let mount = std::env::temp_dir().display().to_string();
    let app = spawn_app_with(&[
        ("RAILWAY_ENVIRONMENT", "production"),
        ("RAILWAY_VOLUME_MOUNT_PATH", &mount),
    ])
    .await;
    assert!(app.db_path.starts_with(&mount), "{}", app.db_path.display());
    assert_eq!(
        app.admin_get("/admin/health").await.body["warnings"],
        json!([]),
        "the file is on the volume"
    );
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept an idle connection open past its idle timeout"),
        }
    }
}

#[tokio::test]
async fn idle_and_slow_header_connections_are_closed_after_the_idle_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(&[("SERVER_IDLE_TIMEOUT_SECONDS", "1")]).await;
    let addr = app.base.trim_start_matches("http://").to_string();

    let mut keep_alive = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    keep_alive
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let answer = read_until_closed(&mut keep_alive).await;
    assert!(String::from_utf8_lossy(&answer).contains(r#"{"status":"ok"}"#));
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost:")
        .await
        .expect("write");
    read_until_closed(&mut slow).await;
    assert_eq!(
        app.get("/health", None).await.status,
        StatusCode::OK,
        "the server is unharmed"
    );
}

/// Reads until `needle` has arrived (a whole response on a kept-alive connection).
async fn read_until(stream: &mut tokio::net::TcpStream, needle: &str) {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&all).contains(needle) {
        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => all.extend_from_slice(&buf[..n]),
            other => panic!(
                "no {needle:?} (read {other:?}); got {:?}",
                String::from_utf8_lossy(&all)
            ),
        }
    }
}

/// Whether the server closes `stream` within `limit` (anything it still sends is discarded).
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

// Issue 7 item 8: on shutdown, idle and header-incomplete connections are closed at once; only
// a request being handled is awaited. A client still sending its first request's headers used
// to hold the drain until the header timeout (here 60 s), past any shutdown grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_and_half_sent_connections_at_once_and_finishes_requests_in_flight() {
    use tokio::io::AsyncWriteExt;
    let mut app = spawn_app_with(&[
        ("SERVER_IDLE_TIMEOUT_SECONDS", "60"),
        ("DB_BUSY_TIMEOUT_MS", "60000"),
    ])
    .await;
    app.create_tier("t", &[("scrape", 100, 60)]).await;
    let key_id = app
        .add_key(json!({ "name": "k", "key": "v1", "tier": "t" }))
        .await;
    let (_, token) = app.consumer("c", &["t"]).await;
    let addr = app.base.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(addr.clone());

    let mut never_spoke = connect().await.expect("connect");
    let mut half_first_head = connect().await.expect("connect");
    half_first_head
        .write_all(b"GET /health HTTP/1.1\r\nHost:")
        .await
        .expect("write");
    let mut idle_after_one = connect().await.expect("connect");
    let mut half_second_head = connect().await.expect("connect");
    for stream in [&mut idle_after_one, &mut half_second_head] {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        read_until(stream, r#"{"status":"ok"}"#).await;
    }
    half_second_head
        .write_all(b"GET /health HTTP/1.1\r\nHo")
        .await
        .expect("write");

    // A request being handled: its commit waits while the test holds SQLite's write lock.
    let lock = rusqlite::Connection::open(&app.db_path).expect("open the database file");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let in_flight = {
        let request = app
            .client
            .get(app.url("/key?feature=scrape"))
            .bearer_auth(&token);
        tokio::spawn(async move {
            let r = request
                .send()
                .await
                .expect("the in-flight request is answered");
            let status = r.status();
            (status, r.text().await.expect("its body"))
        })
    };
    // The serve is taken in memory before its commit, so the listing shows it while it waits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let keys = app.admin_get("/admin/keys").await.body;
        let key = &keys[0];
        if key["usage_count"] == 1 || key["usage"]["scrape"]["used"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the /key request never reached its commit: {keys}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let db_path = app.db_path.clone();
    let stopping = tokio::spawn(async move {
        app.stop().await;
        app
    });

    for (name, stream) in [
        ("a connection that never sent a byte", &mut never_spoke),
        (
            "a connection halfway through its first headers",
            &mut half_first_head,
        ),
        ("an idle keep-alive connection", &mut idle_after_one),
        (
            "a keep-alive connection halfway through its next headers",
            &mut half_second_head,
        ),
    ] {
        assert!(
            closed_within(stream, std::time::Duration::from_secs(5)).await,
            "{name} is still open 5 s into the shutdown (header timeout 60 s)"
        );
    }
    assert!(
        !in_flight.is_finished(),
        "the in-flight request waits for its commit"
    );
    assert!(
        !stopping.is_finished(),
        "the shutdown waits for the in-flight request"
    );

    lock.execute_batch("ROLLBACK")
        .expect("release the write lock");
    drop(lock);
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request is answered once its commit can go through")
        .expect("request task");
    assert_eq!(status, StatusCode::OK, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (body["key_id"].as_str(), body["value"].as_str()),
        (Some(key_id.as_str()), Some("v1"))
    );
    let _app = tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("the shutdown completes once the in-flight request is answered")
        .expect("server task"); // kept: it owns the temp dir
    let db = crate::helpers::open_db(&db_path).await;
    let committed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_events")
        .fetch_one(&db)
        .await
        .expect("count audit rows");
    db.close().await;
    assert_eq!(committed, 1, "the answered serve is committed");
}

/// `/admin/health`'s keys per health state (issue 9 item 7), every state listed.
pub fn key_states(active: u64, disabled: u64) -> serde_json::Value {
    json!({ "active": active, "cooling": 0, "probing": 0, "exhausted": 0, "quarantined": 0, "disabled": disabled })
}
