//! Users and sessions: the identity rows every module references.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Millis, StorageError};

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
    pub name: Option<String>,
    pub password_hash: Option<String>,
    pub role: String,
    pub token_version: i64,
    pub disabled: bool,
    pub created_at: Millis,
}

const USER_COLS: &str =
    "id, email, email_verified, name, password_hash, role, token_version, disabled, created_at";

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: r.get(0)?,
        email: r.get(1)?,
        email_verified: r.get(2)?,
        name: r.get(3)?,
        password_hash: r.get(4)?,
        role: r.get(5)?,
        token_version: r.get(6)?,
        disabled: r.get(7)?,
        created_at: r.get(8)?,
    })
}

pub struct NewUser<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub email_verified: bool,
    pub name: Option<&'a str>,
    pub password_hash: Option<&'a str>,
    /// `None`: `user`. No account becomes admin by being first (that raced on a fresh
    /// public instance); see [`claim_admin`] and `warpbase user create --admin`.
    pub role: Option<&'a str>,
    pub now: Millis,
}

/// Inserts a user, with role `user` unless a role is given.
/// A duplicate email is a unique violation (`StorageError::is_unique_violation`).
pub fn insert_user(conn: &Connection, u: &NewUser<'_>) -> Result<UserRow, StorageError> {
    let role = u.role.unwrap_or("user");
    conn.execute(
        "INSERT INTO users (id, email, email_verified, name, password_hash, role, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
        params![u.id, u.email, u.email_verified, u.name, u.password_hash, role, u.now],
    )?;
    get_user(conn, u.id)?.ok_or_else(|| StorageError::Corrupt("inserted user vanished".into()))
}

pub fn get_user(conn: &Connection, id: &str) -> Result<Option<UserRow>, StorageError> {
    // Cached: on every `/me` and login; parsing the statement cost more than running it.
    Ok(conn
        .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"))?
        .query_row([id], user_from_row)
        .optional()?)
}

pub fn get_user_by_email(conn: &Connection, email: &str) -> Result<Option<UserRow>, StorageError> {
    // Cached: on every `/me` and login; parsing the statement cost more than running it.
    Ok(conn
        .prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE email = ?1"))?
        .query_row([email], user_from_row)
        .optional()?)
}

/// Users ordered by creation, for admin listings: `(after_created_at, after_id)` is the cursor.
pub fn list_users(
    conn: &Connection,
    after: Option<(Millis, &str)>,
    limit: u32,
) -> Result<Vec<UserRow>, StorageError> {
    let (t, id) = after.unwrap_or((i64::MIN, ""));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {USER_COLS} FROM users WHERE (created_at, id) > (?1, ?2)
         ORDER BY created_at, id LIMIT ?3"
    ))?;
    let rows = stmt
        .query_map(params![t, id, limit], user_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The `meta` key holding the SHA-256 (hex) of the one-time admin setup token, present
/// only while no admin exists.
pub const ADMIN_SETUP_KEY: &str = "admin.setup_token";

pub fn any_admin(conn: &Connection) -> Result<bool, StorageError> {
    Ok(conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM users WHERE role = 'admin')",
        [],
        |r| r.get(0),
    )?)
}

/// Stores a fresh setup token hash if no admin exists (replacing an earlier one), or
/// removes a stale one; true if a token was stored.
pub fn prepare_admin_setup(
    conn: &Connection,
    hash_hex: &str,
    now: Millis,
) -> Result<bool, StorageError> {
    if any_admin(conn)? {
        conn.execute("DELETE FROM meta WHERE key = ?1", [ADMIN_SETUP_KEY])?;
        return Ok(false);
    }
    conn.execute(
        "INSERT INTO meta (key, value, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        params![ADMIN_SETUP_KEY, hash_hex, now],
    )?;
    Ok(true)
}

/// Makes `user_id` admin if `hash_hex` is the stored setup token's and still no admin
/// exists; the token is burned either way it is used. False: no such token (wrong, used,
/// or an admin already exists).
pub fn claim_admin(
    conn: &Connection,
    user_id: &str,
    hash_hex: &str,
    now: Millis,
) -> Result<bool, StorageError> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [ADMIN_SETUP_KEY],
            |r| r.get(0),
        )
        .optional()?;
    if stored.as_deref() != Some(hash_hex) {
        return Ok(false);
    }
    conn.execute("DELETE FROM meta WHERE key = ?1", [ADMIN_SETUP_KEY])?;
    if any_admin(conn)? {
        return Ok(false);
    }
    set_role(conn, user_id, "admin", now)
}

/// The `meta` key counting changes to users' role or disabled flag: a running server
/// watches it, so a change made by another process (the CLI) applies within a second
/// instead of when its caches expire.
pub const AUTH_EPOCH_KEY: &str = "auth.epoch";

fn bump_auth_epoch(conn: &Connection, now: Millis) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO meta (key, value, updated_at) VALUES (?1, '1', ?2)
         ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1,
             updated_at = excluded.updated_at",
        params![AUTH_EPOCH_KEY, now],
    )?;
    Ok(())
}

/// The current [`AUTH_EPOCH_KEY`] (0 before any change).
pub fn auth_epoch(conn: &Connection) -> Result<i64, StorageError> {
    Ok(conn
        .prepare_cached("SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1")?
        .query_row([AUTH_EPOCH_KEY], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

pub fn set_role(
    conn: &Connection,
    id: &str,
    role: &str,
    now: Millis,
) -> Result<bool, StorageError> {
    let changed = conn.execute(
        "UPDATE users SET role = ?2, updated_at = ?3 WHERE id = ?1",
        params![id, role, now],
    )? == 1;
    if changed {
        bump_auth_epoch(conn, now)?;
    }
    Ok(changed)
}

/// Disables or enables a user; disabling also bumps token_version so every token dies.
pub fn set_disabled(
    conn: &Connection,
    id: &str,
    disabled: bool,
    now: Millis,
) -> Result<bool, StorageError> {
    let changed = conn.execute(
        "UPDATE users SET disabled = ?2, updated_at = ?3,
             token_version = token_version + (CASE WHEN ?2 THEN 1 ELSE 0 END)
         WHERE id = ?1",
        params![id, disabled, now],
    )? == 1;
    if changed {
        bump_auth_epoch(conn, now)?;
    }
    Ok(changed)
}

/// Invalidates every access token of the user (they carry the old version).
pub fn bump_token_version(conn: &Connection, id: &str, now: Millis) -> Result<i64, StorageError> {
    Ok(conn.query_row(
        "UPDATE users SET token_version = token_version + 1, updated_at = ?2 WHERE id = ?1
         RETURNING token_version",
        params![id, now],
        |r| r.get(0),
    )?)
}

/// What the auth check needs about a user on every request (cached by the auth module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserAuthState {
    pub token_version: i64,
    pub is_admin: bool,
    pub disabled: bool,
}

pub fn user_auth_state(conn: &Connection, id: &str) -> Result<Option<UserAuthState>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT token_version, role, disabled FROM users WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(UserAuthState {
                token_version: r.get(0)?,
                is_admin: r.get::<_, String>(1)? == "admin",
                disabled: r.get(2)?,
            })
        })
        .optional()?)
}

pub struct NewSession<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub refresh_hash: &'a [u8],
    pub refresh_expires_at: Millis,
    pub user_agent: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub now: Millis,
}

/// A new session is always the result of an authentication (password, OAuth exchange,
/// registration), so its `auth_time` is its creation; refresh rotation keeps it.
pub fn insert_session(conn: &Connection, s: &NewSession<'_>) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO sessions (id, user_id, refresh_hash, refresh_expires_at, user_agent, ip,
                               created_at, last_used_at, auth_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7)",
        params![
            s.id,
            s.user_id,
            s.refresh_hash,
            s.refresh_expires_at,
            s.user_agent,
            s.ip,
            s.now
        ],
    )?;
    Ok(())
}

/// When the session's user last authenticated; `None` for an unknown session or one from
/// before `auth_time` was recorded (treated as long ago).
pub fn session_auth_time(conn: &Connection, id: &str) -> Result<Option<Millis>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT auth_time FROM sessions WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, Option<Millis>>(0))
        .optional()?
        .flatten())
}

/// `Some(true)` if the session exists and is live, `Some(false)` if revoked, `None` if unknown.
pub fn session_live(conn: &Connection, id: &str) -> Result<Option<(String, bool)>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT user_id, revoked_at IS NULL FROM sessions WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// Revokes one session; returns whether it was live.
pub fn revoke_session(
    conn: &Connection,
    id: &str,
    reason: &str,
    now: Millis,
) -> Result<bool, StorageError> {
    Ok(conn.execute(
        "UPDATE sessions SET revoked_at = ?2, revoked_reason = ?3 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, now, reason],
    )? == 1)
}

/// Revokes every live session of a user except `keep`; returns the revoked ids.
pub fn revoke_user_sessions(
    conn: &Connection,
    user_id: &str,
    keep: Option<&str>,
    reason: &str,
    now: Millis,
) -> Result<Vec<String>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE sessions SET revoked_at = ?3, revoked_reason = ?4
         WHERE user_id = ?1 AND revoked_at IS NULL AND id IS NOT ?2
         RETURNING id",
    )?;
    let ids = stmt
        .query_map(params![user_id, keep, now, reason], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

/// Revokes one session (used when its refresh family is compromised); returns its id if
/// it was live.
pub fn revoke_user_sessions_one(
    conn: &Connection,
    session_id: &str,
    reason: &str,
    now: Millis,
) -> Result<Vec<String>, StorageError> {
    Ok(if revoke_session(conn, session_id, reason, now)? {
        vec![session_id.to_string()]
    } else {
        Vec::new()
    })
}
