//! Scenario `sse` (live progress): subscribers on single jobs' event streams while each
//! job reports progress at a fixed rate, and the job program that reports it
//! (`bench emit-progress`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::jobs::job_stats;
use crate::load::{expect_status, pct_ms, register};
use crate::report::{Report, Target};
use crate::server::{Server, cpu_secs};
use crate::sse::{Swarm, read_sse, rss_row, subs_label};
use crate::{LIVE_SUBS_PER_JOB, LIVE_TARGET_HZ, Params, Paths};

/// 5a. Live progress: N subscribers, each a browser tab on one job's
/// `/api/v1/jobs/{id}/events`, [`LIVE_SUBS_PER_JOB`] tabs per job, while every job reports
/// progress `hz` times a second. The jobs run a `command` kind whose program is this binary
/// ([`emit_progress`]): each `PROGRESS` line carries the wall-clock time it was printed, so
/// delivery latency is measured from the handler's report to the subscriber's read,
/// through the server's pipe reader, the hub and the SSE write. Delivery is measured in the
/// steady state (all connected, all reporting); then every job is told to end at once and
/// the time until each subscriber has its `done` is reported on its own row.
pub async fn scenario_sse_live(
    p: &Params,
    paths: &Paths,
    rep: &mut Report,
    subs: usize,
    hz: u32,
) -> Result<()> {
    let jobs = subs.div_ceil(LIVE_SUBS_PER_JOB).max(2);
    let step_ms = 1000 / u64::from(hz.max(1));
    let steps = ((p.live_secs * f64::from(hz)).round() as u64).max(3);
    eprintln!(
        "[sse live] {subs} subscribers on {jobs} jobs, {steps} progress reports each at {hz}/s"
    );
    let exe = std::env::current_exe()?;
    let extra = format!(
        r#"
[jobs.queues.live]
concurrency = {jobs}
timeout = "300s"
[jobs.kinds.bench_progress]
queue = "live"
command = [{exe:?}, "{EMIT_PROGRESS}"]
max_attempts = 1
"#,
        exe = exe.display().to_string()
    );
    let server = Server::start_with(&paths.warpbase, &extra)?;
    let user = register(&server, "live").await?;
    let (rss_before, _) = server.rss_mib();
    let go = server.dir.path().join("go");
    let stop_file = server.dir.path().join("stop");
    let driver = reqwest::Client::new();
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        // Spread the jobs' report times evenly over one interval, as unrelated jobs are.
        let offset_ms = i as u64 * step_ms / jobs as u64;
        let r = driver
            .post(server.url("/api/v1/jobs"))
            .bearer_auth(&user.token)
            .json(&json!({"kind": "bench_progress", "payload": {
                "steps": steps, "step_ms": step_ms, "offset_ms": offset_ms,
                "go": go.display().to_string(), "stop": stop_file.display().to_string(),
            }}))
            .send()
            .await;
        let v = expect_status(r, 202)
            .await
            .map_err(|e| anyhow!("submit: {e}"))?;
        ids.push(
            v["id"]
                .as_str()
                .ok_or_else(|| anyhow!("no job id in {v}"))?
                .to_string(),
        );
    }

    let stop = CancellationToken::new();
    let received = Arc::new(AtomicUsize::new(0));
    // Arrival times are taken as `Instant`s and put on the wall clock through one pair.
    let (base_instant, base_unix) = (Instant::now(), unix_micros());
    let swarm = Swarm::connect(
        subs,
        |k| server.url(&format!("/api/v1/jobs/{}/events", ids[k % jobs])),
        &user.token,
        &stop,
        {
            let received = received.clone();
            move |resp, stop| {
                let received = received.clone();
                async move {
                    let mut lat = Vec::new();
                    let mut done = None;
                    read_sse(resp, stop, |e| match e.event.as_str() {
                        "progress" => {
                            let printed = e
                                .data
                                .split_once("t=")
                                .and_then(|(_, t)| t.split(|c: char| !c.is_ascii_digit()).next())
                                .and_then(|t| t.parse::<u64>().ok());
                            if let Some(printed) = printed {
                                let at = base_unix + (e.at - base_instant).as_micros() as u64;
                                lat.push(at.saturating_sub(printed));
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        "done" => done = Some(e.at),
                        _ => {}
                    })
                    .await;
                    (lat, done)
                }
            }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_connected, _) = server.rss_mib();

    // The steady state: every subscriber connected, every job reporting. It ends when the
    // last report has arrived everywhere (or after a bound: lagging subscribers skip).
    let cpu0 = cpu_secs(server.child.id());
    std::fs::write(&go, b"go")?;
    let expected = subs as u64 * steps;
    let run = Duration::from_millis(step_ms * (steps + 1));
    let limit = Instant::now() + run + Duration::from_secs(10);
    while (received.load(Ordering::Relaxed) as u64) < expected && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_secs(server.child.id()) - cpu0;
    // Then all jobs end at once: every stream gets its `done` and closes.
    let ended = Instant::now();
    std::fs::write(&stop_file, b"stop")?;
    let limit = Instant::now() + Duration::from_secs(60);
    while !swarm.all_finished() && Instant::now() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (rss_after, hwm) = server.rss_mib();
    stop.cancel();
    let connect_s = swarm.connect_s;
    let results = swarm.join(rep, &format!("sse live {subs}")).await;
    let mut lat = Vec::new();
    let mut done_lat = Vec::new();
    let mut complete = 0usize;
    for (l, done) in results {
        if let Some(at) = done {
            complete += 1;
            done_lat.push(at.saturating_duration_since(ended).as_micros() as u64);
        }
        lat.extend(l);
    }
    let s = job_stats(&server, &user.id)?;
    server.stop();

    rep.check(
        format!("sse live {subs}: {complete} of {subs} subscribers got their job's done event"),
        complete == subs,
    );
    rep.check(
        format!(
            "sse live {subs}: {} of {} jobs succeeded",
            s.succeeded, s.total
        ),
        s.succeeded == s.total && s.total == jobs as u64,
    );
    let label = subs_label(subs);
    let delivered = lat.len() as u64;
    let row = rep.add(
        "sse",
        &format!("{label} subs, live progress {hz}/s: delivery p99"),
        pct_ms(&mut lat, 0.99),
        "ms",
    );
    row.note(format!(
        "{subs} subscribers of /api/v1/jobs/{{id}}/events, {} per job, {jobs} jobs \
         reporting progress every {step_ms} ms ({} deliveries/s); time from the \
         handler's PROGRESS line to the subscriber's read; connect {connect_s:.1}s",
        subs.div_ceil(jobs),
        subs as u64 * u64::from(hz)
    ));
    if subs >= 10_000 && hz == LIVE_TARGET_HZ {
        row.target(Target::AtMost(50.0));
    }
    rep.add(
        "sse",
        &format!("{label} subs, live progress {hz}/s: delivery p50"),
        pct_ms(&mut lat, 0.5),
        "ms",
    );
    rep.add(
        "sse",
        &format!("{label} subs, live progress {hz}/s: progress events delivered"),
        delivered as f64 / expected.max(1) as f64 * 100.0,
        "%",
    )
    .note(format!(
        "{delivered} of {expected}; a subscriber that falls behind skips to the latest progress"
    ));
    rep.add(
        "sse",
        &format!("{label} subs, live progress {hz}/s: all jobs end, done p99"),
        pct_ms(&mut done_lat, 0.99),
        "ms",
    )
    .note(format!(
        "all {jobs} jobs told to finish at once: time until each subscriber read its `done` \
         (the exit, the outcome's commit, {subs} streams ending together)"
    ));
    rep.add(
        "sse",
        &format!("{label} subs, live progress {hz}/s: server CPU per delivery"),
        cpu * 1e6 / delivered.max(1) as f64,
        "µs",
    );
    rss_row(
        rep,
        format!("{label} subs, live progress {hz}/s: server RSS (peak)"),
        rss_after.max(rss_connected).max(hwm),
        rss_before,
        subs,
    );
    Ok(())
}

/// First argument that turns this binary into the live-progress job program.
pub const EMIT_PROGRESS: &str = "emit-progress";

/// The program of the `bench_progress` command kind (run by the server, one process per
/// job). Reads `{steps, step_ms, offset_ms, go, stop}` from stdin, waits until the file
/// `go` exists (all subscribers connected), then prints `PROGRESS <pct> t=<unix µs>` every
/// `step_ms` from `offset_ms` on, waits until the file `stop` exists, and prints a JSON
/// result line.
pub fn emit_progress() -> Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let v: Value = serde_json::from_str(&input)?;
    let steps = v["steps"].as_u64().unwrap_or(10).max(1);
    let step = Duration::from_millis(v["step_ms"].as_u64().unwrap_or(100));
    let offset = Duration::from_millis(v["offset_ms"].as_u64().unwrap_or(0));
    let file = |name: &str| {
        v[name]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("payload.{name} missing"))
    };
    let (go, stop) = (file("go")?, file("stop")?);
    let wait_for = |f: &Path| {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !f.exists() {
            if Instant::now() > deadline {
                bail!("{} did not appear", f.display());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    wait_for(&go)?;
    let t0 = Instant::now() + offset;
    let mut out = std::io::stdout().lock();
    for i in 1..=steps {
        let due = t0 + step * u32::try_from(i)?;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        writeln!(out, "PROGRESS {} t={}", i * 100 / steps, unix_micros())?;
        out.flush()?;
    }
    wait_for(&stop)?;
    writeln!(out, "{{\"steps\":{steps}}}")?;
    Ok(())
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
