#!/usr/bin/env bash
# Build (once) a Debian 12 amd64 VM image for tests/vm/test_vm.sh, cached in build/vm/:
#   base.img (raw ext4, root fs), vmlinuz, initrd.img, id_ed25519 (root's ssh key).
# Delete build/vm/base.img to rebuild. Needs root (debootstrap, chroot).
set -euo pipefail
cd "$(dirname "$0")/../.."
VM=build/vm
MIRROR=${EDGED_VM_MIRROR:-http://deb.debian.org/debian}
SIZE=${EDGED_VM_SIZE:-6G}
mkdir -p "$VM"
if [[ -f $VM/base.img && -f $VM/vmlinuz && -f $VM/initrd.img && -f $VM/id_ed25519 ]]; then
  echo "vm image: cached ($VM/base.img)"; exit 0
fi
need=""
command -v debootstrap >/dev/null || need="$need debootstrap"
command -v qemu-system-x86_64 >/dev/null || need="$need qemu-system-x86"
command -v qemu-img >/dev/null || need="$need qemu-utils"
command -v mkfs.ext4 >/dev/null || need="$need e2fsprogs"
command -v ssh >/dev/null || need="$need openssh-client"
if [[ -n $need ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need
fi
t0=$(date +%s)
ROOT=$VM/rootfs
rm -rf "$ROOT" "$VM/base.img"
debootstrap --variant=minbase --arch=amd64 \
  --include=systemd,systemd-sysv,udev,dbus,linux-image-amd64,openssh-server,python3,python3-venv,curl,iproute2,ca-certificates,procps \
  bookworm "$ROOT" "$MIRROR"
echo edged-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 edged-vm\n' > "$ROOT/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$ROOT/etc/fstab"
mkdir -p "$ROOT/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' > "$ROOT/etc/systemd/network/50-dhcp.network"
chroot "$ROOT" systemctl enable systemd-networkd ssh >/dev/null 2>&1 || chroot "$ROOT" systemctl enable systemd-networkd ssh
chroot "$ROOT" passwd -d root >/dev/null
rm -f "$VM/id_ed25519" "$VM/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -f "$VM/id_ed25519"
install -d -m 0700 "$ROOT/root/.ssh"
install -m 0600 "$VM/id_ed25519.pub" "$ROOT/root/.ssh/authorized_keys"
# fast boot: no waiting for network-online beyond networkd's own, no apt timers
chroot "$ROOT" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
cp -L "$ROOT/vmlinuz" "$VM/vmlinuz"
cp -L "$ROOT/initrd.img" "$VM/initrd.img"
chmod 0644 "$VM/vmlinuz" "$VM/initrd.img"
rm -rf "$ROOT/var/cache/apt/archives/"*.deb
truncate -s "$SIZE" "$VM/base.img.tmp"
mkfs.ext4 -q -F -L root -d "$ROOT" "$VM/base.img.tmp"
mv "$VM/base.img.tmp" "$VM/base.img"
rm -rf "$ROOT"
echo "vm image: built in $(( $(date +%s) - t0 ))s"
