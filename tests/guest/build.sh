#!/usr/bin/env bash
# build.sh [OUTDIR] — build the tiny test guest for the real-libvirt tests:
#   OUTDIR/vmlinuz            Debian 12 cloud kernel (linux-image-cloud-amd64)
#   OUTDIR/initramfs.cpio.gz  busybox-static + virtio balloon modules + ./init
#   OUTDIR/kernel-package     "<package> <version>" of the kernel used
# OUTDIR defaults to <repo>/target/guest.
#
# The two images are then copied (when we are root, or the dir is writable)
# to VMB_GUEST_DIR (default /var/lib/vm-balancer/guest, world-readable):
# qemu runs as user libvirt-qemu and must be able to open -kernel/-initrd,
# which it cannot do inside a checkout under a 0700 directory.  Use the
# images from VMB_GUEST_DIR in domain XML.  VMB_GUEST_INSTALL=0 skips that.
#
# Domain XML known to work (libvirt 9.0, qemu 7.2, TCG; ~2.5-3 s to "vmb: ready"):
#   <domain type='qemu'><name>vmbtest-x</name>
#     <memory unit='MiB'>384</memory><currentMemory unit='MiB'>256</currentMemory>
#     <vcpu>1</vcpu>
#     <os><type arch='x86_64' machine='pc'>hvm</type>
#       <kernel>/var/lib/vm-balancer/guest/vmlinuz</kernel>
#       <initrd>/var/lib/vm-balancer/guest/initramfs.cpio.gz</initrd>
#       <cmdline>console=ttyS0 quiet vmb.burn=1</cmdline></os>
#     <features><acpi/><apic/></features>
#     <devices>
#       <memballoon model='virtio' autodeflate='on'><stats period='1'/></memballoon>
#       <serial type='file'><source path='/var/log/libvirt/qemu/vmbtest-x-console.log'/></serial>
#     </devices></domain>
# <features><acpi/> is REQUIRED for <vcpu> > 1: the cloud kernel has no
# CONFIG_X86_MPPARSE, so without ACPI the guest only brings up vCPU 0.
# ./init documents the vmb.* command-line parameters and console markers.
#
# Idempotent: if both outputs exist and are newer than this script and
# ./init, nothing is rebuilt.  The kernel .deb is cached in OUTDIR/cache.
# Needs: apt (Debian 12), dpkg, busybox-static, cpio, gzip (+ xz/zstd only if
# the kernel ships compressed modules).  No root needed for the build itself
# except for apt-get update when the package lists are empty.
set -euo pipefail

log() { printf '[guest-build] %s\n' "$*"; }
die() { printf '[guest-build] ERROR: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
INIT_SRC="$SCRIPT_DIR/init"
REPO="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/../.." && pwd))"
OUTDIR="${1:-$REPO/target/guest}"
GUEST_DIR="${VMB_GUEST_DIR:-/var/lib/vm-balancer/guest}"
META_PKG=linux-image-cloud-amd64
# The balloon driver and what it needs on the PCI bus; dependencies are
# resolved from each module's depends= field, so order here does not matter.
WANT_MODULES=(virtio_pci virtio_balloon)

[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
VMLINUZ="$OUTDIR/vmlinuz"
INITRD="$OUTDIR/initramfs.cpio.gz"

# Copy the images to the world-readable dir libvirt's qemu user can read.
install_images() {
  [ "${VMB_GUEST_INSTALL:-1}" != 0 ] || return 0
  if ! mkdir -p "$GUEST_DIR" 2>/dev/null || [ ! -w "$GUEST_DIR" ]; then
    log "note: cannot write $GUEST_DIR (not root?); images stay in $OUTDIR only"
    return 0
  fi
  local f changed=0
  for f in vmlinuz initramfs.cpio.gz kernel-package; do
    if ! cmp -s "$OUTDIR/$f" "$GUEST_DIR/$f"; then
      # Copy then rename: a guest that is starting never sees a half file.
      install -m 0644 "$OUTDIR/$f" "$GUEST_DIR/$f.tmp"
      mv -f "$GUEST_DIR/$f.tmp" "$GUEST_DIR/$f"
      changed=1
    fi
  done
  chmod 0755 "$GUEST_DIR"
  # Every path component must be traversable by libvirt-qemu ("other").
  local d="$GUEST_DIR"
  while [ "$d" != / ] && [ -n "$d" ]; do
    case "$(stat -c %A "$d")" in
      *x) ;;
      *) log "WARNING: $d is not world-traversable; qemu (libvirt-qemu) cannot read the images" ;;
    esac
    d="$(dirname "$d")"
  done
  if [ "$changed" = 1 ]; then log "installed images in $GUEST_DIR"; else log "images in $GUEST_DIR are current"; fi
}

up_to_date() {
  local f
  for f in "$VMLINUZ" "$INITRD" "$OUTDIR/kernel-package"; do
    [ -s "$f" ] || return 1
  done
  [ "$INITRD" -nt "$SELF" ] && [ "$INITRD" -nt "$INIT_SRC" ] && [ "$VMLINUZ" -nt "$SELF" ]
}

if up_to_date; then
  log "up to date: $VMLINUZ $INITRD ($(cat "$OUTDIR/kernel-package"))"
  install_images
  exit 0
fi

# The guest has no libc, so busybox must be the static build.  Debian's
# busybox and busybox-static conflict, so "busybox-static is installed"
# means /bin/busybox is static.
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]; then
  die "busybox-static is not installed (apt-get install busybox-static)"
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing"
command -v cpio >/dev/null || die "cpio not found"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------
# 1. kernel: the versioned image package that the cloud meta-package pins
# ---------------------------------------------------------------------------
kernel_pkg() {
  apt-cache depends "$META_PKG" 2>/dev/null \
    | awk '/^ *\|?Depends: linux-image-/ {print $2; exit}'
}
PKG="$(kernel_pkg)"
if [ -z "$PKG" ]; then
  [ "$(id -u)" -eq 0 ] || die "apt does not know $META_PKG; run apt-get update as root"
  log "apt-get update (apt does not know $META_PKG yet)"
  apt-get -o DPkg::Lock::Timeout=900 update -q >&2
  PKG="$(kernel_pkg)"
  [ -n "$PKG" ] || die "cannot resolve the kernel package $META_PKG depends on"
fi
VERSION="$(apt-cache policy "$PKG" | awk '/Candidate:/ {print $2}')"
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "no candidate version for $PKG"
log "kernel package: $PKG $VERSION (via $META_PKG)"

CACHE="$OUTDIR/cache"
mkdir -p "$CACHE"
DEB="$(ls "$CACHE/${PKG}_"*"_amd64.deb" 2>/dev/null | grep -F "_${VERSION//:/%3a}_" | head -n1 || true)"
if [ -z "$DEB" ]; then
  log "apt-get download $PKG=$VERSION"
  # APT::Sandbox::User=root: the _apt user cannot write into a root-owned
  # cache dir, apt would warn and fall back anyway.
  (cd "$CACHE" && apt-get -q -o APT::Sandbox::User=root download "$PKG=$VERSION" >&2) \
    || die "apt-get download $PKG failed"
  DEB="$(ls "$CACHE/${PKG}_"*"_amd64.deb" | grep -F "_${VERSION//:/%3a}_" | head -n1)"
  # Drop older cached kernels.
  find "$CACHE" -name "${PKG%%-[0-9]*}*.deb" ! -path "$DEB" -delete 2>/dev/null || true
fi
log "extracting $(basename "$DEB")"
dpkg -x "$DEB" "$WORK/kpkg"

KSRC="$(ls "$WORK"/kpkg/boot/vmlinuz-* | head -n1)"
[ -f "$KSRC" ] || die "no /boot/vmlinuz-* in $DEB"
KVER="${KSRC##*/vmlinuz-}"
MODDIR="$WORK/kpkg/lib/modules/$KVER"
[ -d "$MODDIR" ] || die "no /lib/modules/$KVER in $DEB"

# ---------------------------------------------------------------------------
# 2. modules: resolve depends= recursively, emit in load order
# ---------------------------------------------------------------------------
# Index module name -> file.  File names may use '-' where the module name
# has '_', and may be compressed (.ko.xz/.ko.zst/.ko.gz).
declare -A MODFILE=()
while IFS= read -r -d '' f; do
  b="${f##*/}"; b="${b%%.ko*}"; b="${b//-/_}"
  MODFILE[$b]="$f"
done < <(find "$MODDIR" -name '*.ko*' -print0)

# Decompress to WORK/mods/NAME.ko: busybox insmod cannot be trusted with
# compressed modules and the kernel may lack in-kernel decompression.
mkdir -p "$WORK/mods"
decompress_module() {
  local name="$1" src="${MODFILE[$1]}" dst="$WORK/mods/$1.ko"
  [ -f "$dst" ] && return 0
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
}

# depends= lives in the .modinfo section as NUL-separated key=value strings;
# reading it this way needs neither kmod's modinfo nor binutils.
module_depends() {
  tr '\0' '\n' <"$WORK/mods/$1.ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '
}

declare -A VISITING=() DONE=()
ORDER=()
resolve() {   # depth-first post-order = dependencies first
  local m="$1" d
  [ -n "${DONE[$m]:-}" ] && return 0
  [ -z "${VISITING[$m]:-}" ] || die "module dependency cycle at $m"
  [ -n "${MODFILE[$m]:-}" ] || die "module $m not found in $KVER (built in?)"
  VISITING[$m]=1
  decompress_module "$m"
  for d in $(module_depends "$m"); do resolve "$d"; done
  DONE[$m]=1
  ORDER+=("$m")
}
for m in "${WANT_MODULES[@]}"; do resolve "$m"; done
log "modules (load order): ${ORDER[*]}"

# ---------------------------------------------------------------------------
# 3. initramfs
# ---------------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,fill,tmp,etc,lib/modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
# Applet symlinks at build time (busybox --list-full gives e.g. sbin/insmod),
# so /init can use plain command names from its first line.
while IFS= read -r applet; do
  [ "$applet" = bin/busybox ] && continue
  ln -sf /bin/busybox "$ROOT/$applet"   # absolute: resolved inside the guest
done < <("$BUSYBOX" --list-full)
install -m 0755 "$INIT_SRC" "$ROOT/init"
for m in "${ORDER[@]}"; do
  install -m 0644 "$WORK/mods/$m.ko" "$ROOT/lib/modules/$m.ko"
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/etc/vmb-modules"
printf '%s %s %s\n' "$PKG" "$VERSION" "$KVER" >"$ROOT/etc/vmb-kernel"

CPIO_OPTS=(-o -H newc --quiet -R 0:0)
cpio --help 2>&1 | grep -q -- --reproducible && CPIO_OPTS+=(--reproducible)
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio "${CPIO_OPTS[@]}") \
  | gzip -9 -n >"$OUTDIR/initramfs.cpio.gz.tmp"
install -m 0644 "$KSRC" "$OUTDIR/vmlinuz.tmp"
mv -f "$OUTDIR/vmlinuz.tmp" "$VMLINUZ"
printf '%s %s\n' "$PKG" "$VERSION" >"$OUTDIR/kernel-package"
chmod 0644 "$OUTDIR/initramfs.cpio.gz.tmp"
mv -f "$OUTDIR/initramfs.cpio.gz.tmp" "$INITRD"   # last: newest file marks the build complete
log "built $VMLINUZ ($(du -h "$VMLINUZ" | cut -f1)), $INITRD ($(du -h "$INITRD" | cut -f1))"
install_images
