//! Prometheus metrics: one registry per built app (never a process-global recorder, so apps in
//! one process never mix), and handles registered once and cached where they are recorded.
//!
//! Hot path: a cached `Counter`/`Histogram` is an `Arc` of atomics, so recording is atomic
//! operations only — no lock, no map lookup. Registration (which locks the registry) happens
//! only when a handle is first needed: a feature appearing in a tier, a route answering a status
//! for the first time. Labels are bounded: route templates, status codes, features and tiers as
//! the operator configured them — never a key value, a token or a raw request path or query.

use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

pub const HTTP_REQUESTS: &str = "keypooler_http_requests_total";
pub const HTTP_DURATION: &str = "keypooler_http_request_duration_seconds";
pub const KEY_RESPONSES: &str = "keypooler_key_responses_total";
pub const COMMIT_BATCH_SIZE: &str = "keypooler_commit_batch_size";
pub const COMMIT_DURATION: &str = "keypooler_commit_duration_seconds";
pub const COMMITS: &str = "keypooler_commits_total";
pub const POOL_LOAD: &str = "keypooler_pool_load_seconds";
pub const OUTCOME_REPORTS: &str = "keypooler_outcome_reports_total";
pub const PROXY_UPSTREAM_DURATION: &str = "keypooler_proxy_upstream_duration_seconds";
pub const PROXY_DRAW_DURATION: &str = "keypooler_proxy_draw_duration_seconds";

/// Latency buckets (seconds): sub-millisecond serves up to the 30 s default write timeout.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Serves per group commit: powers of two up to `ledger::MAX_BATCH`.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How often histogram samples are folded into their buckets without a scrape, so memory stays
/// bounded when nobody scrapes.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The app's metrics registry; cheap to clone. `Metrics::disabled()` records nothing (for pure
/// logic tests that build a pool or a ledger on their own).
#[derive(Clone, Default)]
pub struct Metrics(Option<Arc<PrometheusRecorder>>);

/// `GET /key` outcomes of one feature (only features some tier lists get these).
pub struct FeatureMeters {
    pub served: Counter,
    pub exhausted: Counter,
    pub unavailable: Counter,
}

/// What the group-commit writer records.
#[derive(Clone)]
pub struct LedgerMeters {
    pub batch_size: Histogram,
    pub duration: Histogram,
    pub committed: Counter,
    pub failed: Counter,
    pub uncertain: Counter,
}

/// Outcome reports by class (`Metrics::outcome_reports`): atomic increments, no lock.
pub struct OutcomeMeters([Counter; 7]);

impl OutcomeMeters {
    pub fn record(&self, class: crate::pool::health::OutcomeClass) {
        if let Some(i) = crate::pool::health::OutcomeClass::ALL
            .iter()
            .position(|c| *c == class)
        {
            self.0[i].increment(1);
        }
    }
}

/// One (route template, status) series of the HTTP metrics.
pub struct HttpSeries {
    pub requests: Counter,
    pub duration: Histogram,
}

impl Metrics {
    /// A fresh registry whose histograms render as Prometheus histograms (fixed buckets).
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(COMMIT_BATCH_SIZE.into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are non-empty constants");
        let recorder = builder.build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            recorder.describe_counter(name.into(), unit, SharedString::const_str(text));
        };
        describe(
            HTTP_REQUESTS,
            None,
            "HTTP requests by route template and status",
        );
        describe(
            HTTP_DURATION,
            Some(Unit::Seconds),
            "HTTP request latency by route template and status, until the response head is ready",
        );
        describe(
            KEY_RESPONSES,
            None,
            "GET /key answers by feature: 200 served, 429 nothing could serve, 503 usage not recorded",
        );
        describe(
            COMMIT_BATCH_SIZE,
            Some(Unit::Count),
            "Serves written per group commit (re-sent uncertain ones included)",
        );
        describe(
            COMMIT_DURATION,
            Some(Unit::Seconds),
            "Time one group commit took in the database",
        );
        describe(
            COMMITS,
            None,
            "Group commits by outcome: committed, failed (given back) or uncertain (re-sent)",
        );
        describe(
            OUTCOME_REPORTS,
            None,
            "Outcome reports recorded (answered 200, repeats excluded) by class",
        );
        describe(
            PROXY_UPSTREAM_DURATION,
            Some(Unit::Seconds),
            "Proxy mode: time from sending a request upstream to its response head (or failure), \
             by tier and upstream status (timeout, connect or error when none came)",
        );
        describe(
            PROXY_DRAW_DURATION,
            Some(Unit::Seconds),
            "Proxy mode: time one attempt waited for its key — the draw and its serve's group \
             commit, as GET /key — by tier",
        );
        describe(
            POOL_LOAD,
            Some(Unit::Seconds),
            "How long loading the pool from the database took at startup",
        );
        Metrics(Some(Arc::new(recorder)))
    }

    /// Records nothing; every handle it gives is a no-op.
    pub fn disabled() -> Metrics {
        Metrics(None)
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        match &self.0 {
            Some(r) => r.register_counter(&Key::from_parts(name, labels), &METADATA),
            None => Counter::noop(),
        }
    }

    fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        match &self.0 {
            Some(r) => r.register_histogram(&Key::from_parts(name, labels), &METADATA),
            None => Histogram::noop(),
        }
    }

    fn gauge(&self, name: &'static str) -> Gauge {
        match &self.0 {
            Some(r) => r.register_gauge(&Key::from_name(name), &METADATA),
            None => Gauge::noop(),
        }
    }

    /// The handles of one feature; call when a tier starts listing it (the registry returns the
    /// same series for the same feature, so counts survive the feature leaving and returning).
    pub fn feature(&self, feature: &str) -> FeatureMeters {
        let by_status = |status: &'static str| {
            self.counter(
                KEY_RESPONSES,
                vec![
                    Label::new("feature", feature.to_string()),
                    Label::from_static_parts("status", status),
                ],
            )
        };
        FeatureMeters {
            served: by_status("200"),
            exhausted: by_status("429"),
            unavailable: by_status("503"),
        }
    }

    pub fn ledger(&self) -> LedgerMeters {
        let commits = |outcome: &'static str| {
            self.counter(COMMITS, vec![Label::from_static_parts("outcome", outcome)])
        };
        LedgerMeters {
            batch_size: self.histogram(COMMIT_BATCH_SIZE, Vec::new()),
            duration: self.histogram(COMMIT_DURATION, Vec::new()),
            committed: commits("committed"),
            failed: commits("failed"),
            uncertain: commits("uncertain"),
        }
    }

    /// The series of `route` (a template, or a fixed word such as "unmatched") and `status`.
    pub fn http(&self, route: &str, status: u16) -> HttpSeries {
        let labels = || {
            vec![
                Label::new("route", route.to_string()),
                Label::new("status", status.to_string()),
            ]
        };
        HttpSeries {
            requests: self.counter(HTTP_REQUESTS, labels()),
            duration: self.histogram(HTTP_DURATION, labels()),
        }
    }

    /// One counter per outcome class, indexed as `OutcomeClass::ALL`, registered once.
    pub fn outcome_reports(&self) -> OutcomeMeters {
        OutcomeMeters(crate::pool::health::OutcomeClass::ALL.map(|class| {
            self.counter(
                OUTCOME_REPORTS,
                vec![Label::from_static_parts("class", class.as_str())],
            )
        }))
    }

    /// Records one proxied attempt's upstream latency (SPEC §8.1, §8.6). Registers on each call
    /// (the proxy's path, not `/key`'s); labels are the tier's name and a status code or word.
    pub fn proxy_upstream(&self, tier: &str, status: &str, took: Duration) {
        self.histogram(
            PROXY_UPSTREAM_DURATION,
            vec![
                Label::new("tier", tier.to_string()),
                Label::new("status", status.to_string()),
            ],
        )
        .record(took.as_secs_f64());
    }

    /// Records how long one proxied attempt waited for its durable serve (issue 13 item 6:
    /// with `proxy_upstream`, it splits what the proxy adds to an upstream's latency).
    pub fn proxy_draw(&self, tier: &str, took: Duration) {
        self.histogram(
            PROXY_DRAW_DURATION,
            vec![Label::new("tier", tier.to_string())],
        )
        .record(took.as_secs_f64());
    }

    pub fn set_pool_load_time(&self, took: Duration) {
        self.gauge(POOL_LOAD).set(took.as_secs_f64());
    }

    /// Everything recorded, in the Prometheus text format (empty when disabled).
    pub fn render(&self) -> String {
        self.0
            .as_ref()
            .map(|r| r.handle().render())
            .unwrap_or_default()
    }

    /// Folds histogram samples into buckets every `UPKEEP_EVERY` while this registry lives
    /// (the task holds it weakly and ends once the app is gone). Needs a Tokio runtime.
    pub fn spawn_upkeep(&self) {
        let Some(recorder) = &self.0 else { return };
        let registry: Weak<PrometheusRecorder> = Arc::downgrade(recorder);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                match registry.upgrade() {
                    Some(recorder) => recorder.handle().run_upkeep(),
                    None => break,
                }
            }
        });
    }
}

/// Appends one gauge family computed at scrape time (`rows`: label pairs and value).
pub fn write_gauge(
    out: &mut String,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, f64)>,
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in rows {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{label}=\"{}\"", escape_label_value(value));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
    }
    out.push('\n');
}

/// The text format's escaping of a label value: backslash, double quote and line feed.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets_and_apps_do_not_mix() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.http("/key", 200).duration.record(0.002);
        a.http("/key", 200).requests.increment(1);
        a.ledger().batch_size.record(3.0);
        let text = a.render();
        assert!(
            text.contains(
                "keypooler_http_request_duration_seconds_bucket{route=\"/key\",status=\"200\",le=\"0.0025\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("keypooler_commit_batch_size_bucket{le=\"4\"} 1"),
            "{text}"
        );
        assert!(!text.contains("quantile"), "{text}");
        assert!(!b.render().contains("keypooler_http"), "{}", b.render());
    }

    #[test]
    fn scrape_time_gauges_escape_label_values() {
        let mut out = String::new();
        write_gauge(
            &mut out,
            "keypooler_keys",
            "Keys",
            [(vec![("tier", "a\"b\\c\nd".to_string())], 2.0)],
        );
        assert!(
            out.contains("keypooler_keys{tier=\"a\\\"b\\\\c\\nd\"} 2\n"),
            "{out}"
        );
        assert!(out.starts_with("# HELP keypooler_keys Keys\n# TYPE keypooler_keys gauge\n"));
    }

    #[test]
    fn disabled_metrics_record_nothing() {
        let m = Metrics::disabled();
        m.feature("scrape").served.increment(1);
        assert_eq!(m.render(), "");
    }
}
