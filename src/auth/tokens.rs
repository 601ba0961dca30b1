//! Access tokens (JWT, HS256) and opaque refresh tokens.
//!
//! Access tokens are short-lived and stateless to verify; revocation is enforced by the
//! extractor comparing `ver` and `sid` against the cached auth state. Refresh tokens are
//! 256 random bits, shown to the client once and stored only as a SHA-256 hash.
//!
//! A client sends the same access token with every request for up to 15 minutes, and
//! verifying it (base64, two JSON documents, HMAC) was the largest single cost of an
//! authenticated request. Tokens that verified are remembered by their exact bytes; a
//! repeat only re-checks expiry. Nothing unverified is ever stored, so random tokens
//! cannot fill the cache, and revocation is unaffected: it is checked after this, on
//! every request, against the session and the user's token version.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Session id.
    pub sid: String,
    /// The user's token_version when the token was issued.
    pub ver: i64,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token is invalid")]
    Invalid,
}

/// The HS256 key pair derived from the configured or generated secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// token → its claims, for tokens that passed [`JwtKeys::verify`] in full.
    verified: moka::sync::Cache<Box<str>, Arc<Claims>>,
}

/// How many verified tokens are remembered (about 400 bytes each): one per client that
/// was active in the last [`VERIFIED_TTL`]; beyond that the least used are verified anew.
const VERIFIED_CAPACITY: u64 = 50_000;
/// No access token lives longer than this by default; a longer configured lifetime only
/// means a re-verification after it.
const VERIFIED_TTL: Duration = Duration::from_secs(15 * 60);
/// Tokens longer than this are not remembered (ours are about 250 bytes).
const MAX_CACHED_TOKEN: usize = 1024;

impl JwtKeys {
    pub fn new(secret: &[u8]) -> JwtKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        // Only HS256: a token claiming `none` or RS256 is rejected before any key is used.
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CAPACITY)
                .time_to_live(VERIFIED_TTL)
                .build(),
        }
    }

    pub fn issue(&self, claims: &Claims) -> String {
        // Encoding HS256 with a valid key cannot fail for these plain claims.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Verifies signature, algorithm and expiry against `now_secs` (and the system
    /// clock). A token that verified before is only checked for expiry again.
    pub fn verify(&self, token: &str, now_secs: i64) -> Result<Arc<Claims>, TokenError> {
        if let Some(claims) = self.verified.get(token) {
            return if claims.exp <= now_secs.max(system_secs()) {
                Err(TokenError::Expired)
            } else {
                Ok(claims)
            };
        }
        let claims = Arc::new(self.verify_uncached(token, now_secs)?);
        if token.len() <= MAX_CACHED_TOKEN {
            self.verified.insert(token.into(), claims.clone());
        }
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str, now_secs: i64) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        // jsonwebtoken checks `exp` against the system clock; also check the injected one
        // so tests (and a clock that runs ahead) agree.
        if data.claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(data.claims)
    }
}

/// Seconds since the epoch by the system clock, which jsonwebtoken checks `exp` against.
fn system_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub use crate::secrets::random_token;

/// How opaque tokens are stored.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "u1".into(),
            sid: "s1".into(),
            ver: 0,
            iat: exp - 900,
            exp,
        }
    }

    fn now() -> i64 {
        crate::clock::now_millis() / 1000
    }

    #[test]
    fn round_trip_and_expiry() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef");
        let c = claims(now() + 900);
        let t = keys.issue(&c);
        let verify = |t: &str, at: i64| keys.verify(t, at).map(|c| (*c).clone());
        assert_eq!(verify(&t, now()), Ok(c.clone()));
        // The second time the claims come from the verified-token cache: the same
        // claims, and expiry is still checked against the clock given.
        assert_eq!(verify(&t, now()), Ok(c.clone()));
        assert_eq!(verify(&t, c.exp), Err(TokenError::Expired));
        assert_eq!(verify(&t, c.exp - 1), Ok(c.clone()), "not expired yet");
        let old = keys.issue(&claims(now() - 10));
        assert_eq!(keys.verify(&old, now()), Err(TokenError::Expired));
    }

    #[test]
    fn rejects_other_keys_tampering_and_alg_none() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef");
        let other = JwtKeys::new(b"another-secret-another-secret-xx");
        let t = other.issue(&claims(now() + 900));
        assert_eq!(keys.verify(&t, now()), Err(TokenError::Invalid));

        let good = keys.issue(&claims(now() + 900));
        // With the genuine token verified (and remembered), near-copies still fail.
        assert!(keys.verify(&good, now()).is_ok());
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                sub: "admin".into(),
                ..claims(now() + 900)
            })
            .expect("json"),
        );
        parts[1] = &forged_payload;
        assert_eq!(
            keys.verify(&parts.join("."), now()),
            Err(TokenError::Invalid)
        );

        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!(
            "{none_header}.{}.",
            good.split('.').nth(1).expect("payload")
        );
        assert_eq!(keys.verify(&unsigned, now()), Err(TokenError::Invalid));

        let rs_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let mut rs = vec![rs_header.as_str()];
        rs.extend(good.split('.').skip(1));
        assert_eq!(keys.verify(&rs.join("."), now()), Err(TokenError::Invalid));
        assert_eq!(keys.verify("garbage", now()), Err(TokenError::Invalid));
        let mut flipped = good.clone().into_bytes();
        // A character inside the signature (the last one carries padding bits).
        let i = flipped.len() - 5;
        flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert_eq!(keys.verify(&flipped, now()), Err(TokenError::Invalid));
        assert!(keys.verify(&good, now()).is_ok());
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(hash_token(&a).len(), 32);
        assert_eq!(hash_token(&a), hash_token(&a));
    }
}
