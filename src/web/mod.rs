//! The embedded web UI: files from `assets/` compiled into the binary with rust-embed,
//! served with correct MIME types, ETags and caching, an SPA fallback for client routes,
//! and the security headers every response carries. Must not know about domain logic.

use axum::Router;
use axum::body::Body;
use axum::http::header::{self, HeaderValue};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "assets/"]
struct Assets;

pub fn router() -> Router<AppState> {
    Router::new()
}

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
     connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; \
     form-action 'self'; frame-ancestors 'none'";

/// Adds the security headers a response did not set itself (every response passes here:
/// `http::edge` calls it).
pub fn add_security_headers(headers: &mut HeaderMap) {
    let defaults = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("strict-origin-when-cross-origin"),
        ),
    ];
    // One growth of the map at most, instead of one per header.
    headers.reserve(defaults.len());
    for (name, value) in defaults {
        headers.entry(name).or_insert(value);
    }
}

/// Anything no route matched: an embedded file, the SPA shell for client routes, or a 404
/// problem for API paths.
pub async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") || path == "/api" {
        return ApiError::not_found(format!("no API route {path}")).into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return ApiError::from_status(StatusCode::METHOD_NOT_ALLOWED).into_response();
    }
    let file = path.trim_start_matches('/');
    if !file.is_empty()
        && let Some(resp) = serve_file(file, &headers)
    {
        return resp;
    }
    // A path with an extension is a missing file, not a client route.
    if file
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains('.'))
    {
        return ApiError::not_found(format!("no file {path}")).into_response();
    }
    serve_file("index.html", &headers)
        .unwrap_or_else(|| ApiError::not_found("the web UI is not embedded").into_response())
}

fn serve_file(path: &str, headers: &HeaderMap) -> Option<Response> {
    let file = Assets::get(path)?;
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let cache = if is_hashed_name(path) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return Some(
            (
                StatusCode::NOT_MODIFIED,
                [
                    (header::ETAG, etag),
                    (header::CACHE_CONTROL, cache.to_string()),
                ],
            )
                .into_response(),
        );
    }
    let mime = file.metadata.mimetype().to_string();
    Some(
        Response::builder()
            .header(header::CONTENT_TYPE, mime)
            .header(header::ETAG, etag)
            .header(header::CACHE_CONTROL, cache)
            .body(Body::from(file.data.into_owned()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    )
}

/// `app.3f2a9c1e.js`: a name with a content hash may be cached forever.
fn is_hashed_name(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() >= 3 && {
        let h = parts[parts.len() - 2];
        h.len() >= 8 && h.chars().all(|c| c.is_ascii_hexdigit())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hashed_names() {
        assert!(super::is_hashed_name("js/app.3f2a9c1e.js"));
        assert!(!super::is_hashed_name("app.js"));
        assert!(!super::is_hashed_name("index.html"));
    }
}
