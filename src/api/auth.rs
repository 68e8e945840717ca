//! Authentication as extractors: a handler's signature says who may call it (SPEC §5).
//! Consumers are looked up in memory by sha256(token); no database query per request.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::SharedState;
use crate::error::ApiError;
use crate::pool::{token_hash, Caller};

/// The admin token; anything else is 401, or 403 for a valid consumer token. Admitting it
/// first applies what other replicas changed (`AppState::catch_up`).
pub struct Admin;

fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn is_admin(state: &SharedState, token: &str) -> bool {
    // Hashing first makes the comparison constant-time whatever the token's length.
    bool::from(token_hash(token).ct_eq(&state.admin_token_hash))
}

impl FromRequestParts<SharedState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if is_admin(state, token) {
            // Read-your-writes across replicas; a failed read leaves this replica's view as
            // it is (the poller retries and warns), so the admin API stays usable.
            if let Err(e) = state.catch_up().await {
                tracing::debug!(error = %e, "catching up with the change log failed");
            }
            Ok(Admin)
        } else if state.pool.consumer_for_token(token).is_some() {
            Err(ApiError::Forbidden(
                "the admin token is required for /admin".into(),
            ))
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// Whoever may read `/metrics`: anyone when `METRICS_TOKEN` is unset, else only its bearer
/// (compared in constant time); anything else is 401.
pub struct MetricsReader;

impl FromRequestParts<SharedState> for MetricsReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let Some(expected) = &state.metrics_token_hash else {
            return Ok(MetricsReader);
        };
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if bool::from(token_hash(token).ct_eq(expected)) {
            Ok(MetricsReader)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

impl FromRequestParts<SharedState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if is_admin(state, token) {
            return Ok(Caller::Admin);
        }
        state
            .pool
            .consumer_for_token(token)
            .map(Caller::Consumer)
            .ok_or(ApiError::Unauthorized)
    }
}

/// Proxy mode's caller (SPEC §8.6): `X-Keypool-Token: <token>`, else `Authorization: Bearer
/// <token>` — the same tokens, scopes and answers as `GET /key`.
pub struct ProxyCaller(pub Caller);

impl FromRequestParts<SharedState> for ProxyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Self, ApiError> {
        let given = parts
            .headers
            .get("x-keypool-token")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = given else {
            return Caller::from_request_parts(parts, state)
                .await
                .map(ProxyCaller);
        };
        if is_admin(state, token) {
            return Ok(ProxyCaller(Caller::Admin));
        }
        state
            .pool
            .consumer_for_token(token)
            .map(|c| ProxyCaller(Caller::Consumer(c)))
            .ok_or(ApiError::Unauthorized)
    }
}
