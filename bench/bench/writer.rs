//! Scenario `writer`: durable commits through the group-commit writer against raw
//! fsync'ed SQLite commits (the `writer` example, bench/writer.rs, run as a child).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::report::{Report, Target};
use crate::{Params, Paths};

/// Scenario 7: durable commits through the group-commit writer vs raw fsync'ed commits
/// (bench/writer.rs, run as a child process). Returns raw commits/s for scenario 3.
pub fn scenario_writer(p: &Params, paths: &Paths, rep: &mut Report) -> Result<f64> {
    eprintln!("[writer] group commit vs raw fsync'ed commits");
    let dir = tempfile::tempdir()?;
    let json_path = dir.path().join("writer.json");
    let out = Command::new(&paths.writer)
        .arg("--seconds")
        .arg(p.writer_secs.to_string())
        .env("WARPBASE_BENCH_JSON", &json_path)
        .stdout(Stdio::null())
        .output()
        .context("running the writer example")?;
    if !out.status.success() {
        bail!(
            "writer example failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    let raw = rows
        .iter()
        .find(|r| r["scenario"] == "raw")
        .and_then(|r| r["commits_per_sec"].as_f64())
        .context("raw commits in writer output")?;
    rep.add(
        "writer",
        "raw sqlite commit, fsync each (1 caller)",
        raw,
        "commits/s",
    );
    for r in rows.iter().filter(|r| r["scenario"] == "writer") {
        let callers = r["callers"].as_u64().unwrap_or(0);
        let rate = r["commits_per_sec"].as_f64().unwrap_or(0.0);
        let batch = r["mean_batch"].as_f64().unwrap_or(0.0);
        let row = rep.add(
            "writer",
            &format!("durable writes, {callers} callers"),
            rate,
            "writes/s",
        );
        row.baseline("raw", raw)
            .note(format!("{callers} callers: mean batch {batch:.1}"));
        if callers == 64 {
            // Group commit should multiply the disk's commit rate under concurrency.
            row.target(Target::AtLeast(raw * 5.0));
        }
    }
    Ok(raw)
}
