//! The app-wide periodic schedule: job purge, upload retention, expired-token purge,
//! `[retention]` purges and the daily billing reconciliation. One task, on the shutdown
//! token; it owns no domain rule, it only says when each domain's task runs.
//!
//! Each task records when it last ran in `meta` before running, so a restart neither
//! repeats nor skips a period.

use std::time::Duration;

use crate::state::AppState;
use crate::storage::StorageError;
use crate::storage::jobs as q;

/// Starts the schedule: a round at start, then one every two leases (the cadence it had
/// as every fourth round of the jobs housekeeping, which ticks every half lease).
pub fn start(state: &AppState) {
    let s = state.clone();
    state.tasks.spawn(async move {
        let half_lease = (s.config.jobs.lease / 2).max(Duration::from_millis(200));
        let mut tick = tokio::time::interval(half_lease * 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = s.shutdown.cancelled() => return,
            }
            run_periodic(&s).await;
        }
    });
}

const HOUR: Duration = Duration::from_secs(3600);

/// Internal tasks on a schedule that survives restarts: each records when it last ran in
/// the `meta` table before running, so a restart neither repeats nor skips a period.
async fn run_periodic(state: &AppState) {
    if due(state, "jobs.purge", HOUR).await {
        purge(state).await;
    }
    if due(state, "uploads.purge", HOUR).await {
        crate::jobs::uploads::purge(state).await;
    }
    if due(state, "auth.purge_expired", HOUR).await {
        let now = state.now_millis();
        if let Err(e) = state
            .storage
            .write(move |c| crate::storage::auth::purge_expired(c, now))
            .await
        {
            tracing::warn!(error = %e, "purging expired tokens failed");
        }
    }
    if due(state, "retention", HOUR).await {
        crate::ops::retention::run(state).await;
    }
    if due(state, "billing.reconcile", 24 * HOUR).await {
        match state.billing.sync_all().await {
            Ok(r) => tracing::info!(
                customers = r.customers,
                repaired = r.applied,
                failed = r.errors,
                "daily billing reconciliation"
            ),
            Err(e) => tracing::warn!(error = %e, "daily billing reconciliation failed"),
        }
    }
}

/// True (and the run recorded) if the task `name` last ran `every` or longer ago.
async fn due(state: &AppState, name: &'static str, every: Duration) -> bool {
    let now = state.now_millis();
    let key = format!("periodic.{name}");
    let every_ms = every.as_millis() as i64;
    let claimed = state
        .storage
        .write(move |c| {
            let last = q::meta_get(c, &key)?
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(i64::MIN);
            if last != i64::MIN && now - last < every_ms {
                return Ok::<_, StorageError>(false);
            }
            q::meta_set(c, &key, &now.to_string(), now)?;
            Ok(true)
        })
        .await;
    claimed.unwrap_or(false)
}

/// Deletes finished jobs past the retention, in small batches so the writer stays fair.
async fn purge(state: &AppState) {
    let retention = state.config.jobs.retention;
    if retention.is_zero() {
        return;
    }
    let before = state.now_millis() - retention.as_millis() as i64;
    for _ in 0..100 {
        match state
            .storage
            .write(move |c| q::purge_finished(c, before, 500))
            .await
        {
            Ok(500) => continue,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "purging old jobs failed");
                return;
            }
        }
    }
}
