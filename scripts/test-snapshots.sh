#!/bin/bash
# Heavy job: the snapshot world tests (tests/snapshots.rs, issue 20) against
# the host's libvirt. Each case boots a UEFI VM several times (about 2.5 min
# in all here), over the budget of scripts/test.sh, so .ci/run runs it after
# the suite; scripts/test-libvirt-next.sh runs the same binary on 11.3.
# Run as root after a build:   sudo ./scripts/test-snapshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
set +e
# The hook the tests run (not built by cargo test: another crate).
./scripts/build-hook.sh --quiet --features fault-injection
cargo test --locked --no-fail-fast --features fault-injection --test snapshots \
    -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test-snapshots.log
status=${PIPESTATUS[0]}
exit "$status"
