//! `/admin/consumers`: list (never tokens), create (token shown once), delete, grant scopes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Admin;
use super::extract::{check_description, check_name, IdPath, JsonBody};
use super::write::{admin_write, deleted, settle, WriteMarker};
use super::SharedState;
use crate::error::ApiError;
use crate::model::ConsumerRecord;
use crate::pool::token_hash;
use crate::store::StoreError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerBody {
    name: String,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeBody {
    tier: String,
}

pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Value> {
    let mut consumers = state.pool.consumers();
    consumers.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
    Json(
        consumers
            .iter()
            .map(|c| {
                let mut scopes: Vec<String> = c
                    .scopes
                    .iter()
                    .filter_map(|t| state.pool.tier_name(t))
                    .collect();
                scopes.sort();
                json!({
                    "id": c.id.as_ref(),
                    "name": c.name,
                    "description": c.description,
                    "is_active": c.is_active,
                    "scopes": scopes,
                })
            })
            .collect(),
    )
}

pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<ConsumerBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_name("name", &body.name)?;
    let description = body.description.unwrap_or_default();
    check_description(&description)?;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = hex::encode(raw);
    let record = ConsumerRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: body.name,
        token_hash: hex::encode(token_hash(&token)),
        description,
        is_active: true,
        scopes: Vec::new(),
    };
    admin_write(&state, marker, move |state| async move {
        match state.db.create_consumer(&record).await {
            Ok(()) => state.pool.put_consumer(record.clone()),
            Err(StoreError::Uncertain(detail)) => {
                settle(
                    &state,
                    &record.id,
                    &detail,
                    |stored| stored == Some(&record),
                    |stored| stored.is_none(),
                )
                .await?;
            }
            Err(StoreError::Conflict) => {
                return Err(ApiError::Conflict(format!(
                    "a consumer named '{}' already exists",
                    record.name
                )))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(consumer_id = %record.id, "consumer created");
        let response = json!({ "id": record.id, "name": record.name, "token": token });
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
        let outcome = state.db.delete_consumer(&id).await;
        deleted::<ConsumerRecord>(&state, &id, outcome, "no consumer with that id").await?;
        tracing::info!(consumer_id = %id, "consumer deleted");
        Ok(Json(json!({ "status": "deleted" })))
    })
    .await
}

pub async fn grant_scope(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<ScopeBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_name("tier", &body.tier)?;
    admin_write(&state, marker, move |state| async move {
        let consumer = state
            .pool
            .consumer(&id)
            .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))?;
        let tier = state
            .pool
            .tier_by_name(&body.tier)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{}'", body.tier)))?;
        match state.db.grant_scope(&consumer.id, &tier.id).await {
            Ok(()) => state.pool.grant_scope(&consumer.id, &tier.id),
            Err(StoreError::Uncertain(detail)) => {
                let granted = |stored: Option<&ConsumerRecord>| {
                    stored.is_some_and(|c| c.scopes.contains(&tier.id))
                };
                // A consumer gone from the database holds no scope either: nothing was granted.
                settle(&state, &consumer.id, &detail, granted, |stored| {
                    !granted(stored)
                })
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(consumer_id = %consumer.id, tier_id = %tier.id, "scope granted");
        Ok((
            StatusCode::CREATED,
            Json(json!({ "consumer_id": consumer.id.as_ref(), "tier": tier.name })),
        ))
    })
    .await
}
