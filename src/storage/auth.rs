//! Account rows beyond users and sessions: refresh rotation, identities, one-time tokens,
//! OAuth state, the audit log.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Millis, StorageError};

/// A session found by its current refresh token.
#[derive(Debug, Clone)]
pub struct RefreshTarget {
    pub session_id: String,
    pub user_id: String,
    pub expires_at: Millis,
    pub revoked: bool,
}

pub fn session_by_refresh(
    conn: &Connection,
    hash: &[u8],
) -> Result<Option<RefreshTarget>, StorageError> {
    Ok(conn
        .prepare_cached(
            "SELECT id, user_id, refresh_expires_at, revoked_at IS NOT NULL FROM sessions
             WHERE refresh_hash = ?1",
        )?
        .query_row([hash], |r| {
            Ok(RefreshTarget {
                session_id: r.get(0)?,
                user_id: r.get(1)?,
                expires_at: r.get(2)?,
                revoked: r.get(3)?,
            })
        })
        .optional()?)
}

/// The session and rotation time of a refresh token that was already rotated away.
pub fn rotated_refresh(
    conn: &Connection,
    hash: &[u8],
) -> Result<Option<(String, String, Millis)>, StorageError> {
    Ok(conn
        .prepare_cached(
            "SELECT h.session_id, s.user_id, h.rotated_at FROM refresh_history h
             JOIN sessions s ON s.id = h.session_id WHERE h.hash = ?1",
        )?
        .query_row([hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

/// A refresh rotation: the session's token `old_hash` becomes `new_hash`.
pub struct Rotation<'a> {
    pub session_id: &'a str,
    pub old_hash: &'a [u8],
    pub new_hash: &'a [u8],
    pub expires_at: Millis,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// Replaces a session's refresh token: the old hash goes to history.
pub fn rotate_refresh(
    conn: &Connection,
    r: &Rotation<'_>,
    now: Millis,
) -> Result<bool, StorageError> {
    let Rotation {
        session_id,
        old_hash,
        new_hash,
        expires_at,
        ip,
        user_agent,
    } = *r;
    let changed = conn
        .prepare_cached(
            "UPDATE sessions SET refresh_hash = ?3, refresh_expires_at = ?4, last_used_at = ?5,
                ip = COALESCE(?6, ip), user_agent = COALESCE(?7, user_agent)
         WHERE id = ?1 AND refresh_hash = ?2 AND revoked_at IS NULL",
        )?
        .execute(params![
            session_id, old_hash, new_hash, expires_at, now, ip, user_agent
        ])?;
    if changed == 1 {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO refresh_history (hash, session_id, rotated_at) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![old_hash, session_id, now])?;
    }
    Ok(changed == 1)
}

#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: String,
    pub created_at: Millis,
    pub last_used_at: Millis,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
}

pub fn live_sessions(
    conn: &Connection,
    user_id: &str,
    now: Millis,
) -> Result<Vec<SessionRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, created_at, last_used_at, user_agent, ip FROM sessions
         WHERE user_id = ?1 AND revoked_at IS NULL AND refresh_expires_at > ?2
         ORDER BY last_used_at DESC",
    )?;
    let rows = stmt
        .query_map(params![user_id, now], |r| {
            Ok(SessionRow {
                id: r.get(0)?,
                created_at: r.get(1)?,
                last_used_at: r.get(2)?,
                user_agent: r.get(3)?,
                ip: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn set_password(
    conn: &Connection,
    user_id: &str,
    phc: &str,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "UPDATE users SET password_hash = ?2, updated_at = ?3 WHERE id = ?1",
        params![user_id, phc, now],
    )?;
    Ok(())
}

pub fn set_email_verified(
    conn: &Connection,
    user_id: &str,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "UPDATE users SET email_verified = 1, updated_at = ?2 WHERE id = ?1",
        params![user_id, now],
    )?;
    Ok(())
}

pub fn insert_one_time_token(
    conn: &Connection,
    hash: &[u8],
    purpose: &str,
    user_id: &str,
    expires_at: Millis,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO one_time_tokens (hash, purpose, user_id, expires_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![hash, purpose, user_id, expires_at, now],
    )?;
    Ok(())
}

/// Marks a one-time token used and returns its user, if it exists, has this purpose, is
/// unused and unexpired. Single use is enforced by the conditional UPDATE.
pub fn consume_one_time_token(
    conn: &Connection,
    hash: &[u8],
    purpose: &str,
    now: Millis,
) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached(
            "UPDATE one_time_tokens SET used_at = ?3
             WHERE hash = ?1 AND purpose = ?2 AND used_at IS NULL AND expires_at > ?3
             RETURNING user_id",
        )?
        .query_row(params![hash, purpose, now], |r| r.get(0))
        .optional()?)
}

/// A one-time token that only the browser holding the binding cookie may redeem (the
/// OAuth exchange code).
pub fn insert_bound_token(
    conn: &Connection,
    hash: &[u8],
    purpose: &str,
    user_id: &str,
    browser_hash: &[u8],
    expires_at: Millis,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO one_time_tokens (hash, purpose, user_id, browser_hash, expires_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![hash, purpose, user_id, browser_hash, expires_at, now],
    )?;
    Ok(())
}

/// What redeeming a browser-bound token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundToken {
    /// Consumed; its user.
    Consumed(String),
    /// Live, but bound to another browser: left unused, so a foreign attempt cannot burn
    /// the real browser's code.
    OtherBrowser,
    /// Unknown, used, expired or of another purpose.
    Invalid,
}

pub fn consume_bound_token(
    conn: &Connection,
    hash: &[u8],
    purpose: &str,
    browser_hash: &[u8],
    now: Millis,
) -> Result<BoundToken, StorageError> {
    let consumed: Option<String> = conn
        .prepare_cached(
            "UPDATE one_time_tokens SET used_at = ?3
             WHERE hash = ?1 AND purpose = ?2 AND used_at IS NULL AND expires_at > ?3
               AND browser_hash = ?4
             RETURNING user_id",
        )?
        .query_row(params![hash, purpose, now, browser_hash], |r| r.get(0))
        .optional()?;
    if let Some(uid) = consumed {
        return Ok(BoundToken::Consumed(uid));
    }
    let live: Option<i64> = conn
        .prepare_cached(
            "SELECT 1 FROM one_time_tokens
             WHERE hash = ?1 AND purpose = ?2 AND used_at IS NULL AND expires_at > ?3",
        )?
        .query_row(params![hash, purpose, now], |r| r.get(0))
        .optional()?;
    Ok(if live.is_some() {
        BoundToken::OtherBrowser
    } else {
        BoundToken::Invalid
    })
}

/// The user of a one-time token that [`consume_one_time_token`] would accept now, without
/// using it up (a read: checks a token before paying for work that needs it).
pub fn peek_one_time_token(
    conn: &Connection,
    hash: &[u8],
    purpose: &str,
    now: Millis,
) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached(
            "SELECT user_id FROM one_time_tokens
             WHERE hash = ?1 AND purpose = ?2 AND used_at IS NULL AND expires_at > ?3",
        )?
        .query_row(params![hash, purpose, now], |r| r.get(0))
        .optional()?)
}

/// Marks every unused token of `purpose` of the user as used (e.g. all pending reset
/// links once the password changed). Returns how many.
pub fn use_up_one_time_tokens(
    conn: &Connection,
    user_id: &str,
    purpose: &str,
    now: Millis,
) -> Result<usize, StorageError> {
    Ok(conn
        .prepare_cached(
            "UPDATE one_time_tokens SET used_at = ?3
             WHERE user_id = ?1 AND purpose = ?2 AND used_at IS NULL",
        )?
        .execute(params![user_id, purpose, now])?)
}

/// Deletes expired one-time tokens and OAuth states.
pub fn purge_expired(conn: &Connection, now: Millis) -> Result<usize, StorageError> {
    let a = conn.execute("DELETE FROM one_time_tokens WHERE expires_at < ?1", [now])?;
    let b = conn.execute("DELETE FROM oauth_states WHERE expires_at < ?1", [now])?;
    Ok(a + b)
}

#[derive(Debug, Clone)]
pub struct IdentityRow {
    pub provider: String,
    pub subject: String,
    pub user_id: String,
    pub email: Option<String>,
    pub email_verified: bool,
}

pub fn identity(
    conn: &Connection,
    provider: &str,
    subject: &str,
) -> Result<Option<IdentityRow>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT provider, subject, user_id, email, email_verified FROM identities
             WHERE provider = ?1 AND subject = ?2",
            params![provider, subject],
            |r| {
                Ok(IdentityRow {
                    provider: r.get(0)?,
                    subject: r.get(1)?,
                    user_id: r.get(2)?,
                    email: r.get(3)?,
                    email_verified: r.get(4)?,
                })
            },
        )
        .optional()?)
}

pub fn identities_of(conn: &Connection, user_id: &str) -> Result<Vec<IdentityRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT provider, subject, user_id, email, email_verified FROM identities
         WHERE user_id = ?1 ORDER BY provider",
    )?;
    let rows = stmt
        .query_map([user_id], |r| {
            Ok(IdentityRow {
                provider: r.get(0)?,
                subject: r.get(1)?,
                user_id: r.get(2)?,
                email: r.get(3)?,
                email_verified: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// `linked_unverified`: the account's email is not verified by warpbase at this moment;
/// such an identity is removed when the address gets verified
/// ([`remove_unverified_identities`]).
pub fn insert_identity(
    conn: &Connection,
    i: &IdentityRow,
    linked_unverified: bool,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO identities (provider, subject, user_id, email, email_verified, linked_unverified, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            i.provider,
            i.subject,
            i.user_id,
            i.email,
            i.email_verified,
            linked_unverified,
            now
        ],
    )?;
    Ok(())
}

/// Deletes the user's identities that were linked while the account's email was
/// unverified; returns their providers.
pub fn remove_unverified_identities(
    conn: &Connection,
    user_id: &str,
) -> Result<Vec<String>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM identities WHERE user_id = ?1 AND linked_unverified = 1 RETURNING provider",
    )?;
    let mut providers = stmt
        .query_map([user_id], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    providers.sort();
    Ok(providers)
}

/// Keeps an identity's email as the provider last reported it (shown on the account page).
pub fn update_identity_email(
    conn: &Connection,
    provider: &str,
    subject: &str,
    email: Option<&str>,
    email_verified: bool,
) -> Result<(), StorageError> {
    conn.execute(
        "UPDATE identities SET email = ?3, email_verified = ?4 WHERE provider = ?1 AND subject = ?2",
        params![provider, subject, email, email_verified],
    )?;
    Ok(())
}

pub fn delete_identity(
    conn: &Connection,
    user_id: &str,
    provider: &str,
) -> Result<bool, StorageError> {
    Ok(conn.execute(
        "DELETE FROM identities WHERE user_id = ?1 AND provider = ?2",
        params![user_id, provider],
    )? == 1)
}

pub struct OAuthState<'a> {
    pub state: &'a str,
    pub provider: &'a str,
    pub pkce_verifier: &'a str,
    pub nonce: Option<&'a str>,
    pub link_user_id: Option<&'a str>,
    /// SHA-256 of the browser-binding cookie of the browser that started the flow.
    pub browser_hash: &'a [u8],
    pub expires_at: Millis,
}

pub fn insert_oauth_state(
    conn: &Connection,
    s: &OAuthState<'_>,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO oauth_states (state, provider, pkce_verifier, nonce, link_user_id, browser_hash, expires_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![s.state, s.provider, s.pkce_verifier, s.nonce, s.link_user_id, s.browser_hash, s.expires_at, now],
    )?;
    Ok(())
}

/// A state row taken by the callback.
#[derive(Debug, Clone)]
pub struct TakenState {
    pub provider: String,
    pub pkce_verifier: String,
    pub nonce: Option<String>,
    pub link_user_id: Option<String>,
    /// `None` for rows from before browser binding: they match no browser.
    pub browser_hash: Option<Vec<u8>>,
}

/// Takes (deletes and returns) an unexpired state.
pub fn take_oauth_state(
    conn: &Connection,
    state: &str,
    now: Millis,
) -> Result<Option<TakenState>, StorageError> {
    Ok(conn
        .prepare_cached(
            "DELETE FROM oauth_states WHERE state = ?1 AND expires_at > ?2
             RETURNING provider, pkce_verifier, nonce, link_user_id, browser_hash",
        )?
        .query_row(params![state, now], |r| {
            Ok(TakenState {
                provider: r.get(0)?,
                pkce_verifier: r.get(1)?,
                nonce: r.get(2)?,
                link_user_id: r.get(3)?,
                browser_hash: r.get(4)?,
            })
        })
        .optional()?)
}

pub struct AuditEntry<'a> {
    pub user_id: Option<&'a str>,
    pub event: &'a str,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub detail: Option<&'a str>,
}

pub fn audit(conn: &Connection, e: &AuditEntry<'_>, now: Millis) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO audit_log (user_id, event, ip, user_agent, detail, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        e.user_id,
        e.event,
        e.ip,
        e.user_agent,
        e.detail,
        now
    ])?;
    Ok(())
}

/// Audit events of a user, newest first (for tests and an account page).
pub fn audit_events(
    conn: &Connection,
    user_id: &str,
    limit: u32,
) -> Result<Vec<(String, Millis)>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT event, created_at FROM audit_log WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![user_id, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn current_refresh_hash(
    conn: &Connection,
    session_id: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT refresh_hash FROM sessions WHERE id = ?1 AND revoked_at IS NULL",
            [session_id],
            |r| r.get(0),
        )
        .optional()?)
}
