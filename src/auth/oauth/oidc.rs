//! OpenID Connect sign-in, for a generic provider (Keycloak, Authentik, Okta, …) and as
//! the engine behind Google: endpoints from discovery (cached) or fixed at start, the
//! code exchange, and validation of the ID token (signature against the provider's
//! JWKS, `iss`, `aud`, `azp`, `exp`, `nbf`, `nonce`).
//!
//! Must not: accept a symmetric or `none` algorithm, refetch the key set more often than
//! [`JWKS_MIN_REFRESH`] however many bad tokens arrive, or trust a discovery document
//! that names another issuer.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope,
    TokenUrl,
};
use reqwest::Url;
use serde::Deserialize;

use super::{
    AuthStart, Client, IdTokenProblem, OAuthError, OIDC, ProviderIdentity, checked_url, config_url,
    exchange, http_error, read_json, require_client,
};
use crate::auth::password::normalize_email;

/// How long a discovery document or key set is trusted before it is fetched again.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// An ID token signed by a key we do not know triggers a JWKS refetch (key rotation),
/// but not more often than this, so bad tokens cannot make us hammer the provider.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);
/// Clock skew allowed between us and the provider for `exp`/`nbf`.
const CLOCK_LEEWAY_SECS: u64 = 60;

/// `[auth.oauth.oidc]`: any OpenID Connect provider (Keycloak, Authentik, Okta, …),
/// configured by its issuer; endpoints come from discovery.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// Shown on the sign-in button.
    pub name: String,
    /// `openid` is always requested, listed or not.
    pub scopes: Vec<String>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        OidcConfig {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            name: "Single sign-on".into(),
            scopes: vec!["openid".into(), "email".into(), "profile".into()],
        }
    }
}

// Hand-written so a stray `{:?}` never prints a client secret.
impl fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// One OpenID Connect provider (the generic one, or Google).
pub(super) struct Oidc {
    pub(super) id: &'static str,
    pub(super) name: String,
    client_id: String,
    client_secret: String,
    /// As configured, without a trailing slash; discovery lives under it.
    issuer: String,
    scopes: Vec<String>,
    redirect: RedirectUrl,
    /// Google: fixed at start. Generic OIDC: `None`, fetched via discovery and cached.
    fixed: Option<Arc<Endpoints>>,
    discovered: Cache<(), Arc<Endpoints>>,
    jwks: Cache<(), Arc<KeySet>>,
}

pub(super) struct Endpoints {
    /// The `iss` values ID tokens may carry.
    pub(super) issuers: Vec<String>,
    pub(super) auth_url: AuthUrl,
    pub(super) token_url: TokenUrl,
    pub(super) jwks_url: Url,
    pub(super) auth_type: AuthType,
}

struct KeySet {
    fetched: Instant,
    keys: Vec<Jwk>,
}

/// Checks `[auth.oauth.oidc]` and builds its provider; makes no network calls (the
/// endpoints come from discovery at the first sign-in).
pub(super) fn provider(c: &OidcConfig, redirect: RedirectUrl) -> Result<Oidc, OAuthError> {
    require_client(OIDC, &c.client_id, &c.client_secret)?;
    let issuer = config_url("oidc.issuer", &c.issuer)?;
    let mut scopes = c.scopes.clone();
    if !scopes.iter().any(|s| s == "openid") {
        scopes.insert(0, "openid".into());
    }
    let name = if c.name.trim().is_empty() {
        OidcConfig::default().name
    } else {
        c.name.clone()
    };
    Ok(Oidc::new(
        OIDC,
        name,
        c.client_id.clone(),
        c.client_secret.clone(),
        issuer.as_str().trim_end_matches('/').to_string(),
        scopes,
        redirect,
        None,
    ))
}

impl Oidc {
    /// The authorization URL with fresh `state`, PKCE verifier and nonce. Async because
    /// a generic provider's endpoints come from (cached) discovery.
    pub(super) async fn start(&self, http: &reqwest::Client) -> Result<AuthStart, OAuthError> {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let endpoints = self.endpoints(http).await?;
        let nonce = CsrfToken::new_random().into_secret();
        let (url, state) = self
            .client(&endpoints)
            .authorize_url(CsrfToken::new_random)
            .add_scopes(self.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .add_extra_param("nonce", nonce.clone())
            .url();
        Ok(AuthStart {
            url: url.into(),
            state: state.into_secret(),
            pkce_verifier: verifier.into_secret(),
            nonce: Some(nonce),
        })
    }

    /// Exchanges the code and validates the ID token against the nonce from `start`.
    pub(super) async fn finish(
        &self,
        http: &reqwest::Client,
        code: String,
        pkce_verifier: String,
        nonce: Option<String>,
    ) -> Result<ProviderIdentity, OAuthError> {
        let Some(nonce) = nonce else {
            // Without the nonce from `start` a replayed ID token could not be told apart.
            return Err(self.bad_token(IdTokenProblem::WrongNonce));
        };
        let endpoints = self.endpoints(http).await?;
        let token = exchange(self.id, &self.client(&endpoints), http, code, pkce_verifier).await?;
        let Some(id_token) = token.extra_fields().id_token.as_deref() else {
            return Err(self.bad_token(IdTokenProblem::Missing));
        };
        self.validate(http, &endpoints, id_token, &nonce).await
    }
}

#[derive(Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct IdClaims {
    sub: String,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default, deserialize_with = "bool_or_string")]
    email_verified: bool,
    #[serde(default)]
    name: Option<String>,
}

/// Some providers (older Google tokens, some Cognito setups) send `"true"` as a string.
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Str(String),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Bool(b) => b,
        Flag::Str(s) => s.eq_ignore_ascii_case("true"),
    })
}

impl Oidc {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: &'static str,
        name: String,
        client_id: String,
        client_secret: String,
        issuer: String,
        scopes: Vec<String>,
        redirect: RedirectUrl,
        fixed: Option<Arc<Endpoints>>,
    ) -> Oidc {
        Oidc {
            id,
            name,
            client_id,
            client_secret,
            issuer,
            scopes,
            redirect,
            fixed,
            discovered: metadata_cache(),
            jwks: metadata_cache(),
        }
    }

    fn bad_token(&self, problem: IdTokenProblem) -> OAuthError {
        OAuthError::InvalidIdToken {
            provider: self.id,
            problem,
        }
    }

    fn provider_error(&self, message: String) -> OAuthError {
        OAuthError::Provider {
            provider: self.id,
            message,
        }
    }

    fn client(&self, endpoints: &Endpoints) -> Client {
        oauth2::Client::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.client_secret.clone()))
            .set_auth_uri(endpoints.auth_url.clone())
            .set_token_uri(endpoints.token_url.clone())
            .set_redirect_uri(self.redirect.clone())
            .set_auth_type(endpoints.auth_type.clone())
    }

    pub(super) async fn endpoints(
        &self,
        http: &reqwest::Client,
    ) -> Result<Arc<Endpoints>, OAuthError> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        // One fetch even when many sign-ins start at once; failures are not cached.
        self.discovered
            .try_get_with((), self.discover(http))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn discover(&self, http: &reqwest::Client) -> Result<Arc<Endpoints>, OAuthError> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(|e| http_error(self.id, &e))?;
        let doc: DiscoveryDoc = read_json(self.id, "discovery", resp).await?;
        // OIDC Discovery §4.3: the document must name the issuer we asked, or a
        // compromised or misconfigured host could pose as another provider.
        if doc.issuer.trim_end_matches('/') != self.issuer {
            return Err(
                self.provider_error("discovery document names a different issuer".to_string())
            );
        }
        let url = |what: &str, raw: &str| {
            checked_url(raw).map_err(|why| self.provider_error(format!("discovery: {what} {why}")))
        };
        // RFC 8414: the default when the list is absent is client_secret_basic.
        let methods = doc
            .token_endpoint_auth_methods_supported
            .unwrap_or_default();
        let auth_type = if methods.is_empty() || methods.iter().any(|m| m == "client_secret_basic")
        {
            AuthType::BasicAuth
        } else if methods.iter().any(|m| m == "client_secret_post") {
            AuthType::RequestBody
        } else {
            return Err(self.provider_error(
                "token endpoint supports neither client_secret_basic nor client_secret_post".into(),
            ));
        };
        Ok(Arc::new(Endpoints {
            issuers: vec![doc.issuer.clone()],
            auth_url: AuthUrl::from_url(url(
                "authorization_endpoint",
                &doc.authorization_endpoint,
            )?),
            token_url: TokenUrl::from_url(url("token_endpoint", &doc.token_endpoint)?),
            jwks_url: url("jwks_uri", &doc.jwks_uri)?,
            auth_type,
        }))
    }

    async fn key_set(
        &self,
        http: &reqwest::Client,
        endpoints: &Endpoints,
    ) -> Result<Arc<KeySet>, OAuthError> {
        self.jwks
            .try_get_with((), self.fetch_keys(http, endpoints))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch_keys(
        &self,
        http: &reqwest::Client,
        endpoints: &Endpoints,
    ) -> Result<Arc<KeySet>, OAuthError> {
        let resp = http
            .get(endpoints.jwks_url.clone())
            .send()
            .await
            .map_err(|e| http_error(self.id, &e))?;
        let raw: RawKeySet = read_json(self.id, "JWKS", resp).await?;
        // Parse key by key: one key of a type we do not know must not hide the others.
        let keys = raw
            .keys
            .into_iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
            .collect();
        Ok(Arc::new(KeySet {
            fetched: Instant::now(),
            keys,
        }))
    }

    async fn decoding_key(
        &self,
        http: &reqwest::Client,
        endpoints: &Endpoints,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<DecodingKey, OAuthError> {
        let set = self.key_set(http, endpoints).await?;
        if let Some(key) = select_key(&set.keys, alg, kid) {
            return self.to_decoding_key(key);
        }
        // Perhaps the provider rotated its keys since we cached them.
        if set.fetched.elapsed() < JWKS_MIN_REFRESH {
            return Err(self.bad_token(IdTokenProblem::UnknownKey));
        }
        self.jwks.invalidate(&()).await;
        let set = self.key_set(http, endpoints).await?;
        match select_key(&set.keys, alg, kid) {
            Some(key) => self.to_decoding_key(key),
            None => Err(self.bad_token(IdTokenProblem::UnknownKey)),
        }
    }

    fn to_decoding_key(&self, jwk: &Jwk) -> Result<DecodingKey, OAuthError> {
        DecodingKey::from_jwk(jwk).map_err(|_| self.bad_token(IdTokenProblem::UnknownKey))
    }

    pub(super) async fn validate(
        &self,
        http: &reqwest::Client,
        endpoints: &Endpoints,
        id_token: &str,
        nonce: &str,
    ) -> Result<ProviderIdentity, OAuthError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|_| self.bad_token(IdTokenProblem::Malformed))?;
        // Only asymmetric algorithms: accepting HS256 would let anyone who knows the
        // client secret (or a confused key) mint tokens, and `none` is never acceptable.
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(self.bad_token(IdTokenProblem::UnsupportedAlgorithm));
        }
        let key = self
            .decoding_key(http, endpoints, header.alg, header.kid.as_deref())
            .await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&endpoints.issuers);
        validation.set_audience(&[&self.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        // Checked against the system clock on purpose: the provider stamps real time,
        // so an injected test clock must not decide whether its token is fresh.
        validation.leeway = CLOCK_LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<IdClaims>(id_token, &key, &validation)
            .map_err(|e| self.bad_token(problem_of(e.kind())))?
            .claims;
        // OIDC Core §3.1.3.7: when `azp` is present it must be this client.
        if claims
            .azp
            .as_ref()
            .is_some_and(|azp| azp != &self.client_id)
        {
            return Err(self.bad_token(IdTokenProblem::WrongAuthorizedParty));
        }
        let nonce_ok = claims.nonce.as_deref().is_some_and(|n| {
            use subtle::ConstantTimeEq as _;
            bool::from(n.as_bytes().ct_eq(nonce.as_bytes()))
        });
        if !nonce_ok {
            return Err(self.bad_token(IdTokenProblem::WrongNonce));
        }
        if claims.sub.is_empty() {
            return Err(self.bad_token(IdTokenProblem::MissingClaim));
        }
        let email = claims
            .email
            .as_deref()
            .and_then(|e| normalize_email(e).ok());
        Ok(ProviderIdentity {
            provider: self.id.into(),
            subject: claims.sub,
            email_verified: claims.email_verified && email.is_some(),
            email,
            name: claims.name.filter(|n| !n.trim().is_empty()),
        })
    }
}

fn metadata_cache<V: Clone + Send + Sync + 'static>() -> Cache<(), V> {
    Cache::builder()
        .max_capacity(1)
        .time_to_live(METADATA_TTL)
        .build()
}

/// The key that may have signed a token with `alg` (and `kid`, if given). Without a
/// `kid` the choice must be unambiguous.
pub(super) fn select_key<'a>(
    keys: &'a [Jwk],
    alg: Algorithm,
    kid: Option<&str>,
) -> Option<&'a Jwk> {
    let fits = |k: &&Jwk| {
        let kind_ok = match (&k.algorithm, alg) {
            (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
                ec.curve == EllipticCurve::P256
            }
            _ => false,
        };
        let alg_ok = match k.common.key_algorithm {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(_) => false,
        };
        let use_ok = !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption));
        let kid_ok = kid.is_none_or(|kid| k.common.key_id.as_deref() == Some(kid));
        kind_ok && alg_ok && use_ok && kid_ok
    };
    let mut candidates = keys.iter().filter(fits);
    let first = candidates.next()?;
    if kid.is_none() && candidates.next().is_some() {
        return None;
    }
    Some(first)
}

fn problem_of(kind: &jsonwebtoken::errors::ErrorKind) -> IdTokenProblem {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => IdTokenProblem::BadSignature,
        K::ExpiredSignature => IdTokenProblem::Expired,
        K::ImmatureSignature => IdTokenProblem::NotYetValid,
        K::InvalidIssuer => IdTokenProblem::WrongIssuer,
        K::InvalidAudience => IdTokenProblem::WrongAudience,
        K::MissingRequiredClaim(_) => IdTokenProblem::MissingClaim,
        K::InvalidAlgorithm | K::MissingAlgorithm => IdTokenProblem::UnsupportedAlgorithm,
        _ => IdTokenProblem::Malformed,
    }
}
