#!/usr/bin/env bash
# Builds the Python example policy into target/examples/python.wasm
# (relative to the repository root), for the `policy-json` world, with the
# one-file SDK policies/sdk-python/vmb_policy.py. Idempotent; installs its
# toolchain from PyPI when missing; fails loudly on any error.
#
#   bash examples/policies/python/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
sdk="$root/policies/sdk-python"
out="${1:-$root/target/examples/python.wasm}"
die() { echo "[python] ERROR: $*" >&2; exit 1; }
log() { echo "[python] $*" >&2; }
version=0.25.1

command -v python3 >/dev/null || die "python3 not found (apt-get install python3 python3-pip)"
[ -f "$sdk/vmb_policy.py" ] || die "the SDK $sdk/vmb_policy.py is missing"
if ! command -v componentize-py >/dev/null || [ "$(componentize-py --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
    log "installing componentize-py $version from PyPI"
    # --break-system-packages: Debian's own python3 refuses plain pip installs.
    python3 -m pip install --quiet "componentize-py==$version" \
        || python3 -m pip install --quiet --break-system-packages "componentize-py==$version" \
        || die "pip install componentize-py==$version failed"
    hash -r
fi
command -v componentize-py >/dev/null || die "componentize-py is installed but not on PATH (add pip's script dir)"

log "unit tests (native python3)"
(cd "$sdk" && python3 -B -m unittest -q test_vmb_policy) || die "SDK unit tests failed"
(cd "$here" && PYTHONPATH="$sdk" python3 -B -m unittest -q test_keepfree) || die "unit tests failed"

mkdir -p "$(dirname "$out")"
# -w policy-json: the snapshot arrives as JSON text, parsed by CPython's _json.
# --stub-wasi: no WASI imports at all (the policy never does I/O).
(cd "$here" && componentize-py -d "$root/wit" -w policy-json componentize app -p . -p "$sdk" --stub-wasi -o "$out.tmp") \
    || die "componentize-py failed"
mv "$out.tmp" "$out"
log "built $out ($(stat -c %s "$out") bytes)"
