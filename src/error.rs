//! One error type for the HTTP edge: every failure answers `{"error": "..."}` with its status.
//! Storage errors are logged here and answered with a generic message, never leaked.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::store::StoreError;

/// The body of every error answer, whatever its status.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words meant for the caller; it names the field at fault.
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing, malformed or unknown bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("request body is larger than the limit (1 MiB; 32 MiB for POST /admin/keys/import)")]
    PayloadTooLarge,
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_seconds: Option<u64>,
    },
    #[error("{0}")]
    Unavailable(String),
    /// Proxy mode: the upstream could not be reached or broke off before answering.
    #[error("{0}")]
    BadGateway(String),
    /// Proxy mode: the upstream did not answer within the tier's deadline.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Conflict => ApiError::Conflict("already exists".into()),
            StoreError::Uncertain(detail) => {
                tracing::error!(error = %detail, "database did not confirm a write");
                ApiError::Unavailable(
                    "the database did not confirm the change; list before retrying".into(),
                )
            }
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "database unavailable");
                ApiError::Unavailable("database unavailable; nothing was changed, try again".into())
            }
            StoreError::Other(detail) => {
                tracing::error!(error = %detail, "database error");
                ApiError::Internal
            }
            // Only group commits are refused (SPEC §8.7); the ledger handles it before here.
            StoreError::Refused(detail) => {
                tracing::warn!(error = %detail, "database refused a commit");
                ApiError::Unavailable("nothing was changed; try again".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = ErrorBody {
            error: self.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::TooManyRequests {
                retry_after_seconds: Some(s),
                ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*s));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
