//! A small Hrana-over-HTTP server for integration tests.
//!
//! It speaks the JSON flavour of the Hrana 3 protocol (the protocol the `libsql`
//! client crate uses in remote mode) and executes everything on a local SQLite
//! file through `rusqlite`, so tests can drive the service's libSQL driver
//! against a real protocol endpoint without Turso or `sqld`.
//!
//! Served endpoints:
//! - `GET /v2`, `GET /v3`: version probes, always 200.
//! - `POST /v2/pipeline`, `POST /v3/pipeline`: a pipeline of stream requests
//!   (`execute`, `batch`, `sequence`, `describe`, `get_autocommit`, `close`).
//!   `store_sql`/`close_sql` (and `sql_id`) are not implemented: libsql 0.9
//!   never sends them.
//! - `POST /v3/cursor`: a batch whose results come back as newline-separated
//!   JSON cursor entries (the `libsql` crate uses it for every `query`).
//!
//! Every stream owns its own SQLite connection, so an interactive transaction
//! (`BEGIN` ... `COMMIT` over several HTTP requests) behaves as on `sqld`. Each
//! response carries a fresh baton; a baton that is unknown, already used or
//! belongs to a stream idle for longer than the idle timeout (10 s by default)
//! gets HTTP 400 with `{"message": ..., "code": "STREAM_EXPIRED"}`, like `sqld`.
//! Expired streams are dropped, which rolls back their open transaction.
//!
//! SQLite work runs on tokio's blocking pool, never on the async workers.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

// Protocol structures (client -> server). A body that does not parse gets
// HTTP 400 with a `PROTOCOL_ERROR` Hrana error.

#[derive(Deserialize)]
struct PipelineBody {
    baton: Option<String>,
    requests: Vec<StreamReq>,
}

#[derive(Deserialize)]
struct CursorBody {
    baton: Option<String>,
    batch: Batch,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamReq {
    Close,
    Execute { stmt: Stmt },
    Batch { batch: Batch },
    Sequence { sql: String },
    Describe { sql: String },
    GetAutocommit,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Stmt {
    sql: Option<String>,
    args: Vec<Value>,
    named_args: Vec<NamedArg>,
    want_rows: Option<bool>,
}

#[derive(Deserialize)]
struct NamedArg {
    name: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Value {
    Null,
    Integer { value: String },
    Float { value: f64 },
    Text { value: String },
    Blob { base64: String },
}

#[derive(Deserialize)]
struct Batch {
    steps: Vec<BatchStep>,
}

#[derive(Deserialize)]
struct BatchStep {
    condition: Option<Cond>,
    stmt: Stmt,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Cond {
    Ok { step: u32 },
    Error { step: u32 },
    Not { cond: Box<Cond> },
    And { conds: Vec<Cond> },
    Or { conds: Vec<Cond> },
    IsAutocommit,
}

// Protocol structures (server -> client).

#[derive(Serialize)]
struct StmtResult {
    cols: Vec<Col>,
    rows: Vec<Vec<Json>>,
    affected_row_count: u64,
    last_insert_rowid: Option<String>,
}

#[derive(Serialize)]
struct Col {
    name: Option<String>,
    decltype: Option<String>,
}

/// A Hrana `Error` structure: an English message plus a machine-readable code.
#[derive(Debug, Clone)]
struct HranaError {
    message: String,
    code: String,
}

impl HranaError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        HranaError {
            message: message.into(),
            code: code.to_owned(),
        }
    }

    fn to_json(&self) -> Json {
        json!({ "message": self.message, "code": self.code })
    }
}

impl From<rusqlite::Error> for HranaError {
    fn from(err: rusqlite::Error) -> Self {
        let code = match &err {
            rusqlite::Error::SqliteFailure(e, _) => sqlite_code_name(e.extended_code),
            rusqlite::Error::MultipleStatement => "SQL_MANY_STATEMENTS".to_owned(),
            rusqlite::Error::InvalidParameterCount(..)
            | rusqlite::Error::InvalidParameterName(_) => "ARGS_INVALID".to_owned(),
            _ => "SQLITE_UNKNOWN".to_owned(),
        };
        HranaError::new(&code, err.to_string())
    }
}

/// Name of an SQLite result code (extended for the busy and constraint codes tests match on).
fn sqlite_code_name(extended: i32) -> String {
    const PRIMARY: [&str; 27] = [
        "OK",
        "ERROR",
        "INTERNAL",
        "PERM",
        "ABORT",
        "BUSY",
        "LOCKED",
        "NOMEM",
        "READONLY",
        "INTERRUPT",
        "IOERR",
        "CORRUPT",
        "NOTFOUND",
        "FULL",
        "CANTOPEN",
        "PROTOCOL",
        "EMPTY",
        "SCHEMA",
        "TOOBIG",
        "CONSTRAINT",
        "MISMATCH",
        "MISUSE",
        "NOLFS",
        "AUTH",
        "FORMAT",
        "RANGE",
        "NOTADB",
    ];
    let suffix = match extended {
        261 => "_RECOVERY",
        517 => "_SNAPSHOT",
        773 => "_TIMEOUT",
        275 => "_CHECK",
        787 => "_FOREIGNKEY",
        1299 => "_NOTNULL",
        1555 => "_PRIMARYKEY",
        1811 => "_TRIGGER",
        2067 => "_UNIQUE",
        _ => "",
    };
    match PRIMARY.get((extended & 0xff) as usize) {
        Some(primary) => format!("SQLITE_{primary}{suffix}"),
        None => format!("SQLITE_UNKNOWN_{extended}"),
    }
}

impl Value {
    fn to_sql(&self) -> Result<SqlValue, HranaError> {
        let bad = |what: &str| HranaError::new("ARGS_INVALID", what);
        Ok(match self {
            Value::Null => SqlValue::Null,
            Value::Integer { value } => SqlValue::Integer(
                value
                    .parse()
                    .map_err(|_| bad("integer value is not a 64-bit decimal string"))?,
            ),
            Value::Float { value } => SqlValue::Real(*value),
            Value::Text { value } => SqlValue::Text(value.clone()),
            Value::Blob { base64 } => SqlValue::Blob(
                STANDARD_NO_PAD
                    .decode(base64.trim_end_matches('='))
                    .map_err(|_| bad("blob value is not valid base64"))?,
            ),
        })
    }
}

fn value_to_json(v: ValueRef<'_>) -> Json {
    match v {
        ValueRef::Null => json!({ "type": "null" }),
        ValueRef::Integer(i) => json!({ "type": "integer", "value": i.to_string() }),
        // JSON has no representation for NaN/infinity: degrade them to NULL.
        ValueRef::Real(f) if !f.is_finite() => json!({ "type": "null" }),
        ValueRef::Real(f) => json!({ "type": "float", "value": f }),
        ValueRef::Text(t) => json!({ "type": "text", "value": String::from_utf8_lossy(t) }),
        ValueRef::Blob(b) => json!({ "type": "blob", "base64": STANDARD.encode(b) }),
    }
}

// A stream: one SQLite connection. All its methods block.

type StepOutcome = Option<Result<StmtResult, HranaError>>;

struct Stream {
    conn: Connection,
    closed: bool,
}

impl Stream {
    fn open(path: &Path) -> Result<Stream, HranaError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Stream {
            conn,
            closed: false,
        })
    }

    /// Runs every request in order (even after an error) and returns `StreamResult`s.
    fn pipeline(&mut self, requests: Vec<StreamReq>) -> Vec<Json> {
        requests
            .into_iter()
            .map(|req| match self.request(req) {
                Ok(response) => json!({ "type": "ok", "response": response }),
                Err(e) => json!({ "type": "error", "error": e.to_json() }),
            })
            .collect()
    }

    fn request(&mut self, req: StreamReq) -> Result<Json, HranaError> {
        if self.closed {
            return Err(HranaError::new(
                "STREAM_CLOSED",
                "the stream has already been closed",
            ));
        }
        Ok(match req {
            StreamReq::Close => {
                self.closed = true;
                json!({ "type": "close" })
            }
            StreamReq::Execute { stmt } => {
                json!({ "type": "execute", "result": self.execute(&stmt)? })
            }
            StreamReq::Batch { batch } => {
                let (results, errors): (Vec<Json>, Vec<Json>) = self
                    .run_batch(&batch)
                    .into_iter()
                    .map(|outcome| match outcome {
                        None => (Json::Null, Json::Null),
                        Some(Ok(r)) => (json!(r), Json::Null),
                        Some(Err(e)) => (Json::Null, e.to_json()),
                    })
                    .unzip();
                json!({ "type": "batch", "result": { "step_results": results, "step_errors": errors } })
            }
            StreamReq::Sequence { sql } => {
                self.conn.execute_batch(&sql)?;
                json!({ "type": "sequence" })
            }
            StreamReq::Describe { sql } => {
                json!({ "type": "describe", "result": self.describe(&sql)? })
            }
            StreamReq::GetAutocommit => {
                json!({ "type": "get_autocommit", "is_autocommit": self.conn.is_autocommit() })
            }
        })
    }

    fn execute(&self, stmt: &Stmt) -> Result<StmtResult, HranaError> {
        let sql = stmt.sql.as_deref().ok_or_else(|| {
            HranaError::new(
                "SQL_INVALID",
                "\"sql\" is required (sql_id is not supported)",
            )
        })?;
        // Only the first statement of the text runs (the client splits scripts itself).
        let mut st = self.conn.prepare(sql)?;
        bind_args(&mut st, stmt)?;
        let cols: Vec<Col> = st
            .columns()
            .iter()
            .map(|c| Col {
                name: Some(c.name().to_owned()),
                decltype: c.decl_type().map(str::to_owned),
            })
            .collect();
        let want_rows = stmt.want_rows.unwrap_or(true);
        let changes_before = self.conn.total_changes();
        let mut out = Vec::new();
        let mut rows = st.raw_query();
        while let Some(row) = rows.next()? {
            if want_rows {
                let values = (0..cols.len())
                    .map(|i| row.get_ref(i).map(value_to_json))
                    .collect::<Result<Vec<_>, _>>()?;
                out.push(values);
            }
        }
        drop(rows);
        // `changes()` keeps the count of the last INSERT/UPDATE/DELETE even across
        // other statements, so only report it when this statement changed rows.
        let affected_row_count = if self.conn.total_changes() != changes_before {
            self.conn.changes()
        } else {
            0
        };
        Ok(StmtResult {
            cols,
            rows: out,
            affected_row_count,
            last_insert_rowid: Some(self.conn.last_insert_rowid().to_string()),
        })
    }

    /// Executes the steps whose condition holds; `None` marks a skipped step.
    fn run_batch(&self, batch: &Batch) -> Vec<StepOutcome> {
        let mut outcomes: Vec<StepOutcome> = Vec::with_capacity(batch.steps.len());
        for step in &batch.steps {
            let run = match &step.condition {
                None => true,
                Some(cond) => self.eval(cond, &outcomes),
            };
            let outcome = if run {
                Some(self.execute(&step.stmt))
            } else {
                None
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    fn eval(&self, cond: &Cond, outcomes: &[StepOutcome]) -> bool {
        match cond {
            Cond::Ok { step } => matches!(outcomes.get(*step as usize), Some(Some(Ok(_)))),
            Cond::Error { step } => matches!(outcomes.get(*step as usize), Some(Some(Err(_)))),
            Cond::Not { cond } => !self.eval(cond, outcomes),
            Cond::And { conds } => conds.iter().all(|c| self.eval(c, outcomes)),
            Cond::Or { conds } => conds.iter().any(|c| self.eval(c, outcomes)),
            Cond::IsAutocommit => self.conn.is_autocommit(),
        }
    }

    /// Runs a batch and encodes the outcome as cursor entries.
    fn cursor(&self, batch: &Batch) -> Vec<Json> {
        let mut entries = Vec::new();
        for (step, outcome) in self.run_batch(batch).into_iter().enumerate() {
            match outcome {
                None => {}
                Some(Err(e)) => entries
                    .push(json!({ "type": "step_error", "step": step, "error": e.to_json() })),
                Some(Ok(r)) => {
                    entries.push(json!({ "type": "step_begin", "step": step, "cols": r.cols }));
                    entries.extend(
                        r.rows
                            .into_iter()
                            .map(|row| json!({ "type": "row", "row": row })),
                    );
                    entries.push(json!({
                        "type": "step_end",
                        "affected_row_count": r.affected_row_count,
                        "last_insert_rowid": r.last_insert_rowid,
                    }));
                }
            }
        }
        entries
    }

    fn describe(&self, sql: &str) -> Result<Json, HranaError> {
        let st = self.conn.prepare(sql)?;
        let params: Vec<Json> = (1..=st.parameter_count())
            .map(|i| json!({ "name": st.parameter_name(i) }))
            .collect();
        let cols: Vec<Json> = st
            .columns()
            .iter()
            .map(|c| json!({ "name": c.name(), "decltype": c.decl_type() }))
            .collect();
        Ok(json!({
            "params": params,
            "cols": cols,
            // (rusqlite exposes sqlite3_stmt_isexplain only with its `modern_sqlite` feature)
            "is_explain": sql.trim_start().get(..7).is_some_and(|w| w.eq_ignore_ascii_case("explain")),
            "is_readonly": st.readonly(),
        }))
    }
}

/// Binds positional `args` (1-based) and `named_args`, rejecting extra or missing ones.
fn bind_args(st: &mut rusqlite::Statement<'_>, stmt: &Stmt) -> Result<(), HranaError> {
    let expected = st.parameter_count();
    let args_err = |msg: String| HranaError::new("ARGS_INVALID", msg);
    if stmt.args.len() > expected {
        return Err(args_err(format!(
            "{} positional arguments given, but the statement has {expected} parameters",
            stmt.args.len()
        )));
    }
    let mut bound: HashSet<usize> = (1..=stmt.args.len()).collect();
    for (i, arg) in stmt.args.iter().enumerate() {
        st.raw_bind_parameter(i + 1, arg.to_sql()?)?;
    }
    for arg in &stmt.named_args {
        let index = named_param_index(st, &arg.name)?.ok_or_else(|| {
            args_err(format!(
                "the statement has no parameter named {:?}",
                arg.name
            ))
        })?;
        st.raw_bind_parameter(index, arg.value.to_sql()?)?;
        bound.insert(index);
    }
    if bound.len() < expected {
        return Err(args_err(format!(
            "the statement expects {expected} arguments, but only {} were given",
            bound.len()
        )));
    }
    Ok(())
}

/// Finds a named parameter, guessing the `:`/`@`/`$` prefix when it is missing.
fn named_param_index(
    st: &rusqlite::Statement<'_>,
    name: &str,
) -> Result<Option<usize>, HranaError> {
    if name.starts_with([':', '@', '$', '?']) {
        return Ok(st.parameter_index(name)?);
    }
    for prefix in [':', '@', '$'] {
        if let Some(index) = st.parameter_index(&format!("{prefix}{name}"))? {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

// HTTP side: configuration, stream registry, handlers.

struct Config {
    db_path: PathBuf,
    /// Expected `Authorization` header value, if a token is required.
    auth_header: Option<String>,
    idle_timeout: Mutex<Duration>,
    delay: Mutex<Duration>,
    /// Fault injection: this many COMMIT pipelines run, then lose their answer (HTTP 502).
    lost_commit_answers: AtomicU64,
    /// Fault injection: this many COMMIT pipelines never run (their transaction rolls back).
    dropped_commits: AtomicU64,
    /// Fault injection: after a lost COMMIT answer, refuse every request (HTTP 503) this long.
    dark_after_lost_answer: Mutex<Duration>,
    dark_until: Mutex<Option<Instant>>,
    /// Fault injection: refuse (HTTP 503) every request that opens a `BEGIN IMMEDIATE`.
    refuse_settled_reads: std::sync::atomic::AtomicBool,
    baton_counter: AtomicU64,
}

impl Config {
    fn idle_timeout(&self) -> Duration {
        *lock(&self.idle_timeout)
    }

    /// A fresh, unguessable-enough baton (counter + randomly keyed hash).
    fn new_baton(&self) -> String {
        let n = self.baton_counter.fetch_add(1, Ordering::Relaxed);
        let noise = std::collections::hash_map::RandomState::new().hash_one(n);
        format!("{n:08x}{noise:016x}")
    }
}

struct IdleStream {
    stream: Stream,
    since: Instant,
}

/// Streams waiting for their next request, keyed by the baton handed out.
#[derive(Default)]
struct Registry {
    idle: HashMap<String, IdleStream>,
    stopped: bool,
}

#[derive(Clone)]
struct App {
    cfg: Arc<Config>,
    reg: Arc<Mutex<Registry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn json_response(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A request answered with an HTTP error status and a Hrana `Error` body.
struct Reject(StatusCode, HranaError);

impl Reject {
    fn expired(message: &str) -> Reject {
        Reject(
            StatusCode::BAD_REQUEST,
            HranaError::new("STREAM_EXPIRED", message),
        )
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1.to_json())
    }
}

/// Closes SQLite connections (rolling back open transactions) off the async threads.
fn drop_streams(streams: Vec<Stream>) {
    if !streams.is_empty() {
        tokio::task::spawn_blocking(move || drop(streams));
    }
}

impl App {
    /// Applies the injected outage and delay, then checks the bearer token.
    async fn admit(&self, headers: &HeaderMap) -> Result<(), Reject> {
        if lock(&self.cfg.dark_until).is_some_and(|until| Instant::now() < until) {
            return Err(Reject(
                StatusCode::SERVICE_UNAVAILABLE,
                HranaError::new("INTERNAL", "unavailable (fault injected by the test)"),
            ));
        }
        let delay = *lock(&self.cfg.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let Some(expected) = &self.cfg.auth_header else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given == Some(expected.as_str()) {
            Ok(())
        } else {
            Err(Reject(
                StatusCode::UNAUTHORIZED,
                HranaError::new("UNAUTHORIZED", "missing or invalid bearer token"),
            ))
        }
    }

    /// Takes the stream named by `baton` out of the registry (`None` = open a new one).
    fn acquire(&self, baton: Option<&str>) -> Result<Option<Stream>, Reject> {
        let Some(baton) = baton else { return Ok(None) };
        let timeout = self.cfg.idle_timeout();
        let mut reg = lock(&self.reg);
        match reg.idle.remove(baton) {
            Some(idle) if idle.since.elapsed() <= timeout => Ok(Some(idle.stream)),
            Some(idle) => {
                drop(reg);
                drop_streams(vec![idle.stream]);
                Err(Reject::expired("The stream has expired due to inactivity"))
            }
            None => Err(Reject::expired(
                "Unknown baton: the stream expired due to inactivity, was closed, or the baton was already used",
            )),
        }
    }

    /// Puts a still-open stream back under a new baton.
    fn release(&self, stream: Option<Stream>) -> Option<String> {
        let stream = stream?;
        let mut reg = lock(&self.reg);
        if reg.stopped {
            drop(reg);
            drop_streams(vec![stream]);
            return None;
        }
        let baton = self.cfg.new_baton();
        let since = Instant::now();
        reg.idle.insert(baton.clone(), IdleStream { stream, since });
        Some(baton)
    }

    /// Runs `work` on the baton's stream in the blocking pool; returns its output and the next baton.
    async fn with_stream<T, F>(
        &self,
        baton: Option<String>,
        work: F,
    ) -> Result<(T, Option<String>), Reject>
    where
        T: Send + 'static,
        F: FnOnce(&mut Stream) -> T + Send + 'static,
    {
        let existing = self.acquire(baton.as_deref())?;
        let path = self.cfg.db_path.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut stream = match existing {
                Some(stream) => stream,
                None => Stream::open(&path)?,
            };
            let out = work(&mut stream);
            // a closed stream is dropped here, on the blocking thread
            Ok::<_, HranaError>((out, (!stream.closed).then_some(stream)))
        })
        .await;
        match joined {
            Ok(Ok((out, stream))) => Ok((out, self.release(stream))),
            Ok(Err(e)) => Err(Reject(StatusCode::INTERNAL_SERVER_ERROR, e)),
            Err(e) => Err(Reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                HranaError::new("INTERNAL", format!("stream task failed: {e}")),
            )),
        }
    }
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reject> {
    serde_json::from_slice(body).map_err(|e| {
        Reject(
            StatusCode::BAD_REQUEST,
            HranaError::new("PROTOCOL_ERROR", format!("invalid request body: {e}")),
        )
    })
}

async fn probe(State(app): State<App>, headers: HeaderMap) -> Response {
    match app.admit(&headers).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// Issue 14 fault: while set, a request opening `BEGIN IMMEDIATE` without committing (the
/// service's read-back of a commit of unknown outcome) is refused, so the outcome stays unknown.
fn refuse_settled_read(app: &App, body: &[u8]) -> Result<(), Reject> {
    let settled = body.windows(15).any(|w| w == b"BEGIN IMMEDIATE")
        && !body.windows(7).any(|w| w == b"\"COMMIT");
    if settled && app.cfg.refuse_settled_reads.load(Ordering::SeqCst) {
        return Err(Reject(
            StatusCode::SERVICE_UNAVAILABLE,
            HranaError::new("INTERNAL", "read-back refused (fault injected by the test)"),
        ));
    }
    Ok(())
}

async fn pipeline(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        app.admit(&headers).await?;
        refuse_settled_read(&app, &body)?;
        let req: PipelineBody = parse_body(&body)?;
        // A statement text starting with COMMIT (not the `get_autocommit` request type).
        let commits = body.windows(7).any(|w| w == b"\"COMMIT");
        if commits && take_one(&app.cfg.dropped_commits) {
            // The request is lost on the way: its stream is dropped, rolling back.
            if let Ok(Some(stream)) = app.acquire(req.baton.as_deref()) {
                let _ = tokio::task::spawn_blocking(move || drop(stream)).await;
            }
            return Err(Reject(
                StatusCode::BAD_GATEWAY,
                HranaError::new("INTERNAL", "request lost (fault injected by the test)"),
            ));
        }
        let requests = req.requests;
        let (results, baton) = app
            .with_stream(req.baton, move |s| s.pipeline(requests))
            .await?;
        let lose = commits && take_one(&app.cfg.lost_commit_answers);
        if lose {
            let dark = *lock(&app.cfg.dark_after_lost_answer);
            if !dark.is_zero() {
                *lock(&app.cfg.dark_until) = Some(Instant::now() + dark);
            }
            // The work is done and committed; only the answer never arrives.
            return Err(Reject(
                StatusCode::BAD_GATEWAY,
                HranaError::new("INTERNAL", "answer lost (fault injected by the test)"),
            ));
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({ "baton": baton, "base_url": null, "results": results }),
        ))
    };
    run.await.unwrap_or_else(Reject::into_response)
}

/// Takes one from a fault-injection counter; `false` when it is spent.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn cursor(State(app): State<App>, headers: HeaderMap, body: Bytes) -> Response {
    let run = async {
        app.admit(&headers).await?;
        refuse_settled_read(&app, &body)?;
        let req: CursorBody = parse_body(&body)?;
        let batch = req.batch;
        let (entries, baton) = app
            .with_stream(req.baton, move |s| s.cursor(&batch))
            .await?;
        let mut text = json!({ "baton": baton, "base_url": null }).to_string();
        text.push('\n');
        for entry in entries {
            text.push_str(&entry.to_string());
            text.push('\n');
        }
        Ok(([(header::CONTENT_TYPE, "text/plain")], text).into_response())
    };
    run.await.unwrap_or_else(Reject::into_response)
}

/// Expires streams idle for longer than the configured timeout.
async fn sweep_idle_streams(app: App) {
    loop {
        let pause = (app.cfg.idle_timeout() / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        tokio::time::sleep(pause).await;
        let timeout = app.cfg.idle_timeout();
        let streams: Vec<Stream> = {
            let mut reg = lock(&app.reg);
            let stale: Vec<String> = reg
                .idle
                .iter()
                .filter(|(_, s)| s.since.elapsed() > timeout)
                .map(|(baton, _)| baton.clone())
                .collect();
            stale
                .iter()
                .filter_map(|baton| reg.idle.remove(baton))
                .map(|idle| idle.stream)
                .collect()
        };
        drop_streams(streams);
    }
}

struct Running {
    reg: Arc<Mutex<Registry>>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

/// An in-process Hrana-over-HTTP server; see the module documentation.
pub struct HranaServer {
    cfg: Arc<Config>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl HranaServer {
    /// Start on 127.0.0.1:0 backed by the SQLite file at `db_path`; optional required bearer token.
    pub async fn start(db_path: &Path, auth_token: Option<&str>) -> HranaServer {
        let path = db_path.to_path_buf();
        let init_path = path.clone();
        // Create the file and switch it to WAL so readers and a writer on different streams coexist.
        tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let conn = Connection::open(&init_path)?;
            conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        })
        .await
        .expect("hrana test server: init task panicked")
        .unwrap_or_else(|e| panic!("hrana test server: cannot open {}: {e}", path.display()));

        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("hrana test server: cannot bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("hrana test server: no local address");
        let cfg = Arc::new(Config {
            db_path: path,
            auth_header: auth_token.map(|t| format!("Bearer {t}")),
            idle_timeout: Mutex::new(DEFAULT_IDLE_TIMEOUT),
            delay: Mutex::new(Duration::ZERO),
            lost_commit_answers: AtomicU64::new(0),
            dropped_commits: AtomicU64::new(0),
            dark_after_lost_answer: Mutex::new(Duration::ZERO),
            dark_until: Mutex::new(None),
            refuse_settled_reads: std::sync::atomic::AtomicBool::new(false),
            baton_counter: AtomicU64::new(1),
        });
        let mut server = HranaServer {
            cfg,
            addr,
            running: None,
        };
        server.launch(listener);
        server
    }

    /// Base URL like "http://127.0.0.1:PORT" (what you pass to libsql::Builder::new_remote).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop listening and drop all streams (connections refused afterwards).
    pub async fn stop(&mut self) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        run.sweeper.abort();
        if let Some(tx) = run.shutdown.take() {
            let _ = tx.send(());
        }
        let streams: Vec<Stream> = {
            let mut reg = lock(&run.reg);
            reg.stopped = true;
            reg.idle.drain().map(|(_, idle)| idle.stream).collect()
        };
        let _ = tokio::task::spawn_blocking(move || drop(streams)).await;
        // Graceful shutdown closes idle keep-alive connections; give in-flight requests 5 s.
        if tokio::time::timeout(Duration::from_secs(5), &mut run.server)
            .await
            .is_err()
        {
            run.server.abort();
            let _ = (&mut run.server).await;
        }
    }

    /// Start again on the SAME port and same file after stop().
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("hrana test server: cannot rebind {}: {e}", self.addr),
            }
        };
        self.launch(listener);
    }

    /// Set the idle stream expiry (default 10 s).
    pub fn set_stream_idle_timeout(&self, d: Duration) {
        *lock(&self.cfg.idle_timeout) = d;
    }

    /// The next `n` requests that COMMIT are carried out but answered with HTTP 502, as if
    /// the answer were lost on the way back.
    pub fn lose_commit_answers(&self, n: u64) {
        self.cfg.lost_commit_answers.store(n, Ordering::SeqCst);
    }

    /// The next `n` requests that COMMIT are lost before they reach the database: their
    /// transaction rolls back and the client gets HTTP 502.
    pub fn drop_commits(&self, n: u64) {
        self.cfg.dropped_commits.store(n, Ordering::SeqCst);
    }

    /// After each lost COMMIT answer, every request is refused (HTTP 503) for `d`.
    pub fn go_dark_after_lost_answers(&self, d: Duration) {
        *lock(&self.cfg.dark_after_lost_answer) = d;
    }

    /// Issue 14: while `on`, every `BEGIN IMMEDIATE` read-back (no COMMIT) is refused (503).
    pub fn refuse_settled_reads(&self, on: bool) {
        self.cfg.refuse_settled_reads.store(on, Ordering::SeqCst);
    }

    /// Make every request sleep this long before answering (fault injection for "slow database"); zero by default.
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.cfg.delay) = d;
    }

    fn launch(&mut self, listener: TcpListener) {
        let reg = Arc::new(Mutex::new(Registry::default()));
        let app = App {
            cfg: Arc::clone(&self.cfg),
            reg: Arc::clone(&reg),
        };
        let router = Router::new()
            .route("/v2", get(probe))
            .route("/v3", get(probe))
            .route("/v2/pipeline", post(pipeline))
            .route("/v3/pipeline", post(pipeline))
            .route("/v3/cursor", post(cursor))
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(app.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.await;
            };
            if let Err(e) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("hrana test server: serve error: {e}");
            }
        });
        let sweeper = tokio::spawn(sweep_idle_streams(app));
        self.running = Some(Running {
            reg,
            shutdown: Some(tx),
            server,
            sweeper,
        });
    }
}

impl Drop for HranaServer {
    fn drop(&mut self) {
        if let Some(mut run) = self.running.take() {
            run.sweeper.abort();
            run.server.abort();
            if let Some(tx) = run.shutdown.take() {
                let _ = tx.send(());
            }
            let mut reg = lock(&run.reg);
            reg.stopped = true;
            reg.idle.clear();
        }
    }
}
