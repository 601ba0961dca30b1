//! Server-sent event streams of job progress.
//!
//! `GET /api/v1/jobs/{id}/events` streams one job: a snapshot (`state`, `progress`) or the
//! events missed since `Last-Event-ID`, then live events, then `done`, after which the
//! stream closes. `GET /api/v1/events` streams every job of the user, resuming after
//! `Last-Event-ID` from the hub's user ring, or from a snapshot announced by a `resync`
//! event when the ring no longer holds that id. A stream ends when the client goes away,
//! the server shuts down, or its credential ends ([`super::guard`]): at the access token's
//! expiry it sends a last `reconnect` event first, so the client reconnects with a fresh
//! ticket and its last event id; a revoked session just ends it. A subscriber that lags
//! behind resynchronises from the database instead of buffering without bound.
//!
//! Fan-out to thousands of subscribers is the hot path, so a stream does as little as it
//! can per event: the response body reads the hub's broadcast receiver itself (no task and
//! channel per subscriber), writes the frames the hub rendered once at publish
//! ([`super::frame`]), and joins the events already waiting into one chunk (bounded by
//! [`frame::MAX_CHUNK`]), so a subscriber that fell behind catches up with one wake-up and
//! few writes instead of one per event. Its keep-alive timer and shutdown listener are
//! registered once per stream, not once per event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::guard::{EndReason, Guard};
use crate::identity::Grant;
use crate::jobs::frame::{self, Batch};
use crate::jobs::hub::{JobEvent, JobEventKind};
use crate::state::AppState;
use crate::storage::jobs::{self as q, JobRow};
use crate::storage::states::JobStatus;

/// A `: keepalive` comment goes out after this long without any other write.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// The last event of a stream ended at the access token's expiry: reconnect with a fresh
/// ticket (and the last event id). It has no `id:`, so the client's last id stays.
pub const RECONNECT: &[u8] = b"event: reconnect\ndata: {\"reason\":\"token_expired\"}\n\n";

/// Sent on `/events` before a snapshot that replaces events the stream could not deliver
/// (a `Last-Event-ID` no longer in the ring, or the subscriber lagged): jobs that finished
/// meanwhile are not in it, so the client re-reads its list.
pub const RESYNC: &[u8] = b"event: resync\ndata: {}\n\n";

type Rx = broadcast::Receiver<Arc<JobEvent>>;

/// The stream of one job the caller may see (checked by the route).
///
/// Subscribes at once, before the response goes out, so the client gets every event
/// published after its request was answered; the database snapshot is read when the body
/// is first polled (after subscribing, so nothing falls between the two).
pub fn job_stream(
    state: AppState,
    grant: Grant,
    row: JobRow,
    last_event_id: Option<u64>,
) -> Response {
    let guard = state.events.streams().register(grant, &state.shutdown);
    // An id beyond anything this process published comes from before a restart (the
    // sequence starts again at 1): start from the job's state instead of skipping the
    // new events up to it. (Sequence numbers only grow, so checking first is safe.)
    let last_event_id = last_event_id.filter(|&l| l <= state.jobs.hub().last_seq(&row.id));
    let (replay, live, complete) = state.jobs.hub().subscribe_job(&row.id, last_event_id);
    let mut sent = last_event_id.unwrap_or(0);
    let mut queued = VecDeque::new();
    let mut resync = true;
    let mut end_after_queued = false;
    if last_event_id.is_some() && complete {
        resync = false;
        for e in replay {
            sent = e.seq;
            queued.push_back(e.job_frame().clone());
            if e.terminal {
                end_after_queued = true;
                break;
            }
        }
    }
    let sub = Subscriber {
        live: Live::new(live, Cursor::Job { sent }, guard.token()),
        guard: Some(guard),
        finished: false,
        target: Target::Job(row.id),
        state,
        queued,
        resync,
        end_after_queued,
    };
    respond(sub)
}

/// Every job event of one user: after `resume` (the `Last-Event-ID`, `Some(None)` when it
/// did not parse) if the user ring still holds it, else starting with the state of their
/// unfinished jobs (announced by `resync` when a resume was asked for).
pub fn user_stream(
    state: AppState,
    grant: Grant,
    resume: Option<Option<(String, u64)>>,
) -> Response {
    let user_id = grant.principal.user_id.clone();
    let guard = state.events.streams().register(grant, &state.shutdown);
    let after = resume
        .as_ref()
        .and_then(|r| r.as_ref())
        .map(|(job, seq)| (job.as_str(), *seq));
    let (replay, live, exact) = state.jobs.hub().resume_user(&user_id, after);
    let mut queued = VecDeque::new();
    if exact {
        queued.extend(replay.iter().map(|e| e.user_frame().clone()));
    } else if resume.is_some() {
        queued.push_back(Bytes::from_static(RESYNC));
    }
    let sub = Subscriber {
        live: Live::new(live, Cursor::User, guard.token()),
        guard: Some(guard),
        finished: false,
        target: Target::User(user_id),
        state,
        queued,
        resync: !exact,
        end_after_queued: false,
    };
    respond(sub)
}

/// The `text/event-stream` response whose body is the subscriber's chunks.
fn respond(sub: Subscriber) -> Response {
    let body = futures_util::stream::unfold(sub, |mut sub| async move {
        let chunk = sub.next_chunk().await?;
        Some((Ok::<_, Infallible>(chunk), sub))
    })
    .fuse();
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Whose events a stream carries (for its database snapshots).
enum Target {
    Job(String),
    User(String),
}

/// One SSE connection: frames waiting to go out (replay, snapshots), then live events.
struct Subscriber {
    state: AppState,
    target: Target,
    live: Live,
    /// Ends the stream with its credential (its token is what `live` listens to).
    guard: Option<Guard>,
    /// The stream is over (its last frame, if any, went out).
    finished: bool,
    /// Frames to send before reading live events again: the `Last-Event-ID` replay or a
    /// snapshot from the database.
    queued: VecDeque<Bytes>,
    /// Read a snapshot from the database first (at the start, and after lagging).
    resync: bool,
    /// The stream ends once `queued` is sent: it holds the job's terminal state.
    end_after_queued: bool,
}

impl Subscriber {
    /// The next body chunk, or None when the stream is over.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        loop {
            // An atomic load: a stream whose credential ended stops even while events
            // keep it busy.
            if self.ended_by_guard() {
                return self.finish();
            }
            if self.resync {
                self.resync = false;
                let snap = tokio::select! {
                    biased;
                    () = self.live.shutdown.as_mut() => return self.finish(),
                    s = read_snapshot(&self.state, &self.target) => s,
                };
                if !self.apply(snap) {
                    self.end_after_queued = true;
                }
            }
            if !self.queued.is_empty() {
                let mut batch = Batch::default();
                while !batch.is_full()
                    && let Some(f) = self.queued.pop_front()
                {
                    batch.push(&f);
                }
                if let Some(chunk) = batch.take() {
                    self.live.wrote();
                    return Some(chunk);
                }
            }
            if self.end_after_queued {
                return self.finish();
            }
            match self.live.next().await {
                Next::Chunk(chunk) => return Some(chunk),
                Next::Resync => {
                    self.resync = true;
                    if matches!(self.target, Target::User(_)) {
                        self.queued.push_back(Bytes::from_static(RESYNC));
                    }
                }
                Next::End => return self.finish(),
            }
        }
    }

    fn ended_by_guard(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.reason().is_some())
    }

    /// Ends the stream: with a last `reconnect` event if the access token expired.
    fn finish(&mut self) -> Option<Bytes> {
        self.finished = true;
        match self.guard.as_ref().and_then(Guard::reason) {
            Some(EndReason::Expired) => Some(Bytes::from_static(RECONNECT)),
            Some(EndReason::Revoked) | None => None,
        }
    }

    /// Queues a snapshot; false when the stream should end after it (the job finished
    /// or vanished).
    fn apply(&mut self, snap: Snapshot) -> bool {
        match snap {
            Snapshot::Job(None) => false,
            Snapshot::Job(Some((seq, frames, goes_on))) => {
                if let Cursor::Job { sent } = &mut self.live.cursor {
                    *sent = (*sent).max(seq);
                }
                self.queued.push_back(frames);
                goes_on
            }
            Snapshot::User(frames) => {
                self.queued.extend(frames);
                true
            }
        }
    }
}

/// The current state from the database, rendered for one stream.
enum Snapshot {
    /// The job's sequence number, its frames, and whether it is unfinished; None if the
    /// job is gone (or unreadable).
    Job(Option<(u64, Bytes, bool)>),
    /// The user's unfinished jobs, one chunk of frames per job.
    User(Vec<Bytes>),
}

async fn read_snapshot(state: &AppState, target: &Target) -> Snapshot {
    match target {
        Target::Job(id) => Snapshot::Job(job_snapshot(state, id).await),
        Target::User(uid) => Snapshot::User(active_snapshot(state, uid).await),
    }
}

/// A job's state from the database as frames with the hub's current sequence number, and
/// whether the job is still unfinished; None if the job is gone (or unreadable).
async fn job_snapshot(state: &AppState, job_id: &str) -> Option<(u64, Bytes, bool)> {
    // The sequence number is read first: everything up to it is in the row read after.
    let seq = state.jobs.hub().last_seq(job_id);
    let id = job_id.to_string();
    let row = state
        .storage
        .read(move |c| q::get_job(c, &id))
        .await
        .ok()
        .flatten()?;
    let frames = snapshot_frames(&row, format_args!("{seq}"));
    Some((seq, frames, !row.status.is_terminal()))
}

/// The state of the user's unfinished jobs, one chunk of frames per job.
async fn active_snapshot(state: &AppState, user_id: &str) -> Vec<Bytes> {
    let uid = user_id.to_string();
    let rows = state
        .storage
        .read(move |c| {
            let mut rows = Vec::new();
            for status in [JobStatus::Running, JobStatus::Queued, JobStatus::Retrying] {
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
    rows.iter()
        .map(|row| {
            let seq = state.jobs.hub().last_seq(&row.id);
            snapshot_frames(row, format_args!("{}:{seq}", row.id))
        })
        .collect()
}

/// `state`, `progress` (and `done` if final) of a job row, all with the event id `id`.
fn snapshot_frames(row: &JobRow, id: std::fmt::Arguments<'_>) -> Bytes {
    let mut out = BytesMut::new();
    for kind in snapshot(row) {
        frame::write_event(&mut out, id, kind.name(), &kind.data().to_string());
    }
    out.freeze()
}

fn snapshot(row: &JobRow) -> Vec<JobEventKind> {
    let mut v = vec![
        JobEventKind::State {
            id: row.id.clone(),
            status: row.status,
            attempt: row.attempt,
        },
        JobEventKind::Progress {
            id: row.id.clone(),
            pct: row.progress_pct,
            message: row.progress_msg.clone().unwrap_or_default(),
        },
    ];
    if row.status.is_terminal() {
        v.push(JobEventKind::Done {
            id: row.id.clone(),
            status: row.status,
            result: row
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str(r).ok()),
            error: row.error.clone(),
        });
    }
    v
}

/// Which frame of an event a stream sends, and which events it has already sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// A per-job stream: job frames with a sequence number above `sent` (a snapshot or
    /// replay already covered the rest); it ends with the terminal event.
    Job { sent: u64 },
    /// A per-user stream: every event's user frame.
    User,
}

impl Cursor {
    /// The frame to send for `e`, if any, and whether the stream ends after it.
    fn accept<'e>(&mut self, e: &'e JobEvent) -> Option<(&'e Bytes, bool)> {
        match self {
            Cursor::Job { sent } if e.seq <= *sent => None,
            Cursor::Job { sent } => {
                *sent = e.seq;
                Some((e.job_frame(), e.terminal))
            }
            Cursor::User => Some((e.user_frame(), false)),
        }
    }
}

/// Why [`drain`] stopped adding to the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Nothing more is ready.
    Empty,
    /// The batch reached its size bound; more may be ready.
    Full,
    /// Events were lost (the subscriber fell a channel's capacity behind): resynchronise
    /// from the database after sending what the batch holds.
    Lagged,
    /// The stream is over after the batch: the job's terminal event, or the channel closed.
    End,
}

/// Adds `first` and then every event the receiver already holds to `batch`, without
/// waiting, until nothing is ready, the batch is full, events were lost, or the stream
/// ends. Never blocks the publisher: it only reads what is already in the channel.
fn drain(
    rx: &mut Rx,
    cursor: &mut Cursor,
    first: Result<Arc<JobEvent>, RecvError>,
    batch: &mut Batch,
) -> Stop {
    let mut item = first.map_err(|e| match e {
        RecvError::Lagged(n) => TryRecvError::Lagged(n),
        RecvError::Closed => TryRecvError::Closed,
    });
    loop {
        match item {
            Ok(e) => {
                if let Some((f, last)) = cursor.accept(&e) {
                    batch.push(f);
                    if last {
                        return Stop::End;
                    }
                }
                if batch.is_full() {
                    return Stop::Full;
                }
            }
            Err(TryRecvError::Empty) => return Stop::Empty,
            Err(TryRecvError::Lagged(_)) => return Stop::Lagged,
            Err(TryRecvError::Closed) => return Stop::End,
        }
        item = rx.try_recv();
    }
}

/// What reading the live channel produced.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Frames (or a keep-alive comment) to write.
    Chunk(Bytes),
    /// The subscriber lagged: send a snapshot, then go on.
    Resync,
    /// The stream is over (terminal event sent, channel closed, or server shutting down).
    End,
}

/// The live part of a stream: the broadcast receiver, keep-alive and shutdown.
struct Live {
    rx: Rx,
    cursor: Cursor,
    /// Shutdown, registered once for the stream's life. A child of the server's token:
    /// polling a token's future locks that token's mutex, so thousands of streams polling
    /// the one server-wide token would serialise on one lock across cores; a child has its
    /// own.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Fires at the earliest moment a keep-alive may be due; re-armed only when it fires,
    /// not on every write (each write just records `last_write`).
    keepalive: Pin<Box<Sleep>>,
    last_write: Instant,
    /// How the previous drain stopped, when that still has to be acted on after its batch
    /// was sent (a lag or the end).
    after: Option<Next>,
}

impl Live {
    fn new(rx: Rx, cursor: Cursor, shutdown: CancellationToken) -> Live {
        let now = Instant::now();
        Live {
            rx,
            cursor,
            shutdown: Box::pin(shutdown.child_token().cancelled_owned()),
            keepalive: Box::pin(tokio::time::sleep_until(now + KEEPALIVE)),
            last_write: now,
            after: None,
        }
    }

    /// Records a write (the keep-alive interval starts again).
    fn wrote(&mut self) {
        self.last_write = Instant::now();
    }

    /// Waits for live events and returns every one already available as one chunk.
    async fn next(&mut self) -> Next {
        if let Some(after) = self.after.take() {
            return after;
        }
        loop {
            // Events first: when one is ready, neither the shutdown token (a mutex) nor the
            // timer is touched. Shutdown is seen as soon as the stream has caught up, and
            // what it is behind is bounded by the channel capacity.
            let first = tokio::select! {
                biased;
                r = self.rx.recv() => r,
                () = self.shutdown.as_mut() => return Next::End,
                () = self.keepalive.as_mut() => {
                    let now = Instant::now();
                    let due = self.last_write + KEEPALIVE;
                    if now >= due {
                        self.last_write = now;
                        self.keepalive.as_mut().reset(now + KEEPALIVE);
                        return Next::Chunk(Bytes::from_static(frame::KEEPALIVE));
                    }
                    self.keepalive.as_mut().reset(due);
                    continue;
                }
            };
            let mut batch = Batch::default();
            let stop = drain(&mut self.rx, &mut self.cursor, first, &mut batch);
            let then = match stop {
                Stop::Empty | Stop::Full => None,
                Stop::Lagged => Some(Next::Resync),
                Stop::End => Some(Next::End),
            };
            match batch.take() {
                Some(chunk) => {
                    self.after = then;
                    self.wrote();
                    return Next::Chunk(chunk);
                }
                None => {
                    if let Some(then) = then {
                        return then;
                    }
                    // Everything ready was already sent (a per-job stream skips what its
                    // snapshot covered): wait again.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::hub::Hub;
    use crate::jobs::hub::tests::progress;

    fn done() -> JobEventKind {
        JobEventKind::Done {
            id: "j".into(),
            status: JobStatus::Succeeded,
            result: None,
            error: None,
        }
    }

    fn ids(chunk: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(chunk)
            .lines()
            .filter_map(|l| l.strip_prefix("id: ").map(str::to_string))
            .collect()
    }

    fn live(hub: &Hub, cursor: Cursor) -> (Live, CancellationToken) {
        let rx = match cursor {
            Cursor::Job { .. } => hub.subscribe_job("j", None).1,
            Cursor::User => hub.subscribe_user("u"),
        };
        let token = CancellationToken::new();
        (Live::new(rx, cursor, token.clone()), token)
    }

    #[tokio::test]
    async fn ready_events_are_coalesced_into_one_chunk() {
        let hub = Hub::default();
        let (mut job, _t1) = live(&hub, Cursor::Job { sent: 0 });
        let (mut user, _t2) = live(&hub, Cursor::User);
        for p in 1..=5 {
            hub.publish("j", Some("u"), progress(p));
        }
        let Next::Chunk(c) = job.next().await else {
            panic!("a chunk")
        };
        assert_eq!(ids(&c), ["1", "2", "3", "4", "5"]);
        let Next::Chunk(c) = user.next().await else {
            panic!("a chunk")
        };
        assert_eq!(ids(&c), ["j:1", "j:2", "j:3", "j:4", "j:5"]);
        // A single ready event is passed on without a copy.
        hub.publish("j", Some("u"), progress(6));
        let Next::Chunk(c) = job.next().await else {
            panic!("a chunk")
        };
        assert_eq!(ids(&c), ["6"]);
        let (_, mut rx, _) = hub.subscribe_job("j", Some(5));
        hub.publish("j", None, progress(7));
        let e = rx.recv().await.expect("event");
        let Next::Chunk(c) = job.next().await else {
            panic!("a chunk")
        };
        assert_eq!(c.as_ptr(), e.job_frame().as_ptr());
    }

    #[tokio::test]
    async fn a_per_job_stream_skips_what_it_sent_and_ends_at_done() {
        let hub = Hub::default();
        let (mut job, _t) = live(&hub, Cursor::Job { sent: 2 });
        for p in 1..=3 {
            hub.publish("j", None, progress(p));
        }
        hub.publish("j", None, done());
        hub.publish("j", None, progress(99));
        let Next::Chunk(c) = job.next().await else {
            panic!("a chunk")
        };
        assert_eq!(
            ids(&c),
            ["3", "4"],
            "1 and 2 were covered, nothing after done"
        );
        assert!(String::from_utf8_lossy(&c).contains("event: done"));
        assert_eq!(job.next().await, Next::End);
    }

    #[test]
    fn drain_stops_at_the_size_bound_and_resumes() {
        let hub = Hub::default();
        let (_, mut rx, _) = hub.subscribe_job("j", None);
        let long = "x".repeat(1000);
        let n = 40; // 40 KB of frames, more than two chunks
        for _ in 0..n {
            hub.publish(
                "j",
                None,
                JobEventKind::Progress {
                    id: "j".into(),
                    pct: 1,
                    message: long.clone(),
                },
            );
        }
        let mut cursor = Cursor::Job { sent: 0 };
        let mut got = Vec::new();
        loop {
            let mut batch = Batch::default();
            let first = rx.try_recv().map_err(|_| RecvError::Closed);
            let Ok(first) = first else { break };
            let stop = drain(&mut rx, &mut cursor, Ok(first), &mut batch);
            let chunk = batch.take().expect("chunk");
            assert!(
                chunk.len() < frame::MAX_CHUNK + 1200,
                "bounded: {}",
                chunk.len()
            );
            got.extend(ids(&chunk));
            if stop == Stop::Empty {
                break;
            }
            assert_eq!(stop, Stop::Full);
        }
        let want: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "every event once, in order");
    }

    #[tokio::test]
    async fn a_lagging_subscriber_sends_what_it_has_then_resyncs() {
        let hub = Hub::default();
        let (mut user, _t) = live(&hub, Cursor::User);
        // More than the user channel holds: the oldest are lost.
        for i in 0..2000u32 {
            hub.publish("j", Some("u"), progress((i % 100) as u8));
        }
        // The first read reports the loss (nothing was drained before it).
        assert_eq!(user.next().await, Next::Resync);
        // Then what the channel still holds, in bounded chunks, never all 2000.
        let mut total = 0;
        while let Ok(Next::Chunk(c)) =
            tokio::time::timeout(Duration::from_millis(50), user.next()).await
        {
            assert!(c.len() < frame::MAX_CHUNK + 200);
            total += ids(&c).len();
        }
        assert!(total > 0 && total < 2000, "{total}");
    }

    #[test]
    fn drain_reports_a_lag_after_the_events_before_it() {
        let hub = Hub::default();
        let (_, mut rx, _) = hub.subscribe_job("j", None);
        hub.publish("j", None, progress(1));
        let first = rx.try_recv().map_err(|_| RecvError::Closed);
        // The receiver falls behind while the first event is being handled.
        for p in 0..200 {
            hub.publish("j", None, progress(p));
        }
        let mut batch = Batch::default();
        let mut cursor = Cursor::Job { sent: 0 };
        assert_eq!(drain(&mut rx, &mut cursor, first, &mut batch), Stop::Lagged);
        assert_eq!(ids(&batch.take().expect("chunk")), ["1"]);
        // A closed channel ends the stream.
        let mut batch = Batch::default();
        assert_eq!(
            drain(
                &mut rx,
                &mut Cursor::User,
                Err(RecvError::Closed),
                &mut batch
            ),
            Stop::End
        );
        assert!(batch.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_after_15_s_without_writes_and_shutdown_ends_the_stream() {
        let hub = Hub::default();
        let (mut user, token) = live(&hub, Cursor::User);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        hub.publish("j", Some("u"), progress(1));
        assert!(matches!(user.next().await, Next::Chunk(_)));
        // The keep-alive counts from the last write, not from the start.
        let Next::Chunk(k) = user.next().await else {
            panic!("keepalive")
        };
        assert_eq!(&k[..], frame::KEEPALIVE);
        assert_eq!(Instant::now() - t0, Duration::from_secs(25));
        let Next::Chunk(k) = user.next().await else {
            panic!("keepalive")
        };
        assert_eq!(&k[..], frame::KEEPALIVE);
        assert_eq!(Instant::now() - t0, Duration::from_secs(40));
        token.cancel();
        assert_eq!(user.next().await, Next::End);
    }
}
