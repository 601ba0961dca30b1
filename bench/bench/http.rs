//! Scenario `http`: authenticated `GET /api/v1/me` against axum hello world, same load
//! settings, same run.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::load::{expect_status, register};
use crate::report::{Report, Target};
use crate::server::{Server, cpu_secs, free_port};
use crate::wrk::{WrkResult, get_load};
use crate::{Params, Paths};

/// 1. Authenticated GET /api/v1/me vs axum hello world, same wrk settings, same run.
pub async fn scenario_http(p: &Params, paths: &Paths, rep: &mut Report) -> Result<()> {
    eprintln!(
        "[http] GET /api/v1/me vs hello world at {} connections",
        p.conns
    );
    let server = Server::start(&paths.warpbase)?;
    let user = register(&server, "me").await?;
    let hello_port = free_port()?;
    let mut hello = Command::new(&paths.hello)
        .arg(format!("127.0.0.1:{hello_port}"))
        .stdout(Stdio::null())
        .spawn()
        .context("starting hello")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", hello_port)).is_err() {
        if Instant::now() > deadline {
            bail!("hello did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let hello_url = format!("http://127.0.0.1:{hello_port}/");
    let me_url = server.url("/api/v1/me");
    // Check the route answers what we think before loading it.
    let me = expect_status(
        reqwest::Client::new()
            .get(&me_url)
            .bearer_auth(&user.token)
            .send()
            .await,
        200,
    )
    .await
    .map_err(|e| anyhow!("/me: {e}"))?;
    rep.check(
        "/me returns the registered user".into(),
        me["email"] == user.email.as_str(),
    );

    let (mut h, mut m) = (Vec::new(), Vec::new());
    let mut tool = "";
    // Alternate so drift in machine load hits both sides alike.
    let (mut h_cpu, mut m_cpu) = (0.0, 0.0);
    for _ in 0..p.http_rounds {
        let c0 = cpu_secs(hello.id());
        let (r, t) = get_load(&hello_url, None, p.conns, p.secs).await?;
        h_cpu += (cpu_secs(hello.id()) - c0) / (r.rps * p.secs.ceil()).max(1.0);
        h.push(r);
        let c0 = cpu_secs(server.child.id());
        let (r, t2) = get_load(&me_url, Some(&user.token), p.conns, p.secs).await?;
        m_cpu += (cpu_secs(server.child.id()) - c0) / (r.rps * p.secs.ceil()).max(1.0);
        m.push(r);
        tool = if t == t2 { t } else { "mixed" };
    }
    let rounds = p.http_rounds as f64;
    let _ = hello.kill();
    let _ = hello.wait();
    server.stop();
    let avg =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let (h_rps, m_rps) = (avg(&h, |r| r.rps), avg(&m, |r| r.rps));
    let (h_p50, m_p50) = (avg(&h, |r| r.p50), avg(&m, |r| r.p50));
    let (h_p99, m_p99) = (avg(&h, |r| r.p99), avg(&m, |r| r.p99));
    let bad: u64 = m.iter().map(|r| r.bad).sum::<u64>() + h.iter().map(|r| r.bad).sum::<u64>();
    rep.check(format!("http: {bad} non-2xx/socket errors"), bad == 0);
    let note = format!(
        "{tool}, {} conns, {} round(s) of {}s",
        p.conns,
        p.http_rounds,
        p.secs.ceil()
    );
    rep.add("http", "GET /api/v1/me throughput", m_rps, "req/s")
        .baseline("hello", h_rps)
        .ratio_target(0.5)
        .note(note);
    rep.add(
        "http",
        "GET /api/v1/me server CPU per request",
        m_cpu / rounds * 1e6,
        "us",
    )
    .baseline("hello", h_cpu / rounds * 1e6)
    .note("utime+stime of the server process over the phase / requests answered");
    rep.add("http", "GET /api/v1/me p50", m_p50, "ms")
        .baseline("hello", h_p50);
    rep.add("http", "GET /api/v1/me p99", m_p99, "ms")
        .baseline("hello", h_p99)
        .target(Target::AtMost(5.0));
    Ok(())
}
