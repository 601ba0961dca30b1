//! Google sign-in: OpenID Connect with fixed endpoints (no discovery round trip), so a
//! Google provider is an [`Oidc`] whose endpoints are known at start.
//!
//! Must not: accept an issuer other than the configured one (plus the scheme-less form
//! Google's own tokens may carry).

use std::fmt;
use std::sync::Arc;

use oauth2::{AuthType, AuthUrl, RedirectUrl, TokenUrl};
use serde::Deserialize;

use super::oidc::{Endpoints, Oidc};
use super::{GOOGLE, OAuthError, config_url, require_client};

pub(super) const GOOGLE_ISSUER: &str = "https://accounts.google.com";

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

// Hand-written so a stray `{:?}` never prints a client secret.
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

/// Checks `[auth.oauth.google]` and builds its provider; makes no network calls.
pub(super) fn provider(c: &GoogleConfig, redirect: RedirectUrl) -> Result<Oidc, OAuthError> {
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
    Ok(Oidc::new(
        GOOGLE,
        "Google".into(),
        c.client_id.clone(),
        c.client_secret.clone(),
        issuer,
        vec!["openid".into(), "email".into(), "profile".into()],
        redirect,
        Some(Arc::new(fixed)),
    ))
}
