//! A database written by the Go keypooler opens unchanged (SPEC §3) and its sealed values are
//! read byte for byte (SPEC §4).
//!
//! The fixture is built here the way the Go service left it: its consolidated
//! `migrations/001_init.sql` (with `REFERENCES` clauses), `schema_migrations` holding version 1
//! (`init`), timestamps in every form the Go drivers wrote, and `enc:gcm:` values sealed by an
//! independent AES-GCM implementation (Python's `cryptography`), pasted below as literals.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use chrono::{DateTime, FixedOffset, SubsecRound, TimeDelta, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use crate::helpers::{open_db, spawn_app_on_file, spawn_app_with, ADMIN_TOKEN, TABLES};

// ---------------------------------------------------------------------------------------------
// Fixed material. Made at authoring time with Python 3 and `cryptography` 48:
//
//   key = hashlib.sha256(b"keypooler go fixture key").digest()
//   a = AESGCM(key)
//   "enc:gcm:" + (nonce + a.encrypt(nonce, plaintext, None)).hex()
//
// with the nonces a0a1…ab, b0b1…bb and c0c1…cb (12 bytes each) and no associated data.
// The token hash is hashlib.sha256(token.encode()).hexdigest().
// ---------------------------------------------------------------------------------------------

/// ENCRYPTION_KEY the Go service ran with: sha256(b"keypooler go fixture key").
const GO_KEY_HEX: &str = "9ec516b6ddf0845783f3c7c032726a724ac133e0fcd03138c88ea300a3979864";

/// AESGCM(key).encrypt(bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab"), b"fc-go-encrypted-value-0002", None)
const ENC_VALUE: &str = "enc:gcm:a0a1a2a3a4a5a6a7a8a9aaab7fcb0e916b278d0d00c96febfe0eaaac0fccf607d3e7b03f9e19f204878c308fc9aae7823d06bcf27d9a";
const ENC_VALUE_PLAIN: &str = "fc-go-encrypted-value-0002";

/// AESGCM(key).encrypt(bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babb"), b"whsec_go_encrypted_secret", None)
const ENC_SECRET: &str = "enc:gcm:b0b1b2b3b4b5b6b7b8b9babb4991735453e7dc2fcbef16e531079f9c891aa5bb70521579471e81025ab4e73d18e514af15a1cdc9c0";
const ENC_SECRET_PLAIN: &str = "whsec_go_encrypted_secret";

/// AESGCM(key).encrypt(bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacb"), b"vault-only-encrypted-key", None)
const ENC_VAULT: &str = "enc:gcm:c0c1c2c3c4c5c6c7c8c9cacb3bf7438f95bb70f3c29cedd78ff00297b20e6b55074cfa20a1cbb0b408747554b5fa65af754d34c0";
const ENC_VAULT_PLAIN: &str = "vault-only-encrypted-key";

const PLAIN_VALUE: &str = "fc-go-plaintext-value-0001";
const PLAIN_SECRET: &str = "whsec_go_plaintext_secret";
const EXPIRED_VALUE: &str = "fc-go-expired-value-0003";
const DISABLED_VALUE: &str = "fc-go-disabled-value-0004";
const BUDGET_VALUE: &str = "budget-go-value-0005";
const SPENT_VALUE: &str = "spent-go-value-0006";

/// A consumer token the Go service handed out (64 hex chars) and its stored hash.
const CONSUMER_TOKEN: &str = "5f0c3a1e9b7d4c2a8e6f1b3d5a7c9e0f2b4d6f8a1c3e5a7b9d0f2e4c6a8b0d1e";
const CONSUMER_TOKEN_HASH: &str =
    "71f76c6fab33beecc0b5ca7d6327908d86af889993d161b8cd0de74e363d1b29";
/// The token of a consumer the Go operator deactivated (is_active = 0).
const INACTIVE_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const INACTIVE_TOKEN_HASH: &str =
    "a8ae6e6ee929abea3afcfc5258c8ccd6f85273e0d4626d26c7279f3250f77c8e";

const TIER_FIRECRAWL: &str = "0b6c1f2e-3a4d-4e5f-8a9b-0c1d2e3f4a01";
const TIER_BUDGET: &str = "0b6c1f2e-3a4d-4e5f-8a9b-0c1d2e3f4a02";
const TIER_VAULT: &str = "0b6c1f2e-3a4d-4e5f-8a9b-0c1d2e3f4a03";

const KEY_PLAIN: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c01";
const KEY_ENC: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c02";
const KEY_EXPIRED: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c03";
const KEY_DISABLED: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c04";
const KEY_BUDGET: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c05";
const KEY_SPENT: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c06";
const KEY_VAULT: &str = "1c7d2a3b-4e5f-4a6b-9c8d-1e2f3a4b5c07";

const CONSUMER_ID: &str = "2d8e3b4c-5f6a-4b7c-8d9e-2f3a4b5c6d01";
const INACTIVE_CONSUMER_ID: &str = "2d8e3b4c-5f6a-4b7c-8d9e-2f3a4b5c6d02";

/// The seven tables of the Go service (SPEC §3): every table but `schema_migrations`.
const GO_TABLES: &[&str] = TABLES.split_at(7).0;

/// The Go keypooler's consolidated `migrations/001_init.sql` (destructive DROP + CREATE; the
/// Go migrator ran it once and recorded version 1). `REFERENCES` clauses as Go's SQL had them;
/// SQLite does not enforce them with foreign keys off.
const GO_001_INIT_SQL: &str = r#"
DROP TABLE IF EXISTS usage_events;
DROP TABLE IF EXISTS consumer_scopes;
DROP TABLE IF EXISTS consumers;
DROP TABLE IF EXISTS key_secrets;
DROP TABLE IF EXISTS keys;
DROP TABLE IF EXISTS tier_features;
DROP TABLE IF EXISTS tiers;

CREATE TABLE tiers (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE tier_features (
    tier_id        TEXT NOT NULL REFERENCES tiers(id) ON DELETE CASCADE,
    feature        TEXT NOT NULL,
    rate_limit     INTEGER NOT NULL,
    window_seconds INTEGER NOT NULL DEFAULT 60,
    PRIMARY KEY (tier_id, feature)
);

CREATE TABLE keys (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL,
    key_value            TEXT NOT NULL,
    tier_id              TEXT NOT NULL REFERENCES tiers(id),
    is_active            INTEGER DEFAULT 1,
    expires_at           TIMESTAMP,
    usage_limit          INTEGER,
    usage_count          INTEGER NOT NULL DEFAULT 0,
    usage_window_seconds INTEGER,
    usage_window_start   TIMESTAMP,
    metadata_json        TEXT NOT NULL DEFAULT '{}',
    created_at           TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE key_secrets (
    key_id TEXT NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (key_id, name)
);

CREATE TABLE consumers (
    id          TEXT PRIMARY KEY,
    name        TEXT UNIQUE NOT NULL,
    token_hash  TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    is_active   INTEGER DEFAULT 1,
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE consumer_scopes (
    consumer_id TEXT NOT NULL REFERENCES consumers(id) ON DELETE CASCADE,
    tier_id     TEXT NOT NULL REFERENCES tiers(id) ON DELETE CASCADE,
    PRIMARY KEY (consumer_id, tier_id)
);

CREATE TABLE usage_events (
    id          TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    consumer_id TEXT NOT NULL,
    feature     TEXT NOT NULL,
    created_at  TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX idx_usage_events_key_id ON usage_events (key_id);
"#;

/// The Go migrator's bookkeeping table.
const GO_SCHEMA_MIGRATIONS_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);
INSERT INTO schema_migrations (version, name) VALUES (1, 'init');
"#;

/// The old audit rows: (id, key_id, consumer_id, feature, created_at as stored, the instant).
/// Mixed forms on one day, as a service that moved from CURRENT_TIMESTAMP defaults to the
/// libSQL driver (RFC 3339) and the modernc driver (Go layout with offset) would leave them.
const GO_USAGE: [(&str, &str, &str, &str, &str, &str); 5] = [
    (
        "3e9f4c5d-6a7b-4c8d-9e0f-3a4b5c6d7e01",
        KEY_PLAIN,
        "admin",
        "firecrawl_scrape",
        "2025-06-01 09:00:00",
        "2025-06-01T09:00:00Z",
    ),
    (
        "3e9f4c5d-6a7b-4c8d-9e0f-3a4b5c6d7e02",
        KEY_ENC,
        CONSUMER_ID,
        "firecrawl_scrape",
        "2025-06-01T10:30:00Z",
        "2025-06-01T10:30:00Z",
    ),
    (
        "3e9f4c5d-6a7b-4c8d-9e0f-3a4b5c6d7e03",
        KEY_PLAIN,
        "admin",
        "firecrawl_search",
        "2025-06-01 11:00:00",
        "2025-06-01T11:00:00Z",
    ),
    (
        "3e9f4c5d-6a7b-4c8d-9e0f-3a4b5c6d7e04",
        KEY_BUDGET,
        CONSUMER_ID,
        "budget_feature",
        "2025-06-01T12:15:30.25+02:00",
        "2025-06-01T10:15:30.25Z",
    ),
    (
        "3e9f4c5d-6a7b-4c8d-9e0f-3a4b5c6d7e05",
        KEY_PLAIN,
        "admin",
        "firecrawl_scrape",
        "2025-06-01 13:00:00.123456789-07:00",
        "2025-06-01T20:00:00.123456789Z",
    ),
];

/// What the fixture holds that depends on when the test runs.
struct GoFixture {
    /// The budget key's `usage_window_start`, as the Go driver wrote it a day ago.
    budget_window_start: DateTime<Utc>,
}

/// The Go driver's `time.Time` layout: `2006-01-02 15:04:05.999999999-07:00`.
fn go_driver_time(t: DateTime<Utc>) -> String {
    let offset = FixedOffset::west_opt(7 * 3600).expect("a -07:00 offset");
    t.with_timezone(&offset)
        .format("%Y-%m-%d %H:%M:%S%.9f%:z")
        .to_string()
}

fn parse_api_time(v: &Value) -> DateTime<Utc> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("a time string, got {v}"));
    assert!(s.ends_with('Z'), "API times are RFC 3339 in UTC: {s}");
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("not RFC 3339: {s}: {e}"))
        .with_timezone(&Utc)
}

/// A `keys` row as the Go service wrote it (created_at left to CURRENT_TIMESTAMP).
struct GoKey {
    id: &'static str,
    name: &'static str,
    value: &'static str,
    tier_id: &'static str,
    is_active: i64,
    expires_at: Option<String>,
    usage_limit: Option<i64>,
    usage_count: i64,
    usage_window_seconds: Option<i64>,
    usage_window_start: Option<String>,
    metadata: &'static str,
}

impl GoKey {
    fn new(
        id: &'static str,
        name: &'static str,
        value: &'static str,
        tier_id: &'static str,
    ) -> GoKey {
        GoKey {
            id,
            name,
            value,
            tier_id,
            is_active: 1,
            expires_at: None,
            usage_limit: None,
            usage_count: 0,
            usage_window_seconds: None,
            usage_window_start: None,
            metadata: "{}",
        }
    }
}

/// The Go service's schema and `schema_migrations` at `path` (its folder must exist), open.
async fn go_schema(path: &Path) -> SqlitePool {
    let db = open_db(path).await;
    sqlx::raw_sql(GO_001_INIT_SQL)
        .execute(&db)
        .await
        .expect("Go 001_init.sql");
    sqlx::raw_sql(GO_SCHEMA_MIGRATIONS_SQL)
        .execute(&db)
        .await
        .expect("Go schema_migrations");
    db
}

/// Writes the Go service's database at `path` (its folder must exist).
async fn write_go_database(path: &Path) -> GoFixture {
    let db = go_schema(path).await;

    for (id, name, description) in [
        (
            TIER_FIRECRAWL,
            "firecrawl",
            "Firecrawl pooled free-tier accounts",
        ),
        (TIER_BUDGET, "budget", "Monthly budgets"),
        (TIER_VAULT, "vault", ""),
    ] {
        sqlx::query("INSERT INTO tiers (id, name, description) VALUES (?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(description)
            .execute(&db)
            .await
            .expect("insert Go tier");
    }
    for (tier, feature, rate, window) in [
        (TIER_FIRECRAWL, "firecrawl_scrape", 100, 60),
        // The Go service stored 0 and treated it as 60.
        (TIER_FIRECRAWL, "firecrawl_search", 5, 0),
        (TIER_BUDGET, "budget_feature", 100, 3600),
        (TIER_VAULT, "vault_feature", 10, 60),
    ] {
        sqlx::query("INSERT INTO tier_features (tier_id, feature, rate_limit, window_seconds) VALUES (?, ?, ?, ?)")
            .bind(tier)
            .bind(feature)
            .bind(rate)
            .bind(window)
            .execute(&db)
            .await
            .expect("insert Go tier feature");
    }

    let budget_window_start =
        (Utc::now() - TimeDelta::days(1)).trunc_subsecs(0) + TimeDelta::nanoseconds(123_456_789);
    let keys = [
        GoKey {
            expires_at: Some("2099-01-02T03:04:05Z".into()),
            usage_count: 17,
            metadata: r#"{"account":"plain@example.com","plan":"free","credits":500}"#,
            ..GoKey::new(KEY_PLAIN, "fc-plain", PLAIN_VALUE, TIER_FIRECRAWL)
        },
        GoKey {
            expires_at: Some("2099-01-02 03:04:05.123456789+00:00".into()),
            usage_count: 4,
            metadata: r#"{"account":"enc@example.com","nested":{"region":"eu"}}"#,
            ..GoKey::new(KEY_ENC, "fc-encrypted", ENC_VALUE, TIER_FIRECRAWL)
        },
        GoKey {
            expires_at: Some("2021-06-01 12:00:00.5-07:00".into()),
            ..GoKey::new(KEY_EXPIRED, "fc-expired", EXPIRED_VALUE, TIER_FIRECRAWL)
        },
        GoKey {
            is_active: 0,
            usage_count: 2,
            ..GoKey::new(KEY_DISABLED, "fc-disabled", DISABLED_VALUE, TIER_FIRECRAWL)
        },
        GoKey {
            usage_limit: Some(5),
            usage_count: 3,
            usage_window_seconds: Some(2_592_000),
            usage_window_start: Some(go_driver_time(budget_window_start)),
            metadata: r#"{"owner":"ops"}"#,
            ..GoKey::new(KEY_BUDGET, "budget-monthly", BUDGET_VALUE, TIER_BUDGET)
        },
        GoKey {
            usage_limit: Some(10),
            usage_count: 10,
            ..GoKey::new(KEY_SPENT, "budget-spent", SPENT_VALUE, TIER_BUDGET)
        },
        GoKey::new(KEY_VAULT, "vault-encrypted", ENC_VAULT, TIER_VAULT),
    ];
    for k in keys {
        sqlx::query(
            "INSERT INTO keys (id, name, key_value, tier_id, is_active, expires_at, usage_limit, usage_count, \
             usage_window_seconds, usage_window_start, metadata_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(k.id)
        .bind(k.name)
        .bind(k.value)
        .bind(k.tier_id)
        .bind(k.is_active)
        .bind(k.expires_at)
        .bind(k.usage_limit)
        .bind(k.usage_count)
        .bind(k.usage_window_seconds)
        .bind(k.usage_window_start)
        .bind(k.metadata)
        .execute(&db)
        .await
        .expect("insert Go key");
    }
    // One key's created_at in the Go driver's layout instead of CURRENT_TIMESTAMP.
    sqlx::query("UPDATE keys SET created_at = '2025-05-30 08:09:10.987654321+02:00' WHERE id = ?")
        .bind(KEY_ENC)
        .execute(&db)
        .await
        .expect("Go-driver created_at");

    for (key, name, value) in [
        (KEY_PLAIN, "webhook_secret", PLAIN_SECRET),
        (KEY_ENC, "webhook_secret", ENC_SECRET),
    ] {
        sqlx::query("INSERT INTO key_secrets (key_id, name, value) VALUES (?, ?, ?)")
            .bind(key)
            .bind(name)
            .bind(value)
            .execute(&db)
            .await
            .expect("insert Go key secret");
    }

    for (id, name, hash, description, active) in [
        (
            CONSUMER_ID,
            "siphon-runner",
            CONSUMER_TOKEN_HASH,
            "firecrawl via rotation",
            1,
        ),
        (
            INACTIVE_CONSUMER_ID,
            "retired-runner",
            INACTIVE_TOKEN_HASH,
            "",
            0,
        ),
    ] {
        sqlx::query("INSERT INTO consumers (id, name, token_hash, description, is_active) VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(hash)
            .bind(description)
            .bind(active)
            .execute(&db)
            .await
            .expect("insert Go consumer");
    }
    for (consumer, tier) in [
        (CONSUMER_ID, TIER_FIRECRAWL),
        (CONSUMER_ID, TIER_BUDGET),
        (INACTIVE_CONSUMER_ID, TIER_FIRECRAWL),
    ] {
        sqlx::query("INSERT INTO consumer_scopes (consumer_id, tier_id) VALUES (?, ?)")
            .bind(consumer)
            .bind(tier)
            .execute(&db)
            .await
            .expect("insert Go scope");
    }

    for (id, key, consumer, feature, created_at, _) in GO_USAGE {
        sqlx::query("INSERT INTO usage_events (id, key_id, consumer_id, feature, created_at) VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(key)
            .bind(consumer)
            .bind(feature)
            .bind(created_at)
            .execute(&db)
            .await
            .expect("insert Go usage event");
    }
    db.close().await;
    GoFixture {
        budget_window_start,
    }
}

/// A temp dir holding the Go database at `<dir>/data/pool.db`.
async fn go_database() -> (tempfile::TempDir, PathBuf, GoFixture) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("create data folder");
    let path = data.join("pool.db");
    let fixture = write_go_database(&path).await;
    (dir, path, fixture)
}

// ---------------------------------------------------------------------------------------------
// Reading the file behind the service's back.
// ---------------------------------------------------------------------------------------------

/// Columns our migrations add to a Go table (SPEC §8: additive), as `ALTER TABLE` writes them
/// into its `CREATE TABLE` text: issue 9's outcome columns on `usage_events` (migration 003),
/// issue 10's keyed value hash on `keys` (migration 006) and previous-token columns on `consumers` (migration 007).
const ADDED_COLUMNS: [(&str, &str); 7] = [
    ("value_hash", ", value_hash TEXT"),
    ("outcome_class", ", outcome_class TEXT"),
    ("outcome_status", ", outcome_status INTEGER"),
    ("outcome_reported_at", ", outcome_reported_at TIMESTAMP"),
    ("previous_token_hash", ", previous_token_hash TEXT"),
    (
        "previous_token_expires_at",
        ", previous_token_expires_at TIMESTAMP",
    ),
    ("cost", ", cost INTEGER"),
];

/// Every row of `table` in rowid order, each column `quote()`d (type-preserving), headed by
/// the column list — so a dropped, added, retyped or rewritten value shows up. Columns our
/// additive migrations add are left out: the Go columns and rows must stay as they were.
async fn dump_table(db: &SqlitePool, table: &str) -> Vec<String> {
    let cols: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_table_info(?) ORDER BY cid")
            .bind(table)
            .fetch_all(db)
            .await
            .expect("table columns");
    let cols: Vec<String> = cols
        .into_iter()
        .filter(|c| {
            table == "schema_migrations" || !ADDED_COLUMNS.iter().any(|(name, _)| c == name)
        })
        .collect();
    assert!(!cols.is_empty(), "table {table} exists");
    let expr = cols
        .iter()
        .map(|c| format!("quote(\"{c}\")"))
        .collect::<Vec<_>>()
        .join(" || '|' || ");
    let mut rows: Vec<String> =
        sqlx::query_scalar(&format!("SELECT {expr} FROM \"{table}\" ORDER BY rowid"))
            .fetch_all(db)
            .await
            .expect("table rows");
    rows.insert(0, cols.join(","));
    rows
}

/// The seven tables (full contents), their `CREATE TABLE` text, and schema_migrations.
async fn dump_all(path: &Path) -> BTreeMap<String, Vec<String>> {
    let db = open_db(path).await;
    let mut out = BTreeMap::new();
    for table in GO_TABLES {
        out.insert(table.to_string(), dump_table(&db, table).await);
        let create: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(table)
                .fetch_one(&db)
                .await
                .expect("table definition");
        let create = ADDED_COLUMNS
            .iter()
            .fold(create, |text, (_, added)| text.replace(added, ""));
        out.insert(format!("{table}#schema"), vec![create]);
    }
    out.insert(
        "schema_migrations".into(),
        dump_table(&db, "schema_migrations").await,
    );
    db.close().await;
    out
}

async fn count(path: &Path, table: &str) -> i64 {
    let db = open_db(path).await;
    let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
        .fetch_one(&db)
        .await
        .expect("count rows");
    db.close().await;
    n
}

/// `schema_migrations` as (version, name, applied_at).
async fn migrations(path: &Path) -> Vec<(i64, String, String)> {
    let db = open_db(path).await;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT version, name, CAST(applied_at AS TEXT) FROM schema_migrations ORDER BY version",
    )
    .fetch_all(&db)
    .await
    .expect("schema_migrations rows");
    db.close().await;
    rows
}

/// The columns of `keys` that nothing but an admin write may change.
async fn key_identities(path: &Path) -> Vec<String> {
    let db = open_db(path).await;
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT quote(id) || '|' || quote(name) || '|' || quote(key_value) || '|' || quote(tier_id) || '|' || \
         quote(is_active) || '|' || quote(expires_at) || '|' || quote(usage_limit) || '|' || \
         quote(usage_window_seconds) || '|' || quote(metadata_json) || '|' || quote(created_at) \
         FROM keys ORDER BY rowid",
    )
    .fetch_all(&db)
    .await
    .expect("key rows");
    db.close().await;
    rows
}

fn assert_same_rows(
    before: &BTreeMap<String, Vec<String>>,
    after: &BTreeMap<String, Vec<String>>,
    what: &str,
) {
    for (table, rows) in before {
        if table == "schema_migrations" {
            continue;
        }
        assert_eq!(after.get(table), Some(rows), "{what}: {table} changed");
    }
}

fn assert_schema_migrations_kept(rows: &[(i64, String, String)], go_applied_at: &str) {
    assert_eq!(
        rows.first().map(|r| (r.0, r.1.as_str(), r.2.as_str())),
        Some((1, "init", go_applied_at)),
        "the Go service's version 1 row is kept as it was"
    );
    let versions: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let expected: Vec<i64> = keypooler::store::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(
        versions, expected,
        "version 1 from Go plus every later embedded migration, once each"
    );
}

fn key_by_id<'a>(keys: &'a Value, id: &str) -> &'a Value {
    keys.as_array()
        .expect("keys array")
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("key {id} listed in {keys}"))
}

/// No stored value, plaintext or sealed, ever appears in an admin listing.
fn assert_no_values(text: &str) {
    for needle in [
        PLAIN_VALUE,
        PLAIN_SECRET,
        EXPIRED_VALUE,
        DISABLED_VALUE,
        BUDGET_VALUE,
        SPENT_VALUE,
        ENC_VALUE_PLAIN,
        ENC_SECRET_PLAIN,
        ENC_VAULT_PLAIN,
        // The ciphertexts (the scheme name alone may appear in an error message).
        &ENC_VALUE[8..],
        &ENC_SECRET[8..],
        &ENC_VAULT[8..],
        CONSUMER_TOKEN,
        CONSUMER_TOKEN_HASH,
        INACTIVE_TOKEN_HASH,
    ] {
        assert!(
            !text.contains(needle),
            "a value or token leaked into a listing: {needle} in {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fixture_matches_its_independent_derivations() {
    // The pasted literals agree with this crate's primitives, so a failure elsewhere is the service's.
    let key: [u8; 32] = Sha256::digest(b"keypooler go fixture key").into();
    assert_eq!(hex::encode(key), GO_KEY_HEX);
    assert_eq!(
        hex::encode(Sha256::digest(CONSUMER_TOKEN.as_bytes())),
        CONSUMER_TOKEN_HASH
    );
    assert_eq!(
        hex::encode(Sha256::digest(INACTIVE_TOKEN.as_bytes())),
        INACTIVE_TOKEN_HASH
    );
    let cipher = Aes256Gcm::new(&key.into());
    for (sealed, plain) in [
        (ENC_VALUE, ENC_VALUE_PLAIN),
        (ENC_SECRET, ENC_SECRET_PLAIN),
        (ENC_VAULT, ENC_VAULT_PLAIN),
    ] {
        let raw = hex::decode(sealed.strip_prefix("enc:gcm:").expect("tag")).expect("hex");
        let (nonce, body) = raw.split_at(12);
        let opened = cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .expect("authentic");
        assert_eq!(opened, plain.as_bytes());
    }
}

#[tokio::test]
async fn go_database_opens_unchanged_and_serves_with_its_encryption_key() {
    let (_dir, path, fixture) = go_database().await;
    let before = dump_all(&path).await;
    let go_applied_at = migrations(&path).await[0].2.clone();
    let key_ids_before = key_identities(&path).await;

    let mut app = spawn_app_on_file(&path, &[("ENCRYPTION_KEY", GO_KEY_HEX)]).await;

    // Startup adopts the file: every row and table definition as the Go service left it.
    let after_start = dump_all(&path).await;
    assert_same_rows(&before, &after_start, "startup");
    assert_schema_migrations_kept(&migrations(&path).await, &go_applied_at);

    let health = app.admin_get("/admin/health").await;
    assert_eq!(
        health.body,
        json!({ "pool_size": 7, "encryption": true, "warnings": [], "unreadable_keys": 0,
                "key_states": super::health::key_states(6, 1) }),
        "{}",
        health.text
    );

    // Tiers, by name; the stored window 0 reads as 60.
    let tiers = app.admin_get("/admin/tiers").await;
    assert_eq!(tiers.status, StatusCode::OK, "{}", tiers.text);
    assert_eq!(
        tiers.body,
        json!([
            { "id": TIER_BUDGET, "name": "budget", "description": "Monthly budgets",
              "features": { "budget_feature": { "rate_limit": 100, "window_seconds": 3600 } },
              "upstream": null },
            { "id": TIER_FIRECRAWL, "name": "firecrawl", "description": "Firecrawl pooled free-tier accounts",
              "features": {
                  "firecrawl_scrape": { "rate_limit": 100, "window_seconds": 60 },
                  "firecrawl_search": { "rate_limit": 5, "window_seconds": 60 } },
              "upstream": null },
            { "id": TIER_VAULT, "name": "vault", "description": "",
              "features": { "vault_feature": { "rate_limit": 10, "window_seconds": 60 } },
              "upstream": null },
        ])
    );

    // The consumer's Go-issued token draws decrypted values, secrets and metadata; the expired
    // and the inactive key are never served.
    let mut served = BTreeSet::new();
    let mut ok = 0;
    for _ in 0..8 {
        let r = app.draw("firecrawl_scrape", CONSUMER_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        ok += 1;
        let id = r.body["key_id"].as_str().expect("key_id").to_string();
        // Issue 9: every serve answers its audit row's id (a UUID), compared apart.
        let mut r = r;
        let serve_id = r.body.as_object_mut().and_then(|b| b.remove("serve_id"));
        assert!(
            serve_id
                .as_ref()
                .and_then(|s| s.as_str())
                .is_some_and(|s| uuid::Uuid::try_parse(s).is_ok()),
            "{}",
            r.text
        );
        match id.as_str() {
            KEY_PLAIN => assert_eq!(
                r.body,
                json!({ "key_id": KEY_PLAIN, "value": PLAIN_VALUE,
                        "metadata": { "account": "plain@example.com", "plan": "free", "credits": 500 },
                        "secrets": { "webhook_secret": PLAIN_SECRET } })
            ),
            KEY_ENC => assert_eq!(
                r.body,
                json!({ "key_id": KEY_ENC, "value": ENC_VALUE_PLAIN,
                        "metadata": { "account": "enc@example.com", "nested": { "region": "eu" } },
                        "secrets": { "webhook_secret": ENC_SECRET_PLAIN } })
            ),
            other => panic!(
                "served {other}, which is expired, inactive or not in the tier: {}",
                r.text
            ),
        }
        served.insert(id);
    }
    assert_eq!(
        served,
        BTreeSet::from([KEY_PLAIN.to_string(), KEY_ENC.to_string()]),
        "rotation reaches both"
    );

    // The admin draws the vault key (the consumer is not scoped to it).
    let vault = app.draw("vault_feature", ADMIN_TOKEN).await;
    assert_eq!(vault.status, StatusCode::OK, "{}", vault.text);
    ok += 1;
    assert_eq!(
        vault.body,
        json!({ "key_id": KEY_VAULT, "serve_id": vault.body["serve_id"].clone(), "value": ENC_VAULT_PLAIN, "metadata": {}, "secrets": {} })
    );
    assert!(vault.body["serve_id"].is_string(), "{}", vault.text);
    let out_of_scope = app.draw("vault_feature", CONSUMER_TOKEN).await;
    assert_eq!(
        out_of_scope.status,
        StatusCode::FORBIDDEN,
        "{}",
        out_of_scope.text
    );

    // The deactivated Go consumer is refused.
    let inactive = app.draw("firecrawl_scrape", INACTIVE_TOKEN).await;
    assert_eq!(
        inactive.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        inactive.text
    );

    // The partially spent monthly key (3 of 5) serves twice more, then 429 with Retry-After;
    // the spent lifetime key (10 of 10) is skipped throughout.
    for _ in 0..2 {
        let r = app.draw("budget_feature", CONSUMER_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["key_id"], KEY_BUDGET);
        assert_eq!(r.body["value"], BUDGET_VALUE);
        assert_eq!(r.body["metadata"], json!({ "owner": "ops" }));
        ok += 1;
    }
    let capped = app.draw("budget_feature", CONSUMER_TOKEN).await;
    assert_eq!(
        capped.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        capped.text
    );
    assert!(!capped.error().is_empty());
    let retry: u64 = capped
        .headers
        .get("retry-after")
        .expect("Retry-After: the monthly window frees the key")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    let remaining =
        (fixture.budget_window_start + TimeDelta::seconds(2_592_000) - Utc::now()).num_seconds();
    assert!(
        retry > 0 && (retry as i64 - remaining).abs() <= 5,
        "Retry-After {retry}s ≈ the rest of the Go window ({remaining}s)"
    );
    let admin_capped = app.draw("budget_feature", ADMIN_TOKEN).await;
    assert_eq!(
        admin_capped.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the cap holds for the admin too"
    );

    // /admin/keys: every key, correct counters and times in RFC 3339, never a value.
    let keys = app.admin_get("/admin/keys").await;
    assert_eq!(keys.status, StatusCode::OK, "{}", keys.text);
    assert_no_values(&keys.text);
    let listed: HashSet<&str> = keys
        .body
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(
        listed,
        HashSet::from([
            KEY_PLAIN,
            KEY_ENC,
            KEY_EXPIRED,
            KEY_DISABLED,
            KEY_BUDGET,
            KEY_SPENT,
            KEY_VAULT
        ])
    );
    for k in keys.body.as_array().expect("array") {
        assert_eq!(
            k["readable"],
            json!(true),
            "every key decrypts with the Go key: {k}"
        );
        assert!(k.get("error").is_none(), "{k}");
        for field in ["value", "key", "key_value", "secrets", "token"] {
            assert!(k.get(field).is_none(), "{field} must not be listed: {k}");
        }
    }
    let plain = key_by_id(&keys.body, KEY_PLAIN);
    assert_eq!(plain["expires_at"], "2099-01-02T03:04:05Z");
    assert_eq!(plain["usage_limit"], Value::Null);
    assert_eq!(plain["secret_names"], json!(["webhook_secret"]));
    assert_eq!(
        plain["metadata"],
        json!({ "account": "plain@example.com", "plan": "free", "credits": 500 })
    );
    assert_eq!(plain["tier_id"], TIER_FIRECRAWL);
    let enc = key_by_id(&keys.body, KEY_ENC);
    assert_eq!(
        parse_api_time(&enc["expires_at"]),
        DateTime::parse_from_rfc3339("2099-01-02T03:04:05.123456789Z")
            .expect("instant")
            .with_timezone(&Utc)
    );
    assert_eq!(enc["secret_names"], json!(["webhook_secret"]));
    let expired = key_by_id(&keys.body, KEY_EXPIRED);
    assert_eq!(
        parse_api_time(&expired["expires_at"]),
        DateTime::parse_from_rfc3339("2021-06-01T19:00:00.5Z")
            .expect("instant")
            .with_timezone(&Utc)
    );
    assert_eq!(
        expired["usage_count"], 0,
        "the expired key was never served"
    );
    let disabled = key_by_id(&keys.body, KEY_DISABLED);
    assert_eq!(disabled["is_active"], json!(false));
    assert_eq!(
        disabled["usage_count"], 2,
        "the inactive key was never served"
    );
    assert_eq!(disabled["expires_at"], Value::Null);
    let budget = key_by_id(&keys.body, KEY_BUDGET);
    assert_eq!(budget["usage_limit"], 5);
    assert_eq!(budget["usage_count"], 5, "3 spent under Go + 2 here");
    assert_eq!(budget["usage_window_seconds"], 2_592_000);
    let start = parse_api_time(&budget["usage_window_start"]);
    assert!(
        (start - fixture.budget_window_start)
            .num_milliseconds()
            .abs()
            < 1,
        "the Go window start is kept: {start} vs {}",
        fixture.budget_window_start
    );
    let spent = key_by_id(&keys.body, KEY_SPENT);
    assert_eq!(
        (spent["usage_limit"].clone(), spent["usage_count"].clone()),
        (json!(10), json!(10))
    );
    let plain_and_enc: i64 = [plain, enc]
        .iter()
        .map(|k| k["usage_count"].as_i64().expect("count"))
        .sum();
    assert_eq!(
        plain_and_enc,
        17 + 4 + 8,
        "the Go counts plus this run's serves"
    );

    // The database agrees with the listing.
    let db = open_db(&path).await;
    let budget_count: i64 = sqlx::query_scalar("SELECT usage_count FROM keys WHERE id = ?")
        .bind(KEY_BUDGET)
        .fetch_one(&db)
        .await
        .expect("budget count");
    assert_eq!(budget_count, 5);
    db.close().await;

    // /admin/consumers: scopes by tier name, never a token or hash.
    let consumers = app.admin_get("/admin/consumers").await;
    assert_eq!(consumers.status, StatusCode::OK, "{}", consumers.text);
    assert_no_values(&consumers.text);
    assert_eq!(
        consumers.body,
        json!([
            { "id": INACTIVE_CONSUMER_ID, "name": "retired-runner", "description": "", "is_active": false,
              "scopes": ["firecrawl"] },
            { "id": CONSUMER_ID, "name": "siphon-runner", "description": "firecrawl via rotation", "is_active": true,
              "scopes": ["budget", "firecrawl"] },
        ])
    );

    // /admin/usage: this run's serves first, then the Go rows, all RFC 3339.
    let usage = app.admin_get("/admin/usage?limit=1000").await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.text);
    let rows = usage.body.as_array().expect("usage array");
    assert_eq!(
        rows.len(),
        GO_USAGE.len() + ok,
        "old rows kept, one new row per 200"
    );
    // (The order among the Go rows themselves has its own test below.)
    let times: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|r| parse_api_time(&r["created_at"]))
        .collect();
    assert!(
        times[..ok].windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert!(
        times[ok..].iter().all(|old| *old < times[ok - 1]),
        "this run's rows before the Go rows: {times:?}"
    );
    let new_rows = &rows[..ok];
    assert!(
        new_rows
            .iter()
            .all(|r| !GO_USAGE.iter().any(|g| r["id"] == g.0)),
        "new rows come first"
    );
    let by_consumer = new_rows
        .iter()
        .filter(|r| r["consumer_id"] == CONSUMER_ID)
        .count();
    assert_eq!(
        by_consumer,
        ok - 1,
        "every consumer serve audited under the Go consumer's id"
    );
    assert!(new_rows
        .iter()
        .any(|r| r["consumer_id"] == "admin" && r["key_id"] == KEY_VAULT));
    let old_ids: BTreeSet<&str> = rows[ok..].iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(
        old_ids,
        GO_USAGE.iter().map(|g| g.0).collect::<BTreeSet<_>>()
    );

    app.stop().await;

    // After serving: only counters moved; everything else is the Go data, byte for byte.
    let after = dump_all(&path).await;
    for table in [
        "tiers",
        "tier_features",
        "key_secrets",
        "consumers",
        "consumer_scopes",
    ] {
        assert_eq!(after[table], before[table], "{table} changed");
        let schema = format!("{table}#schema");
        assert_eq!(after[&schema], before[&schema], "{table} was redefined");
    }
    assert_eq!(after["keys#schema"], before["keys#schema"]);
    assert_eq!(
        key_identities(&path).await,
        key_ids_before,
        "key values, names, limits and times kept"
    );
    assert_eq!(
        count(&path, "usage_events").await,
        (GO_USAGE.len() + ok) as i64
    );
}

// Issue 10 item 3: rows list in insertion order, newest first (what cursor paging needs: a new
// row never lands behind a page already read); the time filters compare instants, whatever
// form a Go row stored its time in.
#[tokio::test]
async fn go_usage_rows_list_newest_first_in_rfc3339_whatever_form_they_were_stored_in() {
    let (_dir, path, _) = go_database().await;
    let mut app = spawn_app_on_file(&path, &[("ENCRYPTION_KEY", GO_KEY_HEX)]).await;
    let usage = app.admin_get("/admin/usage").await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.text);
    let rows = usage.body.as_array().expect("usage array");
    assert_eq!(rows.len(), GO_USAGE.len());
    let expected: Vec<_> = GO_USAGE.iter().rev().collect();
    let got: Vec<(&str, DateTime<Utc>)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("id"),
                parse_api_time(&r["created_at"]),
            )
        })
        .collect();
    let want: Vec<(&str, DateTime<Utc>)> = expected
        .iter()
        .map(|g| {
            (
                g.0,
                DateTime::parse_from_rfc3339(g.5)
                    .expect("instant")
                    .with_timezone(&Utc),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "Go rows newest recorded first, each time read as its instant"
    );
    // 10:00–11:00 UTC holds 10:30Z, 11:00 (CURRENT_TIMESTAMP form) and 12:15:30.25+02:00.
    let window = app
        .admin_get("/admin/usage?since=2025-06-01T10:00:00Z&until=2025-06-01T11:00:00Z")
        .await;
    let ids: Vec<&str> = window
        .body
        .as_array()
        .expect("usage array")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        ids,
        [GO_USAGE[3].0, GO_USAGE[2].0, GO_USAGE[1].0],
        "{}",
        window.text
    );
    for (row, g) in rows.iter().zip(&expected) {
        assert_eq!(row["key_id"], g.1);
        assert_eq!(row["consumer_id"], g.2);
        assert_eq!(row["feature"], g.3);
    }
    app.stop().await;
}

#[tokio::test]
async fn go_database_without_the_encryption_key_starts_and_never_serves_sealed_keys() {
    let (_dir, path, _) = go_database().await;
    let before = dump_all(&path).await;
    let mut app = spawn_app_on_file(&path, &[]).await;
    assert_same_rows(
        &before,
        &dump_all(&path).await,
        "startup without ENCRYPTION_KEY",
    );

    let health = app.admin_get("/admin/health").await;
    assert_eq!(
        health.body,
        json!({ "pool_size": 7, "encryption": false, "warnings": [], "unreadable_keys": 2,
                "key_states": super::health::key_states(6, 1) }),
        "{}",
        health.text
    );

    // Only the plaintext key serves; the sealed one is never served, not even as ciphertext.
    for _ in 0..8 {
        let r = app.draw("firecrawl_scrape", CONSUMER_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["key_id"], KEY_PLAIN, "{}", r.text);
        assert_eq!(r.body["value"], PLAIN_VALUE);
        assert_eq!(r.body["secrets"], json!({ "webhook_secret": PLAIN_SECRET }));
        assert!(!r.text.contains("enc:gcm:"), "{}", r.text);
    }
    // A feature whose only key is sealed: 429 without Retry-After (it will never free up).
    let vault = app.draw("vault_feature", ADMIN_TOKEN).await;
    assert_eq!(
        vault.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        vault.text
    );
    assert!(!vault.error().is_empty());
    assert!(
        vault.headers.get("retry-after").is_none(),
        "{:?}",
        vault.headers
    );
    assert!(!vault.text.contains(&ENC_VAULT[8..]) && !vault.text.contains(ENC_VAULT_PLAIN));

    // The operator sees which keys are unreadable, and why, without their values.
    let keys = app.admin_get("/admin/keys").await;
    assert_eq!(keys.status, StatusCode::OK, "{}", keys.text);
    assert_no_values(&keys.text);
    assert_eq!(keys.body.as_array().expect("array").len(), 7);
    for id in [KEY_ENC, KEY_VAULT] {
        let k = key_by_id(&keys.body, id);
        assert_eq!(k["readable"], json!(false), "{k}");
        let error = k["error"]
            .as_str()
            .unwrap_or_else(|| panic!("an error message for {id}: {k}"));
        assert!(
            error.contains("ENCRYPTION_KEY"),
            "the message names the cause: {error}"
        );
        assert_eq!(
            k["usage_count"],
            if id == KEY_ENC { 4 } else { 0 },
            "never served: {k}"
        );
    }
    for id in [KEY_PLAIN, KEY_EXPIRED, KEY_DISABLED, KEY_BUDGET, KEY_SPENT] {
        let k = key_by_id(&keys.body, id);
        assert_eq!(k["readable"], json!(true), "{k}");
        assert!(k.get("error").is_none(), "{k}");
    }
    app.stop().await;

    // Nothing was rewritten: the sealed values are still the Go ciphertext.
    let db = open_db(&path).await;
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT key_value FROM keys WHERE id IN (?, ?) ORDER BY rowid")
            .bind(KEY_ENC)
            .bind(KEY_VAULT)
            .fetch_all(&db)
            .await
            .expect("stored values");
    assert_eq!(stored, vec![ENC_VALUE.to_string(), ENC_VAULT.to_string()]);
    let secret: String = sqlx::query_scalar("SELECT value FROM key_secrets WHERE key_id = ?")
        .bind(KEY_ENC)
        .fetch_one(&db)
        .await
        .expect("stored secret");
    assert_eq!(secret, ENC_SECRET);
    db.close().await;
}

#[tokio::test]
async fn go_database_survives_two_restarts_without_migrating_again() {
    let (_dir, path, _) = go_database().await;
    let go_applied_at = migrations(&path).await[0].2.clone();
    let env = [("ENCRYPTION_KEY", GO_KEY_HEX)];

    let mut app = spawn_app_on_file(&path, &env).await;
    let first = dump_all(&path).await;
    let first_migrations = migrations(&path).await;
    assert_schema_migrations_kept(&first_migrations, &go_applied_at);
    // One serve of the monthly key (3 → 4 of 5) must survive the restarts.
    let r = app.draw("budget_feature", CONSUMER_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    app.stop().await;
    let after_serve = dump_all(&path).await;
    let counts: Vec<i64> = {
        let mut v = Vec::new();
        for t in GO_TABLES {
            v.push(count(&path, t).await);
        }
        v
    };
    assert_eq!(counts, vec![3, 4, 7, 2, 2, 3, GO_USAGE.len() as i64 + 1]);
    for table in [
        "tiers",
        "tier_features",
        "key_secrets",
        "consumers",
        "consumer_scopes",
    ] {
        assert_eq!(after_serve[table], first[table], "{table}");
    }

    for round in 1..=2 {
        let mut app = spawn_app_on_file(&path, &env).await;
        let now = dump_all(&path).await;
        assert_same_rows(&after_serve, &now, &format!("restart {round}"));
        assert_eq!(
            migrations(&path).await,
            first_migrations,
            "restart {round} recorded no migration again"
        );
        let keys = app.admin_get("/admin/keys").await;
        assert_eq!(
            key_by_id(&keys.body, KEY_BUDGET)["usage_count"],
            4,
            "restart {round}: {}",
            keys.text
        );
        let health = app.admin_get("/admin/health").await;
        assert_eq!(health.body["pool_size"], 7);
        app.stop().await;
        assert_same_rows(
            &after_serve,
            &dump_all(&path).await,
            &format!("stop {round}"),
        );
    }

    // The budget still holds across the restarts: one serve left, then 429.
    let mut app = spawn_app_on_file(&path, &env).await;
    assert_eq!(
        app.draw("budget_feature", CONSUMER_TOKEN).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.draw("budget_feature", CONSUMER_TOKEN).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    app.stop().await;
}

async fn stored_key_value(db: &SqlitePool, id: &str) -> String {
    sqlx::query_scalar("SELECT key_value FROM keys WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("stored key value")
}

#[tokio::test]
async fn values_we_seal_are_the_go_format_and_open_with_plain_aes_gcm() {
    let app = spawn_app_with(&[("ENCRYPTION_KEY", GO_KEY_HEX)]).await;
    app.create_tier("sealed", &[("seal_feature", 10, 60)]).await;
    let value = "fc-written-by-rust-0007";
    let secret = "whsec_written_by_rust";
    let first = app
        .add_key(json!({ "name": "rust-1", "key": value, "tier": "sealed", "secrets": { "webhook_secret": secret } }))
        .await;
    let second = app
        .add_key(json!({ "name": "rust-2", "key": value, "tier": "sealed" }))
        .await;

    let db = app.db().await;
    let sealed_first = stored_key_value(&db, &first).await;
    let sealed_second = stored_key_value(&db, &second).await;
    let sealed_secret: String =
        sqlx::query_scalar("SELECT value FROM key_secrets WHERE key_id = ? AND name = ?")
            .bind(&first)
            .bind("webhook_secret")
            .fetch_one(&db)
            .await
            .expect("stored secret");
    db.close().await;

    let key: [u8; 32] = hex::decode(GO_KEY_HEX)
        .expect("hex key")
        .try_into()
        .expect("32 bytes");
    let cipher = Aes256Gcm::new(&key.into());
    let mut nonces = HashSet::new();
    for (sealed, plain) in [
        (&sealed_first, value),
        (&sealed_second, value),
        (&sealed_secret, secret),
    ] {
        let body = sealed
            .strip_prefix("enc:gcm:")
            .unwrap_or_else(|| panic!("tagged: {sealed}"));
        assert!(
            body.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "lowercase hex: {sealed}"
        );
        // nonce (12) ‖ ciphertext (same length as the plaintext) ‖ tag (16)
        assert_eq!(body.len(), 2 * (12 + plain.len() + 16), "{sealed}");
        let raw = hex::decode(body).expect("hex");
        let (nonce, ciphertext_and_tag) = raw.split_at(12);
        assert!(nonces.insert(nonce.to_vec()), "a fresh nonce per value");
        let opened = cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext_and_tag)
            .expect("opens with AES-256-GCM, no associated data");
        assert_eq!(opened, plain.as_bytes());
        assert!(!sealed.contains(plain));
    }
    assert_ne!(
        sealed_first, sealed_second,
        "same plaintext, different ciphertext"
    );

    // And the service serves what it sealed.
    let r = app.draw("seal_feature", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["value"], value);
}

// ---------------------------------------------------------------------------------------------
// Go rows the review found mishandled (issue 7).
// ---------------------------------------------------------------------------------------------

/// An empty Go database (schema and `schema_migrations` only) in a temp dir, open for rows.
async fn empty_go_database() -> (tempfile::TempDir, PathBuf, SqlitePool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pool.db");
    let db = go_schema(&path).await;
    sqlx::raw_sql(
        "INSERT INTO tiers (id, name) VALUES ('t1', 'go-tier');
         INSERT INTO tier_features (tier_id, feature, rate_limit, window_seconds) VALUES ('t1', 'scrape', 100, 60);",
    )
    .execute(&db)
    .await
    .expect("Go tier");
    (dir, path, db)
}

// Issue 7 item 7: a windowed budget at its limit whose `usage_window_start` is NULL or
// unreadable was refused forever (429 without Retry-After). The Go service opened the window
// at the first serve, so such a key serves again in a fresh window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_windowed_budget_without_a_readable_window_start_is_a_fresh_window() {
    let (_dir, path, db) = empty_go_database().await;
    sqlx::raw_sql(
        "INSERT INTO keys (id, name, key_value, tier_id, usage_limit, usage_count, usage_window_seconds, usage_window_start)
         VALUES ('k-null', 'null-start', 'v-null', 't1', 2, 2, 3600, NULL),
                ('k-junk', 'junk-start', 'v-junk', 't1', 2, 2, 3600, 'not a time');",
    )
    .execute(&db)
    .await
    .expect("Go keys");
    db.close().await;
    let app = spawn_app_on_file(&path, &[]).await;
    for _ in 0..4 {
        let r = app.draw("scrape", ADMIN_TOKEN).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = app.draw("scrape", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    let retry: u64 = r.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry > 3500 && retry <= 3600, "{retry}");
    let rows = app
        .rows("SELECT usage_count, usage_window_start IS NOT NULL FROM keys ORDER BY id")
        .await;
    let fresh = vec![Some("2".to_string()), Some("1".to_string())];
    assert_eq!(rows, vec![fresh.clone(), fresh]);
}

// Issue 7 item 2: a consumer whose stored token hash is unreadable must match no token. It
// used to get the stand-in hash sha256("unreadable-hash:<id>"), so that bearer token — built
// from the consumer's id, which is not secret — authenticated as the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_consumer_with_an_unreadable_token_hash_matches_no_token() {
    let (_dir, path, db) = empty_go_database().await;
    sqlx::raw_sql(
        "INSERT INTO keys (id, name, key_value, tier_id) VALUES ('k1', 'k', 'v', 't1');
         INSERT INTO consumers (id, name, token_hash) VALUES ('c-broken', 'broken', 'zz-not-hex');
         INSERT INTO consumer_scopes (consumer_id, tier_id) VALUES ('c-broken', 't1');",
    )
    .execute(&db)
    .await
    .expect("Go consumer");
    db.close().await;
    let app = spawn_app_on_file(&path, &[]).await;
    for token in ["unreadable-hash:c-broken", "zz-not-hex"] {
        let r = app.draw("scrape", token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token}: {}", r.text);
    }
    let listed = app.admin_get("/admin/consumers").await;
    assert_eq!(listed.body[0]["id"], "c-broken", "{}", listed.text);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM usage_events").await,
        0,
        "nothing served"
    );
}

// Issue 10 items 5 and 6: Go-era keys get their keyed value hash at startup (from the values
// the pool decrypted), so importing a Go-era value again finds it; rotating away from the Go
// key and re-sealing keeps every Go value readable.
#[tokio::test]
async fn go_keys_get_value_hashes_and_survive_a_key_rotation() {
    let (_dir, path, _) = go_database().await;
    let mut go_key = [0u8; 32];
    hex::decode_to_slice(GO_KEY_HEX, &mut go_key).expect("hex");
    let mut app = spawn_app_on_file(&path, &[("ENCRYPTION_KEY", GO_KEY_HEX)]).await;
    let sealer = keypooler::crypto::Sealer::new(Some(go_key));
    let hash = |v: &str| sealer.value_hash(&keypooler::secret::Secret::new(v));
    let stored: BTreeMap<String, Option<String>> = app
        .rows("SELECT id, value_hash FROM keys")
        .await
        .into_iter()
        .map(|r| (r[0].clone().expect("id"), r[1].clone()))
        .collect();
    for (id, plain) in [
        (KEY_PLAIN, PLAIN_VALUE),
        (KEY_ENC, ENC_VALUE_PLAIN),
        (KEY_VAULT, ENC_VAULT_PLAIN),
        (KEY_SPENT, SPENT_VALUE),
    ] {
        assert_eq!(stored[id], Some(hash(plain)), "hash of {id}");
    }
    let import = app
        .admin_post(
            "/admin/keys/import",
            json!({ "tier": "firecrawl", "keys": [{ "name": "again", "key": ENC_VALUE_PLAIN }] }),
        )
        .await;
    assert_eq!(import.status, StatusCode::OK, "{}", import.text);
    assert_eq!(import.body["results"][0]["status"], "existing");
    assert_eq!(import.body["results"][0]["id"], KEY_ENC);

    // Rotate: a new key, the Go key as previous; rekey; then the new key alone.
    let new_key = "5a".repeat(32);
    app.env.push(("ENCRYPTION_KEY".into(), new_key.clone()));
    app.env
        .push(("ENCRYPTION_KEY_PREVIOUS".into(), GO_KEY_HEX.to_string()));
    app.restart().await;
    let rekey = app.admin_post("/admin/rekey", json!(null)).await;
    assert_eq!(rekey.status, StatusCode::OK, "{}", rekey.text);
    assert_eq!(rekey.body["unreadable"], 0, "{}", rekey.text);
    app.env.retain(|(k, _)| k != "ENCRYPTION_KEY_PREVIOUS");
    app.restart().await;
    assert_eq!(
        app.admin_get("/admin/health").await.body["unreadable_keys"],
        0
    );
    let r = app.draw("vault_feature", ADMIN_TOKEN).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["value"], ENC_VAULT_PLAIN);
    app.stop().await;
}
