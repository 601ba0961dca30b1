//! HTTP routes of accounts (see docs/API.md "Accounts").

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::extract::ClientInfo;
use super::service;
use crate::auth::{AdminUser, AuthUser, TokenPair};
use crate::billing::Entitlement;
use crate::error::{ApiError, ApiResult};
use crate::http::{Json, Query, page_limit};
use crate::state::AppState;
use crate::storage::auth as sa;
use crate::storage::users::{self, UserRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/me", get(me))
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/logout-all", post(logout_all))
        .route("/api/v1/auth/password", post(change_password))
        .route("/api/v1/auth/password-reset/request", post(reset_request))
        .route("/api/v1/auth/password-reset", post(reset))
        .route("/api/v1/auth/verify-email/request", post(verify_request))
        .route("/api/v1/auth/verify-email", post(verify))
        .route("/api/v1/auth/sessions", get(sessions))
        .route("/api/v1/auth/sessions/{id}", delete(revoke_session))
        .route("/api/v1/admin/users", get(admin_users))
}

#[derive(Debug, Serialize)]
pub struct Identity {
    pub provider: String,
    pub email: Option<String>,
}

/// The `User` object of the API.
#[derive(Debug, Serialize)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub email_verified: bool,
    pub name: Option<String>,
    pub role: String,
    pub disabled: bool,
    #[serde(with = "crate::clock::serde_ms")]
    pub created_at: i64,
    pub identities: Vec<Identity>,
    pub plan: Entitlement,
}

impl UserView {
    fn from_parts(row: UserRow, plan: Entitlement, identities: Vec<sa::IdentityRow>) -> UserView {
        UserView {
            id: row.id,
            email: row.email,
            email_verified: row.email_verified,
            name: row.name,
            role: row.role,
            disabled: row.disabled,
            created_at: row.created_at,
            identities: identities
                .into_iter()
                .map(|i| Identity {
                    provider: i.provider,
                    email: i.email,
                })
                .collect(),
            plan,
        }
    }

    pub async fn build(state: &AppState, row: UserRow) -> ApiResult<UserView> {
        let plan = crate::billing::routes::entitlement_with_usage(state, &row.id).await?;
        let uid = row.id.clone();
        let identities = state
            .storage
            .read(move |c| sa::identities_of(c, &uid))
            .await?
            .into_iter()
            .map(|i| Identity {
                provider: i.provider,
                email: i.email,
            })
            .collect();
        Ok(UserView {
            id: row.id,
            email: row.email,
            email_verified: row.email_verified,
            name: row.name,
            role: row.role,
            disabled: row.disabled,
            created_at: row.created_at,
            identities,
            plan,
        })
    }
}

/// `TokenPair` plus the user, as sign-in endpoints answer.
#[derive(Debug, Serialize)]
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

async fn me(State(state): State<AppState>, AuthUser(p): AuthUser) -> ApiResult<Json<UserView>> {
    // One blocking read (one pool checkout, one read transaction) for the user, this
    // period's usage and the identities, instead of three: `/me` is the hottest route.
    let mut plan = state.billing.entitlement(&p.user_id).await;
    let id = p.user_id.clone();
    let since = plan.period_start;
    let (row, used, identities) = state
        .storage
        .read(move |c| {
            let Some(row) = users::get_user(c, &id)? else {
                return Ok::<_, crate::storage::StorageError>((None, 0, Vec::new()));
            };
            let used = crate::storage::jobs::count_created_since(c, &id, since)?;
            Ok((Some(row), used, sa::identities_of(c, &id)?))
        })
        .await?;
    let row = row.ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    plan.usage = Some(crate::billing::Usage {
        jobs_this_period: used,
        period_start: since,
    });
    Ok(Json(UserView::from_parts(row, plan, identities)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    name: Option<String>,
}

async fn register(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<RegisterBody>,
) -> ApiResult<(StatusCode, Json<SignedIn>)> {
    let (tokens, user) = service::register(&state, &client, &b.email, b.password, b.name).await?;
    Ok((StatusCode::CREATED, signed_in(&state, tokens, user).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<LoginBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) = service::login(&state, &client, &b.email, b.password).await?;
    signed_in(&state, tokens, user).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

async fn refresh(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<RefreshBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) = service::refresh(&state, &client, &b.refresh_token).await?;
    signed_in(&state, tokens, user).await
}

async fn logout(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
) -> ApiResult<StatusCode> {
    // The session is the access token's; an optional `{refresh_token}` body adds nothing.
    service::logout(&state, &p, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
) -> ApiResult<StatusCode> {
    service::logout_all(&state, &p, &client).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    #[serde(default)]
    current_password: String,
    new_password: String,
}

async fn change_password(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
    Json(b): Json<PasswordBody>,
) -> ApiResult<Json<SignedIn>> {
    let (tokens, user) =
        service::change_password(&state, &p, &client, b.current_password, b.new_password).await?;
    signed_in(&state, tokens, user).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmailBody {
    email: String,
}

async fn reset_request(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<EmailBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    service::request_password_reset(&state, &client, &b.email).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true }))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    token: String,
    new_password: String,
}

async fn reset(
    State(state): State<AppState>,
    ClientInfo(client): ClientInfo,
    Json(b): Json<ResetBody>,
) -> ApiResult<StatusCode> {
    service::reset_password(&state, &client, &b.token, b.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn verify_request(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
) -> ApiResult<(StatusCode, Json<Value>)> {
    service::request_verification(&state, &p).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true }))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    token: String,
}

async fn verify(State(state): State<AppState>, Json(b): Json<TokenBody>) -> ApiResult<StatusCode> {
    service::verify_email(&state, &b.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

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

async fn revoke_session(
    State(state): State<AppState>,
    AuthUser(p): AuthUser,
    ClientInfo(client): ClientInfo,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    service::revoke_session(&state, &p, &client, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn admin_users(
    State(state): State<AppState>,
    AdminUser(_): AdminUser,
    Query(q): Query<UsersQuery>,
) -> ApiResult<Json<Value>> {
    let limit = page_limit(q.limit)?;
    let after = match &q.cursor {
        Some(c) => {
            let (t, id) = c
                .split_once(':')
                .ok_or_else(|| ApiError::bad_request("malformed cursor"))?;
            Some((
                t.parse::<i64>()
                    .map_err(|_| ApiError::bad_request("malformed cursor"))?,
                id.to_string(),
            ))
        }
        None => None,
    };
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
