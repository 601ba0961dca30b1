//! `RealStripe` black-box against a fake Stripe: a small axum router on 127.0.0.1:0 that
//! answers the five endpoints with Stripe-shaped JSON and records every request (headers
//! and decoded form/query pairs) so the tests can check what went over the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{Value, json};
use warpbase::billing::stripe::{
    CheckoutRequest, CheckoutSession, StripeApi, StripeError, UsageReport,
};
use warpbase::billing::stripe_real::RealStripe;
use warpbase::config::{Secret, StripeConfig};

const KEY: &str = "sk_test_51FakeKeyForWarpbaseTests";
const NOW: i64 = 1_790_000_000;

#[derive(Debug, Clone)]
struct Recorded {
    method: Method,
    path: String,
    headers: HeaderMap,
    /// Decoded `application/x-www-form-urlencoded` body or query string, in order.
    params: Vec<(String, String)>,
}

impl Recorded {
    fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct FakeState {
    requests: Mutex<Vec<Recorded>>,
    /// When set, the next request gets this status and raw body instead.
    fail_next: Mutex<Option<(StatusCode, String)>>,
    /// When set, every request waits this long before answering.
    delay: Mutex<Option<Duration>>,
}

#[derive(Clone)]
struct Fake {
    addr: SocketAddr,
    state: Arc<FakeState>,
}

impl Fake {
    async fn start() -> Fake {
        let state = Arc::new(FakeState::default());
        let app = Router::new()
            .route("/v1/customers", post(create_customer))
            .route("/v1/checkout/sessions", post(create_checkout_session))
            .route("/v1/billing_portal/sessions", post(create_portal_session))
            .route("/v1/billing/meter_events", post(create_meter_event))
            .route("/v1/subscriptions", get(list_subscriptions))
            .fallback(|uri: Uri| async move {
                stripe_error(
                    StatusCode::NOT_FOUND,
                    &format!("Unrecognized request URL (GET: {uri})"),
                )
            })
            .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake stripe");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Fake { addr, state }
    }

    fn client(&self) -> RealStripe {
        self.client_with_base(&format!("http://{}", self.addr))
    }

    fn client_with_base(&self, base: &str) -> RealStripe {
        RealStripe::new(&config(base)).expect("client")
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    fn only_request(&self) -> Recorded {
        let reqs = self.requests();
        assert_eq!(reqs.len(), 1, "{reqs:#?}");
        reqs[0].clone()
    }

    fn fail_next(&self, status: u16, body: &str) {
        *self.state.fail_next.lock().expect("lock") = Some((
            StatusCode::from_u16(status).expect("status"),
            body.to_string(),
        ));
    }
}

fn config(api_base: &str) -> StripeConfig {
    StripeConfig {
        secret_key: Secret::new(KEY),
        webhook_secrets: Vec::new(),
        api_base: api_base.into(),
    }
}

fn stripe_error(status: StatusCode, message: &str) -> Response {
    let kind = if status == StatusCode::PAYMENT_REQUIRED {
        "card_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

/// Records the request (the body is read here and put back for the handler), then
/// applies the configured delay or failure, like a middleware in front of Stripe.
async fn gate(
    State(state): State<Arc<FakeState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .expect("read body");
    let raw = if parts.method == Method::GET {
        parts.uri.query().unwrap_or("").to_string()
    } else {
        String::from_utf8(bytes.to_vec()).expect("utf-8 body")
    };
    let params = decode_params(&raw);
    state.requests.lock().expect("lock").push(Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        headers: parts.headers.clone(),
        params,
    });
    let delay = *state.delay.lock().expect("lock");
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if let Some((status, body)) = state.fail_next.lock().expect("lock").take() {
        return (status, [("content-type", "application/json")], body).into_response();
    }
    // Stripe rejects a request without a bearer key before looking at anything else.
    if parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {KEY}"))
    {
        return stripe_error(StatusCode::UNAUTHORIZED, "Invalid API Key provided");
    }
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    next.run(req).await
}

/// Decodes `a=1&b%5Bc%5D=2` into ordered pairs with axum's own urlencoded decoder.
fn decode_params(raw: &str) -> Vec<(String, String)> {
    let uri: Uri = format!("/?{raw}").parse().expect("params fit in a URI");
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&uri).expect("urlencoded");
    pairs
}

async fn create_customer(Form(f): Form<HashMap<String, String>>) -> Json<Value> {
    Json(json!({
        "id": "cus_RealTest1",
        "object": "customer",
        "address": null,
        "balance": 0,
        "created": NOW,
        "currency": null,
        "default_source": null,
        "delinquent": false,
        "description": null,
        "discount": null,
        "email": f.get("email"),
        "invoice_prefix": "F00DCAFE",
        "invoice_settings": {"custom_fields": null, "default_payment_method": null, "footer": null, "rendering_options": null},
        "livemode": false,
        "metadata": {"warpbase_user_id": f.get("metadata[warpbase_user_id]")},
        "name": null,
        "next_invoice_sequence": 1,
        "phone": null,
        "preferred_locales": [],
        "shipping": null,
        "tax_exempt": "none",
        "test_clock": null
    }))
}

async fn create_checkout_session(Form(f): Form<HashMap<String, String>>) -> Json<Value> {
    Json(json!({
        "id": "cs_test_a1RealTest",
        "object": "checkout.session",
        "after_expiration": null,
        "allow_promotion_codes": null,
        "amount_subtotal": 1900,
        "amount_total": 1900,
        "automatic_tax": {"enabled": false, "liability": null, "provider": null, "status": null},
        "billing_address_collection": null,
        "cancel_url": f.get("cancel_url"),
        "client_reference_id": f.get("client_reference_id"),
        "client_secret": null,
        "consent": null,
        "consent_collection": null,
        "created": NOW,
        "currency": "usd",
        "currency_conversion": null,
        "custom_fields": [],
        "custom_text": {"after_submit": null, "shipping_address": null, "submit": null, "terms_of_service_acceptance": null},
        "customer": f.get("customer"),
        "customer_creation": null,
        "customer_details": null,
        "customer_email": null,
        "expires_at": NOW + 86_400,
        "invoice": null,
        "invoice_creation": null,
        "livemode": false,
        "locale": null,
        "metadata": {"plan": f.get("metadata[plan]")},
        "mode": "subscription",
        "payment_intent": null,
        "payment_link": null,
        "payment_method_collection": "always",
        "payment_method_configuration_details": null,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "phone_number_collection": {"enabled": false},
        "recovered_from": null,
        "saved_payment_method_options": null,
        "setup_intent": null,
        "shipping_address_collection": null,
        "shipping_cost": null,
        "shipping_options": [],
        "status": "open",
        "submit_type": null,
        "subscription": null,
        "success_url": f.get("success_url"),
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": "https://checkout.stripe.com/c/pay/cs_test_a1RealTest#fidkdWxOYHwnPyd1blpxYHZxWjA0"
    }))
}

async fn create_portal_session(Form(f): Form<HashMap<String, String>>) -> Json<Value> {
    Json(json!({
        "id": "bps_1RealTest",
        "object": "billing_portal.session",
        "configuration": "bpc_1RealTest",
        "created": NOW,
        "customer": f.get("customer"),
        "flow": null,
        "livemode": false,
        "locale": null,
        "on_behalf_of": null,
        "return_url": f.get("return_url"),
        "url": "https://billing.stripe.com/p/session/test_YWNjdF8xRmFrZQ"
    }))
}

async fn create_meter_event(Form(f): Form<HashMap<String, String>>) -> Json<Value> {
    let ts: i64 = f
        .get("timestamp")
        .and_then(|t| t.parse().ok())
        .unwrap_or(NOW);
    Json(json!({
        "object": "billing.meter_event",
        "created": NOW,
        "event_name": f.get("event_name"),
        "identifier": f.get("identifier"),
        "livemode": false,
        "payload": {
            "stripe_customer_id": f.get("payload[stripe_customer_id]"),
            "value": f.get("payload[value]")
        },
        "timestamp": ts
    }))
}

/// A subscription in the shape of API versions from 2025-03-31 on: the period lives on
/// the items only.
fn new_shape_subscription(id: &str, customer: &str, status: &str, period_end: i64) -> Value {
    json!({
        "id": id,
        "object": "subscription",
        "application": null,
        "automatic_tax": {"disabled_reason": null, "enabled": false, "liability": null},
        "billing_cycle_anchor": NOW - 86_400,
        "billing_mode": {"type": "flexible", "flexible": {"proration_discounts": "included"}, "updated_at": NOW - 86_400},
        "billing_schedules": [],
        "cancel_at": null,
        "cancel_at_period_end": false,
        "canceled_at": null,
        "collection_method": "charge_automatically",
        "created": NOW - 86_400,
        "currency": "usd",
        "customer": customer,
        "default_payment_method": null,
        "discounts": [],
        "ended_at": null,
        "invoice_settings": {"account_tax_ids": null, "issuer": {"type": "self"}},
        "items": {
            "object": "list",
            "data": [{
                "id": format!("si_{id}"),
                "object": "subscription_item",
                "created": NOW - 86_400,
                "current_period_end": period_end,
                "current_period_start": period_end - 30 * 86_400,
                "discounts": [],
                "metadata": {},
                "plan": {"id": "price_pro_monthly", "object": "plan", "active": true, "amount": 1900, "billing_scheme": "per_unit", "created": NOW - 90 * 86_400, "currency": "usd", "interval": "month", "interval_count": 1, "livemode": false, "usage_type": "licensed"},
                "price": {"id": "price_pro_monthly", "object": "price", "active": true, "billing_scheme": "per_unit", "created": NOW - 90 * 86_400, "currency": "usd", "livemode": false, "metadata": {}, "product": "prod_Pro", "recurring": {"interval": "month", "interval_count": 1, "usage_type": "licensed"}, "type": "recurring", "unit_amount": 1900},
                "quantity": 1,
                "subscription": id,
                "tax_rates": []
            }],
            "has_more": false,
            "url": format!("/v1/subscription_items?subscription={id}")
        },
        "latest_invoice": "in_1RealTest",
        "livemode": false,
        "metadata": {"plan": "pro"},
        "start_date": NOW - 86_400,
        "status": status,
        "trial_end": null,
        "trial_start": null
    })
}

/// The shape before 2025-03-31: `current_period_end` on the subscription itself, and
/// none on the item.
fn old_shape_subscription(id: &str, customer: &str, status: &str, period_end: i64) -> Value {
    json!({
        "id": id,
        "object": "subscription",
        "cancel_at_period_end": true,
        "created": NOW - 40 * 86_400,
        "current_period_end": period_end,
        "current_period_start": period_end - 30 * 86_400,
        "customer": customer,
        "items": {
            "object": "list",
            "data": [{
                "id": format!("si_{id}"),
                "object": "subscription_item",
                "price": {"id": "price_team_monthly", "object": "price"},
                "quantity": 1
            }],
            "has_more": false,
            "url": format!("/v1/subscription_items?subscription={id}")
        },
        "livemode": false,
        "metadata": {"plan": "team"},
        "status": status,
        "trial_end": NOW - 35 * 86_400
    })
}

/// Three subscriptions served two per page, whatever `limit` asks: Stripe may return fewer
/// than asked, and the client must follow `has_more` + `starting_after`. `cus_loop` is a
/// broken server that says `has_more` on an empty page.
async fn list_subscriptions(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let customer = q.get("customer").cloned().unwrap_or_default();
    if customer == "cus_loop" {
        return Json(
            json!({"object": "list", "data": [], "has_more": true, "url": "/v1/subscriptions"}),
        );
    }
    let all = [
        new_shape_subscription("sub_3", &customer, "active", NOW + 20 * 86_400),
        new_shape_subscription("sub_2", &customer, "canceled", NOW - 5 * 86_400),
        old_shape_subscription("sub_1", &customer, "past_due", NOW - 86_400),
    ];
    let start = match q.get("starting_after") {
        Some(after) => {
            all.iter()
                .position(|s| s["id"] == after.as_str())
                .expect("known cursor")
                + 1
        }
        None => 0,
    };
    let page: Vec<Value> = all.iter().skip(start).take(2).cloned().collect();
    Json(json!({
        "object": "list",
        "data": page,
        "has_more": start + 2 < all.len(),
        "url": "/v1/subscriptions"
    }))
}

fn checkout_request() -> CheckoutRequest {
    CheckoutRequest {
        customer: "cus_RealTest1".into(),
        price_id: "price_pro_monthly".into(),
        user_id: "usr_01J9ZK".into(),
        plan: "pro".into(),
        success_url: "https://app.example/billing?checkout=success".into(),
        cancel_url: "https://app.example/billing?checkout=cancel".into(),
        idempotency_key: "checkout-usr_01J9ZK-pro-7".into(),
    }
}

fn assert_common_headers(r: &Recorded) {
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    // async-stripe pins the API version its types were generated for.
    assert!(
        r.header("stripe-version").is_some_and(|v| !v.is_empty()),
        "{r:?}"
    );
    assert!(
        r.header("user-agent")
            .is_some_and(|v| v.contains("warpbase")),
        "{r:?}"
    );
}

#[tokio::test]
async fn create_customer_sends_email_metadata_and_idempotency_key() {
    let fake = Fake::start().await;
    let id = fake
        .client()
        .create_customer("ada@example.com", "usr_01J9ZK", "customer-usr_01J9ZK")
        .await
        .expect("customer");
    assert_eq!(id, "cus_RealTest1");

    let r = fake.only_request();
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/customers")
    );
    assert_common_headers(&r);
    assert_eq!(r.header("idempotency-key"), Some("customer-usr_01J9ZK"));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.param("email"), Some("ada@example.com"));
    assert_eq!(r.param("metadata[warpbase_user_id]"), Some("usr_01J9ZK"));
}

#[tokio::test]
async fn checkout_session_is_a_subscription_for_one_price_linked_to_the_user() {
    let fake = Fake::start().await;
    let session = fake
        .client()
        .create_checkout_session(&checkout_request())
        .await
        .expect("session");
    assert_eq!(
        session,
        CheckoutSession {
            id: "cs_test_a1RealTest".into(),
            url:
                "https://checkout.stripe.com/c/pay/cs_test_a1RealTest#fidkdWxOYHwnPyd1blpxYHZxWjA0"
                    .into(),
        }
    );

    let r = fake.only_request();
    assert_eq!(r.path, "/v1/checkout/sessions");
    assert_common_headers(&r);
    assert_eq!(
        r.header("idempotency-key"),
        Some("checkout-usr_01J9ZK-pro-7")
    );
    let expected = [
        ("mode", "subscription"),
        ("customer", "cus_RealTest1"),
        ("line_items[0][price]", "price_pro_monthly"),
        ("line_items[0][quantity]", "1"),
        ("client_reference_id", "usr_01J9ZK"),
        ("metadata[plan]", "pro"),
        ("subscription_data[metadata][plan]", "pro"),
        (
            "success_url",
            "https://app.example/billing?checkout=success",
        ),
        ("cancel_url", "https://app.example/billing?checkout=cancel"),
    ];
    for (k, v) in expected {
        assert_eq!(r.param(k), Some(v), "{k} in {:?}", r.params);
    }
    // Nothing else: e.g. no second line item, no customer_email next to customer.
    assert_eq!(r.params.len(), expected.len(), "{:?}", r.params);
}

#[tokio::test]
async fn portal_session_returns_the_url() {
    let fake = Fake::start().await;
    let url = fake
        .client()
        .create_portal_session("cus_RealTest1", "https://app.example/billing")
        .await
        .expect("portal");
    assert_eq!(
        url,
        "https://billing.stripe.com/p/session/test_YWNjdF8xRmFrZQ"
    );

    let r = fake.only_request();
    assert_eq!(r.path, "/v1/billing_portal/sessions");
    assert_common_headers(&r);
    assert_eq!(r.param("customer"), Some("cus_RealTest1"));
    assert_eq!(r.param("return_url"), Some("https://app.example/billing"));
}

#[tokio::test]
async fn usage_is_a_meter_event_with_identifier_and_timestamp() {
    let fake = Fake::start().await;
    let report = UsageReport {
        customer: "cus_RealTest1".into(),
        event_name: "warpbase_jobs".into(),
        value: 3,
        identifier: "job_01J9ZKQ".into(),
        timestamp: NOW - 60,
    };
    fake.client().report_usage(&report).await.expect("usage");

    let r = fake.only_request();
    assert_eq!(r.path, "/v1/billing/meter_events");
    assert_common_headers(&r);
    assert_eq!(r.param("event_name"), Some("warpbase_jobs"));
    assert_eq!(
        r.param("payload[stripe_customer_id]"),
        Some("cus_RealTest1")
    );
    assert_eq!(r.param("payload[value]"), Some("3"));
    assert_eq!(r.param("identifier"), Some("job_01J9ZKQ"));
    assert_eq!(r.param("timestamp"), Some((NOW - 60).to_string().as_str()));
    assert_eq!(r.header("idempotency-key"), Some("meter-event-job_01J9ZKQ"));
}

#[tokio::test]
async fn list_subscriptions_follows_pages_and_reads_both_shapes() {
    let fake = Fake::start().await;
    let subs = fake
        .client()
        .list_subscriptions("cus_RealTest1")
        .await
        .expect("list");
    let ids: Vec<&str> = subs.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["sub_3", "sub_2", "sub_1"]);

    let active = &subs[0];
    assert_eq!(active.customer, "cus_RealTest1");
    assert_eq!(active.status, "active");
    assert_eq!(active.price_id.as_deref(), Some("price_pro_monthly"));
    // New shape: the period end comes from items.data[0].
    assert_eq!(active.current_period_end, Some(NOW + 20 * 86_400));
    assert!(!active.cancel_at_period_end);
    assert_eq!(active.trial_end, None);
    assert_eq!(active.created, NOW - 86_400);
    assert_eq!(subs[1].status, "canceled");

    // Old shape: the period end on the subscription itself.
    let old = &subs[2];
    assert_eq!(old.status, "past_due");
    assert_eq!(old.current_period_end, Some(NOW - 86_400));
    assert_eq!(old.price_id.as_deref(), Some("price_team_monthly"));
    assert!(old.cancel_at_period_end);
    assert_eq!(old.trial_end, Some(NOW - 35 * 86_400));

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    for r in &reqs {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/v1/subscriptions")
        );
        assert_common_headers(r);
        assert_eq!(r.param("customer"), Some("cus_RealTest1"));
        // Canceled subscriptions are left out unless asked for.
        assert_eq!(r.param("status"), Some("all"));
        assert_eq!(r.param("limit"), Some("100"));
        assert_eq!(r.header("idempotency-key"), None);
    }
    assert_eq!(reqs[0].param("starting_after"), None);
    assert_eq!(reqs[1].param("starting_after"), Some("sub_2"));
}

#[tokio::test]
async fn has_more_on_an_empty_page_does_not_loop() {
    let fake = Fake::start().await;
    let subs = fake
        .client()
        .list_subscriptions("cus_loop")
        .await
        .expect("list");
    assert!(subs.is_empty());
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn stripe_errors_keep_status_and_message() {
    let fake = Fake::start().await;
    let client = fake.client();
    let cases = [
        (
            402,
            r#"{"error":{"message":"Your card was declined.","type":"card_error","code":"card_declined","decline_code":"generic_decline"}}"#,
            "Your card was declined.",
            false,
        ),
        (
            400,
            r#"{"error":{"message":"No such price: 'price_gone'","type":"invalid_request_error","param":"line_items[0][price]","code":"resource_missing"}}"#,
            "No such price: 'price_gone'",
            false,
        ),
        (
            429,
            r#"{"error":{"message":"Too many requests hit the API too quickly.","type":"invalid_request_error","code":"rate_limit"}}"#,
            "Too many requests hit the API too quickly.",
            true,
        ),
        (
            500,
            r#"{"error":{"message":"An unknown error occurred","type":"api_error"}}"#,
            "An unknown error occurred",
            true,
        ),
    ];
    for (status, body, message, retryable) in cases {
        fake.fail_next(status, body);
        let err = client
            .create_checkout_session(&checkout_request())
            .await
            .expect_err("must fail");
        match &err {
            StripeError::Api {
                status: s,
                message: m,
            } => {
                assert_eq!((*s, m.as_str()), (status, message));
            }
            other => panic!("{status}: expected Api, got {other:?}"),
        }
        assert_eq!(err.is_retryable(), retryable, "{status}");
        assert!(err.to_string().contains(message), "{err}");
    }
}

#[tokio::test]
async fn error_messages_never_contain_the_secret_key() {
    let fake = Fake::start().await;
    // A misbehaving Stripe-compatible server that echoes the key back.
    fake.fail_next(
        401,
        &format!(r#"{{"error":{{"message":"Invalid API Key provided: {KEY}","type":"invalid_request_error"}}}}"#),
    );
    let err = fake
        .client()
        .create_portal_session("cus_RealTest1", "https://app.example/billing")
        .await
        .expect_err("must fail");
    assert!(
        matches!(err, StripeError::Api { status: 401, .. }),
        "{err:?}"
    );
    assert!(!err.to_string().contains(KEY), "{err}");
    assert!(!format!("{err:?}").contains(KEY), "{err:?}");
    assert!(
        err.to_string().contains("Invalid API Key provided"),
        "{err}"
    );
}

#[tokio::test]
async fn a_non_stripe_error_page_is_a_retryable_network_error() {
    let fake = Fake::start().await;
    fake.fail_next(502, "<html><body>502 Bad Gateway</body></html>");
    let err = fake
        .client()
        .list_subscriptions("cus_RealTest1")
        .await
        .expect_err("must fail");
    assert!(matches!(err, StripeError::Network(_)), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_network_error() {
    // Bind and drop: the port is then (almost certainly) closed, so connecting is refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let client = RealStripe::new(&config(&format!("http://{closed}"))).expect("client");
    let err = client
        .create_customer("ada@example.com", "usr_1", "customer-usr_1")
        .await
        .expect_err("must fail");
    assert!(matches!(err, StripeError::Network(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(!err.to_string().contains(KEY));
}

#[tokio::test]
async fn a_slow_server_times_out_as_a_network_error() {
    let fake = Fake::start().await;
    *fake.state.delay.lock().expect("lock") = Some(Duration::from_secs(5));
    let client = RealStripe::with_timeout(
        &config(&format!("http://{}", fake.addr)),
        Duration::from_millis(200),
    )
    .expect("client");
    let started = std::time::Instant::now();
    let err = client
        .create_portal_session("cus_RealTest1", "https://app.example/billing")
        .await
        .expect_err("must time out");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, StripeError::Network(_)), "{err:?}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn api_base_with_v1_and_trailing_slash_reaches_the_same_endpoints() {
    let fake = Fake::start().await;
    let client = fake.client_with_base(&format!("http://{}/v1/", fake.addr));
    assert_eq!(client.api_base(), format!("http://{}/", fake.addr));
    client
        .create_portal_session("cus_RealTest1", "https://app.example/billing")
        .await
        .expect("portal");
    assert_eq!(fake.only_request().path, "/v1/billing_portal/sessions");
}

#[tokio::test]
async fn the_default_base_is_stripe_and_config_errors_are_config() {
    let client = RealStripe::new(&config("")).expect("client");
    assert_eq!(client.api_base(), "https://api.stripe.com/");
    let err = RealStripe::new(&StripeConfig::default()).expect_err("no key");
    assert!(matches!(err, StripeError::Config(_)), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn an_oversized_idempotency_key_is_refused_before_sending() {
    let fake = Fake::start().await;
    let mut req = checkout_request();
    req.idempotency_key = "k".repeat(300);
    let err = fake
        .client()
        .create_checkout_session(&req)
        .await
        .expect_err("must fail");
    assert!(matches!(err, StripeError::Config(_)), "{err:?}");
    assert!(fake.requests().is_empty());
}
