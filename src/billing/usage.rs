//! Usage-based billing: each succeeded billable job of a user on a metered plan becomes
//! one Stripe Billing Meter Event, sent by a `stripe_usage` job enqueued in the same
//! transaction that marked the job succeeded. The meter event's `identifier` is the job
//! id, so retries of the report never count twice (Stripe deduplicates by it).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stripe::UsageReport;
use crate::jobs::{Handler, JobContext, JobFailure, KindSpec};
use crate::storage::jobs::{NewJob, insert_job};
use crate::storage::{Conn, StorageError};

pub const KIND: &str = "stripe_usage";
/// The meter's `event_name` in Stripe.
pub const METER_EVENT: &str = "warpbase_jobs";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    customer: String,
    job_id: String,
    value: u64,
    /// Unix seconds when the job succeeded.
    timestamp: i64,
}

pub fn enqueue_in(
    conn: &Conn,
    customer: &str,
    job_id: &str,
    now_ms: i64,
) -> Result<(), StorageError> {
    let payload = serde_json::to_string(&Payload {
        customer: customer.to_string(),
        job_id: job_id.to_string(),
        value: 1,
        timestamp: now_ms / 1000,
    })
    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
    let id = crate::ids::new_id_at(now_ms);
    insert_job(
        conn,
        &NewJob {
            id: &id,
            user_id: None,
            kind: KIND,
            queue: crate::config::SYSTEM_QUEUE,
            priority: 5,
            payload: &payload,
            max_attempts: 10,
            run_at: now_ms,
            idempotency_key: None,
            request_hash: None,
            now: now_ms,
        },
    )
}

pub fn kind_spec() -> KindSpec {
    KindSpec {
        name: KIND.into(),
        queue: crate::config::SYSTEM_QUEUE.into(),
        handler: Arc::new(Report),
        public: false,
        billable: false,
        timeout: Some(Duration::from_secs(30)),
        max_attempts: Some(10),
    }
}

struct Report;

impl Handler for Report {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(async move {
            let p: Payload = serde_json::from_value(ctx.payload.clone())
                .map_err(|e| JobFailure::Permanent(format!("malformed usage report: {e}")))?;
            let report = UsageReport {
                customer: p.customer,
                event_name: METER_EVENT.into(),
                value: p.value,
                identifier: p.job_id.clone(),
                timestamp: p.timestamp,
            };
            match ctx.state.billing.stripe().report_usage(&report).await {
                Ok(()) => Ok(serde_json::json!({ "reported": p.job_id })),
                Err(e) if e.is_retryable() => Err(JobFailure::Retryable(e.to_string())),
                Err(e) => Err(JobFailure::Permanent(e.to_string())),
            }
        })
    }
}
