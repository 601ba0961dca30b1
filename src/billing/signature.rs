//! Stripe webhook signatures (`Stripe-Signature` header), exactly as Stripe specifies them.
//!
//! Owns: parsing the header, computing HMAC-SHA256 over `"{t}." + raw body`, comparing in
//! constant time against every configured secret (several secrets so a rotation never
//! drops events), and the timestamp tolerance. It must not parse the body: the signature
//! covers the raw bytes, so any re-serialisation before this check would break it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Stripe's default tolerance, and what the webhook endpoint uses.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Bytes of an HMAC-SHA256 signature (a `v1` value is twice as many hex digits).
const SIG_LEN: usize = 32;

/// Why a webhook delivery was not accepted as coming from Stripe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing Stripe-Signature header")]
    Missing,
    #[error("malformed Stripe-Signature header: {0}")]
    Malformed(&'static str),
    /// The signature is authentic but its timestamp is outside the tolerance (too old, or
    /// too far in the future): a replay, or a badly wrong clock.
    #[error("Stripe-Signature timestamp outside the tolerance")]
    Expired,
    #[error("no v1 signature matches any configured webhook secret")]
    Mismatch,
}

/// Checks `header` against `payload` (the raw request body) and returns the signed
/// timestamp `t`. Any `v1` signature matching any secret passes; `v0` and unknown schemes
/// are ignored, as Stripe's own libraries do.
///
/// Allocation-free: the header is validated in a first pass, then each secret's MAC is
/// computed once (not once per candidate) and compared with each `v1`, decoded into a
/// stack array, in constant time.
pub fn verify(
    payload: &[u8],
    header: Option<&str>,
    secrets: &[impl AsRef<str>],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<i64, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let t = parse_header(header)?;

    let mut digits = [0u8; I64_DIGITS];
    let t_text = decimal(t, &mut digits);
    let matched = secrets.iter().any(|secret| {
        let expected = mac_for(payload, secret.as_ref(), t_text)
            .finalize()
            .into_bytes();
        // Undecodable hex (or a wrong length) cannot match anything; it is skipped rather
        // than rejected so one garbled entry does not hide a valid signature next to it.
        v1_values(header).any(|candidate| {
            let mut decoded = [0u8; SIG_LEN];
            // `ct_eq` compares in constant time, so timing reveals nothing about how
            // much of a forged signature was right.
            hex::decode_to_slice(candidate, &mut decoded).is_ok()
                && bool::from(expected[..].ct_eq(&decoded[..]))
        })
    });
    if !matched {
        return Err(SignatureError::Mismatch);
    }

    // Like Stripe's libraries, the timestamp is judged only once the signature is known
    // to be authentic (the timestamp is part of what is signed).
    let tolerance = tolerance_secs.max(0);
    if t < now_unix.saturating_sub(tolerance) || t > now_unix.saturating_add(tolerance) {
        return Err(SignatureError::Expired);
    }
    Ok(t)
}

/// The `Stripe-Signature` header value Stripe would send for `payload` at time `t`.
/// Used by the offline fake Stripe and by tests.
pub fn sign(payload: &[u8], secret: &str, t: i64) -> String {
    let mut digits = [0u8; I64_DIGITS];
    let sig = mac_for(payload, secret, decimal(t, &mut digits))
        .finalize()
        .into_bytes();
    format!("t={t},v1={}", hex::encode(sig))
}

/// HMAC-SHA256 of `"{t}." + payload`, `t` in decimal as Stripe writes it.
fn mac_for(payload: &[u8], secret: &str, t_decimal: &[u8]) -> HmacSha256 {
    // Stripe keys the HMAC with the whole secret string, `whsec_` prefix included, not
    // with a decoded form of it.
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(t_decimal);
    mac.update(b".");
    mac.update(payload);
    mac
}

/// Enough for any i64 in decimal: 19 digits and a sign.
const I64_DIGITS: usize = 20;

/// `n` in decimal, written into the end of `buf` (what `n.to_string()` gives, without
/// allocating).
fn decimal(n: i64, buf: &mut [u8; I64_DIGITS]) -> &[u8] {
    let mut rest = n.unsigned_abs();
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        start -= 1;
        buf[start] = b'-';
    }
    &buf[start..]
}

/// The items of the header as trimmed `(key, value)` pairs; empty items are skipped and
/// `None` marks an item without `=`.
fn items(header: &str) -> impl Iterator<Item = Option<(&str, &str)>> {
    header
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.split_once('=')
                .map(|(key, value)| (key.trim(), value.trim()))
        })
}

/// The `v1` values of a header that [`parse_header`] accepted.
fn v1_values(header: &str) -> impl Iterator<Item = &str> {
    items(header).filter_map(|item| match item {
        Some(("v1", value)) => Some(value),
        _ => None,
    })
}

/// Validates the whole header and returns its timestamp: exactly one integer `t`, at
/// least one `v1`, every item `key=value`.
fn parse_header(header: &str) -> Result<i64, SignatureError> {
    let mut t = None;
    let mut has_v1 = false;
    for item in items(header) {
        let (key, value) = item.ok_or(SignatureError::Malformed("item without '='"))?;
        match key {
            "t" => {
                if t.is_some() {
                    return Err(SignatureError::Malformed("more than one timestamp"));
                }
                let parsed = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("timestamp is not an integer"))?;
                t = Some(parsed);
            }
            "v1" => has_v1 = true,
            // v0 is Stripe's test-mode scheme and other schemes may appear later; neither
            // may be trusted, so both are skipped.
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed("no timestamp"))?;
    if !has_v1 {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret_0123456789";
    const OLD_SECRET: &str = "whsec_old_rotated_away";
    const BODY: &[u8] = br#"{"id":"evt_1","object":"event"}"#;
    const T: i64 = 1_700_000_000;

    /// Derived independently with Python's `hmac` module:
    /// `hmac.new(b"whsec_test_secret_0123456789", b"1700000000." + BODY, hashlib.sha256)`.
    const PYTHON_VECTOR: &str = "0f06c232d18bc676bfacfc5240a2cfe4559e99421aacd50637b2ba2c7262e338";

    #[test]
    fn sign_matches_the_reference_implementation() {
        assert_eq!(sign(BODY, SECRET, T), format!("t={T},v1={PYTHON_VECTOR}"));
    }

    #[test]
    fn verify_accepts_a_header_built_from_the_reference_vector() {
        let header = format!("t={T},v1={PYTHON_VECTOR}");
        assert_eq!(verify(BODY, Some(&header), &[SECRET], T, 300), Ok(T));
    }

    #[test]
    fn table() {
        let good = hex_sig(BODY, SECRET, T);
        let other = hex_sig(BODY, "whsec_someone_else", T);
        let tampered_body: &[u8] = br#"{"id":"evt_2","object":"event"}"#;
        let v0_only = format!("t={T},v0={good}");
        let two_v1 = format!("t={T},v1={other},v1={good}");
        let junk_then_good = format!("t={T},v1=zz-not-hex,v1={good}");
        let good_header = format!("t={T},v1={good}");
        let spaced = format!("t={T}, v1={good}");
        let v0_and_v1 = format!("t={T},v1={good},v0=deadbeef");
        let no_t = format!("v1={good}");
        let bad_t = format!("t=abc,v1={good}");
        let two_t = format!("t={T},t={T},v1={good}");

        type Case<'a> = (
            &'a str,
            &'a [u8],
            Option<&'a str>,
            &'a [&'a str],
            i64,
            Result<i64, SignatureError>,
        );
        let cases: Vec<Case> = vec![
            ("valid", BODY, Some(&good_header), &[SECRET], T, Ok(T)),
            (
                "valid with spaces",
                BODY,
                Some(&spaced),
                &[SECRET],
                T,
                Ok(T),
            ),
            (
                "valid next to v0",
                BODY,
                Some(&v0_and_v1),
                &[SECRET],
                T,
                Ok(T),
            ),
            (
                "wrong secret",
                BODY,
                Some(&good_header),
                &["whsec_wrong"],
                T,
                Err(SignatureError::Mismatch),
            ),
            (
                "no secrets configured",
                BODY,
                Some(&good_header),
                &[],
                T,
                Err(SignatureError::Mismatch),
            ),
            (
                "tampered body",
                tampered_body,
                Some(&good_header),
                &[SECRET],
                T,
                Err(SignatureError::Mismatch),
            ),
            (
                "at the old edge",
                BODY,
                Some(&good_header),
                &[SECRET],
                T + 300,
                Ok(T),
            ),
            (
                "expired",
                BODY,
                Some(&good_header),
                &[SECRET],
                T + 301,
                Err(SignatureError::Expired),
            ),
            (
                "at the future edge",
                BODY,
                Some(&good_header),
                &[SECRET],
                T - 300,
                Ok(T),
            ),
            (
                "future",
                BODY,
                Some(&good_header),
                &[SECRET],
                T - 301,
                Err(SignatureError::Expired),
            ),
            (
                "missing header",
                BODY,
                None,
                &[SECRET],
                T,
                Err(SignatureError::Missing),
            ),
            (
                "empty header",
                BODY,
                Some(""),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("no timestamp")),
            ),
            (
                "no t",
                BODY,
                Some(&no_t),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("no timestamp")),
            ),
            (
                "t not a number",
                BODY,
                Some(&bad_t),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("timestamp is not an integer")),
            ),
            (
                "two t",
                BODY,
                Some(&two_t),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("more than one timestamp")),
            ),
            (
                "item without =",
                BODY,
                Some("garbage"),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("item without '='")),
            ),
            (
                "v0 only",
                BODY,
                Some(&v0_only),
                &[SECRET],
                T,
                Err(SignatureError::Malformed("no v1 signature")),
            ),
            (
                "multiple v1, one good",
                BODY,
                Some(&two_v1),
                &[SECRET],
                T,
                Ok(T),
            ),
            (
                "undecodable v1 next to a good one",
                BODY,
                Some(&junk_then_good),
                &[SECRET],
                T,
                Ok(T),
            ),
            (
                "rotated: second secret matches",
                BODY,
                Some(&good_header),
                &[OLD_SECRET, SECRET],
                T,
                Ok(T),
            ),
            (
                "rotated: first secret matches",
                BODY,
                Some(&good_header),
                &[SECRET, OLD_SECRET],
                T,
                Ok(T),
            ),
        ];
        for (name, body, header, secrets, now, want) in cases {
            assert_eq!(verify(body, header, secrets, now, 300), want, "case {name}");
        }
    }

    #[test]
    fn an_old_forgery_is_a_mismatch_not_expired() {
        // The timestamp of an unauthenticated header says nothing, so it must not decide
        // the error.
        let header = format!(
            "t={},v1={}",
            T - 10_000,
            hex_sig(BODY, "whsec_attacker", T - 10_000)
        );
        assert_eq!(
            verify(BODY, Some(&header), &[SECRET], T, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn secrets_may_be_owned_strings() {
        let secrets = vec![String::from(SECRET)];
        let header = sign(BODY, SECRET, T);
        assert_eq!(verify(BODY, Some(&header), &secrets, T, 300), Ok(T));
    }

    #[test]
    fn extreme_clock_values_do_not_overflow() {
        let header = sign(BODY, SECRET, i64::MIN);
        assert_eq!(
            verify(BODY, Some(&header), &[SECRET], i64::MAX, 300),
            Err(SignatureError::Expired)
        );
        let header = sign(BODY, SECRET, i64::MAX);
        assert_eq!(
            verify(BODY, Some(&header), &[SECRET], i64::MAX, 300),
            Ok(i64::MAX)
        );
    }

    #[test]
    fn decimal_matches_to_string() {
        for n in [
            0,
            7,
            -7,
            10,
            -10,
            1_700_000_000,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ] {
            let mut buf = [0u8; I64_DIGITS];
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn a_v1_of_the_wrong_length_is_skipped_not_a_match() {
        let good = hex_sig(BODY, SECRET, T);
        // A prefix of the right signature, and the right one with extra hex after it.
        let header = format!("t={T},v1={},v1={good}00", &good[..32]);
        assert_eq!(
            verify(BODY, Some(&header), &[SECRET], T, 300),
            Err(SignatureError::Mismatch)
        );
    }

    proptest::proptest! {
        /// Whatever the body, secret and time: what `sign` produces verifies, and flipping
        /// any one bit of the body makes it a mismatch.
        #[test]
        fn sign_verify_round_trip(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            secret in "whsec_[A-Za-z0-9]{1,40}",
            t in 0i64..4_000_000_000,
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let header = sign(&body, &secret, t);
            proptest::prop_assert_eq!(verify(&body, Some(&header), &[&secret], t, 300), Ok(t));
            if !body.is_empty() {
                let mut tampered = body.clone();
                tampered[flip.index(body.len())] ^= 1 << bit;
                proptest::prop_assert_eq!(
                    verify(&tampered, Some(&header), &[&secret], t, 300),
                    Err(SignatureError::Mismatch)
                );
            }
        }

        /// Arbitrary header text never panics the parser.
        #[test]
        fn arbitrary_headers_never_panic(header in "\\PC{0,200}") {
            let _ = verify(BODY, Some(&header), &[SECRET], T, 300);
        }
    }

    fn hex_sig(body: &[u8], secret: &str, t: i64) -> String {
        let header = sign(body, secret, t);
        header
            .split_once(",v1=")
            .map(|(_, sig)| sig.to_owned())
            .unwrap_or_default()
    }
}
