//! The pure subscription state engine: one user's [`BillingState`] + one verified Stripe
//! event → a [`Decision`], and the entitlement a state gives at a moment.
//!
//! Owns the rules of ARCHITECTURE.md "Billing": which event changes what, out-of-order
//! and duplicate delivery, grace after a failed payment, and that a deleted subscription
//! is never resurrected. It must not do I/O, read the clock or know about HTTP: storage
//! and the webhook pipeline call it inside their transaction.
//!
//! # Why the order of delivery does not matter
//!
//! Stripe does not deliver events in order and retries for days, so the state after a
//! set of events must not depend on the order they arrived in. Every event has a key
//! `(created, rank, id)` (see [`rank`]); the state is a handful of registers, each merged
//! with an order-independent rule:
//!
//! - `status` and `grace_until` are last-writer-wins by key over all events: they are
//!   exactly what the event with the greatest key implies (`last_event_*`).
//! - `plan`, `cancel_at_period_end`, `trial_end` are last-writer-wins by key over the
//!   subscription snapshots only (`snapshot_*`), because invoice events do not carry
//!   them: an older snapshot that arrives after a newer invoice still supplies them.
//! - `current_period_end` is the maximum of every period end seen (snapshots and paid
//!   invoices), so a late renewal can never shorten access and an early one is kept.
//! - Grace is anchored on the start of the unpaid period (the failed invoice's line
//!   period, which equals the subscription's `current_period_start`), not on the time we
//!   happen to process the event: retries of the same invoice therefore never extend
//!   it, a replay gives the same answer, and the value does not depend on arrival order.
//! - `customer.subscription.deleted` is terminal: it sets the state from the deletion
//!   snapshot alone, and every later-arriving event of that subscription is stale.
//!
//! Max and last-writer-wins with a total order on keys are commutative, associative and
//! idempotent, so any permutation (and any re-delivery) of the same events ends in the
//! same state. The only input the result depends on besides the events is
//! `EngineCtx::grace_secs` and the price→plan mapping.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::event::{
    CHECKOUT_COMPLETED, EventObject, INVOICE_PAID, INVOICE_PAYMENT_FAILED, SUBSCRIPTION_CREATED,
    SUBSCRIPTION_DELETED, SUBSCRIPTION_UPDATED, StripeEvent,
};

pub use crate::storage::states::SubStatus;

/// Stripe's side of [`SubStatus`].
impl SubStatus {
    /// Maps a Stripe subscription status; `None` for a status Stripe may add later.
    pub fn from_stripe(status: &str) -> Option<SubStatus> {
        Some(match status {
            "active" => SubStatus::Active,
            "trialing" => SubStatus::Trialing,
            "past_due" => SubStatus::PastDue,
            // `incomplete`: created, first payment pending (≤ 23 h). Nothing paid yet, so
            // no access, but nothing has expired either.
            "incomplete" => SubStatus::Free,
            // All retries failed (`unpaid`), the first payment never came
            // (`incomplete_expired`), or a trial ended without a payment method (`paused`):
            // the subscription exists but grants nothing.
            "unpaid" | "incomplete_expired" | "paused" => SubStatus::Expired,
            "canceled" => SubStatus::Canceled,
            _ => return None,
        })
    }
}

/// Tie-break of events created in the same second (Stripe's `created` has 1 s
/// resolution and one API call often emits several events at once).
///
/// Within one second, a later rank is treated as the later event:
/// - `created` < `updated`: Stripe creates before it updates.
/// - `updated` < invoice outcomes: the subscription snapshot sent with a payment is the
///   state *before* the payment settled (checkout: `created`/`updated` `incomplete`, then
///   `invoice.paid`), and where both agree the order is immaterial.
/// - `payment_failed` < `paid`: a failure cannot follow a success of the same invoice,
///   but a successful retry follows a failure.
/// - `deleted` is last: nothing follows the end of a subscription.
///
/// Equal `(created, rank)` fall back to the event id, which is arbitrary but total, so
/// even two `updated` in the same second resolve the same way in every order.
pub mod rank {
    /// No event applied yet.
    pub const NONE: i32 = 0;
    pub const CREATED: i32 = 1;
    pub const UPDATED: i32 = 2;
    pub const PAYMENT_FAILED: i32 = 3;
    pub const PAID: i32 = 4;
    pub const DELETED: i32 = 5;
}

/// The rank of an event type the engine applies; `None` for every other type.
pub fn event_rank(event_type: &str) -> Option<i32> {
    Some(match event_type {
        SUBSCRIPTION_CREATED => rank::CREATED,
        SUBSCRIPTION_UPDATED => rank::UPDATED,
        INVOICE_PAYMENT_FAILED => rank::PAYMENT_FAILED,
        INVOICE_PAID => rank::PAID,
        SUBSCRIPTION_DELETED => rank::DELETED,
        _ => return None,
    })
}

/// One user's billing state, as stored. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillingState {
    pub customer_id: Option<String>,
    /// The subscription this state follows; a different id starts over (see [`apply`]).
    pub subscription_id: Option<String>,
    /// Plan id from config (`free` until a subscription snapshot names a price).
    pub plan: String,
    pub status: SubStatus,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub trial_end: Option<i64>,
    pub grace_until: Option<i64>,
    /// Key of the newest event applied (any type): decides `status` and `grace_until`.
    pub last_event_created: Option<i64>,
    pub last_event_rank: i32,
    pub last_event_id: Option<String>,
    /// Key of the newest subscription snapshot applied: decides `plan`,
    /// `cancel_at_period_end` and `trial_end`.
    pub snapshot_created: Option<i64>,
    pub snapshot_rank: i32,
    pub snapshot_event_id: Option<String>,
    /// `customer.subscription.deleted` was applied: terminal for this subscription.
    pub deleted: bool,
}

impl Default for BillingState {
    fn default() -> Self {
        BillingState {
            customer_id: None,
            subscription_id: None,
            plan: FREE_PLAN.to_owned(),
            status: SubStatus::Free,
            current_period_end: None,
            cancel_at_period_end: false,
            trial_end: None,
            grace_until: None,
            last_event_created: None,
            last_event_rank: rank::NONE,
            last_event_id: None,
            snapshot_created: None,
            snapshot_rank: rank::NONE,
            snapshot_event_id: None,
            deleted: false,
        }
    }
}

/// The plan of everyone without access.
pub const FREE_PLAN: &str = "free";

/// What [`apply`] needs besides the state and the event.
pub struct EngineCtx<'a> {
    /// Processing time. The merge deliberately does not depend on it (a replay or a
    /// reordering must give the same state); it is here for callers that log or
    /// compare decisions against the moment of processing.
    pub now: i64,
    /// `billing.grace_days` in seconds.
    pub grace_secs: i64,
    /// The configured plan id for a Stripe price id.
    pub plan_for_price: &'a dyn Fn(&str) -> Option<String>,
}

/// What to do with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this state (record the event as `applied`).
    Apply(BillingState),
    /// Superseded by what is already applied: record as `stale`, change nothing.
    Stale(String),
    /// Not a state change for this engine: record as `ignored`, change nothing.
    Ignored(String),
}

/// Merges one event into `state`. See the module docs for why the result does not depend
/// on the order events arrive in.
pub fn apply(state: &BillingState, event: &StripeEvent, ctx: &EngineCtx<'_>) -> Decision {
    if event.event_type == CHECKOUT_COMPLETED {
        return Decision::Ignored(
            "checkout.session.completed links customer and user (link_from_checkout)".into(),
        );
    }
    let Some(rank) = event_rank(&event.event_type) else {
        return Decision::Ignored(format!(
            "{} does not change a subscription",
            event.event_type
        ));
    };
    let fact = match Fact::read(event, rank, ctx) {
        Ok(fact) => fact,
        Err(reason) => return Decision::Ignored(reason),
    };
    let key = EventKey {
        created: event.created,
        rank,
        id: &event.id,
    };

    let base = match which_subscription(state, &fact, &key) {
        Ok(Base::Current) => state.clone(),
        Ok(Base::Fresh) => BillingState::default(),
        Err(Skip::Stale(reason)) => return Decision::Stale(reason),
        Err(Skip::Ignored(reason)) => return Decision::Ignored(reason),
    };
    let next = merge(base, &fact, &key);
    if next == *state {
        let reason = if state.last_key().is_some_and(|last| last == key) {
            "already applied".to_owned()
        } else {
            format!(
                "older than the last applied event ({} at {})",
                state.last_event_id.as_deref().unwrap_or("?"),
                state.last_event_created.unwrap_or_default()
            )
        };
        return Decision::Stale(reason);
    }
    Decision::Apply(next)
}

/// The customer ↔ user link a completed Checkout Session establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutLink {
    /// `client_reference_id`: the warpbase user id we put on the session.
    pub user_id: String,
    pub customer_id: String,
    pub subscription_id: Option<String>,
}

/// The link from a `checkout.session.completed` event; `None` for any other event or a
/// session we did not create (no `client_reference_id`) or without a customer.
pub fn link_from_checkout(event: &StripeEvent) -> Option<CheckoutLink> {
    match &event.object {
        EventObject::CheckoutCompleted {
            customer: Some(customer),
            client_reference_id: Some(user),
            subscription,
            ..
        } if event.event_type == CHECKOUT_COMPLETED => Some(CheckoutLink {
            user_id: user.clone(),
            customer_id: customer.clone(),
            subscription_id: subscription.clone(),
        }),
        _ => None,
    }
}

/// The plan a user may use at `now`, and the status to report.
///
/// Computed at access time rather than stored, so access is right even when the webhook
/// that would have changed it is late or lost.
pub fn entitlement_at(state: &BillingState, now: i64) -> (String, SubStatus) {
    let paid = |status| (state.plan.clone(), status);
    let none = |status| (FREE_PLAN.to_owned(), status);
    match state.status {
        SubStatus::Free => none(SubStatus::Free),
        SubStatus::Canceled => none(SubStatus::Canceled),
        SubStatus::Expired => none(SubStatus::Expired),
        status @ (SubStatus::Active | SubStatus::Trialing) => {
            // A scheduled cancel (`cancel_at_period_end`) changes nothing here: access
            // lasts until the period end either way.
            let end = state.current_period_end.or(match status {
                SubStatus::Trialing => state.trial_end,
                _ => None,
            });
            match end {
                Some(end) if now < end => paid(status),
                _ => none(SubStatus::Expired),
            }
        }
        SubStatus::PastDue => match state.grace_until {
            Some(until) if now < until => paid(SubStatus::PastDue),
            _ => none(SubStatus::Expired),
        },
    }
}

/// Total order of events: `(created, rank, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EventKey<'a> {
    created: i64,
    rank: i32,
    id: &'a str,
}

impl PartialOrd for EventKey<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for EventKey<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.created, self.rank, self.id).cmp(&(other.created, other.rank, other.id))
    }
}

impl BillingState {
    fn last_key(&self) -> Option<EventKey<'_>> {
        self.last_event_created.map(|created| EventKey {
            created,
            rank: self.last_event_rank,
            id: self.last_event_id.as_deref().unwrap_or(""),
        })
    }

    fn snapshot_key(&self) -> Option<EventKey<'_>> {
        self.snapshot_created.map(|created| EventKey {
            created,
            rank: self.snapshot_rank,
            id: self.snapshot_event_id.as_deref().unwrap_or(""),
        })
    }

    fn set_last_key(&mut self, key: &EventKey<'_>) {
        self.last_event_created = Some(key.created);
        self.last_event_rank = key.rank;
        self.last_event_id = Some(key.id.to_owned());
    }

    fn set_snapshot_key(&mut self, key: &EventKey<'_>) {
        self.snapshot_created = Some(key.created);
        self.snapshot_rank = key.rank;
        self.snapshot_event_id = Some(key.id.to_owned());
    }
}

/// What one event says, already mapped to warpbase terms.
struct Fact {
    subscription_id: String,
    customer_id: String,
    kind: FactKind,
}

enum FactKind {
    /// `customer.subscription.created|updated`.
    Snapshot(Snapshot),
    /// `customer.subscription.deleted`, with the final snapshot.
    Deleted(Snapshot),
    Paid {
        period_end: Option<i64>,
    },
    /// `grace_until` is `None` when the failure grants no grace (first invoice).
    PaymentFailed {
        status: SubStatus,
        grace_until: Option<i64>,
    },
}

struct Snapshot {
    /// `free` for a deletion whose price is not (or no longer) a configured plan.
    plan: String,
    status: SubStatus,
    grace_until: Option<i64>,
    current_period_end: Option<i64>,
    cancel_at_period_end: bool,
    trial_end: Option<i64>,
}

impl Fact {
    /// Reads the event; `Err` is the reason it is ignored.
    fn read(event: &StripeEvent, rank: i32, ctx: &EngineCtx<'_>) -> Result<Fact, String> {
        match &event.object {
            EventObject::Subscription {
                id,
                customer,
                status,
                price_id,
                current_period_end,
                current_period_start,
                cancel_at_period_end,
                trial_end,
                ..
            } => {
                let deleted = rank == rank::DELETED;
                let plan = match price_id.as_deref().and_then(|p| (ctx.plan_for_price)(p)) {
                    Some(plan) => plan,
                    // The plan of a deleted subscription no longer grants anything.
                    None if deleted => FREE_PLAN.to_owned(),
                    None => {
                        return Err(format!(
                            "price {} is not a configured plan",
                            price_id.as_deref().unwrap_or("(none)")
                        ));
                    }
                };
                let status = if deleted {
                    SubStatus::Canceled
                } else {
                    SubStatus::from_stripe(status)
                        .ok_or_else(|| format!("unknown Stripe subscription status {status:?}"))?
                };
                let grace_until = (status == SubStatus::PastDue).then(|| {
                    // The unpaid period began at current_period_start; falling back to
                    // the event time only for payloads that lack it.
                    current_period_start
                        .unwrap_or(event.created)
                        .saturating_add(ctx.grace_secs)
                });
                let snapshot = Snapshot {
                    plan,
                    status,
                    grace_until,
                    current_period_end: *current_period_end,
                    cancel_at_period_end: *cancel_at_period_end,
                    trial_end: *trial_end,
                };
                Ok(Fact {
                    subscription_id: id.clone(),
                    customer_id: customer.clone(),
                    kind: if deleted {
                        FactKind::Deleted(snapshot)
                    } else {
                        FactKind::Snapshot(snapshot)
                    },
                })
            }
            EventObject::Invoice {
                customer,
                subscription,
                period_start,
                period_end,
                billing_reason,
                created,
                ..
            } => {
                let subscription_id = subscription
                    .clone()
                    .ok_or_else(|| "invoice does not belong to a subscription".to_owned())?;
                let kind = if rank == rank::PAID {
                    FactKind::Paid {
                        period_end: *period_end,
                    }
                } else if billing_reason.as_deref() == Some("subscription_create") {
                    // The first payment of a new subscription failed: it never was paid,
                    // so there is nothing to keep access to (Stripe calls it incomplete).
                    FactKind::PaymentFailed {
                        status: SubStatus::Free,
                        grace_until: None,
                    }
                } else {
                    // Anchor on the start of the unpaid period, the same for every
                    // retry of this invoice, so repeated failures never extend grace.
                    let anchor = period_start.or(*created).unwrap_or(event.created);
                    FactKind::PaymentFailed {
                        status: SubStatus::PastDue,
                        grace_until: Some(anchor.saturating_add(ctx.grace_secs)),
                    }
                };
                Ok(Fact {
                    subscription_id,
                    customer_id: customer.clone(),
                    kind,
                })
            }
            EventObject::CheckoutCompleted { .. } | EventObject::Other => {
                Err(format!("{} carries no subscription", event.event_type))
            }
        }
    }
}

/// Which state an event merges into.
enum Base {
    /// The subscription the state follows (or the state follows none yet).
    Current,
    /// A subscription that replaces the followed one: start over.
    Fresh,
}

/// Why an event touches no state.
enum Skip {
    Stale(String),
    Ignored(String),
}

/// The state to merge `fact` into, or why it belongs to no state we follow.
fn which_subscription(state: &BillingState, fact: &Fact, key: &EventKey<'_>) -> Result<Base, Skip> {
    let Some(current) = state.subscription_id.as_deref() else {
        return Ok(Base::Current);
    };
    if current == fact.subscription_id {
        if state.deleted {
            // Only a (second) deletion with a greater key may touch a deleted state, so
            // that the final state is the greatest deletion whatever the order.
            let newer_deletion = matches!(fact.kind, FactKind::Deleted(_))
                && state.last_key().is_none_or(|last| *key > last);
            if !newer_deletion {
                return Err(Skip::Stale(format!("subscription {current} was deleted")));
            }
        }
        return Ok(Base::Current);
    }

    // Another subscription of the same customer.
    if matches!(fact.kind, FactKind::Deleted(_)) {
        // Ending a subscription we do not follow must not end the one we do.
        return Err(Skip::Ignored(format!(
            "deletion of subscription {}, following {current}",
            fact.subscription_id
        )));
    }
    if state.last_key().is_some_and(|last| *key < last) {
        // A late event of an older subscription (e.g. one deleted before the current
        // one started).
        return Err(Skip::Stale(format!(
            "event of subscription {} is older than subscription {current}",
            fact.subscription_id
        )));
    }
    let replaces = state.deleted
        || matches!(
            &fact.kind,
            FactKind::Snapshot(s) if matches!(s.status, SubStatus::Active | SubStatus::Trialing)
        );
    if !replaces {
        // While the current subscription lives, only a newer subscription that grants
        // access replaces it; an abandoned second checkout must not.
        return Err(Skip::Ignored(format!(
            "subscription {} while {current} is live",
            fact.subscription_id
        )));
    }
    Ok(Base::Fresh)
}

fn merge(mut s: BillingState, fact: &Fact, key: &EventKey<'_>) -> BillingState {
    s.subscription_id = Some(fact.subscription_id.clone());
    s.customer_id = Some(fact.customer_id.clone());

    if let FactKind::Deleted(snap) = &fact.kind {
        // Terminal: the deletion snapshot alone decides, so nothing that arrived before it
        // (in any order) leaks into the final state.
        s.plan = snap.plan.clone();
        s.status = SubStatus::Canceled;
        s.current_period_end = snap.current_period_end;
        s.cancel_at_period_end = snap.cancel_at_period_end;
        s.trial_end = snap.trial_end;
        s.grace_until = None;
        s.deleted = true;
        s.set_last_key(key);
        s.set_snapshot_key(key);
        return s;
    }

    if s.last_key().is_none_or(|last| *key > last) {
        (s.status, s.grace_until) = match &fact.kind {
            FactKind::Snapshot(snap) | FactKind::Deleted(snap) => (snap.status, snap.grace_until),
            FactKind::Paid { .. } => (SubStatus::Active, None),
            FactKind::PaymentFailed {
                status,
                grace_until,
            } => (*status, *grace_until),
        };
        s.set_last_key(key);
    }

    if let FactKind::Snapshot(snap) = &fact.kind {
        if s.snapshot_key().is_none_or(|last| *key > last) {
            s.plan = snap.plan.clone();
            s.cancel_at_period_end = snap.cancel_at_period_end;
            s.trial_end = snap.trial_end;
            s.set_snapshot_key(key);
        }
    }

    let period_end = match &fact.kind {
        FactKind::Snapshot(snap) => snap.current_period_end,
        FactKind::Paid { period_end } => *period_end,
        // An unpaid period must not extend access.
        FactKind::PaymentFailed { .. } | FactKind::Deleted(_) => None,
    };
    s.current_period_end = s.current_period_end.max(period_end);

    // The $0 invoice that starts a trial is `invoice.paid` in the same second as the
    // trialing snapshot, and outranks it. The status it implies is recomputed here from
    // the registers (not from arrival order): still trialing while the trial covers the
    // paid period.
    if s.last_event_rank == rank::PAID {
        let in_trial = matches!((s.trial_end, s.current_period_end), (Some(t), Some(p)) if t >= p);
        s.status = if in_trial {
            SubStatus::Trialing
        } else {
            SubStatus::Active
        };
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400;
    const MONTH: i64 = 30 * DAY;
    const GRACE: i64 = 3 * DAY;
    const T0: i64 = 1_750_000_000;
    const SUB: &str = "sub_A";
    const CUS: &str = "cus_A";

    fn plans(price: &str) -> Option<String> {
        match price {
            "price_basic" => Some("basic".to_owned()),
            "price_pro" => Some("pro".to_owned()),
            _ => None,
        }
    }

    fn ctx_at(now: i64) -> EngineCtx<'static> {
        EngineCtx {
            now,
            grace_secs: GRACE,
            plan_for_price: &plans,
        }
    }

    /// A subscription snapshot as a test writes it.
    #[derive(Clone)]
    struct Snap {
        sub: &'static str,
        status: &'static str,
        price: &'static str,
        start: i64,
        end: i64,
        cancel: bool,
        trial_end: Option<i64>,
    }

    fn snap(status: &'static str, price: &'static str, start: i64, end: i64) -> Snap {
        Snap {
            sub: SUB,
            status,
            price,
            start,
            end,
            cancel: false,
            trial_end: None,
        }
    }

    fn sub_event(ty: &str, id: &str, created: i64, s: &Snap) -> StripeEvent {
        StripeEvent {
            id: id.to_owned(),
            event_type: ty.to_owned(),
            created,
            livemode: false,
            object: EventObject::Subscription {
                id: s.sub.to_owned(),
                customer: CUS.to_owned(),
                status: s.status.to_owned(),
                price_id: Some(s.price.to_owned()),
                current_period_end: Some(s.end),
                current_period_start: Some(s.start),
                cancel_at_period_end: s.cancel,
                trial_end: s.trial_end,
                canceled_at: None,
                ended_at: None,
            },
        }
    }

    fn created(id: &str, at: i64, s: &Snap) -> StripeEvent {
        sub_event(SUBSCRIPTION_CREATED, id, at, s)
    }
    fn updated(id: &str, at: i64, s: &Snap) -> StripeEvent {
        sub_event(SUBSCRIPTION_UPDATED, id, at, s)
    }
    fn deleted(id: &str, at: i64, s: &Snap) -> StripeEvent {
        let mut s = s.clone();
        s.status = "canceled";
        sub_event(SUBSCRIPTION_DELETED, id, at, &s)
    }

    fn invoice(
        ty: &str,
        id: &str,
        at: i64,
        sub: &str,
        start: i64,
        end: i64,
        reason: &str,
    ) -> StripeEvent {
        StripeEvent {
            id: id.to_owned(),
            event_type: ty.to_owned(),
            created: at,
            livemode: false,
            object: EventObject::Invoice {
                id: format!("in_{start}"),
                customer: CUS.to_owned(),
                subscription: Some(sub.to_owned()),
                period_start: Some(start),
                period_end: Some(end),
                billing_reason: Some(reason.to_owned()),
                created: Some(start),
            },
        }
    }
    fn paid(id: &str, at: i64, start: i64, end: i64) -> StripeEvent {
        invoice(INVOICE_PAID, id, at, SUB, start, end, "subscription_cycle")
    }
    fn failed(id: &str, at: i64, start: i64, end: i64) -> StripeEvent {
        invoice(
            INVOICE_PAYMENT_FAILED,
            id,
            at,
            SUB,
            start,
            end,
            "subscription_cycle",
        )
    }

    fn step(state: &BillingState, e: &StripeEvent) -> Decision {
        apply(state, e, &ctx_at(T0))
    }

    /// Applies events in the given order, keeping the state on Stale/Ignored.
    fn fold<'a>(events: impl IntoIterator<Item = &'a StripeEvent>) -> BillingState {
        let mut state = BillingState::default();
        for (i, e) in events.into_iter().enumerate() {
            // A different `now` for every delivery: the merge must not depend on it.
            let now = T0 + 7919 * i as i64;
            if let Decision::Apply(next) = apply(&state, e, &ctx_at(now)) {
                state = next;
            }
        }
        state
    }

    fn applied(d: Decision) -> BillingState {
        match d {
            Decision::Apply(s) => s,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    fn active_pro() -> BillingState {
        fold(&[created(
            "evt_c",
            T0,
            &snap("active", "price_pro", T0, T0 + MONTH),
        )])
    }

    #[test]
    fn stripe_statuses_map() {
        let table = [
            ("active", Some(SubStatus::Active)),
            ("trialing", Some(SubStatus::Trialing)),
            ("past_due", Some(SubStatus::PastDue)),
            ("canceled", Some(SubStatus::Canceled)),
            ("unpaid", Some(SubStatus::Expired)),
            ("incomplete", Some(SubStatus::Free)),
            ("incomplete_expired", Some(SubStatus::Expired)),
            ("paused", Some(SubStatus::Expired)),
            ("something_new", None),
        ];
        for (stripe, want) in table {
            assert_eq!(SubStatus::from_stripe(stripe), want, "{stripe}");
        }
    }

    #[test]
    fn snapshot_transitions() {
        struct Case {
            name: &'static str,
            snap: Snap,
            status: SubStatus,
            plan: &'static str,
            grace_until: Option<i64>,
        }
        let with = |f: fn(&mut Snap)| {
            let mut s = snap("active", "price_pro", T0, T0 + MONTH);
            f(&mut s);
            s
        };
        let cases = [
            Case {
                name: "active",
                snap: with(|_| {}),
                status: SubStatus::Active,
                plan: "pro",
                grace_until: None,
            },
            Case {
                name: "basic plan",
                snap: with(|s| s.price = "price_basic"),
                status: SubStatus::Active,
                plan: "basic",
                grace_until: None,
            },
            Case {
                name: "trialing",
                snap: with(|s| {
                    s.status = "trialing";
                    s.trial_end = Some(T0 + MONTH)
                }),
                status: SubStatus::Trialing,
                plan: "pro",
                grace_until: None,
            },
            Case {
                name: "past_due: grace from the unpaid period's start",
                snap: with(|s| s.status = "past_due"),
                status: SubStatus::PastDue,
                plan: "pro",
                grace_until: Some(T0 + GRACE),
            },
            Case {
                name: "unpaid",
                snap: with(|s| s.status = "unpaid"),
                status: SubStatus::Expired,
                plan: "pro",
                grace_until: None,
            },
            Case {
                name: "incomplete",
                snap: with(|s| s.status = "incomplete"),
                status: SubStatus::Free,
                plan: "pro",
                grace_until: None,
            },
            Case {
                name: "incomplete_expired",
                snap: with(|s| s.status = "incomplete_expired"),
                status: SubStatus::Expired,
                plan: "pro",
                grace_until: None,
            },
            Case {
                name: "canceled by update",
                snap: with(|s| s.status = "canceled"),
                status: SubStatus::Canceled,
                plan: "pro",
                grace_until: None,
            },
        ];
        for c in cases {
            for ty in [SUBSCRIPTION_CREATED, SUBSCRIPTION_UPDATED] {
                let s = applied(step(
                    &BillingState::default(),
                    &sub_event(ty, "evt_1", T0 + 10, &c.snap),
                ));
                assert_eq!(s.status, c.status, "{} ({ty})", c.name);
                assert_eq!(s.plan, c.plan, "{}", c.name);
                assert_eq!(s.grace_until, c.grace_until, "{}", c.name);
                assert_eq!(s.current_period_end, Some(T0 + MONTH), "{}", c.name);
                assert_eq!(s.subscription_id.as_deref(), Some(SUB));
                assert_eq!(s.customer_id.as_deref(), Some(CUS));
                assert_eq!(s.last_event_created, Some(T0 + 10));
                assert_eq!(s.last_event_rank, event_rank(ty).expect("ranked"));
                assert!(!s.deleted);
            }
        }
    }

    #[test]
    fn update_changes_plan_cancel_flag_and_trial() {
        let s0 = active_pro();
        let mut down = snap("active", "price_basic", T0, T0 + MONTH);
        down.cancel = true;
        down.trial_end = Some(T0 - DAY);
        let s1 = applied(step(&s0, &updated("evt_u", T0 + DAY, &down)));
        assert_eq!(s1.plan, "basic");
        assert!(s1.cancel_at_period_end);
        assert_eq!(s1.trial_end, Some(T0 - DAY));
        assert_eq!(s1.status, SubStatus::Active);
        assert_eq!(
            (s1.snapshot_created, s1.snapshot_rank),
            (Some(T0 + DAY), rank::UPDATED)
        );
    }

    #[test]
    fn ignored_events() {
        let s0 = active_pro();
        let other_type = StripeEvent {
            id: "evt_o".into(),
            event_type: "charge.refunded".into(),
            created: T0 + 1,
            livemode: false,
            object: EventObject::Other,
        };
        let checkout = StripeEvent {
            id: "evt_k".into(),
            event_type: CHECKOUT_COMPLETED.into(),
            created: T0 + 1,
            livemode: false,
            object: EventObject::CheckoutCompleted {
                session_id: "cs_1".into(),
                customer: Some(CUS.into()),
                client_reference_id: Some("usr_1".into()),
                subscription: Some(SUB.into()),
                mode: Some("subscription".into()),
            },
        };
        let mut one_off = paid("evt_i", T0 + 1, T0, T0 + MONTH);
        if let EventObject::Invoice { subscription, .. } = &mut one_off.object {
            *subscription = None;
        }
        let cases = [
            ("other type", other_type),
            ("checkout", checkout),
            (
                "unknown price",
                updated(
                    "evt_p",
                    T0 + 1,
                    &snap("active", "price_gold", T0, T0 + MONTH),
                ),
            ),
            (
                "unknown status",
                updated(
                    "evt_s",
                    T0 + 1,
                    &snap("frozen", "price_pro", T0, T0 + MONTH),
                ),
            ),
            ("one-off invoice", one_off),
            (
                "deletion of a subscription we do not follow",
                deleted(
                    "evt_d",
                    T0 + 1,
                    &Snap {
                        sub: "sub_other",
                        ..snap("active", "price_pro", T0, T0 + MONTH)
                    },
                ),
            ),
            (
                "abandoned second checkout while the first is live",
                created(
                    "evt_2",
                    T0 + 1,
                    &Snap {
                        sub: "sub_B",
                        ..snap("incomplete", "price_pro", T0 + 1, T0 + MONTH)
                    },
                ),
            ),
            (
                "invoice of another subscription while the first is live",
                invoice(
                    INVOICE_PAID,
                    "evt_3",
                    T0 + 1,
                    "sub_B",
                    T0,
                    T0 + MONTH,
                    "subscription_create",
                ),
            ),
        ];
        for (name, e) in cases {
            assert!(
                matches!(step(&s0, &e), Decision::Ignored(_)),
                "{name}: {:?}",
                step(&s0, &e)
            );
        }
    }

    #[test]
    fn deletion_is_terminal() {
        let s0 = active_pro();
        let end = snap("active", "price_pro", T0, T0 + MONTH);
        let s1 = applied(step(&s0, &deleted("evt_d", T0 + 5 * DAY, &end)));
        assert_eq!(s1.status, SubStatus::Canceled);
        assert!(s1.deleted);
        assert_eq!(s1.grace_until, None);

        let cases = [
            ("newer updated", updated("evt_u1", T0 + 6 * DAY, &end)),
            ("older updated", updated("evt_u0", T0 + DAY, &end)),
            ("created", created("evt_c2", T0 + 7 * DAY, &end)),
            (
                "newer paid",
                paid("evt_p", T0 + 8 * DAY, T0 + MONTH, T0 + 2 * MONTH),
            ),
            (
                "failed",
                failed("evt_f", T0 + 8 * DAY, T0 + MONTH, T0 + 2 * MONTH),
            ),
            ("same deletion again", deleted("evt_d", T0 + 5 * DAY, &end)),
            (
                "an older second deletion",
                deleted("evt_d0", T0 + 4 * DAY, &end),
            ),
        ];
        for (name, e) in cases {
            assert!(
                matches!(step(&s1, &e), Decision::Stale(_)),
                "{name}: {:?}",
                step(&s1, &e)
            );
        }
        // An updated that arrives before the deletion does not survive it either.
        let late = fold(&[
            created("evt_c", T0, &end),
            updated(
                "evt_u9",
                T0 + 9 * DAY,
                &Snap {
                    price: "price_basic",
                    ..end.clone()
                },
            ),
            deleted("evt_d", T0 + 5 * DAY, &end),
        ]);
        assert_eq!(
            (late.status, late.plan.as_str(), late.deleted),
            (SubStatus::Canceled, "pro", true)
        );
    }

    #[test]
    fn a_new_subscription_after_deletion_applies() {
        let first = snap("active", "price_pro", T0, T0 + MONTH);
        let s1 = fold(&[
            created("evt_c", T0, &first),
            deleted("evt_d", T0 + DAY, &first),
        ]);
        let second = Snap {
            sub: "sub_B",
            ..snap("active", "price_basic", T0 + 2 * DAY, T0 + 2 * DAY + MONTH)
        };
        let s2 = applied(step(&s1, &created("evt_c2", T0 + 2 * DAY, &second)));
        assert_eq!(s2.subscription_id.as_deref(), Some("sub_B"));
        assert_eq!(
            (s2.status, s2.plan.as_str(), s2.deleted),
            (SubStatus::Active, "basic", false)
        );
        assert_eq!(s2.current_period_end, Some(T0 + 2 * DAY + MONTH));

        // A late event of the first subscription does not touch the second.
        let late = updated("evt_u", T0 + DAY / 2, &first);
        assert!(matches!(step(&s2, &late), Decision::Stale(_)));
        // And a deletion of the first, whenever it is dated, does not end the second.
        let late_delete = deleted("evt_d2", T0 + 3 * DAY, &first);
        assert!(matches!(step(&s2, &late_delete), Decision::Ignored(_)));

        // The new subscription's invoice may arrive before its `created`.
        let s3 = applied(step(
            &s1,
            &invoice(
                INVOICE_PAID,
                "evt_i",
                T0 + 2 * DAY,
                "sub_B",
                T0 + 2 * DAY,
                T0 + 2 * DAY + MONTH,
                "subscription_create",
            ),
        ));
        assert_eq!(
            (s3.subscription_id.as_deref(), s3.status),
            (Some("sub_B"), SubStatus::Active)
        );
    }

    #[test]
    fn a_newer_live_subscription_replaces_the_current_one() {
        let s0 = active_pro();
        let other = Snap {
            sub: "sub_B",
            ..snap("active", "price_basic", T0 + DAY, T0 + DAY + MONTH)
        };
        let s1 = applied(step(&s0, &created("evt_b", T0 + DAY, &other)));
        assert_eq!(
            (s1.subscription_id.as_deref(), s1.plan.as_str()),
            (Some("sub_B"), "basic")
        );
    }

    #[test]
    fn invoice_paid_activates_extends_and_clears_grace() {
        let s0 = active_pro();
        let s1 = applied(step(
            &s0,
            &failed("evt_f", T0 + MONTH + 3600, T0 + MONTH, T0 + 2 * MONTH),
        ));
        assert_eq!(s1.status, SubStatus::PastDue);
        assert_eq!(s1.grace_until, Some(T0 + MONTH + GRACE));
        // Failing does not extend the period.
        assert_eq!(s1.current_period_end, Some(T0 + MONTH));

        let s2 = applied(step(
            &s1,
            &paid("evt_p", T0 + MONTH + 2 * DAY, T0 + MONTH, T0 + 2 * MONTH),
        ));
        assert_eq!(s2.status, SubStatus::Active);
        assert_eq!(s2.grace_until, None);
        assert_eq!(s2.current_period_end, Some(T0 + 2 * MONTH));

        // An older invoice's period never shortens it.
        let s3 = applied(step(
            &s2,
            &paid("evt_p_new", T0 + MONTH + 3 * DAY, T0, T0 + MONTH),
        ));
        assert_eq!(s3.current_period_end, Some(T0 + 2 * MONTH));
        assert_eq!(s3.last_event_id.as_deref(), Some("evt_p_new"));
    }

    #[test]
    fn repeated_failures_do_not_extend_grace() {
        let s0 = active_pro();
        let f = |id, at| failed(id, at, T0 + MONTH, T0 + 2 * MONTH);
        let s1 = fold(&[
            created("evt_c", T0, &snap("active", "price_pro", T0, T0 + MONTH)),
            f("evt_f1", T0 + MONTH + 3600),
            f("evt_f2", T0 + MONTH + 2 * DAY),
            updated(
                "evt_u",
                T0 + MONTH + 2 * DAY,
                &snap("past_due", "price_pro", T0 + MONTH, T0 + 2 * MONTH),
            ),
            f("evt_f3", T0 + MONTH + 5 * DAY),
        ]);
        assert_eq!(s1.status, SubStatus::PastDue);
        assert_eq!(s1.grace_until, Some(T0 + MONTH + GRACE));
        assert!(s0.grace_until.is_none());
        // After grace, no access.
        assert_eq!(
            entitlement_at(&s1, T0 + MONTH + GRACE - 1),
            ("pro".into(), SubStatus::PastDue)
        );
        assert_eq!(
            entitlement_at(&s1, T0 + MONTH + GRACE),
            ("free".into(), SubStatus::Expired)
        );
    }

    #[test]
    fn a_failed_first_payment_grants_nothing() {
        let s = fold(&[
            created(
                "evt_c",
                T0,
                &snap("incomplete", "price_pro", T0, T0 + MONTH),
            ),
            invoice(
                INVOICE_PAYMENT_FAILED,
                "evt_f",
                T0,
                SUB,
                T0,
                T0 + MONTH,
                "subscription_create",
            ),
        ]);
        assert_eq!((s.status, s.grace_until), (SubStatus::Free, None));
        assert_eq!(entitlement_at(&s, T0 + 1), ("free".into(), SubStatus::Free));
    }

    #[test]
    fn out_of_order_pairs() {
        let a = snap("active", "price_pro", T0, T0 + MONTH);
        let c = created("evt_c", T0, &a);
        let base = fold([&c]);
        // (name, first, second, second is stale)
        let cases: Vec<(&str, StripeEvent, StripeEvent, bool)> = vec![
            (
                "old updated after new updated",
                updated(
                    "evt_new",
                    T0 + 2 * DAY,
                    &Snap {
                        price: "price_basic",
                        ..a.clone()
                    },
                ),
                updated(
                    "evt_old",
                    T0 + DAY,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                true,
            ),
            (
                "payment_failed after a later paid",
                paid("evt_p", T0 + MONTH + 2 * DAY, T0 + MONTH, T0 + 2 * MONTH),
                failed("evt_f", T0 + MONTH + 3600, T0 + MONTH, T0 + 2 * MONTH),
                true,
            ),
            (
                "payment_failed in the same second as paid",
                paid("evt_p", T0 + MONTH, T0 + MONTH, T0 + 2 * MONTH),
                failed("evt_f", T0 + MONTH, T0 + MONTH, T0 + 2 * MONTH),
                true,
            ),
            (
                "created in the same second as updated",
                updated(
                    "evt_u",
                    T0 + 1,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                created("evt_c2", T0 + 1, &a),
                true,
            ),
            (
                "duplicate",
                updated(
                    "evt_u",
                    T0 + DAY,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                updated(
                    "evt_u",
                    T0 + DAY,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                true,
            ),
            (
                "two updates in one second: the greater id wins either way",
                updated(
                    "evt_b",
                    T0 + DAY,
                    &Snap {
                        price: "price_basic",
                        ..a.clone()
                    },
                ),
                updated(
                    "evt_a",
                    T0 + DAY,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                true,
            ),
            (
                "updated after deleted",
                deleted("evt_d", T0 + DAY, &a),
                updated("evt_u", T0 + 2 * DAY, &a),
                true,
            ),
            (
                "newer updated after older",
                updated(
                    "evt_old",
                    T0 + DAY,
                    &Snap {
                        cancel: true,
                        ..a.clone()
                    },
                ),
                updated(
                    "evt_new",
                    T0 + 2 * DAY,
                    &Snap {
                        price: "price_basic",
                        ..a.clone()
                    },
                ),
                false,
            ),
        ];
        for (name, first, second, stale) in cases {
            let s1 = applied(step(&base, &first));
            let d = step(&s1, &second);
            assert_eq!(matches!(d, Decision::Stale(_)), stale, "{name}: {d:?}");
            // Whichever order they came in, the result is the same.
            assert_eq!(
                fold([&c, &first, &second]),
                fold([&c, &second, &first]),
                "{name}"
            );
        }
    }

    #[test]
    fn stale_reasons_name_the_cause() {
        let s0 = active_pro();
        let again = step(
            &s0,
            &created("evt_c", T0, &snap("active", "price_pro", T0, T0 + MONTH)),
        );
        assert_eq!(again, Decision::Stale("already applied".into()));
        let older = step(
            &s0,
            &created(
                "evt_0",
                T0 - 5,
                &snap("active", "price_pro", T0, T0 + MONTH),
            ),
        );
        assert!(matches!(older, Decision::Stale(r) if r.contains("evt_c")));
    }

    #[test]
    fn an_older_snapshot_still_supplies_plan_after_a_newer_invoice() {
        // invoice.paid overtook the subscription's `created`.
        let p = paid("evt_p", T0 + 1, T0, T0 + MONTH);
        let s1 = applied(step(&BillingState::default(), &p));
        assert_eq!((s1.status, s1.plan.as_str()), (SubStatus::Active, "free"));
        let s2 = applied(step(
            &s1,
            &created(
                "evt_c",
                T0,
                &snap("incomplete", "price_pro", T0, T0 + MONTH),
            ),
        ));
        // The plan comes from the snapshot, the status stays with the newer payment.
        assert_eq!((s2.status, s2.plan.as_str()), (SubStatus::Active, "pro"));
        assert_eq!(
            entitlement_at(&s2, T0 + DAY),
            ("pro".into(), SubStatus::Active)
        );
    }

    #[test]
    fn the_zero_trial_invoice_keeps_trialing_in_either_order() {
        let mut t = snap("trialing", "price_pro", T0, T0 + 14 * DAY);
        t.trial_end = Some(T0 + 14 * DAY);
        let c = created("evt_c", T0, &t);
        let p = invoice(
            INVOICE_PAID,
            "evt_p",
            T0,
            SUB,
            T0,
            T0 + 14 * DAY,
            "subscription_create",
        );
        let s = fold([&c, &p]);
        assert_eq!(s.status, SubStatus::Trialing);
        assert_eq!(fold([&p, &c]), s);
        // The first real renewal after the trial makes it active.
        let s = fold([
            &c,
            &p,
            &paid(
                "evt_r",
                T0 + 14 * DAY + 3600,
                T0 + 14 * DAY,
                T0 + 14 * DAY + MONTH,
            ),
        ]);
        assert_eq!(
            (s.status, s.current_period_end),
            (SubStatus::Active, Some(T0 + 14 * DAY + MONTH))
        );
    }

    #[test]
    fn entitlement_table() {
        let base = BillingState {
            plan: "pro".into(),
            subscription_id: Some(SUB.into()),
            current_period_end: Some(T0 + MONTH),
            ..BillingState::default()
        };
        let with = |f: &dyn Fn(&mut BillingState)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };
        let pro = |st| ("pro".to_owned(), st);
        let free = |st| ("free".to_owned(), st);
        let cases: Vec<(&str, BillingState, i64, (String, SubStatus))> = vec![
            (
                "no subscription",
                BillingState::default(),
                T0,
                free(SubStatus::Free),
            ),
            (
                "incomplete",
                with(&|s| s.status = SubStatus::Free),
                T0,
                free(SubStatus::Free),
            ),
            (
                "active in period",
                with(&|s| s.status = SubStatus::Active),
                T0,
                pro(SubStatus::Active),
            ),
            (
                "active, last second",
                with(&|s| s.status = SubStatus::Active),
                T0 + MONTH - 1,
                pro(SubStatus::Active),
            ),
            (
                "active, period over",
                with(&|s| s.status = SubStatus::Active),
                T0 + MONTH,
                free(SubStatus::Expired),
            ),
            (
                "active without a period end",
                with(&|s| {
                    s.status = SubStatus::Active;
                    s.current_period_end = None
                }),
                T0,
                free(SubStatus::Expired),
            ),
            (
                "scheduled cancel, in period",
                with(&|s| {
                    s.status = SubStatus::Active;
                    s.cancel_at_period_end = true
                }),
                T0 + 1,
                pro(SubStatus::Active),
            ),
            (
                "scheduled cancel, period over",
                with(&|s| {
                    s.status = SubStatus::Active;
                    s.cancel_at_period_end = true
                }),
                T0 + MONTH + 1,
                free(SubStatus::Expired),
            ),
            (
                "trialing",
                with(&|s| s.status = SubStatus::Trialing),
                T0,
                pro(SubStatus::Trialing),
            ),
            (
                "trialing, over",
                with(&|s| s.status = SubStatus::Trialing),
                T0 + MONTH,
                free(SubStatus::Expired),
            ),
            (
                "trialing with only trial_end",
                with(&|s| {
                    s.status = SubStatus::Trialing;
                    s.current_period_end = None;
                    s.trial_end = Some(T0 + DAY)
                }),
                T0,
                pro(SubStatus::Trialing),
            ),
            (
                "past_due in grace",
                with(&|s| {
                    s.status = SubStatus::PastDue;
                    s.grace_until = Some(T0 + GRACE)
                }),
                T0 + GRACE - 1,
                pro(SubStatus::PastDue),
            ),
            (
                "past_due after grace",
                with(&|s| {
                    s.status = SubStatus::PastDue;
                    s.grace_until = Some(T0 + GRACE)
                }),
                T0 + GRACE,
                free(SubStatus::Expired),
            ),
            (
                "past_due without grace",
                with(&|s| s.status = SubStatus::PastDue),
                T0,
                free(SubStatus::Expired),
            ),
            (
                "canceled with time left",
                with(&|s| {
                    s.status = SubStatus::Canceled;
                    s.deleted = true
                }),
                T0,
                free(SubStatus::Canceled),
            ),
            (
                "expired",
                with(&|s| s.status = SubStatus::Expired),
                T0,
                free(SubStatus::Expired),
            ),
        ];
        for (name, state, now, want) in cases {
            assert_eq!(entitlement_at(&state, now), want, "{name}");
        }
    }

    #[test]
    fn link_from_checkout_reads_the_session() {
        let e = StripeEvent {
            id: "evt_k".into(),
            event_type: CHECKOUT_COMPLETED.into(),
            created: T0,
            livemode: false,
            object: EventObject::CheckoutCompleted {
                session_id: "cs_1".into(),
                customer: Some(CUS.into()),
                client_reference_id: Some("usr_1".into()),
                subscription: Some(SUB.into()),
                mode: Some("subscription".into()),
            },
        };
        assert_eq!(
            link_from_checkout(&e),
            Some(CheckoutLink {
                user_id: "usr_1".into(),
                customer_id: CUS.into(),
                subscription_id: Some(SUB.into())
            })
        );
        let mut foreign = e.clone();
        if let EventObject::CheckoutCompleted {
            client_reference_id,
            ..
        } = &mut foreign.object
        {
            *client_reference_id = None;
        }
        assert_eq!(link_from_checkout(&foreign), None);
        assert_eq!(link_from_checkout(&paid("evt_p", T0, T0, T0 + MONTH)), None);
    }

    #[test]
    fn json_from_the_fake_stripe_drives_the_engine() {
        use crate::billing::fake_events as fake;
        let mut sub = fake::FakeSubscription::new("cus_fake", "price_pro", T0, MONTH);
        sub.status = "incomplete".into();
        let first = fake::FakeInvoice::for_current_period(&sub, 1900, "subscription_create");
        let c = fake::subscription_created(&sub, T0);
        sub.status = "active".into();
        let u = fake::subscription_updated(&sub, T0, serde_json::json!({"status": "incomplete"}));
        let p = fake::invoice_paid(&first, T0);
        let events: Vec<StripeEvent> = [c, p, u]
            .iter()
            .map(|v| StripeEvent::from_value(v).expect("parses"))
            .collect();
        let s = fold(&events);
        assert_eq!((s.status, s.plan.as_str()), (SubStatus::Active, "pro"));
        assert_eq!(s.subscription_id.as_deref(), Some(sub.id.as_str()));
        assert_eq!(
            entitlement_at(&s, T0 + DAY),
            ("pro".into(), SubStatus::Active)
        );
    }

    // ---- permutation property ---------------------------------------------------------

    /// What happens at one renewal of the generated subscription.
    #[derive(Debug, Clone)]
    struct Renewal {
        /// 0: paid, 1: failed `retries` times then paid, 2: failed for good (unpaid).
        outcome: u8,
        retries: u8,
        switch_plan: bool,
        toggle_cancel: bool,
    }

    fn renewal() -> impl Strategy<Value = Renewal> {
        (0u8..3, 1u8..4, any::<bool>(), any::<bool>()).prop_map(
            |(outcome, retries, switch_plan, toggle_cancel)| Renewal {
                outcome,
                retries,
                switch_plan,
                toggle_cancel,
            },
        )
    }

    /// The events Stripe sends over a subscription's life, in Stripe's order: checkout
    /// (with or without a trial), renewals that pay, fail and recover, or fail for good,
    /// plan switches, scheduled cancels, and an optional deletion. Many share a second.
    fn lifecycle(start: i64, trial: bool, renewals: &[Renewal], end: u8) -> Vec<StripeEvent> {
        let mut events = Vec::new();
        let mut n = 0;
        let mut id = || {
            n += 1;
            // Ids deliberately not in creation order.
            format!("evt_{:04}", (n * 7919) % 10_000)
        };
        let mut s = snap("active", "price_basic", start, start + MONTH);
        if trial {
            s.status = "trialing";
            s.end = start + 14 * DAY;
            s.trial_end = Some(s.end);
            events.push(created(&id(), start, &s));
            events.push(invoice(
                INVOICE_PAID,
                &id(),
                start,
                SUB,
                start,
                s.end,
                "subscription_create",
            ));
        } else {
            events.push(created(
                &id(),
                start,
                &Snap {
                    status: "incomplete",
                    ..s.clone()
                },
            ));
            events.push(invoice(
                INVOICE_PAID,
                &id(),
                start,
                SUB,
                start,
                s.end,
                "subscription_create",
            ));
            events.push(updated(&id(), start, &s));
        }
        s.status = "active";
        for r in renewals {
            if r.switch_plan {
                s.price = if s.price == "price_basic" {
                    "price_pro"
                } else {
                    "price_basic"
                };
                events.push(updated(&id(), s.start + 5 * DAY, &s));
            }
            if r.toggle_cancel {
                s.cancel = !s.cancel;
                events.push(updated(&id(), s.start + 6 * DAY, &s));
            }
            if s.cancel {
                // A scheduled cancel ends the subscription at the period end.
                events.push(deleted(&id(), s.end, &s));
                return events;
            }
            let boundary = s.end;
            s.start = boundary;
            s.end = boundary + MONTH;
            events.push(updated(&id(), boundary, &s));
            let attempt = boundary + 3600;
            if r.outcome == 0 {
                events.push(paid(&id(), attempt, s.start, s.end));
                continue;
            }
            for k in 0..i64::from(r.retries) {
                let at = attempt + k * 2 * DAY;
                events.push(failed(&id(), at, s.start, s.end));
                if k == 0 {
                    events.push(updated(
                        &id(),
                        at,
                        &Snap {
                            status: "past_due",
                            ..s.clone()
                        },
                    ));
                }
            }
            let last = attempt + i64::from(r.retries) * 2 * DAY;
            if r.outcome == 1 {
                events.push(paid(&id(), last, s.start, s.end));
                events.push(updated(&id(), last, &s));
            } else {
                s.status = "unpaid";
                events.push(updated(&id(), last, &s));
                break;
            }
        }
        match end {
            1 => events.push(deleted(&id(), s.end, &s)),
            2 => events.push(deleted(&id(), s.start + 10 * DAY, &s)),
            _ => {}
        }
        events
    }

    fn sorted(events: &[StripeEvent]) -> Vec<&StripeEvent> {
        let mut v: Vec<&StripeEvent> = events.iter().collect();
        v.sort_by_key(|e| {
            (
                e.created,
                event_rank(&e.event_type).unwrap_or(0),
                e.id.clone(),
            )
        });
        v
    }

    fn lifecycle_and_shuffle() -> impl Strategy<Value = (Vec<StripeEvent>, Vec<StripeEvent>)> {
        (
            1_600_000_000i64..1_900_000_000,
            any::<bool>(),
            proptest::collection::vec(renewal(), 0..6),
            0u8..3,
        )
            .prop_flat_map(|(start, trial, renewals, end)| {
                let events = lifecycle(start, trial, &renewals, end);
                (Just(events.clone()), Just(events).prop_shuffle())
            })
    }

    /// Arbitrary events of one subscription crowded into a few seconds, so keys collide on
    /// `created` and on `(created, rank)`; statuses, prices and periods at random,
    /// including ones the engine ignores.
    fn soup() -> impl Strategy<Value = (Vec<StripeEvent>, Vec<StripeEvent>)> {
        let one = (
            0i64..6,
            0usize..5,
            prop::sample::select(vec![
                "active",
                "trialing",
                "past_due",
                "unpaid",
                "incomplete",
                "canceled",
                "weird",
            ]),
            prop::sample::select(vec!["price_basic", "price_pro", "price_unknown"]),
            0i64..4,
            any::<bool>(),
            prop::option::of(0i64..4),
            any::<bool>(),
        );
        proptest::collection::vec(one, 1..14)
            .prop_map(|raw| {
                raw.into_iter()
                    .enumerate()
                    .map(|(i, (t, ty, status, price, p, cancel, trial, first))| {
                        let id = format!("evt_{:02}", (i * 37) % 101);
                        let at = T0 + t;
                        let start = T0 + p * MONTH;
                        let s = Snap {
                            sub: SUB,
                            status,
                            price,
                            start,
                            end: start + MONTH,
                            cancel,
                            trial_end: trial.map(|k| T0 + k * MONTH),
                        };
                        let reason = if first {
                            "subscription_create"
                        } else {
                            "subscription_cycle"
                        };
                        match ty {
                            0 => created(&id, at, &s),
                            1 => updated(&id, at, &s),
                            2 => deleted(&id, at, &s),
                            3 => invoice(INVOICE_PAID, &id, at, SUB, start, start + MONTH, reason),
                            _ => invoice(
                                INVOICE_PAYMENT_FAILED,
                                &id,
                                at,
                                SUB,
                                start,
                                start + MONTH,
                                reason,
                            ),
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .prop_flat_map(|events| (Just(events.clone()), Just(events).prop_shuffle()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_delivery_order_of_a_lifecycle_gives_the_ordered_state((events, shuffled) in lifecycle_and_shuffle()) {
            let ordered = fold(sorted(&events));
            prop_assert_eq!(fold(&shuffled), ordered.clone());
            // Stripe's own order (in which the lifecycle was generated) agrees as well.
            prop_assert_eq!(fold(&events), ordered.clone());
            // Re-delivering everything (Stripe retries) changes nothing.
            prop_assert_eq!(fold(shuffled.iter().chain(events.iter())), ordered.clone());
            // The life ended where it should have.
            let last = sorted(&events).last().map(|e| e.event_type.clone()).unwrap_or_default();
            if last == SUBSCRIPTION_DELETED {
                prop_assert_eq!(ordered.status, SubStatus::Canceled);
                prop_assert!(ordered.deleted);
            }
            prop_assert!(ordered.subscription_id.is_some());
        }

        #[test]
        fn any_delivery_order_of_arbitrary_events_gives_the_ordered_state((events, shuffled) in soup()) {
            let ordered = fold(sorted(&events));
            prop_assert_eq!(fold(&shuffled), ordered.clone());
            prop_assert_eq!(fold(shuffled.iter().chain(events.iter().rev())), ordered);
        }
    }
}
