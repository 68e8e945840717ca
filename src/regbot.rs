//! The RegBot credentials source (SPEC §8.5, issue 12): RegBot's `credentials` table, read-only,
//! feeds tiers with keys `regbot:N`.
//!
//! Guarantees: RegBot's database is only ever sent the seed's statement shape (`SELECT … FROM
//! credentials WHERE service = ? AND status = 'active' ORDER BY id`); a local file is opened
//! with SQLite's read-only flag and `query_only`, on a connection of its own per refresh. A
//! refresh builds every key off the hot path and swaps them in under one pool write lock. A
//! failed refresh changes nothing in the pool (the last good snapshot keeps serving). Values
//! stay in memory; our database keeps counters, quota baselines and health by `regbot:N`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{DatabaseConfig, RegbotConfig};
use crate::crypto::Sealer;
use crate::model::{HealthWrite, RegbotKeyRow};
use crate::pool::health::HealthRecord;
use crate::pool::regbot::Credential;
use crate::pool::{Now, Pool, PoolKey};
use crate::secret::Secret;
use crate::store::regbot::{SeenWrite, UPSERT_SEEN};
use crate::store::{Cells, Db, Param};
use crate::timestamp::Timestamp;

/// The seed's service mapping: a tier with this name and no explicit source reads this service.
pub const DEFAULT_MAPPING: [(&str, &str); 9] = [
    ("exa", "exaai"),
    ("firecrawl", "firecrawl"),
    ("assemblyai", "assemblyai"),
    ("groq", "groq"),
    ("tavily", "tavily"),
    ("serper", "serper"),
    ("elevenlabs", "elevenlabs"),
    ("cartesia", "cartesia"),
    ("deepgram", "deepgram"),
];

/// The seed's query; every column read as text, so both drivers decode alike whatever type
/// SQLite's dynamic typing let RegBot store.
pub const QUERY: &str = "SELECT CAST(id AS TEXT), CAST(api_key AS TEXT), CAST(email AS TEXT), \
    CAST(quota_total AS TEXT), CAST(quota_used AS TEXT), CAST(quota_unit AS TEXT), \
    CAST(extra_metadata AS TEXT), CAST(updated_at AS TEXT) \
    FROM credentials WHERE service = ? AND status = 'active' ORDER BY id";

/// How long one refresh may wait for RegBot in all.
pub const READ_BOUND: Duration = Duration::from_secs(10);

/// A `credentials` row as read: the eight columns of `QUERY`.
pub type Row = [Option<String>; 8];

/// Where RegBot's database is, opened read-only.
enum Reader {
    Local {
        options: sqlx::sqlite::SqliteConnectOptions,
        path: String,
    },
    Remote {
        db: libsql::Database,
        /// Strings never to appear in an error (URL, token).
        redact: Vec<String>,
        host: String,
    },
}

impl Reader {
    async fn open(database: &DatabaseConfig) -> Result<Reader, String> {
        match database {
            DatabaseConfig::Local { path } => Ok(Reader::Local {
                // Read-only open flag (a bug cannot write), no create, no journal change, and
                // `query_only` as a second lock.
                options: sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true)
                    .create_if_missing(false)
                    .foreign_keys(false)
                    .busy_timeout(Duration::from_secs(5))
                    .pragma("query_only", "ON"),
                path: path.display().to_string(),
            }),
            DatabaseConfig::Remote { url, auth_token } => {
                let token = auth_token
                    .as_ref()
                    .map(|t| t.expose().to_string())
                    .unwrap_or_default();
                let mut redact = vec![url.expose().to_string()];
                if !token.is_empty() {
                    redact.push(token.clone());
                }
                let host = crate::store::libsql::host_of(url.expose());
                let db = libsql::Builder::new_remote(url.expose().to_string(), token)
                    .build()
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot open RegBot's libSQL database at {host}: {}",
                            crate::store::libsql::redact_all(&e.to_string(), &redact)
                        )
                    })?;
                Ok(Reader::Remote { db, redact, host })
            }
        }
    }

    /// The active rows of `service`, in id order.
    async fn read(&self, service: &str) -> Result<Vec<Row>, String> {
        match self {
            Reader::Local { options, path } => {
                use sqlx::Connection;
                let fail = |e: sqlx::Error| format!("RegBot's database {path}: {e}");
                let mut conn = sqlx::sqlite::SqliteConnection::connect_with(options)
                    .await
                    .map_err(fail)?;
                let rows = sqlx::query(QUERY)
                    .bind(service)
                    .fetch_all(&mut conn)
                    .await
                    .map_err(fail);
                let _ = conn.close().await;
                Ok(rows?.iter().map(|r| row(r)).collect())
            }
            Reader::Remote { db, redact, host } => {
                let fail = |e: libsql::Error| {
                    format!(
                        "RegBot's libSQL database at {host}: {}",
                        crate::store::libsql::redact_all(&e.to_string(), redact)
                    )
                };
                let conn = db.connect().map_err(fail)?;
                let mut rows = conn
                    .query(QUERY, [service.to_string()])
                    .await
                    .map_err(fail)?;
                let mut out = Vec::new();
                while let Some(r) = rows.next().await.map_err(fail)? {
                    out.push(row(&r));
                }
                Ok(out)
            }
        }
    }
}

fn row(r: &dyn Cells) -> Row {
    std::array::from_fn(|i| r.text(i))
}

/// Why a row is skipped (never naming its key).
fn parse_quota(raw: Option<&str>, column: &str) -> Result<Option<i64>, String> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let n = match raw.parse::<i64>() {
        Ok(n) => n,
        Err(_) => match raw.parse::<f64>() {
            Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
            _ => return Err(format!("{column} is not a whole number")),
        },
    };
    if n < 0 {
        return Err(format!("{column} is negative"));
    }
    Ok(Some(n))
}

/// A row as a credential, or why it is skipped. The fingerprint is a keyed hash of the
/// row's `api_key` and `updated_at` (never the key itself).
pub fn credential(row: &Row, sealer: &Sealer) -> Result<Credential, (Option<i64>, String)> {
    let id = row[0]
        .as_deref()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .ok_or((None, "id is not a whole number".to_string()))?;
    let bad = |reason: String| (Some(id), reason);
    let api_key = row[1]
        .as_deref()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| bad("api_key is null or empty".into()))?;
    let email = row[2].clone().filter(|e| !e.trim().is_empty());
    let quota_total = parse_quota(row[3].as_deref(), "quota_total").map_err(bad)?;
    let quota_used = parse_quota(row[4].as_deref(), "quota_used")
        .map_err(bad)?
        .unwrap_or(0);
    let quota_unit = row[5]
        .clone()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "requests".into());
    let mut metadata = match row[6].as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            _ => return Err(bad("extra_metadata is not a JSON object".into())),
        },
    };
    if let Some(email) = &email {
        metadata.insert("email".into(), email.clone().into());
    }
    metadata.insert("quota_unit".into(), quota_unit.clone().into());
    let updated_at = row[7].clone().unwrap_or_default();
    let fingerprint = sealer.value_hash(&Secret::new(format!("{api_key}\n{updated_at}")));
    Ok(Credential {
        id,
        name: email.unwrap_or_else(|| format!("regbot-{id}")),
        value: Secret::new(api_key),
        metadata,
        quota_total,
        quota_used,
        quota_unit,
        fingerprint,
    })
}

/// Which service feeds which tier: explicit sources first, then the default mapping for a
/// tier with that name whose service no explicit source took. One tier per service (a
/// credential is one key, in one tier); `(service, tier id, tier name)` by service.
pub fn mapping(pool: &Pool) -> BTreeMap<String, (Arc<str>, String)> {
    let tiers = pool.tiers();
    let mut out: BTreeMap<String, (Arc<str>, String)> = BTreeMap::new();
    for tier in &tiers {
        if let Some(source) = &tier.record.source {
            if let Some((_, other)) = out.get(&source.regbot_service) {
                tracing::warn!(service = %source.regbot_service, tier = %tier.record.name, fed = %other,
                    "RegBot service already feeds another tier; this tier gets none of its keys");
                continue;
            }
            out.insert(
                source.regbot_service.clone(),
                (Arc::from(tier.record.id.as_str()), tier.record.name.clone()),
            );
        }
    }
    for tier in tiers.iter().filter(|t| t.record.source.is_none()) {
        if let Some((_, service)) = DEFAULT_MAPPING.iter().find(|(n, _)| *n == tier.record.name) {
            out.entry(service.to_string())
                .or_insert_with(|| (Arc::from(tier.record.id.as_str()), tier.record.name.clone()));
        }
    }
    out
}

/// What `GET /admin/sources` shows.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub last_success: Option<(Timestamp, Instant)>,
    pub last_attempt: Option<Timestamp>,
    pub last_error: Option<String>,
    /// Whether the last attempt failed.
    pub failing: bool,
    pub credentials: usize,
    /// RegBot keys per mapped tier name, as of the last success.
    pub tiers: BTreeMap<String, usize>,
}

impl Status {
    pub fn state(&self) -> &'static str {
        if self.last_attempt.is_none() {
            "pending"
        } else if self.failing {
            "stale"
        } else {
            "ok"
        }
    }
}

/// What a refresh remembers between runs.
#[derive(Default)]
struct Memory {
    /// The keys the last refresh put in the pool (a tier deleted since may have dropped some
    /// from the pool; they are still found here).
    live: HashMap<Arc<str>, Arc<PoolKey>>,
    /// Keys that left the pool (suspended, deleted, re-mapped away): a credential that comes
    /// back keeps its counters and health.
    retired: HashMap<Arc<str>, Arc<PoolKey>>,
    /// Rows of our database for credentials not seen since startup.
    stored: HashMap<String, RegbotKeyRow>,
    stored_health: HashMap<String, HealthRecord>,
    /// (row id, reason) already warned about, so a bad row warns once, not every refresh.
    warned: HashSet<(i64, String)>,
}

/// The configured RegBot source.
pub struct Source {
    reader: Reader,
    pub refresh_every: Duration,
    status: parking_lot::Mutex<Status>,
    /// Serialises refreshes (the loop and `POST /admin/sources/regbot/refresh`).
    memory: tokio::sync::Mutex<Memory>,
    wake: tokio::sync::Notify,
}

impl Source {
    /// Prepares the reader (opens nothing local yet); `stored`: our rows for `regbot:N`.
    pub async fn new(
        config: &RegbotConfig,
        stored: HashMap<String, RegbotKeyRow>,
        stored_health: HashMap<String, HealthRecord>,
    ) -> Result<Source, String> {
        Ok(Source {
            reader: Reader::open(&config.database).await?,
            refresh_every: config.refresh,
            status: parking_lot::Mutex::default(),
            memory: tokio::sync::Mutex::new(Memory {
                stored,
                stored_health,
                ..Memory::default()
            }),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// Asks the loop to refresh now (a tier's source changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// One refresh: reads every mapped service, then swaps the pool's RegBot keys at once.
    /// On failure the pool keeps what it has and the status turns `stale`.
    pub async fn refresh(&self, pool: &Pool, db: &Db, sealer: &Sealer) {
        let mut memory = self.memory.lock().await;
        let attempt = chrono::Utc::now();
        let mapping = mapping(pool);
        let read = async {
            let mut out = Vec::with_capacity(mapping.len());
            for (service, tier) in &mapping {
                out.push((tier.clone(), self.reader.read(service).await?));
            }
            // With no tier mapped, one read (rows discarded) still tells whether RegBot answers.
            if mapping.is_empty() {
                self.reader.read(DEFAULT_MAPPING[0].1).await?;
            }
            Ok::<_, String>(out)
        };
        let rows = match tokio::time::timeout(READ_BOUND, read).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => return self.failed(attempt, e),
            Err(_) => {
                return self.failed(
                    attempt,
                    format!(
                        "RegBot's database did not answer within {} s",
                        READ_BOUND.as_secs()
                    ),
                )
            }
        };
        let now = Now::read();
        let mut keys: Vec<Arc<PoolKey>> = Vec::new();
        let mut seen = Vec::new();
        let mut health = Vec::new();
        let mut tiers: BTreeMap<String, usize> = mapping
            .values()
            .map(|(_, name)| (name.clone(), 0))
            .collect();
        let mut warned_now = HashSet::new();
        for ((tier_id, tier_name), rows) in rows {
            for row in &rows {
                let credential = match credential(row, sealer) {
                    Ok(c) => c,
                    Err((id, reason)) => {
                        let id = id.unwrap_or(-1);
                        if !memory.warned.contains(&(id, reason.clone())) {
                            tracing::warn!(regbot_row_id = id, reason = %reason, "RegBot row skipped");
                        }
                        warned_now.insert((id, reason));
                        continue;
                    }
                };
                let id: Arc<str> = Arc::from(credential.key_id());
                let previous = memory.live.get(&id).or_else(|| memory.retired.get(&id));
                let (key, writes) = PoolKey::from_credential(
                    credential,
                    tier_id.clone(),
                    previous.map(|k| &**k),
                    memory.stored.get(&*id),
                    memory.stored_health.get(&*id),
                    now,
                );
                seen.extend(writes.seen);
                health.extend(writes.health);
                *tiers.entry(tier_name.clone()).or_default() += 1;
                keys.push(Arc::new(key));
            }
        }
        memory.warned = warned_now;
        let credentials = keys.len();
        pool.swap_regbot(&keys);
        let live: HashMap<Arc<str>, Arc<PoolKey>> =
            keys.into_iter().map(|k| (k.id.clone(), k)).collect();
        for id in live.keys() {
            memory.retired.remove(id);
            memory.stored.remove(&**id);
            memory.stored_health.remove(&**id);
        }
        let gone: Vec<(Arc<str>, Arc<PoolKey>)> = memory
            .live
            .drain()
            .filter(|(id, _)| !live.contains_key(id))
            .collect();
        memory.retired.extend(gone);
        memory.live = live;
        persist(db, &seen, &health).await;
        let mut status = self.status.lock();
        status.last_success = Some((attempt, Instant::now()));
        status.last_attempt = Some(attempt);
        status.last_error = None;
        status.failing = false;
        status.credentials = credentials;
        status.tiers = tiers;
    }

    fn failed(&self, attempt: Timestamp, error: String) {
        tracing::warn!(error = %error, "RegBot refresh failed; serving the last good snapshot");
        let mut status = self.status.lock();
        status.last_attempt = Some(attempt);
        status.last_error = Some(error);
        status.failing = true;
    }

    /// Refreshes every `refresh_every`, or at once when woken, until aborted.
    pub fn spawn(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        db: Db,
        sealer: Sealer,
    ) -> tokio::task::JoinHandle<()> {
        let source = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(source.refresh_every) => {}
                    () = source.wake.notified() => {}
                }
                source.refresh(&pool, &db, &sealer).await;
            }
        })
    }
}

/// Writes quota baselines, fingerprints and lifted quarantines. A failure is logged: the pool
/// already holds the truth, and a baseline left stale only makes the next start stricter.
async fn persist(db: &Db, seen: &[SeenWrite], health: &[HealthWrite]) {
    let mut statements = Vec::new();
    if !seen.is_empty() {
        let rows = crate::store::regbot::seen_parameter(seen);
        statements.push((UPSERT_SEEN, vec![Param::Text(rows)]));
    }
    if !health.is_empty() {
        let (_, rows) = crate::store::sql::health_parameters(&[], health);
        statements.push((crate::store::sql::UPSERT_HEALTH, vec![Param::Text(rows)]));
    }
    if statements.is_empty() {
        return;
    }
    if let Err(e) = db.write(&statements, &[]).await {
        tracing::warn!(error = %e, rows = seen.len(), "RegBot quota baselines could not be recorded; the next start re-reads them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: [Option<&str>; 8]) -> Row {
        cells.map(|c| c.map(str::to_string))
    }

    // Issue 12 item 5: malformed rows are refused with a reason naming the column, never the key.
    #[test]
    fn malformed_rows_are_refused_with_a_reason() {
        let sealer = Sealer::new(None);
        let good = [
            Some("7"),
            Some("k-SECRET"),
            Some("a@b.c"),
            Some("100"),
            Some("4"),
            None,
            Some(r#"{"plan":"free"}"#),
            Some("2026-01-02 03:04:05"),
        ];
        let c = credential(&row(good), &sealer).expect("good row");
        assert_eq!(c.id, 7);
        assert_eq!(c.name, "a@b.c");
        assert_eq!((c.quota_total, c.quota_used), (Some(100), 4));
        assert_eq!(c.metadata["plan"], "free");
        assert_eq!(c.metadata["quota_unit"], "requests");
        assert_eq!(c.metadata["email"], "a@b.c");
        let cases: [(usize, Option<&str>, &str); 6] = [
            (1, None, "api_key"),
            (1, Some("  "), "api_key"),
            (6, Some("{not json"), "extra_metadata"),
            (6, Some("[1]"), "extra_metadata"),
            (3, Some("-1"), "quota_total"),
            (4, Some("lots"), "quota_used"),
        ];
        for (column, value, named) in cases {
            let mut bad = good;
            bad[column] = value;
            let (id, reason) = credential(&row(bad), &sealer).err().expect("refused");
            assert_eq!(id, Some(7));
            assert!(
                reason.contains(named) && !reason.contains("SECRET"),
                "{reason}"
            );
        }
        let mut real = good;
        real[3] = Some("100.0");
        real[4] = None;
        let c = credential(&row(real), &sealer).expect("a REAL quota is whole");
        assert_eq!((c.quota_total, c.quota_used), (Some(100), 0));
    }

    // Issue 12 item 6: the fingerprint follows the key and updated_at.
    #[test]
    fn fingerprint_changes_with_key_or_updated_at() {
        let sealer = Sealer::new(None);
        let base = [
            Some("1"),
            Some("k1"),
            None,
            None,
            None,
            None,
            None,
            Some("t1"),
        ];
        let f = |r: [Option<&str>; 8]| credential(&row(r), &sealer).ok().map(|c| c.fingerprint);
        let mut other_key = base;
        other_key[1] = Some("k2");
        let mut other_time = base;
        other_time[7] = Some("t2");
        assert_eq!(f(base), f(base));
        assert_ne!(f(base), f(other_key));
        assert_ne!(f(base), f(other_time));
        assert!(!f(base).unwrap_or_default().contains("k1"));
    }
}
