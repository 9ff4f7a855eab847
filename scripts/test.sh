#!/bin/bash
# The test suite: unit, fixture-vector, hook-binary, property, fault and
# end-to-end tests (the latter against private libvirt daemons, never the
# host's). Run as root on Debian 12:   sudo ./scripts/test.sh
# With CI=true a missing environment fails the end-to-end tests instead of
# skipping them.
#
# The heavy jobs are their own scripts (.ci/run runs them after this one):
# the same world tests against libvirt 11.3 in a debootstrapped root
# (scripts/test-libvirt-next.sh) and the Debian package's lifecycle in an
# overlay world (scripts/test-package.sh); HEAVY below lists the test
# binaries this script leaves to them.
set -euo pipefail
cd "$(dirname "$0")/.."

HEAVY=(package)

./scripts/install-deps.sh
start=$SECONDS
echo "==> building"
# With the named fault points tests/faults.rs needs (src/fault.rs): inert
# unless VIRT_TPM_STATE_FAULT is set; release and package builds never have
# them (scripts/build-release.sh).
FEATURES=(--features fault-injection)
cargo build --all-targets --locked "${FEATURES[@]}"
build_secs=$((SECONDS - start))

# Every integration test binary but the heavy ones: a new tests/*.rs runs
# here without being listed.
mapfile -t TARGETS < <(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
heavy = set(sys.argv[1:])
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"] and t["name"] not in heavy:
            print("--test"); print(t["name"])
' "${HEAVY[@]}")

echo "==> running the tests"
# One test binary at a time; inside a binary, two tests (two worlds) at once
# suit 2 cores.
tests_start=$SECONDS
set +e
cargo test --locked --no-fail-fast "${FEATURES[@]}" --lib "${TARGETS[@]}" \
    -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
tests_secs=$((SECONDS - tests_start))

echo "==> time per phase (seconds)"
{
    printf '%-28s %6s\n' build "$build_secs"
    awk '/^     Running / { name = $2 }
         /^test result:/ { for (i = 1; i < NF; i++) if ($i == "in") { sub(/s$/, "", $(i+1)); printf "%-28s %6.0f\n", name, $(i+1) } }' \
        target/test-output.log
    printf '%-28s %6s\n' "tests (all binaries)" "$tests_secs"
    printf '%-28s %6s\n' total "$((SECONDS - start))"
} | sed 's/^/    /'
echo "==> summary"
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"
