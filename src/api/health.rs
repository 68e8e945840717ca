//! Liveness and the admin's view of the pool.

use axum::extract::State;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Admin;
use super::SharedState;
use crate::config::StartupWarnings;

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `warnings`: what startup found wrong without stopping (e.g. data that a redeploy would
/// lose); always present, empty when all is well.
pub async fn admin_health(
    _: Admin,
    State(state): State<SharedState>,
    warnings: Option<Extension<StartupWarnings>>,
) -> Json<Value> {
    let warnings = warnings.map(|Extension(w)| w).unwrap_or_default();
    Json(json!({
        "pool_size": state.pool.key_count(),
        "key_states": state.pool.health_counts(),
        "encryption": state.sealer.enabled(),
        "warnings": &*warnings.0,
    }))
}
