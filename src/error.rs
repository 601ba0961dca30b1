//! `ApiError`: every failure the HTTP API reports, rendered once as RFC 9457
//! `application/problem+json` with a stable snake_case `code` clients branch on.
//!
//! Domain errors (`AuthError`, `BillingError`, `JobError`, `StorageError`) convert into it
//! in their own modules. The body's `request_id` is filled in by the problem middleware
//! in [`crate::http`], which also turns bodies-less framework errors (404, 405, 413, ...)
//! into problems, so no client ever sees plain text or an HTML error page.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::storage::StorageError;

/// A problem to report. Construct with the helpers (`ApiError::not_found()` ...).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<Duration>,
    /// Extra members merged into the problem object (e.g. the limit that was hit).
    pub extra: Option<serde_json::Value>,
}

/// The problem document, attached to the response as an extension by `into_response` and
/// serialised by the problem middleware once the request id is known.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(description = "An RFC 9457 problem. Some codes add members \
    (`plan_limit`: `limit`, `max`, `used`).")]
#[schema(example = json!({
    "type": "https://warpbase.dev/problems/not_found", "title": "Not Found", "status": 404,
    "code": "not_found", "detail": "no such job", "request_id": "4f1c0e8a-..."
}))]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    /// Stable snake_case error code; clients branch on it.
    pub code: &'static str,
    pub detail: String,
    /// The `x-request-id` of the response.
    pub request_id: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            extra: None,
        }
    }

    pub fn invalid_input(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", detail)
    }
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, detail)
    }
    pub fn rate_limited(retry_after: Duration) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many attempts; try again later",
        );
        e.retry_after = Some(retry_after);
        e
    }
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        e.retry_after = Some(Duration::from_secs(5));
        e
    }
    /// A 500. `cause` is logged (with the request id, by the middleware) and never sent.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        )
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> ApiError {
        self.extra = Some(extra);
        self
    }

    /// The default problem for a bare status code (framework errors without a body).
    pub fn from_status(status: StatusCode) -> ApiError {
        let (code, detail) = match status.as_u16() {
            400 => ("invalid_input", "the request is malformed"),
            401 => ("unauthorized", "authentication required"),
            403 => ("forbidden", "not allowed"),
            404 => ("not_found", "no such resource"),
            405 => ("method_not_allowed", "method not allowed on this resource"),
            408 => ("timeout", "the request took too long"),
            413 => ("payload_too_large", "the request body is too large"),
            415 => ("unsupported_media_type", "unsupported content type"),
            422 => ("invalid_input", "the request is invalid"),
            429 => ("rate_limited", "too many requests"),
            431 => ("headers_too_large", "the request headers are too large"),
            503 => ("unavailable", "temporarily unavailable"),
            504 => ("timeout", "the request took too long"),
            s if s >= 500 => ("internal", "an internal error occurred"),
            _ => ("invalid_input", "the request could not be processed"),
        };
        ApiError::new(status, code, detail)
    }

    pub fn problem(&self, request_id: &str) -> Problem {
        Problem {
            type_: format!("https://warpbase.dev/problems/{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: self.code,
            detail: self.detail.clone(),
            request_id: request_id.to_string(),
            extra: self.extra.as_ref().and_then(|v| v.as_object().cloned()),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The body is rendered by the problem middleware, which knows the request id.
        // Outside it (unit tests), render here without one.
        let body = serde_json::to_vec(&self.problem("")).unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp.extensions_mut().insert(self);
        resp
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        if e.is_unavailable() {
            tracing::error!(error = %e, "storage unavailable");
            ApiError::unavailable("the database is not accepting writes right now")
        } else {
            ApiError::internal(e)
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
