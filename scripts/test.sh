#!/bin/bash
# The whole test suite: unit, fixture-vector, hook-binary and end-to-end
# tests (the latter against private libvirt daemons, never the host's).
# Run as root on Debian 12:   sudo ./scripts/test.sh
# With CI=true a missing environment fails the end-to-end tests instead of
# skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
echo "==> building"
# With the named fault points tests/faults.rs needs (src/fault.rs): inert
# unless VIRT_TPM_STATE_FAULT is set; release and package builds never have
# them (scripts/build-release.sh).
FEATURES=(--features fault-injection)
cargo build --all-targets --locked "${FEATURES[@]}"
echo "==> running the tests"
# One test binary at a time; inside e2e, two worlds at once suit 2 cores.
set +e
cargo test --locked --no-fail-fast "${FEATURES[@]}" -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
# The world tests once more against libvirt 11.3 in a debootstrapped root
# (scripts/test-libvirt-next.sh); their results count in the total below.
if [[ ${VTS_SKIP_LIBVIRT_NEXT:-} == 1 && ${CI:-} == true ]]; then
    # The 11.3 pass is the only real-libvirt test of <source type='file'>.
    echo "==> libvirt-next: FAILED: VTS_SKIP_LIBVIRT_NEXT=1 is not allowed under CI=true"
    status=1
elif [[ ${VTS_SKIP_LIBVIRT_NEXT:-} == 1 ]]; then
    echo "==> libvirt-next: SKIP (VTS_SKIP_LIBVIRT_NEXT=1)"
else
    ./scripts/test-libvirt-next.sh 2>&1 | tee -a target/test-output.log
    next_status=${PIPESTATUS[0]}
    [[ $status -ne 0 ]] || status=$next_status
fi
set -e
echo "==> summary"
grep -E '^(test result:|     Running )' target/test-output.log | sed 's/^/    /'
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"
