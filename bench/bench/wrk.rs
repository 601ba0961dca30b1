//! `wrk` for plain GET (and fixed POST) loads, parsed from its `--latency` output, with
//! the built-in generator as the fallback when wrk is missing.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::load::closed_loop;

pub struct WrkResult {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub bad: u64,
    /// Requests answered ("N requests in ...").
    pub requests: u64,
}

pub fn have_wrk() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `wrk --latency` milliseconds from `639.00us`, `1.06ms`, `1.20s`.
fn wrk_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("us") {
        v.parse::<f64>().ok().map(|x| x / 1000.0)
    } else if let Some(v) = s.strip_suffix("ms") {
        v.parse().ok()
    } else if let Some(v) = s.strip_suffix('m') {
        v.parse::<f64>().ok().map(|x| x * 60_000.0)
    } else if let Some(v) = s.strip_suffix('s') {
        v.parse::<f64>().ok().map(|x| x * 1000.0)
    } else {
        None
    }
}

/// wrk against `url`: GET, or POST of the JSON `post_json` when given.
pub fn run_wrk(
    url: &str,
    token: Option<&str>,
    post_json: Option<&str>,
    conns: usize,
    secs: f64,
) -> Result<WrkResult> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new("wrk");
    cmd.arg("-t2")
        .arg(format!("-c{conns}"))
        .arg(format!("-d{}s", secs.ceil() as u64))
        .arg("--timeout")
        .arg("10s")
        .arg("--latency");
    let mut lua = String::new();
    if let Some(t) = token {
        lua += &format!("wrk.headers[\"Authorization\"] = \"Bearer {t}\"\n");
    }
    if let Some(body) = post_json {
        // A Lua long string: the JSON needs no escaping.
        lua += &format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [==[{body}]==]\n"
        );
    }
    if !lua.is_empty() {
        let script = dir.path().join("load.lua");
        std::fs::write(&script, lua)?;
        cmd.arg("-s").arg(script);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut r = WrkResult {
        rps: 0.0,
        p50: f64::NAN,
        p99: f64::NAN,
        bad: 0,
        requests: 0,
    };
    for line in text.lines() {
        let l = line.trim();
        if let Some((n, _)) = l.split_once(" requests in ")
            && let Ok(n) = n.trim().parse::<u64>()
        {
            r.requests = n;
        } else if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50 = wrk_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99 = wrk_ms(v).unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.bad += v.trim().parse::<u64>().unwrap_or(0);
        } else if l.starts_with("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            r.bad += l
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok(r)
}

/// A GET load at `conns` connections with wrk, or with the built-in generator if wrk is
/// not installed (the row says which).
pub async fn get_load(
    url: &str,
    token: Option<&str>,
    conns: usize,
    secs: f64,
) -> Result<(WrkResult, &'static str)> {
    if have_wrk() {
        let (u, t) = (url.to_string(), token.map(str::to_string));
        let r = tokio::task::spawn_blocking(move || run_wrk(&u, t.as_deref(), None, conns, secs))
            .await??;
        return Ok((r, "wrk"));
    }
    let url = Arc::new(url.to_string());
    let token = Arc::new(token.map(str::to_string));
    let mut load = closed_loop(conns, Duration::from_secs_f64(secs), move |c, _, _| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let mut req = c.get(url.as_str());
            if let Some(t) = token.as_deref() {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.map_err(|e| e.to_string())?;
            let ok = r.status().is_success();
            r.bytes().await.map_err(|e| e.to_string())?;
            if ok { Ok(()) } else { Err("status".into()) }
        }
    })
    .await;
    Ok((
        WrkResult {
            rps: load.rate(),
            p50: load.pct(0.5),
            p99: load.pct(0.99),
            bad: load.err,
            requests: load.ok + load.err,
        },
        "builtin",
    ))
}
