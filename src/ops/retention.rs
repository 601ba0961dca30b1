//! The periodic purge of `[retention]`: ended sessions, rotated refresh tokens, audit
//! entries and processed Stripe events past their configured age, each in batches of
//! [`BATCH`] rows per writer closure so other writes interleave. Owns no SQL (that is
//! `storage::retention`) and no schedule (the housekeeping task calls [`run`]).

use std::time::Duration;

use crate::state::AppState;
use crate::storage::{Conn, StorageError, retention as r};

/// Rows deleted per writer closure.
pub const BATCH: u32 = 500;
/// Batches per table and run: a backlog larger than this is finished by later runs.
const MAX_BATCHES: usize = 200;

type Purge = fn(&Conn, i64, u32) -> Result<usize, StorageError>;

/// One pass over every table with a retention; returns the rows deleted per table.
pub async fn run(state: &AppState) -> Vec<(&'static str, usize)> {
    let c = &state.config.retention;
    let tables: [(&'static str, Duration, Purge); 4] = [
        ("sessions", c.sessions, r::purge_sessions),
        (
            "refresh_history",
            c.refresh_history,
            r::purge_refresh_history,
        ),
        ("audit_log", c.audit_log, r::purge_audit_log),
        ("stripe_events", c.stripe_events, r::purge_stripe_events),
    ];
    let mut out = Vec::new();
    for (name, keep, purge) in tables {
        if keep.is_zero() {
            continue;
        }
        let before = state.now_millis().saturating_sub(keep.as_millis() as i64);
        let mut total = 0;
        for _ in 0..MAX_BATCHES {
            match state
                .storage
                .write(move |conn| purge(conn, before, BATCH))
                .await
            {
                Ok(n) => {
                    total += n;
                    if n < BATCH as usize {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(table = name, error = %e, "retention purge failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(table = name, rows = total, "retention: purged old rows");
        }
        out.push((name, total));
    }
    out
}
