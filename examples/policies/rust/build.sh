#!/usr/bin/env bash
# Builds the Rust example policy into target/examples/rust.wasm (relative to
# the repository root): native unit test, then a wasm32-wasip2 build, whose
# output is already a component. Idempotent; fails loudly.
#
#   bash examples/policies/rust/build.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
out="${1:-$root/target/examples/rust.wasm}"
die() { echo "[rust] ERROR: $*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2 || die "rustup target add wasm32-wasip2 failed"
export CARGO_TARGET_DIR="$root/target/examples/rust-target"
cd "$here"
cargo test --release -q || die "unit test failed"
cargo build --release --target wasm32-wasip2 -q || die "cargo build failed"
mkdir -p "$(dirname "$out")"
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/vmb_policy_spread.wasm" "$out"
echo "[rust] built $out ($(stat -c %s "$out") bytes)" >&2
