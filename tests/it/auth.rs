//! Accounts, black-box: registration and login, token rotation and reuse detection,
//! revocation on security events, expiry and forged tokens, rate limits, reset and
//! verification mails, sessions, and durability of acknowledged sign-ups across kill -9.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{ChildServer, TestApp, expect_problem};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::clock::ManualClock;

const PW: &str = "correct horse battery";

async fn start() -> TestApp {
    TestApp::start_with(|c| c.auth.rate_limit = 1000, AppOptions::default()).await
}

async fn register(app: &TestApp, email: &str) -> Value {
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": email, "password": PW, "name": "Ada"}),
        )
        .await;
    assert_eq!(r.status(), 201, "register {email}");
    r.json().await.expect("json")
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/api/v1/auth/login",
        None,
        &json!({"email": email, "password": password}),
    )
    .await
}

fn token(v: &Value) -> &str {
    v["access_token"].as_str().expect("access_token")
}

fn refresh_token(v: &Value) -> &str {
    v["refresh_token"].as_str().expect("refresh_token")
}

async fn refresh(app: &TestApp, rt: &str) -> reqwest::Response {
    app.post_json("/api/v1/auth/refresh", None, &json!({"refresh_token": rt}))
        .await
}

#[tokio::test]
async fn register_login_me_and_the_token_pair_contract() {
    let app = start().await;
    let reg = register(&app, "  Ada@Example.COM ").await;
    assert_eq!(reg["token_type"], "Bearer");
    assert_eq!(reg["expires_in"], 900);
    assert_eq!(reg["refresh_expires_in"], 604800);
    assert_eq!(
        reg["user"]["email"], "ada@example.com",
        "emails are normalised"
    );
    assert_eq!(
        reg["user"]["role"], "user",
        "no account is admin for being first (admin/claim, user create --admin)"
    );
    assert_eq!(reg["user"]["plan"]["plan"], "free");
    let me: Value = app
        .get("/api/v1/me", Some(token(&reg)))
        .await
        .json()
        .await
        .expect("me");
    assert_eq!(me["id"], reg["user"]["id"]);
    assert_eq!(me["email_verified"], false);

    let second = register(&app, "bob@example.com").await;
    assert_eq!(second["user"]["role"], "user");
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": "ADA@example.com", "password": PW}),
        )
        .await;
    expect_problem(r, 409, "email_taken").await;
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": "c@example.com", "password": "short"}),
        )
        .await;
    expect_problem(r, 422, "invalid_input").await;
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": "not-an-email", "password": PW}),
        )
        .await;
    expect_problem(r, 422, "invalid_input").await;
    let r = app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": "d@example.com", "password": "x".repeat(1025)}),
        )
        .await;
    expect_problem(r, 422, "invalid_input").await;

    let r = login(&app, "ada@example.com", PW).await;
    assert_eq!(r.status(), 200);
    let l: Value = r.json().await.expect("json");
    assert_eq!(l["user"]["id"], reg["user"]["id"]);
    // Admin-only routes.
    let r = app.get("/api/v1/admin/users", Some(token(&second))).await;
    expect_problem(r, 403, "forbidden").await;
    let r = app.get("/api/v1/admin/users", Some(token(&l))).await;
    expect_problem(r, 403, "forbidden").await;
    let admin = app.admin("root@example.com").await;
    let users: Value = app
        .get("/api/v1/admin/users", Some(&admin.access_token))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(users["items"].as_array().expect("items").len(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let app = start().await;
    register(&app, "ada@example.com").await;
    let a = login(&app, "ada@example.com", "wrong password!").await;
    let b = login(&app, "nobody@example.com", "wrong password!").await;
    let a = expect_problem(a, 401, "invalid_credentials").await;
    let b = expect_problem(b, 401, "invalid_credentials").await;
    assert_eq!(a["detail"], b["detail"]);
    assert_eq!(a["title"], b["title"]);
    app.shutdown().await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    let r = refresh(&app, refresh_token(&reg)).await;
    assert_eq!(r.status(), 200);
    let next: Value = r.json().await.expect("json");
    assert_ne!(refresh_token(&next), refresh_token(&reg));
    assert_eq!(
        app.get("/api/v1/me", Some(token(&next))).await.status(),
        200
    );
    // Presenting the rotated token again: reuse → 401 and the whole session dies.
    let r = refresh(&app, refresh_token(&reg)).await;
    expect_problem(r, 401, "refresh_reused").await;
    let r = app.get("/api/v1/me", Some(token(&next))).await;
    expect_problem(r, 401, "session_revoked").await;
    let r = refresh(&app, refresh_token(&next)).await;
    expect_problem(r, 400, "invalid_grant").await;
    let r = refresh(&app, "made-up").await;
    expect_problem(r, 400, "invalid_grant").await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_refreshes_with_one_token_exactly_one_wins() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    let rt = refresh_token(&reg).to_string();
    let (a, b) = tokio::join!(refresh(&app, &rt), refresh(&app, &rt));
    let mut codes = vec![a.status().as_u16(), b.status().as_u16()];
    codes.sort();
    assert_eq!(codes, vec![200, 401]);
    app.shutdown().await;
}

#[tokio::test]
async fn password_change_kills_other_sessions_and_old_tokens_at_once() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    let other: Value = login(&app, "ada@example.com", PW)
        .await
        .json()
        .await
        .expect("json");
    let r = app
        .post_json(
            "/api/v1/auth/password",
            Some(token(&reg)),
            &json!({"current_password": "wrong!!!!!!", "new_password": "a new long password"}),
        )
        .await;
    expect_problem(r, 401, "invalid_credentials").await;
    let r = app
        .post_json(
            "/api/v1/auth/password",
            Some(token(&reg)),
            &json!({"current_password": PW, "new_password": "a new long password"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.expect("json");
    // The very next request with an earlier token fails, in this session and the other.
    expect_problem(
        app.get("/api/v1/me", Some(token(&reg))).await,
        401,
        "session_revoked",
    )
    .await;
    expect_problem(
        app.get("/api/v1/me", Some(token(&other))).await,
        401,
        "session_revoked",
    )
    .await;
    expect_problem(
        refresh(&app, refresh_token(&other)).await,
        400,
        "invalid_grant",
    )
    .await;
    assert_eq!(
        app.get("/api/v1/me", Some(token(&fresh))).await.status(),
        200
    );
    assert_eq!(refresh(&app, refresh_token(&fresh)).await.status(), 200);
    expect_problem(
        login(&app, "ada@example.com", PW).await,
        401,
        "invalid_credentials",
    )
    .await;
    assert_eq!(
        login(&app, "ada@example.com", "a new long password")
            .await
            .status(),
        200
    );
    app.shutdown().await;
}

#[tokio::test]
async fn logout_and_logout_all() {
    let app = start().await;
    let a = register(&app, "ada@example.com").await;
    let b: Value = login(&app, "ada@example.com", PW)
        .await
        .json()
        .await
        .expect("json");
    let c: Value = login(&app, "ada@example.com", PW)
        .await
        .json()
        .await
        .expect("json");
    let r = app
        .post_json("/api/v1/auth/logout", Some(token(&a)), &json!({}))
        .await;
    assert_eq!(r.status(), 204);
    expect_problem(
        app.get("/api/v1/me", Some(token(&a))).await,
        401,
        "session_revoked",
    )
    .await;
    assert_eq!(app.get("/api/v1/me", Some(token(&b))).await.status(), 200);
    let r = app
        .post_json("/api/v1/auth/logout-all", Some(token(&b)), &json!({}))
        .await;
    assert_eq!(r.status(), 204);
    expect_problem(
        app.get("/api/v1/me", Some(token(&b))).await,
        401,
        "session_revoked",
    )
    .await;
    expect_problem(
        app.get("/api/v1/me", Some(token(&c))).await,
        401,
        "session_revoked",
    )
    .await;
    expect_problem(refresh(&app, refresh_token(&c)).await, 400, "invalid_grant").await;
    app.shutdown().await;
}

#[tokio::test]
async fn sessions_are_listed_and_revocable() {
    let app = start().await;
    let a = register(&app, "ada@example.com").await;
    let b: Value = login(&app, "ada@example.com", PW)
        .await
        .json()
        .await
        .expect("json");
    let list: Value = app
        .get("/api/v1/auth/sessions", Some(token(&a)))
        .await
        .json()
        .await
        .expect("json");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    assert_eq!(items.iter().filter(|s| s["current"] == true).count(), 1);
    assert!(items.iter().all(|s| s["ip"] == "127.0.0.1"));
    let other_id = items.iter().find(|s| s["current"] == false).expect("other")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/auth/sessions/{other_id}")))
        .bearer_auth(token(&a))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    expect_problem(
        app.get("/api/v1/me", Some(token(&b))).await,
        401,
        "session_revoked",
    )
    .await;
    // Someone else's or an unknown session: 404.
    let z = register(&app, "zed@example.com").await;
    let r = app
        .client
        .delete(app.url(&format!("/api/v1/auth/sessions/{other_id}")))
        .bearer_auth(token(&z))
        .send()
        .await
        .expect("delete");
    expect_problem(r, 404, "not_found").await;
    app.shutdown().await;
}

#[tokio::test]
async fn expired_access_tokens_say_so() {
    let clock = ManualClock::new();
    let app = TestApp::start_with(
        |c| c.auth.rate_limit = 1000,
        AppOptions {
            clock: Some(clock.clone() as Arc<dyn warpbase::clock::Clock>),
            ..Default::default()
        },
    )
    .await;
    let reg = register(&app, "ada@example.com").await;
    assert_eq!(app.get("/api/v1/me", Some(token(&reg))).await.status(), 200);
    clock.advance(Duration::from_secs(15 * 60 + 1));
    expect_problem(
        app.get("/api/v1/me", Some(token(&reg))).await,
        401,
        "token_expired",
    )
    .await;
    // The refresh token is still good for days.
    let next: Value = refresh(&app, refresh_token(&reg))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        app.get("/api/v1/me", Some(token(&next))).await.status(),
        200
    );
    clock.advance(Duration::from_secs(8 * 24 * 3600));
    expect_problem(
        refresh(&app, refresh_token(&next)).await,
        400,
        "invalid_grant",
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn forged_tokens_are_rejected() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    let t = token(&reg);
    let parts: Vec<&str> = t.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("claims");
    claims["ver"] = json!(99);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    let rs = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        parts[1],
        parts[2]
    );
    for bad in [tampered.as_str(), none.as_str(), rs.as_str(), "garbage", ""] {
        let r = app.get("/api/v1/me", Some(bad)).await;
        expect_problem(r, 401, "unauthorized").await;
    }
    let r = app
        .client
        .get(app.url("/api/v1/me"))
        .header("authorization", format!("Basic {t}"))
        .send()
        .await
        .expect("req");
    expect_problem(r, 401, "unauthorized").await;
    app.shutdown().await;
}

#[tokio::test]
async fn login_is_rate_limited_per_email_and_per_ip() {
    let app = TestApp::start_with(|c| c.auth.rate_limit = 5, AppOptions::default()).await;
    register(&app, "ada@example.com").await;
    let mut last = None;
    for _ in 0..6 {
        last = Some(login(&app, "ada@example.com", "wrong password!").await);
    }
    let r = last.expect("response");
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    expect_problem(r, 429, "rate_limited").await;
    let secs: u64 = retry_after.expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&secs));
    // The IP is exhausted too: another email from the same address is refused.
    expect_problem(
        login(&app, "other@example.com", "wrong password!").await,
        429,
        "rate_limited",
    )
    .await;
    app.shutdown().await;
}

/// The newest mail job's body for `to` (offline mode logs mails; the job row has them).
async fn last_mail_to(app: &TestApp, to: &str) -> String {
    let to = to.to_string();
    crate::common::eventually(Duration::from_secs(10), "a mail job", || {
        let to = to.clone();
        async move {
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
                            limit: 50,
                        },
                    )
                })
                .await
                .ok()?;
            rows.into_iter().find_map(|r| {
                let v: Value = serde_json::from_str(&r.payload).ok()?;
                (v["to"] == to.as_str()).then(|| v["body"].as_str().unwrap_or("").to_string())
            })
        }
    })
    .await
}

fn link_token(body: &str) -> String {
    body.split("token=")
        .nth(1)
        .expect("token in mail")
        .split_whitespace()
        .next()
        .expect("token")
        .to_string()
}

#[tokio::test]
async fn password_reset_by_mail_revokes_every_session() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    let r = app
        .post_json(
            "/api/v1/auth/password-reset/request",
            None,
            &json!({"email": "ada@example.com"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    // Unknown emails get the same answer.
    let r = app
        .post_json(
            "/api/v1/auth/password-reset/request",
            None,
            &json!({"email": "nobody@example.com"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let body = crate::common::eventually(Duration::from_secs(10), "the reset mail", || async {
        let b = last_mail_to(&app, "ada@example.com").await;
        b.contains("/#/reset?token=").then_some(b)
    })
    .await;
    let t = link_token(&body);
    let r = app
        .post_json(
            "/api/v1/auth/password-reset",
            None,
            &json!({"token": t, "new_password": "brand new password"}),
        )
        .await;
    assert_eq!(r.status(), 204);
    expect_problem(
        app.get("/api/v1/me", Some(token(&reg))).await,
        401,
        "session_revoked",
    )
    .await;
    // Single use.
    let r = app
        .post_json(
            "/api/v1/auth/password-reset",
            None,
            &json!({"token": t, "new_password": "another password!"}),
        )
        .await;
    expect_problem(r, 400, "invalid_grant").await;
    assert_eq!(
        login(&app, "ada@example.com", "brand new password")
            .await
            .status(),
        200
    );
    // The mail job was delivered (to the log, offline).
    let delivered = crate::common::eventually(Duration::from_secs(10), "mail delivery", || async {
        let n = app
            .db_i64(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'mail' AND status = 'succeeded'",
                vec![],
            )
            .await
            .ok()?;
        (n >= 2).then_some(n)
    })
    .await;
    assert!(delivered >= 2);
    app.shutdown().await;
}

#[tokio::test]
async fn email_verification_by_mail() {
    let app = start().await;
    let reg = register(&app, "ada@example.com").await;
    // Read first, so the view is cached: the verification must show at once anyway.
    let me: Value = app
        .get("/api/v1/me", Some(token(&reg)))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["email_verified"], false);
    let body = last_mail_to(&app, "ada@example.com").await;
    assert!(body.contains("/#/verify?token="), "{body}");
    let r = app
        .post_json(
            "/api/v1/auth/verify-email",
            None,
            &json!({"token": link_token(&body)}),
        )
        .await;
    assert_eq!(r.status(), 204);
    let me: Value = app
        .get("/api/v1/me", Some(token(&reg)))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(me["email_verified"], true);
    let r = app
        .post_json(
            "/api/v1/auth/verify-email",
            None,
            &json!({"token": link_token(&body)}),
        )
        .await;
    expect_problem(r, 400, "invalid_grant").await;
    app.shutdown().await;
}

#[test]
fn acknowledged_sign_ups_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("warpbase.toml"),
        "[auth]\nrate_limit = 10000\n",
    )
    .expect("config");
    let server = ChildServer::start(dir.path(), &[], &[]);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let acked: Vec<String> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..40 {
            let client = client.clone();
            let url = server.url("/api/v1/auth/register");
            tasks.push(tokio::spawn(async move {
                let email = format!("user{i}@example.com");
                let r = client
                    .post(url)
                    .json(&json!({"email": email, "password": PW}))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 201).then_some(email)
            }));
        }
        let mut acked = Vec::new();
        for t in tasks {
            if let Some(e) = t.await.expect("join") {
                acked.push(e);
            }
        }
        acked
    });
    assert_eq!(acked.len(), 40, "all sign-ups acknowledged before the kill");
    server.kill9();
    let server = ChildServer::start(dir.path(), &[], &[]);
    rt.block_on(async {
        for email in &acked {
            let r = client
                .post(server.url("/api/v1/auth/login"))
                .json(&json!({"email": email, "password": PW}))
                .send()
                .await
                .expect("login");
            assert_eq!(r.status(), 200, "{email} lost after kill -9");
        }
    });
    server.kill9();
}
