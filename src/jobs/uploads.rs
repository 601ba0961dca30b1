//! Uploads for the `analyze` kind: storing one (the plan's `max_upload_bytes` and
//! `max_storage_bytes`, a per-user rate, a free-space floor), deleting one, and retention.
//!
//! The bytes live in `data_dir/uploads/<id>`, the `uploads` row is the truth. A body is
//! streamed into a hidden `.<id>.partial` file; the write that records the row checks the
//! storage quota again (so concurrent uploads cannot overshoot it), and only after it
//! commits is the file renamed into place. Must not: leave a refused, failed or partial
//! file behind, or answer a disk that is full or read-only with a 500 (it is 503
//! `unavailable`, as for the database). No HTTP here; `routes` calls these.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::state::AppState;
use crate::storage::StorageError;
use crate::storage::uploads::{self as q, UploadRow};

/// A body being uploaded, as chunks or the reason it broke off.
pub type Body = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, String>> + Send>>;

/// Partial files older than this belong to no upload in flight (a crash mid-upload).
const STALE_PARTIAL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("uploads on your plan are limited to {0} bytes")]
    TooLarge(u64),
    #[error(
        "your plan stores {max} bytes of uploads and {used} are in use; delete some or upgrade"
    )]
    Quota { max: u64, used: u64 },
    #[error("too many uploads; try again later")]
    RateLimited(Duration),
    #[error("the server is low on disk space; try again later")]
    LowSpace,
    #[error("the upload could not be stored: {0}")]
    Disk(std::io::Error),
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    #[error("the upload is empty")]
    Empty,
    #[error("no such upload")]
    NotFound,
    #[error("a queued or running job uses this upload; cancel it first")]
    InUse,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

pub fn uploads_dir(state: &AppState) -> PathBuf {
    state.config.data_dir.join("uploads")
}

/// Bytes available to unprivileged writers on the filesystem holding `path` (statvfs).
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter
    // that statvfs fills in; nothing is read from it unless the call succeeded.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// How many bytes this upload may have, and which limit each bound is.
struct Budget {
    max_upload: u64,
    quota: u64,
    stored: u64,
    /// Bytes that can be written before the free-space floor is reached.
    space: u64,
}

impl Budget {
    fn check(&self, size: u64) -> Result<(), UploadError> {
        if size > self.max_upload {
            return Err(UploadError::TooLarge(self.max_upload));
        }
        if self.stored.saturating_add(size) > self.quota {
            return Err(UploadError::Quota {
                max: self.quota,
                used: self.stored,
            });
        }
        if size > self.space {
            return Err(UploadError::LowSpace);
        }
        Ok(())
    }
}

/// Stores an upload of `user_id` from `body`; returns its row. Refusals come before the
/// body is read where they can (rate, free space, a full quota), else as the bytes
/// arrive; either way no file remains.
pub async fn store(state: &AppState, user_id: &str, body: Body) -> Result<UploadRow, UploadError> {
    state
        .jobs
        .check_upload_rate(user_id)
        .map_err(UploadError::RateLimited)?;
    let limits = state.jobs.allowance(user_id).await.limits;
    let dir = uploads_dir(state);
    let floor = state.config.uploads.min_free_bytes;
    let d = dir.clone();
    let free = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&d)?;
        free_bytes(&d)
    })
    .await
    .map_err(|e| UploadError::Disk(std::io::Error::other(e)))?
    .map_err(UploadError::Disk)?;
    if free <= floor {
        return Err(UploadError::LowSpace);
    }
    let uid = user_id.to_string();
    let stored = state
        .storage
        .read(move |c| q::stored_bytes(c, &uid))
        .await?;
    let budget = Budget {
        max_upload: limits.max_upload_bytes,
        quota: limits.max_storage_bytes,
        stored,
        space: free - floor,
    };
    if stored >= budget.quota {
        return Err(UploadError::Quota {
            max: budget.quota,
            used: stored,
        });
    }
    let id = crate::ids::new_id();
    let tmp = dir.join(format!(".{id}.partial"));
    let (size, sha256) = match save(&tmp, body, &budget).await {
        Ok((0, _)) => {
            discard(&tmp).await;
            return Err(UploadError::Empty);
        }
        Ok(saved) => saved,
        Err(e) => {
            discard(&tmp).await;
            return Err(e);
        }
    };
    let row = UploadRow {
        id: id.clone(),
        user_id: user_id.to_string(),
        size,
        sha256,
        created_at: state.now_millis(),
    };
    let r = row.clone();
    let quota = budget.quota;
    // The quota again, inside the write: concurrent uploads of one user cannot overshoot.
    let recorded = state
        .storage
        .write(move |c| {
            let used = q::stored_bytes(c, &r.user_id)?;
            if used.saturating_add(r.size) > quota {
                return Err(UploadError::Quota { max: quota, used });
            }
            q::insert_upload(c, &r)?;
            Ok(())
        })
        .await;
    if let Err(e) = recorded {
        discard(&tmp).await;
        return Err(e);
    }
    if let Err(e) = tokio::fs::rename(&tmp, dir.join(&id)).await {
        discard(&tmp).await;
        let rid = id.clone();
        if let Err(se) = state
            .storage
            .write(move |c| q::delete_upload(c, &rid))
            .await
        {
            tracing::error!(upload = %id, error = %se, "cannot remove the row of an upload whose file failed; retention removes it");
        }
        return Err(UploadError::Disk(e));
    }
    Ok(row)
}

/// Streams `body` into `path` within `budget`; returns (size, sha256 hex). The caller
/// removes `path` on error.
async fn save(path: &Path, mut body: Body, budget: &Budget) -> Result<(u64, String), UploadError> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(UploadError::Disk)?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(UploadError::Interrupted)?;
        size += chunk.len() as u64;
        budget.check(size)?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(UploadError::Disk)?;
    }
    file.sync_all().await.map_err(UploadError::Disk)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// [`remove_quietly`] for async code.
async fn discard(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove an upload's file");
    }
}

/// Removes a file this module wrote (blocking); a file already gone is fine.
fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove an upload's file");
    }
}

/// Deletes upload `id` of `user_id`: 404 for anyone else's, 409 while an active job uses
/// it. The row goes first; the file after the commit.
pub async fn delete(state: &AppState, user_id: &str, id: &str) -> Result<(), UploadError> {
    if id.contains(['/', '\\', '.']) {
        return Err(UploadError::NotFound);
    }
    let (uid, uploadid) = (user_id.to_string(), id.to_string());
    state
        .storage
        .write(move |c| {
            match q::get_upload(c, &uploadid)? {
                Some(u) if u.user_id == uid => {
                    if q::upload_in_use(c, &uid, &u.id, u.created_at)? {
                        return Err(UploadError::InUse);
                    }
                }
                _ => return Err(UploadError::NotFound),
            }
            q::delete_upload(c, &uploadid)?;
            Ok(())
        })
        .await?;
    discard(&uploads_dir(state).join(id)).await;
    Ok(())
}

/// Retention, from the periodic task: deletes the uploads stored more than
/// `uploads.retention` ago that no active job uses (their rows, then their files), and
/// partial files a crash left behind. Small batches, so the writer stays fair.
pub async fn purge(state: &AppState) {
    let retention = state.config.uploads.retention;
    let dir = uploads_dir(state);
    if !retention.is_zero() {
        let before = state.now_millis() - retention.as_millis() as i64;
        let mut after: (i64, String) = (i64::MIN, String::new());
        for _ in 0..100 {
            let cursor = after.clone();
            let batch = state
                .storage
                .write(move |c| {
                    let rows = q::uploads_stored_before(c, before, (cursor.0, &cursor.1), 200)?;
                    let last = rows.last().map(|r| (r.created_at, r.id.clone()));
                    let mut gone = Vec::new();
                    for r in rows {
                        if !q::upload_in_use(c, &r.user_id, &r.id, r.created_at)?
                            && q::delete_upload(c, &r.id)?
                        {
                            gone.push(r.id);
                        }
                    }
                    Ok::<_, StorageError>((gone, last))
                })
                .await;
            let (gone, last) = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "purging old uploads failed");
                    return;
                }
            };
            if !gone.is_empty() {
                tracing::info!(uploads = gone.len(), "deleted uploads past their retention");
            }
            let d = dir.clone();
            tokio::task::spawn_blocking(move || {
                for id in gone {
                    remove_quietly(&d.join(id));
                }
            })
            .await
            .ok();
            match last {
                Some(l) => after = l,
                None => break,
            }
        }
    }
    let now = std::time::SystemTime::now();
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > STALE_PARTIAL);
            if name.starts_with('.') && name.ends_with(".partial") && stale {
                remove_quietly(&e.path());
            }
        }
    })
    .await
    .ok();
}
