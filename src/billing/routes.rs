//! HTTP routes of billing (see docs/API.md "Billing").

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::stripe::CheckoutRequest;
use super::{BillingError, Usage};
use crate::auth::{AdminUser, AuthUser};
use crate::error::{ApiError, ApiResult};
use crate::http::{Json, Query, page_limit, time_cursor};
use crate::state::AppState;
use crate::storage::billing as sb;
use crate::storage::jobs as q;
use crate::storage::states::EventStatus;
use crate::storage::users;

/// The billing routes; the fake Stripe pages are served but not part of the API document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(plans))
        .routes(routes!(checkout))
        .routes(routes!(portal))
        .routes(routes!(subscription))
        .routes(routes!(webhook))
        .routes(routes!(events))
        .routes(routes!(replay))
        .merge(super::fake_pages::router().into())
}

#[utoipa::path(get, path = "/api/v1/billing/plans", tag = "billing",
    responses((status = 200, description = "The plans; `free` is always present", body = crate::openapi::PlanList)))]
async fn plans(State(state): State<AppState>) -> Json<Value> {
    let items: Vec<Value> = state
        .billing
        .plans()
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "name": p.name, "price": p.price, "currency": p.currency,
                "interval": p.interval, "limits": p.limits, "metered": p.metered,
            })
        })
        .collect();
    Json(json!({ "items": items }))
}

/// The entitlement with this period's usage counted.
async fn entitlement_with_usage(state: &AppState, user_id: &str) -> ApiResult<super::Entitlement> {
    let mut ent = state.billing.entitlement(user_id).await;
    let uid = user_id.to_string();
    let since = ent.period_start;
    let used = state
        .storage
        .read(move |c| q::period_usage(c, &uid, since))
        .await?;
    ent.usage = Some(Usage {
        jobs_this_period: used,
        period_start: since,
    });
    Ok(ent)
}

#[utoipa::path(get, path = "/api/v1/billing/subscription", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "What the user may do right now, with this period's usage", body = super::Entitlement),
        (status = 401, description = "`unauthorized`")))]
async fn subscription(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
) -> ApiResult<Json<super::Entitlement>> {
    Ok(Json(entitlement_with_usage(&state, &p.user_id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    plan: String,
}

#[utoipa::path(post, path = "/api/v1/billing/checkout", tag = "billing", security(("bearer" = [])),
    request_body = CheckoutBody,
    responses((status = 200, description = "A Stripe Checkout session to redirect to", body = crate::openapi::CheckoutSession),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "`unauthorized`"),
        (status = 409, description = "`already_subscribed`: use the portal to change plan"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`: unknown paid plan"),
        (status = 503, description = "`unavailable`: Stripe is not reachable")))]
async fn checkout(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    Json(b): Json<CheckoutBody>,
) -> ApiResult<Json<Value>> {
    let billing = &state.billing;
    let plan = billing
        .plan(&b.plan)
        .filter(|pl| pl.id != super::engine::FREE_PLAN)
        .cloned()
        .ok_or_else(|| BillingError::Invalid(format!("unknown paid plan {:?}", b.plan)))?;
    if plan.price_id.is_empty() {
        return Err(BillingError::Invalid(format!(
            "plan {:?} has no Stripe price_id configured",
            plan.id
        ))
        .into());
    }
    let ent = billing.entitlement(&p.user_id).await;
    if ent.plan != super::engine::FREE_PLAN {
        return Err(BillingError::AlreadySubscribed.into());
    }
    let customer = ensure_customer(&state, &p.user_id).await?;
    let base = billing.public_base();
    let session = billing
        .stripe()
        .create_checkout_session(&CheckoutRequest {
            customer,
            price_id: plan.price_id.clone(),
            user_id: p.user_id.clone(),
            plan: plan.id.clone(),
            success_url: format!("{base}/#/billing?checkout=success"),
            cancel_url: format!("{base}/#/billing?checkout=canceled"),
            idempotency_key: crate::ids::new_id(),
        })
        .await
        .map_err(BillingError::from)?;
    Ok(Json(json!({ "id": session.id, "url": session.url })))
}

/// The user's Stripe customer, created once and reused. Creating it is idempotent per
/// user at Stripe; locally the first stored link wins.
async fn ensure_customer(state: &AppState, user_id: &str) -> ApiResult<String> {
    let uid = user_id.to_string();
    let (existing, email) = state
        .storage
        .read(move |c| {
            let cus = sb::customer_of_user(c, &uid)?;
            let email = users::get_user(c, &uid)?.map(|u| u.email);
            Ok::<_, crate::storage::StorageError>((cus, email))
        })
        .await?;
    if let Some(c) = existing {
        return Ok(c);
    }
    let email = email.ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    let created = state
        .billing
        .stripe()
        .create_customer(&email, user_id, &format!("warpbase-customer-{user_id}"))
        .await
        .map_err(BillingError::from)?;
    let uid = user_id.to_string();
    let now = state.now_millis();
    let cus = created.clone();
    let stored = state
        .storage
        .write(move |c| {
            sb::link_customer(c, &uid, &cus, now)?;
            sb::customer_of_user(c, &uid)
        })
        .await?;
    Ok(stored.unwrap_or(created))
}

#[utoipa::path(post, path = "/api/v1/billing/portal", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "A Stripe billing portal session", body = crate::openapi::PortalSession),
        (status = 401, description = "`unauthorized`"),
        (status = 409, description = "`conflict`: no billing account yet"),
        (status = 503, description = "`unavailable`: Stripe is not reachable")))]
async fn portal(State(state): State<AppState>, AuthUser(p): AuthUser) -> ApiResult<Json<Value>> {
    let uid = p.user_id.clone();
    let customer = state
        .storage
        .read(move |c| sb::customer_of_user(c, &uid))
        .await?
        .ok_or_else(|| {
            BillingError::Conflict(
                "there is no billing account yet; subscribe to a plan first".into(),
            )
        })?;
    let url = state
        .billing
        .stripe()
        .create_portal_session(
            &customer,
            &format!("{}/#/billing", state.billing.public_base()),
        )
        .await
        .map_err(BillingError::from)?;
    Ok(Json(json!({ "url": url })))
}

#[utoipa::path(post, path = "/api/v1/billing/webhook", tag = "billing",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the raw body (300 s tolerance)")),
    request_body(content = serde_json::Value, content_type = "application/json", description = "A raw Stripe event"),
    responses((status = 200, description = "Recorded (and applied, ignored or stale)", body = crate::openapi::WebhookReceipt),
        (status = 400, description = "`invalid_signature`: bad, missing or expired signature; `invalid_input`: signed, but not a Stripe event (not JSON, no id or type)"),
        (status = 413, description = "`payload_too_large`"),
        (status = 500, description = "`internal`: applying failed and was rolled back; Stripe retries")))]
async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<WebhookReceipt>> {
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let p = state.billing.handle_webhook(&body, sig).await?;
    if p.status == EventStatus::Applied {
        // A payment-failure mail may have been enqueued with the change.
        state.jobs.notify(crate::mail::QUEUE);
    }
    Ok(Json(WebhookReceipt {
        duplicate: p.duplicate,
        received: true,
        status: p.status,
    }))
}

/// The webhook's answer, serialised directly (the hottest billing route needs no JSON
/// tree). Fields in the order `json!` used to print them.
#[derive(Debug, Serialize)]
struct WebhookReceipt {
    duplicate: bool,
    received: bool,
    status: EventStatus,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only events with this processing status.
    #[param(value_type = Option<EventStatus>)]
    status: Option<String>,
    /// Page size, default 50.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/admin/billing/events", tag = "admin", security(("bearer" = [])),
    params(EventsQuery),
    responses((status = 200, description = "Processed Stripe events, newest first", body = crate::openapi::BillingEventPage),
        (status = 400, description = "`invalid_input`: bad `status`, `limit` or `cursor`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: admin role required")))]
async fn events(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Query(qy): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    // Parsed here rather than by serde so a bad value gets a message naming the choices.
    let status = qy
        .status
        .as_deref()
        .map(str::parse::<EventStatus>)
        .transpose()
        .map_err(|_| {
            let all: Vec<&str> = EventStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("status must be one of {}", all.join(", ")))
        })?;
    let limit = page_limit(qy.limit)?;
    let before = qy.cursor.as_deref().map(time_cursor).transpose()?;
    let mut rows = state
        .storage
        .read(move |c| {
            sb::list_events(
                c,
                status,
                before.as_ref().map(|(t, id)| (*t, id.as_str())),
                limit + 1,
            )
        })
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|r| format!("{}:{}", r.received_at, r.id)))
        .flatten();
    let items: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "id": r.id, "type": r.event_type, "status": r.status, "reason": r.reason,
                "user_id": r.user_id, "attempts": r.attempts,
                "created": crate::clock::rfc3339(r.created * 1000),
                "received_at": crate::clock::rfc3339(r.received_at),
                "processed_at": crate::clock::rfc3339(r.processed_at),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": next })))
}

#[utoipa::path(post, path = "/api/v1/admin/billing/events/{id}/replay", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Stripe event id")),
    responses((status = 200, description = "The event was applied again", body = crate::openapi::ReplayResult),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: admin role required"),
        (status = 404, description = "`not_found`: no such recorded event")))]
async fn replay(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = state.billing.replay(&id).await?;
    Ok(Json(json!({ "id": id, "status": p.status })))
}
