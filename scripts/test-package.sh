#!/bin/bash
# Heavy job: the Debian package's lifecycle for real (tests/package.rs):
# builds the release .deb (scripts/build-deb.sh) and installs, upgrades,
# removes and purges it inside an overlay world. As root; .ci/run runs it
# after scripts/test.sh (it takes about 3.5 minutes, most of it the release
# build).
set -euo pipefail
cd "$(dirname "$0")/.."
set +e
cargo test --locked --no-fail-fast --features fault-injection --test package \
    -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test-package.log
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "package: %d passed, %d failed\n", p, f }' target/test-package.log
exit "$status"
