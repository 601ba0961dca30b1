#!/usr/bin/env bash
# Browser end-to-end tests of the web UI. Installs Debian Chromium if needed, builds the
# debug binary, starts it offline on a free loopback port with a temp data dir, runs
# ui.test.js with node's test runner, stops the server. Screenshots: tests/e2e/artifacts/.
# E2E_STRICT=1 fails (instead of skipping) steps whose endpoints the server lacks.
set -euo pipefail
cd "$(dirname "$0")"
E2E_DIR=$(pwd)
ROOT=$(cd ../.. && pwd)

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian chromium"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >/tmp/warpbase-e2e-apt.log 2>&1 \
     || [ ! -x /usr/bin/chromium ]; then
    tail -5 /tmp/warpbase-e2e-apt.log || true
    echo "SKIPPED: chromium cannot be installed"
    exit 0
  fi
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "SKIPPED: node and npm are needed for the browser tests"
  exit 0
fi

echo "== npm ci (playwright-core; no browser download)"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error

echo "== cargo build (debug)"
(cd "$ROOT" && cargo build --locked --bin warpbase)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN="$TARGET_DIR/debug/warpbase"

DATA=$(mktemp -d /tmp/warpbase-e2e.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
rm -rf "$E2E_DIR/artifacts" && mkdir -p "$E2E_DIR/artifacts"

# Offline mode: no Stripe key, no OAuth keys, mail to the log; no config file from the repo.
# The test restarts the server once (to drop live SSE connections): it reads the command
# line from WB_SERVER_CMD and keeps the current PID in WB_PIDFILE.
# The free plan allows 2 concurrent jobs; the scenario runs several at once on a busy
# machine, so give it room (the pro plan stays as shipped).
CONFIG="$DATA.toml"
cat >"$CONFIG" <<'TOML'
[[billing.plans]]
id = "free"
name = "Free"
limits = { jobs_per_period = 1000, concurrent_jobs = 10, max_upload_bytes = 5242880 }
[[billing.plans]]
id = "pro"
name = "Pro"
price_id = "price_pro_monthly"
price = 1900
limits = { jobs_per_period = 1000, concurrent_jobs = 20, max_upload_bytes = 52428800 }
TOML
SERVER_CMD=("$BIN" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" --log-format json --config "$CONFIG")
PIDFILE="$DATA.pid"
LOG="$E2E_DIR/artifacts/server.log"
export WARPBASE_PUBLIC_URL="$URL"
# The scenario signs in many times from one address; the default limit (10/min) would
# rightly answer 429 to that.
export WARPBASE_AUTH__RATE_LIMIT=1000
# No metrics listener: the default 127.0.0.1:9090 may be taken on a developer machine.
export WARPBASE_METRICS_LISTEN=off
unset WARPBASE_STRIPE__SECRET_KEY WARPBASE_CONFIG
"${SERVER_CMD[@]}" >>"$LOG" 2>&1 &
SERVER=$!
echo "$SERVER" >"$PIDFILE"
cleanup() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || echo "$SERVER")
  kill "$pid" 2>/dev/null || true
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -rf "$DATA" "$PIDFILE" "$CONFIG"
}
trap cleanup EXIT

for _ in $(seq 1 300); do
  if curl -fsS "$URL/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "warpbase exited before it was ready:"; tail -20 "$LOG"; exit 1
  fi
  sleep 0.1
done
curl -fsS "$URL/readyz" >/dev/null

echo "== node --test ui.test.js against $URL"
WB_URL="$URL" WB_DATA_DIR="$DATA" E2E_ARTIFACTS="$E2E_DIR/artifacts" WB_PIDFILE="$PIDFILE" WB_LOG="$LOG" \
  WB_SERVER_CMD="$(printf '%s\n' "${SERVER_CMD[@]}")" \
  node --test --test-reporter=spec --test-concurrency=1 ui.test.js
echo "screenshots: $E2E_DIR/artifacts/"
