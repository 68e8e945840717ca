//! The remote Turso/libSQL driver (`libsql` crate, remote mode over Hrana/HTTP).
//!
//! Remote realities it is shaped by: server streams expire when idle and interactive
//! transactions time out, so no stream is kept between operations — autocommit statements
//! travel on one-shot streams and each transaction opens its own short stream. A group commit
//! of serves is ONE pipeline request (`commit_in_one_request`: `BEGIN IMMEDIATE`, the batch's
//! three statements each reading a bound JSON parameter through `json_each`, `COMMIT`, steps
//! conditioned, `ROLLBACK` unless committed), so no replica can hold the write lock between
//! requests; so is each background write (rollup, prune, side index: idempotent, retried once);
//! a commit with outcomes or health stays an interactive transaction. Deltas are not
//! idempotent: a commit whose answer was lost is read back (its first audit row) and re-sent
//! once only if missing. An admin write is retried only if it failed before anything reached
//! the server; after that its outcome is `Uncertain` and the caller reads the row back
//! (`read_by_id`). Every operation is bounded by `DB_BUSY_TIMEOUT_MS`. Errors are redacted: the
//! URL and token never leave.

use std::sync::Arc;
use std::time::Duration;

use libsql::{params::Params, TransactionBehavior, Value};
use tokio::sync::Semaphore;

use super::{
    key_health, prune_candidate, rollup_row, sql, summary_row, usage_event, Batch, Cells, Param,
    SnapshotRead, SnapshotRows, StoreError, SummaryRow, MIGRATIONS,
};
use crate::config::Config;
use crate::model::{ConsumerRecord, KeyRecord, Snapshot, TierRecord, UsageEvent};
use crate::pool::health::HealthRecord;
use crate::secret::Secret;
use crate::timestamp::to_db;

#[derive(Clone)]
pub struct LibsqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: libsql::Database,
    /// Bounds concurrent remote operations to `DB_MAX_OPEN_CONNS`.
    permits: Semaphore,
    timeout: Duration,
    /// Strings that must never appear in an error we log or return.
    redact: Vec<String>,
    host: String,
    /// Group commits go straight to the Hrana pipeline endpoint, one request each (see
    /// `commit_in_one_request`).
    http: reqwest::Client,
    pipeline_url: String,
    auth: String,
}

/// Group commits a replica keeps in flight at most (each one request; see `commits_in_flight`).
/// Two: overlapped commits stay exact — their deltas commute, and one overtaken by a later
/// commit that reset a window it names is refused and re-decided (`GUARD_WINDOW_STARTS`,
/// `ledger::conflict`; with 8 and no guard a 1 s window held one serve over its limit). With
/// overlap on, the three-replica `kill -9` test's survivors stalled past 2 s at times: the
/// killed replica had died inside an interactive background write (a side-index fill), holding
/// the write lock until its stream expired; those writes are one request each now. With 4, a
/// full loaded suite once saw one survivor get no 200 in the 3 s after the kill while the
/// other took all 120 (its commits kept losing the race for the windows); 2 passed every run,
/// six of them beside a second copy of the module. At 20 ms round trip the benchmark gives
/// ~1,700 /key/s with 2, ~2,000 with 4, ~970 with 1 (README, Running several replicas).
const REMOTE_COMMITS_IN_FLIGHT: usize = 2;

/// Issue 14 item 4: refuses a batch (`commit_guard`'s CHECK, so a conflict the ledger
/// re-decides) when one of its window deltas starts more than 7 ms before the window the
/// database holds (5 ms between two serves' placements of one start, 1 ms rounding each side):
/// a commit that landed after another reset that window — overtaken by a later commit in
/// flight beside it, or re-sent late. Migration 012's rules alone count such a delta in the
/// newer window, so the window its serves were made in escaped its limit (6 serves of 5 in the
/// three-replica test with 8 commits in flight).
const GUARD_WINDOW_STARTS: &str = "INSERT INTO commit_guard (refused) SELECT 'window start' \
    FROM json_each(?) AS b JOIN window_counts AS w ON w.key_id = b.value ->> 0 \
    AND w.feature = b.value ->> 1 AND w.window_seconds = b.value ->> 2 \
    WHERE (julianday(w.window_start) - julianday(b.value ->> 3)) * 86400.0 > 0.007 LIMIT 1";

pub(crate) fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?'])
        .next()
        .unwrap_or_default()
        .to_string()
}

impl LibsqlStore {
    /// Connects, proves the connection with a query, and migrates. Fails with one clear line.
    pub async fn open(
        url: &Secret,
        auth_token: Option<&Secret>,
        config: &Config,
    ) -> Result<LibsqlStore, StoreError> {
        let token = auth_token
            .map(|t| t.expose().to_string())
            .unwrap_or_default();
        let mut redact = vec![url.expose().to_string()];
        if !token.is_empty() {
            redact.push(token.clone());
        }
        let host = host_of(url.expose());
        let db = libsql::Builder::new_remote(url.expose().to_string(), token.clone())
            .build()
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot open the libSQL database at {host}: {}",
                    redact_all(&e.to_string(), &redact)
                ))
            })?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(REMOTE_COMMITS_IN_FLIGHT)
            .build()
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot build the HTTP client for {host}: {e}"))
            })?;
        let store = LibsqlStore {
            inner: Arc::new(Inner {
                db,
                permits: Semaphore::new(config.db_max_open_conns as usize),
                timeout: config.db_busy_timeout,
                redact,
                http,
                pipeline_url: pipeline_url(url.expose()),
                auth: format!("Bearer {token}"),
                host,
            }),
        };
        store.probe().await?;
        store.migrate().await?;
        Ok(store)
    }

    fn err(&self, e: libsql::Error) -> StoreError {
        let text = redact_all(&e.to_string(), &self.inner.redact);
        if text.contains(super::REFUSED) {
            return StoreError::Refused(text);
        }
        let lower = text.to_ascii_lowercase();
        if lower.contains("unique constraint") || lower.contains("sqlite_constraint") {
            return StoreError::Conflict;
        }
        match e {
            libsql::Error::Hrana(_)
            | libsql::Error::ConnectionFailed(_)
            | libsql::Error::WriteDelegation(_)
                if !lower.contains("sqlite_error") && !lower.contains("sql_parse") =>
            {
                StoreError::Unavailable(format!("libSQL at {}: {text}", self.inner.host))
            }
            _ => StoreError::Other(text),
        }
    }

    /// Runs `op` on a fresh connection within the time bound and a permit.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(libsql::Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.run_within(1, op).await
    }

    /// `run` bounded by `scale` times `DB_BUSY_TIMEOUT_MS` (a bulk write of many rows).
    async fn run_within<T, F, Fut>(&self, scale: u32, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(libsql::Connection) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let inner = &self.inner;
        let bound = inner.timeout.saturating_mul(scale.max(1));
        let work = async {
            let _permit = inner
                .permits
                .acquire()
                .await
                .map_err(|_| StoreError::Unavailable("database closed".into()))?;
            let conn = inner.db.connect().map_err(|e| self.err(e))?;
            op(conn).await
        };
        tokio::time::timeout(bound, work).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "libSQL at {} did not answer within DB_BUSY_TIMEOUT_MS ({} ms{})",
                inner.host,
                inner.timeout.as_millis(),
                if scale > 1 {
                    format!(" × {scale}")
                } else {
                    String::new()
                }
            )))
        })
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.run(|conn| async move {
            let mut rows = conn.query("SELECT 1", ()).await.map_err(|e| self.err(e))?;
            rows.next().await.map_err(|e| self.err(e))?;
            Ok(())
        })
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(m) | StoreError::Other(m)
                if m.contains("401") || m.contains("403") =>
            {
                StoreError::Unavailable(format!(
                    "libSQL at {} rejected the auth token (DATABASE_AUTH_TOKEN or ?authToken=)",
                    self.inner.host
                ))
            }
            other => other,
        })
    }

    /// Each migration is one operation under the time bound (`run`), not all of them
    /// together: a database several migrations behind needs several round trips.
    async fn migrate(&self) -> Result<(), StoreError> {
        self.run(|conn| async move {
            conn.execute(sql::CREATE_MIGRATIONS_TABLE, ())
                .await
                .map_err(|e| self.err(e))
        })
        .await?;
        let applied = self.applied_versions().await?;
        for (version, name, body) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            // The migration and its bookkeeping row commit together: a migration that adds
            // columns could not run twice. The row goes first as a plain INSERT, so a replica
            // starting at the same moment that applied it already fails before the body.
            // Version and name are our constants, the time is ours; nothing from outside is
            // spliced in.
            let record = format!(
                "INSERT INTO schema_migrations (version, name, applied_at) \
                 VALUES ({version}, '{name}', '{}');",
                to_db(chrono::Utc::now())
            );
            let batch = format!("{record}\n{body}");
            let outcome = self
                .run(|conn| async move {
                    conn.execute_transactional_batch(&batch)
                        .await
                        .map_err(|e| self.err(e))
                })
                .await;
            match outcome {
                Ok(_) => tracing::info!(version, name, "applied migration"),
                Err(_) if self.applied_versions().await?.contains(version) => {
                    tracing::info!(version, name, "migration applied by another process");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn applied_versions(&self) -> Result<Vec<i64>, StoreError> {
        self.run(|conn| async move {
            let mut applied = Vec::new();
            let mut rows = conn
                .query(sql::APPLIED_VERSIONS, ())
                .await
                .map_err(|e| self.err(e))?;
            while let Some(row) = rows.next().await.map_err(|e| self.err(e))? {
                applied.push(row.int(0).unwrap_or(0));
            }
            Ok(applied)
        })
        .await
    }

    async fn all(
        &self,
        conn: &libsql::Connection,
        statement: &str,
    ) -> Result<Vec<libsql::Row>, StoreError> {
        let mut rows = conn.query(statement, ()).await.map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await.map_err(|e| self.err(e))? {
            out.push(row);
        }
        Ok(out)
    }

    pub async fn load_snapshot(&self) -> Result<Snapshot, StoreError> {
        self.run(|conn| async move {
            let mut rows = SnapshotRows::default();
            for (query, keep) in SnapshotRows::READS {
                for r in self.all(&conn, query).await? {
                    keep(&mut rows, &r);
                }
            }
            Ok(rows.assemble())
        })
        .await
    }

    /// Runs `statements` in one transaction. A transport failure is retried once on a fresh
    /// stream if the statements are `idempotent` (the serve batch) or if nothing had reached
    /// the server yet; never otherwise, since re-running an insert or delete that did land
    /// would answer "already exists" or "not found" for a change that was made. `check` sees
    /// each statement's affected row count and may abort with an error.
    ///
    /// Outcomes: `Ok` only after the server answered COMMIT. A failure before any statement
    /// was sent is definite (nothing happened). A failure after one was sent is `Uncertain`:
    /// the server may have closed the stream and run later statements outside the transaction,
    /// or applied a COMMIT whose answer was lost. COMMIT is sent as a statement because the
    /// client's `commit()` silently does nothing (and reports success) on a stream the server
    /// has closed; as a statement it fails there instead.
    async fn transaction(
        &self,
        statements: &[(String, Vec<Value>)],
        idempotent: bool,
        check: impl Fn(usize, u64) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.transaction_within(1, statements, idempotent, check)
            .await
            .map(|_| ())
    }

    /// `transaction`, bounded by `scale` times `DB_BUSY_TIMEOUT_MS` (bulk writes), answering
    /// each statement's affected-row count.
    async fn transaction_within(
        &self,
        scale: u32,
        statements: &[(String, Vec<Value>)],
        idempotent: bool,
        check: impl Fn(usize, u64) -> Result<(), StoreError>,
    ) -> Result<Vec<u64>, StoreError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let check = &check;
        let sent = AtomicBool::new(false);
        let sent = &sent;
        let attempt = || async {
            self.run_within(scale, |conn| async move {
                let tx = conn.transaction().await.map_err(|e| self.err(e))?;
                let mut counts = Vec::with_capacity(statements.len());
                for (i, (statement, values)) in statements.iter().enumerate() {
                    sent.store(true, Ordering::SeqCst);
                    let affected = tx
                        .execute(statement, Params::Positional(values.clone()))
                        .await
                        .map_err(|e| self.err(e))?;
                    check(i, affected)?;
                    counts.push(affected);
                }
                sent.store(true, Ordering::SeqCst);
                tx.execute("COMMIT", ()).await.map_err(|e| self.err(e))?;
                Ok(counts)
            })
            .await
        };
        let outcome = match attempt().await {
            Err(StoreError::Unavailable(first)) if idempotent || !sent.load(Ordering::SeqCst) => {
                tracing::warn!(error = %first, "libSQL transaction failed; retrying once on a fresh stream");
                attempt().await
            }
            other => other,
        };
        match outcome {
            Err(StoreError::Unavailable(detail) | StoreError::Other(detail))
                if sent.load(Ordering::SeqCst) =>
            {
                Err(StoreError::Uncertain(detail))
            }
            other => other,
        }
    }

    /// Runs `reads`, each binding `id`, inside `BEGIN IMMEDIATE`: the write lock is granted
    /// only once no other transaction holds it, so a transaction abandoned with its COMMIT
    /// still on the way has committed or rolled back by then, and what is read is final.
    pub async fn read_by_id(
        &self,
        reads: &[SnapshotRead],
        id: &str,
    ) -> Result<Snapshot, StoreError> {
        self.run(|conn| async move {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .await
                .map_err(|e| self.err(e))?;
            let mut rows = SnapshotRows::default();
            for (query, keep) in reads {
                let mut found = tx
                    .query(query, Params::Positional(vec![Value::Text(id.to_string())]))
                    .await
                    .map_err(|e| self.err(e))?;
                while let Some(r) = found.next().await.map_err(|e| self.err(e))? {
                    keep(&mut rows, &r);
                }
            }
            // Nothing was written; a failed ROLLBACK leaves the server to expire the stream.
            if let Err(e) = tx.rollback().await {
                tracing::debug!(error = %self.err(e), "rollback after a read-back failed");
            }
            Ok(rows.assemble())
        })
        .await
    }

    pub async fn create_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        let mut statements = vec![(
            sql::INSERT_TIER.to_string(),
            vec![
                Value::Text(tier.id.clone()),
                Value::Text(tier.name.clone()),
                Value::Text(tier.description.clone()),
                Value::Text(to_db(chrono::Utc::now())),
            ],
        )];
        statements.extend(feature_rows(tier));
        statements.extend(
            super::upstream_statements(tier)
                .into_iter()
                .map(|(sql, params)| (sql.to_string(), values(&params))),
        );
        self.transaction(&statements, false, |_, _| Ok(())).await
    }

    pub async fn update_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        let mut statements = vec![
            (
                sql::UPDATE_TIER.to_string(),
                vec![
                    Value::Text(tier.name.clone()),
                    Value::Text(tier.description.clone()),
                    Value::Text(tier.id.clone()),
                ],
            ),
            (
                sql::DELETE_TIER_FEATURES.to_string(),
                vec![Value::Text(tier.id.clone())],
            ),
            (
                sql::DELETE_FEATURE_WINDOWS.to_string(),
                vec![Value::Text(tier.id.clone())],
            ),
        ];
        statements.extend(feature_rows(tier));
        statements.extend(
            super::upstream_statements(tier)
                .into_iter()
                .map(|(sql, params)| (sql.to_string(), values(&params))),
        );
        self.transaction(&statements, false, |i, affected| {
            if i == 0 && affected == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    pub async fn create_key(
        &self,
        key: &KeyRecord,
        value_hash: Option<&str>,
    ) -> Result<(), StoreError> {
        let opt_text = |v: Option<String>| v.map(Value::Text).unwrap_or(Value::Null);
        let opt_int = |v: Option<i64>| v.map(Value::Integer).unwrap_or(Value::Null);
        let mut statements = vec![(
            sql::INSERT_KEY.to_string(),
            vec![
                Value::Text(key.id.clone()),
                Value::Text(key.name.clone()),
                Value::Text(key.sealed_value.clone()),
                Value::Text(key.tier_id.clone()),
                Value::Integer(i64::from(key.is_active)),
                opt_text(key.expires_at.map(to_db)),
                opt_int(key.usage_limit),
                Value::Integer(key.usage_count),
                opt_int(key.usage_window_seconds),
                opt_text(key.usage_window_start.map(to_db)),
                Value::Text(key.metadata_json.clone()),
                opt_text(key.created_at.map(to_db)),
            ],
        )];
        if let Some(hash) = value_hash {
            statements.push((
                sql::SET_VALUE_HASH.to_string(),
                vec![Value::Text(hash.to_string()), Value::Text(key.id.clone())],
            ));
        }
        for (name, value) in &key.secrets {
            statements.push((
                sql::INSERT_KEY_SECRET.to_string(),
                vec![
                    Value::Text(key.id.clone()),
                    Value::Text(name.clone()),
                    Value::Text(value.clone()),
                ],
            ));
        }
        self.transaction(&statements, false, |_, _| Ok(())).await
    }

    pub async fn select(
        &self,
        statement: &str,
        params: &[Param],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        self.run(|conn| async move {
            let mut rows = conn
                .query(statement, Params::Positional(values(params)))
                .await
                .map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().await.map_err(|e| self.err(e))? {
                out.push(
                    (0..r.column_count().max(0) as usize)
                        .map(|i| r.text(i))
                        .collect(),
                );
            }
            Ok(out)
        })
        .await
    }

    /// One transaction, as `transaction` (not retried once sent: an unconfirmed commit is
    /// `Uncertain`), bounded by `scale` times `DB_BUSY_TIMEOUT_MS` for bulk writes.
    pub async fn write_all(
        &self,
        statements: &[(&str, Vec<Param>)],
        expect: &[Option<u64>],
        scale: u32,
    ) -> Result<Vec<u64>, StoreError> {
        let statements: Vec<(String, Vec<Value>)> = statements
            .iter()
            .map(|(statement, params)| (statement.to_string(), values(params)))
            .collect();
        self.transaction_within(scale, &statements, false, |i, affected| {
            match expect.get(i).copied().flatten() {
                Some(n) if n != affected => Err(StoreError::Conflict),
                _ => Ok(()),
            }
        })
        .await
    }

    pub async fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        self.delete_with_children(sql::DELETE_KEY, sql::DELETE_KEY_SECRETS, id)
            .await
    }

    pub async fn create_consumer(&self, c: &ConsumerRecord) -> Result<(), StoreError> {
        let statements = [(
            sql::INSERT_CONSUMER.to_string(),
            vec![
                Value::Text(c.id.clone()),
                Value::Text(c.name.clone()),
                Value::Text(c.token_hash.clone()),
                Value::Text(c.description.clone()),
                Value::Integer(i64::from(c.is_active)),
                Value::Text(to_db(chrono::Utc::now())),
            ],
        )];
        self.transaction(&statements, false, |_, _| Ok(())).await
    }

    pub async fn delete_consumer(&self, id: &str) -> Result<(), StoreError> {
        self.delete_with_children(sql::DELETE_CONSUMER, sql::DELETE_CONSUMER_SCOPES, id)
            .await
    }

    async fn delete_with_children(
        &self,
        parent: &str,
        children: &str,
        id: &str,
    ) -> Result<(), StoreError> {
        let statements = [
            (children.to_string(), vec![Value::Text(id.to_string())]),
            (parent.to_string(), vec![Value::Text(id.to_string())]),
        ];
        self.transaction(&statements, false, |i, affected| {
            if i == 1 && affected == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    pub async fn grant_scope(&self, consumer_id: &str, tier_id: &str) -> Result<(), StoreError> {
        let statements = [(
            sql::INSERT_SCOPE.to_string(),
            vec![
                Value::Text(consumer_id.to_string()),
                Value::Text(tier_id.to_string()),
            ],
        )];
        self.transaction(&statements, false, |_, _| Ok(())).await
    }

    /// Runs `statements` in one transaction (see `Db::write`); retried only if nothing reached
    /// the server, else `Uncertain` on a transport failure.
    pub async fn write(
        &self,
        statements: &[super::Statement],
        must_affect: &[usize],
    ) -> Result<(), StoreError> {
        let statements: Vec<(String, Vec<Value>)> = statements
            .iter()
            .map(|(statement, params)| (statement.to_string(), values(params)))
            .collect();
        self.transaction(&statements, false, |i, affected| {
            if affected == 0 && must_affect.contains(&i) {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|conn| async move {
            let mut rows = conn.query(sql::PING, ()).await.map_err(|e| self.err(e))?;
            rows.next().await.map_err(|e| self.err(e))?;
            Ok(())
        })
        .await
    }

    pub async fn recent_usage(&self, limit: i64) -> Result<Vec<UsageEvent>, StoreError> {
        self.run(|conn| async move {
            let mut rows = conn
                .query(
                    sql::RECENT_USAGE,
                    Params::Positional(vec![Value::Integer(limit)]),
                )
                .await
                .map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().await.map_err(|e| self.err(e))? {
                out.push(usage_event(&r));
            }
            Ok(out)
        })
        .await
    }

    /// A group commit: its deltas are not idempotent, so a commit whose answer was lost is
    /// re-sent only once a read-back (inside `BEGIN IMMEDIATE`, after any transaction still in
    /// flight has ended) found its first audit row missing — the transaction is atomic, so
    /// that row tells whether all of it landed. Sent as one request (`commit_in_one_request`).
    pub async fn commit_batch(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
        let (events_json, _) = sql::batch_parameters(batch.events, &[]);
        let (fast, slow, fast_w, slow_w) = sql::delta_parameters(batch.usage, batch.windows);
        // Every window delta goes one way or the other, so the guard's array is the non-empty one.
        let all_w = if slow_w == "[]" {
            fast_w.clone()
        } else {
            slow_w.clone()
        };
        let mut statements = vec![
            (sql::INSERT_EVENTS, events_json),
            (sql::UPDATE_USAGE, fast),
            (sql::INSERT_USAGE_DELTAS, slow),
            (GUARD_WINDOW_STARTS, all_w),
            (sql::UPSERT_WINDOWS, fast_w),
            (sql::INSERT_WINDOW_DELTAS, slow_w),
        ];
        if batch.has_health() {
            let (outcomes_json, health_json) = sql::health_parameters(batch.outcomes, batch.health);
            statements.push((sql::SET_OUTCOMES, outcomes_json));
            statements.push((sql::UPSERT_HEALTH, health_json.clone()));
            statements.push((sql::SET_ACTIVE, health_json));
            statements.push((sql::UPSERT_TIER_HEALTH, sql::tier_parameter(batch.tiers)));
        }
        // An empty array changes nothing: remotely each statement is server work (and, in an
        // interactive transaction, a round trip).
        statements.retain(|(_, parameter)| parameter != "[]");
        if batch.has_health() {
            // A report is answered 503 only if it changed nothing; one request may still run
            // on the server after we gave up on it, an interactive transaction whose COMMIT we
            // never sent cannot. Reports are rare; serves take the one-request path.
            let statements: Vec<(String, Vec<Value>)> = statements
                .into_iter()
                .map(|(sql, parameter)| (sql.to_string(), vec![Value::Text(parameter)]))
                .collect();
            return self.commit_interactively(&statements, batch).await;
        }
        let body = pipeline_body(&statements);
        let first = batch.events.first().map(|e| e.id.as_str());
        match self.commit_in_one_request(&body).await {
            Err(StoreError::Uncertain(detail)) => match first {
                // Outcomes and health alone are absolute: re-sending them is harmless.
                None => self.commit_in_one_request(&body).await,
                Some(id) => match self.read_serve(id, true).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => {
                        tracing::warn!(error = %detail, "a group commit did not land; re-sending it once");
                        match self.commit_in_one_request(&body).await {
                            // A late copy of the first landed meanwhile: it counted once.
                            Err(StoreError::Conflict) => Ok(()),
                            other => other,
                        }
                    }
                    Err(_) => Err(StoreError::Uncertain(detail)),
                },
            },
            other => other,
        }
    }

    /// Commits the ledger may keep in flight: their deltas commute, and each is one request
    /// (a stream of its own on the server). Bounded here, not by `DB_MAX_OPEN_CONNS` (which
    /// bounds every other remote operation), as locally the group commit has its own
    /// connection beside the pool.
    pub fn commits_in_flight(&self) -> usize {
        REMOTE_COMMITS_IN_FLIGHT
    }

    /// A group commit carrying reports or health as an interactive transaction; a lost
    /// answer is read back before the rows are re-sent once (as `commit_batch`).
    async fn commit_interactively(
        &self,
        statements: &[(String, Vec<Value>)],
        batch: &Batch<'_>,
    ) -> Result<(), StoreError> {
        let first = batch.events.first().map(|e| e.id.as_str());
        match self.transaction(statements, false, |_, _| Ok(())).await {
            Err(StoreError::Uncertain(detail)) => match first {
                None => self.transaction(statements, true, |_, _| Ok(())).await,
                Some(id) => match self.read_serve(id, true).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => self.transaction(statements, false, |_, _| Ok(())).await,
                    Err(_) => Err(StoreError::Uncertain(detail)),
                },
            },
            other => other,
        }
    }

    /// Issue 14 item 3: one group commit as ONE Hrana pipeline request — `BEGIN IMMEDIATE`,
    /// the statements, `COMMIT`, each step run only if the one before succeeded, and a
    /// `ROLLBACK` run unless `COMMIT` succeeded — so the server holds the write lock only
    /// while it runs that request: a replica that dies can never leave it locked, and a
    /// commit costs one round trip. Sent with our own HTTP client because the `libsql`
    /// crate's batches take SQL text only (`execute_transactional_batch(&str)`), no bound
    /// parameters, and a batch's JSON parameters would otherwise have to be spliced into SQL.
    /// Outcomes: `Ok` when the COMMIT step succeeded; `Refused`/`Conflict`/`Other` from the
    /// failed step (nothing written); `Unavailable` when the request never left (no
    /// connection); `Uncertain` when it may have run (lost answer, timeout, a 5xx).
    async fn commit_in_one_request(&self, body: &str) -> Result<(), StoreError> {
        let inner = &self.inner;
        let work = async {
            if inner.permits.is_closed() {
                return Err(StoreError::Unavailable("database closed".into()));
            }
            let sent = inner
                .http
                .post(&inner.pipeline_url)
                .header(reqwest::header::AUTHORIZATION, &inner.auth)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return Err(StoreError::Unavailable(format!(
                        "libSQL at {}: {}",
                        inner.host,
                        redact_all(&e.to_string(), &inner.redact)
                    )))
                }
                Err(e) => {
                    return Err(StoreError::Uncertain(format!(
                        "libSQL at {}: {}",
                        inner.host,
                        redact_all(&e.to_string(), &inner.redact)
                    )))
                }
            };
            let status = response.status();
            let text = response.text().await.map_err(|e| {
                StoreError::Uncertain(format!("libSQL at {}: answer lost: {e}", inner.host))
            })?;
            let text = redact_all(&text, &inner.redact);
            if status.is_client_error() {
                // Refused before running (auth, malformed): nothing happened.
                return Err(StoreError::Unavailable(format!(
                    "libSQL at {} answered {status}: {text}",
                    inner.host
                )));
            }
            if !status.is_success() {
                return Err(StoreError::Uncertain(format!(
                    "libSQL at {} answered {status}: {text}",
                    inner.host
                )));
            }
            batch_outcome(&text).map_err(|message| {
                if message.contains(super::REFUSED) {
                    StoreError::Refused(message)
                } else if message.to_ascii_lowercase().contains("unique constraint") {
                    StoreError::Conflict
                } else {
                    StoreError::Other(format!("libSQL at {}: {message}", inner.host))
                }
            })
        };
        tokio::time::timeout(inner.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Uncertain(format!(
                    "libSQL at {} did not answer within DB_BUSY_TIMEOUT_MS ({} ms)",
                    inner.host,
                    inner.timeout.as_millis()
                )))
            })
    }

    /// Every row of one read statement, decoded by `decode`.
    async fn read_all<T>(
        &self,
        text: &str,
        params: &[Param],
        decode: impl Fn(&libsql::Row) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let values = values(params);
        self.run(|conn| async move {
            let mut rows = conn
                .query(text, Params::Positional(values))
                .await
                .map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().await.map_err(|e| self.err(e))? {
                out.push(decode(&r));
            }
            Ok(out)
        })
        .await
    }

    pub async fn usage_page(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Vec<(i64, UsageEvent)>, StoreError> {
        self.read_all(text, params, |r| (r.int(9).unwrap_or(0), usage_event(r)))
            .await
    }

    pub async fn usage_summary(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Vec<SummaryRow>, StoreError> {
        self.read_all(text, params, |r| summary_row(r)).await
    }

    /// The first column of the first row as text, if any.
    pub async fn read_text(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Option<String>, StoreError> {
        let rows = self.read_all(text, params, |r| r.text(0)).await?;
        Ok(rows.into_iter().next().flatten())
    }

    pub async fn rollup_rows(
        &self,
        params: &[Param],
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        self.read_all(sql::ROLLUP_READ, params, |r| rollup_row(r))
            .await
    }

    /// Idempotent (the day's rows are replaced), so a lost answer may be retried. One request
    /// (`write_in_one_request`).
    pub async fn write_rollup(&self, params: &[Param]) -> Result<(), StoreError> {
        self.write_in_one_request(&[
            (sql::DELETE_ROLLUP_DAY, params[..1].to_vec()),
            (sql::INSERT_ROLLUP, params[1..3].to_vec()),
            (sql::SET_ROLLUP_THROUGH, params[3..].to_vec()),
        ])
        .await
    }

    /// An idempotent background write (rollup, prune, side index) as one pipeline request, like
    /// a group commit: a replica killed meanwhile cannot leave the write lock held until its
    /// stream expires (as an interactive transaction did, stalling every other replica's
    /// commits). An answer lost is retried once: running it twice changes nothing.
    async fn write_in_one_request(
        &self,
        statements: &[(&str, Vec<Param>)],
    ) -> Result<(), StoreError> {
        let body = pipeline_body_of(statements);
        match self.commit_in_one_request(&body).await {
            Err(StoreError::Uncertain(detail) | StoreError::Unavailable(detail)) => {
                tracing::warn!(error = %detail, "libSQL background write failed; retrying once");
                self.commit_in_one_request(&body).await
            }
            other => other,
        }
    }

    pub async fn prune_candidates(
        &self,
        params: &[Param],
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        self.read_all(sql::PRUNE_CANDIDATES, params, |r| prune_candidate(r))
            .await
    }

    /// Deleting rows already deleted changes nothing, so a lost answer may be retried.
    pub async fn prune_rows(&self, rows: &str) -> Result<(), StoreError> {
        let statements: Vec<(&str, Vec<Param>)> =
            [sql::PRUNE_BY_KEY, sql::PRUNE_BY_CONSUMER, sql::PRUNE_ROWS]
                .into_iter()
                .map(|q| (q, vec![Param::Text(rows.to_string())]))
                .collect();
        self.write_in_one_request(&statements).await
    }

    /// Idempotent (inserts are ignored when present, the end is absolute).
    pub async fn write_index(&self, params: &[Param]) -> Result<(), StoreError> {
        self.write_in_one_request(&[
            (sql::INDEX_BY_KEY, params[..2].to_vec()),
            (sql::INDEX_BY_CONSUMER, params[2..4].to_vec()),
            (sql::SET_INDEXED_THROUGH, params[4..].to_vec()),
        ])
        .await
    }

    /// Reads one row by id; `settled`: inside `BEGIN IMMEDIATE`, so what is read is final
    /// (as in `read_by_id`), else as a plain read.
    async fn read_one<T>(
        &self,
        query: &str,
        id: &str,
        settled: bool,
        decode: impl Fn(&libsql::Row) -> T,
    ) -> Result<Option<T>, StoreError> {
        self.run(|conn| async move {
            let behavior = if settled {
                TransactionBehavior::Immediate
            } else {
                TransactionBehavior::Deferred
            };
            let tx = conn
                .transaction_with_behavior(behavior)
                .await
                .map_err(|e| self.err(e))?;
            let mut rows = tx
                .query(query, Params::Positional(vec![Value::Text(id.to_string())]))
                .await
                .map_err(|e| self.err(e))?;
            let found = rows
                .next()
                .await
                .map_err(|e| self.err(e))?
                .map(|r| decode(&r));
            if let Err(e) = tx.rollback().await {
                tracing::debug!(error = %self.err(e), "rollback after a read failed");
            }
            Ok(found)
        })
        .await
    }

    pub async fn read_serve(
        &self,
        id: &str,
        settled: bool,
    ) -> Result<Option<UsageEvent>, StoreError> {
        self.read_one(sql::SELECT_SERVE, id, settled, |r| usage_event(r))
            .await
    }

    /// A plain read (no transaction): what it may miss of a commit in flight, the caller
    /// treats as not there yet, like a read of one serve.
    pub async fn read_serves(&self, ids_json: &str) -> Result<Vec<UsageEvent>, StoreError> {
        self.run(|conn| async move {
            let mut rows = conn
                .query(
                    sql::SELECT_SERVES,
                    Params::Positional(vec![Value::Text(ids_json.to_string())]),
                )
                .await
                .map_err(|e| self.err(e))?;
            let mut found = Vec::new();
            while let Some(row) = rows.next().await.map_err(|e| self.err(e))? {
                found.push(usage_event(&row));
            }
            Ok(found)
        })
        .await
    }

    pub async fn read_key_health(
        &self,
        id: &str,
    ) -> Result<Option<(bool, Option<HealthRecord>)>, StoreError> {
        self.read_one(sql::SELECT_KEY_HEALTH, id, true, |r| key_health(r, id))
            .await
    }

    pub async fn close(&self) {
        self.inner.permits.close();
    }
}

/// Each feature's first window as its Go row, the others as `feature_windows` rows.
fn feature_rows(tier: &TierRecord) -> Vec<(String, Vec<Value>)> {
    let sources = super::regbot::tier_source_statements(tier)
        .into_iter()
        .map(|(text, params)| (text.to_string(), values(&params)));
    tier.features
        .iter()
        .flat_map(|(feature, windows)| {
            windows.iter().enumerate().map(move |(position, limit)| {
                let mut values = vec![
                    Value::Text(tier.id.clone()),
                    Value::Text(feature.clone()),
                    Value::Integer(limit.rate_limit),
                    Value::Integer(limit.window_seconds),
                ];
                let text = if position == 0 {
                    sql::INSERT_TIER_FEATURE
                } else {
                    values.push(Value::Integer(position as i64));
                    sql::INSERT_FEATURE_WINDOW
                };
                (text.to_string(), values)
            })
        })
        .chain(sources)
        .collect()
}

/// `{base}/v3/pipeline`, `libsql://` read as `https://` and any query kept (as the `libsql`
/// crate builds it).
fn pipeline_url(url: &str) -> String {
    let url = url.replacen("libsql://", "https://", 1);
    let url = if url.contains("://") {
        url
    } else {
        format!("https://{url}")
    };
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    format!("{}/v3/pipeline{query}", base.trim_end_matches('/'))
}

/// The pipeline request of a group commit: one batch `BEGIN IMMEDIATE; statements…; COMMIT`
/// where each step runs only if the step before it succeeded, then `ROLLBACK` unless the
/// COMMIT step succeeded; the stream is closed in the same request.
fn pipeline_body(statements: &[(&str, String)]) -> String {
    let statements: Vec<(&str, Vec<Param>)> = statements
        .iter()
        .map(|(sql, parameter)| (*sql, vec![Param::Text(parameter.clone())]))
        .collect();
    pipeline_body_of(&statements)
}

/// `pipeline_body` for statements with any parameters (Hrana values: integers as strings).
fn pipeline_body_of(statements: &[(&str, Vec<Param>)]) -> String {
    use serde_json::json;
    let arg = |p: &Param| match p {
        Param::Text(t) => json!({ "type": "text", "value": t }),
        Param::Int(n) => json!({ "type": "integer", "value": n.to_string() }),
        Param::Null => json!({ "type": "null" }),
    };
    let mut steps = vec![json!({ "stmt": { "sql": "BEGIN IMMEDIATE" } })];
    for (sql, parameters) in statements {
        let args: Vec<serde_json::Value> = parameters.iter().map(arg).collect();
        steps.push(json!({
            "stmt": { "sql": sql, "args": args },
            "condition": { "type": "ok", "step": steps.len() - 1 },
        }));
    }
    let commit = steps.len();
    steps.push(json!({
        "stmt": { "sql": "COMMIT" },
        "condition": { "type": "ok", "step": commit - 1 },
    }));
    steps.push(json!({
        "stmt": { "sql": "ROLLBACK" },
        "condition": { "type": "not", "cond": { "type": "ok", "step": commit } },
    }));
    json!({
        "baton": null,
        "requests": [
            { "type": "batch", "batch": { "steps": steps } },
            { "type": "close" },
        ],
    })
    .to_string()
}

/// Whether a group commit's pipeline answer says its COMMIT step succeeded; else the message
/// of the first failed step (or of the request).
fn batch_outcome(text: &str) -> Result<(), String> {
    let answer: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("unreadable pipeline answer: {e}"))?;
    let first = &answer["results"][0];
    if first["type"] != "ok" {
        return Err(first["error"]["message"]
            .as_str()
            .unwrap_or("the batch request failed")
            .to_string());
    }
    let result = &first["response"]["result"];
    let results = result["step_results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // The COMMIT step is the one before the last (ROLLBACK).
    if results.len() >= 2 && !results[results.len() - 2].is_null() {
        return Ok(());
    }
    let errors = result["step_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Err(errors
        .iter()
        .find_map(|e| e["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "the batch did not commit".into()))
}

fn values(params: &[Param]) -> Vec<Value> {
    params
        .iter()
        .map(|p| match p {
            Param::Text(t) => Value::Text(t.clone()),
            Param::Int(n) => Value::Integer(*n),
            Param::Null => Value::Null,
        })
        .collect()
}

pub(crate) fn redact_all(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

impl Cells for libsql::Row {
    fn text(&self, i: usize) -> Option<String> {
        match self.get_value(i32::try_from(i).ok()?).ok()? {
            Value::Text(s) => Some(s),
            Value::Integer(n) => Some(n.to_string()),
            Value::Real(f) => Some(f.to_string()),
            Value::Blob(b) => String::from_utf8(b).ok(),
            Value::Null => None,
        }
    }

    fn int(&self, i: usize) -> Option<i64> {
        match self.get_value(i32::try_from(i).ok()?).ok()? {
            Value::Integer(n) => Some(n),
            Value::Real(f) => Some(f as i64),
            Value::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 14 item 3: the one-request commit's steps and how its answer is read.
    #[test]
    fn a_group_commit_is_one_conditional_batch() {
        let body: serde_json::Value =
            serde_json::from_str(&pipeline_body(&[("INSERT 1", "[1]".into())])).unwrap();
        let steps = body["requests"][0]["batch"]["steps"].as_array().unwrap();
        let sql: Vec<&str> = steps
            .iter()
            .map(|s| s["stmt"]["sql"].as_str().unwrap())
            .collect();
        assert_eq!(sql, ["BEGIN IMMEDIATE", "INSERT 1", "COMMIT", "ROLLBACK"]);
        assert_eq!(
            steps[1]["condition"],
            serde_json::json!({"type": "ok", "step": 0})
        );
        assert_eq!(
            steps[2]["condition"],
            serde_json::json!({"type": "ok", "step": 1})
        );
        assert_eq!(steps[3]["condition"]["cond"]["step"], 2);
        assert_eq!(body["requests"][1]["type"], "close");
        let ok = r#"{"results":[{"type":"ok","response":{"type":"batch","result":{"step_results":[{},{},{},null],"step_errors":[null,null,null,null]}}}]}"#;
        assert_eq!(batch_outcome(ok), Ok(()));
        let refused = r#"{"results":[{"type":"ok","response":{"type":"batch","result":{"step_results":[{},null,null,{}],"step_errors":[null,{"message":"keypooler_refused: budget"},null,null]}}}]}"#;
        assert_eq!(
            batch_outcome(refused),
            Err("keypooler_refused: budget".into())
        );
        assert_eq!(
            pipeline_url("libsql://db.example.io/?x=1"),
            "https://db.example.io/v3/pipeline?x=1"
        );
        assert_eq!(
            pipeline_url("http://127.0.0.1:9"),
            "http://127.0.0.1:9/v3/pipeline"
        );
    }

    #[test]
    fn a_background_write_binds_typed_values() {
        let body: serde_json::Value = serde_json::from_str(&pipeline_body_of(&[(
            "INSERT 2",
            vec![Param::Text("t".into()), Param::Int(-7), Param::Null],
        )]))
        .unwrap();
        let steps = &body["requests"][0]["batch"]["steps"];
        assert_eq!(
            steps[1]["stmt"]["args"],
            serde_json::json!([
                { "type": "text", "value": "t" },
                { "type": "integer", "value": "-7" },
                { "type": "null" },
            ])
        );
        assert_eq!(steps[2]["stmt"]["sql"], "COMMIT");
    }

    #[test]
    fn redaction_hides_the_url_and_token() {
        let secrets = vec!["https://db.example.io".to_string(), "tok-123".to_string()];
        let out = redact_all(
            "POST https://db.example.io/v3/pipeline with tok-123 failed",
            &secrets,
        );
        assert_eq!(out, "POST ***/v3/pipeline with *** failed");
        assert_eq!(host_of("libsql://db.example.io/x?y=1"), "db.example.io");
    }
}
