#!/usr/bin/env bash
# Builds the C example policy into target/examples/c.wasm (relative to the
# repository root). Idempotent; installs clang, lld and wasi-libc with apt
# when missing (as root); fails loudly.
#
#   1. tool/ (a small Rust crate: wit-bindgen-c + wit-component) generates the
#      C bindings of wit/policy.wit into target/examples/c/ -- always from the
#      WIT in the tree, so they cannot drift from it;
#   2. clang compiles bindings + policy to a wasm32-wasi reactor module;
#   3. the tool turns it into a component, refusing any import but `log`.
#
#   bash examples/policies/c/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$root/target/examples/c.wasm}"
work="$root/target/examples/c"
die() { echo "[c] ERROR: $*" >&2; exit 1; }
log() { echo "[c] $*" >&2; }

have_toolchain() {
    command -v clang >/dev/null && command -v wasm-ld >/dev/null \
        && [ -e /usr/lib/wasm32-wasi/libc.a ] \
        && ls /usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1
}
if ! have_toolchain; then
    [ "$(id -u)" = 0 ] || die "clang/lld/wasi-libc missing; as root: apt-get install clang lld wasi-libc libclang-rt-dev-wasm32"
    log "installing clang lld wasi-libc libclang-rt-dev-wasm32 (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends clang lld wasi-libc libclang-rt-dev-wasm32 >/dev/null \
        || die "apt-get install clang lld wasi-libc libclang-rt-dev-wasm32 failed"
    have_toolchain || die "toolchain installed but clang/wasm-ld/wasi-libc still not found"
fi
command -v cargo >/dev/null || die "cargo not found (the bindings tool is a Rust crate)"

tool_dir="$root/target/examples/c-tool"
log "building the bindings tool (cargo, first time ~1-2 min)"
(cd "$here/tool" && CARGO_TARGET_DIR="$tool_dir" cargo build --release --locked -q) || die "building tool/ failed"
tool="$tool_dir/release/vmb-c-tool"

mkdir -p "$work" "$(dirname "$out")"
"$tool" bindings "$root/wit" "$work" || die "generating C bindings failed"
# -mexec-model=reactor: a library (no main); -Oz: small; -nostartfiles is not
# used, the reactor's _initialize runs constructors.
clang --target=wasm32-wasi -mexec-model=reactor -Oz -std=c11 -Wall -Wextra -Werror \
    -Wno-unused-parameter -I "$work" -I "$here" \
    "$work/policy.c" "$work/policy_component_type.o" "$here/mpack.c" "$here/hottest.c" \
    -Wl,--strip-debug -o "$work/core.wasm" || die "clang failed"
"$tool" component "$root/wit" "$work/core.wasm" "$out.tmp" || die "making the component failed"
mv "$out.tmp" "$out"
log "built $out ($(stat -c %s "$out") bytes)"
