//! The two gates of SPEC §7, as pure functions of state and `now`: fixed rate windows per
//! (key, feature) — several per feature since SPEC §8.4, each counting requests — and a usage
//! budget per key, counting units (a serve's `cost`).
//!
//! Clocks: rate windows are measured on the monotonic clock (`Instant`) — a wall-clock step
//! can neither open a window early nor stretch one while the process runs. Their persisted
//! copies (SPEC §8.4) are placed on wall time only when written and restored (`pool`).
//! Budget windows are persisted (`usage_window_start`), so they stay on wall time.

use std::time::{Duration, Instant};

use chrono::TimeDelta;

use crate::model::{FeatureLimit, MAX_WINDOWS};
use crate::timestamp::Timestamp;

/// A fixed rate window that opens at the first serve after the previous one elapsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateWindow {
    pub start: Instant,
    pub count: i64,
}

/// A key's budget: `usage_limit` serves, per `usage_window_seconds` or for life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageBudget {
    pub usage_limit: Option<i64>,
    pub usage_window_seconds: Option<i64>,
}

/// A key's usage counter as persisted (`usage_count`, `usage_window_start`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageState {
    pub count: i64,
    pub window_start: Option<Timestamp>,
}

impl UsageBudget {
    /// No budget at all.
    pub const UNLIMITED: UsageBudget = UsageBudget {
        usage_limit: None,
        usage_window_seconds: None,
    };
}

impl UsageState {
    /// Nothing counted, no window open.
    pub const ZERO: UsageState = UsageState {
        count: 0,
        window_start: None,
    };
}

/// When a refused key can serve again; `None` means never (a lifetime cap is spent).
pub type Wait = Option<Duration>;

fn until(end: Timestamp, now: Timestamp) -> Duration {
    (end - now).to_std().unwrap_or(Duration::ZERO)
}

/// When a rate window ends; `None` when it lies beyond what `Instant` can hold (never, here).
fn rate_window_end(start: Instant, seconds: i64) -> Option<Instant> {
    start.checked_add(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
}

/// Whether the rate window opened at `start` is still open at `now`.
fn rate_window_open(start: Instant, seconds: i64, now: Instant) -> bool {
    rate_window_end(start, seconds).is_none_or(|end| now < end)
}

/// Saturates instead of overflowing: a Go row may hold any integer as a window.
fn window_end(start: Timestamp, seconds: i64) -> Timestamp {
    TimeDelta::try_seconds(seconds)
        .and_then(|d| start.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// The rate window after one more serve, or how long until one is allowed.
pub fn rate_after_serve(
    window: Option<RateWindow>,
    limit: FeatureLimit,
    now: Instant,
) -> Result<RateWindow, Duration> {
    match window {
        Some(w) if rate_window_open(w.start, limit.window_seconds, now) => {
            if w.count < limit.rate_limit {
                Ok(RateWindow {
                    start: w.start,
                    count: w.count + 1,
                })
            } else {
                Err(rate_window_end(w.start, limit.window_seconds)
                    .map_or(Duration::MAX, |end| end.saturating_duration_since(now)))
            }
        }
        _ if limit.rate_limit >= 1 => Ok(RateWindow {
            start: now,
            count: 1,
        }),
        _ => Err(Duration::from_secs(limit.window_seconds.max(1) as u64)),
    }
}

/// One rate window of a (key, feature), identified by its length (unique within a feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    pub seconds: i64,
    pub window: RateWindow,
}

/// The rate windows of one (key, feature): a fixed array, so a serve allocates nothing per
/// window. Slots follow the feature's windows in order; an empty slot has not served yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindows {
    slots: [Option<WindowState>; MAX_WINDOWS],
}

impl RateWindows {
    /// The window `seconds` long, if it has served.
    pub fn get(&self, seconds: i64) -> Option<RateWindow> {
        self.iter().find(|w| w.seconds == seconds).map(|w| w.window)
    }

    /// Every window that has served, in the feature's order.
    pub fn iter(&self) -> impl Iterator<Item = &WindowState> {
        self.slots.iter().flatten()
    }

    /// Puts `state` in place of the window of its length, else in the first free slot (a
    /// restored window); `false` when every slot is taken.
    pub fn put(&mut self, state: WindowState) -> bool {
        let slot = match self
            .slots
            .iter()
            .position(|s| s.is_some_and(|s| s.seconds == state.seconds))
        {
            Some(i) => Some(i),
            None => self.slots.iter().position(Option::is_none),
        };
        match slot {
            Some(i) => {
                self.slots[i] = Some(state);
                true
            }
            None => false,
        }
    }

    /// Gives one serve back to the window of `mark`'s length, if it is the same window.
    pub fn give_back(&mut self, mark: &WindowState) {
        for w in self.slots.iter_mut().flatten() {
            if w.seconds == mark.seconds
                && w.window.start == mark.window.start
                && w.window.count > 0
            {
                w.window.count -= 1;
            }
        }
    }
}

/// Every window of a feature after one more serve, or how long until all of them allow one:
/// the longest wait among the full windows (a window with room keeps it while time passes).
/// A refused serve changes no window. The API never stores more than `MAX_WINDOWS` windows.
pub fn rates_after_serve(
    current: &RateWindows,
    limits: &[FeatureLimit],
    now: Instant,
) -> Result<RateWindows, Duration> {
    let mut next = RateWindows::default();
    let mut wait: Option<Duration> = None;
    for (slot, limit) in next.slots.iter_mut().zip(limits) {
        match rate_after_serve(current.get(limit.window_seconds), *limit, now) {
            Ok(window) => {
                *slot = Some(WindowState {
                    seconds: limit.window_seconds,
                    window,
                })
            }
            Err(w) => wait = Some(wait.map_or(w, |longest| longest.max(w))),
        }
    }
    match wait {
        Some(w) => Err(w),
        None => Ok(next),
    }
}

/// Serves counted in the current rate window (0 once it elapsed).
pub fn rate_used(window: Option<RateWindow>, limit: FeatureLimit, now: Instant) -> i64 {
    match window {
        Some(w) if rate_window_open(w.start, limit.window_seconds, now) => w.count,
        _ => 0,
    }
}

/// The usage state after one more serve costing `cost` units (SPEC §8.4), or how long until
/// the budget allows it: a serve must fit whole in what is left. With a window, the count
/// resets once the window elapsed, and the window opens at that serve. A cost above the whole
/// `usage_limit` never fits (`Err(None)`).
pub fn usage_after_serve(
    state: UsageState,
    budget: UsageBudget,
    now: Timestamp,
    cost: i64,
) -> Result<UsageState, Wait> {
    let current = current_usage(state, budget, now);
    let next = UsageState {
        count: current.count.saturating_add(cost),
        window_start: match (budget.usage_window_seconds, current.window_start) {
            (Some(_), None) => Some(now),
            (_, start) => start,
        },
    };
    match budget.usage_limit {
        Some(limit) if cost > limit => Err(None),
        Some(limit) if current.count.saturating_add(cost) > limit => {
            Err(match (budget.usage_window_seconds, current.window_start) {
                (Some(w), Some(start)) => Some(until(window_end(start, w), now)),
                _ => None,
            })
        }
        _ => Ok(next),
    }
}

/// Whether the budget refuses even a serve of cost 1 now (what a draw may remember to step
/// over the key without its lock; a costlier refusal says nothing about a cheaper serve).
pub fn budget_spent(state: UsageState, budget: UsageBudget, now: Timestamp) -> bool {
    budget
        .usage_limit
        .is_some_and(|limit| current_usage(state, budget, now).count >= limit)
}

/// The usage state as of `now`: a windowed count whose window elapsed reads as a fresh window,
/// and so does one with no (readable) window start — the Go service opened the window at the
/// first serve, so a windowed count without a start is one no window holds any more.
pub fn current_usage(state: UsageState, budget: UsageBudget, now: Timestamp) -> UsageState {
    let fresh = UsageState {
        count: 0,
        window_start: None,
    };
    match (budget.usage_window_seconds, state.window_start) {
        (Some(w), Some(start)) if now >= window_end(start, w) => fresh,
        (Some(_), None) => fresh,
        _ => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn t0() -> Timestamp {
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
    }
    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }
    /// A monotonic origin for rate windows; tests move it forward by adding durations.
    fn m0() -> Instant {
        Instant::now()
    }
    fn mono(base: Instant, n: u64) -> Instant {
        base + Duration::from_secs(n)
    }
    const TEN_PER_MINUTE: FeatureLimit = FeatureLimit {
        rate_limit: 10,
        window_seconds: 60,
    };

    #[test]
    fn rate_window_allows_exactly_the_limit_then_reports_the_wait() {
        let base = m0();
        let mut w = None;
        for i in 1..=10 {
            let next = rate_after_serve(w, TEN_PER_MINUTE, mono(base, i)).expect("within limit");
            assert_eq!(next.count, i as i64);
            assert_eq!(next.start, mono(base, 1), "window opens at the first serve");
            w = Some(next);
        }
        let wait = rate_after_serve(w, TEN_PER_MINUTE, mono(base, 20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(41));
        assert_eq!(rate_used(w, TEN_PER_MINUTE, mono(base, 20)), 10);
    }

    #[test]
    fn rate_window_reopens_at_the_first_serve_after_it_elapsed() {
        let base = m0();
        let w = Some(RateWindow {
            start: base,
            count: 10,
        });
        let next = rate_after_serve(w, TEN_PER_MINUTE, mono(base, 75)).unwrap();
        assert_eq!(
            next,
            RateWindow {
                start: mono(base, 75),
                count: 1
            }
        );
        assert_eq!(rate_used(w, TEN_PER_MINUTE, mono(base, 60)), 0);
    }

    // Issue 7 item 9: rate windows take a monotonic instant, so no wall-clock reading — however
    // far it steps forward or back — enters their arithmetic; only elapsed monotonic time
    // opens the next window.
    #[test]
    fn rate_windows_follow_elapsed_monotonic_time_only() {
        let base = m0();
        let mut w = None;
        for _ in 0..10 {
            w = Some(rate_after_serve(w, TEN_PER_MINUTE, base).expect("within limit"));
        }
        // 59 s of real time later the window is still closed, and reports the true wait.
        assert_eq!(
            rate_after_serve(w, TEN_PER_MINUTE, mono(base, 59)),
            Err(Duration::from_secs(1))
        );
        // A full window of real time later it opens, not a second earlier or later.
        assert!(rate_after_serve(w, TEN_PER_MINUTE, mono(base, 60)).is_ok());
    }

    #[test]
    fn lifetime_budget_caps_forever() {
        let budget = UsageBudget {
            usage_limit: Some(2),
            usage_window_seconds: None,
        };
        let mut s = UsageState {
            count: 0,
            window_start: None,
        };
        s = usage_after_serve(s, budget, t0(), 1).unwrap();
        s = usage_after_serve(s, budget, t0(), 1).unwrap();
        assert_eq!(s.count, 2);
        assert_eq!(
            usage_after_serve(s, budget, t0() + secs(10_000_000), 1),
            Err(None)
        );
    }

    #[test]
    fn monthly_budget_resets_when_its_window_elapsed() {
        let month = 2_592_000;
        let budget = UsageBudget {
            usage_limit: Some(3),
            usage_window_seconds: Some(month),
        };
        let mut s = UsageState {
            count: 0,
            window_start: None,
        };
        for _ in 0..3 {
            s = usage_after_serve(s, budget, t0() + secs(5), 1).unwrap();
        }
        assert_eq!(
            s,
            UsageState {
                count: 3,
                window_start: Some(t0() + secs(5))
            }
        );
        assert_eq!(
            usage_after_serve(s, budget, t0() + secs(100), 1),
            Err(Some(Duration::from_secs((month - 95) as u64)))
        );
        let renewed = usage_after_serve(s, budget, t0() + secs(5 + month), 1).unwrap();
        assert_eq!(
            renewed,
            UsageState {
                count: 1,
                window_start: Some(t0() + secs(5 + month))
            }
        );
    }

    #[test]
    fn unlimited_keys_still_count_serves() {
        let budget = UsageBudget {
            usage_limit: None,
            usage_window_seconds: None,
        };
        let s = usage_after_serve(
            UsageState {
                count: 41,
                window_start: None,
            },
            budget,
            t0(),
            1,
        )
        .unwrap();
        assert_eq!(s.count, 42);
    }

    #[test]
    fn absurd_windows_from_a_go_row_saturate_instead_of_panicking() {
        let huge = FeatureLimit {
            rate_limit: 1,
            window_seconds: i64::MAX,
        };
        let w = rate_after_serve(None, huge, m0()).unwrap();
        assert!(rate_after_serve(Some(w), huge, w.start).is_err());
        let budget = UsageBudget {
            usage_limit: Some(1),
            usage_window_seconds: Some(i64::MAX),
        };
        let s = usage_after_serve(
            UsageState {
                count: 0,
                window_start: None,
            },
            budget,
            t0(),
            1,
        )
        .unwrap();
        assert!(matches!(
            usage_after_serve(s, budget, t0(), 1),
            Err(Some(_))
        ));
    }

    // Issue 7 item 7: a windowed budget whose stored window start is missing or unreadable is
    // a fresh window (the Go service opened one at the first serve), never spent forever.
    #[test]
    fn windowed_budget_without_a_window_start_is_a_fresh_window() {
        let budget = UsageBudget {
            usage_limit: Some(2),
            usage_window_seconds: Some(3600),
        };
        let spent_without_start = UsageState {
            count: 2,
            window_start: None,
        };
        assert_eq!(
            current_usage(spent_without_start, budget, t0()),
            UsageState {
                count: 0,
                window_start: None
            }
        );
        let first = usage_after_serve(spent_without_start, budget, t0(), 1).expect("fresh window");
        assert_eq!(
            first,
            UsageState {
                count: 1,
                window_start: Some(t0())
            }
        );
        let second = usage_after_serve(first, budget, t0() + secs(1), 1).expect("within limit");
        assert_eq!(
            usage_after_serve(second, budget, t0() + secs(10), 1),
            Err(Some(Duration::from_secs(3590))),
            "then spent until the window opened at the first serve elapses"
        );
        // A lifetime cap without a window is unaffected: spent stays spent.
        let lifetime = UsageBudget {
            usage_limit: Some(2),
            usage_window_seconds: None,
        };
        assert_eq!(
            usage_after_serve(spent_without_start, lifetime, t0(), 1),
            Err(None)
        );
    }

    #[test]
    fn go_rows_over_their_limit_are_refused_not_underflowed() {
        let budget = UsageBudget {
            usage_limit: Some(5),
            usage_window_seconds: None,
        };
        assert_eq!(
            usage_after_serve(
                UsageState {
                    count: 9,
                    window_start: None
                },
                budget,
                t0(),
                1
            ),
            Err(None)
        );
    }

    // Issue 11 item 4: several windows, cost against the budget.
    const FIVE_PER_SECOND: FeatureLimit = FeatureLimit {
        rate_limit: 5,
        window_seconds: 1,
    };
    const EIGHT_PER_MINUTE: FeatureLimit = FeatureLimit {
        rate_limit: 8,
        window_seconds: 60,
    };

    fn counts(w: &RateWindows) -> Vec<(i64, i64)> {
        w.iter().map(|s| (s.seconds, s.window.count)).collect()
    }

    #[test]
    fn one_window_full_refuses_and_consumes_from_none() {
        let base = m0();
        let limits = [FIVE_PER_SECOND, EIGHT_PER_MINUTE];
        let mut w = RateWindows::default();
        for _ in 0..5 {
            w = rates_after_serve(&w, &limits, base).expect("room in both");
        }
        assert_eq!(counts(&w), vec![(1, 5), (60, 5)]);
        // The per-second window is full, the per-minute one is not: refused, nothing taken,
        // and the wait is the full window's.
        let refused = rates_after_serve(&w, &limits, base + Duration::from_millis(400));
        assert_eq!(refused, Err(Duration::from_millis(600)));
        assert_eq!(counts(&w), vec![(1, 5), (60, 5)]);
        // A second later the per-second window reopens; three more fill the per-minute one.
        for i in 0..3 {
            w = rates_after_serve(&w, &limits, mono(base, 1) + Duration::from_millis(i))
                .expect("per-minute window has room");
        }
        assert_eq!(counts(&w), vec![(1, 3), (60, 8)]);
        // Now the per-second window has room but the per-minute one is full: it binds.
        assert_eq!(
            rates_after_serve(&w, &limits, mono(base, 2)),
            Err(Duration::from_secs(58))
        );
    }

    #[test]
    fn windows_freeing_at_different_times_wait_for_the_latest() {
        let base = m0();
        let limits = [FIVE_PER_SECOND, EIGHT_PER_MINUTE];
        let mut w = RateWindows::default();
        // Both full at once: the per-minute window opened first and frees last.
        for i in 0..3 {
            w = rates_after_serve(&w, &limits, mono(base, i)).unwrap();
        }
        for _ in 0..5 {
            w = rates_after_serve(&w, &limits, mono(base, 10)).unwrap();
        }
        assert_eq!(counts(&w), vec![(1, 5), (60, 8)]);
        // Retry-After is the latest of the binding windows: 50 s, not the per-second 1 s.
        assert_eq!(
            rates_after_serve(&w, &limits, mono(base, 10)),
            Err(Duration::from_secs(50))
        );
        // At 60 s both have reopened.
        let next = rates_after_serve(&w, &limits, mono(base, 60)).unwrap();
        assert_eq!(counts(&next), vec![(1, 1), (60, 1)]);
    }

    #[test]
    fn windows_are_matched_by_length_when_a_tier_changes_them() {
        let base = m0();
        let mut w = RateWindows::default();
        for _ in 0..4 {
            w = rates_after_serve(&w, &[EIGHT_PER_MINUTE], base).unwrap();
        }
        // A per-second window added before it: the per-minute count carries over.
        let w = rates_after_serve(&w, &[FIVE_PER_SECOND, EIGHT_PER_MINUTE], base).unwrap();
        assert_eq!(counts(&w), vec![(1, 1), (60, 5)]);
        // Dropped again: only the per-minute window is kept.
        let w = rates_after_serve(&w, &[EIGHT_PER_MINUTE], base).unwrap();
        assert_eq!(counts(&w), vec![(60, 6)]);
        let mut given = w;
        given.give_back(&w.iter().copied().next().unwrap());
        assert_eq!(counts(&given), vec![(60, 5)]);
    }

    #[test]
    fn cost_larger_than_the_remaining_budget_is_refused_equal_is_served() {
        let budget = UsageBudget {
            usage_limit: Some(10),
            usage_window_seconds: Some(3600),
        };
        let s = usage_after_serve(
            UsageState {
                count: 0,
                window_start: None,
            },
            budget,
            t0(),
            7,
        )
        .unwrap();
        assert_eq!(s.count, 7);
        // 3 left: cost 4 is refused until the window resets, and consumes nothing.
        assert_eq!(
            usage_after_serve(s, budget, t0() + secs(100), 4),
            Err(Some(Duration::from_secs(3500)))
        );
        assert!(!budget_spent(s, budget, t0() + secs(100)));
        // Cost equal to what is left is served and spends the budget exactly.
        let spent = usage_after_serve(s, budget, t0() + secs(100), 3).unwrap();
        assert_eq!(spent.count, 10);
        assert!(budget_spent(spent, budget, t0() + secs(100)));
        assert_eq!(
            usage_after_serve(spent, budget, t0() + secs(100), 1),
            Err(Some(Duration::from_secs(3500)))
        );
        // A cost above the whole limit never fits.
        let fresh = UsageState {
            count: 0,
            window_start: None,
        };
        assert_eq!(usage_after_serve(fresh, budget, t0(), 11), Err(None));
        // A lifetime cap: more than what is left never fits.
        let lifetime = UsageBudget {
            usage_limit: Some(10),
            usage_window_seconds: None,
        };
        assert_eq!(usage_after_serve(s, lifetime, t0(), 4), Err(None));
        assert_eq!(usage_after_serve(s, lifetime, t0(), 3).unwrap().count, 10);
    }
}
