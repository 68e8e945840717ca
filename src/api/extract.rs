//! Extractors whose rejections use the API's own `{"error"}` shape.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};

use crate::error::ApiError;

/// `SERVER_READ_TIMEOUT_SECONDS`, as a request extension: the longest reading a whole request
/// body may take, from when the handler starts reading it.
#[derive(Clone, Copy, Debug)]
pub struct ReadTimeout(pub Duration);

/// A JSON body of any content type; malformed → 400, over 1 MiB → 413, not all received
/// within the read timeout → 408 (however steadily it trickles in).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req.extensions().get::<ReadTimeout>().copied();
        let read = Bytes::from_request(req, state);
        let read = match limit {
            Some(ReadTimeout(limit)) => tokio::time::timeout(limit, read).await.map_err(|_| {
                ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s (SERVER_READ_TIMEOUT_SECONDS)",
                    limit.as_secs()
                ))
            })?,
            None => read.await,
        };
        let bytes = read.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::BadRequest(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest(
                "request body is empty; expected a JSON object".into(),
            ));
        }
        serde_json::from_slice::<ObjectOnly<T>>(&bytes)
            .map(|ObjectOnly(body)| JsonBody(body))
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// Accepts `T` only from a JSON object. serde's derived structs also take a sequence of
/// their fields in order (`["name", "desc"]`); a body like that is refused here.
pub struct ObjectOnly<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// A whole number in any way JSON can write one: `3`, `3.0`, `3e0` (JSON Schema's `integer`
/// is the number's value, not its spelling); `3.5`, out-of-range values and strings are refused.
pub fn whole_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_i64()
        .or_else(|| {
            // f64 holds every whole number up to 2^53 exactly; the bound excludes 2^63 itself.
            number
                .as_f64()
                .filter(|f| {
                    f.fract() == 0.0
                        && (-9.223_372_036_854_775e18..9.223_372_036_854_775e18).contains(f)
                })
                .map(|f| f as i64)
        })
        .ok_or_else(|| {
            serde::de::Error::custom(format_args!("expected a whole number, found {number}"))
        })
}

/// `whole_number` for an optional field (`null` or absent: `None`); use with `#[serde(default)]`.
pub fn optional_whole_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_number")] i64);
    Ok(Option::<Whole>::deserialize(deserializer)?.map(|Whole(n)| n))
}

/// The `{id}` path segment, whatever bytes it holds.
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(id)| IdPath(id))
            .map_err(|_| ApiError::BadRequest("the id in the path is not valid UTF-8".into()))
    }
}

/// Longest name (tier, key, consumer, feature, secret) accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest description accepted, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 2000;

/// A name must be non-blank, at most `MAX_NAME_CHARS`, free of control characters; any script is fine.
pub fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::BadRequest(format!("{field} must not be empty")));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::BadRequest(format!(
            "{field} must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// Characters `check_name` refuses anywhere: `char::is_control` (Unicode Cc).
const CONTROL: &str = r"\x00-\x1f\x7f-\x9f";
/// What `str::trim` strips (Unicode White_Space) besides the controls; a name needs one
/// character outside both sets.
const BLANK: &str = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// The JSON Schema of what `check_name` accepts (same limits, same characters).
pub fn name_schema() -> Object {
    let pattern = format!("^[^{CONTROL}]*[^{CONTROL}{BLANK}][^{CONTROL}]*$");
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_NAME_CHARS))
        .pattern(Some(pattern))
        .description(Some(format!(
            "Any script; not blank, at most {MAX_NAME_CHARS} characters, no control characters."
        )))
        .build()
}

/// The JSON Schema of an optional description (`null` or absent: empty, or unchanged on PATCH).
pub fn description_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .max_length(Some(MAX_DESCRIPTION_CHARS))
        .build()
}

pub fn check_description(value: &str) -> Result<(), ApiError> {
    if value.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::BadRequest(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 8 item 1: the documented name pattern accepts exactly what `check_name` accepts,
    // character by character (lengths are checked over HTTP in tests/api/openapi.rs).
    #[test]
    fn name_pattern_agrees_with_check_name_for_every_character() {
        let schema = name_schema();
        let pattern = regex::Regex::new(schema.pattern.as_deref().expect("a pattern"))
            .expect("the pattern is a valid regex");
        let chars = (0..=0x3100u32).chain([0xfeff, 0x1f600, 0x10ffff]);
        for c in chars.filter_map(char::from_u32) {
            for name in [c.to_string(), format!("a{c}a"), format!("{c}{c}")] {
                assert_eq!(
                    pattern.is_match(&name),
                    check_name("name", &name).is_ok(),
                    "{name:?} (U+{:04X})",
                    c as u32
                );
            }
        }
    }
}
