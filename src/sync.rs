//! Propagation between replicas sharing one database (SPEC §8.7, issue 14 item 3).
//!
//! Triggers (migration 013) log every write to pool state as `(seq, entity, id)`. Every
//! `SYNC_INTERVAL_MS` this task reads the log after its position and, under the admin lock,
//! reads back only the entities named and applies them to the pool in place — the same
//! `follow` an unconfirmed admin write uses, so counters, rate windows and rotation places are
//! kept. Nothing here runs on `/key`. A replica's own writes come back too; applying them is a
//! no-op in effect (same record; health only when the stored state is newer). A replica whose
//! position fell below what pruning removed, or that has more distinct changes to read than
//! `RESYNC_ABOVE`, refreshes from one snapshot instead (still in place). Each replica prunes
//! the log now and then: rows older than `LogBound::keep_for` and beyond the newest
//! `LogBound::keep_rows` go.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::api::write::Stored;
use crate::api::AppState;
use crate::model::{ConsumerRecord, KeyRecord, TierRecord};
use crate::pool::Now;
use crate::store::sync::ChangePage;
use crate::store::StoreError;

/// Log rows read per query; a full page is followed by the next at once.
pub const PAGE: i64 = 1000;
/// More distinct entities than this in one poll: one snapshot costs less than reading each.
pub const RESYNC_ABOVE: usize = 200;

/// How long and how much of the log is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBound {
    /// Rows older than this go (a replica away longer resyncs from a snapshot).
    pub keep_for: Duration,
    /// At most this many newest rows stay (a burst such as a 10,000-key import or a rekey).
    pub keep_rows: i64,
    /// How often a replica prunes.
    pub every: Duration,
}

impl Default for LogBound {
    fn default() -> LogBound {
        LogBound {
            keep_for: Duration::from_secs(600),
            keep_rows: 100_000,
            every: Duration::from_secs(60),
        }
    }
}

/// What changed, in the order a poll applies it: tiers before the keys placed in them, keys
/// before their health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    Tier,
    Key,
    Health,
    Cooldown,
    Consumer,
}

impl Entity {
    /// The log's name for it; an unknown name (a newer writer's) is skipped.
    pub fn parse(name: &str) -> Option<Entity> {
        Some(match name {
            "tier" => Entity::Tier,
            "key" => Entity::Key,
            "health" => Entity::Health,
            "cooldown" => Entity::Cooldown,
            "consumer" => Entity::Consumer,
            _ => return None,
        })
    }
}

/// What one poll does with a page read after `last`.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing new.
    Idle,
    /// Rows this replica never read were pruned, or too many changed: refresh from a snapshot.
    Resync,
    /// Read back and apply each entity once, then stand at `through`.
    Apply {
        through: i64,
        targets: Vec<(Entity, String)>,
    },
}

/// Decides a poll from its page (pure, so tested without a database).
pub fn plan(last: i64, page: &ChangePage, resync_above: usize) -> Plan {
    if page.pruned_through > last {
        return Plan::Resync;
    }
    let Some(through) = page.changes.iter().map(|c| c.seq).max() else {
        return Plan::Idle;
    };
    let targets: BTreeSet<(Entity, String)> = page
        .changes
        .iter()
        .filter_map(|c| Some((Entity::parse(&c.entity)?, c.id.clone())))
        .collect();
    if targets.len() > resync_above {
        return Plan::Resync;
    }
    Plan::Apply {
        through,
        targets: targets.into_iter().collect(),
    }
}

/// The poller's position and its pruning schedule.
pub struct Poller {
    last: i64,
    bound: LogBound,
    pruned_at: Option<Instant>,
}

impl Poller {
    /// A poller standing at `last` (the log's end read before the pool was loaded).
    pub fn new(last: i64, bound: LogBound) -> Poller {
        Poller {
            last,
            bound,
            pruned_at: None,
        }
    }

    pub fn position(&self) -> i64 {
        self.last
    }

    /// Reads the log until it is drained and applies what it names; prunes when due.
    pub async fn poll(&mut self, state: &AppState) -> Result<(), StoreError> {
        loop {
            let page = state.db.changes_since(self.last, PAGE).await?;
            let full = page.changes.len() as i64 >= PAGE;
            match plan(self.last, &page, RESYNC_ABOVE) {
                Plan::Idle => break,
                Plan::Resync => {
                    self.last = resync(state).await?;
                    break;
                }
                Plan::Apply { through, targets } => {
                    apply(state, &targets).await?;
                    self.last = through;
                }
            }
            if !full {
                break;
            }
        }
        if self
            .pruned_at
            .is_none_or(|at| at.elapsed() >= self.bound.every)
        {
            self.pruned_at = Some(Instant::now());
            prune(&state.db, self.bound).await?;
        }
        Ok(())
    }
}

/// Prunes the log to `bound`; returns how many rows went.
pub async fn prune(db: &crate::store::Db, bound: LogBound) -> Result<u64, StoreError> {
    let keep_for = i64::try_from(bound.keep_for.as_secs()).unwrap_or(i64::MAX);
    let before = chrono::Utc::now().timestamp().saturating_sub(keep_for);
    let pruned = db.prune_change_log(before, bound.keep_rows).await?;
    if pruned > 0 {
        tracing::debug!(rows = pruned, "change log pruned");
    }
    Ok(pruned)
}

/// Reads back each target and makes the pool hold it, under the admin lock so a local admin
/// write is never overwritten by an older read.
async fn apply(state: &AppState, targets: &[(Entity, String)]) -> Result<(), StoreError> {
    let _admin = state.admin_writes.lock().await;
    let mut tiers_changed = false;
    for (entity, id) in targets {
        match entity {
            Entity::Tier => {
                let tier = state.db.poll_tier(id).await?;
                TierRecord::follow(state, id, tier.as_ref());
                tiers_changed = true;
            }
            // RegBot keys are not stored; each replica refreshes them from RegBot itself.
            Entity::Key if id.starts_with(crate::store::regbot::KEY_PREFIX) => {}
            Entity::Key => {
                let key = state.db.poll_key(id).await?;
                KeyRecord::follow(state, id, key.as_ref());
            }
            Entity::Health => {
                if let Some(stored) = state.db.poll_health(id).await? {
                    state.pool.apply_stored_health(id, &stored, Now::read());
                }
            }
            Entity::Cooldown => {
                if let Some(until) = state.db.poll_cooldown(id).await? {
                    state.pool.apply_tier_cooldown(id, until, Now::read());
                }
            }
            Entity::Consumer => {
                let consumer = state.db.poll_consumer(id).await?;
                ConsumerRecord::follow(state, id, consumer.as_ref());
            }
        }
    }
    if tiers_changed {
        if let Some(source) = &state.regbot {
            source.wake();
        }
    }
    Ok(())
}

/// Makes the pool hold what one snapshot holds, in place (counters, windows and rotation kept);
/// returns the log position read before the snapshot.
async fn resync(state: &AppState) -> Result<i64, StoreError> {
    let _admin = state.admin_writes.lock().await;
    let position = state.db.change_log_position().await?;
    let snapshot = state.db.load_snapshot().await?;
    let held = state.pool.stored_ids();
    let now = Now::read();
    let stored: BTreeSet<&str> = snapshot.tiers.iter().map(|t| t.id.as_str()).collect();
    for tier in &snapshot.tiers {
        TierRecord::follow(state, &tier.id, Some(tier));
    }
    for id in held.tiers.iter().filter(|id| !stored.contains(&***id)) {
        TierRecord::follow(state, id, None);
    }
    let stored: BTreeSet<&str> = snapshot.keys.iter().map(|k| k.id.as_str()).collect();
    for key in &snapshot.keys {
        KeyRecord::follow(state, &key.id, Some(key));
    }
    for id in held.keys.iter().filter(|id| !stored.contains(&***id)) {
        KeyRecord::follow(state, id, None);
    }
    for (id, health) in &snapshot.health {
        state.pool.apply_stored_health(id, health, now);
    }
    for (id, until) in &snapshot.tier_cooldowns {
        state.pool.apply_tier_cooldown(id, *until, now);
    }
    let stored: BTreeSet<&str> = snapshot.consumers.iter().map(|c| c.id.as_str()).collect();
    for consumer in &snapshot.consumers {
        ConsumerRecord::follow(state, &consumer.id, Some(consumer));
    }
    for id in held.consumers.iter().filter(|id| !stored.contains(&***id)) {
        ConsumerRecord::follow(state, id, None);
    }
    if let Some(source) = &state.regbot {
        source.wake();
    }
    tracing::info!(
        position,
        "pool refreshed from a snapshot (this replica was behind the change log)"
    );
    Ok(position)
}

/// Polls every `interval` until the service is gone. A failed poll keeps its position and is
/// tried again at the next tick (a warning once per failure streak).
pub fn spawn(state: Weak<AppState>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut failing = false;
        loop {
            ticks.tick().await;
            let Some(state) = state.upgrade() else { return };
            match state.catch_up().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("change log readable again; this replica is in step");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "reading the change log failed; changes made by other replicas wait until it succeeds");
                    }
                    failing = true;
                }
            }
            drop(state);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sync::Change;

    fn page(pruned_through: i64, rows: &[(i64, &str, &str)]) -> ChangePage {
        ChangePage {
            pruned_through,
            changes: rows
                .iter()
                .map(|(seq, entity, id)| Change {
                    seq: *seq,
                    entity: entity.to_string(),
                    id: id.to_string(),
                })
                .collect(),
        }
    }

    // Issue 14 item 3: what a poll does with the page it read.
    #[test]
    fn an_empty_page_changes_nothing() {
        assert_eq!(plan(7, &page(0, &[]), RESYNC_ABOVE), Plan::Idle);
        assert_eq!(plan(7, &page(7, &[]), RESYNC_ABOVE), Plan::Idle);
    }

    #[test]
    fn each_entity_is_read_once_tiers_before_keys_before_health() {
        let p = page(
            3,
            &[
                (4, "health", "k1"),
                (5, "key", "k1"),
                (6, "tier", "t1"),
                (7, "key", "k1"),
                (8, "consumer", "c1"),
                (9, "cooldown", "t1"),
                (10, "someday", "x"),
            ],
        );
        assert_eq!(
            plan(3, &p, RESYNC_ABOVE),
            Plan::Apply {
                through: 10,
                targets: vec![
                    (Entity::Tier, "t1".into()),
                    (Entity::Key, "k1".into()),
                    (Entity::Health, "k1".into()),
                    (Entity::Cooldown, "t1".into()),
                    (Entity::Consumer, "c1".into()),
                ],
            }
        );
    }

    #[test]
    fn a_replica_behind_the_pruned_end_resyncs() {
        assert_eq!(
            plan(3, &page(4, &[(5, "key", "k")]), RESYNC_ABOVE),
            Plan::Resync
        );
        // Standing exactly at the pruned end missed nothing.
        assert!(matches!(
            plan(4, &page(4, &[(5, "key", "k")]), RESYNC_ABOVE),
            Plan::Apply { through: 5, .. }
        ));
    }

    #[test]
    fn too_many_distinct_changes_resync_but_repeats_do_not_count() {
        let many: Vec<(i64, String)> = (1..=3).map(|i| (i, format!("k{i}"))).collect();
        let rows: Vec<(i64, &str, &str)> = many
            .iter()
            .map(|(s, id)| (*s, "key", id.as_str()))
            .collect();
        assert_eq!(plan(0, &page(0, &rows), 2), Plan::Resync);
        let same: Vec<(i64, &str, &str)> = (1..=50).map(|s| (s, "key", "k")).collect();
        assert!(matches!(
            plan(0, &page(0, &same), 2),
            Plan::Apply { through: 50, .. }
        ));
    }

    // Issue 14 item 3: applying what the database holds never undoes a newer state here.
    mod applying {
        use crate::pool::health::{HealthRecord, Reason, StateKind};
        use crate::pool::{stored_health_is_newer, tests, Caller, Draw, Now, Pool};
        use chrono::TimeDelta;

        fn pool() -> Pool {
            tests::pool(
                vec![tests::tier("t", &[("f", 100, 60)])],
                vec![tests::key("k", "t")],
                vec![],
            )
        }

        fn record(state: StateKind, changed_at: Now, until: Option<Now>) -> HealthRecord {
            HealthRecord {
                state,
                reason: Some(Reason::Operator),
                until: until.map(|u| u.wall),
                last_status: None,
                strikes: 0,
                changed_at: Some(changed_at.wall),
                memory: Default::default(),
            }
        }

        fn serves(pool: &Pool, now: Now) -> bool {
            matches!(
                pool.draw(&Caller::Admin, "f", now, |_, _| ()),
                Draw::Served(())
            )
        }

        #[test]
        fn newer_means_strictly_later_and_never_is_oldest() {
            let t = Now::read().wall;
            let later = t + TimeDelta::seconds(1);
            assert!(stored_health_is_newer(Some(later), Some(t)));
            assert!(stored_health_is_newer(Some(t), None));
            assert!(!stored_health_is_newer(Some(t), Some(t)));
            assert!(!stored_health_is_newer(Some(t), Some(later)));
            assert!(!stored_health_is_newer(None, None));
        }

        #[test]
        fn a_newer_stored_state_is_taken_an_older_or_own_one_is_not() {
            let pool = pool();
            let now = Now::read();
            // Another replica disabled the key: taken, and the key stops serving.
            let disabled = record(StateKind::Disabled, now, None);
            assert!(pool.apply_stored_health("k", &disabled, now));
            assert!(!serves(&pool, now));
            // The same record again (this replica's own write coming back): nothing happens.
            assert!(!pool.apply_stored_health("k", &disabled, now));
            // An older record (an active state from before the disable) does not undo it.
            let mut older = record(StateKind::Active, now, None);
            older.changed_at = Some(now.wall - TimeDelta::seconds(5));
            assert!(!pool.apply_stored_health("k", &older, now));
            assert_eq!(
                pool.key("k").map(|k| k.health().state),
                Some(StateKind::Disabled)
            );
            // A later enable is taken.
            let mut enabled = record(StateKind::Active, now, None);
            enabled.changed_at = Some(now.wall + TimeDelta::milliseconds(1));
            assert!(pool.apply_stored_health("k", &enabled, now));
            assert!(serves(&pool, now));
            // A quarantine until later holds the key out of draws.
            let mut quarantined = record(StateKind::Quarantined, now, None);
            quarantined.changed_at = Some(now.wall + TimeDelta::milliseconds(2));
            quarantined.until = Some(now.wall + TimeDelta::hours(1));
            assert!(pool.apply_stored_health("k", &quarantined, now));
            assert!(!serves(&pool, now));
            assert!(!pool.apply_stored_health("gone", &quarantined, now));
        }

        #[test]
        fn a_stored_cooldown_only_ever_extends_the_tiers() {
            let pool = pool();
            let now = Now::read();
            assert!(!pool.apply_tier_cooldown("t", now.wall - TimeDelta::seconds(1), now));
            assert!(!pool.tier_throttled("t", now.mono));
            assert!(pool.apply_tier_cooldown("t", now.wall + TimeDelta::seconds(60), now));
            assert!(pool.tier_throttled("t", now.mono));
            assert!(!serves(&pool, now));
            // A shorter one changes nothing; a longer one extends.
            assert!(!pool.apply_tier_cooldown("t", now.wall + TimeDelta::seconds(30), now));
            assert!(pool.apply_tier_cooldown("t", now.wall + TimeDelta::seconds(90), now));
            assert!(!pool.apply_tier_cooldown("missing", now.wall + TimeDelta::seconds(90), now));
        }
    }
}
