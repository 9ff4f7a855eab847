#!/bin/bash
# Builds (or reuses) a Debian 12 root with libvirt 11.3 and QEMU 10 from
# bookworm-backports, for running the end-to-end suite against the newer
# libvirt without touching the host's packages (tests/e2e/world.sh runs a
# world inside it when VTS_WORLD_ROOTFS is set; scripts/test-libvirt-next.sh).
# As root. Prints the root's absolute path on stdout.
#   scripts/make-libvirt-next-root.sh [ROOT]   default: target/roots/bookworm-bpo
# A root is reused when its stamp matches the package list below; otherwise it
# is rebuilt from scratch (debootstrap, then apt inside it).
set -euo pipefail
cd "$(dirname "$0")/.."

root=${1:-$PWD/target/roots/bookworm-bpo}
[[ $root == /* ]] || root=$PWD/$root
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# From bookworm-backports: the newer libvirt and QEMU (the point of this root).
# Versions pinned: a new backport is a deliberate change (and a new recorded
# result in docs/LIBVIRT-NEXT.md).
LIBVIRT_VERSION=11.3.0-2~bpo12+1
QEMU_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1
bpo_packages=(
    "libvirt-daemon-system=$LIBVIRT_VERSION" "libvirt-clients=$LIBVIRT_VERSION"
    "libvirt-daemon=$LIBVIRT_VERSION" "libvirt0=$LIBVIRT_VERSION"
    "qemu-system-x86=$QEMU_VERSION"
    # qemu-img: libvirt runs it for snapshots of shut-off VMs (scripts/measure-snapshots.sh).
    "qemu-utils=$QEMU_VERSION"
)
# From bookworm: swtpm 0.7.1 and tools the suite runs inside a world
# (tests/e2e/tpm.sh: tpm2-tools, ss, python3).
packages=(
    swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 ovmf
    iproute2 python3 procps libxml2-utils ca-certificates
)
stamp_text="v1 ${bpo_packages[*]} ${packages[*]}"

if [[ -f $root/.vts-root-complete && "$(<"$root/.vts-root-complete")" == "$stamp_text" ]]; then
    echo "==> libvirt-next root: reusing $root" >&2
    echo "$root"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "error: building the root needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
    echo "error: debootstrap not found; run scripts/install-deps.sh" >&2
    exit 1
}

# Never rm -rf a root with something still mounted inside it.
if [[ -d $root ]]; then
    if grep -q " $root/" /proc/mounts; then
        echo "error: $root has mounts inside it; bring its worlds down first" >&2
        exit 1
    fi
    echo "==> libvirt-next root: rebuilding $root" >&2
    rm -rf "$root"
fi
mkdir -p "$(dirname "$root")"
tmp=$root.partial
rm -rf "$tmp"

echo "==> debootstrap bookworm into $tmp" >&2
debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 \
    || { tail -n 30 "$tmp.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }

cat >"$tmp/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror bookworm-backports main
deb ${mirror%/debian}/debian-security bookworm-security main
SRC
# No daemons started by package scripts inside the root.
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod 755 "$tmp/usr/sbin/policy-rc.d"

in_root() {
    # /proc for package scripts; unmounted again whatever happens. /dev is a
    # private tmpfs with the few nodes package scripts use, never the host's:
    # a postinst that runs `chgrp kvm /dev/kvm` with the root's kvm gid would
    # otherwise take /dev/kvm away from the host's qemu user.
    unshare --mount --propagation private -- bash -c '
        set -e; r=$1; shift
        mount -t proc proc "$r/proc"
        mount -t tmpfs -o mode=0755 tmpfs "$r/dev"
        for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
            IFS=: read -r name major minor <<<"$n"
            mknod -m 0666 "$r/dev/$name" c "$major" "$minor"
        done
        exec chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C \
            DEBIAN_FRONTEND=noninteractive "$@"' _ "$tmp" "$@"
}
cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
echo "==> apt inside the root (libvirt $LIBVIRT_VERSION, QEMU $QEMU_VERSION)" >&2
{
    in_root apt-get update -qq
    in_root apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports "${bpo_packages[@]}"
    in_root apt-get install -y -qq --no-install-recommends "${packages[@]}"
    in_root apt-get clean
} >>"$tmp.log" 2>&1 || { tail -n 40 "$tmp.log" >&2; echo "error: apt inside the root failed" >&2; exit 1; }

echo "$stamp_text" >"$tmp/.vts-root-complete"
mv "$tmp" "$root"
mv "$tmp.log" "$root.log"
echo "==> libvirt-next root ready: $root" >&2
echo "$root"
