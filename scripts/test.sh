#!/usr/bin/env bash
# Runs every test of warpbase: unit and black-box tests (cargo), schemathesis against the
# OpenAPI document, then the browser end-to-end tests when they exist. Installs what the
# tests need beyond cargo itself.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test (unit + black-box)"
cargo test --all-targets --locked

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
