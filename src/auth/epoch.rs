//! Applying user changes made by another process. The `warpbase user` CLI writes the
//! database directly; this process's auth caches would keep the old role, token version
//! and disabled flag until their TTL. Those writes bump a counter in `meta`
//! (`storage::users::AUTH_EPOCH_KEY`); this task reads it every [`POLL`] (one indexed
//! read, off the request path) and drops every auth cache when it moved, so a disabled
//! user's tokens stop working within about a second.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Auth;
use crate::storage::users;

/// How often the counter is read.
pub const POLL: Duration = Duration::from_millis(500);

impl Auth {
    /// Watches the counter until `shutdown`; spawn it on the app's task tracker.
    pub async fn watch_epoch(self, shutdown: CancellationToken) {
        let storage = &self.inner.storage;
        let mut seen = storage.read(users::auth_epoch).await.ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            match storage.read(users::auth_epoch).await {
                Ok(now) if Some(now) != seen => {
                    // Also after this process's own changes, which invalidated their keys
                    // already: one extra cold load per cached user, rare.
                    if seen.is_some() {
                        self.invalidate_all();
                    }
                    seen = Some(now);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reading the auth epoch failed"),
            }
        }
    }
}
