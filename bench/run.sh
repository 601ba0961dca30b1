#!/usr/bin/env bash
# Runs the warpbase benchmarks on loopback and prints one table (see BENCHMARKS.md).
#
#   bench/run.sh            --quick: every scenario, about a minute
#   bench/run.sh --full     longer phases, SSE with 1k and 10k subscribers
#   bench/run.sh --smoke    seconds; proves the harness works (CI). Uses the dev profile,
#                           which `cargo test --all-targets` has already built, so its
#                           numbers mean nothing; never installs anything.
#   extra flags go to the driver: --only http,webhook  --out FILE
#
# Results: bench/results/<UTC date-time>-<mode>.json (smoke: a temp file).
# Installs wrk with apt-get when missing (quick/full); without wrk the GET scenarios fall
# back to the built-in load generator and say so in the table.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=--quick
args=()
for a in "$@"; do
  case "$a" in
    --smoke|--quick|--full) mode=$a ;;
    *) args+=("$a") ;;
  esac
done

target_dir=${CARGO_TARGET_DIR:-target}
if [ "$mode" = --smoke ]; then
  profile_flag=()
  bin_dir=$target_dir/debug
  out=${TMPDIR:-/tmp}/warpbase-bench-smoke.json
else
  profile_flag=(--release)
  bin_dir=$target_dir/release
  out=bench/results/$(date -u +%Y-%m-%dT%H%M%SZ)-${mode#--}.json
  if ! command -v wrk >/dev/null 2>&1; then
    echo "== installing wrk" >&2
    if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq wrk; } >&2 \
      || echo "wrk not installed: GET scenarios use the built-in generator" >&2
  fi
fi

echo "== building (${profile_flag[*]:-dev})" >&2
if [ "$mode" = --smoke ]; then
  # One invocation, like `cargo test --all-targets`, so its artifacts are reused.
  cargo build --locked --quiet --bin warpbase --example bench --example hello --example writer
else
  # Separately: examples enable dev-dependency features (tokio test-util), and the server
  # must be exactly the binary `cargo build --release` ships.
  cargo build "${profile_flag[@]}" --locked --quiet --bin warpbase
  cargo build "${profile_flag[@]}" --locked --quiet --example bench --example hello --example writer
fi

# The SSE scenario holds thousands of sockets on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

exec "$bin_dir/examples/bench" "$mode" \
  --warpbase "$bin_dir/warpbase" \
  --hello "$bin_dir/examples/hello" \
  --writer "$bin_dir/examples/writer" \
  --out "$out" "${args[@]}"
