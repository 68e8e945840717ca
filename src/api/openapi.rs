//! `GET /openapi.json`: the OpenAPI 3.1 document, assembled by utoipa from the
//! `#[utoipa::path]` annotation beside each handler and the `ToSchema` derives on the very
//! types serde reads and writes — nothing written by hand that could drift from the code.
//! It is built once, at router construction, and served from memory.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::ErrorBody;

/// Security scheme of the admin token (`ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "admin_token";
/// Security scheme of a consumer's token.
pub const CONSUMER_TOKEN: &str = "consumer_token";
/// Proxy mode's alternative to the bearer header: `X-Keypool-Token: <admin or consumer token>`.
pub const KEYPOOL_TOKEN: &str = "keypool_token";
/// Security scheme of `METRICS_TOKEN` (only when it is set).
pub const METRICS_TOKEN: &str = "metrics_token";

/// The document's root: everything but the paths and their schemas, which the router adds.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keypooler",
        description = "Hands out upstream API keys: `GET /key?feature=X` rotates round-robin over a pool, \
            within per-feature rate windows and per-key usage budgets, and audits every serve. \
            Operators manage tiers, keys and consumers on `/admin/*`. Every answer is JSON, errors \
            too: `{\"error\": \"…\"}` — also for unknown routes (404) and wrong methods (405). \
            Bodies over 1 MiB answer 413; unknown body fields are refused (400)."
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerSchemes),
    tags(
        (name = "meta", description = "Liveness, readiness, metrics and this document"),
        (name = "draw", description = "Drawing a key (admin or consumer token)"),
        (name = "tiers", description = "Tiers and their per-feature rate limits (admin)"),
        (name = "keys", description = "Upstream keys (admin); values and secrets are never listed"),
        (name = "consumers", description = "Callers with their own token, scoped to tiers (admin)"),
        (name = "usage", description = "The audit log and the pool's state (admin)"),
        (name = "sources", description = "Credential sources feeding the pool: RegBot (admin)"),
        (name = "admin page", description = "The admin page (HTML, public; its script reads the admin API with the token entered)"),
        (name = "proxy", description = "Proxy mode: requests forwarded upstream with a pooled key injected (SPEC §8.6)"),
    )
)]
pub struct ApiDoc;

struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            ADMIN_TOKEN,
            bearer(
                "`Authorization: Bearer <ADMIN_TOKEN>` (scheme case-insensitive). The only token \
                 accepted on /admin/*; on /key it draws from every tier (audited as `admin`).",
            ),
        );
        components.add_security_scheme(
            METRICS_TOKEN,
            bearer(
                "`Authorization: Bearer <METRICS_TOKEN>`, required on /metrics only when \
                 METRICS_TOKEN is set; without it /metrics is public.",
            ),
        );
        components.add_security_scheme(
            CONSUMER_TOKEN,
            bearer(
                "`Authorization: Bearer <token>` with a consumer's token (64 hex characters, shown \
                 once by `POST /admin/consumers`). Accepted on /key (and /proxy) only, for the \
                 tiers granted to the consumer; /admin/* answers it 403.",
            ),
        );
        components.add_security_scheme(
            KEYPOOL_TOKEN,
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "X-Keypool-Token",
                    "Proxy mode only: the admin or a consumer token in `X-Keypool-Token` instead \
                     of `Authorization` (which then may carry anything; it is never forwarded).",
                ),
            )),
        );
    }
}

/// The serialized document, generated on first use (the router forces it at startup).
static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
    let document = super::documented_routes().into_openapi();
    // Maps with string keys and plain values: serializing cannot fail.
    Bytes::from(serde_json::to_vec(&document).expect("the OpenAPI document serializes"))
});

/// The document as served, generating it if this is the first call.
pub fn document() -> Bytes {
    DOCUMENT.clone()
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses(
        (status = 200, description = "This document: OpenAPI 3.1, generated from the code",
            content_type = "application/json", body = Object),
    )
)]
pub async fn openapi_json() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], document())
}

/// An error answer: `{"error": "…"}` with this description.
fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

fn responses<const N: usize>(list: [(u16, Response); N]) -> BTreeMap<String, RefOr<Response>> {
    list.into_iter()
        .map(|(status, response)| (status.to_string(), RefOr::T(response)))
        .collect()
}

/// 401 on a route that takes a token (SPEC §5).
pub struct Unauthorized;

impl IntoResponses for Unauthorized {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut unauthorized = error_response("The bearer token is missing, malformed or unknown");
        unauthorized.headers.insert(
            "WWW-Authenticate".into(),
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .description(Some("`Bearer`"))
                    .build(),
            ),
        );
        responses([(401, unauthorized)])
    }
}

/// 401 and 403 on `/admin/*`.
pub struct AdminOnly;

impl IntoResponses for AdminOnly {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut all = Unauthorized::responses();
        all.extend(responses([(
            403,
            error_response("A consumer's token: /admin needs the admin token"),
        )]));
        all
    }
}

/// What reading a JSON body can answer (`extract::JsonBody`).
pub struct JsonBodyErrors;

impl IntoResponses for JsonBodyErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses([
            (
                400,
                error_response(
                    "Bad input, nothing changed: the message names the field (missing, invalid, \
                     unknown) or says the body is empty or not a JSON object",
                ),
            ),
            (
                408,
                error_response(
                    "The body did not fully arrive within SERVER_READ_TIMEOUT_SECONDS; nothing changed",
                ),
            ),
            (413, error_response("The body is over 1 MiB; nothing changed")),
        ])
    }
}

/// What a request that writes (or reads the database) can answer when storage fails.
pub struct StorageErrors;

impl IntoResponses for StorageErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        responses([
            (
                500,
                error_response("An unexpected database error (logged; details never sent)"),
            ),
            (
                503,
                error_response(
                    "The database is unavailable, did not confirm the change, or the request ran \
                     past SERVER_WRITE_TIMEOUT_SECONDS; the message says whether anything changed",
                ),
            ),
        ])
    }
}
