//! The workers: one dispatcher per queue, the attempt runner, the lease heartbeat, the
//! rescuer and gauges (the app-wide periodic tasks are in `ops::periodic`). Everything here is owned by the App's task
//! tracker and stops on the shutdown token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::hub::JobEventKind;
use super::plan::Metering;
use super::{JobContext, JobFailure, Progress, Running};
use crate::state::AppState;
use crate::storage::jobs::{self as q, Finish, JobRow};
use crate::storage::states::JobStatus;
use crate::storage::{Conn, StorageError};

/// How long an attempt may keep running after its timeout or cancel signal before it is
/// abandoned (its handler future dropped, child processes killed).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Fallback poll when nothing wakes a dispatcher.
const POLL: Duration = Duration::from_secs(1);
/// How often a running attempt's latest progress is saved.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Starts every background task of the jobs module.
pub fn start(state: &AppState) {
    let s = state.clone();
    state.tasks.spawn(async move {
        // We hold the data dir's instance lock, so any job still marked running belongs to
        // a process that died: put it back in the queue before dispatching anything.
        let now = s.now_millis();
        match s
            .storage
            .write(move |c| q::rescue_expired(c, i64::MAX, now, &|_| false))
            .await
        {
            Ok((requeued, dead)) if !requeued.is_empty() || !dead.is_empty() => {
                tracing::warn!(
                    requeued = requeued.len(),
                    dead = dead.len(),
                    "recovered jobs interrupted by an unclean stop"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "startup job recovery failed"),
        }
        for (name, queue) in &s.config.jobs.queues {
            let st = s.clone();
            let name = name.clone();
            let concurrency = queue.concurrency as usize;
            let timeout = queue.timeout;
            s.tasks
                .spawn(async move { dispatch(st, name, concurrency, timeout).await });
        }
        let st = s.clone();
        s.tasks.spawn(async move { heartbeat(st).await });
        let st = s.clone();
        s.tasks.spawn(async move { housekeeping(st).await });
    });
}

async fn dispatch(state: AppState, queue: String, concurrency: usize, timeout: Duration) {
    let jobs = state.jobs.clone();
    let Some(wake) = jobs.wake_handle(&queue) else {
        return;
    };
    let slots = Arc::new(Semaphore::new(concurrency));
    // Attempts hand their outcome to this queue's recorder, which writes the outcomes
    // that are ready together. It stops once this dispatcher and every attempt are gone.
    let (ended, ended_rx) = mpsc::unbounded_channel();
    let st = state.clone();
    let refill = Refill {
        queue: queue.clone(),
        timeout,
        ended: ended.downgrade(),
        slots: slots.clone(),
    };
    state
        .tasks
        .spawn(async move { record_ended(st, ended_rx, refill).await });
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = state.shutdown.cancelled() => return,
        };
        let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let claimed = claim(&state, &queue, permits.len()).await;
        let rows = match claimed {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(queue = %queue, error = %e, "claiming jobs failed");
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = state.shutdown.cancelled() => return,
                }
                continue;
            }
        };
        if rows.is_empty() {
            drop(permits);
            let wait = next_wait(&state, &queue).await;
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = state.shutdown.cancelled() => return,
            }
            continue;
        }
        start_attempts(&state, rows, permits, timeout, &ended);
    }
}

/// Claims up to `n` runnable jobs of `queue` for this worker, with a fresh lease.
async fn claim(state: &AppState, queue: &str, n: usize) -> Result<Vec<JobRow>, StorageError> {
    let now = state.now_millis();
    let worker = state.jobs.worker_id().to_string();
    let qname = queue.to_string();
    let lease_until = now + state.config.jobs.lease.as_millis() as i64;
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let turn = state.jobs.turn_handle(queue);
    state
        .storage
        .write(move |c| {
            // Locked only inside the writer, which runs one closure at a time.
            let mut turn = turn.lock().unwrap_or_else(|p| p.into_inner());
            q::claim(c, &qname, n, now, lease_until, &worker, &mut turn)
        })
        .await
}

/// Runs each claimed job in its own task, holding one of `slots` until it is recorded.
/// Callers claim at most as many jobs as they have slots; slots beyond the rows are
/// released.
fn start_attempts(
    state: &AppState,
    rows: Vec<JobRow>,
    mut slots: Vec<OwnedSemaphorePermit>,
    timeout: Duration,
    ended: &mpsc::UnboundedSender<Ended>,
) {
    debug_assert!(rows.len() <= slots.len(), "claimed more jobs than slots");
    slots.truncate(rows.len());
    let cancels: Vec<CancellationToken> = rows.iter().map(|_| CancellationToken::new()).collect();
    if let Ok(mut running) = state.jobs.inner.running.lock() {
        for (row, cancel) in rows.iter().zip(&cancels) {
            running.insert(
                row.id.clone(),
                Running {
                    cancel: cancel.clone(),
                },
            );
        }
    }
    for ((row, slot), cancel) in rows.into_iter().zip(slots).zip(cancels) {
        let st = state.clone();
        let ended = ended.clone();
        state
            .tasks
            .spawn(async move { run_attempt(st, row, cancel, timeout, slot, ended).await });
    }
}

/// How long an idle dispatcher sleeps: until the next scheduled job, at most `POLL`.
async fn next_wait(state: &AppState, queue: &str) -> Duration {
    let qn = queue.to_string();
    match state.storage.read(move |c| q::next_run_at(c, &qn)).await {
        Ok(Some(at)) => {
            let ms = (at - state.now_millis()).clamp(0, POLL.as_millis() as i64);
            Duration::from_millis(ms as u64)
        }
        _ => POLL,
    }
}

/// An attempt that ended and waits for its outcome to be recorded. It holds its queue
/// slot until then, so a queue never runs more than its concurrency, recorded or not.
struct Ended {
    row: JobRow,
    started_at: i64,
    outcome: Result<Value, JobFailure>,
    billable: bool,
    /// The latest progress not yet saved, written with the outcome.
    progress: Option<(u8, String)>,
    /// The recorder holds it until the outcome is recorded, then hands it to a job it
    /// claimed in this one's place or releases it.
    slot: Option<OwnedSemaphorePermit>,
}

async fn run_attempt(
    state: AppState,
    row: JobRow,
    cancel: CancellationToken,
    queue_timeout: Duration,
    slot: OwnedSemaphorePermit,
    ended: mpsc::UnboundedSender<Ended>,
) {
    let jobs = state.jobs.clone();
    let started_at = state.now_millis();
    jobs.hub().publish(
        &row.id,
        row.user_id.as_deref(),
        JobEventKind::State {
            id: row.id.clone(),
            status: JobStatus::Running,
            attempt: row.attempt,
        },
    );
    if row.cancel_requested {
        cancel.cancel();
    }
    let latest: Arc<Mutex<Option<(u8, String)>>> = Default::default();
    let spec = jobs.kind(&row.kind);
    let outcome: Result<Value, JobFailure> = match (spec, serde_json::from_str(&row.payload)) {
        (None, _) => Err(JobFailure::Permanent(format!(
            "no handler for job kind {:?}",
            row.kind
        ))),
        (_, Err(e)) => Err(JobFailure::Permanent(format!(
            "stored payload is not JSON: {e}"
        ))),
        (Some(spec), Ok(payload)) => {
            let timeout = spec.timeout.unwrap_or(queue_timeout);
            let ctx = JobContext {
                state: state.clone(),
                job_id: row.id.clone(),
                user_id: row.user_id.clone(),
                kind: row.kind.clone(),
                attempt: row.attempt,
                payload,
                cancel: cancel.clone(),
                progress: Progress {
                    hub: jobs.hub().clone(),
                    job_id: row.id.clone(),
                    user_id: row.user_id.clone(),
                    latest: latest.clone(),
                },
                timeout,
            };
            run_with_limits(
                &state,
                spec.handler.run(ctx),
                &cancel,
                timeout,
                &row.id,
                &latest,
            )
            .await
        }
    };
    let done = Ended {
        started_at,
        outcome,
        billable: spec.is_some_and(|s| s.billable),
        // Kept for failures too, so the dead-letter queue shows how far the attempt got.
        progress: take_latest(&latest),
        row,
        slot: Some(slot),
    };
    if let Err(mpsc::error::SendError(done)) = ended.send(done) {
        // The recorder is gone (it only stops when every sender is): leave the job to the
        // rescuer rather than heartbeating a lease nobody will end.
        tracing::error!(job = %done.row.id, "no recorder for the attempt's outcome; the rescuer will re-queue it");
        if let Ok(mut running) = jobs.inner.running.lock() {
            running.remove(&done.row.id);
        }
    }
}

fn take_latest(latest: &Mutex<Option<(u8, String)>>) -> Option<(u8, String)> {
    latest.lock().ok().and_then(|mut l| l.take())
}

/// Runs the handler future under the attempt timeout, persisting progress once a second.
/// On timeout or cancel the handler is told to stop and given `STOP_GRACE` to do so.
async fn run_with_limits(
    state: &AppState,
    mut fut: futures_util::future::BoxFuture<'static, Result<Value, JobFailure>>,
    cancel: &CancellationToken,
    timeout: Duration,
    job_id: &str,
    latest: &Mutex<Option<(u8, String)>>,
) -> Result<Value, JobFailure> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Most attempts of small kinds end at their first poll: they need no timers.
    if let Some(r) = (&mut fut).now_or_never() {
        return r;
    }
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(expired);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The save in flight, polled beside the handler: awaiting it in the tick's arm would
    // stop polling the handler for a commit (an fsync), and a `command` kind's PROGRESS
    // lines would wait in its pipe for that long before reaching subscribers.
    let mut saving: Option<futures_util::future::BoxFuture<'static, ()>> = None;
    let result = loop {
        tokio::select! {
            r = &mut fut => break r,
            () = async { if let Some(s) = saving.as_mut() { s.await } }, if saving.is_some() => {
                saving = None;
            }
            _ = &mut expired => {
                cancel.cancel();
                let _ = tokio::time::timeout(STOP_GRACE, &mut fut).await;
                break Err(JobFailure::Timeout);
            }
            _ = cancel.cancelled() => {
                break match tokio::time::timeout(STOP_GRACE, &mut fut).await {
                    Ok(Ok(v)) => Ok(v),
                    _ => Err(JobFailure::Canceled),
                };
            }
            _ = tick.tick(), if saving.is_none() => {
                if let Some((pct, msg)) = take_latest(latest) {
                    let id = job_id.to_string();
                    let now = state.now_millis();
                    let storage = state.storage.clone();
                    saving = Some(Box::pin(async move {
                        let job = id.clone();
                        let r = storage
                            .write(move |c| q::save_progress(c, &id, pct, &msg, now))
                            .await;
                        if let Err(e) = r {
                            tracing::warn!(job, error = %e, "saving progress failed");
                        }
                    }));
                }
            }
        }
    };
    // The save took its progress out of `latest`, so the outcome will not carry it: let it
    // land first (it is written only while the job is still running).
    if let Some(s) = saving {
        s.await;
    }
    result
}

/// The most attempt outcomes recorded in one write.
const MAX_RECORD_BATCH: usize = 512;

/// What a recorder needs to put the slots it frees straight back to work.
struct Refill {
    queue: String,
    timeout: Duration,
    /// Weak, so the recorder does not keep its own channel open: it ends once the
    /// dispatcher and every attempt are gone.
    ended: mpsc::WeakUnboundedSender<Ended>,
    /// The queue's slots: with some free, the dispatcher is idle and claims on its own.
    slots: Arc<Semaphore>,
}

/// A queue's recorder: writes the outcomes of the attempts that ended, all that are ready
/// in one writer closure, then publishes them and frees their slots. The write is durable
/// before anyone hears of an outcome or the slot runs another job.
///
/// When the queue is saturated it claims, alongside that write, as many new jobs as the
/// batch frees slots (a separate closure sent at the same moment, so the writer nearly
/// always commits both together): a busy queue then needs one commit per round of jobs
/// instead of two (outcome, then the dispatcher's claim), and its slots pass straight from
/// the ended jobs to the new ones.
async fn record_ended(state: AppState, mut rx: mpsc::UnboundedReceiver<Ended>, refill: Refill) {
    let mut counters = RunCounters::default();
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_RECORD_BATCH).await > 0 {
        let ended = refill
            .ended
            .upgrade()
            .filter(|_| !state.shutdown.is_cancelled());
        // Held until the outcomes are recorded, then handed to the new jobs or released.
        let slots: Vec<OwnedSemaphorePermit> =
            batch.iter_mut().filter_map(|e| e.slot.take()).collect();
        // Only a saturated queue refills here; an idle dispatcher picks up new work itself.
        let saturated = refill.slots.available_permits() == 0;
        let n = if ended.is_some() && saturated {
            slots.len()
        } else {
            0
        };
        let claimed = async {
            match n {
                0 => Ok(Vec::new()),
                n => claim(&state, &refill.queue, n).await,
            }
        };
        let ((), claimed) = tokio::join!(record_batch(&state, &mut batch, &mut counters), claimed);
        match (claimed, ended) {
            (Ok(rows), Some(ended)) if !rows.is_empty() => {
                start_attempts(&state, rows, slots, refill.timeout, &ended);
            }
            (Err(e), _) => {
                tracing::error!(queue = %refill.queue, error = %e, "claiming jobs failed");
            }
            _ => {}
        }
        batch.clear();
    }
}

/// What the recorder writes for one attempt.
struct Record {
    id: String,
    attempt: u32,
    user_id: Option<String>,
    started_at: i64,
    status: JobStatus,
    result: Option<String>,
    error: Option<String>,
    retry_at: i64,
    outcome: &'static str,
    progress: Option<(u8, String)>,
    billable: bool,
}

impl Record {
    /// Decides how the attempt ends (retry with backoff, dead, succeeded, canceled).
    fn new(state: &AppState, e: &mut Ended, now: i64) -> Record {
        let cfg = &state.config.jobs;
        let row = &e.row;
        let decision = super::outcome::decide(
            e.outcome.as_ref().err(),
            row.attempt,
            row.max_attempts,
            now,
            super::outcome::Backoff {
                base: cfg.backoff_base,
                cap: cfg.backoff_cap,
            },
            &mut rand::thread_rng(),
        );
        let (result, error) = match &e.outcome {
            Ok(v) => (Some(v.to_string()), None),
            Err(f) => (None, Some(f.to_string())),
        };
        let (status, retry_at, outcome) =
            (decision.status(), decision.run_at(now), decision.label());
        Record {
            id: row.id.clone(),
            attempt: row.attempt,
            user_id: row.user_id.clone(),
            started_at: e.started_at,
            status,
            result,
            error,
            retry_at,
            outcome,
            progress: e.progress.take(),
            billable: e.billable,
        }
    }

    /// Records the attempt; false if the job changed meanwhile (rescued, canceled), when
    /// nothing is written.
    fn write(&self, c: &Conn, meter: &dyn Metering, now: i64) -> Result<bool, StorageError> {
        let end = self.end();
        let changed = q::finish(
            c,
            end.id,
            end.attempt,
            end.started_at,
            &end.how,
            end.progress,
            now,
        )?;
        if changed {
            self.record_usage(c, meter, now)?;
        }
        Ok(changed)
    }

    /// Metered plans report usage through the queue, in the transaction that records the
    /// attempt, so a job counts once if and only if it succeeded.
    fn record_usage(&self, c: &Conn, meter: &dyn Metering, now: i64) -> Result<(), StorageError> {
        if self.status == JobStatus::Succeeded
            && self.billable
            && let Some(uid) = &self.user_id
        {
            meter.record_success_in(c, uid, &self.id, now)?;
        }
        Ok(())
    }

    fn end(&self) -> q::AttemptEnd<'_> {
        let how = match self.status {
            JobStatus::Succeeded => Finish::Succeeded {
                result: self.result.as_deref().unwrap_or("null"),
            },
            JobStatus::Canceled => Finish::Canceled {
                error: self.error.as_deref(),
            },
            JobStatus::Retrying => Finish::Retry {
                error: self.error.as_deref().unwrap_or(""),
                run_at: self.retry_at,
                outcome: self.outcome,
            },
            _ => Finish::Dead {
                error: self.error.as_deref().unwrap_or(""),
                outcome: self.outcome,
            },
        };
        q::AttemptEnd {
            id: &self.id,
            attempt: self.attempt,
            started_at: self.started_at,
            how,
            progress: self
                .progress
                .as_ref()
                .map(|(pct, msg)| (*pct, msg.as_str())),
        }
    }
}

/// Records a batch of attempts in one closure: [`q::finish_many`], then the usage of
/// those that succeeded. Fails at the first error, with the record's index if known.
fn write_records(
    c: &Conn,
    records: &[Record],
    meter: &dyn Metering,
    now: i64,
) -> Result<Vec<bool>, BatchError> {
    let ends: Vec<q::AttemptEnd<'_>> = records.iter().map(Record::end).collect();
    let changed = q::finish_many(c, &ends, now).map_err(|e| BatchError::Record(None, e))?;
    for (i, (r, _)) in records
        .iter()
        .zip(&changed)
        .enumerate()
        .filter(|(_, (_, c))| **c)
    {
        r.record_usage(c, meter, now)
            .map_err(|e| BatchError::Record(Some(i), e))?;
    }
    Ok(changed)
}

/// Why a batch of records was not written.
enum BatchError {
    /// Record `.0` (if known) failed; the batch's changes were rolled back.
    Record(Option<usize>, StorageError),
    /// The transaction failed (commit, abort, writer gone).
    Storage(StorageError),
}

impl From<StorageError> for BatchError {
    fn from(e: StorageError) -> Self {
        BatchError::Storage(e)
    }
}

async fn record_batch(state: &AppState, batch: &mut [Ended], counters: &mut RunCounters) {
    let now = state.now_millis();
    let records: Arc<Vec<Record>> = Arc::new(
        batch
            .iter_mut()
            .map(|e| Record::new(state, e, now))
            .collect(),
    );
    let recs = records.clone();
    let jobs = state.jobs.clone();
    let written = state
        .storage
        .write(move |c| write_records(c, &recs, jobs.metering(), now))
        .await;
    let changed: Vec<Result<bool, StorageError>> = match written {
        Ok(changed) => changed.into_iter().map(Ok).collect(),
        Err(BatchError::Record(_, e)) if records.len() == 1 => vec![Err(e)],
        Err(BatchError::Record(i, e)) => {
            // The batch's write failed and rolled back: write each again on its own (the
            // writer gives every closure its own savepoint), so a job whose write fails
            // fails alone. The closures still share one commit.
            let job = i.map(|i| records[i].id.as_str()).unwrap_or("?");
            tracing::warn!(job, error = %e, "recording a batch of attempts failed; recording them one by one");
            futures_util::future::join_all((0..records.len()).map(|i| {
                let recs = records.clone();
                let jobs = state.jobs.clone();
                state
                    .storage
                    .write(move |c| recs[i].write(c, jobs.metering(), now))
            }))
            .await
        }
        Err(BatchError::Storage(e)) => records.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut retrying = false;
    for ((e, r), changed) in batch.iter_mut().zip(records.iter()).zip(changed) {
        counters.get(&e.row.kind, r.outcome).increment(1);
        match changed {
            Ok(true) => {
                retrying |= r.status == JobStatus::Retrying;
                let result = match &mut e.outcome {
                    Ok(v) => Some(std::mem::take(v)),
                    Err(_) => None,
                };
                publish_ended(state, r, result);
            }
            Ok(false) => {
                tracing::info!(job = %r.id, "attempt result discarded: the job changed meanwhile");
            }
            Err(err) => {
                tracing::error!(job = %r.id, error = %err, "recording the attempt failed; the lease will expire and the rescuer re-queues it")
            }
        }
    }
    if let Ok(mut running) = state.jobs.inner.running.lock() {
        for r in records.iter() {
            running.remove(&r.id);
        }
    }
    // The caller clears the batch, which frees the slots.
    if retrying && let Some(e) = batch.first() {
        state.jobs.notify(&e.row.queue);
    }
}

/// `job_runs_total` handles by outcome and kind, so counting a run neither allocates
/// labels nor looks the series up in the registry.
#[derive(Default)]
struct RunCounters(HashMap<&'static str, HashMap<String, metrics::Counter>>);

impl RunCounters {
    fn get(&mut self, kind: &str, outcome: &'static str) -> &metrics::Counter {
        let by_kind = self.0.entry(outcome).or_default();
        if !by_kind.contains_key(kind) {
            let c = metrics::counter!("job_runs_total", "kind" => kind.to_string(), "outcome" => outcome);
            by_kind.insert(kind.to_string(), c);
        }
        &by_kind[kind]
    }
}

/// Publishes the recorded end of an attempt: its state and, if final, the `done` event.
fn publish_ended(state: &AppState, r: &Record, result: Option<Value>) {
    publish_state(
        state,
        &r.id,
        r.user_id.as_deref(),
        r.status,
        r.attempt,
        result,
        r.error.clone(),
    );
}

/// Publishes the state (and, if final, the `done` event) of a job row.
pub fn publish_outcome(state: &AppState, row: &JobRow) {
    let result = row
        .result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok());
    publish_state(
        state,
        &row.id,
        row.user_id.as_deref(),
        row.status,
        row.attempt,
        result,
        row.error.clone(),
    );
}

/// A job's new state event and, when the state is final, its `done` event.
fn publish_state(
    state: &AppState,
    id: &str,
    user_id: Option<&str>,
    status: JobStatus,
    attempt: u32,
    result: Option<Value>,
    error: Option<String>,
) {
    let hub = state.jobs.hub();
    hub.publish(
        id,
        user_id,
        JobEventKind::State {
            id: id.to_string(),
            status,
            attempt,
        },
    );
    if status.is_terminal() {
        hub.publish(
            id,
            user_id,
            JobEventKind::Done {
                id: id.to_string(),
                status,
                result,
                error,
            },
        );
    }
}

/// Extends the leases of the jobs this process runs, every third of the lease.
async fn heartbeat(state: AppState) {
    let lease = state.config.jobs.lease;
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = state.shutdown.cancelled() => return,
        }
        let ids = state.jobs.running_ids();
        if ids.is_empty() {
            continue;
        }
        let now = state.now_millis();
        let until = now + lease.as_millis() as i64;
        if let Err(e) = state
            .storage
            .write(move |c| q::extend_leases(c, &ids, until, now))
            .await
        {
            tracing::error!(error = %e, "extending job leases failed");
        }
    }
}

/// The rescuer, hub sweeping and gauges, on timers. (The app-wide periodic tasks are
/// `ops::periodic`'s.)
async fn housekeeping(state: AppState) {
    let lease = state.config.jobs.lease;
    let mut tick = tokio::time::interval((lease / 2).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds: u64 = 0;
    let mut gauges = Gauges::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        rounds += 1;
        rescue(&state).await;
        state.jobs.hub().sweep();
        if rounds % 10 == 1 {
            gauges.update(&state).await;
        }
    }
}

async fn rescue(state: &AppState) {
    let now = state.now_millis();
    let jobs = state.jobs.clone();
    let result = state
        .storage
        .write(move |c| q::rescue_expired(c, now, now, &|id| jobs.is_running_here(id)))
        .await;
    match result {
        Ok((requeued, dead)) => {
            if !requeued.is_empty() || !dead.is_empty() {
                tracing::warn!(
                    requeued = requeued.len(),
                    dead = dead.len(),
                    "rescued jobs with expired leases"
                );
                for q in state.config.jobs.queues.keys() {
                    state.jobs.notify(q);
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "rescuing expired jobs failed"),
    }
}

/// The full count of ended jobs may take this share of one core: it runs again after a
/// thousand times its own duration (every refresh while the table is small, about every
/// ten minutes at a million jobs), and at least once an hour.
const ENDED_RECOUNT_FACTOR: u32 = 1000;
const ENDED_RECOUNT_MAX: Duration = Duration::from_secs(3600);

/// The `jobs{queue,status}` gauge. The backlog, running and dead jobs are recounted on
/// every refresh through their partial indexes; the ended ones (most of the table, a full
/// scan) as often as [`ENDED_RECOUNT_FACTOR`] allows. Every queue gets all six statuses,
/// zero included, so a series drops to 0 when its last job leaves that status instead of
/// keeping its last count.
#[derive(Default)]
struct Gauges {
    ended: q::Counts,
    /// When the ended jobs are due for a recount (None: never counted).
    ended_next: Option<tokio::time::Instant>,
    /// Every queue ever reported (configured or found in the table).
    queues: std::collections::BTreeSet<String>,
}

impl Gauges {
    async fn update(&mut self, state: &AppState) {
        let now = tokio::time::Instant::now();
        if self.ended_next.is_none_or(|at| now >= at) {
            match state.storage.read(q::counts_ended).await {
                Ok(ended) => {
                    self.ended = ended;
                    let took = now.elapsed().saturating_mul(ENDED_RECOUNT_FACTOR);
                    self.ended_next = Some(now + took.min(ENDED_RECOUNT_MAX));
                }
                Err(e) => tracing::warn!(error = %e, "counting ended jobs failed"),
            }
        }
        let indexed = match state.storage.read(q::counts_indexed).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "counting jobs failed");
                return;
            }
        };
        self.queues.extend(state.config.jobs.queues.keys().cloned());
        for (queue, status, n) in gauge_values(&mut self.queues, &[&indexed, &self.ended]) {
            metrics::gauge!("jobs", "queue" => queue, "status" => status).set(n as f64);
        }
    }
}

/// Every (queue, status) of `queues` and of the counts, with its count or 0. Queues found
/// in the counts are added to `queues`.
fn gauge_values(
    queues: &mut std::collections::BTreeSet<String>,
    counts: &[&q::Counts],
) -> Vec<(String, &'static str, u64)> {
    let mut found: HashMap<(&str, &str), u64> = HashMap::new();
    for (queue, status, n) in counts.iter().flat_map(|c| c.iter()) {
        queues.insert(queue.clone());
        *found.entry((queue.as_str(), status.as_str())).or_default() += n;
    }
    queues
        .iter()
        .flat_map(|queue| {
            JobStatus::ALL.iter().map(|status| {
                let n = found
                    .get(&(queue.as_str(), status.as_str()))
                    .copied()
                    .unwrap_or(0);
                (queue.clone(), status.as_str(), n)
            })
        })
        .collect()
}

/// On graceful shutdown after the grace period: give back the jobs still running here so
/// the next start runs them again without spending an attempt.
pub async fn release_running(state: &AppState) {
    let ids = state.jobs.running_ids();
    if ids.is_empty() {
        return;
    }
    let now = state.now_millis();
    let released = ids.clone();
    match state
        .storage
        .write(move |c| q::release(c, &released, now))
        .await
    {
        Ok(n) => tracing::warn!(jobs = n, "released unfinished jobs back to the queue"),
        Err(e) => {
            tracing::error!(error = %e, "releasing unfinished jobs failed; they will be recovered at next start")
        }
    }
    // Only now tell the handlers to stop: an outcome recorded before the release (a
    // `canceled` from this very signal) would otherwise end the job instead of returning it.
    for id in &ids {
        state.jobs.signal_cancel(id);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn counts(rows: &[(&str, &str, u64)]) -> q::Counts {
        rows.iter()
            .map(|(q, s, n)| (q.to_string(), s.to_string(), *n))
            .collect()
    }

    #[test]
    fn the_jobs_gauge_has_every_status_of_every_queue_and_drops_to_zero() {
        let mut queues: BTreeSet<String> = ["fast".to_string()].into();
        let indexed = counts(&[("fast", "queued", 5), ("old", "dead", 2)]);
        let ended = counts(&[("fast", "succeeded", 7)]);
        let v = gauge_values(&mut queues, &[&indexed, &ended]);
        assert_eq!(v.len(), 12, "two queues × six statuses: {v:?}");
        let get = |v: &[(String, &str, u64)], q: &str, s: &str| {
            v.iter()
                .find(|(vq, vs, _)| vq == q && *vs == s)
                .map(|(_, _, n)| *n)
        };
        assert_eq!(get(&v, "fast", "queued"), Some(5));
        assert_eq!(get(&v, "fast", "succeeded"), Some(7));
        assert_eq!(get(&v, "fast", "running"), Some(0));
        assert_eq!(get(&v, "old", "dead"), Some(2), "a queue only in the table");
        // The backlog drained and the old queue's dead jobs were discarded: both series
        // read 0 instead of keeping their last counts.
        let v = gauge_values(&mut queues, &[&counts(&[]), &ended]);
        assert_eq!(get(&v, "fast", "queued"), Some(0));
        assert_eq!(get(&v, "old", "dead"), Some(0));
        assert_eq!(get(&v, "fast", "succeeded"), Some(7));
    }
}
