//! The HTTP surface: one shared state, one router, one file per resource.

mod auth;
mod consumers;
mod extract;
mod health;
mod import;
mod key;
mod key_state;
mod keys;
pub mod observe;
pub mod openapi;
mod outcomes;
mod proxy;
mod sources;
mod tier_source;
mod tier_upstream;
mod tiers;
pub mod ui;
mod usage;
pub(crate) mod write;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::crypto::Sealer;
use crate::error::ApiError;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::secret::Secret;
use crate::store::Db;

pub use import::MAX_IMPORT_KEYS;

/// Request bodies above this answer 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Everything a handler may use.
pub struct AppState {
    pub pool: Arc<Pool>,
    pub db: Db,
    pub ledger: Ledger,
    pub sealer: Sealer,
    /// sha256 of the admin token, compared in constant time.
    pub admin_token_hash: [u8; 32],
    /// Serialises admin writes so the database and the pool change in the same order.
    pub admin_writes: tokio::sync::Mutex<()>,
    /// This app's metrics registry (the pool and the ledger hold handles of the same one).
    pub metrics: Metrics,
    /// sha256 of `METRICS_TOKEN`, compared in constant time; `None` = `/metrics` is public.
    pub metrics_token_hash: Option<[u8; 32]>,
    /// `OUTCOME_WINDOW_SECONDS` (default one hour).
    pub outcome_window: Duration,
    /// Outcome reports in flight, one per serve (see `outcomes.rs`).
    pub reports: outcomes::InFlight,
    pub outcome_meters: crate::metrics::OutcomeMeters,
    /// The RegBot credentials source, when `REGBOT_DATABASE_URL` is set (SPEC §8.5).
    pub regbot: Option<Arc<crate::regbot::Source>>,
    /// Proxy mode's upstream client (SPEC §8.6): one connection pool for every tier.
    pub upstream_client: crate::proxy::Client,
    /// This replica's place in the change log (SPEC §8.7); `None` until `build` reads it.
    pub changes: Option<tokio::sync::Mutex<crate::sync::Poller>>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(
        pool: Pool,
        db: Db,
        ledger: Ledger,
        sealer: Sealer,
        admin_token: &Secret,
        metrics: Metrics,
        metrics_token: Option<&Secret>,
    ) -> AppState {
        AppState {
            pool: Arc::new(pool),
            db,
            ledger,
            sealer,
            admin_token_hash: crate::pool::token_hash(admin_token.expose()),
            admin_writes: tokio::sync::Mutex::new(()),
            outcome_meters: metrics.outcome_reports(),
            metrics,
            metrics_token_hash: metrics_token.map(|t| crate::pool::token_hash(t.expose())),
            outcome_window: Duration::from_secs(3600),
            reports: outcomes::InFlight::default(),
            regbot: None,
            upstream_client: crate::proxy::Client::default(),
            changes: None,
        }
    }

    /// Applies what other replicas changed since the last poll (SPEC §8.7). The poller calls
    /// it every `SYNC_INTERVAL_MS`, and every admin request before it runs, so an operator
    /// whose calls a load balancer spreads over replicas reads their own writes.
    pub async fn catch_up(&self) -> Result<(), crate::store::StoreError> {
        match &self.changes {
            Some(poller) => poller.lock().await.poll(self).await,
            None => Ok(()),
        }
    }
}

/// HTTP-level settings that shape the router.
#[derive(Clone, Copy, Debug)]
pub struct HttpSettings {
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub log_requests: bool,
}

/// Every route with its OpenAPI description. `routes!` registers a handler under the method
/// and path of its `#[utoipa::path]` annotation and adds that annotation to the document, so
/// a route cannot exist without its description (add routes here only through `routes!`).
fn documented_routes() -> OpenApiRouter<SharedState> {
    use utoipa::OpenApi;
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(observe::livez))
        .routes(routes!(observe::readyz))
        .routes(routes!(observe::metrics))
        .routes(routes!(openapi::openapi_json))
        .routes(routes!(key::draw_key))
        .routes(routes!(health::admin_health))
        .routes(routes!(tiers::list, tiers::create, tiers::update))
        .routes(routes!(tiers::remove))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::remove, key_state::update))
        .routes(import_route())
        .routes(routes!(import::rekey))
        .routes(routes!(outcomes::report))
        .routes(routes!(consumers::list, consumers::create))
        .routes(routes!(consumers::remove, consumers::update))
        .routes(routes!(consumers::grant_scope))
        .routes(routes!(consumers::rotate_token))
        .routes(routes!(consumers::revoke_scope))
        .routes(routes!(usage::list))
        .routes(routes!(usage::summary))
        .routes(routes!(sources::list))
        .routes(routes!(sources::refresh))
        .routes(routes!(ui::page))
        .routes(routes!(ui::asset))
        .merge(proxy_route())
}

/// `/proxy/{feature}/{*path}` for GET (and HEAD), POST, PUT, PATCH and DELETE — the methods the
/// document lists; any other is 405 like every route (SPEC §8.6): axum's catch-all `{*path}` has no OpenAPI
/// spelling, so the route is registered under it while the document describes the same handler
/// (its annotation) as `/proxy/{feature}/{path}`. Its request body is streamed by the handler,
/// not read through `BODY_LIMIT` (README "Proxy mode" gives the limits).
fn proxy_route() -> OpenApiRouter<SharedState> {
    let (schemas, paths, _) = routes!(proxy::forward);
    let mut router = OpenApiRouter::new().route(
        "/proxy/{feature}/{*path}",
        axum::routing::get(proxy::forward)
            .post(proxy::forward)
            .put(proxy::forward)
            .patch(proxy::forward)
            .delete(proxy::forward),
    );
    let openapi = router.get_openapi_mut();
    openapi.paths.paths.extend(paths.paths);
    openapi
        .components
        .get_or_insert_with(Default::default)
        .schemas
        .extend(schemas);
    router
}

/// `POST /admin/keys/import` with its own body limit (`import::IMPORT_BODY_LIMIT`), set on the
/// route so it overrides the router's `BODY_LIMIT` for this route alone.
fn import_route() -> utoipa_axum::router::UtoipaMethodRouter<SharedState> {
    let (schemas, paths, method) = routes!(import::import);
    (
        schemas,
        paths,
        method.layer(DefaultBodyLimit::max(import::IMPORT_BODY_LIMIT)),
    )
}

/// The whole API.
pub fn router(state: SharedState, settings: HttpSettings) -> Router {
    let write_timeout = settings.write_timeout;
    let metrics = state.metrics.clone();
    // Generate the served document now, so no request pays for it.
    openapi::document();
    ui::prepare();
    let (routes, _) = documented_routes().split_for_parts();
    let mut router = routes
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::Extension(extract::ReadTimeout(settings.read_timeout)))
        .layer(middleware::from_fn_with_state(
            write_timeout,
            enforce_write_timeout,
        ))
        .with_state(state);
    if settings.log_requests {
        router = router.layer(middleware::from_fn(log_request));
    }
    // Outermost, so every answer of the router — fallbacks, 413s, timeouts — carries its id.
    router.layer(observe::ObserveLayer::new(metrics))
}

/// `SERVER_WRITE_TIMEOUT_SECONDS`: a request still running after this long is answered 503 — unless
/// its write is under way (a serve counted, an admin write started; see `write::WriteMarker`):
/// then its answer waits for the commit, which the database bounds (README), because a
/// counted serve must be answered 200 and an applied admin change must not be answered 503.
async fn enforce_write_timeout(
    axum::extract::State(write_timeout): axum::extract::State<Duration>,
    mut req: Request,
    next: Next,
) -> Response {
    let marker = write::WriteMarker::default();
    req.extensions_mut().insert(marker.clone());
    let handler = next.run(req);
    tokio::pin!(handler);
    tokio::select! {
        biased;
        response = &mut handler => response,
        () = tokio::time::sleep(write_timeout) => {
            if marker.time_out() {
                ApiError::Unavailable("request timed out; nothing was changed".into()).into_response()
            } else {
                handler.await
            }
        }
    }
}

/// One line per request: method, path (never the query or headers), status, latency, and the
/// request id the response carries (`observe::ObserveLayer` set it; it is sanitised there).
async fn log_request(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = req
        .extensions()
        .get::<observe::RequestId>()
        .map(|id| id.0.clone());
    let response = next.run(req).await;
    tracing::info!(
        target: "keypooler::http",
        %method,
        path = %path,
        status = response.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        request_id = request_id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or_default(),
        "request"
    );
    response
}
