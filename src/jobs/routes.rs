//! HTTP routes of jobs: submit, list, read, cancel, retry, SSE, tickets, uploads, and the
//! admin dead-letter queue.

use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Multipart, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use super::queue::{self, JobError, JobView, SubmitRequest, Submitted};
use super::uploads;
use crate::auth::extract::bearer;
use crate::auth::{AdminUser, AuthError, AuthUser, Grant};
use crate::error::{ApiError, ApiResult};
use crate::events::sse;
use crate::http::{Json, Query, page_limit};
use crate::state::AppState;
use crate::storage::jobs as q;
use crate::storage::states::JobStatus;

/// The jobs routes; each handler's `#[utoipa::path]` is its entry in the API document.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(get_job))
        .routes(routes!(attempts))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(job_events))
        .routes(routes!(user_events))
        .routes(routes!(ticket))
        .routes(routes!(dead_letters))
        .routes(routes!(discard))
        .routes(routes!(upload).layer(DefaultBodyLimit::disable()))
        .routes(routes!(delete_upload))
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body again returns the same job (200)")),
    request_body = SubmitRequest,
    responses((status = 202, description = "Queued", body = JobView),
        (status = 200, description = "The job an earlier request with this Idempotency-Key created", body = JobView),
        (status = 400, description = "Malformed JSON or Idempotency-Key"),
        (status = 401, description = "`unauthorized`"),
        (status = 402, description = "`plan_limit`: over the plan's quota (members `limit`, `max`, `used`)"),
        (status = 409, description = "`conflict`: the Idempotency-Key was used with a different body"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "`invalid_input`: unknown kind, bad payload, queue, priority, run_at or max_attempts; `reserved_queue`: the `system` queue is for internal jobs")))]
async fn submit(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    headers: HeaderMap,
    Json(req): Json<SubmitRequest>,
) -> ApiResult<Response> {
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?
                .to_string(),
        ),
        None => None,
    };
    Ok(match queue::submit(&state, &who, req, key).await? {
        Submitted::Created(row) => (StatusCode::ACCEPTED, Json(JobView::from(row))).into_response(),
        Submitted::Existing(row) => (StatusCode::OK, Json(JobView::from(row))).into_response(),
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only jobs with this status.
    #[param(value_type = Option<JobStatus>)]
    status: Option<String>,
    kind: Option<String>,
    /// Page size, default 50.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Admins only: every user's jobs.
    #[serde(default)]
    all: bool,
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, description = "The user's jobs, newest first", body = crate::openapi::JobPage),
        (status = 400, description = "`invalid_input`: bad `status`, `limit` or query"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: `all=true` needs the admin role")))]
async fn list(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Query(qy): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    if qy.all && !who.is_admin {
        return Err(AuthError::Forbidden.into());
    }
    list_jobs(&state, (!qy.all).then_some(who.user_id), qy).await
}

async fn list_jobs(
    state: &AppState,
    user: Option<String>,
    qy: ListQuery,
) -> ApiResult<Json<serde_json::Value>> {
    // Parsed here rather than by serde so a bad value gets a message naming the choices.
    let status = qy
        .status
        .as_deref()
        .map(str::parse::<JobStatus>)
        .transpose()
        .map_err(|_| {
            let all: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(format!("status must be one of {}", all.join(", ")))
        })?;
    let limit = page_limit(qy.limit)?;
    let rows = state
        .storage
        .read(move |c| {
            q::list(
                c,
                &q::ListFilter {
                    user_id: user.as_deref(),
                    status,
                    kind: qy.kind.as_deref(),
                    before_id: qy.cursor.as_deref(),
                    limit: limit + 1,
                },
            )
        })
        .await?;
    Ok(Json(page(rows, limit as usize)))
}

fn page(mut rows: Vec<q::JobRow>, limit: usize) -> serde_json::Value {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    let items: Vec<JobView> = rows.into_iter().map(JobView::from).collect();
    json!({ "items": items, "next_cursor": next })
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = JobView),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such job of this user")))]
async fn get_job(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(queue::get_visible(&state, &who, &id).await?.into()))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/attempts", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job's attempts, oldest first", body = crate::openapi::AttemptList),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such job of this user")))]
async fn attempts(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let row = queue::get_visible(&state, &who, &id).await?;
    let rows = state.storage.read(move |c| q::attempts(c, &row.id)).await?;
    let items: Vec<_> = rows
        .into_iter()
        .map(|a| {
            json!({
                "attempt": a.attempt,
                "started_at": crate::clock::rfc3339(a.started_at),
                "finished_at": crate::clock::rfc3339(a.finished_at),
                "outcome": a.outcome,
                "error": a.error,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Canceled (a running job is signalled and ends `canceled`)", body = JobView),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such job of this user"),
        (status = 409, description = "`conflict`: the job has already finished")))]
async fn cancel(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(queue::cancel(&state, &who, &id).await?.into()))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Queued again with a fresh budget of attempts", body = JobView),
        (status = 401, description = "`unauthorized`"),
        (status = 402, description = "`plan_limit`: the owner's plan allows no more active jobs or jobs this period (members `limit`, `max`, `used`), as at submit"),
        (status = 404, description = "`not_found`: no such job of this user"),
        (status = 409, description = "`conflict`: only `dead` or `canceled` jobs can be retried")))]
async fn retry(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(queue::retry(&state, &who, &id).await?.into()))
}

/// Bearer header, or a single-use `?ticket=` for `EventSource` (which cannot set headers).
/// A ticket is re-checked as the bearer token it was issued for would be (session live,
/// token version current, user enabled, not expired); the stream keeps the grant, so it
/// ends when any of that stops being true (see [`super::guard`]).
pub struct StreamUser(pub Grant);

impl FromRequestParts<AppState> for StreamUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(token) = bearer(parts) {
            return Ok(StreamUser(state.auth.authenticate_grant(token).await?));
        }
        let ticket = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("ticket="))
            .ok_or(AuthError::Unauthorized)?;
        let grant = state.events.redeem_ticket(ticket).ok_or_else(|| {
            ApiError::unauthorized("the ticket is unknown, expired or already used")
        })?;
        let principal = state.auth.revalidate(&grant).await?;
        Ok(StreamUser(Grant { principal, ..grant }))
    }
}

/// A bearer token (never a ticket) and what it is bound to.
pub struct BearerGrant(pub Grant);

impl FromRequestParts<AppState> for BearerGrant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or(AuthError::Unauthorized)?;
        Ok(BearerGrant(state.auth.authenticate_grant(token).await?))
    }
}

/// The query of the SSE routes. `EventSource` cannot set `Last-Event-ID` on a new
/// connection (only on its own reconnects, which a single-use ticket cannot make), so
/// the last id may come as `?last_event_id=` too; the header wins when both are present.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// From `POST /api/v1/events/ticket`, instead of a bearer header.
    #[allow(dead_code)] // read by `StreamUser` from the raw query; listed for the docs
    ticket: Option<String>,
    /// Resume after this event id, like the `Last-Event-ID` header.
    last_event_id: Option<String>,
}

/// The `Last-Event-ID` header, else `?last_event_id=`.
fn last_event_id_raw(headers: &HeaderMap, query: &StreamQuery) -> Option<String> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| query.last_event_id.clone())
}

/// A per-job stream's event id: `{seq}` (a user stream's `{job}:{seq}` is accepted too).
fn job_event_seq(raw: &str) -> Option<u64> {
    raw.rsplit(':').next().and_then(|s| s.trim().parse().ok())
}

/// A user stream's event id: `{job}:{seq}`.
fn user_event_id(raw: &str) -> Option<(String, u64)> {
    let (job, seq) = raw.trim().rsplit_once(':')?;
    Some((job.to_string(), seq.parse().ok()?))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = []), ("ticket" = [])),
    params(("id" = String, Path, description = "Job id"), StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses((status = 200, description = "Server-sent events `state`, `progress`, then `done`, after which the stream closes; `reconnect` when the access token expired", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_input`: unknown query parameter"),
        (status = 401, description = "`unauthorized`: no bearer token and no valid ticket; `session_revoked`, `token_expired`: the ticket's session or token ended"),
        (status = 404, description = "`not_found`: no such job of this user")))]
async fn job_events(
    State(state): State<AppState>,
    StreamUser(grant): StreamUser,
    Path(id): Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = queue::get_visible(&state, &grant.principal, &id).await?;
    let last = last_event_id_raw(&headers, &query).and_then(|s| job_event_seq(&s));
    Ok(sse::job_stream(state, grant, row, last).into_response())
}

#[utoipa::path(get, path = "/api/v1/events", tag = "jobs", security(("bearer" = []), ("ticket" = [])),
    params(StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (`{job_id}:{seq}`)")),
    responses((status = 200, description = "Server-sent events `state`, `progress` and `done` of all the user's jobs; `resync` when a resume could not be exact; `reconnect` when the access token expired", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_input`: unknown query parameter"),
        (status = 401, description = "`unauthorized`: no bearer token and no valid ticket; `session_revoked`, `token_expired`: the ticket's session or token ended")))]
async fn user_events(
    State(state): State<AppState>,
    StreamUser(grant): StreamUser,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
) -> Response {
    let last = last_event_id_raw(&headers, &query);
    let resume = last.as_deref().map(user_event_id);
    sse::user_stream(state, grant, resume).into_response()
}

#[utoipa::path(post, path = "/api/v1/events/ticket", tag = "jobs", security(("bearer" = [])),
    responses((status = 200, description = "A single-use ticket (60 s) for `EventSource`, which cannot send headers; bound to the access token's session, token version and expiry", body = crate::openapi::Ticket),
        (status = 401, description = "`unauthorized`")))]
async fn ticket(
    State(state): State<AppState>,
    BearerGrant(grant): BearerGrant,
) -> Json<serde_json::Value> {
    Json(json!({ "ticket": state.events.issue_ticket(grant), "expires_in": 60 }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeadQuery {
    /// Page size, default 50.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    kind: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/admin/jobs/dead", tag = "admin", security(("bearer" = [])),
    params(DeadQuery),
    responses((status = 200, description = "The dead-letter queue, newest first", body = crate::openapi::JobPage),
        (status = 400, description = "`invalid_input`: bad `limit` or query"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: admin role required")))]
async fn dead_letters(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Query(qy): Query<DeadQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    list_jobs(
        &state,
        None,
        ListQuery {
            status: Some("dead".into()),
            kind: qy.kind,
            limit: qy.limit,
            cursor: qy.cursor,
            all: true,
        },
    )
    .await
}

#[utoipa::path(delete, path = "/api/v1/admin/jobs/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Id of a dead job")),
    responses((status = 204, description = "Discarded"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: admin role required"),
        (status = 404, description = "`not_found`: no dead job with this id")))]
async fn discard(
    State(state): State<AppState>,
    AdminUser(_admin): AdminUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    queue::discard(&state, &id).await.map_err(|e| match e {
        JobError::NotFound => ApiError::not_found("no dead job with this id"),
        e => e.into(),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stores an archive for the `analyze` kind: a raw body, or the first file of a
/// multipart form. Streams to disk with the plan's limits enforced as bytes arrive.
#[utoipa::path(post, path = "/api/v1/uploads", tag = "jobs", security(("bearer" = [])),
    request_body(content(
        (Vec<u8> = "application/octet-stream"),
        (crate::openapi::UploadForm = "multipart/form-data")),
        description = "A tar.gz or zip archive, raw or as the first file of a form"),
    responses((status = 201, description = "Stored, for the `analyze` kind", body = crate::openapi::Upload),
        (status = 400, description = "`invalid_input`: malformed form or interrupted upload"),
        (status = 401, description = "`unauthorized`"),
        (status = 402, description = "`storage_quota_exceeded`: the plan's `max_storage_bytes` would be exceeded (members `max`, `used`)"),
        (status = 413, description = "`payload_too_large`: over the plan's `max_upload_bytes`"),
        (status = 422, description = "`invalid_input`: empty upload or form without a file"),
        (status = 429, description = "`rate_limited`: over `uploads.rate_limit` per `uploads.rate_window`"),
        (status = 503, description = "`unavailable`: the disk is full, read-only or below `uploads.min_free_bytes`")))]
async fn upload(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    req: Request,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let row = if is_multipart {
        let mut mp = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let mut field = mp
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?
            .ok_or_else(|| ApiError::invalid_input("the form has no file"))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, String>>(4);
        let pump = async move {
            loop {
                let next = match field.chunk().await {
                    Ok(Some(b)) => Ok(b),
                    Ok(None) => break,
                    Err(e) => Err(e.body_text()),
                };
                if tx.send(next).await.is_err() {
                    break;
                }
            }
        };
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let (_, stored) =
            tokio::join!(pump, uploads::store(&state, &who.user_id, Box::pin(stream)));
        stored?
    } else {
        let stream = req
            .into_body()
            .into_data_stream()
            .map(|r| r.map_err(|e| e.to_string()));
        uploads::store(&state, &who.user_id, Box::pin(stream)).await?
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": row.id, "size": row.size, "sha256": row.sha256 })),
    ))
}

#[utoipa::path(delete, path = "/api/v1/uploads/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Upload id")),
    responses((status = 204, description = "Deleted, file and record"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`not_found`: no such upload of this user"),
        (status = 409, description = "`upload_in_use`: a queued, running or retrying job uses it")))]
async fn delete_upload(
    State(state): State<AppState>,
    AuthUser(who): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    uploads::delete(&state, &who.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
