//! `GET /admin/usage`: the audit log, newest first, filtered and paged by cursor; and
//! `GET /admin/usage/summary`: serve counts per group, from the daily rollup and raw rows.
//!
//! Paging (issue 10 item 3): rows come in descending rowid (insertion) order and the cursor
//! is the last row's rowid. New rows always get a rowid above every existing row, so paging
//! while serves are inserted skips and repeats nothing. The body stays the JSON array a
//! Go-era client reads; the next page is announced in `X-Next-Cursor` and `Link: rel="next"`.

use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use super::auth::Admin;
use super::openapi::{AdminOnly, StorageErrors};
use super::SharedState;
use crate::error::{ApiError, ErrorBody};
use crate::store::{day_text, SummaryGroup, UsageFilter, OUTCOME_CLASSES};
use crate::timestamp::{self, Timestamp};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// The longest cursor: 18 digits always fit a rowid (i64).
const MAX_CURSOR_DIGITS: usize = 18;
/// Response header carrying the next page's cursor.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

#[derive(Deserialize)]
struct UsageQuery {
    limit: Option<String>,
    key_id: Option<String>,
    consumer_id: Option<String>,
    feature: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
}

#[derive(Deserialize)]
struct SummaryQuery {
    since: Option<String>,
    until: Option<String>,
    group_by: Option<String>,
}

/// `since`/`until`: an RFC 3339 date-time, or empty, which reads as absent.
pub struct DateTimeParam;

impl utoipa::PartialSchema for DateTimeParam {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String).format(Some(
                utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::DateTime),
            )))
            .item(empty_value())
            .into()
    }
}

impl ToSchema for DateTimeParam {}

/// The empty string a query parameter may also be (`?since=`), which reads as absent.
fn empty_value() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([""]))
}

/// `cursor`: the `X-Next-Cursor` of the previous page, or empty (the first page).
pub struct CursorParam;

impl utoipa::PartialSchema for CursorParam {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(format!(
                "^([1-9][0-9]{{0,{}}})?$",
                MAX_CURSOR_DIGITS - 1
            )))
            .into()
    }
}

impl ToSchema for CursorParam {}

/// `limit`: a whole number ≥ 1 of any size (no `int64` bound: larger ones read as the
/// maximum), or empty (`?limit=`), which reads as absent.
pub struct LimitParam;

impl utoipa::PartialSchema for LimitParam {
    fn schema() -> RefOr<Schema> {
        AnyOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .item(empty_value())
            .into()
    }
}

impl ToSchema for LimitParam {}

/// One audited serve.
#[derive(Serialize, ToSchema)]
pub struct UsageEvent {
    id: String,
    key_id: String,
    /// The consumer's id, or `admin`.
    consumer_id: String,
    feature: String,
    #[schema(format = DateTime)]
    created_at: String,
    /// The reported outcome (SPEC §8.2), `null` until one is reported.
    #[schema(required = true)]
    outcome: Option<OutcomeView>,
    /// Budget units the serve took (SPEC §8.4 `cost`; 1 for rows written before it existed).
    cost: i64,
}

/// A serve's reported outcome.
#[derive(Serialize, ToSchema)]
pub struct OutcomeView {
    class: String,
    #[schema(required = true)]
    status: Option<i64>,
    #[schema(format = DateTime, required = true)]
    reported_at: Option<String>,
}

#[utoipa::path(
    get,
    path = "/admin/usage",
    tag = "usage",
    operation_id = "list_usage",
    params(
        ("limit" = inline(Option<LimitParam>), Query,
            description = "How many rows, newest first: default 100; above 1000 (however large) reads as 1000"),
        ("key_id" = Option<String>, Query, description = "Only serves of this key (empty: any)"),
        ("consumer_id" = Option<String>, Query, description = "Only serves to this consumer id, or `admin` (empty: any)"),
        ("feature" = Option<String>, Query, description = "Only serves for this feature (empty: any)"),
        ("since" = inline(Option<DateTimeParam>), Query, description = "Only serves at or after this time (RFC 3339)"),
        ("until" = inline(Option<DateTimeParam>), Query, description = "Only serves at or before this time (RFC 3339)"),
        ("cursor" = inline(Option<CursorParam>), Query,
            description = "The previous page's `X-Next-Cursor`; repeat the same filters. Cursors stay valid while rows are added and pruned (not across a VACUUM)"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Audit rows, newest first (insertion order). When more rows match,             `X-Next-Cursor` holds the cursor of the next page and `Link` its URL (`rel=\"next\"`);             on the last page both are absent", body = [UsageEvent],
            headers(
                ("x-next-cursor" = String, description = "Cursor of the next page (absent on the last page)"),
                ("link" = String, description = "`<…/admin/usage?…&cursor=N>; rel=\"next\"` (absent on the last page)"),
            )),
        (status = 400, description = "A parameter is malformed (the message names it): `limit` not a whole number ≥ 1,             `since`/`until` not RFC 3339, a `cursor` not from `X-Next-Cursor`, or a malformed query string", body = ErrorBody),
        AdminOnly,
        StorageErrors,
    )
)]
pub async fn list(
    _: Admin,
    State(state): State<SharedState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = Query::<UsageQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?
        .0;
    let limit = parse_limit(query.limit.as_deref())?;
    let filter = UsageFilter {
        key_id: present(query.key_id),
        consumer_id: present(query.consumer_id),
        feature: present(query.feature),
        since: parse_time("since", query.since.as_deref())?,
        until: parse_time("until", query.until.as_deref())?,
        before: parse_cursor(query.cursor.as_deref())?,
        // One more than asked, to know whether another page follows.
        limit: limit + 1,
    };
    let mut rows = state.db.usage_page(&filter).await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|(rowid, _)| *rowid)
    } else {
        None
    };
    let events: Vec<UsageEvent> = rows.iter().map(|(_, e)| view(e)).collect();
    let mut response = Json(events).into_response();
    if let Some(cursor) = next {
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static(NEXT_CURSOR_HEADER),
            HeaderValue::from(cursor),
        );
        if let Ok(link) = HeaderValue::from_str(&next_link(&uri, cursor)) {
            headers.insert(axum::http::header::LINK, link);
        }
    }
    Ok(response)
}

/// Above the maximum is clamped to it; not a positive whole number is an error.
fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    Ok(match raw {
        None | Some("") => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if n >= 1 => n.min(MAX_LIMIT),
            Ok(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be from 1 to {MAX_LIMIT}"
                )))
            }
            Err(_) if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => MAX_LIMIT,
            Err(_) => {
                return Err(ApiError::BadRequest(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    })
}

/// An empty filter reads as absent.
fn present(raw: Option<String>) -> Option<String> {
    raw.filter(|s| !s.is_empty())
}

/// An RFC 3339 time, held within years 0000–9999 in UTC (an offset can push one just past
/// them; SQLite's date functions read nothing outside).
fn parse_time(name: &str, raw: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z (SQLite reads no later second).
    let first = chrono::DateTime::from_timestamp(-62_167_219_200, 0);
    let last = chrono::DateTime::from_timestamp(253_402_300_799, 0);
    match raw {
        None | Some("") => Ok(None),
        Some(raw) => timestamp::parse_rfc3339(raw)
            .map(|t| {
                let t = first.map_or(t, |first| t.max(first));
                Some(last.map_or(t, |last| t.min(last)))
            })
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{name} must be an RFC 3339 date-time, e.g. 2026-11-26T00:00:00Z"
                ))
            }),
    }
}

fn parse_cursor(raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|&n| {
                n >= 1
                    && !raw.starts_with('0')
                    && raw.len() <= MAX_CURSOR_DIGITS
                    && raw.bytes().all(|b| b.is_ascii_digit())
            })
            .map(Some)
            .ok_or_else(|| {
                ApiError::BadRequest(
                    "cursor must be the X-Next-Cursor value of a previous page".into(),
                )
            }),
    }
}

/// `Link` of the next page: the request's own query (as it was encoded) with the cursor replaced.
fn next_link(uri: &Uri, cursor: i64) -> String {
    let mut pairs: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some("cursor"))
        .collect();
    let cursor = format!("cursor={cursor}");
    pairs.push(&cursor);
    format!("<{}?{}>; rel=\"next\"", uri.path(), pairs.join("&"))
}

fn view(e: &crate::model::UsageEvent) -> UsageEvent {
    UsageEvent {
        id: e.id.clone(),
        key_id: e.key_id.clone(),
        consumer_id: e.consumer_id.clone(),
        feature: e.feature.clone(),
        created_at: timestamp::to_api(e.created_at),
        outcome: e.outcome.as_ref().map(|o| OutcomeView {
            class: o.class.clone(),
            status: o.status,
            reported_at: o.reported_at.map(timestamp::to_api),
        }),
        cost: e.cost,
    }
}

/// What a summary groups by.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Key,
    Consumer,
    Feature,
    Day,
}

/// Serve counts per group over whole UTC days.
#[derive(Serialize, ToSchema)]
pub struct UsageSummary {
    group_by: GroupBy,
    /// The first UTC day counted (`since`'s day); `null`: from the oldest row.
    #[schema(format = Date, required = true)]
    since: Option<String>,
    /// The last UTC day counted (`until`'s day); `null`: up to now.
    #[schema(format = Date, required = true)]
    until: Option<String>,
    /// Days up to this one are counted from the daily rollup (which outlives pruning), later
    /// days from raw audit rows; `null` before the first rollup.
    #[schema(format = Date, required = true)]
    rolled_up_through: Option<String>,
    /// One entry per group with at least one serve, ordered by `group`.
    groups: Vec<SummaryEntry>,
}

/// One group's counts.
#[derive(Serialize, ToSchema)]
pub struct SummaryEntry {
    /// The key id, consumer id (or `admin`), feature, or UTC day (`YYYY-MM-DD`).
    group: String,
    /// Serves.
    count: i64,
    outcomes: OutcomeCounts,
}

/// Serves per reported outcome class (SPEC §8.2); `unreported`: no report.
#[derive(Serialize, ToSchema)]
pub struct OutcomeCounts {
    ok: i64,
    client_error: i64,
    auth_invalid: i64,
    quota_exhausted: i64,
    rate_limited: i64,
    upstream_error: i64,
    network: i64,
    unreported: i64,
}

#[utoipa::path(
    get,
    path = "/admin/usage/summary",
    tag = "usage",
    operation_id = "usage_summary",
    params(
        ("group_by" = GroupBy, Query, description = "What to count per: key, consumer, feature or UTC day"),
        ("since" = inline(Option<DateTimeParam>), Query,
            description = "Count from this time's UTC day on (summaries count whole days)"),
        ("until" = inline(Option<DateTimeParam>), Query,
            description = "Count up to and including this time's UTC day"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Counts per group; the same before and after old rows are pruned", body = UsageSummary),
        (status = 400, description = "A parameter is malformed (the message names it): `group_by` missing or not             key/consumer/feature/day, `since`/`until` not RFC 3339, or a malformed query string", body = ErrorBody),
        AdminOnly,
        StorageErrors,
    )
)]
pub async fn summary(
    _: Admin,
    State(state): State<SharedState>,
    uri: Uri,
) -> Result<Json<UsageSummary>, ApiError> {
    let query = Query::<SummaryQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?
        .0;
    let group_by = match query.group_by.as_deref() {
        Some("key") => GroupBy::Key,
        Some("consumer") => GroupBy::Consumer,
        Some("feature") => GroupBy::Feature,
        Some("day") => GroupBy::Day,
        _ => {
            return Err(ApiError::BadRequest(
                "group_by is required: key, consumer, feature or day".into(),
            ))
        }
    };
    let since = parse_time("since", query.since.as_deref())?.map(|t| t.date_naive());
    let until = parse_time("until", query.until.as_deref())?.map(|t| t.date_naive());
    let group = match group_by {
        GroupBy::Key => SummaryGroup::Key,
        GroupBy::Consumer => SummaryGroup::Consumer,
        GroupBy::Feature => SummaryGroup::Feature,
        GroupBy::Day => SummaryGroup::Day,
    };
    let rows = state.db.usage_summary(group, since, until).await?;
    let rolled = state.db.rollup_through().await?;
    debug_assert_eq!(OUTCOME_CLASSES[6], "network");
    Ok(Json(UsageSummary {
        group_by,
        since: since.map(day_text),
        until: until.map(day_text),
        rolled_up_through: rolled.map(day_text),
        groups: rows
            .into_iter()
            .map(|r| {
                let [ok, client_error, auth_invalid, quota_exhausted, rate_limited, upstream_error, network] =
                    r.outcomes;
                SummaryEntry {
                    group: r.group,
                    count: r.served,
                    outcomes: OutcomeCounts {
                        ok,
                        client_error,
                        auth_invalid,
                        quota_exhausted,
                        rate_limited,
                        upstream_error,
                        network,
                        unreported: r.served - r.outcomes.iter().sum::<i64>(),
                    },
                }
            })
            .collect(),
    }))
}
