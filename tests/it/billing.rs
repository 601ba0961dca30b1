//! Billing, black-box: webhook signatures, exactly-once processing under concurrent
//! duplicates, order safety, grace and period expiry with a fake clock, rollback of a
//! failed application, the offline checkout and portal flows over HTTP, usage metering,
//! admin events and reconciliation.

use std::sync::Arc;
use std::time::Duration;

use crate::common::{TestApp, TestUser, eventually, expect_problem};
use serde_json::{Value, json};
use warpbase::AppOptions;
use warpbase::billing::fake_events::{self as fe, FakeInvoice, FakeSubscription};
use warpbase::billing::signature::sign;
use warpbase::clock::{Clock, ManualClock};
use warpbase::config::{PlanConfig, PlanLimits, Secret};

const SECRET: &str = "whsec_test_primary";
const OLD_SECRET: &str = "whsec_test_rotated_out";
const T: Duration = Duration::from_secs(15);

fn configure(c: &mut warpbase::Config) {
    c.stripe.webhook_secrets = vec![Secret::new(SECRET), Secret::new(OLD_SECRET)];
    c.auth.rate_limit = 1000;
    c.billing.plans = vec![
        PlanConfig {
            id: "pro".into(),
            name: "Pro".into(),
            price_id: "price_pro".into(),
            price: 1900,
            currency: "usd".into(),
            interval: "month".into(),
            metered: false,
            limits: PlanLimits {
                jobs_per_period: 1000,
                concurrent_jobs: 4,
                max_upload_bytes: 1 << 20,
                max_storage_bytes: 10 << 20,
            },
        },
        PlanConfig {
            id: "metered".into(),
            name: "Pay as you go".into(),
            price_id: "price_metered".into(),
            price: 0,
            currency: "usd".into(),
            interval: "month".into(),
            metered: true,
            limits: PlanLimits {
                jobs_per_period: 100_000,
                concurrent_jobs: 8,
                max_upload_bytes: 1 << 20,
                max_storage_bytes: 10 << 20,
            },
        },
    ];
}

async fn start_with_clock(clock: Option<Arc<ManualClock>>) -> TestApp {
    TestApp::start_with(
        configure,
        AppOptions {
            clock: clock.map(|c| c as Arc<dyn Clock>),
            ..Default::default()
        },
    )
    .await
}

async fn start() -> TestApp {
    start_with_clock(None).await
}

fn now_secs(app: &TestApp) -> i64 {
    app.state().now_millis() / 1000
}

async fn post_event(app: &TestApp, event: &Value, secret: &str, t: i64) -> reqwest::Response {
    let body = serde_json::to_vec(event).expect("json");
    app.client
        .post(app.url("/api/v1/billing/webhook"))
        .header("stripe-signature", sign(&body, secret, t))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("webhook")
}

async fn deliver(app: &TestApp, event: &Value) -> Value {
    let r = post_event(app, event, SECRET, now_secs(app)).await;
    assert_eq!(r.status(), 200, "webhook for {}", event["type"]);
    r.json().await.expect("json")
}

async fn subscription(app: &TestApp, user: &TestUser) -> Value {
    // Reissued so tests that move the clock by days still authenticate.
    app.get("/api/v1/billing/subscription", Some(&app.reissue(user)))
        .await
        .json()
        .await
        .expect("json")
}

/// A user with a Stripe customer linked (as checkout would do).
async fn customer(app: &TestApp, user: &TestUser) -> String {
    let cus = fe::new_id("cus");
    let ev = fe::checkout_session_completed(
        &fe::new_id("cs"),
        &cus,
        &user.id,
        "sub_none",
        now_secs(app),
    );
    deliver(app, &ev).await;
    cus
}

#[tokio::test]
async fn webhook_signatures_are_checked_exactly_as_stripe_specifies() {
    let app = start().await;
    let user = app.admin("sig@example.com").await;
    let now = now_secs(&app);
    let ev = fe::checkout_session_completed("cs_1", "cus_1", &user.id, "sub_1", now);
    let body = serde_json::to_vec(&ev).expect("json");
    let send = |sig: Option<String>, body: Vec<u8>| {
        let mut req = app
            .client
            .post(app.url("/api/v1/billing/webhook"))
            .body(body);
        if let Some(s) = sig {
            req = req.header("stripe-signature", s);
        }
        req.send()
    };
    // Missing, garbage, wrong secret, tampered body, expired: 400 invalid_signature.
    expect_problem(
        send(None, body.clone()).await.expect("r"),
        400,
        "invalid_signature",
    )
    .await;
    expect_problem(
        send(Some("nonsense".into()), body.clone())
            .await
            .expect("r"),
        400,
        "invalid_signature",
    )
    .await;
    expect_problem(
        send(Some(sign(&body, "whsec_wrong", now)), body.clone())
            .await
            .expect("r"),
        400,
        "invalid_signature",
    )
    .await;
    let mut tampered = body.clone();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    expect_problem(
        send(Some(sign(&body, SECRET, now)), tampered)
            .await
            .expect("r"),
        400,
        "invalid_signature",
    )
    .await;
    expect_problem(
        send(Some(sign(&body, SECRET, now - 301)), body.clone())
            .await
            .expect("r"),
        400,
        "invalid_signature",
    )
    .await;
    // Nothing was recorded by any of those.
    let events: Value = app
        .get("/api/v1/admin/billing/events", Some(&user.access_token))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(events["items"].as_array().expect("items").len(), 0);
    // Several v1 values, one of them right; and a rotated (second) secret: accepted.
    let good = sign(&body, SECRET, now);
    let v1 = good.split("v1=").nth(1).expect("v1");
    let multi = format!("t={now},v1={},v1={v1}", "0".repeat(64));
    assert_eq!(
        send(Some(multi), body.clone()).await.expect("r").status(),
        200
    );
    let ev2 = fe::checkout_session_completed("cs_2", "cus_1", &user.id, "sub_1", now);
    let r = post_event(&app, &ev2, OLD_SECRET, now).await;
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_fifty_times_concurrently_is_applied_once() {
    let app = start().await;
    let user = app.create_user("dup@example.com").await;
    let cus = customer(&app, &user).await;
    let sub = FakeSubscription::new(&cus, "price_pro", now_secs(&app), 30 * 86400);
    let ev = fe::subscription_created(&sub, now_secs(&app));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = app.client.clone();
        let url = app.url("/api/v1/billing/webhook");
        let body = serde_json::to_vec(&ev).expect("json");
        let sig = sign(&body, SECRET, now_secs(&app));
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("stripe-signature", sig)
                .body(body)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("json")
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if t.await.expect("join")["duplicate"] == false {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one delivery applied the event");
    let id = ev["id"].as_str().expect("id").to_string();
    let attempts = app
        .db_i64("SELECT attempts FROM stripe_events WHERE id = ?1", vec![id])
        .await
        .expect("row");
    assert_eq!(attempts, 1);
    let s = subscription(&app, &user).await;
    assert_eq!(s["plan"], "pro");
    assert_eq!(s["status"], "active");
    app.shutdown().await;
}

#[tokio::test]
async fn out_of_order_events_never_resurrect_or_regress() {
    let app = start().await;
    let user = app.create_user("order@example.com").await;
    let cus = customer(&app, &user).await;
    let t0 = now_secs(&app) - 100;
    let sub = FakeSubscription::new(&cus, "price_pro", t0, 30 * 86400);
    deliver(&app, &fe::subscription_created(&sub, t0)).await;
    let mut later = sub.clone();
    later.cancel_at_period_end = true;
    let newer_update = fe::subscription_updated(&later, t0 + 20, json!({}));
    let older_update = fe::subscription_updated(&sub, t0 + 10, json!({}));
    // New update first, then the older one: the older one is stale.
    assert_eq!(deliver(&app, &newer_update).await["status"], "applied");
    assert_eq!(deliver(&app, &older_update).await["status"], "stale");
    assert_eq!(
        subscription(&app, &user).await["cancel_at_period_end"],
        true
    );
    // Deleted, then a late update from before: still canceled, no access.
    deliver(&app, &fe::subscription_deleted(&sub, t0 + 30)).await;
    let late = fe::subscription_updated(&sub, t0 + 25, json!({}));
    deliver(&app, &late).await;
    let s = subscription(&app, &user).await;
    assert_eq!(s["status"], "canceled");
    assert_eq!(s["plan"], "free");
    app.shutdown().await;
}

#[tokio::test]
async fn grace_period_and_period_end_expire_with_the_clock() {
    let clock = ManualClock::new();
    let app = start_with_clock(Some(clock.clone())).await;
    let user = app.create_user("grace@example.com").await;
    let cus = customer(&app, &user).await;
    let now = now_secs(&app);
    // A subscription whose current period ends in a minute.
    let sub = FakeSubscription::new(&cus, "price_pro", now - 30 * 86400 + 60, 30 * 86400);
    deliver(&app, &fe::subscription_created(&sub, now)).await;
    deliver(
        &app,
        &fe::invoice_paid(
            &FakeInvoice::for_current_period(&sub, 1900, "subscription_create"),
            now,
        ),
    )
    .await;
    assert_eq!(subscription(&app, &user).await["status"], "active");
    // The renewal at the period boundary fails: past_due with grace (3 days from the
    // start of the unpaid period), still on the paid plan.
    clock.advance(Duration::from_secs(61));
    let mut next = sub.clone();
    next.current_period_start = sub.current_period_end;
    next.current_period_end = sub.current_period_end + 30 * 86400;
    let failed = FakeInvoice::for_current_period(&next, 1900, "subscription_cycle");
    deliver(&app, &fe::invoice_payment_failed(&failed, now_secs(&app))).await;
    let s = subscription(&app, &user).await;
    assert_eq!(s["status"], "past_due");
    assert_eq!(s["plan"], "pro");
    assert!(s["grace_until"].is_string());
    clock.advance(Duration::from_secs(2 * 86400));
    assert_eq!(
        subscription(&app, &user).await["plan"],
        "pro",
        "still within grace"
    );
    // Grace runs out with no payment: expired, free limits — no webhook needed.
    clock.advance(Duration::from_secs(86400 + 60));
    let s = subscription(&app, &user).await;
    assert_eq!(s["status"], "expired");
    assert_eq!(s["plan"], "free");
    assert_eq!(s["limits"]["concurrent_jobs"], 2);

    // A second user: active, then the period ends without renewal → expired.
    let other = app.create_user("period@example.com").await;
    let cus2 = customer(&app, &other).await;
    let now = now_secs(&app);
    let sub2 = FakeSubscription::new(&cus2, "price_pro", now, 30 * 86400);
    deliver(&app, &fe::subscription_created(&sub2, now)).await;
    assert_eq!(subscription(&app, &other).await["plan"], "pro");
    clock.advance(Duration::from_secs(31 * 86400));
    let s = subscription(&app, &other).await;
    assert_eq!(
        (s["status"].as_str(), s["plan"].as_str()),
        (Some("expired"), Some("free"))
    );
    app.shutdown().await;
}

/// Once armed, fails the next event application after its writes.
#[derive(Default)]
struct FailNextApply(std::sync::atomic::AtomicBool);

impl warpbase::billing::ApplyFault for FailNextApply {
    fn after_write(&self, _event_id: &str) -> Result<(), String> {
        if self.0.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err("injected failure after writing (test hook)".into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failure_midway_rolls_back_and_the_retry_applies() {
    let fault = Arc::new(FailNextApply::default());
    let opts = AppOptions {
        billing_fault: Some(fault.clone()),
        ..Default::default()
    };
    let app = TestApp::start_with(configure, opts).await;
    let user = app.admin("fail@example.com").await;
    let cus = customer(&app, &user).await;
    let sub = FakeSubscription::new(&cus, "price_pro", now_secs(&app), 30 * 86400);
    let ev = fe::subscription_created(&sub, now_secs(&app));
    fault.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = post_event(&app, &ev, SECRET, now_secs(&app)).await;
    expect_problem(r, 500, "internal").await;
    // Nothing half-written: still free; the event is recorded as failed for admins.
    assert_eq!(subscription(&app, &user).await["plan"], "free");
    let failed: Value = app
        .get(
            "/api/v1/admin/billing/events?status=failed",
            Some(&user.access_token),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(failed["items"][0]["id"], ev["id"]);
    // Stripe retries the same event: now it applies (not a duplicate).
    let again = deliver(&app, &ev).await;
    assert_eq!(again["duplicate"], false);
    assert_eq!(again["status"], "applied");
    assert_eq!(subscription(&app, &user).await["plan"], "pro");
    app.shutdown().await;
}

#[tokio::test]
async fn unknown_types_are_ignored_and_admins_can_replay() {
    let app = start().await;
    let admin = app.admin("admin@example.com").await;
    let ev = fe::envelope(
        "customer.created",
        now_secs(&app),
        json!({"id": "cus_x", "object": "customer"}),
    );
    let r = deliver(&app, &ev).await;
    assert_eq!(r["status"], "ignored");
    let list: Value = app
        .get(
            "/api/v1/admin/billing/events?status=ignored",
            Some(&admin.access_token),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(list["items"].as_array().expect("items").len(), 1);
    let id = ev["id"].as_str().expect("id");
    let r = app
        .post_json(
            &format!("/api/v1/admin/billing/events/{id}/replay"),
            Some(&admin.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let other = app.create_user("user@example.com").await;
    let r = app
        .get("/api/v1/admin/billing/events", Some(&other.access_token))
        .await;
    expect_problem(r, 403, "forbidden").await;
    let r = app
        .post_json(
            "/api/v1/admin/billing/events/evt_nope/replay",
            Some(&admin.access_token),
            &json!({}),
        )
        .await;
    expect_problem(r, 404, "not_found").await;
    app.shutdown().await;
}

/// Follows the offline checkout: create a session, open the fake page, press Pay.
async fn subscribe_offline(app: &TestApp, user: &TestUser, plan: &str) {
    let r = app
        .post_json(
            "/api/v1/billing/checkout",
            Some(&user.access_token),
            &json!({"plan": plan}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let co: Value = r.json().await.expect("json");
    let url = co["url"].as_str().expect("url");
    let path = url
        .split_once("/fake-stripe/")
        .map(|(_, p)| format!("/fake-stripe/{p}"))
        .expect("fake url");
    let page = app.get(&path, None).await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("Pay"));
    let r = app
        .client
        .post(app.url(&format!("{path}/pay")))
        .send()
        .await
        .expect("pay");
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["location"]
            .to_str()
            .expect("loc")
            .contains("checkout=success")
    );
}

#[tokio::test]
async fn offline_checkout_and_portal_go_through_the_real_pipeline() {
    let app = TestApp::start_with(
        |c| {
            configure(c);
            // Offline mode signs with the generated secret; accept only that one.
            c.stripe.webhook_secrets = Vec::new();
        },
        AppOptions::default(),
    )
    .await;
    let user = app.admin("buyer@example.com").await;
    let r = app
        .post_json(
            "/api/v1/billing/checkout",
            Some(&user.access_token),
            &json!({"plan": "gold"}),
        )
        .await;
    expect_problem(r, 422, "invalid_input").await;
    subscribe_offline(&app, &user, "pro").await;
    let s = eventually(T, "the plan to become active", || async {
        let s = subscription(&app, &user).await;
        (s["status"] == "active").then_some(s)
    })
    .await;
    assert_eq!(s["plan"], "pro");
    assert!(s["current_period_end"].is_string());
    // The three events went through the webhook pipeline and were applied.
    let events: Value = app
        .get("/api/v1/admin/billing/events", Some(&user.access_token))
        .await
        .json()
        .await
        .expect("json");
    let types: Vec<&str> = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    for t in [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.paid",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    // Already subscribed: use the portal.
    let r = app
        .post_json(
            "/api/v1/billing/checkout",
            Some(&user.access_token),
            &json!({"plan": "pro"}),
        )
        .await;
    expect_problem(r, 409, "already_subscribed").await;
    let r = app
        .post_json(
            "/api/v1/billing/portal",
            Some(&user.access_token),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let portal: Value = r.json().await.expect("json");
    let path = portal["url"]
        .as_str()
        .expect("url")
        .split_once("/fake-stripe/")
        .map(|(_, p)| format!("/fake-stripe/{p}"))
        .expect("path");
    assert_eq!(app.get(&path, None).await.status(), 200);
    // A failed payment from the portal: past_due with grace, mail enqueued.
    let r = app
        .client
        .post(app.url(&format!("{path}/fail-payment")))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 303);
    let s = subscription(&app, &user).await;
    assert_eq!(s["status"], "past_due");
    // Cancel now: canceled, free at once.
    app.client
        .post(app.url(&format!("{path}/cancel-now")))
        .send()
        .await
        .expect("post");
    let s = subscription(&app, &user).await;
    assert_eq!(
        (s["status"].as_str(), s["plan"].as_str()),
        (Some("canceled"), Some("free"))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn metered_plans_report_each_succeeded_job_once() {
    let app = TestApp::start_with(
        |c| {
            configure(c);
            c.stripe.webhook_secrets = Vec::new();
        },
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("meter@example.com").await;
    subscribe_offline(&app, &user, "metered").await;
    eventually(T, "metered plan", || async {
        (subscription(&app, &user).await["plan"] == "metered").then_some(())
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = app
            .post_json(
                "/api/v1/jobs",
                Some(&user.access_token),
                &json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}),
            )
            .await;
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    let uid = user.id.clone();
    let reported = eventually(T, "three meter events", || {
        let uid = uid.clone();
        let app = &app;
        async move {
            let rows: Vec<String> = app
                .state()
                .storage
                .read(move |c| {
                    let mut stmt = c.prepare(
                        "SELECT m.identifier FROM fake_meter_events m
                         JOIN billing_customers b ON b.customer_id = m.customer_id WHERE b.user_id = ?1",
                    )?;
                    let rows = stmt.query_map([&uid], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
                    Ok::<_, warpbase::storage::StorageError>(rows)
                })
                .await
                .ok()?;
            (rows.len() >= 3).then_some(rows)
        }
    })
    .await;
    let mut reported = reported;
    reported.sort();
    ids.sort();
    assert_eq!(
        reported, ids,
        "one meter event per job, identified by the job id"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn reconciliation_repairs_state_when_webhooks_were_lost() {
    let app = TestApp::start_with(
        |c| {
            configure(c);
            c.stripe.webhook_secrets = Vec::new();
        },
        AppOptions::default(),
    )
    .await;
    let user = app.create_user("sync@example.com").await;
    subscribe_offline(&app, &user, "pro").await;
    eventually(T, "active", || async {
        (subscription(&app, &user).await["status"] == "active").then_some(())
    })
    .await;
    // The subscription ends at Stripe but the webhook never arrives.
    let uid = user.id.clone();
    app.state()
        .storage
        .write(move |c| {
            c.execute(
                "UPDATE fake_subscriptions SET status = 'canceled' WHERE user_id = ?1",
                [&uid],
            )?;
            Ok::<_, warpbase::storage::StorageError>(())
        })
        .await
        .expect("simulate");
    assert_eq!(subscription(&app, &user).await["status"], "active");
    let report = app.state().billing.sync_all().await.expect("sync");
    assert_eq!(report.applied, 1);
    let s = subscription(&app, &user).await;
    assert_eq!(
        (s["status"].as_str(), s["plan"].as_str()),
        (Some("canceled"), Some("free"))
    );
    // Running it again changes nothing.
    let again = app.state().billing.sync_all().await.expect("sync");
    assert_eq!(again.applied, 0);
    app.shutdown().await;
}

/// Reconciliations within one second are distinct snapshots: each must be applied,
/// not mistaken for a redelivery of the first (their synthetic ids used to be
/// `sync_{sub}_{unix seconds}`), and a sync that changed nothing must not say it did.
#[tokio::test]
async fn reconciliations_within_one_second_are_each_applied() {
    let clock = ManualClock::new();
    // Early in a second, so the whole test stays inside it.
    clock.set_millis((clock.now_millis() / 1000 + 1) * 1000 + 100);
    let app = start_with_clock(Some(clock.clone())).await;
    // The daily reconciliation runs once at start; let it claim its run before any
    // customer exists, so it cannot be the one that repairs what this test changes.
    eventually(T, "the daily reconciliation to have run", || async {
        app.state()
            .storage
            .read(|c| warpbase::storage::jobs::meta_get(c, "periodic.billing.reconcile"))
            .await
            .ok()
            .flatten()
    })
    .await;
    let user = app.create_user("twice@example.com").await;
    subscribe_offline(&app, &user, "pro").await;
    eventually(T, "active", || async {
        (subscription(&app, &user).await["status"] == "active").then_some(())
    })
    .await;
    // Into the next second: within the checkout's second its invoice.paid outranks any
    // update (events of one second order by type), which is not what is tested here.
    clock.set_millis((clock.now_millis() / 1000 + 1) * 1000 + 100);
    let second = clock.now_millis() / 1000;
    // Two updates (same second and type: ordered by the id, i.e. by the millisecond),
    // then the end of the subscription.
    for status in ["past_due", "active", "canceled"] {
        let (uid, st) = (user.id.clone(), status.to_string());
        app.state()
            .storage
            .write(move |c| {
                c.execute(
                    "UPDATE fake_subscriptions SET status = ?2 WHERE user_id = ?1",
                    [&uid, &st],
                )?;
                Ok::<_, warpbase::storage::StorageError>(())
            })
            .await
            .expect("simulate");
        clock.advance(Duration::from_millis(1));
        let report = app.state().billing.sync_all().await.expect("sync");
        assert_eq!(report.applied, 1, "the sync to {status}");
        assert_eq!(subscription(&app, &user).await["status"], status);
    }
    assert_eq!(
        clock.now_millis() / 1000,
        second,
        "both syncs in one second"
    );
    let again = app.state().billing.sync_all().await.expect("sync");
    assert_eq!(again.applied, 0);
    app.shutdown().await;
}
