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
//!
//! One file per provider: `github.rs` (REST API for the identity), `oidc.rs` (discovery,
//! JWKS and ID-token validation), `google.rs` (an OIDC provider with fixed endpoints).
//! This file holds what they share: configuration of the set, results and errors, the
//! registry [`OAuthProviders`], and the HTTP helpers (no redirects, bounded bodies).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::url::Host;
use oauth2::{
    AuthorizationCode, EndpointNotSet, EndpointSet, ExtraTokenFields, HttpClientError,
    PkceCodeVerifier, RedirectUrl, RequestTokenError, StandardRevocableToken,
    StandardTokenResponse,
};
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod github;
mod google;
mod oidc;

pub use github::GithubConfig;
pub use google::GoogleConfig;
pub use oidc::OidcConfig;

use crate::config::{OAuthConfig, OAuthProviderConfig};
use github::Github;
use oidc::Oidc;

pub const GITHUB: &str = "github";
pub const GOOGLE: &str = "google";
pub const OIDC: &str = "oidc";

/// Every outbound call (token exchange, user info, discovery, JWKS) gives up after this.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Provider answers are small JSON documents; anything bigger is refused unread.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Configuration

/// `[auth.oauth]`: a provider is enabled by its section being present.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfigs {
    pub github: Option<GithubConfig>,
    pub google: Option<GoogleConfig>,
    pub oidc: Option<OidcConfig>,
}

impl OAuthConfigs {
    /// The settings [`OAuthProviders`] expects, from the `[auth.oauth]` section. A
    /// provider whose `client_id` is empty is disabled, as if its section were absent;
    /// unset URLs keep the provider's defaults.
    pub fn from_config(cfg: &OAuthConfig) -> OAuthConfigs {
        fn enabled(c: &Option<OAuthProviderConfig>) -> Option<&OAuthProviderConfig> {
            c.as_ref().filter(|c| !c.client_id.trim().is_empty())
        }
        fn or(v: &Option<String>, default: String) -> String {
            v.clone()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or(default)
        }
        OAuthConfigs {
            github: enabled(&cfg.github).map(|c| {
                let d = GithubConfig::default();
                GithubConfig {
                    client_id: c.client_id.trim().to_string(),
                    client_secret: c.client_secret.expose().to_string(),
                    auth_url: or(&c.auth_url, d.auth_url),
                    token_url: or(&c.token_url, d.token_url),
                    api_url: or(&c.api_url, d.api_url),
                }
            }),
            google: enabled(&cfg.google).map(|c| {
                let d = GoogleConfig::default();
                GoogleConfig {
                    client_id: c.client_id.trim().to_string(),
                    client_secret: c.client_secret.expose().to_string(),
                    issuer: or(&c.issuer, d.issuer),
                    auth_url: or(&c.auth_url, d.auth_url),
                    token_url: or(&c.token_url, d.token_url),
                    jwks_url: or(&c.jwks_url, d.jwks_url),
                }
            }),
            oidc: enabled(&cfg.oidc).map(|c| {
                let d = OidcConfig::default();
                OidcConfig {
                    issuer: c.issuer.clone().unwrap_or_default(),
                    client_id: c.client_id.trim().to_string(),
                    client_secret: c.client_secret.expose().to_string(),
                    name: or(&c.name, d.name),
                    scopes: if c.scopes.is_empty() {
                        d.scopes
                    } else {
                        c.scopes.clone()
                    },
                }
            }),
        }
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
            Some(c) => Some(Github::from_config(c, redirect(GITHUB)?)?),
        };
        let google = match &configs.google {
            None => None,
            Some(c) => Some(google::provider(c, redirect(GOOGLE)?)?),
        };
        let oidc = match &configs.oidc {
            None => None,
            Some(c) => Some(oidc::provider(c, redirect(OIDC)?)?),
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
        if provider == GITHUB {
            return Ok(self.github()?.start());
        }
        self.oidc(provider)?.start(&self.inner.http).await
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
            return self.github()?.finish(http, code, pkce_verifier).await;
        }
        self.oidc(provider)?
            .finish(http, code, pkce_verifier, nonce)
            .await
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
#[cfg(test)]
mod tests;
