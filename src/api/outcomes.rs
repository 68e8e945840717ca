//! `POST /serves/{serve_id}/outcome` (SPEC §8.2): the caller that received a serve reports
//! how the key fared upstream; the pool's key health acts on it.
//!
//! Guarantees: the first report of a serve wins, in this process (one report per serve in
//! flight; others wait for it) and across restarts (the serve is looked up in the ledger's
//! recent serves, else the database, which sets an outcome only on a row without one). A 200 leaves only after the
//! outcome and the health changes it made are committed (the group commit); if the commit
//! fails, the changes are undone in memory and the answer is 503; if its outcome is unknown,
//! the row is read back first. Once applied, the work runs to its end: the write timeout
//! waits for it, and a client that disconnects hands it to a task of its own (`RunToEnd`),
//! so nothing cuts it between memory and database.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::extract::{whole_number, IdPath, JsonBody};
use super::openapi::{JsonBodyErrors, StorageErrors, Unauthorized};
use super::write::{read_back, WriteMarker};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::ledger::{HealthJob, JobOutcome, Urgency};
use crate::model::{HealthWrite, OutcomeWrite, StoredOutcome, TierCooldownWrite};
use crate::pool::health::{
    HealthRecord, Jitter, Outcome, OutcomeClass, OutcomeReport, ServeRef, TransportError,
};
use crate::pool::{log_transition, Caller, HealthChange, Now};
use crate::timestamp::{self, Timestamp};

/// Serves with a report being applied (by the serve id's bits). A report that finds its serve
/// taken makes the channel it waits on; the holder's slot dropping the sender wakes it.
#[derive(Default)]
pub struct InFlight(parking_lot::Mutex<HashMap<u128, Option<tokio::sync::watch::Sender<()>>>>);

/// Holds a serve's report slot; dropping it wakes every report waiting for the serve.
struct Slot {
    reports: SharedState,
    serve: u128,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.reports.reports.0.lock().remove(&self.serve);
    }
}

enum Claim {
    Mine(Slot),
    Wait(tokio::sync::watch::Receiver<()>),
}

fn claim(state: &SharedState, serve: u128) -> Claim {
    let mut in_flight = state.reports.0.lock();
    match in_flight.entry(serve) {
        std::collections::hash_map::Entry::Occupied(mut held) => Claim::Wait(
            held.get_mut()
                .get_or_insert_with(|| tokio::sync::watch::channel(()).0)
                .subscribe(),
        ),
        std::collections::hash_map::Entry::Vacant(free) => {
            free.insert(None);
            Claim::Mine(Slot {
                reports: state.clone(),
                serve,
            })
        }
    }
}

const UNKNOWN_SERVE: &str = "no serve with that id";
const FIELDS: &str = "status, error, retry_after_seconds, class or message";

/// The report body: its fields, and at least one of `status`, `error` or `class` given (not
/// `null`) — without one there is nothing to classify (400).
pub struct OutcomeBody;

impl PartialSchema for OutcomeBody {
    fn schema() -> RefOr<Schema> {
        let given = |field: &str, kind: Type| {
            ObjectBuilder::new()
                .schema_type(SchemaType::AnyValue)
                .property(field, ObjectBuilder::new().schema_type(kind))
                .required(field)
        };
        AllOfBuilder::new()
            .item(OutcomeReport::schema())
            .item(
                AnyOfBuilder::new()
                    .item(given("status", Type::Integer))
                    .item(given("error", Type::String))
                    .item(given("class", Type::String)),
            )
            .into()
    }
}

/// Registers what the report's fields refer to (`OutcomeClass`, `TransportError`).
impl ToSchema for OutcomeBody {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        <OutcomeReport as ToSchema>::schemas(schemas);
    }
}

/// The answer to a report.
#[derive(Serialize, ToSchema)]
pub struct ReportAnswer {
    serve_id: String,
    #[schema(value_type = OutcomeClass)]
    class: &'static str,
    /// The served key's health state after the report; `null` if the key is gone.
    #[schema(required = true)]
    key_state: Option<&'static str>,
}

#[utoipa::path(
    post,
    path = "/serves/{serve_id}/outcome",
    tag = "draw",
    operation_id = "report_outcome",
    params(("serve_id" = uuid::Uuid, Path, description = "The `serve_id` GET /key answered (a UUID; anything else is 400)")),
    security(("admin_token" = []), ("consumer_token" = [])),
    request_body(content = OutcomeBody, description = "At least one of `status`, `error` or `class`"),
    responses(
        (status = 200, description = "Recorded (or the same report again)", body = ReportAnswer),
        Unauthorized, JsonBodyErrors,
        (status = 404, description = "No such serve, or it went to another caller (indistinguishable)", body = ErrorBody),
        (status = 409, description = "A different outcome was reported first; the first report wins", body = ErrorBody),
        (status = 410, description = "The serve is older than OUTCOME_WINDOW_SECONDS", body = ErrorBody),
        StorageErrors,
    )
)]
pub async fn report(
    caller: Caller,
    State(state): State<SharedState>,
    marker: WriteMarker,
    IdPath(serve_id): IdPath,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<ReportAnswer>, ApiError> {
    let Ok(uuid) = uuid::Uuid::try_parse(&serve_id) else {
        return Err(ApiError::BadRequest(
            "serve_id must be a UUID, as GET /key answered it".into(),
        ));
    };
    let outcome = parse_report(body)?
        .validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    record(
        &state,
        &caller,
        &serve_id,
        uuid.as_u128(),
        outcome,
        Urgency::Awaited,
        || marker.begin_write(),
    )
    .await
}

/// Records `outcome` on serve `serve_id` (its UUID's bits: `uuid`) as `caller` reports it: the
/// one path behind `POST /serves/{serve_id}/outcome`, which the proxy also takes for each of its
/// attempts (SPEC §8.6). `begin_write` claims the answer just before the outcome is applied.
pub async fn record(
    state: &SharedState,
    caller: &Caller,
    serve_id: &str,
    uuid: u128,
    outcome: Outcome,
    urgency: Urgency,
    begin_write: impl Fn() -> bool,
) -> Result<Json<ReportAnswer>, ApiError> {
    loop {
        match claim(state, uuid) {
            Claim::Wait(mut done) => {
                // Ends with an error once the report in flight drops its slot; then look again.
                let _ = done.changed().await;
            }
            Claim::Mine(slot) => {
                // Read while holding the slot, so no report of this serve can land unseen.
                let serve = find_serve(state, caller, serve_id, uuid).await?;
                if let Some(answer) = already_reported(state, serve_id, &serve, &outcome)? {
                    return Ok(answer);
                }
                if !begin_write() {
                    return Err(ApiError::Unavailable(
                        "request timed out; nothing was changed".into(),
                    ));
                }
                return apply(state, slot, serve_id, serve, outcome, urgency).await;
            }
        }
    }
}

/// A serve as a report needs it: the key, when, and its outcome if one is recorded.
struct FoundServe {
    key_id: Arc<str>,
    created_at: Timestamp,
    outcome: Option<Recorded>,
}

/// A serve's recorded outcome, as memory or the database holds it.
enum Recorded {
    Recent(OutcomeClass, Option<u16>),
    Stored(StoredOutcome),
}

impl Recorded {
    fn class(&self) -> &str {
        match self {
            Recorded::Recent(class, _) => class.as_str(),
            Recorded::Stored(stored) => &stored.class,
        }
    }

    fn status(&self) -> Option<i64> {
        match self {
            Recorded::Recent(_, status) => status.map(i64::from),
            Recorded::Stored(stored) => stored.status,
        }
    }
}

/// The serve (from the ledger's recent serves, else the database), if this caller may report
/// on it and it is recent enough. A recent serve is read without allocating.
async fn find_serve(
    state: &SharedState,
    caller: &Caller,
    serve_id: &str,
    uuid: u128,
) -> Result<FoundServe, ApiError> {
    let mine = |consumer_id: &str| match caller {
        Caller::Admin => true,
        Caller::Consumer(c) => *c.id == *consumer_id,
    };
    let recent = state.ledger.recent.with(uuid, |recent| {
        mine(&recent.consumer_id).then(|| FoundServe {
            key_id: recent.key_id.clone(),
            created_at: recent.created_at,
            outcome: recent
                .outcome
                .map(|(class, status)| Recorded::Recent(class, status)),
        })
    });
    let found = match recent {
        Some(kept) => kept,
        None => state
            .ledger
            .lookups
            .find(serve_id)
            .await?
            .filter(|s| mine(&s.consumer_id))
            .map(|s| FoundServe {
                key_id: Arc::from(s.key_id),
                created_at: s.created_at,
                outcome: s.outcome.map(Recorded::Stored),
            }),
    };
    let serve = found.ok_or_else(|| ApiError::NotFound(UNKNOWN_SERVE.into()))?;
    let age = (chrono::Utc::now() - serve.created_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    if age > state.outcome_window {
        return Err(ApiError::Gone(format!(
            "the serve is older than OUTCOME_WINDOW_SECONDS ({} s); its outcome can no longer be reported",
            state.outcome_window.as_secs()
        )));
    }
    Ok(serve)
}

/// For a serve with an outcome: 200 for the same report, 409 for another.
fn already_reported(
    state: &SharedState,
    serve_id: &str,
    serve: &FoundServe,
    outcome: &Outcome,
) -> Result<Option<Json<ReportAnswer>>, ApiError> {
    let Some(stored) = &serve.outcome else {
        return Ok(None);
    };
    if stored.class() == outcome.class.as_str() && stored.status() == outcome.status.map(i64::from)
    {
        let key_state = state.pool.key(&serve.key_id).map(|k| k.health().state);
        return Ok(Some(answer(serve_id, outcome.class, key_state)));
    }
    Err(ApiError::Conflict(format!(
        "this serve's outcome was already reported as {}{}; the first report wins",
        stored.class(),
        stored
            .status()
            .map(|s| format!(" (status {s})"))
            .unwrap_or_default()
    )))
}

fn answer(
    serve_id: &str,
    class: OutcomeClass,
    key_state: Option<crate::pool::health::StateKind>,
) -> Json<ReportAnswer> {
    Json(ReportAnswer {
        serve_id: serve_id.to_owned(),
        class: class.as_str(),
        key_state: key_state.map(|s| s.as_str()),
    })
}

/// Applies the report to the pool, commits it with the changes it made, and answers. Runs in
/// the request's own task (no hop); from the moment memory changed, the rest runs to its end
/// even if the request is dropped (`RunToEnd`).
async fn apply(
    state: &SharedState,
    slot: Slot,
    serve_id: &str,
    serve: FoundServe,
    outcome: Outcome,
    urgency: Urgency,
) -> Result<Json<ReportAnswer>, ApiError> {
    let now = Now::read();
    let write = OutcomeWrite {
        serve_id: serve_id.to_owned(),
        class: outcome.class.as_str(),
        status: outcome.status,
        reported_at: now.wall,
    };
    let serve_ref = ServeRef {
        id: serve_id,
        at: serve.created_at,
    };
    let ledger = &state.ledger;
    let job = |changes: &[HealthChange], tier: Option<TierCooldownWrite>| HealthJob {
        outcome: Some(write.clone()),
        health: health_writes(changes),
        tiers: tier.into_iter().collect(),
        urgency,
    };
    let (key_state, changes, committed) = match state.pool.report(
        &serve.key_id,
        serve_ref,
        &outcome,
        now,
        Jitter::random(),
        |changes, tier| ledger.submit_health(job(changes, tier)),
    ) {
        Some(r) => (Some(r.key_state), r.changes, r.out),
        // The key was deleted: the outcome is still recorded on the audit row.
        None => (None, Vec::new(), ledger.submit_health(job(&[], None))),
    };
    let state = state.clone();
    RunToEnd::new(async move {
        land_health(&state, changes, committed.await, "outcome", || {
            outcome_landed(&state, &write)
        })
        .await?;
        state
            .ledger
            .recent
            .set_outcome(slot.serve, outcome.class, outcome.status);
        state.outcome_meters.record(outcome.class);
        Ok(answer(&write.serve_id, outcome.class, key_state))
    })
    .await
}

/// A future that runs to its end: polled in place, and handed to a task of its own if it is
/// dropped before it finished (a client that disconnects), so a report whose memory changes
/// are made still waits for its commit and undoes them if it failed. Spawning only then
/// spares every report a task and a wake-up.
struct RunToEnd<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send;

impl<F: Future + Send + 'static> RunToEnd<F>
where
    F::Output: Send,
{
    fn new(future: F) -> Self {
        RunToEnd(Some(Box::pin(future)))
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(future) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let out = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(out)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                // No runtime: the process is ending; the database stays the truth.
                Err(_) => tracing::warn!("an outcome report was dropped before its commit"),
            }
        }
    }
}

/// After a commit of unknown outcome: whether this report's outcome is the one stored. Read
/// up to three times; unreadable counts as not landed (its health changes are undone).
async fn outcome_landed(state: &SharedState, write: &OutcomeWrite) -> bool {
    read_back(
        "an outcome",
        || state.db.read_serve(&write.serve_id, true),
        |found| {
            found
                .and_then(|s| s.outcome)
                .is_some_and(|o| o.class == write.class && o.status == write.status.map(i64::from))
        },
    )
    .await
}

/// After a health job's commit: memory follows what landed. A commit of unknown outcome asks
/// `stored`; one that did not land undoes `changes` (503, naming `what`), one that did logs a
/// line per transition.
pub async fn land_health<Fut: std::future::Future<Output = bool>>(
    state: &SharedState,
    changes: Vec<HealthChange>,
    committed: JobOutcome,
    what: &str,
    stored: impl FnOnce() -> Fut,
) -> Result<(), ApiError> {
    let landed = match committed {
        JobOutcome::Committed => true,
        JobOutcome::Failed => false,
        JobOutcome::Uncertain => stored().await,
    };
    if !landed {
        state.pool.revert_health(changes);
        return Err(ApiError::Unavailable(format!(
            "the {what} could not be recorded; nothing was changed, try again"
        )));
    }
    for change in &changes {
        if let Some(transition) = &change.transition {
            log_transition(&change.key.id, transition);
        }
    }
    Ok(())
}

/// The stored form of health changes, in the order they were made.
pub fn health_writes(changes: &[HealthChange]) -> Vec<HealthWrite> {
    changes
        .iter()
        .map(|c| HealthWrite {
            key_id: c.key.id.to_string(),
            record: c.after.clone(),
        })
        .collect()
}

/// A key's health as `GET /admin/keys` shows it; times in microseconds, as stored, so the
/// same health reads the same before and after a restart.
pub fn health_view(record: &HealthRecord) -> HealthView {
    let micros = |t| timestamp::to_api(chrono::SubsecRound::trunc_subsecs(t, 6));
    HealthView {
        state: record.state.as_str(),
        reason: record.reason.map(|r| r.as_str()),
        until: record.until.map(micros),
        last_status: record.last_status,
        strikes: record.strikes,
        changed_at: record.changed_at.map(timestamp::to_api),
    }
}

/// A key's health (SPEC §8.2).
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    /// active, cooling, probing, exhausted, quarantined or disabled.
    state: &'static str,
    /// Why it is in that state.
    #[schema(required = true)]
    reason: Option<&'static str>,
    /// When a cooling, exhausted or quarantined key is tried again.
    #[schema(format = DateTime, required = true)]
    until: Option<String>,
    #[schema(required = true)]
    last_status: Option<u16>,
    /// Upstream errors in a row.
    strikes: u32,
    #[schema(format = DateTime, required = true)]
    changed_at: Option<String>,
}

/// The report body, each field checked on its own so that a bad one is named (serde's own
/// messages name the value, not the field). `null` is the same as absent.
fn parse_report(body: Map<String, Value>) -> Result<OutcomeReport, ApiError> {
    let bad = |message: String| Err(ApiError::BadRequest(message));
    let mut report = OutcomeReport::default();
    for (field, value) in body {
        if value.is_null() {
            continue;
        }
        match field.as_str() {
            "status" => match whole_number(&value).ok() {
                Some(s) => report.status = Some(s),
                None => return bad("status must be an HTTP status code from 100 to 599".into()),
            },
            "retry_after_seconds" => match whole_number(&value).ok() {
                Some(s) => report.retry_after_seconds = Some(s),
                None => {
                    return bad(format!(
                        "retry_after_seconds must be a whole number from 0 to {}",
                        crate::pool::health::MAX_RETRY_AFTER_SECONDS
                    ))
                }
            },
            "error" => match value.as_str() {
                Some("timeout") => report.error = Some(TransportError::Timeout),
                Some("connect") => report.error = Some(TransportError::Connect),
                _ => return bad("error must be \"timeout\" or \"connect\"".into()),
            },
            "class" => match value.as_str().and_then(OutcomeClass::parse) {
                Some(class) => report.class = Some(class),
                None => {
                    let names: Vec<&str> = OutcomeClass::ALL.iter().map(|c| c.as_str()).collect();
                    return bad(format!("class must be one of {}", names.join(", ")));
                }
            },
            "message" => match value {
                Value::String(m) => report.message = Some(m),
                _ => {
                    return bad(format!(
                        "message must be a string of at most {} characters",
                        crate::pool::health::MAX_MESSAGE_CHARS
                    ))
                }
            },
            other => {
                let shown: String = other.chars().take(64).collect();
                return bad(format!("unknown field `{shown}`; expected {FIELDS}"));
            }
        }
    }
    Ok(report)
}
