//! The baseline for the HTTP scenarios: axum "hello world" on the same tokio runtime
//! flavour as warpbase, measured with the same wrk settings in the same run, so the ratio
//! "warpbase route / hello world" says what our middleware, auth and storage cost on this
//! machine, independent of how fast (or busy) the machine is.
//!
//! Run: `hello 127.0.0.1:PORT` (bench/run.sh starts it).

use axum::Router;
use axum::routing::get;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = Router::new().route("/", get(|| async { "Hello, World!" }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
