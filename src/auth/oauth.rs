//! Sign-in with GitHub, Google and a generic OpenID Connect provider.
//!
//! Owns: building the authorization URL (code flow with PKCE S256, `state`, and `nonce`
//! for OIDC), the code exchange, and turning the provider's answer into a
//! [`ProviderIdentity`] — for GitHub via its REST API, for OIDC by validating the ID token
//! (signature against the provider's JWKS, `iss`, `aud`, `exp`, `nonce`). Discovery
//! documents and key sets are cached.
//!
//! Must not: store anything (the caller keeps `state` → verifier/nonce server-side and
//! decides about accounts and linking), follow HTTP redirects (the `oauth2` crate
//! requires this against SSRF), make a call without a timeout, or put secrets, codes or
//! tokens into errors, logs or `Debug` output.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::url::Host;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, HttpClientError, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RequestTokenError, Scope, StandardRevocableToken, StandardTokenResponse,
    TokenResponse as _, TokenUrl,
};
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::password::normalize_email;

pub const GITHUB: &str = "github";
pub const GOOGLE: &str = "google";
pub const OIDC: &str = "oidc";

/// Every outbound call (token exchange, user info, discovery, JWKS) gives up after this.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Provider answers are small JSON documents; anything bigger is refused unread.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// How long a discovery document or key set is trusted before it is fetched again.
const METADATA_TTL: Duration = Duration::from_secs(3600);
/// An ID token signed by a key we do not know triggers a JWKS refetch (key rotation),
/// but not more often than this, so bad tokens cannot make us hammer the provider.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);
/// Clock skew allowed between us and the provider for `exp`/`nbf`.
const CLOCK_LEEWAY_SECS: u64 = 60;

const GOOGLE_ISSUER: &str = "https://accounts.google.com";

// ---------------------------------------------------------------------------------------
// Configuration

/// `[auth.oauth.github]`. Enabled when present. The URLs default to github.com and are
/// overridable for GitHub Enterprise and for tests.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GithubConfig {
    pub client_id: String,
    pub client_secret: String,
    pub auth_url: String,
    pub token_url: String,
    pub api_url: String,
}

impl Default for GithubConfig {
    fn default() -> Self {
        GithubConfig {
            client_id: String::new(),
            client_secret: String::new(),
            auth_url: "https://github.com/login/oauth/authorize".into(),
            token_url: "https://github.com/login/oauth/access_token".into(),
            api_url: "https://api.github.com".into(),
        }
    }
}

/// `[auth.oauth.google]`. Google's endpoints are fixed (no discovery round trip); each is
/// overridable for tests.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoogleConfig {
    pub client_id: String,
    pub client_secret: String,
    pub issuer: String,
    pub auth_url: String,
    pub token_url: String,
    pub jwks_url: String,
}

impl Default for GoogleConfig {
    fn default() -> Self {
        GoogleConfig {
            client_id: String::new(),
            client_secret: String::new(),
            issuer: GOOGLE_ISSUER.into(),
            auth_url: "https://accounts.google.com/o/oauth2/v2/auth".into(),
            token_url: "https://oauth2.googleapis.com/token".into(),
            jwks_url: "https://www.googleapis.com/oauth2/v3/certs".into(),
        }
    }
}

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

/// `[auth.oauth]`: a provider is enabled by its section being present.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfigs {
    pub github: Option<GithubConfig>,
    pub google: Option<GoogleConfig>,
    pub oidc: Option<OidcConfig>,
}

// Hand-written so a stray `{:?}` never prints a client secret.
impl fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("api_url", &self.api_url)
            .finish()
    }
}

impl fmt::Debug for GoogleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoogleConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("issuer", &self.issuer)
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("jwks_url", &self.jwks_url)
            .finish()
    }
}

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

impl fmt::Debug for OAuthConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthConfigs")
            .field("github", &self.github)
            .field("google", &self.google)
            .field("oidc", &self.oidc)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// Results and errors

/// What the caller needs to send the browser to the provider and to finish later. Store
/// `state` → (`pkce_verifier`, `nonce`) server-side; only `url` goes to the browser.
#[derive(Clone)]
pub struct AuthStart {
    pub url: String,
    pub state: String,
    pub pkce_verifier: String,
    /// Present for OIDC providers (Google, generic), whose ID token must echo it.
    pub nonce: Option<String>,
}

impl fmt::Debug for AuthStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthStart")
            .field("url", &self.url)
            .field("state", &self.state)
            // State and nonce travel through the browser anyway; the verifier never does,
            // which is what makes an intercepted code useless.
            .field("pkce_verifier", &"[redacted]")
            .field("nonce", &self.nonce)
            .finish()
    }
}

/// Who the provider says signed in. `email` is normalized (see
/// [`normalize_email`](super::password::normalize_email)) and dropped if unusable;
/// it may be present but unverified — only `email_verified` may justify linking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderIdentity {
    pub provider: String,
    /// Stable id at the provider (GitHub's numeric user id, OIDC `sub`).
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
}

/// Why an ID token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdTokenProblem {
    Missing,
    Malformed,
    UnsupportedAlgorithm,
    UnknownKey,
    BadSignature,
    WrongIssuer,
    WrongAudience,
    WrongAuthorizedParty,
    Expired,
    NotYetValid,
    MissingClaim,
    WrongNonce,
}

impl fmt::Display for IdTokenProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdTokenProblem::Missing => "the token response has no id_token",
            IdTokenProblem::Malformed => "malformed token",
            IdTokenProblem::UnsupportedAlgorithm => "unsupported signing algorithm",
            IdTokenProblem::UnknownKey => "no matching key in the provider's key set",
            IdTokenProblem::BadSignature => "bad signature",
            IdTokenProblem::WrongIssuer => "wrong issuer",
            IdTokenProblem::WrongAudience => "wrong audience",
            IdTokenProblem::WrongAuthorizedParty => "wrong authorized party (azp)",
            IdTokenProblem::Expired => "expired",
            IdTokenProblem::NotYetValid => "not yet valid",
            IdTokenProblem::MissingClaim => "a required claim is missing",
            IdTokenProblem::WrongNonce => "nonce mismatch",
        })
    }
}

/// Messages name the provider and what went wrong, never a secret, code or token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    #[error("unknown or disabled OAuth provider `{0}`")]
    UnknownProvider(String),
    #[error("OAuth configuration: {0}")]
    Config(String),
    /// The token endpoint refused the code (bad, reused or expired code, PKCE mismatch,
    /// wrong client credentials) or answered nonsense. Holds the OAuth error code if any.
    #[error("{provider}: code exchange failed: {reason}")]
    Exchange {
        provider: &'static str,
        reason: String,
    },
    #[error("{provider}: invalid ID token: {problem}")]
    InvalidIdToken {
        provider: &'static str,
        problem: IdTokenProblem,
    },
    /// The provider answered, but not as expected (status, shape, discovery mismatch).
    #[error("{provider}: {message}")]
    Provider {
        provider: &'static str,
        message: String,
    },
    /// No usable answer at all: connect error, timeout, reset.
    #[error("{provider}: request failed: {message}")]
    Http {
        provider: &'static str,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------
// The providers

/// The enabled providers. Cheap to clone; caches are shared.
#[derive(Clone)]
pub struct OAuthProviders {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    github: Option<Github>,
    google: Option<Oidc>,
    oidc: Option<Oidc>,
}

struct Github {
    client_id: String,
    client_secret: String,
    auth_url: AuthUrl,
    token_url: TokenUrl,
    /// Without a trailing slash.
    api_url: String,
    redirect: RedirectUrl,
}

struct Oidc {
    id: &'static str,
    name: String,
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

struct Endpoints {
    /// The `iss` values ID tokens may carry.
    issuers: Vec<String>,
    auth_url: AuthUrl,
    token_url: TokenUrl,
    jwks_url: Url,
    auth_type: AuthType,
}

struct KeySet {
    fetched: Instant,
    keys: Vec<Jwk>,
}

/// The `oauth2` client with `id_token` kept from the token response.
type Client = oauth2::Client<
    BasicErrorResponse,
    StandardTokenResponse<IdTokenField, BasicTokenType>,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

#[derive(Clone, Deserialize, Serialize)]
struct IdTokenField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

impl ExtraTokenFields for IdTokenField {}

impl fmt::Debug for IdTokenField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdTokenField([redacted])")
    }
}

/// The HTTP client every provider call uses: 10 s timeout, no redirects (a redirect from
/// a token endpoint would send the code elsewhere; `oauth2` requires this), and a
/// User-Agent (GitHub's API refuses requests without one).
pub fn http_client() -> Result<reqwest::Client, OAuthError> {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("warpbase/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| OAuthError::Config(format!("cannot build the HTTP client: {e}")))
}

impl OAuthProviders {
    /// Checks the configuration (URLs must be https, or http on a loopback host for
    /// local fakes) and prepares the providers; makes no network calls.
    /// `public_url` is where browsers reach warpbase; callbacks go to
    /// `{public_url}/api/v1/auth/oauth/{provider}/callback`.
    pub fn new(configs: &OAuthConfigs, public_url: &str) -> Result<OAuthProviders, OAuthError> {
        Self::with_http_client(configs, public_url, http_client()?)
    }

    /// As [`new`](Self::new) with a given client, which must not follow redirects.
    pub fn with_http_client(
        configs: &OAuthConfigs,
        public_url: &str,
        http: reqwest::Client,
    ) -> Result<OAuthProviders, OAuthError> {
        let redirect = |provider: &str| {
            let url = format!(
                "{}/api/v1/auth/oauth/{provider}/callback",
                public_url.trim_end_matches('/')
            );
            Url::parse(&url)
                .map(RedirectUrl::from_url)
                .map_err(|_| OAuthError::Config(format!("public_url `{public_url}` is not a URL")))
        };
        let github = match &configs.github {
            None => None,
            Some(c) => {
                require_client(GITHUB, &c.client_id, &c.client_secret)?;
                Some(Github {
                    client_id: c.client_id.clone(),
                    client_secret: c.client_secret.clone(),
                    auth_url: AuthUrl::from_url(config_url("github.auth_url", &c.auth_url)?),
                    token_url: TokenUrl::from_url(config_url("github.token_url", &c.token_url)?),
                    api_url: config_url("github.api_url", &c.api_url)?
                        .as_str()
                        .trim_end_matches('/')
                        .to_string(),
                    redirect: redirect(GITHUB)?,
                })
            }
        };
        let google = match &configs.google {
            None => None,
            Some(c) => {
                require_client(GOOGLE, &c.client_id, &c.client_secret)?;
                let issuer = config_url("google.issuer", &c.issuer)?;
                let issuer = issuer.as_str().trim_end_matches('/').to_string();
                let mut issuers = vec![issuer.clone()];
                if issuer == GOOGLE_ISSUER {
                    // Google's ID tokens may carry the issuer without the scheme.
                    issuers.push("accounts.google.com".into());
                }
                let fixed = Endpoints {
                    issuers,
                    auth_url: AuthUrl::from_url(config_url("google.auth_url", &c.auth_url)?),
                    token_url: TokenUrl::from_url(config_url("google.token_url", &c.token_url)?),
                    jwks_url: config_url("google.jwks_url", &c.jwks_url)?,
                    auth_type: AuthType::BasicAuth,
                };
                Some(Oidc::new(
                    GOOGLE,
                    "Google".into(),
                    c.client_id.clone(),
                    c.client_secret.clone(),
                    issuer,
                    vec!["openid".into(), "email".into(), "profile".into()],
                    redirect(GOOGLE)?,
                    Some(Arc::new(fixed)),
                ))
            }
        };
        let oidc = match &configs.oidc {
            None => None,
            Some(c) => {
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
                Some(Oidc::new(
                    OIDC,
                    name,
                    c.client_id.clone(),
                    c.client_secret.clone(),
                    issuer.as_str().trim_end_matches('/').to_string(),
                    scopes,
                    redirect(OIDC)?,
                    None,
                ))
            }
        };
        Ok(OAuthProviders {
            inner: Arc::new(Inner {
                http,
                github,
                google,
                oidc,
            }),
        })
    }

    /// `(id, display name)` of each enabled provider, in a stable order.
    pub fn enabled(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.inner.github.is_some() {
            out.push((GITHUB, "GitHub".to_string()));
        }
        for p in [&self.inner.google, &self.inner.oidc].into_iter().flatten() {
            out.push((p.id, p.name.clone()));
        }
        out
    }

    /// Builds the authorization URL with fresh `state`, PKCE verifier and (OIDC) nonce.
    /// Async because a generic OIDC provider's endpoints come from (cached) discovery.
    pub async fn start(&self, provider: &str) -> Result<AuthStart, OAuthError> {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        if provider == GITHUB {
            let gh = self.github()?;
            let (url, state) = gh
                .client()
                .authorize_url(CsrfToken::new_random)
                .add_scope(Scope::new("read:user".into()))
                .add_scope(Scope::new("user:email".into()))
                .set_pkce_challenge(challenge)
                .url();
            return Ok(AuthStart {
                url: url.into(),
                state: state.into_secret(),
                pkce_verifier: verifier.into_secret(),
                nonce: None,
            });
        }
        let oidc = self.oidc(provider)?;
        let endpoints = oidc.endpoints(&self.inner.http).await?;
        let nonce = CsrfToken::new_random().into_secret();
        let (url, state) = oidc
            .client(&endpoints)
            .authorize_url(CsrfToken::new_random)
            .add_scopes(oidc.scopes.iter().cloned().map(Scope::new))
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

    /// Exchanges the callback's `code` (with the verifier and nonce stored at
    /// [`start`](Self::start)) and returns who signed in. The caller has already matched
    /// the callback's `state` against its store.
    pub async fn finish(
        &self,
        provider: &str,
        code: String,
        pkce_verifier: String,
        nonce: Option<String>,
    ) -> Result<ProviderIdentity, OAuthError> {
        let http = &self.inner.http;
        if provider == GITHUB {
            let gh = self.github()?;
            let token = exchange(GITHUB, &gh.client(), http, code, pkce_verifier).await?;
            return gh.identity(http, token.access_token().secret()).await;
        }
        let oidc = self.oidc(provider)?;
        let Some(nonce) = nonce else {
            // Without the nonce from `start` a replayed ID token could not be told apart.
            return Err(oidc.bad_token(IdTokenProblem::WrongNonce));
        };
        let endpoints = oidc.endpoints(http).await?;
        let token = exchange(oidc.id, &oidc.client(&endpoints), http, code, pkce_verifier).await?;
        let Some(id_token) = token.extra_fields().id_token.as_deref() else {
            return Err(oidc.bad_token(IdTokenProblem::Missing));
        };
        oidc.validate(http, &endpoints, id_token, &nonce).await
    }

    fn github(&self) -> Result<&Github, OAuthError> {
        self.inner
            .github
            .as_ref()
            .ok_or_else(|| OAuthError::UnknownProvider(GITHUB.into()))
    }

    fn oidc(&self, provider: &str) -> Result<&Oidc, OAuthError> {
        let found = match provider {
            GOOGLE => self.inner.google.as_ref(),
            OIDC => self.inner.oidc.as_ref(),
            _ => None,
        };
        found.ok_or_else(|| OAuthError::UnknownProvider(printable(provider)))
    }
}

impl fmt::Debug for OAuthProviders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthProviders")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

fn require_client(provider: &str, id: &str, secret: &str) -> Result<(), OAuthError> {
    if id.trim().is_empty() || secret.is_empty() {
        return Err(OAuthError::Config(format!(
            "{provider}: client_id and client_secret are required"
        )));
    }
    Ok(())
}

/// Provider endpoints must be https; plain http only on loopback, for local fakes.
fn checked_url(raw: &str) -> Result<Url, &'static str> {
    let url = Url::parse(raw.trim()).map_err(|_| "is not a valid URL")?;
    let loopback = match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err("must be an https URL (http only for localhost)"),
    }
}

fn config_url(key: &str, raw: &str) -> Result<Url, OAuthError> {
    checked_url(raw).map_err(|why| OAuthError::Config(format!("{key} `{raw}` {why}")))
}

/// Keeps provider-supplied text out of messages unless it is short and harmless.
fn printable(s: &str) -> String {
    let ok = s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        s.to_string()
    } else {
        "(unprintable)".to_string()
    }
}

fn http_error(provider: &'static str, e: &reqwest::Error) -> OAuthError {
    // Fixed phrases rather than reqwest's text, which embeds URLs and may grow details.
    let message = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_redirect() {
        "redirects are not followed"
    } else if e.is_body() || e.is_decode() {
        "the response body could not be read"
    } else {
        "the connection failed"
    };
    OAuthError::Http {
        provider,
        message: message.into(),
    }
}

async fn exchange(
    provider: &'static str,
    client: &Client,
    http: &reqwest::Client,
    code: String,
    verifier: String,
) -> Result<StandardTokenResponse<IdTokenField, BasicTokenType>, OAuthError> {
    let result = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier))
        .request_async(http)
        .await;
    result.map_err(|e| {
        let reason = match e {
            RequestTokenError::ServerResponse(r) => printable(r.error().as_ref()),
            RequestTokenError::Request(HttpClientError::Reqwest(e)) => {
                return http_error(provider, &e);
            }
            RequestTokenError::Request(_) => "the request could not be sent".into(),
            // GitHub reports errors with status 200, which fails to parse as a token.
            // The body may hold anything (even a token), so only its `error` code is used.
            RequestTokenError::Parse(_, body) => {
                match serde_json::from_slice::<BasicErrorResponse>(&body) {
                    Ok(r) => printable(r.error().as_ref()),
                    Err(_) => "unexpected token response".into(),
                }
            }
            RequestTokenError::Other(_) => "unexpected token response".into(),
        };
        OAuthError::Exchange { provider, reason }
    })
}

/// Reads a JSON body of at most [`MAX_RESPONSE_BYTES`] after checking the status.
async fn read_json<T: DeserializeOwned>(
    provider: &'static str,
    what: &str,
    mut resp: reqwest::Response,
) -> Result<T, OAuthError> {
    let bad = |message: String| OAuthError::Provider { provider, message };
    if !resp.status().is_success() {
        return Err(bad(format!("{what} answered {}", resp.status())));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(bad(format!("{what} response is too large")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(provider, &e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(bad(format!("{what} response is too large")));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| bad(format!("{what} response is not as expected")))
}

// ---------------------------------------------------------------------------------------
// GitHub

#[derive(Deserialize)]
struct GithubUser {
    id: u64,
    login: String,
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct GithubEmail {
    email: String,
    #[serde(default)]
    primary: bool,
    #[serde(default)]
    verified: bool,
}

impl Github {
    fn client(&self) -> Client {
        oauth2::Client::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.client_secret.clone()))
            .set_auth_uri(self.auth_url.clone())
            .set_token_uri(self.token_url.clone())
            .set_redirect_uri(self.redirect.clone())
            // GitHub documents the client credentials as form parameters.
            .set_auth_type(AuthType::RequestBody)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        http: &reqwest::Client,
        path: &str,
        token: &str,
    ) -> Result<T, OAuthError> {
        let resp = http
            .get(format!("{}{path}", self.api_url))
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .send()
            .await
            .map_err(|e| http_error(GITHUB, &e))?;
        read_json(GITHUB, path, resp).await
    }

    async fn identity(
        &self,
        http: &reqwest::Client,
        token: &str,
    ) -> Result<ProviderIdentity, OAuthError> {
        let user: GithubUser = self.get(http, "/user", token).await?;
        let emails: Vec<GithubEmail> = self.get(http, "/user/emails", token).await?;
        // Only the primary address, and only if GitHub verified it, may vouch for the
        // account: a secondary or unverified address can be anyone's.
        let primary = emails.iter().find(|e| e.primary);
        let (email, email_verified) = match primary {
            Some(p) => (Some(p.email.as_str()), p.verified),
            None => (user.email.as_deref(), false),
        };
        let email = email.and_then(|e| normalize_email(e).ok());
        Ok(ProviderIdentity {
            provider: GITHUB.into(),
            subject: user.id.to_string(),
            email_verified: email_verified && email.is_some(),
            email,
            name: user
                .name
                .filter(|n| !n.trim().is_empty())
                .or(Some(user.login)),
        })
    }
}

// ---------------------------------------------------------------------------------------
// OpenID Connect (Google and generic)

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
    fn new(
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

    async fn endpoints(&self, http: &reqwest::Client) -> Result<Arc<Endpoints>, OAuthError> {
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

    async fn validate(
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
fn select_key<'a>(keys: &'a [Jwk], alg: Algorithm, kid: Option<&str>) -> Option<&'a Jwk> {
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

#[cfg(test)]
#[path = "oauth_tests.rs"]
mod tests;
