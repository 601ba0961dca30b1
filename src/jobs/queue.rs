//! The jobs service: submit (validation, idempotency, plan quotas), read, cancel, retry,
//! and the dead-letter queue. No HTTP here; routes call these.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::plan::Allowance;
use super::worker::publish_outcome;
use crate::config::SYSTEM_QUEUE;
use crate::identity::Principal;
use crate::state::AppState;
use crate::storage::jobs::{self as q, JobRow, NewJob};
use crate::storage::states::JobStatus;
use crate::storage::{Conn, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such job")]
    NotFound,
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyConflict,
    #[error("{0}")]
    Conflict(String),
    #[error("the queue {0:?} is reserved for internal jobs")]
    ReservedQueue(String),
    #[error("plan limit reached: {what} ({used} of {limit})")]
    PlanLimit {
        what: &'static str,
        limit: u64,
        used: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The body of `POST /api/v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// A built-in kind (`demo`, `analyze`) or one from the config.
    #[schema(example = "demo")]
    pub kind: String,
    /// Kind-specific; `demo`: `{steps, step_ms, fail_attempts?, permanent_fail?}`.
    #[serde(default)]
    #[schema(example = json!({"steps": 3, "step_ms": 10}))]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub run_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

pub enum Submitted {
    Created(JobRow),
    /// The same Idempotency-Key and body were submitted before: the original job.
    Existing(JobRow),
}

const MAX_PRIORITY: i64 = 1000;
const MAX_ATTEMPTS: u32 = 25;
const MAX_KEY_LEN: usize = 255;

pub async fn submit(
    state: &AppState,
    who: &Principal,
    req: SubmitRequest,
    idempotency_key: Option<String>,
) -> Result<Submitted, JobError> {
    let spec = state
        .jobs
        .kind(&req.kind)
        .filter(|k| k.public)
        .cloned()
        .ok_or_else(|| JobError::Invalid(format!("unknown job kind {:?}", req.kind)))?;
    let queue = match &req.queue {
        Some(q) if state.config.jobs.queues.contains_key(q) => q.clone(),
        Some(q) => return Err(JobError::Invalid(format!("unknown queue {q:?}"))),
        None => spec.queue.clone(),
    };
    // Mail and usage reports run there with their own slots; a user backlog must not
    // delay them (also when the config routes a public kind there by mistake).
    if queue == SYSTEM_QUEUE {
        return Err(JobError::ReservedQueue(queue));
    }
    let priority = req.priority.unwrap_or(0);
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        return Err(JobError::Invalid(format!(
            "priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}"
        )));
    }
    let now = state.now_millis();
    let run_at = match &req.run_at {
        Some(t) => crate::clock::parse_rfc3339(t).ok_or_else(|| {
            JobError::Invalid(format!("run_at must be an RFC 3339 time, got {t:?}"))
        })?,
        None => now,
    };
    let max_attempts = req
        .max_attempts
        .or(spec.max_attempts)
        .unwrap_or(state.config.jobs.max_attempts);
    if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
        return Err(JobError::Invalid(format!(
            "max_attempts must be between 1 and {MAX_ATTEMPTS}"
        )));
    }
    if let Some(k) = &idempotency_key
        && (k.is_empty() || k.len() > MAX_KEY_LEN)
    {
        return Err(JobError::Invalid(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} characters"
        )));
    }
    spec.handler
        .validate(state, &who.user_id, &req.payload)
        .await
        .map_err(JobError::Invalid)?;

    let allowance = state.jobs.allowance(&who.user_id).await;
    // Only a keyed submission is ever compared with another one.
    let request_hash = idempotency_key
        .is_some()
        .then(|| hex::encode(Sha256::digest(serde_json::to_vec(&req).unwrap_or_default())));
    let payload = req.payload.to_string();
    let id = crate::ids::new_id_at(now);
    let user_id = who.user_id.clone();
    let kind = req.kind.clone();
    let q2 = queue.clone();
    let billable = spec.billable;
    let outcome = state
        .storage
        .write(move |c| {
            if let Some(key) = &idempotency_key
                && let Some(existing) = q::find_by_idempotency_key(c, &user_id, key)?
            {
                return if existing.request_hash.is_some() && existing.request_hash == request_hash {
                    Ok(Submitted::Existing(existing))
                } else {
                    Err(JobError::IdempotencyConflict)
                };
            }
            let used = check_plan(c, &user_id, &allowance, billable)?;
            q::insert_job(
                c,
                &NewJob {
                    id: &id,
                    user_id: Some(&user_id),
                    kind: &kind,
                    queue: &q2,
                    priority,
                    payload: &payload,
                    max_attempts,
                    run_at,
                    idempotency_key: idempotency_key.as_deref(),
                    request_hash: request_hash.as_deref(),
                    now,
                },
            )?;
            q::set_period_usage(c, &user_id, allowance.period_start, used + 1)?;
            // The row as inserted (column defaults included), without reading it back.
            Ok(Submitted::Created(JobRow {
                id,
                user_id: Some(user_id),
                kind,
                queue: q2,
                status: JobStatus::Queued,
                priority,
                payload,
                result: None,
                error: None,
                attempt: 0,
                max_attempts,
                budget: max_attempts,
                run_at,
                lease_until: None,
                cancel_requested: false,
                progress_pct: 0,
                progress_msg: None,
                request_hash,
                created_at: now,
                started_at: None,
                finished_at: None,
            }))
        })
        .await?;
    if let Submitted::Created(row) = &outcome {
        state.jobs.invalidate_usage(&who.user_id);
        publish_outcome(state, row);
        state.jobs.notify(&queue);
    }
    Ok(outcome)
}

/// The plan checks of a submission (and of a retry, which queues a job again), read
/// inside the writer so concurrent requests cannot overshoot: the user's active jobs
/// against `concurrent_jobs` and, for billable kinds, the jobs this period against
/// `jobs_per_period`. Returns the jobs of this period so far; the caller records one more.
fn check_plan(
    c: &Conn,
    user_id: &str,
    allowance: &Allowance,
    billable: bool,
) -> Result<u64, JobError> {
    let used = q::period_usage(c, user_id, allowance.period_start)?;
    if billable {
        let limits = allowance.limits;
        let active = q::count_active(c, user_id)?;
        if active >= u64::from(limits.concurrent_jobs) {
            return Err(JobError::PlanLimit {
                what: "concurrent jobs",
                limit: u64::from(limits.concurrent_jobs),
                used: active,
            });
        }
        if used >= limits.jobs_per_period {
            return Err(JobError::PlanLimit {
                what: "jobs this period",
                limit: limits.jobs_per_period,
                used,
            });
        }
    }
    Ok(used)
}

/// A job the caller may see: their own, or any for an admin.
pub async fn get_visible(state: &AppState, who: &Principal, id: &str) -> Result<JobRow, JobError> {
    let id = id.to_string();
    let row = state
        .storage
        .read(move |c| q::get_job(c, &id))
        .await?
        .ok_or(JobError::NotFound)?;
    if who.is_admin || row.user_id.as_deref() == Some(who.user_id.as_str()) {
        Ok(row)
    } else {
        Err(JobError::NotFound)
    }
}

pub async fn cancel(state: &AppState, who: &Principal, id: &str) -> Result<JobRow, JobError> {
    let row = get_visible(state, who, id).await?;
    let now = state.now_millis();
    let jid = row.id.clone();
    match row.status {
        JobStatus::Queued | JobStatus::Retrying => {
            let done = state
                .storage
                .write(move |c| q::cancel_waiting(c, &jid, now))
                .await?;
            match done {
                Some(r) => {
                    publish_outcome(state, &r);
                    Ok(r)
                }
                // It started meanwhile: cancel it as a running job.
                None => Box::pin(cancel(state, who, id)).await,
            }
        }
        JobStatus::Running => {
            state
                .storage
                .write(move |c| q::request_cancel(c, &jid, now))
                .await?;
            state.jobs.signal_cancel(&row.id);
            get_visible(state, who, id).await
        }
        other => Err(JobError::Conflict(format!(
            "the job is already {other}; only queued, retrying or running jobs can be canceled"
        ))),
    }
}

/// Queues a dead or canceled job again. For a user's job this is a submission as far as
/// the plan goes: the owner's limits are checked in the same write and the retry counts
/// toward `jobs_per_period`, so retries cannot run more jobs than submits could.
pub async fn retry(state: &AppState, who: &Principal, id: &str) -> Result<JobRow, JobError> {
    let row = get_visible(state, who, id).await?;
    let now = state.now_millis();
    let jid = row.id.clone();
    let billable = state.jobs.kind(&row.kind).is_some_and(|k| k.billable);
    let owner = match &row.user_id {
        Some(u) => Some((u.clone(), state.jobs.allowance(u).await)),
        None => None,
    };
    let status = row.status;
    let updated = state
        .storage
        .write(move |c| {
            if status != JobStatus::Dead && status != JobStatus::Canceled {
                // Checked again by the UPDATE; this only keeps the answer a 409, not a 402.
                return Ok(None);
            }
            let used = match &owner {
                Some((user_id, ent)) => Some(check_plan(c, user_id, ent, billable)?),
                None => None,
            };
            let Some(updated) = q::retry(c, &jid, now)? else {
                return Ok(None);
            };
            if let (Some((user_id, ent)), Some(used)) = (&owner, used) {
                q::set_period_usage(c, user_id, ent.period_start, used + 1)?;
            }
            Ok::<_, JobError>(Some(updated))
        })
        .await?
        .ok_or_else(|| {
            JobError::Conflict(format!(
                "the job is {}; only dead or canceled jobs can be retried",
                row.status
            ))
        })?;
    if let Some(u) = &updated.user_id {
        state.jobs.invalidate_usage(u);
    }
    publish_outcome(state, &updated);
    state.jobs.notify(&updated.queue);
    Ok(updated)
}

/// Admin: discard a dead job.
pub async fn discard(state: &AppState, id: &str) -> Result<(), JobError> {
    let jid = id.to_string();
    let found = state
        .storage
        .write(move |c| q::discard_dead(c, &jid))
        .await?;
    if !found {
        return Err(JobError::NotFound);
    }
    state.jobs.hub().forget(id);
    Ok(())
}

/// The `Job` object of the API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Job)]
pub struct JobView {
    pub id: String,
    pub kind: String,
    pub queue: String,
    pub status: JobStatus,
    pub priority: i64,
    pub attempt: u32,
    pub max_attempts: u32,
    pub progress: ProgressView,
    pub payload: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    #[serde(with = "crate::clock::serde_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(with = "crate::clock::serde_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<i64>,
    #[serde(with = "crate::clock::serde_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<i64>,
    #[serde(with = "crate::clock::serde_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub run_at: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Progress)]
pub struct ProgressView {
    #[schema(maximum = 100)]
    pub pct: u8,
    pub message: String,
}

impl From<JobRow> for JobView {
    fn from(r: JobRow) -> JobView {
        JobView {
            payload: serde_json::from_str(&r.payload).unwrap_or(Value::Null),
            result: r
                .result
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            progress: ProgressView {
                pct: r.progress_pct,
                message: r.progress_msg.unwrap_or_default(),
            },
            id: r.id,
            kind: r.kind,
            queue: r.queue,
            status: r.status,
            priority: r.priority,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            error: r.error,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            run_at: r.run_at,
        }
    }
}
