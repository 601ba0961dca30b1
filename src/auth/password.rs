//! Password hashing and the input rules for passwords and email addresses.
//!
//! Owns: argon2id hashing/verification (OWASP parameters, PHC strings), the bound on how
//! much CPU hashing may take at once, the equal-time path for unknown accounts, and the
//! syntax rules for new passwords and emails.
//!
//! Must not: touch storage, log or return passwords, or run argon2 on an async worker
//! thread — every hash runs in `spawn_blocking` behind a semaphore, so a login flood
//! queues instead of starving the runtime.
//!
//! Two pools: verifications (sign-in) and new hashes (register, reset, password change)
//! each have their own permits and their own queue bound, so a flood of registrations or
//! resets fills only its own queue and is refused there (503), while sign-ins keep
//! their capacity. The hash pool is the smaller one (half the verify permits, at least 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use tokio::sync::Semaphore;

/// OWASP password storage cheat sheet, argon2id option 2: 19 MiB, 2 passes, 1 lane.
const M_COST_KIB: u32 = 19_456;
const T_COST: u32 = 2;
const P_COST: u32 = 1;

pub const MIN_PASSWORD_CHARS: usize = 10;
/// Argon2 accepts any length, but hashing megabytes per attempt is a cheap DoS.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// RFC 5321 limits a forward path to 256 octets including the angle brackets.
pub const MAX_EMAIL_BYTES: usize = 254;

/// How many hash requests may wait per permit before new ones are refused. Beyond this
/// the queue only adds latency (each hash is tens of ms), so failing fast is kinder.
const QUEUE_PER_PERMIT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Too many hashes queued; the caller should answer 503 and let the client retry.
    #[error("password hashing is overloaded; try again shortly")]
    Overloaded,
    /// The stored PHC string is not one we can verify (corrupt row or foreign format).
    #[error("the stored password hash is malformed")]
    MalformedHash,
    #[error("password hashing failed: {0}")]
    Hashing(String),
    /// The blocking task panicked or was cancelled at shutdown.
    #[error("password hashing task failed")]
    TaskFailed,
}

/// Hashes and verifies passwords without blocking the async runtime. Cheap to clone.
#[derive(Clone)]
pub struct PasswordHasher {
    inner: Arc<Inner>,
}

struct Inner {
    argon: Argon2<'static>,
    /// Verifications: sign-in and the current-password check.
    verify_pool: Pool,
    /// New hashes: register, reset, password change, rehash after login.
    hash_pool: Pool,
    /// Argon2 runs started, for tests and metrics (a refused request starts none).
    runs: AtomicU64,
    /// A valid PHC string with our parameters whose password nobody knows; verifying an
    /// unknown account against it costs the same as a real verification.
    dummy_phc: String,
}

/// Permits plus a bound on the requests holding or waiting for one.
struct Pool {
    permits: Semaphore,
    /// Requests holding or waiting for a permit; bounded by `max_in_flight`.
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

impl Pool {
    fn new(permits: usize) -> Pool {
        let permits = permits.max(1);
        Pool {
            permits: Semaphore::new(permits),
            in_flight: AtomicUsize::new(0),
            max_in_flight: permits * (QUEUE_PER_PERMIT + 1),
        }
    }
}

impl std::fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHasher")
            .field(
                "verify_permits",
                &self.inner.verify_pool.permits.available_permits(),
            )
            .field(
                "hash_permits",
                &self.inner.hash_pool.permits.available_permits(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl PasswordHasher {
    /// One permit per CPU but one (at least 1): more concurrent hashes than cores only
    /// adds contention, and leaving a core to everything else is what keeps a login flood
    /// from stretching every other request's latency (bench scenario 2, BENCHMARKS.md).
    pub fn new() -> PasswordHasher {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        PasswordHasher::with_permits(cpus.saturating_sub(1))
    }

    /// `permits` concurrent verifications at most (at least 1), and half as many new
    /// hashes (at least 1) in a pool of their own; mostly for tests and tuning.
    pub fn with_permits(permits: usize) -> PasswordHasher {
        let permits = permits.max(1);
        let params = Params::new(M_COST_KIB, T_COST, P_COST, None)
            .expect("the OWASP argon2 parameters are within argon2's limits");
        PasswordHasher {
            inner: Arc::new(Inner {
                argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
                verify_pool: Pool::new(permits),
                hash_pool: Pool::new(permits / 2),
                runs: AtomicU64::new(0),
                dummy_phc: dummy_phc(),
            }),
        }
    }

    /// Hashes a new password into a PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    /// The caller validates it first with [`validate_new_password`].
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        self.run_blocking(Which::Hash, move |inner| {
            let mut salt = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            let salt =
                SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hashing(e.to_string()))?;
            inner
                .argon
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| PasswordError::Hashing(e.to_string()))
        })
        .await
    }

    /// Checks `password` against a stored PHC string. `phc = None` means the account does
    /// not exist: the dummy hash is verified instead so the answer (false) takes as long
    /// as a wrong password would, and the response time does not reveal accounts.
    pub async fn verify(
        &self,
        password: String,
        phc: Option<String>,
    ) -> Result<bool, PasswordError> {
        self.run_blocking(Which::Verify, move |inner| {
            let known = phc.is_some();
            let phc = phc.as_deref().unwrap_or(&inner.dummy_phc);
            let parsed = PasswordHash::new(phc).map_err(|_| PasswordError::MalformedHash)?;
            // Argon2 verifies with the parameters stored in the PHC string, so hashes made
            // with older parameters keep working (see `needs_rehash`).
            match inner.argon.verify_password(password.as_bytes(), &parsed) {
                Ok(()) => Ok(known),
                Err(argon2::password_hash::Error::Password) => Ok(false),
                Err(e) => Err(PasswordError::Hashing(e.to_string())),
            }
        })
        .await
    }

    /// How many argon2 runs (hashes and verifications) have started so far.
    pub fn runs(&self) -> u64 {
        self.inner.runs.load(Ordering::Relaxed)
    }

    async fn run_blocking<T, F>(&self, which: Which, work: F) -> Result<T, PasswordError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, PasswordError> + Send + 'static,
    {
        let pool = match which {
            Which::Verify => &self.inner.verify_pool,
            Which::Hash => &self.inner.hash_pool,
        };
        let _slot = InFlight::enter(pool)?;
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| PasswordError::TaskFailed)?;
        self.inner.runs.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|_| PasswordError::TaskFailed)?
    }
}

#[derive(Clone, Copy)]
enum Which {
    Verify,
    Hash,
}

/// Counts a request from before it waits for a permit until it is done (or its future is
/// dropped), so the bound covers the queue as well as the running hashes.
struct InFlight<'a>(&'a Pool);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Pool) -> Result<InFlight<'a>, PasswordError> {
        let before = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = InFlight(inner);
        if before >= inner.max_in_flight {
            return Err(PasswordError::Overloaded); // `slot` drops and gives the count back
        }
        Ok(slot)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A well-formed PHC string with our parameters, random salt and random output. Nobody
/// knows a password that hashes to it, and building it costs no hashing at start-up.
fn dummy_phc() -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let mut salt = [0u8; 16];
    let mut out = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut out);
    let phc = format!(
        "$argon2id$v=19$m={M_COST_KIB},t={T_COST},p={P_COST}${}${}",
        b64.encode(salt),
        b64.encode(out)
    );
    debug_assert!(PasswordHash::new(&phc).is_ok(), "dummy PHC must parse");
    phc
}

/// True when a stored hash was made with other parameters than today's (or is not
/// argon2id), so the caller should re-hash the password after a successful login.
pub fn needs_rehash(phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return true;
    };
    if parsed.algorithm.as_str() != "argon2id" || parsed.version != Some(0x13) {
        return true;
    }
    let get = |name: &str| parsed.params.get_decimal(name);
    get("m") != Some(M_COST_KIB) || get("t") != Some(T_COST) || get("p") != Some(P_COST)
}

/// Rules for a new password (register, change, reset). Length only, as NIST 800-63B
/// advises: composition rules make passwords worse, not better.
pub fn validate_new_password(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!(
            "password must be at most {MAX_PASSWORD_BYTES} bytes"
        ));
    }
    Ok(())
}

/// Trims and lowercases an email and checks a sane syntax (the WHATWG `input type=email`
/// shape, minus dots at the ends of or doubled in the local part; ASCII only, so
/// international domains must be punycode). The result is the account key, so two
/// spellings of one address can never become two accounts.
pub fn normalize_email(input: &str) -> Result<String, String> {
    let email = input.trim().to_ascii_lowercase();
    if email.is_empty() {
        return Err("email is required".into());
    }
    if email.len() > MAX_EMAIL_BYTES {
        return Err(format!("email must be at most {MAX_EMAIL_BYTES} bytes"));
    }
    let invalid = || Err("email address is not valid".to_string());
    let Some((local, domain)) = email.split_once('@') else {
        return invalid();
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let domain_ok = !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if local_ok && domain_ok {
        Ok(email)
    } else {
        invalid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_then_verify() {
        let h = PasswordHasher::new();
        let phc = h.hash("correct horse battery".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!needs_rehash(&phc));
        assert!(
            h.verify("correct horse battery".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(
            !h.verify("correct horse battery!".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(!h.verify(String::new(), Some(phc)).await.unwrap());
    }

    #[tokio::test]
    async fn same_password_gets_a_new_salt_each_time() {
        let h = PasswordHasher::new();
        let a = h.hash("same password here".into()).await.unwrap();
        let b = h.hash("same password here".into()).await.unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn unknown_account_is_false_even_for_any_password() {
        let h = PasswordHasher::new();
        assert!(!h.verify("whatever password".into(), None).await.unwrap());
        assert!(!h.verify(String::new(), None).await.unwrap());
    }

    #[tokio::test]
    async fn unknown_account_takes_about_as_long_as_a_wrong_password() {
        // Argon2's cost depends only on its algorithm, version and parameters, so the
        // unknown-account path costs what a real verification costs exactly when the
        // dummy hash it verifies against has the same ones as real hashes. Checked
        // structurally: a wall-clock comparison flakes on a loaded machine.
        let h = PasswordHasher::with_permits(1);
        let real = h.hash("the real password".into()).await.unwrap();
        let real = PasswordHash::new(&real).unwrap();
        let dummy = PasswordHash::new(&h.inner.dummy_phc).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(
            Params::try_from(&dummy).unwrap(),
            Params::try_from(&real).unwrap()
        );
        assert_eq!(dummy.hash.map(|o| o.len()), real.hash.map(|o| o.len()));
        assert!(!h.verify("a wrong password".into(), None).await.unwrap());
        assert!(!h.verify("the real password".into(), None).await.unwrap());
    }

    #[tokio::test]
    async fn malformed_stored_hash_is_an_error_not_a_match() {
        let h = PasswordHasher::new();
        let err = h
            .verify("password1234".into(), Some("not a phc".into()))
            .await;
        assert!(matches!(err, Err(PasswordError::MalformedHash)), "{err:?}");
    }

    #[tokio::test]
    async fn hashes_with_old_parameters_still_verify_and_need_rehash() {
        // A hash made with weaker parameters (as an older release might have stored).
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = weak
            .hash_password(b"old password 1", &salt)
            .unwrap()
            .to_string();
        assert!(needs_rehash(&phc));
        assert!(needs_rehash("garbage"));
        let h = PasswordHasher::new();
        assert!(h.verify("old password 1".into(), Some(phc)).await.unwrap());
    }

    #[tokio::test]
    async fn concurrent_hashes_all_complete_with_one_permit() {
        let h = PasswordHasher::with_permits(1);
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move { h.hash(format!("password number {i}")).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(h.inner.hash_pool.in_flight.load(Ordering::Acquire), 0);
        assert_eq!(h.runs(), 4);
    }

    #[test]
    fn in_flight_bound_refuses_beyond_the_queue() {
        let h = PasswordHasher::with_permits(1);
        let pool = &h.inner.verify_pool;
        let max = pool.max_in_flight;
        let slots: Vec<_> = (0..max).map(|_| InFlight::enter(pool).unwrap()).collect();
        assert!(matches!(
            InFlight::enter(pool),
            Err(PasswordError::Overloaded)
        ));
        drop(slots);
        assert_eq!(pool.in_flight.load(Ordering::Acquire), 0);
        assert!(InFlight::enter(pool).is_ok());
    }

    #[tokio::test]
    async fn a_full_hash_queue_leaves_verification_open() {
        let h = PasswordHasher::with_permits(2);
        assert_eq!(h.inner.hash_pool.permits.available_permits(), 1);
        let pool = &h.inner.hash_pool;
        let slots: Vec<_> = (0..pool.max_in_flight)
            .map(|_| InFlight::enter(pool).unwrap())
            .collect();
        // Every permit of the hash pool is held too.
        let _held = pool.permits.acquire().await.unwrap();
        assert!(matches!(
            h.hash("some new password".into()).await,
            Err(PasswordError::Overloaded)
        ));
        let verified = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            h.verify("a wrong password".into(), None),
        )
        .await
        .expect("verification does not wait for the hash pool");
        assert!(!verified.unwrap());
        drop(slots);
    }

    #[test]
    fn new_password_rules() {
        let cases: &[(&str, bool)] = &[
            ("", false),
            ("123456789", false),
            ("1234567890", true),
            // Ten characters, more bytes: counted in characters.
            ("ééééééééé", false),
            ("éééééééééé", true),
            (&"x".repeat(MAX_PASSWORD_BYTES), true),
            (&"x".repeat(MAX_PASSWORD_BYTES + 1), false),
        ];
        for (pw, ok) in cases {
            assert_eq!(
                validate_new_password(pw).is_ok(),
                *ok,
                "{pw:?} ({} bytes)",
                pw.len()
            );
        }
    }

    #[test]
    fn email_normalization() {
        let long_local = "a".repeat(65);
        let too_long = format!("{}@{}.com", "a".repeat(64), "b".repeat(200));
        let cases: &[(&str, Option<&str>)] = &[
            ("  Alice@Example.COM ", Some("alice@example.com")),
            ("a@b", Some("a@b")),
            (
                "first.last+tag@sub.example.co",
                Some("first.last+tag@sub.example.co"),
            ),
            ("o'brien@example.ie", Some("o'brien@example.ie")),
            ("admin@localhost", Some("admin@localhost")),
            ("", None),
            ("   ", None),
            ("plainaddress", None),
            ("@example.com", None),
            ("alice@", None),
            ("a@b@c.com", None),
            ("alice @example.com", None),
            ("alice@exa mple.com", None),
            (".alice@example.com", None),
            ("alice.@example.com", None),
            ("al..ice@example.com", None),
            ("alice@example..com", None),
            ("alice@.example.com", None),
            ("alice@example.com.", None),
            ("alice@-example.com", None),
            ("alice@example-.com", None),
            ("alice@exa_mple.com", None),
            ("\"alice\"@example.com", None),
            ("alice@example.com\r\nBcc: x@y.z", None),
            ("alice<x>@example.com", None),
            ("jörg@example.com", None),
            ("alice@bücher.de", None),
            (&long_local, None),
            (&too_long, None),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize_email(input).ok().as_deref(),
                *want,
                "input {input:?}"
            );
        }
        let address = |last_label: usize| {
            let (a, b, c) = ("a".repeat(64), "b".repeat(63), "c".repeat(63));
            format!("{a}@{b}.{c}.{}.com", "d".repeat(last_label))
        };
        assert_eq!(address(57).len(), MAX_EMAIL_BYTES);
        assert!(normalize_email(&address(57)).is_ok());
        assert!(normalize_email(&address(58)).is_err());
    }
}
