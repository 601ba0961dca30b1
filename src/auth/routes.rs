//! HTTP routes of accounts.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;

use crate::auth::AuthUser;
use crate::billing::Entitlement;
use crate::error::{ApiError, ApiResult};
use crate::http::Json;
use crate::state::AppState;
use crate::storage::users::{self, UserRow};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/me", get(me))
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
    #[serde(with = "crate::clock::serde_ms")]
    pub created_at: i64,
    pub identities: Vec<Identity>,
    pub plan: Entitlement,
}

impl UserView {
    pub async fn build(state: &AppState, row: UserRow) -> UserView {
        let plan = state.billing.entitlement(&row.id).await;
        UserView {
            id: row.id,
            email: row.email,
            email_verified: row.email_verified,
            name: row.name,
            role: row.role,
            created_at: row.created_at,
            identities: Vec::new(),
            plan,
        }
    }
}

async fn me(State(state): State<AppState>, AuthUser(p): AuthUser) -> ApiResult<Json<UserView>> {
    let id = p.user_id.clone();
    let row = state
        .storage
        .read(move |c| users::get_user(c, &id))
        .await?
        .ok_or_else(|| ApiError::unauthorized("the account no longer exists"))?;
    Ok(Json(UserView::build(&state, row).await))
}
