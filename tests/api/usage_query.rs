//! Issue 10 items 3–4: audit filters, cursor paging, summaries, the daily rollup and retention.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

/// A tier `t` with features `a` and `b` (no practical rate limit), two keys and two consumers.
async fn setup(app: &TestApp) -> (Vec<String>, Vec<(String, String)>) {
    app.create_tier("t", &[("a", 1_000_000, 60), ("b", 1_000_000, 60)])
        .await;
    let mut keys = Vec::new();
    for i in 0..2 {
        keys.push(
            app.add_key(
                json!({ "name": format!("k{i}"), "key": format!("value-{i}"), "tier": "t" }),
            )
            .await,
        );
    }
    let consumers = vec![
        app.consumer("c0", &["t"]).await,
        app.consumer("c1", &["t"]).await,
    ];
    (keys, consumers)
}

/// Inserts audit rows straight into the database: (id, key_id, consumer_id, feature,
/// created_at as stored, outcome_class or "").
async fn insert_rows(app: &TestApp, rows: &[(String, String, String, String, String, String)]) {
    let rows: Vec<Value> = rows
        .iter()
        .map(|(id, k, c, f, at, class)| json!([id, k, c, f, at, class]))
        .collect();
    app.rows_with(
        "INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at, outcome_class) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
         nullif(value ->> 5, '') FROM json_each(?)",
        &[&Value::Array(rows).to_string()],
    )
    .await;
}

fn ids(r: &Resp) -> Vec<String> {
    r.body
        .as_array()
        .unwrap_or_else(|| panic!("array: {}", r.text))
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

/// Every page of `query` (limit `limit`), following `X-Next-Cursor`; checks `Link` on the way.
async fn all_pages(app: &TestApp, query: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/usage?{query}&limit={limit}&cursor={c}"),
            None => format!("/admin/usage?{query}&limit={limit}"),
        };
        let r = app.admin_get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        let page = ids(&r);
        assert!(page.len() <= limit);
        out.extend(page.iter().cloned());
        match r.headers.get("x-next-cursor") {
            Some(next) => {
                let next = next.to_str().expect("ascii").to_string();
                assert_eq!(page.len(), limit, "a next page only after a full one");
                let link = r.headers.get("link").expect("Link with the cursor");
                let link = link.to_str().expect("ascii");
                assert!(
                    link.starts_with("</admin/usage?")
                        && link.contains(&format!("cursor={next}>"))
                        && link.ends_with("rel=\"next\""),
                    "{link}"
                );
                if !query.is_empty() {
                    assert!(link.contains(query), "filters kept in {link}");
                }
                cursor = Some(next);
            }
            None => {
                assert!(r.headers.get("link").is_none());
                return out;
            }
        }
    }
}

/// The summary for `query`, without the field that says how far the rollup got.
async fn summary(app: &TestApp, query: &str) -> Value {
    let r = app
        .admin_get(&format!("/admin/usage/summary?{query}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.text);
    let mut body = r.body;
    body.as_object_mut()
        .expect("object")
        .remove("rolled_up_through");
    body
}

fn counts(groups: &Value) -> Vec<(String, i64)> {
    groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap().to_string(),
                g["count"].as_i64().unwrap(),
            )
        })
        .collect()
}

on_both_drivers! {
// Issue 10 item 3: each filter alone and combined; times compare as instants whatever form a
// (Go-era) row stored them in.
async fn each_filter_selects_its_rows() {
    let app = spawn_app().await;
    let (keys, consumers) = setup(&app).await;
    let row = |n: u32, key: &str, consumer: &str, feature: &str, at: &str| {
        (format!("go-{n}"), key.to_string(), consumer.to_string(), feature.to_string(), at.to_string(), String::new())
    };
    insert_rows(&app, &[
        row(1, "gk1", "admin", "a", "2025-06-01 09:00:00"),
        row(2, "gk2", "gc", "a", "2025-06-01T10:30:00Z"),
        row(3, "gk1", "gc", "b", "2025-06-01 11:00:00"),
        row(4, "gk2", "gc", "b", "2025-06-01T12:15:30.25+02:00"),
        row(5, "gk1", "admin", "a", "2025-06-01 13:00:00.123456789-07:00"),
    ]).await;
    let mut served = Vec::new();
    for (i, feature) in ["a", "b", "a", "a"].iter().enumerate() {
        let (_, token) = &consumers[i % 2];
        let r = app.draw(feature, token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        served.push((r.body["serve_id"].as_str().unwrap().to_string(), r.body["key_id"].as_str().unwrap().to_string(), *feature, i % 2));
    }
    let newest_first: Vec<String> = served.iter().rev().map(|s| s.0.clone()).collect();
    let get = |q: String| { let app = &app; async move { ids(&app.admin_get(&format!("/admin/usage?{q}")).await) } };
    // Once as the rows come (the side indexes filled or not), once with every row indexed.
    for indexed in [false, true] {
    if indexed {
        app.audit_indexed().await;
    }

    // Insertion order, newest first; the Go rows behind this run's serves.
    let all = get(String::new()).await;
    assert_eq!(all[..4], newest_first[..]);
    assert_eq!(all[4..], ["go-5", "go-4", "go-3", "go-2", "go-1"]);

    assert_eq!(get("key_id=gk1".into()).await, ["go-5", "go-3", "go-1"]);
    assert_eq!(get("consumer_id=gc".into()).await, ["go-4", "go-3", "go-2"]);
    assert_eq!(get("feature=b&key_id=gk2".into()).await, ["go-4"]);
    let want: Vec<String> = served.iter().rev().filter(|s| s.2 == "a").map(|s| s.0.clone()).chain(["go-5", "go-2", "go-1"].map(String::from)).collect();
    assert_eq!(get("feature=a".into()).await, want);
    let c1 = &consumers[1].0;
    let want: Vec<String> = served.iter().rev().filter(|s| s.3 == 1).map(|s| s.0.clone()).collect();
    assert_eq!(get(format!("consumer_id={c1}")).await, want);
    let k0 = &keys[0];
    let want: Vec<String> = served.iter().rev().filter(|s| &s.1 == k0).map(|s| s.0.clone()).collect();
    assert_eq!(get(format!("key_id={k0}")).await, want);
    assert!(get("key_id=no-such-key".into()).await.is_empty());

    // 10:15:30.25Z (stored +02:00) and 10:30Z are inside 10:00–11:00; 11:00 is at the bound.
    let window = "since=2025-06-01T10:00:00Z&until=2025-06-01T11:00:00Z";
    assert_eq!(get(window.into()).await, ["go-4", "go-3", "go-2"]);
    assert_eq!(get(format!("{window}&key_id=gk2")).await, ["go-4", "go-2"]);
    assert_eq!(get(format!("{window}&consumer_id=gc&feature=b")).await, ["go-4", "go-3"]);
    // 13:00-07:00 is 20:00Z; an offset in the query counts too.
    assert_eq!(get("since=2025-06-01T19:59:59Z&until=2025-06-02T00:00:00Z".into()).await, ["go-5"]);
    assert_eq!(get("since=2025-06-01T21:00:00%2B01:00&until=2025-06-01T20:00:01Z&key_id=gk1".into()).await, ["go-5"]);
    assert_eq!(get("until=2025-06-01T09:00:00Z".into()).await, ["go-1"]);
    assert_eq!(get("since=2026-01-01T00:00:00Z".into()).await, newest_first);
    // Empty values read as absent.
    assert_eq!(get("key_id=&consumer_id=&feature=&since=&until=&cursor=".into()).await, all);
    }
}

// Issue 10 item 3: paging while serves are inserted skips and repeats nothing: the pages'
// union is exactly the rows that existed below the first page's top, in order.
async fn paging_under_concurrent_serves_skips_and_repeats_nothing() {
    let app = Arc::new(spawn_app().await);
    let (keys, consumers) = setup(&app).await;
    for i in 0..60 {
        let r = app.draw(if i % 3 == 0 { "b" } else { "a" }, &consumers[i % 2].1).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    // The first rows through the side indexes, the ones served while paging above their end.
    app.audit_indexed().await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (app, stop, token) = (app.clone(), stop.clone(), consumers[w % 2].1.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(app.draw("a", &token).await.status, StatusCode::OK);
                n += 1;
            }
            n
        }));
    }
    let k0 = keys[0].clone();
    let c1 = consumers[1].0.clone();
    let mut checked = Vec::new();
    for (query, sql_filter) in [
        (String::new(), String::new()),
        (format!("key_id={k0}"), format!("AND key_id = '{k0}'")),
        (format!("consumer_id={c1}&feature=a"), format!("AND consumer_id = '{c1}' AND feature = 'a'")),
    ] {
        let pages = all_pages(&app, &query, 7).await;
        checked.push((query, sql_filter, pages));
    }
    stop.store(true, Ordering::Relaxed);
    let mut during = 0;
    for l in load {
        during += l.await.expect("load task");
    }
    assert!(during > 0, "serves ran while paging");
    for (query, sql_filter, pages) in checked {
        let unique: BTreeSet<&String> = pages.iter().collect();
        assert_eq!(unique.len(), pages.len(), "{query}: a row repeated");
        let top = &pages[0];
        let want: Vec<String> = app
            .rows_with(
                &format!(
                    "SELECT id FROM usage_events WHERE rowid <= \
                     (SELECT rowid FROM usage_events WHERE id = ?) {sql_filter} ORDER BY rowid DESC"
                ),
                &[top],
            )
            .await
            .into_iter()
            .map(|r| r[0].clone().expect("id"))
            .collect();
        assert_eq!(pages, want, "{query}: pages against the database");
    }
}

// Issue 10 items 3–4: summaries per key, consumer, feature and day with outcome classes; the
// same answer from raw rows, after the old days are rolled up, and after they are pruned.
async fn summaries_count_per_group_and_survive_rollup_and_pruning() {
    let mut app = spawn_app().await;
    let (keys, consumers) = setup(&app).await;
    // Old days: 10 and 9 days ago, with stored outcome classes, recorded before today's
    // serves (the newest row is never pruned: rowids are never reused).
    let day = |ago: u64| (Utc::now().date_naive() - chrono::Days::new(ago)).format("%Y-%m-%d").to_string();
    let (d10, d9) = (day(10), day(9));
    let mut old = Vec::new();
    for n in 0..30 {
        let (at, key, consumer, feature, class) = match n % 5 {
            0 => (format!("{d10} 12:00:00"), "old-k1", "old-c1", "a", "ok"),
            1 => (format!("{d10}T23:59:59Z"), "old-k1", "old-c2", "b", "rate_limited"),
            2 => (format!("{d9}T01:00:00+02:00"), "old-k2", "old-c1", "a", ""),
            3 => (format!("{d9} 10:00:00.5"), "old-k2", "old-c1", "a", "auth_invalid"),
            _ => (format!("{d9}T12:00:00Z"), "old-k1", "admin", "b", "network"),
        };
        old.push((format!("old-{n}"), key.into(), consumer.into(), feature.into(), at, class.into()));
    }
    insert_rows(&app, &old).await;
    let mut serves = Vec::new();
    for i in 0..6 {
        let r = app.draw(if i < 4 { "a" } else { "b" }, &consumers[i % 2].1).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        serves.push(r.body["serve_id"].as_str().unwrap().to_string());
    }
    for (serve, status) in serves.iter().zip([200, 500, 404]) {
        let r = app.admin_post(&format!("/serves/{serve}/outcome"), json!({ "status": status })).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }

    let since = format!("since={d10}T15:00:00Z");
    let queries = ["group_by=key", "group_by=consumer", "group_by=feature", "group_by=day"]
        .map(|g| [g.to_string(), format!("{g}&{since}"), format!("{g}&until={d9}T00:00:00Z")])
        .concat();
    let mut before = Vec::new();
    for q in &queries {
        before.push(summary(&app, q).await);
    }
    // Spot checks on the raw answer.
    let by_key = &before[0];
    assert_eq!(by_key["group_by"], "key");
    assert_eq!(by_key["since"], Value::Null);
    let k = counts(by_key);
    assert!(k.contains(&("old-k1".into(), 18)) && k.contains(&("old-k2".into(), 12)), "{k:?}");
    let served_today: i64 = k.iter().filter(|(g, _)| keys.contains(g)).map(|(_, n)| n).sum();
    assert_eq!(served_today, 6);
    let old_k1 = by_key["groups"].as_array().unwrap().iter().find(|g| g["group"] == "old-k1").unwrap();
    assert_eq!(old_k1["outcomes"], json!({ "ok": 6, "client_error": 0, "auth_invalid": 0, "quota_exhausted": 0,
        "rate_limited": 6, "upstream_error": 0, "network": 6, "unreported": 0 }));
    let by_feature = &before[6];
    let a = by_feature["groups"].as_array().unwrap().iter().find(|g| g["group"] == "a").unwrap();
    assert_eq!(a["count"], 4 + 18);
    assert_eq!(a["outcomes"]["ok"], 1 + 6);
    assert_eq!(a["outcomes"]["upstream_error"], 1);
    assert_eq!(a["outcomes"]["client_error"], 1);
    assert_eq!(a["outcomes"]["auth_invalid"], 6);
    assert_eq!(a["outcomes"]["unreported"], 1 + 6);
    // `{d9}T01:00:00+02:00` is 23:00 UTC on d10: days are UTC days.
    let by_day = counts(&before[9]);
    assert_eq!(by_day, [(d10.clone(), 18), (d9.clone(), 12), (day(0), 6)]);
    // Whole days: `since` 15:00 on d10 still counts all of d10; `until` midnight of d9 all of d9.
    assert_eq!(counts(&before[10]), by_day);
    assert_eq!(counts(&before[11]), [(d10.clone(), 18), (d9.clone(), 12)]);
    assert_eq!(before[10]["since"], json!(d10));
    let by_consumer = counts(&before[3]);
    assert!(by_consumer.contains(&("admin".into(), 6)) && by_consumer.contains(&("old-c1".into(), 18)));

    // Restart: the old days roll up (nothing is pruned without AUDIT_RETENTION_DAYS).
    app.restart().await;
    let rolled = wait_for_rollup(&app, &d9).await;
    assert!(rolled >= d9);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events WHERE id LIKE 'old-%'").await, 30);
    assert!(app.count("SELECT COUNT(*) FROM usage_rollup").await > 0);
    for (q, b) in queries.iter().zip(&before) {
        assert_eq!(&summary(&app, q).await, b, "{q} after the rollup");
    }

    // Restart with a 3-day retention: the old rows are pruned in the background, with their
    // side-index entries.
    app.audit_indexed().await;
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_by_key WHERE key_id LIKE 'old-%'").await, 30);
    app.env.push(("AUDIT_RETENTION_DAYS".into(), "3".into()));
    app.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.count("SELECT COUNT(*) FROM usage_events WHERE id LIKE 'old-%'").await > 0 {
        assert!(Instant::now() < deadline, "old rows not pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_events").await, 6, "today's serves kept");
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_by_key WHERE key_id LIKE 'old-%'").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM usage_by_consumer WHERE consumer_id LIKE 'old-%'").await, 0);
    for (q, b) in queries.iter().zip(&before) {
        assert_eq!(&summary(&app, q).await, b, "{q} after pruning");
    }
    assert!(ids(&app.admin_get("/admin/usage?key_id=old-k1").await).is_empty());
}

// Issue 10 item 3: the side indexes are kept per bucket of 4,096 audit rows (migration 011);
// a page by key or consumer walks them newest first, across empty buckets and bucket edges,
// whether the key is rare (one row every few hundred buckets) or dense (thousands per bucket).
async fn pages_walk_side_index_buckets_newest_first() {
    let app = spawn_app().await;
    let at = Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    // (rowid, id, key, consumer, feature)
    let mut rows: Vec<(i64, String, &str, &str, &str)> = Vec::new();
    for (i, rowid) in [3, 4_095, 4_096, 4_097, 9_000, 40_000, 400_000, 1_200_000].iter().enumerate() {
        let feature = if i % 2 == 0 { "a" } else { "b" };
        rows.push((*rowid, format!("rare-{rowid:07}"), "rare-k", "rare-c", feature));
    }
    for rowid in 1_200_001..1_206_001 {
        rows.push((rowid, format!("dense-{rowid:07}"), "dense-k", "dense-c", "a"));
    }
    let json_rows: Vec<Value> = rows
        .iter()
        .map(|(r, id, k, c, f)| json!([r, id, k, c, f, at]))
        .collect();
    app.rows_with(
        "INSERT INTO usage_events (rowid, id, key_id, consumer_id, feature, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5 \
         FROM json_each(?)",
        &[&Value::Array(json_rows).to_string()],
    )
    .await;
    app.audit_indexed().await;
    let newest_first = |key: &str, feature: Option<&str>| -> Vec<String> {
        let mut ids: Vec<(i64, String)> = rows
            .iter()
            .filter(|(_, _, k, _, f)| *k == key && feature.is_none_or(|want| want == *f))
            .map(|(r, id, ..)| (*r, id.clone()))
            .collect();
        ids.sort_by_key(|b| std::cmp::Reverse(b.0));
        ids.into_iter().map(|(_, id)| id).collect()
    };
    let rare = newest_first("rare-k", None);
    assert_eq!(all_pages(&app, "key_id=rare-k", 3).await, rare);
    assert_eq!(all_pages(&app, "consumer_id=rare-c", 2).await, rare);
    assert_eq!(all_pages(&app, "key_id=rare-k&feature=a", 1).await, newest_first("rare-k", Some("a")));
    let dense = newest_first("dense-k", None);
    let first = app.admin_get("/admin/usage?key_id=dense-k&limit=100").await;
    assert_eq!(ids(&first), dense[..100]);
    assert_eq!(all_pages(&app, "consumer_id=dense-c", 1000).await, dense);
}

// Issue 10 item 7: bad input answers 400 naming the parameter, as JSON.
async fn bad_usage_parameters_answer_400_naming_them() {
    let app = spawn_app().await;
    app.create_tier("t", &[("f", 100, 60)]).await;
    app.add_key(json!({ "name": "k", "key": "v", "tier": "t" })).await;
    for (path, name) in [
        ("/admin/usage?since=yesterday", "since"),
        ("/admin/usage?until=2026-13-01T00:00:00Z", "until"),
        ("/admin/usage?since=2026-11-26", "since"),
        ("/admin/usage?cursor=abc", "cursor"),
        ("/admin/usage?cursor=0", "cursor"),
        ("/admin/usage?cursor=-5", "cursor"),
        ("/admin/usage?cursor=99999999999999999999", "cursor"),
        ("/admin/usage?cursor=0012", "cursor"),
        ("/admin/usage?limit=-1", "limit"),
        ("/admin/usage?limit=ten", "limit"),
        ("/admin/usage/summary", "group_by"),
        ("/admin/usage/summary?group_by=week", "group_by"),
        ("/admin/usage/summary?group_by=", "group_by"),
        ("/admin/usage/summary?group_by=key&since=now", "since"),
        ("/admin/usage/summary?group_by=day&until=1", "until"),
    ] {
        let r = app.admin_get(path).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
        assert!(r.error().contains(name), "{path}: {}", r.text);
    }
    // A huge limit reads as the maximum (documented); a cursor past every row is an empty page.
    let r = app.admin_get("/admin/usage?limit=99999999999999999999&cursor=1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!([]));
    // Offsets past year 9999 or before 0000 read as those years' bounds.
    assert_eq!(app.draw("f", ADMIN_TOKEN).await.status, StatusCode::OK);
    let r = app.admin_get("/admin/usage?since=0000-01-01T00:00:00%2B01:00&until=9999-12-31T23:00:00-05:00").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body.as_array().map(Vec::len), Some(1), "{}", r.text);
    let r = app.admin_get("/admin/usage/summary?group_by=day&since=0000-01-01T00:00:00%2B01:00&until=9999-12-31T23:00:00-05:00").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!((&r.body["since"], &r.body["until"]), (&json!("0000-01-01"), &json!("9999-12-31")));
    assert_eq!(r.body["groups"].as_array().map(Vec::len), Some(1), "{}", r.text);
    let r = app.admin_get("/admin/usage/summary?group_by=day&since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["groups"], json!([]));
    // Consumers may not read the audit.
    let (_, token) = app.consumer("c", &[]).await;
    assert_eq!(app.get("/admin/usage/summary?group_by=key", Some(&token)).await.status, StatusCode::FORBIDDEN);
}
}

/// Waits until the rollup covers `day`; returns how far it got.
async fn wait_for_rollup(app: &TestApp, day: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app.admin_get("/admin/usage/summary?group_by=day").await;
        if let Some(rolled) = r.body["rolled_up_through"].as_str() {
            if rolled >= day {
                return rolled.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "rollup did not reach {day}: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
