#!/bin/bash
# Builds the hook crate (hooks/) alone, with the cargo arguments given
# (`--features fault-injection` for the tests, `--release` for benchmarks).
# Alone, because cargo builds one feature set of a package per invocation:
# built together with the CLI, the library the hook links would have the
# CLI's `libvirt` feature. The tests run target/*/virt-tpm-state-hook and
# tests/hook/hook.rs checks it was built this way.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked -p virt-tpm-state-hook "$@"
