//! The outbound side of billing: what warpbase asks of Stripe, as a trait with two
//! implementations — the real Stripe API through async-stripe (`stripe_real`) and the
//! built-in fake used offline (`fake`). Everything inbound (webhooks) is elsewhere.

use futures_util::future::BoxFuture;

/// A Checkout Session in subscription mode for one user and one plan's price.
#[derive(Debug, Clone)]
pub struct CheckoutRequest {
    /// The Stripe customer (created once per user and reused).
    pub customer: String,
    pub price_id: String,
    /// Becomes `client_reference_id`, which links the session back to the user.
    pub user_id: String,
    /// Our plan id, stored in the session and subscription metadata.
    pub plan: String,
    pub success_url: String,
    pub cancel_url: String,
    /// Sent as `Idempotency-Key`, so a retried request never creates a second session.
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSession {
    pub id: String,
    pub url: String,
}

/// One Billing Meter Event (usage-based billing).
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub customer: String,
    /// The meter's `event_name`.
    pub event_name: String,
    pub value: u64,
    /// Stripe deduplicates meter events by this identifier (we use the job id).
    pub identifier: String,
    /// Unix seconds.
    pub timestamp: i64,
}

/// A subscription as Stripe reports it now (for reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSubscription {
    pub id: String,
    pub customer: String,
    pub status: String,
    pub price_id: Option<String>,
    /// Unix seconds.
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub trial_end: Option<i64>,
    pub created: i64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with an error status.
    #[error("Stripe API error {status}: {message}")]
    Api { status: u16, message: String },
    /// Could not reach Stripe or read its answer.
    #[error("cannot reach Stripe: {0}")]
    Network(String),
    #[error("Stripe is misconfigured: {0}")]
    Config(String),
}

impl StripeError {
    /// Worth retrying later: network trouble, rate limits, Stripe's own 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeError::Network(_) => true,
            StripeError::Api { status, .. } => *status == 429 || *status >= 500 || *status == 409,
            StripeError::Config(_) => false,
        }
    }
}

pub trait StripeApi: Send + Sync + 'static {
    /// Creates a customer for a user; returns its id (`cus_...`).
    fn create_customer<'a>(
        &'a self,
        email: &'a str,
        user_id: &'a str,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>>;

    fn create_checkout_session<'a>(
        &'a self,
        req: &'a CheckoutRequest,
    ) -> BoxFuture<'a, Result<CheckoutSession, StripeError>>;

    /// A customer-portal session; returns its URL.
    fn create_portal_session<'a>(
        &'a self,
        customer: &'a str,
        return_url: &'a str,
    ) -> BoxFuture<'a, Result<String, StripeError>>;

    fn report_usage<'a>(
        &'a self,
        report: &'a UsageReport,
    ) -> BoxFuture<'a, Result<(), StripeError>>;

    /// Every subscription of a customer, any status.
    fn list_subscriptions<'a>(
        &'a self,
        customer: &'a str,
    ) -> BoxFuture<'a, Result<Vec<RemoteSubscription>, StripeError>>;
}
