//! Retention: deleting rows nobody needs any more (ended sessions, old rotated refresh
//! tokens, audit entries, processed Stripe events). Each function deletes at most `limit`
//! rows, so callers run it in short writer closures and the writer is never held long.
//! Must not delete what still has a purpose: a live session, a failed Stripe event
//! (waiting for a replay), or any event recent enough for Stripe to redeliver.

use rusqlite::{Connection, params};

use super::{Millis, StorageError};

/// Sessions revoked, or whose refresh token expired, before `before` (their refresh
/// history goes with them, by the foreign key's cascade).
pub fn purge_sessions(
    conn: &Connection,
    before: Millis,
    limit: u32,
) -> Result<usize, StorageError> {
    Ok(conn.execute(
        "DELETE FROM sessions WHERE rowid IN (
             SELECT rowid FROM sessions
             WHERE (revoked_at IS NOT NULL AND revoked_at < ?1) OR refresh_expires_at < ?1
             LIMIT ?2)",
        params![before, limit],
    )?)
}

/// Rotated refresh-token hashes older than `before`.
pub fn purge_refresh_history(
    conn: &Connection,
    before: Millis,
    limit: u32,
) -> Result<usize, StorageError> {
    Ok(conn.execute(
        "DELETE FROM refresh_history WHERE hash IN (
             SELECT hash FROM refresh_history WHERE rotated_at < ?1 LIMIT ?2)",
        params![before, limit],
    )?)
}

/// Audit entries written before `before`. Ids grow with time, so walking them from the
/// oldest finds the candidates first.
pub fn purge_audit_log(
    conn: &Connection,
    before: Millis,
    limit: u32,
) -> Result<usize, StorageError> {
    Ok(conn.execute(
        "DELETE FROM audit_log WHERE id IN (
             SELECT id FROM audit_log WHERE created_at < ?1 ORDER BY id LIMIT ?2)",
        params![before, limit],
    )?)
}

/// Stripe events processed before `before`, except `failed` ones (kept for a replay).
/// Walks the `(received_at, id)` index from the oldest.
pub fn purge_stripe_events(
    conn: &Connection,
    before: Millis,
    limit: u32,
) -> Result<usize, StorageError> {
    Ok(conn.execute(
        "DELETE FROM stripe_events WHERE rowid IN (
             SELECT rowid FROM stripe_events
             WHERE received_at < ?1 AND processed_at < ?1 AND status <> 'failed'
             ORDER BY received_at, id LIMIT ?2)",
        params![before, limit],
    )?)
}
