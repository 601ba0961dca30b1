//! Live updates, at the HTTP edge: the SSE streams of job events ([`sse`]), the one-time
//! tickets that open them, and the guard that ties every open stream to the credential
//! that opened it ([`guard`]). The events themselves come from the jobs layer's hub; this
//! module only delivers them, so jobs knows nothing of sessions or streams.

pub mod guard;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use crate::identity::Grant;

/// Tickets and open streams; one per process, in `AppState`.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    /// ticket → the access token's grant, re-checked when the ticket is redeemed.
    tickets: moka::sync::Cache<String, Grant>,
    /// The open SSE streams, closed when their credential ends.
    streams: guard::StreamGuards,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            inner: Arc::new(Inner {
                tickets: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(60))
                    .build(),
                streams: guard::StreamGuards::default(),
            }),
        }
    }

    /// A single-use, 60-second ticket that authenticates one `EventSource` connection.
    /// It keeps the access token's grant: redeeming it re-checks session, token version
    /// and expiry ([`crate::auth::Auth::revalidate`]).
    pub fn issue_ticket(&self, grant: Grant) -> String {
        let ticket = crate::secrets::random_token();
        self.inner.tickets.insert(ticket.clone(), grant);
        ticket
    }

    /// Takes a ticket out (single use); None if unknown, expired or already used.
    pub fn redeem_ticket(&self, ticket: &str) -> Option<Grant> {
        self.inner.tickets.remove(ticket)
    }

    /// The open SSE streams.
    pub fn streams(&self) -> &guard::StreamGuards {
        &self.inner.streams
    }
}
