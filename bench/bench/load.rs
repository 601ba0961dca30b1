//! The built-in load generators (closed loop and paced), latency percentiles, and the
//! account helpers every scenario needs.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use warpbase::billing::fake_events::{self};

use crate::PASSWORD;
use crate::server::Server;

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

#[derive(Default)]
pub struct Load {
    pub ok: u64,
    pub err: u64,
    pub lat_us: Vec<u64>,
    pub elapsed: f64,
    pub errors: Vec<String>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.max(1e-9)
    }
    /// Percentile in milliseconds.
    pub fn pct(&mut self, q: f64) -> f64 {
        pct_ms(&mut self.lat_us, q)
    }
    fn merge(&mut self, other: Load) {
        self.ok += other.ok;
        self.err += other.err;
        self.lat_us.extend(other.lat_us);
        for e in other.errors {
            if self.errors.len() < 5 {
                self.errors.push(e);
            }
        }
    }
}

pub fn pct_ms(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    v[i] as f64 / 1000.0
}

/// `conns` workers, each with its own connection, each sending its next request as soon as
/// the previous one is answered, until `dur` has passed. `f(client, worker, i)` does one
/// request and says whether its answer was right.
pub async fn closed_loop<F, Fut>(conns: usize, dur: Duration, f: F) -> Load
where
    F: Fn(reqwest::Client, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    paced_or_closed(conns, dur, None, f).await
}

/// Like [`closed_loop`] but each worker sends one request per `period` (open loop);
/// latency counts from the scheduled send time, so a stall is not hidden by sending less.
pub async fn paced<F, Fut>(conns: usize, dur: Duration, period: Duration, f: F) -> Load
where
    F: Fn(reqwest::Client, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    paced_or_closed(conns, dur, Some(period), f).await
}

async fn paced_or_closed<F, Fut>(
    conns: usize,
    dur: Duration,
    period: Option<Duration>,
    f: F,
) -> Load
where
    F: Fn(reqwest::Client, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let deadline = start + dur;
    let mut handles = Vec::new();
    for w in 0..conns {
        let client = client();
        let f = f.clone();
        handles.push(tokio::spawn(async move {
            let mut load = Load {
                lat_us: Vec::with_capacity(4096),
                ..Load::default()
            };
            let mut tick = period.map(|p| {
                // Spread the workers' phases over the period.
                let offset = p.mul_f64(w as f64 / conns as f64);
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut i = 0u64;
            loop {
                let sent = match &mut tick {
                    Some(t) => t.tick().await.into_std(),
                    None => Instant::now(),
                };
                if sent >= deadline {
                    break;
                }
                match f(client.clone(), w, i).await {
                    Ok(()) => {
                        load.ok += 1;
                        load.lat_us.push(sent.elapsed().as_micros() as u64);
                    }
                    Err(e) => {
                        load.err += 1;
                        if load.errors.len() < 3 {
                            load.errors.push(e);
                        }
                    }
                }
                i += 1;
            }
            load
        }));
    }
    let mut total = Load::default();
    for h in handles {
        if let Ok(l) = h.await {
            total.merge(l);
        }
    }
    total.elapsed = start.elapsed().as_secs_f64();
    total
}

pub async fn expect_status(
    r: reqwest::Result<reqwest::Response>,
    want: u16,
) -> Result<Value, String> {
    let r = r.map_err(|e| format!("request: {e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.map_err(|e| format!("body: {e}"))?;
    if status != want {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|e| format!("json: {e}"))
}

pub struct User {
    pub id: String,
    pub email: String,
    pub token: String,
}

pub async fn register(server: &Server, name: &str) -> Result<User> {
    let email = format!("{name}-{}@bench.test", fake_events::new_id("u")).to_lowercase();
    let v = expect_status(
        reqwest::Client::new()
            .post(server.url("/api/v1/auth/register"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await,
        201,
    )
    .await
    .map_err(|e| anyhow!("register: {e}"))?;
    Ok(User {
        id: v["user"]["id"].as_str().context("user.id")?.to_string(),
        email,
        token: v["access_token"]
            .as_str()
            .context("access_token")?
            .to_string(),
    })
}
