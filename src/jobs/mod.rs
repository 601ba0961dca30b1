//! Jobs: the durable queue, its workers, retries, the dead-letter queue and live progress.
//!
//! The `jobs` table is the queue (see `storage::jobs`). Each configured queue has a
//! dispatcher that claims runnable jobs in one `UPDATE … RETURNING` when it has free
//! slots, woken at once by enqueues in this process and by a timer as a fallback. Every
//! claimed job runs under a lease that a heartbeat extends; a crashed process's jobs are
//! re-queued by the rescuer, fenced by attempt number so no job runs twice at once.
//! Handlers are registered per kind and report progress to the [`hub::Hub`], which feeds
//! the SSE streams.

pub mod analyze;
pub mod backoff;
pub mod command;
pub mod demo;
pub mod frame;
pub mod hub;
pub mod kinds;
pub mod outcome;
pub mod plan;
pub mod queue;
pub mod routes;
pub mod uploads;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::AppState;
use hub::{Hub, JobEventKind};

/// How an attempt failed. The worker maps each the same way for every kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobFailure {
    /// Try again later (with backoff) while attempts remain.
    #[error("{0}")]
    Retryable(String),
    /// Never going to work: straight to the dead-letter queue.
    #[error("{0}")]
    Permanent(String),
    #[error("canceled")]
    Canceled,
    #[error("the attempt timed out")]
    Timeout,
}

impl JobFailure {
    /// Whether another attempt may succeed (the worker still checks `max_attempts`).
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobFailure::Retryable(_) | JobFailure::Timeout)
    }
}

/// What a handler gets for one attempt.
pub struct JobContext {
    pub state: AppState,
    pub job_id: String,
    pub user_id: Option<String>,
    pub kind: String,
    pub attempt: u32,
    pub payload: Value,
    /// Cancelled when the job is canceled or its attempt times out.
    pub cancel: CancellationToken,
    pub progress: Progress,
    /// The attempt's time limit (the kind's or the queue's); the worker enforces it too.
    pub timeout: Duration,
}

/// A job kind's implementation.
pub trait Handler: Send + Sync + 'static {
    /// Checks a payload at submission; the message becomes a 422 `invalid_input`.
    fn validate<'a>(
        &'a self,
        _state: &'a AppState,
        _user_id: &'a str,
        _payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Runs one attempt. Returns the result JSON or how it failed.
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>>;
}

/// A registered kind.
#[derive(Clone)]
pub struct KindSpec {
    pub name: String,
    pub queue: String,
    pub handler: Arc<dyn Handler>,
    /// Users may submit it through the API (internal kinds: mail, usage reports, no).
    pub public: bool,
    /// Counts toward plan quotas and usage metering.
    pub billable: bool,
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

/// Reports progress of one attempt: to live subscribers at once, to the database at most
/// once a second (the worker persists the latest value).
#[derive(Clone)]
pub struct Progress {
    hub: Hub,
    job_id: String,
    user_id: Option<String>,
    latest: Arc<Mutex<Option<(u8, String)>>>,
}

impl Progress {
    pub fn report(&self, pct: u8, message: impl Into<String>) {
        let pct = pct.min(100);
        let message = message.into();
        if let Ok(mut l) = self.latest.lock() {
            *l = Some((pct, message.clone()));
        }
        self.hub.publish(
            &self.job_id,
            self.user_id.as_deref(),
            JobEventKind::Progress {
                id: self.job_id.clone(),
                pct,
                message,
            },
        );
    }
}

struct Running {
    cancel: CancellationToken,
}

#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    wake: HashMap<String, Arc<Notify>>,
    /// Each queue's round-robin position over job owners, kept between claims.
    turns: HashMap<String, Arc<Mutex<crate::storage::jobs::Turn>>>,
    hub: Hub,
    kinds: HashMap<String, KindSpec>,
    running: Mutex<HashMap<String, Running>>,
    /// user id → (period start, jobs created since): `/me`'s usage line without a
    /// count over the user's jobs per request. Invalidated after each submission.
    usage: crate::cache::Loaded<String, (i64, u64)>,
    /// Uploads per user (`uploads.rate_limit` per `uploads.rate_window`).
    upload_rate: crate::ratelimit::RateLimiter,
    /// Plans and metering (billing), handed in: jobs never names billing.
    metering: Arc<dyn plan::Metering>,
    worker_id: String,
}

impl Jobs {
    /// Builds the registry from the built-in kinds, config-defined command kinds and the
    /// kinds other modules contribute (`extra`).
    pub fn new(config: &Config, extra: Vec<KindSpec>, metering: Arc<dyn plan::Metering>) -> Jobs {
        let wake = config
            .jobs
            .queues
            .keys()
            .map(|q| (q.clone(), Arc::new(Notify::new())))
            .collect();
        let turns = config
            .jobs
            .queues
            .keys()
            .map(|q| (q.clone(), Arc::default()))
            .collect();
        let mut kinds = HashMap::new();
        for spec in kinds::builtin(config).into_iter().chain(extra) {
            kinds.insert(spec.name.clone(), spec);
        }
        // Config may move any kind to another queue or change its limits.
        for (name, k) in &config.jobs.kinds {
            if let Some(spec) = kinds.get_mut(name) {
                if let Some(q) = &k.queue {
                    spec.queue = q.clone();
                }
                spec.timeout = k.timeout.or(spec.timeout);
                spec.max_attempts = k.max_attempts.or(spec.max_attempts);
            }
        }
        Jobs {
            inner: Arc::new(Inner {
                wake,
                turns,
                hub: Hub::default(),
                kinds,
                running: Mutex::new(HashMap::new()),
                usage: crate::cache::Loaded::new(100_000, Duration::from_secs(30)),
                upload_rate: crate::ratelimit::RateLimiter::new(
                    crate::ratelimit::RatePolicy::new(
                        config.uploads.rate_limit,
                        config.uploads.rate_window,
                    ),
                    100_000,
                ),
                metering,
                worker_id: crate::ids::new_id(),
            }),
        }
    }

    /// The plan `user_id` is on now (limits and quota period).
    pub async fn allowance(&self, user_id: &str) -> plan::Allowance {
        self.inner.metering.allowance(user_id).await
    }

    /// The metering hook, for the write that records a job's success.
    pub fn metering(&self) -> &dyn plan::Metering {
        &*self.inner.metering
    }

    /// Wakes the dispatcher of `queue`; call after the enqueueing write committed.
    /// The permit is stored if the dispatcher is busy, so a wake-up is never lost.
    pub fn notify(&self, queue: &str) {
        if let Some(n) = self.inner.wake.get(queue) {
            n.notify_one();
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn kind(&self, name: &str) -> Option<&KindSpec> {
        self.inner.kinds.get(name)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &KindSpec> {
        self.inner.kinds.values()
    }

    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The round-robin position of `queue`'s claims (a fresh one for an unknown queue).
    fn turn_handle(&self, queue: &str) -> Arc<Mutex<crate::storage::jobs::Turn>> {
        self.inner.turns.get(queue).cloned().unwrap_or_default()
    }

    fn wake_handle(&self, queue: &str) -> Option<Arc<Notify>> {
        self.inner.wake.get(queue).cloned()
    }

    /// Signals the attempt running `job_id` in this process to stop; true if there was one.
    pub fn signal_cancel(&self, job_id: &str) -> bool {
        self.inner
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(job_id).map(|j| j.cancel.cancel()))
            .is_some()
    }

    fn is_running_here(&self, job_id: &str) -> bool {
        self.inner
            .running
            .lock()
            .map(|r| r.contains_key(job_id))
            .unwrap_or(false)
    }

    fn running_ids(&self) -> Vec<String> {
        self.inner
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The cached number of jobs `user_id` created since `period_start`, if known.
    pub fn cached_usage(&self, user_id: &str, period_start: i64) -> Option<u64> {
        self.inner
            .usage
            .get(user_id)
            .and_then(|(since, n)| (since == period_start).then_some(n))
    }

    /// Take before reading a usage count that will go to [`Jobs::cache_usage`].
    pub fn usage_ticket(&self, user_id: &str) -> crate::cache::Ticket {
        self.inner.usage.ticket(user_id)
    }

    pub fn cache_usage(
        &self,
        user_id: &str,
        period_start: i64,
        count: u64,
        ticket: crate::cache::Ticket,
    ) {
        self.inner
            .usage
            .insert(user_id.to_string(), (period_start, count), ticket);
    }

    /// After a commit that created a job of `user_id`.
    pub fn invalidate_usage(&self, user_id: &str) {
        self.inner.usage.invalidate(user_id);
    }

    /// Counts an upload of `user_id` against the upload rate; Err: retry after this long.
    pub fn check_upload_rate(&self, user_id: &str) -> Result<(), Duration> {
        self.inner.upload_rate.check(user_id)
    }
}
