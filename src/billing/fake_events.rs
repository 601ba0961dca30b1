//! Builders of realistic Stripe event JSON, in the current API shape
//! ([`API_VERSION`]: period on subscription items, invoice subscription under
//! `parent.subscription_details`).
//!
//! Owns what the offline fake Stripe sends to the webhook endpoint and what tests feed the
//! pipeline. It must not sign or send anything (see `signature::sign`), and it carries
//! only realistic fields: whatever is built here must also be what real Stripe could send,
//! so code tested against it works against Stripe.

use rand::Rng;
use rand::distributions::Alphanumeric;
use serde_json::{Value, json};

/// The Stripe API version whose payload shape these builders produce.
pub const API_VERSION: &str = "2025-03-31.basil";

/// A fresh Stripe-looking id: `{prefix}_` + 24 alphanumerics (`evt`, `cus`, `sub`, `in`,
/// `cs_test`, `si`, `il`).
pub fn new_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}_{tail}")
}

/// The event envelope around `object`, with a fresh `evt_` id.
pub fn envelope(event_type: &str, created: i64, object: Value) -> Value {
    json!({
        "id": new_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": created,
        "data": { "object": object },
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": new_id("req"), "idempotency_key": null },
        "type": event_type,
    })
}

/// A subscription as the fake Stripe keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSubscription {
    pub id: String,
    pub customer: String,
    pub price_id: String,
    /// Stripe's status string (`active`, `trialing`, `past_due`, `canceled`, …).
    pub status: String,
    pub created: i64,
    pub current_period_start: i64,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub trial_end: Option<i64>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
}

impl FakeSubscription {
    /// An active subscription starting at `now` for one period of `period_secs`.
    pub fn new(customer: &str, price_id: &str, now: i64, period_secs: i64) -> FakeSubscription {
        FakeSubscription {
            id: new_id("sub"),
            customer: customer.to_owned(),
            price_id: price_id.to_owned(),
            status: "active".to_owned(),
            created: now,
            current_period_start: now,
            current_period_end: now.saturating_add(period_secs),
            cancel_at_period_end: false,
            trial_end: None,
            canceled_at: None,
            ended_at: None,
        }
    }

    /// The `subscription` object (API shape of [`API_VERSION`]).
    pub fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "subscription",
            "application": null,
            "billing_cycle_anchor": self.current_period_start,
            "cancel_at": if self.cancel_at_period_end { json!(self.current_period_end) } else { Value::Null },
            "cancel_at_period_end": self.cancel_at_period_end,
            "canceled_at": self.canceled_at,
            "collection_method": "charge_automatically",
            "created": self.created,
            "currency": "usd",
            "customer": self.customer,
            "ended_at": self.ended_at,
            "items": {
                "object": "list",
                "data": [{
                    "id": format!("si_{}", id_tail(&self.id)),
                    "object": "subscription_item",
                    "created": self.created,
                    "current_period_end": self.current_period_end,
                    "current_period_start": self.current_period_start,
                    "metadata": {},
                    "price": { "id": self.price_id, "object": "price", "active": true, "currency": "usd", "type": "recurring" },
                    "quantity": 1,
                    "subscription": self.id,
                }],
                "has_more": false,
                "total_count": 1,
                "url": format!("/v1/subscription_items?subscription={}", self.id),
            },
            "latest_invoice": null,
            "livemode": false,
            "metadata": {},
            "start_date": self.created,
            "status": self.status,
            "trial_end": self.trial_end,
            "trial_start": self.trial_end.map(|_| self.created),
        })
    }
}

/// An invoice of a subscription for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeInvoice {
    pub id: String,
    pub customer: String,
    pub subscription: String,
    pub price_id: String,
    /// Cents.
    pub amount: i64,
    /// The period paid for (the line's period).
    pub period_start: i64,
    pub period_end: i64,
    /// `subscription_create`, `subscription_cycle`, `subscription_update`.
    pub billing_reason: String,
    pub created: i64,
    pub attempt_count: i64,
}

impl FakeInvoice {
    /// The invoice for the subscription's current period.
    pub fn for_current_period(
        sub: &FakeSubscription,
        amount: i64,
        billing_reason: &str,
    ) -> FakeInvoice {
        FakeInvoice {
            id: new_id("in"),
            customer: sub.customer.clone(),
            subscription: sub.id.clone(),
            price_id: sub.price_id.clone(),
            amount,
            period_start: sub.current_period_start,
            period_end: sub.current_period_end,
            billing_reason: billing_reason.to_owned(),
            created: sub.current_period_start,
            attempt_count: 1,
        }
    }

    /// The `invoice` object, `paid` or still `open` after a failed attempt.
    pub fn object(&self, paid: bool) -> Value {
        json!({
            "id": self.id,
            "object": "invoice",
            "account_country": "US",
            "amount_due": self.amount,
            "amount_paid": if paid { self.amount } else { 0 },
            "amount_remaining": if paid { 0 } else { self.amount },
            "attempt_count": self.attempt_count,
            "attempted": true,
            "billing_reason": self.billing_reason,
            "collection_method": "charge_automatically",
            "created": self.created,
            "currency": "usd",
            "customer": self.customer,
            "lines": {
                "object": "list",
                "data": [{
                    "id": format!("il_{}", id_tail(&self.id)),
                    "object": "line_item",
                    "amount": self.amount,
                    "currency": "usd",
                    "description": "1 × Plan",
                    "parent": {
                        "type": "subscription_item_details",
                        "subscription_item_details": {
                            "invoice_item": null,
                            "proration": false,
                            "subscription": self.subscription,
                            "subscription_item": format!("si_{}", id_tail(&self.subscription)),
                        },
                        "invoice_item_details": null,
                    },
                    "period": { "end": self.period_end, "start": self.period_start },
                    "pricing": {
                        "type": "price_details",
                        "price_details": { "price": self.price_id, "product": "prod_fake" },
                        "unit_amount_decimal": self.amount.to_string(),
                    },
                    "quantity": 1,
                }],
                "has_more": false,
                "total_count": 1,
                "url": format!("/v1/invoices/{}/lines", self.id),
            },
            "livemode": false,
            "parent": {
                "type": "subscription_details",
                "quote_details": null,
                "subscription_details": { "metadata": {}, "subscription": self.subscription },
            },
            // For subscription invoices Stripe's invoice-level period is the *previous*
            // period; the line above carries the one being paid for.
            "period_end": self.period_start,
            "period_start": self.period_start,
            "status": if paid { "paid" } else { "open" },
            "status_transitions": {
                "finalized_at": self.created,
                "paid_at": if paid { json!(self.created) } else { Value::Null },
            },
        })
    }
}

/// `checkout.session.completed` for a subscription checkout by warpbase user `user_id`.
pub fn checkout_session_completed(
    session_id: &str,
    customer: &str,
    user_id: &str,
    subscription: &str,
    created: i64,
) -> Value {
    let object = json!({
        "id": session_id,
        "object": "checkout.session",
        "amount_subtotal": null,
        "cancel_url": null,
        "client_reference_id": user_id,
        "created": created,
        "currency": "usd",
        "customer": customer,
        "customer_creation": "always",
        "invoice": null,
        "livemode": false,
        "metadata": {},
        "mode": "subscription",
        "payment_status": "paid",
        "status": "complete",
        "subscription": subscription,
        "success_url": null,
        "url": null,
    });
    envelope("checkout.session.completed", created, object)
}

pub fn subscription_created(sub: &FakeSubscription, created: i64) -> Value {
    envelope("customer.subscription.created", created, sub.object())
}

/// `previous_attributes` is what Stripe sends alongside an update; tests may pass `{}`.
pub fn subscription_updated(
    sub: &FakeSubscription,
    created: i64,
    previous_attributes: Value,
) -> Value {
    let mut event = envelope("customer.subscription.updated", created, sub.object());
    event["data"]["previous_attributes"] = previous_attributes;
    event
}

/// Stripe sends the final snapshot: status `canceled`, `ended_at` set.
pub fn subscription_deleted(sub: &FakeSubscription, created: i64) -> Value {
    let mut ended = sub.clone();
    ended.status = "canceled".to_owned();
    ended.canceled_at = ended.canceled_at.or(Some(created));
    ended.ended_at = Some(created);
    envelope("customer.subscription.deleted", created, ended.object())
}

pub fn invoice_paid(invoice: &FakeInvoice, created: i64) -> Value {
    envelope("invoice.paid", created, invoice.object(true))
}

pub fn invoice_payment_failed(invoice: &FakeInvoice, created: i64) -> Value {
    envelope("invoice.payment_failed", created, invoice.object(false))
}

fn id_tail(id: &str) -> &str {
    id.split_once('_').map_or(id, |(_, tail)| tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::event::{EventObject, StripeEvent};

    const NOW: i64 = 1_750_000_000;
    const MONTH: i64 = 30 * 86_400;

    fn sub() -> FakeSubscription {
        FakeSubscription::new("cus_fake0001", "price_pro", NOW, MONTH)
    }

    fn parse(v: &Value) -> StripeEvent {
        StripeEvent::parse(v.to_string().as_bytes()).expect("builder output parses")
    }

    #[test]
    fn ids_look_like_stripe_ids() {
        let id = new_id("evt");
        assert!(id.starts_with("evt_"));
        assert_eq!(id.len(), 4 + 24);
        assert_ne!(new_id("evt"), new_id("evt"));
    }

    #[test]
    fn every_builder_parses() {
        let mut s = sub();
        s.trial_end = Some(NOW + 7 * 86_400);
        s.status = "trialing".into();
        let inv = FakeInvoice::for_current_period(&s, 1900, "subscription_cycle");

        let checkout = checkout_session_completed("cs_test_1", &s.customer, "usr_1", &s.id, NOW);
        let e = parse(&checkout);
        assert_eq!(e.event_type, "checkout.session.completed");
        assert_eq!(
            e.object,
            EventObject::CheckoutCompleted {
                session_id: "cs_test_1".into(),
                customer: Some(s.customer.clone()),
                client_reference_id: Some("usr_1".into()),
                subscription: Some(s.id.clone()),
                mode: Some("subscription".into()),
            }
        );

        for (v, ty) in [
            (
                subscription_created(&s, NOW),
                "customer.subscription.created",
            ),
            (
                subscription_updated(&s, NOW + 1, json!({"status": "incomplete"})),
                "customer.subscription.updated",
            ),
        ] {
            let e = parse(&v);
            assert_eq!(e.event_type, ty);
            assert!(e.id.starts_with("evt_"));
            assert_eq!(
                e.object,
                EventObject::Subscription {
                    id: s.id.clone(),
                    customer: s.customer.clone(),
                    status: "trialing".into(),
                    price_id: Some("price_pro".into()),
                    current_period_end: Some(NOW + MONTH),
                    current_period_start: Some(NOW),
                    cancel_at_period_end: false,
                    trial_end: Some(NOW + 7 * 86_400),
                    canceled_at: None,
                    ended_at: None,
                }
            );
        }

        let e = parse(&subscription_deleted(&s, NOW + 5));
        assert_eq!(e.event_type, "customer.subscription.deleted");
        let EventObject::Subscription {
            status, ended_at, ..
        } = e.object
        else {
            panic!("not a subscription");
        };
        assert_eq!((status.as_str(), ended_at), ("canceled", Some(NOW + 5)));

        for (v, ty) in [
            (invoice_paid(&inv, NOW + 60), "invoice.paid"),
            (
                invoice_payment_failed(&inv, NOW + 60),
                "invoice.payment_failed",
            ),
        ] {
            let e = parse(&v);
            assert_eq!(e.event_type, ty);
            assert_eq!(e.created, NOW + 60);
            assert_eq!(
                e.object,
                EventObject::Invoice {
                    id: inv.id.clone(),
                    customer: s.customer.clone(),
                    subscription: Some(s.id.clone()),
                    period_start: Some(NOW),
                    period_end: Some(NOW + MONTH),
                    billing_reason: Some("subscription_cycle".into()),
                    created: Some(NOW),
                }
            );
        }
    }

    #[test]
    fn a_scheduled_cancel_reads_back() {
        let mut s = sub();
        s.cancel_at_period_end = true;
        let EventObject::Subscription {
            cancel_at_period_end,
            ..
        } = parse(&subscription_updated(&s, NOW, json!({}))).object
        else {
            panic!("not a subscription");
        };
        assert!(cancel_at_period_end);
    }
}
