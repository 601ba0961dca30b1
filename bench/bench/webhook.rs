//! Scenario `webhook`: ingestion of distinct signed Stripe events, each checked stored
//! exactly once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use serde_json::json;
use warpbase::billing::fake_events::{self, FakeInvoice, FakeSubscription};
use warpbase::billing::signature;

use crate::load::{closed_loop, expect_status};
use crate::report::{Report, Target};
use crate::server::{Server, cpu_secs};
use crate::{Params, Paths, WEBHOOK_SECRET};

/// A distinct, realistic Stripe event (fresh customer and subscription), signed now.
fn signed_event(i: u64) -> (String, Vec<u8>, String) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let customer = fake_events::new_id("cus");
    let sub = FakeSubscription::new(&customer, "price_bench_monthly", now, 30 * 86_400);
    let ev = match i % 3 {
        0 => fake_events::subscription_created(&sub, now),
        1 => fake_events::subscription_updated(&sub, now, json!({})),
        _ => fake_events::invoice_paid(
            &FakeInvoice::for_current_period(&sub, 1900, "subscription_cycle"),
            now,
        ),
    };
    let id = ev["id"].as_str().unwrap_or_default().to_string();
    let body = serde_json::to_vec(&ev).expect("event JSON");
    let sig = signature::sign(&body, WEBHOOK_SECRET, now);
    (id, body, sig)
}

/// 3. Webhook ingestion of distinct signed events; each verified stored exactly once.
pub async fn scenario_webhook(
    p: &Params,
    paths: &Paths,
    rep: &mut Report,
    raw: Option<f64>,
) -> Result<()> {
    eprintln!("[webhook] distinct signed events at {} conns", p.conns);
    let server = Server::start(&paths.warpbase)?;
    let url = Arc::new(server.url("/api/v1/billing/webhook"));
    // Pre-signed so the generator spends its CPU on sending; more are made on the fly.
    let pool_size = ((p.secs * 12_000.0) as usize).min(150_000);
    let pool: Arc<Vec<(String, Vec<u8>, String)>> =
        Arc::new((0..pool_size as u64).map(signed_event).collect());
    let next = Arc::new(AtomicU64::new(0));
    let accepted: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let redelivered = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_secs(server.child.id());
    let mut load = {
        let (pool, next, accepted, redelivered) = (
            pool.clone(),
            next.clone(),
            accepted.clone(),
            redelivered.clone(),
        );
        closed_loop(p.conns, p.dur(), move |c, _, i| {
            let (pool, next, accepted, url, redelivered) = (
                pool.clone(),
                next.clone(),
                accepted.clone(),
                url.clone(),
                redelivered.clone(),
            );
            async move {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let fresh;
                let (id, body, sig) = match pool.get(n as usize) {
                    Some(e) => e,
                    None => {
                        fresh = signed_event(n);
                        &fresh
                    }
                };
                let send = |body: Vec<u8>, sig: String| {
                    c.post(url.as_str())
                        .header("content-type", "application/json")
                        .header("stripe-signature", sig)
                        .body(body)
                        .send()
                };
                let v = expect_status(send(body.clone(), sig.clone()).await, 200).await?;
                if v["duplicate"] != false {
                    return Err(format!("a new event answered {v}"));
                }
                accepted.lock().map_err(|e| e.to_string())?.push(id.clone());
                // Every 20th event is delivered again, as Stripe retries do: must be a
                // duplicate and change nothing.
                if i % 20 == 19 {
                    let v = expect_status(send(body.clone(), sig.clone()).await, 200).await?;
                    if v["duplicate"] != true {
                        return Err(format!("a redelivery answered {v}"));
                    }
                    redelivered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        })
        .await
    };
    let cpu = cpu_secs(server.child.id()) - cpu0;
    // Verify in the database: every accepted event exactly once, nothing else.
    let accepted = std::mem::take(&mut *accepted.lock().map_err(|e| anyhow!("{e}"))?);
    let db = server.db()?;
    let mut stored = HashSet::new();
    let mut rows = 0u64;
    {
        let mut stmt = db.prepare("SELECT id FROM stripe_events")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            stored.insert(r.get::<_, String>(0)?);
            rows += 1;
        }
    }
    let mut statuses = Vec::new();
    {
        let mut stmt = db.prepare("SELECT status, COUNT(*) FROM stripe_events GROUP BY status")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            statuses.push(format!(
                "{} {}",
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?
            ));
        }
    }
    drop(db);
    server.stop();
    let missing = accepted.iter().filter(|id| !stored.contains(*id)).count();
    let distinct: HashSet<&String> = accepted.iter().collect();
    rep.check(
        format!("webhook: {} errors {:?}", load.err, load.errors),
        load.err == 0,
    );
    rep.check(
        format!(
            "webhook exactly-once: accepted {} (distinct {}), rows {rows}, missing {missing}",
            accepted.len(),
            distinct.len()
        ),
        missing == 0 && rows == accepted.len() as u64 && distinct.len() == accepted.len(),
    );
    let deliveries = load.ok + redelivered.load(Ordering::Relaxed);
    let rate = accepted.len() as f64 / load.elapsed;
    let row = rep.add("webhook", "distinct signed events stored", rate, "events/s");
    if let Some(raw) = raw {
        row.baseline("raw fsync", raw);
    }
    row.target(Target::AtLeast(10_000.0)).note(format!(
        "{} conns; verified in DB: {} events, each exactly once ({}); plus {} redeliveries answered duplicate",
        p.conns,
        accepted.len(),
        statuses.join(", "),
        redelivered.load(Ordering::Relaxed)
    ));
    rep.add(
        "webhook",
        "server CPU per delivery",
        cpu / deliveries.max(1) as f64 * 1e6,
        "us",
    )
    .note("utime+stime of the server process over the phase / deliveries (incl. redeliveries)");
    rep.add("webhook", "webhook p50", load.pct(0.5), "ms");
    rep.add("webhook", "webhook p99", load.pct(0.99), "ms");
    Ok(())
}
