//! The foundation, black-box: HTTP error contract, health, storage writer guarantees,
//! config, secrets, migrations, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{ChildServer, TestApp, expect_problem};
use axum::routing::{get, post};
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::storage::{StorageError, migrate};

fn test_routes() -> axum::Router<warpbase::AppState> {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        n: u32,
    }
    axum::Router::new()
        .route(
            "/api/v1/test/panic",
            get(|| async {
                if true {
                    panic!("boom with a secret internal detail");
                }
                "unreachable"
            }),
        )
        .route(
            "/api/v1/test/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route(
            "/api/v1/test/echo",
            post(
                |warpbase::http::Json(b): warpbase::http::Json<Body>| async move {
                    axum::Json(json!({"name": b.name, "n": b.n}))
                },
            ),
        )
}

async fn app_with_test_routes() -> TestApp {
    TestApp::start_with(
        |_| {},
        AppOptions {
            extra_routes: Some(test_routes()),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn health_ready_and_request_ids() {
    let app = TestApp::start().await;
    let r = app.get("/healthz", None).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.expect("body"), "ok");
    assert_eq!(app.get("/readyz", None).await.status(), 200);

    // A client-supplied request id is kept and echoed.
    let r = app
        .client
        .get(app.url("/api/v1/nope"))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .expect("request");
    assert_eq!(r.headers()["x-request-id"], "trace-abc-123");
    let body = expect_problem(r, 404, "not_found").await;
    assert_eq!(body["request_id"], "trace-abc-123");
    app.shutdown().await;
}

#[tokio::test]
async fn framework_errors_are_problems() {
    let app = app_with_test_routes().await;
    // 404 on an unknown API path.
    expect_problem(
        app.get("/api/v1/does-not-exist", None).await,
        404,
        "not_found",
    )
    .await;
    // 405 on a known path with the wrong method.
    let r = app
        .client
        .delete(app.url("/healthz"))
        .send()
        .await
        .expect("req");
    expect_problem(r, 405, "method_not_allowed").await;
    // 415 without a JSON content type.
    let r = app
        .client
        .post(app.url("/api/v1/test/echo"))
        .body("{\"name\":\"a\",\"n\":1}")
        .send()
        .await
        .expect("req");
    expect_problem(r, 415, "unsupported_media_type").await;
    // 400 on a JSON syntax error.
    let r = app
        .client
        .post(app.url("/api/v1/test/echo"))
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .expect("req");
    expect_problem(r, 400, "invalid_input").await;
    // 422 on well-formed JSON of the wrong shape, naming the field.
    let r = app
        .post_json("/api/v1/test/echo", None, &json!({"name": "a", "n": -1}))
        .await;
    let body = expect_problem(r, 422, "invalid_input").await;
    assert!(
        body["detail"].as_str().unwrap_or("").contains('n'),
        "{body}"
    );
    // 413 over the 1 MiB JSON limit.
    let big = json!({"name": "x".repeat(1_100_000), "n": 1});
    let r = app.post_json("/api/v1/test/echo", None, &big).await;
    expect_problem(r, 413, "payload_too_large").await;
    // The happy path still works.
    let r = app
        .post_json("/api/v1/test/echo", None, &json!({"name": "a", "n": 2}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["n"], 2);
    app.shutdown().await;
}

#[tokio::test]
async fn a_panic_is_a_500_problem_and_the_server_keeps_serving() {
    let app = app_with_test_routes().await;
    for _ in 0..3 {
        let r = app.get("/api/v1/test/panic", None).await;
        let body = expect_problem(r, 500, "internal").await;
        assert!(
            !body.to_string().contains("secret internal detail"),
            "internals leaked: {body}"
        );
    }
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn a_slow_handler_is_cut_off_with_a_408_problem() {
    let app = TestApp::start_with(
        |c| c.request_timeout = Duration::from_millis(300),
        AppOptions {
            extra_routes: Some(test_routes()),
            ..Default::default()
        },
    )
    .await;
    let started = std::time::Instant::now();
    let r = app.get("/api/v1/test/slow", None).await;
    assert!(r.headers().contains_key("x-request-id"));
    assert!(r.headers().contains_key("content-security-policy"));
    expect_problem(r, 408, "timeout").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut off at the timeout, not when the handler ends"
    );
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn security_headers_and_spa_fallback() {
    let app = TestApp::start().await;
    let r = app.get("/some/client/route", None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .expect("csp")
            .contains("default-src 'self'")
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/html")
    );
    let etag = r.headers()["etag"].to_str().expect("etag").to_string();
    let r = app
        .client
        .get(app.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 304);
    expect_problem(app.get("/missing.js", None).await, 404, "not_found").await;
    app.shutdown().await;
}

async fn scratch_table(app: &TestApp) {
    app.state()
        .storage
        .write(|c| {
            c.execute_batch(
                "CREATE TABLE scratch (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)",
            )?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("create scratch table");
}

async fn scratch_count(app: &TestApp) -> i64 {
    app.state()
        .storage
        .read(|c| {
            Ok::<i64, StorageError>(c.query_row("SELECT COUNT(*) FROM scratch", [], |r| r.get(0))?)
        })
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_writes_all_commit_in_batches() {
    let app = TestApp::start().await;
    scratch_table(&app).await;
    let before = app.state().storage.writer_stats();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let storage = app.state().storage.clone();
        tasks.push(tokio::spawn(async move {
            storage
                .write(move |c| {
                    c.execute("INSERT INTO scratch (v) VALUES (?1)", [format!("v{i}")])?;
                    Ok::<_, StorageError>(c.last_insert_rowid())
                })
                .await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("join").expect("write acknowledged"));
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 500, "every write got its own row id");
    assert_eq!(
        scratch_count(&app).await,
        500,
        "every acknowledged write is visible"
    );
    let after = app.state().storage.writer_stats();
    let writes = after.writes - before.writes;
    let txs = after.transactions - before.transactions;
    // Background work (job dispatchers, readiness) may add a few writes of its own.
    assert!(writes >= 500);
    assert!(
        txs < writes,
        "group commit should batch concurrent writes: {writes} writes in {txs} transactions"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_write_rolls_back_alone() {
    let app = TestApp::start().await;
    scratch_table(&app).await;
    app.state()
        .storage
        .write(|c| {
            c.execute("INSERT INTO scratch (v) VALUES ('sentinel')", [])?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("sentinel");
    let before = app.state().storage.writer_stats();
    // Hold the writer busy so the next writes queue up and land in one batch.
    let gate = Arc::new(std::sync::Barrier::new(2));
    let storage = app.state().storage.clone();
    let g = gate.clone();
    let blocker = tokio::spawn(async move {
        storage
            .write(move |_c| {
                g.wait();
                Ok::<_, StorageError>(())
            })
            .await
    });
    let mut tasks = Vec::new();
    for i in 0..20 {
        let storage = app.state().storage.clone();
        tasks.push(tokio::spawn(async move {
            storage
                .write(move |c| {
                    c.execute("INSERT INTO scratch (v) VALUES (?1)", [format!("ok{i}")])?;
                    if i % 5 == 0 {
                        // Half-done work, then failure: must vanish entirely.
                        c.execute("INSERT INTO scratch (v) VALUES (?1)", [format!("half{i}")])?;
                        c.execute("INSERT INTO scratch (v) VALUES ('sentinel')", [])?;
                    }
                    Ok::<_, StorageError>(())
                })
                .await
        }));
    }
    // Let the 20 writes queue, then release the writer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::spawn_blocking(move || gate.wait())
        .await
        .expect("release");
    blocker.await.expect("join").expect("blocker");
    let mut failed = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("join") {
            Ok(()) => assert!(i % 5 != 0, "write {i} should have failed"),
            Err(e) => {
                assert!(i % 5 == 0, "write {i} failed: {e}");
                assert!(e.is_unique_violation(), "{e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 4);
    let after = app.state().storage.writer_stats();
    assert!(
        // The blocker, one or two batches, and possibly a background dispatcher poll.
        after.transactions - before.transactions <= 6,
        "the 20 writes should share a batch: {before:?} -> {after:?}"
    );
    assert_eq!(after.failed_transactions, before.failed_transactions);
    assert_eq!(
        scratch_count(&app).await,
        17,
        "neighbours of failed writes committed"
    );
    let half: i64 = app
        .state()
        .storage
        .read(|c| {
            Ok::<i64, StorageError>(c.query_row(
                "SELECT COUNT(*) FROM scratch WHERE v LIKE 'half%'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
        .expect("count");
    assert_eq!(half, 0, "a failed write leaves nothing half-written");
    app.shutdown().await;
}

#[tokio::test]
async fn a_panicking_write_is_an_error_and_the_writer_survives() {
    let app = TestApp::start().await;
    scratch_table(&app).await;
    let r = app
        .state()
        .storage
        .write(|c| {
            c.execute("INSERT INTO scratch (v) VALUES ('before-panic')", [])?;
            if c.is_autocommit() {
                return Ok(());
            }
            panic!("closure bug");
        })
        .await;
    assert!(matches!(r, Err(StorageError::Panicked)), "{r:?}");
    assert_eq!(scratch_count(&app).await, 0);
    app.state()
        .storage
        .write(|c| {
            c.execute("INSERT INTO scratch (v) VALUES ('after')", [])?;
            Ok::<_, StorageError>(())
        })
        .await
        .expect("writer still works");
    assert_eq!(scratch_count(&app).await, 1);
    app.shutdown().await;
}

#[tokio::test]
async fn readers_cannot_write() {
    let app = TestApp::start().await;
    let r = app
        .state()
        .storage
        .read(|c| {
            c.execute_batch("CREATE TABLE nope (x)")?;
            Ok::<_, StorageError>(())
        })
        .await;
    assert!(r.is_err(), "a read connection must be read-only");
    app.shutdown().await;
}

#[test]
fn secrets_are_generated_private_and_reused_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChildServer::start(dir.path(), &[], &[]);
    let key_path = dir.path().join("secrets/jwt.key");
    let first = std::fs::read_to_string(&key_path).expect("jwt key written");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key file must be 0600");
    }
    assert!(dir.path().join("warpbase.db").exists());
    let status = s.terminate(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let s = ChildServer::start(dir.path(), &[], &[]);
    let second = std::fs::read_to_string(&key_path).expect("jwt key");
    assert_eq!(first, second, "a restart reuses the secret");
    s.kill9();
}

#[test]
fn sigterm_drains_and_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = ChildServer::start(dir.path(), &[], &[]);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let r = reqwest::get(s.url("/readyz")).await.expect("readyz");
        let status = r.status();
        assert_eq!(
            status,
            200,
            "{} {:?}",
            r.text().await.unwrap_or_default(),
            s.drain_logs()
        );
    });
    let status = s.terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
    let wal = dir.path().join("warpbase.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "WAL checkpointed and truncated at shutdown");
}

#[test]
fn unknown_config_key_stops_the_start_with_the_key_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n[jobs]\nbackof_base = \"1s\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(crate::common::binary())
        .args(["--config", cfg.to_str().expect("utf8"), "config", "check"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backof_base"), "stderr: {err}");

    let out = std::process::Command::new(crate::common::binary())
        .args(["serve", "--config", cfg.to_str().expect("utf8")])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backof_base"));
}

#[test]
fn config_print_redacts_secrets_and_env_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(crate::common::binary())
        .args(["config", "print", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .env("WARPBASE_STRIPE__SECRET_KEY", "sk_test_supersecret")
        // Stripe mode needs a webhook secret to be a valid configuration at all.
        .env("WARPBASE_STRIPE__WEBHOOK_SECRETS", "whsec_supersecret")
        .env("WARPBASE_PUBLIC_URL", "https://tunnel.example.com")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("sk_test_supersecret"), "{text}");
    assert!(!text.contains("whsec_supersecret"), "{text}");
    assert!(text.contains("[redacted]"));
    assert!(text.contains("https://tunnel.example.com"));
    assert!(text.contains(&dir.path().display().to_string()));
}

#[test]
fn migrate_command_and_newer_schema_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(crate::common::binary())
        .arg("migrate")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = dir.path().join("warpbase.db");
    let conn = warpbase::storage::Conn::open(&db).expect("open");
    assert_eq!(
        migrate::current_version(&conn).expect("version"),
        migrate::latest_version()
    );
    conn.pragma_update(None, "user_version", 999).expect("bump");
    drop(conn);
    let out = std::process::Command::new(crate::common::binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "an older binary must refuse a newer database"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer than this binary"), "stderr: {err}");
}
