#!/bin/bash
# The Debian 12 root with libvirt 11.3 and QEMU 10 from bookworm-backports
# (scripts/make-libvirt-root.sh bookworm-bpo). As root; prints the root's path.
#   scripts/make-libvirt-next-root.sh [ROOT]   default: target/roots/bookworm-bpo
exec "$(dirname "$0")/make-libvirt-root.sh" bookworm-bpo "$@"
