//! `GET /key?feature=X`: authenticate → draw → commit usage + audit → respond (SPEC §7).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::openapi::{StorageErrors, Unauthorized};
use super::write::WriteMarker;
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::pool::{Caller, Draw, Now};

#[derive(Deserialize)]
struct FeatureQuery {
    feature: Option<String>,
    cost: Option<String>,
}

/// Draws after the database refused a serve before the answer is 503 (SPEC §8.7). Each
/// refusal means another replica committed first, so this bounds a race, not a loop.
const MAX_REDRAWS: usize = 8;

/// The largest `cost` one serve may take (SPEC §8.4).
pub const MAX_COST: i64 = 10_000;

/// `cost`: absent is 1; else a whole number 1–10,000 written in digits (`cost=` with no
/// value is refused like any other value that is not one, as the OpenAPI document's integer
/// type says).
fn cost(raw: Option<&str>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(1);
    };
    raw.parse::<i64>()
        .ok()
        .filter(|c| raw.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_COST).contains(c))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "query parameter `cost` must be a whole number from 1 to {MAX_COST} (budget units this serve takes; default 1)"
            ))
        })
}

/// A served key: its value, metadata and bound secrets.
#[derive(Serialize, ToSchema)]
pub struct Served<'a> {
    key_id: &'a str,
    /// The audit row's id, for `POST /serves/{serve_id}/outcome` (SPEC §8.2).
    serve_id: &'a str,
    /// The upstream API key.
    value: &'a str,
    /// The key's metadata object, as stored.
    #[schema(value_type = Object)]
    metadata: &'a serde_json::Map<String, serde_json::Value>,
    /// Bound secrets by name.
    secrets: BTreeMap<&'a str, &'a str>,
}

#[utoipa::path(
    get,
    path = "/key",
    tag = "draw",
    operation_id = "draw_key",
    params(
        ("feature" = String, Query, min_length = 1,
            description = "The feature to draw a key for (a feature name of some tier)"),
        ("cost" = Option<i64>, Query, minimum = 1, maximum = 10000,
            description = "Budget units this serve takes (SPEC §8.4), default 1 (empty: 1); \
                rate windows count the serve once whatever its cost"),
    ),
    security(("admin_token" = []), ("consumer_token" = [])),
    responses(
        (status = 200, description = "A key, counted and audited before this answer left", body = Served,
            links(("ReportOutcome" = (operation_id = "report_outcome", parameters(("serve_id" = "$response.body#/serve_id")))))),
        (status = 400, description = "`feature` is missing or empty, `cost` is not a whole number from 1 to 10,000, or the query string is malformed", body = ErrorBody),
        Unauthorized,
        (status = 403, description = "A consumer whose tiers do not list the feature", body = ErrorBody),
        (status = 404, description = "No tier lists the feature", body = ErrorBody),
        (status = 429, description = "Every candidate key is at its rate limit or budget, expired or inactive",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Whole seconds (≥ 1) until the earliest \
                candidate frees up; absent when none will (lifetime budgets spent, all expired or inactive)"))),
        StorageErrors,
    )
)]
pub async fn draw_key(
    caller: Caller,
    State(state): State<SharedState>,
    marker: WriteMarker,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = Query::<FeatureQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?
        .0;
    let cost = cost(query.cost.as_deref())?;
    let feature = query.feature.filter(|f| !f.is_empty()).ok_or_else(|| {
        ApiError::BadRequest(
            "query parameter `feature` is required, e.g. /key?feature=scrape".into(),
        )
    })?;

    // From the draw on, the write timeout no longer answers: a serve counted here is answered
    // after its commit ends (200 once committed, else 503), never cut off in between.
    if !marker.begin_write() {
        return Err(ApiError::Unavailable(
            "request timed out; nothing was changed".into(),
        ));
    }
    let committed = serve(&state, &caller, &feature, cost, |_| true, |_| true).await?;
    let (key, serve_id) = (committed.key, committed.serve_id);
    let material = key.material.as_ref().map_err(|_| ApiError::Internal)?;
    Ok(Json(Served {
        key_id: &key.id,
        serve_id: &serve_id,
        value: material.value.expose(),
        metadata: &key.metadata,
        secrets: material
            .secrets
            .iter()
            .map(|(n, v)| (n.as_str(), v.expose()))
            .collect(),
    })
    .into_response())
}

/// The draw of `GET /key` (SPEC §7) — also the proxy's, per attempt (SPEC §8.6): draws among
/// the tiers `tier_ok` accepts, skipping keys `key_ok` refuses, and resolves once the serve's
/// usage and audit row are committed (503 if that fails: nothing was served). `cost`: budget
/// units (SPEC §8.4; the proxy's attempts cost 1). The caller has
/// begun its write (`WriteMarker::begin_write`).
pub async fn serve(
    state: &SharedState,
    caller: &Caller,
    feature: &str,
    cost: i64,
    tier_ok: impl Fn(&crate::model::TierRecord) -> bool,
    key_ok: impl Fn(&crate::pool::PoolKey) -> bool,
) -> Result<crate::ledger::Committed, ApiError> {
    let ledger = &state.ledger;
    // Issue 14: a serve the database refused (another replica took the budget or window
    // first) is drawn again against the counters the pool now holds, so it goes on to the
    // next key or answers 429 exactly as if the pool had known. Bounded: each refusal means
    // another replica committed in between.
    let mut redraws = 0;
    loop {
        let now = Now::read();
        // Outcomes are recorded on the feature's cached handles (atomic increments, no lock);
        // the pool records its 429s itself.
        let drawn = state.pool.draw_among(
            caller,
            feature,
            cost,
            now,
            &tier_ok,
            &key_ok,
            |r, meters| (ledger.submit(r), meters.clone()),
        );
        return match drawn {
            Draw::Served((pending, meters)) => match pending.committed().await {
                Ok(committed) => {
                    meters.served.increment(1);
                    Ok(committed)
                }
                Err(crate::ledger::NotCommitted::Redraw) if redraws < MAX_REDRAWS => {
                    redraws += 1;
                    continue;
                }
                Err(_) => {
                    meters.unavailable.increment(1);
                    Err(ApiError::Unavailable(
                        "usage could not be recorded, so no key was served; try again".into(),
                    ))
                }
            },
            Draw::UnknownFeature => Err(ApiError::NotFound(format!(
                "no tier lists feature '{feature}'"
            ))),
            Draw::OutOfScope => Err(ApiError::Forbidden(format!(
                "feature '{feature}' is not in the tiers this consumer may use"
            ))),
            Draw::Exhausted { retry_after } => Err(ApiError::TooManyRequests {
                message: match retry_after {
                    Some(_) => {
                        format!("every key for feature '{feature}' is at its limit; retry later")
                    }
                    None => format!(
                        "no key for feature '{feature}' can serve: budgets spent, expired or inactive"
                    ),
                },
                // Whole seconds, rounded up, never 0.
                retry_after_seconds: retry_after
                    .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
                    .map(|s| s.max(1)),
            }),
        };
    }
}
