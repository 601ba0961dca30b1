//! Scenario `cold`: cold start to `/readyz`, idle RSS and binary size.

use std::time::Duration;

use anyhow::Result;

use crate::report::{Report, Target};
use crate::server::Server;
use crate::{Mode, Params, Paths};

/// 6. Cold start to /readyz, idle RSS, binary size.
pub fn scenario_cold(p: &Params, paths: &Paths, rep: &mut Report) -> Result<()> {
    eprintln!("[cold] start to /readyz, idle RSS, binary size");
    let size = std::fs::metadata(&paths.warpbase)?.len() as f64 / (1024.0 * 1024.0);
    let mut fresh = Vec::new();
    let mut warm = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..p.cold_reps {
        // Fresh: empty data dir (secrets generated, migrations applied).
        let (mut s, t0) = Server::spawn_in(&paths.warpbase, tempfile::tempdir()?, "")?;
        fresh.push(s.wait_ready(t0, Duration::from_secs(20))?.as_secs_f64() * 1000.0);
        let dir = s.stop();
        // Restart on the existing data dir: the usual deploy/restart case.
        let (mut s, t0) = Server::spawn_in(&paths.warpbase, dir, "")?;
        warm.push(s.wait_ready(t0, Duration::from_secs(20))?.as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(if p.mode == Mode::Smoke {
            200
        } else {
            1000
        }));
        idle.push(s.rss_mib().0);
        s.stop();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    rep.add(
        "cold",
        "start to /readyz, existing data dir (median)",
        median(&mut warm),
        "ms",
    )
    .target(Target::AtMost(100.0));
    rep.add(
        "cold",
        "start to /readyz, empty data dir (median)",
        median(&mut fresh),
        "ms",
    )
    .target(Target::AtMost(100.0))
    .note("first start: generates secrets, applies migrations");
    rep.add("cold", "idle RSS after start", median(&mut idle), "MiB")
        .target(Target::AtMost(30.0));
    rep.add(
        "cold",
        "binary size (release, debuginfo stripped)",
        size,
        "MiB",
    );
    Ok(())
}
