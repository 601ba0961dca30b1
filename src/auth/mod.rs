//! Accounts: who the caller is, and whether their tokens are still good.
//!
//! This module owns password and OAuth login, access/refresh tokens, sessions and the
//! security events that revoke them. The hot path is [`Auth::authenticate`]: a JWT check
//! plus two moka lookups (user auth state, session liveness) that are invalidated right
//! after any commit that changes them, so revocation is immediate and the database is
//! not touched on a warm request.

pub mod client_ip;
pub mod epoch;
pub mod extract;
pub mod oauth;
pub mod oauth_flow;
pub mod operator;
pub mod password;
pub mod routes;
pub mod service;
#[cfg(test)]
mod service_tests;
pub mod tokens;

use crate::mail;
use crate::ratelimit;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::cache::Loaded;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::storage::users::{self, NewSession, UserAuthState};
use crate::storage::{Storage, StorageError};
pub use extract::{AdminUser, AuthUser};
use tokens::{Claims, JwtKeys, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Unauthorized,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("the access token has expired")]
    TokenExpired,
    #[error("this session has been revoked; sign in again")]
    SessionRevoked,
    #[error("this refresh token was already used; the session has been revoked for safety")]
    RefreshReused,
    #[error("the token or code is invalid, expired or already used")]
    InvalidGrant,
    #[error("an account with this email already exists")]
    EmailTaken,
    /// An OAuth flow continued by another browser than the one that started it.
    #[error("this sign-in was started in another browser or window; please start again")]
    InvalidState,
    /// The session's sign-in is older than `auth.step_up_window` for this action.
    #[error("this needs a recent sign-in; sign in again, then retry")]
    StepUpRequired,
    #[error("too many attempts")]
    RateLimited(Duration),
    #[error("{0}")]
    Invalid(String),
    #[error("admin role required")]
    Forbidden,
    #[error("not found")]
    NotFound,
    /// Unlinking would leave the account no way to sign in.
    #[error("{0}")]
    LastLoginMethod(String),
    /// An OAuth provider could not be reached or answered nonsense (no secrets inside).
    #[error("{0}")]
    OAuthProvider(String),
    #[error(transparent)]
    Password(#[from] password::PasswordError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Background writes (reset requests) pending at once; beyond it requests are dropped.
pub const MAX_BACKGROUND_WRITES: usize = 1024;

/// Tokens handed to a client after sign-in, refresh or password change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: u64,
}

pub use crate::identity::{Grant, Principal};

/// A committed change that may revoke credentials, announced in-process right after the
/// caches forgot it (the SSE stream guard re-checks the streams it concerns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChange {
    /// The user's version, role or disabled flag may have changed.
    User(String),
    /// These sessions were revoked.
    Sessions(Vec<String>),
}

/// The auth service. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    clock: SharedClock,
    keys: JwtKeys,
    access_ttl: Duration,
    refresh_ttl: Duration,
    hasher: password::PasswordHasher,
    /// The enabled OAuth providers (none when nothing is configured).
    oauth: oauth::OAuthProviders,
    /// Per client IP, on every unauthenticated route that costs work or writes.
    limiter: ratelimit::RateLimiter,
    /// Failed sign-ins per (email, client network).
    backoff: ratelimit::FailureBackoff,
    /// One verification or reset mail per address per `auth.mail_interval`.
    mail_limiter: ratelimit::RateLimiter,
    /// Background writes started by requests that do not wait for them (reset requests).
    background: Arc<tokio::sync::Semaphore>,
    /// user id → what every request checks. Invalidated after commits that change it.
    user_states: Loaded<String, UserAuthState>,
    /// session id → (user id, live). Invalidated after revocations.
    sessions: Loaded<String, (String, bool)>,
    /// user id → the public part of `/me` (fields and identities). Invalidated with
    /// `user_states` and after identity changes.
    profiles: Loaded<String, Arc<Profile>>,
    /// Announces [`AuthChange`]s; nobody listening is fine.
    changes: tokio::sync::broadcast::Sender<AuthChange>,
    /// Where browsers reach warpbase (links in mails).
    public_base: String,
    /// The sender of account mail.
    mail_from: String,
    /// `auth.refresh_reuse_window`: a rotated refresh token presented again this soon is
    /// refused without revoking the session.
    refresh_reuse_window: Duration,
    /// `auth.step_up_window`: how recent a sign-in setting a first password needs.
    step_up_window: Duration,
    /// The app's background tasks, so shutdown waits for the writes started here.
    tasks: tokio_util::task::TaskTracker,
    /// Wakes the mail queue after a commit that queued a mail.
    wake_mail: mail::WakeMail,
}

/// What `/me` shows of a user apart from plan and usage: the row's public fields (never
/// the password hash) and the linked identities.
#[derive(Debug, Clone)]
pub struct Profile {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
    pub name: Option<String>,
    pub role: String,
    pub disabled: bool,
    pub created_at: i64,
    /// (provider, email at the provider)
    pub identities: Vec<(String, Option<String>)>,
    /// The fields above as the API's `User` object renders them, `{"id":…,"identities":[…]}`,
    /// rendered once per load: `/me` writes it and appends only the plan.
    pub json: Box<str>,
}

/// The `User` fields a profile determines, in the API's order (`UserView` renders the
/// same keys; a test checks the two agree byte for byte).
#[derive(serde::Serialize)]
struct ProfileJson<'a> {
    id: &'a str,
    email: &'a str,
    email_verified: bool,
    name: Option<&'a str>,
    role: &'a str,
    disabled: bool,
    #[serde(with = "crate::clock::serde_ms")]
    created_at: i64,
    identities: Vec<IdentityJson<'a>>,
}

#[derive(serde::Serialize)]
struct IdentityJson<'a> {
    provider: &'a str,
    email: Option<&'a str>,
}

impl Profile {
    pub fn new(
        row: &users::UserRow,
        identities: Vec<crate::storage::auth::IdentityRow>,
    ) -> Profile {
        let identities: Vec<(String, Option<String>)> = identities
            .into_iter()
            .map(|i| (i.provider, i.email))
            .collect();
        let json = serde_json::to_string(&ProfileJson {
            id: &row.id,
            email: &row.email,
            email_verified: row.email_verified,
            name: row.name.as_deref(),
            role: &row.role,
            disabled: row.disabled,
            created_at: row.created_at,
            identities: identities
                .iter()
                .map(|(provider, email)| IdentityJson {
                    provider,
                    email: email.as_deref(),
                })
                .collect(),
        })
        // Plain strings, bools and integers always serialise.
        .unwrap_or_else(|_| "{}".into());
        Profile {
            id: row.id.clone(),
            email: row.email.clone(),
            email_verified: row.email_verified,
            name: row.name.clone(),
            role: row.role.clone(),
            disabled: row.disabled,
            created_at: row.created_at,
            identities,
            json: json.into(),
        }
    }

    /// The API's `User` object for this profile and `plan`: the pre-rendered fields with
    /// `"plan"` appended (what serialising [`routes::UserView`] gives, without re-rendering
    /// every field per request).
    pub fn user_json(&self, plan: &impl Serialize) -> Vec<u8> {
        let fields = self.json.strip_suffix('}').unwrap_or(&self.json);
        let mut out = Vec::with_capacity(fields.len() + 512);
        out.extend_from_slice(fields.as_bytes());
        out.extend_from_slice(if fields.len() > 1 {
            b",\"plan\":"
        } else {
            b"\"plan\":"
        });
        if serde_json::to_writer(&mut out, plan).is_err() {
            out.extend_from_slice(b"null");
        }
        out.push(b'}');
        out
    }
}

impl Auth {
    /// `tasks` is the app's tracker of background tasks (the bounded reset writes run
    /// there, so shutdown waits for them); `wake_mail` tells the mail queue that a
    /// committed flow queued a mail.
    pub fn new(
        config: &Config,
        storage: Storage,
        clock: SharedClock,
        jwt_secret: &[u8],
        oauth: oauth::OAuthProviders,
        tasks: tokio_util::task::TaskTracker,
        wake_mail: mail::WakeMail,
    ) -> Auth {
        // Correctness comes from invalidation after each commit in this process; the TTL
        // bounds how long a change made by another process (the `warpbase user` CLI on
        // the same database) takes to apply.
        let cache_ttl = Duration::from_secs(30);
        Auth {
            inner: Arc::new(Inner {
                storage,
                clock,
                keys: JwtKeys::new(jwt_secret),
                access_ttl: config.auth.access_ttl,
                refresh_ttl: config.auth.refresh_ttl,
                hasher: password::PasswordHasher::new(),
                oauth,
                limiter: ratelimit::RateLimiter::new(
                    ratelimit::RatePolicy::new(config.auth.rate_limit, config.auth.rate_window),
                    100_000,
                ),
                backoff: ratelimit::FailureBackoff::new(
                    ratelimit::BackoffPolicy {
                        free_failures: config.auth.lockout_free_failures,
                        base_delay: config.auth.lockout_delay,
                        max_delay: config.auth.lockout_max_delay,
                    },
                    100_000,
                ),
                mail_limiter: ratelimit::RateLimiter::new(
                    ratelimit::RatePolicy::new(1, config.auth.mail_interval),
                    100_000,
                ),
                background: Arc::new(tokio::sync::Semaphore::new(MAX_BACKGROUND_WRITES)),
                user_states: Loaded::new(100_000, cache_ttl),
                sessions: Loaded::new(200_000, cache_ttl),
                profiles: Loaded::new(100_000, cache_ttl),
                changes: tokio::sync::broadcast::channel(1024).0,
                public_base: config.public_base().to_string(),
                mail_from: config.mail.from.clone(),
                refresh_reuse_window: config.auth.refresh_reuse_window,
                step_up_window: config.auth.step_up_window,
                tasks,
                wake_mail,
            }),
        }
    }

    fn now_millis(&self) -> i64 {
        self.inner.clock.now_millis()
    }

    /// Checks a bearer token: signature, expiry, session liveness, token version.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        Ok(self.authenticate_grant(token).await?.principal)
    }

    /// [`Auth::authenticate`], also returning what the token was bound to.
    pub async fn authenticate_grant(&self, token: &str) -> Result<Grant, AuthError> {
        let now = self.now_millis();
        let claims = self
            .inner
            .keys
            .verify(token, now / 1000)
            .map_err(|e| match e {
                TokenError::Expired => AuthError::TokenExpired,
                TokenError::Invalid => AuthError::Unauthorized,
            })?;
        let principal = self
            .check_live(&claims.sub, &claims.sid, claims.ver)
            .await?;
        Ok(Grant {
            principal,
            token_version: claims.ver,
            expires_at: claims.exp,
        })
    }

    /// Re-checks a grant taken earlier (an SSE ticket being redeemed) exactly as a bearer
    /// token is checked: not expired, session live, token version current, user enabled.
    pub async fn revalidate(&self, grant: &Grant) -> Result<Principal, AuthError> {
        if grant.expires_at <= self.now_millis() / 1000 {
            return Err(AuthError::TokenExpired);
        }
        let p = &grant.principal;
        self.check_live(&p.user_id, &p.session_id, grant.token_version)
            .await
    }

    /// Session liveness and token version through the revocation caches.
    async fn check_live(
        &self,
        user_id: &str,
        session_id: &str,
        token_version: i64,
    ) -> Result<Principal, AuthError> {
        let state = self.user_state(user_id).await?;
        let Some(state) = state else {
            return Err(AuthError::Unauthorized);
        };
        if state.disabled || state.token_version != token_version {
            return Err(AuthError::SessionRevoked);
        }
        match self.session_state(session_id).await? {
            Some((owner, true)) if owner == user_id => {}
            Some(_) => return Err(AuthError::SessionRevoked),
            None => return Err(AuthError::Unauthorized),
        }
        Ok(Principal {
            user_id: user_id.to_string(),
            session_id: session_id.to_string(),
            is_admin: state.is_admin,
        })
    }

    /// Receives every [`AuthChange`] announced from now on.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<AuthChange> {
        self.inner.changes.subscribe()
    }

    async fn user_state(&self, user_id: &str) -> Result<Option<UserAuthState>, AuthError> {
        if let Some(s) = self.inner.user_states.get(user_id) {
            return Ok(Some(s));
        }
        let ticket = self.inner.user_states.ticket(user_id);
        let id = user_id.to_string();
        let state = self
            .inner
            .storage
            .read(move |c| users::user_auth_state(c, &id))
            .await?;
        if let Some(s) = state {
            self.inner
                .user_states
                .insert(user_id.to_string(), s, ticket);
        }
        Ok(state)
    }

    async fn session_state(&self, sid: &str) -> Result<Option<(String, bool)>, AuthError> {
        if let Some(s) = self.inner.sessions.get(sid) {
            return Ok(Some(s));
        }
        let ticket = self.inner.sessions.ticket(sid);
        let id = sid.to_string();
        let state = self
            .inner
            .storage
            .read(move |c| users::session_live(c, &id))
            .await?;
        if let Some(s) = &state {
            self.inner
                .sessions
                .insert(sid.to_string(), s.clone(), ticket);
        }
        Ok(state)
    }

    /// Forget cached state after a commit changed the user (version, role, disabled,
    /// email verification, identities).
    pub async fn invalidate_user(&self, user_id: &str) {
        self.inner.user_states.invalidate(user_id);
        self.inner.profiles.invalidate(user_id);
        let _ = self
            .inner
            .changes
            .send(AuthChange::User(user_id.to_string()));
    }

    /// Forget every cached user, session and profile: another process (the `warpbase
    /// user` CLI) changed users, and which ones is not known here.
    pub fn invalidate_all(&self) {
        self.inner.user_states.invalidate_all();
        self.inner.sessions.invalidate_all();
        self.inner.profiles.invalidate_all();
    }

    /// Forget cached liveness after a commit revoked these sessions.
    pub async fn invalidate_sessions(&self, ids: &[String]) {
        for id in ids {
            self.inner.sessions.invalidate(id);
        }
        if !ids.is_empty() {
            let _ = self.inner.changes.send(AuthChange::Sessions(ids.to_vec()));
        }
    }

    /// The cached profile of `user_id`, if any; on a miss take [`Auth::profile_ticket`]
    /// before the read and hand the result to [`Auth::cache_profile`].
    pub fn cached_profile(&self, user_id: &str) -> Option<Arc<Profile>> {
        self.inner.profiles.get(user_id)
    }

    pub fn profile_ticket(&self, user_id: &str) -> crate::cache::Ticket {
        self.inner.profiles.ticket(user_id)
    }

    pub fn cache_profile(&self, profile: Arc<Profile>, ticket: crate::cache::Ticket) {
        self.inner
            .profiles
            .insert(profile.id.clone(), profile, ticket);
    }

    /// Mints an access token for an existing session.
    pub fn access_token(&self, user_id: &str, session_id: &str, token_version: i64) -> String {
        let now = self.now_millis() / 1000;
        self.inner.keys.issue(&Claims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            ver: token_version,
            iat: now,
            exp: now + self.inner.access_ttl.as_secs() as i64,
        })
    }

    /// Starts a new session for a signed-in user: stores the refresh token's hash and
    /// returns the token pair. Runs inside the caller's write transaction (`conn`), so the
    /// session commits together with whatever signed the user in.
    pub fn create_session_in(
        &self,
        conn: &crate::storage::Conn,
        user_id: &str,
        token_version: i64,
        user_agent: Option<&str>,
        ip: Option<&str>,
    ) -> Result<TokenPair, StorageError> {
        let now = self.now_millis();
        let session_id = crate::ids::new_id();
        let refresh = tokens::random_token();
        users::insert_session(
            conn,
            &NewSession {
                id: &session_id,
                user_id,
                refresh_hash: &tokens::hash_token(&refresh),
                refresh_expires_at: now + self.inner.refresh_ttl.as_millis() as i64,
                user_agent,
                ip,
                now,
            },
        )?;
        Ok(self.token_pair(user_id, &session_id, token_version, refresh))
    }

    pub fn token_pair(
        &self,
        user_id: &str,
        session_id: &str,
        token_version: i64,
        refresh_token: String,
    ) -> TokenPair {
        TokenPair {
            access_token: self.access_token(user_id, session_id, token_version),
            token_type: "Bearer",
            expires_in: self.inner.access_ttl.as_secs(),
            refresh_token,
            refresh_expires_in: self.inner.refresh_ttl.as_secs(),
        }
    }

    pub fn oauth(&self) -> &oauth::OAuthProviders {
        &self.inner.oauth
    }

    pub fn hasher(&self) -> &password::PasswordHasher {
        &self.inner.hasher
    }

    /// The per-IP limiter of the unauthenticated auth routes (keys `ip:`, `ip-token:`).
    pub fn limiters(&self) -> &ratelimit::RateLimiter {
        &self.inner.limiter
    }

    /// The sign-in failure backoff, keyed by (email, client network).
    pub fn backoff(&self) -> &ratelimit::FailureBackoff {
        &self.inner.backoff
    }

    /// A slot for a background write, or `None` when [`MAX_BACKGROUND_WRITES`] are
    /// pending (the request is then dropped, not queued without bound).
    pub fn try_background(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.background.clone().try_acquire_owned().ok()
    }

    /// At most one mail per address and `auth.mail_interval` (keys `verify:`, `reset:`).
    pub fn mail_limiter(&self) -> &ratelimit::RateLimiter {
        &self.inner.mail_limiter
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }
}
