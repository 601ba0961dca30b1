//! Scenario `jobs`: enqueue only, drain only, end to end (no-op and 10 ms jobs), and
//! enqueue-to-start latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::load::{User, closed_loop, expect_status, pct_ms, register};
use crate::report::{Report, Target};
use crate::server::{Server, cpu_secs};
use crate::sse::sse_start_latency;
use crate::wrk::{have_wrk, run_wrk};
use crate::{FAST_CONCURRENCY, Mode, Params, Paths};

fn rfc3339_in(d: Duration) -> String {
    (time::OffsetDateTime::now_utc() + d)
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format time")
}

/// What a submit phase did, whichever generator ran it.
pub struct Submits {
    /// Requests answered 202 with a queued job.
    pub ok: u64,
    pub err: u64,
    /// Answered submits per second.
    pub rate: f64,
    pub p99_ms: f64,
    /// Requests that may have been sent but not counted: wrk stops with a request in
    /// flight on each connection, and the server still creates those jobs.
    pub uncounted: u64,
    pub errors: Vec<String>,
    pub generator: &'static str,
}

impl Submits {
    /// Whether `created` jobs in the database agree with what the generator counted.
    fn matches(&self, created: u64) -> bool {
        (self.ok..=self.ok + self.uncounted).contains(&created)
    }
}

/// Submits demo jobs in a closed loop at `conns` connections; `run_at` parks them until
/// then. With wrk (the GET scenarios' generator: it costs the shared cores about half as
/// much per request as the built-in one), else with the built-in generator.
async fn submit_jobs(
    server: &Server,
    user: &User,
    conns: usize,
    dur: Duration,
    step_ms: u64,
    run_at: Option<String>,
) -> Result<Submits> {
    let url = server.url("/api/v1/jobs");
    let mut body = json!({"kind": "demo", "payload": {"steps": 1, "step_ms": step_ms}});
    if let Some(at) = run_at {
        body["run_at"] = json!(at);
    }
    let body = serde_json::to_string(&body)?;
    if have_wrk() {
        let token = user.token.clone();
        let secs = dur.as_secs_f64();
        let r = tokio::task::spawn_blocking(move || {
            run_wrk(&url, Some(&token), Some(&body), conns, secs)
        })
        .await??;
        let ok = r.requests.saturating_sub(r.bad);
        return Ok(Submits {
            ok,
            err: r.bad,
            rate: r.rps,
            p99_ms: r.p99,
            uncounted: conns as u64,
            errors: Vec::new(),
            generator: "wrk",
        });
    }
    let url = Arc::new(url);
    let token = Arc::new(user.token.clone());
    let body = Arc::new(body.into_bytes());
    let mut load = closed_loop(conns, dur, move |c, _, _| {
        let (url, token, body) = (url.clone(), token.clone(), body.clone());
        async move {
            let v = expect_status(
                c.post(url.as_str())
                    .bearer_auth(token.as_str())
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await,
                202,
            )
            .await?;
            if v["status"] == "queued" {
                Ok(())
            } else {
                Err(format!("job {v}"))
            }
        }
    })
    .await;
    Ok(Submits {
        ok: load.ok,
        err: load.err,
        rate: load.rate(),
        p99_ms: load.pct(0.99),
        uncounted: 0,
        errors: std::mem::take(&mut load.errors),
        generator: "builtin",
    })
}

#[derive(Debug)]
pub struct JobStats {
    pub total: u64,
    pub succeeded: u64,
    pub min_created: i64,
    pub min_started: i64,
    pub max_finished: i64,
}

pub fn job_stats(server: &Server, user_id: &str) -> Result<JobStats> {
    let db = server.db()?;
    Ok(db.query_row(
        "SELECT COUNT(*), COALESCE(SUM(status = 'succeeded'), 0), COALESCE(MIN(created_at), 0),
                COALESCE(MIN(started_at), 0), COALESCE(MAX(finished_at), 0)
         FROM jobs WHERE user_id = ?1",
        [user_id],
        |r| {
            Ok(JobStats {
                total: r.get::<_, i64>(0)? as u64,
                succeeded: r.get::<_, i64>(1)? as u64,
                min_created: r.get(2)?,
                min_started: r.get(3)?,
                max_finished: r.get(4)?,
            })
        },
    )?)
}

/// Polls the database until all of the user's jobs succeeded (or the limit passes).
pub async fn wait_all_succeeded(
    server: &Server,
    user_id: &str,
    limit: Duration,
) -> Result<JobStats> {
    let deadline = Instant::now() + limit;
    loop {
        let s = job_stats(server, user_id)?;
        if s.succeeded == s.total || Instant::now() > deadline {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `started_at - created_at` of the user's jobs, in microseconds (the columns are ms).
fn start_delays_us(server: &Server, user_id: &str) -> Result<Vec<u64>> {
    let db = server.db()?;
    let mut stmt = db.prepare(
        "SELECT started_at - created_at FROM jobs WHERE user_id = ?1 AND started_at IS NOT NULL",
    )?;
    let v = stmt
        .query_map([user_id], |r| r.get::<_, i64>(0))?
        .collect::<Result<Vec<i64>, _>>()?;
    Ok(v.into_iter().map(|ms| ms.max(0) as u64 * 1000).collect())
}

/// 4. Jobs: enqueue only, drain only, end to end (no-op and 10 ms), enqueue→start latency.
pub async fn scenario_jobs(p: &Params, paths: &Paths, rep: &mut Report) -> Result<()> {
    eprintln!("[jobs] enqueue, drain, end to end; fast queue concurrency {FAST_CONCURRENCY}");
    let server = Server::start(&paths.warpbase)?;
    let wait_limit = Duration::from_secs(if p.mode == Mode::Smoke { 20 } else { 120 });
    let cfg = format!("demo steps=1; fast queue concurrency {FAST_CONCURRENCY} (default 8)");

    // a) Enqueue only: parked with run_at in the future, so no worker competes; they all
    //    become runnable at once afterwards, which is the drain measurement.
    let parked = register(&server, "parked").await?;
    let release = Duration::from_secs_f64(p.secs + 1.5);
    let enq = submit_jobs(
        &server,
        &parked,
        p.conns,
        p.dur(),
        0,
        Some(rfc3339_in(release)),
    )
    .await?;
    rep.check(
        format!("jobs enqueue: {} errors {:?}", enq.err, enq.errors),
        enq.err == 0,
    );
    rep.add("jobs", "enqueue only (POST /jobs, 202)", enq.rate, "jobs/s")
        .note(format!(
            "{} conns ({}), parked with run_at",
            p.conns, enq.generator
        ));
    rep.add("jobs", "enqueue p99", enq.p99_ms, "ms");
    // b) Drain only: the parked backlog, from first claim to last finish.
    let s = wait_all_succeeded(&server, &parked.id, wait_limit + release).await?;
    rep.check(
        format!("jobs drain: {} of {} succeeded", s.succeeded, s.total),
        s.succeeded == s.total && enq.matches(s.total),
    );
    let drain_ms = (s.max_finished - s.min_started).max(1) as f64;
    rep.add(
        "jobs",
        "drain only (backlog → succeeded)",
        s.total as f64 / drain_ms * 1000.0,
        "jobs/s",
    )
    .note(format!("backlog of {} no-op jobs; {cfg}", s.total));

    // c) End to end: no-op jobs submitted at full speed, until all succeeded.
    let e2e = register(&server, "e2e").await?;
    let cpu0 = cpu_secs(server.child.id());
    let sub = submit_jobs(&server, &e2e, p.conns, p.dur(), 0, None).await?;
    rep.check(
        format!("jobs e2e submit: {} errors {:?}", sub.err, sub.errors),
        sub.err == 0,
    );
    let s = wait_all_succeeded(&server, &e2e.id, wait_limit).await?;
    rep.check(
        format!("jobs e2e: {} of {} succeeded", s.succeeded, s.total),
        s.succeeded == s.total && sub.matches(s.total),
    );
    let cpu = cpu_secs(server.child.id()) - cpu0;
    let span_ms = (s.max_finished - s.min_created).max(1) as f64;
    let e2e_rate = s.total as f64 / span_ms * 1000.0;
    rep.add(
        "jobs",
        "end to end no-op (enqueue → succeeded)",
        e2e_rate,
        "jobs/s",
    )
    .baseline("enqueue only", enq.rate)
    .target(Target::AtLeast(10_000.0))
    .note(format!(
        "{} conns submitting ({}); {} jobs; {cfg}",
        p.conns, sub.generator, s.total
    ));
    rep.add(
        "jobs",
        "server CPU per no-op job",
        cpu / s.total.max(1) as f64 * 1e6,
        "us",
    )
    .note("submit + claim + run + finish: utime+stime from first submit to last finish / jobs");
    let mut delays = start_delays_us(&server, &e2e.id)?;
    rep.add(
        "jobs",
        "enqueue→start p50, under e2e load (DB, ms res.)",
        pct_ms(&mut delays, 0.5),
        "ms",
    );
    rep.add(
        "jobs",
        "enqueue→start p99, under e2e load (DB, ms res.)",
        pct_ms(&mut delays, 0.99),
        "ms",
    );

    // d) Enqueue→start latency at light load, measured from SSE arrival times (µs): the
    //    `queued` and `running` state events travel the same path, so transit cancels.
    let light = register(&server, "light").await?;
    let lat = sse_start_latency(&server, &light, p).await?;
    let (mut lat, n) = lat;
    rep.add(
        "jobs",
        "enqueue→start p50, light load (SSE)",
        pct_ms(&mut lat, 0.5),
        "ms",
    )
    .target(Target::AtMost(2.0))
    .note(format!(
        "{n} jobs at 200/s; time between the job's `queued` and `running` SSE events"
    ));
    rep.add(
        "jobs",
        "enqueue→start p99, light load (SSE)",
        pct_ms(&mut lat, 0.99),
        "ms",
    );

    // e) 10 ms jobs end to end: bounded by concurrency × 100/s.
    let sleepy = register(&server, "sleepy").await?;
    let sub = submit_jobs(&server, &sleepy, p.conns, p.dur(), 10, None).await?;
    rep.check(
        format!("jobs 10ms submit: {} errors {:?}", sub.err, sub.errors),
        sub.err == 0,
    );
    let s = wait_all_succeeded(&server, &sleepy.id, wait_limit).await?;
    rep.check(
        format!("jobs 10ms: {} of {} succeeded", s.succeeded, s.total),
        s.succeeded == s.total && sub.matches(s.total),
    );
    let span_ms = (s.max_finished - s.min_created).max(1) as f64;
    let ceiling = FAST_CONCURRENCY as f64 * 100.0;
    rep.add(
        "jobs",
        "end to end 10 ms sleep jobs",
        s.total as f64 / span_ms * 1000.0,
        "jobs/s",
    )
    .baseline("ceiling", ceiling)
    .note(format!(
        "ceiling = concurrency {FAST_CONCURRENCY} × 100/s; {} jobs",
        s.total
    ));
    server.stop();
    Ok(())
}
