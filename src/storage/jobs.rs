//! The job queue's rows. See migrations/0001_foundation.sql for the table.

use rusqlite::{Connection, params};

use super::{Millis, StorageError};

/// A job to enqueue. `user_id` None marks an internal job (mail, usage reports).
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub user_id: Option<&'a str>,
    pub kind: &'a str,
    pub queue: &'a str,
    pub priority: i64,
    pub payload: &'a str,
    pub max_attempts: u32,
    pub run_at: Millis,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: Option<&'a str>,
    pub now: Millis,
}

/// Inserts a queued job. Use inside the same write as the change that caused it, so the
/// job exists if and only if that change committed.
pub fn insert_job(conn: &Connection, j: &NewJob<'_>) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO jobs (id, user_id, kind, queue, status, priority, payload, max_attempts,
                           run_at, idempotency_key, request_hash, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)",
    )?
    .execute(params![
        j.id,
        j.user_id,
        j.kind,
        j.queue,
        j.priority,
        j.payload,
        j.max_attempts,
        j.run_at,
        j.idempotency_key,
        j.request_hash,
        j.now
    ])?;
    Ok(())
}
