//! keypooler: the single source of truth for upstream API keys.
//!
//! Hot path: `GET /key` → [`api`] authenticates from memory → [`pool`] picks a key and takes
//! its rate and budget atomically → [`ledger`] commits usage + audit (group commit, via
//! [`store`]) → 200. Admin writes go to the store first, then update the pool in place.

pub mod api;
pub mod config;
pub mod crypto;
pub mod error;
pub mod ledger;
pub mod model;
pub mod pool;
pub mod secret;
pub mod store;
pub mod timestamp;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use api::{AppState, HttpSettings, SharedState};
use config::{Config, LogFormat};
use crypto::Sealer;
use ledger::Ledger;
use pool::Pool;
use store::{Db, StoreError};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the usage writer thread: {0}")]
    Ledger(std::io::Error),
}

/// A built service: state plus router, ready to serve on any listener.
pub struct App {
    pub state: SharedState,
    router: Router,
}

/// Opens the store, loads the pool and starts the group-commit writer.
pub async fn build(config: &Config) -> Result<App, StartupError> {
    let sealer = Sealer::new(config.encryption_key);
    let db = Db::open(config).await?;
    let pool = Pool::load(db.load_snapshot().await?, &sealer);
    for key in pool.keys() {
        if let Err(e) = &key.material {
            tracing::warn!(key_id = %key.id, error = %e, "key cannot be read and will not be served");
        }
    }
    tracing::info!(
        keys = pool.key_count(),
        tiers = pool.tiers().len(),
        consumers = pool.consumers().len(),
        encryption = sealer.enabled(),
        "pool loaded"
    );
    let ledger = Ledger::start(db.clone()).map_err(StartupError::Ledger)?;
    let state = Arc::new(AppState::new(pool, db, ledger, sealer, &config.admin_token));
    let router = api::router(
        state.clone(),
        HttpSettings {
            read_timeout: config.read_timeout,
            write_timeout: config.write_timeout,
            log_requests: config.log_requests,
        },
    );
    Ok(App { state, router })
}

/// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests,
/// commits every pending serve and closes the database.
pub async fn serve<F>(listener: TcpListener, app: App, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let App { state, router } = app;
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    state.ledger.shutdown().await;
    state.db.close().await;
    tracing::info!("stopped with nothing pending");
    result
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
