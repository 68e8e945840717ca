//! Watching the service (SPEC §8.1): `/livez`, `/readyz`, `/metrics`, and the layer that gives
//! every response an `x-request-id` and counts it by route template and status.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::MetricsReader;
use super::openapi::Unauthorized;
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::metrics::{write_gauge, HttpSeries, Metrics};
use crate::pool::health::StateKind;
use crate::pool::Pool;

/// How long `/readyz` waits for the database's answer: short, so a probe never hangs for a
/// whole `DB_BUSY_TIMEOUT_MS` (libSQL operations stay bounded by that too, whichever is less).
pub const READY_BOUND: Duration = Duration::from_secs(1);

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller's request id is kept only if it is this long at most (bytes).
pub const MAX_REQUEST_ID: usize = 128;

/// The route label of a request that matched no route (404s): a fixed word, never the path.
pub const UNMATCHED: &str = "unmatched";

/// The body of `/health`, `/livez` and `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Probe {
    /// `ok` for `/health` and `/livez`, `ready` for `/readyz`.
    #[schema(examples("ok", "ready"))]
    status: &'static str,
}

impl Probe {
    pub fn ok() -> Json<Probe> {
        Json(Probe { status: "ok" })
    }
}

/// `GET /livez`: the process is up and serving HTTP; touches nothing else.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "meta",
    operation_id = "livez",
    responses((status = 200, description = "The process is up (touches nothing else)", body = Probe))
)]
pub async fn livez() -> Json<Probe> {
    Probe::ok()
}

/// `GET /readyz`: the database answers a trivial read within `READY_BOUND`, and the pool is
/// loaded (always so here: the router only exists once `build` has loaded it).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "meta",
    operation_id = "readyz",
    responses(
        (status = 200, description = "The pool is loaded and the database answered within 1 s", body = Probe),
        (status = 503, description = "Not ready: the reason (database unavailable or too slow)", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<SharedState>) -> Result<Json<Probe>, ApiError> {
    let reason = match tokio::time::timeout(READY_BOUND, state.db.ping()).await {
        Ok(Ok(())) => return Ok(Json(Probe { status: "ready" })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "not ready: the database did not answer the probe");
            "database unavailable".to_string()
        }
        Err(_) => {
            tracing::warn!(
                bound_ms = READY_BOUND.as_millis() as u64,
                "not ready: the database did not answer the probe in time"
            );
            format!(
                "database did not answer within {} ms",
                READY_BOUND.as_millis()
            )
        }
    };
    Err(ApiError::Unavailable(reason))
}

/// `GET /metrics`: what was recorded, plus key and consumer counts taken from the pool now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    operation_id = "metrics",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text format (README, Observability)",
            content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        Unauthorized,
    )
)]
pub async fn metrics(_: MetricsReader, State(state): State<SharedState>) -> Response {
    let mut text = state.metrics.render();
    pool_census(&state.pool, &mut text);
    if let Some(source) = &state.regbot {
        super::sources::write_metrics(source, &mut text);
    }
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// Keys by tier and state, consumers by state; every tier gets every state (0s included) so a
/// series never vanishes while its tier exists.
fn pool_census(pool: &Pool, out: &mut String) {
    const KEY_STATES: [&str; 9] = [
        "active",
        "spent",
        "expired",
        "unreadable",
        "cooling",
        "probing",
        "exhausted",
        "quarantined",
        "disabled",
    ];
    let now = chrono::Utc::now();
    let tiers = pool.tiers();
    let tier_names: HashMap<&str, &str> = tiers
        .iter()
        .map(|t| (t.record.id.as_str(), t.record.name.as_str()))
        .collect();
    let mut keys: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for tier in &tiers {
        for state in KEY_STATES {
            keys.insert((tier.record.name.clone(), state), 0);
        }
    }
    for key in pool.keys() {
        // One state per key, the first that applies: why it cannot serve, else active.
        let health = key.health().state;
        let state = if key.material.is_err() {
            "unreadable"
        } else if key.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else if health != StateKind::Active {
            health.as_str()
        } else if key
            .budget
            .usage_limit
            .is_some_and(|limit| key.usage(now).count >= limit)
        {
            "spent"
        } else {
            "active"
        };
        // A key whose tier is gone (a Go database may hold one) counts under tier="".
        let tier = tier_names
            .get(&*key.tier_id)
            .map(|name| name.to_string())
            .unwrap_or_default();
        *keys.entry((tier, state)).or_default() += 1;
    }
    write_gauge(
        out,
        "keypooler_keys",
        "Stored keys by tier name and state (unreadable, expired, a health state other than active, spent budget, active)",
        keys.into_iter().map(|((tier, state), n)| {
            (vec![("tier", tier), ("state", state.to_string())], n as f64)
        }),
    );
    let mut consumers: BTreeMap<&str, usize> =
        [("active", 0), ("inactive", 0), ("unreadable", 0)].into();
    for consumer in pool.consumers() {
        let state = if consumer.token_hash.is_none() {
            "unreadable"
        } else if consumer.is_active {
            "active"
        } else {
            "inactive"
        };
        *consumers.entry(state).or_default() += 1;
    }
    write_gauge(
        out,
        "keypooler_consumers",
        "Consumers by state (unreadable: stored token hash cannot be read, no token matches)",
        consumers
            .into_iter()
            .map(|(state, n)| (vec![("state", state.to_string())], n as f64)),
    );
}

/// The caller's `x-request-id` if it sent exactly one that is 1–128 bytes of `[A-Za-z0-9._:-]`
/// (safe in any log or header); anything else is replaced, never echoed.
fn caller_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut sent = headers.get_all(X_REQUEST_ID).iter();
    let id = sent.next()?;
    if sent.next().is_some() {
        return None;
    }
    let bytes = id.as_bytes();
    let sane = (1..=MAX_REQUEST_ID).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    sane.then(|| id.clone())
}

/// A UUID v7 (time-ordered). Built without uuid's shared v7 context, which is a process-wide
/// mutex: the counter bits are random instead, so no request waits on another.
fn generated_request_id() -> HeaderValue {
    let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
    let mut buffer = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buffer))
        .unwrap_or_else(|_| HeaderValue::from_static("unavailable"))
}

/// The request id a request carries (in its extensions) for the request log line.
#[derive(Clone)]
pub struct RequestId(pub HeaderValue);

/// Applied to the whole router (after its routes): every response gets `x-request-id`, and
/// every request is counted by route template and status, with its latency.
///
/// axum applies a layer to each route's method endpoint (and the fallbacks) separately, so each
/// service this makes serves one route and keeps its own table of series. Recording is then a
/// lock-free lookup (`OnceLock`s indexed by status) and atomic increments on cached handles:
/// no lock and no map is touched per request, so the `/key` hot path stays hot.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Metrics,
}

impl ObserveLayer {
    pub fn new(metrics: Metrics) -> ObserveLayer {
        ObserveLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            endpoint: Arc::new(Endpoint {
                metrics: self.metrics.clone(),
                route: OnceLock::new(),
                series: OnceLock::new(),
            }),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    endpoint: Arc<Endpoint>,
}

/// The series of one endpoint, by status (100–599), registered on first use.
struct Endpoint {
    metrics: Metrics,
    /// The route label its series carry, set by its first request.
    route: OnceLock<String>,
    series: OnceLock<Box<[OnceLock<HttpSeries>]>>,
}

const FIRST_STATUS: u16 = 100;
const STATUSES: usize = 500;

impl Endpoint {
    fn record(&self, route: &str, status: u16, seconds: f64) {
        let slot = status
            .checked_sub(FIRST_STATUS)
            .map(usize::from)
            .filter(|i| *i < STATUSES);
        let Some(slot) = slot else {
            return record_uncached(&self.metrics, route, status, seconds);
        };
        let table = self
            .series
            .get_or_init(|| (0..STATUSES).map(|_| OnceLock::new()).collect());
        let series = table[slot].get_or_init(|| self.metrics.http(route, status));
        series.requests.increment(1);
        series.duration.record(seconds);
    }
}

/// Registers and records in one go (takes the registry's lock): only for what the table cannot
/// hold, which no route of ours produces.
fn record_uncached(metrics: &Metrics, route: &str, status: u16, seconds: f64) {
    let series = metrics.http(route, status);
    series.requests.increment(1);
    series.duration.record(seconds);
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let id = caller_request_id(request.headers()).unwrap_or_else(generated_request_id);
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED, MatchedPath::as_str);
        // Always the same route for one endpoint; checked, so a surprise costs speed, not truth.
        let other_route = (self.endpoint.route.get_or_init(|| route.to_owned()) != route)
            .then(|| route.to_owned());
        request.extensions_mut().insert(RequestId(id.clone()));
        let endpoint = self.endpoint.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            response.headers_mut().insert(X_REQUEST_ID, id);
            let status = response.status().as_u16();
            let seconds = started.elapsed().as_secs_f64();
            match (other_route, endpoint.route.get()) {
                (None, Some(route)) => endpoint.record(route, status, seconds),
                (Some(route), _) => record_uncached(&endpoint.metrics, &route, status, seconds),
                (None, None) => record_uncached(&endpoint.metrics, UNMATCHED, status, seconds),
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        headers
    }

    #[test]
    fn a_sane_caller_id_is_kept_and_anything_else_is_not() {
        let long = "a".repeat(MAX_REQUEST_ID);
        for ok in [&b"abc-123"[..], b"A.b_c:d-E", long.as_bytes()] {
            assert!(caller_request_id(&with_id(&[ok])).is_some(), "{ok:?}");
        }
        let too_long = "a".repeat(MAX_REQUEST_ID + 1);
        for bad in [
            &b""[..],
            too_long.as_bytes(),
            b"a\tb",
            b"a b",
            b"caf\xc3\xa9",
            b"a/b",
            b"{\"x\":1}",
        ] {
            assert!(caller_request_id(&with_id(&[bad])).is_none(), "{bad:?}");
        }
        assert!(caller_request_id(&with_id(&[b"one", b"two"])).is_none());
        assert!(caller_request_id(&HeaderMap::new()).is_none());
    }

    #[test]
    fn generated_ids_are_uuid_v7() {
        let a = generated_request_id();
        let b = generated_request_id();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::parse_str(a.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(caller_request_id(&with_id(&[a.as_bytes()])).is_some());
    }
}
