//! Key health with a moving clock (issue 9 items 2–4): classification and validation, every
//! transition of SPEC §8.2, jitter, escalation and decay, probing, rebuilding from stored
//! values, host-level throttling and the at-most-half guard. Nothing sleeps.

use super::*;
use chrono::TimeZone;
use std::sync::LazyLock;

use OutcomeClass::{
    AuthInvalid, ClientError, Network, Ok as Fine, QuotaExhausted, RateLimited, UpstreamError,
};

static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
const MIN: u64 = 60;
const HOUR: u64 = 3600;

fn t0() -> Timestamp {
    Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
}

/// Both clocks `secs` seconds after the origin.
fn at(secs: u64) -> Now {
    Now {
        wall: t0() + TimeDelta::seconds(secs as i64),
        mono: *ORIGIN + Duration::from_secs(secs),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ctx() -> ReportContext {
    ReportContext {
        window_reset: None,
        tier: TierLoad { keys: 10, held: 0 },
        jitter: Jitter::NONE,
    }
}

fn outcome(class: OutcomeClass) -> Outcome {
    Outcome {
        class,
        status: None,
        retry_after: None,
    }
}

fn retry_after(seconds: u64) -> Outcome {
    Outcome {
        retry_after: Some(secs(seconds)),
        ..outcome(RateLimited)
    }
}

/// A report on `serve`, served at `served` and reported at `now`.
fn report_in(
    h: &mut Health,
    serve: &str,
    served: u64,
    o: Outcome,
    now: u64,
    ctx: &ReportContext,
) -> Option<Transition> {
    let serve = ServeRef {
        id: serve,
        at: at(served).wall,
    };
    h.on_report(serve, &o, ctx, at(now))
}

fn report(h: &mut Health, serve: &str, served: u64, o: Outcome, now: u64) -> Option<Transition> {
    report_in(h, serve, served, o, now, &ctx())
}

/// A report on a serve made the moment it is reported.
fn report_now(h: &mut Health, serve: &str, o: Outcome, now: u64) -> Option<Transition> {
    report(h, serve, now, o, now)
}

/// How long after `now` the key's deadline falls.
fn held_for(h: &Health, now: u64) -> Option<Duration> {
    h.state()
        .deadline()
        .map(|d| d.mono.saturating_duration_since(at(now).mono))
}

/// Takes the probe slot at `now`, asserting the draw is a probe.
fn probe(h: &mut Health, now: u64) {
    assert_eq!(h.admit(at(now)).0, Admission::Probe, "{h:?}");
}

fn cooling() -> Health {
    let mut h = Health::default();
    report_now(&mut h, "s0", outcome(RateLimited), 0);
    h
}

// ---- classification and validation ----

fn raw(status: Option<i64>, error: Option<TransportError>, message: Option<&str>) -> OutcomeReport {
    OutcomeReport {
        status,
        error,
        message: message.map(String::from),
        ..OutcomeReport::default()
    }
}

#[test]
fn statuses_and_errors_classify_as_the_table_says() {
    use TransportError::{Connect, Timeout};
    let cases = [
        (raw(Some(200), None, None), Fine),
        (raw(Some(204), None, None), Fine),
        (raw(Some(302), None, None), Fine),
        (raw(Some(399), None, None), Fine),
        (raw(Some(100), None, None), ClientError),
        (raw(Some(400), None, None), ClientError),
        (raw(Some(404), None, None), ClientError),
        (raw(Some(422), None, None), ClientError),
        (raw(Some(401), None, None), AuthInvalid),
        (raw(Some(403), None, Some("Forbidden")), AuthInvalid),
        (raw(Some(401), None, Some("Quota exceeded")), QuotaExhausted),
        (
            raw(Some(403), None, Some("credit balance too low")),
            QuotaExhausted,
        ),
        (raw(Some(402), None, None), QuotaExhausted),
        (raw(Some(429), None, None), RateLimited),
        (raw(Some(429), None, Some("Too Many Requests")), RateLimited),
        (
            raw(Some(429), None, Some("insufficient_quota")),
            QuotaExhausted,
        ),
        (raw(Some(404), None, Some("quota")), ClientError),
        (raw(Some(500), None, None), UpstreamError),
        (raw(Some(503), None, None), UpstreamError),
        (raw(Some(599), None, None), UpstreamError),
        (raw(None, Some(Timeout), None), UpstreamError),
        (raw(None, Some(Connect), None), Network),
        // The status is what the upstream said; a late transport error does not outrank it.
        (raw(Some(200), Some(Timeout), None), Fine),
        (raw(Some(503), Some(Connect), None), UpstreamError),
    ];
    for (report, class) in cases {
        assert_eq!(report.validate().map(|o| o.class), Ok(class), "{report:?}");
    }
}

#[test]
fn an_explicit_class_overrides_status_and_error() {
    for class in OutcomeClass::ALL {
        let mut report = raw(Some(200), Some(TransportError::Connect), Some("quota"));
        report.class = Some(class);
        assert_eq!(classify(&report), class);
        let alone = OutcomeReport {
            class: Some(class),
            ..OutcomeReport::default()
        };
        assert_eq!(alone.validate().map(|o| o.class), Ok(class));
    }
}

#[test]
fn quota_wording_is_matched_as_whole_words_in_any_case() {
    for message in [
        "You exceeded your current QUOTA",
        "Monthly quotas reached",
        "Insufficient credits",
        "Your credit balance is too low",
        "Check your billing details",
        "Insufficient funds",
        "insufficient-funds on account",
        "402 Payment Required",
        "error code: insufficient_quota",
    ] {
        assert!(speaks_of_quota(message), "{message}");
    }
    for message in [
        "Too many requests",
        "rejected by the load balancer",
        "invalid credentials",
        "payment",
        "funds insufficient",
        "",
    ] {
        assert!(!speaks_of_quota(message), "{message}");
    }
}

#[test]
fn every_validation_error_names_its_field() {
    let long = |n: usize| OutcomeReport {
        status: Some(500),
        message: Some("é".repeat(n)),
        ..OutcomeReport::default()
    };
    let with_retry = |s: i64| OutcomeReport {
        status: Some(429),
        retry_after_seconds: Some(s),
        ..OutcomeReport::default()
    };
    let bad = [
        (raw(Some(99), None, None), ReportError::Status, "status"),
        (raw(Some(600), None, None), ReportError::Status, "status"),
        (raw(Some(-200), None, None), ReportError::Status, "status"),
        (
            raw(Some(i64::MAX), None, None),
            ReportError::Status,
            "status",
        ),
        (
            with_retry(-1),
            ReportError::RetryAfter,
            "retry_after_seconds",
        ),
        (
            with_retry(86_401),
            ReportError::RetryAfter,
            "retry_after_seconds",
        ),
        (long(501), ReportError::Message, "message"),
        (
            raw(None, None, Some("hi")),
            ReportError::Empty,
            "status, error or class",
        ),
    ];
    for (report, error, field) in bad {
        assert_eq!(report.validate(), Err(error), "{report:?}");
        assert!(error.to_string().starts_with(field), "{error}");
    }
    // The bounds themselves are accepted; the message counts characters, not bytes.
    for report in [
        raw(Some(100), None, None),
        raw(Some(599), None, None),
        with_retry(0),
        with_retry(86_400),
        long(500),
    ] {
        assert!(report.validate().is_ok(), "{report:?}");
    }
    assert_eq!(
        with_retry(90).validate().map(|o| o.retry_after),
        Ok(Some(secs(90)))
    );
}

#[test]
fn reports_deserialize_strictly_with_snake_case_names() {
    let parse = |s: &str| serde_json::from_str::<OutcomeReport>(s);
    assert!(parse(r#"{"class":"bogus"}"#).is_err());
    assert!(parse(r#"{"class":"RateLimited"}"#).is_err());
    assert!(parse(r#"{"error":"dns"}"#).is_err());
    assert!(parse(r#"{"status":200,"extra":1}"#).is_err());
    assert_eq!(
        parse(r#"{"status":429,"error":"timeout","retry_after_seconds":5,"message":"x"}"#).unwrap(),
        OutcomeReport {
            status: Some(429),
            error: Some(TransportError::Timeout),
            retry_after_seconds: Some(5),
            class: None,
            message: Some("x".into()),
        }
    );
    for class in OutcomeClass::ALL {
        let json = serde_json::to_value(class).unwrap();
        assert_eq!(json, class.as_str());
        assert_eq!(serde_json::from_value::<OutcomeClass>(json).unwrap(), class);
        assert_eq!(OutcomeClass::parse(class.as_str()), Some(class));
    }
}

#[test]
fn stored_names_round_trip() {
    for kind in StateKind::ALL {
        assert_eq!(StateKind::parse(kind.as_str()), Some(kind));
    }
    for reason in Reason::ALL {
        assert_eq!(Reason::parse(reason.as_str()), Some(reason));
    }
    assert_eq!(StateKind::parse("broken"), None);
    assert_eq!(Reason::parse(""), None);
}

// ---- transitions ----

#[test]
fn client_errors_and_network_failures_never_touch_a_key() {
    let mut h = Health::default();
    for i in 0..4 {
        report_now(&mut h, &format!("s{i}"), outcome(UpstreamError), 0);
    }
    for (i, class) in [ClientError, Network].into_iter().enumerate() {
        assert_eq!(
            report_now(&mut h, &format!("n{i}"), outcome(class), 1),
            None
        );
    }
    assert_eq!(h.record().strikes, 4, "neither resets the count");
    let mut c = cooling();
    let before = c.record();
    assert_eq!(report_now(&mut c, "n", outcome(ClientError), 1), None);
    assert_eq!(report_now(&mut c, "m", outcome(Network), 1), None);
    assert_eq!(c.record(), before);
}

#[test]
fn first_auth_invalid_cools_60_s_and_the_same_serve_again_is_not_a_second() {
    let mut h = Health::default();
    let t = report_now(&mut h, "s1", outcome(AuthInvalid), 0).expect("transition");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Active, StateKind::Cooling, Reason::AuthInvalid)
    );
    assert_eq!(t.until, Some(at(60).wall));
    assert_eq!(held_for(&h, 0), Some(secs(60)));
    assert_eq!(report(&mut h, "s1", 0, outcome(AuthInvalid), 30), None);
    assert_eq!(h.kind(), StateKind::Cooling);
    assert_eq!(
        h.admission(at(59)),
        Admission::Skip {
            wait: Some(secs(1))
        }
    );
    assert_eq!(h.admission(at(60)), Admission::Probe);
}

#[test]
fn second_auth_invalid_from_another_serve_within_10_min_quarantines() {
    // Two serves out at once, both answered 401: the second report quarantines.
    let mut h = Health::default();
    report(&mut h, "s1", 0, outcome(AuthInvalid), 1);
    let t = report(&mut h, "s2", 0, outcome(AuthInvalid), 2).expect("transition");
    assert_eq!(
        (t.from, t.to, t.reason),
        (
            StateKind::Cooling,
            StateKind::Quarantined,
            Reason::AuthInvalid
        )
    );
    assert_eq!(held_for(&h, 2), Some(secs(6 * HOUR)), "probed after 6 h");
    // Exactly 10 minutes still counts.
    let mut h = Health::default();
    report(&mut h, "s1", 0, outcome(AuthInvalid), 0);
    report(&mut h, "s2", 0, outcome(AuthInvalid), 10 * MIN);
    assert_eq!(h.kind(), StateKind::Quarantined);
}

#[test]
fn an_auth_invalid_more_than_10_min_later_is_a_first_again() {
    let mut h = Health::default();
    report(&mut h, "s1", 0, outcome(AuthInvalid), 0);
    let t = report(&mut h, "s2", 0, outcome(AuthInvalid), 10 * MIN + 1).expect("re-cools");
    assert_eq!((t.from, t.to), (StateKind::Cooling, StateKind::Cooling));
    assert_eq!(held_for(&h, 10 * MIN + 1), Some(secs(60)));
    report(&mut h, "s3", 0, outcome(AuthInvalid), 10 * MIN + 2);
    assert_eq!(
        h.kind(),
        StateKind::Quarantined,
        "counted from the new first"
    );
}

#[test]
fn a_first_auth_invalid_never_shortens_a_longer_hold() {
    let mut h = Health::default();
    report_now(&mut h, "r", retry_after(600), 0);
    assert_eq!(report(&mut h, "s1", 0, outcome(AuthInvalid), 1), None);
    assert_eq!(held_for(&h, 1), Some(secs(599)));
    assert_eq!(h.record().reason, Some(Reason::RateLimited));
    // But it is remembered: a second from another serve quarantines.
    report(&mut h, "s2", 0, outcome(AuthInvalid), 2);
    assert_eq!(h.kind(), StateKind::Quarantined);
    let mut h = Health::default();
    report_now(&mut h, "q", outcome(QuotaExhausted), 0);
    assert_eq!(report(&mut h, "s1", 0, outcome(AuthInvalid), 1), None);
    assert_eq!(h.kind(), StateKind::Exhausted);
}

#[test]
fn a_quarantined_key_is_probed_every_6_h_until_a_probe_succeeds() {
    let mut h = Health::default();
    report(&mut h, "s1", 0, outcome(AuthInvalid), 0);
    report(&mut h, "s2", 0, outcome(AuthInvalid), 0);
    let due = 6 * HOUR;
    assert_eq!(
        h.admission(at(due - 1)),
        Admission::Skip {
            wait: Some(secs(1))
        }
    );
    let (admission, t) = h.admit(at(due));
    assert_eq!(admission, Admission::Probe);
    let t = t.expect("transition");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Quarantined, StateKind::Probing, Reason::ProbeDue)
    );
    assert_eq!(
        h.record().reason,
        Some(Reason::AuthInvalid),
        "keeps its cause"
    );
    // The probe's own 401 quarantines again at once.
    report_now(&mut h, "p1", outcome(AuthInvalid), due + 1);
    assert_eq!(h.kind(), StateKind::Quarantined);
    assert_eq!(held_for(&h, due + 1), Some(secs(6 * HOUR)));
    probe(&mut h, 2 * due + 1);
    let t = report_now(&mut h, "p2", outcome(Fine), 2 * due + 2).expect("recovers");
    assert_eq!((t.to, t.reason), (StateKind::Active, Reason::Ok));
    // A 401 after recovery is a first again.
    report_now(&mut h, "s3", outcome(AuthInvalid), 2 * due + 3);
    assert_eq!(h.kind(), StateKind::Cooling);
}

#[test]
fn quota_exhausted_holds_until_the_usage_window_resets() {
    let reset = at(3 * 24 * HOUR).wall;
    let with_window = ReportContext {
        window_reset: Some(reset),
        jitter: Jitter::new(0.2),
        ..ctx()
    };
    let mut h = Health::default();
    let t = report_in(&mut h, "s1", 5, outcome(QuotaExhausted), 5, &with_window).unwrap();
    assert_eq!(
        (t.to, t.reason, t.until),
        (StateKind::Exhausted, Reason::QuotaExhausted, Some(reset))
    );
    assert_eq!(
        held_for(&h, 5),
        Some(secs(3 * 24 * HOUR - 5)),
        "exact, no jitter"
    );
    assert_eq!(report_now(&mut h, "s2", outcome(QuotaExhausted), 6), None);
    assert_eq!(report_now(&mut h, "s3", outcome(RateLimited), 6), None);
    assert_eq!(
        h.admission(at(3 * 24 * HOUR - 1)),
        Admission::Skip {
            wait: Some(secs(1))
        }
    );
    probe(&mut h, 3 * 24 * HOUR);
    report_now(&mut h, "p", outcome(Fine), 3 * 24 * HOUR + 1);
    assert!(h.is_active());
}

#[test]
fn quota_exhausted_without_a_window_is_probed_after_24_h() {
    let mut h = cooling();
    let t = report_now(&mut h, "s1", outcome(QuotaExhausted), 1).unwrap();
    assert_eq!((t.from, t.to), (StateKind::Cooling, StateKind::Exhausted));
    assert_eq!(held_for(&h, 1), Some(secs(24 * HOUR)));
    probe(&mut h, 24 * HOUR + 1);
    report_now(&mut h, "p", outcome(QuotaExhausted), 24 * HOUR + 2);
    assert_eq!(
        h.kind(),
        StateKind::Exhausted,
        "a failed probe exhausts again"
    );
    assert_eq!(held_for(&h, 24 * HOUR + 2), Some(secs(24 * HOUR)));
}

#[test]
fn rate_limited_with_retry_after_cools_exactly_that_long_at_most_1_h() {
    let jittery = ReportContext {
        jitter: Jitter::new(0.2),
        ..ctx()
    };
    let mut h = Health::default();
    let t = report_in(&mut h, "s1", 0, retry_after(90), 0, &jittery).unwrap();
    assert_eq!((t.to, t.reason), (StateKind::Cooling, Reason::RateLimited));
    assert_eq!(held_for(&h, 0), Some(secs(90)));
    let mut h = Health::default();
    report_in(&mut h, "s1", 0, retry_after(86_400), 0, &jittery);
    assert_eq!(held_for(&h, 0), Some(secs(HOUR)));
    let mut h = Health::default();
    report_now(&mut h, "s1", retry_after(0), 0);
    assert_eq!(h.admission(at(0)), Admission::Probe, "retry now: probe now");
}

#[test]
fn repeated_rate_limits_escalate_30_s_2_min_10_min_1_h() {
    let mut h = Health::default();
    let mut now = 0;
    report_now(&mut h, "s0", outcome(RateLimited), now);
    let mut seen = vec![held_for(&h, now)];
    for i in 1..=4 {
        now += held_for(&h, now).unwrap().as_secs();
        probe(&mut h, now);
        let t = report_now(&mut h, &format!("p{i}"), outcome(RateLimited), now).unwrap();
        assert_eq!((t.from, t.to), (StateKind::Probing, StateKind::Cooling));
        seen.push(held_for(&h, now));
    }
    let want = [30, 120, 600, HOUR, HOUR].map(|s| Some(secs(s)));
    assert_eq!(seen, want);
}

#[test]
fn the_escalation_step_decays_one_step_per_hour_without_failures() {
    // Two cooldowns (30 s, 2 min), then the probe succeeds when the second ends at 150 s.
    let escalated = || {
        let mut h = Health::default();
        report_now(&mut h, "s0", outcome(RateLimited), 0);
        probe(&mut h, 30);
        report_now(&mut h, "p1", outcome(RateLimited), 30);
        probe(&mut h, 150);
        report_now(&mut h, "p2", outcome(Fine), 150);
        h
    };
    let next = |quiet: u64| {
        let mut h = escalated();
        report_now(&mut h, "s", outcome(RateLimited), 150 + quiet);
        held_for(&h, 150 + quiet)
    };
    assert_eq!(
        next(HOUR - 1),
        Some(secs(600)),
        "within the hour: next step"
    );
    assert_eq!(next(HOUR), Some(secs(120)), "an hour: one step down");
    assert_eq!(next(2 * HOUR), Some(secs(30)), "two hours: from the start");
    assert_eq!(next(10 * HOUR), Some(secs(30)));
}

#[test]
fn five_upstream_errors_in_a_row_open_four_do_not_and_ok_resets_the_count() {
    let mut h = Health::default();
    for i in 0..4 {
        assert_eq!(
            report_now(&mut h, &format!("a{i}"), outcome(UpstreamError), i),
            None
        );
    }
    assert_eq!(h.record().strikes, 4);
    report_now(&mut h, "ok", outcome(Fine), 4);
    assert_eq!(h.record().strikes, 0);
    for i in 0..4 {
        report_now(&mut h, &format!("b{i}"), outcome(UpstreamError), 5);
    }
    assert!(h.is_active());
    let t = report_now(&mut h, "b4", outcome(UpstreamError), 5).expect("opens");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Active, StateKind::Cooling, Reason::UpstreamError)
    );
    assert_eq!(held_for(&h, 5), Some(secs(30)));
    assert_eq!(h.record().strikes, 0, "an opening resets the count");
    // A timeout classifies as upstream_error and counts the same way.
    let timeout = raw(None, Some(TransportError::Timeout), None)
        .validate()
        .unwrap();
    let mut h = Health::default();
    for i in 0..5 {
        report_now(&mut h, &format!("t{i}"), timeout, 0);
    }
    assert_eq!(h.kind(), StateKind::Cooling);
}

#[test]
fn the_breaker_reopens_30_s_times_n_at_most_5_min_and_a_probe_success_closes_it() {
    let mut h = Health::default();
    for i in 0..5 {
        report_now(&mut h, &format!("s{i}"), outcome(UpstreamError), 0);
    }
    let mut now = 0;
    let mut seen = vec![held_for(&h, now).unwrap().as_secs()];
    for i in 0..11 {
        now += held_for(&h, now).unwrap().as_secs();
        probe(&mut h, now);
        report_now(&mut h, &format!("p{i}"), outcome(UpstreamError), now);
        seen.push(held_for(&h, now).unwrap().as_secs());
    }
    assert_eq!(
        seen,
        [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
    );
    now += 300;
    probe(&mut h, now);
    let t = report_now(&mut h, "p", outcome(Fine), now).expect("closes");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Probing, StateKind::Active, Reason::Ok)
    );
}

#[test]
fn reports_of_serves_already_out_when_a_key_cooled_escalate_nothing() {
    // Ten serves out at once all come back 429: one cooldown, not a climb up the ladder.
    let mut h = Health::default();
    for i in 0..10 {
        let first = report(&mut h, &format!("s{i}"), 0, outcome(RateLimited), 1 + i);
        assert_eq!(first.is_some(), i == 0);
    }
    assert_eq!(held_for(&h, 1), Some(secs(30)));
    probe(&mut h, 31);
    report_now(&mut h, "p", outcome(Fine), 31);
    // A late 429 or 5xx of a serve made before the recovery does not count either.
    assert_eq!(report(&mut h, "late", 0, outcome(RateLimited), 40), None);
    assert_eq!(report(&mut h, "late5", 0, outcome(UpstreamError), 40), None);
    assert!(h.is_active());
    assert_eq!(h.record().strikes, 0);
}

#[test]
fn a_probing_key_lets_one_serve_through_and_frees_a_silent_probe_after_60_s() {
    let mut h = cooling();
    let (admission, t) = h.admit(at(30));
    assert_eq!(admission, Admission::Probe);
    assert_eq!(
        t.map(|t| (t.from, t.to)),
        Some((StateKind::Cooling, StateKind::Probing))
    );
    assert!(!h.is_active());
    assert_eq!(
        h.admit(at(31)),
        (
            Admission::Skip {
                wait: Some(secs(59))
            },
            None
        )
    );
    assert_eq!(
        h.admission(at(89)),
        Admission::Skip {
            wait: Some(secs(1))
        }
    );
    // The silent probe's slot is free after 60 s; the next serve is the probe, no transition.
    assert_eq!(h.admit(at(90)), (Admission::Probe, None));
    assert_eq!(
        h.admission(at(91)),
        Admission::Skip {
            wait: Some(secs(59))
        }
    );
    // The abandoned probe's late failure no longer decides; the new probe's ok does.
    assert_eq!(report(&mut h, "p1", 30, outcome(RateLimited), 95), None);
    assert_eq!(h.kind(), StateKind::Probing);
    let t = report(&mut h, "p2", 90, outcome(Fine), 96).expect("closes");
    assert_eq!((t.from, t.to), (StateKind::Probing, StateKind::Active));
    assert_eq!(h.admission(at(96)), Admission::Serve);
}

#[test]
fn a_probe_that_reports_no_verdict_frees_its_slot() {
    for class in [ClientError, Network] {
        let mut h = cooling();
        probe(&mut h, 30);
        assert_eq!(report_now(&mut h, "p", outcome(class), 30), None);
        assert_eq!(h.admission(at(31)), Admission::Probe, "{class:?}");
    }
}

#[test]
fn a_probe_failure_cools_at_the_next_step_of_its_class() {
    // Held for 5xx, the probe is rate limited: the rate ladder's first step.
    let mut h = Health::default();
    for i in 0..5 {
        report_now(&mut h, &format!("s{i}"), outcome(UpstreamError), 0);
    }
    probe(&mut h, 30);
    report_now(&mut h, "p", outcome(RateLimited), 30);
    assert_eq!(held_for(&h, 30), Some(secs(30)));
    assert_eq!(h.record().reason, Some(Reason::RateLimited));
    // Held for a rate limit, the probe's 5xx reopens the breaker at once (no five strikes).
    let mut h = cooling();
    probe(&mut h, 30);
    let t = report_now(&mut h, "p", outcome(UpstreamError), 30).expect("reopens");
    assert_eq!(
        (t.to, t.reason),
        (StateKind::Cooling, Reason::UpstreamError)
    );
    assert_eq!(held_for(&h, 30), Some(secs(30)));
}

#[test]
fn a_disabled_key_is_never_undone_by_time_or_reports() {
    let mut h = cooling();
    let t = h.set_enabled(false, at(1)).expect("disables");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Cooling, StateKind::Disabled, Reason::Operator)
    );
    for class in OutcomeClass::ALL {
        assert_eq!(
            report_now(&mut h, "s", outcome(class), 2),
            None,
            "{class:?}"
        );
    }
    for later in [2, 31, 10 * 365 * 24 * HOUR] {
        assert_eq!(h.admit(at(later)), (Admission::Skip { wait: None }, None));
    }
    assert_eq!(h.set_enabled(false, at(3)), None);
    let t = h.set_enabled(true, at(4)).expect("enables");
    assert_eq!((t.from, t.to), (StateKind::Disabled, StateKind::Active));
    assert!(h.is_active());
}

#[test]
fn enabling_clears_every_automatic_state_and_counter() {
    let mut h = Health::default();
    report(&mut h, "s1", 0, outcome(AuthInvalid), 0);
    report(&mut h, "s2", 0, outcome(AuthInvalid), 0);
    let t = h.set_enabled(true, at(5)).expect("lifts the quarantine");
    assert_eq!(
        (t.from, t.to, t.reason),
        (StateKind::Quarantined, StateKind::Active, Reason::Operator)
    );
    // The auth memory is gone: one 401 only cools.
    report(&mut h, "s3", 5, outcome(AuthInvalid), 6);
    assert_eq!(h.kind(), StateKind::Cooling);
    // Strikes on an active key are cleared without a transition.
    let mut h = Health::default();
    for i in 0..4 {
        report_now(&mut h, &format!("s{i}"), outcome(UpstreamError), 0);
    }
    assert_eq!(h.set_enabled(true, at(1)), None);
    assert_eq!(h.record().strikes, 0);
    // And the ladders start over.
    let mut h = Health::default();
    report_now(&mut h, "a", outcome(RateLimited), 0);
    h.set_enabled(true, at(1));
    report_now(&mut h, "b", outcome(RateLimited), 2);
    assert_eq!(held_for(&h, 2), Some(secs(30)));
}

#[test]
fn jitter_stays_within_20_percent_and_under_the_caps() {
    assert_eq!(Jitter::new(0.5), Jitter::new(0.2));
    assert_eq!(Jitter::new(-3.0), Jitter::new(-0.2));
    assert_eq!(Jitter::new(f64::NAN), Jitter::NONE);
    for _ in 0..1000 {
        let j = Jitter::random();
        assert!((-MAX_JITTER..=MAX_JITTER).contains(&j.0), "{j:?}");
    }
    let with = |j: f64| ReportContext {
        jitter: Jitter::new(j),
        ..ctx()
    };
    let auth = |j: f64| {
        let mut h = Health::default();
        report_in(&mut h, "s", 0, outcome(AuthInvalid), 0, &with(j));
        held_for(&h, 0)
    };
    assert_eq!(auth(0.2), Some(secs(72)));
    assert_eq!(auth(-0.2), Some(secs(48)));
    let quota = |j: f64| {
        let mut h = Health::default();
        report_in(&mut h, "s", 0, outcome(QuotaExhausted), 0, &with(j));
        held_for(&h, 0)
    };
    assert_eq!(quota(-0.2), Some(secs(24 * HOUR * 8 / 10)));
    assert_eq!(quota(0.2), Some(secs(24 * HOUR * 12 / 10)));
    let first_rate = |j: f64| {
        let mut h = Health::default();
        report_in(&mut h, "s", 0, outcome(RateLimited), 0, &with(j));
        held_for(&h, 0)
    };
    assert_eq!(first_rate(0.2), Some(secs(36)));
    assert_eq!(first_rate(-0.2), Some(secs(24)));
    // The top of each ladder stays under its cap however the jitter falls.
    let mut h = Health::default();
    let mut now = 0;
    report_in(&mut h, "s", 0, outcome(RateLimited), 0, &with(0.2));
    for i in 0..4 {
        now += held_for(&h, now).unwrap().as_secs();
        probe(&mut h, now);
        report_in(
            &mut h,
            &format!("p{i}"),
            now,
            outcome(RateLimited),
            now,
            &with(0.2),
        );
    }
    assert_eq!(held_for(&h, now), Some(secs(HOUR)));
    let mut h = Health::default();
    for i in 0..5 {
        report_in(
            &mut h,
            &format!("s{i}"),
            0,
            outcome(UpstreamError),
            0,
            &with(0.2),
        );
    }
    for i in 0..10 {
        now = 1000 * (i + 1);
        probe(&mut h, now);
        report_in(
            &mut h,
            &format!("p{i}"),
            now,
            outcome(UpstreamError),
            now,
            &with(0.2),
        );
        assert!(held_for(&h, now).unwrap() <= secs(300));
    }
    assert_eq!(held_for(&h, now), Some(secs(300)));
}

#[test]
fn health_rebuilt_from_stored_wall_times_keeps_the_time_that_remains() {
    let mut h = cooling();
    let stored = h.record();
    assert_eq!(
        stored,
        HealthRecord {
            state: StateKind::Cooling,
            reason: Some(Reason::RateLimited),
            until: Some(at(30).wall),
            last_status: None,
            strikes: 0,
            changed_at: Some(at(0).wall),
            memory: HealthMemory {
                rate_step: 1,
                rate_rested_from: Some(at(30).wall),
                ..HealthMemory::default()
            },
        }
    );
    // A restart at 10 s: 20 s to go, on the new process's monotonic clock.
    let restarted = Health::restore(&stored, at(10));
    assert_eq!(restarted.record(), stored);
    assert_eq!(
        restarted.admission(at(10)),
        Admission::Skip {
            wait: Some(secs(20))
        }
    );
    // A restart after the deadline: due now.
    assert_eq!(
        Health::restore(&stored, at(500)).admission(at(500)),
        Admission::Probe
    );
    // A timed state stored without a deadline is due now; a stored probe no longer holds its slot.
    for state in [
        StateKind::Cooling,
        StateKind::Exhausted,
        StateKind::Quarantined,
        StateKind::Probing,
    ] {
        let record = HealthRecord {
            state,
            until: None,
            ..stored.clone()
        };
        assert_eq!(
            Health::restore(&record, at(0)).admission(at(0)),
            Admission::Probe,
            "{state:?}"
        );
    }
    let disabled = HealthRecord {
        state: StateKind::Disabled,
        ..stored.clone()
    };
    assert_eq!(
        Health::restore(&disabled, at(0)).admission(at(HOUR)),
        Admission::Skip { wait: None }
    );
    // Strikes and the last status survive; a probe after the restart closes as usual.
    h = Health::default();
    let mut o = outcome(UpstreamError);
    o.status = Some(503);
    for i in 0..3 {
        report_now(&mut h, &format!("s{i}"), o, 0);
    }
    let back = Health::restore(&h.record(), at(5));
    assert_eq!(
        (back.record().strikes, back.record().last_status),
        (3, Some(503))
    );
    let mut q = Health::restore(
        &HealthRecord {
            state: StateKind::Quarantined,
            until: Some(at(100).wall),
            ..stored
        },
        at(0),
    );
    probe(&mut q, 100);
    report_now(&mut q, "p", outcome(Fine), 100);
    assert!(q.is_active());
}

// Issue 9 remainder, item 2: what the state machine remembers (ladder steps with their decay
// origin, the first auth_invalid) survives being stored and restored.
#[test]
fn ladder_steps_and_a_first_auth_strike_survive_a_restart() {
    // A first 429 at 0 cools 30 s; restored at 40, the probe's 429 is the second step.
    let mut back = Health::restore(&cooling().record(), at(40));
    probe(&mut back, 40);
    report_now(&mut back, "s1", outcome(RateLimited), 40);
    assert_eq!(held_for(&back, 40), Some(secs(2 * MIN)));
    // Decay counts from the stored end of that cooldown (160): two quiet hours later, the
    // step is back to none, so the next 429 is a first again.
    let later = 160 + 2 * HOUR + 10;
    let mut rested = Health::restore(&back.record(), at(later));
    probe(&mut rested, later);
    report_now(&mut rested, "s2", outcome(RateLimited), later);
    assert_eq!(held_for(&rested, later), Some(secs(30)));
    // A first 401 at 0, restored at 30: a 401 from another serve quarantines.
    let mut h = Health::default();
    report_now(&mut h, "a", outcome(AuthInvalid), 0);
    let stored = h.record();
    assert_eq!(
        stored.memory.auth_strike,
        Some(("a".to_string(), at(0).wall))
    );
    let mut back = Health::restore(&stored, at(30));
    assert_eq!(
        report(&mut back, "a", 0, outcome(AuthInvalid), 30),
        None,
        "the same serve again"
    );
    report(&mut back, "b", 0, outcome(AuthInvalid), 30);
    assert_eq!(back.kind(), StateKind::Quarantined);
    // Restored past the 10 minutes, a second 401 only cools.
    let mut late = Health::restore(&stored, at(11 * MIN));
    report_now(&mut late, "b", outcome(AuthInvalid), 11 * MIN);
    assert_eq!(late.kind(), StateKind::Cooling);
}

// ---- host-level throttling and the at-most-half guard ----

const FLOOR: Duration = super::THROTTLE_MIN_COOLDOWN;

fn observe(
    tier: &mut TierHealth,
    key: &str,
    o: Outcome,
    served_keys: usize,
    now: u64,
) -> TierVerdict {
    tier.observe(
        &Arc::from(key),
        at(now).wall,
        &o,
        served_keys,
        at(now),
        FLOOR,
    )
}

fn throttled(v: &TierVerdict) -> Option<(Vec<&str>, Duration)> {
    v.throttled.as_ref().map(|t| {
        (
            t.keys.iter().map(|k| &**k).collect(),
            t.until.mono.saturating_duration_since(*ORIGIN),
        )
    })
}

#[test]
fn three_keys_failing_within_60_s_cool_the_tier_two_do_not() {
    let mut tier = TierHealth::default();
    let a = observe(&mut tier, "a", outcome(RateLimited), 3, 0);
    let b = observe(&mut tier, "b", outcome(UpstreamError), 3, 10);
    assert!(a.apply_to_key && b.apply_to_key && a.throttled.is_none() && b.throttled.is_none());
    assert_eq!(
        observe(&mut tier, "b", outcome(RateLimited), 3, 11).throttled,
        None,
        "still two keys"
    );
    let c = observe(&mut tier, "c", outcome(RateLimited), 3, 20);
    assert!(!c.apply_to_key);
    assert_eq!(
        throttled(&c),
        Some((vec!["a", "b", "c"], secs(50))),
        "30 s from 20 s"
    );
    assert_eq!(tier.wait(at(20)), Some(secs(30)));
    assert_eq!(tier.wait(at(50)), None);
}

#[test]
fn an_ok_between_failures_resets_the_window() {
    let mut tier = TierHealth::default();
    observe(&mut tier, "a", outcome(RateLimited), 3, 0);
    observe(&mut tier, "b", outcome(RateLimited), 3, 1);
    assert!(observe(&mut tier, "x", outcome(Fine), 3, 2).apply_to_key);
    assert_eq!(
        observe(&mut tier, "c", outcome(RateLimited), 3, 3).throttled,
        None
    );
    // Other classes neither count nor reset.
    for class in [ClientError, Network, AuthInvalid, QuotaExhausted] {
        assert!(observe(&mut tier, "d", outcome(class), 3, 4).apply_to_key);
    }
    observe(&mut tier, "a", outcome(RateLimited), 3, 5);
    assert!(observe(&mut tier, "b", outcome(RateLimited), 3, 6)
        .throttled
        .is_some());
}

#[test]
fn failures_older_than_60_s_fall_out_of_the_window() {
    // Failures at 0 s and 30 s, the third at `third`: whether the tier is throttled.
    let third_at = |third| {
        let mut tier = TierHealth::default();
        observe(&mut tier, "a", outcome(RateLimited), 3, 0);
        observe(&mut tier, "b", outcome(RateLimited), 3, 30);
        observe(&mut tier, "c", outcome(RateLimited), 3, third)
            .throttled
            .is_some()
    };
    assert!(!third_at(60));
    assert!(third_at(59));
}

#[test]
fn at_least_half_of_the_keys_served_must_fail() {
    let burst = |served_keys: usize| {
        let mut tier = TierHealth::default();
        observe(&mut tier, "a", outcome(RateLimited), served_keys, 0);
        observe(&mut tier, "b", outcome(RateLimited), served_keys, 0);
        observe(&mut tier, "c", outcome(RateLimited), served_keys, 0)
            .throttled
            .is_some()
    };
    assert!(burst(6));
    assert!(!burst(7), "3 of 7 is a few bad keys, not the host");
    assert!(burst(0), "a count below the failing keys is raised to them");
}

#[test]
fn the_tier_cools_for_the_largest_retry_after_at_least_30_s() {
    let cool = |asks: [Option<u64>; 3]| {
        let mut tier = TierHealth::default();
        let mut last = None;
        for (key, ask) in ["a", "b", "c"].into_iter().zip(asks) {
            let o = ask.map_or(outcome(RateLimited), retry_after);
            last = throttled(&observe(&mut tier, key, o, 3, 0)).map(|(_, until)| until);
        }
        last
    };
    assert_eq!(cool([Some(10), Some(120), None]), Some(secs(120)));
    assert_eq!(cool([Some(5), None, Some(10)]), Some(secs(30)));
    assert_eq!(cool([None, None, None]), Some(secs(30)));
    assert_eq!(cool([Some(86_400), None, None]), Some(secs(HOUR)));
}

// Issue 9 remainder, item 3: tests may lower the floor; the largest retry_after still wins.
#[test]
fn a_lowered_floor_shortens_only_the_floor() {
    let cool = |floor: Duration, ask: Option<u64>| {
        let mut tier = TierHealth::default();
        let mut last = None;
        for key in ["a", "b", "c"] {
            let o = ask.map_or(outcome(RateLimited), retry_after);
            let v = tier.observe(&Arc::from(key), at(0).wall, &o, 3, at(0), floor);
            last = throttled(&v).map(|(_, until)| until);
        }
        last
    };
    assert_eq!(cool(secs(2), None), Some(secs(2)));
    assert_eq!(cool(secs(2), Some(1)), Some(secs(2)));
    assert_eq!(cool(secs(2), Some(10)), Some(secs(10)));
    assert_eq!(
        cool(secs(2 * HOUR), None),
        Some(secs(HOUR)),
        "never past the 1 h cap"
    );
}

#[test]
fn reports_of_serves_made_before_the_tier_cooled_touch_no_key() {
    let mut tier = TierHealth::default();
    for key in ["a", "b", "c"] {
        observe(&mut tier, key, outcome(RateLimited), 3, 0);
    }
    let late = tier.observe(
        &Arc::from("d"),
        at(0).wall,
        &outcome(RateLimited),
        3,
        at(40),
        FLOOR,
    );
    assert_eq!(
        late,
        TierVerdict {
            apply_to_key: false,
            throttled: None
        }
    );
    // After the cooldown, serves made since count afresh.
    let fresh = observe(&mut tier, "a", outcome(RateLimited), 3, 40);
    assert!(fresh.apply_to_key && fresh.throttled.is_none());
}

/// Keys of one tier and its detector, wired as the pool will: the tier sees a report first,
/// the key only if the tier lets it, and a throttled tier pardons the burst's keys.
struct Tier {
    detector: TierHealth,
    keys: Vec<(&'static str, Health)>,
}

impl Tier {
    fn new(ids: &[&'static str]) -> Tier {
        Tier {
            detector: TierHealth::default(),
            keys: ids.iter().map(|id| (*id, Health::default())).collect(),
        }
    }

    fn report(&mut self, key: &str, o: Outcome, now: u64) {
        let load = TierLoad {
            keys: self.keys.len(),
            held: self
                .keys
                .iter()
                .filter(|(_, h)| h.held_for_rate_or_5xx())
                .count(),
        };
        let verdict = self.detector.observe(
            &Arc::from(key),
            at(now).wall,
            &o,
            self.keys.len(),
            at(now),
            FLOOR,
        );
        let serve = format!("{key}-{now}");
        if verdict.apply_to_key {
            let context = ReportContext {
                tier: load,
                ..ctx()
            };
            report_in(self.health(key), &serve, now, o, now, &context);
        }
        if let Some(throttle) = verdict.throttled {
            for id in &throttle.keys {
                self.health(id).pardon(throttle.since, at(now));
            }
        }
    }

    fn health(&mut self, key: &str) -> &mut Health {
        &mut self.keys.iter_mut().find(|(id, _)| *id == key).unwrap().1
    }
}

#[test]
fn a_burst_across_the_tier_cools_the_tier_and_penalises_no_key() {
    let mut tier = Tier::new(&["a", "b", "c", "d", "e", "f"]);
    tier.report("a", outcome(RateLimited), 0);
    tier.report("b", outcome(UpstreamError), 1);
    assert_eq!(
        tier.health("a").kind(),
        StateKind::Cooling,
        "alone, a key's own 429 cools it"
    );
    assert_eq!(tier.health("b").record().strikes, 1);
    tier.report("c", outcome(RateLimited), 2);
    assert_eq!(tier.detector.wait(at(2)), Some(secs(30)));
    for (id, h) in &tier.keys {
        assert!(h.is_active(), "{id}: {h:?}");
        assert_eq!(h.record().strikes, 0, "{id}");
    }
    // The burst's stragglers (served before the tier cooled) touch no key either.
    let straggler = ServeRef {
        id: "late",
        at: at(1).wall,
    };
    let verdict = tier.detector.observe(
        &Arc::from("d"),
        straggler.at,
        &outcome(RateLimited),
        6,
        at(10),
        FLOOR,
    );
    assert!(!verdict.apply_to_key);
    // And the ladders were not climbed: a later 429 on its own is a first.
    tier.report("a", outcome(RateLimited), 100);
    assert_eq!(held_for(tier.health("a"), 100), Some(secs(30)));
}

#[test]
fn a_pardon_never_undoes_effects_from_before_the_burst_or_verdicts_on_the_key() {
    let mut h = Health::default();
    report_now(&mut h, "old", outcome(RateLimited), 0);
    assert_eq!(
        h.pardon(at(10).mono, at(20)),
        None,
        "cooled before the burst began"
    );
    assert_eq!(h.kind(), StateKind::Cooling);
    let mut h = Health::default();
    report_now(&mut h, "r", outcome(RateLimited), 0);
    report(&mut h, "auth", 0, outcome(AuthInvalid), 1);
    assert_eq!(
        h.pardon(at(0).mono, at(2)),
        None,
        "a 401 since is the key's own"
    );
    assert_eq!(h.record().reason, Some(Reason::AuthInvalid));
    let mut h = Health::default();
    report_now(&mut h, "r", outcome(RateLimited), 0);
    let t = h.pardon(at(0).mono, at(2)).expect("undone");
    assert_eq!(
        (t.from, t.to, t.reason),
        (
            StateKind::Cooling,
            StateKind::Active,
            Reason::HostThrottling
        )
    );
}

#[test]
fn no_more_than_half_of_a_tier_cools_for_rate_or_5xx_at_once() {
    let full = ReportContext {
        tier: TierLoad { keys: 4, held: 2 },
        ..ctx()
    };
    let mut h = Health::default();
    assert_eq!(
        report_in(&mut h, "s", 0, outcome(RateLimited), 0, &full),
        None
    );
    assert!(h.is_active());
    // Nothing climbed: with room again, the first step.
    report_now(&mut h, "s2", outcome(RateLimited), 1);
    assert_eq!(held_for(&h, 1), Some(secs(30)));
    // The fifth 5xx cannot open while the tier is full; the strike stays, the next one opens.
    let mut h = Health::default();
    for i in 0..5 {
        report_in(
            &mut h,
            &format!("s{i}"),
            0,
            outcome(UpstreamError),
            0,
            &full,
        );
    }
    assert!(h.is_active());
    assert_eq!(h.record().strikes, 5);
    report_now(&mut h, "s5", outcome(UpstreamError), 1);
    assert_eq!(h.kind(), StateKind::Cooling);
    // A key already held counts itself: its probe failure re-cools even in a full tier.
    let mut h = cooling();
    probe(&mut h, 30);
    assert!(report_in(&mut h, "p", 30, outcome(RateLimited), 30, &full).is_some());
    // Verdicts on the key are not rate/5xx cooldowns: the guard does not apply to them.
    let mut h = Health::default();
    report_in(&mut h, "a", 0, outcome(AuthInvalid), 0, &full);
    assert_eq!(h.kind(), StateKind::Cooling);
    // A one-key tier may still cool its key.
    let alone = ReportContext {
        tier: TierLoad { keys: 1, held: 0 },
        ..ctx()
    };
    let mut h = Health::default();
    report_in(&mut h, "s", 0, outcome(RateLimited), 0, &alone);
    assert_eq!(h.kind(), StateKind::Cooling);
}

#[test]
fn the_guard_holds_across_a_tier_of_four() {
    let mut tier = Tier::new(&["a", "b", "c", "d"]);
    // Spread out so the detector never sees three keys within 60 s.
    tier.report("a", outcome(RateLimited), 0);
    tier.report("b", outcome(RateLimited), 100);
    tier.report("c", outcome(RateLimited), 200);
    let held: Vec<_> = tier
        .keys
        .iter()
        .map(|(id, h)| (*id, h.held_for_rate_or_5xx()))
        .collect();
    // a cooled 30 s and came back due (still counted until probed); b and a fill the half.
    assert_eq!(held, [("a", true), ("b", true), ("c", false), ("d", false)]);
}
