#!/usr/bin/env bash
# Runs every test of warpbase: unit and black-box tests (cargo), schemathesis against the
# OpenAPI document, then the browser end-to-end tests when they exist. Installs what the
# tests need beyond cargo itself.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (unit + black-box)"
cargo test --all-targets --locked

# Packaging checks. The unit check takes about a second (skips without systemd-analyze);
# the .deb smoke run packages the debug binary cargo test just built (seconds), plus a
# one-time `cargo install cargo-deb` on a machine that lacks it (a few minutes).
echo "== packaging: systemd unit"
packaging/check-systemd.sh
echo "== packaging: .deb"
packaging/build-deb.sh --smoke

echo "== schemathesis against the OpenAPI document"
scripts/schemathesis.sh

if [ -x tests/e2e/run.sh ]; then
  echo "== browser end-to-end tests"
  E2E_STRICT=1 tests/e2e/run.sh
fi

if [ -x bench/run.sh ]; then
  echo "== bench harness smoke run"
  bench/run.sh --smoke
fi
echo "all tests passed"
