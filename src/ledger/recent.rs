//! The most recent committed serves, in memory, so an outcome report on one needs no database
//! read (SPEC §8.2): who received it, which key, when, and its outcome once one is recorded.
//!
//! Bounded: the newest `CAPACITY` serves (about 100 bytes each with the map's overhead), in shards so the group commit
//! adding a batch and reports looking serves up rarely meet on a lock. An older serve, or one
//! of another process or from before a restart, is read from the database instead — the
//! database stays the truth; this only saves the read.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::pool::health::OutcomeClass;
use crate::timestamp::Timestamp;

/// Serves kept: 3,584 per shard fills hashbrown's 4,096 buckets to their 7/8 load factor
/// without doubling them (≈ 6 MiB in all).
pub const CAPACITY: usize = 57_344;
const SHARDS: usize = 16;

/// A committed serve as a report needs it.
#[derive(Clone, Debug)]
pub struct RecentServe {
    pub key_id: Arc<str>,
    pub consumer_id: Arc<str>,
    pub created_at: Timestamp,
    /// The recorded outcome: class and upstream status.
    pub outcome: Option<(OutcomeClass, Option<u16>)>,
}

#[derive(Default)]
struct Shard {
    serves: HashMap<u128, RecentServe>,
    order: VecDeque<u128>,
}

/// See the module doc.
pub struct RecentServes {
    shards: Vec<Mutex<Shard>>,
}

impl Default for RecentServes {
    fn default() -> Self {
        RecentServes {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl RecentServes {
    fn shard(&self, id: u128) -> &Mutex<Shard> {
        // UUID v7: the low bits are random, so they spread serves evenly.
        &self.shards[(id as usize) % SHARDS]
    }

    /// Remembers committed serves, forgetting the oldest past the bound.
    pub fn insert(&self, id: u128, serve: RecentServe) {
        let mut shard = self.shard(id).lock();
        if shard.serves.insert(id, serve).is_none() {
            shard.order.push_back(id);
        }
        while shard.order.len() > CAPACITY / SHARDS {
            if let Some(old) = shard.order.pop_front() {
                shard.serves.remove(&old);
            }
        }
    }

    /// What `f` takes from a kept serve, read under its shard's lock: a report takes only what
    /// it needs, so the shared `Arc`s of ids it only compares are not cloned (an atomic write on
    /// a cache line every core touches).
    pub fn with<T>(&self, id: u128, f: impl FnOnce(&RecentServe) -> T) -> Option<T> {
        self.shard(id).lock().serves.get(&id).map(f)
    }

    /// Notes a serve's committed outcome (if the serve is still kept).
    pub fn set_outcome(&self, id: u128, class: OutcomeClass, status: Option<u16>) {
        if let Some(serve) = self.shard(id).lock().serves.get_mut(&id) {
            serve.outcome.get_or_insert((class, status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve() -> RecentServe {
        RecentServe {
            key_id: Arc::from("k"),
            consumer_id: Arc::from("c"),
            created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            outcome: None,
        }
    }

    #[test]
    fn keeps_the_newest_serves_and_the_first_outcome() {
        let recent = RecentServes::default();
        for id in 0..(CAPACITY as u128 + SHARDS as u128) {
            recent.insert(id, serve());
        }
        assert!(recent.with(0, |_| ()).is_none(), "the oldest are forgotten");
        let newest = CAPACITY as u128 + SHARDS as u128 - 1;
        assert!(recent.with(newest, |_| ()).is_some());
        recent.set_outcome(newest, OutcomeClass::Ok, Some(200));
        recent.set_outcome(newest, OutcomeClass::RateLimited, Some(429));
        assert_eq!(
            recent.with(newest, |serve| serve.outcome),
            Some(Some((OutcomeClass::Ok, Some(200))))
        );
    }
}
