//! The fake Stripe's pages (offline mode): the checkout and portal pages and their
//! actions, and running a scenario for a signed-in user. The HTTP edge of
//! [`super::fake`], which holds the fake itself and its event builders.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::fake::{Scenario, deliver, scenario_events};
use crate::error::ApiError;
use crate::state::AppState;
use crate::storage::billing::{self as sb, FakeSession};

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
    state.jobs.notify(crate::mail::QUEUE);
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
