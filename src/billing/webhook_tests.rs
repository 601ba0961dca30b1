//! Webhook processing as a service, without HTTP: a [`Billing`] built from its handles
//! (storage on a temp dir, a manual clock, one signing secret) is handed signed deliveries
//! built by the fake Stripe's event builders, and its records and state are checked.

use std::sync::Arc;

use serde_json::{Value, json};

use super::fake_events::{self as fe, FakeSubscription};
use super::signature::sign;
use super::webhook::Processed;
use super::{Billing, BillingError};
use crate::clock::{Clock, ManualClock};
use crate::config::Config;
use crate::storage::states::{EventStatus, SubStatus};
use crate::storage::users::{self, NewUser};
use crate::storage::{Storage, StorageError};

const SECRET: &str = "whsec_unit_test_secret";
const MONTH: i64 = 30 * 24 * 3600;

struct Fixture {
    billing: Billing,
    storage: Storage,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("storage");
    let clock = ManualClock::new();
    let billing = Billing::new(
        &Config::default(),
        storage.clone(),
        clock.clone(),
        vec![SECRET.to_string()],
    )
    .expect("billing");
    Fixture {
        billing,
        storage,
        clock,
        _dir: dir,
    }
}

impl Fixture {
    fn now_secs(&self) -> i64 {
        self.clock.now_millis() / 1000
    }

    async fn user(&self, email: &str) -> String {
        let (email, now) = (email.to_string(), self.clock.now_millis());
        self.storage
            .write(move |c| {
                let id = crate::ids::new_id_at(now);
                users::insert_user(
                    c,
                    &NewUser {
                        id: &id,
                        email: &email,
                        email_verified: true,
                        name: None,
                        password_hash: None,
                        role: None,
                        now,
                    },
                )
            })
            .await
            .expect("user")
            .id
    }

    /// Signs `event` as Stripe would and hands it to the webhook.
    async fn deliver(&self, event: &Value) -> Result<Processed, BillingError> {
        let body = serde_json::to_vec(event).expect("json");
        let header = sign(&body, SECRET, self.now_secs());
        self.billing.handle_webhook(&body, Some(&header)).await
    }

    async fn recorded(&self) -> Vec<(String, String)> {
        self.storage
            .read(|c| {
                let mut stmt = c.prepare("SELECT id, status FROM stripe_events ORDER BY rowid")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, StorageError>(rows)
            })
            .await
            .expect("events")
    }

    /// Links `user` to a new customer through a completed checkout; returns the customer.
    async fn checkout(&self, user: &str) -> String {
        let customer = fe::new_id("cus");
        let done = fe::checkout_session_completed(
            &fe::new_id("cs"),
            &customer,
            user,
            &fe::new_id("sub"),
            self.now_secs(),
        );
        let p = self.deliver(&done).await.expect("checkout");
        assert_eq!(p.status, EventStatus::Applied);
        customer
    }
}

#[tokio::test]
async fn a_subscription_event_applies_once_and_a_redelivery_is_a_duplicate() {
    let f = fixture().await;
    let user = f.user("ada@example.com").await;
    let customer = f.checkout(&user).await;
    let sub = FakeSubscription::new(&customer, "price_pro_monthly", f.now_secs(), MONTH);
    let created = fe::subscription_created(&sub, f.now_secs());

    let p = f.deliver(&created).await.expect("apply");
    assert_eq!(
        (p.duplicate, p.status, p.user_id.as_deref()),
        (false, EventStatus::Applied, Some(user.as_str()))
    );
    let ent = f.billing.entitlement(&user).await;
    assert_eq!((ent.plan.as_str(), ent.status), ("pro", SubStatus::Active));

    let again = f.deliver(&created).await.expect("redelivery");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.status, EventStatus::Applied);
    assert_eq!(f.recorded().await.len(), 2, "one row per event id");
}

#[tokio::test]
async fn an_older_snapshot_is_stale_and_changes_nothing() {
    let f = fixture().await;
    let user = f.user("ada@example.com").await;
    let customer = f.checkout(&user).await;
    let t = f.now_secs();
    let mut sub = FakeSubscription::new(&customer, "price_pro_monthly", t, MONTH);
    let created = fe::subscription_created(&sub, t);
    sub.status = "past_due".to_string();
    let newer = fe::subscription_updated(&sub, t + 60, json!({ "status": "active" }));
    f.deliver(&newer).await.expect("newer first");
    assert_eq!(
        f.billing.entitlement(&user).await.status,
        SubStatus::PastDue
    );

    // Stripe does not promise order: the older snapshot arrives last.
    let p = f.deliver(&created).await.expect("older");
    assert_eq!(p.status, EventStatus::Stale, "{p:?}");
    assert_eq!(
        f.billing.entitlement(&user).await.status,
        SubStatus::PastDue,
        "the newer state stands"
    );
}

#[tokio::test]
async fn an_event_for_no_user_of_this_instance_is_recorded_as_ignored() {
    let f = fixture().await;
    let sub = FakeSubscription::new("cus_elsewhere", "price_pro_monthly", f.now_secs(), MONTH);
    let p = f
        .deliver(&fe::subscription_created(&sub, f.now_secs()))
        .await
        .expect("ignored, not an error");
    assert_eq!((p.status, p.user_id), (EventStatus::Ignored, None));
    let rows = f.recorded().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "ignored");
}

#[tokio::test]
async fn a_bad_signature_or_a_body_that_is_no_event_records_nothing() {
    let f = fixture().await;
    let sub = FakeSubscription::new("cus_x", "price_pro_monthly", f.now_secs(), MONTH);
    let body = serde_json::to_vec(&fe::subscription_created(&sub, f.now_secs())).expect("json");

    let forged = sign(&body, "whsec_someone_else", f.now_secs());
    let r = f.billing.handle_webhook(&body, Some(&forged)).await;
    assert!(matches!(r, Err(BillingError::InvalidSignature(_))), "{r:?}");
    let r = f.billing.handle_webhook(&body, None).await;
    assert!(matches!(r, Err(BillingError::InvalidSignature(_))), "{r:?}");
    let old = sign(&body, SECRET, f.now_secs() - 3600);
    let r = f.billing.handle_webhook(&body, Some(&old)).await;
    assert!(
        matches!(r, Err(BillingError::InvalidSignature(_))),
        "a replay outside the tolerance: {r:?}"
    );

    let not_an_event = br#"{"hello":"world"}"#;
    let header = sign(not_an_event, SECRET, f.now_secs());
    let r = f.billing.handle_webhook(not_an_event, Some(&header)).await;
    assert!(matches!(r, Err(BillingError::NotAnEvent(_))), "{r:?}");
    assert!(f.recorded().await.is_empty());
}
