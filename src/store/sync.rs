//! SQL of the change log replicas poll (SPEC §8.7, migration 013) and the plain reads that
//! refresh one changed entity. Reads here take no lock (remotely no `BEGIN IMMEDIATE`): a read
//! torn by a write landing between its statements is repaired by the next poll, because that
//! write's own log row comes after the position the read was made from.

use super::{
    parse_stored_time, Cells, Db, Param, SnapshotRead, SnapshotRows, StoreError,
    BULK_ROWS_PER_BOUND,
};
use crate::model::{ConsumerRecord, KeyRecord, Snapshot, TierRecord};
use crate::pool::health::HealthRecord;
use crate::timestamp::Timestamp;

/// Where the log ends now: its newest seq, or what pruning removed if it emptied it.
pub const POSITION: &str = "SELECT max(coalesce((SELECT max(seq) FROM change_log), 0), \
    coalesce((SELECT pruned_through FROM change_log_state WHERE id = 1), 0))";
/// One page of the log after a position, with the pruned end as a first row of seq 0 — one
/// statement, so one snapshot and one round trip.
pub const CHANGES: &str = "SELECT 0, '', CAST(coalesce((SELECT pruned_through FROM \
    change_log_state WHERE id = 1), 0) AS TEXT) UNION ALL SELECT * FROM (SELECT seq, entity, \
    entity_id FROM change_log WHERE seq > ? ORDER BY seq LIMIT ?)";
/// The newest seq pruning may remove: rows written before a time, and rows beyond the newest N.
pub const PRUNE_THROUGH: &str = "SELECT coalesce(max(seq), 0) FROM change_log WHERE at < ? \
    OR seq <= (SELECT max(seq) FROM change_log) - ?";
pub const PRUNE: &str = "DELETE FROM change_log WHERE seq <= ?";
pub const SET_PRUNED_THROUGH: &str = "INSERT INTO change_log_state (id, pruned_through) \
    VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET \
    pruned_through = max(pruned_through, excluded.pruned_through)";
pub const LOG_ROWS: &str = "SELECT count(*) FROM change_log";
/// One key's stored health (RegBot keys have a row but no `keys` row, so not joined).
pub const SELECT_HEALTH_OF: &str = "SELECT key_id, state, reason, CAST(until AS TEXT), \
    last_status, strikes, CAST(changed_at AS TEXT), rate_step, \
    CAST(rate_rested_from AS TEXT), breaker_step, CAST(breaker_rested_from AS TEXT), \
    auth_serve_id, CAST(auth_at AS TEXT) FROM key_health WHERE key_id = ?";
pub const SELECT_COOLDOWN_OF: &str =
    "SELECT tier_id, CAST(cooled_until AS TEXT) FROM tier_health WHERE tier_id = ?";

/// One row of the log: what changed, never how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    pub entity: String,
    pub id: String,
}

/// A page of the log after a position, with the highest seq pruning has removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangePage {
    pub pruned_through: i64,
    pub changes: Vec<Change>,
}

/// A row read by `Db::select`, every cell as text.
struct TextRow(Vec<Option<String>>);

impl Cells for TextRow {
    fn text(&self, i: usize) -> Option<String> {
        self.0.get(i).cloned().flatten()
    }

    fn int(&self, i: usize) -> Option<i64> {
        let cell = self.0.get(i)?.as_deref()?.trim();
        cell.parse::<i64>()
            .ok()
            .or_else(|| cell.parse::<f64>().ok().map(|f| f as i64))
    }
}

impl Db {
    /// The log's end now (read before a snapshot, so nothing after it is missed).
    pub async fn change_log_position(&self) -> Result<i64, StoreError> {
        Ok(self.read_int(POSITION).await?.max(0))
    }

    /// Up to `limit` log rows after `after`, oldest first.
    pub async fn changes_since(&self, after: i64, limit: i64) -> Result<ChangePage, StoreError> {
        let rows = self
            .select(CHANGES, &[Param::Int(after), Param::Int(limit)])
            .await?;
        let mut page = ChangePage::default();
        for row in rows.into_iter().map(TextRow) {
            let seq = row.int(0).unwrap_or(0);
            if seq == 0 {
                page.pruned_through = row.int(2).unwrap_or(0);
            } else {
                page.changes.push(Change {
                    seq,
                    entity: row.text(1).unwrap_or_default(),
                    id: row.text(2).unwrap_or_default(),
                });
            }
        }
        Ok(page)
    }

    /// Removes log rows written before `before` (Unix seconds) and all but the newest
    /// `keep_rows`, recording how far it pruned; returns how many rows went.
    pub async fn prune_change_log(&self, before: i64, keep_rows: i64) -> Result<u64, StoreError> {
        let through = self
            .select(PRUNE_THROUGH, &[Param::Int(before), Param::Int(keep_rows)])
            .await?
            .into_iter()
            .next()
            .map(TextRow)
            .and_then(|r| r.int(0))
            .unwrap_or(0);
        if through <= 0 {
            return Ok(0);
        }
        let statements = [
            (PRUNE, vec![Param::Int(through)]),
            (SET_PRUNED_THROUGH, vec![Param::Int(through)]),
        ];
        let counts = self
            .write_all(&statements, &[], BULK_ROWS_PER_BOUND)
            .await?;
        Ok(counts.first().copied().unwrap_or(0))
    }

    /// How many rows the log holds (its bound is checked by the tests).
    pub async fn change_log_rows(&self) -> Result<i64, StoreError> {
        self.read_int(LOG_ROWS).await
    }

    /// `reads`, each binding `id`, as plain reads (no transaction).
    async fn read_plain(&self, reads: &[SnapshotRead], id: &str) -> Result<Snapshot, StoreError> {
        let mut rows = SnapshotRows::default();
        for (query, keep) in reads {
            for row in self.select(query, &[Param::text(id)]).await? {
                keep(&mut rows, &TextRow(row));
            }
        }
        Ok(rows.assemble())
    }

    /// One tier with its features, source and upstream, as a poll reads it.
    pub async fn poll_tier(&self, id: &str) -> Result<Option<TierRecord>, StoreError> {
        let found = self.read_plain(&SnapshotRows::TIER_READS, id).await?;
        Ok(found.tiers.into_iter().next())
    }

    /// One key with its secrets, as a poll reads it.
    pub async fn poll_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let found = self.read_plain(&SnapshotRows::KEY_READS, id).await?;
        Ok(found.keys.into_iter().next())
    }

    /// One consumer with its scopes, as a poll reads it.
    pub async fn poll_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>, StoreError> {
        let found = self.read_plain(&SnapshotRows::CONSUMER_READS, id).await?;
        Ok(found.consumers.into_iter().next())
    }

    /// One key's stored health, if it has a row (stored and RegBot keys alike).
    pub async fn poll_health(&self, key_id: &str) -> Result<Option<HealthRecord>, StoreError> {
        let rows = self
            .select(SELECT_HEALTH_OF, &[Param::text(key_id)])
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| super::health_record(&TextRow(r), 1, key_id)))
    }

    /// One tier's stored host-throttling cooldown end, if it has one.
    pub async fn poll_cooldown(&self, tier_id: &str) -> Result<Option<Timestamp>, StoreError> {
        let rows = self
            .select(SELECT_COOLDOWN_OF, &[Param::text(tier_id)])
            .await?;
        Ok(rows.into_iter().next().and_then(|r| {
            parse_stored_time(TextRow(r).text(1), "tier_health.cooled_until", tier_id)
        }))
    }
}
