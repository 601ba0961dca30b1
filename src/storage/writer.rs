//! The single writer: one SQLite connection owned by one thread, fed by a channel.
//!
//! Callers send closures; the thread drains whatever is queued and runs the batch in ONE
//! `BEGIN IMMEDIATE` transaction, each closure inside its own SAVEPOINT so a failing
//! closure rolls back alone. After the batch commits (with `synchronous=FULL`, so the
//! commit is durable) every caller gets its answer. This is group commit: one fsync is
//! shared by everyone who was waiting, so throughput grows with concurrency instead of
//! collapsing under `SQLITE_BUSY`. Nothing else in the process opens a write transaction.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::StorageError;

/// One caller's write: run it inside the batch, then answer once the batch's fate is known.
trait WriteJob: Send {
    /// Runs the closure; `true` if it succeeded and its savepoint should be kept.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the answer: the closure's result if the batch committed, else the error.
    fn answer(self: Box<Self>, commit: Result<(), &StorageError>);
}

struct Job<F, T, E> {
    f: Option<F>,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<F, T, E> WriteJob for Job<F, T, E>
where
    F: FnOnce(&Connection) -> Result<T, E> + Send,
    T: Send,
    E: From<StorageError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)))
            .unwrap_or_else(|_| Err(E::from(StorageError::Panicked)));
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, commit: Result<(), &StorageError>) {
        let answer = match (commit, self.result) {
            (Ok(()), Some(r)) => r,
            // A closure's own error explains more than the batch's.
            (Err(_), Some(Err(e))) => Err(e),
            (Err(ce), _) => Err(E::from(ce.clone())),
            (Ok(()), None) => Err(E::from(StorageError::Aborted)),
        };
        let _ = self.reply.send(answer);
    }
}

enum Command {
    Write(Box<dyn WriteJob>),
    /// Readiness probe: run alone, in its own transaction, after the current batch; the
    /// number is the free-space floor in bytes (0: not checked).
    Probe(oneshot::Sender<Result<(), StorageError>>, u64),
    /// Checkpoint the WAL into the main file and stop; sent on shutdown.
    Close(oneshot::Sender<Result<(), StorageError>>),
}

/// The most closures committed together; bounds the latency a batch adds to its first caller.
const MAX_BATCH: usize = 1024;

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
    stats: Arc<Counters>,
    health: Arc<Health>,
}

/// How long a probe's outcome answers readiness: a probe storm costs at most one commit
/// per second.
const PROBE_CACHE: Duration = Duration::from_secs(1);

/// Whether the writer's commits are landing, for readiness.
#[derive(Default)]
struct Health {
    /// Set by the writer thread when a transaction fails to commit, cleared by the next
    /// one that commits (a probe commits too).
    failing: AtomicBool,
    last_error: Mutex<Option<StorageError>>,
    /// Write closures that returned an error. A closure failing on a full disk rolls back
    /// only its savepoint, so the commit succeeds; a failed closure therefore makes the
    /// next probe run instead of answering from the cache (a unique violation costs one
    /// probe, a full disk is seen at once).
    closure_failures: AtomicU64,
    /// The last probe's outcome, when it was taken, and `closure_failures` at that time.
    last_probe: Mutex<Option<ProbeOutcome>>,
}

/// When a probe ran, `closure_failures` at that moment, and what it found.
type ProbeOutcome = (Instant, u64, Result<(), StorageError>);

impl Health {
    fn record(&self, outcome: Result<(), &StorageError>) {
        match outcome {
            Ok(()) => {
                if self.failing.load(Ordering::Acquire) {
                    self.failing.store(false, Ordering::Release);
                }
            }
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.clone());
                }
                self.failing.store(true, Ordering::Release);
            }
        }
    }

    /// The commit error that makes the writer unhealthy, if the last commit failed.
    fn failure(&self) -> Option<StorageError> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or(StorageError::Aborted),
        )
    }
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    writes: AtomicU64,
    failed_transactions: AtomicU64,
}

/// How much the writer has done since start: `writes / transactions` is the mean batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    pub transactions: u64,
    pub writes: u64,
    pub failed_transactions: u64,
}

impl Writer {
    /// Starts the writer thread on `conn`, which must already be configured (WAL, FULL sync).
    /// `dir` is the directory of the database file, whose free space the probe checks.
    pub(super) fn spawn(
        conn: Connection,
        dir: PathBuf,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(8192);
        let stats = Arc::new(Counters::default());
        let health = Arc::new(Health::default());
        let counters = stats.clone();
        let h = health.clone();
        let handle = std::thread::Builder::new()
            .name("warpbase-writer".into())
            .spawn(move || run(conn, rx, &counters, &h, &dir))?;
        Ok((Writer { tx, stats, health }, handle))
    }

    pub fn stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            writes: self.stats.writes.load(Ordering::Relaxed),
            failed_transactions: self.stats.failed_transactions.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` in the next batch and resolves once the batch is durably committed.
    ///
    /// If `f` returns `Err`, only its own changes are rolled back and its error is returned.
    /// If the commit itself fails, every caller in the batch gets the commit error.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StorageError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(Job {
            f: Some(f),
            result: None,
            reply,
        });
        self.tx
            .send(Command::Write(job))
            .await
            .map_err(|_| E::from(StorageError::WriterGone))?;
        rx.await.map_err(|_| E::from(StorageError::WriterGone))?
    }

    /// Checks that the database takes durable writes: the free space of its file system
    /// is at least `min_free_bytes`, a write that needs new pages fits (allocated in a
    /// savepoint that is rolled back), and a small upsert commits, fsync included. Runs in
    /// a transaction of its own, so a failing probe never aborts anyone else's writes.
    ///
    /// The outcome is reused for a second; but after any commit fails, the probe fails
    /// until a commit (this probe's or anyone's) succeeds again.
    pub async fn probe(&self, min_free_bytes: u64) -> Result<(), StorageError> {
        let failures = self.health.closure_failures.load(Ordering::Acquire);
        let cached = self
            .health
            .last_probe
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .filter(|(at, seen, _)| at.elapsed() < PROBE_CACHE && *seen == failures);
        if let Some((_, _, result)) = cached {
            result?;
            return match self.health.failure() {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Probe(tx, min_free_bytes))
            .await
            .map_err(|_| StorageError::WriterGone)?;
        let result = rx.await.map_err(|_| StorageError::WriterGone)?;
        if let Ok(mut last) = self.health.last_probe.lock() {
            *last = Some((Instant::now(), failures, result.clone()));
        }
        result
    }

    /// Asks the writer to finish queued writes, checkpoint the WAL and exit.
    pub async fn close(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Close(tx))
            .await
            .map_err(|_| StorageError::WriterGone)?;
        rx.await.map_err(|_| StorageError::WriterGone)?
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    stats: &Counters,
    health: &Health,
    dir: &Path,
) {
    let mut batch: VecDeque<Box<dyn WriteJob>> = VecDeque::with_capacity(MAX_BATCH);
    loop {
        let Some(first) = rx.blocking_recv() else {
            if let Err(e) = checkpoint(&conn) {
                tracing::warn!(error = %e, "WAL checkpoint at writer exit failed");
            }
            return;
        };
        let mut close = None;
        let mut probes = Vec::new();
        match first {
            Command::Write(job) => batch.push_back(job),
            Command::Probe(reply, floor) => probes.push((reply, floor)),
            Command::Close(reply) => close = Some(reply),
        }
        while close.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Command::Write(job)) => batch.push_back(job),
                Ok(Command::Probe(reply, floor)) => probes.push((reply, floor)),
                Ok(Command::Close(reply)) => close = Some(reply),
                Err(_) => break,
            }
        }
        if let Some(reply) = close {
            // Writes already queued still land; later ones see WriterGone instead of hanging.
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Command::Write(job) => batch.push_back(job),
                    Command::Probe(p, floor) => probes.push((p, floor)),
                    Command::Close(_) => {}
                }
            }
            commit_all(&mut conn, &mut batch, stats, health);
            answer_probes(&mut conn, probes, health, dir);
            let _ = reply.send(checkpoint(&conn));
            return;
        }
        commit_all(&mut conn, &mut batch, stats, health);
        answer_probes(&mut conn, probes, health, dir);
    }
}

/// Bytes the readiness probe inserts: more than a page, so it needs fresh pages.
const PROBE_BYTES: i64 = 16 * 1024;

type ProbeReply = (oneshot::Sender<Result<(), StorageError>>, u64);

fn answer_probes(conn: &mut Connection, probes: Vec<ProbeReply>, health: &Health, dir: &Path) {
    let Some(floor) = probes.iter().map(|(_, f)| *f).max() else {
        return;
    };
    let result = probe(conn, dir, floor);
    match &result {
        // Low space is not a failed commit: nothing was attempted.
        Err(StorageError::LowDiskSpace { .. }) => {}
        r => health.record(r.as_ref().map(|_| ())),
    }
    for (p, _) in probes {
        let _ = p.send(result.clone());
    }
}

fn probe(conn: &mut Connection, dir: &Path, min_free_bytes: u64) -> Result<(), StorageError> {
    if min_free_bytes > 0
        && let Some(free) = free_bytes(dir)
        && free < min_free_bytes
    {
        return Err(StorageError::LowDiskSpace {
            dir: dir.display().to_string(),
            free,
            floor: min_free_bytes,
        });
    }
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        // Pages that must be new: fails at a size limit where an update in place would
        // not. Rolled back, so the probe never grows the file.
        let sp = tx.savepoint()?;
        sp.execute(
            "INSERT INTO meta (key, value, updated_at) VALUES ('ready_probe_grow', zeroblob(?1), 0)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [PROBE_BYTES],
        )?;
        drop(sp);
    }
    if tx.is_autocommit() {
        return Err(StorageError::Aborted);
    }
    // One small row rewritten and committed: the WAL append and fsync of a real write.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    tx.execute(
        "INSERT INTO meta (key, value, updated_at) VALUES ('ready_probe', 'ok', ?1)
         ON CONFLICT(key) DO UPDATE SET updated_at = excluded.updated_at",
        [now],
    )?;
    tx.commit()?;
    Ok(())
}

/// Bytes available to this (unprivileged) process on the file system holding `dir`;
/// `None` where that cannot be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we own; `path` is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        if rc != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

fn checkpoint(conn: &Connection) -> Result<(), StorageError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(StorageError::from)
}

/// Commits everything in `batch`, in as many transactions as it takes.
fn commit_all(
    conn: &mut Connection,
    batch: &mut VecDeque<Box<dyn WriteJob>>,
    stats: &Counters,
    health: &Health,
) {
    while !batch.is_empty() {
        commit_one_transaction(conn, batch, stats, health);
    }
}

/// Runs jobs from the front of `batch` in one transaction and answers them.
///
/// If SQLite aborts the transaction midway (e.g. `SQLITE_FULL`), the jobs run so far are
/// answered with the error and the rest stay in `batch` for a fresh transaction, so one
/// bad write never fails writes that were not part of the aborted transaction.
fn commit_one_transaction(
    conn: &mut Connection,
    batch: &mut VecDeque<Box<dyn WriteJob>>,
    stats: &Counters,
    health: &Health,
) {
    let started = Instant::now();
    let mut done: Vec<Box<dyn WriteJob>> = Vec::with_capacity(batch.len());
    let outcome = (|| -> Result<(), StorageError> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        while let Some(mut job) = batch.pop_front() {
            let sp = match tx.savepoint() {
                Ok(sp) => sp,
                Err(e) => {
                    done.push(job);
                    return Err(e.into());
                }
            };
            let ok = job.run(&sp);
            if !ok {
                health.closure_failures.fetch_add(1, Ordering::AcqRel);
            }
            done.push(job);
            if ok {
                sp.commit()?;
            } else {
                // Dropping a savepoint rolls it back (rusqlite's default DropBehavior).
                drop(sp);
            }
            if tx.is_autocommit() {
                // SQLite rolled the whole transaction back on its own.
                return Err(StorageError::Aborted);
            }
        }
        tx.commit()?;
        Ok(())
    })();
    if let Err(e) = &outcome {
        tracing::error!(error = %e, jobs = done.len(), "write transaction failed");
        if done.is_empty() {
            // BEGIN itself failed (read-only or broken database): fail everything queued
            // rather than spinning on it.
            done.extend(batch.drain(..));
        }
    }
    stats.transactions.fetch_add(1, Ordering::Relaxed);
    stats.writes.fetch_add(done.len() as u64, Ordering::Relaxed);
    if outcome.is_err() {
        stats.failed_transactions.fetch_add(1, Ordering::Relaxed);
    }
    health.record(outcome.as_ref().map(|_| ()));
    metrics::histogram!("db_write_batch_size").record(done.len() as f64);
    metrics::histogram!("db_commit_seconds").record(started.elapsed().as_secs_f64());
    for job in done {
        job.answer(outcome.as_ref().map(|_| ()));
    }
}
