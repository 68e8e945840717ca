//! A tier's `source` field (SPEC §8.5, issue 12 item 2): `{"regbot_service": "…"}` on POST and
//! PATCH `/admin/tiers`, shown on a tier that has one. On PATCH an absent `source` leaves it unchanged
//! and `null` removes it (the tier then follows the default mapping by its name again).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::ToSchema;

use super::extract::{check_name, name_schema};
use crate::error::ApiError;
use crate::model::{TierRecord, TierSource};
use crate::pool::Pool;

/// Keeps `null` apart from absent: absent is serde's default (`None`), `null` is `Some(Null)`.
pub fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

pub fn body_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .property("regbot_service", name_schema())
        .required("regbot_service")
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ))
        .description(Some(
            "The RegBot service (`credentials.service`) whose active credentials this tier also \
             serves; `null` or absent on create: none (a tier named like a seed service still \
             reads it by default). On PATCH: absent = unchanged, `null` = removed",
        ))
        .build()
}

/// `source` as given: `None` absent, `Some(None)` null, `Some(Some(_))` a service.
pub fn parse(raw: Option<Value>) -> Result<Option<Option<TierSource>>, ApiError> {
    let bad = || {
        ApiError::BadRequest("source must be null or {\"regbot_service\": \"<service>\"}".into())
    };
    match raw {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Object(map)) => {
            if map.keys().any(|k| k != "regbot_service") {
                return Err(bad());
            }
            let service = map
                .get("regbot_service")
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            check_name("source.regbot_service", service)?;
            Ok(Some(Some(TierSource {
                regbot_service: service.to_string(),
            })))
        }
        Some(_) => Err(bad()),
    }
}

/// One RegBot service feeds one tier (a credential is one key): 409 when another tier names it.
pub fn check_free(pool: &Pool, tier_id: &str, source: Option<&TierSource>) -> Result<(), ApiError> {
    let Some(source) = source else {
        return Ok(());
    };
    for other in pool.tiers() {
        if other.record.id != tier_id && other.record.source.as_ref() == Some(source) {
            return Err(ApiError::Conflict(format!(
                "source.regbot_service '{}' already feeds tier '{}'; nothing was changed",
                source.regbot_service, other.record.name
            )));
        }
    }
    Ok(())
}

/// A tier's source as shown.
#[derive(Serialize, ToSchema)]
pub struct SourceShown {
    regbot_service: String,
}

pub fn shown(tier: &TierRecord) -> Option<SourceShown> {
    tier.source.as_ref().map(|s| SourceShown {
        regbot_service: s.regbot_service.clone(),
    })
}
