//! Issue 8 items 1–2: the OpenAPI document the service serves, checked against the router it
//! describes, and the defects Schemathesis found (one test each, failing before its fix).

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

/// Every route of the router (SPEC §6 and §8.1), as the README's endpoint table lists them.
const ROUTES: [(&str, &str); 36] = [
    ("GET", "/health"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/key"),
    ("GET", "/admin/health"),
    ("GET", "/admin/tiers"),
    ("POST", "/admin/tiers"),
    ("PATCH", "/admin/tiers"),
    ("DELETE", "/admin/tiers/{name}"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("DELETE", "/admin/keys/{id}"),
    ("PATCH", "/admin/keys/{id}"),
    ("POST", "/admin/keys/import"),
    ("POST", "/admin/rekey"),
    ("GET", "/admin/consumers"),
    ("POST", "/admin/consumers"),
    ("DELETE", "/admin/consumers/{id}"),
    ("PATCH", "/admin/consumers/{id}"),
    ("POST", "/admin/consumers/{id}/scopes"),
    ("POST", "/admin/consumers/{id}/token"),
    ("DELETE", "/admin/consumers/{id}/scopes/{tier}"),
    ("GET", "/admin/usage"),
    ("GET", "/admin/usage/summary"),
    ("POST", "/serves/{serve_id}/outcome"),
    ("GET", "/admin/sources"),
    ("POST", "/admin/sources/regbot/refresh"),
    // Issue 15: the admin page (HTML, public) and its hashed assets.
    ("GET", "/admin/ui"),
    ("GET", "/admin/ui/assets/{file}"),
    // Issue 13 (SPEC §8.6): routed for any method; these five are documented.
    ("GET", "/proxy/{feature}/{path}"),
    ("POST", "/proxy/{feature}/{path}"),
    ("PUT", "/proxy/{feature}/{path}"),
    ("PATCH", "/proxy/{feature}/{path}"),
    ("DELETE", "/proxy/{feature}/{path}"),
];

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("path item");
            item.keys()
                .filter(|k| METHODS.iter().any(|m| m.eq_ignore_ascii_case(k)))
                .map(|m| (m.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A path of the document with its `{id}` filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-4000-8000-000000000000")
        .replace("{serve_id}", "00000000-0000-7000-8000-000000000000")
        .replace("{name}", "no-such-tier")
        .replace("{tier}", "no-such-tier")
        .replace("{file}", "no-such-asset.js")
        .replace("{feature}", "no-such-feature")
        .replace("{path}", "v1/x")
}

/// Whether an answer is the router's own "no such route" or "wrong method" fallback.
fn is_fallback(r: &Resp) -> bool {
    r.status == StatusCode::METHOD_NOT_ALLOWED
        || (r.status == StatusCode::NOT_FOUND && r.error() == "no such route")
}

// Issue 8 item 1: the document is public JSON, OpenAPI 3.1, and describes itself.
#[tokio::test]
async fn openapi_document_is_public_json_and_describes_itself() {
    let app = spawn_app().await;
    let r = app.get("/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body["openapi"], "3.1.0");
    assert!(r.body["paths"]["/openapi.json"]["get"].is_object());
    // The same bytes every time: generated once, served from memory.
    assert_eq!(app.get("/openapi.json", None).await.text, r.text);
    let schemes = &r.body["components"]["securitySchemes"];
    for name in ["admin_token", "consumer_token", "metrics_token"] {
        assert_eq!(schemes[name]["type"], "http", "{schemes}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{schemes}");
    }
}

// Every `$ref` in the document names a schema the document has (an unresolvable reference
// leaves that part of a body unfuzzed by Schemathesis; the outcome report's `error` had one).
#[tokio::test]
async fn every_reference_resolves() {
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r.clone());
                }
                map.values().for_each(|x| refs(x, out));
            }
            Value::Array(items) => items.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let app = spawn_app().await;
    let document = app.get("/openapi.json", None).await.body;
    let mut found = Vec::new();
    refs(&document, &mut found);
    assert!(!found.is_empty());
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(
            document["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
}

// Issue 8 item 1: the router's routes and the document's operations are the same set. The
// router is built from the documented handlers (`routes!`), so the document cannot list a
// route the router lacks; this checks over HTTP that every documented operation is routed,
// that no other method is routed on a documented path, and that both match the list above.
#[tokio::test]
async fn router_routes_and_document_operations_are_the_same_set() {
    let app = spawn_app().await;
    let document = app.get("/openapi.json", None).await.body;
    let documented = operations(&document);
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    for path in documented.iter().map(|(_, p)| p).collect::<BTreeSet<_>>() {
        for method in METHODS {
            let r = app
                .admin_send(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    &concrete(path),
                    None,
                )
                .await;
            let routed = !is_fallback(&r);
            let listed = documented.contains(&(method.to_string(), path.clone()));
            assert_eq!(routed, listed, "{method} {path}: {} {}", r.status, r.text);
        }
    }
    assert!(is_fallback(&app.admin_get("/admin/nothing").await));
}

// Issue 8 item 1: every documented answer of a protected operation carries the bearer scheme
// and its 401; `/key` takes either token, `/admin/*` only the admin's; the public ones none.
#[tokio::test]
async fn document_states_who_may_call_each_operation() {
    let app = spawn_app().await;
    let document = app.get("/openapi.json", None).await.body;
    for (method, path) in ROUTES {
        let operation = &document["paths"][path][method.to_ascii_lowercase()];
        let security = operation["security"].clone();
        let responses = operation["responses"].as_object().expect("responses");
        match path {
            "/health"
            | "/openapi.json"
            | "/livez"
            | "/readyz"
            | "/admin/ui"
            | "/admin/ui/assets/{file}" => {
                assert!(security.is_null(), "{method} {path}: {security}");
                assert!(!responses.contains_key("401"), "{method} {path}");
            }
            // Public unless METRICS_TOKEN is set.
            "/metrics" => {
                assert_eq!(security, json!([{}, { "metrics_token": [] }]));
                assert!(responses.contains_key("401"), "{method} {path}");
            }
            "/key" | "/serves/{serve_id}/outcome" => {
                assert_eq!(
                    security,
                    json!([{ "admin_token": [] }, { "consumer_token": [] }])
                );
                // Another consumer's serve is a 404, never a 403 (SPEC §8.2).
                let forbidden = path == "/key";
                assert!(responses.contains_key("401"), "{method} {path}");
                assert_eq!(responses.contains_key("403"), forbidden, "{method} {path}");
            }
            // Issue 13: either token, as a bearer or in X-Keypool-Token.
            "/proxy/{feature}/{path}" => {
                assert_eq!(
                    security,
                    json!([{ "admin_token": [] }, { "consumer_token": [] }, { "keypool_token": [] }])
                );
                assert!(responses.contains_key("401") && responses.contains_key("403"));
            }
            _ => {
                assert_eq!(security, json!([{ "admin_token": [] }]), "{method} {path}");
                assert!(responses.contains_key("401") && responses.contains_key("403"));
            }
        }
        // Every error answer is the `{"error"}` body.
        for (status, response) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {status}"
                );
            }
        }
    }
    let too_many = &document["paths"]["/key"]["get"]["responses"]["429"];
    assert!(too_many["headers"]["Retry-After"].is_object(), "{too_many}");
}

// Issue 8 item 1: the limits the document states are the ones the handlers enforce.
#[tokio::test]
async fn document_limits_match_what_the_handlers_check() {
    let app = spawn_app().await;
    let document = app.get("/openapi.json", None).await.body;
    let schemas = &document["components"]["schemas"];
    let tier = &schemas["TierBody"];
    assert_eq!(tier["additionalProperties"], false);
    assert_eq!(tier["required"], json!(["name", "features"]));
    let name = &tier["properties"]["name"];
    assert_eq!(name["maxLength"], 200);
    assert_eq!(name["minLength"], 1);
    let features = &tier["properties"]["features"];
    assert_eq!(features["minProperties"], 1);
    assert_eq!(features["propertyNames"], *name);
    // Issue 11 item 1: one window object, or a non-empty array of them (at most 8).
    let one_of = &features["additionalProperties"]["oneOf"];
    let limits = &one_of[0]["properties"];
    assert_eq!(limits["rate_limit"]["minimum"], 1);
    assert_eq!(one_of[1]["type"], "array", "{one_of}");
    assert_eq!(one_of[1]["minItems"], 1);
    assert_eq!(one_of[1]["maxItems"], 8);
    assert_eq!(one_of[1]["items"], one_of[0]);

    // Just past each stated bound, the handler refuses; at it, it accepts.
    let at_limit = "n".repeat(200);
    let r = app
        .admin_post(
            "/admin/tiers",
            json!({ "name": at_limit, "features": { "f": { "rate_limit": 1 } } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    for bad in [
        json!({ "name": "n".repeat(201), "features": { "f": { "rate_limit": 1 } } }),
        json!({ "name": " \u{3000}", "features": { "f": { "rate_limit": 1 } } }),
        json!({ "name": "a\u{85}b", "features": { "f": { "rate_limit": 1 } } }),
        json!({ "name": "x", "features": {} }),
        json!({ "name": "x", "features": { "f": { "rate_limit": 0 } } }),
        json!({ "name": "x", "features": { "f": { "rate_limit": 1 } }, "extra": 1 }),
    ] {
        let r = app.admin_post("/admin/tiers", bad.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    let key = &schemas["NewKey"]["allOf"][0];
    assert_eq!(key["properties"]["expires_at"]["format"], "date-time");
    assert_eq!(key["additionalProperties"], false);
    let usage = &document["paths"]["/admin/usage"]["get"]["parameters"][0];
    assert_eq!(usage["name"], "limit");
    assert_eq!(usage["schema"]["anyOf"][0]["minimum"], 1);
}

// Issue 8 item 2, Schemathesis finding: JSON Schema's `integer` includes numbers written with a
// zero fraction (`3.0`, `1e3`), which serde refused ("expected i64"): 400 for valid input.
#[tokio::test]
async fn whole_numbers_written_with_a_zero_fraction_are_accepted() {
    let app = spawn_app().await;
    let r = app
        .admin_raw(
            Method::POST,
            "/admin/tiers",
            r#"{"name":"t","features":{"f":{"rate_limit":3.0,"window_seconds":6e1}}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        r.body["features"]["f"],
        json!({ "rate_limit": 3, "window_seconds": 60 })
    );
    let r = app
        .admin_raw(
            Method::POST,
            "/admin/keys",
            r#"{"name":"k","key":"v","tier":"t","usage_limit":5.0,"usage_window_seconds":1e2}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["usage_limit"], 5);
    assert_eq!(r.body["usage_window_seconds"], 100);

    for bad in [
        r#"{"name":"u","features":{"f":{"rate_limit":3.5}}}"#,
        r#"{"name":"u","features":{"f":{"rate_limit":1e300}}}"#,
        r#"{"name":"u","features":{"f":{"rate_limit":"3"}}}"#,
    ] {
        let r = app.admin_raw(Method::POST, "/admin/tiers", bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM tiers").await, 1);
}
