//! The storage seam: every SQL statement the service runs, behind domain-named methods.
//!
//! Two drivers speak SQLite's dialect — `sqlite` (sqlx, the embedded default) and `libsql`
//! (remote Turso/libSQL). SQL text lives here once; drivers only bind, decode and map errors.

pub mod libsql;
pub mod regbot;
pub mod sqlite;
pub mod sync;

use crate::config::{Config, DatabaseConfig};
use crate::model::{
    ConsumerRecord, HealthWrite, KeyRecord, OutcomeWrite, RateWindowWrite, Snapshot, StoredOutcome,
    TierCooldownWrite, TierRecord, UsageEvent,
};
use crate::pool::health::{HealthMemory, HealthRecord, Reason, StateKind};
use crate::timestamp::Timestamp;

/// Storage failures, as the service cares about them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists")]
    Conflict,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A commit was sent but its answer was lost: it may or may not have been applied.
    #[error("commit outcome unknown: {0}")]
    Uncertain(String),
    /// A group commit the database refused whole: a delta would take a key past its budget or
    /// a rate window past its limit (SPEC §8.7; migration 012). Nothing was written.
    #[error("refused by the database: {0}")]
    Refused(String),
    #[error("database error: {0}")]
    Other(String),
}

impl StoreError {
    /// The same error again, for each of several callers one failed read answers.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::NotFound => StoreError::NotFound,
            StoreError::Conflict => StoreError::Conflict,
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Uncertain(m) => StoreError::Uncertain(m.clone()),
            StoreError::Refused(m) => StoreError::Refused(m.clone()),
            StoreError::Other(m) => StoreError::Other(m.clone()),
        }
    }
}

/// Embedded migrations: (version, name, SQL). Additive only; version 1 is the Go schema.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/001_init.sql")),
    (
        2,
        "indexes",
        include_str!("../../migrations/002_indexes.sql"),
    ),
    (
        3,
        "key_health",
        include_str!("../../migrations/003_key_health.sql"),
    ),
    (
        4,
        "health_memory",
        include_str!("../../migrations/004_health_memory.sql"),
    ),
    (
        5,
        "usage_rollup",
        include_str!("../../migrations/005_usage_rollup.sql"),
    ),
    (
        6,
        "value_hash",
        include_str!("../../migrations/006_value_hash.sql"),
    ),
    (
        7,
        "operate",
        include_str!("../../migrations/007_operate.sql"),
    ),
    (
        8,
        "plan_limits",
        include_str!("../../migrations/008_plan_limits.sql"),
    ),
    (9, "regbot", include_str!("../../migrations/009_regbot.sql")),
    (
        10,
        "tier_upstream",
        include_str!("../../migrations/010_tier_upstream.sql"),
    ),
    (
        11,
        "side_index_buckets",
        include_str!("../../migrations/011_side_index_buckets.sql"),
    ),
    (
        12,
        "commit_deltas",
        include_str!("../../migrations/012_commit_deltas.sql"),
    ),
    (
        13,
        "change_log",
        include_str!("../../migrations/013_change_log.sql"),
    ),
    (
        14,
        "window_counts",
        include_str!("../../migrations/014_window_counts.sql"),
    ),
    (
        15,
        "window_rows_missed",
        include_str!("../../migrations/015_window_rows_missed.sql"),
    ),
];

/// A value bound to a statement of an admin write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    Text(String),
    Int(i64),
    Null,
}

impl Param {
    pub fn text(v: impl Into<String>) -> Param {
        Param::Text(v.into())
    }

    pub fn opt_text(v: Option<String>) -> Param {
        v.map_or(Param::Null, Param::Text)
    }

    pub fn opt_int(v: Option<i64>) -> Param {
        v.map_or(Param::Null, Param::Int)
    }
}

/// One statement of an admin write: shared SQL text and its bound values.
pub type Statement = (&'static str, Vec<Param>);

/// A change to a stored key (SPEC §8.3 `PATCH /admin/keys/{id}`): `None` leaves a column as it
/// is; an inner `None` stores NULL. Counters stay unless `reset_usage`.
#[derive(Clone, Debug, Default)]
pub struct KeyUpdate {
    pub id: String,
    pub name: Option<String>,
    /// The new sealed value (see `key_value_rotation`).
    pub sealed_value: Option<String>,
    /// The new value's keyed hash (`Sealer::value_hash`), set with `sealed_value`.
    pub value_hash: Option<String>,
    pub tier_id: Option<String>,
    pub expires_at: Option<Option<Timestamp>>,
    pub usage_limit: Option<Option<i64>>,
    pub usage_window_seconds: Option<Option<i64>>,
    /// A budget window given to a key whose count has none open opens here, so the count so
    /// far is kept (a windowed count without a start would read as a fresh window).
    pub window_opens_at: Option<Timestamp>,
    pub metadata_json: Option<String>,
    /// (name, sealed value) set or replaced.
    pub set_secrets: Vec<(String, String)>,
    pub removed_secrets: Vec<String>,
    pub reset_usage: bool,
}

impl KeyUpdate {
    /// Whether it changes any stored column.
    pub fn changes_anything(&self) -> bool {
        self.name.is_some()
            || self.sealed_value.is_some()
            || self.tier_id.is_some()
            || self.expires_at.is_some()
            || self.usage_limit.is_some()
            || self.usage_window_seconds.is_some()
            || self.metadata_json.is_some()
            || !self.set_secrets.is_empty()
            || !self.removed_secrets.is_empty()
            || self.reset_usage
    }

    /// `key` as the database holds it once the update is stored.
    pub fn apply_to(&self, mut key: KeyRecord) -> KeyRecord {
        if let Some(name) = &self.name {
            key.name = name.clone();
        }
        if let Some(sealed) = &self.sealed_value {
            key.sealed_value = sealed.clone();
        }
        if let Some(tier_id) = &self.tier_id {
            key.tier_id = tier_id.clone();
        }
        if let Some(expires_at) = self.expires_at {
            key.expires_at = expires_at;
        }
        if let Some(limit) = self.usage_limit {
            key.usage_limit = limit;
        }
        if let Some(window) = self.usage_window_seconds {
            key.usage_window_seconds = window;
        }
        if self.window_opens_at.is_some() && key.usage_window_start.is_none() {
            key.usage_window_start = self.window_opens_at;
        }
        if let Some(metadata) = &self.metadata_json {
            key.metadata_json = metadata.clone();
        }
        key.secrets
            .retain(|(name, _)| !self.removed_secrets.contains(name));
        for (name, sealed) in &self.set_secrets {
            match key.secrets.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = sealed.clone(),
                None => key.secrets.push((name.clone(), sealed.clone())),
            }
        }
        if self.reset_usage {
            key.usage_count = 0;
            key.usage_window_start = None;
        }
        key
    }

    /// The statements of the update, in one transaction; the first finds the key (its
    /// affected-row count is 0 when there is none).
    pub fn statements(&self) -> Vec<Statement> {
        let id = || Param::text(&self.id);
        let mut out: Vec<Statement> = vec![(sql::TOUCH_KEY, vec![id()])];
        if let Some(name) = &self.name {
            out.push((sql::SET_KEY_NAME, vec![Param::text(name), id()]));
        }
        if let Some(sealed) = &self.sealed_value {
            let hash = self.value_hash.as_deref();
            out.extend(key_value_rotation(&self.id, sealed, hash));
        }
        if let Some(tier_id) = &self.tier_id {
            out.push((sql::SET_KEY_TIER, vec![Param::text(tier_id), id()]));
        }
        if let Some(expires_at) = self.expires_at {
            let at = Param::opt_text(expires_at.map(crate::timestamp::to_db));
            out.push((sql::SET_KEY_EXPIRES_AT, vec![at, id()]));
        }
        if let Some(limit) = self.usage_limit {
            out.push((sql::SET_KEY_USAGE_LIMIT, vec![Param::opt_int(limit), id()]));
        }
        if let Some(window) = self.usage_window_seconds {
            out.push((
                sql::SET_KEY_USAGE_WINDOW,
                vec![Param::opt_int(window), id()],
            ));
        }
        if let Some(at) = self.window_opens_at {
            let at = Param::text(crate::timestamp::to_db(at));
            out.push((sql::OPEN_KEY_USAGE_WINDOW, vec![at, id()]));
        }
        if let Some(metadata) = &self.metadata_json {
            out.push((sql::SET_KEY_METADATA, vec![Param::text(metadata), id()]));
        }
        for name in &self.removed_secrets {
            out.push((sql::DELETE_KEY_SECRET, vec![id(), Param::text(name)]));
        }
        for (name, sealed) in &self.set_secrets {
            let row = vec![id(), Param::text(name), Param::text(sealed)];
            out.push((sql::UPSERT_KEY_SECRET, row));
        }
        if self.reset_usage {
            out.push((sql::RESET_KEY_USAGE, vec![id()]));
        }
        out
    }
}

/// Every statement that rotating key `id`'s value to `sealed_value` runs, inside the caller's
/// transaction. The one place a value changes after creation: whatever is derived from a
/// value must be updated here too.
pub fn key_value_rotation(id: &str, sealed_value: &str, hash: Option<&str>) -> Vec<Statement> {
    vec![(
        sql::SET_KEY_VALUE,
        vec![
            Param::text(sealed_value),
            Param::opt_text(hash.map(str::to_owned)),
            Param::text(id),
        ],
    )]
}

/// Deleting tier `id` (SPEC §8.3 `DELETE /admin/tiers/{name}?force=true`): its features, its
/// keys with their secrets and health, the scopes naming it, then the tier (affected rows of
/// the last statement: 0 when there was no such tier). Audit rows stay.
pub fn tier_deletion(id: &str) -> Vec<Statement> {
    let id = || vec![Param::text(id)];
    vec![
        (sql::DELETE_TIER_FEATURES, id()),
        (sql::DELETE_FEATURE_WINDOWS, id()),
        (sql::DELETE_RATE_WINDOWS_OF_TIER, id()),
        (sql::DELETE_SECRETS_OF_TIER, id()),
        (sql::DELETE_HEALTH_OF_TIER, id()),
        (sql::DELETE_TIER_COOLDOWN, id()),
        (regbot::DELETE_TIER_SOURCE, id()),
        (sql::DELETE_KEYS_OF_TIER, id()),
        (sql::DELETE_SCOPES_OF_TIER, id()),
        (sql::DELETE_TIER_UPSTREAM, id()),
        (sql::DELETE_TIER, id()),
    ]
}

/// Writing tier `tier`'s upstream (SPEC §8.6) as it is now: the old row goes, the new one (if
/// any) comes — run in the same transaction as the tier's other rows.
pub fn upstream_statements(tier: &TierRecord) -> Vec<Statement> {
    let mut out = vec![(sql::DELETE_TIER_UPSTREAM, vec![Param::text(&tier.id)])];
    if let Some(upstream) = &tier.upstream {
        out.push((
            sql::INSERT_TIER_UPSTREAM,
            vec![Param::text(&tier.id), Param::text(upstream.to_stored())],
        ));
    }
    out
}

/// The database, whichever driver runs it.
#[derive(Clone)]
pub enum Db {
    Sqlite(sqlite::SqliteStore),
    Libsql(libsql::LibsqlStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Db::Sqlite($store) => $call,
            Db::Libsql($store) => $call,
        }
    };
}

impl Db {
    /// Opens the configured database and brings its schema up to date.
    pub async fn open(config: &Config) -> Result<Db, StoreError> {
        match &config.database {
            DatabaseConfig::Local { path } => {
                Ok(Db::Sqlite(sqlite::SqliteStore::open(path, config).await?))
            }
            DatabaseConfig::Remote { url, auth_token } => Ok(Db::Libsql(
                libsql::LibsqlStore::open(url, auth_token.as_ref(), config).await?,
            )),
        }
    }

    pub async fn load_snapshot(&self) -> Result<Snapshot, StoreError> {
        dispatch!(self, s => s.load_snapshot().await)
    }

    pub async fn create_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_tier(tier).await)
    }

    /// Replaces a tier's name, description and feature set in one transaction.
    pub async fn update_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.update_tier(tier).await)
    }

    pub async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_key(key, None).await)
    }

    /// Creates a key with the keyed hash of its value (`Sealer::value_hash`), in one transaction.
    pub async fn create_key_hashed(
        &self,
        key: &KeyRecord,
        value_hash: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_key(key, Some(value_hash)).await)
    }

    /// Rows of a read-only statement, each cell as text (NULL as `None`).
    async fn select(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        dispatch!(self, s => s.select(sql, params).await)
    }

    /// Runs `statements` in one transaction. `expect[i]`, when given, is the number of rows
    /// statement `i` must change; any other count rolls it all back with `Conflict`. `rows`:
    /// how many rows it writes — remotely the time bound grows by one `DB_BUSY_TIMEOUT_MS` per
    /// `BULK_ROWS_PER_BOUND` of them.
    async fn write_all(
        &self,
        statements: &[(&str, Vec<Param>)],
        expect: &[Option<u64>],
        rows: usize,
    ) -> Result<Vec<u64>, StoreError> {
        let scale = u32::try_from(1 + rows / BULK_ROWS_PER_BOUND).unwrap_or(u32::MAX);
        dispatch!(self, s => s.write_all(statements, expect, scale).await)
    }

    /// Every key's id with its stored value hash.
    pub async fn key_value_hashes(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let rows = self.select(sql::KEY_VALUE_HASHES, &[]).await?;
        Ok(rows
            .into_iter()
            .map(|mut r| {
                let hash = r.pop().flatten();
                (r.pop().flatten().unwrap_or_default(), hash)
            })
            .collect())
    }

    /// Sets `(key id, value hash)` pairs in one transaction (a key deleted meanwhile is skipped).
    /// For a key whose value changes (rotation), write its hash with the new value instead.
    pub async fn set_value_hashes(&self, hashes: &[(String, String)]) -> Result<(), StoreError> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.write_all(
            &[(sql::SET_VALUE_HASHES, vec![Param::Text(json(hashes))])],
            &[None],
            hashes.len(),
        )
        .await
        .map(|_| ())
    }

    /// Which of `hashes` a key of tier `tier_id` already has: hash → that key's id.
    pub async fn existing_hashes(
        &self,
        tier_id: &str,
        hashes: &[String],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let list = json(hashes);
        let rows = self
            .select(
                sql::HASHES_IN_TIER,
                &[Param::Text(tier_id.to_string()), Param::Text(list)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|mut r| {
                let id = r.pop().flatten()?;
                Some((r.pop().flatten()?, id))
            })
            .collect())
    }

    /// Inserts keys (each with its value hash) and their secrets in one transaction. A key whose
    /// hash its tier already holds is not inserted, and then nothing is (`Conflict`).
    pub async fn import_keys(&self, keys: &[(KeyRecord, String)]) -> Result<(), StoreError> {
        use crate::timestamp::to_db;
        type Row<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a str,
            Option<String>,
            Option<i64>,
            Option<i64>,
            &'a str,
            Option<String>,
            &'a str,
        );
        let rows: Vec<Row> = keys
            .iter()
            .map(|(k, hash)| {
                (
                    k.id.as_str(),
                    k.name.as_str(),
                    k.sealed_value.as_str(),
                    k.tier_id.as_str(),
                    k.expires_at.map(to_db),
                    k.usage_limit,
                    k.usage_window_seconds,
                    k.metadata_json.as_str(),
                    k.created_at.map(to_db),
                    hash.as_str(),
                )
            })
            .collect();
        let secrets: Vec<(&str, &str, &str)> = keys
            .iter()
            .flat_map(|(k, _)| {
                k.secrets
                    .iter()
                    .map(|(n, v)| (k.id.as_str(), n.as_str(), v.as_str()))
            })
            .collect();
        self.write_all(
            &[
                (sql::IMPORT_KEYS, vec![Param::Text(json(&rows))]),
                (sql::IMPORT_SECRETS, vec![Param::Text(json(&secrets))]),
            ],
            &[Some(keys.len() as u64), Some(secrets.len() as u64)],
            keys.len() + secrets.len(),
        )
        .await
        .map(|_| ())
    }

    /// Rekey: up to `limit` keys after id `after`, by id: (id, stored value, value hash).
    pub async fn keys_page(
        &self,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let rows = self
            .select(
                sql::KEYS_PAGE,
                &[Param::Text(after.to_string()), Param::Int(limit)],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut r = r.into_iter();
                let mut next = || r.next().flatten();
                (
                    next().unwrap_or_default(),
                    next().unwrap_or_default(),
                    next(),
                )
            })
            .collect())
    }

    /// Rekey: up to `limit` secrets after `(key_id, name)`: (key id, name, stored value).
    pub async fn secrets_page(
        &self,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = self
            .select(
                sql::SECRETS_PAGE,
                &[
                    Param::Text(after.0.to_string()),
                    Param::Text(after.1.to_string()),
                    Param::Int(limit),
                ],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut r = r.into_iter();
                let mut next = || r.next().flatten().unwrap_or_default();
                (next(), next(), next())
            })
            .collect())
    }

    /// Rekey: in one transaction, each key `(id, old value, new value, hash)` and each secret
    /// `(key id, name, old value, new value)` takes its new value only where it still holds the
    /// old one (a value rotated meanwhile keeps its rotation). Returns the rows changed: keys
    /// re-sealed, keys whose hash alone changed, secrets re-sealed.
    pub async fn reseal(
        &self,
        keys: &[(String, String, String, String)],
        hash_only: &[(String, String, String, String)],
        secrets: &[(String, String, String, String)],
    ) -> Result<(u64, u64, u64), StoreError> {
        let counts = self
            .write_all(
                &[
                    (sql::RESEAL_KEYS, vec![Param::Text(json(keys))]),
                    (sql::RESEAL_KEYS, vec![Param::Text(json(hash_only))]),
                    (sql::RESEAL_SECRETS, vec![Param::Text(json(secrets))]),
                ],
                &[None, None, None],
                keys.len() + hash_only.len() + secrets.len(),
            )
            .await?;
        Ok((counts[0], counts[1], counts[2]))
    }

    /// Deletes a key and its secrets; `NotFound` if there was no such key.
    pub async fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete_key(id).await)
    }

    pub async fn create_consumer(&self, consumer: &ConsumerRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_consumer(consumer).await)
    }

    /// Deletes a consumer and its scopes; `NotFound` if there was no such consumer.
    pub async fn delete_consumer(&self, id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.delete_consumer(id).await)
    }

    pub async fn grant_scope(&self, consumer_id: &str, tier_id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => s.grant_scope(consumer_id, tier_id).await)
    }

    /// Runs `statements` in one transaction (SPEC §8.3's admin changes). `NotFound` (and
    /// nothing written) when a statement listed in `must_affect` changed no row.
    pub async fn write(
        &self,
        statements: &[Statement],
        must_affect: &[usize],
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.write(statements, must_affect).await)
    }

    /// Changes a stored key in one transaction; `NotFound` if there is no such key.
    pub async fn update_key(&self, update: &KeyUpdate) -> Result<(), StoreError> {
        self.write(&update.statements(), &[0]).await
    }

    /// One tier with its features as the database holds it now (after a write of unknown
    /// outcome; see `read_by_id`).
    pub async fn read_tier(&self, id: &str) -> Result<Option<TierRecord>, StoreError> {
        let found = dispatch!(self, s => s.read_by_id(&SnapshotRows::TIER_READS, id).await)?;
        Ok(found.tiers.into_iter().next())
    }

    /// One key with its secrets as the database holds it now.
    pub async fn read_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let found = dispatch!(self, s => s.read_by_id(&SnapshotRows::KEY_READS, id).await)?;
        Ok(found.keys.into_iter().next())
    }

    /// One consumer with its scopes as the database holds it now.
    pub async fn read_consumer(&self, id: &str) -> Result<Option<ConsumerRecord>, StoreError> {
        let found = dispatch!(self, s => s.read_by_id(&SnapshotRows::CONSUMER_READS, id).await)?;
        Ok(found.consumers.into_iter().next())
    }

    /// The newest `limit` audit rows, newest first.
    pub async fn recent_usage(&self, limit: i64) -> Result<Vec<UsageEvent>, StoreError> {
        dispatch!(self, s => s.recent_usage(limit).await)
    }

    /// One page of audit rows matching `filter`, newest (highest rowid) first, each with its
    /// rowid (the paging cursor).
    pub async fn usage_page(
        &self,
        filter: &UsageFilter,
    ) -> Result<Vec<(i64, UsageEvent)>, StoreError> {
        if sql::side_index(filter).is_none() {
            let (text, params) = sql::usage_scan(filter);
            return dispatch!(self, s => s.usage_page(&text, &params).await);
        }
        // The side index's end first: rows above it come from the table, entries at or
        // below it from the side index (a fill meanwhile only adds entries above it).
        let through = self.read_int(sql::INDEXED_THROUGH).await?;
        let (text, params) = sql::usage_tail(filter, through);
        let mut page = dispatch!(self, s => s.usage_page(&text, &params).await)?;
        let first = self.read_int(sql::FIRST_ROWID).await?;
        let newest = filter
            .before
            .map_or(through, |before| through.min(before.saturating_sub(1)));
        // Buckets newest first, in chunks of 1, 2, 4, … 256 (one query each): a key served
        // often fills a page from its newest bucket, a rare one is found in few queries.
        let (floor, mut top) = (
            first.max(0) >> sql::BUCKET_SHIFT,
            newest >> sql::BUCKET_SHIFT,
        );
        let mut width = 1;
        while (page.len() as i64) < filter.limit && newest > 0 && top >= floor {
            let low = floor.max(top - width + 1);
            let buckets: Vec<i64> = (low..=top).rev().collect();
            let want = filter.limit - page.len() as i64;
            let Some((text, params)) = sql::usage_walk(filter, through, &buckets, want) else {
                break;
            };
            page.extend(dispatch!(self, s => s.usage_page(&text, &params).await)?);
            top = low - 1;
            width = (width * 2).min(256);
        }
        Ok(page)
    }

    /// A statement's first column as a whole number (0 when absent or not a number).
    async fn read_int(&self, text: &str) -> Result<i64, StoreError> {
        Ok(dispatch!(self, s => s.read_text(text, &[]).await)?
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0))
    }

    /// Serves per group over whole UTC days `from..=to` (unbounded where `None`): the rollup
    /// for days rolled up, raw rows for the rest, read in one statement (one snapshot).
    pub async fn usage_summary(
        &self,
        group: SummaryGroup,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
    ) -> Result<Vec<SummaryRow>, StoreError> {
        let text = sql::summary(group);
        let params = [
            Param::Text(from.map_or_else(|| sql::FIRST_DAY.into(), day_text)),
            Param::Text(to.map_or_else(|| sql::LAST_DAY.into(), day_text)),
        ];
        dispatch!(self, s => s.usage_summary(&text, &params).await)
    }

    /// The last day the rollup covers (every earlier day too); `None` before the first rollup.
    pub async fn rollup_through(&self) -> Result<Option<chrono::NaiveDate>, StoreError> {
        let day = dispatch!(self, s => s.read_text(sql::ROLLUP_THROUGH, &[]).await)?;
        Ok(day.as_deref().and_then(parse_day))
    }

    /// The UTC day of the oldest audit row with a readable time, if any.
    pub async fn first_usage_day(&self) -> Result<Option<chrono::NaiveDate>, StoreError> {
        let day = dispatch!(self, s => s.read_text(sql::FIRST_USAGE_DAY, &[]).await)?;
        Ok(day.as_deref().and_then(parse_day))
    }

    /// The next UTC day on or after `day` that holds audit rows, if any.
    pub async fn next_usage_day(
        &self,
        day: chrono::NaiveDate,
    ) -> Result<Option<chrono::NaiveDate>, StoreError> {
        let params = [Param::Text(day_text(day))];
        let found = dispatch!(self, s => s.read_text(sql::NEXT_USAGE_DAY, &params).await)?;
        Ok(found.as_deref().and_then(parse_day))
    }

    /// Rolls `day` up: counts its raw rows (a read, no write lock held), then replaces the
    /// day's rollup rows and moves the rollup's end to `day` in one short write. Returns the
    /// number of rollup rows written. Call only for a day no serve or report can change.
    pub async fn roll_up_day(&self, day: chrono::NaiveDate) -> Result<usize, StoreError> {
        let bounds = [
            Param::Text(day_text(day)),
            Param::Text(day_text(day + chrono::Days::new(1))),
        ];
        let rows = dispatch!(self, s => s.rollup_rows(&bounds).await)?;
        let count = rows.len();
        let write = [
            Param::Text(day_text(day)),
            Param::Text(day_text(day)),
            Param::Text(json(&rows)),
            Param::Text(day_text(day)),
        ];
        dispatch!(self, s => s.write_rollup(&write).await)?;
        Ok(count)
    }

    /// Deletes up to `limit` audit rows from days before `before`, with their side-index
    /// entries: the rows are picked by a read, then deleted in one short write (on the group
    /// commit's own connection locally, so `/key` waits at most for one batch); returns how many.
    pub async fn prune_usage(
        &self,
        before: chrono::NaiveDate,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let params = [Param::Text(day_text(before)), Param::Int(limit)];
        let rows = dispatch!(self, s => s.prune_candidates(&params).await)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let count = rows.len() as u64;
        let rows = json(&rows);
        dispatch!(self, s => s.prune_rows(&rows).await)?;
        Ok(count)
    }

    /// Fills the side indexes with the next `batch` audit rows past their end (gaps in the
    /// rowids, e.g. pruned or Go-era rows, are skipped, not walked); returns how many rows it
    /// covered (0: nothing new). Rows up to the newest committed rowid are final.
    pub async fn index_usage(&self, batch: i64) -> Result<i64, StoreError> {
        let from = self.read_int(sql::INDEXED_THROUGH).await?;
        let params = [Param::Int(from), Param::Int(batch)];
        let found = dispatch!(self, s => s.read_text(sql::NEXT_FILL, &params).await)?;
        let (count, upto) = found
            .as_deref()
            .and_then(|v| v.split_once(' '))
            .and_then(|(n, last)| Some((n.parse::<i64>().ok()?, last.parse::<i64>().ok()?)))
            .unwrap_or((0, from));
        if count == 0 || upto <= from {
            return Ok(0);
        }
        let params = [
            Param::Int(from),
            Param::Int(upto),
            Param::Int(from),
            Param::Int(upto),
            Param::Int(upto),
        ];
        dispatch!(self, s => s.write_index(&params).await)?;
        Ok(count)
    }

    /// How many group commits may be in flight at once (SPEC §8.7 remote latency): one on
    /// SQLite (one writer; commits in order), several remotely, where each is one request and
    /// their deltas commute.
    pub fn commits_in_flight(&self) -> usize {
        match self {
            Db::Sqlite(_) => 1,
            Db::Libsql(s) => s.commits_in_flight(),
        }
    }

    /// Commits a batch in one transaction: serves' audit rows and their keys' counters,
    /// reported outcomes (each only onto a serve without one) and key health changes (with
    /// each key's `is_active`). Safe to retry: audit ids are unique and ignored when already
    /// present, counters and health are absolute, an outcome never overwrites one.
    pub async fn commit_batch(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
        dispatch!(self, s => s.commit_batch(batch).await)
    }

    /// Commits serves only (a batch without outcomes or health).
    pub async fn commit_serves(
        &self,
        events: &[UsageEvent],
        usage: &[UsageDelta],
    ) -> Result<(), StoreError> {
        self.commit_batch(&Batch {
            events,
            usage,
            ..Batch::default()
        })
        .await
    }

    /// The budget counters of `key_ids` (stored and RegBot keys) and every rate window of
    /// those keys, as the database holds them now: what a refused commit re-decides against.
    pub async fn read_counters(
        &self,
        key_ids: &[&str],
    ) -> Result<(Vec<StoredCounter>, Vec<RateWindowWrite>), StoreError> {
        let ids = Param::Text(json(key_ids));
        let rows = self
            .select(sql::SELECT_COUNTERS, &[ids.clone(), ids.clone()])
            .await?;
        let cell = |r: &[Option<String>], i: usize| r.get(i).cloned().flatten();
        let int = |r: &[Option<String>], i: usize| cell(r, i).and_then(|v| v.parse::<i64>().ok());
        let counters = rows
            .iter()
            .map(|r| {
                let key_id = cell(r, 0).unwrap_or_default();
                StoredCounter {
                    count: int(r, 1).unwrap_or(0),
                    window_start: parse_stored_time(cell(r, 2), "usage_window_start", &key_id),
                    budget: (int(r, 5) == Some(0)).then(|| (int(r, 3), int(r, 4))),
                    key_id,
                }
            })
            .collect();
        let rows = self.select(sql::SELECT_WINDOWS_OF, &[ids]).await?;
        let windows = rows
            .iter()
            .filter_map(|r| {
                let key_id = cell(r, 0).unwrap_or_default();
                let start = parse_stored_time(cell(r, 3), "window_counts.window_start", &key_id)?;
                Some(RateWindowWrite {
                    feature: cell(r, 1).unwrap_or_default(),
                    window_seconds: int(r, 2).unwrap_or(0),
                    start,
                    count: int(r, 4).unwrap_or(0),
                    key_id,
                })
            })
            .collect();
        Ok((counters, windows))
    }

    /// One serve's audit row with its outcome, as the database holds it now. `settled`: after
    /// a commit of unknown outcome, wait until no transaction can still land (remote).
    pub async fn read_serve(
        &self,
        id: &str,
        settled: bool,
    ) -> Result<Option<UsageEvent>, StoreError> {
        dispatch!(self, s => s.read_serve(id, settled).await)
    }

    /// The audit rows of `ids` that exist (any order): one query for many outcome reports
    /// whose serves are no longer in the ledger's memory (`ledger::lookup` batches them).
    pub async fn read_serves(&self, ids: &[String]) -> Result<Vec<UsageEvent>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Serialising strings cannot fail.
        let ids = json(ids);
        dispatch!(self, s => s.read_serves(&ids).await)
    }

    /// A key's `is_active` and stored health as the database holds them now; `None` for no key.
    pub async fn read_key_health(
        &self,
        id: &str,
    ) -> Result<Option<(bool, Option<HealthRecord>)>, StoreError> {
        dispatch!(self, s => s.read_key_health(id).await)
    }

    /// A trivial read of the database (readiness probe; the caller bounds how long it waits).
    /// SQLite: on the admin read pool, never the group commit's connection; libSQL: one
    /// statement, bounded by `DB_BUSY_TIMEOUT_MS` like every remote operation.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    /// Waits for pending writes to reach the file (WAL checkpoint) before exit.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }
}

/// The message migration 012's triggers raise when a delta does not fit (SPEC §8.7).
pub const REFUSED: &str = "keypooler_refused";

/// Rows a remote bulk write (import) may take per `DB_BUSY_TIMEOUT_MS` of its time bound.
pub const BULK_ROWS_PER_BOUND: usize = 1000;

/// A batch as the JSON array its statement reads with `json_each`.
fn json<T: serde::Serialize + ?Sized>(batch: &T) -> String {
    // Strings, integers and null cannot fail to serialise.
    serde_json::to_string(batch).unwrap_or_else(|_| "[]".into())
}

/// Filters and cursor of one `GET /admin/usage` page.
#[derive(Default, Debug, Clone)]
pub struct UsageFilter {
    pub key_id: Option<String>,
    pub consumer_id: Option<String>,
    pub feature: Option<String>,
    pub since: Option<crate::timestamp::Timestamp>,
    pub until: Option<crate::timestamp::Timestamp>,
    /// Only rows with a lower rowid (the previous page's last row).
    pub before: Option<i64>,
    pub limit: i64,
}

/// What a usage summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SummaryGroup {
    Key,
    Consumer,
    Feature,
    Day,
}

/// One group of a usage summary: serves and, per class of `OUTCOME_CLASSES`, reported outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    pub group: String,
    pub served: i64,
    pub outcomes: [i64; 7],
}

/// The outcome classes a rollup row counts, in column order (SPEC §8.2).
pub const OUTCOME_CLASSES: [&str; 7] = [
    "ok",
    "client_error",
    "auth_invalid",
    "quota_exhausted",
    "rate_limited",
    "upstream_error",
    "network",
];

/// A UTC day as stored in the rollup.
pub fn day_text(day: chrono::NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

fn parse_day(s: &str) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").ok()
}

/// A summary row from `sql::summary` (group, served, then the seven class counts).
pub fn summary_row(r: &dyn Cells) -> SummaryRow {
    let mut outcomes = [0; 7];
    for (i, n) in outcomes.iter_mut().enumerate() {
        *n = r.int(2 + i).unwrap_or(0);
    }
    SummaryRow {
        group: r.text(0).unwrap_or_default(),
        served: r.int(1).unwrap_or(0),
        outcomes,
    }
}

/// A rollup row from `sql::ROLLUP_READ` as the JSON array `sql::WRITE_ROLLUP` takes.
pub fn rollup_row(r: &dyn Cells) -> serde_json::Value {
    let mut row = vec![
        serde_json::Value::from(r.text(0).unwrap_or_default()),
        serde_json::Value::from(r.text(1).unwrap_or_default()),
        serde_json::Value::from(r.text(2).unwrap_or_default()),
    ];
    row.extend((3..11).map(|i| serde_json::Value::from(r.int(i).unwrap_or(0))));
    serde_json::Value::Array(row)
}

/// A row of `sql::PRUNE_CANDIDATES`: the rowid `sql::PRUNE_ROWS` takes.
pub fn prune_candidate(r: &dyn Cells) -> serde_json::Value {
    serde_json::json!(r.int(0))
}

/// What one group commit writes.
#[derive(Default)]
pub struct Batch<'a> {
    pub events: &'a [UsageEvent],
    /// Budget units per key and budget window, applied by the database only if they fit
    /// (SPEC §8.7).
    pub usage: &'a [UsageDelta],
    pub outcomes: &'a [OutcomeWrite],
    pub health: &'a [HealthWrite],
    pub tiers: &'a [TierCooldownWrite],
    /// Serves per rate window, applied by the database only if they fit (SPEC §8.4, §8.7).
    pub windows: &'a [WindowDelta],
}

impl Batch<'_> {
    /// Whether the batch carries outcomes or health (the longer statement list).
    pub fn has_health(&self) -> bool {
        !self.outcomes.is_empty() || !self.health.is_empty() || !self.tiers.is_empty()
    }
}

/// `units` budget units served on `key_id` in the budget window the database should count
/// them in: the one open at `at` (for a windowed budget, the window's start as the process
/// saw it). Applied by migration 012's `usage_deltas` trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: String,
    pub units: i64,
    pub at: crate::timestamp::Timestamp,
    /// A RegBot key's limit as this process computes it (SPEC §8.5); `None` for stored keys,
    /// which the database checks against its own `usage_limit`.
    pub regbot_limit: Option<i64>,
}

/// `units` serves in the `window_seconds` rate window of (`key_id`, `feature`) open at `at`
/// (the window's start as the process saw it), against `rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowDelta {
    pub key_id: String,
    pub feature: String,
    pub window_seconds: i64,
    pub at: crate::timestamp::Timestamp,
    pub units: i64,
    pub rate_limit: i64,
}

/// A key's budget counter as the database holds it (after a refused commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCounter {
    pub key_id: String,
    pub count: i64,
    pub window_start: Option<crate::timestamp::Timestamp>,
    /// The stored key's budget; `None` for a RegBot key (its limit is the process's).
    pub budget: Option<(Option<i64>, Option<i64>)>,
}

/// SQL shared by both drivers. Placeholders are `?`; values are always bound, never spliced.
pub mod sql {
    use super::{json, Param};

    pub const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
        version INTEGER PRIMARY KEY, name TEXT, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)";
    pub const APPLIED_VERSIONS: &str = "SELECT version FROM schema_migrations";
    /// Readiness: reads the database itself (a bare `SELECT 1` would not touch the file).
    pub const PING: &str = "SELECT 1 FROM schema_migrations LIMIT 1";
    /// Runs first in a migration's transaction: a plain INSERT, so a replica that lost the race
    /// to apply the same migration fails on the primary key before running its body twice.
    pub const RECORD_MIGRATION: &str =
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)";

    /// The snapshot queries, and each as one row by id (`…_OF`: the children of one parent),
    /// so one entity reads back with the same columns and decoding as the whole pool.
    macro_rules! select {
        (tiers) => { "SELECT id, name, description FROM tiers" };
        // A feature's first window is the Go row (position 0), the rest `feature_windows`.
        (tier_features) => {
            "SELECT tier_id, feature, rate_limit, window_seconds, position FROM \
            (SELECT tier_id, feature, rate_limit, window_seconds, 0 AS position FROM tier_features \
            UNION ALL SELECT tier_id, feature, rate_limit, window_seconds, position FROM feature_windows)"
        };
        (keys) => {
            "SELECT id, name, key_value, tier_id, is_active, \
            CAST(expires_at AS TEXT), usage_limit, usage_count, usage_window_seconds, \
            CAST(usage_window_start AS TEXT), metadata_json, CAST(created_at AS TEXT) FROM keys"
        };
        (key_secrets) => { "SELECT key_id, name, value FROM key_secrets" };
        (consumers) => {
            "SELECT id, name, token_hash, description, is_active, previous_token_hash, \
            CAST(previous_token_expires_at AS TEXT) FROM consumers"
        };
        (consumer_scopes) => { "SELECT consumer_id, tier_id FROM consumer_scopes" };
    }
    pub const SELECT_TIERS: &str = select!(tiers);
    pub const SELECT_TIER_FEATURES: &str = select!(tier_features);
    pub const SELECT_KEYS: &str = select!(keys);
    pub const SELECT_KEY_SECRETS: &str = select!(key_secrets);
    pub const SELECT_CONSUMERS: &str = select!(consumers);
    pub const SELECT_SCOPES: &str = select!(consumer_scopes);
    pub const SELECT_TIER: &str = concat!(select!(tiers), " WHERE id = ?");
    pub const SELECT_FEATURES_OF: &str = concat!(select!(tier_features), " WHERE tier_id = ?");
    pub const SELECT_KEY: &str = concat!(select!(keys), " WHERE id = ?");
    pub const SELECT_SECRETS_OF: &str = concat!(select!(key_secrets), " WHERE key_id = ?");
    pub const SELECT_CONSUMER: &str = concat!(select!(consumers), " WHERE id = ?");
    pub const SELECT_SCOPES_OF: &str = concat!(select!(consumer_scopes), " WHERE consumer_id = ?");

    pub const INSERT_TIER: &str =
        "INSERT INTO tiers (id, name, description, created_at) VALUES (?, ?, ?, ?)";
    pub const UPDATE_TIER: &str = "UPDATE tiers SET name = ?, description = ? WHERE id = ?";
    pub const DELETE_TIER_FEATURES: &str = "DELETE FROM tier_features WHERE tier_id = ?";
    pub const INSERT_TIER_FEATURE: &str =
        "INSERT INTO tier_features (tier_id, feature, rate_limit, window_seconds) VALUES (?, ?, ?, ?)";
    /// A feature's windows after its first (SPEC §8.4).
    pub const DELETE_FEATURE_WINDOWS: &str = "DELETE FROM feature_windows WHERE tier_id = ?";
    pub const INSERT_FEATURE_WINDOW: &str = "INSERT INTO feature_windows \
        (tier_id, feature, rate_limit, window_seconds, position) VALUES (?, ?, ?, ?, ?)";
    pub const DELETE_RATE_WINDOWS_OF_TIER: &str =
        "DELETE FROM window_counts WHERE key_id IN (SELECT id FROM keys WHERE tier_id = ?)";
    /// Rate-window deltas from one bound JSON array `[[key_id, feature, window_seconds, at,
    /// units, rate_limit], …]`, applied in order by migration 012's trigger (which refuses
    /// one that does not fit, aborting the commit).
    pub const INSERT_WINDOW_DELTAS: &str = "INSERT INTO window_deltas (key_id, feature, \
        window_seconds, at, units, rate_limit) SELECT value ->> 0, value ->> 1, value ->> 2, \
        value ->> 3, value ->> 4, value ->> 5 FROM json_each(?)";
    /// Every rate window of the keys in one JSON array.
    pub const SELECT_WINDOWS_OF: &str = "SELECT key_id, feature, window_seconds, \
        CAST(window_start AS TEXT), count FROM window_counts \
        WHERE key_id IN (SELECT value FROM json_each(?))";
    /// Budget counters of the keys in one JSON array (bound twice): stored keys with their
    /// budget (last column 0), then RegBot keys (1).
    pub const SELECT_COUNTERS: &str = "SELECT id, usage_count, \
        CAST(usage_window_start AS TEXT), usage_limit, usage_window_seconds, 0 FROM keys \
        WHERE id IN (SELECT value FROM json_each(?)) UNION ALL \
        SELECT key_id, usage_count, NULL, NULL, NULL, 1 FROM regbot_keys \
        WHERE key_id IN (SELECT value FROM json_each(?))";
    pub const SELECT_RATE_WINDOWS: &str = "SELECT key_id, feature, window_seconds, \
        CAST(window_start AS TEXT), count FROM window_counts";

    pub const INSERT_KEY: &str = "INSERT INTO keys (id, name, key_value, tier_id, is_active, expires_at, \
        usage_limit, usage_count, usage_window_seconds, usage_window_start, metadata_json, created_at) \
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    pub const INSERT_KEY_SECRET: &str =
        "INSERT INTO key_secrets (key_id, name, value) VALUES (?, ?, ?)";
    pub const DELETE_KEY: &str = "DELETE FROM keys WHERE id = ?";
    pub const DELETE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = ?";

    pub const INSERT_CONSUMER: &str =
        "INSERT INTO consumers (id, name, token_hash, description, is_active, created_at) \
        VALUES (?, ?, ?, ?, ?, ?)";
    pub const DELETE_CONSUMER: &str = "DELETE FROM consumers WHERE id = ?";
    pub const DELETE_CONSUMER_SCOPES: &str = "DELETE FROM consumer_scopes WHERE consumer_id = ?";
    pub const INSERT_SCOPE: &str =
        "INSERT OR IGNORE INTO consumer_scopes (consumer_id, tier_id) VALUES (?, ?)";

    // SPEC §8.3: changing and removing what exists.
    pub const TOUCH_KEY: &str = "UPDATE keys SET id = id WHERE id = ?";
    pub const SET_KEY_NAME: &str = "UPDATE keys SET name = ? WHERE id = ?";
    pub const SET_KEY_VALUE: &str = "UPDATE keys SET key_value = ?, value_hash = ? WHERE id = ?";
    pub const SET_KEY_TIER: &str = "UPDATE keys SET tier_id = ? WHERE id = ?";
    pub const SET_KEY_EXPIRES_AT: &str = "UPDATE keys SET expires_at = ? WHERE id = ?";
    pub const SET_KEY_USAGE_LIMIT: &str = "UPDATE keys SET usage_limit = ? WHERE id = ?";
    pub const SET_KEY_USAGE_WINDOW: &str = "UPDATE keys SET usage_window_seconds = ? WHERE id = ?";
    pub const OPEN_KEY_USAGE_WINDOW: &str =
        "UPDATE keys SET usage_window_start = COALESCE(usage_window_start, ?) WHERE id = ?";
    pub const SET_KEY_METADATA: &str = "UPDATE keys SET metadata_json = ? WHERE id = ?";
    pub const RESET_KEY_USAGE: &str =
        "UPDATE keys SET usage_count = 0, usage_window_start = NULL WHERE id = ?";
    pub const UPSERT_KEY_SECRET: &str = "INSERT INTO key_secrets (key_id, name, value) \
        VALUES (?, ?, ?) ON CONFLICT (key_id, name) DO UPDATE SET value = excluded.value";
    pub const DELETE_KEY_SECRET: &str = "DELETE FROM key_secrets WHERE key_id = ? AND name = ?";

    pub const DELETE_TIER: &str = "DELETE FROM tiers WHERE id = ?";
    pub const SELECT_TIER_UPSTREAMS: &str = "SELECT tier_id, upstream_json FROM tier_upstreams";
    pub const SELECT_UPSTREAM_OF: &str =
        "SELECT tier_id, upstream_json FROM tier_upstreams WHERE tier_id = ?";
    pub const DELETE_TIER_UPSTREAM: &str = "DELETE FROM tier_upstreams WHERE tier_id = ?";
    pub const INSERT_TIER_UPSTREAM: &str =
        "INSERT INTO tier_upstreams (tier_id, upstream_json) VALUES (?, ?)";
    pub const DELETE_TIER_COOLDOWN: &str = "DELETE FROM tier_health WHERE tier_id = ?";
    pub const DELETE_SECRETS_OF_TIER: &str =
        "DELETE FROM key_secrets WHERE key_id IN (SELECT id FROM keys WHERE tier_id = ?)";
    pub const DELETE_HEALTH_OF_TIER: &str =
        "DELETE FROM key_health WHERE key_id IN (SELECT id FROM keys WHERE tier_id = ?)";
    pub const DELETE_KEYS_OF_TIER: &str = "DELETE FROM keys WHERE tier_id = ?";
    pub const DELETE_SCOPES_OF_TIER: &str = "DELETE FROM consumer_scopes WHERE tier_id = ?";

    pub const UPDATE_CONSUMER: &str =
        "UPDATE consumers SET name = ?, description = ?, is_active = ? WHERE id = ?";
    /// A new token; the old one (or nothing) is kept until the grace ends.
    pub const ROTATE_TOKEN: &str = "UPDATE consumers SET token_hash = ?, \
        previous_token_hash = ?, previous_token_expires_at = ? WHERE id = ?";
    pub const DELETE_SCOPE: &str =
        "DELETE FROM consumer_scopes WHERE consumer_id = ? AND tier_id = ?";
    /// Keyed value hashes (SPEC §8.3 import and rekey; `Sealer::value_hash`).
    pub const KEY_VALUE_HASHES: &str = "SELECT id, value_hash FROM keys";
    /// `[[key_id, hash], …]`.
    pub const SET_VALUE_HASHES: &str = "UPDATE keys SET value_hash = batch.value ->> 1 \
        FROM json_each(?) AS batch WHERE keys.id = batch.value ->> 0";
    pub const SET_VALUE_HASH: &str = "UPDATE keys SET value_hash = ? WHERE id = ?";
    /// (hash, id) of the keys of tier `?` whose hash is in the JSON array `?`.
    pub const HASHES_IN_TIER: &str = "SELECT value_hash, id FROM keys WHERE tier_id = ? \
        AND value_hash IN (SELECT value FROM json_each(?))";
    /// `[[id, name, key_value, tier_id, expires_at, usage_limit, usage_window_seconds,
    /// metadata_json, created_at, value_hash], …]`; a value its tier already holds is skipped
    /// (the caller expects every row inserted, so a skip rolls the import back).
    pub const IMPORT_KEYS: &str = "INSERT INTO keys (id, name, key_value, tier_id, is_active, \
        expires_at, usage_limit, usage_count, usage_window_seconds, usage_window_start, \
        metadata_json, created_at, value_hash) SELECT b.value ->> 0, b.value ->> 1, \
        b.value ->> 2, b.value ->> 3, 1, b.value ->> 4, b.value ->> 5, 0, b.value ->> 6, NULL, \
        b.value ->> 7, b.value ->> 8, b.value ->> 9 FROM json_each(?) AS b WHERE NOT EXISTS \
        (SELECT 1 FROM keys AS k WHERE k.tier_id = b.value ->> 3 AND k.value_hash = b.value ->> 9)";
    /// `[[key_id, name, value], …]`.
    pub const IMPORT_SECRETS: &str = "INSERT INTO key_secrets (key_id, name, value) \
        SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?)";
    pub const KEYS_PAGE: &str =
        "SELECT id, key_value, value_hash FROM keys WHERE id > ? ORDER BY id LIMIT ?";
    pub const SECRETS_PAGE: &str = "SELECT key_id, name, value FROM key_secrets \
        WHERE (key_id, name) > (?, ?) ORDER BY key_id, name LIMIT ?";
    /// `[[id, old value, new value, hash], …]`: only where the old value is still stored.
    pub const RESEAL_KEYS: &str = "UPDATE keys SET key_value = b.value ->> 2, \
        value_hash = b.value ->> 3 FROM json_each(?) AS b WHERE keys.id = b.value ->> 0 \
        AND keys.key_value = b.value ->> 1";
    /// `[[key_id, name, old value, new value], …]`: only where the old value is still stored.
    pub const RESEAL_SECRETS: &str = "UPDATE key_secrets SET value = b.value ->> 3 \
        FROM json_each(?) AS b WHERE key_secrets.key_id = b.value ->> 0 \
        AND key_secrets.name = b.value ->> 1 AND key_secrets.value = b.value ->> 2";

    /// `julianday` orders the mixed forms of a Go database by time but keeps only
    /// milliseconds; within one, the text (same canonical form) orders the microseconds.
    pub const RECENT_USAGE: &str =
        "SELECT id, key_id, consumer_id, feature, CAST(created_at AS TEXT), outcome_class, \
        outcome_status, CAST(outcome_reported_at AS TEXT), cost FROM usage_events ORDER BY julianday(created_at) DESC, created_at DESC, rowid DESC LIMIT ?";

    const USAGE_COLUMNS: &str = "e.id, e.key_id, e.consumer_id, e.feature, \
        CAST(e.created_at AS TEXT), e.outcome_class, e.outcome_status, \
        CAST(e.outcome_reported_at AS TEXT), e.cost, e.rowid";

    /// The filters of `f` on `usage_events AS e` (all but `skip`, a column a side index
    /// already matches), with a cursor on `cursor` (a column holding the rowid).
    fn usage_conditions(
        f: &super::UsageFilter,
        skip: Option<&str>,
        time: &str,
        cursor: &str,
    ) -> (Vec<String>, Vec<Param>) {
        use crate::timestamp::to_db;
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        for (column, value) in [
            ("key_id", &f.key_id),
            ("consumer_id", &f.consumer_id),
            ("feature", &f.feature),
        ] {
            if let Some(v) = value.as_ref().filter(|_| skip != Some(column)) {
                conditions.push(format!("e.{column} = ?"));
                params.push(Param::Text(v.clone()));
            }
        }
        if let Some(t) = f.since {
            conditions.push(format!("{time} >= julianday(?)"));
            params.push(Param::Text(to_db(t)));
        }
        if let Some(t) = f.until {
            conditions.push(format!("{time} <= julianday(?)"));
            params.push(Param::Text(to_db(t)));
        }
        if let Some(rowid) = f.before {
            conditions.push(format!("{cursor} < ?"));
            params.push(Param::Int(rowid));
        }
        (conditions, params)
    }

    fn and(conditions: &[String]) -> String {
        conditions.iter().map(|c| format!(" AND {c}")).collect()
    }

    /// Audit rows per side-index bucket: `bucket = row >> BUCKET_SHIFT` (migration 011; the
    /// fill and prune statements below spell it `>> 12`, a unit test keeps them in step).
    pub const BUCKET_SHIFT: u32 = 12;

    /// The side index a page filtered by key or consumer walks: (table, column, value).
    pub fn side_index(f: &super::UsageFilter) -> Option<(&'static str, &'static str, &str)> {
        match (&f.key_id, &f.consumer_id) {
            (Some(key), _) => Some(("usage_by_key", "key_id", key)),
            (None, Some(consumer)) => Some(("usage_by_consumer", "consumer_id", consumer)),
            (None, None) => None,
        }
    }

    /// One page of `GET /admin/usage` without a key or consumer filter: only the filters
    /// given, newest rowid first. A rowid is never reused for a newer row (new rows get a
    /// rowid above every existing one), so a page that starts below the previous page's last
    /// rowid skips and repeats nothing while rows are inserted.
    pub fn usage_scan(f: &super::UsageFilter) -> (String, Vec<Param>) {
        let (conditions, mut params) =
            usage_conditions(f, None, "julianday(e.created_at)", "e.rowid");
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        params.push(Param::Int(f.limit));
        (
            format!(
                "SELECT {USAGE_COLUMNS} FROM usage_events AS e{filter} \
                ORDER BY e.rowid DESC LIMIT ?"
            ),
            params,
        )
    }

    /// By key or consumer, the part above the side index's end `through`: the unindexed tail
    /// of the table, scanned by rowid (short: the fill runs every 100 ms). Time bounds are
    /// written `+…` here and in `usage_walk` so the planner never trades the walk for a sort
    /// of a time range.
    pub fn usage_tail(f: &super::UsageFilter, through: i64) -> (String, Vec<Param>) {
        let time = "+julianday(e.created_at)";
        let (tail, mut params) = usage_conditions(f, None, time, "e.rowid");
        params.push(Param::Int(through));
        params.push(Param::Int(f.limit));
        (
            format!(
                "SELECT {USAGE_COLUMNS} FROM usage_events AS e \
                WHERE 1{tail} AND e.rowid > ? ORDER BY e.rowid DESC LIMIT ?",
                tail = and(&tail),
            ),
            params,
        )
    }

    /// By key or consumer, up to `want` rows at or below `through` from the side index's
    /// `buckets` (a JSON array, one seek each), newest first. Without other filters the
    /// entries are cut to `want` before the audit rows are read.
    pub fn usage_walk(
        f: &super::UsageFilter,
        through: i64,
        buckets: &[i64],
        want: i64,
    ) -> Option<(String, Vec<Param>)> {
        let (table, column, value) = side_index(f)?;
        let unfiltered = super::UsageFilter {
            before: None,
            ..f.clone()
        };
        let time = "+julianday(e.created_at)";
        let (walked, walked_params) = usage_conditions(&unfiltered, Some(column), time, "x.row");
        let mut params = vec![
            Param::Text(json(buckets)),
            Param::Text(value.to_owned()),
            Param::Int(through),
            Param::Int(f.before.unwrap_or(i64::MAX)),
        ];
        let cut = if walked.is_empty() {
            params.push(Param::Int(want));
            " LIMIT ?"
        } else {
            ""
        };
        params.extend(walked_params);
        params.push(Param::Int(want));
        let text = format!(
            "SELECT {USAGE_COLUMNS} FROM (SELECT row FROM {table} \
            WHERE bucket IN (SELECT value FROM json_each(?)) AND {column} = ? \
            AND row <= ? AND row < ? ORDER BY row DESC{cut}) AS x \
            CROSS JOIN usage_events AS e ON e.rowid = x.row WHERE 1{walked} \
            ORDER BY x.row DESC LIMIT ?",
            walked = and(&walked),
        );
        Some((text, params))
    }

    /// The side indexes' end (a rowid: every audit row up to it is in them).
    pub const INDEXED_THROUGH: &str =
        "SELECT coalesce((SELECT indexed_through FROM usage_index_state WHERE id = 1), 0)";
    /// The next fill: `count last` of the first `?2` rows above rowid `?1`.
    pub const NEXT_FILL: &str = "SELECT count(*) || ' ' || coalesce(max(rowid), 0) FROM \
        (SELECT rowid FROM usage_events WHERE rowid > ? ORDER BY rowid LIMIT ?)";
    /// Fill the side indexes with rows `?1 < rowid <= ?2` (bound twice each, in this order)
    /// and move their end to `?2`.
    pub const INDEX_BY_KEY: &str = "INSERT OR IGNORE INTO usage_by_key (bucket, key_id, row) \
        SELECT rowid >> 12, key_id, rowid FROM usage_events WHERE rowid > ? AND rowid <= ?";
    pub const INDEX_BY_CONSUMER: &str = "INSERT OR IGNORE INTO usage_by_consumer \
        (bucket, consumer_id, row) SELECT rowid >> 12, consumer_id, rowid FROM usage_events \
        WHERE rowid > ? AND rowid <= ?";
    /// The oldest audit row's rowid (0 when empty): where a walk of the side indexes ends.
    pub const FIRST_ROWID: &str = "SELECT coalesce(min(rowid), 0) FROM usage_events";
    pub const SET_INDEXED_THROUGH: &str = "INSERT INTO usage_index_state (id, indexed_through) \
        VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET indexed_through = excluded.indexed_through";

    /// Bounds of an unbounded summary.
    pub const FIRST_DAY: &str = "0000-01-01";
    pub const LAST_DAY: &str = "9999-12-30";

    /// Counts over days `?1..=?2` (`YYYY-MM-DD`): rollup rows for days up to the rollup's end,
    /// raw rows (by their UTC day) after it, in one statement so both halves see one snapshot.
    pub fn summary(group: super::SummaryGroup) -> String {
        use super::SummaryGroup::*;
        let (rolled, raw) = match group {
            Key => ("key_id", "key_id"),
            Consumer => ("consumer_id", "consumer_id"),
            Feature => ("feature", "feature"),
            Day => ("day", "date(created_at)"),
        };
        let classes = super::OUTCOME_CLASSES;
        let rolled_classes: Vec<String> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} AS c{i}"))
            .collect();
        let raw_classes: Vec<String> = classes
            .iter()
            .map(|c| format!("outcome_class IS '{c}'"))
            .collect();
        let sums: Vec<String> = (0..classes.len()).map(|i| format!("sum(c{i})")).collect();
        format!(
            "WITH bounds AS (SELECT ?1 AS first, ?2 AS last, \
            (SELECT through_day FROM usage_rollup_state WHERE id = 1) AS rolled) \
            SELECT g, sum(n), {sums} FROM (\
            SELECT {rolled} AS g, served AS n, {rolled_classes} FROM usage_rollup, bounds \
            WHERE day >= bounds.first AND day <= bounds.last AND day <= bounds.rolled \
            UNION ALL \
            SELECT {raw} AS g, 1 AS n, {raw_classes} FROM usage_events \
            WHERE julianday(created_at) >= (SELECT max(julianday(first), \
            coalesce(julianday(rolled) + 1, 0)) FROM bounds) \
            AND julianday(created_at) < (SELECT julianday(last) + 1 FROM bounds)\
            ) GROUP BY g ORDER BY g",
            sums = sums.join(", "),
            rolled_classes = rolled_classes.join(", "),
            raw_classes = raw_classes.join(", "),
        )
    }

    pub const ROLLUP_THROUGH: &str = "SELECT through_day FROM usage_rollup_state WHERE id = 1";
    pub const FIRST_USAGE_DAY: &str = "SELECT date(min(julianday(created_at))) FROM usage_events";
    pub const NEXT_USAGE_DAY: &str = "SELECT date(min(julianday(created_at))) FROM usage_events \
        WHERE julianday(created_at) >= julianday(?)";
    /// One day's rollup rows, from raw rows with `?1 <= time < ?2`.
    pub const ROLLUP_READ: &str = "SELECT key_id, consumer_id, feature, count(*), \
        sum(outcome_class IS 'ok'), sum(outcome_class IS 'client_error'), \
        sum(outcome_class IS 'auth_invalid'), sum(outcome_class IS 'quota_exhausted'), \
        sum(outcome_class IS 'rate_limited'), sum(outcome_class IS 'upstream_error'), \
        sum(outcome_class IS 'network') FROM usage_events \
        WHERE julianday(created_at) >= julianday(?) AND julianday(created_at) < julianday(?) \
        GROUP BY key_id, consumer_id, feature";
    /// A day's rollup (day, day, JSON rows as `rollup_row` builds them, day): replaces the
    /// day's rows and moves the rollup's end to it.
    pub const DELETE_ROLLUP_DAY: &str = "DELETE FROM usage_rollup WHERE day = ?";
    pub const INSERT_ROLLUP: &str = "INSERT INTO usage_rollup (day, key_id, consumer_id, \
        feature, served, ok, client_error, auth_invalid, quota_exhausted, rate_limited, \
        upstream_error, network) SELECT ?, value ->> 0, value ->> 1, value ->> 2, \
        value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8, \
        value ->> 9, value ->> 10 FROM json_each(?)";
    pub const SET_ROLLUP_THROUGH: &str = "INSERT INTO usage_rollup_state (id, through_day) \
        VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET through_day = excluded.through_day";
    /// The rowids of up to `?2` raw rows of days before `?1`.
    /// The newest row is never pruned: SQLite gives a new row the highest rowid plus one, so
    /// keeping it means no rowid is ever reused (cursors and `indexed_through` rely on that).
    pub const PRUNE_CANDIDATES: &str = "SELECT rowid FROM usage_events \
        WHERE julianday(created_at) < julianday(?) \
        AND rowid < (SELECT max(rowid) FROM usage_events) LIMIT ?";
    /// Deletes the rows of one JSON array of rowids and their side-index entries (each
    /// statement binds the same array).
    /// (Run before `PRUNE_ROWS`: an entry is found by its audit row's key or consumer.)
    pub const PRUNE_BY_KEY: &str = "DELETE FROM usage_by_key WHERE (bucket, key_id, row) IN \
        (SELECT e.rowid >> 12, e.key_id, e.rowid FROM usage_events AS e \
        WHERE e.rowid IN (SELECT value FROM json_each(?)))";
    pub const PRUNE_BY_CONSUMER: &str = "DELETE FROM usage_by_consumer \
        WHERE (bucket, consumer_id, row) IN (SELECT e.rowid >> 12, e.consumer_id, e.rowid \
        FROM usage_events AS e WHERE e.rowid IN (SELECT value FROM json_each(?)))";
    pub const PRUNE_ROWS: &str =
        "DELETE FROM usage_events WHERE rowid IN (SELECT value FROM json_each(?))";

    /// A batch's audit rows from one bound JSON array `[[id, key_id, consumer_id, feature,
    /// created_at, cost], …]`: constant SQL (prepared once), one parameter whatever the batch
    /// size, rows inserted in array order. A plain INSERT: a batch sent twice (a late copy of
    /// one whose answer was lost) fails on its first audit id and rolls back whole, so its
    /// deltas can never count twice.
    pub const INSERT_EVENTS: &str =
        "INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at, cost) \
        SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 \
        FROM json_each(?)";
    /// Reported outcomes from one bound JSON array `[[serve_id, class, status, reported_at], …]`;
    /// a serve that has an outcome keeps it (the first report wins, across processes too).
    pub const SET_OUTCOMES: &str = "UPDATE usage_events SET outcome_class = batch.value ->> 1, \
        outcome_status = batch.value ->> 2, outcome_reported_at = batch.value ->> 3 \
        FROM json_each(?) AS batch WHERE usage_events.id = batch.value ->> 0 \
        AND usage_events.outcome_class IS NULL";
    /// One report of `SET_OUTCOMES`, its values bound: serve id, class, status, reported at.
    pub const SET_OUTCOME: &str = "UPDATE usage_events SET outcome_class = ?2, \
        outcome_status = ?3, outcome_reported_at = ?4 WHERE id = ?1 AND outcome_class IS NULL";
    /// Health records from one bound JSON array `[[key_id, state, reason, until, last_status,
    /// strikes, changed_at, rate_step, rate_rested_from, breaker_step, breaker_rested_from,
    /// auth_serve_id, auth_at], …]`, in array order (the last of a key wins).
    pub const UPSERT_HEALTH: &str = "INSERT INTO key_health (key_id, state, reason, until, \
        last_status, strikes, changed_at, rate_step, rate_rested_from, breaker_step, \
        breaker_rested_from, auth_serve_id, auth_at) SELECT value ->> 0, value ->> 1, \
        value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7, \
        value ->> 8, value ->> 9, value ->> 10, value ->> 11, value ->> 12 FROM json_each(?) \
        WHERE true ON CONFLICT (key_id) DO UPDATE SET state = excluded.state, \
        reason = excluded.reason, until = excluded.until, last_status = excluded.last_status, \
        strikes = excluded.strikes, changed_at = excluded.changed_at, \
        rate_step = excluded.rate_step, rate_rested_from = excluded.rate_rested_from, \
        breaker_step = excluded.breaker_step, breaker_rested_from = excluded.breaker_rested_from, \
        auth_serve_id = excluded.auth_serve_id, auth_at = excluded.auth_at";
    /// Throttled tiers' cooldowns from one bound JSON array `[[tier_id, cooled_until], …]`.
    pub const UPSERT_TIER_HEALTH: &str = "INSERT INTO tier_health (tier_id, cooled_until) \
        SELECT value ->> 0, value ->> 1 FROM json_each(?) WHERE true \
        ON CONFLICT (tier_id) DO UPDATE SET cooled_until = excluded.cooled_until";
    pub const SELECT_TIER_HEALTH: &str =
        "SELECT tier_id, CAST(cooled_until AS TEXT) FROM tier_health";
    /// `is_active` follows the health (bound to the same array as `UPSERT_HEALTH`): only an
    /// operator's `disabled` makes a key inactive, which a Go-era reader understands too.
    pub const SET_ACTIVE: &str = "UPDATE keys SET is_active = (batch.value ->> 1 != 'disabled') \
        FROM json_each(?) AS batch WHERE keys.id = batch.value ->> 0";
    pub const SELECT_HEALTH: &str = "SELECT key_id, state, reason, CAST(until AS TEXT), \
        last_status, strikes, CAST(changed_at AS TEXT), rate_step, \
        CAST(rate_rested_from AS TEXT), breaker_step, CAST(breaker_rested_from AS TEXT), \
        auth_serve_id, CAST(auth_at AS TEXT) FROM key_health";
    pub const SELECT_KEY_HEALTH: &str = "SELECT keys.is_active, key_health.state, \
        key_health.reason, CAST(key_health.until AS TEXT), key_health.last_status, \
        key_health.strikes, CAST(key_health.changed_at AS TEXT), key_health.rate_step, \
        CAST(key_health.rate_rested_from AS TEXT), key_health.breaker_step, \
        CAST(key_health.breaker_rested_from AS TEXT), key_health.auth_serve_id, \
        CAST(key_health.auth_at AS TEXT) FROM keys \
        LEFT JOIN key_health ON key_health.key_id = keys.id WHERE keys.id = ?";
    /// Audit rows whose ids are in one bound JSON array (the primary key finds each).
    pub const SELECT_SERVES: &str =
        "SELECT id, key_id, consumer_id, feature, CAST(created_at AS TEXT), outcome_class, \
        outcome_status, CAST(outcome_reported_at AS TEXT), cost FROM usage_events \
        WHERE id IN (SELECT value FROM json_each(?))";
    pub const SELECT_SERVE: &str =
        "SELECT id, key_id, consumer_id, feature, CAST(created_at AS TEXT), outcome_class, \
        outcome_status, CAST(outcome_reported_at AS TEXT), cost FROM usage_events WHERE id = ?";

    /// Whether a key's budget window (as stored) has ended by the delta's `at` (`b.value ->> 2`).
    macro_rules! key_window_ended {
        () => {
            "keys.usage_window_seconds > 0 AND (julianday(keys.usage_window_start) IS NULL \
            OR (julianday(b.value ->> 2) - julianday(keys.usage_window_start)) * 86400.0 \
            >= keys.usage_window_seconds - 0.002)"
        };
    }
    /// The fast path of migration 012's rules for a batch whose keys each have one row
    /// (`[[key_id, units, at, null], …]`, stored keys only): applies them all in one UPDATE;
    /// migration 014's trigger refuses a count taken past its limit.
    pub const UPDATE_USAGE: &str = concat!(
        "UPDATE keys SET usage_count = (CASE WHEN ",
        key_window_ended!(),
        " THEN 0 ELSE keys.usage_count END) + (b.value ->> 1), usage_window_start = CASE WHEN ",
        key_window_ended!(),
        " THEN b.value ->> 2 ELSE keys.usage_window_start END \
        FROM json_each(?) AS b WHERE keys.id = b.value ->> 0"
    );
    /// Whether a stored rate window has ended by the delta's start `at`.
    macro_rules! rate_window_ended {
        ($at:literal) => {
            concat!(
                "(julianday(window_counts.window_start) IS NULL OR (julianday(",
                $at,
                ") - julianday(window_counts.window_start)) * 86400.0 \
                >= window_counts.window_seconds - 0.002)"
            )
        };
    }
    /// What an upsert of `window_counts` does to a row it finds: migration 012's rules.
    macro_rules! window_upsert_conflict {
        () => {
            concat!(
                " ON CONFLICT (key_id, feature, window_seconds) DO UPDATE SET \
                rate_limit = excluded.rate_limit, count = (CASE WHEN ",
                rate_window_ended!("excluded.window_start"),
                " THEN 0 ELSE window_counts.count END) + excluded.count, \
                window_start = CASE WHEN ",
                rate_window_ended!("excluded.window_start"),
                " THEN excluded.window_start ELSE window_counts.window_start END"
            )
        };
    }
    /// The fast path for windows that each have one row (`INSERT_WINDOW_DELTAS`'s array);
    /// migration 014's CHECK refuses a count taken past the row's limit.
    pub const UPSERT_WINDOWS: &str = concat!(
        "INSERT INTO window_counts (key_id, feature, window_seconds, window_start, count, \
        rate_limit) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
        value ->> 5 FROM json_each(?) WHERE true",
        window_upsert_conflict!()
    );

    /// `INSERT_EVENTS` for SQLite's `COMMIT_FAST`, the audit rows bound as one flat JSON array
    /// per column (`fast_columns`) and read by position: ids `?1`, key ids `?2`, consumer ids
    /// `?3`, features `?4`, and `created_at` and cost interleaved in `?5`. Issue 14 item 5: a
    /// nested row is handed back by `json_each` as text and re-parsed by every `value ->> N`;
    /// a scalar element is read as is, and `?N ->> e.key` finds its parsed array in SQLite's
    /// per-statement JSON cache by the pointer. That cache holds four arrays, so no statement
    /// reads more than four this way (a fifth read in turn with them was parsed every time).
    pub const INSERT_EVENTS_COLUMNS: &str =
        "INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at, cost) \
        SELECT e.value, ?2 ->> e.key, ?3 ->> e.key, ?4 ->> e.key, ?5 ->> (2 * e.key), \
        ?5 ->> (2 * e.key + 1) FROM json_each(?1) AS e";
    /// Whether a key's budget window (as stored) has ended by the delta's `at`, read by
    /// position `k.key` from the flat array `?8` (`UPDATE_USAGE_COLUMNS`).
    macro_rules! key_window_ended_at_column {
        () => {
            "keys.usage_window_seconds > 0 AND (julianday(keys.usage_window_start) IS NULL \
            OR (julianday(?8 ->> k.key) - julianday(keys.usage_window_start)) * 86400.0 \
            >= keys.usage_window_seconds - 0.002)"
        };
    }
    /// `UPDATE_USAGE` (same rules, same refusal) with flat column arrays as above: key ids
    /// `?6`, units `?7`, `at` `?8`.
    pub const UPDATE_USAGE_COLUMNS: &str = concat!(
        "UPDATE keys SET usage_count = (CASE WHEN ",
        key_window_ended_at_column!(),
        " THEN 0 ELSE keys.usage_count END) + (?7 ->> k.key), usage_window_start = CASE WHEN ",
        key_window_ended_at_column!(),
        " THEN ?8 ->> k.key ELSE keys.usage_window_start END \
        FROM json_each(?6) AS k WHERE keys.id = k.value"
    );
    /// `UPSERT_WINDOWS_COLUMNS`, and with a RETURNING clause `UPSERT_WINDOWS_COLUMNS_RETURNING`.
    macro_rules! upsert_windows_columns {
        () => {
            concat!(
                "INSERT INTO window_counts (key_id, feature, window_seconds, window_start, count, \
                rate_limit) SELECT k.value, ?10 ->> k.key, ?11 ->> k.key, ?12 ->> k.key, \
                ?13 ->> (2 * k.key), ?13 ->> (2 * k.key + 1) FROM json_each(?9) AS k WHERE true",
                window_upsert_conflict!()
            )
        };
    }
    /// `UPSERT_WINDOWS` (same rules, same refusal) with flat column arrays as above: key ids
    /// `?9`, features `?10`, window lengths `?11`, starts `?12`, and units and limits
    /// interleaved in `?13` (`[units, limit, units, limit, …]`).
    pub const UPSERT_WINDOWS_COLUMNS: &str = upsert_windows_columns!();

    /// `UPSERT_WINDOWS_COLUMNS` answering each row's slot and rowid, which SQLite's store keeps
    /// so the next commits update the row by rowid (`UPDATE_WINDOWS_BY_ROW`).
    pub const UPSERT_WINDOWS_COLUMNS_RETURNING: &str = concat!(
        upsert_windows_columns!(),
        " RETURNING key_id, feature, window_seconds, rowid"
    );
    /// Whether a stored window has ended by the delta's start (SQLite's by-rowid update): its
    /// start is at or before the cutoff the process computed, `at` less the window plus the
    /// 2 ms every other text allows (`to_db` text in both, fixed width, so text order is time
    /// order; this store writes every start with `to_db`).
    macro_rules! window_ended_by_cutoff {
        () => {
            "(window_counts.window_start IS NULL \
            OR window_counts.window_start <= ?16 ->> (2 * k.key + 1))"
        };
    }
    /// The same rules and refusal as `UPSERT_WINDOWS_COLUMNS` (migration 014's CHECK) for
    /// windows whose row SQLite's store already knows (issue 14 item 5): each found by its rowid
    /// `?14` instead of the UNIQUE index on three columns, after no attempted insert, with the
    /// window's end decided on text (`window_ended_by_cutoff`) instead of two `julianday`
    /// parses. `[key id, feature, …]` `?15`, `[start, cutoff, …]` `?16`, `[units, limit, window
    /// length, …]` `?17`. A rowid that no longer names its window's row (deleted with its key,
    /// renumbered by a VACUUM, reused) updates nothing; `WINDOW_ROWS_MISSED` then aborts the
    /// commit.
    pub const UPDATE_WINDOWS_BY_ROW: &str = concat!(
        "UPDATE window_counts SET rate_limit = ?17 ->> (3 * k.key + 1), count = (CASE WHEN ",
        window_ended_by_cutoff!(),
        " THEN 0 ELSE window_counts.count END) + (?17 ->> (3 * k.key)), window_start = CASE WHEN ",
        window_ended_by_cutoff!(),
        " THEN ?16 ->> (2 * k.key) ELSE window_counts.window_start END \
        FROM json_each(?14) AS k WHERE window_counts.rowid = k.value \
        AND window_counts.key_id = ?15 ->> (2 * k.key) \
        AND window_counts.feature = ?15 ->> (2 * k.key + 1) \
        AND window_counts.window_seconds = ?17 ->> (3 * k.key + 2)"
    );
    /// Run right after `UPDATE_WINDOWS_BY_ROW`: aborts the commit (migration 015's trigger,
    /// `WINDOW_ROWS_MISSED_MESSAGE`) when that update changed fewer rows than it named.
    pub const WINDOW_ROWS_MISSED: &str = "INSERT INTO window_rows_missed (named, changed) \
        SELECT json_array_length(?14), changes() WHERE changes() != json_array_length(?14)";
    /// The error `WINDOW_ROWS_MISSED` raises.
    pub const WINDOW_ROWS_MISSED_MESSAGE: &str = "keypooler_window_rows_missed";
    /// The four arrays `?14`–`?17` of `UPDATE_WINDOWS_BY_ROW`, for windows with their rowids.
    pub fn window_row_columns(windows: &[(&super::WindowDelta, i64)]) -> [String; 4] {
        use crate::timestamp::to_db;
        let cutoff = |w: &super::WindowDelta| {
            w.at - chrono::TimeDelta::milliseconds(w.window_seconds.saturating_mul(1000) - 2)
        };
        [
            json(&windows.iter().map(|(_, row)| *row).collect::<Vec<_>>()),
            json(
                &windows
                    .iter()
                    .flat_map(|(w, _)| [w.key_id.as_str(), w.feature.as_str()])
                    .collect::<Vec<_>>(),
            ),
            json(
                &windows
                    .iter()
                    .flat_map(|(w, _)| [to_db(w.at), to_db(cutoff(w))])
                    .collect::<Vec<_>>(),
            ),
            json(
                &windows
                    .iter()
                    .flat_map(|(w, _)| [w.units, w.rate_limit, w.window_seconds])
                    .collect::<Vec<_>>(),
            ),
        ]
    }

    /// Whether each window of a batch has one delta (the fast path's rule for windows).
    pub fn windows_once(windows: &[super::WindowDelta]) -> bool {
        let mut slots = std::collections::HashSet::with_capacity(windows.len());
        windows
            .iter()
            .all(|w| slots.insert((w.key_id.as_str(), w.feature.as_str(), w.window_seconds)))
    }

    /// The thirteen flat arrays `?1`–`?13` of `INSERT_EVENTS_COLUMNS`, `UPDATE_USAGE_COLUMNS`
    /// and `UPSERT_WINDOWS_COLUMNS`,
    /// or `None` when some delta must go through migration 012's triggers (the rule of
    /// `delta_parameters`: a RegBot key, or a key or window with more than one row).
    pub fn fast_columns(
        events: &[crate::model::UsageEvent],
        usage: &[super::UsageDelta],
        windows: &[super::WindowDelta],
    ) -> Option<[String; 13]> {
        use crate::timestamp::to_db;
        use std::collections::HashSet;
        let mut keys = HashSet::with_capacity(usage.len());
        let stored_once = usage.iter().all(|u| {
            !u.key_id.starts_with(super::regbot::KEY_PREFIX) && keys.insert(u.key_id.as_str())
        });
        if !stored_once || !windows_once(windows) {
            return None;
        }
        let created_and_cost: Vec<serde_json::Value> = events
            .iter()
            .flat_map(|e| [to_db(e.created_at).into(), e.cost.into()])
            .collect();
        Some([
            json(&events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>()),
            json(&events.iter().map(|e| e.key_id.as_str()).collect::<Vec<_>>()),
            json(
                &events
                    .iter()
                    .map(|e| e.consumer_id.as_str())
                    .collect::<Vec<_>>(),
            ),
            json(
                &events
                    .iter()
                    .map(|e| e.feature.as_str())
                    .collect::<Vec<_>>(),
            ),
            json(&created_and_cost),
            json(&usage.iter().map(|u| u.key_id.as_str()).collect::<Vec<_>>()),
            json(&usage.iter().map(|u| u.units).collect::<Vec<_>>()),
            json(&usage.iter().map(|u| to_db(u.at)).collect::<Vec<_>>()),
            json(
                &windows
                    .iter()
                    .map(|w| w.key_id.as_str())
                    .collect::<Vec<_>>(),
            ),
            json(
                &windows
                    .iter()
                    .map(|w| w.feature.as_str())
                    .collect::<Vec<_>>(),
            ),
            json(&windows.iter().map(|w| w.window_seconds).collect::<Vec<_>>()),
            json(&windows.iter().map(|w| to_db(w.at)).collect::<Vec<_>>()),
            json(
                &windows
                    .iter()
                    .flat_map(|w| [w.units, w.rate_limit])
                    .collect::<Vec<_>>(),
            ),
        ])
    }

    /// A batch's budget deltas from one bound JSON array `[[key_id, units, at,
    /// regbot_limit], …]`, applied in order by migration 012's trigger (which refuses one that
    /// does not fit, aborting the commit).
    pub const INSERT_USAGE_DELTAS: &str = "INSERT INTO usage_deltas (key_id, units, at, \
        usage_limit) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?)";

    /// The JSON parameters of `INSERT_EVENTS` and `INSERT_USAGE_DELTAS` for a batch.
    pub fn batch_parameters(
        events: &[crate::model::UsageEvent],
        usage: &[super::UsageDelta],
    ) -> (String, String) {
        use crate::timestamp::to_db;
        let events: Vec<(&str, &str, &str, &str, String, i64)> = events
            .iter()
            .map(|e| {
                (
                    e.id.as_str(),
                    e.key_id.as_str(),
                    e.consumer_id.as_str(),
                    e.feature.as_str(),
                    to_db(e.created_at),
                    e.cost,
                )
            })
            .collect();
        let usage: Vec<(&str, i64, String, Option<i64>)> = usage
            .iter()
            .map(|u| (u.key_id.as_str(), u.units, to_db(u.at), u.regbot_limit))
            .collect();
        // Serialising strings, integers and null cannot fail.
        (json(&events), json(&usage))
    }

    /// The batch's deltas split between the fast path and the triggers (migration 012):
    /// (fast usage, trigger usage, fast windows, trigger windows), each a JSON array. Rows go
    /// the fast way when each key (window) has one row and the key is a stored one; otherwise
    /// through the triggers, which apply rows one by one in order.
    pub fn delta_parameters(
        usage: &[super::UsageDelta],
        windows: &[super::WindowDelta],
    ) -> (String, String, String, String) {
        use std::collections::HashSet;
        let stored = |u: &&super::UsageDelta| !u.key_id.starts_with(super::regbot::KEY_PREFIX);
        let mut keys = HashSet::with_capacity(usage.len());
        let fast_usage = usage
            .iter()
            .filter(stored)
            .all(|u| keys.insert(u.key_id.as_str()));
        let (fast, slow): (Vec<super::UsageDelta>, Vec<super::UsageDelta>) = usage
            .iter()
            .cloned()
            .partition(|u| fast_usage && stored(&u));
        let mut slots = HashSet::with_capacity(windows.len());
        let fast_windows = windows
            .iter()
            .all(|w| slots.insert((w.key_id.as_str(), w.feature.as_str(), w.window_seconds)));
        let none: &[super::WindowDelta] = &[];
        let (fast_w, slow_w) = if fast_windows {
            (windows, none)
        } else {
            (none, windows)
        };
        (
            batch_parameters(&[], &fast).1,
            batch_parameters(&[], &slow).1,
            window_parameter(fast_w),
            window_parameter(slow_w),
        )
    }

    /// The JSON parameter of `INSERT_WINDOW_DELTAS`.
    pub fn window_parameter(windows: &[super::WindowDelta]) -> String {
        let rows: Vec<(&str, &str, i64, String, i64, i64)> = windows
            .iter()
            .map(|w| {
                (
                    w.key_id.as_str(),
                    w.feature.as_str(),
                    w.window_seconds,
                    crate::timestamp::to_db(w.at),
                    w.units,
                    w.rate_limit,
                )
            })
            .collect();
        json(&rows)
    }

    /// The JSON parameter of `UPSERT_TIER_HEALTH`.
    pub fn tier_parameter(tiers: &[crate::model::TierCooldownWrite]) -> String {
        let rows: Vec<(&str, String)> = tiers
            .iter()
            .map(|t| (t.tier_id.as_str(), crate::timestamp::to_db(t.until)))
            .collect();
        json(&rows)
    }

    /// The JSON parameters of `SET_OUTCOMES` and `UPSERT_HEALTH`.
    pub fn health_parameters(
        outcomes: &[crate::model::OutcomeWrite],
        health: &[crate::model::HealthWrite],
    ) -> (String, String) {
        use crate::timestamp::to_db;
        let outcomes: Vec<(&str, &str, Option<u16>, String)> = outcomes
            .iter()
            .map(|o| (o.serve_id.as_str(), o.class, o.status, to_db(o.reported_at)))
            .collect();
        type Row<'a> = (
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<String>,
            Option<u16>,
            u32,
            Option<String>,
            u32,
            Option<String>,
            u32,
            Option<String>,
            Option<&'a str>,
            Option<String>,
        );
        let health: Vec<Row> = health
            .iter()
            .map(|h| {
                let r = &h.record;
                let m = &r.memory;
                (
                    h.key_id.as_str(),
                    r.state.as_str(),
                    r.reason.map(|r| r.as_str()),
                    r.until.map(to_db),
                    r.last_status,
                    r.strikes,
                    r.changed_at.map(to_db),
                    m.rate_step,
                    m.rate_rested_from.map(to_db),
                    m.breaker_step,
                    m.breaker_rested_from.map(to_db),
                    m.auth_strike.as_ref().map(|(serve, _)| serve.as_str()),
                    m.auth_strike.as_ref().map(|(_, at)| to_db(*at)),
                )
            })
            .collect();
        (json(&outcomes), json(&health))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn side_index_statements_use_one_bucket_size() {
            let shift = format!(">> {}", super::BUCKET_SHIFT);
            for text in [
                super::INDEX_BY_KEY,
                super::INDEX_BY_CONSUMER,
                super::PRUNE_BY_KEY,
                super::PRUNE_BY_CONSUMER,
            ] {
                assert!(text.contains(&shift), "{text}");
            }
        }

        #[test]
        fn batch_parameters_are_arrays_in_column_order() {
            let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
            let events = [crate::model::UsageEvent {
                id: "e\"1".into(),
                key_id: "k".into(),
                consumer_id: "admin".into(),
                feature: "f".into(),
                created_at: t,
                outcome: None,
                cost: 5,
            }];
            let usage = [super::super::UsageDelta {
                key_id: "k".into(),
                units: 7,
                at: t,
                regbot_limit: None,
            }];
            let (e, u) = super::batch_parameters(&events, &usage);
            assert_eq!(
                e,
                r#"[["e\"1","k","admin","f","2023-11-14 22:13:20.000000",5]]"#
            );
            assert_eq!(u, r#"[["k",7,"2023-11-14 22:13:20.000000",null]]"#);
        }

        // Issue 14 item 5: `COMMIT_FAST`'s thirteen column arrays, and the batches it must not take.
        #[test]
        fn fast_columns_are_flat_arrays_or_none_for_the_trigger_path() {
            use super::super::{regbot::KEY_PREFIX, UsageDelta, WindowDelta};
            let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
            let at = "2023-11-14 22:13:20.000000";
            let event = crate::model::UsageEvent {
                id: "e1".into(),
                key_id: "k".into(),
                consumer_id: "c".into(),
                feature: "f".into(),
                created_at: t,
                outcome: None,
                cost: 3,
            };
            let usage = |key: &str| UsageDelta {
                key_id: key.into(),
                units: 3,
                at: t,
                regbot_limit: None,
            };
            let window = |seconds: i64| WindowDelta {
                key_id: "k".into(),
                feature: "f".into(),
                window_seconds: seconds,
                at: t,
                units: 1,
                rate_limit: 9,
            };
            let columns = super::fast_columns(
                std::slice::from_ref(&event),
                &[usage("k")],
                &[window(1), window(60)],
            )
            .expect("fast");
            let want = [
                r#"["e1"]"#.to_string(),
                r#"["k"]"#.into(),
                r#"["c"]"#.into(),
                r#"["f"]"#.into(),
                format!(r#"["{at}",3]"#),
                r#"["k"]"#.into(),
                "[3]".into(),
                format!(r#"["{at}"]"#),
                r#"["k","k"]"#.into(),
                r#"["f","f"]"#.into(),
                "[1,60]".into(),
                format!(r#"["{at}","{at}"]"#),
                "[1,9,1,9]".into(),
            ];
            assert_eq!(columns, want);
            let regbot = format!("{KEY_PREFIX}1");
            for (usage, windows) in [
                (vec![usage("k"), usage("k")], vec![]),
                (vec![usage(&regbot)], vec![]),
                (vec![], vec![window(1), window(1)]),
            ] {
                assert!(super::fast_columns(&[], &usage, &windows).is_none());
            }
        }
    }
}

/// A result row read by position, whatever the driver. A cell that cannot be read as asked
/// (a type a Go row never should hold) reads as NULL.
pub trait Cells {
    fn text(&self, i: usize) -> Option<String>;
    fn int(&self, i: usize) -> Option<i64>;
}

/// One snapshot query and how its rows are kept.
pub type SnapshotRead = (&'static str, fn(&mut SnapshotRows, &dyn Cells));

/// Flat rows as every driver reads them, before they are grouped into a [`Snapshot`].
#[derive(Default)]
pub struct SnapshotRows {
    /// (id, name, description)
    pub tiers: Vec<(String, String, String)>,
    /// (tier_id, feature, rate_limit, window_seconds, position)
    pub features: Vec<(String, String, i64, i64, i64)>,
    /// Keys without their secrets.
    pub keys: Vec<KeyRecord>,
    /// (key_id, name, sealed value)
    pub secrets: Vec<(String, String, String)>,
    /// Consumers without their scopes.
    pub consumers: Vec<ConsumerRecord>,
    /// (consumer_id, tier_id)
    pub scopes: Vec<(String, String)>,
    /// (key_id, health)
    pub health: Vec<(String, HealthRecord)>,
    /// (tier_id, cooled until)
    pub tier_cooldowns: Vec<(String, crate::timestamp::Timestamp)>,
    /// (tier_id, RegBot service)
    pub tier_sources: Vec<(String, String)>,
    /// (key_id `regbot:N`, counters)
    pub regbot_keys: Vec<(String, crate::model::RegbotKeyRow)>,
    pub rate_windows: Vec<RateWindowWrite>,
    /// (tier_id, upstream JSON) — SPEC §8.6
    pub upstreams: Vec<(String, String)>,
}

impl SnapshotRows {
    /// The queries that load the pool, each with how a row of it is kept; a driver runs them
    /// in order and feeds every row to its function.
    pub const READS: [SnapshotRead; 12] = [
        (sql::SELECT_TIERS, keep_tier),
        (sql::SELECT_TIER_FEATURES, keep_feature),
        (sql::SELECT_KEYS, keep_key),
        (sql::SELECT_KEY_SECRETS, keep_secret),
        (sql::SELECT_CONSUMERS, keep_consumer),
        (sql::SELECT_SCOPES, keep_scope),
        (sql::SELECT_HEALTH, keep_health),
        (sql::SELECT_TIER_HEALTH, keep_tier_health),
        (regbot::SELECT_TIER_SOURCES, regbot::keep_tier_source),
        (regbot::SELECT_REGBOT_KEYS, regbot::keep_regbot_key),
        (sql::SELECT_RATE_WINDOWS, keep_rate_window),
        (sql::SELECT_TIER_UPSTREAMS, keep_upstream),
    ];
    /// One tier with its features; each query binds the tier id.
    pub const TIER_READS: [SnapshotRead; 4] = [
        (sql::SELECT_TIER, keep_tier),
        (sql::SELECT_FEATURES_OF, keep_feature),
        (regbot::SELECT_TIER_SOURCE_OF, regbot::keep_tier_source),
        (sql::SELECT_UPSTREAM_OF, keep_upstream),
    ];
    /// One key with its secrets; each query binds the key id.
    pub const KEY_READS: [SnapshotRead; 2] = [
        (sql::SELECT_KEY, keep_key),
        (sql::SELECT_SECRETS_OF, keep_secret),
    ];
    /// One consumer with its scopes; each query binds the consumer id.
    pub const CONSUMER_READS: [SnapshotRead; 2] = [
        (sql::SELECT_CONSUMER, keep_consumer),
        (sql::SELECT_SCOPES_OF, keep_scope),
    ];

    /// Groups children under their parents; orphans (a Go database may hold some) are dropped.
    pub fn assemble(self) -> Snapshot {
        use std::collections::HashMap;
        let mut tiers: Vec<TierRecord> = self
            .tiers
            .into_iter()
            .map(|(id, name, description)| TierRecord {
                id,
                name,
                description,
                features: Default::default(),
                source: None,
                upstream: None,
            })
            .collect();
        let tier_pos: HashMap<String, usize> = tiers
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        // The first window (the Go row) before the others; a later window whose feature has
        // no first (a Go service removed it) is dropped with it.
        let mut features = self.features;
        features.sort_by_key(|f| f.4);
        for (tier_id, feature, rate_limit, window_seconds, position) in features {
            if let Some(&i) = tier_pos.get(&tier_id) {
                // The Go service treated a missing or zero window as 60 seconds.
                let window_seconds = if window_seconds > 0 {
                    window_seconds
                } else {
                    60
                };
                let limit = crate::model::FeatureLimit {
                    rate_limit,
                    window_seconds,
                };
                match tiers[i].features.get_mut(&feature) {
                    Some(windows) if position > 0 => windows.push(limit),
                    Some(_) => {}
                    None if position == 0 => {
                        tiers[i].features.insert(feature, vec![limit]);
                    }
                    None => {}
                }
            }
        }
        for (tier_id, regbot_service) in self.tier_sources {
            if let Some(&i) = tier_pos.get(&tier_id) {
                tiers[i].source = Some(crate::model::TierSource { regbot_service });
            }
        }
        for (tier_id, json) in self.upstreams {
            if let Some(&i) = tier_pos.get(&tier_id) {
                tiers[i].upstream =
                    crate::model::upstream::TierUpstream::from_stored(&tier_id, &json);
            }
        }
        let mut keys = self.keys;
        let key_pos: HashMap<String, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.id.clone(), i))
            .collect();
        for (key_id, name, value) in self.secrets {
            if let Some(&i) = key_pos.get(&key_id) {
                keys[i].secrets.push((name, value));
            }
        }
        let mut consumers = self.consumers;
        let consumer_pos: HashMap<String, usize> = consumers
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        for (consumer_id, tier_id) in self.scopes {
            if let Some(&i) = consumer_pos.get(&consumer_id) {
                consumers[i].scopes.push(tier_id);
            }
        }
        Snapshot {
            tiers,
            keys,
            consumers,
            health: self.health.into_iter().collect(),
            tier_cooldowns: self.tier_cooldowns.into_iter().collect(),
            regbot_keys: self.regbot_keys.into_iter().collect(),
            rate_windows: self.rate_windows,
        }
    }
}

fn keep_tier(rows: &mut SnapshotRows, r: &dyn Cells) {
    rows.tiers.push((
        r.text(0).unwrap_or_default(),
        r.text(1).unwrap_or_default(),
        r.text(2).unwrap_or_default(),
    ))
}

fn keep_upstream(rows: &mut SnapshotRows, r: &dyn Cells) {
    if let (Some(tier_id), Some(json)) = (r.text(0), r.text(1)) {
        rows.upstreams.push((tier_id, json));
    }
}

fn keep_feature(rows: &mut SnapshotRows, r: &dyn Cells) {
    rows.features.push((
        r.text(0).unwrap_or_default(),
        r.text(1).unwrap_or_default(),
        r.int(2).unwrap_or(0),
        r.int(3).unwrap_or(60),
        r.int(4).unwrap_or(0),
    ))
}

/// A stored rate window; one whose start is unreadable is dropped (it cannot be placed).
fn keep_rate_window(rows: &mut SnapshotRows, r: &dyn Cells) {
    let key_id = r.text(0).unwrap_or_default();
    let Some(start) = parse_stored_time(r.text(3), "window_counts.window_start", &key_id) else {
        return;
    };
    rows.rate_windows.push(RateWindowWrite {
        feature: r.text(1).unwrap_or_default(),
        window_seconds: r.int(2).unwrap_or(0),
        start,
        count: r.int(4).unwrap_or(0),
        key_id,
    })
}

fn keep_key(rows: &mut SnapshotRows, r: &dyn Cells) {
    let id = r.text(0).unwrap_or_default();
    rows.keys.push(KeyRecord {
        name: r.text(1).unwrap_or_default(),
        sealed_value: r.text(2).unwrap_or_default(),
        tier_id: r.text(3).unwrap_or_default(),
        is_active: r.int(4).unwrap_or(1) != 0,
        expires_at: parse_stored_time(r.text(5), "expires_at", &id),
        usage_limit: r.int(6),
        usage_count: r.int(7).unwrap_or(0),
        usage_window_seconds: r.int(8),
        usage_window_start: parse_stored_time(r.text(9), "usage_window_start", &id),
        metadata_json: r.text(10).unwrap_or_else(|| "{}".into()),
        created_at: parse_stored_time(r.text(11), "created_at", &id),
        secrets: Vec::new(),
        id,
    })
}

fn keep_secret(rows: &mut SnapshotRows, r: &dyn Cells) {
    rows.secrets.push((
        r.text(0).unwrap_or_default(),
        r.text(1).unwrap_or_default(),
        r.text(2).unwrap_or_default(),
    ))
}

fn keep_consumer(rows: &mut SnapshotRows, r: &dyn Cells) {
    let id = r.text(0).unwrap_or_default();
    rows.consumers.push(ConsumerRecord {
        name: r.text(1).unwrap_or_default(),
        token_hash: r.text(2).unwrap_or_default(),
        description: r.text(3).unwrap_or_default(),
        is_active: r.int(4).unwrap_or(1) != 0,
        scopes: Vec::new(),
        previous_token: r.text(5).and_then(|hash| {
            let until = parse_stored_time(r.text(6), "previous_token_expires_at", &id)?;
            Some((hash, until))
        }),
        id,
    })
}

fn keep_scope(rows: &mut SnapshotRows, r: &dyn Cells) {
    rows.scopes
        .push((r.text(0).unwrap_or_default(), r.text(1).unwrap_or_default()))
}

fn keep_health(rows: &mut SnapshotRows, r: &dyn Cells) {
    let id = r.text(0).unwrap_or_default();
    if let Some(record) = health_record(r, 1, &id) {
        rows.health.push((id, record));
    }
}

fn keep_tier_health(rows: &mut SnapshotRows, r: &dyn Cells) {
    let id = r.text(0).unwrap_or_default();
    if let Some(until) = parse_stored_time(r.text(1), "tier_health.cooled_until", &id) {
        rows.tier_cooldowns.push((id, until));
    }
}

/// A health record from columns `at..at + 12` (state, reason, until, last_status, strikes,
/// changed_at, then `HealthMemory`'s); `None` when there is no row or its state is unknown
/// (the key counts as active).
pub fn health_record(r: &dyn Cells, at: usize, key_id: &str) -> Option<HealthRecord> {
    let state = r.text(at)?;
    let Some(state) = StateKind::parse(&state) else {
        tracing::warn!(key_id = %key_id, "unknown stored health state ignored; the key counts as active");
        return None;
    };
    Some(HealthRecord {
        state,
        reason: r.text(at + 1).as_deref().and_then(Reason::parse),
        until: parse_stored_time(r.text(at + 2), "key_health.until", key_id),
        last_status: r.int(at + 3).and_then(|s| u16::try_from(s).ok()),
        strikes: r
            .int(at + 4)
            .and_then(|s| u32::try_from(s).ok())
            .unwrap_or(0),
        changed_at: parse_stored_time(r.text(at + 5), "key_health.changed_at", key_id),
        memory: HealthMemory {
            rate_step: step(r.int(at + 6)),
            rate_rested_from: parse_stored_time(
                r.text(at + 7),
                "key_health.rate_rested_from",
                key_id,
            ),
            breaker_step: step(r.int(at + 8)),
            breaker_rested_from: parse_stored_time(
                r.text(at + 9),
                "key_health.breaker_rested_from",
                key_id,
            ),
            auth_strike: r.text(at + 10).and_then(|serve| {
                let at = parse_stored_time(r.text(at + 11), "key_health.auth_at", key_id)?;
                Some((serve, at))
            }),
        },
    })
}

/// A stored ladder step; unreadable or negative reads as none taken.
fn step(raw: Option<i64>) -> u32 {
    raw.and_then(|s| u32::try_from(s).ok()).unwrap_or(0)
}

/// A key's `is_active` and health from `sql::SELECT_KEY_HEALTH`.
pub fn key_health(r: &dyn Cells, key_id: &str) -> (bool, Option<HealthRecord>) {
    (r.int(0).unwrap_or(1) != 0, health_record(r, 1, key_id))
}

/// An audit row of `sql::RECENT_USAGE` or `sql::SELECT_SERVE`.
pub fn usage_event(r: &dyn Cells) -> UsageEvent {
    UsageEvent {
        id: r.text(0).unwrap_or_default(),
        key_id: r.text(1).unwrap_or_default(),
        consumer_id: r.text(2).unwrap_or_default(),
        feature: r.text(3).unwrap_or_default(),
        created_at: r
            .text(4)
            .as_deref()
            .and_then(crate::timestamp::parse_db)
            .unwrap_or_default(),
        outcome: r.text(5).map(|class| StoredOutcome {
            class,
            status: r.int(6),
            reported_at: r.text(7).as_deref().and_then(crate::timestamp::parse_db),
        }),
        cost: r.int(8).unwrap_or(1),
    }
}

/// Reads a stored timestamp column; an unreadable one is logged (without the row's values) and ignored.
pub fn parse_stored_time(
    raw: Option<String>,
    what: &str,
    id: &str,
) -> Option<crate::timestamp::Timestamp> {
    let raw = raw?;
    let parsed = crate::timestamp::parse_db(&raw);
    if parsed.is_none() && !raw.trim().is_empty() {
        tracing::warn!(key_id = %id, column = what, "unreadable timestamp ignored");
    }
    parsed
}
