//! HTTP routes of billing.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/billing/plans", get(plans))
}

async fn plans(State(state): State<AppState>) -> axum::Json<Value> {
    let items: Vec<Value> = state
        .billing
        .plans()
        .iter()
        .map(|p| {
            json!({
                "id": p.id, "name": p.name, "price": p.price, "currency": p.currency,
                "interval": p.interval, "limits": p.limits, "metered": p.metered,
            })
        })
        .collect();
    axum::Json(json!({ "items": items }))
}
