//! The HTTP stack: router assembly and the middleware every response passes through.
//!
//! Order (outermost first): the edge (request id, problem rendering, security headers,
//! metrics: one middleware, see [`edge`]) → tracing → panic catching → timeout →
//! compression → routes. The edge sits outside the panic and timeout layers so their bare
//! responses become problem+json with the request id and the security headers, like
//! every other response.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::state::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application router with its middleware.
pub fn router(state: AppState, extra: Option<Router<AppState>>) -> Router {
    let timeout = state.config.request_timeout;
    let json_limit = state.config.max_json_bytes;
    let metrics_inline = state.config.metrics_listen.is_none();
    let app = Router::new()
        .merge(crate::ops::router(metrics_inline))
        .merge(crate::auth::routes::router())
        .merge(crate::billing::routes::router())
        .merge(crate::jobs::routes::router())
        .merge(crate::web::router())
        .merge(extra.unwrap_or_default())
        .fallback(crate::web::fallback)
        .layer(axum::extract::DefaultBodyLimit::max(json_limit));
    app.layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::debug_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(middleware::from_fn(edge))
        .with_state(state)
}

fn panic_response(_err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    // The panic message was already printed by the panic hook; it may hold internals.
    ApiError::internal("handler panicked").into_response()
}

/// What every response passes through, in one middleware rather than five stacked
/// layers (each `Router::layer` wraps every route, and each layer's future and clones
/// showed in the `/me` profile):
/// - the request id: the client's `x-request-id`, or a new UUID; set on the request (for
///   tracing and handlers) and echoed on the response;
/// - errors rendered as problem+json carrying that id;
/// - the security headers, unless the response set its own;
/// - `http_requests_total{route,status}` and `http_request_duration_seconds{route}`.
async fn edge(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = match req.headers().get(&REQUEST_ID) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => {
            let id = HeaderValue::try_from(uuid::Uuid::new_v4().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("-"));
            req.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    let mut resp = render_problem(resp, request_id.to_str().unwrap_or(""));
    let headers = resp.headers_mut();
    headers.insert(REQUEST_ID, request_id);
    crate::web::add_security_headers(headers);
    let status = resp.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// An error response as problem+json carrying the request id; others unchanged.
fn render_problem(mut resp: Response, request_id: &str) -> Response {
    let status = resp.status();
    let error = match resp.extensions_mut().remove::<ApiError>() {
        Some(e) => e,
        None if status.is_client_error() || status.is_server_error() => {
            if is_problem(&resp) {
                return resp;
            }
            ApiError::from_status(status)
        }
        None => return resp,
    };
    if error.status.is_server_error() {
        tracing::error!(request_id = %request_id, code = error.code, status = error.status.as_u16(), "request failed");
    }
    let body = serde_json::to_vec(&error.problem(request_id)).unwrap_or_default();
    let (mut parts, _) = resp.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_ENCODING);
    Response::from_parts(parts, Body::from(body))
}

fn is_problem(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/problem+json"))
}

/// `axum::Json` with rejections reported as problems: 415 without a JSON content type,
/// 400 for a syntax error, 422 for a well-formed body of the wrong shape, 413 too large.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

pub fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request(format!("invalid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => ApiError::invalid_input(e.body_text()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::from_status(StatusCode::PAYLOAD_TOO_LARGE)
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

/// The client address from the connection, for sessions and rate limits.
pub fn peer_addr(req_parts: &axum::http::request::Parts) -> Option<SocketAddr> {
    req_parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// `axum::extract::Query` with rejections reported as 400 `invalid_input` problems.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for Query<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `?limit=` for lists: default 50, at most 100.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=100).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "limit must be between 1 and 100, got {n}"
        ))),
    }
}

/// Parses a `<millis>:<id>` list cursor (lists ordered by a time, then an id).
pub fn time_cursor(cursor: &str) -> Result<(i64, String), ApiError> {
    let malformed = || ApiError::bad_request("malformed cursor");
    let (t, id) = cursor.split_once(':').ok_or_else(malformed)?;
    Ok((t.parse::<i64>().map_err(|_| malformed())?, id.to_string()))
}
