//! The embedded SQLite driver (sqlx): WAL, a busy timeout, and the shared SQL of `store::sql`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, SqlitePool};

use super::{sql, usage_event, Cells, SnapshotRows, StoreError, MIGRATIONS};
use crate::config::{Config, Synchronous};
use crate::model::{ConsumerRecord, KeyRecord, KeyUsageUpdate, Snapshot, TierRecord, UsageEvent};
use crate::timestamp::to_db;

#[derive(Clone)]
pub struct SqliteStore {
    /// Admin reads and writes (`DB_MAX_OPEN_CONNS` connections).
    pool: SqlitePool,
    /// The group commit's own connection, so an admin query never makes `/key` wait for one.
    writer: Arc<tokio::sync::Mutex<Option<sqlx::SqliteConnection>>>,
    checkpointer: Arc<Checkpointer>,
}

/// Copies the WAL back into the database file from its own connection and thread, so the
/// group commit never pays for a checkpoint (`wal_autocheckpoint` stays as a safety net).
struct Checkpointer {
    stop: tokio::sync::watch::Sender<bool>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A whole group commit in one statement text, prepared once.
static COMMIT_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; COMMIT",
        sql::INSERT_EVENTS,
        sql::UPDATE_COUNTERS
    )
});

/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL pages after which a commit checkpoints by itself (if the background one fell behind).
const AUTOCHECKPOINT_PAGES: &str = "20000";
/// SQLite page cache per connection, in KiB (negative = KiB in SQLite's convention).
const CACHE_SIZE: &str = "-16384";

impl Checkpointer {
    async fn start(options: &SqliteConnectOptions) -> Result<Checkpointer, StoreError> {
        let mut conn = options.connect().await.map_err(map_err)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                    _ = stopped.changed() => break,
                }
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut conn)
                    .await
                {
                    tracing::warn!(error = %e, "background WAL checkpoint failed; commits will checkpoint themselves");
                }
            }
            let _ = sqlx::Connection::close(conn).await;
        });
        Ok(Checkpointer {
            stop,
            task: parking_lot::Mutex::new(Some(task)),
        })
    }

    async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
        // SQLITE_BUSY, SQLITE_LOCKED and their extended codes: another writer held the file too long.
        sqlx::Error::Database(db)
            if matches!(
                db.code().as_deref(),
                Some("5" | "6" | "261" | "262" | "517")
            ) =>
        {
            StoreError::Unavailable(db.message().to_string())
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::RowNotFound => StoreError::NotFound,
        _ => StoreError::Other(e.to_string()),
    }
}

async fn insert_features(
    tx: &mut sqlx::SqliteConnection,
    tier: &TierRecord,
) -> Result<(), StoreError> {
    for (feature, limit) in &tier.features {
        sqlx::query(sql::INSERT_TIER_FEATURE)
            .bind(&tier.id)
            .bind(feature)
            .bind(limit.rate_limit)
            .bind(limit.window_seconds)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

impl Cells for SqliteRow {
    fn text(&self, i: usize) -> Option<String> {
        self.try_get_unchecked::<Option<String>, _>(i)
            .ok()
            .flatten()
    }

    fn int(&self, i: usize) -> Option<i64> {
        self.try_get_unchecked::<Option<i64>, _>(i).ok().flatten()
    }
}

impl SqliteStore {
    /// Opens (creating the file and its folder if missing) and migrates.
    pub async fn open(path: &Path, config: &Config) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot create the data folder {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.db_synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(config.db_busy_timeout)
            // SPEC §3: foreign keys are not enforced; deletes remove children explicitly.
            .foreign_keys(false)
            .statement_cache_capacity(512)
            .pragma("cache_size", CACHE_SIZE)
            .pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.db_max_open_conns)
            .min_connections(1)
            // A local file has no connection to lose; skip the ping sqlx makes per acquire.
            .test_before_acquire(false)
            .acquire_timeout(
                config
                    .db_busy_timeout
                    .max(std::time::Duration::from_secs(1)),
            )
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let checkpointer = Arc::new(Checkpointer::start(&options).await?);
        let writer = options.connect().await.map_err(map_err)?;
        let store = SqliteStore {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(Some(writer))),
            checkpointer,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the embedded migrations not yet recorded in `schema_migrations`. A Go database
    /// already records version 1, so its tables are adopted untouched.
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(sql::CREATE_MIGRATIONS_TABLE)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let applied: Vec<i64> = sqlx::query_scalar(sql::APPLIED_VERSIONS)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        for (version, name, body) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let mut tx = self.pool.begin().await.map_err(map_err)?;
            sqlx::raw_sql(body)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            sqlx::query(sql::RECORD_MIGRATION)
                .bind(version)
                .bind(name)
                .bind(to_db(chrono::Utc::now()))
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            tracing::info!(version, name, "applied migration");
        }
        Ok(())
    }

    pub async fn load_snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut rows = SnapshotRows::default();
        for (query, keep) in SnapshotRows::READS {
            for r in sqlx::query(query)
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?
            {
                keep(&mut rows, &r);
            }
        }
        Ok(rows.assemble())
    }

    pub async fn create_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(sql::INSERT_TIER)
            .bind(&tier.id)
            .bind(&tier.name)
            .bind(&tier.description)
            .bind(to_db(chrono::Utc::now()))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_features(&mut tx, tier).await?;
        tx.commit().await.map_err(map_err)
    }

    pub async fn update_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let updated = sqlx::query(sql::UPDATE_TIER)
            .bind(&tier.description)
            .bind(&tier.id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        sqlx::query(sql::DELETE_TIER_FEATURES)
            .bind(&tier.id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_features(&mut tx, tier).await?;
        tx.commit().await.map_err(map_err)
    }

    pub async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(sql::INSERT_KEY)
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.sealed_value)
            .bind(&key.tier_id)
            .bind(i64::from(key.is_active))
            .bind(key.expires_at.map(to_db))
            .bind(key.usage_limit)
            .bind(key.usage_count)
            .bind(key.usage_window_seconds)
            .bind(key.usage_window_start.map(to_db))
            .bind(&key.metadata_json)
            .bind(key.created_at.map(to_db))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        for (name, value) in &key.secrets {
            sqlx::query(sql::INSERT_KEY_SECRET)
                .bind(&key.id)
                .bind(name)
                .bind(value)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    pub async fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        self.delete_with_children(sql::DELETE_KEY, sql::DELETE_KEY_SECRETS, id)
            .await
    }

    pub async fn create_consumer(&self, c: &ConsumerRecord) -> Result<(), StoreError> {
        sqlx::query(sql::INSERT_CONSUMER)
            .bind(&c.id)
            .bind(&c.name)
            .bind(&c.token_hash)
            .bind(&c.description)
            .bind(i64::from(c.is_active))
            .bind(to_db(chrono::Utc::now()))
            .execute(&self.pool)
            .await
            .map_err(map_err)
            .map(|_| ())
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
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(children)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let deleted = sqlx::query(parent)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if deleted.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await.map_err(map_err)
    }

    pub async fn grant_scope(&self, consumer_id: &str, tier_id: &str) -> Result<(), StoreError> {
        sqlx::query(sql::INSERT_SCOPE)
            .bind(consumer_id)
            .bind(tier_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)
            .map(|_| ())
    }

    pub async fn recent_usage(&self, limit: i64) -> Result<Vec<UsageEvent>, StoreError> {
        let rows = sqlx::query(sql::RECENT_USAGE)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| usage_event(r)).collect())
    }

    /// One round trip to the SQLite worker thread: `BEGIN IMMEDIATE; INSERT …; UPDATE …; COMMIT`
    /// as one multi-statement query whose two bound values (the batch as JSON) run across its
    /// statements in order. On any failure the open transaction is rolled back.
    pub async fn commit_serves(
        &self,
        events: &[UsageEvent],
        updates: &[KeyUsageUpdate],
    ) -> Result<(), StoreError> {
        let (events_json, updates_json) = sql::batch_parameters(events, updates);
        let query = sqlx::query(COMMIT_BATCH.as_str())
            .bind(events_json)
            .bind(updates_json);
        let mut writer = self.writer.lock().await;
        let conn = writer
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("the database is closed".into()))?;
        match query.execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Whichever statement failed, nothing of the batch may stay applied.
                if let Err(rollback) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                    tracing::debug!(error = %rollback, "rollback after a failed commit (no transaction was open)");
                }
                Err(map_err(e))
            }
        }
    }

    pub async fn close(&self) {
        self.checkpointer.shutdown().await;
        if let Some(writer) = self.writer.lock().await.take() {
            let _ = sqlx::Connection::close(writer).await;
        }
        self.pool.close().await;
    }

    /// Runs `reads`, each binding `id`, in one read transaction (one consistent snapshot).
    pub async fn read_by_id(
        &self,
        reads: &[super::SnapshotRead],
        id: &str,
    ) -> Result<Snapshot, StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let mut rows = SnapshotRows::default();
        for (query, keep) in reads {
            for r in sqlx::query(query)
                .bind(id)
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?
            {
                keep(&mut rows, &r);
            }
        }
        Ok(rows.assemble())
    }
}
