#!/bin/bash
# Coverage-guided fuzzing (libFuzzer via cargo-fuzz) of the readers that face
# hostile input: the domain-XML reader with the metadata decoder
# (read_domain) and the encoder/decoder round trip (round_trip). See
# docs/FUZZING.md, which records the last run.
#
# Not part of scripts/test.sh: cargo-fuzz needs a nightly toolchain. The
# property tests (tests/format/properties.rs, stable) are, and cover the same
# properties with fixed mutation strategies.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]   (default 300, both)
# Env:   FUZZ_TOOLCHAIN (default nightly)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(read_domain round_trip strict_domain)
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
CARGO_FUZZ_VERSION=0.13.1

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$toolchain" --profile minimal
fi
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" != "$CARGO_FUZZ_VERSION" ]; then
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# Seed corpus: every fixture (valid and invalid vectors, captured domains).
mkdir -p fuzz/corpus/read_domain fuzz/corpus/round_trip fuzz/corpus/strict_domain
cp fixtures/vectors/*.xml fixtures/domains/*.xml fuzz/regressions/read_domain-* fuzz/corpus/read_domain/
cp fixtures/domains/*.xml fixtures/domains/strict/*.xml fuzz/corpus/strict_domain/

status=0
for target in "${targets[@]}"; do
    extra=()
    [ "$target" != round_trip ] && extra=(-dict=fuzz/xml.dict -max_len=131072)
    echo "==> fuzzing $target for ${secs}s"
    # -timeout: a hang; -malloc_limit_mb: one allocation far beyond the
    # decoder's caps; -rss_limit_mb: total memory.
    if ! cargo "+$toolchain" fuzz run -O "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -print_final_stats=1 "${extra[@]}" \
        2>&1 | tee "fuzz/$target.log" | grep -E '^(#[0-9]+ +(DONE|INITED)|stat::|==[0-9]+== ERROR|SUMMARY|Done )'; then
        :
    fi
    if grep -qE '==[0-9]+== ERROR|panicked|SUMMARY: libFuzzer' "fuzz/$target.log"; then
        echo "FAIL: $target found a crash; see fuzz/$target.log and fuzz/artifacts/$target/"
        status=1
    else
        echo "ok: $target"
    fi
done
exit "$status"
