//! config → tracing → store → app → serve with graceful shutdown; or `keypooler rekey`.

use std::process::ExitCode;

use keypooler::config::Config;

/// mimalloc instead of glibc's malloc: glibc consolidates its fast bins on every request of
/// a kilobyte or more, and malloc and free were ~9 % of the server's CPU on durable `/key`.
/// Built without transparent huge pages (feature `no_thp`), which inflated peak RSS by ~25 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let command = std::env::args_os().nth(1);
    let rekey = match command.as_ref().map(|a| a.to_str()) {
        None => false,
        Some(Some("rekey")) => true,
        Some(_) => {
            eprintln!("keypooler: unknown command; usage: keypooler [rekey]");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keypooler: {e}");
            return ExitCode::from(2);
        }
    };
    keypooler::init_tracing(&config);
    if rekey {
        return run_rekey(&config).await;
    }
    if config.admin_token.expose().len() < 16 {
        tracing::warn!("ADMIN_TOKEN is shorter than 16 characters; use a long random one (openssl rand -hex 32)");
    }

    let app = match keypooler::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            // One line, on stderr, whatever LOG_FORMAT says.
            eprintln!("keypooler: {e}");
            return ExitCode::from(1);
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "keypooler: cannot listen on port {} (SERVER_PORT/PORT): {e}",
                config.port
            );
            return ExitCode::from(1);
        }
    };
    tracing::info!(port = config.port, "listening");

    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining in-flight requests");
        let _ = signalled_tx.send(());
    };
    let grace = config.shutdown_timeout;
    let serving = keypooler::serve(listener, app, shutdown);
    tokio::pin!(serving);
    let deadline = async move {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = &mut serving => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "server error");
                ExitCode::from(1)
            }
        },
        () = deadline => {
            // Whatever was committed is safe; requests still running never got their 200.
            tracing::error!(seconds = grace.as_secs(), "graceful shutdown timed out (SERVER_SHUTDOWN_TIMEOUT_SECONDS)");
            ExitCode::from(1)
        }
    }
}

/// `keypooler rekey`: re-seals every value and secret of the configured database under
/// `ENCRYPTION_KEY` (reading with `ENCRYPTION_KEY_PREVIOUS` too), then prints the counts as one
/// JSON line on stdout. Safe beside a running server (each row changes only if it still holds
/// what was read) and safe to run again.
async fn run_rekey(config: &Config) -> ExitCode {
    let db = match keypooler::store::Db::open(config).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("keypooler: cannot open the database: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = keypooler::rekey::rekey(&db, &keypooler::sealer(config)).await;
    db.close().await;
    match outcome {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keypooler: rekey stopped (what was re-sealed stays; run it again): {e}");
            ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
