//! The in-memory pool: tiers, keys, consumers and the per-key counters, with the draw of SPEC §7.
//!
//! Pure logic, no I/O: every method takes `now`. Concurrency: the index sits behind one
//! `RwLock` that draws only read; each key's counters and health (`health.rs`) sit behind the
//! key's own `Mutex`, so draws on different keys never wait for each other. Candidate keys are
//! indexed per feature and tier, so a draw never scans the whole pool. Outcome reports of one
//! tier are handled one at a time under that tier's report lock, which draws never take: a
//! tier's host-throttling cooldown is published to them as one atomic.

pub mod gates;
pub mod health;
pub mod regbot;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use sha2::{Digest, Sha256};

use crate::crypto::{SealError, Sealer};
use crate::metrics::{FeatureMeters, Metrics};
use crate::model::{
    ConsumerRecord, FeatureLimit, KeyRecord, RateWindowWrite, Snapshot, TierCooldownWrite,
    TierRecord,
};
use crate::secret::Secret;
use crate::timestamp::Timestamp;
use gates::{RateWindow, RateWindows, UsageBudget, UsageState, Wait, WindowState};
use health::{
    Admission, Health, HealthRecord, Jitter, Outcome, ReportContext, ServeRef, StateKind,
    TierHealth, TierLoad, Transition,
};

/// The audit id of the admin token on `/key`.
pub const ADMIN_CONSUMER_ID: &str = "admin";

/// The clocks a draw reads: wall time for what is persisted or shown (budget windows, expiry,
/// audit rows) and the monotonic clock for the in-process rate windows (see `gates`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub wall: Timestamp,
    pub mono: Instant,
}

impl Now {
    /// Reads both clocks; wall time in microseconds, the precision the database keeps, so
    /// memory and rows agree exactly.
    pub fn read() -> Now {
        Now {
            wall: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6),
            mono: Instant::now(),
        }
    }
}

/// A key's plaintext value and bound secrets.
pub struct KeyMaterial {
    pub value: Secret,
    pub secrets: BTreeMap<String, Secret>,
}

/// A key in the pool with its live counters.
pub struct PoolKey {
    pub id: Arc<str>,
    pub name: String,
    pub tier_id: Arc<str>,
    pub expires_at: Option<Timestamp>,
    pub budget: UsageBudget,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The decrypted value and secrets, or why they cannot be read (never served then).
    pub material: Result<KeyMaterial, SealError>,
    pub secret_names: Vec<String>,
    /// Shared with the key's earlier versions (SPEC §8.3 PATCH): a serve drawn before a change
    /// commits or gives back into the same counters.
    counters: Arc<Mutex<KeyCounters>>,
    /// Held out of draws while an operator resets its counters (`api/key_state.rs`).
    paused: bool,
    /// When the usage budget frees up (Unix µs; 0 = not known to be spent, `i64::MAX` = never).
    /// Lets a draw step over spent keys with one atomic load instead of taking their lock.
    /// Shared with the key's other versions like `counters`, since a rollback of either frees it.
    budget_free_at: Arc<AtomicI64>,
    /// This version's number among the versions sharing `counters` (`budget_version`).
    version: u64,
    /// When the key last served, on the monotonic clock (`mono_micros`; 0 = not yet): a tier's
    /// report counts the keys served in the last minute (host throttling, SPEC §8.2).
    last_served: AtomicI64,
    /// A RegBot credential's quota view (SPEC §8.5); `None` for a stored key.
    pub regbot: Option<Arc<regbot::RegbotQuota>>,
}

struct KeyCounters {
    usage: UsageState,
    /// Per feature, its rate windows (SPEC §8.4: several, matched by length).
    rates: HashMap<String, RateWindows>,
    /// Bumped when a failed commit rolls the usage back; serves reserved before are void.
    generation: u64,
    /// The version of the key (`PoolKey::version`) whose budget decides: each new version
    /// (PATCH, RegBot refresh) takes it over. Only that version marks the shared
    /// `budget_free_at` spent, so a draw still running on an older version (its Arc taken
    /// before the swap) cannot mark a raised budget spent.
    budget_version: u64,
    /// Active, held or disabled (SPEC §8.2); `is_active` is the draw's one branch.
    health: Health,
}

/// Microseconds of `at` since this process's first reading, plus one (0 stays "never").
fn mono_micros(at: Instant) -> i64 {
    static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    i64::try_from(at.saturating_duration_since(*EPOCH).as_micros())
        .unwrap_or(i64::MAX - 1)
        .saturating_add(1)
}

/// One line per health change: key id, from → to, reason (never a value).
pub fn log_transition(key_id: &str, transition: &Transition) {
    tracing::info!(
        key_id = %key_id,
        from = transition.from.as_str(),
        to = transition.to.as_str(),
        reason = transition.reason.as_str(),
        until = transition.until.map(crate::timestamp::to_api),
        "key health changed"
    );
}

/// A scoped client.
pub struct Consumer {
    pub id: Arc<str>,
    pub name: String,
    pub description: String,
    pub is_active: bool,
    /// sha256 of the token; `None` when the stored hash is unreadable — such a consumer
    /// matches no token at all (it still lists and deletes).
    pub token_hash: Option<[u8; 32]>,
    /// sha256 of the token before a rotation, accepted until the grace ends (SPEC §8.3).
    pub previous_token: Option<([u8; 32], Timestamp)>,
    /// Tier ids.
    pub scopes: HashSet<Arc<str>>,
}

impl Consumer {
    /// A copy to change a field of.
    fn fields(&self) -> Consumer {
        Consumer {
            id: self.id.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            is_active: self.is_active,
            token_hash: self.token_hash,
            previous_token: self.previous_token,
            scopes: self.scopes.clone(),
        }
    }

    /// The hashes it is indexed under (the previous one even past its grace; `accepts` decides).
    fn token_hashes(&self) -> impl Iterator<Item = [u8; 32]> {
        self.token_hash
            .into_iter()
            .chain(self.previous_token.map(|(h, _)| h))
    }

    /// Whether `hash` is its token's, or its previous token's while the grace lasts.
    fn accepts(&self, hash: &[u8; 32], now: impl FnOnce() -> Timestamp) -> bool {
        self.token_hash.as_ref() == Some(hash)
            || self
                .previous_token
                .is_some_and(|(old, until)| &old == hash && now() < until)
    }
}

/// Who is drawing.
#[derive(Clone)]
pub enum Caller {
    Admin,
    Consumer(Arc<Consumer>),
}

impl Caller {
    pub fn audit_id(&self) -> Arc<str> {
        match self {
            Caller::Admin => {
                static ADMIN: std::sync::LazyLock<Arc<str>> =
                    std::sync::LazyLock::new(|| Arc::from(ADMIN_CONSUMER_ID));
                ADMIN.clone()
            }
            Caller::Consumer(c) => c.id.clone(),
        }
    }

    /// Whether this caller may draw from tier `tier_id` (admin: any; a consumer: its scopes).
    pub fn may_use(&self, tier_id: &str) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Consumer(c) => c.scopes.contains(tier_id),
        }
    }
}

/// One serve's claim on a key: the counters before and after, to commit or give back.
pub struct Reservation {
    pub key: Arc<PoolKey>,
    pub feature: String,
    pub consumer_id: Arc<str>,
    pub at: Timestamp,
    /// `at` on the monotonic clock, to place the rate windows on wall time when written.
    pub at_mono: Instant,
    /// Budget units taken (SPEC §8.4 `cost`, 1 by default); every window counts one request.
    pub cost: i64,
    pub usage_before: UsageState,
    pub usage_after: UsageState,
    /// The feature's rate windows after this serve.
    pub rates: RateWindows,
    /// The feature's limits the serve was decided against (slot by slot with `rates`).
    pub limits: [Option<FeatureLimit>; crate::model::MAX_WINDOWS],
    pub generation: u64,
}

/// A rate window a serve counts in, as the database should count it (SPEC §8.7): every
/// length is persisted, so replicas agree on each window's start and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowClaim {
    pub seconds: i64,
    pub rate_limit: i64,
    /// The window's start on wall time.
    pub start: Timestamp,
}

impl Reservation {
    /// The serve's rate windows, each start placed on wall time as of this serve: `at` minus
    /// the monotonic time since the window opened. So a wall-clock step while the process runs
    /// moves the stored start with it; only a step while it is down is unseen.
    pub fn window_claims(&self) -> impl Iterator<Item = WindowClaim> + '_ {
        self.rates.iter().map(|w| {
            let open_for = self.at_mono.saturating_duration_since(w.window.start);
            WindowClaim {
                seconds: w.seconds,
                rate_limit: self
                    .limits
                    .iter()
                    .flatten()
                    .find(|l| l.window_seconds == w.seconds)
                    .map_or(i64::MAX, |l| l.rate_limit),
                start: chrono::TimeDelta::from_std(open_for)
                    .ok()
                    .and_then(|d| self.at.checked_sub_signed(d))
                    .unwrap_or(self.at),
            }
        })
    }

    /// The budget window the serve counts in (its start), or the serve's time for a budget
    /// without a window: the `at` of its usage delta.
    pub fn budget_at(&self) -> Timestamp {
        match (
            self.key.budget.usage_window_seconds,
            self.usage_after.window_start,
        ) {
            (Some(_), Some(start)) => start,
            _ => self.at,
        }
    }
}

/// The result of a draw; `Served` carries what the caller's `on_reserve` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Draw<R> {
    Served(R),
    /// No tier at all lists the feature.
    UnknownFeature,
    /// The consumer's tiers do not list the feature.
    OutOfScope,
    /// Candidates exist, none can serve now; `retry_after` is when the earliest frees up.
    Exhausted {
        retry_after: Option<Duration>,
    },
}

struct TierEntry {
    record: TierRecord,
    keys: Vec<Arc<PoolKey>>,
    health: Arc<TierCell>,
}

/// A tier's host-throttling detector (reports only) and its cooldown as draws read it.
#[derive(Default)]
struct TierCell {
    reports: Mutex<TierHealth>,
    /// `mono_micros` of the cooldown's end; 0 = none.
    cooled_until: AtomicI64,
}

impl TierCell {
    fn wait(&self, now: Instant) -> Option<Duration> {
        let until = self.cooled_until.load(Ordering::Relaxed);
        let now = mono_micros(now);
        (until > now).then(|| Duration::from_micros(until.abs_diff(now)))
    }
}

/// One key's health change made by a report or an operator: to persist, log, or undo.
/// `transition` is `None` when only what the state machine remembers changed (a ladder step,
/// a first auth_invalid): written, not logged.
pub struct HealthChange {
    pub key: Arc<PoolKey>,
    pub before: Health,
    pub after: HealthRecord,
    pub transition: Option<Transition>,
}

impl HealthChange {
    /// The change from `before` to the key's health now, if there is one to write.
    fn of(
        key: &Arc<PoolKey>,
        before: Health,
        now: &Health,
        transition: Option<Transition>,
    ) -> Option<HealthChange> {
        (transition.is_some() || now.memory_differs(&before)).then(|| HealthChange {
            key: key.clone(),
            before,
            after: now.record(),
            transition,
        })
    }
}

/// What a report did.
pub struct Reported<R> {
    /// The reported key's state afterwards.
    pub key_state: StateKind,
    pub changes: Vec<HealthChange>,
    /// What the caller's `on_change` returned.
    pub out: R,
}

/// A rate window's start in memory and in the database further apart than this are two
/// windows (the wall and monotonic clocks are read a few microseconds apart per serve).
const SAME_WINDOW: Duration = Duration::from_millis(5);

/// A served key is counted towards its tier's throttling window this long.
const SERVED_WINDOW: Duration = Duration::from_secs(60);

struct FeatureEntry {
    /// Tier ids whose feature set lists this feature.
    tiers: Vec<Arc<str>>,
    cursor: AtomicUsize,
    /// Registered when a tier first lists the feature; recording is atomic increments only.
    meters: Arc<FeatureMeters>,
}

#[derive(Default)]
struct Index {
    tiers: HashMap<Arc<str>, TierEntry>,
    tier_ids_by_name: HashMap<String, Arc<str>>,
    keys: HashMap<Arc<str>, Arc<PoolKey>>,
    features: HashMap<String, FeatureEntry>,
    consumers: HashMap<Arc<str>, Arc<Consumer>>,
    consumers_by_token: HashMap<[u8; 32], Arc<Consumer>>,
}

/// The pool. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Pool {
    index: RwLock<Index>,
    /// Where per-feature handles are registered (disabled in `Pool::default()`).
    metrics: Metrics,
    /// A throttled tier's shortest cooldown when not SPEC §8.2's 30 s (tests only).
    throttle_floor: Option<Duration>,
}

/// hex(sha256(token)) as stored, and its raw bytes as indexed.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl PoolKey {
    /// Builds a key from its stored record, decrypting its value and secrets once.
    pub fn from_record(record: KeyRecord, sealer: &Sealer) -> PoolKey {
        let material = sealer.open(&record.sealed_value).and_then(|value| {
            let mut secrets = BTreeMap::new();
            for (name, sealed) in &record.secrets {
                secrets.insert(name.clone(), sealer.open(sealed)?);
            }
            Ok(KeyMaterial { value, secrets })
        });
        let metadata = match serde_json::from_str::<serde_json::Value>(&record.metadata_json) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let mut secret_names: Vec<String> = record.secrets.iter().map(|(n, _)| n.clone()).collect();
        secret_names.sort();
        PoolKey {
            id: Arc::from(record.id),
            name: record.name,
            tier_id: Arc::from(record.tier_id),
            expires_at: record.expires_at,
            budget: UsageBudget {
                usage_limit: record.usage_limit,
                usage_window_seconds: record.usage_window_seconds.filter(|w| *w > 0),
            },
            metadata,
            material,
            secret_names,
            paused: false,
            counters: Arc::new(Mutex::new(KeyCounters {
                usage: UsageState {
                    count: record.usage_count,
                    window_start: record.usage_window_start,
                },
                rates: HashMap::new(),
                generation: 0,
                budget_version: 0,
                // An inactive key (operator, or a Go row) is disabled whatever else is stored.
                health: if record.is_active {
                    Health::default()
                } else {
                    Health::restore(&disabled_record(), Now::read())
                },
            })),
            budget_free_at: Arc::new(AtomicI64::new(0)),
            version: 0,
            last_served: AtomicI64::new(0),
            regbot: None,
        }
    }

    /// Restores the stored health (a key stored inactive stays disabled).
    fn restore_health(&self, record: &HealthRecord, now: Now) {
        // `is_active` decides disabled: a stored `disabled` beside an active row is stale, and
        // so is an automatic state beside an inactive one.
        let mut counters = self.counters.lock();
        let inactive = counters.health.kind() == StateKind::Disabled;
        if inactive == (record.state == StateKind::Disabled) {
            counters.health = Health::restore(record, now);
        }
    }

    fn servable(&self, now: Timestamp) -> bool {
        !self.paused && self.material.is_ok() && self.expires_at.is_none_or(|e| e > now)
    }

    /// The key as `record` now describes it (SPEC §8.3 PATCH), sharing this key's live counters,
    /// rate windows and health; `paused`: never drawn (while an operator resets its counters).
    pub fn patched(&self, record: KeyRecord, sealer: &Sealer, paused: bool) -> PoolKey {
        let mut key = PoolKey::from_record(record, sealer);
        key.counters = self.counters.clone();
        key.budget_free_at = self.budget_free_at.clone();
        key.take_over_budget();
        key.paused = paused;
        key.last_served = AtomicI64::new(self.last_served.load(Ordering::Relaxed));
        key
    }

    /// Makes this new version (sharing an older one's `counters` and `budget_free_at`) the one
    /// whose budget decides, and clears the spent mark: the budget may have changed, so it is
    /// "not known to be spent" until a draw checks it again. Under the counters' lock, so a
    /// draw of an older version either marked it before (and the mark is cleared here) or
    /// finds itself no longer the budget's version and leaves the mark alone.
    fn take_over_budget(&mut self) {
        let mut counters = self.counters.lock();
        counters.budget_version += 1;
        self.version = counters.budget_version;
        self.budget_free_at.store(0, Ordering::Relaxed);
    }

    /// Opens a usage window at `at` for a count that has none (a window given by PATCH), so
    /// the count so far is kept rather than read as a fresh window.
    pub fn open_usage_window(&self, at: Timestamp) {
        let mut counters = self.counters.lock();
        if counters.usage.window_start.is_none() {
            counters.usage.window_start = Some(at);
        }
    }

    /// Starts the usage budget over (`reset_usage`): count 0, no window. Reservations not yet
    /// committed are voided (answered 503, never counted).
    pub fn reset_usage(&self) {
        let mut counters = self.counters.lock();
        counters.usage = UsageState {
            count: 0,
            window_start: None,
        };
        counters.generation += 1;
        self.budget_free_at.store(0, Ordering::Relaxed);
    }

    /// Whether an operator has not disabled the key (`is_active` in the API and database).
    pub fn is_active(&self) -> bool {
        self.counters.lock().health.kind() != StateKind::Disabled
    }

    /// The key's health as persisted and shown.
    pub fn health(&self) -> HealthRecord {
        self.counters.lock().health.record()
    }

    /// When the budget window resets, for a windowed budget with a known start.
    fn window_reset(&self, usage: UsageState) -> Option<Timestamp> {
        let seconds = self.budget.usage_window_seconds?;
        usage
            .window_start?
            .checked_add_signed(chrono::TimeDelta::try_seconds(seconds)?)
    }

    /// Tries both gates for `feature` (every window, and `cost` units of the budget); consumes
    /// from all or from none.
    fn try_reserve(
        self: &Arc<Self>,
        feature: &str,
        limits: &[FeatureLimit],
        cost: i64,
        caller: &Caller,
        now: Now,
    ) -> Result<(Reservation, parking_lot::MutexGuard<'_, KeyCounters>), Wait> {
        let mut counters = self.counters.lock();
        let admission = if counters.health.is_active() {
            Admission::Serve
        } else {
            counters.health.admission(now)
        };
        if let Admission::Skip { wait } = admission {
            return Err(wait.filter(|w| self.free_before_expiry(now.wall, *w).is_some()));
        }
        let rate = gates::rates_after_serve(
            counters
                .rates
                .get(feature)
                .unwrap_or(&RateWindows::default()),
            limits,
            now.mono,
        );
        let usage = gates::usage_after_serve(counters.usage, self.budget, now.wall, cost);
        match (rate, usage) {
            (Ok(rate), Ok(usage)) => {
                let before = counters.usage;
                // Allocate the feature name only the first time this key serves it.
                match counters.rates.get_mut(feature) {
                    Some(windows) => *windows = rate,
                    None => {
                        counters.rates.insert(feature.to_string(), rate);
                    }
                }
                counters.usage = usage;
                // The probe slot is taken only once the serve is reserved (see `health`).
                if admission == Admission::Probe {
                    if let (_, Some(transition)) = counters.health.admit(now) {
                        log_transition(&self.id, &transition);
                    }
                }
                self.last_served
                    .store(mono_micros(now.mono), Ordering::Relaxed);
                let reservation = Reservation {
                    key: self.clone(),
                    feature: feature.to_string(),
                    consumer_id: caller.audit_id(),
                    at: now.wall,
                    at_mono: now.mono,
                    cost,
                    usage_before: before,
                    usage_after: usage,
                    rates: rate,
                    limits: {
                        let mut copy = [None; crate::model::MAX_WINDOWS];
                        for (slot, limit) in copy.iter_mut().zip(limits) {
                            *slot = Some(*limit);
                        }
                        copy
                    },
                    generation: counters.generation,
                };
                Ok((reservation, counters))
            }
            (rate, usage) => {
                let rate_wait = rate.err().unwrap_or(Duration::ZERO);
                // Remembered only when even one unit is refused: a costly serve's refusal
                // says nothing about a cheaper one.
                // Only the budget's current version marks it: an older one's limit is gone.
                let spent = counters.budget_version == self.version
                    && gates::budget_spent(counters.usage, self.budget, now.wall);
                if let (Err(usage_wait), true) = (usage, spent) {
                    let free_at = usage_wait
                        .and_then(|w| self.free_before_expiry(now.wall, w))
                        .map_or(i64::MAX, |t| t.timestamp_micros());
                    self.budget_free_at.store(free_at, Ordering::Relaxed);
                }
                let wait = match usage {
                    Ok(_) => Some(rate_wait),
                    Err(None) => None,
                    Err(Some(usage_wait)) => Some(rate_wait.max(usage_wait)),
                };
                Err(wait.filter(|w| self.free_before_expiry(now.wall, *w).is_some()))
            }
        }
    }

    /// When a key waiting `wait` frees up — `None` if it expires first (then it never will).
    fn free_before_expiry(&self, now: Timestamp, wait: Duration) -> Option<Timestamp> {
        let free = chrono::TimeDelta::from_std(wait)
            .ok()
            .and_then(|w| now.checked_add_signed(w))?;
        self.expires_at.is_none_or(|e| free < e).then_some(free)
    }

    /// A spent budget known from an earlier refusal: `Some(wait)` until it frees up
    /// (`Some(None)` = never), `None` when the key must be checked under its lock.
    fn known_spent(&self, now: Timestamp) -> Option<Wait> {
        let free_at = self.budget_free_at.load(Ordering::Relaxed);
        let now_us = now.timestamp_micros();
        if free_at <= now_us {
            return None;
        }
        Some((free_at != i64::MAX).then(|| Duration::from_micros(free_at.abs_diff(now_us))))
    }

    /// Whether a reservation still belongs to the key's current counters.
    pub fn is_current(&self, reservation: &Reservation) -> bool {
        self.counters.lock().generation == reservation.generation
    }

    /// Rolls the usage back to before `reservation` (the earliest of a failed commit) and voids
    /// every reservation made since.
    pub fn revert_usage(&self, reservation: &Reservation) {
        let mut counters = self.counters.lock();
        if counters.generation == reservation.generation {
            counters.usage = reservation.usage_before;
            counters.generation += 1;
            self.budget_free_at.store(0, Ordering::Relaxed);
        }
    }

    /// Gives one serve back to each rate window it was taken from, if that window is still open.
    pub fn give_back_rate(&self, reservation: &Reservation) {
        let mut counters = self.counters.lock();
        if let Some(windows) = counters.rates.get_mut(&reservation.feature) {
            for mark in reservation.rates.iter() {
                windows.give_back(mark);
            }
        }
    }

    /// After the database refused a commit (SPEC §8.7): takes its counters as they are once the
    /// batch's kept serves land — `usage` for the budget, `windows` (feature, length, start,
    /// count, serves of this batch refused in it) — yet never lower than what this process
    /// counted less `refused_units`, where both describe the same window: what it reserved
    /// and has not committed yet (later batches) stays counted. Where memory holds another
    /// window than the database (its clock or a stale start), the database's wins: the
    /// refusal proved it still open.
    pub fn follow_database(
        &self,
        usage: Option<UsageState>,
        refused_units: i64,
        windows: &[(String, i64, Timestamp, i64, i64)],
        now: Now,
    ) {
        let mut counters = self.counters.lock();
        let mem = counters.usage;
        if let Some(usage) = usage {
            counters.usage = match self.budget.usage_window_seconds {
                // Another window than the database's: the database's is the one that counts.
                Some(_) if usage.window_start != mem.window_start => usage,
                _ => UsageState {
                    count: (mem.count - refused_units).max(usage.count),
                    window_start: mem.window_start.or(usage.window_start),
                },
            };
        }
        for (feature, seconds, start, count, refused) in windows {
            let ago = (now.wall - *start).to_std().unwrap_or(Duration::ZERO);
            let db_start = now.mono.checked_sub(ago).unwrap_or(now.mono);
            let rates = counters.rates.entry(feature.clone()).or_default();
            let window = match rates.get(*seconds) {
                Some(m) if m.start.max(db_start) - m.start.min(db_start) <= SAME_WINDOW => {
                    RateWindow {
                        start: m.start,
                        count: (m.count - refused).max(*count),
                    }
                }
                // Another window than the database's: the database's is the one that counts.
                _ => RateWindow {
                    start: db_start,
                    count: *count,
                },
            };
            rates.put(WindowState {
                seconds: *seconds,
                window,
            });
        }
        self.budget_free_at.store(0, Ordering::Relaxed);
    }

    /// Puts back a rate window stored before a restart (SPEC §8.4). Its wall-clock start is
    /// placed on this process's monotonic clock by the wall time elapsed since; a start in the
    /// future (the wall clock stepped back) counts as opened now — the window then holds for
    /// its whole length, never less. An elapsed window changes nothing.
    fn restore_rate_window(&self, stored: &RateWindowWrite, now: Now) {
        let elapsed = (now.wall - stored.start).to_std().unwrap_or(Duration::ZERO);
        let length = Duration::from_secs(u64::try_from(stored.window_seconds).unwrap_or(0));
        if elapsed >= length || stored.count <= 0 {
            return;
        }
        let start = now.mono.checked_sub(elapsed).unwrap_or(now.mono);
        let mut counters = self.counters.lock();
        let windows = counters.rates.entry(stored.feature.clone()).or_default();
        windows.put(WindowState {
            seconds: stored.window_seconds,
            window: RateWindow {
                start,
                count: stored.count,
            },
        });
    }

    /// The usage counter as of `now`.
    pub fn usage(&self, now: Timestamp) -> UsageState {
        gates::current_usage(self.counters.lock().usage, self.budget, now)
    }

    /// The persisted counters (not adjusted for an elapsed window).
    pub fn stored_usage(&self) -> UsageState {
        self.counters.lock().usage
    }

    /// Serves counted in the current rate window of `feature` that is `limit`'s length.
    pub fn rate_used(&self, feature: &str, limit: FeatureLimit, now: Instant) -> i64 {
        let window = self
            .counters
            .lock()
            .rates
            .get(feature)
            .and_then(|w| w.get(limit.window_seconds));
        gates::rate_used(window, limit, now)
    }
}

/// What the pool holds that the database stores (RegBot keys are not stored).
pub struct StoredIds {
    pub tiers: Vec<Arc<str>>,
    pub keys: Vec<Arc<str>>,
    pub consumers: Vec<Arc<str>>,
}

/// A read-only view of a tier, for listings.
#[derive(Clone)]
pub struct TierView {
    pub record: TierRecord,
    pub key_count: usize,
}

impl Pool {
    /// Builds the pool from what the store holds, recording no metrics.
    pub fn load(snapshot: Snapshot, sealer: &Sealer) -> Pool {
        Pool::load_metered(snapshot, sealer, Metrics::disabled())
    }

    /// Builds the pool from what the store holds; features register their handles in `metrics`.
    pub fn load_metered(snapshot: Snapshot, sealer: &Sealer, metrics: Metrics) -> Pool {
        let pool = Pool {
            index: RwLock::default(),
            metrics,
            throttle_floor: None,
        };
        // Fixes the monotonic origin now, before any reading it is compared with.
        mono_micros(Instant::now());
        for tier in snapshot.tiers {
            pool.put_tier(tier);
        }
        let now = Now::read();
        for (tier_id, until) in &snapshot.tier_cooldowns {
            pool.restore_tier_cooldown(tier_id, *until, now);
        }
        for key in snapshot.keys {
            let stored = snapshot.health.get(&key.id).cloned();
            let key = PoolKey::from_record(key, sealer);
            if let Some(record) = stored {
                key.restore_health(&record, now);
            }
            pool.add_key(key);
        }
        {
            let index = pool.index.read();
            for stored in &snapshot.rate_windows {
                if let Some(key) = index.keys.get(stored.key_id.as_str()) {
                    key.restore_rate_window(stored, now);
                }
            }
        }
        for consumer in snapshot.consumers {
            pool.put_consumer(consumer);
        }
        pool
    }

    /// A throttled tier's stored cooldown, after a restart: one still running holds the
    /// tier's draws until it ends, as before the restart.
    fn restore_tier_cooldown(&self, tier_id: &str, until: Timestamp, now: Now) {
        if until <= now.wall {
            return;
        }
        let index = self.index.read();
        if let Some(tier) = index.tiers.get(tier_id) {
            let until = health::Deadline::from_wall(until, now);
            tier.health.reports.lock().restore_cooldown(until);
            tier.health
                .cooled_until
                .store(mono_micros(until.mono), Ordering::Relaxed);
        }
    }

    /// Lowers a throttled tier's shortest cooldown below SPEC §8.2's 30 s: for tests, which
    /// cannot wait it out (`Config::host_throttle_floor`, never read from the environment).
    pub fn set_throttle_floor(&mut self, floor: Option<Duration>) {
        self.throttle_floor = floor;
    }

    /// Draws a key for `feature` (SPEC §7). `on_reserve` runs while the chosen key is locked, so
    /// reservations of one key reach it in the order their counts were taken; it also gets the
    /// feature's metric handles, for the caller to record the serve's outcome lock-free.
    ///
    /// Fairness: each draw claims the cursor positions it looks at — the one it starts from
    /// and every refused key it steps over — so the next draw starts after the key served.
    /// Serves then spread evenly over the keys that can serve, instead of a refused key's
    /// turns all going to its successor.
    pub fn draw<R>(
        &self,
        caller: &Caller,
        feature: &str,
        now: Now,
        on_reserve: impl FnOnce(Reservation, &Arc<FeatureMeters>) -> R,
    ) -> Draw<R> {
        self.draw_cost(caller, feature, 1, now, on_reserve)
    }

    /// `draw` of a serve costing `cost` budget units (SPEC §8.4): a key whose budget has less
    /// left is skipped and the next tried; rate windows count the serve once whatever its cost.
    pub fn draw_cost<R>(
        &self,
        caller: &Caller,
        feature: &str,
        cost: i64,
        now: Now,
        on_reserve: impl FnOnce(Reservation, &Arc<FeatureMeters>) -> R,
    ) -> Draw<R> {
        self.draw_among(caller, feature, cost, now, |_| true, |_| true, on_reserve)
    }

    /// `draw_cost` among the tiers `tier_ok` accepts, skipping the keys `key_ok` refuses (the
    /// proxy: tiers with an upstream, keys not yet tried for this request). A skipped key
    /// consumes nothing; when `tier_ok` leaves no tier in scope the answer is `OutOfScope`.
    #[allow(clippy::too_many_arguments)]
    pub fn draw_among<R>(
        &self,
        caller: &Caller,
        feature: &str,
        cost: i64,
        now: Now,
        tier_ok: impl Fn(&TierRecord) -> bool,
        key_ok: impl Fn(&PoolKey) -> bool,
        on_reserve: impl FnOnce(Reservation, &Arc<FeatureMeters>) -> R,
    ) -> Draw<R> {
        let index = self.index.read();
        let Some(entry) = index.features.get(feature) else {
            return Draw::UnknownFeature;
        };
        // Each tier with its windows and, while host throttling cools it, how long that lasts.
        let tiers: Vec<(&TierEntry, &[FeatureLimit], Option<Duration>)> = entry
            .tiers
            .iter()
            .filter(|t| caller.may_use(t))
            .filter_map(|t| index.tiers.get(t))
            .filter(|t| tier_ok(&t.record))
            .filter_map(|t| {
                let limits = t.record.features.get(feature)?;
                Some((t, limits.as_slice(), t.health.wait(now.mono)))
            })
            .collect();
        if tiers.is_empty() {
            return Draw::OutOfScope;
        }
        let total: usize = tiers.iter().map(|(t, _, _)| t.keys.len()).sum();
        if total == 0 {
            entry.meters.exhausted.increment(1);
            return Draw::Exhausted { retry_after: None };
        }
        let start = entry.cursor.fetch_add(1, Ordering::Relaxed) % total;
        let mut earliest: Option<Duration> = None;
        for step in 0..total {
            let mut position = (start + step) % total;
            let mut chosen = None;
            for (tier, limit, cooled) in &tiers {
                if position < tier.keys.len() {
                    chosen = Some((&tier.keys[position], *limit, *cooled));
                    break;
                }
                position -= tier.keys.len();
            }
            let Some((key, limit, cooled)) = chosen else {
                continue;
            };
            if !key.servable(now.wall) || !key_ok(key) {
                continue;
            }
            if let Some(wait) = cooled {
                earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
                continue;
            }
            if let Some(wait) = key.known_spent(now.wall) {
                // A spent budget frees up for any cost only if the cost fits the whole limit.
                let wait = wait.filter(|_| key.budget.usage_limit.is_none_or(|l| cost <= l));
                if let Some(wait) = wait {
                    earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
                }
                continue;
            }
            match key.try_reserve(feature, limit, cost, caller, now) {
                Ok((reservation, guard)) => {
                    let out = on_reserve(reservation, &entry.meters);
                    drop(guard);
                    if step > 0 {
                        entry.cursor.fetch_add(step, Ordering::Relaxed);
                    }
                    return Draw::Served(out);
                }
                Err(Some(wait)) => earliest = Some(earliest.map_or(wait, |e| e.min(wait))),
                Err(None) => {}
            }
        }
        entry.meters.exhausted.increment(1);
        Draw::Exhausted {
            retry_after: earliest,
        }
    }

    /// The active consumer holding `token`, if any. A consumer whose stored hash is unreadable
    /// is not indexed, so no token reaches it.
    pub fn consumer_for_token(&self, token: &str) -> Option<Arc<Consumer>> {
        self.consumer_for_token_at(token, chrono::Utc::now)
    }

    /// `consumer_for_token` with the wall clock given; it is read only for a previous token.
    pub fn consumer_for_token_at(
        &self,
        token: &str,
        now: impl FnOnce() -> Timestamp,
    ) -> Option<Arc<Consumer>> {
        let hash = token_hash(token);
        self.index
            .read()
            .consumers_by_token
            .get(&hash)
            .filter(|c| c.is_active && c.accepts(&hash, now))
            .cloned()
    }

    // ---- tiers ----

    /// Adds a tier or replaces its description and feature set.
    pub fn put_tier(&self, record: TierRecord) {
        let mut index = self.index.write();
        let id: Arc<str> = Arc::from(record.id.as_str());
        let (keys, health) = match index.tiers.remove(&id) {
            Some(old) => {
                for feature in old.record.features.keys() {
                    if !record.features.contains_key(feature) {
                        index.unlist(feature, &id);
                    }
                }
                index.tier_ids_by_name.remove(&old.record.name);
                (old.keys, old.health)
            }
            None => (Vec::new(), Arc::default()),
        };
        for feature in record.features.keys() {
            let entry = index
                .features
                .entry(feature.clone())
                .or_insert_with(|| FeatureEntry {
                    tiers: Vec::new(),
                    cursor: AtomicUsize::new(0),
                    meters: Arc::new(self.metrics.feature(feature)),
                });
            if !entry.tiers.contains(&id) {
                entry.tiers.push(id.clone());
            }
        }
        index
            .tier_ids_by_name
            .insert(record.name.clone(), id.clone());
        index.tiers.insert(
            id,
            TierEntry {
                record,
                keys,
                health,
            },
        );
    }

    /// What still uses tier `id`: its keys' count and the consumers (id, name) scoped to it.
    pub fn tier_users(&self, id: &str) -> (usize, Vec<(String, String)>) {
        let index = self.index.read();
        // RegBot keys come and go with the source; they never hold a tier in place.
        let keys = index
            .keys
            .values()
            .filter(|k| &*k.tier_id == id && k.regbot.is_none())
            .count();
        let mut consumers: Vec<(String, String)> = index
            .consumers
            .values()
            .filter(|c| c.scopes.contains(id))
            .map(|c| (c.id.to_string(), c.name.clone()))
            .collect();
        consumers.sort_by(|a, b| a.1.cmp(&b.1));
        (keys, consumers)
    }

    /// Removes tier `id` with its features, its keys and every consumer's scope on it.
    pub fn remove_tier(&self, id: &str) {
        let mut index = self.index.write();
        let Some(tier) = index.tiers.remove(id) else {
            return;
        };
        let tier_id: Arc<str> = Arc::from(id);
        for feature in tier.record.features.keys() {
            index.unlist(feature, &tier_id);
        }
        index.tier_ids_by_name.remove(&tier.record.name);
        index.keys.retain(|_, k| *k.tier_id != *id);
        drop(index);
        for consumer in self.consumers() {
            if consumer.scopes.contains(id) {
                self.revoke_scope(&consumer.id, id);
            }
        }
    }

    pub fn tier_by_name(&self, name: &str) -> Option<TierRecord> {
        let index = self.index.read();
        let id = index.tier_ids_by_name.get(name)?;
        index.tiers.get(id).map(|t| t.record.clone())
    }

    /// Tier `id`'s name and upstream (SPEC §8.6), if it has one.
    pub fn tier_upstream(
        &self,
        id: &str,
    ) -> Option<(String, crate::model::upstream::TierUpstream)> {
        let index = self.index.read();
        let tier = index.tiers.get(id)?;
        Some((tier.record.name.clone(), tier.record.upstream.clone()?))
    }

    /// Whether tier `id` cools as a whole for host-level throttling now (SPEC §8.2).
    pub fn tier_throttled(&self, id: &str, now: Instant) -> bool {
        self.index
            .read()
            .tiers
            .get(id)
            .is_some_and(|t| t.health.wait(now).is_some())
    }

    /// For the proxy: how many of the tiers listing `feature` that `caller` may use have an
    /// upstream — `Err` with `/key`'s answer when no tier lists it or none is in scope.
    pub fn proxied_tiers(&self, caller: &Caller, feature: &str) -> Result<usize, Draw<()>> {
        let index = self.index.read();
        let entry = index.features.get(feature).ok_or(Draw::UnknownFeature)?;
        let in_scope: Vec<&TierEntry> = entry
            .tiers
            .iter()
            .filter(|t| caller.may_use(t))
            .filter_map(|t| index.tiers.get(t))
            .collect();
        if in_scope.is_empty() {
            return Err(Draw::OutOfScope);
        }
        Ok(in_scope
            .iter()
            .filter(|t| t.record.upstream.is_some())
            .count())
    }

    pub fn tier_name(&self, id: &str) -> Option<String> {
        self.index
            .read()
            .tiers
            .get(id)
            .map(|t| t.record.name.clone())
    }

    /// Every tier, by name.
    pub fn tiers(&self) -> Vec<TierView> {
        let index = self.index.read();
        let mut out: Vec<TierView> = index
            .tiers
            .values()
            .map(|t| TierView {
                record: t.record.clone(),
                key_count: t.keys.len(),
            })
            .collect();
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }

    // ---- keys ----

    pub fn add_key(&self, key: PoolKey) {
        let key = Arc::new(key);
        let mut index = self.index.write();
        if let Some(tier) = index.tiers.get_mut(&key.tier_id) {
            tier.keys.push(key.clone());
        }
        index.keys.insert(key.id.clone(), key);
    }

    /// Puts `key` where the key with its id was (same tier: same rotation position; another
    /// tier: appended there), atomically for draws; returns the key it replaced.
    pub fn replace_key(&self, key: Arc<PoolKey>) -> Option<Arc<PoolKey>> {
        let mut index = self.index.write();
        let old = index.keys.insert(key.id.clone(), key.clone());
        let mut placed = false;
        if let Some(old) = &old {
            if let Some(tier) = index.tiers.get_mut(&old.tier_id) {
                if old.tier_id == key.tier_id {
                    if let Some(slot) = tier.keys.iter_mut().find(|k| k.id == key.id) {
                        *slot = key.clone();
                        placed = true;
                    }
                } else {
                    tier.keys.retain(|k| k.id != key.id);
                }
            }
        }
        if !placed {
            if let Some(tier) = index.tiers.get_mut(&key.tier_id) {
                tier.keys.push(key.clone());
            }
        }
        old
    }

    pub fn remove_key(&self, id: &str) -> Option<Arc<PoolKey>> {
        let mut index = self.index.write();
        let key = index.keys.remove(id)?;
        if let Some(tier) = index.tiers.get_mut(&key.tier_id) {
            tier.keys.retain(|k| k.id != key.id);
        }
        Some(key)
    }

    pub fn key(&self, id: &str) -> Option<Arc<PoolKey>> {
        self.index.read().keys.get(id).cloned()
    }

    /// Every stored key, whatever its state (readable or not, active or not, expired or not).
    pub fn keys(&self) -> Vec<Arc<PoolKey>> {
        self.index.read().keys.values().cloned().collect()
    }

    /// Stored keys (RegBot keys are not stored; see `regbot_key_count`).
    pub fn key_count(&self) -> usize {
        let index = self.index.read();
        index.keys.len() - index.keys.values().filter(|k| k.regbot.is_some()).count()
    }

    // ---- key health (SPEC §8.2) ----

    /// Applies an outcome report on a serve of `key_id` made at `serve.at`: the tier's
    /// throttling detector first, then the key (unless the tier took the report), then pardons
    /// if the tier turned out throttled. Runs under the tier's report lock, and so does
    /// `on_change`, so the caller queues the changes in the order they were made. `None` when
    /// the key is gone.
    pub fn report<R>(
        &self,
        key_id: &str,
        serve: ServeRef<'_>,
        outcome: &Outcome,
        now: Now,
        jitter: Jitter,
        on_change: impl FnOnce(&[HealthChange], Option<TierCooldownWrite>) -> R,
    ) -> Option<Reported<R>> {
        let index = self.index.read();
        let key = index.keys.get(key_id)?.clone();
        // A key whose tier is gone (a Go database may hold one) is its own tier.
        let fallback;
        let tier = match index.tiers.get(&key.tier_id) {
            Some(tier) => tier,
            None => {
                fallback = TierEntry {
                    record: TierRecord {
                        id: String::new(),
                        name: String::new(),
                        description: String::new(),
                        features: Default::default(),
                        source: None,
                        upstream: None,
                    },
                    keys: vec![key.clone()],
                    health: Arc::default(),
                };
                &fallback
            }
        };
        let mut tier_health = tier.health.reports.lock();
        // Only rate/5xx reports need the tier's counts (a scan of its keys), so an `ok` from
        // a large tier stays cheap.
        let throttling = matches!(
            outcome.class,
            health::OutcomeClass::RateLimited | health::OutcomeClass::UpstreamError
        );
        let since = now.mono.checked_sub(SERVED_WINDOW).map(mono_micros);
        let served_keys = if throttling {
            tier.keys
                .iter()
                .filter(|k| {
                    let at = k.last_served.load(Ordering::Relaxed);
                    at != 0 && since.is_none_or(|s| at >= s)
                })
                .count()
        } else {
            0
        };
        let floor = self.throttle_floor.unwrap_or(health::THROTTLE_MIN_COOLDOWN);
        let verdict = tier_health.observe(&key.id, serve.at, outcome, served_keys, now, floor);
        let mut changes = Vec::new();
        if verdict.apply_to_key {
            let held = if throttling {
                tier.keys
                    .iter()
                    .filter(|k| k.counters.lock().health.held_for_rate_or_5xx())
                    .count()
            } else {
                0
            };
            let mut counters = key.counters.lock();
            let ctx = ReportContext {
                window_reset: key.window_reset(counters.usage),
                tier: TierLoad {
                    keys: tier.keys.len(),
                    held,
                },
                jitter,
            };
            let before = counters.health.clone();
            let transition = counters.health.on_report(serve, outcome, &ctx, now);
            changes.extend(HealthChange::of(&key, before, &counters.health, transition));
        }
        let throttled_until = verdict.throttled.as_ref().map(|t| t.until.wall);
        if let Some(throttle) = verdict.throttled {
            tier.health
                .cooled_until
                .store(mono_micros(throttle.until.mono), Ordering::Relaxed);
            tracing::warn!(
                tier_id = %key.tier_id,
                keys = throttle.keys.len(),
                until = %crate::timestamp::to_api(throttle.until.wall),
                "host-level throttling: the tier cools as a whole, its keys are not penalised"
            );
            for pardoned in tier.keys.iter().filter(|k| throttle.keys.contains(&k.id)) {
                let mut counters = pardoned.counters.lock();
                let before = counters.health.clone();
                let transition = counters.health.pardon(throttle.since, now);
                changes.extend(HealthChange::of(
                    pardoned,
                    before,
                    &counters.health,
                    transition,
                ));
            }
        }
        let key_state = key.counters.lock().health.kind();
        let cooled = throttled_until
            .filter(|_| !tier.record.id.is_empty())
            .map(|until| TierCooldownWrite {
                tier_id: tier.record.id.clone(),
                until,
            });
        let out = on_change(&changes, cooled);
        drop(tier_health);
        Some(Reported {
            key_state,
            changes,
            out,
        })
    }

    /// An operator's `is_active` on `key_id`: active or disabled, automatic states cleared.
    /// Under the tier's report lock like a report (see `report`); `None` when the key is gone.
    pub fn set_enabled<R>(
        &self,
        key_id: &str,
        enabled: bool,
        now: Now,
        on_change: impl FnOnce(&[HealthChange]) -> R,
    ) -> Option<(Vec<HealthChange>, R)> {
        let index = self.index.read();
        let key = index.keys.get(key_id)?.clone();
        let cell = index.tiers.get(&key.tier_id).map(|t| t.health.clone());
        let _reports = cell.as_ref().map(|c| c.reports.lock());
        let mut changes = Vec::new();
        {
            let mut counters = key.counters.lock();
            let before = counters.health.clone();
            let transition = counters.health.set_enabled(enabled, now);
            changes.extend(HealthChange::of(&key, before, &counters.health, transition));
        }
        let out = on_change(&changes);
        Some((changes, out))
    }

    /// A health record the database holds for `key_id`, written by any replica (SPEC §8.7):
    /// adopted only when its state changed later than this key's (`changed_at`), so this
    /// replica's own write coming back, or an older one, never undoes a newer state here.
    /// Under the tier's report lock like a report; returns whether the key took it.
    pub fn apply_stored_health(&self, key_id: &str, stored: &HealthRecord, now: Now) -> bool {
        let index = self.index.read();
        let Some(key) = index.keys.get(key_id).cloned() else {
            return false;
        };
        let cell = index.tiers.get(&key.tier_id).map(|t| t.health.clone());
        let _reports = cell.as_ref().map(|c| c.reports.lock());
        let mut counters = key.counters.lock();
        let ours = counters.health.record().changed_at;
        if !stored_health_is_newer(stored.changed_at, ours) {
            return false;
        }
        let from = counters.health.kind();
        counters.health = Health::restore(stored, now);
        if from != stored.state {
            tracing::info!(
                key_id = %key_id,
                from = from.as_str(),
                to = stored.state.as_str(),
                "key health changed by another replica"
            );
        }
        // A spent-budget shortcut may no longer hold for the state taken over.
        key.budget_free_at.store(0, Ordering::Relaxed);
        true
    }

    /// A host-throttling cooldown the database holds for `tier_id` (SPEC §8.7): extends this
    /// replica's cooldown of the tier to `until`, never shortens it. Returns whether it did.
    pub fn apply_tier_cooldown(&self, tier_id: &str, until: Timestamp, now: Now) -> bool {
        if until <= now.wall {
            return false;
        }
        let index = self.index.read();
        let Some(tier) = index.tiers.get(tier_id) else {
            return false;
        };
        let mut reports = tier.health.reports.lock();
        if reports.cooldown().is_some_and(|c| c.wall >= until) {
            return false;
        }
        let until = health::Deadline::from_wall(until, now);
        reports.restore_cooldown(until);
        tier.health
            .cooled_until
            .fetch_max(mono_micros(until.mono), Ordering::Relaxed);
        true
    }

    /// Ids of every tier, stored key and consumer (a resync removes those the database lost).
    pub fn stored_ids(&self) -> StoredIds {
        let index = self.index.read();
        StoredIds {
            tiers: index.tiers.keys().cloned().collect(),
            keys: index
                .keys
                .values()
                .filter(|k| k.regbot.is_none())
                .map(|k| k.id.clone())
                .collect(),
            consumers: index.consumers.keys().cloned().collect(),
        }
    }

    /// Undoes changes whose write failed, for each key whose health is still what the change
    /// made it (a later change stands).
    pub fn revert_health(&self, changes: Vec<HealthChange>) {
        for change in changes.into_iter().rev() {
            let mut counters = change.key.counters.lock();
            if counters.health.record() == change.after {
                counters.health = change.before;
                tracing::warn!(key_id = %change.key.id, "key health change undone: it could not be recorded");
            }
        }
    }

    /// Keys per health state (every state listed, zeros included).
    pub fn health_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            StateKind::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for key in self.keys() {
            *counts
                .entry(key.counters.lock().health.kind().as_str())
                .or_default() += 1;
        }
        counts
    }

    // ---- consumers ----

    pub fn put_consumer(&self, record: ConsumerRecord) {
        let mut hash = [0u8; 32];
        let hash = match hex::decode_to_slice(record.token_hash.trim(), &mut hash) {
            Ok(()) => Some(hash),
            Err(_) => {
                tracing::warn!(consumer_id = %record.id, "consumer token hash is unreadable; no token will authenticate as this consumer until its token is replaced");
                None
            }
        };
        let previous_token = record.previous_token.and_then(|(old, until)| {
            let mut old_hash = [0u8; 32];
            match hex::decode_to_slice(old.trim(), &mut old_hash) {
                Ok(()) => Some((old_hash, until)),
                Err(_) => {
                    tracing::warn!(consumer_id = %record.id, "previous token hash is unreadable; only the current token works");
                    None
                }
            }
        });
        let consumer = Consumer {
            id: Arc::from(record.id.as_str()),
            name: record.name,
            description: record.description,
            is_active: record.is_active,
            token_hash: hash,
            previous_token,
            scopes: record
                .scopes
                .iter()
                .map(|s| Arc::from(s.as_str()))
                .collect(),
        };
        self.insert_consumer(consumer);
    }

    fn insert_consumer(&self, consumer: Consumer) {
        let consumer = Arc::new(consumer);
        let mut index = self.index.write();
        if let Some(old) = index
            .consumers
            .insert(consumer.id.clone(), consumer.clone())
        {
            for old_hash in old.token_hashes() {
                index.consumers_by_token.remove(&old_hash);
            }
        }
        for hash in consumer.token_hashes() {
            index.consumers_by_token.insert(hash, consumer.clone());
        }
    }

    pub fn remove_consumer(&self, id: &str) -> Option<Arc<Consumer>> {
        let mut index = self.index.write();
        let consumer = index.consumers.remove(id)?;
        for hash in consumer.token_hashes() {
            index.consumers_by_token.remove(&hash);
        }
        Some(consumer)
    }

    pub fn consumer(&self, id: &str) -> Option<Arc<Consumer>> {
        self.index.read().consumers.get(id).cloned()
    }

    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.index.read().consumers.values().cloned().collect()
    }

    /// Lets a consumer draw from a tier, effective on its next request.
    pub fn grant_scope(&self, consumer_id: &str, tier_id: &str) {
        let Some(old) = self.consumer(consumer_id) else {
            return;
        };
        let mut scopes = old.scopes.clone();
        scopes.insert(Arc::from(tier_id));
        self.insert_consumer(Consumer {
            scopes,
            ..old.fields()
        });
    }

    /// Takes a tier from a consumer's scopes, effective on its next request.
    pub fn revoke_scope(&self, consumer_id: &str, tier_id: &str) {
        let Some(old) = self.consumer(consumer_id) else {
            return;
        };
        let mut scopes = old.scopes.clone();
        scopes.remove(tier_id);
        self.insert_consumer(Consumer {
            scopes,
            ..old.fields()
        });
    }
}

/// Whether a stored health whose state changed at `stored` is newer than one that changed at
/// `ours` (a state never changed counts as oldest; equal times are the same change).
pub fn stored_health_is_newer(stored: Option<Timestamp>, ours: Option<Timestamp>) -> bool {
    match (stored, ours) {
        (Some(stored), Some(ours)) => stored > ours,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The stored form of an operator's `disabled`, for a key stored inactive.
fn disabled_record() -> HealthRecord {
    HealthRecord {
        state: StateKind::Disabled,
        reason: Some(health::Reason::Operator),
        until: None,
        last_status: None,
        strikes: 0,
        changed_at: None,
        memory: Default::default(),
    }
}

impl Index {
    fn unlist(&mut self, feature: &str, tier_id: &Arc<str>) {
        if let Some(entry) = self.features.get_mut(feature) {
            entry.tiers.retain(|t| t != tier_id);
            if entry.tiers.is_empty() {
                self.features.remove(feature);
            }
        }
    }
}

/// Draw-logic tests, and the fixtures (`tier`, `key`, `pool`) other modules' tests build on.
#[cfg(test)]
pub(crate) mod tests;
