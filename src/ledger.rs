//! The group-commit writer: serves go in, one transaction per batch, acks come out.
//!
//! Guarantee: a serve is acknowledged only after its audit row and its key's counters are
//! committed, so a 200 never leaves for an uncounted or unaudited serve.
//!
//! Batching policy, no timer: one commit is written at a time; whatever queues while it is
//! written (up to `MAX_BATCH`) is gathered, given its audit row, and becomes the next commit
//! the moment the previous one finishes. An idle writer yields once before committing, so
//! requests already running join the batch. An idle server thus commits each serve at once
//! and a busy one amortises one transaction over many serves.
//!
//! Ordering: the pool hands a key's reservations to `submit` while holding that key's lock, so
//! they queue in counting order and the last one of a key in a batch carries its newest
//! absolute counters. When a commit fails, each key is rolled back to before its earliest
//! failed serve and every later reservation of that key (already queued) is voided.
//!
//! Outcome reports and key health changes (SPEC §8.2) ride the same commits: a report's
//! outcome row and the health records it changed are one job, acknowledged after the batch
//! holding it commits. A job whose commit outcome is unknown is not re-sent: its caller reads
//! back what landed before answering.
//!
//! Uncertain commits (remote only): their rows stay counted and are re-sent until confirmed,
//! never dropped. That backlog is bounded (`BacklogLimits`): while it is at the bound, new
//! serves are refused definitively — 503, their counts given back — until it drains.

pub mod lookup;
pub mod recent;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::LedgerMeters;
use crate::model::{
    HealthWrite, KeyUsageUpdate, OutcomeWrite, RateWindowWrite, TierCooldownWrite, UsageEvent,
};
use crate::pool::{PoolKey, Reservation};
use crate::store::{Batch, Db, StoreError};
use recent::{RecentServe, RecentServes};

/// Serves committed together at most.
pub const MAX_BATCH: usize = 512;

/// How many serves whose commit outcome is unknown may wait in memory to be re-sent. At the
/// bound new serves are refused until the backlog drains; it may overshoot by one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BacklogLimits {
    pub max_serves: usize,
    /// Approximate heap and inline size of the kept audit rows and counters.
    pub max_bytes: usize,
}

impl Default for BacklogLimits {
    /// 10,000 serves or 4 MiB: a re-send of the whole backlog stays one modest request.
    fn default() -> Self {
        BacklogLimits {
            max_serves: 10_000,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The serve could not be recorded; its count was given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("usage could not be recorded")]
pub struct CommitFailed;

struct Serve {
    reservation: Reservation,
    /// Answered the serve's audit id once committed.
    ack: oneshot::Sender<Result<String, CommitFailed>>,
}

/// What a report or an operator changed: at most one outcome and the health records.
pub struct HealthJob {
    pub outcome: Option<OutcomeWrite>,
    pub health: Vec<HealthWrite>,
    /// A tier's host-throttling cooldown that began.
    pub tiers: Vec<TierCooldownWrite>,
}

/// How a health job's commit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Committed,
    /// Nothing of it was written.
    Failed,
    /// The commit's answer was lost; it may or may not have landed (read back to know).
    Uncertain,
}

struct Job {
    job: HealthJob,
    ack: oneshot::Sender<JobOutcome>,
}

// A serve carries its windows inline (a fixed array, SPEC §8.4): moved once into the queue,
// where a box would cost an allocation per serve.
#[allow(clippy::large_enum_variant)]
enum Message {
    Serve(Serve),
    Health(Job),
    Shutdown,
}

/// A submitted serve awaiting its commit.
pub struct Pending {
    pub key: Arc<PoolKey>,
    ack: oneshot::Receiver<Result<String, CommitFailed>>,
}

/// A serve that is durable.
pub struct Committed {
    pub key: Arc<PoolKey>,
    /// The serve's audit row id (`usage_events.id`), answered as `serve_id`.
    pub serve_id: String,
}

impl Pending {
    /// Resolves once the serve is durable (or failed and was given back).
    pub async fn committed(self) -> Result<Committed, CommitFailed> {
        match self.ack.await {
            Ok(Ok(serve_id)) => Ok(Committed {
                key: self.key,
                serve_id,
            }),
            _ => Err(CommitFailed),
        }
    }
}

/// Handle to the writer task.
pub struct Ledger {
    queue: mpsc::UnboundedSender<Message>,
    worker: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The newest committed serves, for outcome reports (`recent`).
    pub recent: Arc<RecentServes>,
    /// Batched reads of older serves, for outcome reports (`lookup`).
    pub lookups: lookup::ServeLookups,
}

impl Ledger {
    /// Starts the writer task on the current runtime, recording into `meters`.
    pub fn start(db: Db, meters: LedgerMeters) -> Ledger {
        Ledger::spawn(db, BacklogLimits::default(), meters)
    }

    /// Starts the writer with its uncertain backlog bounded by `limits` (records no metrics).
    pub fn start_with_limits(db: Db, limits: BacklogLimits) -> Ledger {
        Ledger::spawn(db, limits, crate::metrics::Metrics::disabled().ledger())
    }

    fn spawn(db: Db, limits: BacklogLimits, meters: LedgerMeters) -> Ledger {
        let (queue, inbox) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog {
            limits,
            refusing: AtomicBool::new(false),
        });
        let recent = Arc::new(RecentServes::default());
        let lookups = lookup::ServeLookups::start(db.clone());
        let worker = tokio::spawn(run(db, inbox, backlog, Arc::new(meters), recent.clone()));
        Ledger {
            queue,
            worker: parking_lot::Mutex::new(Some(worker)),
            recent,
            lookups,
        }
    }

    /// Queues a reservation; call while the key is locked (see `Pool::draw`). Never blocks.
    pub fn submit(&self, reservation: Reservation) -> Pending {
        let key = reservation.key.clone();
        let (ack, rx) = oneshot::channel();
        // After shutdown the message comes back unsent, the ack drops and the caller sees a failure.
        let _ = self.queue.send(Message::Serve(Serve { reservation, ack }));
        Pending { key, ack: rx }
    }

    /// Queues an outcome and health changes; call while holding the lock that ordered them
    /// (the tier's report lock), so a key's records reach the database in the order made.
    /// The answer resolves once the batch holding them has committed (or not).
    pub fn submit_health(&self, job: HealthJob) -> impl std::future::Future<Output = JobOutcome> {
        let (ack, rx) = oneshot::channel();
        let _ = self.queue.send(Message::Health(Job { job, ack }));
        async move { rx.await.unwrap_or(JobOutcome::Failed) }
    }

    /// Commits everything queued so far, then stops the writer.
    pub async fn shutdown(&self) {
        let _ = self.queue.send(Message::Shutdown);
        let worker = self.worker.lock().take();
        if let Some(worker) = worker {
            if worker.await.is_err() {
                tracing::error!("ledger writer ended abnormally");
            }
        }
    }
}

/// How long uncertain rows wait for a next commit before they are re-sent on their own.
const UNCERTAIN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

async fn run(
    db: Db,
    mut inbox: mpsc::UnboundedReceiver<Message>,
    backlog: Arc<Backlog>,
    meters: Arc<LedgerMeters>,
    recent: Arc<RecentServes>,
) {
    let mut stopping = false;
    let mut in_flight: Option<tokio::task::JoinHandle<Uncertain>> = None;
    let mut carry = Uncertain::default();
    while !stopping {
        let mut batch = Gathered::default();
        // With a commit outstanding, wake up after a while even without serves, so rows whose
        // outcome it left unknown are re-sent.
        let received = match in_flight {
            Some(_) => tokio::time::timeout(UNCERTAIN_RETRY, inbox.recv())
                .await
                .ok(),
            None => Some(inbox.recv().await),
        };
        match received {
            Some(Some(Message::Shutdown)) | Some(None) => stopping = true,
            Some(Some(message)) => batch.take(message),
            None => {}
        }
        drain(&mut inbox, &mut batch, &mut stopping);
        let writer_idle = in_flight.as_ref().is_none_or(|commit| commit.is_finished());
        if writer_idle && !stopping && !batch.is_empty() {
            // Idle writer: let requests already running on the runtime reach the queue first.
            tokio::task::yield_now().await;
            drain(&mut inbox, &mut batch, &mut stopping);
        }
        // Commits run one at a time and in order; this batch was gathered and prepared while
        // the previous one was being written, and takes whatever arrived in the meantime.
        if let Some(previous) = in_flight.take() {
            carry = finished(previous).await;
            drain(&mut inbox, &mut batch, &mut stopping);
        }
        if stopping {
            inbox.close();
            while let Ok(message) = inbox.try_recv() {
                batch.take(message);
            }
        }
        if batch.is_empty() && carry.is_empty() {
            continue;
        }
        let db = db.clone();
        let backlog = backlog.clone();
        let meters = meters.clone();
        let recent = recent.clone();
        let carried = std::mem::take(&mut carry);
        in_flight = Some(tokio::spawn(async move {
            let mut carry = carried;
            let mut jobs = batch.jobs;
            for chunk in chunked(batch.serves) {
                if backlog.full(&carry) {
                    give_back(chunk.into_iter().map(|p| p.serve));
                } else {
                    carry = commit(
                        &db,
                        chunk,
                        std::mem::take(&mut jobs),
                        carry,
                        &meters,
                        &recent,
                    )
                    .await;
                }
            }
            if !carry.is_empty() || !jobs.is_empty() {
                carry = commit(&db, Vec::new(), jobs, carry, &meters, &recent).await;
            }
            backlog.full(&carry);
            carry
        }));
    }
    if let Some(last) = in_flight.take() {
        carry = finished(last).await;
    }
    for _ in 0..3 {
        if carry.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        carry = commit(&db, Vec::new(), Vec::new(), carry, &meters, &recent).await;
    }
    if carry.is_empty() {
        tracing::debug!("ledger writer stopped with nothing pending");
    } else {
        tracing::error!(
            serves = carry.events.len(),
            "stopping with serves whose commit outcome is unknown; none of them was answered 200"
        );
    }
}

async fn finished(commit: tokio::task::JoinHandle<Uncertain>) -> Uncertain {
    commit.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a commit task ended abnormally");
        Uncertain::default()
    })
}

/// Audit rows and counters of commits whose outcome is unknown (a remote COMMIT whose answer
/// was lost): re-sent with every later commit until one is known to succeed. Re-sending is
/// idempotent — audit ids are unique and ignored when present, counters are absolute — so the
/// database ends with them exactly once.
#[derive(Default)]
struct Uncertain {
    events: Vec<UsageEvent>,
    updates: Vec<KeyUsageUpdate>,
    windows: Vec<RateWindowWrite>,
}

impl Uncertain {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.updates.is_empty() && self.windows.is_empty()
    }

    /// Approximate memory held: each row's inline size plus its strings.
    fn approx_bytes(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|e| {
                std::mem::size_of::<UsageEvent>()
                    + e.id.len()
                    + e.key_id.len()
                    + e.consumer_id.len()
                    + e.feature.len()
            })
            .sum();
        let updates: usize = self
            .updates
            .iter()
            .map(|u| std::mem::size_of::<KeyUsageUpdate>() + u.key_id.len())
            .sum();
        events + updates
    }
}

/// The uncertain backlog's bound and whether new serves are being refused because of it.
struct Backlog {
    limits: BacklogLimits,
    refusing: AtomicBool,
}

impl Backlog {
    /// Whether `carry` is at the bound (new serves must be refused); logs once when that
    /// starts and once when it ends.
    fn full(&self, carry: &Uncertain) -> bool {
        let serves = carry.events.len();
        let bytes = if carry.is_empty() {
            0
        } else {
            carry.approx_bytes()
        };
        let full = serves >= self.limits.max_serves || bytes >= self.limits.max_bytes;
        let was = self.refusing.swap(full, Ordering::Relaxed);
        if full && !was {
            tracing::error!(
                serves,
                bytes,
                max_serves = self.limits.max_serves,
                max_bytes = self.limits.max_bytes,
                "serves of unknown commit outcome reached the bound; new serves are refused (503, nothing counted) until the database confirms them"
            );
        } else if !full && was {
            tracing::warn!(
                serves,
                "the backlog of unknown commit outcome is below its bound again; serving"
            );
        }
        full
    }
}

/// What the writer gathered for the next commit: serves and health jobs.
#[derive(Default)]
struct Gathered {
    serves: Vec<Prepared>,
    jobs: Vec<Job>,
}

impl Gathered {
    fn take(&mut self, message: Message) {
        match message {
            Message::Serve(s) => self.serves.push(prepare(s)),
            Message::Health(job) => self.jobs.push(job),
            Message::Shutdown => {}
        }
    }

    fn len(&self) -> usize {
        self.serves.len() + self.jobs.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn drain(inbox: &mut mpsc::UnboundedReceiver<Message>, batch: &mut Gathered, stopping: &mut bool) {
    while batch.len() < MAX_BATCH && !*stopping {
        match inbox.try_recv() {
            Ok(Message::Shutdown) => *stopping = true,
            Ok(message) => batch.take(message),
            Err(_) => break,
        }
    }
}

/// A serve with its audit row built (ahead of the commit, off its critical path).
struct Prepared {
    serve: Serve,
    event: UsageEvent,
}

fn prepare(serve: Serve) -> Prepared {
    let r = &serve.reservation;
    let event = UsageEvent {
        // Time-ordered (v7): each audit row appends to the primary-key index instead of
        // dirtying a random page per row, which made commits 2-3x slower with v4. Made here,
        // on the writer task: v7's generator is one process-wide lock.
        id: uuid::Uuid::now_v7().to_string(),
        key_id: r.key.id.to_string(),
        consumer_id: r.consumer_id.to_string(),
        feature: r.feature.clone(),
        created_at: r.at,
        outcome: None,
        cost: r.cost,
    };
    Prepared { serve, event }
}

fn chunked(mut batch: Vec<Prepared>) -> Vec<Vec<Prepared>> {
    let mut out = Vec::new();
    while batch.len() > MAX_BATCH {
        let rest = batch.split_off(MAX_BATCH);
        out.push(batch);
        batch = rest;
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// Fails serves definitively: each key goes back to before its earliest serve here (queued in
/// counting order) and its later reservations are voided; rate slots are returned.
fn give_back(serves: impl IntoIterator<Item = Serve>) {
    let mut reverted: HashSet<Arc<str>> = HashSet::new();
    for s in serves {
        let key = &s.reservation.key;
        // A reservation voided by an earlier rollback has nothing left to revert.
        if !reverted.contains(&key.id) && key.is_current(&s.reservation) {
            key.revert_usage(&s.reservation);
            reverted.insert(key.id.clone());
        }
        key.give_back_rate(&s.reservation);
        let _ = s.ack.send(Err(CommitFailed));
    }
}

/// Commits `batch` and `jobs` together with `carry`; returns what is still uncertain afterwards.
async fn commit(
    db: &Db,
    batch: Vec<Prepared>,
    jobs: Vec<Job>,
    carry: Uncertain,
    meters: &LedgerMeters,
    recent: &RecentServes,
) -> Uncertain {
    // Checked only now, after the previous commit's outcome (and any rollback) is known.
    let (live, stale): (Vec<Prepared>, Vec<Prepared>) = batch
        .into_iter()
        .partition(|p| p.serve.reservation.key.is_current(&p.serve.reservation));
    for p in stale {
        p.serve.reservation.key.give_back_rate(&p.serve.reservation);
        let _ = p.serve.ack.send(Err(CommitFailed));
    }
    if live.is_empty() && carry.is_empty() && jobs.is_empty() {
        return carry;
    }
    let (live, new_events): (Vec<Serve>, Vec<UsageEvent>) =
        live.into_iter().map(|p| (p.serve, p.event)).unzip();
    let mut updates: Vec<KeyUsageUpdate> = Vec::new();
    let mut position: HashMap<&str, usize> = HashMap::new();
    for s in &live {
        let r = &s.reservation;
        let update = KeyUsageUpdate {
            key_id: r.key.id.to_string(),
            usage_count: r.usage_after.count,
            usage_window_start: r.usage_after.window_start,
        };
        match position.get(&*r.key.id) {
            Some(&i) => updates[i] = update,
            None => {
                position.insert(&r.key.id, updates.len());
                updates.push(update);
            }
        }
    }
    // Rate windows (SPEC §8.4) as of each (key, feature)'s last serve here: its reservation
    // was taken last under the key's lock, so it holds the newest absolute counts.
    let mut windows: Vec<RateWindowWrite> = Vec::new();
    let mut window_position: HashMap<(&str, &str), usize> = HashMap::new();
    for s in &live {
        let r = &s.reservation;
        match window_position.get(&(&*r.key.id, r.feature.as_str())) {
            Some(&i) => {
                // Same windows in the same order: overwrite in place.
                for (at, w) in (i..).zip(r.window_writes()) {
                    if at < windows.len() && windows[at].window_seconds == w.window_seconds {
                        windows[at] = w;
                    } else {
                        windows.push(w);
                    }
                }
            }
            None => {
                window_position.insert((&r.key.id, r.feature.as_str()), windows.len());
                windows.extend(r.window_writes());
            }
        }
    }
    // A carried counter stands unless this batch holds a newer one for the same key.
    let carried_updates: Vec<KeyUsageUpdate> = carry
        .updates
        .iter()
        .filter(|u| !position.contains_key(u.key_id.as_str()))
        .cloned()
        .collect();
    let mut all_windows: Vec<RateWindowWrite> = carry
        .windows
        .iter()
        .filter(|w| !window_position.contains_key(&(w.key_id.as_str(), w.feature.as_str())))
        .cloned()
        .collect();
    all_windows.extend(windows);
    let carried_events = carry.events.len();
    let mut events = carry.events;
    events.extend(new_events);
    let mut all_updates = carried_updates;
    all_updates.extend(updates);

    let outcomes: Vec<OutcomeWrite> = jobs.iter().filter_map(|j| j.job.outcome.clone()).collect();
    let health: Vec<HealthWrite> = jobs
        .iter()
        .flat_map(|j| j.job.health.iter().cloned())
        .collect();
    let tiers: Vec<TierCooldownWrite> = jobs
        .iter()
        .flat_map(|j| j.job.tiers.iter().cloned())
        .collect();
    let started = std::time::Instant::now();
    let outcome = db
        .commit_batch(&Batch {
            events: &events,
            updates: &all_updates,
            outcomes: &outcomes,
            health: &health,
            tiers: &tiers,
            windows: &all_windows,
        })
        .await;
    let job_outcome = match &outcome {
        Ok(()) => JobOutcome::Committed,
        Err(StoreError::Uncertain(_)) => JobOutcome::Uncertain,
        Err(_) => JobOutcome::Failed,
    };
    for job in jobs {
        let _ = job.ack.send(job_outcome);
    }
    let took = started.elapsed();
    tracing::debug!(target: "keypooler::ledger", serves = events.len(), keys = all_updates.len(), micros = took.as_micros() as u64, "batch committed");
    meters.batch_size.record(events.len() as f64);
    meters.duration.record(took.as_secs_f64());
    match outcome {
        Ok(()) => {
            meters.committed.increment(1);
            let mut committed = Vec::with_capacity(live.len());
            for (s, event) in live.into_iter().zip(&events[carried_events..]) {
                let _ = s.ack.send(Ok(event.id.clone()));
                committed.push(s.reservation);
            }
            // After the acks (off their path); a report that outruns this reads the database.
            for (r, event) in committed.into_iter().zip(&events[carried_events..]) {
                if let Ok(id) = uuid::Uuid::try_parse(&event.id) {
                    recent.insert(
                        id.as_u128(),
                        RecentServe {
                            key_id: r.key.id.clone(),
                            consumer_id: r.consumer_id,
                            created_at: r.at,
                            outcome: None,
                        },
                    );
                }
            }
            Uncertain::default()
        }
        Err(StoreError::Uncertain(detail)) => {
            // Maybe applied: keep the counts (never over-serve) and re-send the rows later.
            meters.uncertain.increment(1);
            tracing::warn!(error = %detail, serves = live.len(), "usage commit outcome unknown; serves answered 503, counted, and re-sent with the next commit");
            for s in live {
                let _ = s.ack.send(Err(CommitFailed));
            }
            Uncertain {
                events,
                updates: all_updates,
                windows: all_windows,
            }
        }
        Err(e) => {
            meters.failed.increment(1);
            tracing::error!(error = %e, serves = live.len(), "usage commit failed; serves answered 503 and given back");
            give_back(live);
            events.truncate(carried_events);
            Uncertain {
                events,
                updates: carry.updates,
                windows: carry.windows,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(max_serves: usize, max_bytes: usize) -> Backlog {
        Backlog {
            limits: BacklogLimits {
                max_serves,
                max_bytes,
            },
            refusing: AtomicBool::new(false),
        }
    }

    fn uncertain(serves: usize) -> Uncertain {
        let event = UsageEvent {
            id: "0190a0a0-0000-7000-8000-000000000000".into(),
            key_id: "key".into(),
            consumer_id: "admin".into(),
            feature: "scrape".into(),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            outcome: None,
            cost: 1,
        };
        Uncertain {
            events: vec![event; serves],
            updates: Vec::new(),
            windows: Vec::new(),
        }
    }

    #[test]
    fn the_backlog_is_full_at_either_bound_and_clears_when_drained() {
        let by_count = backlog(2, usize::MAX);
        assert!(!by_count.full(&uncertain(1)));
        assert!(by_count.full(&uncertain(2)));
        assert!(!by_count.full(&Uncertain::default()));

        let one = uncertain(1).approx_bytes();
        assert!(one > std::mem::size_of::<UsageEvent>());
        let by_bytes = backlog(usize::MAX, 3 * one);
        assert!(!by_bytes.full(&uncertain(2)));
        assert!(by_bytes.full(&uncertain(3)));
    }
}
