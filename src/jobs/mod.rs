//! Jobs: the durable queue, its workers, retries, the dead-letter queue and live progress.
//!
//! Foundation stage: the handle other modules use to wake the workers after they enqueue
//! a job inside their own write transaction (`storage::jobs::insert_job`).

pub mod routes;

use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Jobs {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    wake: Notify,
}

impl Jobs {
    pub fn new() -> Jobs {
        Jobs::default()
    }

    /// Tells idle workers that a job was committed; call after the enqueueing write returns.
    pub fn notify(&self) {
        self.inner.wake.notify_waiters();
    }

    /// Resolves at the next [`Jobs::notify`].
    pub async fn woken(&self) {
        self.inner.wake.notified().await
    }
}
