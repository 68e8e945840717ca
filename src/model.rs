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

/// The most windows one feature may carry (SPEC §8.4): a draw keeps them in a fixed array.
pub const MAX_WINDOWS: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierRecord {
    pub id: String,
    pub name: String,
    pub description: String,
    /// Each feature's rate windows (SPEC §8.4), never empty, at most `MAX_WINDOWS`, no two with
    /// the same `window_seconds`; the first is the Go `tier_features` row, the rest
    /// `feature_windows` rows in order.
    pub features: BTreeMap<String, Vec<FeatureLimit>>,
    /// Where the tier's keys also come from (SPEC §8.5): an explicit RegBot service, stored
    /// in `tier_sources`; `None` = stored keys only, or the seed's default mapping by name.
    pub source: Option<TierSource>,
    /// Where `/proxy` forwards this tier's requests (SPEC §8.6); `None`: not proxied.
    pub upstream: Option<upstream::TierUpstream>,
}

/// A tier's explicit RegBot service (`"source": {"regbot_service": …}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierSource {
    pub regbot_service: String,
}

/// What our database keeps about RegBot credential `regbot:N` (`regbot_keys`), never its value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegbotKeyRow {
    /// Units served here, ever.
    pub usage_count: i64,
    /// RegBot's `quota_used` when last seen changed, and our `usage_count` at that moment.
    pub quota_used_seen: Option<i64>,
    pub usage_at_seen: i64,
    /// Keyed hash of the row's `api_key` and `updated_at`.
    pub fingerprint: Option<String>,
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
    /// Budget units the serve took (SPEC §8.4); a Go-era row's NULL reads as 1.
    pub cost: i64,
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

/// A (key, feature) rate window as the group commit writes it and startup restores it
/// (windows of a minute or longer, SPEC §8.4): opened at `start` (wall time), `count` serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateWindowWrite {
    pub key_id: String,
    pub feature: String,
    pub window_seconds: i64,
    pub start: Timestamp,
    pub count: i64,
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
    /// RegBot credentials' counters by key id `regbot:N` (SPEC §8.5).
    pub regbot_keys: std::collections::HashMap<String, RegbotKeyRow>,
    /// Stored rate windows (SPEC §8.4); ones elapsed or of unknown keys change nothing.
    pub rate_windows: Vec<RateWindowWrite>,
}
