//! The operational CLI against a running server's data dir: the dead-letter queue, the
//! fake Stripe's event triggers, and reconciliation.

use std::process::Command;
use std::time::Duration;

use crate::common::{TestApp, TestUser, eventually};
use serde_json::{Value, json};
use warpbase::AppOptions;

const T: Duration = Duration::from_secs(15);

fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(crate::common::binary())
        .args(args)
        .arg("--data-dir")
        .arg(app.dir.path())
        .current_dir(app.dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("run warpbase");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn job(app: &TestApp, user: &TestUser, id: &str) -> Value {
    app.get(&format!("/api/v1/jobs/{id}"), Some(&user.access_token))
        .await
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_dead_lists_retries_and_discards() {
    let app = TestApp::start().await;
    let user = app.create_user("cli@example.com").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = app
            .post_json(
                "/api/v1/jobs",
                Some(&user.access_token),
                &json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0, "permanent_fail": true}}),
            )
            .await;
        ids.push(
            r.json::<Value>().await.expect("json")["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    for id in &ids {
        eventually(T, "dead", || async {
            (job(&app, &user, id).await["status"] == "dead").then_some(())
        })
        .await;
    }
    let (ok, out, err) = cli(&app, &["jobs", "dead"]);
    assert!(ok, "{err}");
    assert!(ids.iter().all(|id| out.contains(id.as_str())), "{out}");
    assert!(out.contains("2 dead job(s)"));

    let (ok, out, err) = cli(&app, &["jobs", "dead", "--retry", &ids[0]]);
    assert!(ok, "{err}");
    assert!(out.contains("queued again"), "{out}");
    // The running server picks it up (its dispatcher polls) and it fails again: attempt 2.
    eventually(T, "second attempt", || async {
        let j = job(&app, &user, &ids[0]).await;
        (j["status"] == "dead" && j["attempt"] == 2).then_some(())
    })
    .await;
    let (ok, _, err) = cli(&app, &["jobs", "dead", "--discard", &ids[1]]);
    assert!(ok, "{err}");
    assert_eq!(
        app.get(
            &format!("/api/v1/jobs/{}", ids[1]),
            Some(&user.access_token)
        )
        .await
        .status(),
        404
    );
    let (ok, _, err) = cli(&app, &["jobs", "dead", "--discard", "nope"]);
    assert!(!ok);
    assert!(err.contains("no dead job"), "{err}");
    app.shutdown().await;
}

async fn billing_status(app: &TestApp, user_id: &str) -> String {
    let uid = user_id.to_string();
    app.state()
        .storage
        .read(move |c| warpbase::storage::billing::load_state(c, &uid))
        .await
        .expect("read")
        .map(|j| {
            warpbase::billing::parse_state(Some(&j))
                .status
                .as_str()
                .to_string()
        })
        .unwrap_or_else(|| "free".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_trigger_and_sync_drive_the_real_pipeline() {
    let app = TestApp::start_with(|c| c.auth.rate_limit = 1000, AppOptions::default()).await;
    let user = app.create_user("sub@example.com").await;
    // Subscribe through the fake checkout page.
    let co: Value = app
        .post_json(
            "/api/v1/billing/checkout",
            Some(&user.access_token),
            &json!({"plan": "pro"}),
        )
        .await
        .json()
        .await
        .expect("json");
    let path = co["url"]
        .as_str()
        .expect("url")
        .split_once("/fake-stripe/")
        .map(|(_, p)| format!("/fake-stripe/{p}/pay"))
        .expect("path");
    assert_eq!(
        app.client
            .post(app.url(&path))
            .send()
            .await
            .expect("pay")
            .status(),
        303
    );
    eventually(T, "active", || async {
        (billing_status(&app, &user.id).await == "active").then_some(())
    })
    .await;

    let base = app.url("");
    let (ok, out, err) = cli(
        &app,
        &[
            "stripe",
            "trigger",
            "invoice.payment_failed",
            "--email",
            "sub@example.com",
            "--url",
            &base,
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("sent invoice.payment_failed"), "{out}");
    assert_eq!(billing_status(&app, &user.id).await, "past_due");

    let (ok, _, err) = cli(
        &app,
        &[
            "stripe",
            "trigger",
            "invoice.paid",
            "--email",
            "sub@example.com",
            "--url",
            &base,
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(billing_status(&app, &user.id).await, "active");

    let (ok, _, err) = cli(
        &app,
        &[
            "stripe",
            "trigger",
            "nonsense",
            "--email",
            "sub@example.com",
        ],
    );
    assert!(!ok);
    assert!(err.contains("unknown event"), "{err}");
    let (ok, _, err) = cli(
        &app,
        &[
            "stripe",
            "trigger",
            "invoice.paid",
            "--email",
            "nobody@example.com",
            "--url",
            &base,
        ],
    );
    assert!(!ok);
    assert!(err.contains("no user"), "{err}");

    // Lost webhook: the subscription ended at "Stripe" only; `stripe sync` repairs it.
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
    let (ok, out, err) = cli(&app, &["stripe", "sync"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 repaired"), "{out}");
    let uid = user.id.clone();
    let dump = app
        .state()
        .storage
        .read(move |c| {
            let st: String = c.query_row(
                "SELECT state FROM billing_state WHERE user_id=?1",
                [&uid],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare(
                "SELECT id, type, created, status, reason FROM stripe_events ORDER BY received_at",
            )?;
            let ev: Vec<String> = stmt
                .query_map([], |r| {
                    Ok(format!(
                        "{} {} {} {} {:?}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?
                    ))
                })?
                .collect::<Result<_, _>>()?;
            Ok::<_, warpbase::storage::StorageError>(format!("{st}\n{}", ev.join("\n")))
        })
        .await
        .expect("dump");
    assert_eq!(billing_status(&app, &user.id).await, "canceled", "{dump}");
    app.shutdown().await;
}
