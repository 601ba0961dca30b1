//! The progress hub: live job events fanned out to SSE subscribers with tokio broadcast.
//!
//! One channel per job (for `/jobs/{id}/events`) and one per user (for `/events`), made on
//! demand and dropped when nobody listens. Each job also keeps a short ring of its recent
//! events with sequence numbers, so a client reconnecting with `Last-Event-ID` gets what
//! it missed. Publishing never waits: a subscriber that falls behind the channel capacity
//! loses the oldest events (`Lagged`) and the stream resynchronises from the job's current
//! state, so slow clients cost neither worker time nor unbounded memory.
//!
//! Every event is rendered to its SSE frames once, here, at publish ([`JobEvent`]); the
//! streams only copy references to those bytes, whatever the number of subscribers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use super::frame;

/// Events kept per job for `Last-Event-ID` resume.
const RING: usize = 256;
/// Per-channel buffer before a slow subscriber lags.
const CHANNEL: usize = 128;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum JobEventKind {
    State {
        id: String,
        status: String,
        attempt: u32,
    },
    Progress {
        id: String,
        pct: u8,
        message: String,
    },
    Done {
        id: String,
        status: String,
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
}

/// One published event, already in its wire format (see [`super::frame`]).
#[derive(Debug, Clone)]
pub struct JobEvent {
    /// Per-job sequence number, the SSE event id.
    pub seq: u64,
    /// The job's `done` event: a per-job stream ends after it.
    pub terminal: bool,
    /// The frame for `/jobs/{id}/events` (`id: {seq}`).
    pub job_frame: Bytes,
    /// The frame for `/events` (`id: {job_id}:{seq}`).
    pub user_frame: Bytes,
}

struct JobChannel {
    tx: broadcast::Sender<Arc<JobEvent>>,
    ring: VecDeque<Arc<JobEvent>>,
    next_seq: u64,
    finished: bool,
}

#[derive(Default)]
struct Channels {
    jobs: HashMap<String, JobChannel>,
    users: HashMap<String, broadcast::Sender<Arc<JobEvent>>>,
}

#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<Channels>>,
}

impl Hub {
    /// Publishes an event of `job_id` (owned by `user_id`) to its subscribers.
    ///
    /// The data JSON is serialised before taking the lock; only the `id:` line, which needs
    /// the sequence number, is formatted under it.
    pub fn publish(&self, job_id: &str, user_id: Option<&str>, kind: JobEventKind) {
        let data = kind.data().to_string();
        let (name, terminal) = (kind.name(), kind.is_terminal());
        let Ok(mut ch) = self.inner.lock() else {
            return;
        };
        let job = ch
            .jobs
            .entry(job_id.to_string())
            .or_insert_with(|| JobChannel {
                tx: broadcast::channel(CHANNEL).0,
                ring: VecDeque::with_capacity(16),
                next_seq: 1,
                finished: false,
            });
        let seq = job.next_seq;
        let (job_frame, user_frame) = frame::render_event(job_id, seq, name, &data);
        let event = Arc::new(JobEvent {
            seq,
            terminal,
            job_frame,
            user_frame,
        });
        job.next_seq += 1;
        if job.ring.len() == RING {
            job.ring.pop_front();
        }
        job.ring.push_back(event.clone());
        job.finished = terminal;
        let _ = job.tx.send(event.clone());
        if let Some(uid) = user_id
            && let Some(tx) = ch.users.get(uid)
            && tx.send(event).is_err()
        {
            ch.users.remove(uid);
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
            .or_insert_with(|| JobChannel {
                tx: broadcast::channel(CHANNEL).0,
                ring: VecDeque::new(),
                next_seq: 1,
                finished: false,
            });
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
        (replay, job.tx.subscribe(), complete)
    }

    pub fn subscribe_user(&self, user_id: &str) -> broadcast::Receiver<Arc<JobEvent>> {
        let Ok(mut ch) = self.inner.lock() else {
            return broadcast::channel(1).1;
        };
        ch.users
            .entry(user_id.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL * 4).0)
            .subscribe()
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
        if let Ok(mut ch) = self.inner.lock() {
            ch.jobs
                .retain(|_, j| !(j.finished && j.tx.receiver_count() == 0));
            ch.users.retain(|_, tx| tx.receiver_count() > 0);
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
mod tests {
    use super::*;

    fn progress(pct: u8) -> JobEventKind {
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
                status: "running".into(),
                attempt: 2,
            },
        );
        let e = rx.recv().await.expect("event");
        let data = r#"{"attempt":2,"id":"j","status":"running"}"#;
        assert_eq!(
            std::str::from_utf8(&e.job_frame).expect("utf-8"),
            format!("id: 1\nevent: state\ndata: {data}\n\n")
        );
        assert_eq!(
            std::str::from_utf8(&e.user_frame).expect("utf-8"),
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
                status: "succeeded".into(),
                result: Some(serde_json::json!({"n": 1})),
                error: None,
            },
        );
        let done = rx.recv().await.expect("event");
        assert!(done.terminal);
        assert_eq!(
            std::str::from_utf8(&done.job_frame).expect("utf-8"),
            "id: 2\nevent: done\ndata: {\"error\":null,\"id\":\"j\",\"result\":{\"n\":1},\"status\":\"succeeded\"}\n\n"
        );
    }

    #[test]
    fn sweep_drops_finished_unwatched_jobs() {
        let hub = Hub::default();
        hub.publish(
            "j",
            None,
            JobEventKind::Done {
                id: "j".into(),
                status: "succeeded".into(),
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
