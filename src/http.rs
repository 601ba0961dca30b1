//! The HTTP stack: router assembly and the middleware every response passes through.
//!
//! Order (outermost first): the edge (request id, tracing span, timeout, panic catching,
//! problem rendering, security headers, metrics: one middleware, see [`edge`]) →
//! compression → routes. Timeouts and panics are caught inside the edge, so their
//! responses become problem+json with the request id and the security headers, like
//! every other response.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use tower_http::compression::CompressionLayer;
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;

use crate::error::{ApiError, ProblemCode};
use crate::state::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole application router with its middleware.
pub fn router(state: AppState, extra: Option<Router<AppState>>) -> Router {
    let edge_limits = EdgeLimits {
        timeout: state.config.request_timeout,
        max_header_bytes: state.config.max_header_bytes,
    };
    let json_limit = state.config.max_json_bytes;
    let (api, _doc) = api_routes().split_for_parts();
    let app = api
        .merge(crate::web::router())
        .merge(extra.unwrap_or_default())
        .fallback(crate::web::fallback)
        .layer(axum::extract::DefaultBodyLimit::max(json_limit));
    app.layer(CompressionLayer::new())
        .layer(middleware::from_fn_with_state(edge_limits, edge))
        .with_state(state)
}

/// The API routes with their OpenAPI document: what is routed here is what
/// `GET /api/v1/openapi.json` describes ([`crate::openapi::api_doc`]).
pub fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(crate::openapi::base_doc())
        .merge(crate::ops::router())
        .merge(crate::auth::routes::router())
        .merge(crate::billing::routes::router())
        .merge(crate::jobs::routes::router())
}

/// Headers a request may carry; more is 431 (hyper refuses beyond
/// [`crate::serve::HYPER_MAX_HEADERS`] on its own, without a problem body).
pub const MAX_HEADERS: usize = 100;

/// What the edge enforces on every request.
#[derive(Debug, Clone, Copy)]
struct EdgeLimits {
    timeout: Duration,
    max_header_bytes: usize,
}

/// True when the request head is larger than allowed (names and values, as counted by
/// `max_header_bytes`, or more than [`MAX_HEADERS`] headers).
fn headers_too_large(req: &Request, max_bytes: usize) -> bool {
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return true;
    }
    let bytes: usize = req.uri().to_string().len()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum::<usize>();
    bytes > max_bytes
}

fn panic_response() -> Response {
    // The panic message was already printed by the panic hook; it may hold internals.
    ApiError::internal("handler panicked").into_response()
}

/// What every response passes through, in one middleware rather than a stack of layers
/// (`Router::layer` wraps every route, and each layer is a boxed service cloned for every
/// request; in the `/me` profile those clones cost more than most of the handler):
/// - the request id: the client's `x-request-id`, or a new UUID; set on the request (for
///   handlers) and echoed on the response;
/// - a `http` tracing span (method, path, request id) around the handler, and a debug
///   event with status and latency;
/// - the request timeout (408 until the response head) and panic catching (500): both
///   as problems, like every error;
/// - errors rendered as problem+json carrying the request id;
/// - the security headers, unless the response set its own;
/// - `http_requests_total{route,status}` and `http_request_duration_seconds{route}`.
async fn edge(State(limits): State<EdgeLimits>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let timeout = limits.timeout;
    let too_large = headers_too_large(&req, limits.max_header_bytes);
    let request_id = match req.headers().get(&REQUEST_ID) {
        // A client's id is echoed only from a head we accept; a huge one would be echoed.
        Some(v) if !v.is_empty() && !too_large => v.clone(),
        _ => {
            let id = HeaderValue::try_from(uuid::Uuid::new_v4().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("-"));
            req.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };
    let id = request_id.to_str().unwrap_or("");
    let span = tracing::debug_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id);
    let route = req.extensions().get::<MatchedPath>().cloned();
    let handled = if too_large {
        Ok(Ok(ApiError::new(
            ProblemCode::HeadersTooLarge,
            "the request headers are too large or too many",
        )
        .into_response()))
    } else {
        tokio::time::timeout(timeout, AssertUnwindSafe(next.run(req)).catch_unwind())
            .instrument(span.clone())
            .await
    };
    let resp = match handled {
        Ok(Ok(resp)) => resp,
        Ok(Err(_panic)) => panic_response(),
        Err(_elapsed) => StatusCode::REQUEST_TIMEOUT.into_response(),
    };
    let mut resp = render_problem(resp, id);
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    tracing::debug!(parent: &span, status, latency_ms = elapsed.as_secs_f64() * 1000.0, "request finished");
    let headers = resp.headers_mut();
    headers.insert(REQUEST_ID, request_id);
    crate::web::add_security_headers(headers);
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    record_request(route, status, elapsed.as_secs_f64());
    resp
}

/// The metric handles of one route: its latency histogram and a counter per status seen.
struct RouteMetrics {
    duration: metrics::Histogram,
    by_status: Vec<(u16, metrics::Counter)>,
}

thread_local! {
    /// Handles by route, per worker thread: registering a labelled metric (building its
    /// key, hashing it into the registry) cost more than recording into it, on every
    /// request. Routes are templates (`/api/v1/jobs/{id}`) and statuses few, so this
    /// stays small.
    static ROUTE_METRICS: std::cell::RefCell<std::collections::HashMap<Box<str>, RouteMetrics>> =
        Default::default();
}

/// `http_requests_total{route,status}` += 1 and `http_request_duration_seconds{route}`.
fn record_request(route: &str, status: u16, seconds: f64) {
    ROUTE_METRICS.with_borrow_mut(|routes| {
        if !routes.contains_key(route) {
            let duration =
                metrics::histogram!("http_request_duration_seconds", "route" => route.to_owned());
            routes.insert(
                route.into(),
                RouteMetrics {
                    duration,
                    by_status: Vec::new(),
                },
            );
        }
        let Some(m) = routes.get_mut(route) else {
            return;
        };
        m.duration.record(seconds);
        match m.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let counter = metrics::counter!("http_requests_total",
                    "route" => route.to_owned(), "status" => status.to_string());
                counter.increment(1);
                m.by_status.push((status, counter));
            }
        }
    });
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
        // The one log line of a failed request: its cause and request id together.
        let cause = error.cause.as_deref().unwrap_or(&error.detail);
        tracing::error!(request_id = %request_id, status = error.status.as_u16(),
            code = error.code.as_str(), cause = %cause, "request failed");
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

/// Headers a typical JSON response ends up with: content type, request id, the four
/// security headers, and a few a handler adds (location, caching, idempotency).
const RESPONSE_HEADERS: usize = 12;

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        // Like `axum::Json`, but the buffer starts at 1 KiB (axum's starts at 128 bytes
        // and regrows several times for a typical object), and a value that cannot be
        // serialised is a problem, not a plain-text 500.
        let mut buf = Vec::with_capacity(1024);
        match serde_json::to_writer(&mut buf, &self.0) {
            Ok(()) => {
                let mut res = Response::new(axum::body::Body::from(buf));
                // Room for every header the edge adds (request id, security headers), so
                // the map is allocated once instead of regrown on the way out.
                let mut headers = axum::http::HeaderMap::with_capacity(RESPONSE_HEADERS);
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                *res.headers_mut() = headers;
                res
            }
            Err(e) => {
                ApiError::internal(format!("serialising the response failed: {e}")).into_response()
            }
        }
    }
}

pub fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ProblemCode::UnsupportedMediaType,
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;
    use crate::storage::StorageError;

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|v| v.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Sends one request with `x-request-id: rid` through the edge, with every log level
    /// captured; returns the status and the log lines.
    async fn logged(path: &str, rid: &str) -> (StatusCode, Vec<String>) {
        let app: Router = Router::new()
            .route(
                "/internal",
                get(|| async { Err::<(), _>(ApiError::internal("the disk is on fire")) }),
            )
            .route(
                "/unavailable",
                get(|| async { Err::<(), ApiError>(StorageError::Io("EIO on wal".into()).into()) }),
            )
            .route(
                "/missing",
                get(|| async { Err::<(), _>(ApiError::not_found("no such thing")) }),
            )
            .route(
                "/panic",
                get(|| async {
                    if std::hint::black_box(true) {
                        panic!("a handler bug");
                    }
                }),
            )
            .layer(middleware::from_fn_with_state(
                EdgeLimits {
                    timeout: Duration::from_secs(5),
                    max_header_bytes: 16 * 1024,
                },
                edge,
            ));
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let req = Request::builder()
            .uri(path)
            .header(REQUEST_ID, rid)
            .body(Body::empty());
        let Ok(req) = req else {
            panic!("bad test request");
        };
        let status = match app.oneshot(req).await {
            Ok(resp) => resp.status(),
            Err(never) => match never {},
        };
        (status, captured.lines())
    }

    #[tokio::test]
    async fn a_500_is_logged_once_with_its_cause_and_request_id() {
        let (status, lines) = logged("/internal", "rid-500").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let with_cause: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("the disk is on fire"))
            .collect();
        assert_eq!(with_cause.len(), 1, "{lines:#?}");
        assert!(with_cause[0].contains("rid-500"), "{lines:#?}");
        assert!(with_cause[0].contains("ERROR"), "{lines:#?}");
        let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
        assert_eq!(errors, 1, "{lines:#?}");
    }

    #[tokio::test]
    async fn a_503_from_storage_is_logged_once_with_its_cause_and_request_id() {
        let (status, lines) = logged("/unavailable", "rid-503").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let with_cause: Vec<_> = lines.iter().filter(|l| l.contains("EIO on wal")).collect();
        assert_eq!(with_cause.len(), 1, "{lines:#?}");
        assert!(with_cause[0].contains("rid-503"), "{lines:#?}");
    }

    #[tokio::test]
    async fn a_panic_is_logged_once_with_the_request_id() {
        let (status, lines) = logged("/panic", "rid-panic").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let errors: Vec<_> = lines.iter().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{lines:#?}");
        assert!(errors[0].contains("rid-panic"), "{lines:#?}");
        assert!(errors[0].contains("handler panicked"), "{lines:#?}");
    }

    #[tokio::test]
    async fn a_client_error_is_not_logged_as_an_error() {
        let (status, lines) = logged("/missing", "rid-404").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!lines.iter().any(|l| l.contains("ERROR")), "{lines:#?}");
    }
}
