//! The workers: one dispatcher per queue, the attempt runner, the lease heartbeat, the
//! rescuer, and the periodic housekeeping. Everything here is owned by the App's task
//! tracker and stops on the shutdown token.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::hub::JobEventKind;
use super::{JobContext, JobFailure, Progress, Running};
use crate::state::AppState;
use crate::storage::StorageError;
use crate::storage::jobs::{self as q, Finish, JobRow};

/// How long an attempt may keep running after its timeout or cancel signal before it is
/// abandoned (its handler future dropped, child processes killed).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Fallback poll when nothing wakes a dispatcher.
const POLL: Duration = Duration::from_secs(1);

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
    let lease = state.config.jobs.lease;
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = state.shutdown.cancelled() => return,
        };
        let mut permits: Vec<OwnedSemaphorePermit> = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let n = permits.len() as u32;
        let now = state.now_millis();
        let worker = jobs.worker_id().to_string();
        let qname = queue.clone();
        let lease_until = now + lease.as_millis() as i64;
        let claimed = state
            .storage
            .write(move |c| q::claim(c, &qname, n, now, lease_until, &worker))
            .await;
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
        permits.truncate(rows.len());
        for (row, permit) in rows.into_iter().zip(permits) {
            let cancel = CancellationToken::new();
            if let Ok(mut running) = jobs.inner.running.lock() {
                running.insert(
                    row.id.clone(),
                    Running {
                        cancel: cancel.clone(),
                    },
                );
            }
            let st = state.clone();
            state
                .tasks
                .spawn(async move { run_attempt(st, row, cancel, timeout, permit).await });
        }
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

async fn run_attempt(
    state: AppState,
    row: JobRow,
    cancel: CancellationToken,
    queue_timeout: Duration,
    _slot: OwnedSemaphorePermit,
) {
    let jobs = state.jobs.clone();
    let started_at = state.now_millis();
    let user = row.user_id.clone();
    jobs.hub().publish(
        &row.id,
        user.as_deref(),
        JobEventKind::State {
            id: row.id.clone(),
            status: "running".into(),
            attempt: row.attempt,
        },
    );
    if row.cancel_requested {
        cancel.cancel();
    }
    let progress = Progress {
        hub: jobs.hub().clone(),
        job_id: row.id.clone(),
        user_id: user.clone(),
        latest: Default::default(),
    };
    let spec = jobs.kind(&row.kind).cloned();
    let outcome: Result<Value, JobFailure> = match (&spec, serde_json::from_str(&row.payload)) {
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
                user_id: user.clone(),
                kind: row.kind.clone(),
                attempt: row.attempt,
                payload,
                cancel: cancel.clone(),
                progress: progress.clone(),
                timeout,
            };
            run_with_limits(
                &state,
                spec.handler.run(ctx),
                &cancel,
                timeout,
                &row.id,
                &progress,
            )
            .await
        }
    };
    if let Some((pct, msg)) = progress.take_latest() {
        // The final progress is saved with the outcome below for successes; keep it for
        // failures too so the dead-letter queue shows how far the attempt got.
        let id = row.id.clone();
        let now = state.now_millis();
        let _ = state
            .storage
            .write(move |c| q::save_progress(c, &id, pct, &msg, now))
            .await;
    }
    finish(
        &state,
        &row,
        started_at,
        outcome,
        spec.as_ref().is_some_and(|s| s.billable),
    )
    .await;
    if let Ok(mut running) = jobs.inner.running.lock() {
        running.remove(&row.id);
    }
}

/// Runs the handler future under the attempt timeout, persisting progress once a second.
/// On timeout or cancel the handler is told to stop and given `STOP_GRACE` to do so.
async fn run_with_limits(
    state: &AppState,
    fut: futures_util::future::BoxFuture<'static, Result<Value, JobFailure>>,
    cancel: &CancellationToken,
    timeout: Duration,
    job_id: &str,
    progress: &Progress,
) -> Result<Value, JobFailure> {
    let mut fut = fut;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = &mut fut => return r,
            _ = tokio::time::sleep_until(deadline) => {
                cancel.cancel();
                let _ = tokio::time::timeout(STOP_GRACE, &mut fut).await;
                return Err(JobFailure::Timeout);
            }
            _ = cancel.cancelled() => {
                return match tokio::time::timeout(STOP_GRACE, &mut fut).await {
                    Ok(Ok(v)) => Ok(v),
                    _ => Err(JobFailure::Canceled),
                };
            }
            _ = tick.tick() => {
                if let Some((pct, msg)) = progress.take_latest() {
                    let id = job_id.to_string();
                    let now = state.now_millis();
                    if let Err(e) = state
                        .storage
                        .write(move |c| q::save_progress(c, &id, pct, &msg, now))
                        .await
                    {
                        tracing::warn!(job = job_id, error = %e, "saving progress failed");
                    }
                }
            }
        }
    }
}

async fn finish(
    state: &AppState,
    row: &JobRow,
    started_at: i64,
    outcome: Result<Value, JobFailure>,
    billable: bool,
) {
    let cfg = &state.config.jobs;
    let now = state.now_millis();
    let (status_label, result_text, error_text, retry_at, outcome_label) = match &outcome {
        Ok(v) => ("succeeded", Some(v.to_string()), None, None, "succeeded"),
        Err(JobFailure::Canceled) => (
            "canceled",
            None,
            Some("canceled".to_string()),
            None,
            "canceled",
        ),
        Err(f) => {
            let label = if matches!(f, JobFailure::Timeout) {
                "timeout"
            } else {
                "retry"
            };
            if f.is_retryable() && row.attempt < row.max_attempts {
                let delay = super::backoff::retry_delay(
                    row.attempt,
                    cfg.backoff_base,
                    cfg.backoff_cap,
                    &mut rand::thread_rng(),
                );
                let at = now + delay.as_millis() as i64;
                ("retrying", None, Some(f.to_string()), Some(at), label)
            } else {
                let label = if matches!(f, JobFailure::Timeout) {
                    "timeout"
                } else {
                    "dead"
                };
                ("dead", None, Some(f.to_string()), None, label)
            }
        }
    };
    let id = row.id.clone();
    let attempt = row.attempt;
    let user_id = row.user_id.clone();
    let billing = state.billing.clone();
    let written = state
        .storage
        .write(move |c| {
            let how = match status_label {
                "succeeded" => Finish::Succeeded {
                    result: result_text.as_deref().unwrap_or("null"),
                },
                "canceled" => Finish::Canceled {
                    error: error_text.as_deref(),
                },
                "retrying" => Finish::Retry {
                    error: error_text.as_deref().unwrap_or(""),
                    run_at: retry_at.unwrap_or(now),
                    outcome: outcome_label,
                },
                _ => Finish::Dead {
                    error: error_text.as_deref().unwrap_or(""),
                    outcome: outcome_label,
                },
            };
            let row = q::finish(c, &id, attempt, started_at, &how, now)?;
            if row.is_some()
                && status_label == "succeeded"
                && billable
                && let Some(uid) = &user_id
            {
                // Metered plans report usage through the queue, in this same transaction,
                // so a job counts once if and only if it succeeded.
                billing.record_usage_in(c, uid, &id, now)?;
            }
            Ok::<_, StorageError>(row)
        })
        .await;
    let kind = row.kind.clone();
    metrics::counter!("job_runs_total", "kind" => kind, "outcome" => outcome_label).increment(1);
    match written {
        Ok(Some(done)) => publish_outcome(state, &done),
        Ok(None) => {
            tracing::info!(job = %row.id, "attempt result discarded: the job changed meanwhile");
        }
        Err(e) => {
            tracing::error!(job = %row.id, error = %e, "recording the attempt failed; the lease will expire and the rescuer re-queues it")
        }
    }
    if status_label == "retrying" {
        state.jobs.notify(&row.queue);
    }
}

/// Publishes the state (and, if final, the `done` event) of a job row.
pub fn publish_outcome(state: &AppState, row: &JobRow) {
    let hub = state.jobs.hub();
    hub.publish(
        &row.id,
        row.user_id.as_deref(),
        JobEventKind::State {
            id: row.id.clone(),
            status: row.status.clone(),
            attempt: row.attempt,
        },
    );
    if matches!(row.status.as_str(), "succeeded" | "dead" | "canceled") {
        hub.publish(
            &row.id,
            row.user_id.as_deref(),
            JobEventKind::Done {
                id: row.id.clone(),
                status: row.status.clone(),
                result: row
                    .result
                    .as_deref()
                    .and_then(|r| serde_json::from_str(r).ok()),
                error: row.error.clone(),
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

/// The rescuer, hub sweeping, gauges and retention, on timers.
async fn housekeeping(state: AppState) {
    let lease = state.config.jobs.lease;
    let mut tick = tokio::time::interval((lease / 2).max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown.cancelled() => return,
        }
        rounds += 1;
        rescue(&state).await;
        state.jobs.hub().sweep();
        if rounds % 10 == 1 {
            update_gauges(&state).await;
        }
        if rounds % 4 == 1 {
            run_periodic(&state).await;
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

async fn update_gauges(state: &AppState) {
    if let Ok(counts) = state.storage.read(q::counts_by_queue_status).await {
        for (queue, status, n) in counts {
            metrics::gauge!("jobs", "queue" => queue, "status" => status).set(n as f64);
        }
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// Internal tasks on a schedule that survives restarts: each records when it last ran in
/// the `meta` table before running, so a restart neither repeats nor skips a period.
async fn run_periodic(state: &AppState) {
    if due(state, "jobs.purge", HOUR).await {
        purge(state).await;
    }
    if due(state, "auth.purge_expired", HOUR).await {
        let now = state.now_millis();
        if let Err(e) = state
            .storage
            .write(move |c| crate::storage::auth::purge_expired(c, now))
            .await
        {
            tracing::warn!(error = %e, "purging expired tokens failed");
        }
    }
    if due(state, "billing.reconcile", 24 * HOUR).await {
        match state.billing.sync_all().await {
            Ok(r) => tracing::info!(
                customers = r.customers,
                repaired = r.applied,
                failed = r.errors,
                "daily billing reconciliation"
            ),
            Err(e) => tracing::warn!(error = %e, "daily billing reconciliation failed"),
        }
    }
}

/// True (and the run recorded) if the task `name` last ran `every` or longer ago.
async fn due(state: &AppState, name: &'static str, every: Duration) -> bool {
    let now = state.now_millis();
    let key = format!("periodic.{name}");
    let every_ms = every.as_millis() as i64;
    let claimed = state
        .storage
        .write(move |c| {
            let last = q::meta_get(c, &key)?
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(i64::MIN);
            if last != i64::MIN && now - last < every_ms {
                return Ok::<_, StorageError>(false);
            }
            q::meta_set(c, &key, &now.to_string(), now)?;
            Ok(true)
        })
        .await;
    claimed.unwrap_or(false)
}

/// Deletes finished jobs past the retention, in small batches so the writer stays fair.
async fn purge(state: &AppState) {
    let retention = state.config.jobs.retention;
    if retention.is_zero() {
        return;
    }
    let before = state.now_millis() - retention.as_millis() as i64;
    for _ in 0..100 {
        match state
            .storage
            .write(move |c| q::purge_finished(c, before, 500))
            .await
        {
            Ok(500) => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "purging old jobs failed");
                return;
            }
        }
    }
}

/// On graceful shutdown after the grace period: give back the jobs still running here so
/// the next start runs them again without spending an attempt.
pub async fn release_running(state: &AppState) {
    let ids = state.jobs.running_ids();
    if ids.is_empty() {
        return;
    }
    for id in &ids {
        state.jobs.signal_cancel(id);
    }
    let now = state.now_millis();
    match state.storage.write(move |c| q::release(c, &ids, now)).await {
        Ok(n) => tracing::warn!(jobs = n, "released unfinished jobs back to the queue"),
        Err(e) => {
            tracing::error!(error = %e, "releasing unfinished jobs failed; they will be recovered at next start")
        }
    }
}
