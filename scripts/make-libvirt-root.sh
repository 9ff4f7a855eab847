#!/bin/bash
# Builds (or reuses) a Debian root with another libvirt, QEMU and swtpm than
# the host's, for running the end-to-end suite against them without touching
# the host's packages (tests/e2e/world.sh runs a world inside it when
# VTS_WORLD_ROOTFS is set; scripts/test-libvirt-next.sh FLAVOUR).
# As root. Prints the root's absolute path on stdout.
#   scripts/make-libvirt-root.sh FLAVOUR [ROOT]   default ROOT: target/roots/FLAVOUR
# Flavours (scripts/make-libvirt-next-root.sh and make-libvirt-sid-root.sh
# are the two of them by name):
#   bookworm-bpo  Debian 12 with libvirt 11.3 and QEMU 10 from bookworm-backports,
#                 swtpm 0.7.1 from bookworm
#   sid           Debian unstable with libvirt 12.8, QEMU 11.1 and swtpm 0.10.2
# A root is reused when its stamp matches the flavour's package list;
# otherwise it is rebuilt from scratch (debootstrap, then apt inside it).
# Versions are pinned: a new upload is a deliberate change (and a new
# recorded result in docs/LIBVIRT-NEXT.md).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 bookworm-bpo|sid [ROOT]" >&2; exit 2; }
flavour=${1:-}
root=${2:-$PWD/target/roots/$flavour}
[[ $root == /* ]] || root=$PWD/$root
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Tools the suite runs inside a world (tests/e2e/tpm.sh: tpm2-tools, ss,
# python3) and OVMF for the UEFI tests; from the flavour's main suite.
tools=(
    tpm2-tools libtss2-tcti-swtpm0 ovmf
    iproute2 python3 procps libxml2-utils ca-certificates
)
case $flavour in
bookworm-bpo)
    suite=bookworm
    LIBVIRT_VERSION=11.3.0-2~bpo12+1
    QEMU_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1
    # From bookworm-backports: the newer libvirt and QEMU (the point of this root).
    pinned_suite=bookworm-backports
    pinned=(
        "libvirt-daemon-system=$LIBVIRT_VERSION" "libvirt-clients=$LIBVIRT_VERSION"
        "libvirt-daemon=$LIBVIRT_VERSION" "libvirt0=$LIBVIRT_VERSION"
        "qemu-system-x86=$QEMU_VERSION"
    )
    # swtpm 0.7.1 from bookworm, unpinned as in the first recorded run.
    packages=(swtpm swtpm-tools "${tools[@]}")
    # The stamp text of the first version of this root: kept, so that roots
    # already built are reused.
    stamp_text="v1 ${pinned[*]} ${packages[*]}"
    sources="deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $mirror bookworm-backports main
deb ${mirror%/debian}/debian-security bookworm-security main"
    ;;
sid)
    suite=sid
    LIBVIRT_VERSION=12.8.0-1
    QEMU_VERSION=1:11.1.3+ds-1
    SWTPM_VERSION=0.10.2-2
    pinned_suite=sid
    pinned=(
        "libvirt-daemon-system=$LIBVIRT_VERSION" "libvirt-clients=$LIBVIRT_VERSION"
        "libvirt-daemon=$LIBVIRT_VERSION" "libvirt0=$LIBVIRT_VERSION"
        "qemu-system-x86=$QEMU_VERSION"
        "swtpm=$SWTPM_VERSION" "swtpm-tools=$SWTPM_VERSION" "swtpm-libs=$SWTPM_VERSION"
    )
    packages=("${tools[@]}")
    stamp_text="v1 sid ${pinned[*]} ${packages[*]}"
    sources="deb $mirror sid main"
    ;;
*) usage ;;
esac

if [[ -f $root/.vts-root-complete && "$(<"$root/.vts-root-complete")" == "$stamp_text" ]]; then
    echo "==> $flavour root: reusing $root" >&2
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
    echo "==> $flavour root: rebuilding $root" >&2
    rm -rf "$root"
fi
mkdir -p "$(dirname "$root")"
tmp=$root.partial
rm -rf "$tmp"

# Signatures are checked against the host's Debian archive keyring (it holds
# the keys unstable is signed with; a host too old for them fails here, which
# is the right place: scripts/install-deps.sh updates debian-archive-keyring).
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "==> debootstrap $suite into $tmp" >&2
debootstrap --variant=minbase --keyring="$keyring" "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 \
    || { tail -n 30 "$tmp.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }

echo "$sources" >"$tmp/etc/apt/sources.list"
# A frozen or slow mirror of unstable may serve a Release file past its
# Valid-Until; the signature is still checked.
echo 'Acquire::Check-Valid-Until "false";' >"$tmp/etc/apt/apt.conf.d/99vts-no-valid-until"
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
    in_root apt-get install -y -qq --no-install-recommends -t "$pinned_suite" "${pinned[@]}"
    in_root apt-get install -y -qq --no-install-recommends "${packages[@]}"
    in_root apt-get clean
} >>"$tmp.log" 2>&1 || { tail -n 40 "$tmp.log" >&2; echo "error: apt inside the root failed" >&2; exit 1; }

echo "$stamp_text" >"$tmp/.vts-root-complete"
mv "$tmp" "$root"
mv "$tmp.log" "$root.log"
echo "==> $flavour root ready: $root" >&2
echo "$root"
