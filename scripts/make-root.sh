#!/bin/bash
# Builds (or reuses) a Debian root made with debootstrap under target/roots/,
# for running private libvirt worlds on another Debian or libvirt without
# touching the host's packages (tests/e2e/world.sh runs a world inside it
# when VTS_WORLD_ROOTFS is set). As root. Prints the root's absolute path.
#   scripts/make-root.sh PROFILE [ROOT]     default ROOT: target/roots/PROFILE
# Profiles:
#   bookworm-bpo  Debian 12 with libvirt 11.3 and QEMU 10 from bookworm-backports
#                 (scripts/test-libvirt-next.sh, docs/LIBVIRT-NEXT.md)
#   sid           Debian unstable with libvirt 12.8, QEMU 11.1 and swtpm 0.10.2
#                 (scripts/test-libvirt-sid.sh, docs/LIBVIRT-NEXT.md)
#   pkg-bookworm  Debian 12 as released, the package's lifecycle test
#   pkg-trixie    Debian 13, the same test (scripts/test-package.sh, docs/PACKAGING.md)
# The pkg-* roots hold libvirt, QEMU and the test's tools, but NOT swtpm: the
# package depends on it, so `apt install ./virt-tpm-state_*.deb` must resolve
# and install it. Its .debs are downloaded into the root's apt cache when the
# root is built, so the test installs them without the network.
# A root is reused when its stamp matches its profile's package lists;
# otherwise it is rebuilt from scratch. Roots are kept lean
# (--variant=minbase, no Recommends).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security
# Installed from the suite, after any from backports.
packages=()
# Installed from -t TARGET (backports), pinned.
target_packages=()
target_release=
# Downloaded only: what `apt install` of the package must pull in itself.
download_only=()
# Only "deb MIRROR SUITE main" (unstable).
single_suite=
case $profile in
    bookworm-bpo)
        suite=bookworm
        # Versions pinned: a new backport is a deliberate change (and a new
        # recorded result in docs/LIBVIRT-NEXT.md).
        LIBVIRT_VERSION=11.3.0-2~bpo12+1
        QEMU_VERSION=1:10.0.2+ds-2+deb13u1~bpo12+1
        target_release=bookworm-backports
        target_packages=(
            "libvirt-daemon-system=$LIBVIRT_VERSION" "libvirt-clients=$LIBVIRT_VERSION"
            "libvirt-daemon=$LIBVIRT_VERSION" "libvirt0=$LIBVIRT_VERSION"
            "qemu-system-x86=$QEMU_VERSION"
            # qemu-img: libvirt runs it for snapshots of shut-off VMs
            # (tests/snapshots.rs, scripts/measure-snapshots.sh).
            "qemu-utils=$QEMU_VERSION"
        )
        # From bookworm: swtpm 0.7.1 and tools the suite runs inside a world
        # (tests/e2e/tpm.sh: tpm2-tools, ss, python3).
        packages=(
            swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 ovmf
            iproute2 python3 procps libxml2-utils ca-certificates
        )
        # The stamp this root had before the profiles existed: kept, so
        # existing roots are reused.
        stamp_text="v1 ${target_packages[*]} ${packages[*]}"
        ;;
    sid)
        suite=sid
        LIBVIRT_VERSION=12.8.0-1
        QEMU_VERSION=1:11.1.3+ds-1
        SWTPM_VERSION=0.10.2-2
        target_release=sid
        target_packages=(
            "libvirt-daemon-system=$LIBVIRT_VERSION" "libvirt-clients=$LIBVIRT_VERSION"
            "libvirt-daemon=$LIBVIRT_VERSION" "libvirt0=$LIBVIRT_VERSION"
            "qemu-system-x86=$QEMU_VERSION" "qemu-utils=$QEMU_VERSION"
            "swtpm=$SWTPM_VERSION" "swtpm-tools=$SWTPM_VERSION" "swtpm-libs=$SWTPM_VERSION"
        )
        packages=(
            tpm2-tools libtss2-tcti-swtpm0 ovmf
            iproute2 python3 procps libxml2-utils ca-certificates
        )
        # Unstable has no -updates or -security suite.
        single_suite=1
        stamp_text="v1 sid ${target_packages[*]} ${packages[*]}"
        ;;
    pkg-bookworm | pkg-trixie)
        suite=${profile#pkg-}
        # libvirt and QEMU as the suite ships them; tpm2-tools and the swtpm
        # TCTI for reading a guest-free TPM (tests/e2e/tpm.sh); man-db to
        # render the packaged man pages.
        packages=(
            libvirt-daemon-system libvirt-clients qemu-system-x86
            tpm2-tools libtss2-tcti-swtpm0 iproute2 python3 procps man-db
        )
        download_only=(swtpm swtpm-tools)
        stamp_text="pkg-v1 $suite ${packages[*]} download:${download_only[*]}"
        ;;
    *)
        echo "usage: make-root.sh bookworm-bpo|sid|pkg-bookworm|pkg-trixie [ROOT]" >&2
        exit 2
        ;;
esac
root=${2:-$PWD/target/roots/$profile}
[[ $root == /* ]] || root=$PWD/$root

if [[ -f $root/.vts-root-complete && "$(<"$root/.vts-root-complete")" == "$stamp_text" ]]; then
    echo "==> root $profile: reusing $root" >&2
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
    echo "==> root $profile: rebuilding $root" >&2
    rm -rf "$root"
fi
mkdir -p "$(dirname "$root")"
tmp=$root.partial
rm -rf "$tmp"

# Signatures are checked against the host's Debian archive keyring (it holds
# the keys unstable is signed with; scripts/install-deps.sh installs it).
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "==> debootstrap $suite into $tmp" >&2
debootstrap --variant=minbase --keyring="$keyring" "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 \
    || { tail -n 30 "$tmp.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }

if [[ -n $single_suite ]]; then
    echo "deb $mirror $suite main" >"$tmp/etc/apt/sources.list"
else
    {
        echo "deb $mirror $suite main"
        echo "deb $mirror $suite-updates main"
        [[ -z $target_release ]] || echo "deb $mirror $target_release main"
        echo "deb $security $suite-security main"
    } >"$tmp/etc/apt/sources.list"
fi
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
echo "==> apt inside the root ($profile)" >&2
{
    in_root apt-get update -qq
    if [[ ${#target_packages[@]} -gt 0 ]]; then
        in_root apt-get install -y -qq --no-install-recommends \
            -t "$target_release" "${target_packages[@]}"
    fi
    in_root apt-get install -y -qq --no-install-recommends "${packages[@]}"
    in_root apt-get clean
    if [[ ${#download_only[@]} -gt 0 ]]; then
        # With Recommends, as a plain `apt install` would take them.
        in_root apt-get install -y -qq --download-only "${download_only[@]}"
    fi
} >>"$tmp.log" 2>&1 || { tail -n 40 "$tmp.log" >&2; echo "error: apt inside the root failed" >&2; exit 1; }

echo "$stamp_text" >"$tmp/.vts-root-complete"
mv "$tmp" "$root"
mv "$tmp.log" "$root.log"
echo "==> root $profile ready: $root" >&2
echo "$root"
