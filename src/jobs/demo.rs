//! The `demo` kind: a job that only sleeps, reports progress and fails on request, so the
//! queue, retries, the dead-letter queue and live progress can be tried without real work.
//!
//! Owns payload validation and the run itself; it never touches storage. The sleep is
//! injected (tokio's in production), so tests run on a virtual clock without sleeping.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::JobFailure;

pub const MAX_STEPS: u32 = 1000;
pub const MAX_STEP_MS: u64 = 60_000;

/// `{steps: 1..=1000, step_ms: 0..=60000, fail_attempts?: n, permanent_fail?: bool}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoPayload {
    pub steps: u32,
    pub step_ms: u64,
    /// Attempts `1..=fail_attempts` fail retryably (at their first step).
    #[serde(default)]
    pub fail_attempts: u32,
    /// Once the retryable failures are used up, fail permanently.
    #[serde(default)]
    pub permanent_fail: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid demo payload: {0}")]
    InvalidPayload(String),
    #[error("demo: injected failure on attempt {attempt} (fails while attempt <= {fail_attempts})")]
    InjectedRetryable { attempt: u32, fail_attempts: u32 },
    #[error("demo: injected permanent failure")]
    InjectedPermanent,
    #[error("canceled")]
    Canceled,
}

impl From<DemoError> for JobFailure {
    fn from(e: DemoError) -> Self {
        match e {
            DemoError::InjectedRetryable { .. } => JobFailure::Retryable(e.to_string()),
            DemoError::InvalidPayload(_) | DemoError::InjectedPermanent => {
                JobFailure::Permanent(e.to_string())
            }
            DemoError::Canceled => JobFailure::Canceled,
        }
    }
}

impl DemoPayload {
    /// Parses and validates a job payload (used at enqueue time for a 422, and again
    /// before running).
    pub fn from_json(value: &serde_json::Value) -> Result<DemoPayload, DemoError> {
        // serde would also accept a JSON array as a struct (fields by position).
        if !value.is_object() {
            return Err(DemoError::InvalidPayload(
                "payload must be a JSON object".to_string(),
            ));
        }
        let payload = DemoPayload::deserialize(value)
            .map_err(|e| DemoError::InvalidPayload(e.to_string()))?;
        payload.validate()?;
        Ok(payload)
    }

    pub fn validate(&self) -> Result<(), DemoError> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(DemoError::InvalidPayload(format!(
                "steps must be between 1 and {MAX_STEPS}, got {}",
                self.steps
            )));
        }
        if self.step_ms > MAX_STEP_MS {
            return Err(DemoError::InvalidPayload(format!(
                "step_ms must be between 0 and {MAX_STEP_MS}, got {}",
                self.step_ms
            )));
        }
        Ok(())
    }
}

/// Runs one attempt: `steps` sleeps of `step_ms`, progress after each, `{"steps": n}` at
/// the end. `attempt` is 1-based, as stored in the job row.
pub async fn run_demo(
    payload: &DemoPayload,
    attempt: u32,
    cancel: CancellationToken,
    progress: impl FnMut(u8, String),
) -> Result<serde_json::Value, DemoError> {
    run_demo_with_sleep(payload, attempt, cancel, progress, tokio::time::sleep).await
}

async fn run_demo_with_sleep<S: Future<Output = ()>>(
    payload: &DemoPayload,
    attempt: u32,
    cancel: CancellationToken,
    mut progress: impl FnMut(u8, String),
    mut sleep: impl FnMut(Duration) -> S,
) -> Result<serde_json::Value, DemoError> {
    payload.validate()?;
    // Injected failures happen before the first sleep so retries cycle quickly.
    if attempt <= payload.fail_attempts {
        return Err(DemoError::InjectedRetryable {
            attempt,
            fail_attempts: payload.fail_attempts,
        });
    }
    if payload.permanent_fail {
        return Err(DemoError::InjectedPermanent);
    }
    let step = Duration::from_millis(payload.step_ms);
    for i in 1..=payload.steps {
        if cancel.is_cancelled() {
            return Err(DemoError::Canceled);
        }
        // No timer for zero-length steps (the cancel check above covers them).
        if !step.is_zero() {
            tokio::select! {
                // Biased: a cancel that is already due wins over the sleep.
                biased;
                _ = cancel.cancelled() => return Err(DemoError::Canceled),
                () = sleep(step) => {}
            }
        }
        let pct = u8::try_from(u64::from(i) * 100 / u64::from(payload.steps)).unwrap_or(100);
        progress(pct, format!("step {i}/{}", payload.steps));
    }
    Ok(serde_json::json!({ "steps": payload.steps }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::Cell;

    fn payload(v: serde_json::Value) -> DemoPayload {
        DemoPayload::from_json(&v).unwrap()
    }

    /// A virtual clock: sleeping advances it instantly. Asked to sleep past `cancel_at`,
    /// it moves to `cancel_at`, cancels `token` and never wakes, like a real sleep
    /// interrupted by a cancel.
    struct FakeClock {
        now: Cell<Duration>,
        cancel_at: Duration,
        token: CancellationToken,
    }

    impl FakeClock {
        fn new(cancel_at: Duration, token: &CancellationToken) -> Self {
            FakeClock {
                now: Cell::new(Duration::ZERO),
                cancel_at,
                token: token.clone(),
            }
        }

        fn sleep(&self, d: Duration) -> impl Future<Output = ()> + use<> {
            let wake = self.now.get() + d;
            let interrupted = wake > self.cancel_at;
            if interrupted {
                self.now.set(self.cancel_at);
                self.token.cancel();
            } else {
                self.now.set(wake);
            }
            async move {
                if interrupted {
                    std::future::pending::<()>().await
                }
            }
        }
    }

    async fn run_fake(
        p: &DemoPayload,
        attempt: u32,
        cancel_at: Duration,
        seen: &mut Vec<(u8, String)>,
    ) -> (Result<serde_json::Value, DemoError>, Duration) {
        let cancel = CancellationToken::new();
        let clock = FakeClock::new(cancel_at, &cancel);
        let out = run_demo_with_sleep(
            p,
            attempt,
            cancel,
            |pct, msg| seen.push((pct, msg)),
            |d| clock.sleep(d),
        )
        .await;
        (out, clock.now.get())
    }

    const NEVER: Duration = Duration::MAX;

    #[test]
    fn payload_validation_table() {
        let ok = [
            json!({"steps": 1, "step_ms": 0}),
            json!({"steps": 1000, "step_ms": 60000}),
            json!({"steps": 3, "step_ms": 10, "fail_attempts": 2, "permanent_fail": true}),
        ];
        for v in ok {
            assert!(DemoPayload::from_json(&v).is_ok(), "{v}");
        }
        let bad = [
            (
                json!({"steps": 0, "step_ms": 0}),
                "steps must be between 1 and 1000, got 0",
            ),
            (json!({"steps": 1001, "step_ms": 0}), "got 1001"),
            (
                json!({"steps": 1, "step_ms": 60001}),
                "step_ms must be between 0 and 60000",
            ),
            (
                json!({"steps": 1, "step_ms": 0, "colour": "red"}),
                "unknown field `colour`",
            ),
            (json!({"step_ms": 5}), "missing field `steps`"),
            (json!({"steps": -1, "step_ms": 0}), "invalid value"),
            (json!({"steps": "3", "step_ms": 0}), "invalid type"),
            (
                json!({"steps": 1, "step_ms": 0, "fail_attempts": -2}),
                "invalid value",
            ),
            (json!([1, 2]), "payload must be a JSON object"),
            (json!(null), "payload must be a JSON object"),
        ];
        for (v, want) in bad {
            let err = DemoPayload::from_json(&v).unwrap_err();
            assert!(matches!(err, DemoError::InvalidPayload(_)));
            assert!(err.to_string().contains(want), "{v}: {err}");
            assert!(matches!(JobFailure::from(err), JobFailure::Permanent(_)));
        }
    }

    #[tokio::test]
    async fn runs_all_steps_with_progress_on_virtual_time() {
        let p = payload(json!({"steps": 4, "step_ms": 1000}));
        let mut seen = Vec::new();
        let (out, elapsed) = run_fake(&p, 1, NEVER, &mut seen).await;
        assert_eq!(out.unwrap(), json!({"steps": 4}));
        assert_eq!(elapsed, Duration::from_secs(4));
        let want: Vec<(u8, String)> = vec![
            (25, "step 1/4".into()),
            (50, "step 2/4".into()),
            (75, "step 3/4".into()),
            (100, "step 4/4".into()),
        ];
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn progress_rounds_down_and_ends_at_100() {
        let p = payload(json!({"steps": 3, "step_ms": 0}));
        let mut seen = Vec::new();
        let (out, _) = run_fake(&p, 1, NEVER, &mut seen).await;
        assert!(out.is_ok());
        let pcts: Vec<u8> = seen.iter().map(|(p, _)| *p).collect();
        assert_eq!(pcts, [33, 66, 100]);
    }

    #[tokio::test]
    async fn fails_retryably_while_attempt_at_most_fail_attempts() {
        let p = payload(json!({"steps": 2, "step_ms": 500, "fail_attempts": 2}));
        for attempt in 1..=2 {
            let mut seen = Vec::new();
            let (out, elapsed) = run_fake(&p, attempt, NEVER, &mut seen).await;
            let err = out.unwrap_err();
            assert!(matches!(err, DemoError::InjectedRetryable { .. }), "{err}");
            assert_eq!(elapsed, Duration::ZERO, "fails before sleeping");
            assert!(seen.is_empty());
            assert_eq!(
                JobFailure::from(err),
                JobFailure::Retryable(format!(
                    "demo: injected failure on attempt {attempt} (fails while attempt <= 2)"
                ))
            );
        }
        let (out, _) = run_fake(&p, 3, NEVER, &mut Vec::new()).await;
        assert_eq!(out.unwrap(), json!({"steps": 2}));
    }

    #[tokio::test]
    async fn permanent_fail_after_retryable_failures() {
        let p =
            payload(json!({"steps": 2, "step_ms": 5, "fail_attempts": 1, "permanent_fail": true}));
        let (first, _) = run_fake(&p, 1, NEVER, &mut Vec::new()).await;
        assert!(matches!(first, Err(DemoError::InjectedRetryable { .. })));
        let (second, _) = run_fake(&p, 2, NEVER, &mut Vec::new()).await;
        let second = second.unwrap_err();
        assert!(matches!(second, DemoError::InjectedPermanent));
        assert!(matches!(JobFailure::from(second), JobFailure::Permanent(_)));
    }

    #[tokio::test]
    async fn cancel_ends_the_run_early() {
        let p = payload(json!({"steps": 10, "step_ms": 1000}));
        let mut seen = Vec::new();
        let (out, elapsed) = run_fake(&p, 1, Duration::from_millis(2500), &mut seen).await;
        let err = out.unwrap_err();
        assert!(matches!(err, DemoError::Canceled));
        assert_eq!(seen.len(), 2, "steps 1 and 2 completed");
        assert_eq!(elapsed, Duration::from_millis(2500));
        assert_eq!(JobFailure::from(err), JobFailure::Canceled);
    }

    #[tokio::test]
    async fn already_canceled_token_wins_over_zero_sleep() {
        let p = payload(json!({"steps": 5, "step_ms": 0}));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut calls = 0;
        let err = run_demo(&p, 1, cancel, |_, _| calls += 1)
            .await
            .unwrap_err();
        assert!(matches!(err, DemoError::Canceled));
        assert_eq!(calls, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn real_sleep_path_runs_to_completion() {
        // tokio's sleep on a paused clock: no waiting.
        let p = payload(json!({"steps": 3, "step_ms": 5}));
        let mut calls = 0;
        let out = run_demo(&p, 1, CancellationToken::new(), |_, _| calls += 1).await;
        assert_eq!(out.unwrap(), json!({"steps": 3}));
        assert_eq!(calls, 3);
    }

    #[test]
    fn zero_length_steps_finish_at_the_first_poll() {
        use futures_util::FutureExt as _;
        // No runtime here: a timer would panic, so this also proves none is made.
        let p = payload(json!({"steps": 3, "step_ms": 0}));
        let mut seen = Vec::new();
        let out = run_demo(&p, 1, CancellationToken::new(), |pct, _| seen.push(pct))
            .now_or_never()
            .expect("ready at once");
        assert_eq!(out.unwrap(), json!({"steps": 3}));
        assert_eq!(seen, vec![33, 66, 100]);
    }

    #[tokio::test]
    async fn run_rejects_an_unvalidated_payload() {
        let p = DemoPayload {
            steps: 0,
            step_ms: 0,
            fail_attempts: 0,
            permanent_fail: false,
        };
        let err = run_demo(&p, 1, CancellationToken::new(), |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, DemoError::InvalidPayload(_)));
    }
}
