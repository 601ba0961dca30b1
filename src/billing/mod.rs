//! Billing: plans, the subscription state engine, Stripe webhooks, usage metering, and
//! the built-in fake Stripe for offline mode.
//!
//! The state of each user's subscription is the pure [`engine`]'s `BillingState`, stored
//! as one row per user and changed only by applying verified Stripe events (or a
//! reconciliation snapshot) inside the same write that records the event, so every event
//! is applied exactly once. What a user may do is computed from that state at the moment
//! of access ([`Billing::entitlement`]), so a late or lost webhook cannot extend access.

pub mod engine;
pub mod event;
pub mod fake;
pub mod fake_events;
pub mod fake_pages;
pub mod routes;
pub mod signature;
pub mod stripe;
pub mod stripe_real;
pub mod sync;
pub mod usage;
pub mod webhook;
#[cfg(test)]
mod webhook_tests;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

use crate::clock::SharedClock;
use crate::config::{Config, PlanConfig, PlanLimits};
use crate::storage::billing as sb;
use crate::storage::{Conn, Storage, StorageError};
use engine::{BillingState, SubStatus};
use stripe::{StripeApi, StripeError};
pub use webhook::ApplyFault;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("invalid Stripe signature: {0}")]
    InvalidSignature(String),
    #[error("{0}")]
    Invalid(String),
    /// A correctly signed webhook body that is not a Stripe event (not JSON, no id/type):
    /// 400, as for any malformed request, and not recorded.
    #[error("{0}")]
    NotAnEvent(String),
    #[error("you already have an active subscription; use the billing portal to change plans")]
    AlreadySubscribed,
    #[error("{0}")]
    Conflict(String),
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("applying the event failed: {0}")]
    ApplyFailed(String),
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Jobs used toward the plan's quota this period.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub jobs_this_period: u64,
    #[serde(with = "crate::clock::serde_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub period_start: i64,
}

/// What a user may do right now (the API's `Entitlement`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entitlement {
    pub plan: String,
    pub status: SubStatus,
    #[serde(with = "crate::clock::serde_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    #[serde(with = "crate::clock::serde_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub grace_until: Option<i64>,
    pub limits: PlanLimits,
    pub metered: bool,
    /// Filled where the caller counted it (GET subscription, /me).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
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
    grace_secs: i64,
    storage: Storage,
    clock: SharedClock,
    stripe: Arc<dyn StripeApi>,
    /// The same object as `stripe` in offline mode, for its pages.
    fake: Option<Arc<fake::FakeStripe>>,
    offline: bool,
    /// Secrets accepted on incoming webhooks (several during rotation).
    webhook_secrets: Vec<String>,
    public_base: String,
    mail_from: String,
    /// user id → engine state; invalidated after every commit that changes it.
    states: crate::cache::Loaded<String, Arc<BillingState>>,
    /// Where this process serves HTTP, for the fake Stripe's webhook deliveries.
    self_url: OnceLock<String>,
    http: reqwest::Client,
    /// Tests only (see [`ApplyFault`]); `None` in production.
    apply_fault: Option<Arc<dyn ApplyFault>>,
}

/// The webhook secrets accepted (the first also signs the fake Stripe's events): the
/// configured ones, or else one generated once into `data_dir/secrets`.
pub fn webhook_secrets(config: &Config) -> std::io::Result<Vec<String>> {
    let configured: Vec<String> = config
        .stripe
        .webhook_secrets
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.expose().to_string())
        .collect();
    if !configured.is_empty() {
        return Ok(configured);
    }
    crate::secrets::load_or_generate(&config.data_dir, "stripe_webhook.key", "whsec_")
        .map(|s| vec![s])
}

impl Billing {
    /// `webhook_secrets`: from [`webhook_secrets`]; must not be empty.
    pub fn new(
        config: &Config,
        storage: Storage,
        clock: SharedClock,
        webhook_secrets: Vec<String>,
    ) -> Result<Billing, StripeError> {
        Billing::with_apply_fault(config, storage, clock, webhook_secrets, None)
    }

    /// As [`new`](Self::new), with a fault injected into every event application (tests
    /// pass one through [`AppOptions`](crate::AppOptions) to prove rollback).
    pub fn with_apply_fault(
        config: &Config,
        storage: Storage,
        clock: SharedClock,
        webhook_secrets: Vec<String>,
        apply_fault: Option<Arc<dyn ApplyFault>>,
    ) -> Result<Billing, StripeError> {
        let offline = config.stripe.offline();
        let public_base = config.public_base().to_string();
        let (stripe, fake): (Arc<dyn StripeApi>, _) = if offline {
            let f = Arc::new(fake::FakeStripe::new(
                storage.clone(),
                clock.clone(),
                public_base.clone(),
            ));
            (f.clone(), Some(f))
        } else {
            (
                Arc::new(stripe_real::RealStripe::new(&config.stripe)?),
                None,
            )
        };
        Ok(Billing {
            inner: Arc::new(Inner {
                plans: config.plans(),
                grace_secs: i64::from(config.billing.grace_days) * 86_400,
                storage,
                clock,
                stripe,
                fake,
                offline,
                webhook_secrets,
                public_base,
                mail_from: config.mail.from.clone(),
                states: crate::cache::Loaded::new(100_000, Duration::from_secs(60)),
                self_url: OnceLock::new(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap_or_default(),
                apply_fault,
            }),
        })
    }

    pub fn offline(&self) -> bool {
        self.inner.offline
    }

    pub fn stripe(&self) -> &Arc<dyn StripeApi> {
        &self.inner.stripe
    }

    /// Offline only: the customer and return URL of a fake portal session.
    pub fn fake_portal(&self, id: &str) -> Option<(String, String)> {
        self.inner.fake.as_ref()?.portal(id)
    }

    pub fn webhook_secrets(&self) -> &[String] {
        &self.inner.webhook_secrets
    }

    /// The secret the fake Stripe signs with: the first accepted one.
    pub fn signing_secret(&self) -> &str {
        self.inner
            .webhook_secrets
            .first()
            .map(String::as_str)
            .unwrap_or("")
    }

    pub fn public_base(&self) -> &str {
        &self.inner.public_base
    }

    pub(crate) fn set_self_url(&self, url: String) {
        let _ = self.inner.self_url.set(url);
    }

    /// The URL this process serves on (falls back to the public URL).
    pub fn self_url(&self) -> &str {
        self.inner
            .self_url
            .get()
            .map(String::as_str)
            .unwrap_or(&self.inner.public_base)
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    fn now_secs(&self) -> i64 {
        self.inner.clock.now_millis() / 1000
    }

    pub fn grace_secs(&self) -> i64 {
        self.inner.grace_secs
    }

    pub fn plans(&self) -> &[PlanConfig] {
        &self.inner.plans
    }

    pub fn plan(&self, id: &str) -> Option<&PlanConfig> {
        self.inner.plans.iter().find(|p| p.id == id)
    }

    pub fn plan_for_price(&self, price_id: &str) -> Option<String> {
        self.inner
            .plans
            .iter()
            .find(|p| !p.price_id.is_empty() && p.price_id == price_id)
            .map(|p| p.id.clone())
    }

    pub fn free_limits(&self) -> PlanLimits {
        self.plan(engine::FREE_PLAN)
            .map(|p| p.limits)
            .unwrap_or(PlanLimits::FREE)
    }

    /// The stored engine state of a user (cached).
    pub async fn state(&self, user_id: &str) -> Result<Arc<BillingState>, StorageError> {
        if let Some(s) = self.inner.states.get(user_id) {
            return Ok(s);
        }
        let ticket = self.inner.states.ticket(user_id);
        let uid = user_id.to_string();
        let json = self
            .inner
            .storage
            .read(move |c| sb::load_state(c, &uid))
            .await?;
        let state = Arc::new(parse_state(json.as_deref()));
        self.inner
            .states
            .insert(user_id.to_string(), state.clone(), ticket);
        Ok(state)
    }

    pub async fn invalidate(&self, user_id: &str) {
        self.inner.states.invalidate(user_id);
    }

    /// The user's entitlement at this moment. On a storage error it answers with the
    /// free plan (failing safe: never more access than proven).
    pub async fn entitlement(&self, user_id: &str) -> Entitlement {
        match self.state(user_id).await {
            Ok(state) => self.entitlement_from(&state, self.inner.clock.now_millis()),
            Err(e) => {
                tracing::error!(error = %e, "cannot read billing state; assuming the free plan");
                self.entitlement_from(&BillingState::default(), self.inner.clock.now_millis())
            }
        }
    }

    /// Pure: the entitlement a state gives at `now_ms`.
    pub fn entitlement_from(&self, state: &BillingState, now_ms: i64) -> Entitlement {
        let (plan_id, status) = engine::entitlement_at(state, now_ms / 1000);
        let plan = self.plan(&plan_id);
        let paid = plan_id != engine::FREE_PLAN;
        let limits = plan.map(|p| p.limits).unwrap_or_else(|| self.free_limits());
        let period_end_ms = state.current_period_end.map(|s| s * 1000);
        let period_start = match (paid, period_end_ms, plan) {
            (true, Some(end), Some(p)) => end - interval_ms(&p.interval),
            _ => month_start(now_ms),
        };
        Entitlement {
            plan: plan_id,
            status,
            current_period_end: if status == SubStatus::Free {
                None
            } else {
                period_end_ms
            },
            cancel_at_period_end: state.cancel_at_period_end && paid,
            grace_until: if status == SubStatus::PastDue {
                state.grace_until.map(|s| s * 1000)
            } else {
                None
            },
            limits,
            metered: plan.is_some_and(|p| p.metered) && paid,
            usage: None,
            period_start,
        }
    }

    /// Called inside the transaction that marks a billable job succeeded: on a metered
    /// plan this enqueues the usage report as a job, keyed by the job id, so the job is
    /// reported once if and only if it succeeded.
    pub fn record_usage_in(
        &self,
        conn: &Conn,
        user_id: &str,
        job_id: &str,
        now: i64,
    ) -> Result<(), StorageError> {
        // Only a metered plan reports usage: with none configured (the common case) there
        // is nothing to read, and this runs in the writer for every finished job.
        if !self.inner.plans.iter().any(|p| p.metered) {
            return Ok(());
        }
        let state = parse_state(sb::load_state(conn, user_id)?.as_deref());
        let ent = self.entitlement_from(&state, now);
        if !ent.metered {
            return Ok(());
        }
        let Some(customer) = sb::customer_of_user(conn, user_id)? else {
            return Ok(());
        };
        usage::enqueue_in(conn, &customer, job_id, now)
    }
}

pub fn parse_state(json: Option<&str>) -> BillingState {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

fn interval_ms(interval: &str) -> i64 {
    const DAY: i64 = 86_400_000;
    match interval {
        "day" => DAY,
        "week" => 7 * DAY,
        "year" => 365 * DAY,
        _ => 30 * DAY,
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

/// Billing is the plan source and the meter of the jobs layer.
impl crate::jobs::plan::Metering for Billing {
    fn allowance<'a>(
        &'a self,
        user_id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, crate::jobs::plan::Allowance> {
        Box::pin(async move {
            let e = self.entitlement(user_id).await;
            crate::jobs::plan::Allowance {
                limits: e.limits,
                period_start: e.period_start,
            }
        })
    }

    fn record_success_in(
        &self,
        conn: &Conn,
        user_id: &str,
        job_id: &str,
        now: i64,
    ) -> Result<(), StorageError> {
        self.record_usage_in(conn, user_id, job_id, now)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn month_start_is_the_first_of_the_month() {
        let ms = crate::clock::parse_rfc3339("2026-11-23T08:00:00Z").expect("time");
        assert_eq!(
            crate::clock::rfc3339(super::month_start(ms)),
            "2026-11-01T00:00:00Z"
        );
    }
}
