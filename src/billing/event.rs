//! Lenient reading of a verified Stripe event into only what the billing engine needs.
//!
//! Owns: the envelope (`id`, `type`, `created`, `livemode`) and the few fields of
//! `data.object` for the event types the engine acts on, in every API-version shape we
//! know (Stripe moved `current_period_*` to subscription items and the invoice's
//! subscription to `parent.subscription_details` in 2025). Unknown fields are ignored;
//! an event of an acted-on type with an unexpected shape is an [`EventParseError`], never
//! a panic. It must not verify signatures (see `signature`) or decide anything.

use serde_json::Value;

/// An event reduced to what the engine reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeEvent {
    pub id: String,
    pub event_type: String,
    /// Unix seconds, Stripe's clock; the ordering key of events.
    pub created: i64,
    pub livemode: bool,
    pub object: EventObject,
}

/// The part of `data.object` the engine uses, per event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventObject {
    CheckoutCompleted {
        session_id: String,
        customer: Option<String>,
        /// Set by us when creating the session: the warpbase user id.
        client_reference_id: Option<String>,
        subscription: Option<String>,
        mode: Option<String>,
    },
    Subscription {
        id: String,
        customer: String,
        /// Stripe's status string (`active`, `past_due`, …); the engine maps it.
        status: String,
        price_id: Option<String>,
        current_period_end: Option<i64>,
        current_period_start: Option<i64>,
        /// Also true when only `cancel_at` is set: newer billing modes schedule the end
        /// of a subscription that way, and access is the same (until period end).
        cancel_at_period_end: bool,
        trial_end: Option<i64>,
        canceled_at: Option<i64>,
        ended_at: Option<i64>,
    },
    Invoice {
        id: String,
        customer: String,
        subscription: Option<String>,
        /// Start and end of the subscription period the invoice pays for (the first line's
        /// period; the invoice-level fields only as a fallback, because for subscription
        /// invoices those describe the *previous* period).
        period_start: Option<i64>,
        period_end: Option<i64>,
        billing_reason: Option<String>,
        /// When the invoice itself was created (the same across payment retries).
        created: Option<i64>,
    },
    /// Any type the engine does not act on; recorded as ignored.
    Other,
}

/// Why an event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected Stripe event shape: {reason}")]
pub struct EventParseError {
    pub reason: String,
}

impl EventParseError {
    fn new(reason: impl Into<String>) -> Self {
        EventParseError {
            reason: reason.into(),
        }
    }
}

/// Event types whose object is a Checkout Session the engine reads.
pub const CHECKOUT_COMPLETED: &str = "checkout.session.completed";
pub const SUBSCRIPTION_CREATED: &str = "customer.subscription.created";
pub const SUBSCRIPTION_UPDATED: &str = "customer.subscription.updated";
pub const SUBSCRIPTION_DELETED: &str = "customer.subscription.deleted";
pub const INVOICE_PAID: &str = "invoice.paid";
pub const INVOICE_PAYMENT_FAILED: &str = "invoice.payment_failed";

impl StripeEvent {
    /// Reads a raw (already verified) webhook body.
    pub fn parse(body: &[u8]) -> Result<StripeEvent, EventParseError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| EventParseError::new(format!("not JSON: {e}")))?;
        StripeEvent::from_value(&value)
    }

    /// Reads an event already decoded to JSON.
    pub fn from_value(value: &Value) -> Result<StripeEvent, EventParseError> {
        if !value.is_object() {
            return Err(EventParseError::new("event is not a JSON object"));
        }
        let id = req_str(value, "id")?;
        let event_type = req_str(value, "type")?;
        let created = req_i64(value, "created")?;
        let livemode = opt_bool(value, "livemode")?.unwrap_or(false);
        let object = match event_type.as_str() {
            CHECKOUT_COMPLETED => checkout(data_object(value)?)?,
            SUBSCRIPTION_CREATED | SUBSCRIPTION_UPDATED | SUBSCRIPTION_DELETED => {
                subscription(data_object(value)?)?
            }
            INVOICE_PAID | INVOICE_PAYMENT_FAILED => invoice(data_object(value)?)?,
            // Only the types above are read, so an odd payload of any other type cannot
            // fail an event the engine would ignore anyway.
            _ => EventObject::Other,
        };
        Ok(StripeEvent {
            id,
            event_type,
            created,
            livemode,
            object,
        })
    }
}

fn data_object(event: &Value) -> Result<&Value, EventParseError> {
    let object = event
        .get("data")
        .and_then(|d| d.get("object"))
        .ok_or_else(|| EventParseError::new("missing data.object"))?;
    if object.is_object() {
        Ok(object)
    } else {
        Err(EventParseError::new("data.object is not an object"))
    }
}

fn checkout(o: &Value) -> Result<EventObject, EventParseError> {
    Ok(EventObject::CheckoutCompleted {
        session_id: req_str(o, "id")?,
        customer: opt_id(o, "customer")?,
        client_reference_id: opt_str(o, "client_reference_id")?,
        subscription: opt_id(o, "subscription")?,
        mode: opt_str(o, "mode")?,
    })
}

fn subscription(o: &Value) -> Result<EventObject, EventParseError> {
    let first_item = first_of_list(o, "items")?;
    let item_field = |key: &str| -> Result<Option<i64>, EventParseError> {
        match first_item {
            Some(item) => opt_i64(item, key),
            None => Ok(None),
        }
    };
    // Before 2025-03-31 the period lives on the subscription, since then on each item.
    let current_period_end = match opt_i64(o, "current_period_end")? {
        Some(v) => Some(v),
        None => item_field("current_period_end")?,
    };
    let current_period_start = match opt_i64(o, "current_period_start")? {
        Some(v) => Some(v),
        None => item_field("current_period_start")?,
    };
    let price_id = match first_item.map(|item| opt_id(item, "price")).transpose()? {
        Some(Some(price)) => Some(price),
        // Very old API versions carry a `plan` instead of `items[].price`.
        _ => opt_id(o, "plan")?,
    };
    let cancel_at_period_end =
        opt_bool(o, "cancel_at_period_end")?.unwrap_or(false) || opt_i64(o, "cancel_at")?.is_some();
    Ok(EventObject::Subscription {
        id: req_str(o, "id")?,
        customer: opt_id(o, "customer")?
            .ok_or_else(|| EventParseError::new("subscription without customer"))?,
        status: req_str(o, "status")?,
        price_id,
        current_period_end,
        current_period_start,
        cancel_at_period_end,
        trial_end: opt_i64(o, "trial_end")?,
        canceled_at: opt_i64(o, "canceled_at")?,
        ended_at: opt_i64(o, "ended_at")?,
    })
}

fn invoice(o: &Value) -> Result<EventObject, EventParseError> {
    let first_line = first_of_list(o, "lines")?;
    let line_period = |key: &str| -> Result<Option<i64>, EventParseError> {
        match first_line.and_then(|line| line.get("period")) {
            Some(period) if !period.is_null() => opt_i64(period, key),
            _ => Ok(None),
        }
    };
    let period_end = match line_period("end")? {
        Some(v) => Some(v),
        None => opt_i64(o, "period_end")?,
    };
    let period_start = match line_period("start")? {
        Some(v) => Some(v),
        None => opt_i64(o, "period_start")?,
    };
    Ok(EventObject::Invoice {
        id: req_str(o, "id")?,
        customer: opt_id(o, "customer")?
            .ok_or_else(|| EventParseError::new("invoice without customer"))?,
        subscription: invoice_subscription(o, first_line)?,
        period_start,
        period_end,
        billing_reason: opt_str(o, "billing_reason")?,
        created: opt_i64(o, "created")?,
    })
}

/// The invoice's subscription, wherever this API version put it.
fn invoice_subscription(
    o: &Value,
    first_line: Option<&Value>,
) -> Result<Option<String>, EventParseError> {
    // Before 2025-03-31.
    if let Some(id) = opt_id(o, "subscription")? {
        return Ok(Some(id));
    }
    // Since 2025-03-31 ("basil").
    if let Some(details) = o
        .get("parent")
        .and_then(|p| p.get("subscription_details"))
        .filter(|d| !d.is_null())
    {
        if let Some(id) = opt_id(details, "subscription")? {
            return Ok(Some(id));
        }
    }
    // Last resort: the line items name it too (old `subscription`, new
    // `parent.subscription_item_details.subscription`).
    if let Some(line) = first_line {
        if let Some(id) = opt_id(line, "subscription")? {
            return Ok(Some(id));
        }
        if let Some(details) = line
            .get("parent")
            .and_then(|p| p.get("subscription_item_details"))
            .filter(|d| !d.is_null())
        {
            return opt_id(details, "subscription");
        }
    }
    Ok(None)
}

/// The first element of a Stripe list object (`{"object":"list","data":[...]}`) at `key`.
fn first_of_list<'a>(o: &'a Value, key: &str) -> Result<Option<&'a Value>, EventParseError> {
    let Some(list) = o.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let data = list
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| EventParseError::new(format!("{key} is not a list object")))?;
    match data.first() {
        Some(first) if first.is_object() => Ok(Some(first)),
        Some(_) => Err(EventParseError::new(format!(
            "{key}.data[0] is not an object"
        ))),
        None => Ok(None),
    }
}

fn req_str(o: &Value, key: &str) -> Result<String, EventParseError> {
    opt_str(o, key)?.ok_or_else(|| EventParseError::new(format!("missing {key}")))
}

fn req_i64(o: &Value, key: &str) -> Result<i64, EventParseError> {
    opt_i64(o, key)?.ok_or_else(|| EventParseError::new(format!("missing {key}")))
}

fn opt_str(o: &Value, key: &str) -> Result<Option<String>, EventParseError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(EventParseError::new(format!("{key} is not a string"))),
    }
}

fn opt_i64(o: &Value, key: &str) -> Result<Option<i64>, EventParseError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| EventParseError::new(format!("{key} is not an integer"))),
    }
}

fn opt_bool(o: &Value, key: &str) -> Result<Option<bool>, EventParseError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(EventParseError::new(format!("{key} is not a boolean"))),
    }
}

/// An id that Stripe sends either as a string or, when expanded, as an object with `id`.
fn opt_id(o: &Value, key: &str) -> Result<Option<String>, EventParseError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(obj @ Value::Object(_)) => match obj.get("id") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(EventParseError::new(format!(
                "expanded {key} has no string id"
            ))),
        },
        Some(_) => Err(EventParseError::new(format!(
            "{key} is neither an id nor an object"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<StripeEvent, EventParseError> {
        // Through the byte path, as the webhook does.
        StripeEvent::parse(v.to_string().as_bytes())
    }

    /// customer.subscription.updated as sent with API version 2024-06-20: period on the
    /// subscription, `plan` alongside `items`.
    fn subscription_updated_2024() -> Value {
        json!({
          "id": "evt_1PqRsT2eZvKYlo2C0aBcDeFg",
          "object": "event",
          "api_version": "2024-06-20",
          "created": 1718000100,
          "data": {
            "object": {
              "id": "sub_1PqRs12eZvKYlo2CxYz01234",
              "object": "subscription",
              "application": null,
              "billing_cycle_anchor": 1718000000,
              "cancel_at": null,
              "cancel_at_period_end": true,
              "canceled_at": 1718000100,
              "collection_method": "charge_automatically",
              "created": 1718000000,
              "currency": "usd",
              "current_period_end": 1720592000,
              "current_period_start": 1718000000,
              "customer": "cus_QhX3pLm9aZ0b1c",
              "ended_at": null,
              "items": {
                "object": "list",
                "data": [{
                  "id": "si_QhX3aaaaaaaa",
                  "object": "subscription_item",
                  "created": 1718000001,
                  "price": {"id": "price_1PqPro", "object": "price", "unit_amount": 1900, "recurring": {"interval": "month"}},
                  "quantity": 1,
                  "subscription": "sub_1PqRs12eZvKYlo2CxYz01234"
                }],
                "has_more": false,
                "total_count": 1,
                "url": "/v1/subscription_items?subscription=sub_1PqRs12eZvKYlo2CxYz01234"
              },
              "livemode": false,
              "metadata": {},
              "plan": {"id": "price_1PqPro", "object": "plan"},
              "status": "active",
              "trial_end": null,
              "trial_start": null
            },
            "previous_attributes": {"cancel_at_period_end": false, "canceled_at": null}
          },
          "livemode": false,
          "pending_webhooks": 1,
          "request": {"id": "req_abc", "idempotency_key": null},
          "type": "customer.subscription.updated"
        })
    }

    /// The same event as sent with API version 2025-03-31.basil: the period moved to
    /// the items, and here the customer is expanded.
    fn subscription_updated_basil() -> Value {
        json!({
          "id": "evt_1RbAsil2eZvKYlo2CnEwShApE",
          "object": "event",
          "api_version": "2025-03-31.basil",
          "created": 1745000100,
          "data": {
            "object": {
              "id": "sub_1RbAsil2eZvKYlo2C0000001",
              "object": "subscription",
              "billing_cycle_anchor": 1745000000,
              "billing_mode": {"type": "classic"},
              "cancel_at": null,
              "cancel_at_period_end": false,
              "canceled_at": null,
              "created": 1745000000,
              "customer": {"id": "cus_RbAsilCust01", "object": "customer", "email": "a@example.com"},
              "ended_at": null,
              "items": {
                "object": "list",
                "data": [{
                  "id": "si_RbAsil0001",
                  "object": "subscription_item",
                  "current_period_end": 1747592000,
                  "current_period_start": 1745000000,
                  "price": {"id": "price_1RbPro", "object": "price", "unit_amount": 1900},
                  "quantity": 1
                }],
                "has_more": false
              },
              "livemode": true,
              "status": "trialing",
              "trial_end": 1746209600,
              "trial_start": 1745000000
            },
            "previous_attributes": {"status": "incomplete"}
          },
          "livemode": true,
          "type": "customer.subscription.updated"
        })
    }

    #[test]
    fn subscription_in_the_2024_shape() {
        let e = parse(subscription_updated_2024()).expect("parses");
        assert_eq!(e.id, "evt_1PqRsT2eZvKYlo2C0aBcDeFg");
        assert_eq!(e.event_type, SUBSCRIPTION_UPDATED);
        assert_eq!(e.created, 1718000100);
        assert!(!e.livemode);
        assert_eq!(
            e.object,
            EventObject::Subscription {
                id: "sub_1PqRs12eZvKYlo2CxYz01234".into(),
                customer: "cus_QhX3pLm9aZ0b1c".into(),
                status: "active".into(),
                price_id: Some("price_1PqPro".into()),
                current_period_end: Some(1720592000),
                current_period_start: Some(1718000000),
                cancel_at_period_end: true,
                trial_end: None,
                canceled_at: Some(1718000100),
                ended_at: None,
            }
        );
    }

    #[test]
    fn subscription_in_the_basil_shape_with_expanded_customer() {
        let e = parse(subscription_updated_basil()).expect("parses");
        assert!(e.livemode);
        assert_eq!(
            e.object,
            EventObject::Subscription {
                id: "sub_1RbAsil2eZvKYlo2C0000001".into(),
                customer: "cus_RbAsilCust01".into(),
                status: "trialing".into(),
                price_id: Some("price_1RbPro".into()),
                current_period_end: Some(1747592000),
                current_period_start: Some(1745000000),
                cancel_at_period_end: false,
                trial_end: Some(1746209600),
                canceled_at: None,
                ended_at: None,
            }
        );
    }

    #[test]
    fn cancel_at_counts_as_a_scheduled_cancel() {
        let mut v = subscription_updated_basil();
        v["data"]["object"]["cancel_at"] = json!(1747592000);
        let e = parse(v).expect("parses");
        let EventObject::Subscription {
            cancel_at_period_end,
            ..
        } = e.object
        else {
            panic!("not a subscription: {:?}", e.object);
        };
        assert!(cancel_at_period_end);
    }

    #[test]
    fn subscription_deleted_and_created_use_the_same_reader() {
        for ty in [SUBSCRIPTION_CREATED, SUBSCRIPTION_DELETED] {
            let mut v = subscription_updated_2024();
            v["type"] = json!(ty);
            v["data"]["object"]["status"] = json!("canceled");
            v["data"]["object"]["ended_at"] = json!(1718000200);
            let e = parse(v).expect("parses");
            assert_eq!(e.event_type, ty);
            let EventObject::Subscription {
                status, ended_at, ..
            } = e.object
            else {
                panic!("not a subscription");
            };
            assert_eq!(status, "canceled");
            assert_eq!(ended_at, Some(1718000200));
        }
    }

    /// invoice.paid, API version 2024-06-20: `subscription` on the invoice; the invoice's
    /// own period is the previous one, the line's period is the one being paid.
    fn invoice_paid_2024() -> Value {
        json!({
          "id": "evt_1PinvPaid2eZvKYlo2Cabcdef",
          "object": "event",
          "api_version": "2024-06-20",
          "created": 1720592100,
          "data": {"object": {
            "id": "in_1PinvQ2eZvKYlo2C00000001",
            "object": "invoice",
            "amount_due": 1900,
            "amount_paid": 1900,
            "billing_reason": "subscription_cycle",
            "created": 1720592000,
            "customer": "cus_QhX3pLm9aZ0b1c",
            "lines": {
              "object": "list",
              "data": [{
                "id": "il_1PinvLine0001",
                "object": "line_item",
                "amount": 1900,
                "period": {"end": 1723270400, "start": 1720592000},
                "price": {"id": "price_1PqPro"},
                "subscription": "sub_1PqRs12eZvKYlo2CxYz01234",
                "type": "subscription"
              }],
              "has_more": false
            },
            "paid": true,
            "period_end": 1720592000,
            "period_start": 1718000000,
            "status": "paid",
            "subscription": "sub_1PqRs12eZvKYlo2CxYz01234"
          }},
          "livemode": false,
          "type": "invoice.paid"
        })
    }

    /// invoice.payment_failed, API version 2025-03-31.basil: subscription under
    /// `parent.subscription_details`, line parent under `parent.subscription_item_details`.
    fn invoice_failed_basil() -> Value {
        json!({
          "id": "evt_1RinvFail2eZvKYlo2Cabcdef",
          "object": "event",
          "api_version": "2025-03-31.basil",
          "created": 1747595700,
          "data": {"object": {
            "id": "in_1RinvQ2eZvKYlo2C00000002",
            "object": "invoice",
            "amount_due": 1900,
            "amount_paid": 0,
            "attempt_count": 1,
            "billing_reason": "subscription_cycle",
            "created": 1747592000,
            "customer": {"id": "cus_RbAsilCust01", "object": "customer"},
            "lines": {
              "object": "list",
              "data": [{
                "id": "il_1RinvLine0002",
                "object": "line_item",
                "amount": 1900,
                "parent": {
                  "type": "subscription_item_details",
                  "subscription_item_details": {
                    "subscription": "sub_1RbAsil2eZvKYlo2C0000001",
                    "subscription_item": "si_RbAsil0001",
                    "proration": false
                  }
                },
                "period": {"end": 1750270400, "start": 1747592000},
                "pricing": {"price_details": {"price": "price_1RbPro", "product": "prod_X"}, "type": "price_details"}
              }],
              "has_more": false
            },
            "parent": {
              "type": "subscription_details",
              "subscription_details": {"metadata": {}, "subscription": "sub_1RbAsil2eZvKYlo2C0000001"},
              "quote_details": null
            },
            "period_end": 1747592000,
            "period_start": 1745000000,
            "status": "open"
          }},
          "livemode": true,
          "type": "invoice.payment_failed"
        })
    }

    #[test]
    fn invoice_in_the_2024_shape() {
        let e = parse(invoice_paid_2024()).expect("parses");
        assert_eq!(e.event_type, INVOICE_PAID);
        assert_eq!(
            e.object,
            EventObject::Invoice {
                id: "in_1PinvQ2eZvKYlo2C00000001".into(),
                customer: "cus_QhX3pLm9aZ0b1c".into(),
                subscription: Some("sub_1PqRs12eZvKYlo2CxYz01234".into()),
                period_start: Some(1720592000),
                period_end: Some(1723270400),
                billing_reason: Some("subscription_cycle".into()),
                created: Some(1720592000),
            }
        );
    }

    #[test]
    fn invoice_in_the_basil_shape() {
        let e = parse(invoice_failed_basil()).expect("parses");
        assert_eq!(e.event_type, INVOICE_PAYMENT_FAILED);
        assert_eq!(
            e.object,
            EventObject::Invoice {
                id: "in_1RinvQ2eZvKYlo2C00000002".into(),
                customer: "cus_RbAsilCust01".into(),
                subscription: Some("sub_1RbAsil2eZvKYlo2C0000001".into()),
                period_start: Some(1747592000),
                period_end: Some(1750270400),
                billing_reason: Some("subscription_cycle".into()),
                created: Some(1747592000),
            }
        );
    }

    #[test]
    fn invoice_fallbacks() {
        // No lines at all: the invoice-level period is all there is.
        let mut v = invoice_paid_2024();
        v["data"]["object"]
            .as_object_mut()
            .expect("object")
            .remove("lines");
        let e = parse(v).expect("parses");
        let EventObject::Invoice {
            period_end,
            period_start,
            ..
        } = e.object
        else {
            panic!("not an invoice");
        };
        assert_eq!(
            (period_start, period_end),
            (Some(1718000000), Some(1720592000))
        );

        // Only the line names the subscription (new shape), and it may be expanded.
        let mut v = invoice_failed_basil();
        v["data"]["object"]["parent"] = Value::Null;
        v["data"]["object"]["lines"]["data"][0]["parent"]["subscription_item_details"]["subscription"] =
            json!({"id": "sub_fromline", "object": "subscription"});
        let e = parse(v).expect("parses");
        let EventObject::Invoice { subscription, .. } = e.object else {
            panic!("not an invoice");
        };
        assert_eq!(subscription.as_deref(), Some("sub_fromline"));

        // A one-off invoice has no subscription anywhere.
        let mut v = invoice_failed_basil();
        v["data"]["object"]["parent"] = Value::Null;
        v["data"]["object"]["lines"]["data"][0]["parent"] = Value::Null;
        let e = parse(v).expect("parses");
        let EventObject::Invoice { subscription, .. } = e.object else {
            panic!("not an invoice");
        };
        assert_eq!(subscription, None);
    }

    #[test]
    fn checkout_completed() {
        let v = json!({
          "id": "evt_1Pchk2eZvKYlo2Cabcdef",
          "object": "event",
          "api_version": "2025-03-31.basil",
          "created": 1745000005,
          "data": {"object": {
            "id": "cs_test_a1B2c3D4e5",
            "object": "checkout.session",
            "client_reference_id": "usr_01JABCDEF",
            "customer": "cus_RbAsilCust01",
            "customer_details": {"email": "a@example.com"},
            "mode": "subscription",
            "payment_status": "paid",
            "status": "complete",
            "subscription": {"id": "sub_1RbAsil2eZvKYlo2C0000001", "object": "subscription"}
          }},
          "livemode": false,
          "type": "checkout.session.completed"
        });
        let e = parse(v).expect("parses");
        assert_eq!(
            e.object,
            EventObject::CheckoutCompleted {
                session_id: "cs_test_a1B2c3D4e5".into(),
                customer: Some("cus_RbAsilCust01".into()),
                client_reference_id: Some("usr_01JABCDEF".into()),
                subscription: Some("sub_1RbAsil2eZvKYlo2C0000001".into()),
                mode: Some("subscription".into()),
            }
        );
    }

    #[test]
    fn other_types_are_not_read() {
        // Even with a data.object the engine could not use.
        let v =
            json!({"id": "evt_x", "type": "charge.refunded", "created": 1, "data": {"object": 7}});
        assert_eq!(parse(v).expect("parses").object, EventObject::Other);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let cases: Vec<(&str, Value)> = vec![
            ("not an object", json!([1, 2])),
            ("no id", json!({"type": "invoice.paid", "created": 1})),
            (
                "created as string",
                json!({"id": "evt", "type": "x", "created": "1"}),
            ),
            (
                "no data",
                json!({"id": "evt", "type": "invoice.paid", "created": 1}),
            ),
            (
                "object is a string",
                json!({"id": "evt", "type": "invoice.paid", "created": 1, "data": {"object": "in_1"}}),
            ),
            ("subscription without status", {
                let mut v = subscription_updated_2024();
                v["data"]["object"]
                    .as_object_mut()
                    .expect("object")
                    .remove("status");
                v
            }),
            ("period as string", {
                let mut v = subscription_updated_2024();
                v["data"]["object"]["current_period_end"] = json!("soon");
                v
            }),
            ("items not a list", {
                let mut v = subscription_updated_basil();
                v["data"]["object"]["items"] = json!([1]);
                v
            }),
            ("customer a number", {
                let mut v = invoice_paid_2024();
                v["data"]["object"]["customer"] = json!(42);
                v
            }),
            ("expanded customer without id", {
                let mut v = invoice_paid_2024();
                v["data"]["object"]["customer"] = json!({"object": "customer"});
                v
            }),
            ("line period end as float", {
                let mut v = invoice_paid_2024();
                v["data"]["object"]["lines"]["data"][0]["period"]["end"] = json!(1.5);
                v
            }),
            ("cancel_at_period_end as string", {
                let mut v = subscription_updated_2024();
                v["data"]["object"]["cancel_at_period_end"] = json!("yes");
                v
            }),
        ];
        for (name, v) in cases {
            assert!(parse(v).is_err(), "case {name} should fail");
        }
        assert!(StripeEvent::parse(b"{not json").is_err());
    }

    proptest! {
        /// Whatever bytes arrive after a valid signature, reading never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = StripeEvent::parse(&bytes);
        }

        /// Mutating any field of a real payload to any JSON scalar never panics.
        #[test]
        fn mutated_payloads_never_panic(
            which in 0usize..3,
            path in proptest::collection::vec(0usize..40, 1..4),
            replacement in prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                "[a-z_]{0,8}".prop_map(Value::from),
                Just(json!([])),
                Just(json!({})),
            ],
        ) {
            let mut v = match which {
                0 => subscription_updated_2024(),
                1 => subscription_updated_basil(),
                _ => invoice_failed_basil(),
            };
            set_nth_leaf(&mut v, &path, replacement);
            let _ = StripeEvent::from_value(&v);
        }
    }

    /// Walks into `v` choosing children by index (modulo their count) and replaces the node
    /// reached.
    fn set_nth_leaf(v: &mut Value, path: &[usize], replacement: Value) {
        let child = match (v, path.split_first()) {
            (Value::Object(map), Some((i, _))) if !map.is_empty() => {
                let n = i % map.len();
                map.values_mut().nth(n)
            }
            (Value::Array(items), Some((i, _))) if !items.is_empty() => {
                let n = i % items.len();
                items.get_mut(n)
            }
            (node, _) => {
                *node = replacement;
                return;
            }
        };
        if let Some(child) = child {
            set_nth_leaf(child, &path[1..], replacement);
        }
    }
}
