//! `POST /admin/keys/import` (bulk import, SPEC §8.3) and `POST /admin/rekey` (re-seal every
//! value under the current `ENCRYPTION_KEY`).
//!
//! Import guarantees: one transaction for everything it creates; idempotent — a value already
//! in the tier (by its keyed hash, `keys.value_hash`; no row is decrypted) is `existing`, and
//! so is a repeat of a value earlier in the same request; results are per item, so an item
//! that breaks a rule is `invalid` with its reason and the others still import. A request
//! whose shape is wrong (types, unknown fields, `null` where not allowed, over
//! `MAX_IMPORT_KEYS` items) is refused whole: 400 naming the field, nothing imported.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, Type};
use utoipa::ToSchema;

use super::auth::Admin;
use super::extract::{check_name, name_schema, optional_whole_number, JsonBody};
use super::keys::{check_key, CheckedKey, KeyBody};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::write::{admin_write, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::model::KeyRecord;
use crate::pool::PoolKey;
use crate::rekey::RekeyReport;
use crate::secret::Secret;
use crate::store::StoreError;

/// Most keys one import may carry.
pub const MAX_IMPORT_KEYS: usize = 10_000;
/// The body limit of `POST /admin/keys/import` (every other route: `BODY_LIMIT`): room for
/// `MAX_IMPORT_KEYS` keys of about 3 KiB each.
pub const IMPORT_BODY_LIMIT: usize = 32 * 1024 * 1024;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    /// The tier every key joins (must exist).
    #[schema(schema_with = name_schema)]
    tier: String,
    /// Each item is read on its own (see `parse_item`), so an error names its index and field.
    #[schema(schema_with = import_keys_schema)]
    keys: Vec<Value>,
    /// `true`: change nothing, answer what would happen.
    #[serde(default)]
    dry_run: bool,
}

fn import_keys_schema() -> utoipa::openapi::schema::Array {
    ArrayBuilder::new()
        .items(<ImportItem as utoipa::PartialSchema>::schema())
        .max_items(Some(MAX_IMPORT_KEYS))
        .description(Some("The keys, each as the body of `POST /admin/keys`"))
        .build()
}

/// One key of an import: the fields of `POST /admin/keys` (`tier` optional; if given, the
/// request's). Their rules (names, limits, `expires_at` in the future…) are checked per item:
/// an item that breaks one is reported `invalid`, and the others still import.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportItem {
    name: String,
    key: String,
    #[schema(schema_with = nullable_string)]
    tier: Option<String>,
    /// RFC 3339, in the future.
    #[schema(schema_with = nullable_string)]
    expires_at: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = nullable_integer)]
    usage_limit: Option<i64>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = nullable_integer)]
    usage_window_seconds: Option<i64>,
    #[schema(schema_with = nullable_object)]
    metadata: Option<serde_json::Map<String, Value>>,
    #[schema(schema_with = secrets_schema)]
    secrets: Option<BTreeMap<String, String>>,
}

fn nullable(t: Type) -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            t,
            Type::Null,
        ]))
        .build()
}

fn nullable_string() -> Object {
    nullable(Type::String)
}

/// Any whole number that fits in 64 bits (what is read); the rules are checked per item.
fn nullable_integer() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Integer,
            Type::Null,
        ]))
        .minimum(Some(i64::MIN))
        .maximum(Some(i64::MAX))
        .build()
}

fn nullable_object() -> Object {
    nullable(Type::Object)
}

fn secrets_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Object,
            Type::Null,
        ]))
        .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ImportStatus {
    /// Added (with `dry_run`: would be added).
    Created,
    /// Its value is already in the tier, or earlier in this request.
    Existing,
    /// Breaks a rule; see `reason`.
    Invalid,
}

#[derive(Serialize, ToSchema)]
pub struct ImportResult {
    /// The item's position in `keys`, from 0.
    #[schema(minimum = 0)]
    index: usize,
    status: ImportStatus,
    /// The key's id: the new one, or the one already holding the value; `null` for an
    /// invalid item and for what a dry run would create.
    #[schema(required = true)]
    id: Option<String>,
    /// Why an item is invalid, or which earlier item holds the same value.
    #[schema(required = true)]
    reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ImportReport {
    dry_run: bool,
    #[schema(minimum = 0)]
    created: usize,
    #[schema(minimum = 0)]
    existing: usize,
    #[schema(minimum = 0)]
    invalid: usize,
    /// One per item, in request order.
    results: Vec<ImportResult>,
}

/// An item that passed its rules: sealed and hashed, ready to insert.
struct Ready {
    /// The record with the plaintext value and secrets, sealed by `seal` only if created.
    record: KeyRecord,
    hash: String,
}

/// Seals a prepared record's value and secrets (only what will be created pays for it).
fn seal(state: &SharedState, record: &mut KeyRecord) -> Result<(), ApiError> {
    let sealer = &state.sealer;
    let seal = |v: &str| sealer.seal(&Secret::new(v)).map_err(|_| ApiError::Internal);
    record.sealed_value = seal(&record.sealed_value)?;
    for (_, value) in record.secrets.iter_mut() {
        *value = seal(value)?;
    }
    Ok(())
}

fn reason(e: ApiError) -> String {
    match e {
        ApiError::BadRequest(m) => m,
        other => other.to_string(),
    }
}

/// Reads `T` from a JSON object; a wrong shape is a bad request naming `{at}field`. serde
/// names a missing or unknown field itself, but not one of the wrong type: that one is found
/// by reading each field alone beside `stand_ins` for the required ones.
fn read_named<T: serde::de::DeserializeOwned>(
    fields: serde_json::Map<String, Value>,
    at: &str,
    stand_ins: &[(&str, Value)],
) -> Result<T, ApiError> {
    serde_json::from_value::<T>(Value::Object(fields.clone())).map_err(|e| {
        let culprit = fields.iter().find(|(name, value)| {
            let mut alone: serde_json::Map<String, Value> = stand_ins
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            alone.insert((*name).clone(), (*value).clone());
            serde_json::from_value::<T>(Value::Object(alone)).is_err()
        });
        match culprit {
            Some((name, _)) => ApiError::BadRequest(format!("{at}{name}: {e}")),
            None if at.is_empty() => ApiError::BadRequest(format!("invalid JSON body: {e}")),
            None => ApiError::BadRequest(format!("{}: {e}", at.trim_end_matches('.'))),
        }
    })
}

/// Reads item `index` of `keys` (see `read_named`).
fn parse_item(index: usize, raw: Value) -> Result<ImportItem, ApiError> {
    let Value::Object(fields) = raw else {
        return Err(ApiError::BadRequest(format!(
            "keys[{index}] must be a JSON object"
        )));
    };
    let blank = || Value::String(String::new());
    read_named(
        fields,
        &format!("keys[{index}]."),
        &[("name", blank()), ("key", blank())],
    )
}

/// Checks and hashes one item (outside the admin lock: CPU only); not sealed yet.
fn prepare(
    item: ImportItem,
    tier: &str,
    state: &SharedState,
    now: chrono::DateTime<Utc>,
) -> Result<Ready, String> {
    if let Some(own) = &item.tier {
        if own != tier {
            return Err(format!(
                "tier must be the request's tier ('{tier}') or absent"
            ));
        }
    }
    let mut body = KeyBody {
        name: item.name,
        key: item.key,
        tier: tier.to_string(),
        expires_at: item.expires_at,
        usage_limit: item.usage_limit,
        usage_window_seconds: item.usage_window_seconds,
        metadata: item.metadata.map(Value::Object),
        secrets: item.secrets,
    };
    let CheckedKey {
        expires_at,
        metadata,
        secrets,
    } = check_key(&mut body, now).map_err(reason)?;
    Ok(Ready {
        hash: state.sealer.value_hash(&Secret::new(body.key.as_str())),
        record: KeyRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: body.name,
            sealed_value: body.key,
            tier_id: String::new(),
            is_active: true,
            expires_at,
            usage_limit: body.usage_limit,
            usage_count: 0,
            usage_window_seconds: body.usage_window_seconds,
            usage_window_start: None,
            metadata_json: Value::Object(metadata).to_string(),
            created_at: Some(now),
            secrets: secrets.into_iter().collect(),
        },
    })
}

#[utoipa::path(
    post,
    path = "/admin/keys/import",
    tag = "keys",
    operation_id = "import_keys",
    security(("admin_token" = [])),
    request_body = ImportBody,
    responses(
        (status = 200, description = "Per-item results; everything created was committed in one transaction and is served from the next `/key`", body = ImportReport),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No tier has that name", body = ErrorBody),
        (status = 409, description = "A value of this import was added to the tier meanwhile (by another writer); nothing was imported — run it again", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn import(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(fields): JsonBody<serde_json::Map<String, Value>>,
) -> Result<Json<ImportReport>, ApiError> {
    let body: ImportBody = read_named(
        fields,
        "",
        &[
            ("tier", Value::String("t".into())),
            ("keys", Value::Array(Vec::new())),
        ],
    )?;
    check_name("tier", &body.tier)?;
    if body.keys.len() > MAX_IMPORT_KEYS {
        return Err(ApiError::BadRequest(format!(
            "keys: at most {MAX_IMPORT_KEYS} keys per import (got {})",
            body.keys.len()
        )));
    }
    let now = Utc::now();
    let tier_name = body.tier;
    let dry_run = body.dry_run;
    let items = body
        .keys
        .into_iter()
        .enumerate()
        .map(|(index, raw)| parse_item(index, raw))
        .collect::<Result<Vec<_>, _>>()?;
    let prepared: Vec<Result<Ready, String>> = items
        .into_iter()
        .map(|item| prepare(item, &tier_name, &state, now))
        .collect();
    admin_write(&state, marker, move |state| async move {
        let tier = state
            .pool
            .tier_by_name(&tier_name)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{tier_name}'")))?;
        let hashes: Vec<String> = prepared
            .iter()
            .filter_map(|p| p.as_ref().ok().map(|r| r.hash.clone()))
            .collect();
        let existing = state.db.existing_hashes(&tier.id, &hashes).await?;
        heal_pool(&state, existing.values()).await;
        let mut results = Vec::with_capacity(prepared.len());
        let mut to_create = Vec::new();
        // hash → (index, id) of the first item of this request with that value
        let mut first: HashMap<String, (usize, String)> = HashMap::new();
        for (index, item) in prepared.into_iter().enumerate() {
            let result = |status, id, reason| ImportResult {
                index,
                status,
                id,
                reason,
            };
            let mut ready = match item {
                Err(why) => {
                    results.push(result(ImportStatus::Invalid, None, Some(why)));
                    continue;
                }
                Ok(ready) => ready,
            };
            if let Some(id) = existing.get(&ready.hash) {
                results.push(result(ImportStatus::Existing, Some(id.clone()), None));
            } else if let Some((at, id)) = first.get(&ready.hash) {
                let id = (!dry_run).then(|| id.clone());
                let why = format!("same value as item {at}");
                results.push(result(ImportStatus::Existing, id, Some(why)));
            } else {
                ready.record.tier_id = tier.id.clone();
                if !dry_run {
                    seal(&state, &mut ready.record)?;
                }
                let id = ready.record.id.clone();
                first.insert(ready.hash.clone(), (index, id.clone()));
                results.push(result(
                    ImportStatus::Created,
                    (!dry_run).then_some(id),
                    None,
                ));
                to_create.push((ready.record, ready.hash));
            }
        }
        if !dry_run && !to_create.is_empty() {
            commit(&state, &to_create).await?;
            for (record, _) in to_create {
                state
                    .pool
                    .add_key(PoolKey::from_record(record, &state.sealer));
            }
        }
        let count = |s| results.iter().filter(|r| r.status == s).count();
        let report = ImportReport {
            dry_run,
            created: count(ImportStatus::Created),
            existing: count(ImportStatus::Existing),
            invalid: count(ImportStatus::Invalid),
            results,
        };
        tracing::info!(
            tier_id = %tier.id,
            dry_run,
            created = report.created,
            existing = report.existing,
            invalid = report.invalid,
            "keys imported"
        );
        Ok(Json(report))
    })
    .await
}

/// Commits the import; an unconfirmed commit is settled by reading its first key back (the
/// transaction is all or nothing).
async fn commit(state: &SharedState, keys: &[(KeyRecord, String)]) -> Result<(), ApiError> {
    match state.db.import_keys(keys).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict) => Err(ApiError::Conflict(
            "a value of this import was added to the tier meanwhile; nothing was imported — run the import again".into(),
        )),
        Err(StoreError::Uncertain(detail)) => {
            tracing::warn!(error = %detail, "import commit unconfirmed; reading it back");
            let Some((probe, _)) = keys.first() else {
                return Ok(());
            };
            match state.db.read_key(&probe.id).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(ApiError::Unavailable(
                    "the database did not confirm the import; nothing was imported".into(),
                )),
                // Running it again is safe: what did land is then `existing` (and joins the pool).
                Err(_) => Err(ApiError::Unavailable(
                    "the database did not confirm the import and cannot be read now; run the import again (it is idempotent)".into(),
                )),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Keys found by hash that the pool lacks (an import whose commit was confirmed only later)
/// join it now.
async fn heal_pool<'a>(state: &SharedState, ids: impl Iterator<Item = &'a String>) {
    for id in ids {
        if state.pool.key(id).is_some() {
            continue;
        }
        if let Ok(Some(record)) = state.db.read_key(id).await {
            state
                .pool
                .add_key(PoolKey::from_record(record, &state.sealer));
        }
    }
}

#[utoipa::path(
    post,
    path = "/admin/rekey",
    tag = "keys",
    operation_id = "rekey",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every value and secret re-sealed under `ENCRYPTION_KEY` (plaintext ones too), in batches; safe to run again", body = RekeyReport),
        AdminOnly,
        StorageErrors,
    )
)]
pub async fn rekey(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
) -> Result<Json<RekeyReport>, ApiError> {
    admin_write(&state, marker, move |state| async move {
        crate::rekey::rekey(&state.db, &state.sealer)
            .await
            .map(Json)
            .map_err(|e| match e {
                // Batches already committed stay; the rest is done by running it again.
                StoreError::Uncertain(_) | StoreError::Unavailable(_) => ApiError::Unavailable(
                    "rekey interrupted by the database; what was re-sealed stays — run it again"
                        .into(),
                ),
                other => other.into(),
            })
    })
    .await
}
