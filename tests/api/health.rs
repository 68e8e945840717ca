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
