//! Operations, black-box: the CLI (backup, restore, user create, version), scheduled
//! backups, metrics, disk trouble (full, read-only), upgrades, and a backup taken while
//! writes are in flight restored with every acknowledged row.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::{TestApp, TestUser, eventually, expect_problem};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::config::{PlanConfig, PlanLimits};
use warpbase::jobs::{Handler, JobContext, JobFailure, KindSpec};
use warpbase::ops::backup;
use warpbase::storage::{self, StorageError, migrate};

const T: Duration = Duration::from_secs(20);

/// Runs the built binary with `args`; never inherits a config file from the cwd.
fn cli<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let cwd = tempfile::tempdir().expect("tempdir");
    Command::new(crate::common::binary())
        .args(args)
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .env_remove("WARPBASE_CONFIG")
        .output()
        .expect("run warpbase")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        stderr(o),
        stdout(o)
    );
}

fn assert_fails_with(o: &Output, needle: &str, what: &str) {
    assert!(!o.status.success(), "{what} must fail: {}", stdout(o));
    assert!(
        stderr(o).contains(needle),
        "{what}: stderr should mention {needle:?}: {}",
        stderr(o)
    );
}

async fn create_scratch(app: &TestApp) {
    app.state()
        .storage
        .write(|c| {
            c.execute_batch(
                "CREATE TABLE scratch (writer INTEGER NOT NULL, seq INTEGER NOT NULL,
                                       PRIMARY KEY (writer, seq))",
            )?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("scratch table");
}

async fn insert_scratch(app: &TestApp, writer: i64, seq: i64) {
    app.state()
        .storage
        .write(move |c| {
            c.execute("INSERT INTO scratch VALUES (?1, ?2)", [writer, seq])?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("insert");
}

/// (writer, seq) rows of the scratch table in the database file at `db`.
fn scratch_rows(db: &Path) -> Vec<(i64, i64)> {
    let conn = storage::Conn::open(db).expect("open");
    let mut stmt = conn
        .prepare("SELECT writer, seq FROM scratch ORDER BY writer, seq")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

fn data_dir_arg(dir: &Path) -> [&OsStr; 2] {
    [OsStr::new("--data-dir"), dir.as_os_str()]
}

// ---------------------------------------------------------------------------------------
// CLI

#[test]
fn help_everywhere_and_version() {
    for args in [
        vec!["--help"],
        vec!["backup", "--help"],
        vec!["restore", "--help"],
        vec!["user", "create", "--help"],
        vec!["migrate", "--help"],
        vec!["help", "serve"],
    ] {
        let o = cli(&args);
        assert_ok(&o, &args.join(" "));
        assert!(stdout(&o).contains("Usage:"), "{args:?}: {}", stdout(&o));
    }
    let o = cli(["backup", "--help"]);
    assert!(stdout(&o).contains("--force") && stdout(&o).contains("--data-dir"));
    let want = format!("warpbase {}", env!("CARGO_PKG_VERSION"));
    for args in [["version"], ["--version"]] {
        let o = cli(args);
        assert_ok(&o, "version");
        assert_eq!(stdout(&o).trim(), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_copies_the_live_database_and_never_overwrites_by_accident() {
    let app = TestApp::start().await;
    create_scratch(&app).await;
    for i in 0..50 {
        insert_scratch(&app, 1, i).await;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("nightly.db");
    let data = app.dir.path().to_path_buf();
    let run = |extra: &[&str]| {
        let mut args: Vec<&OsStr> = vec![OsStr::new("backup"), dest.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        args.extend(data_dir_arg(&data));
        cli(args)
    };

    let o = tokio::task::block_in_place(|| run(&[]));
    assert_ok(&o, "backup of a live database");
    storage::integrity_check(&dest).expect("backup is a healthy database");
    assert_eq!(scratch_rows(&dest).len(), 50);
    assert_eq!(
        storage::schema_version_of(&dest).expect("version"),
        migrate::latest_version()
    );

    insert_scratch(&app, 1, 50).await;
    let o = tokio::task::block_in_place(|| run(&[]));
    assert_fails_with(&o, "--force", "backup onto an existing file");
    assert_eq!(scratch_rows(&dest).len(), 50, "the old backup is untouched");
    let o = tokio::task::block_in_place(|| run(&["--force"]));
    assert_ok(&o, "backup --force");
    assert_eq!(scratch_rows(&dest).len(), 51);
    let names: Vec<String> = std::fs::read_dir(out.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["nightly.db".to_string()], "no temp file left");

    let empty = tempfile::tempdir().expect("tempdir");
    let mut args: Vec<&OsStr> = vec![OsStr::new("backup"), dest.as_os_str()];
    args.extend(data_dir_arg(empty.path()));
    let o = cli(args);
    assert_fails_with(&o, "no database at", "backup without a database");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_refuses_while_a_server_runs_and_replaces_the_database_after_it_stops() {
    let app = TestApp::start().await;
    create_scratch(&app).await;
    for i in 0..10 {
        insert_scratch(&app, 7, i).await;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let backup_file = out.path().join("b.db");
    app.state()
        .storage
        .backup_to(backup_file.clone())
        .await
        .expect("backup");
    // Diverge after the backup: the restore must bring back exactly the backup.
    for i in 10..20 {
        insert_scratch(&app, 7, i).await;
    }
    let data = app.dir.path().to_path_buf();
    let restore = |extra: &[&str], file: &Path| {
        let mut args: Vec<&OsStr> = vec![OsStr::new("restore"), file.as_os_str()];
        args.extend(extra.iter().map(OsStr::new));
        args.extend(data_dir_arg(&data));
        cli(args)
    };

    let o = tokio::task::block_in_place(|| restore(&["--force"], &backup_file));
    assert_fails_with(&o, "already running", "restore while serving");
    assert!(stderr(&o).contains("stop the server"), "{}", stderr(&o));
    assert_eq!(
        app.get("/readyz", None).await.status(),
        200,
        "server unharmed"
    );

    let db = data.join("warpbase.db");
    let dir = stop_keeping_data(app).await;

    let o = restore(&[], &backup_file);
    assert_fails_with(&o, "--force", "restore over a database without --force");
    assert_eq!(scratch_rows(&db).len(), 20);

    let garbage = out.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x42u8; 8192]).expect("write");
    let o = restore(&["--force"], &garbage);
    assert_fails_with(&o, "not a healthy SQLite database", "restore of garbage");
    let o = restore(&["--force"], &out.path().join("missing.db"));
    assert_fails_with(&o, "no backup file", "restore of a missing file");

    let newer = out.path().join("newer.db");
    std::fs::copy(&backup_file, &newer).expect("copy");
    storage::Conn::open(&newer)
        .expect("open")
        .pragma_update(None, "user_version", 999)
        .expect("bump");
    let o = restore(&["--force"], &newer);
    assert_fails_with(&o, "newer than this binary", "restore of a newer schema");

    let o = restore(&["--force"], &backup_file);
    assert_ok(&o, "restore after stop");
    storage::integrity_check(&db).expect("restored database is healthy");
    let rows = scratch_rows(&db);
    assert_eq!(rows.len(), 10, "exactly the backup's rows");
    assert_eq!(
        scratch_rows(&data.join("warpbase.db.pre-restore")).len(),
        20,
        "the replaced database is kept whole"
    );
    assert!(!data.join("warpbase.db-wal").exists() || wal_is_empty(&data));

    // And the restored data dir serves.
    let app = TestApp::start_with(|c| c.data_dir = data.clone(), AppOptions::default()).await;
    let n: i64 = app
        .state()
        .storage
        .read(|c| {
            Ok::<_, StorageError>(c.query_row("SELECT COUNT(*) FROM scratch", [], |r| r.get(0))?)
        })
        .await
        .expect("count");
    assert_eq!(n, 10);
    app.shutdown().await;
    drop(dir);
}

/// Shuts the App down cleanly and hands back its data dir, which would go with it.
async fn stop_keeping_data(app: TestApp) -> tempfile::TempDir {
    let TestApp { app, dir, .. } = app;
    app.shutdown().await.expect("clean shutdown");
    dir
}

fn wal_is_empty(data: &Path) -> bool {
    std::fs::metadata(data.join("warpbase.db-wal"))
        .map(|m| m.len() == 0)
        .unwrap_or(true)
}

#[test]
fn user_create_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.extend(data_dir_arg(dir.path()));
        cli(a)
    };
    let o = run(&["user", "create", "Root@Example.com", "--admin"]);
    assert_ok(&o, "create admin");
    assert!(
        stdout(&o).contains("admin root@example.com"),
        "{}",
        stdout(&o)
    );
    let o = run(&["user", "create", "ann@example.com"]);
    assert_ok(&o, "create user");
    assert!(
        stdout(&o).contains("user ann@example.com"),
        "{}",
        stdout(&o)
    );
    let o = run(&["user", "create", "ROOT@example.com"]);
    assert_fails_with(&o, "already exists", "duplicate email");
    let o = run(&["user", "create", "not-an-email"]);
    assert_fails_with(&o, "not an email address", "bad email");
    // The registration rules, not a looser copy of them: a doubled dot is refused at
    // register, so the CLI refuses it too.
    let o = run(&["user", "create", "a..b@example.com"]);
    assert_fails_with(&o, "not an email address", "an address register refuses");
    let o = run(&["user", "disable", " ANN@example.com "]);
    assert_ok(&o, "disable by another spelling of the address");
    let o = run(&["user", "enable", "ann@example.com"]);
    assert_ok(&o, "enable");
    let o = run(&["user", "disable", "nobody@example.com"]);
    assert_fails_with(&o, "no such user", "unknown user");

    let o = run(&["user", "list"]);
    assert_ok(&o, "user list");
    let list = stdout(&o);
    let line = |email: &str| {
        list.lines()
            .find(|l| l.ends_with(email))
            .unwrap_or_else(|| panic!("{email} listed: {list}"))
            .to_string()
    };
    assert!(line("root@example.com").contains("admin"));
    assert!(line("ann@example.com").contains("user"));
    assert_eq!(list.lines().count(), 3, "header + two users: {list}");

    // Every change the operator made is in the audit log, as the HTTP flows' are.
    let db = rusqlite::Connection::open(dir.path().join("warpbase.db")).expect("open the db");
    let events: Vec<(String, String, String)> = db
        .prepare(
            "SELECT u.email, a.event, COALESCE(a.user_agent, '') FROM audit_log a
             JOIN users u ON u.id = a.user_id ORDER BY a.id",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let cli = |email: &str, event: &str| (email.to_string(), event.to_string(), "cli".to_string());
    assert_eq!(
        events,
        [
            cli("root@example.com", "user_created"),
            cli("ann@example.com", "user_created"),
            cli("ann@example.com", "user_disabled"),
            cli("ann@example.com", "user_enabled"),
        ]
    );
}

/// Runs the binary with `args`, writing `stdin` to its standard input.
fn cli_with_stdin(args: &[&OsStr], stdin: &str) -> Output {
    use std::io::Write;
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(crate::common::binary())
        .args(args)
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .env_remove("WARPBASE_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run warpbase");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_create_with_a_password_from_stdin_can_sign_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = |email: &'static str| {
        let mut a: Vec<&OsStr> = vec![
            OsStr::new("user"),
            OsStr::new("create"),
            OsStr::new(email),
            OsStr::new("--admin"),
            OsStr::new("--password-stdin"),
        ];
        a.extend(data_dir_arg(dir.path()));
        a
    };
    // The registration rules apply; nothing is created on a refusal.
    let o = cli_with_stdin(&args("short@example.com"), "too short\n");
    assert_fails_with(&o, "at least 10 characters", "short password");
    // The newline ends the password; inner spaces are part of it.
    let o = cli_with_stdin(&args("root@example.com"), "correct horse battery\n");
    assert_ok(&o, "create with password");
    assert!(
        stdout(&o).contains("admin root@example.com"),
        "{}",
        stdout(&o)
    );
    let mut list: Vec<&OsStr> = vec![OsStr::new("user"), OsStr::new("list")];
    list.extend(data_dir_arg(dir.path()));
    let o = cli(list);
    assert_ok(&o, "user list");
    assert!(!stdout(&o).contains("short@example.com"), "{}", stdout(&o));

    let server = crate::common::ChildServer::start(dir.path(), &[], &[]);
    let client = reqwest::Client::new();
    let login = |email: &'static str, password: &'static str| {
        client
            .post(server.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    let r = login("root@example.com", "correct horse battery")
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "the stdin password signs in");
    let body: Value = r.json().await.expect("json");
    let me = client
        .get(server.url("/api/v1/me"))
        .bearer_auth(body["access_token"].as_str().expect("access token"))
        .send()
        .await
        .expect("me");
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["role"], "admin", "{me}");
    let r = login("root@example.com", "correct horse battery\n")
        .await
        .expect("login");
    assert_eq!(r.status(), 401, "the newline is not part of the password");
    server.kill9();
}

// ---------------------------------------------------------------------------------------
// Scheduled backups

async fn last_backup_run(app: &TestApp) -> Option<i64> {
    app.state()
        .storage
        .read(|c| storage::jobs::meta_get(c, backup::LAST_RUN_KEY))
        .await
        .expect("meta")
        .and_then(|v| v.parse().ok())
}

async fn next_backup_run(app: &TestApp, after: Option<i64>) -> i64 {
    eventually(T, "the next automatic backup", || async {
        last_backup_run(app).await.filter(|t| Some(*t) != after)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_keep_the_newest_and_a_restart_does_not_back_up_early() {
    let data = tempfile::tempdir().expect("tempdir");
    let interval = Duration::from_millis(1500);
    let configure = |c: &mut warpbase::Config| {
        c.data_dir = data.path().to_path_buf();
        c.backup.interval = interval;
        c.backup.keep = 2;
        crate::common::with_metrics(c);
    };
    let dir = data.path().join(backup::BACKUP_DIR);

    let app = TestApp::start_with(configure, AppOptions::default()).await;
    create_scratch(&app).await;
    insert_scratch(&app, 1, 1).await;
    // Never backed up before: the first run is due at once.
    let first = next_backup_run(&app, None).await;
    assert!(dir.join(backup::file_name(first)).exists());
    app.shutdown().await;

    let app = TestApp::start_with(configure, AppOptions::default()).await;
    let second = next_backup_run(&app, Some(first)).await;
    assert!(
        second - first >= interval.as_millis() as i64,
        "a restart must wait for the interval: {first} then {second}"
    );
    let third = next_backup_run(&app, Some(second)).await;
    assert!(third - second >= interval.as_millis() as i64);
    let files = eventually(T, "pruning to `keep` backups", || async {
        let files = backup::list(&dir).expect("list");
        (files.len() == 2).then_some(files)
    })
    .await;
    assert_eq!(
        files,
        vec![
            dir.join(backup::file_name(second)),
            dir.join(backup::file_name(third))
        ]
    );
    for f in &files {
        storage::integrity_check(f).expect("every kept backup is healthy");
        assert_eq!(scratch_rows(f), vec![(1, 1)]);
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "no temp files left: {leftovers:?}");
    let metrics = app
        .client
        .get(app.metrics_url())
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics");
    assert!(
        metrics.contains("backup_runs_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("backup_last_success_timestamp_seconds"));
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Metrics

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser for the Prometheus text format (0.0.4): `# HELP`/`# TYPE` lines and
/// `name{label="value",...} value [timestamp]` samples. Panics on any malformed line.
fn parse_prometheus(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    fn value(s: &str) -> Option<f64> {
        match s {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => s.parse().ok(),
        }
    }
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", n + 1) };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let parts: Vec<&str> = rest.trim_start().splitn(3, ' ').collect();
            match parts.as_slice() {
                ["TYPE", name, kind] => {
                    if !is_name(name) {
                        bad("bad metric name");
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                        bad("bad type");
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        bad("TYPE given twice");
                    }
                }
                ["HELP", name, ..] if is_name(name) => {}
                ["HELP", ..] => bad("bad HELP"),
                _ => {} // other comments are allowed
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => bad("sample without value"),
        };
        if !is_name(name) {
            bad("bad metric name");
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                let Some(&(i, c)) = chars.peek() else {
                    bad("unterminated labels")
                };
                if c == '}' {
                    break i;
                }
                let start = i;
                while chars.peek().is_some_and(|&(_, c)| c != '=') {
                    chars.next();
                }
                let Some((eq, _)) = chars.next() else {
                    bad("label without =")
                };
                let key = &body[start..eq];
                if !is_name(key) || key.contains(':') {
                    bad("bad label name");
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    bad("label value not quoted");
                }
                let mut val = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => val.push('\n'),
                            Some((_, '\\')) => val.push('\\'),
                            Some((_, '"')) => val.push('"'),
                            _ => bad("bad escape"),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => val.push(c),
                        None => bad("unterminated label value"),
                    }
                }
                if labels.insert(key.to_string(), val).is_some() {
                    bad("label repeated");
                }
                if chars.peek().is_some_and(|&(_, c)| c == ',') {
                    chars.next();
                }
            };
            &body[end + 1..]
        } else {
            rest
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let v = match fields.as_slice() {
            [v] => value(v),
            [v, ts] if ts.parse::<i64>().is_ok() => value(v),
            _ => None,
        };
        let Some(v) = v else { bad("bad value") };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: v,
        });
    }
    (types, samples)
}

/// Checks a histogram family: cumulative buckets ending in +Inf == _count, plus _sum.
fn check_histogram(types: &BTreeMap<String, String>, samples: &[Sample], name: &str) {
    assert_eq!(
        types.get(name).map(String::as_str),
        Some("histogram"),
        "{name} type"
    );
    let bucket = format!("{name}_bucket");
    // Labels other than `le` → (le, cumulative count) per bucket.
    type Buckets = Vec<(f64, f64)>;
    let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == bucket) {
        let le = s.labels.get("le").expect("bucket has le");
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect("le is a number")
        };
        let key: Vec<_> = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        series.entry(key).or_default().push((le, s.value));
    }
    assert!(!series.is_empty(), "{name} has buckets");
    for (key, mut buckets) in series {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} buckets are cumulative"
        );
        let last = buckets.last().expect("one bucket");
        assert!(last.0.is_infinite(), "{name} ends with +Inf");
        let find = |suffix: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name == format!("{name}{suffix}")
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == key
                })
                .unwrap_or_else(|| panic!("{name}{suffix} for {key:?}"))
                .value
        };
        assert_eq!(find("_count"), last.1, "{name} +Inf bucket equals _count");
        assert!(find("_sum") >= 0.0);
    }
}

fn has_labels(samples: &[Sample], name: &str, labels: &[&str]) -> bool {
    samples
        .iter()
        .any(|s| s.name == name && labels.iter().all(|l| s.labels.contains_key(*l)))
}

/// A job kind that accepts any payload and succeeds at once.
struct Accept;

impl Handler for Accept {
    fn run(&self, _ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(async { Ok(json!({"ok": true})) })
    }
}

fn accept_kind() -> KindSpec {
    KindSpec {
        name: "accept".into(),
        queue: "fast".into(),
        handler: Arc::new(Accept),
        public: true,
        billable: false,
        timeout: None,
        max_attempts: None,
    }
}

fn generous_free_plan(c: &mut warpbase::Config) {
    c.billing.plans.push(PlanConfig {
        id: "free".into(),
        name: "Free".into(),
        price_id: String::new(),
        price: 0,
        currency: "usd".into(),
        interval: "month".into(),
        metered: false,
        limits: PlanLimits {
            jobs_per_period: 100_000,
            concurrent_jobs: 100_000,
            max_upload_bytes: 1 << 20,
            max_storage_bytes: 10 << 20,
        },
    });
}

async fn submit(app: &TestApp, user: &TestUser, payload: Value) -> reqwest::Response {
    app.post_json(
        "/api/v1/jobs",
        Some(&user.access_token),
        &json!({"kind": "accept", "payload": payload}),
    )
    .await
}

async fn wait_job(app: &TestApp, user: &TestUser, id: &str, status: &str) {
    eventually(T, &format!("job {id} {status}"), || async {
        let j: Value = app
            .get(&format!("/api/v1/jobs/{id}"), Some(&user.access_token))
            .await
            .json()
            .await
            .ok()?;
        (j["status"] == status).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_scrape_parses_and_has_every_contract_series() {
    let app = TestApp::start_with(
        |c| {
            generous_free_plan(c);
            crate::common::with_metrics(c);
            // Housekeeping refreshes the jobs gauge every 10 ticks of lease/2.
            c.jobs.lease = Duration::from_millis(400);
        },
        AppOptions {
            extra_kinds: vec![accept_kind()],
            ..Default::default()
        },
    )
    .await;
    let user = app.create_user("metrics@example.com").await;
    let r = submit(&app, &user, json!({"n": 1})).await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.expect("json");
    wait_job(&app, &user, job["id"].as_str().expect("id"), "succeeded").await;
    assert_eq!(app.get("/healthz", None).await.status(), 200);

    let (types, samples) = eventually(T, "a scrape with every series", || async {
        let r = app
            .client
            .get(app.metrics_url())
            .send()
            .await
            .expect("scrape");
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.expect("text");
        let (types, samples) = parse_prometheus(&text);
        // The recorder is process-wide and other tests' Apps set the same gauge, so wait
        // for a refresh by ours.
        let ours = samples.iter().any(|s| {
            s.name == "jobs"
                && s.labels.get("queue").map(String::as_str) == Some("fast")
                && s.labels.get("status").map(String::as_str) == Some("succeeded")
                && s.value >= 1.0
        });
        ours.then_some((types, samples))
    })
    .await;

    assert_eq!(
        types.get("http_requests_total").map(String::as_str),
        Some("counter")
    );
    assert!(samples.iter().any(|s| s.name == "http_requests_total"
        && s.labels.get("route").map(String::as_str) == Some("/api/v1/jobs")
        && s.labels.get("status").map(String::as_str) == Some("202")));
    assert!(has_labels(
        &samples,
        "http_requests_total",
        &["route", "status"]
    ));
    check_histogram(&types, &samples, "http_request_duration_seconds");
    assert!(has_labels(
        &samples,
        "http_request_duration_seconds_bucket",
        &["route", "le"]
    ));
    assert_eq!(types.get("jobs").map(String::as_str), Some("gauge"));
    assert!(has_labels(&samples, "jobs", &["queue", "status"]));
    assert!(samples.iter().any(|s| s.name == "job_runs_total"
        && s.labels.get("kind").map(String::as_str) == Some("accept")
        && s.labels.contains_key("outcome")
        && s.value >= 1.0));
    check_histogram(&types, &samples, "db_write_batch_size");
    check_histogram(&types, &samples, "db_commit_seconds");
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_listen_serves_metrics_on_its_own_port_and_not_on_the_main_one() {
    let app = TestApp::start_with(
        |c| c.metrics_listen = Some("127.0.0.1:0".parse().expect("addr")),
        AppOptions::default(),
    )
    .await;
    let maddr = app.app.metrics_addr.expect("metrics address");
    assert_ne!(maddr, app.app.addr);
    expect_problem(app.get("/metrics", None).await, 404, "not_found").await;
    let r = app
        .client
        .get(format!("http://{maddr}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    let (_, samples) = parse_prometheus(&text);
    assert!(samples.iter().any(|s| s.name == "http_requests_total"));
    let r = app
        .client
        .get(format!("http://{maddr}/healthz"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404, "the metrics port serves only /metrics");
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.shutdown().await;
}

#[test]
fn the_prometheus_parser_rejects_malformed_lines() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"q\",z=\"\"} 3\nb 1e3 1700000000\n";
    let (types, samples) = parse_prometheus(ok);
    assert_eq!(types["a_total"], "counter");
    assert_eq!(samples[0].labels["k"], "v\"q");
    assert_eq!(samples[1].value, 1000.0);
    for bad in [
        "a{k=v} 1",
        "a{k=\"v\" 1",
        "1a 1",
        "a 1 2 3",
        "a{k=\"v\"} x",
        "a",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
            "{bad:?} must be rejected"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Disk trouble

async fn page_limit(app: &TestApp, pin: bool) {
    app.state()
        .storage
        .write(move |c| {
            // max_page_count is a setting of this connection (the writer's), never of the
            // file: pinning it to the current size makes every write that needs a new page
            // fail with SQLITE_FULL, exactly like a full disk.
            let limit: i64 = if pin {
                c.query_row("PRAGMA page_count", [], |r| r.get(0))?
            } else {
                4_294_967_294
            };
            c.query_row(&format!("PRAGMA max_page_count = {limit}"), [], |_| Ok(()))?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("set max_page_count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_unavailable_and_recovers_without_corruption() {
    let app = TestApp::start_with(
        generous_free_plan,
        AppOptions {
            extra_kinds: vec![accept_kind()],
            ..Default::default()
        },
    )
    .await;
    let user = app.create_user("full@example.com").await;
    let before = submit(&app, &user, json!({"n": 1})).await;
    assert_eq!(before.status(), 202);
    let before: Value = before.json().await.expect("json");

    page_limit(&app, true).await;
    let big = json!({"blob": "x".repeat(64 * 1024)});
    let body = expect_problem(submit(&app, &user, big.clone()).await, 503, "unavailable").await;
    assert!(
        !body["detail"].as_str().unwrap_or("").contains("SQLITE"),
        "{body}"
    );
    expect_problem(app.get("/readyz", None).await, 503, "unavailable").await;
    assert_eq!(
        app.get("/healthz", None).await.status(),
        200,
        "alive, not ready"
    );
    // Reads keep working.
    let r = app
        .get(
            &format!("/api/v1/jobs/{}", before["id"].as_str().expect("id")),
            Some(&user.access_token),
        )
        .await;
    assert_eq!(r.status(), 200);

    page_limit(&app, false).await;
    eventually(T, "ready again once space is back", || async {
        (app.get("/readyz", None).await.status() == 200).then_some(())
    })
    .await;
    let r = submit(&app, &user, big).await;
    assert_eq!(r.status(), 202, "writes work again");
    let db = app.state().storage.path().to_path_buf();
    let _dir = stop_keeping_data(app).await;
    storage::integrity_check(&db).expect("no corruption");
    let n: i64 = storage::Conn::open(&db)
        .expect("open")
        .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(
        n, 2,
        "the two acknowledged jobs, nothing from the failed write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_503_unavailable_and_a_restart_recovers() {
    let data = tempfile::tempdir().expect("tempdir");
    let configure = |c: &mut warpbase::Config| {
        generous_free_plan(c);
        c.data_dir = data.path().to_path_buf();
    };
    let opts = || AppOptions {
        extra_kinds: vec![accept_kind()],
        ..Default::default()
    };
    let app = TestApp::start_with(configure, opts()).await;
    let user = app.create_user("ro@example.com").await;
    let r = submit(&app, &user, json!({"n": 1})).await;
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.expect("json");

    // query_only on the writer connection: every write now fails with SQLITE_READONLY,
    // as on a filesystem remounted read-only under a running server.
    app.state()
        .storage
        .write(|c| {
            c.execute_batch("PRAGMA query_only = ON")?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("query_only");
    expect_problem(
        submit(&app, &user, json!({"n": 2})).await,
        503,
        "unavailable",
    )
    .await;
    let r = app.get("/readyz", None).await;
    assert_eq!(r.headers()["retry-after"], "5");
    expect_problem(r, 503, "unavailable").await;
    // The shutdown's final checkpoint may fail on a read-only database; it must not hang.
    let _ = app.app.shutdown().await;

    let db = data.path().join("warpbase.db");
    storage::integrity_check(&db).expect("no corruption");
    let app = TestApp::start_with(configure, opts()).await;
    let r = app
        .get(
            &format!("/api/v1/jobs/{}", job["id"].as_str().expect("id")),
            Some(&user.access_token),
        )
        .await;
    assert_eq!(r.status(), 200, "the acknowledged job survived");
    assert_eq!(submit(&app, &user, json!({"n": 3})).await.status(), 202);
    app.shutdown().await;
}

/// Runs the binary so that it cannot write `data`: as root (chmod does not stop root) as
/// the unprivileged `nobody`, from a copy of the binary that user can execute.
fn serve_without_write_access(base: &Path, data: &Path) -> Output {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bin = base.join("warpbase-bin");
    std::fs::copy(crate::common::binary(), &bin).expect("copy binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(base)
        .env_remove("RUST_LOG");
    if root {
        cmd.uid(65534).gid(65534);
    }
    // Bounded: if it wrongly starts, it must not hang the test.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + T;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("warpbase started on a data dir it cannot write");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn starting_without_write_access_fails_with_a_clear_message() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let base = tempfile::tempdir().expect("tempdir");
    let data = base.path().join("data");
    let mut args: Vec<&OsStr> = vec![OsStr::new("migrate")];
    args.extend(data_dir_arg(&data));
    assert_ok(&cli(args), "migrate");
    let lock = data.join("warpbase.lock");
    let db = data.join("warpbase.db");

    // A read-only data dir (and lock file).
    mode(&data, 0o555);
    mode(&lock, 0o444);
    let o = serve_without_write_access(base.path(), &data);
    assert_fails_with(
        &o,
        "must be writable by the user running warpbase",
        "read-only dir",
    );
    assert!(
        stderr(&o).contains(&data.display().to_string()),
        "{}",
        stderr(&o)
    );

    // A writable data dir with a database file the user cannot write.
    mode(&data, 0o777);
    mode(&lock, 0o666);
    mode(&db, 0o444);
    let o = serve_without_write_access(base.path(), &data);
    assert_fails_with(&o, "is read-only for this user", "read-only database file");
    mode(&db, 0o644);
    storage::integrity_check(&db).expect("untouched");
}

// ---------------------------------------------------------------------------------------
// Upgrades

#[tokio::test]
async fn a_newer_binary_migrates_an_older_database_on_start() {
    for applied in 0..migrate::latest_version() as usize {
        let data = tempfile::tempdir().expect("tempdir");
        let db = data.path().join("warpbase.db");
        {
            let mut conn = storage::open_writer_conn(&db).expect("open");
            migrate::apply_list(&mut conn, &migrate::MIGRATIONS[..applied]).expect("old schema");
            assert_eq!(migrate::current_version(&conn).expect("v"), applied as i64);
            if applied >= 1 {
                storage::jobs::meta_set(&conn, "upgrade.marker", "kept", 1).expect("marker");
            }
        }
        let app = TestApp::start_with(
            |c| c.data_dir = data.path().to_path_buf(),
            AppOptions::default(),
        )
        .await;
        let (version, marker) = app
            .state()
            .storage
            .read(|c| {
                Ok::<_, StorageError>((
                    migrate::current_version(c)?,
                    storage::jobs::meta_get(c, "upgrade.marker")?,
                ))
            })
            .await
            .expect("read");
        assert_eq!(version, migrate::latest_version(), "from version {applied}");
        if applied >= 1 {
            assert_eq!(marker.as_deref(), Some("kept"), "data survives the upgrade");
        }
        app.shutdown().await;
    }
}

#[test]
fn a_failing_migration_leaves_the_database_at_the_previous_version() {
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("warpbase.db");
    let mut conn = storage::open_writer_conn(&db).expect("open");
    let mut with_broken = migrate::MIGRATIONS.to_vec();
    with_broken.push((
        "9999_broken",
        "CREATE TABLE half_done (x INTEGER);
         INSERT INTO half_done VALUES (1);
         INSERT INTO no_such_table VALUES (1);",
    ));
    let err = migrate::apply_list(&mut conn, &with_broken).expect_err("must fail");
    assert!(
        matches!(&err, StorageError::Migration { name, .. } if name == "9999_broken"),
        "{err}"
    );
    assert!(err.to_string().contains("no_such_table"), "{err}");
    assert_eq!(
        migrate::current_version(&conn).expect("v"),
        migrate::latest_version(),
        "every good migration applied, the broken one not at all"
    );
    let half: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'half_done'",
            [],
            |r| r.get(0),
        )
        .expect("query");
    assert_eq!(half, 0, "the failed migration's changes are rolled back");
    let recorded: i64 = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |r| {
            r.get(0)
        })
        .expect("query");
    assert_eq!(recorded, migrate::latest_version());
    drop(conn);
    storage::integrity_check(&db).expect("healthy");
}

#[test]
fn a_migration_run_without_foreign_keys_must_leave_them_intact() {
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("warpbase.db");
    let mut conn = storage::open_writer_conn(&db).expect("open");
    let mut with_orphan = migrate::MIGRATIONS.to_vec();
    with_orphan.push((
        "9999_orphan",
        "-- warpbase: foreign_keys=off
         INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, outcome)
         VALUES ('no-such-job', 1, 0, 0, 'retry');",
    ));
    let err = migrate::apply_list(&mut conn, &with_orphan).expect_err("must fail");
    assert!(
        err.to_string().contains("foreign keys broken") && err.to_string().contains("job_attempts"),
        "{err}"
    );
    assert_eq!(
        migrate::current_version(&conn).expect("v"),
        migrate::latest_version()
    );
    let orphans: i64 = conn
        .query_row("SELECT COUNT(*) FROM job_attempts", [], |r| r.get(0))
        .expect("query");
    assert_eq!(orphans, 0, "rolled back");
    let fk: bool = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .expect("fk");
    assert!(fk, "the connection's foreign keys are on again");
}

// ---------------------------------------------------------------------------------------
// Backup while writes are in flight

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_concurrent_writes_restores_every_acknowledged_row() {
    const WRITERS: i64 = 8;
    let app = TestApp::start().await;
    create_scratch(&app).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let storage = app.state().storage.clone();
        let (stop, acked) = (stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0i64;
            while !stop.load(Ordering::SeqCst) {
                storage
                    .write(move |c| {
                        c.execute("INSERT INTO scratch VALUES (?1, ?2)", [w, seq])?;
                        Ok::<_, StorageError>(())
                    })
                    .await
                    .expect("write acknowledged");
                seq += 1;
                acked[w as usize].store(seq as u64, Ordering::SeqCst);
            }
        }));
    }
    let snapshot = |a: &Arc<Vec<AtomicU64>>| -> Vec<i64> {
        a.iter().map(|x| x.load(Ordering::SeqCst) as i64).collect()
    };
    eventually(T, "writes under way", || async {
        (snapshot(&acked).iter().sum::<i64>() >= 500).then_some(())
    })
    .await;

    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("live.db");
    let before = snapshot(&acked);
    let data = app.dir.path().to_path_buf();
    let o = {
        let dest = dest.clone();
        tokio::task::spawn_blocking(move || {
            let mut args: Vec<&OsStr> = vec![OsStr::new("backup"), dest.as_os_str()];
            args.extend(data_dir_arg(&data));
            cli(args)
        })
        .await
        .expect("join")
    };
    let after = snapshot(&acked);
    assert_ok(&o, "backup under load");
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("writer task");
    }
    assert!(
        after.iter().sum::<i64>() > before.iter().sum::<i64>(),
        "writes were in flight during the backup: {before:?} → {after:?}"
    );
    let total_acked: i64 = snapshot(&acked).iter().sum();
    app.shutdown().await;

    let fresh = tempfile::tempdir().expect("tempdir");
    let mut args: Vec<&OsStr> = vec![OsStr::new("restore"), dest.as_os_str()];
    args.extend(data_dir_arg(fresh.path()));
    assert_ok(&cli(args), "restore into a fresh data dir");
    let db = fresh.path().join("warpbase.db");
    storage::integrity_check(&db).expect("restored database is healthy");
    let mut per_writer: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for (w, seq) in scratch_rows(&db) {
        per_writer.entry(w).or_default().insert(seq);
    }
    for w in 0..WRITERS {
        let seqs = per_writer.remove(&w).unwrap_or_default();
        let n = seqs.len() as i64;
        // One snapshot: each writer's rows are a gap-free prefix...
        assert_eq!(
            seqs.iter().copied().collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>(),
            "writer {w}: a consistent prefix"
        );
        // ...holding everything acknowledged before the backup began, and nothing that
        // was not yet sent when it ended (at most the one write in flight).
        let (lo, hi) = (before[w as usize], after[w as usize] + 1);
        assert!(
            (lo..=hi).contains(&n),
            "writer {w}: {n} rows in the backup, acknowledged {lo} before and {hi} after"
        );
    }
    assert!(per_writer.is_empty());
    assert!(total_acked > 0);
}

// ---------------------------------------------------------------------------------------
// Packaging

#[test]
fn the_example_config_parses_to_exactly_the_defaults() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/warpbase.toml");
    let none = warpbase::config::Overrides::default();
    let example =
        warpbase::Config::load_from(Some(&path), &none, std::iter::empty()).expect("example loads");
    let defaults = warpbase::Config::load_from(None, &none, std::iter::empty()).expect("defaults");
    assert_eq!(
        example.to_redacted_toml(),
        defaults.to_redacted_toml(),
        "packaging/warpbase.toml must show the defaults of src/config.rs"
    );
    let text = std::fs::read_to_string(&path).expect("read");
    // Keys kept commented out (no default value to show, or deployment-specific) are
    // still documented.
    for key in [
        "data_dir",
        "metrics_listen",
        "jwt_secret",
        "[auth.oauth.github]",
        "[auth.oauth.google]",
        "[auth.oauth.oidc]",
        "[jobs.kinds.",
        "[backup]",
    ] {
        assert!(
            text.contains(key),
            "packaging/warpbase.toml documents {key}"
        );
    }
}
