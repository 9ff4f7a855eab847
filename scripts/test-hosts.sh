#!/bin/bash
# Heavy job: three private libvirt hosts sealing a VM's TPM for each other
# with age (tests/hosts.rs, issue 21): seal for {A, B, owner}, refuse on C,
# add C and rekey, revoke B, recover with the owner's identity and the real
# `rage`. As root; .ci/run runs it after scripts/test.sh (about 1.5 minutes:
# three worlds and a dozen VM starts).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
set +e
# The hook the tests run (not built by cargo test: another crate).
./scripts/build-hook.sh --quiet --features fault-injection
cargo test --locked --no-fail-fast --features fault-injection --test hosts \
    -- --test-threads=1 2>&1 | tee target/test-hosts.log
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "hosts: %d passed, %d failed\n", p, f }' target/test-hosts.log
exit "$status"
