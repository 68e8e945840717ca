//! Extractors whose rejections use the API's own `{"error"}` shape.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

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

pub fn check_description(value: &str) -> Result<(), ApiError> {
    if value.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::BadRequest(format!(
            "description must be at most {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    Ok(())
}
