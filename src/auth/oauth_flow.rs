//! OAuth sign-in, linking and unlinking on top of [`super::oauth`] (docs/API.md
//! "Accounts"): the authorize step stores `state` → (provider, PKCE verifier, nonce, link
//! user) for ten minutes; the callback takes that row (single use), asks the provider who
//! signed in, and decides in ONE write which account that is, creating a 60-second
//! single-use exchange code; the exchange turns that code into a session.
//!
//! Must not: import axum (routes.rs turns outcomes into redirects and problems), put an
//! access or refresh token into a URL (only the hashed-at-rest exchange code travels
//! there), or link an identity to an existing account by email unless BOTH the provider
//! and the account say the address is verified.

use std::time::Duration;

use super::oauth::{AuthStart, OAuthError, ProviderIdentity};
use super::service::Client;
use super::tokens::{hash_token, random_token};
use super::{Auth, AuthError, Principal, TokenPair};
use crate::storage::auth::{self as sa, AuditEntry, IdentityRow, OAuthState};
use crate::storage::users::{self, NewUser, UserRow};
use crate::storage::{Conn, StorageError};

/// How long a started authorization may take at the provider.
pub const STATE_TTL: Duration = Duration::from_secs(600);
/// How long the UI has to exchange the code from the callback redirect.
pub const EXCHANGE_TTL: Duration = Duration::from_secs(60);
const EXCHANGE_PURPOSE: &str = "oauth_exchange";
const MAX_NAME_CHARS: usize = 200;

/// The browser-binding cookie on an https public URL. Browsers accept a `__Host-` cookie
/// only with `Secure`, `Path=/` and no `Domain`, which also keeps sibling subdomains from
/// planting one.
pub const BROWSER_COOKIE_SECURE: &str = "__Host-warpbase_oauth";
/// The same cookie on an http public URL (local development), where `Secure` and thus
/// the `__Host-` prefix are impossible.
pub const BROWSER_COOKIE_PLAIN: &str = "warpbase_oauth";

/// Ties an OAuth flow to the browser that started it (RFC 9700 §4.7.1, login CSRF): a
/// random value in an HttpOnly cookie whose SHA-256 is stored with the `state` and then
/// with the exchange code, and both the callback and the exchange require it.
#[derive(Debug, Clone)]
pub struct BrowserBinding {
    /// The cookie's value (a random token; secret).
    pub value: String,
}

impl BrowserBinding {
    /// Keeps the browser's current value (several tabs may sign in at once) when it looks
    /// like one of ours, else makes a new one.
    pub fn reuse_or_new(existing: Option<&str>) -> BrowserBinding {
        let value = existing
            .filter(|v| is_binding_value(v))
            .map(str::to_string)
            .unwrap_or_else(random_token);
        BrowserBinding { value }
    }

    /// The cookie's name for this public URL.
    pub fn cookie_name(public_url: &str) -> &'static str {
        if public_url.starts_with("https://") {
            BROWSER_COOKIE_SECURE
        } else {
            BROWSER_COOKIE_PLAIN
        }
    }

    /// The `Set-Cookie` value: lives as long as a state, sent on the provider's redirect
    /// back (a top-level GET, so `SameSite=Lax` suffices) and on same-origin fetches.
    pub fn set_cookie(&self, public_url: &str) -> String {
        let secure = if public_url.starts_with("https://") {
            "; Secure"
        } else {
            ""
        };
        format!(
            "{}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            Self::cookie_name(public_url),
            self.value,
            STATE_TTL.as_secs()
        )
    }
}

/// The shape of [`random_token`]: 32 bytes in unpadded base64url.
fn is_binding_value(v: &str) -> bool {
    v.len() == 43
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The binding value the request's `Cookie` header carries under `name`, if any.
pub fn binding_from_cookies<'a>(
    cookie_headers: impl Iterator<Item = &'a str>,
    name: &str,
) -> Option<String> {
    cookie_headers
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && is_binding_value(v))
        .map(|(_, v)| v.to_string())
}

fn same_browser(stored: Option<&[u8]>, presented: Option<&str>) -> bool {
    use subtle::ConstantTimeEq;
    match (stored, presented) {
        (Some(stored), Some(value)) => bool::from(stored.ct_eq(&hash_token(value))),
        _ => false,
    }
}

/// The stable codes of a failed callback, sent to `/#/auth/error?code=`.
pub mod codes {
    /// The `state` is unknown, expired, already used, or belongs to another provider.
    pub const INVALID_STATE: &str = "invalid_state";
    /// An account has the provider's email, but the two sides do not both vouch for it.
    pub const ACCOUNT_EXISTS: &str = "account_exists";
    /// Linking: this provider identity already belongs to another account.
    pub const IDENTITY_IN_USE: &str = "identity_in_use";
    /// Linking: the account already has a different identity at this provider.
    pub const ALREADY_LINKED: &str = "already_linked";
    /// The account the identity leads to is disabled.
    pub const ACCOUNT_DISABLED: &str = "account_disabled";
    /// The provider failed, refused the code, sent a bad ID token or no usable email.
    pub const PROVIDER_ERROR: &str = "provider_error";
    /// The user declined at the provider.
    pub const ACCESS_DENIED: &str = "access_denied";
    /// Our side failed (logged); trying again may help.
    pub const INTERNAL: &str = "internal";
}

/// Why a callback did not sign anyone in. `code` is one of [`codes`]; `detail` is a short
/// human sentence without secrets (it ends up in the browser's address bar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub detail: String,
}

impl Refusal {
    fn new(code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// What the provider appended to the callback URL.
#[derive(Debug, Clone, Default)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// The sign-in rule (docs/API.md "Linking rule"), inside the callback's write.
fn resolve_user(
    c: &Conn,
    id: &ProviderIdentity,
    link_user: Option<&str>,
    client: &Client,
    now: i64,
) -> Result<Result<UserRow, Refusal>, AuthError> {
    let known = sa::identity(c, &id.provider, &id.subject)?;
    let disabled = || {
        Ok(Err(Refusal::new(
            codes::ACCOUNT_DISABLED,
            "this account is disabled",
        )))
    };

    if let Some(link_uid) = link_user {
        // The state row cascades away with its user, so this is a race at most.
        let Some(user) = users::get_user(c, link_uid)? else {
            return Ok(Err(Refusal::new(
                codes::INVALID_STATE,
                "the account to link no longer exists",
            )));
        };
        if user.disabled {
            return disabled();
        }
        match known {
            Some(row) if row.user_id == user.id => {
                refresh_identity(c, id)?;
                return Ok(Ok(user));
            }
            Some(_) => {
                return Ok(Err(Refusal::new(
                    codes::IDENTITY_IN_USE,
                    format!(
                        "this {} account is already linked to another account",
                        id.provider
                    ),
                )));
            }
            None => {}
        }
        if has_provider(c, &user.id, &id.provider)? {
            return Ok(Err(Refusal::new(
                codes::ALREADY_LINKED,
                format!(
                    "another {} account is already linked; unlink it first",
                    id.provider
                ),
            )));
        }
        // The provider vouching for this very address proves it as well as our mail.
        let vouched = user.email_verified
            || (id.email_verified
                && id
                    .email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(&user.email)));
        link(c, id, &user.id, vouched, now)?;
        audit(
            c,
            Some(&user.id),
            "identity_linked",
            client,
            &id.provider,
            now,
        )?;
        return Ok(Ok(user));
    }

    if let Some(row) = known {
        let user = users::get_user(c, &row.user_id)?
            .ok_or_else(|| StorageError::Corrupt("identity without its user".into()))?;
        if user.disabled {
            return disabled();
        }
        refresh_identity(c, id)?;
        return Ok(Ok(user));
    }

    let Some(email) = id.email.as_deref() else {
        return Ok(Err(Refusal::new(
            codes::PROVIDER_ERROR,
            format!(
                "{} did not share an email address, so no account can be found or created; \
                 allow access to your email there, or sign in and link it from your account",
                id.provider
            ),
        )));
    };

    if let Some(user) = users::get_user_by_email(c, email)? {
        // Both must vouch for the address: an unverified side could be anyone's.
        if !(id.email_verified && user.email_verified) {
            return Ok(Err(Refusal::new(
                codes::ACCOUNT_EXISTS,
                "an account with this email exists; sign in to it and link this provider \
                 from your account page",
            )));
        }
        if user.disabled {
            return disabled();
        }
        if has_provider(c, &user.id, &id.provider)? {
            return Ok(Err(Refusal::new(
                codes::ACCOUNT_EXISTS,
                format!(
                    "the account with this email already uses another {} account",
                    id.provider
                ),
            )));
        }
        link(c, id, &user.id, true, now)?;
        let detail = format!("{} (automatic: verified email)", id.provider);
        audit(c, Some(&user.id), "identity_linked", client, &detail, now)?;
        return Ok(Ok(user));
    }

    // An address the provider has not verified could be anyone's: claiming it would let
    // whoever typed it in at the provider own the account its real owner registers later.
    if !id.email_verified {
        return Ok(Err(Refusal::new(
            codes::PROVIDER_ERROR,
            format!(
                "{} has not verified the email address {email}; verify your email at the \
                 provider first, then sign in again",
                id.provider
            ),
        )));
    }

    let name: Option<String> = id
        .name
        .as_deref()
        .map(|n| n.trim().chars().take(MAX_NAME_CHARS).collect());
    let uid = crate::ids::new_id_at(now);
    let user = users::insert_user(
        c,
        &NewUser {
            id: &uid,
            email,
            email_verified: true,
            name: name.as_deref(),
            password_hash: None,
            role: None,
            now,
        },
    )?;
    link(c, id, &user.id, true, now)?;
    audit(
        c,
        Some(&user.id),
        "identity_created",
        client,
        &id.provider,
        now,
    )?;
    Ok(Ok(user))
}

fn has_provider(c: &Conn, user_id: &str, provider: &str) -> Result<bool, StorageError> {
    Ok(sa::identities_of(c, user_id)?
        .iter()
        .any(|i| i.provider == provider))
}

/// `account_verified`: whether warpbase (or a verified provider) vouches for the account's
/// address now; an identity linked to an unverified account is removed once the address
/// is verified (the real owner may not be who linked it).
fn link(
    c: &Conn,
    id: &ProviderIdentity,
    user_id: &str,
    account_verified: bool,
    now: i64,
) -> Result<(), StorageError> {
    sa::insert_identity(
        c,
        &IdentityRow {
            provider: id.provider.clone(),
            subject: id.subject.clone(),
            user_id: user_id.to_string(),
            email: id.email.clone(),
            email_verified: id.email_verified,
        },
        !account_verified,
        now,
    )
}

fn refresh_identity(c: &Conn, id: &ProviderIdentity) -> Result<(), StorageError> {
    sa::update_identity_email(
        c,
        &id.provider,
        &id.subject,
        id.email.as_deref(),
        id.email_verified,
    )
}

fn audit(
    c: &Conn,
    user: Option<&str>,
    event: &str,
    client: &Client,
    detail: &str,
    now: i64,
) -> Result<(), StorageError> {
    sa::audit(
        c,
        &AuditEntry {
            user_id: user,
            event,
            ip: client.ip.as_deref(),
            user_agent: client.user_agent.as_deref(),
            detail: Some(detail),
        },
        now,
    )
}

/// Provider-sent text goes into our redirect only if short and plain.
fn printable(s: &str) -> &str {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok { s } else { "(unprintable)" }
}

impl Auth {
    /// `(id, display name)` of the enabled providers.
    pub fn providers(&self) -> Vec<(&'static str, String)> {
        self.oauth().enabled()
    }

    pub fn is_enabled(&self, provider: &str) -> bool {
        self.providers().iter().any(|(id, _)| *id == provider)
    }

    /// Starts an authorization at `provider` and returns the URL to send the browser to.
    /// With `link_to`, a successful callback attaches the identity to that signed-in user.
    pub async fn authorize_url(
        &self,
        provider: &str,
        link_to: Option<&Principal>,
        browser: &BrowserBinding,
    ) -> Result<String, AuthError> {
        if !self.is_enabled(provider) {
            return Err(AuthError::NotFound);
        }
        let AuthStart {
            url,
            state: csrf,
            pkce_verifier,
            nonce,
        } = self.oauth().start(provider).await.map_err(|e| match e {
            OAuthError::UnknownProvider(_) => AuthError::NotFound,
            other => {
                tracing::warn!(error = %other, "cannot start OAuth authorization");
                AuthError::OAuthProvider(other.to_string())
            }
        })?;
        let now = self.now_millis();
        let provider = provider.to_string();
        let link = link_to.map(|p| p.user_id.clone());
        let browser_hash = hash_token(&browser.value);
        self.inner
            .storage
            .write(move |c| {
                // States live ten minutes; dropping the stale ones here keeps the table at
                // what one window of sign-ins needs without a separate sweeper.
                sa::purge_expired(c, now)?;
                sa::insert_oauth_state(
                    c,
                    &OAuthState {
                        state: &csrf,
                        provider: &provider,
                        pkce_verifier: &pkce_verifier,
                        nonce: nonce.as_deref(),
                        link_user_id: link.as_deref(),
                        browser_hash: &browser_hash,
                        expires_at: now + STATE_TTL.as_millis() as i64,
                    },
                    now,
                )?;
                Ok::<_, AuthError>(())
            })
            .await?;
        Ok(url)
    }

    /// Finishes an authorization: on success returns the one-time exchange code (plaintext;
    /// only its hash is stored), bound to the same browser. `browser` is the binding cookie
    /// the request carried.
    pub async fn callback(
        &self,
        client: &Client,
        provider: &str,
        params: CallbackParams,
        browser: Option<&str>,
    ) -> Result<String, Refusal> {
        let internal = |e: AuthError| {
            tracing::error!(error = %e, "OAuth callback failed");
            Refusal::new(
                codes::INTERNAL,
                "the sign-in could not be completed; please try again",
            )
        };
        let Some(csrf) = params.state.filter(|s| !s.is_empty() && s.len() <= 512) else {
            return Err(Refusal::new(
                codes::INVALID_STATE,
                "the provider's answer carries no state",
            ));
        };
        let now = self.now_millis();
        // Taking the row deletes it: a replayed callback finds nothing.
        let taken = self
            .inner
            .storage
            .write(move |c| sa::take_oauth_state(c, &csrf, now))
            .await
            .map_err(|e| internal(e.into()))?;
        let Some(taken) = taken else {
            return Err(Refusal::new(
                codes::INVALID_STATE,
                "the sign-in expired or was already completed; please start again",
            ));
        };
        // Checked before anything else is believed: a callback URL carried to another
        // browser (login CSRF, or a victim opening an attacker's link flow) is spent here.
        if !same_browser(taken.browser_hash.as_deref(), browser) {
            return Err(Refusal::new(
                codes::INVALID_STATE,
                "the sign-in was started in another browser or window; please start again",
            ));
        }
        let Some(browser_hash) = browser.map(hash_token) else {
            return Err(Refusal::new(codes::INVALID_STATE, "no browser binding"));
        };
        let (stored_provider, verifier, nonce, link_user) = (
            taken.provider,
            taken.pkce_verifier,
            taken.nonce,
            taken.link_user_id,
        );
        if stored_provider != provider {
            return Err(Refusal::new(
                codes::INVALID_STATE,
                "the sign-in was started with another provider",
            ));
        }
        if let Some(error) = params.error {
            return Err(if error == "access_denied" {
                Refusal::new(
                    codes::ACCESS_DENIED,
                    "access was not granted at the provider",
                )
            } else {
                Refusal::new(
                    codes::PROVIDER_ERROR,
                    format!("the provider reported `{}`", printable(&error)),
                )
            });
        }
        let Some(code) = params.code.filter(|c| !c.is_empty()) else {
            return Err(Refusal::new(
                codes::PROVIDER_ERROR,
                "the provider sent no authorization code",
            ));
        };
        let identity = self
            .oauth()
            .finish(provider, code, verifier, nonce)
            .await
            .map_err(|e| {
                // OAuthError messages name the provider and the problem, never a secret.
                tracing::warn!(error = %e, "OAuth sign-in refused by the provider step");
                Refusal::new(codes::PROVIDER_ERROR, e.to_string())
            })?;
        let exchange = random_token();
        let exchange_hash = hash_token(&exchange);
        let client2 = client.clone();
        let outcome = self
            .inner
            .storage
            .write(move |c| {
                let user = match resolve_user(c, &identity, link_user.as_deref(), &client2, now)? {
                    Ok(user) => user,
                    Err(refusal) => {
                        // Committed on purpose: refused attempts belong in the audit trail.
                        let detail = format!("{}: {}", identity.provider, refusal.code);
                        audit(
                            c,
                            link_user.as_deref(),
                            "oauth_refused",
                            &client2,
                            &detail,
                            now,
                        )?;
                        return Ok(Err(refusal));
                    }
                };
                sa::insert_bound_token(
                    c,
                    &exchange_hash,
                    EXCHANGE_PURPOSE,
                    &user.id,
                    &browser_hash,
                    now + EXCHANGE_TTL.as_millis() as i64,
                    now,
                )?;
                audit(
                    c,
                    Some(&user.id),
                    "oauth_login",
                    &client2,
                    &identity.provider,
                    now,
                )?;
                Ok::<_, AuthError>(Ok(user.id))
            })
            .await
            .map_err(internal)?;
        // A sign-in may have linked or refreshed an identity (or verified the email).
        let user_id = outcome?;
        self.invalidate_user(&user_id).await;
        Ok(exchange)
    }

    /// Turns an exchange code from the callback redirect into a session for this client.
    pub async fn exchange(
        &self,
        client: &Client,
        code: &str,
        browser: Option<&str>,
    ) -> Result<(TokenPair, UserRow), AuthError> {
        self.limit_ip(client, super::service::IP_TOKENS)?;
        if code.is_empty() || code.len() > 256 {
            return Err(AuthError::InvalidGrant);
        }
        let browser_hash = browser.map(hash_token).ok_or(AuthError::InvalidState)?;
        let hash = hash_token(code);
        let now = self.now_millis();
        let auth = self.clone();
        let client2 = client.clone();
        self.inner
            .storage
            .write(move |c| {
                let uid = match sa::consume_bound_token(
                    c,
                    &hash,
                    EXCHANGE_PURPOSE,
                    &browser_hash,
                    now,
                )? {
                    sa::BoundToken::Consumed(uid) => uid,
                    sa::BoundToken::OtherBrowser => return Err(AuthError::InvalidState),
                    sa::BoundToken::Invalid => return Err(AuthError::InvalidGrant),
                };
                let user = users::get_user(c, &uid)?.ok_or(AuthError::InvalidGrant)?;
                if user.disabled {
                    return Err(AuthError::InvalidGrant);
                }
                let pair = auth.create_session_in(
                    c,
                    &user.id,
                    user.token_version,
                    client2.user_agent.as_deref(),
                    client2.ip.as_deref(),
                )?;
                audit(c, Some(&user.id), "login", &client2, "oauth", now)?;
                Ok((pair, user))
            })
            .await
    }

    /// Removes the caller's identity at `provider`. Refused when it is the account's only way
    /// to sign in. Unlinking is a security event: every other session of the user is revoked
    /// (one may have come from the identity being removed); the caller's session continues.
    pub async fn unlink(
        &self,
        who: &Principal,
        client: &Client,
        provider: &str,
    ) -> Result<(), AuthError> {
        let now = self.now_millis();
        let uid = who.user_id.clone();
        let sid = who.session_id.clone();
        let provider = provider.to_string();
        let client2 = client.clone();
        let revoked = self
            .inner
            .storage
            .write(move |c| {
                let user = users::get_user(c, &uid)?.ok_or(AuthError::Unauthorized)?;
                let identities = sa::identities_of(c, &uid)?;
                if !identities.iter().any(|i| i.provider == provider) {
                    return Err(AuthError::NotFound);
                }
                if user.password_hash.is_none() && identities.len() == 1 {
                    return Err(AuthError::LastLoginMethod(format!(
                        "{provider} is the only way to sign in to this account; set a password \
                         or link another provider first"
                    )));
                }
                sa::delete_identity(c, &uid, &provider)?;
                let revoked =
                    users::revoke_user_sessions(c, &uid, Some(&sid), "identity_unlinked", now)?;
                audit(c, Some(&uid), "identity_unlinked", &client2, &provider, now)?;
                Ok(revoked)
            })
            .await?;
        self.invalidate_sessions(&revoked).await;
        self.invalidate_user(&who.user_id).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn only_plain_provider_error_codes_are_echoed() {
        for (input, shown) in [
            ("server_error", "server_error"),
            ("temporarily_unavailable", "temporarily_unavailable"),
            ("", "(unprintable)"),
            ("<script>", "(unprintable)"),
            ("a b", "(unprintable)"),
            (&"x".repeat(65), "(unprintable)"),
        ] {
            assert_eq!(printable(input), shown, "{input:?}");
        }
    }
}
