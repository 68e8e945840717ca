//! The embedded SQLite driver (sqlx): WAL, a busy timeout, and the shared SQL of `store::sql`.

use std::path::Path;
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, Sqlite, SqliteConnection, SqlitePool};

use super::{
    key_health, prune_candidate, rollup_row, sql, summary_row, usage_event, Batch, Cells, Param,
    SnapshotRows, StoreError, SummaryRow, MIGRATIONS,
};
use crate::config::{Config, Synchronous};
use crate::model::{ConsumerRecord, KeyRecord, OutcomeWrite, Snapshot, TierRecord, UsageEvent};
use crate::pool::health::HealthRecord;
use crate::timestamp::to_db;

#[derive(Clone)]
pub struct SqliteStore {
    /// Admin reads and writes (`DB_MAX_OPEN_CONNS` connections).
    pool: SqlitePool,
    /// The group commit's own connection, so an admin query never makes `/key` wait for one.
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// To reopen the writer.
    options: Arc<SqliteConnectOptions>,
    /// The rowid of each rate window's row the fast commit has written (`WindowRows`).
    window_rows: Arc<std::sync::Mutex<WindowRows>>,
    /// Checkpoints the WAL beside the group commit (`checkpoint_behind`).
    checkpoints: Arc<Checkpoints>,
    /// Commits batches of outcome reports in place (`Inline`); `None` with `DB_SYNCHRONOUS=FULL`.
    inline: Option<Arc<Inline>>,
}

/// The group commit's in-place connection, for batches of outcome reports alone — the common
/// batch under report load. sqlx runs every statement on a worker thread of its own: a commit
/// hops there and back, and its results wake the ledger once per statement. A report batch's
/// commit is a few small UPDATEs (tens of µs with `synchronous=NORMAL`, which syncs nothing), so
/// running it right on the ledger's task, through rusqlite on the same bundled SQLite, spares
/// every batch those wake-ups: outcome reports +10–38 % (README, Benchmarks). It never waits:
/// its busy timeout is zero, and a batch that finds the write lock held (an admin write, another
/// replica) or cannot open this connection goes the usual way (`on_writer`), which waits for the
/// lock on sqlx's thread. With `DB_SYNCHRONOUS=FULL` a commit syncs the disk, which must not
/// happen on a request thread: every batch goes the usual way. Used only while holding the
/// writer's lock, so group commits stay one at a time.
struct Inline {
    path: std::path::PathBuf,
    conn: parking_lot::Mutex<Option<InlineConn>>,
}

struct InlineConn {
    conn: rusqlite::Connection,
    /// When it last gave its page cache back (`SHRINK_EVERY`).
    shrunk: std::time::Instant,
}

/// How often the in-place connection gives back its page cache (`PRAGMA shrink_memory`).
/// Measured: its cache grew past its `cache_size` to 18–30 MiB under `bench/bench.py`'s report
/// load (`SQLITE_DBSTATUS_CACHE_USED`, with `cache_size` reading back −2048). The cause (found
/// with uprobes on SQLite's page cache, eleventh session): libsqlite3-sys builds the bundled
/// SQLite with `SQLITE_ENABLE_MEMORY_MANAGEMENT`, so every connection of the process shares one
/// page-cache group, bounded by the sum of their `cache_size`s; the busiest connection, this one,
/// recycles the idle connections' pages into its own cache (about 3 pages a millisecond here,
/// every page recyclable). So nothing leaks, but this connection's share is bounded only by the
/// group's. Refilling what it needs once a second costs a few reads from the OS's cache.
const SHRINK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Inline {
    fn open(&self) -> rusqlite::Result<InlineConn> {
        use rusqlite::OpenFlags;
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::ZERO)?;
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; \
             PRAGMA cache_size = {INLINE_CACHE_SIZE}; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}; \
             PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES};"
        ))?;
        Ok(InlineConn {
            conn,
            shrunk: std::time::Instant::now(),
        })
    }

    /// Commits `outcomes` in place, one `SET_OUTCOME` per report with its values bound (no JSON
    /// to build and parse, as `SET_OUTCOMES` needs on sqlx's path); `None` when the batch must go
    /// the usual way: the write lock is held elsewhere, or this connection cannot be opened.
    /// Nothing of a batch it hands back was stored (a failed transaction is rolled back; a
    /// connection left inside one is dropped, which rolls it back).
    fn commit(&self, outcomes: &[OutcomeWrite]) -> Option<Result<(), StoreError>> {
        let mut slot = self.conn.lock();
        if slot.is_none() {
            match self.open() {
                Ok(conn) => *slot = Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the in-place commit connection; report batches take sqlx's");
                    return None;
                }
            }
        }
        let open = slot.as_mut()?;
        let conn = &open.conn;
        let done = (|| {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let mut set = conn.prepare_cached(sql::SET_OUTCOME)?;
            for o in outcomes {
                set.execute(rusqlite::params![
                    o.serve_id,
                    o.class,
                    o.status,
                    to_db(o.reported_at)
                ])?;
            }
            conn.prepare_cached("COMMIT")?.execute([])
        })();
        let Err(e) = done else {
            if open.shrunk.elapsed() >= SHRINK_EVERY {
                open.shrunk = std::time::Instant::now();
                if let Err(e) = open.conn.execute_batch("PRAGMA shrink_memory") {
                    tracing::debug!(error = %e, "shrink_memory failed");
                }
            }
            return Some(Ok(()));
        };
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let code = e.sqlite_error().map(|f| i64::from(f.extended_code));
        if !conn.is_autocommit() {
            tracing::warn!(
                "closing the in-place commit connection: its transaction could not be ended"
            );
            *slot = None;
        } else if code.is_some_and(busy_code) {
            return None;
        }
        let message = e.to_string();
        Some(Err(
            classify(&message, code).unwrap_or(StoreError::Other(message))
        ))
    }
}

/// The background checkpointer's controls: woken after each commit, stopped by `close`.
#[derive(Default)]
struct Checkpoints {
    wake: tokio::sync::Notify,
    stop: std::sync::atomic::AtomicBool,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Checkpoints {
    /// After any commit: the checkpointer looks at the WAL (`checkpoint_behind`).
    fn committed(&self) {
        self.wake.notify_one();
    }
}

/// Copies the WAL back into the database on a connection of its own, so the group commit's
/// connection never waits on a checkpoint's copying and `fsync`s (a commit itself does not
/// sync with `synchronous=NORMAL`). Each round, at most one per `CHECKPOINT_GAP` after a
/// commit, is a PASSIVE checkpoint running beside the commits. The WAL starts over only when a
/// commit begins with every frame copied back, which a checkpoint beside a busy writer never
/// reaches on its own; so once the WAL holds `RESTART_FRAMES`, the round copies what is left
/// in two steps — again beside the commits, then the few frames written meanwhile while it
/// holds the writer's lock — and the next commit writes the WAL from its start. A commit thus
/// waits only for that last small step, not for the whole copy and its two full `fsync`s (on
/// this project's machines ~4 ms each time, every ~2 MiB of WAL under load). Should this task
/// fall behind or fail, the connections' own `wal_autocheckpoint` (`AUTOCHECKPOINT_PAGES`)
/// still bounds the WAL. Errors are logged and the next round tries again (reconnecting).
async fn checkpoint_behind(
    options: Arc<SqliteConnectOptions>,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    checkpoints: Arc<Checkpoints>,
) {
    use std::sync::atomic::Ordering;
    let mut conn: Option<SqliteConnection> = None;
    // Logged at warn once per run of failures (a full disk fails every round), then at debug.
    let mut failing = false;
    while !checkpoints.stop.load(Ordering::Acquire) {
        checkpoints.wake.notified().await;
        tokio::time::sleep(CHECKPOINT_GAP).await;
        if checkpoints.stop.load(Ordering::Acquire) {
            break;
        }
        let done = async {
            let c = match conn.take() {
                Some(c) => c,
                None => options.connect().await?,
            };
            let c = conn.insert(c);
            let frames = passive_checkpoint(c).await?;
            if frames >= RESTART_FRAMES {
                passive_checkpoint(c).await?;
                let writer = writer.lock().await;
                if !matches!(*writer, Writer::Closed) {
                    passive_checkpoint(c).await?;
                }
            }
            Ok::<_, sqlx::Error>(())
        };
        match done.await {
            Ok(()) if std::mem::replace(&mut failing, false) => {
                tracing::info!("background checkpoint works again");
            }
            Ok(()) => {}
            Err(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %e, "background checkpoint failed again");
                } else {
                    tracing::warn!(error = %e, "background checkpoint failed; trying again after the next commit (the commits' own checkpoints bound the WAL meanwhile)");
                }
                if let Some(lost) = conn.take() {
                    let _ = sqlx::Connection::close(lost).await;
                }
            }
        }
    }
    if let Some(c) = conn {
        let _ = sqlx::Connection::close(c).await;
    }
}

/// One PASSIVE checkpoint (never waits for a lock); the WAL's length in frames when it ran.
async fn passive_checkpoint(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    let (_busy, log, _copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut *conn)
        .await?;
    Ok(log)
}

/// Rowids of `window_counts` rows by key id, then (feature, window length): the fast group
/// commit updates a known row by its rowid (`sql::UPDATE_WINDOWS_BY_ROW`) and learns the
/// others' from its upsert's RETURNING rows. Facts about the file, valid across a reopened
/// writer and other processes' commits, until a row goes (with its key) or a VACUUM renumbers
/// rows: the by-rowid update then misses, the commit aborts and this map starts over.
#[derive(Default)]
struct WindowRows {
    by_key: std::collections::HashMap<String, Vec<(String, i64, i64)>>,
    len: usize,
}

/// Rows `WindowRows` keeps before it starts over (~100 bytes each; a pool's windows are
/// keys × features × windows, and keys deleted since leave theirs behind until then).
const WINDOW_ROWS_KEPT: usize = 262_144;

impl WindowRows {
    fn get(&self, w: &super::WindowDelta) -> Option<i64> {
        self.by_key.get(w.key_id.as_str()).and_then(|slots| {
            slots
                .iter()
                .find(|(feature, seconds, _)| *feature == w.feature && *seconds == w.window_seconds)
                .map(|(_, _, row)| *row)
        })
    }

    fn learn(&mut self, key_id: String, feature: String, window_seconds: i64, row: i64) {
        if self.len >= WINDOW_ROWS_KEPT {
            *self = WindowRows::default();
        }
        let slots = self.by_key.entry(key_id).or_default();
        match slots
            .iter_mut()
            .find(|(f, seconds, _)| *f == feature && *seconds == window_seconds)
        {
            Some(slot) => slot.2 = row,
            None => {
                slots.push((feature, window_seconds, row));
                self.len += 1;
            }
        }
    }
}

enum Writer {
    Open(SqliteConnection),
    /// Closed after a failure left its transaction state unknown; the next commit reopens it.
    Lost,
    Closed,
}

/// An admin write: `BEGIN IMMEDIATE … COMMIT` sent as plain SQL on a pool connection, never
/// through sqlx's transactions, whose bookkeeping goes wrong when SQLite itself rolls back (a
/// COMMIT failing on a full disk): sqlx still counts the transaction as open, turns the next
/// BEGIN into a SAVEPOINT and its commit into a RELEASE of a nested savepoint, so a later
/// write answered 201 sat uncommitted in an open transaction holding the write lock.
/// Guarantee: the connection goes back to the pool only when it is known to be outside any
/// transaction; otherwise (or if this is dropped midway) it is closed and the pool opens another.
struct WriteTx {
    conn: PoolConnection<Sqlite>,
    /// Not yet known to be outside a transaction.
    open: bool,
    /// Woken after the commit, as after a group commit (`checkpoint_behind`).
    checkpoints: Arc<Checkpoints>,
}

impl WriteTx {
    async fn begin(
        pool: &SqlitePool,
        checkpoints: &Arc<Checkpoints>,
    ) -> Result<WriteTx, StoreError> {
        let conn = pool.acquire().await.map_err(map_err)?;
        let mut tx = WriteTx {
            conn,
            open: true,
            checkpoints: checkpoints.clone(),
        };
        match sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx.conn).await {
            Ok(_) => Ok(tx),
            Err(e) => Err(tx.abort(e).await),
        }
    }

    fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Commits if `outcome` is Ok, else rolls back; a failed COMMIT is rolled back too.
    async fn finish<T>(mut self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        let value = match outcome {
            Ok(value) => value,
            Err(e) => {
                self.open = !settle(&mut self.conn).await;
                return Err(e);
            }
        };
        match sqlx::query("COMMIT").execute(&mut *self.conn).await {
            Ok(_) => {
                self.open = false;
                self.checkpoints.committed();
                Ok(value)
            }
            Err(e) => Err(self.abort(e).await),
        }
    }

    async fn abort(mut self, e: sqlx::Error) -> StoreError {
        self.open = !settle(&mut self.conn).await;
        map_err(e)
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open {
            tracing::warn!(
                "closing an admin database connection whose transaction could not be ended"
            );
            self.conn.close_on_drop();
        }
    }
}

/// How long opening the file is retried while another process holds it (at least).
const OPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// SQLITE_BUSY or SQLITE_LOCKED (primary codes 5 and 6, extended codes keep them in the low byte).
fn is_busy(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(busy_code)
}

/// BUSY or LOCKED (primary result codes, the low byte of an extended one): another writer
/// holds the file.
fn busy_code(code: i64) -> bool {
    matches!(code & 0xff, 5 | 6)
}

/// A database error that is a refusal (migration 012's guards) or that the database cannot
/// take a write now but may later (`map_err`), from its message and result code; `None` for
/// any other. Shared by sqlx's errors and the in-place connection's (`Inline`).
fn classify(message: &str, code: Option<i64>) -> Option<StoreError> {
    // Busy (`busy_code`: another writer held the file too long), or the primary result codes
    // IOERR, FULL (the disk) and CANTOPEN (a journal or index file that cannot be created).
    // SQLite rolls back what failed, so nothing was stored: 503.
    if message.contains(super::REFUSED) {
        Some(StoreError::Refused(message.to_string()))
    } else if code.is_some_and(|c| busy_code(c) || matches!(c & 0xff, 10 | 13 | 14)) {
        Some(StoreError::Unavailable(message.to_string()))
    } else {
        None
    }
}

/// Ends whatever transaction `conn` may be in; true when it is then known to be in autocommit
/// mode. SQLite rolls back by itself after some failures (a COMMIT on a full disk), so a failed
/// ROLLBACK is followed by a plain BEGIN, which succeeds only outside a transaction and takes
/// no lock, and is ended at once.
async fn settle(conn: &mut SqliteConnection) -> bool {
    if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_ok() {
        return true;
    }
    sqlx::query("BEGIN").execute(&mut *conn).await.is_ok()
        && sqlx::query("ROLLBACK").execute(&mut *conn).await.is_ok()
}

/// A batch's deltas (see `sql::delta_parameters`): the fast path's update for budgets, the
/// triggers' view, then the same for windows — four parameters. The fast path needs no guard
/// statement: migration 014 refuses a count past its limit where it is written.
static DELTAS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    [
        sql::UPDATE_USAGE,
        sql::INSERT_USAGE_DELTAS,
        sql::UPSERT_WINDOWS,
        sql::INSERT_WINDOW_DELTAS,
    ]
    .join("; ")
});

/// A whole group commit in one statement text, prepared once. The delta statements may be
/// refused by migration 012's triggers (`StoreError::Refused`); `on_writer` then rolls back.
static COMMIT_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; COMMIT",
        sql::INSERT_EVENTS,
        *DELTAS
    )
});

/// The common group commit (issue 14 item 5): serves only, each key and each window once, all
/// stored keys — every delta takes the fast path, so the two trigger statements (whose arrays
/// would be empty, yet each still opens its view) are left out. The same guards refuse it.
/// Its rows are bound as flat column arrays (`sql::fast_columns`, `?1`–`?13`, and
/// `sql::window_row_columns`, `?14`–`?17`): sqlx binds a numbered parameter by its number across
/// the whole text (and the lower numbers a statement leaves unused to arguments it does not
/// read). Windows whose row the store knows are updated by rowid; `COMMIT_FAST_LEARN` also
/// upserts the others and answers their rowids.
static COMMIT_FAST: std::sync::LazyLock<(String, usize)> = std::sync::LazyLock::new(|| {
    fast_text(&[
        sql::INSERT_EVENTS_COLUMNS,
        sql::UPDATE_USAGE_COLUMNS,
        sql::UPDATE_WINDOWS_BY_ROW,
        sql::WINDOW_ROWS_MISSED,
    ])
});
static COMMIT_FAST_LEARN: std::sync::LazyLock<(String, usize)> = std::sync::LazyLock::new(|| {
    fast_text(&[
        sql::INSERT_EVENTS_COLUMNS,
        sql::UPDATE_USAGE_COLUMNS,
        sql::UPDATE_WINDOWS_BY_ROW,
        sql::WINDOW_ROWS_MISSED,
        sql::UPSERT_WINDOWS_COLUMNS_RETURNING,
    ])
});

/// `statements` in one transaction, with the number of arguments to bind (`arguments_reached`).
fn fast_text(statements: &[&str]) -> (String, usize) {
    let text = [&["BEGIN IMMEDIATE"], statements, &["COMMIT"]]
        .concat()
        .join("; ");
    let reached = arguments_reached(&text);
    (text, reached)
}

/// How many arguments sqlx reaches binding `text`, whose statements use numbered parameters
/// only: it binds a statement's unused lower numbers to consecutive arguments, continuing
/// from where the statements before left off, and stops binding (leaving the rest NULL) at
/// the first number past the last argument. The fast texts are padded with NULLs up to it.
fn arguments_reached(text: &str) -> usize {
    let (mut taken, mut reached) = (0, 0);
    for statement in text.split(';') {
        let mut numbers = std::collections::BTreeSet::new();
        let mut rest = statement;
        while let Some(at) = rest.find('?') {
            rest = &rest[at + 1..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if let Ok(n) = rest[..digits].parse::<usize>() {
                numbers.insert(n);
            }
        }
        let Some(&highest) = numbers.last() else {
            continue;
        };
        let unused = highest - numbers.len();
        reached = reached.max(highest).max(taken + unused);
        taken += unused;
    }
    reached
}

/// A group commit that also records outcomes and health changes (serves-only batches keep
/// the shorter text above, so the hot path runs no extra statement).
static COMMIT_WITH_HEALTH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; {}; {}; {}; {}; COMMIT",
        sql::INSERT_EVENTS,
        *DELTAS,
        sql::SET_OUTCOMES,
        sql::UPSERT_HEALTH,
        sql::SET_ACTIVE,
        sql::UPSERT_TIER_HEALTH
    )
});

/// A group commit of outcome reports alone (no serve, no health change, no tier cooldown):
/// the common batch under report load runs one statement, not the whole list above
/// (each of which opens its table and indexes even when its array is empty).
static COMMIT_OUTCOMES: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("BEGIN IMMEDIATE; {}; COMMIT", sql::SET_OUTCOMES));

/// A group commit of reports and health changes without serves.
static COMMIT_REPORTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; {}; {}; COMMIT",
        sql::SET_OUTCOMES,
        sql::UPSERT_HEALTH,
        sql::SET_ACTIVE,
        sql::UPSERT_TIER_HEALTH
    )
});

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// A batch's serves as bound parameters: audit rows, then (see `sql::delta_parameters`) fast
/// and trigger budget deltas, fast and trigger window deltas.
struct Serves {
    events: String,
    fast: String,
    slow: String,
    fast_w: String,
    slow_w: String,
}

impl Serves {
    fn of(batch: &Batch<'_>) -> Serves {
        let (events, _) = sql::batch_parameters(batch.events, &[]);
        let (fast, slow, fast_w, slow_w) = sql::delta_parameters(batch.usage, batch.windows);
        Serves {
            events,
            fast,
            slow,
            fast_w,
            slow_w,
        }
    }

    /// Binds every parameter, in the order `COMMIT_BATCH` and `COMMIT_WITH_HEALTH` start with.
    fn bind<'q>(self, query: Query<'q>) -> Query<'q> {
        query
            .bind(self.events)
            .bind(self.fast)
            .bind(self.slow)
            .bind(self.fast_w)
            .bind(self.slow_w)
    }
}

/// Binds a batch's outcomes, health records (twice: `UPSERT_HEALTH`, `SET_ACTIVE`) and tier
/// cooldowns, in the order `COMMIT_REPORTS` and `COMMIT_WITH_HEALTH` end with.
fn bind_health<'q>(query: Query<'q>, batch: &Batch<'_>) -> Query<'q> {
    let (outcomes_json, health_json) = sql::health_parameters(batch.outcomes, batch.health);
    query
        .bind(outcomes_json)
        .bind(health_json.clone())
        .bind(health_json)
        .bind(sql::tier_parameter(batch.tiers))
}

/// A day's rollup in one transaction (see `sql::DELETE_ROLLUP_DAY`).
static WRITE_ROLLUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; {}; COMMIT",
        sql::DELETE_ROLLUP_DAY,
        sql::INSERT_ROLLUP,
        sql::SET_ROLLUP_THROUGH
    )
});

/// One prune batch in one transaction (see `sql::PRUNE_ROWS`).
static PRUNE_ROWS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; {}; COMMIT",
        sql::PRUNE_BY_KEY,
        sql::PRUNE_BY_CONSUMER,
        sql::PRUNE_ROWS
    )
});

/// One side-index fill in one transaction (see `sql::INDEX_BY_KEY`).
static WRITE_INDEX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "BEGIN IMMEDIATE; {}; {}; {}; COMMIT",
        sql::INDEX_BY_KEY,
        sql::INDEX_BY_CONSUMER,
        sql::SET_INDEXED_THROUGH
    )
});

/// WAL pages (4 KiB) after which a committing connection checkpoints (PASSIVE) right after
/// its commit: the bound that holds even if the background checkpointer (`checkpoint_behind`)
/// falls behind or fails (8 MiB). It normally never fires: that task has the WAL start over at
/// `RESTART_FRAMES` (2 MiB). Either way the WAL stays inside the first 32 KiB of the `-shm`
/// index (4,062 frames), which so never needs to grow on a full disk. (History: a checkpointer of its
/// own alone never let the WAL start over under steady load — commits kept appending while it
/// copied — and the WAL grew to 80 MB; the committer alone stalled every commit behind each
/// copy and its `fsync`s.)
const AUTOCHECKPOINT_PAGES: &str = "2048";
/// WAL frames from which the background checkpointer has the WAL start over (2 MiB; under
/// load commits add ~100–300 frames while it catches up, so the WAL peaks near 2–3.5 MiB).
const RESTART_FRAMES: i64 = 512;
/// How long the background checkpointer lets commits gather after one woke it.
const CHECKPOINT_GAP: std::time::Duration = std::time::Duration::from_millis(5);
/// Size a larger WAL file (after a big transaction) is cut back to when it starts over
/// (`journal_size_limit`, bytes); a WAL within it is reused in place.
const WAL_SIZE_LIMIT: &str = "4194304";
/// SQLite page cache per connection, in KiB (negative = KiB in SQLite's convention).
const CACHE_SIZE: &str = "-16384";
/// The in-place commit connection's page cache (`Inline`), in KiB as above: it only updates
/// audit rows, whose pages it need not keep (see also `SHRINK_EVERY`).
const INLINE_CACHE_SIZE: &str = "-2048";

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i64>().ok());
            classify(db.message(), code).unwrap_or_else(|| match db.is_unique_violation() {
                true => StoreError::Conflict,
                false => StoreError::Other(e.to_string()),
            })
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::RowNotFound => StoreError::NotFound,
        _ => StoreError::Other(e.to_string()),
    }
}

/// Each feature's first window as its Go row, the others as `feature_windows` rows.
async fn insert_features(tx: &mut SqliteConnection, tier: &TierRecord) -> Result<(), StoreError> {
    for (feature, windows) in &tier.features {
        for (position, limit) in windows.iter().enumerate() {
            let query = if position == 0 {
                sqlx::query(sql::INSERT_TIER_FEATURE)
            } else {
                sqlx::query(sql::INSERT_FEATURE_WINDOW)
            };
            let query = query
                .bind(&tier.id)
                .bind(feature)
                .bind(limit.rate_limit)
                .bind(limit.window_seconds);
            let query = if position == 0 {
                query
            } else {
                query.bind(position as i64)
            };
            query.execute(&mut *tx).await.map_err(map_err)?;
        }
    }
    for (text, params) in super::regbot::tier_source_statements(tier) {
        bind(sqlx::query(text), &params)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

/// The tier's upstream row (SPEC §8.6), replaced by what `tier` holds.
async fn write_upstream(tx: &mut SqliteConnection, tier: &TierRecord) -> Result<(), StoreError> {
    for (statement, params) in super::upstream_statements(tier) {
        bind(sqlx::query(statement), &params)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

fn bind<'q>(
    mut query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    params: &'q [Param],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for p in params {
        query = match p {
            Param::Text(t) => query.bind(t.as_str()),
            Param::Int(n) => query.bind(*n),
            Param::Null => query.bind(None::<&str>),
        };
    }
    query
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
            .pragma("journal_size_limit", WAL_SIZE_LIMIT)
            .pragma("wal_autocheckpoint", AUTOCHECKPOINT_PAGES);
        // Replicas starting at the same moment on a fresh file (SPEC §8.7) contend while the
        // first turns it to WAL; SQLite answers that without waiting on the busy timeout, so
        // opening (idempotent) is retried for a bounded time.
        let patience = std::time::Instant::now() + config.db_busy_timeout.max(OPEN_PATIENCE);
        let (pool, writer) = loop {
            match Self::connect(&options, config).await {
                Err(e) if is_busy(&e) && std::time::Instant::now() < patience => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot open {}: {e}",
                        path.display()
                    )))
                }
                Ok(opened) => break opened,
            }
        };
        let store = SqliteStore {
            pool,
            writer: Arc::new(tokio::sync::Mutex::new(Writer::Open(writer))),
            options: Arc::new(options),
            window_rows: Arc::default(),
            checkpoints: Arc::default(),
            inline: matches!(config.db_synchronous, Synchronous::Normal).then(|| {
                Arc::new(Inline {
                    path: path.to_path_buf(),
                    conn: parking_lot::Mutex::new(None),
                })
            }),
        };
        store.migrate().await?;
        let task = tokio::spawn(checkpoint_behind(
            store.options.clone(),
            store.writer.clone(),
            store.checkpoints.clone(),
        ));
        *store.checkpoints.task.lock() = Some(task);
        Ok(store)
    }

    /// An admin write transaction on a pool connection (`WriteTx`).
    async fn write_tx(&self) -> Result<WriteTx, StoreError> {
        WriteTx::begin(&self.pool, &self.checkpoints).await
    }

    /// The pool and the group commit's own connection.
    async fn connect(
        options: &SqliteConnectOptions,
        config: &Config,
    ) -> Result<(SqlitePool, SqliteConnection), sqlx::Error> {
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
            .await?;
        match options.connect().await {
            Ok(writer) => Ok((pool, writer)),
            Err(e) => {
                pool.close().await;
                Err(e)
            }
        }
    }

    /// Applies the embedded migrations not yet recorded in `schema_migrations`. A Go database
    /// already records version 1, so its tables are adopted untouched.
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(sql::CREATE_MIGRATIONS_TABLE)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let applied = self.applied_versions().await?;
        for (version, name, body) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            // The bookkeeping row goes first: a replica starting at the same moment that
            // applied this migration already makes the INSERT fail, so no body runs twice.
            let mut tx = self.write_tx().await?;
            let outcome = async {
                sqlx::query(sql::RECORD_MIGRATION)
                    .bind(version)
                    .bind(name)
                    .bind(to_db(chrono::Utc::now()))
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
                sqlx::raw_sql(body)
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)
            }
            .await;
            match tx.finish(outcome).await {
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
        sqlx::query_scalar(sql::APPLIED_VERSIONS)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)
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
        let mut tx = self.write_tx().await?;
        let outcome = async {
            sqlx::query(sql::INSERT_TIER)
                .bind(&tier.id)
                .bind(&tier.name)
                .bind(&tier.description)
                .bind(to_db(chrono::Utc::now()))
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            insert_features(tx.conn(), tier).await?;
            write_upstream(tx.conn(), tier).await
        }
        .await;
        tx.finish(outcome).await
    }

    pub async fn update_tier(&self, tier: &TierRecord) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let outcome = async {
            let updated = sqlx::query(sql::UPDATE_TIER)
                .bind(&tier.name)
                .bind(&tier.description)
                .bind(&tier.id)
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            if updated.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            for delete in [sql::DELETE_TIER_FEATURES, sql::DELETE_FEATURE_WINDOWS] {
                sqlx::query(delete)
                    .bind(&tier.id)
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
            }
            insert_features(tx.conn(), tier).await?;
            write_upstream(tx.conn(), tier).await
        }
        .await;
        tx.finish(outcome).await
    }

    pub async fn create_key(
        &self,
        key: &KeyRecord,
        value_hash: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let outcome = async {
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
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            if let Some(hash) = value_hash {
                sqlx::query(sql::SET_VALUE_HASH)
                    .bind(hash)
                    .bind(&key.id)
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
            }
            for (name, value) in &key.secrets {
                sqlx::query(sql::INSERT_KEY_SECRET)
                    .bind(&key.id)
                    .bind(name)
                    .bind(value)
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
            }
            Ok(())
        }
        .await;
        tx.finish(outcome).await
    }

    pub async fn select(
        &self,
        statement: &str,
        params: &[Param],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        let rows = bind(sqlx::query(statement), params)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows
            .iter()
            .map(|r| (0..r.len()).map(|i| r.text(i)).collect())
            .collect())
    }

    pub async fn write_all(
        &self,
        statements: &[(&str, Vec<Param>)],
        expect: &[Option<u64>],
        _scale: u32,
    ) -> Result<Vec<u64>, StoreError> {
        // Locally `DB_BUSY_TIMEOUT_MS` bounds only waiting for the lock, whatever the size.
        self.transaction(statements, |i, affected| {
            match expect.get(i).copied().flatten() {
                Some(n) if n != affected => Err(StoreError::Conflict),
                _ => Ok(()),
            }
        })
        .await
    }

    /// Runs `statements` in one write transaction; `check` sees each one's affected-row count
    /// and may refuse it (rolling everything back). Answers the counts.
    async fn transaction(
        &self,
        statements: &[(&str, Vec<Param>)],
        check: impl Fn(usize, u64) -> Result<(), StoreError>,
    ) -> Result<Vec<u64>, StoreError> {
        let mut tx = self.write_tx().await?;
        let outcome = async {
            let mut counts = Vec::with_capacity(statements.len());
            for (i, (statement, params)) in statements.iter().enumerate() {
                let done = bind(sqlx::query(statement), params)
                    .execute(tx.conn())
                    .await
                    .map_err(map_err)?;
                check(i, done.rows_affected())?;
                counts.push(done.rows_affected());
            }
            Ok(counts)
        }
        .await;
        tx.finish(outcome).await
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
            .map_err(map_err)?;
        self.checkpoints.committed();
        Ok(())
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
        let mut tx = self.write_tx().await?;
        let outcome = async {
            sqlx::query(children)
                .bind(id)
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            let deleted = sqlx::query(parent)
                .bind(id)
                .execute(tx.conn())
                .await
                .map_err(map_err)?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        }
        .await;
        tx.finish(outcome).await
    }

    pub async fn grant_scope(&self, consumer_id: &str, tier_id: &str) -> Result<(), StoreError> {
        sqlx::query(sql::INSERT_SCOPE)
            .bind(consumer_id)
            .bind(tier_id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        self.checkpoints.committed();
        Ok(())
    }

    /// Runs `statements` in one `BEGIN IMMEDIATE` transaction (see `Db::write`).
    pub async fn write(
        &self,
        statements: &[super::Statement],
        must_affect: &[usize],
    ) -> Result<(), StoreError> {
        self.transaction(statements, |i, affected| {
            if affected == 0 && must_affect.contains(&i) {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
        .map(|_| ())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query(sql::PING)
            .fetch_optional(&self.pool)
            .await
            .map(|_| ())
            .map_err(map_err)
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
    /// (with outcomes and health: three more statements before COMMIT)
    /// as one multi-statement query whose two bound values (the batch as JSON) run across its
    /// statements in order. On any failure the transaction is ended (see `settle`); a writer left
    /// in an unknown state is closed and reopened by the next commit.
    pub async fn commit_batch(&self, batch: &Batch<'_>) -> Result<(), StoreError> {
        let serves =
            !batch.events.is_empty() || !batch.usage.is_empty() || !batch.windows.is_empty();
        let query = match (serves, batch.has_health()) {
            (false, true) if batch.health.is_empty() && batch.tiers.is_empty() => {
                if let Some(done) = self.commit_inline(batch.outcomes).await {
                    return done;
                }
                let (outcomes_json, _) = sql::health_parameters(batch.outcomes, &[]);
                sqlx::query(COMMIT_OUTCOMES.as_str()).bind(outcomes_json)
            }
            (false, true) => bind_health(sqlx::query(COMMIT_REPORTS.as_str()), batch),
            (true, true) => bind_health(
                Serves::of(batch).bind(sqlx::query(COMMIT_WITH_HEALTH.as_str())),
                batch,
            ),
            (_, false) => match self.commit_fast(batch).await {
                Some(done) => return done,
                None => Serves::of(batch).bind(sqlx::query(COMMIT_BATCH.as_str())),
            },
        };
        self.on_writer(query).await.map(|_| ())
    }

    /// A batch of serves through `COMMIT_FAST` (or `COMMIT_FAST_LEARN` while some window's
    /// row is not known yet, keeping the rowids it answers once the commit is in); `None`
    /// when some delta must go through migration 012's triggers (`sql::fast_columns`).
    /// A rowid that no longer names its window's row (`sql::WINDOW_ROWS_MISSED`: nothing of
    /// that commit stayed) makes it forget every rowid it knew and commit the batch again,
    /// every window through the upsert.
    async fn commit_fast(&self, batch: &Batch<'_>) -> Option<Result<(), StoreError>> {
        if !sql::windows_once(batch.windows) {
            return None;
        }
        match self.commit_fast_once(batch).await? {
            Err(StoreError::Other(e)) if e.contains(sql::WINDOW_ROWS_MISSED_MESSAGE) => {
                tracing::info!("rate-window rows moved (a VACUUM, or a key deleted): relearning");
                *self.window_rows.lock().unwrap_or_else(|e| e.into_inner()) = WindowRows::default();
                self.commit_fast_once(batch).await
            }
            done => Some(done),
        }
    }

    async fn commit_fast_once(&self, batch: &Batch<'_>) -> Option<Result<(), StoreError>> {
        let mut known = Vec::with_capacity(batch.windows.len());
        let mut new = Vec::new();
        {
            let rows = self.window_rows.lock().unwrap_or_else(|e| e.into_inner());
            for w in batch.windows {
                match rows.get(w) {
                    Some(row) => known.push((w, row)),
                    None => new.push(w.clone()),
                }
            }
        }
        let columns = sql::fast_columns(batch.events, batch.usage, &new)?;
        let (text, reached) = if new.is_empty() {
            &*COMMIT_FAST
        } else {
            &*COMMIT_FAST_LEARN
        };
        let arguments: Vec<String> = columns
            .into_iter()
            .chain(sql::window_row_columns(&known))
            .collect();
        let padding = reached.saturating_sub(arguments.len());
        let query = arguments
            .into_iter()
            .fold(sqlx::query(text.as_str()), |q, c| q.bind(c));
        let query = (0..padding).fold(query, |q, _| q.bind(None::<&str>));
        let rows = match self.on_writer(query).await {
            Ok(rows) => rows,
            Err(e) => return Some(Err(e)),
        };
        if !rows.is_empty() {
            let mut known = self.window_rows.lock().unwrap_or_else(|e| e.into_inner());
            for r in &rows {
                if let (Some(key_id), Some(feature), Some(seconds), Some(row)) =
                    (r.text(0), r.text(1), r.int(2), r.int(3))
                {
                    known.learn(key_id, feature, seconds, row);
                }
            }
        }
        Some(Ok(()))
    }

    /// A batch of outcome reports through `Inline`, holding the writer's lock; `None` when it
    /// must go the usual way.
    async fn commit_inline(&self, outcomes: &[OutcomeWrite]) -> Option<Result<(), StoreError>> {
        let inline = self.inline.as_ref()?;
        let writer = self.writer.lock().await;
        if let Writer::Closed = *writer {
            return Some(Err(StoreError::Unavailable(
                "the database is closed".into(),
            )));
        }
        let done = inline.commit(outcomes)?;
        if done.is_ok() {
            self.checkpoints.committed();
        }
        Some(done)
    }

    /// Runs `query` on the group commit's own connection: writes serialise behind the
    /// ledger's commits instead of contending with them for SQLite's lock. On any failure the
    /// transaction is ended (see `settle`); a writer left in an unknown state is closed and
    /// reopened by the next use.
    async fn on_writer<'q>(
        &self,
        query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let mut writer = self.writer.lock().await;
        if let Writer::Lost = *writer {
            let conn = self.options.connect().await.map_err(map_err)?;
            tracing::info!("group-commit connection reopened");
            *writer = Writer::Open(conn);
        }
        let Writer::Open(conn) = &mut *writer else {
            return Err(StoreError::Unavailable("the database is closed".into()));
        };
        match query.fetch_all(&mut *conn).await {
            Ok(rows) => {
                self.checkpoints.committed();
                Ok(rows)
            }
            Err(e) => {
                // Whichever statement failed, nothing of the batch may stay applied, and no
                // transaction may stay open holding the write lock.
                if !settle(conn).await {
                    tracing::warn!(
                        "closing the group-commit connection: its transaction could not be ended"
                    );
                    if let Writer::Open(lost) = std::mem::replace(&mut *writer, Writer::Lost) {
                        let _ = sqlx::Connection::close(lost).await;
                    }
                }
                Err(map_err(e))
            }
        }
    }

    pub async fn usage_page(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Vec<(i64, UsageEvent)>, StoreError> {
        let rows = bind(sqlx::query(text), params)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.int(9).unwrap_or(0), usage_event(r)))
            .collect())
    }

    pub async fn usage_summary(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Vec<SummaryRow>, StoreError> {
        let rows = bind(sqlx::query(text), params)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| summary_row(r)).collect())
    }

    /// The first column of the first row as text, if any.
    pub async fn read_text(
        &self,
        text: &str,
        params: &[Param],
    ) -> Result<Option<String>, StoreError> {
        let row = bind(sqlx::query(text), params)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.and_then(|r| r.text(0)))
    }

    /// A day's rollup rows, read on the admin pool (no write lock held while counting).
    pub async fn rollup_rows(
        &self,
        params: &[Param],
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows = bind(sqlx::query(sql::ROLLUP_READ), params)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| rollup_row(r)).collect())
    }

    pub async fn write_rollup(&self, params: &[Param]) -> Result<(), StoreError> {
        self.on_writer(bind(sqlx::query(WRITE_ROLLUP.as_str()), params))
            .await
            .map(|_| ())
    }

    pub async fn prune_candidates(
        &self,
        params: &[Param],
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows = bind(sqlx::query(sql::PRUNE_CANDIDATES), params)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| prune_candidate(r)).collect())
    }

    pub async fn prune_rows(&self, rows: &str) -> Result<(), StoreError> {
        self.on_writer(
            sqlx::query(PRUNE_ROWS.as_str())
                .bind(rows)
                .bind(rows)
                .bind(rows),
        )
        .await
        .map(|_| ())
    }

    pub async fn write_index(&self, params: &[Param]) -> Result<(), StoreError> {
        self.on_writer(bind(sqlx::query(WRITE_INDEX.as_str()), params))
            .await
            .map(|_| ())
    }

    /// Locally every commit has ended when its caller hears of it, so any read is settled.
    pub async fn read_serve(
        &self,
        id: &str,
        _settled: bool,
    ) -> Result<Option<UsageEvent>, StoreError> {
        let row = sqlx::query(sql::SELECT_SERVE)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.as_ref().map(|r| usage_event(r)))
    }

    pub async fn read_serves(&self, ids_json: &str) -> Result<Vec<UsageEvent>, StoreError> {
        let rows = sqlx::query(sql::SELECT_SERVES)
            .bind(ids_json)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| usage_event(r)).collect())
    }

    pub async fn read_key_health(
        &self,
        id: &str,
    ) -> Result<Option<(bool, Option<HealthRecord>)>, StoreError> {
        let row = sqlx::query(sql::SELECT_KEY_HEALTH)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.as_ref().map(|r| key_health(r, id)))
    }

    pub async fn close(&self) {
        // The checkpointer first (it may be waiting for the writer's lock), then the writer.
        self.checkpoints
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
        self.checkpoints.wake.notify_one();
        let task = self.checkpoints.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let mut writer = self.writer.lock().await;
        if let Some(inline) = &self.inline {
            *inline.conn.lock() = None;
        }
        if let Writer::Open(writer) = std::mem::replace(&mut *writer, Writer::Closed) {
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

#[cfg(test)]
mod tests {
    use super::{
        arguments_reached, Inline, WindowRows, COMMIT_FAST, COMMIT_FAST_LEARN, WINDOW_ROWS_KEPT,
    };
    use crate::model::OutcomeWrite;
    use crate::store::WindowDelta;

    #[test]
    fn in_place_commit_sets_each_outcome_once_and_keeps_a_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE usage_events (id TEXT PRIMARY KEY, \
             outcome_class TEXT, outcome_status INTEGER, outcome_reported_at TEXT); \
             INSERT INTO usage_events (id) VALUES ('a'), ('b'), ('c'); \
             UPDATE usage_events SET outcome_class = 'ok', outcome_status = 200 WHERE id = 'c';",
        )
        .unwrap();
        let inline = Inline {
            path,
            conn: parking_lot::Mutex::new(None),
        };
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let write = |serve_id: &str, class, status| OutcomeWrite {
            serve_id: serve_id.into(),
            class,
            status,
            reported_at: at,
        };
        let batch = [
            write("a", "rate_limited", Some(429)),
            write("b", "timeout", None),
            write("c", "server_error", Some(503)),
            write("unknown", "ok", Some(200)),
        ];
        assert!(matches!(inline.commit(&batch), Some(Ok(()))));
        type Row = (String, Option<String>, Option<i64>, Option<String>);
        let rows: Vec<Row> = db
            .prepare("SELECT id, outcome_class, outcome_status, outcome_reported_at FROM usage_events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let stamp = Some(crate::timestamp::to_db(at));
        assert_eq!(
            rows,
            [
                (
                    "a".into(),
                    Some("rate_limited".into()),
                    Some(429),
                    stamp.clone()
                ),
                ("b".into(), Some("timeout".into()), None, stamp),
                ("c".into(), Some("ok".into()), Some(200), None),
            ],
            "each report on its own row, a missing status stays NULL, a recorded outcome stays"
        );
    }

    fn slot(key: &str, feature: &str, window_seconds: i64) -> WindowDelta {
        WindowDelta {
            key_id: key.into(),
            feature: feature.into(),
            window_seconds,
            at: chrono::Utc::now(),
            units: 1,
            rate_limit: 10,
        }
    }

    #[test]
    fn window_rows_are_found_by_key_feature_and_length() {
        let mut rows = WindowRows::default();
        rows.learn("k1".into(), "scrape".into(), 1, 10);
        rows.learn("k1".into(), "scrape".into(), 60, 11);
        rows.learn("k1".into(), "search".into(), 1, 12);
        rows.learn("k2".into(), "scrape".into(), 1, 13);
        assert_eq!(rows.get(&slot("k1", "scrape", 1)), Some(10));
        assert_eq!(rows.get(&slot("k1", "scrape", 60)), Some(11));
        assert_eq!(rows.get(&slot("k1", "search", 1)), Some(12));
        assert_eq!(rows.get(&slot("k2", "scrape", 1)), Some(13));
        assert_eq!(rows.get(&slot("k2", "scrape", 60)), None);
        assert_eq!(rows.get(&slot("k3", "scrape", 1)), None);
        // A slot learned again keeps one entry with the newer rowid.
        rows.learn("k1".into(), "scrape".into(), 1, 20);
        assert_eq!(rows.get(&slot("k1", "scrape", 1)), Some(20));
        assert_eq!(rows.len, 4);
    }

    #[test]
    fn window_rows_start_over_past_their_bound() {
        let mut rows = WindowRows::default();
        for i in 0..WINDOW_ROWS_KEPT {
            rows.learn(format!("k{i}"), "f".into(), 1, i as i64);
        }
        assert_eq!(rows.len, WINDOW_ROWS_KEPT);
        assert_eq!(rows.get(&slot("k0", "f", 1)), Some(0));
        rows.learn("new".into(), "f".into(), 1, -1);
        assert_eq!(rows.len, 1, "started over, then learned the new row");
        assert_eq!(rows.get(&slot("k0", "f", 1)), None);
        assert_eq!(rows.get(&slot("new", "f", 1)), Some(-1));
    }

    #[test]
    fn arguments_reached_follows_sqlx_binding_unused_numbers_in_turn() {
        // ?2 alone leaves ?1 unused: it takes argument 1; the next statement's ?1 is argument 1.
        assert_eq!(arguments_reached("SELECT ?2; SELECT ?1"), 2);
        // Each statement's unused lower numbers take the arguments after the last one's.
        assert_eq!(arguments_reached("SELECT ?3; SELECT ?3; SELECT ?1"), 4);
        assert_eq!(arguments_reached("BEGIN; COMMIT"), 0);
        // The fast texts: unused 0, 5, 13, 13 (and 8) lower numbers in turn.
        assert_eq!(COMMIT_FAST.1, 31);
        assert_eq!(COMMIT_FAST_LEARN.1, 39);
    }
}
