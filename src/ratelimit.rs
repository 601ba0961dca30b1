//! Attempt limiting for the unauthenticated auth routes, keyed by string
//! (`ip:203.0.113.7`), and the failure backoff of sign-in, keyed by (email, client
//! network).
//!
//! Owns: a sliding-window log per key in a bounded moka cache, and the retry-after it
//! implies ([`RateLimiter`]); a failure count per key with an exponentially growing delay
//! ([`FailureBackoff`]); and the client network a key is built from ([`client_network`]). Must not: hold a lock across an `.await` (it has no async API at all), grow
//! without bound, or decide what a key means — callers build keys and check several
//! (per IP and per email) for one request.
//!
//! State is in memory and per process: a restart forgets it, and under a flood of distinct
//! keys the cache may evict old entries. It slows guessing down; it is not an audit trail.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;

/// A sliding-window log costs one `Instant` per allowed attempt and key, so the number of
/// attempts per window is capped to keep a misconfiguration from costing real memory.
pub const MAX_ATTEMPTS_CAP: u32 = 10_000;

/// At most `max_attempts` within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePolicy {
    pub max_attempts: u32,
    pub window: Duration,
}

impl RatePolicy {
    pub fn new(max_attempts: u32, window: Duration) -> RatePolicy {
        RatePolicy {
            max_attempts,
            window,
        }
    }
}

/// Thread-safe and cheap to clone (the cache is shared).
#[derive(Clone)]
pub struct RateLimiter {
    max_attempts: usize,
    window: Duration,
    /// Key → times of the attempts allowed within the last window, oldest first.
    entries: Cache<String, Arc<Mutex<VecDeque<Instant>>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("max_attempts", &self.max_attempts)
            .field("window", &self.window)
            .field("keys", &self.entries.entry_count())
            .finish()
    }
}

impl RateLimiter {
    /// `capacity` bounds the number of keys tracked at once. `max_attempts` is clamped to
    /// 1..=[`MAX_ATTEMPTS_CAP`]; a zero window disables limiting.
    pub fn new(policy: RatePolicy, capacity: u64) -> RateLimiter {
        let window = policy.window;
        let mut builder = Cache::builder().max_capacity(capacity);
        if !window.is_zero() {
            // Idle, not live, expiry: an entry untouched for a whole window holds only
            // timestamps older than the window, so dropping it loses nothing. Expiring by
            // age since insertion could drop timestamps that still count.
            builder = builder.time_to_idle(window);
        }
        RateLimiter {
            max_attempts: policy.max_attempts.clamp(1, MAX_ATTEMPTS_CAP) as usize,
            window,
            entries: builder.build(),
        }
    }

    pub fn policy(&self) -> RatePolicy {
        RatePolicy::new(self.max_attempts as u32, self.window)
    }

    /// Records an attempt for `key` if it is allowed; otherwise returns how long until the
    /// next one would be. Refused attempts are not recorded, so a client that keeps
    /// hammering is not locked out longer than the window — the per-IP key handles floods.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a given time; time only moves forward for one key, so
    /// callers (tests) must not pass instants earlier than ones they already passed.
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.window.is_zero() {
            return Ok(());
        }
        let log = self
            .entries
            .get_with_by_ref(key, || Arc::new(Mutex::new(VecDeque::new())));
        // A poisoned lock only means another thread panicked mid-update; the log is a
        // list of instants and stays meaningful, so keep using it.
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some(&oldest) = log.front() {
            if now.saturating_duration_since(oldest) >= self.window {
                log.pop_front();
            } else {
                break;
            }
        }
        if log.len() >= self.max_attempts {
            // The oldest attempt in the window is the next to age out.
            let oldest = log.front().copied().unwrap_or(now);
            let retry_after = (oldest + self.window).saturating_duration_since(now);
            return Err(retry_after.max(Duration::from_secs(1)).min(self.window));
        }
        log.push_back(now);
        Ok(())
    }

    /// Forgets a key, e.g. the per-email counter after a successful login.
    pub fn reset(&self, key: &str) {
        self.entries.invalidate(key);
    }
}

/// The network a client address belongs to for failure counting: the /24 of an IPv4
/// address, the /64 of an IPv6 one (what one subscriber or one host usually has, so
/// hopping addresses inside it does not reset the count). `None` (no peer address) is a
/// network of its own.
pub fn client_network(ip: Option<&str>) -> String {
    use std::net::IpAddr;
    let Some(ip) = ip.and_then(|s| s.parse::<IpAddr>().ok()) else {
        return "unknown".into();
    };
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// When failures start to cost delay, how it grows, and when it is forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Failures that cost no delay; the next attempt after this many waits.
    pub free_failures: u32,
    /// The first delay; it doubles with each further failure.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// No attempt for the key before this instant.
    blocked_until: Option<Instant>,
}

/// Failure counting with growing delays. Only failures count; a success resets the key.
/// From the `free_failures`-th failure on, the n-th failure (n counted from there, from 0)
/// refuses the key for `base_delay × 2^n`, at most `max_delay`.
/// Refused attempts neither count nor extend the delay: the attacker's requests cannot
/// push a delay further out than its own failures did.
#[derive(Clone)]
pub struct FailureBackoff {
    policy: BackoffPolicy,
    entries: Cache<String, Arc<Mutex<Failures>>>,
}

impl std::fmt::Debug for FailureBackoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureBackoff")
            .field("policy", &self.policy)
            .field("keys", &self.entries.entry_count())
            .finish()
    }
}

impl FailureBackoff {
    /// `capacity` bounds the keys tracked at once; a key untouched for twice the
    /// longest delay (at least an hour) is forgotten. A zero `base_delay` disables it.
    pub fn new(policy: BackoffPolicy, capacity: u64) -> FailureBackoff {
        let forget = (policy.max_delay * 2).max(Duration::from_secs(3600));
        FailureBackoff {
            policy,
            entries: Cache::builder()
                .max_capacity(capacity)
                .time_to_idle(forget)
                .build(),
        }
    }

    /// `Err(retry_after)` while the key is in a delay.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let Some(entry) = self.entries.get(key) else {
            return Ok(());
        };
        let f = *entry.lock().unwrap_or_else(|p| p.into_inner());
        match f.blocked_until {
            Some(until) if until > now => Err(until
                .saturating_duration_since(now)
                .max(Duration::from_secs(1))),
            _ => Ok(()),
        }
    }

    /// Counts a failure for `key`.
    pub fn failure(&self, key: &str) {
        self.failure_at(key, Instant::now());
    }

    pub fn failure_at(&self, key: &str, now: Instant) {
        if self.policy.base_delay.is_zero() {
            return;
        }
        let entry = self.entries.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Failures {
                count: 0,
                blocked_until: None,
            }))
        });
        let mut f = entry.lock().unwrap_or_else(|p| p.into_inner());
        f.count = f.count.saturating_add(1);
        if f.count >= self.policy.free_failures.max(1) {
            let beyond = f.count - self.policy.free_failures.max(1);
            let factor = 1u32.checked_shl(beyond).unwrap_or(u32::MAX);
            let delay = self
                .policy
                .base_delay
                .checked_mul(factor)
                .unwrap_or(self.policy.max_delay)
                .min(self.policy.max_delay);
            f.blocked_until = Some(now + delay);
        }
    }

    /// Forgets the key: a successful sign-in.
    pub fn reset(&self, key: &str) {
        self.entries.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_networks() {
        let cases = [
            (Some("203.0.113.7"), "203.0.113.0/24"),
            (Some("203.0.113.250"), "203.0.113.0/24"),
            (Some("::ffff:198.51.100.9"), "198.51.100.0/24"),
            (Some("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64"),
            (Some("2001:db8::1"), "2001:db8:0:0::/64"),
            (Some("garbage"), "unknown"),
            (None, "unknown"),
        ];
        for (ip, want) in cases {
            assert_eq!(client_network(ip), want, "{ip:?}");
        }
    }

    fn backoff(free: u32) -> FailureBackoff {
        FailureBackoff::new(
            BackoffPolicy {
                free_failures: free,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(60),
            },
            100,
        )
    }

    #[test]
    fn failures_beyond_the_free_ones_cost_a_doubling_delay_up_to_the_cap() {
        let b = backoff(3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        for _ in 0..2 {
            assert!(b.check_at("k", t0).is_ok());
            b.failure_at("k", t0);
        }
        assert!(b.check_at("k", t0).is_ok(), "two failures cost nothing");
        // (failure at second, delay that follows): the third failure starts the delays.
        let steps = [
            (0, 1),
            (1, 2),
            (3, 4),
            (7, 8),
            (15, 16),
            (31, 32),
            (63, 60),
            (123, 60),
        ];
        for (t, delay) in steps {
            assert!(b.check_at("k", at(t)).is_ok(), "open at {t}");
            b.failure_at("k", at(t));
            assert_eq!(
                b.check_at("k", at(t)),
                Err(Duration::from_secs(delay)),
                "after failure at {t}"
            );
            assert!(b.check_at("k", at(t + delay)).is_ok());
        }
    }

    #[test]
    fn success_resets_and_keys_are_independent() {
        let b = backoff(2);
        let t0 = Instant::now();
        b.failure_at("a", t0);
        b.failure_at("a", t0);
        assert!(b.check_at("a", t0).is_err());
        assert!(b.check_at("b", t0).is_ok());
        b.reset("a");
        assert!(b.check_at("a", t0).is_ok());
        b.failure_at("a", t0);
        assert!(b.check_at("a", t0).is_ok(), "the count started over");
    }

    #[test]
    fn a_zero_base_delay_disables_backoff() {
        let b = FailureBackoff::new(
            BackoffPolicy {
                free_failures: 0,
                base_delay: Duration::ZERO,
                max_delay: Duration::from_secs(60),
            },
            10,
        );
        for _ in 0..50 {
            b.failure("k");
        }
        assert!(b.check("k").is_ok());
    }

    fn limiter(max: u32, window_secs: u64) -> RateLimiter {
        RateLimiter::new(RatePolicy::new(max, Duration::from_secs(window_secs)), 1000)
    }

    #[test]
    fn allows_max_then_refuses_with_retry_after() {
        let rl = limiter(3, 60);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(
                rl.check_at("ip:1.2.3.4", t0 + Duration::from_secs(i)),
                Ok(())
            );
        }
        // The first attempt (t0) ages out at t0 + 60 s.
        assert_eq!(
            rl.check_at("ip:1.2.3.4", t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
    }

    #[test]
    fn window_slides_rather_than_resetting() {
        let rl = limiter(2, 60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(rl.check_at("k", at(0)).is_ok());
        assert!(rl.check_at("k", at(50)).is_ok());
        assert_eq!(rl.check_at("k", at(59)), Err(Duration::from_secs(1)));
        // At 60 the first attempt has aged out, but the one at 50 still counts.
        assert!(rl.check_at("k", at(60)).is_ok());
        assert_eq!(rl.check_at("k", at(61)), Err(Duration::from_secs(49)));
        assert!(rl.check_at("k", at(110)).is_ok());
    }

    #[test]
    fn refused_attempts_are_not_counted() {
        let rl = limiter(1, 60);
        let t0 = Instant::now();
        assert!(rl.check_at("k", t0).is_ok());
        for s in 1..60 {
            assert!(rl.check_at("k", t0 + Duration::from_secs(s)).is_err());
        }
        assert!(rl.check_at("k", t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn keys_are_independent_and_reset_forgets() {
        let rl = limiter(1, 60);
        let t0 = Instant::now();
        assert!(rl.check_at("ip:10.0.0.1", t0).is_ok());
        assert!(rl.check_at("ip:10.0.0.2", t0).is_ok());
        assert!(rl.check_at("email:a@b", t0).is_ok());
        assert!(rl.check_at("ip:10.0.0.1", t0).is_err());
        rl.reset("ip:10.0.0.1");
        assert!(rl.check_at("ip:10.0.0.1", t0).is_ok());
        assert!(rl.check_at("ip:10.0.0.2", t0).is_err());
    }

    #[test]
    fn retry_after_is_at_least_a_second_and_at_most_the_window() {
        let rl = limiter(1, 60);
        let t0 = Instant::now();
        assert!(rl.check_at("k", t0).is_ok());
        let just_before = t0 + Duration::from_secs(60) - Duration::from_millis(1);
        assert_eq!(rl.check_at("k", just_before), Err(Duration::from_secs(1)));
        assert_eq!(rl.check_at("k", t0), Err(Duration::from_secs(60)));
    }

    #[test]
    fn policy_edge_cases() {
        // Zero attempts would lock everyone out forever; it means one.
        let rl = limiter(0, 60);
        assert_eq!(rl.policy().max_attempts, 1);
        let t0 = Instant::now();
        assert!(rl.check_at("k", t0).is_ok());
        assert!(rl.check_at("k", t0).is_err());
        // A zero window disables limiting.
        let off = limiter(1, 0);
        for _ in 0..100 {
            assert!(off.check("k").is_ok());
        }
        assert_eq!(
            limiter(u32::MAX, 60).policy().max_attempts,
            MAX_ATTEMPTS_CAP
        );
    }

    #[test]
    fn real_clock_with_a_tiny_window() {
        let rl = RateLimiter::new(RatePolicy::new(2, Duration::from_millis(50)), 10);
        assert!(rl.check("k").is_ok());
        assert!(rl.check("k").is_ok());
        assert!(rl.check("k").is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        while rl.check("k").is_err() {
            assert!(Instant::now() < deadline, "window never slid");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn concurrent_checks_never_allow_more_than_max() {
        let rl = limiter(50, 3600);
        let allowed = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if rl.check("email:shared@example.com").is_ok() {
                            allowed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(allowed.into_inner(), 50);
    }
}
