#!/bin/bash
# Release build: the CLI (dynamically linked against the system libvirt) and
# the hook, linked statically and without libvirt: the hook runs inside every
# VM start, stop and migration on the host, and a static binary starts as
# fast as /bin/true (docs/BENCHMARKS.md, row 1). Prints the two paths.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --quiet --bin virt-tpm-state
# --target keeps RUSTFLAGS off build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --quiet --no-default-features \
    --bin virt-tpm-state-hook --target "$target"
echo "$PWD/target/release/virt-tpm-state"
echo "$PWD/target/$target/release/virt-tpm-state-hook"
