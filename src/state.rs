//! `AppState`: everything a handler or background task needs, passed explicitly.
//! One `Arc`, so a clone is one atomic increment: axum clones the state for every
//! request and extractor, and cloning ten handles each time showed in the `/me` profile
//! (~3% of server CPU). No globals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::billing::Billing;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::jobs::Jobs;
use crate::storage::Storage;

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The fields of [`AppState`], reached through `Deref` (`state.auth`, `state.config`).
pub struct Shared {
    pub config: Arc<Config>,
    pub storage: Storage,
    pub clock: SharedClock,
    pub auth: Auth,
    pub billing: Billing,
    pub jobs: Jobs,
    /// SSE tickets and open streams.
    pub events: crate::events::Events,
    /// Cancelled when the process starts shutting down: streams end, workers stop claiming.
    pub shutdown: CancellationToken,
    /// Every background task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: crate::ops::Metrics,
    ready: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Arc<Config>,
        storage: Storage,
        clock: SharedClock,
        auth: Auth,
        billing: Billing,
        jobs: Jobs,
        metrics: crate::ops::Metrics,
        tasks: TaskTracker,
    ) -> AppState {
        AppState(Arc::new(Shared {
            config,
            storage,
            clock,
            auth,
            billing,
            jobs,
            events: crate::events::Events::new(),
            shutdown: CancellationToken::new(),
            tasks,
            metrics,
            ready: AtomicBool::new(false),
        }))
    }

    pub fn now_millis(&self) -> i64 {
        self.clock.now_millis()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.shutdown.is_cancelled()
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}
