//! The `meta` table: a small key/value store for process bookkeeping (when a periodic
//! task or backup last ran, markers that must survive a restart).
//!
//! Must not: hold anything a request path reads often (every lookup is a query), or
//! secrets in the clear. Keys with a meaning of their own (the admin setup token, the
//! auth epoch, the readiness probe) have their own functions beside their owners.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Millis, StorageError};

/// The value stored under `key`, if any.
pub fn get(conn: &Connection, key: &str) -> Result<Option<String>, StorageError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Stores `value` under `key`, replacing what was there.
pub fn set(conn: &Connection, key: &str, value: &str, now: Millis) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO meta (key, value, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        params![key, value, now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_absent_until_set_and_the_last_set_wins() {
        let mut c = Connection::open_in_memory().expect("open");
        crate::storage::migrate::apply(&mut c).expect("migrate");
        assert_eq!(get(&c, "periodic.test").expect("get"), None);
        set(&c, "periodic.test", "1", 10).expect("set");
        set(&c, "periodic.test", "2", 20).expect("set again");
        set(&c, "other", "x", 20).expect("set other");
        assert_eq!(get(&c, "periodic.test").expect("get").as_deref(), Some("2"));
        let updated: Millis = c
            .query_row(
                "SELECT updated_at FROM meta WHERE key = 'periodic.test'",
                [],
                |r| r.get(0),
            )
            .expect("updated_at");
        assert_eq!(updated, 20);
    }
}
