//! Issue #16, track B: auth rate limits, sign-in failure backoff, reset and verification
//! mail rules, and the connection limits of the listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warpbase::{AppOptions, Config};

use crate::common::{TestApp, eventually, expect_problem};

const PW: &str = "correct horse battery";

/// Client IPs come from `X-Forwarded-For`, believed from the test's loopback peer.
fn behind_proxy(c: &mut Config) {
    c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
}

async fn post_from(app: &TestApp, ip: &str, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("x-forwarded-for", ip)
        .json(body)
        .send()
        .await
        .expect("request")
}

async fn login_from(app: &TestApp, ip: &str, email: &str, password: &str) -> reqwest::Response {
    post_from(
        app,
        ip,
        "/api/v1/auth/login",
        &json!({"email": email, "password": password}),
    )
    .await
}

async fn register_from(app: &TestApp, ip: &str, email: &str) -> Value {
    let r = post_from(
        app,
        ip,
        "/api/v1/auth/register",
        &json!({"email": email, "password": PW}),
    )
    .await;
    assert_eq!(r.status(), 201, "register {email}");
    r.json().await.expect("json")
}

/// Bodies of the mail jobs to `to`, newest first.
async fn mails_to(app: &TestApp, to: &str) -> Vec<String> {
    let rows = app
        .state()
        .storage
        .read(|c| {
            warpbase::storage::jobs::list(
                c,
                &warpbase::storage::jobs::ListFilter {
                    user_id: None,
                    status: None,
                    kind: Some("mail"),
                    before_id: None,
                    limit: 100,
                },
            )
        })
        .await
        .expect("list mails");
    rows.into_iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_str(&r.payload).ok()?;
            (v["to"] == to).then(|| v["body"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

fn link_token(body: &str) -> String {
    body.split("token=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("token in mail")
        .to_string()
}

/// Waits until `n` reset mails went to `to`; returns their tokens, newest first.
async fn reset_tokens(app: &TestApp, to: &str, n: usize) -> Vec<String> {
    eventually(Duration::from_secs(10), "reset mails", || async {
        let tokens: Vec<String> = mails_to(app, to)
            .await
            .iter()
            .filter(|b| b.contains("/#/reset?token="))
            .map(|b| link_token(b))
            .collect();
        (tokens.len() >= n).then_some(tokens)
    })
    .await
}

async fn request_reset(app: &TestApp, ip: &str, email: &str) -> reqwest::Response {
    post_from(
        app,
        ip,
        "/api/v1/auth/password-reset/request",
        &json!({"email": email}),
    )
    .await
}

async fn reset(app: &TestApp, token: &str, new_password: &str) -> reqwest::Response {
    app.post_json(
        "/api/v1/auth/password-reset",
        None,
        &json!({"token": token, "new_password": new_password}),
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Item 3: argon2 amplification

#[tokio::test]
async fn a_made_up_reset_token_is_refused_without_hashing() {
    let app = TestApp::start_with(|c| c.auth.rate_limit = 1000, AppOptions::default()).await;
    let hasher = app.state().auth.hasher().clone();
    let before = hasher.runs();
    for i in 0..20 {
        let r = reset(&app, &format!("made-up-token-{i}"), "a new long password").await;
        expect_problem(r, 400, "invalid_grant").await;
    }
    expect_problem(
        reset(&app, "", "a new long password").await,
        400,
        "invalid_grant",
    )
    .await;
    assert_eq!(
        hasher.runs(),
        before,
        "no argon2 run for tokens that do not exist"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_auth_routes_are_limited_per_ip() {
    let app = TestApp::start_with(
        |c| {
            behind_proxy(c);
            c.auth.rate_limit = 3;
        },
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("limits@example.com").await;
    let routes: [(&str, Value); 4] = [
        (
            "/api/v1/auth/password-reset",
            json!({"token": "nope", "new_password": "a new long password"}),
        ),
        ("/api/v1/auth/verify-email", json!({"token": "nope"})),
        ("/api/v1/auth/refresh", json!({"refresh_token": "nope"})),
        ("/api/v1/auth/oauth/exchange", json!({"code": "nope"})),
    ];
    for (i, (path, body)) in routes.iter().enumerate() {
        let ip = format!("198.51.100.{}", i + 1);
        for _ in 0..3 {
            let r = post_from(&app, &ip, path, body).await;
            assert_eq!(r.status(), 400, "{path} within the limit");
        }
        let r = post_from(&app, &ip, path, body).await;
        let body = expect_problem(r, 429, "rate_limited").await;
        assert!(body["detail"].is_string(), "{path}");
        // Another address is not affected.
        let r = post_from(&app, "203.0.113.99", path, &routes[i].1).await;
        assert_eq!(r.status(), 400, "{path} from another address");
    }
    // The authenticated verification request too (it sends mail).
    for n in 0..4 {
        let r = app
            .client
            .post(app.url("/api/v1/auth/verify-email/request"))
            .header("x-forwarded-for", "198.51.100.50")
            .bearer_auth(&user.access_token)
            .send()
            .await
            .expect("request");
        if n < 3 {
            assert_eq!(r.status(), 202);
        } else {
            expect_problem(r, 429, "rate_limited").await;
        }
    }
    app.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_registrations_does_not_fail_a_concurrent_login() {
    let app =
        Arc::new(TestApp::start_with(|c| c.auth.rate_limit = 100_000, AppOptions::default()).await);
    register_from(&app, "192.0.2.1", "owner@example.com").await;
    let busy = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..150)
        .map(|i| {
            let app = app.clone();
            let busy = busy.clone();
            tokio::spawn(async move {
                let r = app
                    .post_json(
                        "/api/v1/auth/register",
                        None,
                        &json!({"email": format!("flood{i}@example.com"), "password": PW}),
                    )
                    .await;
                if r.status() == 503 {
                    busy.fetch_add(1, Ordering::SeqCst);
                }
                r.status().as_u16()
            })
        })
        .collect();
    // Sign in while the hashing queue of registrations is full (they are being refused).
    eventually(
        Duration::from_secs(30),
        "the flood to fill the hash queue",
        || async { (busy.load(Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
    for _ in 0..3 {
        let r = app
            .post_json(
                "/api/v1/auth/login",
                None,
                &json!({"email": "owner@example.com", "password": PW}),
            )
            .await;
        assert_eq!(r.status(), 200, "sign-in during the flood");
    }
    for f in flood {
        let status = f.await.expect("flood task");
        assert!(status == 201 || status == 503, "flood answer {status}");
    }
    Arc::try_unwrap(app)
        .ok()
        .expect("last handle")
        .shutdown()
        .await;
}

// ---------------------------------------------------------------------------------------
// Item 4: targeted lockout

#[tokio::test]
async fn failures_from_other_networks_do_not_lock_the_owner_out() {
    // Default per-IP limit (10 per minute); a long first delay so timing cannot matter.
    let app = TestApp::start_with(
        |c| {
            behind_proxy(c);
            c.auth.lockout_delay = Duration::from_secs(60);
        },
        AppOptions::default(),
    )
    .await;
    register_from(&app, "192.0.2.1", "victim@example.com").await;
    for net in 0..12 {
        let ip = format!("198.51.{net}.7");
        for attempt in 0..7 {
            let r = login_from(&app, &ip, "victim@example.com", "wrong password!").await;
            if attempt < 5 {
                expect_problem(r, 401, "invalid_credentials").await;
            } else {
                let retry = r.headers().get("retry-after").cloned();
                expect_problem(r, 429, "rate_limited").await;
                let secs: u64 = retry
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .expect("Retry-After seconds");
                assert!((1..=60).contains(&secs), "{secs}");
            }
        }
    }
    // Another address in an attacker's /24 is throttled as well.
    expect_problem(
        login_from(&app, "198.51.3.200", "victim@example.com", PW).await,
        429,
        "rate_limited",
    )
    .await;
    // The owner, from a network of their own, signs in.
    let r = login_from(&app, "203.0.113.5", "victim@example.com", PW).await;
    assert_eq!(r.status(), 200, "the owner is not locked out");
    app.shutdown().await;
}

#[tokio::test]
async fn successful_logins_do_not_count_and_reset_the_failures() {
    let app = TestApp::start_with(
        |c| {
            behind_proxy(c);
            c.auth.lockout_delay = Duration::from_secs(60);
        },
        AppOptions::default(),
    )
    .await;
    register_from(&app, "192.0.2.1", "ada@example.com").await;
    // More successful sign-ins than the old per-email budget of 10, from one network.
    for i in 0..14 {
        let ip = format!("203.0.113.{}", i + 1);
        let r = login_from(&app, &ip, "ada@example.com", PW).await;
        assert_eq!(r.status(), 200, "sign-in {i}");
    }
    // Four failures, a success, four failures: the success started the count over.
    for round in 0..2 {
        for i in 0..4 {
            let ip = format!("203.0.113.{}", 100 + round * 10 + i);
            let r = login_from(&app, &ip, "ada@example.com", "wrong password!").await;
            expect_problem(r, 401, "invalid_credentials").await;
        }
        let r = login_from(&app, "203.0.113.150", "ada@example.com", PW).await;
        assert_eq!(r.status(), 200, "round {round}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn reset_request_stays_open_while_login_is_throttled() {
    let app = TestApp::start_with(
        |c| {
            behind_proxy(c);
            c.auth.lockout_delay = Duration::from_secs(60);
        },
        AppOptions::default(),
    )
    .await;
    register_from(&app, "192.0.2.1", "ada@example.com").await;
    for i in 1..=10 {
        let ip = format!("198.51.100.{i}");
        let _ = login_from(&app, &ip, "ada@example.com", "wrong password!").await;
    }
    expect_problem(
        login_from(&app, "198.51.100.11", "ada@example.com", PW).await,
        429,
        "rate_limited",
    )
    .await;
    let r = request_reset(&app, "198.51.100.11", "ada@example.com").await;
    assert_eq!(r.status(), 202, "recovery stays open");
    let tokens = reset_tokens(&app, "ada@example.com", 1).await;
    assert_eq!(
        reset(&app, &tokens[0], "a brand new password")
            .await
            .status(),
        204
    );
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Low items

/// Holds the single writer until the returned sender is dropped or sent to.
async fn block_writer(app: &TestApp) -> std::sync::mpsc::Sender<()> {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let storage = app.state().storage.clone();
    tokio::spawn(async move {
        let _ = storage
            .write(move |_c| {
                let _ = started_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(30));
                Ok::<_, warpbase::storage::StorageError>(())
            })
            .await;
    });
    tokio::time::timeout(Duration::from_secs(10), started_rx)
        .await
        .expect("the writer runs the blocking closure")
        .expect("started");
    release_tx
}

#[tokio::test]
async fn reset_request_answers_alike_and_waits_on_no_write() {
    let app = TestApp::start_with(|c| c.auth.rate_limit = 1000, AppOptions::default()).await;
    register_from(&app, "192.0.2.1", "ada@example.com").await;
    let release = block_writer(&app).await;
    let mut answers = Vec::new();
    for email in ["ada@example.com", "nobody@example.com"] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            request_reset(&app, "192.0.2.1", email),
        )
        .await
        .expect("answered while the writer is busy: the answer waits on no write");
        let status = r.status();
        let ct = r.headers().get("content-type").cloned();
        let body = r.text().await.expect("body");
        answers.push((status, ct, body));
    }
    assert_eq!(
        answers[0], answers[1],
        "known and unknown addresses look alike"
    );
    assert_eq!(answers[0].0, 202);
    release.send(()).expect("release the writer");
    // The mail is still written, after the answer.
    let tokens = reset_tokens(&app, "ada@example.com", 1).await;
    assert_eq!(tokens.len(), 1);
    assert!(mails_to(&app, "nobody@example.com").await.is_empty());
    app.shutdown().await;
}

#[tokio::test]
async fn pending_reset_links_die_when_another_is_used_or_the_password_changes() {
    let app = TestApp::start_with(
        |c| {
            c.auth.rate_limit = 1000;
            c.auth.mail_interval = Duration::ZERO;
        },
        AppOptions::default(),
    )
    .await;
    register_from(&app, "192.0.2.1", "ada@example.com").await;
    assert_eq!(
        request_reset(&app, "192.0.2.1", "ada@example.com")
            .await
            .status(),
        202
    );
    reset_tokens(&app, "ada@example.com", 1).await;
    assert_eq!(
        request_reset(&app, "192.0.2.1", "ada@example.com")
            .await
            .status(),
        202
    );
    let tokens = reset_tokens(&app, "ada@example.com", 2).await;
    let (newer, older) = (&tokens[0], &tokens[1]);
    assert_ne!(newer, older);
    assert_eq!(
        reset(&app, newer, "a brand new password").await.status(),
        204
    );
    expect_problem(
        reset(&app, older, "yet another password").await,
        400,
        "invalid_grant",
    )
    .await;

    // A password change uses up a link mailed before it.
    assert_eq!(
        request_reset(&app, "192.0.2.1", "ada@example.com")
            .await
            .status(),
        202
    );
    let tokens = reset_tokens(&app, "ada@example.com", 3).await;
    let pending = tokens[0].clone();
    let signed: Value = login_from(&app, "192.0.2.1", "ada@example.com", "a brand new password")
        .await
        .json()
        .await
        .expect("json");
    let r = app
        .post_json(
            "/api/v1/auth/password",
            signed["access_token"].as_str(),
            &json!({"current_password": "a brand new password", "new_password": "the changed password"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    expect_problem(
        reset(&app, &pending, "an attacker's password").await,
        400,
        "invalid_grant",
    )
    .await;
    let r = login_from(&app, "192.0.2.1", "ada@example.com", "the changed password").await;
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn verify_email_request_sends_at_most_one_mail_per_interval() {
    let app = TestApp::start_with(|c| c.auth.rate_limit = 1000, AppOptions::default()).await;
    let reg = register_from(&app, "192.0.2.1", "ada@example.com").await;
    let token = reg["access_token"].as_str().expect("token").to_string();
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = app
            .post_json(
                "/api/v1/auth/verify-email/request",
                Some(&token),
                &json!({}),
            )
            .await;
        answers.push((r.status().as_u16(), r.text().await.expect("body")));
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 202);
    // The registration's mail and the first request's; the other three sent nothing.
    let n = mails_to(&app, "ada@example.com").await.len();
    assert_eq!(n, 2, "verification mails");
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Connection limits

/// Reads until the server closes the connection; what it sent, or None on the deadline.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_after_header_read_timeout() {
    let app = TestApp::start_with(
        |c| c.header_read_timeout = Duration::from_millis(300),
        AppOptions::default(),
    )
    .await;
    let mut s = TcpStream::connect(app.app.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .expect("write");
    let got = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the server closed the connection");
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(" 200 "),
        "no answer to an incomplete head: {text}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let app = TestApp::start_with(
        |c| c.idle_timeout = Duration::from_millis(300),
        AppOptions::default(),
    )
    .await;
    let mut s = TcpStream::connect(app.app.addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the idle connection is closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "served first: {text}");
    app.shutdown().await;
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let app = TestApp::start_with(|c| c.max_connections_per_ip = 2, AppOptions::default()).await;
    let addr = app.app.addr;
    // The harness's own client may hold an idle pooled connection, which counts too.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // A refused connection may already be closed: the write may fail, the read tells.
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                assert!(buf.starts_with(b"HTTP/1.1 200"));
                held.push(s);
            }
            Ok(_) => {
                refused = Some(held.len());
                break;
            }
            Err(_) => panic!("neither served nor refused"),
        }
    }
    let served = refused.expect("a connection beyond the cap is refused");
    assert!(
        served <= 2,
        "at most two open connections served, got {served}"
    );
    // Closing one gives its place back.
    drop(held);
    eventually(
        Duration::from_secs(10),
        "a place to be given back",
        || async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let got = read_until_closed(&mut s, Duration::from_secs(5)).await?;
            got.starts_with(b"HTTP/1.1 200").then_some(())
        },
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn huge_or_too_many_headers_get_a_problem_431() {
    let app = TestApp::start().await;
    let r = app
        .client
        .get(app.url("/healthz"))
        .header("x-big", "a".repeat(64 * 1024))
        .send()
        .await
        .expect("request");
    expect_problem(r, 431, "headers_too_large").await;
    let mut req = app.client.get(app.url("/api/v1/me"));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "1");
    }
    expect_problem(req.send().await.expect("request"), 431, "headers_too_large").await;
    // A normal request still works on the same server.
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    app.shutdown().await;
}
