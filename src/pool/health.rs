//! Key health (SPEC §8.2) as pure logic: outcome reports and their classes, each key's state
//! machine, and host-level throttling per tier. No I/O and no clock reading: `now` is an
//! argument, jitter is injected, so tests walk every path by moving the clock.
//!
//! Clocks: a deadline is kept on both clocks, like `Now` — wall time to persist and show,
//! the monotonic clock to decide, so a wall-clock step neither ends a cooldown early nor
//! stretches one. A deadline rebuilt from its stored wall time keeps the span that remains
//! (one in the past is due at once).
//!
//! Where SPEC §8.2 is silent, this module decides:
//! - Reports: `retry_after_seconds` is 0..=86 400 (a day; longer is no throttle hint), the
//!   message at most 500 characters (not bytes). A `status` outranks `error` (a timeout after
//!   a 200 did not fail the key); a 1xx final status carries no verdict (`client_error`).
//! - Quota wording: the words quota(s), credit(s), balance, billing and the phrases
//!   "insufficient funds", "payment required", matched case-insensitively as whole words
//!   (so "insufficient_quota" counts, "load balancer" does not).
//! - Jitter (±20 %) spreads the cooldowns we compute; the upstream's `retry_after` and a usage
//!   window's reset are used exactly. The caps (rate 1 h, 5xx 5 min) hold after jitter.
//! - Staleness: rate_limited and upstream_error count only for a serve made in the key's
//!   current state (active since `changed_at`, or the probe in flight). A burst of reports
//!   from serves already out when a key cooled escalates nothing. auth_invalid and
//!   quota_exhausted are verdicts on the key and count whenever the serve was made.
//! - Probe failures follow their class: rate_limited and upstream_error re-cool at the next
//!   step of their ladder at once, auth_invalid after an auth cooldown or quarantine
//!   quarantines, quota_exhausted exhausts again. A client_error or network report from the
//!   probe frees its slot (it said nothing about the key).
//! - Escalation: each ladder's step decays by one per full hour without a new cooldown,
//!   counted from the end of the last one; a 5xx opening is the n-th of that count. Strikes
//!   reset when the breaker opens. The record persists the state, reason, deadline, last
//!   status and strikes, and (`HealthMemory`) each ladder's step with when its decay counts
//!   from, and the first auth_invalid's serve and time, so a restart forgets none of them. A
//!   time before the machine's monotonic clock began (a reboot long ago) cannot be placed on
//!   it: such a step restarts from zero, such a strike is dropped.
//! - A timed state is never shortened by a cooldown; exhausted and quarantined keys ignore
//!   new cooldowns; quarantine outranks exhaustion.
//! - Host throttling: the caller counts the keys served in the window; the tier cools for the
//!   largest retry_after seen, at least 30 s and at most 1 h, without jitter (one timer,
//!   nothing to spread). Keys whose reports made up the burst are pardoned: their health
//!   returns to what it was before the burst's first report changed it. Reports of serves made
//!   before the tier's cooldown ended touch no key.
//! - The at-most-half guard allows `max(1, keys / 2)` keys cooling or probing for rate/5xx
//!   reasons per tier (a one-key tier can still honour a 429); a report beyond it cools
//!   nothing (an upstream_error still counts its strike).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::Now;
use crate::timestamp::Timestamp;

/// The largest `retry_after_seconds` a report may carry.
pub const MAX_RETRY_AFTER_SECONDS: i64 = 86_400;
/// The longest `message` a report may carry, in characters.
pub const MAX_MESSAGE_CHARS: usize = 500;
/// Jitter is a fraction of a cooldown within ±this.
pub const MAX_JITTER: f64 = 0.2;

const AUTH_COOLDOWN: Duration = Duration::from_secs(60);
const AUTH_SECOND_WITHIN: Duration = Duration::from_secs(600);
const QUARANTINE_PROBE: Duration = Duration::from_secs(6 * 3600);
const EXHAUSTED_PROBE: Duration = Duration::from_secs(24 * 3600);
const RATE_LADDER: [Duration; 4] = [
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
    Duration::from_secs(3600),
];
const RATE_COOLDOWN_MAX: Duration = Duration::from_secs(3600);
const STRIKES_TO_OPEN: u32 = 5;
const BREAKER_STEP: Duration = Duration::from_secs(30);
const BREAKER_MAX: Duration = Duration::from_secs(300);
const PROBE_SLOT: Duration = Duration::from_secs(60);
const DECAY_EVERY: Duration = Duration::from_secs(3600);
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
const THROTTLE_MIN_KEYS: usize = 3;
/// SPEC §8.2's floor of a throttled tier's cooldown (`Config::host_throttle_floor` may lower it
/// for tests only; the environment cannot).
pub const THROTTLE_MIN_COOLDOWN: Duration = Duration::from_secs(30);
/// Bounds a deadline rebuilt from a stored wall time (usage windows reach 10 years).
const MAX_SPAN: Duration = Duration::from_secs(20 * 365 * 86_400);

// ---- reports ----

/// How a served key fared upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeClass {
    Ok,
    ClientError,
    AuthInvalid,
    QuotaExhausted,
    RateLimited,
    UpstreamError,
    Network,
}

/// A failure to reach the upstream at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransportError {
    Timeout,
    Connect,
}

/// The body of `POST /serves/{serve_id}/outcome` as sent. Numbers are wide so that an out of
/// range value gets `validate`'s message naming the field rather than serde's; the schema
/// (OpenAPI) states the ranges `validate` checks (as literals: utoipa takes no constants there,
/// so they repeat `MAX_RETRY_AFTER_SECONDS` and `MAX_MESSAGE_CHARS`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutcomeReport {
    /// The upstream's HTTP status.
    #[schema(minimum = 100, maximum = 599)]
    pub status: Option<i64>,
    /// A failure with no HTTP status.
    pub error: Option<TransportError>,
    /// What the upstream asked for (Retry-After), in seconds; used as the cooldown (≤ 1 h).
    #[schema(minimum = 0, maximum = 86400)]
    pub retry_after_seconds: Option<i64>,
    /// Overrides the class derived from `status`, `error` and `message`.
    pub class: Option<OutcomeClass>,
    /// The upstream's error message (quota/credits/balance wording ⇒ `quota_exhausted`).
    #[schema(max_length = 500)]
    pub message: Option<String>,
}

/// A validated, classified report: what the state machine acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub class: OutcomeClass,
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
}

/// Why a report was refused; each message starts with the field it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("status must be an HTTP status code from 100 to 599")]
    Status,
    #[error("retry_after_seconds must be a whole number from 0 to {MAX_RETRY_AFTER_SECONDS}")]
    RetryAfter,
    #[error("message must be at most {MAX_MESSAGE_CHARS} characters")]
    Message,
    #[error("status, error or class: a report needs at least one")]
    Empty,
}

impl OutcomeClass {
    pub const ALL: [OutcomeClass; 7] = [
        OutcomeClass::Ok,
        OutcomeClass::ClientError,
        OutcomeClass::AuthInvalid,
        OutcomeClass::QuotaExhausted,
        OutcomeClass::RateLimited,
        OutcomeClass::UpstreamError,
        OutcomeClass::Network,
    ];

    /// The wire and database name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Ok => "ok",
            OutcomeClass::ClientError => "client_error",
            OutcomeClass::AuthInvalid => "auth_invalid",
            OutcomeClass::QuotaExhausted => "quota_exhausted",
            OutcomeClass::RateLimited => "rate_limited",
            OutcomeClass::UpstreamError => "upstream_error",
            OutcomeClass::Network => "network",
        }
    }

    pub fn parse(name: &str) -> Option<OutcomeClass> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The classes that host-level throttling produces.
    fn is_throttling(self) -> bool {
        matches!(
            self,
            OutcomeClass::RateLimited | OutcomeClass::UpstreamError
        )
    }
}

impl OutcomeReport {
    /// Checks every field (the error names the first bad one) and classifies the report.
    pub fn validate(&self) -> Result<Outcome, ReportError> {
        let status = match self.status {
            None => None,
            Some(s) => Some(
                u16::try_from(s)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or(ReportError::Status)?,
            ),
        };
        let retry_after = match self.retry_after_seconds {
            None => None,
            Some(s) if (0..=MAX_RETRY_AFTER_SECONDS).contains(&s) => {
                Some(Duration::from_secs(s.unsigned_abs()))
            }
            Some(_) => return Err(ReportError::RetryAfter),
        };
        if self
            .message
            .as_deref()
            .is_some_and(|m| m.chars().count() > MAX_MESSAGE_CHARS)
        {
            return Err(ReportError::Message);
        }
        if status.is_none() && self.error.is_none() && self.class.is_none() {
            return Err(ReportError::Empty);
        }
        Ok(Outcome {
            class: classify(self),
            status,
            retry_after,
        })
    }
}

/// The class of a report: `class` overrides, then the status, then the transport error.
/// A report that says nothing (rejected by `validate`) is neutral.
pub fn classify(report: &OutcomeReport) -> OutcomeClass {
    if let Some(class) = report.class {
        return class;
    }
    let quota = || report.message.as_deref().is_some_and(speaks_of_quota);
    match (report.status, report.error) {
        (Some(200..=399), _) => OutcomeClass::Ok,
        (Some(401 | 403 | 429), _) if quota() => OutcomeClass::QuotaExhausted,
        (Some(401 | 403), _) => OutcomeClass::AuthInvalid,
        (Some(402), _) => OutcomeClass::QuotaExhausted,
        (Some(429), _) => OutcomeClass::RateLimited,
        (Some(500..=599), _) => OutcomeClass::UpstreamError,
        (Some(_), _) | (None, None) => OutcomeClass::ClientError,
        (None, Some(TransportError::Timeout)) => OutcomeClass::UpstreamError,
        (None, Some(TransportError::Connect)) => OutcomeClass::Network,
    }
}

const QUOTA_WORDS: [&str; 6] = ["quota", "quotas", "credit", "credits", "balance", "billing"];
const QUOTA_PHRASES: [(&str, &str); 2] = [("insufficient", "funds"), ("payment", "required")];

/// Whether an upstream message blames spent credit rather than the request rate or the key.
pub fn speaks_of_quota(message: &str) -> bool {
    let lower = message.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().any(|w| QUOTA_WORDS.contains(w))
        || words
            .windows(2)
            .any(|pair| QUOTA_PHRASES.contains(&(pair[0], pair[1])))
}

// ---- time ----

/// A fraction by which a computed cooldown is stretched or shortened, within ±`MAX_JITTER`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter(f64);

impl Jitter {
    pub const NONE: Jitter = Jitter(0.0);

    /// Clamped into ±`MAX_JITTER`; NaN is none.
    pub fn new(fraction: f64) -> Jitter {
        if fraction.is_nan() {
            Jitter::NONE
        } else {
            Jitter(fraction.clamp(-MAX_JITTER, MAX_JITTER))
        }
    }

    pub fn random() -> Jitter {
        Jitter(rand::thread_rng().gen_range(-MAX_JITTER..=MAX_JITTER))
    }

    fn spread(self, base: Duration) -> Duration {
        base.mul_f64(1.0 + self.0)
    }
}

/// A moment on both clocks (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub wall: Timestamp,
    pub mono: Instant,
}

impl Deadline {
    pub fn after(now: Now, span: Duration) -> Deadline {
        let span = span.min(MAX_SPAN);
        Deadline {
            wall: TimeDelta::from_std(span)
                .ok()
                .and_then(|d| now.wall.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            mono: now.mono.checked_add(span).unwrap_or(now.mono),
        }
    }

    /// A deadline known by its wall time (stored, or a usage window's reset), as of `now`.
    pub fn from_wall(wall: Timestamp, now: Now) -> Deadline {
        let span = (wall - now.wall).to_std().unwrap_or(Duration::ZERO);
        Deadline {
            wall,
            mono: now.mono.checked_add(span.min(MAX_SPAN)).unwrap_or(now.mono),
        }
    }

    /// How long until the deadline; `None` once it is due.
    pub fn remaining(&self, now: Now) -> Option<Duration> {
        Some(self.mono.saturating_duration_since(now.mono)).filter(|d| !d.is_zero())
    }
}

// ---- a key's health ----

/// Where a key stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Active,
    Cooling {
        until: Deadline,
    },
    /// Due for a probe: one serve at a time, `in_flight` since it went out.
    Probing {
        in_flight: Option<Now>,
    },
    Exhausted {
        until: Deadline,
    },
    Quarantined {
        probe_at: Deadline,
    },
    /// Set by an operator; nothing automatic leaves it.
    Disabled,
}

/// A state's name, as stored and shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateKind {
    Active,
    Cooling,
    Probing,
    Exhausted,
    Quarantined,
    Disabled,
}

/// Why a key changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A probe succeeded.
    Ok,
    AuthInvalid,
    QuotaExhausted,
    RateLimited,
    UpstreamError,
    /// A deadline passed; the health keeps the reason it was held for.
    ProbeDue,
    /// The tier was throttled as a whole; the key's effects from the burst were undone.
    HostThrottling,
    Operator,
}

/// One change of state, for one log line and one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: StateKind,
    pub to: StateKind,
    pub reason: Reason,
    pub until: Option<Timestamp>,
}

/// A key's health as persisted and shown (`GET /admin/keys` → `health`, all but `memory`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthRecord {
    pub state: StateKind,
    pub reason: Option<Reason>,
    pub until: Option<Timestamp>,
    pub last_status: Option<u16>,
    pub strikes: u32,
    pub changed_at: Option<Timestamp>,
    pub memory: HealthMemory,
}

/// What a key's next transitions depend on beyond its state: persisted, not shown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthMemory {
    /// The rate ladder's step and when its decay counts from (the end of its last cooldown).
    pub rate_step: u32,
    pub rate_rested_from: Option<Timestamp>,
    /// The 5xx breaker's count of openings and when its decay counts from.
    pub breaker_step: u32,
    pub breaker_rested_from: Option<Timestamp>,
    /// The serve and time of a first auth_invalid that a second may follow within 10 min.
    pub auth_strike: Option<(String, Timestamp)>,
}

/// The serve a report is about.
#[derive(Clone, Copy, Debug)]
pub struct ServeRef<'a> {
    pub id: &'a str,
    pub at: Timestamp,
}

/// How many of a tier's keys there are, and how many are cooling or probing for rate/5xx
/// reasons (`Health::held_for_rate_or_5xx`, the reporting key included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierLoad {
    pub keys: usize,
    pub held: usize,
}

/// What a report's effect depends on besides the report.
#[derive(Clone, Copy, Debug)]
pub struct ReportContext {
    /// When the key's usage window resets, if it has one.
    pub window_reset: Option<Timestamp>,
    pub tier: TierLoad,
    pub jitter: Jitter,
}

/// What a draw may do with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Serve,
    /// Serve it as the one probe in flight.
    Probe,
    /// Not now; `wait` until it may serve again, `None` if never by itself.
    Skip {
        wait: Option<Duration>,
    },
}

/// A key's health and the counters its transitions depend on.
#[derive(Clone, Debug, Default)]
pub struct Health {
    state: State,
    reason: Option<Reason>,
    last_status: Option<u16>,
    /// Consecutive upstream_errors since the last ok or opening.
    strikes: u32,
    changed_at: Option<Timestamp>,
    rate: Escalation,
    breaker: Escalation,
    last_auth: Option<AuthStrike>,
    /// The health before a burst of rate/5xx reports, restored if the tier turns out throttled.
    pardon: Option<Box<Pardon>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Escalation {
    step: u32,
    /// When the last cooldown of this ladder ended: decay counts from here.
    rested_from: Option<Deadline>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AuthStrike {
    serve_id: String,
    at: Now,
}

#[derive(Clone, Debug)]
struct Pardon {
    taken_at: Instant,
    before: Health,
}

impl State {
    pub fn kind(&self) -> StateKind {
        match self {
            State::Active => StateKind::Active,
            State::Cooling { .. } => StateKind::Cooling,
            State::Probing { .. } => StateKind::Probing,
            State::Exhausted { .. } => StateKind::Exhausted,
            State::Quarantined { .. } => StateKind::Quarantined,
            State::Disabled => StateKind::Disabled,
        }
    }

    /// When a held key is due for a probe.
    pub fn deadline(&self) -> Option<Deadline> {
        match *self {
            State::Cooling { until } | State::Exhausted { until } => Some(until),
            State::Quarantined { probe_at } => Some(probe_at),
            _ => None,
        }
    }
}

impl StateKind {
    pub const ALL: [StateKind; 6] = [
        StateKind::Active,
        StateKind::Cooling,
        StateKind::Probing,
        StateKind::Exhausted,
        StateKind::Quarantined,
        StateKind::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Active => "active",
            StateKind::Cooling => "cooling",
            StateKind::Probing => "probing",
            StateKind::Exhausted => "exhausted",
            StateKind::Quarantined => "quarantined",
            StateKind::Disabled => "disabled",
        }
    }

    pub fn parse(name: &str) -> Option<StateKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Ok,
        Reason::AuthInvalid,
        Reason::QuotaExhausted,
        Reason::RateLimited,
        Reason::UpstreamError,
        Reason::ProbeDue,
        Reason::HostThrottling,
        Reason::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ok => "ok",
            Reason::AuthInvalid => "auth_invalid",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::RateLimited => "rate_limited",
            Reason::UpstreamError => "upstream_error",
            Reason::ProbeDue => "probe_due",
            Reason::HostThrottling => "host_throttling",
            Reason::Operator => "operator",
        }
    }

    pub fn parse(name: &str) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl Escalation {
    /// The step of this failure (1-based, at most `max`) after one step of decay per full
    /// hour since the last cooldown ended.
    fn advance(&mut self, now: Instant, max: u32) -> u32 {
        let quiet_hours = self.rested_from.map_or(0, |from| {
            now.saturating_duration_since(from.mono).as_secs() / DECAY_EVERY.as_secs()
        });
        let decayed = self
            .step
            .saturating_sub(u32::try_from(quiet_hours).unwrap_or(u32::MAX));
        self.step = decayed.saturating_add(1).min(max);
        self.step
    }
}

impl Escalation {
    /// A stored step and decay origin, placed on the monotonic clock as of `now`.
    fn restore(step: u32, rested_from: Option<Timestamp>, now: Now) -> Escalation {
        let Some(wall) = rested_from else {
            return Escalation {
                step,
                rested_from: None,
            };
        };
        match at_wall(wall, now) {
            Some(mono) => Escalation {
                step,
                rested_from: Some(Deadline { wall, mono }),
            },
            // Rested since before the monotonic clock began (see the module doc): start over.
            None => Escalation::default(),
        }
    }
}

/// Where the wall time `wall` falls on the monotonic clock as of `now` (past or future);
/// `None` when before that clock began.
fn at_wall(wall: Timestamp, now: Now) -> Option<Instant> {
    if wall >= now.wall {
        return Some(Deadline::from_wall(wall, now).mono);
    }
    let ago = (now.wall - wall).to_std().unwrap_or(Duration::ZERO);
    now.mono.checked_sub(ago)
}

impl Health {
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn kind(&self) -> StateKind {
        self.state.kind()
    }

    /// The hot path's check: an active key serves without further ado.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active)
    }

    /// Whether the key counts against its tier's at-most-half guard.
    pub fn held_for_rate_or_5xx(&self) -> bool {
        matches!(self.state, State::Cooling { .. } | State::Probing { .. })
            && matches!(
                self.reason,
                Some(Reason::RateLimited | Reason::UpstreamError)
            )
    }

    pub fn record(&self) -> HealthRecord {
        HealthRecord {
            state: self.kind(),
            reason: self.reason,
            until: self.state.deadline().map(|d| d.wall),
            last_status: self.last_status,
            strikes: self.strikes,
            changed_at: self.changed_at,
            memory: HealthMemory {
                rate_step: self.rate.step,
                rate_rested_from: self.rate.rested_from.map(|d| d.wall),
                breaker_step: self.breaker.step,
                breaker_rested_from: self.breaker.rested_from.map(|d| d.wall),
                auth_strike: self
                    .last_auth
                    .as_ref()
                    .map(|a| (a.serve_id.clone(), a.at.wall)),
            },
        }
    }

    /// Whether what `record` persists beyond the state differs from `other`'s (a change to
    /// write even without a transition).
    pub fn memory_differs(&self, other: &Health) -> bool {
        self.rate != other.rate
            || self.breaker != other.breaker
            || self.last_auth != other.last_auth
    }

    /// The health a stored record describes, as of `now`: a past deadline (or a missing one)
    /// is due now, and a probe in flight before the restart no longer holds the slot.
    pub fn restore(record: &HealthRecord, now: Now) -> Health {
        let until = Deadline::from_wall(record.until.unwrap_or(now.wall), now);
        let state = match record.state {
            StateKind::Active => State::Active,
            StateKind::Cooling => State::Cooling { until },
            StateKind::Probing => State::Probing { in_flight: None },
            StateKind::Exhausted => State::Exhausted { until },
            StateKind::Quarantined => State::Quarantined { probe_at: until },
            StateKind::Disabled => State::Disabled,
        };
        let memory = &record.memory;
        let last_auth = memory.auth_strike.as_ref().and_then(|(serve_id, wall)| {
            Some(AuthStrike {
                serve_id: serve_id.clone(),
                at: Now {
                    wall: *wall,
                    mono: at_wall(*wall, now)?,
                },
            })
        });
        Health {
            state,
            reason: record.reason,
            last_status: record.last_status,
            strikes: record.strikes,
            changed_at: record.changed_at,
            rate: Escalation::restore(memory.rate_step, memory.rate_rested_from, now),
            breaker: Escalation::restore(memory.breaker_step, memory.breaker_rested_from, now),
            last_auth,
            pardon: None,
        }
    }

    /// What a draw at `now` may do, taking nothing.
    pub fn admission(&self, now: Now) -> Admission {
        let wait = match self.state {
            State::Active => return Admission::Serve,
            State::Disabled => return Admission::Skip { wait: None },
            State::Probing { in_flight: None } => None,
            State::Probing {
                in_flight: Some(since),
            } => PROBE_SLOT
                .checked_sub(now.mono.saturating_duration_since(since.mono))
                .filter(|w| !w.is_zero()),
            State::Cooling { until }
            | State::Exhausted { until }
            | State::Quarantined { probe_at: until } => until.remaining(now),
        };
        match wait {
            Some(wait) => Admission::Skip { wait: Some(wait) },
            None => Admission::Probe,
        }
    }

    /// Takes the admission for a serve made at `now`: a probe holds the slot from now on.
    pub fn admit(&mut self, now: Now) -> (Admission, Option<Transition>) {
        let admission = self.admission(now);
        if admission != Admission::Probe {
            return (admission, None);
        }
        let from = std::mem::replace(
            &mut self.state,
            State::Probing {
                in_flight: Some(now),
            },
        );
        if from.kind() == StateKind::Probing {
            return (admission, None);
        }
        self.changed_at = Some(now.wall);
        let transition = Transition {
            from: from.kind(),
            to: StateKind::Probing,
            reason: Reason::ProbeDue,
            until: None,
        };
        (admission, Some(transition))
    }

    /// Applies a report on a serve of this key (after the tier's `observe` allowed it).
    pub fn on_report(
        &mut self,
        serve: ServeRef<'_>,
        outcome: &Outcome,
        ctx: &ReportContext,
        now: Now,
    ) -> Option<Transition> {
        if self.state == State::Disabled {
            return None;
        }
        if outcome.status.is_some() {
            self.last_status = outcome.status;
        }
        let fresh = self.is_fresh(serve.at);
        let probe = fresh && matches!(self.state, State::Probing { .. });
        if matches!(
            outcome.class,
            OutcomeClass::Ok | OutcomeClass::AuthInvalid | OutcomeClass::QuotaExhausted
        ) {
            self.pardon = None;
        }
        match outcome.class {
            OutcomeClass::Ok => {
                self.strikes = 0;
                if !probe {
                    return None;
                }
                self.last_auth = None;
                self.enter(State::Active, Reason::Ok, now)
            }
            OutcomeClass::ClientError | OutcomeClass::Network => {
                if probe {
                    self.state = State::Probing { in_flight: None };
                }
                None
            }
            OutcomeClass::AuthInvalid => self.on_auth_invalid(serve, probe, ctx.jitter, now),
            OutcomeClass::QuotaExhausted => self.on_quota_exhausted(ctx, now),
            OutcomeClass::RateLimited if fresh => {
                self.on_rate_limited(outcome.retry_after, ctx, now)
            }
            OutcomeClass::UpstreamError if fresh => self.on_upstream_error(probe, ctx, now),
            OutcomeClass::RateLimited | OutcomeClass::UpstreamError => None,
        }
    }

    /// Undoes what rate/5xx reports did to this key since `since` (a throttled tier's burst).
    pub fn pardon(&mut self, since: Instant, now: Now) -> Option<Transition> {
        if self.pardon.as_ref().is_none_or(|p| p.taken_at < since) {
            return None;
        }
        let pardon = self.pardon.take()?;
        let from = self.state;
        *self = pardon.before;
        if from.kind() == self.kind() && from.deadline() == self.state.deadline() {
            return None;
        }
        self.changed_at = Some(now.wall);
        Some(Transition {
            from: from.kind(),
            to: self.kind(),
            reason: Reason::HostThrottling,
            until: self.state.deadline().map(|d| d.wall),
        })
    }

    /// An operator's `is_active`: active or disabled, every automatic state and counter cleared.
    pub fn set_enabled(&mut self, enabled: bool, now: Now) -> Option<Transition> {
        let target = if enabled {
            State::Active
        } else {
            State::Disabled
        };
        *self = Health {
            state: self.state,
            reason: self.reason,
            last_status: self.last_status,
            changed_at: self.changed_at,
            ..Health::default()
        };
        if self.state == target {
            return None;
        }
        self.enter(target, Reason::Operator, now)
    }

    /// Whether a serve made at `served_at` was made in the key's current state.
    fn is_fresh(&self, served_at: Timestamp) -> bool {
        match self.state {
            State::Active => self.changed_at.is_none_or(|c| served_at >= c),
            State::Probing {
                in_flight: Some(since),
            } => served_at >= since.wall,
            _ => false,
        }
    }

    fn on_auth_invalid(
        &mut self,
        serve: ServeRef<'_>,
        probe: bool,
        jitter: Jitter,
        now: Now,
    ) -> Option<Transition> {
        let second = match &self.last_auth {
            Some(first) if first.serve_id == serve.id => return None,
            Some(first) => now.mono.saturating_duration_since(first.at.mono) <= AUTH_SECOND_WITHIN,
            None => false,
        };
        let suspected = probe && self.reason == Some(Reason::AuthInvalid);
        if second || suspected {
            if matches!(self.state, State::Quarantined { .. }) {
                return None;
            }
            let probe_at = Deadline::after(now, jitter.spread(QUARANTINE_PROBE));
            return self.enter(State::Quarantined { probe_at }, Reason::AuthInvalid, now);
        }
        self.last_auth = Some(AuthStrike {
            serve_id: serve.id.to_owned(),
            at: now,
        });
        let until = Deadline::after(now, jitter.spread(AUTH_COOLDOWN));
        match self.state {
            State::Exhausted { .. } | State::Quarantined { .. } => None,
            State::Cooling { until: current } if current.mono >= until.mono => None,
            _ => self.enter(State::Cooling { until }, Reason::AuthInvalid, now),
        }
    }

    fn on_quota_exhausted(&mut self, ctx: &ReportContext, now: Now) -> Option<Transition> {
        if matches!(
            self.state,
            State::Exhausted { .. } | State::Quarantined { .. }
        ) {
            return None;
        }
        let until = match ctx.window_reset {
            Some(reset) => Deadline::from_wall(reset, now),
            None => Deadline::after(now, ctx.jitter.spread(EXHAUSTED_PROBE)),
        };
        self.enter(State::Exhausted { until }, Reason::QuotaExhausted, now)
    }

    fn on_rate_limited(
        &mut self,
        retry_after: Option<Duration>,
        ctx: &ReportContext,
        now: Now,
    ) -> Option<Transition> {
        if !self.may_hold(ctx.tier) {
            return None;
        }
        self.remember(now);
        let step = self.rate.advance(now.mono, RATE_LADDER.len() as u32);
        let cooldown = match retry_after {
            Some(asked) => asked,
            None => ctx.jitter.spread(RATE_LADDER[step as usize - 1]),
        };
        let until = Deadline::after(now, cooldown.min(RATE_COOLDOWN_MAX));
        self.rate.rested_from = Some(until);
        self.enter(State::Cooling { until }, Reason::RateLimited, now)
    }

    fn on_upstream_error(
        &mut self,
        probe: bool,
        ctx: &ReportContext,
        now: Now,
    ) -> Option<Transition> {
        self.remember(now);
        self.strikes = self.strikes.saturating_add(1);
        if (!probe && self.strikes < STRIKES_TO_OPEN) || !self.may_hold(ctx.tier) {
            return None;
        }
        self.strikes = 0;
        let max_step = (BREAKER_MAX.as_secs() / BREAKER_STEP.as_secs()) as u32;
        let n = self.breaker.advance(now.mono, max_step);
        let cooldown = ctx.jitter.spread(BREAKER_STEP * n).min(BREAKER_MAX);
        let until = Deadline::after(now, cooldown);
        self.breaker.rested_from = Some(until);
        self.enter(State::Cooling { until }, Reason::UpstreamError, now)
    }

    /// The at-most-half guard: whether this key may start a rate/5xx cooldown.
    fn may_hold(&self, tier: TierLoad) -> bool {
        self.held_for_rate_or_5xx() || tier.held < (tier.keys / 2).max(1)
    }

    /// Keeps the health from before the first rate/5xx effect of a possible burst.
    fn remember(&mut self, now: Now) {
        let recent = self
            .pardon
            .as_ref()
            .is_some_and(|p| now.mono.saturating_duration_since(p.taken_at) < THROTTLE_WINDOW);
        if !recent {
            self.pardon = None;
            let before = self.clone();
            self.pardon = Some(Box::new(Pardon {
                taken_at: now.mono,
                before,
            }));
        }
    }

    fn enter(&mut self, state: State, reason: Reason, now: Now) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, state);
        self.reason = Some(reason);
        self.changed_at = Some(now.wall);
        Some(Transition {
            from: from.kind(),
            to: state.kind(),
            reason,
            until: state.deadline().map(|d| d.wall),
        })
    }
}

// ---- host-level throttling, per tier ----

/// A tier's throttling detector and cooldown.
#[derive(Clone, Debug, Default)]
pub struct TierHealth {
    /// Keys with rate/5xx reports in the last 60 s and since the last ok.
    failures: HashMap<Arc<str>, Failure>,
    cooldown: Option<Deadline>,
}

#[derive(Clone, Copy, Debug)]
struct Failure {
    first_at: Instant,
    last_at: Instant,
    retry_after: Option<Duration>,
}

/// What the tier makes of a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierVerdict {
    /// Whether the report goes on to its key (`Health::on_report`).
    pub apply_to_key: bool,
    /// Set when this report revealed host throttling.
    pub throttled: Option<Throttle>,
}

/// The tier cools until `until`; each of `keys` gets `Health::pardon(since, now)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Throttle {
    pub until: Deadline,
    pub keys: Vec<Arc<str>>,
    pub since: Instant,
}

impl TierHealth {
    /// How long the tier still cools; `None` when it serves.
    pub fn wait(&self, now: Now) -> Option<Duration> {
        self.cooldown.and_then(|c| c.remaining(now))
    }

    pub fn cooldown(&self) -> Option<Deadline> {
        self.cooldown
    }

    /// A stored cooldown, after a restart (one that has ended changes nothing).
    pub fn restore_cooldown(&mut self, until: Deadline) {
        self.cooldown = Some(until);
    }

    /// Takes a report on `key_id` into the window. `served_keys` is how many distinct keys of
    /// the tier were served in the last 60 s, as the caller counts them; a throttled tier
    /// cools for at least `floor` (`THROTTLE_MIN_COOLDOWN` but in tests).
    pub fn observe(
        &mut self,
        key_id: &Arc<str>,
        served_at: Timestamp,
        outcome: &Outcome,
        served_keys: usize,
        now: Now,
        floor: Duration,
    ) -> TierVerdict {
        let pass = TierVerdict {
            apply_to_key: true,
            throttled: None,
        };
        if outcome.class == OutcomeClass::Ok {
            self.failures.clear();
        }
        if !outcome.class.is_throttling() {
            return pass;
        }
        if self.cooldown.is_some_and(|c| served_at < c.wall) {
            return TierVerdict {
                apply_to_key: false,
                throttled: None,
            };
        }
        self.failures
            .retain(|_, f| now.mono.saturating_duration_since(f.last_at) < THROTTLE_WINDOW);
        let failure = self.failures.entry(key_id.clone()).or_insert(Failure {
            first_at: now.mono,
            last_at: now.mono,
            retry_after: None,
        });
        failure.last_at = now.mono;
        failure.retry_after = failure.retry_after.max(outcome.retry_after);
        let failing = self.failures.len();
        if failing < THROTTLE_MIN_KEYS || failing * 2 < served_keys.max(failing) {
            return pass;
        }
        let largest = self.failures.values().filter_map(|f| f.retry_after).max();
        let span = largest
            .unwrap_or(Duration::ZERO)
            .clamp(floor.min(RATE_COOLDOWN_MAX), RATE_COOLDOWN_MAX);
        let until = Deadline::after(now, span);
        let since = self.failures.values().map(|f| f.first_at).min();
        let mut keys: Vec<Arc<str>> = self.failures.drain().map(|(k, _)| k).collect();
        keys.sort();
        self.cooldown = Some(until);
        TierVerdict {
            apply_to_key: false,
            throttled: Some(Throttle {
                until,
                keys,
                since: since.unwrap_or(now.mono),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
