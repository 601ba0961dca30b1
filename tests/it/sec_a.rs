//! Issue #16, track A (OAuth), black-box against the fake provider of `oauth.rs`:
//! an unverified provider email claims no address, and warpbase's own proof of the address
//! removes identities linked before it; OAuth flows are bound to the browser that started
//! them (state and exchange code); a first password needs a recent sign-in.

use std::time::Duration;

use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::clock::ManualClock;

use crate::common::{TestApp, eventually, expect_problem};
use crate::oauth::{
    Env, Fake, PW, env, env_with_clock, location, outcome, person, set_cookie, token,
};

/// `(subject, body)` of every mail job to `to`, newest first.
async fn mails_to(app: &TestApp, to: &str) -> Vec<(String, String)> {
    let to = to.to_string();
    app.state()
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
        .expect("mail jobs")
        .into_iter()
        .filter_map(|r| {
            let v: Value = serde_json::from_str(&r.payload).ok()?;
            (v["to"] == to.as_str()).then(|| {
                (
                    v["subject"].as_str().unwrap_or("").to_string(),
                    v["body"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect()
}

/// The one-time token in the newest mail to `to` whose body contains `marker`.
async fn mailed_token(app: &TestApp, to: &str, marker: &str) -> String {
    let body = eventually(Duration::from_secs(10), "a mail", || async {
        mails_to(app, to)
            .await
            .into_iter()
            .find(|(_, b)| b.contains(marker))
            .map(|(_, b)| b)
    })
    .await;
    body.split("token=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("a token in the mail")
        .to_string()
}

async fn identities_of(env: &Env, user_id: &str) -> i64 {
    env.app
        .db_i64(
            "SELECT COUNT(*) FROM identities WHERE user_id = ?1",
            vec![user_id.to_string()],
        )
        .await
        .expect("count")
}

// ---------------------------------------------------------------------------------------
// Item 1: pre-account takeover

#[tokio::test]
async fn an_unverified_provider_email_claims_no_address() {
    let env = env().await;
    // The attacker's provider accounts carry the victim's address, unverified.
    for provider in ["github", "oidc"] {
        let (code, detail) = env
            .sign_in(provider, person(100, "victim@example.com", false))
            .await
            .expect_err("refused");
        assert_eq!(code, "provider_error", "{provider}");
        assert!(
            detail.contains("verify your email at the provider first"),
            "{detail}"
        );
    }
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 0);
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM identities").await, 0);

    // The real owner registers the address without `email_taken` ...
    let victim = env.register("victim@example.com").await;
    let vid = victim["user"]["id"].as_str().expect("id");
    // ... and the attacker's identity still reaches no account.
    let (code, _) = env
        .sign_in("github", person(100, "victim@example.com", false))
        .await
        .expect_err("refused");
    assert_eq!(code, "account_exists");
    assert_eq!(identities_of(&env, vid).await, 0);
    env.app.shutdown().await;
}

/// The attack with a password instead: the attacker registers the victim's address,
/// links their own GitHub, and waits; the victim recovers the account by password reset.
#[tokio::test]
async fn a_password_reset_removes_identities_linked_before_the_address_was_proved() {
    let env = env().await;
    let squatter = env.register("victim@example.com").await;
    let uid = squatter["user"]["id"].as_str().expect("id").to_string();
    let url = env.link_url("github", token(&squatter)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(200, "attacker@evil.test", true))
        .await;
    env.callback(&consent).await.expect("linked");
    // Before the fix this identity survives the reset and signs in to the account.
    let attacker = env
        .sign_in_ok("github", person(200, "attacker@evil.test", true))
        .await;
    assert_eq!(attacker["user"]["id"], uid.as_str());

    // The owner registers, is told the address is taken, and resets the password.
    let r = env
        .app
        .post_json(
            "/api/v1/auth/register",
            None,
            &json!({"email": "victim@example.com", "password": PW}),
        )
        .await;
    expect_problem(r, 409, "email_taken").await;
    let r = env
        .app
        .post_json(
            "/api/v1/auth/password-reset/request",
            None,
            &json!({"email": "victim@example.com"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let reset = mailed_token(&env.app, "victim@example.com", "/#/reset?token=").await;
    let r = env
        .app
        .post_json(
            "/api/v1/auth/password-reset",
            None,
            &json!({"token": reset, "new_password": "the owner's own password"}),
        )
        .await;
    assert_eq!(r.status(), 204);

    assert_eq!(
        identities_of(&env, &uid).await,
        0,
        "the GitHub link is gone"
    );
    let r = env.app.get("/api/v1/me", Some(token(&attacker))).await;
    expect_problem(r, 401, "session_revoked").await;
    // The attacker's GitHub now leads to an account of its own, not the victim's.
    let again = env
        .sign_in_ok("github", person(200, "attacker@evil.test", true))
        .await;
    assert_ne!(again["user"]["id"], uid.as_str());
    assert_eq!(again["user"]["email"], "attacker@evil.test");

    let events = env.audit_events(&uid).await;
    assert!(
        events
            .iter()
            .any(|e| e == "identities_removed_on_verification"),
        "{events:?}"
    );
    let mails = mails_to(&env.app, "victim@example.com").await;
    let told = mails
        .iter()
        .find(|(s, _)| s.contains("Sign-in providers removed"))
        .expect("the owner is told by mail");
    assert!(told.1.contains("github"), "{}", told.1);
    env.app.shutdown().await;
}

#[tokio::test]
async fn email_verification_removes_identities_linked_before_it_and_ends_their_sessions() {
    let env = env().await;
    let reg = env.register("late@example.com").await;
    let uid = reg["user"]["id"].as_str().expect("id").to_string();
    // Linked while unverified, with another address: removed on verification.
    let url = env.link_url("github", token(&reg)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(300, "someone@else.test", true))
        .await;
    env.callback(&consent).await.expect("linked");
    // Linked while unverified, but the provider vouches for this very address: kept.
    let url = env.link_url("oidc", token(&reg)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(301, "late@example.com", true))
        .await;
    env.callback(&consent).await.expect("linked");
    assert_eq!(identities_of(&env, &uid).await, 2);

    let verify = mailed_token(&env.app, "late@example.com", "/#/verify?token=").await;
    let r = env
        .app
        .post_json("/api/v1/auth/verify-email", None, &json!({"token": verify}))
        .await;
    assert_eq!(r.status(), 204);

    // A session may have come from the removed identity: every session ends.
    let r = env.app.get("/api/v1/me", Some(token(&reg))).await;
    expect_problem(r, 401, "session_revoked").await;
    let me = env
        .app
        .post_json(
            "/api/v1/auth/login",
            None,
            &json!({"email": "late@example.com", "password": PW}),
        )
        .await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["user"]["email_verified"], true);
    assert_eq!(
        me["user"]["identities"],
        json!([{"provider": "oidc", "email": "late@example.com"}])
    );
    assert!(
        mails_to(&env.app, "late@example.com")
            .await
            .iter()
            .any(|(s, b)| s.contains("Sign-in providers removed") && b.contains("github"))
    );
    env.app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Item 2: state and exchange code bound to the browser

/// A cookie of the right shape that is not the test browser's.
const OTHER_BROWSER: &str = "warpbase_oauth=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[tokio::test]
async fn a_callback_from_another_browser_is_invalid_state() {
    let env = env().await;
    for cookie in [None, Some(OTHER_BROWSER)] {
        let url = env.authorize("github").await;
        let consent = env
            .fake
            .consent(&env.http, &url, person(400, "csrf@example.com", true))
            .await;
        let query = [
            ("code", consent.code.as_str()),
            ("state", consent.state.as_str()),
        ];
        let r = env
            .callback_as(cookie, &consent.callback_path, &query)
            .await;
        assert_eq!(r.status(), 302);
        let (code, _) = outcome(&location(&r)).expect_err("refused");
        assert_eq!(code, "invalid_state", "cookie {cookie:?}");
        // The foreign attempt spent the state: not even the right browser can use it now.
        let (code, _) = env.callback(&consent).await.expect_err("spent");
        assert_eq!(code, "invalid_state");
    }
    assert_eq!(env.fake.with(|s| s.issued), 0, "no code was redeemed");
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 0);
    env.app.shutdown().await;
}

/// Login CSRF: the attacker's own exchange code, planted in the victim's browser, signs
/// the victim in to nothing.
#[tokio::test]
async fn an_exchange_from_another_browser_is_invalid_state() {
    let env = env().await;
    let code = env
        .sign_in("github", person(500, "owner@example.com", true))
        .await
        .expect("signed in");
    expect_problem(env.exchange_as(None, &code).await, 400, "invalid_state").await;
    expect_problem(
        env.exchange_as(Some(OTHER_BROWSER), &code).await,
        400,
        "invalid_state",
    )
    .await;
    // The foreign attempts did not burn the code of the browser that owns it.
    let r = env.exchange(&code).await;
    assert_eq!(r.status(), 200);
    expect_problem(env.exchange(&code).await, 400, "invalid_grant").await;
    env.app.shutdown().await;
}

/// Link-flow CSRF: an attacker starts linking GitHub to their account and sends the
/// provider URL to a victim, who is signed in at GitHub.
#[tokio::test]
async fn a_link_url_opened_by_another_user_links_nothing() {
    let env = env().await;
    let attacker = env.app.create_user("attacker@evil.test").await;
    let r = env
        .app
        .post_json(
            "/api/v1/auth/oauth/github/link",
            Some(&attacker.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        set_cookie(&r).is_some(),
        "link binds the attacker's browser"
    );
    let body: Value = r.json().await.expect("json");
    let url = body["authorize_url"].as_str().expect("url").to_string();

    // The victim's browser has a binding of its own from an earlier sign-in.
    let victim = env
        .sign_in_ok("github", person(600, "victim@example.com", true))
        .await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(601, "victim-2@example.com", true))
        .await;
    let (code, _) = env.callback(&consent).await.expect_err("refused");
    assert_eq!(code, "invalid_state");
    assert_eq!(identities_of(&env, &attacker.id).await, 0);
    let vid = victim["user"]["id"].as_str().expect("id");
    assert_eq!(identities_of(&env, vid).await, 1, "only the victim's own");
    env.app.shutdown().await;
}

#[tokio::test]
async fn the_binding_cookie_is_host_prefixed_on_https_and_kept_across_tabs() {
    let fake = Fake::start().await;
    let github = fake.github();
    let app = TestApp::start_with(
        move |c| {
            c.public_url = "https://ui.warpbase.test".into();
            c.auth.oauth.github = Some(github);
        },
        AppOptions::default(),
    )
    .await;
    let r = app.get("/api/v1/auth/oauth/github/authorize", None).await;
    assert_eq!(r.status(), 302);
    let header = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(header.starts_with("__Host-warpbase_oauth="), "{header}");
    for attr in [
        "Path=/",
        "HttpOnly",
        "SameSite=Lax",
        "Secure",
        "Max-Age=600",
    ] {
        assert!(header.split("; ").any(|a| a == attr), "{attr} in {header}");
    }
    assert!(!header.contains("Domain"), "{header}");
    // A second tab of the same browser keeps the value, so both flows can finish.
    let pair = set_cookie(&r).expect("cookie");
    let r2 = app
        .client
        .get(app.url("/api/v1/auth/oauth/github/authorize"))
        .header("cookie", &pair)
        .send()
        .await
        .expect("authorize");
    assert_eq!(set_cookie(&r2).as_deref(), Some(pair.as_str()));
    app.shutdown().await;

    // On http the name has no prefix (browsers refuse `__Host-` without Secure).
    let env = env().await;
    let r = env
        .app
        .get("/api/v1/auth/oauth/github/authorize", None)
        .await;
    let header = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(header.starts_with("warpbase_oauth="), "{header}");
    assert!(!header.contains("Secure"), "{header}");
    env.app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Low: a first password needs a recent sign-in

#[tokio::test]
async fn a_first_password_needs_a_recent_sign_in() {
    let clock = ManualClock::new();
    let env = env_with_clock(Some(clock.clone())).await;
    let who = person(700, "oauth-only@example.com", true);
    let signed = env.sign_in_ok("github", who.clone()).await;
    let set_password = |access: String| {
        let req = env
            .app
            .client
            .post(env.app.url("/api/v1/auth/password"))
            .bearer_auth(access)
            .json(&json!({"new_password": "a brand new password"}));
        async move { req.send().await.expect("password") }
    };

    // Eleven minutes later the access token is still valid, the sign-in is not recent.
    clock.advance(Duration::from_secs(11 * 60));
    let r = set_password(token(&signed).to_string()).await;
    let body = expect_problem(r, 401, "step_up_required").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or("")
            .contains("sign in again"),
        "{body}"
    );
    // A refresh is no sign-in: it keeps the session's auth time.
    let r = env
        .app
        .post_json(
            "/api/v1/auth/refresh",
            None,
            &json!({"refresh_token": signed["refresh_token"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let refreshed: Value = r.json().await.expect("json");
    let r = set_password(token(&refreshed).to_string()).await;
    expect_problem(r, 401, "step_up_required").await;
    let uid = signed["user"]["id"].as_str().expect("id").to_string();
    let has_password = env
        .app
        .db_i64(
            "SELECT password_hash IS NOT NULL FROM users WHERE id = ?1",
            vec![uid.clone()],
        )
        .await
        .expect("row");
    assert_eq!(has_password, 0);

    // A fresh sign-in may set it.
    let fresh = env.sign_in_ok("github", who).await;
    let r = set_password(token(&fresh).to_string()).await;
    assert_eq!(r.status(), 200);
    let r = env
        .app
        .post_json(
            "/api/v1/auth/login",
            None,
            &json!({"email": "oauth-only@example.com", "password": "a brand new password"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    env.app.shutdown().await;
}
