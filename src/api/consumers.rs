//! `/admin/consumers`: list (never tokens), create (token shown once), delete, grant scopes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::extract::{
    check_description, check_name, description_schema, name_schema, IdPath, JsonBody,
};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::write::{admin_write, deleted, settle, Deleted, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::model::ConsumerRecord;
use crate::pool::token_hash;
use crate::store::StoreError;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerBody {
    #[schema(schema_with = name_schema)]
    name: String,
    #[schema(schema_with = description_schema)]
    description: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeBody {
    /// The name of the tier the consumer may now draw from.
    #[schema(schema_with = name_schema)]
    tier: String,
}

/// A consumer as listed: never its token or the token's hash.
#[derive(Serialize, ToSchema)]
pub struct Consumer {
    id: String,
    name: String,
    description: String,
    is_active: bool,
    /// The names of the tiers it may draw from.
    scopes: Vec<String>,
}

/// A new consumer with its token, shown this once.
#[derive(Serialize, ToSchema)]
pub struct NewConsumer {
    id: String,
    name: String,
    /// 64 hex characters; only its sha256 is stored.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    token: String,
}

#[derive(Serialize, ToSchema)]
pub struct Scope {
    consumer_id: String,
    /// The tier's name.
    tier: String,
}

#[utoipa::path(
    get,
    path = "/admin/consumers",
    tag = "consumers",
    operation_id = "list_consumers",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every consumer, by name", body = [Consumer]), AdminOnly)
)]
pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Vec<Consumer>> {
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
                Consumer {
                    id: c.id.to_string(),
                    name: c.name.clone(),
                    description: c.description.clone(),
                    is_active: c.is_active,
                    scopes,
                }
            })
            .collect(),
    )
}

#[utoipa::path(
    post,
    path = "/admin/consumers",
    tag = "consumers",
    operation_id = "create_consumer",
    security(("admin_token" = [])),
    request_body = ConsumerBody,
    responses(
        (status = 201, description = "Created; its token is in this answer only", body = NewConsumer, links(
            ("DeleteConsumer" = (operation_id = "delete_consumer", parameters(("id" = "$response.body#/id")))),
            ("GrantScope" = (operation_id = "grant_scope", parameters(("id" = "$response.body#/id")))),
        )),
        AdminOnly, JsonBodyErrors,
        (status = 409, description = "A consumer with that name exists", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<ConsumerBody>,
) -> Result<(StatusCode, Json<NewConsumer>), ApiError> {
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
        previous_token: None,
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
        let response = NewConsumer {
            id: record.id.clone(),
            name: record.name.clone(),
            token,
        };
        Ok((StatusCode::CREATED, Json(response)))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/admin/consumers/{id}",
    tag = "consumers",
    operation_id = "delete_consumer",
    params(("id" = String, Path, min_length = 1, description = "The consumer's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The consumer and its scopes are gone; its token stops working", body = Deleted),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        AdminOnly,
        (status = 404, description = "No consumer has that id", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn remove(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
) -> Result<Json<Deleted>, ApiError> {
    admin_write(&state, marker, move |state| async move {
        let outcome = state.db.delete_consumer(&id).await;
        deleted::<ConsumerRecord>(&state, &id, outcome, "no consumer with that id").await?;
        tracing::info!(consumer_id = %id, "consumer deleted");
        Ok(Json(Deleted::default()))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/admin/consumers/{id}/scopes",
    tag = "consumers",
    operation_id = "grant_scope",
    params(("id" = String, Path, min_length = 1, description = "The consumer's id")),
    security(("admin_token" = [])),
    request_body = ScopeBody,
    responses(
        (status = 201, description = "Granted (granting twice is fine); applies to the next `/key`", body = Scope),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No consumer has that id, or no tier that name", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn grant_scope(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<ScopeBody>,
) -> Result<(StatusCode, Json<Scope>), ApiError> {
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
            Json(Scope {
                consumer_id: consumer.id.to_string(),
                tier: tier.name.clone(),
            }),
        ))
    })
    .await
}
