//! Domain records that cross the storage seam: what a row means, not how a driver decodes it.

use std::collections::BTreeMap;

use crate::timestamp::Timestamp;

pub mod upstream;

/// A tier's limit for one feature: at most `rate_limit` serves per key per `window_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureLimit {
    pub rate_limit: i64,
    pub window_seconds: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierRecord {
    pub id: String,
    pub name: String,
    pub description: String,
    pub features: BTreeMap<String, FeatureLimit>,
    /// Where `/proxy` forwards this tier's requests (SPEC §8.6); `None`: not proxied.
    pub upstream: Option<upstream::TierUpstream>,
}

/// A key as stored: `sealed_value` and secret values are plaintext or `enc:gcm:` ciphertext.
#[derive(Clone)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub sealed_value: String,
    pub tier_id: String,
    pub is_active: bool,
    pub expires_at: Option<Timestamp>,
    pub usage_limit: Option<i64>,
    pub usage_count: i64,
    pub usage_window_seconds: Option<i64>,
    pub usage_window_start: Option<Timestamp>,
    pub metadata_json: String,
    pub created_at: Option<Timestamp>,
    /// (name, sealed value)
    pub secrets: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub id: String,
    pub name: String,
    /// hex(sha256(token))
    pub token_hash: String,
    pub description: String,
    pub is_active: bool,
    /// Tier ids the consumer may draw from.
    pub scopes: Vec<String>,
    /// hex(sha256(previous token)) and when it stops working: a rotation's grace (SPEC §8.3).
    pub previous_token: Option<(String, Timestamp)>,
}

impl KeyRecord {
    /// Whether `other` holds the same row and secrets, timestamps compared at the microsecond
    /// the database keeps and secrets in any order.
    pub fn same_as_stored(&self, other: &KeyRecord) -> bool {
        let micros = |t: Option<Timestamp>| t.map(|t| t.timestamp_micros());
        let sorted = |k: &KeyRecord| {
            let mut s = k.secrets.clone();
            s.sort();
            s
        };
        self.id == other.id
            && self.name == other.name
            && self.sealed_value == other.sealed_value
            && self.tier_id == other.tier_id
            && self.is_active == other.is_active
            && micros(self.expires_at) == micros(other.expires_at)
            && self.usage_limit == other.usage_limit
            && self.usage_window_seconds == other.usage_window_seconds
            && self.metadata_json == other.metadata_json
            && sorted(self) == sorted(other)
    }
}

/// One audited serve: a `usage_events` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageEvent {
    pub id: String,
    pub key_id: String,
    pub consumer_id: String,
    pub feature: String,
    pub created_at: Timestamp,
    /// The first outcome reported for this serve, if any (SPEC §8.2).
    pub outcome: Option<StoredOutcome>,
}

/// A serve's recorded outcome. The class is kept as stored text (shown as is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOutcome {
    pub class: String,
    pub status: Option<i64>,
    pub reported_at: Option<Timestamp>,
}

/// An outcome to record on a serve's audit row, unless one is recorded already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutcomeWrite {
    pub serve_id: String,
    pub class: &'static str,
    pub status: Option<u16>,
    pub reported_at: Timestamp,
}

/// A key's health as stored in `key_health` (the key's `is_active` follows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthWrite {
    pub key_id: String,
    pub record: crate::pool::health::HealthRecord,
}

/// A throttled tier's cooldown, as written (SPEC §8.2 host-level throttling).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierCooldownWrite {
    pub tier_id: String,
    pub until: Timestamp,
}

/// A key's usage counters after a batch of serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUsageUpdate {
    pub key_id: String,
    pub usage_count: i64,
    pub usage_window_start: Option<Timestamp>,
}

/// Everything the in-memory pool is built from at startup.
#[derive(Default)]
pub struct Snapshot {
    pub tiers: Vec<TierRecord>,
    pub keys: Vec<KeyRecord>,
    pub consumers: Vec<ConsumerRecord>,
    /// Stored key health by key id (keys without a row are active).
    pub health: std::collections::HashMap<String, crate::pool::health::HealthRecord>,
    /// Stored tier cooldowns by tier id (host-level throttling; past ones change nothing).
    pub tier_cooldowns: std::collections::HashMap<String, Timestamp>,
}
