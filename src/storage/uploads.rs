//! The `uploads` table: one row per stored upload (owner, size, digest), the per-user
//! byte total for the storage quota, "in use by an active job", and the retention scan.
//! The files themselves live in `data_dir/uploads` and belong to `jobs::uploads`.
//!
//! Must not: touch the file system; callers delete the row first and the file after
//! the commit.

use rusqlite::{Connection, OptionalExtension, params};

use super::{Millis, StorageError};

/// One stored upload.
#[derive(Debug, Clone)]
pub struct UploadRow {
    pub id: String,
    pub user_id: String,
    pub size: u64,
    pub sha256: String,
    pub created_at: Millis,
}

/// Records a stored upload (inside the write that checked the quota).
pub fn insert_upload(conn: &Connection, u: &UploadRow) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO uploads (id, user_id, size, sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![u.id, u.user_id, u.size, u.sha256, u.created_at],
    )?;
    Ok(())
}

/// The upload `id`, if it exists.
pub fn get_upload(conn: &Connection, id: &str) -> Result<Option<UploadRow>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT id, user_id, size, sha256, created_at FROM uploads WHERE id = ?1",
            [id],
            upload_from_row,
        )
        .optional()?)
}

/// The bytes of all of `user_id`'s uploads (the plan's `max_storage_bytes`): a range of
/// `uploads_user`.
pub fn stored_bytes(conn: &Connection, user_id: &str) -> Result<u64, StorageError> {
    let n: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(size), 0) FROM uploads WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Whether an active (queued, running, retrying) `analyze` job of `user_id` uses upload
/// `upload_id`. Such a job was created after the upload, so this reads only the user's
/// jobs since then (ids are time-ordered): a range of `jobs_user`.
pub fn upload_in_use(
    conn: &Connection,
    user_id: &str,
    upload_id: &str,
    created_at: Millis,
) -> Result<bool, StorageError> {
    let lower = crate::ids::id_floor_for_millis(created_at);
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE user_id = ?1 AND id >= ?2
               AND kind = 'analyze'
               AND (status = 'queued' OR status = 'running' OR status = 'retrying')
               AND json_extract(payload, '$.upload_id') = ?3)",
        )?
        .query_row(params![user_id, lower, upload_id], |r| r.get(0))?)
}

/// Deletes the row of upload `id`; `false` if there was none.
pub fn delete_upload(conn: &Connection, id: &str) -> Result<bool, StorageError> {
    Ok(conn
        .prepare_cached("DELETE FROM uploads WHERE id = ?1")?
        .execute([id])?
        == 1)
}

/// Uploads stored before `before` (oldest first, after the `(created_at, id)` cursor
/// `after`, at most `limit`), for retention.
pub fn uploads_stored_before(
    conn: &Connection,
    before: Millis,
    after: (Millis, &str),
    limit: u32,
) -> Result<Vec<UploadRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, user_id, size, sha256, created_at FROM uploads
         WHERE created_at < ?1 AND (created_at, id) > (?2, ?3)
         ORDER BY created_at, id LIMIT ?4",
    )?;
    let rows = stmt
        .query_map(params![before, after.0, after.1, limit], upload_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn upload_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRow> {
    Ok(UploadRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        size: r.get(2)?,
        sha256: r.get(3)?,
        created_at: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::jobs::{NewJob, insert_job};
    use crate::storage::users::{NewUser, insert_user};

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().expect("open");
        crate::storage::migrate::apply(&mut c).expect("migrate");
        for id in ["u1", "u2"] {
            let email = format!("{id}@example.com");
            let user = NewUser {
                id,
                email: &email,
                email_verified: true,
                name: None,
                password_hash: None,
                role: None,
                now: 0,
            };
            insert_user(&c, &user).expect("user");
        }
        c
    }

    fn upload(c: &Connection, user_id: &str, size: u64, at: Millis) -> UploadRow {
        let row = UploadRow {
            id: crate::ids::new_id_at(at),
            user_id: user_id.into(),
            size,
            sha256: "00".repeat(32),
            created_at: at,
        };
        insert_upload(c, &row).expect("insert");
        row
    }

    fn analyze_job(c: &Connection, user_id: &str, upload_id: &str, at: Millis) -> String {
        let id = crate::ids::new_id_at(at);
        let payload = format!(r#"{{"upload_id":"{upload_id}"}}"#);
        let job = NewJob {
            id: &id,
            user_id: Some(user_id),
            kind: "analyze",
            queue: "slow",
            priority: 0,
            payload: &payload,
            max_attempts: 1,
            run_at: at,
            idempotency_key: None,
            request_hash: None,
            now: at,
        };
        insert_job(c, &job).expect("job");
        id
    }

    #[test]
    fn rows_round_trip_and_stored_bytes_sums_one_users_uploads() {
        let c = db();
        let a = upload(&c, "u1", 100, 1_000);
        upload(&c, "u1", 23, 2_000);
        upload(&c, "u2", 7, 3_000);
        let got = get_upload(&c, &a.id).expect("get").expect("present");
        assert_eq!((got.user_id.as_str(), got.size), ("u1", 100));
        assert_eq!(got.sha256, a.sha256);
        assert_eq!(got.created_at, 1_000);
        assert_eq!(stored_bytes(&c, "u1").expect("bytes"), 123);
        assert_eq!(stored_bytes(&c, "nobody").expect("bytes"), 0);
        assert!(delete_upload(&c, &a.id).expect("delete"));
        assert!(!delete_upload(&c, &a.id).expect("delete twice"));
        assert!(get_upload(&c, &a.id).expect("get").is_none());
        assert_eq!(stored_bytes(&c, "u1").expect("bytes"), 23);
    }

    #[test]
    fn an_upload_is_in_use_only_by_its_owners_active_analyze_jobs() {
        let c = db();
        let up = upload(&c, "u1", 1, 10_000);
        assert!(!upload_in_use(&c, "u1", &up.id, up.created_at).expect("unused"));
        // Another user's job naming the upload does not hold it.
        analyze_job(&c, "u2", &up.id, 11_000);
        assert!(!upload_in_use(&c, "u1", &up.id, up.created_at).expect("other user"));
        let job = analyze_job(&c, "u1", &up.id, 12_000);
        assert!(upload_in_use(&c, "u1", &up.id, up.created_at).expect("queued"));
        let canceled = crate::storage::jobs::cancel_waiting(&c, &job, 13_000).expect("cancel");
        assert!(canceled.is_some());
        assert!(!upload_in_use(&c, "u1", &up.id, up.created_at).expect("ended"));
    }

    #[test]
    fn stored_before_pages_oldest_first_after_the_cursor() {
        let c = db();
        let rows: Vec<UploadRow> = (0..5)
            .map(|i| upload(&c, "u1", 1, 1_000 + i * 10))
            .collect();
        let first = uploads_stored_before(&c, 1_035, (0, ""), 2).expect("page 1");
        let ids = |v: &[UploadRow]| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ids(&rows[..2]));
        let last = &first[1];
        let next =
            uploads_stored_before(&c, 1_035, (last.created_at, &last.id), 10).expect("page 2");
        // 1_040 is not before 1_035.
        assert_eq!(ids(&next), ids(&rows[2..4]));
    }
}
