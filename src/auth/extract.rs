//! Axum extractors for authenticated routes: `AuthUser` (any signed-in user) and
//! `AdminUser` (role admin). They only parse the header and delegate to [`super::Auth`].

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{AuthError, Principal};
use crate::error::ApiError;
use crate::state::AppState;

/// A signed-in caller (valid bearer token, live session, current token version).
#[derive(Debug, Clone)]
pub struct AuthUser(pub Principal);

/// A signed-in caller with the admin role.
#[derive(Debug, Clone)]
pub struct AdminUser(pub Principal);

/// The caller's address (proxy-aware) and user agent, for sessions, limits and audit.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo(pub super::service::Client);

impl FromRequestParts<AppState> for ClientInfo {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ip = crate::http::peer_addr(parts).map(|peer| {
            let xff = parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok());
            super::client_ip::client_ip(peer.ip(), xff, &state.config.trusted_proxies).to_string()
        });
        let user_agent = parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(300).collect());
        Ok(ClientInfo(super::service::Client { ip, user_agent }))
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(AuthError::Unauthorized)?;
        Ok(AuthUser(state.auth.authenticate(token).await?))
    }
}

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let AuthUser(p) = AuthUser::from_request_parts(parts, state).await?;
        if !p.is_admin {
            return Err(AuthError::Forbidden.into());
        }
        Ok(AdminUser(p))
    }
}
