#!/usr/bin/env bash
# Builds the Python example policy into target/examples/python.wasm
# (relative to the repository root). Idempotent; installs its toolchain
# from PyPI when missing; fails loudly on any error.
#
#   bash examples/policies/python/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$root/target/examples/python.wasm}"
die() { echo "[python] ERROR: $*" >&2; exit 1; }
log() { echo "[python] $*" >&2; }

command -v python3 >/dev/null || die "python3 not found (apt-get install python3 python3-pip)"
if ! python3 -c 'import msgpack' 2>/dev/null || ! command -v componentize-py >/dev/null; then
    log "installing componentize-py and msgpack from PyPI"
    # --break-system-packages: Debian's own python3 refuses plain pip installs.
    python3 -m pip install --quiet componentize-py==0.25.1 msgpack==1.2.4 \
        || python3 -m pip install --quiet --break-system-packages componentize-py==0.25.1 msgpack==1.2.4 \
        || die "pip install componentize-py msgpack failed"
    hash -r
fi
command -v componentize-py >/dev/null || die "componentize-py is installed but not on PATH (add pip's script dir)"

log "unit tests (native python3)"
(cd "$here" && python3 -m unittest -q test_keepfree) || die "unit tests failed"

mkdir -p "$(dirname "$out")"
# The msgpack package's directory, so the component bundles the pure-Python fallback.
site="$(python3 -c 'import msgpack, os; print(os.path.dirname(os.path.dirname(msgpack.__file__)))')"
# --stub-wasi: no WASI imports at all (the policy never does I/O).
(cd "$here" && componentize-py -d "$root/wit" -w policy componentize app -p . -p "$site" --stub-wasi -o "$out.tmp") \
    || die "componentize-py failed"
mv "$out.tmp" "$out"
log "built $out ($(stat -c %s "$out") bytes)"
