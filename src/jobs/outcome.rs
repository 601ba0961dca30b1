//! How an attempt ends: the pure retry/dead decision the recorder applies to every
//! outcome (succeeded, canceled, retry at a time, dead), from the attempt number, the
//! job's `max_attempts`, the kind of failure and the backoff settings.
//!
//! Pure: the caller supplies "now" and the RNG, so the table tests are deterministic.
//! It must not touch storage, the hub or the clock.

use std::time::Duration;

use rand::Rng;

use super::JobFailure;
use super::backoff::retry_delay;
use crate::storage::states::JobStatus;

/// The backoff inputs of a retry (`jobs.backoff_base`, `jobs.backoff_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

/// What becomes of a job after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Succeeded,
    Canceled,
    /// Queued again (`retrying`), runnable at `at` (ms); `timeout` if the attempt timed out.
    Retry {
        at: i64,
        timeout: bool,
    },
    /// To the dead-letter queue; `timeout` if the last attempt timed out.
    Dead {
        timeout: bool,
    },
}

impl Decision {
    /// The job's new `status`.
    pub fn status(&self) -> JobStatus {
        match self {
            Decision::Succeeded => JobStatus::Succeeded,
            Decision::Canceled => JobStatus::Canceled,
            Decision::Retry { .. } => JobStatus::Retrying,
            Decision::Dead { .. } => JobStatus::Dead,
        }
    }

    /// The attempt's outcome label (`job_attempts.outcome`, `job_runs_total{outcome}`).
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Succeeded => "succeeded",
            Decision::Canceled => "canceled",
            Decision::Retry { timeout: true, .. } | Decision::Dead { timeout: true } => "timeout",
            Decision::Retry { timeout: false, .. } => "retry",
            Decision::Dead { timeout: false } => "dead",
        }
    }

    /// When the job may run next: the retry time, else `now`.
    pub fn run_at(&self, now: i64) -> i64 {
        match self {
            Decision::Retry { at, .. } => *at,
            _ => now,
        }
    }
}

/// Decides how attempt number `attempt` (1-based) of a job allowed `max_attempts` ends.
/// `failure` is None when the attempt succeeded. A retryable failure (or a timeout) is
/// retried with full-jitter backoff while attempts remain; anything else is final.
pub fn decide(
    failure: Option<&JobFailure>,
    attempt: u32,
    max_attempts: u32,
    now: i64,
    backoff: Backoff,
    rng: &mut impl Rng,
) -> Decision {
    let Some(f) = failure else {
        return Decision::Succeeded;
    };
    if matches!(f, JobFailure::Canceled) {
        return Decision::Canceled;
    }
    let timeout = matches!(f, JobFailure::Timeout);
    if f.is_retryable() && attempt < max_attempts {
        let delay = retry_delay(attempt, backoff.base, backoff.cap, rng);
        let at = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        Decision::Retry { at, timeout }
    } else {
        Decision::Dead { timeout }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const NOW: i64 = 1_000_000;
    const B: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(600),
    };

    fn retryable() -> JobFailure {
        JobFailure::Retryable("flaky".into())
    }
    fn permanent() -> JobFailure {
        JobFailure::Permanent("broken".into())
    }

    #[test]
    fn the_decision_table() {
        // (failure, attempt, max_attempts) → (status, label)
        let cases: Vec<(Option<JobFailure>, u32, u32, &str, &str)> = vec![
            (None, 1, 3, "succeeded", "succeeded"),
            (None, 3, 3, "succeeded", "succeeded"),
            (Some(JobFailure::Canceled), 1, 3, "canceled", "canceled"),
            (Some(JobFailure::Canceled), 3, 3, "canceled", "canceled"),
            (Some(retryable()), 1, 3, "retrying", "retry"),
            (Some(retryable()), 2, 3, "retrying", "retry"),
            (Some(retryable()), 3, 3, "dead", "dead"),
            (Some(retryable()), 4, 3, "dead", "dead"),
            (Some(retryable()), 1, 1, "dead", "dead"),
            (Some(JobFailure::Timeout), 1, 3, "retrying", "timeout"),
            (Some(JobFailure::Timeout), 3, 3, "dead", "timeout"),
            (Some(permanent()), 1, 3, "dead", "dead"),
            (Some(permanent()), 3, 3, "dead", "dead"),
        ];
        let mut rng = StdRng::seed_from_u64(3);
        for (failure, attempt, max, status, label) in cases {
            let d = decide(failure.as_ref(), attempt, max, NOW, B, &mut rng);
            assert_eq!(
                (d.status().as_str(), d.label()),
                (status, label),
                "{failure:?} at attempt {attempt} of {max}"
            );
            if status != "retrying" {
                assert_eq!(d.run_at(NOW), NOW, "a final outcome keeps run_at = now");
            }
        }
    }

    #[test]
    fn a_retry_waits_within_the_backoff_ceiling() {
        let mut rng = StdRng::seed_from_u64(9);
        for attempt in 1..10u32 {
            let ceiling = super::super::backoff::backoff_ceiling(attempt, B.base, B.cap);
            let d = decide(Some(&retryable()), attempt, 25, NOW, B, &mut rng);
            let Decision::Retry { at, timeout: false } = d else {
                panic!("attempt {attempt}: {d:?}");
            };
            assert!(at >= NOW && at <= NOW + ceiling.as_millis() as i64, "{at}");
        }
    }

    #[test]
    fn a_zero_backoff_retries_at_once_and_huge_ones_do_not_overflow() {
        let mut rng = StdRng::seed_from_u64(1);
        let zero = Backoff {
            base: Duration::ZERO,
            cap: Duration::ZERO,
        };
        assert_eq!(
            decide(Some(&retryable()), 1, 2, NOW, zero, &mut rng),
            Decision::Retry {
                at: NOW,
                timeout: false
            }
        );
        let huge = Backoff {
            base: Duration::MAX,
            cap: Duration::MAX,
        };
        let d = decide(
            Some(&JobFailure::Timeout),
            1,
            2,
            i64::MAX - 5,
            huge,
            &mut rng,
        );
        assert!(matches!(d, Decision::Retry { timeout: true, .. }), "{d:?}");
    }
}
