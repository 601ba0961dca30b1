//! Scheduled automatic backups: every `backup.interval`, a consistent copy of the live
//! database goes to `data_dir/backups/warpbase-<UTC timestamp>.db`, and only the newest
//! `backup.keep` are kept. The time of the last good run lives in the `meta` table, so a
//! restart (or a crash loop) does not back up again before the interval is over.
//!
//! Owns only its own files in `backups/`; the copy itself is `Storage::backup_to`
//! (`VACUUM INTO` through a read connection), so it never blocks the writer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::format_description;

use crate::state::AppState;
use crate::storage::{self, StorageError};

/// The folder inside the data dir that holds automatic backups.
pub const BACKUP_DIR: &str = "backups";
/// The `meta` key holding the Unix milliseconds of the last successful automatic backup.
pub const LAST_RUN_KEY: &str = "backup.last_run";
const PREFIX: &str = "warpbase-";
const SUFFIX: &str = ".db";
/// After a failure, try again after this long (or the interval, if shorter).
const RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the backup task panicked")]
    Panicked,
}

/// Starts the schedule when `backup.interval` is set; the task stops on `state.shutdown`.
pub fn start(state: &AppState) {
    let interval = state.config.backup.interval;
    if interval.is_zero() {
        return;
    }
    let s = state.clone();
    state
        .tasks
        .spawn(async move { schedule(s, interval).await });
}

async fn schedule(state: AppState, interval: Duration) {
    let dir = state.config.data_dir.join(BACKUP_DIR);
    remove_partials(&dir);
    loop {
        let wait = match last_run(&state).await {
            Ok(last) => until_due(last, state.now_millis(), interval),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the last backup time");
                interval.min(RETRY_AFTER)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => return,
        }
        let failed = match backup_now(&state).await {
            Ok(path) => {
                tracing::info!(path = %path.display(), "automatic backup written");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "automatic backup failed");
                true
            }
        };
        if failed {
            tokio::select! {
                _ = tokio::time::sleep(interval.min(RETRY_AFTER)) => {}
                _ = state.shutdown.cancelled() => return,
            }
        }
    }
}

/// How long to wait before the next backup is due; zero when it is overdue or never ran.
/// A last run in the future (the clock went back) waits one interval, not forever.
pub fn until_due(last_run: Option<i64>, now: i64, interval: Duration) -> Duration {
    let Some(last) = last_run else {
        return Duration::ZERO;
    };
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    let due = last.saturating_add(interval_ms);
    let left = due.saturating_sub(now).clamp(0, interval_ms);
    Duration::from_millis(left as u64)
}

async fn last_run(state: &AppState) -> Result<Option<i64>, StorageError> {
    let value = state
        .storage
        .read(|c| storage::meta::get(c, LAST_RUN_KEY))
        .await?;
    Ok(value.and_then(|v| v.parse().ok()))
}

/// Writes one backup now (temp name, integrity check, atomic rename), records the run and
/// prunes old backups. Returns the new file.
pub async fn backup_now(state: &AppState) -> Result<PathBuf, BackupError> {
    let outcome = run_once(state).await;
    let label = if outcome.is_ok() { "ok" } else { "error" };
    metrics::counter!("backup_runs_total", "outcome" => label).increment(1);
    outcome
}

async fn run_once(state: &AppState) -> Result<PathBuf, BackupError> {
    let dir = state.config.data_dir.join(BACKUP_DIR);
    let now = state.now_millis();
    let name = file_name(now);
    let dest = dir.join(&name);
    let tmp = dir.join(format!(".{name}.partial"));
    {
        let (dir, tmp) = (dir.clone(), tmp.clone());
        blocking(move || {
            crate::secrets::create_private_dir(&dir).map_err(|source| BackupError::Io {
                what: "cannot create",
                path: dir.clone(),
                source,
            })?;
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BackupError::Io {
                    what: "cannot remove",
                    path: tmp,
                    source: e,
                }),
                _ => Ok(()),
            }
        })
        .await?;
    }
    state.storage.backup_to(tmp.clone()).await?;
    {
        let (dir, dest) = (dir.clone(), dest.clone());
        blocking(move || {
            if let Err(e) = storage::integrity_check(&tmp) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
            std::fs::rename(&tmp, &dest).map_err(|source| BackupError::Io {
                what: "cannot rename the backup to",
                path: dest.clone(),
                source,
            })?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })
        .await?;
    }
    state
        .storage
        .write(move |c| storage::meta::set(c, LAST_RUN_KEY, &now.to_string(), now))
        .await?;
    metrics::gauge!("backup_last_success_timestamp_seconds").set(now as f64 / 1000.0);
    let keep = state.config.backup.keep.max(1) as usize;
    blocking(move || prune(&dir, keep)).await?;
    Ok(dest)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(BackupError::Panicked))
}

/// `warpbase-20250102T030405.678Z.db`: sorts by time as text.
pub fn file_name(now_millis: i64) -> String {
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_millis) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let stamp = at
        .format(format_description!(
            "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
        ))
        .unwrap_or_else(|_| now_millis.to_string());
    format!("{PREFIX}{stamp}{SUFFIX}")
}

/// The automatic backups in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Deletes all but the newest `keep` automatic backups.
fn prune(dir: &Path, keep: usize) -> Result<(), BackupError> {
    let files = list(dir).map_err(|source| BackupError::Io {
        what: "cannot list",
        path: dir.to_path_buf(),
        source,
    })?;
    let excess = files.len().saturating_sub(keep);
    for old in &files[..excess] {
        std::fs::remove_file(old).map_err(|source| BackupError::Io {
            what: "cannot remove old backup",
            path: old.clone(),
            source,
        })?;
        tracing::info!(path = %old.display(), "removed old backup");
    }
    Ok(())
}

/// Removes temp files left by a backup that was interrupted (crash, kill -9).
fn remove_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".partial") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time() {
        let a = file_name(1_700_000_000_000);
        let b = file_name(1_700_000_000_001);
        let c = file_name(1_800_000_000_000);
        assert_eq!(a, "warpbase-20231114T221320.000Z.db");
        assert!(a < b && b < c);
    }

    #[test]
    fn due_time_after_a_restart() {
        let hour = Duration::from_secs(3600);
        let t = 10_000_000;
        assert_eq!(until_due(None, t, hour), Duration::ZERO);
        assert_eq!(until_due(Some(t), t, hour), hour);
        assert_eq!(
            until_due(Some(t - 600_000), t, hour),
            Duration::from_secs(3000)
        );
        assert_eq!(until_due(Some(t - 7_200_000), t, hour), Duration::ZERO);
        // Clock went back a day: wait one interval, not a day.
        assert_eq!(until_due(Some(t + 86_400_000), t, hour), hour);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            std::fs::write(dir.path().join(file_name(1_000 * i)), b"x").expect("write");
        }
        std::fs::write(dir.path().join("other.db"), b"x").expect("write");
        prune(dir.path(), 2).expect("prune");
        let left = list(dir.path()).expect("list");
        assert_eq!(left.len(), 2);
        assert!(left[1].ends_with(file_name(4_000)));
        assert!(dir.path().join("other.db").exists(), "foreign files stay");
    }
}
