//! `/admin/tiers`: list, create, and replace a tier's feature set.
//!
//! A feature's value is one window object or (SPEC §8.4) a non-empty array of them; a feature
//! with one window is shown as the object, as the Go service did, and with several as the array.
//! A tier may also name its RegBot service (`source`, SPEC §8.5) and its proxy upstream
//! (`upstream`, SPEC §8.6).

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{
    ArrayBuilder, Object, ObjectBuilder, OneOf, OneOfBuilder, SchemaType, Type,
};
use utoipa::{PartialSchema, ToSchema};

use super::auth::Admin;
use super::extract::{
    check_description, check_name, description_schema, name_schema, optional_whole_number,
    whole_number, IdPath, JsonBody, ObjectOnly,
};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::tier_upstream;
use super::write::{admin_write, read_back, settle, WriteMarker};
use super::{tier_source, SharedState};
use crate::error::{ApiError, ErrorBody};
use crate::model::upstream::TierUpstream;
use crate::model::{FeatureLimit, TierRecord, MAX_WINDOWS};
use crate::store::StoreError;

/// Longest window accepted: ten years.
const MAX_WINDOW_SECONDS: i64 = 315_360_000;
const MAX_RATE_LIMIT: i64 = 1_000_000_000;

/// A tier to create, or (PATCH) the tier named `name` with its new feature set.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierBody {
    #[schema(schema_with = name_schema)]
    name: String,
    /// Absent or `null`: empty on create, unchanged on PATCH.
    #[schema(schema_with = description_schema)]
    description: Option<String>,
    /// The features the tier's keys serve, each with its rate limit per key; replaces the
    /// whole set on PATCH.
    #[schema(schema_with = features_schema)]
    features: BTreeMap<String, FeatureValue>,
    /// The RegBot service feeding the tier (SPEC §8.5).
    #[serde(default, deserialize_with = "tier_source::present")]
    #[schema(schema_with = tier_source::body_schema)]
    source: Option<serde_json::Value>,
    /// Proxy mode (SPEC §8.6): absent or `null`, the tier is not proxied.
    #[serde(default, deserialize_with = "tier_upstream::present")]
    #[schema(schema_with = tier_upstream::nullable_upstream_schema)]
    upstream: Option<serde_json::Value>,
}

/// `PATCH /admin/tiers`: the tier named `name` with its new feature set, and optionally a new
/// name (issue 10: a rename that collides with another tier answers 409).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierPatchBody {
    #[schema(schema_with = name_schema)]
    name: String,
    /// Renames the tier (absent or `null`: the name stays); its keys and scopes follow it.
    #[schema(schema_with = new_name_schema)]
    new_name: Option<serde_json::Value>,
    /// Absent or `null`: unchanged.
    #[schema(schema_with = description_schema)]
    description: Option<String>,
    /// The features the tier's keys serve, each with its rate limit per key; replaces the
    /// whole set.
    #[schema(schema_with = features_schema)]
    features: BTreeMap<String, FeatureValue>,
    /// The RegBot service feeding the tier (SPEC §8.5): absent = unchanged, `null` = removed.
    #[serde(default, deserialize_with = "tier_source::present")]
    #[schema(schema_with = tier_source::body_schema)]
    source: Option<serde_json::Value>,
    /// Proxy mode (SPEC §8.6): absent leaves it unchanged, `null` removes it.
    #[serde(default, deserialize_with = "tier_upstream::present")]
    #[schema(schema_with = tier_upstream::nullable_upstream_schema)]
    upstream: Option<serde_json::Value>,
}

fn new_name_schema() -> Object {
    let mut schema = name_schema();
    schema.schema_type = SchemaType::from_iter([Type::String, Type::Null]);
    schema
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FeatureBody {
    #[serde(deserialize_with = "whole_number")]
    #[schema(schema_with = rate_limit_schema)]
    rate_limit: i64,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(schema_with = window_seconds_schema)]
    window_seconds: Option<i64>,
}

/// A feature's windows as written: one object, or a non-empty array of them (SPEC §8.4).
enum FeatureValue {
    One(FeatureBody),
    Many(Vec<FeatureBody>),
}

impl<'de> Deserialize<'de> for FeatureValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> serde::de::Visitor<'de> for ValueVisitor {
            type Value = FeatureValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a window object or an array of window objects")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FeatureValue, A::Error> {
                FeatureBody::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(FeatureValue::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<FeatureValue, A::Error> {
                let mut windows = Vec::new();
                while let Some(ObjectOnly(window)) =
                    seq.next_element::<ObjectOnly<FeatureBody>>()?
                {
                    // Bounded while reading: a huge array is refused without being kept.
                    if windows.len() == MAX_WINDOWS {
                        return Err(serde::de::Error::custom(format_args!(
                            "a feature takes at most {MAX_WINDOWS} windows"
                        )));
                    }
                    windows.push(window);
                }
                Ok(FeatureValue::Many(windows))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

impl FeatureValue {
    fn windows(&self) -> &[FeatureBody] {
        match self {
            FeatureValue::One(window) => std::slice::from_ref(window),
            FeatureValue::Many(windows) => windows,
        }
    }
}

/// One window, or a non-empty array of windows with distinct lengths.
fn feature_value_schema() -> OneOf {
    OneOfBuilder::new()
        .item(FeatureBody::schema())
        .item(
            ArrayBuilder::new()
                .items(FeatureBody::schema())
                .min_items(Some(1))
                .max_items(Some(MAX_WINDOWS))
                .description(Some(
                    "Several windows (SPEC §8.4): a serve must fit every one; no two with the \
                     same `window_seconds`",
                )),
        )
        .build()
}

fn features_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .min_properties(Some(1))
        .property_names(Some(name_schema()))
        .additional_properties(Some(utoipa::openapi::RefOr::T(
            utoipa::openapi::schema::Schema::OneOf(feature_value_schema()),
        )))
        .build()
}

fn rate_limit_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_RATE_LIMIT))
        .description(Some("Serves per key per window"))
        .build()
}

fn window_seconds_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .minimum(Some(0))
        .maximum(Some(MAX_WINDOW_SECONDS))
        .description(Some("The rate window; absent, `null` or 0 means 60"))
        .build()
}

/// A tier as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct Tier {
    id: String,
    name: String,
    description: String,
    /// A feature with one window shows the object (as the Go service did), one with several
    /// the array, in the order given.
    #[schema(schema_with = shown_features_schema)]
    features: BTreeMap<String, ShownWindows>,
    /// The tier's explicit RegBot service; absent when it has none (the default mapping by
    /// name may still feed it: see `GET /admin/sources`).
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<tier_source::SourceShown>,
    /// Proxy mode (SPEC §8.6): `null` when the tier is not proxied.
    #[schema(required = true)]
    upstream: Option<TierUpstream>,
}

#[derive(Serialize, ToSchema)]
pub struct FeatureLimits {
    rate_limit: i64,
    window_seconds: i64,
}

/// A feature's windows as shown: the object for one, the array for several.
#[derive(Serialize)]
#[serde(untagged)]
pub enum ShownWindows {
    One(FeatureLimits),
    Many(Vec<FeatureLimits>),
}

impl ShownWindows {
    pub fn of<T>(windows: &[T], show: impl Fn(&T) -> FeatureLimits) -> ShownWindows {
        match windows {
            [one] => ShownWindows::One(show(one)),
            many => ShownWindows::Many(many.iter().map(show).collect()),
        }
    }
}

fn shown_features_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(utoipa::openapi::RefOr::T(
            utoipa::openapi::schema::Schema::OneOf(
                OneOfBuilder::new()
                    .item(FeatureLimits::schema())
                    .item(
                        ArrayBuilder::new()
                            .items(FeatureLimits::schema())
                            .min_items(Some(2))
                            .max_items(Some(MAX_WINDOWS)),
                    )
                    .build(),
            ),
        )))
        .build()
}

fn features(
    features: &BTreeMap<String, FeatureValue>,
) -> Result<BTreeMap<String, Vec<FeatureLimit>>, ApiError> {
    if features.is_empty() {
        return Err(ApiError::BadRequest(
            "features must list at least one feature".into(),
        ));
    }
    let mut out = BTreeMap::new();
    for (feature, value) in features {
        check_name("feature name", feature)?;
        let bodies = value.windows();
        if bodies.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "features.{feature}: an array of windows must hold at least one"
            )));
        }
        let mut windows: Vec<FeatureLimit> = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            let field = match value {
                FeatureValue::One(_) => format!("features.{feature}"),
                FeatureValue::Many(_) => format!("features.{feature}[{i}]"),
            };
            let window = window(&field, body)?;
            if windows
                .iter()
                .any(|w| w.window_seconds == window.window_seconds)
            {
                return Err(ApiError::BadRequest(format!(
                    "{field}.window_seconds: {} is given twice; each window of a feature needs a length of its own",
                    window.window_seconds
                )));
            }
            windows.push(window);
        }
        out.insert(feature.clone(), windows);
    }
    Ok(out)
}

/// One window's limits, checked; `field` names it in errors.
fn window(field: &str, limit: &FeatureBody) -> Result<FeatureLimit, ApiError> {
    if !(1..=MAX_RATE_LIMIT).contains(&limit.rate_limit) {
        return Err(ApiError::BadRequest(format!(
            "{field}.rate_limit must be from 1 to {MAX_RATE_LIMIT}"
        )));
    }
    let window_seconds = match limit.window_seconds {
        None | Some(0) => 60,
        Some(w) if (1..=MAX_WINDOW_SECONDS).contains(&w) => w,
        Some(_) => {
            return Err(ApiError::BadRequest(format!(
                "{field}.window_seconds must be from 0 (meaning 60) to {MAX_WINDOW_SECONDS}"
            )))
        }
    };
    Ok(FeatureLimit {
        rate_limit: limit.rate_limit,
        window_seconds,
    })
}

fn shown(limit: &FeatureLimit) -> FeatureLimits {
    FeatureLimits {
        rate_limit: limit.rate_limit,
        window_seconds: limit.window_seconds,
    }
}

impl From<&TierRecord> for Tier {
    fn from(tier: &TierRecord) -> Tier {
        Tier {
            id: tier.id.clone(),
            name: tier.name.clone(),
            description: tier.description.clone(),
            features: tier
                .features
                .iter()
                .map(|(f, windows)| (f.clone(), ShownWindows::of(windows, shown)))
                .collect(),
            source: tier_source::shown(tier),
            upstream: tier.upstream.clone(),
        }
    }
}

#[utoipa::path(
    get,
    path = "/admin/tiers",
    tag = "tiers",
    operation_id = "list_tiers",
    security(("admin_token" = [])),
    responses((status = 200, description = "Every tier, by name", body = [Tier]), AdminOnly)
)]
pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Vec<Tier>> {
    Json(
        state
            .pool
            .tiers()
            .iter()
            .map(|t| (&t.record).into())
            .collect(),
    )
}

#[utoipa::path(
    post,
    path = "/admin/tiers",
    tag = "tiers",
    operation_id = "create_tier",
    security(("admin_token" = [])),
    request_body = TierBody,
    responses(
        (status = 201, description = "Created", body = Tier, links(
            ("UpdateTier" = (operation_id = "update_tier",
                request_body = json!({ "name": "$response.body#/name" }))),
            ("AddKey" = (operation_id = "create_key",
                request_body = json!({ "tier": "$response.body#/name" }))),
            ("DeleteTier" = (operation_id = "delete_tier", parameters(("name" = "$response.body#/name")))),
        )),
        AdminOnly, JsonBodyErrors,
        (status = 409, description = "A tier with that name exists, or another tier names the same `source.regbot_service`", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<TierBody>,
) -> Result<(StatusCode, Json<Tier>), ApiError> {
    check_name("name", &body.name)?;
    let description = body.description.clone().unwrap_or_default();
    check_description(&description)?;
    let features = features(&body.features)?;
    let tier = TierRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: body.name.clone(),
        description,
        features,
        source: tier_source::parse(body.source)?.flatten(),
        upstream: match &body.upstream {
            Some(given) => tier_upstream::parse(given)?,
            None => None,
        },
    };
    let created = admin_write(&state, marker, move |state| async move {
        let conflict =
            || ApiError::Conflict(format!("a tier named '{}' already exists", tier.name));
        if state.pool.tier_by_name(&tier.name).is_some() {
            return Err(conflict());
        }
        tier_source::check_free(&state.pool, &tier.id, tier.source.as_ref())?;
        match state.db.create_tier(&tier).await {
            Ok(()) => state.pool.put_tier(tier.clone()),
            Err(StoreError::Uncertain(detail)) => {
                settle(
                    &state,
                    &tier.id,
                    &detail,
                    |stored| stored == Some(&tier),
                    |stored| stored.is_none(),
                )
                .await?;
            }
            Err(StoreError::Conflict) => return Err(conflict()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(tier_id = %tier.id, "tier created");
        if let Some(source) = &state.regbot {
            source.wake();
        }
        Ok(tier)
    })
    .await?;
    Ok((StatusCode::CREATED, Json((&created).into())))
}

#[utoipa::path(
    patch,
    path = "/admin/tiers",
    tag = "tiers",
    operation_id = "update_tier",
    security(("admin_token" = [])),
    request_body = TierPatchBody,
    responses(
        (status = 200, description = "Updated; the next `/key` uses the new limits", body = Tier),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No tier has that name", body = ErrorBody),
        (status = 409, description = "`new_name` is another tier's name, or another tier names the same `source.regbot_service`", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<TierPatchBody>,
) -> Result<Json<Tier>, ApiError> {
    check_name("name", &body.name)?;
    let new_name = match body.new_name {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(name)) => {
            check_name("new_name", &name)?;
            Some(name)
        }
        Some(_) => return Err(ApiError::BadRequest("new_name must be a string".into())),
    };
    if let Some(d) = &body.description {
        check_description(d)?;
    }
    let features = features(&body.features)?;
    let source = tier_source::parse(body.source)?;
    let upstream = body
        .upstream
        .as_ref()
        .map(tier_upstream::parse)
        .transpose()?;
    let updated = admin_write(&state, marker, move |state| async move {
        let existing = state
            .pool
            .tier_by_name(&body.name)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{}'", body.name)))?;
        let name = new_name.unwrap_or(existing.name.clone());
        let conflict = || {
            ApiError::Conflict(format!(
                "new_name: a tier named '{name}' already exists; nothing was changed"
            ))
        };
        if name != existing.name && state.pool.tier_by_name(&name).is_some() {
            return Err(conflict());
        }
        let tier = TierRecord {
            name: name.clone(),
            description: body.description.unwrap_or(existing.description.clone()),
            features,
            source: source.unwrap_or(existing.source.clone()),
            upstream: upstream.unwrap_or(existing.upstream.clone()),
            ..existing.clone()
        };
        tier_source::check_free(&state.pool, &tier.id, tier.source.as_ref())?;
        match state.db.update_tier(&tier).await {
            Ok(()) => state.pool.put_tier(tier.clone()),
            Err(StoreError::Conflict) => return Err(conflict()),
            Err(StoreError::Uncertain(detail)) => {
                settle(
                    &state,
                    &tier.id,
                    &detail,
                    |stored| stored == Some(&tier),
                    |stored| stored == Some(&existing),
                )
                .await?;
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(tier_id = %tier.id, "tier updated");
        if let Some(source) = &state.regbot {
            source.wake();
        }
        Ok(tier)
    })
    .await?;
    Ok(Json((&updated).into()))
}

/// The answer to `DELETE /admin/tiers/{name}`.
#[derive(Serialize, ToSchema)]
pub struct TierDeleted {
    #[schema(examples("deleted"))]
    status: &'static str,
    /// Keys deleted with it (`?force=true`; 0 otherwise).
    keys: usize,
    /// Consumers whose scope on it was revoked (`?force=true`; 0 otherwise).
    scopes: usize,
}

/// `?force=true` of `DELETE /admin/tiers/{name}`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteTierQuery {
    /// `true`: delete the tier's keys (with their secrets) and every scope on it too.
    #[allow(dead_code)]
    force: Option<bool>,
}

/// Reads `force` from the query: absent, `true` or `false` (anything else is 400).
fn force(query: Option<&str>) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name == "force" {
            force = match value {
                "true" => true,
                "false" => false,
                _ => return Err(ApiError::BadRequest("force must be true or false".into())),
            };
        }
    }
    Ok(force)
}

/// SPEC §8.3 (issue 10 item 2): deletes a tier. While keys or consumers' scopes use it the
/// answer is 409 naming them, unless `?force=true`: then its features, keys, their secrets and
/// health, and the scopes go with it in one transaction. Audit rows stay.
#[utoipa::path(
    delete,
    path = "/admin/tiers/{name}",
    tag = "tiers",
    operation_id = "delete_tier",
    params(("name" = String, Path, min_length = 1, description = "The tier's name"), DeleteTierQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The tier is gone (with its keys and scopes when forced); the next `/key` no longer sees it", body = TierDeleted),
        (status = 400, description = "`force` is not true or false, or the name is not valid UTF-8", body = ErrorBody),
        AdminOnly,
        (status = 404, description = "No tier has that name", body = ErrorBody),
        (status = 409, description = "Keys or consumers' scopes still use the tier (named); nothing was deleted", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn remove(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(name): IdPath,
    RawQuery(query): RawQuery,
) -> Result<Json<TierDeleted>, ApiError> {
    let force = force(query.as_deref())?;
    admin_write(&state, marker, move |state| async move {
        let tier = state
            .pool
            .tier_by_name(&name)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{name}'")))?;
        let (keys, consumers) = state.pool.tier_users(&tier.id);
        if !force && (keys > 0 || !consumers.is_empty()) {
            let shown: Vec<String> = consumers.iter().map(|(_, n)| format!("'{n}'")).collect();
            return Err(ApiError::Conflict(format!(
                "tier '{name}' is still used by {keys} key(s) and by the scopes of {} consumer(s){}{}; \
                 move or delete them, or delete with ?force=true; nothing was deleted",
                consumers.len(),
                if shown.is_empty() { "" } else { ": " },
                shown.join(", ")
            )));
        }
        let statements = crate::store::tier_deletion(&tier.id);
        let last = statements.len() - 1;
        match state.db.write(&statements, &[last]).await {
            Ok(()) => state.pool.remove_tier(&tier.id),
            Err(StoreError::Uncertain(detail)) => {
                tracing::warn!(error = %detail, tier_id = %tier.id, "the database did not confirm a tier deletion; reading it back");
                let gone = read_back("a tier", || state.db.read_tier(&tier.id), |t| t.is_none()).await;
                if !gone {
                    return Err(ApiError::Unavailable(
                        "the database did not confirm the deletion and reading it back did not show it; the tier is served as before — list before retrying".into(),
                    ));
                }
                state.pool.remove_tier(&tier.id);
            }
            Err(StoreError::NotFound) => {
                return Err(ApiError::NotFound(format!("no tier named '{name}'")))
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(tier_id = %tier.id, keys, scopes = consumers.len(), "tier deleted");
        Ok(Json(TierDeleted {
            status: "deleted",
            keys,
            scopes: consumers.len(),
        }))
    })
    .await
}
