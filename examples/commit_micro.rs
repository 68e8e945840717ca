//! Scratch: times each statement of the serve group commit on a copy of a bench database.
use keypooler::store::sql;
use rusqlite::{params, Connection};
use std::time::{Duration, Instant};

fn main() {
    let path = std::env::args().nth(1).expect("db path");
    let per: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(13);
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384; PRAGMA wal_autocheckpoint=512").unwrap();
    let keys: Vec<String> = conn.prepare("SELECT id FROM keys WHERE tier_id = (SELECT id FROM tiers WHERE name='small') ORDER BY rowid").unwrap()
        .query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect();
    let consumer: String = conn
        .query_row("SELECT id FROM consumers LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let stmts: Vec<(&str, &str)> = vec![
        ("events", sql::INSERT_EVENTS),
        ("guard_usage", sql::GUARD_USAGE),
        ("update_usage", sql::UPDATE_USAGE),
        ("guard_windows", sql::GUARD_WINDOWS),
        ("upsert_windows", sql::UPSERT_WINDOWS),
    ];
    let mut times = vec![Duration::ZERO; stmts.len() + 2];
    let n = 3000;
    let mut k = 0usize;
    for i in 0..n {
        let now = chrono::Utc::now();
        let at = keypooler::timestamp::to_db(now);
        let sec = keypooler::timestamp::to_db(
            now - chrono::TimeDelta::nanoseconds(now.timestamp_subsec_nanos() as i64),
        );
        let mut events = Vec::new();
        let mut usage = std::collections::BTreeMap::new();
        for _ in 0..per {
            let key = &keys[k % keys.len()];
            k += 1;
            events.push(serde_json::json!([
                uuid::Uuid::now_v7().to_string(),
                key,
                consumer,
                "scrape",
                at,
                1
            ]));
            *usage.entry(key.clone()).or_insert(0) += 1;
        }
        let u: Vec<_> = usage
            .iter()
            .map(|(key, c)| serde_json::json!([key, c, at, null]))
            .collect();
        let w: Vec<_> = usage
            .iter()
            .map(|(key, c)| serde_json::json!([key, "scrape", 1, sec, c, 1_000_000_000]))
            .collect();
        let (ej, uj, wj) = (
            serde_json::to_string(&events).unwrap(),
            serde_json::to_string(&u).unwrap(),
            serde_json::to_string(&w).unwrap(),
        );
        let t = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        times[0] += t.elapsed();
        for (j, (_, text)) in stmts.iter().enumerate() {
            let p = match j {
                0 => &ej,
                1 | 2 => &uj,
                _ => &wj,
            };
            let t = Instant::now();
            conn.prepare_cached(text)
                .unwrap()
                .execute(params![p])
                .unwrap();
            times[j + 1] += t.elapsed();
        }
        let t = Instant::now();
        conn.execute_batch("COMMIT").unwrap();
        times[stmts.len() + 1] += t.elapsed();
        let _ = i;
    }
    let names: Vec<&str> = std::iter::once("begin")
        .chain(stmts.iter().map(|s| s.0))
        .chain(std::iter::once("commit"))
        .collect();
    let total: Duration = times.iter().sum();
    for (name, t) in names.iter().zip(&times) {
        println!(
            "{name:16} {:8.1} us/commit",
            t.as_secs_f64() * 1e6 / n as f64
        );
    }
    println!(
        "{:16} {:8.1} us/commit ({per} serves)",
        "total",
        total.as_secs_f64() * 1e6 / n as f64
    );
}
