//! Billing: plans, the subscription state engine, Stripe webhooks and usage metering.
//!
//! Foundation stage: plans from config and the entitlement every other module asks for.
//! The webhook pipeline, the state engine and the Stripe clients land on top of this.

pub mod routes;
pub mod stripe;
pub mod stripe_real;

use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, PlanConfig, PlanLimits};

/// What a user may do right now.
#[derive(Debug, Clone, Serialize)]
pub struct Entitlement {
    pub plan: String,
    pub status: &'static str,
    #[serde(with = "crate::clock::serde_ms::option")]
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    #[serde(with = "crate::clock::serde_ms::option")]
    pub grace_until: Option<i64>,
    pub limits: PlanLimits,
    /// Start of the current quota period (ms).
    #[serde(skip)]
    pub period_start: i64,
}

#[derive(Clone)]
pub struct Billing {
    inner: Arc<Inner>,
}

struct Inner {
    plans: Vec<PlanConfig>,
}

impl Billing {
    pub fn new(config: &Config) -> Billing {
        Billing {
            inner: Arc::new(Inner {
                plans: config.plans(),
            }),
        }
    }

    pub fn plans(&self) -> &[PlanConfig] {
        &self.inner.plans
    }

    pub fn free_limits(&self) -> PlanLimits {
        self.inner
            .plans
            .iter()
            .find(|p| p.id == "free")
            .map(|p| p.limits)
            .unwrap_or(PlanLimits::FREE)
    }

    /// Called inside the transaction that marks a billable job succeeded: on a metered
    /// plan this enqueues the usage report (a job, idempotent by the job id).
    pub fn record_usage_in(
        &self,
        _conn: &crate::storage::Conn,
        _user_id: &str,
        _job_id: &str,
        _now: i64,
    ) -> Result<(), crate::storage::StorageError> {
        // No plan is metered until subscriptions exist; see billing::usage.
        Ok(())
    }

    /// The user's entitlement at this moment.
    pub async fn entitlement(&self, _user_id: &str) -> Entitlement {
        Entitlement {
            plan: "free".into(),
            status: "free",
            current_period_end: None,
            cancel_at_period_end: false,
            grace_until: None,
            limits: self.free_limits(),
            period_start: month_start(crate::clock::now_millis()),
        }
    }
}

/// The first millisecond of the UTC calendar month containing `ms`: the quota period of
/// users without a paid subscription.
pub fn month_start(ms: i64) -> i64 {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let first = t
        .date()
        .replace_day(1)
        .unwrap_or(t.date())
        .midnight()
        .assume_utc();
    first.unix_timestamp() * 1000
}
