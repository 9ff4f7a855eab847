#!/bin/bash
# The world tests against libvirt 12.8, QEMU 11.1 and swtpm 0.10.2 from Debian
# unstable (scripts/test-libvirt-next.sh sid; result in docs/LIBVIRT-NEXT.md).
exec "$(dirname "$0")/test-libvirt-next.sh" sid "$@"
