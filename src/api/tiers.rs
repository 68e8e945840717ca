//! `/admin/tiers`: list, create, and replace a tier's feature set.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Admin;
use super::extract::{check_description, check_name, JsonBody, ObjectOnly};
use super::write::{admin_write, settle, WriteMarker};
use super::SharedState;
use crate::error::ApiError;
use crate::model::{FeatureLimit, TierRecord};
use crate::store::StoreError;

/// Longest window accepted: ten years.
const MAX_WINDOW_SECONDS: i64 = 315_360_000;
const MAX_RATE_LIMIT: i64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierBody {
    name: String,
    description: Option<String>,
    features: BTreeMap<String, ObjectOnly<FeatureBody>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureBody {
    rate_limit: i64,
    window_seconds: Option<i64>,
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

pub fn tier_json(tier: &TierRecord) -> Value {
    let features: serde_json::Map<String, Value> = tier
        .features
        .iter()
        .map(|(f, l)| {
            (
                f.clone(),
                json!({ "rate_limit": l.rate_limit, "window_seconds": l.window_seconds }),
            )
        })
        .collect();
    json!({ "id": tier.id, "name": tier.name, "description": tier.description, "features": features })
}

pub async fn list(_: Admin, State(state): State<SharedState>) -> Json<Value> {
    Json(
        state
            .pool
            .tiers()
            .iter()
            .map(|t| tier_json(&t.record))
            .collect(),
    )
}

pub async fn create(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<TierBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(tier_json(&created))))
}

pub async fn update(
    _: Admin,
    State(state): State<SharedState>,
    marker: WriteMarker,
    JsonBody(body): JsonBody<TierBody>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(tier_json(&updated)))
}
