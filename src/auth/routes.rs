//! HTTP routes of accounts (see docs/API.md "Accounts").

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::ClientInfo;
use super::oauth_flow::{self, BrowserBinding, CallbackParams};
use crate::auth::{AdminUser, AuthUser, Profile, TokenPair};
use crate::billing::Entitlement;
use crate::error::{ApiError, ApiResult};
use crate::http::{Json, Query, page_limit, time_cursor};
use crate::state::AppState;
use crate::storage::StorageError;
use crate::storage::auth as sa;
use crate::storage::users::{self, UserRow};

/// The accounts routes; each handler's `#[utoipa::path]` is its entry in the API document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(logout_all))
        .routes(routes!(change_password))
        .routes(routes!(reset_request))
        .routes(routes!(reset))
        .routes(routes!(verify_request))
        .routes(routes!(verify))
        .routes(routes!(sessions))
        .routes(routes!(revoke_session))
        .routes(routes!(oauth_providers))
        .routes(routes!(oauth_authorize))
        .routes(routes!(oauth_link))
        .routes(routes!(oauth_callback))
        .routes(routes!(oauth_exchange))
        .routes(routes!(unlink_identity))
        .routes(routes!(admin_users))
        .routes(routes!(admin_claim))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Identity {
    pub provider: String,
    pub email: Option<String>,
}

/// The `User` object of the API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = User)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
    pub name: Option<String>,
    #[schema(value_type = crate::openapi::Role)]
    pub role: String,
    pub disabled: bool,
    #[serde(with = "crate::clock::serde_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    pub identities: Vec<Identity>,
    pub plan: Entitlement,
}

impl UserView {
    fn from_parts(p: &Profile, plan: Entitlement) -> UserView {
        UserView {
            id: p.id.clone(),
            email: p.email.clone(),
            email_verified: p.email_verified,
            name: p.name.clone(),
            role: p.role.clone(),
            disabled: p.disabled,
            created_at: p.created_at,
            identities: p
                .identities
                .iter()
                .map(|(provider, email)| Identity {
                    provider: provider.clone(),
                    email: email.clone(),
                })
                .collect(),
            plan,
        }
    }

    /// The view of a user row just read by a sign-in: its identities and usage in one
    /// read (the row may be newer than the cached profile, so it is not taken from it).
    pub async fn build(state: &AppState, row: UserRow) -> ApiResult<UserView> {
        let id = row.id.clone();
        Self::load(state, &id, Some(row))
            .await?
            .map(|(profile, plan)| UserView::from_parts(&profile, plan))
            .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))
    }

    /// The view of `user_id`. Entitlement, profile and usage come from caches that the
    /// commits changing them invalidate, so a warm `/me` reads no SQLite at all; on any
    /// miss, profile and usage are read together in one blocking read (one pool
    /// checkout, one read transaction; both are row lookups). `None` if the user does
    /// not exist.
    async fn load(
        state: &AppState,
        user_id: &str,
        row: Option<UserRow>,
    ) -> ApiResult<Option<(Arc<Profile>, Entitlement)>> {
        let mut plan = state.billing.entitlement(user_id).await;
        let since = plan.period_start;
        let cached = match row {
            Some(_) => None,
            None => state
                .auth
                .cached_profile(user_id)
                .zip(state.jobs.cached_usage(user_id, since)),
        };
        let (profile, used) = match cached {
            Some(hit) => hit,
            None => {
                // A given row was read before the tickets were taken, so it must not be
                // cached: an invalidation in between would go unnoticed.
                let cacheable = row.is_none();
                let profile_ticket = state.auth.profile_ticket(user_id);
                let usage_ticket = state.jobs.usage_ticket(user_id);
                let id = user_id.to_string();
                let loaded = state
                    .storage
                    .read(move |c| {
                        let row = match row {
                            Some(r) => r,
                            None => match users::get_user(c, &id)? {
                                Some(r) => r,
                                None => return Ok::<_, StorageError>(None),
                            },
                        };
                        let profile = Profile::new(&row, sa::identities_of(c, &id)?);
                        Ok(Some((
                            profile,
                            crate::storage::jobs::period_usage(c, &id, since)?,
                        )))
                    })
                    .await?;
                let Some((profile, used)) = loaded else {
                    return Ok(None);
                };
                let profile = Arc::new(profile);
                if cacheable {
                    state.auth.cache_profile(profile.clone(), profile_ticket);
                }
                state.jobs.cache_usage(user_id, since, used, usage_ticket);
                (profile, used)
            }
        };
        plan.usage = Some(crate::billing::Usage {
            jobs_this_period: used,
            period_start: since,
        });
        Ok(Some((profile, plan)))
    }
}

/// `TokenPair` plus the user, as sign-in endpoints answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SignedIn {
    #[serde(flatten)]
    pub tokens: TokenPair,
    pub user: UserView,
}

pub async fn signed_in(
    state: &AppState,
    tokens: TokenPair,
    user: UserRow,
) -> ApiResult<Json<SignedIn>> {
    Ok(Json(SignedIn {
        tokens,
        user: UserView::build(state, user).await?,
    }))
}

#[utoipa::path(get, path = "/api/v1/me", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, description = "The signed-in user", body = UserView),
        (status = 401, description = "`unauthorized`, `token_expired`, `session_revoked`")))]
async fn me(State(state): State<AppState>, AuthUser(p): AuthUser) -> ApiResult<Response> {
    let (profile, plan) = UserView::load(&state, &p.user_id, None)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    // The hottest authenticated route: the profile's fields are rendered once per cache
    // load, only the plan per request (the same bytes as `Json(UserView)`).
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        profile.user_json(&plan),
    )
        .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// At least 10 characters, at most 1024 bytes.
    #[schema(min_length = 10, max_length = 1024)]
    password: String,
    name: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/auth/register", tag = "accounts", request_body = RegisterBody,
    responses((status = 201, description = "Registered and signed in", body = SignedIn),
        (status = 400, description = "Malformed JSON"),
        (status = 409, description = "`email_taken`"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input` (e.g. password under 10 characters)"),
        (status = 429, description = "`rate_limited`")))]
async fn register(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<RegisterBody>,
) -> ApiResult<(StatusCode, Json<SignedIn>)> {
    let (tokens, user) = state
        .auth
        .register(&client, &b.email, b.password, b.name)
        .await?;
    Ok((StatusCode::CREATED, signed_in(&state, tokens, user).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
    password: String,
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "accounts", request_body = LoginBody,
    responses((status = 200, description = "Signed in", body = SignedIn),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "`invalid_credentials`"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`"),
        (status = 429, description = "`rate_limited` per IP and per email")))]
async fn login(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<LoginBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) = state.auth.login(&client, &b.email, b.password).await?;
    signed_in(&state, tokens, user).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "accounts", request_body = RefreshBody,
    responses((status = 200, description = "A new token pair; the presented refresh token stops working", body = SignedIn),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "`unauthorized`, `session_revoked`, `refresh_reused` (the session is revoked)"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`")))]
async fn refresh(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<RefreshBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) = state.auth.refresh(&client, &b.refresh_token).await?;
    signed_in(&state, tokens, user).await
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "accounts", security(("bearer" = [])),
    request_body(content = Option<RefreshBody>, description = "Optional; the session is the access token's"),
    responses((status = 204, description = "The current session is revoked"),
        (status = 401, description = "`unauthorized`")))]
async fn logout(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
) -> ApiResult<StatusCode> {
    // The session is the access token's; an optional `{refresh_token}` body adds nothing.
    state.auth.logout(&p, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/auth/logout-all", tag = "accounts", security(("bearer" = [])),
    responses((status = 204, description = "Every session and access token of the user is revoked"),
        (status = 401, description = "`unauthorized`")))]
async fn logout_all(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
) -> ApiResult<StatusCode> {
    state.auth.logout_all(&p, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    #[serde(default)]
    current_password: String,
    /// At least 10 characters, at most 1024 bytes.
    #[schema(min_length = 10, max_length = 1024)]
    new_password: String,
}

#[utoipa::path(post, path = "/api/v1/auth/password", tag = "accounts", security(("bearer" = [])),
    request_body = PasswordBody,
    responses((status = 200, description = "Tokens for this client; all other sessions are revoked", body = SignedIn),
        (status = 400, description = "Malformed JSON"),
        (status = 401, description = "`unauthorized`, `invalid_credentials` (wrong current password), `step_up_required` (a first password needs a sign-in within `auth.step_up_window`)"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`"),
        (status = 429, description = "`rate_limited`")))]
async fn change_password(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
    Json(b): Json<PasswordBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) = state
        .auth
        .change_password(&p, &client, b.current_password, b.new_password)
        .await?;
    signed_in(&state, tokens, user).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EmailBody {
    #[schema(format = Email, max_length = 254)]
    email: String,
}

#[utoipa::path(post, path = "/api/v1/auth/password-reset/request", tag = "accounts",
    request_body = EmailBody,
    responses((status = 202, description = "Always; a mail with a one-time token is sent if the account exists", body = crate::openapi::Accepted),
        (status = 400, description = "Malformed JSON"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`"),
        (status = 429, description = "`rate_limited`")))]
async fn reset_request(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<EmailBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    state.auth.request_password_reset(&client, &b.email).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true }))))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    token: String,
    /// At least 10 characters, at most 1024 bytes.
    #[schema(min_length = 10, max_length = 1024)]
    new_password: String,
}

#[utoipa::path(post, path = "/api/v1/auth/password-reset", tag = "accounts", request_body = ResetBody,
    responses((status = 204, description = "Password set; all sessions revoked"),
        (status = 400, description = "`invalid_grant` (used or expired token), malformed JSON"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`"),
        (status = 429, description = "`rate_limited`")))]
async fn reset(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<ResetBody>,
) -> ApiResult<StatusCode> {
    state
        .auth
        .reset_password(&client, &b.token, b.new_password)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/auth/verify-email/request", tag = "accounts", security(("bearer" = [])),
    responses((status = 202, description = "A mail with a one-time token is sent", body = crate::openapi::Accepted),
        (status = 401, description = "`unauthorized`"),
        (status = 429, description = "`rate_limited`")))]
async fn verify_request(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
) -> ApiResult<(StatusCode, Json<Value>)> {
    state.auth.request_verification(&p, &client).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true }))))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/verify-email", tag = "accounts", request_body = TokenBody,
    responses((status = 204, description = "The email is verified"),
        (status = 400, description = "`invalid_grant` (used or expired token), malformed JSON"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`")))]
async fn verify(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<TokenBody>,
) -> ApiResult<StatusCode> {
    state.auth.verify_email(&client, &b.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/auth/sessions", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, description = "The user's live sessions", body = crate::openapi::SessionList),
        (status = 401, description = "`unauthorized`")))]
async fn sessions(State(state): State<AppState>, AuthUser(p): AuthUser) -> ApiResult<Json<Value>> {
    let uid = p.user_id.clone();
    let now = state.now_millis();
    let rows = state
        .storage
        .read(move |c| sa::live_sessions(c, &uid, now))
        .await?;
    let items: Vec<Value> = rows
        .into_iter()
        .map(|s| {
            json!({
                "id": s.id,
                "created_at": crate::clock::rfc3339(s.created_at),
                "last_used_at": crate::clock::rfc3339(s.last_used_at),
                "user_agent": s.user_agent,
                "ip": s.ip,
                "current": s.id == p.session_id,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[utoipa::path(delete, path = "/api/v1/auth/sessions/{id}", tag = "accounts", security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id")),
    responses((status = 204, description = "The session is revoked"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such session of this user")))]
async fn revoke_session(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.revoke_session(&p, &client, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UsersQuery {
    /// Page size, default 50.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin", security(("bearer" = [])),
    params(UsersQuery),
    responses((status = 200, description = "Users by creation time", body = crate::openapi::UserPage),
        (status = 400, description = "`invalid_input`: bad `limit` or `cursor`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: admin role required")))]
async fn admin_users(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Query(q): Query<UsersQuery>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit)?;
    let after = q.cursor.as_deref().map(time_cursor).transpose()?;
    let mut rows = state
        .storage
        .read(move |c| {
            users::list_users(
                c,
                after.as_ref().map(|(t, id)| (*t, id.as_str())),
                limit + 1,
            )
        })
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|u| format!("{}:{}", u.created_at, u.id))
    } else {
        None
    };
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        items.push(UserView::build(&state, r).await?);
    }
    Ok(Json(json!({ "items": items, "next_cursor": next })))
}

/// The one-time admin setup token from the start-up log.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    token: String,
}

#[utoipa::path(post, path = "/api/v1/admin/claim", tag = "admin", security(("bearer" = [])),
    request_body = ClaimBody,
    responses((status = 204, description = "The caller is now an admin; the token is used up"),
        (status = 400, description = "`invalid_grant`: wrong or used token, or an admin exists already; malformed JSON"),
        (status = 401, description = "`unauthorized`"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`")))]
async fn admin_claim(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    AuthUser(p): AuthUser,
    Json(b): Json<ClaimBody>,
) -> ApiResult<StatusCode> {
    state.auth.claim_admin(&p, &client, &b.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/auth/providers", tag = "accounts", operation_id = "providers",
    responses((status = 200, description = "The enabled OAuth providers", body = crate::openapi::ProviderList)))]
async fn oauth_providers(State(state): State<AppState>) -> Json<Value> {
    let items: Vec<Value> = state
        .auth
        .providers()
        .into_iter()
        .map(|(id, name)| json!({ "id": id, "name": name }))
        .collect();
    Json(json!({ "items": items }))
}

/// A 302 that no cache keeps (the URL holds a one-time state or code).
fn found(location: &str) -> ApiResult<Response> {
    let value = HeaderValue::from_str(location).map_err(ApiError::internal)?;
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, value),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response())
}

/// The browser-binding cookie the request carries (see [`BrowserBinding`]).
fn browser_cookie(state: &AppState, headers: &HeaderMap) -> Option<String> {
    let name = BrowserBinding::cookie_name(state.config.public_base());
    let values = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    oauth_flow::binding_from_cookies(values, name)
}

/// The browser's binding (kept if it has one) and the `Set-Cookie` that (re)sets it.
fn bind_browser(state: &AppState, headers: &HeaderMap) -> ApiResult<(BrowserBinding, HeaderValue)> {
    let binding = BrowserBinding::reuse_or_new(browser_cookie(state, headers).as_deref());
    let cookie = HeaderValue::from_str(&binding.set_cookie(state.config.public_base()))
        .map_err(ApiError::internal)?;
    Ok((binding, cookie))
}

#[utoipa::path(get, path = "/api/v1/auth/oauth/{provider}/authorize", tag = "accounts", operation_id = "authorize",
    params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
    responses((status = 302, description = "To the provider, with `state`, `code_challenge` (S256) and `nonce` (OIDC); \
            sets the HttpOnly browser-binding cookie the callback and exchange require",
            headers(("location" = String), ("set-cookie" = String))),
        (status = 404, description = "`not_found`: the provider is not enabled")))]
async fn oauth_authorize(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (binding, cookie) = bind_browser(&state, &headers)?;
    let url = state.auth.authorize_url(&provider, None, &binding).await?;
    let mut resp = found(&url)?;
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

#[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/link", tag = "accounts", operation_id = "link",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
    responses((status = 200, description = "Where to send the browser to link this provider to the account; \
            sets the browser-binding cookie, so only this browser can complete the link", body = crate::openapi::AuthorizeUrl,
            headers(("set-cookie" = String))),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: the provider is not enabled")))]
// The cookie set here binds the link flow to the browser of the signed-in user who
// started it: an authorize URL opened anywhere else links nothing.
async fn oauth_link(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    Path(provider): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (binding, cookie) = bind_browser(&state, &headers)?;
    let url = state
        .auth
        .authorize_url(&provider, Some(&p), &binding)
        .await?;
    let mut resp = Json(json!({ "authorize_url": url })).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// What providers append to the callback. Not `deny_unknown_fields`: providers add their
/// own parameters (Google: `scope`, `authuser`, `prompt`; RFC 9207: `iss`).
#[derive(Debug, Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/auth/oauth/{provider}/callback", tag = "accounts", operation_id = "callback",
    params(("provider" = String, Path, description = "`github`, `google` or `oidc`"),
        ("code" = Option<String>, Query, description = "From the provider"),
        ("state" = Option<String>, Query, description = "From the provider")),
    responses((status = 302, description = "To `{public_url}/#/auth/complete?code=<one-time exchange code>`, \
            or on failure to `/#/auth/error?code=<invalid_state|account_exists|provider error>`",
        headers(("location" = String)))))]
// Always answers with a redirect into the UI (a browser navigation, not an API call),
// except for a provider that is not enabled at all (404 problem).
async fn oauth_callback(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Path(provider): Path<String>,
    Query(q): Query<CallbackQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !state.auth.is_enabled(&provider) {
        return Err(ApiError::not_found("no such OAuth provider"));
    }
    let params = CallbackParams {
        code: q.code,
        state: q.state,
        error: q.error,
    };
    let base = state.config.public_base();
    let browser = browser_cookie(&state, &headers);
    match state
        .auth
        .callback(&client, &provider, params, browser.as_deref())
        .await
    {
        Ok(code) => found(&format!("{base}/#/auth/complete?code={code}")),
        Err(refusal) => {
            let query = oauth2::url::form_urlencoded::Serializer::new(String::new())
                .append_pair("code", refusal.code)
                .append_pair("detail", &refusal.detail)
                .finish();
            found(&format!("{base}/#/auth/error?{query}"))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExchangeBody {
    code: String,
}

#[utoipa::path(post, path = "/api/v1/auth/oauth/exchange", tag = "accounts", operation_id = "exchange",
    request_body = crate::openapi::ExchangeBody,
    responses((status = 200, description = "Signed in", body = SignedIn),
        (status = 400, description = "`invalid_grant`: used or expired code; malformed JSON. \
            `invalid_state`: the browser-binding cookie set at authorize is missing or belongs to another browser"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`")))]
async fn oauth_exchange(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    headers: HeaderMap,
    Json(b): Json<ExchangeBody>,
) -> ApiResult<Json<SignedIn>> {
    let browser = browser_cookie(&state, &headers);
    let (tokens, user) = state
        .auth
        .exchange(&client, &b.code, browser.as_deref())
        .await?;
    signed_in(&state, tokens, user).await
}

#[utoipa::path(delete, path = "/api/v1/auth/identities/{provider}", tag = "accounts", operation_id = "unlink",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
    responses((status = 204, description = "The identity is unlinked"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such linked identity"),
        (status = 409, description = "`last_login_method`: it would leave no way to sign in")))]
async fn unlink_identity(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
    Path(provider): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.unlink(&p, &client, &provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Usage;
    use crate::config::PlanLimits;
    use crate::storage::auth::IdentityRow;

    fn row(name: Option<&str>) -> UserRow {
        UserRow {
            id: "0190a1b2c3d4e5f60718293a4b5c6d7e".into(),
            email: "ann+\"quoted\"@example.com".into(),
            email_verified: true,
            name: name.map(Into::into),
            password_hash: Some("$argon2id$secret".into()),
            role: "admin".into(),
            token_version: 3,
            disabled: false,
            created_at: 1_763_900_000_123,
        }
    }

    fn identity(provider: &str, email: Option<&str>) -> IdentityRow {
        IdentityRow {
            provider: provider.into(),
            subject: "sub-1".into(),
            user_id: "u".into(),
            email: email.map(Into::into),
            email_verified: true,
        }
    }

    fn plan(usage: Option<Usage>, period_end: Option<i64>) -> Entitlement {
        Entitlement {
            plan: "pro".into(),
            status: crate::storage::states::SubStatus::PastDue,
            current_period_end: period_end,
            cancel_at_period_end: true,
            grace_until: period_end.map(|e| e + 86_400_000),
            limits: PlanLimits {
                jobs_per_period: 10_000,
                concurrent_jobs: 8,
                max_upload_bytes: 1 << 20,
                max_storage_bytes: 10 << 20,
            },
            metered: true,
            usage,
            period_start: 1_761_955_200_000,
        }
    }

    #[test]
    fn me_fast_path_renders_exactly_the_user_view() {
        let cases = [
            (row(None), vec![]),
            (
                row(Some("Zoë \u{1F600} \\ \"x\"\n")),
                vec![
                    identity("github", Some("ann@users.noreply.github.com")),
                    identity("oidc", None),
                ],
            ),
        ];
        for (row, identities) in cases {
            let profile = Profile::new(&row, identities);
            for plan in [
                plan(None, None),
                plan(
                    Some(Usage {
                        jobs_this_period: 42,
                        period_start: 1_761_955_200_000,
                    }),
                    Some(1_764_547_200_000),
                ),
            ] {
                let fast = profile.user_json(&plan);
                let slow = serde_json::to_vec(&UserView::from_parts(&profile, plan)).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&fast),
                    String::from_utf8_lossy(&slow)
                );
                assert!(!String::from_utf8_lossy(&fast).contains("argon2"));
            }
        }
    }
}
