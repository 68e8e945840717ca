//! `/admin/keys`: list (never values or secrets), add, delete.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, Object, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::auth::Admin;
use super::extract::{check_name, name_schema, optional_whole_number, IdPath, JsonBody};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::write::{admin_write, deleted, settle, Deleted, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::model::KeyRecord;
use crate::pool::{Now, PoolKey};
use crate::secret::Secret;
use crate::store::StoreError;
use crate::timestamp::{self, Timestamp};

const MAX_USAGE_LIMIT: i64 = 1_000_000_000_000;
const MAX_WINDOW_SECONDS: i64 = 315_360_000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    #[schema(schema_with = name_schema)]
    pub(super) name: String,
    /// The upstream API key (sealed at rest when `ENCRYPTION_KEY` is set).
    #[schema(min_length = 1)]
    pub(super) key: String,
    /// The name of an existing tier.
    #[schema(schema_with = name_schema)]
    pub(super) tier: String,
    /// When the key stops being served: RFC 3339, in the future.
    #[schema(format = DateTime)]
    pub(super) expires_at: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = usage_limit_schema)]
    pub(super) usage_limit: Option<i64>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = usage_window_schema)]
    pub(super) usage_window_seconds: Option<i64>,
    /// Any JSON object, handed out with the key.
    #[schema(schema_with = metadata_schema)]
    pub(super) metadata: Option<Value>,
    #[schema(schema_with = secrets_schema)]
    pub(super) secrets: Option<BTreeMap<String, String>>,
}

/// A key body that passed every rule of `POST /admin/keys` but the tier's existence.
pub(super) struct CheckedKey {
    pub expires_at: Option<Timestamp>,
    pub metadata: serde_json::Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
}

/// The rules of a new key's fields (shared by `POST /admin/keys` and import); `now` is the
/// time `expires_at` must be after.
pub(super) fn check_key(body: &mut KeyBody, now: Timestamp) -> Result<CheckedKey, ApiError> {
    check_name("name", &body.name)?;
    check_value(&body.key)?;
    check_name("tier", &body.tier)?;
    let expires_at = match &body.expires_at {
        None => None,
        Some(raw) => Some(parse_expires_at(raw, now)?),
    };
    if let Some(limit) = body.usage_limit {
        check_usage_limit(limit)?;
    }
    if let Some(window) = body.usage_window_seconds {
        if body.usage_limit.is_none() {
            return Err(ApiError::BadRequest(
                "usage_window_seconds needs a usage_limit".into(),
            ));
        }
        check_usage_window(window)?;
    }
    let metadata = match body.metadata.take() {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "metadata must be a JSON object".into(),
            ))
        }
    };
    let secrets = body.secrets.take().unwrap_or_default();
    for (name, value) in &secrets {
        check_secret(name, value)?;
    }
    Ok(CheckedKey {
        expires_at,
        metadata,
        secrets,
    })
}

fn nullable(t: Type) -> SchemaType {
    SchemaType::from_iter([t, Type::Null])
}

pub(super) fn usage_limit_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Integer))
        .minimum(Some(1))
        .maximum(Some(MAX_USAGE_LIMIT))
        .description(Some(
            "At most this many serves (per window if one is set); absent or `null`: no cap",
        ))
        .build()
}

pub(super) fn usage_window_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Integer))
        .minimum(Some(1))
        .maximum(Some(MAX_WINDOW_SECONDS))
        .description(Some("The budget resets this long after its window opened; needs `usage_limit`. Absent or `null`: a lifetime cap"))
        .build()
}

fn metadata_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(nullable(Type::Object))
        .build()
}

fn secrets_schema() -> Object {
    let value = ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1));
    ObjectBuilder::new()
        .schema_type(nullable(Type::Object))
        .property_names(Some(name_schema()))
        .additional_properties(Some(value))
        .description(Some(
            "Secrets bound to the key by name, handed out with it (sealed at rest)",
        ))
        .build()
}

/// The body of `POST /admin/keys`: `KeyBody` plus the one rule between its fields,
/// `usage_window_seconds` only with a `usage_limit`.
pub struct NewKey;

impl PartialSchema for NewKey {
    fn schema() -> RefOr<Schema> {
        let window_absent = ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .property(
                "usage_window_seconds",
                ObjectBuilder::new().schema_type(Type::Null),
            );
        let limit_given = ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .property(
                "usage_limit",
                ObjectBuilder::new().schema_type(Type::Integer),
            )
            .required("usage_limit");
        AllOfBuilder::new()
            .item(KeyBody::schema())
            .item(AnyOfBuilder::new().item(window_absent).item(limit_given))
            .into()
    }
}

impl ToSchema for NewKey {}

/// A key as `GET /admin/keys` shows it: never its value or secrets.
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    id: String,
    name: String,
    tier_id: String,
    /// The tier's name; `null` if the tier no longer exists.
    #[schema(required = true)]
    tier: Option<String>,
    is_active: bool,
    #[schema(format = DateTime, required = true)]
    expires_at: Option<String>,
    #[schema(required = true)]
    usage_limit: Option<i64>,
    /// Budget units counted in the current budget window — one per serve unless `/key` was
    /// given a `cost` (SPEC §8.4); 0 once a windowed budget's window elapsed.
    usage_count: i64,
    #[schema(required = true)]
    usage_window_seconds: Option<i64>,
    #[schema(format = DateTime, required = true)]
    usage_window_start: Option<String>,
    #[schema(value_type = Object)]
    metadata: serde_json::Map<String, Value>,
    secret_names: Vec<String>,
    /// Rate use per feature of the key's tier, in the current window: an object for a
    /// feature with one window, an array (in the feature's order) for one with several.
    #[schema(schema_with = usage_schema)]
    usage: BTreeMap<String, RateUsages>,
    /// `false` when the stored value cannot be decrypted: the key is never served then.
    readable: bool,
    /// Why an unreadable key cannot be served (present only then; never the value).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Its health (SPEC §8.2).
    health: super::outcomes::HealthView,
    /// `regbot` for a key read from RegBot (SPEC §8.5); absent for a stored key.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(examples("regbot"))]
    source: Option<&'static str>,
    /// A RegBot key's quota as RegBot reports it, with what was served here since RegBot
    /// last changed `used`; absent for a stored key.
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<QuotaView>,
}

/// SPEC §8.5: served while `used + served_here < total` (`total` null: no cap).
#[derive(Serialize, ToSchema)]
pub struct QuotaView {
    #[schema(required = true)]
    total: Option<i64>,
    used: i64,
    unit: String,
    served_here: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RateUsage {
    used: i64,
    limit: i64,
    window_seconds: i64,
}

/// A feature's rate use: one window's object, or the array of several (SPEC §8.4).
#[derive(Serialize)]
#[serde(untagged)]
pub enum RateUsages {
    One(RateUsage),
    Many(Vec<RateUsage>),
}

fn usage_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::PartialSchema;
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(utoipa::openapi::RefOr::T(
            utoipa::openapi::schema::Schema::OneOf(
                OneOfBuilder::new()
                    .item(RateUsage::schema())
                    .item(
                        ArrayBuilder::new()
                            .items(RateUsage::schema())
                            .min_items(Some(2)),
                    )
                    .build(),
            ),
        )))
        .build()
}

/// The answer to `POST /admin/keys`.
#[derive(Serialize, ToSchema)]
pub struct NewKeyView {
    id: String,
    name: String,
    /// The tier's name.
    tier: String,
    #[schema(format = DateTime, required = true)]
    expires_at: Option<String>,
    #[schema(required = true)]
    usage_limit: Option<i64>,
    #[schema(required = true)]
    usage_window_seconds: Option<i64>,
    #[schema(value_type = Object)]
    metadata: serde_json::Map<String, Value>,
    secret_names: Vec<String>,
}

fn api_time(t: Option<Timestamp>) -> Option<String> {
    t.map(timestamp::to_api)
}

#[utoipa::path(
    get,
    path = "/admin/keys",
    tag = "keys",
    operation_id = "list_keys",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every key, by name, with its usage", body = [KeyView]), AdminOnly)
)]
pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Vec<KeyView>> {
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
            .map(|k| key_view(k, tiers.get(&*k.tier_id), now))
            .collect(),
    )
}

pub(super) fn key_view(
    key: &PoolKey,
    tier: Option<&crate::model::TierRecord>,
    now: Now,
) -> KeyView {
    let usage_state = key.usage(now.wall);
    let usage = tier
        .map(|t| {
            t.features
                .iter()
                .map(|(f, windows)| {
                    let shown = |limit: &crate::model::FeatureLimit| RateUsage {
                        used: key.rate_used(f, *limit, now.mono),
                        limit: limit.rate_limit,
                        window_seconds: limit.window_seconds,
                    };
                    let usage = match windows.as_slice() {
                        [one] => RateUsages::One(shown(one)),
                        many => RateUsages::Many(many.iter().map(shown).collect()),
                    };
                    (f.clone(), usage)
                })
                .collect()
        })
        .unwrap_or_default();
    KeyView {
        id: key.id.to_string(),
        name: key.name.clone(),
        tier_id: key.tier_id.to_string(),
        tier: tier.map(|t| t.name.clone()),
        is_active: key.is_active(),
        expires_at: api_time(key.expires_at),
        usage_limit: key.budget.usage_limit,
        usage_count: usage_state.count,
        usage_window_seconds: key.budget.usage_window_seconds,
        usage_window_start: api_time(usage_state.window_start),
        metadata: key.metadata.clone(),
        secret_names: key.secret_names.clone(),
        usage,
        readable: key.material.is_ok(),
        error: key
            .material
            .as_ref()
            .err()
            .map(|e| format!("value cannot be served: {e}")),
        health: super::outcomes::health_view(&key.health()),
        source: key.regbot.as_ref().map(|_| "regbot"),
        quota: key.regbot.as_ref().map(|q| QuotaView {
            total: q.total,
            used: q.used,
            unit: q.unit.clone(),
            served_here: key.served_since_seen(),
        }),
    }
}

#[utoipa::path(
    post,
    path = "/admin/keys",
    tag = "keys",
    operation_id = "create_key",
    security(("admin_token" = [])),
    request_body = NewKey,
    responses(
        (status = 201, description = "Added to the pool; served from the next `/key`", body = NewKeyView,
            links(
                ("DeleteKey" = (operation_id = "delete_key", parameters(("id" = "$response.body#/id")))),
                ("UpdateKey" = (operation_id = "update_key", parameters(("id" = "$response.body#/id")))),
            )),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No tier has that name", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(mut body): JsonBody<KeyBody>,
) -> Result<(StatusCode, Json<NewKeyView>), ApiError> {
    let now = Utc::now();
    let CheckedKey {
        expires_at,
        metadata,
        secrets,
    } = check_key(&mut body, now)?;

    let sealer = state.sealer.clone();
    let seal = move |v: &str| seal(&sealer, v);
    let sealed_value = seal(&body.key)?;
    let value_hash = state.sealer.value_hash(&Secret::new(body.key.as_str()));
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
        match state.db.create_key_hashed(&record, &value_hash).await {
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
        let mut secret_names: Vec<String> = record.secrets.iter().map(|(n, _)| n.clone()).collect();
        secret_names.sort();
        let response = NewKeyView {
            id: record.id.clone(),
            name: record.name.clone(),
            tier: tier.name.clone(),
            expires_at: api_time(record.expires_at),
            usage_limit: record.usage_limit,
            usage_window_seconds: record.usage_window_seconds.filter(|w| *w > 0),
            metadata,
            secret_names,
        };
        tracing::info!(key_id = %record.id, tier_id = %record.tier_id, "key added");
        Ok((StatusCode::CREATED, Json(response)))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/admin/keys/{id}",
    tag = "keys",
    operation_id = "delete_key",
    params(("id" = String, Path, min_length = 1, description = "The key's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The key and its secrets are gone; never served again", body = Deleted),
        (status = 400, description = "The id is not valid UTF-8", body = ErrorBody),
        AdminOnly,
        (status = 404, description = "No key has that id", body = ErrorBody),
        (status = 409, description = "A RegBot key (`regbot:N`): RegBot owns it, change it there", body = ErrorBody),
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
        if let Some(key) = state.pool.key(&id) {
            regbot_owned(&key)?;
        }
        let outcome = state.db.delete_key(&id).await;
        deleted::<KeyRecord>(&state, &id, outcome, "no key with that id").await?;
        tracing::info!(key_id = %id, "key deleted");
        Ok(Json(Deleted::default()))
    })
    .await
}

/// SPEC §8.5: RegBot owns its credentials' values, status and quota; our admin API does not
/// change them (409, nothing changed).
pub(super) fn regbot_owned(key: &PoolKey) -> Result<(), ApiError> {
    match key.regbot {
        Some(_) => Err(ApiError::Conflict(format!(
            "key '{}' comes from RegBot, which owns its value, status and quota; change it in RegBot",
            key.id
        ))),
        None => Ok(()),
    }
}

// The checks `POST /admin/keys` makes, shared with `PATCH /admin/keys/{id}` (`key_state.rs`).

/// A key's value: any non-empty string.
pub(super) fn check_value(value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::BadRequest("key must not be empty".into()));
    }
    Ok(())
}

/// `expires_at`: RFC 3339 and after `now`.
pub(super) fn parse_expires_at(raw: &str, now: Timestamp) -> Result<Timestamp, ApiError> {
    let t = timestamp::parse_rfc3339(raw).ok_or_else(|| {
        ApiError::BadRequest(
            "expires_at must be an RFC 3339 time, e.g. 2027-01-31T00:00:00Z".into(),
        )
    })?;
    if t <= now {
        return Err(ApiError::BadRequest("expires_at is in the past".into()));
    }
    Ok(t)
}

pub(super) fn check_usage_limit(limit: i64) -> Result<(), ApiError> {
    if !(1..=MAX_USAGE_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "usage_limit must be from 1 to {MAX_USAGE_LIMIT}; omit it for no cap"
        )));
    }
    Ok(())
}

pub(super) fn check_usage_window(window: i64) -> Result<(), ApiError> {
    if !(1..=MAX_WINDOW_SECONDS).contains(&window) {
        return Err(ApiError::BadRequest(format!(
            "usage_window_seconds must be from 1 to {MAX_WINDOW_SECONDS}; omit it for a lifetime cap"
        )));
    }
    Ok(())
}

/// A bound secret: a valid name and a non-empty value.
pub(super) fn check_secret(name: &str, value: &str) -> Result<(), ApiError> {
    check_name("secret name", name)?;
    if value.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "secret '{name}' must not be empty"
        )));
    }
    Ok(())
}

/// A value or secret sealed under the current encryption key (plaintext without one).
pub(super) fn seal(sealer: &crate::crypto::Sealer, value: &str) -> Result<String, ApiError> {
    sealer
        .seal(&Secret::new(value))
        .map_err(|_| ApiError::Internal)
}
