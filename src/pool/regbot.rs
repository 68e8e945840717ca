//! RegBot credentials in the pool (SPEC §8.5): a key `regbot:N` per active credential, built by
//! a refresh, and the swap that puts a refresh's keys in place for every tier at once.
//!
//! A RegBot key is a `PoolKey` like any other — the draw, gates, health and audit treat both
//! kinds alike — whose value lives in memory only and whose budget comes from RegBot's quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::health::{Health, HealthRecord, StateKind};
use super::{gates, Index, KeyCounters, KeyMaterial, Now, Pool, PoolKey};
use crate::model::{HealthWrite, RegbotKeyRow};
use crate::secret::Secret;
use crate::store::regbot::SeenWrite;

/// What `/admin/keys` shows of a RegBot credential's quota, and what the next refresh
/// compares with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegbotQuota {
    pub total: Option<i64>,
    pub used: i64,
    pub unit: String,
    /// Our usage count when RegBot's `quota_used` was last seen to change.
    pub usage_at_seen: i64,
    /// Keyed hash of the row's `api_key` and `updated_at`.
    pub fingerprint: String,
}

/// One active, well-formed RegBot row, ready to become a key.
pub struct Credential {
    pub id: i64,
    pub name: String,
    pub value: Secret,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub quota_total: Option<i64>,
    pub quota_used: i64,
    pub quota_unit: String,
    pub fingerprint: String,
}

impl Credential {
    pub fn key_id(&self) -> String {
        format!("{}{}", crate::store::regbot::KEY_PREFIX, self.id)
    }
}

/// SPEC §8.5's budget as a usage limit on our own count: "not served once `quota_used` plus
/// the units served here since RegBot last changed `quota_used` reaches `quota_total`", i.e.
/// `count - usage_at_seen < total - used`. `None` (no cap) when RegBot gives no total.
pub fn budget_limit(total: Option<i64>, used: i64, usage_at_seen: i64) -> Option<i64> {
    total.map(|t| t.saturating_sub(used).max(0).saturating_add(usage_at_seen))
}

/// What building a key found to write: its quota baseline or fingerprint changed, or a
/// quarantine is lifted for a probe because RegBot changed the row.
#[derive(Default)]
pub struct Writes {
    pub seen: Option<SeenWrite>,
    pub health: Option<HealthWrite>,
}

impl PoolKey {
    /// The key for `credential` in tier `tier_id`. `previous`: the key's last version in this
    /// process (its counters, rate windows and health carry over); else `stored` counters and
    /// health from our database (after a restart).
    pub fn from_credential(
        credential: Credential,
        tier_id: Arc<str>,
        previous: Option<&PoolKey>,
        stored: Option<&RegbotKeyRow>,
        stored_health: Option<&HealthRecord>,
        now: Now,
    ) -> (PoolKey, Writes) {
        let id: Arc<str> = Arc::from(credential.key_id());
        let (counters, budget_free_at, last_served) = match previous {
            Some(p) => (
                p.counters.clone(),
                p.budget_free_at.clone(),
                p.last_served.load(Ordering::Relaxed),
            ),
            None => {
                let counters = KeyCounters {
                    usage: gates::UsageState {
                        count: stored.map_or(0, |s| s.usage_count),
                        window_start: None,
                    },
                    rates: HashMap::new(),
                    generation: 0,
                    budget_version: 0,
                    health: stored_health
                        .map(|h| Health::restore(h, now))
                        .unwrap_or_default(),
                };
                (Arc::new(Mutex::new(counters)), Arc::default(), 0)
            }
        };
        let (seen_used, seen_at, seen_fingerprint) = match previous.and_then(|p| p.regbot.as_ref())
        {
            Some(q) => (Some(q.used), q.usage_at_seen, Some(q.fingerprint.clone())),
            None => match stored {
                Some(s) => (s.quota_used_seen, s.usage_at_seen, s.fingerprint.clone()),
                None => (None, 0, None),
            },
        };
        let mut writes = Writes::default();
        let mut guard = counters.lock();
        let usage_at_seen = if seen_used == Some(credential.quota_used) {
            seen_at
        } else {
            guard.usage.count
        };
        let fingerprint_changed = seen_fingerprint
            .as_ref()
            .is_some_and(|f| *f != credential.fingerprint);
        // SPEC §8.5 / issue 12 item 6: a quarantine holds until RegBot changes the row's key or
        // its updated_at; then the key is probed again at once.
        if fingerprint_changed && guard.health.kind() == StateKind::Quarantined {
            let record = HealthRecord {
                until: Some(now.wall),
                ..guard.health.record()
            };
            guard.health = Health::restore(&record, now);
            writes.health = Some(HealthWrite {
                key_id: id.to_string(),
                record,
            });
        }
        drop(guard);
        if seen_used != Some(credential.quota_used)
            || usage_at_seen != seen_at
            || seen_fingerprint.as_deref() != Some(credential.fingerprint.as_str())
        {
            writes.seen = Some(SeenWrite {
                key_id: id.to_string(),
                quota_used_seen: Some(credential.quota_used),
                usage_at_seen,
                fingerprint: credential.fingerprint.clone(),
            });
        }
        let quota = RegbotQuota {
            total: credential.quota_total,
            used: credential.quota_used,
            unit: credential.quota_unit,
            usage_at_seen,
            fingerprint: credential.fingerprint,
        };
        let mut key = PoolKey {
            id,
            name: credential.name,
            tier_id,
            expires_at: None,
            budget: gates::UsageBudget {
                usage_limit: budget_limit(quota.total, quota.used, usage_at_seen),
                usage_window_seconds: None,
            },
            metadata: credential.metadata,
            material: Ok(KeyMaterial {
                value: credential.value,
                secrets: Default::default(),
            }),
            secret_names: Vec::new(),
            counters,
            paused: false,
            budget_free_at,
            version: 0,
            last_served: AtomicI64::new(last_served),
            regbot: Some(Arc::new(quota)),
        };
        // The budget may have changed: this version takes it over, "not known to be spent"
        // until a draw checks it again.
        key.take_over_budget();
        (key, writes)
    }

    /// Units served here since RegBot last changed `quota_used` (a RegBot key; 0 otherwise).
    pub fn served_since_seen(&self) -> i64 {
        let at = self.regbot.as_ref().map_or(0, |q| q.usage_at_seen);
        (self.counters.lock().usage.count - at).max(0)
    }
}

impl Pool {
    /// Replaces every RegBot key with `keys`, under one write lock: a draw sees the old set or
    /// the new one, never a mix. A key whose tier is gone meanwhile is dropped. Serves already
    /// reserved on a key that leaves complete (they hold the key).
    pub fn swap_regbot(&self, keys: &[Arc<PoolKey>]) {
        let mut index = self.index.write();
        let Index {
            tiers, keys: by_id, ..
        } = &mut *index;
        by_id.retain(|_, k| k.regbot.is_none());
        for tier in tiers.values_mut() {
            tier.keys.retain(|k| k.regbot.is_none());
        }
        for key in keys {
            if let Some(tier) = tiers.get_mut(&key.tier_id) {
                tier.keys.push(key.clone());
                by_id.insert(key.id.clone(), key.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 12 item 4: the budget of SPEC §8.5.
    #[test]
    fn budget_is_what_regbot_left_plus_what_we_served_since() {
        assert_eq!(budget_limit(None, 5, 3), None);
        assert_eq!(budget_limit(Some(10), 4, 0), Some(6));
        assert_eq!(budget_limit(Some(10), 4, 7), Some(13));
        assert_eq!(
            budget_limit(Some(10), 12, 7),
            Some(7),
            "overspent: nothing more"
        );
    }
}
