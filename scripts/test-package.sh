#!/bin/bash
# Heavy job: the Debian package's lifecycle for real (tests/package.rs), in a
# fresh Debian 12 and a fresh Debian 13 root with a real libvirtd each:
#   1. the roots (scripts/make-root.sh pkg-bookworm, pkg-trixie; debootstrap,
#      reused by their stamps), the previous released build
#      (scripts/build-prev-deb.sh, reused once built) and this checkout's
#      package (scripts/build-deb.sh), made in parallel;
#   2. lintian on this checkout's package (overrides, each justified, in
#      dist/deb/lintian-overrides);
#   3. the tests: apt install / remove / purge and the upgrade from the
#      previous build, in each root.
# As root; .ci/run runs it after scripts/test.sh. Last result in
# docs/PACKAGING.md. Without root or debootstrap the tests print SKIP, except
# with CI=true, where that is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
log=target/test-package.log
mkdir -p target
: >"$log"

status=0
if [[ $(id -u) -eq 0 ]] && command -v debootstrap >/dev/null; then
    echo "==> package: roots, previous build, this build (in parallel)" | tee -a "$log"
    pids=()
    for job in "scripts/make-root.sh pkg-bookworm" "scripts/make-root.sh pkg-trixie" \
        scripts/build-prev-deb.sh scripts/build-deb.sh; do
        # shellcheck disable=SC2086
        ./$job >>"$log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    [[ $status -eq 0 ]] || { tail -n 40 "$log"; echo "error: package: a build step failed (see $log)" >&2; exit 1; }
else
    # Without root the tests SKIP (or fail under CI=true); lintian still runs.
    scripts/build-deb.sh >>"$log" 2>&1 || { tail -n 40 "$log"; exit 1; }
fi

echo "==> package: lintian" | tee -a "$log"
lintian_ok=0
if command -v lintian >/dev/null; then
    deb=$(ls target/debian/virt-tpm-state_*.deb)
    # --fail-on warning: an error or a warning that is not overridden fails.
    if lintian --fail-on error,warning --info "$deb" 2>&1 | tee -a "$log"; then
        lintian_ok=1
    else
        status=1
    fi
elif [[ ${CI:-} == true ]]; then
    echo "error: lintian not installed (scripts/install-deps.sh)" | tee -a "$log" >&2
    status=1
else
    echo "SKIP lintian: not installed (scripts/install-deps.sh)" | tee -a "$log"
fi

# The hook the tests run (not built by cargo test: another crate).
./scripts/build-hook.sh --quiet --features fault-injection
set +e
cargo test --locked --no-fail-fast --features fault-injection --test package \
    -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee -a "$log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
set -e
awk -v l="$lintian_ok" '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "package: %d passed, %d failed; lintian %s\n", p, f, (l ? "clean" : "NOT clean or not run") }' "$log"
exit "$status"
