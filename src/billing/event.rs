//! Lenient reading of a verified Stripe event into only what the billing engine needs.
//!
//! Owns: the envelope (`id`, `type`, `created`, `livemode`) and the few fields of
//! `data.object` for the event types the engine acts on, in every API-version shape we
//! know (Stripe moved `current_period_*` to subscription items and the invoice's
//! subscription to `parent.subscription_details` in 2025). Unknown fields are ignored;
//! an event of an acted-on type with an unexpected shape is an [`EventParseError`], never
//! a panic. It must not verify signatures (see `signature`) or decide anything.
//!
//! The body is read once, without building a JSON tree: each object is scanned for the
//! few members asked for, which are kept as raw JSON slices of the body
//! ([`RawValue`]); everything else is skipped without allocating. Only the values the
//! engine keeps are decoded into `String`s. A member missing, `null`, or inside something
//! that is not an object reads as absent, exactly as `serde_json::Value::get` would.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

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

/// The longest `id` or `type` a delivery may have to be recorded at all (the columns
/// are TEXT, but an unbounded key would be a way to bloat the table and the index).
pub const MAX_ENVELOPE_FIELD: usize = 255;

/// What every recorded delivery has, even one whose object cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub event_type: String,
    /// Stripe's `created`, or 0 when it is missing or not an integer.
    pub created: i64,
}

/// A webhook body read once: either the whole event, or only its envelope when the
/// rest has an unexpected shape (recorded as `failed`; redelivering cannot fix it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Event(StripeEvent),
    Unreadable {
        envelope: Envelope,
        error: EventParseError,
    },
}

/// Why a body is not a Stripe event at all: answered 400 and not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAnEvent {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("not a Stripe event: id and type are required")]
    NoIdOrType,
}

/// The top-level members read from every event.
const TOP: [&str; 5] = ["id", "type", "created", "livemode", "data"];

impl StripeEvent {
    /// Reads a raw (already verified) webhook body.
    pub fn parse(body: &[u8]) -> Result<StripeEvent, EventParseError> {
        let text = std::str::from_utf8(body)
            .map_err(|e| EventParseError::new(format!("not JSON: {e}")))?;
        StripeEvent::parse_str(text)
    }

    /// Reads a raw (already verified) webhook body that is known to be UTF-8.
    pub fn parse_str(body: &str) -> Result<StripeEvent, EventParseError> {
        let top = read_object(body, &TOP)
            .map_err(|e| EventParseError::new(format!("not JSON: {e}")))?
            .ok_or_else(|| EventParseError::new("event is not a JSON object"))?;
        let id = req_str(top.get("id"), "id")?;
        let event_type = req_str(top.get("type"), "type")?;
        let (created, livemode, object) = read_rest(&top, &event_type)?;
        Ok(StripeEvent {
            id,
            event_type,
            created,
            livemode,
            object,
        })
    }

    /// Reads a webhook delivery in one pass: the envelope the pipeline needs to record
    /// anything (`id` and `type`: non-empty strings of at most [`MAX_ENVELOPE_FIELD`]
    /// bytes), and the event if the rest has a readable shape.
    pub fn read_delivery(body: &str) -> Result<Delivery, NotAnEvent> {
        let top = read_object(body, &TOP)
            .map_err(|e| NotAnEvent::NotJson(e.to_string()))?
            .ok_or(NotAnEvent::NoIdOrType)?;
        let envelope_str = |key: &str| {
            opt_str(top.get(key), key)
                .ok()
                .flatten()
                .filter(|s| !s.is_empty() && s.len() <= MAX_ENVELOPE_FIELD)
        };
        let (Some(id), Some(event_type)) = (envelope_str("id"), envelope_str("type")) else {
            return Err(NotAnEvent::NoIdOrType);
        };
        Ok(match read_rest(&top, &event_type) {
            Ok((created, livemode, object)) => Delivery::Event(StripeEvent {
                id,
                event_type,
                created,
                livemode,
                object,
            }),
            Err(error) => Delivery::Unreadable {
                envelope: Envelope {
                    created: opt_i64(top.get("created"), "created")
                        .ok()
                        .flatten()
                        .unwrap_or(0),
                    id,
                    event_type,
                },
                error,
            },
        })
    }

    /// Reads an event already decoded to JSON (tests build events as `Value`s).
    #[cfg(test)]
    pub fn from_value(value: &serde_json::Value) -> Result<StripeEvent, EventParseError> {
        StripeEvent::parse_str(&value.to_string())
    }
}

/// Everything but `id` and `type`, which the callers read (and keep) themselves.
fn read_rest(
    top: &Obj<'_, 5>,
    event_type: &str,
) -> Result<(i64, bool, EventObject), EventParseError> {
    let created = req_i64(top.get("created"), "created")?;
    let livemode = opt_bool(top.get("livemode"), "livemode")?.unwrap_or(false);
    let object = match event_type {
        CHECKOUT_COMPLETED => checkout(data_object(top)?)?,
        SUBSCRIPTION_CREATED | SUBSCRIPTION_UPDATED | SUBSCRIPTION_DELETED => {
            subscription(data_object(top)?)?
        }
        INVOICE_PAID | INVOICE_PAYMENT_FAILED => invoice(data_object(top)?)?,
        // Only the types above are read, so an odd payload of any other type cannot
        // fail an event the engine would ignore anyway.
        _ => EventObject::Other,
    };
    Ok((created, livemode, object))
}

fn data_object<'a>(top: &Obj<'a, 5>) -> Result<&'a RawValue, EventParseError> {
    let object = fields(top.get("data"), &["object"])?
        .get("object")
        .ok_or_else(|| EventParseError::new("missing data.object"))?;
    if kind(object) == Kind::Object {
        Ok(object)
    } else {
        Err(EventParseError::new("data.object is not an object"))
    }
}

const CHECKOUT_KEYS: [&str; 5] = [
    "id",
    "customer",
    "client_reference_id",
    "subscription",
    "mode",
];

fn checkout(raw: &RawValue) -> Result<EventObject, EventParseError> {
    let o = fields(Some(raw), &CHECKOUT_KEYS)?;
    Ok(EventObject::CheckoutCompleted {
        session_id: req_str(o.get("id"), "id")?,
        customer: opt_id(o.get("customer"), "customer")?,
        client_reference_id: opt_str(o.get("client_reference_id"), "client_reference_id")?,
        subscription: opt_id(o.get("subscription"), "subscription")?,
        mode: opt_str(o.get("mode"), "mode")?,
    })
}

const SUBSCRIPTION_KEYS: [&str; 12] = [
    "id",
    "customer",
    "status",
    "items",
    "plan",
    "current_period_end",
    "current_period_start",
    "cancel_at_period_end",
    "cancel_at",
    "trial_end",
    "canceled_at",
    "ended_at",
];
const ITEM_KEYS: [&str; 3] = ["current_period_end", "current_period_start", "price"];

fn subscription(raw: &RawValue) -> Result<EventObject, EventParseError> {
    let o = fields(Some(raw), &SUBSCRIPTION_KEYS)?;
    // Absent when there is no first item: every lookup in it then reads as absent.
    let item = fields(first_of_list(o.get("items"), "items")?, &ITEM_KEYS)?;
    // Before 2025-03-31 the period lives on the subscription, since then on each item.
    let current_period_end = match opt_i64(o.get("current_period_end"), "current_period_end")? {
        Some(v) => Some(v),
        None => opt_i64(item.get("current_period_end"), "current_period_end")?,
    };
    let current_period_start = match opt_i64(o.get("current_period_start"), "current_period_start")?
    {
        Some(v) => Some(v),
        None => opt_i64(item.get("current_period_start"), "current_period_start")?,
    };
    let price_id = match opt_id(item.get("price"), "price")? {
        Some(price) => Some(price),
        // Very old API versions carry a `plan` instead of `items[].price`.
        None => opt_id(o.get("plan"), "plan")?,
    };
    let cancel_at_period_end = opt_bool(o.get("cancel_at_period_end"), "cancel_at_period_end")?
        .unwrap_or(false)
        || opt_i64(o.get("cancel_at"), "cancel_at")?.is_some();
    Ok(EventObject::Subscription {
        id: req_str(o.get("id"), "id")?,
        customer: opt_id(o.get("customer"), "customer")?
            .ok_or_else(|| EventParseError::new("subscription without customer"))?,
        status: req_str(o.get("status"), "status")?,
        price_id,
        current_period_end,
        current_period_start,
        cancel_at_period_end,
        trial_end: opt_i64(o.get("trial_end"), "trial_end")?,
        canceled_at: opt_i64(o.get("canceled_at"), "canceled_at")?,
        ended_at: opt_i64(o.get("ended_at"), "ended_at")?,
    })
}

const INVOICE_KEYS: [&str; 9] = [
    "id",
    "customer",
    "subscription",
    "parent",
    "lines",
    "period_end",
    "period_start",
    "billing_reason",
    "created",
];
const LINE_KEYS: [&str; 3] = ["period", "subscription", "parent"];

fn invoice(raw: &RawValue) -> Result<EventObject, EventParseError> {
    let o = fields(Some(raw), &INVOICE_KEYS)?;
    let line = fields(first_of_list(o.get("lines"), "lines")?, &LINE_KEYS)?;
    let period = fields(line.get("period"), &["start", "end"])?;
    let period_end = match opt_i64(period.get("end"), "end")? {
        Some(v) => Some(v),
        None => opt_i64(o.get("period_end"), "period_end")?,
    };
    let period_start = match opt_i64(period.get("start"), "start")? {
        Some(v) => Some(v),
        None => opt_i64(o.get("period_start"), "period_start")?,
    };
    Ok(EventObject::Invoice {
        id: req_str(o.get("id"), "id")?,
        customer: opt_id(o.get("customer"), "customer")?
            .ok_or_else(|| EventParseError::new("invoice without customer"))?,
        subscription: invoice_subscription(&o, &line)?,
        period_start,
        period_end,
        billing_reason: opt_str(o.get("billing_reason"), "billing_reason")?,
        created: opt_i64(o.get("created"), "created")?,
    })
}

/// The invoice's subscription, wherever this API version put it.
fn invoice_subscription(
    o: &Obj<'_, 9>,
    line: &Obj<'_, 3>,
) -> Result<Option<String>, EventParseError> {
    // Before 2025-03-31.
    if let Some(id) = opt_id(o.get("subscription"), "subscription")? {
        return Ok(Some(id));
    }
    // Since 2025-03-31 ("basil").
    let details = fields(o.get("parent"), &["subscription_details"])?.get("subscription_details");
    if let Some(id) = opt_id(
        fields(details, &["subscription"])?.get("subscription"),
        "subscription",
    )? {
        return Ok(Some(id));
    }
    // Last resort: the line items name it too (old `subscription`, new
    // `parent.subscription_item_details.subscription`).
    if let Some(id) = opt_id(line.get("subscription"), "subscription")? {
        return Ok(Some(id));
    }
    let details = fields(line.get("parent"), &["subscription_item_details"])?
        .get("subscription_item_details");
    opt_id(
        fields(details, &["subscription"])?.get("subscription"),
        "subscription",
    )
}

/// The first element of a Stripe list object (`{"object":"list","data":[...]}`).
fn first_of_list<'a>(
    list: Option<&'a RawValue>,
    key: &str,
) -> Result<Option<&'a RawValue>, EventParseError> {
    let Some(list) = present(list) else {
        return Ok(None);
    };
    let data = fields(Some(list), &["data"])?
        .get("data")
        .filter(|d| kind(d) == Kind::Array)
        .ok_or_else(|| EventParseError::new(format!("{key} is not a list object")))?;
    let first = visit(data.get(), FirstElement)
        .map_err(|e| EventParseError::new(format!("{key}.data: {e}")))?;
    match first {
        Some(first) if kind(first) == Kind::Object => Ok(Some(first)),
        Some(_) => Err(EventParseError::new(format!(
            "{key}.data[0] is not an object"
        ))),
        None => Ok(None),
    }
}

fn req_str(v: Option<&RawValue>, key: &str) -> Result<String, EventParseError> {
    opt_str(v, key)?.ok_or_else(|| EventParseError::new(format!("missing {key}")))
}

fn req_i64(v: Option<&RawValue>, key: &str) -> Result<i64, EventParseError> {
    opt_i64(v, key)?.ok_or_else(|| EventParseError::new(format!("missing {key}")))
}

fn opt_str(v: Option<&RawValue>, key: &str) -> Result<Option<String>, EventParseError> {
    match present(v) {
        None => Ok(None),
        Some(raw) if kind(raw) == Kind::String => decode_string(raw, key).map(Some),
        Some(_) => Err(EventParseError::new(format!("{key} is not a string"))),
    }
}

fn opt_i64(v: Option<&RawValue>, key: &str) -> Result<Option<i64>, EventParseError> {
    match present(v) {
        None => Ok(None),
        // Floats, exponents and integers outside i64 fail here, as `Value::as_i64` would.
        Some(raw) => serde_json::from_str::<i64>(raw.get())
            .map(Some)
            .map_err(|_| EventParseError::new(format!("{key} is not an integer"))),
    }
}

fn opt_bool(v: Option<&RawValue>, key: &str) -> Result<Option<bool>, EventParseError> {
    match present(v).map(RawValue::get) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(EventParseError::new(format!("{key} is not a boolean"))),
    }
}

/// An id that Stripe sends either as a string or, when expanded, as an object with `id`.
fn opt_id(v: Option<&RawValue>, key: &str) -> Result<Option<String>, EventParseError> {
    let Some(raw) = present(v) else {
        return Ok(None);
    };
    match kind(raw) {
        Kind::String => decode_string(raw, key).map(Some),
        Kind::Object => match fields(Some(raw), &["id"])?.get("id") {
            Some(id) if kind(id) == Kind::String => decode_string(id, key).map(Some),
            _ => Err(EventParseError::new(format!(
                "expanded {key} has no string id"
            ))),
        },
        _ => Err(EventParseError::new(format!(
            "{key} is neither an id nor an object"
        ))),
    }
}

fn decode_string(raw: &RawValue, key: &str) -> Result<String, EventParseError> {
    serde_json::from_str(raw.get()).map_err(|e| EventParseError::new(format!("{key}: {e}")))
}

// ---- reading members without a JSON tree ----

/// The JSON type of a raw value, from its first byte (a `RawValue` never starts with
/// whitespace: serde_json skips it before capturing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

fn kind(raw: &RawValue) -> Kind {
    match raw.get().as_bytes().first() {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        Some(b't' | b'f') => Kind::Bool,
        Some(b'n') => Kind::Null,
        _ => Kind::Number,
    }
}

/// `None` for a missing member and for an explicit `null`.
fn present(v: Option<&RawValue>) -> Option<&RawValue> {
    v.filter(|raw| kind(raw) != Kind::Null)
}

/// The members named in `keys` of one JSON object, borrowed from the body.
struct Obj<'a, const N: usize> {
    keys: &'static [&'static str; N],
    values: [Option<&'a RawValue>; N],
}

impl<'a, const N: usize> Obj<'a, N> {
    /// The member `key` (one of the keys this object was read for), `null` included.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        let index = self.keys.iter().position(|k| *k == key);
        debug_assert!(index.is_some(), "{key} was not among the keys read");
        index.and_then(|i| self.values[i])
    }
}

/// Reads the members `keys` of `json`; `Ok(None)` if it is valid JSON but not an object.
fn read_object<'a, const N: usize>(
    json: &'a str,
    keys: &'static [&'static str; N],
) -> Result<Option<Obj<'a, N>>, serde_json::Error> {
    Ok(visit(json, ObjectVisitor { keys })?.map(|values| Obj { keys, values }))
}

/// Like [`read_object`] on a member: absent, `null` or not an object gives an `Obj` where
/// every key is absent, which is what chained `Value::get` calls would see.
fn fields<'a, const N: usize>(
    v: Option<&'a RawValue>,
    keys: &'static [&'static str; N],
) -> Result<Obj<'a, N>, EventParseError> {
    let empty = Obj {
        keys,
        values: [None; N],
    };
    match v {
        Some(raw) if kind(raw) == Kind::Object => Ok(read_object(raw.get(), keys)
            .map_err(|e| EventParseError::new(format!("unreadable object: {e}")))?
            .unwrap_or(empty)),
        _ => Ok(empty),
    }
}

/// Runs `visitor` over the whole of `json` (trailing characters are an error).
fn visit<'a, V: Visitor<'a>>(json: &'a str, visitor: V) -> Result<V::Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value = de::Deserializer::deserialize_any(&mut de, visitor)?;
    de.end()?;
    Ok(value)
}

/// Captures the members named in `keys` (the last one wins if a key repeats, as in a
/// `serde_json::Map`) and skips the rest; any other JSON value reads as `None`.
struct ObjectVisitor<const N: usize> {
    keys: &'static [&'static str; N],
}

impl<'de, const N: usize> Visitor<'de> for ObjectVisitor<N> {
    type Value = Option<[Option<&'de RawValue>; N]>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = [None; N];
        while let Some(slot) = map.next_key_seed(KeyIndex { keys: self.keys })? {
            match slot {
                Some(i) => values[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(values))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// A member name as the index of `keys` it matches, without allocating (escaped names
/// arrive decoded in serde_json's scratch buffer).
struct KeyIndex<const N: usize> {
    keys: &'static [&'static str; N],
}

impl<'de, const N: usize> DeserializeSeed<'de> for KeyIndex<N> {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for KeyIndex<N> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.keys.iter().position(|k| *k == name))
    }
}

/// The first element of a JSON array as raw JSON; the rest is skipped.
struct FirstElement;

impl<'de> Visitor<'de> for FirstElement {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let first = seq.next_element::<&'de RawValue>()?;
        if first.is_some() {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

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
