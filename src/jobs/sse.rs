//! Server-sent event streams of job progress.
//!
//! `GET /api/v1/jobs/{id}/events` streams one job: a snapshot (`state`, `progress`) or the
//! events missed since `Last-Event-ID`, then live events, then `done`, after which the
//! stream closes. `GET /api/v1/events` streams every job of the user. Each stream is a
//! small task feeding a bounded channel; it ends when the client goes away or the server
//! shuts down. A subscriber that lags behind resynchronises from the database instead of
//! buffering without bound.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::hub::{JobEvent, JobEventKind};
use crate::state::AppState;
use crate::storage::jobs::{self as q, JobRow};

const KEEPALIVE: Duration = Duration::from_secs(15);

type EventStream =
    Sse<axum::response::sse::KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

fn sse(rx: mpsc::Receiver<Result<Event, Infallible>>) -> EventStream {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
}

fn event(id: String, kind: &JobEventKind) -> Result<Event, Infallible> {
    Ok(Event::default()
        .id(id)
        .event(kind.name())
        .data(kind.data().to_string()))
}

fn snapshot(row: &JobRow) -> Vec<JobEventKind> {
    let mut v = vec![
        JobEventKind::State {
            id: row.id.clone(),
            status: row.status.clone(),
            attempt: row.attempt,
        },
        JobEventKind::Progress {
            id: row.id.clone(),
            pct: row.progress_pct,
            message: row.progress_msg.clone().unwrap_or_default(),
        },
    ];
    if is_terminal(&row.status) {
        v.push(JobEventKind::Done {
            id: row.id.clone(),
            status: row.status.clone(),
            result: row
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            error: row.error.clone(),
        });
    }
    v
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "dead" | "canceled")
}

/// The stream of one job the caller may see (checked by the route).
pub fn job_stream(state: AppState, row: JobRow, last_event_id: Option<u64>) -> EventStream {
    let (tx, rx) = mpsc::channel(32);
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let hub = state.jobs.hub().clone();
        let (replay, mut live, complete) = hub.subscribe_job(&row.id, last_event_id);
        let mut sent = last_event_id.unwrap_or(0);
        if last_event_id.is_some() && complete {
            for e in replay {
                sent = e.seq;
                let terminal = e.kind.is_terminal();
                if tx.send(event(e.seq.to_string(), &e.kind)).await.is_err() || terminal {
                    return;
                }
            }
        } else if !send_snapshot(&state, &tx, &row.id, &mut sent).await {
            return;
        }
        loop {
            let next = tokio::select! {
                r = live.recv() => r,
                _ = state.shutdown.cancelled() => return,
                _ = tx.closed() => return,
            };
            match next {
                Ok(e) if e.seq <= sent => {}
                Ok(e) => {
                    sent = e.seq;
                    let terminal = e.kind.is_terminal();
                    if tx.send(event(e.seq.to_string(), &e.kind)).await.is_err() || terminal {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !send_snapshot(&state, &tx, &row.id, &mut sent).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    sse(rx)
}

/// Sends the job's current state from the database; false when the stream is over
/// (client gone, job finished, or the job vanished).
async fn send_snapshot(
    state: &AppState,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
    job_id: &str,
    sent: &mut u64,
) -> bool {
    let seq = state.jobs.hub().last_seq(job_id);
    let id = job_id.to_string();
    let Ok(Some(row)) = state.storage.read(move |c| q::get_job(c, &id)).await else {
        return false;
    };
    *sent = (*sent).max(seq);
    for kind in snapshot(&row) {
        if tx.send(event(seq.to_string(), &kind)).await.is_err() {
            return false;
        }
    }
    !is_terminal(&row.status)
}

/// Every job event of one user, starting with the state of their unfinished jobs.
pub fn user_stream(state: AppState, user_id: String) -> EventStream {
    let (tx, rx) = mpsc::channel(64);
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let mut live = state.jobs.hub().subscribe_user(&user_id);
        if !send_active(&state, &tx, &user_id).await {
            return;
        }
        loop {
            let next = tokio::select! {
                r = live.recv() => r,
                _ = state.shutdown.cancelled() => return,
                _ = tx.closed() => return,
            };
            match next {
                Ok(e) => {
                    if tx.send(user_event(&e)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !send_active(&state, &tx, &user_id).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    sse(rx)
}

fn user_event(e: &Arc<JobEvent>) -> Result<Event, Infallible> {
    event(format!("{}:{}", e.job_id, e.seq), &e.kind)
}

async fn send_active(
    state: &AppState,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
    user_id: &str,
) -> bool {
    let uid = user_id.to_string();
    let rows = state
        .storage
        .read(move |c| {
            let mut rows = Vec::new();
            for status in ["running", "queued", "retrying"] {
                rows.extend(q::list(
                    c,
                    &q::ListFilter {
                        user_id: Some(&uid),
                        status: Some(status),
                        kind: None,
                        before_id: None,
                        limit: 100,
                    },
                )?);
            }
            Ok::<_, crate::storage::StorageError>(rows)
        })
        .await
        .unwrap_or_default();
    for row in rows {
        let seq = state.jobs.hub().last_seq(&row.id);
        for kind in snapshot(&row) {
            if tx
                .send(event(format!("{}:{seq}", row.id), &kind))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    true
}
