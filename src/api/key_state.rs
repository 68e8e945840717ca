//! `PATCH /admin/keys/{id}` (SPEC §8.3, issue 10 item 1): change any field of a key — rotate its
//! value, move it to another tier, change or lift its limits and expiry, replace its metadata,
//! set or remove secrets, reset its usage — and `is_active` (SPEC §8.2: disable, or enable and
//! clear every automatic health state).
//!
//! Guarantees: the whole body is checked before anything is written (bad input changes
//! nothing); the stored fields change in one transaction; the pool's key is replaced right
//! after that commit, so the next `/key` sees the change, while serves already drawn finish
//! with the version they drew (a serve carries its key version, value and secrets together).
//! The new version shares the old one's live counters, rate windows and health, so usage is
//! kept. `reset_usage` holds the key out of draws until the reset is stored: its serves in the
//! group commit land first, so none can overwrite the reset with an older count.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use serde_json::{Map, Value};
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::ToSchema;

use super::auth::Admin;
use super::extract::{check_name, name_schema, whole_number, IdPath, JsonBody};
use super::keys::{
    check_secret, check_usage_limit, check_usage_window, check_value, key_view, parse_expires_at,
    seal, usage_limit_schema, usage_window_schema, KeyView,
};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::outcomes::{health_writes, land_health};
use super::write::{admin_write, read_back, settle, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::ledger::{HealthJob, JobOutcome, Urgency};
use crate::model::KeyRecord;
use crate::pool::health::StateKind;
use crate::pool::{Now, PoolKey};
use crate::store::{KeyUpdate, StoreError};
use crate::timestamp::Timestamp;

/// The body as documented; `update` reads it field by field, to tell `null` from absent and
/// to name a bad field.
#[allow(dead_code)]
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = KeyPatch, min_properties = 1)]
pub struct KeyPatchDoc {
    #[schema(schema_with = name_schema)]
    name: Option<String>,
    /// A new value for the key (sealed at rest when `ENCRYPTION_KEY` is set).
    #[schema(schema_with = value_schema)]
    key: Option<String>,
    /// Moves the key to the tier of this name.
    #[schema(schema_with = name_schema)]
    tier: Option<String>,
    /// `false`: disabled by the operator (never undone automatically); `true`: active, every
    /// automatic health state cleared.
    #[schema(schema_with = boolean_schema)]
    is_active: Option<bool>,
    /// RFC 3339, in the future; `null`: never expires.
    #[schema(schema_with = expires_at_schema)]
    expires_at: Option<String>,
    #[schema(schema_with = usage_limit_schema)]
    usage_limit: Option<i64>,
    #[schema(schema_with = usage_window_schema)]
    usage_window_seconds: Option<i64>,
    /// Replaces the metadata (`{}` clears it).
    #[schema(schema_with = metadata_schema)]
    metadata: Option<Value>,
    /// `{"name": "value"}` sets a secret, `{"name": null}` removes it; others are kept.
    #[schema(schema_with = secrets_patch_schema)]
    secrets: Option<Value>,
    /// `true`: the usage count starts over at 0 (a new budget window opens at the next serve).
    #[schema(schema_with = boolean_schema)]
    reset_usage: Option<bool>,
}

fn value_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .build()
}

fn boolean_schema() -> Object {
    ObjectBuilder::new().schema_type(Type::Boolean).build()
}

fn expires_at_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::DateTime,
        )))
        .build()
}

fn metadata_schema() -> Object {
    ObjectBuilder::new().schema_type(Type::Object).build()
}

fn secrets_patch_schema() -> Object {
    let value = ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .min_length(Some(1));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(name_schema()))
        .additional_properties(Some(value))
        .build()
}

/// A parsed, checked body.
#[derive(Default)]
struct Patch {
    name: Option<String>,
    value: Option<String>,
    tier: Option<String>,
    is_active: Option<bool>,
    expires_at: Option<Option<Timestamp>>,
    usage_limit: Option<Option<i64>>,
    usage_window_seconds: Option<Option<i64>>,
    metadata: Option<Map<String, Value>>,
    /// (name, new value or `None` to remove)
    secrets: Vec<(String, Option<String>)>,
    reset_usage: bool,
}

const FIELDS: &str = "name, key, tier, is_active, expires_at, usage_limit, \
    usage_window_seconds, metadata, secrets, reset_usage";

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

fn not_null(field: &str, value: &Value) -> Result<(), ApiError> {
    if value.is_null() {
        return Err(bad(format!("{field} must not be null")));
    }
    Ok(())
}

fn string(field: &str, value: Value) -> Result<String, ApiError> {
    not_null(field, &value)?;
    match value {
        Value::String(s) => Ok(s),
        _ => Err(bad(format!("{field} must be a string"))),
    }
}

fn boolean(field: &str, value: &Value) -> Result<bool, ApiError> {
    not_null(field, value)?;
    value
        .as_bool()
        .ok_or_else(|| bad(format!("{field} must be true or false")))
}

/// A whole number or `null`.
fn nullable_whole(field: &str, value: &Value) -> Result<Option<i64>, ApiError> {
    if value.is_null() {
        return Ok(None);
    }
    whole_number(value)
        .map(Some)
        .map_err(|_| bad(format!("{field} must be a whole number or null")))
}

fn parse(body: Map<String, Value>, now: Timestamp) -> Result<Patch, ApiError> {
    if body.is_empty() {
        return Err(bad(format!(
            "the body names nothing to change; PATCH takes any of {FIELDS}"
        )));
    }
    let mut patch = Patch::default();
    for (field, value) in body {
        match field.as_str() {
            "name" => {
                let name = string("name", value)?;
                check_name("name", &name)?;
                patch.name = Some(name);
            }
            "key" => {
                let key = string("key", value)?;
                check_value(&key)?;
                patch.value = Some(key);
            }
            "tier" => {
                let tier = string("tier", value)?;
                check_name("tier", &tier)?;
                patch.tier = Some(tier);
            }
            "is_active" => patch.is_active = Some(boolean("is_active", &value)?),
            "reset_usage" => patch.reset_usage = boolean("reset_usage", &value)?,
            "expires_at" => {
                patch.expires_at = Some(match value {
                    Value::Null => None,
                    Value::String(raw) => Some(parse_expires_at(&raw, now)?),
                    _ => return Err(bad("expires_at must be an RFC 3339 time or null".into())),
                })
            }
            "usage_limit" => {
                let limit = nullable_whole("usage_limit", &value)?;
                if let Some(limit) = limit {
                    check_usage_limit(limit)?;
                }
                patch.usage_limit = Some(limit);
            }
            "usage_window_seconds" => {
                let window = nullable_whole("usage_window_seconds", &value)?;
                if let Some(window) = window {
                    check_usage_window(window)?;
                }
                patch.usage_window_seconds = Some(window);
            }
            "metadata" => {
                not_null("metadata", &value)?;
                match value {
                    Value::Object(map) => patch.metadata = Some(map),
                    _ => return Err(bad("metadata must be a JSON object".into())),
                }
            }
            "secrets" => {
                not_null("secrets", &value)?;
                let Value::Object(secrets) = value else {
                    return Err(bad("secrets must be a JSON object".into()));
                };
                for (name, value) in secrets {
                    match value {
                        Value::Null => {
                            check_name("secret name", &name)?;
                            patch.secrets.push((name, None));
                        }
                        Value::String(v) => {
                            check_secret(&name, &v)?;
                            patch.secrets.push((name, Some(v)));
                        }
                        _ => {
                            let shown: String = name.chars().take(64).collect();
                            return Err(bad(format!(
                                "secrets.{shown} must be a string (sets it) or null (removes it)"
                            )));
                        }
                    }
                }
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(bad(format!(
                    "unknown field `{shown}`; PATCH takes any of {FIELDS}"
                )));
            }
        }
    }
    Ok(patch)
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
        (status = 200, description = "Applied; the next /key sees it (usage kept unless reset_usage)", body = KeyView),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No key with that id, or no tier of the name given", body = ErrorBody),
        (status = 409, description = "A RegBot key (`regbot:N`): RegBot owns it, change it there", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<KeyView>, ApiError> {
    let patch = parse(body, Utc::now())?;
    admin_write(&state, marker, move |state| async move {
        let key = state
            .pool
            .key(&id)
            .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
        super::keys::regbot_owned(&key)?;
        let tier_id = match &patch.tier {
            None => None,
            Some(name) => Some(
                state
                    .pool
                    .tier_by_name(name)
                    .ok_or_else(|| ApiError::NotFound(format!("no tier named '{name}'")))?
                    .id,
            ),
        };
        let limit = patch.usage_limit.unwrap_or(key.budget.usage_limit);
        let window = patch
            .usage_window_seconds
            .unwrap_or(key.budget.usage_window_seconds);
        if window.is_some() && limit.is_none() {
            return Err(bad(if patch.usage_limit.is_some() {
                "usage_limit cannot be null while the key has a usage_window_seconds; set usage_window_seconds to null too".into()
            } else {
                "usage_window_seconds needs a usage_limit".into()
            }));
        }
        let update = key_update(&state, &id, &patch, tier_id)?;
        if update.changes_anything() {
            apply(&state, &key, &update).await?;
        }
        if let Some(enabled) = patch.is_active {
            set_enabled(&state, &id, enabled).await?;
        }
        let key = state
            .pool
            .key(&id)
            .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
        let tier = state
            .pool
            .tiers()
            .into_iter()
            .find(|t| *t.record.id == *key.tier_id)
            .map(|t| t.record);
        tracing::info!(key_id = %id, "key updated");
        Ok(Json(key_view(&key, tier.as_ref(), Now::read())))
    })
    .await
}

/// The stored change a patch makes, values and secrets sealed under the current key.
fn key_update(
    state: &SharedState,
    id: &str,
    patch: &Patch,
    tier_id: Option<String>,
) -> Result<KeyUpdate, ApiError> {
    let mut update = KeyUpdate {
        id: id.to_string(),
        name: patch.name.clone(),
        sealed_value: patch
            .value
            .as_deref()
            .map(|v| seal(&state.sealer, v))
            .transpose()?,
        value_hash: patch
            .value
            .as_deref()
            .map(|v| state.sealer.value_hash(&crate::secret::Secret::new(v))),
        tier_id,
        expires_at: patch.expires_at,
        usage_limit: patch.usage_limit,
        usage_window_seconds: patch.usage_window_seconds,
        window_opens_at: matches!(patch.usage_window_seconds, Some(Some(_)))
            .then(|| Now::read().wall),
        metadata_json: patch
            .metadata
            .as_ref()
            .map(|m| Value::Object(m.clone()).to_string()),
        reset_usage: patch.reset_usage,
        ..KeyUpdate::default()
    };
    for (name, value) in &patch.secrets {
        match value {
            Some(v) => update
                .set_secrets
                .push((name.clone(), seal(&state.sealer, v)?)),
            None => update.removed_secrets.push(name.clone()),
        }
    }
    Ok(update)
}

/// Stores `update` and puts the key's new version in the pool (under the admin lock).
async fn apply(
    state: &SharedState,
    key: &Arc<PoolKey>,
    update: &KeyUpdate,
) -> Result<(), ApiError> {
    let current = state
        .db
        .read_key(&update.id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
    let changed = update.apply_to(current.clone());
    if update.reset_usage {
        // No serve of this key may be drawn while the reset is stored, and every serve already
        // drawn must be committed first; two flushes, as a gathered batch of more than one
        // chunk commits its jobs with the first chunk.
        state
            .pool
            .replace_key(Arc::new(key.patched(current.clone(), &state.sealer, true)));
        for _ in 0..2 {
            state
                .ledger
                .submit_health(HealthJob {
                    outcome: None,
                    health: Vec::new(),
                    tiers: Vec::new(),
                    urgency: Urgency::Awaited,
                })
                .await;
        }
    }
    match state.db.update_key(update).await {
        Ok(()) => {}
        // Read back: the pool then follows what the database holds (unpaused), applied or not.
        Err(StoreError::Uncertain(detail)) => {
            settle::<KeyRecord>(
                state,
                &update.id,
                &detail,
                |stored| stored.is_some_and(|k| k.same_as_stored(&changed)),
                |stored| stored.is_some_and(|k| k.same_as_stored(&current)),
            )
            .await?;
        }
        Err(e) => {
            state.pool.replace_key(key.clone());
            return Err(e.into());
        }
    }
    if update.reset_usage {
        key.reset_usage();
    }
    if let Some(at) = update.window_opens_at {
        key.open_usage_window(at);
    }
    state
        .pool
        .replace_key(Arc::new(key.patched(changed, &state.sealer, false)));
    Ok(())
}

/// `is_active`: the operator's switch (SPEC §8.2), through the group commit like reports.
async fn set_enabled(state: &SharedState, id: &str, enabled: bool) -> Result<(), ApiError> {
    let ledger = &state.ledger;
    let (changes, pending) = state
        .pool
        .set_enabled(id, enabled, Now::read(), |changes| {
            (!changes.is_empty()).then(|| {
                ledger.submit_health(HealthJob {
                    outcome: None,
                    health: health_writes(changes),
                    tiers: Vec::new(),
                    urgency: Urgency::Awaited,
                })
            })
        })
        .ok_or_else(|| ApiError::NotFound("no key with that id".into()))?;
    let committed = match pending {
        None => JobOutcome::Committed,
        Some(pending) => pending.await,
    };
    land_health(state, changes, committed, "change", || {
        stored_as(state, id, enabled)
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
