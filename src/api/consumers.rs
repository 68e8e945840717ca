//! `/admin/consumers`: list (never tokens), create (token shown once), change, rotate the
//! token, delete, grant and revoke scopes.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::ToSchema;

use super::auth::Admin;
use super::extract::{
    check_description, check_name, description_schema, name_schema, whole_number, IdPath, JsonBody,
};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::write::{admin_write, deleted, settle, Deleted, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::model::ConsumerRecord;
use crate::pool::{token_hash, Now};
use crate::store::{sql, Param, Statement, StoreError};
use crate::timestamp::{self, to_db};

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
            ("UpdateConsumer" = (operation_id = "update_consumer", parameters(("id" = "$response.body#/id")))),
            ("RotateToken" = (operation_id = "rotate_token", parameters(("id" = "$response.body#/id")))),
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

// ---- SPEC §8.3 (issue 10 item 2): change a consumer, rotate its token, revoke a scope ----

/// The body of `PATCH /admin/consumers/{id}` as documented; `update` reads it field by field.
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ConsumerPatch, min_properties = 1)]
pub struct ConsumerPatchDoc {
    #[schema(schema_with = name_schema)]
    name: Option<String>,
    #[schema(schema_with = patch_description_schema)]
    description: Option<String>,
    /// `false`: its token (and a previous one in its grace) is refused (401) until set `true`.
    #[schema(schema_with = boolean_schema)]
    is_active: Option<bool>,
}

fn patch_description_schema() -> Object {
    let mut schema = description_schema();
    schema.schema_type = SchemaType::Type(Type::String);
    schema
}

fn boolean_schema() -> Object {
    ObjectBuilder::new().schema_type(Type::Boolean).build()
}

/// The longest grace a token rotation may give the old token: 30 days.
pub const MAX_GRACE_SECONDS: i64 = 30 * 24 * 3600;

/// The body of `POST /admin/consumers/{id}/token` as documented; `rotate_token` reads it
/// field by field to name a bad one.
#[allow(dead_code)]
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// How long the old token keeps working; absent or 0: it stops now.
    #[schema(schema_with = grace_schema)]
    grace_seconds: Option<i64>,
}

fn grace_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(MAX_GRACE_SECONDS))
        .description(Some("Seconds the old token keeps working (default 0)"))
        .build()
}

/// A consumer's new token, shown this once.
#[derive(Serialize, ToSchema)]
pub struct NewToken {
    id: String,
    name: String,
    /// 64 hex characters; only its sha256 is stored.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    token: String,
    /// Until when the old token still works; `null`: it stopped now.
    #[schema(format = DateTime, required = true)]
    previous_token_expires_at: Option<String>,
}

fn consumer_view(state: &SharedState, id: &str) -> Result<Consumer, ApiError> {
    let c = state
        .pool
        .consumer(id)
        .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))?;
    let mut scopes: Vec<String> = c
        .scopes
        .iter()
        .filter_map(|t| state.pool.tier_name(t))
        .collect();
    scopes.sort();
    Ok(Consumer {
        id: c.id.to_string(),
        name: c.name.clone(),
        description: c.description.clone(),
        is_active: c.is_active,
        scopes,
    })
}

/// The consumer as the database holds it (its token hashes are not in the pool's form).
async fn stored_consumer(state: &SharedState, id: &str) -> Result<ConsumerRecord, ApiError> {
    state
        .db
        .read_consumer(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))
}

/// Stores `changed` with `statement` and makes the pool follow it (under the admin lock).
async fn store_consumer(
    state: &SharedState,
    old: &ConsumerRecord,
    changed: &ConsumerRecord,
    statement: Statement,
) -> Result<(), ApiError> {
    match state.db.write(&[statement], &[0]).await {
        Ok(()) => state.pool.put_consumer(changed.clone()),
        Err(StoreError::Uncertain(detail)) => {
            settle(
                state,
                &changed.id,
                &detail,
                |stored| stored == Some(changed),
                |stored| stored == Some(old),
            )
            .await?;
        }
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound("no consumer with that id".into()))
        }
        Err(StoreError::Conflict) => {
            return Err(ApiError::Conflict(format!(
                "name: a consumer named '{}' already exists; nothing was changed",
                changed.name
            )))
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[utoipa::path(
    patch,
    path = "/admin/consumers/{id}",
    tag = "consumers",
    operation_id = "update_consumer",
    params(("id" = String, Path, min_length = 1, description = "The consumer's id")),
    security(("admin_token" = [])),
    request_body = ConsumerPatchDoc,
    responses(
        (status = 200, description = "Changed; the next request sees it (an inactive consumer's token answers 401)", body = Consumer),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No consumer has that id", body = ErrorBody),
        (status = 409, description = "Another consumer has that name", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<Consumer>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest(
            "the body names nothing to change; PATCH takes any of name, description, is_active"
                .into(),
        ));
    }
    let (mut name, mut description, mut is_active) = (None, None, None);
    for (field, value) in body {
        let null = || ApiError::BadRequest(format!("{field} must not be null"));
        match (field.as_str(), value) {
            (_, Value::Null) => return Err(null()),
            ("name", Value::String(s)) => {
                check_name("name", &s)?;
                name = Some(s);
            }
            ("description", Value::String(s)) => {
                check_description(&s)?;
                description = Some(s);
            }
            ("is_active", Value::Bool(b)) => is_active = Some(b),
            ("name" | "description", _) => {
                return Err(ApiError::BadRequest(format!("{field} must be a string")))
            }
            ("is_active", _) => {
                return Err(ApiError::BadRequest(
                    "is_active must be true or false".into(),
                ))
            }
            (other, _) => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::BadRequest(format!(
                    "unknown field `{shown}`; PATCH takes any of name, description, is_active"
                )));
            }
        }
    }
    admin_write(&state, marker, move |state| async move {
        state
            .pool
            .consumer(&id)
            .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))?;
        let old = stored_consumer(&state, &id).await?;
        let changed = ConsumerRecord {
            name: name.unwrap_or(old.name.clone()),
            description: description.unwrap_or(old.description.clone()),
            is_active: is_active.unwrap_or(old.is_active),
            ..old.clone()
        };
        let taken = state
            .pool
            .consumers()
            .iter()
            .any(|c| c.name == changed.name && *c.id != *id);
        if taken {
            return Err(ApiError::Conflict(format!(
                "name: a consumer named '{}' already exists; nothing was changed",
                changed.name
            )));
        }
        let statement = (
            sql::UPDATE_CONSUMER,
            vec![
                Param::text(&changed.name),
                Param::text(&changed.description),
                Param::Int(i64::from(changed.is_active)),
                Param::text(&id),
            ],
        );
        store_consumer(&state, &old, &changed, statement).await?;
        tracing::info!(consumer_id = %id, "consumer updated");
        consumer_view(&state, &id).map(Json)
    })
    .await
}

#[utoipa::path(
    post,
    path = "/admin/consumers/{id}/token",
    tag = "consumers",
    operation_id = "rotate_token",
    params(("id" = String, Path, min_length = 1, description = "The consumer's id")),
    security(("admin_token" = [])),
    request_body = TokenBody,
    responses(
        (status = 200, description = "A new token, in this answer only; the old one works until `previous_token_expires_at` (also across restarts), then only the new one", body = NewToken),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No consumer has that id", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn rotate_token(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(id): IdPath,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<NewToken>, ApiError> {
    let out_of_range = || {
        ApiError::BadRequest(format!(
            "grace_seconds must be a whole number from 0 to {MAX_GRACE_SECONDS} (30 days)"
        ))
    };
    let mut grace = 0;
    for (field, value) in &body {
        match (field.as_str(), value) {
            ("grace_seconds", Value::Null) => {
                return Err(ApiError::BadRequest(
                    "grace_seconds must not be null (omit it for no grace)".into(),
                ))
            }
            ("grace_seconds", value) => {
                grace = whole_number(value).map_err(|_| out_of_range())?;
            }
            (other, _) => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::BadRequest(format!(
                    "unknown field `{shown}`; the body takes grace_seconds"
                )));
            }
        }
    }
    if !(0..=MAX_GRACE_SECONDS).contains(&grace) {
        return Err(out_of_range());
    }
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = hex::encode(raw);
    admin_write(&state, marker, move |state| async move {
        state
            .pool
            .consumer(&id)
            .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))?;
        let old = stored_consumer(&state, &id).await?;
        // One previous token at a time: a rotation inside another's grace ends the older one.
        let until = Now::read().wall + chrono::TimeDelta::seconds(grace);
        let previous_token = (grace > 0).then(|| (old.token_hash.clone(), until));
        let changed = ConsumerRecord {
            token_hash: hex::encode(token_hash(&token)),
            previous_token: previous_token.clone(),
            ..old.clone()
        };
        let statement = (
            sql::ROTATE_TOKEN,
            vec![
                Param::text(&changed.token_hash),
                Param::opt_text(previous_token.as_ref().map(|(h, _)| h.clone())),
                Param::opt_text(previous_token.as_ref().map(|(_, t)| to_db(*t))),
                Param::text(&id),
            ],
        );
        store_consumer(&state, &old, &changed, statement).await?;
        tracing::info!(consumer_id = %id, grace_seconds = grace, "consumer token rotated");
        Ok(Json(NewToken {
            id: changed.id.clone(),
            name: changed.name.clone(),
            token,
            previous_token_expires_at: previous_token.map(|(_, t)| timestamp::to_api(t)),
        }))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/admin/consumers/{id}/scopes/{tier}",
    tag = "consumers",
    operation_id = "revoke_scope",
    params(
        ("id" = String, Path, min_length = 1, description = "The consumer's id"),
        ("tier" = String, Path, min_length = 1, description = "The tier's name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Revoked; the consumer's next `/key` on that tier answers 403", body = Deleted),
        (status = 400, description = "A path segment is not valid UTF-8", body = ErrorBody),
        AdminOnly,
        (status = 404, description = "No consumer has that id, no tier that name, or the consumer holds no scope on it (the message says which)", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn revoke_scope(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Deleted>, ApiError> {
    let Path((id, tier_name)) =
        path.map_err(|_| ApiError::BadRequest("a segment of the path is not valid UTF-8".into()))?;
    admin_write(&state, marker, move |state| async move {
        let consumer = state
            .pool
            .consumer(&id)
            .ok_or_else(|| ApiError::NotFound("no consumer with that id".into()))?;
        let tier = state
            .pool
            .tier_by_name(&tier_name)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{tier_name}'")))?;
        let not_granted = || {
            ApiError::NotFound(format!(
                "consumer '{}' holds no scope on tier '{tier_name}'",
                consumer.name
            ))
        };
        if !consumer.scopes.contains(tier.id.as_str()) {
            return Err(not_granted());
        }
        let statement = (
            sql::DELETE_SCOPE,
            vec![Param::text(&id), Param::text(&tier.id)],
        );
        match state.db.write(&[statement], &[0]).await {
            Ok(()) => state.pool.revoke_scope(&id, &tier.id),
            Err(StoreError::Uncertain(detail)) => {
                let granted = |stored: Option<&ConsumerRecord>| {
                    stored.is_some_and(|c| c.scopes.contains(&tier.id))
                };
                settle(&state, &id, &detail, |s| !granted(s), granted).await?;
            }
            Err(StoreError::NotFound) => return Err(not_granted()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(consumer_id = %id, tier_id = %tier.id, "scope revoked");
        Ok(Json(Deleted::default()))
    })
    .await
}
