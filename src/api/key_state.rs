//! `PATCH /admin/keys/{id}` with `{"is_active": bool}` (SPEC §8.2, the rest of §8.3 later):
//! an operator disables a key or enables it again, clearing every automatic health state.
//!
//! Like other admin writes it runs under the admin lock in a task nothing can cut; the change
//! is made in the pool under the tier's report lock and committed through the group commit
//! (ordered with the reports' health writes), answered after that commit. A failed commit is
//! undone in memory; one of unknown outcome is settled by reading the key back.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::auth::Admin;
use super::extract::{IdPath, JsonBody};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::outcomes::{health_view, health_writes, land_health, HealthView};
use super::write::{admin_write, read_back, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::ledger::{HealthJob, JobOutcome};
use crate::pool::health::StateKind;
use crate::pool::Now;

/// The other fields of a key, which PATCH will change once SPEC §8.3 is built.
const NOT_YET: [&str; 8] = [
    "name",
    "key",
    "tier",
    "expires_at",
    "usage_limit",
    "usage_window_seconds",
    "metadata",
    "secrets",
];

/// The body as documented; `update` reads it field by field to name a bad one.
#[allow(dead_code)]
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = KeyPatch)]
pub struct KeyPatchDoc {
    /// `false`: disabled by the operator (never undone automatically); `true`: active, every
    /// automatic health state cleared.
    is_active: bool,
}

/// A key's state after `PATCH /admin/keys/{id}`.
#[derive(Serialize, ToSchema)]
pub struct KeyStateView {
    id: String,
    is_active: bool,
    health: HealthView,
}

#[utoipa::path(
    patch,
    path = "/admin/keys/{id}",
    tag = "keys",
    operation_id = "update_key",
    params(("id" = String, Path, description = "The key's id")),
    security(("admin_token" = [])),
    request_body = KeyPatchDoc,
    responses(
        (status = 200, description = "Applied; the next /key sees it", body = KeyStateView),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No key with that id", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<KeyStateView>, ApiError> {
    let mut enabled = None;
    for (field, value) in &body {
        match (field.as_str(), value) {
            ("is_active", Value::Bool(b)) => enabled = Some(*b),
            ("is_active", _) => {
                return Err(ApiError::BadRequest(
                    "is_active must be true or false".into(),
                ))
            }
            (other, _) if NOT_YET.contains(&other) => {
                return Err(ApiError::BadRequest(format!(
                    "{other} cannot be changed by PATCH yet (not supported yet); only is_active can"
                )))
            }
            (other, _) => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::BadRequest(format!(
                    "unknown field `{shown}`; PATCH takes is_active"
                )));
            }
        }
    }
    let enabled = enabled
        .ok_or_else(|| ApiError::BadRequest("is_active is required (true or false)".into()))?;
    admin_write(&state, marker, move |state| async move {
        let ledger = &state.ledger;
        let (changes, pending) = state
            .pool
            .set_enabled(&id, enabled, Now::read(), |changes| {
                (!changes.is_empty()).then(|| {
                    ledger.submit_health(HealthJob {
                        outcome: None,
                        health: health_writes(changes),
                        tiers: Vec::new(),
                    })
                })
            })
            .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
        let committed = match pending {
            None => JobOutcome::Committed,
            Some(pending) => pending.await,
        };
        land_health(&state, changes, committed, "change", || {
            stored_as(&state, &id, enabled)
        })
        .await?;
        let key = state
            .pool
            .key(&id)
            .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
        Ok(Json(KeyStateView {
            id: key.id.to_string(),
            is_active: key.is_active(),
            health: health_view(&key.health()),
        }))
    })
    .await
}

/// After a commit of unknown outcome: whether the database holds the key as `enabled` now.
/// Read up to three times; unreadable counts as not stored (the change is undone in memory).
async fn stored_as(state: &SharedState, id: &str, enabled: bool) -> bool {
    read_back(
        "a key's state",
        || state.db.read_key_health(id),
        |found| {
            found.is_some_and(|(is_active, health)| {
                let state = health.map(|h| h.state);
                is_active == enabled && (state == Some(StateKind::Disabled)) != enabled
            })
        },
    )
    .await
}
