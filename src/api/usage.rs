//! `GET /admin/usage?limit=N`: the audit log, newest first.

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use super::auth::Admin;
use super::openapi::{AdminOnly, StorageErrors};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::timestamp;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
struct UsageQuery {
    limit: Option<String>,
}

/// `limit`: a whole number ≥ 1 of any size (no `int64` bound: larger ones read as the
/// maximum), or empty (`?limit=`), which reads as absent.
pub struct LimitParam;

impl utoipa::PartialSchema for LimitParam {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([""])),
            )
            .into()
    }
}

impl ToSchema for LimitParam {}

/// One audited serve.
#[derive(Serialize, ToSchema)]
pub struct UsageEvent {
    id: String,
    key_id: String,
    /// The consumer's id, or `admin`.
    consumer_id: String,
    feature: String,
    #[schema(format = DateTime)]
    created_at: String,
    /// The reported outcome (SPEC §8.2), `null` until one is reported.
    #[schema(required = true)]
    outcome: Option<OutcomeView>,
}

/// A serve's reported outcome.
#[derive(Serialize, ToSchema)]
pub struct OutcomeView {
    class: String,
    #[schema(required = true)]
    status: Option<i64>,
    #[schema(format = DateTime, required = true)]
    reported_at: Option<String>,
}

#[utoipa::path(
    get,
    path = "/admin/usage",
    tag = "usage",
    operation_id = "list_usage",
    params(
        ("limit" = inline(Option<LimitParam>), Query,
            description = "How many rows, newest first: default 100; above 1000 (however large) reads as 1000"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Audit rows, newest first", body = [UsageEvent]),
        (status = 400, description = "`limit` is not a whole number ≥ 1, or the query string is malformed", body = ErrorBody),
        AdminOnly,
        StorageErrors,
    )
)]
pub async fn list(
    _: Admin,
    State(state): State<SharedState>,
    uri: Uri,
) -> Result<Json<Vec<UsageEvent>>, ApiError> {
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
            .map(|e| UsageEvent {
                id: e.id.clone(),
                key_id: e.key_id.clone(),
                consumer_id: e.consumer_id.clone(),
                feature: e.feature.clone(),
                created_at: timestamp::to_api(e.created_at),
                outcome: e.outcome.as_ref().map(|o| OutcomeView {
                    class: o.class.clone(),
                    status: o.status,
                    reported_at: o.reported_at.map(timestamp::to_api),
                }),
            })
            .collect(),
    ))
}
