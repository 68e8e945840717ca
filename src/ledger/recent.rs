//! The most recent committed serves, in memory, so an outcome report on one needs no database
//! read (SPEC §8.2): who received it, which key, when, and its outcome once one is recorded.
//!
//! Bounded: the newest `CAPACITY` serves (about 100 bytes each with the map's overhead), in shards so the group commit
//! adding a batch and reports looking serves up rarely meet on a lock. An older serve, or one
//! of another process or from before a restart, is read from the database instead — the
//! database stays the truth; this only saves the read.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
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

/// Hashes a serve id (a UUID v7's bits) with one folded multiply instead of SipHash: the ids
/// are not chosen by callers (a report only looks up, and a miss reads the database), and 62
/// of their bits are random, so a keyed hash buys nothing here.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u128(&mut self, id: u128) {
        self.write_u64(id as u64 ^ (id >> 64) as u64);
    }

    fn write_u64(&mut self, word: u64) {
        // Both halves of the 128-bit product folded: every input bit reaches the low bits
        // (the bucket) and the top ones (hashbrown's tag), though a shard's ids share low bits.
        let product = u128::from(self.0 ^ word) * 0x9e37_79b9_7f4a_7c15;
        self.0 = product as u64 ^ (product >> 64) as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct Shard {
    serves: HashMap<u128, RecentServe, BuildHasherDefault<IdHasher>>,
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

    /// `read` applied to the serve, if kept, under its shard's lock: a caller takes only what it
    /// needs (a report checks the consumer in place instead of cloning both shared `Arc`s,
    /// whose counts every report on every core would otherwise bump).
    pub fn with<T>(&self, id: u128, read: impl FnOnce(&RecentServe) -> T) -> Option<T> {
        self.shard(id).lock().serves.get(&id).map(read)
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
        let get = |id| recent.with(id, RecentServe::clone);
        assert!(get(0).is_none(), "the oldest are forgotten");
        let newest = CAPACITY as u128 + SHARDS as u128 - 1;
        assert!(get(newest).is_some());
        recent.set_outcome(newest, OutcomeClass::Ok, Some(200));
        recent.set_outcome(newest, OutcomeClass::RateLimited, Some(429));
        assert_eq!(
            get(newest).unwrap().outcome,
            Some((OutcomeClass::Ok, Some(200)))
        );
    }

    #[test]
    fn a_shards_ids_spread_over_buckets_and_tags() {
        use std::hash::BuildHasher;
        // One shard's ids share their low 4 bits; their hashes must not (the bucket index is
        // the hash's low bits, hashbrown's tag its top 7).
        let hasher = BuildHasherDefault::<IdHasher>::default();
        let mut low = std::collections::HashSet::new();
        let mut top = std::collections::HashSet::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (0x0190_0000_0000_7000_u128 << 64) | u128::from(x << 4 | 0x3);
            let h = hasher.hash_one(id);
            low.insert(h & 0xfff);
            top.insert(h >> 57);
        }
        assert!(low.len() > 2000, "{} of 4096 low values", low.len());
        assert_eq!(top.len(), 128);
    }
}
