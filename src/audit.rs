//! Audit upkeep in the background (SPEC §8.3): the side indexes of filtered usage reads, the
//! daily rollup and `AUDIT_RETENTION_DAYS`.
//!
//! Side indexes: every 100 ms, audit rows committed since the last fill are added to
//! `usage_by_key` / `usage_by_consumer` in one bulk statement — the hot path's commits stay
//! as small as before; reads scan the few rows above the filled end (`store::Db::usage_page`).
//!
//! Rollup: a UTC day is rolled up once nothing can change its counts any more — every serve
//! of it is committed and its outcome window has closed (a report lands at most
//! `OUTCOME_WINDOW_SECONDS` after its serve) — so rolled counts are final and never updated.
//! Days roll up in order; the rollup's end (`usage_rollup_state`) says which days summaries
//! read from the rollup, the rest come from raw rows.
//!
//! Pruning deletes only raw rows of days already rolled up and older than the retention, in
//! small batches with a pause between them; locally each batch runs on the group commit's own
//! connection, so a `/key` commit waits for at most one batch, never for the whole prune.

use std::time::Duration;

use chrono::{Days, NaiveDate};
use tokio::sync::watch;

use crate::store::Db;
use crate::timestamp::Timestamp;

/// How often a pass runs (the first runs at startup).
const PASS_INTERVAL: Duration = Duration::from_secs(600);
/// How often the side indexes are filled, and how many rows one fill covers at most (a
/// backlog, e.g. a Go-era table on first start, is filled batch after batch with `PAUSE`).
/// Small and frequent: a fill holds the group commit's connection, and fills of a second's
/// serves (20,000 rows) raised durable `/key`'s p99 from 3 to 35 ms in bench/bench.py.
const INDEX_INTERVAL: Duration = Duration::from_millis(100);
pub const INDEX_BATCH: i64 = 5_000;
/// Audit rows deleted per batch: a few milliseconds of write lock.
pub const PRUNE_BATCH: i64 = 500;
/// Pause between rolled days and side-index batches, so commits queue in between.
const PAUSE: Duration = Duration::from_millis(20);
/// Pause between prune batches: a batch keeps the writer about 20 ms, so pruning takes at most
/// a sixth of it (measured at 10 million rows: with 20 ms pauses, durable `/key` fell to 0.69×
/// its unpruned rate; pruning 1 million rows is not urgent).
const PRUNE_PAUSE: Duration = Duration::from_millis(100);
/// Slack after the outcome window for serves still being committed and clock steps.
const SETTLE_MARGIN: chrono::Duration = chrono::Duration::minutes(10);

/// The running upkeep task.
pub struct AuditJobs {
    stop: watch::Sender<bool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl AuditJobs {
    /// Starts the upkeep task on the current runtime.
    pub fn start(db: Db, retention_days: Option<u32>, outcome_window: Duration) -> AuditJobs {
        let (stop, stopped) = watch::channel(false);
        let tasks = [
            tokio::spawn(fill_indexes(db.clone(), stopped.clone())),
            tokio::spawn(run(db, retention_days, outcome_window, stopped)),
        ];
        AuditJobs { stop, tasks }
    }

    /// Stops between two batches and waits for the tasks to end.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn fill_indexes(db: Db, mut stopped: watch::Receiver<bool>) {
    loop {
        let wait = match db.index_usage(INDEX_BATCH).await {
            Ok(n) if n >= INDEX_BATCH => PAUSE,
            Ok(_) => INDEX_INTERVAL,
            Err(e) => {
                tracing::warn!(error = %e, "filling the audit side indexes failed; retrying");
                INDEX_INTERVAL
            }
        };
        if pause(&mut stopped, wait).await {
            return;
        }
    }
}

async fn run(
    db: Db,
    retention_days: Option<u32>,
    outcome_window: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = pass(&db, retention_days, outcome_window, &mut stopped).await {
            tracing::warn!(error = %e, "audit rollup or pruning failed; retried at the next pass");
        }
        if pause(&mut stopped, PASS_INTERVAL).await {
            return;
        }
    }
}

/// Sleeps `d` unless told to stop first; true when stopping.
async fn pause(stopped: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stopped.borrow(),
        _ = stopped.changed() => true,
    }
}

async fn pass(
    db: &Db,
    retention_days: Option<u32>,
    outcome_window: Duration,
    stopped: &mut watch::Receiver<bool>,
) -> Result<(), crate::store::StoreError> {
    let now = chrono::Utc::now();
    let last = last_final_day(now, outcome_window);
    let start = match db.rollup_through().await? {
        Some(through) => through.checked_add_days(Days::new(1)),
        None => db.first_usage_day().await?,
    };
    if let Some(mut day) = start {
        while day <= last {
            // Skip empty days: roll the next day with rows, or close the range at `last`.
            day = match db.next_usage_day(day).await? {
                Some(next) if next <= last => next,
                _ => last,
            };
            let rows = db.roll_up_day(day).await?;
            tracing::debug!(day = %day, rows, "audit day rolled up");
            let Some(next) = day.checked_add_days(Days::new(1)) else {
                break;
            };
            day = next;
            if pause(stopped, PAUSE).await {
                return Ok(());
            }
        }
    }
    let (Some(days), Some(rolled)) = (retention_days, db.rollup_through().await?) else {
        return Ok(());
    };
    let Some(before) = prune_before(now.date_naive(), days, rolled) else {
        return Ok(());
    };
    let mut pruned = 0u64;
    loop {
        let n = db.prune_usage(before, PRUNE_BATCH).await?;
        pruned += n;
        if n < PRUNE_BATCH as u64 || pause(stopped, PRUNE_PAUSE).await {
            break;
        }
    }
    if pruned > 0 {
        tracing::info!(pruned, before = %before, "audit rows past AUDIT_RETENTION_DAYS pruned");
    }
    Ok(())
}

/// The last UTC day no serve or outcome report can still change at `now`: its end lies
/// before `now` minus the outcome window and a settling margin.
pub fn last_final_day(now: Timestamp, outcome_window: Duration) -> NaiveDate {
    let window = chrono::Duration::from_std(outcome_window).unwrap_or(chrono::Duration::MAX);
    let settled = now
        .checked_sub_signed(window + SETTLE_MARGIN)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
    let day = settled.date_naive();
    day.pred_opt().unwrap_or(day)
}

/// Rows of days before the returned one may be pruned: older than `retention_days` (whole
/// UTC days before `today`) and already rolled up (through `rolled`).
pub fn prune_before(today: NaiveDate, retention_days: u32, rolled: NaiveDate) -> Option<NaiveDate> {
    let by_age = today.checked_sub_days(Days::new(u64::from(retention_days)))?;
    let by_rollup = rolled.checked_add_days(Days::new(1))?;
    Some(by_age.min(by_rollup))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    // Issue 10 item 4: a day rolls up only after its outcome window (plus margin) has closed.
    #[test]
    fn a_day_is_final_once_its_outcome_window_has_closed() {
        let at = |s: &str| crate::timestamp::parse_rfc3339(s).unwrap();
        let hour = Duration::from_secs(3600);
        // 01:09 on the 10th: a serve at 23:59 on the 9th may still get its report.
        assert_eq!(
            last_final_day(at("2026-11-10T01:09:00Z"), hour),
            day("2026-11-08")
        );
        assert_eq!(
            last_final_day(at("2026-11-10T01:10:00Z"), hour),
            day("2026-11-09")
        );
        let month = Duration::from_secs(2_592_000);
        assert_eq!(
            last_final_day(at("2026-11-30T12:00:00Z"), month),
            day("2026-10-30")
        );
    }

    #[test]
    fn pruning_stops_at_the_retention_and_at_the_rollup() {
        let today = day("2026-11-26");
        assert_eq!(
            prune_before(today, 7, day("2026-11-25")),
            Some(day("2026-11-19"))
        );
        // Days not rolled up yet are kept whatever their age.
        assert_eq!(
            prune_before(today, 7, day("2026-11-01")),
            Some(day("2026-11-02"))
        );
    }
}
