//! Writes whose answer must tell the truth: the write-timeout marker, admin writes that run
//! "database, then pool" in one piece, and settling a write whose commit was never confirmed.
//!
//! Guarantees: once a request's write is under way (a serve counted, an admin write holding
//! the admin lock) the write timeout no longer answers for it; an admin write cannot be cut
//! between the database and the pool (not by the timeout, not by a client that disconnects);
//! and after an uncertain commit the pool is made to agree with what the database holds before
//! the answer leaves — or, if the database cannot be read, as soon as it can.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Serialize;

use super::{AppState, SharedState};
use crate::error::ApiError;
use crate::model::{ConsumerRecord, KeyRecord, TierRecord};
use crate::pool::PoolKey;
use crate::store::{Db, StoreError};

const IDLE: u8 = 0;
const WRITING: u8 = 1;
const TIMED_OUT: u8 = 2;

/// Decides, once per request, whether the write timeout or the request's write owns the
/// answer. The middleware puts one in the request's extensions; a handler without it (never
/// in the router) gets a fresh one that no timeout watches.
#[derive(Clone, Default)]
pub struct WriteMarker(Arc<AtomicU8>);

impl WriteMarker {
    /// Claims the answer for a write; `false` if the timeout has already answered.
    pub fn begin_write(&self) -> bool {
        match self
            .0
            .compare_exchange(IDLE, WRITING, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(state) => state == WRITING,
        }
    }

    /// Claims the answer for the timeout; `false` if a write is under way (then its answer,
    /// which waits for the commit, is the one sent).
    pub fn time_out(&self) -> bool {
        self.0
            .compare_exchange(IDLE, TIMED_OUT, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WriteMarker {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts
            .extensions
            .get::<WriteMarker>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The answer to a delete: `{"status": "deleted"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Deleted {
    #[schema(examples("deleted"))]
    status: &'static str,
}

impl Default for Deleted {
    fn default() -> Deleted {
        Deleted { status: "deleted" }
    }
}

/// Runs an admin write — its checks against the pool, the database write and the pool update
/// — under the admin-writes lock in a task of its own. Nothing can stop that task halfway: a
/// client that disconnects drops only the wait for it. If the write timeout answered before
/// the lock was won, the task writes nothing.
pub async fn admin_write<T, F, Fut>(
    state: &SharedState,
    marker: WriteMarker,
    work: F,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(SharedState) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let state = state.clone();
    let task = tokio::spawn(async move {
        let _guard = state.admin_writes.lock().await;
        if !marker.begin_write() {
            return Err(ApiError::Unavailable(
                "request timed out; nothing was changed".into(),
            ));
        }
        work(state.clone()).await
    });
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "an admin write task ended abnormally");
        Err(ApiError::Internal)
    })
}

/// A record an admin write changes: how to read it back and make the pool follow it.
pub trait Stored: Sized + Send + Sync + 'static {
    /// For logs: "tier", "key", "consumer".
    const WHAT: &'static str;
    fn read(db: &Db, id: &str) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send;
    /// Makes the pool hold what the database holds for `id`.
    fn follow(state: &AppState, id: &str, stored: Option<&Self>);
}

impl Stored for TierRecord {
    const WHAT: &'static str = "tier";

    fn read(db: &Db, id: &str) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        db.read_tier(id)
    }

    fn follow(state: &AppState, id: &str, stored: Option<&Self>) {
        match stored {
            Some(tier) => state.pool.put_tier(tier.clone()),
            // Deleted (SPEC §8.3), or never created.
            None => state.pool.remove_tier(id),
        }
    }
}

impl Stored for KeyRecord {
    const WHAT: &'static str = "key";

    fn read(db: &Db, id: &str) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        db.read_key(id)
    }

    fn follow(state: &AppState, id: &str, stored: Option<&Self>) {
        match (stored, state.pool.key(id)) {
            (Some(key), None) => {
                state
                    .pool
                    .add_key(PoolKey::from_record(key.clone(), &state.sealer));
            }
            // A key already in the pool takes the stored fields but keeps its counters: they
            // run ahead of the database's by the serves still being committed.
            (Some(key), Some(existing)) => {
                let version = existing.patched(key.clone(), &state.sealer, false);
                state.pool.replace_key(std::sync::Arc::new(version));
            }
            (None, _) => {
                state.pool.remove_key(id);
            }
        }
    }
}

impl Stored for ConsumerRecord {
    const WHAT: &'static str = "consumer";

    fn read(db: &Db, id: &str) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        db.read_consumer(id)
    }

    fn follow(state: &AppState, id: &str, stored: Option<&Self>) {
        match stored {
            Some(consumer) => state.pool.put_consumer(consumer.clone()),
            None => {
                state.pool.remove_consumer(id);
            }
        }
    }
}

/// The outcome of deleting record `id` (call it under the admin lock): done → the pool drops it
/// too; unconfirmed → settled by reading it back; no such row → 404 saying `missing`.
pub async fn deleted<R: Stored>(
    state: &SharedState,
    id: &str,
    outcome: Result<(), StoreError>,
    missing: &str,
) -> Result<(), ApiError> {
    match outcome {
        Ok(()) => {
            R::follow(state, id, None);
            Ok(())
        }
        Err(StoreError::Uncertain(detail)) => {
            settle::<R>(state, id, &detail, |s| s.is_none(), |s| s.is_some())
                .await
                .map(|_| ())
        }
        Err(StoreError::NotFound) => Err(ApiError::NotFound(missing.into())),
        Err(e) => Err(e.into()),
    }
}

/// Read-backs tried before the outcome is declared unknown; each is bounded by
/// `DB_BUSY_TIMEOUT_MS`, with a short pause between them.
const READ_BACK_ATTEMPTS: u32 = 3;
const READ_BACK_PAUSE: Duration = Duration::from_millis(100);
/// Reads back, up to `READ_BACK_ATTEMPTS` times, what a commit of unknown outcome left, and
/// answers whether `took` holds for it; `false` when every read fails (the caller then treats
/// the change as not stored and undoes it in memory).
pub async fn read_back<T, Fut>(
    what: &str,
    mut read: impl FnMut() -> Fut,
    took: impl FnOnce(T) -> bool,
) -> bool
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    for attempt in 1..=READ_BACK_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(READ_BACK_PAUSE).await;
        }
        match read().await {
            Ok(found) => return took(found),
            Err(e) => {
                tracing::warn!(error = %e, what, "reading back a commit of unknown outcome failed")
            }
        }
    }
    false
}

/// Background read-backs after that start this often and back off to the maximum.
const RECONCILE_FIRST: Duration = Duration::from_millis(500);
const RECONCILE_MAX: Duration = Duration::from_secs(30);

/// Settles a write to record `id` whose commit was never confirmed (call it under the admin
/// lock): reads the record back, makes the pool agree with the database, and answers `Ok` with
/// the stored record if `applied` holds for it. Otherwise 503: "nothing was changed" if
/// `untouched` holds, "partly applied" if neither does, "outcome unknown" if the database
/// cannot be read — then the pool follows it in the background as soon as it can be.
pub async fn settle<R: Stored>(
    state: &SharedState,
    id: &str,
    detail: &str,
    applied: impl Fn(Option<&R>) -> bool,
    untouched: impl Fn(Option<&R>) -> bool,
) -> Result<Option<R>, ApiError> {
    tracing::warn!(error = %detail, what = R::WHAT, id, "the database did not confirm an admin write; reading it back");
    for attempt in 1..=READ_BACK_ATTEMPTS {
        match R::read(&state.db, id).await {
            Ok(stored) => {
                R::follow(state, id, stored.as_ref());
                return if applied(stored.as_ref()) {
                    tracing::info!(what = R::WHAT, id, "read back: the write took effect");
                    Ok(stored)
                } else if untouched(stored.as_ref()) {
                    tracing::warn!(
                        what = R::WHAT,
                        id,
                        "read back: the write did not take effect"
                    );
                    Err(ApiError::Unavailable(
                        "the database did not take the change; nothing was changed, try again"
                            .into(),
                    ))
                } else {
                    tracing::error!(what = R::WHAT, id, "read back: the write took effect only in part; the pool follows the database");
                    Err(ApiError::Unavailable(
                        "the database took only part of the change; the service now follows what it holds — list before retrying".into(),
                    ))
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, what = R::WHAT, id, attempt, "reading back an unconfirmed admin write failed");
                if attempt < READ_BACK_ATTEMPTS {
                    tokio::time::sleep(READ_BACK_PAUSE * attempt).await;
                }
            }
        }
    }
    reconcile_later::<R>(state, id.to_string());
    Err(ApiError::Unavailable(
        "the database did not confirm the change and cannot be read to check it, so its outcome is unknown; the service will follow what the database holds once it answers — list before retrying".into(),
    ))
}

/// Reads `id` back until the database answers, then makes the pool follow it — under the
/// admin lock, so a later admin write is never overwritten by an older read. Stops when the
/// service is gone.
fn reconcile_later<R: Stored>(state: &SharedState, id: String) {
    let state = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut pause = RECONCILE_FIRST;
        loop {
            tokio::time::sleep(pause).await;
            let Some(state) = state.upgrade() else { return };
            let _guard = state.admin_writes.lock().await;
            match R::read(&state.db, &id).await {
                Ok(stored) => {
                    R::follow(&state, &id, stored.as_ref());
                    tracing::info!(what = R::WHAT, id, present = stored.is_some(), "an unconfirmed admin write was read back; the pool follows the database again");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, what = R::WHAT, id, "reading back an unconfirmed admin write failed; trying again later");
                }
            }
            pause = (pause * 2).min(RECONCILE_MAX);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::WriteMarker;

    #[test]
    fn a_write_under_way_keeps_the_timeout_from_answering() {
        let marker = WriteMarker::default();
        assert!(marker.begin_write());
        assert!(marker.begin_write(), "claiming twice is fine");
        assert!(!marker.time_out());
    }

    #[test]
    fn a_timed_out_request_starts_no_write() {
        let marker = WriteMarker::default();
        assert!(marker.time_out());
        assert!(!marker.begin_write());
    }
}
