//! `GET /admin/usage?limit=N`: the audit log, newest first.

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Admin;
use super::SharedState;
use crate::error::ApiError;
use crate::timestamp;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
struct UsageQuery {
    limit: Option<String>,
}

pub async fn list(
    _: Admin,
    State(state): State<SharedState>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let query = Query::<UsageQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    // Above the maximum is clamped to it; not a positive whole number is an error.
    let limit = match query.0.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if n >= 1 => n.min(MAX_LIMIT),
            Ok(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be from 1 to {MAX_LIMIT}"
                )))
            }
            Err(_) if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => MAX_LIMIT,
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let events = state.db.recent_usage(limit).await?;
    Ok(Json(
        events
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "key_id": e.key_id,
                    "consumer_id": e.consumer_id,
                    "feature": e.feature,
                    "created_at": timestamp::to_api(e.created_at),
                    "outcome": e.outcome.as_ref().map(|o| json!({
                        "class": o.class,
                        "status": o.status,
                        "reported_at": o.reported_at.map(timestamp::to_api),
                    })),
                })
            })
            .collect(),
    ))
}
