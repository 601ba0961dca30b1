//! Retry delays: capped exponential backoff with full jitter.
//!
//! Full jitter (uniform over `[0, ceiling]`) spreads retries of jobs that failed together
//! — e.g. when a downstream service was down — instead of sending them back in lockstep.
//! Pure functions: the caller supplies the RNG, so tests are deterministic.

use std::time::Duration;

use rand::Rng;

/// The largest delay before retry number `attempt`: `min(cap, base·2^attempt)`.
///
/// Saturates instead of overflowing, so any `attempt` (even `u32::MAX`) yields `cap`.
pub fn backoff_ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exponential = 2u32
        .checked_pow(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .unwrap_or(Duration::MAX);
    exponential.min(cap)
}

/// A delay drawn uniformly from `[0, backoff_ceiling(attempt, base, cap)]`.
pub fn retry_delay(attempt: u32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(attempt, base, cap);
    // Ceilings beyond u64 nanoseconds (≈584 years) are clipped; the draw stays below the
    // ceiling either way.
    let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=ceiling_nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ceiling_doubles_then_caps() {
        let cases = [
            (0, S(1)),
            (1, S(2)),
            (2, S(4)),
            (3, S(8)),
            (9, S(512)),
            (10, S(600)),
            (31, S(600)),
            (32, S(600)),
            (1000, S(600)),
            (u32::MAX, S(600)),
        ];
        for (attempt, want) in cases {
            assert_eq!(
                backoff_ceiling(attempt, S(1), S(600)),
                want,
                "attempt {attempt}"
            );
        }
    }

    #[test]
    fn ceiling_saturates_with_huge_base_and_cap() {
        assert_eq!(
            backoff_ceiling(40, Duration::MAX / 2, Duration::MAX),
            Duration::MAX
        );
        assert_eq!(backoff_ceiling(0, S(5), S(1)), S(1), "cap below base wins");
        assert_eq!(backoff_ceiling(7, Duration::ZERO, S(60)), Duration::ZERO);
    }

    #[test]
    fn delay_is_jittered_over_the_whole_range() {
        let mut rng = StdRng::seed_from_u64(7);
        let ceiling = S(8);
        let draws: Vec<Duration> = (0..2000)
            .map(|_| retry_delay(3, S(1), S(600), &mut rng))
            .collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        // Full jitter: both the low and the high quarter of the range occur.
        assert!(draws.iter().any(|d| *d < ceiling / 4));
        assert!(draws.iter().any(|d| *d > ceiling * 3 / 4));
    }

    #[test]
    fn delay_handles_extreme_inputs() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            retry_delay(5, Duration::ZERO, S(600), &mut rng),
            Duration::ZERO
        );
        let d = retry_delay(u32::MAX, Duration::MAX, Duration::MAX, &mut rng);
        assert!(d <= Duration::MAX);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_cap_or_exponential_ceiling(
            attempt in any::<u32>(),
            base_ms in any::<u64>(),
            cap_ms in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = Duration::from_millis(cap_ms);
            let mut rng = StdRng::seed_from_u64(seed);
            let ceiling = backoff_ceiling(attempt, base, cap);
            prop_assert!(ceiling <= cap);
            if let Some(exp) = 2u32.checked_pow(attempt).and_then(|f| base.checked_mul(f)) {
                prop_assert!(ceiling <= exp);
                prop_assert_eq!(ceiling, exp.min(cap));
            }
            let delay = retry_delay(attempt, base, cap, &mut rng);
            prop_assert!(delay <= ceiling);
        }
    }
}
