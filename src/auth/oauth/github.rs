//! GitHub sign-in: OAuth2 code flow with PKCE, then the REST API (`/user`,
//! `/user/emails`) for who signed in, since GitHub issues no ID token.
//!
//! Must not: trust any address but the primary one GitHub verified, or put the access
//! token into an error.

use std::fmt;

use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope,
    TokenResponse as _, TokenUrl,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    AuthStart, Client, GITHUB, OAuthError, ProviderIdentity, config_url, exchange, http_error,
    read_json, require_client,
};
use crate::auth::password::normalize_email;

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

pub(super) struct Github {
    client_id: String,
    client_secret: String,
    auth_url: AuthUrl,
    token_url: TokenUrl,
    /// Without a trailing slash.
    api_url: String,
    redirect: RedirectUrl,
}

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
    /// Checks `[auth.oauth.github]`; makes no network calls.
    pub(super) fn from_config(
        c: &GithubConfig,
        redirect: RedirectUrl,
    ) -> Result<Github, OAuthError> {
        require_client(GITHUB, &c.client_id, &c.client_secret)?;
        Ok(Github {
            client_id: c.client_id.clone(),
            client_secret: c.client_secret.clone(),
            auth_url: AuthUrl::from_url(config_url("github.auth_url", &c.auth_url)?),
            token_url: TokenUrl::from_url(config_url("github.token_url", &c.token_url)?),
            api_url: config_url("github.api_url", &c.api_url)?
                .as_str()
                .trim_end_matches('/')
                .to_string(),
            redirect,
        })
    }

    /// The authorization URL with fresh `state` and PKCE verifier (GitHub has no nonce).
    pub(super) fn start(&self) -> AuthStart {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state) = self
            .client()
            .authorize_url(CsrfToken::new_random)
            .add_scope(Scope::new("read:user".into()))
            .add_scope(Scope::new("user:email".into()))
            .set_pkce_challenge(challenge)
            .url();
        AuthStart {
            url: url.into(),
            state: state.into_secret(),
            pkce_verifier: verifier.into_secret(),
            nonce: None,
        }
    }

    /// Exchanges the code and asks the API who it belongs to.
    pub(super) async fn finish(
        &self,
        http: &reqwest::Client,
        code: String,
        pkce_verifier: String,
    ) -> Result<ProviderIdentity, OAuthError> {
        let token = exchange(GITHUB, &self.client(), http, code, pkce_verifier).await?;
        self.identity(http, token.access_token().secret()).await
    }

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
