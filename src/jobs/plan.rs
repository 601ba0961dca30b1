//! What jobs need from billing, as an interface handed to [`Jobs`](super::Jobs) when it is
//! built: the plan a user is on (for the limits checked at submit, retry and upload) and
//! the hook that meters a billable success in the write that records it. Billing
//! implements it; jobs never names billing, so the dependency points one way.

use futures_util::future::BoxFuture;

use crate::config::PlanLimits;
use crate::storage::{Conn, StorageError};

/// A user's plan as jobs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub limits: PlanLimits,
    /// Start of the current quota period (ms): `jobs_per_period` counts from here.
    pub period_start: i64,
}

pub trait Metering: Send + Sync + 'static {
    /// The plan `user_id` is on now.
    fn allowance<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Allowance>;

    /// Called inside the transaction that marks a billable job of `user_id` succeeded,
    /// so a job is metered once if and only if it succeeded.
    fn record_success_in(
        &self,
        conn: &Conn,
        user_id: &str,
        job_id: &str,
        now: i64,
    ) -> Result<(), StorageError>;
}
