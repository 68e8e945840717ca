//! A fast local upstream for the proxy benchmark (`bench/proxy.py`; issue 13 item 6), built with
//! `cargo build --release --example upstream_stub`. Binds 127.0.0.1 on the port given as the
//! first argument (0 or none: any free port) and prints `port=N` once listening.
//!
//! - `ANY /small`: a small JSON answer.
//! - `ANY /slow?ms=N`: the same answer after N ms (default 20): an upstream with a realistic
//!   service time, against which the proxy's own cost shows as added latency.
//! - `GET /sse?events=N&gap_ms=M`: N server-sent events, M ms apart (first one at once).
//! - `GET /big?mib=N`: N MiB of bytes in 64 KiB chunks (default 1024: 1 GiB).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;

#[derive(serde::Deserialize)]
struct Sse {
    events: Option<u32>,
    gap_ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Slow {
    ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Big {
    mib: Option<u64>,
}

async fn small() -> Response {
    (
        [("content-type", "application/json")],
        "{\"id\":\"result-1\",\"status\":\"ok\",\"credits\":1}",
    )
        .into_response()
}

async fn slow(Query(q): Query<Slow>) -> Response {
    tokio::time::sleep(Duration::from_millis(q.ms.unwrap_or(20))).await;
    small().await
}

async fn sse(Query(q): Query<Sse>) -> Response {
    let (events, gap) = (
        q.events.unwrap_or(5),
        Duration::from_millis(q.gap_ms.unwrap_or(0)),
    );
    let stream = futures_util::stream::unfold(0u32, move |n| async move {
        if n >= events {
            return None;
        }
        if n > 0 && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let event = Bytes::from(format!("data: {{\"n\":{n}}}\n\n"));
        Some((Ok::<_, std::io::Error>(event), n + 1))
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn big(Query(q): Query<Big>) -> Response {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = q.mib.unwrap_or(1024) * 16;
    let stream =
        futures_util::stream::iter(0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    (
        [("content-type", "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let app = Router::new()
        .route("/small", any(small))
        .route("/slow", any(slow))
        .route("/sse", get(sse))
        .route("/big", get(big));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("port={}", listener.local_addr()?.port());
    axum::serve(listener, app).await
}
