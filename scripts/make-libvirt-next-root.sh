#!/bin/bash
# The Debian 12 root with libvirt 11.3 and QEMU 10 from bookworm-backports
# (scripts/test-libvirt-next.sh): scripts/make-root.sh's bookworm-bpo profile.
#   scripts/make-libvirt-next-root.sh [ROOT]   default: target/roots/bookworm-bpo
exec "$(dirname "$0")/make-root.sh" bookworm-bpo "$@"
