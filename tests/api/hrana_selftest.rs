//! Self-tests for the in-process Hrana server (`hrana.rs`), driven by the real
//! `libsql` remote client, so the fake is known to speak what the client expects.
//!
//! Client behaviour these tests pin down (libsql 0.9):
//! - every `query`/`prepare` sends a `describe` and then uses `POST /v3/cursor`;
//!   `execute`/`execute_batch` use `POST /v3/pipeline` and close the stream
//!   unless a transaction is open;
//! - on an expired stream the client does NOT retry: the call fails with
//!   `Hrana: ... api error: status=400 Bad Request, body={..."STREAM_EXPIRED"}`,
//!   and the connection keeps the stale baton, so later calls fail the same way
//!   until `Connection::reset()` is called or a new connection is made.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libsql::{named_params, params, Builder, Connection, Database, Value, ValueType};

use super::hrana::HranaServer;

fn db_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("hrana.db")
}

async fn open(url: &str, token: &str) -> (Database, Connection) {
    let db = Builder::new_remote(url.to_owned(), token.to_owned())
        .build()
        .await
        .expect("build remote database");
    let conn = db.connect().expect("connect");
    (db, conn)
}

async fn count(conn: &Connection, table: &str) -> i64 {
    let mut rows = conn
        .query(&format!("SELECT COUNT(*) FROM {table}"), ())
        .await
        .expect("count query");
    let row = rows.next().await.expect("count row").expect("one row");
    row.get::<i64>(0).expect("integer count")
}

async fn started(path: &Path, token: Option<&str>) -> HranaServer {
    HranaServer::start(path, token).await
}

#[tokio::test]
async fn values_round_trip_with_positional_and_named_params() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), None).await;
    let (_db, conn) = open(&server.url(), "").await;

    conn.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, note TEXT, data BLOB, price REAL)",
        (),
    )
    .await
    .expect("create table");

    let inserted = conn
        .execute(
            "INSERT INTO items (name, qty, note, data, price) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                "widget ✓",
                42i64,
                Value::Null,
                vec![0u8, 1, 254, 255],
                2.5f64
            ],
        )
        .await
        .expect("positional insert");
    assert_eq!(inserted, 1);
    assert_eq!(conn.last_insert_rowid(), 1);

    conn.execute(
        "INSERT INTO items (name, qty) VALUES (:name, :qty)",
        named_params! { ":name": "gadget", ":qty": i64::MAX },
    )
    .await
    .expect("named insert");
    assert_eq!(conn.last_insert_rowid(), 2);

    let mut rows = conn
        .query(
            "SELECT id, name, qty, note, data, price FROM items ORDER BY id",
            (),
        )
        .await
        .expect("select");
    assert_eq!(rows.column_count(), 6);
    assert_eq!(rows.column_name(1), Some("name"));

    let row = rows.next().await.expect("row 1").expect("row 1 present");
    assert_eq!(row.get_value(0).expect("id"), Value::Integer(1));
    assert_eq!(
        row.get_value(1).expect("name"),
        Value::Text("widget ✓".into())
    );
    assert_eq!(row.get_value(2).expect("qty"), Value::Integer(42));
    assert_eq!(row.get_value(3).expect("note"), Value::Null);
    assert_eq!(
        row.get_value(4).expect("data"),
        Value::Blob(vec![0, 1, 254, 255])
    );
    assert_eq!(row.get_value(5).expect("price"), Value::Real(2.5));
    assert!(matches!(row.column_type(3), Ok(ValueType::Null)));
    assert!(matches!(row.column_type(4), Ok(ValueType::Blob)));
    assert_eq!(row.get::<String>(1).expect("typed text"), "widget ✓");

    let row = rows.next().await.expect("row 2").expect("row 2 present");
    assert_eq!(row.get_value(2).expect("qty"), Value::Integer(i64::MAX));
    assert_eq!(row.get_value(4).expect("data"), Value::Null);
    assert!(rows.next().await.expect("end").is_none());

    // A prepared statement is described first; its columns come from `describe`.
    let stmt = conn
        .prepare("SELECT name AS label, qty FROM items WHERE id = ?")
        .await
        .expect("prepare");
    let names: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    assert_eq!(names, ["label", "qty"]);
    let mut rows = stmt.query([2]).await.expect("prepared query");
    let row = rows.next().await.expect("row").expect("row present");
    assert_eq!(row.get::<String>(0).expect("label"), "gadget");

    let updated = conn
        .execute("UPDATE items SET qty = qty + 1 WHERE qty < 100", ())
        .await
        .expect("update");
    assert_eq!(updated, 1);
    // DDL does not report the previous statement's change count.
    let created = conn
        .execute("CREATE INDEX items_name ON items (name)", ())
        .await
        .expect("index");
    assert_eq!(created, 0);

    let err = conn
        .execute("INSERT INTO items (id, name) VALUES (1, 'dup')", ())
        .await
        .expect_err("duplicate primary key");
    let msg = err.to_string();
    assert!(
        msg.contains("UNIQUE constraint failed") && msg.contains("SQLITE_CONSTRAINT_PRIMARYKEY"),
        "{msg}"
    );

    let err = conn
        .execute("INSERT INTO items (name) VALUES (?)", params!["a", "b"])
        .await
        .expect_err("too many arguments");
    assert!(err.to_string().contains("ARGS_INVALID"), "{err}");
    assert_eq!(count(&conn, "items").await, 2);
}

#[tokio::test]
async fn execute_batch_runs_statements_in_order_and_stops_at_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), None).await;
    let (_db, conn) = open(&server.url(), "").await;

    conn.execute_batch(
        "CREATE TABLE log (id INTEGER PRIMARY KEY, msg TEXT NOT NULL);
         INSERT INTO log (msg) VALUES ('a');
         INSERT INTO log (msg) VALUES ('b');
         INSERT INTO log (msg) VALUES ('c');",
    )
    .await
    .expect("batch");
    assert_eq!(count(&conn, "log").await, 3);

    // Each step is conditioned on the previous one: 'd' lands, 'e' is skipped.
    let err = conn
        .execute_batch(
            "INSERT INTO log (msg) VALUES ('d');
             INSERT INTO log (msg) VALUES (NULL);
             INSERT INTO log (msg) VALUES ('e');",
        )
        .await
        .expect_err("NOT NULL violation");
    assert!(
        err.to_string().contains("NOT NULL constraint failed"),
        "{err}"
    );
    assert_eq!(count(&conn, "log").await, 4);

    // The transactional variant (BEGIN, steps, COMMIT, ROLLBACK via `not ok`) is all-or-nothing.
    conn.execute_transactional_batch(
        "INSERT INTO log (msg) VALUES ('f'); INSERT INTO log (msg) VALUES (NULL);",
    )
    .await
    .expect_err("rolled back");
    assert_eq!(count(&conn, "log").await, 4);
    conn.execute_transactional_batch(
        "INSERT INTO log (msg) VALUES ('g'); INSERT INTO log (msg) VALUES ('h');",
    )
    .await
    .expect("committed");
    assert_eq!(count(&conn, "log").await, 6);
    assert!(conn.is_autocommit());
}

#[tokio::test]
async fn interactive_transactions_commit_and_roll_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), None).await;
    let (_db, conn) = open(&server.url(), "").await;
    let (_db2, other) = open(&server.url(), "").await;
    conn.execute(
        "CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)",
        (),
    )
    .await
    .expect("create");

    let tx = conn.transaction().await.expect("begin");
    tx.execute("INSERT INTO acct (bal) VALUES (?)", [100])
        .await
        .expect("insert 1");
    tx.execute("INSERT INTO acct (bal) VALUES (?)", [200])
        .await
        .expect("insert 2");
    assert_eq!(
        count(&tx, "acct").await,
        2,
        "the transaction sees its own writes"
    );
    assert_eq!(
        count(&other, "acct").await,
        0,
        "others do not see uncommitted rows"
    );
    tx.commit().await.expect("commit");
    assert_eq!(count(&other, "acct").await, 2);

    let tx = conn.transaction().await.expect("begin 2");
    tx.execute("DELETE FROM acct", ()).await.expect("delete");
    assert_eq!(count(&tx, "acct").await, 0);
    tx.rollback().await.expect("rollback");
    assert_eq!(count(&other, "acct").await, 2);

    // Plain BEGIN/COMMIT on the connection keeps one stream (one SQLite connection) open across requests.
    conn.execute("BEGIN", ()).await.expect("BEGIN");
    assert!(!conn.is_autocommit());
    conn.execute("INSERT INTO acct (bal) VALUES (300)", ())
        .await
        .expect("insert in BEGIN");
    assert_eq!(count(&other, "acct").await, 2);
    conn.execute("COMMIT", ()).await.expect("COMMIT");
    assert!(conn.is_autocommit());
    assert_eq!(count(&other, "acct").await, 3);
}

#[tokio::test]
async fn bearer_token_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), Some("s3cret")).await;

    for wrong in ["wrong", ""] {
        let (_db, conn) = open(&server.url(), wrong).await;
        let err = conn
            .execute("SELECT 1", ())
            .await
            .expect_err("must be rejected");
        assert!(err.to_string().contains("401"), "{err}");
    }

    let (_db, conn) = open(&server.url(), "s3cret").await;
    conn.execute("CREATE TABLE ok (x INTEGER)", ())
        .await
        .expect("authorized");
}

#[tokio::test]
async fn idle_streams_expire_and_the_client_surfaces_stream_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), None).await;
    server.set_stream_idle_timeout(Duration::from_millis(500));
    let (db, conn) = open(&server.url(), "").await;
    conn.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY)", ())
        .await
        .expect("create");

    // An interactive transaction left idle: the server drops it (rolling it back).
    let tx = conn.transaction().await.expect("begin");
    tx.execute("INSERT INTO ev DEFAULT VALUES", ())
        .await
        .expect("insert");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = tx
        .execute("INSERT INTO ev DEFAULT VALUES", ())
        .await
        .expect_err("stream expired");
    let msg = err.to_string();
    assert!(
        msg.contains("STREAM_EXPIRED") && msg.contains("400"),
        "{msg}"
    );
    tx.commit()
        .await
        .expect_err("commit on an expired stream fails too");

    let fresh = db.connect().expect("fresh connection");
    assert_eq!(
        count(&fresh, "ev").await,
        0,
        "the expired transaction was rolled back"
    );

    // `query` leaves the connection's own stream open (describe + cursor keep the baton).
    assert_eq!(count(&conn, "ev").await, 0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = conn
        .execute("INSERT INTO ev DEFAULT VALUES", ())
        .await
        .expect_err("expired");
    assert!(err.to_string().contains("STREAM_EXPIRED"), "{err}");
    // No retry and no recovery: the stale baton is kept ...
    let err = conn
        .execute("INSERT INTO ev DEFAULT VALUES", ())
        .await
        .expect_err("still expired");
    assert!(err.to_string().contains("STREAM_EXPIRED"), "{err}");
    // ... until the connection is reset.
    conn.reset().await;
    conn.execute("INSERT INTO ev DEFAULT VALUES", ())
        .await
        .expect("works after reset");
    // (`fresh` ran a query above, so its own stream has expired by now as well.)
    let another = db.connect().expect("another connection");
    assert_eq!(count(&another, "ev").await, 1);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_serves_the_same_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = started(&db_file(&dir), None).await;
    let url = server.url();
    let (_db, conn) = open(&url, "").await;
    conn.execute("CREATE TABLE s (v TEXT)", ())
        .await
        .expect("create");
    conn.execute("INSERT INTO s VALUES ('before')", ())
        .await
        .expect("insert");

    server.stop().await;
    let err = conn
        .execute("INSERT INTO s VALUES ('during')", ())
        .await
        .expect_err("server is down");
    assert!(err.to_string().to_lowercase().contains("connect"), "{err}");
    let (_db2, fresh) = open(&url, "").await;
    fresh.execute("SELECT 1", ()).await.expect_err("still down");

    server.restart().await;
    assert_eq!(server.url(), url, "same port after restart");
    let (_db3, again) = open(&url, "").await;
    assert_eq!(count(&again, "s").await, 1, "same file after restart");
    again
        .execute("INSERT INTO s VALUES ('after')", ())
        .await
        .expect("insert after restart");
    // The old connection had no open stream, so it simply works again.
    conn.execute("INSERT INTO s VALUES ('old conn')", ())
        .await
        .expect("old connection");
    assert_eq!(count(&again, "s").await, 3);
}

#[tokio::test]
async fn injected_delay_slows_every_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = started(&db_file(&dir), None).await;
    let (_db, conn) = open(&server.url(), "").await;

    server.set_delay(Duration::from_millis(400));
    let started_at = Instant::now();
    conn.execute("SELECT 1", ()).await.expect("slow select");
    assert!(started_at.elapsed() >= Duration::from_millis(400));
    let timed_out =
        tokio::time::timeout(Duration::from_millis(100), conn.execute("SELECT 1", ())).await;
    assert!(timed_out.is_err(), "a client-side timeout fires first");

    server.set_delay(Duration::ZERO);
    let started_at = Instant::now();
    conn.execute("SELECT 1", ()).await.expect("fast select");
    assert!(started_at.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn file_is_shared_with_sqlx_on_the_same_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = db_file(&dir);
    let server = started(&path, None).await;
    let (_db, conn) = open(&server.url(), "").await;
    conn.execute("CREATE TABLE shared (v TEXT)", ())
        .await
        .expect("create");
    conn.execute("INSERT INTO shared VALUES ('from hrana')", ())
        .await
        .expect("insert");

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("sqlx pool");
    let v: String = sqlx::query_scalar("SELECT v FROM shared")
        .fetch_one(&pool)
        .await
        .expect("sqlx read");
    assert_eq!(v, "from hrana");
    let sqlx_version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&pool)
        .await
        .expect("sqlx version");
    pool.close().await;

    let mut rows = conn
        .query("SELECT sqlite_version()", ())
        .await
        .expect("version");
    let row = rows.next().await.expect("row").expect("row present");
    assert_eq!(row.get::<String>(0).expect("text"), sqlx_version);
}
