//! Security hardening, track D (issue #16): readiness that reflects durability, explicit
//! admin bootstrap, Stripe mode without webhook secrets, retention, file modes, metrics
//! off the main listener, immediate disable, and the webhook's documented 400.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::storage::StorageError;

use crate::common::{ChildServer, TestApp, eventually, expect_problem};

const T: Duration = Duration::from_secs(20);

/// Runs the built binary; never inherits a config file or log level from the cwd.
fn cli(args: &[&OsStr], env: &[(&str, &str)]) -> Output {
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(crate::common::binary());
    cmd.args(args)
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .env_remove("WARPBASE_CONFIG")
        .env("WARPBASE_METRICS_LISTEN", "off");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run warpbase")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn set_mode(p: &Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
}

// ---------------------------------------------------------------------------------------
// Readiness

/// A small tmpfs, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        out.status.success().then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// Writes into `path` until the file system refuses (ENOSPC).
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create fill file");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).and_then(|()| f.sync_data()).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_on_a_full_disk_and_200_again_once_space_is_freed() {
    let base = tempfile::tempdir().expect("tempdir");
    let mnt = base.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let Some(_tmpfs) = Tmpfs::mount(&mnt, "4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = mnt.join("data");
    let app = TestApp::start_with(
        |c| {
            c.data_dir = data.clone();
            c.min_free_bytes = 1024 * 1024;
        },
        AppOptions::default(),
    )
    .await;
    assert_eq!(app.get("/readyz", None).await.status(), 200);

    let filler = mnt.join("fill");
    fill(&filler);
    // Either the free-space floor or a write that failed on the full disk says so first.
    eventually(T, "readyz to see the full disk", || async {
        let r = app.get("/readyz", None).await;
        if r.status() == 503 {
            Some(expect_problem(r, 503, "unavailable").await)
        } else {
            None
        }
    })
    .await;
    assert_eq!(app.get("/healthz", None).await.status(), 200, "alive");

    std::fs::remove_file(&filler).expect("free the space");
    eventually(T, "ready again once space is back", || async {
        (app.get("/readyz", None).await.status() == 200).then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn readyz_is_503_while_free_space_is_below_min_free_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crate::common::test_config(dir.path());
    // More than any disk has.
    config.min_free_bytes = 1 << 62;
    let app = warpbase::App::build(config).await.expect("builds").spawn();
    let client = reqwest::Client::new();
    let body = eventually(T, "readyz to report the disk space", || async {
        let r = client.get(app.url("/readyz")).send().await.expect("readyz");
        let body = expect_problem(r, 503, "unavailable").await;
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("full"))
            .then_some(body)
    })
    .await;
    assert!(
        !body["detail"].as_str().unwrap_or("").contains("bytes"),
        "no internals: {body}"
    );
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_commit_the_probe_fails_until_a_commit_succeeds() {
    // The storage alone: an App's background writes would clear the failure at any moment.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let storage = tokio::task::spawn_blocking(move || warpbase::storage::Storage::open(&path))
        .await
        .expect("join")
        .expect("open");
    storage.ping_writer(0).await.expect("a healthy writer");
    // A closure that aborts the batch's transaction: its commit fails.
    let r = storage
        .write(|c| {
            c.execute_batch("ROLLBACK")?;
            Ok::<_, StorageError>(())
        })
        .await;
    assert!(r.is_err(), "the aborted batch is reported: {r:?}");
    // The probe a moment ago succeeded (and is remembered for a second), but a commit
    // failed since.
    storage
        .ping_writer(0)
        .await
        .expect_err("a failed commit makes the writer unready");
    // Any commit that lands clears it.
    storage
        .write(|c| {
            c.execute("DELETE FROM meta WHERE key = 'nothing'", [])?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("a good write");
    storage.ping_writer(0).await.expect("ready again");
    // The probe really commits: its row carries the time of the last probe.
    let t: i64 = storage
        .read(|c| {
            Ok::<_, StorageError>(c.query_row(
                "SELECT updated_at FROM meta WHERE key = 'ready_probe'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .expect("probe row");
    assert!(t > 0);
    storage.close().await.expect("close");
}

// ---------------------------------------------------------------------------------------
// Admin bootstrap

fn setup_token(server: &ChildServer) -> String {
    let deadline = Instant::now() + T;
    loop {
        for line in server.drain_logs() {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(t) = v["setup_token"].as_str()
            {
                return t.to_string();
            }
        }
        assert!(Instant::now() < deadline, "no setup token in the log");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn register(http: &reqwest::Client, server: &ChildServer, email: &str) -> Value {
    let r = http
        .post(server.url("/api/v1/auth/register"))
        .json(&json!({"email": email, "password": "correct horse battery"}))
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 201);
    r.json().await.expect("json")
}

async fn claim(
    http: &reqwest::Client,
    server: &ChildServer,
    token: Option<&str>,
    setup: &str,
) -> reqwest::Response {
    let mut req = http
        .post(server.url("/api/v1/admin/claim"))
        .json(&json!({ "token": setup }));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("claim")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_account_is_not_admin_and_the_logged_setup_token_makes_one_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = ChildServer::start(data.path(), &[], &[]);
    let setup = setup_token(&server);
    let http = reqwest::Client::new();
    let first = register(&http, &server, "first@example.com").await;
    assert_eq!(first["user"]["role"], "user", "being first makes no admin");
    let second = register(&http, &server, "owner@example.com").await;
    let t1 = first["access_token"].as_str().expect("token");
    let t2 = second["access_token"].as_str().expect("token");

    expect_problem(
        claim(&http, &server, None, &setup).await,
        401,
        "unauthorized",
    )
    .await;
    expect_problem(
        claim(&http, &server, Some(t2), "not-the-token").await,
        400,
        "invalid_grant",
    )
    .await;
    assert_eq!(claim(&http, &server, Some(t2), &setup).await.status(), 204);
    let me: Value = http
        .get(server.url("/api/v1/me"))
        .bearer_auth(t2)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["role"], "admin", "{me}");
    let r = http
        .get(server.url("/api/v1/admin/users"))
        .bearer_auth(t2)
        .send()
        .await
        .expect("admin route");
    assert_eq!(r.status(), 200);
    // Burned: nobody can use it again.
    expect_problem(
        claim(&http, &server, Some(t1), &setup).await,
        400,
        "invalid_grant",
    )
    .await;
    assert_eq!(server.terminate(T).code(), Some(0));
    // With an admin, a restart logs no token.
    let server = ChildServer::start(data.path(), &[], &[]);
    let r = http
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(r.status(), 200);
    let logs = server.drain_logs();
    assert!(!logs.iter().any(|l| l.contains("setup_token")), "{logs:?}");
    server.kill9();
}

// ---------------------------------------------------------------------------------------
// Stripe mode needs a webhook secret

#[test]
fn stripe_mode_without_webhook_secrets_fails_config_check_and_start() {
    let data = tempfile::tempdir().expect("tempdir");
    let key = [("WARPBASE_STRIPE__SECRET_KEY", "sk_test_123")];
    let o = cli(
        &[
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--data-dir"),
            data.path().as_os_str(),
        ],
        &key,
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("stripe.webhook_secrets"), "{}", text(&o));
    let o = cli(
        &[
            OsStr::new("serve"),
            OsStr::new("--listen"),
            OsStr::new("127.0.0.1:0"),
            OsStr::new("--data-dir"),
            data.path().as_os_str(),
        ],
        &key,
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("stripe.webhook_secrets"), "{}", text(&o));
    let o = cli(
        &[
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--data-dir"),
            data.path().as_os_str(),
        ],
        &[key[0], ("WARPBASE_STRIPE__WEBHOOK_SECRETS", "whsec_abc")],
    );
    assert!(o.status.success(), "{}", text(&o));
}

#[tokio::test]
async fn an_app_built_in_stripe_mode_without_webhook_secrets_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = crate::common::test_config(dir.path());
    config.stripe.secret_key = warpbase::config::Secret::new("sk_test_123");
    let err = match warpbase::App::build(config).await {
        Ok(_) => panic!("an App that can verify no webhook must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("stripe.webhook_secrets"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Webhook contract

#[tokio::test]
async fn a_signed_body_that_is_not_a_stripe_event_is_400_invalid_input() {
    const SECRET: &str = "whsec_sec_d";
    let app = TestApp::start_with(
        |c| c.stripe.webhook_secrets = vec![warpbase::config::Secret::new(SECRET)],
        AppOptions::default(),
    )
    .await;
    let now = app.state().now_millis() / 1000;
    for body in [&b"{\"hello\":1}"[..], b"not json", b"[1,2]"] {
        let r = app
            .client
            .post(app.url("/api/v1/billing/webhook"))
            .header(
                "stripe-signature",
                warpbase::billing::signature::sign(body, SECRET, now),
            )
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("webhook");
        expect_problem(r, 400, "invalid_input").await;
    }
    let n = app
        .db_i64("SELECT COUNT(*) FROM stripe_events", vec![])
        .await
        .expect("count");
    assert_eq!(n, 0, "nothing recorded");
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Retention

const DAY: i64 = 24 * 3600 * 1000;

async fn seed_retention_rows(app: &TestApp, user_id: &str) {
    let now = app.state().now_millis();
    let uid = user_id.to_string();
    app.state()
        .storage
        .write(move |c| {
            let session = |id: &str, expires: i64, revoked: Option<i64>| {
                c.execute(
                    "INSERT INTO sessions (id, user_id, refresh_hash, refresh_expires_at,
                         created_at, last_used_at, revoked_at)
                     VALUES (?1, ?2, randomblob(32), ?3, ?4, ?4, ?5)",
                    rusqlite::params![id, uid, expires, now - 400 * DAY, revoked],
                )
            };
            session("s_revoked_old", now + DAY, Some(now - 40 * DAY))?;
            session("s_expired_old", now - 40 * DAY, None)?;
            session("s_revoked_recent", now + DAY, Some(now - DAY))?;
            session("s_live", now + DAY, None)?;
            for (h, at) in [("old", now - 40 * DAY), ("new", now - DAY)] {
                c.execute(
                    "INSERT INTO refresh_history (hash, session_id, rotated_at)
                     VALUES (?1, 's_live', ?2)",
                    rusqlite::params![h.as_bytes(), at],
                )?;
            }
            for (event, at) in [("old", now - 400 * DAY), ("new", now - DAY)] {
                c.execute(
                    "INSERT INTO audit_log (user_id, event, created_at) VALUES (?1, ?2, ?3)",
                    rusqlite::params![uid, format!("retention_{event}"), at],
                )?;
            }
            for (id, status, at) in [
                ("evt_old_applied", "applied", now - 100 * DAY),
                ("evt_old_ignored", "ignored", now - 100 * DAY),
                ("evt_old_failed", "failed", now - 100 * DAY),
                ("evt_recent", "applied", now - DAY),
            ] {
                c.execute(
                    "INSERT INTO stripe_events (id, type, created, status, payload,
                         received_at, processed_at)
                     VALUES (?1, 'invoice.paid', ?2, ?3, '{}', ?2, ?2)",
                    rusqlite::params![id, at, status],
                )?;
            }
            // Make the hourly task due again now.
            c.execute(
                "UPDATE meta SET value = '0' WHERE key = 'periodic.retention'",
                [],
            )?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("seed");
}

async fn ids(app: &TestApp, sql: &'static str) -> Vec<String> {
    app.state()
        .storage
        .read(move |c| {
            let mut s = c.prepare(sql)?;
            let v = s
                .query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, StorageError>(v)
        })
        .await
        .expect("ids")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_what_nobody_needs_and_keeps_the_rest() {
    let app = TestApp::start_with(
        // Housekeeping (and with it the periodic tasks) every few hundred milliseconds.
        |c| c.jobs.lease = Duration::from_millis(400),
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("keep@example.com").await;
    // The first periodic round already ran at start; wait for its record.
    eventually(T, "the first retention run", || async {
        app.db_i64(
            "SELECT COUNT(*) FROM meta WHERE key = 'periodic.retention'",
            vec![],
        )
        .await
        .ok()
        .filter(|n| *n == 1)
    })
    .await;
    seed_retention_rows(&app, &user.id).await;
    // One retention run purges table by table (separate writes), so wait until the run
    // has reached every table, then check what it kept.
    let (sessions, history, audit, events) = eventually(T, "old rows to be purged", || async {
        let sessions = ids(&app, "SELECT id FROM sessions ORDER BY id").await;
        let history = ids(
            &app,
            "SELECT CAST(hash AS TEXT) FROM refresh_history ORDER BY 1",
        )
        .await;
        let audit = ids(
            &app,
            "SELECT event FROM audit_log WHERE event LIKE 'retention_%'",
        )
        .await;
        let events = ids(&app, "SELECT id FROM stripe_events ORDER BY id").await;
        let done = !sessions.iter().any(|id| id.ends_with("_old"))
            && !history.iter().any(|h| h == "old")
            && !audit.iter().any(|e| e == "retention_old")
            && !events
                .iter()
                .any(|e| e == "evt_old_applied" || e == "evt_old_ignored");
        done.then_some((sessions, history, audit, events))
    })
    .await;
    assert!(sessions.contains(&"s_live".to_string()), "{sessions:?}");
    assert!(
        sessions.contains(&"s_revoked_recent".to_string()),
        "{sessions:?}"
    );
    assert_eq!(history, ["new"]);
    assert_eq!(audit, ["retention_new"]);
    assert_eq!(
        events,
        ["evt_old_failed", "evt_recent"],
        "failed events wait for a replay"
    );
    // The signed-in user's own session is live and still works.
    assert_eq!(
        app.get("/api/v1/me", Some(&user.access_token))
            .await
            .status(),
        200
    );
    app.shutdown().await;
}

#[test]
fn retention_values_that_would_break_reuse_detection_or_idempotency_are_refused() {
    let none = warpbase::config::Overrides::default();
    let load = |env: &[(&str, &str)]| {
        warpbase::Config::load_from(
            None,
            &none,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    };
    let c = load(&[]).expect("defaults");
    assert_eq!(c.retention.sessions, Duration::from_secs(30 * 86400));
    assert_eq!(c.retention.audit_log, Duration::from_secs(365 * 86400));
    assert_eq!(c.retention.stripe_events, Duration::from_secs(90 * 86400));
    let e = load(&[("WARPBASE_RETENTION__STRIPE_EVENTS", "1d")]).expect_err("too short");
    assert!(e.to_string().contains("retention.stripe_events"), "{e}");
    let e = load(&[("WARPBASE_RETENTION__REFRESH_HISTORY", "1d")]).expect_err("too short");
    assert!(e.to_string().contains("retention.refresh_history"), "{e}");
    load(&[("WARPBASE_RETENTION__STRIPE_EVENTS", "0")]).expect("0 keeps forever");
}

#[tokio::test]
async fn scratch_files_left_by_a_killed_run_are_cleared_at_start() {
    let data = tempfile::tempdir().expect("tempdir");
    let left = data.path().join("tmp").join("analyze-00000000deadbeef");
    std::fs::create_dir_all(left.join("src")).expect("mkdir");
    std::fs::write(left.join("src").join("a.rs"), "fn main() {}").expect("write");
    std::fs::write(data.path().join("tmp").join("stray"), "x").expect("write");
    let d = data.path().to_path_buf();
    let app = TestApp::start_with(move |c| c.data_dir = d, AppOptions::default()).await;
    let rest: Vec<_> = std::fs::read_dir(data.path().join("tmp"))
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(rest.is_empty(), "{rest:?}");
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// File modes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_backups_and_an_open_data_dir_are_private() {
    let base = tempfile::tempdir().expect("tempdir");
    let data = base.path().join("data");
    let o = cli(
        &[
            OsStr::new("migrate"),
            OsStr::new("--data-dir"),
            data.as_os_str(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let db = data.join("warpbase.db");
    assert_eq!(mode(&db), 0o600, "created under umask 077");

    // As a hand-made or older data dir often is.
    set_mode(&data, 0o755);
    set_mode(&db, 0o644);
    let d = data.clone();
    let app = TestApp::start_with(move |c| c.data_dir = d, AppOptions::default()).await;
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(mode(&db), 0o600, "database");

    let dest = base.path().join("copy.db");
    let o = cli(
        &[
            OsStr::new("backup"),
            dest.as_os_str(),
            OsStr::new("--data-dir"),
            data.as_os_str(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&dest), 0o600, "CLI backup");
    // The scheduled backup's copy goes through the same function, in this process
    // (whose umask the test does not change).
    let dest2 = base.path().join("copy2.db");
    warpbase::storage::backup_file(&db, &dest2).expect("backup");
    assert_eq!(mode(&dest2), 0o600, "in-process backup");
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Metrics

#[test]
fn metrics_default_to_their_own_loopback_listener_and_off_turns_them_off() {
    let none = warpbase::config::Overrides::default();
    let load = |env: &[(&str, &str)]| {
        warpbase::Config::load_from(
            None,
            &none,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    };
    let c = load(&[]).expect("defaults");
    assert_eq!(
        c.metrics_listen,
        Some("127.0.0.1:9090".parse().expect("addr"))
    );
    assert_eq!(
        load(&[("WARPBASE_METRICS_LISTEN", "off")])
            .expect("off")
            .metrics_listen,
        None
    );
    assert_eq!(
        load(&[("WARPBASE_METRICS_LISTEN", "")])
            .expect("empty")
            .metrics_listen,
        None
    );
    let e = load(&[
        ("WARPBASE_LISTEN", "127.0.0.1:8080"),
        ("WARPBASE_METRICS_LISTEN", "127.0.0.1:8080"),
    ])
    .expect_err("same address");
    assert!(e.to_string().contains("metrics_listen"), "{e}");
}

#[tokio::test]
async fn with_metrics_off_nothing_serves_them_and_the_main_listener_never_does() {
    let app = TestApp::start().await;
    assert!(app.app.metrics_addr.is_none());
    expect_problem(app.get("/metrics", None).await, 404, "not_found").await;
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Immediate disable

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_disable_from_the_cli_stops_a_running_servers_tokens_within_seconds() {
    let app = TestApp::start().await;
    let user = app.create_user("gone@example.com").await;
    let other = app.create_user("stays@example.com").await;
    for _ in 0..2 {
        // Warm: the auth caches now hold the user.
        assert_eq!(
            app.get("/api/v1/me", Some(&user.access_token))
                .await
                .status(),
            200
        );
    }
    let o = cli(
        &[
            OsStr::new("user"),
            OsStr::new("disable"),
            OsStr::new("gone@example.com"),
            OsStr::new("--data-dir"),
            app.dir.path().as_os_str(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("access tokens"), "{}", text(&o));
    // Well under the caches' 30 s TTL, which bounded it before.
    let started = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the disabled user's token to stop working",
        || async {
            (app.get("/api/v1/me", Some(&user.access_token))
                .await
                .status()
                == 401)
                .then_some(())
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        app.get("/api/v1/me", Some(&other.access_token))
            .await
            .status(),
        200,
        "other users are untouched"
    );
    // A promotion from the CLI shows as quickly.
    let o = cli(
        &[
            OsStr::new("user"),
            OsStr::new("promote"),
            OsStr::new("stays@example.com"),
            OsStr::new("--data-dir"),
            app.dir.path().as_os_str(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    eventually(
        Duration::from_secs(10),
        "the promotion to apply",
        || async {
            let me: Value = app
                .get("/api/v1/me", Some(&other.access_token))
                .await
                .json()
                .await
                .ok()?;
            (me["role"] == "admin").then_some(())
        },
    )
    .await;
    app.shutdown().await;
}
