//! Issue 7 item 5, disk use: the WAL stays bounded under sustained group commits, and on a full
//! disk (the real binary on a small filesystem that fills up) every write that cannot be stored
//! answers 503 (JSON), every 2xx survives a `kill -9` and restart, and the service recovers by
//! itself — no restart — once space is freed.
//!
//! The filesystem is a tmpfs mounted in a private mount namespace (`unshare -m`, or a rootless
//! `unshare -Urm`); the server runs inside it through `nsenter`, and the test fills and frees it
//! through `/proc/<holder>/root`. Where neither is permitted the test says so LOUDLY and runs a
//! fallback — also under `CI=true`, since it still fails real writes, so it is a test and not a
//! skip: the server's file-size limit (`RLIMIT_FSIZE`) is lowered to
//! the files' current sizes and raised again, so growing the WAL or the database fails the same
//! way (a short write, EFBIG instead of ENOSPC). `max_page_count` was not used for the fallback:
//! it is per connection, so the binary would need a test-only setting, and it fails in the pager
//! before any write reaches the disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::open_db;
use crate::process::{
    as_refs, distinctive, quiet_env, read_log, start_server_via, ChildGuard, Server,
};

/// Set to run the fallback even where a tmpfs can be mounted (to test the fallback itself).
const FORCE_FALLBACK: &str = "KEYPOOLER_TEST_DISK_FULL_FALLBACK";
/// The tmpfs: room for the schema, the setup and a WAL of a few hundred frames.
const TMPFS_SIZE: &str = "4m";
/// Full-disk phase: stop after this many 503s of each kind, or this many rounds.
const FAILURES_WANTED: usize = 3;
const MAX_ROUNDS: usize = 20;
/// How long the service may take to recover once space is freed.
const RECOVERY: Duration = Duration::from_secs(15);

/// An executable found on `PATH` (the server's environment is cleared, so launchers get
/// absolute paths).
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn loud(message: &str) {
    let bar = "!".repeat(100);
    eprintln!("\n{bar}\n!!! disk_full: {message}\n{bar}\n");
}

/// Where the server's files live, and how the test makes that place full and frees it.
enum Disk {
    Tmpfs {
        /// `sleep` inside the private mount namespace, keeping the tmpfs alive across restarts.
        _holder: ChildGuard,
        /// The mount point as the server sees it.
        inside: PathBuf,
        /// The same folder as seen from the test (`/proc/<holder>/root/…`).
        outside: PathBuf,
        nsenter: Vec<String>,
    },
    Rlimit {
        dir: PathBuf,
        prlimit: PathBuf,
        sh: PathBuf,
        /// The server the limit applies to.
        pid: Option<u32>,
    },
}

impl Disk {
    /// A tmpfs in a private mount namespace (as root, else rootless), else the fallback.
    async fn new(dir: &Path) -> Disk {
        let mount_point = dir.join("disk");
        std::fs::create_dir_all(&mount_point).expect("create the mount point");
        let tools = (
            which("unshare"),
            which("nsenter"),
            which("sh"),
            which("sleep"),
        );
        let mut why = String::from("unshare, nsenter, sh or sleep is not installed");
        if std::env::var_os(FORCE_FALLBACK).is_some() {
            why = format!("{FORCE_FALLBACK} is set");
        } else if let (Some(unshare), Some(nsenter), Some(sh), Some(sleep)) = &tools {
            for rootless in [false, true] {
                match Disk::tmpfs(unshare, nsenter, sh, sleep, &mount_point, rootless).await {
                    Ok(disk) => return disk,
                    Err(e) => why = e,
                }
            }
        }
        loud(&format!(
            "cannot mount a tmpfs in a private mount namespace ({why}); falling back to a \
             file-size limit (RLIMIT_FSIZE), which fails writes the same way but is NOT a full disk"
        ));
        let (Some(prlimit), Some(sh)) = (which("prlimit"), which("sh")) else {
            panic!(
                "neither a tmpfs nor the fallback is possible: prlimit or sh is missing ({why})"
            );
        };
        Disk::Rlimit {
            dir: mount_point,
            prlimit,
            sh,
            pid: None,
        }
    }

    async fn tmpfs(
        unshare: &Path,
        nsenter: &Path,
        sh: &Path,
        sleep: &Path,
        mount_point: &Path,
        rootless: bool,
    ) -> Result<Disk, String> {
        let mut command = Command::new(unshare);
        if rootless {
            command.args(["--user", "--map-root-user"]);
        }
        let script = format!(
            "mount -t tmpfs -o size={TMPFS_SIZE} tmpfs \"$0\" && exec {} 300",
            sleep.display()
        );
        let child = command
            .args(["--mount", "--propagation", "private", "--"])
            .arg(sh)
            .args(["-c", &script])
            .arg(mount_point)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run unshare: {e}"))?;
        let mut holder = ChildGuard(child);
        let mountinfo = format!("/proc/{}/mountinfo", holder.pid());
        let wanted = format!(" {} ", mount_point.display());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = holder.0.try_wait().expect("try_wait on unshare") {
                let mut stderr = String::new();
                if let Some(mut err) = holder.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                return Err(format!(
                    "`unshare{}` exited with {status}: {}",
                    if rootless { " -Ur" } else { "" },
                    stderr.trim()
                ));
            }
            let mounted = std::fs::read_to_string(&mountinfo).unwrap_or_default();
            if mounted
                .lines()
                .any(|l| l.contains(&wanted) && l.contains(" - tmpfs "))
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err("the tmpfs did not appear within 5 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let target = holder.pid().to_string();
        let mut enter = vec![
            nsenter.display().to_string(),
            "-t".into(),
            target,
            "-m".into(),
        ];
        if rootless {
            enter.extend(["-U".into(), "--preserve-credentials".into()]);
        }
        enter.push("--".into());
        let outside = PathBuf::from(format!("/proc/{}/root", holder.pid()))
            .join(mount_point.strip_prefix("/").expect("absolute temp dir"));
        Ok(Disk::Tmpfs {
            _holder: holder,
            inside: mount_point.to_path_buf(),
            outside,
            nsenter: enter,
        })
    }

    /// The folder as the server names it.
    fn inside(&self) -> &Path {
        match self {
            Disk::Tmpfs { inside, .. } => inside,
            Disk::Rlimit { dir, .. } => dir,
        }
    }

    /// The folder as the test reaches it.
    fn outside(&self) -> &Path {
        match self {
            Disk::Tmpfs { outside, .. } => outside,
            Disk::Rlimit { dir, .. } => dir,
        }
    }

    async fn start(&mut self, env: &[(&str, &str)], admin: &str, log: &Path, cwd: &Path) -> Server {
        match self {
            Disk::Tmpfs { nsenter, .. } => {
                let launcher: Vec<&str> = nsenter.iter().map(String::as_str).collect();
                start_server_via(&launcher, env, &[], admin, log, cwd).await
            }
            Disk::Rlimit { sh, pid, .. } => {
                // Growing a file past the limit must fail the write, not kill the process.
                let sh = sh.display().to_string();
                let launcher = [sh.as_str(), "-c", "trap '' XFSZ; exec \"$0\""];
                let server = start_server_via(&launcher, env, &[], admin, log, cwd).await;
                *pid = Some(server.child.pid());
                server
            }
        }
    }

    /// Leaves no room for any file to grow.
    fn fill(&self) {
        match self {
            Disk::Tmpfs { outside, .. } => {
                let mut filler =
                    std::fs::File::create(outside.join("filler")).expect("create the filler file");
                for chunk in [64 * 1024, 4096, 512] {
                    let bytes = vec![0x5a_u8; chunk];
                    while filler.write_all(&bytes).is_ok() {}
                }
                let _ = filler.sync_all();
            }
            Disk::Rlimit {
                dir, prlimit, pid, ..
            } => {
                let largest = std::fs::read_dir(dir)
                    .expect("list the data folder")
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0);
                set_fsize(prlimit, pid.expect("server started"), &largest.to_string());
            }
        }
    }

    fn free(&self) {
        match self {
            Disk::Tmpfs { outside, .. } => {
                std::fs::remove_file(outside.join("filler")).expect("remove the filler file")
            }
            Disk::Rlimit { prlimit, pid, .. } => {
                set_fsize(prlimit, pid.expect("server started"), "unlimited")
            }
        }
    }
}

fn set_fsize(prlimit: &Path, pid: u32, limit: &str) {
    let status = Command::new(prlimit)
        // The soft limit only: anyone may raise it again (up to the hard one).
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit --fsize={limit} failed: {status}");
}

/// What the service answered, kept to check the database against it after a restart.
#[derive(Default)]
struct Ledger {
    /// key name → id, for every key whose POST answered 201.
    keys_created: HashMap<String, String>,
    /// Names of keys whose POST answered 503: none may exist.
    keys_refused: Vec<String>,
    consumers_created: HashSet<String>,
    consumers_refused: Vec<String>,
    /// 200s of `/key` per key id.
    serves: HashMap<String, i64>,
    statuses: BTreeMap<String, usize>,
    /// Answers that were neither 2xx nor a JSON 503.
    violations: Vec<String>,
}

impl Ledger {
    /// Records an answer; true for a 2xx.
    fn answer(&mut self, what: &str, status: StatusCode, body: &Value) -> bool {
        *self
            .statuses
            .entry(format!("{what} {}", status.as_u16()))
            .or_default() += 1;
        if status.is_success() {
            return true;
        }
        if status != StatusCode::SERVICE_UNAVAILABLE || !body["error"].is_string() {
            self.violations.push(format!("{what}: {status} {body}"));
        }
        false
    }

    fn count(&self, what: &str, status: u16) -> usize {
        self.statuses
            .get(&format!("{what} {status}"))
            .copied()
            .unwrap_or(0)
    }
}

struct Client<'a> {
    server: &'a Server,
    token: String,
    next: usize,
}

impl Client<'_> {
    /// A key with a secret and metadata (a multi-statement transaction); true on 201.
    async fn create_key(&mut self, ledger: &mut Ledger) -> bool {
        self.next += 1;
        let name = format!("key-{:04}", self.next);
        let body = json!({
            "name": name, "key": format!("value-{}-{}", self.next, "v".repeat(600)), "tier": "disk",
            "secrets": { "webhook": "s".repeat(600) }, "metadata": { "pad": "m".repeat(600) },
        });
        let (status, got) = self
            .server
            .call(
                Method::POST,
                "/admin/keys",
                Some(&self.server.admin_token),
                Some(&body),
            )
            .await;
        if ledger.answer("POST /admin/keys", status, &got) {
            let id = got["id"].as_str().unwrap_or_default().to_string();
            ledger.keys_created.insert(name, id);
            true
        } else {
            if status == StatusCode::SERVICE_UNAVAILABLE {
                ledger.keys_refused.push(name);
            }
            false
        }
    }

    /// A consumer (one autocommit statement) scoped to the tier; true when both answered 201.
    async fn create_consumer(&mut self, ledger: &mut Ledger) -> bool {
        self.next += 1;
        let name = format!("consumer-{:04}", self.next);
        let (status, got) = self
            .server
            .call(
                Method::POST,
                "/admin/consumers",
                Some(&self.server.admin_token),
                Some(&json!({ "name": name, "description": "d".repeat(600) })),
            )
            .await;
        if !ledger.answer("POST /admin/consumers", status, &got) {
            if status == StatusCode::SERVICE_UNAVAILABLE {
                ledger.consumers_refused.push(name);
            }
            return false;
        }
        ledger.consumers_created.insert(name);
        let path = format!(
            "/admin/consumers/{}/scopes",
            got["id"].as_str().unwrap_or_default()
        );
        let (status, got) = self
            .server
            .call(
                Method::POST,
                &path,
                Some(&self.server.admin_token),
                Some(&json!({ "tier": "disk" })),
            )
            .await;
        ledger.answer("POST scopes", status, &got)
    }

    /// One `/key` draw; true on 200.
    async fn draw(&mut self, ledger: &mut Ledger) -> bool {
        let (status, got) = self
            .server
            .call(Method::GET, "/key?feature=scrape", Some(&self.token), None)
            .await;
        if ledger.answer("GET /key", status, &got) {
            let key_id = got["key_id"].as_str().unwrap_or_default().to_string();
            *ledger.serves.entry(key_id).or_default() += 1;
            true
        } else {
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_answers_503_keeps_every_2xx_and_recovers_once_space_is_freed() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut disk = Disk::new(tmp.path()).await;
    let log = tmp.path().join("server.log");
    let admin = distinctive("adm-");
    let mut env = quiet_env(&disk.inside().join("pool.db"));
    // A writer stuck behind a lock shows up within half a second, not five.
    env.push(("DB_BUSY_TIMEOUT_MS", "500".into()));
    let mut server = disk.start(&as_refs(&env), &admin, &log, tmp.path()).await;
    let mut ledger = Ledger::default();

    server
        .admin(
            Method::POST,
            "/admin/tiers",
            Some(json!({ "name": "disk", "features": { "scrape": { "rate_limit": 1_000_000, "window_seconds": 60 } } })),
            StatusCode::CREATED,
        )
        .await;
    let (_, token) = server.consumer("worker", "disk").await;
    let mut client = Client {
        server: &server,
        token,
        next: 0,
    };
    for _ in 0..3 {
        assert!(client.create_key(&mut ledger).await, "setup key");
    }
    for _ in 0..5 {
        assert!(client.draw(&mut ledger).await, "setup draw");
    }

    // Full: every answer is a 2xx or a JSON 503.
    ledger.statuses.clear();
    disk.fill();
    for _ in 0..MAX_ROUNDS {
        client.create_key(&mut ledger).await;
        client.create_consumer(&mut ledger).await;
        for _ in 0..3 {
            client.draw(&mut ledger).await;
        }
        let enough = ledger.count("POST /admin/keys", 503) >= FAILURES_WANTED
            && ledger.count("GET /key", 503) >= FAILURES_WANTED;
        if enough || ledger.violations.len() >= 3 {
            break;
        }
    }
    let full = format!("{:?}", ledger.statuses);
    eprintln!("disk_full: answers while the disk was full: {full}");
    assert!(
        ledger.violations.is_empty(),
        "on a full disk every answer must be a 2xx or a JSON 503; got {:?} (all: {full}); log:\n{}",
        ledger.violations,
        read_log(&log)
    );
    assert!(
        ledger.count("POST /admin/keys", 503) > 0 && ledger.count("GET /key", 503) > 0,
        "the disk never filled up (answers: {full})"
    );

    // Freed: without a restart, admin writes and draws work again within a bounded time.
    disk.free();
    let deadline = Instant::now() + RECOVERY;
    let mut recovered = false;
    while Instant::now() < deadline {
        if client.create_key(&mut ledger).await && client.draw(&mut ledger).await {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "no recovery within {RECOVERY:?} of freeing space (answers: {:?}); log:\n{}",
        ledger.statuses,
        read_log(&log)
    );
    for _ in 0..5 {
        assert!(
            client.create_key(&mut ledger).await,
            "admin write after recovery: {:?}",
            ledger.violations
        );
        assert!(
            client.create_consumer(&mut ledger).await,
            "consumer after recovery: {:?}",
            ledger.violations
        );
        for _ in 0..4 {
            assert!(
                client.draw(&mut ledger).await,
                "draw after recovery: {:?}",
                ledger.statuses
            );
        }
    }
    assert!(ledger.violations.is_empty(), "{:?}", ledger.violations);

    // kill -9 and restart: every 2xx is there, nothing answered 503 is.
    server.child.sigkill();
    let mut server = disk.start(&as_refs(&env), &admin, &log, tmp.path()).await;
    let keys = server
        .admin(Method::GET, "/admin/keys", None, StatusCode::OK)
        .await;
    let listed: HashMap<String, String> = keys
        .as_array()
        .expect("key list")
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap_or_default().to_string(),
                k["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for (name, id) in &ledger.keys_created {
        assert_eq!(
            listed.get(name),
            Some(id),
            "key {name} answered 201 but is gone after a restart"
        );
    }
    for name in &ledger.keys_refused {
        assert!(
            !listed.contains_key(name),
            "key {name} answered 503 but was stored"
        );
    }
    let consumers = server
        .admin(Method::GET, "/admin/consumers", None, StatusCode::OK)
        .await;
    let listed: HashSet<String> = consumers
        .as_array()
        .expect("consumer list")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    for name in &ledger.consumers_created {
        assert!(
            listed.contains(name),
            "consumer {name} answered 201 but is gone after a restart"
        );
    }
    for name in &ledger.consumers_refused {
        assert!(
            !listed.contains(name),
            "consumer {name} answered 503 but was stored"
        );
    }
    let status = server.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");

    // Usage: each key's counter equals its audit rows, which equal the 200s it was served.
    // A copy: SQLite resolves `/proc/<pid>/root` (a symlink to "/") to a path outside the
    // namespace, so it cannot open the file in place.
    let copy = tmp.path().join("copy");
    std::fs::create_dir_all(&copy).expect("create the copy folder");
    for file in ["pool.db", "pool.db-wal"] {
        if disk.outside().join(file).exists() {
            std::fs::copy(disk.outside().join(file), copy.join(file)).expect("copy the database");
        }
    }
    let db = open_db(&copy.join("pool.db")).await;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT id, usage_count, (SELECT COUNT(*) FROM usage_events e WHERE e.key_id = keys.id) FROM keys",
    )
    .fetch_all(&db)
    .await
    .expect("read the counters");
    db.close().await;
    for (id, usage_count, audited) in rows {
        let served = ledger.serves.get(&id).copied().unwrap_or(0);
        assert_eq!(
            (usage_count, audited),
            (served, served),
            "key {id}: usage_count and audit rows must equal the 200s it was served"
        );
    }
}

/// Issue 7 item 5: back-to-back group commits (the writer never idle) writing ~48 MiB of WAL
/// frames. The WAL used to grow until the 20,000-page autocheckpoint (~80 MB), because a
/// background checkpoint alone never caught up with a busy writer. The background checkpointer
/// now has the WAL start over at 2 MiB (its last step holding the writer's lock), and the
/// committing connection's own autocheckpoint bounds it at 8 MiB should that task fall behind,
/// so the bound holds whatever the machine's speed; the one checked leaves room for a few
/// commits (~1 MiB each) past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_stays_bounded_under_sustained_group_commits() {
    const COMMITS: usize = 48;
    const SERVES_PER_COMMIT: usize = 256;
    const BOUND: u64 = 12 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let db_path = dir.path().join("pool.db");
    let config = keypooler::config::Config::from_vars([
        ("ADMIN_TOKEN".to_string(), distinctive("adm-")),
        ("DB_PATH".to_string(), db_path.display().to_string()),
    ])
    .expect("valid config");
    let db = keypooler::store::Db::open(&config)
        .await
        .expect("open the database");
    let wal = dir.path().join("pool.db-wal");
    // A page-sized audit row each, so every commit appends about 1 MiB of frames.
    let feature = "f".repeat(3000);
    let mut peak = 0;
    for _ in 0..COMMITS {
        let events: Vec<keypooler::model::UsageEvent> = (0..SERVES_PER_COMMIT)
            .map(|_| keypooler::model::UsageEvent {
                id: uuid::Uuid::now_v7().to_string(),
                key_id: "k".into(),
                consumer_id: "admin".into(),
                feature: feature.clone(),
                created_at: chrono::Utc::now(),
                outcome: None,
                cost: 1,
            })
            .collect();
        db.commit_serves(&events, &[])
            .await
            .expect("commit a batch");
        peak = peak.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    db.close().await;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    assert!(
        peak <= BOUND,
        "the WAL grew to {:.1} MiB under sustained commits (bound {:.0} MiB)",
        mib(peak),
        mib(BOUND)
    );
    eprintln!("wal_stays_bounded: WAL peak {:.1} MiB", mib(peak));
}
