//! `ApiError`: every failure the HTTP API reports, rendered once as RFC 9457
//! `application/problem+json` with a stable snake_case `code` clients branch on.
//!
//! This module is the HTTP edge of the error types, and the only place where a domain
//! error becomes a status and a code: the `From` impls below map `AuthError`,
//! `BillingError`, `JobError`, `UploadError` and `StorageError` (the domain modules do
//! not import this one). Every code is a [`ProblemCode`]; docs/API.md's "Stable codes"
//! and the web UI's message tables are checked against it (`tests/it/problem_codes.rs`).
//!
//! The body's `request_id` is filled in by the edge middleware in [`crate::http`], which
//! also turns body-less framework errors (404, 405, 413, ...) into problems, so no client
//! ever sees plain text or an HTML error page, and which logs each 5xx once, with its
//! cause and the request id on one line. Must not: log here, or put a cause (an internal
//! detail) into the response.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::auth::password::PasswordError;
use crate::billing::BillingError;
use crate::jobs::queue::JobError;
use crate::jobs::uploads::UploadError;
use crate::storage::StorageError;

/// Declares [`ProblemCode`] with its wire string and usual status in one table.
macro_rules! problem_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $status:ident;)+) => {
        /// The stable `code` of a problem. Its string is part of the API (docs/API.md,
        /// "Stable codes"); [`ProblemCode::status`] is the status it is sent with, except
        /// where [`ApiError::with_status`] documents another.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ProblemCode {
            $($(#[$doc])* $variant,)+
        }

        impl ProblemCode {
            /// Every code, in the order of the table.
            pub const ALL: &'static [ProblemCode] = &[$(ProblemCode::$variant,)+];

            /// The snake_case string clients see in `code` and in the `type` URI.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ProblemCode::$variant => $code,)+
                }
            }

            /// The status this code is sent with. `invalid_input` is also 400 (a
            /// malformed request rather than an invalid value), `timeout` also 504 and
            /// `internal` any other 5xx a framework layer produced (see
            /// [`ApiError::from_status`]).
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ProblemCode::$variant => StatusCode::$status,)+
                }
            }
        }
    };
}

problem_codes! {
    /// A value is invalid (422), or the request is malformed (400).
    InvalidInput = "invalid_input", UNPROCESSABLE_ENTITY;
    /// No valid bearer token.
    Unauthorized = "unauthorized", UNAUTHORIZED;
    /// Wrong email or password (the same for an unknown email).
    InvalidCredentials = "invalid_credentials", UNAUTHORIZED;
    /// The access token expired; refresh and retry.
    TokenExpired = "token_expired", UNAUTHORIZED;
    /// The session was revoked; sign in again.
    SessionRevoked = "session_revoked", UNAUTHORIZED;
    /// A rotated refresh token was presented again.
    RefreshReused = "refresh_reused", UNAUTHORIZED;
    /// The action needs a recent sign-in.
    StepUpRequired = "step_up_required", UNAUTHORIZED;
    /// A one-time code or token is unknown, used or expired.
    InvalidGrant = "invalid_grant", BAD_REQUEST;
    /// An OAuth flow continued by another browser than the one that started it.
    InvalidState = "invalid_state", BAD_REQUEST;
    /// A Stripe webhook's signature does not verify.
    InvalidSignature = "invalid_signature", BAD_REQUEST;
    /// Authenticated but not allowed (admin only).
    Forbidden = "forbidden", FORBIDDEN;
    NotFound = "not_found", NOT_FOUND;
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED;
    /// The request conflicts with the current state.
    Conflict = "conflict", CONFLICT;
    EmailTaken = "email_taken", CONFLICT;
    AlreadySubscribed = "already_subscribed", CONFLICT;
    /// Unlinking would leave the account no way to sign in.
    LastLoginMethod = "last_login_method", CONFLICT;
    /// A queued or running job uses the upload.
    UploadInUse = "upload_in_use", CONFLICT;
    /// The plan's job limits (`limit`, `max`, `used` members).
    PlanLimit = "plan_limit", PAYMENT_REQUIRED;
    /// The plan's upload storage (`max`, `used` members).
    StorageQuotaExceeded = "storage_quota_exceeded", PAYMENT_REQUIRED;
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE;
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    /// A job submitted to a queue reserved for internal jobs.
    ReservedQueue = "reserved_queue", UNPROCESSABLE_ENTITY;
    HeadersTooLarge = "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE;
    /// Too many requests; `Retry-After` says when to try again.
    RateLimited = "rate_limited", TOO_MANY_REQUESTS;
    /// No response head within `request_timeout` (408), or a gateway timeout (504).
    Timeout = "timeout", REQUEST_TIMEOUT;
    /// Our side failed; the cause is logged, never sent.
    Internal = "internal", INTERNAL_SERVER_ERROR;
    /// An OAuth provider failed or answered nonsense.
    ProviderError = "provider_error", BAD_GATEWAY;
    /// Temporarily unavailable (disk full, overloaded, Stripe unreachable); `Retry-After`.
    Unavailable = "unavailable", SERVICE_UNAVAILABLE;
}

impl std::fmt::Display for ProblemCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProblemCode {
    type Err = UnknownProblemCode;

    fn from_str(s: &str) -> Result<ProblemCode, UnknownProblemCode> {
        ProblemCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownProblemCode(s.to_string()))
    }
}

/// A string that is not one of the [`ProblemCode`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown problem code {0:?}")]
pub struct UnknownProblemCode(pub String);

/// A problem to report. Construct with the helpers (`ApiError::not_found()` ...) or
/// [`ApiError::new`] with a [`ProblemCode`].
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ProblemCode,
    pub detail: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<Duration>,
    /// Extra members merged into the problem object (e.g. the limit that was hit).
    pub extra: Option<serde_json::Value>,
    /// What went wrong inside, for the log line of a 5xx; never sent to the client.
    pub cause: Option<String>,
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
    /// A problem with `code`, sent with the code's status.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> ApiError {
        ApiError::with_status(code.status(), code, detail)
    }

    /// A problem with a status other than its code's usual one: `invalid_input` as 400,
    /// and the framework statuses of [`ApiError::from_status`].
    pub fn with_status(
        status: StatusCode,
        code: ProblemCode,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
            extra: None,
            cause: None,
        }
    }

    pub fn invalid_input(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemCode::InvalidInput, detail)
    }
    /// `invalid_input` as 400: the request itself is malformed.
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::with_status(StatusCode::BAD_REQUEST, ProblemCode::InvalidInput, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemCode::Unauthorized, detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemCode::Forbidden, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemCode::NotFound, detail)
    }
    /// 409 `conflict`; the more specific 409s have their own codes.
    pub fn conflict(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemCode::Conflict, detail)
    }
    pub fn rate_limited(retry_after: Duration) -> ApiError {
        let mut e = ApiError::new(
            ProblemCode::RateLimited,
            "too many attempts; try again later",
        );
        e.retry_after = Some(retry_after);
        e
    }
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(ProblemCode::Unavailable, detail);
        e.retry_after = Some(Duration::from_secs(5));
        e
    }
    /// A 500. `cause` is logged once by the edge middleware, on the line that names the
    /// request id, and never sent.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            ProblemCode::Internal,
            "an internal error occurred; it has been logged",
        )
        .with_cause(cause)
    }

    pub fn with_extra(mut self, extra: serde_json::Value) -> ApiError {
        self.extra = Some(extra);
        self
    }

    /// Records what went wrong inside, for the log line of a 5xx.
    pub fn with_cause(mut self, cause: impl std::fmt::Display) -> ApiError {
        self.cause = Some(cause.to_string());
        self
    }

    /// The default problem for a bare status code (framework errors without a body).
    pub fn from_status(status: StatusCode) -> ApiError {
        use ProblemCode as C;
        let (code, detail) = match status.as_u16() {
            400 => (C::InvalidInput, "the request is malformed"),
            401 => (C::Unauthorized, "authentication required"),
            403 => (C::Forbidden, "not allowed"),
            404 => (C::NotFound, "no such resource"),
            405 => (C::MethodNotAllowed, "method not allowed on this resource"),
            408 => (C::Timeout, "the request took too long"),
            413 => (C::PayloadTooLarge, "the request body is too large"),
            415 => (C::UnsupportedMediaType, "unsupported content type"),
            422 => (C::InvalidInput, "the request is invalid"),
            429 => (C::RateLimited, "too many requests"),
            431 => (C::HeadersTooLarge, "the request headers are too large"),
            503 => (C::Unavailable, "temporarily unavailable"),
            504 => (C::Timeout, "the request took too long"),
            s if s >= 500 => (C::Internal, "an internal error occurred"),
            _ => (C::InvalidInput, "the request could not be processed"),
        };
        ApiError::with_status(status, code, detail)
    }

    pub fn problem(&self, request_id: &str) -> Problem {
        Problem {
            type_: format!("https://warpbase.dev/problems/{}", self.code.as_str()),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: self.code.as_str(),
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

pub type ApiResult<T> = Result<T, ApiError>;

// Each domain's errors as HTTP: the one place that decides a status and a code.

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        if e.is_unavailable() {
            ApiError::unavailable("the database is not accepting writes right now").with_cause(e)
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        use ProblemCode as C;
        match e {
            AuthError::Unauthorized => ApiError::unauthorized("a valid bearer token is required"),
            AuthError::TokenExpired => ApiError::new(C::TokenExpired, e.to_string()),
            AuthError::SessionRevoked => ApiError::new(C::SessionRevoked, e.to_string()),
            AuthError::InvalidCredentials => ApiError::new(C::InvalidCredentials, e.to_string()),
            AuthError::RefreshReused => ApiError::new(C::RefreshReused, e.to_string()),
            AuthError::InvalidGrant => ApiError::new(C::InvalidGrant, e.to_string()),
            AuthError::EmailTaken => ApiError::new(C::EmailTaken, e.to_string()),
            AuthError::InvalidState => ApiError::new(C::InvalidState, e.to_string()),
            AuthError::StepUpRequired => ApiError::new(C::StepUpRequired, e.to_string()),
            AuthError::RateLimited(after) => ApiError::rate_limited(after),
            AuthError::Invalid(m) => ApiError::invalid_input(m),
            AuthError::Forbidden => ApiError::forbidden(e.to_string()),
            AuthError::NotFound => ApiError::not_found("no such resource"),
            AuthError::LastLoginMethod(m) => ApiError::new(C::LastLoginMethod, m),
            AuthError::OAuthProvider(m) => ApiError::new(C::ProviderError, m),
            AuthError::Password(PasswordError::Overloaded) => {
                ApiError::unavailable("sign-in is busy; try again in a moment")
            }
            AuthError::Password(p) => ApiError::internal(p),
            AuthError::Storage(s) => s.into(),
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> ApiError {
        match e {
            BillingError::InvalidSignature(_) => {
                ApiError::new(ProblemCode::InvalidSignature, e.to_string())
            }
            BillingError::Invalid(m) => ApiError::invalid_input(m),
            BillingError::NotAnEvent(m) => ApiError::bad_request(m),
            BillingError::AlreadySubscribed => {
                ApiError::new(ProblemCode::AlreadySubscribed, e.to_string())
            }
            BillingError::Conflict(m) => ApiError::conflict(m),
            BillingError::NotFound(what) => ApiError::not_found(format!("no such {what}")),
            BillingError::ApplyFailed(m) => ApiError::internal(m),
            BillingError::Stripe(s) if s.is_retryable() => {
                ApiError::unavailable("the payment provider is not reachable right now")
                    .with_cause(format_args!("Stripe unavailable: {s}"))
            }
            BillingError::Stripe(s) => ApiError::internal(s),
            BillingError::Storage(s) => s.into(),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> ApiError {
        match e {
            JobError::Invalid(m) => ApiError::invalid_input(m),
            JobError::NotFound => ApiError::not_found("no such job"),
            JobError::IdempotencyConflict => ApiError::conflict(e.to_string()),
            JobError::Conflict(m) => ApiError::conflict(m),
            JobError::ReservedQueue(_) => ApiError::new(ProblemCode::ReservedQueue, e.to_string()),
            JobError::PlanLimit { what, limit, used } => ApiError::new(
                ProblemCode::PlanLimit,
                format!("your plan allows {limit} {what}; upgrade to run more"),
            )
            .with_extra(serde_json::json!({ "limit": what, "max": limit, "used": used })),
            JobError::Storage(s) => s.into(),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        match e {
            UploadError::TooLarge(_) => ApiError::new(ProblemCode::PayloadTooLarge, e.to_string()),
            UploadError::Quota { max, used } => {
                ApiError::new(ProblemCode::StorageQuotaExceeded, e.to_string())
                    .with_extra(serde_json::json!({ "max": max, "used": used }))
            }
            UploadError::RateLimited(after) => ApiError::rate_limited(after),
            UploadError::LowSpace => ApiError::unavailable(e.to_string()),
            // The detail of a disk failure is for the log, not the client.
            UploadError::Disk(io) => {
                ApiError::unavailable("the upload could not be stored; try again later")
                    .with_cause(format_args!("storing an upload failed: {io}"))
            }
            UploadError::Interrupted(_) => ApiError::bad_request(e.to_string()),
            UploadError::Empty => ApiError::invalid_input(e.to_string()),
            UploadError::NotFound => ApiError::not_found(e.to_string()),
            UploadError::InUse => ApiError::new(ProblemCode::UploadInUse, e.to_string()),
            UploadError::Storage(s) => s.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for &code in ProblemCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s} is not snake_case"
            );
            assert_eq!(s.parse::<ProblemCode>(), Ok(code));
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
        assert!("no_such_code".parse::<ProblemCode>().is_err());
    }

    #[test]
    fn domain_errors_map_to_status_and_code() {
        use ProblemCode as C;
        let retry = Duration::from_secs(3);
        let cases: Vec<(ApiError, u16, ProblemCode)> = vec![
            (StorageError::WriterGone.into(), 503, C::Unavailable),
            (StorageError::Corrupt("x".into()).into(), 500, C::Internal),
            (
                AuthError::Storage(StorageError::Io("EIO".into())).into(),
                503,
                C::Unavailable,
            ),
            (AuthError::Unauthorized.into(), 401, C::Unauthorized),
            (
                AuthError::InvalidCredentials.into(),
                401,
                C::InvalidCredentials,
            ),
            (AuthError::TokenExpired.into(), 401, C::TokenExpired),
            (AuthError::SessionRevoked.into(), 401, C::SessionRevoked),
            (AuthError::RefreshReused.into(), 401, C::RefreshReused),
            (AuthError::StepUpRequired.into(), 401, C::StepUpRequired),
            (AuthError::InvalidGrant.into(), 400, C::InvalidGrant),
            (AuthError::InvalidState.into(), 400, C::InvalidState),
            (AuthError::EmailTaken.into(), 409, C::EmailTaken),
            (AuthError::RateLimited(retry).into(), 429, C::RateLimited),
            (AuthError::Invalid("x".into()).into(), 422, C::InvalidInput),
            (AuthError::Forbidden.into(), 403, C::Forbidden),
            (AuthError::NotFound.into(), 404, C::NotFound),
            (
                AuthError::LastLoginMethod("x".into()).into(),
                409,
                C::LastLoginMethod,
            ),
            (
                AuthError::OAuthProvider("x".into()).into(),
                502,
                C::ProviderError,
            ),
            (
                AuthError::Password(PasswordError::Overloaded).into(),
                503,
                C::Unavailable,
            ),
            (
                AuthError::Password(PasswordError::MalformedHash).into(),
                500,
                C::Internal,
            ),
            (
                BillingError::InvalidSignature("x".into()).into(),
                400,
                C::InvalidSignature,
            ),
            (
                BillingError::Invalid("x".into()).into(),
                422,
                C::InvalidInput,
            ),
            (
                BillingError::NotAnEvent("x".into()).into(),
                400,
                C::InvalidInput,
            ),
            (
                BillingError::AlreadySubscribed.into(),
                409,
                C::AlreadySubscribed,
            ),
            (BillingError::Conflict("x".into()).into(), 409, C::Conflict),
            (BillingError::NotFound("plan").into(), 404, C::NotFound),
            (
                BillingError::ApplyFailed("x".into()).into(),
                500,
                C::Internal,
            ),
            (JobError::Invalid("x".into()).into(), 422, C::InvalidInput),
            (JobError::NotFound.into(), 404, C::NotFound),
            (JobError::IdempotencyConflict.into(), 409, C::Conflict),
            (JobError::Conflict("x".into()).into(), 409, C::Conflict),
            (
                JobError::ReservedQueue("system".into()).into(),
                422,
                C::ReservedQueue,
            ),
            (
                JobError::PlanLimit {
                    what: "jobs per month",
                    limit: 1,
                    used: 1,
                }
                .into(),
                402,
                C::PlanLimit,
            ),
            (UploadError::TooLarge(1).into(), 413, C::PayloadTooLarge),
            (
                UploadError::Quota { max: 1, used: 1 }.into(),
                402,
                C::StorageQuotaExceeded,
            ),
            (UploadError::RateLimited(retry).into(), 429, C::RateLimited),
            (UploadError::LowSpace.into(), 503, C::Unavailable),
            (
                UploadError::Disk(std::io::Error::other("EIO")).into(),
                503,
                C::Unavailable,
            ),
            (
                UploadError::Interrupted("x".into()).into(),
                400,
                C::InvalidInput,
            ),
            (UploadError::Empty.into(), 422, C::InvalidInput),
            (UploadError::NotFound.into(), 404, C::NotFound),
            (UploadError::InUse.into(), 409, C::UploadInUse),
        ];
        for (i, (err, status, code)) in cases.into_iter().enumerate() {
            assert_eq!(
                (err.status.as_u16(), err.code),
                (status, code),
                "case {i}: {err}"
            );
        }
    }

    #[test]
    fn a_cause_is_kept_for_the_log_and_never_sent() {
        let e: ApiError = UploadError::Disk(std::io::Error::other("secret path /x")).into();
        assert!(
            e.cause
                .as_deref()
                .is_some_and(|c| c.contains("secret path"))
        );
        let body = serde_json::to_string(&e.problem("rid")).unwrap_or_default();
        assert!(!body.contains("secret path"), "{body}");
        let e = ApiError::internal("db exploded");
        assert_eq!(e.cause.as_deref(), Some("db exploded"));
        assert!(!e.detail.contains("exploded"));
    }

    #[test]
    fn plan_limit_and_quota_keep_their_members() {
        let e: ApiError = JobError::PlanLimit {
            what: "active jobs",
            limit: 2,
            used: 2,
        }
        .into();
        let p = serde_json::to_value(e.problem("r")).unwrap_or_default();
        assert_eq!(p["limit"], "active jobs");
        assert_eq!(p["max"], 2);
        assert_eq!(p["used"], 2);
        assert_eq!(p["code"], "plan_limit");
        assert_eq!(p["type"], "https://warpbase.dev/problems/plan_limit");
    }
}
