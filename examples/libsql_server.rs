//! The test suite's Hrana/libSQL server (tests/api/hrana.rs) as a program, for the remote
//! benchmark (`bench/remote.py`; issue 14 item 4): serves one SQLite file on 127.0.0.1 and
//! sleeps `--delay-ms` before answering each request, to stand in for a database that far away.
//! Built with `cargo build --release --example libsql_server`.
//!
//! `libsql_server --db PATH [--delay-ms N] [--auth-token T]` prints `url=http://127.0.0.1:PORT`
//! once listening and serves until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[allow(dead_code)] // the fault injections only the tests use
#[path = "../tests/api/hrana.rs"]
mod hrana;

struct Args {
    db: PathBuf,
    delay: Duration,
    auth_token: Option<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut db, mut delay, mut auth_token) = (None, Duration::ZERO, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--db" => db = Some(PathBuf::from(value()?)),
            "--delay-ms" => {
                let v = value()?;
                let ms = v
                    .parse()
                    .map_err(|_| format!("--delay-ms {v:?}: not a whole number of ms"))?;
                delay = Duration::from_millis(ms);
            }
            "--auth-token" => auth_token = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let db = db.ok_or("--db PATH is required")?;
    Ok(Args {
        db,
        delay,
        auth_token,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("libsql_server: {e}; usage: libsql_server --db PATH [--delay-ms N] [--auth-token T]");
            return ExitCode::from(2);
        }
    };
    let mut server = hrana::HranaServer::start(&args.db, args.auth_token.as_deref()).await;
    server.set_delay(args.delay);
    println!("url={}", server.url());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("libsql_server: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.stop().await;
    ExitCode::SUCCESS
}
