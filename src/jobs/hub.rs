//! The progress hub: live job events fanned out to SSE subscribers with tokio broadcast.
//!
//! One channel per job (for `/jobs/{id}/events`) and one per user (for `/events`), made on
//! demand and dropped when nobody listens. Each job also keeps a short ring of its recent
//! events with sequence numbers, so a client reconnecting with `Last-Event-ID` gets what
//! it missed; each user channel keeps a ring of the user's recent events too, kept for
//! [`USER_RESUME_GRACE`] after its last subscriber left, so the `/events` stream resumes
//! after `Last-Event-ID` (`{job}:{seq}`) as well. Publishing never waits: a subscriber that falls behind the channel capacity
//! loses the oldest events (`Lagged`) and the stream resynchronises from the job's current
//! state, so slow clients cost neither worker time nor unbounded memory.
//!
//! Every event is rendered to its SSE frames at most once ([`JobEvent`]), by the first
//! stream that sends it; the other streams only copy references to those bytes, whatever
//! the number of subscribers. Most jobs are never watched: their events only fill the
//! ring (for a later resume) and are never rendered, and a job's broadcast channel is made
//! when the first subscriber comes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use super::frame;
use crate::storage::states::JobStatus;

/// Events kept per job for `Last-Event-ID` resume.
const RING: usize = 256;
/// Per-channel buffer before a slow subscriber lags.
const CHANNEL: usize = 128;
/// Events kept per user channel for `Last-Event-ID` resume of `/events`.
const USER_RING: usize = 512;
/// How long a user channel (and its ring) outlives its last subscriber, so a client that
/// reconnects (a dropped connection, an expired access token) resumes where it was.
pub const USER_RESUME_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum JobEventKind {
    State {
        id: String,
        status: JobStatus,
        attempt: u32,
    },
    Progress {
        id: String,
        pct: u8,
        message: String,
    },
    Done {
        id: String,
        status: JobStatus,
        result: Option<Value>,
        error: Option<String>,
    },
}

impl JobEventKind {
    pub fn name(&self) -> &'static str {
        match self {
            JobEventKind::State { .. } => "state",
            JobEventKind::Progress { .. } => "progress",
            JobEventKind::Done { .. } => "done",
        }
    }

    /// The event's data object (without the `event` tag).
    pub fn data(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.remove("event");
        }
        v
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, JobEventKind::Done { .. })
    }

    /// The job the event is about.
    pub fn job_id(&self) -> &str {
        match self {
            JobEventKind::State { id, .. }
            | JobEventKind::Progress { id, .. }
            | JobEventKind::Done { id, .. } => id,
        }
    }
}

/// One published event; its wire format (see [`super::frame`]) is rendered on first use
/// and then shared by every stream that sends it.
#[derive(Debug)]
pub struct JobEvent {
    /// Per-job sequence number, the SSE event id.
    pub seq: u64,
    /// The job's `done` event: a per-job stream ends after it.
    pub terminal: bool,
    kind: JobEventKind,
    /// (frame for `/jobs/{id}/events` (`id: {seq}`), frame for `/events`
    /// (`id: {job_id}:{seq}`)).
    frames: OnceLock<(Bytes, Bytes)>,
}

impl JobEvent {
    fn new(seq: u64, kind: JobEventKind) -> JobEvent {
        JobEvent {
            seq,
            terminal: kind.is_terminal(),
            kind,
            frames: OnceLock::new(),
        }
    }

    /// The frame for `/jobs/{id}/events` (`id: {seq}`).
    pub fn job_frame(&self) -> &Bytes {
        &self.frames().0
    }

    /// The frame for `/events` (`id: {job_id}:{seq}`).
    pub fn user_frame(&self) -> &Bytes {
        &self.frames().1
    }

    fn frames(&self) -> &(Bytes, Bytes) {
        self.frames.get_or_init(|| {
            let data = self.kind.data().to_string();
            frame::render_event(self.kind.job_id(), self.seq, self.kind.name(), &data)
        })
    }
}

struct JobChannel {
    /// Made by the first subscriber: most jobs never have one.
    tx: Option<broadcast::Sender<Arc<JobEvent>>>,
    ring: VecDeque<Arc<JobEvent>>,
    next_seq: u64,
    finished: bool,
}

impl JobChannel {
    fn new() -> JobChannel {
        JobChannel {
            tx: None,
            ring: VecDeque::new(),
            next_seq: 1,
            finished: false,
        }
    }

    fn receivers(&self) -> usize {
        self.tx
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }
}

/// One user's channel: made by their first subscriber, kept for [`USER_RESUME_GRACE`]
/// after the last one left.
struct UserChannel {
    tx: broadcast::Sender<Arc<JobEvent>>,
    /// The user's events published since the channel was made, the newest last.
    ring: VecDeque<Arc<JobEvent>>,
    /// Since when nobody listens (set by the sweep).
    idle_since: Option<Instant>,
}

#[derive(Default)]
struct Channels {
    jobs: HashMap<String, JobChannel>,
    users: HashMap<String, UserChannel>,
}

#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<Channels>>,
}

impl Hub {
    /// Publishes an event of `job_id` (owned by `user_id`) to its subscribers.
    ///
    /// Nothing is rendered here (see [`JobEvent`]); under the lock the event only gets its
    /// sequence number and goes into the ring and the channels.
    pub fn publish(&self, job_id: &str, user_id: Option<&str>, kind: JobEventKind) {
        let terminal = kind.is_terminal();
        let Ok(mut ch) = self.inner.lock() else {
            return;
        };
        let job = match ch.jobs.get_mut(job_id) {
            Some(job) => job,
            None => ch
                .jobs
                .entry(job_id.to_string())
                .or_insert_with(JobChannel::new),
        };
        let event = Arc::new(JobEvent::new(job.next_seq, kind));
        job.next_seq += 1;
        if job.ring.len() == RING {
            job.ring.pop_front();
        }
        job.ring.push_back(event.clone());
        job.finished = terminal;
        if let Some(tx) = &job.tx {
            let _ = tx.send(event.clone());
        }
        if let Some(uid) = user_id
            && let Some(user) = ch.users.get_mut(uid)
        {
            if user.ring.len() == USER_RING {
                user.ring.pop_front();
            }
            user.ring.push_back(event.clone());
            // Nobody listening right now is fine: the ring keeps it for a resume.
            let _ = user.tx.send(event);
        }
    }

    /// Subscribes to one job: returns the events after `after_seq` still in the ring
    /// (replay), and the live receiver. Both are taken under one lock, so nothing falls
    /// between them.
    pub fn subscribe_job(
        &self,
        job_id: &str,
        after_seq: Option<u64>,
    ) -> (Vec<Arc<JobEvent>>, broadcast::Receiver<Arc<JobEvent>>, bool) {
        let Ok(mut ch) = self.inner.lock() else {
            return (Vec::new(), broadcast::channel(1).1, false);
        };
        let job = ch
            .jobs
            .entry(job_id.to_string())
            .or_insert_with(JobChannel::new);
        let replay: Vec<Arc<JobEvent>> = match after_seq {
            Some(after) => job.ring.iter().filter(|e| e.seq > after).cloned().collect(),
            None => Vec::new(),
        };
        // `true` if the ring covers everything after `after_seq` (no gap to fill from DB).
        let complete = match (after_seq, job.ring.front()) {
            (Some(after), Some(first)) => first.seq <= after + 1,
            (Some(_), None) => job.next_seq == 1,
            (None, _) => false,
        };
        let rx = job
            .tx
            .get_or_insert_with(|| broadcast::channel(CHANNEL).0)
            .subscribe();
        (replay, rx, complete)
    }

    pub fn subscribe_user(&self, user_id: &str) -> broadcast::Receiver<Arc<JobEvent>> {
        self.resume_user(user_id, None).1
    }

    /// Subscribes to a user's events, resuming after the event `after` (job id, sequence
    /// number): returns the user's events published after it (replay), the live receiver,
    /// and whether the replay is exact (`after` is still in the user's ring, so nothing
    /// between it and the live events is missing). Taken under one lock.
    pub fn resume_user(
        &self,
        user_id: &str,
        after: Option<(&str, u64)>,
    ) -> (Vec<Arc<JobEvent>>, broadcast::Receiver<Arc<JobEvent>>, bool) {
        let Ok(mut ch) = self.inner.lock() else {
            return (Vec::new(), broadcast::channel(1).1, false);
        };
        let user = ch
            .users
            .entry(user_id.to_string())
            .or_insert_with(|| UserChannel {
                tx: broadcast::channel(CHANNEL * 4).0,
                ring: VecDeque::new(),
                idle_since: None,
            });
        user.idle_since = None;
        let position = after.and_then(|(job, seq)| {
            user.ring
                .iter()
                .rposition(|e| e.seq == seq && e.kind.job_id() == job)
        });
        let replay = match position {
            Some(i) => user.ring.iter().skip(i + 1).cloned().collect(),
            None => Vec::new(),
        };
        (replay, user.tx.subscribe(), position.is_some())
    }

    /// The sequence number the next event of this job will get (0 if the job is unknown).
    pub fn last_seq(&self, job_id: &str) -> u64 {
        self.inner
            .lock()
            .ok()
            .and_then(|ch| ch.jobs.get(job_id).map(|j| j.next_seq - 1))
            .unwrap_or(0)
    }

    /// Drops channels nobody listens to: finished jobs, and users without subscribers.
    /// Called periodically; unfinished jobs keep their ring for resume.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    /// [`Hub::sweep`] at `now`: a user channel goes once nobody listened to it for
    /// [`USER_RESUME_GRACE`].
    fn sweep_at(&self, now: Instant) {
        if let Ok(mut ch) = self.inner.lock() {
            ch.jobs.retain(|_, j| !(j.finished && j.receivers() == 0));
            ch.users.retain(|_, u| {
                if u.tx.receiver_count() > 0 {
                    u.idle_since = None;
                    return true;
                }
                let since = *u.idle_since.get_or_insert(now);
                now.saturating_duration_since(since) < USER_RESUME_GRACE
            });
        }
    }

    /// Forgets a job entirely (e.g. it was deleted).
    pub fn forget(&self, job_id: &str) {
        if let Ok(mut ch) = self.inner.lock() {
            ch.jobs.remove(job_id);
        }
    }

    pub fn channel_count(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map(|c| (c.jobs.len(), c.users.len()))
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A progress event of job `j` (also used by the SSE tests).
    pub(crate) fn progress(pct: u8) -> JobEventKind {
        JobEventKind::Progress {
            id: "j".into(),
            pct,
            message: String::new(),
        }
    }

    #[tokio::test]
    async fn subscribers_get_events_in_order_and_resume_from_ring() {
        let hub = Hub::default();
        let (_, mut rx, _) = hub.subscribe_job("j", None);
        let mut user_rx = hub.subscribe_user("u");
        for p in 1..=3 {
            hub.publish("j", Some("u"), progress(p));
        }
        for want in 1..=3u64 {
            assert_eq!(rx.recv().await.expect("event").seq, want);
            assert_eq!(user_rx.recv().await.expect("event").seq, want);
        }
        let (replay, _, complete) = hub.subscribe_job("j", Some(1));
        assert_eq!(replay.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(complete);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_instead_of_blocking() {
        let hub = Hub::default();
        let (_, mut rx, _) = hub.subscribe_job("j", None);
        for p in 0..(CHANNEL as u32 * 3) {
            hub.publish("j", None, progress((p % 100) as u8));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        // The ring is bounded too.
        let (replay, _, complete) = hub.subscribe_job("j", Some(0));
        assert_eq!(replay.len(), RING);
        assert!(
            !complete,
            "events before the ring are gone: resync from state"
        );
    }

    #[tokio::test]
    async fn events_are_rendered_once_for_both_streams() {
        let hub = Hub::default();
        let (_, mut rx, _) = hub.subscribe_job("j", None);
        let mut user_rx = hub.subscribe_user("u");
        hub.publish(
            "j",
            Some("u"),
            JobEventKind::State {
                id: "j".into(),
                status: JobStatus::Running,
                attempt: 2,
            },
        );
        let e = rx.recv().await.expect("event");
        let data = r#"{"attempt":2,"id":"j","status":"running"}"#;
        assert_eq!(
            std::str::from_utf8(e.job_frame()).expect("utf-8"),
            format!("id: 1\nevent: state\ndata: {data}\n\n")
        );
        assert_eq!(
            std::str::from_utf8(e.user_frame()).expect("utf-8"),
            format!("id: j:1\nevent: state\ndata: {data}\n\n")
        );
        assert!(!e.terminal);
        // Every subscriber shares the same bytes.
        let u = user_rx.recv().await.expect("event");
        assert!(Arc::ptr_eq(&e, &u));
        hub.publish(
            "j",
            Some("u"),
            JobEventKind::Done {
                id: "j".into(),
                status: JobStatus::Succeeded,
                result: Some(serde_json::json!({"n": 1})),
                error: None,
            },
        );
        let done = rx.recv().await.expect("event");
        assert!(done.terminal);
        assert_eq!(
            std::str::from_utf8(done.job_frame()).expect("utf-8"),
            "id: 2\nevent: done\ndata: {\"error\":null,\"id\":\"j\",\"result\":{\"n\":1},\"status\":\"succeeded\"}\n\n"
        );
    }

    #[test]
    fn an_unwatched_job_gets_no_channel_and_its_events_are_rendered_on_first_use() {
        let hub = Hub::default();
        hub.publish("j", Some("u"), progress(5));
        let no_channel = hub
            .inner
            .lock()
            .map(|ch| ch.jobs.get("j").is_some_and(|j| j.tx.is_none()))
            .expect("lock");
        assert!(no_channel, "no broadcast channel before a subscriber");
        // A resume still finds the event in the ring.
        let (replay, _rx, complete) = hub.subscribe_job("j", Some(0));
        assert!(complete);
        assert_eq!(replay.len(), 1);
        assert!(replay[0].frames.get().is_none(), "not rendered at publish");
        assert_eq!(
            &replay[0].job_frame()[..],
            b"id: 1\nevent: progress\ndata: {\"id\":\"j\",\"message\":\"\",\"pct\":5}\n\n"
        );
        assert_eq!(
            &replay[0].user_frame()[..],
            b"id: j:1\nevent: progress\ndata: {\"id\":\"j\",\"message\":\"\",\"pct\":5}\n\n"
        );
        // Rendered once: the second look returns the same bytes.
        assert_eq!(
            replay[0].job_frame().as_ptr(),
            replay[0].job_frame().as_ptr()
        );
    }

    #[test]
    fn a_user_stream_resumes_from_the_user_ring_until_the_grace_ends() {
        let hub = Hub::default();
        let other = |pct| JobEventKind::Progress {
            id: "k".into(),
            pct,
            message: String::new(),
        };
        let rx = hub.subscribe_user("u");
        hub.publish("j", Some("u"), progress(1));
        hub.publish("k", Some("u"), other(1));
        drop(rx);
        // Published while nobody listens: still kept for a resume.
        hub.publish("j", Some("u"), progress(2));
        hub.publish("k", Some("u"), other(2));
        hub.publish("x", Some("someone-else"), progress(3));
        let (replay, _rx, exact) = hub.resume_user("u", Some(("j", 1)));
        assert!(exact);
        let got: Vec<(String, u64)> = replay
            .iter()
            .map(|e| (e.kind.job_id().to_string(), e.seq))
            .collect();
        assert_eq!(
            got,
            [("k".into(), 1), ("j".into(), 2), ("k".into(), 2)],
            "every later event of the user once, in publish order"
        );
        // An id the ring does not hold cannot resume exactly.
        let (replay, rx, exact) = hub.resume_user("u", Some(("j", 9)));
        assert!(!exact && replay.is_empty());
        drop((rx, _rx));
        let t0 = Instant::now();
        hub.sweep_at(t0);
        hub.sweep_at(t0 + USER_RESUME_GRACE / 2);
        assert_eq!(hub.channel_count().1, 1, "kept during the grace");
        hub.sweep_at(t0 + USER_RESUME_GRACE);
        assert_eq!(hub.channel_count().1, 0, "dropped after it");
        let (_, _rx, exact) = hub.resume_user("u", Some(("k", 2)));
        assert!(!exact, "a new channel knows nothing of the old one");
    }

    #[test]
    fn sweep_drops_finished_unwatched_jobs() {
        let hub = Hub::default();
        hub.publish(
            "j",
            None,
            JobEventKind::Done {
                id: "j".into(),
                status: JobStatus::Succeeded,
                result: None,
                error: None,
            },
        );
        hub.publish("k", None, progress(5));
        hub.sweep();
        assert_eq!(hub.channel_count().0, 1);
        assert_eq!(hub.last_seq("k"), 1);
    }
}
