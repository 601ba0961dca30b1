//! What the operator does to accounts from the command line (`warpbase user ...`), through
//! the same rules as the HTTP flows: addresses are normalised by
//! [`normalize_email`](super::password::normalize_email) (so the CLI cannot create a second
//! spelling of an address registration would refuse), passwords pass the registration
//! rules, accounts are inserted by the same code as registration, and every change is
//! audited with the user agent `cli`.
//!
//! The CLI is another process: it changes the database, and a running server notices
//! through its revocation backstop (within about a second, see `jobs/guard.rs`), not
//! through this process's caches.

use super::password::{normalize_email, validate_new_password};
use super::service::insert_account_in;
use super::{Auth, AuthError};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::storage::Storage;
use crate::storage::auth::{self as sa, AuditEntry};
use crate::storage::users::{self, NewUser, UserRow};

/// What the audit log records as the client of an operator's change.
const CLI: &str = "cli";

/// A change the operator makes to an existing account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountChange {
    Promote,
    Disable,
    Enable,
}

impl AccountChange {
    fn event(self) -> &'static str {
        match self {
            AccountChange::Promote => "user_promoted",
            AccountChange::Disable => "user_disabled",
            AccountChange::Enable => "user_enabled",
        }
    }
}

impl Auth {
    /// An `Auth` for the command line: no OAuth providers, no mail queue to wake (the
    /// server's dispatcher finds queued mail on its next poll), and a throwaway signing
    /// key, because no operator command issues or checks tokens.
    pub fn for_operator(
        config: &Config,
        storage: Storage,
        clock: SharedClock,
    ) -> Result<Auth, AuthError> {
        let key = crate::secrets::random_token();
        let oauth = super::oauth::OAuthProviders::new(
            &super::oauth::OAuthConfigs::default(),
            config.public_base(),
        )
        .map_err(|e| AuthError::OAuthProvider(e.to_string()))?;
        Ok(Auth::new(
            config,
            storage,
            clock,
            key.as_bytes(),
            oauth,
            tokio_util::task::TaskTracker::new(),
            crate::mail::WakeMail::none(),
        ))
    }

    /// Creates an account the operator vouches for: its address counts as verified.
    /// Without a password the user signs in with OAuth or sets one through a reset.
    pub async fn create_account(
        &self,
        email: &str,
        password: Option<String>,
        admin: bool,
    ) -> Result<UserRow, AuthError> {
        let email = normalize_email(email).map_err(AuthError::Invalid)?;
        let phc = match password {
            Some(p) => {
                validate_new_password(&p).map_err(AuthError::Invalid)?;
                Some(self.hasher().hash(p).await?)
            }
            None => None,
        };
        let now = self.now_millis();
        let role = if admin { "admin" } else { "user" };
        self.inner
            .storage
            .write(move |c| {
                let id = crate::ids::new_id_at(now);
                let user = insert_account_in(
                    c,
                    &NewUser {
                        id: &id,
                        email: &email,
                        email_verified: true,
                        name: None,
                        password_hash: phc.as_deref(),
                        role: Some(role),
                        now,
                    },
                )?;
                audit_cli(c, &user.id, "user_created", Some(role), now)?;
                Ok::<_, AuthError>(user)
            })
            .await
    }

    /// Promotes, disables or enables the account with this address. Disabling ends every
    /// session and access token of the user (its token version moves on).
    pub async fn change_account(
        &self,
        email: &str,
        change: AccountChange,
    ) -> Result<UserRow, AuthError> {
        let email = normalize_email(email).map_err(AuthError::Invalid)?;
        let now = self.now_millis();
        let user = self
            .inner
            .storage
            .write(move |c| {
                let user = users::get_user_by_email(c, &email)?.ok_or(AuthError::NotFound)?;
                match change {
                    AccountChange::Promote => users::set_role(c, &user.id, "admin", now)?,
                    AccountChange::Disable => users::set_disabled(c, &user.id, true, now)?,
                    AccountChange::Enable => users::set_disabled(c, &user.id, false, now)?,
                };
                audit_cli(c, &user.id, change.event(), None, now)?;
                Ok::<_, AuthError>(users::get_user(c, &user.id)?.unwrap_or(user))
            })
            .await?;
        self.invalidate_user(&user.id).await;
        Ok(user)
    }

    /// The account with this address, looked up by its normalised form.
    pub async fn account_by_email(&self, email: &str) -> Result<Option<UserRow>, AuthError> {
        let email = normalize_email(email).map_err(AuthError::Invalid)?;
        Ok(self
            .inner
            .storage
            .read(move |c| users::get_user_by_email(c, &email))
            .await?)
    }
}

fn audit_cli(
    c: &crate::storage::Conn,
    user_id: &str,
    event: &str,
    detail: Option<&str>,
    now: i64,
) -> Result<(), crate::storage::StorageError> {
    sa::audit(
        c,
        &AuditEntry {
            user_id: Some(user_id),
            event,
            ip: None,
            user_agent: Some(CLI),
            detail,
        },
        now,
    )
}
