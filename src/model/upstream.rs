//! A tier's upstream for proxy mode (SPEC §8.6), as stored and shown: the form the API
//! validated (`api/tier_upstream.rs`), kept as one JSON row per tier in `tier_upstreams`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest `timeout_seconds` accepted; also the default's ceiling.
pub const MAX_TIMEOUT_SECONDS: u64 = 3600;
/// `timeout_seconds` when the tier does not set one: the whole exchange, streaming included.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;

/// Where a tier's proxied requests go and how its keys are presented there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TierUpstream {
    /// `http` or `https` origin with an optional path prefix; no credentials, query or fragment.
    #[schema(examples("https://api.firecrawl.dev"))]
    pub base_url: String,
    pub auth: UpstreamAuth,
    /// Static headers sent with every proxied request (shown to admins: keep secrets in keys).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Deadline of one whole proxied exchange in seconds (`null`: 300); see README "Proxy mode".
    #[serde(default)]
    #[schema(required = true, minimum = 1, maximum = 3600)]
    pub timeout_seconds: Option<u64>,
}

/// How the pooled key is injected: a header (with an optional prefix such as `Bearer `) or a
/// query parameter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UpstreamAuth {
    Header {
        header: String,
        #[serde(default)]
        prefix: String,
    },
    Query {
        query: String,
    },
}

impl TierUpstream {
    /// The stored JSON.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored row; one that does not parse leaves the tier without an upstream (warned,
    /// never fatal: the rest of the pool still loads).
    pub fn from_stored(tier_id: &str, json: &str) -> Option<TierUpstream> {
        match serde_json::from_str(json) {
            Ok(upstream) => Some(upstream),
            Err(e) => {
                tracing::warn!(tier_id, error = %e, "a stored tier upstream is unreadable; the tier is not proxied");
                None
            }
        }
    }

    /// The deadline of one proxied exchange.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.timeout_seconds
                .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
                .clamp(1, MAX_TIMEOUT_SECONDS),
        )
    }
}
