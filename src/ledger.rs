//! The group-commit writer: serves go in, one transaction per batch, acks come out.
//!
//! Guarantee: a serve is acknowledged only after its audit row and its key's counters are
//! committed, so a 200 never leaves for an uncounted or unaudited serve. Batching policy: no
//! timer — whatever queued while the previous transaction ran (up to `MAX_BATCH`) goes into
//! the next one, so an idle server commits each serve at once and a busy one amortises.
//!
//! Ordering: the pool hands a key's reservations to `submit` while holding that key's lock, so
//! they queue in counting order and the last one of a key in a batch carries its newest
//! absolute counters. When a commit fails, each key is rolled back to before its earliest
//! failed serve and every later reservation of that key (already queued) is voided.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::model::{KeyUsageUpdate, UsageEvent};
use crate::pool::{PoolKey, Reservation};
use crate::store::Db;

/// Serves committed together at most.
pub const MAX_BATCH: usize = 512;
/// Times the writer yields to running requests before committing what it has.
const MAX_YIELDS: usize = 2;

/// The serve could not be recorded; its count was given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("usage could not be recorded")]
pub struct CommitFailed;

struct Serve {
    reservation: Reservation,
    ack: oneshot::Sender<Result<(), CommitFailed>>,
}

enum Message {
    Serve(Serve),
    Shutdown,
}

/// A submitted serve awaiting its commit.
pub struct Pending {
    pub key: Arc<PoolKey>,
    ack: oneshot::Receiver<Result<(), CommitFailed>>,
}

impl Pending {
    /// Resolves once the serve is durable (or failed and was given back).
    pub async fn committed(self) -> Result<Arc<PoolKey>, CommitFailed> {
        match self.ack.await {
            Ok(Ok(())) => Ok(self.key),
            _ => Err(CommitFailed),
        }
    }
}

/// Handle to the writer task.
pub struct Ledger {
    queue: mpsc::UnboundedSender<Message>,
    worker: parking_lot::Mutex<Option<JoinHandle<()>>>,
}

impl Ledger {
    pub fn start(db: Db) -> Ledger {
        let (queue, inbox) = mpsc::unbounded_channel();
        let worker = tokio::spawn(run(db, inbox));
        Ledger {
            queue,
            worker: parking_lot::Mutex::new(Some(worker)),
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

    /// Commits everything queued so far, then stops the writer.
    pub async fn shutdown(&self) {
        let _ = self.queue.send(Message::Shutdown);
        let worker = self.worker.lock().take();
        if let Some(worker) = worker {
            if let Err(e) = worker.await {
                tracing::error!(error = %e, "ledger writer ended abnormally");
            }
        }
    }
}

async fn run(db: Db, mut inbox: mpsc::UnboundedReceiver<Message>) {
    let mut stopping = false;
    while !stopping {
        let mut batch = Vec::new();
        match inbox.recv().await {
            Some(Message::Serve(s)) => batch.push(s),
            Some(Message::Shutdown) | None => stopping = true,
        }
        // Drain what is queued; then let the requests already running on this runtime reach
        // the queue too (one yield), as long as that keeps growing the batch.
        let mut yields = 0;
        while batch.len() < MAX_BATCH && !stopping {
            match inbox.try_recv() {
                Ok(Message::Serve(s)) => batch.push(s),
                Ok(Message::Shutdown) => stopping = true,
                Err(_) if yields < MAX_YIELDS => {
                    yields += 1;
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        if stopping {
            inbox.close();
            while let Ok(message) = inbox.try_recv() {
                if let Message::Serve(s) = message {
                    batch.push(s);
                }
            }
        }
        for chunk in chunked(batch) {
            commit(&db, chunk).await;
        }
    }
    tracing::debug!("ledger writer stopped with nothing pending");
}

fn chunked(mut batch: Vec<Serve>) -> Vec<Vec<Serve>> {
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

async fn commit(db: &Db, batch: Vec<Serve>) {
    let (live, stale): (Vec<Serve>, Vec<Serve>) = batch
        .into_iter()
        .partition(|s| s.reservation.key.is_current(&s.reservation));
    for s in stale {
        s.reservation.key.give_back_rate(&s.reservation);
        let _ = s.ack.send(Err(CommitFailed));
    }
    if live.is_empty() {
        return;
    }

    let events: Vec<UsageEvent> = live
        .iter()
        .map(|s| UsageEvent {
            // Time-ordered (v7): each audit row appends to the primary-key index instead of
            // dirtying a random page per row, which made commits 2-3x slower with v4.
            id: uuid::Uuid::now_v7().to_string(),
            key_id: s.reservation.key.id.to_string(),
            consumer_id: s.reservation.consumer_id.to_string(),
            feature: s.reservation.feature.clone(),
            created_at: s.reservation.at,
        })
        .collect();
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

    let started = std::time::Instant::now();
    let outcome = db.commit_serves(&events, &updates).await;
    tracing::debug!(target: "keypooler::ledger", serves = events.len(), keys = updates.len(), micros = started.elapsed().as_micros() as u64, "batch committed");
    match outcome {
        Ok(()) => {
            for s in live {
                let _ = s.ack.send(Ok(()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, serves = live.len(), "usage commit failed; serves answered 503 and given back");
            let mut reverted: HashSet<Arc<str>> = HashSet::new();
            for s in live {
                let key = &s.reservation.key;
                if reverted.insert(key.id.clone()) {
                    key.revert_usage(&s.reservation);
                }
                key.give_back_rate(&s.reservation);
                let _ = s.ack.send(Err(CommitFailed));
            }
        }
    }
}
