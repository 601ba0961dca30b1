//! The operational subcommands that act on a (possibly running) server's database:
//! `jobs dead`, `stripe trigger`, `stripe sync`. Each opens the database itself; writes
//! are ordinary transactions that the running server sees (its caches within a minute).

use std::sync::Arc;

use anyhow::{Context, bail};

use crate::billing::fake::{self, Scenario};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::storage::{self, Storage};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn open(config: &Config) -> anyhow::Result<Storage> {
    let dir = config.data_dir.clone();
    if !dir.join(storage::DB_FILE).exists() {
        bail!(
            "no database in {}; start warpbase once or pass --data-dir",
            dir.display()
        );
    }
    Ok(tokio::task::spawn_blocking(move || Storage::open(&dir)).await??)
}

pub fn jobs_dead(
    config: &Config,
    retry: Option<String>,
    discard: Option<String>,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let storage = open(config).await?;
        let now = crate::clock::now_millis();
        let result = async {
            if let Some(id) = retry {
                let row = storage
                    .write(move |c| storage::jobs::retry(c, &id, now))
                    .await?
                    .context("no dead or canceled job with this id")?;
                println!(
                    "job {} queued again (attempt {} so far, up to {})",
                    row.id, row.attempt, row.max_attempts
                );
                return Ok(());
            }
            if let Some(id) = discard {
                let gone = storage
                    .write(move |c| storage::jobs::discard_dead(c, &id))
                    .await?;
                if !gone {
                    bail!("no dead job with this id");
                }
                println!("discarded");
                return Ok(());
            }
            let rows = storage
                .read(|c| {
                    storage::jobs::list(
                        c,
                        &storage::jobs::ListFilter {
                            user_id: None,
                            status: Some(storage::states::JobStatus::Dead),
                            kind: None,
                            before_id: None,
                            limit: 1000,
                        },
                    )
                })
                .await?;
            println!(
                "{:<34} {:<14} {:>7} {:<24} ERROR",
                "ID", "KIND", "ATTEMPT", "FINISHED"
            );
            for r in &rows {
                println!(
                    "{:<34} {:<14} {:>7} {:<24} {}",
                    r.id,
                    r.kind,
                    r.attempt,
                    r.finished_at.map(crate::clock::rfc3339).unwrap_or_default(),
                    r.error
                        .as_deref()
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or("")
                );
            }
            println!("{} dead job(s)", rows.len());
            Ok(())
        }
        .await;
        storage.close().await?;
        result
    })
}

pub fn stripe_trigger(
    config: &Config,
    event: &str,
    email: &str,
    url: Option<String>,
) -> anyhow::Result<()> {
    if !config.stripe.offline() {
        bail!(
            "stripe trigger drives the built-in fake Stripe (offline mode); with a real key use the Stripe CLI: `stripe trigger {event}`"
        );
    }
    let scenario = match event {
        "invoice.paid" | "renewal" => Scenario::Renewal,
        "invoice.payment_failed" => Scenario::PaymentFailed,
        "customer.subscription.deleted" => Scenario::Deleted,
        "customer.subscription.updated" | "cancel_at_period_end" => {
            Scenario::CancelAtPeriodEnd(true)
        }
        "resume" => Scenario::CancelAtPeriodEnd(false),
        other => bail!(
            "unknown event {other:?}; one of: invoice.paid, invoice.payment_failed, customer.subscription.deleted, customer.subscription.updated, resume (checkout.session.completed happens on the fake checkout page)"
        ),
    };
    let secret = crate::billing::webhook_secrets(config)?
        .into_iter()
        .next()
        .context("no webhook secret")?;
    let base = url.unwrap_or_else(|| config.public_base().to_string());
    let webhook = format!("{}/api/v1/billing/webhook", base.trim_end_matches('/'));
    runtime()?.block_on(async {
        let storage = open(config).await?;
        let result = async {
            let email =
                crate::auth::password::normalize_email(email).map_err(anyhow::Error::msg)?;
            let user = storage
                .read(move |c| storage::users::get_user_by_email(c, &email))
                .await?
                .context("no user with this email")?;
            let uid = user.id.clone();
            let price = storage
                .read(move |c| storage::billing::load_state(c, &uid))
                .await
                .map(|j| crate::billing::parse_state(j.as_deref()).plan)
                .ok()
                .and_then(|plan| config.plans().into_iter().find(|p| p.id == plan))
                .map(|p| p.price as i64)
                .unwrap_or(0);
            let now = crate::clock::now_millis() / 1000;
            let events = fake::scenario_events(&storage, &user.id, scenario, now, price)
                .await
                .map_err(anyhow::Error::msg)?;
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?;
            for e in &events {
                fake::deliver(&http, &webhook, &secret, e)
                    .await
                    .map_err(|err| {
                        anyhow::anyhow!("delivering {} to {webhook}: {err}", e["type"])
                    })?;
                println!(
                    "sent {} {}",
                    e["type"].as_str().unwrap_or("?"),
                    e["id"].as_str().unwrap_or("?")
                );
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        storage.close().await?;
        result
    })
}

pub fn stripe_sync(config: &Config) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let storage = open(config).await?;
        let clock: SharedClock = Arc::new(SystemClock);
        let secrets = crate::billing::webhook_secrets(config)?;
        let billing = crate::billing::Billing::new(config, storage.clone(), clock, secrets)?;
        let result = billing.sync_all().await;
        storage.close().await?;
        let r = result?;
        println!(
            "reconciled {} customer(s): {} repaired, {} already right, {} failed",
            r.customers, r.applied, r.unchanged, r.errors
        );
        if r.errors > 0 {
            bail!(
                "{} customer(s) could not be reconciled (see the log)",
                r.errors
            );
        }
        Ok(())
    })
}
