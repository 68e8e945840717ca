//! `/proxy/{feature}/{*path}` (SPEC §8.6, issue 13; GET, POST, PUT, PATCH, DELETE): draws a key exactly as `GET /key`
//! does (`key::serve`: same auth, scopes, gates, audit), forwards the request to the key's
//! tier upstream with the key injected, and streams the answer back. Each attempt's outcome
//! goes through `POST /serves/{serve_id}/outcome`'s own path (`outcomes::record`). The
//! caller's answer waits for an outcome's commit only when the outcome decides a retry.
//!
//! Retries (at most `MAX_ATTEMPTS`, each on a key not yet tried, within the deadline): after
//! `auth_invalid`, `quota_exhausted`, or `rate_limited` while the tier is not throttled, and
//! after a connection that failed before the request was sent — only while nothing has gone to
//! the caller and the request body was buffered (≤ `proxy::RETRY_BUFFER`). When no other key
//! can serve, the caller gets the last upstream answer. Never retried: anything else.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::auth::ProxyCaller;
use super::extract::ReadTimeout;
use super::openapi::{StorageErrors, Unauthorized};
use super::write::WriteMarker;
use super::{key, outcomes, SharedState};
use crate::error::{ApiError, ErrorBody};
use crate::ledger::Urgency;
use crate::model::upstream::TierUpstream;
use crate::pool::health::{self, OutcomeClass, OutcomeReport, TransportError};
use crate::pool::{Caller, Draw};
use crate::proxy::redact::Redactor;
use crate::proxy::relay::{End, OnEnd, Relay};
use crate::proxy::{self as plumbing, ERROR_PREFIX, IDLE_TIMEOUT, RETRY_BUFFER};

/// Attempts per proxied request, the first included.
pub const MAX_ATTEMPTS: usize = 3;
const SERVE_ID: HeaderName = HeaderName::from_static("x-keypool-serve-id");
const ATTEMPTS: HeaderName = HeaderName::from_static("x-keypool-attempts");

/// The caller's request body: kept whole (and so replayable), or streamed in one attempt.
enum Upload {
    Replayable(Bytes),
    OneShot {
        body: Option<reqwest::Body>,
        length: Option<HeaderValue>,
    },
}

/// An upstream answer with its body not yet (wholly) read.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    /// What was read of the body already (an error answer's first part).
    prefix: Bytes,
    rest: reqwest::Body,
    serve_id: String,
    key: Arc<str>,
}

#[utoipa::path(
    method(get, post, put, patch, delete),
    path = "/proxy/{feature}/{path}",
    tag = "proxy",
    operation_id = "proxy",
    params(
        ("feature" = String, Path, min_length = 1, description = "The feature to draw a key for, as `GET /key?feature=`"),
        ("path" = String, Path, min_length = 1, description = "The path under the tier's upstream base URL (any depth; \
            the query string is forwarded too). `.`/`..` segments, encoded slashes and absolute URLs are refused (400)"),
    ),
    security(("admin_token" = []), ("consumer_token" = []), ("keypool_token" = [])),
    responses(
        (status = 200, description = "The upstream's answer — any status, with its headers (minus hop-by-hop ones) \
            and body, streamed; plus `x-keypool-serve-id` (the serve that answered) and `x-keypool-attempts`",
            content_type = "*/*",
            headers(("x-keypool-serve-id" = String, description = "The serve whose upstream answer this is"),
                ("x-keypool-attempts" = u32, description = "Upstream attempts made (1 to 3)"))),
        (status = 400, description = "The path leaves the base URL, or the request body could not be read", body = ErrorBody),
        Unauthorized,
        (status = 403, description = "A consumer whose tiers do not list the feature", body = ErrorBody),
        (status = 404, description = "No tier lists the feature", body = ErrorBody),
        (status = 408, description = "The first 10 MiB of the request body did not arrive within SERVER_READ_TIMEOUT_SECONDS", body = ErrorBody),
        (status = 409, description = "None of the caller's tiers listing the feature has an upstream (proxy mode is off for it)", body = ErrorBody),
        (status = 429, description = "Every candidate key is at its rate limit or budget (as GET /key)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "As GET /key"))),
        (status = 502, description = "The upstream could not be reached or broke off before answering", body = ErrorBody),
        (status = 504, description = "The upstream did not answer within the tier's timeout_seconds", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn forward(
    ProxyCaller(caller): ProxyCaller,
    State(state): State<SharedState>,
    marker: WriteMarker,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        return Err(ApiError::BadRequest(
            plumbing::PathError::Absolute.to_string(),
        ));
    }
    let (feature, path) = parts
        .uri
        .path()
        .strip_prefix("/proxy/")
        .and_then(|rest| rest.split_once('/'))
        .ok_or_else(|| ApiError::NotFound("no such route".into()))?;
    let feature = String::from_utf8(plumbing::decoded(feature))
        .ok()
        .filter(|f| !f.is_empty())
        .ok_or_else(|| ApiError::BadRequest("the feature in the path is not valid UTF-8".into()))?;
    plumbing::check_path(path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    match state.pool.proxied_tiers(&caller, &feature) {
        Err(Draw::OutOfScope) => {
            return Err(ApiError::Forbidden(format!(
                "feature '{feature}' is not in the tiers this consumer may use"
            )))
        }
        Err(_) => {
            return Err(ApiError::NotFound(format!(
                "no tier lists feature '{feature}'"
            )))
        }
        Ok(0) => {
            return Err(ApiError::Conflict(format!(
                "no tier of feature '{feature}' that this caller may use has an upstream; \
                 set one with PATCH /admin/tiers (\"upstream\") or draw with GET /key"
            )))
        }
        Ok(_) => {}
    }
    let client = state
        .upstream_client
        .get()
        .map_err(|e| {
            tracing::error!(error = %e, "the upstream HTTP client could not be built");
            ApiError::Unavailable("proxy mode is unavailable: no HTTP client".into())
        })?
        .clone();
    let read_timeout = parts.extensions.get::<ReadTimeout>().map(|t| t.0);
    let mut upload = read_upload(body, &parts.headers, read_timeout).await?;
    // From the first draw on, the answer is the upstream's (or ours after it); the write
    // timeout no longer cuts in — the tier's deadline bounds the exchange instead.
    if !marker.begin_write() {
        return Err(ApiError::Unavailable(
            "request timed out; nothing was changed".into(),
        ));
    }
    let query = parts.uri.query();
    let mut tried: Vec<Arc<str>> = Vec::new();
    let mut held: Option<Answer> = None;
    let mut deadline: Option<(Instant, Duration)> = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let drawing = std::time::Instant::now();
        let committed = match key::serve(
            &state,
            &caller,
            &feature,
            1,
            |t| t.upstream.is_some(),
            |k| !tried.contains(&k.id),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => match held.take() {
                Some(answer) => return Ok(relay(answer, attempt - 1, None, deadline)),
                None if attempt > 1 => return Err(unreachable_upstream()),
                None => return Err(e),
            },
        };
        let pooled = committed.key.clone();
        tried.push(pooled.id.clone());
        let serve_id = committed.serve_id;
        let record = |r: OutcomeReport| report(&state, &caller, &serve_id, r, Urgency::Awaited);
        let Some((tier, upstream)) = state.pool.tier_upstream(&pooled.tier_id) else {
            // The tier lost its upstream between the check and the draw.
            record(class_report(OutcomeClass::ClientError)).await;
            return Err(ApiError::Conflict(format!(
                "the tier of feature '{feature}' no longer has an upstream"
            )));
        };
        state.metrics.proxy_draw(&tier, drawing.elapsed());
        let (ends_at, timeout) = *deadline
            .get_or_insert_with(|| (Instant::now() + upstream.timeout(), upstream.timeout()));
        let material = pooled.material.as_ref().map_err(|_| ApiError::Internal)?;
        let key_value = material.value.expose();
        let request = build_request(
            &client,
            &parts,
            &upstream,
            path,
            query,
            key_value,
            &mut upload,
        )?;
        let started = std::time::Instant::now();
        let sent = tokio::time::timeout_at(ends_at, client.execute(request)).await;
        let took = started.elapsed();
        let answer = match sent {
            Err(_) => {
                state.metrics.proxy_upstream(&tier, "timeout", took);
                record(transport_report(TransportError::Timeout)).await;
                return Err(timed_out(timeout));
            }
            Ok(Err(e)) if e.is_connect() => {
                state.metrics.proxy_upstream(&tier, "connect", took);
                tracing::warn!(tier = %tier, error = %e.without_url(), "proxy: could not connect upstream");
                record(transport_report(TransportError::Connect)).await;
                // Nothing was sent: another key may go, if the body can be sent again.
                if matches!(upload, Upload::Replayable(_)) && Instant::now() < ends_at {
                    continue;
                }
                return Err(unreachable_upstream());
            }
            Ok(Err(e)) => {
                let word = if e.is_timeout() { "timeout" } else { "error" };
                state.metrics.proxy_upstream(&tier, word, took);
                tracing::warn!(tier = %tier, error = %e.without_url(), "proxy: the upstream exchange failed");
                record(class_report(OutcomeClass::UpstreamError)).await;
                return Err(ApiError::BadGateway(
                    "the upstream broke off before answering".into(),
                ));
            }
            Ok(Ok(response)) => {
                state
                    .metrics
                    .proxy_upstream(&tier, response.status().as_str(), took);
                let response: axum::http::Response<reqwest::Body> = response.into();
                let (head, rest) = response.into_parts();
                Answer {
                    status: head.status,
                    headers: head.headers,
                    prefix: Bytes::new(),
                    rest,
                    serve_id: serve_id.clone(),
                    key: Arc::from(key_value),
                }
            }
        };
        if answer.status.as_u16() < 400 {
            // The outcome is known once the body ends (a stalled stream is an upstream_error).
            let on_end = reporter(&state, &caller, &serve_id, answer.status.as_u16());
            return Ok(relay(answer, attempt, Some(on_end), deadline));
        }
        let mut answer = answer;
        match read_prefix(&mut answer, ends_at).await {
            Ok(()) => {}
            Err(End::TimedOut) => {
                record(transport_report(TransportError::Timeout)).await;
                return Err(timed_out(timeout));
            }
            Err(_) => {
                record(class_report(OutcomeClass::UpstreamError)).await;
                return Err(ApiError::BadGateway(
                    "the upstream broke off while answering".into(),
                ));
            }
        }
        let status_report = error_report(&answer);
        let class = health::classify(&status_report);
        let may_retry = matches!(
            class,
            OutcomeClass::AuthInvalid | OutcomeClass::QuotaExhausted | OutcomeClass::RateLimited
        ) && matches!(upload, Upload::Replayable(_))
            && attempt < MAX_ATTEMPTS
            && Instant::now() < ends_at;
        if !may_retry {
            // Nothing here depends on the outcome: it rides a later group commit while the
            // answer goes out (as a streamed answer's does when its body ends).
            spawn_report(&state, &caller, &serve_id, status_report);
            return Ok(relay(answer, attempt, None, deadline));
        }
        // A retry draws again: the key's new health (and the tier's throttling) must be in
        // place first, so this outcome is waited for.
        record(status_report).await;
        let retry = class != OutcomeClass::RateLimited
            || !state
                .pool
                .tier_throttled(&pooled.tier_id, std::time::Instant::now());
        if retry {
            held = Some(answer);
            continue;
        }
        return Ok(relay(answer, attempt, None, deadline));
    }
    match held {
        Some(answer) => Ok(relay(answer, MAX_ATTEMPTS, None, deadline)),
        // Every attempt failed to connect.
        None => Err(unreachable_upstream()),
    }
}

fn unreachable_upstream() -> ApiError {
    ApiError::BadGateway("could not connect to the upstream".into())
}

fn timed_out(timeout: Duration) -> ApiError {
    ApiError::GatewayTimeout(format!(
        "the upstream did not answer within {} s (the tier's timeout_seconds)",
        timeout.as_secs()
    ))
}

/// Reads the caller's body: whole when it fits `RETRY_BUFFER` (the first part within the read
/// timeout, else 408), else what was read followed by the rest, streamed.
async fn read_upload(
    mut body: Body,
    headers: &HeaderMap,
    read_timeout: Option<Duration>,
) -> Result<Upload, ApiError> {
    let until = read_timeout.map(|t| Instant::now() + t);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut size = 0usize;
    loop {
        let next = match until {
            Some(until) => tokio::time::timeout_at(until, body.frame())
                .await
                .map_err(|_| {
                    ApiError::RequestTimeout(
                        "the request body did not arrive within SERVER_READ_TIMEOUT_SECONDS".into(),
                    )
                })?,
            None => body.frame().await,
        };
        match next {
            None => break,
            Some(Err(_)) => {
                return Err(ApiError::BadRequest(
                    "could not read the request body".into(),
                ))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    chunks.push(data);
                    if size > RETRY_BUFFER {
                        let head = futures_util::stream::iter(
                            chunks.into_iter().map(Ok::<Bytes, axum::Error>),
                        );
                        let stream = futures_util::StreamExt::chain(head, body.into_data_stream());
                        return Ok(Upload::OneShot {
                            body: Some(reqwest::Body::wrap_stream(stream)),
                            length: headers.get(CONTENT_LENGTH).cloned(),
                        });
                    }
                }
            }
        }
    }
    Ok(Upload::Replayable(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.remove(0),
        _ => chunks.concat().into(),
    }))
}

fn build_request(
    client: &reqwest::Client,
    parts: &axum::http::request::Parts,
    upstream: &TierUpstream,
    path: &str,
    query: Option<&str>,
    key: &str,
    upload: &mut Upload,
) -> Result<reqwest::Request, ApiError> {
    let url = plumbing::target_url(upstream, path, query, key)
        .ok_or_else(|| ApiError::BadRequest(plumbing::PathError::Traversal.to_string()))?;
    let mut headers =
        plumbing::upstream_headers(&parts.headers, upstream, key).ok_or_else(|| {
            ApiError::BadGateway(
            "the drawn key cannot be sent in the tier's auth header (it holds characters a header \
             value cannot); fix the key or the tier's auth"
                .into(),
        )
        })?;
    let mut builder = client.request(parts.method.clone(), url);
    match upload {
        Upload::Replayable(bytes) if bytes.is_empty() => {}
        Upload::Replayable(bytes) => builder = builder.body(bytes.clone()),
        Upload::OneShot { body, length } => {
            if let Some(length) = length {
                headers.insert(CONTENT_LENGTH, length.clone());
            }
            builder = builder.body(body.take().ok_or(ApiError::Internal)?);
        }
    }
    builder.headers(headers).build().map_err(|e| {
        tracing::error!(error = %e.without_url(), "proxy: could not build the upstream request");
        ApiError::Internal
    })
}

/// Reads up to `ERROR_PREFIX` bytes of an error answer's body into its prefix.
async fn read_prefix(answer: &mut Answer, ends_at: Instant) -> Result<(), End> {
    let mut read: Vec<u8> = Vec::new();
    while read.len() < ERROR_PREFIX {
        let until = (Instant::now() + IDLE_TIMEOUT).min(ends_at);
        match tokio::time::timeout_at(until, answer.rest.frame()).await {
            Err(_) => return Err(End::TimedOut),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(End::Failed),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
            }
        }
    }
    answer.prefix = Bytes::from(read);
    Ok(())
}

/// The outcome of an error answer: its status, `Retry-After` (seconds form) and the start of
/// its body as the message (the key redacted), which tells quota from rate limits.
fn error_report(answer: &Answer) -> OutcomeReport {
    let retry_after = answer
        .headers
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|s| s.clamp(0, health::MAX_RETRY_AFTER_SECONDS));
    let mut redactor = Redactor::new(&answer.key);
    let mut text = redactor.push(&answer.prefix).to_vec();
    text.extend_from_slice(&redactor.finish());
    let message: String = String::from_utf8_lossy(&text)
        .chars()
        .take(health::MAX_MESSAGE_CHARS)
        .collect();
    OutcomeReport {
        status: Some(i64::from(answer.status.as_u16())),
        retry_after_seconds: retry_after,
        message: Some(message),
        ..OutcomeReport::default()
    }
}

fn transport_report(error: TransportError) -> OutcomeReport {
    OutcomeReport {
        error: Some(error),
        ..OutcomeReport::default()
    }
}

fn class_report(class: OutcomeClass) -> OutcomeReport {
    OutcomeReport {
        class: Some(class),
        ..OutcomeReport::default()
    }
}

/// Records an attempt's outcome as `POST /serves/{serve_id}/outcome` would. A report that
/// cannot be recorded is logged; the caller's answer does not depend on it.
async fn report(
    state: &SharedState,
    caller: &Caller,
    serve_id: &str,
    report: OutcomeReport,
    urgency: Urgency,
) {
    let (Ok(outcome), Ok(uuid)) = (report.validate(), uuid::Uuid::try_parse(serve_id)) else {
        return;
    };
    let uuid = uuid.as_u128();
    if let Err(e) = outcomes::record(state, caller, serve_id, uuid, outcome, urgency, || true).await
    {
        tracing::warn!(serve_id, error = ?e, "proxy: an attempt's outcome could not be recorded");
    }
}

/// Records an attempt's outcome in a task of its own: the caller's answer does not wait for
/// its commit.
fn spawn_report(state: &SharedState, caller: &Caller, serve_id: &str, outcome: OutcomeReport) {
    let (state, caller, serve_id) = (state.clone(), caller.clone(), serve_id.to_owned());
    tokio::spawn(
        async move { report(&state, &caller, &serve_id, outcome, Urgency::Background).await },
    );
}

/// Reports a streamed answer's outcome when its body ends: its status if it ended or the
/// caller left, `timeout` if the upstream stalled, `upstream_error` if it broke off.
fn reporter(state: &SharedState, caller: &Caller, serve_id: &str, status: u16) -> OnEnd {
    let (state, caller, serve_id) = (state.clone(), caller.clone(), serve_id.to_owned());
    Box::new(move |end| {
        let outcome = match end {
            End::Complete | End::CallerGone => OutcomeReport {
                status: Some(i64::from(status)),
                ..OutcomeReport::default()
            },
            End::TimedOut => transport_report(TransportError::Timeout),
            End::Failed => class_report(OutcomeClass::UpstreamError),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                report(&state, &caller, &serve_id, outcome, Urgency::Background).await
            });
        }
    })
}

/// The caller's response: the upstream's status and headers (minus hop-by-hop ones and any
/// echoing the key), our two headers, and the body relayed — redacted when it is an error.
fn relay(
    answer: Answer,
    attempts: usize,
    on_end: Option<OnEnd>,
    deadline: Option<(Instant, Duration)>,
) -> Response {
    let redact = answer.status.as_u16() >= 400;
    let mut headers = plumbing::caller_headers(&answer.headers, &answer.key, redact);
    if let Ok(id) = HeaderValue::from_str(&answer.serve_id) {
        headers.insert(SERVE_ID, id);
    }
    headers.insert(ATTEMPTS, HeaderValue::from(attempts as u64));
    let ends_at = deadline.map_or_else(|| Instant::now() + IDLE_TIMEOUT, |(at, _)| at);
    let body = Relay::new(
        answer.rest,
        answer.prefix,
        IDLE_TIMEOUT,
        ends_at,
        redact.then(|| Redactor::new(&answer.key)),
        on_end,
    );
    let mut response = Body::new(body).into_response();
    *response.status_mut() = answer.status;
    *response.headers_mut() = headers;
    response
}
