#!/usr/bin/env bash
# Builds the warpbase .deb with cargo-deb, then checks what is inside it: the binary (and
# that it runs), the systemd unit, the default config as a conffile, the maintainer
# scripts. Fails if anything is missing.
#
#   packaging/build-deb.sh           release build: the package to ship
#                                    (target/debian/warpbase_<version>_<arch>.deb)
#   packaging/build-deb.sh --smoke   packages the debug binary `cargo test` already built,
#                                    so CI checks the packaging in seconds instead of
#                                    paying for a release build
#
# Installs cargo-deb (`cargo install cargo-deb --locked`, a few minutes once) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

for tool in dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "FAIL build-deb: $tool not found (apt-get install -y dpkg)"; exit 1; }
done
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  # Pinned: the smoke run relies on --no-build and --fast behaving as in this version.
  cargo install cargo-deb --locked --version 3.8.0
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
target_dir=${CARGO_TARGET_DIR:-target}
out="$target_dir/debian"
rm -f "$out"/warpbase_*.deb
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if $smoke; then
  # The dev profile's binary, as `cargo test` left it (built here if it did not), staged
  # where cargo-deb looks for a release binary, in a scratch target dir so a real
  # release binary is never overwritten.
  cargo build --locked --bin warpbase
  mkdir -p "$work/target/release"
  cp "$target_dir/debug/warpbase" "$work/target/release/warpbase"
  CARGO_TARGET_DIR="$work/target" cargo deb --locked --no-build --fast --output "$out/"
else
  cargo deb --locked --output "$out/"
fi
deb=$(ls "$out"/warpbase_"$version"[-_]*.deb)
echo "== built $deb ($(du -h "$deb" | cut -f1))"

fail() { echo "FAIL build-deb: $*"; exit 1; }
contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
has_file() { printf '%s\n' "$contents" | awk '{print $NF}' | grep -qx "$1"; }

has_file ./usr/bin/warpbase || fail "no /usr/bin/warpbase in the package"
has_file ./etc/warpbase/warpbase.toml || fail "no /etc/warpbase/warpbase.toml in the package"
has_file ./lib/systemd/system/warpbase.service || has_file ./usr/lib/systemd/system/warpbase.service \
  || fail "no warpbase.service unit in the package"
has_file ./usr/share/doc/warpbase/deploy.md || fail "no deploy.md in the package"

dpkg-deb -e "$deb" "$work/DEBIAN"
dpkg-deb -x "$deb" "$work/root"
grep -qx /etc/warpbase/warpbase.toml "$work/DEBIAN/conffiles" \
  || fail "/etc/warpbase/warpbase.toml is not a conffile"
grep -q 'adduser --system' "$work/DEBIAN/postinst" || fail "postinst does not create the warpbase user"
if grep -q '^#DEBHELPER#' "$work/DEBIAN/postinst"; then
  fail "postinst still has an unexpanded #DEBHELPER# token"
fi
# cargo-deb's enable=true / start=true snippets (debhelper's). With enable=false it only
# re-enables a unit the admin had enabled before an upgrade, and try-restarts a running one.
if grep -Eq 'new installations run enable|deb-systemd-invoke (start|\$_dh_action)|^[[:space:]]*systemctl (--[a-z-]+ )*(enable|start) ' \
  "$work/DEBIAN/postinst"; then
  fail "postinst enables or starts the service on install; it must not"
fi
[ -x "$work/DEBIAN/postrm" ] || fail "no postrm"
printf '%s\n' "$info" | grep -q '^ Depends:.*adduser' || fail "Depends lacks adduser"
unit=
for u in "$work"/root/{lib,usr/lib}/systemd/system/warpbase.service; do
  [ -f "$u" ] && unit=$u
done
cmp -s "$unit" systemd/warpbase.service || fail "the packaged unit differs from systemd/warpbase.service"
cmp -s "$work/root/etc/warpbase/warpbase.toml" packaging/warpbase.toml \
  || fail "the packaged config differs from packaging/warpbase.toml"
got=$("$work/root/usr/bin/warpbase" version)
[ "$got" = "warpbase $version" ] || fail "packaged binary says '$got', expected 'warpbase $version'"
# The packaged default config must be valid as shipped.
"$work/root/usr/bin/warpbase" --config "$work/root/etc/warpbase/warpbase.toml" \
  --data-dir "$work/data" config check >/dev/null || fail "the packaged config does not pass config check"

printf '%s\n' "$info" | sed -n '/^ Package:/,$p'
echo "ok build-deb: $deb has the binary, the unit, the conffile and the maintainer scripts"
