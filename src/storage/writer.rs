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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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
    /// Readiness probe: run alone, in its own transaction, after the current batch.
    Probe(oneshot::Sender<Result<(), StorageError>>),
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
    pub(super) fn spawn(
        conn: Connection,
    ) -> std::io::Result<(Writer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(8192);
        let stats = Arc::new(Counters::default());
        let counters = stats.clone();
        let handle = std::thread::Builder::new()
            .name("warpbase-writer".into())
            .spawn(move || run(conn, rx, &counters))?;
        Ok((Writer { tx, stats }, handle))
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

    /// Checks that the database can take a write that needs new pages: allocates a few in
    /// a transaction of its own and rolls it back. Fails on a full disk, a database at its
    /// size limit or a read-only file, where a bare `BEGIN`/`COMMIT` would still succeed.
    /// Running alone means a failing probe never aborts anyone else's writes.
    pub async fn probe(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Probe(tx))
            .await
            .map_err(|_| StorageError::WriterGone)?;
        rx.await.map_err(|_| StorageError::WriterGone)?
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

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Command>, stats: &Counters) {
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
            Command::Probe(reply) => probes.push(reply),
            Command::Close(reply) => close = Some(reply),
        }
        while close.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Command::Write(job)) => batch.push_back(job),
                Ok(Command::Probe(reply)) => probes.push(reply),
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
                    Command::Probe(p) => probes.push(p),
                    Command::Close(_) => {}
                }
            }
            commit_all(&mut conn, &mut batch, stats);
            answer_probes(&mut conn, probes);
            let _ = reply.send(checkpoint(&conn));
            return;
        }
        commit_all(&mut conn, &mut batch, stats);
        answer_probes(&mut conn, probes);
    }
}

/// Bytes the readiness probe inserts: more than a page, so it needs fresh pages.
const PROBE_BYTES: i64 = 16 * 1024;

fn answer_probes(conn: &mut Connection, probes: Vec<oneshot::Sender<Result<(), StorageError>>>) {
    if probes.is_empty() {
        return;
    }
    let result = probe(conn);
    for p in probes {
        let _ = p.send(result.clone());
    }
}

fn probe(conn: &mut Connection) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO meta (key, value, updated_at) VALUES ('ready_probe', zeroblob(?1), 0)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [PROBE_BYTES],
    )?;
    // Dropping the transaction rolls it back (also fine if SQLite already did).
    drop(tx);
    Ok(())
}

fn checkpoint(conn: &Connection) -> Result<(), StorageError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(StorageError::from)
}

/// Commits everything in `batch`, in as many transactions as it takes.
fn commit_all(conn: &mut Connection, batch: &mut VecDeque<Box<dyn WriteJob>>, stats: &Counters) {
    while !batch.is_empty() {
        commit_one_transaction(conn, batch, stats);
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
    metrics::histogram!("db_write_batch_size").record(done.len() as f64);
    metrics::histogram!("db_commit_seconds").record(started.elapsed().as_secs_f64());
    for job in done {
        job.answer(outcome.as_ref().map(|_| ()));
    }
}
