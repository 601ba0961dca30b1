//! The server under test: the warpbase binary started on loopback with a temp data dir
//! and the benchmark config, its readiness, RSS and CPU time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{FAST_CONCURRENCY, WEBHOOK_SECRET};

pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn bench_toml(port: u16) -> String {
    format!(
        r#"# Written by the bench driver (bench/bench/): offline mode, quotas and login limits out of the way.
log_level = "warn"
public_url = "http://127.0.0.1:{port}"
# Benchmarks may run two servers at once; the default metrics port would collide.
metrics_listen = "off"
[auth]
rate_limit = 1000000000
[stripe]
webhook_secrets = ["{WEBHOOK_SECRET}"]
[[billing.plans]]
id = "free"
name = "Free"
limits = {{ jobs_per_period = 1000000000, concurrent_jobs = 1000000000, max_upload_bytes = 1048576 }}
[jobs.queues.fast]
concurrency = {FAST_CONCURRENCY}
timeout = "10s"
"#
    )
}

/// One HTTP/1.1 `GET /readyz` over a raw socket: true on 200.
fn ready_once(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_nodelay(true);
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf == b"HTTP/1.1 200"
}

impl Server {
    pub fn spawn_in(bin: &Path, dir: tempfile::TempDir, extra: &str) -> Result<(Server, Instant)> {
        let port = free_port()?;
        let toml = dir.path().join("warpbase.toml");
        std::fs::write(&toml, bench_toml(port) + extra)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("server.log"))?;
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&toml)
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok((Server { child, dir, port }, started))
    }

    /// Polls `/readyz` every millisecond; returns the time from spawn to the first 200.
    pub fn wait_ready(&mut self, started: Instant, limit: Duration) -> Result<Duration> {
        loop {
            if ready_once(self.port) {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "warpbase exited with {status} before ready; log:\n{}",
                    self.log_tail()
                );
            }
            if started.elapsed() > limit {
                bail!(
                    "warpbase not ready after {limit:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn start(bin: &Path) -> Result<Server> {
        Server::start_with(bin, "")
    }

    /// Like [`Server::start`], with `extra` appended to the generated config.
    pub fn start_with(bin: &Path, extra: &str) -> Result<Server> {
        let (mut s, started) = Server::spawn_in(bin, tempfile::tempdir()?, extra)?;
        s.wait_ready(started, Duration::from_secs(20))?;
        Ok(s)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn db(&self) -> Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open_with_flags(
            self.dir.path().join("warpbase.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.busy_timeout(Duration::from_secs(5))?;
        Ok(c)
    }

    /// `VmRSS` / `VmHWM` of the server process in MiB.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGTERM, then wait (graceful shutdown); SIGKILL if it hangs. Returns the data dir.
    pub fn stop(mut self) -> tempfile::TempDir {
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        self.dir
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the `(comm)`, which may contain spaces, utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if f.len() < 13 || hz <= 0.0 {
        return 0.0;
    }
    (f[11] + f[12]) / hz
}
