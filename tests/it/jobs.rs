//! Jobs, black-box: the queue's lifecycle, retries and the dead-letter queue, timeouts,
//! cancellation, idempotency, quotas, exactly-once execution, SSE, and crash recovery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{ChildServer, SseReader, TestApp, TestUser, eventually, expect_problem};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::config::{PlanConfig, PlanLimits, QueueConfig};
use warpbase::jobs::{Handler, JobContext, JobFailure, KindSpec};

const T: Duration = Duration::from_secs(20);

fn fast_retries(c: &mut warpbase::Config) {
    c.jobs.backoff_base = Duration::from_millis(5);
    c.jobs.backoff_cap = Duration::from_millis(50);
    c.jobs.queues.insert(
        "tiny".into(),
        QueueConfig {
            concurrency: 2,
            timeout: Duration::from_millis(300),
        },
    );
}

/// A free plan with these limits.
fn free_plan(
    c: &mut warpbase::Config,
    jobs_per_period: u64,
    concurrent_jobs: u32,
    max_upload_bytes: u64,
) {
    c.billing.plans.push(PlanConfig {
        id: "free".into(),
        name: "Free".into(),
        price_id: String::new(),
        price: 0,
        currency: "usd".into(),
        interval: "month".into(),
        metered: false,
        limits: PlanLimits {
            jobs_per_period,
            concurrent_jobs,
            max_upload_bytes,
            max_storage_bytes: max_upload_bytes * 10,
        },
    });
}

fn generous_free_plan(c: &mut warpbase::Config) {
    free_plan(c, 100_000, 100_000, 1 << 20);
}

async fn start() -> (TestApp, TestUser) {
    let app = TestApp::start_with(
        |c| {
            fast_retries(c);
            generous_free_plan(c);
        },
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("jobs@example.com").await;
    (app, user)
}

async fn submit(app: &TestApp, user: &TestUser, body: Value) -> Value {
    let r = app
        .post_json("/api/v1/jobs", Some(&user.access_token), &body)
        .await;
    assert_eq!(r.status(), 202, "submit {body}");
    r.json().await.expect("job json")
}

async fn job(app: &TestApp, user: &TestUser, id: &str) -> Value {
    let r = app
        .get(&format!("/api/v1/jobs/{id}"), Some(&user.access_token))
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.expect("job json")
}

/// The job's attempt history (`GET /jobs/{id}/attempts`).
async fn attempts(app: &TestApp, user: &TestUser, id: &str) -> Value {
    let r = app
        .get(
            &format!("/api/v1/jobs/{id}/attempts"),
            Some(&user.access_token),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.expect("attempts json")
}

/// The job's SSE stream (`GET /jobs/{id}/events`), opened with the user's bearer token.
async fn job_events(app: &TestApp, user: &TestUser, id: &str) -> SseReader {
    let resp = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{id}/events")))
        .bearer_auth(&user.access_token)
        .send()
        .await
        .expect("sse");
    SseReader::new(resp)
}

async fn wait_status(app: &TestApp, user: &TestUser, id: &str, status: &str) -> Value {
    eventually(T, &format!("job {id} to be {status}"), || async {
        let j = job(app, user, id).await;
        (j["status"] == status).then_some(j)
    })
    .await
}

#[tokio::test]
async fn a_demo_job_streams_progress_and_succeeds() {
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 5, "step_ms": 30}}),
    )
    .await;
    assert_eq!(j["status"], "queued");
    assert_eq!(j["max_attempts"], 4);
    let id = j["id"].as_str().expect("id");
    let mut sse = job_events(&app, &user, id).await;
    let mut pcts = Vec::new();
    let mut done = None;
    while let Some(ev) = sse.next(T).await {
        assert!(ev.id.is_some(), "every event has an id: {ev:?}");
        match ev.event.as_str() {
            "progress" => pcts.push(ev.data["pct"].as_u64().expect("pct")),
            "done" => done = Some(ev.data),
            "state" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    let done = done.expect("a terminal done event before the stream closed");
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"], json!({"steps": 5}));
    assert!(
        pcts.windows(2).all(|w| w[0] <= w[1]),
        "progress in order: {pcts:?}"
    );
    assert_eq!(pcts.last(), Some(&100));
    let j = job(&app, &user, id).await;
    assert_eq!(j["status"], "succeeded");
    assert_eq!(j["progress"]["pct"], 100);
    assert_eq!(j["attempt"], 1);
    assert!(j["finished_at"].is_string());
    app.shutdown().await;
}

/// Progress is saved once a second through the single writer. A slow commit (a busy disk's
/// fsync) must not hold the handler back: its progress keeps reaching subscribers.
#[tokio::test]
async fn progress_keeps_flowing_while_a_progress_save_waits_for_the_writer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 100, "step_ms": 50}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let mut sse = job_events(&app, &user, id).await;
    while let Some(ev) = sse.next(T).await {
        if ev.event == "progress" {
            break;
        }
    }
    // Hold the writer for 2.5 s. The job's once-a-second save is queued behind it within
    // the first second, so from 1.1 s on a handler that waited for its save would be still.
    let since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let released = Arc::new(AtomicBool::new(false));
    let (s2, r2) = (since.clone(), released.clone());
    let storage = app.state().storage.clone();
    let block = tokio::spawn(async move {
        storage
            .write(move |_| {
                if let Ok(mut s) = s2.lock() {
                    *s = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(2500));
                r2.store(true, Ordering::SeqCst);
                Ok::<_, warpbase::storage::StorageError>(())
            })
            .await
    });
    let mut late = 0;
    while let Some(ev) = sse.next(T).await {
        if released.load(Ordering::SeqCst) {
            break;
        }
        let started = since.lock().ok().and_then(|s| *s);
        if ev.event == "progress"
            && started.is_some_and(|t| t.elapsed() > Duration::from_millis(1100))
        {
            late += 1;
        }
    }
    block.await.expect("join").expect("blocking write");
    assert!(
        late >= 3,
        "progress stalled while the writer was busy: {late} events in its last 1.4 s"
    );
    wait_status(&app, &user, id, "succeeded").await;
    app.shutdown().await;
}

#[tokio::test]
async fn retryable_failures_retry_then_succeed_with_history() {
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0, "fail_attempts": 2}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let j = wait_status(&app, &user, id, "succeeded").await;
    assert_eq!(j["attempt"], 3);
    let hist = attempts(&app, &user, id).await;
    let outcomes: Vec<&str> = hist["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, vec!["retry", "retry", "succeeded"]);
    app.shutdown().await;
}

#[tokio::test]
async fn exhausted_goes_dead_and_a_dlq_retry_gets_a_fresh_budget() {
    let (app, user) = start().await;
    let admin = app.admin("jobs-admin@example.com").await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "max_attempts": 2,
               "payload": {"steps": 1, "step_ms": 0, "fail_attempts": 2}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let dead = wait_status(&app, &user, id, "dead").await;
    assert_eq!(dead["attempt"], 2);
    assert!(
        dead["error"]
            .as_str()
            .expect("error")
            .contains("injected failure")
    );
    let dlq: Value = app
        .get("/api/v1/admin/jobs/dead", Some(&admin.access_token))
        .await
        .json()
        .await
        .expect("json");
    assert!(
        dlq["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|j| j["id"] == id)
    );
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{id}/retry"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let retried: Value = r.json().await.expect("json");
    assert_eq!(
        retried["max_attempts"], 4,
        "fresh budget of 2 on top of 2 used"
    );
    let ok = wait_status(&app, &user, id, "succeeded").await;
    assert_eq!(ok["attempt"], 3, "attempt keeps counting");
    // Retrying a succeeded job is a conflict.
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{id}/retry"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    expect_problem(r, 409, "conflict").await;
    app.shutdown().await;
}

#[tokio::test]
async fn permanent_failure_goes_straight_to_dead_and_can_be_discarded() {
    let (app, user) = start().await;
    let admin = app.admin("jobs-admin@example.com").await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0, "permanent_fail": true}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let dead = wait_status(&app, &user, id, "dead").await;
    assert_eq!(dead["attempt"], 1);
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/admin/jobs/{id}")))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    expect_problem(
        app.get(&format!("/api/v1/jobs/{id}"), Some(&user.access_token))
            .await,
        404,
        "not_found",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_timeout_counts_as_a_failed_attempt() {
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "queue": "tiny", "max_attempts": 2,
               "payload": {"steps": 50, "step_ms": 100}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let dead = wait_status(&app, &user, id, "dead").await;
    assert_eq!(dead["attempt"], 2);
    assert!(
        dead["error"].as_str().expect("error").contains("timed out"),
        "{dead}"
    );
    let hist = attempts(&app, &user, id).await;
    assert!(
        hist["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|a| a["outcome"] == "timeout"),
        "{hist}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn cancel_a_queued_and_a_running_job() {
    let (app, user) = start().await;
    let later = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 3_600_000);
    let q = submit(
        &app,
        &user,
        json!({"kind": "demo", "run_at": later, "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    let qid = q["id"].as_str().expect("id");
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{qid}/cancel"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json")["status"], "canceled");

    let run = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 200, "step_ms": 50}}),
    )
    .await;
    let rid = run["id"].as_str().expect("id");
    wait_status(&app, &user, rid, "running").await;
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{rid}/cancel"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let j = wait_status(&app, &user, rid, "canceled").await;
    assert_eq!(j["attempt"], 1);
    // Canceling a finished job is a conflict; someone else's job is not found.
    let r = app
        .post_json(
            &format!("/api/v1/jobs/{rid}/cancel"),
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    expect_problem(r, 409, "conflict").await;
    let other = app.create_user("other@example.com").await;
    let r = app
        .get(&format!("/api/v1/jobs/{rid}"), Some(&other.access_token))
        .await;
    expect_problem(r, 404, "not_found").await;
    app.shutdown().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_or_conflicts() {
    let (app, user) = start().await;
    let body = json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}});
    let send = |b: Value| {
        app.client
            .post(app.url("/api/v1/jobs"))
            .bearer_auth(&user.access_token)
            .header("idempotency-key", "order-42")
            .json(&b)
            .send()
    };
    let first = send(body.clone()).await.expect("req");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let again = send(body.clone()).await.expect("req");
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<Value>().await.expect("json")["id"],
        first["id"]
    );
    let different = send(json!({"kind": "demo", "payload": {"steps": 2, "step_ms": 0}}))
        .await
        .expect("req");
    expect_problem(different, 409, "conflict").await;
    app.shutdown().await;
}

/// Concurrent submissions share the writer's transactions: each must still see the ones
/// committed or written before it (quota counts, Idempotency-Keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_neither_overshoot_quotas_nor_duplicate_keyed_jobs() {
    let app = TestApp::start_with(|c| free_plan(c, 10, 1000, 1024), AppOptions::default()).await;
    let long = json!({"kind": "demo", "payload": {"steps": 1000, "step_ms": 50}});
    let statuses = |user: TestUser, key: Option<&'static str>, bodies: Vec<Value>| {
        let app = &app;
        async move {
            let sends = bodies.into_iter().map(|b| {
                let mut req = app
                    .client
                    .post(app.url("/api/v1/jobs"))
                    .bearer_auth(&user.access_token)
                    .json(&b);
                if let Some(k) = key {
                    req = req.header("idempotency-key", k);
                }
                async move {
                    let r = req.send().await.expect("submit");
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.expect("json");
                    (status, v)
                }
            });
            futures_util::future::join_all(sends).await
        }
    };
    // 30 at once against a period quota of 10: exactly 10 accepted.
    let quota = app.create_user("burst@example.com").await;
    let res = statuses(quota, None, vec![long.clone(); 30]).await;
    let accepted = res.iter().filter(|(s, _)| *s == 202).count();
    let refused = res
        .iter()
        .filter(|(s, v)| *s == 402 && v["code"] == "plan_limit")
        .count();
    assert_eq!((accepted, refused), (10, 20), "{res:?}");
    // 20 at once with one key and two bodies: one job; its body's twins get it, the
    // other body gets 409.
    let keyed = app.create_user("keyed@example.com").await;
    let other = json!({"kind": "demo", "payload": {"steps": 2, "step_ms": 50}});
    let bodies = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                long.clone()
            } else {
                other.clone()
            }
        })
        .collect();
    let res = statuses(keyed, Some("k-1"), bodies).await;
    let ids: std::collections::HashSet<String> = res
        .iter()
        .filter(|(s, _)| *s == 202 || *s == 200)
        .map(|(_, v)| v["id"].as_str().expect("id").to_string())
        .collect();
    let created = res.iter().filter(|(s, _)| *s == 202).count();
    let same = res.iter().filter(|(s, _)| *s == 200).count();
    let conflicts = res.iter().filter(|(s, _)| *s == 409).count();
    assert_eq!(ids.len(), 1, "{res:?}");
    assert_eq!((created, same, conflicts), (1, 9, 10), "{res:?}");
    let jobs = app
        .db_i64("SELECT COUNT(*) FROM jobs", vec![])
        .await
        .expect("count");
    assert_eq!(jobs, 11);
    app.shutdown().await;
}

#[tokio::test]
async fn bad_submissions_are_clear_problems() {
    let (app, user) = start().await;
    for (body, code, status) in [
        (json!({"kind": "nope", "payload": {}}), "invalid_input", 422),
        (
            json!({"kind": "demo", "payload": {"steps": 0, "step_ms": 1}}),
            "invalid_input",
            422,
        ),
        (
            json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 1, "x": 1}}),
            "invalid_input",
            422,
        ),
        (
            json!({"kind": "demo", "queue": "nope", "payload": {"steps": 1, "step_ms": 1}}),
            "invalid_input",
            422,
        ),
        (
            json!({"kind": "demo", "run_at": "tomorrow", "payload": {"steps": 1, "step_ms": 1}}),
            "invalid_input",
            422,
        ),
        (
            json!({"kind": "demo", "max_attempts": 0, "payload": {"steps": 1, "step_ms": 1}}),
            "invalid_input",
            422,
        ),
        (json!({"kind": "demo", "bogus": 1}), "invalid_input", 422),
    ] {
        let r = app
            .post_json("/api/v1/jobs", Some(&user.access_token), &body)
            .await;
        expect_problem(r, status, code).await;
    }
    let r = app
        .post_json("/api/v1/jobs", None, &json!({"kind": "demo"}))
        .await;
    expect_problem(r, 401, "unauthorized").await;
    let r = app
        .get("/api/v1/jobs?limit=1000", Some(&user.access_token))
        .await;
    expect_problem(r, 400, "invalid_input").await;
    app.shutdown().await;
}

#[tokio::test]
async fn plan_quotas_answer_402() {
    let app = TestApp::start_with(|c| free_plan(c, 3, 2, 1024), AppOptions::default()).await;
    let user = app.create_user("quota@example.com").await;
    async fn used(app: &TestApp, user: &TestUser) -> Value {
        let me: Value = app
            .get("/api/v1/me", Some(&user.access_token))
            .await
            .json()
            .await
            .expect("json");
        me["plan"]["usage"]["jobs_this_period"].clone()
    }
    // `/me` is cached between requests; every submission must still show at once.
    assert_eq!(used(&app, &user).await, 0);
    let long = json!({"kind": "demo", "payload": {"steps": 1000, "step_ms": 50}});
    let a = submit(&app, &user, long.clone()).await;
    assert_eq!(used(&app, &user).await, 1);
    submit(&app, &user, long.clone()).await;
    assert_eq!(used(&app, &user).await, 2);
    let r = app
        .post_json("/api/v1/jobs", Some(&user.access_token), &long)
        .await;
    let body = expect_problem(r, 402, "plan_limit").await;
    assert_eq!(body["max"], 2);
    // Freeing a slot allows one more, then the period quota (3) stops the next.
    let aid = a["id"].as_str().expect("id");
    app.post_json(
        &format!("/api/v1/jobs/{aid}/cancel"),
        Some(&user.access_token),
        &json!({}),
    )
    .await;
    wait_status(&app, &user, aid, "canceled").await;
    submit(&app, &user, long.clone()).await;
    let b = app
        .post_json("/api/v1/jobs", Some(&user.access_token), &long)
        .await;
    let body = expect_problem(b, 402, "plan_limit").await;
    assert_eq!(body["limit"], "concurrent jobs");
    // Refused submissions are not usage.
    assert_eq!(used(&app, &user).await, 3);
    app.shutdown().await;
}

/// A kind that records how often each job ran, to prove exactly-once execution, and how
/// many attempts of each kind were in flight (now, most ever).
struct Counting {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    in_flight: Arc<Mutex<HashMap<String, (u32, u32)>>>,
}

impl Handler for Counting {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        let (runs, in_flight) = (self.runs.clone(), self.in_flight.clone());
        Box::pin(async move {
            *runs
                .lock()
                .expect("lock")
                .entry(ctx.job_id.clone())
                .or_default() += 1;
            {
                let mut f = in_flight.lock().expect("lock");
                let (now, most) = f.entry(ctx.kind.clone()).or_default();
                *now += 1;
                *most = (*most).max(*now);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            ctx.progress.report(100, "counted");
            if let Some((now, _)) = in_flight.lock().expect("lock").get_mut(&ctx.kind) {
                *now -= 1;
            }
            Ok(json!({"ok": true}))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_jobs_on_two_queues_each_run_exactly_once() {
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let in_flight = Arc::new(Mutex::new(HashMap::new()));
    let kind = |name: &str, queue: &str| KindSpec {
        name: name.into(),
        queue: queue.into(),
        handler: Arc::new(Counting {
            runs: runs.clone(),
            in_flight: in_flight.clone(),
        }),
        public: true,
        billable: true,
        timeout: None,
        max_attempts: None,
    };
    let app = TestApp::start_with(
        generous_free_plan,
        AppOptions {
            extra_kinds: vec![kind("count_fast", "fast"), kind("count_slow", "slow")],
            ..Default::default()
        },
    )
    .await;
    let user = app.create_user("many@example.com").await;
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for i in 0..1000 {
        let kind = if i % 2 == 0 {
            "count_fast"
        } else {
            "count_slow"
        };
        let req = app
            .client
            .post(app.url("/api/v1/jobs"))
            .bearer_auth(&user.access_token)
            .json(&json!({"kind": kind, "payload": {"i": i}}))
            .send();
        pending.push(req);
        if pending.len() == 50 {
            for r in futures_util::future::join_all(pending.drain(..)).await {
                let r = r.expect("submit");
                assert_eq!(r.status(), 202);
                ids.push(
                    r.json::<Value>().await.expect("json")["id"]
                        .as_str()
                        .expect("id")
                        .to_string(),
                );
            }
        }
    }
    eventually(Duration::from_secs(60), "1000 jobs to succeed", || async {
        let r: Value = app
            .get(
                "/api/v1/jobs?status=succeeded&limit=1",
                Some(&user.access_token),
            )
            .await
            .json()
            .await
            .ok()?;
        let _ = r;
        let n = app
            .db_i64(
                "SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'",
                vec![],
            )
            .await
            .ok()?;
        (n == 1000).then_some(())
    })
    .await;
    {
        let runs = runs.lock().expect("lock");
        assert_eq!(runs.len(), 1000);
        assert!(
            ids.iter().all(|id| runs.get(id) == Some(&1)),
            "every job ran exactly once"
        );
    }
    // Each queue ran several at once, never more than its concurrency (fast 8, slow 2).
    let in_flight = in_flight.lock().expect("lock").clone();
    let most = |kind: &str| in_flight.get(kind).map_or(0, |(_, m)| *m);
    let queues = &app.state().config.jobs.queues;
    assert!(
        (2..=queues["fast"].concurrency).contains(&most("count_fast")),
        "fast queue in flight: {in_flight:?}"
    );
    assert!(
        (2..=queues["slow"].concurrency).contains(&most("count_slow")),
        "slow queue in flight: {in_flight:?}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn sse_resume_with_last_event_id_misses_nothing() {
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 20, "step_ms": 40}}),
    )
    .await;
    let id = j["id"].as_str().expect("id").to_string();
    let open = |last: Option<String>| {
        let mut req = app
            .client
            .get(app.url(&format!("/api/v1/jobs/{id}/events")))
            .bearer_auth(&user.access_token);
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        req.send()
    };
    // Read until a few progress events arrived, then drop the connection.
    let mut sse = SseReader::new(open(None).await.expect("sse"));
    let mut seen: Vec<u64> = Vec::new();
    let mut last_id = None;
    while seen.len() < 3 {
        let ev = sse.next(T).await.expect("event");
        if ev.event == "progress" && ev.data["pct"].as_u64().unwrap_or(0) > 0 {
            seen.push(ev.data["pct"].as_u64().expect("pct"));
        }
        last_id = ev.id.clone();
    }
    drop(sse);
    // Miss some events on purpose.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sse = SseReader::new(open(last_id.clone()).await.expect("sse"));
    let mut prev: u64 = last_id
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("numeric id");
    let mut done = false;
    while let Some(ev) = sse.next(T).await {
        let seq: u64 = ev
            .id
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("numeric id");
        assert_eq!(seq, prev + 1, "no gap after Last-Event-ID: {ev:?}");
        prev = seq;
        if ev.event == "progress" {
            seen.push(ev.data["pct"].as_u64().expect("pct"));
        }
        done |= ev.event == "done";
    }
    assert!(done, "the terminal event arrives after resume");
    for pct in (5..=100).step_by(5) {
        assert!(seen.contains(&pct), "progress {pct} missing from {seen:?}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_finished_job_streams_its_final_state_at_once_and_tickets_are_single_use() {
    let (app, user) = start().await;
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    wait_status(&app, &user, id, "succeeded").await;
    let t: Value = app
        .post_json(
            "/api/v1/events/ticket",
            Some(&user.access_token),
            &json!({}),
        )
        .await
        .json()
        .await
        .expect("ticket");
    let ticket = t["ticket"].as_str().expect("ticket");
    let url = app.url(&format!("/api/v1/jobs/{id}/events?ticket={ticket}"));
    let mut sse = SseReader::new(app.client.get(&url).send().await.expect("sse"));
    let mut names = Vec::new();
    while let Some(ev) = sse.next(T).await {
        names.push(ev.event);
    }
    assert_eq!(names, vec!["state", "progress", "done"]);
    let again = app.client.get(&url).send().await.expect("sse");
    expect_problem(again, 401, "unauthorized").await;
    let none = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{id}/events")))
        .send()
        .await
        .expect("sse");
    expect_problem(none, 401, "unauthorized").await;
    app.shutdown().await;
}

#[tokio::test]
async fn the_user_stream_carries_every_job() {
    let (app, user) = start().await;
    let resp = app
        .client
        .get(app.url("/api/v1/events"))
        .bearer_auth(&user.access_token)
        .send()
        .await
        .expect("sse");
    let mut sse = SseReader::new(resp);
    let a = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 2, "step_ms": 10}}),
    )
    .await;
    let b = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 2, "step_ms": 10}}),
    )
    .await;
    let mut done = std::collections::HashSet::new();
    while done.len() < 2 {
        let ev = sse.next(T).await.expect("event");
        if ev.event == "done" {
            done.insert(ev.data["id"].as_str().expect("id").to_string());
        }
    }
    assert!(done.contains(a["id"].as_str().expect("id")));
    assert!(done.contains(b["id"].as_str().expect("id")));
    app.shutdown().await;
}

#[tokio::test]
async fn sse_streams_end_cleanly_on_shutdown() {
    let (app, user) = start().await;
    // A parked job keeps its per-job stream open (no terminal event until shutdown).
    let later = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 3_600_000);
    let j = submit(
        &app,
        &user,
        json!({"kind": "demo", "run_at": later, "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    let id = j["id"].as_str().expect("id");
    let open = |path: String| {
        app.client
            .get(app.url(&path))
            .bearer_auth(&user.access_token)
            .send()
    };
    let mut job = SseReader::new(
        open(format!("/api/v1/jobs/{id}/events"))
            .await
            .expect("sse"),
    );
    let mut all = SseReader::new(open("/api/v1/events".into()).await.expect("sse"));
    // Both start with the job's snapshot, the same event ids in both forms.
    let mut job_events = Vec::new();
    for _ in 0..2 {
        job_events.push(job.next(T).await.expect("snapshot event"));
    }
    let names: Vec<&str> = job_events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["state", "progress"]);
    assert_eq!(job_events[0].data["status"], "queued");
    let user_first = all.next(T).await.expect("snapshot event");
    assert_eq!(user_first.event, "state");
    assert_eq!(
        user_first.id.as_deref(),
        Some(format!("{id}:{}", job_events[0].id.as_deref().expect("id")).as_str())
    );
    let _ = all.next(T).await.expect("snapshot progress");
    // Shutting down ends both streams: the body finishes, it is not cut off.
    let stopping = tokio::spawn(app.shutdown());
    assert!(
        job.next(T).await.is_none(),
        "the job stream ends on shutdown"
    );
    assert!(
        all.next(T).await.is_none(),
        "the user stream ends on shutdown"
    );
    stopping.await.expect("shutdown task");
}

/// Mints a session for a user inserted straight into a stopped server's database.
fn seed_user(data_dir: &std::path::Path) -> String {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let storage = warpbase::storage::Storage::open(data_dir).expect("open");
        let secret = std::fs::read_to_string(data_dir.join("secrets/jwt.key")).expect("secret");
        let now = warpbase::clock::now_millis();
        let (uid, sid) = storage
            .write(move |c| {
                let uid = warpbase::ids::new_id();
                let sid = warpbase::ids::new_id();
                warpbase::storage::users::insert_user(
                    c,
                    &warpbase::storage::users::NewUser {
                        id: &uid,
                        email: "crash@example.com",
                        email_verified: true,
                        name: None,
                        password_hash: None,
                        role: None,
                        now,
                    },
                )?;
                warpbase::storage::users::insert_session(
                    c,
                    &warpbase::storage::users::NewSession {
                        id: &sid,
                        user_id: &uid,
                        refresh_hash: &[1, 2, 3],
                        refresh_expires_at: now + 3_600_000,
                        user_agent: None,
                        ip: None,
                        now,
                    },
                )?;
                Ok::<_, warpbase::storage::StorageError>((uid, sid))
            })
            .await
            .expect("seed");
        storage.close().await.expect("close");
        warpbase::auth::tokens::JwtKeys::new(secret.trim().as_bytes()).issue(
            &warpbase::auth::tokens::Claims {
                sub: uid,
                sid,
                ver: 0,
                iat: now / 1000,
                exp: now / 1000 + 3600,
            },
        )
    })
}

/// A child server on a fresh data dir with `config` as its `warpbase.toml`, and a token
/// of a user seeded into it (a first start creates the secrets the token is signed with).
fn child_with_user(config: &str) -> (tempfile::TempDir, ChildServer, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    // The child runs in its data dir and reads ./warpbase.toml from there.
    std::fs::write(dir.path().join("warpbase.toml"), config).expect("config");
    let first = ChildServer::start(dir.path(), &[], &[]);
    assert!(first.terminate(Duration::from_secs(15)).success());
    let token = seed_user(dir.path());
    let server = ChildServer::start(dir.path(), &[], &[]);
    (dir, server, token)
}

/// `GET /api/v1/jobs/{id}` on a child server.
async fn child_job(client: &reqwest::Client, server: &ChildServer, token: &str, id: &str) -> Value {
    client
        .get(server.url(&format!("/api/v1/jobs/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

#[test]
fn kill_9_while_jobs_run_loses_nothing_and_runs_each_to_success_once() {
    let (dir, server, token) = child_with_user(
        "[[billing.plans]]\nid = \"free\"\nname = \"Free\"\n\
         limits = { jobs_per_period = 1000, concurrent_jobs = 100, max_upload_bytes = 1024 }\n",
    );
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..12 {
            let r = client
                .post(server.url("/api/v1/jobs"))
                .bearer_auth(&token)
                .json(&json!({"kind": "demo", "payload": {"steps": 10, "step_ms": 100}}))
                .send()
                .await
                .expect("submit");
            assert_eq!(r.status(), 202);
            ids.push(
                r.json::<Value>().await.expect("json")["id"]
                    .as_str()
                    .expect("id")
                    .to_string(),
            );
        }
        // Wait until some are mid-flight.
        let deadline = std::time::Instant::now() + T;
        loop {
            let r: Value = client
                .get(server.url("/api/v1/jobs?status=running"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("list")
                .json()
                .await
                .expect("json");
            if !r["items"].as_array().expect("items").is_empty() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no job started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    });
    server.kill9();
    let server = ChildServer::start(dir.path(), &[], &[]);
    rt.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut all = true;
            for id in &ids {
                let j = child_job(&client, &server, &token, id).await;
                assert_ne!(j["status"], "dead", "{j}");
                all &= j["status"] == "succeeded";
            }
            if all {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "jobs did not all finish after restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for id in &ids {
            let h: Value = client
                .get(server.url(&format!("/api/v1/jobs/{id}/attempts")))
                .bearer_auth(&token)
                .send()
                .await
                .expect("attempts")
                .json()
                .await
                .expect("json");
            let ok = h["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter(|a| a["outcome"] == "succeeded")
                .count();
            assert_eq!(ok, 1, "job {id} succeeded exactly once: {h}");
        }
    });
    server.kill9();
}

#[test]
fn sigterm_gives_unfinished_jobs_back_without_spending_an_attempt() {
    let (dir, server, token) = child_with_user(
        "shutdown_grace = \"1s\"\n[[billing.plans]]\nid = \"free\"\nname = \"Free\"\n\
         limits = { jobs_per_period = 1000, concurrent_jobs = 100, max_upload_bytes = 1024 }\n",
    );
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let id = rt.block_on(async {
        // Far longer than the 1 s grace.
        let r = client
            .post(server.url("/api/v1/jobs"))
            .bearer_auth(&token)
            .json(&json!({"kind": "demo", "payload": {"steps": 100, "step_ms": 1000}}))
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 202);
        let id = r.json::<Value>().await.expect("json")["id"]
            .as_str()
            .expect("id")
            .to_string();
        eventually(T, "the job runs", || async {
            let j = child_job(&client, &server, &token, &id).await;
            (j["status"] == "running").then_some(())
        })
        .await;
        id
    });
    let status = server.terminate(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    let db = rusqlite::Connection::open(dir.path().join("warpbase.db")).expect("db");
    let (status, attempt, lease): (String, i64, Option<i64>) = db
        .query_row(
            "SELECT status, attempt, lease_until FROM jobs WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("job row");
    assert_eq!(status, "queued", "given back to the queue");
    assert_eq!(attempt, 0, "the interrupted attempt is not counted");
    assert_eq!(lease, None);
}

#[tokio::test]
async fn one_failing_outcome_write_does_not_fail_the_outcomes_recorded_with_it() {
    let (app, user) = start().await;
    // Recording the success of the `steps: 7` job fails inside SQLite; the others' do not.
    app.state()
        .storage
        .write(|c| {
            c.execute_batch(
                "CREATE TRIGGER fail_one_finish BEFORE UPDATE OF status ON jobs
                 WHEN NEW.status = 'succeeded' AND json_extract(OLD.payload, '$.steps') = 7
                 BEGIN SELECT RAISE(ABORT, 'injected finish failure'); END;",
            )?;
            Ok::<_, warpbase::storage::StorageError>(())
        })
        .await
        .expect("trigger");
    // Parked until the same moment, so one claim takes them all and their outcomes are
    // ready together (the fast queue runs 8 at once).
    let at = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 700);
    let mut good = Vec::new();
    let mut bad = String::new();
    for steps in [1, 2, 3, 7, 4, 5, 6, 1] {
        let j = submit(
            &app,
            &user,
            json!({"kind": "demo", "payload": {"steps": steps, "step_ms": 0}, "run_at": at}),
        )
        .await;
        let id = j["id"].as_str().expect("id").to_string();
        if steps == 7 {
            bad = id;
        } else {
            good.push(id);
        }
    }
    for id in &good {
        wait_status(&app, &user, id, "succeeded").await;
        let h = attempts(&app, &user, id).await;
        assert_eq!(h["items"].as_array().map(Vec::len), Some(1), "{h}");
        assert_eq!(h["items"][0]["outcome"], "succeeded", "{h}");
    }
    // Its outcome was not recorded: still running (the lease and the rescuer take it from
    // here), with no attempt in its history.
    let j = job(&app, &user, &bad).await;
    assert_eq!(j["status"], "running", "{j}");
    let h = attempts(&app, &user, &bad).await;
    assert_eq!(h["items"].as_array().map(Vec::len), Some(0), "{h}");
    app.shutdown().await;
}

#[tokio::test]
async fn the_submit_answer_is_the_stored_job() {
    let (app, user) = start().await;
    let at = warpbase::clock::rfc3339(warpbase::clock::now_millis() + 3_600_000);
    let posted = submit(
        &app,
        &user,
        json!({"kind": "demo", "payload": {"steps": 2, "step_ms": 5}, "run_at": at,
               "priority": 3, "max_attempts": 2}),
    )
    .await;
    let stored = job(&app, &user, posted["id"].as_str().expect("id")).await;
    assert_eq!(posted, stored);
    app.shutdown().await;
}

#[test]
fn outcomes_announced_before_a_kill_9_are_all_still_there() {
    let (dir, server, token) = child_with_user(
        "[[billing.plans]]\nid = \"free\"\nname = \"Free\"\n\
         limits = { jobs_per_period = 1000, concurrent_jobs = 1000, max_upload_bytes = 1024 }\n",
    );
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let announced: Vec<String> = rt.block_on(async {
        let resp = client
            .get(server.url("/api/v1/events"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("sse");
        let mut sse = SseReader::new(resp);
        for _ in 0..60 {
            let r = client
                .post(server.url("/api/v1/jobs"))
                .bearer_auth(&token)
                .json(&json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}))
                .send()
                .await
                .expect("submit");
            assert_eq!(r.status(), 202);
        }
        // The `done` event goes out only after the outcome is durable: kill as soon as
        // enough have been announced, while later ones are still being recorded.
        let mut done = Vec::new();
        while done.len() < 40 {
            let ev = sse.next(T).await.expect("event");
            if ev.event == "done" {
                assert_eq!(ev.data["status"], "succeeded", "{:?}", ev.data);
                done.push(ev.data["id"].as_str().expect("id").to_string());
            }
        }
        done
    });
    server.kill9();
    let server = ChildServer::start(dir.path(), &[], &[]);
    rt.block_on(async {
        for id in &announced {
            let j = child_job(&client, &server, &token, id).await;
            assert_eq!(j["status"], "succeeded", "announced, then lost: {j}");
            assert_eq!(j["progress"]["pct"], 100, "{j}");
            assert_eq!(j["progress"]["message"], "step 1/1", "{j}");
        }
    });
    server.kill9();
}

fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(enc);
    for (name, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, body.as_bytes())
            .expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gz")
}

#[tokio::test]
async fn upload_then_analyze_counts_languages() {
    let (app, user) = start().await;
    let archive = tar_gz(&[
        (
            "src/main.rs",
            "// entry\nfn main() {\n    println!(\"hi\");\n}\n",
        ),
        ("tools/x.py", "# tool\nimport os\n\nprint(os.name)\n"),
    ]);
    let r = app
        .client
        .post(app.url("/api/v1/uploads"))
        .bearer_auth(&user.access_token)
        .header("content-type", "application/gzip")
        .body(archive.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 201);
    let up: Value = r.json().await.expect("json");
    assert_eq!(up["size"], archive.len());
    assert_eq!(up["sha256"].as_str().expect("sha").len(), 64);
    let j = submit(
        &app,
        &user,
        json!({"kind": "analyze", "payload": {"upload_id": up["id"]}}),
    )
    .await;
    let done = wait_status(&app, &user, j["id"].as_str().expect("id"), "succeeded").await;
    let langs = done["result"]["languages"].as_array().expect("languages");
    let rust = langs
        .iter()
        .find(|l| l["name"] == "Rust")
        .expect("Rust counted");
    assert_eq!(rust["files"], 1);
    assert_eq!(rust["code"], 3);
    assert_eq!(rust["comments"], 1);
    let py = langs
        .iter()
        .find(|l| l["name"] == "Python")
        .expect("Python counted");
    assert_eq!(py["code"], 2);

    // Someone else cannot analyze this upload; an over-limit upload is refused.
    let other = app.create_user("other@example.com").await;
    let r = app
        .post_json(
            "/api/v1/jobs",
            Some(&other.access_token),
            &json!({"kind": "analyze", "payload": {"upload_id": up["id"]}}),
        )
        .await;
    expect_problem(r, 422, "invalid_input").await;
    let r = app
        .client
        .post(app.url("/api/v1/uploads"))
        .bearer_auth(&user.access_token)
        .body(vec![0u8; (1 << 20) + 1])
        .send()
        .await
        .expect("upload");
    expect_problem(r, 413, "payload_too_large").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_command_kind_runs_a_program_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("job.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nread payload\necho \"PROGRESS 50 halfway\"\ncase \"$payload\" in\n  *fail*) echo 'bad input' >&2; exit 65;;\nesac\necho \"{\\\"echo\\\": $payload, \\\"attempt\\\": $WARPBASE_JOB_ATTEMPT}\"\n",
    )
    .expect("script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let script_path = script.to_string_lossy().to_string();
    let app = TestApp::start_with(
        move |c| {
            generous_free_plan(c);
            c.jobs.kinds.insert(
                "echo".into(),
                warpbase::config::KindConfig {
                    queue: Some("fast".into()),
                    command: vec![script_path],
                    timeout: Some(Duration::from_secs(10)),
                    max_attempts: None,
                },
            );
        },
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("cmd@example.com").await;
    let j = submit(&app, &user, json!({"kind": "echo", "payload": {"n": 7}})).await;
    let done = wait_status(&app, &user, j["id"].as_str().expect("id"), "succeeded").await;
    assert_eq!(done["result"], json!({"echo": {"n": 7}, "attempt": 1}));
    let j = submit(
        &app,
        &user,
        json!({"kind": "echo", "payload": {"fail": true}}),
    )
    .await;
    let dead = wait_status(&app, &user, j["id"].as_str().expect("id"), "dead").await;
    assert_eq!(dead["attempt"], 1, "exit 65 is permanent");
    assert!(
        dead["error"].as_str().expect("error").contains("bad input"),
        "{dead}"
    );
    app.shutdown().await;
}
