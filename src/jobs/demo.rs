//! The `demo` kind: a job that only sleeps, reports progress and fails on request, so the
//! queue, retries, the dead-letter queue and live progress can be tried without real work.
//!
//! Owns payload validation and the run itself; it never touches storage. Time comes from
//! `tokio::time`, so tests run it on paused time.

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
        if !value.is_object() {
            return Err(DemoError::InvalidPayload(
                "invalid type: the payload must be a JSON object".into(),
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
    mut progress: impl FnMut(u8, String),
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
        tokio::select! {
            // Biased: a cancel that is already due wins over a zero-length sleep.
            biased;
            _ = cancel.cancelled() => return Err(DemoError::Canceled),
            _ = tokio::time::sleep(step) => {}
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
    use tokio::time::Instant;

    fn payload(v: serde_json::Value) -> DemoPayload {
        DemoPayload::from_json(&v).unwrap()
    }

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
            (json!([1, 2]), "invalid type"),
        ];
        for (v, want) in bad {
            let err = DemoPayload::from_json(&v).unwrap_err();
            assert!(matches!(err, DemoError::InvalidPayload(_)));
            assert!(err.to_string().contains(want), "{v}: {err}");
            assert!(matches!(JobFailure::from(err), JobFailure::Permanent(_)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runs_all_steps_with_progress_and_virtual_time() {
        let p = payload(json!({"steps": 4, "step_ms": 1000}));
        let start = Instant::now();
        let mut seen = Vec::new();
        let out = run_demo(&p, 1, CancellationToken::new(), |pct, msg| {
            seen.push((pct, msg))
        })
        .await
        .unwrap();
        assert_eq!(out, json!({"steps": 4}));
        assert_eq!(start.elapsed(), Duration::from_secs(4));
        let want: Vec<(u8, String)> = vec![
            (25, "step 1/4".into()),
            (50, "step 2/4".into()),
            (75, "step 3/4".into()),
            (100, "step 4/4".into()),
        ];
        assert_eq!(seen, want);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_retryably_while_attempt_at_most_fail_attempts() {
        let p = payload(json!({"steps": 2, "step_ms": 500, "fail_attempts": 2}));
        for attempt in 1..=2 {
            let start = Instant::now();
            let err = run_demo(&p, attempt, CancellationToken::new(), |_, _| {})
                .await
                .unwrap_err();
            assert!(matches!(err, DemoError::InjectedRetryable { .. }), "{err}");
            assert_eq!(start.elapsed(), Duration::ZERO, "fails before sleeping");
            assert!(JobFailure::from(err).is_retryable());
        }
        let out = run_demo(&p, 3, CancellationToken::new(), |_, _| {}).await;
        assert_eq!(out.unwrap(), json!({"steps": 2}));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_fail_after_retryable_failures() {
        let p =
            payload(json!({"steps": 2, "step_ms": 5, "fail_attempts": 1, "permanent_fail": true}));
        let first = run_demo(&p, 1, CancellationToken::new(), |_, _| {}).await;
        assert!(matches!(first, Err(DemoError::InjectedRetryable { .. })));
        let second = run_demo(&p, 2, CancellationToken::new(), |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(second, DemoError::InjectedPermanent));
        assert!(matches!(JobFailure::from(second), JobFailure::Permanent(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_ends_the_run_early() {
        let p = payload(json!({"steps": 10, "step_ms": 1000}));
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            trigger.cancel();
        });
        let start = Instant::now();
        let mut steps = 0;
        let err = run_demo(&p, 1, cancel, |_, _| steps += 1)
            .await
            .unwrap_err();
        assert!(matches!(err, DemoError::Canceled));
        assert_eq!(steps, 2);
        assert_eq!(start.elapsed(), Duration::from_millis(2500));
        assert_eq!(JobFailure::from(err), JobFailure::Canceled);
    }

    #[tokio::test(start_paused = true)]
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
