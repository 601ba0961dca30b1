//! The built-in fake Stripe for offline mode (no `stripe.secret_key`).
//!
//! It implements [`StripeApi`] against local tables, serves a checkout page and a portal
//! page, and — the point of it — turns what happens there into real Stripe-shaped events,
//! signed with the webhook secret and POSTed over HTTP to this server's own webhook
//! endpoint, so offline development exercises exactly the production pipeline.
//! `warpbase stripe trigger` uses the same event builders from the command line.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::future::BoxFuture;
use serde_json::Value;

use super::fake_events::{self as fe, FakeInvoice};
use super::stripe::{
    CheckoutRequest, CheckoutSession, RemoteSubscription, StripeApi, StripeError, UsageReport,
};
use crate::clock::SharedClock;
use crate::error::ApiError;
use crate::state::AppState;
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

/// Runs a scenario for a user and delivers its events to this server's webhook.
pub async fn run_scenario(
    state: &AppState,
    user_id: &str,
    scenario: Scenario,
) -> Result<usize, String> {
    let price = price_of_user_plan(state, user_id).await;
    let now = state.now_millis() / 1000;
    let events = scenario_events(&state.storage, user_id, scenario, now, price).await?;
    let url = format!("{}/api/v1/billing/webhook", state.billing.self_url());
    for e in &events {
        deliver(
            state.billing.http(),
            &url,
            state.billing.signing_secret(),
            e,
        )
        .await?;
    }
    state.jobs.notify(crate::auth::mail::QUEUE);
    Ok(events.len())
}

async fn price_of_user_plan(state: &AppState, user_id: &str) -> i64 {
    let s = state.billing.state(user_id).await.ok();
    s.and_then(|s| state.billing.plan(&s.plan).map(|p| p.price as i64))
        .unwrap_or(0)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fake-stripe/style.css", get(style))
        .route("/fake-stripe/checkout/{id}", get(checkout_page))
        .route("/fake-stripe/checkout/{id}/{action}", post(checkout_action))
        .route("/fake-stripe/portal/{id}", get(portal_page))
        .route("/fake-stripe/portal/{id}/{action}", post(portal_action))
}

fn ensure_offline(state: &AppState) -> Result<(), ApiError> {
    if state.billing.offline() {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "the fake Stripe only exists in offline mode",
        ))
    }
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

const CSS: &str = "body{font-family:system-ui,sans-serif;background:#f6f9fc;color:#1a1f36;margin:0}\
main{max-width:28rem;margin:4rem auto;background:#fff;border-radius:12px;padding:2rem;box-shadow:0 2px 12px #0002}\
h1{font-size:1.3rem}.price{font-size:2rem;font-weight:700;margin:.5rem 0 1.5rem}\
.note{background:#fff8e1;border:1px solid #f0c36d;padding:.6rem .8rem;border-radius:6px;font-size:.9rem}\
form{display:inline}button{font:inherit;padding:.7rem 1.2rem;border-radius:6px;border:1px solid #635bff;margin:.3rem .3rem 0 0;cursor:pointer}\
button.primary{background:#635bff;color:#fff}button:focus{outline:3px solid #a5a1ff}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{title}</title><link rel=\"stylesheet\" href=\"/fake-stripe/style.css\"></head><body><main>{body}</main></body></html>"
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn load_session(state: &AppState, id: &str) -> Result<FakeSession, ApiError> {
    let sid = id.to_string();
    state
        .storage
        .read(move |c| sb::get_fake_session(c, &sid))
        .await?
        .ok_or_else(|| ApiError::not_found("no such checkout session"))
}

async fn checkout_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    ensure_offline(&state)?;
    let s = load_session(&state, &id).await?;
    let plan = state.billing.plan(&s.plan);
    let (name, price) = plan
        .map(|p| {
            (
                p.name.clone(),
                format!(
                    "{:.2} {} / {}",
                    p.price as f64 / 100.0,
                    p.currency.to_uppercase(),
                    p.interval
                ),
            )
        })
        .unwrap_or_else(|| (s.plan.clone(), String::new()));
    if s.status != "open" {
        return Ok(page(
            "Checkout closed",
            &format!(
                "<h1>This checkout is {}</h1><p><a href=\"{}\">Back</a></p>",
                esc(&s.status),
                esc(&s.success_url)
            ),
        )
        .into_response());
    }
    let body = format!(
        "<p class=\"note\">Test mode — the built-in fake Stripe. No money moves.</p>\
<h1>Subscribe to {name}</h1><p class=\"price\">{price}</p>\
<form method=\"post\" action=\"/fake-stripe/checkout/{id}/pay\"><button class=\"primary\" type=\"submit\">Pay</button></form>\
<form method=\"post\" action=\"/fake-stripe/checkout/{id}/decline\"><button type=\"submit\">Decline card</button></form>\
<form method=\"post\" action=\"/fake-stripe/checkout/{id}/cancel\"><button type=\"submit\">Cancel</button></form>",
        name = esc(&name),
        price = esc(&price),
        id = esc(&s.id),
    );
    Ok(page("Checkout — warpbase test mode", &body).into_response())
}

async fn checkout_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ensure_offline(&state)?;
    let s = load_session(&state, &id).await?;
    match action.as_str() {
        "pay" => {
            let user = s.user_id.clone();
            let success = s.success_url.clone();
            run_scenario(&state, &user, Scenario::CheckoutPaid { session: s })
                .await
                .map_err(ApiError::conflict)?;
            Ok(Redirect::to(&success).into_response())
        }
        "decline" => Ok(page(
            "Payment declined",
            &format!("<h1>Your card was declined</h1><p>Nothing was charged.</p><p><a href=\"/fake-stripe/checkout/{0}\">Try again</a> · <a href=\"{1}\">Back</a></p>", esc(&s.id), esc(&s.cancel_url)),
        )
        .into_response()),
        "cancel" => {
            let sid = s.id.clone();
            state.storage.write(move |c| sb::close_fake_session(c, &sid, "canceled")).await?;
            Ok(Redirect::to(&s.cancel_url).into_response())
        }
        _ => Err(ApiError::not_found("unknown checkout action")),
    }
}

fn portal_of(state: &AppState, id: &str) -> Option<(String, String)> {
    state.billing.fake_portal(id)
}

async fn portal_page(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    ensure_offline(&state)?;
    let (customer, ret) =
        portal_of(&state, &id).ok_or_else(|| ApiError::not_found("no such portal session"))?;
    let cus = customer.clone();
    let subs = state
        .storage
        .read(move |c| sb::fake_subscriptions_of_customer(c, &cus))
        .await?;
    let live = subs.iter().find(|s| s.status != "canceled");
    let mut body = String::from(
        "<p class=\"note\">Test mode — the built-in fake Stripe portal.</p><h1>Your subscription</h1>",
    );
    match live {
        Some(s) => {
            body.push_str(&format!(
                "<p>Plan <strong>{}</strong>, status <strong>{}</strong>, renews {}{}.</p>",
                esc(&s.plan),
                esc(&s.status),
                crate::clock::rfc3339(s.current_period_end * 1000),
                if s.cancel_at_period_end {
                    " (cancels at period end)"
                } else {
                    ""
                }
            ));
            let toggle = if s.cancel_at_period_end {
                ("resume", "Resume subscription")
            } else {
                ("cancel-at-period-end", "Cancel at period end")
            };
            for (action, label) in [
                toggle,
                ("cancel-now", "Cancel now"),
                ("renew", "Simulate renewal"),
                ("fail-payment", "Simulate failed payment"),
            ] {
                body.push_str(&format!("<form method=\"post\" action=\"/fake-stripe/portal/{}/{action}\"><button type=\"submit\">{label}</button></form>", esc(&id)));
            }
        }
        None => body.push_str("<p>No active subscription.</p>"),
    }
    body.push_str(&format!(
        "<p><a href=\"{}\">Return to warpbase</a></p>",
        esc(&ret)
    ));
    Ok(page("Billing portal — warpbase test mode", &body).into_response())
}

async fn portal_action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    ensure_offline(&state)?;
    let (customer, _) =
        portal_of(&state, &id).ok_or_else(|| ApiError::not_found("no such portal session"))?;
    let cus = customer.clone();
    let user = state
        .storage
        .read(move |c| sb::user_of_customer(c, &cus))
        .await?
        .ok_or_else(|| ApiError::not_found("unknown customer"))?;
    let scenario = match action.as_str() {
        "cancel-at-period-end" => Scenario::CancelAtPeriodEnd(true),
        "resume" => Scenario::CancelAtPeriodEnd(false),
        "cancel-now" => Scenario::Deleted,
        "renew" => Scenario::Renewal,
        "fail-payment" => Scenario::PaymentFailed,
        _ => return Err(ApiError::not_found("unknown portal action")),
    };
    run_scenario(&state, &user, scenario)
        .await
        .map_err(ApiError::conflict)?;
    Ok((
        StatusCode::SEE_OTHER,
        [(header::LOCATION, format!("/fake-stripe/portal/{id}"))],
    )
        .into_response())
}

impl FakeStripe {
    pub fn portal(&self, id: &str) -> Option<(String, String)> {
        self.portals.get(id)
    }
}
