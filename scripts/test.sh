#!/bin/bash
# The test suite: unit, fixture-vector, hook-binary, property, fault and
# end-to-end tests (the latter against private libvirt daemons, never the
# host's). Run as root on Debian 12:   sudo ./scripts/test.sh
# With CI=true a missing environment fails the end-to-end tests instead of
# skipping them.
#
# The heavy jobs are their own scripts (.ci/run runs them after this one):
# the same world tests against libvirt 11.3 in a debootstrapped root
# (scripts/test-libvirt-next.sh), the shutdown storms (scripts/test-storms.sh),
# the Debian package's lifecycle in fresh roots (scripts/test-package.sh), the
# snapshots (scripts/test-snapshots.sh), three hosts sealing for each other
# (scripts/test-hosts.sh); HEAVY below lists the test
# binaries this script leaves to them.
set -euo pipefail
cd "$(dirname "$0")/.."

HEAVY=(package snapshots hosts storms)

./scripts/install-deps.sh
start=$SECONDS
echo "==> building"
# With the named fault points tests/hook/faults.rs needs (src/fault.rs): inert
# unless VIRT_TPM_STATE_FAULT is set; release and package builds never have
# them (scripts/build-release.sh).
FEATURES=(--features fault-injection)
# Every crate of the workspace (the root's default-members) ...
cargo build --all-targets --locked "${FEATURES[@]}"
# ... then the hook alone, without the CLI's libvirt feature (the one the
# tests run; scripts/build-hook.sh says why).
./scripts/build-hook.sh "${FEATURES[@]}"
build_secs=$((SECONDS - start))

# Every test binary but the heavy ones (a new tests/*.rs or tests/*/main.rs
# runs here without being listed), built once; cargo prints where each
# executable is.
mapfile -t BINARIES < <(cargo test --no-run --locked "${FEATURES[@]}" --lib --tests \
    --message-format=json 2>/dev/null | python3 -c '
import json, os, sys
heavy = set(sys.argv[1:])
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    if t["name"] in heavy:
        continue
    src = os.path.relpath(t["src_path"])
    name = "unittests " + src if "lib" in t["kind"] else src
    print(t["name"] + "\t" + name + "\t" + m["executable"])
' "${HEAVY[@]}")

# Two lanes at once, of about equal length: tests/worlds (private libvirt
# worlds, which mostly wait for libvirtd and QEMU) with tests/format (the
# property tests, CPU-bound, beside those waits) in one; the rest (the
# hook's processes and fsyncs, the CLI with the watch daemon's worlds) in
# the other. Inside a binary, two tests at once. Each lane's output is
# shown when it ends, in cargo's format. Measured here (2 cores): worlds
# 394 s + format 16 s against hook 161 s + cli 171 s + the rest 10 s;
# with the cores shared by other builds (load ~10) hook grew to 577 s.
WORLD_LANE=(worlds format)
run_lane() { # LANE_LOG IN_WORLD_LANE(yes|no)
    local log=$1 want=$2 status=0 entry name exe stem in_lane
    : >"$log"
    for entry in "${BINARIES[@]}"; do
        IFS=$'\t' read -r stem name exe <<<"$entry"
        in_lane=no
        for w in "${WORLD_LANE[@]}"; do [[ $stem == "$w" ]] && in_lane=yes; done
        [[ $in_lane == "$want" ]] || continue
        echo "     Running $name ($exe)" >>"$log"
        "$exe" --test-threads="${TEST_THREADS:-2}" >>"$log" 2>&1 || status=1
    done
    return "$status"
}

echo "==> running the tests"
tests_start=$SECONDS
run_lane target/test-lane-worlds.log yes &
worlds=$!
run_lane target/test-lane-other.log no &
other=$!
status=0
wait "$other" || status=1
cat target/test-lane-other.log
wait "$worlds" || status=1
cat target/test-lane-worlds.log
cat target/test-lane-other.log target/test-lane-worlds.log >target/test-output.log
tests_secs=$((SECONDS - tests_start))

echo "==> time per phase (seconds)"
{
    printf '%-28s %6s\n' build "$build_secs"
    awk '/^     Running / { name = ($2 == "unittests") ? $2 " " $3 : $2 }
         /^test result:/ { for (i = 1; i < NF; i++) if ($i == "in") { sub(/s$/, "", $(i+1)); printf "%-28s %6.0f\n", name, $(i+1) } }' \
        target/test-output.log
    printf '%-28s %6s\n' "tests (two lanes, wall)" "$tests_secs"
    printf '%-28s %6s\n' total "$((SECONDS - start))"
} | sed 's/^/    /'
echo "==> summary"
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' target/test-output.log
exit "$status"
