//! Re-deciding a batch the database refused (SPEC §8.7): its serves, in counting order, against
//! the counters and rate windows the database holds now. Pure; the writer reads the counters,
//! calls `redecide`, answers the refused serves as redraws and commits the kept ones.

use std::collections::HashMap;

use super::SAME_WINDOW;
use crate::pool::gates::{self, UsageBudget, UsageState};
use crate::pool::WindowClaim;
use crate::timestamp::Timestamp;

/// One serve of a refused batch.
pub struct ServeFacts<'a> {
    pub key_id: &'a str,
    pub feature: &'a str,
    pub cost: i64,
    pub at: Timestamp,
    /// The key's budget as this process knows it: used for a RegBot key (its limit is ours);
    /// a stored key is decided by the budget the database holds.
    pub budget: UsageBudget,
    pub regbot: bool,
    /// (length in seconds, limit) of each of the feature's rate windows.
    pub windows: Vec<(i64, i64)>,
}

/// What a kept serve claims, placed in the database's windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The budget window's start (a windowed budget), else the serve's time.
    pub budget_at: Timestamp,
    /// Whether the budget has a window (serves of a key without one share one delta).
    pub budget_windowed: bool,
    pub windows: Vec<WindowClaim>,
}

/// The database's counters, updated as serves are kept.
#[derive(Default, Debug)]
pub struct Counters {
    /// Per key: its counter and, for a stored key, its budget.
    pub usage: HashMap<String, (UsageState, Option<UsageBudget>)>,
    /// Per (key, feature, length): (start, count).
    pub windows: HashMap<(String, String, i64), (Timestamp, i64)>,
}

/// Decides each serve in order: kept (`Some`, with what it claims) when its budget units and
/// one request in every window fit what the database holds plus the serves kept before it;
/// refused (`None`) otherwise. `counters` end as the database will hold them once the kept
/// serves land. A key the database no longer holds (deleted) has no budget to refuse.
pub fn redecide(serves: &[ServeFacts], counters: &mut Counters) -> Vec<Option<Claim>> {
    serves
        .iter()
        .map(|s| {
            let stored = counters.usage.get(s.key_id).copied();
            let (state, budget) = match stored {
                Some((state, Some(budget))) => (state, budget),
                Some((state, None)) => (state, s.budget),
                None if s.regbot => (UsageState::ZERO, s.budget),
                None => (UsageState::ZERO, UsageBudget::UNLIMITED),
            };
            // A serve made before the window the database holds now opened (it was re-decided
            // or landed late, while another commit moved the window on) cannot be counted in
            // that window: the one it was made in is gone from the database and can no longer
            // refuse it. It is redrawn, at the time of the redraw.
            if budget.usage_window_seconds.is_some()
                && state.window_start.is_some_and(|start| before(s.at, start))
            {
                return None;
            }
            let usage = gates::usage_after_serve(state, budget, s.at, s.cost).ok()?;
            let mut windows = Vec::with_capacity(s.windows.len());
            for &(seconds, limit) in &s.windows {
                let slot = (s.key_id.to_string(), s.feature.to_string(), seconds);
                let window = match counters.windows.get(&slot) {
                    Some(&(start, _)) if before(s.at, start) => return None,
                    Some(&(start, count)) if !ended(start, seconds, s.at) => {
                        (count < limit).then_some((start, count + 1))?
                    }
                    _ => (limit >= 1).then_some((s.at, 1))?,
                };
                windows.push((slot, window, limit));
            }
            let claim = Claim {
                budget_windowed: budget.usage_window_seconds.is_some(),
                budget_at: match (budget.usage_window_seconds, usage.window_start) {
                    (Some(_), Some(start)) => start,
                    _ => s.at,
                },
                windows: windows
                    .iter()
                    .map(|((_, _, seconds), (start, _), limit)| WindowClaim {
                        seconds: *seconds,
                        rate_limit: *limit,
                        start: *start,
                    })
                    .collect(),
            };
            counters
                .usage
                .insert(s.key_id.to_string(), (usage, stored.and_then(|(_, b)| b)));
            for (slot, window, _) in windows {
                counters.windows.insert(slot, window);
            }
            Some(claim)
        })
        .collect()
}

/// Whether a serve at `at` was made before the window opened at `start`. Starts placed on wall
/// time per serve differ by microseconds (two clocks), hence the tolerance.
fn before(at: Timestamp, start: Timestamp) -> bool {
    at < start - SAME_WINDOW
}

/// Whether the window opened at `start` has ended by `at` (as `gates` decides for budgets).
fn ended(start: Timestamp, seconds: i64, at: Timestamp) -> bool {
    chrono::TimeDelta::try_seconds(seconds).is_none_or(|length| at - start >= length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeDelta, TimeZone, Utc};

    fn t0() -> Timestamp {
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
    }

    fn serve(key: &'static str, cost: i64, at: Timestamp) -> ServeFacts<'static> {
        ServeFacts {
            key_id: key,
            feature: "f",
            cost,
            at,
            budget: UsageBudget::UNLIMITED,
            regbot: false,
            windows: vec![(60, 3)],
        }
    }

    fn budget(limit: i64, window: Option<i64>) -> Option<UsageBudget> {
        Some(UsageBudget {
            usage_limit: Some(limit),
            usage_window_seconds: window,
        })
    }

    // Issue 14 item 1: serves are re-decided in order against what the database holds; one
    // that no longer fits is refused and the later ones still get their chance.
    #[test]
    fn serves_that_no_longer_fit_the_stored_budget_are_refused_in_order() {
        let mut counters = Counters::default();
        let state = UsageState {
            count: 8,
            window_start: None,
        };
        counters.usage.insert("a".into(), (state, budget(10, None)));
        let serves = [
            serve("a", 1, t0()),
            serve("a", 2, t0()),
            serve("a", 1, t0()),
        ];
        let kept: Vec<bool> = redecide(&serves, &mut counters)
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(kept, [true, false, true]);
        assert_eq!(counters.usage["a"].0.count, 10);
        assert_eq!(counters.windows[&("a".into(), "f".into(), 60)], (t0(), 2));
    }

    #[test]
    fn a_full_stored_window_refuses_until_it_ends_then_reopens_at_the_serve() {
        let mut counters = Counters::default();
        counters
            .windows
            .insert(("a".into(), "f".into(), 60), (t0(), 3));
        let later = t0() + TimeDelta::seconds(60);
        let serves = [
            serve("a", 1, t0() + TimeDelta::seconds(59)),
            serve("a", 1, later),
        ];
        let claims = redecide(&serves, &mut counters);
        assert_eq!(claims[0], None);
        let claim = claims[1].clone().expect("kept");
        assert_eq!(claim.windows[0].start, later);
        assert_eq!(claim.budget_at, later);
        assert_eq!(counters.windows[&("a".into(), "f".into(), 60)], (later, 1));
    }

    // Issue 14 item 4: with commits overlapped, a refused batch is re-decided after others
    // landed; a serve made before the window the database holds now opened was counted in it,
    // so the window it was made in held one more than its limit (three-replica libSQL test).
    #[test]
    fn a_serve_made_before_the_stored_window_opened_is_refused() {
        let mut counters = Counters::default();
        counters
            .windows
            .insert(("a".into(), "f".into(), 60), (t0(), 1));
        let serves = [
            serve("a", 1, t0() - TimeDelta::seconds(2)),
            serve("a", 1, t0() - TimeDelta::microseconds(200)),
            serve("a", 1, t0() + TimeDelta::seconds(1)),
        ];
        let kept: Vec<bool> = redecide(&serves, &mut counters)
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(
            kept,
            [false, true, true],
            "a start a few µs off is the same window"
        );
        assert_eq!(counters.windows[&("a".into(), "f".into(), 60)], (t0(), 3));

        let mut counters = Counters::default();
        let state = UsageState {
            count: 1,
            window_start: Some(t0()),
        };
        counters
            .usage
            .insert("a".into(), (state, budget(10, Some(3600))));
        let mut early = serve("a", 1, t0() - TimeDelta::seconds(2));
        early.windows.clear();
        assert_eq!(redecide(&[early], &mut counters)[0], None);
        assert_eq!(counters.usage["a"].0.count, 1);
    }

    #[test]
    fn a_windowed_budget_claims_the_window_it_counts_in() {
        let mut counters = Counters::default();
        let start = t0() - TimeDelta::seconds(30);
        let state = UsageState {
            count: 1,
            window_start: Some(start),
        };
        counters
            .usage
            .insert("a".into(), (state, budget(2, Some(3600))));
        let claims = redecide(&[serve("a", 1, t0()), serve("a", 1, t0())], &mut counters);
        assert_eq!(claims[0].as_ref().map(|c| c.budget_at), Some(start));
        assert_eq!(claims[1], None, "the budget of 2 is spent");
    }

    #[test]
    fn a_deleted_key_keeps_its_serves_and_a_regbot_key_uses_the_process_limit() {
        let mut counters = Counters::default();
        assert!(redecide(&[serve("gone", 5, t0())], &mut counters)[0].is_some());
        let mut regbot = serve("regbot:1", 2, t0());
        regbot.regbot = true;
        regbot.budget = UsageBudget {
            usage_limit: Some(1),
            usage_window_seconds: None,
        };
        assert_eq!(redecide(&[regbot], &mut counters)[0], None);
    }
}
