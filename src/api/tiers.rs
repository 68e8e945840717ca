//! `/admin/tiers`: list, create, and replace a tier's feature set.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use super::auth::Admin;
use super::extract::{
    check_description, check_name, description_schema, name_schema, optional_whole_number,
    whole_number, JsonBody, ObjectOnly,
};
use super::openapi::{AdminOnly, JsonBodyErrors, StorageErrors};
use super::write::{admin_write, settle, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::model::{FeatureLimit, TierRecord};
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
    features: BTreeMap<String, ObjectOnly<FeatureBody>>,
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

fn features_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .min_properties(Some(1))
        .property_names(Some(name_schema()))
        .additional_properties(Some(FeatureBody::schema()))
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
    features: BTreeMap<String, FeatureLimits>,
}

#[derive(Serialize, ToSchema)]
pub struct FeatureLimits {
    rate_limit: i64,
    window_seconds: i64,
}

fn features(body: &TierBody) -> Result<BTreeMap<String, FeatureLimit>, ApiError> {
    if body.features.is_empty() {
        return Err(ApiError::BadRequest(
            "features must list at least one feature".into(),
        ));
    }
    let mut out = BTreeMap::new();
    for (feature, ObjectOnly(limit)) in &body.features {
        check_name("feature name", feature)?;
        if !(1..=MAX_RATE_LIMIT).contains(&limit.rate_limit) {
            return Err(ApiError::BadRequest(format!(
                "features.{feature}.rate_limit must be from 1 to {MAX_RATE_LIMIT}"
            )));
        }
        let window_seconds = match limit.window_seconds {
            None | Some(0) => 60,
            Some(w) if (1..=MAX_WINDOW_SECONDS).contains(&w) => w,
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "features.{feature}.window_seconds must be from 0 (meaning 60) to {MAX_WINDOW_SECONDS}"
                )))
            }
        };
        out.insert(
            feature.clone(),
            FeatureLimit {
                rate_limit: limit.rate_limit,
                window_seconds,
            },
        );
    }
    Ok(out)
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
                .map(|(f, l)| {
                    let limits = FeatureLimits {
                        rate_limit: l.rate_limit,
                        window_seconds: l.window_seconds,
                    };
                    (f.clone(), limits)
                })
                .collect(),
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
        )),
        AdminOnly, JsonBodyErrors,
        (status = 409, description = "A tier with that name exists", body = ErrorBody),
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
    let tier = TierRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: body.name.clone(),
        description,
        features: features(&body)?,
    };
    let created = admin_write(&state, marker, move |state| async move {
        let conflict =
            || ApiError::Conflict(format!("a tier named '{}' already exists", tier.name));
        if state.pool.tier_by_name(&tier.name).is_some() {
            return Err(conflict());
        }
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
    request_body = TierBody,
    responses(
        (status = 200, description = "Updated; the next `/key` uses the new limits", body = Tier),
        AdminOnly, JsonBodyErrors,
        (status = 404, description = "No tier has that name", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<TierBody>,
) -> Result<Json<Tier>, ApiError> {
    check_name("name", &body.name)?;
    if let Some(d) = &body.description {
        check_description(d)?;
    }
    let features = features(&body)?;
    let updated = admin_write(&state, marker, move |state| async move {
        let existing = state
            .pool
            .tier_by_name(&body.name)
            .ok_or_else(|| ApiError::NotFound(format!("no tier named '{}'", body.name)))?;
        let tier = TierRecord {
            description: body.description.unwrap_or(existing.description.clone()),
            features,
            ..existing.clone()
        };
        match state.db.update_tier(&tier).await {
            Ok(()) => state.pool.put_tier(tier.clone()),
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
        Ok(tier)
    })
    .await?;
    Ok(Json((&updated).into()))
}
