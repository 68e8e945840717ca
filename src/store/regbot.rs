//! SQL of the RegBot source (SPEC §8.5) in our database: tiers' explicit services and what we
//! keep per RegBot credential (`regbot_keys`). RegBot's own database is read in `crate::regbot`.

use super::{json, Cells, Param, SnapshotRows, Statement};
use crate::model::{RegbotKeyRow, TierRecord};

/// Key ids of RegBot credentials start with this; the rest is RegBot's `credentials.id`.
pub const KEY_PREFIX: &str = "regbot:";

pub const SELECT_TIER_SOURCES: &str = "SELECT tier_id, regbot_service FROM tier_sources";
pub const SELECT_TIER_SOURCE_OF: &str =
    "SELECT tier_id, regbot_service FROM tier_sources WHERE tier_id = ?";
pub const DELETE_TIER_SOURCE: &str = "DELETE FROM tier_sources WHERE tier_id = ?";
pub const INSERT_TIER_SOURCE: &str =
    "INSERT INTO tier_sources (tier_id, regbot_service) VALUES (?, ?)";
pub const SELECT_REGBOT_KEYS: &str =
    "SELECT key_id, usage_count, quota_used_seen, usage_at_seen, fingerprint FROM regbot_keys";
/// A refresh's quota baselines and fingerprints from one JSON array `[[key_id,
/// quota_used_seen, usage_at_seen, fingerprint], …]` (the counter is the group commit's).
pub const UPSERT_SEEN: &str = "INSERT INTO regbot_keys (key_id, quota_used_seen, usage_at_seen, \
    fingerprint) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?) \
    WHERE true ON CONFLICT (key_id) DO UPDATE SET quota_used_seen = excluded.quota_used_seen, \
    usage_at_seen = excluded.usage_at_seen, fingerprint = excluded.fingerprint";

/// The tier's source rows inside the transaction that writes the tier: the old row goes, the
/// new one (if any) is written.
pub fn tier_source_statements(tier: &TierRecord) -> Vec<Statement> {
    let mut out: Vec<Statement> = vec![(DELETE_TIER_SOURCE, vec![Param::text(&tier.id)])];
    if let Some(source) = &tier.source {
        out.push((
            INSERT_TIER_SOURCE,
            vec![Param::text(&tier.id), Param::text(&source.regbot_service)],
        ));
    }
    out
}

/// One row of `UPSERT_SEEN`.
pub struct SeenWrite {
    pub key_id: String,
    pub quota_used_seen: Option<i64>,
    pub usage_at_seen: i64,
    pub fingerprint: String,
}

pub fn seen_parameter(rows: &[SeenWrite]) -> String {
    let rows: Vec<(&str, Option<i64>, i64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.key_id.as_str(),
                r.quota_used_seen,
                r.usage_at_seen,
                r.fingerprint.as_str(),
            )
        })
        .collect();
    json(&rows)
}

pub fn keep_tier_source(rows: &mut SnapshotRows, r: &dyn Cells) {
    if let (Some(tier_id), Some(service)) = (r.text(0), r.text(1)) {
        rows.tier_sources.push((tier_id, service));
    }
}

pub fn keep_regbot_key(rows: &mut SnapshotRows, r: &dyn Cells) {
    if let Some(key_id) = r.text(0) {
        rows.regbot_keys.push((
            key_id,
            RegbotKeyRow {
                usage_count: r.int(1).unwrap_or(0),
                quota_used_seen: r.int(2),
                usage_at_seen: r.int(3).unwrap_or(0),
                fingerprint: r.text(4),
            },
        ));
    }
}
