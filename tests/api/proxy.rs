//! Issue 13 (SPEC §8.6): proxy mode against upstream stubs (axum on 127.0.0.1:0) started by
//! each test, which record what they receive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::response::{IntoResponse, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// One request as the stub received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Seen {
    /// Everything the upstream saw, as text, to search for what must not be there.
    fn all_text(&self) -> String {
        let mut text = format!("{} {}\n", self.method, self.target);
        for (n, v) in &self.headers {
            text.push_str(&format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        text.push_str(&String::from_utf8_lossy(&self.body));
        text
    }
}

#[derive(Default)]
struct StubState {
    seen: parking_lot::Mutex<Vec<Seen>>,
    /// `/by-key`: the answer (status, body) for a key value found anywhere in the request.
    by_key: parking_lot::Mutex<HashMap<String, (u16, String)>>,
    /// `/sse`: released by the test after it has read the first event.
    release: tokio::sync::Notify,
}

struct Stub {
    base: String,
    state: Arc<StubState>,
}

impl Stub {
    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    fn answer_for(&self, key: &str, status: u16, body: &str) {
        self.state
            .by_key
            .lock()
            .insert(key.to_owned(), (status, body.to_owned()));
    }
}

/// Path and query of a request as sent.
fn target_of(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default()
}

async fn stub_handler(State(state): State<Arc<StubState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default()
        .to_vec();
    let target = target_of(&parts.uri);
    let seen = Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body,
    };
    let text = seen.all_text();
    state.seen.lock().push(seen);
    let path = parts.uri.path();
    if path.ends_with("/by-key") {
        let found = state
            .by_key
            .lock()
            .iter()
            .find(|(k, _)| text.contains(k.as_str()))
            .map(|(_, a)| a.clone());
        let (status, body) = found.unwrap_or((200, "{\"ok\":true}".into()));
        let mut response = (AxStatus::from_u16(status).unwrap(), body).into_response();
        if status == 429 {
            response
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
        }
        return response;
    }
    if path.ends_with("/leak") {
        // An error body that quotes the key, split across chunks, and a header echoing it.
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("x-api-key: "))
            .unwrap_or_default()
            .to_owned();
        let (first, second) = key.split_at(key.len() / 2);
        let chunks = vec![
            format!("{{\"error\":\"invalid api key {first}"),
            format!("{second}\",\"key\":\"{key}\"}}"),
        ];
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::from(c))),
        );
        let mut response = Response::new(Body::from_stream(stream));
        *response.status_mut() = AxStatus::BAD_REQUEST;
        response
            .headers_mut()
            .insert("x-echo", format!("key={key}").parse().unwrap());
        return response;
    }
    if path.ends_with("/sse") {
        let state = state.clone();
        let stream = async_stream(move |tx| async move {
            let _ = tx.send("data: first\n\n".to_string()).await;
            state.release.notified().await;
            let _ = tx.send("data: last\n\n".to_string()).await;
        });
        let mut response = Response::new(stream);
        response
            .headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        return response;
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return "late".into_response();
    }
    if path.ends_with("/stall") {
        let stream = async_stream(|tx| async move {
            let _ = tx.send("first chunk;".to_string()).await;
            std::future::pending::<()>().await;
        });
        return Response::new(stream);
    }
    if path.ends_with("/big") {
        // 4 MiB in 64 KiB chunks.
        let chunk = axum::body::Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::iter(
            (0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        );
        return Response::new(Body::from_stream(stream));
    }
    axum::Json(json!({
        "method": parts.method.to_string(),
        "target": target,
        "length": state.seen.lock().last().map(|s| s.body.len()),
    }))
    .into_response()
}

/// A body fed by a task through a channel, chunk by chunk.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    tokio::spawn(produce(tx));
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::from(c))))
    });
    Body::from_stream(stream)
}

async fn start_stub() -> Stub {
    let state = Arc::new(StubState::default());
    let app = axum::Router::new()
        .fallback(stub_handler)
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Stub { base, state }
}

/// A tier named `name` serving `feature` through `upstream`.
async fn proxied_tier(app: &TestApp, name: &str, feature: &str, upstream: Value) {
    let r = app
        .admin_post(
            "/admin/tiers",
            json!({ "name": name, "features": { feature: { "rate_limit": 1000 } }, "upstream": upstream }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

fn bearer_upstream(base: &str) -> Value {
    json!({ "base_url": format!("{base}/v1"), "auth": { "header": "Authorization", "prefix": "Bearer " } })
}

/// Four keys of tier "t", named and valued `{prefix}-{i}`, each answered `status` and `body` by
/// the stub.
async fn keys_answering(app: &TestApp, stub: &Stub, prefix: &str, status: u16, body: &str) {
    for i in 0..4 {
        let key = format!("{prefix}-{i}");
        app.add_key(json!({ "name": key, "key": key, "tier": "t" }))
            .await;
        stub.answer_for(&key, status, body);
    }
}

impl TestApp {
    fn proxy(&self, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(&format!("/proxy{path}")))
            .bearer_auth(token)
    }
}

/// The stored outcome (class, status) of serve `id`, once reported (bounded wait: streamed
/// answers are reported when their body ends).
async fn outcome_of(app: &TestApp, serve_id: &str) -> (String, Option<String>) {
    for _ in 0..200 {
        let rows = app
            .rows_with(
                "SELECT outcome_class, outcome_status FROM usage_events WHERE id = ?",
                &[serve_id],
            )
            .await;
        if let Some(row) = rows.first() {
            if let Some(class) = &row[0] {
                return (class.clone(), row[1].clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no outcome recorded for serve {serve_id}");
}

fn serve_id(r: &Resp) -> String {
    r.headers["x-keypool-serve-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

// Issue 13 items 1–2: the pooled key is injected per auth scheme, the caller's token (bearer or
// X-Keypool-Token) and credential headers are stripped, method, path, query and body arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_injected_per_scheme_and_the_callers_token_never_leaves() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    let schemes = [
        (
            "bearer",
            json!({ "header": "Authorization", "prefix": "Bearer " }),
            "authorization",
            "Bearer ",
        ),
        (
            "token",
            json!({ "header": "Authorization", "prefix": "Token " }),
            "authorization",
            "Token ",
        ),
        (
            "raw",
            json!({ "header": "authorization" }),
            "authorization",
            "",
        ),
        ("xapikey", json!({ "header": "x-api-key" }), "x-api-key", ""),
        (
            "xiapikey",
            json!({ "header": "xi-api-key" }),
            "xi-api-key",
            "",
        ),
    ];
    let (_, consumer_token) = {
        let mut tiers = Vec::new();
        for (name, auth, _, _) in &schemes {
            let upstream = json!({ "base_url": format!("{}/v1", stub.base), "auth": auth,
                "headers": { "x-static": "yes" } });
            proxied_tier(&app, name, &format!("f-{name}"), upstream).await;
            app.add_key(json!({ "name": format!("k-{name}"), "key": format!("pooled-{name}-secret"), "tier": name }))
                .await;
            tiers.push(*name);
        }
        proxied_tier(
            &app,
            "query",
            "f-query",
            json!({ "base_url": format!("{}/v1", stub.base), "auth": { "query": "api_key" } }),
        )
        .await;
        app.add_key(json!({ "name": "k-query", "key": "pooled query/secret", "tier": "query" }))
            .await;
        tiers.push("query");
        app.consumer("proxy-user", &tiers).await
    };
    for (i, (name, _, header, prefix)) in schemes.iter().enumerate() {
        // Alternate the two ways a caller authenticates.
        let mut req = app
            .client
            .post(app.url(&format!("/proxy/f-{name}/items/42?x=1&y=a%20b")))
            .header("content-type", "application/json")
            .header("x-api-key", "caller-sdk-placeholder")
            .header("cookie", "session=caller")
            .body("{\"hello\":1}");
        req = if i % 2 == 0 {
            req.bearer_auth(&consumer_token)
        } else {
            req.header("x-keypool-token", &consumer_token)
                .header("authorization", "Bearer sdk-dummy")
        };
        let r = app.send(req).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.text);
        assert_eq!(r.headers["x-keypool-attempts"], "1");
        assert!(r.headers.contains_key("x-keypool-serve-id"));
        let seen = stub.seen().pop().expect("the stub got the request");
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.target, "/v1/items/42?x=1&y=a%20b", "{name}");
        assert_eq!(seen.body, b"{\"hello\":1}");
        assert_eq!(
            seen.headers[*header].to_str().unwrap(),
            format!("{prefix}pooled-{name}-secret"),
            "{name}"
        );
        assert_eq!(seen.headers["x-static"], "yes");
        assert_eq!(seen.headers["content-type"], "application/json");
        assert_eq!(
            seen.headers["host"],
            stub.base.trim_start_matches("http://")
        );
        let text = seen.all_text();
        for leaked in [
            consumer_token.as_str(),
            "caller-sdk-placeholder",
            "sdk-dummy",
            "session=caller",
        ] {
            assert!(
                !text.contains(leaked),
                "{name}: {leaked} reached the upstream:\n{text}"
            );
        }
        assert!(!seen.headers.contains_key("x-keypool-token"));
    }
    // The query scheme: the caller's own api_key parameter is replaced, not doubled.
    let r = app
        .send(app.proxy(
            reqwest::Method::GET,
            "/f-query/search?q=1&api_key=caller-guess",
            &consumer_token,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let seen = stub.seen().pop().expect("request");
    assert_eq!(seen.target, "/v1/search?q=1&api_key=pooled+query%2Fsecret");
    assert!(!seen.headers.contains_key("authorization"));
    assert!(!seen.all_text().contains(&consumer_token));
}

// Issue 13 item 4: 429, 401 and 402 are retried on a different key; the caller sees only the
// final answer, and each failed attempt's outcome reached key health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_429_401_402_go_to_another_key_and_the_caller_sees_only_the_last_answer() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    for (status, class) in [
        (429u16, "rate_limited"),
        (401, "auth_invalid"),
        (402, "quota_exhausted"),
    ] {
        let tier = format!("t{status}");
        let feature = format!("f{status}");
        proxied_tier(&app, &tier, &feature, bearer_upstream(&stub.base)).await;
        // Round-robin starts at the tier's first key: the failing one.
        let bad = format!("bad-{status}-key");
        let good = format!("good-{status}-key");
        app.add_key(json!({ "name": bad, "key": bad, "tier": tier }))
            .await;
        app.add_key(json!({ "name": good, "key": good, "tier": tier }))
            .await;
        stub.answer_for(&bad, status, "{\"error\":\"no\"}");
        let before = stub.seen().len();
        let r = app
            .send(app.proxy(
                reqwest::Method::GET,
                &format!("/{feature}/by-key"),
                ADMIN_TOKEN,
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{status}: {}", r.text);
        assert_eq!(r.body, json!({ "ok": true }));
        assert_eq!(r.headers["x-keypool-attempts"], "2");
        let seen: Vec<String> = stub.seen()[before..]
            .iter()
            .map(|s| s.headers["authorization"].to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            seen,
            vec![format!("Bearer {bad}"), format!("Bearer {good}")]
        );
        // Two serves audited: the failed one with its class, the answered one ok.
        let rows = app
            .rows_with(
                "SELECT outcome_class, outcome_status FROM usage_events WHERE feature = ? ORDER BY created_at",
                &[&feature],
            )
            .await;
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0][0].as_deref(), Some(class));
        assert_eq!(rows[0][1].as_deref(), Some(status.to_string().as_str()));
        assert_eq!(outcome_of(&app, &serve_id(&r)).await.0, "ok");
    }
    // Key health heard of every failed attempt.
    let keys = app.admin_get("/admin/keys").await.body;
    for key in keys.as_array().unwrap() {
        let name = key["name"].as_str().unwrap();
        let health = &key["health"];
        if let Some(status) = name.strip_prefix("bad-").and_then(|n| n.split('-').next()) {
            assert_eq!(
                health["last_status"].to_string(),
                status,
                "{name}: {health}"
            );
        }
        if name.starts_with("bad-401") {
            assert_eq!(health["state"], "cooling", "{name}");
        } else if name.starts_with("bad-402") {
            assert_eq!(health["state"], "exhausted", "{name}");
        } else if name.starts_with("good") {
            assert_eq!(health["state"], "active", "{name}");
        }
    }
}

// Issue 13 item 4: with no other key left, the caller gets the upstream's own last answer
// (status, Retry-After, body); at most three attempts are made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_key_fails_the_last_upstream_answer_is_passed_on_after_at_most_three_attempts() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "t", "f", bearer_upstream(&stub.base)).await;
    keys_answering(&app, &stub, "dead-key", 401, "{\"error\":\"unauthorized\"}").await;
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/by-key", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
    assert_eq!(r.body, json!({ "error": "unauthorized" }));
    assert_eq!(r.headers["x-keypool-attempts"], "3");
    assert_eq!(stub.seen().len(), 3);

    // One key, rate limited: its 429 and Retry-After come back after the one attempt.
    proxied_tier(&app, "one", "g", bearer_upstream(&stub.base)).await;
    app.add_key(json!({ "name": "only", "key": "only-key", "tier": "one" }))
        .await;
    stub.answer_for("only-key", 429, "slow down");
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/g/by-key", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.text, "slow down");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.headers["x-keypool-attempts"], "1");
}

// Issue 13 item 4: a 400 (client_error) is the caller's mistake: never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_not_retried() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "t", "f", bearer_upstream(&stub.base)).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    app.add_key(json!({ "name": "b", "key": "key-b", "tier": "t" }))
        .await;
    stub.answer_for("key-a", 400, "{\"error\":\"bad field\"}");
    let r = app
        .send(app.proxy(reqwest::Method::POST, "/f/by-key", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body, json!({ "error": "bad field" }));
    assert_eq!(r.headers["x-keypool-attempts"], "1");
    assert_eq!(stub.seen().len(), 1);
    assert_eq!(
        outcome_of(&app, &serve_id(&r)).await,
        ("client_error".into(), Some("400".into()))
    );
}

// Issue 13 item 3: SSE events reach the caller one by one: the first before the stub sends
// the last (the stub waits for the test to release it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_incrementally() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "t", "f", bearer_upstream(&stub.base)).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    let mut r = app
        .proxy(reqwest::Method::GET, "/f/sse", ADMIN_TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .expect("the first event arrives while the stub still holds the last")
        .expect("chunk")
        .expect("some bytes");
    assert_eq!(&first[..], b"data: first\n\n");
    stub.state.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = r.chunk().await.expect("chunk") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"data: last\n\n");
}

// Issue 13 item 4: an upstream that is down is a `network` outcome, tried on the other keys
// (nothing was sent), then 502 JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_answers_502_json() {
    let app = spawn_app().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let upstream =
        json!({ "base_url": format!("http://{closed}"), "auth": { "header": "x-api-key" } });
    proxied_tier(&app, "t", "f", upstream).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    app.add_key(json!({ "name": "b", "key": "key-b", "tier": "t" }))
        .await;
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/x", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert!(r.error().contains("could not connect"));
    let rows = app
        .rows("SELECT outcome_class FROM usage_events ORDER BY created_at")
        .await;
    assert_eq!(rows, vec![vec![Some("network".to_string())]; 2]);
}

// Issue 13 item 4: slow response headers end in 504 JSON at the tier's timeout_seconds, as an
// `upstream_error` outcome; nothing is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_time_out_with_504_json() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    let upstream =
        json!({ "base_url": stub.base, "auth": { "header": "x-api-key" }, "timeout_seconds": 1 });
    proxied_tier(&app, "t", "f", upstream).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    app.add_key(json!({ "name": "b", "key": "key-b", "tier": "t" }))
        .await;
    let started = std::time::Instant::now();
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/slow", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    assert!(r.error().contains("1 s"), "{}", r.text);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(stub.seen().len(), 1);
    let rows = app.rows("SELECT outcome_class FROM usage_events").await;
    assert_eq!(rows, vec![vec![Some("upstream_error".to_string())]]);
}

// Issue 13 items 3–4: a stream that stalls after its first bytes is cut at the deadline (the
// caller got those bytes, then an aborted body), never retried once a byte went out, and
// reported as `upstream_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_cut_and_not_retried_after_bytes_went_out() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    let upstream =
        json!({ "base_url": stub.base, "auth": { "header": "x-api-key" }, "timeout_seconds": 1 });
    proxied_tier(&app, "t", "f", upstream).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    app.add_key(json!({ "name": "b", "key": "key-b", "tier": "t" }))
        .await;
    let mut r = app
        .proxy(reqwest::Method::GET, "/f/stall", ADMIN_TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let id = r.headers()["x-keypool-serve-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let first = r.chunk().await.expect("first chunk").expect("bytes");
    assert_eq!(&first[..], b"first chunk;");
    let rest = tokio::time::timeout(Duration::from_secs(20), r.chunk())
        .await
        .expect("the stalled body is cut, not left hanging");
    assert!(
        rest.is_err(),
        "the body must end in an error, not look complete: {rest:?}"
    );
    assert_eq!(stub.seen().len(), 1);
    assert_eq!(outcome_of(&app, &id).await.0, "upstream_error");
}

/// Sends a raw HTTP/1.1 request line (so no client normalises the path); the status code.
async fn raw_status(app: &TestApp, target: &str) -> u16 {
    let addr = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// Issue 13 item 5: traversal and absolute URLs are refused with 400 before anything is drawn
// or sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_and_absolute_urls_are_refused() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "t", "f", bearer_upstream(&stub.base)).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "t" }))
        .await;
    for target in [
        "/proxy/f/../../admin",
        "/proxy/f/a/../../x",
        "/proxy/f/%2e%2e/x",
        "/proxy/f/%2E%2e%2fx",
        "/proxy/f/a%2f..%2f..%2fx",
        "/proxy/f/http://evil.example/x",
        "/proxy/f//evil.example/x",
        "/proxy/f/a%5c..%5cx",
    ] {
        assert_eq!(raw_status(&app, target).await, 400, "{target}");
    }
    assert!(stub.seen().is_empty(), "{:?}", stub.seen());
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 0);
    assert_eq!(raw_status(&app, "/proxy/f/v1/ok..fine").await, 200);
}

// Issue 13 item 5: a key quoted in an upstream error body (even split across chunks) or echoed
// in a header never reaches the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_an_upstream_error_body_never_reaches_the_caller() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    let upstream = json!({ "base_url": stub.base, "auth": { "header": "x-api-key" } });
    proxied_tier(&app, "t", "f", upstream).await;
    let key = "sk-live-0123456789abcdef";
    app.add_key(json!({ "name": "a", "key": key, "tier": "t" }))
        .await;
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/leak", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(!r.text.contains(key), "{}", r.text);
    assert_eq!(
        r.text,
        "{\"error\":\"invalid api key [REDACTED]\",\"key\":\"[REDACTED]\"}"
    );
    for (name, value) in &r.headers {
        assert!(!value.to_str().unwrap_or_default().contains(key), "{name}");
    }
    assert!(!r.headers.contains_key("x-echo"));
}

// Issue 13 items 2 and 5: auth, scope and configuration errors answer like /key, in JSON,
// before anything is drawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_answers_401_403_404_409_like_key_and_draws_nothing() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "p", "proxied", bearer_upstream(&stub.base)).await;
    app.create_tier("plain", &[("direct", 10, 60)]).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "p" }))
        .await;
    app.add_key(json!({ "name": "b", "key": "key-b", "tier": "plain" }))
        .await;
    let (_, token) = app.consumer("c", &["plain"]).await;
    let none = app.send(app.client.get(app.url("/proxy/proxied/x"))).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    let wrong = app
        .send(
            app.client
                .get(app.url("/proxy/proxied/x"))
                .header("x-keypool-token", "nope"),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let out = app
        .send(app.proxy(reqwest::Method::GET, "/proxied/x", &token))
        .await;
    assert_eq!(out.status, StatusCode::FORBIDDEN, "{}", out.text);
    let unknown = app
        .send(app.proxy(reqwest::Method::GET, "/nosuch/x", &token))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let off = app
        .send(app.proxy(reqwest::Method::GET, "/direct/x", &token))
        .await;
    assert_eq!(off.status, StatusCode::CONFLICT, "{}", off.text);
    assert!(off.error().contains("upstream"));
    // Only the documented methods are routed (Schemathesis: TRACE answered 502 before).
    let trace = app
        .send(app.proxy(reqwest::Method::TRACE, "/proxied/x", ADMIN_TOKEN))
        .await;
    assert_eq!(
        trace.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        trace.text
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 0);
    assert!(stub.seen().is_empty());
}

// Issue 13 items 3 and 5: bodies past the 1 MiB JSON limit pass: up to 10 MiB buffered, a larger
// one streamed through in one attempt; a 4 MiB answer streams back intact. The proxy's
// upstream latency is in /metrics by tier and status, and (issue 13 item 6) its wait for each
// attempt's durable serve by tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_pass_both_ways_and_latency_is_measured() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "big-tier", "f", bearer_upstream(&stub.base)).await;
    app.add_key(json!({ "name": "a", "key": "key-a", "tier": "big-tier" }))
        .await;
    for size in [3 * 1024 * 1024, 12 * 1024 * 1024] {
        let r = app
            .send(
                app.proxy(reqwest::Method::PUT, "/f/upload", ADMIN_TOKEN)
                    .body(vec![b'u'; size]),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{size}: {}", r.text);
        assert_eq!(r.body["length"], size, "{size}");
        assert_eq!(stub.seen().last().unwrap().body.len(), size);
    }
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/big", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text.len(), 4 * 1024 * 1024);
    let metrics = app.get("/metrics", None).await.text;
    assert!(
        metrics.contains(
            "keypooler_proxy_upstream_duration_seconds_count{tier=\"big-tier\",status=\"200\"} 3"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("keypooler_proxy_draw_duration_seconds_count{tier=\"big-tier\"} 3"),
        "{metrics}"
    );
}

on_both_drivers! {
// Issue 13 item 1: `upstream` on POST/PATCH tiers: validated (the field is named), shown,
// stored (a restart keeps it), left alone by a PATCH without it, removed by `null`, and gone
// with a forced delete.
async fn tier_upstream_is_validated_stored_patched_and_removed() {
    let mut app = spawn_app().await;
    let post = |upstream: Value| json!({ "name": "t", "features": { "f": { "rate_limit": 5 } }, "upstream": upstream });
    for (upstream, field) in [
        (json!({ "base_url": "ftp://x.example", "auth": { "header": "x-api-key" } }), "base_url"),
        (json!({ "base_url": "https://user:pw@x.example", "auth": { "header": "x-api-key" } }), "base_url"),
        (json!({ "base_url": "https://x.example/#f", "auth": { "header": "x-api-key" } }), "base_url"),
        (json!({ "base_url": "https://x.example?a=1", "auth": { "header": "x-api-key" } }), "base_url"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "bad header" } }), "auth.header"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "Host" } }), "auth.header"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x", "prefix": "a\nb" } }), "auth.prefix"),
        (json!({ "base_url": "https://x.example", "auth": { "query": "a b" } }), "auth.query"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x", "query": "y" } }), "auth"),
        (json!({ "base_url": "https://x.example", "auth": {} }), "auth"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x" }, "headers": { "connection": "close" } }), "headers"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x" }, "headers": { "x-v": "a\u{7f}" } }), "headers.x-v"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x" }, "timeout_seconds": 0 }), "timeout_seconds"),
        (json!({ "base_url": "https://x.example", "auth": { "header": "x" }, "extra": 1 }), "extra"),
        (json!({ "auth": { "header": "x" } }), "base_url"),
        (json!("https://x.example"), "upstream"),
    ] {
        let r = app.admin_post("/admin/tiers", post(upstream.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{upstream}: {}", r.text);
        assert!(r.error().contains(field), "{upstream}: {}", r.text);
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM tiers").await, 0);

    let given = json!({ "base_url": "https://api.firecrawl.dev/", "auth": { "header": "Authorization", "prefix": "Bearer " },
        "headers": { "X-Client": "keypooler" }, "timeout_seconds": 30 });
    let r = app.admin_post("/admin/tiers", post(given)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let shown = json!({ "base_url": "https://api.firecrawl.dev", "auth": { "header": "authorization", "prefix": "Bearer " },
        "headers": { "x-client": "keypooler" }, "timeout_seconds": 30 });
    assert_eq!(r.body["upstream"], shown);
    app.restart().await;
    assert_eq!(app.admin_get("/admin/tiers").await.body[0]["upstream"], shown);

    // PATCH without `upstream` keeps it; with a new one replaces it; `null` removes it.
    let patch = |upstream: Option<Value>| {
        let mut body = json!({ "name": "t", "features": { "f": { "rate_limit": 6 } } });
        if let Some(u) = upstream {
            body["upstream"] = u;
        }
        body
    };
    let r = app.admin_send(reqwest::Method::PATCH, "/admin/tiers", Some(&patch(None))).await;
    assert_eq!(r.body["upstream"], shown, "{}", r.text);
    let query = json!({ "base_url": "http://127.0.0.1:9/v1", "auth": { "query": "api_key" } });
    let r = app.admin_send(reqwest::Method::PATCH, "/admin/tiers", Some(&patch(Some(query)))).await;
    assert_eq!(r.body["upstream"], json!({ "base_url": "http://127.0.0.1:9/v1", "auth": { "query": "api_key" }, "headers": {}, "timeout_seconds": null }));
    let r = app.admin_send(reqwest::Method::PATCH, "/admin/tiers", Some(&patch(Some(Value::Null)))).await;
    assert_eq!(r.body["upstream"], Value::Null, "{}", r.text);
    assert_eq!(app.count("SELECT COUNT(*) FROM tier_upstreams").await, 0);

    let r = app.admin_send(reqwest::Method::PATCH, "/admin/tiers", Some(&patch(Some(json!({ "base_url": "https://a.example", "auth": { "header": "x-api-key" } }))))).await;
    assert_eq!(r.status, StatusCode::OK);
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    let r = app.admin_send(reqwest::Method::DELETE, "/admin/tiers/t?force=true", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(app.count("SELECT COUNT(*) FROM tier_upstreams").await, 0);
}
}

// Issue 13 item 4: once the tier is throttled as a whole (SPEC §8.2 host-level throttling: 3
// keys rate limited within a minute), the proxy fans out to no further key: the next request
// gets /key's 429 without reaching the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_tier_gets_no_fan_out_across_keys() {
    let app = spawn_app().await;
    let stub = start_stub().await;
    proxied_tier(&app, "t", "f", bearer_upstream(&stub.base)).await;
    keys_answering(
        &app,
        &stub,
        "limited-key",
        429,
        "{\"error\":\"rate limited\"}",
    )
    .await;
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/by-key", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body, json!({ "error": "rate limited" }));
    assert_eq!(stub.seen().len(), 3);
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/by-key", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        !r.headers.contains_key("x-keypool-attempts"),
        "answered by keypooler: {}",
        r.text
    );
    assert_eq!(
        stub.seen().len(),
        3,
        "no key was tried while the tier cools"
    );
}

/// The locking stub's connection while it holds the write lock.
type HeldLock = Arc<tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>>>;

/// A stub whose every answer (`status`, a small JSON body) is sent while it holds the app's
/// SQLite write lock (`BEGIN IMMEDIATE` on its own connection), taken when the request arrives
/// — after the serve was committed, before its outcome can be.
async fn start_locking_stub(db: sqlx::SqlitePool, status: u16) -> (String, HeldLock) {
    let held: HeldLock = Arc::default();
    let handler = {
        let held = held.clone();
        move || {
            let (db, held) = (db.clone(), held.clone());
            async move {
                let mut conn = db.acquire().await.expect("conn");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut *conn)
                    .await
                    .expect("lock");
                *held.lock().await = Some(conn);
                (
                    AxStatus::from_u16(status).unwrap(),
                    [("content-type", "application/json")],
                    "{\"answer\":true}",
                )
            }
        }
    };
    let router = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (base, held)
}

// Issue 13 item 6 (the proxy's added latency): the caller's answer does not wait for its
// outcome's commit — neither a streamed 2xx nor an error answer that is not retried; the
// outcome rides a later group commit and is still recorded on the audit row and shown in
// /admin/usage. The stub holds the database's write lock while it answers, so no commit can
// land until the test releases it: the answer arriving first proves it did not wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_does_not_wait_for_its_outcome_commit_which_still_lands() {
    let app = spawn_app_with(&[("DB_BUSY_TIMEOUT_MS", "60000")]).await;
    let db = app.db().await;
    for (status, class) in [
        (200u16, "ok"),
        (400, "client_error"),
        (503, "upstream_error"),
    ] {
        let (base, held) = start_locking_stub(db.clone(), status).await;
        let tier = format!("t{status}");
        let feature = format!("f{status}");
        proxied_tier(&app, &tier, &feature, bearer_upstream(&base)).await;
        // Two keys: an error answer that may be retried would wait for its outcome (the next
        // draw must see it); these classes are never retried.
        for k in ["a", "b"] {
            app.add_key(json!({ "name": format!("{k}{status}"), "key": format!("key-{k}-{status}"), "tier": tier }))
                .await;
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            app.send(app.proxy(reqwest::Method::GET, &format!("/{feature}/x"), ADMIN_TOKEN)),
        )
        .await
        .expect("the answer arrives while the outcome cannot be committed yet");
        assert_eq!(answer.status.as_u16(), status, "{}", answer.text);
        assert_eq!(answer.body, json!({ "answer": true }));
        assert_eq!(answer.headers["x-keypool-attempts"], "1");
        let id = serve_id(&answer);
        let unreported = app
            .rows_with(
                "SELECT outcome_class FROM usage_events WHERE id = ?",
                &[&id],
            )
            .await;
        assert_eq!(unreported, vec![vec![None]], "committed before the answer");
        // Release the lock: the outcome lands with the next group commit.
        let mut conn = held.lock().await.take().expect("the stub took the lock");
        sqlx::query("ROLLBACK")
            .execute(&mut *conn)
            .await
            .expect("unlock");
        drop(conn);
        assert_eq!(
            outcome_of(&app, &id).await,
            (class.to_string(), Some(status.to_string()))
        );
        let usage = app
            .admin_get(&format!("/admin/usage?feature={feature}"))
            .await;
        let rows = usage.body.as_array().expect("rows");
        assert_eq!(rows.len(), 1, "{}", usage.text);
        assert_eq!(rows[0]["id"], id.as_str());
        assert_eq!(rows[0]["outcome"]["class"], class);
        assert_eq!(rows[0]["outcome"]["status"], status);
    }
    db.close().await;
}

/// A raw TCP upstream for one connection: it reads the request head, then either never
/// answers (`drip == false`) or sends a chunked 200 and a chunk every 20 ms (up to 10 s). It
/// signals `received` once the head arrived and `closed` when the proxy closed the connection
/// (a read of 0 bytes, or a failed write) — what cancelling the upstream request looks like
/// from the upstream's side, independent of any HTTP server's own detection.
async fn start_raw_upstream(
    drip: bool,
) -> (
    String,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (received_tx, received) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (mut read, mut write) = stream.into_split();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = received_tx.send(());
        let eof = async move {
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let writes = async move {
            if !drip {
                return std::future::pending::<()>().await;
            }
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
            if write.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..500 {
                if write.write_all(b"6\r\nchunk;\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = eof => {}
            () = writes => {}
        }
        let _ = closed_tx.send(());
    });
    (base, received, closed)
}

// Issue 13 item 3: a caller that disconnects cancels the upstream request — while waiting for
// the upstream's response head, and while its body streams — so the upstream sees its
// connection closed at once instead of working on for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_cancels_the_upstream_request() {
    let app = spawn_app().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    for (tier, drip) in [("waiting", false), ("streaming", true)] {
        let (base, received, closed) = start_raw_upstream(drip).await;
        let upstream = json!({ "base_url": base, "auth": { "header": "x-api-key" } });
        proxied_tier(&app, tier, tier, upstream).await;
        app.add_key(
            json!({ "name": format!("{tier}-key"), "key": format!("{tier}-key"), "tier": tier }),
        )
        .await;
        let mut caller = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let request = format!(
            "GET /proxy/{tier}/v1/x HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        );
        caller.write_all(request.as_bytes()).await.expect("write");
        tokio::time::timeout(Duration::from_secs(10), received)
            .await
            .expect("the request reaches the upstream")
            .expect("signalled");
        if drip {
            // The caller reads until the body has begun streaming to it.
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&got).contains("chunk;") {
                let n = tokio::time::timeout(Duration::from_secs(10), caller.read(&mut buf))
                    .await
                    .expect("bytes arrive")
                    .expect("read");
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        }
        drop(caller);
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .unwrap_or_else(|_| {
                panic!("{tier}: the upstream connection stayed open after the caller left")
            })
            .expect("signalled");
    }
}

/// What the HTTPS upstream saw of one request: HTTP version, method, target, headers, body.
type SeenH2 = (axum::http::Version, String, String, HeaderMap, Vec<u8>);

/// An HTTPS upstream on 127.0.0.1 with the fixture certificate (`tests/fixtures/upstream_tls`)
/// that offers only HTTP/2 by ALPN, recording each request.
async fn start_h2_upstream() -> (String, Arc<parking_lot::Mutex<Vec<SeenH2>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream_tls");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(format!("{dir}/leaf.pem"))
            .expect("leaf.pem")
            .collect::<Result<_, _>>()
            .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/leaf.key")).expect("leaf.key");
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("certificate");
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("https://{}", listener.local_addr().expect("addr"));
    let seen: Arc<parking_lot::Mutex<Vec<SeenH2>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                // A client that does not trust the certificate fails here: nothing is served.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |request: Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = http_body_util::BodyExt::collect(body)
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let target = target_of(&parts.uri);
                            let answer = json!({ "version": format!("{:?}", parts.version), "length": body.len() });
                            record.lock().push((
                                parts.version,
                                parts.method.to_string(),
                                target,
                                parts.headers,
                                body,
                            ));
                            Ok::<_, std::convert::Infallible>(Response::new(Body::from(
                                answer.to_string(),
                            )))
                        }
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    (base, seen)
}

// Issue 13 items 1–2: an `https` upstream is reached over HTTP/2 when it offers it (ALPN),
// behind a private CA trusted through UPSTREAM_CA_FILE; the key is injected, the caller's token
// stays behind, a body arrives whole. Without the CA the certificate is refused: 502, and the
// upstream serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_over_http2_with_a_private_ca() {
    let ca = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/upstream_tls/ca.pem"
    );
    let (base, seen) = start_h2_upstream().await;
    let upstream = json!({ "base_url": format!("{base}/v1"), "auth": { "header": "x-api-key" } });

    let untrusting = spawn_app().await;
    proxied_tier(&untrusting, "t", "f", upstream.clone()).await;
    untrusting
        .add_key(json!({ "name": "a", "key": "sk-h2-key", "tier": "t" }))
        .await;
    let r = untrusting
        .send(untrusting.proxy(reqwest::Method::GET, "/f/models", ADMIN_TOKEN))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert!(
        seen.lock().is_empty(),
        "an untrusted certificate must stop the request"
    );

    let app = spawn_app_with(&[("UPSTREAM_CA_FILE", ca)]).await;
    proxied_tier(&app, "t", "f", upstream).await;
    app.add_key(json!({ "name": "a", "key": "sk-h2-key", "tier": "t" }))
        .await;
    let (_, consumer) = app.consumer("c", &["t"]).await;
    let r = app
        .send(app.proxy(reqwest::Method::GET, "/f/models?limit=2", &consumer))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["version"], "HTTP/2.0");
    let body = vec![b'b'; 100_000];
    let r = app
        .send(
            app.proxy(reqwest::Method::POST, "/f/upload", &consumer)
                .body(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["length"], 100_000);
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (version, _, _, headers, _) in &seen {
        assert_eq!(*version, axum::http::Version::HTTP_2);
        assert_eq!(headers["x-api-key"], "sk-h2-key");
        assert!(!headers.contains_key("authorization"));
        let text = format!("{headers:?}");
        assert!(!text.contains(&consumer), "{text}");
    }
    assert_eq!(
        (seen[0].1.as_str(), seen[0].2.as_str()),
        ("GET", "/v1/models?limit=2")
    );
    assert_eq!(
        (seen[1].1.as_str(), seen[1].2.as_str()),
        ("POST", "/v1/upload")
    );
    assert_eq!(seen[1].4, body);
}
