//! Issue 14 item 5: SQLite's common group commit (`COMMIT_FAST`) binds its audit rows, budget
//! and window deltas as flat column arrays read by position; it writes the same rows and
//! counts, resets and refuses exactly as migration 012's per-row rules do (a wrong parameter
//! number or position would write the wrong column).

use chrono::TimeDelta;
use keypooler::model::UsageEvent;
use keypooler::store::{Batch, Db, StoreError, UsageDelta, WindowDelta};
use keypooler::timestamp::{to_db, Timestamp};
use serde_json::json;

use crate::helpers::*;

fn usage(key: &str, units: i64, at: Timestamp) -> UsageDelta {
    UsageDelta {
        key_id: key.into(),
        units,
        at,
        regbot_limit: None,
    }
}

fn window(key: &str, seconds: i64, at: Timestamp, units: i64, limit: i64) -> WindowDelta {
    WindowDelta {
        key_id: key.into(),
        feature: "scrape".into(),
        window_seconds: seconds,
        at,
        units,
        rate_limit: limit,
    }
}

fn event(id: &str, key: &str, at: Timestamp, cost: i64) -> UsageEvent {
    UsageEvent {
        id: id.into(),
        key_id: key.into(),
        consumer_id: "admin".into(),
        feature: "scrape".into(),
        created_at: at,
        outcome: None,
        cost,
    }
}

async fn commit(db: &Db, usage: &[UsageDelta], windows: &[WindowDelta]) -> Result<(), StoreError> {
    commit_with(db, &[], usage, windows).await
}

async fn commit_with(
    db: &Db,
    events: &[UsageEvent],
    usage: &[UsageDelta],
    windows: &[WindowDelta],
) -> Result<(), StoreError> {
    db.commit_batch(&Batch {
        events,
        usage,
        outcomes: &[],
        health: &[],
        tiers: &[],
        windows,
    })
    .await
}

/// A server with tier `t` (`scrape`, 1,000 a minute) and one unlimited key per name, and a
/// store of its own on the same database.
async fn keys_and_store(names: &[&str]) -> (TestApp, Vec<String>, Db) {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 1000, 60)]).await;
    let mut ids = Vec::new();
    for name in names {
        let key = format!("v{name}");
        ids.push(
            app.add_key(json!({ "name": name, "key": key, "tier": "t" }))
                .await,
        );
    }
    let config = keypooler::config::Config::from_vars(app.env.clone()).expect("config");
    let db = Db::open(&config).await.expect("db");
    (app, ids, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_commit_counts_resets_and_refuses_like_the_per_row_rules() {
    let app = spawn_app().await;
    app.create_tier("t", &[("scrape", 1000, 60)]).await;
    let a = app
        .add_key(json!({ "name": "a", "key": "va", "tier": "t", "usage_limit": 5 }))
        .await;
    let b = app
        .add_key(json!({ "name": "b", "key": "vb", "tier": "t" }))
        .await;
    let config = keypooler::config::Config::from_vars(app.env.clone()).expect("config");
    let db = Db::open(&config).await.expect("db");
    let t0 = chrono::Utc::now() - TimeDelta::seconds(300);

    commit_with(
        &db,
        &[event("e1", &a, t0, 2), event("e2", &b, t0, 3)],
        &[usage(&a, 2, t0), usage(&b, 3, t0)],
        &[window(&a, 60, t0, 2, 3), window(&b, 60, t0, 3, 3)],
    )
    .await
    .expect("both fit");
    for (refused_usage, refused_windows) in [
        (vec![], vec![window(&a, 60, t0, 2, 3)]),
        (vec![usage(&a, 4, t0)], vec![]),
    ] {
        match commit(&db, &refused_usage, &refused_windows).await {
            Err(StoreError::Refused(_)) => {}
            other => panic!("past a window's or a budget's limit: {other:?}"),
        }
    }
    // a's window ended (reset to the new start), a new 1 s window for b, a's budget to its limit.
    let later = t0 + TimeDelta::seconds(61);
    commit(
        &db,
        &[usage(&a, 3, later)],
        &[window(&a, 60, later, 2, 3), window(&b, 1, later, 1, 1)],
    )
    .await
    .expect("fits");
    // A key twice in one batch takes the per-row trigger path: the same counts follow.
    commit(&db, &[usage(&b, 1, later), usage(&b, 1, later)], &[])
        .await
        .expect("unlimited");

    let counts = app
        .rows("SELECT name, usage_count FROM keys ORDER BY name")
        .await;
    let want = |n: &str, c: &str| vec![Some(n.to_string()), Some(c.to_string())];
    assert_eq!(counts, [want("a", "5"), want("b", "5")]);
    let windows = app
        .rows_with(
            "SELECT count, CAST(window_start AS TEXT), rate_limit FROM window_counts \
             WHERE key_id IN (?, ?) ORDER BY key_id = ? DESC, window_seconds DESC",
            &[&a, &b, &a],
        )
        .await;
    let row = |c: i64, at: Timestamp, l: i64| {
        vec![Some(c.to_string()), Some(to_db(at)), Some(l.to_string())]
    };
    assert_eq!(
        windows,
        [row(2, later, 3), row(3, t0, 3), row(1, later, 1)],
        "a reset once; refused deltas not counted"
    );
    let events = app
        .rows("SELECT id, key_id, consumer_id, feature, CAST(created_at AS TEXT), cost FROM usage_events ORDER BY id")
        .await;
    let audit = |id: &str, key: &str, cost: &str| {
        [id, key, "admin", "scrape", &to_db(t0), cost]
            .map(|c| Some(c.to_string()))
            .to_vec()
    };
    assert_eq!(events, [audit("e1", &a, "2"), audit("e2", &b, "3")]);
    db.close().await;
}

/// SQLite's fast commit updates a window whose row it has written before by the row's rowid,
/// deciding the window's end on text: a delta 3 ms short of the window's length still counts
/// in it, one 2 ms short (the tolerance every other text allows) starts the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_window_row_counts_and_resets_at_the_same_boundary() {
    let (app, ids, db) = keys_and_store(&["a"]).await;
    let a = ids[0].clone();
    let t0 = chrono::Utc::now() - TimeDelta::seconds(300);
    let in_window = t0 + TimeDelta::milliseconds(60_000 - 3);
    let next = t0 + TimeDelta::milliseconds(60_000 - 2);
    let count = || async {
        app.rows_with(
            "SELECT count, CAST(window_start AS TEXT) FROM window_counts WHERE key_id = ?",
            &[&a],
        )
        .await
    };
    let row = |c: i64, at: Timestamp| vec![vec![Some(c.to_string()), Some(to_db(at))]];
    // The first commit writes the row (and learns its rowid); the next ones find it by rowid.
    for (at, start, units, want) in [
        (t0, t0, 2, 2),
        (in_window, t0, 1, 3),
        (next, next, 4, 4),
        (next, next, 1, 5),
    ] {
        commit(&db, &[], &[window(&a, 60, at, units, 5)])
            .await
            .expect("fits");
        assert_eq!(count().await, row(want, start), "after a delta at {at}");
    }
    match commit(&db, &[], &[window(&a, 60, next, 1, 5)]).await {
        Err(StoreError::Refused(_)) => {}
        other => panic!("a sixth unit in a window of 5: {other:?}"),
    }
    assert_eq!(
        count().await,
        row(5, next),
        "the refused delta is not counted"
    );
    db.close().await;
}

/// A window row is deleted with its key (a tier's forced delete). A rowid the fast commit knew
/// that another key's new row took since changes nothing there: that key's count stays, and
/// the late delta goes again through the upsert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_rowid_taken_by_another_keys_row_is_left_alone() {
    let (app, ids, db) = keys_and_store(&["a", "b"]).await;
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let t0 = chrono::Utc::now() - TimeDelta::seconds(30);
    commit(&db, &[], &[window(&a, 60, t0, 1, 100)])
        .await
        .expect("a's row");
    let rowid = |key: &str| {
        let key = key.to_string();
        let app = &app;
        async move {
            app.rows_with("SELECT rowid FROM window_counts WHERE key_id = ?", &[&key])
                .await
        }
    };
    let a_row = rowid(&a).await;
    // a's row goes as a forced tier delete would take it; b's new row takes the highest
    // rowid, which is a's old one.
    app.rows_with("DELETE FROM window_counts WHERE key_id = ?", &[&a])
        .await;
    commit(&db, &[], &[window(&b, 60, t0, 7, 100)])
        .await
        .expect("b's row");
    assert_eq!(rowid(&b).await, a_row, "b's row reuses a's rowid");
    commit(&db, &[], &[window(&a, 60, t0, 1, 100)])
        .await
        .expect("a late delta for a");
    let b_count = app
        .rows_with("SELECT count FROM window_counts WHERE key_id = ?", &[&b])
        .await;
    assert_eq!(
        b_count,
        [vec![Some("7".to_string())]],
        "b's count untouched"
    );
    let a_count = app
        .rows_with("SELECT count FROM window_counts WHERE key_id = ?", &[&a])
        .await;
    assert_eq!(
        a_count,
        [vec![Some("1".to_string())]],
        "a's delta upserted again"
    );
    db.close().await;
}

/// A VACUUM may renumber rowids: a known rowid that now names another window's row of the same
/// key changes nothing there, and the commit goes again through the upsert (migration 015).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renumbered_window_rows_are_found_again_and_nothing_is_miscounted() {
    let (app, ids, db) = keys_and_store(&["a"]).await;
    let a = ids[0].clone();
    let t0 = chrono::Utc::now() - TimeDelta::milliseconds(100);
    commit(
        &db,
        &[],
        &[window(&a, 1, t0, 1, 100), window(&a, 60, t0, 2, 100)],
    )
    .await
    .expect("both rows written");
    let counts = || async {
        app.rows_with(
            "SELECT window_seconds, count FROM window_counts WHERE key_id = ? \
             ORDER BY window_seconds",
            &[&a],
        )
        .await
    };
    let want = |one: i64, sixty: i64| {
        vec![
            vec![Some("1".to_string()), Some(one.to_string())],
            vec![Some("60".to_string()), Some(sixty.to_string())],
        ]
    };
    assert_eq!(counts().await, want(1, 2));
    // The two rows swap rowids, as a VACUUM renumbering them could.
    let rowids = app
        .rows_with(
            "SELECT CAST(rowid AS TEXT) FROM window_counts WHERE key_id = ? \
             ORDER BY window_seconds",
            &[&a],
        )
        .await;
    let [one, sixty] = [&rowids[0][0], &rowids[1][0]].map(|r| r.clone().expect("rowid"));
    for (from, to) in [(one.as_str(), "-1"), (&sixty, &one), ("-1", &sixty)] {
        app.rows_with(
            "UPDATE window_counts SET rowid = CAST(?2 AS INTEGER) \
             WHERE rowid = CAST(?1 AS INTEGER)",
            &[from, to],
        )
        .await;
    }
    let moved = app
        .rows_with(
            "SELECT CAST(rowid AS TEXT) FROM window_counts WHERE key_id = ? \
             ORDER BY window_seconds",
            &[&a],
        )
        .await;
    assert_eq!(
        moved,
        [vec![Some(sixty)], vec![Some(one)]],
        "rowids swapped"
    );
    for (units, want_one) in [(5, 6), (1, 7)] {
        commit(&db, &[], &[window(&a, 1, t0, units, 100)])
            .await
            .expect("fits");
        assert_eq!(
            counts().await,
            want(want_one, 2),
            "the 60 s window untouched"
        );
    }
    db.close().await;
}
