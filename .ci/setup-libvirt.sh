#!/usr/bin/env bash
# setup-libvirt.sh — bring up a working qemu:///system libvirt daemon for the
# vm-balancer real-libvirt tests.
#
# Written for a FRESH Debian 12 machine without systemd (containers / CI VMs
# where PID 1 is not systemd), run as root.  Idempotent: every step checks
# before it acts, so running it many times (every CI run, every dev session)
# is cheap and safe.
#
# What it does:
#   1. installs the libvirt/qemu packages (apt-get update only when needed);
#   2. creates the users, groups and directories that the Debian maintainer
#      scripts of libvirt-daemon-system would have created (we deliberately do
#      not install that package: its postinst wants systemd, polkit, dnsmasq,
#      a default NAT network...);
#   3. starts virtlogd and libvirtd as plain daemons (-d) if not running;
#   4. waits (bounded) until `virsh -c qemu:///system version` answers.
#
# Environment knobs:
#   VMB_LIBVIRT_WAIT_S   seconds to wait for libvirtd to answer (default 60)
#   VMB_GUEST_DIR        world-readable dir for guest images
#                        (default /var/lib/vm-balancer/guest; see below)
set -euo pipefail

log() { printf '[setup-libvirt] %s\n' "$*"; }
die() { printf '[setup-libvirt] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

WAIT_S="${VMB_LIBVIRT_WAIT_S:-60}"
GUEST_DIR="${VMB_GUEST_DIR:-/var/lib/vm-balancer/guest}"
LOG_DIR=/var/log/libvirt
LIBVIRTD_LOG="$LOG_DIR/libvirtd.log"
VIRTLOGD_LOG="$LOG_DIR/virtlogd.log"
URI=qemu:///system

PACKAGES=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 busybox-static cpio pkg-config
)

# ---------------------------------------------------------------------------
# 1. packages
# ---------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
# Another apt/dpkg may be running (e.g. a background install); wait for its
# lock instead of failing.
APT_OPTS=(-y --no-install-recommends -o DPkg::Lock::Timeout=900)

missing=()
for p in "${PACKAGES[@]}"; do
  # dpkg-query prints "install ok installed" only for fully installed packages.
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  log "packages already installed"
else
  log "missing packages: ${missing[*]}"
  # Only refresh the package lists when apt does not know a candidate for
  # every missing package (fresh machines ship with empty lists).
  need_update=0
  for p in "${missing[@]}"; do
    cand="$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; break; fi
  done
  if [ "$need_update" -eq 1 ]; then
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=900 update -q || die "apt-get update failed"
  fi
  log "apt-get install ${missing[*]}"
  if ! apt-get install "${APT_OPTS[@]}" -q "${missing[@]}"; then
    # The lists may be stale (404 on an old version): refresh once and retry.
    log "install failed; refreshing package lists and retrying once"
    apt-get -o DPkg::Lock::Timeout=900 update -q || die "apt-get update failed"
    apt-get install "${APT_OPTS[@]}" -q "${missing[@]}" || die "apt-get install failed"
  fi
fi

for b in virsh libvirtd virtlogd qemu-system-x86_64; do
  command -v "$b" >/dev/null || die "$b not found after install"
done

# ---------------------------------------------------------------------------
# 2. users, groups, directories
# ---------------------------------------------------------------------------
# Debian builds libvirt with qemu_user=libvirt-qemu, qemu_group=libvirt-qemu:
# without these accounts every domain start fails with
# "Failed to parse user 'libvirt-qemu'".  libvirt-daemon-system normally
# creates them; we do it by hand.
getent group kvm >/dev/null || { log "creating group kvm"; groupadd --system kvm; }
getent group libvirt-qemu >/dev/null || { log "creating group libvirt-qemu"; groupadd --system libvirt-qemu; }
if ! getent passwd libvirt-qemu >/dev/null; then
  log "creating user libvirt-qemu"
  useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt \
    --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi
# Let the daemon hand /dev/kvm to qemu if the host ever has it (harmless
# otherwise: the tests use <domain type='qemu'> i.e. TCG, no KVM needed).
if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm 2>/dev/null || true; chmod 660 /dev/kvm 2>/dev/null || true; fi

# State/log/cache dirs libvirtd expects (normally shipped by
# libvirt-daemon-system).  /var/run is a symlink to /run on Debian 12; we
# create both spellings' target.
install -d -m 0755 /var/run/libvirt /var/run/libvirt/qemu \
  /var/lib/libvirt /var/lib/libvirt/qemu /var/lib/libvirt/images \
  /var/cache/libvirt /var/cache/libvirt/qemu /etc/libvirt /etc/libvirt/qemu
install -d -m 0700 "$LOG_DIR" "$LOG_DIR/qemu"

# Guest images (kernel + initramfs, built by tests/guest/build.sh) live in a
# fixed world-traversable location.  Why: qemu runs as libvirt-qemu, and the
# repo may be cloned anywhere (e.g. under a 0700 temp dir), where qemu could
# not open -kernel/-initrd ("Permission denied").  Copying the images to
# /var/lib/vm-balancer/guest (every component 0755, files 0644) works
# whatever the checkout's permissions, without running qemu as root.
install -d -m 0755 /var/lib/vm-balancer "$GUEST_DIR"

# ---------------------------------------------------------------------------
# 3. daemons
# ---------------------------------------------------------------------------
# No systemd here, so start the daemons directly.  pgrep -x matches the
# process name exactly (never a broad pattern).
if pgrep -x virtlogd >/dev/null; then
  log "virtlogd already running (pid $(pgrep -x virtlogd | xargs))"
else
  log "starting virtlogd"
  # virtlogd writes the qemu console logs /var/log/libvirt/qemu/NAME.log.
  LIBVIRT_LOG_OUTPUTS="3:file:$VIRTLOGD_LOG" virtlogd -d || die "virtlogd failed to start (see $VIRTLOGD_LOG)"
fi

if pgrep -x libvirtd >/dev/null; then
  log "libvirtd already running (pid $(pgrep -x libvirtd | xargs))"
else
  log "starting libvirtd (log: $LIBVIRTD_LOG)"
  # Without systemd/journald, libvirtd's own messages would be lost: send
  # warnings and errors to a file so failures can be diagnosed.
  LIBVIRT_LOG_OUTPUTS="3:file:$LIBVIRTD_LOG" libvirtd -d || {
    tail -n 50 "$LIBVIRTD_LOG" 2>/dev/null >&2 || true
    die "libvirtd failed to start"
  }
fi

# ---------------------------------------------------------------------------
# 4. wait for the API
# ---------------------------------------------------------------------------
log "waiting up to ${WAIT_S}s for $URI"
deadline=$(( $(date +%s) + WAIT_S ))
until virsh -c "$URI" version >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "----- virsh -c $URI version -----" >&2
    virsh -c "$URI" version >&2 || true
    echo "----- tail $LIBVIRTD_LOG -----" >&2
    tail -n 50 "$LIBVIRTD_LOG" >&2 2>/dev/null || true
    echo "----- tail $VIRTLOGD_LOG -----" >&2
    tail -n 20 "$VIRTLOGD_LOG" >&2 2>/dev/null || true
    die "libvirtd did not answer on $URI within ${WAIT_S}s"
  fi
  if ! pgrep -x libvirtd >/dev/null; then
    tail -n 50 "$LIBVIRTD_LOG" >&2 2>/dev/null || true
    die "libvirtd exited during startup"
  fi
  sleep 0.5
done

virsh -c "$URI" version | sed 's/^/[setup-libvirt]   /'
log "libvirt is ready on $URI"
