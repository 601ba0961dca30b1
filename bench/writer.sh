#!/usr/bin/env bash
# Durable commits/s through the writer at 1/8/64 callers vs raw fsync'ed SQLite commits.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
cargo run --release --quiet --example writer -- --seconds "$seconds"
