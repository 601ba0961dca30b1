//! The test harness: the real App on port 0 with a temp data dir, plus the built binary as
//! a child process for crash tests. Every helper polls with a deadline; nothing sleeps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use warpbase::{App, AppOptions, AppState, Config, RunningApp};

pub struct TestApp {
    pub app: RunningApp,
    pub client: reqwest::Client,
    pub dir: TempDir,
}

/// A config for tests: loopback port 0, the given data dir, no config file, no env.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::load_from(
        None,
        &warpbase::config::Overrides::default(),
        std::iter::empty(),
    )
    .expect("default config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = data_dir.to_path_buf();
    config.shutdown_grace = Duration::from_secs(5);
    // The default 127.0.0.1:9090 would collide between Apps run in parallel; tests that
    // scrape set port 0 (see `TestApp::metrics_url`).
    config.metrics_listen = None;
    config
}

/// Serve metrics on a free loopback port: for `TestApp::start_with` configure closures.
pub fn with_metrics(config: &mut Config) {
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
}

impl TestApp {
    pub async fn start() -> TestApp {
        TestApp::start_with(|_| {}, AppOptions::default()).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config), opts: AppOptions) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        configure(&mut config);
        let app = App::build_with(config, opts).await.expect("app builds");
        let addr = app.local_addr();
        // Redirects and links must point at the real port.
        let _ = addr;
        let app = app.spawn();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let t = TestApp { app, client, dir };
        t.wait_ready().await;
        t
    }

    pub fn state(&self) -> &AppState {
        &self.app.state
    }

    /// One integer read from the app's database (a count, a column), with `params` bound
    /// in order.
    pub async fn db_i64(
        &self,
        sql: &'static str,
        params: Vec<String>,
    ) -> Result<i64, warpbase::storage::StorageError> {
        self.state()
            .storage
            .read(move |c| Ok(c.query_row(sql, rusqlite::params_from_iter(params), |r| r.get(0))?))
            .await
    }

    pub fn url(&self, path: &str) -> String {
        self.app.url(path)
    }

    /// `/metrics` on the App's metrics listener (start it with [`with_metrics`]).
    pub fn metrics_url(&self) -> String {
        let addr = self
            .app
            .metrics_addr
            .expect("started with a metrics listener (common::with_metrics)");
        format!("http://{addr}/metrics")
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "app did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request")
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut req = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request")
    }

    /// Creates a user with a live session directly through the services (no HTTP), for
    /// tests of other modules that just need a signed-in caller.
    pub async fn create_user(&self, email: &str) -> TestUser {
        self.create_user_as(email, "user").await
    }

    /// As [`TestApp::create_user`], with the `admin` role (no account becomes admin by
    /// being first; see `POST /api/v1/admin/claim`).
    pub async fn admin(&self, email: &str) -> TestUser {
        self.create_user_as(email, "admin").await
    }

    async fn create_user_as(&self, email: &str, role: &'static str) -> TestUser {
        let state = self.state().clone();
        let auth = state.auth.clone();
        let email = email.to_string();
        let now = state.now_millis();
        let (id, pair, role) = state
            .storage
            .write(move |c| {
                let id = warpbase::ids::new_id();
                let row = warpbase::storage::users::insert_user(
                    c,
                    &warpbase::storage::users::NewUser {
                        id: &id,
                        email: &email,
                        email_verified: true,
                        name: None,
                        password_hash: None,
                        role: Some(role),
                        now,
                    },
                )?;
                let pair =
                    auth.create_session_in(c, &row.id, row.token_version, Some("test"), None)?;
                Ok::<_, warpbase::storage::StorageError>((row.id, pair, row.role))
            })
            .await
            .expect("create user");
        TestUser {
            id,
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
            is_admin: role == "admin",
        }
    }

    /// A new access token for the user's session at the App's current clock (tests that
    /// move a manual clock past the token's expiry).
    pub fn reissue(&self, user: &TestUser) -> String {
        use base64::Engine;
        let payload = user.access_token.split('.').nth(1).expect("jwt payload");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("base64");
        let claims: Value = serde_json::from_slice(&bytes).expect("claims");
        self.state().auth.access_token(
            &user.id,
            claims["sid"].as_str().expect("sid"),
            claims["ver"].as_i64().expect("ver"),
        )
    }

    pub async fn shutdown(self) {
        self.app.shutdown().await.expect("clean shutdown");
    }
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub access_token: String,
    pub refresh_token: String,
    pub is_admin: bool,
}

/// Asserts a problem+json response with the given status and code; returns the body.
pub async fn expect_problem(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let rid = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body: Value = resp.json().await.expect("problem body is JSON");
    assert_eq!(ct, "application/problem+json", "content type of {body}");
    assert_eq!(body["code"], code, "code of {body}");
    assert_eq!(body["status"], status, "status member of {body}");
    assert!(!rid.is_empty(), "x-request-id header");
    assert_eq!(
        body["request_id"],
        rid.as_str(),
        "request_id matches header"
    );
    body
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The built `warpbase` binary run as a child process (for kill -9 and signal tests).
pub struct ChildServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    lines: mpsc::Receiver<String>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_warpbase")
}

impl ChildServer {
    /// Starts `warpbase serve` on port 0 and waits for its "listening" log line.
    pub fn start(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> ChildServer {
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra_args)
            .current_dir(data_dir)
            .env_remove("RUST_LOG")
            // Parallel servers would collide on the default metrics port.
            .env("WARPBASE_METRICS_LISTEN", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn warpbase");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    // Receiver gone: keep reading and discard.
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("warpbase did not log its address in time"));
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '"')
                    .collect();
                break addr.parse().expect("address in log line");
            }
        };
        ChildServer {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            lines: rx,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status (bounded).
    pub fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("warpbase did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines printed so far.
    pub fn drain_logs(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

/// One server-sent event as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

/// A minimal SSE reader over a streaming response.
pub struct SseReader {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    pub comments: usize,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> SseReader {
        assert_eq!(resp.status(), 200, "SSE status");
        let ct = resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        SseReader {
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next event, or None when the server closed the stream. Panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                let mut any = false;
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        let _ = c;
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim().to_string());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    ev.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                    return Some(ev);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("timed out waiting for an SSE event");
            match chunk {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Some(Err(e)) => panic!("SSE stream error: {e}"),
                None => return None,
            }
        }
    }
}
