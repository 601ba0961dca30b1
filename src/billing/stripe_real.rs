//! [`RealStripe`]: the [`StripeApi`] on the real Stripe API (or any Stripe-compatible
//! server named by `stripe.api_base`) through async-stripe's typed request builders and
//! its HTTP client.
//!
//! It owns request building, idempotency keys, timeouts and the mapping of every failure
//! to [`StripeError`]. It must not decide anything about billing state (that is the
//! state engine's job) and must never let the secret key reach an error message or log.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_billing::subscription::{ListSubscription, ListSubscriptionStatus};
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_core::customer::CreateCustomer;

use super::stripe::{
    CheckoutRequest, CheckoutSession, RemoteSubscription, StripeApi, StripeError, UsageReport,
};
use crate::config::{Secret, StripeConfig};

/// Budget of one HTTP attempt, connect to last body byte. async-stripe's async client has
/// no timeout unless given one; every strategy we use makes exactly one attempt.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Stripe's largest page size; fewer round trips when syncing.
const PAGE_LIMIT: i64 = 100;

/// A bound on pagination so a server that keeps saying `has_more` cannot loop us forever.
const MAX_PAGES: usize = 100;

pub struct RealStripe {
    client: stripe::Client,
    timeout: Duration,
    /// Kept only to scrub it from error text a misbehaving server might echo back.
    secret_key: Secret,
    api_base: String,
}

impl fmt::Debug for RealStripe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealStripe")
            .field("api_base", &self.api_base)
            .finish_non_exhaustive()
    }
}

impl RealStripe {
    /// Builds the client from config. `api_base` empty means `https://api.stripe.com/`.
    pub fn new(cfg: &StripeConfig) -> Result<RealStripe, StripeError> {
        RealStripe::with_timeout(cfg, CALL_TIMEOUT)
    }

    /// As [`RealStripe::new`] with another per-call timeout (tests use a short one).
    pub fn with_timeout(cfg: &StripeConfig, timeout: Duration) -> Result<RealStripe, StripeError> {
        let key = cfg.secret_key.expose();
        if key.is_empty() {
            return Err(StripeError::Config("stripe.secret_key is empty".into()));
        }
        // The key becomes an `Authorization` header value; checking here gives a config
        // error that names the setting instead of a failure on the first request.
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(StripeError::Config(
                "stripe.secret_key contains whitespace or non-ASCII characters".into(),
            ));
        }
        let mut builder = stripe::ClientBuilder::new(key).timeout(timeout).app_info(
            "warpbase",
            Some(env!("CARGO_PKG_VERSION").into()),
            None,
        );
        let api_base = normalize_api_base(&cfg.api_base)?;
        if let Some(base) = &api_base {
            builder = builder.url(base.clone());
        }
        let client = builder
            .build()
            .map_err(|e| StripeError::Config(format!("cannot build the Stripe client: {e}")))?;
        Ok(RealStripe {
            client,
            timeout,
            secret_key: cfg.secret_key.clone(),
            api_base: api_base.unwrap_or_else(|| "https://api.stripe.com/".into()),
        })
    }

    /// The base URL requests go to (with a trailing `/`, without `v1`).
    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    fn map_err(&self, err: stripe::StripeError) -> StripeError {
        let mapped = match err {
            stripe::StripeError::Stripe(api, status) => StripeError::Api {
                status,
                message: api
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("{} (no message)", api.type_)),
            },
            // async-stripe reports a non-2xx answer whose body is not a Stripe error
            // (a proxy's HTML 502, say) this way too, so it counts as transient.
            stripe::StripeError::JSONDeserialize(msg) => {
                StripeError::Network(format!("unreadable answer from Stripe: {msg}"))
            }
            stripe::StripeError::ClientError(msg) => StripeError::Network(msg),
            stripe::StripeError::Timeout => {
                StripeError::Network(format!("no answer within {:?}", self.timeout))
            }
            stripe::StripeError::ConfigError(msg) => StripeError::Config(msg),
        };
        self.scrub(mapped)
    }

    /// Stripe itself masks keys in its messages (`sk_test_****1234`), but a
    /// Stripe-compatible server or a proxy might echo the header back verbatim.
    fn scrub(&self, err: StripeError) -> StripeError {
        let key = self.secret_key.expose();
        let clean = |s: String| {
            if !key.is_empty() && s.contains(key) {
                s.replace(key, "[redacted]")
            } else {
                s
            }
        };
        match err {
            StripeError::Api { status, message } => StripeError::Api {
                status,
                message: clean(message),
            },
            StripeError::Network(m) => StripeError::Network(clean(m)),
            StripeError::Config(m) => StripeError::Config(clean(m)),
        }
    }

    /// Sends a typed request but reads the answer into our own lenient serde type instead
    /// of async-stripe's generated one. The generated types follow the API version
    /// async-stripe pins and reject anything else (e.g. a subscription without
    /// `billing_schedules`), while a Stripe-compatible server or an account-default API
    /// version may answer in an older shape.
    async fn send_lenient<R, T>(&self, req: &R) -> Result<T, StripeError>
    where
        R: StripeRequest,
        T: DeserializeOwned,
    {
        let raw: miniserde::json::Value = req
            .build()
            .customize()
            .send(&self.client)
            .await
            .map_err(|e| self.map_err(e))?;
        serde_json::from_str(&miniserde::json::to_string(&raw)).map_err(|e| {
            self.scrub(StripeError::Network(format!(
                "unexpected answer from Stripe: {e}"
            )))
        })
    }
}

/// `""` → the default; otherwise a base URL with exactly one trailing `/` and no `/v1`
/// (async-stripe appends `v1/...` to it verbatim). A copied `https://api.stripe.com/v1`
/// is accepted because that is how Stripe's docs write endpoint URLs.
fn normalize_api_base(raw: &str) -> Result<Option<String>, StripeError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return Err(StripeError::Config(format!(
            "stripe.api_base must start with http:// or https://, got {raw:?}"
        )));
    }
    let base = raw.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    Ok(Some(format!("{base}/")))
}

/// Stripe limits idempotency keys to 255 characters, and the key travels as a header.
fn idempotent(key: &str) -> Result<RequestStrategy, StripeError> {
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StripeError::Config(format!(
            "idempotency key {key:?} must be visible ASCII"
        )));
    }
    IdempotencyKey::new(key)
        .map(RequestStrategy::Idempotent)
        .map_err(|e| StripeError::Config(e.to_string()))
}

impl StripeApi for RealStripe {
    fn create_customer<'a>(
        &'a self,
        email: &'a str,
        user_id: &'a str,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>> {
        Box::pin(async move {
            let strategy = idempotent(idempotency_key)?;
            let customer = CreateCustomer::new()
                .email(email)
                .metadata(HashMap::from([(
                    "warpbase_user_id".to_string(),
                    user_id.to_string(),
                )]))
                .customize()
                .request_strategy(strategy)
                .send(&self.client)
                .await
                .map_err(|e| self.map_err(e))?;
            Ok(customer.id.to_string())
        })
    }

    fn create_checkout_session<'a>(
        &'a self,
        req: &'a CheckoutRequest,
    ) -> BoxFuture<'a, Result<CheckoutSession, StripeError>> {
        Box::pin(async move {
            let strategy = idempotent(&req.idempotency_key)?;
            let plan = HashMap::from([("plan".to_string(), req.plan.clone())]);
            let mut item = CreateCheckoutSessionLineItems::new();
            item.price = Some(req.price_id.clone());
            item.quantity = Some(1);
            // The subscription gets its own copy of `plan`: webhooks about the
            // subscription (updated, deleted, invoices) never carry the session's metadata.
            let mut subscription_data = CreateCheckoutSessionSubscriptionData::new();
            subscription_data.metadata = Some(plan.clone());
            let session = CreateCheckoutSession::new()
                .mode(CheckoutSessionMode::Subscription)
                .customer(&req.customer)
                .line_items(vec![item])
                .client_reference_id(&req.user_id)
                .metadata(plan)
                .subscription_data(subscription_data)
                .success_url(&req.success_url)
                .cancel_url(&req.cancel_url)
                .customize()
                .request_strategy(strategy)
                .send(&self.client)
                .await
                .map_err(|e| self.map_err(e))?;
            // `url` is null only for embedded/custom UI modes, which we never request.
            let url = session.url.ok_or_else(|| {
                StripeError::Network(format!("checkout session {} has no url", session.id))
            })?;
            Ok(CheckoutSession {
                id: session.id.to_string(),
                url,
            })
        })
    }

    fn create_portal_session<'a>(
        &'a self,
        customer: &'a str,
        return_url: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>> {
        Box::pin(async move {
            // No idempotency key: a portal session is a short-lived login link, and a
            // retried request creating a second one is harmless.
            let session = CreateBillingPortalSession::new()
                .customer(customer)
                .return_url(return_url)
                .customize()
                .send(&self.client)
                .await
                .map_err(|e| self.map_err(e))?;
            Ok(session.url)
        })
    }

    fn report_usage<'a>(
        &'a self,
        report: &'a UsageReport,
    ) -> BoxFuture<'a, Result<(), StripeError>> {
        Box::pin(async move {
            // `identifier` is what the meter deduplicates on. The same value, prefixed, as
            // Idempotency-Key makes a retry after a lost answer get the first answer back
            // instead of tripping the duplicate-identifier check.
            let strategy = idempotent(&format!("meter-event-{}", report.identifier))?;
            let payload = HashMap::from([
                ("stripe_customer_id".to_string(), report.customer.clone()),
                ("value".to_string(), report.value.to_string()),
            ]);
            CreateBillingMeterEvent::new(&report.event_name, payload)
                .identifier(&report.identifier)
                .timestamp(report.timestamp)
                .customize()
                .request_strategy(strategy)
                .send(&self.client)
                .await
                .map_err(|e| self.map_err(e))?;
            Ok(())
        })
    }

    fn list_subscriptions<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteSubscription>, StripeError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut starting_after: Option<String> = None;
            for _ in 0..MAX_PAGES {
                // Without `status=all` Stripe leaves out canceled subscriptions, which
                // reconciliation needs to see to end access.
                let mut req = ListSubscription::new()
                    .customer(customer)
                    .status(ListSubscriptionStatus::All)
                    .limit(PAGE_LIMIT);
                if let Some(after) = &starting_after {
                    req = req.starting_after(after);
                }
                let page: SubscriptionPage = self.send_lenient(&req).await?;
                let last = page.data.last().map(|s| s.id.clone());
                out.extend(page.data.into_iter().map(WireSubscription::into_remote));
                match (page.has_more, last) {
                    (true, Some(last)) => starting_after = Some(last),
                    // `has_more` with an empty page would repeat the same request forever.
                    _ => return Ok(out),
                }
            }
            Err(StripeError::Network(format!(
                "more than {} subscriptions for customer {customer}; stopped paginating",
                MAX_PAGES as i64 * PAGE_LIMIT
            )))
        })
    }
}

/// One page of `GET /v1/subscriptions`, reduced to what reconciliation reads.
#[derive(Deserialize)]
struct SubscriptionPage {
    #[serde(default)]
    data: Vec<WireSubscription>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct WireSubscription {
    id: String,
    customer: IdOrObject,
    status: String,
    /// Present up to API version 2025-02-24; later versions have it only per item.
    #[serde(default)]
    current_period_end: Option<i64>,
    #[serde(default)]
    cancel_at_period_end: bool,
    #[serde(default)]
    trial_end: Option<i64>,
    created: i64,
    #[serde(default)]
    items: Option<WireItems>,
}

#[derive(Deserialize)]
struct WireItems {
    #[serde(default)]
    data: Vec<WireItem>,
}

#[derive(Deserialize)]
struct WireItem {
    #[serde(default)]
    current_period_end: Option<i64>,
    #[serde(default)]
    price: Option<IdOrObject>,
    /// The legacy Plan object; older servers may send only this.
    #[serde(default)]
    plan: Option<IdOrObject>,
}

/// An expandable field: an id string, or the expanded object carrying `id`.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdOrObject {
    Id(String),
    Object { id: String },
}

impl IdOrObject {
    fn into_id(self) -> String {
        match self {
            IdOrObject::Id(id) | IdOrObject::Object { id } => id,
        }
    }
}

impl WireSubscription {
    fn into_remote(self) -> RemoteSubscription {
        let first = self.items.and_then(|i| i.data.into_iter().next());
        let (item_period_end, price_id) = match first {
            Some(item) => (
                item.current_period_end,
                item.price.or(item.plan).map(IdOrObject::into_id),
            ),
            None => (None, None),
        };
        RemoteSubscription {
            id: self.id,
            customer: self.customer.into_id(),
            status: self.status,
            current_period_end: self.current_period_end.or(item_period_end),
            cancel_at_period_end: self.cancel_at_period_end,
            trial_end: self.trial_end,
            price_id,
            created: self.created,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_is_normalized() {
        let cases = [
            ("", None),
            ("   ", None),
            ("http://127.0.0.1:12111", Some("http://127.0.0.1:12111/")),
            ("http://127.0.0.1:12111/", Some("http://127.0.0.1:12111/")),
            ("https://api.stripe.com/v1", Some("https://api.stripe.com/")),
            (
                "https://api.stripe.com/v1/",
                Some("https://api.stripe.com/"),
            ),
            (
                "https://proxy.example/stripe",
                Some("https://proxy.example/stripe/"),
            ),
        ];
        for (raw, want) in cases {
            let got = normalize_api_base(raw).expect(raw);
            assert_eq!(got.as_deref(), want, "{raw:?}");
        }
        assert!(matches!(
            normalize_api_base("localhost:12111"),
            Err(StripeError::Config(_))
        ));
    }

    #[test]
    fn idempotency_keys_are_checked() {
        assert!(idempotent("checkout-u1-pro-1").is_ok());
        for bad in [String::new(), "a b".into(), "x".repeat(256)] {
            assert!(
                matches!(idempotent(&bad), Err(StripeError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn both_subscription_shapes_map() {
        // Old shape: period on the subscription, price id as an object, customer expanded.
        let old: WireSubscription = serde_json::from_value(serde_json::json!({
            "id": "sub_1", "customer": {"id": "cus_1", "object": "customer"},
            "status": "active", "current_period_end": 200, "cancel_at_period_end": true,
            "trial_end": null, "created": 100,
            "items": {"data": [{"price": {"id": "price_a"}}]}
        }))
        .expect("old shape");
        let old = old.into_remote();
        assert_eq!(old.current_period_end, Some(200));
        assert_eq!(old.customer, "cus_1");
        assert_eq!(old.price_id.as_deref(), Some("price_a"));
        assert!(old.cancel_at_period_end);

        // New shape: period only on the first item; legacy plan when price is absent.
        let new: WireSubscription = serde_json::from_value(serde_json::json!({
            "id": "sub_2", "customer": "cus_2", "status": "trialing", "trial_end": 300,
            "created": 100, "items": {"data": [{"current_period_end": 400, "plan": "plan_b"}]}
        }))
        .expect("new shape");
        let new = new.into_remote();
        assert_eq!(new.current_period_end, Some(400));
        assert_eq!(new.trial_end, Some(300));
        assert_eq!(new.price_id.as_deref(), Some("plan_b"));
        assert!(!new.cancel_at_period_end);
    }

    #[test]
    fn secret_is_scrubbed_and_not_in_debug() {
        let cfg = StripeConfig {
            secret_key: Secret::new("sk_test_scrubme"),
            webhook_secrets: Vec::new(),
            api_base: "http://127.0.0.1:1".into(),
        };
        let s = RealStripe::new(&cfg).expect("client");
        let err = s.scrub(StripeError::Api {
            status: 401,
            message: "Invalid API Key provided: sk_test_scrubme".into(),
        });
        assert!(!err.to_string().contains("sk_test_scrubme"), "{err}");
        assert!(!format!("{s:?}").contains("sk_test_scrubme"));
    }

    #[test]
    fn bad_config_is_a_config_error() {
        for (key, base) in [("", ""), ("sk_test 1", ""), ("sk_test_1", "ftp://x")] {
            let cfg = StripeConfig {
                secret_key: Secret::new(key),
                webhook_secrets: Vec::new(),
                api_base: base.into(),
            };
            assert!(
                matches!(RealStripe::new(&cfg), Err(StripeError::Config(_))),
                "{key:?} {base:?}"
            );
        }
    }
}
