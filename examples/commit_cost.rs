//! CPU per serve of each statement of SQLite's fast group commit (issue 14 item 5), on a copy
//! of a benchmark database: `cargo build --release --example commit_cost`, then
//! `commit_cost COPY.db VARIANT,VARIANT… [ROUNDS]`.
//!
//! Each commit serves the next 16 keys in rowid (rotation) order with 1 s windows, as the
//! 10,000-key benchmark does. A variant lists the statements run between `BEGIN IMMEDIATE` and
//! `COMMIT`, joined by `+`: `ev` / `us` / `win` (the per-row JSON texts `INSERT_EVENTS`,
//! `UPDATE_USAGE`, `UPSERT_WINDOWS`), `evc` / `usc` / `winc` (the flat-column texts),
//! `winr` (`UPDATE_WINDOWS_BY_ROW`, by the rows' rowids, which `COMMIT_FAST` runs), `none`; any other name is an environment variable holding a statement bound to the
//! per-row usage array (if it names `keys`) or window array. Variants run interleaved, 150
//! commits each per round; printed: the median and first quartile over rounds of the thread's
//! CPU time per serve (so other load on the machine moves it less than wall time).
//! `EXTRA` runs SQL on the connection first (e.g. `DROP TRIGGER keys_budget_refused`).

use std::collections::HashMap;
use std::error::Error;
use std::time::Duration;

use keypooler::model::UsageEvent;
use keypooler::store::{sql, UsageDelta, WindowDelta};
use rusqlite::Connection;

const BATCH: usize = 16;
const COMMITS_PER_ROUND: usize = 150;

/// This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu() -> Duration {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.sec as u64, ts.nsec as u32)
}

/// One commit's serves: the next `BATCH` keys from `next`, each window restarted when its
/// second is over.
struct Serves {
    events: Vec<UsageEvent>,
    usage: Vec<UsageDelta>,
    windows: Vec<WindowDelta>,
}

fn serves(
    keys: &[String],
    consumer: &str,
    starts: &mut [chrono::DateTime<chrono::Utc>],
    next: &mut usize,
) -> Serves {
    let now = chrono::Utc::now();
    let mut s = Serves {
        events: Vec::new(),
        usage: Vec::new(),
        windows: Vec::new(),
    };
    for _ in 0..BATCH {
        let k = *next % keys.len();
        *next += 1;
        if now - starts[k] >= chrono::TimeDelta::seconds(1) {
            starts[k] = now;
        }
        s.events.push(UsageEvent {
            id: uuid::Uuid::now_v7().to_string(),
            key_id: keys[k].clone(),
            consumer_id: consumer.to_string(),
            feature: "big_scrape".into(),
            created_at: now,
            outcome: None,
            cost: 1,
        });
        s.usage.push(UsageDelta {
            key_id: keys[k].clone(),
            units: 1,
            at: now,
            regbot_limit: None,
        });
        s.windows.push(WindowDelta {
            key_id: keys[k].clone(),
            feature: "big_scrape".into(),
            window_seconds: 1,
            at: starts[k],
            units: 1,
            rate_limit: 1_000_000_000,
        });
    }
    s
}

/// A commit's bound parameters, in both forms.
struct Params {
    events: String,
    usage: String,
    windows: String,
    columns: [String; 13],
    by_row: [String; 4],
}

fn params(s: &Serves, rowids: &HashMap<String, i64>) -> Result<Params, Box<dyn Error>> {
    let known = s
        .windows
        .iter()
        .map(|w| {
            Ok((
                w,
                *rowids.get(&w.key_id).ok_or("a key without a window row")?,
            ))
        })
        .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
    let by_row = sql::window_row_columns(&known);
    let (events, _) = sql::batch_parameters(&s.events, &[]);
    let (usage, _, windows, _) = sql::delta_parameters(&s.usage, &s.windows);
    let columns = sql::fast_columns(&s.events, &s.usage, &s.windows).ok_or("not a fast batch")?;
    Ok(Params {
        events,
        usage,
        windows,
        columns,
        by_row,
    })
}

fn run(conn: &Connection, variant: &str, p: &Params) -> Result<(), Box<dyn Error>> {
    let Params {
        events,
        usage,
        windows,
        columns,
        by_row,
    } = p;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for part in variant.split('+') {
        match part {
            "none" => 0,
            "evc" => conn
                .prepare_cached(sql::INSERT_EVENTS_COLUMNS)?
                .execute(rusqlite::params_from_iter(&columns[..5]))?,
            "ev" => conn.prepare_cached(sql::INSERT_EVENTS)?.execute([events])?,
            "us" => conn.prepare_cached(sql::UPDATE_USAGE)?.execute([usage])?,
            "win" => conn
                .prepare_cached(sql::UPSERT_WINDOWS)?
                .execute([windows])?,
            // Each binds the numbers below its own too, as `COMMIT_FAST` does (unread there).
            "usc" => conn
                .prepare_cached(sql::UPDATE_USAGE_COLUMNS)?
                .execute(rusqlite::params_from_iter(&columns[..8]))?,
            "winc" => conn
                .prepare_cached(sql::UPSERT_WINDOWS_COLUMNS)?
                .execute(rusqlite::params_from_iter(&columns[..]))?,
            "winr" => {
                // `COMMIT_FAST` binds these after the thirteen (see `FAST_PADDING` there).
                let args = columns.iter().chain(by_row);
                conn.prepare_cached(sql::UPDATE_WINDOWS_BY_ROW)?
                    .execute(rusqlite::params_from_iter(args))?
            }
            other => {
                let text = std::env::var(other)?;
                let array = if text.contains("keys") {
                    usage
                } else {
                    windows
                };
                conn.prepare_cached(&text)?.execute([array])?
            }
        };
    }
    conn.execute_batch("COMMIT")?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(db), Some(variants)) = (args.get(1), args.get(2)) else {
        return Err("usage: commit_cost COPY.db VARIANT,VARIANT… [ROUNDS]".into());
    };
    let variants: Vec<&str> = variants.split(',').collect();
    let rounds: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(20);
    let conn = Connection::open(db)?;
    conn.set_prepared_statement_cache_capacity(64);
    // The server's settings (`store/sqlite.rs`).
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384; \
         PRAGMA journal_size_limit=4194304; PRAGMA wal_autocheckpoint=512; \
         PRAGMA foreign_keys=OFF",
    )?;
    if let Ok(extra) = std::env::var("EXTRA") {
        conn.execute_batch(&extra)?;
    }
    let keys: Vec<String> = conn
        .prepare("SELECT id FROM keys ORDER BY rowid")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err("no keys in the database".into());
    }
    let consumer: String = conn.query_row("SELECT id FROM consumers LIMIT 1", [], |r| r.get(0))?;
    // Every key's 1 s window row (the benchmark database has served each key).
    let rowids: HashMap<String, i64> = conn
        .prepare("SELECT key_id, rowid FROM window_counts WHERE window_seconds = 1")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut starts = vec![chrono::Utc::now(); keys.len()];
    let mut next = 0;
    let mut samples = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (variant, samples) in variants.iter().zip(&mut samples) {
            let mut cpu = Duration::ZERO;
            for _ in 0..COMMITS_PER_ROUND {
                let p = params(&serves(&keys, &consumer, &mut starts, &mut next), &rowids)?;
                let t0 = thread_cpu();
                run(&conn, variant, &p)?;
                cpu += thread_cpu() - t0;
            }
            samples.push(cpu.as_secs_f64() * 1e6 / (COMMITS_PER_ROUND * BATCH) as f64);
        }
    }
    for (variant, mut xs) in variants.iter().zip(samples) {
        xs.sort_by(f64::total_cmp);
        println!(
            "{variant:16} CPU per serve: median {:6.2} µs, first quartile {:6.2} µs",
            xs[xs.len() / 2],
            xs[xs.len() / 4]
        );
    }
    Ok(())
}
