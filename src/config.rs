//! Configuration from the environment (SPEC §2): our variables are picked out of the raw
//! (possibly non-UTF-8) environment, `validate` turns them into typed values once, and every
//! failure is one line naming the variable and what is allowed.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::secret::Secret;

/// Where the data lives.
#[derive(Clone, Debug)]
pub enum DatabaseConfig {
    /// Embedded SQLite file (the default).
    Local { path: PathBuf },
    /// Remote Turso/libSQL; the URL is kept without its `authToken` query parameter.
    Remote {
        url: Secret,
        auth_token: Option<Secret>,
    },
}

/// How SQLite syncs a commit to disk in WAL mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synchronous {
    /// Committed transactions survive a process crash (`kill -9`); the default.
    Normal,
    /// Committed transactions also survive power loss, at one fsync per group commit.
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The 32-byte AES key; its `Debug` prints `***` so a logged `Config` cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey(pub [u8; 32]);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub admin_token: Secret,
    pub encryption_key: Option<EncryptionKey>,
    /// `ENCRYPTION_KEY_PREVIOUS`: keys tried for reading only, in order (rotation, SPEC §8.3).
    pub encryption_key_previous: Vec<EncryptionKey>,
    pub database: DatabaseConfig,
    pub db_max_open_conns: u32,
    pub db_busy_timeout: Duration,
    pub db_synchronous: Synchronous,
    pub port: u16,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub log_level: tracing::Level,
    pub log_format: LogFormat,
    pub log_requests: bool,
    /// `METRICS_TOKEN`: the bearer token `/metrics` requires; `None` = `/metrics` is public.
    pub metrics_token: Option<Secret>,
    /// `OUTCOME_WINDOW_SECONDS`: how long after a serve its outcome may be reported (SPEC §8.2).
    pub outcome_window: Duration,
    /// `SYNC_INTERVAL_MS` (100–60,000, default 1,000): how often this replica polls the change
    /// log for what other replicas changed (SPEC §8.7, `src/sync.rs`).
    pub sync_interval: Duration,
    /// A throttled tier's shortest cooldown, `None` = SPEC §8.2's 30 s. Never read from the
    /// environment (always `None` in production): tests set it to check the tier's recovery
    /// without waiting 30 s.
    pub host_throttle_floor: Option<Duration>,
    /// `AUDIT_RETENTION_DAYS`: audit rows older than this many days are pruned (after their
    /// day is rolled up); `None` (0, the default) keeps every row.
    pub audit_retention_days: Option<u32>,
    /// Present when running on Railway (`RAILWAY_ENVIRONMENT` set): platform facts, not settings.
    pub railway: Option<Railway>,
    /// `REGBOT_DATABASE_URL` and friends (SPEC §8.5); `None` = the RegBot source is off.
    pub regbot: Option<RegbotConfig>,
    /// `UPSTREAM_CA_FILE`: PEM root certificates proxy mode trusts for `https` upstreams
    /// beside the built-in web roots (an upstream behind a private CA); `None` = built-in only.
    pub upstream_ca: Option<UpstreamCa>,
}

/// The certificates of `UPSTREAM_CA_FILE`, read and checked at startup.
#[derive(Clone, Debug)]
pub struct UpstreamCa {
    /// At least one, each one the proxy's client accepts.
    certificates: Vec<reqwest::Certificate>,
}

impl UpstreamCa {
    /// Reads `path`; an unreadable file, one without a certificate, or one whose certificates
    /// the proxy's client (`proxy::Client::trusting`) cannot take is an error naming it.
    fn read(path: &str) -> Result<UpstreamCa, ConfigError> {
        let bad = |why: String| {
            ConfigError(format!(
                "invalid configuration: UPSTREAM_CA_FILE={path:?} {why}"
            ))
        };
        let pem = std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                bad("holds no PEM certificate (expected -----BEGIN CERTIFICATE----- blocks)".into())
            })?;
        crate::proxy::Client::trusting(certificates.clone())
            .get()
            .map_err(|e| bad(format!("holds a certificate TLS cannot use: {e}")))?;
        Ok(UpstreamCa { certificates })
    }

    pub fn certificates(&self) -> Vec<reqwest::Certificate> {
        self.certificates.clone()
    }
}

/// RegBot's database, read-only (SPEC §8.5).
#[derive(Clone, Debug)]
pub struct RegbotConfig {
    /// A local SQLite file, or a libSQL URL with `REGBOT_AUTH_TOKEN` (or `?authToken=`).
    pub database: DatabaseConfig,
    /// `REGBOT_REFRESH_SECONDS` (1–86,400, default 30).
    pub refresh: Duration,
}

/// What Railway tells the service about where it runs; read as given, never rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Railway {
    /// `RAILWAY_VOLUME_MOUNT_PATH`: where the service's volume is mounted, if it has one.
    pub volume_mount_path: Option<PathBuf>,
}

/// Problems found at startup that do not stop the service; logged and shown in `/admin/health`.
#[derive(Clone, Debug, Default)]
pub struct StartupWarnings(pub Arc<[String]>);

/// A configuration problem: one line naming the variable and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Exactly what the environment says, before validation.
#[derive(Default)]
struct RawConfig {
    admin_token: Option<String>,
    encryption_key: Option<String>,
    encryption_key_previous: Option<String>,
    database_url: Option<String>,
    database_auth_token: Option<String>,
    db_path: Option<String>,
    db_max_open_conns: Option<String>,
    db_busy_timeout_ms: Option<String>,
    db_synchronous: Option<String>,
    server_port: Option<String>,
    port: Option<String>,
    server_read_timeout_seconds: Option<String>,
    server_write_timeout_seconds: Option<String>,
    server_idle_timeout_seconds: Option<String>,
    server_shutdown_timeout_seconds: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    log_requests: Option<String>,
    metrics_token: Option<String>,
    outcome_window_seconds: Option<String>,
    sync_interval_ms: Option<String>,
    audit_retention_days: Option<String>,
    regbot_database_url: Option<String>,
    regbot_auth_token: Option<String>,
    regbot_refresh_seconds: Option<String>,
    upstream_ca_file: Option<String>,
    railway_environment: Option<OsString>,
    railway_volume_mount_path: Option<OsString>,
}

impl RawConfig {
    /// Where one of our variables goes; `None` for every other name.
    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "ADMIN_TOKEN" => &mut self.admin_token,
            "ENCRYPTION_KEY" => &mut self.encryption_key,
            "ENCRYPTION_KEY_PREVIOUS" => &mut self.encryption_key_previous,
            "DATABASE_URL" => &mut self.database_url,
            "DATABASE_AUTH_TOKEN" => &mut self.database_auth_token,
            "DB_PATH" => &mut self.db_path,
            "DB_MAX_OPEN_CONNS" => &mut self.db_max_open_conns,
            "DB_BUSY_TIMEOUT_MS" => &mut self.db_busy_timeout_ms,
            "DB_SYNCHRONOUS" => &mut self.db_synchronous,
            "SERVER_PORT" => &mut self.server_port,
            "PORT" => &mut self.port,
            "SERVER_READ_TIMEOUT_SECONDS" => &mut self.server_read_timeout_seconds,
            "SERVER_WRITE_TIMEOUT_SECONDS" => &mut self.server_write_timeout_seconds,
            "SERVER_IDLE_TIMEOUT_SECONDS" => &mut self.server_idle_timeout_seconds,
            "SERVER_SHUTDOWN_TIMEOUT_SECONDS" => &mut self.server_shutdown_timeout_seconds,
            "LOG_LEVEL" => &mut self.log_level,
            "LOG_FORMAT" => &mut self.log_format,
            "LOG_REQUESTS" => &mut self.log_requests,
            "METRICS_TOKEN" => &mut self.metrics_token,
            "OUTCOME_WINDOW_SECONDS" => &mut self.outcome_window_seconds,
            "SYNC_INTERVAL_MS" => &mut self.sync_interval_ms,
            "AUDIT_RETENTION_DAYS" => &mut self.audit_retention_days,
            "REGBOT_DATABASE_URL" => &mut self.regbot_database_url,
            "REGBOT_AUTH_TOKEN" => &mut self.regbot_auth_token,
            "REGBOT_REFRESH_SECONDS" => &mut self.regbot_refresh_seconds,
            "UPSTREAM_CA_FILE" => &mut self.upstream_ca_file,
            _ => return None,
        })
    }
}

impl Config {
    /// Reads the process environment, which may hold variables that are not UTF-8.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_os_vars(std::env::vars_os())
    }

    /// Reads the given UTF-8 variables (tests pass their own).
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Self::from_os_vars(
            vars.into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    /// Reads the given variables as the OS holds them. Any variable that is not ours is
    /// ignored whatever its bytes; one of ours that is not UTF-8 is an error naming it (its
    /// bytes are never echoed: it may be a secret).
    pub fn from_os_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (OsString, OsString)>,
    {
        let mut raw = RawConfig::default();
        for (name, value) in vars {
            let Some(name) = name.to_str() else {
                continue; // none of our names is anything but ASCII
            };
            match name {
                "RAILWAY_ENVIRONMENT" => raw.railway_environment = Some(value),
                "RAILWAY_VOLUME_MOUNT_PATH" => raw.railway_volume_mount_path = Some(value),
                _ => {
                    if let Some(slot) = raw.slot(name) {
                        *slot = Some(value.into_string().map_err(|_| {
                            ConfigError(format!(
                                "invalid configuration: {name} is not valid UTF-8; set it to UTF-8 text"
                            ))
                        })?);
                    }
                }
            }
        }
        raw.validate()
    }

    /// Startup warnings about where the data lives; `cwd` resolves a relative `DB_PATH`.
    pub fn startup_warnings(&self, cwd: &Path) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (Some(railway), DatabaseConfig::Local { path }) = (&self.railway, &self.database) {
            warnings.extend(railway_storage_warning(railway, path, cwd));
        }
        warnings
    }
}

/// On Railway only a volume outlives a redeploy: a SQLite file anywhere else is lost with
/// every new deployment, silently, so say so loudly and say how to fix it.
fn railway_storage_warning(railway: &Railway, db_path: &Path, cwd: &Path) -> Option<String> {
    let db_file = absolute(db_path, cwd);
    let folder = db_file.parent().map_or_else(
        || db_file.display().to_string(),
        |p| p.display().to_string(),
    );
    match &railway.volume_mount_path {
        Some(mount) if db_file.starts_with(absolute(mount, cwd)) => None,
        Some(mount) => Some(format!(
            "DATA LOSS AHEAD: running on Railway with the SQLite file {} outside the service's volume \
             (RAILWAY_VOLUME_MOUNT_PATH={}); every redeploy starts from an empty filesystem and wipes \
             the pool (keys, consumers, usage). Fix: mount the volume at {folder}, or set DB_PATH to a \
             file under {}",
            db_file.display(),
            mount.display(),
            mount.display(),
        )),
        None => Some(format!(
            "DATA LOSS AHEAD: running on Railway with the SQLite file {} and no volume \
             (RAILWAY_VOLUME_MOUNT_PATH is unset); every redeploy starts from an empty filesystem and \
             wipes the pool (keys, consumers, usage). Fix: add a volume mounted at {folder} (the \
             DB_PATH folder), or use a remote database (DATABASE_URL)",
            db_file.display(),
        )),
    }
}

/// `path` made absolute against `cwd`, with `.` and `..` resolved lexically (symlinks are not
/// followed: the file may not exist yet).
fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in cwd.join(path).components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Empty means unset, so `SERVER_PORT=` falls back to the default like a missing variable.
fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn bad(var: &str, value: &str, allowed: &str) -> ConfigError {
    ConfigError(format!(
        "invalid configuration: {var}={value:?} is not allowed: {allowed}"
    ))
}

/// For secrets: name the variable and the rule, never the value.
fn bad_secret(var: &str, allowed: &str) -> ConfigError {
    ConfigError(format!(
        "invalid configuration: {var} is not allowed: {allowed}"
    ))
}

fn int_at_least<T>(
    var: &str,
    raw: &Option<String>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display,
{
    let Some(s) = present(raw) else {
        return Ok(default);
    };
    let allowed = format!("expected a whole number from {min} to {max}");
    let v: T = s.parse().map_err(|_| bad(var, s, &allowed))?;
    if v < min || v > max {
        return Err(bad(var, s, &allowed));
    }
    Ok(v)
}

/// The longest `AUDIT_RETENTION_DAYS`: 100 years (0 = keep every row).
pub const MAX_AUDIT_RETENTION_DAYS: u32 = 36_500;

/// `SYNC_INTERVAL_MS`'s bounds: 100 ms to a minute (SPEC §8.7).
pub const MIN_SYNC_INTERVAL_MS: u64 = 100;
pub const MAX_SYNC_INTERVAL_MS: u64 = 60_000;

/// The longest `OUTCOME_WINDOW_SECONDS`: 30 days.
pub const MAX_OUTCOME_WINDOW_SECONDS: u64 = 2_592_000;

fn seconds(var: &str, raw: &Option<String>, default: u64) -> Result<Duration, ConfigError> {
    int_at_least(var, raw, default, 1, 86_400).map(Duration::from_secs)
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let admin_token = match self.admin_token.as_deref() {
            None | Some("") => {
                return Err(ConfigError(
                    "invalid configuration: ADMIN_TOKEN is required (the admin bearer token, e.g. `openssl rand -hex 32`)".into(),
                ))
            }
            Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(bad_secret(
                    "ADMIN_TOKEN",
                    "it must not contain spaces or control characters",
                ))
            }
            Some(t) => Secret::new(t),
        };

        let encryption_key = match present(&self.encryption_key) {
            None => None,
            Some(hex_key) => {
                let allowed =
                    "expected exactly 64 hex characters (32 bytes), or empty for plaintext at rest";
                if hex_key.len() != 64 {
                    return Err(bad_secret("ENCRYPTION_KEY", allowed));
                }
                let mut key = [0u8; 32];
                hex::decode_to_slice(hex_key, &mut key)
                    .map_err(|_| bad_secret("ENCRYPTION_KEY", allowed))?;
                Some(EncryptionKey(key))
            }
        };

        let encryption_key_previous = match present(&self.encryption_key_previous) {
            None => Vec::new(),
            Some(_) if encryption_key.is_none() => {
                return Err(bad_secret(
                    "ENCRYPTION_KEY_PREVIOUS",
                    "it needs ENCRYPTION_KEY (the key new writes are sealed with)",
                ))
            }
            Some(list) => {
                let mut keys = Vec::new();
                for (i, entry) in list.split(',').map(str::trim).enumerate() {
                    let mut key = [0u8; 32];
                    if entry.len() != 64 || hex::decode_to_slice(entry, &mut key).is_err() {
                        return Err(bad_secret(
                            "ENCRYPTION_KEY_PREVIOUS",
                            &format!(
                                "entry {} is not 64 hex characters; expected comma-separated keys of exactly 64 hex characters each",
                                i + 1
                            ),
                        ));
                    }
                    keys.push(EncryptionKey(key));
                }
                keys
            }
        };

        let database = match present(&self.database_url) {
            None => DatabaseConfig::Local {
                path: PathBuf::from(present(&self.db_path).unwrap_or("./data/pool.db")),
            },
            Some(url) => remote_database(url, present(&self.database_auth_token))?,
        };

        let db_max_open_conns =
            int_at_least("DB_MAX_OPEN_CONNS", &self.db_max_open_conns, 1u32, 1, 1024)?;
        let db_busy_timeout = Duration::from_millis(int_at_least(
            "DB_BUSY_TIMEOUT_MS",
            &self.db_busy_timeout_ms,
            5000u64,
            1,
            3_600_000,
        )?);
        let db_synchronous = match present(&self.db_synchronous)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("normal") => Synchronous::Normal,
            Some("full") => Synchronous::Full,
            Some(_) => {
                return Err(bad(
                    "DB_SYNCHRONOUS",
                    present(&self.db_synchronous).unwrap_or_default(),
                    "expected normal or full",
                ))
            }
        };

        // SERVER_PORT wins; Railway's PORT is honoured when SERVER_PORT is unset.
        let port = if present(&self.server_port).is_some() {
            int_at_least("SERVER_PORT", &self.server_port, 8080u16, 1, 65535)?
        } else {
            int_at_least("PORT", &self.port, 8080u16, 1, 65535)?
        };

        let log_level = match present(&self.log_level)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("info") => tracing::Level::INFO,
            Some("debug") => tracing::Level::DEBUG,
            Some("warn") => tracing::Level::WARN,
            Some("error") => tracing::Level::ERROR,
            Some(_) => {
                return Err(bad(
                    "LOG_LEVEL",
                    present(&self.log_level).unwrap_or_default(),
                    "expected debug, info, warn or error",
                ))
            }
        };
        let log_format = match present(&self.log_format)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(_) => {
                return Err(bad(
                    "LOG_FORMAT",
                    present(&self.log_format).unwrap_or_default(),
                    "expected json or pretty",
                ))
            }
        };
        let log_requests = match present(&self.log_requests)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(_) => {
                return Err(bad(
                    "LOG_REQUESTS",
                    present(&self.log_requests).unwrap_or_default(),
                    "expected true or false",
                ))
            }
        };

        // Like ADMIN_TOKEN it is a secret: the error names the rule, never the value.
        let metrics_token = match self.metrics_token.as_deref() {
            None | Some("") => None,
            Some(t) if t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(bad_secret(
                    "METRICS_TOKEN",
                    "it must not contain spaces or control characters (leave it unset for a public /metrics)",
                ))
            }
            Some(t) => Some(Secret::new(t)),
        };

        let regbot = match present(&self.regbot_database_url) {
            None => None,
            Some(url) => {
                let lower = url.to_ascii_lowercase();
                let database = if ["libsql://", "https://", "http://"]
                    .iter()
                    .any(|s| lower.starts_with(s))
                {
                    remote_url("REGBOT_DATABASE_URL", url, present(&self.regbot_auth_token))?
                } else {
                    DatabaseConfig::Local {
                        path: PathBuf::from(url),
                    }
                };
                let refresh = int_at_least(
                    "REGBOT_REFRESH_SECONDS",
                    &self.regbot_refresh_seconds,
                    30u64,
                    1,
                    86_400,
                )?;
                Some(RegbotConfig {
                    database,
                    refresh: Duration::from_secs(refresh),
                })
            }
        };
        if regbot.is_none() && present(&self.regbot_refresh_seconds).is_some() {
            int_at_least(
                "REGBOT_REFRESH_SECONDS",
                &self.regbot_refresh_seconds,
                30u64,
                1,
                86_400,
            )?;
        }

        let upstream_ca = present(&self.upstream_ca_file)
            .map(UpstreamCa::read)
            .transpose()?;

        Ok(Config {
            upstream_ca,
            admin_token,
            encryption_key,
            encryption_key_previous,
            database,
            db_max_open_conns,
            db_busy_timeout,
            db_synchronous,
            port,
            read_timeout: seconds(
                "SERVER_READ_TIMEOUT_SECONDS",
                &self.server_read_timeout_seconds,
                30,
            )?,
            write_timeout: seconds(
                "SERVER_WRITE_TIMEOUT_SECONDS",
                &self.server_write_timeout_seconds,
                30,
            )?,
            idle_timeout: seconds(
                "SERVER_IDLE_TIMEOUT_SECONDS",
                &self.server_idle_timeout_seconds,
                120,
            )?,
            shutdown_timeout: seconds(
                "SERVER_SHUTDOWN_TIMEOUT_SECONDS",
                &self.server_shutdown_timeout_seconds,
                30,
            )?,
            log_level,
            log_format,
            log_requests,
            metrics_token,
            outcome_window: int_at_least(
                "OUTCOME_WINDOW_SECONDS",
                &self.outcome_window_seconds,
                3600,
                1,
                MAX_OUTCOME_WINDOW_SECONDS,
            )
            .map(Duration::from_secs)?,
            sync_interval: int_at_least(
                "SYNC_INTERVAL_MS",
                &self.sync_interval_ms,
                1000,
                MIN_SYNC_INTERVAL_MS,
                MAX_SYNC_INTERVAL_MS,
            )
            .map(Duration::from_millis)?,
            host_throttle_floor: None,
            audit_retention_days: Some(int_at_least(
                "AUDIT_RETENTION_DAYS",
                &self.audit_retention_days,
                0,
                0,
                MAX_AUDIT_RETENTION_DAYS,
            )?)
            .filter(|&days| days > 0),
            railway: self
                .railway_environment
                .filter(|env| !env.is_empty())
                .map(|_| Railway {
                    volume_mount_path: self
                        .railway_volume_mount_path
                        .filter(|p| !p.is_empty())
                        .map(PathBuf::from),
                }),
            regbot,
        })
    }
}

/// Splits `?authToken=` off a remote URL; the token never appears in an error.
fn remote_database(url: &str, env_token: Option<&str>) -> Result<DatabaseConfig, ConfigError> {
    remote_url("DATABASE_URL", url, env_token)
}

/// `remote_database` for the variable `var` (`DATABASE_URL`, `REGBOT_DATABASE_URL`).
fn remote_url(
    var: &str,
    url: &str,
    env_token: Option<&str>,
) -> Result<DatabaseConfig, ConfigError> {
    let allowed = "expected a libsql://, https:// or http:// URL with a host";
    let lower = url.to_ascii_lowercase();
    let (scheme, rest) = ["libsql://", "https://", "http://"]
        .iter()
        .find_map(|s| lower.starts_with(s).then(|| (*s, &url[s.len()..])))
        .ok_or_else(|| bad_secret(var, allowed))?;
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let host = base.split('/').next().unwrap_or_default();
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad_secret(var, allowed));
    }
    let mut url_token = None;
    let mut kept = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("authToken", v)) if !v.is_empty() => url_token = Some(v.to_string()),
            _ => kept.push(pair),
        }
    }
    let mut clean = format!("{scheme}{base}");
    if !kept.is_empty() {
        clean.push('?');
        clean.push_str(&kept.join("&"));
    }
    let auth_token = url_token
        .or_else(|| env_token.map(str::to_string))
        .map(Secret::new);
    Ok(DatabaseConfig::Remote {
        url: Secret::new(clean),
        auth_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_need_only_the_admin_token() {
        let c = cfg(&[("ADMIN_TOKEN", "t0ken")]).expect("valid");
        assert_eq!(c.port, 8080);
        assert_eq!(c.db_max_open_conns, 1);
        assert_eq!(c.db_busy_timeout, Duration::from_millis(5000));
        assert!(c.encryption_key.is_none());
        assert!(c.metrics_token.is_none());
        assert!(c.log_requests);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.outcome_window, Duration::from_secs(3600));
        assert_eq!(c.sync_interval, Duration::from_millis(1000));
        assert_eq!(
            c.host_throttle_floor, None,
            "SPEC §8.2's 30 s; no variable sets it"
        );
        assert_eq!(c.audit_retention_days, None);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert!(
            matches!(c.database, DatabaseConfig::Local { ref path } if path == &PathBuf::from("./data/pool.db"))
        );
    }

    #[test]
    fn debug_of_the_config_shows_no_secret() {
        let c = cfg(&[
            ("ADMIN_TOKEN", "admin-SECRET-token"),
            ("ENCRYPTION_KEY", &"ab".repeat(32)),
            (
                "DATABASE_URL",
                "libsql://db.example.io?authToken=db-SECRET-token",
            ),
            ("METRICS_TOKEN", "metrics-SECRET-token"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in [
            "admin-SECRET-token",
            "metrics-SECRET-token",
            "abab",
            "171, 171",
            "db-SECRET-token",
            "db.example.io",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn missing_admin_token_names_the_variable() {
        let e = cfg(&[]).unwrap_err().to_string();
        assert!(e.contains("ADMIN_TOKEN is required"), "{e}");
        let e = cfg(&[("ADMIN_TOKEN", "")]).unwrap_err().to_string();
        assert!(e.contains("ADMIN_TOKEN"), "{e}");
    }

    // Issue 8 item 3: METRICS_TOKEN is optional, a secret, and never echoed when refused.
    #[test]
    fn metrics_token_is_optional_and_never_echoed() {
        let c = cfg(&[("ADMIN_TOKEN", "t"), ("METRICS_TOKEN", "scrape-me")]).unwrap();
        assert_eq!(
            c.metrics_token.as_ref().map(Secret::expose),
            Some("scrape-me")
        );
        let c = cfg(&[("ADMIN_TOKEN", "t"), ("METRICS_TOKEN", "")]).unwrap();
        assert!(c.metrics_token.is_none());
        let e = cfg(&[("ADMIN_TOKEN", "t"), ("METRICS_TOKEN", "has space-SECRET")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("METRICS_TOKEN") && !e.contains("SECRET"), "{e}");
    }

    #[test]
    fn port_is_honoured_when_server_port_is_unset() {
        assert_eq!(
            cfg(&[("ADMIN_TOKEN", "t"), ("PORT", "3000")]).unwrap().port,
            3000
        );
        let both = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("PORT", "3000"),
            ("SERVER_PORT", "9000"),
        ])
        .unwrap();
        assert_eq!(both.port, 9000);
    }

    #[test]
    fn bad_values_name_the_variable_and_what_is_allowed() {
        for (var, value, needle) in [
            ("SERVER_PORT", "abc", "1 to 65535"),
            ("SERVER_PORT", "0", "1 to 65535"),
            ("PORT", "70000", "1 to 65535"),
            ("DB_MAX_OPEN_CONNS", "0", "1 to 1024"),
            ("DB_BUSY_TIMEOUT_MS", "-5", "whole number"),
            ("SERVER_READ_TIMEOUT_SECONDS", "0", "1 to 86400"),
            ("SERVER_SHUTDOWN_TIMEOUT_SECONDS", "1.5", "whole number"),
            ("LOG_LEVEL", "verbose", "debug, info, warn or error"),
            ("LOG_FORMAT", "xml", "json or pretty"),
            ("LOG_REQUESTS", "maybe", "true or false"),
            ("DB_SYNCHRONOUS", "off", "normal or full"),
            // Issue 9 item 1: the outcome window is 1 s to 30 days.
            ("OUTCOME_WINDOW_SECONDS", "0", "1 to 2592000"),
            ("OUTCOME_WINDOW_SECONDS", "2592001", "1 to 2592000"),
            ("OUTCOME_WINDOW_SECONDS", "1h", "whole number"),
            // Issue 14 item 3: the change log is polled every 100 ms to a minute.
            ("SYNC_INTERVAL_MS", "99", "100 to 60000"),
            ("SYNC_INTERVAL_MS", "60001", "100 to 60000"),
            ("SYNC_INTERVAL_MS", "1s", "whole number"),
            // Issue 10 item 4: retention is whole days, 0 (keep all) to 100 years.
            ("AUDIT_RETENTION_DAYS", "-1", "0 to 36500"),
            ("AUDIT_RETENTION_DAYS", "36501", "0 to 36500"),
            ("AUDIT_RETENTION_DAYS", "7d", "whole number"),
        ] {
            let e = cfg(&[("ADMIN_TOKEN", "t"), (var, value)])
                .unwrap_err()
                .to_string();
            assert!(e.contains(var) && e.contains(needle), "{var}={value}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn encryption_key_must_be_64_hex_and_is_never_echoed() {
        let k = "ab".repeat(32);
        assert_eq!(
            cfg(&[("ADMIN_TOKEN", "t"), ("ENCRYPTION_KEY", &k)])
                .unwrap()
                .encryption_key,
            Some(EncryptionKey([0xab; 32]))
        );
        for bad_key in ["abc", &"zz".repeat(32), &"ab".repeat(33)] {
            let e = cfg(&[("ADMIN_TOKEN", "t"), ("ENCRYPTION_KEY", bad_key)])
                .unwrap_err()
                .to_string();
            assert!(e.contains("ENCRYPTION_KEY") && e.contains("64 hex"), "{e}");
            assert!(!e.contains(bad_key));
        }
    }

    #[test]
    fn previous_encryption_keys_are_a_comma_separated_list_never_echoed() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let c = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("ENCRYPTION_KEY", &a),
            ("ENCRYPTION_KEY_PREVIOUS", &format!("{b}, {a}")),
        ])
        .unwrap();
        assert_eq!(
            c.encryption_key_previous,
            vec![EncryptionKey([0xcd; 32]), EncryptionKey([0xab; 32])]
        );
        let bad_list = format!("{b},{}", "zz".repeat(32));
        for bad in [bad_list.as_str(), "abc", &format!("{b},")] {
            let e = cfg(&[
                ("ADMIN_TOKEN", "t"),
                ("ENCRYPTION_KEY", &a),
                ("ENCRYPTION_KEY_PREVIOUS", bad),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("ENCRYPTION_KEY_PREVIOUS") && e.contains("64 hex"),
                "{e}"
            );
            assert!(!e.contains(&b) && !e.contains("zz"), "{e}");
        }
        let e = cfg(&[("ADMIN_TOKEN", "t"), ("ENCRYPTION_KEY_PREVIOUS", &b)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ENCRYPTION_KEY_PREVIOUS") && !e.contains(&b),
            "{e}"
        );
    }

    fn os(bytes: &[u8]) -> OsString {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(bytes).to_os_string()
    }

    // Issue 7 item 6: a non-UTF-8 variable that is not ours is ignored, name or value.
    #[test]
    fn unrelated_variables_that_are_not_utf8_are_ignored() {
        let c = Config::from_os_vars([
            (os(b"ADMIN_TOKEN"), os(b"t0ken")),
            (os(b"LANG_\xff"), os(b"x")),
            (os(b"OTHER"), os(b"caf\xe9")),
            (os(b"SERVER_PORT"), os(b"9000")),
        ])
        .expect("unrelated non-UTF-8 variables do not matter");
        assert_eq!(c.port, 9000);
    }

    // Issue 7 item 6: one of ours that is not UTF-8 is one line naming it, its bytes not shown.
    #[test]
    fn our_variable_that_is_not_utf8_is_named_and_not_echoed() {
        for var in ["ADMIN_TOKEN", "ENCRYPTION_KEY", "DB_PATH", "LOG_LEVEL"] {
            let mut vars = vec![(os(b"ADMIN_TOKEN"), os(b"t0ken"))];
            vars.push((os(var.as_bytes()), os(b"sekret\xff\xfe")));
            let e = Config::from_os_vars(vars).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains("UTF-8"), "{var}: {e}");
            assert!(!e.contains("sekret") && !e.contains('\n'), "{var}: {e}");
        }
    }

    fn warnings(pairs: &[(&str, &str)], cwd: &str) -> Vec<String> {
        let mut vars = vec![("ADMIN_TOKEN", "t")];
        vars.extend_from_slice(pairs);
        cfg(&vars).unwrap().startup_warnings(Path::new(cwd))
    }

    // Issue 7 item 10: SQLite outside the Railway volume is lost on every redeploy.
    #[test]
    fn railway_without_the_database_on_its_volume_warns() {
        let on_railway = ("RAILWAY_ENVIRONMENT", "production");
        assert!(warnings(&[], "/app").is_empty(), "not on Railway");
        assert!(
            warnings(
                &[("DATABASE_URL", "libsql://db.example.io"), on_railway],
                "/app"
            )
            .is_empty(),
            "remote data survives a redeploy"
        );
        for (vars, cwd) in [
            (vec![on_railway], "/app"),
            (
                vec![on_railway, ("RAILWAY_VOLUME_MOUNT_PATH", "/app/data2")],
                "/app",
            ),
            (
                vec![on_railway, ("RAILWAY_VOLUME_MOUNT_PATH", "/data")],
                "/app",
            ),
            (
                vec![
                    on_railway,
                    ("RAILWAY_VOLUME_MOUNT_PATH", "/app/data"),
                    ("DB_PATH", "/app/data/../pool.db"),
                ],
                "/",
            ),
        ] {
            let w = warnings(&vars, cwd);
            assert_eq!(w.len(), 1, "{vars:?}: {w:?}");
            assert!(
                w[0].contains("Railway") && w[0].contains("redeploy") && w[0].contains("DB_PATH"),
                "{w:?}"
            );
        }
        let w = warnings(&[on_railway], "/app");
        assert!(
            w[0].contains("/app/data/pool.db") && w[0].contains("volume mounted at /app/data"),
            "{w:?}"
        );
        for (vars, cwd) in [
            (
                vec![on_railway, ("RAILWAY_VOLUME_MOUNT_PATH", "/app/data")],
                "/app",
            ),
            (
                vec![on_railway, ("RAILWAY_VOLUME_MOUNT_PATH", "/app/data/")],
                "/app",
            ),
            (
                vec![on_railway, ("RAILWAY_VOLUME_MOUNT_PATH", "/app")],
                "/app",
            ),
            (
                vec![
                    on_railway,
                    ("RAILWAY_VOLUME_MOUNT_PATH", "/data"),
                    ("DB_PATH", "../data/./kp/pool.db"),
                ],
                "/app",
            ),
        ] {
            assert!(warnings(&vars, cwd).is_empty(), "{vars:?} is on the volume");
        }
    }

    #[test]
    fn railway_facts_are_read_whatever_their_bytes() {
        let c = Config::from_os_vars([
            (os(b"ADMIN_TOKEN"), os(b"t")),
            (os(b"RAILWAY_ENVIRONMENT"), os(b"prod\xff")),
            (os(b"RAILWAY_VOLUME_MOUNT_PATH"), os(b"/vol\xff")),
        ])
        .expect("platform facts never stop startup");
        assert_eq!(
            c.railway,
            Some(Railway {
                volume_mount_path: Some(PathBuf::from(os(b"/vol\xff")))
            })
        );
        assert_eq!(
            cfg(&[("ADMIN_TOKEN", "t"), ("RAILWAY_ENVIRONMENT", "")])
                .unwrap()
                .railway,
            None
        );
    }

    #[test]
    fn remote_url_takes_its_token_from_the_query_or_the_env() {
        let c = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("DATABASE_URL", "libsql://db.example.io?authToken=sekret"),
        ])
        .unwrap();
        match c.database {
            DatabaseConfig::Remote { url, auth_token } => {
                assert_eq!(url.expose(), "libsql://db.example.io");
                assert_eq!(auth_token.unwrap().expose(), "sekret");
            }
            other => panic!("expected remote, got {other:?}"),
        }
        let c = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("DATABASE_URL", "https://db.example.io"),
            ("DATABASE_AUTH_TOKEN", "envtok"),
        ])
        .unwrap();
        assert!(
            matches!(c.database, DatabaseConfig::Remote { auth_token: Some(ref t), .. } if t.expose() == "envtok")
        );
        let e = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("DATABASE_URL", "postgres://x?authToken=sekret"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("DATABASE_URL") && !e.contains("sekret"), "{e}");
    }

    // Issue 12 item 1: REGBOT_DATABASE_URL, REGBOT_AUTH_TOKEN, REGBOT_REFRESH_SECONDS.
    #[test]
    fn regbot_source_is_off_by_default_and_validated() {
        let c = cfg(&[("ADMIN_TOKEN", "t")]).unwrap();
        assert!(c.regbot.is_none());
        let c = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("REGBOT_DATABASE_URL", "/data/regbot.db"),
        ])
        .unwrap();
        let r = c.regbot.expect("on");
        assert_eq!(r.refresh, Duration::from_secs(30));
        assert!(
            matches!(r.database, DatabaseConfig::Local { ref path } if path == &PathBuf::from("/data/regbot.db"))
        );
        let c = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("REGBOT_DATABASE_URL", "libsql://regbot.example.io"),
            ("REGBOT_AUTH_TOKEN", "rb-SECRET"),
            ("REGBOT_REFRESH_SECONDS", "86400"),
        ])
        .unwrap();
        let r = c.regbot.expect("on");
        assert_eq!(r.refresh, Duration::from_secs(86_400));
        assert!(
            matches!(r.database, DatabaseConfig::Remote { auth_token: Some(ref t), .. } if t.expose() == "rb-SECRET")
        );
        assert!(!format!("{r:?}").contains("SECRET"));
        for bad in ["0", "86401", "30s", "-1"] {
            for url in [Some("/data/regbot.db"), None] {
                let mut vars = vec![("ADMIN_TOKEN", "t"), ("REGBOT_REFRESH_SECONDS", bad)];
                vars.extend(url.map(|u| ("REGBOT_DATABASE_URL", u)));
                let e = cfg(&vars).unwrap_err().to_string();
                assert!(
                    e.contains("REGBOT_REFRESH_SECONDS") && e.contains("1 to 86400"),
                    "{e}"
                );
            }
        }
        let e = cfg(&[
            ("ADMIN_TOKEN", "t"),
            ("REGBOT_DATABASE_URL", "https://?authToken=rb-SECRET"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("REGBOT_DATABASE_URL") && !e.contains("SECRET"),
            "{e}"
        );
    }

    // Issue 13 item 2: UPSTREAM_CA_FILE, read and checked at startup.
    #[test]
    fn upstream_ca_file_is_read_and_checked() {
        assert!(cfg(&[("ADMIN_TOKEN", "t")]).unwrap().upstream_ca.is_none());
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/upstream_tls/ca.pem"
        );
        let c = cfg(&[("ADMIN_TOKEN", "t"), ("UPSTREAM_CA_FILE", fixture)]).unwrap();
        let ca = c.upstream_ca.expect("set");
        assert_eq!(ca.certificates().len(), 1);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, why) in [
            (&missing, "cannot be read"),
            (&empty, "holds no PEM certificate"),
            (&broken, "TLS cannot use"),
        ] {
            let e = cfg(&[
                ("ADMIN_TOKEN", "t"),
                ("UPSTREAM_CA_FILE", path.to_str().unwrap()),
            ])
            .unwrap_err()
            .to_string();
            assert!(e.contains("UPSTREAM_CA_FILE") && e.contains(why), "{e}");
        }
    }
}
