//! Security hardening, track C (issue #16 items 5 and 8), black-box: plan checks on
//! retry, the reserved system queue, fair claiming across users, and uploads (storage
//! quota, delete, retention, rate, free-space floor, disk failures).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{TestApp, TestUser, eventually, expect_problem};
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::clock::{Clock, ManualClock};
use warpbase::config::{PlanConfig, PlanLimits, QueueConfig};

const T: Duration = Duration::from_secs(30);

fn plan(c: &mut warpbase::Config, limits: PlanLimits) {
    c.billing.plans.push(PlanConfig {
        id: "free".into(),
        name: "Free".into(),
        price_id: String::new(),
        price: 0,
        currency: "usd".into(),
        interval: "month".into(),
        metered: false,
        limits,
    });
}

fn generous(c: &mut warpbase::Config) {
    plan(
        c,
        PlanLimits {
            jobs_per_period: 100_000,
            concurrent_jobs: 100_000,
            max_upload_bytes: 16 << 20,
            max_storage_bytes: 64 << 20,
        },
    );
}

/// The `fast` queue with one slot and time enough for a job that blocks it.
fn one_fast_slot(c: &mut warpbase::Config) {
    c.jobs.queues.insert(
        "fast".into(),
        QueueConfig {
            concurrency: 1,
            timeout: Duration::from_secs(120),
        },
    );
}

async fn submit(app: &TestApp, user: &TestUser, body: Value) -> Value {
    let r = app
        .post_json("/api/v1/jobs", Some(&user.access_token), &body)
        .await;
    assert_eq!(r.status(), 202, "submit {body}");
    r.json().await.expect("json")
}

async fn job(app: &TestApp, user: &TestUser, id: &str) -> Value {
    app.get(&format!("/api/v1/jobs/{id}"), Some(&user.access_token))
        .await
        .json()
        .await
        .expect("json")
}

async fn wait_status(app: &TestApp, user: &TestUser, id: &str, status: &str) -> Value {
    eventually(T, &format!("job {id} {status}"), || async {
        let j = job(app, user, id).await;
        (j["status"] == status).then_some(j)
    })
    .await
}

async fn cancel(app: &TestApp, user: &TestUser, id: &str) {
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{id}/cancel"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200, "cancel {id}");
}

/// A demo job that holds its slot until canceled.
async fn blocker(app: &TestApp, user: &TestUser) -> String {
    let j = submit(
        app,
        user,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 60000}, "max_attempts": 1}),
    )
    .await;
    let id = j["id"].as_str().expect("id").to_string();
    wait_status(app, user, &id, "running").await;
    id
}

/// Submits `n` quick demo jobs at the top priority, eight at a time.
async fn backlog(app: &TestApp, user: &TestUser, n: usize) {
    let body = json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}, "priority": 1000});
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let subs = chunk.iter().map(|_| submit(app, user, body.clone()));
        futures_util::future::join_all(subs).await;
    }
}

#[tokio::test]
async fn one_users_backlog_and_priority_do_not_delay_another_users_job() {
    let app = TestApp::start_with(
        |c| {
            generous(c);
            one_fast_slot(c);
        },
        AppOptions::default(),
    )
    .await;
    let a = app.create_user("backlog@example.com").await;
    let b = app.create_user("single@example.com").await;
    let block = blocker(&app, &a).await;
    backlog(&app, &a, 500).await;
    // Submitted last, at the default (lower) priority.
    let mine = submit(
        &app,
        &b,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    let mine = mine["id"].as_str().expect("id").to_string();
    let queued = app
        .db_i64(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND status = 'queued'",
            vec![a.id.clone()],
        )
        .await
        .expect("count");
    assert_eq!(queued, 500, "the backlog waits behind the blocker");
    cancel(&app, &a, &block).await;
    wait_status(&app, &b, &mine, "succeeded").await;
    // By order of start, not wall time: how many of the backlog started before it.
    let ahead = app
        .db_i64(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND id != ?2
               AND started_at IS NOT NULL
               AND started_at < (SELECT started_at FROM jobs WHERE id = ?3)",
            vec![a.id.clone(), block.clone(), mine.clone()],
        )
        .await
        .expect("count");
    assert!(ahead <= 2, "{ahead} backlog jobs started first");
    app.shutdown().await;
}

#[tokio::test]
async fn system_mail_is_sent_while_a_user_backlog_fills_the_shared_queue() {
    let app = TestApp::start_with(
        |c| {
            generous(c);
            one_fast_slot(c);
        },
        AppOptions::default(),
    )
    .await;
    let a = app.create_user("flood@example.com").await;
    app.create_user("reset-me@example.com").await;
    let block = blocker(&app, &a).await;
    backlog(&app, &a, 50).await;
    let r = app
        .post_json(
            "/api/v1/auth/password-reset/request",
            None,
            &json!({"email": "reset-me@example.com"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(T, "the reset mail sent on the system queue", || async {
        let sent = app
            .db_i64(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'mail' AND queue = 'system'
                   AND status = 'succeeded'",
                vec![],
            )
            .await
            .expect("count");
        (sent >= 1).then_some(())
    })
    .await;
    let queued = app
        .db_i64(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND status = 'queued'",
            vec![a.id.clone()],
        )
        .await
        .expect("count");
    assert_eq!(queued, 50, "the user backlog is still waiting");
    cancel(&app, &a, &block).await;
    app.shutdown().await;
}

#[tokio::test]
async fn users_cannot_submit_to_the_system_queue() {
    let app = TestApp::start_with(generous, AppOptions::default()).await;
    let u = app.create_user("sneaky@example.com").await;
    let r = app
        .post_json(
            "/api/v1/jobs",
            Some(&u.access_token),
            &json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}, "queue": "system"}),
        )
        .await;
    expect_problem(r, 422, "reserved_queue").await;
    let n = app
        .db_i64(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1",
            vec![u.id.clone()],
        )
        .await
        .expect("count");
    assert_eq!(n, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn retry_over_the_plan_limit_is_refused_with_402() {
    let app = TestApp::start_with(
        |c| {
            plan(
                c,
                PlanLimits {
                    jobs_per_period: 1000,
                    concurrent_jobs: 2,
                    max_upload_bytes: 1 << 20,
                    max_storage_bytes: 10 << 20,
                },
            )
        },
        AppOptions::default(),
    )
    .await;
    let u = app.create_user("retrier@example.com").await;
    // Scheduled for later: queued, so active, without running.
    let later = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 3_600_000);
    let body = json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}, "run_at": later});
    let x = submit(&app, &u, body.clone()).await;
    let x = x["id"].as_str().expect("id").to_string();
    cancel(&app, &u, &x).await;
    let y = submit(&app, &u, body.clone()).await;
    submit(&app, &u, body.clone()).await;
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{x}/retry"),
            Some(&u.access_token),
            &json!({}),
        )
        .await;
    let p = expect_problem(r, 402, "plan_limit").await;
    assert_eq!(p["limit"], "concurrent jobs");
    assert_eq!(job(&app, &u, &x).await["status"], "canceled");
    let active = app
        .db_i64(
            "SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND status = 'queued'",
            vec![u.id.clone()],
        )
        .await
        .expect("count");
    assert_eq!(active, 2);
    // Under the limit again, the retry goes through and counts as a submission.
    cancel(&app, &u, y["id"].as_str().expect("id")).await;
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{x}/retry"),
            Some(&u.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let me: Value = app
        .get("/api/v1/me", Some(&u.access_token))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["plan"]["usage"]["jobs_this_period"], 4);
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Uploads

async fn upload(app: &TestApp, user: &TestUser, bytes: Vec<u8>) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/uploads"))
        .bearer_auth(&user.access_token)
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .expect("upload")
}

async fn upload_ok(app: &TestApp, user: &TestUser, bytes: Vec<u8>) -> String {
    let r = upload(app, user, bytes).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    v["id"].as_str().expect("id").to_string()
}

async fn delete_upload(app: &TestApp, token: &str, id: &str) -> reqwest::Response {
    app.client
        .delete(app.url(&format!("/api/v1/uploads/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("delete")
}

/// The names in `dir` (none if it does not exist).
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn uploads_dir(app: &TestApp) -> std::path::PathBuf {
    app.dir.path().join("uploads")
}

#[tokio::test]
async fn the_storage_quota_refuses_uploads_and_leaves_no_file() {
    let app = TestApp::start_with(
        |c| {
            plan(
                c,
                PlanLimits {
                    jobs_per_period: 1000,
                    concurrent_jobs: 2,
                    max_upload_bytes: 1 << 20,
                    max_storage_bytes: (5 << 20) / 2,
                },
            )
        },
        AppOptions::default(),
    )
    .await;
    let u = app.create_user("hoarder@example.com").await;
    let first = upload_ok(&app, &u, vec![1u8; 1 << 20]).await;
    upload_ok(&app, &u, vec![2u8; 1 << 20]).await;
    let r = upload(&app, &u, vec![3u8; 1 << 20]).await;
    let p = expect_problem(r, 402, "storage_quota_exceeded").await;
    assert_eq!(p["used"], 2 << 20);
    assert_eq!(
        files(&uploads_dir(&app)).len(),
        2,
        "no file of the refused upload"
    );
    // Another user's quota is their own.
    let other = app.create_user("other@example.com").await;
    upload_ok(&app, &other, vec![4u8; 1 << 20]).await;
    // Deleting frees the space.
    assert_eq!(
        delete_upload(&app, &u.access_token, &first).await.status(),
        204
    );
    upload_ok(&app, &u, vec![5u8; 1 << 20]).await;
    assert_eq!(files(&uploads_dir(&app)).len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn an_upload_is_deleted_only_by_its_owner_and_not_under_an_active_job() {
    let app = TestApp::start_with(generous, AppOptions::default()).await;
    let u = app.create_user("owner@example.com").await;
    let other = app.create_user("stranger@example.com").await;
    let id = upload_ok(&app, &u, b"not really an archive".to_vec()).await;
    let r = delete_upload(&app, &other.access_token, &id).await;
    expect_problem(r, 404, "not_found").await;
    let later = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 3_600_000);
    let j = submit(
        &app,
        &u,
        json!({"kind": "analyze", "payload": {"upload_id": id}, "run_at": later}),
    )
    .await;
    let r = delete_upload(&app, &u.access_token, &id).await;
    expect_problem(r, 409, "upload_in_use").await;
    cancel(&app, &u, j["id"].as_str().expect("id")).await;
    assert_eq!(
        delete_upload(&app, &u.access_token, &id).await.status(),
        204
    );
    assert!(files(&uploads_dir(&app)).is_empty());
    let rows = app
        .db_i64("SELECT COUNT(*) FROM uploads", vec![])
        .await
        .expect("count");
    assert_eq!(rows, 0);
    let r = delete_upload(&app, &u.access_token, &id).await;
    expect_problem(r, 404, "not_found").await;
    app.shutdown().await;
}

#[tokio::test]
async fn uploads_past_their_retention_are_purged_unless_a_job_uses_them() {
    let clock = ManualClock::new();
    let app = TestApp::start_with(
        |c| {
            generous(c);
            c.uploads.retention = Duration::from_secs(3600);
            // Housekeeping every half lease; the periodic tasks every fourth round.
            c.jobs.lease = Duration::from_millis(400);
        },
        AppOptions {
            clock: Some(clock.clone() as Arc<dyn Clock>),
            ..AppOptions::default()
        },
    )
    .await;
    let mut u = app.create_user("keeper@example.com").await;
    let old = upload_ok(&app, &u, b"old".to_vec()).await;
    let used = upload_ok(&app, &u, b"used".to_vec()).await;
    let far = warpbase::clock::rfc3339(clock.now_millis() + 100 * 3_600_000);
    submit(
        &app,
        &u,
        json!({"kind": "analyze", "payload": {"upload_id": used}, "run_at": far}),
    )
    .await;
    clock.advance(Duration::from_secs(2 * 3600));
    u.access_token = app.reissue(&u);
    let fresh = upload_ok(&app, &u, b"fresh".to_vec()).await;
    eventually(T, "the old upload purged", || async {
        let n = app
            .db_i64(
                "SELECT COUNT(*) FROM uploads WHERE id = ?1",
                vec![old.clone()],
            )
            .await
            .expect("count");
        (n == 0 && !uploads_dir(&app).join(&old).exists()).then_some(())
    })
    .await;
    let mut left = vec![used.clone(), fresh.clone()];
    left.sort();
    assert_eq!(files(&uploads_dir(&app)), left);
    app.shutdown().await;
}

#[tokio::test]
async fn uploads_are_rate_limited_per_user() {
    let app = TestApp::start_with(
        |c| {
            generous(c);
            c.uploads.rate_limit = 2;
        },
        AppOptions::default(),
    )
    .await;
    let u = app.create_user("burst@example.com").await;
    upload_ok(&app, &u, b"1".to_vec()).await;
    upload_ok(&app, &u, b"2".to_vec()).await;
    let r = upload(&app, &u, b"3".to_vec()).await;
    assert!(r.headers().contains_key("retry-after"));
    expect_problem(r, 429, "rate_limited").await;
    let other = app.create_user("calm@example.com").await;
    upload_ok(&app, &other, b"1".to_vec()).await;
    assert_eq!(files(&uploads_dir(&app)).len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn uploads_below_the_free_space_floor_get_503() {
    let app = TestApp::start_with(
        |c| {
            generous(c);
            c.uploads.min_free_bytes = u64::MAX / 2;
        },
        AppOptions::default(),
    )
    .await;
    let u = app.create_user("full@example.com").await;
    let r = upload(&app, &u, vec![0u8; 1000]).await;
    assert!(r.headers().contains_key("retry-after"));
    expect_problem(r, 503, "unavailable").await;
    assert!(files(&uploads_dir(&app)).is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn an_upload_the_disk_cannot_take_answers_503() {
    // The uploads dir cannot be created (a file is in its place): root ignores
    // permission bits, so an unwritable directory would not fail here.
    let app = TestApp::start_with(
        |c| {
            generous(c);
            std::fs::write(c.data_dir.join("uploads"), b"in the way").expect("file");
        },
        AppOptions::default(),
    )
    .await;
    let u = app.create_user("ro@example.com").await;
    let r = upload(&app, &u, vec![0u8; 1000]).await;
    expect_problem(r, 503, "unavailable").await;
    let rows = app
        .db_i64("SELECT COUNT(*) FROM uploads", vec![])
        .await
        .expect("count");
    assert_eq!(rows, 0);
    app.shutdown().await;
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn an_upload_that_fills_the_disk_answers_503_and_leaves_no_file() {
    let mut mounted = None;
    let app = TestApp::start_with(
        |c| {
            generous(c);
            c.uploads.min_free_bytes = 0;
            let dir = c.data_dir.join("uploads");
            std::fs::create_dir_all(&dir).expect("dir");
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
                .arg(&dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                mounted = Some(Mounted(dir));
            }
        },
        AppOptions::default(),
    )
    .await;
    if mounted.is_none() {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let u = app.create_user("filler@example.com").await;
    // Larger than the whole filesystem: refused as it streams.
    let r = upload(&app, &u, vec![7u8; 6 << 20]).await;
    expect_problem(r, 503, "unavailable").await;
    assert!(files(&uploads_dir(&app)).is_empty());
    // Two at once that each fit what was free when they began, but not together: the
    // disk fills under one of them.
    let (r1, r2) = tokio::join!(
        upload(&app, &u, vec![8u8; 3 << 20]),
        upload(&app, &u, vec![9u8; 3 << 20])
    );
    let mut ok = 0;
    for r in [r1, r2] {
        if r.status() == 201 {
            ok += 1;
        } else {
            expect_problem(r, 503, "unavailable").await;
        }
    }
    assert!(ok <= 1, "both fit in 4 MiB?");
    let rows = app
        .db_i64("SELECT COUNT(*) FROM uploads", vec![])
        .await
        .expect("count");
    assert_eq!(rows, ok);
    assert_eq!(
        files(&uploads_dir(&app)).len() as i64,
        ok,
        "no partial file left"
    );
    // Space freed: a small upload fits again.
    upload_ok(&app, &u, vec![1u8; 1000]).await;
    app.shutdown().await;
    drop(mounted);
}
