//! The built-in fake Stripe for offline mode (no `stripe.secret_key`).
//!
//! It implements [`StripeApi`] against local tables, serves a checkout page and a portal
//! page, and — the point of it — turns what happens there into real Stripe-shaped events,
//! signed with the webhook secret and POSTed over HTTP to this server's own webhook
//! endpoint, so offline development exercises exactly the production pipeline.
//! `warpbase stripe trigger` uses the same event builders from the command line. Its pages
//! (the HTTP edge) are in [`super::fake_pages`].

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::fake_events::{self as fe, FakeInvoice};
use super::stripe::{
    CheckoutRequest, CheckoutSession, RemoteSubscription, StripeApi, StripeError, UsageReport,
};
use crate::clock::SharedClock;
use crate::storage::billing::{self as sb, FakeSession, FakeSubscription};
use crate::storage::{Storage, StorageError};

const MONTH_SECS: i64 = 30 * 86_400;

pub struct FakeStripe {
    storage: Storage,
    clock: SharedClock,
    public_base: String,
    /// Portal session id → (customer, return URL). In memory: a portal link is short-lived.
    portals: moka::sync::Cache<String, (String, String)>,
}

impl FakeStripe {
    pub fn new(storage: Storage, clock: SharedClock, public_base: String) -> FakeStripe {
        FakeStripe {
            storage,
            clock,
            public_base,
            portals: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(3600))
                .build(),
        }
    }
}

fn storage_err(e: StorageError) -> StripeError {
    StripeError::Network(format!("fake Stripe storage: {e}"))
}

impl StripeApi for FakeStripe {
    fn create_customer<'a>(
        &'a self,
        _email: &'a str,
        _user_id: &'a str,
        _key: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>> {
        Box::pin(async { Ok(fe::new_id("cus")) })
    }

    fn create_checkout_session<'a>(
        &'a self,
        req: &'a CheckoutRequest,
    ) -> BoxFuture<'a, Result<CheckoutSession, StripeError>> {
        Box::pin(async move {
            let id = fe::new_id("cs_test");
            let session = FakeSession {
                id: id.clone(),
                user_id: req.user_id.clone(),
                customer_id: req.customer.clone(),
                plan: req.plan.clone(),
                price_id: req.price_id.clone(),
                status: "open".into(),
                success_url: req.success_url.clone(),
                cancel_url: req.cancel_url.clone(),
                created_at: self.clock.now_millis(),
            };
            self.storage
                .write(move |c| sb::insert_fake_session(c, &session))
                .await
                .map_err(storage_err)?;
            Ok(CheckoutSession {
                url: format!("{}/fake-stripe/checkout/{id}", self.public_base),
                id,
            })
        })
    }

    fn create_portal_session<'a>(
        &'a self,
        customer: &'a str,
        return_url: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>> {
        Box::pin(async move {
            let id = fe::new_id("bps");
            self.portals
                .insert(id.clone(), (customer.to_string(), return_url.to_string()));
            Ok(format!("{}/fake-stripe/portal/{id}", self.public_base))
        })
    }

    fn report_usage<'a>(&'a self, r: &'a UsageReport) -> BoxFuture<'a, Result<(), StripeError>> {
        Box::pin(async move {
            let r = r.clone();
            self.storage
                .write(move |c| {
                    sb::insert_fake_meter_event(
                        c,
                        &r.identifier,
                        &r.customer,
                        &r.event_name,
                        r.value,
                        r.timestamp,
                    )
                })
                .await
                .map_err(storage_err)?;
            Ok(())
        })
    }

    fn list_subscriptions<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteSubscription>, StripeError>> {
        Box::pin(async move {
            let cus = customer.to_string();
            let subs = self
                .storage
                .read(move |c| sb::fake_subscriptions_of_customer(c, &cus))
                .await
                .map_err(storage_err)?;
            Ok(subs
                .into_iter()
                .map(|s| RemoteSubscription {
                    id: s.id,
                    customer: s.customer_id,
                    status: s.status,
                    price_id: Some(s.price_id),
                    current_period_end: Some(s.current_period_end),
                    cancel_at_period_end: s.cancel_at_period_end,
                    trial_end: None,
                    created: s.created,
                })
                .collect())
        })
    }
}

fn to_fake_events(s: &FakeSubscription) -> fe::FakeSubscription {
    let mut f = fe::FakeSubscription::new(&s.customer_id, &s.price_id, s.created, MONTH_SECS);
    f.id = s.id.clone();
    f.status = s.status.clone();
    f.current_period_start = s.current_period_start;
    f.current_period_end = s.current_period_end;
    f.cancel_at_period_end = s.cancel_at_period_end;
    f
}

/// Signs `event` and POSTs it to `webhook_url`, as Stripe would. Retries a few times.
pub async fn deliver(
    http: &reqwest::Client,
    webhook_url: &str,
    secret: &str,
    event: &Value,
) -> Result<(), String> {
    let body = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..4u32 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let t = crate::clock::now_millis() / 1000;
        let sig = super::signature::sign(&body, secret, t);
        match http
            .post(webhook_url)
            .header("content-type", "application/json")
            .header("stripe-signature", sig)
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("webhook answered {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// The events the fake emits for a scenario, in the order Stripe sends them.
pub enum Scenario {
    /// Checkout paid: the session completes, the subscription starts, the first invoice is paid.
    CheckoutPaid { session: FakeSession },
    /// A renewal: the next period's invoice is paid.
    Renewal,
    /// The renewal charge failed: the invoice fails and the subscription turns past_due.
    PaymentFailed,
    /// Cancel at period end (or undo it).
    CancelAtPeriodEnd(bool),
    /// The subscription ends now.
    Deleted,
}

/// Applies a scenario to the fake's subscription records and returns the Stripe events
/// it produces. Shared by the pages and the CLI.
pub async fn scenario_events(
    storage: &Storage,
    user_id: &str,
    scenario: Scenario,
    now: i64,
    price_amount: i64,
) -> Result<Vec<Value>, String> {
    let uid = user_id.to_string();
    match scenario {
        Scenario::CheckoutPaid { session } => {
            let sub = FakeSubscription {
                id: fe::new_id("sub"),
                customer_id: session.customer_id.clone(),
                user_id: uid,
                plan: session.plan.clone(),
                price_id: session.price_id.clone(),
                status: "active".into(),
                current_period_start: now,
                current_period_end: now + MONTH_SECS,
                cancel_at_period_end: false,
                created: now,
            };
            let stored = sub.clone();
            let sid = session.id.clone();
            let closed = storage
                .write(move |c| {
                    if !sb::close_fake_session(c, &sid, "complete")? {
                        return Ok::<_, StorageError>(false);
                    }
                    sb::upsert_fake_subscription(c, &stored)?;
                    Ok(true)
                })
                .await
                .map_err(|e| e.to_string())?;
            if !closed {
                return Err("this checkout session is no longer open".into());
            }
            let f = to_fake_events(&sub);
            let invoice = FakeInvoice::for_current_period(&f, price_amount, "subscription_create");
            Ok(vec![
                fe::checkout_session_completed(
                    &session.id,
                    &sub.customer_id,
                    user_id,
                    &sub.id,
                    now,
                ),
                fe::subscription_created(&f, now),
                fe::invoice_paid(&invoice, now),
            ])
        }
        other => {
            // Stripe's clock moves on between events; when several scenarios run within
            // one second (tests, quick clicks) keep `created` strictly increasing so the
            // engine orders them as they happened.
            let last = {
                let u = uid.clone();
                storage
                    .read(move |c| sb::load_state(c, &u))
                    .await
                    .map_err(|e| e.to_string())
                    .map(|j| super::parse_state(j.as_deref()).last_event_created)?
            };
            let now = last.map_or(now, |l| now.max(l + 1));
            let customer = {
                let u = uid.clone();
                storage
                    .read(move |c| sb::customer_of_user(c, &u))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("this user has no billing customer yet")?
            };
            let c2 = customer.clone();
            let mut sub = storage
                .read(move |c| sb::fake_subscriptions_of_customer(c, &c2))
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|s| s.status != "canceled")
                .ok_or("this user has no live fake subscription")?;
            let events = match other {
                Scenario::Renewal => {
                    sub.current_period_start = sub.current_period_end.max(now);
                    sub.current_period_end = sub.current_period_start + MONTH_SECS;
                    sub.status = "active".into();
                    let f = to_fake_events(&sub);
                    let invoice =
                        FakeInvoice::for_current_period(&f, price_amount, "subscription_cycle");
                    vec![
                        fe::subscription_updated(&f, now, serde_json::json!({})),
                        fe::invoice_paid(&invoice, now),
                    ]
                }
                Scenario::PaymentFailed => {
                    sub.status = "past_due".into();
                    let f = to_fake_events(&sub);
                    let mut next = f.clone();
                    next.current_period_start = f.current_period_end;
                    next.current_period_end = f.current_period_end + MONTH_SECS;
                    let mut invoice =
                        FakeInvoice::for_current_period(&next, price_amount, "subscription_cycle");
                    invoice.created = now;
                    vec![
                        fe::invoice_payment_failed(&invoice, now),
                        fe::subscription_updated(&f, now, serde_json::json!({"status": "active"})),
                    ]
                }
                Scenario::CancelAtPeriodEnd(flag) => {
                    sub.cancel_at_period_end = flag;
                    let f = to_fake_events(&sub);
                    vec![fe::subscription_updated(
                        &f,
                        now,
                        serde_json::json!({"cancel_at_period_end": !flag}),
                    )]
                }
                Scenario::Deleted => {
                    sub.status = "canceled".into();
                    let f = to_fake_events(&sub);
                    vec![fe::subscription_deleted(&f, now)]
                }
                Scenario::CheckoutPaid { .. } => Vec::new(),
            };
            let stored = sub.clone();
            storage
                .write(move |c| sb::upsert_fake_subscription(c, &stored))
                .await
                .map_err(|e| e.to_string())?;
            Ok(events)
        }
    }
}

impl FakeStripe {
    pub fn portal(&self, id: &str) -> Option<(String, String)> {
        self.portals.get(id)
    }
}
