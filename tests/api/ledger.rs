//! The group commit's batching policy, driven through the public `Ledger` on a real SQLite file.

use std::time::{Duration, Instant};

use keypooler::ledger::{HealthJob, JobOutcome, Ledger};
use keypooler::metrics::Metrics;
use keypooler::model::{FeatureLimit, KeyRecord, OutcomeWrite, TierRecord};
use keypooler::pool::{Caller, Draw, Now, Pool};

/// Group commits that landed, as `/metrics` counts them.
fn committed(metrics: &Metrics) -> u64 {
    let text = metrics.render();
    text.lines()
        .find(|l| l.starts_with("keypooler_commits_total{outcome=\"committed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

/// The commit count once it reached `at_least` (or 2 s passed) and settled: a commit's meter
/// is recorded just after its acks are sent.
async fn commits_after(metrics: &Metrics, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    while committed(metrics) < at_least && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    committed(metrics)
}

fn outcome_job(serve_id: &str, detached: bool) -> HealthJob {
    HealthJob {
        outcome: Some(OutcomeWrite {
            serve_id: serve_id.into(),
            class: "ok",
            status: Some(200),
            reported_at: chrono::Utc::now(),
        }),
        health: Vec::new(),
        tiers: Vec::new(),
        detached,
    }
}

// Issue 13 item 6: the proxy's own outcome records (nobody awaits them, no health change)
// wait for the next commit of serves instead of taking a commit of their own, so the next
// callers' serves do not queue behind one; with no serve coming they still land by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_outcome_rides_the_next_commit_of_serves_or_lands_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let config = keypooler::config::Config::from_vars(vec![
        ("ADMIN_TOKEN".to_string(), "a".repeat(32)),
        (
            "DB_PATH".to_string(),
            dir.path().join("pool.db").display().to_string(),
        ),
    ])
    .expect("config");
    let db = keypooler::store::Db::open(&config).await.expect("db");
    let tier = TierRecord {
        id: "tier-1".into(),
        name: "t".into(),
        description: String::new(),
        features: [(
            "scrape".to_string(),
            vec![FeatureLimit {
                rate_limit: 1000,
                window_seconds: 3600,
            }],
        )]
        .into(),
        source: None,
        upstream: None,
    };
    db.create_tier(&tier).await.expect("tier");
    let key = KeyRecord {
        id: "key-1".into(),
        name: "k".into(),
        sealed_value: "v".into(),
        tier_id: "tier-1".into(),
        is_active: true,
        expires_at: None,
        usage_limit: None,
        usage_count: 0,
        usage_window_seconds: None,
        usage_window_start: None,
        metadata_json: "{}".into(),
        created_at: None,
        secrets: Vec::new(),
    };
    db.create_key(&key).await.expect("key");
    let sealer = keypooler::crypto::Sealer::new(None);
    let pool = Pool::load(db.load_snapshot().await.expect("snapshot"), &sealer);
    let metrics = Metrics::new();
    let ledger = Ledger::start(db.clone(), metrics.ledger());
    let serve = || async {
        match pool.draw(&Caller::Admin, "scrape", Now::read(), |r, _| {
            ledger.submit(r)
        }) {
            Draw::Served(pending) => pending.committed().await.expect("committed").serve_id,
            _ => panic!("the key can always serve"),
        }
    };
    let first = serve().await;
    let second = serve().await;

    // Alone, a detached outcome still lands, within its deferral (50 ms) and a commit.
    let before = committed(&metrics);
    let alone = Instant::now();
    let landed = tokio::time::timeout(
        Duration::from_secs(5),
        ledger.submit_health(outcome_job(&first, true)),
    )
    .await;
    assert_eq!(landed, Ok(JobOutcome::Committed));
    assert!(
        alone.elapsed() >= Duration::from_millis(40),
        "it waited for serves first"
    );
    assert_eq!(commits_after(&metrics, before + 1).await, before + 1);

    // Followed by a serve, it rides that serve's commit: one commit for both. (A machine so
    // slow that the serve comes after the deferral ended proves nothing either way.)
    let before = committed(&metrics);
    let submitted = Instant::now();
    let outcome = ledger.submit_health(outcome_job(&second, true));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let gap = submitted.elapsed();
    serve().await;
    assert_eq!(outcome.await, JobOutcome::Committed);
    if gap < Duration::from_millis(30) {
        assert_eq!(
            commits_after(&metrics, before + 1).await,
            before + 1,
            "the outcome took a commit of its own"
        );
    } else {
        eprintln!("inconclusive: the serve came {gap:?} after the outcome");
    }

    // An outcome someone awaits (a caller's POST report) is committed at once.
    let before = committed(&metrics);
    let awaited = ledger.submit_health(outcome_job(&second, false));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(awaited.await, JobOutcome::Committed);
    assert_eq!(commits_after(&metrics, before + 1).await, before + 1);
    ledger.shutdown().await;

    let stored: Vec<(String, Option<String>)> = {
        let conn = rusqlite::Connection::open(dir.path().join("pool.db")).expect("open");
        let mut stmt = conn
            .prepare("SELECT id, outcome_class FROM usage_events ORDER BY rowid")
            .expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0], (first, Some("ok".into())));
    assert_eq!(stored[1], (second, Some("ok".into())));
}
