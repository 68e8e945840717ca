//! The most recent committed serves, in memory, so an outcome report on one needs no database
//! read (SPEC §8.2): who received it, which key, when, and its outcome once one is recorded.
//!
//! Bounded and cheap for the group commit, which adds every serve: a direct-mapped table of
//! `CAPACITY` slots (about 64 bytes each) in locked shards; a serve takes the slot its id maps
//! to, replacing whatever was there — no allocation, no eviction list. A serve no longer in
//! its slot (replaced, older, of another process or from before a restart) is read from the
//! database instead: the database stays the truth; this only saves the read.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::pool::health::OutcomeClass;
use crate::timestamp::Timestamp;

/// Slots in all.
pub const CAPACITY: usize = 65_536;
const SHARDS: usize = 16;
const SLOTS_PER_SHARD: usize = CAPACITY / SHARDS;

/// A committed serve as a report needs it.
#[derive(Clone, Debug)]
pub struct RecentServe {
    pub key_id: Arc<str>,
    pub consumer_id: Arc<str>,
    pub created_at: Timestamp,
    /// The recorded outcome: class and upstream status.
    pub outcome: Option<(OutcomeClass, Option<u16>)>,
}

type Shard = Box<[Option<(u128, RecentServe)>]>;

/// See the module doc.
pub struct RecentServes {
    shards: Vec<Mutex<Shard>>,
}

impl Default for RecentServes {
    fn default() -> Self {
        RecentServes {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(vec![None; SLOTS_PER_SHARD].into_boxed_slice()))
                .collect(),
        }
    }
}

impl RecentServes {
    /// The shard and slot of `id`. UUID v7 ends in random bits, so they spread evenly.
    fn place(id: u128) -> (usize, usize) {
        let low = id as usize;
        (low % SHARDS, (low / SHARDS) % SLOTS_PER_SHARD)
    }

    /// Remembers a committed serve in its slot.
    pub fn insert(&self, id: u128, serve: RecentServe) {
        let (shard, slot) = Self::place(id);
        self.shards[shard].lock()[slot] = Some((id, serve));
    }

    pub fn get(&self, id: u128) -> Option<RecentServe> {
        let (shard, slot) = Self::place(id);
        match &self.shards[shard].lock()[slot] {
            Some((held, serve)) if *held == id => Some(serve.clone()),
            _ => None,
        }
    }

    /// Notes a serve's committed outcome (if the serve is still kept).
    pub fn set_outcome(&self, id: u128, class: OutcomeClass, status: Option<u16>) {
        let (shard, slot) = Self::place(id);
        if let Some((held, serve)) = &mut self.shards[shard].lock()[slot] {
            if *held == id {
                serve.outcome.get_or_insert((class, status));
            }
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
        assert!(recent.get(0).is_none(), "replaced by a newer serve");
        assert!(recent.get(SHARDS as u128).is_some(), "not yet replaced");
        assert!(recent.get(u128::MAX).is_none(), "never inserted");
        let newest = CAPACITY as u128 + SHARDS as u128 - 1;
        assert!(recent.get(newest).is_some());
        recent.set_outcome(newest, OutcomeClass::Ok, Some(200));
        recent.set_outcome(newest, OutcomeClass::RateLimited, Some(429));
        assert_eq!(
            recent.get(newest).unwrap().outcome,
            Some((OutcomeClass::Ok, Some(200)))
        );
    }
}
