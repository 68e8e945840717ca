//! A tier's `upstream` on POST/PATCH `/admin/tiers` (SPEC §8.6, issue 13 item 1): each field
//! checked on its own so a bad one is named; the result is the stored `TierUpstream`.

use std::collections::BTreeMap;

use axum::http::{HeaderName, HeaderValue};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{
    AdditionalProperties, Object, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;

use crate::error::ApiError;
use crate::model::upstream::{TierUpstream, UpstreamAuth, MAX_TIMEOUT_SECONDS};

const MAX_URL_CHARS: usize = 2000;
const MAX_HEADERS: usize = 32;
const MAX_HEADER_VALUE_CHARS: usize = 4096;
const MAX_NAME_CHARS: usize = 100;
/// An HTTP header name (RFC 9110 token); a query parameter name is unreserved characters.
const TOKEN_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";
const QUERY_NAME_PATTERN: &str = "^[A-Za-z0-9._~-]+$";
/// Visible ASCII, space and tab: what every HTTP/1.1 and HTTP/2 hop accepts.
const HEADER_VALUE_PATTERN: &str = "^[\\x20-\\x7e\\t]*$";
const URL_PATTERN: &str =
    "^[hH][tT][tT][pP][sS]?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&'()*+,;=:%/-]*)?$";

/// Headers the proxy owns besides the hop-by-hop ones (`proxy::HOP_BY_HOP`): framing, `Host`
/// and the caller's token header. A tier may neither inject its key in them nor set them
/// statically.
const RESERVED_HEADERS: [&str; 3] = ["host", "content-length", "x-keypool-token"];

/// `upstream` as given: absent (`None`), or present, `null` included (`Some(Value::Null)`), so
/// PATCH can tell "unchanged" from "remove". Use with `#[serde(default)]`.
pub fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// A given `upstream`: `null` → none; an object → checked.
pub fn parse(value: &Value) -> Result<Option<TierUpstream>, ApiError> {
    let bad = |message: String| Err(ApiError::BadRequest(format!("upstream.{message}")));
    let object = match value {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => {
            return Err(ApiError::BadRequest(
                "upstream must be an object with base_url and auth, or null".into(),
            ))
        }
    };
    for field in object.keys() {
        if !["base_url", "auth", "headers", "timeout_seconds"].contains(&field.as_str()) {
            let shown: String = field.chars().take(64).collect();
            return bad(format!(
                "{shown}: unknown field; expected base_url, auth, headers or timeout_seconds"
            ));
        }
    }
    let Some(Value::String(base_url)) = object.get("base_url") else {
        return bad("base_url is required: an http:// or https:// URL".into());
    };
    let base_url = base_url_of(base_url)
        .map_err(|e| ApiError::BadRequest(format!("upstream.base_url {e}")))?;
    let auth = match object.get("auth") {
        Some(Value::Object(auth)) => auth_of(auth)?,
        _ => {
            return bad(
                "auth is required: {\"header\": name, \"prefix\"?: text} or {\"query\": name}"
                    .into(),
            )
        }
    };
    let mut headers = BTreeMap::new();
    match object.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(given)) => {
            if given.len() > MAX_HEADERS {
                return bad(format!("headers: at most {MAX_HEADERS}"));
            }
            for (name, value) in given {
                let name = header_name("headers", name)?;
                let Value::String(value) = value else {
                    return bad(format!("headers.{name} must be a string"));
                };
                if value.chars().count() > MAX_HEADER_VALUE_CHARS
                    || HeaderValue::from_str(value).is_err()
                    || !value.chars().all(|c| c == '\t' || (' '..='~').contains(&c))
                {
                    return bad(format!(
                        "headers.{name} must be visible ASCII, spaces or tabs, at most {MAX_HEADER_VALUE_CHARS} characters"
                    ));
                }
                if headers.insert(name.clone(), value.clone()).is_some() {
                    return bad(format!(
                        "headers.{name} is given twice (names are case-insensitive)"
                    ));
                }
            }
        }
        Some(_) => return bad("headers must be an object of name → value".into()),
    }
    let timeout_seconds = match object.get("timeout_seconds") {
        None | Some(Value::Null) => None,
        Some(v) => match super::extract::whole_number(v).ok() {
            Some(t) if (1..=MAX_TIMEOUT_SECONDS as i64).contains(&t) => Some(t as u64),
            _ => {
                return bad(format!(
                    "timeout_seconds must be a whole number from 1 to {MAX_TIMEOUT_SECONDS}"
                ))
            }
        },
    };
    Ok(Some(TierUpstream {
        base_url,
        auth,
        headers,
        timeout_seconds,
    }))
}

/// The base URL, normalised (no trailing `/`): http(s), a host, no credentials, query or
/// fragment — the proxy appends the caller's path to it and nothing else.
fn base_url_of(given: &str) -> Result<String, String> {
    if given.chars().count() > MAX_URL_CHARS {
        return Err(format!("must be at most {MAX_URL_CHARS} characters"));
    }
    let url = reqwest::Url::parse(given).map_err(|e| format!("is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; the pooled key is injected per request".into());
    }
    if url.query().is_some() || given.contains('?') {
        return Err("must not carry a query string".into());
    }
    if url.fragment().is_some() || given.contains('#') {
        return Err("must not carry a fragment".into());
    }
    if url.path().split('/').any(|s| s == ".." || s == ".") {
        return Err("must not contain . or .. segments".into());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn auth_of(auth: &Map<String, Value>) -> Result<UpstreamAuth, ApiError> {
    let bad = |message: &str| Err(ApiError::BadRequest(format!("upstream.auth{message}")));
    for field in auth.keys() {
        if !["header", "prefix", "query"].contains(&field.as_str()) {
            return bad(": unknown field; expected header (with prefix) or query");
        }
    }
    match (auth.get("header"), auth.get("query")) {
        (Some(Value::String(header)), None) => {
            let header = header_name("auth.header", header)?;
            let prefix = match auth.get("prefix") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(p))
                    if p.chars().count() <= MAX_NAME_CHARS
                        && p.chars().all(|c| c == '\t' || (' '..='~').contains(&c)) =>
                {
                    p.clone()
                }
                Some(_) => {
                    return bad(".prefix must be visible ASCII or spaces, at most 100 characters (e.g. \"Bearer \")")
                }
            };
            Ok(UpstreamAuth::Header { header, prefix })
        }
        (None, Some(Value::String(query))) => {
            if auth.contains_key("prefix") {
                return bad(".prefix goes with header, not query");
            }
            let ok = !query.is_empty()
                && query.chars().count() <= MAX_NAME_CHARS
                && query
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c));
            if !ok {
                return bad(".query must be 1 to 100 of A-Z a-z 0-9 . _ ~ -");
            }
            Ok(UpstreamAuth::Query {
                query: query.clone(),
            })
        }
        _ => bad(" must be {\"header\": name, \"prefix\"?: text} or {\"query\": name}"),
    }
}

/// A header name, lowercased; reserved ones (hop-by-hop, framing, `Host`) are refused.
fn header_name(field: &str, given: &str) -> Result<String, ApiError> {
    let name = HeaderName::from_bytes(given.as_bytes())
        .ok()
        .filter(|_| given.len() <= MAX_NAME_CHARS)
        .ok_or_else(|| {
            let shown: String = given.chars().take(64).collect();
            ApiError::BadRequest(format!(
                "upstream.{field}: '{shown}' is not a header name (1 to 100 of letters, digits, !#$%&'*+.^_`|~-)"
            ))
        })?;
    let name = name.as_str().to_owned();
    if crate::proxy::HOP_BY_HOP.contains(&name.as_str())
        || RESERVED_HEADERS.contains(&name.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "upstream.{field}: '{name}' is set by the proxy itself"
        )));
    }
    Ok(name)
}

fn string(pattern: &str, max: usize) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(pattern))
}

/// The JSON Schema of `upstream` (its rules on reserved header names and URL parsing are the
/// handler's; README "Proxy mode").
pub fn upstream_schema() -> Object {
    let header_auth = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("header", string(TOKEN_PATTERN, MAX_NAME_CHARS))
        .property(
            "prefix",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .max_length(Some(MAX_NAME_CHARS))
                .pattern(Some(HEADER_VALUE_PATTERN))
                .examples([serde_json::json!("Bearer ")]),
        )
        .required("header")
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
    let query_auth = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("query", string(QUERY_NAME_PATTERN, MAX_NAME_CHARS))
        .required("query")
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)));
    let headers = ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .max_properties(Some(MAX_HEADERS))
        .property_names(Some(string(TOKEN_PATTERN, MAX_NAME_CHARS)))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_HEADER_VALUE_CHARS))
                .pattern(Some(HEADER_VALUE_PATTERN)),
        ));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Proxy mode (SPEC §8.6): where `/proxy/{feature}/…` sends this tier's requests, with \
             the pooled key injected in a header (optional prefix) or a query parameter. \
             On PATCH: absent leaves it unchanged, `null` removes it.",
        ))
        .property(
            "base_url",
            string(URL_PATTERN, MAX_URL_CHARS)
                .examples([serde_json::json!("https://api.firecrawl.dev")]),
        )
        .property(
            "auth",
            OneOfBuilder::new().item(header_auth).item(query_auth),
        )
        .property("headers", headers)
        .property(
            "timeout_seconds",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
                .minimum(Some(1))
                .maximum(Some(MAX_TIMEOUT_SECONDS)),
        )
        .required("base_url")
        .required("auth")
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
        .build()
}

/// `upstream_schema` or `null`.
pub fn nullable_upstream_schema() -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(upstream_schema())
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}
