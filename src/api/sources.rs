//! `/admin/sources`: the RegBot credentials source's state, and a refresh on demand (SPEC §8.5).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::openapi::AdminOnly;
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::regbot::Source;

/// One source as the admin page and operators see it.
#[derive(Serialize, ToSchema)]
pub struct SourceView {
    #[schema(examples("regbot"))]
    name: &'static str,
    /// `ok`: the last refresh succeeded; `stale`: it failed, the last good snapshot is served;
    /// `pending`: no refresh has finished yet.
    #[schema(examples("ok", "stale", "pending"))]
    status: &'static str,
    refresh_seconds: u64,
    #[schema(format = DateTime)]
    last_success_at: Option<String>,
    #[schema(format = DateTime)]
    last_attempt_at: Option<String>,
    /// Why the last refresh failed (never a token or a key); `null` after a success.
    last_error: Option<String>,
    /// Seconds since the last success; `null` before the first.
    age_seconds: Option<f64>,
    /// RegBot keys in the pool now.
    credentials: usize,
    /// RegBot keys per tier the source feeds (tier name → count).
    tiers: BTreeMap<String, usize>,
}

#[derive(Serialize, ToSchema)]
pub struct Sources {
    /// `[]` when `REGBOT_DATABASE_URL` is unset.
    sources: Vec<SourceView>,
}

pub fn view(source: &Source) -> SourceView {
    let status = source.status();
    SourceView {
        name: "regbot",
        status: status.state(),
        refresh_seconds: source.refresh_every.as_secs(),
        last_success_at: status
            .last_success
            .map(|(t, _)| crate::timestamp::to_api(t)),
        last_attempt_at: status.last_attempt.map(crate::timestamp::to_api),
        last_error: status.last_error.clone(),
        age_seconds: status
            .last_success
            .map(|(_, at)| (at.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
        credentials: status.credentials,
        tiers: status.tiers.clone(),
    }
}

#[utoipa::path(
    get,
    path = "/admin/sources",
    tag = "sources",
    operation_id = "list_sources",
    security(("admin_token" = [])),
    responses((status = 200, description = "Each configured source with its refresh state", body = Sources), AdminOnly)
)]
pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Sources> {
    Json(Sources {
        sources: state.regbot.as_deref().map(view).into_iter().collect(),
    })
}

/// Refreshes now (serialised with the periodic refresh) and answers the state afterwards —
/// 200 whether RegBot answered or not (`status` says which).
#[utoipa::path(
    post,
    path = "/admin/sources/regbot/refresh",
    tag = "sources",
    operation_id = "refresh_regbot",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The source after a refresh attempt", body = SourceView),
        AdminOnly,
        (status = 404, description = "RegBot is not configured (`REGBOT_DATABASE_URL` unset)", body = ErrorBody),
    )
)]
pub async fn refresh(
    _: Admin,
    State(state): State<SharedState>,
) -> Result<Json<SourceView>, ApiError> {
    let source = state.regbot.as_ref().ok_or_else(|| {
        ApiError::NotFound("RegBot is not configured (REGBOT_DATABASE_URL is unset)".into())
    })?;
    source.refresh(&state.pool, &state.db, &state.sealer).await;
    Ok(Json(view(source)))
}

/// SPEC §8.1's source refresh age, with whether the last refresh failed and the keys it holds.
pub fn write_metrics(source: &Source, out: &mut String) {
    use crate::metrics::write_gauge;
    let view = view(source);
    let label = || vec![("source", "regbot".to_string())];
    write_gauge(
        out,
        "keypooler_source_refresh_age_seconds",
        "Seconds since the source's last successful refresh (absent before the first)",
        view.age_seconds.map(|age| (label(), age)),
    );
    write_gauge(
        out,
        "keypooler_source_stale",
        "1 while the source's last refresh failed (the last good snapshot is served), else 0",
        [(label(), if view.status == "stale" { 1.0 } else { 0.0 })],
    );
    write_gauge(
        out,
        "keypooler_source_credentials",
        "Keys the source holds in the pool",
        [(label(), view.credentials as f64)],
    );
}
