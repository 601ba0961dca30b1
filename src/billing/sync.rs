//! Reconciliation: asks Stripe for each customer's subscriptions and repairs local state
//! from that snapshot, for webhooks that were lost (endpoint down longer than Stripe's
//! retries, a misconfigured secret). Runs from `warpbase stripe sync` and daily inside
//! the server. The snapshot goes through the same engine as webhooks, as a synthetic
//! `customer.subscription.updated` (or `.deleted`) stamped with the time of the sync,
//! so it supersedes older events and is itself superseded by newer ones.

use serde_json::json;

use super::engine::{self, BillingState, Decision, EngineCtx, SubStatus};
use super::event::StripeEvent;
use super::stripe::RemoteSubscription;
use super::{Billing, BillingError};
use crate::storage::billing as sb;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub customers: usize,
    pub applied: usize,
    pub unchanged: usize,
    pub errors: usize,
}

impl Billing {
    pub async fn sync_all(&self) -> Result<SyncReport, BillingError> {
        let customers = self.storage().read(sb::all_customers).await?;
        let mut report = SyncReport {
            customers: customers.len(),
            ..Default::default()
        };
        for (user_id, customer) in customers {
            match self.sync_customer(&user_id, &customer).await {
                Ok(true) => report.applied += 1,
                Ok(false) => report.unchanged += 1,
                Err(e) => {
                    report.errors += 1;
                    tracing::warn!(customer = %customer, error = %e, "reconciling a customer failed");
                }
            }
        }
        Ok(report)
    }

    /// Reconciles one customer; true if the local state changed.
    pub async fn sync_customer(&self, user_id: &str, customer: &str) -> Result<bool, BillingError> {
        let subs = self.stripe().list_subscriptions(customer).await?;
        // The subscription that matters: a live one if any, else the newest.
        let Some(sub) = pick(&subs) else {
            return Ok(false);
        };
        let now_ms = self.inner.clock.now_millis();
        let now = now_ms / 1000;
        let ended = matches!(sub.status.as_str(), "canceled" | "incomplete_expired");
        let ty = if ended {
            super::event::SUBSCRIPTION_DELETED
        } else {
            super::event::SUBSCRIPTION_UPDATED
        };
        // Milliseconds, not seconds: two syncs within one second (the daily task and a
        // `stripe sync`, say) are different snapshots, and with the same id the second
        // would be taken for a redelivery of the first and dropped. Same-second
        // snapshots of one type then order by this id, i.e. by time (13 digits).
        let id = format!("sync_{}_{}", sub.id, now_ms);
        let raw = json!({
            "id": id,
            "object": "event",
            "type": ty,
            "created": now,
            "livemode": false,
            "data": { "object": {
                "id": sub.id,
                "object": "subscription",
                "customer": sub.customer,
                "status": sub.status,
                "cancel_at_period_end": sub.cancel_at_period_end,
                "current_period_end": sub.current_period_end,
                "trial_end": sub.trial_end,
                "created": sub.created,
                "items": { "data": [ { "price": { "id": sub.price_id }, "current_period_end": sub.current_period_end } ] },
            } },
        });
        let text = raw.to_string();
        let event = StripeEvent::parse(text.as_bytes())
            .map_err(|e| BillingError::Invalid(format!("cannot build the sync snapshot: {e}")))?;
        // Only record a snapshot that changes what the user may do: a sync that agrees
        // with the local state is a no-op, so running it daily adds nothing.
        let current = self.state(user_id).await?;
        let changes = {
            let plan_for_price = |p: &str| self.plan_for_price(p);
            let ctx = EngineCtx {
                now,
                grace_secs: self.grace_secs(),
                plan_for_price: &plan_for_price,
            };
            matches!(engine::apply(&current, &event, &ctx),
                Decision::Apply(next) if material(&next) != material(&current))
        };
        if !changes {
            return Ok(false);
        }
        let p = self.process(event, text.into()).await?;
        // A duplicate answers with the status recorded the first time; it changed nothing.
        Ok(!p.duplicate && p.status == crate::storage::states::EventStatus::Applied)
    }
}

fn pick(subs: &[RemoteSubscription]) -> Option<&RemoteSubscription> {
    let live = |s: &&RemoteSubscription| {
        matches!(
            s.status.as_str(),
            "active" | "trialing" | "past_due" | "unpaid"
        )
    };
    subs.iter()
        .filter(live)
        .max_by_key(|s| s.created)
        .or_else(|| subs.iter().max_by_key(|s| s.created))
}

/// What a state grants, without the event bookkeeping.
fn material(s: &BillingState) -> (SubStatus, &str, Option<i64>, bool, bool, Option<&str>) {
    (
        s.status,
        s.plan.as_str(),
        s.current_period_end,
        s.cancel_at_period_end,
        s.deleted,
        s.subscription_id.as_deref(),
    )
}
