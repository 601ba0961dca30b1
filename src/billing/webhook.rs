//! The webhook pipeline: raw body → signature check → one lenient read → ONE write that
//! records the event id and applies its effect → answer. A duplicate id changes nothing;
//! a failure rolls back everything and answers 500 so Stripe retries, and is recorded
//! (in a separate write) as `failed` for admins. Failed events are re-applied when
//! Stripe redelivers them or an admin replays them.
//!
//! Per delivery the body is read once ([`StripeEvent::read_delivery`]) and copied once,
//! into an `Arc<str>` that the write closure and the failure path share; the event is
//! shared the same way. Nothing else copies the payload before SQLite binds it.

use std::sync::Arc;

use super::engine::{self, Decision, EngineCtx};
use super::event::{Delivery, EventObject, StripeEvent};
use super::{Billing, BillingError, parse_state};
use crate::storage::billing::{self as sb, EventRecord, StateRow};
use crate::storage::states::EventStatus;
use crate::storage::users;
use crate::storage::{Conn, StorageError};

/// A fault injected into event application, so a test can prove that a failure after
/// the writes rolls every one of them back (and that Stripe's retry then applies). Handed
/// in at construction ([`Billing::with_apply_fault`], through
/// [`AppOptions::billing_fault`](crate::AppOptions::billing_fault)); production has none.
pub trait ApplyFault: Send + Sync {
    /// Called inside the event's write transaction after everything is written, before
    /// the commit. `Err(reason)` fails the application with that reason.
    fn after_write(&self, event_id: &str) -> Result<(), String>;
}

/// What happened to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub duplicate: bool,
    pub status: EventStatus,
    pub user_id: Option<String>,
}

impl Billing {
    /// Verifies and processes one webhook delivery.
    pub async fn handle_webhook(
        &self,
        body: &[u8],
        signature: Option<&str>,
    ) -> Result<Processed, BillingError> {
        super::signature::verify(
            body,
            signature,
            self.webhook_secrets(),
            self.now_secs(),
            super::signature::DEFAULT_TOLERANCE_SECS,
        )
        .map_err(|e| BillingError::InvalidSignature(e.to_string()))?;
        // Valid JSON is valid UTF-8, so this refuses nothing that could be an event, and
        // lets the payload be stored as the exact text that was signed.
        let text = std::str::from_utf8(body)
            .map_err(|e| BillingError::NotAnEvent(format!("the body is not JSON: {e}")))?;
        let delivery = StripeEvent::read_delivery(text)
            .map_err(|e| BillingError::NotAnEvent(e.to_string()))?;
        let raw: Arc<str> = Arc::from(text);
        let (ty, processed) = match delivery {
            Delivery::Event(event) => {
                let ty = event.event_type.clone();
                (ty, self.process(event, raw).await)
            }
            Delivery::Unreadable { envelope, error } => {
                // Recorded for admins and answered 200: redelivering the same bytes
                // cannot help. A fixed binary can replay it.
                self.record_failure(
                    &envelope.id,
                    &envelope.event_type,
                    envelope.created,
                    raw,
                    error.to_string(),
                )
                .await;
                let processed = Ok(Processed {
                    duplicate: false,
                    status: EventStatus::Failed,
                    user_id: None,
                });
                (envelope.event_type, processed)
            }
        };
        let outcome = match &processed {
            Ok(p) if p.duplicate => "duplicate",
            Ok(p) => p.status.as_str(),
            Err(_) => "error",
        };
        metrics::counter!("stripe_events_total", "type" => ty, "outcome" => outcome).increment(1);
        processed
    }

    /// Applies a parsed event exactly once; on failure records it and returns the error.
    /// `raw` is the event's body as received, stored with it.
    pub async fn process(
        &self,
        event: StripeEvent,
        raw: Arc<str>,
    ) -> Result<Processed, BillingError> {
        // Shared, not cloned: the write closure must own what it reads ('static), and
        // the failure path below still needs both after the closure is gone.
        let event = Arc::new(event);
        let this = self.clone();
        let (ev, payload) = (Arc::clone(&event), Arc::clone(&raw));
        let now_ms = self.inner.clock.now_millis();
        let result = self
            .inner
            .storage
            .write(move |c| this.apply_in(c, &ev, &payload, now_ms, false))
            .await;
        match result {
            Ok(p) => {
                if let Some(uid) = &p.user_id {
                    self.invalidate(uid).await;
                }
                Ok(p)
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(event = %event.id, error = %reason, "applying a Stripe event failed; rolled back");
                self.record_failure(&event.id, &event.event_type, event.created, raw, reason)
                    .await;
                Err(e)
            }
        }
    }

    async fn record_failure(
        &self,
        id: &str,
        ty: &str,
        created: i64,
        raw: Arc<str>,
        reason: String,
    ) {
        let (id, ty) = (id.to_string(), ty.to_string());
        let now = self.inner.clock.now_millis();
        let r = self
            .inner
            .storage
            .write(move |c| {
                // Never overwrite a success with a failure record.
                match sb::event_status(c, &id)? {
                    Some(s) if s != EventStatus::Failed => return Ok(()),
                    _ => {}
                }
                sb::record_event(
                    c,
                    &EventRecord {
                        id: &id,
                        event_type: &ty,
                        created,
                        status: EventStatus::Failed,
                        reason: Some(&reason),
                        user_id: None,
                        payload: &raw,
                    },
                    now,
                )
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot record the failed Stripe event");
        }
    }

    /// The whole effect of one event inside the caller's write transaction.
    /// `replay`: an admin re-applies a recorded event (not a duplicate even if recorded).
    pub(crate) fn apply_in(
        &self,
        c: &Conn,
        event: &StripeEvent,
        raw: &str,
        now_ms: i64,
        replay: bool,
    ) -> Result<Processed, BillingError> {
        if !replay
            && let Some(status) = sb::event_status(c, &event.id)?
            && status != EventStatus::Failed
        {
            return Ok(Processed {
                duplicate: true,
                status,
                user_id: None,
            });
        }
        let (status, reason, user_id) = self.decide_and_apply(c, event, now_ms)?;
        sb::record_event(
            c,
            &EventRecord {
                id: &event.id,
                event_type: &event.event_type,
                created: event.created,
                status,
                reason: reason.as_deref(),
                user_id: user_id.as_deref(),
                payload: raw,
            },
            now_ms,
        )?;
        if let Some(fault) = &self.inner.apply_fault {
            fault
                .after_write(&event.id)
                .map_err(BillingError::ApplyFailed)?;
        }
        Ok(Processed {
            duplicate: false,
            status,
            user_id,
        })
    }

    #[allow(clippy::type_complexity)]
    fn decide_and_apply(
        &self,
        c: &Conn,
        event: &StripeEvent,
        now_ms: i64,
    ) -> Result<(EventStatus, Option<String>, Option<String>), BillingError> {
        if let Some(link) = engine::link_from_checkout(event) {
            if users::get_user(c, &link.user_id)?.is_none() {
                return Ok((
                    EventStatus::Ignored,
                    Some("client_reference_id is not a user of this instance".into()),
                    None,
                ));
            }
            sb::link_customer(c, &link.user_id, &link.customer_id, now_ms)?;
            let mut state = parse_state(sb::load_state(c, &link.user_id)?.as_deref());
            if state.customer_id.is_none() {
                state.customer_id = Some(link.customer_id.clone());
                self.save(c, &link.user_id, &state, now_ms)?;
            }
            return Ok((EventStatus::Applied, None, Some(link.user_id)));
        }
        let Some(user_id) = self.user_for_event(c, event)? else {
            let reason = match &event.object {
                EventObject::Other => {
                    format!("{} does not change a subscription", event.event_type)
                }
                _ => "no user of this instance has this customer".to_string(),
            };
            return Ok((EventStatus::Ignored, Some(reason), None));
        };
        let mut state = parse_state(sb::load_state(c, &user_id)?.as_deref());
        if state.customer_id.is_none() {
            state.customer_id = customer_of(event).map(str::to_string);
        }
        let plan_for_price = |p: &str| self.plan_for_price(p);
        let ctx = EngineCtx {
            now: now_ms / 1000,
            grace_secs: self.inner.grace_secs,
            plan_for_price: &plan_for_price,
        };
        match engine::apply(&state, event, &ctx) {
            Decision::Apply(next) => {
                self.save(c, &user_id, &next, now_ms)?;
                if event.event_type == super::event::INVOICE_PAYMENT_FAILED {
                    self.payment_failed_mail(c, &user_id, &next, now_ms)?;
                }
                Ok((EventStatus::Applied, None, Some(user_id)))
            }
            Decision::Stale(reason) => Ok((EventStatus::Stale, Some(reason), Some(user_id))),
            Decision::Ignored(reason) => Ok((EventStatus::Ignored, Some(reason), Some(user_id))),
        }
    }

    fn user_for_event(
        &self,
        c: &Conn,
        event: &StripeEvent,
    ) -> Result<Option<String>, StorageError> {
        if let Some(customer) = customer_of(event)
            && let Some(uid) = sb::user_of_customer(c, customer)?
        {
            return Ok(Some(uid));
        }
        if let EventObject::Subscription { id, .. } = &event.object {
            return sb::user_of_subscription(c, id);
        }
        if let EventObject::Invoice {
            subscription: Some(id),
            ..
        } = &event.object
        {
            return sb::user_of_subscription(c, id);
        }
        Ok(None)
    }

    fn save(
        &self,
        c: &Conn,
        user_id: &str,
        state: &engine::BillingState,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let json =
            serde_json::to_string(state).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        sb::save_state(
            c,
            &StateRow {
                user_id,
                state_json: &json,
                status: state.status.as_str(),
                plan: &state.plan,
                subscription_id: state.subscription_id.as_deref(),
            },
            now_ms,
        )
    }

    fn payment_failed_mail(
        &self,
        c: &Conn,
        user_id: &str,
        state: &engine::BillingState,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let Some(user) = users::get_user(c, user_id)? else {
            return Ok(());
        };
        let until = state
            .grace_until
            .map(|s| crate::clock::rfc3339(s * 1000))
            .unwrap_or_else(|| "soon".into());
        crate::mail::enqueue_in(
            c,
            &crate::mail::Mail {
                to: user.email,
                from: self.inner.mail_from.clone(),
                subject: "Your payment failed".into(),
                body: format!(
                    "We could not charge your payment method. Your plan stays available until {until}.\n\nUpdate your payment method in the billing portal: {}/#/billing",
                    self.public_base()
                ),
            },
            now_ms,
        )?;
        Ok(())
    }

    /// Admin: re-applies a recorded event (e.g. one that failed) through the engine.
    pub async fn replay(&self, id: &str) -> Result<Processed, BillingError> {
        let eid = id.to_string();
        let row = self
            .inner
            .storage
            .read(move |c| sb::get_event(c, &eid))
            .await?
            .ok_or(BillingError::NotFound("event"))?;
        let event = StripeEvent::parse(row.payload.as_bytes()).map_err(|e| {
            BillingError::Invalid(format!("the recorded payload still cannot be read: {e}"))
        })?;
        let this = self.clone();
        let now_ms = self.inner.clock.now_millis();
        let payload = row.payload;
        let p = self
            .inner
            .storage
            .write(move |c| this.apply_in(c, &event, &payload, now_ms, true))
            .await?;
        if let Some(uid) = &p.user_id {
            self.invalidate(uid).await;
        }
        Ok(p)
    }
}

fn customer_of(event: &StripeEvent) -> Option<&str> {
    match &event.object {
        EventObject::Subscription { customer, .. } | EventObject::Invoice { customer, .. } => {
            Some(customer)
        }
        EventObject::CheckoutCompleted { customer, .. } => customer.as_deref(),
        EventObject::Other => None,
    }
}
