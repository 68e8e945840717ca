//! `GET /admin/ui` (SPEC §8.8): the admin page — one HTML file, one script, one stylesheet,
//! embedded in the binary and served from memory. The page holds no data, so it is public; the
//! script reads the JSON admin API with the token the operator enters (a Bearer header, never a
//! URL). Assets are named by their content hash and cached as immutable; the HTML is
//! `no-cache`, so a new binary's page names its new assets at once.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorBody};

const HTML_TEMPLATE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// Where the hashed assets are served (`/admin/ui/assets/<name>.<hash>.<ext>`).
pub const ASSET_PREFIX: &str = "/admin/ui/assets/";

/// Scripts, styles and fetches from this origin only; no inline script or style, no plugin,
/// no form posts, never framed. `img-src data:` only for the page's empty favicon.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// One embedded file under its content-hashed name.
struct Asset {
    name: String,
    content_type: &'static str,
    body: &'static str,
}

struct Page {
    html: String,
    assets: [Asset; 2],
}

/// Built once (the router forces it at startup): the hashes, and the HTML naming them.
static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let script = hashed("app", "js", SCRIPT, "text/javascript; charset=utf-8");
    let style = hashed("app", "css", STYLE, "text/css; charset=utf-8");
    let html = HTML_TEMPLATE
        .replace("{{script}}", &format!("{ASSET_PREFIX}{}", script.name))
        .replace("{{style}}", &format!("{ASSET_PREFIX}{}", style.name));
    Page {
        html,
        assets: [script, style],
    }
});

/// `<stem>.<first 16 hex digits of sha256>.<ext>`: a changed file gets a new name, so an
/// immutable cache entry can never serve a stale copy.
fn hashed(stem: &str, ext: &str, body: &'static str, content_type: &'static str) -> Asset {
    let digest = hex::encode(Sha256::digest(body.as_bytes()));
    Asset {
        name: format!("{stem}.{}.{ext}", &digest[..16]),
        content_type,
        body,
    }
}

/// Generates the page and its asset names now, so no request pays for it.
pub fn prepare() {
    LazyLock::force(&PAGE);
}

/// The URL paths of the page's assets, as the HTML names them.
pub fn asset_paths() -> Vec<String> {
    PAGE.assets
        .iter()
        .map(|a| format!("{ASSET_PREFIX}{}", a.name))
        .collect()
}

/// The headers every answer of the page carries.
fn page_headers(content_type: &'static str, cache: &'static str) -> [(HeaderName, HeaderValue); 7] {
    [
        (CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (CACHE_CONTROL, HeaderValue::from_static(cache)),
        (
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
        ),
        (X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ]
}

/// `GET /admin/ui`: the page (no data in it; public).
#[utoipa::path(
    get,
    path = "/admin/ui",
    tag = "admin page",
    operation_id = "admin_ui",
    responses(
        (status = 200, description = "The admin page (HTML; no data in it — its script asks for \
            the admin token and reads the admin API with it). Strict Content-Security-Policy, \
            never framed, `Cache-Control: no-cache`",
            content_type = "text/html; charset=utf-8", body = String),
    )
)]
pub async fn page() -> Response {
    (
        page_headers("text/html; charset=utf-8", "no-cache"),
        PAGE.html.as_str(),
    )
        .into_response()
}

/// `GET /admin/ui/assets/{file}`: the page's script or stylesheet by its hashed name.
#[utoipa::path(
    get,
    path = "/admin/ui/assets/{file}",
    tag = "admin page",
    operation_id = "admin_ui_asset",
    params(("file" = String, Path, description = "An asset name as the page names it: \
        `app.<content hash>.js` or `app.<content hash>.css`")),
    responses(
        (status = 200, description = "The asset; `Cache-Control: immutable` (its name changes \
            with its content)",
            content(
                (String = "text/javascript; charset=utf-8"),
                (String = "text/css; charset=utf-8"),
            )),
        (status = 404, description = "No asset of that name (e.g. a previous build's hash)", body = ErrorBody),
    )
)]
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let asset = PAGE
        .assets
        .iter()
        .find(|a| a.name == file)
        .ok_or_else(|| ApiError::NotFound("no such asset".into()))?;
    Ok((
        page_headers(asset.content_type, "public, max-age=31536000, immutable"),
        asset.body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_each_asset_by_its_content_hash() {
        let paths = asset_paths();
        assert_eq!(paths.len(), 2);
        for path in &paths {
            assert!(PAGE.html.contains(path.as_str()), "{path}");
        }
        assert!(!PAGE.html.contains("{{"), "a placeholder was left");
        let digest = hex::encode(Sha256::digest(SCRIPT.as_bytes()));
        assert_eq!(PAGE.assets[0].name, format!("app.{}.js", &digest[..16]));
    }

    // SPEC §8.8: no inline script, no inline style, no third-party origin in the page.
    #[test]
    fn the_page_has_no_inline_script_style_or_foreign_origin() {
        let html = PAGE.html.to_ascii_lowercase();
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/admin/ui/assets/app."));
        assert!(!html.contains("<style"));
        assert!(!html.contains(" style="));
        let handler = regex::Regex::new(r"\son[a-z]+\s*=").expect("regex");
        assert!(!handler.is_match(&html), "an inline event handler");
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("localStorage"));
    }
}
