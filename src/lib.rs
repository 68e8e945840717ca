//! keypooler: the single source of truth for upstream API keys.
//!
//! Hot path: `GET /key` → [`api`] authenticates from memory → [`pool`] picks a key and takes
//! its rate and budget atomically → [`ledger`] commits usage + audit (group commit, via
//! [`store`]) → 200. Admin writes go to the store first, then update the pool in place.

pub mod api;
pub mod audit;
pub mod config;
pub mod crypto;
pub mod error;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod proxy;
pub mod regbot;
pub mod rekey;
pub mod secret;
pub mod store;
pub mod sync;
pub mod timestamp;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::{Extension, Router};
use tokio::net::TcpListener;

use api::{AppState, HttpSettings, SharedState};
use config::{Config, LogFormat, StartupWarnings};
use crypto::Sealer;
use ledger::Ledger;
use metrics::Metrics;
use pool::Pool;
use store::{Db, StoreError};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Regbot(String),
}

/// A built service: state plus router, ready to serve on any listener.
pub struct App {
    pub state: SharedState,
    router: Router,
    idle_timeout: std::time::Duration,
    /// The audit upkeep tasks (side indexes, rollup, pruning), stopped before the database closes.
    audit: audit::AuditJobs,
    /// The RegBot refresh loop (SPEC §8.5), stopped before the database closes.
    regbot: Option<tokio::task::JoinHandle<()>>,
    /// The change-log poller (SPEC §8.7), stopped before the database closes.
    sync: tokio::task::JoinHandle<()>,
}

/// Opens the store, loads the pool and starts the group-commit writer.
pub async fn build(config: &Config) -> Result<App, StartupError> {
    let sealer = sealer(config);
    let db = Db::open(config).await?;
    let metrics = Metrics::new();
    metrics.spawn_upkeep();
    let loading = std::time::Instant::now();
    // The change log's end before the snapshot: whatever lands meanwhile is applied again.
    let sync_from = db.change_log_position().await?;
    let mut snapshot = db.load_snapshot().await?;
    let regbot_rows = std::mem::take(&mut snapshot.regbot_keys);
    let regbot_health: std::collections::HashMap<_, _> = snapshot
        .health
        .iter()
        .filter(|(id, _)| id.starts_with(store::regbot::KEY_PREFIX))
        .map(|(id, h)| (id.clone(), h.clone()))
        .collect();
    let mut pool = Pool::load_metered(snapshot, &sealer, metrics.clone());
    pool.set_throttle_floor(config.host_throttle_floor);
    metrics.set_pool_load_time(loading.elapsed());
    let mut unreadable = 0usize;
    for key in pool.keys() {
        if let Err(e) = &key.material {
            unreadable += 1;
            tracing::warn!(key_id = %key.id, error = %e, "key cannot be read and will not be served");
        }
    }
    if unreadable > 0 {
        tracing::warn!(
            unreadable_keys = unreadable,
            "keys whose value or a secret no configured key (ENCRYPTION_KEY, ENCRYPTION_KEY_PREVIOUS) can open"
        );
    }
    rekey::backfill_value_hashes(&db, &pool, &sealer).await?;
    tracing::info!(
        keys = pool.key_count(),
        tiers = pool.tiers().len(),
        consumers = pool.consumers().len(),
        encryption = sealer.enabled(),
        "pool loaded"
    );
    // A relative DB_PATH is resolved against the working directory; without one it stays
    // relative, compares as outside any volume and so warns (the safe direction).
    let warnings = config.startup_warnings(&std::env::current_dir().unwrap_or_default());
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    let ledger = Ledger::start(db.clone(), metrics.ledger());
    let audit = audit::AuditJobs::start(
        db.clone(),
        config.audit_retention_days,
        config.outcome_window,
    );
    let mut state = AppState::new(
        pool,
        db,
        ledger,
        sealer,
        &config.admin_token,
        metrics,
        config.metrics_token.as_ref(),
    );
    state.outcome_window = config.outcome_window;
    if let Some(ca) = &config.upstream_ca {
        state.upstream_client = proxy::Client::trusting(ca.certificates());
    }
    state.changes = Some(tokio::sync::Mutex::new(sync::Poller::new(
        sync_from,
        sync::LogBound::default(),
    )));
    if let Some(regbot) = &config.regbot {
        let source = regbot::Source::new(regbot, regbot_rows, regbot_health)
            .await
            .map_err(StartupError::Regbot)?;
        state.regbot = Some(Arc::new(source));
    }
    let state = Arc::new(state);
    // The first refresh before serving (bounded; a RegBot that is down leaves the source
    // `stale` with no keys, and startup goes on), then the loop.
    let regbot_task = match &state.regbot {
        Some(source) => {
            source.refresh(&state.pool, &state.db, &state.sealer).await;
            Some(source.spawn(state.pool.clone(), state.db.clone(), state.sealer.clone()))
        }
        None => None,
    };
    let sync = sync::spawn(Arc::downgrade(&state), config.sync_interval);
    let router = api::router(
        state.clone(),
        HttpSettings {
            read_timeout: config.read_timeout,
            write_timeout: config.write_timeout,
            log_requests: config.log_requests,
        },
    )
    .layer(Extension(StartupWarnings(warnings.into())));
    Ok(App {
        state,
        router,
        idle_timeout: config.idle_timeout,
        audit,
        regbot: regbot_task,
        sync,
    })
}

/// The sealer `ENCRYPTION_KEY` and `ENCRYPTION_KEY_PREVIOUS` configure.
pub fn sealer(config: &Config) -> Sealer {
    let previous: Vec<[u8; 32]> = config.encryption_key_previous.iter().map(|k| k.0).collect();
    Sealer::with_previous(config.encryption_key.as_ref().map(|k| k.0), &previous)
}

/// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests,
/// commits every pending serve and closes the database.
///
/// HTTP/1.1 with keep-alive; a connection waiting longer than `SERVER_IDLE_TIMEOUT_SECONDS`
/// for the headers of its next request is closed (hyper's header-read timer, which also
/// bounds slow headers); request bodies and handlers have their own limits in the router.
///
/// On shutdown every connection is closed at once unless a request is being handled on it:
/// one that never handed us a request (idle, or still sending its first headers) is dropped —
/// nothing was ever answered on it, so nothing can be lost; every other one is told to shut
/// down gracefully, which hyper does at once when it sits between requests (idle, or partway
/// through the headers of its next one) and after the response otherwise.
pub async fn serve<F>(listener: TcpListener, app: App, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let App {
        state,
        router,
        idle_timeout,
        audit,
        regbot,
        sync,
    } = app;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle_timeout);
    // `true` once shutdown began; each connection holds a receiver, so `closed()` on the
    // sender resolves when the last connection is gone.
    let (stopping, _) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handed_a_request = Arc::new(AtomicBool::new(false));
        let service = MarkRequests {
            inner: hyper_util::service::TowerToHyperService::new(router.clone()),
            handed_a_request: handed_a_request.clone(),
        };
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let mut stop = stopping.subscribe();
        tokio::spawn(async move {
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                    // Checked between polls of this connection, so hyper cannot be halfway
                    // through handing a request over.
                    if !handed_a_request.load(Ordering::Acquire) {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(stop);
        });
    }
    drop(listener);
    stopping.send_replace(true);
    stopping.closed().await;
    audit.stop().await;
    sync.abort();
    let _ = sync.await;
    if let Some(task) = regbot {
        task.abort();
        let _ = task.await;
    }
    state.ledger.shutdown().await;
    state.db.close().await;
    tracing::info!("stopped with nothing pending");
    Ok(())
}

/// Records that hyper handed its connection a request (it calls the service as soon as a
/// request's headers are parsed, before any of the request is handled).
struct MarkRequests<S> {
    inner: S,
    handed_a_request: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for MarkRequests<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> S::Future {
        self.handed_a_request.store(true, Ordering::Release);
        self.inner.call(request)
    }
}

/// Logs go to stdout as JSON (or compact text with `pretty`). Dependencies that could print
/// request contents (the libSQL client logs whole requests at trace) stay at warn.
pub fn init_tracing(config: &Config) {
    let level = config.log_level.as_str().to_ascii_lowercase();
    let filter = tracing_subscriber::EnvFilter::new(format!(
        "{level},sqlx=warn,libsql=warn,libsql_hrana=warn,hyper=warn,hyper_util=warn,h2=warn,rustls=warn,tower_http=warn"
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
