#!/bin/bash
# The Debian unstable root with libvirt 12.8, QEMU 11.1 and swtpm 0.10.2
# (scripts/test-libvirt-sid.sh): scripts/make-root.sh's sid profile.
#   scripts/make-libvirt-sid-root.sh [ROOT]   default: target/roots/sid
exec "$(dirname "$0")/make-root.sh" sid "$@"
