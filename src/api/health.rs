//! Liveness and the admin's view of the pool.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::observe::Probe;
use super::openapi::AdminOnly;
use super::SharedState;
use crate::config::StartupWarnings;

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    operation_id = "health",
    responses((status = 200, description = "The process is up (the Go service's meaning)", body = Probe))
)]
pub async fn health() -> Json<Probe> {
    Probe::ok()
}

#[derive(Serialize, ToSchema)]
pub struct AdminHealth {
    /// Every stored key, whatever its state.
    #[schema(minimum = 0)]
    pool_size: usize,
    /// Keys per health state (SPEC §8.2), every state listed.
    key_states: std::collections::BTreeMap<&'static str, usize>,
    /// Whether new values are sealed at rest (`ENCRYPTION_KEY` set).
    encryption: bool,
    /// Keys whose value or a bound secret no configured key (`ENCRYPTION_KEY`,
    /// `ENCRYPTION_KEY_PREVIOUS`) can open: never served; their ids are logged at startup.
    #[schema(minimum = 0)]
    unreadable_keys: usize,
    /// What startup found wrong without stopping (e.g. data that a redeploy would lose);
    /// empty when all is well.
    warnings: Vec<String>,
}

#[utoipa::path(
    get,
    path = "/admin/health",
    tag = "usage",
    operation_id = "admin_health",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The pool's size, encryption and startup warnings", body = AdminHealth),
        AdminOnly,
    )
)]
pub async fn admin_health(
    _: Admin,
    State(state): State<SharedState>,
    warnings: Option<Extension<StartupWarnings>>,
) -> Json<AdminHealth> {
    let warnings = warnings.map(|Extension(w)| w).unwrap_or_default();
    Json(AdminHealth {
        pool_size: state.pool.key_count(),
        key_states: state.pool.health_counts(),
        encryption: state.sealer.enabled(),
        unreadable_keys: state
            .pool
            .keys()
            .iter()
            .filter(|k| k.material.is_err())
            .count(),
        warnings: warnings.0.to_vec(),
    })
}
