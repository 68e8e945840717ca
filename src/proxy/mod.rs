//! Proxy mode's plumbing (SPEC §8.6): the one upstream HTTP client, the target URL and the
//! headers as the upstream sees them, and the response body as the caller sees it
//! (`relay.rs`). The attempt loop around the draw lives in `api/proxy.rs`.

pub mod redact;
pub mod relay;

use std::time::Duration;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;

use crate::model::upstream::{TierUpstream, UpstreamAuth};

/// A request body up to this size is kept, so the request can be retried on another key;
/// a larger one streams through in a single attempt.
pub const RETRY_BUFFER: usize = 10 * 1024 * 1024;
/// Connecting (TCP and TLS) to an upstream must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the next chunk of a streamed response (or the tier's deadline, if shorter).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of an error answer (status ≥ 400) is read before deciding on a retry: its text
/// also classifies the outcome (quota vs rate limit, SPEC §8.2).
pub const ERROR_PREFIX: usize = 64 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Credential headers a caller may send (its keypool token, or a key its SDK insists on);
/// none reaches the upstream — the pooled key is the only credential sent.
pub const CALLER_CREDENTIALS: [&str; 9] = [
    "authorization",
    "x-keypool-token",
    "x-api-key",
    "api-key",
    "apikey",
    "xi-api-key",
    "x-goog-api-key",
    "cookie",
    "proxy-authorization",
];

/// The shared upstream client: connection pooling, rustls, HTTP/1.1 and HTTP/2 (by ALPN), no
/// redirects followed (a 3xx goes back to the caller as is), no automatic decompression.
/// `Err` keeps why it could not be built; the proxy then answers 503.
pub struct Client(Result<reqwest::Client, String>);

impl Default for Client {
    fn default() -> Client {
        Client::trusting(Vec::new())
    }
}

impl Client {
    /// The client, trusting `roots` (`UPSTREAM_CA_FILE`) beside the built-in web roots.
    pub fn trusting(roots: Vec<reqwest::Certificate>) -> Client {
        let builder = roots
            .into_iter()
            .fold(reqwest::Client::builder(), |b, root| {
                b.add_root_certificate(root)
            });
        Client(
            builder
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(Duration::from_secs(90))
                .redirect(reqwest::redirect::Policy::none())
                .tcp_nodelay(true)
                .no_proxy()
                .build()
                .map_err(|e| e.without_url().to_string()),
        )
    }

    pub fn get(&self) -> Result<&reqwest::Client, &str> {
        self.0.as_ref().map_err(String::as_str)
    }
}

/// Why a proxied path is refused (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path must not contain . or .. segments (nor encoded ones)")]
    Traversal,
    #[error("the path must be relative to the upstream's base URL, not an absolute URL")]
    Absolute,
    #[error("the path must not contain encoded slashes, backslashes or control characters")]
    Encoded,
}

/// A path segment or query name with its `%XX` escapes decoded (invalid ones kept as is).
pub fn decoded(segment: &str) -> Vec<u8> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Checks the caller's path (as sent, percent-encoded, after `/proxy/{feature}/`): each
/// segment decoded must not be `.`/`..` nor hold `/`, `\` or a control character, and the path
/// must not be an absolute URL (`scheme:` or `//host`).
pub fn check_path(raw: &str) -> Result<(), PathError> {
    let first = raw.split('/').next().unwrap_or_default();
    let first = decoded(first);
    let scheme_like = first.iter().position(|b| *b == b':').is_some_and(|colon| {
        colon > 0
            && first[0].is_ascii_alphabetic()
            && first[..colon]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(b))
    });
    if scheme_like || raw.starts_with('/') {
        return Err(PathError::Absolute);
    }
    for segment in raw.split('/') {
        let bytes = decoded(segment);
        if bytes == b"." || bytes == b".." {
            return Err(PathError::Traversal);
        }
        if bytes
            .iter()
            .any(|b| *b == b'/' || *b == b'\\' || b.is_ascii_control())
        {
            return Err(PathError::Encoded);
        }
    }
    Ok(())
}

/// The upstream URL: base URL + `/` + the caller's path, its query minus the tier's key
/// parameter, plus the key when the tier injects it in the query. `None` if the result would
/// leave the base URL (it never should after `check_path`; checked again here).
pub fn target_url(
    upstream: &TierUpstream,
    path: &str,
    query: Option<&str>,
    key: &str,
) -> Option<Url> {
    let mut url = Url::parse(&format!("{}/{}", upstream.base_url, path)).ok()?;
    let base = Url::parse(&upstream.base_url).ok()?;
    let prefix = format!("{}/", base.path().trim_end_matches('/'));
    if url.origin() != base.origin() || !url.path().starts_with(&prefix) {
        return None;
    }
    let key_param = match &upstream.auth {
        UpstreamAuth::Query { query } => Some(query.as_str()),
        UpstreamAuth::Header { .. } => None,
    };
    // The caller's query as it sent it (its encoding kept), minus the key parameter.
    let kept: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            key_param.is_none_or(|k| !decoded(name).eq_ignore_ascii_case(k.as_bytes()))
        })
        .collect();
    url.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
    if let Some(name) = key_param {
        url.query_pairs_mut().append_pair(name, key);
    }
    Some(url)
}

/// The names a `Connection` header lists: hop-by-hop for this message.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// The caller's headers as the upstream gets them: hop-by-hop, `Host`, framing, `Expect`
/// (the body was read already), every caller
/// credential and the tier's auth header dropped; the tier's static headers and the key (in
/// its header, marked sensitive, over a static header of the same name) added; `Accept-Encoding: identity`, so an error body can be
/// searched for the key. `None` when the key cannot be a header value (control characters).
pub fn upstream_headers(
    caller: &HeaderMap,
    upstream: &TierUpstream,
    key: &str,
) -> Option<HeaderMap> {
    let listed = connection_listed(caller);
    let mut out = HeaderMap::with_capacity(caller.len() + upstream.headers.len() + 2);
    for (name, value) in caller {
        let n = name.as_str();
        let dropped = HOP_BY_HOP.contains(&n)
            || CALLER_CREDENTIALS.contains(&n)
            || matches!(n, "host" | "content-length" | "accept-encoding" | "expect")
            || listed.contains(name)
            || upstream.headers.contains_key(n)
            || matches!(&upstream.auth, UpstreamAuth::Header { header, .. } if header == n);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &upstream.headers {
        out.insert(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        );
    }
    out.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let UpstreamAuth::Header { header, prefix } = &upstream.auth {
        let mut value = HeaderValue::from_str(&format!("{prefix}{key}")).ok()?;
        value.set_sensitive(true);
        out.insert(HeaderName::from_bytes(header.as_bytes()).ok()?, value);
    }
    Some(out)
}

/// The upstream's headers as the caller gets them: hop-by-hop ones dropped, and any header
/// whose value holds the key (an upstream echoing it) dropped too. `Content-Length` goes when
/// the body may be rewritten (redaction changes its length).
pub fn caller_headers(upstream: &HeaderMap, key: &str, body_rewritten: bool) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len() + 2);
    for (name, value) in upstream {
        let n = name.as_str();
        let dropped = HOP_BY_HOP.contains(&n)
            || listed.contains(name)
            || (body_rewritten && n == "content-length")
            || (!key.is_empty() && redact::contains(value.as_bytes(), key.as_bytes()));
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn upstream(auth: UpstreamAuth) -> TierUpstream {
        TierUpstream {
            base_url: "https://api.example.com/v1".into(),
            auth,
            headers: BTreeMap::new(),
            timeout_seconds: None,
        }
    }

    // Issue 13 item 5: traversal and absolute URLs are refused, encoded or not.
    #[test]
    fn paths_that_could_leave_the_base_url_are_refused() {
        for bad in ["..", "a/../b", "%2e%2e/x", "a/%2E%2e", ".", "a/./b"] {
            assert_eq!(check_path(bad), Err(PathError::Traversal), "{bad}");
        }
        for bad in [
            "http://evil.example/x",
            "https:%2f%2fevil",
            "/evil.example/x",
            "HTTP:x",
        ] {
            assert_eq!(check_path(bad), Err(PathError::Absolute), "{bad}");
        }
        for bad in ["a%2fb", "a%5c..", "a\\b", "a%00b", "a%0d%0ab"] {
            assert_eq!(check_path(bad), Err(PathError::Encoded), "{bad}");
        }
        for good in ["v1/scrape", "a..b/c", "a/b%20c", "search", "a/b:c", "1x:y"] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn target_url_keeps_the_base_and_swaps_the_key_parameter() {
        let up = upstream(UpstreamAuth::Query {
            query: "api_key".into(),
        });
        let url = target_url(
            &up,
            "search/x%20y",
            Some("q=a%26b&API_KEY=theirs&n=1"),
            "k&1",
        )
        .expect("a url");
        assert_eq!(
            url.as_str(),
            "https://api.example.com/v1/search/x%20y?q=a%26b&n=1&api_key=k%261"
        );
        let up = upstream(UpstreamAuth::Header {
            header: "authorization".into(),
            prefix: "Bearer ".into(),
        });
        let url = target_url(&up, "a", None, "k").expect("a url");
        assert_eq!(url.as_str(), "https://api.example.com/v1/a");
        assert!(target_url(&up, "../x", None, "k").is_none());
    }

    #[test]
    fn caller_credentials_and_hop_by_hop_headers_are_replaced_by_the_key() {
        let mut caller = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer caller-token"),
            ("x-keypool-token", "caller-token"),
            ("x-api-key", "sdk-placeholder"),
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("te", "trailers"),
            ("host", "keypooler.local"),
            ("content-type", "application/json"),
            ("accept-encoding", "gzip"),
        ] {
            caller.insert(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let up = upstream(UpstreamAuth::Header {
            header: "x-api-key".into(),
            prefix: String::new(),
        });
        let out = upstream_headers(&caller, &up, "pooled").expect("headers");
        let names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
        assert_eq!(out["x-api-key"], "pooled");
        assert!(out["x-api-key"].is_sensitive());
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["accept-encoding"], "identity");
        for gone in [
            "authorization",
            "x-keypool-token",
            "connection",
            "x-drop-me",
            "te",
            "host",
        ] {
            assert!(!names.contains(&gone), "{gone} forwarded");
        }
    }
}
