//! Storage: the only module that imports rusqlite.
//!
//! One SQLite file in WAL mode. Reads go through an r2d2 pool of read-only connections
//! inside `spawn_blocking`; writes go through the single [`Writer`] thread (group commit).
//! Services never write SQL: they call the typed functions of the submodules, composing
//! several in one `write` closure when they must commit together.

pub mod auth;
pub mod billing;
pub mod jobs;
pub mod meta;
pub mod migrate;
pub mod retention;
pub mod states;
pub mod uploads;
pub mod users;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::OpenFlags;

pub use rusqlite::Connection as Conn;
pub use writer::{Writer, WriterStats};

/// The file name of the database inside the data dir.
pub const DB_FILE: &str = "warpbase.db";
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong in storage. `Clone` because one commit error answers a whole batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("database error ({kind:?}): {message}")]
    Sqlite { kind: SqliteKind, message: String },
    #[error("database pool: {0}")]
    Pool(String),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("a write closure panicked")]
    Panicked,
    #[error("the write transaction was aborted by SQLite")]
    Aborted,
    #[error(
        "database schema version {found} is newer than this binary knows ({known}); upgrade warpbase"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("migration {name} failed: {message}")]
    Migration { name: String, message: String },
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("file system: {0}")]
    Io(String),
    #[error("only {free} bytes free in {dir}, below min_free_bytes ({floor})")]
    LowDiskSpace { dir: String, free: u64, floor: u64 },
}

/// The SQLite failures callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqliteKind {
    /// UNIQUE / PRIMARY KEY violation.
    Unique,
    /// Other constraint (CHECK, FOREIGN KEY, NOT NULL).
    Constraint,
    /// Disk full, read-only file, I/O error, busy: the database cannot take writes now.
    Unavailable,
    Other,
}

impl StorageError {
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            StorageError::Sqlite {
                kind: SqliteKind::Unique,
                ..
            }
        )
    }

    /// True when the failure is about the environment (disk, permissions), not the request.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StorageError::Sqlite {
                kind: SqliteKind::Unavailable,
                ..
            } | StorageError::WriterGone
                | StorageError::Pool(_)
                | StorageError::Aborted
                | StorageError::Io(_)
                | StorageError::LowDiskSpace { .. }
        )
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode as C;
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::ConstraintViolation => match f.extended_code {
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => SqliteKind::Unique,
                    _ => SqliteKind::Constraint,
                },
                C::DiskFull
                | C::ReadOnly
                | C::SystemIoFailure
                | C::CannotOpen
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::PermissionDenied => SqliteKind::Unavailable,
                _ => SqliteKind::Other,
            },
            _ => SqliteKind::Other,
        };
        StorageError::Sqlite {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<r2d2::Error> for StorageError {
    fn from(e: r2d2::Error) -> Self {
        StorageError::Pool(e.to_string())
    }
}

/// Handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

/// Cached prepared statements per connection; the app has under a hundred distinct ones.
const STATEMENT_CACHE: usize = 128;

struct Inner {
    path: PathBuf,
    readers: r2d2::Pool<SqliteConnectionManager>,
    writer: Writer,
    writer_thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Storage {
    /// Opens (creating if needed) `data_dir/warpbase.db`, applies pending migrations and
    /// starts the writer thread. Blocking: call from `spawn_blocking` or at startup.
    pub fn open(data_dir: &Path) -> Result<Storage, StorageError> {
        let path = data_dir.join(DB_FILE);
        let mut conn = open_writer_conn(&path)?;
        migrate::apply(&mut conn)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data_dir.to_path_buf());
        let (writer, handle) = Writer::spawn(conn, dir).map_err(|e| StorageError::Sqlite {
            kind: SqliteKind::Unavailable,
            message: format!("cannot start writer thread: {e}"),
        })?;
        let manager = SqliteConnectionManager::file(&path)
            .with_flags(
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_URI
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .with_init(|c| {
                c.busy_timeout(BUSY_TIMEOUT)?;
                c.execute_batch("PRAGMA query_only=ON; PRAGMA foreign_keys=ON;")?;
                tune_statements(c)
            });
        let size = std::thread::available_parallelism()
            .map(|n| n.get() as u32 * 2)
            .unwrap_or(4)
            .max(4);
        let readers = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(10))
            .build(manager)?;
        Ok(Storage {
            inner: Arc::new(Inner {
                path,
                readers,
                writer,
                writer_thread: std::sync::Mutex::new(Some(handle)),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with a pooled read-only connection on the blocking pool.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Conn) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        let pool = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.get().map_err(StorageError::from)?;
            f(&conn)
        })
        .await
        .unwrap_or_else(|_| Err(E::from(StorageError::Panicked)))
    }

    /// Runs `f` in the writer's next batch; resolves after the durable commit.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Conn) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        self.inner.writer.write(f).await
    }

    pub fn writer_stats(&self) -> WriterStats {
        self.inner.writer.stats()
    }

    /// The readiness probe: `Ok` if the writer answers, the file system has
    /// `min_free_bytes` free and a probe write commits (see [`Writer::probe`]); a full
    /// disk, a read-only database or a commit that just failed makes it fail.
    pub async fn ping_writer(&self, min_free_bytes: u64) -> Result<(), StorageError> {
        self.inner.writer.probe(min_free_bytes).await
    }

    /// Finishes queued writes, checkpoints the WAL and stops the writer thread.
    pub async fn close(&self) -> Result<(), StorageError> {
        let result = self.inner.writer.close().await;
        let handle = self
            .inner
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        result
    }

    /// A consistent copy of the live database into `dest` (`VACUUM INTO`), safe while
    /// serving: it reads one snapshot through a read connection.
    pub async fn backup_to(&self, dest: PathBuf) -> Result<(), StorageError> {
        let src = self.inner.path.clone();
        tokio::task::spawn_blocking(move || backup_file(&src, &dest))
            .await
            .unwrap_or(Err(StorageError::Panicked))
    }
}

/// Opens the read-write connection with the durability settings of the house.
pub fn open_writer_conn(path: &Path) -> Result<Conn, StorageError> {
    let conn = Conn::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // SQLite silently falls back to read-only when the file is not writable; say so now
    // instead of failing every write later.
    if conn.is_readonly(rusqlite::MAIN_DB)? {
        return Err(StorageError::Sqlite {
            kind: SqliteKind::Unavailable,
            message: format!(
                "{} is read-only for this user; warpbase needs to write its database \
                 (check the file's owner and permissions, and that the filesystem is not \
                 mounted read-only)",
                path.display()
            ),
        });
    }
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         PRAGMA foreign_keys=ON;
         PRAGMA temp_store=MEMORY;
         PRAGMA wal_autocheckpoint=4000;",
    )?;
    tune_statements(&conn)?;
    Ok(conn)
}

/// Statement settings of every connection:
/// - room for all of the app's cached statements (rusqlite keeps 16 by default, fewer
///   than the writer alone uses, so a mixed load re-prepared statements all the time);
/// - the query planner stability guarantee: a plan does not depend on bound values, so a
///   cached statement is never re-prepared because a value changed. Without it, the
///   claim's `LIMIT ?` (a different number of free slots each time) re-compiled the
///   claim on nearly every call.
fn tune_statements(conn: &Conn) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Copies the database at `src` into a new file `dest` from one consistent snapshot, and
/// flushes it to disk (`VACUUM INTO` itself does not sync its output). `dest` is created
/// empty with mode 0600 first (`VACUUM INTO` accepts an empty file), so the copy of every
/// password hash and session is never readable by other users, whatever the umask.
pub fn backup_file(src: &Path, dest: &Path) -> Result<(), StorageError> {
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(dest)
            .map_err(|e| StorageError::Io(format!("cannot create {}: {e}", dest.display())))?;
    }
    let conn = Conn::open_with_flags(src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute("VACUUM INTO ?1", [dest.to_string_lossy().as_ref()])?;
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| StorageError::Io(format!("cannot sync {}: {e}", dest.display())))?;
    Ok(())
}

/// `PRAGMA integrity_check` on a database file; `Ok(())` only if SQLite answers "ok".
pub fn integrity_check(path: &Path) -> Result<(), StorageError> {
    let conn = Conn::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let result: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if result == "ok" {
        Ok(())
    } else {
        Err(StorageError::Corrupt(result))
    }
}

/// Checkpoints the WAL of the database at `path` into the file and truncates it. Only
/// for a database no server has open (restore holds the instance lock).
pub fn checkpoint_file(path: &Path) -> Result<(), StorageError> {
    let conn = open_writer_conn(path)?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// The schema version (`user_version`) of a database file, opened read-only.
pub fn schema_version_of(path: &Path) -> Result<i64, StorageError> {
    let conn = Conn::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    migrate::current_version(&conn)
}

/// Milliseconds since the Unix epoch: how the schema stores time.
pub type Millis = i64;

/// An exclusive lock on the data dir (`flock` on `warpbase.lock`), held while serving, so
/// two servers never share one database — which also lets startup treat every job still
/// marked running as orphaned by a crash.
pub struct InstanceLock {
    _file: std::fs::File,
}

impl InstanceLock {
    pub fn acquire(data_dir: &Path) -> Result<InstanceLock, String> {
        let path = data_dir.join("warpbase.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                format!(
                    "cannot open {}: {e}; the data dir must be writable by the user running \
                     warpbase (check its owner and permissions, and that the filesystem is \
                     not mounted read-only)",
                    path.display()
                )
            })?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor we own for the lifetime of `file`.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                return Err(format!(
                    "another warpbase is already running with data dir {}",
                    data_dir.display()
                ));
            }
        }
        Ok(InstanceLock { _file: file })
    }
}
