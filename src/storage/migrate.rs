//! Forward-only, transactional schema migrations embedded at build time.
//!
//! `PRAGMA user_version` holds the number of applied migrations; each migration runs in
//! its own transaction together with the bump, so a crash leaves the schema either before
//! or after it, never halfway. A database from a newer binary is refused, not guessed at.
//!
//! A migration that rebuilds a table other tables reference starts with the line
//! [`FOREIGN_KEYS_OFF`]: it then runs with foreign keys off (SQLite's procedure for
//! changing a table, so dropping the old table does not cascade), and
//! `PRAGMA foreign_key_check` must come back empty before it commits.

use rusqlite::{Connection, TransactionBehavior};

use super::StorageError;

/// Every migration, in order. Append only; never edit one that has shipped.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_foundation",
        include_str!("../../migrations/0001_foundation.sql"),
    ),
    ("0002_auth", include_str!("../../migrations/0002_auth.sql")),
    (
        "0003_billing",
        include_str!("../../migrations/0003_billing.sql"),
    ),
    (
        "0004_stripe_events_rowid",
        include_str!("../../migrations/0004_stripe_events_rowid.sql"),
    ),
    (
        "0005_job_counters",
        include_str!("../../migrations/0005_job_counters.sql"),
    ),
    (
        "0006_jobs_hot_path",
        include_str!("../../migrations/0006_jobs_hot_path.sql"),
    ),
    (
        "0007_oauth_security",
        include_str!("../../migrations/0007_oauth_security.sql"),
    ),
    (
        "0008_auth_limits",
        include_str!("../../migrations/0008_auth_limits.sql"),
    ),
    (
        "0009_jobs_fairness_uploads",
        include_str!("../../migrations/0009_jobs_fairness_uploads.sql"),
    ),
];

/// The first line of a migration that must run with foreign keys off.
pub const FOREIGN_KEYS_OFF: &str = "-- warpbase: foreign_keys=off";

/// The schema version this binary writes.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

pub fn current_version(conn: &Connection) -> Result<i64, StorageError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Applies every pending migration; returns how many ran.
pub fn apply(conn: &mut Connection) -> Result<usize, StorageError> {
    apply_list(conn, MIGRATIONS)
}

/// Applies the pending migrations of `migrations` (normally [`MIGRATIONS`]; upgrade tests
/// pass a prefix of it to build an old database, or append a broken one).
pub fn apply_list(
    conn: &mut Connection,
    migrations: &[(&str, &str)],
) -> Result<usize, StorageError> {
    let found = current_version(conn)?;
    let known = migrations.len() as i64;
    if found > known {
        return Err(StorageError::SchemaTooNew { found, known });
    }
    let mut ran = 0;
    for (index, (name, sql)) in migrations.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        let fk_off = sql.lines().next().map(str::trim_end) == Some(FOREIGN_KEYS_OFF);
        // A no-op inside a transaction, so it is set before the migration's own, and
        // the connection's setting is put back whatever happens.
        let fk_before: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
        if fk_off {
            conn.pragma_update(None, "foreign_keys", false)?;
        }
        let applied = apply_one(conn, name, sql, version, fk_off);
        if fk_off {
            conn.pragma_update(None, "foreign_keys", fk_before)?;
        }
        applied?;
        tracing::info!(migration = name, "applied migration");
        ran += 1;
    }
    Ok(ran)
}

fn apply_one(
    conn: &mut Connection,
    name: &str,
    sql: &str,
    version: i64,
    check_foreign_keys: bool,
) -> Result<(), StorageError> {
    let failed = |message: String| StorageError::Migration {
        name: name.to_string(),
        message,
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(sql).map_err(|e| failed(e.to_string()))?;
    if check_foreign_keys {
        let broken: Vec<String> = tx
            .prepare("PRAGMA foreign_key_check")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        if !broken.is_empty() {
            return Err(failed(format!(
                "foreign keys broken afterwards in: {}",
                broken.join(", ")
            )));
        }
    }
    tx.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
        rusqlite::params![version, name, crate::clock::now_millis()],
    )?;
    tx.pragma_update(None, "user_version", version)?;
    tx.commit()?;
    Ok(())
}
