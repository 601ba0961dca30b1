#!/usr/bin/env bash
# Checks systemd/warpbase.service: `systemd-analyze verify` must accept it without a single
# warning, and `systemd-analyze security` must rate its exposure at most MAX_EXPOSURE.
# Needs only the `systemd` package, not a running systemd (works in containers): installs
# it with apt-get when missing and run as root; otherwise skips (exit 0) with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

UNIT=systemd/warpbase.service
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}

if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing systemd (for systemd-analyze)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd; } \
    >/dev/null 2>&1 || echo "could not install systemd"
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "SKIP check-systemd: systemd-analyze not found (apt-get install -y systemd to run this check)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# verify checks that ExecStart's program exists; on a build machine /usr/bin/warpbase is
# not installed, so point the copy at a program that is. Everything else stays as shipped.
cp "$UNIT" "$work/warpbase.service"
if [ ! -x /usr/bin/warpbase ]; then
  sed -i 's#^ExecStart=/usr/bin/warpbase #ExecStart=/bin/true #' "$work/warpbase.service"
fi

out=$(systemd-analyze verify "$work/warpbase.service" 2>&1) || {
  echo "$out"
  echo "FAIL check-systemd: systemd-analyze verify rejected $UNIT"
  exit 1
}
# Unknown keys and bad values are only warnings to verify; treat any output as a failure.
if [ -n "$out" ]; then
  echo "$out"
  echo "FAIL check-systemd: systemd-analyze verify warned about $UNIT"
  exit 1
fi

if ! sec=$(systemd-analyze security --offline=true "$work/warpbase.service" 2>&1); then
  echo "SKIP exposure rating: this systemd-analyze has no --offline security analysis"
  echo "ok check-systemd: $UNIT verified"
  exit 0
fi
level=$(printf '%s\n' "$sec" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$level" ]; then
  echo "$sec" | tail -5
  echo "FAIL check-systemd: cannot read the exposure level"
  exit 1
fi
if awk -v l="$level" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(l > m) }'; then
  printf '%s\n' "$sec" | grep -v '^✓' || true
  echo "FAIL check-systemd: exposure $level is above $MAX_EXPOSURE"
  exit 1
fi
echo "ok check-systemd: $UNIT verified, exposure level $level (max $MAX_EXPOSURE)"
