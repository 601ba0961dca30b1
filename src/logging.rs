//! Logging setup: pretty on a terminal, plain text otherwise, JSON with `--log-format json`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
        LogFormat::Auto if std::io::stderr().is_terminal() => builder.compact().try_init(),
        LogFormat::Auto => builder.with_ansi(false).try_init(),
    };
    // Already installed (a second App in one process): keep the first.
    let _ = result;
}
