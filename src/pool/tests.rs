//! Draw logic with a moving clock: rotation, scope, outcomes, Retry-After, give-back.

use super::*;
use chrono::{TimeDelta, TimeZone, Utc};

fn t0() -> Timestamp {
    Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
}

pub(crate) fn tier(id: &str, features: &[(&str, i64, i64)]) -> TierRecord {
    TierRecord {
        id: id.into(),
        name: format!("{id}-name"),
        description: String::new(),
        features: features
            .iter()
            .map(|(f, rate_limit, window_seconds)| {
                (
                    f.to_string(),
                    vec![FeatureLimit {
                        rate_limit: *rate_limit,
                        window_seconds: *window_seconds,
                    }],
                )
            })
            .collect(),
        source: None,
        upstream: None,
    }
}

pub(crate) fn key(id: &str, tier_id: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        name: id.into(),
        sealed_value: format!("value-of-{id}"),
        tier_id: tier_id.into(),
        is_active: true,
        expires_at: None,
        usage_limit: None,
        usage_count: 0,
        usage_window_seconds: None,
        usage_window_start: None,
        metadata_json: "{}".into(),
        created_at: None,
        secrets: vec![],
    }
}

fn consumer(id: &str, scopes: &[&str]) -> ConsumerRecord {
    ConsumerRecord {
        id: id.into(),
        name: id.into(),
        token_hash: hex::encode(token_hash(&format!("token-{id}"))),
        description: String::new(),
        is_active: true,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        previous_token: None,
    }
}

pub(crate) fn pool(
    tiers: Vec<TierRecord>,
    keys: Vec<KeyRecord>,
    consumers: Vec<ConsumerRecord>,
) -> Pool {
    Pool::load(
        Snapshot {
            tiers,
            keys,
            consumers,
            health: Default::default(),
            tier_cooldowns: Default::default(),
            regbot_keys: Default::default(),
            rate_windows: Default::default(),
        },
        &Sealer::new(None),
    )
}

/// Both clocks at wall time `t`: the monotonic reading moves with the wall clock from a fixed
/// origin at `t0()` (these tests only move time forward from there).
fn at(t: Timestamp) -> Now {
    static ORIGIN: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    Now {
        wall: t,
        mono: *ORIGIN + (t - t0()).to_std().unwrap_or_default(),
    }
}

fn draw_id(p: &Pool, caller: &Caller, feature: &str, now: Timestamp) -> Draw<String> {
    p.draw(caller, feature, at(now), |r, _| r.key.id.to_string())
}

#[test]
fn rotation_is_round_robin_over_the_candidates() {
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![key("a", "t"), key("b", "t"), key("c", "t")],
        vec![],
    );
    let served: Vec<_> = (0..6)
        .map(|_| draw_id(&p, &Caller::Admin, "scrape", t0()))
        .collect();
    let ids: Vec<String> = served
        .into_iter()
        .map(|d| match d {
            Draw::Served(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids[..3], ids[3..]);
    let distinct: HashSet<_> = ids[..3].iter().collect();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn a_key_refused_by_a_gate_is_skipped_for_the_next() {
    let p = pool(
        vec![tier("t", &[("scrape", 1, 60)])],
        vec![key("a", "t"), key("b", "t")],
        vec![],
    );
    let mut ids = HashSet::new();
    for _ in 0..2 {
        match draw_id(&p, &Caller::Admin, "scrape", t0()) {
            Draw::Served(id) => assert!(ids.insert(id)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0() + TimeDelta::seconds(20)),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(40))
        }
    );
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0() + TimeDelta::seconds(60)),
        Draw::Served(_)
    ));
}

#[test]
fn outcomes_distinguish_unknown_out_of_scope_and_exhausted() {
    let mut spent = key("spent", "a");
    spent.usage_limit = Some(1);
    spent.usage_count = 1;
    let p = pool(
        vec![
            tier("a", &[("scrape", 5, 60)]),
            tier("b", &[("search", 5, 60)]),
        ],
        vec![spent],
        vec![consumer("c1", &["b"])],
    );
    let c1 = Caller::Consumer(p.consumer_for_token("token-c1").unwrap());
    assert_eq!(draw_id(&p, &c1, "nope", t0()), Draw::UnknownFeature);
    assert_eq!(draw_id(&p, &c1, "scrape", t0()), Draw::OutOfScope);
    assert_eq!(
        draw_id(&p, &c1, "search", t0()),
        Draw::Exhausted { retry_after: None }
    );
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { retry_after: None }
    );
}

#[test]
fn consumers_draw_only_from_granted_tiers_and_grants_apply_at_once() {
    let p = pool(
        vec![
            tier("a", &[("scrape", 50, 60)]),
            tier("b", &[("scrape", 50, 60)]),
        ],
        vec![key("ka", "a"), key("kb", "b")],
        vec![consumer("c1", &["b"])],
    );
    for _ in 0..10 {
        let c1 = Caller::Consumer(p.consumer_for_token("token-c1").unwrap());
        assert_eq!(draw_id(&p, &c1, "scrape", t0()), Draw::Served("kb".into()));
    }
    p.grant_scope("c1", "a");
    let c1 = Caller::Consumer(p.consumer_for_token("token-c1").unwrap());
    let ids: HashSet<_> = (0..4)
        .map(|_| match draw_id(&p, &c1, "scrape", t0()) {
            Draw::Served(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2);
    p.remove_consumer("c1");
    assert!(p.consumer_for_token("token-c1").is_none());
}

#[test]
fn expired_inactive_and_unreadable_keys_are_never_candidates() {
    let mut expired = key("expired", "t");
    expired.expires_at = Some(t0() - TimeDelta::seconds(1));
    let mut inactive = key("inactive", "t");
    inactive.is_active = false;
    let mut unreadable = key("unreadable", "t");
    unreadable.sealed_value = "enc:gcm:00".into();
    let mut later = key("later", "t");
    later.expires_at = Some(t0() + TimeDelta::seconds(10));
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![expired, inactive, unreadable, later],
        vec![],
    );
    for _ in 0..8 {
        assert_eq!(
            draw_id(&p, &Caller::Admin, "scrape", t0()),
            Draw::Served("later".into())
        );
    }
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0() + TimeDelta::seconds(10)),
        Draw::Exhausted { retry_after: None }
    );
}

#[test]
fn a_refused_gate_consumes_nothing_from_the_other() {
    let mut k = key("k", "t");
    k.usage_limit = Some(1);
    let p = pool(vec![tier("t", &[("scrape", 2, 60)])], vec![k], vec![]);
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served(_)
    ));
    // budget refuses: rate must stay at 1
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { retry_after: None }
    );
    let key = p.key("k").unwrap();
    let limit = FeatureLimit {
        rate_limit: 2,
        window_seconds: 60,
    };
    assert_eq!(key.rate_used("scrape", limit, at(t0()).mono), 1);
    assert_eq!(key.stored_usage().count, 1);
}

#[test]
fn rate_refusal_leaves_the_budget_untouched() {
    let mut k = key("k", "t");
    k.usage_limit = Some(10);
    let p = pool(vec![tier("t", &[("scrape", 1, 60)])], vec![k], vec![]);
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served(_)
    ));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { .. }
    ));
    assert_eq!(p.key("k").unwrap().stored_usage().count, 1);
}

#[test]
fn retry_after_is_the_earliest_candidate_and_waits_for_both_gates() {
    let mut monthly = key("monthly", "t");
    monthly.usage_limit = Some(1);
    monthly.usage_window_seconds = Some(3600);
    monthly.usage_count = 1;
    monthly.usage_window_start = Some(t0() - TimeDelta::seconds(600));
    let p = pool(
        vec![tier("t", &[("scrape", 1, 60)])],
        vec![monthly, key("plain", "t")],
        vec![],
    );
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served("plain".into())
    );
    // plain waits 60 s for its rate window; monthly waits 3000 s for its budget.
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(60))
        }
    );
    // the budget window reset lets monthly serve again and opens a new window there
    let later = t0() + TimeDelta::seconds(3000);
    let served: HashSet<_> = (0..2)
        .map(|_| match draw_id(&p, &Caller::Admin, "scrape", later) {
            Draw::Served(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(served.len(), 2);
    let m = p.key("monthly").unwrap().stored_usage();
    assert_eq!((m.count, m.window_start), (1, Some(later)));
}

#[test]
fn revert_restores_usage_and_voids_later_reservations() {
    let mut k = key("k", "t");
    k.usage_limit = Some(3);
    let p = pool(vec![tier("t", &[("scrape", 100, 60)])], vec![k], vec![]);
    let mut held = Vec::new();
    for _ in 0..2 {
        if let Draw::Served(r) = p.draw(&Caller::Admin, "scrape", at(t0()), |r, _| r) {
            held.push(r);
        }
    }
    let key = p.key("k").unwrap();
    assert_eq!(key.stored_usage().count, 2);
    key.revert_usage(&held[0]);
    key.give_back_rate(&held[0]);
    key.give_back_rate(&held[1]);
    assert_eq!(key.stored_usage().count, 0);
    assert!(!key.is_current(&held[1]));
    let limit = FeatureLimit {
        rate_limit: 100,
        window_seconds: 60,
    };
    assert_eq!(key.rate_used("scrape", limit, at(t0()).mono), 0);
    // the budget is whole again
    for _ in 0..3 {
        assert!(matches!(
            draw_id(&p, &Caller::Admin, "scrape", t0()),
            Draw::Served(_)
        ));
    }
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { .. }
    ));
}

#[test]
fn tier_feature_changes_take_effect_on_the_next_draw() {
    let p = pool(
        vec![tier("t", &[("scrape", 1, 60)])],
        vec![key("k", "t")],
        vec![],
    );
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served(_)
    ));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { .. }
    ));
    p.put_tier(tier("t", &[("scrape", 5, 60), ("search", 1, 60)]));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served(_)
    ));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "search", t0()),
        Draw::Served(_)
    ));
    p.put_tier(tier("t", &[("search", 1, 60)]));
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::UnknownFeature
    );
}

#[test]
fn usage_limit_holds_under_concurrent_threads() {
    let mut k = key("k", "t");
    k.usage_limit = Some(500);
    let p = Arc::new(pool(
        vec![tier("t", &[("scrape", 1_000_000, 60)])],
        vec![k, key("other", "u")],
        vec![],
    ));
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..8 {
            let (p, served) = (p.clone(), served.clone());
            s.spawn(move || {
                for _ in 0..200 {
                    if let Draw::Served(_) = draw_id(&p, &Caller::Admin, "scrape", t0()) {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(served.load(Ordering::Relaxed), 500);
    assert_eq!(p.key("k").unwrap().stored_usage().count, 500);
}

#[test]
fn spent_keys_are_stepped_over_and_still_report_when_they_free_up() {
    let mut monthly = key("monthly", "t");
    monthly.usage_limit = Some(1);
    monthly.usage_window_seconds = Some(3600);
    let mut lifetime = key("lifetime", "t");
    lifetime.usage_limit = Some(1);
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![monthly, lifetime],
        vec![],
    );
    for _ in 0..2 {
        assert!(matches!(
            draw_id(&p, &Caller::Admin, "scrape", t0()),
            Draw::Served(_)
        ));
    }
    // First refusal takes the locks and remembers; later ones step over both keys.
    for s in [10, 20, 30] {
        assert_eq!(
            draw_id(&p, &Caller::Admin, "scrape", t0() + TimeDelta::seconds(s)),
            Draw::Exhausted {
                retry_after: Some(Duration::from_secs((3600 - s) as u64))
            }
        );
    }
    // The monthly key serves again once its window elapsed; the lifetime one never does.
    let later = t0() + TimeDelta::seconds(3600);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", later),
        Draw::Served("monthly".into())
    );
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", later),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(3600))
        }
    );
}

/// How many of `n` admin draws each key served.
fn spread(p: &Pool, n: usize, now: Timestamp) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        if let Draw::Served(id) = draw_id(p, &Caller::Admin, "scrape", now) {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

fn even(ids: &[&str], each: usize) -> BTreeMap<String, usize> {
    ids.iter().map(|id| (id.to_string(), each)).collect()
}

// Issue 7 item 4: with one of four keys refused, the other three share the draws evenly —
// the refused key's turns do not all go to the key after it (was 199/100/100).
#[test]
fn serves_spread_evenly_when_a_budget_refuses_a_key() {
    let mut spent = key("b", "t");
    spent.usage_limit = Some(1);
    spent.usage_count = 1;
    let p = pool(
        vec![tier("t", &[("scrape", 1_000, 60)])],
        vec![key("a", "t"), spent, key("c", "t"), key("d", "t")],
        vec![],
    );
    assert_eq!(spread(&p, 300, t0()), even(&["a", "c", "d"], 100));
}

#[test]
fn serves_spread_evenly_when_a_rate_window_refuses_a_key() {
    // Key `b` sits alone in a tier allowing one serve per hour; the first draws use it up.
    let p = pool(
        vec![
            tier("t", &[("scrape", 1_000, 60)]),
            tier("slow", &[("scrape", 1, 3600)]),
        ],
        vec![
            key("a", "t"),
            key("c", "t"),
            key("d", "t"),
            key("b", "slow"),
        ],
        vec![],
    );
    let warm_up = spread(&p, 4, t0());
    assert_eq!(warm_up, even(&["a", "b", "c", "d"], 1));
    assert_eq!(spread(&p, 300, t0()), even(&["a", "c", "d"], 100));
}

#[test]
fn serves_spread_evenly_when_a_key_is_not_servable() {
    let mut inactive = key("b", "t");
    inactive.is_active = false;
    let p = pool(
        vec![tier("t", &[("scrape", 1_000, 60)])],
        vec![key("a", "t"), inactive, key("c", "t"), key("d", "t")],
        vec![],
    );
    assert_eq!(spread(&p, 300, t0()), even(&["a", "c", "d"], 100));
}

// Issue 7 item 2: a consumer whose stored token hash cannot be read authenticates with no
// token — in particular not with a stand-in derived from its (public) id.
#[test]
fn a_consumer_with_an_unreadable_hash_matches_no_token() {
    let mut broken = consumer("c1", &["t"]);
    broken.token_hash = "not-a-hash".into();
    let p = pool(vec![tier("t", &[("scrape", 10, 60)])], vec![], vec![broken]);
    let listed = p.consumer("c1").expect("still listed");
    assert_eq!(listed.token_hash, None);
    for token in ["unreadable-hash:c1", "not-a-hash", "token-c1", ""] {
        assert!(p.consumer_for_token(token).is_none(), "{token}");
    }
    // Granting a scope keeps it unmatchable; removing it works.
    p.grant_scope("c1", "t");
    assert!(p.consumer_for_token("unreadable-hash:c1").is_none());
    assert!(p.remove_consumer("c1").is_some());
}

// Issue 7 item 9: the wall clock stepping forward (NTP, a VM resumed) must not open a rate
// window early, and stepping back must not stretch one: only monotonic time counts.
#[test]
fn wall_clock_steps_neither_open_nor_stretch_a_rate_window() {
    let p = pool(
        vec![tier("t", &[("scrape", 2, 60)])],
        vec![key("a", "t")],
        vec![],
    );
    let start = at(t0());
    let step = |wall_jump: i64, elapsed: u64| Now {
        wall: t0() + TimeDelta::seconds(wall_jump),
        mono: start.mono + Duration::from_secs(elapsed),
    };
    for _ in 0..2 {
        assert!(matches!(
            p.draw(&Caller::Admin, "scrape", start, |_, _| ()),
            Draw::Served(())
        ));
    }
    // The wall clock jumps a day ahead one second later: the window is still full.
    assert_eq!(
        draw_with(&p, step(86_400, 1)),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(59))
        }
    );
    // The wall clock jumps an hour back, and a full minute has really passed: it is open.
    assert_eq!(draw_with(&p, step(-3_600, 60)), Draw::Served("a".into()));
}

fn draw_with(p: &Pool, now: Now) -> Draw<String> {
    p.draw(&Caller::Admin, "scrape", now, |r, _| r.key.id.to_string())
}

// ---- key health (issue 9 items 4 and 5) ----

fn outcome(class: health::OutcomeClass, retry_after: Option<u64>) -> health::Outcome {
    health::Outcome {
        class,
        status: None,
        retry_after: retry_after.map(Duration::from_secs),
    }
}

fn report(
    p: &Pool,
    key_id: &str,
    serve_at: Timestamp,
    o: &health::Outcome,
    now: Timestamp,
) -> StateKind {
    report_on(p, key_id, "serve", serve_at, o, now)
}

fn report_on(
    p: &Pool,
    key_id: &str,
    serve_id: &str,
    serve_at: Timestamp,
    o: &health::Outcome,
    now: Timestamp,
) -> StateKind {
    let serve = health::ServeRef {
        id: serve_id,
        at: serve_at,
    };
    p.report(key_id, serve, o, at(now), health::Jitter::NONE, |_, _| ())
        .expect("key exists")
        .key_state
}

#[test]
fn a_cooling_key_is_skipped_its_end_counts_into_retry_after_and_one_probe_goes_out() {
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![key("a", "t")],
        vec![],
    );
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served("a".into())
    );
    let cooled = report(
        &p,
        "a",
        t0(),
        &outcome(health::OutcomeClass::RateLimited, Some(5)),
        t0(),
    );
    assert_eq!(cooled, StateKind::Cooling);
    match draw_id(&p, &Caller::Admin, "scrape", t0() + TimeDelta::seconds(2)) {
        Draw::Exhausted {
            retry_after: Some(wait),
        } => {
            assert!(
                wait.abs_diff(Duration::from_secs(3)) < Duration::from_millis(1),
                "{wait:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    let due = t0() + TimeDelta::seconds(5);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", due),
        Draw::Served("a".into())
    );
    assert_eq!(p.key("a").unwrap().health().state, StateKind::Probing);
    assert!(
        matches!(
            draw_id(&p, &Caller::Admin, "scrape", due),
            Draw::Exhausted {
                retry_after: Some(_)
            }
        ),
        "one probe in flight at a time"
    );
    let closed = report(&p, "a", due, &outcome(health::OutcomeClass::Ok, None), due);
    assert_eq!(closed, StateKind::Active);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", due),
        Draw::Served("a".into())
    );
}

#[test]
fn a_throttled_tier_is_skipped_with_its_wait_and_no_key_is_held() {
    let ids = ["a", "b", "c", "d"];
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        ids.iter().map(|id| key(id, "t")).collect(),
        vec![],
    );
    for _ in 0..4 {
        assert!(matches!(
            draw_id(&p, &Caller::Admin, "scrape", t0()),
            Draw::Served(_)
        ));
    }
    let limited = outcome(health::OutcomeClass::RateLimited, Some(1));
    for id in &ids[..3] {
        report(&p, id, t0(), &limited, t0());
    }
    for id in ids {
        assert_eq!(
            p.key(id).unwrap().health().state,
            StateKind::Active,
            "{id} pardoned"
        );
    }
    match draw_id(&p, &Caller::Admin, "scrape", t0()) {
        Draw::Exhausted {
            retry_after: Some(wait),
        } => {
            assert!(
                wait.abs_diff(Duration::from_secs(30)) < Duration::from_millis(1),
                "{wait:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    let later = t0() + TimeDelta::seconds(30);
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", later),
        Draw::Served(_)
    ));
}

#[test]
fn an_operator_disable_is_skipped_without_retry_after_and_enable_restores_it() {
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![key("a", "t")],
        vec![],
    );
    let (changes, ()) = p.set_enabled("a", false, at(t0()), |_| ()).unwrap();
    assert_eq!(changes.len(), 1);
    assert!(!p.key("a").unwrap().is_active());
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Exhausted { retry_after: None }
    );
    p.revert_health(changes);
    assert!(
        p.key("a").unwrap().is_active(),
        "a write that failed is undone"
    );
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", t0()),
        Draw::Served("a".into())
    );
}

#[test]
fn a_tier_of_quarantined_keys_answers_when_the_first_probe_is_due() {
    let p = pool(
        vec![tier("t", &[("scrape", 100, 60)])],
        vec![key("a", "t")],
        vec![],
    );
    let auth = outcome(health::OutcomeClass::AuthInvalid, None);
    report_on(&p, "a", "s1", t0(), &auth, t0());
    let state = report_on(&p, "a", "s2", t0(), &auth, t0());
    assert_eq!(state, StateKind::Quarantined);
    match draw_id(&p, &Caller::Admin, "scrape", t0()) {
        Draw::Exhausted {
            retry_after: Some(wait),
        } => assert!(
            wait.abs_diff(Duration::from_secs(6 * 3600)) < Duration::from_millis(1),
            "it comes back by itself for a probe in 6 h: {wait:?}"
        ),
        other => panic!("{other:?}"),
    }
}

// Issue 10 item 1: a key's new version (PATCH) shares its counters, so a serve drawn from the
// old version and committed later counts against the same budget, and a tier move takes the
// key from the old tier's rotation to the new one at once.
#[test]
fn a_patched_key_keeps_its_counters_and_moves_tiers_at_once() {
    let mut k = key("k", "t1");
    k.usage_limit = Some(3);
    let p = pool(
        vec![tier("t1", &[("f", 100, 60)]), tier("t2", &[("g", 100, 60)])],
        vec![k.clone()],
        vec![],
    );
    let Draw::Served(held) = p.draw(&Caller::Admin, "f", at(t0()), |r, _| r) else {
        panic!("served");
    };
    let old = p.key("k").unwrap();
    let mut moved = k.clone();
    moved.tier_id = "t2".into();
    moved.sealed_value = "rotated".into();
    p.replace_key(Arc::new(old.patched(moved, &Sealer::new(None), false)));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Exhausted { .. }
    ));
    assert_eq!(
        draw_id(&p, &Caller::Admin, "g", t0()),
        Draw::Served("k".into())
    );
    let new = p.key("k").unwrap();
    assert_eq!(new.stored_usage().count, 2, "one count for both versions");
    assert_eq!(new.material.as_ref().unwrap().value.expose(), "rotated");
    assert_eq!(
        held.key.material.as_ref().unwrap().value.expose(),
        "value-of-k"
    );
    // A serve of the old version given back frees the shared budget.
    assert!(new.is_current(&held));
    held.key.give_back_rate(&held);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "g", t0()),
        Draw::Served("k".into())
    );
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "g", t0()),
        Draw::Exhausted { .. }
    ));
    // A paused version is never drawn; reset_usage starts the count over.
    p.replace_key(Arc::new(new.patched(k.clone(), &Sealer::new(None), true)));
    new.reset_usage();
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Exhausted { .. }
    ));
    p.replace_key(Arc::new(new.patched(k, &Sealer::new(None), false)));
    assert_eq!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Served("k".into())
    );
    assert_eq!(p.key("k").unwrap().stored_usage().count, 1);
}

// Issue 10 item 2: after a rotation the old token works until its grace ends, the new one
// throughout; an inactive consumer matches neither.
#[test]
fn a_previous_token_works_only_until_its_grace_ends() {
    let mut c = consumer("c1", &[]);
    c.token_hash = hex::encode(token_hash("new"));
    c.previous_token = Some((
        hex::encode(token_hash("old")),
        t0() + TimeDelta::seconds(10),
    ));
    let p = pool(vec![], vec![], vec![c.clone()]);
    let before_end = || t0() + TimeDelta::seconds(9);
    let after_end = || t0() + TimeDelta::seconds(10);
    assert!(p.consumer_for_token_at("old", before_end).is_some());
    assert!(p.consumer_for_token_at("old", after_end).is_none());
    assert!(p.consumer_for_token_at("new", after_end).is_some());
    assert!(p.consumer_for_token_at("token-c1", before_end).is_none());
    c.is_active = false;
    p.put_consumer(c);
    assert!(p.consumer_for_token_at("old", before_end).is_none());
    assert!(p.consumer_for_token_at("new", before_end).is_none());
}

// Issue 10 item 2: removing a tier takes its keys, features and every scope on it.
#[test]
fn removing_a_tier_takes_its_keys_and_scopes() {
    let p = pool(
        vec![tier("t1", &[("f", 100, 60)]), tier("t2", &[("f", 100, 60)])],
        vec![key("a", "t1"), key("b", "t2")],
        vec![consumer("c1", &["t1", "t2"])],
    );
    assert_eq!(p.tier_users("t1"), (1, vec![("c1".into(), "c1".into())]));
    p.remove_tier("t1");
    assert!(p.key("a").is_none() && p.tier_name("t1").is_none());
    let c1 = p.consumer("c1").unwrap();
    assert!(!c1.scopes.contains("t1") && c1.scopes.contains("t2"));
    for _ in 0..3 {
        assert_eq!(
            draw_id(&p, &Caller::Consumer(c1.clone()), "f", t0()),
            Draw::Served("b".into())
        );
    }
    p.revoke_scope("c1", "t2");
    let c1 = p.consumer("c1").unwrap();
    assert_eq!(
        draw_id(&p, &Caller::Consumer(c1), "f", t0()),
        Draw::OutOfScope
    );
}

// Issue 10 item 1: a serve drawn before a PATCH whose commit then fails frees the budget for
// the new version too (the "known spent" mark is shared; it was kept per version before, so
// a lifetime budget stayed spent for the new version until a restart).
#[test]
fn a_rollback_of_an_old_version_serve_frees_the_new_version() {
    let mut k = key("k", "t");
    k.usage_limit = Some(1);
    let p = pool(vec![tier("t", &[("f", 100, 60)])], vec![k.clone()], vec![]);
    let Draw::Served(held) = p.draw(&Caller::Admin, "f", at(t0()), |r, _| r) else {
        panic!("served");
    };
    let old = p.key("k").unwrap();
    p.replace_key(Arc::new(old.patched(k, &Sealer::new(None), false)));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Exhausted { retry_after: None }
    ));
    held.key.revert_usage(&held);
    held.key.give_back_rate(&held);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Served("k".into())
    );
}

// Issue 10 item 1: a draw still running on a key's old version (its Arc taken before a PATCH
// swapped the key) finds the old budget spent; it must not mark the shared budget spent for
// the new, raised one. CI saw every draw after a PATCH from 40 to 70 refused as "budgets
// spent" this way (tests/api/operate.rs).
#[test]
fn an_old_version_finding_its_budget_spent_does_not_mark_a_raised_one_spent() {
    let mut k = key("k", "t");
    k.usage_limit = Some(1);
    let limits = [FeatureLimit {
        rate_limit: 100,
        window_seconds: 60,
    }];
    let p = pool(vec![tier("t", &[("f", 100, 60)])], vec![k.clone()], vec![]);
    assert_eq!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Served("k".into())
    );
    let old = p.key("k").unwrap();
    k.usage_limit = Some(5);
    p.replace_key(Arc::new(old.patched(k, &Sealer::new(None), false)));
    // The old version's draw, after the swap: refused by its own limit of 1.
    assert!(old
        .try_reserve("f", &limits, 1, &Caller::Admin, at(t0()))
        .is_err());
    assert_eq!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Served("k".into()),
        "the raised budget serves"
    );
    // The current version still marks its own spent budget.
    for _ in 0..3 {
        assert_eq!(
            draw_id(&p, &Caller::Admin, "f", t0()),
            Draw::Served("k".into())
        );
    }
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "f", t0()),
        Draw::Exhausted { retry_after: None }
    ));
    assert!(p.key("k").unwrap().known_spent(t0()).is_some());
}

// Issue 11 item 3: a stored rate window is placed on the monotonic clock by the wall time
// elapsed since it opened; a start in the future (the wall clock stepped back while the
// process was down) holds the window for its whole length, and an elapsed one is dropped.
#[test]
fn restored_rate_windows_follow_elapsed_wall_time_and_a_backward_step_holds_them() {
    let stored = |start: Timestamp, count: i64| RateWindowWrite {
        key_id: "a".into(),
        feature: "scrape".into(),
        window_seconds: 60,
        start,
        count,
    };
    let now = t0() + TimeDelta::seconds(600);
    let fresh = || {
        pool(
            vec![tier("t", &[("scrape", 5, 60)])],
            vec![key("a", "t")],
            vec![],
        )
    };
    // Opened 20 s ago and full: refused until the 40 s left have passed.
    let p = fresh();
    p.key("a")
        .unwrap()
        .restore_rate_window(&stored(now - TimeDelta::seconds(20), 5), at(now));
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", now),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(40))
        }
    );
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", now + TimeDelta::seconds(40)),
        Draw::Served(_)
    ));
    // Opened 20 s ago with 3 served: 2 more fit.
    let p = fresh();
    p.key("a")
        .unwrap()
        .restore_rate_window(&stored(now - TimeDelta::seconds(20), 3), at(now));
    for _ in 0..2 {
        assert!(matches!(
            draw_id(&p, &Caller::Admin, "scrape", now),
            Draw::Served(_)
        ));
    }
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", now),
        Draw::Exhausted { .. }
    ));
    // Stored "in the future": counted as opened now, so it holds the full 60 s.
    let p = fresh();
    p.key("a")
        .unwrap()
        .restore_rate_window(&stored(now + TimeDelta::seconds(3600), 5), at(now));
    assert_eq!(
        draw_id(&p, &Caller::Admin, "scrape", now),
        Draw::Exhausted {
            retry_after: Some(Duration::from_secs(60))
        }
    );
    // Elapsed before the restart: nothing restored.
    let p = fresh();
    p.key("a")
        .unwrap()
        .restore_rate_window(&stored(now - TimeDelta::seconds(61), 5), at(now));
    assert!(matches!(
        draw_id(&p, &Caller::Admin, "scrape", now),
        Draw::Served(_)
    ));
}

// Issue 11 item 2, issue 14 item 2: the reservation carries the cost and every window to
// persist (any length, so replicas agree), each start placed on wall time as of the serve.
#[test]
fn a_reservation_carries_its_cost_and_every_window_with_its_limit() {
    let mut t = tier("t", &[("scrape", 5, 1)]);
    t.features.get_mut("scrape").unwrap().push(FeatureLimit {
        rate_limit: 10,
        window_seconds: 3600,
    });
    let p = pool(vec![t], vec![key("a", "t")], vec![]);
    let first = p.draw_cost(&Caller::Admin, "scrape", 4, at(t0()), |r, _| r.cost);
    assert_eq!(first, Draw::Served(4));
    let later = t0() + TimeDelta::seconds(30);
    let claims = p.draw_cost(&Caller::Admin, "scrape", 1, at(later), |r, _| {
        r.window_claims().collect::<Vec<_>>()
    });
    let Draw::Served(claims) = claims else {
        panic!("{claims:?}")
    };
    assert_eq!(
        claims,
        vec![
            crate::pool::WindowClaim {
                seconds: 1,
                rate_limit: 5,
                start: later,
            },
            crate::pool::WindowClaim {
                seconds: 3600,
                rate_limit: 10,
                start: t0(),
            }
        ],
        "the second window reopened at this serve; the hour window opened at the first"
    );
    assert_eq!(p.key("a").unwrap().stored_usage().count, 5);
}
