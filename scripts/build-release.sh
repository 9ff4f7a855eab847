#!/bin/bash
# Release build: the CLI (dynamically linked against the system libvirt) and
# the hook (hooks/), built alone so that the library it links has no libvirt
# feature (scripts/build-hook.sh says why), and linked statically: the hook
# runs inside every VM start, stop and migration on the host, and a static
# binary starts as fast as /bin/true (docs/BENCHMARKS.md, row 1). Prints the
# two paths.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --locked --quiet -p virt-tpm-state --bin virt-tpm-state
# --target keeps RUSTFLAGS off build scripts and proc macros.
RUSTFLAGS="-C target-feature=+crt-static" \
    ./scripts/build-hook.sh --release --quiet --target "$target"
echo "$PWD/target/release/virt-tpm-state"
echo "$PWD/target/$target/release/virt-tpm-state-hook"
