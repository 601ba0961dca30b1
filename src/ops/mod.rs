//! Operations endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document;
//! scheduled backups.

pub mod backup;
pub mod periodic;
pub mod retention;

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

/// Handle to the process-wide Prometheus recorder.
#[derive(Clone)]
pub struct Metrics(PrometheusHandle);

impl Metrics {
    /// The `metrics` facade is process-global by design; install the recorder once and
    /// share it (tests run several Apps in one process).
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        Metrics(
            HANDLE
                .get_or_init(|| {
                    let secs = [
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ];
                    let sizes = [
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                    ];
                    let builder = PrometheusBuilder::new()
                        .set_buckets_for_metric(
                            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                            &secs,
                        )
                        .and_then(|b| {
                            b.set_buckets_for_metric(
                                metrics_exporter_prometheus::Matcher::Full(
                                    "db_write_batch_size".into(),
                                ),
                                &sizes,
                            )
                        })
                        .unwrap_or_else(|_| PrometheusBuilder::new());
                    let recorder = builder.build_recorder();
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!("a metrics recorder was already installed");
                    }
                    handle
                })
                .clone(),
        )
    }

    pub fn render(&self) -> String {
        self.0.render()
    }
}

/// The ops routes of the main listener. `/metrics` is only a pointer here; its documented
/// handler is served by [`metrics_router`].
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json))
        // Not the web UI's fallback page: a scraper pointed at the wrong port should see
        // a clear 404, and the main listener (often public) must not reveal the metrics.
        .route(
            "/metrics",
            get(|| async {
                ApiError::not_found(
                    "metrics are served on the metrics_listen address only (default \
                     127.0.0.1:9090)",
                )
            }),
        )
}

/// The routes of `metrics_listen`; part of the API document.
pub fn metrics_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics_text))
}

/// A router with only `/metrics`, for `metrics_listen`.
pub fn metrics_router(state: AppState) -> Router {
    metrics_routes().split_for_parts().0.with_state(state)
}

#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "`ok` while the process serves", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// 200 when migrations are applied and writes are durable (a probe write commits, the
/// last commit did not fail, free space is above `min_free_bytes`); 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, description = "`ready`: migrations applied and the database takes durable writes", content_type = "text/plain", body = String),
        (status = 503, description = "`unavailable`: starting, stopping, the database is not writable, a commit failed, or free disk space is below `min_free_bytes`")))]
async fn readyz(State(state): State<AppState>) -> Response {
    if !state.is_ready() {
        return ApiError::unavailable("starting up or shutting down").into_response();
    }
    let floor = state.config.min_free_bytes;
    match tokio::time::timeout(Duration::from_secs(2), state.storage.ping_writer(floor)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e @ crate::storage::StorageError::LowDiskSpace { .. })) => {
            tracing::warn!(error = %e, "readiness: low on disk space");
            ApiError::unavailable("the disk holding the database is (nearly) full").into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: writer failed");
            ApiError::unavailable("the database is not writable").into_response()
        }
        Err(_) => ApiError::unavailable("the database writer is not answering").into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format, on the `metrics_listen` address only (default 127.0.0.1:9090; the main listener answers 404)", content_type = "text/plain; version=0.0.4", body = String)))]
async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI document, generated from the handlers' annotations.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1 of this API", content_type = "application/json", body = Object)))]
async fn openapi_json() -> crate::http::Json<utoipa::openapi::OpenApi> {
    crate::http::Json(crate::openapi::api_doc())
}
