#!/usr/bin/env bash
# Build a Debian trixie cloud-like qcow2 image offline (only the Debian mirror is needed).
#
#   lab/build_image.sh            # prints the image path (builds it first if missing)
#
# The image is cached at
#   ${KUBELAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelab}/images/debian-trixie-<hash>.qcow2
# where <hash> is a hash of this script: editing the recipe builds a new image, re-running
# with the image present does nothing but print its path.
#
# Contents: mmdebstrap minbase + kernel, grub (BIOS), systemd, cloud-init (NoCloud only),
# openssh-server, networkd/resolved and the few tools kubeadm-style installs expect
# (conntrack, socat, iptables), and haproxy for the node-local API load balancer.
# NO containerd/runc/kubernetes: kubelab uploads those.
# Host packages: tools/apt-lab.txt. Must run as root (loop devices, mounts, chroot).
set -euo pipefail

MIRROR="${KUBELAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${KUBELAB_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=trixie
DISK_SIZE=4G # virtual size; the root fs grows to the volume size on first boot
PACKAGES=(
  linux-image-amd64 grub-pc systemd-sysv dbus udev kmod openssh-server cloud-init
  cloud-guest-utils fdisk sudo systemd-resolved iproute2 ca-certificates e2fsprogs
  qemu-guest-agent conntrack socat iptables procps curl haproxy
)

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
HASH="$(sha256sum "$SCRIPT" | cut -c1-16)"
CACHE="${KUBELAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubelab}"
OUT_DIR="$CACHE/images"
OUT="$OUT_DIR/debian-$SUITE-$HASH.qcow2"

log() { printf '[build_image] %s\n' "$*" >&2; }

if [[ -f "$OUT" ]]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

if [[ $EUID -ne 0 ]]; then
  log "must run as root (loop devices, mounts, chroot)"
  exit 1
fi
for tool in mmdebstrap qemu-img parted partx losetup mkfs.ext4 blkid; do
  command -v "$tool" >/dev/null || { log "missing $tool: install tools/apt-lab.txt"; exit 1; }
done

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "$OUT_DIR/.build-XXXXXX")"
RAW="$WORK/disk.raw"
MNT="$WORK/mnt"
LOOP=""

cleanup() {
  set +e
  for m in dev/pts dev proc sys; do
    mountpoint -q "$MNT/$m" && umount -l "$MNT/$m"
  done
  mountpoint -q "$MNT" && umount "$MNT"
  [[ -n "$LOOP" ]] && losetup -d "$LOOP"
  rm -rf "$WORK"
}
trap cleanup EXIT

START=$SECONDS
log "disk: $DISK_SIZE raw, msdos label, one ext4 partition"
truncate -s "$DISK_SIZE" "$RAW"
# parted calls udevadm (absent here); that noise is harmless.
parted -s "$RAW" mklabel msdos mkpart primary ext4 1MiB 100% set 1 boot on 2>/dev/null
LOOP="$(losetup --find --show --partscan "$RAW")"
PART="${LOOP}p1"
# Without udev the partition nodes may not appear: ask the kernel explicitly.
[[ -b "$PART" ]] || partx -a "$LOOP" 2>/dev/null || true
for _ in $(seq 50); do [[ -b "$PART" ]] && break; sleep 0.1; done
[[ -b "$PART" ]] || { log "partition $PART did not appear"; exit 1; }
mkfs.ext4 -q -L rootfs "$PART"
UUID="$(blkid -s UUID -o value "$PART")"
mkdir -p "$MNT"
mount "$PART" "$MNT"

log "mmdebstrap $SUITE (minbase + ${#PACKAGES[@]} packages)"
include="$(IFS=,; echo "${PACKAGES[*]}")"
mmdebstrap --mode=root --variant=minbase --components=main \
  --include="$include" --skip=check/empty \
  --aptopt='Acquire::Retries "3"' \
  "$SUITE" "$MNT" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main"
log "mmdebstrap done after $((SECONDS - START)) s"

log "customise"
# Identity: every clone makes its own machine-id and ssh host keys.
: >"$MNT/etc/machine-id"
rm -f "$MNT/var/lib/dbus/machine-id"
rm -f "$MNT"/etc/ssh/ssh_host_*
echo debian >"$MNT/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$MNT/etc/hosts"
echo "UUID=$UUID / ext4 errors=remount-ro 0 1" >"$MNT/etc/fstab"

# cloud-init: NoCloud seed (ISO labelled cidata) only; grow root to the volume on first boot.
cat >"$MNT/etc/cloud/cloud.cfg.d/90_kubelab.cfg" <<'EOF'
datasource_list: [ NoCloud, None ]
growpart:
  mode: auto
  devices: ['/']
  ignore_growroot_disabled: false
resize_rootfs: true
EOF

# SSH: prefer ChaCha20-Poly1305. A TCG guest (CPU model qemu64) has no AES-NI, SSSE3 or
# PCLMUL, so AES-GCM runs from lookup tables there and every upload is bound by the guest's
# crypto. Go's SSH client (pulumi-command) lists AES-GCM first, so GCM is left out here; the
# CTR modes stay for old clients.
install -d "$MNT/etc/ssh/sshd_config.d"
echo "Ciphers chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr" >"$MNT/etc/ssh/sshd_config.d/10-kubelab-ciphers.conf"

# Networking: cloud-init renders networkd config; resolved provides DNS.
chroot "$MNT" systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
# haproxy is there for kubelab's node-local API load balancer (its own unit); the package's
# idle default service stays off.
chroot "$MNT" systemctl disable haproxy.service >/dev/null 2>&1
# Kubernetes prerequisites.
printf 'overlay\nbr_netfilter\n' >"$MNT/etc/modules-load.d/kubernetes.conf"
cat >"$MNT/etc/sysctl.d/90-kubernetes.conf" <<'EOF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
EOF

# Boot loader: serial console (under TCG with no video device GRUB hangs otherwise).
cat >"$MNT/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
# After an unclean stop (virsh destroy before boot completed) Debian grub would wait 30 s.
GRUB_RECORDFAIL_TIMEOUT=0
GRUB_DISTRIBUTOR="Debian"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF

for m in dev dev/pts proc sys; do mount --bind "/$m" "$MNT/$m"; done
chroot "$MNT" grub-install --target=i386-pc --modules=part_msdos "$LOOP" >&2
chroot "$MNT" update-grub >&2
# Without udev (no /dev/disk/by-uuid) grub-mkconfig writes the loop device: use the UUID.
sed -i "s|root=$PART|root=UUID=$UUID|g" "$MNT/boot/grub/grub.cfg"
if grep -q "root=/dev/loop" "$MNT/boot/grub/grub.cfg"; then
  log "grub.cfg still refers to a loop device"; exit 1
fi
grep -q "root=UUID=$UUID" "$MNT/boot/grub/grub.cfg" || { log "no root=UUID in grub.cfg"; exit 1; }
for m in dev/pts dev proc sys; do umount "$MNT/$m"; done

rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/var/cache/apt/*.bin "$MNT"/var/log/*.log "$MNT/tmp"/*
# Report space (handy when tuning DISK_SIZE).
df -h "$MNT" | tail -1 | awk '{print "[build_image] root fs: " $3 " used of " $2}' >&2
# Discard freed blocks (downloaded .debs etc.) so the qcow2 holds only live data.
fstrim "$MNT"
umount "$MNT"
e2fsck -fy "$PART" >/dev/null 2>&1 || true
losetup -d "$LOOP"
LOOP=""

log "convert to qcow2"
qemu-img convert -f raw -O qcow2 "$RAW" "$WORK/image.qcow2"
mv "$WORK/image.qcow2" "$OUT"
log "built $OUT ($(du -h "$OUT" | cut -f1)) in $((SECONDS - START)) s"
echo "$OUT"
