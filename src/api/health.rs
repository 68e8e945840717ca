//! Liveness and the admin's view of the pool.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Admin;
use super::SharedState;

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn admin_health(_: Admin, State(state): State<SharedState>) -> Json<Value> {
    Json(json!({
        "pool_size": state.pool.key_count(),
        "encryption": state.sealer.enabled(),
    }))
}
