//! The two gates of SPEC §7, as pure functions of state and `now`:
//! a fixed rate window per (key, feature) and a usage budget per key.

use std::time::Duration;

use chrono::TimeDelta;

use crate::model::FeatureLimit;
use crate::timestamp::Timestamp;

/// A fixed rate window that opens at the first serve after the previous one elapsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateWindow {
    pub start: Timestamp,
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

/// When a refused key can serve again; `None` means never (a lifetime cap is spent).
pub type Wait = Option<Duration>;

fn until(end: Timestamp, now: Timestamp) -> Duration {
    (end - now).to_std().unwrap_or(Duration::ZERO)
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
    now: Timestamp,
) -> Result<RateWindow, Duration> {
    match window {
        Some(w) if now < window_end(w.start, limit.window_seconds) => {
            if w.count < limit.rate_limit {
                Ok(RateWindow {
                    start: w.start,
                    count: w.count + 1,
                })
            } else {
                Err(until(window_end(w.start, limit.window_seconds), now))
            }
        }
        _ if limit.rate_limit >= 1 => Ok(RateWindow {
            start: now,
            count: 1,
        }),
        _ => Err(Duration::from_secs(limit.window_seconds.max(1) as u64)),
    }
}

/// Serves counted in the current rate window (0 once it elapsed).
pub fn rate_used(window: Option<RateWindow>, limit: FeatureLimit, now: Timestamp) -> i64 {
    match window {
        Some(w) if now < window_end(w.start, limit.window_seconds) => w.count,
        _ => 0,
    }
}

/// The usage state after one more serve, or how long until the budget allows one.
/// With a window, the count resets once the window elapsed, and the window opens at that serve.
pub fn usage_after_serve(
    state: UsageState,
    budget: UsageBudget,
    now: Timestamp,
) -> Result<UsageState, Wait> {
    let current = current_usage(state, budget, now);
    let next = UsageState {
        count: current.count.saturating_add(1),
        window_start: match (budget.usage_window_seconds, current.window_start) {
            (Some(_), None) => Some(now),
            (_, start) => start,
        },
    };
    match budget.usage_limit {
        Some(limit) if current.count >= limit => {
            Err(match (budget.usage_window_seconds, current.window_start) {
                (Some(w), Some(start)) => Some(until(window_end(start, w), now)),
                _ => None,
            })
        }
        _ => Ok(next),
    }
}

/// The usage state as of `now`: a windowed count whose window elapsed reads as a fresh window.
pub fn current_usage(state: UsageState, budget: UsageBudget, now: Timestamp) -> UsageState {
    match (budget.usage_window_seconds, state.window_start) {
        (Some(w), Some(start)) if now >= window_end(start, w) => UsageState {
            count: 0,
            window_start: None,
        },
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
    const TEN_PER_MINUTE: FeatureLimit = FeatureLimit {
        rate_limit: 10,
        window_seconds: 60,
    };

    #[test]
    fn rate_window_allows_exactly_the_limit_then_reports_the_wait() {
        let mut w = None;
        for i in 1..=10 {
            let next = rate_after_serve(w, TEN_PER_MINUTE, t0() + secs(i)).expect("within limit");
            assert_eq!(next.count, i);
            assert_eq!(
                next.start,
                t0() + secs(1),
                "window opens at the first serve"
            );
            w = Some(next);
        }
        let wait = rate_after_serve(w, TEN_PER_MINUTE, t0() + secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(41));
        assert_eq!(rate_used(w, TEN_PER_MINUTE, t0() + secs(20)), 10);
    }

    #[test]
    fn rate_window_reopens_at_the_first_serve_after_it_elapsed() {
        let w = Some(RateWindow {
            start: t0(),
            count: 10,
        });
        let next = rate_after_serve(w, TEN_PER_MINUTE, t0() + secs(75)).unwrap();
        assert_eq!(
            next,
            RateWindow {
                start: t0() + secs(75),
                count: 1
            }
        );
        assert_eq!(rate_used(w, TEN_PER_MINUTE, t0() + secs(60)), 0);
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
        s = usage_after_serve(s, budget, t0()).unwrap();
        s = usage_after_serve(s, budget, t0()).unwrap();
        assert_eq!(s.count, 2);
        assert_eq!(
            usage_after_serve(s, budget, t0() + secs(10_000_000)),
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
            s = usage_after_serve(s, budget, t0() + secs(5)).unwrap();
        }
        assert_eq!(
            s,
            UsageState {
                count: 3,
                window_start: Some(t0() + secs(5))
            }
        );
        assert_eq!(
            usage_after_serve(s, budget, t0() + secs(100)),
            Err(Some(Duration::from_secs((month - 95) as u64)))
        );
        let renewed = usage_after_serve(s, budget, t0() + secs(5 + month)).unwrap();
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
        let w = rate_after_serve(None, huge, t0()).unwrap();
        assert!(rate_after_serve(Some(w), huge, t0()).is_err());
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
        )
        .unwrap();
        assert!(matches!(usage_after_serve(s, budget, t0()), Err(Some(_))));
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
                t0()
            ),
            Err(None)
        );
    }
}
