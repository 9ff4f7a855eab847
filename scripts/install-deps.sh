#!/bin/bash
# Installs what building and testing virt-tpm-state needs on Debian 12, as
# root: libvirt (daemon, client, headers), swtpm, tpm2-tools, QEMU, OVMF;
# debootstrap for the Debian roots (scripts/make-root.sh: libvirt 11.3, the
# package test's Debian 12 and 13); lintian for the package (scripts/test-package.sh).
# Idempotent: installs only what is missing. Rust itself comes from rustup.
set -euo pipefail

packages=(
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0
    qemu-system-x86 qemu-utils ovmf python3 python3-pip libxml2-utils
    hyperfine time xz-utils
    debootstrap lintian
    man-db dpkg-dev binutils systemd
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "==> system packages: all present"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing packages (${missing[*]}); run as root to install them" >&2
        exit 1
    fi
    echo "==> installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The Debian packages try to start their services; there may be no init
    # system to start them with, which is fine: tests run private daemons.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "==> adding rustup component $component"
        rustup component add "$component"
    fi
done

# cargo-deb builds the Debian package (scripts/build-deb.sh, tests/package.rs).
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "==> installing cargo-deb $CARGO_DEB_VERSION (cargo install --locked)"
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi

# rage, an independent age implementation (pinned): tests/hosts.rs makes the
# owner's identity with rage-keygen and recovers a TPM with `rage -d`, as an
# owner holding an escrow identity would. Skipped when this version is there.
RAGE_VERSION=0.11.1
if [ "$(rage --version 2>/dev/null)" != "rage $RAGE_VERSION" ]; then
    echo "==> installing rage $RAGE_VERSION (cargo install --locked)"
    cargo install --locked --quiet rage --version "$RAGE_VERSION"
fi

# From PyPI, only when missing: virt-firmware (virt-fw-vars; tests/worlds/nvram.rs
# edits an OVMF variable store with it) and cryptography (tests/format/vectors.rs
# runs the spec's Python decryption example).
pip_install() {
    python3 -m pip install --quiet "$@" 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages "$@"
}
if ! command -v virt-fw-vars >/dev/null; then
    echo "==> installing virt-firmware (virt-fw-vars) with pip"
    pip_install virt-firmware
fi
# pyrage: the Python reference reader opens files sealed for age recipients.
if ! python3 -c 'import pyrage' 2>/dev/null; then
    echo "==> installing pyrage with pip"
    pip_install pyrage==1.4.0
fi
if ! python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' 2>/dev/null; then
    echo "==> installing cryptography with pip"
    pip_install cryptography
fi
