//! `/admin/keys`: list (never values or secrets), add, delete.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Admin;
use super::extract::{check_name, IdPath, JsonBody};
use super::write::{admin_write, deleted, settle, WriteMarker};
use super::SharedState;
use crate::error::ApiError;
use crate::model::KeyRecord;
use crate::pool::{Now, PoolKey};
use crate::secret::Secret;
use crate::store::StoreError;
use crate::timestamp::{self, Timestamp};

const MAX_USAGE_LIMIT: i64 = 1_000_000_000_000;
const MAX_WINDOW_SECONDS: i64 = 315_360_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: String,
    key: String,
    tier: String,
    expires_at: Option<String>,
    usage_limit: Option<i64>,
    usage_window_seconds: Option<i64>,
    metadata: Option<Value>,
    secrets: Option<BTreeMap<String, String>>,
}

fn api_time(t: Option<Timestamp>) -> Value {
    t.map(|t| Value::String(timestamp::to_api(t)))
        .unwrap_or(Value::Null)
}

pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Value> {
    let now = Now::read();
    let mut keys = state.pool.keys();
    keys.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    let tiers: BTreeMap<String, _> = state
        .pool
        .tiers()
        .into_iter()
        .map(|t| (t.record.id.clone(), t.record))
        .collect();
    Json(
        keys.iter()
            .map(|k| key_json(k, tiers.get(&*k.tier_id), now))
            .collect(),
    )
}

fn key_json(key: &PoolKey, tier: Option<&crate::model::TierRecord>, now: Now) -> Value {
    let usage_state = key.usage(now.wall);
    let usage: serde_json::Map<String, Value> = tier
        .map(|t| {
            t.features
                .iter()
                .map(|(f, limit)| {
                    let used = key.rate_used(f, *limit, now.mono);
                    (f.clone(), json!({ "used": used, "limit": limit.rate_limit, "window_seconds": limit.window_seconds }))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = json!({
        "id": key.id.as_ref(),
        "name": key.name,
        "tier_id": key.tier_id.as_ref(),
        "tier": tier.map(|t| t.name.clone()),
        "is_active": key.is_active(),
        "expires_at": api_time(key.expires_at),
        "usage_limit": key.budget.usage_limit,
        "usage_count": usage_state.count,
        "usage_window_seconds": key.budget.usage_window_seconds,
        "usage_window_start": api_time(usage_state.window_start),
        "metadata": key.metadata,
        "secret_names": key.secret_names,
        "usage": usage,
        "readable": key.material.is_ok(),
        "health": super::outcomes::health_json(&key.health()),
    });
    if let (Err(e), Some(map)) = (&key.material, out.as_object_mut()) {
        map.insert(
            "error".into(),
            Value::String(format!("value cannot be served: {e}")),
        );
    }
    out
}

pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<KeyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_name("name", &body.name)?;
    if body.key.is_empty() {
        return Err(ApiError::BadRequest("key must not be empty".into()));
    }
    check_name("tier", &body.tier)?;
    let now = Utc::now();
    let expires_at = match &body.expires_at {
        None => None,
        Some(raw) => {
            let t = timestamp::parse_rfc3339(raw).ok_or_else(|| {
                ApiError::BadRequest(
                    "expires_at must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z".into(),
                )
            })?;
            if t <= now {
                return Err(ApiError::BadRequest("expires_at is in the past".into()));
            }
            Some(t)
        }
    };
    if let Some(limit) = body.usage_limit {
        if !(1..=MAX_USAGE_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "usage_limit must be from 1 to {MAX_USAGE_LIMIT}; omit it for no cap"
            )));
        }
    }
    if let Some(window) = body.usage_window_seconds {
        if body.usage_limit.is_none() {
            return Err(ApiError::BadRequest(
                "usage_window_seconds needs a usage_limit".into(),
            ));
        }
        if !(1..=MAX_WINDOW_SECONDS).contains(&window) {
            return Err(ApiError::BadRequest(format!(
                "usage_window_seconds must be from 1 to {MAX_WINDOW_SECONDS}; omit it for a lifetime cap"
            )));
        }
    }
    let metadata = match body.metadata {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "metadata must be a JSON object".into(),
            ))
        }
    };
    let secrets = body.secrets.unwrap_or_default();
    for (name, value) in &secrets {
        check_name("secret name", name)?;
        if value.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "secret '{name}' must not be empty"
            )));
        }
    }

    let sealer = state.sealer.clone();
    let seal = move |v: &str| sealer.seal(&Secret::new(v)).map_err(|_| ApiError::Internal);
    let sealed_value = seal(&body.key)?;
    let sealed_secrets = secrets
        .iter()
        .map(|(n, v)| Ok((n.clone(), seal(v)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    admin_write(&state, marker, move |state| async move {
        let tier = state
            .pool
            .tier_by_name(&body.tier)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{}'", body.tier)))?;
        let record = KeyRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: body.name,
            sealed_value,
            tier_id: tier.id.clone(),
            is_active: true,
            expires_at,
            usage_limit: body.usage_limit,
            usage_count: 0,
            usage_window_seconds: body.usage_window_seconds,
            usage_window_start: None,
            metadata_json: Value::Object(metadata.clone()).to_string(),
            created_at: Some(now),
            secrets: sealed_secrets,
        };
        match state.db.create_key(&record).await {
            Ok(()) => state
                .pool
                .add_key(PoolKey::from_record(record.clone(), &state.sealer)),
            Err(StoreError::Uncertain(detail)) => {
                settle(
                    &state,
                    &record.id,
                    &detail,
                    |stored: Option<&KeyRecord>| stored.is_some_and(|k| k.same_as_stored(&record)),
                    |stored| stored.is_none(),
                )
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
        let mut secret_names: Vec<&String> = record.secrets.iter().map(|(n, _)| n).collect();
        secret_names.sort();
        let response = json!({
            "id": record.id,
            "name": record.name,
            "tier": tier.name,
            "expires_at": api_time(record.expires_at),
            "usage_limit": record.usage_limit,
            "usage_window_seconds": record.usage_window_seconds.filter(|w| *w > 0),
            "metadata": metadata,
            "secret_names": secret_names,
        });
        tracing::info!(key_id = %record.id, tier_id = %record.tier_id, "key added");
        Ok((StatusCode::CREATED, Json(response)))
    })
    .await
}

pub async fn remove(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
) -> Result<Json<Value>, ApiError> {
    admin_write(&state, marker, move |state| async move {
        let outcome = state.db.delete_key(&id).await;
        deleted::<KeyRecord>(&state, &id, outcome, "no key with that id").await?;
        tracing::info!(key_id = %id, "key deleted");
        Ok(Json(json!({ "status": "deleted" })))
    })
    .await
}
