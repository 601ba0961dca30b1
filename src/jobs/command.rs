//! Config-defined `command` kinds: one program run per job attempt.
//!
//! Owns the child process for the length of an attempt: spawning it without a shell and
//! with a scrubbed environment, the stdin/stdout/stderr protocol (payload JSON in,
//! `PROGRESS <pct> <message>` and a final JSON line out, a bounded stderr tail), and
//! stopping it on timeout or cancellation (SIGTERM to its process group, SIGKILL after a
//! grace period). It must not hold unbounded output in memory or block the runtime. The
//! program's process group is killed when an attempt times out, is canceled, or its
//! future is dropped (worker shutdown); processes a program leaves running in the
//! background after a normal exit are its own business and are not hunted down.
//!
//! Exit codes follow sysexits: 0 success, 65 (`EX_DATAERR`) permanent failure, 75
//! (`EX_TEMPFAIL`) and anything else retryable.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::JobFailure;

/// Exit code that marks the job as failed for good (`EX_DATAERR`).
pub const EXIT_PERMANENT: i32 = 65;
/// Exit code a program uses to ask for a retry (`EX_TEMPFAIL`); any other non-zero code
/// is retried as well.
pub const EXIT_RETRY: i32 = 75;
/// How much of the end of stderr is kept for the error message.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// Longest stdout line considered; longer lines (and so larger results) are ignored.
pub const MAX_STDOUT_LINE: usize = 1 << 20;
/// Progress messages are cut to this many bytes (they go to SSE clients and the DB).
pub const MAX_PROGRESS_MESSAGE: usize = 512;
/// After the program exits, how long to keep reading output that is still buffered in
/// the pipes. A background process it left behind may hold them open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

/// The environment variables passed through from warpbase; everything else is cleared
/// so secrets in warpbase's environment never reach job programs.
const PASSED_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

/// A program and its arguments, from `[jobs.kinds.NAME] command = [...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: String,
    pub args: Vec<String>,
}

impl CommandSpec {
    /// `None` for an empty argv (config validation reports it).
    pub fn from_argv(argv: &[String]) -> Option<CommandSpec> {
        let (program, args) = argv.split_first()?;
        Some(CommandSpec {
            program: program.clone(),
            args: args.to_vec(),
        })
    }
}

/// Per-attempt inputs of [`run_command`].
#[derive(Debug, Clone)]
pub struct CommandCtx<'a> {
    pub job_id: &'a str,
    /// 1-based attempt number, exported as `WARPBASE_JOB_ATTEMPT`.
    pub attempt: u32,
    pub payload: &'a Value,
    /// Wall-clock limit of the attempt (the queue's or the kind's timeout).
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping the program.
    pub term_grace: Duration,
    pub cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("exit code {EXIT_PERMANENT} (permanent failure){}", tail_suffix(.stderr_tail))]
    Permanent { stderr_tail: String },
    #[error("exit code {code}{}", tail_suffix(.stderr_tail))]
    Exit { code: i32, stderr_tail: String },
    #[error("killed by signal {signal}{}", tail_suffix(.stderr_tail))]
    Signal { signal: i32, stderr_tail: String },
    #[error("timed out after {after:?}{}", tail_suffix(.stderr_tail))]
    Timeout {
        after: Duration,
        stderr_tail: String,
    },
    #[error("canceled")]
    Canceled,
    #[error("waiting for the program: {0}")]
    Io(#[from] io::Error),
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

impl From<CommandError> for JobFailure {
    fn from(e: CommandError) -> Self {
        match &e {
            // A missing or non-executable program is a config error; retrying won't fix it.
            CommandError::Spawn { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) =>
            {
                JobFailure::Permanent(e.to_string())
            }
            CommandError::Permanent { .. } => JobFailure::Permanent(e.to_string()),
            CommandError::Spawn { .. }
            | CommandError::Exit { .. }
            | CommandError::Signal { .. }
            | CommandError::Io(_) => JobFailure::Retryable(e.to_string()),
            CommandError::Timeout { .. } => JobFailure::Timeout,
            CommandError::Canceled => JobFailure::Canceled,
        }
    }
}

enum Stop {
    Timeout,
    Canceled,
}

/// Runs one attempt of a `command` job and returns the last JSON line of its stdout
/// (`null` if there was none).
///
/// `progress` sees every well-formed `PROGRESS` line in order. On timeout or
/// cancellation the whole process group gets SIGTERM, then SIGKILL after `term_grace`.
pub async fn run_command(
    spec: &CommandSpec,
    ctx: CommandCtx<'_>,
    mut progress: impl FnMut(u8, String) + Send,
) -> Result<Value, CommandError> {
    let input = serde_json::to_vec(ctx.payload).map_err(io::Error::other)?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args).env_clear();
    for key in PASSED_ENV {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd.env("WARPBASE_JOB_ID", ctx.job_id)
        .env("WARPBASE_JOB_ATTEMPT", ctx.attempt.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so stopping it also stops whatever it spawned.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    // Taken now: `id()` returns None once the child is reaped, and we must only signal
    // the group while the leader is unreaped (so its pid cannot have been reused).
    let pgid = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok());
    // Declared after `child` so it drops first, while the leader is surely unreaped.
    let mut group_guard = GroupKillGuard(pgid);

    let mut last_json = None;
    let mut tail = TailBuffer::new(STDERR_TAIL_BYTES);
    let (status, stop) = {
        let io = pump(
            child.stdin.take(),
            input,
            child.stdout.take(),
            child.stderr.take(),
            &mut progress,
            &mut last_json,
            &mut tail,
        );
        tokio::pin!(io);
        let mut io_done = false;

        let deadline = tokio::time::sleep(ctx.timeout);
        tokio::pin!(deadline);
        let first = loop {
            tokio::select! {
                () = &mut io, if !io_done => io_done = true,
                status = child.wait() => {
                    group_guard.disarm();
                    break Ok(status?);
                }
                () = &mut deadline => break Err(Stop::Timeout),
                () = ctx.cancel.cancelled() => break Err(Stop::Canceled),
            }
        };
        let (status, stop) = match first {
            Ok(status) => (status, None),
            Err(stop) => {
                signal_group(pgid, libc::SIGTERM);
                let grace = tokio::time::sleep(ctx.term_grace);
                tokio::pin!(grace);
                // Keep reading while it shuts down: a program blocked on a full stdout
                // pipe could not finish its SIGTERM handler otherwise.
                let status = loop {
                    tokio::select! {
                        () = &mut io, if !io_done => io_done = true,
                        status = child.wait() => {
                            group_guard.disarm();
                            break status?;
                        }
                        () = &mut grace => {
                            signal_group(pgid, libc::SIGKILL);
                            group_guard.disarm();
                            break child.wait().await?;
                        }
                    }
                };
                (status, Some(stop))
            }
        };
        if !io_done {
            // Elapsed means a leftover process holds the pipes; what it writes is not ours.
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut io).await;
        }
        (status, stop)
    };

    let stderr_tail = tail.text();
    match stop {
        Some(Stop::Timeout) => {
            return Err(CommandError::Timeout {
                after: ctx.timeout,
                stderr_tail,
            });
        }
        Some(Stop::Canceled) => return Err(CommandError::Canceled),
        None => {}
    }
    match status.code() {
        Some(0) => Ok(last_json.unwrap_or(Value::Null)),
        Some(EXIT_PERMANENT) => Err(CommandError::Permanent { stderr_tail }),
        Some(code) => Err(CommandError::Exit { code, stderr_tail }),
        None => Err(CommandError::Signal {
            signal: status.signal().unwrap_or(0),
            stderr_tail,
        }),
    }
}

fn signal_group(pgid: Option<libc::pid_t>, signal: libc::c_int) {
    if let Some(pgid) = pgid.filter(|p| *p > 0) {
        // SAFETY: kill(2) has no memory-safety preconditions. A negative pid addresses the
        // process group we created for the still-unreaped child.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// SIGKILLs the program's process group if the attempt's future is dropped before the
/// leader was reaped; `kill_on_drop` alone would only reach the leader. Disarmed as soon
/// as a wait returns, because after reaping the group id may belong to someone else.
struct GroupKillGuard(Option<libc::pid_t>);

impl GroupKillGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        signal_group(self.0, libc::SIGKILL);
    }
}

/// Feeds stdin and reads stdout and stderr until all three pipes are done.
async fn pump<P: FnMut(u8, String)>(
    stdin: Option<impl AsyncWrite + Unpin>,
    input: Vec<u8>,
    stdout: Option<impl AsyncRead + Unpin>,
    stderr: Option<impl AsyncRead + Unpin>,
    progress: &mut P,
    last_json: &mut Option<Value>,
    tail: &mut TailBuffer,
) {
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A program that exits without reading its input is not an error (EPIPE).
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let out = async {
        if let Some(stdout) = stdout {
            read_stdout(stdout, |line| handle_stdout_line(line, progress, last_json)).await;
        }
    };
    let err = async {
        if let Some(mut stderr) = stderr {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.push(&buf[..n]);
            }
        }
    };
    tokio::join!(feed, out, err);
}

/// Calls `on_line` for every line (without the newline) of at most [`MAX_STDOUT_LINE`]
/// bytes; longer lines are skipped without being buffered.
async fn read_stdout(stdout: impl AsyncRead + Unpin, mut on_line: impl FnMut(&[u8])) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let Ok(buf) = reader.fill_buf().await else {
            return;
        };
        if buf.is_empty() {
            if !line.is_empty() && !too_long {
                on_line(&line);
            }
            return;
        }
        let newline = buf.iter().position(|b| *b == b'\n');
        let chunk = &buf[..newline.unwrap_or(buf.len())];
        if !too_long {
            if line.len() + chunk.len() > MAX_STDOUT_LINE {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(consumed);
        if newline.is_some() {
            if !too_long {
                on_line(&line);
            }
            line.clear();
            too_long = false;
        }
    }
}

fn handle_stdout_line(
    line: &[u8],
    progress: &mut impl FnMut(u8, String),
    last_json: &mut Option<Value>,
) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("PROGRESS") {
        if let Some((pct, message)) = parse_progress(rest) {
            progress(pct, message);
        }
        return;
    }
    if text.is_empty() {
        return;
    }
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        *last_json = Some(value);
    }
}

/// Parses what follows `PROGRESS`: ` <pct> [message]`. `pct` may be fractional and is
/// clamped to 0..=100; anything unparsable is ignored rather than failing the job.
fn parse_progress(rest: &str) -> Option<(u8, String)> {
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    let (number, message) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let pct: f64 = number.parse().ok()?;
    if pct.is_nan() {
        return None;
    }
    // Clamped first, so the cast cannot truncate.
    let pct = pct.clamp(0.0, 100.0).round() as u8;
    let message = message.trim();
    let mut end = message.len().min(MAX_PROGRESS_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Some((pct, message[..end].to_string()))
}

/// The last `cap` bytes written to it, in at most `2·cap` bytes of memory.
struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
}

impl TailBuffer {
    fn new(cap: usize) -> Self {
        TailBuffer {
            buf: Vec::with_capacity(2 * cap),
            cap,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
        }
    }

    fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        String::from_utf8_lossy(&self.buf[start..])
            .trim()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Instant;

    fn script(dir: &Path, name: &str, body: &str) -> CommandSpec {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        CommandSpec {
            program: path.to_string_lossy().into_owned(),
            args: vec![],
        }
    }

    fn ctx<'a>(payload: &'a Value, timeout: Duration, cancel: CancellationToken) -> CommandCtx<'a> {
        CommandCtx {
            job_id: "job-42",
            attempt: 3,
            payload,
            timeout,
            term_grace: Duration::from_secs(5),
            cancel,
        }
    }

    async fn run(spec: &CommandSpec, timeout: Duration) -> Result<Value, CommandError> {
        let payload = json!({});
        run_command(
            spec,
            ctx(&payload, timeout, CancellationToken::new()),
            |_, _| {},
        )
        .await
    }

    /// Whether `pid` is a live process (zombies count as gone: they run nothing, and
    /// a container's pid 1 may never reap re-parented ones).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.trim().chars().next());
                state != Some('Z') && state != Some('X')
            }
        }
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Re-parented processes are killed asynchronously; poll, don't sleep a fixed time.
    fn assert_gone_soon(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} still running");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn run_command_future_is_send() {
        // The worker spawns attempts onto the runtime.
        fn assert_send<T: Send>(_: &T) {}
        let payload = json!({});
        let spec = CommandSpec::from_argv(&["true".to_string()]).unwrap();
        let fut = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(1), CancellationToken::new()),
            |_, _| {},
        );
        assert_send(&fut);
    }

    #[test]
    fn parse_progress_table() {
        let cases: &[(&str, Option<(u8, &str)>)] = &[
            (" 10 starting", Some((10, "starting"))),
            (" 50", Some((50, ""))),
            (" 33.6 a  b ", Some((34, "a  b"))),
            (" 150 too much", Some((100, "too much"))),
            (" -5 negative", Some((0, "negative"))),
            (" inf x", Some((100, "x"))),
            (" NaN x", None),
            (" abc garbage", None),
            ("", None),
            (" ", None),
            ("42 glued to the keyword", None),
        ];
        for (input, want) in cases {
            let got = parse_progress(input);
            let want = want.map(|(p, m)| (p, m.to_string()));
            assert_eq!(got, want, "{input:?}");
        }
        let long = format!(" 1 {}", "é".repeat(1000));
        let (_, msg) = parse_progress(&long).unwrap();
        assert!(msg.len() <= MAX_PROGRESS_MESSAGE && msg.chars().all(|c| c == 'é'));
    }

    #[test]
    fn tail_buffer_keeps_only_the_end() {
        let mut t = TailBuffer::new(8);
        t.push(b"hello ");
        assert_eq!(t.text(), "hello");
        for _ in 0..100 {
            t.push(b"0123");
        }
        t.push(b"ab");
        assert_eq!(t.text(), "230123ab");
        assert!(t.buf.len() <= 16);
        t.push(&[b'x'; 100]);
        assert_eq!(t.text(), "xxxxxxxx");
    }

    #[tokio::test]
    async fn success_reports_progress_in_order_and_returns_last_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            "ok.sh",
            r#"cat > /dev/null
echo "PROGRESS 10 starting"
echo "not json"
echo "PROGRESS 150 too much"
echo "PROGRESS abc garbage"
echo '{"partial": 1}'
echo "PROGRESS -5 negative"
printf '{"done": true, "n": %s}\n' 3
echo "trailing text"
echo "some warning" >&2"#,
        );
        let payload = json!({});
        let mut seen = Vec::new();
        let out = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(10), CancellationToken::new()),
            |pct, msg| seen.push((pct, msg)),
        )
        .await
        .unwrap();
        assert_eq!(out, json!({"done": true, "n": 3}));
        let want: Vec<(u8, String)> = vec![
            (10, "starting".into()),
            (100, "too much".into()),
            (0, "negative".into()),
        ];
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn a_leftover_background_process_holding_stdout_does_not_hang_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = script(
            dir.path(),
            "daemonish.sh",
            &format!(
                "sleep 30 &\necho $! > '{}'\necho '{{\"ok\": 1}}'",
                pidfile.display()
            ),
        );
        let start = Instant::now();
        let out = run(&spec, Duration::from_secs(20)).await.unwrap();
        assert_eq!(out, json!({"ok": 1}));
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        // Not ours to reap after a normal exit; clean up after the test.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(read_pid(&pidfile), libc::SIGKILL) };
    }

    #[tokio::test]
    async fn dropping_the_attempt_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = script(
            dir.path(),
            "orphan.sh",
            &format!(
                "sleep 60 &\necho $! > '{}'\necho 'PROGRESS 1 started'\nwait",
                pidfile.display()
            ),
        );
        let payload = json!({});
        let started = std::sync::Arc::new(tokio::sync::Notify::new());
        let signal = std::sync::Arc::clone(&started);
        let attempt = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(60), CancellationToken::new()),
            move |_, _| signal.notify_one(),
        );
        // Like a worker shutting down: the attempt's future is dropped mid-run.
        tokio::select! {
            _ = attempt => panic!("the program should still be running"),
            () = started.notified() => {}
        }
        assert_gone_soon(read_pid(&pidfile));
    }

    #[tokio::test]
    async fn no_json_output_gives_null() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(dir.path(), "quiet.sh", "echo hello");
        assert_eq!(
            run(&spec, Duration::from_secs(10)).await.unwrap(),
            Value::Null
        );
    }

    #[tokio::test]
    async fn payload_arrives_on_stdin_and_env_is_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let env_file = dir.path().join("env.txt");
        let spec = script(
            dir.path(),
            "echo.sh",
            &format!("env > '{}'\ncat\necho", env_file.display()),
        );
        let payload = json!({"name": "x y", "list": [1, 2, 3], "nested": {"ok": true}});
        let out = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(10), CancellationToken::new()),
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(out, payload);

        let env = std::fs::read_to_string(&env_file).unwrap();
        assert!(env.lines().any(|l| l == "WARPBASE_JOB_ID=job-42"), "{env}");
        assert!(env.lines().any(|l| l == "WARPBASE_JOB_ATTEMPT=3"), "{env}");
        // Whatever else there is was set by the shell itself, not inherited.
        let allowed = [
            "PATH",
            "HOME",
            "LANG",
            "WARPBASE_JOB_ID",
            "WARPBASE_JOB_ATTEMPT",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "_",
        ];
        for line in env.lines() {
            let key = line.split('=').next().unwrap();
            assert!(allowed.contains(&key), "unexpected env var {key}");
        }
    }

    #[tokio::test]
    async fn large_payload_to_a_program_that_never_reads_stdin_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(dir.path(), "noread.sh", "echo '{\"ok\":1}'");
        let payload = json!({"blob": "z".repeat(4 << 20)});
        let out = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(20), CancellationToken::new()),
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(out, json!({"ok": 1}));
    }

    #[tokio::test]
    async fn exit_65_is_permanent_with_stderr_in_message() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            "bad.sh",
            "echo 'bad input: no name' >&2\nexit 65",
        );
        let err = run(&spec, Duration::from_secs(10)).await.unwrap_err();
        assert!(
            matches!(&err, CommandError::Permanent { stderr_tail } if stderr_tail == "bad input: no name")
        );
        match JobFailure::from(err) {
            JobFailure::Permanent(msg) => {
                assert_eq!(msg, "exit code 65 (permanent failure): bad input: no name")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn exit_75_and_other_codes_are_retryable() {
        let dir = tempfile::tempdir().unwrap();
        for code in [75, 1, 3, 255] {
            let spec = script(
                dir.path(),
                &format!("exit{code}.sh"),
                &format!("echo 'database busy' >&2\nexit {code}"),
            );
            let err = run(&spec, Duration::from_secs(10)).await.unwrap_err();
            assert!(
                matches!(err, CommandError::Exit { code: c, .. } if c == code),
                "{err}"
            );
            let failure = JobFailure::from(err);
            assert_eq!(
                failure,
                JobFailure::Retryable(format!("exit code {code}: database busy"))
            );
            assert!(failure.is_retryable());
        }
    }

    #[tokio::test]
    async fn death_by_signal_is_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(dir.path(), "selfkill.sh", "kill -9 $$");
        let err = run(&spec, Duration::from_secs(10)).await.unwrap_err();
        assert!(
            matches!(err, CommandError::Signal { signal: 9, .. }),
            "{err}"
        );
        assert!(JobFailure::from(err).is_retryable());
    }

    #[tokio::test]
    async fn missing_program_is_a_permanent_spawn_error() {
        let spec = CommandSpec::from_argv(&["/nonexistent/warpbase-prog".to_string()]).unwrap();
        let err = run(&spec, Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }), "{err}");
        assert!(matches!(JobFailure::from(err), JobFailure::Permanent(_)));
        assert_eq!(CommandSpec::from_argv(&[]), None);
    }

    #[tokio::test]
    async fn timeout_terminates_the_program_and_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = script(
            dir.path(),
            "slow.sh",
            &format!("sleep 60 &\necho $! > '{}'\nwait", pidfile.display()),
        );
        let start = Instant::now();
        let err = run(&spec, Duration::from_millis(300)).await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert_eq!(JobFailure::from(err), JobFailure::Timeout);
        assert_gone_soon(read_pid(&pidfile));
    }

    #[tokio::test]
    async fn program_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = script(
            dir.path(),
            "stubborn.sh",
            &format!(
                "trap '' TERM\necho $$ > '{}'\nwhile :; do sleep 1; done",
                pidfile.display()
            ),
        );
        let payload = json!({});
        let mut c = ctx(
            &payload,
            Duration::from_millis(200),
            CancellationToken::new(),
        );
        c.term_grace = Duration::from_millis(300);
        let start = Instant::now();
        let err = run_command(&spec, c, |_, _| {}).await.unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert!(
            took >= Duration::from_millis(500),
            "grace honoured, took {took:?}"
        );
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(!alive(read_pid(&pidfile)));
    }

    #[tokio::test]
    async fn cancellation_ends_a_running_program() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = script(
            dir.path(),
            "long.sh",
            &format!(
                "echo $$ > '{}'\necho 'PROGRESS 5 started'\nexec sleep 60",
                pidfile.display()
            ),
        );
        let payload = json!({});
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let start = Instant::now();
        // Cancel as soon as the program is demonstrably running.
        let err = run_command(
            &spec,
            ctx(&payload, Duration::from_secs(60), cancel),
            move |_, _| trigger.cancel(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Canceled), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
        assert_eq!(JobFailure::from(err), JobFailure::Canceled);
        assert!(!alive(read_pid(&pidfile)));
    }

    #[tokio::test]
    async fn huge_output_keeps_only_the_stderr_tail_and_skips_overlong_lines() {
        let dir = tempfile::tempdir().unwrap();
        let spec = script(
            dir.path(),
            "noisy.sh",
            r#"head -c 20000000 /dev/zero | tr '\0' 'e' >&2
echo >&2
echo "THE END" >&2
exit 3"#,
        );
        let err = run(&spec, Duration::from_secs(30)).await.unwrap_err();
        match err {
            CommandError::Exit {
                code: 3,
                stderr_tail,
            } => {
                assert!(stderr_tail.len() <= STDERR_TAIL_BYTES);
                assert!(
                    stderr_tail.ends_with("eee\nTHE END"),
                    "{}",
                    &stderr_tail[4000..]
                );
            }
            other => panic!("{other}"),
        }

        let spec = script(
            dir.path(),
            "bigline.sh",
            r#"echo '{"small": 1}'
printf '{"big": "' ; head -c 3000000 /dev/zero | tr '\0' 'y' ; echo '"}'"#,
        );
        let out = run(&spec, Duration::from_secs(30)).await.unwrap();
        assert_eq!(out, json!({"small": 1}), "an overlong line is not a result");
    }
}
