//! Scenario `sse` (storm): many subscribers of one user's `/api/v1/events` while demo
//! jobs run, plus the SSE reader and subscriber swarm the live-progress scenario shares.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::jobs::wait_all_succeeded;
use crate::load::{User, expect_status, paced, pct_ms, register};
use crate::report::{Report, Target};
use crate::server::Server;
use crate::{Params, Paths};

/// One parsed SSE event.
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: String,
    pub at: Instant,
}

/// Reads an SSE response until `stop`, handing each event to `on_event`.
pub async fn read_sse(
    resp: reqwest::Response,
    stop: CancellationToken,
    mut on_event: impl FnMut(SseEvent),
) {
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            _ = stop.cancelled() => return,
        };
        let Some(Ok(chunk)) = chunk else { return };
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).to_string();
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                if !event.is_empty() || !data.is_empty() {
                    on_event(SseEvent {
                        event: std::mem::take(&mut event),
                        id: std::mem::take(&mut id),
                        data: std::mem::take(&mut data),
                        at,
                    });
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }
}

async fn open_events(
    client: &reqwest::Client,
    server: &Server,
    token: &str,
) -> Result<reqwest::Response> {
    let r = client
        .get(server.url("/api/v1/events"))
        .bearer_auth(token)
        .send()
        .await?;
    if r.status() != 200 {
        bail!("GET /api/v1/events: {}", r.status());
    }
    Ok(r)
}

fn status_of(data: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(data).ok()?;
    Some((
        v["id"].as_str()?.to_string(),
        v["status"].as_str()?.to_string(),
    ))
}

/// Submits no-op jobs at 200/s for the phase and returns the µs between each job's
/// `queued` and `running` events on one SSE subscriber.
pub async fn sse_start_latency(
    server: &Server,
    user: &User,
    p: &Params,
) -> Result<(Vec<u64>, usize)> {
    let stop = CancellationToken::new();
    let resp = open_events(&reqwest::Client::new(), server, &user.token).await?;
    /// Per job: when its `queued` and its `running` state event arrived.
    type Arrivals = HashMap<String, (Option<Instant>, Option<Instant>)>;
    let seen: Arc<Mutex<Arrivals>> = Default::default();
    let reader = {
        let (stop, seen) = (stop.clone(), seen.clone());
        tokio::spawn(async move {
            read_sse(resp, stop, |e| {
                if e.event != "state" {
                    return;
                }
                if let Some((id, status)) = status_of(&e.data)
                    && let Ok(mut m) = seen.lock()
                {
                    let entry = m.entry(id).or_default();
                    match status.as_str() {
                        "queued" => entry.0 = Some(e.at),
                        "running" => entry.1 = Some(e.at),
                        _ => {}
                    }
                }
            })
            .await
        })
    };
    let url = Arc::new(server.url("/api/v1/jobs"));
    let token = Arc::new(user.token.clone());
    let load = paced(2, p.dur(), Duration::from_millis(10), move |c, _, _| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            expect_status(
                c.post(url.as_str())
                    .bearer_auth(token.as_str())
                    .json(&json!({"kind": "demo", "payload": {"steps": 1, "step_ms": 0}}))
                    .send()
                    .await,
                202,
            )
            .await
            .map(|_| ())
        }
    })
    .await;
    let _ = wait_all_succeeded(server, &user.id, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let _ = reader.await;
    let m = seen.lock().map_err(|e| anyhow!("{e}"))?;
    let lat: Vec<u64> = m
        .values()
        .filter_map(|(q, r)| {
            Some(
                r.as_ref()?
                    .saturating_duration_since(*q.as_ref()?)
                    .as_micros() as u64,
            )
        })
        .collect();
    if lat.len() as u64 != load.ok {
        eprintln!(
            "  note: saw queued+running for {} of {} jobs",
            lat.len(),
            load.ok
        );
    }
    let n = lat.len();
    Ok((lat, n))
}

/// How a subscriber count is named in row labels: `20`, `1k`, `10k`.
pub fn subs_label(subs: usize) -> String {
    if subs >= 1000 {
        format!("{}k", subs / 1000)
    } else {
        subs.to_string()
    }
}

/// The server's peak RSS with `subs` streams open, against its idle RSS; at 10k
/// subscribers it carries the "< 300 MB" target.
pub fn rss_row(rep: &mut Report, name: String, peak: f64, idle: f64, subs: usize) {
    let row = rep.add("sse", &name, peak, "MiB");
    row.baseline("idle", idle);
    if subs >= 10_000 {
        row.target(Target::AtMost(300.0));
    }
}

/// N SSE subscribers of the server, each read by its own task.
pub struct Swarm<T> {
    pub readers: Vec<tokio::task::JoinHandle<Result<T, String>>>,
    /// How many got a 200 within the connect deadline, and how long connecting took.
    pub connected: usize,
    pub connect_s: f64,
}

impl<T: Send + 'static> Swarm<T> {
    /// Opens `n` streams, `url(k)` for the k-th, at most 256 connecting at once, and waits
    /// up to 60 s until all are connected. Each response goes to `read` with `stop`.
    pub async fn connect<R, Fut>(
        n: usize,
        url: impl Fn(usize) -> String,
        token: &str,
        stop: &CancellationToken,
        read: R,
    ) -> Result<Swarm<T>>
    where
        R: Fn(reqwest::Response, CancellationToken) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(0)
            .build()?;
        let connected = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(256));
        let t_connect = Instant::now();
        let mut readers = Vec::with_capacity(n);
        for k in 0..n {
            let (client, connected, gate) = (client.clone(), connected.clone(), gate.clone());
            let (url, token, stop, read) = (url(k), token.to_string(), stop.clone(), read.clone());
            readers.push(tokio::spawn(async move {
                let resp = {
                    let _permit = gate.acquire().await;
                    match client.get(url).bearer_auth(token).send().await {
                        Ok(r) if r.status() == 200 => r,
                        Ok(r) => return Err(format!("status {}", r.status())),
                        Err(e) => return Err(e.to_string()),
                    }
                };
                connected.fetch_add(1, Ordering::Relaxed);
                Ok(read(resp, stop).await)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while connected.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            if readers.iter().all(|h| h.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Swarm {
            readers,
            connected: connected.load(Ordering::Relaxed),
            connect_s: t_connect.elapsed().as_secs_f64(),
        })
    }

    pub fn all_finished(&self) -> bool {
        self.readers.iter().all(|h| h.is_finished())
    }

    /// Every reader's result; checks (as `name`) that all connected and none failed.
    pub async fn join(self, rep: &mut Report, name: &str) -> Vec<T> {
        let n = self.readers.len();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for h in self.readers {
            match h.await {
                Ok(Ok(t)) => ok.push(t),
                Ok(Err(e)) => failed.push(e),
                Err(e) => failed.push(e.to_string()),
            }
        }
        rep.check(
            format!(
                "{name}: connected {} of {n}, failed {} {:?}",
                self.connected,
                failed.len(),
                failed.iter().take(2).collect::<Vec<_>>()
            ),
            self.connected == n && failed.is_empty(),
        );
        ok
    }
}

/// 5b. SSE fan-out storm: N subscribers of one user's `/api/v1/events` while demo jobs run,
/// so every event goes to all N.
pub async fn scenario_sse(p: &Params, paths: &Paths, rep: &mut Report, subs: usize) -> Result<()> {
    eprintln!("[sse] {subs} subscribers, {} demo jobs", p.sse_jobs);
    let server = Server::start(&paths.warpbase)?;
    let user = register(&server, "sse").await?;
    let (rss_before, _) = server.rss_mib();
    let stop = CancellationToken::new();
    type Seen = Vec<(String, String, Instant)>;
    let url = server.url("/api/v1/events");
    let swarm = Swarm::connect(
        subs,
        |_| url.clone(),
        &user.token,
        &stop,
        |resp, stop| async move {
            let mut seen: Seen = Vec::new();
            read_sse(resp, stop, |e| {
                // Key by the event id (`job:seq`); remember queued states by job id.
                let kind = match (e.event.as_str(), status_of(&e.data)) {
                    ("state", Some((_, s))) if s == "queued" => "queued".to_string(),
                    (ev, _) => ev.to_string(),
                };
                seen.push((e.id, kind, e.at));
            })
            .await;
            seen
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_connected, _) = server.rss_mib();

    // The driver: one demo job every 100 ms (5 steps of 20 ms: state, 5 progress, state, done).
    let posted: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let driver = reqwest::Client::new();
    for _ in 0..p.sse_jobs {
        let r = driver
            .post(server.url("/api/v1/jobs"))
            .bearer_auth(&user.token)
            .json(&json!({"kind": "demo", "payload": {"steps": 5, "step_ms": 20}}))
            .send()
            .await;
        let at = Instant::now();
        let v = expect_status(r, 202)
            .await
            .map_err(|e| anyhow!("submit: {e}"))?;
        if let Some(id) = v["id"].as_str() {
            posted
                .lock()
                .map_err(|e| anyhow!("{e}"))?
                .insert(id.to_string(), at);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = wait_all_succeeded(&server, &user.id, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(if subs > 2000 { 2000 } else { 500 })).await;
    let (rss_after, hwm) = server.rss_mib();
    stop.cancel();
    let connect_s = swarm.connect_s;
    let all = swarm.join(rep, &format!("sse {subs}")).await;
    server.stop();

    let posted = posted.lock().map_err(|e| anyhow!("{e}"))?;
    // Delivery latency of the `queued` event: the server publishes it right before it
    // answers the POST, so arrival − POST answer is the fan-out delay (≥ 0 up to the
    // answer's own transit; earlier arrivals count as 0).
    let mut queued_lat = Vec::new();
    // Spread: arrival − first arrival of the same event over all subscribers.
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for seen in &all {
        for (id, _, at) in seen {
            first
                .entry(id.as_str())
                .and_modify(|f| *f = (*f).min(*at))
                .or_insert(*at);
        }
    }
    let mut spread = Vec::new();
    let mut complete = 0usize;
    for seen in &all {
        let mut dones = 0;
        for (id, kind, at) in seen {
            spread.push(at.saturating_duration_since(first[id.as_str()]).as_micros() as u64);
            if kind == "queued"
                && let Some((job, _)) = id.split_once(':')
                && let Some(p) = posted.get(job)
            {
                queued_lat.push(at.saturating_duration_since(*p).as_micros() as u64);
            }
            if kind == "done" {
                dones += 1;
            }
        }
        if dones == p.sse_jobs {
            complete += 1;
        }
    }
    rep.check(
        format!("sse {subs}: {complete} of {subs} subscribers got every job's done event"),
        complete == subs,
    );
    let label = subs_label(subs);
    let events: usize = all.iter().map(Vec::len).sum();
    // No target here: the target is for live progress (above). This is the stress case of
    // every tab on one user's stream, ≈ 90 events/s each (BENCHMARKS.md § SSE).
    rep.add("sse", &format!("{label} subs, one stream: delivery p99 (queued event)"), pct_ms(&mut queued_lat, 0.99), "ms")
        .note(format!(
            "{subs} subscribers of one user's /api/v1/events, {} jobs, {events} events delivered, connect {connect_s:.1}s",
            p.sse_jobs
        ));
    rep.add(
        "sse",
        &format!("{label} subs, one stream: delivery p50 (queued event)"),
        pct_ms(&mut queued_lat, 0.5),
        "ms",
    );
    rep.add(
        "sse",
        &format!("{label} subs, one stream: spread p99 (all events)"),
        pct_ms(&mut spread, 0.99),
        "ms",
    );
    rss_row(
        rep,
        format!("{label} subs, one stream: server RSS (peak)"),
        rss_after.max(rss_connected).max(hwm),
        rss_before,
        subs,
    );
    Ok(())
}
