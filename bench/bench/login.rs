//! Scenario `login`: argon2 login throughput, and `/me` latency while logins flood it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use serde_json::json;

use crate::load::{closed_loop, expect_status, paced, register};
use crate::report::{Report, Target};
use crate::server::Server;
use crate::{PASSWORD, Params, Paths};

/// 2. Login (argon2) throughput, and /me latency while logins flood (isolation).
pub async fn scenario_login(p: &Params, paths: &Paths, rep: &mut Report) -> Result<()> {
    eprintln!(
        "[login] login flood at {} conns, /me probe at 500 req/s",
        p.login_conns
    );
    let server = Server::start(&paths.warpbase)?;
    let user = Arc::new(register(&server, "login").await?);
    let me_url = Arc::new(server.url("/api/v1/me"));
    let login_url = Arc::new(server.url("/api/v1/auth/login"));
    // Paced probe: 10 connections × 50 req/s. Light on its own, so its latency measures
    // interference, not its own load.
    let probe = {
        let (u, url) = (user.clone(), me_url.clone());
        move |dur: Duration| {
            let (u, url) = (u.clone(), url.clone());
            paced(10, dur, Duration::from_millis(20), move |c, _, _| {
                let (u, url) = (u.clone(), url.clone());
                async move {
                    expect_status(c.get(url.as_str()).bearer_auth(&u.token).send().await, 200)
                        .await
                        .map(|_| ())
                }
            })
        }
    };
    let mut quiet = probe(p.dur()).await;
    let flood = {
        let (u, url) = (user.clone(), login_url.clone());
        closed_loop(p.login_conns, p.dur(), move |c, _, _| {
            let (u, url) = (u.clone(), url.clone());
            async move {
                let v = expect_status(
                    c.post(url.as_str())
                        .json(&json!({"email": u.email, "password": PASSWORD}))
                        .send()
                        .await,
                    200,
                )
                .await?;
                if v["access_token"].is_string() {
                    Ok(())
                } else {
                    Err("no token".into())
                }
            }
        })
    };
    let (mut flood, mut during) = tokio::join!(tokio::spawn(flood), tokio::spawn(probe(p.dur())));
    server.stop();
    let flood = flood.as_mut().map_err(|e| anyhow!("{e}"))?;
    let during = during.as_mut().map_err(|e| anyhow!("{e}"))?;
    rep.check(
        format!("login: {} failed logins {:?}", flood.err, flood.errors),
        flood.err == 0,
    );
    rep.check(
        format!(
            "login: {} failed /me probes {:?}",
            during.err + quiet.err,
            during.errors
        ),
        during.err + quiet.err == 0,
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    rep.add(
        "login",
        "login (argon2id) throughput",
        flood.rate(),
        "logins/s",
    )
    .note(format!(
        "{} conns; {cpus} cores shared with the load generator",
        p.login_conns
    ));
    rep.add("login", "login p50", flood.pct(0.5), "ms");
    let q99 = quiet.pct(0.99);
    rep.add(
        "login",
        "/me p99 during login flood",
        during.pct(0.99),
        "ms",
    )
    .baseline("no flood", q99)
    .target(Target::AtMost(10.0));
    rep.add("login", "/me p50 during login flood", during.pct(0.5), "ms")
        .baseline("no flood", quiet.pct(0.5));
    Ok(())
}
