//! The account flows: register, login, refresh rotation with reuse detection, logout,
//! password change and reset, email verification, sessions. No HTTP here.
//!
//! Every flow that changes who may act commits its whole effect (user row, sessions,
//! token version, audit entry, outgoing mail job) in ONE write, then invalidates the auth
//! caches, so a revoked token fails on the very next request.

use std::time::Duration;

use super::password::{normalize_email, validate_new_password};
use super::tokens::{hash_token, random_token};
use super::{Auth, AuthError, Principal, TokenPair};
use crate::storage::auth::{self as sa, AuditEntry};
use crate::storage::users::{self, NewUser, UserRow};
use crate::storage::{Conn, StorageError};

/// Who is calling, for sessions, rate limits and the audit log.
#[derive(Debug, Clone, Default)]
pub struct Client {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

const RESET_TTL: Duration = Duration::from_secs(3600);
const VERIFY_TTL: Duration = Duration::from_secs(24 * 3600);

fn audit(
    conn: &Conn,
    user: Option<&str>,
    event: &str,
    client: &Client,
    detail: Option<&str>,
    now: i64,
) -> Result<(), StorageError> {
    sa::audit(
        conn,
        &AuditEntry {
            user_id: user,
            event,
            ip: client.ip.as_deref(),
            user_agent: client.user_agent.as_deref(),
            detail,
        },
        now,
    )
}

/// Inserts a new account (registration and the operator's `user create`); an address
/// that already has one is [`AuthError::EmailTaken`].
pub(super) fn insert_account_in(c: &Conn, user: &NewUser<'_>) -> Result<UserRow, AuthError> {
    users::insert_user(c, user).map_err(|e| {
        if e.is_unique_violation() {
            AuthError::EmailTaken
        } else {
            e.into()
        }
    })
}

/// warpbase has just proved the account's address (reset or verification mail): the
/// identities linked while it was unverified may belong to whoever registered the address
/// first, so they are removed, the owner is told by mail, and the removal is audited.
/// Returns whether anything was removed (the caller then revokes sessions and notifies
/// the mail queue after commit).
fn drop_unverified_identities(
    c: &Conn,
    uid: &str,
    from: &str,
    client: &Client,
    now: i64,
) -> Result<bool, AuthError> {
    let removed = sa::remove_unverified_identities(c, uid)?;
    if removed.is_empty() {
        return Ok(false);
    }
    let user = users::get_user(c, uid)?.ok_or(AuthError::Unauthorized)?;
    let list = removed.join(", ");
    audit(
        c,
        Some(uid),
        "identities_removed_on_verification",
        client,
        Some(&list),
        now,
    )?;
    crate::mail::enqueue_in(
        c,
        &crate::mail::Mail {
            to: user.email,
            from: from.to_string(),
            subject: "Sign-in providers removed from your account".into(),
            body: format!(
                "Your email address was just confirmed. These sign-in providers had been \
                 linked to the account before the address was confirmed, so they may not \
                 have been yours, and were removed: {list}.\n\nIf they were yours, sign \
                 in and link them again from your account page."
            ),
        },
        now,
    )?;
    Ok(true)
}

/// The per-IP buckets: credential routes (register, login, password reset, password
/// change) and token routes (refresh, OAuth exchange, email verification). Separate, so a
/// guessing flood from an address does not also stop its signed-in users' refreshes.
pub(super) const IP_CREDENTIALS: &str = "ip";
pub(super) const IP_TOKENS: &str = "ip-token";

/// The key of sign-in failure counting: the account and the caller's network. Keyed by
/// both, failures from elsewhere never delay the owner.
fn lockout_key(email: &str, client: &Client) -> String {
    format!(
        "{email} {}",
        crate::ratelimit::client_network(client.ip.as_deref())
    )
}

enum RefreshOutcome {
    Rotated(TokenPair, UserRow),
    Reused {
        revoked: Vec<String>,
        user_id: String,
    },
    Forgiven,
    Invalid,
}

const RESET_PURPOSE: &str = "password_reset";

/// The write of a password reset: consumes the token, sets the password, uses up every
/// other pending reset link of the user, drops identities linked while the address was
/// unverified, revokes every session. Returns the user, the revoked sessions and whether
/// a mail was queued.
fn apply_password_reset(
    c: &Conn,
    token_hash: &[u8],
    phc: &str,
    from: &str,
    client: &Client,
    now: i64,
) -> Result<(String, Vec<String>, bool), AuthError> {
    let uid = sa::consume_one_time_token(c, token_hash, RESET_PURPOSE, now)?
        .ok_or(AuthError::InvalidGrant)?;
    sa::set_password(c, &uid, phc, now)?;
    sa::use_up_one_time_tokens(c, &uid, RESET_PURPOSE, now)?;
    // Receiving the mail proves the address, which drops identities linked before it.
    sa::set_email_verified(c, &uid, now)?;
    let mailed = drop_unverified_identities(c, &uid, from, client, now)?;
    users::bump_token_version(c, &uid, now)?;
    let revoked = users::revoke_user_sessions(c, &uid, None, "password_reset", now)?;
    audit(c, Some(&uid), "password_reset", client, None, now)?;
    Ok((uid, revoked, mailed))
}

impl Auth {
    /// At most `auth.rate_limit` requests per `auth.rate_window` per client IP and bucket.
    pub(super) fn limit_ip(&self, client: &Client, bucket: &str) -> Result<(), AuthError> {
        if let Some(ip) = &client.ip {
            self.limiters()
                .check(&format!("{bucket}:{ip}"))
                .map_err(AuthError::RateLimited)?;
        }
        Ok(())
    }

    /// Refuses an attempt while its (email, network) is in a failure delay.
    fn check_lockout(&self, key: &str) -> Result<(), AuthError> {
        self.backoff().check(key).map_err(AuthError::RateLimited)
    }

    pub async fn register(
        &self,
        client: &Client,
        email: &str,
        password: String,
        name: Option<String>,
    ) -> Result<(TokenPair, UserRow), AuthError> {
        let email = normalize_email(email).map_err(AuthError::Invalid)?;
        self.limit_ip(client, IP_CREDENTIALS)?;
        validate_new_password(&password).map_err(AuthError::Invalid)?;
        if let Some(n) = &name
            && n.chars().count() > 200
        {
            return Err(AuthError::Invalid(
                "name must be at most 200 characters".into(),
            ));
        }
        let phc = self.hasher().hash(password).await?;
        let now = self.now_millis();
        let auth = self.clone();
        let client2 = client.clone();
        let verify_token = random_token();
        let verify_hash = hash_token(&verify_token);
        let link = format!("{}/#/verify?token={verify_token}", self.inner.public_base);
        let mail_from = self.inner.mail_from.clone();
        let (pair, user) = self.inner.storage
        .write(move |c| {
            let id = crate::ids::new_id_at(now);
            let user = insert_account_in(
                c,
                &NewUser {
                    id: &id,
                    email: &email,
                    email_verified: false,
                    name: name.as_deref(),
                    password_hash: Some(&phc),
                    role: None,
                    now,
                },
            )?;
            let pair = auth.create_session_in(
                c,
                &user.id,
                user.token_version,
                client2.user_agent.as_deref(),
                client2.ip.as_deref(),
            )?;
            audit(c, Some(&user.id), "register", &client2, None, now)?;
            sa::insert_one_time_token(c, &verify_hash, "verify_email", &user.id, now + VERIFY_TTL.as_millis() as i64, now)?;
            crate::mail::enqueue_in(
                c,
                &crate::mail::Mail {
                    to: user.email.clone(),
                    from: mail_from,
                    subject: "Confirm your email address".into(),
                    body: format!("Welcome to warpbase.\n\nConfirm your email address by opening:\n{link}\n\nThe link is valid for 24 hours."),
                },
                now,
            )?;
            Ok::<_, AuthError>((pair, user))
        })
        .await?;
        self.inner.wake_mail.wake();
        Ok((pair, user))
    }

    pub async fn login(
        &self,
        client: &Client,
        email: &str,
        password: String,
    ) -> Result<(TokenPair, UserRow), AuthError> {
        // A malformed email is just a failed login: no hint about what is wrong.
        let email = normalize_email(email).unwrap_or_else(|_| email.trim().to_lowercase());
        self.limit_ip(client, IP_CREDENTIALS)?;
        let lockout = lockout_key(&email, client);
        self.check_lockout(&lockout)?;
        if password.len() > super::password::MAX_PASSWORD_BYTES {
            self.backoff().failure(&lockout);
            return Err(AuthError::InvalidCredentials);
        }
        let lookup = email.clone();
        let user = self
            .inner
            .storage
            .read(move |c| users::get_user_by_email(c, &lookup))
            .await?;
        let phc = user.as_ref().and_then(|u| u.password_hash.clone());
        let ok = self.hasher().verify(password.clone(), phc.clone()).await?;
        let now = self.now_millis();
        let user = match user {
            Some(u) if ok && !u.disabled => u,
            other => {
                self.backoff().failure(&lockout);
                let uid = other.map(|u| u.id);
                let client2 = client.clone();
                self.inner
                    .storage
                    .write(move |c| audit(c, uid.as_deref(), "login_failed", &client2, None, now))
                    .await?;
                return Err(AuthError::InvalidCredentials);
            }
        };
        // Upgrade hashes made with weaker parameters while we hold the plaintext.
        let rehash = match &phc {
            Some(p) if super::password::needs_rehash(p) => self.hasher().hash(password).await.ok(),
            _ => None,
        };
        let auth = self.clone();
        let client2 = client.clone();
        let uid = user.id.clone();
        let pair = self
            .inner
            .storage
            .write(move |c| {
                if let Some(phc) = &rehash {
                    sa::set_password(c, &uid, phc, now)?;
                }
                let fresh = users::get_user(c, &uid)?.ok_or(AuthError::InvalidCredentials)?;
                let pair = auth.create_session_in(
                    c,
                    &uid,
                    fresh.token_version,
                    client2.user_agent.as_deref(),
                    client2.ip.as_deref(),
                )?;
                audit(c, Some(&uid), "login", &client2, None, now)?;
                Ok::<_, AuthError>(pair)
            })
            .await?;
        self.backoff().reset(&lockout);
        Ok((pair, user))
    }

    /// Rotates a refresh token. Presenting a token that was already rotated away means it
    /// leaked or raced: the whole session is revoked (unless within `refresh_reuse_window`,
    /// where the request is refused but the session kept).
    pub async fn refresh(
        &self,
        client: &Client,
        token: &str,
    ) -> Result<(TokenPair, UserRow), AuthError> {
        self.limit_ip(client, IP_TOKENS)?;
        if token.is_empty() || token.len() > 256 {
            return Err(AuthError::InvalidGrant);
        }
        let old_hash = hash_token(token);
        let now = self.now_millis();
        let ttl = self.inner.refresh_ttl.as_millis() as i64;
        let window = self.inner.refresh_reuse_window.as_millis() as i64;
        let auth = self.clone();
        let client2 = client.clone();
        let outcome = self
            .inner
            .storage
            .write(move |c| -> Result<RefreshOutcome, AuthError> {
                if let Some(t) = sa::session_by_refresh(c, &old_hash)? {
                    if t.revoked {
                        return Ok(RefreshOutcome::Invalid);
                    }
                    if t.expires_at <= now {
                        return Ok(RefreshOutcome::Invalid);
                    }
                    let user = users::get_user(c, &t.user_id)?.ok_or(AuthError::InvalidGrant)?;
                    if user.disabled {
                        return Ok(RefreshOutcome::Invalid);
                    }
                    let new = random_token();
                    sa::rotate_refresh(
                        c,
                        &sa::Rotation {
                            session_id: &t.session_id,
                            old_hash: &old_hash,
                            new_hash: &hash_token(&new),
                            expires_at: now + ttl,
                            ip: client2.ip.as_deref(),
                            user_agent: client2.user_agent.as_deref(),
                        },
                        now,
                    )?;
                    let pair = auth.token_pair(&user.id, &t.session_id, user.token_version, new);
                    return Ok(RefreshOutcome::Rotated(pair, user));
                }
                if let Some((sid, uid, rotated_at)) = sa::rotated_refresh(c, &old_hash)? {
                    if window > 0 && now - rotated_at <= window {
                        audit(
                            c,
                            Some(&uid),
                            "refresh_reuse_forgiven",
                            &client2,
                            Some(&sid),
                            now,
                        )?;
                        return Ok(RefreshOutcome::Forgiven);
                    }
                    let revoked = users::revoke_user_sessions_one(c, &sid, "refresh_reused", now)?;
                    audit(c, Some(&uid), "refresh_reused", &client2, Some(&sid), now)?;
                    return Ok(RefreshOutcome::Reused {
                        revoked,
                        user_id: uid,
                    });
                }
                Ok(RefreshOutcome::Invalid)
            })
            .await?;
        match outcome {
            RefreshOutcome::Rotated(pair, user) => Ok((pair, user)),
            RefreshOutcome::Reused { revoked, user_id } => {
                self.invalidate_sessions(&revoked).await;
                self.invalidate_user(&user_id).await;
                Err(AuthError::RefreshReused)
            }
            RefreshOutcome::Forgiven => Err(AuthError::RefreshReused),
            RefreshOutcome::Invalid => Err(AuthError::InvalidGrant),
        }
    }

    pub async fn logout(&self, who: &Principal, client: &Client) -> Result<(), AuthError> {
        let now = self.now_millis();
        let sid = who.session_id.clone();
        let uid = who.user_id.clone();
        let client2 = client.clone();
        self.inner
            .storage
            .write(move |c| {
                users::revoke_session(c, &sid, "logout", now)?;
                audit(c, Some(&uid), "logout", &client2, None, now)?;
                Ok::<_, AuthError>(())
            })
            .await?;
        self.invalidate_sessions(std::slice::from_ref(&who.session_id))
            .await;
        Ok(())
    }

    /// Ends every session and access token of the user at once.
    pub async fn logout_all(&self, who: &Principal, client: &Client) -> Result<(), AuthError> {
        let now = self.now_millis();
        let uid = who.user_id.clone();
        let client2 = client.clone();
        let revoked = self
            .inner
            .storage
            .write(move |c| {
                users::bump_token_version(c, &uid, now)?;
                let ids = users::revoke_user_sessions(c, &uid, None, "logout_all", now)?;
                audit(c, Some(&uid), "logout_all", &client2, None, now)?;
                Ok::<_, AuthError>(ids)
            })
            .await?;
        self.invalidate_user(&who.user_id).await;
        self.invalidate_sessions(&revoked).await;
        Ok(())
    }

    /// Changes the password; every other session and every earlier access token stop
    /// working. Returns fresh tokens for the calling client (its session continues).
    pub async fn change_password(
        &self,
        who: &Principal,
        client: &Client,
        current: String,
        new: String,
    ) -> Result<(TokenPair, UserRow), AuthError> {
        validate_new_password(&new).map_err(AuthError::Invalid)?;
        let uid = who.user_id.clone();
        let sid = who.session_id.clone();
        let (user, auth_time) = self
            .inner
            .storage
            .read(move |c| {
                let user = users::get_user(c, &uid)?;
                Ok::<_, StorageError>((user, users::session_auth_time(c, &sid)?))
            })
            .await?;
        let user = user.ok_or(AuthError::Unauthorized)?;
        if user.password_hash.is_none() {
            // No current password to prove: a first password needs a recent sign-in instead,
            // so that a leaked or left-behind access token cannot take over the account.
            let window = self.inner.step_up_window.as_millis() as i64;
            if auth_time.is_none_or(|t| self.now_millis() - t > window) {
                return Err(AuthError::StepUpRequired);
            }
        } else {
            self.limit_ip(client, IP_CREDENTIALS)?;
            let lockout = lockout_key(&user.email, client);
            self.check_lockout(&lockout)?;
            if !self
                .hasher()
                .verify(current, user.password_hash.clone())
                .await?
            {
                self.backoff().failure(&lockout);
                return Err(AuthError::InvalidCredentials);
            }
        }
        let phc = self.hasher().hash(new).await?;
        let now = self.now_millis();
        let ttl = self.inner.refresh_ttl.as_millis() as i64;
        let auth = self.clone();
        let client2 = client.clone();
        let uid = who.user_id.clone();
        let sid = who.session_id.clone();
        let (pair, revoked, user) = self
            .inner
            .storage
            .write(move |c| {
                sa::set_password(c, &uid, &phc, now)?;
                // A reset link mailed before the change must not undo it.
                sa::use_up_one_time_tokens(c, &uid, RESET_PURPOSE, now)?;
                let version = users::bump_token_version(c, &uid, now)?;
                let revoked =
                    users::revoke_user_sessions(c, &uid, Some(&sid), "password_changed", now)?;
                // The calling client keeps its session but gets a new refresh token too.
                let new = random_token();
                let current =
                    sa::current_refresh_hash(c, &sid)?.ok_or(AuthError::SessionRevoked)?;
                sa::rotate_refresh(
                    c,
                    &sa::Rotation {
                        session_id: &sid,
                        old_hash: &current,
                        new_hash: &hash_token(&new),
                        expires_at: now + ttl,
                        ip: client2.ip.as_deref(),
                        user_agent: client2.user_agent.as_deref(),
                    },
                    now,
                )?;
                audit(c, Some(&uid), "password_changed", &client2, None, now)?;
                let user = users::get_user(c, &uid)?.ok_or(AuthError::Unauthorized)?;
                Ok::<_, AuthError>((auth.token_pair(&uid, &sid, version, new), revoked, user))
            })
            .await?;
        self.invalidate_user(&who.user_id).await;
        self.invalidate_sessions(&revoked).await;
        Ok((pair, user))
    }

    /// Always succeeds (no account enumeration); mails a one-time link if the account exists.
    ///
    /// The answer depends on nothing that differs between known and unknown addresses: after
    /// the in-memory limits it returns, and the lookup, token and mail are written in the
    /// background (bounded, see [`super::Auth::try_background`]). At most one mail per
    /// address per `auth.mail_interval`; later requests in it are answered the same and send
    /// nothing. Its own buckets (per IP, per address) are not the sign-in ones, so a throttled
    /// sign-in never closes recovery.
    pub async fn request_password_reset(
        &self,
        client: &Client,
        email: &str,
    ) -> Result<(), AuthError> {
        let Ok(email) = normalize_email(email) else {
            return Ok(());
        };
        self.limit_ip(client, IP_CREDENTIALS)?;
        if self
            .mail_limiter()
            .check(&format!("reset:{email}"))
            .is_err()
        {
            return Ok(());
        }
        let Some(permit) = self.try_background() else {
            tracing::warn!("too many password reset requests in flight; dropping one");
            return Ok(());
        };
        let token = random_token();
        let hash = hash_token(&token);
        let link = format!("{}/#/reset?token={token}", self.inner.public_base);
        let now = self.now_millis();
        let from = self.inner.mail_from.clone();
        let client2 = client.clone();
        let st = self.clone();
        self.inner.tasks.spawn(async move {
        let _permit = permit;
        let sent = st.inner.storage
            .write(move |c| {
                let Some(user) = users::get_user_by_email(c, &email)? else {
                    return Ok::<_, AuthError>(false);
                };
                sa::insert_one_time_token(c, &hash, RESET_PURPOSE, &user.id, now + RESET_TTL.as_millis() as i64, now)?;
                audit(c, Some(&user.id), "password_reset_requested", &client2, None, now)?;
                crate::mail::enqueue_in(
                    c,
                    &crate::mail::Mail {
                        to: user.email,
                        from,
                        subject: "Reset your password".into(),
                        body: format!("Someone asked to reset the password of this account.\n\nTo choose a new password, open:\n{link}\n\nThe link is valid for one hour. If it was not you, ignore this mail."),
                    },
                    now,
                )?;
                Ok(true)
            })
            .await;
        match sent {
            Ok(true) => st.inner.wake_mail.wake(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "a password reset request was not recorded"),
        }
    });
        Ok(())
    }

    /// Sets a new password from a reset token; every session of the user is revoked.
    ///
    /// The token is checked (a read) before the new password is hashed, so a made-up token
    /// costs no argon2; the write then consumes it for real (single use holds even if two
    /// requests raced past the check).
    pub async fn reset_password(
        &self,
        client: &Client,
        token: &str,
        new: String,
    ) -> Result<(), AuthError> {
        self.limit_ip(client, IP_CREDENTIALS)?;
        if token.is_empty() || token.len() > 256 {
            return Err(AuthError::InvalidGrant);
        }
        validate_new_password(&new).map_err(AuthError::Invalid)?;
        let hash = hash_token(token);
        let now = self.now_millis();
        let probe = hash.clone();
        self.inner
            .storage
            .read(move |c| sa::peek_one_time_token(c, &probe, RESET_PURPOSE, now))
            .await?
            .ok_or(AuthError::InvalidGrant)?;
        let phc = self.hasher().hash(new).await?;
        let client2 = client.clone();
        let from = self.inner.mail_from.clone();
        let (uid, revoked, mailed) = self
            .inner
            .storage
            .write(move |c| apply_password_reset(c, &hash, &phc, &from, &client2, now))
            .await?;
        if mailed {
            self.inner.wake_mail.wake();
        }
        self.invalidate_user(&uid).await;
        self.invalidate_sessions(&revoked).await;
        Ok(())
    }

    /// Mails a verification link, at most once per `auth.mail_interval` (later requests in
    /// the interval succeed and send nothing).
    pub async fn request_verification(
        &self,
        who: &Principal,
        client: &Client,
    ) -> Result<(), AuthError> {
        self.limit_ip(client, IP_TOKENS)?;
        if self
            .mail_limiter()
            .check(&format!("verify:{}", who.user_id))
            .is_err()
        {
            return Ok(());
        }
        let token = random_token();
        let hash = hash_token(&token);
        let link = format!("{}/#/verify?token={token}", self.inner.public_base);
        let now = self.now_millis();
        let from = self.inner.mail_from.clone();
        let uid = who.user_id.clone();
        let sent = self.inner.storage
        .write(move |c| {
            let user = users::get_user(c, &uid)?.ok_or(AuthError::Unauthorized)?;
            if user.email_verified {
                return Ok::<_, AuthError>(false);
            }
            sa::insert_one_time_token(c, &hash, "verify_email", &uid, now + VERIFY_TTL.as_millis() as i64, now)?;
            crate::mail::enqueue_in(
                c,
                &crate::mail::Mail {
                    to: user.email,
                    from,
                    subject: "Confirm your email address".into(),
                    body: format!("Confirm your email address by opening:\n{link}\n\nThe link is valid for 24 hours."),
                },
                now,
            )?;
            Ok(true)
        })
        .await?;
        if sent {
            self.inner.wake_mail.wake();
        }
        Ok(())
    }

    pub async fn verify_email(&self, client: &Client, token: &str) -> Result<(), AuthError> {
        self.limit_ip(client, IP_TOKENS)?;
        let hash = hash_token(token);
        let now = self.now_millis();
        let from = self.inner.mail_from.clone();
        let client2 = client.clone();
        let (uid, revoked) = self
            .inner
            .storage
            .write(move |c| {
                let uid = sa::consume_one_time_token(c, &hash, "verify_email", now)?
                    .ok_or(AuthError::InvalidGrant)?;
                sa::set_email_verified(c, &uid, now)?;
                // A session may have come from a removed identity: all of them end.
                let revoked = if drop_unverified_identities(c, &uid, &from, &client2, now)? {
                    users::bump_token_version(c, &uid, now)?;
                    users::revoke_user_sessions(c, &uid, None, "identity_removed", now)?
                } else {
                    Vec::new()
                };
                audit(c, Some(&uid), "email_verified", &client2, None, now)?;
                Ok::<_, AuthError>((uid, revoked))
            })
            .await?;
        if !revoked.is_empty() {
            self.inner.wake_mail.wake();
        }
        self.invalidate_user(&uid).await;
        self.invalidate_sessions(&revoked).await;
        Ok(())
    }

    /// While no admin exists: stores a new one-time setup token and returns it, for the
    /// start-up log (a restart replaces it). None once an admin exists.
    pub async fn prepare_admin_setup(&self) -> Result<Option<String>, StorageError> {
        let token = random_token();
        let hash = hex::encode(hash_token(&token));
        let now = self.now_millis();
        let stored = self
            .inner
            .storage
            .write(move |c| users::prepare_admin_setup(c, &hash, now))
            .await?;
        Ok(stored.then_some(token))
    }

    /// `POST /api/v1/admin/claim`: the signed-in caller becomes the first admin with the
    /// setup token from the start-up log. The token works once, and only while no admin
    /// exists; otherwise `invalid_grant`.
    pub async fn claim_admin(
        &self,
        who: &Principal,
        client: &Client,
        token: &str,
    ) -> Result<(), AuthError> {
        let hash = hex::encode(hash_token(token));
        let now = self.now_millis();
        let uid = who.user_id.clone();
        let client = client.clone();
        self.inner
            .storage
            .write(move |c| {
                if !users::claim_admin(c, &uid, &hash, now)? {
                    return Err(AuthError::InvalidGrant);
                }
                audit(c, Some(&uid), "admin_claimed", &client, None, now)?;
                Ok::<_, AuthError>(())
            })
            .await?;
        self.invalidate_user(&who.user_id).await;
        Ok(())
    }

    pub async fn revoke_session(
        &self,
        who: &Principal,
        client: &Client,
        session_id: &str,
    ) -> Result<(), AuthError> {
        let now = self.now_millis();
        let sid = session_id.to_string();
        let uid = who.user_id.clone();
        let client2 = client.clone();
        let found = self
            .inner
            .storage
            .write(move |c| {
                match users::session_live(c, &sid)? {
                    Some((owner, true)) if owner == uid => {}
                    _ => return Ok::<_, AuthError>(false),
                }
                users::revoke_session(c, &sid, "revoked_by_user", now)?;
                audit(c, Some(&uid), "session_revoked", &client2, Some(&sid), now)?;
                Ok(true)
            })
            .await?;
        if !found {
            return Err(AuthError::NotFound);
        }
        self.invalidate_sessions(&[session_id.to_string()]).await;
        Ok(())
    }
}
