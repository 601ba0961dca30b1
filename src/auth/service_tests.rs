//! The account flows as a service, without HTTP: an [`Auth`] built from its own handles
//! (storage on a temp dir, a manual clock, a counting mail wake-up) and driven through its
//! methods, as the routes and the CLI drive it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::service::Client;
use super::{Auth, AuthError};
use crate::clock::ManualClock;
use crate::config::Config;
use crate::mail::WakeMail;
use crate::storage::{Storage, StorageError};

const PASSWORD: &str = "correct horse battery";

struct Fixture {
    auth: Auth,
    storage: Storage,
    clock: Arc<ManualClock>,
    tasks: TaskTracker,
    mail_wakes: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn fixture_with(tune: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("storage");
    let mut config = Config::default();
    tune(&mut config);
    let clock = ManualClock::new();
    let tasks = TaskTracker::new();
    let mail_wakes = Arc::new(AtomicUsize::new(0));
    let wakes = mail_wakes.clone();
    let oauth = super::oauth::OAuthProviders::new(
        &super::oauth::OAuthConfigs::default(),
        config.public_base(),
    )
    .expect("no providers");
    let auth = Auth::new(
        &config,
        storage.clone(),
        clock.clone(),
        b"a test signing key of enough length",
        oauth,
        tasks.clone(),
        WakeMail::new(move || {
            wakes.fetch_add(1, Ordering::SeqCst);
        }),
    );
    Fixture {
        auth,
        storage,
        clock,
        tasks,
        mail_wakes,
        _dir: dir,
    }
}

fn client(ip: &str) -> Client {
    Client {
        ip: Some(ip.to_string()),
        user_agent: Some("unit test".to_string()),
    }
}

impl Fixture {
    /// Registers ada@example.com with [`PASSWORD`]; the new session's tokens.
    async fn register_ada(&self) -> super::TokenPair {
        self.auth
            .register(
                &client("192.0.2.1"),
                "ada@example.com",
                PASSWORD.into(),
                None,
            )
            .await
            .expect("register")
            .0
    }

    /// The bodies of the mails queued for `to`, oldest first.
    async fn mails_to(&self, to: &str) -> Vec<String> {
        let to = to.to_string();
        self.storage
            .read(move |c| {
                let mut stmt = c.prepare(
                    "SELECT payload FROM jobs WHERE kind = 'mail' ORDER BY created_at, id",
                )?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StorageError>(
                    rows.into_iter()
                        .filter_map(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
                        .filter(|m| m["to"] == to.as_str())
                        .filter_map(|m| m["body"].as_str().map(str::to_string))
                        .collect(),
                )
            })
            .await
            .expect("mails")
    }

    async fn audit_events(&self) -> Vec<String> {
        self.storage
            .read(|c| {
                let mut stmt = c.prepare("SELECT event FROM audit_log ORDER BY id")?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StorageError>(rows)
            })
            .await
            .expect("audit")
    }
}

/// The one-time token in a mailed link (`...?token=<token>`).
fn token_in(body: &str) -> String {
    let start = body.find("token=").expect("a link with a token") + "token=".len();
    body[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect()
}

#[tokio::test]
async fn register_creates_the_account_a_session_an_audit_row_and_a_verification_mail() {
    let f = fixture();
    let (pair, user) = f
        .auth
        .register(
            &client("192.0.2.1"),
            "  Ada@Example.COM ",
            PASSWORD.into(),
            None,
        )
        .await
        .expect("register");
    assert_eq!(user.email, "ada@example.com", "the address is normalised");
    assert!(!user.email_verified);
    let who = f
        .auth
        .authenticate(&pair.access_token)
        .await
        .expect("token");
    assert_eq!(who.user_id, user.id);
    assert_eq!(f.audit_events().await, ["register"]);
    let mails = f.mails_to("ada@example.com").await;
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(mails[0].contains("/#/verify?token="), "{}", mails[0]);
    assert_eq!(
        f.mail_wakes.load(Ordering::SeqCst),
        1,
        "the mail queue is woken"
    );

    let again = f
        .auth
        .register(
            &client("192.0.2.2"),
            "ada@example.com",
            PASSWORD.into(),
            None,
        )
        .await;
    assert!(matches!(again, Err(AuthError::EmailTaken)), "{again:?}");
    let weak = f
        .auth
        .register(
            &client("192.0.2.3"),
            "bob@example.com",
            "short".into(),
            None,
        )
        .await;
    assert!(matches!(weak, Err(AuthError::Invalid(_))), "{weak:?}");
}

#[tokio::test]
async fn login_checks_the_password_and_audits_both_outcomes() {
    let f = fixture();
    f.register_ada().await;
    let wrong = f
        .auth
        .login(
            &client("192.0.2.9"),
            "ada@example.com",
            "not the password".into(),
        )
        .await;
    assert!(
        matches!(wrong, Err(AuthError::InvalidCredentials)),
        "{wrong:?}"
    );
    let unknown = f
        .auth
        .login(&client("192.0.2.9"), "nobody@example.com", PASSWORD.into())
        .await;
    assert!(
        matches!(unknown, Err(AuthError::InvalidCredentials)),
        "an unknown address looks like a wrong password: {unknown:?}"
    );
    let (pair, user) = f
        .auth
        .login(&client("192.0.2.9"), "ADA@example.com", PASSWORD.into())
        .await
        .expect("login");
    assert_eq!(user.email, "ada@example.com");
    f.auth
        .authenticate(&pair.access_token)
        .await
        .expect("token");
    let events = f.audit_events().await;
    assert_eq!(events.first().map(String::as_str), Some("register"));
    assert!(events.iter().any(|e| e == "login_failed"), "{events:?}");
    assert_eq!(
        events.last().map(String::as_str),
        Some("login"),
        "{events:?}"
    );
}

#[tokio::test]
async fn refresh_rotates_and_a_second_use_revokes_the_whole_session() {
    let f = fixture();
    let first = f.register_ada().await;
    let (second, _) = f
        .auth
        .refresh(&client("192.0.2.1"), &first.refresh_token)
        .await
        .expect("rotate");
    assert_ne!(second.refresh_token, first.refresh_token);
    f.auth
        .authenticate(&second.access_token)
        .await
        .expect("the new access token works");

    // The rotated token again: theft, so the session ends for both holders.
    let reused = f
        .auth
        .refresh(&client("198.51.100.7"), &first.refresh_token)
        .await;
    assert!(
        matches!(reused, Err(AuthError::RefreshReused)),
        "{reused:?}"
    );
    let after = f
        .auth
        .refresh(&client("192.0.2.1"), &second.refresh_token)
        .await;
    assert!(
        after.is_err(),
        "the successor died with its session: {after:?}"
    );
    let access = f.auth.authenticate(&second.access_token).await;
    assert!(
        matches!(access, Err(AuthError::SessionRevoked)),
        "{access:?}"
    );
    assert!(f.audit_events().await.iter().any(|e| e == "refresh_reused"));
    let unknown = f.auth.refresh(&client("192.0.2.1"), "no-such-token").await;
    assert!(
        matches!(unknown, Err(AuthError::InvalidGrant)),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn a_reuse_window_refuses_a_retried_refresh_but_keeps_the_session() {
    let f = fixture_with(|c| c.auth.refresh_reuse_window = Duration::from_secs(30));
    let first = f.register_ada().await;
    let (second, _) = f
        .auth
        .refresh(&client("192.0.2.1"), &first.refresh_token)
        .await
        .expect("rotate");
    f.clock.advance(Duration::from_secs(5));
    let retried = f
        .auth
        .refresh(&client("192.0.2.1"), &first.refresh_token)
        .await;
    assert!(
        matches!(retried, Err(AuthError::RefreshReused)),
        "{retried:?}"
    );
    f.auth
        .refresh(&client("192.0.2.1"), &second.refresh_token)
        .await
        .expect("within the window the session lives on");
}

#[tokio::test]
async fn a_password_reset_sets_the_password_ends_every_session_and_is_single_use() {
    let f = fixture();
    let pair = f.register_ada().await;
    f.auth
        .request_password_reset(&client("192.0.2.1"), "Ada@example.com")
        .await
        .expect("request");
    // The mail is written in the background, after the answer.
    f.tasks.close();
    f.tasks.wait().await;
    let mails = f.mails_to("ada@example.com").await;
    let reset = mails
        .iter()
        .find(|m| m.contains("/#/reset?token="))
        .unwrap_or_else(|| panic!("a reset mail: {mails:?}"));
    let token = token_in(reset);

    let new_password = "another long passphrase";
    f.auth
        .reset_password(&client("192.0.2.1"), &token, new_password.into())
        .await
        .expect("reset");
    let old = f.auth.authenticate(&pair.access_token).await;
    assert!(old.is_err(), "sessions from before the reset end: {old:?}");
    let again = f
        .auth
        .reset_password(
            &client("192.0.2.1"),
            &token,
            "yet another passphrase".into(),
        )
        .await;
    assert!(matches!(again, Err(AuthError::InvalidGrant)), "{again:?}");
    let with_old = f
        .auth
        .login(&client("192.0.2.1"), "ada@example.com", PASSWORD.into())
        .await;
    assert!(matches!(with_old, Err(AuthError::InvalidCredentials)));
    let (_, user) = f
        .auth
        .login(&client("192.0.2.1"), "ada@example.com", new_password.into())
        .await
        .expect("the new password signs in");
    assert!(user.email_verified, "a reset proves the address");
}

#[tokio::test]
async fn an_unknown_address_gets_the_same_answer_and_no_mail() {
    let f = fixture();
    f.auth
        .request_password_reset(&client("192.0.2.1"), "nobody@example.com")
        .await
        .expect("the same answer as for a known address");
    f.tasks.close();
    f.tasks.wait().await;
    assert!(f.mails_to("nobody@example.com").await.is_empty());
}
