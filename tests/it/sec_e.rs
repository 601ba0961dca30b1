//! SSE streams and tickets end with the credential that opened them (issue #16, item 7):
//! tickets are re-checked when redeemed, open streams close when their session is revoked,
//! their token version changes or their user is disabled (also by another process writing
//! the database), they end at the access token's expiry with a `reconnect` event, and a
//! reconnect with the last event id resumes without losing or repeating events.

use std::time::{Duration, Instant};

use crate::common::{SseEvent, SseReader, TestApp, TestUser, eventually, expect_problem};
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::clock::ManualClock;
use warpbase::config::{PlanConfig, PlanLimits};

const T: Duration = Duration::from_secs(20);
/// Streams must close within about a second; this bound only keeps a slow CI machine
/// from failing the test.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);
const PW: &str = "correct horse battery";

fn setup(c: &mut warpbase::Config) {
    c.auth.rate_limit = 1000;
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
            max_storage_bytes: 1 << 30,
        },
    });
}

async fn start() -> TestApp {
    TestApp::start_with(setup, AppOptions::default()).await
}

async fn ticket(app: &TestApp, token: &str) -> String {
    let r = app
        .post_json("/api/v1/events/ticket", Some(token), &json!({}))
        .await;
    assert_eq!(r.status(), 200, "ticket");
    let v: Value = r.json().await.expect("ticket json");
    v["ticket"].as_str().expect("ticket").to_string()
}

/// Opens `path` with a ticket (as the UI does) and optional `?last_event_id=`.
async fn open_with_ticket(
    app: &TestApp,
    path: &str,
    ticket: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut q = vec![("ticket", ticket.to_string())];
    if let Some(l) = last_event_id {
        q.push(("last_event_id", l.to_string()));
    }
    app.client
        .get(app.url(path))
        .query(&q)
        .send()
        .await
        .expect("sse request")
}

async fn open_events(app: &TestApp, token: &str) -> SseReader {
    let t = ticket(app, token).await;
    SseReader::new(open_with_ticket(app, "/api/v1/events", &t, None).await)
}

/// Waits until every stream opened so far is registered (the route answered).
async fn wait_streams(app: &TestApp, n: usize) {
    eventually(T, "streams registered", || async {
        (app.state().events.streams().len() >= n).then_some(())
    })
    .await;
}

/// Reads until the server closes the stream; panics if it stays open past `within`.
/// Returns the events that came before the end.
async fn expect_closed(sse: &mut SseReader, within: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the stream is still open after {within:?}");
        match sse.next(left).await {
            Some(ev) => got.push(ev),
            None => return got,
        }
    }
}

async fn register(app: &TestApp, email: &str) -> Value {
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": email, "password": PW}),
        )
        .await;
    assert_eq!(r.status(), 201, "register");
    r.json().await.expect("json")
}

async fn submit(app: &TestApp, token: &str, body: Value) -> String {
    let r = app.post_json("/api/v1/jobs", Some(token), &body).await;
    assert_eq!(r.status(), 202, "submit");
    let j: Value = r.json().await.expect("job");
    j["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn open_streams_close_after_logout_all() {
    let app = start().await;
    let user = app.create_user("e1@example.com").await;
    let job = submit(
        &app,
        &user.access_token,
        json!({"kind": "demo", "payload": {"steps": 1000, "step_ms": 50}}),
    )
    .await;
    let mut all = open_events(&app, &user.access_token).await;
    // A per-job stream opened with the bearer header is bound just the same.
    let resp = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{job}/events")))
        .bearer_auth(&user.access_token)
        .send()
        .await
        .expect("sse");
    let mut one = SseReader::new(resp);
    // Both streams deliver before the revocation.
    assert!(all.next(T).await.is_some());
    assert!(one.next(T).await.is_some());
    let r = app
        .post_json(
            "/api/v1/auth/logout-all",
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let before = expect_closed(&mut all, CLOSE_WITHIN).await;
    assert!(
        before.iter().all(|e| e.event != "reconnect"),
        "a revoked stream is not told to reconnect"
    );
    expect_closed(&mut one, CLOSE_WITHIN).await;
    eventually(T, "streams unregistered", || async {
        app.state().events.streams().is_empty().then_some(())
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn an_open_stream_closes_when_its_session_logs_out_and_others_stay() {
    let app = start().await;
    let user = app.create_user("e2@example.com").await;
    // A second session of the same user.
    let version = app
        .db_i64(
            "SELECT token_version FROM users WHERE id = ?1",
            vec![user.id.clone()],
        )
        .await
        .expect("version");
    let login = app
        .state()
        .storage
        .write({
            let auth = app.state().auth.clone();
            let uid = user.id.clone();
            move |c| auth.create_session_in(c, &uid, version, Some("other"), None)
        })
        .await
        .expect("second session");
    let mut mine = open_events(&app, &user.access_token).await;
    let mut other = open_events(&app, &login.access_token).await;
    wait_streams(&app, 2).await;
    let r = app
        .post_json("/api/v1/auth/logout", Some(&user.access_token), &json!({}))
        .await;
    assert_eq!(r.status(), 204);
    expect_closed(&mut mine, CLOSE_WITHIN).await;
    // The other session's stream still delivers.
    submit(
        &app,
        &login.access_token,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    let ev = other
        .next(T)
        .await
        .expect("the other session's stream is open");
    assert!(ev.id.is_some(), "{ev:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_open_stream_closes_after_a_password_change() {
    let app = start().await;
    let reg = register(&app, "e3@example.com").await;
    let token = reg["access_token"].as_str().expect("token").to_string();
    let mut sse = open_events(&app, &token).await;
    wait_streams(&app, 1).await;
    let r = app
        .post_json(
            "/api/v1/auth/password",
            Some(&token),
            &json!({"current_password": PW, "new_password": "another long password"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    expect_closed(&mut sse, CLOSE_WITHIN).await;
    app.shutdown().await;
}

#[tokio::test]
async fn an_open_stream_closes_when_another_process_disables_the_user() {
    let app = start().await;
    let user = app.create_user("e4@example.com").await;
    let mut sse = open_events(&app, &user.access_token).await;
    wait_streams(&app, 1).await;
    // What `warpbase user disable` does from another process: a direct write to the
    // database, with no cache invalidation in this one.
    let uid = user.id.clone();
    app.state()
        .storage
        .write(move |c| {
            c.execute("UPDATE users SET disabled = 1 WHERE id = ?1", [&uid])?;
            Ok::<_, warpbase::storage::StorageError>(())
        })
        .await
        .expect("disable");
    expect_closed(&mut sse, CLOSE_WITHIN).await;
    // And the request path sees it now too, not only when its cache entry expires.
    let r = eventually(T, "the token to be refused", || async {
        let r = app.get("/api/v1/me", Some(&user.access_token)).await;
        (r.status() == 401).then_some(r)
    })
    .await;
    expect_problem(r, 401, "session_revoked").await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_ticket_issued_before_logout_all_is_refused() {
    let app = start().await;
    let user = app.create_user("e5@example.com").await;
    let before = ticket(&app, &user.access_token).await;
    let r = app
        .post_json(
            "/api/v1/auth/logout-all",
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let r = open_with_ticket(&app, "/api/v1/events", &before, None).await;
    expect_problem(r, 401, "session_revoked").await;
    assert!(app.state().events.streams().is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn a_stream_ends_at_the_access_token_expiry_with_a_reconnect_event() {
    let clock = ManualClock::new();
    let app = TestApp::start_with(
        setup,
        AppOptions {
            clock: Some(clock.clone()),
            ..AppOptions::default()
        },
    )
    .await;
    let user: TestUser = app.create_user("e6@example.com").await;
    let mut sse = open_events(&app, &user.access_token).await;
    wait_streams(&app, 1).await;
    let unused = ticket(&app, &user.access_token).await;
    let ttl = app.state().config.auth.access_ttl;
    clock.advance(ttl + Duration::from_secs(1));
    let got = expect_closed(&mut sse, CLOSE_WITHIN).await;
    let last = got.last().expect("a last event");
    assert_eq!(last.event, "reconnect", "{got:?}");
    assert_eq!(last.data["reason"], "token_expired");
    assert_eq!(last.id, None, "the client's last event id stays");
    // A ticket of the expired token opens nothing.
    let r = open_with_ticket(&app, "/api/v1/events", &unused, None).await;
    expect_problem(r, 401, "token_expired").await;
    // A fresh token (what the client gets by refreshing) opens a new stream.
    let fresh = app.reissue(&user);
    let _again = open_events(&app, &fresh).await;
    app.shutdown().await;
}

/// `(job, seq)` of a user-stream event id `{job}:{seq}`.
fn split_id(ev: &SseEvent) -> (String, u64) {
    let id = ev.id.as_deref().expect("event id");
    let (job, seq) = id.rsplit_once(':').expect("job:seq");
    (job.to_string(), seq.parse().expect("seq"))
}

#[tokio::test]
async fn a_user_stream_resumes_after_last_event_id_without_gaps_or_duplicates() {
    let app = start().await;
    let user = app.create_user("e7@example.com").await;
    let mut sse = open_events(&app, &user.access_token).await;
    wait_streams(&app, 1).await;
    let job = submit(
        &app,
        &user.access_token,
        json!({"kind": "demo", "payload": {"steps": 20, "step_ms": 30}}),
    )
    .await;
    // Read a few live events of the job, then drop the connection.
    let mut last = None;
    let mut prev = 0;
    let mut n = 0;
    while n < 3 {
        let ev = sse.next(T).await.expect("event");
        let (j, seq) = split_id(&ev);
        assert_eq!(j, job);
        assert_eq!(seq, prev + 1, "consecutive: {ev:?}");
        prev = seq;
        last = ev.id.clone();
        n += 1;
    }
    drop(sse);
    // Miss the rest of the job on purpose: it finishes while nobody listens.
    eventually(T, "the job to finish", || async {
        let r = app
            .get(&format!("/api/v1/jobs/{job}"), Some(&user.access_token))
            .await;
        let j: Value = r.json().await.ok()?;
        (j["status"] == "succeeded").then_some(())
    })
    .await;
    let t = ticket(&app, &user.access_token).await;
    let mut sse =
        SseReader::new(open_with_ticket(&app, "/api/v1/events", &t, last.as_deref()).await);
    let mut done = false;
    while !done {
        let ev = sse.next(T).await.expect("a replayed event");
        assert_ne!(ev.event, "resync", "the resume is exact");
        let (j, seq) = split_id(&ev);
        assert_eq!(j, job);
        assert_eq!(
            seq,
            prev + 1,
            "no gap and no repeat after Last-Event-ID: {ev:?}"
        );
        prev = seq;
        done = ev.event == "done";
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_user_stream_that_cannot_resume_says_resync_first() {
    let app = start().await;
    let user = app.create_user("e8@example.com").await;
    let job = submit(
        &app,
        &user.access_token,
        json!({"kind": "demo", "payload": {"steps": 1000, "step_ms": 50}}),
    )
    .await;
    let t = ticket(&app, &user.access_token).await;
    let mut sse =
        SseReader::new(open_with_ticket(&app, "/api/v1/events", &t, Some("nosuchjob:7")).await);
    let first = sse.next(T).await.expect("event");
    assert_eq!(first.event, "resync", "{first:?}");
    // Then the snapshot of the unfinished job.
    let snap = sse.next(T).await.expect("snapshot");
    assert_eq!(split_id(&snap).0, job);
    app.shutdown().await;
}

#[tokio::test]
async fn a_per_job_last_event_id_from_before_a_restart_gets_the_final_state() {
    let app = start().await;
    let user = app.create_user("e9@example.com").await;
    let job = submit(
        &app,
        &user.access_token,
        json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}),
    )
    .await;
    eventually(T, "the job to finish", || async {
        let r = app
            .get(&format!("/api/v1/jobs/{job}"), Some(&user.access_token))
            .await;
        let j: Value = r.json().await.ok()?;
        (j["status"] == "succeeded").then_some(())
    })
    .await;
    // The UI now reconnects with its last id; after a server restart the sequence starts
    // again, so an id this process never published must not make it skip events.
    let t = ticket(&app, &user.access_token).await;
    let mut sse = SseReader::new(
        open_with_ticket(&app, &format!("/api/v1/jobs/{job}/events"), &t, Some("999")).await,
    );
    let got = expect_closed(&mut sse, T).await;
    let names: Vec<&str> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_admins_open_stream_closes_when_the_role_is_taken_away() {
    let app = start().await;
    let user = app.create_user("e10@example.com").await;
    let set_role = |role: &'static str| {
        let uid = user.id.clone();
        app.state().storage.write(move |c| {
            c.execute("UPDATE users SET role = ?2 WHERE id = ?1", [&uid, role])?;
            Ok::<_, warpbase::storage::StorageError>(())
        })
    };
    // Made admin before the first request, so the stream is opened as an admin.
    set_role("admin").await.expect("promote");
    let r = app
        .get("/api/v1/admin/jobs/dead", Some(&user.access_token))
        .await;
    assert_eq!(r.status(), 200, "opened as an admin");
    let mut sse = open_events(&app, &user.access_token).await;
    wait_streams(&app, 1).await;
    // Demoted by another process (no cache invalidation here).
    set_role("user").await.expect("demote");
    expect_closed(&mut sse, CLOSE_WITHIN).await;
    app.shutdown().await;
}
