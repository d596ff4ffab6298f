#!/usr/bin/env bash
# Builds the JavaScript example policy into target/examples/javascript.wasm
# (relative to the repository root), for the `policy-json` world, with the
# SDK policies/sdk-js (npm package `vmb-policy`, linked by package.json).
# Idempotent; installs its toolchain from npm (exact versions from
# package-lock.json) when missing; fails loudly.
#
#   bash examples/policies/javascript/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
sdk="$root/policies/sdk-js"
out="${1:-$root/target/examples/javascript.wasm}"
die() { echo "[javascript] ERROR: $*" >&2; exit 1; }
log() { echo "[javascript] $*" >&2; }

command -v node >/dev/null && command -v npm >/dev/null || die "node and npm not found (apt-get install nodejs npm; node >= 18)"
[ -f "$sdk/vmb-policy.js" ] || die "the SDK $sdk/vmb-policy.js is missing"
cd "$here"
if [ ! -x node_modules/.bin/componentize-js ] || [ ! -x node_modules/.bin/esbuild ] || [ ! -e node_modules/vmb-policy/vmb-policy.js ] \
    || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    log "installing the toolchain from npm (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error || die "npm ci failed"
fi

log "unit tests (native node)"
(cd "$sdk" && node --test >/dev/null) || { (cd "$sdk" && node --test); die "SDK unit tests failed"; }
node --test test.js >/dev/null || { node --test test.js; die "unit tests failed"; }

mkdir -p "$(dirname "$out")" "$root/target/examples/javascript"
bundle="$root/target/examples/javascript/bundle.js"
# One ES module (the SDK bundled in); `log` is the component's import, left for componentize-js.
node_modules/.bin/esbuild app.js --bundle --format=esm --platform=neutral --main-fields=module,main --external:log \
    --log-level=warning --outfile="$bundle" || die "esbuild failed"
# --world-name policy-json: the snapshot arrives as JSON text, parsed by JSON.parse.
# -d ...: disable every WASI feature, so the component imports only `log`.
node_modules/.bin/componentize-js --wit "$root/wit" --world-name policy-json \
    -d stdio random clocks http fetch-event -o "$out.tmp" "$bundle" || die "componentize-js failed"
mv "$out.tmp" "$out"
log "built $out ($(stat -c %s "$out") bytes)"
