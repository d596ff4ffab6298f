#!/usr/bin/env bash
# Installs everything building and testing vm-balancer needs on a fresh
# Debian 12 machine, as root. Idempotent.
#
#   bash .ci/setup.sh            build prerequisites (enough for `simulate`)
#   bash .ci/setup.sh --libvirt  also libvirtd + QEMU and the test guest
#
# Why each piece:
# - libvirt-dev + pkg-config: the `virt` crate links libvirt even when only
#   the simulator is used (one binary, both backends).
# - tmux: the `top` test runs the live view as a person would and reads
#   the screen with capture-pane.
# - prometheus (Debian's; it ships promtool): the metrics test has a real
#   Prometheus scrape the daemon and answer OpenStack Watcher's PromQL,
#   and `promtool check rules` checks examples/prometheus/alerts.yml.
# - wasm32-unknown-unknown: host/build.rs compiles the embedded policies to
#   WebAssembly; wasm32-wasip2 is for policy authors who want WASI.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }

missing=()
for pkg in pkg-config libvirt-dev gcc tmux prometheus; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    for dir in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
        [ -x "$dir/cargo" ] && export PATH="$dir:$PATH"
    done
fi
command -v rustup >/dev/null 2>&1 || { echo "[setup] ERROR: rustup not found; install Rust with rustup first" >&2; exit 1; }
# rustfmt and clippy: CI's guardrails (.ci/run). Part of rustup's default
# profile; added here when a minimal toolchain lacks them.
components=$(rustup component list --installed)
for component in rustfmt clippy; do
    grep -q "^$component-" <<<"$components" || { log "adding Rust component $component"; rustup component add "$component"; }
done
installed=$(rustup target list --installed)
for target in wasm32-unknown-unknown wasm32-wasip2; do
    grep -qx "$target" <<<"$installed" || { log "adding Rust target $target"; rustup target add "$target"; }
done

if [ "${1:-}" = "--libvirt" ]; then
    bash .ci/setup-libvirt.sh
    bash tests/guest/build.sh
fi
log "ok"
