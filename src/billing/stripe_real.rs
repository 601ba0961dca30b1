//! Placeholder until the async-stripe client lands (being written on branch stripe-real).
use super::stripe::StripeError;

pub struct RealStripe;

impl RealStripe {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(
        _cfg: &crate::config::StripeConfig,
    ) -> Result<std::sync::Arc<dyn super::stripe::StripeApi>, StripeError> {
        Err(StripeError::Config(
            "the real Stripe client is not available in this build".into(),
        ))
    }
}
